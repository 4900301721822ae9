/*
 * tests/unit/test_l2cache.c: Check suite "l2cache" for metadata/l2cache.c and
 * metadata/batch.c, against the contract in metadata/l2cache.h.
 *
 * Tables are loaded from the simulated disk (io/sim.h), whose clusters are
 * filled with a pattern naming their offset, so every loaded table can be
 * checked byte for byte.  The loop runs until the sim has completed what is
 * in flight.  After every step qsm_l2_cache_check() must hold; waiters record
 * their calls and assert they never run inside qsm_l2_get/qsm_l2_create.
 * A final randomized test drives the cache against a small model (seed
 * printed; QSM_TEST_SEED overrides it).
 */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/sim.h"
#include "io/util.h"
#include "metadata/batch.h"
#include "metadata/l2cache.h"
#include "tests/unit/skip.h"

#define CS 4096u           /* cluster size of the tests */
#define NTABLES 16u        /* tables on the simulated disk */
#define T(i) ((uint64_t)((i) + 1) * CS) /* host offset of table i */

/* --- Harness ------------------------------------------------------------- */

struct fx {
	struct event_base *base;
	struct qsm_sim *sim;
	struct qsm_io *io;
	struct qsm_l2_cache c;
	unsigned need_wb;      /* need_writeback calls */
};

static bool g_in_cache_call; /* set around qsm_l2_get/qsm_l2_create */

/* Byte j of table at offset off, as written to the disk. */
static uint8_t pattern(uint64_t off, size_t j)
{
	return (uint8_t)((off / CS) * 37 + j * 7 + 1);
}

static bool table_is_pristine(const struct qsm_l2_table *t)
{
	for (size_t j = 0; j < CS; j++)
		if (t->data[j] != pattern(t->offset, j))
			return false;
	return true;
}

static void need_wb_hook(void *opaque)
{
	struct fx *f = opaque;
	f->need_wb++;
}

#define CHECK_CACHE(f) ck_assert_msg(qsm_l2_cache_check(&(f)->c), "qsm_l2_cache_check failed")

static void fx_init(struct fx *f, size_t capacity, uint64_t seed)
{
	memset(f, 0, sizeof(*f));
	f->base = event_base_new();
	ck_assert_ptr_nonnull(f->base);
	f->sim = qsm_sim_new(seed);
	ck_assert_ptr_nonnull(f->sim);
	ck_assert_int_eq(qsm_io_open_sim(f->base, f->sim, 0, &f->io), 0);
	uint8_t buf[CS];
	for (unsigned i = 0; i < NTABLES; i++) {
		for (size_t j = 0; j < CS; j++)
			buf[j] = pattern(T(i), j);
		ck_assert_int_eq(qsm_io_pwrite_sync(f->io, buf, CS, T(i)), 0);
	}
	ck_assert_int_eq(qsm_l2_cache_init(&f->c, f->io, CS, capacity), 0);
	f->c.need_writeback = need_wb_hook;
	f->c.opaque = f;
	CHECK_CACHE(f);
}

