/*
 * io/io_uring.c: the io_uring backend (built only with liburing).
 *
 * One ring of QSM_URING_DEPTH entries and as many slots.  A request holds one
 * slot from start to completion; a slot has at most one SQE prepared or in
 * the kernel, so the submission queue can never be full (the slot count is
 * the real limit) and requests arriving while every slot is busy wait on an
 * overflow FIFO, started as slots free up.  The ring's eventfd is watched by
 * a libevent event; each wake-up reaps every CQE.
 *
 * Per-slot progress (the request struct has no room for it):
 *   RW      readv/writev of [done, len); a short transfer resubmits the rest,
 *           a read returning 0 (EOF) zero-fills the rest, a write returning
 *           0 fails with -EIO.  At most QSM_URING_SLICE iovecs per SQE.
 *   FALLOC  ZERO (ZERO_RANGE) or DISCARD (PUNCH_HOLE|KEEP_SIZE).  On
 *           -EOPNOTSUPP, DISCARD succeeds and ZERO moves to ZEROES.
 *   ZEROES  writev of qsm_io_zero_buf_ chunks over [done, len).
 *   FSYNC   fsync with IORING_FSYNC_DATASYNC.
 * TRUNCATE runs ftruncate at submit and completes through the deferred list;
 * zero-length transfers complete the same way without touching the ring.
 *
 * Batching: preparing an SQE only activates ur_submit_ev; that event runs
 * after the callbacks of the current loop pass, so every SQE prepared in one
 * pass goes to the kernel in a single io_uring_submit().
 *
 * Invariants:
 *  1. ur_busy == slots in use + requests on the overflow list; ur_ev is added
 *     exactly while ur_busy > 0.
 *  2. The overflow list is non-empty only while no slot is free.
 */
#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <linux/falloc.h>

#include <event2/event.h>
#include <liburing.h>

#include "io/io.h"
#include "io/io_internal.h"
#include "io/util.h"

#define QSM_URING_DEPTH 256
#define QSM_URING_SLICE 64

enum qsm_uring_phase {
	QSM_URING_RW,
	QSM_URING_FALLOC,
	QSM_URING_ZEROES,
	QSM_URING_FSYNC,
};

struct qsm_uring_slot {
	struct qsm_io_req *sl_req;      /* NULL when free */
	enum qsm_uring_phase sl_phase;
	uint64_t sl_done;               /* bytes finished (RW, ZEROES) */
	struct iovec sl_iov[QSM_URING_SLICE]; /* remainder slice / zero chunk */
	struct qsm_uring_slot *sl_next_free;
};

struct qsm_io_uring {
	struct qsm_io_common c;         /* first */
	struct qsm_io_fds ur_fds;
	struct io_uring ur_ring;
	bool ur_ring_ok;
	int ur_efd;
	struct event *ur_ev;            /* ur_efd readable: reap CQEs */
	struct event *ur_submit_ev;     /* SQEs prepared: io_uring_submit */
	uint64_t ur_busy;               /* invariant 1 */
	struct qsm_uring_slot *ur_free;
	struct qsm_io_req *ur_over_head, **ur_over_tail;
	struct qsm_uring_slot ur_slots[QSM_URING_DEPTH];
};

static struct qsm_io_uring *qsm_io_uring_of(struct qsm_io *io)
{
	return container_of(io, struct qsm_io_uring, c.io);
}

/* --- Availability ------------------------------------------------------------ */

static pthread_once_t qsm_uring_probe_once = PTHREAD_ONCE_INIT;
static bool qsm_uring_ok;

static void qsm_uring_probe(void)
{
	struct io_uring ring;

	if (io_uring_queue_init(2, &ring, 0) == 0) {
		qsm_uring_ok = true;
		io_uring_queue_exit(&ring);
	}
}

bool qsm_io_uring_available(void)
{
	pthread_once(&qsm_uring_probe_once, qsm_uring_probe);
	return qsm_uring_ok;
}

