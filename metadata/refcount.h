/*
 * metadata/refcount.h: refcounts and the cluster allocator.
 *
 * The refcount table is resident (8 bytes per refcount block: 64 KiB covers
 * 16 TiB of image file at 64 KiB clusters and 16-bit refcounts); refcount
 * blocks live in a bounded cache and are read on demand, so neither memory
 * nor open time grows with the image.  Beside the table, a summary keeps one
 * free count per block seen (the allocator skips blocks known to be full
 * without reading them) and a cursor (the hint: no free cluster below it).
 *
 * Blocks are kept in their on-disk (big-endian) form so write-back copies
 * them unchanged.  Every change marks the block (or table) dirty; nothing
 * here writes to disk by itself: sm/writeback.c collects dirty blocks with
 * qsm_refcount_collect() and writes them in the crash-safe order.
 *
 * Waiting.  Every function that reads or changes refcounts takes a waiter:
 *  - NULL: blocking is allowed (open, close, truncate, create, tests): a
 *    block that is not cached is read synchronously (qsm_io_pread_sync_ev).
 *  - a waiter (the request path): a block that is not cached is read
 *    asynchronously; the function returns -EAGAIN having changed nothing
 *    the caller can see (it may have created empty refcount blocks, which
 *    are consistent metadata), and w->fn runs later from the event loop,
 *    never from inside the call, with 0 ("call again") or the read's error.
 *    The block is then pinned for w until qsm_refcount_unpin(w), so the
 *    retry finds it (and every block an earlier wait of w read: a change
 *    that needs several blocks makes progress however small the cache).
 *
 * The cache (like the L2 cache, metadata/l2cache.h):
 *  1. At most `capacity` blocks are resident, except while they are pinned
 *     for waiters, dirty, or collected with their write in flight: those are
 *     never evicted (a dirty block holds changes the disk lacks; one in
 *     flight would be reloaded stale).  The cache then grows past its
 *     capacity rather than make anyone wait, and asks its owner for a
 *     write-back (need_writeback) when dirty blocks are what keeps it over.
 *  2. Clean, unpinned, idle blocks are evicted least-recently-used first,
 *     never in the middle of a call (a call sees every block it touched).
 *
 * Invariants:
 *  1. A cluster is free for allocation iff its refcount is 0 and it is not
 *     cluster 0.  Clusters past the end of the reftable's coverage are free.
 *  2. Every refcount block counts itself (its own cluster has refcount >= 1),
 *     and so do the clusters of the refcount table.
 *  3. The in-memory table always covers every block in use; growing the table
 *     moves it to newly allocated clusters and the old clusters are released
 *     only by qsm_refcount_table_committed(), once the header pointing at
 *     the new table is durable.
 *  4. Functions never leave a half-applied change: on error nothing changed.
 */
#ifndef QSM_REFCOUNT_H
#define QSM_REFCOUNT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/io.h"
#include "metadata/batch.h"

struct qsm_refcounts;
struct qsm_rc_block;

/* Pins a waiter holds without allocating; more go to a heap array. */
#define QSM_RC_PINS 8

/*
 * A party that may wait for a refcount block (see "Waiting" above).  Zero-
 * initialized is ready.  Its pins have no fixed limit: every block read for
 * it stays until qsm_refcount_unpin(), so each wait is progress and a call
 * that needs k blocks finishes after at most k waits, whatever the capacity.
 * (Only when the heap array cannot grow does the oldest pin go, the one
 * case where a retry may read a block again.)  What a call may need is
 * bounded by the call: an update, the blocks of its range; an allocation,
 * the blocks its run touches plus one or two the scan reads (the summary
 * lets it pass every other block unread).
 */
struct qsm_rc_waiter {
	struct qsm_rc_waiter *next;
	void (*fn)(struct qsm_rc_waiter *w, int ret);
	uint64_t tag;        /* the owner's name for itself (sm/: the request id) */
	uint64_t waiting_on; /* set by -EAGAIN: the tag of the waiter whose call
			      * started the read (maybe w's own) */
	struct qsm_rc_block *pins_inline[QSM_RC_PINS];
	struct qsm_rc_block **pins_heap; /* NULL, or npins_cap > QSM_RC_PINS */
	unsigned npins, npins_cap;
};

struct qsm_rc_params {
	unsigned cluster_bits;
	unsigned refcount_order;     /* 0..6 */
	uint64_t table_offset;       /* from the header */
	uint32_t table_clusters;
	size_t cache_blocks;         /* capacity; 0: QEMU's default, 4 blocks */
};

