#!/usr/bin/env bash
# `qsm io` prints what qemu-io prints: a fixed script with writes, reads,
# read -P verification failures, write -z (aligned, unaligned, -u), discard,
# flush, alloc, map and length runs under both on images made by qemu-img;
# stdout must be identical once the timing numbers of the statistics lines
# are blanked (filter_timing in lib.sh), and the exit statuses must match
# (1 here: the script contains failing read -P commands).  `info` is left
# out on purpose: its output names the driver.  The images must compare
# identical and check clean afterwards.
#
# Env: QSM_OUTPUT_COMBOS="cluster:compat:refbits ...".
. "$(dirname "$0")/lib.sh"
interop_init

COMBOS=${QSM_OUTPUT_COMBOS:-"64k:1.1:16 64k:0.10:16 512:1.1:1 4k:0.10:16 2M:1.1:64"}

cat >"$WORK/script" <<'SCRIPT'
length
alloc 0 65536
map
write -P 0xab 0 4096
write -P 17 65000 3000
write -P 0x5a 1M 64k
write -P 200 1073741312 512
write -P 7 2097000 4000
read -P 0xab 0 4096
read -P 0xab 0 4097
read -P 0 1048576 512
read -P 0x5a 1M 64k
read -P 7 2097000 4000
read -P 200 1073741312 512
read 4096 65536
write -z 131072 65536
write -z 1000 100
read -P 0 1000 100
read -P 0xab 1100 2996
read -P 0 131072 65536
alloc 0 65536
alloc 65536 131072
alloc 1M
alloc 1048000 2048
map
discard 0 65536
map
read -P 0 0 65536
read -P 17 65536 1464
write -z -u 196608 65536
alloc 196608 65536
write -z -u 1M 64k
read -P 0x5a 1M 1
flush
write -P 0x33 3M 512
write -z 3M 256
read -P 0 3M 256
read -P 0x33 3145984 256
read -P 0x33 3M 512
discard 2M 1M
read -P 0 2M 1M
map
alloc 0 4M
length
flush
SCRIPT

i=0
for combo in $COMBOS; do
    IFS=: read -r cl compat rb <<<"$combo"
    i=$((i + 1))
    opts="cluster_size=$cl,compat=$compat,refcount_bits=$rb"
    tag="$cl/compat=$compat/refcount_bits=$rb"
    d="$WORK/$i"
    mkdir -p "$d"
    qemu_create "$d/q.qcow2" "$opts" || die "qemu-img create failed"
    qemu_create "$d/s.qcow2" "$opts" || die "qemu-img create failed"
    qemu-io -f qcow2 "$d/q.qcow2" <"$WORK/script" >"$d/q.out" 2>"$d/q.err"
    rc_q=$?
    timeout "$TIMEOUT" "$QSM" io -f qcow2 "$d/s.qcow2" <"$WORK/script" >"$d/s.out" 2>"$d/s.err"
    rc_s=$?
    CHECKS=$((CHECKS + 1))
    if [ $rc_q != $rc_s ]; then
        fail "$tag: qsm io exited $rc_s, qemu-io exited $rc_q"
        show_tail "$d/s.err"
    fi
    CHECKS=$((CHECKS + 1))
    if ! diff -u <(filter_timing <"$d/q.out") <(filter_timing <"$d/s.out") >"$d/diff"; then
        fail "$tag: stdout differs (--- qemu-io, +++ qsm io, timing blanked):"
        head -n 40 "$d/diff" | sed 's/^/    | /'
    fi
    compare_images "$tag: images after the script" "$d/q.qcow2" "$d/s.qcow2"
    check_clean "$tag: qsm's image" "$d/s.qcow2"
    rm -f "$d"/*.qcow2
done

# The filter must blank only the rate line numbers: check it on a sample.
CHECKS=$((CHECKS + 1))
got=$(printf '%s\n' '4 KiB, 1 ops; 00.00 sec (3.970 MiB/sec and 1016.2922 ops/sec)' \
      'qemu-io> 512 bytes, 12 ops; 0:01:02.50 (12.500 bytes/sec and 0.1000 ops/sec)' \
      '1 KiB, 1 ops; 0:32:45.08 (0.521099 bytes/sec and 0.0005 ops/sec)' \
      'read 4096/4096 bytes at offset 0' | filter_timing)
want='4 KiB, 1 ops; T sec (R/sec and R ops/sec)
qemu-io> 512 bytes, 12 ops; T sec (R/sec and R ops/sec)
1 KiB, 1 ops; T sec (R/sec and R ops/sec)
read 4096/4096 bytes at offset 0'
[ "$got" = "$want" ] || fail "filter_timing self-test: got <$got>"

interop_finish
