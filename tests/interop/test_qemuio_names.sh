#!/usr/bin/env bash
# `qsm` run under QEMU's names (symlinks qemu-io, qemu-img, qemu-nbd, as
# README.md says) against the real qemu-io/qemu-img 7.2 on the same command
# lines: failing ones (bad options, missing files, unknown commands, reads
# past the end, read-only writes, unknown qemu-img subcommands) and the open
# options of `open -o`, --image-opts and json: names, good and bad.  For
# every case: stdout and stderr identical after the work directory is
# replaced by WORK and the timing numbers are blanked (filter_timing, as
# QEMU's iotests filter them), identical exit status, and, for cases that
# write, images that qemu-img compare calls identical.  Each side runs in a
# directory of its own holding the same images, so relative names match.
# Also: `qsm io` keeps its own name, qemu-nbd words bad command lines as qemu-nbd, and
# malformed json: names fail with exit status 1, never a crash.
. "$(dirname "$0")/lib.sh"
interop_init

REAL_PATH=$PATH
BIN="$WORK/bin"
mkdir -p "$BIN" "$WORK/base"
for n in qemu-io qemu-img qemu-nbd; do
    ln -s "$QSM" "$BIN/$n"
done

# The images every case starts from (copied fresh into each side's dir).
(
    cd "$WORK/base" &&
    qemu-img create -q -f qcow2 t.qcow2 1M &&
    qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 256k 4k' t.qcow2 >/dev/null &&
    qemu-img create -q -f qcow2 -b t.qcow2 -F qcow2 o.qcow2 1M &&
    qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M &&
    qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 1M
) || die "cannot create the base images"

# QEMU's iotests filters: paths, timings, generated node names.
filter() { sed -e "s#$WORK#WORK#g" -e 's/#block[0-9]\{3,\}/NODE_NAME/g' | filter_timing; }

# same TAG CMD...: run CMD (its first word qemu-io or qemu-img) once with
# the real QEMU tools on PATH and once with the symlinks first, in fresh
# copies of the base images; compare everything (but stdout when
# SKIP_STDOUT=1: the usage text lists qsm's own options).
N=0
SKIP_STDOUT=0
same() {
    local tag=$1 rq rs d
    shift
    N=$((N + 1))
    for d in q s; do
        rm -rf "$WORK/$d"
        cp -r "$WORK/base" "$WORK/$d"
    done
    (cd "$WORK/q" && env PATH="$REAL_PATH" timeout "$TIMEOUT" "$@" </dev/null >"$WORK/q.out" 2>"$WORK/q.err")
    rq=$?
    (cd "$WORK/s" && env PATH="$BIN:$REAL_PATH" timeout "$TIMEOUT" "$@" </dev/null >"$WORK/s.out" 2>"$WORK/s.err")
    rs=$?
    CHECKS=$((CHECKS + 1))
    if [ $rq -ne $rs ]; then
        fail "$tag: exit status $rs, qemu's $rq: $*"
        show_tail "$WORK/s.err" 5
    fi
    for f in out err; do
        [ "$f" = out ] && [ "$SKIP_STDOUT" = 1 ] && continue
        CHECKS=$((CHECKS + 1))
        if ! diff -u <(filter <"$WORK/q.$f") <(filter <"$WORK/s.$f") >"$WORK/diff"; then
            fail "$tag: std$f differs from qemu's (-qemu +qsm): $*"
            sed 's/^/    | /' "$WORK/diff" | head -n 20
        fi
    done
    for img in t.qcow2 o.qcow2; do
        [ -f "$WORK/q/$img" ] || continue
        compare_images "$tag: $img" "$WORK/q/$img" "$WORK/s/$img" || true
    done
}

log "qemu-io: failing command lines"
SKIP_STDOUT=1
same io-bad-option       qemu-io -x t.qcow2
same io-bad-long-option  qemu-io --bogus t.qcow2
same io-two-files        qemu-io a.qcow2 b.qcow2
SKIP_STDOUT=0
same io-missing-file     qemu-io -c 'read 0 512' nofile.qcow2
same io-unknown-cmd      qemu-io -c foo t.qcow2
same io-no-file-open     qemu-io -c close -c 'read 0 1'
same io-read-past-eof    qemu-io -c 'read 1M 512' -c 'read 2M 512' t.qcow2
same io-write-past-eof   qemu-io -c 'write 1048064 1024' t.qcow2
same io-read-only        qemu-io -r -c 'write 0 512' t.qcow2
same io-bad-cache        qemu-io -t bogus t.qcow2
same io-bad-aio          qemu-io -i bogus t.qcow2
same io-bad-format       qemu-io -f bogus -c 'read 0 1' t.qcow2
same io-open-missing     qemu-io -c 'open nofile'
same io-open-twice       qemu-io -c 'open t.qcow2' -c 'open t.qcow2' -c 'read -P 0x11 0 4k'
same io-verify-fails     qemu-io -c 'read -P 0x12 0 4k' -c 'read -P 0x22 256k 4k' t.qcow2
same io-bad-arg-count    qemu-io -c 'read 0' -c 'write 0 1 2 3' t.qcow2

