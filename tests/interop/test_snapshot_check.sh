#!/usr/bin/env bash
# tests/interop/test_snapshot_check.sh: `qsm check` on images whose snapshot
# table, or what their snapshots share, is damaged, side by side with
# `qemu-img check` 7.2 (issue 15: "counts snapshot references and the COPIED
# rules as qemu-img check does, and repairs them with -r all").
#
# Images qemu-img made (v3 with three snapshots and writes between them, v2
# with two), damaged by snapcheck_images.py (one KIND each: incomplete
# entries, extra data over 1024 bytes, more than 65536 entries, a table over
# 64 MiB, unaligned or oversized snapshot L1 tables, refcounts and COPIED
# flags of shared clusters, a table the header forgot).  For each KIND and
# each of `check`, `check -r leaks`, `check -r all`, `check --output=json`,
# on two copies (same file name, two directories):
#   stdout, stderr (qsm's "qsm check: " read as "qemu-img: ") and the exit
#   code are qemu-img's, byte for byte;
# and after a repair (-r leaks, -r all) of the two copies:
#   qemu-img compare calls them identical (the guest disk), their
#   `qemu-img snapshot -l` listings are identical, and a second
#   `qemu-img check` prints the same for both and exits the same way.
# The repair the brief names: a v3 entry without disk_size is rewritten
# (disk size filled in), extra data over 1024 bytes is cut, overhanging
# snapshots are dropped, all as qemu-img check -r all does.
# One deliberate difference: a table sharing a cluster with the active disk
# (shared_*, side_shared): after the rewrite frees the old table, qsm's -r
# all sets the COPIED flag qemu-img's leaves wrong (found by fuzz_open: a
# repair must leave nothing a second check finds).
# qsm run as qemu-img (a symlink) prints the same bytes, prefixes included.
# A dirty image opened read-write (the open-time repair, as QEMU's open):
# a table the open refuses refuses it before any repair, an incomplete entry
# is rewritten; qemu-io and qsm io side by side.
# Output: PASS/FAIL per comparison, then the check count.
source "$(dirname "$0")/lib.sh"
interop_init
export TZ=${TZ:-UTC}

DAMAGE="$(cd "$(dirname "$0")" && pwd)/snapcheck_images.py"
[ -r "$DAMAGE" ] || die "missing $DAMAGE"
pass() { printf '[%s] PASS %s\n' "$TEST_NAME" "$*"; }
BIN="$WORK/bin"
mkdir -p "$BIN" && ln -s "$QSM" "$BIN/qemu-img" || die "bin"

cd "$WORK" || die "cd $WORK"
wr() { qemu-io -f qcow2 -c "write -P $2 $3 $4" "$1" >/dev/null || die "qemu-io write on $1"; }
snap() { qemu-img snapshot -c "$2" "$1" || die "qemu-img snapshot -c $2 $1"; }

qemu_create v3.qcow2 compat=1.1 64M || die "create v3"
wr v3.qcow2 1 0 256k
wr v3.qcow2 2 10M 64k
snap v3.qcow2 first
wr v3.qcow2 3 0 64k
wr v3.qcow2 4 40M 64k
snap v3.qcow2 second
wr v3.qcow2 5 64k 64k
snap v3.qcow2 third
wr v3.qcow2 6 128k 4k
qemu_create v2.qcow2 compat=0.10 64M || die "create v2"
wr v2.qcow2 1 0 256k
snap v2.qcow2 a
wr v2.qcow2 3 0 64k
snap v2.qcow2 b
wr v2.qcow2 7 64k 4k
check_clean "base v3" v3.qcow2
check_clean "base v2" v2.qcow2

