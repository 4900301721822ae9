#!/usr/bin/env bash
# tests/bench/nbd.sh: an NBD server against qemu-nbd, side by side in one run
# (#14, Performance): fio 4 KiB random writes and reads at iodepth 32 through
# fio's nbd engine over a Unix socket, on a fresh and on a fully allocated
# qcow2 image, the same job and the same server options for both servers;
# fio directly on a raw file with the same contents gives the ceiling for
# allocated reads.  Prints IOPS, p99 completion latency and the ratios, and
# PASS/MISS for the issue's targets (server >= 1.5x qemu-nbd's IOPS with a
# lower p99; allocated reads >= 0.8x raw).  A missed target does not fail the
# run (exit 1 only when something did not run); see tests/bench/README.md.
#
# Environment (defaults in brackets):
#   NBD_SERVER   the server under test, qemu-nbd's command line [build/qsm nbd]
#   REF_SERVER   the reference [qemu-nbd]
#   QSM_BENCH_DIR  work directory, not tmpfs [/var/tmp/qsm-bench-nbd]
#   SIZE [1G]  RUNTIME seconds per fio run [8]  RAMP seconds [2]
#   REPEAT       rounds per workload, servers alternating first; medians [3]
#   CACHE        --cache for both servers, none|writeback [none]
#   AIO          --aio for both servers (threads|io_uring) [each one's default]
#   ONLY         workload names to run [all: write-fresh write-alloc read-alloc read-fresh]
#   PERF=1       after the measured rounds, one more run per server under
#                perf record, and its CPU split (engine, libc, loop, socket,
#                disk, kmem, syscall, sched: tests/bench/perf_split.py)
#   KEEP=1       keep the work directory (fio JSON and server logs in it)
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
read -r -a SRV <<<"${NBD_SERVER:-$SRC/build/qsm nbd}"
read -r -a REF <<<"${REF_SERVER:-qemu-nbd}"
DIR=${QSM_BENCH_DIR:-/var/tmp/qsm-bench-nbd}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-8}
RAMP=${RAMP:-2}
REPEAT=${REPEAT:-3}
CACHE=${CACHE:-none}
ONLY=${ONLY:-write-fresh write-alloc read-alloc read-fresh}
SERVER_OPTS=(-t -f qcow2 --cache="$CACHE")
[ -n "${AIO:-}" ] && SERVER_OPTS+=(--aio="$AIO")
errors=0

die() { echo "nbd.sh: $*" >&2; exit 1; }
for t in fio qemu-img python3 "${REF[0]}" "${SRV[0]}"; do
    command -v "$t" >/dev/null || die "$t not found"
done
"${SRV[@]}" --help >/dev/null 2>&1 || die "'${SRV[*]} --help' fails: no NBD server there"
"${REF[@]}" --help >/dev/null 2>&1 || die "'${REF[*]} --help' fails"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
case $CACHE in none) DIRECT=1;; writeback) DIRECT=0;; *) die "CACHE=$CACHE: none or writeback";; esac

mkdir -p "$DIR" || die "cannot create $DIR"
WORK=$(mktemp -d "$DIR/run.XXXXXX") || die "mktemp failed"
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID"
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
if [ "$DIRECT" = 1 ]; then
    dd if=/dev/zero of="$WORK/.probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null ||
        die "$DIR does not support O_DIRECT (CACHE=none); set QSM_BENCH_DIR or CACHE=writeback"
    rm -f "$WORK/.probe"
fi

# The images: a raw file full of data and its qcow2 copy (qemu-img convert:
# every cluster allocated, in order); fresh images are made per run.
echo "preparing $SIZE of data in $WORK ..." >&2
head -c "$(numfmt --from=iec "$SIZE")" /dev/zero | tr '\0' 'Z' >"$WORK/full.raw" || die "raw file"
qemu-img convert -f raw -O qcow2 "$WORK/full.raw" "$WORK/full.qcow2" || die "qemu-img convert"
sync

# fio_json FILE: "IOPS P99_US" of the one job's read or write side
fio_json() {
    python3 - "$1" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["write"] if job["write"]["total_ios"] > 0 else job["read"]
pct = side["clat_ns"].get("percentile", {})
print("%.0f %.0f" % (side["iops"], pct.get("99.000000", 0) / 1000.0))
PY
}

