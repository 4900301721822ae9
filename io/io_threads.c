/*
 * io/io_threads.c: the thread-pool backend, always available.
 *
 * A few worker threads take requests from a mutex/cond queue and run them
 * with the blocking helpers of io.c (whole transfers, EOF zero-fill, ZERO
 * with a write-zeros fallback, advisory DISCARD).  A finished request goes on
 * a mutex-protected done list; the worker that makes that list non-empty
 * writes the eventfd, whose libevent event (on the loop thread) takes the
 * whole list and completes each request.  Only the loop thread touches
 * libevent; workers touch only the two lists, the request's io_ret and the
 * caller's buffers.
 *
 * Invariants:
 *  1. A request is on at most one list (queue, done), linked by io_next, or
 *     owned by exactly one worker while it runs.
 *  2. th_busy (loop thread only) counts requests accepted and not yet
 *     completed; th_ev is added exactly while th_busy > 0, so an idle handle
 *     does not keep event_base_dispatch() running.
 *  3. th_efd has been written since the done list last became non-empty.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/io_internal.h"
#include "io/util.h"

#define QSM_IO_THREADS_NR 4

struct qsm_io_threads {
	struct qsm_io_common c;        /* first */
	struct qsm_io_fds th_fds;
	int th_efd;
	struct event *th_ev;
	uint64_t th_busy;              /* loop thread only, see invariant 2 */

	pthread_mutex_t th_lock;       /* protects the lists and th_stop */
	pthread_cond_t th_cond;        /* queue non-empty or th_stop */
	struct qsm_io_req *th_queue_head, **th_queue_tail;
	struct qsm_io_req *th_done_head, **th_done_tail;
	bool th_stop;

	int th_nworkers;
	pthread_t th_workers[QSM_IO_THREADS_NR];
};

static struct qsm_io_threads *qsm_io_threads_of(struct qsm_io *io)
{
	return container_of(io, struct qsm_io_threads, c.io);
}

/* Runs on a worker: the whole operation, blocking.  0 or -errno. */
static int qsm_io_threads_exec(struct qsm_io_threads *t, struct qsm_io_req *req)
{
	const struct qsm_io_fds *f = &t->th_fds;

	switch (req->op) {
	case QSM_IO_READ:
		return qsm_io_fds_rw_(f, false, req->iov, req->iovcnt, req->offset, req->len);
	case QSM_IO_WRITE:
		return qsm_io_fds_rw_(f, true, req->iov, req->iovcnt, req->offset, req->len);
	case QSM_IO_FLUSH:
		return qsm_io_fds_flush_(f);
	case QSM_IO_ZERO:
		return qsm_io_fds_zero_(f, req->offset, req->len);
	case QSM_IO_DISCARD:
		return qsm_io_fds_discard_(f, req->offset, req->len);
	case QSM_IO_TRUNCATE:
		return qsm_io_fds_truncate_(f, req->offset);
	case QSM_IO_PREALLOC:
		return qsm_io_fds_prealloc_(f, req->offset, req->len);
	}
	return -EINVAL;
}

static void *qsm_io_threads_worker(void *arg)
{
	struct qsm_io_threads *t = arg;

	pthread_mutex_lock(&t->th_lock);
	for (;;) {
		while (!t->th_queue_head && !t->th_stop)
			pthread_cond_wait(&t->th_cond, &t->th_lock);
		struct qsm_io_req *req = t->th_queue_head;
		if (!req)
			break; /* stopping and nothing left */
		t->th_queue_head = req->io_next;
		if (!t->th_queue_head)
			t->th_queue_tail = &t->th_queue_head;
		req->io_next = NULL;
		pthread_mutex_unlock(&t->th_lock);

		int ret = qsm_io_threads_exec(t, req);

		pthread_mutex_lock(&t->th_lock);
		req->io_ret = ret;
		bool wake = t->th_done_head == NULL;
		*t->th_done_tail = req;
		t->th_done_tail = &req->io_next;
		if (wake) {
			uint64_t one = 1;
			/* Cannot fail short of a counter overflow; a lost
			 * wake-up would hang the request, so insist. */
			while (write(t->th_efd, &one, sizeof(one)) < 0 && errno == EINTR)
				;
		}
	}
	pthread_mutex_unlock(&t->th_lock);
	return NULL;
}

