#!/usr/bin/env python3
"""Random qemu-io command lists for qsm's interop tests (stdlib only).

    gen_workload.py SEED N SIZE CLUSTER            sequential workload
    gen_workload.py SEED N SIZE CLUSTER --aio      concurrent aio_write batches

SIZE and CLUSTER accept k/M/G suffixes (powers of two).  The output is a
qemu-io script (one command per line) to be fed on stdin to both
`qemu-io -f qcow2 IMG` and `qsm io -f qcow2 IMG`.

Sequential mode emits N commands: `write -P pat OFF LEN` (many unaligned,
some spanning clusters and L2-table boundaries; an L2 table maps
CLUSTER*CLUSTER/8 bytes), `write -z OFF LEN` (aligned and unaligned),
`write -z -u` and `discard` on whole clusters only, `flush`, and
`read -P pat OFF LEN` of regions whose content the generator knows from its
model.  On a qcow2 image without a backing file, discarded and zero-written
ranges read back as zeros (v3: zero flag; v2: unallocated or explicit zeros),
so the model only needs "this byte range holds pattern P" (0 = zeros).
A failed `read -P` makes qemu-io (and so qsm io) exit non-zero.

To continue a workload on an existing image, generate it once and split the
file: the reads of the second part rely on the model built by the first.

--aio mode emits about N `aio_write` commands in batches ended by
`aio_flush`.  Within a batch, writes that may overlap one another write the
same pattern (their order is undefined), writes from neighbouring zones share
clusters but not bytes (so concurrent allocations of one cluster happen), and
`aio_read -P` checks zones that no write of the batch touches, and
synchronous discard / write -z -u / write of other untouched zones run while
the aio writes are in flight.  After the last
batch, synchronous `read -P` commands verify every byte of the touched areas.
"""

import bisect
import random
import sys


def parse_size(s):
    s = s.strip()
    mult = 1
    suffixes = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if s and s[-1].lower() in suffixes:
        mult = suffixes[s[-1].lower()]
        s = s[:-1]
    return int(s, 0) * mult


class ByteMap:
    """Content model of a disk: disjoint sorted intervals [s, e) holding one
    byte pattern each; gaps are zeros.  Adjacent equal patterns are merged,
    so run_at() returns the maximal single-pattern run around an offset."""

    def __init__(self, size):
        self.size = size
        self.s = []
        self.e = []
        self.p = []

    def assign(self, a, b, pat):
        assert 0 <= a < b <= self.size
        lo = bisect.bisect_right(self.e, a)   # first interval ending after a
        hi = bisect.bisect_left(self.s, b)    # first interval starting at/after b
        new = []
        if lo < hi and self.s[lo] < a:
            new.append((self.s[lo], a, self.p[lo]))
        if pat != 0:
            new.append((a, b, pat))
        if lo < hi and self.e[hi - 1] > b:
            new.append((b, self.e[hi - 1], self.p[hi - 1]))
        self.s[lo:hi] = [x[0] for x in new]
        self.e[lo:hi] = [x[1] for x in new]
        self.p[lo:hi] = [x[2] for x in new]
        # merge touching equal neighbours around the change
        i = max(lo - 1, 0)
        stop = min(lo + len(new) + 1, len(self.s))
        while i < stop - 1 and i < len(self.s) - 1:
            if self.e[i] == self.s[i + 1] and self.p[i] == self.p[i + 1]:
                self.e[i] = self.e[i + 1]
                del self.s[i + 1], self.e[i + 1], self.p[i + 1]
                stop -= 1
            else:
                i += 1

    def run_at(self, x):
        """(start, end, pattern) of the maximal run containing offset x."""
        i = bisect.bisect_right(self.s, x) - 1
        if i >= 0 and self.e[i] > x:
            return self.s[i], self.e[i], self.p[i]
        start = self.e[i] if i >= 0 else 0
        end = self.s[i + 1] if i + 1 < len(self.s) else self.size
        return start, end, 0

    def runs(self, a, b):
        """Single-pattern runs covering [a, b), clipped."""
        x = a
        while x < b:
            s, e, p = self.run_at(x)
            e = min(e, b)
            yield x, e, p
            x = e


