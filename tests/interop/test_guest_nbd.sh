#!/usr/bin/env bash
# A real guest on an NBD export (#14): a Linux guest (Debian's kernel, a
# busybox initramfs built by tests/guest/build_initramfs.sh) boots in
# qemu-system-x86_64 with its virtio disk on
#   -drive file=nbd+unix:///?socket=S,format=raw,if=virtio,cache=none,discard=unmap
# served by $NBD_SERVER from a fresh qcow2 image.
#  boot 1 (tests/guest/init, qsm.mode=write): mkfs.ext4, mount -o discard,
#         files of mixed sizes (1 B to 3 MiB, sparse ones, a range rewritten
#         in place, a deleted file), their sha256sums on the serial console,
#         sync, umount, e2fsck -fn clean, power off;
#  the server is stopped by SIGTERM (by PID) and must exit 0; qemu-img check
#  must call the image clean; a new server process serves the same image;
#  boot 2 (qsm.mode=verify): e2fsck -fn clean, mount, sha256sum -c against
#         boot 1's sums (on a second, raw virtio disk), umount, fsck again;
#  the server is stopped again (exit 0, image clean), and the sums boot 2
#  printed for every file it found must be exactly boot 1's.
# The guest's verdict is the last "QSMG VERDICT" line of each console log.
#
# KVM when a probe boot with -accel kvm succeeds (its result is cached per
# host boot), otherwise TCG.  SKIPPED (77) when qemu-system-x86_64 is
# missing, the server has no nbd command (qsm before #14), or the kernel
# cannot be downloaded and none is cached.
#
# Env: NBD_SERVER   the server command line, as qemu-nbd's (default
#                   "$QSM nbd"; e.g. NBD_SERVER=qemu-nbd for the reference)
#      QSM_GUEST_ACCEL=kvm|tcg   skip the probe
#      QSM_GUEST_TIMEOUT         seconds per boot (default 150)
#      QSM_GUEST_CACHE, QSM_GUEST_OFFLINE: see tests/guest/build_initramfs.sh
. "$(dirname "$0")/lib.sh"
T0=$(date +%s)
GUEST_DIR="$QSM_SRC/tests/guest"
QSM=${QSM:-$QSM_SRC/build/qsm}
read -r -a SERVER <<<"${NBD_SERVER:-$QSM nbd}"
BOOT_TIMEOUT=${QSM_GUEST_TIMEOUT:-150}
CACHE=${QSM_GUEST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/qsm-guest}
export QSM_GUEST_CACHE=$CACHE

command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
command -v "${SERVER[0]}" >/dev/null || skip "NBD server ${SERVER[0]} not found"
"${SERVER[@]}" --help >/dev/null 2>&1 || skip "'${SERVER[*]} --help' fails: no NBD server there yet"
interop_init
log "NBD server: ${SERVER[*]}"

guest=$(bash "$GUEST_DIR/build_initramfs.sh" 2>"$WORK/build.log")
rc=$?
[ $rc = 77 ] && skip "$(grep SKIPPED "$WORK/build.log" | tail -1)"
[ $rc = 0 ] || { show_tail "$WORK/build.log"; die "tests/guest/build_initramfs.sh exited $rc"; }
KERNEL=$(sed -n 's/^KERNEL=//p' <<<"$guest")
INITRD=$(sed -n 's/^INITRD=//p' <<<"$guest")
log "kernel $KERNEL, initramfs $INITRD ($(( $(date +%s) - T0 )) s so far)"

# qemu_boot ACCEL MODE LOG [QEMU ARGS...]: boot the guest in MODE, console
# to LOG; prints the verdict line (empty if none); the status is qemu's.
qemu_boot() {
    local accel=$1 mode=$2 log=$3 to=$BOOT_TIMEOUT rc
    shift 3
    [ "$mode" = probe ] && to=20
    timeout "$to" qemu-system-x86_64 -accel "$accel" -nodefaults -no-user-config \
        -display none -m 256 -smp 1 -no-reboot \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 qsm.mode=$mode" \
        -serial "file:$log" "$@" >"$log.qemu" 2>&1
    rc=$?
    tr -d '\r' <"$log" | grep '^QSMG VERDICT' | tail -1
    return $rc
}

# ---- accelerator: KVM only if it really boots ----------------------------
ACCEL=${QSM_GUEST_ACCEL:-}
if [ -z "$ACCEL" ]; then
    ACCEL=tcg
    bootid=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
    probe_cache="$CACHE/kvm-probe-$bootid"
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        if [ -s "$probe_cache" ]; then
            ACCEL=$(cat "$probe_cache")
            log "KVM probe (cached for this host boot): $ACCEL"
        else
            v=$(qemu_boot kvm probe "$WORK/probe.log")
            case $v in "QSMG VERDICT PASS probe"*) ACCEL=kvm;; esac
            log "KVM probe boot: ${v:-no verdict (qemu: $(tail -1 "$WORK/probe.log.qemu"))}: using $ACCEL"
            echo "$ACCEL" >"$probe_cache"
        fi
    else
        log "/dev/kvm not usable: TCG"
    fi
fi

