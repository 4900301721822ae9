/*
 * metadata/refcount.c: resident refcounts and the cluster allocator.
 *
 * Representation.  The reftable is an array of host-order block offsets
 * (rc_table, rc_entries of them: the table's full capacity, so the table's
 * clusters hold exactly rc_entries entries); rc_blocks[i] is block i's
 * buffer in on-disk big-endian form, or NULL when entry i is 0.  Widths
 * below 8 bits pack LSB-first in each byte (QEMU's get_refcount_ro0..2: the
 * refcount of slot s lives in byte s / (8 / bits) at bit (s % (8 / bits)) *
 * bits); 8..64 bits are big-endian integers.  A cluster's refcount is read
 * as 0 when its block is missing or it lies past the table's coverage.
 *
 * Invariants (beyond those of refcount.h; qsm_refcount_check() tests them):
 *  R1. rc_hint <= the lowest free cluster, and rc_hint >= 1.  Lowered when a
 *      refcount drops to 0, raised by scans and by allocations at the hint,
 *      so appending at the end of the image finds its cluster in O(1).
 *  R2. rc_end is one past the last cluster with a nonzero refcount.
 *  R3. rc_mset holds exactly the clusters of the present refcount blocks;
 *      with the table's range and rc_old it answers is_meta in O(1).
 *  R4. A block is on the rc_dirty list iff RB_DIRTY is set in rc_flags;
 *      RB_NEW marks blocks never collected (written as REFBLOCK_ALLOC).
 *  R5. Entries [rc_tdirty_lo, rc_tdirty_hi) of the table changed since the
 *      last collect; rc_table_moved means the whole table is new and lives
 *      at rc_table_offset, while the tables it replaced sit in rc_old, still
 *      counted, until qsm_refcount_table_committed() for the generation of
 *      the collect that wrote their replacement.
 *  R6. Refcount blocks and table clusters (current and old) never drop to
 *      refcount 0 through qsm_refcount_update() (-EINVAL): the allocator
 *      would otherwise hand out a cluster holding live metadata.
 *
 * Allocation.  rc_find_run() scans from the hint for n free clusters,
 * skipping whole ranges whose block is missing (all free) and the coverage's
 * end (free up to the format's limit).  Before a run is claimed every range
 * it touches must have a block: a missing block is created at the lowest
 * free cluster, and when that cluster's own range has no block either the
 * new block is for that range and counts itself (QEMU's self-describing
 * refblock), so the loop makes progress and never recurses.  A run beyond
 * the table's coverage grows the table: the in-memory arrays are enlarged
 * and the coverage raised *first*, then the new table's clusters are
 * allocated with the ordinary allocator inside the new coverage (the size is
 * chosen so that they fit; rc_growing forbids a nested growth).
 *
 * Errors.  Public mutators check -ERANGE/-EINVAL/-EFBIG and reserve memory
 * (spare block buffers in rc_pool, room in rc_mset) before changing
 * anything.  The requested change itself is all-or-nothing.  Only an
 * -ENOMEM beyond the reservation can leave extra refcount blocks created on
 * the way; they are consistent metadata (they count themselves and are
 * written back like any new block).  A failure in the middle of a table
 * growth that cannot be undone sets rc_broken: every later mutator and
 * collect then fails with -EIO (the engine's sticky error state).
 */
#include "metadata/refcount.h" /* first: io/util.h needs struct iovec */

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/qcow2.h"

#define RB_DIRTY 0x1
#define RB_NEW 0x2

#define RC_MAX_TABLE_ENTRIES ((uint64_t)QCOW2_MAX_REFTABLE_BYTES / 8)
/* Host offsets must fit the 56-bit offset fields of L1/L2 entries. */
#define RC_MAX_HOST_BYTES (1ull << 56)

struct rc_old_table {
	uint64_t ot_offset;
	uint32_t ot_clusters;
	uint64_t ot_generation;     /* 0 until a collect wrote the replacement */
};

struct qsm_refcounts {
	/* Geometry. */
	unsigned rc_cluster_bits;
	size_t rc_cluster_size;
	unsigned rc_order;          /* refcount_bits = 1 << rc_order */
	unsigned rc_epb_bits;       /* log2 of entries per block */
	uint64_t rc_max;            /* largest refcount */
	uint64_t rc_max_clusters;   /* no cluster index reaches this */

	/* The table and the blocks. */
	uint64_t rc_table_offset;
	uint32_t rc_table_clusters;
	uint64_t rc_entries;        /* table capacity = coverage in blocks */
	uint64_t rc_cap;            /* allocated length of the arrays below */
	uint64_t *rc_table;         /* block offsets, host order, 0 = none */
	uint8_t **rc_blocks;        /* on-disk form, NULL = none */
	uint8_t *rc_flags;          /* RB_* */
	uint32_t *rc_dlo, *rc_dhi;  /* dirty byte range of each dirty block */
	uint32_t *rc_dirty;         /* dirty block indices (capacity rc_cap) */
	size_t rc_ndirty;
	uint64_t rc_tdirty_lo, rc_tdirty_hi; /* dirty entries, lo == hi: none */
	bool rc_table_moved;
	uint64_t rc_generation;     /* of the last collect */

	struct rc_old_table *rc_old;
	size_t rc_nold, rc_old_cap;

	/* Set of refcount block clusters (open addressing, 0 = empty slot). */
	uint64_t *rc_mset;
	size_t rc_mset_cap, rc_mset_n;

	/* Allocator. */
	uint64_t rc_hint;           /* R1 */
	uint64_t rc_end;            /* R2, in clusters */
	uint64_t rc_excl_lo, rc_excl_hi; /* never hand out (update's range) */
	bool rc_careful;            /* loaded metadata had refcount 0: test
				     * is_meta per cluster, no range skips */
	bool rc_growing;
	bool rc_broken;
	/* Packing point of compressed clusters (qsm_refcount_alloc_bytes):
	 * a byte offset inside a cluster with refcount > 0, or 0 = none. */
	uint64_t rc_free_byte;

	/* Spare zeroed-on-take block buffers. */
	uint8_t **rc_pool;
	size_t rc_pool_n, rc_pool_cap;
};

/* --- Entries inside a block ----------------------------------------------- */

