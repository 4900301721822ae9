#!/usr/bin/env bash
# Drivers, modes and the remaining open options of issue #13, `qsm` run as
# qemu-io (a symlink) against the real qemu-io 7.2 on the same command
# lines: file/raw, null-co and null-aio (size, read-zeroes, latency-ns, and
# their reopen refusals), copy-on-read (-C, open -C, driver=copy-on-read:
# the top image holds the clusters read, qemu-img map identical), snapshot
# mode (-s, open -s: the image untouched, the overlay gone afterwards),
# read -b / write -b (the VM-state area: qcow2's, and refused as QEMU
# refuses it where an image has none), json: backing file names recorded in images, and the
# open options that change nothing qsm can observe (pass-discard-*,
# overlap-check*, auto-read-only, force-share, file.locking, ...).
# For every case: stdout and stderr identical after QEMU's iotests filters
# (work directory, timings, generated node names, temporary file names),
# the same exit status, and for images that were written, qemu-img compare
# identical and qemu-img map --output=json byte-identical.
. "$(dirname "$0")/lib.sh"
interop_init

qsm_as_qemu_io
mkdir -p "$WORK/base"

(
    cd "$WORK/base" &&
    qemu-img create -q -f qcow2 t.qcow2 1M &&
    qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 256k 4k' t.qcow2 >/dev/null &&
    # A chain for copy-on-read: data, zero clusters, holes, a shorter base.
    qemu-img create -q -f qcow2 base.qcow2 4M &&
    qemu-io -c 'write -P 5 0 192k' -c 'write -z 256k 64k' -c 'write -P 6 1M 4k' \
        base.qcow2 >/dev/null &&
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 8M &&
    qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 v2.qcow2 4M &&
    qemu-img create -q -f qcow2 nb.qcow2 1M &&
    truncate -s 1M r.raw &&
    # json: backing names, as qemu-img records them.
    qemu-img create -q -f qcow2 -F qcow2 \
        -b 'json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}' jt.qcow2 4M &&
    qemu-img create -q -f qcow2 -F qcow2 \
        -b 'json:{"file":{"driver":"file","filename":"base.qcow2"},"l2-cache-size":"1M"}' jt2.qcow2 4M &&
    qemu-img create -q -f qcow2 -F raw \
        -b 'json:{"driver":"raw","file":{"filename":"r.raw"}}' jr.qcow2 1M &&
    mkdir sub &&
    qemu-img create -q -f qcow2 -F qcow2 -u \
        -b 'json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}' sub/js.qcow2 4M
) || die "cannot create the base images"
IMAGES="t.qcow2 base.qcow2 top.qcow2 v2.qcow2 nb.qcow2 jt.qcow2 jt2.qcow2 jr.qcow2"

# QEMU's iotests filters: paths, timings, generated node and temp names.
filter() {
    sed -e "s#$WORK#WORK#g" -e 's/#block[0-9]\{3,\}/NODE_NAME/g' \
        -e 's#vl\.[A-Za-z0-9]\{6\}#vl.XXXXXX#g' | filter_timing
}

# same_image TAG IMG: the image in both directories reads the same (its
# chain resolved from there: json: backing names are relative to the
# current directory) and maps the same.
same_image() {
    local tag=$1 img=$2 d
    CHECKS=$((CHECKS + 1))
    for d in q s; do
        (cd "$WORK/$d" && qemu-img convert -f qcow2 -O raw "$img" "$WORK/$d.raw" &&
            qemu-img map --output=json "$img" >"$WORK/$d.map") 2>"$WORK/$d.img.err" ||
            { fail "$tag: $d/$img: $(head -c 300 "$WORK/$d.img.err")"; return 1; }
    done
    cmp -s "$WORK/q.raw" "$WORK/s.raw" || { fail "$tag: $img reads differently from qemu's"; return 1; }
    CHECKS=$((CHECKS + 1))
    if ! cmp -s "$WORK/q.map" "$WORK/s.map"; then
        fail "$tag: qemu-img map of $img differs from qemu's (-qemu +qsm)"
        diff "$WORK/q.map" "$WORK/s.map" | head -n 10 | sed 's/^/    | /'
    fi
}