/* Run the loop until the sim has nothing in flight (and once more). */
static void fx_run(struct fx *f)
{
	for (int i = 0; i < 10000 && f->io->stats.in_flight; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
	ck_assert_uint_eq(f->io->stats.in_flight, 0);
	event_base_loop(f->base, EVLOOP_NONBLOCK);
	CHECK_CACHE(f);
}

static uint64_t fx_reads(const struct fx *f)
{
	return f->io->stats.ops[QSM_IO_READ];
}

static void fx_destroy(struct fx *f)
{
	fx_run(f);
	CHECK_CACHE(f);
	qsm_l2_cache_destroy(&f->c);
	qsm_io_close(f->io);
	qsm_sim_free(f->sim);
	event_base_free(f->base);
}

struct tw {
	struct qsm_l2_waiter w;
	unsigned calls;
	int ret;
	struct qsm_l2_table *table;
};

static void tw_fn(struct qsm_l2_waiter *w, int ret)
{
	struct tw *t = container_of(w, struct tw, w);
	ck_assert_msg(!g_in_cache_call, "waiter called from inside qsm_l2_get/create");
	t->calls++;
	t->ret = ret;
	t->table = w->table;
}

static void tw_init(struct tw *t)
{
	memset(t, 0, sizeof(*t));
	t->w.fn = tw_fn;
}

static int get(struct fx *f, uint64_t off, struct qsm_l2_table **out, struct tw *t)
{
	g_in_cache_call = true;
	int ret = qsm_l2_get(&f->c, off, out, &t->w);
	g_in_cache_call = false;
	CHECK_CACHE(f);
	return ret;
}

static int create(struct fx *f, uint64_t off, const uint8_t *init, struct qsm_l2_table **out,
		  struct tw *t)
{
	g_in_cache_call = true;
	int ret = qsm_l2_create(&f->c, off, init, out, &t->w);
	g_in_cache_call = false;
	CHECK_CACHE(f);
	return ret;
}

static void put(struct fx *f, struct qsm_l2_table *t)
{
	qsm_l2_put(&f->c, t);
	CHECK_CACHE(f);
}

/* Load table off through a miss and return it referenced. */
static struct qsm_l2_table *load(struct fx *f, uint64_t off)
{
	struct tw w;
	struct qsm_l2_table *t = NULL;
	tw_init(&w);
	int ret = get(f, off, &t, &w);
	if (ret == 0)
		return t;
	ck_assert_int_eq(ret, -EAGAIN);
	ck_assert_uint_eq(w.calls, 0);
	fx_run(f);
	ck_assert_uint_eq(w.calls, 1);
	ck_assert_int_eq(w.ret, 0);
	ck_assert_ptr_nonnull(w.table);
	ck_assert_uint_eq(w.table->offset, off);
	return w.table;
}

/* The cached entry for off, or NULL (without touching counters or LRU). */
static struct qsm_l2_table *cached(const struct fx *f, uint64_t off)
{
	for (size_t i = 0; i < f->c.hash_size; i++)
		for (struct qsm_l2_table *t = f->c.hash[i]; t; t = t->hnext)
			if (t->offset == off)
				return t;
	return NULL;
}

static bool on_lru(const struct fx *f, const struct qsm_l2_table *t)
{
	for (const struct qsm_l2_table *p = f->c.lru.lru_next; p != &f->c.lru; p = p->lru_next)
		if (p == t)
			return true;
	return false;
}

/* --- Hits, misses and loads ---------------------------------------------- */

START_TEST(test_miss_then_hit)
{
	struct fx f;
	fx_init(&f, 4, 1);
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *t = NULL;

	ck_assert_int_eq(get(&f, T(0), &t, &w), -EAGAIN);
	ck_assert_uint_eq(f.c.misses, 1);
	ck_assert_uint_eq(f.c.hits, 0);
	ck_assert_uint_eq(w.calls, 0); /* never from inside get */
	ck_assert_uint_eq(f.c.nb_entries, 1);
	ck_assert_int_eq(cached(&f, T(0))->state, QSM_L2_LOADING);

	fx_run(&f);
	ck_assert_uint_eq(w.calls, 1);
	ck_assert_int_eq(w.ret, 0);
	ck_assert_ptr_nonnull(w.table);
	t = w.table;
	ck_assert_uint_eq(t->offset, T(0));
	ck_assert_int_eq(t->state, QSM_L2_READY);
	ck_assert_uint_eq(t->ref, 1); /* the waiter's reference */
	ck_assert(!on_lru(&f, t));
	ck_assert(table_is_pristine(t));
	ck_assert_uint_eq(fx_reads(&f), 1);

	struct qsm_l2_table *t2 = NULL;
	ck_assert_int_eq(get(&f, T(0), &t2, &w), 0);
	ck_assert_ptr_eq(t2, t);
	ck_assert_uint_eq(t->ref, 2);
	ck_assert_uint_eq(f.c.hits, 1);
	ck_assert_uint_eq(w.calls, 1); /* a hit does not call the waiter */

	put(&f, t);
	ck_assert(!on_lru(&f, t));
	put(&f, t2);
	ck_assert_uint_eq(t->ref, 0);
	ck_assert(on_lru(&f, t)); /* unreferenced, clean: evictable */

	/* Still cached: a hit, no new read, off the LRU again. */
	ck_assert_int_eq(get(&f, T(0), &t2, &w), 0);
	ck_assert_ptr_eq(t2, t);
	ck_assert(!on_lru(&f, t));
	ck_assert_uint_eq(fx_reads(&f), 1);
	ck_assert_uint_eq(f.c.misses, 1);
	ck_assert_uint_eq(f.c.hits, 2);
	put(&f, t2);

	/* Entries are accessible with qsm_l2_entry (big-endian). */
	uint64_t e = qsm_l2_entry(t, 1);
	uint64_t want = 0;
	for (int j = 0; j < 8; j++)
		want = want << 8 | pattern(T(0), 8 + j);
	ck_assert_uint_eq(e, want);
	fx_destroy(&f);
}
END_TEST

START_TEST(test_several_tables)
{
	struct fx f;
	fx_init(&f, 8, 2);
	struct qsm_l2_table *t[8];
	for (unsigned i = 0; i < 8; i++) {
		t[i] = load(&f, T(i));
		ck_assert(table_is_pristine(t[i]));
	}
	ck_assert_uint_eq(f.c.nb_entries, 8);
	ck_assert_uint_eq(f.c.misses, 8);
	ck_assert_uint_eq(f.c.evictions, 0);
	for (unsigned i = 0; i < 8; i++)
		ck_assert_ptr_eq(cached(&f, T(i)), t[i]);
	for (unsigned i = 0; i < 8; i++)
		put(&f, t[i]);
	fx_destroy(&f);
}
END_TEST

START_TEST(test_concurrent_loading_share_read)
{
	struct fx f;
	fx_init(&f, 4, 3);
	struct tw w[3];
	struct qsm_l2_table *t = NULL;
	for (int i = 0; i < 3; i++) {
		tw_init(&w[i]);
		ck_assert_int_eq(get(&f, T(5), &t, &w[i]), -EAGAIN);
	}
	ck_assert_uint_eq(f.c.nb_entries, 1);
	ck_assert_uint_eq(f.c.misses, 1); /* the later two joined the load */
	ck_assert_uint_eq(f.io->stats.in_flight, 1);
	fx_run(&f);
	ck_assert_uint_eq(fx_reads(&f), 1);
	for (int i = 0; i < 3; i++) {
		ck_assert_uint_eq(w[i].calls, 1);
		ck_assert_int_eq(w[i].ret, 0);
		ck_assert_ptr_eq(w[i].table, w[0].table);
	}
	t = w[0].table;
	ck_assert_uint_eq(t->ref, 3); /* one per waiter, the loader's dropped */
	ck_assert(table_is_pristine(t));
	for (int i = 0; i < 3; i++)
		put(&f, t);
	ck_assert(on_lru(&f, t));
	fx_destroy(&f);
}
END_TEST

/* --- Slots: capacity 1 and 2 --------------------------------------------- */

START_TEST(test_cap1_waits_for_put)
{
	struct fx f;
	fx_init(&f, 1, 4);
	struct qsm_l2_table *a = load(&f, T(0));
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *b = NULL;

	ck_assert_int_eq(get(&f, T(1), &b, &w), -EAGAIN);
	ck_assert_uint_eq(f.c.nb_entries, 1);
	ck_assert_uint_eq(f.need_wb, 0); /* nothing dirty */
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 0); /* the slot is still referenced */
	ck_assert_uint_eq(fx_reads(&f), 1);

	put(&f, a);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 1);
	ck_assert_int_eq(w.ret, 0);
	ck_assert_ptr_null(w.table); /* "a slot may be free, call again" */

	b = load(&f, T(1));
	ck_assert(table_is_pristine(b));
	ck_assert_uint_eq(f.c.evictions, 1);
	ck_assert_ptr_null(cached(&f, T(0)));
	ck_assert_uint_eq(f.c.nb_entries, 1);
	put(&f, b);
	fx_destroy(&f);
}
END_TEST

