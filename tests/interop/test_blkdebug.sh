#!/usr/bin/env bash
# blkdebug (io/blkdebug.c, the BREAK state of sm/states.def) against QEMU's
# own: the same qemu-io script run by the real qemu-io 7.2 and by `qsm`
# invoked as qemu-io (a symlink), each in a directory of its own holding
# the same images and blkdebug config files.  For every case: stdout and
# stderr identical after QEMU's filtering of paths and timings, the same
# exit status, and, where both leave an image, images qemu-img compare
# calls identical.  Cases:
#  - error injection: inject-error on l2_update, l2_load, refblock_update,
#    refblock_alloc, write_aio, flush_to_disk, with once on and off,
#    immediately on and off, errno values (EIO, ENOSPC, EROFS), a sector
#    range, and set-state chains (state-gated rules, a rule that moves the
#    state on), from config files and from driver options (-o, --image-opts,
#    json:);
#  - the names: blkdebug::IMAGE, blkdebug:CONFIG:IMAGE, bad configs, a
#    missing config, unknown events, events qsm refuses by name;
#  - breakpoints in the style of iotests 046: two overlapping allocating
#    writes, the first suspended at write_aio (or cow_read), released in
#    every order; the data read back with -P in the same script, and the
#    image qemu-img check calls clean on both sides; three allocating
#    writes in one L2 table held together and released in all six orders,
#    a fourth queued behind one of them;
#  - the node's limits (align, max-transfer, opt/max-write-zero,
#    opt/max-discard) and iotype: QEMU's option checks and messages, armed
#    rules that hit only a padded or split piece, and raw files under
#    driver=blkdebug compared byte for byte (which pieces were written,
#    zeroed, discarded).
. "$(dirname "$0")/lib.sh"
interop_init

REAL_PATH=$PATH
BIN="$WORK/bin"
mkdir -p "$BIN" "$WORK/base"
ln -s "$(readlink -f "$QSM")" "$BIN/qemu-io"
# A broken link would silently run the real qemu-io on both sides.
"$BIN/qemu-io" --version 2>&1 | grep -q qsm || die "$BIN/qemu-io does not run qsm"

# Base images and config files, copied fresh into each side's directory.
(
    cd "$WORK/base" &&
    qemu-img create -q -f qcow2 t.qcow2 1M &&
    qemu-img create -q -f qcow2 big.qcow2 64M &&
    qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 1M &&
    qemu-img create -q -f qcow2 -o cluster_size=4k w.qcow2 1M &&
    qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 256k 64k' w.qcow2 >/dev/null &&
    cp t.qcow2 filled.qcow2 &&
    qemu-io -c 'write -P 0x33 0 128k' filled.qcow2 >/dev/null &&
    python3 -c "open('r.img', 'wb').write(bytes([0x5a]) * 65536)"
) || die "cannot create the base images"

# conf NAME SECTION...: write a config file (sections given as lines).
conf() {
    local name=$1
    shift
    printf '%s\n' "$@" >"$WORK/base/$name"
}
conf l2u-once.conf '[inject-error]' 'event = "l2_update"' 'errno = "5"' 'once = "on"'
conf l2u-always.conf '[inject-error]' 'event = "l2_update"' 'errno = "5"' 'once = "off"'
conf l2u-imm.conf '[inject-error]' 'event = "l2_update"' 'errno = "5"' 'immediately = "on"' 'once = "on"'
conf l2u-enospc.conf '[inject-error]' 'event = "l2_update"' 'errno = "28"' 'once = "on"'
conf l2l-once.conf '[inject-error]' 'event = "l2_load"' 'errno = "5"' 'once = "on"'
conf l2l-erofs.conf '[inject-error]' 'event = "l2_load"' 'errno = "30"' 'once = "off"'
conf rbu-once.conf '[inject-error]' 'event = "refblock_update"' 'errno = "5"' 'once = "on"'
conf rbu-always.conf '[inject-error]' 'event = "refblock_update"' 'errno = "28"' 'once = "off"'
conf rbu-imm.conf '[inject-error]' 'event = "refblock_update"' 'errno = "5"' 'immediately = "on"'
conf rba.conf '[inject-error]' 'event = "refblock_alloc"' 'errno = "5"' 'once = "on"'
conf wa-once.conf '[inject-error]' 'event = "write_aio"' 'errno = "5"' 'once = "on"'
conf wa-sector.conf '[inject-error]' 'event = "write_aio"' 'errno = "5"' 'sector = "136"'
conf flush.conf '[inject-error]' 'event = "flush_to_disk"' 'errno = "5"' 'once = "on"'
# set-state chains: the first write_aio moves 1 -> 2; errors only in state 2,
# and the second l2_update in state 2 moves on to 3, where nothing fails.
conf chain.conf \
    '[set-state]' 'state = "1"' 'event = "write_aio"' 'new_state = "2"' \
    '[inject-error]' 'state = "2"' 'event = "write_aio"' 'errno = "5"' 'once = "on"'
