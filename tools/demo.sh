#!/usr/bin/env bash
# tools/demo.sh: build qsm and run it on a real workload, then show the results.
#
#  1. installs missing Debian packages (when run as root);
#  2. builds Release into build/;
#  3. creates a 1 GiB qcow2 image with `qsm create` and a twin with qemu-img;
#  4. runs one mixed concurrent workload (aio writes across L2 tables, zero
#     writes, discards, flushes, verified reads) through `qsm io` on the first
#     and through QEMU's qemu-io on the twin;
#  5. verifies: qemu-img check and qsm check on qsm's image, qemu-img compare
#     of the two, then a short benchmark with engine counters;
#  6. compresses the image with qsm convert -c, maps it, and runs a short
#     qsm fuzz session (crashes and faults on the simulated disk).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PKGS="libevent-dev zlib1g-dev libzstd-dev check liburing-dev pkg-config cmake qemu-utils python3 gcc graphviz libnbd-bin"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

missing=()
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ]; then
		say "installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
	else
		echo "missing packages: ${missing[*]} (run as root to install them)" >&2
		exit 1
	fi
fi

say "building (Release) into $SRC/build"
cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$SRC/build" -j"$(nproc)" >/dev/null
QSM=$SRC/build/qsm

WORK=${QSM_DEMO_DIR:-/var/tmp/qsm-demo}
rm -rf "$WORK" && mkdir -p "$WORK"
IMG=$WORK/qsm.qcow2
TWIN=$WORK/qemu.qcow2

say "creating a 1 GiB image"
"$QSM" create -f qcow2 "$IMG" 1G
qemu-img create -q -f qcow2 "$TWIN" 1G
cmp "$IMG" "$TWIN" && echo "(byte-identical to the image qemu-img create makes)"

say "generating a mixed concurrent workload"
# Batches of concurrent aio writes with distinct patterns over separate
# ranges (several of them straddling L2-table boundaries: one L2 table maps
# 512 MiB at 64 KiB clusters), then zero writes, discards, a flush and reads
# that verify every pattern.
python3 - "$WORK/workload" <<'PY'
import random, sys
random.seed(2026)
out = open(sys.argv[1], "w")
MiB = 1 << 20
regions = []
slot = 0
for batch in range(8):
    for i in range(32):
        if slot == 255:
            # 510..512 MiB: this write straddles the first L2 table's end
            # (one L2 table maps 512 MiB at 64 KiB clusters).
            off, ln = 512 * MiB - 3000, 100000
        else:
            off = slot * 2 * MiB + random.randrange(0, MiB, 512) + random.randrange(0, 512)
            ln = random.choice([4096, 65536, 100000, 300000])
        pat = random.randrange(1, 255)
        out.write(f"aio_write -q -P {pat} {off} {ln}\n")
        regions.append((off, ln, pat))
        slot += 1
    out.write("aio_flush\n")
# Zero writes and discards over some regions, then verify the others.
for off, ln, pat in regions[::7]:
    out.write(f"write -q -z {off} {ln}\n")
for off, ln, pat in regions[3::11]:
    c = 65536
    a = (off + c - 1) // c * c
    if a + c <= off + ln:
        out.write(f"discard -q {a} {c}\n")
out.write("flush\n")
for i, (off, ln, pat) in enumerate(regions):
    if i % 7 and i % 11 != 3:
        out.write(f"read -q -P {pat} {off} {ln}\n")
print(f"{len(regions)} concurrent writes in 8 batches, then zero writes, discards and verified reads", file=sys.stderr)
PY

say "running it through qsm io (and through qemu-io on the twin)"
start=$(date +%s.%N)
"$QSM" io -f qcow2 --trace "$WORK/trace.json" --trace-text "$WORK/trace.txt" "$IMG" \
	< "$WORK/workload" >"$WORK/qsm.out"
end=$(date +%s.%N)
qemu-io -f qcow2 "$TWIN" < "$WORK/workload" >"$WORK/qemu.out"
printf 'qsm io finished in %.2f s; %s requests traced state by state\n' \
	"$(echo "$end - $start" | bc)" "$(wc -l < "$WORK/trace.txt")"
echo "a few of them ($WORK/trace.txt; the timeline $WORK/trace.json opens in Perfetto):"
{ grep -m 3 -E 'L2 alloc @' "$WORK/trace.txt"; grep -m 2 -E 'frozen|alloc wait|join' "$WORK/trace.txt"
  grep -m 2 '^#[0-9]* writeback' "$WORK/trace.txt"; } | cut -c1-220 | sed 's/^/  /' || true

say "verifying"
qemu-img check "$IMG"
echo "and qsm's own checker (same algorithm and messages as qemu-img check):"
"$QSM" check "$IMG"
if qemu-img compare -f qcow2 -F qcow2 "$TWIN" "$IMG"; then
	echo "qsm's image and qemu-io's image have identical contents"
else
	echo "DIFFERENT: see $WORK" >&2
	exit 1
fi
"$QSM" info "$IMG"

if "$QSM" bench --help >/dev/null 2>&1; then
	say "a short benchmark: 32768 random-ish 4 KiB allocating writes, 64 in flight"
	B=$WORK/bench.qcow2
	"$QSM" create -q -f qcow2 "$B" 4G 2>/dev/null || "$QSM" create -f qcow2 "$B" 4G >/dev/null
	"$QSM" bench -w -c 32768 -d 64 -s 4k -S 68k "$B"
	qemu-img check -q "$B" && echo "benchmark image: qemu-img check clean"
fi
say "converting it: qsm convert -c (compression on worker threads) and qsm map"
"$QSM" convert -c -O qcow2 "$IMG" "$WORK/compressed.qcow2"
qemu-img compare -q "$IMG" "$WORK/compressed.qcow2" && echo "compressed copy: identical contents"
printf '%s -> %s bytes\n' "$(stat -c %s "$IMG")" "$(stat -c %s "$WORK/compressed.qcow2")"
"$QSM" map --output=json "$WORK/compressed.qcow2" | sed -n 1,4p

say "fuzzing request orderings: 40 seeded runs with crashes and injected faults"
"$QSM" fuzz --seed 1 --runs 40 --crash --faults --out "$WORK"
echo "(qsm fuzz --help: longer runs, replay files, shrinking; the state diagrams: qsm graph)"

say "done: files in $WORK"
