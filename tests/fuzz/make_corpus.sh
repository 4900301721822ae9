#!/usr/bin/env bash
# tests/fuzz/make_corpus.sh: regenerate the seed corpora of the libFuzzer
# targets under tests/fuzz/corpus/<target>/ (committed; run this only to
# change them).  Needs qemu-img and qemu-io (qemu-utils) and python3.
#
# fuzz_open: small images written by qemu-img/qemu-io 7.2, 512-byte clusters
# so each is a few KiB: plain v3 with data, zero and discarded clusters; v2;
# an internal snapshot; a backing file name (with and without a recorded
# format); compressed clusters (qemu-img convert -c, zlib and zstd);
# persistent bitmaps (one with a data cluster); lazy refcounts left dirty by
# qemu-io abort; 1-bit and 64-bit refcounts; 8 KiB clusters (the
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
mkdir -p "$OUT/fuzz_open" "$OUT/fuzz_sched" "$OUT/fuzz_nbd"
find "$OUT/fuzz_open" "$OUT/fuzz_sched" "$OUT/fuzz_nbd" -type f ! -name 'regress-*' -delete

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
# ... as zstd frames (compression_type=zstd, incompatible bit 3).
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512,compression_type=zstd data.raw zstd.qcow2
keep zstd.qcow2 compressed-zstd.qcow2

# Persistent bitmaps: an enabled one QEMU stored with dirty bits (a data
# cluster), a disabled one without.
mk -o cluster_size=512 bm.qcow2 64K
qio bm.qcow2 'write -P 0x12 0 1k'
qemu-img bitmap --add bm.qcow2 b0
qemu-img bitmap --add --disable bm.qcow2 off
qio bm.qcow2 'write -P 0x13 8k 2k'
keep bm.qcow2 bitmaps.qcow2

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

python3 - "$OUT/fuzz_nbd" <<'PY'
import random, struct, sys
out = sys.argv[1]
IHAVEOPT, REQ = 0x49484156454F5054, 0x25609513
(EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED, LIST_META, SET_META) = (1, 2, 3, 5, 6, 7, 8, 9, 10)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
CANNED, NOREAD, HALFREAD, SMALLBUF, SHUTDOWN, RO, UNMAP, DEPTH = 1, 2, 4, 8, 16, 32, 64, 128

def opt(o, data=b''):
    return struct.pack('>QII', IHAVEOPT, o, len(data)) + data
def name(s):
    return struct.pack('>I', len(s)) + s
def meta(o, ctxs, export=b''):
    return opt(o, name(export) + struct.pack('>I', len(ctxs)) + b''.join(name(c) for c in ctxs))
def go(o=GO, export=b'', infos=()):
    return opt(o, name(export) + struct.pack('>H', len(infos)) + b''.join(struct.pack('>H', i) for i in infos))
def req(t, off=0, ln=0, flags=0, handle=None, payload=None):
    h = struct.pack('>IHHQQI', REQ, flags, t, handle if handle is not None else 0x1000 + t, off, ln)
    if t == WRITE and payload is None:
        payload = bytes((off + i) * 7 & 255 for i in range(ln))
    return h + (payload or b'')
FLAGS = struct.pack('>I', 3)

