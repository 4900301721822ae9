/*
 * metadata/overlap.h: the set of host clusters that hold metadata.
 *
 * Guest data must never land on metadata, and a table must never be read
 * from a cluster that holds another kind of metadata: the request machines
 * ask this set before they write into a cluster an L2 entry names, before
 * they use a cluster the allocator handed out, and before they load an L2
 * table (QEMU's overlap checks, "cached" and "active L2" flavours).
 *
 * The set is
 *   - cluster 0 (the header, its extensions, the backing file name);
 *   - the clusters of the active L1 table (qsm_overlap_set_l1);
 *   - the refcount table and blocks, current and being replaced (asked of
 *     metadata/refcount.c, which knows them: qsm_refcount_is_meta);
 *   - every L2 table the active L1 table names or has named since open
 *     (qsm_overlap_add_l2; L2 tables are never freed while the image is
 *     open, so the set only grows).
 *   - the clusters of the snapshot table (qsm_overlap_set_snapshots; it may
 *     lie past the end of the file, where the allocator would hand its
 *     clusters out: QEMU refuses that write, and so does qsm);
 *   - the clusters of the bitmap directory (qsm_overlap_set_bitmap_dir), as
 *     QEMU's overlap check knows it; the bitmap tables and data are not in
 *     it (nor in QEMU's).
 * The snapshots' own L1 and L2 tables are not in it (qsm does not write
 * them; check.c verifies them).
 *
 * Contracts: clusters are given as host byte offsets (any offset inside the
 * cluster); nothing here does I/O; queries are O(1) (a hash set for the L2
 * tables, ranges for the rest).  The refcount structure passed to init must
 * outlive the set.
 */
#ifndef QSM_OVERLAP_H
#define QSM_OVERLAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metadata/refcount.h"

struct qsm_overlap {
	unsigned ov_cluster_bits;
	uint64_t ov_l1_first, ov_l1_clusters; /* active L1 table, in clusters */
	uint64_t ov_snap_first, ov_snap_clusters; /* snapshot table, in clusters */
	uint64_t ov_bmdir_first, ov_bmdir_clusters; /* bitmap directory, in clusters */
	const struct qsm_refcounts *ov_rc;
	/* L2 table clusters: open addressing, slot = cluster index + 1, 0 empty;
	 * ov_l2_cap is 0 or a power of two at least twice ov_l2_n. */
	uint64_t *ov_l2;
	size_t ov_l2_cap, ov_l2_n;
};

/* Start an empty set (no L1 table, no L2 tables) over `rc`.  `o` may have
 * been zeroed before; it must not hold a set already. */
void qsm_overlap_init(struct qsm_overlap *o, unsigned cluster_bits,
		      const struct qsm_refcounts *rc);
/* Free the L2 set; `o` is zeroed (a zeroed set may be released too). */
void qsm_overlap_release(struct qsm_overlap *o);

/* The active L1 table is `entries` entries at `offset` (replaces the one
 * named before: the caller moves the table only once the old one is no
 * longer in use). */
void qsm_overlap_set_l1(struct qsm_overlap *o, uint64_t offset, uint64_t entries);
/* The snapshot table covers `bytes` bytes at `offset` (0 bytes: none). */
void qsm_overlap_set_snapshots(struct qsm_overlap *o, uint64_t offset, uint64_t bytes);
/* The bitmap directory covers `bytes` bytes at `offset` (0 bytes: none). */
void qsm_overlap_set_bitmap_dir(struct qsm_overlap *o, uint64_t offset, uint64_t bytes);
/* Add the L2 table at `offset`.  0, or -ENOMEM (the set is unchanged). */
int qsm_overlap_add_l2(struct qsm_overlap *o, uint64_t offset);

/* Does the cluster at `offset` hold metadata of any kind? */
bool qsm_overlap_is_meta(const struct qsm_overlap *o, uint64_t offset);
/* The same, leaving out L2 tables: may the cluster be an L2 table? */
bool qsm_overlap_is_meta_not_l2(const struct qsm_overlap *o, uint64_t offset);
/* What the cluster at `offset` holds, in QEMU's overlap-check names
 * ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
 * "refcount block", "snapshot table", "bitmap directory"), or NULL when it is no metadata. */
const char *qsm_overlap_kind(const struct qsm_overlap *o, uint64_t offset);

#endif
