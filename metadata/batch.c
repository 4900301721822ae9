/* metadata/batch.c: see batch.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "metadata/batch.h"

int qsm_meta_batch_add(struct qsm_meta_batch *b, uint64_t offset, const void *src, size_t len,
		       enum qsm_io_event event)
{
	if (b->n == b->cap) {
		size_t cap = b->cap ? b->cap * 2 : 16;
		struct qsm_meta_write *w = realloc(b->w, cap * sizeof(*w));
		if (!w)
			return -ENOMEM;
		b->w = w;
		b->cap = cap;
	}
	/* 4 KiB alignment keeps the copy usable for O_DIRECT writes. */
	void *copy = NULL;
	if (posix_memalign(&copy, 4096, len ? len : 1))
		return -ENOMEM;
	memcpy(copy, src, len);
	b->w[b->n++] = (struct qsm_meta_write){ offset, copy, len, event };
	return 0;
}

void qsm_meta_batch_clear(struct qsm_meta_batch *b)
{
	for (size_t i = 0; i < b->n; i++)
		free(b->w[i].buf);
	b->n = 0;
}