/*
 * Read and validate the refcount table (blocking, through
 * qsm_io_pread_sync), and the last refcount block or few (to know where the
 * image ends).  Validation: table offset cluster-aligned, table size <=
 * QCOW2_MAX_REFTABLE_BYTES, block offsets distinct and clear of the table.
 * Entry reserved bits are dropped (QEMU ignores them).  Accepted as QEMU
 * opens them, and found at use: a block offset that is not cluster aligned,
 * a block past the end of the file, a table at offset 0 or past the end of
 * the file (not read: every entry is damaged); any call that needs such a
 * block fails with -EUCLEAN, and qsm_refcount_bad_entry() names it.  -EINVAL with err naming the field for a malformed
 * structure.  io must outlive the result (blocks are read through it).
 */
int qsm_refcount_load(struct qsm_io *io, const struct qsm_rc_params *p, uint64_t file_size,
		      struct qsm_refcounts **out, char *err, size_t errlen);
/* After -EUCLEAN from any call: the table index and the unaligned offset of
 * the entry it needed (true), for the corruption message. */
bool qsm_refcount_bad_entry(const struct qsm_refcounts *rc, uint64_t *idx, uint64_t *offset);
/* The offset above is 0 for a damaged entry (a block past the end of the
 * file, a table not read, or marked below): QEMU's message for it depends
 * on the image, which the owner words (sm/image.c). */
/* Was any entry damaged at load or marked since? */
bool qsm_refcount_damaged(const struct qsm_refcounts *rc);
/* The entry covering `cluster`: 0 none (missing block), 1 damaged, -1 a
 * block (aligned or not). */
int qsm_refcount_damage_of(const struct qsm_refcounts *rc, uint64_t cluster);
/* Open only, before any allocation: make the missing block covering
 * `cluster` damaged, so that whatever needs it fails with -EUCLEAN (the
 * owner found the image's refcounts wanting there).  The entry must be 0. */
void qsm_refcount_mark_damaged(struct qsm_refcounts *rc, uint64_t cluster);
/* Free everything, blocks being read included (their completions must never
 * run: the image is closed or abandoned with its I/O handle). */
void qsm_refcount_free(struct qsm_refcounts *rc);

/* The owner's hook: dirty blocks keep the cache over its capacity. */
void qsm_refcount_set_writeback_hook(struct qsm_refcounts *rc, void (*fn)(void *), void *opaque);

/* Refcount of host cluster `cluster` (index, not byte offset) into *value. */
int qsm_refcount_read(struct qsm_refcounts *rc, uint64_t cluster, uint64_t *value,
		      struct qsm_rc_waiter *w);
/* Blocking convenience for tests and tools: the refcount, or 0 when its
 * block cannot be read. */
uint64_t qsm_refcount_get(struct qsm_refcounts *rc, uint64_t cluster);
/* The refcount when known without I/O (block cached, or none exists). */
bool qsm_refcount_peek(const struct qsm_refcounts *rc, uint64_t cluster, uint64_t *value);
/* Largest representable refcount: 2^refcount_bits - 1. */
uint64_t qsm_refcount_max(const struct qsm_refcounts *rc);

/* Add delta to the refcount of clusters [cluster, cluster+n).  Creates
 * refcount blocks and grows the table as needed.  -ERANGE on overflow or
 * underflow, -ENOMEM, -EFBIG past the format's limits; nothing changed then. */
int qsm_refcount_update(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, int64_t delta,
			struct qsm_rc_waiter *w);

/* Allocate n contiguous free clusters (refcount set to 1) and return the
 * byte offset of the first: the lowest free run at or above the cursor
 * (QEMU's free_cluster_index, lowered by frees: reuse), else the end of
 * the image; the cursor is left past the run.  Never returns cluster 0. */
int qsm_refcount_alloc(struct qsm_refcounts *rc, uint64_t n, uint64_t *offset,
		       struct qsm_rc_waiter *w);

/* QEMU's qcow2_alloc_clusters_at: allocate (refcount 1) the free clusters
 * of [cluster, cluster+n) that come before the first used one, *got of
 * them (0 when `cluster` is used); the cursor (R1) stays.  A write's run
 * that follows host-contiguously after its previous run asks for this
 * first, as QEMU's qcow2_alloc_host_offset extends one host extent. */
int qsm_refcount_alloc_at(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, uint64_t *got,
			  struct qsm_rc_waiter *w);

