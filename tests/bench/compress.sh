#!/bin/bash
# tests/bench/compress.sh: compressed writes, qsm's worker pool with 1 and 2
# threads (bench_compress, the library through qsm_write_compressed) beside
# `qemu-img convert -c` of the same raw data, one run each, side by side.
# Data: SIZE_MB (default 256) MiB, mostly compressible (text-like, 9 parts in
# 10) with a tenth of random data.  Run by hand, not by ctest.
set -eu
SRC=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-$SRC/build}
DIR=${QSM_BENCH_DIR:-/var/tmp/qsm-bench}
MB=${SIZE_MB:-256}
mkdir -p "$DIR"
python3 - "$DIR/src.raw" "$MB" <<'PY'
import os, random, sys
out, mb = sys.argv[1], int(sys.argv[2])
r = random.Random(1)
words = [("".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9)))).encode()
         for _ in range(4000)]
with open(out, "wb") as f:
    for i in range(mb * 16):               # 64 KiB blocks
        if i % 10 == 9:
            f.write(os.urandom(65536))
            continue
        b = bytearray()
        while len(b) < 65536:
            b += r.choice(words) + b" "
        f.write(bytes(b[:65536]))
PY
sync
for t in 1 2; do
    rm -f "$DIR/qsm.qcow2"
    qemu-img create -q -f qcow2 "$DIR/qsm.qcow2" "${MB}M"
    "$BUILD/bench_compress" "$DIR/src.raw" "$DIR/qsm.qcow2" "$t"
    qemu-img check -q "$DIR/qsm.qcow2"
done
rm -f "$DIR/qemu.qcow2"
/usr/bin/time -f "qemu-img convert -c: %e s wall, %U+%S s CPU" \
    qemu-img convert -c -f raw -O qcow2 "$DIR/src.raw" "$DIR/qemu.qcow2"
qemu-img compare -q "$DIR/qsm.qcow2" "$DIR/qemu.qcow2" && echo "contents identical"
ls -l "$DIR/qsm.qcow2" "$DIR/qemu.qcow2" | awk '{print $5, $9}'