conf chain3.conf \
    '[set-state]' 'state = "1"' 'event = "write_aio"' 'new_state = "2"' \
    '[set-state]' 'state = "2"' 'event = "write_aio"' 'new_state = "3"' \
    '[inject-error]' 'state = "3"' 'event = "write_aio"' 'errno = "28"'
conf comments.conf '# a comment' '' '[inject-error]' '  event = "write_aio"' '# again' 'once = "on"'
conf bad-event.conf '[inject-error]' 'event = "l2_updatex"'
conf no-quotes.conf '[inject-error]' 'event = l2_update'
conf no-event.conf '[inject-error]' 'errno = "5"'
conf refused.conf '[inject-error]' 'event = "l1_grow_alloc_table"'
conf bad-errno.conf '[inject-error]' 'event = "l2_update"' 'errno = "five"'

filter() { sed -e "s#$WORK/[qs]#WORK#g" -e "s#$WORK#WORK#g" | filter_timing; }

N=0
NO_COMPARE=0  # 1: the images may differ (an injected failure mid-write)
RACE=0        # 1: two independent completions may come in either order
same() {
    local tag=$1 rq rs d img
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
        CHECKS=$((CHECKS + 1))
        if [ "$f" = out ] && [ "$RACE" = 1 ]; then
            # Two independent requests released together complete in
            # whichever order their I/O does (QEMU's thread pool too): the
            # lines in order without the completions, and all the lines
            # in any order.
            if ! diff -u <(filter <"$WORK/q.out" | grep -v '^wrote \|^[0-9.]* [KMG]\?i\?B, ') \
                         <(filter <"$WORK/s.out" | grep -v '^wrote \|^[0-9.]* [KMG]\?i\?B, ') >"$WORK/diff" ||
               ! diff -u <(filter <"$WORK/q.out" | sort) <(filter <"$WORK/s.out" | sort) >>"$WORK/diff"; then
                fail "$tag: stdout differs from qemu's (-qemu +qsm): $*"
                sed 's/^/    | /' "$WORK/diff" | head -n 30
            fi
            continue
        fi
        if ! diff -u <(filter <"$WORK/q.$f") <(filter <"$WORK/s.$f") >"$WORK/diff"; then
            fail "$tag: std$f differs from qemu's (-qemu +qsm): $*"
            sed 's/^/    | /' "$WORK/diff" | head -n 30
        fi
    done
    if [ "$NO_COMPARE" = 0 ]; then
        for img in t.qcow2 big.qcow2 small.qcow2 w.qcow2 filled.qcow2 ov.qcow2; do
            [ -f "$WORK/q/$img" ] || continue
            compare_images "$tag: $img" "$WORK/q/$img" "$WORK/s/$img" || true
        done
        # Raw files under driver=blkdebug: byte for byte.
        CHECKS=$((CHECKS + 1))
        cmp -s "$WORK/q/r.img" "$WORK/s/r.img" || {
            fail "$tag: r.img differs from qemu's: $*"
            cmp -l "$WORK/q/r.img" "$WORK/s/r.img" | head -n 3 | sed 's/^/    | /'
        }
    fi
}