# same TAG CMD...: CMD (its first word qemu-io) once with the real qemu-io
# and once with qsm's symlink first on PATH, in fresh copies of the base
# images, with an empty TMPDIR; everything compared.
N=0
same() {
    local tag=$1 rq rs d img
    shift
    N=$((N + 1))
    for d in q s; do
        rm -rf "$WORK/$d"
        cp -r "$WORK/base" "$WORK/$d"
    done
    rm -rf "$WORK/tmp" && mkdir "$WORK/tmp"
    (cd "$WORK/q" && env PATH="$REAL_PATH" TMPDIR="$WORK/tmp" timeout "$TIMEOUT" "$@" \
        </dev/null >"$WORK/q.out" 2>"$WORK/q.err")
    rq=$?
    rm -rf "$WORK/tmp" && mkdir "$WORK/tmp"
    (cd "$WORK/s" && env PATH="$BIN:$REAL_PATH" TMPDIR="$WORK/tmp" timeout "$TIMEOUT" "$@" \
        </dev/null >"$WORK/s.out" 2>"$WORK/s.err")
    rs=$?
    CHECKS=$((CHECKS + 1))
    if [ $rq -ne $rs ]; then
        fail "$tag: exit status $rs, qemu's $rq: $*"
        show_tail "$WORK/s.err" 5
    fi
    for f in out err; do
        CHECKS=$((CHECKS + 1))
        if ! diff -u <(filter <"$WORK/q.$f") <(filter <"$WORK/s.$f") >"$WORK/diff"; then
            fail "$tag: std$f differs from qemu's (-qemu +qsm): $*"
            sed 's/^/    | /' "$WORK/diff" | head -n 20
        fi
    done
    # The temporary overlay of -s is gone once qemu-io has exited.
    CHECKS=$((CHECKS + 1))
    if [ -n "$(ls -A "$WORK/tmp")" ]; then
        fail "$tag: left in TMPDIR: $(ls "$WORK/tmp")"
    fi
    for img in $IMAGES; do
        # Only what a side wrote needs comparing in depth.
        cmp -s "$WORK/q/$img" "$WORK/base/$img" && cmp -s "$WORK/s/$img" "$WORK/base/$img" &&
            continue
        same_image "$tag" "$img"
    done
}

# untouched TAG: every image of qsm's side is byte-identical to the base.
untouched() {
    local img
    for img in $IMAGES r.raw; do
        CHECKS=$((CHECKS + 1))
        cmp -s "$WORK/base/$img" "$WORK/s/$img" || fail "$1: $img was written"
    done
}

JF='json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"}}'

log "file and raw drivers"
same file-opts       qemu-io --image-opts driver=qcow2,file.driver=file,file.filename=t.qcow2 \
                         -c 'write -P 1 8k 4k' -c 'read -P 1 8k 4k' -c 'read -P 0x11 0 4k'
same file-json       qemu-io -c 'write -P 2 64k 4k' -c 'read -P 2 64k 4k' "$JF"
same raw-f           qemu-io -f raw -c 'write -P 3 0 4k' -c 'read -P 3 0 4k' -c info -c map r.raw
same raw-json        qemu-io -c 'write -P 4 4k 4k' -c 'read -P 4 4k 4k' \
                         'json:{"driver":"raw","file":{"driver":"file","filename":"r.raw"}}'
same raw-unknown     qemu-io --image-opts driver=raw,file.filename=r.raw,l2-cache-size=1M -c 'read 0 1'

log "null-co and null-aio"
for z in "" ",read-zeroes=on"; do
    same "null$z"    qemu-io --image-opts "driver=null-co,size=1M$z" -c info -c 'alloc 0 64k' \
                         -c map -c 'discard 0 64k' -c 'write -z 0 4k' -c 'truncate 2M' -c length \
                         -c flush -c 'aio_write 0 4k' -c aio_flush -c 'read -v 0 16' -c 'read -P 0 0 4k'
done
same null-proto      qemu-io -c 'write -P 1 0 512' -c 'read -P 1 0 512' -c length null-co://
same null-proto-bad  qemu-io -c 'read 0 512' null-co://x
same null-proto-raw  qemu-io -f raw -c 'read 0 512' -c info -c 'alloc 0 4k' null-co://
same null-raw-json   qemu-io -c 'read 0 512' -c length \
                         'json:{"driver":"raw","file":{"driver":"null-co","size":4096}}'
