#!/usr/bin/env bash
# tests/interop/test_fua.sh: qemu-io's -f (Force Unit Access) on write,
# write -z, aio_write, aio_write -z and writev, which `qsm io` maps onto the
# engine's per-request FUA (QSM_REQ_FUA, QSM_ZERO_FUA) instead of a write
# followed by a flush of everything.  In cache=writeback (where FUA matters):
#  1. output: the same script under qemu-io and qsm io prints the same
#     (timings blanked), exits the same, and leaves images qemu-img compare
#     calls identical and qemu-img check calls clean;
#  2. FUA, not a flush: qsm's request trace shows each -f request waiting
#     for its own durable batch ("durable wait") and no flush request at
#     all; the same script without -f has no durable wait;
#  3. durable: killed (`abort`, no write-back) right after, every -f
#     request's data reads back, under qemu-io and qsm alike;
#  4. and only those: a write without -f into another L2 table just before
#     is lost by qsm's kill (its table was never written: no full flush
#     ran), while QEMU, whose FUA on qcow2 is a full flush, keeps it; and
#     the -f write alone, without -f, is lost too (so check 3 can fail).
. "$(dirname "$0")/lib.sh"
interop_init

# The -f requests, each in a cluster of its own (1G image, 64k clusters:
# one L2 table covers 512M), and the read-back that proves them.
FUA=(-c 'write -f -P 0x5a 0 64k'
     -c 'write -f -P 0x5b 64k 4k'
     -c 'write -z -f 64k 1k'
     -c 'aio_write -f -P 0x6b 1M 4k' -c 'aio_flush'
     -c 'aio_write -z -f 1M 512' -c 'aio_flush'
     -c 'writev -f -P 0x7c 2M 512 1024')
BACK=(-c 'read -P 0x5a 0 64k'
      -c 'read -P 0 64k 1k' -c 'read -P 0x5b 65k 3k'
      -c 'read -P 0 1M 512' -c 'read -P 0x6b 1049088 3584'
      -c 'read -P 0x7c 2M 1536')
# Another L2 table's allocating write, without -f, before them (both
# tables made durable first, so that the -f batches need only their own).
OTHER=(-c 'write -P 0x3b 600M 4k' -c 'write -P 0x3b 4M 4k' -c flush -c 'write -P 0x3c 601M 4k')

check() { # check DESC CMD...: one counted check, failing when CMD does
    local desc=$1
    shift
    CHECKS=$((CHECKS + 1))
    "$@" >"$WORK/check.out" 2>&1 || { fail "$desc"; show_tail "$WORK/check.out"; }
}

# 1. the same output and image as qemu-io
for side in q s; do
    qemu-img create -q -f qcow2 "$WORK/$side.qcow2" 1G || die "qemu-img create"
done
timeout "$TIMEOUT" qemu-io -f qcow2 -t writeback "${OTHER[@]}" "${FUA[@]}" "${BACK[@]}" \
    "$WORK/q.qcow2" >"$WORK/q.out" 2>"$WORK/q.err"; rq=$?
timeout "$TIMEOUT" "$QSM" io -f qcow2 -t writeback --trace-text "$WORK/trace" "${OTHER[@]}" \
    "${FUA[@]}" "${BACK[@]}" "$WORK/s.qcow2" >"$WORK/s.out" 2>"$WORK/s.err"; rs=$?
check "1: exit status $rs, qemu-io's $rq" [ $rq = $rs ]
check "1: qemu-io's run reported a failure" [ $rq = 0 ]
check "1: the output differs from qemu-io's" \
    diff -u <(filter_timing <"$WORK/q.out") <(filter_timing <"$WORK/s.out")
check "1: stderr differs from qemu-io's" diff -u "$WORK/q.err" "$WORK/s.err"
check "1: no pattern verified" grep -q '^read 1536/1536 bytes at offset 2097152$' "$WORK/s.out"
check "1: a pattern verification failed" bash -c "! grep -q -i 'fail' '$WORK/s.out'"
compare_images "1" "$WORK/q.qcow2" "$WORK/s.qcow2"
check_clean "1: qsm's image" "$WORK/s.qcow2"

# 2. the trace: six FUA requests, each waiting for its durable batch, no flush
nwait=$(grep -E '^#[0-9]+ write' "$WORK/trace" | grep -c '> durable wait (batch #')
check "2: $nwait requests waited for a durable batch, expected the 6 -f ones" [ "$nwait" = 6 ]
nflush=$(grep -E -c '^#[0-9]+ flush' "$WORK/trace")
check "2: $nflush flush requests ran, expected the script's one (FUA done as write + flush)" \
    [ "$nflush" = 1 ]
check "2: the -f requests are not in the trace" [ "$(grep -c '^#[0-9]* write' "$WORK/trace")" -ge 7 ]
"$QSM" io -f qcow2 -t writeback --trace-text "$WORK/trace0" -c 'write -P 0x5a 0 64k' \
    -c 'write -z 64k 1k' -c 'aio_write -P 0x6b 1M 4k' -c 'aio_flush' "$WORK/s.qcow2" >/dev/null 2>&1
check "2: a write without -f waited for a durable batch" \
    bash -c "! grep -E '^#[0-9]+ write' '$WORK/trace0' | grep -q 'durable wait'"

# 3./4. killed right after: the -f data is there, the other table's is not
# (qsm), or is (QEMU: a full flush); qemu-img check finds no corruption.
for side in q s; do
    rm -f "$WORK/$side.qcow2"
    qemu-img create -q -f qcow2 "$WORK/$side.qcow2" 1G || die "qemu-img create"
done
timeout "$TIMEOUT" qemu-io -f qcow2 -t writeback "${OTHER[@]}" "${FUA[@]}" -c abort \
    "$WORK/q.qcow2" >/dev/null 2>&1
timeout "$TIMEOUT" "$QSM" io -f qcow2 -t writeback "${OTHER[@]}" "${FUA[@]}" -c abort \
    "$WORK/s.qcow2" >/dev/null 2>&1
for side in q s; do
    qemu-io -f qcow2 -r "${BACK[@]}" "$WORK/$side.qcow2" >"$WORK/$side.back" 2>&1
    check "3: $side: FUA data lost by the kill" bash -c "! grep -q -i 'fail\|error' '$WORK/$side.back'"
    check "3: $side: nothing read back" [ "$(grep -c '^read ' "$WORK/$side.back")" = 6 ]
    qemu-img check -f qcow2 "$WORK/$side.qcow2" >"$WORK/$side.check" 2>&1; rc=$?
    check "3: $side: qemu-img check exit $rc after the kill (corruption)" [ $rc = 0 -o $rc = 3 ]
done
check "4: qsm kept the other table's write: FUA flushed everything" \
    qemu-io -f qcow2 -r -c 'read -P 0 601M 4k' "$WORK/s.qcow2"
check "4: QEMU lost the other table's write (its FUA is a full flush: test setup)" \
    qemu-io -f qcow2 -r -c 'read -P 0x3c 601M 4k' "$WORK/q.qcow2"
# Without -f the same kill loses the write: check 3 is not vacuous.
rm -f "$WORK/s.qcow2"
qemu-img create -q -f qcow2 "$WORK/s.qcow2" 1G || die "qemu-img create"
"$QSM" io -f qcow2 -t writeback -c 'write -P 0x5a 0 64k' -c abort "$WORK/s.qcow2" >/dev/null 2>&1
check "4: a write without -f survived the kill (the test cannot tell FUA)" \
    qemu-io -f qcow2 -r -c 'read -P 0 0 64k' "$WORK/s.qcow2"

interop_finish
