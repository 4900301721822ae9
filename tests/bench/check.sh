#!/usr/bin/env bash
# tests/bench/check.sh: `qsm check` vs `qemu-img check`, one run side by side:
#   (a) a 64 GiB image with all metadata preallocated (preallocation=metadata)
#   (b) a 1 GiB image fully written
# Prints wall time and peak RSS (/usr/bin/time -f %M) of each and the ratios
# qsm/qemu-img (target: <= 1 for both).
# Environment: QSM (default build/qsm of the source tree), TMPDIR.
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
QSM=${QSM:-$SRC/build/qsm}
[ -x "$QSM" ] || { echo "QSM=$QSM is not executable" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing (apt-get install time)" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/qsm-bench-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

qemu-img create -q -f qcow2 -o preallocation=metadata "$WORK/prealloc.qcow2" 64G
qemu-img create -q -f qcow2 "$WORK/full.qcow2" 1G
qemu-io -f qcow2 -c 'write -P 0x5c 0 1G' "$WORK/full.qcow2" >/dev/null

# run NAME CMD...: "seconds kib" of one run; the check's exit status must be 0
run() {
    local rc
    /usr/bin/time -o "$WORK/time" -f '%e %M' "$@" >/dev/null 2>"$WORK/err"
    rc=$?
    [ $rc = 0 ] || { echo "warning: $* exited $rc" >&2; tail -3 "$WORK/err" >&2; }
    tail -1 "$WORK/time"
}

printf '%-26s %10s %10s %10s %10s %8s %8s\n' image qemu-img_s qsm_s qemu-img_KiB qsm_KiB time_x rss_x
for img in prealloc full; do
    sync
    q=$(run qemu-img check "$WORK/$img.qcow2")
    s=$(run "$QSM" check "$WORK/$img.qcow2")
    set -- $q $s
    printf '%-26s %10s %10s %10s %10s %8s %8s\n' "$img ($(du -h --apparent-size "$WORK/$img.qcow2" | cut -f1))" \
        "$1" "$3" "$2" "$4" \
        "$(awk -v a="$3" -v b="$1" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')" \
        "$(awk -v a="$4" -v b="$2" 'BEGIN { printf "%.2f", a / b }')"
done
