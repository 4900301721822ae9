#!/usr/bin/env bash
# tests/interop/test_snapshot_list.sh: the snapshot table as qemu-img 7.2
# writes and lists it, read by qsm (metadata/snapshot.c, sm/image.c).
#
# Images made by qemu-img (snapshot -c, several, with qemu-io writes between
# them): v3 and v2 (compat=0.10), 512-byte clusters (the table spans
# clusters), long names (255 bytes, as many as make the table larger than the
# first 64 KiB read), a name equal to another snapshot's id, and a copy
# crafted with a VM state (32-bit and 64-bit sizes, a VM clock, no icount:
# qemu-img cannot make one).  For each:
#   `qsm snapshot -l` (and qsm run as qemu-img) prints exactly what
#   `qemu-img snapshot -l` prints; `qsm info` human, json and
#   --backing-chain exactly what `qemu-img info` prints; `qsm check` is clean
#   (every snapshot's tables counted), and the file is unchanged by all of it.
# Messages and exit codes as qemu-img's: a missing file, an image without
# snapshots (nothing printed, exit 0), two actions ("Cannot mix").  -c/-a/-d
# are test_snapshot_ops.sh's.
# Malformed tables, each rule broken on its own on a copy (python3 patches):
#   refused by `qsm info`, `qsm snapshot -l` and a read-write open
#   (`qsm io`), non-zero exit, the field named in stderr, file unchanged
#   (cmp); qemu-img info refuses the ones QEMU refuses too, and qsm check
#   reports the per-entry ones exactly as qemu-img check does (same output,
#   same exit code).
#   A v3 entry without disk_size: opened and listed (as QEMU does), and qsm
#   check's output is qemu-img check's ("ERROR snapshot table entry N is
#   incomplete"; qsm check -r all repairs it as qemu-img does: test_snapshot_check.sh).
# Output: PASS/FAIL per case, then the check count.

source "$(dirname "$0")/lib.sh"
interop_init
export TZ=${TZ:-UTC}

PATCH="$WORK/patch.py"
cat >"$PATCH" <<'PY'
# patch.py IMG CMD...: change one field of the snapshot table in place.
#   entry I FIELD VALUE   FIELD: l1_offset l1_size id_size name_size vm32
#                         extra vmclock vm64 icount (VALUE: python int expr)
#   header nb VALUE       nb_snapshots;  header offset VALUE: snapshots_offset
#   shrink_extra I N      entry I's extra data cut to N bytes (id and name
#                         moved down; I must be the last entry)
#   big NB                a new table of NB entries (id and name 65535 bytes
#                         each, zeros) placed after the end of the file
#   vmstate               entry 0: vm state 12345678 (32 and 64 bit), clock
#                         3723.456789 s, icount absent (-1); entry 1: 5 GiB
#                         (64-bit only), clock 100 h
import struct, sys, os
img = sys.argv[1]; cmd = sys.argv[2:]
f = open(img, 'r+b')
def rd(off, n): f.seek(off); return f.read(n)
def wr(off, b): f.seek(off); f.write(b)
cb = struct.unpack('>I', rd(20, 4))[0]; cs = 1 << cb
nb, soff = struct.unpack('>IQ', rd(60, 12))
def entries():
    out, o = [], soff
    for i in range(nb):
        o = (o + 7) & ~7
        h = rd(o, 40)
        idl, nml = struct.unpack('>HH', h[12:16]); ex = struct.unpack('>I', h[36:40])[0]
        out.append((o, ex, idl, nml)); o += 40 + ex + idl + nml
    return out
FIELDS = { 'l1_offset': (0, 'Q'), 'l1_size': (8, 'I'), 'id_size': (12, 'H'),
           'name_size': (14, 'H'), 'vmclock': (24, 'Q'), 'vm32': (32, 'I'),
           'extra': (36, 'I'), 'vm64': (40, 'Q'), 'icount': (56, 'Q') }
def setf(i, name, v):
    o = entries()[i][0]; off, t = FIELDS[name]
    wr(o + off, struct.pack('>' + t, v & ((1 << (8 * struct.calcsize(t))) - 1)))
if cmd[0] == 'entry':
    setf(int(cmd[1]), cmd[2], int(eval(cmd[3])))
elif cmd[0] == 'header':
    v = int(eval(cmd[2]))
    if cmd[1] == 'nb': wr(60, struct.pack('>I', v))
    else: wr(64, struct.pack('>Q', v))
