/*
 * io/io_user.c: handles on backends written outside the tree (qsm_io_new),
 * and the two public completion doors of qsm_io.h.
 *
 * A caller's backend never sees the library's structures: the library
 * allocates a `struct qsm_io_user` (the common handle part of every in-tree
 * backend, plus a copy of the caller's ops and a thread-safe completion
 * queue) and passes its `struct qsm_io` to the caller's ops, which find
 * their own state with qsm_io_priv().  io->ops points at u->wrap: the
 * caller's table with submit and close replaced by the two functions below
 * (counting, and freeing the handle after the caller's close).
 *
 * Completions:
 *  - qsm_io_complete() (loop thread) posts to the common deferred list
 *    (io.c), so it is safe even from inside submit;
 *  - qsm_io_complete_threadsafe() (any thread) appends to u_ts_head under
 *    u_lock and, when the list was empty, writes the eventfd; its libevent
 *    event, on the loop thread, takes the whole list and completes each
 *    request (the io_threads.c scheme, without libevent's own locking, so
 *    the caller's event_base needs no evthread set-up).
 *
 * Invariants:
 *  1. u_outstanding (loop thread only) counts requests handed to the
 *     caller's submit whose completion has not been posted by
 *     qsm_io_complete() nor run from the thread-safe queue.
 *  2. u_ev is added exactly while u_outstanding > 0, so an idle handle does
 *     not keep event_base_dispatch() running.
 *  3. u_efd has been written since u_ts_head last became non-empty.
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

struct qsm_io_user {
	struct qsm_io_common c;        /* first */
	struct qsm_io_ops uops;        /* the caller's table, as it gave it */
	struct qsm_io_ops wrap;        /* what io->ops points at */
	uint64_t u_outstanding;        /* invariant 1 */
	int u_efd;
	struct event *u_ev;
	bool u_ev_added;

	pthread_mutex_t u_lock;        /* protects the list below */
	struct qsm_io_req *u_ts_head, **u_ts_tail;
};

static void qsm_io_user_submit(struct qsm_io *io, struct qsm_io_req *req);
static void qsm_io_user_close(struct qsm_io *io);

static struct qsm_io_user *qsm_io_user_of(struct qsm_io *io)
{
	if (!io || !io->ops || io->ops->submit != qsm_io_user_submit)
		return NULL;
	return container_of(io, struct qsm_io_user, c.io);
}

/* One request's completion is posted or run: maintain invariants 1, 2. */
static void qsm_io_user_done(struct qsm_io_user *u)
{
	assert(u->u_outstanding > 0);
	if (--u->u_outstanding == 0 && u->u_ev_added) {
		event_del(u->u_ev);
		u->u_ev_added = false;
	}
}

static void qsm_io_user_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct qsm_io_user *u = container_of(io, struct qsm_io_user, c.io);

	if (u->u_outstanding++ == 0 && !u->u_ev_added) {
		if (event_add(u->u_ev, NULL) < 0) {
			/* Cannot watch for thread completions: fail it. */
			u->u_outstanding--;
			qsm_io_defer_complete_(io, req, -ENOMEM);
			return;
		}
		u->u_ev_added = true;
	}
	u->uops.submit(io, req);
}

/* The eventfd became readable: run what the backend's threads finished. */
static void qsm_io_user_ts_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_io_user *u = arg;
	uint64_t v;

	if (read(u->u_efd, &v, sizeof(v)) < 0) {
		/* EAGAIN: a spurious wake-up; the list decides. */
	}
	pthread_mutex_lock(&u->u_lock);
	struct qsm_io_req *list = u->u_ts_head;
	u->u_ts_head = NULL;
	u->u_ts_tail = &u->u_ts_head;
	pthread_mutex_unlock(&u->u_lock);

	while (list) {
		struct qsm_io_req *req = list;
		list = req->io_next;
		req->io_next = NULL;
		qsm_io_user_done(u);
		qsm_io_enter_(&u->c.io);
		qsm_io_complete_(&u->c.io, req, req->io_ret);
		if (qsm_io_leave_(&u->c.io))
			return; /* closed: nothing was in flight, or the rest of
				 * list was forgotten by qsm_io_abandon */
	}
}