# differs TAG WANT IMG CMD...: a case where qsm knowingly differs from QEMU
# (see below); run on the qsm side only: the injected error must show
# (WANT, an strerror text, on stdout or stderr), qsm must not crash (exit
# 0 or 1), and IMG must have no corruption (qemu-img check: 0, or 3 for
# leaked clusters only).
differs() {
    local tag=$1 want=$2 img=$3 rs rc
    shift 3
    rm -rf "$WORK/s"
    cp -r "$WORK/base" "$WORK/s"
    (cd "$WORK/s" && env PATH="$BIN:$REAL_PATH" timeout "$TIMEOUT" "$@" </dev/null >"$WORK/s.out" 2>"$WORK/s.err")
    rs=$?
    CHECKS=$((CHECKS + 3))
    [ $rs -le 1 ] || { fail "$tag: qsm exited $rs: $*"; show_tail "$WORK/s.err" 5; }
    cat "$WORK/s.out" "$WORK/s.err" | grep -q "$want" ||
        { fail "$tag: the injected '$want' does not show: $*"; show_tail "$WORK/s.out" 5; }
    qemu-img check -f qcow2 "$WORK/s/$img" >"$WORK/check" 2>&1
    rc=$?
    { [ $rc -eq 0 ] || [ $rc -eq 3 ]; } ||
        { fail "$tag: qemu-img check of qsm's $img exited $rc"; show_tail "$WORK/check" 5; }
}

# brk TAG IMG SCRIPT-LINES...: a breakpoint script (one -c per line) on
# blkdebug::IMG, compared as `same` does; then both images must check
# clean.
brk() {
    local tag=$1 img=$2 args=() l
    shift 2
    for l in "$@"; do
        args+=(-c "$l")
    done
    same "$tag" qemu-io "${args[@]}" "blkdebug::$img"
    check_clean "$tag: qemu's $img" "$WORK/q/$img"
    check_clean "$tag: qsm's $img" "$WORK/s/$img"
}

log "names and config files"
same name-empty-config    qemu-io -c 'write -P 1 0 4k' -c 'read -P 1 0 4k' blkdebug::t.qcow2
same name-config          qemu-io -c 'write -P 1 0 4k' -c 'read -P 1 0 4k' blkdebug:comments.conf:t.qcow2
same name-no-image        qemu-io -c 'read 0 1' blkdebug:t.qcow2
same name-missing-config  qemu-io -c 'read 0 1' blkdebug:nonexist.conf:t.qcow2
same name-missing-image   qemu-io -c 'read 0 1' blkdebug::nonexist.qcow2
same conf-bad-event       qemu-io -c 'read 0 1' blkdebug:bad-event.conf:t.qcow2
same conf-no-quotes       qemu-io -c 'read 0 1' blkdebug:no-quotes.conf:t.qcow2
same open-cmd             qemu-io -c 'open blkdebug:wa-once.conf:t.qcow2' -c 'write -P 2 0 4k' -c 'write -P 3 0 4k' -c 'read -P 3 0 4k'
same break-no-blkdebug    qemu-io -c 'break write_aio A' -c 'resume A' -c 'remove_break A' t.qcow2
same break-unknown-event  qemu-io -c 'break bogus A' -c 'remove_break A' blkdebug::t.qcow2
same break-removed        qemu-io -c 'break write_aio A' -c 'read 0 4k' -c 'remove_break A' -c 'write -P 1 0 4k' -c 'resume A' blkdebug::t.qcow2

