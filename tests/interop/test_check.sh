#!/usr/bin/env bash
# `qsm check` against `qemu-img check` (issue 3's acceptance):
#  - clean images of several geometries (cluster 512/64k/2M, refcount_bits
#    1/16/64, v2/v3, internal snapshots, compressed clusters): the same exit
#    code and the same JSON (statistics included);
#  - images damaged on purpose (leaked clusters, refcounts too low, L2/L1
#    entries past EOF, an L2 table overlapping a refcount block, unaligned
#    entries, reserved bits, COPIED flags, damaged refcount tables...): the
#    same exit code and the same leak/corruption/check-error counts, without
#    repair and with -r leaks;
#  - qsm check -r all, then qemu-img check finds no corruption and no leak
#    (where the damage is repairable) and the guest data equals the undamaged
#    copy (where the repair can preserve it);
#  - an image qemu-io left dirty (lazy refcounts, killed): the same report;
#    qsm check -r all clears the dirty bit, qemu-img check is clean, data intact.
. "$(dirname "$0")/lib.sh"
interop_init

DAMAGE="$WORK/damage.py"
cat >"$DAMAGE" <<'PY'
# damage.py SRC DSTDIR KIND...: copies of SRC damaged on purpose, one per kind,
# as DSTDIR/d_KIND_<basename of SRC> (16-bit refcounts only)
import struct, sys, os, shutil
def damage(kind, path):
  f = open(path, 'r+b')
  def rd(off, n): f.seek(off); return f.read(n)
  def r64(off): return struct.unpack('>Q', rd(off, 8))[0]
  def w64(off, v): f.seek(off); f.write(struct.pack('>Q', v))
  hdr = rd(0, 112)
  cb = struct.unpack('>I', hdr[20:24])[0]; cs = 1 << cb
  l1_off = struct.unpack('>Q', hdr[40:48])[0]
  rt_off = struct.unpack('>Q', hdr[48:56])[0]
  order = struct.unpack('>I', hdr[96:100])[0] if struct.unpack('>I', hdr[4:8])[0] >= 3 else 4
  assert order == 4, "16-bit refcounts only"
  rb_entries = cs * 8 // 16
  size = os.fstat(f.fileno()).st_size
  def rb_of(cl):
      return r64(rt_off + 8 * (cl // rb_entries)) & ~0x1ff
  def getrc(cl): return struct.unpack('>H', rd(rb_of(cl) + 2 * (cl % rb_entries), 2))[0]
  def setrc(cl, v): f.seek(rb_of(cl) + 2 * (cl % rb_entries)); f.write(struct.pack('>H', v))
  l2_off = r64(l1_off) & 0x00fffffffffffe00
  def l2e(i): return r64(l2_off + 8 * i)
  def first_data(n=0):
      k = 0
      for i in range(cs // 8):
          e = l2e(i)
          if e & 0x00fffffffffffe00 and not e & (1 << 62):
              if k == n: return i, e
              k += 1
      raise SystemExit("no data cluster")
  if kind == 'leak':            # an extra cluster at EOF with refcount 1, plus a raised refcount
      f.truncate((size + cs - 1) // cs * cs + cs)
      setrc((size + cs - 1) // cs, 1)
      setrc(l1_off // cs, getrc(l1_off // cs) + 1)
  elif kind == 'low':           # data cluster refcount 0 (needs rebuild)
      i, e = first_data(); setrc((e & 0x00fffffffffffe00) // cs, 0)
  elif kind == 'low2':          # data cluster and its L2 table at refcount 0
      i, e = first_data(); setrc((e & 0x00fffffffffffe00) // cs, 0)
      setrc(l2_off // cs, 0)
  elif kind == 'eof':           # two L2 entries pointing past EOF
      w64(l2_off + 8 * 60, (1 << 63) | (((size // cs) + 10) * cs))
      w64(l2_off + 8 * 61, ((size // cs) + 1000) * cs)
  elif kind == 'l1eof':         # L1 entry past EOF
      w64(l1_off + 8 * 1, (1 << 63) | (((size // cs) + 5) * cs))
  elif kind == 'overlap':       # an L2 table overlapping the refcount block
      w64(l1_off + 8 * 1, (1 << 63) | rb_of(0))
  elif kind == 'unaligned':     # data entry at an unaligned offset, zero-alloc unaligned
      i, e = first_data(); w64(l2_off + 8 * i, e + 512)
      w64(l2_off + 8 * 62, (e & 0x00fffffffffffe00) + 1024 | 1)
  elif kind == 'reserved':
      i, e = first_data(); w64(l2_off + 8 * i, e | (1 << 57))
      w64(l1_off, r64(l1_off) | (1 << 60))
  elif kind == 'copied':        # COPIED cleared on an L2 entry and the L1 entry
      i, e = first_data(); w64(l2_off + 8 * i, e & ~(1 << 63))
      w64(l1_off, r64(l1_off) & ~(1 << 63))
  elif kind == 'rtunaligned':   # refcount table entry unaligned
      w64(rt_off, r64(rt_off) + 512)
  elif kind == 'rtreserved':
      w64(rt_off, r64(rt_off) | 1)
  elif kind == 'rboutside':     # second reftable entry pointing outside the image
      w64(rt_off + 8, ((size // cs) + 3) * cs)
  elif kind == 'rbzero':        # the refcount block's own refcount 0
      setrc(rb_of(0) // cs, 0)
  elif kind == 'rtzero':        # refcount table cluster refcount 0, L1 refcount 2
      setrc(rt_off // cs, 0); setrc(l1_off // cs, 2)
  elif kind == 'l2shared':      # two L1 entries pointing to the same L2 table
      w64(l1_off + 8 * 1, r64(l1_off))
  else:
      raise SystemExit("unknown kind " + kind)
  f.close()

src, dst = sys.argv[1], sys.argv[2]
for kind in sys.argv[3:]:
    p = os.path.join(dst, "d_%s_%s" % (kind, os.path.basename(src)))
    shutil.copyfile(src, p)
    damage(kind, p)
PY

# counts FILE.json: "rc corruptions leaks check-errors" from a check's JSON
counts() {
    local k v out=""
    [ -s "$1" ] || { echo nojson; return; }
    for k in corruptions leaks check-errors; do
        v=$(sed -n "s/^ *\"$k\": \([0-9]*\),*$/\1/p" "$1")
        out="$out ${v:-0}"
    done
    echo $out
}

# same_check IMG [ARGS]: qemu-img check and qsm check on two copies agree
same_check() {
    local img=$1; shift
    local a="$WORK/cmp_q.qcow2" b="$WORK/cmp_s.qcow2" rq rs cq cs
    cp "$img" "$a"; cp "$img" "$b"
    timeout "$TIMEOUT" qemu-img check --output=json "$@" "$a" >"$WORK/q.json" 2>"$WORK/q.err"; rq=$?
    timeout "$TIMEOUT" "$QSM" check --output=json "$@" "$b" >"$WORK/s.json" 2>"$WORK/s.err"; rs=$?
    cq=$(counts "$WORK/q.json"); cs=$(counts "$WORK/s.json")
    CHECKS=$((CHECKS + 1))
    if [ "$rq" != "$rs" ] || [ "$cq" != "$cs" ]; then
        fail "$(basename "$img") check $*: qemu-img rc=$rq counts [$cq], qsm rc=$rs counts [$cs]"
        show_tail "$WORK/q.err"; show_tail "$WORK/s.err"
        return 1
    fi
    return 0
}

# same_json IMG: identical JSON (statistics) apart from the file name
same_json() {
    local img=$1
    qemu-img check --output=json "$img" 2>/dev/null | sed 's/"filename": .*/"filename": X,/' >"$WORK/qj"
    "$QSM" check --output=json "$img" 2>/dev/null | sed 's/"filename": .*/"filename": X,/' >"$WORK/sj"
    CHECKS=$((CHECKS + 1))
    if ! cmp -s "$WORK/qj" "$WORK/sj"; then
        fail "$(basename "$img"): JSON differs"; diff "$WORK/qj" "$WORK/sj" | sed 's/^/    | /'
        return 1
    fi
}

# base images
mk() { qemu-img create -q -f qcow2 -o "$2" "$WORK/$1.qcow2" "${3:-1G}" || die "create $1"; }
fill() { qemu-io -f qcow2 "$@" >/dev/null || die "qemu-io $*"; }
mk c64 cluster_size=64k
fill -c "write -P 1 0 256k" -c "write -P 2 10M 64k" -c "write -P 3 300M 128k" "$WORK/c64.qcow2"
cp "$WORK/c64.qcow2" "$WORK/snap.qcow2"
qemu-img snapshot -c s1 "$WORK/snap.qcow2"
fill -c 'write -P 9 0 64k' -c 'write -P 9 20M 64k' "$WORK/snap.qcow2"
qemu-img snapshot -c s2 "$WORK/snap.qcow2"
mk raw cluster_size=64k
fill -c 'write -P 3 0 1M' -c 'write -P 4 2M 64k' "$WORK/raw.qcow2"
qemu-img convert -c -O qcow2 "$WORK/raw.qcow2" "$WORK/comp.qcow2"
fill -c 'write -P 5 1M 64k' -c 'write -P 6 3M 64k' -c 'write -P 7 1536k 64k' "$WORK/comp.qcow2"

log "clean images of several geometries"
i=0
for o in cluster_size=512,refcount_bits=1 cluster_size=512,compat=0.10 cluster_size=64k,refcount_bits=64 \
         cluster_size=2M,refcount_bits=16 cluster_size=2M,compat=0.10 cluster_size=4k,refcount_bits=8; do
    i=$((i + 1))
    mk g$i "$o" 256M
    fill -c 'write -P 1 0 300k' -c 'write -P 2 5M 4M' -c 'write -z 100M 1M' -c 'write -P 3 255M 4k' "$WORK/g$i.qcow2"
    same_json "$WORK/g$i.qcow2"
    case $o in *refcount_bits=1*) ;; *)
        qemu-img snapshot -c s "$WORK/g$i.qcow2"
        fill -c 'write -P 4 0 64k' -c 'write -P 4 50M 64k' "$WORK/g$i.qcow2"
        same_json "$WORK/g$i.qcow2";;
    esac
    qemu-img convert -c -O qcow2 -o "$o" "$WORK/g$i.qcow2" "$WORK/gc$i.qcow2"
    same_json "$WORK/gc$i.qcow2"
done
for b in c64 snap comp; do same_json "$WORK/$b.qcow2"; done

log "damaged images: qsm check and qemu-img check agree"
# kind: repairable by qsm -r all (1) / guest data preserved by the repair (1)
KINDS="leak:1:1 low:1:1 low2:1:1 eof:1:1 l1eof:1:1 overlap:0:0 unaligned:1:0 reserved:0:0
copied:1:1 rtunaligned:1:1 rtreserved:1:1 rboutside:1:1 rbzero:1:1 rtzero:1:1 l2shared:1:0"
ALLKINDS=""
for kr in $KINDS; do ALLKINDS="$ALLKINDS ${kr%%:*}"; done
for b in c64 snap comp; do
    python3 "$DAMAGE" "$WORK/$b.qcow2" "$WORK" $ALLKINDS || die "damage.py $b"
done
for kr in $KINDS; do
    k=${kr%%:*}; rep=${kr#*:}; rep=${rep%%:*}; keep=${kr##*:}
    for b in c64 snap comp; do
        d="$WORK/d_${k}_$b.qcow2"
        same_check "$d"
        same_check "$d" -r leaks
        # -r all by qsm, then qemu-img check
        r="$WORK/r.qcow2"; cp "$d" "$r"
        "$QSM" check -r all "$r" >"$WORK/rall.out" 2>&1
        qemu-img check --output=json "$r" >"$WORK/after.json" 2>/dev/null; ra=$?
        if [ "$rep" = 1 ]; then
            CHECKS=$((CHECKS + 1))
            [ "$ra" = 0 ] || { fail "$k/$b: qemu-img check after qsm check -r all: rc=$ra [$(counts "$WORK/after.json")]"; show_tail "$WORK/rall.out"; }
        else
            # not repairable: qsm must never leave more than qemu's own repair does
            q2="$WORK/q2.qcow2"; cp "$d" "$q2"
            qemu-img check -r all "$q2" >/dev/null 2>&1
            qemu-img check --output=json "$q2" >"$WORK/qafter.json" 2>/dev/null; qa=$?
            CHECKS=$((CHECKS + 1))
            [ "$ra" -le "$qa" ] || fail "$k/$b: after -r all qsm leaves rc=$ra, qemu-img rc=$qa"
        fi
        if [ "$keep" = 1 ]; then
            CHECKS=$((CHECKS + 1))
            qemu-img compare -q -f qcow2 -F qcow2 "$WORK/$b.qcow2" "$r" || fail "$k/$b: guest data changed by qsm check -r all"
        fi
    done
done

log "an image qemu-io left dirty (lazy refcounts, killed)"
mk dirty lazy_refcounts=on 128M
( timeout "$TIMEOUT" qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' -c 'write -P 0x6b 1M 64k' -c 'sigraise 9' "$WORK/dirty.qcow2" >/dev/null 2>&1 ) 2>/dev/null
same_check "$WORK/dirty.qcow2"
same_check "$WORK/dirty.qcow2" -r leaks
cp "$WORK/dirty.qcow2" "$WORK/dq.qcow2"
"$QSM" check "$WORK/dq.qcow2" >"$WORK/dq.out" 2>&1
qemu-img check "$WORK/dirty.qcow2" >"$WORK/dqq.out" 2>&1
CHECKS=$((CHECKS + 1))
diff <(sed 's/dq.qcow2/X/' "$WORK/dq.out") <(sed 's/dirty.qcow2/X/' "$WORK/dqq.out") >/dev/null || fail "dirty: human output differs"
CHECKS=$((CHECKS + 1))
cmp -s "$WORK/dirty.qcow2" "$WORK/dq.qcow2" || fail "dirty: qsm check without -r wrote to the image"
"$QSM" check -r all "$WORK/dq.qcow2" >"$WORK/dq.out" 2>&1; rc=$?
CHECKS=$((CHECKS + 1))
[ "$rc" = 0 ] || { fail "dirty: qsm check -r all rc=$rc"; show_tail "$WORK/dq.out"; }
CHECKS=$((CHECKS + 1))
qemu-img info --output=json "$WORK/dq.qcow2" | grep -q '"dirty-flag": false' || fail "dirty: the dirty bit is still set after qsm check -r all"
check_out=$(qemu-img check "$WORK/dq.qcow2" 2>&1); rc=$?
CHECKS=$((CHECKS + 1))
[ "$rc" = 0 ] || fail "dirty: qemu-img check after qsm check -r all: rc=$rc: $check_out"
CHECKS=$((CHECKS + 1))
qemu-io -f qcow2 -c 'read -P 0x5a 0 64k' -c 'read -P 0x6b 1M 64k' "$WORK/dq.qcow2" | grep -q 'Pattern verification failed' && fail "dirty: data lost by the repair"

interop_finish
