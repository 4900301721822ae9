/*
 * sm/data.c: a run's data I/O: one read or write of guest data (DATA_READ,
 * DATA_WRITE, and JOIN_WRITE's write into another's allocation), the zeros
 * of a read of clusters that read as zeros (ZERO_FILL), and a raw image's
 * zero-range or discard (FILE_RANGE); qsm_submit_io, the one path by which
 * a request's data reaches io/, and its completion qsm_req_io_cb.
 *
 *   L2_LOOKUP (or START, raw) > DATA_READ | DATA_WRITE | FILE_RANGE
 *                --I/O done--> NEXT_RUN
 *   L1_LOOKUP | L2_LOOKUP > ZERO_FILL --finished--> NEXT_RUN
 *
 * Transition -> function
 *   DATA_READ -> NEXT_RUN ........ qsm_req_io_cb (qsm_step_data_io's read)
 *   DATA_WRITE -> NEXT_RUN ....... qsm_req_io_cb (qsm_step_data_io's write)
 *   FILE_RANGE -> NEXT_RUN ....... qsm_req_io_cb (qsm_step_file_range's)
 *   ZERO_FILL -> NEXT_RUN ........ qsm_step_zero_fill
 *   (JOIN_WRITE runs qsm_step_data_io too; its edge is in sm/alloc.c)
 *   DATA_READ|DATA_WRITE|JOIN_WRITE|COW_READ|ALLOC_WRITE|COMPRESSED_READ|COMPRESSED_WRITE -> BREAK ..
 *                                  qsm_submit_io (a blkdebug breakpoint
 *                                  on the I/O's event fired; CLUSTER_ALLOC's
 *                                  edge is in sm/alloc.c)
 *   BREAK -> DATA_READ|DATA_WRITE|JOIN_WRITE|COW_READ|ALLOC_WRITE|COMPRESSED_READ|COMPRESSED_WRITE|L2_LOOKUP ..
 *                                  qsm_req_resume_cb (resume TAG; the
 *                                  dispatcher takes req->brk_back and
 *                                  submits with qsm_req_resubmit; from
 *                                  CLUSTER_ALLOC, L2_LOOKUP runs again)
 *
 * Invariants (numbered across sm/, see sm/dispatch.c)
 *  7. A request has at most one I/O on its image's io/ handle in flight
 *     (req->io; reads of a backing image are requests of their own), and
 *     its completion posts exactly one event (IO_DONE or ERROR).  While a data
 *     I/O found through an L2 entry is in flight, qsm_submit_io notes its
 *     host range (io_busy), so the clusters it touches are not released to
 *     another allocation before it lands (invariant 5, sm/alloc.c).
 * 11. A request in BREAK has its I/O prepared in req->io and not submitted,
 *     its host range noted (io_busy) as if in flight; only resume takes it
 *     out, back to the state it stopped in (req->brk_back), which then
 *     waits for that I/O.  (From CLUSTER_ALLOC, stopped before taking any
 *     cluster and holding no table nor claim, brk_rerun: nothing
 *     prepared, back to L2_LOOKUP to classify the run again.)  Nothing else completes it: a close must resume
 *     every held request first (qemu-io's quit does).
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/blkdebug.h"
#include "sm/steps.h"

void qsm_req_io_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_req *req = container_of(io, struct qsm_req, io);
	struct qsm_image *img = req->img;
	if (req->io_busy) {
		req->io_busy = false;
		img->io_busy--;
	}
	if (img->nb_held_frees)
		qsm_wb_release_held(img);
	if (ret < 0)
		qsm_sm_post(req, QSM_E_ERROR, ret);
	else
		qsm_sm_post(req, QSM_E_IO_DONE, 0);
	qsm_sm_drain(img);
}

bool qsm_host_io_busy(const struct qsm_image *img, uint64_t cluster)
{
	uint64_t lo = cluster << img->cluster_bits, hi = lo + img->cluster_size;
	if (!img->io_busy)
		return false;
	for (const struct qsm_req *r = img->all; r; r = r->all_next)
		if (r->io_busy && r->io_lo < hi && lo < r->io_hi)
			return true;
	return false;
}

/*
 * Submit the request's one data I/O; completion posts IO_DONE or ERROR.
 * The host range is noted while in flight: a cluster found through an L2
 * entry (in-place writes, reads, COW sources, joined allocations) may be
 * unmapped meanwhile by a discard, a zero write or a compressed write, and
 * must not be handed to another allocation before this I/O is over, or a
 * late write would land in someone else's data (writeback.c, rule 4).
 */
