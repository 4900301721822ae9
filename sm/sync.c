/*
 * sm/sync.c: the synchronous convenience layer for tools, and image creation.
 *
 * Each sync call submits one asynchronous request and runs the image's event
 * loop until its callback has run.  It must not be called from inside a qsm
 * callback (the loop would be re-entered).
 */
#include <errno.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "sm/sm.h"

struct sync_wait {
	bool done;
	int ret;
};

static void sync_cb(void *opaque, int ret)
{
	struct sync_wait *w = opaque;
	w->ret = ret;
	w->done = true;
}

static int sync_run(struct qsm_image *img, int submitted, struct sync_wait *w)
{
	if (submitted < 0)
		return submitted;
	while (!w->done)
		event_base_loop(img->base, EVLOOP_ONCE);
	return w->ret;
}

int qsm_sync_pread(struct qsm_image *img, void *buf, size_t len, uint64_t offset)
{
	struct sync_wait w = { 0 };
	struct iovec iov = { buf, len };
	return sync_run(img, qsm_readv(img, offset, &iov, 1, sync_cb, &w), &w);
}

int qsm_sync_pwrite(struct qsm_image *img, const void *buf, size_t len, uint64_t offset)
{
	struct sync_wait w = { 0 };
	struct iovec iov = { (void *)buf, len };
	return sync_run(img, qsm_writev(img, offset, &iov, 1, sync_cb, &w), &w);
}

int qsm_sync_flush(struct qsm_image *img)
{
	struct sync_wait w = { 0 };
	return sync_run(img, qsm_flush(img, sync_cb, &w), &w);
}

int qsm_sync_discard(struct qsm_image *img, uint64_t offset, uint64_t bytes)
{
	struct sync_wait w = { 0 };
	return sync_run(img, qsm_discard(img, offset, bytes, sync_cb, &w), &w);
}

int qsm_sync_write_zeroes(struct qsm_image *img, uint64_t offset, uint64_t bytes, unsigned flags)
{
	struct sync_wait w = { 0 };
	return sync_run(img, qsm_write_zeroes(img, offset, bytes, flags, sync_cb, &w), &w);
}

int qsm_sync_block_status(struct qsm_image *img, uint64_t offset, uint64_t bytes,
			  struct qsm_extent *out)
{
	struct sync_wait w = { 0 };
	return sync_run(img, qsm_block_status(img, offset, bytes, out, sync_cb, &w), &w);
}

int qsm_create(const char *path, const struct qsm_create_opts *o, char *err, size_t errlen)
{
	struct qcow2_create_opts co = {
		.size = o->size,
		.cluster_bits = QCOW2_DEFAULT_CLUSTER_BITS,
		.version = o->compat ? o->compat : 3,
		.refcount_order = 4,
		.lazy_refcounts = o->lazy_refcounts,
		.backing_file = o->backing_file,
		.backing_format = o->backing_format,
	};
	if (o->cluster_size) {
		unsigned bits = 0;
		while ((1ull << bits) < o->cluster_size && bits < 63)
			bits++;
		if ((1ull << bits) != o->cluster_size || bits < QCOW2_MIN_CLUSTER_BITS ||
		    bits > QCOW2_MAX_CLUSTER_BITS) {
			snprintf(err, errlen, "Cluster size must be a power of two between 512 and 2048k");
			return -EINVAL;
		}
		co.cluster_bits = bits;
	}
	if (o->refcount_bits) {
		unsigned order = 0;
		while ((1u << order) < o->refcount_bits && order < 7)
			order++;
		if ((1u << order) != o->refcount_bits || order > 6) {
			snprintf(err, errlen, "Refcount width must be a power of two and may not exceed 64 bits");
			return -EINVAL;
		}
		co.refcount_order = order;
	}

	uint8_t *bytes = NULL;
	size_t len = 0;
	int ret = qcow2_create_image(&co, &bytes, &len, err, errlen);
	if (ret < 0)
		return ret;

	struct event_base *base = event_base_new();
	struct qsm_io *io = NULL;
	if (!base) {
		free(bytes);
		return -ENOMEM;
	}
	ret = qsm_io_open_path(base, path, QSM_IO_CREATE, "threads", &io);
	if (ret < 0) {
		snprintf(err, errlen, "Could not create '%s': %s", path, strerror(-ret));
	} else {
		ret = qsm_io_pwrite_sync(io, bytes, len, 0);
		if (ret == 0)
			ret = qsm_io_truncate_sync(io, len);
		if (ret == 0)
			ret = qsm_io_flush_sync(io);
		if (ret < 0)
			snprintf(err, errlen, "Could not write '%s': %s", path, strerror(-ret));
		qsm_io_close(io);
	}
	event_base_free(base);
	free(bytes);
	return ret;
}