START_TEST(test_cap2_lru_order)
{
	struct fx f;
	fx_init(&f, 2, 5);
	struct qsm_l2_table *a = load(&f, T(0));
	struct qsm_l2_table *b = load(&f, T(1));
	put(&f, a); /* a is the oldest unreferenced */
	put(&f, b);

	struct qsm_l2_table *c = load(&f, T(2));
	ck_assert_uint_eq(f.c.evictions, 1);
	ck_assert_ptr_null(cached(&f, T(0)));
	ck_assert_ptr_eq(cached(&f, T(1)), b);
	put(&f, c);

	/* A hit refreshes b: the next miss evicts c, not b. */
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *x = NULL;
	ck_assert_int_eq(get(&f, T(1), &x, &w), 0);
	ck_assert_ptr_eq(x, b);
	put(&f, x);
	struct qsm_l2_table *d = load(&f, T(3));
	ck_assert_ptr_null(cached(&f, T(2)));
	ck_assert_ptr_eq(cached(&f, T(1)), b);
	ck_assert_uint_eq(f.c.evictions, 2);

	/* Both slots referenced: the third table waits for a put. */
	ck_assert_int_eq(get(&f, T(1), &x, &w), 0);
	struct tw w2;
	tw_init(&w2);
	struct qsm_l2_table *y = NULL;
	ck_assert_int_eq(get(&f, T(4), &y, &w2), -EAGAIN);
	fx_run(&f);
	ck_assert_uint_eq(w2.calls, 0);
	put(&f, d);
	fx_run(&f);
	ck_assert_uint_eq(w2.calls, 1);
	ck_assert_ptr_null(w2.table);
	y = load(&f, T(4));
	ck_assert_ptr_null(cached(&f, T(3))); /* d went, b is referenced */
	ck_assert_ptr_eq(cached(&f, T(1)), b);
	put(&f, x);
	put(&f, y);
	fx_destroy(&f);
}
END_TEST

/* A LOADING table holds its slot: a second miss waits, and is woken when the
 * load finishes and the table is put. */
START_TEST(test_cap1_loading_holds_slot)
{
	struct fx f;
	fx_init(&f, 1, 6);
	struct tw w1, w2;
	tw_init(&w1);
	tw_init(&w2);
	struct qsm_l2_table *t = NULL;
	ck_assert_int_eq(get(&f, T(0), &t, &w1), -EAGAIN);
	ck_assert_int_eq(get(&f, T(1), &t, &w2), -EAGAIN);
	ck_assert_uint_eq(f.c.nb_entries, 1);
	fx_run(&f);
	ck_assert_uint_eq(w1.calls, 1);
	ck_assert_ptr_nonnull(w1.table);
	ck_assert_uint_eq(w2.calls, 0);
	put(&f, w1.table);
	fx_run(&f);
	ck_assert_uint_eq(w2.calls, 1);
	ck_assert_ptr_null(w2.table);
	t = load(&f, T(1));
	put(&f, t);
	fx_destroy(&f);
}
END_TEST

START_TEST(test_cancel_wait)
{
	struct fx f;
	fx_init(&f, 1, 7);
	struct qsm_l2_table *a = load(&f, T(0));
	struct tw w1, w2, w3;
	tw_init(&w1);
	tw_init(&w2);
	tw_init(&w3);
	struct qsm_l2_table *t = NULL;
	ck_assert_int_eq(get(&f, T(1), &t, &w1), -EAGAIN);
	ck_assert_int_eq(get(&f, T(2), &t, &w2), -EAGAIN);
	/* Cancel the tail, then queue another: the tail pointer must follow. */
	qsm_l2_cancel_wait(&f.c, &w2.w);
	CHECK_CACHE(&f);
	ck_assert_int_eq(get(&f, T(3), &t, &w3), -EAGAIN);
	put(&f, a);
	fx_run(&f);
	ck_assert_uint_eq(w1.calls, 1);
	ck_assert_uint_eq(w2.calls, 0);
	ck_assert_uint_eq(w3.calls, 1);

	/* Cancel the head. */
	a = load(&f, T(0));
	tw_init(&w1);
	tw_init(&w2);
	ck_assert_int_eq(get(&f, T(1), &t, &w1), -EAGAIN);
	ck_assert_int_eq(get(&f, T(2), &t, &w2), -EAGAIN);
	qsm_l2_cancel_wait(&f.c, &w1.w);
	put(&f, a);
	fx_run(&f);
	ck_assert_uint_eq(w1.calls, 0);
	ck_assert_uint_eq(w2.calls, 1);
	fx_destroy(&f);
}
END_TEST

/* --- Dirty tables, write-back -------------------------------------------- */

START_TEST(test_create)
{
	struct fx f;
	fx_init(&f, 2, 8);
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *z = NULL, *i = NULL;
	ck_assert_int_eq(create(&f, T(10), NULL, &z, &w), 0);
	ck_assert_uint_eq(z->ref, 1);
	ck_assert(z->dirty);
	ck_assert_int_eq(z->state, QSM_L2_READY);
	for (size_t j = 0; j < CS; j++)
		ck_assert_uint_eq(z->data[j], 0);
	uint8_t init[CS];
	for (size_t j = 0; j < CS; j++)
		init[j] = (uint8_t)(j ^ 0x5a);
	ck_assert_int_eq(create(&f, T(11), init, &i, &w), 0);
	ck_assert_int_eq(memcmp(i->data, init, CS), 0);
	init[0] ^= 1; /* a copy, not the caller's buffer */
	ck_assert_uint_eq(i->data[0], 0x5a);
	ck_assert_uint_eq(qsm_l2_dirty_count(&f.c), 2);
	ck_assert_uint_eq(fx_reads(&f), 0); /* create never reads */

	/* Full: create waits like get. */
	struct qsm_l2_table *x = NULL;
	ck_assert_int_eq(create(&f, T(12), NULL, &x, &w), -EAGAIN);
	ck_assert_uint_eq(f.need_wb, 1); /* only dirty tables in the way */
	put(&f, z);
	put(&f, i);
	qsm_l2_cache_set_stuck(&f.c);
	CHECK_CACHE(&f);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 1);
	/* The dirty tables can never be written: the cache grows instead. */
	ck_assert_int_eq(create(&f, T(12), NULL, &x, &w), 0);
	ck_assert_uint_eq(f.c.nb_entries, 3);
	put(&f, x);
	fx_destroy(&f);
}
END_TEST