/* --- Issuing ------------------------------------------------------------------ */

/* Prepare the SQE for the slot's current phase and progress.  Never fails:
 * a slot has at most one SQE outstanding and the ring has a place per slot. */
static void qsm_uring_prep(struct qsm_io_uring *u, struct qsm_uring_slot *sl)
{
	struct qsm_io_req *req = sl->sl_req;
	struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ur_ring);
	const struct iovec *v;
	int cnt, fd;
	uint64_t off = req->offset + sl->sl_done;

	assert(sqe);
	switch (sl->sl_phase) {
	case QSM_URING_RW:
		if (sl->sl_done == 0 && req->iovcnt <= IOV_MAX) {
			v = req->iov;
			cnt = req->iovcnt;
			fd = qsm_io_fds_pick_(&u->ur_fds, off, req->len, v, cnt);
		} else {
			/* The rest, at most QSM_URING_SLICE entries of it. */
			uint64_t skip = sl->sl_done, left = req->len - sl->sl_done, bytes = 0;
			cnt = 0;
			for (int i = 0; i < req->iovcnt && left > 0 && cnt < QSM_URING_SLICE; i++) {
				size_t l = req->iov[i].iov_len;
				if (skip >= l) {
					skip -= l;
					continue;
				}
				size_t n = QSM_MIN(l - skip, left);
				sl->sl_iov[cnt].iov_base = (char *)req->iov[i].iov_base + skip;
				sl->sl_iov[cnt].iov_len = n;
				cnt++;
				left -= n;
				bytes += n;
				skip = 0;
			}
			v = sl->sl_iov;
			fd = qsm_io_fds_pick_(&u->ur_fds, off, bytes, v, cnt);
		}
		if (req->op == QSM_IO_READ)
			io_uring_prep_readv(sqe, fd, v, (unsigned)cnt, off);
		else
			io_uring_prep_writev(sqe, fd, v, (unsigned)cnt, off);
		break;
	case QSM_URING_FALLOC:
		io_uring_prep_fallocate(sqe, u->ur_fds.fd,
					req->op == QSM_IO_ZERO ? FALLOC_FL_ZERO_RANGE
					: req->op == QSM_IO_PREALLOC ? 0
					: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					req->offset, req->len);
		break;
	case QSM_URING_ZEROES: {
		uint64_t n = QSM_MIN(req->len - sl->sl_done, (uint64_t)QSM_IO_ZERO_BUF_SIZE);
		sl->sl_iov[0].iov_base = qsm_io_zero_buf_;
		sl->sl_iov[0].iov_len = n;
		fd = qsm_io_fds_pick_(&u->ur_fds, off, n, sl->sl_iov, 1);
		io_uring_prep_writev(sqe, fd, sl->sl_iov, 1, off);
		break;
	}
	case QSM_URING_FSYNC:
		io_uring_prep_fsync(sqe, u->ur_fds.fd, IORING_FSYNC_DATASYNC);
		break;
	}
	io_uring_sqe_set_data(sqe, sl);
	event_active(u->ur_submit_ev, EV_WRITE, 0);
}

static void qsm_uring_start(struct qsm_io_uring *u, struct qsm_uring_slot *sl,
			    struct qsm_io_req *req)
{
	sl->sl_req = req;
	sl->sl_done = 0;
	switch (req->op) {
	case QSM_IO_READ:
	case QSM_IO_WRITE:
		sl->sl_phase = QSM_URING_RW;
		break;
	case QSM_IO_ZERO:
	case QSM_IO_DISCARD:
	case QSM_IO_PREALLOC:
		sl->sl_phase = QSM_URING_FALLOC;
		break;
	default:
		sl->sl_phase = QSM_URING_FSYNC;
		break;
	}
	qsm_uring_prep(u, sl);
}

