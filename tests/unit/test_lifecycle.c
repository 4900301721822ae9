/*
 * tests/unit/test_lifecycle.c: Check suite "lifecycle": closing and
 * per-request flags, on the simulated disk (io/sim.h).
 *
 *  - fua: a FUA write (allocating, in place, lazy refcounts) and a FUA zero
 *    write that completed survive a crash that drops every unflushed write;
 *    the same write without FUA does not (so the crash really drops), and
 *    issues no sync (qsm_stats.io_flushes); bad flags are refused;
 *    QSM_ZERO_MAY_UNMAP releases the host cluster, its absence keeps it.
 *  - fua-targeted: a FUA write's batch (traced at the io/ boundary) writes
 *    its data, the refcounts, its own L2 table, and its L1 sector only when
 *    it allocated a table; other dirty tables stay dirty; a FUA overwrite of
 *    a durable mapping writes no metadata, one sync; a FUA request joins a
 *    normal batch queued with it, or running when it still has a sync to
 *    submit; after a crash right after, the FUA data is there, the
 *    unrelated changes are not, and the image is consistent as the crash
 *    left it (qsm's checker, qemu-img check), nothing leaked.
 *  - close: qsm_close_async from inside a write's completion callback with
 *    other requests in flight: they all complete, the close callback runs
 *    once, from the loop, after them; new requests are refused
 *    (-ESHUTDOWN), qsm_close there says -EDEADLK; the image is clean
 *    (qsm's checker, and qemu-img check when installed) and holds the data,
 *    the lazy dirty bit is cleared.  Closing with requests in flight from
 *    the top level (qsm_close and qsm_close_async) is defined.
 *  - table: the write-back machine's edges only go down the crash-safe
 *    order refblocks > reftable > header > L2 > L1, each level followed by
 *    its own sync state; BACKING_STATUS asks one image per entry (traced).
 *  - abandon (threads; abandon:uring, tagged "uring", SKIPPED without
 *    io_uring): qsm_abandon on a real file with I/O in flight at the backend
 *    (asserted) waits for or cancels it: no assertion in the io close, no
 *    callback ever runs, no event is left on the loop, the caller may free
 *    its buffers at once, and the file opens again with no corruption.
 * Seeds are fixed; each case prints nothing unless it fails.
 */
#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/sim.h"
#include "metadata/check.h"
#include "metadata/qcow2.h"
#include "sm/sm.h"
#include "tests/unit/skip.h"

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/lsan_interface.h>
/* qsm_abandon forgets its requests with the "process" (qsm.h): what they
 * allocated is not a leak (as in tools/fuzz.c). */
#define LSAN_OFF() __lsan_disable()
#define LSAN_ON() __lsan_enable()
#else
#define LSAN_OFF() ((void)0)
#define LSAN_ON() ((void)0)
#endif

#define CS 4096u             /* cluster size of the test images */
#define SIZE (16u << 20)     /* virtual size: eight L2 tables */

