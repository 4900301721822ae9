#!/usr/bin/env bash
# Hostile and faulty NBD clients (issue #14) against the server NBD_SERVER
# (default the build's `qsm nbd`; "qemu-nbd" for the reference; see
# nbd_lib.sh).  The cases (nbd_client.py, class Hostile) run one after the
# other against one server (-t -e 4, a 64 MiB qcow2 holding 0x5a in its
# first 8 MiB): bad client flags and garbage instead of a handshake, bad
# option magic, unknown options (NBD_REP_ERR_UNSUP, the haggle goes on),
# 1 GiB option lengths (refused, memory bounded), a 5000-byte export name,
# OPT_GO/OPT_INFO/OPT_EXPORT_NAME of an unknown export, requests before
# OPT_GO, bad request magic, unknown commands, offsets and lengths past the
# end (EINVAL), zero lengths, reads and writes above the 32 MiB maximum
# payload, a write whose payload never comes, flags not negotiated (DF
# without structured replies, unknown flags), BLOCK_STATUS without a meta
# context, options whose fields lie about their lengths (ERR_INVALID),
# 300 pipelined requests answered in any order (each handle once, right
# data, DF reads in one chunk), NBD_CMD_DISC behind requests in flight
# (answered, then closed), clients vanishing with requests in flight (FIN and RST), a
# client sending thousands of reads without reading replies (server RSS
# stays within 64 MiB of what it was), a byte-at-a-time handshake, never
# completing handshakes (closed within 10 s), connections beyond -e.
# After each case: the server is alive and serves both a connection opened
# before and a new one.  At the end: SIGTERM, exit status 0, no sanitizer
# report on its stderr (an ASan build's qsm runs under ASan: tests/run's
# build-asan), the image equal to an untouched copy (the cases' valid
# writes rewrite the same bytes) and `qemu-img check` clean.
# Env: NBD_SERVER, NBD_HOSTILE_CASES="case ..." (a subset; default all).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nbd_lib.sh"
interop_init
nbd_init

IMG="$WORK/hostile.qcow2"
qemu-img create -q -f qcow2 "$IMG" 64M || die "qemu-img create failed"
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 8M' "$IMG" >/dev/null || die "qemu-io prefill failed"
cp "$IMG" "$WORK/ref.qcow2"

nbd_start hostile "$IMG" -f qcow2 -t -e 4 || interop_finish
PID=$SRV_PID
ONLY=()
[ -n "${NBD_HOSTILE_CASES:-}" ] && read -r -a ONLY <<<"--only $NBD_HOSTILE_CASES"
nbd_py hostile hostile --socket "$SRV_SOCK" --pid "$PID" --shared 4 "${ONLY[@]}"
log "server RSS at the end: $(awk '/VmRSS|VmHWM/ {printf "%s %s kB  ", $1, $2}' /proc/$PID/status 2>/dev/null)"
nbd_stop "hostile server" "$PID" "$SRV_ERR"
compare_images "image unchanged but by valid requests" "$IMG" "$WORK/ref.qcow2"
check_clean "image after the hostile clients" "$IMG"
interop_finish
