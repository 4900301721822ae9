# tests/interop/lib.sh: shared helpers for the interop tests (source it).
#
# Every test compares `qsm` against the reference qemu-img/qemu-io 7.2.
# Environment:
#   QSM              path to the built qsm binary (set by ctest)
#   QSM_SRC          source tree (set by ctest; defaults to ../.. of this file)
#   QSM_TEST_SCALE   multiplies operation counts (default 1; 0.2 for a quick run)
#   QSM_TEST_SEED    base seed for the generated workloads (default fixed)
#   QSM_TEST_TIMEOUT seconds allowed per qemu-io/qsm process (default 600)
#   QSM_KEEP=1       keep the work directory (always printed) after the run
#   TMPDIR           where the work directory goes (default /var/tmp)
# A failing check prints what failed and how to reproduce it, the test goes
# on with its other cases, and interop_finish exits 1.

set -u

INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QSM_SRC=${QSM_SRC:-$(cd "$INTEROP_DIR/../.." && pwd)}
GEN="$INTEROP_DIR/gen_workload.py"
SCALE=${QSM_TEST_SCALE:-1}
BASE_SEED=${QSM_TEST_SEED:-20241124}
TIMEOUT=${QSM_TEST_TIMEOUT:-600}
FAILS=0
CHECKS=0
TEST_NAME=$(basename "$0" .sh)

log()  { printf '[%s] %s\n' "$TEST_NAME" "$*"; }
fail() { FAILS=$((FAILS + 1)); printf '[%s] FAIL: %s\n' "$TEST_NAME" "$*"; }
die()  { printf '[%s] FATAL: %s\n' "$TEST_NAME" "$*"; exit 1; }

# scaled N: N * QSM_TEST_SCALE, at least 1
scaled() { python3 -c "import sys; print(max(1, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$SCALE"; }

# ops_for CLUSTER N: N scaled down for 2M clusters, where every flush and
# allocation moves 2 MiB and a run takes several times longer than at 64k.
ops_for() {
    case $1 in
    2M|2m|2048k|2097152) echo $(( $2 / 2 > 0 ? $2 / 2 : 1 ));;
    *) echo "$2";;
    esac
}

# skip WHY: a prerequisite is missing: report SKIPPED to ctest (exit 77,
# SKIP_RETURN_CODE in CMakeLists.txt), never a pass nor a failure.
skip() { printf '[%s] SKIPPED: %s\n' "$TEST_NAME" "$*"; exit 77; }

# qsm_as_qemu_io: $BIN/qemu-io is qsm under its multi-call name (run it with
# PATH="$BIN:$REAL_PATH"); REAL_PATH is the PATH that finds QEMU's qemu-io.
qsm_as_qemu_io() {
    REAL_PATH=$PATH
    BIN="$WORK/bin"
    mkdir -p "$BIN"
    ln -s "$QSM" "$BIN/qemu-io"
}

interop_init() {
    local t
    for t in qemu-img qemu-io python3 timeout cmp; do
        command -v "$t" >/dev/null || skip "$t not found (tests/run installs qemu-utils and python3)"
    done
    [ -n "${QSM:-}" ] || die "QSM is not set (path to the built qsm binary)"
    [ -x "$QSM" ] || die "QSM=$QSM is not executable"
    WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/qsm-$TEST_NAME.XXXXXX") || die "mktemp failed"
    trap interop_cleanup EXIT
    log "work dir $WORK, QSM=$QSM, scale $SCALE, seed $BASE_SEED"
    if [ "$BASE_SEED" = random ]; then
        BASE_SEED=$(( (RANDOM << 15) | RANDOM ))
        log "random base seed: QSM_TEST_SEED=$BASE_SEED"
    fi
}