def chunked(stream, seed, sizes=(1, 3, 7, 16, 28, 100, 240, 4096, 8192)):
    rnd = random.Random(seed)
    b, i = b'', 0
    while i < len(stream):
        n = rnd.choice(sizes)
        if n <= 240:
            b += bytes([n - 1]) + stream[i:i + n]
        else:
            b += bytes([0xef + n // 4096]) + stream[i:i + n]
        i += n
    return b
PLAIN, BACKING, RAW, DESC = 0, 1, 2, 4
def inp(fname, mode, stream, seed=1, sizes=None, shape=PLAIN):
    data = bytes([mode, shape]) + (chunked(stream, seed, sizes) if sizes else chunked(stream, seed))
    open(f'{out}/{fname}', 'wb').write(data)

MiB = 1 << 20
xmit = (req(WRITE, 0, 4096) + req(READ, 0, 4096) + req(WRITE, 70000, 5000, FUA) +
        req(READ, 65536, 65536) + req(READ, 65536, 65536, DF) + req(STATUS, 0, 2 * MiB) +
        req(STATUS, 0, 2 * MiB, REQ_ONE) + req(TRIM, 0, 65536) + req(TRIM, 131072, 4096, FUA) +
        req(ZEROES, 65536, 65536, FAST_ZERO) + req(ZEROES, 1000, 3000, NO_HOLE) +
        req(ZEROES, 3000, 100, FAST_ZERO) + req(CACHE, 0, MiB) + req(FLUSH) +
        req(READ, 0, 200000) + req(STATUS, 60000, 10000) + req(DISC))
inp('canned-session', CANNED, xmit)
inp('canned-session-bytewise', CANNED, xmit[:400], sizes=(1, 2, 3))
inp('canned-session-unmap-depth', CANNED | UNMAP | DEPTH, xmit, seed=2)
inp('canned-session-readonly', CANNED | RO, xmit, seed=3)
inp('canned-session-backing-depth', CANNED | DEPTH, xmit, seed=30, shape=BACKING)
inp('canned-session-backing-unmap', CANNED | UNMAP, xmit, seed=31, shape=BACKING)
inp('canned-session-raw', CANNED | UNMAP | DEPTH, xmit, seed=32, shape=RAW)
status = b''.join(req(STATUS, o, ln, f) for o, ln, f in
                  ((0, 2 * MiB, 0), (60000, 600000, 0), (900000, 300000, 0), (1 << 20, 4096, REQ_ONE),
                   (65536, 65536, REQ_ONE), (500000, 100000, 0)))
inp('backing-status-reads', CANNED | DEPTH, req(WRITE, 520000, 3000) + status +
    req(READ, 500000, 100000) + req(READ, 1000000, 100000) + req(CACHE, 0, 2 * MiB), seed=33, shape=BACKING)
inp('canned-session-halfread-smallbuf', CANNED | HALFREAD | SMALLBUF, xmit, seed=4)
reads = b''.join(req(READ, (i * 65536) % (2 * MiB - MiB), MiB, handle=i) for i in range(40))
inp('canned-noread-flood', CANNED | NOREAD, reads, seed=5)
inp('canned-noread-shutdown', CANNED | NOREAD | SHUTDOWN | SMALLBUF, reads[:28 * 8] + xmit, seed=6)
inp('canned-shutdown-midpayload', CANNED | SHUTDOWN, req(WRITE, 0, 4096) + req(WRITE, 8192, 65536)[:3000], seed=7)
inp('canned-eof-midpayload', CANNED, req(WRITE, 0, 65536)[:20000], seed=8)
inp('canned-eof-midheader', CANNED, req(READ, 0, 512)[:13], seed=9)

# A handshake of its own: simple replies (no STRUCTURED_REPLY), INFO, LIST.
own = (FLAGS + opt(LIST) + go(INFO, infos=(1, 2, 3)) + meta(LIST_META, []) +
       meta(LIST_META, [b'base:', b'qemu:']) + meta(SET_META, [b'base:allocation']) +
       opt(STRUCTURED) + opt(STRUCTURED) + meta(SET_META, [b'base:allocation', b'nope:x']) +
       opt(12345, b'junk') + go(infos=(1,)))
inp('own-handshake-go', 0, own + xmit, seed=10)
inp('own-handshake-desc', DEPTH, own + xmit, seed=34, shape=DESC | BACKING)
inp('own-handshake-simple-replies', DEPTH, FLAGS + opt(LIST) + go() + xmit, seed=11)
inp('export-name', 0, struct.pack('>I', 1) + opt(EXPORT_NAME, b'') + xmit, seed=12)
inp('export-name-wrong', 0, FLAGS + opt(EXPORT_NAME, b'other'), seed=13)
inp('abort', 0, FLAGS + opt(LIST) + opt(ABORT), seed=14)
inp('starttls-no-tls', 0, FLAGS + opt(STARTTLS) + opt(STARTTLS, b'x') + go() + req(DISC), seed=15)

# Malformed.
inp('bad-client-flags', 0, struct.pack('>I', 0xff), seed=16)
inp('bad-opt-magic', 0, FLAGS + b'IHAVEOPX' + struct.pack('>II', GO, 0), seed=17)
inp('opt-long-skipped', 0, FLAGS + struct.pack('>QII', IHAVEOPT, GO, 70000) + bytes(70000) + go() + req(DISC),
    seed=18, sizes=(4096, 8192, 240))
inp('opt-huge', 0, FLAGS + struct.pack('>QII', IHAVEOPT, LIST, 0x7fffffff), seed=19)
inp('opt-bad-lengths', 0, FLAGS + opt(GO, b'\0\0\0\x10ab') + opt(SET_META, b'\0\0\0\0\0\0\0\x05') +
    opt(LIST_META, b'\0\0\0\0\0\0\0\x01\0\0\x10\0') + opt(LIST, b'x') + opt(STRUCTURED, b'yy') + go(), seed=20)
bad = (req(READ, 2 * MiB - 10, 20) + req(WRITE, 2 * MiB, 1) + req(READ, 0, 33 * MiB) + req(99, 0, 0) +
       req(READ, 0, 0) + req(WRITE, 0, 0) + req(STATUS, 0, 0) + req(TRIM, 0, 512, 0x8000) +
       req(READ, 1 << 63, 512) + req(FLUSH, 1 << 63, 1 << 31) + req(CACHE, 2 * MiB, 1))
inp('bad-requests', CANNED, bad + req(DISC), seed=21)
inp('bad-requests-ro', CANNED | RO, bad + req(WRITE, 0, 512) + req(TRIM, 0, 512) + req(ZEROES, 0, 512), seed=22)
inp('bad-request-magic', CANNED, req(READ, 0, 512) + b'\xde\xad' + req(READ, 0, 512)[2:], seed=23)
inp('write-over-max', CANNED, req(WRITE, 0, 33 * MiB)[:28] + bytes(4096), seed=24)
inp('request-before-go', 0, FLAGS + req(READ, 0, 512), seed=25)
inp('pipelined-writes', CANNED | SMALLBUF,
    b''.join(req(WRITE, i * 70000, 9000, FUA if i % 3 == 0 else 0, handle=i) for i in range(24)) +
    req(FLUSH) + req(STATUS, 0, 2 * MiB), seed=26)

# TLS required (shape bit 3): in the clear only STARTTLS and ABORT are
# answered; after STARTTLS the bytes are TLS records (a ClientHello-like
# start, then junk) for GnuTLS's handshake.
TLS = 8
hello = bytes([0x16, 3, 1, 0, 0xc8, 1, 0, 0, 0xc4, 3, 3]) + bytes(random.Random(40).randrange(256) for _ in range(300))
inp('tls-required-canned', CANNED, xmit, seed=41, shape=TLS)
inp('tls-required-options', 0, own + opt(EXPORT_NAME, b''), seed=42, shape=TLS)
inp('tls-starttls-junk', 0, FLAGS + opt(LIST) + opt(STARTTLS) + hello, seed=43, shape=TLS)
inp('tls-starttls-payload', 0, FLAGS + opt(STARTTLS, b'x') + opt(STARTTLS), seed=46, shape=TLS)
inp('tls-starttls-shutdown', SHUTDOWN, FLAGS + opt(STARTTLS) + hello[:40], seed=44, shape=TLS | DESC)
inp('tls-abort', 0, FLAGS + go(INFO, infos=(1,)) + opt(ABORT), seed=45, shape=TLS)
PY

du -sh "$OUT"
