/*
 * metadata/refcount.c: refcounts through a bounded block cache, and the
 * cluster allocator.
 *
 * Representation.  The reftable is an array of host-order block offsets
 * (rc_table, rc_entries of them: the table's full capacity, so the table's
 * clusters hold exactly rc_entries entries).  Beside each entry: rc_res[i],
 * block i's cache entry when resident (its buffer in on-disk big-endian
 * form), and rc_free[i], the number of zero refcounts in block i once it has
 * been seen (RC_FREE_UNKNOWN before).  Widths below 8 bits pack LSB-first in
 * each byte (QEMU's get_refcount_ro0..2: the refcount of slot s lives in
 * byte s / (8 / bits) at bit (s % (8 / bits)) * bits); 8..64 bits are
 * big-endian integers.  A cluster's refcount is 0 when its table entry is 0
 * ("missing" block) or it lies past the table's coverage.
 *
 * Life of a cache entry (struct qsm_rc_block):
 *
 *   (miss) --async--> LOADING --read done--> READY --evict--> (gone)
 *      \--blocking read----------------------^  |
 *                           LOADING --read failed--> gone (waiters: -errno)
 *   READY with ref 0, not dirty, not busy  ==  on the LRU list  ==  evictable
 *
 * ref counts the waiters the block is pinned for (metadata/refcount.h).
 * Nothing is evicted inside a public call (rc_op_end trims afterwards), so
 * a call may keep plain pointers to every block it touched.
 *
 * Invariants (beyond those of refcount.h; qsm_refcount_check() tests them):
 *  R1. rc_hint >= 1 is QEMU's allocation cursor (free_cluster_index): an
 *      allocation takes the lowest run of free clusters at or above it and
 *      leaves it just past the run (so clusters below it may be free: holes
 *      too small for a run it passed, or left by a refcount block placed
 *      past its run, as QEMU leaves them); it is lowered when a refcount
 *      drops to 0 below it, and raised by scans over used clusters (which
 *      changes no scan's answer).  Appending at the end is O(1).
 *  R2. rc_end > the last cluster with a nonzero refcount; when rc_end_exact,
 *      rc_end - 1 has one.  Frees made with a waiter lower it only across
 *      blocks that are resident or summarized (rc_free == all free).
 *  R3. rc_mset holds exactly the clusters of the present refcount blocks;
 *      with the table's range and rc_old it answers is_meta in O(1).
 *  R4. A block is on the rc_dirty list iff RB_DIRTY is set; RB_NEW marks
 *      blocks never collected (written as REFBLOCK_ALLOC).  Dirty blocks are
 *      resident.  rb_busy (on the rc_busy list) is the generation of the
 *      collect whose write is in flight.
 *  R5. Entries [rc_tdirty_lo, rc_tdirty_hi) of the table changed since the
 *      last collect; rc_table_moved means the whole table is new and lives
 *      at rc_table_offset, while the tables it replaced sit in rc_old, still
 *      counted, until qsm_refcount_table_committed() for the generation of
 *      the collect that wrote their replacement.
 *  R6. Refcount blocks and table clusters (current and old) never drop to
 *      refcount 0 through qsm_refcount_update() (-EINVAL): the allocator
 *      would otherwise hand out a cluster holding live metadata.
 *  R7. rc_free[i], when known, is the number of zero slots of block i.
 *  R9. An entry whose offset is not cluster aligned (QEMU opens such an
 *      image) is kept as read, and an entry QEMU would read as zeros or
 *      that the owner found wanting (RC_DAMAGED: a block past the end of the
 *      file, every entry of a table at offset 0 or past the end, an entry
 *      marked by qsm_refcount_mark_damaged) holds that sentinel: such an
 *      entry is never read, written or counted as metadata; rc_get() of it fails with -EUCLEAN (recording the index in
 *      rc_bad_hit), so whatever needs that block fails and the owner marks
 *      the image corrupt (qsm_refcount_bad_entry), as QEMU does at use.
 *      rc_free and rc_runs stay unknown for it, so no scan crosses it unread.
 *  R8. rc_runs[i], when known (rs_pre != RC_FREE_UNKNOWN), describes the
 *      on-disk block i while it is not resident: its free clusters (refcount
 *      0, not cluster 0) at the start (rs_pre), at the end (rs_suf), and in
 *      its longest run (rs_max).  Set when the block is evicted (it is clean
 *      then: what was computed is what the disk holds), forgotten while it
 *      is resident (the scan reads the block itself).  A block known to be
 *      all free (rc_free == entries per block) that is not resident is all
 *      zero bytes on disk: rc_get() makes it resident without reading.
 *
 * Allocation.  rc_find_run() scans from the hint for n free clusters,
 * skipping whole ranges whose block is missing (all free), blocks known to
 * be full (rc_free 0: not read at all) and the coverage's end (free up to
 * the format's limit).  A block that is not resident but summarized (R8) is
 * crossed unread too: its prefix ends or continues the run, its suffix
 * starts the next one, and only a block whose longest run could hold the
 * whole request must be read (the run may start inside it).  Other blocks
 * must be resident, and the scan returns -EAGAIN (or reads synchronously)
 * for one that is not.  So a scan reads at most the block it starts in and
 * the one it ends in, however fragmented the image: with a cache smaller
 * than the blocks a scan crosses, reading every one of them would evict
 * the first before the last arrived and the scan would never end.  The run
 * found is then made resident (rc_resident(): its first and last blocks,
 * its middle ones being all free and so made without a read) before it is
 * claimed.  Before a run is
 * claimed every range it touches must have a block: a missing block is
 * created at the first free cluster past the run (QEMU's cursor then;
 * qsm_refcount_alloc_at: from the cursor), and when that cluster's own range has
 * no block either the new block is for that range and counts itself (QEMU's
 * self-describing refblock), so the loop makes progress and never recurses.
 * A run beyond the table's coverage grows the table: the in-memory arrays
 * are enlarged and the coverage raised *first*, then the new table's
 * clusters are allocated inside the new coverage, past the old one (where
 * every range is missing: no block need be read, so the growth never waits);
 * the size is chosen so that they fit; rc_growing forbids a nested growth.
 *
 * Damaged images.  A refcount block or table cluster whose own refcount is 0
 * would be handed out by the allocator.  rc_careful (test is_meta per
 * cluster, no range skips) is set at load when such a cluster's block is
 * missing, and when a block read later shows one at 0.
 *
 * Errors.  Public mutators check -ERANGE/-EINVAL/-EFBIG and reserve memory
 * (spare blocks in rc_pool, room in rc_mset) before changing anything, and
 * return -EAGAIN before changing anything too (every block a change needs is
 * read first).  The requested change itself is all-or-nothing.  Only an
 * -ENOMEM beyond the reservation, or an -EAGAIN, can leave extra refcount
 * blocks created on the way; they are consistent metadata (they count
 * themselves and are written back like any new block).  A failure in the
 * middle of a table growth that cannot be undone sets rc_broken: every later
 * mutator and collect then fails with -EIO (the engine's sticky error state).
 */
#include "metadata/refcount.h" /* first: io/util.h needs struct iovec */

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/qcow2.h"

#define RB_DIRTY 0x1
#define RB_NEW 0x2
#define RB_LOADING 0x4

#define RC_FREE_UNKNOWN UINT32_MAX
#define RC_DEFAULT_CACHE_BLOCKS 4 /* QEMU: 4 clusters (docs/qcow2-cache.txt) */

#define RC_MAX_TABLE_ENTRIES ((uint64_t)QCOW2_MAX_REFTABLE_BYTES / 8)
/* Host offsets must fit the 56-bit offset fields of L1/L2 entries. */
#define RC_MAX_HOST_BYTES (1ull << 56)

struct qsm_rc_block {
	uint64_t rb_idx;            /* table index */
	uint8_t *rb_data;           /* cluster_size bytes, on-disk form */
	unsigned rb_ref;            /* waiters it is pinned for */
	uint8_t rb_flags;           /* RB_* */
	uint32_t rb_dlo, rb_dhi;    /* dirty byte range while RB_DIRTY */
	uint64_t rb_busy;           /* R4 */
	struct qsm_rc_block *rb_prev, *rb_next;   /* LRU list */
	struct qsm_rc_block *rb_dnext, *rb_bnext; /* dirty, busy lists */
	struct qsm_rc_waiter *rb_waiters;         /* LOADING */
	uint64_t rb_loader;
	struct qsm_refcounts *rb_rc;
	struct qsm_io_req rb_io;
	struct iovec rb_iov;
};

struct rc_old_table {
	uint64_t ot_offset;
	uint32_t ot_clusters;
	uint64_t ot_generation;     /* 0 until a collect wrote the replacement */
};

struct qsm_refcounts {
	struct qsm_io *rc_io;

