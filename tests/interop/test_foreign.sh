#!/usr/bin/env bash
# qsm io continuing on images qemu made with features beyond a fresh image:
#   snapshot    qemu-io writes A, `qemu-img snapshot -c` (clusters now have
#               refcount 2, no COPIED flag), B by qemu-io vs qsm io; compare,
#               check, then `snapshot -a` on both: the snapshot must be intact
#   snapshot-race  after a snapshot, two writes under one L2 table submitted
#               together (both wait for the load of the shared table; the
#               first copies it): both must land, in the copy L1 now names
#   compressed  A written then `qemu-img convert -c`; B by both; compare, check
#   zstd        the same with compression_type=zstd; then qemu-io continues
#               both (C: the writes, zero writes and discards of A's first
#               third) and qemu-img compare and qsm compare call them
#               identical
#   lazy        lazy_refcounts=on image; B by both; compare, check
#   prealloc    preallocation=metadata and =falloc images; B by both
# and images qsm does not support (extended_l2, external data file):
#   qsm io must exit non-zero, name the feature, and leave the file unchanged.
# Cases can be skipped by name: QSM_FOREIGN_SKIP="snapshot compressed".
#
# Env: QSM_TEST_SCALE (A and B = 600 * scale commands each), QSM_TEST_SEED.
. "$(dirname "$0")/lib.sh"
interop_init

N=$(scaled 600)
SKIP=${QSM_FOREIGN_SKIP:-}
CL=64k

python3 "$GEN" $((BASE_SEED + 300)) $((2 * N)) 1G $CL >"$WORK/all" || die "gen_workload failed"
head -n "$N" "$WORK/all" >"$WORK/A"
tail -n +"$((N + 1))" "$WORK/all" >"$WORK/B"
log "A+B = python3 gen_workload.py $((BASE_SEED + 300)) $((2 * N)) 1G $CL, split after line $N"

skipped() {
    if [[ " $SKIP " == *" $1 "* ]]; then
        log "SKIP case '$1' (QSM_FOREIGN_SKIP)"
        return 0
    fi
    return 1
}

# continue_both NAME BASE: B by qemu-io and qsm io on copies of BASE
continue_both() {
    local name=$1 base=$2 d=$WORK/$1 ok_q=0 ok_s=0
    mkdir -p "$d"
    cp --sparse=always "$base" "$d/q.qcow2"
    cp --sparse=always "$base" "$d/s.qcow2"
    qemu_io "$name: qemu-io B" "$d/q" "$d/q.qcow2" "$WORK/B" && ok_q=1
    qsm_io "$name: qsm io B" "$d/s" "$d/s.qcow2" "$WORK/B" && ok_s=1
    # even after a failed run, qsm's image must still be clean
    check_clean "$name: qsm's image" "$d/s.qcow2"
    [ $ok_s = 1 ] && compare_images "$name: qsm vs qemu after B" "$d/q.qcow2" "$d/s.qcow2"
    return 0
}

# base_with_A OUT OPTS: qemu-img create + qemu-io A
base_with_A() {
    qemu_create "$1" "$2" || die "qemu-img create -o $2 failed"
    qemu-io -f qcow2 "$1" <"$WORK/A" >"$1.out" 2>&1 || die "qemu-io A on -o $2 failed"
}

if ! skipped snapshot; then
    base_with_A "$WORK/snap.qcow2" cluster_size=$CL
    cp --sparse=always "$WORK/snap.qcow2" "$WORK/snap-A.qcow2"
    qemu-img snapshot -c s1 "$WORK/snap.qcow2" || die "qemu-img snapshot -c failed"
    continue_both snapshot "$WORK/snap.qcow2"
    # whatever qsm did, the snapshot must still hold A
    CHECKS=$((CHECKS + 1))
    if qemu-img snapshot -a s1 "$WORK/snapshot/s.qcow2"; then
        compare_images "snapshot: qsm's copy after snapshot -a s1 is A" "$WORK/snap-A.qcow2" "$WORK/snapshot/s.qcow2"
        check_clean "snapshot: qsm's copy after snapshot -a" "$WORK/snapshot/s.qcow2"
    else
        fail "snapshot: qemu-img snapshot -a s1 failed on qsm's copy"
    fi
    rm -rf "$WORK"/snap*.qcow2 "$WORK/snapshot"
fi