static void qsm_uring_submit_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_io_uring *u = arg;
	int r;

	do
		r = io_uring_submit(&u->ur_ring);
	while (r == -EINTR);
	/* -EAGAIN/-EBUSY: the kernel is short of resources; the SQEs stay in
	 * the ring, try again on the next pass. */
	if (r < 0)
		event_active(u->ur_submit_ev, EV_WRITE, 0);
}

/* --- Completing ------------------------------------------------------------------ */

/* The slot's request is done: free the slot (starting an overflow request in
 * it), then complete.  Returns true when the handle is closed. */
static bool qsm_uring_finish(struct qsm_io_uring *u, struct qsm_uring_slot *sl, int ret)
{
	struct qsm_io_req *req = sl->sl_req;
	struct qsm_io_req *next = u->ur_over_head;

	if (next) {
		u->ur_over_head = next->io_next;
		if (!u->ur_over_head)
			u->ur_over_tail = &u->ur_over_head;
		next->io_next = NULL;
		qsm_uring_start(u, sl, next);
	} else {
		sl->sl_req = NULL;
		sl->sl_next_free = u->ur_free;
		u->ur_free = sl;
	}
	assert(u->ur_busy > 0);
	if (--u->ur_busy == 0)
		event_del(u->ur_ev);

	qsm_io_enter_(&u->c.io);
	qsm_io_complete_(&u->c.io, req, ret);
	return qsm_io_leave_(&u->c.io);
}

/* One CQE.  Returns true when the handle is closed. */
static bool qsm_uring_handle(struct qsm_io_uring *u, struct qsm_uring_slot *sl, int res)
{
	struct qsm_io_req *req = sl->sl_req;

	if (res == -EINTR || res == -EAGAIN) {
		qsm_uring_prep(u, sl);
		return false;
	}
	switch (sl->sl_phase) {
	case QSM_URING_RW:
	case QSM_URING_ZEROES:
		if (res < 0)
			return qsm_uring_finish(u, sl, res);
		if (res == 0) {
			if (req->op != QSM_IO_READ)
				return qsm_uring_finish(u, sl, -EIO); /* never short */
			qsm_iov_memset(req->iov, req->iovcnt, sl->sl_done, 0,
				       req->len - sl->sl_done);
			return qsm_uring_finish(u, sl, 0); /* EOF reads as zeros */
		}
		sl->sl_done += (uint64_t)res;
		if (sl->sl_done < req->len) {
			qsm_uring_prep(u, sl);
			return false;
		}
		return qsm_uring_finish(u, sl, 0);
	case QSM_URING_FALLOC:
		if (res == -EOPNOTSUPP) {
			if (req->op == QSM_IO_DISCARD || req->op == QSM_IO_PREALLOC)
				return qsm_uring_finish(u, sl, 0); /* advisory */
			sl->sl_phase = QSM_URING_ZEROES;
			sl->sl_done = 0;
			qsm_uring_prep(u, sl);
			return false;
		}
		return qsm_uring_finish(u, sl, res);
	case QSM_URING_FSYNC:
		return qsm_uring_finish(u, sl, res);
	}
	return false;
}

static void qsm_uring_event_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_io_uring *u = arg;
	struct io_uring_cqe *cqe;
	uint64_t cnt;

	if (read(u->ur_efd, &cnt, sizeof(cnt)) < 0) {
		/* EAGAIN: stale wake-up; the CQ ring decides. */
	}
	while (io_uring_peek_cqe(&u->ur_ring, &cqe) == 0) {
		struct qsm_uring_slot *sl = io_uring_cqe_get_data(cqe);
		int res = cqe->res;

		io_uring_cqe_seen(&u->ur_ring, cqe);
		assert(sl && sl->sl_req);
		if (qsm_uring_handle(u, sl, res))
			return; /* the callback closed (or abandoned) the handle */
	}
}

