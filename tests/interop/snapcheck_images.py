#!/usr/bin/env python3
"""snapcheck_images.py IMG KIND: damage the snapshot table of IMG in place.

IMG is a qcow2 image qemu-img made, with 16-bit refcounts and internal
snapshots.  Each KIND breaks one rule of the snapshot table, or of the
refcounts and COPIED flags of what snapshots share, keeping the rest of the
image consistent: a table rewritten in place must fit the clusters the old
one occupies; a table that does not is written after the end of the file,
its clusters given refcount 1 and the old table's clusters freed (so the
only damage left is the one KIND names).

KINDs (entry indexes count from 0; "last" is the last entry):
  incomplete0 / incomplete8   the last entry's extra data cut to 0 / 8 bytes
  incomplete_mid              entry 1's extra data cut to 8 bytes
  incomplete_all              every entry's extra data cut to 0 bytes
  extra_big                   entry 1's extra data 2000 bytes (pattern kept)
  extra_big2                  entries 0 and last: 1500 and 1025 bytes
  extra_max                   entry 1's extra data exactly 1024 bytes (valid)
  extra_big_incomplete        entry 0: 1100 bytes, last entry: 8 bytes
  too_many                    65537 entries (the first ones kept, the rest
                              empty: l1_size 0, complete extra data)
  too_many_by3                65539 entries
  too_big                     entries with 1000-byte extra data and
                              65535-byte ids and names (zeros) until the
                              table passes 64 MiB (the real ones first)
  too_big_extra               as too_big, and entry 0 with 1500 bytes of extra
  l1_unaligned                entry 0's l1_table_offset + 512
  l1_too_large                the last entry's l1_size 0x2000001
  l1_unaligned_incomplete     both: l1_unaligned on entry 0, incomplete8 last
  leak_sn_l1                  a snapshot L1 table's refcount raised by one
  low_shared                  a data cluster the active L2 table shares with
                              snapshot 0's: refcount lowered by one
  copied_shared               COPIED set on the active L2 entry of such a
                              cluster (refcount >= 2)
  copied_sn_l1                COPIED set on a snapshot's L1 entry (QEMU checks
                              COPIED only in the active tables)
  sn_l2_zero                  the refcount of an L2 table only a snapshot
                              references set to 0
  offset_unaligned            snapshots_offset + 512
  offset_huge                 snapshots_offset 2^63 - one cluster (offset +
                              the table's minimal size passes INT64_MAX)
  nb_zero_table               nb_snapshots 0 with the table still there (a
                              leak: the table and every snapshot's clusters)
  shared_incomplete           incomplete8, and the table's first cluster is
                              also a data cluster of the active disk: the
                              first active L2 entry whose cluster has
                              refcount 1 points there instead (COPIED clear,
                              the table cluster's refcount 2, the old data
                              cluster's 0).  The table rewrite then leaves
                              that cluster referenced once: its COPIED flag
                              must be set after it (qemu-img -r all leaves it
                              clear)
  shared_extra_big            the same with extra_big instead of incomplete8
Python 3 stdlib only.
"""
import os
import struct
import sys

f = open(sys.argv[1], 'r+b')
kind = sys.argv[2]


def rd(off, n):
    f.seek(off)
    b = f.read(n)
    return b + bytes(n - len(b))


def wr(off, b):
    f.seek(off)
    f.write(b)


def r64(off):
    return struct.unpack('>Q', rd(off, 8))[0]


def w64(off, v):
    wr(off, struct.pack('>Q', v))


hdr = rd(0, 104)
version = struct.unpack('>I', hdr[4:8])[0]
cb = struct.unpack('>I', hdr[20:24])[0]
cs = 1 << cb
l1_size, l1_off = struct.unpack('>IQ', hdr[36:48])
rt_off, rt_clusters = struct.unpack('>QI', hdr[48:60])
nb, soff = struct.unpack('>IQ', hdr[60:72])
order = struct.unpack('>I', hdr[96:100])[0] if version >= 3 else 4
assert order == 4, "16-bit refcounts only"
RB = cs // 2
MASK = 0x00fffffffffffe00


