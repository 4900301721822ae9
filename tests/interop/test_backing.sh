#!/usr/bin/env bash
# Backing chains (#5) against qemu-img/qemu-io 7.2.
#
# For chains of depth 1, 2 and 3 over qcow2 and raw bases (mixed cluster
# sizes and compat levels, a base shorter than the images above it):
#  - the same chain built twice, by qemu-img/qemu-io and by qsm create/qsm io
#    (layers.py gives each layer's writes and a `read -P` script for the
#    top): qemu-io reads the qsm chain correctly, qsm io reads the qemu chain
#    correctly, qemu-img compare calls the tops identical and qemu-img check
#    finds every qsm layer clean;
#  - the random workload (gen_workload.py, sequential or concurrent aio
#    batches, its `read -P` turned into plain reads: its model knows nothing
#    of backing data) run by `qsm io` (once with -t none) on the
#    top of one copy of the qemu chain and by `qemu-io` on another: compare
#    identical, check clean, qemu-img map agrees on which ranges the top
#    decides and which of those are zero clusters (see map_of), lower
#    layers untouched;
#  - qsm info --backing-chain (human, json) prints what qemu-img prints.
# Then refusals, each with a clear message and the images untouched: a loop
# (two images, and one naming itself), a backing file whose format is not
# recorded (accepted with --backing-format), a missing backing file, a chain
# deeper than 64; and --no-backing (read-only only; unallocated reads zeros).
#
# Env: QSM_TEST_SCALE (workload ops = 1500 * scale), QSM_TEST_SEED.
. "$(dirname "$0")/lib.sh"
interop_init

N=$(scaled 1500)
SIZE=$((32 << 20))
LAYERS_PY="$INTEROP_DIR/layers.py"

