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
#   track    the same sessions by qemu-io and by qsm io (writes, zero
#            writes, discards, compressed writes) on copies of one image:
#            QEMU reads the same dirty extents from both (qemu-nbd -B,
#            nbdinfo --map), both consistent, a disabled bitmap unchanged;
#            a read-only session leaves the file byte-identical; a session
#            killed at each of its writes and syncs (strace) leaves an image
#            that checks clean but for leaks, each bitmap in use or
#            consistent, and a consistent one as before (with the disk as
#            before) or as after;
#   nbd      qsm nbd -B exports qemu:dirty-bitmap:NAME contexts as qemu-nbd
#            -B does (contexts listed, extents read by nbdinfo, alone and
#            beside base:allocation), refuses a missing or in-use bitmap in
#            its words, and on a writable export shows the clients' writes
#            at once and stores them at exit as QEMU would;
#   invalid  autoclear bit 0 cleared by a program without bitmap support:
#            no bitmaps are listed and a read-write session drops the stale
#            extension from the header, as QEMU never writes it again;
#   (resizing an image with bitmaps: test_bitmap_resize.sh)
source "$(dirname "$0")/lib.sh"
interop_init
for t in qemu-nbd nbdinfo; do command -v $t >/dev/null || skip "$t not found"; done
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

# --- track --------------------------------------------------------------------
# The same two sessions by qemu-io and by qsm io, on copies of an image with
# an enabled bitmap at 64 KiB granularity, one at 512 KiB, and a disabled
# one: QEMU reads the same bitmaps from both, consistent.
qemu-img create -q -f qcow2 tr.qcow2 64M
qemu-io -f qcow2 -c 'write -P 1 0 2M' tr.qcow2 >/dev/null
qemu-img bitmap --add tr.qcow2 fine
qemu-img bitmap --add -g 512k tr.qcow2 coarse
qemu-img bitmap --add --disable tr.qcow2 off
qemu-io -f qcow2 -c 'write -P 2 8M 64k' tr.qcow2 >/dev/null   # bits QEMU stored
for b in fine coarse off; do bmap tr.qcow2 $b >"tr.$b.before"; done
cp tr.qcow2 tq.qcow2
S1=(-c 'write -P 3 64k 4k' -c 'write 640k 1' -c 'write -z 10M 1M' -c 'discard 20M 128k'
    -c 'write -c 30M 64k' -c 'write -P 4 63M 1M')
S2=(-c 'write -P 5 40M 512' -c 'write -z -u 48M 2M')
for s in S1 S2; do
    declare -n args=$s
    qemu-io -f qcow2 "${args[@]}" tq.qcow2 >/dev/null || fail "track: qemu-io $s failed"
    "$QSM" io -f qcow2 "${args[@]}" tr.qcow2 >/dev/null || fail "track: qsm io $s failed"
    unset -n args
    check_clean "track: after qsm session $s" tr.qcow2
    for b in fine coarse off; do
        CHECKS=$((CHECKS + 1))
        [ "$(bmap tr.qcow2 $b)" = "$(bmap tq.qcow2 $b)" ] || {
            fail "track: bitmap $b after $s: qsm's and QEMU's differ"
            diff <(bmap tq.qcow2 $b) <(bmap tr.qcow2 $b) | head -8 | sed 's/^/    | /'
        }
    done
done
CHECKS=$((CHECKS + 1))
grep -q dirty "tr.off.before" && fail "track: the disabled bitmap had bits to begin with"
CHECKS=$((CHECKS + 1))
[ "$(bmap tr.qcow2 off)" = "$(cat tr.off.before)" ] || fail "track: the disabled bitmap changed"
CHECKS=$((CHECKS + 1))
qemu-img compare -q tr.qcow2 tq.qcow2 || fail "track: the disks differ"
# a read-only session leaves the file byte-identical
cp tr.qcow2 ro.qcow2
"$QSM" io -f qcow2 -r -c 'read 0 64k' ro.qcow2 >/dev/null
"$QSM" info ro.qcow2 >/dev/null
"$QSM" check ro.qcow2 >/dev/null
CHECKS=$((CHECKS + 1))
cmp -s ro.qcow2 tr.qcow2 || fail "track: a read-only session changed the image"
rm -f ro.qcow2 tq.qcow2

# --- nbd ---------------------------------------------------------------------
# serve PROG IMG ARGS...: start PROG (qemu-nbd or qsm nbd) on $WORK/s.sock;
# SRV is its PID.
serve() {
    local prog=$1 img=$2 i
    shift 2
    rm -f "$WORK/s.sock"
    if [ "$prog" = qemu-nbd ]; then qemu-nbd -f qcow2 -k "$WORK/s.sock" "$@" "$img" 2>"$WORK/srv.err" &
    else "$QSM" nbd -f qcow2 -k "$WORK/s.sock" "$@" "$img" 2>"$WORK/srv.err" & fi
    SRV=$!
    for ((i = 0; i < 100; i++)); do [ -S "$WORK/s.sock" ] && return 0; sleep 0.05; done
    fail "nbd: $prog did not start: $(cat "$WORK/srv.err")"
    return 1
}
unserve() { kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null; }
URI="nbd+unix:///?socket=$WORK/s.sock"
# qsm nbd -B exports what qemu-nbd -B exports: the contexts offered and each
# bitmap's extents, alone and beside base:allocation.
for prog in qemu-nbd qsm; do
    serve $prog tr.qcow2 -r -B fine -B off -B coarse || continue
    nbdinfo --list "$URI" 2>&1 | grep -o 'qemu:dirty-bitmap:[a-z]*' | sort >"nbd.$prog.ctx"
    for b in fine off coarse; do
        nbdinfo --map="qemu:dirty-bitmap:$b" "$URI" >"nbd.$prog.$b" 2>&1
    done
    nbdinfo --map "$URI" >"nbd.$prog.alloc" 2>&1
    unserve
