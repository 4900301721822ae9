#!/usr/bin/env bash
# tests/interop/test_lazy.sh: lazy refcounts and the dirty bit, the steps of
# QEMU's iotest 039, with qemu-img and qemu-io as the reference:
#  1. a lazy image written and closed cleanly is not dirty, check is clean;
#  2. killed (qsm io `abort`) after allocating writes it is dirty and
#     qemu-img check sees the lagging refcounts (of data clusters only);
#  3. a read-only open reads the data and leaves the file byte-identical;
#  4. `qsm check -r all` clears the bit; qemu-img check is clean; data intact;
#  5. a read-write open of a dirty image repairs it by itself;
#  6. without lazy refcounts the same kill leaves a clean (at worst leaky) image;
#  7. images qemu-io left dirty are repaired by qsm too.
# Every check is counted (check), so "all N checks" is the number run.
. "$(dirname "$0")/lib.sh"
interop_init

dirty_bit() { python3 -c "import sys; b=open(sys.argv[1],'rb').read(80); print(b[79] & 1)" "$1"; }

# check DESC CMD: one check, counted whether it passes or fails; CMD (a
# shell command, eval'd) failing fails it.  Every check below goes through
# here, so the final count is of checks run, not of failures.
check() {
    CHECKS=$((CHECKS + 1))
    eval "$2" || fail "$1"
}

W="-c 'write -P 0x5a 0 64k' -c 'write -P 0x6b 1M 100000' -c 'write -P 0x7c 512M 4k'"
R="-c 'read -P 0x5a 0 64k' -c 'read -P 0x6b 1M 100000' -c 'read -P 0x7c 512M 4k'"

img=$WORK/lazy.qcow2

# 1. clean close
qsm_create "$img" lazy_refcounts=on
check "1: writes failed" 'eval "\"$QSM\" io -t writethrough $W \"$img\"" >/dev/null'
check "1: dirty bit set after a clean close" '[ "$(dirty_bit "$img")" = 0 ]'
check "1: qemu-img check not clean after a clean close" 'qemu-img check -q "$img"'

# 2. killed after writes
rm -f "$img"; qsm_create "$img" lazy_refcounts=on
# (The last write allocates no L2 table: only data clusters' refcounts are
# lazy, a batch that writes a new L2 table writes the refcounts before it.)
eval "\"$QSM\" io -t writethrough $W -c 'write -P 0x8d 2M 4k' -c abort \"$img\"" >"$WORK/run2" 2>&1; rc=$?
check "2: qsm io exit $rc, expected abort's 134 after the writes" '[ $rc = 134 ] || { show_tail "$WORK/run2"; false; }'
check "2: not every write completed before abort" '[ "$(grep -c "^wrote " "$WORK/run2")" = 4 ]'
check "2: dirty bit not set after abort" '[ "$(dirty_bit "$img")" = 1 ]'
qemu-img check "$img" >"$WORK/check2" 2>&1; rc=$?
check "2: qemu-img check exit $rc, expected 2 (refcounts lag)" '[ $rc = 2 ] || { show_tail "$WORK/check2"; false; }'
check "2: no lagging refcount reported" 'grep -q "refcount=0 reference=1" "$WORK/check2"'
# Data clusters only: the L2 tables' refcounts were eager (as QEMU's).
qemu-img map -f qcow2 --output=json "$img" >"$WORK/map2" 2>&1
check "2: a lagging refcount is not a guest data cluster's (metadata must be eager)" \
    'python3 - "$WORK/check2" "$WORK/map2" <<"EOF"
import json, re, sys
lag = [int(c) for c in re.findall(r"^ERROR cluster (\d+) refcount=0 reference=1$",
                                  open(sys.argv[1]).read(), re.M)]
data = set()
for e in json.load(open(sys.argv[2])):
    if e.get("data") and "offset" in e:
        data.update(range(e["offset"] >> 16, (e["offset"] + e["length"] + 65535) >> 16))
bad = [c for c in lag if c not in data]
if bad or not lag:
    print("    | lagging clusters", lag, "not guest data:", bad)
sys.exit(1 if bad or not lag else 0)
EOF'

