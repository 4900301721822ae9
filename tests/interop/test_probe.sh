#!/usr/bin/env bash
# tests/interop/test_probe.sh: images named without -f are probed as
# qemu-img 7.2 probes them (issue 16).
#
#   same     every command that opens one image (info, map, check, check -r,
#            compare, snapshot -l/-c/-a/-d, resize, bench, convert) on a raw
#            file and a qcow2 image named without -f prints what qemu-img
#            prints and exits with its status (the program name aside);
#   guard    qsm io on a probed raw file as qemu-io: the warning, and
#            writes that would leave block 0 looking like qcow2 refused
#            with "Operation not permitted" (whole, partial, at the end of a
#            longer write); the files end byte-identical;
#   convert  `qsm convert -O qcow2 disk.raw disk.qcow2` as users type it:
#            qemu-img compare calls the result identical to the raw file;
#   other    images of formats qsm does not open (vmdk, vdi, vhdx, vpc, qed,
#            qcow, parallels) are refused naming the format, untouched;
#   never    a backing file is never probed: a raw backing file holding a
#            qcow2 header, named without a backing format, is refused.
source "$(dirname "$0")/lib.sh"
interop_init
cd "$WORK" || die "cd $WORK"

# same TAG ARGS...: qsm ARGS and qemu-img ARGS on copies of the files they
# name (in dirs q/ and s/), the same output, status and resulting files.
same() {
    local tag=$1 oq os rq rs f
    shift
    rm -rf q s && mkdir q s
    for f in *.raw *.qcow2; do cp --sparse=always "$f" q/ && cp --sparse=always "$f" s/; done
    oq=$(cd q && qemu-img "$@" 2>&1); rq=$?
    os=$(cd s && "$QSM" "$@" 2>&1); rs=$?
    os=$(printf '%s' "$os" | sed -E 's/^qsm [a-z]+: /qemu-img: /')
    CHECKS=$((CHECKS + 1))
    if [ "$rq" != "$rs" ] || [ "$oq" != "$os" ]; then
        fail "$tag: qsm $* gave ($rs) and qemu-img ($rq):"
        diff <(printf '%s\n' "$oq") <(printf '%s\n' "$os") | head -n 12 | sed 's/^/    | /'
        return 1
    fi
    for f in q/*; do
        CHECKS=$((CHECKS + 1))
        cmp -s "$f" "s/${f#q/}" || fail "$tag: ${f#q/} differs after qsm $* and qemu-img $*"
    done
}

head -c 3M /dev/urandom >disk.raw
truncate -s 4M disk.raw
qemu-img create -q -f qcow2 img.qcow2 8M
qemu-io -f qcow2 -c 'write -P 7 1M 64k' img.qcow2 >/dev/null || die "qemu-io failed"

# --- same ---------------------------------------------------------------------
for f in disk.raw img.qcow2; do
    same "info $f" info "$f"
    same "info --output=json $f" info --output=json "$f"
    same "map $f" map --output=json "$f"
    same "check $f" check "$f"
    same "snapshot -l $f" snapshot -l "$f"
    same "resize $f" resize "$f" 6M
done
same "check -r all raw" check -r all disk.raw
same "check -r leaks qcow2" check -r leaks img.qcow2
same "compare raw qcow2" compare disk.raw img.qcow2
same "compare raw raw" compare disk.raw disk.raw
for a in "-c s1" "-a s1" "-d s1"; do
    same "snapshot $a raw" snapshot $a disk.raw
done
# (a snapshot records the time: the images differ by that)
CHECKS=$((CHECKS + 1))
"$QSM" snapshot -c s1 img.qcow2 && qemu-img snapshot -l img.qcow2 | grep -q ' s1 ' ||
    fail "snapshot -c on a probed qcow2 image did not make s1"

# --- guard ----------------------------------------------------------------------
printf 'QFI\xfb\0\0\0\3' >hdr.bin
head -c 512 /dev/zero >>hdr.bin
# io_same TAG CMD...: qsm io and qemu-io on copies of disk.raw, no -f
# (or $IO_FMT's)
io_same() {
    local tag=$1 oq os
    shift
    local args=(${IO_FMT:+-f "$IO_FMT"})
    for c in "$@"; do args+=(-c "$c"); done
    rm -rf q s && mkdir q s && cp disk.raw q/ && cp disk.raw s/
    oq=$(cd q && qemu-io "${args[@]}" disk.raw 2>&1 | sed -E 's/[0-9.]+ sec \([^)]*\)/T/')
    os=$(cd s && "$QSM" io "${args[@]}" disk.raw 2>&1 | sed -E 's/[0-9.]+ sec \([^)]*\)/T/')
    CHECKS=$((CHECKS + 1))
    if [ "$oq" != "$os" ]; then
        fail "guard $tag: qsm io and qemu-io print differently:"
        diff <(printf '%s\n' "$oq") <(printf '%s\n' "$os") | head -n 12 | sed 's/^/    | /'
    fi
    CHECKS=$((CHECKS + 1))
    cmp -s q/disk.raw s/disk.raw || fail "guard $tag: the files differ afterwards"
}
io_same plain "write -P 1 0 512" "read -P 1 0 512"
io_same header "write -s $WORK/hdr.bin 0 512" "read -P 0 0 512"
io_same partial "write -s $WORK/hdr.bin 0 8"
io_same longer "write -s $WORK/hdr.bin 0 520"
io_same halves "write -s $WORK/hdr.bin 0 4" "write -P 0 4 4" "write -s $WORK/hdr.bin 0 8"
io_same past "write -s $WORK/hdr.bin 512 512"
# -f raw: the user said what it is; no warning, no guard.
IO_FMT=raw io_same named "write -s $WORK/hdr.bin 0 512"

# --- convert ------------------------------------------------------------------
CHECKS=$((CHECKS + 1))
if out=$("$QSM" convert -O qcow2 disk.raw conv.qcow2 2>&1) && [ -z "$out" ]; then
    out=$(qemu-img compare -f raw -F qcow2 disk.raw conv.qcow2 2>&1) ||
        fail "convert: the qcow2 target differs from the raw source: $out"
    check_clean "convert raw -> qcow2" conv.qcow2
else
    fail "convert -O qcow2 disk.raw conv.qcow2: $out"
fi
CHECKS=$((CHECKS + 1))
out=$("$QSM" convert -O raw img.qcow2 conv.raw 2>&1) &&
    qemu-img compare -f qcow2 -F raw img.qcow2 conv.raw >/dev/null ||
    fail "convert -O raw img.qcow2 (probed qcow2): $out"

# --- other formats ------------------------------------------------------------
for f in vmdk vdi vhdx vpc qed qcow parallels; do
    qemu-img create -q -f $f "x.$f" 1M || die "qemu-img create -f $f failed"
    cp "x.$f" "x.$f.orig"
    for cmd in "info" "check" "map" "io -c 'write 0 512'" "convert -O qcow2 x.$f y.qcow2"; do
        case $cmd in convert*) c="$QSM $cmd" ;; *) c="$QSM $cmd x.$f" ;; esac
        out=$(eval "$c" 2>&1); rc=$?
        CHECKS=$((CHECKS + 1))
        [ $rc -ne 0 ] || fail "$f: qsm ${cmd%% *} exited 0 on a $f image"
        CHECKS=$((CHECKS + 1))
        printf '%s\n' "$out" | grep -q "Image format '$f' (probed) is not supported" ||
            fail "$f: qsm ${cmd%% *} does not name the format: $out"
    done
    CHECKS=$((CHECKS + 1))
    cmp -s "x.$f" "x.$f.orig" || fail "$f: qsm changed an image it refused"
    [ ! -e y.qcow2 ] || fail "$f: convert left a target behind"
    rm -f y.qcow2
done

# --- never ----------------------------------------------------------------------
# A raw base whose first bytes are a qcow2 header (a guest wrote one), the
# overlay without a backing format: qemu-img refuses it, and so does qsm.
cp hdr.bin base.raw && truncate -s 8M base.raw
qemu-img create -q -f qcow2 -b base.raw -F raw ov.qcow2 8M
python3 - ov.qcow2 <<'EOF'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
i = b.index(bytes.fromhex("e2792aca"))   # the backing-format extension
b[i:i + 4] = bytes.fromhex("12345678")   # now an unknown one: no format
open(p, "wb").write(b)
EOF
CHECKS=$((CHECKS + 1))
out=$("$QSM" io -c 'read 0 512' ov.qcow2 2>&1) &&
    fail "never: a backing file without a recorded format opened (probed?): $out"
printf '%s\n' "$out" | grep -q "format is not recorded" ||
    fail "never: the refusal does not say the backing format is missing: $out"

interop_finish