/* The miss happens while the only candidates are dirty. */
START_TEST(test_dirty_not_evicted_miss)
{
	struct fx f;
	fx_init(&f, 1, 9);
	struct qsm_l2_table *a = load(&f, T(0));
	qsm_l2_set_entry(a, 3, 0x8000000000050000ull);
	qsm_l2_mark_dirty(&f.c, a);
	qsm_l2_mark_dirty(&f.c, a); /* idempotent */
	CHECK_CACHE(&f);
	ck_assert_uint_eq(qsm_l2_dirty_count(&f.c), 1);
	put(&f, a);
	ck_assert_uint_eq(f.need_wb, 0); /* nobody is waiting yet */
	ck_assert(!on_lru(&f, a));

	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *b = NULL;
	ck_assert_int_eq(get(&f, T(1), &b, &w), -EAGAIN);
	ck_assert_uint_eq(f.need_wb, 1);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 0);
	ck_assert_ptr_eq(cached(&f, T(0)), a); /* not evicted */
	ck_assert_uint_eq(f.c.evictions, 0);
	ck_assert_uint_eq(fx_reads(&f), 1);

	/* The owner collects: a copy goes into the batch, the table is clean
	 * but busy, and still not evictable. */
	struct qsm_meta_batch batch = { 0 };
	ck_assert_int_eq(qsm_l2_collect(&f.c, &batch), 1);
	CHECK_CACHE(&f);
	ck_assert_uint_eq(batch.n, 1);
	ck_assert_uint_eq(batch.w[0].offset, T(0));
	ck_assert_uint_eq(batch.w[0].len, CS);
	ck_assert_int_eq(batch.w[0].event, QSM_IO_EV_L2_UPDATE);
	ck_assert_int_eq(memcmp(batch.w[0].buf, a->data, CS), 0);
	ck_assert_ptr_ne(batch.w[0].buf, a->data);
	ck_assert(!a->dirty);
	ck_assert_uint_eq(a->wb_busy, 1);
	ck_assert_uint_eq(qsm_l2_dirty_count(&f.c), 0);
	ck_assert(!on_lru(&f, a));
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 0);
	/* Nothing more to collect. */
	ck_assert_int_eq(qsm_l2_collect(&f.c, &batch), 0);
	ck_assert_uint_eq(batch.n, 1);

	qsm_l2_written(&f.c, T(0), 0);
	CHECK_CACHE(&f);
	ck_assert_uint_eq(a->wb_busy, 0);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 1);
	ck_assert_ptr_null(w.table);
	b = load(&f, T(1));
	ck_assert_uint_eq(f.c.evictions, 1);
	ck_assert_ptr_null(cached(&f, T(0)));
	put(&f, b);
	qsm_meta_batch_clear(&batch);
	free(batch.w);
	fx_destroy(&f);
}
END_TEST

/* A referenced table is dirtied and put while a slot waiter exists. */
START_TEST(test_dirty_put_with_waiter)
{
	struct fx f;
	fx_init(&f, 1, 10);
	struct qsm_l2_table *a = load(&f, T(0));
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *b = NULL;
	ck_assert_int_eq(get(&f, T(1), &b, &w), -EAGAIN);
	ck_assert_uint_eq(f.need_wb, 0); /* a is clean, just referenced */

	qsm_l2_mark_dirty(&f.c, a);
	put(&f, a);
	ck_assert_uint_eq(f.need_wb, 1); /* a dirty table is now in the way */
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 0);
	ck_assert_ptr_eq(cached(&f, T(0)), a);

	struct qsm_meta_batch batch = { 0 };
	ck_assert_int_eq(qsm_l2_collect(&f.c, &batch), 1);
	qsm_l2_written(&f.c, T(0), 0);
	CHECK_CACHE(&f);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 1);
	b = load(&f, T(1));
	put(&f, b);
	qsm_meta_batch_clear(&batch);
	free(batch.w);
	fx_destroy(&f);
}
END_TEST

/* Collect copies every dirty table and only those; changes after collecting
 * do not leak into the batch; re-dirtied busy tables stay unevictable. */
