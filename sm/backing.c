/*
 * sm/backing.c: the backing chain: reads of unallocated clusters
 * (BACKING_READ), the zero probe of partial zero writes (BACKING_STATUS),
 * and the COW source of allocating writes over a backing file (COW_READ,
 * qsm_cow_read_backing).
 *
 *   L1_LOOKUP | L2_LOOKUP --backing--> BACKING_READ --I/O done--> NEXT_RUN
 *                                  copy-on-read: --copy--> COR_WRITE --I/O done--> NEXT_RUN
 *   L2_LOOKUP --backing (zeroes)--> BACKING_STATUS (--backing | zero-->
 *       BACKING_STATUS: one image of the chain per entry) --data | finished-->
 *       L1_LOOKUP
 *                               (looked up again; the answer in req->probe_*)
 *   CLUSTER_ALLOC --COW--> COW_READ --I/O done--> ALLOC_WRITE
 *
 * Transition -> function
 *   BACKING_READ -> NEXT_RUN ........ backing_read_cb (the backing image's
 *                                read; qsm_step_backing_read itself when
 *                                the run lies past the backing image's end)
 *   BACKING_READ -> COR_WRITE ....... cor_read_cb (copy-on-read: the whole
 *                                clusters are in cor_buf; cor_read itself
 *                                when nothing had to be read: zeros)
 *   COR_WRITE -> NEXT_RUN ........... cor_fill_cb (the fill request done;
 *                                qsm_step_cor_write itself when the image
 *                                is closing and takes no new request)
 *   BACKING_STATUS -> BACKING_STATUS .. probe_cb (one image answered:
 *                                ask the next one down, or the next range)
 *   BACKING_STATUS -> L1_LOOKUP ..... probe_cb (DATA: not known zeros), or
 *                                qsm_step_backing_status (FINISHED: every
 *                                range reads as zeros)
 *   (COW_READ -> ALLOC_WRITE, by cow_backing_cb here, is in sm/alloc.c)
 *
 * Invariants (numbered across sm/, see sm/dispatch.c)
 *  8. A backing image is read only through requests of its own (qsm_readv,
 *     qsm_block_status on the same loop), so its own machines and checks
 *     apply; the part of a run past its virtual size reads as zeros and is
 *     never asked for.
 * 11. Copy-on-read (QEMU's bdrv_co_do_copy_on_readv, and its
 *     copy-on-read filter): a read run of clusters the image does not
 *     allocate is widened to whole clusters [cor_off, +cor_len) (at most
 *     QSM_COR_MAX bytes, QEMU's bounce buffer), read whole from the chain,
 *     and the guest's part copied out of that buffer; the clusters are then
 *     written into the image by a fill request of their own
 *     (QSM_REQ_COR_FILL) before the read completes: zeros as a zero write
 *     (zero clusters on v3), anything else as data.  The fill writes only
 *     clusters still unallocated when it looks them up, and its allocation
 *     cannot be joined, so a guest write that raced the read is never
 *     overwritten with the older data.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "sm/steps.h"

static void backing_read_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	qsm_sm_post(req, ret < 0 ? QSM_E_ERROR : QSM_E_IO_DONE, ret);
}

/*
 * Unallocated clusters over a backing file: the part inside the backing
 * image's virtual size is read from it (a request of its own there, on the
 * same loop); past its end, and when the backing file was not opened
 * (no_backing), the run reads as zeros.
 */
/* QEMU's MAX_BOUNCE_BUFFER: copy-on-read copies at most this at once. */
#define QSM_COR_MAX (32768ull * 512)

static void cor_read_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	qsm_sm_post(req, ret < 0 ? QSM_E_ERROR : QSM_E_COPY, ret);
}

/* BACKING_READ with copy-on-read (invariant 11): read the run's whole
 * clusters into cor_buf. */
