/*
 * metadata/batch.h: a list of metadata writes prepared for write-back.
 *
 * Each write carries its own copy of the bytes, taken when the batch was
 * prepared, so later in-memory changes to the table cannot leak into a write
 * that is already ordered (see sm/writeback.c for the levels and syncs).
 */
#ifndef QSM_BATCH_H
#define QSM_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "io/io.h"

struct qsm_meta_write {
	uint64_t offset;
	uint8_t *buf;       /* owned by the batch */
	size_t len;
	enum qsm_io_event event;
};

struct qsm_meta_batch {
	struct qsm_meta_write *w;
	size_t n, cap;
};

/* Append a write of a copy of src[0..len).  0 or -ENOMEM. */
int qsm_meta_batch_add(struct qsm_meta_batch *b, uint64_t offset, const void *src, size_t len,
		       enum qsm_io_event event);
/* Free every copy; the batch is empty and reusable afterwards. */
void qsm_meta_batch_clear(struct qsm_meta_batch *b);

#endif
