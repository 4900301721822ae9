#!/usr/bin/env bash
# tests/interop/test_snapshot_ops.sh: snapshots taken, applied and deleted
# by qsm (sm/snapops.c) and by qemu-img 7.2 on the same images, both ways.
#
# For each image kind (v3 and v2, 64 KiB and 512-byte clusters, refcount
# widths 4, 8, 16 and 64, lazy refcounts): data, compressed, zero and
# discarded clusters written by qemu-io; then a chain s1 (qsm) -> writes ->
# s2 (qemu-img) -> writes -> s3 (qsm) -> writes, the guest disk saved as raw
# at each snapshot.  Then applied in turn by qsm and by qemu-img (by name
# and by id), each one read back equal to its saved disk; deleted by both
# (a qemu-made one by qsm, a qsm-made one by qemu-img), what remains still
# applying right.  qemu-img check is clean (no leak, no COPIED error) after
# every step, and `qsm snapshot -l` prints what `qemu-img snapshot -l` does.
# `qsm convert -l` reads each snapshot's disk (by name, id, and the
# snapshot.id=,snapshot.name= form) without applying it.
# Also: refcount_bits=1 (no cluster can be shared): create fails as
# qemu-img's does, but nothing leaks; apply restores the snapshot's virtual
# size after a resize; qemu-img's messages for a snapshot not found (apply
# by id or name, delete by name only) with the file unchanged.
source "$(dirname "$0")/lib.sh"
interop_init
export TZ=UTC

# ok TAG COND...: one check
ok() { local tag=$1; shift; CHECKS=$((CHECKS + 1)); "$@" || fail "$tag"; }
# to_raw IMG RAW: the guest disk of IMG as a raw file
to_raw() { qemu-img convert -f qcow2 -O raw "$1" "$2" || die "qemu-img convert $1"; }
# same_disk TAG IMG RAW: IMG reads exactly as RAW
same_disk() {
    local out
    CHECKS=$((CHECKS + 1))
    out=$(qemu-img compare -f qcow2 -F raw "$2" "$3" 2>&1) || fail "$1: $out"
}
# snap TOOL ACTION NAME IMG: one operation; TOOL qsm or qemu
snap() {
    local tool=$1 act=$2 name=$3 img=$4 out rc
    if [ "$tool" = qsm ]; then out=$("$QSM" snapshot "-$act" "$name" "$img" 2>&1)
    else out=$(qemu-img snapshot "-$act" "$name" "$img" 2>&1); fi
    rc=$?
    CHECKS=$((CHECKS + 1))
    [ $rc = 0 ] || { fail "$tool snapshot -$act $name $(basename "$img") exited $rc: $out"; return 1; }
    check_clean "after $tool snapshot -$act $name ($(basename "$img"))" "$img"
}
same_list() {
    local a b
    CHECKS=$((CHECKS + 1))
    a=$("$QSM" snapshot -l "$2" 2>&1); b=$(qemu-img snapshot -l "$2" 2>&1)
    [ "$a" = "$b" ] || { fail "$1: qsm snapshot -l differs from qemu-img's"; diff <(echo "$b") <(echo "$a") | head | sed 's/^/    | /'; }
}

