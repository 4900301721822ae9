#!/usr/bin/env bash
# tests/interop/test_malformed.sh: qsm refuses every malformed image of
# make_bad_images.py (one per rule of the opener checklist in
# tools/doc/design.md, "Untrusted images"), names the field, never crashes and
# never writes to a refused image.
#
# For each row of the generated manifest.tsv:
#   open rows:  `qsm info -f qcow2 IMG` and `qsm io -f qcow2 -c 'read 0 512'
#               IMG` (read-write open) must both exit non-zero, with the
#               expected substring in stderr (case-insensitive), and the
#               file must be unchanged;
#   io rows:    `qsm io -f qcow2 -c CMD IMG` must exit non-zero with the
#               substring in its output (stdout + stderr); the file must be
#               unchanged, or differ only in the corrupt bit (header byte 79,
#               bit 1: QEMU marks an image corrupt when a read-write session
#               finds bad metadata), and then a read-write open must now be refused
#               with a message containing "corrupt".
#   open rows, against qemu-io 7.2: `qemu-io -f qcow2 -c 'read 0 512' IMG`
#               and qsm run as qemu-io (a symlink) print the same stderr
#               (the path filtered) and exit alike, but for the rows of
#               QEMU_OPENS (QEMU opens them, qsm refuses: a qsm rule) and
#               QSM_LACKS (features qsm does not implement);
#   accept rows: QEMU opens the image; the script of column 4 run by
#               qemu-io and by qsm as qemu-io gives the same stdout (timings
#               filtered), stderr and exit code, and the two images are
#               byte-identical (the corrupt bit set in both, or in neither).
#   backing rows: an overlay whose backing file is missing or is one of the
#               refused images: qsm as qemu-io prints qemu-io's "Could not
#               open backing file: ..." line and exits as it does.
# Every command: exit code < 128 (no signal), no sanitizer report, no hang.
# The valid image must open, read back its patterns and stay unchanged.
#
# Output: one PASS/FAIL/XFAIL line per case and a final "N passed, M failed".
# Environment: QSM (qsm binary), QSM_SRC, TMPDIR, QSM_KEEP=1 (see lib.sh);
# QSM_MALFORMED_TIMEOUT seconds per command (default 30).
#
# Known engine/tool failures are listed in XFAIL below, one NAME:CHECK per
# entry, CHECK one of: fails (the command must fail), message (the field is
# named), unchanged (the file is not written), crash.  A listed check that
# fails prints XFAIL and does not fail the test; a listed check that passes
# is an XPASS and FAILS the test, so whoever fixes the engine removes the
# entry in the same commit.

source "$(dirname "$0")/lib.sh"

declare -A XFAIL=(
    # (empty: every malformed image is refused as it should be)
)

# QEMU opens these and qsm refuses them (a nonzero table offset inside the
# file is a qsm rule: reading a table from the header or past EOF is never
# what a valid image does).
# (QEMU reads the header, or zeros, as the L1 table.)
declare -A QEMU_OPENS=(
    [l1_offset_zero]=1 [l1_offset_past_eof]=1
)
# Accept rows whose images may differ: QEMU writes more than qsm before it
# finds the damage; every byte qsm changed must then be changed to the same
# value in QEMU's image (qsm wrote a subset of what QEMU wrote).
declare -A IMAGE_DIFFERS=(
    # QEMU writes a new refcount table (and grows the file) before its
    # overlap check trips at the header.
    [reftable_offset_past_eof]=1
)
# Features qsm does not implement: refused by name, where QEMU asks for
# what it would need (a key secret).  (An external data file not named in
# the image gets QEMU's "'data-file' is required for this image".)
declare -A QSM_LACKS=( [crypt_method_1]=1 )
CMD_TIMEOUT=${QSM_MALFORMED_TIMEOUT:-30}
PASSED=0
FAILED=0
XFAILED=0

interop_init
qsm_as_qemu_io
BAD="$WORK/bad"
ORIG="$WORK/orig"
mkdir -p "$BAD" "$ORIG"
python3 "$INTEROP_DIR/make_bad_images.py" "$BAD" >"$WORK/make.log" 2>&1 ||
    { cat "$WORK/make.log"; die "make_bad_images.py failed"; }