# 3. read-only open: data readable, file untouched
sum=$(sha256sum < "$img")
check "3: read-only reads failed" 'eval "\"$QSM\" io -r $R \"$img\"" >"$WORK/ro" 2>&1 || { show_tail "$WORK/ro"; false; }'
check "3: a read-only open changed the file" '[ "$(sha256sum < "$img")" = "$sum" ]'
check "3: qemu-io cannot read the dirty image" 'qemu-io -r -c "read -P 0x5a 0 64k" "$img" >/dev/null'

# 4. qsm check -r all
cp "$img" "$WORK/dirty.qcow2"
"$QSM" check -r all "$img" >"$WORK/check4" 2>&1; rc=$?
check "4: qsm check -r all exit $rc" '[ $rc = 0 ] || { show_tail "$WORK/check4"; false; }'
check "4: dirty bit still set after repair" '[ "$(dirty_bit "$img")" = 0 ]'
check "4: qemu-img check not clean after qsm check -r all" 'qemu-img check -q "$img"'
check "4: data lost by the repair" 'eval "\"$QSM\" io -r $R \"$img\"" >/dev/null'
check "4: qemu-io reads wrong data after the repair" 'eval "qemu-io -r $R \"$img\"" >/dev/null'

# 5. read-write open repairs by itself
img5=$WORK/dirty.qcow2
check "5: read-write open of a dirty image failed" \
    'eval "\"$QSM\" io $R -c \"write -P 0x11 2M 4k\" -c \"read -P 0x11 2M 4k\" \"$img5\"" >"$WORK/rw5" 2>&1 || { show_tail "$WORK/rw5"; false; }'
check "5: dirty bit still set after a repairing open and clean close" '[ "$(dirty_bit "$img5")" = 0 ]'
check "5: qemu-img check not clean after the repairing open" 'qemu-img check -q "$img5"'

# 6. lazy refcounts off: a kill leaves no dirty bit and no corruption
img6=$WORK/eager.qcow2
qsm_create "$img6" lazy_refcounts=off
eval "\"$QSM\" io -t writethrough $W -c abort \"$img6\"" >"$WORK/run6" 2>&1; rc=$?
check "6: qsm io exit $rc, expected abort's 134 after the writes" '[ $rc = 134 ] && [ "$(grep -c "^wrote " "$WORK/run6")" = 3 ]'
check "6: dirty bit set without lazy refcounts" '[ "$(dirty_bit "$img6")" = 0 ]'
qemu-img check "$img6" >"$WORK/check6" 2>&1; rc=$?
check "6: qemu-img check exit $rc (corruption) without lazy refcounts" \
    '[ $rc = 0 ] || [ $rc = 3 ] || { show_tail "$WORK/check6"; false; }'
check "6: acknowledged writethrough data lost" 'eval "\"$QSM\" io -r $R \"$img6\"" >/dev/null'

# 7. images qemu-io left dirty
img7=$WORK/qemu-dirty.qcow2
qemu_create "$img7" lazy_refcounts=on
eval "qemu-io -t writethrough $W -c 'sigraise 9' \"$img7\"" >/dev/null 2>&1
check "7: qemu-io did not leave the image dirty (test setup)" '[ "$(dirty_bit "$img7")" = 1 ]'
cp "$img7" "$WORK/qemu-dirty2.qcow2"
check "7: qsm io on a qemu-dirty image failed" 'eval "\"$QSM\" io $R \"$img7\"" >"$WORK/rw7" 2>&1 || { show_tail "$WORK/rw7"; false; }'
check "7: qemu-img check not clean after qsm repaired a qemu-dirty image" 'qemu-img check -q "$img7"'
check "7: qsm check -r all on a qemu-dirty image" '"$QSM" check -r all "$WORK/qemu-dirty2.qcow2" >/dev/null 2>&1'
check "7: qemu-img check not clean after qsm check -r all" 'qemu-img check -q "$WORK/qemu-dirty2.qcow2"'
check "7: data lost" 'eval "qemu-io -r $R \"$WORK/qemu-dirty2.qcow2\"" >/dev/null'

interop_finish