log "qemu-io: open -o options"
same opt-read-only-bad   qemu-io -c 'open -o read-only=maybe t.qcow2'
same opt-read-only-rw    qemu-io -c 'open -o read-only=on t.qcow2' -c 'write 0 1'
same opt-read-only-r     qemu-io -c 'open -r -o read-only=on t.qcow2' -c 'read -P 0x11 0 1' -c 'write 0 1'
same opt-unknown         qemu-io -c 'open -o foo=bar t.qcow2'
same opt-driver-bad      qemu-io -c 'open -o driver=bogus t.qcow2'
same opt-l2-bad          qemu-io -c 'open -o l2-cache-size=abc t.qcow2'
same opt-l2-write        qemu-io -c 'open -o l2-cache-size=64k t.qcow2' -c 'write -P 3 512k 128k' -c 'read -P 3 512k 128k'
same opt-cache-l2-over   qemu-io -c 'open -o cache-size=1M,l2-cache-size=2M t.qcow2'
same opt-cache-all-three qemu-io -c 'open -o cache-size=1M,l2-cache-size=1M,refcount-cache-size=1M t.qcow2'
same opt-cache-rc-over   qemu-io -c 'open -o cache-size=1M,refcount-cache-size=2M t.qcow2'
same opt-cache-size      qemu-io -c 'open -o cache-size=256k,refcount-cache-size=64k t.qcow2' -c 'write -P 4 0 8k' -c 'read -P 4 0 8k'
same opt-rc-bad          qemu-io -c 'open -o refcount-cache-size=1x t.qcow2'
same opt-rc-abc          qemu-io -c 'open -o refcount-cache-size=abc t.qcow2'
same opt-rc-neg          qemu-io -c 'open -o refcount-cache-size=-1 t.qcow2'
same opt-rc-empty        qemu-io -c 'open -o refcount-cache-size= t.qcow2'
# QEMU bounds the caches in entries (bytes / cluster size): 4G is fine,
# 128T is 2^31 refcount blocks; an L2 cache past what the image needs is
# cut down, never refused.  (Sizes QEMU would fail to allocate are left
# out: qsm allocates its caches as they fill.)
same opt-rc-4g           qemu-io -c 'open -o refcount-cache-size=4G t.qcow2' -c 'write -P 13 0 4k'
same opt-rc-too-big      qemu-io -c 'open -o refcount-cache-size=128T t.qcow2'
same opt-l2-huge         qemu-io -c 'open -o l2-cache-size=15E t.qcow2' -c 'read -P 0x11 0 4k'
same opt-cache-huge      qemu-io -c 'open -o cache-size=15E t.qcow2'
same opt-cache-huge-l2   qemu-io -c 'open -o cache-size=15E,l2-cache-size=1M t.qcow2'
same opt-rc-huge         qemu-io -c 'open -o refcount-cache-size=16E t.qcow2'
same opt-cache-rc-small  qemu-io -c 'open -o cache-size=64k,refcount-cache-size=128k t.qcow2'
same opt-cache-rc-eq     qemu-io -c 'open -o cache-size=64k,refcount-cache-size=64k t.qcow2' -c 'write -P 9 512k 64k' -c 'read -P 9 512k 64k'
same opt-rc-zero         qemu-io -c 'open -o refcount-cache-size=0 t.qcow2' -c 'write -P 10 128k 64k' -c 'discard 0 64k' -c 'read -P 10 128k 64k'
same opt-rc-512          qemu-io -c 'open -o refcount-cache-size=512 t.qcow2' -c 'write -P 11 64k 192k' -c 'read -P 11 64k 192k'
same opt-cache-l2-rc     qemu-io -c 'open -o cache-size=1M,l2-cache-size=512k t.qcow2' -c 'write -P 12 0 4k'
same imgopts-rc-bad      qemu-io --image-opts 'driver=qcow2,file.filename=t.qcow2,refcount-cache-size=abc' -c 'read 0 1'
same imgopts-rc-over     qemu-io --image-opts 'driver=qcow2,file.filename=t.qcow2,cache-size=1k,refcount-cache-size=2k' -c 'read 0 1'
same opt-entry-bad       qemu-io -c 'open -o l2-cache-entry-size=1000 t.qcow2'
same opt-entry-big       qemu-io -c 'open -o l2-cache-entry-size=128k t.qcow2'
same opt-entry-ok        qemu-io -c 'open -o l2-cache-entry-size=4k t.qcow2' -c 'write -P 5 64k 64k' -c 'read -P 5 64k 64k'
same opt-clean-neg       qemu-io -c 'open -o cache-clean-interval=-1 t.qcow2'
same opt-clean-bad       qemu-io -c 'open -o cache-clean-interval=abc t.qcow2'
same opt-clean-ok        qemu-io -c 'open -o cache-clean-interval=10 t.qcow2' -c 'write -P 6 0 4k'
same opt-lazy-bad        qemu-io -c 'open -o lazy-refcounts=maybe t.qcow2'
same opt-lazy-v2         qemu-io -c 'open -o lazy-refcounts=on v2.qcow2'
same opt-lazy-same       qemu-io -c 'open -o lazy-refcounts=off t.qcow2' -c 'write -P 7 0 4k'
same opt-discard-bad     qemu-io -c 'open -o discard=bogus t.qcow2'
same opt-discard-unmap   qemu-io -c 'open -o discard=unmap t.qcow2' -c 'discard 0 64k' -c 'read -P 0 0 64k' -c 'write -P 8 0 4k'
same opt-discard-ignore  qemu-io -c 'open -o discard=ignore t.qcow2' -c 'discard 0 64k' -c 'read -P 0 0 64k'
same opt-discard-off-z   qemu-io -c 'open -o discard=off t.qcow2' -c 'write -z -u 0 64k' -c 'read -P 0 0 64k' -c 'map'
same opt-zeroes-bad      qemu-io -c 'open -o detect-zeroes=bogus t.qcow2'
same opt-zeroes-off      qemu-io -c 'open -o detect-zeroes=off t.qcow2' -c 'write -P 0 128k 64k'
same opt-file-driver-bad qemu-io -c 'open -o file.driver=bogus t.qcow2'
same opt-file-unknown    qemu-io -c 'open -o file.foo=1 t.qcow2'
same opt-file-filename   qemu-io -c 'open -o driver=qcow2,file.driver=file,file.filename=t.qcow2' -c 'write -P 9 4k 4k' -c 'read -P 9 4k 4k'
same opt-backing-string  qemu-io -c 'open -o backing=null o.qcow2'
same opt-file-node       qemu-io -c 'open -o file=t.qcow2'