static inline uint64_t rc_block_get(unsigned order, const uint8_t *b, uint64_t slot)
{
	switch (order) {
	case 3:
		return b[slot];
	case 4:
		return qcow2_be16(b + 2 * slot);
	case 5:
		return qcow2_be32(b + 4 * slot);
	case 6:
		return qcow2_be64(b + 8 * slot);
	default: {
		unsigned per = 3 - order; /* log2 entries per byte */
		unsigned sh = (unsigned)(slot & ((1u << per) - 1)) << order;
		return (uint64_t)(b[slot >> per] >> sh) & ((1u << (1u << order)) - 1);
	}
	}
}

static inline void rc_block_set(unsigned order, uint8_t *b, uint64_t slot, uint64_t v)
{
	switch (order) {
	case 3:
		b[slot] = (uint8_t)v;
		break;
	case 4:
		qcow2_put_be16(b + 2 * slot, (uint16_t)v);
		break;
	case 5:
		qcow2_put_be32(b + 4 * slot, (uint32_t)v);
		break;
	case 6:
		qcow2_put_be64(b + 8 * slot, v);
		break;
	default: {
		unsigned per = 3 - order;
		unsigned sh = (unsigned)(slot & ((1u << per) - 1)) << order;
		uint8_t mask = (uint8_t)(((1u << (1u << order)) - 1) << sh);
		uint8_t *p = &b[slot >> per];
		*p = (uint8_t)((*p & ~mask) | ((v << sh) & mask));
		break;
	}
	}
}

static inline uint64_t rc_epb(const struct qsm_refcounts *rc)
{
	return 1ull << rc->rc_epb_bits;
}

/* The block covering cluster c, or NULL (missing or past the coverage). */
static inline uint8_t *rc_block_of(const struct qsm_refcounts *rc, uint64_t c)
{
	uint64_t idx = c >> rc->rc_epb_bits;
	return idx < rc->rc_entries ? rc->rc_blocks[idx] : NULL;
}

uint64_t qsm_refcount_get(const struct qsm_refcounts *rc, uint64_t cluster)
{
	const uint8_t *b = rc_block_of(rc, cluster);
	if (!b)
		return 0;
	return rc_block_get(rc->rc_order, b, cluster & (rc_epb(rc) - 1));
}

uint64_t qsm_refcount_max(const struct qsm_refcounts *rc)
{
	return rc->rc_max;
}

/* Mark bytes [lo, hi) of block idx dirty: write-back writes only the dirty
 * span of a block (rounded to 4 KiB), not the whole cluster. */
static void rc_mark_dirty_bytes(struct qsm_refcounts *rc, uint64_t idx, uint32_t lo, uint32_t hi)
{
	if (!(rc->rc_flags[idx] & RB_DIRTY)) {
		rc->rc_flags[idx] |= RB_DIRTY;
		rc->rc_dirty[rc->rc_ndirty++] = (uint32_t)idx;
		rc->rc_dlo[idx] = lo;
		rc->rc_dhi[idx] = hi;
		return;
	}
	rc->rc_dlo[idx] = QSM_MIN(rc->rc_dlo[idx], lo);
	rc->rc_dhi[idx] = QSM_MAX(rc->rc_dhi[idx], hi);
}

static void rc_mark_dirty(struct qsm_refcounts *rc, uint64_t idx)
{
	rc_mark_dirty_bytes(rc, idx, 0, (uint32_t)rc->rc_cluster_size);
}

static void rc_table_dirty(struct qsm_refcounts *rc, uint64_t idx)
{
	if (rc->rc_tdirty_lo == rc->rc_tdirty_hi) {
		rc->rc_tdirty_lo = idx;
		rc->rc_tdirty_hi = idx + 1;
		return;
	}
	rc->rc_tdirty_lo = QSM_MIN(rc->rc_tdirty_lo, idx);
	rc->rc_tdirty_hi = QSM_MAX(rc->rc_tdirty_hi, idx + 1);
}

/* Set cluster c's refcount; its block must exist.  Marks the block dirty. */
static void rc_set(struct qsm_refcounts *rc, uint64_t c, uint64_t v)
{
	uint64_t idx = c >> rc->rc_epb_bits;
	uint64_t slot = c & (rc_epb(rc) - 1);
	rc_block_set(rc->rc_order, rc->rc_blocks[idx], slot, v);
	uint64_t bit = slot << rc->rc_order;
	rc_mark_dirty_bytes(rc, idx, (uint32_t)(bit / 8),
			    (uint32_t)((bit + (1u << rc->rc_order) + 7) / 8));
}

/* --- The set of refcount block clusters ----------------------------------- */

static inline size_t rc_mslot(uint64_t k, size_t cap)
{
	k *= 0x9e3779b97f4a7c15ull;
	return (size_t)(k ^ (k >> 29)) & (cap - 1);
}

static bool rc_mset_has(const struct qsm_refcounts *rc, uint64_t k)
{
	if (!rc->rc_mset_cap)
		return false;
	for (size_t i = rc_mslot(k, rc->rc_mset_cap);; i = (i + 1) & (rc->rc_mset_cap - 1)) {
		if (rc->rc_mset[i] == k)
			return true;
		if (!rc->rc_mset[i])
			return false;
	}
}

/* Insert k (nonzero) into a set with room (rc_mset_reserve).  False when it
 * was already there. */
static bool rc_mset_add(struct qsm_refcounts *rc, uint64_t k)
{
	size_t i = rc_mslot(k, rc->rc_mset_cap);
	for (; rc->rc_mset[i]; i = (i + 1) & (rc->rc_mset_cap - 1))
		if (rc->rc_mset[i] == k)
			return false;
	rc->rc_mset[i] = k;
	rc->rc_mset_n++;
	return true;
}

/* Make room for `more` insertions at load factor <= 1/2.  0 or -ENOMEM. */
static int rc_mset_reserve(struct qsm_refcounts *rc, size_t more)
{
	size_t need = (rc->rc_mset_n + more) * 2;
	if (need <= rc->rc_mset_cap)
		return 0;
	size_t cap = rc->rc_mset_cap ? rc->rc_mset_cap : 64;
	while (cap < need)
		cap *= 2;
	uint64_t *old = rc->rc_mset, *set = calloc(cap, sizeof(*set));
	size_t oldcap = rc->rc_mset_cap;
	if (!set)
		return -ENOMEM;
	rc->rc_mset = set;
	rc->rc_mset_cap = cap;
	rc->rc_mset_n = 0;
	for (size_t i = 0; i < oldcap; i++)
		if (old[i])
			rc_mset_add(rc, old[i]);
	free(old);
	return 0;
}