# side BASE KIND MODE...: the comparison above for one image and mode
side() {
    local base=$1 kind=$2 tag rq rs rm_
    shift 2
    tag="$base/$kind check $*"
    rm -rf q s m && mkdir q s m || die "mkdir"
    if [ ! -e "d_${base}_$kind.qcow2" ]; then
        cp "$base.qcow2" "d_${base}_$kind.qcow2"
        python3 "$DAMAGE" "d_${base}_$kind.qcow2" "$kind" || die "snapcheck_images.py $base $kind"
    fi
    cp --sparse=always "d_${base}_$kind.qcow2" q/img.qcow2
    cp --sparse=always "d_${base}_$kind.qcow2" s/img.qcow2
    cp --sparse=always "d_${base}_$kind.qcow2" m/img.qcow2
    (cd q && timeout "$TIMEOUT" qemu-img check "$@" img.qcow2 >../q.out 2>../q.err); rq=$?
    (cd s && timeout "$TIMEOUT" "$QSM" check "$@" img.qcow2 >../s.out 2>../s.err); rs=$?
    sed -i -e 's/^qsm [a-z]*: /qemu-img: /' s.err
    # and qsm under qemu-img's name: every byte the same, prefixes included
    (cd m && PATH="$BIN:$PATH" timeout "$TIMEOUT" qemu-img check "$@" img.qcow2 >../m.out 2>../m.err); rm_=$?
    CHECKS=$((CHECKS + 1))
    if [ "$rm_" = "$rq" ] && cmp -s q.out m.out && cmp -s q.err m.err; then
        pass "$tag: qsm as qemu-img: same bytes"
    else
        fail "$tag: qsm as qemu-img differs"
        diff q.err m.err | head -n 6 | sed 's/^/    | err /'
    fi
    CHECKS=$((CHECKS + 1))
    if [ "$rq" = "$rs" ] && cmp -s q.out s.out && cmp -s q.err s.err; then
        pass "$tag: same output, exit $rq"
    else
        fail "$tag: qemu-img exit $rq, qsm exit $rs"
        diff q.out s.out | head -n 12 | sed 's/^/    | out /'
        diff q.err s.err | head -n 12 | sed 's/^/    | err /'
    fi
    case " $* " in *" -r "*) ;; *) return 0;; esac
    if ! qemu-img info q/img.qcow2 >/dev/null 2>&1; then
        # qemu-img's repair refused too (a table only -r all repairs): qsm's
        # must not have written either
        CHECKS=$((CHECKS + 1))
        if cmp -s s/img.qcow2 "d_${base}_$kind.qcow2"; then
            pass "$tag: not repaired, unchanged (as qemu-img)"
        else
            fail "$tag: qemu-img left it unrepaired, qsm changed it"
        fi
        return 0
    fi
    CHECKS=$((CHECKS + 1))
    if qemu-img compare -q -f qcow2 -F qcow2 q/img.qcow2 s/img.qcow2 2>/dev/null; then
        pass "$tag: repaired disks identical"
    else
        fail "$tag: qemu-img compare: the repaired disks differ"
    fi
    (cd q && qemu-img snapshot -l img.qcow2 >../ql.out 2>&1)
    (cd s && qemu-img snapshot -l img.qcow2 >../sl.out 2>&1)
    CHECKS=$((CHECKS + 1))
    if cmp -s ql.out sl.out; then
        pass "$tag: repaired snapshot lists identical"
    else
        fail "$tag: snapshot -l of the repaired images differ"
        diff ql.out sl.out | head -n 8 | sed 's/^/    | /'
    fi
    (cd q && qemu-img check img.qcow2 >../qa.out 2>&1); rq=$?
    (cd s && qemu-img check img.qcow2 >../sa.out 2>&1); rs=$?
    CHECKS=$((CHECKS + 1))
    if [ "$rq" = "$rs" ] && cmp -s qa.out sa.out; then
        pass "$tag: qemu-img check after the repair: same, exit $rq"
    else
        fail "$tag: qemu-img check after the repair: exit $rq (qemu-img's repair), $rs (qsm's)"
        diff qa.out sa.out | head -n 8 | sed 's/^/    | /'
    fi
}

