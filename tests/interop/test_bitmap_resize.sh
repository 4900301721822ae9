#!/usr/bin/env bash
# tests/interop/test_bitmap_resize.sh: resizing images that keep persistent
# dirty bitmaps, against qemu-img resize / qemu-io truncate 7.2 (issue 16).
#
#   resize  qsm resize and qemu-img resize on copies of one image (enabled
#           and disabled bitmaps at 512 B, 64 KiB and 512 KiB granularity,
#           with bits near the old end), growing inside and past what the
#           tables hold, shrinking to a cluster, a granule and a byte
#           boundary, grown again after a shrink (the bits cut stay clear),
#           at 512 B, 64 KiB and 2 MiB clusters (some cases at 64 KiB
#           only, for time): the same output and exit
#           status, QEMU sees the same bitmaps with the same bits, the
#           images read the same and check clean; then a write into the new
#           area by qemu-io into both is recorded the same;
#   session a truncate and writes after it in one qemu-io / qsm io session:
#           the bitmaps this session records into follow the new size;
#   refuse  a bitmap in use (QEMU's words and exit status), a size a 512 B
#           bitmap cannot cover (qemu-img resizes and loses the bitmap; qsm
#           refuses): the image as it was, its bitmaps and data;
#   open    a table of another size than the disk needs is refused as QEMU
#           refuses it ("Could not read bitmap ... from image");
#   crash   qsm resize killed at each of its writes and syncs (strace): the
#           image opens in QEMU and checks clean but for leaks, its size is
#           the old or the new, and each bitmap is in use (untrusted) or
#           reads as before or as after.
source "$(dirname "$0")/lib.sh"
interop_init
for t in qemu-nbd nbdinfo; do command -v $t >/dev/null || skip "$t not found"; done
cd "$WORK" || die "cd $WORK"
EDIT=(python3 "$INTEROP_DIR/bitmap_edit.py")

norm() { sed -E -e 's/^qsm [a-z]+: /qemu-img: /'; }

# mkimg NAME CLUSTER: 64 MiB, bitmaps e (enabled, default granularity), d
# (disabled, 512k) and s (enabled, 512 B), bits up to the last sector.
mkimg() {
    qemu-img create -q -f qcow2 -o cluster_size=$2 "$1" 64M
    qemu-img bitmap --add "$1" e
    qemu-img bitmap --add -g 512k "$1" d
    qemu-img bitmap --add -g 512 "$1" s
    qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 20M 1M' -c 'write -P 3 40M 4k' \
        -c 'write -P 4 64511k 1k' "$1" >/dev/null
    qemu-img bitmap --disable "$1" d
    qemu-io -f qcow2 -c 'write -P 5 60M 4k' -c 'write -P 6 67108352 512' "$1" >/dev/null
}

# same TAG Q S: QEMU sees the same bitmaps and data in Q and S, S checks clean.
same() {
    CHECKS=$((CHECKS + 2))
    [ "$(bitmaps_state "$1")" = "$(bitmaps_state "$2")" ] && [ -n "$(bitmaps_state "$2")" ] || {
        fail "$3: QEMU sees other bitmaps after qsm than after qemu-img"
        diff <(bitmaps_state "$1") <(bitmaps_state "$2") | head -n 8 | sed 's/^/    | /'
    }
    qemu-img compare -q "$1" "$2" || fail "$3: the images read differently"
    check_clean "$3" "$2"
}

# --- resize ------------------------------------------------------------------
# Each case: the sizes one after another (qemu-img resize --shrink each).
for cs in 512 64k 2M; do
    case $cs in
    512) CASES=("+100M" "33554944" "1M 64M") ;;
    64k) CASES=("+100M" "+40G" "32M" "33554944" "67108352" "1M" "1M 64M" "40M 2G 48M" "+0") ;;
    2M) CASES=("+40G" "32M" "40M 2G 48M") ;;
    esac
    mkimg base.qcow2 $cs
    for c in "${CASES[@]}"; do
        tag="resize: cluster_size $cs, $c"
        cp base.qcow2 q.qcow2
        cp base.qcow2 s.qcow2
        for sz in $c; do
            oq=$(qemu-img resize --shrink q.qcow2 -- "$sz" 2>&1); rq=$?
            os=$("$QSM" resize --shrink s.qcow2 -- "$sz" 2>&1 | norm; exit "${PIPESTATUS[0]}"); rs=$?
            CHECKS=$((CHECKS + 1))
            [ "$rq" = "$rs" ] && [ "$oq" = "$os" ] || fail "$tag: to $sz: qsm gave ($rs) '$os', qemu-img ($rq) '$oq'"
        done
        same q.qcow2 s.qcow2 "$tag"
        for f in q s; do
            qemu-io -f qcow2 -c "write -P 7 $(( $(qemu-img info --output=json $f.qcow2 |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') - 4096 )) 4k" \
                $f.qcow2 >/dev/null
        done
        same q.qcow2 s.qcow2 "$tag, then a write at the end"
    done
