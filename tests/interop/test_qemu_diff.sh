#!/usr/bin/env bash
# tests/interop/test_qemu_diff.sh: where qsm used to behave differently from
# QEMU on the same qemu-io script (issue 13), `qsm` invoked as qemu-io (a
# symlink, as README.md says) against the real qemu-io 7.2:
#  1. opening a dirty image read-write (lazy refcounts, killed by `abort`)
#     repairs it and prints QEMU's repair log on stderr ("ERROR cluster N
#     refcount=0 reference=1", "Leaked cluster ...", "Rebuilding refcount
#     structure", "Repairing cluster ..."): identical stdout, stderr and exit
#     status, repaired images that qemu-img compare calls identical and
#     qemu-img check finds clean; dirty images made by qemu-io and by qsm;
#  2. crashes with lazy refcounts: the refcounts of new L2 tables are eager,
#     only data clusters lag: qemu-img check prints exactly what it prints
#     for qemu-io's image of the same script (workloads whose new L2 tables
#     are made by zero writes, where QEMU and qsm defer the same clusters),
#     and for scripts whose data writes allocate L2 tables qsm's image never
#     has an L2 table with refcount 0 and no more errors than QEMU's;
#  3. discard and write -z over the partial last cluster of an image whose
#     size is not cluster aligned: the tail is a whole cluster when the
#     request reaches the end (data read back, `map`, qemu-img map and
#     compare as qemu-io's), v3 and v2 images.
. "$(dirname "$0")/lib.sh"
interop_init

qsm_as_qemu_io

filter() { sed -e "s#$WORK#WORK#g" | filter_timing; }

# differ TAG WHAT A B: A and B (files) must be identical after filter.
differ() {
    CHECKS=$((CHECKS + 1))
    if ! diff -u <(filter <"$3") <(filter <"$4") >"$WORK/diff"; then
        fail "$1: $2 differs from qemu-io's (-qemu +qsm)"
        sed 's/^/    | /' "$WORK/diff" | head -n 20
        return 1
    fi
    return 0
}

# both TAG SRC ARGS...: copy image SRC to $WORK/q/t.qcow2 and $WORK/s/t.qcow2,
# run `qemu-io ARGS t.qcow2` in each directory, the real one in q/, qsm under
# the name qemu-io in s/; compare exit status, stdout and stderr.  Leaves
# $WORK/{q,s}.{out,err}.
both() {
    local tag=$1 src=$2 rq rs d
    shift 2
    for d in q s; do
        rm -rf "$WORK/$d"
        mkdir -p "$WORK/$d"
        cp "$src" "$WORK/$d/t.qcow2"
    done
    (cd "$WORK/q" && env PATH="$REAL_PATH" timeout "$TIMEOUT" qemu-io "$@" t.qcow2 \
        </dev/null >"$WORK/q.out" 2>"$WORK/q.err")
    rq=$?
    (cd "$WORK/s" && env PATH="$BIN:$REAL_PATH" timeout "$TIMEOUT" qemu-io "$@" t.qcow2 \
        </dev/null >"$WORK/s.out" 2>"$WORK/s.err")
    rs=$?
    CHECKS=$((CHECKS + 1))
    if [ $rq -ne $rs ]; then
        fail "$tag: exit status $rs, qemu-io's $rq: qemu-io $*"
        show_tail "$WORK/s.err" 5
    fi
    differ "$tag" stdout "$WORK/q.out" "$WORK/s.out"
    differ "$tag" stderr "$WORK/q.err" "$WORK/s.err"
}

# expect TAG FILE PATTERN: FILE (qemu-io's own output) has a line matching
# PATTERN, so the case tests what it means to (setup check).
expect() {
    CHECKS=$((CHECKS + 1))
    grep -q -- "$3" "$2" || { fail "$1: no line '$3' in qemu-io's output (test setup)"; show_tail "$2" 5; }
}