# Where qsm knowingly differs (the `differs` cases): a failed metadata
# write puts a qsm image in its sticky error state (DESIGN.md), so later
# writes fail with EIO (QEMU goes on), the request whose write-back failed
# reports EIO whatever errno was injected, and closing reports the error
# instead of QEMU's "Failed to flush the L2 table cache"; QEMU raises
# refblock_alloc on every refcount update and flush_to_disk where no
# qemu-io script on qcow2 sees it fail, qsm where it writes a new refcount
# block and at each fdatasync.  What is checked there: the injected error
# shows, qsm exits cleanly, and the image has no corruption.
log "inject-error: l2_update, l2_load"
NO_COMPARE=1
differs l2u-once 'Input/output error' t.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 64k 4k' -c 'read -P 2 64k 4k' blkdebug:l2u-once.conf:t.qcow2
differs l2u-always 'Input/output error' t.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 64k 4k' blkdebug:l2u-always.conf:t.qcow2
differs l2u-imm 'Input/output error' t.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 64k 4k' blkdebug:l2u-imm.conf:t.qcow2
differs l2u-enospc 'No space left on device' t.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'read -P 0 0 4k' blkdebug:l2u-enospc.conf:t.qcow2
same l2l-once             qemu-io -c 'read -P 0x33 0 4k' -c 'read -P 0x33 0 4k' blkdebug:l2l-once.conf:filled.qcow2
differs l2l-erofs 'Read-only file system' filled.qcow2 qemu-io -c 'read -P 0x33 0 4k' -c 'read -P 0x33 4k 4k' blkdebug:l2l-erofs.conf:filled.qcow2
differs l2u-writeback 'Input/output error' t.qcow2 qemu-io -t writeback -c 'write -P 1 0 4k' -c 'flush' -c 'write -P 2 0 4k' -c 'flush' blkdebug:l2u-once.conf:t.qcow2

log "inject-error: refblock_update, refblock_alloc"
differs rbu-once 'Input/output error' t.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 64k 4k' blkdebug:rbu-once.conf:t.qcow2
differs rbu-always 'No space left on device' t.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 64k 4k' blkdebug:rbu-always.conf:t.qcow2
differs rbu-imm 'Input/output error' t.qcow2 qemu-io -c 'write -P 1 0 4k' blkdebug:rbu-imm.conf:t.qcow2
differs rba-once 'Input/output error' small.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 512k 64k' -c 'write -P 3 900k 64k' blkdebug:rba.conf:small.qcow2

log "inject-error: write_aio, flush_to_disk, sectors, errno values"
same wa-once              qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 0 4k' -c 'read -P 2 0 4k' blkdebug:wa-once.conf:filled.qcow2
same wa-sector-miss       qemu-io -c 'write -P 1 0 4k' -c 'read -P 1 0 4k' blkdebug:wa-sector.conf:filled.qcow2
same wa-sector-hit        qemu-io -c 'write -P 1 64k 4k' -c 'write -P 2 68k 4k' -c 'read -P 0x33 68k 4k' blkdebug:wa-sector.conf:filled.qcow2
differs flush-once 'Input/output error' filled.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'flush' -c 'flush' blkdebug:flush.conf:filled.qcow2
NO_COMPARE=0

log "set-state chains"
NO_COMPARE=1
same chain-2              qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 4k 4k' -c 'write -P 3 8k 4k' -c 'read -P 1 0 4k' -c 'read -P 0x33 4k 4k' -c 'read -P 3 8k 4k' blkdebug:chain.conf:filled.qcow2
differs chain-3 'No space left on device' filled.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 4k 4k' -c 'write -P 3 8k 4k' -c 'write -P 4 12k 4k' blkdebug:chain3.conf:filled.qcow2
NO_COMPARE=0

