#!/usr/bin/env python3
"""free_zeroed.py IN OUT: copy a qcow2 file with the contents of every
cluster whose refcount is 0 replaced by zeros (tests/interop/test_layout.sh).

QEMU passes a guest discard down to the file (pass-discard-request), so the
clusters it frees read as zeros there; qsm leaves their old bytes (README.md,
"Allocation and file layout").  Nothing references such a cluster, so this
is the only difference the comparison forgives: everything referenced,
metadata and data, and the file's length must still match byte for byte."""
import struct
import sys

src, dst = sys.argv[1], sys.argv[2]
d = bytearray(open(src, 'rb').read())
cbits = struct.unpack('>I', d[20:24])[0]
cs = 1 << cbits
rt_off, rt_cl = struct.unpack('>QI', d[48:60])
order = struct.unpack('>I', d[96:100])[0] if struct.unpack('>I', d[4:8])[0] >= 3 else 4
bits = 1 << order
epb = cs * 8 // bits
nclusters = (len(d) + cs - 1) // cs


def refcount(c):
    idx = c // epb
    if idx >= rt_cl * cs // 8:
        return 0
    blk = struct.unpack('>Q', d[rt_off + 8 * idx:rt_off + 8 * idx + 8])[0] & ~0x1ff
    if not blk:
        return 0
    slot = c % epb
    bit = slot * bits
    raw = int.from_bytes(d[blk + bit // 8:blk + (bit + bits + 7) // 8], 'big')
    if bits < 8:
        raw = (raw >> (8 - bits - bit % 8)) & ((1 << bits) - 1)
    return raw


for c in range(1, nclusters):
    if refcount(c) == 0:
        end = min(len(d), (c + 1) * cs)
        d[c * cs:end] = bytes(end - c * cs)
open(dst, 'wb').write(d)
