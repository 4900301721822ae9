/*
 * io/io.c: the backend-independent half of io/.
 *
 * qsm_io_submit() is the one checked, traced door into every backend (the
 * nbdkit backend.c idea): it numbers the request, counts it, calls the trace
 * hook, validates it, and only then hands it to ops->submit.  A request that
 * fails validation never reaches the backend; it completes with -EINVAL (or
 * -EBADF for a write on a read-only handle) through the per-handle deferred
 * list, so even a caller's mistake never completes inline (contract 1).
 *
 * qsm_io_complete_() is the matching single exit: in_flight, byte counters and
 * the completion trace are kept there, then req->cb runs.
 *
 * The second half of the file holds the file-descriptor helpers the threads
 * and io_uring backends share: opening (with the two-descriptor O_DIRECT
 * scheme), choosing the descriptor per transfer, and the blocking whole-range
 * transfers used by worker threads and by every synchronous helper.
 *
 * Invariants:
 *  1. io->stats.in_flight == requests passed to qsm_io_submit() whose callback
 *     has not started yet, minus those a sim crash dropped: the ones pending
 *     then, and every one submitted after it (cm_down), so a crashed handle
 *     always closes with nothing in flight.
 *  2. cm_defer_count == length of the cm_defer_head list; cm_defer_ev is
 *     active whenever that list is non-empty.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <linux/falloc.h>
#include <linux/fs.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/io_internal.h"
#include "io/util.h"

#define QSM_IO_DEFAULT_ALIGN 4096u
#define QSM_IO_FLAGS_ALL (QSM_IO_RDONLY | QSM_IO_DIRECT | QSM_IO_CREATE)

char qsm_io_zero_buf_[QSM_IO_ZERO_BUF_SIZE] __attribute__((aligned(4096)));

/* --- Names ---------------------------------------------------------------- */

static const char *const qsm_io_event_names[] = {
#define X(name, str) [QSM_IO_EV_##name] = str,
	QSM_IO_EVENTS(X)
#undef X
};

const char *qsm_io_event_name(enum qsm_io_event ev)
{
	if ((unsigned)ev >= QSM_IO_EV__COUNT)
		return "invalid";
	return qsm_io_event_names[ev];
}

const char *qsm_io_op_name(enum qsm_io_op op)
{
	switch (op) {
	case QSM_IO_READ: return "read";
	case QSM_IO_WRITE: return "write";
	case QSM_IO_FLUSH: return "flush";
	case QSM_IO_ZERO: return "zero";
	case QSM_IO_DISCARD: return "discard";
	case QSM_IO_TRUNCATE: return "truncate";
	case QSM_IO_PREALLOC: return "prealloc";
	}
	return "invalid";
}

/* --- Common handle part and the deferred completion list ------------------ */

/* Drains the requests queued when this pass started; ones queued by their
 * callbacks wait for the next pass, so a caller resubmitting bad requests
 * from its callback cannot starve the loop. */
static void qsm_io_defer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_io_common *c = arg;
	size_t n = c->cm_defer_count;

	while (n-- > 0 && c->cm_defer_head) {
		struct qsm_io_req *req = c->cm_defer_head;
		c->cm_defer_head = req->io_next;
		if (!c->cm_defer_head)
			c->cm_defer_tail = &c->cm_defer_head;
		c->cm_defer_count--;
		req->io_next = NULL;

		qsm_io_enter_(&c->io);
		qsm_io_complete_(&c->io, req, req->io_ret);
		if (qsm_io_leave_(&c->io))
			return;
	}
	if (c->cm_defer_head)
		event_active(c->cm_defer_ev, EV_READ, 0);
}

int qsm_io_common_init_(struct qsm_io_common *c, const struct qsm_io_ops *ops,
			struct event_base *base, int flags)
{
	memset(c, 0, sizeof(*c));
	c->io.ops = ops;
	c->io.base = base;
	c->io.flags = flags;
	c->io.mem_align = QSM_IO_DEFAULT_ALIGN;
	c->cm_defer_tail = &c->cm_defer_head;
	c->cm_wait_tail = &c->cm_wait_head;
	c->cm_defer_ev = event_new(base, -1, 0, qsm_io_defer_cb, c);
	if (!c->cm_defer_ev)
		return -ENOMEM;
	return 0;
}

void qsm_io_common_fini_(struct qsm_io_common *c)
{
	assert(c->cm_defer_head == NULL);
	if (c->cm_defer_ev)
		event_free(c->cm_defer_ev);
	c->cm_defer_ev = NULL;
}

void qsm_io_defer_complete_(struct qsm_io *io, struct qsm_io_req *req, int ret)
{
	struct qsm_io_common *c = container_of(io, struct qsm_io_common, io);

	assert(ret <= 0);
	req->io_ret = ret;
	req->io_next = NULL;
	*c->cm_defer_tail = req;
	c->cm_defer_tail = &req->io_next;
	c->cm_defer_count++;
	event_active(c->cm_defer_ev, EV_READ, 0);
}

