/*
 * tests/unit/test_work.c: Check suite "work", the CPU worker pool (io/work.h)
 * against its contracts: fn on a worker thread, done on the loop and never
 * from submit, jobs running in parallel, the bounded queue and its waiters,
 * an idle pool not keeping the loop alive, inline mode (loop thread,
 * submission order), and freeing a pool with jobs outstanding.
 */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/util.h"
#include "io/work.h"
#include "tests/unit/skip.h"

struct job {
	struct qsm_work w;
	int id;
	pthread_t ran_on;          /* thread fn ran on */
	int done_count;
	bool done_on_loop;
	uint64_t sum;              /* some real work */
	pthread_barrier_t *barrier;
	bool barrier_ok;
	int *order;                /* done order log */
	int *order_n;
};

static pthread_t g_loop_thread;
static bool g_in_submit;
static int g_inline_done;       /* done callbacks run inside submit */

static void job_fn(struct qsm_work *w)
{
	struct job *j = container_of(w, struct job, w);
	j->ran_on = pthread_self();
	uint64_t s = (uint64_t)j->id;
	for (int i = 0; i < 1000; i++)
		s = s * 6364136223846793005ull + 1442695040888963407ull;
	j->sum = s;
	if (j->barrier) {
		/* Both jobs must be inside fn at once: with one worker this would
		 * never return, so wait with a deadline instead. */
		j->barrier_ok = pthread_barrier_wait(j->barrier) != EINVAL;
	}
}

static void job_done(struct qsm_work *w)
{
	struct job *j = container_of(w, struct job, w);
	if (g_in_submit)
		g_inline_done++;
	j->done_count++;
	j->done_on_loop = pthread_equal(pthread_self(), g_loop_thread);
	if (j->order)
		j->order[(*j->order_n)++] = j->id;
}

static void job_init(struct job *j, int id)
{
	memset(j, 0, sizeof(*j));
	j->id = id;
	j->w.fn = job_fn;
	j->w.done = job_done;
}

static int submit(struct qsm_work_pool *p, struct job *j)
{
	g_in_submit = true;
	int ret = qsm_work_submit(p, &j->w);
	g_in_submit = false;
	return ret;
}

static void run_until(struct event_base *base, const int *counter, int target)
{
	time_t t0 = time(NULL);
	while (*counter < target && time(NULL) - t0 < 30)
		event_base_loop(base, EVLOOP_ONCE);
}

START_TEST(threads_run_off_loop_and_complete_on_loop)
{
	struct event_base *base = event_base_new();
	struct qsm_work_pool *p;
	g_loop_thread = pthread_self();
	enum { N = 200 };
	ck_assert_int_eq(qsm_work_pool_new(base, 2, N, &p), 0);
	ck_assert_int_eq(qsm_work_threads(p), 2);
	static struct job jobs[N];
	int order[N], order_n = 0;
	for (int i = 0; i < N; i++) {
		job_init(&jobs[i], i);
		jobs[i].order = order;
		jobs[i].order_n = &order_n;
		ck_assert_int_eq(submit(p, &jobs[i]), 0);
		ck_assert_int_eq(jobs[i].done_count, 0); /* never from submit */
	}
	ck_assert_uint_eq(qsm_work_outstanding(p), N);
	/* Contract 4: dispatch returns once everything is done. */
	ck_assert_int_ge(event_base_dispatch(base), 0);
	ck_assert_int_eq(order_n, N);
	ck_assert_uint_eq(qsm_work_outstanding(p), 0);
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(jobs[i].done_count, 1);
		ck_assert(jobs[i].done_on_loop);
		ck_assert(!pthread_equal(jobs[i].ran_on, g_loop_thread));
		ck_assert(jobs[i].sum != 0);
	}
	ck_assert_int_eq(g_inline_done, 0);
	qsm_work_pool_free(p);
	event_base_free(base);
}
END_TEST

