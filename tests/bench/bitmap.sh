#!/usr/bin/env bash
# tests/bench/bitmap.sh: what recording into a persistent dirty bitmap costs,
# qsm beside qemu-img, side by side in one run (#16).
#
#  1. `bench -w -s 4k -S 64k` (one 4 KiB write per cluster: each allocates)
#     and `bench -w -s 4k` over allocated data (rewrites in place), by
#     qemu-img bench and qsm bench with the same options, on copies of an
#     image with no bitmap and with one enabled bitmap (64 KiB granules);
#  2. a one-write session (qemu-io / qsm io) on a 1 TiB image with an
#     enabled bitmap: the open loads the bitmap (qsm also moves it to fresh
#     clusters, sm/bitmaps.c) and the close stores it back.
# REPEAT rounds, the tools' order alternating; medians of wall time.  Every
# image must check clean afterwards.  Prints the times, the ratios
# qemu-img/qsm and each tool's with-bitmap/without ratio; exits 1 only when
# something did not run.
#
# Environment: QSM (the binary) [build/qsm]  QSM_BENCH_DIR [/var/tmp/qsm-bench-bitmap]
#   WRITES bench requests [32768]  REPEAT [3]  CACHE [none]  KEEP=1 keep the work directory
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
QSM=${QSM:-$SRC/build/qsm}
DIR=${QSM_BENCH_DIR:-/var/tmp/qsm-bench-bitmap}
WRITES=${WRITES:-32768}
REPEAT=${REPEAT:-3}
CACHE=${CACHE:-none}
errors=0
die() { echo "bitmap.sh: $*" >&2; exit 1; }
for t in qemu-img qemu-io "$QSM"; do command -v "$t" >/dev/null || die "$t not found"; done
mkdir -p "$DIR" || die "cannot create $DIR"
WORK=$(mktemp -d "$DIR/run.XXXXXX") || die "mktemp failed"
trap '[ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"' EXIT

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
# timed CMD...: wall seconds of CMD (its failure counted)
timed() {
    local t0 t1
    t0=$(now)
    "$@" >/dev/null 2>"$WORK/err" || { echo "bitmap.sh: $* failed: $(cat "$WORK/err")" >&2; errors=$((errors + 1)); }
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }'
}
clean() { qemu-img check -q "$1" >/dev/null 2>&1 || { echo "bitmap.sh: $1 is not clean" >&2; errors=$((errors + 1)); }; }

MB=$((WRITES * 64 / 1024 + 64))
qemu-img create -q -f qcow2 "$WORK/empty.qcow2" "${MB}M"
qemu-img create -q -f qcow2 "$WORK/full.qcow2" "${MB}M"
qemu-img bench -w -s 1M -c "$MB" -t none "$WORK/full.qcow2" >/dev/null || die "qemu-img bench (filling)"
for b in empty full; do
    cp "$WORK/$b.qcow2" "$WORK/$b-bm.qcow2"
    qemu-img bitmap --add "$WORK/$b-bm.qcow2" b || die "qemu-img bitmap"
done
qemu-img create -q -f qcow2 "$WORK/huge.qcow2" 1T
qemu-img bitmap --add "$WORK/huge.qcow2" b || die "qemu-img bitmap"

declare -A T M
# run TOOL CASE: one round of CASE by TOOL (qemu or qsm) on a fresh copy
run() {
    local tool=$1 c=$2 img="$WORK/r.qcow2" src opts t
    case $c in
    alloc*) src=empty opts=(-w -s 4k -S 64k -c "$WRITES") ;;
    rewrite*) src=full opts=(-w -s 4k -c "$WRITES") ;;
    session) src=huge ;;
    esac
    [[ $c = *-bm ]] && src=$src-bm
    cp "$WORK/$src.qcow2" "$img"
    if [ "$c" = session ]; then
        if [ "$tool" = qemu ]; then t=$(timed qemu-io -f qcow2 -t "$CACHE" -c 'write 1G 4k' "$img")
        else t=$(timed "$QSM" io -f qcow2 -t "$CACHE" -c 'write 1G 4k' "$img"); fi
    elif [ "$tool" = qemu ]; then t=$(timed qemu-img bench -f qcow2 -t "$CACHE" "${opts[@]}" "$img")
    else t=$(timed "$QSM" bench -f qcow2 -t "$CACHE" "${opts[@]}" "$img"); fi
    clean "$img"
    T[$tool.$c]="${T[$tool.$c]:-} $t"
}
CASES=(alloc alloc-bm rewrite rewrite-bm session)
for ((r = 0; r < REPEAT; r++)); do
    for c in "${CASES[@]}"; do
        if [ $((r % 2)) = 0 ]; then run qemu "$c"; run qsm "$c"; else run qsm "$c"; run qemu "$c"; fi
    done
done
printf '%-12s %10s %10s %10s\n' case qemu-img qsm qemu/qsm
for c in "${CASES[@]}"; do
    # shellcheck disable=SC2086 # the rounds' times, one word each
    q=$(median ${T[qemu.$c]}) s=$(median ${T[qsm.$c]})
    M[$c]="$q $s"
    printf '%-12s %10s %10s %10s\n' "$c" "$q" "$s" "$(ratio "$q" "$s")"
done
for c in alloc rewrite; do
    read -r q0 s0 <<<"${M[$c]}"
    read -r q1 s1 <<<"${M[$c-bm]}"
    echo "$c: with a bitmap / without: qemu-img $(ratio "$q1" "$q0"), qsm $(ratio "$s1" "$s0")"
done
[ $errors = 0 ] || exit 1