class Gen:
    def __init__(self, seed, size, cluster):
        self.r = random.Random(seed)
        self.size = size
        self.c = cluster
        self.l2span = cluster * cluster // 8
        self.m = ByteMap(size)
        self.out = []
        self.recent = []            # (off, len) of the last mutating commands
        r = self.r
        c = cluster
        # Hot regions: most commands land here so they overwrite, discard
        # and re-read each other's data.  They include the first and last
        # cluster, L2-table boundaries (when the disk has any) and a few
        # unaligned random places.
        w = min(max(8 * c, 256 << 10), 8 << 20)
        w = min(w, size)
        regions = [(0, w), (size - w, w)]
        nb = (size - 1) // self.l2span          # L2 boundaries inside the disk
        if nb > 0:
            for _ in range(2):
                k = r.randint(1, nb)
                regions.append((k * self.l2span - w // 2 - r.randrange(c), w))
        for _ in range(4):
            regions.append((r.randrange(0, size - w), w))
        self.regions = [(max(0, min(s, size - l)), l) for s, l in regions]
        self.nb = nb

    # --- choosing places ------------------------------------------------
    def pick_offset(self, sparse_p):
        r = self.r
        x = r.random()
        if x < sparse_p:                             # anywhere: sparse allocation
            return r.randrange(self.size)
        if x < sparse_p + 0.04 and self.nb > 0:      # straddle a random L2 boundary
            k = r.randint(1, self.nb)
            return max(0, k * self.l2span - r.randint(1, 2 * self.c))
        s, l = r.choice(self.regions)
        off = s + r.randrange(l)
        if r.random() < 0.15:                        # just before a cluster boundary
            b = (off // self.c + 1) * self.c
            off = max(0, b - r.randint(1, min(self.c, 4096)))
        return min(off, self.size - 1)

    def pick_len(self, maxlen=1 << 20):
        r = self.r
        c = self.c
        x = r.random()
        if x < 0.35:
            n = r.randint(1, 512)
        elif x < 0.60:
            n = r.randint(1, min(2 * c, 128 << 10))
        elif x < 0.80:
            n = r.randint(1, 64 << 10)
        elif x < 0.92:
            n = r.randint(1, min(3 * c, 512 << 10))
        else:
            n = r.randint(1, 1 << 20)
        return min(n, maxlen)

    def clip(self, off, n):
        n = min(n, self.size - off)
        return off, max(n, 1)

    def whole_clusters(self, sparse_p, maxn=8):
        c = self.c
        off = self.pick_offset(sparse_p) // c * c
        n = self.r.randint(1, maxn) * c
        n = min(n, max(c, (16 << 20) // c * c))
        n = min(n, self.size - off)
        return off, n

    # --- commands -------------------------------------------------------
    def write(self, sparse_p):
        r = self.r
        off = self.pick_offset(sparse_p)
        if r.random() < 0.12:                        # aligned multi-cluster write
            off = off // self.c * self.c
            n = r.randint(1, 4) * self.c
            n = min(n, max(self.c, 1 << 20))
        else:
            n = self.pick_len()
        off, n = self.clip(off, n)
        pat = 0 if r.random() < 0.02 else r.randint(1, 255)
        self.out.append("write -P %d %d %d" % (pat, off, n))
        self.m.assign(off, off + n, pat)
        self.changed(off, n)

    def write_zeroes(self, sparse_p):
        if self.r.random() < 0.5:
            off, n = self.whole_clusters(sparse_p)
        else:
            off, n = self.clip(self.pick_offset(sparse_p), self.pick_len(256 << 10))
        self.out.append("write -z %d %d" % (off, n))
        self.m.assign(off, off + n, 0)
        self.changed(off, n)

    def write_zeroes_unmap(self, sparse_p):
        off, n = self.whole_clusters(sparse_p)
        self.out.append("write -z -u %d %d" % (off, n))
        self.m.assign(off, off + n, 0)
        self.changed(off, n)

    def discard(self, sparse_p):
        off, n = self.whole_clusters(sparse_p)
        self.out.append("discard %d %d" % (off, n))
        self.m.assign(off, off + n, 0)
        self.changed(off, n)

    def read(self, sparse_p):
        """read -P of single-pattern runs: mostly around what a recent
        command changed (so a lost or misplaced write is caught before it is
        overwritten), sometimes anywhere, sometimes every run of a window."""
        r = self.r
        x = r.random()
        if self.recent and x < 0.60:
            a0, n0 = self.recent[-1] if r.random() < 0.5 else r.choice(self.recent)
            pt = a0 + r.randrange(n0)
            if r.random() < 0.3:                     # just outside its edges
                pt = r.choice([a0 - 1, a0 + n0]) if a0 > 0 and a0 + n0 < self.size else a0
        elif self.recent and x < 0.75:
            a0, n0 = r.choice(self.recent)
            lo = max(0, a0 - r.randint(0, self.c))
            hi = min(self.size, a0 + n0 + r.randint(0, self.c), lo + (256 << 10))
            for a, b, p in list(self.m.runs(lo, hi))[:16]:
                self.out.append("read -P %d %d %d" % (p, a, b - a))
            return
        else:
            pt = self.pick_offset(sparse_p)
        s, e, p = self.m.run_at(pt)
        a = r.randrange(s, e)
        if r.random() < 0.4:
            a = s                                    # from the start of the run
        if r.random() < 0.3:
            a = max(s, pt - r.randint(0, 512))       # around the chosen point
        n = min(e - a, r.choice([512, 4096, 65536, 256 << 10]))
        n = r.randint(1, n) if r.random() < 0.5 else n
        self.out.append("read -P %d %d %d" % (p, a, n))

    def changed(self, off, n):
        """Note a mutation; a quarter of them are read back at once (with a
        few bytes of their neighbours when those hold the same pattern)."""
        if self.r.random() < 0.25:
            s, e, p = self.m.run_at(off)
            a = max(s, off - self.r.randint(0, 64))
            b = min(e, off + n + self.r.randint(0, 64), a + (1 << 20))
            self.out.append("read -P %d %d %d" % (p, a, b - a))
        self.recent.append((off, n))
        if len(self.recent) > 8:
            del self.recent[0]

    def sequential(self, n):
        # Bound the clusters allocated by sparse writes: about 64 MiB worth.
        sparse_p = min(0.05, ((64 << 20) / self.c) / max(n, 1))
        ops = [(self.write, 45), (self.write_zeroes, 9), (self.write_zeroes_unmap, 5),
               (self.discard, 8), (None, 4), (self.read, 29)]
        fns = [f for f, _ in ops]
        weights = [w for _, w in ops]
        for _ in range(n):
            f = self.r.choices(fns, weights)[0]
            if f is None:
                self.out.append("flush")
            else:
                f(sparse_p)

    # --- aio ------------------------------------------------------------
    def aio(self, n):
        r = self.r
        c = self.c
        # Zone areas: around an L2 boundary (if any), the start of the disk
        # and a random unaligned place.  Each area is cut at unaligned points
        # into zones of about half a cluster to a few clusters, so zones
        # share clusters.
        aw = min(max(8 * c, 128 << 10), 8 << 20)
        areas = [0]
        if self.nb > 0:
            areas.append(r.randint(1, self.nb) * self.l2span - aw // 2 - r.randrange(c))
        areas.append(r.randrange(0, self.size - aw))
        zones = []
        for a in areas:
            a = max(0, min(a, self.size - aw))
            x = a
            while x < a + aw:
                zl = r.randint(max(1, c // 3), 3 * c)
                zl = min(zl, 1 << 20, a + aw - x)
                zones.append((x, x + zl))
                x += zl
        zones.sort()
        # drop overlaps between areas
        z2 = []
        for s, e in zones:
            if z2 and s < z2[-1][1]:
                s = z2[-1][1]
            if s < e:
                z2.append((s, e))
        zones = z2
        written = 0
        while written < n:
            batch = []
            updates = []
            for zs, ze in zones:
                x = r.random()
                if x < 0.30:                          # quiet: concurrent verify reads
                    for _ in range(r.randint(0, 2)):
                        a = r.randrange(zs, ze)
                        s, e, p = self.m.run_at(a)
                        e = min(e, ze)
                        ln = r.randint(1, min(e - a, 128 << 10))
                        batch.append("aio_read -P %d %d %d" % (p, a, ln))
                    continue
                if x < 0.40:
                    # A synchronous command while the batch's aio writes are
                    # in flight: discard / write -z -u of whole clusters
                    # inside this zone, or a write of part of it (which may
                    # share a cluster with a neighbour's in-flight write).
                    cs = (zs + c - 1) // c * c
                    ce = ze // c * c
                    y = r.random()
                    if cs < ce and y < 0.5:
                        cmd = "discard" if y < 0.3 else "write -z -u"
                        a = cs + r.randrange((ce - cs) // c) * c
                        b = a + r.randint(1, (ce - a) // c) * c
                        batch.append("%s %d %d" % (cmd, a, b - a))
                        updates.append((a, b, 0))
                    else:
                        a = r.randrange(zs, ze)
                        b = r.randint(a + 1, ze)
                        pat = 0 if y > 0.85 else r.randint(1, 255)
                        if pat:
                            batch.append("write -P %d %d %d" % (pat, a, b - a))
                        else:
                            batch.append("write -z %d %d" % (a, b - a))
                        updates.append((a, b, pat))
                    continue
                zero = x < 0.38
                pat = r.randint(1, 255)
                for _ in range(r.randint(1, 3)):
                    a = r.randrange(zs, ze)
                    if r.random() < 0.3:
                        a = zs
                    b = r.randint(a + 1, ze)
                    if r.random() < 0.3:
                        b = ze
                    if zero:
                        batch.append("aio_write -z %d %d" % (a, b - a))
                        updates.append((a, b, 0))
                    else:
                        batch.append("aio_write -P %d %d %d" % (pat, a, b - a))
                        updates.append((a, b, pat))
                    written += 1
            r.shuffle(batch)
            self.out.extend(batch)
            self.out.append("aio_flush")
            for a, b, p in updates:
                self.m.assign(a, b, p)
        for zs, ze in zones:
            for a, b, p in self.m.runs(zs, ze):
                self.out.append("read -P %d %d %d" % (p, a, b - a))
        self.out.append("flush")


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = [a for a in argv[1:] if a.startswith("--")]
    if len(args) != 4 or any(f not in ("--aio",) for f in flags):
        sys.stderr.write(__doc__)
        return 2
    seed, n, size, cluster = int(args[0], 0), int(args[1], 0), parse_size(args[2]), parse_size(args[3])
    if cluster < 512 or cluster & (cluster - 1) or size % cluster or size < cluster:
        sys.stderr.write("gen_workload: bad size/cluster\n")
        return 2
    g = Gen(seed, size, cluster)
    if "--aio" in flags:
        g.aio(n)
    else:
        g.sequential(n)
    sys.stdout.write("\n".join(g.out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