interop_cleanup() {
    if [ "${QSM_KEEP:-0}" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}

interop_finish() {
    if [ "$FAILS" -gt 0 ]; then
        log "$FAILS of $CHECKS checks FAILED (rerun with QSM_KEEP=1 to keep $WORK)"
        exit 1
    fi
    log "all $CHECKS checks passed"
    exit 0
}

# show_tail FILE: last lines of a log, indented
show_tail() { [ -s "$1" ] && tail -n "${2:-15}" "$1" | sed 's/^/    | /'; return 0; }

# qemu_create IMG OPTS [SIZE]
qemu_create() { qemu-img create -q -f qcow2 -o "$2" "$1" "${3:-1G}"; }
# qsm_create IMG OPTS [SIZE]
qsm_create() { "$QSM" create -f qcow2 -o "$2" "$1" "${3:-1G}" >/dev/null; }

# run_io TAG OUTBASE IMG SCRIPT CMD...: run CMD (qemu-io or qsm io, with its
# options, image last) with SCRIPT on stdin; OUTBASE.out/.err get the output.
# Checks: exit status 0, nothing on stdout mentioning a failure.
run_io() {
    local tag=$1 out=$2 img=$3 script=$4 rc
    shift 4
    CHECKS=$((CHECKS + 1))
    timeout "$TIMEOUT" "$@" "$img" <"$script" >"$out.out" 2>"$out.err"
    rc=$?
    if [ $rc -ne 0 ]; then
        fail "$tag: '$* $img < $script' exited $rc"
        grep -m5 -n -i 'fail\|error' "$out.out" | sed 's/^/    | /'
        show_tail "$out.err"
        return 1
    fi
    if grep -q -i 'verification failed\|failed:\|error' "$out.out" "$out.err"; then
        fail "$tag: '$* $img < $script' reported a failure"
        grep -h -m5 -i 'verification failed\|failed:\|error' "$out.out" "$out.err" | sed 's/^/    | /'
        return 1
    fi
    return 0
}

qemu_io() { local tag=$1 out=$2 img=$3 script=$4; shift 4; run_io "$tag" "$out" "$img" "$script" qemu-io -f qcow2 "$@"; }
qsm_io()  { local tag=$1 out=$2 img=$3 script=$4; shift 4; run_io "$tag" "$out" "$img" "$script" "$QSM" io -f qcow2 "$@"; }

# compare_images TAG A B: qemu-img compare must call them identical
compare_images() {
    local tag=$1 a=$2 b=$3 out rc
    CHECKS=$((CHECKS + 1))
    out=$(qemu-img compare -f qcow2 -F qcow2 "$a" "$b" 2>&1)
    rc=$?
    if [ $rc -ne 0 ]; then
        fail "$tag: qemu-img compare $a $b exited $rc: $out"
        return 1
    fi
    return 0
}

# check_clean TAG IMG: qemu-img check must exit 0 with no errors and no leaks
check_clean() {
    local tag=$1 img=$2 out rc
    CHECKS=$((CHECKS + 1))
    out=$(qemu-img check -f qcow2 "$img" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] || ! printf '%s\n' "$out" | grep -q '^No errors were found on the image\.$' ||
       printf '%s\n' "$out" | grep -q -i 'leak\|corrupt' || printf '%s\n' "$out" | grep -q 'ERROR'; then
        fail "$tag: qemu-img check $img exited $rc:"
        printf '%s\n' "$out" | head -n 20 | sed 's/^/    | /'
        return 1
    fi
    return 0
}

# filter_timing: blank the only nondeterministic part of qemu-io output, the
# time and rates at the end of the statistics line after each read/write:
#   "4 KiB, 1 ops; 00.00 sec (3.970 MiB/sec and 1016.2922 ops/sec)"
# Past an hour qemu prints "H:MM:SS.cc" without " sec" (aio_write -z in 7.2
# reports a bogus start time, so this does happen).  Nothing else is touched,
# so the byte and op counts are still compared.
filter_timing() {
    sed -E 's/(, [0-9]+ ops; )[0-9:.]+( sec)? \([0-9.]+ (bytes|[KMGTPE]iB)\/sec and [0-9.]+ ops\/sec\)$/\1T sec (R\/sec and R ops\/sec)/'
}

# odirect_ok DIR: does DIR accept O_DIRECT writes (tmpfs does not)?
odirect_ok() {
    dd if=/dev/zero of="$1/.odirect-probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null
    local rc=$?
    rm -f "$1/.odirect-probe"
    return $rc
}

# io_uring_ok: can this process create an io_uring (kernel/seccomp permitting)?
io_uring_ok() {
    python3 - <<'EOF'
import ctypes, ctypes.util, os, platform, sys
nr = {"x86_64": 425, "aarch64": 425, "riscv64": 425, "ppc64le": 425, "s390x": 425}.get(platform.machine())
if nr is None:
    sys.exit(1)
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(nr, 4, params)
if fd < 0:
    sys.exit(1)
os.close(fd)
EOF
}

# bmap IMG NAME: the dirty extents of bitmap NAME as QEMU reads them (a
# read-only qemu-nbd exporting it, nbdinfo --map: the caller checks both
# are there); "in-use" when it is
# marked so (inconsistent), "invalid" when QEMU lists no bitmaps (autoclear
# bit 0 clear: all void).
bmap() {
    local img=$1 name=$2 sock="$WORK/bm.sock" pid i st
    st=$(qemu-img info --output=json "$img" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", [])
b = [b for b in d if b["name"] == sys.argv[1]]
print("invalid" if not d else "missing" if not b else "in-use" if "in-use" in b[0]["flags"] else "")' "$name")
    if [ -n "$st" ]; then
        echo "$st"
        return
    fi
    rm -f "$sock"
    qemu-nbd -r -f qcow2 -k "$sock" -B "$name" "$img" 2>"$WORK/nbd.err" &
    pid=$!
    for ((i = 0; i < 100; i++)); do [ -S "$sock" ] && break; sleep 0.05; done
    nbdinfo --map="qemu:dirty-bitmap:$name" "nbd+unix:///?socket=$sock" 2>&1
    stop_nbd "$pid"
}

# stop_nbd PID: the qemu-nbd we started, stopped.  A SIGTERM that comes
# while it is still setting up is lost (it sets its state to running after
# creating the socket), so a second one follows, then SIGKILL.
stop_nbd() {
    local i j
    for i in 1 2; do
        kill "$1" 2>/dev/null || break
        for ((j = 0; j < 100; j++)); do kill -0 "$1" 2>/dev/null || break 2; sleep 0.01; done
    done
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

# bitmaps_state IMG: IMG's bitmaps as QEMU sees them, a line each: name, flags,
# granularity, and the digest of its extents as a read-only qemu-nbd
# exporting all the consistent ones reads them (nbdinfo --map), "in-use"
# for the others.
bitmaps_state() {
    local img=$1 sock="$WORK/st.$BASHPID.sock" list="$WORK/st.$BASHPID.list" pid n f g i bs=()
    qemu-img info --output=json "$img" 2>/dev/null | python3 -c '
import json, sys
for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", []):
    print(b["name"], ",".join(b["flags"]) or "-", b["granularity"])' >"$list"
    while read -r n f g; do [[ $f = *in-use* ]] || bs+=(-B "$n"); done <"$list"
    if [ ${#bs[@]} -gt 0 ]; then
        rm -f "$sock"
        qemu-nbd -t -r -f qcow2 -k "$sock" "${bs[@]}" "$img" 2>"$WORK/st.err" &
        pid=$!
        for ((i = 0; i < 500; i++)); do [ -S "$sock" ] && break; sleep 0.01; done
    fi
    while read -r n f g; do
        if [[ $f = *in-use* ]]; then echo "$n $f $g in-use"; continue; fi
        echo "$n $f $g $(nbdinfo --map="qemu:dirty-bitmap:$n" "nbd+unix:///?socket=$sock" 2>&1 |
                         md5sum | cut -c1-12)"
    done <"$list"
    if [ ${#bs[@]} -gt 0 ]; then stop_nbd "$pid"; fi
}

# Crash points by strace's fault injection.  strace_kill_ok: strace is
# there and can inject.  kill_at K CMD...: CMD run until its K-th write or
# sync (pwritev, pwrite64, io_uring_enter, fdatasync) kills it; CMD's
# status, 137 when killed (in a shell of its own, whose "Killed" report
# goes nowhere); LeakSanitizer is off for it, since under strace it
# cannot stop CMD's threads and may report false leaks (exit 1).
# crashed_clean TAG IMG: qemu-img check of IMG, killed, finds nothing
# worse than leaks (one check counted).
strace_kill_ok() {
    command -v strace >/dev/null &&
        strace -f -o /dev/null -e trace=getpid -e inject=getpid:error=EPERM:when=1 true 2>/dev/null
}
kill_at() {
    local k=$1
    shift
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
        bash -c 'strace -f -o /dev/null -e trace=$1 -e inject=$1:signal=KILL:when=$2 "${@:3}"; exit $?' \
        _ pwritev,pwrite64,io_uring_enter,fdatasync "$k" "$@" >/dev/null 2>&1
}
crashed_clean() {
    local out crc
    out=$(qemu-img check "$2" 2>&1)
    crc=$?
    CHECKS=$((CHECKS + 1))
    if { [ $crc != 0 ] && [ $crc != 3 ]; } || grep -q '^ERROR' <<<"$out"; then
        fail "$1: qemu-img check exited $crc:"
        head -5 <<<"$out" | sed 's/^/    | /'
    fi
}