done
for x in ctx fine off coarse alloc; do
    CHECKS=$((CHECKS + 1))
    cmp -s "nbd.qemu-nbd.$x" "nbd.qsm.$x" || {
        fail "nbd: qsm nbd -B and qemu-nbd -B differ ($x)"
        diff "nbd.qemu-nbd.$x" "nbd.qsm.$x" | head -6 | sed 's/^/    | /'
    }
done
CHECKS=$((CHECKS + 1))
grep -q dirty nbd.qsm.fine && [ "$(wc -l <nbd.qsm.ctx)" = 3 ] ||
    fail "nbd: the export shows no dirty extent or not the three contexts"
# refusals, in qemu-nbd's words: a bitmap not there, one in use
cp tr.qcow2 iu.qcow2
"${EDIT[@]}" iu.qcow2 entry 0 flags 3
for args in "-B nope tr.qcow2" "-B fine iu.qcow2"; do
    # shellcheck disable=SC2086
    q=$(qemu-nbd -r -f qcow2 -k "$WORK/r.sock" $args 2>&1); qr=$?
    # shellcheck disable=SC2086
    o=$("$QSM" nbd -r -f qcow2 -k "$WORK/r.sock" $args 2>&1); orc=$?
    o=${o//qsm nbd: /qemu-nbd: }
    CHECKS=$((CHECKS + 1))
    [ "$q" = "$o" ] && [ "$qr" = "$orc" ] ||
        fail "nbd: $args: qsm nbd said '$o' ($orc), qemu-nbd '$q' ($qr)"
done
rm -f iu.qcow2
# A writable export records the clients' writes, visible at once; at exit
# the bitmap is stored, consistent, as QEMU reads it after the same writes.
cp tr.qcow2 nw.qcow2 && cp tr.qcow2 nq.qcow2
qemu-io -f qcow2 -c 'write -P 8 56M 64k' nq.qcow2 >/dev/null
if serve qsm nw.qcow2 -t -B fine; then
    qemu-io -f raw -c 'write -P 8 56M 64k' "$URI" >/dev/null || fail "nbd: a write through qsm nbd failed"
    nbdinfo --map=qemu:dirty-bitmap:fine "$URI" >nbd.live 2>&1
    CHECKS=$((CHECKS + 1))
    [ "$(cat nbd.live)" = "$(bmap nq.qcow2 fine)" ] && grep -q "^  *58720256  *65536  *1  *dirty" nbd.live ||
        fail "nbd: the write is not in the live bitmap: $(cat nbd.live)"
    unserve
fi
check_clean "nbd: after a writable export" nw.qcow2
CHECKS=$((CHECKS + 1))
[ "$(bmap nw.qcow2 fine)" = "$(bmap nq.qcow2 fine)" ] ||
    fail "nbd: the bitmap stored by qsm nbd differs from QEMU's after the same write"
rm -f nw.qcow2 nq.qcow2

# A session killed at its K-th write or sync (strace's fault injection), K =
# 1, 2, ... until one completes: the image checks clean but for leaks, and
# each bitmap is in use or void (bit 0 clear, between the open's header
# writes: not to be trusted either way) or consistent; a consistent one
# reads as before with the disk as before, or as after with the writes in.
if strace_kill_ok; then
    S3=(-c 'write -P 6 1M 64k' -c 'write -P 7 33M 4k')
    cp tr.qcow2 after.qcow2
    "$QSM" io -f qcow2 "${S3[@]}" after.qcow2 >/dev/null || fail "crash: the session fails"
    for b in fine coarse; do bmap after.qcow2 $b >"tr.$b.after"; bmap tr.qcow2 $b >"tr.$b.before"; done
    points=0 inuse=0 kept=0 done=0
    for ((k = 1; k <= 200; k++)); do
        cp tr.qcow2 k.qcow2
        kill_at $k "$QSM" io -f qcow2 "${S3[@]}" k.qcow2
        rc=$?
        [ $rc = 0 ] && { done=1; break; }
        points=$((points + 1))
        tag="crash: killed at call $k"
        CHECKS=$((CHECKS + 1))
        [ $rc = 137 ] || fail "$tag: exit $rc, not a kill"
        crashed_clean "$tag" k.qcow2
        for b in fine coarse; do
            m=$(bmap k.qcow2 $b)
            CHECKS=$((CHECKS + 1))
            if [ "$m" = in-use ] || [ "$m" = invalid ]; then
                inuse=$((inuse + 1))
            elif [ "$m" = "$(cat tr.$b.before)" ]; then
                kept=$((kept + 1))
                qemu-img compare -q k.qcow2 tr.qcow2 ||
                    fail "$tag: bitmap $b is consistent and clean, but the disk changed"
            elif [ "$m" != "$(cat tr.$b.after)" ]; then
                fail "$tag: bitmap $b is consistent but neither before nor after"
            fi
        done
    done
    CHECKS=$((CHECKS + 1))
    [ $done = 1 ] && [ $inuse -gt 0 ] && [ $kept -gt 0 ] ||
        fail "crash: $points kill points, $inuse untrusted and $kept untouched bitmaps (want both), done=$done"
    log "crash: $points kill points: $inuse bitmaps left in use or void, $kept untouched"
    rm -f k.qcow2 after.qcow2
else
    log "crash: strace cannot inject faults here; the kill points are not run"
fi

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

interop_finish
