#!/usr/bin/env bash
# tests/interop/test_bitmaps.sh: persistent dirty bitmaps written by QEMU 7.2
# (issue 16): qsm reads, lists, checks and keeps them as QEMU does.
#
#   same     info (human and JSON), check, check -r leaks and check -r all on
#            images with enabled, disabled, in-use and dirty (data-carrying)
#            bitmaps print what qemu-img prints, exit alike, and leave the
#            files as qemu-img leaves them (a repair never frees a bitmap's
#            clusters: qemu-img check stays clean after qsm check -r);
#   damage   each directory or extension rule QEMU's open enforces, broken
#            by hand (bitmap_edit.py): qsm refuses the image with qemu-img's
#            message and exit status, and a read-write open writes nothing;
#            an in-use bitmap with a bad table entry (QEMU opens it, its
#            check fails) is checked as qemu-img checks it;
#   write    a read-write qsm session (qsm io writes) marks the enabled
#            bitmaps in-use and leaves disabled ones as they were; qemu-img
#            check calls the image clean, qemu-img info lists the flags, and
#            `qemu-img bitmap --remove` drops the stale one; a read-only
#            session leaves the file byte-identical;
#   invalid  autoclear bit 0 cleared by a program without bitmap support:
#            no bitmaps are listed and a read-write session drops the stale
#            extension from the header, as QEMU never writes it again;
#   resize   growing within what a bitmap covers works (qemu-img check
#            clean, the bitmap still listed); past it, qsm refuses naming the
#            bitmap, the file unchanged.
source "$(dirname "$0")/lib.sh"
interop_init
cd "$WORK" || die "cd $WORK"
EDIT=(python3 "$(dirname "$0")/bitmap_edit.py")

