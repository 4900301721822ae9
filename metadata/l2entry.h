/*
 * metadata/l2entry.h: the L2 entry codec (standard 64-bit entries).
 *
 * One place that knows what the bits of an L2 entry mean, for the request
 * machines (sm/), the checker (metadata/check.c) and the tests.  Values
 * here are host-endian (qsm_l2_entry() and qcow2_be64() convert).
 *
 * A standard entry (QEMU's docs/interop/qcow2.txt, "Standard Cluster Descriptor"):
 *   bit 63     COPIED: refcount is exactly 1, the cluster may be written in place
 *   bit 62     0 (COMPRESSED clear)
 *   bits 9-55  host cluster offset, 0 = none
 *   bit 0      ZERO (v3 only): the cluster reads as zeros
 * A compressed entry (bit 62 set, never COPIED), with x = 62 - (cluster_bits - 8):
 *   bits x-61  number of 512-byte sectors the compressed bytes touch, minus 1
 *   bits 0..x-1  host byte offset of the compressed bytes (not aligned)
 *
 * Contracts: every function is pure (no I/O, no allocation); cluster_bits
 * is a valid qcow2 value (QCOW2_MIN_CLUSTER_BITS..QCOW2_MAX_CLUSTER_BITS);
 * nothing here validates an entry against an image (alignment, file end,
 * reserved bits): callers do that with the masks of metadata/qcow2.h.
 */
#ifndef QSM_L2ENTRY_H
#define QSM_L2ENTRY_H

#include <stdbool.h>
#include <stdint.h>

#include "metadata/qcow2.h"

/* What an entry says about its guest cluster. */
enum qcow2_entry_kind {
	QCOW2_EK_UNALLOC,    /* no host cluster, no zero flag: the backing file's, or zeros */
	QCOW2_EK_ZERO,       /* zero flag, no host cluster */
	QCOW2_EK_ZERO_ALLOC, /* zero flag, host cluster kept (preallocated zeros) */
	QCOW2_EK_DATA,       /* host cluster, COPIED: writable in place */
	QCOW2_EK_SHARED,     /* host cluster without COPIED (a snapshot shares it): COW */
	QCOW2_EK_COMPRESSED, /* compressed descriptor */
};

static inline enum qcow2_entry_kind qcow2_entry_kind(uint64_t e)
{
	if (e & QCOW2_OFLAG_COMPRESSED)
		return QCOW2_EK_COMPRESSED;
	uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
	if (e & QCOW2_L2E_ZERO)
		return off ? QCOW2_EK_ZERO_ALLOC : QCOW2_EK_ZERO;
	if (!off)
		return QCOW2_EK_UNALLOC;
	return (e & QCOW2_OFLAG_COPIED) ? QCOW2_EK_DATA : QCOW2_EK_SHARED;
}

/* Do clusters of this kind read as zeros in an image without a backing
 * file?  (With one, QCOW2_EK_UNALLOC reads the backing file's data.) */
static inline bool qcow2_kind_reads_zero(enum qcow2_entry_kind k)
{
	return k == QCOW2_EK_UNALLOC || k == QCOW2_EK_ZERO || k == QCOW2_EK_ZERO_ALLOC;
}

/* Host cluster offset of a standard entry (0 when none).  Meaningless for
 * a compressed entry: use qcow2_compressed_extent(). */
static inline uint64_t qcow2_entry_offset(uint64_t e)
{
	return e & QCOW2_L2E_OFFSET_MASK;
}

/* The entry of a cluster that now lives, unshared, at `host` (aligned). */
static inline uint64_t qcow2_entry_data(uint64_t host)
{
	return host | QCOW2_OFLAG_COPIED;
}

/* The entry that makes a cluster read as zeros without a host cluster:
 * the zero flag on v3; v2 has none, so the cluster is deallocated (0). */
static inline uint64_t qcow2_entry_zero(unsigned version)
{
	return version >= 3 ? QCOW2_L2E_ZERO : 0;
}

/* --- compressed descriptors ----------------------------------------------- */

/* First bit of the sector count field; the offset field is below it. */
static inline unsigned qcow2_csize_shift(unsigned cluster_bits)
{
	return 62 - (cluster_bits - 8);
}

/*
 * Decode a compressed entry: the host byte offset of the compressed bytes
 * and how many bytes to read there (from *off to the end of its last
 * sector: at least the compressed stream, possibly a little more, which
 * inflate ignores).
 */
static inline void qcow2_compressed_extent(unsigned cluster_bits, uint64_t e, uint64_t *off,
					   uint64_t *len)
{
	unsigned shift = qcow2_csize_shift(cluster_bits);
	uint64_t nb_sectors = ((e >> shift) & ((1ull << (cluster_bits - 8)) - 1)) + 1;
	*off = e & ((1ull << shift) - 1);
	*len = nb_sectors * 512 - (*off & 511);
}

/*
 * Encode: `len` (>= 1) compressed bytes at host byte offset `host` (below
 * 2^qcow2_csize_shift; len at most a cluster, so the sector count fits).
 * The count is of the sectors the bytes touch beyond the first, as QEMU
 * writes it; COPIED is never set.
 */
static inline uint64_t qcow2_compressed_entry(unsigned cluster_bits, uint64_t host, uint64_t len)
{
	uint64_t nb_csectors = ((host + len - 1) >> 9) - (host >> 9);
	return host | QCOW2_OFLAG_COMPRESSED | (nb_csectors << qcow2_csize_shift(cluster_bits));
}

/* The host clusters [*first, *first + *count) that a compressed entry's
 * sectors touch: each holds a reference for it (one per compressed
 * cluster, however many share the host cluster). */
static inline void qcow2_compressed_clusters(unsigned cluster_bits, uint64_t e, uint64_t *first,
					     uint64_t *count)
{
	uint64_t off, len;
	qcow2_compressed_extent(cluster_bits, e, &off, &len);
	*first = off >> cluster_bits;
	*count = ((off + len - 1) >> cluster_bits) - *first + 1;
}

#endif