[ -s "$BAD/manifest.tsv" ] || die "make_bad_images.py wrote no manifest"

# run_cmd TAG CMD...: run with a timeout; sets RC, OUT (stdout), ERR (stderr)
run_cmd() {
    local tag=$1
    shift
    timeout -k 5 "$CMD_TIMEOUT" "$@" >"$WORK/$tag.out" 2>"$WORK/$tag.err" </dev/null
    RC=$?
    OUT=$(<"$WORK/$tag.out")
    ERR=$(<"$WORK/$tag.err")
}

# (few forks per case: process creation is slow on a loaded machine)
sha() { local s _; read -r s _ < <(sha256sum "$1"); echo "$s"; }

# contains HAYSTACK NEEDLE: case-insensitive fixed-string match
contains() { local h=${1,,} n=${2,,}; [[ $h == *"$n"* ]]; }

# Per-case bookkeeping: failed checks go to CASE_FAILS (NAME:CHECK keys are
# looked up in XFAIL), their explanations to CASE_WHY.
case_begin() { CASE=$1; declare -gA CASE_FAILS=(); CASE_WHY=(); }
case_fail() { # CHECK REASON
    CASE_FAILS[$1]=1
    CASE_WHY+=("$1: $2")
}
# no_crash WHAT: the last run_cmd did not die of a signal, hang or trip a sanitizer
no_crash() {
    if [ "$RC" -ge 124 ]; then
        local why="killed by signal $((RC - 128))"
        [ "$RC" -eq 124 ] && why="timed out after ${CMD_TIMEOUT}s"
        [ "$RC" -gt 124 ] && [ "$RC" -lt 128 ] && why="could not be run"
        case_fail crash "$1 exited $RC ($why)"
    elif [[ $ERR == *Sanitizer* || $ERR == *"runtime error"* ]]; then
        case_fail crash "$1: sanitizer report: $(grep -m1 -E 'Sanitizer|runtime error' <<<"$ERR")"
    fi
}
case_end() {
    local k why="" bad=0 xf=0 check
    for k in "${!XFAIL[@]}"; do
        [ "${k%%:*}" = "$CASE" ] || continue
        check=${k#*:}
        if [ -n "${CASE_FAILS[$check]:-}" ]; then
            xf=1
        else
            bad=1
            why+=" [XPASS $check: passes now, remove $k from XFAIL]"
        fi
    done
    for k in "${CASE_WHY[@]}"; do
        check=${k%%:*}
        if [ -n "${XFAIL[$CASE:$check]:-}" ]; then
            why+=" [known, $k]"
        else
            bad=1
            why+=" [$k]"
        fi
    done
    if [ "$bad" = 1 ]; then
        FAILED=$((FAILED + 1))
        echo "FAIL $CASE$why"
    elif [ "$xf" = 1 ]; then
        XFAILED=$((XFAILED + 1))
        echo "XFAIL $CASE$why"
    else
        PASSED=$((PASSED + 1))
        echo "PASS $CASE"
    fi
}

# check_refused WHAT EXPECT TEXT: the last command failed, cleanly, naming EXPECT
check_refused() {
    no_crash "$1"
    if [ "$RC" -eq 0 ]; then
        case_fail fails "$1 exited 0"
    fi
    if ! contains "$3" "$2"; then
        case_fail message "$1 does not mention '$2': $(head -c 300 <<<"$3" | tr '\n' ' ')"
    fi
}

# corrupt_bit_only ORIG NEW: same size, and the only difference is the
# corrupt bit (byte 79, bit 1; cmp -l counts from 1 and prints octal) now set
corrupt_bit_only() {
    local diff pos a b
    diff=$(cmp -l "$1" "$2" 2>&1)
    [[ $diff != *$'\n'* ]] || return 1
    read -r pos a b <<<"$diff"
    [ "$pos" = 80 ] && [ $((8#$b)) -eq $((8#$a | 2)) ] && [ $((8#$a)) -ne $((8#$b)) ]
}

# subset_of_qemu ORIG QSM QEMU: every byte where QSM differs from ORIG has
# the same value in QEMU, and QSM is no longer than ORIG or QEMU
subset_of_qemu() {
    python3 - "$1" "$2" "$3" <<'PY'
import sys
o, s, q = (open(p, "rb").read() for p in sys.argv[1:4])
if len(s) > max(len(o), len(q)):
    sys.exit(1)
for i in range(len(s)):
    if (o[i] if i < len(o) else 0) != s[i] and (i >= len(q) or q[i] != s[i]):
        sys.exit(1)
PY
}

# differs ORIG NEW: a short description of where the files differ
differs() {
    local n
    n=$(cmp -l "$1" "$2" 2>/dev/null | wc -l)
    echo "$n bytes differ, first at $(cmp "$1" "$2" 2>&1 | head -1 | sed 's/.*differ: //')"
}

# --- the valid image ---------------------------------------------------------
img="$BAD/valid.qcow2"
case_begin valid
before=$(sha "$img")
run_cmd last "$QSM" info -f qcow2 "$img"
no_crash "info"
[ "$RC" -eq 0 ] || case_fail fails "qsm info exited $RC: $ERR"
run_cmd last "$QSM" io -f qcow2 -c 'read -P 0xab 0 64k' -c 'read -P 0xcd 512M 128k' -c 'read -P 0 64k 64k' "$img"
no_crash "io read"
[ "$RC" -eq 0 ] || case_fail fails "qsm io read exited $RC: $OUT $ERR"
if contains "$OUT" "verification failed"; then case_fail fails "pattern: $OUT"; fi
[ "$(sha "$img")" = "$before" ] || case_fail unchanged "valid image changed by info/read"
case_end

# --- one case per manifest row ---------------------------------------------------
declare -A SEEN=()
while IFS=$'\t' read -r name expect phase cmd; do
    [ -n "$name" ] || continue
    SEEN[$name]=1
    img="$BAD/$name.qcow2"
    case_begin "$name"
    if [ ! -f "$img" ]; then
        case_fail fails "image $img missing"
        case_end
        continue
    fi
    before=$(sha "$img")
    case $phase in
    open)
        run_cmd last "$QSM" info -f qcow2 "$img"
        check_refused "qsm info" "$expect" "$ERR"
        run_cmd last "$QSM" io -f qcow2 -c 'read 0 512' "$img"
        check_refused "qsm io (read-write)" "$expect" "$ERR"
        [ "$(sha "$img")" = "$before" ] ||
            case_fail unchanged "refused image was written (sha256 changed)"
        if [ -z "${QEMU_OPENS[$name]:-}${QSM_LACKS[$name]:-}" ]; then
            run_cmd qo timeout -k 5 "$CMD_TIMEOUT" qemu-io -f qcow2 -c 'read 0 512' "$img"
            qrc=$RC; qerr=$ERR
            run_cmd so "$BIN/qemu-io" -f qcow2 -c 'read 0 512' "$img"
            no_crash "qsm as qemu-io"
            [ "$RC" = "$qrc" ] || case_fail fails "as qemu-io: exit $RC, qemu-io's $qrc"
            [ "$ERR" = "$qerr" ] || case_fail message "as qemu-io: '$ERR', qemu-io: '$qerr'"
        elif [ -n "${QEMU_OPENS[$name]:-}" ]; then
            run_cmd qo timeout -k 5 "$CMD_TIMEOUT" qemu-io -r -f qcow2 -c 'read 0 512' "$img"
            [ "$RC" = 0 ] || case_fail fails "QEMU_OPENS lists $name but qemu-io refuses it: $ERR"
        fi
        ;;
    io)
        cp "$img" "$ORIG/$name.qcow2"
        run_cmd last "$QSM" io -f qcow2 -c "$cmd" "$img"
        check_refused "qsm io -c '$cmd'" "$expect" "$OUT"$'\n'"$ERR"
        if [ "$(sha "$img")" != "$before" ]; then
            if corrupt_bit_only "$ORIG/$name.qcow2" "$img"; then
                # Marked corrupt: a read-write open must now be refused.
                run_cmd last "$QSM" io -f qcow2 -c 'read 0 512' "$img"
                no_crash "qsm io (reopen of corrupt image)"
                if [ "$RC" -eq 0 ] || ! contains "$ERR" corrupt; then
                    case_fail unchanged "corrupt bit set but read-write reopen not refused as corrupt (exit $RC): $ERR"
                fi
            else
                case_fail unchanged "image written beyond the corrupt bit: $(differs "$ORIG/$name.qcow2" "$img")"
            fi
        fi
        ;;
    accept)
        # Same script, same image, qemu-io and qsm as qemu-io.
        for side in q s; do
            cp "$img" "$WORK/$side.qcow2"
        done
        args=()
        while IFS= read -r c; do args+=(-c "$c"); done < <(sed 's/ ; /\n/g' <<<"$cmd")
        run_cmd qa timeout -k 5 "$CMD_TIMEOUT" qemu-io -f qcow2 "${args[@]}" "$WORK/q.qcow2"
        qrc=$RC; qout=$(filter_timing <<<"$OUT"); qerr=${ERR//$WORK/WORK}
        run_cmd sa "$BIN/qemu-io" -f qcow2 "${args[@]}" "$WORK/s.qcow2"
        no_crash "qsm as qemu-io"
        sout=$(filter_timing <<<"$OUT"); serr=${ERR//$WORK/WORK}
        [ "$RC" = "$qrc" ] || case_fail fails "exit $RC, qemu-io's $qrc"
        [ "$sout" = "$qout" ] || case_fail message "stdout differs: qemu [$qout] qsm [$sout]"
        [ "$serr" = "$qerr" ] || case_fail message "stderr differs: qemu [$qerr] qsm [$serr]"
        if [ "$expect" != - ] && ! contains "$serr" "$expect"; then
            case_fail message "no '$expect' in stderr: $serr"
        fi
        if [ -n "${IMAGE_DIFFERS[$name]:-}" ]; then
            subset_of_qemu "$img" "$WORK/s.qcow2" "$WORK/q.qcow2" ||
                case_fail unchanged "qsm wrote what qemu-io did not: $(differs "$img" "$WORK/s.qcow2")"
        else
            cmp -s "$WORK/q.qcow2" "$WORK/s.qcow2" ||
                case_fail unchanged "image differs from qemu-io's: $(differs "$WORK/q.qcow2" "$WORK/s.qcow2")"
        fi
        ;;
    *)
        case_fail fails "bad manifest phase '$phase'"
        ;;
    esac
    case_end
done <"$BAD/manifest.tsv"

# --- a refused backing file: QEMU's "Could not open backing file: ..." ---------
for back in missing cluster_bits_8 header_length_past_cluster l1_size_too_small \
            extension_length_past_end; do
    case_begin "backing-$back"
    ov="$WORK/ov-$back.qcow2"
    bimg="$BAD/$back.qcow2"
    [ "$back" = missing ] && bimg="$WORK/no-such-file.qcow2"
    qemu-img create -q -f qcow2 -u -b "$bimg" -F qcow2 "$ov" 1G ||
        case_fail fails "qemu-img create of the overlay failed"
    run_cmd qb timeout -k 5 "$CMD_TIMEOUT" qemu-io -f qcow2 -c 'read 0 512' "$ov"
    qrc=$RC; qerr=$ERR
    run_cmd sb "$BIN/qemu-io" -f qcow2 -c 'read 0 512' "$ov"
    no_crash "qsm as qemu-io"
    [ "$RC" = "$qrc" ] && [ "$RC" != 0 ] || case_fail fails "exit $RC, qemu-io's $qrc"
    [ "$ERR" = "$qerr" ] || case_fail message "'$ERR', qemu-io: '$qerr'"
    contains "$ERR" "Could not open backing file: " || case_fail message "no 'Could not open backing file': $ERR"
    case_end
done

for k in "${!XFAIL[@]}"; do
    if [ -z "${SEEN[${k%%:*}]:-}" ]; then
        echo "FAIL XFAIL entry $k names no manifest row"
        FAILED=$((FAILED + 1))
    fi
done

[ "$XFAILED" -eq 0 ] || echo "$XFAILED known failures (XFAIL)"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ] || { log "rerun with QSM_KEEP=1 to keep $WORK"; exit 1; }
exit 0