uint64_t qsm_io_crash_(struct qsm_io *io)
{
	struct qsm_io_common *c = container_of(io, struct qsm_io_common, io);
	uint64_t n = c->cm_defer_count;

	c->cm_down = true;

	c->cm_defer_head = NULL;
	c->cm_defer_tail = &c->cm_defer_head;
	c->cm_defer_count = 0;
	event_del(c->cm_defer_ev); /* also removes it from the active queue */
	return n;
}

void qsm_io_enter_(struct qsm_io *io)
{
	container_of(io, struct qsm_io_common, io)->cm_depth++;
}

bool qsm_io_leave_(struct qsm_io *io)
{
	struct qsm_io_common *c = container_of(io, struct qsm_io_common, io);

	assert(c->cm_depth > 0);
	if (--c->cm_depth == 0 && c->cm_closing) {
		io->ops->close(io);
		return true;
	}
	return c->cm_closing;
}

#define QSM_IO_PRIV_DIO_WRITE 0x1 /* counted in cm_dio_writes */
#define QSM_IO_PRIV_SUB       0x2 /* a bounce's sub-request: bytes count once, on the original */
#define QSM_IO_PRIV_ELIDED    0x4 /* a flush completed without the backend (nothing to flush) */

static void qsm_io_dio_write_done(struct qsm_io_common *c);
static void qsm_io_dio_pump(struct qsm_io_common *c);
static void qsm_io_dio_write_go(struct qsm_io_common *c, struct qsm_io_req *req);

static bool qsm_io_op_writes(enum qsm_io_op op);

/* A flush that reached the backend is over: what it covered is durable. */
static void flush_done(struct qsm_io *io, int ret)
{
	assert(io->flushes_in_flight > 0);
	if (--io->flushes_in_flight == 0) {
		if (ret == 0 && io->flush_alone)
			io->flushed_gen = io->flush_gen;
		io->flush_alone = true;
	} else {
		io->flush_alone = false; /* which one covered what: unknown */
	}
}

/* At submit: may this flush complete at once (nothing to flush), or else
 * note what it covers. */
static bool flush_elide(struct qsm_io *io)
{
	if (io->flushes_in_flight == 0 && io->write_gen == io->flushed_gen) {
		io->flushes_elided++;
		return true;
	}
	if (io->flushes_in_flight++ == 0) {
		io->flush_gen = io->write_gen;
		io->flush_alone = true;
	} else {
		io->flush_alone = false;
	}
	return false;
}

void qsm_io_complete_(struct qsm_io *io, struct qsm_io_req *req, int ret)
{
	assert(ret <= 0 && ret > -4096);
	assert(io->stats.in_flight > 0);
	io->stats.in_flight--;
	if (req->io_priv & QSM_IO_PRIV_DIO_WRITE) {
		req->io_priv &= ~QSM_IO_PRIV_DIO_WRITE;
		qsm_io_dio_write_done(container_of(io, struct qsm_io_common, io));
	}
	if (!(req->io_priv & QSM_IO_PRIV_SUB)) {
		if (qsm_io_op_writes(req->op))
			io->write_gen++;
		else if (req->op == QSM_IO_FLUSH && !(req->io_priv & QSM_IO_PRIV_ELIDED))
			flush_done(io, ret);
	}
	if (ret == 0 && !(req->io_priv & QSM_IO_PRIV_SUB)) {
		if (req->op == QSM_IO_READ)
			io->stats.bytes_read += req->len;
		else if (req->op == QSM_IO_WRITE)
			io->stats.bytes_written += req->len;
	}
	if (io->trace)
		io->trace(io->trace_opaque, req, true, ret);
	req->cb(req, ret);
}

/* --- Misaligned transfers on direct handles ---------------------------------
 *
 * Linux keeps buffered and direct I/O of one file coherent only loosely: a
 * direct write over pages that buffered I/O has dirtied (or is reading)
 * fails to invalidate them, logs "Page cache invalidation failure on direct
 * I/O" and makes the next fdatasync return EIO.  So on a handle opened with
 * QSM_IO_DIRECT, nothing goes through the page cache: a transfer whose
 * offset, length or buffers are not aligned is bounced here.
 *  - READ: read the covering aligned range into a bounce buffer, copy out.
 *  - WRITE whose offset and length are aligned but whose buffers are not
 *    (a caller's malloc()ed buffer): copied into an aligned buffer and
 *    written; it overlaps other writes freely, as an aligned write does.
 *  - other WRITEs: read-modify-write of the covering aligned range.  Two
 *    writes sharing an aligned block could lose each other's bytes, so an
 *    RMW runs alone: it waits until no write is at the backend, and writes
 *    submitted meanwhile wait behind it (FIFO, cm_wait_head).  Aligned
 *    writes overlap each other freely, as on any disk.
 * The caller's request completes once, through qsm_io_complete_, after its
 * sub-requests.
 */