# ---------------------------------------------------------------- 1 ------
log "1: the repair log of a dirty image"
mkdir -p "$WORK/dirty"
# dirty_by TOOL NAME SCRIPT...: a lazy-refcounts image killed after SCRIPT.
dirty_by() {
    local tool=$1 name=$2 img="$WORK/dirty/$2.qcow2"
    shift 2
    qemu_create "$img" lazy_refcounts=on
    if [ "$tool" = qsm ]; then
        "$QSM" io "$@" -c abort "$img" >/dev/null 2>&1
    else
        (qemu-io "$@" -c abort "$img") >/dev/null 2>&1
    fi
    python3 -c "import sys; b=open(sys.argv[1],'rb').read(80); sys.exit(0 if b[79] & 1 else 1)" "$img" ||
        fail "1: $name: the image is not dirty after abort (test setup)"
}
dirty_by qemu wt -t writethrough -c 'write -P 0x5a 0 64k' -c 'write -P 0x6b 1M 100000' \
    -c 'write -P 0x7c 512M 4k'
dirty_by qemu reuse -c 'write -P 1 0 256k' -c flush -c 'discard 0 128k' -c 'write -P 2 1M 64k' \
    -c flush
dirty_by qsm leak -c 'write -P 1 0 256k' -c flush -c 'discard 0 128k' -c 'write -P 2 1M 64k' \
    -c flush
dirty_by qemu many -t writethrough -c 'write -P 3 0 1M' -c 'write -P 4 256M 192k' \
    -c 'write -z 2M 64k' -c 'write -P 5 640k 8k'
for name in wt reuse leak many; do
    both "1: $name: read-write open" "$WORK/dirty/$name.qcow2" -c 'read -v 1M 16' -c 'write -P 9 3M 4k' \
        -c 'read -P 9 3M 4k' -c map
    case $name in
    leak) expect "1: $name" "$WORK/q.err" '^Leaked cluster [0-9]* refcount=1 reference=0$'
          expect "1: $name" "$WORK/q.err" '^Repairing cluster [0-9]* refcount=1 reference=0$' ;;
    *)    expect "1: $name" "$WORK/q.err" '^ERROR cluster [0-9]* refcount=0 reference=1$'
          expect "1: $name" "$WORK/q.err" '^Rebuilding refcount structure$' ;;
    esac
    compare_images "1: $name: repaired images" "$WORK/q/t.qcow2" "$WORK/s/t.qcow2"
    check_clean "1: $name: qemu-io's repaired image" "$WORK/q/t.qcow2"
    check_clean "1: $name: qsm's repaired image" "$WORK/s/t.qcow2"
    # Read-only opens repair nothing and print nothing.
    both "1: $name: read-only open" "$WORK/dirty/$name.qcow2" -r -c 'read -v 1M 16'
    CHECKS=$((CHECKS + 1))
    [ -s "$WORK/s.err" ] && fail "1: $name: a read-only open printed on stderr"
done