log "driver options: -o, --image-opts, json:"
NO_COMPARE=1
same opt-inject           qemu-io -c 'open -o driver=qcow2,file.driver=blkdebug,file.image.filename=filled.qcow2,file.inject-error.0.event=write_aio,file.inject-error.0.once=on' -c 'write -P 1 0 4k' -c 'write -P 2 0 4k' -c 'read -P 2 0 4k'
differs opt-image-opts 'No space left on device' filled.qcow2 qemu-io --image-opts driver=qcow2,file.driver=blkdebug,file.image.filename=filled.qcow2,file.inject-error.0.event=write_aio,file.inject-error.0.errno=28 -c 'write -P 1 0 4k' -c 'read -P 0x33 0 4k'
differs opt-json 'Input/output error' filled.qcow2 qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 4k 4k' -c 'read -P 0x33 4k 4k' 'json:{"driver":"qcow2","file":{"driver":"blkdebug","image":{"driver":"file","filename":"filled.qcow2"},"set-state":[{"event":"write_aio","state":1,"new_state":2}],"inject-error":[{"event":"write_aio","state":2,"errno":5}]}}'
same opt-config           qemu-io -c 'open -o driver=qcow2,file.driver=blkdebug,file.config=wa-once.conf,file.image.filename=filled.qcow2' -c 'write -P 1 0 4k' -c 'write -P 2 0 4k'
NO_COMPARE=0
same opt-bad-event        qemu-io -c 'open -o driver=qcow2,file.driver=blkdebug,file.image.filename=t.qcow2,file.inject-error.0.event=bogus'

log "breakpoints: overlapping allocating writes (iotests 046 style)"
# Cluster 1 (64k..128k) of an empty image: A allocates it, B writes into it
# while A is held at write_aio, resumed before, or after, B's own stop.
brk ovl-a-then-b t.qcow2 \
    'break write_aio A' 'aio_write -P 10 0x10000 0x8000' 'wait_break A' \
    'aio_write -P 11 0x18000 0x8000' 'resume A' 'aio_flush' \
    'read -P 10 0x10000 0x8000' 'read -P 11 0x18000 0x8000'
RACE=1 brk ovl-three t.qcow2 \
    'break write_aio A' 'aio_write -P 20 0x10000 0x4000' 'wait_break A' \
    'aio_write -P 21 0x14000 0x4000' 'aio_write -P 22 0x1c000 0x4000' 'resume A' 'aio_flush' \
    'read -P 20 0x10000 0x4000' 'read -P 21 0x14000 0x4000' 'read -P 0 0x18000 0x4000' \
    'read -P 22 0x1c000 0x4000'
RACE=1 brk ovl-two-held-ab t.qcow2 \
    'break write_aio A' 'aio_write -P 30 0x20000 0x8000' 'wait_break A' \
    'break write_aio B' 'aio_write -P 31 0x40000 0x8000' 'wait_break B' \
    'resume A' 'resume B' 'aio_flush' \
    'read -P 30 0x20000 0x8000' 'read -P 31 0x40000 0x8000'
RACE=1 brk ovl-two-held-ba t.qcow2 \
    'break write_aio A' 'aio_write -P 30 0x20000 0x8000' 'wait_break A' \
    'break write_aio B' 'aio_write -P 31 0x40000 0x8000' 'wait_break B' \
    'resume B' 'resume A' 'aio_flush' \
    'read -P 30 0x20000 0x8000' 'read -P 31 0x40000 0x8000'
RACE=1 brk ovl-in-place-ab filled.qcow2 \
    'break write_aio A' 'aio_write -P 40 0 0x8000' 'wait_break A' \
    'break write_aio B' 'aio_write -P 41 0x8000 0x8000' 'wait_break B' \
    'resume A' 'resume B' 'aio_flush' \
    'read -P 40 0 0x8000' 'read -P 41 0x8000 0x8000'
RACE=1 brk ovl-in-place-ba filled.qcow2 \
    'break write_aio A' 'aio_write -P 40 0 0x8000' 'wait_break A' \
    'break write_aio B' 'aio_write -P 41 0x8000 0x8000' 'wait_break B' \
    'resume B' 'resume A' 'aio_flush' \
    'read -P 40 0 0x8000' 'read -P 41 0x8000 0x8000'
brk ovl-remove-break t.qcow2 \
    'break write_aio A' 'aio_write -P 50 0 4k' 'wait_break A' 'remove_break A' \
    'aio_flush' 'read -P 50 0 4k'
