#!/usr/bin/env bash
# tests/interop/test_vmstate.sh: the VM-state area (sm/vmstate.c; qemu-io's
# `write -b` / `read -b`), written by qsm and read by qemu-io 7.2 and the
# other way round.
#
# For each image kind (v3 and v2; 512-byte, 4 KiB, 64 KiB and 2 MiB
# clusters; lazy refcounts), a 3 MiB disk with guest data at both ends,
# VM-state writes at: the start (64k), across the boundary of two L2 tables
# (two L1 entries in one request), a partial-cluster write two tables on,
# and for the small cluster sizes a state larger than one L2 table's span
# (one write over three tables).  The first write grows the L1 table (512-byte
# clusters: the disk's table has 96 entries, the state needs more).
#  1. qsm io writes, qemu-io verifies every pattern, the gaps and the area
#     past the L1 table read as zeros, the guest disk is unchanged;
#     qemu-img check and qsm check are clean; the L1 table grew to the size
#     qemu-io's own writes give it (QEMU's 1.5x rule).
#  2. qemu-io writes, qsm io verifies; qsm io overwrites in place and
#     allocates more; qemu-io verifies; check clean.
#  3. The verifying script prints the same stdout from qsm io as from
#     qemu-io (timings blanked).
#  4. Snapshots keep the VM state (the L1 entries past the disk are part of
#     the snapshot's L1 table): taken by qemu-img, the active state
#     rewritten by qsm io (copy on write of shared clusters), the snapshot
#     applied by qemu-img reads the old state; the same with qsm snapshot.
# A top image shorter than its base reads the base's data past its L1
# table, as qemu-io does.
# Then the error cases of `read -b`/`write -b` print what qemu-io prints:
# unaligned, -z/-f with -b, past the largest L1 table (EFBIG; also where
# the entries needed fit but QEMU's 1.5x growth would pass the limit), past
# BDRV_MAX_LENGTH (EIO), a raw image (ENOTSUP).
source "$(dirname "$0")/lib.sh"
interop_init

ok() { local tag=$1; shift; CHECKS=$((CHECKS + 1)); "$@" || fail "$tag"; }
l1_size() { python3 -c "import struct,sys;f=open(sys.argv[1],'rb');f.seek(36);print(struct.unpack('>I',f.read(4))[0])" "$1"; }
qsm_check_clean() {
    local out rc
    CHECKS=$((CHECKS + 1))
    out=$("$QSM" check "$2" 2>&1); rc=$?
    [ $rc = 0 ] && grep -q '^No errors were found on the image\.$' <<<"$out" ||
        { fail "$1: qsm check $2 exited $rc"; sed 's/^/    | /' <<<"$out" | head; }
}
# same_out TAG IMG SCRIPT: stdout of qemu-io and of qsm io running SCRIPT on
# copies of IMG, timings blanked, must be equal
same_out() {
    local tag=$1 img=$2 script=$3
    cp "$img" "$WORK/so.q.qcow2"; cp "$img" "$WORK/so.s.qcow2"
    timeout "$TIMEOUT" qemu-io -f qcow2 "$WORK/so.q.qcow2" <"$script" 2>&1 | filter_timing >"$WORK/so.q"
    timeout "$TIMEOUT" "$QSM" io -f qcow2 "$WORK/so.s.qcow2" <"$script" 2>&1 | filter_timing >"$WORK/so.s"
    CHECKS=$((CHECKS + 1))
    cmp -s "$WORK/so.q" "$WORK/so.s" ||
        { fail "$tag: qsm io prints what qemu-io does not"; diff "$WORK/so.q" "$WORK/so.s" | head -n 12 | sed 's/^/    | /'; }
}