def rb_of(cl):
    b = r64(rt_off + 8 * (cl // RB)) & MASK
    assert b, "no refcount block for cluster %d" % cl
    return b


def getrc(cl):
    return struct.unpack('>H', rd(rb_of(cl) + 2 * (cl % RB), 2))[0]


def setrc(cl, v):
    wr(rb_of(cl) + 2 * (cl % RB), struct.pack('>H', v))


def entries():
    out, o = [], soff
    for _ in range(nb):
        o = (o + 7) & ~7
        h = rd(o, 40)
        l1o, l1s, idl, nml, ds, dn, clk, vm32, ex = struct.unpack('>QIHHIIQII', h)
        extra = rd(o + 40, ex)
        ident = rd(o + 40 + ex, idl)
        name = rd(o + 40 + ex + idl, nml)
        out.append(dict(l1o=l1o, l1s=l1s, ds=ds, dn=dn, clk=clk, vm32=vm32, extra=extra,
                        id=ident, name=name))
        o += 40 + ex + idl + nml
    return out, o - soff


def blob(es):
    out = bytearray()
    for e in es:
        out += bytes((-len(out)) % 8)
        out += struct.pack('>QIHHIIQII', e['l1o'], e['l1s'], len(e['id']), len(e['name']),
                           e['ds'], e['dn'], e['clk'], e['vm32'], len(e['extra']))
        out += e['extra'] + e['id'] + e['name']
    return bytes(out)


ES, old_size = entries()
fsize = os.fstat(f.fileno()).st_size


def put_table(es, sparse=None):
    """Write the table: in place when it fits the old clusters, else after EOF
    (refcounts set, the old clusters freed).  sparse: (count, entry) appended
    entries written only as their 40-byte headers (the rest holes)."""
    b = blob(es)
    size = len(b)
    if sparse:
        n, e = sparse
        step = (40 + len(e['extra']) + len(e['id']) + len(e['name']) + 7) & ~7
        size = ((size + 7) & ~7) + (n - 1) * step + 40 + len(e['extra']) + len(e['id']) + \
            len(e['name'])
    old_clusters = (soff % cs + old_size + cs - 1) // cs if nb else 0
    if size <= old_clusters * cs - soff % cs:
        off = soff
        wr(off, b + bytes(old_clusters * cs - soff % cs - len(b)))
    else:
        off = (fsize + cs - 1) // cs * cs
        wr(off, b)
        for c in range(off // cs, (off + size + cs - 1) // cs):
            setrc(c, 1)
        for c in range(soff // cs, soff // cs + old_clusters):
            setrc(c, getrc(c) - 1)
    if sparse:
        n, e = sparse
        o = off + ((len(b) + 7) & ~7)
        one = blob([e])
        if len(e['id']) + len(e['name']) == 0 and len(one) % 8 == 0:
            # dense: write them all at once
            wr(o, one * n)
        else:
            for _ in range(n):
                wr(o, one[:40 + len(e['extra'])])
                o += step
        end = off + size
        f.truncate(max(os.fstat(f.fileno()).st_size, (end + cs - 1) // cs * cs))
    wr(60, struct.pack('>IQ', len(es) + (sparse[0] if sparse else 0), off))


def full_extra(e):
    # what qemu-img 7.2 writes: vm_state_size_large, disk_size, icount
    return e['extra'][:24] + bytes(max(0, 24 - len(e['extra'])))


def l2_of(l1o, i):
    return r64(l1o + 8 * i) & MASK


def first_data(l2):
    for i in range(cs // 8):
        e = r64(l2 + 8 * i)
        if e & MASK and not e & (1 << 62):
            return i, e
    raise SystemExit("no data cluster")


last = len(ES) - 1
shared = kind.startswith('shared_')
if shared:
    kind = {'shared_incomplete': 'incomplete8', 'shared_extra_big': 'extra_big'}[kind]
if kind in ('incomplete0', 'incomplete8', 'incomplete_mid', 'incomplete_all'):
    n = 0 if kind in ('incomplete0', 'incomplete_all') else 8
    for i, e in enumerate(ES):
        if kind == 'incomplete_all' or (kind == 'incomplete_mid' and i == 1) or \
           (kind in ('incomplete0', 'incomplete8') and i == last):
            e['extra'] = e['extra'][:n]
    put_table(ES)
elif kind in ('extra_big', 'extra_big2', 'extra_max', 'extra_big_incomplete'):
    want = {'extra_big': {1: 2000}, 'extra_big2': {0: 1500, last: 1025},
            'extra_max': {1: 1024}, 'extra_big_incomplete': {0: 1100, last: 8}}[kind]
    for i, n in want.items():
        e = ES[i]
        e['extra'] = (full_extra(e) + bytes((k * 7 + i) & 0xff for k in range(n)))[:n]
    put_table(ES)
elif kind in ('too_many', 'too_many_by3'):
    n = 65537 if kind == 'too_many' else 65539
    empty = dict(l1o=0, l1s=0, ds=0, dn=0, clk=0, vm32=0,
                 extra=struct.pack('>QQQ', 0, struct.unpack('>Q', hdr[24:32])[0], (1 << 64) - 1),
                 id=b'', name=b'')
    put_table(ES, sparse=(n - len(ES), empty))
elif kind in ('too_big', 'too_big_extra'):
    if kind == 'too_big_extra':
        ES[0]['extra'] = (full_extra(ES[0]) + bytes(range(256)) * 6)[:1500]
    big = dict(l1o=0, l1s=0, ds=0, dn=0, clk=0, vm32=0, extra=bytes(1000),
               id=bytes(65535), name=bytes(65535))
    per = (40 + 1000 + 2 * 65535 + 7) & ~7
    put_table(ES, sparse=((64 << 20) // per + 3, big))
elif kind in ('l1_unaligned', 'l1_unaligned_incomplete'):
    ES[0]['l1o'] += 512
    if kind == 'l1_unaligned_incomplete':
        ES[last]['extra'] = ES[last]['extra'][:8]
    put_table(ES)
elif kind == 'l1_too_large':
    ES[last]['l1s'] = 0x2000001
    put_table(ES)
elif kind == 'leak_sn_l1':
    c = ES[0]['l1o'] // cs
    setrc(c, getrc(c) + 1)
elif kind in ('low_shared', 'copied_shared'):
    # a data cluster of the active L1's first L2 table that snapshot 0 shares
    l2 = l2_of(l1_off, 0)
    sl2 = l2_of(ES[0]['l1o'], 0)
    done = False
    for i in range(cs // 8):
        e = r64(l2 + 8 * i)
        se = r64(sl2 + 8 * i)
        d = e & MASK
        if d and not e & (1 << 62) and d == se & MASK and getrc(d // cs) >= 2:
            if kind == 'low_shared':
                setrc(d // cs, getrc(d // cs) - 1)
            else:
                w64(l2 + 8 * i, e | (1 << 63))
            done = True
            break
    assert done, "no data cluster the active L2 table shares with snapshot 0"
elif kind == 'copied_sn_l1':
    w64(ES[0]['l1o'], r64(ES[0]['l1o']) | (1 << 63))
elif kind == 'sn_l2_zero':
    active = {l2_of(l1_off, i) for i in range(l1_size)}
    for e in ES:
        for i in range(e['l1s']):
            l2 = l2_of(e['l1o'], i)
            if l2 and l2 not in active:
                setrc(l2 // cs, 0)
                break
        else:
            continue
        break
    else:
        raise SystemExit("no L2 table only a snapshot references")
elif kind == 'offset_unaligned':
    wr(64, struct.pack('>Q', soff + 512))
elif kind == 'offset_huge':
    wr(64, struct.pack('>Q', (1 << 63) - cs))
elif kind == 'nb_zero_table':
    wr(60, struct.pack('>I', 0))
else:
    raise SystemExit("unknown kind " + kind)
if shared:
    # after the table damage above (which rewrote the table in place)
    nb, soff = struct.unpack('>IQ', rd(60, 12))
    assert soff % cs == 0
    done = False
    for j in range(l1_size):
        l2 = l2_of(l1_off, j)
        if not l2:
            continue
        for i in range(cs // 8):
            e = r64(l2 + 8 * i)
            d = e & MASK
            if d and not e & (1 << 62) and getrc(d // cs) == 1:
                w64(l2 + 8 * i, soff)
                setrc(soff // cs, getrc(soff // cs) + 1)
                setrc(d // cs, 0)
                done = True
                break
        if done:
            break
    assert done, "no active data cluster with refcount 1"
f.close()