/*
 * Compressed clusters: reserve `size` bytes (1..cluster_size) packed right
 * after the previous reservation, as QEMU's qcow2_alloc_bytes: while the
 * bytes fit in the cluster of the packing point (and its refcount is below
 * the maximum) that cluster's refcount is raised by one; otherwise a new
 * cluster is allocated (refcount 1), and when it directly follows the
 * packing point's cluster the bytes straddle both, raising the old one as
 * well.  The packing point then moves past the bytes (none when they end on
 * a cluster boundary).  *offset: where the bytes go; *fresh: byte offset of
 * the newly allocated cluster, or 0.  The packing point is forgotten when
 * its cluster's refcount drops to 0 (qsm_refcount_update), so freed space
 * the allocator may hand out again is never packed into.
 */
int qsm_refcount_alloc_bytes(struct qsm_refcounts *rc, uint64_t size, uint64_t *offset,
			     uint64_t *fresh, struct qsm_rc_waiter *w);
/* Undo qsm_refcount_alloc_bytes for bytes nothing points at (a failed
 * write): one reference less on every cluster they touch. */
int qsm_refcount_free_bytes(struct qsm_refcounts *rc, uint64_t offset, uint64_t size,
			    struct qsm_rc_waiter *w);

/*
 * How many clusters below `end` (a cluster index) have a nonzero refcount,
 * counting stops at `limit` (QEMU's metadata-preallocation test).  Blocks
 * already seen are counted from the summary without being read again.
 */
int qsm_refcount_count_used(struct qsm_refcounts *rc, uint64_t end, uint64_t limit,
			    uint64_t *count, struct qsm_rc_waiter *w);

/* Drop the blocks pinned for w: call when what it waited for is done (or
 * abandoned).  Blocks kept only by pins may be evicted from now on. */
void qsm_refcount_unpin(struct qsm_refcounts *rc, struct qsm_rc_waiter *w);

/* One past the last cluster with a nonzero refcount, in bytes.  After frees
 * made with a waiter it may stay above that (never below) until the blocks
 * under it are read: it bounds every valid host offset. */
uint64_t qsm_refcount_image_end(const struct qsm_refcounts *rc);

/* Is this host cluster a refcount block or part of the refcount table
 * (current, or an old one not yet released)?  For overlap checks; answered
 * from the table, without reading blocks. */
bool qsm_refcount_is_meta(const struct qsm_refcounts *rc, uint64_t cluster);

/* Where the table is now (for the header). */
void qsm_refcount_table_location(const struct qsm_refcounts *rc, uint64_t *offset,
				 uint32_t *clusters);

/* --- Write-back --------------------------------------------------------- */

bool qsm_refcount_dirty(const struct qsm_refcounts *rc);
/* The table changed since the last collect (a new refcount block, or the
 * table moved): new refcount metadata is waiting to be written. */
bool qsm_refcount_table_dirty(const struct qsm_refcounts *rc);

struct qsm_rc_collect {
	bool table_moved;     /* header must be rewritten after the table */
	uint64_t generation;  /* pass to qsm_refcount_table_committed and
			       * qsm_refcount_written; 0: nothing collected */
};

/*
 * Snapshot every dirty block into `blocks` (event REFBLOCK_UPDATE; new
 * blocks REFBLOCK_ALLOC) and the dirty part of the table into `table`
 * (REFTABLE_UPDATE; the whole new table when it moved), and mark them clean.
 * Order on disk: blocks, then table, then (when moved) the header.  The
 * collected blocks stay unevictable until qsm_refcount_written().
 */
int qsm_refcount_collect(struct qsm_refcounts *rc, struct qsm_meta_batch *blocks,
			 struct qsm_meta_batch *table, struct qsm_rc_collect *out);

/* The writes of collect `generation` (and earlier) are over with ret (0, or
 * -errno for any of them, or for a batch abandoned before writing).  After
 * a failure the blocks are dirty again, whole: what is on disk is unknown. */
void qsm_refcount_written(struct qsm_refcounts *rc, uint64_t generation, int ret);

/* The header naming the table of collect `generation` is durable: release the
 * clusters of tables it replaced (refcounts dropped, dirty again).  With a
 * waiter, -EAGAIN: call again (what was released stays released). */
int qsm_refcount_table_committed(struct qsm_refcounts *rc, uint64_t generation,
				 struct qsm_rc_waiter *w);

/* Counters (qsm info, tests). */
struct qsm_rc_stats {
	uint64_t hits, misses, evictions, loads;
	size_t resident, capacity, dirty;
};
void qsm_refcount_stats(const struct qsm_refcounts *rc, struct qsm_rc_stats *st);

/* Debug: check the invariants on what is resident (usable inside assert);
 * dump for gdb. */
bool qsm_refcount_check(const struct qsm_refcounts *rc);
void qsm_refcount_dump(const struct qsm_refcounts *rc);

#endif
