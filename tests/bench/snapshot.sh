#!/usr/bin/env bash
# tests/bench/snapshot.sh: internal snapshots, qsm against qemu-img, side by
# side in one run (#15, "Faster than QEMU, by design").
#
#  1. create, apply and delete (`snapshot -c/-a/-d`) on a copy of one image
#     with ALLOC of data allocated (virtual size SIZE, 64 KiB clusters); the
#     same random 4 KiB writes (qemu-io, not timed) between create and
#     apply, so apply has copied clusters to release;
#  2. 4 KiB writes over snapshotted data: `qemu-img bench -w` and `qsm
#     bench -w` with the same options on copies of an image whose every
#     cluster a snapshot shares, one write per cluster (-S 64k), so each
#     write copies a cluster (COW: read what the write does not cover).
# REPEAT rounds, the tools' order alternating; medians of wall time.  After
# every step qemu-img check must be clean.  Prints the times, the ratios
# qemu-img/qsm (target >= 1.5 on each, PASS/MISS) and exits 1 only when
# something did not run.
#
# Environment: QSM (the binary) [build/qsm]  QSM_BENCH_DIR [/var/tmp/qsm-bench-snap]
#   SIZE [4G]  ALLOC [2G]  WRITES bench requests [20000]  REPEAT [3]  CACHE [none]
#   KEEP=1 keep the work directory
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
QSM=${QSM:-$SRC/build/qsm}
DIR=${QSM_BENCH_DIR:-/var/tmp/qsm-bench-snap}
SIZE=${SIZE:-4G}
ALLOC=${ALLOC:-2G}
WRITES=${WRITES:-20000}
REPEAT=${REPEAT:-3}
CACHE=${CACHE:-none}
errors=0
die() { echo "snapshot.sh: $*" >&2; exit 1; }
for t in qemu-img qemu-io python3 "$QSM"; do command -v "$t" >/dev/null || die "$t not found"; done
mkdir -p "$DIR" || die "cannot create $DIR"
WORK=$(mktemp -d "$DIR/run.XXXXXX") || die "mktemp failed"
trap '[ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"' EXIT

# now: seconds since the epoch, ns resolution
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
clean() {
    qemu-img check -q "$1" >/dev/null 2>&1 || { echo "snapshot.sh: $2: qemu-img check $1 is not clean" >&2; errors=$((errors + 1)); }
}
# timed TOOL ACTION NAME IMG: wall seconds of one snapshot operation
timed() {
    local t0 t1 rc
    t0=$(now)
    if [ "$1" = qsm ]; then "$QSM" snapshot "-$2" "$3" "$4" >/dev/null 2>"$WORK/err"
    else qemu-img snapshot "-$2" "$3" "$4" >/dev/null 2>"$WORK/err"; fi
    rc=$?
    t1=$(now)
    [ $rc = 0 ] || { echo "snapshot.sh: $1 snapshot -$2 failed: $(cat "$WORK/err")" >&2; errors=$((errors + 1)); }
    clean "$4" "$1 snapshot -$2"
    elapsed "$t0" "$t1"
}

echo "preparing: $SIZE qcow2 image, $ALLOC allocated, in $WORK ..." >&2
head -c "$(numfmt --from=iec "$ALLOC")" /dev/zero | tr '\0' 'Q' >"$WORK/data.raw" || die "raw data"
qemu-img convert -f raw -O qcow2 "$WORK/data.raw" "$WORK/base.qcow2" || die "qemu-img convert"
qemu-img resize -q "$WORK/base.qcow2" "$SIZE" || die "qemu-img resize"
rm -f "$WORK/data.raw"
python3 - "$(numfmt --from=iec "$ALLOC")" >"$WORK/writes.io" <<'PY'
import random, sys
alloc = int(sys.argv[1]); rnd = random.Random(15)
for i in range(2000):
    print("write -P %d %d 4k" % (i % 250 + 1, rnd.randrange(alloc // 4096) * 4096))
PY
sync

declare -A T
for ((round = 0; round < REPEAT; round++)); do
    order="qemu qsm"; [ $((round % 2)) = 1 ] && order="qsm qemu"
    for who in $order; do
        img="$WORK/$who.qcow2"
        cp "$WORK/base.qcow2" "$img" && sync
        T[$who-create]="${T[$who-create]:-} $(timed $who c s1 "$img")"
        qemu-io -f qcow2 "$img" <"$WORK/writes.io" >/dev/null || { echo "snapshot.sh: qemu-io" >&2; errors=$((errors + 1)); }
        sync
        T[$who-apply]="${T[$who-apply]:-} $(timed $who a s1 "$img")"
        T[$who-delete]="${T[$who-delete]:-} $(timed $who d s1 "$img")"
        rm -f "$img"
    done
done

# 4 KiB writes over snapshotted data (each one copies its cluster)
qemu-img snapshot -c shared "$WORK/base.qcow2" || die "snapshot of the base"
sync
alloc_bytes=$(numfmt --from=iec "$ALLOC")
for ((round = 0; round < REPEAT; round++)); do
    order="qemu qsm"; [ $((round % 2)) = 1 ] && order="qsm qemu"
    for who in $order; do
        img="$WORK/$who-cow.qcow2"
        cp "$WORK/base.qcow2" "$img" && sync
        t0=$(now)
        if [ $who = qsm ]; then
            "$QSM" bench -w -q -t "$CACHE" -c "$WRITES" -d 32 -s 4096 -S 65536 -f qcow2 "$img" >/dev/null 2>"$WORK/err"
        else
            qemu-img bench -w -t "$CACHE" -c "$WRITES" -d 32 -s 4096 -S 65536 -f qcow2 "$img" >/dev/null 2>"$WORK/err"
        fi
        rc=$?
        t1=$(now)
        [ $rc = 0 ] || { echo "snapshot.sh: $who bench failed: $(cat "$WORK/err")" >&2; errors=$((errors + 1)); }
        clean "$img" "$who bench -w over a snapshot"
        T[$who-cow]="${T[$who-cow]:-} $(elapsed "$t0" "$t1")"
        rm -f "$img"
    done
done

echo "image: $SIZE virtual, $ALLOC allocated, 64 KiB clusters; median of $REPEAT rounds (wall s)"
printf '%-28s %10s %10s %9s %s\n' step qemu-img qsm qemu/qsm target
for step in create apply delete cow; do
    q=$(median ${T[qemu-$step]}) s=$(median ${T[qsm-$step]})
    x=$(ratio "$q" "$s")
    met=$(awk -v x="$x" 'BEGIN { print (x != "-" && x >= 1.5) ? "PASS" : "MISS" }')
    case $step in
    cow) name="$WRITES x 4k writes (COW, -d 32)";;
    *) name="snapshot $step";;
    esac
    printf '%-28s %10s %10s %8sx %s\n' "$name" "$q" "$s" "$x" "$met"
done
[ $errors = 0 ] || { echo "snapshot.sh: $errors errors" >&2; exit 1; }
