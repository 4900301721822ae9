#!/usr/bin/env bash
# More of qemu-io's command language, beyond the core acceptance script:
# each named script below runs under qemu-io and qsm io on images made by
# qemu-img; stdout (timing blanked) and exit status must match, and the
# images must compare identical and qsm's pass qemu-img check.  Every script
# runs by default (truncate shrinks over data: qsm releases it as QEMU does).
#
# Env: QSM_OUTPUT_EXTRA_SKIP (script names to leave out, for bisecting; a
#      run that leaves any out reports SKIPPED, never a pass),
#      QSM_OUTPUT_EXTRA_OPTS (create options, default cluster_size=64k).
. "$(dirname "$0")/lib.sh"
interop_init

SKIP=${QSM_OUTPUT_EXTRA_SKIP-}
OPTS=${QSM_OUTPUT_EXTRA_OPTS:-cluster_size=64k}

declare -A S
S[vectored]='writev -P 0x11 0 512 1024 100
readv -P 0x11 0 512 1024 100
readv -P 0x11 0 1000 1000
readv -v 1630 8 8
read -P 0x11 -s 0 -l 1636 0 1700
read -P 0x11 -s 1600 -l 100 1536 200
read -P 0x11 -s 1600 -l 100 1536 100
read -v 1600 64
writev -P 0x12 65530 3 3 3 3
readv -P 0x12 65530 12
map'
S[flags]='write -f -P 0x44 1M 4k
read -P 0x44 1M 4k
write -q -P 0x45 2M 4k
read -q -P 0x45 2M 4k
read -q -P 0x46 2M 4k
write -q -z 2M 1k
read -P 0 2M 1k
discard -q 2M 64k
alloc 0 1
alloc 2M 64k'
S[aio]='aio_write -P 0x55 3M 8k
aio_flush
aio_read -P 0x55 3M 8k
aio_flush
aio_read -v 3M 16
aio_flush
aio_write -z 3M 1k
aio_flush
aio_read -P 0 3M 1k
aio_flush
aio_read -P 0x55 3M 2k
aio_flush
aio_write -P 0x56 4M 512 512
aio_flush
aio_read -P 0x56 4M 1k
aio_flush'
S[errors]='read 1073741312 1024
write -P 1 1G 1
read -P 1 1073741823 2
write -z 1073741312 1024
discard 1073741312 1024
read -P 0 1073741312 512
write -P 256 0 1
write -P 1 -1 1
read 0 0
write 0 0
alloc 1G
alloc 1073741823 2
length'
S[reopen]='write -P 0x11 0 512
reopen -r
write -P 1 0 1
read -P 0x11 0 100
reopen -w
write -P 2 0 1
read -P 2 0 1
close
read 0 1
length'
S[compress]='write -c -P 0x22 64k 64k
read -P 0x22 64k 64k
map
alloc 64k 64k
write -P 0x23 65636 10
read -P 0x22 64k 100
read -P 0x23 65636 10'
S[truncate]='write -P 0x11 1073741312 512
truncate 2G
length
write -P 0x66 1536M 512
read -P 0x66 1536M 512
read -P 0 1G 64k
map
truncate 1G
length'

for name in vectored flags aio errors reopen compress truncate; do
    if [[ " $SKIP " == *" $name "* ]]; then
        log "SKIP script '$name' (listed in QSM_OUTPUT_EXTRA_SKIP)"
        SKIPPED_SCRIPTS="${SKIPPED_SCRIPTS-} $name"
        continue
    fi
    d="$WORK/$name"
    mkdir -p "$d"
    printf '%s\n' "${S[$name]}" >"$d/script"
    qemu_create "$d/q.qcow2" "$OPTS" || die "qemu-img create failed"
    qemu_create "$d/s.qcow2" "$OPTS" || die "qemu-img create failed"
    qemu-io -f qcow2 "$d/q.qcow2" <"$d/script" >"$d/q.out" 2>"$d/q.err"
    rc_q=$?
    timeout "$TIMEOUT" "$QSM" io -f qcow2 "$d/s.qcow2" <"$d/script" >"$d/s.out" 2>"$d/s.err"
    rc_s=$?
    CHECKS=$((CHECKS + 1))
    if [ $rc_q != $rc_s ]; then
        fail "$name: qsm io exited $rc_s, qemu-io exited $rc_q"
        show_tail "$d/s.err"
    fi
    CHECKS=$((CHECKS + 1))
    if ! diff -u <(filter_timing <"$d/q.out") <(filter_timing <"$d/s.out") >"$d/diff"; then
        fail "$name: stdout differs (--- qemu-io, +++ qsm io, timing blanked):"
        head -n 30 "$d/diff" | sed 's/^/    | /'
        show_tail "$d/s.err" 5
    fi
    compare_images "$name: images after the script" "$d/q.qcow2" "$d/s.qcow2"
    check_clean "$name: qsm's image" "$d/s.qcow2"
done

if [ -n "${SKIPPED_SCRIPTS-}" ]; then
    [ "$FAILS" -gt 0 ] && interop_finish
    skip "scripts left out by QSM_OUTPUT_EXTRA_SKIP:$SKIPPED_SCRIPTS"
fi
interop_finish
