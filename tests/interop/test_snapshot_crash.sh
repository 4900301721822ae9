#!/usr/bin/env bash
# tests/interop/test_snapshot_crash.sh: `qsm snapshot -c/-a/-d` killed at
# every write and sync it makes (strace's syscall fault injection sends
# SIGKILL at the K-th pwritev/pwrite64/io_uring_enter/fdatasync, for K = 1,
# 2, ... until a run completes), on v3 and v2 images.
#
# A process kill keeps every write the kernel took, so what is tested here
# is the order of the operation's writes (sm/snapops.c, "Crash safety"):
# after the kill the image is repaired as the next user would repair it
# (v3: the dirty bit is on disk, and a read-write open by qemu-io repairs
# it; v2: qemu-img check -r all), and must then be
#   - before the repair, nothing worse than leaks and COPIED flags out of
#     date (qemu-img check: no refcount below its references), then
#   - clean (qemu-img check: no corruption, no leak; v3, leaks alone where
#     no dirty bit is durable: after a create's commit, before an apply's
#     or a delete's), and
#   - the image before the operation or after it: the snapshot count is
#     the old or the new one, the active disk reads as before or as after
#     (apply: the snapshot's disk), and a snapshot that is listed applies
#     (on a copy, by qemu-img) to the disk it was taken of.
# Power loss (unsynced writes lost) is not modelled here: the ordering by
# syncs is what qsm_sync_writeback's levels give, tested by the fuzzer for
# requests.
source "$(dirname "$0")/lib.sh"
interop_init
command -v strace >/dev/null || skip "strace not found"
strace -f -o /dev/null -e trace=getpid -e inject=getpid:error=EPERM:when=1 true 2>/dev/null ||
    skip "strace cannot inject faults here"

ok() { local tag=$1; shift; CHECKS=$((CHECKS + 1)); "$@" || fail "$tag"; }
to_raw() { qemu-img convert -f qcow2 -O raw "$1" "$2" || die "qemu-img convert $1"; }
same() { qemu-img compare -q -f qcow2 -F raw "$1" "$2" >/dev/null 2>&1; }
nsnaps() { qemu-img snapshot -l "$1" | grep -c '^[0-9]'; }
SYSCALLS=pwritev,pwrite64,io_uring_enter,fdatasync
MAXK=$(scaled 200)

# base KIND: $WORK/KIND.base with data (compressed and zero clusters too)
# and a snapshot "s" taken by qemu-img before more writes; S.raw is the
# snapshot's disk, A.raw the active one.
base() {
    local kind=$1 opts=cluster_size=65536
    [ "$kind" = v2 ] && opts+=,compat=0.10
    qemu-img create -q -f qcow2 -o "$opts" "$WORK/$kind.base" 8M
    qemu-io -f qcow2 -c "write -P 0x11 0 3M" -c "write -c -P 0x22 4M 256k" -c "write -z 5M 64k" \
        "$WORK/$kind.base" >/dev/null
    to_raw "$WORK/$kind.base" "$WORK/$kind.S.raw"
    qemu-img snapshot -c s "$WORK/$kind.base"
    qemu-io -f qcow2 -c "write -P 0x33 1M 3M" -c "write -P 0x44 6M 1M" "$WORK/$kind.base" >/dev/null
    to_raw "$WORK/$kind.base" "$WORK/$kind.A.raw"
}

# repair KIND IMG: what the next user does with a crashed image
repair() {
    if [ "$1" = v3 ]; then qemu-io -f qcow2 -c quit "$2" >/dev/null 2>&1
    else qemu-img check -q -r all "$2" >/dev/null 2>&1; fi
}