elif cmd[0] == 'shrink_extra':
    i, n = int(cmd[1]), int(cmd[2]); o, ex, idl, nml = entries()[i]
    assert i == nb - 1
    tail = rd(o + 40 + ex, idl + nml)
    wr(o + 36, struct.pack('>I', n)); wr(o + 40 + n, tail)
    f.truncate(max(os.fstat(f.fileno()).st_size, o + 40 + n + idl + nml))
elif cmd[0] == 'big':
    n = int(cmd[1]); size = os.fstat(f.fileno()).st_size
    base = (size + cs - 1) // cs * cs; o = base
    for i in range(n):
        o = (o + 7) & ~7
        wr(o, struct.pack('>QIHHIIQII', 0, 0, 65535, 65535, 0, 0, 0, 0, 24))
        o += 40 + 24 + 2 * 65535
    f.truncate(o)
    wr(60, struct.pack('>IQ', n, base))
elif cmd[0] == 'vmstate':
    setf(0, 'vm32', 12345678); setf(0, 'vm64', 12345678)
    setf(0, 'vmclock', 3723456789000); setf(0, 'icount', -1)
    setf(1, 'vm32', 0); setf(1, 'vm64', 5 << 30); setf(1, 'vmclock', 360000 * 10**9)
else:
    raise SystemExit('unknown command ' + cmd[0])
PY

BIN="$WORK/bin"
mkdir -p "$BIN"
ln -s "$QSM" "$BIN/qemu-img"
pass() { printf '[%s] PASS %s\n' "$TEST_NAME" "$*"; }

# same TAG CMD...: qemu-img's and qsm's stdout, stderr (qsm's "qsm CMD:"
# prefix and help hint read as qemu-img's) and exit code identical, and
# qsm run as qemu-img byte for byte qemu-img (AS_QEMU_ONLY=1: only that).
same() {
    local tag=$1; shift
    (cd "$WORK" && qemu-img "$@" >q.out 2>q.err; echo $? >q.rc)
    if [ -z "${AS_QEMU_ONLY:-}" ]; then
    CHECKS=$((CHECKS + 1))
    (cd "$WORK" && "$QSM" "$@" >s.out 2>s.err; echo $? >s.rc)
    sed -i -e 's/^qsm [a-z]*: /qemu-img: /' -e "s/Try 'qsm [a-z]* --help'/Try 'qemu-img --help'/" "$WORK/s.err"
    if cmp -s "$WORK/q.out" "$WORK/s.out" && cmp -s "$WORK/q.err" "$WORK/s.err" &&
       cmp -s "$WORK/q.rc" "$WORK/s.rc"; then
        pass "$tag"
    else
        fail "$tag: qemu-img $* and qsm differ (exit $(cat "$WORK/q.rc") vs $(cat "$WORK/s.rc"))"
        diff "$WORK/q.out" "$WORK/s.out" | head -n 10 | sed 's/^/    | /'
        diff "$WORK/q.err" "$WORK/s.err" | head -n 6 | sed 's/^/    | /'
    fi
    fi
    # and qsm under qemu-img's name: every byte the same, prefixes included
    CHECKS=$((CHECKS + 1))
    (cd "$WORK" && PATH="$BIN:$PATH" qemu-img "$@" >m.out 2>m.err; echo $? >m.rc)
    (cd "$WORK" && qemu-img "$@" >q.out 2>q.err)
    if cmp -s "$WORK/q.out" "$WORK/m.out" && cmp -s "$WORK/q.err" "$WORK/m.err" &&
       cmp -s "$WORK/q.rc" "$WORK/m.rc"; then
        pass "$tag (as qemu-img)"
    else
        fail "$tag: qemu-img $* and qsm as qemu-img differ"
        diff "$WORK/q.out" "$WORK/m.out" | head -n 10 | sed 's/^/    | /'
        diff "$WORK/q.err" "$WORK/m.err" | head -n 6 | sed 's/^/    | /'
    fi
}

# listing IMG: every listing of IMG identical to qemu-img's, qsm check clean,
# the file unchanged.
listing() {
    local img=$1 name
    name=$(basename "$img")
    cp "$img" "$WORK/orig.qcow2"
    same "$name snapshot -l" snapshot -l "$name"
    same "$name snapshot -l -U -q" snapshot -l -U -q "$name"
    same "$name info" info "$name"
    same "$name info json" info --output=json "$name"
    same "$name info chain json" info --backing-chain --output=json "$name"
    CHECKS=$((CHECKS + 1))
    if "$QSM" check "$img" >"$WORK/c.out" 2>&1; then
        pass "$name check clean"
    else
        fail "$name: qsm check is not clean"
        show_tail "$WORK/c.out"
    fi
    CHECKS=$((CHECKS + 1))
    if cmp -s "$img" "$WORK/orig.qcow2"; then pass "$name unchanged"; else fail "$name changed"; fi
}

