#!/bin/bash
# tests/interop/test_compressed.sh: compressed writes (`qsm io write -c`)
# against qemu-io 7.2's `write -c`.
#
#   same       the same script of compressed writes (QEMU 7.2 refuses them
#              over allocated clusters, so each cluster once; whole clusters
#              and the partial last one; patterns and random data, which does
#              not shrink and is stored uncompressed) run by qsm io and by
#              qemu-io on twin images: v3 64k, v2 4k, v3 64k over a backing
#              file, cache=none.  qemu-img compare: identical; qemu-img check:
#              clean, and the same allocated / fragmented / compressed counts,
#              "Image end offset" within one cluster of QEMU's.
#   overwrite  qsm overwrites compressed clusters (plain writes, partial and
#              whole, compressed writes over compressed and plain data):
#              check clean (released, no leak), contents equal to a qemu-io
#              twin that wrote the same data uncompressed.
#   snapshot   compressed clusters shared with an internal snapshot
#              (qemu-img snapshot -c), then overwritten by qsm: check clean,
#              the snapshot still holds the old data (qemu-img snapshot -a).
#              The same with compression_type=zstd at 4k, 64k and 2M
#              clusters (the frames are byte for byte libzstd's).
#   convert    `qemu-img convert -c` images (zlib and zstd) read back by qsm
#              io read -P; a damaged zstd frame reads as an I/O error.
#   refusals   raw images (ENOTSUP) and misaligned requests (EINVAL) give
#              qemu-io's messages.
source "$(dirname "$0")/lib.sh"
interop_init

NW=$(scaled 120)

# check_stats TAG QSM_IMG QEMU_IMG CLUSTER: both clean, same cluster counts,
# end offsets within one cluster.
check_stats() {
    local tag=$1 a=$2 b=$3 cl=$4 sa sb ea eb
    check_clean "$tag (qsm)" "$a" || return 1
    check_clean "$tag (qemu)" "$b" || return 1
    CHECKS=$((CHECKS + 1))
    sa=$(qemu-img check "$a" | grep 'allocated,')
    sb=$(qemu-img check "$b" | grep 'allocated,')
    if [ "$sa" != "$sb" ]; then
        fail "$tag: qemu-img check counts differ: qsm '$sa', qemu '$sb'"
    fi
    ea=$(qemu-img check "$a" | sed -n 's/^Image end offset: //p')
    eb=$(qemu-img check "$b" | sed -n 's/^Image end offset: //p')
    CHECKS=$((CHECKS + 1))
    if [ -z "$ea" ] || [ -z "$eb" ] || [ $(( ea > eb ? ea - eb : eb - ea )) -gt "$cl" ]; then
        fail "$tag: image end offset qsm $ea, qemu $eb: more than one cluster ($cl) apart"
    fi
    log "$tag: $sa; end offset qsm $ea, qemu $eb"
}

# gen_script OUT CLUSTER SIZE SEED N: N compressed writes of 1..4 whole
# clusters at distinct places (each cluster once), about one in five of one
# cluster of random data, plus the partial last cluster when SIZE is not
# aligned.
gen_script() {
    python3 - "$@" "$WORK/random.bin" <<'EOF'
import random, sys
out, cl, size, seed, n, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
r = random.Random(seed)
nclusters = size // cl
free = set(range(nclusters))
lines = []
for i in range(n):
    rand = r.random() < 0.2
    # Random data does not shrink: QEMU then writes each cluster plainly
    # from parallel tasks, in whatever order they finish, so its layout
    # (and check's fragmented count) is only reproducible one cluster at
    # a time.
    k = 1 if rand else r.randint(1, 4)
    c0 = r.randrange(0, max(1, nclusters - k))
    if any(c not in free for c in range(c0, c0 + k)):
        continue
    free -= set(range(c0, c0 + k))
    if rand:
        lines.append("write -c -s %s %d %d" % (rnd, c0 * cl, k * cl))
    else:
        lines.append("write -c -P %d %d %d" % (r.randint(1, 255), c0 * cl, k * cl))
if size % cl:
    lines.append("write -c -P 0x5a %d %d" % (nclusters * cl, size % cl))
open(out, "w").write("\n".join(lines) + "\n")
EOF
}

head -c 1048576 /dev/urandom >"$WORK/random.bin"

