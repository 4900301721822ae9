/*
 * sm/sync.c: the synchronous convenience layer for tools, and image creation.
 *
 * Each sync call submits one asynchronous request and runs the image's event
 * loop until its callback has run.  It must not be called from inside a qsm
 * callback (the loop would be re-entered): qsm_close checks.  The blocking
 * operations of the engine (qsm_close, resize and create's write-back) are
 * built the same way on the asynchronous machines: there is no second,
 * synchronous path for metadata.
 */
#include <errno.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "metadata/compress.h"
#include "sm/sm.h"

void qsm_sync_cb(void *opaque, int ret)
{
	struct qsm_sync_wait *w = opaque;
	w->ret = ret;
	w->done = true;
}

int qsm_sync_run(struct qsm_image *img, int submitted, struct qsm_sync_wait *w)
{
	if (submitted < 0)
		return submitted;
	while (!w->done)
		event_base_loop(img->base, EVLOOP_ONCE);
	return w->ret;
}

int qsm_sync_pread(struct qsm_image *img, void *buf, size_t len, uint64_t offset)
{
	struct qsm_sync_wait w = { 0 };
	struct iovec iov = { buf, len };
	return qsm_sync_run(img, qsm_readv(img, offset, &iov, 1, qsm_sync_cb, &w), &w);
}

int qsm_sync_pwrite(struct qsm_image *img, const void *buf, size_t len, uint64_t offset)
{
	struct qsm_sync_wait w = { 0 };
	struct iovec iov = { (void *)buf, len };
	return qsm_sync_run(img, qsm_writev(img, offset, &iov, 1, qsm_sync_cb, &w), &w);
}

int qsm_sync_write_compressed(struct qsm_image *img, const void *buf, size_t len,
			      uint64_t offset)
{
	struct qsm_sync_wait w = { 0 };
	struct iovec iov = { (void *)buf, len };
	return qsm_sync_run(img, qsm_write_compressed(img, offset, &iov, 1, qsm_sync_cb, &w), &w);
}

int qsm_sync_writeback(struct qsm_image *img)
{
	struct qsm_sync_wait w = { 0 };
	if (img->closing)
		return -ESHUTDOWN;
	struct qsm_req *req = qsm_req_new(img, QSM_M_FLUSH, 0);
	if (!req)
		return -ENOMEM;
	req->flags = QSM_REQ_FULL_WRITEBACK;
	req->cb = qsm_sync_cb;
	req->opaque = &w;
	qsm_sm_start(req);
	return qsm_sync_run(img, 0, &w);
}

int qsm_close(struct qsm_image *img)
{
	struct event_base *base = img->base;
	struct qsm_sync_wait w = { 0 };
	/* From inside a completion callback (they all run from the image's
	 * run queue, img->draining, or its backing image's for the VM-state
	 * reads of sm/vmstate.c), running the loop again would nest (libevent
	 * refuses re-entry): qsm_close_async is the way there. */
	for (struct qsm_image *i = img; i; i = i->backing)
		if (i->draining)
			return -EDEADLK;
	int ret = qsm_close_async(img, qsm_sync_cb, &w);
	if (ret < 0)
		return ret;
	while (!w.done) { /* img is freed before the callback runs */
		if (event_base_loop(base, EVLOOP_ONCE) == 1 && !w.done) {
			/* Nothing left on the loop could finish the close: its
			 * I/O will never complete (a crashed simulated disk
			 * drops what is in flight).  Release without writing. */
			qsm_abandon(img);
			return -EIO;
		}
	}
	return w.ret;
}

int qsm_sync_flush(struct qsm_image *img)
{
	struct qsm_sync_wait w = { 0 };
	return qsm_sync_run(img, qsm_flush(img, qsm_sync_cb, &w), &w);
}

int qsm_sync_discard(struct qsm_image *img, uint64_t offset, uint64_t bytes)
{
	struct qsm_sync_wait w = { 0 };
	return qsm_sync_run(img, qsm_discard(img, offset, bytes, qsm_sync_cb, &w), &w);
}

int qsm_sync_write_zeroes(struct qsm_image *img, uint64_t offset, uint64_t bytes, unsigned flags)
{
	struct qsm_sync_wait w = { 0 };
	return qsm_sync_run(img, qsm_write_zeroes(img, offset, bytes, flags, qsm_sync_cb, &w), &w);
}

int qsm_sync_block_status(struct qsm_image *img, uint64_t offset, uint64_t bytes,
			  struct qsm_extent *out)
{
	struct qsm_sync_wait w = { 0 };
	return qsm_sync_run(img, qsm_block_status(img, offset, bytes, out, qsm_sync_cb, &w), &w);
}

_Static_assert(QSM_COMPRESSION_ZLIB == (int)QCOW2_COMPRESSION_ZLIB &&
	       QSM_COMPRESSION_ZSTD == (int)QCOW2_COMPRESSION_ZSTD,
	       "the public codec names are the header's compression_type values");

int qsm_compression_parse(const char *s, enum qsm_compression *out)
{
	enum qcow2_compression t;
	if (!s || qcow2_compression_parse(s, &t) < 0)
		return -EINVAL;
	*out = (enum qsm_compression)t;
	return 0;
}