static enum qsm_event cor_read(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	struct qsm_image *b = img->backing;
	uint64_t start = QSM_ALIGN_DOWN(run->offset, img->cluster_size);

	if (run->offset + run->bytes > start + QSM_COR_MAX) {
		run->bytes = start + QSM_COR_MAX - run->offset;
		run->nb_clusters = run_clusters(img, run->offset, run->bytes);
	}
	uint64_t end = QSM_MIN(QSM_ALIGN_UP(run->offset + run->bytes, img->cluster_size),
			       img->hdr.size);
	uint64_t bsize = b ? b->hdr.size : 0;
	uint64_t n = start < bsize ? QSM_MIN(end, bsize) - start : 0;

	assert(!req->cor_buf);
	if (posix_memalign((void **)&req->cor_buf, 4096, (size_t)(end - start)))
		return fail(req, -ENOMEM);
	req->cor_off = start;
	req->cor_len = end - start;
	memset(req->cor_buf + n, 0, (size_t)(req->cor_len - n));
	if (n == 0)
		return QSM_E_COPY;
	req->cor_iov = (struct iovec){ req->cor_buf, (size_t)n };
	int ret = qsm_readv(b, start, &req->cor_iov, 1, cor_read_cb, req);
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

static void cor_fill_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	free(req->cor_buf); /* the fill, which wrote from it, is done */
	req->cor_buf = NULL;
	qsm_sm_post(req, ret < 0 ? QSM_E_ERROR : QSM_E_IO_DONE, ret);
}