START_TEST(test_collect)
{
	struct fx f;
	fx_init(&f, 4, 11);
	struct qsm_l2_table *t[4];
	for (unsigned i = 0; i < 4; i++)
		t[i] = load(&f, T(i));
	qsm_l2_set_entry(t[1], 0, 0x1111);
	qsm_l2_mark_dirty(&f.c, t[1]);
	qsm_l2_set_entry(t[3], 7, 0x3333);
	qsm_l2_mark_dirty(&f.c, t[3]);
	ck_assert_uint_eq(qsm_l2_dirty_count(&f.c), 2);

	struct qsm_meta_batch batch = { 0 };
	ck_assert_int_eq(qsm_l2_collect(&f.c, &batch), 2);
	CHECK_CACHE(&f);
	ck_assert_uint_eq(batch.n, 2);
	bool seen1 = false, seen3 = false;
	for (size_t i = 0; i < batch.n; i++) {
		struct qsm_meta_write *mw = &batch.w[i];
		ck_assert_uint_eq(mw->len, CS);
		ck_assert_int_eq(mw->event, QSM_IO_EV_L2_UPDATE);
		ck_assert_uint_eq((uintptr_t)mw->buf % 4096, 0);
		if (mw->offset == T(1)) {
			seen1 = true;
			ck_assert_int_eq(memcmp(mw->buf, t[1]->data, CS), 0);
			ck_assert_uint_eq(qcow2_be64(mw->buf), 0x1111);
		} else {
			ck_assert_uint_eq(mw->offset, T(3));
			seen3 = true;
			ck_assert_uint_eq(qcow2_be64(mw->buf + 7 * 8), 0x3333);
		}
	}
	ck_assert(seen1 && seen3);
	for (unsigned i = 0; i < 4; i++) {
		ck_assert(!t[i]->dirty);
		ck_assert_uint_eq(t[i]->wb_busy, i == 1 || i == 3);
	}

	/* Change t[1] again: the batch keeps the collected bytes. */
	qsm_l2_set_entry(t[1], 0, 0x2222);
	qsm_l2_mark_dirty(&f.c, t[1]);
	for (size_t i = 0; i < batch.n; i++)
		if (batch.w[i].offset == T(1))
			ck_assert_uint_eq(qcow2_be64(batch.w[i].buf), 0x1111);

	for (unsigned i = 0; i < 4; i++)
		put(&f, t[i]);
	ck_assert(on_lru(&f, t[0]) && on_lru(&f, t[2]));
	ck_assert(!on_lru(&f, t[1]) && !on_lru(&f, t[3]));

	qsm_l2_written(&f.c, T(3), 0);
	CHECK_CACHE(&f);
	ck_assert(on_lru(&f, t[3]));
	qsm_l2_written(&f.c, T(1), 0);
	CHECK_CACHE(&f);
	ck_assert(!on_lru(&f, t[1])); /* written, but dirty again */

	/* A second collection while the first copy is still in flight. */
	struct qsm_meta_batch b2 = { 0 };
	qsm_l2_mark_dirty(&f.c, t[1] = load(&f, T(1)));
	put(&f, t[1]);
	ck_assert_int_eq(qsm_l2_collect(&f.c, &b2), 1);
	ck_assert_uint_eq(t[1]->wb_busy, 1);
	ck_assert_uint_eq(qcow2_be64(b2.w[0].buf), 0x2222);
	t[1] = load(&f, T(1));
	qsm_l2_mark_dirty(&f.c, t[1]);
	put(&f, t[1]);
	ck_assert_int_eq(qsm_l2_collect(&f.c, &b2), 1);
	ck_assert_uint_eq(t[1]->wb_busy, 2);
	qsm_l2_written(&f.c, T(1), 0);
	CHECK_CACHE(&f);
	ck_assert(!on_lru(&f, t[1])); /* one copy still in flight */
	qsm_l2_written(&f.c, T(1), 0);
	CHECK_CACHE(&f);
	ck_assert(on_lru(&f, t[1]));

	qsm_meta_batch_clear(&batch);
	qsm_meta_batch_clear(&b2);
	free(batch.w);
	free(b2.w);
	fx_destroy(&f);
}
END_TEST

/* A collected (clean, busy) table is not evicted before qsm_l2_written, and
 * need_writeback is not asked for since nothing is dirty. */
START_TEST(test_busy_not_evicted)
{
	struct fx f;
	fx_init(&f, 1, 12);
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *a = NULL, *b = NULL;
	ck_assert_int_eq(create(&f, T(0), NULL, &a, &w), 0);
	put(&f, a);
	struct qsm_meta_batch batch = { 0 };
	ck_assert_int_eq(qsm_l2_collect(&f.c, &batch), 1);
	ck_assert_int_eq(get(&f, T(1), &b, &w), -EAGAIN);
	ck_assert_uint_eq(f.need_wb, 0);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 0);
	ck_assert_ptr_eq(cached(&f, T(0)), a);
	qsm_l2_written(&f.c, T(0), 0);
	CHECK_CACHE(&f);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 1);
	b = load(&f, T(1));
	ck_assert_ptr_null(cached(&f, T(0)));
	put(&f, b);
	qsm_meta_batch_clear(&batch);
	free(batch.w);
	fx_destroy(&f);
}
END_TEST

/* After a failed write-back (set_stuck) dirty tables stay cached: a reload
 * would read stale entries, and reads must keep seeing acknowledged writes.
 * A request for a slot gets one past the capacity instead of waiting
 * forever; clean tables are still evicted first. */
START_TEST(test_stuck)
{
	struct fx f;
	fx_init(&f, 2, 13);
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *a = NULL, *b = load(&f, T(1)), *c = NULL;
	ck_assert_int_eq(create(&f, T(0), NULL, &a, &w), 0);
	qsm_l2_mark_dirty(&f.c, b);
	b->data[8] = 0x77; /* an acknowledged change */
	put(&f, a);
	put(&f, b);
	ck_assert_uint_eq(qsm_l2_dirty_count(&f.c), 2);
	ck_assert_int_eq(get(&f, T(2), &c, &w), -EAGAIN);
	ck_assert_uint_eq(f.need_wb, 1);

	qsm_l2_cache_set_stuck(&f.c);
	CHECK_CACHE(&f);
	fx_run(&f);
	ck_assert_uint_eq(w.calls, 1); /* the waiter hears of it */
	ck_assert_int_eq(get(&f, T(2), &c, &w), -EAGAIN); /* loading, past the capacity */
	fx_run(&f);
	ck_assert_ptr_nonnull(w.table); /* the waiter owns a reference now */
	put(&f, w.table);
	ck_assert_int_eq(get(&f, T(2), &c, &w), 0);
	ck_assert_uint_eq(f.c.nb_entries, 3);
	ck_assert_uint_eq(f.c.evictions, 0);
	put(&f, c);
	/* Both dirty tables still there, with the change. */
	ck_assert_ptr_eq(cached(&f, T(1)), b);
	ck_assert_int_eq(get(&f, T(1), &c, &w), 0);
	ck_assert_uint_eq(c->data[8], 0x77);
	put(&f, c);
	qsm_l2_cache_drop_clean(&f.c);
	ck_assert_ptr_eq(cached(&f, T(0)), a);
	ck_assert_ptr_eq(cached(&f, T(1)), b);
	fx_destroy(&f);
}
END_TEST