done

# --- session -----------------------------------------------------------------
mkimg base.qcow2 64k
for cmds in "truncate 100M;write -P 8 99M 64k;write -P 9 63M 2M" \
            "truncate 30M;write -P 8 29M 1M;truncate 64M;write 50M 512"; do
    tag="session: $cmds"
    args=()
    IFS=';' read -r -a cl <<<"$cmds"
    for c in "${cl[@]}"; do args+=(-c "$c"); done
    cp base.qcow2 q.qcow2
    cp base.qcow2 s.qcow2
    oq=$(qemu-io -f qcow2 "${args[@]}" q.qcow2 2>&1); rq=$?
    os=$("$QSM" io -f qcow2 "${args[@]}" s.qcow2 2>&1); rs=$?
    CHECKS=$((CHECKS + 1))
    [ "$rq" = "$rs" ] || fail "$tag: qsm io exits $rs, qemu-io $rq: $os"
    same q.qcow2 s.qcow2 "$tag"
done

# --- refuse ------------------------------------------------------------------
cp base.qcow2 u.qcow2
"${EDIT[@]}" u.qcow2 entry 1 flags 1   # d in use, as a crashed writer leaves it
for sz in +1M 32M; do
    cp u.qcow2 q.qcow2
    cp u.qcow2 s.qcow2
    oq=$(qemu-img resize --shrink q.qcow2 $sz 2>&1); rq=$?
    os=$("$QSM" resize --shrink s.qcow2 $sz 2>&1 | norm; exit "${PIPESTATUS[0]}"); rs=$?
    CHECKS=$((CHECKS + 1))
    [ "$rq" = "$rs" ] && [ "$oq" = "$os" ] || fail "refuse: in use, $sz: qsm gave ($rs) '$os', qemu-img ($rq) '$oq'"
    same q.qcow2 s.qcow2 "refuse: in use, $sz"
done
cp base.qcow2 s.qcow2
os=$("$QSM" resize s.qcow2 3T 2>&1); rs=$?
CHECKS=$((CHECKS + 1))
[ $rs = 1 ] && grep -q "Bitmap 's' cannot cover 3298534883328 bytes" <<<"$os" ||
    fail "refuse: a 512 B bitmap past 2 TiB: qsm gave ($rs) '$os'"
same base.qcow2 s.qcow2 "refuse: a 512 B bitmap past 2 TiB"

# --- open --------------------------------------------------------------------
# s's table (512 B granularity: 32 entries at 512 B clusters) one entry too
# long for the disk: QEMU refuses the open, so does qsm, in its words.
mkimg big.qcow2 512
"${EDIT[@]}" big.qcow2 entry 2 table_size 33
for t in info check; do
    oq=$(qemu-img $t big.qcow2 2>&1 | head -1); rq=$?
    os=$("$QSM" $t big.qcow2 2>&1 | norm | head -1)
    CHECKS=$((CHECKS + 1))
    [ "$oq" = "$os" ] || fail "open: a table too long: qsm $t says '$os', qemu-img '$oq'"
done

# --- crash -------------------------------------------------------------------
if strace_kill_ok; then
    mkimg base.qcow2 64k
    for sz in +3G 32M; do
        cp base.qcow2 after.qcow2
        "$QSM" resize --shrink after.qcow2 $sz >/dev/null || fail "crash: resize to $sz fails"
        before=$(bitmaps_state base.qcow2) after=$(bitmaps_state after.qcow2)
        points=0 done=0
        for ((k = 1; k <= 200; k++)); do
            cp base.qcow2 k.qcow2
            kill_at $k "$QSM" resize --shrink k.qcow2 $sz
            rc=$?
            [ $rc = 0 ] && { done=1; break; }
            points=$((points + 1))
            tag="crash: resize to $sz killed at call $k"
            CHECKS=$((CHECKS + 2))
            [ $rc = 137 ] || fail "$tag: exit $rc, not a kill"
            crashed_clean "$tag" k.qcow2
            size=$(qemu-img info --output=json k.qcow2 2>/dev/null |
                   python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])' 2>&1)
            [ "$size" = 67108864 ] || [ "$size" = "$(qemu-img info --output=json after.qcow2 |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" ] ||
                fail "$tag: QEMU reads a size of '$size'"
            while read -r name flags g sum; do
                CHECKS=$((CHECKS + 1))
                [[ $flags = *in-use* ]] && continue
                grep -qxF "$name $flags $g $sum" <<<"$before"$'\n'"$after" ||
                    fail "$tag: $name reads neither as before nor as after: $flags $g $sum"
            done < <(bitmaps_state k.qcow2)
        done
        CHECKS=$((CHECKS + 2))
        [ $done = 1 ] || fail "crash: resize to $sz never completed"
        [ $points -ge 5 ] || fail "crash: resize to $sz: only $points kill points"
        log "crash: resize to $sz: $points kill points"
    done
else
    log "crash: strace cannot inject faults here: section not run"
fi
interop_finish
