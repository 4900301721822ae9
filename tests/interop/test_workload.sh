#!/usr/bin/env bash
# Random workload differential test (core-engine acceptance):
# the same random command list (writes, zero writes, whole-cluster discards,
# flushes and pattern-verified reads across a 1 GiB disk) run by `qsm io` and
# by `qemu-io` gives images that `qemu-img compare` calls identical, and
# `qemu-img check` finds both clean; for cluster sizes 512, 4k, 64k, 2M,
# compat 0.10 and 1.1, refcount_bits 1, 16, 64.  The qsm image is made by
# `qsm create`, the qemu one by `qemu-img create`.  A variant runs qsm with
# `-t none` (O_DIRECT) when the work directory supports it.
#
# Env: QSM_TEST_SCALE (ops per combo = 2000 * scale, half that for 2M), QSM_TEST_SEED,
#      QSM_WORKLOAD_COMBOS="cluster:compat:refbits ..." to choose combos.
. "$(dirname "$0")/lib.sh"
interop_init

N=$(scaled 2000)
SIZE=1G
COMBOS=${QSM_WORKLOAD_COMBOS:-"512:1.1:1 512:0.10:16 4k:1.1:16 4k:0.10:16 64k:1.1:64 64k:0.10:16 2M:1.1:64 2M:0.10:16"}
# combos that also run qsm with -t none
DIRECT_COMBOS=${QSM_WORKLOAD_DIRECT_COMBOS:-"512:1.1:1 64k:0.10:16 4k:1.1:16"}

direct=1
if ! odirect_ok "$WORK"; then
    log "SKIP -t none variant: O_DIRECT unsupported in $WORK (tmpfs?); set TMPDIR to a disk"
    direct=0
fi

i=0
for combo in $COMBOS; do
    IFS=: read -r cl compat rb <<<"$combo"
    i=$((i + 1))
    seed=$((BASE_SEED + i))
    opts="cluster_size=$cl,compat=$compat,refcount_bits=$rb"
    tag="$cl/compat=$compat/refcount_bits=$rb"
    d="$WORK/$i"
    mkdir -p "$d"
    cmds="$d/cmds"
    n=$(ops_for "$cl" "$N")
    python3 "$GEN" "$seed" "$n" "$SIZE" "$cl" >"$cmds" || die "gen_workload failed"
    log "$tag: $n commands (python3 gen_workload.py $seed $n $SIZE $cl)"
    t0=$SECONDS

    qemu_create "$d/q.qcow2" "$opts" $SIZE || die "qemu-img create $opts failed"
    CHECKS=$((CHECKS + 1))
    if ! qsm_create "$d/s.qcow2" "$opts" $SIZE; then
        fail "$tag: qsm create -o $opts failed"
        continue
    fi

    if qemu_io "$tag qemu-io" "$d/q" "$d/q.qcow2" "$cmds"; then
        check_clean "$tag qemu image (sanity)" "$d/q.qcow2"
    fi
    if qsm_io "$tag qsm io" "$d/s" "$d/s.qcow2" "$cmds"; then
        compare_images "$tag qsm vs qemu" "$d/q.qcow2" "$d/s.qcow2"
        check_clean "$tag qsm image" "$d/s.qcow2"
    fi
    rm -f "$d/s.qcow2"

    if [ $direct = 1 ] && [[ " $DIRECT_COMBOS " == *" $combo "* ]]; then
        if qsm_create "$d/sd.qcow2" "$opts" $SIZE &&
           qsm_io "$tag qsm io -t none" "$d/sd" "$d/sd.qcow2" "$cmds" -t none; then
            compare_images "$tag qsm -t none vs qemu" "$d/q.qcow2" "$d/sd.qcow2"
            check_clean "$tag qsm -t none image" "$d/sd.qcow2"
        fi
        rm -f "$d/sd.qcow2"
    fi
    rm -f "$d/q.qcow2"
    log "$tag: done in $((SECONDS - t0))s"
done

interop_finish