	/* Geometry. */
	unsigned rc_cluster_bits;
	size_t rc_cluster_size;
	unsigned rc_order;          /* refcount_bits = 1 << rc_order */
	unsigned rc_epb_bits;       /* log2 of entries per block */
	uint64_t rc_max;            /* largest refcount */
	uint64_t rc_max_clusters;   /* no cluster index reaches this */

	/* The table, the summary and the resident blocks. */
	uint64_t rc_table_offset;
	uint32_t rc_table_clusters;
	uint64_t rc_entries;        /* table capacity = coverage in blocks */
	uint64_t rc_cap;            /* allocated length of the arrays below */
	uint64_t *rc_table;         /* block offsets, host order, 0 = none */
	struct qsm_rc_block **rc_res; /* resident entry, or NULL */
	uint32_t *rc_free;          /* R7 */
	struct rc_runs {
		uint32_t rs_pre, rs_suf, rs_max;
	} *rc_runs;                 /* R8 */
	struct qsm_rc_block *rc_dirty; /* R4 */
	size_t rc_ndirty;
	struct qsm_rc_block *rc_busy;
	uint64_t rc_tdirty_lo, rc_tdirty_hi; /* dirty entries, lo == hi: none */
	bool rc_table_moved;
	uint64_t rc_generation;     /* of the last collect */

	/* The cache. */
	size_t rc_capacity, rc_nres;
	unsigned rc_loading;        /* reads in flight */
	struct qsm_rc_block rc_lru; /* sentinel; rc_lru.rb_next is the oldest */
	void (*rc_wb_hook)(void *opaque);
	void *rc_wb_opaque;
	uint64_t rc_hits, rc_misses, rc_evictions, rc_loads;

	struct rc_old_table *rc_old;
	size_t rc_nold, rc_old_cap;

	/* Set of refcount block clusters (open addressing, 0 = empty slot). */
	uint64_t *rc_mset;
	size_t rc_mset_cap, rc_mset_n;

	/* Allocator. */
	uint64_t rc_hint;           /* R1 */
	uint64_t rc_end;            /* R2, in clusters */
	bool rc_end_exact;
	uint64_t rc_excl_lo, rc_excl_hi; /* never hand out (update's range) */
	bool rc_careful;            /* see "Damaged images" */
	uint64_t rc_bad_hit;        /* index + 1 of the last unaligned entry used, 0 none */
	bool rc_damaged;            /* some entry is RC_DAMAGED (R9) */
	bool rc_growing;
	bool rc_broken;
	/* Packing point of compressed clusters (qsm_refcount_alloc_bytes):
	 * a byte offset inside a cluster with refcount > 0, or 0 = none. */
	uint64_t rc_free_byte;

	/* Spare blocks (their buffers zeroed on take). */
	struct qsm_rc_block **rc_pool;
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

static inline uint64_t rc_slot(const struct qsm_refcounts *rc, uint64_t c)
{
	return c & (rc_epb(rc) - 1);
}

/* R9: the in-memory entry of a block that is never read (bit 0: a reserved
 * bit, which load drops from what it reads, so no disk entry is this). */
#define RC_DAMAGED 1ull

/* R9: entry idx names an unaligned block offset, or is RC_DAMAGED. */
static inline bool rc_bad(const struct qsm_refcounts *rc, uint64_t idx)
{
	return idx < rc->rc_entries &&
	       (rc->rc_table[idx] == RC_DAMAGED ||
		(rc->rc_table[idx] & QCOW2_REFT_OFFSET_MASK & (rc->rc_cluster_size - 1)) != 0);
}

static inline bool rc_exists(const struct qsm_refcounts *rc, uint64_t idx)
{
	return idx < rc->rc_entries && rc->rc_table[idx] != 0;
}

static uint32_t rc_count_free(const struct qsm_refcounts *rc, const uint8_t *data)
{
	uint64_t n = 0, epb = rc_epb(rc);
	if (rc->rc_order >= 3) {
		size_t w = (size_t)1 << (rc->rc_order - 3);
		for (uint64_t s = 0; s < epb; s++) {
			const uint8_t *p = data + s * w;
			bool zero = true;
			for (size_t k = 0; k < w; k++)
				zero &= p[k] == 0;
			n += zero;
		}
	} else {
		for (uint64_t s = 0; s < epb; s++)
			n += rc_block_get(rc->rc_order, data, s) == 0;
	}
	return (uint32_t)n;
}

/* --- The block cache -------------------------------------------------------- */

static bool rb_evictable(const struct qsm_rc_block *b)
{
	return !(b->rb_flags & (RB_DIRTY | RB_LOADING)) && b->rb_ref == 0 && b->rb_busy == 0;
}

static bool rb_on_lru(const struct qsm_rc_block *b)
{
	return b->rb_next != NULL;
}

static void rb_lru_remove(struct qsm_rc_block *b)
{
	if (!rb_on_lru(b))
		return;
	b->rb_prev->rb_next = b->rb_next;
	b->rb_next->rb_prev = b->rb_prev;
	b->rb_prev = b->rb_next = NULL;
}

static void rb_lru_append(struct qsm_refcounts *rc, struct qsm_rc_block *b)
{
	b->rb_prev = rc->rc_lru.rb_prev;
	b->rb_next = &rc->rc_lru;
	rc->rc_lru.rb_prev->rb_next = b;
	rc->rc_lru.rb_prev = b;
}

/* Put b on or off the LRU list as rb_evictable says. */
static void rb_lru_sync(struct qsm_refcounts *rc, struct qsm_rc_block *b)
{
	if (rb_evictable(b) && !rb_on_lru(b))
		rb_lru_append(rc, b);
	else if (!rb_evictable(b))
		rb_lru_remove(b);
}

static void rb_free(struct qsm_rc_block *b)
{
	if (b) {
		free(b->rb_data);
		free(b);
	}
}

static struct qsm_rc_block *rb_new(const struct qsm_refcounts *rc)
{
	struct qsm_rc_block *b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	/* 4 KiB aligned: the block may be read and written with O_DIRECT. */
	if (posix_memalign((void **)&b->rb_data, 4096, rc->rc_cluster_size)) {
		free(b);
		return NULL;
	}
	return b;
}

/* Make b the resident entry of table index idx. */
static void rb_install(struct qsm_refcounts *rc, struct qsm_rc_block *b, uint64_t idx)
{
	assert(!rc->rc_res[idx]);
	b->rb_idx = idx;
	b->rb_rc = rc;
	rc->rc_res[idx] = b;
	rc->rc_nres++;
	rc->rc_runs[idx].rs_pre = RC_FREE_UNKNOWN; /* R8: the block speaks now */
}

/* R8 for block b's current content.  A slot is free when its refcount is 0,
 * except cluster 0 (the header), which is never handed out. */
static void rc_summarize(struct qsm_refcounts *rc, const struct qsm_rc_block *b)
{
	uint64_t epb = rc_epb(rc), run = 0, max = 0, pre = 0;
	bool in_pre = true;
	for (uint64_t s = 0; s < epb; s++) {
		bool free = rc_block_get(rc->rc_order, b->rb_data, s) == 0 &&
			    (b->rb_idx != 0 || s != 0);
		if (free) {
			run++;
			max = QSM_MAX(max, run);
		} else {
			if (in_pre)
				pre = run;
			in_pre = false;
			run = 0;
		}
	}
	if (in_pre)
		pre = run;
	rc->rc_runs[b->rb_idx] = (struct rc_runs){
		.rs_pre = (uint32_t)pre, .rs_suf = (uint32_t)run, .rs_max = (uint32_t)max,
	};
}

static void rb_evict(struct qsm_refcounts *rc, struct qsm_rc_block *b)
{
	assert(rb_evictable(b));
	rc_summarize(rc, b);
	rb_lru_remove(b);
	rc->rc_res[b->rb_idx] = NULL;
	rc->rc_nres--;
	rc->rc_evictions++;
	rb_free(b);
}

/* Back to the capacity by evicting the oldest evictable blocks; ask the
 * owner for a write-back when dirty blocks keep the cache over it. */
static void rc_trim(struct qsm_refcounts *rc)
{
	while (rc->rc_nres > rc->rc_capacity && rc->rc_lru.rb_next != &rc->rc_lru)
		rb_evict(rc, rc->rc_lru.rb_next);
	if (rc->rc_nres > rc->rc_capacity && rc->rc_ndirty && rc->rc_wb_hook)
		rc->rc_wb_hook(rc->rc_wb_opaque);
}

static struct qsm_rc_block **rc_pins(struct qsm_rc_waiter *w)
{
	return w->pins_heap ? w->pins_heap : w->pins_inline;
}

/* Pin b for w (see struct qsm_rc_waiter): the array grows; only when it
 * cannot does the oldest pin go. */
static void rc_pin(struct qsm_refcounts *rc, struct qsm_rc_block *b, struct qsm_rc_waiter *w)
{
	unsigned cap = w->pins_heap ? w->npins_cap : QSM_RC_PINS;
	if (w->npins == cap) {
		struct qsm_rc_block **p = NULL;
		if (cap <= UINT_MAX / 4)
			p = realloc(w->pins_heap, 2 * (size_t)cap * sizeof(*p));
		if (p) {
			if (!w->pins_heap)
				memcpy(p, w->pins_inline, sizeof(w->pins_inline));
			w->pins_heap = p;
			w->npins_cap = 2 * cap;
		} else {
			struct qsm_rc_block **pins = rc_pins(w), *old = pins[0];
			memmove(pins, pins + 1, (cap - 1) * sizeof(pins[0]));
			w->npins--;
			old->rb_ref--;
			rb_lru_sync(rc, old);
		}
	}
	b->rb_ref++;
	rb_lru_remove(b);
	rc_pins(w)[w->npins++] = b;
}

static void rc_unpin(struct qsm_refcounts *rc, struct qsm_rc_waiter *w)
{
	struct qsm_rc_block **pins = rc_pins(w);
	for (unsigned i = 0; i < w->npins; i++) {
		struct qsm_rc_block *b = pins[i];
		assert(b->rb_ref > 0);
		b->rb_ref--;
		rb_lru_sync(rc, b);
	}
	w->npins = 0;
	free(w->pins_heap);
	w->pins_heap = NULL;
	w->npins_cap = 0;
}

void qsm_refcount_unpin(struct qsm_refcounts *rc, struct qsm_rc_waiter *w)
{
	if (!rc || (!w->npins && !w->pins_heap))
		return;
	rc_unpin(rc, w);
	rc_trim(rc);
}

static void rc_careful_scan(struct qsm_refcounts *rc, const struct qsm_rc_block *b);

/* A block just became readable (loaded, or read synchronously). */
static void rc_loaded(struct qsm_refcounts *rc, struct qsm_rc_block *b)
{
	rc->rc_free[b->rb_idx] = rc_count_free(rc, b->rb_data);
	rc->rc_loads++;
	if (!rc->rc_careful)
		rc_careful_scan(rc, b);
}

static void rb_load_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_rc_block *b = container_of(io, struct qsm_rc_block, rb_io);
	struct qsm_refcounts *rc = b->rb_rc;
	struct qsm_rc_waiter *w = b->rb_waiters;