same null-aio        qemu-io --image-opts driver=null-aio,size=4k -c info -c 'read 0 4k'
same null-ro-opt     qemu-io --image-opts driver=null-co,size=4k,node-name=x,read-only=on -c 'write 0 4k'
same null-ro         qemu-io -r --image-opts driver=null-co,size=4k,read-only=on -c 'write 0 4k' -c 'read 0 4k'
same null-reopen     qemu-io --image-opts driver=null-co,size=4k -c 'reopen -o size=8k' -c length \
                         -c 'reopen -o read-zeroes=on' -c 'read -P 0 0 512'
same null-latency-neg qemu-io --image-opts driver=null-co,latency-ns=-1 -c length
same null-unknown    qemu-io --image-opts driver=null-co,foo=1 -c length
same null-latency    qemu-io --image-opts driver=null-co,latency-ns=2000000,read-zeroes=on \
                         -c 'read -P 0 0 4k' -c 'write 0 4k' -c 'aio_read -P 0 0 4k' -c aio_flush
same null-open       qemu-io -c 'open -o driver=null-co,size=8k null-co://' -c length -c close \
                         -c 'open -o driver=raw,file.driver=null-co,file.size=16k,file.bar=1'
same null-raw-bad    qemu-io --image-opts driver=raw,file.driver=null-co,file.size=16k,baz=1 -c length

log "copy-on-read"
same cor-chain       qemu-io -C -c 'read -P 5 10k 4k' -c 'read 100k 100k' -c 'read 250k 20k' \
                         -c 'read 512k 4k' -c 'read -P 6 1M 4k' -c 'read 5M 4k' -c 'write -P 9 2M 4k' \
                         -c 'read 2M 8k' -c 'aio_read 3M 64k' -c 'aio_read 3M 64k' -c aio_flush \
                         -c 'read -P 0 7M 1M' top.qcow2
same cor-whole       qemu-io -C -c 'read 0 8M' -c map top.qcow2
same cor-filter      qemu-io -c 'read 10k 4k' -c info -c 'reopen -r' --image-opts \
                         driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename=top.qcow2
same cor-json        qemu-io -c 'read 64k 8k' \
                         'json:{"driver":"copy-on-read","file":{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}}'
same cor-filter-ro   qemu-io -r -c 'read 10k 4k' --image-opts driver=copy-on-read,file.driver=qcow2,file.file.filename=top.qcow2
same cor-filter-bad  qemu-io -c 'read 10k 4k' --image-opts driver=copy-on-read,foo=1,file.driver=qcow2,file.file.filename=top.qcow2
same cor-no-backing  qemu-io -C -c 'read 0 4k' -c 'read 600k 200k' nb.qcow2
same cor-v2          qemu-io -C -c 'read 512k 4k' -c 'read 0 4k' -c 'read 3M 128k' v2.qcow2
same cor-read-only   qemu-io -r -C -c 'read 0 4k' top.qcow2
same cor-raw         qemu-io -f raw -C -c 'read 0 4k' r.raw
same cor-reopen      qemu-io -C -c 'reopen -r' -c 'read 64k 4k' -c 'reopen -w' -c 'read 128k 4k' top.qcow2
same cor-open        qemu-io -c 'open -C top.qcow2' -c 'read 128k 4k' -c 'read 1M 64k'
same cor-writeback   qemu-io -C -t writeback -c 'read 0 1M' -c 'write -P 7 64k 4k' -c 'read -P 7 64k 4k' top.qcow2
same cor-jbacking    qemu-io -C -c 'read 0 256k' jt.qcow2

log "snapshot mode"
same snap            qemu-io -s -c 'write -P 1 0 4k' -c 'read -P 1 0 4k' -c 'read -P 0x11 4k 4k' -c info \
                         -c map -c 'alloc 0 1M' -c 'reopen -r' -c length -c 'write -z 8k 4k' \
                         -c 'discard 64k 64k' -c 'reopen -o l2-cache-size=1M' -c 'read -P 1 0 4k' t.qcow2