KINDS=(
    "v3 cluster_size=65536"
    "v2 cluster_size=65536,compat=0.10"
    "v3-512 cluster_size=512"
    "rc4 cluster_size=65536,refcount_bits=4"
    "rc8 cluster_size=4096,refcount_bits=8"
    "rc64 cluster_size=65536,refcount_bits=64"
    "lazy cluster_size=65536,lazy_refcounts=on"
)
for k in "${KINDS[@]}"; do
    read -r tag opts flags <<<"$k"
    c=-c; [ "${flags:-}" = nocomp ] && c=
    IMG="$WORK/$tag.qcow2"
    qemu-img create -q -f qcow2 -o "$opts" "$IMG" 8M || die "qemu-img create $opts"
    qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write $c -P 0x22 2M 128k" -c "write -z 3M 64k" \
        -c "write -P 0x33 4M 512k" -c "discard 4M 64k" "$IMG" >/dev/null || die "qemu-io $tag"
    to_raw "$IMG" "$WORK/$tag.s1.raw"
    snap qsm c s1 "$IMG"
    qemu-io -f qcow2 -c "write -P 0x44 512k 1M" -c "write $c -P 0x55 5M 64k" -c "write -z 4M 256k" \
        "$IMG" >/dev/null || die "qemu-io $tag 2"
    to_raw "$IMG" "$WORK/$tag.s2.raw"
    snap qemu c s2 "$IMG"
    qemu-io -f qcow2 -c "write -P 0x66 0 64k" -c "write -P 0x77 6M 1M" -c "discard 512k 128k" \
        "$IMG" >/dev/null || die "qemu-io $tag 3"
    to_raw "$IMG" "$WORK/$tag.s3.raw"
    snap qsm c s3 "$IMG"
    qemu-io -f qcow2 -c "write -P 0x88 1M 2M" "$IMG" >/dev/null || die "qemu-io $tag 4"
    same_list "$tag: three snapshots" "$IMG"
    # convert -l: each snapshot's disk read without applying it, by name,
    # by id and in the snapshot.id/snapshot.name form
    for l in s1 2 snapshot.name=s3 snapshot.id=1,snapshot.name=s1; do
        case $l in s1|*s1) n=s1;; 2) n=s2;; *) n=s3;; esac
        rm -f "$WORK/l.raw"
        out=$("$QSM" convert -l "$l" -O raw "$IMG" "$WORK/l.raw" 2>&1)
        ok "$tag: qsm convert -l $l failed: $out" [ $? = 0 ]
        ok "$tag: qsm convert -l $l is not $n's disk" cmp -s "$WORK/l.raw" "$WORK/$tag.$n.raw"
    done

    snap qsm a s1 "$IMG" && same_disk "$tag: qsm applied s1" "$IMG" "$WORK/$tag.s1.raw"
    snap qemu a s3 "$IMG" && same_disk "$tag: qemu-img applied qsm's s3" "$IMG" "$WORK/$tag.s3.raw"
    snap qsm a 2 "$IMG" && same_disk "$tag: qsm applied qemu-img's s2 by id" "$IMG" "$WORK/$tag.s2.raw"
    qemu-io -f qcow2 -c "write -P 0x99 0 3M" "$IMG" >/dev/null || die "qemu-io $tag 5"
    snap qsm d s2 "$IMG"
    snap qsm a s3 "$IMG" && same_disk "$tag: s3 after s2 was deleted" "$IMG" "$WORK/$tag.s3.raw"
    snap qemu d s3 "$IMG"
    same_list "$tag: one snapshot left" "$IMG"
    snap qsm a s1 "$IMG" && same_disk "$tag: s1 after s2 and s3 went" "$IMG" "$WORK/$tag.s1.raw"
    snap qsm d s1 "$IMG"
    ok "$tag: snapshots left after deleting all" [ -z "$(qemu-img snapshot -l "$IMG")" ]
    same_disk "$tag: the disk after the last delete" "$IMG" "$WORK/$tag.s1.raw"
    # and written again: clusters freed by the deletes are reused cleanly
    qemu-io -f qcow2 -c "write -P 0xaa 0 8M" "$IMG" >/dev/null || die "qemu-io $tag 6"
    check_clean "$tag: rewritten after the deletes" "$IMG"
done

# refcount_bits=1: a shared cluster cannot be counted
IMG="$WORK/rc1.qcow2"
qemu-img create -q -f qcow2 -o refcount_bits=1 "$IMG" 4M
qemu-io -f qcow2 -c "write -P 1 0 256k" "$IMG" >/dev/null
to_raw "$IMG" "$WORK/rc1.raw"
out=$("$QSM" snapshot -c x "$IMG" 2>&1); rc=$?
ok "refcount_bits=1: create exited $rc, not 1" [ $rc = 1 ]
ok "refcount_bits=1: message '$out'" grep -q "^qsm snapshot: Could not create snapshot 'x': Refcount overflow" <<<"$out"
check_clean "refcount_bits=1: after the refused create (qemu-img leaks a cluster here)" "$IMG"
ok "refcount_bits=1: a snapshot appeared" [ -z "$(qemu-img snapshot -l "$IMG")" ]
same_disk "refcount_bits=1: disk after the refused create" "$IMG" "$WORK/rc1.raw"

# refcount_bits=2 counts to 3: the active disk and two snapshots of it;
# a third snapshot fails (as qemu-img's does) and leaks nothing
IMG="$WORK/rc2.qcow2"
qemu-img create -q -f qcow2 -o refcount_bits=2 "$IMG" 4M
qemu-io -f qcow2 -c "write -P 1 0 1M" "$IMG" >/dev/null
to_raw "$IMG" "$WORK/rc2.raw"
snap qsm c a "$IMG"
snap qsm c b "$IMG"
out=$("$QSM" snapshot -c c "$IMG" 2>&1); rc=$?
ok "refcount_bits=2: a third snapshot exited $rc, not 1 ($out)" [ $rc = 1 ]
check_clean "refcount_bits=2: after the refused third snapshot" "$IMG"
cp "$IMG" "$WORK/rc2.copy"
out=$(qemu-img snapshot -c c "$WORK/rc2.copy" 2>&1); rc=$?
ok "refcount_bits=2: qemu-img's third snapshot exited $rc, not 1 as qsm's" [ $rc = 1 ]
snap qsm d a "$IMG"
snap qsm a b "$IMG" && same_disk "refcount_bits=2: b applied" "$IMG" "$WORK/rc2.raw"