# cluster_alloc: QEMU stops there holding its qcow2 lock, so the second
# write waits for the first; qsm lets it allocate (allocations under one L2
# table run concurrently) and the stopped one classifies its run again when
# resumed: the completions are compared as a set, the data exactly.
RACE=1 brk calloc-other-cluster t.qcow2 \
    'break cluster_alloc A' 'aio_write -P 80 0x10000 0x8000' 'wait_break A' \
    'aio_write -P 81 0x30000 0x8000' 'resume A' 'aio_flush' \
    'read -P 80 0x10000 0x8000' 'read -P 81 0x30000 0x8000' 'read -P 0 0x18000 0x8000'
RACE=1 brk calloc-same-cluster t.qcow2 \
    'break cluster_alloc A' 'aio_write -P 82 0x10000 0x8000' 'wait_break A' \
    'aio_write -P 83 0x18000 0x8000' 'resume A' 'aio_flush' \
    'read -P 82 0x10000 0x8000' 'read -P 83 0x18000 0x8000'
brk read-held filled.qcow2 \
    'break read_aio A' 'aio_read -P 0x33 0 4k' 'wait_break A' \
    'write -P 60 64k 4k' 'resume A' 'aio_flush' 'read -P 60 64k 4k'
# 4k clusters, the second 64k of w.qcow2 allocated: a partial write into an
# allocated cluster of a shared... plain COW from an existing cluster needs
# snapshots; cow_read over a backing file is what iotests 046 breaks on.
(
    cd "$WORK/base" &&
    qemu-img create -q -f qcow2 -b w.qcow2 -F qcow2 ov.qcow2 1M
) || die "cannot create the overlay"
brk cow-read-ab ov.qcow2 \
    'break cow_read A' 'aio_write -P 70 0x1800 0x400' 'wait_break A' \
    'aio_write -P 71 0x5800 0x400' 'resume A' 'aio_flush' \
    'read -P 0x11 0x1000 0x800' 'read -P 70 0x1800 0x400' 'read -P 0x11 0x1c00 0x400' \
    'read -P 71 0x5800 0x400'
brk cow-read-same ov.qcow2 \
    'break cow_read A' 'aio_write -P 72 0x1800 0x400' 'wait_break A' \
    'aio_write -P 73 0x1c00 0x400' 'resume A' 'aio_flush' \
    'read -P 0x11 0x1000 0x800' 'read -P 72 0x1800 0x400' 'read -P 73 0x1c00 0x400'

log "limits: align, max-transfer, opt/max-write-zero, opt/max-discard; iotype"
# The checks of the options, in QEMU's words.
lim() { # lim TAG OPTS SCRIPT-LINES...: filled.qcow2 over blkdebug with OPTS
    local tag=$1 opts=$2 args=() l
    shift 2
    for l in "$@"; do
        args+=(-c "$l")
    done
    same "$tag" qemu-io -c "open -o driver=qcow2,file.driver=blkdebug,file.image.filename=filled.qcow2,$opts" "${args[@]}"
}
rawlim() { # rawlim TAG OPTS SCRIPT-LINES...: r.img (raw) read through blkdebug with OPTS
    local tag=$1 opts=$2 args=() l
    shift 2
    for l in "$@"; do
        args+=(-c "$l")
    done
    same "$tag" qemu-io --image-opts "driver=blkdebug,image.filename=r.img,$opts" "${args[@]}"
}
lim lim-bad-align 'file.align=3000' 'read 0 1'
lim lim-align-huge 'file.align=2G' 'read 0 1'
lim lim-bad-mt 'file.align=4096,file.max-transfer=6144' 'read 0 1'
lim lim-bad-mwz 'file.opt-write-zero=8192,file.max-write-zero=4096' 'read 0 1'
lim lim-bad-md 'file.align=512,file.max-discard=1000' 'read 0 1'
lim lim-bad-size 'file.max-transfer=12q' 'read 0 1'
lim lim-iotype-bad 'file.inject-error.0.event=write_aio,file.inject-error.0.iotype=bogus' 'read 0 1'
lim lim-offset-key 'file.inject-error.0.event=write_aio,file.inject-error.0.offset=1' 'read 0 1'
lim lim-sizes 'file.align=4k,file.max-transfer=1.5M,file.opt-discard=64k,file.max-discard=1M' \
    'write -P 1 0 100k' 'read -P 1 0 100k' 'discard 0 64k' 'read -P 0 0 64k'