struct qsm_io_bounce {
	struct qsm_io_req sub;
	struct qsm_io_common *c;
	struct qsm_io_req *orig;
	struct iovec iov;
	uint8_t *buf;
	uint64_t head;  /* orig->offset - sub.offset */
	bool rmw;       /* an RMW write: it holds cm_rmw_active */
	bool rmw_read;  /* the read half of an RMW is running */
	struct qsm_io_bounce *next, **pprev; /* on c->cm_bounces while alive */
};

static void qsm_io_bounce_free(struct qsm_io_bounce *b)
{
	*b->pprev = b->next;
	if (b->next)
		b->next->pprev = b->pprev;
	free(b->buf);
	free(b);
}

void qsm_io_set_dio_align_(struct qsm_io_common *c, unsigned off_align, unsigned mem_align)
{
	c->cm_dio_align = off_align;
	c->cm_dio_mem_align = mem_align;
}

/* Offset and length on the device's alignment: the request touches whole
 * aligned blocks (a write of it needs no read-modify-write). */
static bool qsm_io_dio_whole(const struct qsm_io_common *c, const struct qsm_io_req *req)
{
	return QSM_IS_ALIGNED(req->offset, c->cm_dio_align) && QSM_IS_ALIGNED(req->len, c->cm_dio_align);
}

/* Whole blocks, and buffers O_DIRECT takes as they are. */
static bool qsm_io_dio_aligned(const struct qsm_io_common *c, const struct qsm_io_req *req)
{
	if (!qsm_io_dio_whole(c, req))
		return false;
	for (int i = 0; i < req->iovcnt; i++)
		if (!QSM_IS_ALIGNED((uintptr_t)req->iov[i].iov_base, c->cm_dio_mem_align) ||
		    !QSM_IS_ALIGNED(req->iov[i].iov_len, c->cm_dio_align))
			return false;
	return true;
}

/* Hand a request (or sub-request) to the backend; writes are counted. */
static void qsm_io_backend_submit(struct qsm_io_common *c, struct qsm_io_req *req, bool sub)
{
	if (sub) {
		req->io_priv |= QSM_IO_PRIV_SUB;
		req->io_handle = &c->io;
		req->io_seq = ++c->io.next_seq;
		req->io_flushed_upto = 0;
		c->io.stats.in_flight++;
	}
	if (req->op == QSM_IO_WRITE && c->cm_dio_align) {
		req->io_priv |= QSM_IO_PRIV_DIO_WRITE;
		c->cm_dio_writes++;
	}
	c->io.ops->submit(&c->io, req);
}

static struct qsm_io_common *qsm_io_common_of(struct qsm_io *io)
{
	return container_of(io, struct qsm_io_common, io);
}

static void qsm_io_bounce_finish(struct qsm_io_bounce *b, int ret)
{
	struct qsm_io_common *c = b->c;
	struct qsm_io_req *orig = b->orig;
	bool was_rmw = b->rmw;
	qsm_io_bounce_free(b);
	if (was_rmw) {
		c->cm_rmw_active = false;
		qsm_io_dio_pump(c);
	}
	qsm_io_complete_(&c->io, orig, ret);
}

static void qsm_io_bounce_cb(struct qsm_io_req *sub, int ret)
{
	struct qsm_io_bounce *b = container_of(sub, struct qsm_io_bounce, sub);
	struct qsm_io_req *orig = b->orig;

	if (ret < 0) {
		qsm_io_bounce_finish(b, ret);
		return;
	}
	if (orig->op == QSM_IO_READ) {
		qsm_iov_from_buf(orig->iov, orig->iovcnt, 0, b->buf + b->head, orig->len);
		qsm_io_bounce_finish(b, 0);
		return;
	}
	if (b->rmw_read) {
		/* Patch the old bytes with the caller's and write the block back. */
		b->rmw_read = false;
		qsm_iov_to_buf(orig->iov, orig->iovcnt, 0, b->buf + b->head, orig->len);
		b->sub.op = QSM_IO_WRITE;
		qsm_io_backend_submit(b->c, &b->sub, true);
		return;
	}
	qsm_io_bounce_finish(b, 0);
}

/* Start a bounced READ, a bounced whole-block WRITE, or an RMW WRITE (which
 * must be allowed to run: the caller has set cm_rmw_active for it). */
