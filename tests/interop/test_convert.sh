#!/usr/bin/env bash
# `qsm convert` against `qemu-img convert` 7.2 (#5).
# On every image of tools_fixtures.sh (data, zero and compressed clusters,
# holes, chains of depth 1-3 over a raw base, raw files) and a larger mixed
# image (random, text-like, zero and unallocated regions; QSM_TEST_SCALE):
#  - qcow2 and raw targets, and -c: qemu-img compare calls the target
#    identical to the source, qemu-img check calls a qcow2 target clean,
#    and qemu-img map of the target (host offsets aside) is the map of
#    qemu-img convert's target: zero regions are left unallocated, the
#    chain is flattened;
#  - raw -> qcow2 -> raw round trip is byte-identical (cmp);
#  - -o cluster_size/compat/refcount_bits/lazy_refcounts/preallocation/
#    compression_type give the image qemu-img info describes; -c with
#    compression_type=zstd at 4k, 64k and 2M clusters, read both ways;
#  - -B/-F keep a backing file: only what the source's top image allocates
#    is copied, zeros become zero clusters (not past the backing end),
#    the same map as qemu-img convert -B;
#  - -p prints qemu-img's progress figures;
#  - refusals print qemu-img's message and exit 1.
. "$(dirname "$0")/lib.sh"
. "$INTEROP_DIR/tools_fixtures.sh"
interop_init

make_fixtures "$WORK"
cd "$WORK" || die "cd $WORK"

# map_shape IMG FMT: qemu-img map --output=json without host offsets, with
# the entries that then agree merged (allocation order differs per tool)
map_shape() {
    qemu-img map -f "$2" --output=json "$1" | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    e.pop("offset", None)
    if out and all(out[-1][k] == e[k] for k in ("depth", "present", "zero", "data")):
        out[-1]["length"] += e["length"]
    else:
        out.append(e)
for e in out:
    print(e)'
}

# conv TAG SRC SRCFMT OUTFMT [OPTIONS...]: both tools convert; check qsm's
conv() {
    local tag=$1 src=$2 sfmt=$3 ofmt=$4 out a b
    shift 4
    rm -f q.out s.out
    qemu-img convert -f "$sfmt" -O "$ofmt" "$@" "$src" q.out || die "qemu-img convert $tag"
    CHECKS=$((CHECKS + 1))
    if ! out=$("$QSM" convert -f "$sfmt" -O "$ofmt" "$@" "$src" s.out 2>&1) || [ -n "$out" ]; then
        fail "$tag: qsm convert -f $sfmt -O $ofmt $* $src failed: $out"
        return 1
    fi
    CHECKS=$((CHECKS + 1))
    out=$(qemu-img compare -f "$sfmt" -F "$ofmt" "$src" s.out 2>&1) ||
        fail "$tag: target differs from the source: $out"
    [ "$ofmt" = qcow2 ] && check_clean "$tag" s.out
    CHECKS=$((CHECKS + 1))
    a=$(map_shape q.out "$ofmt"); b=$(map_shape s.out "$ofmt")
    if [ "$a" != "$b" ]; then
        fail "$tag: qemu-img map of qsm's target differs from qemu-img convert's:"
        diff <(printf '%s\n' "$a") <(printf '%s\n' "$b") | head -n 10 | sed 's/^/    | /'
    fi
    return 0
}