static void qsm_io_uring_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct qsm_io_uring *u = qsm_io_uring_of(io);

	if (req->op == QSM_IO_TRUNCATE) {
		qsm_io_defer_complete_(io, req, qsm_io_fds_truncate_(&u->ur_fds, req->offset));
		return;
	}
	if (req->len == 0 && req->op != QSM_IO_FLUSH) {
		qsm_io_defer_complete_(io, req, 0);
		return;
	}
	if (u->ur_busy++ == 0 && event_add(u->ur_ev, NULL) < 0) {
		u->ur_busy--;
		qsm_io_defer_complete_(io, req, -ENOMEM);
		return;
	}
	struct qsm_uring_slot *sl = u->ur_free;
	if (!sl) {
		req->io_next = NULL;
		*u->ur_over_tail = req;
		u->ur_over_tail = &req->io_next;
		return;
	}
	u->ur_free = sl->sl_next_free;
	qsm_uring_start(u, sl, req);
}

/* --- Synchronous helpers, open, close ------------------------------------------- */

static int qsm_io_uring_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	struct iovec v = { .iov_base = buf, .iov_len = len };
	return qsm_io_fds_rw_(&qsm_io_uring_of(io)->ur_fds, false, &v, 1, off, len);
}

static int qsm_io_uring_pwrite_sync(struct qsm_io *io, const void *buf, size_t len,
				    uint64_t off)
{
	struct iovec v = { .iov_base = (void *)buf, .iov_len = len };
	return qsm_io_fds_rw_(&qsm_io_uring_of(io)->ur_fds, true, &v, 1, off, len);
}

static int qsm_io_uring_flush_sync(struct qsm_io *io)
{
	return qsm_io_fds_flush_(&qsm_io_uring_of(io)->ur_fds);
}

static int qsm_io_uring_truncate_sync(struct qsm_io *io, uint64_t size)
{
	return qsm_io_fds_truncate_(&qsm_io_uring_of(io)->ur_fds, size);
}

static int qsm_io_uring_get_size(struct qsm_io *io, uint64_t *size)
{
	return qsm_io_fds_get_size_(&qsm_io_uring_of(io)->ur_fds, size);
}

static int qsm_io_uring_allocated(struct qsm_io *io, uint64_t *bytes)
{
	return qsm_io_fds_allocated_(&qsm_io_uring_of(io)->ur_fds, bytes);
}

static int qsm_io_uring_extent(struct qsm_io *io, uint64_t off, uint64_t len, bool *data,
			       uint64_t *run)
{
	return qsm_io_fds_extent_(&qsm_io_uring_of(io)->ur_fds, off, len, data, run);
}

/* cm_quiesce (qsm_io_abandon): every slot in use has exactly one SQE,
 * prepared or in the kernel.  Submit the prepared ones and reap one CQE per
 * busy slot, so the kernel is done with every buffer before the ring goes
 * (io_uring_queue_exit would let in-flight reads land later); the requests
 * are forgotten, short transfers not continued, overflow ones never start. */
static void qsm_io_uring_quiesce(struct qsm_io *io)
{
	struct qsm_io_uring *u = qsm_io_uring_of(io);
	unsigned busy = 0;

	if (!u->ur_ring_ok)
		return;
	for (unsigned i = 0; i < QSM_URING_DEPTH; i++)
		if (u->ur_slots[i].sl_req)
			busy++;
	while (busy > 0) {
		struct io_uring_cqe *cqe;
		int r = io_uring_submit_and_wait(&u->ur_ring, 1);
		if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY)
			break; /* the ring is unusable: nothing more will land */
		while (busy > 0 && io_uring_peek_cqe(&u->ur_ring, &cqe) == 0) {
			io_uring_cqe_seen(&u->ur_ring, cqe);
			busy--;
		}
	}
	u->ur_free = NULL;
	for (unsigned i = 0; i < QSM_URING_DEPTH; i++) {
		u->ur_slots[i].sl_req = NULL;
		u->ur_slots[i].sl_next_free = u->ur_free;
		u->ur_free = &u->ur_slots[i];
	}
	u->ur_over_head = NULL;
	u->ur_over_tail = &u->ur_over_head;
	if (u->ur_busy && u->ur_ev)
		event_del(u->ur_ev);
	if (u->ur_submit_ev)
		event_del(u->ur_submit_ev);
	u->ur_busy = 0;
}

