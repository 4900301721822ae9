#!/usr/bin/env bash
# Same script, same file: qemu-io scripts run through the real qemu-io 7.2
# and through `qsm io` under the name qemu-io (a symlink, as README.md says),
# each on its own copy of an image qemu-img created; the two resulting FILES
# must be byte-identical (cmp), and qsm's must pass qemu-img check clean.
# That holds only when qsm places every cluster where QEMU does: freed
# clusters reused in the same session (cache=writeback too: FREE_WAIT),
# writes into preallocated zero clusters in place, the same lowest-free
# allocation order.  Cases: discard then rewrite in writeback and
# writethrough, `write -z` over data then rewrite, zero writes that unmap,
# growth past a refcount block's coverage (512-byte clusters), several
# cluster sizes, lazy refcounts on and off.  Where identity does not hold
# (README.md, "Allocation and file layout") there is no case here; where a
# discard freed clusters, their unreferenced bytes are forgiven (QEMU
# punches them, qsm leaves them: free_zeroed.py), nothing else.
. "$(dirname "$0")/lib.sh"
interop_init

qsm_as_qemu_io

# layout TAG CREATE-OPTS SIZE QEMU-IO-ARGS...: the same qemu-io command line
# on two fresh images, one per tool.
N=0
FREED=0 # set to 1 for scripts whose discards free clusters (see layout)
layout() {
    local tag=$1 opts=$2 size=$3 d rq rs
    shift 3
    N=$((N + 1))
    for d in q s; do
        rm -f "$WORK/$d.qcow2"
        qemu-img create -q -f qcow2 -o "$opts" "$WORK/$d.qcow2" "$size" || die "$tag: qemu-img create -o $opts"
    done
    env PATH="$REAL_PATH" timeout "$TIMEOUT" qemu-io "$@" "$WORK/q.qcow2" >"$WORK/q.out" 2>&1
    rq=$?
    env PATH="$BIN:$REAL_PATH" timeout "$TIMEOUT" qemu-io "$@" "$WORK/s.qcow2" >"$WORK/s.out" 2>&1
    rs=$?
    CHECKS=$((CHECKS + 1))
    if [ $rq -ne 0 ] || [ $rs -ne 0 ]; then
        fail "$tag: qemu-io exited $rq, qsm $rs"
        show_tail "$WORK/s.out" 5
        return
    fi
    CHECKS=$((CHECKS + 1))
    if [ "$FREED" = 1 ]; then
        # QEMU punches the clusters a guest discard frees; qsm leaves
        # their bytes: compare with unreferenced clusters zeroed on both
        # sides (free_zeroed.py), everything else byte for byte.
        python3 "$INTEROP_DIR/free_zeroed.py" "$WORK/q.qcow2" "$WORK/q.z" &&
            python3 "$INTEROP_DIR/free_zeroed.py" "$WORK/s.qcow2" "$WORK/s.z" ||
            die "$tag: free_zeroed.py failed"
        a="$WORK/q.z" b="$WORK/s.z"
    else
        a="$WORK/q.qcow2" b="$WORK/s.qcow2"
    fi
    if ! cmp -s "$a" "$b"; then
        fail "$tag: files differ (qemu $(stat -c %s "$WORK/q.qcow2") bytes, qsm $(stat -c %s "$WORK/s.qcow2")): $(cmp "$a" "$b" 2>&1 | head -n 1)"
        if [ "${QSM_KEEP:-0}" = 1 ]; then
            cp "$WORK/q.qcow2" "$WORK/$tag.q.qcow2"
            cp "$WORK/s.qcow2" "$WORK/$tag.s.qcow2"
        fi
    fi
    check_clean "$tag" "$WORK/s.qcow2"
}

for cs in 512 4k 64k; do
    for lazy in off on; do
        o="cluster_size=$cs,lazy_refcounts=$lazy"
        t="$cs-lazy-$lazy"
        for cache in writeback writethrough; do
            FREED=1
            layout "$t-$cache-discard-rewrite" "$o" 8M -t $cache \
                -c 'write -P 1 0 1M' -c 'discard 0 512k' -c 'write -P 2 2M 256k' -c 'write -P 3 4M 512k'
            layout "$t-$cache-discard-holes" "$o" 8M -t $cache \
                -c 'write -P 1 0 1M' -c 'discard 64k 64k' -c 'discard 256k 192k' -c 'write -P 2 1M 128k' \
                -c 'write -P 3 3M 64k' -c 'write -P 4 32k 64k'
            layout "$t-$cache-discard-flush-rewrite" "$o" 8M -t $cache \
                -c 'write -P 1 0 1M' -c 'discard 0 512k' -c flush -c 'write -P 2 2M 768k'
            layout "$t-$cache-fua-after-discard" "$o" 8M -t $cache \
                -c 'write -P 1 0 1M' -c 'discard 0 256k' -c 'write -f -P 2 2M 256k'
            layout "$t-$cache-zero-unmap-rewrite" "$o" 8M -t $cache \
                -c 'write -P 1 0 1M' -c 'write -z -u 128k 256k' -c 'write -P 2 6M 512k'
            FREED=0
        done
        # Preallocated zero clusters (QEMU's ZERO_ALLOC): written in place,
        # whole, partly (the rest zeroed) and across kinds.
        layout "$t-zero-alloc-rewrite" "$o" 8M \
            -c 'write -P 1 0 1M' -c 'write -z 0 512k' -c 'write -P 2 0 64k' -c 'write -P 3 100k 7k' \
            -c 'write -P 4 400k 300k' -c 'read -P 0 64k 36k' -c 'read -P 4 400k 300k'
        # (Not with 512-byte clusters: README.md, "Allocation and file
        # layout", on new refcount blocks met by a host extent.)
        [ $cs = 512 ] ||
            layout "$t-zero-alloc-mixed" "$o" 8M -t writeback \
                -c 'write -P 1 0 256k' -c 'write -z 64k 64k' -c 'write -P 2 32k 512k' -c 'write -z 0 1M' \
                -c 'write -P 3 1k 3M'
    done
done
# Growth past one refcount block's coverage (512-byte clusters: 256
# clusters per block; the discard cases above reach 12 blocks).  Not past
# the refcount table's first cluster (64 blocks): README.md, "Allocation and
# file layout".
for lazy in off on; do
    layout "grow-refblocks-lazy-$lazy" "cluster_size=512,lazy_refcounts=$lazy" 16M \
        -c 'write -P 1 0 1M' -c 'write -P 2 4M 32k' -c 'write -P 3 6M 512'
done

log "$N scripts compared with qemu-io byte for byte"
interop_finish