/* Stuck, with a clean table in the cache: it is still evicted for others. */
START_TEST(test_stuck_evicts_clean)
{
	struct fx f;
	fx_init(&f, 2, 15);
	struct tw w;
	tw_init(&w);
	struct qsm_l2_table *a = NULL, *b = load(&f, T(1)), *c = NULL;
	ck_assert_int_eq(create(&f, T(0), NULL, &a, &w), 0);
	put(&f, a);
	put(&f, b);
	qsm_l2_cache_set_stuck(&f.c);
	ck_assert_int_eq(get(&f, T(2), &c, &w), -EAGAIN); /* a load: clean T(1) evicted */
	fx_run(&f);
	ck_assert_ptr_nonnull(w.table); /* the waiter owns a reference now */
	put(&f, w.table);
	ck_assert_int_eq(get(&f, T(2), &c, &w), 0);
	ck_assert_uint_eq(f.c.evictions, 1);
	ck_assert_ptr_null(cached(&f, T(1)));
	ck_assert_ptr_eq(cached(&f, T(0)), a);
	put(&f, c);
	fx_destroy(&f);
}
END_TEST

/* drop_clean keeps referenced, dirty and busy tables. */
START_TEST(test_drop_clean)
{
	struct fx f;
	fx_init(&f, 4, 14);
	struct qsm_l2_table *t[4];
	for (unsigned i = 0; i < 4; i++)
		t[i] = load(&f, T(i));
	qsm_l2_mark_dirty(&f.c, t[1]);
	qsm_l2_mark_dirty(&f.c, t[2]);
	struct qsm_meta_batch batch = { 0 };
	put(&f, t[0]);
	put(&f, t[1]);
	ck_assert_int_eq(qsm_l2_collect(&f.c, &batch), 2); /* t1, t2 busy */
	qsm_l2_mark_dirty(&f.c, t[2]);
	put(&f, t[2]);
	qsm_l2_cache_drop_clean(&f.c);
	CHECK_CACHE(&f);
	ck_assert_ptr_null(cached(&f, T(0)));
	ck_assert_ptr_eq(cached(&f, T(1)), t[1]);
	ck_assert_ptr_eq(cached(&f, T(2)), t[2]);
	ck_assert_ptr_eq(cached(&f, T(3)), t[3]);
	put(&f, t[3]);
	qsm_l2_written(&f.c, T(1), 0);
	qsm_l2_written(&f.c, T(2), 0);
	qsm_l2_cache_drop_clean(&f.c);
	CHECK_CACHE(&f);
	ck_assert_uint_eq(f.c.nb_entries, 1); /* t2 is still dirty */
	qsm_meta_batch_clear(&batch);
	free(batch.w);
	fx_destroy(&f);
}
END_TEST

/* --- Load failure --------------------------------------------------------- */

START_TEST(test_load_failure)
{
	static const int errs[] = { EIO, ENOSPC, ENXIO };
	for (unsigned k = 0; k < 3; k++) {
		struct fx f;
		fx_init(&f, 2, 15 + k);
		qsm_sim_fault_add(f.sim, QSM_IO_EV_L2_LOAD, errs[k], true);
		struct tw w[3];
		struct qsm_l2_table *t = NULL;
		for (int i = 0; i < 3; i++) {
			tw_init(&w[i]);
			ck_assert_int_eq(get(&f, T(4), &t, &w[i]), -EAGAIN);
		}
		fx_run(&f);
		ck_assert_uint_eq(qsm_sim_faults_fired(f.sim), 1);
		for (int i = 0; i < 3; i++) {
			ck_assert_uint_eq(w[i].calls, 1);
			ck_assert_int_eq(w[i].ret, -errs[k]);
			ck_assert_ptr_null(w[i].table);
		}
		/* Forgotten: the next get is a miss and reads again. */
		ck_assert_uint_eq(f.c.nb_entries, 0);
		ck_assert_ptr_null(cached(&f, T(4)));
		t = load(&f, T(4));
		ck_assert(table_is_pristine(t));
		ck_assert_uint_eq(f.c.misses, 2);
		ck_assert_uint_eq(fx_reads(&f), 2);
		put(&f, t);
		fx_destroy(&f);
	}
}
END_TEST

/* A failed load frees its slot: a slot waiter is woken. */
START_TEST(test_load_failure_wakes_slot_waiter)
{
	struct fx f;
	fx_init(&f, 1, 20);
	qsm_sim_fault_add(f.sim, QSM_IO_EV_L2_LOAD, EIO, true);
	struct tw w1, w2;
	tw_init(&w1);
	tw_init(&w2);
	struct qsm_l2_table *t = NULL;
	ck_assert_int_eq(get(&f, T(0), &t, &w1), -EAGAIN);
	ck_assert_int_eq(get(&f, T(1), &t, &w2), -EAGAIN);
	fx_run(&f);
	ck_assert_uint_eq(w1.calls, 1);
	ck_assert_int_eq(w1.ret, -EIO);
	ck_assert_uint_eq(w2.calls, 1);
	ck_assert_int_eq(w2.ret, 0);
	ck_assert_ptr_null(w2.table);
	t = load(&f, T(1));
	ck_assert(table_is_pristine(t));
	put(&f, t);
	fx_destroy(&f);
}
END_TEST

/* --- Batches ---------------------------------------------------------------- */