bool qsm_refcount_is_meta(const struct qsm_refcounts *rc, uint64_t cluster)
{
	uint64_t t = rc->rc_table_offset >> rc->rc_cluster_bits;
	if (cluster >= t && cluster - t < rc->rc_table_clusters)
		return true;
	for (size_t i = 0; i < rc->rc_nold; i++) {
		t = rc->rc_old[i].ot_offset >> rc->rc_cluster_bits;
		if (cluster >= t && cluster - t < rc->rc_old[i].ot_clusters)
			return true;
	}
	return cluster && rc_mset_has(rc, cluster);
}

/* --- Memory reservation ---------------------------------------------------- */

/* Have at least k spare block buffers and room for k blocks in rc_mset. */
static int rc_reserve(struct qsm_refcounts *rc, size_t k)
{
	if (rc_mset_reserve(rc, k))
		return -ENOMEM;
	if (k > rc->rc_pool_cap) {
		uint8_t **p = realloc(rc->rc_pool, k * sizeof(*p));
		if (!p)
			return -ENOMEM;
		rc->rc_pool = p;
		rc->rc_pool_cap = k;
	}
	while (rc->rc_pool_n < k) {
		uint8_t *b = malloc(rc->rc_cluster_size);
		if (!b)
			return -ENOMEM;
		rc->rc_pool[rc->rc_pool_n++] = b;
	}
	return 0;
}

/* After a public operation: keep a few spares, give the rest back (a large
 * allocation may have reserved many). */
#define RC_POOL_KEEP 8
static void rc_pool_trim(struct qsm_refcounts *rc)
{
	while (rc->rc_pool_n > RC_POOL_KEEP)
		free(rc->rc_pool[--rc->rc_pool_n]);
}

/* A zeroed block buffer, from the pool when it has one. */
static uint8_t *rc_take_buf(struct qsm_refcounts *rc)
{
	uint8_t *b = rc->rc_pool_n ? rc->rc_pool[--rc->rc_pool_n] : malloc(rc->rc_cluster_size);
	if (b)
		memset(b, 0, rc->rc_cluster_size);
	return b;
}

/* Enlarge the per-entry arrays to hold n entries (zeroed).  Changes no
 * visible state: rc_entries stays.  0 or -ENOMEM. */
static int rc_arrays_grow(struct qsm_refcounts *rc, uint64_t n)
{
	if (n <= rc->rc_cap)
		return 0;
	uint64_t *t = realloc(rc->rc_table, n * sizeof(*t));
	if (!t)
		return -ENOMEM;
	rc->rc_table = t;
	uint8_t **b = realloc(rc->rc_blocks, n * sizeof(*b));
	if (!b)
		return -ENOMEM;
	rc->rc_blocks = b;
	uint8_t *f = realloc(rc->rc_flags, n);
	if (!f)
		return -ENOMEM;
	rc->rc_flags = f;
	uint32_t *d = realloc(rc->rc_dirty, n * sizeof(*d));
	if (!d)
		return -ENOMEM;
	rc->rc_dirty = d;
	if (!(d = realloc(rc->rc_dlo, n * sizeof(*d))))
		return -ENOMEM;
	rc->rc_dlo = d;
	if (!(d = realloc(rc->rc_dhi, n * sizeof(*d))))
		return -ENOMEM;
	rc->rc_dhi = d;
	uint64_t o = rc->rc_cap;
	memset(rc->rc_table + o, 0, (n - o) * sizeof(*t));
	memset(rc->rc_blocks + o, 0, (n - o) * sizeof(*b));
	memset(rc->rc_flags + o, 0, n - o);
	rc->rc_cap = n;
	return 0;
}

/* --- Allocator -------------------------------------------------------------- */

/* Clusters [c, c+n) just became nonzero: keep R1 and R2. */
static void rc_claimed(struct qsm_refcounts *rc, uint64_t c, uint64_t n)
{
	if (rc->rc_hint >= c && rc->rc_hint < c + n)
		rc->rc_hint = c + n;
	rc->rc_end = QSM_MAX(rc->rc_end, c + n);
}

/* Recompute rc_end downwards after refcounts dropped to 0 at its top. */
static void rc_recompute_end(struct qsm_refcounts *rc)
{
	uint64_t c = rc->rc_end;
	while (c > 0) {
		uint64_t idx = (c - 1) >> rc->rc_epb_bits;
		if (idx >= rc->rc_entries || !rc->rc_blocks[idx]) {
			c = idx << rc->rc_epb_bits;
			continue;
		}
		if (qsm_refcount_get(rc, c - 1))
			break;
		c--;
	}
	rc->rc_end = c;
}

/*
 * Find the lowest run of n free clusters at or above the hint (clusters in
 * [rc_excl_lo, rc_excl_hi) are not free, but do not stop the hint).  Raises
 * the hint over the used clusters it passes.  -EFBIG when the run would
 * reach rc_max_clusters.
 */
static int rc_find_run(struct qsm_refcounts *rc, uint64_t n, uint64_t *start)
{
	uint64_t c = rc->rc_hint, run = 0, epb_mask = rc_epb(rc) - 1;
	bool seen_free = false;

	while (run < n) {
		if (c - run > rc->rc_max_clusters - n)
			return -EFBIG;
		if (c >= rc->rc_excl_lo && c < rc->rc_excl_hi) {
			seen_free = true;
			run = 0;
			c = rc->rc_excl_hi;
			continue;
		}
		uint64_t idx = c >> rc->rc_epb_bits;
		if (!rc->rc_careful && (idx >= rc->rc_entries || !rc->rc_blocks[idx])) {
			/* A whole missing range, or past the coverage: free. */
			uint64_t span = n - run;
			if (idx < rc->rc_entries)
				span = QSM_MIN(span, (idx + 1) * (epb_mask + 1) - c);
			if (rc->rc_excl_lo > c)
				span = QSM_MIN(span, rc->rc_excl_lo - c);
			seen_free = true;
			run += span;
			c += span;
			continue;
		}
		const uint8_t *b = idx < rc->rc_entries ? rc->rc_blocks[idx] : NULL;
		bool free = c != 0 && (!b || !rc_block_get(rc->rc_order, b, c & epb_mask)) &&
			    (!rc->rc_careful || !qsm_refcount_is_meta(rc, c));
		if (free) {
			seen_free = true;
			run++;
		} else {
			if (!seen_free)
				rc->rc_hint = c + 1;
			run = 0;
		}
		c++;
	}
	*start = c - n;
	return 0;
}