/* A fresh image on a new simulated disk. */
static struct qsm_sim *new_disk(uint64_t seed, bool lazy)
{
	struct qcow2_create_opts o = { .size = SIZE, .cluster_bits = 12, .version = 3,
				       .refcount_order = 4, .lazy_refcounts = lazy };
	uint8_t *im;
	size_t len;
	char err[256];
	struct qsm_sim *sim = qsm_sim_new(seed);
	ck_assert_int_eq(qcow2_create_image(&o, &im, &len, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_sim_load_buf(sim, im, len), 0);
	free(im);
	return sim;
}

static struct qsm_image *open_disk(struct event_base *b, struct qsm_sim *sim,
				   enum qsm_cache_mode cache)
{
	struct qsm_open_opts oo = { .cache = cache, .work_threads = -1 };
	struct qsm_image *img;
	struct qsm_io *io;
	char err[256];
	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	ck_assert_msg(qsm_open_io(b, io, &oo, &img, err, sizeof(err)) == 0, "open: %s", err);
	return img;
}

struct done {
	int ret;
	int calls;
};

static void done_cb(void *opaque, int ret)
{
	struct done *d = opaque;
	d->ret = ret;
	d->calls++;
}

static void wait_done(struct event_base *b, struct done *d)
{
	while (!d->calls)
		ck_assert_msg(event_base_loop(b, EVLOOP_ONCE) != 1, "hang");
}

static int write_flags(struct event_base *b, struct qsm_image *img, uint64_t off, uint8_t pat,
		       size_t len, unsigned flags)
{
	uint8_t *buf = malloc(len);
	memset(buf, pat, len);
	struct iovec iov = { buf, len };
	struct done d = { 0, 0 };
	int ret = qsm_writev_flags(img, off, &iov, 1, flags, done_cb, &d);
	if (ret == 0) {
		wait_done(b, &d);
		ret = d.ret;
	}
	free(buf);
	return ret;
}

static int zero_flags(struct event_base *b, struct qsm_image *img, uint64_t off, uint64_t len,
		      unsigned flags)
{
	struct done d = { 0, 0 };
	int ret = qsm_write_zeroes(img, off, len, flags, done_cb, &d);
	if (ret == 0) {
		wait_done(b, &d);
		ret = d.ret;
	}
	return ret;
}

static bool reads_as(struct qsm_image *img, uint64_t off, size_t len, uint8_t pat)
{
	uint8_t *buf = malloc(len);
	bool ok = qsm_sync_pread(img, buf, len, off) == 0;
	for (size_t i = 0; ok && i < len; i++)
		ok = buf[i] == pat;
	free(buf);
	return ok;
}

static uint64_t flushes(struct qsm_image *img)
{
	struct qsm_stats st;
	qsm_get_stats(img, &st);
	return st.io_flushes;
}

/* Crash dropping every write not yet durable, and reopen. */
static struct qsm_image *crash_reopen(struct event_base *b, struct qsm_sim *sim,
				      struct qsm_image *img)
{
	qsm_sim_crash(sim, 0, false);
	qsm_abandon(img);
	return open_disk(b, sim, QSM_CACHE_WRITEBACK);
}

/* --- fua ------------------------------------------------------------------- */

static void fua_case(bool lazy)
{
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = new_disk(lazy ? 11 : 10, lazy);
	struct qsm_image *img = open_disk(b, sim, QSM_CACHE_WRITEBACK);

	/* Allocating writes: without FUA, no sync; with FUA (in another L2
	 * table), durable once completed.  The FUA write's batch writes its
	 * table and L1 sector, and the fresh table 0 that sector names (the
	 * earlier writes are durable too); a write completed after it is not
	 * durable, and the crash drops it. */
	uint64_t f0 = flushes(img);
	ck_assert_int_eq(write_flags(b, img, 0, 0x11, 2 * CS, 0), 0);
	ck_assert_int_eq(write_flags(b, img, 3 * CS + 100, 0x12, 1000, 0), 0);
	ck_assert_uint_eq(flushes(img), f0); /* a non-FUA write never syncs */
	uint64_t far = (uint64_t)CS / 8 * CS * 2; /* a third L2 table */
	ck_assert_int_eq(write_flags(b, img, far, 0x22, CS, QSM_REQ_FUA), 0);
	ck_assert_uint_gt(flushes(img), f0);
	uint64_t f2 = flushes(img);
	uint64_t far2 = (uint64_t)CS / 8 * CS * 5; /* a sixth one */
	ck_assert_int_eq(write_flags(b, img, far2, 0x23, CS, 0), 0);
	ck_assert_int_eq(write_flags(b, img, far + CS, 0x24, CS, 0), 0);
	ck_assert_uint_eq(flushes(img), f2);
	img = crash_reopen(b, sim, img);
	ck_assert(reads_as(img, far, CS, 0x22));
	ck_assert(reads_as(img, 0, 2 * CS, 0x11));
	ck_assert(reads_as(img, far2, CS, 0));      /* the crash dropped them */
	ck_assert(reads_as(img, far + CS, CS, 0));

	/* In-place overwrite with FUA: no metadata changes, the data is synced. */
	ck_assert_int_eq(write_flags(b, img, 8 * CS, 0x33, CS, 0), 0);
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	uint64_t f1 = flushes(img);
	ck_assert_int_eq(write_flags(b, img, 8 * CS + 512, 0x44, 1024, 0), 0); /* in place */
	ck_assert_uint_eq(flushes(img), f1);
	ck_assert_int_eq(write_flags(b, img, 8 * CS, 0x55, 512, QSM_REQ_FUA), 0);
	ck_assert_uint_gt(flushes(img), f1);
	img = crash_reopen(b, sim, img);
	ck_assert(reads_as(img, 8 * CS, 512, 0x55));
	/* Written before the FUA write completed: the same sync covered it. */
	ck_assert(reads_as(img, 8 * CS + 512, 1024, 0x44));
	ck_assert(reads_as(img, 8 * CS + 1536, CS - 1536, 0x33));

	/* FUA zero write: whole cluster (zero flag) and a partial one. */
	ck_assert_int_eq(write_flags(b, img, 12 * CS, 0x66, 2 * CS, 0), 0);
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	ck_assert_int_eq(zero_flags(b, img, 12 * CS, CS, QSM_ZERO_FUA), 0);
	ck_assert_int_eq(zero_flags(b, img, 13 * CS + 7, 100, QSM_ZERO_FUA | QSM_ZERO_MAY_UNMAP), 0);
	img = crash_reopen(b, sim, img);
	ck_assert(reads_as(img, 12 * CS, CS, 0));
	ck_assert(reads_as(img, 13 * CS, 7, 0x66));
	ck_assert(reads_as(img, 13 * CS + 7, 100, 0));
	ck_assert(reads_as(img, 13 * CS + 107, CS - 107, 0x66));

	ck_assert_int_eq(qsm_close(img), 0);
	event_base_free(b);
	qsm_sim_free(sim);
}

START_TEST(fua_survives_crash)
{
	fua_case(false);
}
END_TEST

START_TEST(fua_survives_crash_lazy)
{
	fua_case(true);
}
END_TEST

START_TEST(flags_checked)
{
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = new_disk(12, false);
	struct qsm_image *img = open_disk(b, sim, QSM_CACHE_WRITEBACK);
	uint8_t buf[512] = { 0 };
	struct iovec iov = { buf, sizeof(buf) };
	struct done d = { 0, 0 };
	ck_assert_int_eq(qsm_writev_flags(img, 0, &iov, 1, 0x80, done_cb, &d), -EINVAL);
	ck_assert_int_eq(qsm_writev_flags(img, 0, &iov, 1, QSM_ZERO_MAY_UNMAP, done_cb, &d), -EINVAL);
	ck_assert_int_eq(qsm_write_zeroes(img, 0, 512, 0x80, done_cb, &d), -EINVAL);
	ck_assert_int_eq(d.calls, 0);

	/* MAY_UNMAP: the v3 cluster is released (reads as zeros, no host
	 * cluster); without it, the zero flag is set on the allocated one. */
	struct qsm_extent e;
	ck_assert_int_eq(write_flags(b, img, 0, 0x77, 2 * CS, 0), 0);
	ck_assert_int_eq(zero_flags(b, img, 0, CS, QSM_ZERO_MAY_UNMAP), 0);
	ck_assert_int_eq(zero_flags(b, img, CS, CS, 0), 0);
	ck_assert_int_eq(qsm_sync_block_status(img, 0, CS, &e), 0);
	ck_assert_uint_eq(e.flags & (QSM_STATUS_ZERO | QSM_STATUS_DATA), QSM_STATUS_ZERO);
	ck_assert_uint_eq(e.host_offset, 0);
	ck_assert_int_eq(qsm_sync_block_status(img, CS, CS, &e), 0);
	ck_assert(e.flags & QSM_STATUS_ZERO);
	ck_assert(e.flags & QSM_STATUS_ALLOCATED);
	ck_assert_uint_ne(e.host_offset, 0);
	ck_assert(reads_as(img, 0, 2 * CS, 0));
	ck_assert_int_eq(qsm_close(img), 0);
	event_base_free(b);
	qsm_sim_free(sim);
}
END_TEST

/* --- close ----------------------------------------------------------------- */

#define NOPS 24

struct close_run {
	struct event_base *base;
	struct qsm_image *img;
	struct op {
		struct close_run *r;
		int idx;
		uint8_t *buf;
		struct iovec iov;
		int ret, calls;
	} ops[NOPS];
	int completed;            /* ops completed */
	int close_calls, close_ret;
	int completed_at_close;   /* ops completed when the close callback ran */
	bool in_close_async;      /* inside the qsm_close_async call */
	int refused, again;
	int completed_at_call;    /* ops completed when qsm_close_async was called */
};

static void close_cb(void *opaque, int ret)
{
	struct close_run *r = opaque;
	ck_assert(!r->in_close_async); /* never from inside qsm_close_async */
	r->close_calls++;
	r->close_ret = ret;
	r->completed_at_close = r->completed;
}

static void op_cb(void *opaque, int ret)
{
	struct op *o = opaque;
	struct close_run *r = o->r;
	o->ret = ret;
	o->calls++;
	r->completed++;
	if (r->completed != 1)
		return;
	/* Inside the first completion (a write's), the others in flight. */
	uint8_t x[512] = { 0 };
	struct iovec iov = { x, sizeof(x) };
	ck_assert_int_eq(qsm_close(r->img), -EDEADLK); /* no nested loop */
	r->in_close_async = true;
	r->completed_at_call = r->completed;
	ck_assert_int_eq(qsm_close_async(r->img, close_cb, r), 0);
	r->in_close_async = false;
	ck_assert_int_eq(r->close_calls, 0);
	r->refused += qsm_writev(r->img, 0, &iov, 1, op_cb, o) == -ESHUTDOWN;
	r->refused += qsm_readv(r->img, 0, &iov, 1, op_cb, o) == -ESHUTDOWN;
	r->refused += qsm_flush(r->img, op_cb, o) == -ESHUTDOWN;
	r->refused += qsm_write_zeroes(r->img, 0, 512, 0, op_cb, o) == -ESHUTDOWN;
	r->refused += qsm_discard(r->img, 0, 512, op_cb, o) == -ESHUTDOWN;
	r->again = qsm_close_async(r->img, close_cb, r);
}

/* Guest offset of op i: spread over three L2 tables, odd ones unaligned. */
static uint64_t op_off(int i)
{
	uint64_t l2span = (uint64_t)CS / 8 * CS;
	return (uint64_t)(i % 3) * l2span + (uint64_t)(i / 3) * CS + (i % 2 ? 100 : 0);
}

static uint8_t op_pat(int i)
{
	return (uint8_t)(0x10 + i);
}

static void check_clean(struct qsm_sim *sim, bool lazy)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	struct qsm_check_result res;
	char err[256];
	uint8_t hdr[96];
	ck_assert_int_eq(qsm_io_open_sim(b, sim, QSM_IO_RDONLY, &io), 0);
	ck_assert_int_eq(qsm_io_pread_sync(io, hdr, sizeof(hdr), 0), 0);
	memset(&res, 0, sizeof(res));
	ck_assert_int_eq(qsm_check_image(io, 0, &res, NULL, err, sizeof(err)), 0);
	qsm_io_close(io);
	ck_assert_uint_eq(res.corruptions, 0);
	ck_assert_uint_eq(res.leaks, 0);
	ck_assert(!res.incomplete);
	ck_assert_uint_eq(qcow2_be64(hdr + 72) & QCOW2_INCOMPAT_DIRTY, 0); /* clean close */
	if (lazy)
		ck_assert(qcow2_be64(hdr + 80) & QCOW2_COMPAT_LAZY_REFCOUNTS);
	if (system("qemu-img --version >/dev/null 2>&1") == 0) {
		char path[] = "/tmp/qsm-lifecycle-XXXXXX", cmd[128];
		int fd = mkstemp(path);
		ck_assert_int_ge(fd, 0);
		close(fd);
		ck_assert_int_eq(qsm_sim_save_file(sim, path), 0);
		snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s'", path);
		ck_assert_msg(system(cmd) == 0, "qemu-img check %s", path);
		unlink(path);
	}
	event_base_free(b);
}

