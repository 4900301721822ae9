#!/usr/bin/env bash
# tests/interop/test_bitmap_cmd.sh: `qsm bitmap` against qemu-img bitmap 7.2
# (issue 16).
#
#   words   every option error and every failing action (missing,
#           existing, in-use, badly sized, badly named bitmaps, a v2 image,
#           granularities out of range, a merge across images of other
#           sizes) and a set of succeeding ones, run by both on copies of
#           the same images: the same messages (but for QEMU's node names)
#           and exit status, and QEMU then sees the same bitmaps with the
#           same bits in both images, which check clean and read the same;
#   steps   one sequence of bitmap commands and guest writes (adds at
#           several granularities, disable, enable, clear, merges within an
#           image, across granularities and from another image, removes to
#           the last), run four ways: qemu-img and qemu-io; qsm bitmap and
#           qsm io; qsm bitmap with qemu-io; qemu-img bitmap with qsm io.
#           After every step QEMU sees the same bitmaps and bits in all
#           four, each checks clean; cluster sizes 512 B, 64 KiB (with lazy
#           refcounts), 2 MiB;
#   convert qsm convert --bitmaps [--skip-broken-bitmaps] against qemu-img
#           convert's on copies of the same sources (raw, v2, an in-use
#           bitmap, bitmaps at 512 B to 512 KiB granularity, enabled and
#           disabled, -c, -B, -l, other cluster sizes): the same messages
#           and exit status; a refused run leaves no target behind (qemu-img
#           leaves its raw or v2 target: the one difference); a finished
#           one holds the same bitmaps and bits as qemu-img's, reads the
#           same and checks clean, and its enabled bitmaps go on recording
#           as qemu-img's do (a qemu-io write into both);
#   crash   qsm bitmap killed at each of its writes and syncs (strace), for
#           an add, a remove, a merge into a disabled bitmap and an enable:
#           the image checks clean but for leaks, and each bitmap reads as
#           before or as after (an enabled one may be in use: untrusted),
#           the directory whole: never a bitmap half changed.
source "$(dirname "$0")/lib.sh"
interop_init
for t in qemu-nbd nbdinfo; do command -v $t >/dev/null || skip "$t not found"; done
cd "$WORK" || die "cd $WORK"
EDIT=(python3 "$(dirname "$0")/bitmap_edit.py")

# QEMU's words, without the node names qsm cannot know.
norm() { sed -E -e 's/^qsm [a-z]+: /qemu-img: /' -e "s/ persistent in '#block[0-9]+':/ persistent:/"; }


# --- words -------------------------------------------------------------------
qemu-img create -q -f qcow2 a.qcow2 64M
qemu-io -f qcow2 -c 'write -P 1 0 1M' a.qcow2 >/dev/null
qemu-img bitmap --add a.qcow2 b
qemu-img bitmap --add --disable -g 512k a.qcow2 c
qemu-img bitmap --add a.qcow2 u
qemu-io -f qcow2 -c 'write -P 2 4M 64k' -c 'write -P 3 9M 4k' a.qcow2 >/dev/null
qemu-img bitmap --disable a.qcow2 b
qemu-img bitmap --merge b a.qcow2 c
qemu-img bitmap --enable a.qcow2 b
"${EDIT[@]}" a.qcow2 entry 2 flags 3     # u: in use, as a crashed QEMU leaves it
qemu-img create -q -f qcow2 o.qcow2 64M
qemu-img bitmap --add -g 4k o.qcow2 ob
qemu-io -f qcow2 -c 'write 30M 8k' -c 'write 63M 1M' o.qcow2 >/dev/null
qemu-img create -q -f qcow2 small.qcow2 32M
qemu-img bitmap --add small.qcow2 sb
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 64M
LONG=$(printf 'x%.0s' $(seq 1024))