# o_direct PID IMG: is the image open with O_DIRECT (040000 in
# /proc/PID/fdinfo's octal flags)?  "yes" (every fd on IMG), "yes+buf" (an
# O_DIRECT fd and a buffered one: qsm keeps the second for requests that are
# not aligned, io/io.c qsm_io_fds_pick_, so fio's aligned 4 KiB requests all
# use the O_DIRECT one), "no", or "no-fd".
o_direct() {
    local pid=$1 img fd flags yes=0 no=0
    img=$(readlink -f "$2")
    for fd in /proc/"$pid"/fd/*; do
        [ "$(readlink "$fd")" = "$img" ] || continue
        flags=$(sed -n 's/^flags:[[:space:]]*//p' "/proc/$pid/fdinfo/${fd##*/}")
        if (( (8#$flags & 8#40000) != 0 )); then yes=$((yes + 1)); else no=$((no + 1)); fi
    done
    if [ $yes -gt 0 ] && [ $no = 0 ]; then echo yes
    elif [ $yes -gt 0 ]; then echo yes+buf
    elif [ $no -gt 0 ]; then echo no
    else echo no-fd; fi
}

# run_server TAG RW IMG CMD...: serve IMG with CMD, run the fio job RW over
# its socket; prints "IOPS P99_US ODIRECT" (or nothing on failure).
run_server() {
    local tag=$1 rw=$2 img=$3 sock i=0 rc od
    shift 3
    sock="$WORK/$tag.sock"
    rm -f "$sock"
    "$@" -k "$sock" "${SERVER_OPTS[@]}" "$img" >"$WORK/$tag.server.log" 2>&1 &
    SERVER_PID=$!
    while [ ! -S "$sock" ] && kill -0 "$SERVER_PID" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if [ ! -S "$sock" ]; then
        echo "nbd.sh: $tag: '$*' did not serve $sock" >&2; tail -5 "$WORK/$tag.server.log" >&2
        kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID"; SERVER_PID=
        return 1
    fi
    local perf_pid=
    if [ -n "${PERF_OUT:-}" ]; then   # after the ramp, for the measured time
        (sleep "$RAMP"; exec perf record -q -g -p "$SERVER_PID" -o "$PERF_OUT" -- sleep "$RUNTIME") \
            >"$WORK/$tag.perf.log" 2>&1 &
        perf_pid=$!
    fi
    fio --name="$tag" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs=4k \
        --iodepth=32 --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json --output="$WORK/$tag.json" >"$WORK/$tag.fio.log" 2>&1
    rc=$?
    [ -n "$perf_pid" ] && wait "$perf_pid"
    od=$(o_direct "$SERVER_PID" "$img")
    kill -TERM "$SERVER_PID"; wait "$SERVER_PID"
    local src=$?
    SERVER_PID=
    [ $src = 0 ] || echo "nbd.sh: $tag: the server exited $src after SIGTERM" >&2
    if [ $rc != 0 ]; then
        echo "nbd.sh: $tag: fio exited $rc" >&2; tail -5 "$WORK/$tag.fio.log" >&2
        return 1
    fi
    qemu-img check -q "$img" || echo "nbd.sh: $tag: qemu-img check $img failed" >&2
    echo "$(fio_json "$WORK/$tag.json") $od"
}

# run_raw TAG RW: the same job straight on full.raw (io_uring, else libaio)
run_raw() {
    local tag=$1 rw=$2 eng
    for eng in io_uring libaio; do
        fio --name="$tag" --ioengine=$eng --filename="$WORK/full.raw" --direct=$DIRECT --rw="$rw" \
            --bs=4k --iodepth=32 --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
            --output-format=json --output="$WORK/$tag.json" >"$WORK/$tag.fio.log" 2>&1 &&
            { echo "$(fio_json "$WORK/$tag.json") $eng"; return 0; }
    done
    echo "nbd.sh: $tag: fio on the raw file failed" >&2; tail -5 "$WORK/$tag.fio.log" >&2
    return 1
}

median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }

echo "server: ${SRV[*]}   reference: ${REF[*]}   options: ${SERVER_OPTS[*]}"
echo "fio: 4 KiB, iodepth 32, 1 job, ${RUNTIME} s (+${RAMP} s ramp), median of $REPEAT rounds, nbd engine over a Unix socket; image $SIZE qcow2 (64 KiB clusters)"
printf '\n%-12s %-6s %10s %9s %10s %9s %7s %-7s %s\n' workload image ref_IOPS ref_p99us srv_IOPS srv_p99us srv/ref target "O_DIRECT ref/srv"
summary=()
perfsplit=()
for w in $ONLY; do
    case $w in
    write-fresh) rw=randwrite kind=fresh;;
    write-alloc) rw=randwrite kind=alloc;;
    read-alloc)  rw=randread  kind=alloc;;
    read-fresh)  rw=randread  kind=fresh;;
    *) echo "nbd.sh: unknown workload $w" >&2; errors=$((errors + 1)); continue;;
    esac
    # REPEAT rounds, the servers' order alternating; medians count.  For
    # allocated reads fio on the raw file runs in the same round, between
    # or around the servers, and srv/raw is the median of each round's own
    # ratio: this disk's speed drifts by 2x over minutes (a host's), so
    # only measurements taken together compare.
    declare -A iops=() p99=() od=()
    ri=() rp=() rr=() eng=-
    for ((round = 0; round < REPEAT; round++)); do
        order="ref srv"; [ $((round % 2)) = 1 ] && order="srv ref"
        [ $w = read-alloc ] && order=$(echo "ref srv raw ref srv" | cut -d' ' -f$((round % 3 + 1))-$((round % 3 + 3)))
        for who in $order; do
            if [ $who = raw ]; then
                raw=$(run_raw "$w-raw-$round" randread) || { errors=$((errors + 1)); raw="0 0 -"; }
                set -- $raw
                ri+=("$1"); rp+=("$2"); eng=$3
                continue
            fi
            img="$WORK/$w-$who.qcow2"
            if [ $kind = fresh ]; then
                qemu-img create -q -f qcow2 "$img" "$SIZE"
            else
                cp "$WORK/full.qcow2" "$img"
            fi
            sync
            if [ $who = ref ]; then r=$(run_server "$w-$who-$round" $rw "$img" "${REF[@]}")
            else r=$(run_server "$w-$who-$round" $rw "$img" "${SRV[@]}"); fi
            [ -n "$r" ] || { errors=$((errors + 1)); r="0 0 -"; }
            set -- $r
            iops[$who]="${iops[$who]:-} $1"; p99[$who]="${p99[$who]:-} $2"
            [ "${od[$who]:-$3}" = "$3" ] && od[$who]=$3 || od[$who]=mixed
            [ $who = srv ] && srv_last=$1
            rm -f "$img"
        done
        [ $w = read-alloc ] && rr+=("$(ratio "$srv_last" "${ri[-1]}")")
    done
    res=("$(median ${iops[ref]})" "$(median ${p99[ref]})" "${od[ref]}"
         "$(median ${iops[srv]})" "$(median ${p99[srv]})" "${od[srv]}")
    # res: ref_iops ref_p99 ref_od srv_iops srv_p99 srv_od
    x=$(ratio "${res[3]}" "${res[0]}")
    met=$(awk -v x="$x" -v rp="${res[1]}" -v sp="${res[4]}" \
        'BEGIN { print ((x != "-" && x >= 1.5 && sp < rp) ? "PASS" : "MISS") }')
    printf '%-12s %-6s %10s %9s %10s %9s %7s %-7s %s\n' "$w" "$kind" "${res[0]}" "${res[1]}" \
        "${res[3]}" "${res[4]}" "${x}x" "$met" "${res[2]}/${res[5]}"
    summary+=("$w: srv/ref IOPS ${x}x, p99 ${res[4]} vs ${res[1]} us (target >= 1.5x, lower p99): $met")
    want=$([ "$CACHE" = none ] && echo yes || echo no)
    if [ "${res[2]%+buf}" != "$want" ] || [ "${res[5]%+buf}" != "$want" ]; then
        echo "nbd.sh: $w: --cache=$CACHE but O_DIRECT is ref=${res[2]} srv=${res[5]} on the image (expected $want): not comparable" >&2
        errors=$((errors + 1))
    fi
    if [ "${PERF:-0}" = 1 ]; then
        # One more run per server, not counted: perf record of every thread
        # of the server, split by tests/bench/perf_split.py.
        for who in ref srv; do
            img="$WORK/$w-$who.qcow2"
            if [ $kind = fresh ]; then qemu-img create -q -f qcow2 "$img" "$SIZE"; else cp "$WORK/full.qcow2" "$img"; fi
            if [ $who = ref ]; then cmd=("${REF[@]}"); else cmd=("${SRV[@]}"); fi
            PERF_OUT="$WORK/$w-$who.perf" run_server "$w-$who-perf" $rw "$img" "${cmd[@]}" >/dev/null &&
                perfsplit+=("$(python3 "$SRC/tests/bench/perf_split.py" "$WORK/$w-$who.perf" "$w $who")")
            rm -f "$img"
        done
    fi
    if [ $w = read-alloc ]; then
        set -- "$(median "${ri[@]}")" "$(median "${rp[@]}")" "$eng"
        y=$(median "${rr[@]}")
        met=$(awk -v y="$y" 'BEGIN { print ((y != "-" && y >= 0.8) ? "PASS" : "MISS") }')
        printf '%-12s %-6s %10s %9s %10s %9s %7s %-7s %s\n' "  raw file" "$3" "$1" "$2" \
            "${res[3]}" "${res[4]}" "${y}x" "$met" "direct=$DIRECT"
        summary+=("$w: srv/raw IOPS ${y}x (target >= 0.8): $met")
    fi
done
echo "(raw file row: its ref columns are fio on the raw file directly, in the same rounds; its ratio: the median of each round's srv/raw)"
echo
printf '%s\n' "${summary[@]}"
if [ "${PERF:-0}" = 1 ]; then
    echo
    echo "where the servers' CPU samples go (perf record -g of every thread; tests/bench/perf_split.py):"
    printf '%s\n' "${perfsplit[@]}"
fi
[ $errors = 0 ] || { echo "nbd.sh: $errors run(s) failed or were not comparable" >&2; exit 1; }
exit 0
