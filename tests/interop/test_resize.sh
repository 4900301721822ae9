#!/usr/bin/env bash
# `qsm resize` against `qemu-img resize` 7.2 (#5).
#  - Growing (absolute and +relative sizes, inside the L1 table and past it
#    so the L1 table moves, v2 and v3, 512-byte and 2M clusters, raw) and
#    shrinking with --shrink, over nothing or over data (released, as
#    QEMU does; the cluster the new end falls in stays, so does a table
#    still half in use):
#    qsm's image passes qemu-img check, has qemu's new virtual size,
#    qemu-img compare calls it identical to a copy resized by qemu-img, and
#    the last sector can be written and read back.
#  - Refusals give qemu-img's message (qemu-img -> qsm resize) and exit
#    status and leave the file untouched: shrinking without --shrink, bad
#    and non-positive sizes, a size that is not a multiple of 512, missing
#    or extra arguments.
. "$(dirname "$0")/lib.sh"
interop_init
cd "$WORK" || die "cd $WORK"

md5() { md5sum "$1" | cut -d' ' -f1; }

# resize_case OPTS SIZE0 NEWSIZE [FMT]: same image resized by both tools
n=0
resize_case() {
    local opts=$1 size0=$2 new=$3 fmt=${4:-qcow2} q s out
    n=$((n + 1))
    q=q$n.$fmt; s=s$n.$fmt
    if [ "$fmt" = raw ]; then
        truncate -s "$size0" "$q"
    else
        qemu-img create -q -f qcow2 -o "$opts" "$q" "$size0" || die "create $opts"
    fi
    qemu-io -f "$fmt" -c 'write -P 5 0 70k' -c 'write -P 6 300k 5k' "$q" >/dev/null || die "qemu-io"
    cp "$q" "$s"
    qemu-img resize -q -f "$fmt" --shrink "$q" -- "$new" || die "qemu-img resize $q $new"
    CHECKS=$((CHECKS + 1))
    if ! out=$("$QSM" resize -f "$fmt" --shrink "$s" "$new" 2>&1) || [ "$out" != "Image resized." ]; then
        fail "qsm resize -f $fmt ($opts) $size0 -> $new: '$out'"
        return
    fi
    CHECKS=$((CHECKS + 1))
    a=$(qemu-img info -f "$fmt" --output=json "$q" | grep '"virtual-size"')
    b=$(qemu-img info -f "$fmt" --output=json "$s" | grep '"virtual-size"')
    [ "$a" = "$b" ] || fail "resize ($opts) $size0 -> $new: qsm gives $b, qemu-img $a"
    [ "$fmt" = qcow2 ] && check_clean "resize ($opts) $size0 -> $new" "$s"
    CHECKS=$((CHECKS + 1))
    out=$(qemu-img compare -f "$fmt" -F "$fmt" "$q" "$s" 2>&1) ||
        fail "resize ($opts) $size0 -> $new: qemu-img compare: $out"
    # the new end is usable
    CHECKS=$((CHECKS + 1))
    local sz
    sz=$(qemu-img info -f "$fmt" --output=json "$s" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    qemu-io -f "$fmt" -c "write -P 7 $((sz - 512)) 512" -c "read -P 7 $((sz - 512)) 512" "$s" | grep -q 'read 512/512' ||
        fail "resize ($opts) $size0 -> $new: cannot write the last sector"
    [ "$fmt" = qcow2 ] && check_clean "resize ($opts) $size0 -> $new, written" "$s"
}

resize_case cluster_size=64k 10M +20M
resize_case cluster_size=64k 10M 3G             # L1 table grows (one entry maps 512M)
resize_case cluster_size=64k,compat=0.10 1G 5000M
resize_case cluster_size=512 1M 40M             # L1 grows past one cluster
resize_case cluster_size=2M,refcount_bits=1 100M 20G
resize_case cluster_size=4k 20M 2M               # shrink, nothing allocated past 2M
resize_case cluster_size=64k 8M -4M              # relative shrink
resize_case cluster_size=64k 1M 200k             # shrink over the data at 300k
resize_case cluster_size=4k 1M 66048             # inside the 70k write, a cluster straddling
resize_case cluster_size=512 1M 32k              # L2 tables wholly past the end released
resize_case cluster_size=64k,compat=0.10 1M 64k  # v2
resize_case "" 1M +1536k raw
resize_case "" 3M 1000001 raw                    # raw: any length

# Refusals: qemu-img's message and status, file untouched.
qemu-img create -q -f qcow2 r.qcow2 10M
qemu-io -c 'write -P 1 8M 64k' r.qcow2 >/dev/null
refuse() {
    local tag=$1 a b ra rb h
    shift
    h=$(md5 r.qcow2)
    CHECKS=$((CHECKS + 1))
    cp r.qcow2 rq.qcow2
    qemu-img resize "${@//r.qcow2/rq.qcow2}" >qemu.out 2>&1; ra=$?
    a=$(sed 's/qemu-img/qsm resize/; s/rq\.qcow2/r.qcow2/g' qemu.out)
    b=$("$QSM" resize "$@" 2>&1); rb=$?
    [ "$ra" = "$rb" ] && [ "$a" = "$b" ] || fail "$tag: qsm resize $* gave ($rb) '$b', qemu-img ($ra) '$a'"
    [ "$(md5 r.qcow2)" = "$h" ] || fail "$tag: qsm resize $* changed the image"
}
refuse "shrink without --shrink" r.qcow2 5M
refuse "relative shrink without --shrink" r.qcow2 -1M
refuse "bad size" r.qcow2 12Q
refuse "fraction without suffix" r.qcow2 1.5
refuse "non-positive" r.qcow2 -- -10M
refuse "2^63" r.qcow2 8E
refuse "out of range" r.qcow2 +16E
refuse "not a multiple of 512" r.qcow2 20000001
refuse "missing size" r.qcow2
refuse "extra argument" r.qcow2 1 2M
CHECKS=$((CHECKS + 1))
out=$("$QSM" resize missing.qcow2 1M 2>&1); rc=$?
[ $rc = 1 ] && [ "$out" = "qsm resize: Could not open 'missing.qcow2': Could not open 'missing.qcow2': No such file or directory" ] ||
    fail "missing file: exit $rc, '$out'"

interop_finish
