/*
 * io/work.c: the worker-thread pool of io/work.h.
 *
 * Same shape as the threads I/O backend (io_threads.c): workers take jobs
 * from a mutex/cond queue and run fn; a finished job goes on a done list;
 * the worker that makes that list non-empty writes an eventfd, whose libevent
 * event (loop thread) takes the whole list and runs each job's done.
 *
 * Invariants:
 *  1. A job is on at most one list (queue, done), linked by w_next, or owned
 *     by exactly one worker while fn runs.
 *  2. wp_outstanding (loop thread only) counts jobs accepted and not yet
 *     completed, <= wp_max; in threaded mode wp_ev is added exactly while it
 *     is > 0 (io/work.h contract 4).
 *  3. wp_efd has been written since the done list last became non-empty.
 *  4. Waiters (loop thread only) are woken one per completed job, before
 *     that job's done runs.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/util.h"
#include "io/work.h"

struct qsm_work_pool {
	struct event_base *wp_base;
	int wp_nthreads;               /* 0: inline mode */
	unsigned wp_max;
	unsigned wp_outstanding;       /* loop thread only, invariant 2 */
	struct qsm_work_waiter *wp_waiters, **wp_waiters_tail; /* loop thread only */
	struct event *wp_ev;           /* eventfd (threads) or deferred (inline) */
	int wp_efd;

	pthread_mutex_t wp_lock;       /* protects the two lists and wp_stop */
	pthread_cond_t wp_cond;        /* queue non-empty or wp_stop */
	struct qsm_work *wp_queue, **wp_queue_tail;
	struct qsm_work *wp_done, **wp_done_tail;
	bool wp_stop;
	int wp_started;
	pthread_t wp_threads[QSM_WORK_MAX_THREADS];
};

int qsm_work_default_threads(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	if (n < 2)
		n = 2;
	if (n > QSM_WORK_MAX_THREADS)
		n = QSM_WORK_MAX_THREADS;
	return (int)n;
}

static void *worker_main(void *arg)
{
	struct qsm_work_pool *p = arg;

	pthread_mutex_lock(&p->wp_lock);
	for (;;) {
		while (!p->wp_queue && !p->wp_stop)
			pthread_cond_wait(&p->wp_cond, &p->wp_lock);
		if (p->wp_stop)
			break; /* queued jobs are dropped: contract 5 */
		struct qsm_work *w = p->wp_queue;
		p->wp_queue = w->w_next;
		if (!p->wp_queue)
			p->wp_queue_tail = &p->wp_queue;
		w->w_next = NULL;
		pthread_mutex_unlock(&p->wp_lock);

		w->fn(w);

		pthread_mutex_lock(&p->wp_lock);
		bool wake = p->wp_done == NULL;
		*p->wp_done_tail = w;
		p->wp_done_tail = &w->w_next;
		if (wake) {
			uint64_t one = 1;
			/* A lost wake-up would hang the job: insist. */
			while (write(p->wp_efd, &one, sizeof(one)) < 0 && errno == EINTR)
				;
		}
	}
	pthread_mutex_unlock(&p->wp_lock);
	return NULL;
}

/* Loop thread: one job is over. */
static void complete(struct qsm_work_pool *p, struct qsm_work *w)
{
	assert(p->wp_outstanding > 0);
	if (--p->wp_outstanding == 0 && p->wp_nthreads)
		event_del(p->wp_ev);
	struct qsm_work_waiter *ww = p->wp_waiters;
	if (ww) {
		p->wp_waiters = ww->ww_next;
		if (!p->wp_waiters)
			p->wp_waiters_tail = &p->wp_waiters;
		ww->ww_next = NULL;
		ww->cb(ww);
	}
	w->done(w);
}

static void threads_event_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_work_pool *p = arg;
	uint64_t cnt;

	if (read(p->wp_efd, &cnt, sizeof(cnt)) < 0) {
		/* EAGAIN: a stale wake-up; the list decides. */
	}
	pthread_mutex_lock(&p->wp_lock);
	struct qsm_work *list = p->wp_done;
	p->wp_done = NULL;
	p->wp_done_tail = &p->wp_done;
	pthread_mutex_unlock(&p->wp_lock);

	while (list) {
		struct qsm_work *w = list;
		list = w->w_next;
		w->w_next = NULL;
		complete(p, w);
	}
}

static void inline_event_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_work_pool *p = arg;
	/* Take the queue first: done callbacks may submit more (they then
	 * activate the event again, for the next loop pass). */
	struct qsm_work *list = p->wp_queue;
	p->wp_queue = NULL;
	p->wp_queue_tail = &p->wp_queue;
	while (list) {
		struct qsm_work *w = list;
		list = w->w_next;
		w->w_next = NULL;
		w->fn(w);
		complete(p, w);
	}
}

