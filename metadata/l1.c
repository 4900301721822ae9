/*
 * metadata/l1.c: growing the L1 table (contract and crash-safe order in
 * metadata/l1.h).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/l1.h"
#include "metadata/qcow2.h"

int qcow2_l1_grow(const uint8_t *l1, uint64_t old_entries, uint64_t new_entries,
		  unsigned cluster_bits, struct qcow2_l1_growth *g)
{
	uint64_t cs = 1ull << cluster_bits;

	memset(g, 0, sizeof(*g));
	if (new_entries <= old_entries)
		return -EINVAL;
	if (new_entries > QCOW2_MAX_L1_BYTES / 8)
		return -EFBIG;
	g->entries = new_entries;
	g->bytes = QSM_ALIGN_UP(new_entries * 8, cs);
	g->clusters = g->bytes >> cluster_bits;
	g->old_clusters = QSM_DIV_ROUND_UP(old_entries * 8, cs);
	if (posix_memalign((void **)&g->table, 4096, (size_t)g->bytes)) {
		g->table = NULL;
		return -ENOMEM;
	}
	memset(g->table, 0, (size_t)g->bytes);
	memcpy(g->table, l1, (size_t)old_entries * 8);
	return 0;
}
