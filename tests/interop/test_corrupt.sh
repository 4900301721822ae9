#!/usr/bin/env bash
# A session that finds the image corrupt, qsm io against qemu-io 7.2 (the
# rule: top of sm/qsm.h).  On an image whose L2 entry for guest 64 KiB
# points at the L1 table (made by qemu-img and qemu-io, then broken), the
# same script of writes, zero writes, compressed writes and discards, the
# first of which finds the overlap:
#  - both print the same stdout ("write failed: Input/output error" once,
#    then "write failed: No medium found", "discard failed: ...") and exit 1;
#  - both leave the file as it was except the corrupt bit (byte 79, bit 1),
#    so the two images are byte-identical;
#  - qemu-img info says corrupt: true and qemu-img check finds the planted
#    corruption (exit 2) on qsm's image;
#  - both refuse to open it read-write afterwards;
#  - qsm keeps serving reads of intact data after the detection (qemu-io
#    does not: its driver is gone), with the right contents.
. "$(dirname "$0")/lib.sh"
interop_init

img="$WORK/base.qcow2"
qemu-img create -q -f qcow2 "$img" 1M || die "qemu-img create failed"
qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' -c 'write -P 0xbb 128k 64k' "$img" >/dev/null ||
    die "qemu-io write failed"
python3 - "$img" <<'PY' || die "could not break the image"
import struct, sys
with open(sys.argv[1], 'r+b') as f:
    f.seek(40); l1 = struct.unpack('>Q', f.read(8))[0]
    f.seek(l1); l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 8); f.write(struct.pack('>Q', l1 | (1 << 63)))  # guest 64k -> L1 table
PY

script="$WORK/script"
cat >"$script" <<'EOF'
write -P 0xcc 64k 4k
write -P 0xdd 256k 4k
write -z 0 4k
write -c 512k 64k
discard 0 64k
write -P 0xee 0 512
EOF

cp "$img" "$WORK/q.qcow2"
cp "$img" "$WORK/s.qcow2"
CHECKS=$((CHECKS + 1))
timeout "$TIMEOUT" qemu-io -f qcow2 "$WORK/q.qcow2" <"$script" >"$WORK/q.out" 2>"$WORK/q.err"
qrc=$?
timeout "$TIMEOUT" "$QSM" io -f qcow2 "$WORK/s.qcow2" <"$script" >"$WORK/s.out" 2>"$WORK/s.err"
src=$?
[ "$qrc" = 1 ] && [ "$src" = 1 ] || fail "exit codes: qemu-io $qrc, qsm io $src (both 1 expected)"
if ! diff -u "$WORK/q.out" "$WORK/s.out" >"$WORK/out.diff"; then
    fail "stdout differs from qemu-io's"
    show_tail "$WORK/out.diff" 30
fi
grep -q 'write failed: No medium found' "$WORK/s.out" || fail "no 'write failed: No medium found' from qsm io"

# corrupt_bit_only ORIG NEW: the only difference is the corrupt bit, now set
corrupt_bit_only() {
    local diff pos a b
    diff=$(cmp -l "$1" "$2" 2>&1)
    [ -n "$diff" ] && [[ $diff != *$'\n'* ]] || return 1
    read -r pos a b <<<"$diff"
    [ "$pos" = 80 ] && [ $((8#$b)) -eq $((8#$a | 2)) ] && [ $((8#$a)) -ne $((8#$b)) ]
}
CHECKS=$((CHECKS + 1))
corrupt_bit_only "$img" "$WORK/q.qcow2" || fail "qemu-io's image: more than the corrupt bit changed (the reference itself?)"
corrupt_bit_only "$img" "$WORK/s.qcow2" ||
    fail "qsm's image: more than the corrupt bit changed: $(cmp -l "$img" "$WORK/s.qcow2" 2>&1 | head -5 | tr '\n' ' ')"
cmp -s "$WORK/q.qcow2" "$WORK/s.qcow2" || fail "qsm's image differs from qemu-io's"

CHECKS=$((CHECKS + 1))
qemu-img info --output=json "$WORK/s.qcow2" | grep -q '"corrupt": true' ||
    fail "qemu-img info does not say corrupt: true"
qemu-img check "$WORK/s.qcow2" >"$WORK/check.out" 2>&1
rc=$?
[ "$rc" = 2 ] || { fail "qemu-img check exit $rc, expected 2 (the planted corruption)"; show_tail "$WORK/check.out"; }

CHECKS=$((CHECKS + 1))
for tool in qemu-io "$QSM io"; do
    if $tool -f qcow2 -c 'read 0 512' "$WORK/s.qcow2" >"$WORK/reopen.out" 2>&1; then
        fail "$tool opened the marked image read-write"
    elif ! grep -qi corrupt "$WORK/reopen.out"; then
        fail "$tool refused the marked image without saying it is corrupt: $(head -c 300 "$WORK/reopen.out")"
    fi
done

# Reads of intact data after the detection (qsm only).
CHECKS=$((CHECKS + 1))
cp "$img" "$WORK/r.qcow2"
"$QSM" io -f qcow2 -c 'write -P 0xcc 64k 4k' -c 'read -P 0xaa 0 64k' -c 'read -P 0xbb 128k 64k' \
    -c 'read -P 0 256k 64k' "$WORK/r.qcow2" >"$WORK/r.out" 2>"$WORK/r.err"
grep -q 'write failed: Input/output error' "$WORK/r.out" || fail "the detecting write did not fail with EIO"
n=$(grep -c '^read ' "$WORK/r.out")
[ "$n" = 3 ] && ! grep -q 'read failed\|verification failed' "$WORK/r.out" ||
    { fail "reads of intact data after the detection: $n of 3 succeeded"; show_tail "$WORK/r.out"; }
grep -q 'marked corrupt' "$WORK/r.err" || fail "qsm io did not say the image is marked corrupt: $(cat "$WORK/r.err")"
corrupt_bit_only "$img" "$WORK/r.qcow2" || fail "reads after the detection changed the image"

interop_finish