static void qsm_io_bounce_start(struct qsm_io_common *c, struct qsm_io_req *orig)
{
	bool rmw = orig->op == QSM_IO_WRITE && !qsm_io_dio_whole(c, orig);
	uint64_t aoff = QSM_ALIGN_DOWN(orig->offset, c->cm_dio_align);
	uint64_t aend = QSM_ALIGN_UP(orig->offset + orig->len, c->cm_dio_align);
	struct qsm_io_bounce *b = calloc(1, sizeof(*b));
	void *buf = NULL;
	if (!b || posix_memalign(&buf, QSM_MAX(c->cm_dio_mem_align, 512u),
				 QSM_MAX(aend - aoff, (uint64_t)c->cm_dio_align))) {
		free(b);
		if (rmw) {
			c->cm_rmw_active = false;
			qsm_io_dio_pump(c);
		}
		qsm_io_defer_complete_(&c->io, orig, -ENOMEM);
		return;
	}
	b->c = c;
	b->orig = orig;
	b->buf = buf;
	b->rmw = rmw;
	b->next = c->cm_bounces;
	if (b->next)
		b->next->pprev = &b->next;
	b->pprev = &c->cm_bounces;
	c->cm_bounces = b;
	b->head = orig->offset - aoff;
	b->iov = (struct iovec){ buf, aend - aoff };
	b->sub = (struct qsm_io_req){
		.op = QSM_IO_READ, .event = orig->event, .offset = aoff, .len = aend - aoff,
		.iov = &b->iov, .iovcnt = 1, .cb = qsm_io_bounce_cb,
	};
	if (orig->op == QSM_IO_WRITE && !rmw) {
		/* Only the buffers are misaligned: nothing to read first. */
		qsm_iov_to_buf(orig->iov, orig->iovcnt, 0, buf, orig->len);
		b->sub.op = QSM_IO_WRITE;
	} else {
		b->rmw_read = rmw;
	}
	qsm_io_backend_submit(c, &b->sub, true);
}

/* Start the waiting writes that may go now (FIFO: an RMW at the head waits
 * for the backend to hold no write; aligned writes wait only for an RMW). */
static void qsm_io_dio_pump(struct qsm_io_common *c)
{
	while (c->cm_wait_head && !c->cm_rmw_active) {
		struct qsm_io_req *req = c->cm_wait_head;
		bool whole = qsm_io_dio_whole(c, req);
		if (!whole && c->cm_dio_writes)
			break;
		c->cm_wait_head = req->io_next;
		if (!c->cm_wait_head)
			c->cm_wait_tail = &c->cm_wait_head;
		req->io_next = NULL;
		qsm_io_dio_write_go(c, req);
	}
}

/* Start a write that may go now: aligned ones as they are, whole-block ones
 * through an aligned copy, the rest as an RMW that runs alone. */
static void qsm_io_dio_write_go(struct qsm_io_common *c, struct qsm_io_req *req)
{
	if (qsm_io_dio_aligned(c, req)) {
		qsm_io_backend_submit(c, req, false);
		return;
	}
	if (!qsm_io_dio_whole(c, req))
		c->cm_rmw_active = true;
	qsm_io_bounce_start(c, req);
}

/* A counted write left the backend. */
static void qsm_io_dio_write_done(struct qsm_io_common *c)
{
	assert(c->cm_dio_writes > 0);
	c->cm_dio_writes--;
	qsm_io_dio_pump(c);
}

/* Route a READ/WRITE on a direct handle.  True when handled here. */
static bool qsm_io_dio_route(struct qsm_io_common *c, struct qsm_io_req *req)
{
	bool aligned = qsm_io_dio_aligned(c, req);
	if (req->op == QSM_IO_READ) {
		if (aligned)
			return false;
		qsm_io_bounce_start(c, req);
		return true;
	}
	if (c->cm_rmw_active || c->cm_wait_head || (!qsm_io_dio_whole(c, req) && c->cm_dio_writes)) {
		*c->cm_wait_tail = req;
		c->cm_wait_tail = &req->io_next;
		return true;
	}
	qsm_io_dio_write_go(c, req);
	return true;
}

/* --- The checked submit wrapper -------------------------------------------- */

static bool qsm_io_op_writes(enum qsm_io_op op)
{
	return op == QSM_IO_WRITE || op == QSM_IO_ZERO || op == QSM_IO_DISCARD ||
	       op == QSM_IO_TRUNCATE || op == QSM_IO_PREALLOC;
}