static void qsm_io_user_close(struct qsm_io *io)
{
	struct qsm_io_user *u = container_of(io, struct qsm_io_user, c.io);

	/* Abandoned (qsm_io_abandon): the caller's close finishes or cancels
	 * what its backend still holds, and completes none of it (qsm_io.h);
	 * completions it had already posted are forgotten. */
	assert(qsm_io_abandoned_(io) || (u->u_outstanding == 0 && !u->u_ts_head));
	u->uops.close(io);
	u->u_ts_head = NULL;
	if (u->u_ev)
		event_free(u->u_ev);
	if (u->u_efd >= 0)
		close(u->u_efd);
	pthread_mutex_destroy(&u->u_lock);
	qsm_io_common_fini_(&u->c);
	free(u);
}

int qsm_io_new_sized(struct event_base *base, const struct qsm_io_ops *ops, size_t ops_size,
		     int flags, void *priv, struct qsm_io **out)
{
	struct qsm_io_user *u;
	int ret;

	if (out)
		*out = NULL;
	if (!base || !ops || !out || (flags & ~QSM_IO_RDONLY))
		return -EINVAL;
	/* A newer caller's table: what this library does not know must be unset. */
	for (size_t i = sizeof(struct qsm_io_ops); i < ops_size; i++)
		if (((const unsigned char *)ops)[i])
			return -EINVAL;
	u = calloc(1, sizeof(*u));
	if (!u)
		return -ENOMEM;
	memcpy(&u->uops, ops, QSM_MIN(ops_size, sizeof(struct qsm_io_ops)));
	if (!u->uops.submit || !u->uops.pread_sync || !u->uops.pwrite_sync ||
	    !u->uops.flush_sync || !u->uops.truncate_sync || !u->uops.get_size ||
	    !u->uops.close) {
		free(u);
		return -EINVAL;
	}
	u->wrap = u->uops;
	u->wrap.submit = qsm_io_user_submit;
	u->wrap.close = qsm_io_user_close;
	if (!u->wrap.name)
		u->wrap.name = "user";
	if ((ret = qsm_io_common_init_(&u->c, &u->wrap, base, flags)) < 0) {
		free(u);
		return ret;
	}
	u->c.io.priv = priv;
	u->u_ts_tail = &u->u_ts_head;
	pthread_mutex_init(&u->u_lock, NULL);
	u->u_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (u->u_efd < 0) {
		ret = -errno;
		goto fail;
	}
	u->u_ev = event_new(base, u->u_efd, EV_READ | EV_PERSIST, qsm_io_user_ts_cb, u);
	if (!u->u_ev) {
		ret = -ENOMEM;
		goto fail;
	}
	*out = &u->c.io;
	return 0;

fail:
	if (u->u_efd >= 0)
		close(u->u_efd);
	pthread_mutex_destroy(&u->u_lock);
	qsm_io_common_fini_(&u->c);
	free(u);
	return ret;
}

void qsm_io_complete(struct qsm_io_req *req, int ret)
{
	struct qsm_io *io = req->io_handle;
	struct qsm_io_user *u = qsm_io_user_of(io);

	assert(io && "qsm_io_complete: the request was never submitted");
	assert(ret <= 0 && ret > -4096);
	if (u)
		qsm_io_user_done(u);
	qsm_io_defer_complete_(io, req, ret);
}

void qsm_io_complete_threadsafe(struct qsm_io_req *req, int ret)
{
	struct qsm_io_user *u = qsm_io_user_of(req->io_handle);

	/* Only handles made by qsm_io_new have the queue (the in-tree
	 * backends have their own completion paths). */
	assert(u && "qsm_io_complete_threadsafe: not a qsm_io_new handle");
	assert(ret <= 0 && ret > -4096);
	req->io_ret = ret;
	req->io_next = NULL;
	pthread_mutex_lock(&u->u_lock);
	bool was_empty = !u->u_ts_head;
	*u->u_ts_tail = req;
	u->u_ts_tail = &req->io_next;
	pthread_mutex_unlock(&u->u_lock);
	if (was_empty) {
		uint64_t one = 1;
		/* Cannot fail short of a counter overflow (2^64 - 2 posts). */
		while (write(u->u_efd, &one, sizeof(one)) < 0 && errno == EINTR)
			;
	}
}