# same TAG ARGS...: qsm ARGS and qemu-img ARGS on copies of the images (in
# q/ and s/): the same output (the program name aside, and but for the
# warning QEMU's library prints on opening an image whose bitmaps a program
# without bitmap support voided), status and files.  A repair (-r) opens the
# image read-write, and QEMU stores its bitmaps back into new clusters when
# it closes it: there the files must instead read the same (qemu-img
# compare), list the same bitmaps, and check clean.
same() {
    local tag=$1 oq os rq rs f
    shift
    rm -rf q s && mkdir q s
    for f in *.qcow2; do cp "$f" q/ && cp "$f" s/; done
    oq=$(cd q && qemu-img "$@" 2>&1 | grep -v -e '^qemu-img: warning: a program lacking bitmap support' \
         -e "^Some clusters may be leaked, run 'qemu-img check -r'"; exit "${PIPESTATUS[0]}"); rq=$?
    os=$(cd s && "$QSM" "$@" 2>&1); rs=$?
    os=$(printf '%s' "$os" | sed -E 's/^qsm [a-z]+: /qemu-img: /')
    CHECKS=$((CHECKS + 1))
    if [ "$rq" != "$rs" ] || [ "$oq" != "$os" ]; then
        fail "$tag: qsm $* gave ($rs) and qemu-img ($rq):"
        diff <(printf '%s\n' "$oq") <(printf '%s\n' "$os") | head -n 12 | sed 's/^/    | /'
        return 1
    fi
    for f in q/*; do
        CHECKS=$((CHECKS + 1))
        if [ "$2" != -r ]; then
            cmp -s "$f" "s/${f#q/}" || fail "$tag: ${f#q/} differs after qsm $* and qemu-img $*"
            continue
        fi
        qemu-img compare -q "$f" "s/${f#q/}" || fail "$tag: ${f#q/} reads differently after -r"
        [ "$(qemu-img info "$f" | sed -n '/bitmaps:/,/refcount bits/p')" = \
          "$(qemu-img info "s/${f#q/}" | sed -n '/bitmaps:/,/refcount bits/p')" ] ||
            fail "$tag: ${f#q/} lists other bitmaps after qsm $* than after qemu-img $*"
        check_clean "$tag: ${f#q/} after qsm $*" "s/${f#q/}"
    done
}

# Images: "dirty" has an enabled bitmap with data clusters (QEMU stored the
# writes made after --add), "two" a disabled one with 512 KiB granularity
# and an enabled one without data, "inuse" the first left in use (the mark
# a QEMU that dies while tracking leaves).
qemu-img create -q -f qcow2 dirty.qcow2 64M
qemu-io -f qcow2 -c 'write -P 1 0 1M' dirty.qcow2 >/dev/null || die "qemu-io failed"
qemu-img bitmap --add dirty.qcow2 b0
qemu-io -f qcow2 -c 'write -P 2 4M 1M' -c 'write -P 3 40M 64k' dirty.qcow2 >/dev/null ||
    die "qemu-io failed"
qemu-img create -q -f qcow2 two.qcow2 64M
qemu-img bitmap --add --disable -g 512k two.qcow2 'off one'
qemu-img bitmap --add two.qcow2 on
cp dirty.qcow2 inuse.qcow2
"${EDIT[@]}" inuse.qcow2 entry 0 flags 3

# --- same ---------------------------------------------------------------------
for f in dirty two inuse; do
    same "info $f" info "$f.qcow2"
    same "info json $f" info --output=json "$f.qcow2"
    same "check $f" check "$f.qcow2"
done
same "check -r leaks" check -r leaks dirty.qcow2
same "check -r all" check -r all inuse.qcow2
# a leak beside the bitmaps: the repair frees it and nothing of theirs
cp dirty.qcow2 leak.qcow2
python3 - leak.qcow2 <<'EOF'
import struct, sys
# one more reference in the refcount block for the cluster at the file end:
# append a cluster and count it, a leak qemu-img check reports
p = sys.argv[1]
f = open(p, "r+b")
hdr = f.read(104)
cb = struct.unpack(">I", hdr[20:24])[0]
rt = struct.unpack(">Q", hdr[48:56])[0]
f.seek(0, 2)
end = f.tell()
cs = 1 << cb
k = (end + cs - 1) // cs
f.truncate((k + 1) * cs)
f.seek(rt)
rb = struct.unpack(">Q", f.read(8))[0]
f.seek(rb + 2 * k)
f.write(struct.pack(">H", 1))
EOF
same "check leak" check leak.qcow2
same "check -r leaks leak" check -r leaks leak.qcow2
rm -f leak.qcow2
cp dirty.qcow2 r.qcow2
"$QSM" check -r all r.qcow2 >/dev/null 2>&1
check_clean "qsm check -r all on bitmaps" r.qcow2
rm -f r.qcow2

# --- damage ---------------------------------------------------------------------
# damage TAG EDIT...: a copy of dirty.qcow2 edited so, then the same info as
# qemu-img (message, status) and a refused read-write open that writes nothing.
damage() {
    local tag=$1 out
    shift
    mkdir -p dmg && cp dirty.qcow2 dmg/x.qcow2
    "${EDIT[@]}" dmg/x.qcow2 "$@"
    cp dmg/x.qcow2 dmg/x.orig
    (cd dmg && same "damage $tag" info x.qcow2)
    CHECKS=$((CHECKS + 1))
    if out=$("$QSM" io -f qcow2 -c 'write 0 4k' dmg/x.qcow2 2>&1); then
        fail "damage $tag: a read-write open succeeded: $out"
    fi
    CHECKS=$((CHECKS + 1))
    cmp -s dmg/x.qcow2 dmg/x.orig || fail "damage $tag: a refused image was written"
    rm -rf dmg
}
damage granularity_8 entry 0 granularity_bits 8
damage granularity_32 entry 0 granularity_bits 32
damage reserved_flag entry 0 flags 6
damage type_2 entry 0 type 2
damage table_size_0 entry 0 table_size 0
damage table_unaligned entry 0 table_offset 0x10200
damage table_offset_0 entry 0 table_offset 0
damage extra_data entry 0 extra_data_size 8
damage name_size_big entry 0 name_size 1024
damage nb_2 ext nb 2
damage nb_0 ext nb 0
damage nb_huge ext nb 70000
damage reserved_ext ext reserved 1
damage dir_unaligned ext dir_offset 0x10008
damage dir_size_0 ext dir_size 0
damage dir_size_short ext dir_size 16
damage dir_size_huge ext dir_size 0x4000000
damage table_entry_reserved table 0 0 0x2
damage table_entry_unaligned table 0 0 0x10200
damage table_entry_ones table 0 0 0x50001
# In use, the table is not loaded at open: QEMU opens it, its check fails.
cp inuse.qcow2 bad-inuse.qcow2
"${EDIT[@]}" bad-inuse.qcow2 table 0 0 0x2
same "check in-use bad table" check bad-inuse.qcow2
rm -f bad-inuse.qcow2

# --- write ----------------------------------------------------------------------
cp two.qcow2 w.qcow2
"$QSM" io -f qcow2 -c 'write -P 5 0 64k' w.qcow2 >/dev/null || fail "write: qsm io failed"
check_clean "write: after a qsm session" w.qcow2
CHECKS=$((CHECKS + 1))
flags=$(qemu-img info --output=json w.qcow2 | python3 -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]["bitmaps"]
print(";".join(b["name"] + "=" + ",".join(b["flags"]) for b in d))')
[ "$flags" = "off one=;on=in-use,auto" ] ||
    fail "write: bitmap flags after a qsm session are '$flags', not 'off one=;on=in-use,auto'"
# QEMU opens it read-write too (the in-use bitmap stays so) and removes it
qemu-io -f qcow2 -c 'write -P 6 64k 64k' w.qcow2 >/dev/null || fail "write: qemu-io refuses it"
qemu-img bitmap --remove w.qcow2 on || fail "write: qemu-img bitmap --remove failed"
check_clean "write: after --remove" w.qcow2
CHECKS=$((CHECKS + 1))
"$QSM" io -f qcow2 -r -c 'read -P 5 0 64k' -c 'read -P 6 64k 64k' w.qcow2 >/dev/null ||
    fail "write: data written by qsm and qemu-io does not read back"
cp two.qcow2 ro.qcow2
"$QSM" io -f qcow2 -r -c 'read 0 64k' ro.qcow2 >/dev/null
"$QSM" info ro.qcow2 >/dev/null
"$QSM" check ro.qcow2 >/dev/null
CHECKS=$((CHECKS + 1))
cmp -s ro.qcow2 two.qcow2 || fail "write: a read-only session changed the image"
rm -f w.qcow2 ro.qcow2

# --- invalid ----------------------------------------------------------------------
mkdir inv && cp dirty.qcow2 inv/x.qcow2
"${EDIT[@]}" inv/x.qcow2 autoclear 0
CHECKS=$((CHECKS + 1))
"$QSM" info inv/x.qcow2 | grep -q bitmaps && fail "invalid: bitmaps listed with autoclear bit 0 clear"
"$QSM" io -f qcow2 -c 'write 0 4k' inv/x.qcow2 >/dev/null || fail "invalid: qsm io failed"
CHECKS=$((CHECKS + 1))
python3 - inv/x.qcow2 <<'EOF' || fail "invalid: the header still carries the bitmaps extension"
import struct, sys
b = open(sys.argv[1], "rb").read(65536)
pos = struct.unpack(">I", b[100:104])[0]
while True:
    typ, ln = struct.unpack(">II", b[pos:pos + 8])
    if typ == 0:
        break
    if typ == 0x23852875:
        sys.exit(1)
    pos += 8 + (ln + 7) // 8 * 8
EOF
# the stale bitmap's clusters now leak, as after QEMU: both checks agree
(cd inv && same "invalid check" check x.qcow2)
rm -rf inv

# --- resize -----------------------------------------------------------------------
qemu-img create -q -f qcow2 rs.qcow2 64M
qemu-img bitmap --add rs.qcow2 b0
"$QSM" resize rs.qcow2 1G >/dev/null || fail "resize: growing within the bitmap's cover failed"
check_clean "resize: grown" rs.qcow2
CHECKS=$((CHECKS + 1))
qemu-img info rs.qcow2 | grep -q 'name: b0' || fail "resize: the bitmap is gone"
cp rs.qcow2 rs.orig
# one table cluster of 64 KiB at 64 KiB granularity covers 32 GiB
CHECKS=$((CHECKS + 1))
if out=$("$QSM" resize rs.qcow2 40G 2>&1); then
    fail "resize: growing past the bitmap's cover succeeded"
elif ! printf '%s\n' "$out" | grep -q "Bitmap 'b0' covers only"; then
    fail "resize: the refusal does not name the bitmap: $out"
fi
CHECKS=$((CHECKS + 1))
cmp -s rs.qcow2 rs.orig || fail "resize: a refused resize changed the image"

interop_finish