/*
 * Install an empty block for table index idx at free cluster bc, counting
 * bc (in the new block itself when bc is in idx's range, else in bc's
 * block, which must exist).  All or nothing: 0 or -ENOMEM.
 */
static int rc_install_block(struct qsm_refcounts *rc, uint64_t idx, uint64_t bc)
{
	if (rc_mset_reserve(rc, 1))
		return -ENOMEM;
	uint8_t *b = rc_take_buf(rc);
	if (!b)
		return -ENOMEM;
	rc->rc_blocks[idx] = b;
	rc->rc_table[idx] = bc << rc->rc_cluster_bits;
	rc->rc_flags[idx] |= RB_NEW;
	rc_mark_dirty(rc, idx);
	rc_table_dirty(rc, idx);
	rc_mset_add(rc, bc);
	rc_set(rc, bc, 1);
	rc_claimed(rc, bc, 1);
	return 0;
}

static int rc_grow_table(struct qsm_refcounts *rc, uint64_t need);

/*
 * Make progress towards a block at table index idx (< rc_entries, missing):
 * create one block, or grow the table.  The new block goes at the lowest
 * free cluster; if that cluster's range has no block, the new block is that
 * range's block and counts itself.
 */
static int rc_make_block(struct qsm_refcounts *rc, uint64_t idx)
{
	uint64_t f;
	int r = rc_find_run(rc, 1, &f);
	if (r)
		return r;
	uint64_t fidx = f >> rc->rc_epb_bits;
	if (fidx >= rc->rc_entries)
		return rc_grow_table(rc, fidx + 1);
	if (!rc->rc_blocks[fidx])
		return rc_install_block(rc, fidx, f);
	return rc_install_block(rc, idx, f);
}

/* Give every range of [c, c+n) a block (growing the table as needed).
 * *made tells whether anything was created. */
static int rc_ensure_blocks(struct qsm_refcounts *rc, uint64_t c, uint64_t n, bool *made)
{
	uint64_t last = (c + n - 1) >> rc->rc_epb_bits;
	int r;
	*made = false;
	if (last >= rc->rc_entries) {
		if ((r = rc_grow_table(rc, last + 1)))
			return r;
		*made = true;
	}
	for (uint64_t idx = c >> rc->rc_epb_bits; idx <= last; idx++) {
		while (!rc->rc_blocks[idx]) {
			if ((r = rc_make_block(rc, idx)))
				return r;
			*made = true;
		}
	}
	return 0;
}

/* Allocate n contiguous free clusters (refcount 1) at the lowest run. */
static int rc_alloc_run(struct qsm_refcounts *rc, uint64_t n, uint64_t *out)
{
	for (;;) {
		uint64_t c;
		bool made;
		int r = rc_find_run(rc, n, &c);
		if (r)
			return r;
		if ((r = rc_ensure_blocks(rc, c, n, &made)))
			return r;
		if (made)
			continue; /* new blocks may sit in the run: look again */
		for (uint64_t i = c; i < c + n; i++)
			rc_set(rc, i, 1);
		rc_claimed(rc, c, n);
		*out = c;
		return 0;
	}
}

/*
 * Grow the table to cover at least `need` entries: enlarge the arrays and
 * raise the coverage, then allocate the new table's clusters inside it.
 * The old table stays allocated (rc_old) until table_committed.
 */
static int rc_grow_table(struct qsm_refcounts *rc, uint64_t need)
{
	uint64_t epc = rc->rc_cluster_size / 8, epb = rc_epb(rc);
	uint64_t old_e = rc->rc_entries;
	int r;

	if (rc->rc_growing || need > RC_MAX_TABLE_ENTRIES)
		return -EFBIG;
	uint64_t want = QSM_MAX(2 * old_e, need + need / 4 + epc);
	uint64_t new_e = QSM_MIN(QSM_ALIGN_UP(want, epc), RC_MAX_TABLE_ENTRIES);
	uint64_t tcl = new_e / epc;
	/* Bound on the blocks the table's run can need (see rc_alloc_run). */
	uint64_t nblk = 2 * (QSM_DIV_ROUND_UP(tcl, epb) + 2) + 4;
	/* The run starts at or below the old coverage's end (past it all is
	 * free) or the excluded range's end; it and its blocks must fit. */
	uint64_t base = QSM_MAX(old_e << rc->rc_epb_bits, rc->rc_excl_hi);
	uint64_t cover = QSM_MIN(new_e << rc->rc_epb_bits, rc->rc_max_clusters);
	if (new_e < need || base + tcl + nblk > cover)
		return -EFBIG;
	if (rc->rc_nold == rc->rc_old_cap) {
		size_t cap = rc->rc_old_cap ? 2 * rc->rc_old_cap : 4;
		struct rc_old_table *o = realloc(rc->rc_old, cap * sizeof(*o));
		if (!o)
			return -ENOMEM;
		rc->rc_old = o;
		rc->rc_old_cap = cap;
	}
	if ((r = rc_arrays_grow(rc, new_e)) || (r = rc_reserve(rc, nblk)))
		return r;

	uint64_t tc;
	rc->rc_entries = new_e;
	rc->rc_growing = true;
	r = rc_alloc_run(rc, tcl, &tc);
	rc->rc_growing = false;
	if (r) {
		/* Only past the reservation; undo when nothing landed in the
		 * new coverage, else stop everything (sticky). */
		bool clean = true;
		for (uint64_t i = old_e; i < new_e; i++)
			clean &= !rc->rc_blocks[i];
		if (clean)
			rc->rc_entries = old_e;
		else
			rc->rc_broken = true;
		return r;
	}
	rc->rc_old[rc->rc_nold++] = (struct rc_old_table){
		.ot_offset = rc->rc_table_offset,
		.ot_clusters = rc->rc_table_clusters,
	};
	rc->rc_table_offset = tc << rc->rc_cluster_bits;
	rc->rc_table_clusters = (uint32_t)tcl;
	rc->rc_table_moved = true;
	rc->rc_tdirty_lo = rc->rc_tdirty_hi = 0;
	return 0;
}