snap() { qemu-img snapshot -c "$2" "$1" || die "qemu-img snapshot -c $2 $1 failed"; }
wr() { qemu-io -f qcow2 -c "write -P $2 $3 $4" "$1" >/dev/null || die "qemu-io write on $1 failed"; }

# --- images qemu-img made ------------------------------------------------
cd "$WORK" || die "cd $WORK"
qemu_create v3.qcow2 compat=1.1 64M || die "qemu-img create failed"
wr v3.qcow2 1 0 64k
snap v3.qcow2 first
wr v3.qcow2 2 64k 128k
snap v3.qcow2 "a longer name with spaces, punctuation (and more) - to overflow the TAG column"
wr v3.qcow2 3 0 4k
snap v3.qcow2 1          # a name that is another snapshot's id
snap v3.qcow2 "$(printf 'n%.0s' $(seq 255))"
qemu_create v2.qcow2 compat=0.10 16M || die "qemu-img create failed"
wr v2.qcow2 5 1M 64k
snap v2.qcow2 old-one
wr v2.qcow2 6 1M 4k
snap v2.qcow2 old-two
qemu_create c512.qcow2 compat=1.1,cluster_size=512 4M || die "qemu-img create failed"
for i in $(seq 1 12); do
    wr c512.qcow2 "$i" $((i * 4096)) 512
    snap c512.qcow2 "snapshot-number-$i-with-a-name-long-enough-to-need-several-clusters"
done
qemu-img create -q -f qcow2 -b v3.qcow2 -F qcow2 overlay.qcow2 || die "overlay"
snap overlay.qcow2 over
# a table over 64 KiB: 260 names of 255 bytes (the open reads it in rounds)
qemu_create many.qcow2 compat=1.1 1M || die "qemu-img create failed"
for i in $(seq 1 260); do
    snap many.qcow2 "$(printf '%03d' "$i")$(printf 'x%.0s' $(seq 252))"
done
python3 - many.qcow2 <<'PY' || die "many.qcow2: table under 64 KiB"
import struct, sys
d = open(sys.argv[1], 'rb').read()
nb, o0 = struct.unpack('>IQ', d[60:72]); o = o0
for i in range(nb):
    o = (o + 7) & ~7
    idl, nml = struct.unpack('>HH', d[o + 12:o + 16]); ex = struct.unpack('>I', d[o + 36:o + 40])[0]
    o += 40 + ex + idl + nml
assert o - o0 > 65536, o - o0
PY
cp v3.qcow2 vmstate.qcow2
python3 "$PATCH" vmstate.qcow2 vmstate || die "patch vmstate"

for img in v3 v2 c512 overlay many vmstate; do
    listing "$WORK/$img.qcow2"
done

# --- messages and exit codes ---------------------------------------------
qemu_create none.qcow2 compat=1.1 1M || die "qemu-img create failed"
same "no snapshots" snapshot -l none.qcow2
same "missing file" snapshot -l missing.qcow2
same "no action" snapshot v3.qcow2
same "two actions" snapshot -l -c x v3.qcow2
same "-l twice" snapshot -l -l v3.qcow2
same "no file" snapshot -l
same "two files" snapshot -l v3.qcow2 v2.qcow2
# (as qsm, getopt's own words)
AS_QEMU_ONLY=1 same "unknown option" snapshot -x v3.qcow2
# (-c/-a/-d themselves: test_snapshot_ops.sh)