int qsm_work_pool_new(struct event_base *base, int threads, unsigned max_queued,
		      struct qsm_work_pool **out)
{
	*out = NULL;
	if (!base || threads < QSM_WORK_INLINE || threads > QSM_WORK_MAX_THREADS)
		return -EINVAL;
	if (threads == 0)
		threads = qsm_work_default_threads();
	struct qsm_work_pool *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->wp_base = base;
	p->wp_nthreads = threads == QSM_WORK_INLINE ? 0 : threads;
	p->wp_max = max_queued ? max_queued : (unsigned)QSM_MAX(32, 16 * p->wp_nthreads);
	p->wp_efd = -1;
	p->wp_queue_tail = &p->wp_queue;
	p->wp_done_tail = &p->wp_done;
	p->wp_waiters_tail = &p->wp_waiters;
	pthread_mutex_init(&p->wp_lock, NULL);
	pthread_cond_init(&p->wp_cond, NULL);

	int ret = 0;
	if (!p->wp_nthreads) {
		p->wp_ev = event_new(base, -1, 0, inline_event_cb, p);
		if (!p->wp_ev)
			ret = -ENOMEM;
	} else {
		p->wp_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (p->wp_efd < 0)
			ret = -errno;
		else if (!(p->wp_ev = event_new(base, p->wp_efd, EV_READ | EV_PERSIST,
						 threads_event_cb, p)))
			ret = -ENOMEM;
		for (int i = 0; ret == 0 && i < p->wp_nthreads; i++) {
			int err = pthread_create(&p->wp_threads[i], NULL, worker_main, p);
			if (err)
				ret = -err;
			else
				p->wp_started++;
		}
	}
	if (ret < 0) {
		qsm_work_pool_free(p);
		return ret;
	}
	*out = p;
	return 0;
}

int qsm_work_submit(struct qsm_work_pool *p, struct qsm_work *w)
{
	assert(w->fn && w->done);
	if (p->wp_outstanding >= p->wp_max)
		return -EAGAIN;
	if (p->wp_nthreads && p->wp_outstanding == 0 && event_add(p->wp_ev, NULL) < 0)
		return -ENOMEM;
	p->wp_outstanding++;
	w->w_next = NULL;
	if (!p->wp_nthreads) {
		*p->wp_queue_tail = w;
		p->wp_queue_tail = &w->w_next;
		event_active(p->wp_ev, 0, 0);
		return 0;
	}
	pthread_mutex_lock(&p->wp_lock);
	*p->wp_queue_tail = w;
	p->wp_queue_tail = &w->w_next;
	pthread_cond_signal(&p->wp_cond);
	pthread_mutex_unlock(&p->wp_lock);
	return 0;
}

void qsm_work_wait(struct qsm_work_pool *p, struct qsm_work_waiter *w)
{
	w->ww_next = NULL;
	*p->wp_waiters_tail = w;
	p->wp_waiters_tail = &w->ww_next;
}

void qsm_work_unwait(struct qsm_work_pool *p, struct qsm_work_waiter *w)
{
	struct qsm_work_waiter *prev = NULL;
	for (struct qsm_work_waiter **pp = &p->wp_waiters; *pp; prev = *pp, pp = &(*pp)->ww_next) {
		if (*pp == w) {
			*pp = w->ww_next;
			if (!*pp)
				p->wp_waiters_tail = prev ? &prev->ww_next : &p->wp_waiters;
			w->ww_next = NULL;
			return;
		}
	}
}

int qsm_work_threads(const struct qsm_work_pool *p)
{
	return p->wp_nthreads;
}

unsigned qsm_work_outstanding(const struct qsm_work_pool *p)
{
	return p->wp_outstanding;
}

/* Also the error path of qsm_work_pool_new: copes with a partly built pool. */
void qsm_work_pool_free(struct qsm_work_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->wp_lock);
	p->wp_stop = true;
	pthread_cond_broadcast(&p->wp_cond);
	pthread_mutex_unlock(&p->wp_lock);
	for (int i = 0; i < p->wp_started; i++)
		pthread_join(p->wp_threads[i], NULL);
	if (p->wp_ev)
		event_free(p->wp_ev);
	if (p->wp_efd >= 0)
		close(p->wp_efd);
	pthread_cond_destroy(&p->wp_cond);
	pthread_mutex_destroy(&p->wp_lock);
	free(p);
}