/* Also the error path of open: copes with a partly built handle. */
static void qsm_io_uring_close(struct qsm_io *io)
{
	struct qsm_io_uring *u = qsm_io_uring_of(io);

	assert(u->ur_busy == 0);
	if (u->ur_ev)
		event_free(u->ur_ev);
	if (u->ur_submit_ev)
		event_free(u->ur_submit_ev);
	if (u->ur_ring_ok)
		io_uring_queue_exit(&u->ur_ring);
	if (u->ur_efd >= 0)
		close(u->ur_efd);
	qsm_io_fds_close_(&u->ur_fds);
	qsm_io_common_fini_(&u->c);
	free(u);
}

static const struct qsm_io_ops qsm_io_uring_ops = {
	.name = "io_uring",
	.submit = qsm_io_uring_submit,
	.pread_sync = qsm_io_uring_pread_sync,
	.pwrite_sync = qsm_io_uring_pwrite_sync,
	.flush_sync = qsm_io_uring_flush_sync,
	.truncate_sync = qsm_io_uring_truncate_sync,
	.get_size = qsm_io_uring_get_size,
	.extent = qsm_io_uring_extent,
	.allocated = qsm_io_uring_allocated,
	.close = qsm_io_uring_close,
};

int qsm_io_open_uring(struct event_base *base, const char *path, int flags,
		      struct qsm_io **out)
{
	struct qsm_io_uring *u;
	int ret;

	*out = NULL;
	if (!base)
		return -EINVAL;
	u = calloc(1, sizeof(*u));
	if (!u)
		return -ENOMEM;
	u->ur_fds.fd = u->ur_fds.dfd = -1;
	u->ur_efd = -1;
	u->ur_over_tail = &u->ur_over_head;
	for (int i = QSM_URING_DEPTH - 1; i >= 0; i--) {
		u->ur_slots[i].sl_next_free = u->ur_free;
		u->ur_free = &u->ur_slots[i];
	}

	ret = qsm_io_common_init_(&u->c, &qsm_io_uring_ops, base, flags);
	if (ret < 0)
		goto fail;
	u->c.cm_quiesce = qsm_io_uring_quiesce;
	ret = qsm_io_fds_open_(&u->ur_fds, path, flags);
	if (ret < 0)
		goto fail;
	if (u->ur_fds.dfd >= 0) {
		u->c.io.mem_align = QSM_MAX(u->c.io.mem_align, u->ur_fds.dio_mem_align);
		qsm_io_set_dio_align_(&u->c, u->ur_fds.dio_off_align, u->ur_fds.dio_mem_align);
	}

	ret = io_uring_queue_init(QSM_URING_DEPTH, &u->ur_ring, 0);
	if (ret < 0)
		goto fail;
	u->ur_ring_ok = true;
	u->ur_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (u->ur_efd < 0) {
		ret = -errno;
		goto fail;
	}
	ret = io_uring_register_eventfd(&u->ur_ring, u->ur_efd);
	if (ret < 0)
		goto fail;
	u->ur_ev = event_new(base, u->ur_efd, EV_READ | EV_PERSIST, qsm_uring_event_cb, u);
	u->ur_submit_ev = event_new(base, -1, 0, qsm_uring_submit_cb, u);
	if (!u->ur_ev || !u->ur_submit_ev) {
		ret = -ENOMEM;
		goto fail;
	}
	*out = &u->c.io;
	return 0;

fail:
	qsm_io_uring_close(&u->c.io);
	return ret;
}
