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
. "$(dirname "$0")/lib.sh"
interop_init

dirty_bit() { python3 -c "import sys; b=open(sys.argv[1],'rb').read(80); print(b[79] & 1)" "$1"; }

W="-c 'write -P 0x5a 0 64k' -c 'write -P 0x6b 1M 100000' -c 'write -P 0x7c 512M 4k'"
R="-c 'read -P 0x5a 0 64k' -c 'read -P 0x6b 1M 100000' -c 'read -P 0x7c 512M 4k'"

img=$WORK/lazy.qcow2

# 1. clean close
qsm_create "$img" lazy_refcounts=on
eval "\"$QSM\" io -t writethrough $W \"$img\"" >/dev/null || fail "1: writes failed"
[ "$(dirty_bit "$img")" = 0 ] || fail "1: dirty bit set after a clean close"
qemu-img check -q "$img" || fail "1: qemu-img check not clean after a clean close"

# 2. killed after writes
rm -f "$img"; qsm_create "$img" lazy_refcounts=on
# (The last write allocates no L2 table: only data clusters' refcounts are
# lazy, a batch that writes a new L2 table writes the refcounts before it.)
eval "\"$QSM\" io -t writethrough $W -c 'write -P 0x8d 2M 4k' -c abort \"$img\"" >/dev/null 2>&1
[ "$(dirty_bit "$img")" = 1 ] || fail "2: dirty bit not set after abort"
qemu-img check "$img" >"$WORK/check2" 2>&1; rc=$?
[ $rc = 2 ] || { fail "2: qemu-img check exit $rc, expected 2 (refcounts lag)"; show_tail "$WORK/check2"; }
grep -q "refcount=0 reference=1" "$WORK/check2" || fail "2: no lagging refcount reported"

# 3. read-only open: data readable, file untouched
sum=$(sha256sum < "$img")
eval "\"$QSM\" io -r $R \"$img\"" >"$WORK/ro" 2>&1 || { fail "3: read-only reads failed"; show_tail "$WORK/ro"; }
[ "$(sha256sum < "$img")" = "$sum" ] || fail "3: a read-only open changed the file"
qemu-io -r -c 'read -P 0x5a 0 64k' "$img" >/dev/null || fail "3: qemu-io cannot read the dirty image"

# 4. qsm check -r all
cp "$img" "$WORK/dirty.qcow2"
"$QSM" check -r all "$img" >"$WORK/check4" 2>&1; rc=$?
[ $rc = 0 ] || { fail "4: qsm check -r all exit $rc"; show_tail "$WORK/check4"; }
[ "$(dirty_bit "$img")" = 0 ] || fail "4: dirty bit still set after repair"
qemu-img check -q "$img" || fail "4: qemu-img check not clean after qsm check -r all"
eval "\"$QSM\" io -r $R \"$img\"" >/dev/null || fail "4: data lost by the repair"
eval "qemu-io -r $R \"$img\"" >/dev/null || fail "4: qemu-io reads wrong data after the repair"

# 5. read-write open repairs by itself
img5=$WORK/dirty.qcow2
eval "\"$QSM\" io $R -c 'write -P 0x11 2M 4k' -c 'read -P 0x11 2M 4k' \"$img5\"" >"$WORK/rw5" 2>&1 ||
	{ fail "5: read-write open of a dirty image failed"; show_tail "$WORK/rw5"; }
[ "$(dirty_bit "$img5")" = 0 ] || fail "5: dirty bit still set after a repairing open and clean close"
qemu-img check -q "$img5" || fail "5: qemu-img check not clean after the repairing open"

# 6. lazy refcounts off: a kill leaves no dirty bit and no corruption
img6=$WORK/eager.qcow2
qsm_create "$img6" lazy_refcounts=off
eval "\"$QSM\" io -t writethrough $W -c abort \"$img6\"" >/dev/null 2>&1
[ "$(dirty_bit "$img6")" = 0 ] || fail "6: dirty bit set without lazy refcounts"
qemu-img check "$img6" >"$WORK/check6" 2>&1; rc=$?
[ $rc = 0 ] || [ $rc = 3 ] || { fail "6: qemu-img check exit $rc (corruption) without lazy refcounts"; show_tail "$WORK/check6"; }
eval "\"$QSM\" io -r $R \"$img6\"" >/dev/null || fail "6: acknowledged writethrough data lost"

# 7. images qemu-io left dirty
img7=$WORK/qemu-dirty.qcow2
qemu_create "$img7" lazy_refcounts=on
eval "qemu-io -t writethrough $W -c 'sigraise 9' \"$img7\"" >/dev/null 2>&1
[ "$(dirty_bit "$img7")" = 1 ] || fail "7: qemu-io did not leave the image dirty (test setup)"
cp "$img7" "$WORK/qemu-dirty2.qcow2"
eval "\"$QSM\" io $R \"$img7\"" >"$WORK/rw7" 2>&1 || { fail "7: qsm io on a qemu-dirty image failed"; show_tail "$WORK/rw7"; }
qemu-img check -q "$img7" || fail "7: qemu-img check not clean after qsm repaired a qemu-dirty image"
"$QSM" check -r all "$WORK/qemu-dirty2.qcow2" >/dev/null 2>&1 || fail "7: qsm check -r all on a qemu-dirty image"
qemu-img check -q "$WORK/qemu-dirty2.qcow2" || fail "7: qemu-img check not clean after qsm check -r all"
eval "qemu-io -r $R \"$WORK/qemu-dirty2.qcow2\"" >/dev/null || fail "7: data lost"

interop_finish