static void close_in_callback_case(enum qsm_cache_mode cache, bool lazy, uint64_t seed)
{
	struct close_run r;
	memset(&r, 0, sizeof(r));
	struct qsm_sim *sim = new_disk(seed, lazy);
	qsm_sim_set_max_batch(sim, 1); /* one completion at a time: the others stay in flight */
	r.base = event_base_new();
	r.img = open_disk(r.base, sim, cache);
	for (int i = 0; i < NOPS; i++) {
		struct op *o = &r.ops[i];
		o->r = &r;
		o->idx = i;
		o->buf = malloc(CS);
		memset(o->buf, op_pat(i), CS);
		o->iov = (struct iovec){ o->buf, i % 2 ? CS / 2 : CS }; /* no overlaps */
		ck_assert_int_eq(qsm_writev_flags(r.img, op_off(i), &o->iov, 1,
						  i % 5 == 4 ? QSM_REQ_FUA : 0, op_cb, o), 0);
	}
	while (!r.close_calls)
		ck_assert_msg(event_base_loop(r.base, EVLOOP_ONCE) != 1, "hang");
	/* Let anything wrongly left run. */
	event_base_loop(r.base, EVLOOP_NONBLOCK);
	ck_assert_int_eq(r.close_calls, 1);
	ck_assert_int_eq(r.close_ret, 0);
	ck_assert_int_eq(r.refused, 5);
	ck_assert_int_eq(r.again, -EALREADY);
	ck_assert_int_eq(r.completed, NOPS);
	ck_assert_int_eq(r.completed_at_close, NOPS); /* they completed first */
	ck_assert_int_eq(r.completed_at_call, 1); /* the others were still in flight */
	for (int i = 0; i < NOPS; i++) {
		ck_assert_int_eq(r.ops[i].calls, 1);
		ck_assert_int_eq(r.ops[i].ret, 0);
	}
	event_base_free(r.base);

	check_clean(sim, lazy);
	/* Everything acknowledged is in the image (the later write wins). */
	struct event_base *b = event_base_new();
	struct qsm_image *img = open_disk(b, sim, QSM_CACHE_WRITEBACK);
	uint8_t *model = calloc(1, 3 * (uint64_t)CS / 8 * CS);
	for (int i = 0; i < NOPS; i++)
		memset(model + op_off(i), op_pat(i), r.ops[i].iov.iov_len);
	uint8_t *got = malloc(3 * (uint64_t)CS / 8 * CS);
	ck_assert_int_eq(qsm_sync_pread(img, got, 3 * (uint64_t)CS / 8 * CS, 0), 0);
	ck_assert(memcmp(got, model, 3 * (uint64_t)CS / 8 * CS) == 0);
	free(got);
	free(model);
	ck_assert_int_eq(qsm_close(img), 0);
	event_base_free(b);
	for (int i = 0; i < NOPS; i++)
		free(r.ops[i].buf);
	qsm_sim_free(sim);
}

START_TEST(close_async_in_callback)
{
	close_in_callback_case(QSM_CACHE_WRITEBACK, false, 20);
}
END_TEST

START_TEST(close_async_in_callback_lazy)
{
	close_in_callback_case(QSM_CACHE_WRITEBACK, true, 21);
}
END_TEST

START_TEST(close_async_in_callback_writethrough)
{
	close_in_callback_case(QSM_CACHE_WRITETHROUGH, false, 22);
}
END_TEST

/* qsm_close (blocking) and qsm_close_async from the top level, with
 * requests in flight: they complete first. */
START_TEST(close_with_requests_in_flight)
{
	for (int mode = 0; mode < 2; mode++) {
		struct qsm_sim *sim = new_disk(30 + mode, mode == 1);
		struct event_base *b = event_base_new();
		struct qsm_image *img = open_disk(b, sim, QSM_CACHE_WRITEBACK);
		struct done d[8], c = { 0, 0 };
		uint8_t buf[8][CS];
		struct iovec iov[8];
		memset(d, 0, sizeof(d));
		for (int i = 0; i < 8; i++) {
			memset(buf[i], 0x40 + i, CS);
			iov[i] = (struct iovec){ buf[i], CS };
			ck_assert_int_eq(qsm_writev(img, op_off(i), &iov[i], 1, done_cb, &d[i]), 0);
		}
		if (mode == 0) {
			ck_assert_int_eq(qsm_close(img), 0);
		} else {
			ck_assert_int_eq(qsm_close_async(img, done_cb, &c), 0);
			ck_assert_int_eq(c.calls, 0);
			while (!c.calls)
				ck_assert(event_base_loop(b, EVLOOP_ONCE) != 1);
			ck_assert_int_eq(c.ret, 0);
		}
		for (int i = 0; i < 8; i++) {
			ck_assert_int_eq(d[i].calls, 1);
			ck_assert_int_eq(d[i].ret, 0);
		}
		event_base_free(b);
		check_clean(sim, mode == 1);
		qsm_sim_free(sim);
	}
}
END_TEST

