/*
 * metadata/overlap.c: the set of host clusters holding metadata (contract
 * in metadata/overlap.h).
 *
 * Invariants
 *  O1. ov_l2_cap is 0 or a power of two, and ov_l2_n * 2 <= ov_l2_cap: a
 *      probe always reaches an empty slot.
 *  O2. A cluster index c is in the L2 set iff slot c + 1 is reachable from
 *      its hash without crossing an empty slot (linear probing; nothing is
 *      ever removed, so no tombstones).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/overlap.h"

void qsm_overlap_init(struct qsm_overlap *o, unsigned cluster_bits,
		      const struct qsm_refcounts *rc)
{
	*o = (struct qsm_overlap){ .ov_cluster_bits = cluster_bits, .ov_rc = rc };
}

void qsm_overlap_release(struct qsm_overlap *o)
{
	free(o->ov_l2);
	memset(o, 0, sizeof(*o));
}

void qsm_overlap_set_l1(struct qsm_overlap *o, uint64_t offset, uint64_t entries)
{
	uint64_t cs = 1ull << o->ov_cluster_bits;
	o->ov_l1_first = offset >> o->ov_cluster_bits;
	o->ov_l1_clusters = QSM_DIV_ROUND_UP(entries * 8, cs);
}

void qsm_overlap_set_snapshots(struct qsm_overlap *o, uint64_t offset, uint64_t bytes)
{
	uint64_t cs = 1ull << o->ov_cluster_bits;
	/* offset + bytes <= INT64_MAX (metadata/header.c) */
	o->ov_snap_first = offset >> o->ov_cluster_bits;
	o->ov_snap_clusters = bytes ? QSM_DIV_ROUND_UP(offset % cs + bytes, cs) : 0;
}

void qsm_overlap_set_bitmap_dir(struct qsm_overlap *o, uint64_t offset, uint64_t bytes)
{
	uint64_t cs = 1ull << o->ov_cluster_bits;
	/* offset cluster aligned, bytes <= 64 MiB (metadata/bitmap.c) */
	o->ov_bmdir_first = offset >> o->ov_cluster_bits;
	o->ov_bmdir_clusters = bytes ? QSM_DIV_ROUND_UP(bytes, cs) : 0;
}

static size_t l2_hash(uint64_t v, size_t cap)
{
	return (size_t)((v * 0x9e3779b97f4a7c15ull) >> 32) & (cap - 1);
}

int qsm_overlap_add_l2(struct qsm_overlap *o, uint64_t offset)
{
	uint64_t cluster = offset >> o->ov_cluster_bits;
	if ((o->ov_l2_n + 1) * 2 > o->ov_l2_cap) {
		size_t cap = o->ov_l2_cap ? o->ov_l2_cap * 2 : 64;
		uint64_t *slots = calloc(cap, sizeof(*slots));
		if (!slots)
			return -ENOMEM;
		for (size_t i = 0; i < o->ov_l2_cap; i++) {
			if (!o->ov_l2[i])
				continue;
			size_t h = l2_hash(o->ov_l2[i], cap);
			while (slots[h])
				h = (h + 1) & (cap - 1);
			slots[h] = o->ov_l2[i];
		}
		free(o->ov_l2);
		o->ov_l2 = slots;
		o->ov_l2_cap = cap;
	}
	size_t h = l2_hash(cluster + 1, o->ov_l2_cap);
	while (o->ov_l2[h]) {
		if (o->ov_l2[h] == cluster + 1)
			return 0;
		h = (h + 1) & (o->ov_l2_cap - 1);
	}
	o->ov_l2[h] = cluster + 1;
	o->ov_l2_n++;
	return 0;
}

static bool l2_has(const struct qsm_overlap *o, uint64_t cluster)
{
	if (!o->ov_l2_cap)
		return false;
	size_t h = l2_hash(cluster + 1, o->ov_l2_cap);
	while (o->ov_l2[h]) {
		if (o->ov_l2[h] == cluster + 1)
			return true;
		h = (h + 1) & (o->ov_l2_cap - 1);
	}
	return false;
}

bool qsm_overlap_is_meta_not_l2(const struct qsm_overlap *o, uint64_t offset)
{
	uint64_t c = offset >> o->ov_cluster_bits;
	if (c == 0)
		return true;
	if (c >= o->ov_l1_first && c < o->ov_l1_first + o->ov_l1_clusters)
		return true;
	if (c - o->ov_snap_first < o->ov_snap_clusters)
		return true;
	if (c - o->ov_bmdir_first < o->ov_bmdir_clusters)
		return true;
	return qsm_refcount_is_meta(o->ov_rc, c);
}

const char *qsm_overlap_kind(const struct qsm_overlap *o, uint64_t offset)
{
	uint64_t c = offset >> o->ov_cluster_bits, t_off, t_bytes;
	uint32_t t_clusters;

	if (c == 0)
		return "qcow2_header";
	if (c >= o->ov_l1_first && c < o->ov_l1_first + o->ov_l1_clusters)
		return "active L1 table";
	if (l2_has(o, c))
		return "active L2 table";
	if (qsm_refcount_is_meta(o->ov_rc, c)) {
		qsm_refcount_table_location(o->ov_rc, &t_off, &t_clusters);
		t_bytes = (uint64_t)t_clusters << o->ov_cluster_bits;
		if (offset >= QSM_ALIGN_DOWN(t_off, 1ull << o->ov_cluster_bits) &&
		    offset < t_off + t_bytes)
			return "refcount table";
		return "refcount block";
	}
	if (c - o->ov_snap_first < o->ov_snap_clusters)
		return "snapshot table";
	if (c - o->ov_bmdir_first < o->ov_bmdir_clusters)
		return "bitmap directory";
	return NULL;
}

bool qsm_overlap_is_meta(const struct qsm_overlap *o, uint64_t offset)
{
	return qsm_overlap_is_meta_not_l2(o, offset) || l2_has(o, offset >> o->ov_cluster_bits);
}