static bool all_zero(const uint8_t *p, size_t len)
{
	return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

/*
 * COR_WRITE: the guest gets its part of the clusters read, then the fill
 * request writes them into the image (invariant 11).  A closing image takes
 * no new request: the read completes without the copy, as if the copy had
 * been made and lost.
 */
enum qsm_event qsm_step_cor_write(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	struct qsm_image *img = req->img;
	bool zero = all_zero(req->cor_buf, (size_t)req->cor_len);

	qsm_iov_from_buf(req->iov, req->iovcnt, req->done, req->cor_buf + (run->offset - req->cor_off),
			 run->bytes);
	req->cor_iov = (struct iovec){ req->cor_buf, (size_t)req->cor_len };
	int ret = qsm_cor_fill(img, req->cor_off, &req->cor_iov, 1, req->cor_len, zero,
			       cor_fill_cb, req);
	if (ret == -ESHUTDOWN) {
		free(req->cor_buf);
		req->cor_buf = NULL;
		return QSM_E_IO_DONE;
	}
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

enum qsm_event qsm_step_backing_read(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	if (wants_cor(req))
		return cor_read(req);
	struct qsm_image *b = req->img->backing;
	uint64_t bsize = b ? b->hdr.size : 0;
	uint64_t n = run->offset < bsize ? QSM_MIN(run->bytes, bsize - run->offset) : 0;

	if (n < run->bytes)
		qsm_iov_memset(req->iov, req->iovcnt, req->done + n, 0, run->bytes - n);
	if (n == 0)
		return QSM_E_IO_DONE;
	int cnt = qsm_iov_slice(req->iov_buf, req->iov_cap, req->iov, req->iovcnt, req->done, n);
	int ret = qsm_readv(b, run->offset, req->iov_buf, cnt, backing_read_cb, req);
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

/*
 * BACKING_STATUS answers the block status request of one image of the chain
 * (probe_img) about one range ([probe_off, +probe_len)): unallocated there
 * and the image has a backing file: the next image down decides (BACKING,
 * back into BACKING_STATUS); zeros: that range is answered (ZERO, back into
 * BACKING_STATUS for the next range); anything else: not known zeros (DATA).
 */
static void probe_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	struct qsm_image *b = req->probe_img;
	if (ret < 0) {
		qsm_sm_post(req, QSM_E_ERROR, ret);
		return;
	}
	uint64_t len = QSM_MIN(req->probe_len, b->hdr.size - req->probe_off);
	bool whole = req->probe_ext.length == len;
	if (whole && req->probe_ext.flags == 0 && qsm_get_backing(b)) {
		req->probe_img = qsm_get_backing(b);
		qsm_sm_post(req, QSM_E_BACKING, 0);
	} else if (whole && (req->probe_ext.flags & QSM_STATUS_ZERO)) {
		req->probe_len = 0;
		req->probe_img = NULL;
		qsm_sm_post(req, QSM_E_ZERO, 0);
	} else {
		req->probe_done = true; /* data, or not one run: not known zeros */
		req->probe_zero = false;
		qsm_sm_post(req, QSM_E_DATA, 0);
	}
}

/*
 * A partial zero write over an unallocated cluster of a v3 image with a
 * backing file.  QEMU turns it into a zero cluster when the rest of the
 * cluster (head and tail) already reads as zeros; find that out, image by
 * image down the chain, one entry of this state per question (one block
 * status request per image and range; past an image's end counts as zeros;
 * a run shorter than the range as not known zeros).  probe_img NULL: the
 * current range starts from the top of the chain.  The answer stays in the
 * request (FINISHED: all zeros; DATA from probe_cb: not) and the run is
 * looked up again, since the cluster may have changed meanwhile.
 */
enum qsm_event qsm_step_backing_status(struct qsm_req *req)
{
	if (!req->probe_len) {
		if (!req->probe_len2) {
			req->probe_done = req->probe_zero = true;
			return QSM_E_FINISHED;
		}
		req->probe_off = req->probe_off2;
		req->probe_len = req->probe_len2;
		req->probe_len2 = 0;
		req->probe_img = NULL;
	}
	if (!req->probe_img)
		req->probe_img = req->img->backing;
	struct qsm_image *b = req->probe_img;
	if (req->probe_off >= b->hdr.size) {
		req->probe_len = 0; /* past its end: zeros */
		req->probe_img = NULL;
		return QSM_E_ZERO;
	}
	uint64_t len = QSM_MIN(req->probe_len, b->hdr.size - req->probe_off);
	int ret = qsm_block_status(b, req->probe_off, len, &req->probe_ext, probe_cb, req);
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

static void cow_backing_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	if (ret < 0 && !req->io_ret)
		req->io_ret = ret;
	if (--req->io_pending == 0)
		qsm_sm_post(req, req->io_ret ? QSM_E_ERROR : QSM_E_IO_DONE, req->io_ret);
}

/* COW_READ over a backing file: head and tail read in parallel from the
 * backing image into a zeroed buffer (whatever is not read stays zeros). */
enum qsm_event qsm_cow_read_backing(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	size_t blen = (size_t)img->cluster_size * (run->nb_clusters > 1 ? 2 : 1);
	struct { uint64_t off; uint64_t len; uint8_t *buf; } part[2];
	unsigned n = 0;

	if (posix_memalign((void **)&run->bounce, 4096, blen))
		return fail(req, -ENOMEM);
	memset(run->bounce, 0, blen);
	uint64_t cstart = QSM_ALIGN_DOWN(run->offset, img->cluster_size);
	uint64_t bsize = img->backing->hdr.size;
	if (run->nb_clusters == 1 && run->bytes <= img->cluster_size / 2 && cstart < bsize) {
		/* A small write: read the whole cluster, the part the write will
		 * cover included, in one request.  One read instead of two, and
		 * the reads of neighbouring clusters touch, so the block layer
		 * merges them (partial writes over a backing file go as fast as
		 * the backing file reads sequentially). */
		part[n++] = (typeof(part[0])){ cstart, QSM_MIN(img->cluster_size, bsize - cstart),
					       run->bounce };
	} else {
		if (run->cow_head)
			part[n++] = (typeof(part[0])){ cstart, run->cow_head, run->bounce };
		if (run->cow_tail)
			part[n++] = (typeof(part[0])){ run->offset + run->bytes, run->cow_tail,
						       qsm_cow_tail_buf(req) };
	}
	assert(n > 0 && req->iov_cap >= 2);
	req->io_pending = n;
	req->io_ret = 0;
	for (unsigned i = 0; i < n; i++) {
		req->iov_buf[i] = (struct iovec){ part[i].buf, part[i].len };
		int ret = qsm_readv(img->backing, part[i].off, &req->iov_buf[i], 1,
				    cow_backing_cb, req);
		if (ret < 0) {
			req->io_pending -= n - i;
			if (!req->io_pending)
				return fail(req, ret);
			req->io_ret = ret; /* the read in flight reports it */
			break;
		}
	}
	return QSM_E_WAIT;
}