START_TEST(test_batch_add_clear)
{
	struct qsm_meta_batch b = { 0 };
	uint8_t src[CS];
	for (unsigned round = 0; round < 2; round++) {
		for (unsigned i = 0; i < 40; i++) { /* past the first growth */
			memset(src, (int)(i + round), sizeof(src));
			size_t len = i == 0 ? 0 : (i * 97) % CS + 1;
			ck_assert_int_eq(qsm_meta_batch_add(&b, 1000 + i, src, len,
							    i % 2 ? QSM_IO_EV_L2_UPDATE
								  : QSM_IO_EV_REFBLOCK_UPDATE),
					 0);
			memset(src, 0xee, sizeof(src)); /* the batch has its own copy */
			ck_assert_uint_eq(b.n, i + 1);
		}
		for (unsigned i = 0; i < 40; i++) {
			struct qsm_meta_write *w = &b.w[i];
			size_t len = i == 0 ? 0 : (i * 97) % CS + 1;
			ck_assert_uint_eq(w->offset, 1000 + i);
			ck_assert_uint_eq(w->len, len);
			ck_assert_int_eq(w->event,
					 i % 2 ? QSM_IO_EV_L2_UPDATE : QSM_IO_EV_REFBLOCK_UPDATE);
			ck_assert_ptr_nonnull(w->buf);
			ck_assert_uint_eq((uintptr_t)w->buf % 4096, 0);
			for (size_t j = 0; j < len; j++)
				ck_assert_uint_eq(w->buf[j], (uint8_t)(i + round));
		}
		qsm_meta_batch_clear(&b);
		ck_assert_uint_eq(b.n, 0);
		ck_assert_uint_ge(b.cap, 40);
	}
	qsm_meta_batch_clear(&b); /* clearing an empty batch is fine */
	free(b.w);
}
END_TEST

/* --- Randomized model test ------------------------------------------------ */

struct rnd {
	uint64_t s;
};

static uint64_t rnd_next(struct rnd *r)
{
	r->s ^= r->s << 13;
	r->s ^= r->s >> 7;
	r->s ^= r->s << 17;
	return r->s;
}

#define RN 6   /* tables in play */
#define RU 8   /* concurrent users */

enum { U_IDLE, U_WAITING, U_HELD };

struct ruser {
	struct tw w;
	int state;
	int idx;                   /* table wanted or held */
	bool on_load;              /* waiting on a LOADING table (not cancellable) */
	struct qsm_l2_table *held; /* referenced table */
};

static bool waits_on_load(const struct fx *f, uint64_t off, const struct qsm_l2_waiter *w)
{
	const struct qsm_l2_table *t = cached(f, off);
	if (!t || t->state != QSM_L2_LOADING)
		return false;
	for (const struct qsm_l2_waiter *p = t->waiters; p; p = p->next)
		if (p == w)
			return true;
	return false;
}

static unsigned g_wb_in_flight;

/* The owner's write-back: collect into b (counting busy copies).  Like
 * sm/writeback.c, one batch at a time: two copies of one table in flight
 * could land out of order (the cache leaves that ordering to its owner). */
static void owner_collect(struct fx *f, struct qsm_meta_batch *b, unsigned *busy)
{
	if (g_wb_in_flight || b->n)
		return;
	size_t n0 = b->n;
	ck_assert_int_ge(qsm_l2_collect(&f->c, b), 0);
	CHECK_CACHE(f);
	for (size_t k = n0; k < b->n; k++)
		busy[b->w[k].offset / CS - 1]++;
}

/* One write-back write in flight (owns the collected copy). */
struct wreq {
	struct qsm_io_req req;
	struct iovec iov;
	struct fx *f;
	unsigned *busy;
};

static void wreq_done(struct qsm_io_req *req, int ret)
{
	struct wreq *w = container_of(req, struct wreq, req);
	ck_assert_int_eq(ret, 0);
	qsm_l2_written(&w->f->c, req->offset, 0);
	w->busy[req->offset / CS - 1]--;
	g_wb_in_flight--;
	CHECK_CACHE(w->f);
	free(w->iov.iov_base);
	free(w);
}

/* Submit every collected write; each reports qsm_l2_written when it lands. */
static void owner_submit(struct fx *f, struct qsm_meta_batch *b, unsigned *busy)
{
	for (size_t k = 0; k < b->n; k++) {
		struct wreq *w = calloc(1, sizeof(*w));
		ck_assert_ptr_nonnull(w);
		w->f = f;
		w->busy = busy;
		w->iov = (struct iovec){ b->w[k].buf, b->w[k].len };
		b->w[k].buf = NULL; /* ours now */
		w->req = (struct qsm_io_req){
			.op = QSM_IO_WRITE,
			.event = b->w[k].event,
			.offset = b->w[k].offset,
			.len = b->w[k].len,
			.iov = &w->iov,
			.iovcnt = 1,
			.cb = wreq_done,
		};
		g_wb_in_flight++;
		qsm_io_submit(f->io, &w->req);
	}
	qsm_meta_batch_clear(b);
}

/* A user's waiter fired: take the table or go back to idle (retry). */
static void user_poll(struct fx *f, struct ruser *x)
{
	if (x->state != U_WAITING || !x->w.calls)
		return;
	ck_assert_uint_eq(x->w.calls, 1);
	ck_assert_int_eq(x->w.ret, 0);
	x->w.calls = 0;
	if (x->w.table) {
		ck_assert_uint_eq(x->w.table->offset, T(x->idx));
		x->held = x->w.table;
		x->state = U_HELD;
	} else {
		x->state = U_IDLE;
	}
}