# ---------------------------------------------------------------- 2 ------
log "2: crash with lazy refcounts: which refcounts lag"
# crash TAG EXACT ARGS...: run the script (then abort) on fresh lazy images
# with both tools, then qemu-img check both.
crash() {
    local tag=$1 exact=$2 d rq rs
    shift 2
    for d in q s; do
        rm -rf "$WORK/$d"
        mkdir -p "$WORK/$d"
        qemu_create "$WORK/$d/t.qcow2" lazy_refcounts=on
    done
    (cd "$WORK/q" && (env PATH="$REAL_PATH" timeout "$TIMEOUT" qemu-io "$@" -c abort t.qcow2 \
        </dev/null) >/dev/null 2>&1)
    rq=$?
    (cd "$WORK/s" && (env PATH="$BIN:$REAL_PATH" timeout "$TIMEOUT" qemu-io "$@" -c abort t.qcow2 \
        </dev/null) >/dev/null 2>&1)
    rs=$?
    CHECKS=$((CHECKS + 1))
    [ $rq -eq $rs ] || fail "$tag: exit status $rs, qemu-io's $rq"
    qemu-img check "$WORK/q/t.qcow2" >"$WORK/q.check" 2>&1; rq=$?
    qemu-img check "$WORK/s/t.qcow2" >"$WORK/s.check" 2>&1; rs=$?
    expect "$tag" "$WORK/q.check" 'refcount=0 reference=1'
    CHECKS=$((CHECKS + 1))
    if grep -q 'OFLAG_COPIED L2 cluster' "$WORK/s.check"; then
        fail "$tag: an L2 table of qsm's image has refcount 0 after the crash"
        show_tail "$WORK/s.check" 8
    fi
    local nq ns
    nq=$(sed -n 's/^\([0-9]*\) errors were found.*/\1/p' "$WORK/q.check")
    ns=$(sed -n 's/^\([0-9]*\) errors were found.*/\1/p' "$WORK/s.check")
    CHECKS=$((CHECKS + 1))
    if [ "$exact" = exact ]; then
        [ $rq -eq $rs ] || fail "$tag: qemu-img check exit $rs, for qemu-io's image $rq"
        differ "$tag" "qemu-img check" "$WORK/q.check" "$WORK/s.check"
    elif [ "${ns:-0}" -gt "${nq:-0}" ]; then
        fail "$tag: qemu-img check finds ${ns:-0} errors, ${nq:-0} on qemu-io's image"
        show_tail "$WORK/s.check" 8
    fi
    # Both repair the same way when opened again.
    for d in q s; do cp "$WORK/$d/t.qcow2" "$WORK/crash-$d.qcow2"; done
    both "$tag: repairing open" "$WORK/crash-q.qcow2" -c 'read -v 0 16'
    check_clean "$tag: qsm's repaired image" "$WORK/s/t.qcow2"
}
Z="-c 'write -z 512M 64k' -c 'write -z 0 64k' -c flush -c 'write -P 0x7c 512M 4k' \
   -c 'write -P 1 64k 128k' -c 'write -z 128k 64k' -c flush -c 'discard 0 64k' -c flush"
Z2="-c 'write -z 0 64k' -c 'write -z 1G 64k' -c 'write -z 1536M 64k' -c flush \
   -c 'write -P 2 64k 4k' -c 'write -P 3 1G 100000' -c flush -c 'write -P 4 1536M 8k' -c flush"
D="-c 'write -P 0x5a 0 64k' -c flush -c 'write -P 0x6b 1M 100000' -c flush \
   -c 'write -P 0x7c 512M 4k' -c flush -c 'write 2M 64k' -c flush"
for t in writethrough writeback; do
    eval "crash \"2: zero-made tables, $t\" exact -t $t $Z"
    eval "crash \"2: zero-made tables 2, $t\" exact -t $t $Z2"
    eval "crash \"2: data-made tables, $t\" atmost -t $t $D"
done

# ---------------------------------------------------------------- 3 ------
log "3: discard and write -z over the partial last cluster"
# partial OPTS CMD: on a 1000 KiB image (last cluster 40 KiB, 64 KiB
# clusters) filled with data, CMD, then the tail read back and mapped.
partial() {
    local opts=$1 cmd=$2 tag="3: ${1:-v3}: $2" d
    rm -f "$WORK/p.qcow2"
    qemu-img create -q -f qcow2 ${opts:+-o "$opts"} "$WORK/p.qcow2" 1000k
    both "$tag" "$WORK/p.qcow2" -c 'write -P 0x11 0 1000k' -c "$cmd" -c 'read -v 983040 16' \
        -c 'read -v 1023984 16' -c map
    compare_images "$tag" "$WORK/q/t.qcow2" "$WORK/s/t.qcow2"
    for d in q s; do
        qemu-img map --output=json "$WORK/$d/t.qcow2" >"$WORK/$d.map" 2>&1
    done
    differ "$tag" "qemu-img map" "$WORK/q.map" "$WORK/s.map"
    check_clean "$tag: qsm's image" "$WORK/s/t.qcow2"
}
for opts in "" compat=0.10; do
    partial "$opts" 'discard 983040 40960'
    # (setup: QEMU drops the tail's data.)
    [ "$opts" = "" ] && expect "3: discard" "$WORK/q.out" '^000f0000:  00 00 00 00'
    partial "$opts" 'discard 0 1000k'
    partial "$opts" 'discard 987136 36864'
    partial "$opts" 'write -z 983040 40960'
    partial "$opts" 'write -z -u 983040 40960'
    partial "$opts" 'write -z 0 1000k'
    partial "$opts" 'write -z 987136 36864'
    partial "$opts" 'write -z 983040 4096'
done

interop_finish