	b->rb_waiters = NULL;
	b->rb_flags &= (uint8_t)~RB_LOADING;
	rc->rc_loading--;
	if (ret < 0) {
		rc->rc_res[b->rb_idx] = NULL;
		rc->rc_nres--;
		rb_free(b);
		while (w) {
			struct qsm_rc_waiter *next = w->next;
			w->fn(w, ret);
			w = next;
		}
		return;
	}
	rc_loaded(rc, b);
	while (w) {
		struct qsm_rc_waiter *next = w->next;
		rc_pin(rc, b, w);
		w->fn(w, 0);
		w = next;
	}
	rb_lru_sync(rc, b);
	rc_trim(rc);
}

/*
 * The resident block of existing table entry idx.  Not cached: with w, start
 * (or join) its read and fail with -EAGAIN; without, read it now.  NULL with
 * *err set on failure.
 */
static struct qsm_rc_block *rc_get(struct qsm_refcounts *rc, uint64_t idx,
				   struct qsm_rc_waiter *w, int *err)
{
	struct qsm_rc_block *b = rc->rc_res[idx];
	assert(rc_exists(rc, idx));
	if (rc_bad(rc, idx)) { /* R9 */
		rc->rc_bad_hit = idx + 1;
		*err = -EUCLEAN;
		return NULL;
	}
	if (b && !(b->rb_flags & RB_LOADING)) {
		rc->rc_hits++;
		if (rb_on_lru(b)) { /* most recently used */
			rb_lru_remove(b);
			rb_lru_append(rc, b);
		}
		return b;
	}
	if (b) {
		/* Being read: join.  A blocking caller never meets one (reads
		 * are asynchronous only while requests run, blocking callers
		 * only when none does). */
		if (!w) {
			*err = -EBUSY;
			return NULL;
		}
		w->waiting_on = b->rb_loader;
		w->next = b->rb_waiters;
		b->rb_waiters = w;
		*err = -EAGAIN;
		return NULL;
	}
	if (!(b = rb_new(rc))) {
		*err = -ENOMEM;
		return NULL;
	}
	if (rc->rc_free[idx] == rc_epb(rc)) {
		/* All free and not resident: all zero on disk (R8). */
		memset(b->rb_data, 0, rc->rc_cluster_size);
		rb_install(rc, b, idx);
		if (!rc->rc_careful)
			rc_careful_scan(rc, b);
		rb_lru_sync(rc, b);
		return b;
	}
	rc->rc_misses++;
	if (!w) {
		int r = qsm_io_pread_sync_ev(rc->rc_io, b->rb_data, rc->rc_cluster_size,
					     rc->rc_table[idx], QSM_IO_EV_REFBLOCK_LOAD);
		if (r < 0) {
			rb_free(b);
			*err = r;
			return NULL;
		}
		rb_install(rc, b, idx);
		rc_loaded(rc, b);
		rb_lru_sync(rc, b);
		return b;
	}
	rb_install(rc, b, idx);
	b->rb_flags = RB_LOADING;
	b->rb_loader = w->tag;
	w->waiting_on = w->tag;
	w->next = NULL;
	b->rb_waiters = w;
	rc->rc_loading++;
	b->rb_iov = (struct iovec){ b->rb_data, rc->rc_cluster_size };
	b->rb_io = (struct qsm_io_req){
		.op = QSM_IO_READ,
		.event = QSM_IO_EV_REFBLOCK_LOAD,
		.offset = rc->rc_table[idx],
		.len = rc->rc_cluster_size,
		.iov = &b->rb_iov,
		.iovcnt = 1,
		.cb = rb_load_cb,
	};
	qsm_io_submit(rc->rc_io, &b->rb_io);
	*err = -EAGAIN;
	return NULL;
}

/* The block holding cluster c, which this call has already made resident. */
static struct qsm_rc_block *rc_block_at(const struct qsm_refcounts *rc, uint64_t c)
{
	struct qsm_rc_block *b = rc->rc_res[c >> rc->rc_epb_bits];
	assert(b && !(b->rb_flags & RB_LOADING));
	return b;
}

/* End of a public call: give back spare memory, and evict down to the
 * capacity (w's pins stay until qsm_refcount_unpin). */
#define RC_POOL_KEEP 8
static int rc_op_end(struct qsm_refcounts *rc, struct qsm_rc_waiter *w, int r)
{
	(void)w;
	while (rc->rc_pool_n > RC_POOL_KEEP)
		rb_free(rc->rc_pool[--rc->rc_pool_n]);
	rc_trim(rc);
	return r;
}

void qsm_refcount_set_writeback_hook(struct qsm_refcounts *rc, void (*fn)(void *), void *opaque)
{
	rc->rc_wb_hook = fn;
	rc->rc_wb_opaque = opaque;
}

/* Refcount of cluster c, reading its block if needed. */
static int rc_read(struct qsm_refcounts *rc, uint64_t c, uint64_t *v, struct qsm_rc_waiter *w)
{
	uint64_t idx = c >> rc->rc_epb_bits;
	int err;
	if (!rc_exists(rc, idx)) {
		*v = 0;
		return 0;
	}
	struct qsm_rc_block *b = rc_get(rc, idx, w, &err);
	if (!b)
		return err;
	*v = rc_block_get(rc->rc_order, b->rb_data, rc_slot(rc, c));
	return 0;
}

int qsm_refcount_read(struct qsm_refcounts *rc, uint64_t cluster, uint64_t *value,
		      struct qsm_rc_waiter *w)
{
	return rc_op_end(rc, w, rc_read(rc, cluster, value, w));
}

uint64_t qsm_refcount_get(struct qsm_refcounts *rc, uint64_t cluster)
{
	uint64_t v = 0;
	return qsm_refcount_read(rc, cluster, &v, NULL) < 0 ? 0 : v;
}

bool qsm_refcount_peek(const struct qsm_refcounts *rc, uint64_t cluster, uint64_t *value)
{
	uint64_t idx = cluster >> rc->rc_epb_bits;
	const struct qsm_rc_block *b;
	*value = 0;
	if (!rc_exists(rc, idx))
		return true;
	if (!(b = rc->rc_res[idx]) || (b->rb_flags & RB_LOADING))
		return false;
	*value = rc_block_get(rc->rc_order, b->rb_data, rc_slot(rc, cluster));
	return true;
}

uint64_t qsm_refcount_max(const struct qsm_refcounts *rc)
{
	return rc->rc_max;
}