NO_COMPARE=1
# qcow2's data cluster 0 is at host 0x50000 (sector 640).  An armed rule
# for sector 648 (4k into it) fails a write of 0x1200+512 only when align
# pads it to 8k; iotype=read fails its read-modify-write read only.
lim lim-pad-sector 'file.align=8192,file.inject-error.0.event=write_aio,file.inject-error.0.sector=648' \
    'write -P 1 0x1200 512' 'read -P 0x33 0x1200 512' 'write -P 2 0x2000 4k' 'read -P 2 0x2000 4k'
lim lim-nopad-sector 'file.inject-error.0.event=write_aio,file.inject-error.0.sector=648' \
    'write -P 1 0x1200 512' 'read -P 1 0x1200 512' 'write -P 2 0x1000 512' 'read -P 0x33 0x1000 512'
lim lim-iotype-write 'file.inject-error.0.event=read_aio,file.inject-error.0.iotype=write' \
    'read -P 0x33 0 4k' 'read -P 0x33 4k 4k' 'write -P 6 0 4k' 'read -P 0x33 0 4k'
NO_COMPARE=0
# Raw, the blkdebug node on top: the file's bytes show exactly which pieces
# were written, zeroed, discarded (a piece below align is dropped).
NO_COMPARE=0
rawlim raw-zero-discard 'align=4096,opt-write-zero=8192,max-write-zero=16384,opt-discard=8k,inject-error.0.event=pwritev_zero,inject-error.0.iotype=write,inject-error.0.sector=8' \
    'write -z 1000 30000' 'discard 33000 29000'
rawlim raw-zero-ok 'align=4096,opt-write-zero=8192,max-write-zero=16384' \
    'write -z 1000 30000' 'read -P 0 1000 30000' 'read -P 0x5a 0 1000' 'read -P 0x5a 31000 1000'
rawlim raw-split 'align=512,max-transfer=4096,inject-error.0.event=pwritev,inject-error.0.sector=20,inject-error.0.once=on' \
    'write -P 3 0 16k' 'read -P 3 0 8k' 'read -P 0x5a 8k 8k' 'write -P 4 0 16k' 'read -P 4 0 16k'
rawlim raw-read-pad 'align=4096,inject-error.0.event=pwritev,inject-error.0.iotype=read,inject-error.0.sector=9' \
    'write -P 4 0 4k' 'read -P 4 0 4k' 'read 5000 10' 'read -P 0x5a 8k 10'
rawlim raw-block-status 'align=4096,inject-error.0.event=pwritev,inject-error.0.iotype=block-status' \
    'write -P 1 0 4k' 'read -P 1 0 4k' 'map' 'alloc 0 4k'

log "breakpoints: three allocating writes held together, released in every order"
# iotests 046's orderings: allocations in one L2 table (clusters 1, 3, 5 of
# an empty image), each held at write_aio, released in all six orders,
# with a fourth write into cluster 1 queued behind the held allocation;
# the data read back in the same script, both images checked clean.
for order in "A B C" "A C B" "B A C" "B C A" "C A B" "C B A"; do
    set -- $order
    RACE=1 brk "three-$1$2$3" t.qcow2 \
        'break write_aio A' 'aio_write -P 90 0x10000 0x8000' 'wait_break A' \
        'break write_aio B' 'aio_write -P 91 0x30000 0x8000' 'wait_break B' \
        'break write_aio C' 'aio_write -P 92 0x50000 0x8000' 'wait_break C' \
        'aio_write -P 93 0x18000 0x8000' \
        "resume $1" "resume $2" "resume $3" 'aio_flush' \
        'read -P 90 0x10000 0x8000' 'read -P 93 0x18000 0x8000' \
        'read -P 91 0x30000 0x8000' 'read -P 0 0x38000 0x8000' \
        'read -P 92 0x50000 0x8000' 'read -P 0 0x58000 0x8000'
done

log "$N cases"
interop_finish