/* 0 if req may go to the backend, else the errno it completes with. */
static int qsm_io_check_req(const struct qsm_io *io, const struct qsm_io_req *req)
{
	if ((unsigned)req->op > QSM_IO_PREALLOC)
		return -EINVAL;
	if ((unsigned)req->event >= QSM_IO_EV__COUNT)
		return -EINVAL;
	if (req->offset > INT64_MAX)
		return -EINVAL;
	switch (req->op) {
	case QSM_IO_READ:
	case QSM_IO_WRITE:
		if (req->iovcnt < 0 || (req->iovcnt > 0 && !req->iov))
			return -EINVAL;
		if (qsm_iov_size(req->iov, req->iovcnt) != req->len)
			return -EINVAL;
		/* fall through */
	case QSM_IO_ZERO:
	case QSM_IO_DISCARD:
	case QSM_IO_PREALLOC:
		if (req->len > INT64_MAX - req->offset)
			return -EINVAL;
		break;
	case QSM_IO_FLUSH:
	case QSM_IO_TRUNCATE:
		break;
	}
	if ((io->flags & QSM_IO_RDONLY) && qsm_io_op_writes(req->op))
		return -EBADF;
	return 0;
}

void qsm_io_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	assert(io && io->ops && req);
	assert(req->cb && "an I/O request needs a completion callback");
	if (QSM_UNLIKELY(!req->cb))
		return; /* nothing could ever be told; NDEBUG builds only */

	req->io_next = NULL;
	req->io_ret = 0;
	req->io_seq = ++io->next_seq;
	req->io_flushed_upto = 0;
	req->io_priv = 0;
	req->io_handle = io;
	if (QSM_UNLIKELY(qsm_io_common_of(io)->cm_down)) {
		/* The machine is down: the request is lost with it, even one
		 * this layer would complete itself (a NO_FLUSH flush).  Code
		 * still running when a sim crashes (the rest of the callback
		 * that hit the crash point, e.g. a write-back batch moving on to
		 * its sync) must not leave a completion queued on a handle
		 * that is about to be closed. */
		if (io->trace)
			io->trace(io->trace_opaque, req, false, 0);
		return;
	}
	io->stats.in_flight++;
	if (io->trace)
		io->trace(io->trace_opaque, req, false, 0);

	int err = qsm_io_check_req(io, req);
	if (err) {
		qsm_io_defer_complete_(io, req, err);
		return;
	}
	io->stats.ops[req->op]++;
	if (req->op == QSM_IO_FLUSH && ((io->flags & QSM_IO_NO_FLUSH) || flush_elide(io))) {
		req->io_priv |= QSM_IO_PRIV_ELIDED;
		qsm_io_defer_complete_(io, req, 0);
		return;
	}
	struct qsm_io_common *c = qsm_io_common_of(io);
	if (c->cm_dio_align && (req->op == QSM_IO_READ || req->op == QSM_IO_WRITE) &&
	    qsm_io_dio_route(c, req))
		return;
	io->ops->submit(io, req);
}

/* --- Synchronous helpers and lifetime ---------------------------------------
 *
 * Every blocking call asserts the "Blocking" rule of qsm_io.h: never while
 * the handle is live (an image serving requests on the loop), never with
 * asynchronous requests in flight (contract 6).  A remote backend may wait
 * on the network inside these calls; the assertions prove the engine only
 * makes them inside its own blocking entry points.
 */

#define QSM_IO_ASSERT_MAY_BLOCK(io)                                            \
	assert(!(io)->live && "blocking io/ call while the image runs requests "  \
	       "(only open, close, truncate, create and check may block)")

bool qsm_io_set_live(struct qsm_io *io, bool on)
{
	bool was = io->live;
	io->live = on;
	return was;
}

int qsm_io_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	QSM_IO_ASSERT_MAY_BLOCK(io);
	assert(io->stats.in_flight == 0); /* contract 6 */
	if (off > INT64_MAX || len > INT64_MAX - off)
		return -EINVAL;
	return io->ops->pread_sync(io, buf, len, off);
}

int qsm_io_pread_sync_ev(struct qsm_io *io, void *buf, size_t len, uint64_t off,
			 enum qsm_io_event ev)
{
	io->sync_event = ev;
	int ret = qsm_io_pread_sync(io, buf, len, off);
	io->sync_event = QSM_IO_EV_NONE;
	return ret;
}

int qsm_io_pwrite_sync(struct qsm_io *io, const void *buf, size_t len, uint64_t off)
{
	QSM_IO_ASSERT_MAY_BLOCK(io);
	assert(io->stats.in_flight == 0);
	if (io->flags & QSM_IO_RDONLY)
		return -EBADF;
	if (off > INT64_MAX || len > INT64_MAX - off)
		return -EINVAL;
	io->write_gen++; /* a later flush must not be elided */
	return io->ops->pwrite_sync(io, buf, len, off);
}

int qsm_io_flush_sync(struct qsm_io *io)
{
	QSM_IO_ASSERT_MAY_BLOCK(io);
	assert(io->stats.in_flight == 0);
	if (io->flags & QSM_IO_NO_FLUSH)
		return 0;
	uint64_t gen = io->write_gen;
	int ret = io->ops->flush_sync(io);
	if (ret == 0)
		io->flushed_gen = gen; /* nothing in flight (contract 6) */
	return ret;
}