int qsm_refcount_alloc(struct qsm_refcounts *rc, uint64_t n, uint64_t *offset)
{
	uint64_t c;
	int r;

	if (rc->rc_broken)
		return -EIO;
	if (n == 0)
		return -EINVAL;
	if (n >= rc->rc_max_clusters)
		return -EFBIG;
	if ((r = rc_reserve(rc, QSM_DIV_ROUND_UP(n, rc_epb(rc)) + 3)) == 0)
		r = rc_alloc_run(rc, n, &c);
	rc_pool_trim(rc);
	if (r)
		return r;
	*offset = c << rc->rc_cluster_bits;
	return 0;
}

/* Phase 1 of update: would every refcount of the range stay in [0, max],
 * and would no metadata cluster drop to 0?  Changes nothing. */
static int rc_check_range(const struct qsm_refcounts *rc, uint64_t cluster, uint64_t n,
			  int64_t delta)
{
	uint64_t up = delta > 0 ? (uint64_t)delta : 0;
	uint64_t down = delta < 0 ? (uint64_t)0 - (uint64_t)delta : 0;
	uint64_t end = cluster + n;

	if (up > rc->rc_max)
		return -ERANGE;
	for (uint64_t c = cluster; c < end;) {
		const uint8_t *b = rc_block_of(rc, c);
		if (!b) {
			if (down)
				return -ERANGE;
			/* All 0 up to the range's end: 0 + up fits. */
			c = QSM_MIN(end, ((c >> rc->rc_epb_bits) + 1) << rc->rc_epb_bits);
			continue;
		}
		uint64_t v = rc_block_get(rc->rc_order, b, c & (rc_epb(rc) - 1));
		if (up && v > rc->rc_max - up)
			return -ERANGE;
		if (down && v < down)
			return -ERANGE;
		if (down && v == down && qsm_refcount_is_meta(rc, c))
			return -EINVAL;
		c++;
	}
	return 0;
}

int qsm_refcount_update(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, int64_t delta)
{
	int r;

	if (rc->rc_broken)
		return -EIO;
	if (n == 0 || delta == 0)
		return 0;
	if (cluster >= rc->rc_max_clusters || n > rc->rc_max_clusters - cluster)
		return -EFBIG;
	if ((r = rc_check_range(rc, cluster, n, delta)))
		return r;
	if (delta > 0) {
		bool made;
		if ((r = rc_reserve(rc, QSM_DIV_ROUND_UP(n, rc_epb(rc)) + 3)) == 0) {
			/* New blocks and tables must not land in the range. */
			rc->rc_excl_lo = cluster;
			rc->rc_excl_hi = cluster + n;
			r = rc_ensure_blocks(rc, cluster, n, &made);
			rc->rc_excl_lo = rc->rc_excl_hi = 0;
		}
		rc_pool_trim(rc);
		if (r)
			return r;
	}

	bool zeroed = false;
	for (uint64_t c = cluster; c < cluster + n; c++) {
		uint64_t v = qsm_refcount_get(rc, c) + (uint64_t)delta;
		rc_set(rc, c, v);
		if (v == 0) {
			zeroed = true;
			if (rc->rc_free_byte && rc->rc_free_byte >> rc->rc_cluster_bits == c)
				rc->rc_free_byte = 0; /* never pack into a freed cluster */
			if (c && c < rc->rc_hint)
				rc->rc_hint = c;
		}
	}
	if (delta > 0)
		rc_claimed(rc, cluster, n);
	else if (zeroed && cluster + n >= rc->rc_end)
		rc_recompute_end(rc);
	return 0;
}

int qsm_refcount_alloc_bytes(struct qsm_refcounts *rc, uint64_t size, uint64_t *offset,
			     uint64_t *fresh)
{
	uint64_t cs = rc->rc_cluster_size;
	uint64_t o = rc->rc_free_byte, c;
	int r;

	*fresh = 0;
	if (rc->rc_broken)
		return -EIO;
	if (size == 0 || size > cs)
		return -EINVAL;
	if (o) {
		uint64_t v = qsm_refcount_get(rc, o >> rc->rc_cluster_bits);
		if (v == 0 || v >= rc->rc_max) /* 0: see rc_free_byte; cannot happen */
			o = 0;
	}
	if (!o || cs - (o & (cs - 1)) < size) {
		if ((r = qsm_refcount_alloc(rc, 1, &c)) < 0)
			return r;
		if (o && QSM_ALIGN_UP(o, cs) == c) {
			/* The bytes straddle into the new cluster: the old one
			 * holds their head, so it is referenced once more. */
			if ((r = qsm_refcount_update(rc, o >> rc->rc_cluster_bits, 1, 1)) < 0) {
				(void)qsm_refcount_update(rc, c >> rc->rc_cluster_bits, 1, -1);
				return r;
			}
		} else {
			o = c;
		}
		*fresh = c;
	} else if ((r = qsm_refcount_update(rc, o >> rc->rc_cluster_bits, 1, 1)) < 0) {
		return r;
	}
	*offset = o;
	rc->rc_free_byte = QSM_IS_ALIGNED(o + size, cs) ? 0 : o + size;
	return 0;
}

int qsm_refcount_free_bytes(struct qsm_refcounts *rc, uint64_t offset, uint64_t size)
{
	uint64_t first = offset >> rc->rc_cluster_bits;
	uint64_t last = (offset + size - 1) >> rc->rc_cluster_bits;
	int ret = 0;
	for (uint64_t c = first; c <= last; c++) {
		int r = qsm_refcount_update(rc, c, 1, -1);
		if (r < 0 && !ret)
			ret = r;
	}
	return ret;
}

uint64_t qsm_refcount_image_end(const struct qsm_refcounts *rc)
{
	return rc->rc_end << rc->rc_cluster_bits;
}

void qsm_refcount_table_location(const struct qsm_refcounts *rc, uint64_t *offset,
				 uint32_t *clusters)
{
	*offset = rc->rc_table_offset;
	*clusters = rc->rc_table_clusters;
}

/* --- Write-back -------------------------------------------------------------- */

bool qsm_refcount_dirty(const struct qsm_refcounts *rc)
{
	return rc->rc_ndirty || rc->rc_table_moved || rc->rc_tdirty_lo != rc->rc_tdirty_hi;
}

