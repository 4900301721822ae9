#!/usr/bin/env bash
# tests/bench/convert.sh: qemu-img convert and qsm convert side by side.
#
# Builds (untimed) a 1 GiB qcow2 source image (64 KiB clusters) with mixed
# contents, in 1 MiB stripes: compressible text-like data, random data,
# zero clusters (qemu-io write -z over data: allocated zero clusters) and
# unallocated ranges.  Then, for plain and -c, converts it to a new qcow2
# image with each tool, RUNS times each, alternating (qemu, qsm, qemu,
# ...), and takes each tool's best wall time and its peak RSS.  Every qsm
# target is checked (qemu-img check) and compared with the source
# (qemu-img compare).  Prints a table with the qemu/qsm time ratio (above 1:
# qsm is faster).  Not a ctest test; see tests/bench/README.md.
#
# Environment:
#   QSM_BENCH_DIR  work directory (default /var/tmp/qsm-bench-convert)
#   SIZE_MB        source size in MiB (default 1024)
#   RUNS           runs per tool and mode (default 3)
#   MODES          which conversions (default "plain c")
#   QSM            the qsm binary (default: build/qsm of this checkout)
#   KEEP=1         keep the images afterwards
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
DIR=${QSM_BENCH_DIR:-/var/tmp/qsm-bench-convert}
SIZE_MB=${SIZE_MB:-1024}
RUNS=${RUNS:-3}
MODES=${MODES:-plain c}
QSM=${QSM:-$root/build/qsm}
KEEP=${KEEP:-0}
TIME=/usr/bin/time

die() { echo "convert.sh: $*" >&2; exit 1; }
for t in qemu-img qemu-io python3 awk; do
	command -v "$t" >/dev/null || die "$t not found"
done
[ -x "$TIME" ] || die "$TIME not found (Debian: apt-get install time)"
[ -x "$QSM" ] || die "qsm binary $QSM not found; build first or set QSM="
mkdir -p "$DIR" || die "cannot create $DIR"
cd "$DIR" || die "cd $DIR"
rm -f src.raw src.qcow2 out-*.qcow2 ./*.rss

echo "building a ${SIZE_MB} MiB source image in $DIR ..."
# Stripe i (1 MiB): 0 text, 1 random, 2 text, 3 zero clusters, 4 random,
# 5 unallocated, 6 text, 7 unallocated (pattern by i mod 8).
python3 - "$SIZE_MB" <<'PY' || die "generating src.raw failed"
import os, random, sys
mb = int(sys.argv[1])
rnd = random.Random(1)
words = ("qcow2 cluster refcount table the a state machine request write read "
         "zero backing file image offset length of to and is in L1 L2 entry").split()
def text():
    out = []
    n = 0
    while n < (1 << 20):
        line = " ".join(rnd.choice(words) for _ in range(rnd.randrange(6, 14))) + ".\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[: 1 << 20]
texts = [text() for _ in range(8)]
with open("src.raw", "wb") as f:
    f.truncate(mb << 20)
    for i in range(mb):
        k = i % 8
        if k in (0, 2, 6):
            f.seek(i << 20); f.write(texts[i % 8 if k else (i // 8) % 8])
        elif k in (1, 4):
            f.seek(i << 20); f.write(os.urandom(1 << 20))
        elif k == 3:
            f.seek(i << 20); f.write(texts[(i + 3) % 8])   # zeroed below
PY
qemu-img convert -f raw -O qcow2 -o cluster_size=64k src.raw src.qcow2 || die "qemu-img convert failed"
# stripes 3, 11, 19, ...: allocated zero clusters
python3 -c "
import sys
for i in range(3, int(sys.argv[1]), 8):
    print('write -z %dM 1M' % i)" "$SIZE_MB" | qemu-io -f qcow2 src.qcow2 >/dev/null || die "qemu-io failed"
rm -f src.raw
sync

# time_run LABEL CMD...: one timed run; appends seconds to LABEL.times and
# peak RSS (KiB) to LABEL.rss
time_run() {
	local label=$1 t0 t1
	shift
	sync
	t0=$(date +%s.%N)
	"$TIME" -f %M -o "$label.rss.1" "$@" >"$label.log" 2>&1 || { cat "$label.log"; die "$* failed"; }
	t1=$(date +%s.%N)
	cat "$label.rss.1" >>"$label.rss"
	awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }' >>"$label.times"
}
best() { sort -g "$1" | head -n 1; }
maxrss() { sort -g "$1" | tail -n 1 | awk '{ printf "%.1f", $1 / 1024 }'; }

status=0
rows=()
for mode in $MODES; do
	opt=""; [ "$mode" = c ] && opt="-c"
	rm -f "qemu-$mode".* "qsm-$mode".*
	for ((r = 1; r <= RUNS; r++)); do
		rm -f out-q.qcow2 out-s.qcow2
		time_run "qemu-$mode" qemu-img convert $opt -f qcow2 -O qcow2 src.qcow2 out-q.qcow2
		time_run "qsm-$mode" "$QSM" convert $opt -f qcow2 -O qcow2 src.qcow2 out-s.qcow2
	done
	verify=ok
	qemu-img check -q out-s.qcow2 || { verify="CHECK FAILED"; status=1; }
	qemu-img compare -q src.qcow2 out-s.qcow2 || { verify="$verify, DIFFERS"; status=1; }
	qs=$(best "qemu-$mode.times"); ss=$(best "qsm-$mode.times")
	qsz=$(du -k out-q.qcow2 | cut -f1); ssz=$(du -k out-s.qcow2 | cut -f1)
	rows+=("$(printf '%-10s %9s %9s %9s %9s %9s %9s %9s  %s' "convert${opt:+ -c}" "$qs" "$ss" \
		"$(awk -v a="$qs" -v b="$ss" 'BEGIN { printf "%.2f", a / b }')" \
		"$(maxrss "qemu-$mode.rss")" "$(maxrss "qsm-$mode.rss")" \
		"$((qsz / 1024))" "$((ssz / 1024))" "$verify")")
	echo "$mode: qemu-img $(tr '\n' ' ' <"qemu-$mode.times")s, qsm $(tr '\n' ' ' <"qsm-$mode.times")s"
done

echo
echo "source: ${SIZE_MB} MiB qcow2 (text, random, zero clusters, unallocated); best of $RUNS runs; $(nproc) CPUs"
printf '%-10s %9s %9s %9s %9s %9s %9s %9s  %s\n' mode "qemu s" "qsm s" qemu/qsm "qemuRSS" "qsmRSS" "qemuMiB" "qsmMiB" verify
for r in "${rows[@]}"; do echo "$r"; done
[ "$KEEP" = 1 ] || rm -f src.qcow2 out-q.qcow2 out-s.qcow2
exit $status
