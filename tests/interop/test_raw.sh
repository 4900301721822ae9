#!/usr/bin/env bash
# Raw images (#5): `qsm io -f raw` runs the random workload on a raw file and
# `qemu-io -f raw` the same on a copy; the files must be byte-identical
# (cmp) and the verified reads must pass.  `qsm info -f raw` (human, json)
# prints what `qemu-img info -f raw` prints; the qemu-io `info`, `map` and
# `alloc` commands agree too (qemu-io, like qsm, reports a raw file as all
# allocated).  A raw file is never taken for qcow2 without -f raw.
#
# Env: QSM_TEST_SCALE (ops = 1000 * scale), QSM_TEST_SEED.
. "$(dirname "$0")/lib.sh"
interop_init

N=$(scaled 1000)
SIZE=256M
d=$WORK
python3 "$GEN" "$BASE_SEED" "$N" "$SIZE" 64k >"$d/cmds" || die "gen_workload failed"
log "$N commands (python3 gen_workload.py $BASE_SEED $N $SIZE 64k)"

truncate -s $SIZE "$d/q.raw" "$d/s.raw"
if run_io "qemu-io -f raw" "$d/q" "$d/q.raw" "$d/cmds" qemu-io -f raw &&
   run_io "qsm io -f raw" "$d/s" "$d/s.raw" "$d/cmds" "$QSM" io -f raw; then
    CHECKS=$((CHECKS + 1))
    cmp -s "$d/q.raw" "$d/s.raw" || fail "qsm io -f raw and qemu-io -f raw left different files"
fi
# the same with O_DIRECT and writethrough
if odirect_ok "$WORK"; then
    truncate -s $SIZE "$d/sd.raw"
    if run_io "qsm io -f raw -t none" "$d/sd" "$d/sd.raw" "$d/cmds" "$QSM" io -f raw -t none; then
        CHECKS=$((CHECKS + 1))
        cmp -s "$d/q.raw" "$d/sd.raw" || fail "qsm io -f raw -t none differs from qemu-io"
    fi
    rm -f "$d/sd.raw"
fi

# info, human and json, on a sparse raw file with some data
truncate -s 4M "$d/i.raw"
qemu-io -f raw -c 'write -P 7 1M 64k' "$d/i.raw" >/dev/null
for out in human json; do
    CHECKS=$((CHECKS + 1))
    a=$(cd "$d" && qemu-img info -f raw --output=$out i.raw 2>&1)
    b=$(cd "$d" && "$QSM" info -f raw --output=$out i.raw 2>&1)
    [ "$a" = "$b" ] || fail "qsm info -f raw --output=$out differs from qemu-img:"$'\n'"$(diff <(echo "$a") <(echo "$b"))"
done
CHECKS=$((CHECKS + 1))
a=$(qemu-io -f raw -c info -c map -c 'alloc 0 4M' -c 'read -P 7 1M 64k' "$d/i.raw" 2>&1 | filter_timing)
b=$("$QSM" io -f raw -c info -c map -c 'alloc 0 4M' -c 'read -P 7 1M 64k' "$d/i.raw" 2>&1 | filter_timing)
[ "$a" = "$b" ] || fail "qsm io -f raw info/map/alloc/read differ from qemu-io:"$'\n'"$(diff <(echo "$a") <(echo "$b"))"

# -f wins over probing: a raw file holding a qcow2 header is opened as raw
# with -f raw, and a plain raw file is refused with -f qcow2 (without -f it
# is probed: tests/interop/test_probe.sh)
qemu-img create -q -f qcow2 "$d/h.raw" 1M
CHECKS=$((CHECKS + 1))
out=$("$QSM" info -f raw "$d/h.raw" 2>&1)
printf '%s\n' "$out" | grep -q '^file format: raw$' || fail "-f raw on a file with a qcow2 header: $out"
CHECKS=$((CHECKS + 1))
if "$QSM" io -f qcow2 -c 'read 0 512' "$d/i.raw" >"$d/p.out" 2>&1; then
    fail "a raw file was opened as qcow2: $(cat "$d/p.out")"
fi

# truncate through qsm io: the raw file grows, flush works
CHECKS=$((CHECKS + 1))
"$QSM" io -f raw -c 'truncate 8M' -c 'write -P 9 7M 4k' -c flush -c 'read -P 9 7M 4k' "$d/i.raw" >"$d/t.out" 2>&1 ||
    fail "qsm io -f raw truncate/flush: $(cat "$d/t.out")"
[ "$(stat -c %s "$d/i.raw")" = 8388608 ] || fail "raw truncate to 8M left $(stat -c %s "$d/i.raw") bytes"

interop_finish
