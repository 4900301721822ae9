/*
 * io/work.h: a small worker-thread pool for CPU work off the event loop
 * (deflate and inflate of compressed clusters).
 *
 * The caller owns each job (`struct qsm_work`, embedded in its request and
 * recovered with container_of).  A job's fn runs on a worker thread; its done
 * callback then runs on the event loop given at creation, never from inside
 * qsm_work_submit().  Nothing here knows what the work is.
 *
 * Contracts:
 *  1. fn touches only memory the job owns (its buffers); it never calls
 *     libevent or qsm.  Everything else happens in done, on the loop.
 *  2. done runs exactly once per accepted job, on the loop thread, after fn
 *     returned; jobs complete in any order (two workers race).
 *  3. At most max_queued jobs are accepted and not yet completed; past that
 *     qsm_work_submit returns -EAGAIN and accepts nothing, and the caller may
 *     wait for room with qsm_work_wait (its callback runs on the loop once a
 *     job has completed).  The bound keeps the work (and the buffers its
 *     owners hold) proportional to what the CPUs can do.
 *  4. An idle pool keeps no event added: event_base_dispatch() returns when
 *     nothing else is pending.
 *  5. qsm_work_pool_free joins the workers.  With jobs still outstanding
 *     (an abandoned image) their done callbacks never run, but no worker
 *     touches their memory once it returns.
 *
 * Inline mode (threads = QSM_WORK_INLINE): no threads; jobs run, fn then
 * done, from a deferred loop callback in submission order.  For embedders
 * that want no threads and for deterministic tests on the simulated disk.
 */
#ifndef QSM_IO_WORK_H
#define QSM_IO_WORK_H

#include <stdbool.h>
#include <stdint.h>

struct event_base;
struct qsm_work;

typedef void (*qsm_work_fn)(struct qsm_work *w);

struct qsm_work {
	/* Set by the caller before qsm_work_submit(). */
	qsm_work_fn fn;    /* worker thread: the CPU work */
	qsm_work_fn done;  /* loop thread: the job is over */
	/* Private to io/work.c. */
	struct qsm_work *w_next;
};

/* Room in the queue: cb runs on the loop (once) after a job completed. */
struct qsm_work_waiter {
	void (*cb)(struct qsm_work_waiter *w);
	struct qsm_work_waiter *ww_next;
};

#define QSM_WORK_INLINE (-1)
#define QSM_WORK_MAX_THREADS 64

struct qsm_work_pool;

/* Default worker count: online CPUs, at least 2, at most QSM_WORK_MAX_THREADS. */
int qsm_work_default_threads(void);

/*
 * threads: 0 for the default, QSM_WORK_INLINE, or 1..QSM_WORK_MAX_THREADS.
 * max_queued: 0 for 16 per thread (at least 32).  -EINVAL, -ENOMEM, or the
 * error of pthread_create / eventfd.
 */
int qsm_work_pool_new(struct event_base *base, int threads, unsigned max_queued,
		      struct qsm_work_pool **out);
/* 0, or -EAGAIN when max_queued jobs are outstanding (see contract 3). */
int qsm_work_submit(struct qsm_work_pool *p, struct qsm_work *w);
/* Call w->cb once a job completes (FIFO among waiters). */
void qsm_work_wait(struct qsm_work_pool *p, struct qsm_work_waiter *w);
/* Remove a waiter that no longer wants room (no-op when not waiting). */
void qsm_work_unwait(struct qsm_work_pool *p, struct qsm_work_waiter *w);
/* Worker threads (0 in inline mode) and jobs outstanding. */
int qsm_work_threads(const struct qsm_work_pool *p);
unsigned qsm_work_outstanding(const struct qsm_work_pool *p);
/* Stop the workers and release the pool (contract 5). */
void qsm_work_pool_free(struct qsm_work_pool *p);

#endif
