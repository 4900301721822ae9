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
# header cluster then holds a feature name table).
set -eu

SRC=$(cd "$(dirname "$0")" && pwd)
OUT=$SRC/corpus
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"

rm -rf "$OUT/fuzz_open"
mkdir -p "$OUT/fuzz_open"

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
qemu-io -f qcow2 -c 'write -P 0x77 0 3k' -c abort lazy.qcow2 >/dev/null 2>&1 || true
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

du -sh "$OUT"