int qsm_io_truncate_sync(struct qsm_io *io, uint64_t size)
{
	QSM_IO_ASSERT_MAY_BLOCK(io);
	assert(io->stats.in_flight == 0);
	if (io->flags & QSM_IO_RDONLY)
		return -EBADF;
	if (size > INT64_MAX)
		return -EINVAL;
	io->write_gen++;
	return io->ops->truncate_sync(io, size);
}

int qsm_io_get_size(struct qsm_io *io, uint64_t *size)
{
	QSM_IO_ASSERT_MAY_BLOCK(io);
	return io->ops->get_size(io, size);
}

int qsm_io_allocated(struct qsm_io *io, uint64_t *bytes)
{
	QSM_IO_ASSERT_MAY_BLOCK(io);
	return io->ops->allocated ? io->ops->allocated(io, bytes) : -ENOTSUP;
}

int qsm_io_extent(struct qsm_io *io, uint64_t off, uint64_t len, bool *data, uint64_t *run)
{
	assert(len > 0);
	*data = true;
	*run = len;
	if (!io->ops->extent)
		return 0;
	int ret = io->ops->extent(io, off, len, data, run);
	assert(ret < 0 || (*run >= 1 && *run <= len));
	return ret;
}

void qsm_io_hold(struct qsm_io *io)
{
	io->extra_refs++;
}

bool qsm_io_abandoned_(const struct qsm_io *io)
{
	return container_of(io, const struct qsm_io_common, io)->cm_abandoned;
}

/*
 * Forget every request in flight, making sure first that nothing will touch
 * their memory again: the backend finishes or cancels what it started
 * (cm_quiesce; a caller's backend does it in its close, qsm_io.h), the
 * completions already posted are dropped, and writes waiting behind a
 * direct-I/O read-modify-write are never submitted (a bounce's buffer is
 * forgotten with its request).  Then the handle is closed.  Nothing in
 * flight is ever completed: the owner has already freed the callers.
 */
void qsm_io_abandon(struct qsm_io *io)
{
	if (!io)
		return;
	struct qsm_io_common *c = container_of(io, struct qsm_io_common, io);
	c->cm_abandoned = true;
	if (c->cm_quiesce)
		c->cm_quiesce(io);
	qsm_io_crash_(io); /* down: drops the posted completions, refuses new ones */
	c->cm_wait_head = NULL;
	c->cm_wait_tail = &c->cm_wait_head;
	c->cm_rmw_active = false;
	c->cm_dio_writes = 0;
	while (c->cm_bounces) /* quiesced: no sub-request touches them now */
		qsm_io_bounce_free(c->cm_bounces);
	io->stats.in_flight = 0;
	qsm_io_close(io);
}

void qsm_io_close(struct qsm_io *io)
{
	if (!io)
		return;
	if (io->extra_refs) {
		io->extra_refs--; /* another owner still holds it */
		return;
	}
	/* "No request may be in flight" (a crashed sim handle has already
	 * dropped its requests and taken them off in_flight). */
	assert(io->stats.in_flight == 0);
	struct qsm_io_common *c = container_of(io, struct qsm_io_common, io);
	if (c->cm_depth > 0) {
		c->cm_closing = true; /* inside a callback: the loop frees it */
		return;
	}
	io->ops->close(io);
}

void *qsm_io_priv(const struct qsm_io *io)
{
	return io->priv;
}

struct event_base *qsm_io_base(const struct qsm_io *io)
{
	return io->base;
}

int qsm_io_flags(const struct qsm_io *io)
{
	return io->flags;
}

int qsm_io_set_mem_align(struct qsm_io *io, unsigned align)
{
	if (!align || (align & (align - 1)))
		return -EINVAL;
	io->mem_align = align;
	return 0;
}

void *qsm_io_alloc(struct qsm_io *io, size_t len)
{
	size_t align = io && io->mem_align ? io->mem_align : QSM_IO_DEFAULT_ALIGN;
	void *p = NULL;

	if (align < sizeof(void *))
		align = sizeof(void *);
	if (posix_memalign(&p, align, len ? len : 1) != 0)
		return NULL;
	return p;
}

void *qsm_io_zalloc(struct qsm_io *io, size_t len)
{
	void *p = qsm_io_alloc(io, len);
	if (p)
		memset(p, 0, len);
	return p;
}

/* --- Opening ---------------------------------------------------------------- */

#ifndef QSM_HAVE_URING
int qsm_io_open_uring(struct event_base *base, const char *path, int flags,
		      struct qsm_io **out)
{
	*out = NULL;
	return -ENOTSUP;
}

bool qsm_io_uring_available(void)
{
	return false;
}
#endif