# A chain: layers from the base up, each FMT or FMT:qcow2-options.
CHAINS=${QSM_BACKING_CHAINS:-"
raw qcow2:cluster_size=64k
qcow2:cluster_size=64k qcow2:cluster_size=64k,compat=0.10
qcow2:cluster_size=4k,compat=0.10 qcow2:cluster_size=64k
raw qcow2:cluster_size=512,compat=0.10 qcow2:cluster_size=64k
qcow2:cluster_size=64k,refcount_bits=1 qcow2:cluster_size=2M qcow2:cluster_size=4k,compat=0.10 qcow2:cluster_size=64k
raw qcow2:cluster_size=64k qcow2:cluster_size=4k qcow2:cluster_size=64k,compat=0.10
"}

md5() { md5sum "$@" | cut -d' ' -f1 | tr '\n' ' '; }

# build DIR TOOL LAYER-SPECS...: create the chain in DIR (relative backing
# names) with TOOL (qemu or qsm), filling layer K with DIR/../layerK.cmds
build() {
    local dir=$1 tool=$2 k=0 prev="" prevfmt="" spec fmt opts name sizes size
    shift 2
    read -r -a sizes <"$dir/../sizes"
    for spec in "$@"; do
        fmt=${spec%%:*}
        opts=${spec#*:}
        [ "$opts" = "$spec" ] && opts=""
        name=l$k.$fmt
        size=${sizes[$k]:-$SIZE}
        if [ "$fmt" = raw ]; then
            truncate -s "$size" "$dir/$name"
        elif [ "$tool" = qemu ]; then
            qemu-img create -q -f qcow2 ${opts:+-o "$opts"} ${prev:+-b "$prev" -F "$prevfmt"} \
                "$dir/$name" "$size" || return 1
        else
            "$QSM" create -q -f qcow2 ${opts:+-o "$opts"} ${prev:+-b "$prev" -F "$prevfmt"} \
                "$dir/$name" "$size" || return 1
        fi
        if [ "$tool" = qemu ]; then
            qemu-io -f "$fmt" "$dir/$name" <"$dir/../layer$k.cmds" >"$dir/$name.out" 2>&1 || return 1
        else
            "$QSM" io -f "$fmt" "$dir/$name" <"$dir/../layer$k.cmds" >"$dir/$name.out" 2>&1 || return 1
        fi
        grep -q -i 'error\|fail' "$dir/$name.out" && return 1
        prev=$name
        prevfmt=$fmt
        k=$((k + 1))
    done
    echo "$prev" >"$dir/top"
}

# map_of IMG: qemu-img map --output=json reduced to what must agree: which
# ranges the top image decides (depth 0) and there, data clusters apart from
# zero clusters; merged.  Host offsets and the zero flag of data ranges are
# left out: where the backing data of a COW region is zero, QEMU fallocates
# (a hole in the file: "zero": true) where qsm writes the zeros.
map_of() {
    qemu-img map --output=json "$1" | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    e = {"start": e["start"], "length": e["length"], "depth": e["depth"], "present": e["present"],
         "data": e["data"] and e["depth"] == 0}
    if out and all(out[-1][k] == e[k] for k in ("depth", "present", "data")):
        out[-1]["length"] += e["length"]
    else:
        out.append(e)
for e in out:
    print(e)'
}

c=0
while read -r -a chain; do
    [ ${#chain[@]} -gt 0 ] || continue
    c=$((c + 1))
    tag="chain $c (${chain[*]})"
    d="$WORK/c$c"
    mkdir -p "$d/q" "$d/s" "$d/w1" "$d/w2"
    python3 "$LAYERS_PY" $((BASE_SEED + c)) $SIZE ${#chain[@]} "$d" || die "layers.py failed"
    t0=$SECONDS
    CHECKS=$((CHECKS + 2))
    build "$d/q" qemu "${chain[@]}" || { fail "$tag: qemu-img/qemu-io could not build it"; continue; }
    if ! build "$d/s" qsm "${chain[@]}"; then
        fail "$tag: qsm create/qsm io could not build it"
        cat "$d"/s/*.out 2>/dev/null | grep -i -m5 'error\|fail' | sed 's/^/    | /'
        continue
    fi
    top=$(cat "$d/q/top")
    tfmt=${top##*.}
    for f in "$d"/s/l*.qcow2; do check_clean "$tag: qsm layer $(basename "$f")" "$f"; done
    run_io "$tag: qemu-io reads the qsm chain" "$d/s/v" "$d/s/$top" "$d/verify.cmds" qemu-io -r -f "$tfmt"
    run_io "$tag: qsm io reads the qemu chain" "$d/q/v" "$d/q/$top" "$d/verify.cmds" "$QSM" io -r -f "$tfmt"
    if [ "$tfmt" = qcow2 ]; then
        compare_images "$tag: qsm-built vs qemu-built" "$d/q/$top" "$d/s/$top"
        for o in human json; do
            CHECKS=$((CHECKS + 1))
            a=$(cd "$d/q" && qemu-img info --backing-chain --output=$o "$top" 2>&1)
            b=$(cd "$d/q" && "$QSM" info --backing-chain --output=$o "$top" 2>&1)
            [ "$a" = "$b" ] || fail "$tag: qsm info --backing-chain --output=$o differs:"$'\n'"$(diff <(echo "$a") <(echo "$b") | head -20)"
        done
    fi

    # the random workload on the top of two copies of the qemu chain
    cp "$d"/q/l* "$d/w1/"
    cp "$d"/q/l* "$d/w2/"
    # sequential, or (even chains) concurrent aio batches; O_DIRECT for chain 3
    aio=""
    [ $((c % 2)) = 0 ] && aio=--aio
    python3 "$GEN" $((BASE_SEED + 100 + c)) "$N" $SIZE 64k $aio |
        sed -E 's/^(aio_)?read -P [0-9]+ /\1read /' >"$d/work.cmds" || die "gen_workload failed"
    qsmopt=""
    [ $c = 3 ] && odirect_ok "$WORK" && qsmopt="-t none"
    if run_io "$tag: qemu-io workload" "$d/w1/o" "$d/w1/$top" "$d/work.cmds" qemu-io -f "$tfmt" &&
       run_io "$tag: qsm io workload${aio:+ (aio)} $qsmopt" "$d/w2/o" "$d/w2/$top" "$d/work.cmds" \
           "$QSM" io -f "$tfmt" $qsmopt; then
        if [ "$tfmt" = qcow2 ]; then
            compare_images "$tag: workload, qsm vs qemu" "$d/w1/$top" "$d/w2/$top"
            check_clean "$tag: workload, qsm top" "$d/w2/$top"
            CHECKS=$((CHECKS + 1))
            [ "$(map_of "$d/w1/$top")" = "$(map_of "$d/w2/$top")" ] ||
                fail "$tag: workload, qemu-img map differs:"$'\n'"$(diff <(map_of "$d/w1/$top") <(map_of "$d/w2/$top") | head -10)"
        fi
        for f in "$d"/q/l*; do
            [ "$(basename "$f")" = "$top" ] && continue
            case $f in *.out) continue;; esac
            CHECKS=$((CHECKS + 1))
            cmp -s "$f" "$d/w2/$(basename "$f")" || fail "$tag: qsm io changed the backing layer $(basename "$f")"
        done
    fi
    log "$tag: done in $((SECONDS - t0))s"
    [ "${QSM_KEEP:-0}" = 1 ] || rm -rf "$d"
done <<<"$CHAINS"

# --- refusals ---------------------------------------------------------------
r="$WORK/refuse"
mkdir -p "$r"
# expect_refused TAG PATTERN FILES... -- CMD...: CMD fails, says PATTERN, files unchanged
expect_refused() {
    local tag=$1 pat=$2 files=() out before
    shift 2
    while [ "$1" != -- ]; do files+=("$1"); shift; done
    shift
    before=$(md5 "${files[@]}")
    CHECKS=$((CHECKS + 1))
    if out=$("$@" 2>&1); then
        fail "$tag: '$*' succeeded: $out"
    elif ! printf '%s\n' "$out" | grep -q -- "$pat"; then
        fail "$tag: message does not say '$pat': $out"
    fi
    [ "$(md5 "${files[@]}")" = "$before" ] || fail "$tag: a refused image was written"
}

qemu-img create -q -f qcow2 "$r/base.qcow2" 4M
qemu-io -c 'write -P 5 0 4M' "$r/base.qcow2" >/dev/null

# loops
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$r/a.qcow2"
qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 "$r/b.qcow2"
qemu-img rebase -u -b b.qcow2 -F qcow2 "$r/a.qcow2"
expect_refused "loop a->b->a" "backing chain loop: '.*b.qcow2', the backing file of '.*a.qcow2'" "$r/a.qcow2" "$r/b.qcow2" -- \
    "$QSM" io -c 'write 0 4k' "$r/b.qcow2"
qemu-img create -q -f qcow2 "$r/self.qcow2" 4M
qemu-img rebase -u -b self.qcow2 -F qcow2 "$r/self.qcow2"
expect_refused "self loop" "loop" "$r/self.qcow2" -- "$QSM" io -c 'write 0 4k' "$r/self.qcow2"
# the same file under another name is still a loop
ln -s self.qcow2 "$r/alias.qcow2"
qemu-img rebase -u -b alias.qcow2 -F qcow2 "$r/self.qcow2"
expect_refused "loop through a symlink" "loop" "$r/self.qcow2" -- "$QSM" info --backing-chain "$r/self.qcow2"

# backing format not recorded: drop the extension by renaming its type
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$r/nofmt.qcow2"
python3 - "$r/nofmt.qcow2" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
i = b.find(bytes.fromhex("e2792aca"), 72, 65536)
assert i > 0
b[i:i + 4] = bytes.fromhex("7ffe0001")  # an unknown, ignorable extension
open(p, "wb").write(b)
PY
CHECKS=$((CHECKS + 1))
qemu-img info "$r/nofmt.qcow2" | grep -q '^backing file format' && fail "nofmt.qcow2 still records its backing format"
expect_refused "no backing format" "format is not recorded" "$r/nofmt.qcow2" -- \
    "$QSM" io -c 'write 0 4k' "$r/nofmt.qcow2"
CHECKS=$((CHECKS + 1))
"$QSM" io --backing-format qcow2 -c 'read -P 5 0 64k' -c 'write -P 6 4k 4k' -c 'read -P 5 0 4k' \
    -c 'read -P 6 4k 4k' -c 'read -P 5 8k 56k' "$r/nofmt.qcow2" >"$r/nofmt.out" 2>&1 &&
    ! grep -q -i 'fail\|error' "$r/nofmt.out" || fail "--backing-format qcow2: $(cat "$r/nofmt.out")"
expect_refused "backing format raw is not probed" "" "$r/nofmt.qcow2" -- \
    "$QSM" io --backing-format vmdk -c 'read 0 4k' "$r/nofmt.qcow2"

# missing backing file: the message names it
qemu-img create -q -f qcow2 -b gone.qcow2 -F qcow2 -u "$r/orphan.qcow2" 4M
expect_refused "missing backing file" "gone.qcow2" "$r/orphan.qcow2" -- \
    "$QSM" io -c 'write 0 4k' "$r/orphan.qcow2"

# too deep: 66 images
prev=base.qcow2
for i in $(seq 1 66); do
    qemu-img create -q -f qcow2 -u -b "$prev" -F qcow2 "$r/deep$i.qcow2" 4M
    prev=deep$i.qcow2
done
expect_refused "chain of 67 images" "longer than 64" "$r/deep66.qcow2" -- \
    "$QSM" io -c 'read 0 4k' "$r/deep66.qcow2"
CHECKS=$((CHECKS + 1))
"$QSM" io -r -c 'read -P 5 0 4k' "$r/deep60.qcow2" >"$r/deep.out" 2>&1 &&
    ! grep -q -i 'fail' "$r/deep.out" || fail "a chain of 61 images: $(cat "$r/deep.out")"

# --no-backing: read-only only; unallocated clusters read as zeros
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$r/nb.qcow2"
qemu-io -c 'write -P 7 64k 64k' "$r/nb.qcow2" >/dev/null
expect_refused "--no-backing read-write" "read-only" "$r/nb.qcow2" -- \
    "$QSM" io --no-backing -c 'read 0 4k' "$r/nb.qcow2"
CHECKS=$((CHECKS + 1))
"$QSM" io -r --no-backing -c 'read -P 0 0 64k' -c 'read -P 7 64k 64k' -c 'read -P 0 128k 1M' \
    "$r/nb.qcow2" >"$r/nb.out" 2>&1 && ! grep -q -i 'fail' "$r/nb.out" ||
    fail "--no-backing reads: $(cat "$r/nb.out")"
CHECKS=$((CHECKS + 1))
"$QSM" io -r -c 'read -P 5 0 64k' -c 'read -P 7 64k 64k' -c 'read -P 5 128k 1M' \
    "$r/nb.qcow2" >"$r/nb2.out" 2>&1 && ! grep -q -i 'fail' "$r/nb2.out" ||
    fail "reads through the backing file: $(cat "$r/nb2.out")"

interop_finish
