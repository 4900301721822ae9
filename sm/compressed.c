/*
 * sm/compressed.c: compressed clusters: compressing a compressed write's
 * clusters on the image's worker pool (COMPRESS), placing and writing the
 * bytes (BYTE_ALLOC, COMPRESSED_WRITE), and reading and decompressing one
 * (COMPRESSED_READ, DECOMPRESS), for a read or as the COW source of a
 * write.  The codec is metadata/compress.c (zlib or zstd, as the header's
 * compression_type says), the descriptor metadata/l2entry.h.
 *
 *   write_compressed: START > COMPRESS > L1_LOOKUP ... L2_LOOKUP
 *          --compressed--> BYTE_ALLOC > COMPRESSED_WRITE > L2_UPDATE
 *          > NEXT_RUN > COMPRESS (the next cluster) | ...
 *   read:  L2_LOOKUP --compressed--> COMPRESSED_READ > DECOMPRESS > NEXT_RUN
 *   write: CLUSTER_ALLOC --compressed--> COMPRESSED_READ > DECOMPRESS
 *          > ALLOC_WRITE
 *
 * Transition -> function
 *   COMPRESS -> L1_LOOKUP ............. compress_done (the batch's last
 *                                  job), or qsm_step_compress when the
 *                                  run's cluster is in the current batch
 *   COMPRESS -> COMPRESS .............. work_room_cb (room in the pool: WAKE)
 *   BYTE_ALLOC -> COMPRESSED_WRITE|REFBLOCK_LOAD .. qsm_step_byte_alloc
 *   COMPRESSED_WRITE -> L2_UPDATE ..... qsm_req_io_cb
 *                                  (qsm_step_compressed_write's write)
 *   COMPRESSED_READ -> DECOMPRESS ..... qsm_req_io_cb
 *                                  (qsm_step_compressed_read's read)
 *   DECOMPRESS -> NEXT_RUN|ALLOC_WRITE .. decompress_done (a read's part is
 *                                  copied out; a write keeps the cluster)
 *   DECOMPRESS -> DECOMPRESS .......... work_room_cb (room in the pool: WAKE)
 *
 * Invariants (numbered across sm/, see sm/dispatch.c)
 *  9. A worker thread touches only its job's buffers, the request's (which
 *     nothing else touches until the job is done) and constants of the
 *     image (io/work.h contract 1); every state change happens back on the
 *     loop, from the job's done callback.
 * 10. The bytes BYTE_ALLOC reserves are held (run.bytes_held) until
 *     L2_UPDATE maps them; a request failing in between gives them back
 *     (req_complete), so no refcount is left without a reference.
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metadata/compress.h"
#include "sm/steps.h"

enum qsm_event qsm_step_compressed_read(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t off, len;
	qcow2_compressed_extent(img->cluster_bits, run->old_entry, &off, &len);
	run->csize = (size_t)len;
	if (posix_memalign((void **)&run->cbuf, 4096, QSM_ALIGN_UP(run->csize, 4096)))
		return fail(req, -ENOMEM);
	req->iov_buf[0] = (struct iovec){ run->cbuf, run->csize };
	return qsm_submit_io(req, QSM_IO_READ, req->machine == QSM_M_READ ? QSM_IO_EV_DATA_READ
								       : QSM_IO_EV_COW_READ,
			 off, req->iov_buf, 1);
}

/* The pool has room again: run the waiting step again (WAKE). */
static void work_room_cb(struct qsm_work_waiter *w)
{
	struct qsm_req *req = container_of(w, struct qsm_req, work_wait);
	req->work_waiting = false;
	/* From the pool's loop callback: the image's run event (or the
	 * finishing job's done, which drains) runs the posted event. */
	qsm_sm_post(req, QSM_E_WAKE, 0);
}

/*
 * Hand req->work to the image's pool.  QSM_E_WAIT either way: the job's done
 * callback posts the next event, or, when the pool is full (-EAGAIN), the
 * room waiter posts WAKE and the state's step runs again.
 */