# --- same ------------------------------------------------------------------
same_case() {
    local name=$1 cl=$2 opts=$3 size=$4 extra=${5:-}
    local a="$WORK/$name-qsm.qcow2" b="$WORK/$name-qemu.qcow2" s="$WORK/$name.script"
    qemu_create "$a" "cluster_size=$cl,$opts" "$size" || die "qemu-img create failed"
    cp "$a" "$b"
    gen_script "$s" "$cl" "$size" "$BASE_SEED" "$NW"
    qsm_io "$name" "$WORK/$name-qsm" "$a" "$s" $extra || return
    qemu_io "$name" "$WORK/$name-qemu" "$b" "$s" || return
    CHECKS=$((CHECKS + 1))
    local nc
    nc=$(grep -c 'wrote ' "$WORK/$name-qsm.out")
    [ "$nc" = "$(wc -l <"$s")" ] || fail "$name: qsm io wrote $nc of $(wc -l <"$s") requests"
    compare_images "$name" "$a" "$b"
    check_stats "$name" "$a" "$b" "$cl"
}

same_case v3-64k 65536 compat=1.1 $((256 * 1024 * 1024 + 4608))
same_case v2-4k 4096 compat=0.10 $((32 * 1024 * 1024 + 1024))
same_case zstd-64k 65536 compat=1.1,compression_type=zstd $((64 * 1024 * 1024 + 4608))
same_case zstd-4k 4096 compat=1.1,compression_type=zstd $((16 * 1024 * 1024 + 1024))
same_case zstd-2M 2097152 compat=1.1,compression_type=zstd $((256 * 1024 * 1024))
if odirect_ok "$WORK"; then
    same_case v3-none 65536 compat=1.1 $((128 * 1024 * 1024)) "-t none"
else
    log "v3-none: skipped ($WORK does not take O_DIRECT)"
fi

# Over a backing file: the clusters written compressed hide the backing data.
base="$WORK/base.qcow2"
qemu_create "$base" cluster_size=65536 64M || die "qemu-img create failed"
qemu-io -f qcow2 -c "write -P 0x77 0 64M" "$base" >/dev/null || die "qemu-io base write failed"
for t in qsm qemu; do
    qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$WORK/ov-$t.qcow2" 64M || die "overlay create failed"
done
gen_script "$WORK/ov.script" 65536 $((64 * 1024 * 1024)) $((BASE_SEED + 1)) $((NW / 2))
if qsm_io backing "$WORK/ov-qsm" "$WORK/ov-qsm.qcow2" "$WORK/ov.script" &&
   qemu_io backing "$WORK/ov-qemu" "$WORK/ov-qemu.qcow2" "$WORK/ov.script"; then
    compare_images backing "$WORK/ov-qsm.qcow2" "$WORK/ov-qemu.qcow2"
    check_stats backing "$WORK/ov-qsm.qcow2" "$WORK/ov-qemu.qcow2" 65536
fi

# --- overwrite ---------------------------------------------------------------
a="$WORK/ow-qsm.qcow2"
b="$WORK/ow-qemu.qcow2"
qemu_create "$a" cluster_size=65536 16M
qemu_create "$b" cluster_size=65536 16M
cat >"$WORK/ow1.script" <<EOF
write -c -P 1 0 1M
write -c -s $WORK/random.bin 1M 256k
write -P 2 2M 256k
EOF
# qsm: plain over compressed (partial, whole), compressed over compressed and
# over plain data; qemu: the same data written plainly.
cat >"$WORK/ow2-qsm.script" <<EOF
write -P 3 4k 8k
write -P 4 64k 64k
write -c -P 5 128k 128k
write -c -P 6 2M 128k
write -c -P 7 1M 64k
read -P 3 4k 8k
read -P 5 128k 128k
read -P 6 2M 128k
EOF
sed 's/^write -c /write /' "$WORK/ow2-qsm.script" >"$WORK/ow2-qemu.script"
if qsm_io ow1 "$WORK/ow1-qsm" "$a" "$WORK/ow1.script" && qemu_io ow1 "$WORK/ow1-qemu" "$b" "$WORK/ow1.script" &&
   qsm_io ow2 "$WORK/ow2-qsm" "$a" "$WORK/ow2-qsm.script" &&
   qemu_io ow2 "$WORK/ow2-qemu" "$b" "$WORK/ow2-qemu.script"; then
    compare_images overwrite "$a" "$b"
    check_clean "overwrite (qsm)" "$a"
fi

