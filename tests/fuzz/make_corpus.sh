#!/usr/bin/env bash
# tests/fuzz/make_corpus.sh: regenerate the seed corpora of the libFuzzer
# targets under tests/fuzz/corpus/<target>/ (committed; run this only to
# change them).  Needs qemu-img and qemu-io (qemu-utils) and python3.
#
# fuzz_open: small images written by qemu-img/qemu-io 7.2, 512-byte clusters
# so each is a few KiB: plain v3 with data, zero and discarded clusters; v2;
# an internal snapshot; a backing file name (with and without a recorded
# format); compressed clusters (qemu-img convert -c); lazy refcounts left
# dirty by qemu-io abort; 1-bit and 64-bit refcounts; 8 KiB clusters (the
# header cluster then holds a feature name table); images QEMU opens and
# finds bad only at use (accept-*: a duplicate extension, an unaligned
# refcount block offset, a snapshot table past the end of the file).
# fuzz_sched: inputs in fuzz_sched.c's layout (see the comment there): every
# cluster size and cache mode, v2 and lazy refcounts, with and without a
# crash, one or two sessions, overlapping writes, compressed writes, zero
# writes, discards and flushes.
set -eu

SRC=$(cd "$(dirname "$0")" && pwd)
OUT=$SRC/corpus
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"

# Inputs that once found a bug (regress-*) are kept: every build replays them.
mkdir -p "$OUT/fuzz_open" "$OUT/fuzz_sched"
find "$OUT/fuzz_open" "$OUT/fuzz_sched" -type f ! -name 'regress-*' -delete

mk() { qemu-img create -q -f qcow2 "$@"; }
qio() { local f=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f qcow2 "${a[@]}" "$f" >/dev/null; }
keep() { cp "$1" "$OUT/fuzz_open/$2"; }

# Plain v3, data across two L2 tables, a zero write and a discard.
mk -o cluster_size=512 plain.qcow2 128K
qio plain.qcow2 'write -P 0x11 0 3k' 'write -P 0x22 40k 1k' 'write -z 1k 1k' 'discard 2k 512'
keep plain.qcow2 v3-data.qcow2

# Version 2 (compat=0.10).
mk -o cluster_size=512,compat=0.10 v2.qcow2 64K
qio v2.qcow2 'write -P 0x33 512 2k' 'write -z 0 512'
keep v2.qcow2 v2-data.qcow2

# An internal snapshot, then writes that COW away from it.
mk -o cluster_size=512 snap.qcow2 64K
qio snap.qcow2 'write -P 0x44 0 2k'
qemu-img snapshot -c snap1 snap.qcow2
qio snap.qcow2 'write -P 0x55 512 512'
keep snap.qcow2 snapshot.qcow2

# A backing file name: with a recorded format, and without one.
qemu-img create -q -f raw base.raw 64K
mk -o cluster_size=512 -b base.raw -F raw back.qcow2 64K
qio back.qcow2 'write -P 0x66 1k 1k'
keep back.qcow2 backing-raw.qcow2
# No recorded format: the backing-format extension's type turned into an
# unknown extension's (which qsm preserves).
python3 -c "
import sys; b = bytearray(open('back.qcow2', 'rb').read())
i = b.index(bytes.fromhex('e2792aca')); b[i:i + 4] = bytes.fromhex('12345678')
open('back.qcow2', 'wb').write(b)"
keep back.qcow2 backing-noformat-unknown-ext.qcow2

# Compressed clusters.
python3 -c "import sys; sys.stdout.buffer.write(bytes((i*7)%13 for i in range(8192)) + bytes(8192) + b'qsm'*2000)" >data.raw
truncate -s 64K data.raw
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 data.raw comp.qcow2
keep comp.qcow2 compressed.qcow2

# Lazy refcounts, dirty: qemu-io aborts before the refcounts are written.
mk -o cluster_size=512,lazy_refcounts=on lazy.qcow2 128K
bash -c "qemu-io -f qcow2 -c 'write -P 0x77 0 3k' -c abort lazy.qcow2" >/dev/null 2>&1 || true
keep lazy.qcow2 lazy-dirty.qcow2