# side_shared BASE KIND: -r all of an image whose snapshot table shares its
# first cluster with a data cluster of the active disk, and whose table only
# a rewrite repairs (snapcheck_images.py shared_*).  The rewrite frees the
# old table's clusters, so that cluster is then referenced once and its
# COPIED flag must be set.  qemu-img 7.2 judges COPIED before the rewrite
# and leaves the flag clear (its second check finds it, exit 2); qsm judges
# it after (metadata/check.c) and leaves nothing: the same messages with
# that one finding "Repairing" instead of "ERROR", exit 0, a clean second
# check, the same guest disk and snapshots as qemu-img's repair.
side_shared() {
    local base=$1 kind=$2 tag="$1/$2 check -r all" rq rs cp_line
    rm -rf q s && mkdir q s || die "mkdir"
    cp "$base.qcow2" "d_${base}_$kind.qcow2"
    python3 "$DAMAGE" "d_${base}_$kind.qcow2" "$kind" || die "snapcheck_images.py $base $kind"
    cp "d_${base}_$kind.qcow2" q/img.qcow2
    cp "d_${base}_$kind.qcow2" s/img.qcow2
    (cd q && timeout "$TIMEOUT" qemu-img check -r all img.qcow2 >../q.out 2>../q.err); rq=$?
    (cd s && timeout "$TIMEOUT" "$QSM" check -r all img.qcow2 >../s.out 2>../s.err); rs=$?
    cp_line=$(tail -n 1 q.err)
    CHECKS=$((CHECKS + 1))
    case "$rq $cp_line" in
    "2 ERROR OFLAG_COPIED data cluster: l2_entry="*" refcount=1")
        pass "$tag: qemu-img's repair leaves the COPIED flag: $cp_line";;
    *)
        fail "$tag: qemu-img exit $rq, last finding '$cp_line' (the case no longer shows what it is for)"
        return;;
    esac
    CHECKS=$((CHECKS + 1))
    if [ "$rs" = 0 ] && sed '$ s/^ERROR OFLAG_COPIED/Repairing OFLAG_COPIED/' q.err | cmp -s - s.err &&
       grep -q '^No errors were found on the image.$' s.out; then
        pass "$tag: qsm repairs the flag too, exit 0"
    else
        fail "$tag: qsm exit $rs"
        diff q.err s.err | head -n 8 | sed 's/^/    | err /'
        head -n 12 s.out | sed 's/^/    | out /'
    fi
    (cd s && qemu-img check img.qcow2 >../sa.out 2>&1); rs=$?
    CHECKS=$((CHECKS + 1))
    if [ "$rs" = 0 ]; then
        pass "$tag: qemu-img check of qsm's repair: clean"
    else
        fail "$tag: qemu-img check of qsm's repair: exit $rs"
        sed 's/^/    | /' sa.out | head -n 8
    fi
    CHECKS=$((CHECKS + 1))
    if qemu-img compare -q -f qcow2 -F qcow2 q/img.qcow2 s/img.qcow2 2>/dev/null &&
       diff <(cd q && qemu-img snapshot -l img.qcow2 2>&1) <(cd s && qemu-img snapshot -l img.qcow2 2>&1) >/dev/null; then
        pass "$tag: repaired disks and snapshot lists identical"
    else
        fail "$tag: the repaired disks or snapshot lists differ"
    fi
}

# (qemu-img needs some 15 s per check of a 65536-entry table: too_many* run
# fewer modes)
V3_KINDS="incomplete0 incomplete8 incomplete_mid incomplete_all extra_big extra_big2
extra_max extra_big_incomplete too_big too_big_extra l1_unaligned
l1_too_large l1_unaligned_incomplete leak_sn_l1 low_shared copied_shared copied_sn_l1
sn_l2_zero nb_zero_table offset_unaligned offset_huge"
V2_KINDS="incomplete0 incomplete_all extra_big l1_unaligned low_shared copied_shared
nb_zero_table"

for k in $V3_KINDS; do
    log "v3 $k"
    side v3 "$k"
    side v3 "$k" -r leaks
    side v3 "$k" -r all
done
# Below full scale (the sanitizer pass) only the repair of the too-long
# table: the read-only and -r leaks modes parse it the same way.
if [ "$(scaled 100)" -ge 100 ]; then
    log "v3 too_many, too_many_by3"
    side v3 too_many
    side v3 too_many -r all
    side v3 too_many_by3 -r leaks
else
    log "v3 too_many (-r all only at scale $SCALE)"
    side v3 too_many -r all
fi

for k in $V2_KINDS; do
    log "v2 $k"
    side v2 "$k"
    side v2 "$k" -r all
done
# a table sharing a cluster with the active disk: check and -r leaks as
# qemu-img, -r all repairs what qemu-img's leaves
for bk in v3:shared_incomplete v3:shared_extra_big v2:shared_extra_big; do
    log "${bk%%:*} ${bk#*:}"
    side "${bk%%:*}" "${bk#*:}"
    side "${bk%%:*}" "${bk#*:}" -r leaks
    side_shared "${bk%%:*}" "${bk#*:}"
done
# JSON reports (the counts qemu-img's ImageCheck carries), one per finding class
for k in incomplete0 extra_big too_big l1_unaligned nb_zero_table; do
    side v3 "$k" --output=json
    side v3 "$k" --output=json -r all
done
# -q: only the messages on stderr, the exit code
side v3 incomplete_all -q -r all
side v3 extra_big -q