/* Two jobs that can finish only together: proves two workers run at once. */
START_TEST(threads_run_in_parallel)
{
	struct event_base *base = event_base_new();
	struct qsm_work_pool *p;
	g_loop_thread = pthread_self();
	ck_assert_int_eq(qsm_work_pool_new(base, 2, 0, &p), 0);
	pthread_barrier_t b;
	pthread_barrier_init(&b, NULL, 2);
	struct job a, c;
	job_init(&a, 1);
	job_init(&c, 2);
	a.barrier = c.barrier = &b;
	ck_assert_int_eq(submit(p, &a), 0);
	ck_assert_int_eq(submit(p, &c), 0);
	/* With a single worker the barrier never opens and the test times out
	 * (CK_DEFAULT_TIMEOUT) rather than passing. */
	while (a.done_count + c.done_count < 2)
		event_base_loop(base, EVLOOP_ONCE);
	ck_assert_int_eq(a.done_count + c.done_count, 2);
	ck_assert(a.barrier_ok && c.barrier_ok);
	ck_assert(!pthread_equal(a.ran_on, c.ran_on));
	pthread_barrier_destroy(&b);
	qsm_work_pool_free(p);
	event_base_free(base);
}
END_TEST

struct waiter {
	struct qsm_work_waiter ww;
	int woken;
	unsigned outstanding_at_wake;
	struct qsm_work_pool *p;
};

static void waiter_cb(struct qsm_work_waiter *ww)
{
	struct waiter *w = container_of(ww, struct waiter, ww);
	w->woken++;
	w->outstanding_at_wake = qsm_work_outstanding(w->p);
}

static void bounded_queue(int threads)
{
	struct event_base *base = event_base_new();
	struct qsm_work_pool *p;
	g_loop_thread = pthread_self();
	ck_assert_int_eq(qsm_work_pool_new(base, threads, 4, &p), 0);
	struct job jobs[6];
	for (int i = 0; i < 6; i++)
		job_init(&jobs[i], i);
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(submit(p, &jobs[i]), 0);
	ck_assert_int_eq(submit(p, &jobs[4]), -EAGAIN);
	ck_assert_uint_eq(qsm_work_outstanding(p), 4);
	struct waiter w1 = { .ww.cb = waiter_cb, .p = p }, w2 = { .ww.cb = waiter_cb, .p = p };
	struct waiter w3 = { .ww.cb = waiter_cb, .p = p };
	qsm_work_wait(p, &w1.ww);
	qsm_work_wait(p, &w3.ww);
	qsm_work_wait(p, &w2.ww);
	qsm_work_unwait(p, &w3.ww); /* changed its mind: never woken */
	ck_assert_int_eq(w1.woken, 0);
	run_until(base, &w1.woken, 1);
	ck_assert_int_eq(w1.woken, 1);
	ck_assert_uint_eq(w1.outstanding_at_wake, 3); /* woken with room */
	ck_assert_int_eq(submit(p, &jobs[4]), 0);
	run_until(base, &w2.woken, 1);
	ck_assert_int_eq(submit(p, &jobs[5]), 0);
	ck_assert_int_ge(event_base_dispatch(base), 0);
	for (int i = 0; i < 6; i++)
		ck_assert_int_eq(jobs[i].done_count, 1);
	ck_assert_int_eq(w1.woken, 1);
	ck_assert_int_eq(w2.woken, 1);
	ck_assert_int_eq(w3.woken, 0);
	ck_assert_int_eq(g_inline_done, 0);
	qsm_work_pool_free(p);
	event_base_free(base);
}

START_TEST(bounded_queue_threads)
{
	bounded_queue(2);
}
END_TEST

START_TEST(bounded_queue_inline)
{
	bounded_queue(QSM_WORK_INLINE);
}
END_TEST

START_TEST(inline_mode_in_order_on_loop)
{
	struct event_base *base = event_base_new();
	struct qsm_work_pool *p;
	g_loop_thread = pthread_self();
	ck_assert_int_eq(qsm_work_pool_new(base, QSM_WORK_INLINE, 0, &p), 0);
	ck_assert_int_eq(qsm_work_threads(p), 0);
	enum { N = 20 };
	struct job jobs[N];
	int order[N], order_n = 0;
	for (int i = 0; i < N; i++) {
		job_init(&jobs[i], i);
		jobs[i].order = order;
		jobs[i].order_n = &order_n;
		ck_assert_int_eq(submit(p, &jobs[i]), 0);
	}
	ck_assert_int_eq(order_n, 0);
	ck_assert_int_ge(event_base_dispatch(base), 0);
	ck_assert_int_eq(order_n, N);
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(order[i], i);
		ck_assert(pthread_equal(jobs[i].ran_on, g_loop_thread));
		ck_assert(jobs[i].done_on_loop);
	}
	ck_assert_int_eq(g_inline_done, 0);
	qsm_work_pool_free(p);
	event_base_free(base);
}
END_TEST