static enum qsm_event submit_work(struct qsm_req *req, qsm_work_fn fn, qsm_work_fn done)
{
	struct qsm_work_pool *pool;
	int ret = qsm_image_work(req->img, &pool);
	if (ret < 0)
		return fail(req, ret);
	req->work = (struct qsm_work){ .fn = fn, .done = done };
	req->work_ret = 0;
	ret = qsm_work_submit(pool, &req->work);
	if (ret == -EAGAIN) {
		req->work_wait.cb = work_room_cb;
		req->work_waiting = true;
		qsm_work_wait(pool, &req->work_wait);
		return QSM_E_WAIT;
	}
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

/*
 * DECOMPRESS, on a worker thread: decompress (metadata/compress.c)
 * run->cbuf into run->bounce, which must come out exactly one cluster long;
 * a read copies its part out to the caller's buffers (the request owns them
 * until it completes, and nothing else runs for it meanwhile).  Touches only
 * the request's buffers and constants of the image (io/work.h contract 1).
 */
static void decompress_fn(struct qsm_work *w)
{
	struct qsm_req *req = container_of(w, struct qsm_req, work);
	struct qsm_run *run = &req->run;
	uint64_t cluster_size = req->img->cluster_size;

	req->work_ret = qcow2_decompress(req->img->hdr.compression_type, run->cbuf, run->csize,
				     run->bounce, (size_t)cluster_size);
	if (req->work_ret < 0)
		return;
	if (req->machine == QSM_M_READ)
		qsm_iov_from_buf(req->iov, req->iovcnt, req->done,
				 run->bounce + (run->offset & (cluster_size - 1)), run->bytes);
}

/* DECOMPRESS, back on the loop. */
static void decompress_done(struct qsm_work *w)
{
	struct qsm_req *req = container_of(w, struct qsm_req, work);
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	free(run->cbuf);
	run->cbuf = NULL;
	if (req->machine == QSM_M_READ || req->work_ret < 0) {
		free(run->bounce);
		run->bounce = NULL;
	}
	if (req->work_ret == -EIO)
		snprintf(img->errmsg, sizeof(img->errmsg),
			 "compressed cluster at guest offset %#llx does not decompress (%s) "
			 "to one cluster",
			 (unsigned long long)QSM_ALIGN_DOWN(run->offset, img->cluster_size),
			 qcow2_compression_name(img->hdr.compression_type));
	qsm_sm_post(req, req->work_ret < 0 ? QSM_E_ERROR : QSM_E_FINISHED, req->work_ret);
	qsm_sm_drain(img);
}

/*
 * Decompress the bytes COMPRESSED_READ fetched, on the image's worker
 * pool: the loop serves other requests meanwhile.  Reads get their part
 * copied out; writes keep the cluster as the COW source for ALLOC_WRITE.
 * Entered again (WAKE) when the pool was full.
 */
enum qsm_event qsm_step_decompress(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	if (posix_memalign((void **)&run->bounce, 4096, img->cluster_size))
		return fail(req, -ENOMEM);
	enum qsm_event ev = submit_work(req, decompress_fn, decompress_done);
	if (req->work_waiting) {
		free(run->bounce); /* not needed until the job is accepted */
		run->bounce = NULL;
	}
	return ev;
}

/* Free the compressed clusters of the request's batch. */
void qsm_cz_release(struct qsm_req *req)
{
	for (unsigned i = 0; i < req->nb_cz; i++) {
		free(req->cz[i].out);
		req->cz[i].out = NULL;
	}
	req->nb_cz = 0;
}

/*
 * COMPRESS, on a worker thread: compress one cluster of the caller's data
 * (zero padded past the end of the disk) as QEMU's qcow2_co_compress does
 * (metadata/compress.c), into at most cluster_size - 1 bytes; a cluster
 * that does not fit is stored as is (out NULL).  Touches only the job's
 * buffers and the caller's data.
 */
static void compress_fn(struct qsm_work *w)
{
	struct qsm_cjob *j = container_of(w, struct qsm_cjob, work);
	struct qsm_req *req = j->req;
	size_t cs = (size_t)req->img->cluster_size;
	uint8_t *in = malloc(cs), *out = malloc(cs);

	j->out = NULL;
	j->clen = 0;
	j->ret = 0;
	if (!in || !out) {
		j->ret = -ENOMEM;
		goto out;
	}
	qsm_iov_to_buf(req->iov, req->iovcnt, j->skip, in, j->len);
	memset(in + j->len, 0, cs - j->len);
	j->ret = qcow2_compress(req->img->hdr.compression_type, in, cs, out, cs - 1, &j->clen);
	if (j->ret == 0 && j->clen) {
		j->out = out;
		out = NULL;
	}
out:
	free(in);
	free(out);
}

/* COMPRESS, back on the loop: the batch moves on when its last job is in. */
static void compress_done(struct qsm_work *w)
{
	struct qsm_cjob *j = container_of(w, struct qsm_cjob, work);
	struct qsm_req *req = j->req;
	if (j->ret < 0 && !req->cz_ret)
		req->cz_ret = j->ret;
	assert(req->cz_pending > 0);
	if (--req->cz_pending == 0) {
		qsm_sm_post(req, req->cz_ret < 0 ? QSM_E_ERROR : QSM_E_FINISHED, req->cz_ret);
		qsm_sm_drain(req->img);
	}
}

/*
 * COMPRESS: the run's cluster must be compressed before its lookup.  When
 * it is in the current batch, pass through; otherwise compress the next
 * QSM_CZ_BATCH clusters of the request (fewer when the pool is nearly full,
 * or wait for room: WAKE runs this again), one job each, in parallel.
 */
enum qsm_event qsm_step_compress(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	uint64_t cs = img->cluster_size;
	uint64_t idx = req->done >> img->cluster_bits;
	struct qsm_work_pool *pool;
	int ret;

	assert(QSM_IS_ALIGNED(req->done, cs));
	if (req->nb_cz && idx >= req->cz_first && idx < req->cz_first + req->nb_cz)
		return QSM_E_FINISHED;
	qsm_cz_release(req);
	if (!req->cz && !(req->cz = calloc(QSM_CZ_BATCH, sizeof(*req->cz))))
		return fail(req, -ENOMEM);
	if ((ret = qsm_image_work(img, &pool)) < 0)
		return fail(req, ret);
	uint64_t left = QSM_DIV_ROUND_UP(req->bytes - req->done, cs);
	unsigned n = (unsigned)QSM_MIN(left, QSM_CZ_BATCH);
	req->cz_first = idx;
	req->cz_pending = 0;
	req->cz_ret = 0;
	for (unsigned i = 0; i < n; i++) {
		struct qsm_cjob *j = &req->cz[i];
		uint64_t skip = req->done + i * cs;
		*j = (struct qsm_cjob){
			.work = { .fn = compress_fn, .done = compress_done },
			.req = req, .skip = skip, .len = QSM_MIN(cs, req->bytes - skip),
		};
		ret = qsm_work_submit(pool, &j->work);
		if (ret < 0)
			break;
		req->nb_cz++;
		req->cz_pending++;
	}
	if (req->nb_cz)
		return QSM_E_WAIT; /* the last job's done posts FINISHED */
	if (ret != -EAGAIN)
		return fail(req, ret);
	req->work_wait.cb = work_room_cb;
	req->work_waiting = true;
	qsm_work_wait(pool, &req->work_wait);
	return QSM_E_WAIT;
}

/*
 * BYTE_ALLOC: reserve the compressed bytes (metadata/refcount.c,
 * qsm_refcount_alloc_bytes: packed after the previous compressed cluster, as
 * qemu-img does) and claim the guest cluster for the allocation (invariant 2)
 * until L2_UPDATE.  In memory, on the loop: allocations stay ordered however
 * the compressions finished.
 */
enum qsm_event qsm_step_byte_alloc(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t fresh;

	if (img->error) {
		release_l2(req);
		return fail(req, -EIO);
	}
	int ret = qsm_refcount_alloc_bytes(img->rc, run->clen, &run->host, &fresh, qsm_req_rcw(req));
	if (ret == -EAGAIN) {
		/* No claim on the guest cluster yet: L2_LOOKUP classifies again. */
		release_l2(req);
		return qsm_rc_wait(req, QSM_E_LOADED);
	}
	qsm_refcount_unpin(img->rc, &req->rcw);
	ret = qsm_image_rc_error(img, ret);
	if (ret < 0) {
		release_l2(req);
		return fail(req, ret);
	}
	run->bytes_held = true;
	if (fresh) {
		if (qsm_is_metadata(img, fresh)) {
			release_l2(req);
			return fail(req, qsm_image_corrupt(img, "Preventing invalid write on metadata (overlaps with %s)",
							    qsm_metadata_kind(img, fresh)));
		}
		img->stats.clusters_allocated++;
		qsm_prealloc_ahead(img, fresh + img->cluster_size);
	}
	run->alloc = (struct qsm_alloc){ .first = cluster_of(img, run->offset), .count = 1,
					 .host = run->host };
	run->alloc.next = img->allocs;
	if (img->allocs)
		img->allocs->prev = &run->alloc;
	img->allocs = &run->alloc;
	run->alloc_linked = true;
	run->allocating = true;
	return QSM_E_ALLOCATED;
}

enum qsm_event qsm_step_compressed_write(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	req->iov_buf[0] = (struct iovec){ (void *)run->cdata, run->clen };
	return qsm_submit_io(req, QSM_IO_WRITE, QSM_IO_EV_COMPRESSED_WRITE, run->host, req->iov_buf, 1);
}
