#!/usr/bin/env bash
# `qsm io` continuing on images that qemu-io wrote gives the same results as
# qemu-io would, and the reverse:
#   forward: qemu-io runs workload A on a qemu-img image; copy it; workload B
#            runs with qemu-io on one copy and qsm io on the other;
#   reverse: qsm io runs A on a qsm image; copy it; B runs with qemu-io on
#            one copy and qsm io on the other.
# Then qemu-img compare (both pairs, and forward vs reverse) and check.
# A and B are the two halves of one generated list, so B's read -P commands
# verify what A left behind.
#
# Env: QSM_TEST_SCALE (each half = 600 * scale commands, half that for 2M), QSM_TEST_SEED,
#      QSM_CONTINUE_COMBOS="cluster:compat:refbits ...".
. "$(dirname "$0")/lib.sh"
interop_init

NN=$(scaled 600)
SIZE=1G
COMBOS=${QSM_CONTINUE_COMBOS:-"64k:1.1:16 512:0.10:16 4k:1.1:1 2M:1.1:64"}

i=0
for combo in $COMBOS; do
    IFS=: read -r cl compat rb <<<"$combo"
    i=$((i + 1))
    seed=$((BASE_SEED + 100 + i))
    opts="cluster_size=$cl,compat=$compat,refcount_bits=$rb"
    tag="$cl/compat=$compat/refcount_bits=$rb"
    d="$WORK/$i"
    mkdir -p "$d"
    N=$(ops_for "$cl" "$NN")
    t0=$SECONDS
    python3 "$GEN" "$seed" $((2 * N)) "$SIZE" "$cl" >"$d/all" || die "gen_workload failed"
    head -n "$N" "$d/all" >"$d/A"
    tail -n +"$((N + 1))" "$d/all" >"$d/B"
    log "$tag: A+B = python3 gen_workload.py $seed $((2 * N)) $SIZE $cl, split after line $N"

    # forward: qemu wrote A
    qemu_create "$d/qa.qcow2" "$opts" $SIZE || die "qemu-img create failed"
    if qemu_io "$tag qemu-io A" "$d/qa" "$d/qa.qcow2" "$d/A"; then
        cp --sparse=always "$d/qa.qcow2" "$d/fq.qcow2"
        cp --sparse=always "$d/qa.qcow2" "$d/fs.qcow2"
        ok_q=0; ok_s=0
        qemu_io "$tag forward: qemu-io B on qemu's A" "$d/fq" "$d/fq.qcow2" "$d/B" && ok_q=1
        qsm_io "$tag forward: qsm io B on qemu's A" "$d/fs" "$d/fs.qcow2" "$d/B" && ok_s=1
        if [ $ok_q = 1 ] && [ $ok_s = 1 ]; then
            compare_images "$tag forward: qsm vs qemu after B" "$d/fq.qcow2" "$d/fs.qcow2"
        fi
        [ $ok_s = 1 ] && check_clean "$tag forward: qsm's image after B" "$d/fs.qcow2"
        [ $ok_q = 1 ] && check_clean "$tag forward: qemu's image after B (sanity)" "$d/fq.qcow2"
    fi
    rm -f "$d/qa.qcow2" "$d/fs.qcow2"

    # reverse: qsm wrote A
    CHECKS=$((CHECKS + 1))
    if ! qsm_create "$d/sa.qcow2" "$opts" $SIZE; then
        fail "$tag: qsm create -o $opts failed"
        continue
    fi
    if qsm_io "$tag qsm io A" "$d/sa" "$d/sa.qcow2" "$d/A" &&
       check_clean "$tag reverse: qsm's image after A" "$d/sa.qcow2"; then
        cp --sparse=always "$d/sa.qcow2" "$d/rq.qcow2"
        cp --sparse=always "$d/sa.qcow2" "$d/rs.qcow2"
        ok_q=0; ok_s=0
        qemu_io "$tag reverse: qemu-io B on qsm's A" "$d/rq" "$d/rq.qcow2" "$d/B" && ok_q=1
        qsm_io "$tag reverse: qsm io B on qsm's A" "$d/rs" "$d/rs.qcow2" "$d/B" && ok_s=1
        if [ $ok_q = 1 ] && [ $ok_s = 1 ]; then
            compare_images "$tag reverse: qsm vs qemu after B" "$d/rq.qcow2" "$d/rs.qcow2"
        fi
        [ $ok_q = 1 ] && check_clean "$tag reverse: qemu's B on qsm's A" "$d/rq.qcow2"
        [ $ok_s = 1 ] && check_clean "$tag reverse: qsm's image after B" "$d/rs.qcow2"
        if [ $ok_q = 1 ] && [ -f "$d/fq.qcow2" ]; then
            compare_images "$tag reverse vs forward (same A+B)" "$d/fq.qcow2" "$d/rq.qcow2"
        fi
    fi
    rm -f "$d"/*.qcow2
    log "$tag: done in $((SECONDS - t0))s"
done

interop_finish