for kind in v3 v2; do
    base $kind
    for op in c a d; do
        case $op in c) arg=new;; a|d) arg=s;; esac
        points=0 before=0 after=0 leaks=0
        for ((k = 1; k <= MAXK; k++)); do
            img="$WORK/$kind.$op.qcow2"
            cp "$WORK/$kind.base" "$img"
            # no LeakSanitizer under strace: it cannot stop the threads
            ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
            strace -f -o /dev/null -e trace=$SYSCALLS -e inject=$SYSCALLS:signal=KILL:when=$k \
                "$QSM" snapshot -$op $arg "$img" >/dev/null 2>"$WORK/err" &
            wait $!
            rc=$?
            [ $rc = 0 ] && break          # ran to the end before the K-th call
            points=$((points + 1))
            tag="$kind snapshot -$op killed at call $k"
            ok "$tag: exit $rc, not a kill" [ $rc = 137 ]
            # before any repair: refcounts never below the references (a
            # freed cluster still in use); leaks and COPIED flags out of
            # date are what a repair is for
            qemu-img check "$img" >"$WORK/check.out" 2>&1
            bad=$(grep -E '^ERROR' "$WORK/check.out" | grep -v '^ERROR OFLAG_COPIED' | head -3)
            ok "$tag: the crashed image has worse than leaks: $bad" [ -z "$bad" ]
            repair $kind "$img"
            # Clean, or (v3) leaks alone where no dirty bit is durable:
            # a create's commit clears it, and the old snapshot table's
            # clusters are freed once that is durable; an apply or delete
            # sets it with its commit, and a kill before leaks the
            # clusters it allocated.  As QEMU's would (check -r leaks).
            leaked=0
            qemu-img check -f qcow2 "$img" >"$WORK/check2.out" 2>&1
            crc=$?
            if [ $crc = 3 ] && ! grep -q -i 'ERROR\|corrupt' "$WORK/check2.out" &&
               grep -q '^[0-9]* leaked clusters were found' "$WORK/check2.out"; then
                leaked=1
            else
                check_clean "$tag, repaired" "$img" || continue
            fi
            n=$(nsnaps "$img")
            before_was=$before
            # before: the base's state; after: the operation's
            case $op in
            c) if [ "$n" = 1 ] && same "$img" "$WORK/$kind.A.raw"; then before=$((before + 1))
               elif [ "$n" = 2 ] && same "$img" "$WORK/$kind.A.raw"; then after=$((after + 1))
               else fail "$tag: $n snapshots, disk neither before nor after"; continue; fi;;
            a) if [ "$n" = 1 ] && same "$img" "$WORK/$kind.A.raw"; then before=$((before + 1))
               elif [ "$n" = 1 ] && same "$img" "$WORK/$kind.S.raw"; then after=$((after + 1))
               else fail "$tag: $n snapshots, disk neither before nor after"; continue; fi;;
            d) if [ "$n" = 1 ] && same "$img" "$WORK/$kind.A.raw"; then before=$((before + 1))
               elif [ "$n" = 0 ] && same "$img" "$WORK/$kind.A.raw"; then after=$((after + 1))
               else fail "$tag: $n snapshots, disk neither before nor after"; continue; fi;;
            esac
            if [ $leaked = 1 ]; then
                # create: after its commit (the old table); apply and
                # delete: before theirs (the dirty bit comes with it)
                where=before
                [ "$before_was" = "$before" ] && where=after
                want=before
                [ $op = c ] && want=after
                [ $kind = v3 ] || want=never
                ok "$tag: leaks after the repair $where the commit ($kind $op: only $want)" \
                    [ $where = $want ]
                leaks=$((leaks + 1))
            fi
            # every snapshot still listed applies to its disk
            cp "$img" "$WORK/copy.qcow2"
            if qemu-img snapshot -l "$WORK/copy.qcow2" | grep -q ' s  '; then
                qemu-img snapshot -a s "$WORK/copy.qcow2" &&
                    ok "$tag: snapshot s no longer reads as taken" same "$WORK/copy.qcow2" "$WORK/$kind.S.raw"
            fi
            if [ $op = c ] && [ "$n" = 2 ]; then
                cp "$img" "$WORK/copy.qcow2"
                qemu-img snapshot -a new "$WORK/copy.qcow2" &&
                    ok "$tag: the new snapshot does not read as the disk it was taken of" \
                        same "$WORK/copy.qcow2" "$WORK/$kind.A.raw"
            fi
        done
        ok "$kind snapshot -$op: never completed within $MAXK calls" [ $rc = 0 ]
        ok "$kind snapshot -$op: no crash point found" [ $points -gt 3 ]
        log "$kind snapshot -$op: $points crash points: $before before, $after after ($leaks of them with leaks)"
    done
done
interop_finish