log "qemu-io: reopen -o options"
same reopen-l2-bad       qemu-io -c 'reopen -o l2-cache-size=abc' t.qcow2
same reopen-unknown      qemu-io -c 'reopen -o foo=1' t.qcow2
same reopen-l2           qemu-io -c 'reopen -o l2-cache-size=128k' -c 'write -P 14 0 4k' -c 'read -P 14 0 4k' t.qcow2
same reopen-driver       qemu-io -c 'reopen -o driver=raw' -c 'read -P 0x11 0 4k' t.qcow2
same reopen-lazy-bad     qemu-io -c 'reopen -o lazy-refcounts=maybe' t.qcow2
same reopen-discard      qemu-io -c 'reopen -o discard=ignore' -c 'discard 0 64k' -c 'read -P 0x11 0 4k' t.qcow2
same reopen-cache-over   qemu-io -c 'reopen -o cache-size=1M,l2-cache-size=2M' t.qcow2
same reopen-ro           qemu-io -c 'reopen -o read-only=on' -c 'write 0 1' -c 'reopen -o read-only=off' -c 'write -P 15 0 1' t.qcow2
same reopen-r-and-ro     qemu-io -c 'reopen -r -o read-only=on' t.qcow2

log "qemu-io: --image-opts"
same iopts-ok            qemu-io --image-opts driver=qcow2,file.filename=t.qcow2 -c 'write -P 10 8k 4k' -c 'read -P 10 8k 4k'
same iopts-f             qemu-io --image-opts -f qcow2 t.qcow2
same iopts-unknown       qemu-io --image-opts driver=qcow2,file.filename=t.qcow2,foo=1
same iopts-ro            qemu-io -r --image-opts driver=qcow2,file.filename=t.qcow2,read-only=on -c 'read -P 0x11 0 4k'
same iopts-l2-bad        qemu-io --image-opts driver=qcow2,file.filename=t.qcow2,l2-cache-size=1.5

