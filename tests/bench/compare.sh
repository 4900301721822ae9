#!/usr/bin/env bash
# tests/bench/compare.sh: qemu-img bench and qsm bench side by side.
#
# For each workload below: fresh qcow2 images (64 KiB clusters, 4 GiB), one
# run of `qemu-img bench` per qemu AIO backend (threads, io_uring; the faster
# counts), one run of `qsm bench` with identical options on its own fresh
# image, peak RSS of both (/usr/bin/time), and for the rewrite and read
# workloads fio's figure on a raw file in the same directory (the "raw
# ceiling").  Then every qsm image is checked with `qemu-img check` and
# compared with the qemu image of the same workload (`qemu-img compare`).
# A final table goes to stdout; every command's output is kept in
# $DIR/logs/.  Not a ctest test: timings on a shared machine are noisy.
# See tests/bench/README.md.
#
# Environment:
#   QSM_BENCH_DIR  work directory (default /var/tmp/qsm-bench); must not be
#                  tmpfs (cache=none needs O_DIRECT)
#   SCALE          multiplies every -c (default 1; e.g. 0.25 or 4)
#   QSM            the qsm binary (default: build/qsm of this checkout)
#   QSM_AIO        pass -i QSM_AIO to qsm bench (default: qsm's own default)
#   QEMU_AIOS      qemu-img AIO backends to try (default "threads io_uring")
#   ONLY           space-separated workload names to run (default: all)
#   KEEP=1         keep the images afterwards
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
DIR=${QSM_BENCH_DIR:-/var/tmp/qsm-bench}
SCALE=${SCALE:-1}
QSM=${QSM:-$root/build/qsm}
QSM_AIO=${QSM_AIO:-}
QEMU_AIOS=${QEMU_AIOS:-threads io_uring}
ONLY=${ONLY:-}
KEEP=${KEEP:-0}
TIME=/usr/bin/time
IMG_SIZE=4G
CLUSTER=64k
PREFILL_PATTERN=0x11

# name | qemu-img bench options | prefill | target (qemu/qsm) | fio rw for the ceiling | pattern
# prefill: no (fresh image), yes (first filled by the same requests), or
# backing (a fresh image over a fully allocated qcow2 backing file covering
# every request: each partial-cluster write copies the rest of its cluster
# from the backing file)
WORKLOADS=(
	"alloc-seq-4k|-c 65536 -d 64 -s 4k -t none -w|no|2.0|-|0x21"
	"alloc-writethrough|-c 8192 -d 64 -s 4k -t writethrough -w|no|8|-|0x22"
	"alloc-per-cluster|-c 32768 -d 64 -s 4k -S 64k -t none -w|no|1.5|-|0x23"
	"rewrite-4k|-c 65536 -d 64 -s 4k -t none -w|yes|1.0|write|0x24"
	"read-4k|-c 65536 -d 64 -s 4k -t none|yes|1.0|read|-"
	"cow-backing|-c 32768 -d 64 -s 4k -S 64k -t none -w|backing|1.5|-|0x25"
)

die() { echo "compare.sh: $*" >&2; exit 1; }

for t in qemu-img fio awk; do
	command -v "$t" >/dev/null || die "$t not found"
done
[ -x "$TIME" ] || die "$TIME not found (Debian: apt-get install time)"
[ -x "$QSM" ] || die "qsm binary $QSM not found; build first or set QSM="
mkdir -p "$DIR/logs" || die "cannot create $DIR"
[ "$(stat -f -c %T "$DIR")" = tmpfs ] && die "$DIR is tmpfs; O_DIRECT needs a real file system (set QSM_BENCH_DIR)"
LOG=$DIR/logs

# The block device under $DIR, for device request counts in the logs.
DEV=$(basename "$(df --output=source "$DIR" | tail -1)")
devstat() { awk -v d="$DEV" '$3 == d { print "dev reads " $4 " (merged " $5 "), writes " $8 " (merged " $9 ")" }' /proc/diskstats; }