# words TAG ARGS...: qsm bitmap ARGS and qemu-img bitmap ARGS in q/ and s/,
# each holding copies of the images.
words() {
    local tag=$1 oq os rq rs f
    shift
    rm -rf q s && mkdir q s
    for f in *.qcow2; do cp "$f" q/ && cp "$f" s/; done
    oq=$(cd q && qemu-img bitmap "$@" 2>&1 | norm; exit "${PIPESTATUS[0]}"); rq=$?
    os=$(cd s && "$QSM" bitmap "$@" 2>&1 | norm; exit "${PIPESTATUS[0]}"); rs=$?
    CHECKS=$((CHECKS + 1))
    if [ "$rq" != "$rs" ] || [ "$oq" != "$os" ]; then
        fail "words: $tag: qsm gave ($rs) and qemu-img ($rq):"
        diff <(printf '%s\n' "$oq") <(printf '%s\n' "$os") | head -n 8 | sed 's/^/    | /'
    fi
    for f in a o; do
        CHECKS=$((CHECKS + 2))
        [ "$(bitmaps_state q/$f.qcow2)" = "$(bitmaps_state s/$f.qcow2)" ] || {
            fail "words: $tag: QEMU sees other bitmaps in $f.qcow2 after qsm than after qemu-img"
            diff <(bitmaps_state q/$f.qcow2) <(bitmaps_state s/$f.qcow2) | head -n 8 | sed 's/^/    | /'
        }
        qemu-img compare -q q/$f.qcow2 s/$f.qcow2 || fail "words: $tag: $f.qcow2 reads differently"
        check_clean "words: $tag: $f.qcow2 after qsm" s/$f.qcow2
    done
}
words "no action" a.qcow2 b
words "no bitmap name" --add a.qcow2
words "two names" --add a.qcow2 n m
words "-g without --add" --remove -g 64k a.qcow2 b
words "-F without -b" --add -F qcow2 a.qcow2 n
words "-b without --merge" --add -b o.qcow2 a.qcow2 n
words "bad -g" --add -g 1x a.qcow2 n
words "negative -g" --add -g -5 a.qcow2 n
for g in 3000 256 4G 0x3; do words "-g $g" --add -g $g a.qcow2 n; done
words "empty name" --add a.qcow2 ''
words "long name" --add a.qcow2 "$LONG"
words "v2 image" --add v2.qcow2 n
words "name taken" --add a.qcow2 c
for op in --remove --clear --enable --disable "--merge b"; do
    # shellcheck disable=SC2086 # the option and its argument
    words "$op of a missing bitmap" $op a.qcow2 nope
done
words "merge from a missing bitmap" --merge nope a.qcow2 b
for op in --enable --disable --clear "--merge b"; do
    # shellcheck disable=SC2086
    words "$op of an in-use bitmap" $op a.qcow2 u
done
words "merge from an in-use bitmap" --merge u a.qcow2 c
words "merge across sizes" --merge sb -b small.qcow2 a.qcow2 b
words "merge from a missing image" --merge ob -b nope.qcow2 a.qcow2 b
words "the second of two adds" --add --add a.qcow2 n
words "a failure ends the run" --clear --remove --remove --clear a.qcow2 c
words "add" --add a.qcow2 n
words "add at 2 GiB" --add -g 2G a.qcow2 n
words "add at 512 B" --add -g 512 a.qcow2 n
words "add disabled" --add --disable a.qcow2 n
words "add and merge" --add -g 128k --merge c a.qcow2 n
words "remove in use" --remove a.qcow2 u
words "remove enabled" --remove a.qcow2 b
words "remove disabled" --remove a.qcow2 c
words "remove then add" --remove --add a.qcow2 c
words "clear disabled" --clear a.qcow2 c
words "clear enabled" --clear a.qcow2 b
words "disable" --disable a.qcow2 b
words "enable" --enable a.qcow2 c
words "enable enabled" --enable a.qcow2 b
words "merge into disabled" --merge b a.qcow2 c
words "merge into enabled" --merge c a.qcow2 b
words "merge into itself" --merge b a.qcow2 b
words "merge from another image" --merge ob -b o.qcow2 a.qcow2 c
words "merge from another image, -F" --merge ob -b o.qcow2 -F qcow2 a.qcow2 b
words "merge across granularities" --merge c -b a.qcow2 o.qcow2 ob
words "-f qcow2" -f qcow2 --clear a.qcow2 b
rm -rf q s