log "qemu-io: json: names"
same json-no-backing     qemu-io -r 'json:{"driver":"qcow2","file":{"driver":"file","filename":"o.qcow2"},"backing":null}' -c 'read -P 0 0 4k'
same json-backing        qemu-io 'json:{"driver":"qcow2","file":{"driver":"file","filename":"o.qcow2"}}' -c 'read -P 0x11 0 4k' -c 'write -P 12 0 512'
same json-write          qemu-io 'json:{"driver":"qcow2","file.filename":"t.qcow2","l2-cache-size":65536}' -c 'write -P 13 12k 4k' -c 'read -P 13 12k 4k'
same json-truncated      qemu-io 'json:{"driver":"qcow2","file":{"driver":"file","filename":"o.qcow2"}'
same json-bad-size       qemu-io 'json:{"driver":"qcow2","file.filename":"o.qcow2","l2-cache-size":"abc"}'
same json-bool-size      qemu-io 'json:{"driver":"qcow2","file.filename":"o.qcow2","l2-cache-size":true}'
same json-ro-no-r        qemu-io 'json:{"driver":"qcow2","file.filename":"o.qcow2","read-only":true}' -c 'write 0 1'
same json-ro-number      qemu-io 'json:{"driver":"qcow2","file.filename":"o.qcow2","read-only":1}'
same json-unknown        qemu-io 'json:{"driver":"qcow2","file.filename":"o.qcow2","bogus":1}'
same json-array          qemu-io 'json:[1]'
same json-file-node      qemu-io 'json:{"driver":"qcow2","file":"o.qcow2"}'
same json-duplicate      qemu-io 'json:{"driver":"qcow2","file.filename":"o.qcow2", "driver":"raw"}'
same json-empty          qemu-io 'json:'
same json-no-value       qemu-io 'json:{"a":}'
same json-single-quotes  qemu-io "json:{'driver':'qcow2','file':{'filename':'t.qcow2'}}" -c 'read -P 0x22 256k 4k'

log "qemu-img: subcommands and failing command lines"
same img-no-args         qemu-img
same img-unknown         qemu-img bogus
same img-help-word       qemu-img help
same img-lacking         qemu-img frobnicate t.qcow2
same img-info-bad-opt    qemu-img info -x t.qcow2
same img-info-long-opt   qemu-img info --bogus t.qcow2
same img-info-no-arg     qemu-img info -f
same img-info-no-file    qemu-img info
same img-info-two        qemu-img info a b
same img-info-missing    qemu-img info nofile
same img-info-bad-fmt    qemu-img info -f bogus t.qcow2
same img-map-bad-fmt     qemu-img map -f bogus t.qcow2
same img-check-bad-fmt   qemu-img check -f bogus t.qcow2
same img-info-output     qemu-img info --output=xml t.qcow2
same img-check-missing   qemu-img check nofile
same img-check-bad-r     qemu-img check -r bogus t.qcow2
same img-check-ok        qemu-img check t.qcow2
same img-create-nosize   qemu-img create -f qcow2 x.qcow2
same img-create-badsize  qemu-img create -f qcow2 x.qcow2 abc
same img-create          qemu-img create -f qcow2 n.qcow2 1M
same img-map-none        qemu-img map
same img-map-json        qemu-img map --output=json t.qcow2
same img-map-output      qemu-img map --output=xml t.qcow2
same img-compare-one     qemu-img compare t.qcow2
same img-compare         qemu-img compare t.qcow2 o.qcow2
same img-convert-none    qemu-img convert t.qcow2
same img-resize-none     qemu-img resize t.qcow2
same img-resize-bad      qemu-img resize t.qcow2 abc
same img-bench-none      qemu-img bench
same img-bench-noarg     qemu-img bench -c

log "own names and qemu-nbd"
CHECKS=$((CHECKS + 1))
out=$(cd "$WORK/base" && "$QSM" io -r -c 'write 0 1' t.qcow2 2>&1)
[ "$out" = "qsm io: Block node is read-only" ] || fail "qsm io names itself 'qsm io': got '$out'"
CHECKS=$((CHECKS + 1))
out=$(cd "$WORK/base" && "$QSM" info nofile 2>&1)
case $out in "qsm info: Could not open 'nofile'"*) ;; *) fail "qsm info names itself: got '$out'";; esac
CHECKS=$((CHECKS + 1))
out=$(env PATH="$BIN:$REAL_PATH" qemu-nbd 2>&1)
rc=$?
case "$rc:$out" in
    "1:qemu-nbd: Invalid number of arguments"*) ;;
    *) fail "qemu-nbd without an image: exit status 1 and qemu-nbd's message, got $rc: $out";;