/* Loop thread: complete everything the workers finished. */
static void qsm_io_threads_event_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_io_threads *t = arg;
	uint64_t cnt;

	if (read(t->th_efd, &cnt, sizeof(cnt)) < 0) {
		/* EAGAIN: a stale wake-up; the list decides. */
	}
	pthread_mutex_lock(&t->th_lock);
	struct qsm_io_req *list = t->th_done_head;
	t->th_done_head = NULL;
	t->th_done_tail = &t->th_done_head;
	pthread_mutex_unlock(&t->th_lock);

	while (list) {
		struct qsm_io_req *req = list;
		list = req->io_next;
		req->io_next = NULL;

		assert(t->th_busy > 0);
		if (--t->th_busy == 0)
			event_del(t->th_ev);
		qsm_io_enter_(&t->c.io);
		qsm_io_complete_(&t->c.io, req, req->io_ret);
		if (qsm_io_leave_(&t->c.io))
			return; /* closed: nothing was in flight, or the rest of
				 * list was forgotten by qsm_io_abandon */
	}
}

static void qsm_io_threads_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct qsm_io_threads *t = qsm_io_threads_of(io);

	if (t->th_busy++ == 0 && event_add(t->th_ev, NULL) < 0) {
		t->th_busy--;
		qsm_io_defer_complete_(io, req, -ENOMEM);
		return;
	}
	pthread_mutex_lock(&t->th_lock);
	req->io_next = NULL;
	*t->th_queue_tail = req;
	t->th_queue_tail = &req->io_next;
	pthread_cond_signal(&t->th_cond);
	pthread_mutex_unlock(&t->th_lock);
}

static int qsm_io_threads_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	struct iovec v = { .iov_base = buf, .iov_len = len };
	return qsm_io_fds_rw_(&qsm_io_threads_of(io)->th_fds, false, &v, 1, off, len);
}

static int qsm_io_threads_pwrite_sync(struct qsm_io *io, const void *buf, size_t len,
				      uint64_t off)
{
	struct iovec v = { .iov_base = (void *)buf, .iov_len = len };
	return qsm_io_fds_rw_(&qsm_io_threads_of(io)->th_fds, true, &v, 1, off, len);
}

static int qsm_io_threads_flush_sync(struct qsm_io *io)
{
	return qsm_io_fds_flush_(&qsm_io_threads_of(io)->th_fds);
}

static int qsm_io_threads_truncate_sync(struct qsm_io *io, uint64_t size)
{
	return qsm_io_fds_truncate_(&qsm_io_threads_of(io)->th_fds, size);
}

static int qsm_io_threads_get_size(struct qsm_io *io, uint64_t *size)
{
	return qsm_io_fds_get_size_(&qsm_io_threads_of(io)->th_fds, size);
}

static int qsm_io_threads_allocated(struct qsm_io *io, uint64_t *bytes)
{
	return qsm_io_fds_allocated_(&qsm_io_threads_of(io)->th_fds, bytes);
}

static int qsm_io_threads_extent(struct qsm_io *io, uint64_t off, uint64_t len, bool *data,
				 uint64_t *run)
{
	return qsm_io_fds_extent_(&qsm_io_threads_of(io)->th_fds, off, len, data, run);
}

/* cm_quiesce (qsm_io_abandon): requests not started are dropped, the
 * workers finish the ones they run and exit, finished ones are forgotten. */