/* Append table entries [lo, hi) in on-disk form to batch b. */
static int rc_add_table(struct qsm_refcounts *rc, struct qsm_meta_batch *b, uint64_t lo,
			uint64_t hi)
{
	size_t len = (size_t)(hi - lo) * 8;
	uint8_t *buf = malloc(len);
	if (!buf)
		return -ENOMEM;
	for (uint64_t i = lo; i < hi; i++)
		qcow2_put_be64(buf + (i - lo) * 8, rc->rc_table[i]);
	int r = qsm_meta_batch_add(b, rc->rc_table_offset + lo * 8, buf, len,
				   QSM_IO_EV_REFTABLE_UPDATE);
	free(buf);
	return r;
}

static void rc_batch_truncate(struct qsm_meta_batch *b, size_t n)
{
	while (b->n > n)
		free(b->w[--b->n].buf);
}

/*
 * Contract: on success every dirty block is in `blocks` and the dirty part
 * of the table (rounded out to 512 bytes, or all of it when it moved) is in
 * `table`, and everything is clean.  On error (-ENOMEM, -EIO) the batches
 * are as they were and nothing is marked clean.
 */
int qsm_refcount_collect(struct qsm_refcounts *rc, struct qsm_meta_batch *blocks,
			 struct qsm_meta_batch *table, struct qsm_rc_collect *out)
{
	size_t bn = blocks->n, tn = table->n;
	int r = 0;

	if (rc->rc_broken)
		return -EIO;
	for (size_t i = 0; i < rc->rc_ndirty && !r; i++) {
		uint32_t idx = rc->rc_dirty[i];
		/* A new block is written whole (its cluster may hold garbage);
		 * an old one only over its dirty span, in 4 KiB units. */
		uint64_t lo = 0, hi = rc->rc_cluster_size;
		if (!(rc->rc_flags[idx] & RB_NEW)) {
			lo = QSM_ALIGN_DOWN((uint64_t)rc->rc_dlo[idx], 4096);
			hi = QSM_MIN(QSM_ALIGN_UP((uint64_t)rc->rc_dhi[idx], 4096), rc->rc_cluster_size);
		}
		r = qsm_meta_batch_add(blocks, rc->rc_table[idx] + lo, rc->rc_blocks[idx] + lo, hi - lo,
				       (rc->rc_flags[idx] & RB_NEW) ? QSM_IO_EV_REFBLOCK_ALLOC
								    : QSM_IO_EV_REFBLOCK_UPDATE);
	}
	if (!r && rc->rc_table_moved) {
		r = rc_add_table(rc, table, 0, rc->rc_entries);
	} else if (!r && rc->rc_tdirty_lo != rc->rc_tdirty_hi) {
		uint64_t lo = QSM_ALIGN_DOWN(rc->rc_tdirty_lo * 8, 512) / 8;
		uint64_t hi = QSM_MIN(QSM_ALIGN_UP(rc->rc_tdirty_hi * 8, 512) / 8, rc->rc_entries);
		r = rc_add_table(rc, table, lo, hi);
	}
	if (r) {
		rc_batch_truncate(blocks, bn);
		rc_batch_truncate(table, tn);
		return r;
	}

	for (size_t i = 0; i < rc->rc_ndirty; i++)
		rc->rc_flags[rc->rc_dirty[i]] &= (uint8_t)~(RB_DIRTY | RB_NEW);
	rc->rc_ndirty = 0;
	rc->rc_tdirty_lo = rc->rc_tdirty_hi = 0;
	out->generation = ++rc->rc_generation;
	out->table_moved = rc->rc_table_moved;
	if (rc->rc_table_moved) {
		for (size_t i = 0; i < rc->rc_nold; i++)
			if (!rc->rc_old[i].ot_generation)
				rc->rc_old[i].ot_generation = out->generation;
		rc->rc_table_moved = false;
	}
	return 0;
}

int qsm_refcount_table_committed(struct qsm_refcounts *rc, uint64_t generation)
{
	if (rc->rc_broken)
		return -EIO;
	for (size_t i = 0; i < rc->rc_nold;) {
		struct rc_old_table ot = rc->rc_old[i];
		if (!ot.ot_generation || ot.ot_generation > generation) {
			i++;
			continue;
		}
		/* Out of the list first: is_meta must not protect it now. */
		rc->rc_old[i] = rc->rc_old[--rc->rc_nold];
		int r = qsm_refcount_update(rc, ot.ot_offset >> rc->rc_cluster_bits,
					    ot.ot_clusters, -1);
		if (r) {
			rc->rc_old[rc->rc_nold++] = ot;
			return r;
		}
	}
	return 0;
}

/* --- Load and free ----------------------------------------------------------- */

void qsm_refcount_free(struct qsm_refcounts *rc)
{
	if (!rc)
		return;
	for (uint64_t i = 0; i < rc->rc_cap; i++)
		free(rc->rc_blocks[i]);
	for (size_t i = 0; i < rc->rc_pool_n; i++)
		free(rc->rc_pool[i]);
	free(rc->rc_pool);
	free(rc->rc_table);
	free(rc->rc_blocks);
	free(rc->rc_flags);
	free(rc->rc_dlo);
	free(rc->rc_dhi);
	free(rc->rc_dirty);
	free(rc->rc_old);
	free(rc->rc_mset);
	free(rc);
}

/* Validate the table's entries (already in rc_table) and fill rc_mset. */
static int rc_validate_entries(struct qsm_refcounts *rc, uint64_t file_size, char *err,
			       size_t errlen)
{
	uint64_t cs = rc->rc_cluster_size;
	uint64_t t0 = rc->rc_table_offset, t1 = t0 + ((uint64_t)rc->rc_table_clusters << rc->rc_cluster_bits);

	for (uint64_t i = 0; i < rc->rc_entries; i++) {
		uint64_t e = rc->rc_table[i], off = e & QCOW2_REFT_OFFSET_MASK;
		if (e & QCOW2_REFT_RESERVED) {
			qsm_set_err(err, errlen,
			       "refcount table entry %" PRIu64 " (0x%016" PRIx64 ") has reserved bits set",
			       i, e);
			return -EINVAL;
		}
		if (!off)
			continue;
		if (!QSM_IS_ALIGNED(off, cs)) {
			qsm_set_err(err, errlen,
			       "refcount table entry %" PRIu64 " (offset 0x%" PRIx64 ") is not cluster aligned",
			       i, off);
			return -EINVAL;
		}
		if (file_size < cs || off > file_size - cs) {
			qsm_set_err(err, errlen,
			       "refcount block %" PRIu64 " (offset 0x%" PRIx64
			       ") is past the end of the file (size %" PRIu64 ")", i, off, file_size);
			return -EINVAL;
		}
		if (off >= t0 && off < t1) {
			qsm_set_err(err, errlen,
			       "refcount block %" PRIu64 " (offset 0x%" PRIx64 ") overlaps the refcount table",
			       i, off);
			return -EINVAL;
		}
		if (!rc_mset_add(rc, off >> rc->rc_cluster_bits)) {
			qsm_set_err(err, errlen,
			       "refcount block %" PRIu64 " (offset 0x%" PRIx64
			       ") is also another refcount block", i, off);
			return -EINVAL;
		}
	}
	return 0;
}

