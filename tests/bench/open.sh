#!/usr/bin/env bash
# tests/bench/open.sh: what opening a large image costs, qsm against qemu-io.
#
# For each size (default 1G 4T 15T): an image made by
#   qemu-img create -f qcow2 -o preallocation=metadata
# (every L2 table and data cluster allocated, the file sparse: ~160 MiB of
# metadata per TiB at 64 KiB clusters), then, REPS times each, alternating:
#   qemu-io -f qcow2 -c 'read 0 4k' -c 'write 4k 4k' IMG
#   qsm io  -f qcow2 -c 'read 0 4k' -c 'write 4k 4k' IMG'
# (open, one read, one write in place, close; the default cache mode,
# writethrough, for both) under /usr/bin/time, on two copies of the image.
# The best time and the lowest peak RSS of each tool count.  The table gives
# both and their ratios (qsm / qemu-io), and qsm's time and RSS relative to
# its own on the smallest image: targets are the same cost at every size and
# a peak RSS within 1.5x of qemu-io's.  Both copies are then checked with
# qemu-img check.  Not a ctest test (timings on a shared machine are noisy).
#
# Environment:
#   QSM_BENCH_DIR  work directory (default /var/tmp/qsm-bench-open); a
#                  16 TiB image needs ~2.6 GiB of disk (x2 copies) and a few
#                  minutes to create; images are kept for the next run
#                  unless KEEP=0
#   SIZES          image sizes (default "1G 4T 15T": on ext4, whose files
#                  stop at 16 TiB, a metadata-preallocated 16T image cannot
#                  be made, its file being 16 TiB plus its metadata; a size
#                  whose image cannot be created is reported and skipped)
#   REPS           runs per tool and size (default 5)
#   QSM            the qsm binary (default: build/qsm of this checkout)
#   KEEP           1 (default): keep the images for the next run
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
DIR=${QSM_BENCH_DIR:-/var/tmp/qsm-bench-open}
SIZES=${SIZES:-1G 4T 15T}
REPS=${REPS:-5}
QSM=${QSM:-$root/build/qsm}
KEEP=${KEEP:-1}
TIME=/usr/bin/time

die() { echo "open.sh: $*" >&2; exit 1; }

if [ ! -x "$TIME" ]; then
	# GNU time (Debian package `time`): the shell's time has no peak RSS.
	command -v apt-get >/dev/null && apt-get install -y -q time >/dev/null 2>&1
	[ -x "$TIME" ] || die "$TIME not found (Debian: apt-get install time)"
fi
for t in qemu-img qemu-io awk; do
	command -v "$t" >/dev/null || die "$t not found"
done
[ -x "$QSM" ] || die "qsm binary $QSM not found; build first or set QSM="
mkdir -p "$DIR/logs" || die "cannot create $DIR"

CMDS=(-c 'read 0 4k' -c 'write 4k 4k')

# run TOOL IMG LOG: one open/read/write/close; prints "seconds kbytes".
run() {
	local tool=$1 img=$2 log=$3
	if [ "$tool" = qemu ]; then
		"$TIME" -f '%e %M' -o "$log.time" qemu-io -f qcow2 "${CMDS[@]}" "$img" >"$log" 2>&1
	else
		"$TIME" -f '%e %M' -o "$log.time" "$QSM" io -f qcow2 "${CMDS[@]}" "$img" >"$log" 2>&1
	fi || die "$tool failed on $img (see $log)"
	tail -n 1 "$log.time"
}

status=0
declare -A QT QM ST SM
for size in $SIZES; do
	img="$DIR/prealloc-$size.qcow2"
	if [ ! -s "$img" ]; then
		echo "creating $img (preallocation=metadata) ..." >&2
		start=$(date +%s)
		if ! qemu-img create -q -f qcow2 -o preallocation=metadata "$img" "$size" \
			>"$DIR/logs/create-$size.log" 2>&1; then
			echo "open.sh: cannot create a $size image here, skipped:" >&2
			sed 's/^/  /' "$DIR/logs/create-$size.log" >&2
			rm -f "$img"
			continue
		fi
		echo "  $(( $(date +%s) - start )) s, $(du -h "$img" | cut -f1) on disk" >&2
	fi
	cp --sparse=always "$img" "$DIR/qemu-$size.qcow2"
	cp --sparse=always "$img" "$DIR/qsm-$size.qcow2"
	bq=; bqm=; bs=; bsm=
	for ((r = 0; r < REPS; r++)); do
		read -r t m < <(run qemu "$DIR/qemu-$size.qcow2" "$DIR/logs/qemu-$size-$r")
		awk -v a="$t" -v b="${bq:-1e9}" 'BEGIN { exit !(a < b) }' && bq=$t
		[ -z "$bqm" ] || [ "$m" -lt "$bqm" ] && bqm=$m
		read -r t m < <(run qsm "$DIR/qsm-$size.qcow2" "$DIR/logs/qsm-$size-$r")
		awk -v a="$t" -v b="${bs:-1e9}" 'BEGIN { exit !(a < b) }' && bs=$t
		[ -z "$bsm" ] || [ "$m" -lt "$bsm" ] && bsm=$m
	done
	QT[$size]=$bq; QM[$size]=$bqm; ST[$size]=$bs; SM[$size]=$bsm
	DONE="${DONE:-} $size"
	for tool in qemu qsm; do
		if ! qemu-img check -q "$DIR/$tool-$size.qcow2" >"$DIR/logs/check-$tool-$size.log" 2>&1; then
			echo "open.sh: qemu-img check failed on the $tool copy ($size)" >&2
			status=1
		fi
	done
	[ "$KEEP" = 1 ] || rm -f "$img"
	rm -f "$DIR/qemu-$size.qcow2" "$DIR/qsm-$size.qcow2"
done

DONE=${DONE# }
[ -n "$DONE" ] || die "no image could be measured"
first=${DONE%% *}
printf '%-6s %10s %10s %8s %10s %10s %8s %12s %12s\n' size qemu-io_s qsm_s time_x \
	qemu-io_MB qsm_MB rss_x "qsm_s/$first" "qsm_MB/$first"
for size in $DONE; do
	awk -v size="$size" -v qt="${QT[$size]}" -v qm="${QM[$size]}" -v st="${ST[$size]}" \
	    -v sm="${SM[$size]}" -v st0="${ST[$first]}" -v sm0="${SM[$first]}" 'BEGIN {
		# /usr/bin/time reports 0.00 s under 5 ms: ratios use 0.005 then
		d = 0.005
		printf "%-6s %10.2f %10.2f %8.2f %10.1f %10.1f %8.2f %12.2f %12.2f\n", size, qt, st,
		       (st > d ? st : d) / (qt > d ? qt : d), qm / 1024, sm / 1024, sm / qm,
		       (st > d ? st : d) / (st0 > d ? st0 : d), sm / sm0
	}'
done
echo "(times: best of $REPS, /usr/bin/time's 10 ms resolution; MB: lowest peak RSS; logs in $DIR/logs)"
exit $status