KINDS=(
    "v3-512 cluster_size=512"
    "v2-512 cluster_size=512,compat=0.10"
    "v3-4k cluster_size=4096"
    "v3 cluster_size=65536"
    "v2 cluster_size=65536,compat=0.10"
    "lazy cluster_size=65536,lazy_refcounts=on"
    "v3-2M cluster_size=2M"
)
SIZE=$((3 << 20))
for k in "${KINDS[@]}"; do
    read -r tag opts <<<"$k"
    cs=$(sed -E 's/.*cluster_size=([0-9]+M?).*/\1/' <<<"$opts")
    case $cs in 2M) cs=$((2 << 20));; esac
    span=$((cs * cs / 8))
    # the VM-state writes: "pattern pos len" (a: the first, a quarter of
    # a table's span at most)
    a=$((span / 4 < 65536 ? span / 4 : 65536))
    W=("0x11 0 $a" "0x22 $((span - 4096)) 8192" "0x33 $((2 * span + 512)) 1536")
    # a state larger than one L2 table's span, one write (not at 64k and up:
    # one table maps 512 MiB there)
    [ "$cs" -le 4096 ] && W+=("0x44 $((3 * span)) $((2 * span + 65536))")
    # never written: zeros (a gap in the first table, one after the
    # boundary write, and far past the L1 table)
    Z=("$a 4096" "$((span + 8192)) 4096" "$((1000 * span)) 4096")

    wr="$WORK/$tag.write"; vf="$WORK/$tag.verify"
    { echo "write -P 0x5a 0 64k"; echo "write -P 0x5b $((SIZE - 65536)) 64k"
      for w in "${W[@]}"; do read -r p o l <<<"$w"; echo "write -b -P $p $o $l"; done; } >"$wr"
    { echo "read -P 0x5a 0 64k"; echo "read -P 0 64k 64k"; echo "read -P 0x5b $((SIZE - 65536)) 64k"
      for w in "${W[@]}"; do read -r p o l <<<"$w"; echo "read -b -P $p $o $l"; done
      for z in "${Z[@]}"; do read -r o l <<<"$z"; echo "read -b -P 0 $o $l"; done; } >"$vf"

    # 1. qsm writes, qemu-io reads
    A="$WORK/$tag.a.qcow2"
    qemu_create "$A" "$opts" $SIZE || die "qemu-img create $opts"
    qsm_io "$tag: qsm io writes the VM state" "$WORK/$tag.a1" "$A" "$wr"
    qemu_io "$tag: qemu-io reads qsm's VM state" "$WORK/$tag.a2" "$A" "$vf"
    check_clean "$tag: after qsm's VM-state writes" "$A"
    qsm_check_clean "$tag: after qsm's VM-state writes" "$A"
    B="$WORK/$tag.b.qcow2"
    qemu_create "$B" "$opts" $SIZE
    qemu_io "$tag: qemu-io writes the VM state" "$WORK/$tag.b1" "$B" "$wr"
    la=$(l1_size "$A"); lb=$(l1_size "$B")
    ok "$tag: qsm's L1 table has $la entries, qemu-io's $lb" [ "$la" = "$lb" ]

    # 2. qemu-io writes (B), qsm reads; qsm rewrites and adds, qemu-io reads
    qsm_io "$tag: qsm io reads qemu-io's VM state" "$WORK/$tag.b2" "$B" "$vf"
    more="$WORK/$tag.more"; vmore="$WORK/$tag.vmore"
    far=$((8 * span + 512))
    printf 'write -b -P 0x66 0 4096\nwrite -b -P 0x67 %s 4096\n' "$far" >"$more"
    printf 'read -b -P 0x66 0 4096\nread -b -P 0x11 4096 %s\nread -b -P 0x67 %s 4096\nread -b -P 0x22 %s 8192\n' \
        "$((a - 4096))" "$far" "$((span - 4096))" >"$vmore"
    qsm_io "$tag: qsm io rewrites qemu-io's VM state" "$WORK/$tag.b3" "$B" "$more"
    qemu_io "$tag: qemu-io reads the rewritten state" "$WORK/$tag.b4" "$B" "$vmore"
    check_clean "$tag: after qsm rewrote qemu-io's VM state" "$B"

    # 3. same output
    same_out "$tag: verifying script" "$A" "$vf"

    # 4. snapshots keep the VM state
    qemu-img snapshot -c s1 "$A" || die "qemu-img snapshot -c s1"
    printf 'write -b -P 0x77 0 %s\n' "$a" >"$WORK/s.w"
    printf 'read -b -P 0x77 0 %s\nread -b -P 0x22 %s 8192\n' "$a" "$((span - 4096))" >"$WORK/s.r1"
    printf 'read -b -P 0x11 0 %s\nread -b -P 0x22 %s 8192\n' "$a" "$((span - 4096))" >"$WORK/s.r0"
    qsm_io "$tag: qsm io rewrites the state under qemu-img's snapshot" "$WORK/$tag.s1" "$A" "$WORK/s.w"
    qemu_io "$tag: qemu-io reads the new active state" "$WORK/$tag.s2" "$A" "$WORK/s.r1"
    check_clean "$tag: VM state rewritten over a snapshot" "$A"
    qemu-img snapshot -a s1 "$A" || die "qemu-img snapshot -a s1"
    qemu_io "$tag: qemu-img applied s1: the old state" "$WORK/$tag.s3" "$A" "$WORK/s.r0"
    qemu-img snapshot -d s1 "$A" || die "qemu-img snapshot -d s1"
    check_clean "$tag: qemu-img's s1 deleted" "$A"
    # qsm's snapshots
    out=$("$QSM" snapshot -c s2 "$A" 2>&1); ok "$tag: qsm snapshot -c s2: $out" [ $? = 0 ]
    qsm_io "$tag: qsm io rewrites the state under qsm's snapshot" "$WORK/$tag.s4" "$A" "$WORK/s.w"
    qemu_io "$tag: qemu-io reads the state written over qsm's snapshot" "$WORK/$tag.s5" "$A" "$WORK/s.r1"
    check_clean "$tag: VM state rewritten over qsm's snapshot" "$A"
    out=$("$QSM" snapshot -a s2 "$A" 2>&1); ok "$tag: qsm snapshot -a s2: $out" [ $? = 0 ]
    qemu_io "$tag: qsm applied s2: the old state" "$WORK/$tag.s6" "$A" "$WORK/s.r0"
    out=$("$QSM" snapshot -d s2 "$A" 2>&1); ok "$tag: qsm snapshot -d s2: $out" [ $? = 0 ]
    check_clean "$tag: qsm's s2 deleted" "$A"
    qsm_io "$tag: qsm io reads the state after the snapshots" "$WORK/$tag.s7" "$A" "$WORK/s.r0"