int qsm_refcount_load(struct qsm_io *io, const struct qsm_rc_params *p, uint64_t file_size,
		      struct qsm_refcounts **out, char *err, size_t errlen)
{
	struct qsm_refcounts *rc = NULL;
	uint8_t *buf = NULL;
	int r;

	*out = NULL;
	if (p->cluster_bits < QCOW2_MIN_CLUSTER_BITS || p->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
		qsm_set_err(err, errlen, "cluster_bits %u is out of range", p->cluster_bits);
		return -EINVAL;
	}
	if (p->refcount_order > 6) {
		qsm_set_err(err, errlen, "refcount_order %u is out of range (0..6)", p->refcount_order);
		return -EINVAL;
	}
	uint64_t cs = 1ull << p->cluster_bits;
	if (p->table_clusters == 0) {
		qsm_set_err(err, errlen, "refcount_table_clusters is 0");
		return -EINVAL;
	}
	if (p->table_clusters > (QCOW2_MAX_REFTABLE_BYTES >> p->cluster_bits)) {
		qsm_set_err(err, errlen, "refcount_table_clusters %u is too large (over %u bytes)",
		       p->table_clusters, QCOW2_MAX_REFTABLE_BYTES);
		return -EINVAL;
	}
	if (!p->table_offset || !QSM_IS_ALIGNED(p->table_offset, cs)) {
		qsm_set_err(err, errlen, "refcount_table_offset 0x%" PRIx64 " is %s", p->table_offset,
		       p->table_offset ? "not cluster aligned" : "zero");
		return -EINVAL;
	}
	uint64_t tbytes = (uint64_t)p->table_clusters << p->cluster_bits;
	if (p->table_offset > file_size || tbytes > file_size - p->table_offset) {
		qsm_set_err(err, errlen,
		       "refcount table (offset 0x%" PRIx64 ", %" PRIu64
		       " bytes) extends past the end of the file (size %" PRIu64 ")",
		       p->table_offset, tbytes, file_size);
		return -EINVAL;
	}

	rc = calloc(1, sizeof(*rc));
	if (!rc)
		return -ENOMEM;
	rc->rc_cluster_bits = p->cluster_bits;
	rc->rc_cluster_size = (size_t)cs;
	rc->rc_order = p->refcount_order;
	rc->rc_epb_bits = p->cluster_bits + 3 - p->refcount_order;
	rc->rc_max = p->refcount_order == 6 ? UINT64_MAX : (1ull << (1u << p->refcount_order)) - 1;
	rc->rc_max_clusters = QSM_MIN(RC_MAX_TABLE_ENTRIES << rc->rc_epb_bits,
				      RC_MAX_HOST_BYTES >> p->cluster_bits);
	rc->rc_table_offset = p->table_offset;
	rc->rc_table_clusters = p->table_clusters;
	rc->rc_hint = 1;

	uint64_t n = tbytes / 8;
	buf = malloc(tbytes);
	if (!buf || rc_arrays_grow(rc, n)) {
		r = -ENOMEM;
		goto fail;
	}
	rc->rc_entries = n;
	if ((r = qsm_io_pread_sync(io, buf, tbytes, p->table_offset))) {
		qsm_set_err(err, errlen, "reading the refcount table at 0x%" PRIx64 ": %s",
		       p->table_offset, strerror(-r));
		goto fail;
	}
	size_t nblocks = 0;
	for (uint64_t i = 0; i < n; i++) {
		rc->rc_table[i] = qcow2_be64(buf + 8 * i);
		nblocks += (rc->rc_table[i] & QCOW2_REFT_OFFSET_MASK) != 0;
	}
	free(buf);
	buf = NULL;
	if ((r = rc_mset_reserve(rc, nblocks)))
		goto fail;
	if ((r = rc_validate_entries(rc, file_size, err, errlen)))
		goto fail;

	for (uint64_t i = 0; i < n; i++) {
		if (!rc->rc_table[i])
			continue;
		if (!(rc->rc_blocks[i] = malloc(cs))) {
			r = -ENOMEM;
			goto fail;
		}
		if ((r = qsm_io_pread_sync_ev(io, rc->rc_blocks[i], cs, rc->rc_table[i],
						 QSM_IO_EV_REFBLOCK_LOAD))) {
			qsm_set_err(err, errlen,
			       "reading refcount block %" PRIu64 " at 0x%" PRIx64 ": %s", i,
			       rc->rc_table[i], strerror(-r));
			goto fail;
		}
	}

	/* A block or table cluster with refcount 0 (a corrupt image): keep the
	 * allocator off them by testing every candidate cluster. */
	for (uint64_t i = 0; i < n; i++)
		if (rc->rc_table[i] && !qsm_refcount_get(rc, rc->rc_table[i] >> p->cluster_bits))
			rc->rc_careful = true;
	for (uint32_t i = 0; i < p->table_clusters; i++)
		if (!qsm_refcount_get(rc, (p->table_offset >> p->cluster_bits) + i))
			rc->rc_careful = true;

	rc->rc_end = n << rc->rc_epb_bits;
	rc_recompute_end(rc);
	uint64_t first;
	if (rc_find_run(rc, 1, &first) == 0) /* sets the hint (R1) */
		rc->rc_hint = first;
	*out = rc;
	return 0;

fail:
	free(buf);
	qsm_refcount_free(rc);
	return r;
}

/* --- Debugging ----------------------------------------------------------------- */