START_TEST(test_random_model)
{
	uint64_t seed0 = 0x5eed;
	const char *env = getenv("QSM_TEST_SEED");
	if (env && *env)
		seed0 = strtoull(env, NULL, 0);
	uint64_t evictions = 0, wb_asks = 0, joined = 0, slot_waits = 0;
	for (uint64_t run = 0; run < 40; run++) {
		uint64_t seed = seed0 + run;
		struct rnd r = { seed * 0x9e3779b97f4a7c15ull | 1 };
		struct fx f;
		size_t cap = 1 + rnd_next(&r) % 3;
		fx_init(&f, cap, seed);
		qsm_sim_set_max_batch(f.sim, 1 + (unsigned)(rnd_next(&r) % 4));
		/* Model: the last value written into entry 0 of table i (0 = pristine). */
		uint64_t model[RN] = { 0 };
		unsigned busy[RN] = { 0 };
		struct qsm_meta_batch batch = { 0 };
		struct ruser u[RU];
		memset(u, 0, sizeof(u));
		for (int i = 0; i < RU; i++)
			tw_init(&u[i].w);
		for (int step = 0; step < 500; step++) {
			struct ruser *x = &u[rnd_next(&r) % RU];
			unsigned op = (unsigned)(rnd_next(&r) % 10);
			user_poll(&f, x);
			switch (x->state) {
			case U_HELD: {
				uint64_t e = qsm_l2_entry(x->held, 0);
				if (model[x->idx])
					ck_assert_msg(e == model[x->idx],
						      "seed %" PRIu64 " step %d: table %d entry 0 %#" PRIx64
						      ", want %#" PRIx64, seed, step, x->idx, e,
						      model[x->idx]);
				else
					ck_assert_msg(table_is_pristine(x->held),
						      "seed %" PRIu64 " step %d: table %d not pristine",
						      seed, step, x->idx);
				if (op < 3) {
					uint64_t v = (uint64_t)(step + 1) << 16 | (uint64_t)x->idx;
					qsm_l2_set_entry(x->held, 0, v);
					qsm_l2_mark_dirty(&f.c, x->held);
					CHECK_CACHE(&f);
					model[x->idx] = v;
				} else {
					put(&f, x->held);
					x->held = NULL;
					x->state = U_IDLE;
				}
				break;
			}
			case U_WAITING:
				/* Give up now and then (a failed request cancels). */
				if (op >= 8 && !x->on_load) {
					qsm_l2_cancel_wait(&f.c, &x->w.w);
					CHECK_CACHE(&f);
					x->state = U_IDLE;
				}
				break;
			case U_IDLE:
				if (op >= 7)
					break;
				x->idx = (int)(rnd_next(&r) % RN);
				x->held = NULL;
				if (get(&f, T(x->idx), &x->held, &x->w) == 0) {
					x->state = U_HELD;
				} else {
					x->state = U_WAITING;
					x->on_load = waits_on_load(&f, T(x->idx), &x->w.w);
					joined += x->on_load;
					slot_waits += !x->on_load;
				}
				break;
			}
			/* The owner writes back when asked, and now and then. */
			wb_asks += f.need_wb > 0;
			if ((f.need_wb || rnd_next(&r) % 8 == 0) && !g_wb_in_flight && !batch.n) {
				f.need_wb = 0;
				owner_collect(&f, &batch, busy);
			}
			if (batch.n && rnd_next(&r) % 3 == 0)
				owner_submit(&f, &batch, busy);
			event_base_loop(f.base, EVLOOP_NONBLOCK);
			CHECK_CACHE(&f);
		}
		/* Wind down: everyone releases or stops waiting. */
		for (int round = 0;; round++) {
			ck_assert_msg(round < 100, "seed %" PRIu64 ": wind-down stuck", seed);
			bool active = false;
			for (int i = 0; i < RU; i++) {
				struct ruser *x = &u[i];
				user_poll(&f, x);
				if (x->state == U_HELD) {
					put(&f, x->held);
					x->state = U_IDLE;
				} else if (x->state == U_WAITING && !x->on_load) {
					qsm_l2_cancel_wait(&f.c, &x->w.w);
					x->state = U_IDLE;
				} else if (x->state == U_WAITING) {
					active = true;
				}
			}
			CHECK_CACHE(&f);
			owner_collect(&f, &batch, busy);
			owner_submit(&f, &batch, busy);
			fx_run(&f);
			if (!active && !qsm_l2_dirty_count(&f.c) && !g_wb_in_flight && !batch.n)
				break;
		}
		for (int k = 0; k < RN; k++) {
			ck_assert_uint_eq(busy[k], 0);
			struct qsm_l2_table *t = cached(&f, T(k));
			if (t)
				ck_assert(t->ref == 0 && !t->dirty && !t->wb_busy);
		}
		ck_assert_uint_le(f.c.nb_entries, cap);
		ck_assert_uint_eq(qsm_l2_dirty_count(&f.c), 0);
		ck_assert_uint_eq(qsm_sim_races(f.sim), 0);
		/* What the cache wrote back is what a fresh load reads. */
		qsm_l2_cache_drop_clean(&f.c);
		for (int k = 0; k < RN; k++) {
			struct qsm_l2_table *t = load(&f, T(k));
			if (model[k])
				ck_assert_uint_eq(qsm_l2_entry(t, 0), model[k]);
			else
				ck_assert(table_is_pristine(t));
			put(&f, t);
		}
		evictions += f.c.evictions;
		free(batch.w);
		fx_destroy(&f);
	}
	/* The runs did exercise the interesting paths. */
	ck_assert_uint_gt(evictions, 0);
	ck_assert_uint_gt(wb_asks, 0);
	ck_assert_uint_gt(joined, 0);
	ck_assert_uint_gt(slot_waits, 0);
}
END_TEST

static Suite *l2cache_suite(void)
{
	Suite *s = suite_create("l2cache");
	TCase *tc = tcase_create("core");
	tcase_add_test(tc, test_miss_then_hit);
	tcase_add_test(tc, test_several_tables);
	tcase_add_test(tc, test_concurrent_loading_share_read);
	tcase_add_test(tc, test_cap1_waits_for_put);
	tcase_add_test(tc, test_cap2_lru_order);
	tcase_add_test(tc, test_cap1_loading_holds_slot);
	tcase_add_test(tc, test_cancel_wait);
	tcase_add_test(tc, test_create);
	tcase_add_test(tc, test_dirty_not_evicted_miss);
	tcase_add_test(tc, test_dirty_put_with_waiter);
	tcase_add_test(tc, test_collect);
	tcase_add_test(tc, test_busy_not_evicted);
	tcase_add_test(tc, test_stuck);
	tcase_add_test(tc, test_stuck_evicts_clean);
	tcase_add_test(tc, test_drop_clean);
	tcase_add_test(tc, test_load_failure);
	tcase_add_test(tc, test_load_failure_wakes_slot_waiter);
	tcase_add_test(tc, test_batch_add_clear);
	tcase_add_test(tc, test_random_model);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return qsm_test_run(l2cache_suite());
}