done

# Error cases, messages as qemu-io's (stdout and stderr).
E="$WORK/err.qcow2"
qemu_create "$E" cluster_size=512 1M
cat >"$WORK/err.script" <<'EOF'
write -b 1 512
write -b 0 511
read -b 512 100
read -b -P 1 -l 1000 1 512
write -b -z 0 512
write -b -f 0 512
write -b -c 1 512
write -b 200G 512
write -b 135986151424 512
write -b 134347751424 512
write -b 135986151424 512
read -b -P 0 200G 512
write -b 9223372036854775296 512
read -b 9223372036853727232 512
read -b 9223372034707292160 512
write -b 9000000000000000000 512
read -b 0 0
write -b 0 0
write -b -q -P 0x12 0 1024
read -b -q -P 0x12 0 1024
read -b -v 512 16
read -b -v 512 512
EOF
same_out "error cases" "$E" "$WORK/err.script"
# Past the L1 table of a top image shorter than its base: the base's data
# (zeros after its end), also from a read that starts inside the table.
BB="$WORK/bb.qcow2"; BT="$WORK/bt.qcow2"
qemu_create "$BB" cluster_size=512 64M
qemu-io -f qcow2 -c 'write -P 0x53 1M 64k' -c 'write -P 0x54 65532k 4k' "$BB" >/dev/null ||
    die "qemu-io on the base"
qemu-img create -q -f qcow2 -o cluster_size=512 -b "$BB" -F qcow2 "$BT" 1M
cat >"$WORK/bt.script" <<'EOF'
read -b -P 0x53 0 64k
read -b -P 0 64k 4k
read -b -P 0x54 64508k 4k
read -b -P 0x54 -l 2k 64510k 4k
read -b -P 0 -s 2k 64510k 4k
write -b -P 0x55 0 512
read -b -P 0x55 0 512
read -b -P 0x53 512 65024
read -b -P 0 64k 960k
EOF
cp "$BT" "$WORK/bt.q.qcow2"
qemu_io "backing past the L1 table: qemu-io" "$WORK/bt.q" "$WORK/bt.q.qcow2" "$WORK/bt.script"
cp "$BT" "$WORK/bt.s.qcow2"
qsm_io "backing past the L1 table: qsm io" "$WORK/bt.s" "$WORK/bt.s.qcow2" "$WORK/bt.script"
same_out "backing past the L1 table" "$BT" "$WORK/bt.script"
check_clean "backing past the L1 table" "$WORK/bt.s.qcow2"
R="$WORK/err.raw"
qemu-img create -q -f raw "$R" 1M
printf 'write -b 0 512\nread -b 0 512\n' >"$WORK/raw.script"
qr=$(qemu-io -f raw "$R" <"$WORK/raw.script" 2>&1)
sr=$("$QSM" io -f raw "$R" <"$WORK/raw.script" 2>&1)
ok "raw image: qsm io '$sr', qemu-io '$qr'" [ "$sr" = "$qr" ]
ok "raw image: qemu-io no longer refuses VM state ('$qr')" grep -q 'Operation not supported' <<<"$qr"
interop_finish