# --- convert -----------------------------------------------------------------
qemu-img create -q -f raw r.raw 64M
cp a.qcow2 ok.qcow2
qemu-img bitmap --remove ok.qcow2 u
qemu-img create -q -f qcow2 -b ok.qcow2 -F qcow2 top.qcow2 64M
qemu-img bitmap --add -g 4k top.qcow2 tb
qemu-io -f qcow2 -c 'write -P 7 2M 72k' -c 'write -z 8M 1M' top.qcow2 >/dev/null
cp ok.qcow2 sn.qcow2
qemu-img snapshot -c sn sn.qcow2
qemu-io -f qcow2 -c 'write -P 8 1M 1M' sn.qcow2 >/dev/null
qemu-img create -q -f qcow2 none.qcow2 64M
# cwords TAG ARGS...: qsm convert ARGS and qemu-img convert ARGS in q/ and s/,
# each holding copies of the sources; the target is the last argument.
cwords() {
    local tag=$1 oq os rq rs f t=${*: -1}
    shift
    rm -rf q s && mkdir q s
    for f in *.qcow2 r.raw; do cp "$f" q/ && cp "$f" s/; done
    oq=$(cd q && qemu-img convert "$@" 2>&1 | norm; exit "${PIPESTATUS[0]}"); rq=$?
    os=$(cd s && "$QSM" convert "$@" 2>&1 | norm | sed "s/'qsm bitmap/'qemu-img bitmap/"
         exit "${PIPESTATUS[0]}"); rs=$?
    CHECKS=$((CHECKS + 1))
    if [ "$rq" != "$rs" ] || [ "$oq" != "$os" ]; then
        fail "convert: $tag: qsm gave ($rs) and qemu-img ($rq):"
        diff <(printf '%s
' "$oq") <(printf '%s
' "$os") | head -n 8 | sed 's/^/    | /'
        return
    fi
    CHECKS=$((CHECKS + 1))
    if [ "$rs" != 0 ]; then
        [ -e "s/$t" ] && fail "convert: $tag: the refused run left $t behind"
        return
    fi
    for f in a o top; do   # the sources, untouched
        CHECKS=$((CHECKS + 1))
        cmp -s "$f.qcow2" "s/$f.qcow2" || fail "convert: $tag: the source $f.qcow2 was changed"
    done
    [ "${t##*.}" = qcow2 ] || return
    CHECKS=$((CHECKS + 2))
    [ "$(bitmaps_state "q/$t")" = "$(bitmaps_state "s/$t")" ] || {
        fail "convert: $tag: QEMU sees other bitmaps in qsm's target than in qemu-img's"
        diff <(bitmaps_state "q/$t") <(bitmaps_state "s/$t") | head -n 8 | sed 's/^/    | /'
    }
    qemu-img compare -q "q/$t" "s/$t" || fail "convert: $tag: the targets read differently"
    check_clean "convert: $tag" "s/$t"
    for f in q s; do qemu-io -f qcow2 -c 'write 17M 300k' "$f/$t" >/dev/null; done
    CHECKS=$((CHECKS + 1))
    [ "$(bitmaps_state "q/$t")" = "$(bitmaps_state "s/$t")" ] ||
        fail "convert: $tag: after a write, qsm's target's bitmaps differ from qemu-img's"
}
cwords "--skip-broken-bitmaps alone" --skip-broken-bitmaps -O qcow2 ok.qcow2 t.qcow2
cwords "from raw" --bitmaps -f raw -O qcow2 r.raw t.qcow2
cwords "from a probed raw" --bitmaps -O qcow2 r.raw t.qcow2
cwords "from v2" --bitmaps -O qcow2 v2.qcow2 t.qcow2
cwords "to raw" --bitmaps -O raw ok.qcow2 t.raw
cwords "to v2" --bitmaps -O qcow2 -o compat=0.10 ok.qcow2 t.qcow2
cwords "an in-use bitmap" --bitmaps -O qcow2 a.qcow2 t.qcow2
cwords "an in-use bitmap skipped" --bitmaps --skip-broken-bitmaps -O qcow2 a.qcow2 t.qcow2
cwords "skip with none broken" --skip-broken-bitmaps --bitmaps -f qcow2 -O qcow2 ok.qcow2 t.qcow2
cwords "enabled and disabled" --bitmaps -O qcow2 ok.qcow2 t.qcow2
cwords "no bitmaps" --bitmaps -O qcow2 none.qcow2 t.qcow2
cwords "4k granularity to 512 B clusters" --bitmaps -O qcow2 -o cluster_size=512 o.qcow2 t.qcow2
cwords "to 2 MiB clusters" --bitmaps -O qcow2 -o cluster_size=2M,lazy_refcounts=on ok.qcow2 t.qcow2
cwords "compressed" --bitmaps -c -O qcow2 ok.qcow2 t.qcow2
cwords "top only (-B)" --bitmaps -O qcow2 -B ok.qcow2 -F qcow2 top.qcow2 t.qcow2
cwords "flattened chain" --bitmaps -O qcow2 top.qcow2 t.qcow2
cwords "a snapshot (-l)" --bitmaps -O qcow2 -l sn sn.qcow2 t.qcow2
cwords "a missing snapshot" --bitmaps -O qcow2 -l nope sn.qcow2 t.qcow2
cwords "without --bitmaps" -O qcow2 ok.qcow2 t.qcow2
rm -rf q s

# --- steps -------------------------------------------------------------------
# A step is "b OPTS... NAME" (a bitmap command on the image) or "i CMD;CMD"
# (a session of guest writes); other.qcow2 holds bitmap "ob" for -b.
STEPS=(
    "b --add a" "b --add -g 512k b" "b --add --disable c" "b --add -g 4k d"
    "i write -P 1 0 1M;write 5M 4k;write -z 9M 128k"
    "b --disable a"
    "i write -P 2 20M 64k;discard 1M 64k"
    "b --merge b c"
    "b --enable a"
    "i write -P 3 33M 3k;write -c 40M 64k"
    "b --clear b"
    "b --merge d a"
    "b --merge ob -b other.qcow2 c"
    "i write -P 4 60M 2M"
    "b --remove c"
    "b --add --merge a e"
    "b --remove a" "b --remove b" "b --remove d"
    "i write 50M 512"
    "b --remove e"
)
# step_run IMG HOW STEP: HOW is "BITMAP-TOOL IO-TOOL" (qemu or qsm each).
step_run() {
    local img=$1 bt=${2% *} it=${2#* } s=$3 a c
    if [ "${s:0:1}" = b ]; then
        read -r -a a <<<"${s:2}"
        set -- "${a[@]:0:${#a[@]}-1}" "$img" "${a[-1]}"
        if [ "$bt" = qemu ]; then qemu-img bitmap "$@"; else "$QSM" bitmap "$@"; fi
    else
        local args=()
        IFS=';' read -r -a c <<<"${s:2}"
        for a in "${c[@]}"; do args+=(-c "$a"); done
        if [ "$it" = qemu ]; then qemu-io -f qcow2 "${args[@]}" "$img"; else "$QSM" io -f qcow2 "${args[@]}" "$img"; fi
    fi
}
HOWS=("qemu qemu" "qsm qsm" "qsm qemu" "qemu qsm")
for cs in 512 64k,lazy_refcounts=on 2M; do
    qemu-img create -q -f qcow2 -o cluster_size=$cs other.qcow2 64M
    qemu-img bitmap --add other.qcow2 ob
    qemu-io -f qcow2 -c 'write 7M 100k' other.qcow2 >/dev/null
    for h in 0 1 2 3; do qemu-img create -q -f qcow2 -o cluster_size=$cs st$h.qcow2 64M; done
    n=0
    for s in "${STEPS[@]}"; do
        n=$((n + 1))
        tag="steps: cluster_size $cs, step $n ($s)"
        for h in 0 1 2 3; do
            step_run st$h.qcow2 "${HOWS[$h]}" "$s" >/dev/null 2>st$h.err
            echo $? >st$h.rc
        done
        want=$(bitmaps_state st0.qcow2)
        for h in 1 2 3; do
            CHECKS=$((CHECKS + 2))
            cmp -s st0.rc st$h.rc || fail "$tag: ${HOWS[$h]} exits $(cat st$h.rc), QEMU $(cat st0.rc): $(cat st$h.err)"
            [ "$(bitmaps_state st$h.qcow2)" = "$want" ] || {
                fail "$tag: QEMU sees other bitmaps after ${HOWS[$h]}"
                diff <(printf '%s\n' "$want") <(bitmaps_state st$h.qcow2) | head -n 8 | sed 's/^/    | /'
            }
            check_clean "$tag: ${HOWS[$h]}" st$h.qcow2
        done
    done
    for h in 1 2 3; do
        CHECKS=$((CHECKS + 2))
        qemu-img compare -q st0.qcow2 st$h.qcow2 || fail "steps: cluster_size $cs: ${HOWS[$h]} reads differently"
        # the last bitmap gone takes the extension and autoclear bit 0 with it, as in QEMU
        [ "$(od -An -j 88 -N 8 -tx1 st$h.qcow2)" = "$(od -An -j 88 -N 8 -tx1 st0.qcow2)" ] ||
            fail "steps: cluster_size $cs: ${HOWS[$h]} leaves other autoclear bits"
    done
    rm -f st?.qcow2 other.qcow2
done

# --- crash -------------------------------------------------------------------
if strace_kill_ok; then
    cp a.qcow2 base.qcow2
    "$QSM" bitmap --remove base.qcow2 u   # in-use bitmaps are QEMU's untrusted ones: none here
    for op in "--add n" "--remove b" "--merge b c" "--enable c"; do
        read -r -a o <<<"$op"
        cp base.qcow2 after.qcow2
        "$QSM" bitmap "${o[@]:0:${#o[@]}-1}" after.qcow2 "${o[-1]}" || fail "crash: $op fails"
        before=$(bitmaps_state base.qcow2) after=$(bitmaps_state after.qcow2)
        points=0 done=0
        for ((k = 1; k <= 100; k++)); do
            cp base.qcow2 k.qcow2
            kill_at $k "$QSM" bitmap "${o[@]:0:${#o[@]}-1}" k.qcow2 "${o[-1]}"
            rc=$?
            [ $rc = 0 ] && { done=1; break; }
            points=$((points + 1))
            tag="crash: $op killed at call $k"
            CHECKS=$((CHECKS + 1))
            [ $rc = 137 ] || fail "$tag: exit $rc, not a kill"
            crashed_clean "$tag" k.qcow2
            got=$(bitmaps_state k.qcow2)
            # all void (killed between the open's header writes), or each
            # bitmap as before or as after, an enabled one maybe in use
            [ -z "$got" ] && [ "$(qemu-img info k.qcow2 | grep -c bitmaps:)" = 0 ] && continue
            while read -r name flags g sum; do
                CHECKS=$((CHECKS + 1))
                line="$name $flags $g $sum"
                if ! grep -qxF "$line" <<<"$before"$'\n'"$after"; then
                    case $flags in
                    *in-use*) grep -q "^$name auto " <<<"$before"$'\n'"$after" ||
                                  fail "$tag: $name, not enabled, is left in use" ;;
                    *) fail "$tag: $name reads neither as before nor as after: $line" ;;
                    esac
                fi
            done <<<"$got"
            CHECKS=$((CHECKS + 1))
            names=$(cut -d' ' -f1 <<<"$got")
            [ "$names" = "$(cut -d' ' -f1 <<<"$before")" ] || [ "$names" = "$(cut -d' ' -f1 <<<"$after")" ] ||
                fail "$tag: the directory is neither the old nor the new: $(echo $names)"
        done
        CHECKS=$((CHECKS + 1))
        [ $done = 1 ] || fail "crash: $op never completed"
        [ $points -ge 3 ] || fail "crash: $op: only $points kill points"
        log "crash: $op: $points kill points"
    done
    rm -f base.qcow2 after.qcow2 k.qcow2
else
    log "crash: strace cannot inject faults here: section not run"
fi
interop_finish