int qsm_prealloc_parse(const char *s, enum qsm_prealloc *out)
{
	static const char *const names[] = { "off", "metadata", "falloc", "full" };
	for (unsigned i = 0; i < QSM_ARRAY_SIZE(names); i++) {
		if (strcmp(s, names[i]) == 0) {
			*out = (enum qsm_prealloc)i;
			return 0;
		}
	}
	return -EINVAL;
}

/* One blocking io/ request at create time. */
struct sync_io {
	struct qsm_io_req io;
	bool done;
	int ret;
};

static void sync_io_cb(struct qsm_io_req *io, int ret)
{
	struct sync_io *s = container_of(io, struct sync_io, io);
	s->ret = ret;
	s->done = true;
}

/* Write len bytes of zeros at off (preallocation=full), 1 MiB at a time. */
static int write_zeros_sync(struct qsm_image *img, uint64_t off, uint64_t len)
{
	size_t chunk = 1u << 20;
	uint8_t *zeros = NULL;
	int ret = 0;
	if (posix_memalign((void **)&zeros, 4096, chunk))
		return -ENOMEM;
	memset(zeros, 0, chunk);
	for (uint64_t done = 0; done < len && !ret; done += chunk)
		ret = qsm_io_pwrite_sync(img->io, zeros, (size_t)QSM_MIN(chunk, len - done), off + done);
	free(zeros);
	return ret;
}

/*
 * Preallocation, as qemu-img's qcow2 preallocate: in guest order, each L2
 * table is allocated when its range starts, then that range's data clusters,
 * contiguous; L2 entries point at them (COPIED), the file is sized to the
 * last data cluster.  Runs on a freshly created image, blocking; nothing is
 * in flight, so tables are written directly and the rest goes through the
 * ordinary write-back machine, one full batch (refcount blocks, L1, header).
 */
static int preallocate(struct qsm_image *img, enum qsm_prealloc mode)
{
	uint64_t cs = img->cluster_size, size = img->hdr.size;
	uint64_t clusters = QSM_DIV_ROUND_UP(size, cs);
	uint8_t *table = NULL;
	uint64_t data_lo = UINT64_MAX, data_hi = 0;
	int ret = 0;

	if (posix_memalign((void **)&table, 4096, cs))
		return -ENOMEM;
	for (uint64_t l1 = 0; l1 * img->l2_entries < clusters && !ret; l1++) {
		uint64_t n = QSM_MIN(img->l2_entries, clusters - l1 * img->l2_entries);
		uint64_t l2_off, data;
		if ((ret = qsm_refcount_alloc(img->rc, 1, &l2_off, NULL)) < 0 ||
		    (ret = qsm_refcount_alloc(img->rc, n, &data, NULL)) < 0)
			break;
		if (mode == QSM_PREALLOC_FULL &&
		    (ret = write_zeros_sync(img, data, n * cs)) < 0)
			break;
		memset(table, 0, cs);
		for (uint64_t i = 0; i < n; i++)
			qcow2_put_be64(table + i * 8, (data + i * cs) | QCOW2_OFLAG_COPIED);
		if ((ret = qsm_io_pwrite_sync(img->io, table, cs, l2_off)) < 0)
			break;
		qsm_l1_set(img, l1, l2_off | QCOW2_OFLAG_COPIED);
		/* Refcount blocks are cached: write them back as they fill
		 * rather than hold every one of a large image (the tables
		 * above are written already, so the L1 entries may follow). */
		struct qsm_rc_stats st;
		qsm_refcount_stats(img->rc, &st);
		if (st.dirty && st.resident > st.capacity && (ret = qsm_sync_writeback(img)) < 0)
			break;
		data_lo = QSM_MIN(data_lo, data);
		data_hi = QSM_MAX(data_hi, data + n * cs);
	}
	free(table);
	if (!ret && data_hi > img->file_end)
		img->file_end = data_hi;
	if (!ret)
		ret = qsm_sync_writeback(img);
	if (ret || data_hi == 0)
		return ret;
	uint64_t end = QSM_MAX(data_hi, qsm_refcount_image_end(img->rc));
	if ((ret = qsm_io_truncate_sync(img->io, end)) < 0)
		return ret;
	if (mode == QSM_PREALLOC_FALLOC) {
		struct sync_io r = { .io = {
			.op = QSM_IO_PREALLOC, .event = QSM_IO_EV_CLUSTER_ALLOC,
			.offset = data_lo, .len = data_hi - data_lo, .cb = sync_io_cb,
		} };
		qsm_io_submit(img->io, &r.io);
		while (!r.done)
			event_base_loop(img->base, EVLOOP_ONCE);
		ret = r.ret;
	}
	if (!ret)
		ret = qsm_io_flush_sync(img->io);
	return ret;
}

/* The bytes of the new image for the public options (nothing written yet):
 * 0 or -errno with err set.  *bytes is the caller's to free. */