# Other refcount widths.
mk -o cluster_size=512,refcount_bits=1 rc1.qcow2 64K
qio rc1.qcow2 'write -P 0x88 0 1k'
keep rc1.qcow2 refcount1.qcow2
mk -o cluster_size=512,refcount_bits=64 rc64.qcow2 64K
qio rc64.qcow2 'write -P 0x99 3k 1k'
keep rc64.qcow2 refcount64.qcow2

# 8 KiB clusters: qemu writes a feature name table into the header cluster.
mk -o cluster_size=8192 big.qcow2 1M
qio big.qcow2 'write -P 0xaa 0 512'
keep big.qcow2 cluster8k.qcow2

# Images QEMU opens and finds bad only at use (qsm accepts them the same
# way): a backing format extension given twice, a refcount table entry
# that is not cluster aligned, a snapshot table just past the end of the
# file (where the next allocated cluster lands).
# (4 KiB clusters for the refcount entry: QEMU ignores bits 0-8 of one)
mk -o cluster_size=512 acc.qcow2 64K
qio acc.qcow2 'write -P 0x44 0 1k'
cp acc.qcow2 dup.qcow2
cp acc.qcow2 snap.qcow2
mk -o cluster_size=4096 rtun.qcow2 1M
qio rtun.qcow2 'write -P 0x44 0 1k'

python3 - dup.qcow2 rtun.qcow2 snap.qcow2 <<'PY'
import os, struct, sys
dup, rtun, snap = sys.argv[1:]
def patch(path, fn):
    with open(path, 'r+b') as f:
        img = bytearray(f.read())
        fn(img)
        f.seek(0)
        f.write(img)
def two_formats(img):
    # 512-byte clusters: no feature table, the area after the header is free
    hl = struct.unpack_from('>I', img, 100)[0]
    area = b''
    for name in (b'raw', b'qcow2'):
        area += struct.pack('>II', 0xE2792ACA, len(name)) + name + b'\0' * (-len(name) % 8)
    img[hl:hl + len(area) + 8] = area + b'\0' * 8
def unaligned_refblock(img):
    rt = struct.unpack_from('>Q', img, 48)[0]
    struct.pack_into('>Q', img, rt, struct.unpack_from('>Q', img, rt)[0] + 512)
def snapshot_past_eof(img):
    eof = (len(img) + 511) // 512 * 512
    struct.pack_into('>IQ', img, 60, 1, eof)
patch(dup, two_formats)
patch(rtun, unaligned_refblock)
patch(snap, snapshot_past_eof)
PY
keep dup.qcow2 accept-duplicate-extension.qcow2
keep rtun.qcow2 accept-refblock-unaligned.qcow2
keep snap.qcow2 accept-snapshot-table-past-eof.qcow2

python3 - "$OUT/fuzz_sched" <<'PY'
import struct, sys
out = sys.argv[1]
WRITE, READ, ZERO, ZERO_UNMAP, DISCARD, FLUSH, COMPRESSED = range(7)
NOALIGN, SECTOR, CLUSTER = 0, 1 << 3, 2 << 3

def op(kind, frac, length, align=NOALIGN, sectors=0, split=128):
    # offset = frac/65536 of the disk + sectors*512; length byte: 1 + l*3*cluster/256
    return bytes([kind | align, frac >> 8, frac & 255, sectors, length, split])

def inp(name, cbits_idx, units, v2=False, lazy=False, cache=0, rorder_idx=0,
        l2=0, batch=3, depth=15, crash=0, keep=0, ops=(), sched=b'', split=0):
    b0 = cbits_idx | (units - 1) << 2
    b1 = (1 if v2 else 0) | (2 if lazy else 0) | cache << 2 | rorder_idx << 5
    b2 = l2 | batch << 2 | (depth - 1) << 4
    data = bytes([b0, b1, b2]) + struct.pack('>HQ', crash, keep)
    data += bytes([(len(ops) - 1) | split << 5])  # split: first split/8 in a first session
    data += b''.join(ops) + sched
    open(f'{out}/{name}', 'wb').write(data)