/* A read-only image closes asynchronously too, writing nothing. */
START_TEST(close_async_read_only)
{
	struct qsm_sim *sim = new_disk(40, false);
	struct event_base *b = event_base_new();
	struct qsm_open_opts oo = { .read_only = true, .work_threads = -1 };
	struct qsm_image *img;
	struct qsm_io *io;
	char err[256];
	struct done c = { 0, 0 };
	ck_assert_int_eq(qsm_io_open_sim(b, sim, QSM_IO_RDONLY, &io), 0);
	ck_assert_int_eq(qsm_open_io(b, io, &oo, &img, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_close_async(img, done_cb, &c), 0);
	while (!c.calls)
		ck_assert(event_base_loop(b, EVLOOP_ONCE) != 1);
	ck_assert_int_eq(c.ret, 0);
	ck_assert_uint_eq(qsm_sim_unflushed(sim), 0);
	event_base_free(b);
	qsm_sim_free(sim);
}
END_TEST

/* --- table ----------------------------------------------------------------- */

START_TEST(writeback_order_in_table)
{
	/* Level states in the crash-safe order, each with its sync state. */
	static const enum qsm_state level[] = { QSM_S_WB_REFBLOCKS, QSM_S_WB_REFTABLE,
						QSM_S_WB_HEADER, QSM_S_WB_L2, QSM_S_WB_L1 };
	static const enum qsm_state sync[] = { QSM_S_WB_SYNC_REFBLOCKS, QSM_S_WB_SYNC_REFTABLE,
					       QSM_S_WB_SYNC_HEADER, QSM_S_WB_SYNC_L2,
					       QSM_S_WB_SYNC_L1 };
	const int n = 5;
	for (int l = 0; l < n; l++) {
		/* A level is left only for its own sync. */
		for (int e = 0; e < QSM_E__COUNT; e++) {
			int to = qsm_transition(QSM_M_WRITEBACK, level[l], e);
			ck_assert(to < 0 || (e == QSM_E_IO_DONE && to == (int)sync[l]));
		}
		/* A sync leads only to a later level or to the release. */
		for (int e = 0; e < QSM_E__COUNT; e++) {
			int to = qsm_transition(QSM_M_WRITEBACK, sync[l], e);
			if (to < 0 || to == QSM_S_WB_RELEASE)
				continue;
			int k = -1;
			for (int j = 0; j < n; j++)
				if (level[j] == (enum qsm_state)to)
					k = j;
			ck_assert_msg(k > l, "%s leads back to %s", qsm_state_name(sync[l]),
				      qsm_state_name(to));
		}
	}
	/* The data sync comes before any table but refcount blocks. */
	ck_assert_int_eq(qsm_transition(QSM_M_WRITEBACK, QSM_S_WB_COLLECT, QSM_E_WB_TABLES), -1);
	ck_assert_int_eq(qsm_transition(QSM_M_WRITEBACK, QSM_S_WB_COLLECT, QSM_E_WB_SYNCNOW),
			 QSM_S_WB_SYNC_DATA);
	ck_assert_int_eq(qsm_transition(QSM_M_WRITEBACK, QSM_S_WB_SYNC_DATA, QSM_E_WB_TABLES),
			 QSM_S_WB_L2);
	ck_assert_int_eq(qsm_transition(QSM_M_WRITEBACK, QSM_S_WB_SYNC_L1, QSM_E_WB_TABLES), -1);
	ck_assert_int_eq(qsm_transition(QSM_M_WRITEBACK, QSM_S_WB_SYNC_L2, QSM_E_WB_BLOCKS), -1);
	/* Close joins a write-back batch like a flush. */
	ck_assert_int_eq(qsm_transition(QSM_M_CLOSE, QSM_S_CLOSE_DRAIN, QSM_E_NEED_DURABLE),
			 QSM_S_DURABLE_WAIT);
}
END_TEST

/* Traced batches of a close on a lazy image: the states follow the order,
 * the refcounts are written (a full batch), and the last round writes the
 * header alone, clearing the dirty bit. */
struct wb_trace {
	char seq[4096];
	size_t n;
	int backing_status_backing; /* BACKING_STATUS --BACKING--> BACKING_STATUS */
};

static void wb_trace_fn(void *opaque, const struct qsm_trace_event *ev)
{
	struct wb_trace *t = opaque;
	if (!strcmp(ev->kind, "writeback"))
		t->n += (size_t)snprintf(t->seq + t->n, sizeof(t->seq) - t->n, "%s ", ev->to);
	if (!strcmp(ev->from, "BACKING_STATUS") && !strcmp(ev->to, "BACKING_STATUS") &&
	    !strcmp(ev->event_name, "BACKING"))
		t->backing_status_backing++;
}

START_TEST(close_batch_traced)
{
	struct qsm_sim *sim = new_disk(50, true);
	struct event_base *b = event_base_new();
	struct qsm_image *img = open_disk(b, sim, QSM_CACHE_WRITEBACK);
	struct wb_trace t = { .n = 0 };
	ck_assert_int_eq(write_flags(b, img, 0, 0x12, CS, 0), 0);
	/* A new L2 table: its refcount is written eagerly even when lazy. */
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	ck_assert_int_eq(write_flags(b, img, 4 * CS, 0x14, CS, 0), 0);
	ck_assert_int_eq(qsm_sync_flush(img), 0); /* data only: marks dirty, no refcounts */
	qsm_set_trace(img, wb_trace_fn, &t);
	ck_assert_int_eq(write_flags(b, img, 5 * CS, 0x13, CS, 0), 0);
	ck_assert_int_eq(qsm_close(img), 0);
	ck_assert_msg(strstr(t.seq, "WB_COLLECT WB_REFBLOCKS WB_SYNC_REFBLOCKS WB_L2 WB_SYNC_L2 "
				    "WB_RELEASE WB_COLLECT WB_SYNC_DATA WB_HEADER WB_SYNC_HEADER "
				    "WB_RELEASE DONE"),
		      "batch: %s", t.seq);
	event_base_free(b);
	check_clean(sim, true);
	qsm_sim_free(sim);
}
END_TEST

/* --- fua: targeted batches -------------------------------------------------
 * A FUA write's batch writes what it needs, not every dirty table: traced
 * at the io/ boundary (qsm_io.trace), from submission to completion. */

#define BIG (512u << 20)      /* 256 L2 tables: four 512-byte L1 sectors */
#define L2SPAN ((uint64_t)CS / 8 * CS)

struct io_log {
	bool on;
	unsigned writes[QSM_IO_EV__COUNT];
	uint64_t l2_at[16];       /* L2 writes (L2_UPDATE, L2_ALLOC): offsets */
	unsigned nb_l2;
	unsigned flushes;
	/* When set: a FUA write submitted at the first L2 write seen (from
	 * the hook: submitting only posts its start to the loop). */
	struct qsm_image *img;
	const struct iovec *fua_iov;
	uint64_t fua_off;
	void *fua_done;
	int fua_ret;
};

static void done_cb(void *opaque, int ret);

static void io_log_fn(void *opaque, const struct qsm_io_req *r, bool done, int ret)
{
	struct io_log *l = opaque;
	(void)ret;
	if (!l->on || done)
		return; /* submissions only */
	if (r->op == QSM_IO_FLUSH)
		l->flushes++;
	if (r->op != QSM_IO_WRITE)
		return;
	l->writes[r->event]++;
	if ((r->event == QSM_IO_EV_L2_UPDATE || r->event == QSM_IO_EV_L2_ALLOC) && l->nb_l2 < 16)
		l->l2_at[l->nb_l2++] = r->offset;
	if ((r->event == QSM_IO_EV_L2_UPDATE || r->event == QSM_IO_EV_L2_ALLOC) && l->img) {
		l->fua_ret = qsm_writev_flags(l->img, l->fua_off, l->fua_iov, 1, QSM_REQ_FUA, done_cb,
					      l->fua_done);
		l->img = NULL;
	}
}

static unsigned meta_writes_logged(const struct io_log *l)
{
	return l->writes[QSM_IO_EV_L1_UPDATE] + l->writes[QSM_IO_EV_L2_UPDATE] +
	       l->writes[QSM_IO_EV_L2_ALLOC] + l->writes[QSM_IO_EV_REFBLOCK_UPDATE] +
	       l->writes[QSM_IO_EV_REFBLOCK_ALLOC] + l->writes[QSM_IO_EV_REFTABLE_UPDATE] +
	       l->writes[QSM_IO_EV_HEADER_UPDATE];
}

/* The host offset of the L2 table mapping guest offset off (0: none). */
static uint64_t l2_of(struct qsm_image *img, uint64_t off)
{
	return qcow2_be64(img->l1 + off / L2SPAN * 8) & QCOW2_L1E_OFFSET_MASK;
}

/* A FUA write traced from submission to completion. */
static void fua_traced(struct event_base *b, struct qsm_image *img, struct io_log *l,
		       uint64_t off, uint8_t pat, size_t len)
{
	memset(l, 0, sizeof(*l));
	l->on = true;
	ck_assert_int_eq(write_flags(b, img, off, pat, len, QSM_REQ_FUA), 0);
	l->on = false;
}

static void fua_targeted_case(bool lazy)
{
	struct qcow2_create_opts o = { .size = BIG, .cluster_bits = 12, .version = 3,
				       .refcount_order = 4, .lazy_refcounts = lazy };
	uint8_t *im;
	size_t len;
	char err[256];
	struct qsm_sim *sim = qsm_sim_new(lazy ? 71 : 70);
	ck_assert_int_eq(qcow2_create_image(&o, &im, &len, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_sim_load_buf(sim, im, len), 0);
	free(im);
	struct event_base *b = event_base_new();
	struct qsm_open_opts oo = { .cache = QSM_CACHE_WRITEBACK, .work_threads = -1 };
	struct qsm_image *img;
	struct qsm_io *io;
	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	ck_assert_msg(qsm_open_io(b, io, &oo, &img, err, sizeof(err)) == 0, "open: %s", err);
	struct io_log l;
	memset(&l, 0, sizeof(l));
	io->trace = io_log_fn;
	io->trace_opaque = &l;

	/* Tables A, B, C (unrelated) and E (the FUA target), durable. */
	const uint64_t A = 0, B = 2 * L2SPAN, C = 4 * L2SPAN, E = 8 * L2SPAN, F = 6 * L2SPAN,
		       G = 10 * L2SPAN;
	const uint64_t others[3] = { A, B, C };
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(write_flags(b, img, others[i], (uint8_t)(0x31 + i), 3 * CS, 0), 0);
	ck_assert_int_eq(write_flags(b, img, E, 0x41, CS, 0), 0);
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	ck_assert_uint_eq(qsm_l2_dirty_count(&img->l2c), 0);

	/* Dirty A, B, C without allocating (zero flag on allocated clusters:
	 * no refcount changes, so the crash below leaves nothing leaked). */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(zero_flags(b, img, others[i], CS, 0), 0);
	ck_assert_uint_eq(qsm_l2_dirty_count(&img->l2c), 3);

	/* A FUA allocating write in E: its data, the refcounts (not with
	 * lazy refcounts: the dirty bit is on disk already) and E's table
	 * alone; E's L1 entry is durable, so no L1 write. */
	struct qsm_stats st0, st1;
	fua_traced(b, img, &l, E + CS, 0x42, CS);
	ck_assert_uint_eq(l.writes[QSM_IO_EV_DATA_WRITE], 1);
	ck_assert_uint_eq(l.nb_l2, 1);
	ck_assert_uint_eq(QSM_ALIGN_DOWN(l.l2_at[0], CS), l2_of(img, E));
	ck_assert_uint_eq(l.writes[QSM_IO_EV_L1_UPDATE], 0);
	if (lazy)
		ck_assert_uint_eq(l.writes[QSM_IO_EV_REFBLOCK_UPDATE], 0);
	else
		ck_assert_uint_ge(l.writes[QSM_IO_EV_REFBLOCK_UPDATE], 1);
	ck_assert_uint_ge(l.flushes, 2); /* data (with refcounts) before the table, table */
	for (int i = 0; i < 3; i++)
		ck_assert(qsm_l2_is_dirty(&img->l2c, l2_of(img, others[i])));
	ck_assert_uint_eq(qsm_l2_dirty_count(&img->l2c), 3);

	/* A FUA write allocating table F: F whole, then its L1 sector (the
	 * fresh tables that sector names: F alone, A is not fresh). */
	fua_traced(b, img, &l, F + 3 * CS, 0x43, CS);
	ck_assert_uint_eq(l.nb_l2, 1);
	ck_assert_uint_eq(l.writes[QSM_IO_EV_L2_ALLOC], 1);
	ck_assert_uint_eq(l.l2_at[0], l2_of(img, F));
	ck_assert_uint_eq(l.writes[QSM_IO_EV_L1_UPDATE], 1);
	ck_assert_uint_eq(qsm_l2_dirty_count(&img->l2c), 3);

	/* A FUA overwrite in place (mapping durable): no metadata write at
	 * all, one sync. */
	qsm_get_stats(img, &st0);
	fua_traced(b, img, &l, E + CS + 512, 0x44, 512);
	qsm_get_stats(img, &st1);
	ck_assert_uint_eq(meta_writes_logged(&l), 0);
	ck_assert_uint_eq(st1.meta_writes, st0.meta_writes);
	ck_assert_uint_eq(l.writes[QSM_IO_EV_DATA_WRITE], 1);
	ck_assert_uint_eq(l.flushes, 1);
	ck_assert_uint_eq(qsm_l2_dirty_count(&img->l2c), 3);

	/* A normal batch queued with it (a flush submitted just before,
	 * waiting for the FUA write in flight: group commit) covers a FUA
	 * overwrite: one batch for both. */
	struct done fdone = { 0, 0 }, wd = { 0, 0 };
	uint8_t pat[512];
	memset(pat, 0x45, sizeof(pat));
	struct iovec piov = { pat, sizeof(pat) };
	qsm_get_stats(img, &st0);
	ck_assert_int_eq(qsm_flush(img, done_cb, &fdone), 0);
	ck_assert_int_eq(qsm_writev_flags(img, E + 2048, &piov, 1, QSM_REQ_FUA, done_cb, &wd), 0);
	wait_done(b, &fdone);
	wait_done(b, &wd);
	ck_assert_int_eq(fdone.ret, 0);
	ck_assert_int_eq(wd.ret, 0);
	qsm_get_stats(img, &st1);
	ck_assert_uint_eq(st1.wb_batches - st0.wb_batches, 1);
	ck_assert_uint_eq(qsm_l2_dirty_count(&img->l2c), 0);

	/* A batch already running covers a FUA overwrite whose mapping is
	 * durable while it still has a sync to submit: the overwrite joins it
	 * rather than wait for one more (here it is submitted as the flush's
	 * batch writes its L2 level, and completes before WB_SYNC_L1). */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(zero_flags(b, img, others[i] + 2 * CS, CS, 0), 0);
	ck_assert_int_eq(write_flags(b, img, G, 0x47, CS, 0), 0); /* and an L1 level */
	memset(&fdone, 0, sizeof(fdone));
	memset(&wd, 0, sizeof(wd));
	memset(pat, 0x46, sizeof(pat));
	qsm_get_stats(img, &st0);
	ck_assert_int_eq(qsm_flush(img, done_cb, &fdone), 0);
	memset(&l, 0, sizeof(l));
	l.img = img; /* submitted from the trace hook, at the batch's first L2 write */
	l.fua_iov = &piov;
	l.fua_off = E + 2560;
	l.fua_done = &wd;
	l.on = true;
	wait_done(b, &fdone);
	l.on = false;
	ck_assert_int_eq(l.fua_ret, 0);
	wait_done(b, &fdone);
	wait_done(b, &wd);
	ck_assert_int_eq(fdone.ret, 0);
	ck_assert_int_eq(wd.ret, 0);
	qsm_get_stats(img, &st1);
	ck_assert_uint_eq(st1.wb_batches - st0.wb_batches, 1);

	/* Dirty them again for the crash below. */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(zero_flags(b, img, others[i] + CS, CS, 0), 0);

	/* Crash right after: the FUA data is there, the unrelated zero
	 * writes (never durable) are not, and the image is consistent. */
	io->trace = NULL;
	qsm_sim_crash(sim, 0, false);
	qsm_abandon(img);
	if (!lazy) {
		/* As the crash left it: nothing to repair, nothing leaked. */
		struct qsm_io *rio;
		struct qsm_check_result res;
		memset(&res, 0, sizeof(res));
		ck_assert_int_eq(qsm_io_open_sim(b, sim, QSM_IO_RDONLY, &rio), 0);
		ck_assert_int_eq(qsm_check_image(rio, 0, &res, NULL, err, sizeof(err)), 0);
		qsm_io_close(rio);
		ck_assert_uint_eq(res.corruptions, 0);
		ck_assert_uint_eq(res.leaks, 0);
		ck_assert(!res.incomplete);
		if (system("qemu-img --version >/dev/null 2>&1") == 0) {
			char path[] = "/tmp/qsm-fua-XXXXXX", cmd[128];
			int fd = mkstemp(path);
			ck_assert_int_ge(fd, 0);
			close(fd);
			ck_assert_int_eq(qsm_sim_save_file(sim, path), 0);
			snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s'", path);
			ck_assert_msg(system(cmd) == 0, "qemu-img check %s", path);
			unlink(path);
		}
	}
	img = open_disk(b, sim, QSM_CACHE_WRITEBACK); /* lazy: repaired here */
	ck_assert(reads_as(img, E, 2048, 0x41));
	ck_assert(reads_as(img, E + 2560, 512, 0x46));
	ck_assert(reads_as(img, E + 3072, CS - 3072, 0x41));
	ck_assert(reads_as(img, E + CS, 512, 0x42));
	ck_assert(reads_as(img, E + CS + 512, 512, 0x44));
	ck_assert(reads_as(img, E + CS + 1024, CS - 1024, 0x42));
	ck_assert(reads_as(img, E + 2048, 512, 0x45));
	ck_assert(reads_as(img, F + 3 * CS, CS, 0x43));
	ck_assert(reads_as(img, G, CS, 0x47));
	for (int i = 0; i < 3; i++) { /* the flushed zero write stays, the later one is gone */
		ck_assert(reads_as(img, others[i], CS, 0));
		ck_assert(reads_as(img, others[i] + CS, CS, (uint8_t)(0x31 + i)));
		ck_assert(reads_as(img, others[i] + 2 * CS, CS, 0));
	}
	ck_assert_int_eq(qsm_close(img), 0);
	event_base_free(b);
	check_clean(sim, lazy);
	qsm_sim_free(sim);
}

START_TEST(fua_targeted_batch)
{
	fua_targeted_case(false);
}
END_TEST

START_TEST(fua_targeted_batch_lazy)
{
	fua_targeted_case(true);
}
END_TEST

/* Random mixes: FUA writes and zero writes on even clusters, other writes,
 * zero writes, discards and flushes on odd clusters of the same L2 tables,
 * up to QD in flight; a random crash (each unflushed write kept or not) at
 * a random point.  Every FUA request completed before the crash reads back;
 * the image is consistent (no corruption; leaks are allowed without lazy
 * refcounts, as after any crash; lazy: repaired at open). */
#define QD 8
#define NCL 96                 /* clusters used, spread over 12 L2 tables */

struct mix {
	struct event_base *b;
	struct qsm_image *img;
	uint64_t rng;
	int inflight, issued, completed, crash_at;
	struct mop {
		struct mix *m;
		bool busy, fua;
		int cl;
		uint8_t pat;
		uint8_t buf[CS];
		struct iovec iov;
	} ops[QD];
	int expect[NCL];           /* FUA clusters: -1 unknown, else the pattern read */
	bool cl_busy[NCL];
};

static uint64_t mix_rand(struct mix *m)
{
	m->rng ^= m->rng << 13;
	m->rng ^= m->rng >> 7;
	m->rng ^= m->rng << 17;
	return m->rng;
}

static uint64_t mix_off(int cl)
{
	return (uint64_t)(cl % 12) * 3 * L2SPAN + (uint64_t)(cl / 12) * CS;
}

static void mix_cb(void *opaque, int ret)
{
	struct mop *o = opaque;
	struct mix *m = o->m;
	ck_assert_int_eq(ret, 0);
	if (o->fua && m->completed < m->crash_at)
		m->expect[o->cl] = o->pat;
	m->cl_busy[o->cl] = false;
	o->busy = false;
	m->inflight--;
	m->completed++;
}

static void mix_issue(struct mix *m, struct mop *o)
{
	uint64_t r = mix_rand(m);
	int cl;
	bool fua = r % 3 == 0;
	do
		cl = (int)((mix_rand(m) % (NCL / 2)) * 2 + (fua ? 0 : 1));
	while (m->cl_busy[cl]);
	o->m = m;
	o->busy = true;
	o->fua = fua;
	o->cl = cl;
	o->pat = (uint8_t)(1 + m->issued % 250);
	memset(o->buf, o->pat, CS);
	o->iov = (struct iovec){ o->buf, CS };
	m->cl_busy[cl] = true;
	uint64_t off = mix_off(cl);
	unsigned kind = (unsigned)(r >> 8) % 8;
	int ret;
	if (fua && kind == 0) {
		o->pat = 0;
		ret = qsm_write_zeroes(m->img, off, CS, QSM_ZERO_FUA | (r & 0x10000 ? QSM_ZERO_MAY_UNMAP : 0),
				       mix_cb, o);
	} else if (fua) {
		ret = qsm_writev_flags(m->img, off, &o->iov, 1, QSM_REQ_FUA, mix_cb, o);
	} else if (kind == 0) {
		ret = qsm_discard(m->img, off, CS, mix_cb, o);
	} else if (kind == 1) {
		ret = qsm_write_zeroes(m->img, off, CS, r & 0x10000 ? QSM_ZERO_MAY_UNMAP : 0, mix_cb, o);
	} else if (kind == 2) {
		ret = qsm_flush(m->img, mix_cb, o);
	} else {
		o->iov.iov_len = CS - (r >> 20) % 2048;
		ret = qsm_writev(m->img, off + (r >> 20) % 2048, &o->iov, 1, mix_cb, o);
	}
	ck_assert_int_eq(ret, 0);
	if (fua && m->expect[cl] >= 0)
		m->expect[cl] = -1; /* old or new until it completes */
	m->inflight++;
	m->issued++;
}

static void fua_mix_case(uint64_t seed, bool lazy)
{
	struct qcow2_create_opts co = { .size = BIG, .cluster_bits = 12, .version = 3,
					.refcount_order = 4, .lazy_refcounts = lazy };
	uint8_t *im;
	size_t len;
	char err[256];
	struct qsm_sim *sim = qsm_sim_new(seed);
	ck_assert_int_eq(qcow2_create_image(&co, &im, &len, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_sim_load_buf(sim, im, len), 0);
	free(im);
	struct mix *m = calloc(1, sizeof(*m));
	m->b = event_base_new();
	m->img = open_disk(m->b, sim, QSM_CACHE_WRITEBACK);
	m->rng = seed * 2654435761u + 1;
	for (int i = 0; i < NCL; i++)
		m->expect[i] = 0; /* never written: zeros */
	m->crash_at = 20 + (int)(mix_rand(m) % 100);
	while (m->completed < m->crash_at) {
		for (int i = 0; i < QD && m->issued < m->crash_at + QD; i++)
			if (!m->ops[i].busy)
				mix_issue(m, &m->ops[i]);
		ck_assert_msg(event_base_loop(m->b, EVLOOP_ONCE) != 1, "hang, seed %llu",
			      (unsigned long long)seed);
	}
	/* Crash now, with requests still in flight: those are unknown. */
	for (int i = 0; i < QD; i++)
		if (m->ops[i].busy && m->ops[i].fua)
			m->expect[m->ops[i].cl] = -1;
	qsm_sim_crash_random(sim);
	qsm_abandon(m->img);
	if (!lazy) {
		struct qsm_io *rio;
		struct qsm_check_result res;
		memset(&res, 0, sizeof(res));
		ck_assert_int_eq(qsm_io_open_sim(m->b, sim, QSM_IO_RDONLY, &rio), 0);
		ck_assert_int_eq(qsm_check_image(rio, 0, &res, NULL, err, sizeof(err)), 0);
		qsm_io_close(rio);
		ck_assert_msg(res.corruptions == 0 && !res.incomplete, "seed %llu: %llu corruptions",
			      (unsigned long long)seed, (unsigned long long)res.corruptions);
	}
	m->img = open_disk(m->b, sim, QSM_CACHE_WRITEBACK);
	int known = 0;
	for (int cl = 0; cl < NCL; cl += 2)
		known += m->expect[cl] > 0;
	ck_assert_msg(known > 0, "seed %llu: no FUA data to check", (unsigned long long)seed);
	for (int cl = 0; cl < NCL; cl += 2)
		if (m->expect[cl] >= 0)
			ck_assert_msg(reads_as(m->img, mix_off(cl), CS, (uint8_t)m->expect[cl]),
				      "seed %llu: FUA cluster %d lost (expected %#x)",
				      (unsigned long long)seed, cl, m->expect[cl]);
	ck_assert_int_eq(qsm_close(m->img), 0);
	event_base_free(m->b);
	free(m);
	qsm_sim_free(sim);
}

START_TEST(fua_random_crash)
{
	for (uint64_t seed = 1000; seed < 1030; seed++)
		fua_mix_case(seed, seed % 2);
}
END_TEST

/* A chain of three images on simulated disks, through open_backing_io. */
struct chain {
	struct qsm_sim *sims[3];
};

static int open_chain_io(void *opaque, struct event_base *base, const char *name,
			 const char *path, int flags, struct qsm_io **out)
{
	struct chain *c = opaque;
	int k = name[0] - '0'; /* the recorded name: "1" or "2" */
	ck_assert(k >= 1 && k <= 2);
	return qsm_io_open_sim(base, c->sims[k], flags, out);
}

START_TEST(backing_status_per_image)
{
	struct chain c;
	for (int k = 0; k < 3; k++) {
		struct qcow2_create_opts o = { .size = SIZE, .cluster_bits = 12, .version = 3,
					       .refcount_order = 4,
					       .backing_file = k < 2 ? (k == 0 ? "1" : "2") : NULL,
					       .backing_format = k < 2 ? "qcow2" : NULL };
		uint8_t *im;
		size_t len;
		char err[256];
		c.sims[k] = qsm_sim_new(60 + k);
		ck_assert_int_eq(qcow2_create_image(&o, &im, &len, err, sizeof(err)), 0);
		ck_assert_int_eq(qsm_sim_load_buf(c.sims[k], im, len), 0);
		free(im);
	}
	struct event_base *b = event_base_new();
	struct qsm_open_opts oo = { .work_threads = -1, .open_backing_io = open_chain_io,
				    .open_backing_opaque = &c };
	struct qsm_image *img;
	struct qsm_io *io;
	char err[256];
	ck_assert_int_eq(qsm_io_open_sim(b, c.sims[0], 0, &io), 0);
	ck_assert_msg(qsm_open_io(b, io, &oo, &img, err, sizeof(err)) == 0, "open: %s", err);
	struct wb_trace t = { .n = 0 };
	qsm_set_trace(img, wb_trace_fn, &t);
	/* A partial zero write over a cluster unallocated in the whole chain:
	 * image 1 says unallocated, image 2 decides (zeros), per range. */
	ck_assert_int_eq(zero_flags(b, img, 7 * CS + 100, 200, 0), 0);
	ck_assert_int_ge(t.backing_status_backing, 1);
	struct qsm_extent e;
	ck_assert_int_eq(qsm_sync_block_status(img, 7 * CS, CS, &e), 0);
	ck_assert(e.flags & QSM_STATUS_ZERO); /* became a zero cluster */
	ck_assert(reads_as(img, 7 * CS, CS, 0));
	ck_assert_int_eq(qsm_close(img), 0);
	event_base_free(b);
	for (int k = 0; k < 3; k++)
		qsm_sim_free(c.sims[k]);
}
END_TEST

/* --- abandon on real backends ----------------------------------------------- */

#define AB_NREQ 48
#define AB_LEN (256u << 10)

static void abandon_case(const char *aio)
{
	if (!strcmp(aio, "io_uring") && !qsm_io_uring_available()) {
		QSM_SKIP("io_uring unavailable on this kernel");
		return;
	}
	char dir[] = "/tmp/qsm-abandon-XXXXXX", path[64];
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/a.qcow2", dir);
	struct qsm_create_opts co = { .struct_size = sizeof(co), .size = 64u << 20,
				      .cluster_size = 64u << 10 };
	char err[256];
	ck_assert_msg(qsm_create(path, &co, err, sizeof(err)) == 0, "create: %s", err);

	struct event_base *b = event_base_new();
	struct qsm_open_opts oo = { .struct_size = sizeof(oo), .aio = aio,
				    .cache = QSM_CACHE_WRITEBACK };
	struct qsm_image *img;
	ck_assert_msg(qsm_open(b, path, &oo, &img, err, sizeof(err)) == 0, "open: %s", err);

	/* Allocating writes and reads over the whole disk, all at once. */
	LSAN_OFF();
	uint8_t *bufs[AB_NREQ];
	struct iovec iov[AB_NREQ];
	struct done d[AB_NREQ];
	for (int i = 0; i < AB_NREQ; i++) {
		bufs[i] = malloc(AB_LEN);
		memset(bufs[i], op_pat(i), AB_LEN);
		iov[i] = (struct iovec){ bufs[i], AB_LEN };
		d[i] = (struct done){ 0, 0 };
		uint64_t off = (uint64_t)i * AB_LEN;
		int r = i % 4 == 3 ? qsm_readv(img, off - AB_LEN, &iov[i], 1, done_cb, &d[i])
				   : qsm_writev(img, off, &iov[i], 1, done_cb, &d[i]);
		ck_assert_int_eq(r, 0);
	}
	/* Run the loop until operations are at the backend, some done. */
	int turns = 0;
	while (img->io->stats.in_flight == 0 && turns++ < 10000)
		event_base_loop(b, EVLOOP_ONCE | EVLOOP_NONBLOCK);
	ck_assert_msg(img->io->stats.in_flight > 0, "%s: no I/O ever in flight", aio);
	int calls = 0;
	for (int i = 0; i < AB_NREQ; i++)
		calls += d[i].calls;

	qsm_abandon(img);
	LSAN_ON();
	/* The buffers are the caller's again: poison and free them. */
	for (int i = 0; i < AB_NREQ; i++) {
		memset(bufs[i], 0xee, AB_LEN);
		free(bufs[i]);
	}
	ck_assert_int_eq(event_base_get_num_events(b, EVENT_BASE_COUNT_ADDED |
						     EVENT_BASE_COUNT_ACTIVE), 0);
	ck_assert_int_eq(event_base_loop(b, EVLOOP_NONBLOCK), 1); /* nothing left */
	int calls_after = 0;
	for (int i = 0; i < AB_NREQ; i++)
		calls_after += d[i].calls;
	ck_assert_int_eq(calls_after, calls); /* no callback after abandon */

	/* What the "crash" left opens again; leaks are allowed, corruption is not. */
	struct qsm_io *io;
	struct qsm_check_result res;
	memset(&res, 0, sizeof(res));
	ck_assert_int_eq(qsm_io_open_path(b, path, QSM_IO_RDONLY, aio, &io), 0);
	ck_assert_int_eq(qsm_check_image(io, 0, &res, NULL, err, sizeof(err)), 0);
	qsm_io_close(io);
	ck_assert_uint_eq(res.corruptions, 0);
	event_base_free(b);
	unlink(path);
	rmdir(dir);
}

START_TEST(abandon_in_flight_threads)
{
	abandon_case("threads");
}
END_TEST

START_TEST(abandon_in_flight_uring)
{
	abandon_case("io_uring");
}
END_TEST

int main(void)
{
	Suite *s = suite_create("lifecycle");
	TCase *fua = tcase_create("fua");
	tcase_add_test(fua, fua_survives_crash);
	tcase_add_test(fua, fua_survives_crash_lazy);
	tcase_add_test(fua, flags_checked);
	suite_add_tcase(s, fua);
	TCase *ft = tcase_create("fua-targeted");
	tcase_add_test(ft, fua_targeted_batch);
	tcase_add_test(ft, fua_targeted_batch_lazy);
	tcase_add_test(ft, fua_random_crash);
	tcase_set_timeout(ft, 120);
	suite_add_tcase(s, ft);
	TCase *cl = tcase_create("close");
	tcase_add_test(cl, close_async_in_callback);
	tcase_add_test(cl, close_async_in_callback_lazy);
	tcase_add_test(cl, close_async_in_callback_writethrough);
	tcase_add_test(cl, close_with_requests_in_flight);
	tcase_add_test(cl, close_async_read_only);
	suite_add_tcase(s, cl);
	TCase *tb = tcase_create("table");
	tcase_add_test(tb, writeback_order_in_table);
	tcase_add_test(tb, close_batch_traced);
	tcase_add_test(tb, backing_status_per_image);
	suite_add_tcase(s, tb);
	TCase *ab = tcase_create("abandon");
	tcase_add_test(ab, abandon_in_flight_threads);
	suite_add_tcase(s, ab);
	TCase *abu = tcase_create("abandon_uring");
	QSM_TCASE_REQUIRES(abu, "uring");
	tcase_add_test(abu, abandon_in_flight_uring);
	suite_add_tcase(s, abu);
	return qsm_test_run(s);
}
