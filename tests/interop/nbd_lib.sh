# tests/interop/nbd_lib.sh: the NBD server under test, for test_nbd_*.sh
# (source after lib.sh, then call nbd_init after interop_init).
#
# NBD_SERVER   the server command, any qemu-nbd-compatible one, split on
#              spaces: "qemu-nbd" (the reference), "/path/qsm nbd", a
#              qemu-nbd symlink to qsm.  Default "$QSM nbd": the build
#              dir's qsm (an ASan build's qsm runs under ASan), SKIPPED
#              (77) while that binary has no `nbd` command.
# A server runs in the background by PID (never killed by name), on a
# Unix socket of its own in $WORK; its stderr goes to a file checked at
# the end for sanitizer reports, and its exit status is checked.

NBD_CLIENT="$INTEROP_DIR/nbd_client.py"

nbd_init() {
    if [ -n "${NBD_SERVER:-}" ]; then
        read -r -a SERVER <<<"$NBD_SERVER"
    else
        SERVER=("$QSM" nbd)
        # Skipped only while qsm says it has no such command; any other
        # failure shows up in the checks.
        if ! "$QSM" nbd --help >"$WORK/nbd-help.out" 2>&1 &&
           grep -q -i "unknown command" "$WORK/nbd-help.out"; then
            skip "$QSM has no nbd command yet (set NBD_SERVER=qemu-nbd for the reference)"
        fi
    fi
    command -v "${SERVER[0]}" >/dev/null || skip "NBD_SERVER ${SERVER[0]} not found"
    # The reference: the real qemu-nbd (not a qemu-nbd link to qsm).
    # Checks marked qsm-only may fail there (printed XFAIL, not counted).
    REFERENCE=0
    if ! "${SERVER[@]}" --version 2>&1 | grep -q -i qsm && "${SERVER[@]}" --version 2>&1 | grep -q '^qemu-nbd'; then
        REFERENCE=1
    fi
    REF_ARG=()
    [ $REFERENCE = 1 ] && REF_ARG=(--reference)
    log "server: ${SERVER[*]} (reference qemu-nbd: $REFERENCE)"
    # A small quarantine keeps an ASan server's RSS meaningful; ignored by
    # a binary without ASan.
    export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=16"
    NBD_PIDS=()
    trap nbd_cleanup EXIT
}

nbd_cleanup() {
    local p
    for p in "${NBD_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    interop_cleanup
}

# nbd_start NAME IMAGE OPTS...: start the server on $WORK/NAME.sock, wait
# until it listens; sets SRV_PID, SRV_SOCK, SRV_ERR.  Returns 1 (with a
# FAIL) if it does not come up within 20 s.
nbd_start() {
    local name=$1 img=$2 i
    shift 2
    SRV_SOCK="$WORK/$name.sock"
    SRV_ERR="$WORK/$name.err"
    rm -f "$SRV_SOCK"
    "${SERVER[@]}" -k "$SRV_SOCK" "$@" "$img" >"$WORK/$name.out" 2>"$SRV_ERR" &
    SRV_PID=$!
    NBD_PIDS+=("$SRV_PID")
    for i in $(seq 200); do
        [ -S "$SRV_SOCK" ] && return 0
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.1
    done
    CHECKS=$((CHECKS + 1))
    fail "$name: server '${SERVER[*]} -k $SRV_SOCK $* $img' did not start listening"
    show_tail "$SRV_ERR"
    return 1
}

# sanitizer_clean TAG ERRFILE: no ASan/UBSan/LSan report in the server's stderr
sanitizer_clean() {
    CHECKS=$((CHECKS + 1))
    if grep -q -E 'ERROR: (Address|Leak|Thread|Memory)Sanitizer|runtime error:|SUMMARY: [A-Za-z]+Sanitizer' "$2"; then
        fail "$1: sanitizer report from the server:"
        grep -m 20 -E 'Sanitizer|runtime error|#[0-9] ' "$2" | sed 's/^/    | /'
        return 1
    fi
    return 0
}

# nbd_wait PID SECONDS: wait for the server to exit; sets SRV_RC (124 if it
# did not exit in time: then it is killed)
nbd_wait() {
    local pid=$1 secs=$2 i
    for i in $(seq $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        # a zombie is our child that has exited
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        SRV_RC=124
        return
    fi
    wait "$pid" 2>/dev/null
    SRV_RC=$?
}

# nbd_stop TAG PID ERRFILE [SIGNAL]: SIGTERM the server, it must exit 0
# within 30 s with no sanitizer report.
nbd_stop() {
    local tag=$1 pid=$2 err=$3 sig=${4:-TERM}
    CHECKS=$((CHECKS + 1))
    if ! kill -0 "$pid" 2>/dev/null || [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then
        wait "$pid"
        SRV_RC=$?
        fail "$tag: the server had already exited (status $SRV_RC)"
        show_tail "$err" 30
        sanitizer_clean "$tag" "$err"
        return 1
    fi
    kill -"$sig" "$pid"
    nbd_wait "$pid" 30
    if [ "$SRV_RC" != 0 ]; then
        fail "$tag: the server exited $SRV_RC after SIG$sig (want 0)"
        show_tail "$err" 30
    fi
    sanitizer_clean "$tag" "$err"
}

# nbd_py TAG ARGS...: run nbd_client.py, count its PASS/FAIL/XFAIL lines
nbd_py() {
    local tag=$1 out rc n
    shift
    out="$WORK/py.$tag.$CHECKS.log"
    timeout "$TIMEOUT" python3 "$NBD_CLIENT" "$@" "${REF_ARG[@]}" >"$out" 2>&1
    rc=$?
    sed "s/^/  [$tag] /" "$out"
    n=$(grep -c -E '^(PASS|FAIL|XFAIL) ' "$out")
    CHECKS=$((CHECKS + n))
    n=$(grep -c '^FAIL ' "$out")
    FAILS=$((FAILS + n))
    if [ "$rc" != 0 ] && [ "$n" = 0 ]; then
        fail "$tag: nbd_client.py $* exited $rc"
        tail -n 5 "$out" | sed 's/^/    | /'
    fi
    return "$rc"
}

# check TAG COND-COMMAND...: one shell-level check
check() {
    local tag=$1
    shift
    CHECKS=$((CHECKS + 1))
    if "$@"; then return 0; fi
    fail "$tag"
    return 1
}

# xcheck TAG COND...: a qsm-only check (expected to fail on the reference)
xcheck() {
    local tag=$1
    shift
    CHECKS=$((CHECKS + 1))
    if "$@"; then return 0; fi
    if [ "$REFERENCE" = 1 ]; then
        log "XFAIL $tag (qsm-only check; the reference qemu-nbd fails it)"
        return 1
    fi
    fail "$tag"
    return 1
}

NBD_URI() { echo "nbd+unix:///?socket=$1"; }

# not CMD...: succeeds when CMD fails (for check/xcheck)
not() { ! "$@"; }