#define RC_CHECK(cond, ...)                                                    \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "qsm_refcount_check: " __VA_ARGS__);   \
			fputc('\n', stderr);                                   \
			return false;                                          \
		}                                                              \
	} while (0)

bool qsm_refcount_check(const struct qsm_refcounts *rc)
{
	uint64_t cb = rc->rc_cluster_bits, nblocks = 0, ndirty = 0;

	RC_CHECK(rc->rc_entries <= rc->rc_cap, "entries %" PRIu64 " > cap", rc->rc_entries);
	RC_CHECK(rc->rc_entries == ((uint64_t)rc->rc_table_clusters << cb) / 8,
		 "entries %" PRIu64 " do not fill %u table clusters", rc->rc_entries,
		 rc->rc_table_clusters);
	for (uint64_t i = 0; i < rc->rc_entries; i++) {
		ndirty += (rc->rc_flags[i] & RB_DIRTY) != 0;
		RC_CHECK(!rc->rc_table[i] == !rc->rc_blocks[i], "entry %" PRIu64 " vs buffer", i);
		RC_CHECK(rc->rc_blocks[i] || !(rc->rc_flags[i] & RB_DIRTY),
			 "missing block %" PRIu64 " is dirty", i);
		if (!rc->rc_blocks[i])
			continue;
		nblocks++;
		uint64_t bc = rc->rc_table[i] >> cb;
		RC_CHECK(qsm_refcount_get(rc, bc) >= 1,
			 "invariant 2: refcount block %" PRIu64 " (cluster %" PRIu64 ") has refcount 0",
			 i, bc);
		RC_CHECK(rc_mset_has(rc, bc), "R3: block cluster %" PRIu64 " not in set", bc);
	}
	RC_CHECK(nblocks == rc->rc_mset_n, "R3: %" PRIu64 " blocks, set has %zu", nblocks,
		 rc->rc_mset_n);
	RC_CHECK(ndirty == rc->rc_ndirty, "R4: %" PRIu64 " dirty flags, list has %zu", ndirty,
		 rc->rc_ndirty);
	for (size_t i = 0; i < rc->rc_ndirty; i++)
		RC_CHECK(rc->rc_flags[rc->rc_dirty[i]] & RB_DIRTY, "R4: list entry %zu", i);
	for (uint32_t i = 0; i < rc->rc_table_clusters; i++)
		RC_CHECK(qsm_refcount_get(rc, (rc->rc_table_offset >> cb) + i) >= 1,
			 "invariant 2: table cluster %u has refcount 0", i);
	for (size_t k = 0; k < rc->rc_nold; k++)
		for (uint32_t i = 0; i < rc->rc_old[k].ot_clusters; i++)
			RC_CHECK(qsm_refcount_get(rc, (rc->rc_old[k].ot_offset >> cb) + i) >= 1,
				 "invariant 3: old table cluster has refcount 0");
	RC_CHECK(rc->rc_hint >= 1, "R1: hint 0");
	for (uint64_t c = 1; c < rc->rc_hint; c++)
		RC_CHECK(qsm_refcount_get(rc, c) || (rc->rc_careful && qsm_refcount_is_meta(rc, c)),
			 "R1: cluster %" PRIu64 " is free below the hint %" PRIu64, c, rc->rc_hint);
	RC_CHECK(rc->rc_end == 0 || qsm_refcount_get(rc, rc->rc_end - 1),
		 "R2: end %" PRIu64 " but its last cluster is free", rc->rc_end);
	for (uint64_t c = rc->rc_end; c < (rc->rc_entries << rc->rc_epb_bits); c++) {
		if (!rc_block_of(rc, c)) {
			c = (((c >> rc->rc_epb_bits) + 1) << rc->rc_epb_bits) - 1;
			continue;
		}
		RC_CHECK(!qsm_refcount_get(rc, c), "R2: cluster %" PRIu64 " used past end %" PRIu64,
			 c, rc->rc_end);
	}
	RC_CHECK(rc->rc_tdirty_lo <= rc->rc_tdirty_hi && rc->rc_tdirty_hi <= rc->rc_entries,
		 "R5: table dirty range");
	return true;
}

void qsm_refcount_dump(const struct qsm_refcounts *rc)
{
	fprintf(stderr,
		"refcounts %p: cluster_bits %u refcount_bits %u entries/block %" PRIu64 "\n"
		"  table 0x%" PRIx64 " (%u clusters, %" PRIu64 " entries)%s dirty [%" PRIu64
		", %" PRIu64 ") generation %" PRIu64 "\n"
		"  hint %" PRIu64 " end %" PRIu64 " dirty blocks %zu pool %zu%s%s\n",
		(const void *)rc, rc->rc_cluster_bits, 1u << rc->rc_order, rc_epb(rc),
		rc->rc_table_offset, rc->rc_table_clusters, rc->rc_entries,
		rc->rc_table_moved ? " MOVED" : "", rc->rc_tdirty_lo, rc->rc_tdirty_hi,
		rc->rc_generation, rc->rc_hint, rc->rc_end, rc->rc_ndirty, rc->rc_pool_n,
		rc->rc_careful ? " CAREFUL" : "", rc->rc_broken ? " BROKEN" : "");
	for (size_t k = 0; k < rc->rc_nold; k++)
		fprintf(stderr, "  old table 0x%" PRIx64 " (%u clusters) generation %" PRIu64 "\n",
			rc->rc_old[k].ot_offset, rc->rc_old[k].ot_clusters,
			rc->rc_old[k].ot_generation);
	for (uint64_t i = 0; i < rc->rc_entries; i++) {
		if (!rc->rc_blocks[i])
			continue;
		uint64_t used = 0, first = i << rc->rc_epb_bits;
		for (uint64_t s = 0; s < rc_epb(rc); s++)
			used += rc_block_get(rc->rc_order, rc->rc_blocks[i], s) != 0;
		fprintf(stderr, "  block %" PRIu64 " at 0x%" PRIx64 " clusters %" PRIu64 "..%" PRIu64
			": %" PRIu64 " used%s%s\n", i, rc->rc_table[i], first,
			first + rc_epb(rc) - 1, used,
			(rc->rc_flags[i] & RB_DIRTY) ? " dirty" : "",
			(rc->rc_flags[i] & RB_NEW) ? " new" : "");
	}
}
