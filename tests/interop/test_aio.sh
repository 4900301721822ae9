#!/usr/bin/env bash
# Concurrency: a qemu-io script of many aio_write -P / -z commands over
# overlapping and cluster/L2-boundary-spanning ranges, with aio_read -P of
# ranges no write of the batch touches, batches ended by aio_flush, then
# synchronous read -P of everything (gen_workload.py --aio).  Writes that may
# overlap within a batch write the same pattern, so the result does not
# depend on completion order, but writes of neighbouring zones allocate the
# same clusters concurrently.  Run by qemu-io and by qsm io with -i threads,
# -i io_uring (when this kernel allows io_uring) and the simulated backend
# (QSM_IO_BACKEND=sim in the environment, when the engine accepts it); the
# images must compare identical to qemu's and check clean.
#
# Env: QSM_TEST_SCALE (aio writes per combo = 600 * scale), QSM_TEST_SEED,
#      QSM_AIO_COMBOS="cluster:compat:refbits ...",
#      QSM_AIO_BACKENDS (default "threads io_uring sim").
. "$(dirname "$0")/lib.sh"
interop_init

N=$(scaled 600)
SIZE=1G
COMBOS=${QSM_AIO_COMBOS:-"64k:1.1:16 512:1.1:1 4k:0.10:16 2M:1.1:64"}
BACKENDS=${QSM_AIO_BACKENDS:-"threads io_uring sim"}

# qsm's cache mode rotates over combos and backends, so O_DIRECT and
# writethrough group commit also run concurrently (content does not depend
# on it; qemu-io keeps its default).
MODES=(writethrough none directsync writeback unsafe)
direct=1
odirect_ok "$WORK" || { direct=0; log "O_DIRECT unsupported in $WORK: no -t none/directsync"; }
cache_for() {   # cache_for INDEX
    local m=${MODES[$(($1 % ${#MODES[@]}))]}
    if [ $direct = 0 ] && { [ "$m" = none ] || [ "$m" = directsync ]; }; then m=writethrough; fi
    echo "$m"
}

have_uring=1
if ! io_uring_ok; then
    log "SKIP -i io_uring: io_uring_setup fails in this environment"
    have_uring=0
fi

# probe_sim IMG: does qsm io run with QSM_IO_BACKEND=sim?
probe_sim() {
    local out
    out=$(QSM_IO_BACKEND=sim timeout 60 "$QSM" io -f qcow2 -c 'write -P 1 0 512' -c 'read -P 1 0 512' "$1" 2>&1) &&
        ! printf '%s\n' "$out" | grep -q -i 'fail\|error'
}

i=0
sim_checked=0
have_sim=0
for combo in $COMBOS; do
    IFS=: read -r cl compat rb <<<"$combo"
    i=$((i + 1))
    seed=$((BASE_SEED + 200 + i))
    opts="cluster_size=$cl,compat=$compat,refcount_bits=$rb"
    tag="$cl/compat=$compat/refcount_bits=$rb"
    d="$WORK/$i"
    mkdir -p "$d"
    python3 "$GEN" "$seed" "$N" "$SIZE" "$cl" --aio >"$d/cmds" || die "gen_workload failed"
    log "$tag: $(grep -c '^aio_write' "$d/cmds") aio_write (python3 gen_workload.py $seed $N $SIZE $cl --aio)"

    qemu_create "$d/q.qcow2" "$opts" $SIZE || die "qemu-img create failed"
    qemu_io "$tag qemu-io" "$d/q" "$d/q.qcow2" "$d/cmds" && check_clean "$tag qemu image (sanity)" "$d/q.qcow2"

    j=0
    for be in $BACKENDS; do
        j=$((j + 1))
        img="$d/s-$be.qcow2"
        mode=$(cache_for $((i + j + 3)))
        CHECKS=$((CHECKS + 1))
        if ! qsm_create "$img" "$opts" $SIZE; then
            fail "$tag: qsm create -o $opts failed"
            continue
        fi
        case $be in
        io_uring)
            [ $have_uring = 1 ] || continue
            qsm_io "$tag qsm io -i io_uring -t $mode" "$d/s-$be" "$img" "$d/cmds" -i io_uring -t "$mode" || continue
            ;;
        sim)
            if [ $sim_checked = 0 ]; then
                sim_checked=1
                qsm_create "$d/probe.qcow2" "$opts" 1M
                if ! grep -q -a QSM_IO_BACKEND "$QSM"; then
                    log "SKIP sim backend: $QSM does not read QSM_IO_BACKEND"
                elif probe_sim "$d/probe.qcow2"; then
                    have_sim=1
                else
                    log "SKIP sim backend: 'QSM_IO_BACKEND=sim qsm io' does not run here"
                fi
            fi
            [ $have_sim = 1 ] || continue
            QSM_IO_BACKEND=sim qsm_io "$tag QSM_IO_BACKEND=sim qsm io -t $mode" "$d/s-$be" "$img" "$d/cmds" -t "$mode" || continue
            ;;
        *)
            qsm_io "$tag qsm io -i $be -t $mode" "$d/s-$be" "$img" "$d/cmds" -i "$be" -t "$mode" || continue
            ;;
        esac
        compare_images "$tag $be -t $mode: qsm vs qemu" "$d/q.qcow2" "$img"
        check_clean "$tag $be -t $mode: qsm image" "$img"
        rm -f "$img"
    done
    rm -f "$d"/*.qcow2
done

interop_finish
