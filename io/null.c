/*
 * io/null.c: the null backend, QEMU's null-co driver: a device of a given
 * size with no storage behind it.  Writes, zero writes, discards and
 * flushes succeed doing nothing; reads return zeros (read_zeroes) or leave
 * the caller's buffer as it was (QEMU's default, read-zeroes=off: the
 * cheapest read there is).  Worth having for benchmarks: what the engine
 * and the event loop cost with the storage taken away.
 *
 * It is a backend of the public kind (qsm_io_new): its state lives in
 * struct qsm_io_null, found with qsm_io_priv().
 *
 * Latency (QEMU's latency-ns): with latency_ns == 0 every request completes
 * from inside submit (posted by qsm_io_complete, so the engine's callback
 * still runs later, from the loop: contract 1).  Otherwise each request
 * completes latency_ns after its submission.  Every request waits the same
 * time, so submission order is deadline order: the waiting requests form a
 * FIFO, and one timer is armed for the head's deadline.
 *
 * Invariants:
 *  1. n_head..n_tail is in submission order, hence deadline order.
 *  2. n_timer is pending exactly while the FIFO is non-empty, for the
 *     head's deadline.
 *  3. Only READ touches the caller's memory, and only with read_zeroes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/null.h"

struct qsm_io_null_wait {
	struct qsm_io_req *w_req;
	uint64_t w_deadline_ns;      /* CLOCK_MONOTONIC */
	struct qsm_io_null_wait *w_next;
};

struct qsm_io_null {
	uint64_t n_size;
	bool n_read_zeroes;
	uint64_t n_latency_ns;
	struct event *n_timer;       /* invariant 2 */
	struct qsm_io_null_wait *n_head, **n_tail; /* invariant 1 */
};

static uint64_t null_now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* What a request does, at once: invariant 3. */
static int null_do(struct qsm_io_null *n, struct qsm_io_req *req)
{
	if (req->op == QSM_IO_TRUNCATE)
		return -ENOTSUP; /* QEMU's null-co has no truncate either */
	if (req->op == QSM_IO_READ && n->n_read_zeroes)
		for (int i = 0; i < req->iovcnt; i++)
			memset(req->iov[i].iov_base, 0, req->iov[i].iov_len);
	return 0;
}

/* Arm the timer for the FIFO's head (invariant 2). */
static void null_arm(struct qsm_io_null *n)
{
	uint64_t now = null_now_ns(), d;
	struct timeval tv;

	if (!n->n_head)
		return;
	d = n->n_head->w_deadline_ns > now ? n->n_head->w_deadline_ns - now : 0;
	tv.tv_sec = (time_t)(d / 1000000000u);
	tv.tv_usec = (suseconds_t)(d % 1000000000u / 1000u);
	evtimer_add(n->n_timer, &tv);
}

/* The timer: complete every request whose deadline has come. */
static void null_timer_cb(evutil_socket_t fd, short what, void *opaque)
{
	struct qsm_io_null *n = opaque;
	uint64_t now = null_now_ns();

	(void)fd;
	(void)what;
	while (n->n_head && n->n_head->w_deadline_ns <= now + 1000u) {
		struct qsm_io_null_wait *w = n->n_head;
		struct qsm_io_req *req = w->w_req;

		n->n_head = w->w_next;
		if (!n->n_head)
			n->n_tail = &n->n_head;
		free(w);
		qsm_io_complete(req, null_do(n, req));
	}
	null_arm(n);
}

static void null_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct qsm_io_null *n = qsm_io_priv(io);
	struct qsm_io_null_wait *w;

	if (n->n_latency_ns == 0) {
		qsm_io_complete(req, null_do(n, req));
		return;
	}
	/* One small record per waiting request: the request structure is the
	 * engine's, with no field for a backend (qsm_io.h). */
	w = malloc(sizeof(*w));
	if (!w) {
		qsm_io_complete(req, -ENOMEM);
		return;
	}
	w->w_req = req;
	w->w_deadline_ns = null_now_ns() + n->n_latency_ns;
	w->w_next = NULL;
	*n->n_tail = w;
	n->n_tail = &w->w_next;
	if (n->n_head == w)
		null_arm(n);
}

static int null_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	struct qsm_io_null *n = qsm_io_priv(io);

	(void)off;
	if (n->n_read_zeroes)
		memset(buf, 0, len);
	return 0;
}

static int null_pwrite_sync(struct qsm_io *io, const void *buf, size_t len, uint64_t off)
{
	(void)io, (void)buf, (void)len, (void)off;
	return 0;
}

static int null_flush_sync(struct qsm_io *io)
{
	(void)io;
	return 0;
}

static int null_truncate_sync(struct qsm_io *io, uint64_t size)
{
	(void)io, (void)size;
	return -ENOTSUP;
}

static int null_get_size(struct qsm_io *io, uint64_t *size)
{
	*size = ((struct qsm_io_null *)qsm_io_priv(io))->n_size;
	return 0;
}

/* QEMU's null-co reports everything as data (read-zeroes=off) or zeros it
 * cannot tell from data: data, for the whole range. */
static int null_extent(struct qsm_io *io, uint64_t off, uint64_t len, bool *data, uint64_t *run)
{
	(void)io, (void)off;
	*data = true;
	*run = len;
	return 0;
}

static int null_allocated(struct qsm_io *io, uint64_t *bytes)
{
	(void)io;
	*bytes = 0;
	return 0;
}

static void null_close(struct qsm_io *io)
{
	struct qsm_io_null *n = qsm_io_priv(io);

	/* No request is in flight (qsm_io.h), so the FIFO is empty. */
	event_free(n->n_timer);
	free(n);
}

static const struct qsm_io_ops null_ops = {
	.name = "null",
	.submit = null_submit,
	.pread_sync = null_pread_sync,
	.pwrite_sync = null_pwrite_sync,
	.flush_sync = null_flush_sync,
	.truncate_sync = null_truncate_sync,
	.get_size = null_get_size,
	.extent = null_extent,
	.allocated = null_allocated,
	.close = null_close,
};

int qsm_io_open_null(struct event_base *base, uint64_t size, bool read_zeroes,
		     uint64_t latency_ns, int flags, struct qsm_io **out)
{
	struct qsm_io_null *n = calloc(1, sizeof(*n));
	int r;

	if (!n)
		return -ENOMEM;
	n->n_size = size;
	n->n_read_zeroes = read_zeroes;
	n->n_latency_ns = latency_ns;
	n->n_tail = &n->n_head;
	n->n_timer = evtimer_new(base, null_timer_cb, n);
	if (!n->n_timer) {
		free(n);
		return -ENOMEM;
	}
	r = qsm_io_new(base, &null_ops, flags & QSM_IO_RDONLY, n, out);
	if (r < 0) {
		event_free(n->n_timer);
		free(n);
	}
	return r;
}