# A dirty image (lazy refcounts) is repaired when it is opened read-write,
# as QEMU's open does it: a table the open refuses refuses the open before
# any repair (nothing written, no snapshot dropped); an incomplete entry is
# rewritten by that repair (and, unlike QEMU's, COPIED judged after it:
# shared_incomplete).  qemu-io and qsm io (the same write) side by side.
dirty_open() {
    local kind=$1 rq rs
    rm -rf q s && mkdir q s || die "mkdir"
    cp v3.qcow2 q/img.qcow2
    python3 "$DAMAGE" q/img.qcow2 "$kind" || die "snapcheck_images.py $kind"
    python3 - q/img.qcow2 <<'PY' || die "dirty bit"
import struct, sys
f = open(sys.argv[1], 'r+b')
for off in (72, 80):                # incompatible: dirty; compatible: lazy refcounts
    f.seek(off); v = struct.unpack('>Q', f.read(8))[0]
    f.seek(off); f.write(struct.pack('>Q', v | 1))
PY
    cp q/img.qcow2 orig.qcow2
    cp q/img.qcow2 s/img.qcow2
    (cd q && timeout "$TIMEOUT" qemu-io -f qcow2 -c "write -P 9 0 4k" img.qcow2 >/dev/null 2>&1); rq=$?
    (cd s && timeout "$TIMEOUT" "$QSM" io -f qcow2 -c "write -P 9 0 4k" img.qcow2 >/dev/null 2>&1); rs=$?
    CHECKS=$((CHECKS + 1))
    if [ "$kind" = l1_unaligned ]; then
        # QEMU opens it (its repair frees what the snapshot held); qsm's open
        # refuses a snapshot L1 table it cannot read, before the repair
        if [ "$rq" = 0 ] && [ "$rs" != 0 ] && cmp -s s/img.qcow2 orig.qcow2; then
            pass "dirty $kind: qsm refuses it (qemu-io opens it), nothing written"
        else
            fail "dirty $kind: qemu-io exit $rq, qsm io exit $rs, or qsm changed it"
        fi
        return
    fi
    if [ "$rq" != "$rs" ]; then
        fail "dirty $kind: qemu-io exit $rq, qsm io exit $rs"
        return
    fi
    case $kind in shared_*)
        # as side_shared: QEMU's open-time repair leaves the COPIED flag of
        # the cluster the old table shared clear, qsm's sets it
        if [ "$rq" = 0 ] && qemu-img compare -q -f qcow2 -F qcow2 q/img.qcow2 s/img.qcow2 &&
           diff <(cd q && qemu-img snapshot -l img.qcow2) <(cd s && qemu-img snapshot -l img.qcow2) >/dev/null &&
           (cd s && qemu-img check img.qcow2 >/dev/null 2>&1) &&
           (cd q && qemu-img check img.qcow2 2>&1) | grep -q '^ERROR OFLAG_COPIED data cluster'; then
            pass "dirty $kind: repaired at open and written: the same disk and snapshots as qemu-io's, the COPIED flag qemu-io's leaves repaired"
        else
            fail "dirty $kind: qemu-io exit $rq; the disks, snapshots or checks are not as expected"
            (cd s && qemu-img check img.qcow2 2>&1) | head -n 6 | sed 's/^/    | qsm /'
        fi
        return;;
    esac
    if [ "$rq" != 0 ]; then
        if cmp -s s/img.qcow2 orig.qcow2 && cmp -s q/img.qcow2 orig.qcow2; then
            pass "dirty $kind: the open refused (exit $rq), nothing written (as qemu-io)"
        else
            fail "dirty $kind: the refused open changed the image"
        fi
        return
    fi
    if qemu-img compare -q -f qcow2 -F qcow2 q/img.qcow2 s/img.qcow2 &&
       diff <(cd q && qemu-img snapshot -l img.qcow2) <(cd s && qemu-img snapshot -l img.qcow2) >/dev/null &&
       diff <(cd q && qemu-img check img.qcow2 2>&1) <(cd s && qemu-img check img.qcow2 2>&1) >/dev/null; then
        pass "dirty $kind: repaired at open and written: the same disk, snapshots and check as qemu-io's"
    else
        fail "dirty $kind: after the open-time repair and the write, qsm's image differs from qemu-io's"
    fi
}
for k in incomplete0 incomplete_all extra_big extra_big_incomplete too_big l1_unaligned \
         shared_incomplete; do
    dirty_open "$k"
done

interop_finish