static void qsm_io_threads_quiesce(struct qsm_io *io)
{
	struct qsm_io_threads *t = qsm_io_threads_of(io);

	pthread_mutex_lock(&t->th_lock);
	t->th_queue_head = NULL;
	t->th_queue_tail = &t->th_queue_head;
	t->th_stop = true;
	pthread_cond_broadcast(&t->th_cond);
	pthread_mutex_unlock(&t->th_lock);
	for (int i = 0; i < t->th_nworkers; i++)
		pthread_join(t->th_workers[i], NULL);
	t->th_nworkers = 0; /* joined: close must not join again */
	t->th_done_head = NULL;
	t->th_done_tail = &t->th_done_head;
	if (t->th_busy && t->th_ev)
		event_del(t->th_ev);
	t->th_busy = 0;
}

/* Also the error path of open: copes with a partly built handle. */
static void qsm_io_threads_close(struct qsm_io *io)
{
	struct qsm_io_threads *t = qsm_io_threads_of(io);

	pthread_mutex_lock(&t->th_lock);
	t->th_stop = true;
	pthread_cond_broadcast(&t->th_cond);
	pthread_mutex_unlock(&t->th_lock);
	for (int i = 0; i < t->th_nworkers; i++)
		pthread_join(t->th_workers[i], NULL);
	assert(!t->th_queue_head && !t->th_done_head);

	if (t->th_ev)
		event_free(t->th_ev);
	if (t->th_efd >= 0)
		close(t->th_efd);
	qsm_io_fds_close_(&t->th_fds);
	pthread_cond_destroy(&t->th_cond);
	pthread_mutex_destroy(&t->th_lock);
	qsm_io_common_fini_(&t->c);
	free(t);
}

static const struct qsm_io_ops qsm_io_threads_ops = {
	.name = "threads",
	.submit = qsm_io_threads_submit,
	.pread_sync = qsm_io_threads_pread_sync,
	.pwrite_sync = qsm_io_threads_pwrite_sync,
	.flush_sync = qsm_io_threads_flush_sync,
	.truncate_sync = qsm_io_threads_truncate_sync,
	.get_size = qsm_io_threads_get_size,
	.extent = qsm_io_threads_extent,
	.allocated = qsm_io_threads_allocated,
	.close = qsm_io_threads_close,
};

int qsm_io_open_threads(struct event_base *base, const char *path, int flags,
			struct qsm_io **out)
{
	struct qsm_io_threads *t;
	int ret;

	*out = NULL;
	if (!base)
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->th_fds.fd = t->th_fds.dfd = -1;
	t->th_efd = -1;
	t->th_queue_tail = &t->th_queue_head;
	t->th_done_tail = &t->th_done_head;
	pthread_mutex_init(&t->th_lock, NULL);
	pthread_cond_init(&t->th_cond, NULL);

	ret = qsm_io_common_init_(&t->c, &qsm_io_threads_ops, base, flags);
	if (ret < 0)
		goto fail;
	t->c.cm_quiesce = qsm_io_threads_quiesce;
	ret = qsm_io_fds_open_(&t->th_fds, path, flags);
	if (ret < 0)
		goto fail;
	if (t->th_fds.dfd >= 0) {
		t->c.io.mem_align = QSM_MAX(t->c.io.mem_align, t->th_fds.dio_mem_align);
		qsm_io_set_dio_align_(&t->c, t->th_fds.dio_off_align, t->th_fds.dio_mem_align);
	}

	t->th_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (t->th_efd < 0) {
		ret = -errno;
		goto fail;
	}
	t->th_ev = event_new(base, t->th_efd, EV_READ | EV_PERSIST,
			     qsm_io_threads_event_cb, t);
	if (!t->th_ev) {
		ret = -ENOMEM;
		goto fail;
	}
	for (int i = 0; i < QSM_IO_THREADS_NR; i++) {
		int err = pthread_create(&t->th_workers[i], NULL, qsm_io_threads_worker, t);
		if (err) {
			ret = -err;
			goto fail;
		}
		t->th_nworkers++;
	}
	*out = &t->c.io;
	return 0;

fail:
	qsm_io_threads_close(&t->c.io);
	return ret;
}