mixed = (op(WRITE, 0, 40), op(WRITE, 0x0100, 90, SECTOR), op(READ, 0, 60),
         op(ZERO, 0x4000, 85, CLUSTER), op(FLUSH, 0, 0), op(WRITE, 0x4000, 200),
         op(DISCARD, 0x8000, 255, CLUSTER), op(ZERO_UNMAP, 0x0080, 120),
         op(WRITE, 0xc000, 30, NOALIGN, 3), op(READ, 0x4000, 255), op(FLUSH, 0, 0))
inp('c512-writeback', 0, 4, ops=mixed, sched=bytes(range(7, 250, 13)))
inp('c512-writeback-crash', 0, 4, crash=9, keep=0x5555, ops=mixed, sched=bytes(range(3, 250, 7)))
inp('c1k-writethrough-crash', 1, 8, cache=2, crash=14, keep=0xff00ff, ops=mixed)
inp('c4k-none-lazy-crash', 2, 16, lazy=True, cache=1, crash=6, keep=0x3, ops=mixed,
    sched=bytes([1, 2, 0, 3] * 10))
inp('c64k-directsync', 3, 2, cache=3, ops=mixed)
inp('c512-unsafe-crash', 0, 2, cache=4, crash=5, ops=mixed)
inp('c512-v2-crash', 0, 3, v2=True, crash=7, keep=0xfff0, ops=mixed)
inp('c512-refcount1-l2x1', 0, 16, rorder_idx=4, l2=0, depth=4,
    ops=tuple(op(WRITE, f * 4096, 20) for f in range(16)) + (op(FLUSH, 0, 0),))
inp('c512-refcount64-lazy', 0, 8, lazy=True, rorder_idx=7, crash=20, keep=~0 & (2**64 - 1),
    ops=tuple(op(WRITE, f * 8192, 255, CLUSTER) for f in range(8)))
inp('c512-compressed-crash', 0, 4, crash=12, keep=0x0f0f,
    ops=(op(COMPRESSED, 0, 255), op(WRITE, 0x0010, 60), op(COMPRESSED, 0x2000, 90),
         op(FLUSH, 0, 0), op(DISCARD, 0x2000, 255, CLUSTER), op(COMPRESSED, 0x8000, 170),
         op(ZERO, 0x0000, 30), op(READ, 0, 255), op(FLUSH, 0, 0)))
inp('c64k-v2-compressed', 3, 2, v2=True,
    ops=(op(COMPRESSED, 0, 100), op(WRITE, 0x1000, 20), op(READ, 0, 255), op(FLUSH, 0, 0)))
# Two sessions (the L2 table exists on disk when the second one starts),
# lazy refcounts, a power loss keeping only the first unflushed write of
# the second session's batch: catches the dirty-not-durable mutant.
inp('c512-lazy-two-sessions-crash', 0, 2, lazy=True, crash=12, keep=0x1, split=4, depth=1,
    ops=(op(WRITE, 0, 10), op(FLUSH, 0, 0), op(WRITE, 0x0400, 10), op(FLUSH, 0, 0)))
inp('c4k-two-sessions', 2, 8, split=3,
    ops=(op(WRITE, 0, 200), op(DISCARD, 0x1000, 255, CLUSTER), op(FLUSH, 0, 0),
         op(WRITE, 0x0100, 100), op(ZERO, 0, 30), op(READ, 0, 255), op(FLUSH, 0, 0)))
inp('c1k-depth1-overlap', 1, 1, depth=1, batch=0,
    ops=(op(WRITE, 0, 100), op(WRITE, 0x100, 100), op(ZERO, 0x80, 50), op(READ, 0, 255)))
PY

du -sh "$OUT"
