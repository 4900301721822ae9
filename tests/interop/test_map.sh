#!/usr/bin/env bash
# `qsm map` against `qemu-img map` 7.2 (#5): on the images of
# tools_fixtures.sh (data, plain and allocated zero clusters, compressed
# clusters, unallocated ranges, clusters that are holes in the file,
# backing-filled ranges of chains of depth 1 to 3 over a raw base shorter
# than the top, raw files), `--output=json` must be byte-identical, and so
# must the human format with its exit status (an error for compressed
# clusters); also with --start-offset/--max-length, and for images qsm
# wrote itself (qsm io on a copy of each qcow2 fixture).
. "$(dirname "$0")/lib.sh"
. "$INTEROP_DIR/tools_fixtures.sh"
interop_init

make_fixtures "$WORK"
cd "$WORK" || die "cd $WORK"

# same_output TAG CMD-ARGS...: qemu-img map and qsm map, same stdout and status
same_output() {
    local tag=$1 a b ra rb
    shift
    CHECKS=$((CHECKS + 1))
    a=$(qemu-img map "$@" 2>/dev/null); ra=$?
    b=$("$QSM" map "$@" 2>/dev/null); rb=$?
    if [ "$ra" != "$rb" ] || [ "$a" != "$b" ]; then
        fail "$tag: qsm map $* differs from qemu-img map (exit $rb vs $ra):"
        diff <(printf '%s\n' "$a") <(printf '%s\n' "$b") | head -n 20 | sed 's/^/    | /'
        return 1
    fi
    return 0
}

for f in $FIXTURES; do
    img=${f%%:*}
    fmt=${f##*:}
    same_output "$img json" -f "$fmt" --output=json "$img"
    same_output "$img human" -f "$fmt" --output=human "$img"
done
same_output "range" -f qcow2 --output=json --start-offset=1000k --max-length=3M data.qcow2
same_output "range chain" -f qcow2 --start-offset=2M --max-length=4100k chain3.qcow2
same_output "max-length 0" -f qcow2 --output=json --max-length=0 data.qcow2

# The chain named from another directory: file names as QEMU combines them.
mkdir -p sub
CHECKS=$((CHECKS + 1))
a=$(cd sub && qemu-img map -f qcow2 ../chain2.qcow2 2>&1)
b=$(cd sub && "$QSM" map -f qcow2 ../chain2.qcow2 2>&1)
[ "$a" = "$b" ] || fail "map from a subdirectory: qsm '$b', qemu-img '$a'"

# Images qsm wrote: the same workload by qemu-io and by qsm io on two
# copies of each qcow2 fixture.  qsm map must print what qemu-img map prints
# for qsm's copy, and the two copies must map the same guest ranges the same
# way; host offsets depend on each engine's allocation order, so that
# comparison drops them and merges the entries that then agree.
strip_offsets() {
    python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    e.pop("offset", None)
    if out and all(out[-1][k] == e[k] for k in ("depth", "present", "zero", "data")):
        out[-1]["length"] += e["length"]
    else:
        out.append(e)
for e in out:
    print(e)'
}
cat >w.cmds <<'CMDS'
write -P 90 64k 64k
write -z 1M 128k
write -P 91 2040k 16k
write -z -u 2M 64k
CMDS
for f in data.qcow2 small.qcow2 v2.qcow2 chain2.qcow2 chain3.qcow2; do
    cp "$f" "q-$f"; cp "$f" "s-$f"
    # the copies keep their backing file names (same directory)
    qemu-io -f qcow2 "q-$f" <w.cmds >/dev/null || die "qemu-io on q-$f failed"
    "$QSM" io -f qcow2 "s-$f" <w.cmds >/dev/null || { fail "qsm io on s-$f failed"; continue; }
    CHECKS=$((CHECKS + 1))
    a=$(qemu-img map --output=json "q-$f" | strip_offsets)
    b=$("$QSM" map --output=json "s-$f" | strip_offsets)
    [ "$a" = "$b" ] || { fail "map of qsm-written s-$f differs from qemu's q-$f:";
        diff <(printf '%s\n' "$a") <(printf '%s\n' "$b") | head -n 10 | sed 's/^/    | /'; }
    same_output "qsm-written s-$f" --output=json "s-$f"
done

# Bad input: clear errors, exit 1.
CHECKS=$((CHECKS + 1))
out=$("$QSM" map -f qcow2 base.raw 2>&1) && fail "qsm map -f qcow2 of a raw file succeeded"
CHECKS=$((CHECKS + 1))
out=$("$QSM" map --output=xml data.qcow2 2>&1); rc=$?
[ $rc = 1 ] && printf '%s' "$out" | grep -q 'human or json' || fail "map --output=xml: exit $rc, '$out'"
CHECKS=$((CHECKS + 1))
out=$("$QSM" map nonexist.qcow2 2>&1); rc=$?
[ $rc = 1 ] && [ "$out" = "qsm map: Could not open 'nonexist.qcow2': Could not open 'nonexist.qcow2': No such file or directory" ] ||
    fail "map of a missing file: exit $rc, '$out'"

interop_finish