# ---- the server --------------------------------------------------------------
CACHE_MODE=writeback
odirect_ok "$WORK" && CACHE_MODE=none
SOCK="$WORK/nbd.sock"
SERVER_PID=
# start_server IMG TAG: serve IMG (qcow2) on $SOCK, persistent (-t); waits
# until the socket and the pid file are there; the PID file must name the
# process we started.
start_server() {
    local img=$1 tag=$2 i=0
    rm -f "$SOCK" "$WORK/nbd.pid"
    "${SERVER[@]}" -k "$SOCK" -t -f qcow2 --cache="$CACHE_MODE" --discard=unmap \
        --pid-file "$WORK/nbd.pid" "$img" >"$WORK/server-$tag.log" 2>&1 &
    SERVER_PID=$!
    while [ $i -lt 100 ]; do
        [ -S "$SOCK" ] && [ -s "$WORK/nbd.pid" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
        i=$((i + 1))
    done
    CHECKS=$((CHECKS + 1))
    if ! [ -S "$SOCK" ] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
        fail "$tag: '${SERVER[*]}' did not start serving $SOCK"
        show_tail "$WORK/server-$tag.log"
        return 1
    fi
    [ "$(cat "$WORK/nbd.pid" 2>/dev/null)" = "$SERVER_PID" ] ||
        fail "$tag: pid file says '$(cat "$WORK/nbd.pid" 2>/dev/null)', the server is $SERVER_PID"
    log "$tag: server PID $SERVER_PID, --cache=$CACHE_MODE"
}
# stop_server TAG IMG: SIGTERM by PID; it must exit 0 within 30 s, and
# qemu-img check must call IMG clean.
stop_server() {
    local tag=$1 img=$2 i=0 rc
    [ -n "$SERVER_PID" ] || return 1
    kill -TERM "$SERVER_PID" 2>/dev/null
    while kill -0 "$SERVER_PID" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    CHECKS=$((CHECKS + 1))
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        fail "$tag: the server did not exit within 30 s of SIGTERM"
        kill -KILL "$SERVER_PID"
    fi
    wait "$SERVER_PID"
    rc=$?
    SERVER_PID=
    [ $rc = 0 ] || { fail "$tag: the server exited $rc after SIGTERM"; show_tail "$WORK/server-$tag.log"; }
    CHECKS=$((CHECKS + 1))
    qemu-img check "$img" >"$WORK/check-$tag.log" 2>&1 ||
        { fail "$tag: qemu-img check $img exited $?"; show_tail "$WORK/check-$tag.log"; }
}
cleanup_server() { [ -n "$SERVER_PID" ] && kill -KILL "$SERVER_PID" 2>/dev/null; interop_cleanup; }
trap cleanup_server EXIT

NBD_DRIVE="file=nbd+unix:///?socket=$SOCK,format=raw,if=virtio,cache=none,discard=unmap"
# guest_run MODE TAG [QEMU ARGS...]: one boot; the verdict must be PASS.
guest_run() {
    local mode=$1 tag=$2 v rc t=$(date +%s)
    shift 2
    v=$(qemu_boot "$ACCEL" "$mode" "$WORK/$tag.log" -drive "$NBD_DRIVE" "$@")
    rc=$?
    CHECKS=$((CHECKS + 1))
    log "$tag boot ($ACCEL): ${v:-no verdict}, qemu exited $rc, $(( $(date +%s) - t )) s"
    case $v in
    "QSMG VERDICT PASS $mode"*) [ $rc = 0 ] && return 0
        fail "$tag: qemu-system-x86_64 exited $rc";;
    *) fail "$tag: the guest did not pass (qemu exited $rc)"
       tr -d '\r' <"$WORK/$tag.log" | grep -v '^QSMG SUM' >"$WORK/$tag.console"
       show_tail "$WORK/$tag.console" 25
       show_tail "$WORK/$tag.log.qemu";;
    esac
    return 1
}

IMG="$WORK/guest.qcow2"
qemu-img create -q -f qcow2 "$IMG" 256M || die "qemu-img create failed"

# boot 1: write
if start_server "$IMG" write; then
    guest_run write write
    stop_server write "$IMG"
fi
tr -d '\r' <"$WORK/write.log" | grep '^QSMG SUM ' | sort >"$WORK/sums.write"
nsums=$(wc -l <"$WORK/sums.write")
log "boot 1 wrote $nsums files; image: $(qemu-img info "$IMG" | sed -n 's/^disk size: //p') on disk"
CHECKS=$((CHECKS + 1))
[ "$nsums" -ge 50 ] || fail "boot 1 printed $nsums sums (expected >= 50)"

# boot 2: verify, with boot 1's sums on a raw second disk
cp "$WORK/sums.write" "$WORK/manifest.raw" &&
    truncate -s %1M "$WORK/manifest.raw" || die "manifest failed"
if [ "$FAILS" = 0 ] && start_server "$IMG" verify; then
    guest_run verify verify -drive "file=$WORK/manifest.raw,format=raw,if=virtio,readonly=on"
    stop_server verify "$IMG"
    tr -d '\r' <"$WORK/verify.log" | grep '^QSMG SUM ' | sort >"$WORK/sums.verify"
    CHECKS=$((CHECKS + 1))
    if ! cmp -s "$WORK/sums.write" "$WORK/sums.verify"; then
        fail "the files boot 2 found differ from what boot 1 wrote"
        diff "$WORK/sums.write" "$WORK/sums.verify" | head -20 | sed 's/^/    | /'
    fi
fi
log "total $(( $(date +%s) - T0 )) s"
interop_finish
