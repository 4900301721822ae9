/*
 * metadata/l1.h: growing the L1 table, the format's part (QEMU's
 * qcow2_grow_l1_table).
 *
 * An L1 table is contiguous, so a larger one moves to newly allocated
 * clusters.  A crash at any instant must leave a header naming a complete,
 * counted table, so the move goes in this order (the engine performs it:
 * sm/image.c, resize):
 *   1. allocate growth.clusters clusters (refcount 1) and write the new
 *      table there; make it, and the refcounts that count it, durable;
 *   2. write the header naming the new table (offset and size); durable;
 *   3. only then release the old table's growth.old_clusters clusters.
 * A crash before 2 leaks the new clusters, one between 2 and 3 the old
 * ones: a leak, never a corruption (refcount >= references throughout).
 */
#ifndef QSM_L1_H
#define QSM_L1_H

#include <stdint.h>

struct qcow2_l1_growth {
	uint8_t *table;        /* the new table, on-disk byte order: the old
	                        * entries, then zeros to the end of its last
	                        * cluster; 4096-aligned, freed with free() */
	uint64_t entries;      /* its size in entries (the header's l1_size) */
	uint64_t bytes;        /* its length on disk: whole clusters */
	uint64_t clusters;     /* bytes in clusters: to allocate in step 1 */
	uint64_t old_clusters; /* clusters of the old table: released in step 3 */
};

/*
 * Build the table that replaces `l1` (old_entries entries, on-disk order)
 * with new_entries > old_entries entries.  0; -EFBIG when the new table
 * exceeds QCOW2_MAX_L1_BYTES (QEMU's limit); -EINVAL when it would not
 * grow; -ENOMEM.  Nothing is written or allocated on disk.
 */
int qcow2_l1_grow(const uint8_t *l1, uint64_t old_entries, uint64_t new_entries,
		  unsigned cluster_bits, struct qcow2_l1_growth *growth);

#endif