static int create_bytes(const struct qsm_create_opts *o, uint8_t **bytes, size_t *len,
			char *err, size_t errlen)
{
	struct qcow2_create_opts c, *co = &c;
	*co = (struct qcow2_create_opts){
		.size = o->size,
		.cluster_bits = QCOW2_DEFAULT_CLUSTER_BITS,
		.version = o->compat ? o->compat : 3,
		.refcount_order = 4,
		.lazy_refcounts = o->lazy_refcounts,
		.backing_file = o->backing_file,
		.backing_format = o->backing_format,
		.compression_type = o->compression,
	};
	if (o->cluster_size) {
		unsigned bits = 0;
		while ((1ull << bits) < o->cluster_size && bits < 63)
			bits++;
		if ((1ull << bits) != o->cluster_size || bits < QCOW2_MIN_CLUSTER_BITS ||
		    bits > QCOW2_MAX_CLUSTER_BITS) {
			qsm_set_err(err, errlen, "Cluster size must be a power of two between 512 and 2048k");
			return -EINVAL;
		}
		co->cluster_bits = bits;
	}
	if (o->refcount_bits) {
		unsigned order = 0;
		while ((1u << order) < o->refcount_bits && order < 7)
			order++;
		if ((1u << order) != o->refcount_bits || order > 6) {
			qsm_set_err(err, errlen, "Refcount width must be a power of two and may not exceed 64 bits");
			return -EINVAL;
		}
		co->refcount_order = order;
	}
	return qcow2_create_image(co, bytes, len, err, errlen);
}

/*
 * Write the new image's bytes onto io (blocking, nothing in flight), then
 * preallocate through an image opened on it.  io stays the caller's: the
 * image borrows it (qsm_io_hold), so its close leaves io open.  name is
 * for messages only.  Frees bytes.
 */
static int create_on_io(struct qsm_io *io, const struct qsm_create_opts *o, uint8_t *bytes,
			size_t len, const char *name, char *err, size_t errlen)
{
	int ret = qsm_io_pwrite_sync(io, bytes, len, 0);
	if (ret == 0)
		ret = qsm_io_truncate_sync(io, len);
	if (ret == 0)
		ret = qsm_io_flush_sync(io);
	free(bytes);
	if (ret < 0) {
		qsm_set_err(err, errlen, "Could not write '%s': %s", name, strerror(-ret));
		return ret;
	}
	if (o->prealloc == QSM_PREALLOC_OFF)
		return 0;

	struct qsm_image *img;
	qsm_io_hold(io);
	if ((ret = qsm_open_io(io->base, io, NULL, &img, err, errlen)) < 0)
		return ret; /* the open dropped its reference */
	/* Still inside qsm_create: the handle may block (qsm_io.h). */
	qsm_io_set_live(io, false);
	ret = preallocate(img, o->prealloc);
	int r2 = qsm_close(img);
	if (!ret)
		ret = r2;
	if (ret < 0)
		qsm_set_err(err, errlen, "Could not preallocate '%s': %s", name, strerror(-ret));
	return ret;
}

int qsm_create(const char *path, const struct qsm_create_opts *o, char *err, size_t errlen)
{
	struct qsm_create_opts opts;
	int ret = qsm_opts_import(&opts, sizeof(opts), o, o ? o->struct_size : 0,
				  QSM_CREATE_OPTS_SIZE_0, "qsm_create_opts", err, errlen);
	if (ret < 0)
		return ret;
	/* Everything checked before the file is created (or truncated). */
	uint8_t *bytes;
	size_t len;
	if ((ret = create_bytes(&opts, &bytes, &len, err, errlen)) < 0)
		return ret;

	struct event_base *base = event_base_new();
	struct qsm_io *io = NULL;
	if (!base) {
		free(bytes);
		return -ENOMEM;
	}
	ret = qsm_io_open_path(base, path, QSM_IO_CREATE, "threads", &io);
	if (ret < 0) {
		free(bytes);
		qsm_set_err(err, errlen, "Could not create '%s': %s", path, strerror(-ret));
	} else {
		ret = create_on_io(io, &opts, bytes, len, path, err, errlen);
		qsm_io_close(io);
	}
	event_base_free(base);
	return ret;
}

int qsm_create_io(struct qsm_io *io, const struct qsm_create_opts *o, char *err, size_t errlen)
{
	struct qsm_create_opts opts;
	int ret = qsm_opts_import(&opts, sizeof(opts), o, o ? o->struct_size : 0,
				  QSM_CREATE_OPTS_SIZE_0, "qsm_create_opts", err, errlen);
	if (ret < 0)
		return ret;
	if (!io) {
		qsm_set_err(err, errlen, "qsm_create_io: no I/O handle");
		return -EINVAL;
	}
	if (io->flags & QSM_IO_RDONLY) {
		qsm_set_err(err, errlen, "Could not create the image: the I/O handle is read-only");
		return -EBADF;
	}
	uint8_t *bytes;
	size_t len;
	if ((ret = create_bytes(&opts, &bytes, &len, err, errlen)) < 0)
		return ret;
	return create_on_io(io, &opts, bytes, len, io->ops->name, err, errlen);
}