# --- snapshot ------------------------------------------------------------------
a="$WORK/snap.qcow2"
qemu_create "$a" cluster_size=65536 16M
printf 'write -c -P 0x31 0 2M\n' >"$WORK/snap1.script"
printf 'write -c -P 0x32 0 512k\nwrite -P 0x33 1M 64k\nwrite -c -P 0x34 4M 64k\nread -P 0x31 512k 512k\n' >"$WORK/snap2.script"
if qsm_io snap1 "$WORK/snap1" "$a" "$WORK/snap1.script" && qemu-img snapshot -c s1 "$a" &&
   qsm_io snap2 "$WORK/snap2" "$a" "$WORK/snap2.script"; then
    check_clean "snapshot, after overwrites" "$a"
    qemu-img snapshot -a s1 "$a" || fail "snapshot: qemu-img snapshot -a failed"
    printf 'read -P 0x31 0 2M\nread -P 0 4M 64k\n' >"$WORK/snap3.script"
    qemu_io "snapshot data kept" "$WORK/snap3" "$a" "$WORK/snap3.script"
    check_clean "snapshot, reverted" "$a"
fi

# --- convert -c by qemu-img, read by qsm --------------------------------------
src="$WORK/conv-src.qcow2"
qemu_create "$src" cluster_size=65536 32M
qemu-io -f qcow2 -c "write -P 0x41 0 3M" -c "write -P 0x42 5M 64k" -c "write -z 6M 1M" "$src" >/dev/null
qemu-img convert -c -O qcow2 "$src" "$WORK/conv.qcow2" || die "qemu-img convert -c failed"
printf 'read -P 0x41 0 3M\nread -P 0x42 5M 64k\nread -P 0 6M 1M\nread -P 0 3M 2M\n' >"$WORK/conv.script"
qsm_io convert "$WORK/conv" "$WORK/conv.qcow2" "$WORK/conv.script" -r

# --- qemu-img convert -c -o compression_type=zstd, read by qsm ----------------
qemu-img convert -c -O qcow2 -o compression_type=zstd "$src" "$WORK/conv-zstd.qcow2" ||
    die "qemu-img convert -c -o compression_type=zstd failed"
qsm_io convert-zstd "$WORK/conv-zstd" "$WORK/conv-zstd.qcow2" "$WORK/conv.script" -r
# A damaged frame is an I/O error, never wrong data.
python3 - "$WORK/conv-zstd.qcow2" <<'EOF'
import struct, sys
p = sys.argv[1]
d = bytearray(open(p, "rb").read())
l1 = struct.unpack(">Q", d[40:48])[0]
l2 = struct.unpack(">Q", d[l1:l1 + 8])[0] & 0x00fffffffffffe00
e = struct.unpack(">Q", d[l2:l2 + 8])[0]
assert e >> 62 == 1, "cluster 0 is not compressed"
off = e & ((1 << 54) - 1)
assert d[off:off + 4] == b"\x28\xb5\x2f\xfd", "not a zstd frame"
d[off + 4:off + 12] = b"\xff" * 8  # the frame header: reserved bits set
open(p, "wb").write(d)
EOF
CHECKS=$((CHECKS + 1))
out=$("$QSM" io -r -c 'read 0 64k' "$WORK/conv-zstd.qcow2" 2>&1)
case "$out" in
    *"read failed: Input/output error"*) ;;
    *) fail "damaged zstd cluster: qsm io read said '$out', not an I/O error" ;;
esac

# --- refusals --------------------------------------------------------------------
raw="$WORK/r.raw"
truncate -s 1M "$raw"
for t in qsm qemu; do
    if [ $t = qsm ]; then cmd=("$QSM" io); else cmd=(qemu-io); fi
    "${cmd[@]}" -f raw -c 'write -c 0 64k' "$raw" >"$WORK/ref-raw-$t.out" 2>&1
    qemu_create "$WORK/ref-$t.qcow2" cluster_size=65536 1M
    "${cmd[@]}" -f qcow2 -c 'write -c 512 64k' -c 'write -c 0 32k' -c 'write -c 0 2M' \
        "$WORK/ref-$t.qcow2" >"$WORK/ref-$t.out" 2>&1
done
for f in ref-raw ref; do
    CHECKS=$((CHECKS + 1))
    if ! cmp -s "$WORK/$f-qsm.out" "$WORK/$f-qemu.out"; then
        fail "refusals ($f): qsm io and qemu-io print different messages"
        diff "$WORK/$f-qemu.out" "$WORK/$f-qsm.out" | sed 's/^/    | /'
    fi
done

interop_finish