# apply restores the virtual size the snapshot had (qemu-img 7.2 does)
IMG="$WORK/resize.qcow2"
qemu-img create -q -f qcow2 "$IMG" 4M
qemu-io -f qcow2 -c "write -P 5 0 4M" "$IMG" >/dev/null
to_raw "$IMG" "$WORK/resize.raw"
snap qsm c small "$IMG"
qemu-img resize -q "$IMG" 8M && qemu-io -f qcow2 -c "write -P 6 0 8M" "$IMG" >/dev/null
snap qsm a small "$IMG"
ok "resize: virtual size after applying the 4 MiB snapshot" \
    grep -q '"virtual-size": 4194304' <(qemu-img info --output=json "$IMG")
same_disk "resize: disk after apply" "$IMG" "$WORK/resize.raw"

# concurrent writes over a snapshotted L2 table: 32 in flight, every one
# copying its cluster, many of them wanting the shared table copied at once
# (the first copies it, the others wait: once, a second copy dropped the
# snapshot's reference twice); the same writes by qemu-img bench agree
IMG="$WORK/cow.qcow2"
qemu-img create -q -f qcow2 "$IMG" 64M
qemu-io -f qcow2 -c "write -P 0x21 0 32M" "$IMG" >/dev/null
to_raw "$IMG" "$WORK/cow.raw"
qemu-img snapshot -c shared "$IMG"
cp "$IMG" "$WORK/cow-qemu.qcow2"
for t in writeback none; do
    cp "$IMG" "$WORK/cow-$t.qcow2"
    out=$("$QSM" bench -w -q -t $t -c 1024 -d 32 -s 4096 -S 32768 --pattern=7 -f qcow2 "$WORK/cow-$t.qcow2" 2>&1)
    ok "cow -t $t: qsm bench failed: $out" [ $? = 0 ]
    check_clean "cow -t $t: after 1024 concurrent COW writes" "$WORK/cow-$t.qcow2"
done
qemu-img bench -w -t writeback -c 1024 -d 32 -s 4096 -S 32768 --pattern=7 -f qcow2 "$WORK/cow-qemu.qcow2" >/dev/null
compare_images "cow: qsm's writes against qemu-img bench's" "$WORK/cow-writeback.qcow2" "$WORK/cow-qemu.qcow2"
compare_images "cow: cache=none against writeback" "$WORK/cow-none.qcow2" "$WORK/cow-writeback.qcow2"
snap qsm a shared "$WORK/cow-none.qcow2" && same_disk "cow: the snapshot after the writes" "$WORK/cow-none.qcow2" "$WORK/cow.raw"

# convert -l of a snapshot taken at another size: the snapshot's size
rm -f "$WORK/l.raw"
cp "$WORK/resize.qcow2" "$WORK/resize2.qcow2"
qemu-img resize -q "$WORK/resize2.qcow2" 8M
"$QSM" convert -l small -O raw "$WORK/resize2.qcow2" "$WORK/l.raw"
ok "convert -l: the 4 MiB snapshot of an 8 MiB image" cmp -s "$WORK/l.raw" "$WORK/resize.raw"

# not found: qemu-img's messages, nothing changed
IMG="$WORK/msg.qcow2"
qemu-img create -q -f qcow2 "$IMG" 1M
qemu-img snapshot -c a "$IMG"
cp "$IMG" "$WORK/msg.orig"
for args in "-l nope" "-l snapshot.id=1,snapshot.name=b" "-l snapshot.foo=1"; do
    q=$(qemu-img convert $args -O raw "$IMG" "$WORK/q.raw" 2>&1); qrc=$?
    s=$("$QSM" convert $args -O raw "$IMG" "$WORK/s.raw" 2>&1); src=$?
    ok "convert $args: exit $src, qemu-img $qrc" [ $src = $qrc ]
    ok "convert $args: '$s' is not qemu-img's '$q'" [ "$(sed 's/^qsm convert: //' <<<"$s")" = "$(sed 's/^qemu-img: //' <<<"$q")" ]
done
for args in "-a nope" "-d nope" "-d 1"; do
    q=$(qemu-img snapshot $args "$IMG" 2>&1); qrc=$?
    s=$("$QSM" snapshot $args "$IMG" 2>&1); src=$?
    ok "snapshot $args: exit $src, qemu-img $qrc" [ $src = $qrc ]
    ok "snapshot $args: '$s' is not qemu-img's '$q'" [ "${s#qsm snapshot: }" = "${q#qemu-img: }" ]
    ok "snapshot $args: the file changed" cmp -s "$IMG" "$WORK/msg.orig"
done
interop_finish