int qsm_io_open_path(struct event_base *base, const char *path, int flags,
		     const char *aio, struct qsm_io **out)
{
	*out = NULL;
	if (!aio)
		aio = qsm_io_uring_available() ? "io_uring" : "threads";
	if (strcmp(aio, "threads") == 0)
		return qsm_io_open_threads(base, path, flags, out);
	if (strcmp(aio, "io_uring") == 0)
		return qsm_io_open_uring(base, path, flags, out);
	return -EINVAL;
}

/* --- File descriptor helpers -------------------------------------------------- */

/* Direct-I/O alignment of an open O_DIRECT descriptor: statx's answer when the
 * kernel gives one, the logical block size for block devices, else 4096. */
static void qsm_io_fds_query_align(struct qsm_io_fds *f)
{
	unsigned off_align = 0, mem_align = 0;
#ifdef STATX_DIOALIGN
	struct statx stx;
	if (statx(f->dfd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
	    (stx.stx_mask & STATX_DIOALIGN)) {
		off_align = stx.stx_dio_offset_align;
		mem_align = stx.stx_dio_mem_align;
	}
#endif
	if (!off_align) {
		struct stat st;
		int ssz = 0;
		if (fstat(f->dfd, &st) == 0 && S_ISBLK(st.st_mode) &&
		    ioctl(f->dfd, BLKSSZGET, &ssz) == 0 && ssz > 0)
			off_align = (unsigned)ssz;
	}
	if (!off_align || (off_align & (off_align - 1)))
		off_align = QSM_IO_DEFAULT_ALIGN;
	if (!mem_align || (mem_align & (mem_align - 1)))
		mem_align = off_align;
	f->dio_off_align = off_align;
	f->dio_mem_align = mem_align;
}

int qsm_io_fds_open_(struct qsm_io_fds *f, const char *path, int flags)
{
	f->fd = f->dfd = -1;
	f->dio_off_align = f->dio_mem_align = 0;
	if (!path || (flags & ~QSM_IO_FLAGS_ALL) ||
	    ((flags & QSM_IO_RDONLY) && (flags & QSM_IO_CREATE)))
		return -EINVAL;

	int oflags = O_CLOEXEC | ((flags & QSM_IO_RDONLY) ? O_RDONLY : O_RDWR);
	int fd = open(path, oflags | ((flags & QSM_IO_CREATE) ? O_CREAT | O_TRUNC : 0), 0644);
	if (fd < 0)
		return -errno;
	f->fd = fd;
	if (flags & QSM_IO_DIRECT) {
		int dfd = open(path, oflags | O_DIRECT);
		if (dfd < 0) {
			/* EINVAL: the file system has no O_DIRECT (tmpfs);
			 * like qemu's cache=none, refuse rather than pretend. */
			int err = -errno;
			close(fd);
			f->fd = -1;
			return err;
		}
		f->dfd = dfd;
		qsm_io_fds_query_align(f);
	}
	return 0;
}

void qsm_io_fds_close_(struct qsm_io_fds *f)
{
	if (f->dfd >= 0)
		close(f->dfd);
	if (f->fd >= 0)
		close(f->fd);
	f->fd = f->dfd = -1;
}

int qsm_io_fds_pick_(const struct qsm_io_fds *f, uint64_t off, uint64_t len,
		     const struct iovec *iov, int iovcnt)
{
	if (f->dfd < 0)
		return f->fd;
	if (!QSM_IS_ALIGNED(off, f->dio_off_align) || !QSM_IS_ALIGNED(len, f->dio_off_align))
		return f->fd;
	for (int i = 0; i < iovcnt; i++) {
		if (!QSM_IS_ALIGNED((uintptr_t)iov[i].iov_base, f->dio_mem_align) ||
		    !QSM_IS_ALIGNED(iov[i].iov_len, f->dio_off_align))
			return f->fd;
	}
	return f->dfd;
}

/* Like qsm_iov_slice, but takes as many entries as fit in dst_cap; *bytes is
 * set to the length the returned entries cover. */
static int qsm_io_iov_slice_capped(struct iovec *dst, int dst_cap, const struct iovec *src,
				   int srccnt, uint64_t skip, uint64_t len, uint64_t *bytes)
{
	int cnt = 0;
	*bytes = 0;
	for (int i = 0; i < srccnt && len > 0 && cnt < dst_cap; i++) {
		size_t l = src[i].iov_len;
		if (skip >= l) {
			skip -= l;
			continue;
		}
		size_t n = QSM_MIN(l - skip, len);
		dst[cnt].iov_base = (char *)src[i].iov_base + skip;
		dst[cnt].iov_len = n;
		cnt++;
		len -= n;
		*bytes += n;
		skip = 0;
	}
	return cnt;
}

#define QSM_IO_SLICE_MAX 256

int qsm_io_fds_rw_(const struct qsm_io_fds *f, bool write, const struct iovec *iov,
		   int iovcnt, uint64_t off, uint64_t len)
{
	uint64_t done = 0;

	while (done < len) {
		struct iovec slice[QSM_IO_SLICE_MAX];
		const struct iovec *v = iov;
		int cnt = iovcnt;
		uint64_t bytes = len - done;

		if (done > 0 || iovcnt > IOV_MAX) {
			cnt = qsm_io_iov_slice_capped(slice, QSM_IO_SLICE_MAX, iov, iovcnt,
						      done, len - done, &bytes);
			v = slice;
		}
		int fd = qsm_io_fds_pick_(f, off + done, bytes, v, cnt);
		ssize_t r = write ? pwritev(fd, v, cnt, (off_t)(off + done))
				  : preadv(fd, v, cnt, (off_t)(off + done));
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (r == 0) {
			if (write)
				return -EIO; /* no progress: never report a short write */
			qsm_iov_memset(iov, iovcnt, done, 0, len - done);
			return 0; /* end of file: the rest reads as zeros */
		}
		done += (uint64_t)r;
	}
	return 0;
}

int qsm_io_fds_flush_(const struct qsm_io_fds *f)
{
	while (fdatasync(f->fd) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

static int qsm_io_fds_write_zeros(const struct qsm_io_fds *f, uint64_t off, uint64_t len)
{
	while (len > 0) {
		uint64_t n = QSM_MIN(len, (uint64_t)QSM_IO_ZERO_BUF_SIZE);
		struct iovec v = { .iov_base = qsm_io_zero_buf_, .iov_len = n };
		int r = qsm_io_fds_rw_(f, true, &v, 1, off, n);
		if (r < 0)
			return r;
		off += n;
		len -= n;
	}
	return 0;
}

int qsm_io_fds_zero_(const struct qsm_io_fds *f, uint64_t off, uint64_t len)
{
	if (len == 0)
		return 0;
	while (fallocate(f->fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) < 0) {
		if (errno == EINTR)
			continue;
		if (errno == EOPNOTSUPP || errno == ENOSYS)
			return qsm_io_fds_write_zeros(f, off, len);
		return -errno;
	}
	return 0;
}

int qsm_io_fds_discard_(const struct qsm_io_fds *f, uint64_t off, uint64_t len)
{
	if (len == 0)
		return 0;
	while (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
			 (off_t)len) < 0) {
		if (errno == EINTR)
			continue;
		if (errno == EOPNOTSUPP || errno == ENOSYS)
			return 0; /* discard is advisory */
		return -errno;
	}
	return 0;
}

int qsm_io_fds_prealloc_(const struct qsm_io_fds *f, uint64_t off, uint64_t len)
{
	if (len == 0)
		return 0;
	while (fallocate(f->fd, 0, (off_t)off, (off_t)len) < 0) {
		if (errno == EINTR)
			continue;
		if (errno == EOPNOTSUPP || errno == ENOSYS)
			return 0; /* advisory: writes will extend the file */
		return -errno;
	}
	return 0;
}

int qsm_io_fds_truncate_(const struct qsm_io_fds *f, uint64_t size)
{
	while (ftruncate(f->fd, (off_t)size) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

int qsm_io_fds_extent_(const struct qsm_io_fds *f, uint64_t off, uint64_t len, bool *data,
		       uint64_t *run)
{
	off_t d = lseek(f->fd, (off_t)off, SEEK_DATA);
	*data = true;
	*run = len;
	if (d < 0) {
		/* ENXIO: only a hole from off to the end; anything else (no
		 * SEEK_DATA here): say data. */
		if (errno == ENXIO)
			*data = false;
		return 0;
	}
	if ((uint64_t)d > off) {
		*data = false;
		*run = QSM_MIN(len, (uint64_t)d - off);
		return 0;
	}
	off_t h = lseek(f->fd, (off_t)off, SEEK_HOLE);
	if (h > (off_t)off)
		*run = QSM_MIN(len, (uint64_t)h - off);
	return 0;
}

int qsm_io_fds_allocated_(const struct qsm_io_fds *f, uint64_t *bytes)
{
	struct stat st;

	if (fstat(f->fd, &st) < 0)
		return -errno;
	*bytes = (uint64_t)st.st_blocks * 512;
	return 0;
}

int qsm_io_fds_get_size_(const struct qsm_io_fds *f, uint64_t *size)
{
	struct stat st;

	if (fstat(f->fd, &st) < 0)
		return -errno;
	if (S_ISBLK(st.st_mode)) {
		uint64_t sz;
		if (ioctl(f->fd, BLKGETSIZE64, &sz) < 0)
			return -errno;
		*size = sz;
		return 0;
	}
	*size = (uint64_t)st.st_size;
	return 0;
}
