#!/usr/bin/env bash
# fio's nbd engine (libnbd) as a client of NBD_SERVER (default the build's
# `qsm nbd`; see nbd_lib.sh), issue #14: a queue-depth client that is
# neither QEMU nor this tree's own nbd_client.py.
#  - randwrite: rw=randwrite, 4k and 64k blocks mixed, iodepth=16 over one
#    connection, verify=crc32c with do_verify=1 (fio reads every block back
#    through the server and checks it), verify_fatal;
#  - randrw: a second job, reads and writes mixed (70/30), 512-byte to
#    128 KiB blocks, iodepth=16, with fio's own verify of what it wrote;
#  - nbdcopy copies the export to a raw file while it is served; after
#    SIGTERM (exit 0, no sanitizer report) qemu-img check finds the qcow2
#    clean and qemu-img compare finds it equal to that copy.
# SKIPPED when fio has no nbd engine (it is built with libnbd on Debian's
# fio 3.33) or nbdcopy (package libnbd-bin) is missing.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nbd_lib.sh"
interop_init
command -v fio >/dev/null || skip "fio not found"
fio --enghelp 2>/dev/null | grep -q -w nbd || skip "fio has no nbd engine (fio --enghelp)"
command -v nbdcopy >/dev/null || skip "nbdcopy not found (libnbd-bin)"
nbd_init

SIZE_MB=$(scaled 32)
IMG="$WORK/fio.qcow2"
qemu-img create -q -f qcow2 "$IMG" 64M || die "qemu-img create failed"
if nbd_start fio "$IMG" -f qcow2 -t; then
    URI=$(NBD_URI "$SRV_SOCK")
    t0=$(date +%s.%N)
    timeout "$TIMEOUT" fio --name=randwrite --ioengine=nbd --uri="$URI" --rw=randwrite \
        --bssplit=4k/50:64k/50 --iodepth=16 --size=${SIZE_MB}M --offset=0 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --randrepeat=1 --randseed="$BASE_SEED" \
        --output-format=json --output="$WORK/fio1.json" >"$WORK/fio1.out" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    check "randwrite: fio exited $rc" [ "$rc" = 0 ] || { show_tail "$WORK/fio1.out"; show_tail "$WORK/fio1.json" 30; }
    # What fio did: bytes written and read back (verify), and no error.
    read -r w r e < <(python3 -c "
import json, sys
j = json.load(open(sys.argv[1]))['jobs'][0]
print(j['write']['io_bytes'], j['read']['io_bytes'], j['error'])" "$WORK/fio1.json" 2>/dev/null || echo "0 0 -1")
    check "randwrite: fio wrote $w bytes, verified $r, error $e (want ${SIZE_MB} MiB each, error 0)" \
        eval '[ "$w" -ge $((SIZE_MB << 20)) ] && [ "$r" -ge $((SIZE_MB << 20)) ] && [ "$e" = 0 ]'
    log "randwrite: ${SIZE_MB} MiB written and verified in $(echo "$t1 - $t0" | bc) s"

    timeout "$TIMEOUT" fio --name=randrw --ioengine=nbd --uri="$URI" --rw=randrw --rwmixread=70 \
        --bsrange=512-128k --iodepth=16 --size=${SIZE_MB}M --offset=32M \
        --verify=crc32c --verify_fatal=1 --verify_state_save=0 --randrepeat=1 --randseed=$((BASE_SEED + 1)) \
        --output-format=json --output="$WORK/fio2.json" >"$WORK/fio2.out" 2>&1
    rc=$?
    check "randrw: fio exited $rc" [ "$rc" = 0 ] || { show_tail "$WORK/fio2.out"; show_tail "$WORK/fio2.json" 30; }
    e=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['jobs'][0]['error'])" "$WORK/fio2.json" 2>/dev/null || echo -1)
    check "randrw: fio reported error $e" [ "$e" = 0 ]

    timeout "$TIMEOUT" nbdcopy "$URI" "$WORK/copy.raw" >"$WORK/nbdcopy.out" 2>&1
    rc=$?
    check "nbdcopy of the export exited $rc" [ "$rc" = 0 ] || show_tail "$WORK/nbdcopy.out"
    check "nbdcopy: the copy is not 64 MiB" [ "$(stat -c %s "$WORK/copy.raw" 2>/dev/null)" = $((64 << 20)) ]
    nbd_stop "fio server" "$SRV_PID" "$SRV_ERR"
    check_clean "after fio" "$IMG"
    out=$(qemu-img compare -f qcow2 -F raw "$IMG" "$WORK/copy.raw" 2>&1)
    check "qemu-img compare of the image and nbdcopy's copy: $out" [ $? = 0 ]
    # The copy is not all zeros: fio's data went through.
    check "the copy holds no data" not cmp -s -n $((SIZE_MB << 20)) "$WORK/copy.raw" /dev/zero
fi
interop_finish