esac
CHECKS=$((CHECKS + 1))
out=$(env PATH="$BIN:$REAL_PATH" qemu-nbd --bogus t.qcow2 2>&1)
rc=$?
case "$rc:$out" in
    "1:qemu-nbd: unrecognized option '--bogus'"*"qemu-nbd: Try \`qemu-nbd --help' for more information.") ;;
    *) fail "qemu-nbd --bogus: exit status 1 and qemu-nbd's messages, got $rc: $out";;
esac
CHECKS=$((CHECKS + 1))
out=$(env PATH="$BIN:$REAL_PATH" qemu-io --help 2>&1)
case $out in "Usage: qemu-io "*"See 'qemu-io -c help'"*) ;; *) fail "qemu-io --help names qemu-io";; esac
CHECKS=$((CHECKS + 1))
out=$(env PATH="$BIN:$REAL_PATH" qemu-io -V 2>&1)
case $out in "qemu-io version "*) ;; *) fail "qemu-io -V: got '$out'";; esac

log "malformed json: names fail cleanly"
deep=$(python3 -c 'print("{\"a\":" * 5000 + "1" + "}" * 5000)')
for j in '{' '{"' '{"a' '{"a"' '{"a":' '{"a":"' '{"a":"\' '{"a":"\u12' '{"a":"\ud800"}' \
         '{"a":"\udc00x"}' '{"a":"\u0000"}' '{"a":tru}' '{"a":-}' '{"a":1.}' '{"a":1e}' \
         '{"a":01}' '{"a":[1,}' '{"a":[1 2]}' '{"a":{}}x' '{,}' '{"a":1,}' '{"a" 1}' \
         "{'a':'b\\'c'" '[' ']' '}' '"x"' 'null' '12' "$(printf '{"a":"\001"}')" \
         "$deep" '{"a":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}'; do
    CHECKS=$((CHECKS + 1))
    out=$(cd "$WORK/base" && env PATH="$BIN:$REAL_PATH" timeout 20 qemu-io "json:$j" -c 'read 0 1' 2>&1 </dev/null)
    rc=$?
    if [ $rc -ne 1 ]; then
        fail "json:$(printf '%.40s' "$j") exited $rc (want 1): $(printf '%.200s' "$out")"
    fi
done

log "refcount-cache-size reaches the engine"
# Not a comparison (qemu-io shows no cache counters): the same discards,
# two passes over 21 refcount blocks (512-byte clusters), open once with a
# one-block refcount cache and once with a 1 MiB one.  Every block is read
# once with the large cache; the small one reads them again on the second
# pass (qsm's --trace-text names each refblock load), by open -o and by
# --image-opts alike.
(
    cd "$WORK/base" &&
    qemu-img create -q -f qcow2 -o cluster_size=512 rc.qcow2 64M &&
    for i in $(seq 0 40); do echo "write -P 1 $((i << 20)) 64k"; done |
        qemu-io rc.qcow2 >/dev/null
) || die "cannot create rc.qcow2"
rc_args=()
for p in 0 1; do
    for i in $(seq 0 40); do rc_args+=(-c "discard $(((i << 20) + p * 4096)) 512"); done
done
rc_loads() { # HOW OPTS: refblock loads, opening rc.qcow2 with OPTS
    cp "$WORK/base/rc.qcow2" "$WORK/rc.qcow2"
    if [ "$1" = open ]; then
        "$QSM" io --trace-text "$WORK/rc.txt" -c "open -o $2 $WORK/rc.qcow2" "${rc_args[@]}" >/dev/null
    else
        "$QSM" io --trace-text "$WORK/rc.txt" --image-opts "driver=qcow2,file.filename=$WORK/rc.qcow2,$2" \
            "${rc_args[@]}" >/dev/null
    fi || echo "-1"
    grep -o 'refblock load' "$WORK/rc.txt" | wc -l
}
for how in open image-opts; do
    CHECKS=$((CHECKS + 1))
    small=$(rc_loads $how refcount-cache-size=512 | tail -n 1)
    large=$(rc_loads $how refcount-cache-size=1M | tail -n 1)
    split=$(rc_loads $how cache-size=2M,l2-cache-size=1M | tail -n 1)
    if ! [ "$large" -ge 20 ] || ! [ "$small" -ge $((large + 20)) ] || [ "$split" -ne "$large" ]; then
        fail "$how: refblock loads with a 512-byte refcount cache $small, 1 MiB $large, 1 MiB by cache-size - l2-cache-size $split"
    fi
done

log "$N command lines compared with qemu-io/qemu-img"
interop_finish