for f in $FIXTURES; do
    img=${f%%:*}; fmt=${f##*:}
    conv "$img -> qcow2" "$img" "$fmt" qcow2
    conv "$img -> raw" "$img" "$fmt" raw
    conv "$img -> qcow2 -c" "$img" "$fmt" qcow2 -c
done

# Target options (what qemu-img info shows must agree).
info_of() { qemu-img info --output=json "$1" | grep -E '"(cluster-size|compat|refcount-bits|lazy-refcounts|virtual-size|compression-type)"' | tr -d ' \n'; }
for o in cluster_size=4k,compat=0.10 cluster_size=512,refcount_bits=1 cluster_size=2M,lazy_refcounts=on \
         preallocation=metadata refcount_bits=64,cluster_size=16k compression_type=zstd; do
    conv "data -o $o" data.qcow2 qcow2 qcow2 -o "$o"
    CHECKS=$((CHECKS + 1))
    [ "$(info_of q.out)" = "$(info_of s.out)" ] || fail "-o $o: info $(info_of s.out), qemu-img's $(info_of q.out)"
done
conv "chain3 -c -o cluster_size=4k" chain3.qcow2 qcow2 qcow2 -c -o cluster_size=4k
# zstd: the clusters qsm compresses are zstd frames qemu-img reads (compare
# above), and qsm reads the frames qemu-img convert -c writes.
for cl in 4k 64k 2M; do
    conv "data -c zstd $cl" data.qcow2 qcow2 qcow2 -c -o compression_type=zstd,cluster_size=$cl
    CHECKS=$((CHECKS + 1))
    out=$("$QSM" compare -f qcow2 -F qcow2 data.qcow2 q.out 2>&1) ||
        fail "data -c zstd $cl: qsm reads qemu-img's zstd target wrong: $out"
done

# Keeping a backing file.
conv "chain2 -B chain1" chain2.qcow2 qcow2 qcow2 -B chain1.qcow2 -F qcow2
conv "chain3 -B mid3" chain3.qcow2 qcow2 qcow2 -B mid3.qcow2 -F qcow2 -o cluster_size=4k
conv "data -B base.raw (shorter)" data.qcow2 qcow2 qcow2 -B base.raw -F raw
conv "chain1 -B base.raw -c" chain1.qcow2 qcow2 qcow2 -B base.raw -F raw -c

# A larger image with mixed data: raw -> qcow2 (plain, -c) -> raw, cmp.
MB=$(scaled 48)
python3 - "$MB" mixed.raw <<'PY'
import os, random, sys
mb, path = int(sys.argv[1]), sys.argv[2]
rnd = random.Random(5)
words = [b"qcow2", b"cluster", b"refcount", b"the", b"state", b"machine", b"zero", b"\n"]
with open(path, "wb") as f:
    f.truncate(mb << 20)
    for i in range(0, mb << 4):           # 64 KiB pieces
        kind = rnd.randrange(4)
        f.seek(i << 16)
        if kind == 0:
            f.write(os.urandom(65536))
        elif kind == 1:
            f.write(b" ".join(rnd.choice(words) for _ in range(12000))[:65536])
        elif kind == 2:
            f.write(b"\0" * 65536)      # written zeros
        # kind 3: a hole
PY
conv "mixed raw -> qcow2" mixed.raw raw qcow2
cp s.out mixed.qcow2
conv "mixed raw -> qcow2 -c" mixed.raw raw qcow2 -c
cp s.out mixedc.qcow2
for m in mixed mixedc; do
    CHECKS=$((CHECKS + 1))
    rm -f back.raw
    "$QSM" convert -f qcow2 -O raw $m.qcow2 back.raw && cmp -s mixed.raw back.raw ||
        fail "$m.qcow2 -> raw is not byte-identical to mixed.raw"
done
CHECKS=$((CHECKS + 1))
"$QSM" convert -m 1 -f raw -O qcow2 mixed.raw m1.qcow2 && qemu-img compare -f raw mixed.raw m1.qcow2 >/dev/null ||
    fail "convert -m 1 (one task at a time) differs"

# Progress in qemu-img's format: "    (N.NN/100%)\r" figures from 0.00,
# rising, to 100.00, then a newline (the steps themselves depend on how
# the work is cut, which differs).
CHECKS=$((CHECKS + 1))
rm -f s.out
"$QSM" convert -p -f raw -O qcow2 mixed.raw s.out >progress.txt
python3 - progress.txt <<'PY' || fail "-p: progress output is not qemu-img's: $(od -c progress.txt | head -n 3)"
import re, sys
t = open(sys.argv[1], newline="").read()
assert t.endswith("\r\n"), "no final newline"
parts = t[:-1].split("\r")[:-1]
vals = []
for p in parts:
    m = re.fullmatch(r"    \((\d+\.\d\d)/100%\)", p)
    assert m, repr(p)
    vals.append(float(m.group(1)))
assert vals[0] == 0 and vals[-1] == 100 and vals == sorted(vals) and len(vals) > 3, vals
PY

# Refusals: qemu-img's message and exit status.
refuse() {
    local tag=$1 a b ra rb
    shift
    CHECKS=$((CHECKS + 1))
    rm -f o.out
    qemu-img convert "$@" >qemu.txt 2>&1; ra=$?
    rm -f o.out
    "$QSM" convert "$@" >qsm.txt 2>&1; rb=$?
    a=$(sed 's/^qemu-img: /qsm convert: /' qemu.txt); b=$(cat qsm.txt)
    [ "$ra" = "$rb" ] && [ "$a" = "$b" ] || fail "$tag: qsm convert $* gave ($rb) '$b', qemu-img ($ra) '$a'"
}
refuse "-c to raw" -O raw -c data.qcow2 o.out
refuse "-B to raw" -O raw -B base.raw -F raw data.qcow2 o.out
refuse "-B without -F" -O qcow2 -B chain1.qcow2 data.qcow2 o.out
refuse "unknown option" -O qcow2 -o foo=1 data.qcow2 o.out
refuse "bad cluster size type" -O qcow2 -o cluster_size=abc data.qcow2 o.out
refuse "bad cluster size" -O qcow2 -o cluster_size=3k data.qcow2 o.out
refuse "lazy refcounts on v2" -O qcow2 -o compat=0.10,lazy_refcounts=on data.qcow2 o.out
refuse "zstd on v2" -O qcow2 -o compat=0.10,compression_type=zstd data.qcow2 o.out
refuse "unknown compression type" -O qcow2 -o compression_type=lz4 data.qcow2 o.out
refuse "unknown format" -O foo data.qcow2 o.out
refuse "missing source" nonexist.qcow2 o.out
refuse "one name" data.qcow2

interop_finish