enum qsm_event qsm_submit_io(struct qsm_req *req, enum qsm_io_op op, enum qsm_io_event tag,
				uint64_t host, const struct iovec *iov, int iovcnt)
{
	struct qsm_image *img = req->img;
	uint64_t len = qsm_iov_size(iov, iovcnt);
	if (op != QSM_IO_READ && img->corrupt)
		return fail(req, -EIO); /* nothing more is written (sm/image.c) */
	req->io = (struct qsm_io_req){
		.op = op, .event = tag, .offset = host, .len = len,
		.iov = iov, .iovcnt = iovcnt, .cb = qsm_req_io_cb,
	};
	if (op == QSM_IO_WRITE && host + len > img->file_end)
		img->file_end = host + len;
	assert(!req->io_busy);
	req->io_busy = len > 0;
	img->io_busy += req->io_busy;
	req->io_lo = host;
	req->io_hi = host + len;
	if (qsm_io_blkdebug_hold(img->io, &req->io, qsm_req_resume_cb)) {
		req->brk_rerun = false;
		req->brk_back = req->state;
		return QSM_E_BREAK; /* stopped, range still noted (invariant 11) */
	}
	qsm_io_submit(img->io, &req->io);
	return QSM_E_WAIT;
}

/* resume TAG released the request held at its breakpoint: back along the
 * TRANSITION_BACK edge (posted: this runs inside qemu-io's command). */
void qsm_req_resume_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_req *req = container_of(io, struct qsm_req, io);
	assert(req->state == QSM_S_BREAK && ret == 0);
	qsm_sm_post(req, QSM_E_RESUME, 0);
}

/* Back in the state it stopped in: the I/O its step prepared goes now. */
enum qsm_event qsm_req_resubmit(struct qsm_req *req)
{
	qsm_io_submit(req->img->io, &req->io);
	return QSM_E_WAIT;
}

/* The run's slice of the caller's buffers (or of the zero buffer for
 * write-zeroes runs written as data), placed at run.iov[first..]. */
int qsm_run_payload(struct qsm_req *req, struct iovec *dst, int cap)
{
	struct qsm_run *run = &req->run;
	if (req->machine == QSM_M_ZEROES) {
		/* Zero data for a partial cluster or a v2 image: at most one
		 * cluster per run, see qsm_classify_zeroes. */
		assert(run->bytes <= req->img->cluster_size);
		dst[0].iov_base = req->img->zero_buf;
		dst[0].iov_len = run->bytes;
		return 1;
	}
	return qsm_iov_slice(dst, cap, req->iov, req->iovcnt, req->done, run->bytes);
}

enum qsm_event qsm_step_data_io(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	int cnt = qsm_run_payload(req, req->iov_buf, req->iov_cap);
	assert(cnt > 0);
	if (req->state == QSM_S_DATA_READ)
		return qsm_submit_io(req, QSM_IO_READ, QSM_IO_EV_DATA_READ, run->host, req->iov_buf, cnt);
	return qsm_submit_io(req, QSM_IO_WRITE, QSM_IO_EV_DATA_WRITE, run->host, req->iov_buf, cnt);
}

/* Raw image, write-zeroes or discard: one zero-range or discard operation
 * on the file (discard is advisory there, as io/ documents). */
enum qsm_event qsm_step_file_range(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	req->io = (struct qsm_io_req){
		.op = req->machine == QSM_M_ZEROES ? QSM_IO_ZERO : QSM_IO_DISCARD,
		.event = QSM_IO_EV_DATA_WRITE, .offset = run->host, .len = run->bytes,
		.cb = qsm_req_io_cb,
	};
	qsm_io_submit(req->img->io, &req->io);
	return QSM_E_WAIT;
}

enum qsm_event qsm_step_zero_fill(struct qsm_req *req)
{
	qsm_iov_memset(req->iov, req->iovcnt, req->done, 0, req->run.bytes);
	return QSM_E_FINISHED;
}