/* Mark bytes [lo, hi) of block b dirty: write-back writes only the dirty
 * span of a block (rounded to 4 KiB), not the whole cluster. */
static void rc_mark_dirty_bytes(struct qsm_refcounts *rc, struct qsm_rc_block *b, uint32_t lo,
				uint32_t hi)
{
	if (!(b->rb_flags & RB_DIRTY)) {
		b->rb_flags |= RB_DIRTY;
		b->rb_dnext = rc->rc_dirty;
		rc->rc_dirty = b;
		rc->rc_ndirty++;
		b->rb_dlo = lo;
		b->rb_dhi = hi;
		rb_lru_remove(b);
		return;
	}
	b->rb_dlo = QSM_MIN(b->rb_dlo, lo);
	b->rb_dhi = QSM_MAX(b->rb_dhi, hi);
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

/* Set cluster c's refcount in its (resident) block b.  Marks it dirty and
 * keeps the block's free count (R7). */
static void rc_set(struct qsm_refcounts *rc, struct qsm_rc_block *b, uint64_t c, uint64_t v)
{
	uint64_t slot = rc_slot(rc, c);
	uint64_t old = rc_block_get(rc->rc_order, b->rb_data, slot);
	rc_block_set(rc->rc_order, b->rb_data, slot, v);
	if (!old != !v)
		rc->rc_free[b->rb_idx] += v ? (uint32_t)-1 : 1u;
	uint64_t bit = slot << rc->rc_order;
	rc_mark_dirty_bytes(rc, b, (uint32_t)(bit / 8),
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

/* Block b was just read: does it give a metadata cluster refcount 0? */
static void rc_careful_scan(struct qsm_refcounts *rc, const struct qsm_rc_block *b)
{
	uint64_t lo = b->rb_idx << rc->rc_epb_bits, hi = lo + rc_epb(rc);
	unsigned cb = rc->rc_cluster_bits;
#define RC_ZERO_AT(c) (!rc_block_get(rc->rc_order, b->rb_data, rc_slot(rc, (c))))
	for (uint64_t i = 0; i < rc->rc_entries && !rc->rc_careful; i++) {
		uint64_t c = rc->rc_table[i] >> cb;
		if (rc->rc_table[i] && !rc_bad(rc, i) && c >= lo && c < hi && RC_ZERO_AT(c))
			rc->rc_careful = true;
	}
	for (size_t k = 0; k <= rc->rc_nold && !rc->rc_careful; k++) {
		uint64_t t = (k < rc->rc_nold ? rc->rc_old[k].ot_offset : rc->rc_table_offset) >> cb;
		uint64_t n = k < rc->rc_nold ? rc->rc_old[k].ot_clusters : rc->rc_table_clusters;
		for (uint64_t c = QSM_MAX(t, lo); c < QSM_MIN(t + n, hi); c++)
			if (RC_ZERO_AT(c))
				rc->rc_careful = true;
	}
#undef RC_ZERO_AT
}

/* --- Memory reservation ---------------------------------------------------- */

/* Have at least k spare blocks and room for k blocks in rc_mset. */
static int rc_reserve(struct qsm_refcounts *rc, size_t k)
{
	if (rc_mset_reserve(rc, k))
		return -ENOMEM;
	if (k > rc->rc_pool_cap) {
		struct qsm_rc_block **p = realloc(rc->rc_pool, k * sizeof(*p));
		if (!p)
			return -ENOMEM;
		rc->rc_pool = p;
		rc->rc_pool_cap = k;
	}
	while (rc->rc_pool_n < k) {
		struct qsm_rc_block *b = rb_new(rc);
		if (!b)
			return -ENOMEM;
		rc->rc_pool[rc->rc_pool_n++] = b;
	}
	return 0;
}

/* A zeroed block, from the pool when it has one. */
static struct qsm_rc_block *rc_take_block(struct qsm_refcounts *rc)
{
	struct qsm_rc_block *b = rc->rc_pool_n ? rc->rc_pool[--rc->rc_pool_n] : rb_new(rc);
	if (b)
		memset(b->rb_data, 0, rc->rc_cluster_size);
	return b;
}

/* Enlarge the per-entry arrays to hold n entries (zeroed; summary unknown).
 * Changes no visible state: rc_entries stays.  0 or -ENOMEM. */
static int rc_arrays_grow(struct qsm_refcounts *rc, uint64_t n)
{
	if (n <= rc->rc_cap)
		return 0;
	uint64_t *t = realloc(rc->rc_table, n * sizeof(*t));
	if (!t)
		return -ENOMEM;
	rc->rc_table = t;
	struct qsm_rc_block **r = realloc(rc->rc_res, n * sizeof(*r));
	if (!r)
		return -ENOMEM;
	rc->rc_res = r;
	uint32_t *f = realloc(rc->rc_free, n * sizeof(*f));
	if (!f)
		return -ENOMEM;
	rc->rc_free = f;
	struct rc_runs *rs = realloc(rc->rc_runs, n * sizeof(*rs));
	if (!rs)
		return -ENOMEM;
	rc->rc_runs = rs;
	uint64_t o = rc->rc_cap;
	memset(rc->rc_table + o, 0, (n - o) * sizeof(*t));
	memset(rc->rc_res + o, 0, (n - o) * sizeof(*r));
	for (uint64_t i = o; i < n; i++) {
		rc->rc_free[i] = RC_FREE_UNKNOWN;
		rc->rc_runs[i].rs_pre = RC_FREE_UNKNOWN;
	}
	rc->rc_cap = n;
	return 0;
}

/* --- Allocator -------------------------------------------------------------- */

/* Clusters [c, c+n) just became nonzero: keep R1 and R2. */
static void rc_claimed(struct qsm_refcounts *rc, uint64_t c, uint64_t n)
{
	if (rc->rc_hint >= c && rc->rc_hint < c + n)
		rc->rc_hint = c + n;
	if (c + n >= rc->rc_end) {
		rc->rc_end = c + n;
		rc->rc_end_exact = true;
	}
}

/*
 * Recompute rc_end downwards after refcounts dropped to 0 at its top.  With
 * a waiter it stops at a block that is neither resident nor known empty
 * (rc_end then stays an upper bound, R2); without, it reads such blocks.
 */
static void rc_recompute_end(struct qsm_refcounts *rc, struct qsm_rc_waiter *w)
{
	uint64_t c = rc->rc_end;
	bool exact = true;
	while (c > 0) {
		uint64_t idx = (c - 1) >> rc->rc_epb_bits, lo = idx << rc->rc_epb_bits;
		if (!rc_exists(rc, idx) || rc->rc_free[idx] == rc_epb(rc)) {
			c = lo;
			continue;
		}
		struct qsm_rc_block *b = rc->rc_res[idx];
		int err;
		if (b && (b->rb_flags & RB_LOADING))
			b = NULL;
		if (!b && !w)
			b = rc_get(rc, idx, NULL, &err);
		if (!b) {
			exact = false;
			break;
		}
		while (c > lo && !rc_block_get(rc->rc_order, b->rb_data, rc_slot(rc, c - 1)))
			c--;
		if (c > lo)
			break;
	}
	rc->rc_end = c;
	rc->rc_end_exact = exact;
}

/*
 * The scan of rc_find_run() at the start of block idx (cluster *c, a free
 * run of *run clusters ending there): cross the block by its summary when
 * it is not resident and summarized (R8), the excluded range is not in it,
 * and the run cannot start inside it (rs_max < n), so that its contents
 * would not change the answer.  Returns false when the block must be read.
 */
static bool rc_cross_summarized(struct qsm_refcounts *rc, uint64_t idx, uint64_t n,
				uint64_t *c, uint64_t *run, bool *seen_free)
{
	uint64_t lo = idx << rc->rc_epb_bits, epb = rc_epb(rc);
	const struct rc_runs *rs = &rc->rc_runs[idx];
	if (*c != lo || rc->rc_res[idx] || rs->rs_pre == RC_FREE_UNKNOWN || rc->rc_careful ||
	    (rc->rc_excl_hi > lo && rc->rc_excl_lo < lo + epb))
		return false;
	if (*run + rs->rs_pre >= n) {
		/* The run ends in the prefix (or the block is all free). */
		*c += n - *run;
		*run = n;
		*seen_free = true;
		return true;
	}
	if (rs->rs_pre == epb) {
		*c += epb;
		*run += epb;
		*seen_free = true;
		return true;
	}
	if (rs->rs_max >= n)
		return false; /* the lowest run may lie inside: read it */
	/* rc_free > 0 (full blocks were skipped): some cluster here is free. */
	if (!*seen_free && rs->rs_pre == 0)
		rc->rc_hint = QSM_MAX(rc->rc_hint, lo + 1);
	*seen_free = true;
	*run = rs->rs_suf;
	*c = lo + epb;
	return true;
}

/*
 * Find the lowest run of n free clusters at or above max(hint, from)
 * (clusters in [rc_excl_lo, rc_excl_hi) are not free, but do not stop the
 * hint).  Raises the hint over the used clusters it passes (only when it
 * starts at the hint).  -EFBIG when the run would reach rc_max_clusters;
 * -EAGAIN when a block on the way must be read first.
 */
static bool rc_cross_summarized(struct qsm_refcounts *rc, uint64_t idx, uint64_t n,
				uint64_t *c, uint64_t *run, bool *seen_free);

static int rc_find_run(struct qsm_refcounts *rc, uint64_t n, uint64_t from, uint64_t *start,
		       struct qsm_rc_waiter *w)
{
	uint64_t c = QSM_MAX(rc->rc_hint, from), run = 0, epb_mask = rc_epb(rc) - 1;
	bool seen_free = from > rc->rc_hint;

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
		bool free;
		if (!rc_exists(rc, idx)) {
			if (!rc->rc_careful) {
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
			free = c != 0 && !qsm_refcount_is_meta(rc, c);
		} else if (rc->rc_free[idx] == 0) {
			/* Known full: skip it unread. */
			uint64_t next = (idx + 1) << rc->rc_epb_bits;
			if (rc->rc_excl_lo > c && rc->rc_excl_lo < next)
				next = rc->rc_excl_lo;
			if (!seen_free)
				rc->rc_hint = next;
			run = 0;
			c = next;
			continue;
		} else if (rc_cross_summarized(rc, idx, n, &c, &run, &seen_free)) {
			continue;
		} else {
			int err;
			struct qsm_rc_block *b = rc_get(rc, idx, w, &err);
			if (!b)
				return err;
			free = c != 0 && !rc_block_get(rc->rc_order, b->rb_data, c & epb_mask) &&
			       (!rc->rc_careful || !qsm_refcount_is_meta(rc, c));
		}
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

/* Make every existing block of clusters [c, c+n) resident (a scan may have
 * crossed them by their summary).  0, -EAGAIN (w waits) or a read's error. */
static int rc_resident(struct qsm_refcounts *rc, uint64_t c, uint64_t n, struct qsm_rc_waiter *w)
{
	uint64_t last = (c + n - 1) >> rc->rc_epb_bits;
	int err;
	for (uint64_t idx = c >> rc->rc_epb_bits; idx <= last; idx++) {
		/* One read at a time: a waiter waits on one block. */
		if (rc_exists(rc, idx) && !rc_get(rc, idx, w, &err))
			return err;
	}
	return 0;
}

/*
 * Install an empty block for table index idx at free cluster bc, counting
 * bc (in the new block itself when bc is in idx's range, else in bc's
 * block, which exists and which the scan that found bc made resident).
 * All or nothing: 0 or -ENOMEM.
 */
static int rc_install_block(struct qsm_refcounts *rc, uint64_t idx, uint64_t bc)
{
	if (rc_mset_reserve(rc, 1))
		return -ENOMEM;
	struct qsm_rc_block *b = rc_take_block(rc);
	if (!b)
		return -ENOMEM;
	rb_install(rc, b, idx);
	rc->rc_table[idx] = bc << rc->rc_cluster_bits;
	rc->rc_free[idx] = (uint32_t)rc_epb(rc);
	b->rb_flags |= RB_NEW;
	rc_mark_dirty_bytes(rc, b, 0, (uint32_t)rc->rc_cluster_size);
	rc_table_dirty(rc, idx);
	rc_mset_add(rc, bc);
	rc_set(rc, rc_block_at(rc, bc), bc, 1);
	rc_claimed(rc, bc, 1);
	return 0;
}

static int rc_grow_table(struct qsm_refcounts *rc, uint64_t need);

/*
 * Make progress towards a block at table index idx (< rc_entries, missing):
 * create one block, or grow the table.  The new block goes at the lowest
 * free cluster at or above `from`; if that cluster's range has no block,
 * the new block is that range's block and counts itself.
 */
static int rc_make_block(struct qsm_refcounts *rc, uint64_t idx, uint64_t from,
			 struct qsm_rc_waiter *w)
{
	uint64_t f;
	int r = rc_find_run(rc, 1, from, &f, w);
	if (r || (r = rc_resident(rc, f, 1, w)))
		return r;
	uint64_t fidx = f >> rc->rc_epb_bits;
	if (fidx >= rc->rc_entries)
		return rc_grow_table(rc, fidx + 1);
	r = rc_install_block(rc, rc_exists(rc, fidx) ? idx : fidx, f);
	if (r == 0 && !rc->rc_growing)
		rc->rc_hint = f + 1; /* QEMU's cursor after alloc_clusters_noref (R1) */
	return r;
}

/* Give every range of [c, c+n) a block (growing the table as needed).
 * *made tells whether anything was created. */
static int rc_ensure_blocks(struct qsm_refcounts *rc, uint64_t c, uint64_t n, uint64_t from,
			    bool *made, struct qsm_rc_waiter *w)
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
		while (!rc_exists(rc, idx)) {
			if ((r = rc_make_block(rc, idx, from, w)))
				return r;
			*made = true;
		}
	}
	return 0;
}

/* Allocate n contiguous free clusters (refcount 1) at the lowest run at or
 * above `from`. */
static int rc_alloc_run(struct qsm_refcounts *rc, uint64_t n, uint64_t from, uint64_t *out,
			struct qsm_rc_waiter *w)
{
	for (;;) {
		uint64_t c;
		bool made;
		int r = rc_find_run(rc, n, from, &c, w);
		if (r)
			return r;
		/* The first cluster of the run whose range has no block. */
		uint64_t x = c;
		while (x < c + n && (x >> rc->rc_epb_bits) < rc->rc_entries &&
		       rc_exists(rc, x >> rc->rc_epb_bits))
			x = QSM_MIN(c + n, ((x >> rc->rc_epb_bits) + 1) << rc->rc_epb_bits);
		/* As QEMU's update_refcount > alloc_refcount_block: a missing
		 * block goes at the first free cluster past the run (where
		 * QEMU's cursor stands once the run is found), so inside the
		 * range it covers as the image grows. */
		if ((r = rc_ensure_blocks(rc, c, n, QSM_MAX(from, c + n), &made, w)))
			return r;
		if (made) {
			/* QEMU's -EAGAIN: the refcounts raised before x are
			 * dropped again, which brings its cursor back to c; with
			 * none (x == c) the cursor stays past the new block. */
			if (x > c && from == 0)
				rc->rc_hint = QSM_MAX(c, 1);
			continue; /* new blocks may sit in the run: look again */
		}
		if ((r = rc_resident(rc, c, n, w)))
			return r;
		for (uint64_t i = c; i < c + n; i++)
			rc_set(rc, rc_block_at(rc, i), i, 1);
		rc_claimed(rc, c, n);
		if (from == 0)
			rc->rc_hint = c + n; /* QEMU's free_cluster_index (R1) */
		*out = c;
		return 0;
	}
}

/*
 * Grow the table to cover at least `need` entries: enlarge the arrays and
 * raise the coverage, then allocate the new table's clusters inside it,
 * past the old coverage (nothing there needs reading).  The old table stays
 * allocated (rc_old) until table_committed.
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
	/* The run starts at the old coverage's end (past it all is free) or
	 * the excluded range's end; it and its blocks must fit. */
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
	r = rc_alloc_run(rc, tcl, base, &tc, NULL); /* reads nothing: all missing */
	rc->rc_growing = false;
	if (r) {
		/* Only past the reservation; undo when nothing landed in the
		 * new coverage, else stop everything (sticky). */
		bool clean = true;
		for (uint64_t i = old_e; i < new_e; i++)
			clean &= !rc->rc_table[i];
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

static int rc_alloc(struct qsm_refcounts *rc, uint64_t n, uint64_t *c, struct qsm_rc_waiter *w)
{
	int r;
	if (rc->rc_broken)
		return -EIO;
	if (n == 0)
		return -EINVAL;
	if (n >= rc->rc_max_clusters)
		return -EFBIG;
	if ((r = rc_reserve(rc, QSM_DIV_ROUND_UP(n, rc_epb(rc)) + 3)) == 0)
		r = rc_alloc_run(rc, n, 0, c, w);
	return r;
}

int qsm_refcount_alloc(struct qsm_refcounts *rc, uint64_t n, uint64_t *offset,
		       struct qsm_rc_waiter *w)
{
	uint64_t c;
	int r = rc_alloc(rc, n, &c, w);
	if (r == 0)
		*offset = c << rc->rc_cluster_bits;
	return rc_op_end(rc, w, r);
}

static int rc_update(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, int64_t delta,
		     struct qsm_rc_waiter *w);

int qsm_refcount_alloc_at(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, uint64_t *got,
			  struct qsm_rc_waiter *w)
{
	uint64_t k = 0, mask = rc_epb(rc) - 1;
	int r = 0;
	*got = 0;
	if (rc->rc_broken)
		return -EIO;
again:
	for (k = 0; k < n; k++) {
		uint64_t c = cluster + k, idx = c >> rc->rc_epb_bits, v = 0;
		if (c == 0 || c >= rc->rc_max_clusters)
			break;
		if (rc_bad(rc, idx))
			break; /* R9: found at use by the normal path */
		if (rc_exists(rc, idx)) {
			struct qsm_rc_block *b = rc_get(rc, idx, w, &r);
			if (!b)
				return rc_op_end(rc, w, r);
			v = rc_block_get(rc->rc_order, b->rb_data, c & mask);
		}
		if (v || qsm_refcount_is_meta(rc, c))
			break;
	}
	/* QEMU's update_refcount meets a range with no block at x: the block
	 * goes at the first free cluster from the cursor (maybe inside the
	 * prefix: it then cuts it), the increments before x are undone
	 * (lowering the cursor to `cluster`), and the prefix is counted again. */
	for (uint64_t x = cluster; x < cluster + k;) {
		uint64_t idx = x >> rc->rc_epb_bits;
		if (idx >= rc->rc_entries)
			break; /* past the table: rc_update grows it */
		if (rc_exists(rc, idx)) {
			x = (idx + 1) << rc->rc_epb_bits;
			continue;
		}
		if ((r = rc_reserve(rc, 4)) || (r = rc_make_block(rc, idx, 0, w)))
			return rc_op_end(rc, w, r);
		if (x > cluster && cluster < rc->rc_hint)
			rc->rc_hint = cluster;
		goto again;
	}
	if (k && (r = rc_update(rc, cluster, k, 1, w)) == 0)
		*got = k;
	return rc_op_end(rc, w, r);
}

/* Phase 1 of update: would every refcount of the range stay in [0, max],
 * and would no metadata cluster drop to 0?  Changes nothing, but makes
 * every existing block of the range resident (or -EAGAIN). */
static int rc_check_range(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, int64_t delta,
			  struct qsm_rc_waiter *w)
{
	uint64_t up = delta > 0 ? (uint64_t)delta : 0;
	uint64_t down = delta < 0 ? (uint64_t)0 - (uint64_t)delta : 0;
	uint64_t end = cluster + n;

	if (up > rc->rc_max)
		return -ERANGE;
	for (uint64_t c = cluster; c < end;) {
		uint64_t idx = c >> rc->rc_epb_bits;
		if (!rc_exists(rc, idx)) {
			if (down)
				return -ERANGE;
			/* All 0 up to the range's end: 0 + up fits. */
			c = QSM_MIN(end, (idx + 1) << rc->rc_epb_bits);
			continue;
		}
		int err;
		struct qsm_rc_block *b = rc_get(rc, idx, w, &err);
		if (!b)
			return err;
		uint64_t stop = QSM_MIN(end, (idx + 1) << rc->rc_epb_bits);
		for (; c < stop; c++) {
			uint64_t v = rc_block_get(rc->rc_order, b->rb_data, rc_slot(rc, c));
			if (up && v > rc->rc_max - up)
				return -ERANGE;
			if (down && v < down)
				return -ERANGE;
			if (down && v == down && qsm_refcount_is_meta(rc, c))
				return -EINVAL;
		}
	}
	return 0;
}

static int rc_update(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, int64_t delta,
		     struct qsm_rc_waiter *w)
{
	int r;

	if (rc->rc_broken)
		return -EIO;
	if (n == 0 || delta == 0)
		return 0;
	if (cluster >= rc->rc_max_clusters || n > rc->rc_max_clusters - cluster)
		return -EFBIG;
	if ((r = rc_check_range(rc, cluster, n, delta, w)))
		return r;
	if (delta > 0) {
		bool made;
		if ((r = rc_reserve(rc, QSM_DIV_ROUND_UP(n, rc_epb(rc)) + 3)) == 0) {
			/* New blocks and tables must not land in the range. */
			rc->rc_excl_lo = cluster;
			rc->rc_excl_hi = cluster + n;
			r = rc_ensure_blocks(rc, cluster, n, 0, &made, w);
			rc->rc_excl_lo = rc->rc_excl_hi = 0;
		}
		if (r)
			return r;
	}

	bool zeroed = false;
	struct qsm_rc_block *b = NULL;
	for (uint64_t c = cluster; c < cluster + n; c++) {
		if (!b || b->rb_idx != c >> rc->rc_epb_bits)
			b = rc_block_at(rc, c);
		uint64_t v = rc_block_get(rc->rc_order, b->rb_data, rc_slot(rc, c)) + (uint64_t)delta;
		rc_set(rc, b, c, v);
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
		rc_recompute_end(rc, w);
	return 0;
}

int qsm_refcount_update(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, int64_t delta,
			struct qsm_rc_waiter *w)
{
	return rc_op_end(rc, w, rc_update(rc, cluster, n, delta, w));
}

static int rc_alloc_bytes(struct qsm_refcounts *rc, uint64_t size, uint64_t *offset,
			  uint64_t *fresh, struct qsm_rc_waiter *w)
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
		uint64_t v;
		if ((r = rc_read(rc, o >> rc->rc_cluster_bits, &v, w)) < 0)
			return r;
		if (v == 0 || v >= rc->rc_max) /* 0: see rc_free_byte; cannot happen */
			o = 0;
	}
	if (!o || cs - (o & (cs - 1)) < size) {
		if ((r = rc_alloc(rc, 1, &c, w)) < 0)
			return r;
		c <<= rc->rc_cluster_bits;
		if (o && QSM_ALIGN_UP(o, cs) == c) {
			/* The bytes straddle into the new cluster: the old one
			 * holds their head, so it is referenced once more (its
			 * block was read above: no wait). */
			if ((r = rc_update(rc, o >> rc->rc_cluster_bits, 1, 1, w)) < 0) {
				(void)rc_update(rc, c >> rc->rc_cluster_bits, 1, -1, w);
				return r;
			}
		} else {
			o = c;
		}
		*fresh = c;
	} else if ((r = rc_update(rc, o >> rc->rc_cluster_bits, 1, 1, w)) < 0) {
		return r;
	}
	*offset = o;
	rc->rc_free_byte = QSM_IS_ALIGNED(o + size, cs) ? 0 : o + size;
	return 0;
}

int qsm_refcount_alloc_bytes(struct qsm_refcounts *rc, uint64_t size, uint64_t *offset,
			     uint64_t *fresh, struct qsm_rc_waiter *w)
{
	return rc_op_end(rc, w, rc_alloc_bytes(rc, size, offset, fresh, w));
}

int qsm_refcount_free_bytes(struct qsm_refcounts *rc, uint64_t offset, uint64_t size,
			    struct qsm_rc_waiter *w)
{
	uint64_t first = offset >> rc->rc_cluster_bits;
	uint64_t last = (offset + size - 1) >> rc->rc_cluster_bits;
	uint64_t v;
	int ret = 0;
	/* Every block first, so that a wait comes before any change. */
	for (uint64_t c = first; c <= last; c++)
		if ((ret = rc_read(rc, c, &v, w)) < 0)
			return rc_op_end(rc, w, ret);
	for (uint64_t c = first; c <= last; c++) {
		int r = rc_update(rc, c, 1, -1, w);
		if (r < 0 && !ret)
			ret = r;
	}
	return rc_op_end(rc, w, ret);
}

int qsm_refcount_count_used(struct qsm_refcounts *rc, uint64_t end, uint64_t limit,
			    uint64_t *count, struct qsm_rc_waiter *w)
{
	uint64_t n = 0, epb = rc_epb(rc);
	int r = 0;
	for (uint64_t idx = 0; idx < rc->rc_entries && (idx << rc->rc_epb_bits) < end && n < limit;
	     idx++) {
		uint64_t lo = idx << rc->rc_epb_bits, hi = QSM_MIN(lo + epb, end);
		if (!rc_exists(rc, idx))
			continue;
		if (hi == lo + epb && rc->rc_free[idx] != RC_FREE_UNKNOWN) {
			n += epb - rc->rc_free[idx];
			continue;
		}
		struct qsm_rc_block *b = rc_get(rc, idx, w, &r);
		if (!b)
			break;
		r = 0;
		for (uint64_t c = lo; c < hi; c++)
			n += rc_block_get(rc->rc_order, b->rb_data, c - lo) != 0;
	}
	*count = n;
	return rc_op_end(rc, w, r);
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

void qsm_refcount_stats(const struct qsm_refcounts *rc, struct qsm_rc_stats *st)
{
	*st = (struct qsm_rc_stats){
		.hits = rc->rc_hits, .misses = rc->rc_misses, .evictions = rc->rc_evictions,
		.loads = rc->rc_loads, .resident = rc->rc_nres, .capacity = rc->rc_capacity,
		.dirty = rc->rc_ndirty,
	};
}

/* --- Write-back -------------------------------------------------------------- */

bool qsm_refcount_dirty(const struct qsm_refcounts *rc)
{
	return rc->rc_ndirty || rc->rc_table_moved || rc->rc_tdirty_lo != rc->rc_tdirty_hi;
}

bool qsm_refcount_table_dirty(const struct qsm_refcounts *rc)
{
	return rc->rc_table_moved || rc->rc_tdirty_lo != rc->rc_tdirty_hi;
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
 * `table`, and everything is clean; the blocks are busy (unevictable) until
 * qsm_refcount_written().  On error (-ENOMEM, -EIO) the batches are as they
 * were and nothing is marked clean.
 */
int qsm_refcount_collect(struct qsm_refcounts *rc, struct qsm_meta_batch *blocks,
			 struct qsm_meta_batch *table, struct qsm_rc_collect *out)
{
	size_t bn = blocks->n, tn = table->n;
	int r = 0;

	if (rc->rc_broken)
		return -EIO;
	for (struct qsm_rc_block *b = rc->rc_dirty; b && !r; b = b->rb_dnext) {
		/* A new block is written whole (its cluster may hold garbage);
		 * an old one only over its dirty span, in 4 KiB units. */
		uint64_t lo = 0, hi = rc->rc_cluster_size;
		if (!(b->rb_flags & RB_NEW)) {
			lo = QSM_ALIGN_DOWN((uint64_t)b->rb_dlo, 4096);
			hi = QSM_MIN(QSM_ALIGN_UP((uint64_t)b->rb_dhi, 4096), rc->rc_cluster_size);
		}
		r = qsm_meta_batch_add(blocks, rc->rc_table[b->rb_idx] + lo, b->rb_data + lo, hi - lo,
				       (b->rb_flags & RB_NEW) ? QSM_IO_EV_REFBLOCK_ALLOC
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

	out->generation = ++rc->rc_generation;
	while (rc->rc_dirty) {
		struct qsm_rc_block *b = rc->rc_dirty;
		rc->rc_dirty = b->rb_dnext;
		b->rb_dnext = NULL;
		b->rb_flags &= (uint8_t)~(RB_DIRTY | RB_NEW);
		if (!b->rb_busy) {
			b->rb_bnext = rc->rc_busy;
			rc->rc_busy = b;
		}
		b->rb_busy = out->generation;
	}
	rc->rc_ndirty = 0;
	rc->rc_tdirty_lo = rc->rc_tdirty_hi = 0;
	out->table_moved = rc->rc_table_moved;
	if (rc->rc_table_moved) {
		for (size_t i = 0; i < rc->rc_nold; i++)
			if (!rc->rc_old[i].ot_generation)
				rc->rc_old[i].ot_generation = out->generation;
		rc->rc_table_moved = false;
	}
	return 0;
}

void qsm_refcount_written(struct qsm_refcounts *rc, uint64_t generation, int ret)
{
	struct qsm_rc_block **pp = &rc->rc_busy;
	if (!generation)
		return;
	while (*pp) {
		struct qsm_rc_block *b = *pp;
		if (b->rb_busy > generation) {
			pp = &b->rb_bnext;
			continue;
		}
		*pp = b->rb_bnext;
		b->rb_bnext = NULL;
		b->rb_busy = 0;
		if (ret < 0)
			rc_mark_dirty_bytes(rc, b, 0, (uint32_t)rc->rc_cluster_size);
		rb_lru_sync(rc, b);
	}
	rc_trim(rc);
}

int qsm_refcount_table_committed(struct qsm_refcounts *rc, uint64_t generation,
				 struct qsm_rc_waiter *w)
{
	if (rc->rc_broken)
		return rc_op_end(rc, w, -EIO);
	for (size_t i = 0; i < rc->rc_nold;) {
		struct rc_old_table ot = rc->rc_old[i];
		if (!ot.ot_generation || ot.ot_generation > generation) {
			i++;
			continue;
		}
		/* Out of the list first: is_meta must not protect it now. */
		rc->rc_old[i] = rc->rc_old[--rc->rc_nold];
		int r = rc_update(rc, ot.ot_offset >> rc->rc_cluster_bits, ot.ot_clusters, -1, w);
		if (r) {
			rc->rc_old[rc->rc_nold++] = ot;
			return rc_op_end(rc, w, r);
		}
	}
	return rc_op_end(rc, w, 0);
}

/* --- Load and free ----------------------------------------------------------- */

void qsm_refcount_free(struct qsm_refcounts *rc)
{
	if (!rc)
		return;
	for (uint64_t i = 0; i < rc->rc_cap; i++)
		rb_free(rc->rc_res[i]);
	for (size_t i = 0; i < rc->rc_pool_n; i++)
		rb_free(rc->rc_pool[i]);
	free(rc->rc_pool);
	free(rc->rc_table);
	free(rc->rc_res);
	free(rc->rc_free);
	free(rc->rc_runs);
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
		uint64_t off = rc->rc_table[i];
		if (!off || off == RC_DAMAGED)
			continue;
		if (!QSM_IS_ALIGNED(off, cs))
			continue; /* R9: detected at use */
		if (file_size < cs || off > file_size - cs) {
			/* QEMU reads it as zeros and finds it at use (R9). */
			rc->rc_table[i] = RC_DAMAGED;
			rc->rc_damaged = true;
			continue;
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
	if (!QSM_IS_ALIGNED(p->table_offset, cs)) {
		qsm_set_err(err, errlen, "refcount_table_offset 0x%" PRIx64 " is not cluster aligned",
			    p->table_offset);
		return -EINVAL;
	}
	uint64_t tbytes = (uint64_t)p->table_clusters << p->cluster_bits;
	/* A table over the header or past the end of the file (QEMU opens
	 * it): not read, every entry RC_DAMAGED (R9). */
	bool unread = !p->table_offset || p->table_offset > file_size ||
		      tbytes > file_size - p->table_offset;

	rc = calloc(1, sizeof(*rc));
	if (!rc)
		return -ENOMEM;
	rc->rc_io = io;
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
	rc->rc_capacity = p->cache_blocks ? p->cache_blocks : RC_DEFAULT_CACHE_BLOCKS;
	rc->rc_lru.rb_next = rc->rc_lru.rb_prev = &rc->rc_lru;

	uint64_t n = tbytes / 8;
	buf = malloc(tbytes);
	if (!buf || rc_arrays_grow(rc, n)) {
		r = -ENOMEM;
		goto fail;
	}
	rc->rc_entries = n;
	if (unread)
		memset(buf, 0, tbytes);
	else if ((r = qsm_io_pread_sync(io, buf, tbytes, p->table_offset))) {
		qsm_set_err(err, errlen, "reading the refcount table at 0x%" PRIx64 ": %s",
		       p->table_offset, strerror(-r));
		goto fail;
	}
	size_t nblocks = 0;
	/* Reserved bits (0-8) are dropped, as QEMU ignores them (the checkers
	 * report them); a rewrite of the table writes the entry without them. */
	for (uint64_t i = 0; i < n; i++) {
		rc->rc_table[i] = unread ? RC_DAMAGED : qcow2_be64(buf + 8 * i) & QCOW2_REFT_OFFSET_MASK;
		nblocks += rc->rc_table[i] != 0;
	}
	rc->rc_damaged = unread;
	free(buf);
	buf = NULL;
	if ((r = rc_mset_reserve(rc, nblocks)))
		goto fail;
	if ((r = rc_validate_entries(rc, file_size, err, errlen)))
		goto fail;

	/* A block or table cluster whose own range has no block has refcount
	 * 0 (a damaged image); those in ranges with a block are found as the
	 * blocks are read (rc_careful_scan). */
	for (uint64_t i = 0; i < n; i++)
		if (rc->rc_table[i] && !rc_bad(rc, i) &&
		    !rc_exists(rc, (rc->rc_table[i] >> p->cluster_bits) >> rc->rc_epb_bits))
			rc->rc_careful = true;
	for (uint32_t i = 0; i < p->table_clusters; i++)
		if (!rc_exists(rc, ((p->table_offset >> p->cluster_bits) + i) >> rc->rc_epb_bits))
			rc->rc_careful = true;

	/* Where the image ends: the last blocks, read now (usually one). */
	rc->rc_end = n << rc->rc_epb_bits;
	rc_recompute_end(rc, NULL);
	/* Stopped at an unaligned entry (R9): rc_end stays the bound above it. */
	if (!rc->rc_end_exact && !(rc->rc_end && rc_bad(rc, (rc->rc_end - 1) >> rc->rc_epb_bits))) {
		qsm_set_err(err, errlen, "cannot read the last refcount block");
		r = -EIO;
		goto fail;
	}
	rc->rc_bad_hit = 0; /* only what a caller needed is reported */
	rc_trim(rc);
	*out = rc;
	return 0;

fail:
	free(buf);
	qsm_refcount_free(rc);
	return r;
}

bool qsm_refcount_bad_entry(const struct qsm_refcounts *rc, uint64_t *idx, uint64_t *offset)
{
	if (!rc->rc_bad_hit)
		return false;
	*idx = rc->rc_bad_hit - 1;
	*offset = rc->rc_table[*idx] == RC_DAMAGED ? 0 : rc->rc_table[*idx] & QCOW2_REFT_OFFSET_MASK;
	return true;
}

bool qsm_refcount_damaged(const struct qsm_refcounts *rc)
{
	return rc->rc_damaged;
}

int qsm_refcount_damage_of(const struct qsm_refcounts *rc, uint64_t cluster)
{
	uint64_t idx = cluster >> rc->rc_epb_bits;
	if (idx >= rc->rc_entries || !rc->rc_table[idx])
		return 0;
	return rc->rc_table[idx] == RC_DAMAGED ? 1 : -1;
}

void qsm_refcount_mark_damaged(struct qsm_refcounts *rc, uint64_t cluster)
{
	uint64_t idx = cluster >> rc->rc_epb_bits;
	assert(idx < rc->rc_entries && !rc->rc_table[idx]);
	rc->rc_table[idx] = RC_DAMAGED;
	rc->rc_damaged = true;
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
	uint64_t cb = rc->rc_cluster_bits, nblocks = 0, nres = 0, ndirty = 0, v;

	RC_CHECK(rc->rc_entries <= rc->rc_cap, "entries %" PRIu64 " > cap", rc->rc_entries);
	RC_CHECK(rc->rc_entries == ((uint64_t)rc->rc_table_clusters << cb) / 8,
		 "entries %" PRIu64 " do not fill %u table clusters", rc->rc_entries,
		 rc->rc_table_clusters);
	for (uint64_t i = 0; i < rc->rc_cap; i++) {
		const struct qsm_rc_block *b = rc->rc_res[i];
		if (b) {
			nres++;
			RC_CHECK(rc_exists(rc, i), "resident block %" PRIu64 " has no table entry", i);
			RC_CHECK(b->rb_idx == i, "block %" PRIu64 " thinks it is %" PRIu64, i, b->rb_idx);
			RC_CHECK(rb_evictable(b) == rb_on_lru(b), "block %" PRIu64 ": LRU membership", i);
			ndirty += (b->rb_flags & RB_DIRTY) != 0;
			if (!(b->rb_flags & RB_LOADING))
				RC_CHECK(rc->rc_free[i] == rc_count_free(rc, b->rb_data),
					 "R7: block %" PRIu64 " free count %u, has %u", i, rc->rc_free[i],
					 rc_count_free(rc, b->rb_data));
		}
		const struct rc_runs *rs = &rc->rc_runs[i];
		if (i < rc->rc_entries && rs->rs_pre != RC_FREE_UNKNOWN) {
			RC_CHECK(!b, "R8: resident block %" PRIu64 " keeps a summary", i);
			RC_CHECK(rs->rs_pre <= rs->rs_max && rs->rs_suf <= rs->rs_max &&
					 rs->rs_max <= rc->rc_free[i] &&
					 (rs->rs_pre != rc_epb(rc) || rc->rc_free[i] == rc_epb(rc)),
				 "R8: block %" PRIu64 " summary %u/%u/%u, %u free", i, rs->rs_pre,
				 rs->rs_max, rs->rs_suf, rc->rc_free[i]);
		}
		if (!rc_exists(rc, i) || rc_bad(rc, i))
			continue; /* R9: not a block of the set */
		nblocks++;
		uint64_t bc = rc->rc_table[i] >> cb;
		RC_CHECK(!qsm_refcount_peek(rc, bc, &v) || v >= 1,
			 "invariant 2: refcount block %" PRIu64 " (cluster %" PRIu64 ") has refcount 0",
			 i, bc);
		RC_CHECK(rc_mset_has(rc, bc), "R3: block cluster %" PRIu64 " not in set", bc);
	}
	RC_CHECK(nres == rc->rc_nres, "%" PRIu64 " resident, count says %zu", nres, rc->rc_nres);
	RC_CHECK(nblocks == rc->rc_mset_n, "R3: %" PRIu64 " blocks, set has %zu", nblocks,
		 rc->rc_mset_n);
	RC_CHECK(ndirty == rc->rc_ndirty, "R4: %" PRIu64 " dirty flags, count says %zu", ndirty,
		 rc->rc_ndirty);
	size_t listed = 0;
	for (const struct qsm_rc_block *b = rc->rc_dirty; b; b = b->rb_dnext, listed++)
		RC_CHECK(b->rb_flags & RB_DIRTY, "R4: list entry %zu", listed);
	RC_CHECK(listed == rc->rc_ndirty, "R4: %zu listed", listed);
	for (uint32_t i = 0; i < rc->rc_table_clusters; i++)
		RC_CHECK(!qsm_refcount_peek(rc, (rc->rc_table_offset >> cb) + i, &v) || v >= 1,
			 "invariant 2: table cluster %u has refcount 0", i);
	for (size_t k = 0; k < rc->rc_nold; k++)
		for (uint32_t i = 0; i < rc->rc_old[k].ot_clusters; i++)
			RC_CHECK(!qsm_refcount_peek(rc, (rc->rc_old[k].ot_offset >> cb) + i, &v) ||
				 v >= 1, "invariant 3: old table cluster has refcount 0");
	RC_CHECK(rc->rc_hint >= 1, "R1: hint 0"); /* a cursor: free clusters may lie below */
	if (rc->rc_end_exact && rc->rc_end)
		RC_CHECK(!qsm_refcount_peek(rc, rc->rc_end - 1, &v) || v,
			 "R2: end %" PRIu64 " but its last cluster is free", rc->rc_end);
	for (uint64_t c = rc->rc_end; c < (rc->rc_entries << rc->rc_epb_bits); c++) {
		if (!qsm_refcount_peek(rc, c, &v) || !rc_exists(rc, c >> rc->rc_epb_bits)) {
			c = (((c >> rc->rc_epb_bits) + 1) << rc->rc_epb_bits) - 1;
			continue;
		}
		RC_CHECK(!v, "R2: cluster %" PRIu64 " used past end %" PRIu64, c, rc->rc_end);
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
		"  hint %" PRIu64 " end %" PRIu64 "%s dirty blocks %zu resident %zu/%zu loading %u"
		" pool %zu%s%s\n",
		(const void *)rc, rc->rc_cluster_bits, 1u << rc->rc_order, rc_epb(rc),
		rc->rc_table_offset, rc->rc_table_clusters, rc->rc_entries,
		rc->rc_table_moved ? " MOVED" : "", rc->rc_tdirty_lo, rc->rc_tdirty_hi,
		rc->rc_generation, rc->rc_hint, rc->rc_end, rc->rc_end_exact ? "" : " (bound)",
		rc->rc_ndirty, rc->rc_nres, rc->rc_capacity, rc->rc_loading, rc->rc_pool_n,
		rc->rc_careful ? " CAREFUL" : "", rc->rc_broken ? " BROKEN" : "");
	for (size_t k = 0; k < rc->rc_nold; k++)
		fprintf(stderr, "  old table 0x%" PRIx64 " (%u clusters) generation %" PRIu64 "\n",
			rc->rc_old[k].ot_offset, rc->rc_old[k].ot_clusters,
			rc->rc_old[k].ot_generation);
	for (uint64_t i = 0; i < rc->rc_entries; i++) {
		const struct qsm_rc_block *b = rc->rc_res[i];
		if (!rc_exists(rc, i))
			continue;
		uint64_t first = i << rc->rc_epb_bits;
		fprintf(stderr, "  block %" PRIu64 " at 0x%" PRIx64 " clusters %" PRIu64 "..%" PRIu64,
			i, rc->rc_table[i], first, first + rc_epb(rc) - 1);
		if (rc->rc_free[i] != RC_FREE_UNKNOWN)
			fprintf(stderr, ": %" PRIu64 " used", rc_epb(rc) - rc->rc_free[i]);
		if (b)
			fprintf(stderr, " resident%s%s%s ref %u busy %" PRIu64,
				(b->rb_flags & RB_DIRTY) ? " dirty" : "",
				(b->rb_flags & RB_NEW) ? " new" : "",
				(b->rb_flags & RB_LOADING) ? " loading" : "", b->rb_ref, b->rb_busy);
		fputc('\n', stderr);
	}
}