# --- malformed tables ----------------------------------------------------
# bad NAME FIELD QEMU PATCH...: a copy of v3.qcow2 patched; qsm refuses it
# (info, snapshot -l, a read-write io open) naming FIELD, file unchanged.
# QEMU=refuses: qemu-img info refuses it too; QEMU=check: qemu-img opens it
# and its check reports it, and qsm check must report the same finding
# (exit non-zero, FIELD in its output).
bad() {
    local name=$1 field=$2 qemu=$3 img="$WORK/bad_$1.qcow2" rc out
    shift 3
    cp "$WORK/v3.qcow2" "$img"
    python3 "$PATCH" "$img" "$@" || die "patch $name"
    cp "$img" "$WORK/bad.orig"
    for cmd in info snapshot io; do
        CHECKS=$((CHECKS + 1))
        case $cmd in
        info) out=$("$QSM" info "$img" 2>&1 >/dev/null);;
        snapshot) out=$("$QSM" snapshot -l "$img" 2>&1 >/dev/null);;
        io) out=$("$QSM" io -c "read 0 512" "$img" 2>&1 >/dev/null);;
        esac
        rc=$?
        if [ $rc -ne 0 ] && [ $rc -lt 128 ] && printf '%s' "$out" | grep -q -- "$field" &&
           cmp -s "$img" "$WORK/bad.orig"; then
            pass "$name: qsm $cmd refused"
        else
            fail "$name: qsm $cmd: exit $rc, wanted '$field' in: $out"
        fi
    done
    if [ "$qemu" = refuses ]; then
        CHECKS=$((CHECKS + 1))
        if ! qemu-img info "$img" >/dev/null 2>&1; then pass "$name: qemu-img refuses too"
        else fail "$name: qemu-img info opens it"; fi
    else
        CHECKS=$((CHECKS + 1))
        qemu-img check "$img" >"$WORK/qc.out" 2>&1
        local qrc=$?
        "$QSM" check "$img" >"$WORK/sc.out" 2>&1
        rc=$?
        if [ $qrc -ne 0 ] && [ $rc -eq $qrc ] && grep -q -- "$qemu" "$WORK/sc.out" &&
           cmp -s "$WORK/qc.out" "$WORK/sc.out" && cmp -s "$img" "$WORK/bad.orig"; then
            pass "$name: qsm check reports it as qemu-img check ($qemu)"
        else
            fail "$name: check: qemu-img exit $qrc, qsm exit $rc, wanted '$qemu'"
            diff "$WORK/qc.out" "$WORK/sc.out" | head -n 8 | sed 's/^/    | /'
        fi
    fi
}

fsize=$(stat -c %s v3.qcow2)
bad extra_too_large "extra_data_size 1025" refuses entry 1 extra 1025
bad table_too_big "Snapshot table is too big" refuses big 520
bad too_many "Snapshot table too large" refuses header nb 65537
bad l1_unaligned "l1_table_offset 0x60200 is not cluster aligned" "l1_offset=0x60200" \
    entry 0 l1_offset 0x60200
bad l1_size_too_large "l1_size 4194305 is too large" "l1_size=0x400001" \
    entry 2 l1_size 0x400001
# the table's bytes reach past QEMU's BDRV_MAX_LENGTH (2^63 - 1 GiB): the
# header check lets the offset by, the read fails
bad offset_huge "Failed to read snapshot table: Input/output error" refuses \
    header offset "(1 << 63) - 65536"
# an L1 table at offset 0 (the header, read as L1 entries by QEMU's check)
bad l1_at_zero "l1_table_offset 0, l1_size 1) is not inside the file" \
    "ERROR cluster 0 refcount=1 reference=2" entry 0 l1_offset 0
bad l1_past_eof "l1_table_offset 0x$(printf '%x' $(( (fsize / 65536 + 4) * 65536 )))" \
    "exceeding the end of the file" \
    entry 1 l1_offset "$(( (fsize / 65536 + 4) * 65536 ))"

# A v3 entry without disk_size: QEMU opens the image, its check reports it.
img="$WORK/incomplete.qcow2"
cp v3.qcow2 "$img"
python3 "$PATCH" "$img" shrink_extra 3 8 || die "patch shrink_extra"
cp "$img" bad.orig
same "incomplete entry: snapshot -l" snapshot -l incomplete.qcow2
same "incomplete entry: info json" info --output=json incomplete.qcow2
CHECKS=$((CHECKS + 1))
qemu-img check "$img" >qc.out 2>&1; qrc=$?
"$QSM" check "$img" >sc.out 2>&1; rc=$?
if [ $rc -eq $qrc ] && grep -q "ERROR snapshot table entry 3 is incomplete" sc.out &&
   cmp -s qc.out sc.out && cmp -s "$img" bad.orig; then
    pass "incomplete entry: qsm check reports it (exit $rc, as qemu-img)"
else
    fail "incomplete entry: check exit qemu-img $qrc, qsm $rc"
    show_tail sc.out 5
fi

interop_finish