/* A done callback that submits the next job (as a request moving on). */
struct chain {
	struct qsm_work w;
	struct qsm_work_pool *p;
	int left, done;
};

static void chain_fn(struct qsm_work *w)
{
	(void)w;
}

static void chain_done(struct qsm_work *w)
{
	struct chain *c = container_of(w, struct chain, w);
	c->done++;
	if (--c->left > 0)
		ck_assert_int_eq(qsm_work_submit(c->p, &c->w), 0);
}

static void resubmit_from_done(int threads)
{
	struct event_base *base = event_base_new();
	struct chain c = { .w = { .fn = chain_fn, .done = chain_done }, .left = 50 };
	ck_assert_int_eq(qsm_work_pool_new(base, threads, 0, &c.p), 0);
	ck_assert_int_eq(qsm_work_submit(c.p, &c.w), 0);
	ck_assert_int_ge(event_base_dispatch(base), 0);
	ck_assert_int_eq(c.done, 50);
	qsm_work_pool_free(c.p);
	event_base_free(base);
}

START_TEST(resubmit_from_done_threads)
{
	resubmit_from_done(3);
}
END_TEST

START_TEST(resubmit_from_done_inline)
{
	resubmit_from_done(QSM_WORK_INLINE);
}
END_TEST

START_TEST(free_with_jobs_outstanding)
{
	struct event_base *base = event_base_new();
	struct qsm_work_pool *p;
	ck_assert_int_eq(qsm_work_pool_new(base, 2, 64, &p), 0);
	struct job jobs[64];
	for (int i = 0; i < 64; i++) {
		job_init(&jobs[i], i);
		ck_assert_int_eq(submit(p, &jobs[i]), 0);
	}
	qsm_work_pool_free(p); /* joins the workers; done never runs */
	for (int i = 0; i < 64; i++)
		ck_assert_int_eq(jobs[i].done_count, 0);
	event_base_free(base);
}
END_TEST

START_TEST(bad_arguments_and_defaults)
{
	struct event_base *base = event_base_new();
	struct qsm_work_pool *p;
	ck_assert_int_eq(qsm_work_pool_new(NULL, 2, 0, &p), -EINVAL);
	ck_assert_int_eq(qsm_work_pool_new(base, -2, 0, &p), -EINVAL);
	ck_assert_int_eq(qsm_work_pool_new(base, QSM_WORK_MAX_THREADS + 1, 0, &p), -EINVAL);
	ck_assert_int_ge(qsm_work_default_threads(), 2);
	ck_assert_int_eq(qsm_work_pool_new(base, 0, 0, &p), 0);
	ck_assert_int_eq(qsm_work_threads(p), qsm_work_default_threads());
	qsm_work_pool_free(p);
	event_base_free(base);
}
END_TEST

static Suite *work_suite(void)
{
	Suite *s = suite_create("work");
	TCase *t = tcase_create("pool");
	tcase_set_timeout(t, 60);
	tcase_add_test(t, threads_run_off_loop_and_complete_on_loop);
	tcase_add_test(t, threads_run_in_parallel);
	tcase_add_test(t, bounded_queue_threads);
	tcase_add_test(t, bounded_queue_inline);
	tcase_add_test(t, inline_mode_in_order_on_loop);
	tcase_add_test(t, resubmit_from_done_threads);
	tcase_add_test(t, resubmit_from_done_inline);
	tcase_add_test(t, free_with_jobs_outstanding);
	tcase_add_test(t, bad_arguments_and_defaults);
	suite_add_tcase(s, t);
	return s;
}

int main(void)
{
	return qsm_test_run(work_suite());
}