# scale_opts OPTS: the options with -c multiplied by SCALE.
scale_opts() {
	echo "$1" | awk -v s="$SCALE" '{
		for (i = 1; i <= NF; i++)
			if ($i == "-c") { n = int($(i + 1) * s + 0.5); if (n < 1) n = 1; $(i + 1) = n }
		print }'
}
opt_value() { echo "$1" | awk -v o="$2" '{ for (i = 1; i < NF; i++) if ($i == o) print $(i + 1) }'; }
to_bytes() { numfmt --from=iec "$(echo "$1" | tr 'kmgt' 'KMGT')"; }
# new_image IMG [BACKING]: a fresh image, over BACKING (qcow2) when given.
new_image() {
	rm -f "$1"
	qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER ${2:+-b "$2" -F qcow2} "$1" $IMG_SIZE
}
# make_backing BYTES: $DIR/backing.qcow2, every cluster of [0, BYTES) written
# (untimed; shared read-only by both tools' images).
BACKING=$DIR/backing.qcow2
make_backing() {
	local mib=$(( ($1 + 1048575) / 1048576 ))
	rm -f "$BACKING"
	qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER "$BACKING" "${mib}M" &&
	qemu-img bench -w -t none -d 16 -s 1M -c "$mib" --pattern=$PREFILL_PATTERN "$BACKING" \
		>"$LOG/backing.fill.log" 2>&1
}
secs_of() { sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' "$1"; }

# run_timed LOGFILE CMD...: run with peak RSS into LOGFILE.rss; 0 on success.
run_timed() {
	local log=$1; shift
	echo "\$ $*" >"$log"
	devstat >>"$log"
	"$TIME" -f %M -o "$log.rss" "$@" >>"$log" 2>&1
	local rc=$?
	devstat >>"$log"
	return $rc
}
rss_mib() { awk '{ v = $1 } END { if (v == "") print "-"; else printf "%.1f", v / 1024 }' "$1.rss" 2>/dev/null; }

# fio_ceiling RW BS DEPTH SIZE: best "MiB/s IOPS" of unbatched and batched submission.
RAW=$DIR/raw.img
fio_ceiling() {
	local rw=$1 bs=$2 depth=$3 size=$4 best_bw=0 best_iops=0 b line bw iops
	for b in 1 "$depth"; do
		line=$(fio --name=ceiling --filename="$RAW" --size="$size" --rw="$rw" --bs="$bs" \
			--iodepth="$depth" --iodepth_batch_submit="$b" --iodepth_batch_complete_max="$b" \
			--ioengine=io_uring --direct=1 --numjobs=1 \
			--output-format=terse --terse-version=3 2>>"$LOG/fio.err")
		echo "fio rw=$rw bs=$bs depth=$depth batch=$b: $line" >>"$LOG/fio.log"
		if [ "$rw" = read ]; then
			bw=$(echo "$line" | cut -d';' -f7); iops=$(echo "$line" | cut -d';' -f8)
		else
			bw=$(echo "$line" | cut -d';' -f48); iops=$(echo "$line" | cut -d';' -f49)
		fi
		[ -n "$bw" ] || continue
		if [ "$bw" -gt "$best_bw" ]; then best_bw=$bw; best_iops=$iops; fi
	done
	awk -v bw="$best_bw" -v iops="$best_iops" 'BEGIN { printf "%.1f %d\n", bw / 1024, iops }'
}

want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

start=$(date +%s)
echo "qsm bench vs qemu-img bench: $(qemu-img --version | head -1); qsm $("$QSM" --version)"
echo "dir $DIR ($(stat -f -c %T "$DIR") on $DEV), SCALE=$SCALE, images ${IMG_SIZE} with ${CLUSTER} clusters"
echo "logs in $LOG"
echo

ROWS=()
VERIFY=()
for w in "${WORKLOADS[@]}"; do
	IFS='|' read -r name opts prefill target ceil pat <<<"$w"
	want "$name" || continue
	opts=$(scale_opts "$opts")
	count=$(opt_value "$opts" -c)
	bs=$(to_bytes "$(opt_value "$opts" -s)")
	depth=$(opt_value "$opts" -d)
	patopt=""
	[ "$pat" != - ] && patopt="--pattern=$pat"
	# The prefill: the same requests, as writes of another pattern.
	fillopts="$(echo "$opts" | sed 's/ -w\b//') -w --pattern=$PREFILL_PATTERN"
	note=""
	[ "$prefill" = yes ] && note=" (on an image first filled by the same requests, --pattern=$PREFILL_PATTERN)"
	backing=""
	if [ "$prefill" = backing ]; then
		step=$(opt_value "$opts" -S)
		span=$((count * $(to_bytes "${step:-$(opt_value "$opts" -s)}")))
		make_backing "$span" || die "cannot make the backing file, see $LOG/backing.fill.log"
		backing=$BACKING
		note=" (fresh image over a fully allocated backing file of $((span >> 20)) MiB)"
	fi
	echo "== $name: bench $opts $patopt$note"
	wstart=$SECONDS

	# qemu-img, once per AIO backend; keep the faster image.
	qemu_s=""; qemu_aio=""; qemu_rss="-"; qemu_img=""
	for aio in $QEMU_AIOS; do
		img=$DIR/$name.qemu-$aio.qcow2
		new_image "$img" "$backing"
		if [ "$prefill" = yes ]; then
			qemu-img bench -i "$aio" $fillopts "$img" >"$LOG/$name.qemu-$aio.fill.log" 2>&1 ||
				echo "   qemu-img prefill ($aio) failed, see $LOG/$name.qemu-$aio.fill.log"
		fi
		sync
		if run_timed "$LOG/$name.qemu-$aio.log" qemu-img bench -i "$aio" $opts $patopt "$img"; then
			s=$(secs_of "$LOG/$name.qemu-$aio.log")
			echo "   qemu-img -i $aio: $s s, peak RSS $(rss_mib "$LOG/$name.qemu-$aio.log") MiB"
			if [ -z "$qemu_s" ] || awk -v a="$s" -v b="$qemu_s" 'BEGIN { exit !(a < b) }'; then
				[ -n "$qemu_img" ] && rm -f "$qemu_img"
				qemu_s=$s; qemu_aio=$aio; qemu_img=$img
				qemu_rss=$(rss_mib "$LOG/$name.qemu-$aio.log")
			else
				rm -f "$img"
			fi
		else
			echo "   qemu-img -i $aio FAILED, see $LOG/$name.qemu-$aio.log"
			rm -f "$img"
		fi
	done

	# qsm, same options, its own fresh image.
	qimg=$DIR/$name.qsm.qcow2
	qsmaio=""
	[ -n "$QSM_AIO" ] && qsmaio="-i $QSM_AIO"
	new_image "$qimg" "$backing"
	if [ "$prefill" = yes ]; then
		"$QSM" bench $qsmaio $fillopts -q "$qimg" >"$LOG/$name.qsm.fill.log" 2>&1 ||
			echo "   qsm prefill failed, see $LOG/$name.qsm.fill.log"
	fi
	sync
	qsm_s=""; qsm_rss="-"
	if run_timed "$LOG/$name.qsm.log" "$QSM" bench $qsmaio $opts $patopt "$qimg"; then
		qsm_s=$(secs_of "$LOG/$name.qsm.log")
		qsm_rss=$(rss_mib "$LOG/$name.qsm.log")
		echo "   qsm bench: $qsm_s s, peak RSS $qsm_rss MiB"
		sed -n '/^Elapsed/,$p' "$LOG/$name.qsm.log" | grep -v '^dev ' | sed 's/^/     /'
	else
		echo "   qsm bench FAILED, see $LOG/$name.qsm.log"
		tail -3 "$LOG/$name.qsm.log" | sed 's/^/     /'
	fi

	# fio on a raw file: the ceiling for the same block size, depth and pattern.
	ceil_bw="-"; ceil_iops="-"
	if [ "$ceil" != - ]; then
		size=$((count * bs))
		if [ ! -f "$RAW" ] || [ "$(stat -c %s "$RAW")" -lt "$size" ]; then
			rm -f "$RAW"   # lay the file out (untimed) so rewrites and reads hit written blocks
			fio --name=layout --filename="$RAW" --size="$size" --rw=write --bs=1M --iodepth=8 \
				--ioengine=io_uring --direct=1 --output-format=terse >/dev/null 2>>"$LOG/fio.err"
		fi
		read -r ceil_bw ceil_iops <<<"$(fio_ceiling "$ceil" "$bs" "$depth" "$size")"
		echo "   fio $ceil raw ceiling: $ceil_bw MiB/s, $ceil_iops IOPS"
	fi

	# Verify: the qsm image is clean and holds what qemu-img's holds.
	check="-"
	vstart=$SECONDS
	if [ -n "$qsm_s" ]; then
		if qemu-img check "$qimg" >"$LOG/$name.check.log" 2>&1; then check="clean"; else check="CHECK-FAIL"; fi
		if [ -n "$qemu_img" ]; then
			if qemu-img compare "$qemu_img" "$qimg" >"$LOG/$name.compare.log" 2>&1; then
				check="$check,identical"
			else
				check="$check,DIFFERENT"
			fi
		fi
		echo "   verify: $check ($((SECONDS - vstart)) s)"
	fi
	VERIFY+=("$check")
	if [ "$KEEP" != 1 ]; then
		rm -f "$qimg" "$qemu_img"
	fi

	# The row.
	ratio="-"; met="-"; qsm_mib="-"; vs_ceil="-"
	if [ -n "$qemu_s" ] && [ -n "$qsm_s" ]; then
		ratio=$(awk -v a="$qemu_s" -v b="$qsm_s" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }')
		met=$(awk -v r="$ratio" -v t="$target" 'BEGIN { print (r == "inf" || r + 0 >= t + 0) ? "yes" : "NO" }')
	fi
	if [ -n "$qsm_s" ]; then
		qsm_mib=$(awk -v c="$count" -v bs="$bs" -v s="$qsm_s" 'BEGIN { if (s > 0) printf "%.1f", c * bs / s / 1048576; else print "-" }')
		if [ "$ceil_bw" != - ] && [ "$qsm_mib" != - ]; then
			vs_ceil=$(awk -v q="$qsm_mib" -v c="$ceil_bw" 'BEGIN { if (c > 0) printf "%.2f", q / c; else print "-" }')
		fi
	fi
	echo "   ($((SECONDS - wstart)) s for this workload)"
	ROWS+=("$name|${qemu_s:-FAIL}${qemu_aio:+ ($qemu_aio)}|${qsm_s:-FAIL}|$ratio|>= $target|$met|$qemu_rss|$qsm_rss|$qsm_mib|$ceil_bw|$ceil_iops|$vs_ceil|$check")
	echo
done
[ "$KEEP" != 1 ] && rm -f "$RAW" "$BACKING"

echo "== Summary (SCALE=$SCALE, $(($(date +%s) - start)) s in all; seconds from \"Run completed in\")"
fmt="%-19s %-18s %7s %8s %7s %4s %9s %8s %9s %11s %9s %8s  %s\n"
printf "$fmt" workload "qemu s (aio)" "qsm s" qemu/qsm target met "qemuRSS" "qsmRSS" "qsm MiB/s" "ceil MiB/s" "ceil IOPS" "qsm/ceil" "verify"
printf "$fmt" "" "" "" "" "" "" "MiB" "MiB" "" "(fio raw)" "(fio raw)" "" ""
for r in "${ROWS[@]}"; do
	IFS='|' read -r a b c d e f g h i j k l m <<<"$r"
	printf "$fmt" "$a" "$b" "$c" "$d" "$e" "$f" "$g" "$h" "$i" "$j" "$k" "$l" "$m"
done

# Exit status: 1 if any qsm image failed verification or any run failed (not for missed targets).
status=0
for v in "${VERIFY[@]}"; do
	case "$v" in *FAIL*|*DIFFERENT*|-) status=1 ;; esac
done
for r in "${ROWS[@]}"; do
	case "$r" in *FAIL*) status=1 ;; esac
done
exit $status
