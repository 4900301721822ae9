/*
 * metadata/refcount.h: refcounts and the cluster allocator.
 *
 * qsm keeps the whole refcount structure resident: the refcount table and
 * every refcount block are read at open.  The cost is refcount_bits/8 bytes
 * per host cluster of the *file* (32 KiB per GiB of image file at 64 KiB
 * clusters and 16-bit refcounts), and in exchange allocation never waits for
 * I/O: CLUSTER_ALLOC is a pure in-memory step of the request state machine.
 *
 * Blocks are kept in their on-disk (big-endian) form so write-back copies
 * them unchanged.  Every change marks the block (or table) dirty; nothing
 * here writes to disk by itself: sm/writeback.c collects dirty blocks with
 * qsm_refcount_collect() and writes them in the crash-safe order.
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

struct qsm_rc_params {
	unsigned cluster_bits;
	unsigned refcount_order;     /* 0..6 */
	uint64_t table_offset;       /* from the header */
	uint32_t table_clusters;
};

/*
 * Read and validate the refcount table and every refcount block (blocking,
 * through qsm_io_pread_sync).  Validation: table offset cluster-aligned and
 * nonzero, table size <= QCOW2_MAX_REFTABLE_BYTES, table inside the file,
 * entry reserved bits zero, block offsets aligned, nonzero and inside the
 * file.  -EINVAL with err naming the field for a malformed structure.
 */
int qsm_refcount_load(struct qsm_io *io, const struct qsm_rc_params *p, uint64_t file_size,
		      struct qsm_refcounts **out, char *err, size_t errlen);
void qsm_refcount_free(struct qsm_refcounts *rc);

/* Refcount of host cluster `cluster` (index, not byte offset). */
uint64_t qsm_refcount_get(const struct qsm_refcounts *rc, uint64_t cluster);
/* Largest representable refcount: 2^refcount_bits - 1. */
uint64_t qsm_refcount_max(const struct qsm_refcounts *rc);

/* Add delta to the refcount of clusters [cluster, cluster+n).  Creates
 * refcount blocks and grows the table as needed.  -ERANGE on overflow or
 * underflow, -ENOMEM, -EFBIG past the format's limits; nothing changed then. */
int qsm_refcount_update(struct qsm_refcounts *rc, uint64_t cluster, uint64_t n, int64_t delta);

/* Allocate n contiguous free clusters (refcount set to 1) and return the
 * byte offset of the first.  Prefers the lowest free run (reuse), else the
 * end of the image.  Never returns cluster 0. */
int qsm_refcount_alloc(struct qsm_refcounts *rc, uint64_t n, uint64_t *offset);

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
			     uint64_t *fresh);
/* Undo qsm_refcount_alloc_bytes for bytes nothing points at (a failed
 * write): one reference less on every cluster they touch. */
int qsm_refcount_free_bytes(struct qsm_refcounts *rc, uint64_t offset, uint64_t size);

/* One past the last cluster with a nonzero refcount, in bytes. */
uint64_t qsm_refcount_image_end(const struct qsm_refcounts *rc);

/* Is this host cluster a refcount block or part of the refcount table
 * (current, or an old one not yet released)?  For overlap checks. */
bool qsm_refcount_is_meta(const struct qsm_refcounts *rc, uint64_t cluster);

/* Where the table is now (for the header). */
void qsm_refcount_table_location(const struct qsm_refcounts *rc, uint64_t *offset,
				 uint32_t *clusters);

/* --- Write-back --------------------------------------------------------- */

bool qsm_refcount_dirty(const struct qsm_refcounts *rc);

struct qsm_rc_collect {
	bool table_moved;     /* header must be rewritten after the table */
	uint64_t generation;  /* pass to qsm_refcount_table_committed */
};

/*
 * Snapshot every dirty block into `blocks` (event REFBLOCK_UPDATE; new
 * blocks REFBLOCK_ALLOC) and the dirty part of the table into `table`
 * (REFTABLE_UPDATE; the whole new table when it moved), and mark them clean.
 * Order on disk: blocks, then table, then (when moved) the header.
 */
int qsm_refcount_collect(struct qsm_refcounts *rc, struct qsm_meta_batch *blocks,
			 struct qsm_meta_batch *table, struct qsm_rc_collect *out);

/* The header naming the table of collect `generation` is durable: release the
 * clusters of tables it replaced (refcounts dropped, dirty again). */
int qsm_refcount_table_committed(struct qsm_refcounts *rc, uint64_t generation);

/* Debug: check invariants 1-3 (usable inside assert); dump for gdb. */
bool qsm_refcount_check(const struct qsm_refcounts *rc);
void qsm_refcount_dump(const struct qsm_refcounts *rc);

#endif