untouched snap
same snap-ro         qemu-io -s -r -c 'write 0 4k' -c 'read -P 0x11 0 4k' t.qcow2
same snap-raw        qemu-io -s -f raw -c 'write -P 2 0 4k' -c 'read -P 2 0 4k' -c info r.raw
untouched snap-raw
same snap-open       qemu-io -c 'open -s t.qcow2' -c 'write -P 3 0 4k' -c 'reopen -w' -c 'read -P 3 0 4k' \
                         -c close -c 'open -r t.qcow2' -c 'read -P 0x11 0 4k'
untouched snap-open
same snap-chain      qemu-io -s -c 'write -P 8 1M 4k' -c 'read -P 8 1M 4k' -c 'read -P 5 0 4k' top.qcow2
untouched snap-chain
same snap-no-tmp     env TMPDIR=/nonexistent/qsm qemu-io -s -c 'write 0 4k' t.qcow2
untouched snap-no-tmp

log "VM-state area (read -b / write -b)"
same vmstate-raw     qemu-io -f raw -c 'write -b 0 512' -c 'read -b 0 512' -c 'write -P 1 0 512' \
                         -c 'read -b -P 1 0 512' r.raw
same vmstate-null    qemu-io -c 'write -b 0 512' -c 'read -b 0 512' null-co://
# qcow2's VM-state area (issue #15, sm/vmstate.c): written and read back,
# through the json: and --image-opts forms, under copy-on-read (the
# filter passes it to qcow2: nothing is copied) and in snapshot mode (the
# temporary overlay takes it, the image is untouched).
same vmstate-qcow2   qemu-io -c 'write -b -P 5 0 512' -c 'read -b -P 5 0 512' -c 'read -b -P 0 512 4k' \
                         -c 'read -P 0x11 0 64k' t.qcow2
same vmstate-json    qemu-io -c 'write -b -P 6 64k 8k' -c 'read -b -P 6 64k 8k' "$JF"
same vmstate-cor     qemu-io -C -c 'read -b -P 0 0 64k' -c 'read -P 5 0 4k' -c map top.qcow2
same vmstate-snap    qemu-io -s -c 'write -b -P 7 0 4k' -c 'read -b -P 7 0 4k' t.qcow2
untouched vmstate-snap

log "json: backing file names"
same jb-read         qemu-io -c 'read -P 5 0 64k' -c 'read -P 6 1M 4k' -c map jt.qcow2
same jb-write        qemu-io -c 'write -P 7 32k 4k' -c 'read -P 5 0 32k' -c 'read -P 7 32k 4k' -c map jt.qcow2
same jb-opts         qemu-io -c 'read -P 5 0 64k' -c 'write -P 1 2M 4k' jt2.qcow2
same jb-raw          qemu-io -c 'read -P 0 0 4k' -c 'write -P 2 4k 4k' -c map jr.qcow2
same jb-cwd          qemu-io -c 'read -P 5 0 4k' sub/js.qcow2
same jb-reopen       qemu-io -c 'reopen -r' -c 'read -P 5 0 4k' -c 'reopen -w' -c 'write -P 3 0 4k' jt.qcow2

log "options that change nothing qsm can observe"
for o in pass-discard-request=x pass-discard-other=on pass-discard-snapshot=off overlap-check=x \
         overlap-check=none overlap-check=all overlap-check.template=x overlap-check.template=on \
         overlap-check.template=cached overlap-check.main-header=off overlap-check.main-header=x \
         overlap-check.foo=on auto-read-only=x auto-read-only=on force-share=x force-share=on \
         data-file=x encrypt.format=aes file.locking=off file.locking=x; do
    same "opt-$o"        qemu-io --image-opts "driver=qcow2,file.filename=t.qcow2,$o" -c 'write -P 1 0 4k'
    same "opt-r-$o"      qemu-io -r --image-opts "driver=qcow2,file.filename=t.qcow2,$o" -c 'read 0 4k'
    same "reopen-$o"     qemu-io -c 'read 0 4k' -c "reopen -o $o" -c 'write -P 2 0 4k' "$JF"
done

log "$N command lines compared with qemu-io"
interop_finish
