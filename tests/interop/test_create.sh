#!/usr/bin/env bash
# `qsm create -f qcow2 -o OPTS FILE SIZE` writes exactly the bytes
# `qemu-img create` writes (cmp, including the file length), for the cluster
# sizes, compat levels and refcount widths of the workload tests, plus a few
# sizes that are not a multiple of an L2 table or a cluster, and both
# compression types; and images with backing files (see the end).
. "$(dirname "$0")/lib.sh"
interop_init

CASES=${QSM_CREATE_CASES:-"
cluster_size=512,compat=1.1,refcount_bits=1:1G
cluster_size=512,compat=0.10,refcount_bits=16:1G
cluster_size=4k,compat=1.1,refcount_bits=16:1G
cluster_size=4k,compat=0.10,refcount_bits=16:1G
cluster_size=64k,compat=1.1,refcount_bits=64:1G
cluster_size=64k,compat=0.10,refcount_bits=16:1G
cluster_size=2M,compat=1.1,refcount_bits=64:1G
cluster_size=2M,compat=0.10,refcount_bits=16:1G
cluster_size=64k,compat=1.1,refcount_bits=16:1G
cluster_size=64k,compat=1.1,refcount_bits=8:100M
cluster_size=4k,compat=1.1,refcount_bits=32:12345k
cluster_size=512,compat=1.1,refcount_bits=2:513
cluster_size=64k,compat=1.1,refcount_bits=4:16T
cluster_size=2M,compat=1.1,refcount_bits=16:3G
cluster_size=64k,compat=1.1,compression_type=zstd:1G
cluster_size=4k,compat=1.1,compression_type=zstd,lazy_refcounts=on:100M
cluster_size=64k,compat=1.1,compression_type=zlib:1G
"}

i=0
for c in $CASES; do
    opts=${c%:*}
    size=${c##*:}
    i=$((i + 1))
    q="$WORK/q$i.qcow2"
    s="$WORK/s$i.qcow2"
    qemu_create "$q" "$opts" "$size" || die "qemu-img create -o $opts $size failed"
    CHECKS=$((CHECKS + 1))
    if ! out=$("$QSM" create -f qcow2 -o "$opts" "$s" "$size" 2>&1); then
        fail "qsm create -o $opts $size failed: $out"
        continue
    fi
    CHECKS=$((CHECKS + 1))
    if ! cmp "$q" "$s"; then
        fail "qsm create -o $opts $size differs from qemu-img create (cmp -l | head):"
        cmp -l "$q" "$s" 2>&1 | head -n 10 | sed 's/^/    | /'
        ls -l "$q" "$s" | sed 's/^/    | /'
        continue
    fi
    check_clean "create -o $opts $size" "$s"
done

# Preallocation: metadata at 64 KiB clusters is byte-identical to qemu-img's
# (with small clusters and wide refcounts qemu interleaves refcount blocks
# differently); falloc and full lay data out differently (qemu puts it in
# one run).  All must check clean, map
# every guest cluster, use the same disk space and keep data written later.
for m in metadata falloc full; do
    for c in "cluster_size=65536:1100M" "cluster_size=4096,refcount_bits=64:40M"; do
        opts="preallocation=$m,${c%:*}"
        size=${c##*:}
        i=$((i + 1))
        q="$WORK/q$i.qcow2"
        s="$WORK/s$i.qcow2"
        qemu_create "$q" "$opts" "$size" || die "qemu-img create -o $opts $size failed"
        CHECKS=$((CHECKS + 1))
        if ! out=$("$QSM" create -f qcow2 -o "$opts" "$s" "$size" 2>&1); then
            fail "qsm create -o $opts $size failed: $out"
            continue
        fi
        check_clean "create -o $opts $size" "$s"
        if [ "$m" = metadata ] && [ "${c%:*}" = cluster_size=65536 ] && ! cmp -s "$q" "$s"; then
            fail "qsm create -o $opts $size differs from qemu-img create"
        fi
        qa=$(qemu-img check --output=json "$q" | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated-clusters"])')
        sa=$(qemu-img check --output=json "$s" | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated-clusters"])')
        [ "$qa" = "$sa" ] || fail "create -o $opts: $sa allocated clusters, qemu-img has $qa"
        [ "$(stat -c %b "$q")" -le $(( $(stat -c %b "$s") + 64 )) ] &&
        [ "$(stat -c %b "$s")" -le $(( $(stat -c %b "$q") + 64 )) ] ||
            fail "create -o $opts: disk usage $(stat -c %b "$s") blocks, qemu-img $(stat -c %b "$q")"
        qemu-io -c 'write -P 7 1M 64k' "$s" >/dev/null || fail "create -o $opts: qemu-io cannot write"
        "$QSM" io -c 'read -P 7 1M 64k' -c 'read -P 0 2M 64k' "$s" >/dev/null ||
            fail "create -o $opts: qsm reads wrong data"
        rm -f "$q" "$s"
    done
done

# Backing files: `qsm create -b FILE -F FMT` is byte-identical to qemu-img's,
# with and without SIZE (taken from the backing image), for qcow2 and raw
# backing files, relative names (resolved against the new image's directory,
# not the current one: the images go to a subdirectory) and absolute ones.
# Both qemu-io and qsm io then read the backing data through the new image.
mkdir -p "$WORK/sub"
qemu-img create -q -f qcow2 "$WORK/sub/base.qcow2" 10M
qemu-io -c 'write -P 3 0 10M' "$WORK/sub/base.qcow2" >/dev/null
truncate -s 7M "$WORK/sub/base.raw"
qemu-io -f raw -c 'write -P 3 0 7M' "$WORK/sub/base.raw" >/dev/null
j=0
while read -r args; do
    [ -n "$args" ] || continue
    for size in "" 20M; do
        j=$((j + 1))
        q="$WORK/sub/bq$j.qcow2"
        s="$WORK/sub/bs$j.qcow2"
        # shellcheck disable=SC2086
        qemu-img create -q -f qcow2 $args "$q" $size || die "qemu-img create $args $size failed"
        CHECKS=$((CHECKS + 1))
        # shellcheck disable=SC2086
        if ! out=$("$QSM" create -q -f qcow2 $args "$s" $size 2>&1); then
            fail "qsm create $args $size failed: $out"
            continue
        fi
        CHECKS=$((CHECKS + 1))
        cmp -s "$q" "$s" || { fail "qsm create $args $size differs from qemu-img create"; continue; }
        check_clean "create $args $size" "$s"
        CHECKS=$((CHECKS + 1))
        qemu-io -c 'read -P 3 0 64k' -c 'read -P 3 6M 1M' "$s" 2>&1 | grep -q -i 'fail\|error' &&
            fail "create $args $size: qemu-io does not read the backing data"
        CHECKS=$((CHECKS + 1))
        out=$("$QSM" io -c 'read -P 3 0 64k' -c 'read -P 3 6M 1M' "$s" 2>&1) &&
            ! printf '%s\n' "$out" | grep -q -i 'fail\|error' ||
            fail "create $args $size: qsm io does not read the backing data: $out"
    done
done <<EOF2
-b base.qcow2 -F qcow2
-b base.raw -F raw
-b base.qcow2 -F qcow2 -o compat=0.10,cluster_size=4k
-b $WORK/sub/base.raw -F raw -o cluster_size=2M
EOF2

interop_finish