if ! skipped snapshot-race; then
    # Both aio_writes miss the shared table and join one load; the first to
    # run copies the table (L2_SHARED > L2_ALLOC).  The second once went on
    # with the old table, which L1 no longer names: its write was lost (and
    # an assertion-enabled build aborts on req_invariants there).
    img="$WORK/race.qcow2"
    qemu_create "$img" cluster_size=$CL 1G
    qemu-io -f qcow2 -c "write -P 1 0 128k" "$img" >/dev/null || die "qemu-io write failed"
    qemu-img snapshot -c s1 "$img" || die "qemu-img snapshot -c failed"
    CHECKS=$((CHECKS + 1))
    if ! "$QSM" io -f qcow2 -c "aio_write -P 2 0 64k" -c "aio_write -P 3 64k 64k" -c aio_flush \
            "$img" >"$WORK/race.out" 2>&1; then
        fail "snapshot-race: qsm io failed"
        show_tail "$WORK/race.out"
    fi
    CHECKS=$((CHECKS + 1))
    if ! qemu-io -f qcow2 -c "read -P 2 0 64k" -c "read -P 3 64k 64k" "$img" >"$WORK/race.read" 2>&1 ||
       grep -q "verification failed" "$WORK/race.read"; then
        fail "snapshot-race: the two concurrent writes are not both there"
        show_tail "$WORK/race.read"
    fi
    check_clean "snapshot-race" "$img"
    CHECKS=$((CHECKS + 1))
    if ! qemu-img snapshot -a s1 "$img" ||
       ! qemu-io -f qcow2 -c "read -P 1 0 128k" "$img" >"$WORK/race.read1" 2>&1 ||
       grep -q "verification failed" "$WORK/race.read1"; then
        fail "snapshot-race: the snapshot does not hold the data written before it"
        show_tail "$WORK/race.read1"
    fi
    rm -f "$img"
fi

if ! skipped compressed; then
    base_with_A "$WORK/plain.qcow2" cluster_size=$CL
    qemu-img convert -c -O qcow2 -o cluster_size=$CL "$WORK/plain.qcow2" "$WORK/comp.qcow2" ||
        die "qemu-img convert -c failed"
    rm -f "$WORK/plain.qcow2"
    continue_both compressed "$WORK/comp.qcow2"
    rm -rf "$WORK/comp.qcow2" "$WORK/compressed"
fi

if ! skipped zstd; then
    base_with_A "$WORK/plain.qcow2" cluster_size=$CL
    qemu-img convert -c -O qcow2 -o cluster_size=$CL,compression_type=zstd \
        "$WORK/plain.qcow2" "$WORK/zstd.qcow2" || die "qemu-img convert -c -o compression_type=zstd failed"
    rm -f "$WORK/plain.qcow2"
    continue_both zstd "$WORK/zstd.qcow2"
    # QEMU continues qsm's image: C by qemu-io on both, and they still agree.
    d=$WORK/zstd
    head -n "$((N / 3))" "$WORK/A" | grep -Ev '^(read|aio_read)' >"$WORK/C"
    if qemu_io "zstd: qemu-io C on qsm's image" "$d/s2" "$d/s.qcow2" "$WORK/C" &&
       qemu_io "zstd: qemu-io C on qemu's image" "$d/q2" "$d/q.qcow2" "$WORK/C"; then
        compare_images "zstd: after qemu-io C on both" "$d/q.qcow2" "$d/s.qcow2"
        CHECKS=$((CHECKS + 1))
        out=$("$QSM" compare -f qcow2 -F qcow2 "$d/q.qcow2" "$d/s.qcow2" 2>&1) ||
            fail "zstd: qsm compare after qemu-io C: $out"
    fi
    check_clean "zstd: qsm's image after qemu-io C" "$d/s.qcow2"
    CHECKS=$((CHECKS + 1))
    qemu-img info "$d/s.qcow2" | grep -q 'compression type: zstd' ||
        fail "zstd: qsm's image no longer says compression type zstd"
    rm -rf "$WORK/zstd.qcow2" "$d"
fi

if ! skipped lazy; then
    base_with_A "$WORK/lazy.qcow2" cluster_size=$CL,lazy_refcounts=on
    continue_both lazy "$WORK/lazy.qcow2"
    rm -rf "$WORK/lazy.qcow2" "$WORK/lazy"
fi

if ! skipped prealloc; then
    for p in metadata falloc; do
        base_with_A "$WORK/pre-$p.qcow2" cluster_size=$CL,preallocation=$p
        continue_both prealloc-$p "$WORK/pre-$p.qcow2"
        rm -rf "$WORK/pre-$p.qcow2" "$WORK/prealloc-$p"
    done
fi

# Unsupported incompatible features: refused by name, file untouched.
for c in "extended_l2=on:extended L2" "data_file=$WORK/data.raw:external data file"; do
    opt=${c%%:*}
    word=${c#*:}
    skipped "refuse-${opt%%=*}" && continue
    img="$WORK/unsup.qcow2"
    rm -f "$img" "$WORK/data.raw"
    qemu_create "$img" "cluster_size=$CL,$opt" || die "qemu-img create -o $opt failed"
    qemu-io -f qcow2 -c 'write -P 1 0 64k' "$img" >/dev/null || die "qemu-io write on -o $opt failed"
    cp "$img" "$img.orig"
    out=$(timeout "$TIMEOUT" "$QSM" io -f qcow2 -c 'write -P 2 0 512' "$img" 2>&1)
    rc=$?
    CHECKS=$((CHECKS + 1))
    [ $rc -ne 0 ] || fail "-o $opt: qsm io exited 0 on an image it should refuse: $out"
    CHECKS=$((CHECKS + 1))
    printf '%s\n' "$out" | grep -q -i "$word" || fail "-o $opt: refusal does not name '$word': $out"
    CHECKS=$((CHECKS + 1))
    cmp -s "$img" "$img.orig" || fail "-o $opt: qsm io modified an image it refused"
    rm -f "$img" "$img.orig" "$WORK/data.raw"
done

interop_finish
