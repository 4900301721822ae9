/*
 * tests/unit/test_io.c: the io/ layer against its contracts (io/io.h, io/sim.h).
 *
 * Most tests are loop tests over the three backends (threads, io_uring, sim);
 * io_uring cases are a TCase of their own tagged "uring" and the /dev/shm
 * ones one tagged "tmpfs" (own ctest entries, reported skipped where the
 * kernel refuses io_uring or /dev/shm is not tmpfs: tests/unit/skip.h).  Every
 * completion checks it is not running inside qsm_io_submit (contract 1) and
 * every teardown checks that counter.  Seeds are printed on failure paths so
 * runs replay.  Files live in $QSM_TEST_DIR or /var/tmp (not /tmp, which may
 * be tmpfs where O_DIRECT fails); /dev/shm, when it is tmpfs, serves the
 * cases that need a file system without O_DIRECT or ZERO_RANGE.
 */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/blkdebug.h"
#include "io/io.h"
#include "io/null.h"
#include "io/sim.h"
#include "io/util.h"
#include "tests/unit/skip.h"

enum { B_THREADS, B_URING, B_SIM, B__COUNT };
static const char *const backend_names[] = { "threads", "io_uring", "sim" };

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define TMPFS_MAGIC_ 0x01021994

/* --- Harness --------------------------------------------------------------------- */

static bool g_in_submit;          /* set around every qsm_io_submit */
static unsigned g_inline;         /* completions seen while g_in_submit */
static unsigned g_path_counter;

struct env {
	int backend;
	struct event_base *base;
	struct qsm_sim *sim;
	struct qsm_io *io;
	char path[PATH_MAX];
};

static const char *test_dir(void)
{
	const char *d = getenv("QSM_TEST_DIR");
	return d && *d ? d : "/var/tmp";
}

static void env_path(struct env *e, const char *dir)
{
	snprintf(e->path, sizeof(e->path), "%s/qsm-test-io-%d-%u.img", dir, (int)getpid(),
		 g_path_counter++);
}

/* Open e->io on backend b (sim: a fresh disk with this seed) on a new base.
 * Returns false, after printing why, when the backend cannot run here. */
static bool env_open_in(struct env *e, int b, int flags, uint64_t seed, const char *dir)
{
	memset(e, 0, sizeof(*e));
	e->backend = b;
	g_inline = 0;
	if (b == B_URING && !qsm_io_uring_available()) {
		QSM_SKIP("io_uring unavailable on this kernel");
		return false;
	}
	e->base = event_base_new();
	ck_assert_ptr_nonnull(e->base);
	int ret;
	if (b == B_SIM) {
		e->sim = qsm_sim_new(seed);
		ck_assert_ptr_nonnull(e->sim);
		ret = qsm_io_open_sim(e->base, e->sim, flags, &e->io);
	} else {
		env_path(e, dir);
		ret = qsm_io_open_path(e->base, e->path, flags | QSM_IO_CREATE,
				       backend_names[b], &e->io);
	}
	ck_assert_msg(ret == 0, "open %s: %s", backend_names[b], strerror(-ret));
	ck_assert_str_eq(e->io->ops->name, backend_names[b]);
	return true;
}

static bool env_open(struct env *e, int b, int flags, uint64_t seed)
{
	return env_open_in(e, b, flags, seed, test_dir());
}

static void env_close(struct env *e)
{
	ck_assert_uint_eq(g_inline, 0);
	if (e->io) {
		ck_assert_uint_eq(e->io->stats.in_flight, 0);
		qsm_io_close(e->io);
	}
	if (e->sim)
		qsm_sim_free(e->sim);
	if (e->path[0])
		unlink(e->path);
	event_base_free(e->base);
}

/* Run the loop until nothing is in flight on e->io (with a 60 s guard). */
static void env_drain(struct env *e)
{
	uint64_t start = qsm_now_ns();
	while (e->io->stats.in_flight > 0) {
		event_base_loop(e->base, EVLOOP_ONCE);
		ck_assert_msg(qsm_now_ns() - start < 60ull * 1000000000ull, "drain timed out");
	}
}

struct treq {
	struct qsm_io_req req;
	int done, ret;
	struct iovec iov[8];
	void (*on_done)(struct treq *t);
	void *opaque;
	int idx;
};

static void treq_cb(struct qsm_io_req *r, int ret)
{
	struct treq *t = container_of(r, struct treq, req);
	if (g_in_submit)
		g_inline++;
	t->done++;
	t->ret = ret;
	if (t->on_done)
		t->on_done(t);
}

static void treq_set(struct treq *t, enum qsm_io_op op, uint64_t off, uint64_t len,
		     void *buf, enum qsm_io_event ev)
{
	memset(&t->req, 0, sizeof(t->req));
	t->req.op = op;
	t->req.event = ev;
	t->req.offset = off;
	t->req.len = len;
	t->req.cb = treq_cb;
	t->done = 0;
	t->ret = 1;
	if (op == QSM_IO_READ || op == QSM_IO_WRITE) {
		t->iov[0].iov_base = buf;
		t->iov[0].iov_len = len;
		t->req.iov = t->iov;
		t->req.iovcnt = 1;
	}
}

static void submit(struct qsm_io *io, struct treq *t)
{
	g_in_submit = true;
	qsm_io_submit(io, &t->req);
	g_in_submit = false;
}

/* One request, waited for; returns its result. */
static int do_op(struct env *e, enum qsm_io_op op, uint64_t off, uint64_t len, void *buf,
		 enum qsm_io_event ev)
{
	struct treq t = { 0 };
	treq_set(&t, op, off, len, buf, ev);
	submit(e->io, &t);
	ck_assert_int_eq(t.done, 0); /* never inline */
	env_drain(e);
	ck_assert_int_eq(t.done, 1);
	return t.ret;
}

/* Check asserts are costly (each one is reported to the runner), so byte
 * loops find the first bad byte and assert once. */
static bool all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

static void fill_pattern(uint8_t *p, size_t len, uint64_t seed)
{
	struct qsm_rng r;
	qsm_rng_seed(&r, seed);
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)(qsm_rng_next(&r) | 1); /* never zero */
}

/* --- Random concurrent workload against a reference buffer ------------------------ */

#define WL_SIZE (1 * MiB)
#define WL_MAXLEN (64 * KiB)
#define WL_SLOTS 192

struct wl;

struct wl_slot {
	struct treq t;
	uint8_t *buf;   /* WL_MAXLEN + 64 bytes, io->mem_align aligned */
	bool busy;
	struct wl *wl;
};

struct wl {
	struct env *e;
	uint8_t *ref;
	struct qsm_rng rng;
	struct wl_slot slots[WL_SLOTS];
	unsigned inflight, max_inflight;
	uint64_t completed, bytes_read, bytes_written;
	int mode;       /* 0: byte-granular; 1: half 4 KiB-aligned (O_DIRECT path) */
	uint64_t seed;
};

static void wl_done(struct treq *t)
{
	struct wl_slot *s = t->opaque;
	struct wl *w = s->wl;
	struct qsm_io_req *r = &t->req;

	ck_assert_msg(t->ret == 0, "seed %llu: %s at %llu+%llu failed: %s",
		      (unsigned long long)w->seed, qsm_io_op_name(r->op),
		      (unsigned long long)r->offset, (unsigned long long)r->len, strerror(-t->ret));
	if (r->op == QSM_IO_READ) {
		uint8_t tmp[WL_MAXLEN];
		qsm_iov_to_buf(r->iov, r->iovcnt, 0, tmp, r->len);
		ck_assert_msg(memcmp(tmp, w->ref + r->offset, r->len) == 0,
			      "seed %llu: read %llu+%llu differs from the reference",
			      (unsigned long long)w->seed, (unsigned long long)r->offset,
			      (unsigned long long)r->len);
		w->bytes_read += r->len;
	} else {
		w->bytes_written += r->len;
	}
	s->busy = false;
	w->inflight--;
	w->completed++;
}

static bool wl_overlaps(struct wl *w, bool write, uint64_t off, uint64_t len)
{
	for (int i = 0; i < WL_SLOTS; i++) {
		struct wl_slot *s = &w->slots[i];
		if (!s->busy)
			continue;
		if (!write && s->t.req.op == QSM_IO_READ)
			continue; /* reads may overlap reads */
		if (off < s->t.req.offset + s->t.req.len && s->t.req.offset < off + len)
			return true;
	}
	return false;
}

/* Start one random op in a free slot; false if the chosen range collided. */
static bool wl_start(struct wl *w, struct wl_slot *s)
{
	struct qsm_rng *r = &w->rng;
	bool write = qsm_rng_below(r, 2);
	bool aligned = w->mode == 1 && qsm_rng_below(r, 2);
	uint64_t off, len;

	if (aligned) {
		len = 4096 * (1 + qsm_rng_below(r, WL_MAXLEN / 4096));
		off = 4096 * qsm_rng_below(r, (WL_SIZE - len) / 4096 + 1);
	} else {
		len = 1 + qsm_rng_below(r, WL_MAXLEN);
		off = qsm_rng_below(r, WL_SIZE - len + 1);
	}
	if (wl_overlaps(w, write, off, len))
		return false;

	treq_set(&s->t, write ? QSM_IO_WRITE : QSM_IO_READ, off, len, NULL,
		 write ? QSM_IO_EV_DATA_WRITE : QSM_IO_EV_DATA_READ);
	/* Split into 1..4 pieces (4 KiB multiples when aligned). */
	int n = 1 + (int)qsm_rng_below(r, 4);
	uint8_t *p = s->buf + (aligned ? 0 : qsm_rng_below(r, 64));
	uint64_t left = len;
	int cnt = 0;
	for (int i = 0; i < n && left > 0; i++) {
		uint64_t piece = i == n - 1 ? left : qsm_rng_below(r, left + 1);
		if (aligned)
			piece = QSM_ALIGN_DOWN(piece, 4096);
		if (i == n - 1)
			piece = left;
		s->t.iov[cnt].iov_base = p;
		s->t.iov[cnt].iov_len = piece; /* empty pieces are allowed */
		cnt++;
		p += piece;
		left -= piece;
	}
	s->t.req.iov = s->t.iov;
	s->t.req.iovcnt = cnt;
	s->t.on_done = wl_done;
	s->t.opaque = s;
	uint8_t *base = (uint8_t *)s->t.iov[0].iov_base;
	if (write) {
		fill_pattern(base, len, qsm_rng_next(r));
		memcpy(w->ref + off, base, len);
	} else {
		memset(base, 0xa5, len);
	}
	s->busy = true;
	w->inflight++;
	w->max_inflight = QSM_MAX(w->max_inflight, w->inflight);
	submit(w->e->io, &s->t);
	ck_assert_int_eq(s->t.done, 0);
	return true;
}

/* nops random reads and writes with up to `depth` in flight, then the whole
 * file is compared with the reference. */
static void run_workload(struct env *e, uint64_t seed, unsigned nops, unsigned depth, int mode)
{
	struct wl *w = calloc(1, sizeof(*w));
	ck_assert_ptr_nonnull(w);
	w->e = e;
	w->seed = seed;
	w->mode = mode;
	qsm_rng_seed(&w->rng, seed);
	w->ref = calloc(1, WL_SIZE);
	struct qsm_io_stats before = e->io->stats;
	ck_assert_int_eq(qsm_io_truncate_sync(e->io, 0), 0);
	ck_assert_int_eq(qsm_io_truncate_sync(e->io, WL_SIZE), 0);
	for (unsigned i = 0; i < depth; i++) {
		w->slots[i].buf = qsm_io_alloc(e->io, WL_MAXLEN + 64);
		ck_assert_ptr_nonnull(w->slots[i].buf);
		w->slots[i].wl = w;
	}
	uint64_t started = 0, start_ns = qsm_now_ns();
	while (started < nops || w->inflight > 0) {
		for (unsigned i = 0; i < depth && started < nops; i++) {
			if (!w->slots[i].busy && wl_start(w, &w->slots[i]))
				started++;
		}
		if (w->inflight)
			event_base_loop(e->base, EVLOOP_ONCE);
		ck_assert_msg(qsm_now_ns() - start_ns < 120ull * 1000000000ull, "workload hung");
	}
	ck_assert_uint_eq(w->completed, nops);
	ck_assert_uint_eq(e->io->stats.in_flight, 0);
	const struct qsm_io_stats *st = &e->io->stats;
	ck_assert_uint_eq(st->ops[QSM_IO_READ] + st->ops[QSM_IO_WRITE],
			  before.ops[QSM_IO_READ] + before.ops[QSM_IO_WRITE] + nops);
	ck_assert_uint_eq(st->bytes_read - before.bytes_read, w->bytes_read);
	ck_assert_uint_eq(st->bytes_written - before.bytes_written, w->bytes_written);

	uint8_t *all = malloc(WL_SIZE);
	ck_assert_int_eq(qsm_io_pread_sync(e->io, all, WL_SIZE, 0), 0);
	ck_assert_msg(memcmp(all, w->ref, WL_SIZE) == 0, "seed %llu: final contents differ",
		      (unsigned long long)seed);
	free(all);
	for (unsigned i = 0; i < depth; i++)
		free(w->slots[i].buf);
	free(w->ref);
	if (depth >= 64 && e->backend != B_SIM)
		ck_assert_uint_ge(w->max_inflight, 32);
	free(w);
}

START_TEST(test_random_rw)
{
	struct env e;
	if (!env_open(&e, _i, 0, 1))
		return;
	run_workload(&e, 0x1234 + (uint64_t)_i, 600, WL_SLOTS, 0);
	env_close(&e);
}
END_TEST

START_TEST(test_sim_random_rw_seeds)
{
	for (uint64_t seed = 1; seed <= 40; seed++) {
		struct env e;
		env_open(&e, B_SIM, 0, seed);
		qsm_sim_set_max_batch(e.sim, 1 + (unsigned)(seed % 8));
		run_workload(&e, seed * 7919, 300, 1 + (unsigned)(seed * 13 % WL_SLOTS), 0);
		ck_assert_uint_eq(qsm_sim_races(e.sim), 0);
		env_close(&e);
	}
}
END_TEST

/* --- Contract 2: EOF zero-fill --------------------------------------------------- */

START_TEST(test_eof_zero_fill)
{
	struct env e;
	if (!env_open(&e, _i, 0, 2))
		return;
	uint8_t data[1000];
	fill_pattern(data, sizeof(data), 5);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, data, sizeof(data), 0), 0);

	uint8_t buf[8192];
	memset(buf, 0xaa, sizeof(buf));
	struct treq t = { 0 };
	treq_set(&t, QSM_IO_READ, 0, sizeof(buf), NULL, QSM_IO_EV_NONE);
	t.iov[0] = (struct iovec){ buf, 500 };
	t.iov[1] = (struct iovec){ buf + 500, 3000 };
	t.iov[2] = (struct iovec){ buf + 3500, 8192 - 3500 };
	t.req.iov = t.iov;
	t.req.iovcnt = 3;
	submit(e.io, &t);
	env_drain(&e);
	ck_assert_int_eq(t.ret, 0);
	ck_assert_mem_eq(buf, data, sizeof(data));
	ck_assert_msg(all_zero(buf + sizeof(data), sizeof(buf) - sizeof(data)), "garbage past EOF");

	/* Wholly past the end. */
	memset(buf, 0xaa, sizeof(buf));
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 1 * MiB, 4096, buf, QSM_IO_EV_NONE), 0);
	ck_assert(all_zero(buf, 4096));
	uint64_t size;
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, sizeof(data)); /* reads never extend */

	/* Sync helper too. */
	memset(buf, 0xaa, sizeof(buf));
	ck_assert_int_eq(qsm_io_pread_sync(e.io, buf, 2000, 0), 0);
	ck_assert_mem_eq(buf, data, sizeof(data));
	ck_assert_int_eq(buf[1999], 0);
	env_close(&e);
}
END_TEST

/* --- ZERO, DISCARD, TRUNCATE, FLUSH ------------------------------------------------- */

static void check_zero_discard(struct env *e, bool exact_discard)
{
	const size_t n = 256 * KiB;
	uint8_t *pat = malloc(n), *buf = malloc(n + 64 * KiB);
	fill_pattern(pat, n, 9);
	ck_assert_int_eq(qsm_io_truncate_sync(e->io, 0), 0);
	ck_assert_int_eq(qsm_io_pwrite_sync(e->io, pat, n, 0), 0);

	ck_assert_int_eq(do_op(e, QSM_IO_ZERO, 5000, 70000, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(qsm_io_pread_sync(e->io, buf, n, 0), 0);
	size_t bad = n;
	for (size_t i = 0; i < n && bad == n; i++) {
		uint8_t want = (i >= 5000 && i < 75000) ? 0 : pat[i];
		if (buf[i] != want)
			bad = i;
	}
	ck_assert_msg(bad == n, "after ZERO byte %zu is wrong", bad);

	/* ZERO past the end extends the file (like fallocate without KEEP_SIZE). */
	ck_assert_int_eq(do_op(e, QSM_IO_ZERO, n + 4096, 10000, NULL, QSM_IO_EV_NONE), 0);
	uint64_t size;
	ck_assert_int_eq(qsm_io_get_size(e->io, &size), 0);
	ck_assert_uint_eq(size, n + 4096 + 10000);

	/* DISCARD: contents unspecified (old or zero), size kept. */
	ck_assert_int_eq(do_op(e, QSM_IO_DISCARD, 100000, 150000, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(qsm_io_get_size(e->io, &size), 0);
	ck_assert_uint_eq(size, n + 4096 + 10000);
	ck_assert_int_eq(qsm_io_pread_sync(e->io, buf, n, 0), 0);
	for (size_t i = 0; i < n && bad == n; i++) {
		uint8_t old = (i >= 5000 && i < 75000) ? 0 : pat[i];
		if (i >= 100000 && i < 250000) {
			if (buf[i] != 0 && (exact_discard || buf[i] != old))
				bad = i;
		} else if (buf[i] != old) {
			bad = i;
		}
	}
	ck_assert_msg(bad == n, "after DISCARD byte %zu is wrong", bad);
	/* Zero-length ZERO and DISCARD succeed and change nothing. */
	ck_assert_int_eq(do_op(e, QSM_IO_ZERO, 0, 0, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(e, QSM_IO_DISCARD, 0, 0, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(qsm_io_pread_sync(e->io, buf, 16, 0), 0);
	ck_assert_mem_eq(buf, pat, 16);
	free(pat);
	free(buf);
}

START_TEST(test_zero_discard)
{
	struct env e;
	if (!env_open(&e, _i, 0, 3))
		return;
	check_zero_discard(&e, _i == B_SIM);
	env_close(&e);
}
END_TEST

/* tmpfs has no FALLOC_FL_ZERO_RANGE: ZERO must fall back to writing zeros. */
START_TEST(test_zero_fallback_tmpfs)
{
	struct statfs sfs;
	if (statfs("/dev/shm", &sfs) < 0 || sfs.f_type != TMPFS_MAGIC_) {
		QSM_SKIP("/dev/shm is not tmpfs");
		return;
	}
	struct env e;
	if (!env_open_in(&e, _i, 0, 4, "/dev/shm"))
		return;
	check_zero_discard(&e, false);
	env_close(&e);
}
END_TEST

START_TEST(test_truncate)
{
	struct env e;
	if (!env_open(&e, _i, 0, 5))
		return;
	uint8_t pat[20000], buf[4096];
	fill_pattern(pat, sizeof(pat), 11);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, pat, sizeof(pat), 0), 0);

	ck_assert_int_eq(do_op(&e, QSM_IO_TRUNCATE, 10000, 0, NULL, QSM_IO_EV_NONE), 0);
	uint64_t size;
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 10000);
	memset(buf, 0xaa, sizeof(buf));
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 9000, sizeof(buf), buf, QSM_IO_EV_NONE), 0);
	ck_assert_mem_eq(buf, pat + 9000, 1000);
	ck_assert(all_zero(buf + 1000, sizeof(buf) - 1000));

	/* Growing exposes zeros, not the old bytes. */
	ck_assert_int_eq(do_op(&e, QSM_IO_TRUNCATE, 1 * MiB, 0, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 1 * MiB);
	memset(buf, 0xaa, sizeof(buf));
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 10000, sizeof(buf), buf, QSM_IO_EV_NONE), 0);
	ck_assert(all_zero(buf, sizeof(buf)));

	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 123), 0);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 123);
	ck_assert_uint_eq(e.io->stats.ops[QSM_IO_TRUNCATE], 2);
	env_close(&e);
}
END_TEST

START_TEST(test_flush)
{
	struct env e;
	if (!env_open(&e, _i, 0, 6))
		return;
	uint8_t buf[4096];
	fill_pattern(buf, sizeof(buf), 12);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, sizeof(buf), buf, QSM_IO_EV_DATA_WRITE), 0);
	if (e.sim)
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 1);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	if (e.sim)
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 0);
	ck_assert_int_eq(qsm_io_flush_sync(e.io), 0);
	ck_assert_uint_eq(e.io->stats.ops[QSM_IO_FLUSH], 1);
	ck_assert_uint_eq(e.io->stats.ops[QSM_IO_WRITE], 1);
	ck_assert_uint_eq(e.io->stats.bytes_written, sizeof(buf));
	env_close(&e);
}
END_TEST

/* A flush with nothing to flush completes without the backend (QEMU's
 * write_gen rule); one after a write, a failed write, a truncate or a
 * blocking write does not; two overlapping flushes leave the next one real. */
START_TEST(test_flush_elided)
{
	struct env e;
	if (!env_open(&e, _i, 0, 6))
		return;
	uint8_t buf[4096];
	fill_pattern(buf, sizeof(buf), 13);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(e.io->flushes_elided, 1); /* nothing written yet */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, sizeof(buf), buf, QSM_IO_EV_DATA_WRITE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(e.io->flushes_elided, 1);
	if (e.sim)
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(e.io->flushes_elided, 2);

	/* A truncate is a write. */
	ck_assert_int_eq(do_op(&e, QSM_IO_TRUNCATE, 1 * MiB, 0, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(e.io->flushes_elided, 2);

	/* Two flushes in flight after a write: which covered what is not
	 * tracked, so the next flush goes to the backend. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 8192, sizeof(buf), buf, QSM_IO_EV_DATA_WRITE), 0);
	struct treq f1 = { 0 }, f2 = { 0 };
	treq_set(&f1, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH);
	treq_set(&f2, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH);
	submit(e.io, &f1);
	submit(e.io, &f2);
	env_drain(&e);
	ck_assert_int_eq(f1.done + f2.done, 2);
	ck_assert_int_eq(f1.ret | f2.ret, 0);
	ck_assert_uint_eq(e.io->flushes_elided, 2);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(e.io->flushes_elided, 2);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(e.io->flushes_elided, 3);

	/* A blocking write, then an asynchronous flush: real. */
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, buf, sizeof(buf), 0), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(e.io->flushes_elided, 3);
	if (e.sim)
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 0);
	env_close(&e);
}
END_TEST

/* --- O_DIRECT with byte-granular requests --------------------------------------------- */

/* Open a new file with QSM_IO_DIRECT on backend b (threads or io_uring);
 * false (reported SKIPPED) where the kernel or file system cannot. */
static bool env_open_direct(struct env *e, int b)
{
	if (b == B_URING && !qsm_io_uring_available()) {
		QSM_SKIP("io_uring unavailable on this kernel");
		return false;
	}
	memset(e, 0, sizeof(*e));
	e->backend = b;
	g_inline = 0;
	e->base = event_base_new();
	env_path(e, test_dir());
	int ret = qsm_io_open_path(e->base, e->path, QSM_IO_CREATE | QSM_IO_DIRECT,
				   backend_names[b], &e->io);
	if (ret == -EINVAL) {
		QSM_SKIP("O_DIRECT refused under %s", test_dir());
		e->io = NULL;
		env_close(e);
		return false;
	}
	ck_assert_int_eq(ret, 0);
	return true;
}

START_TEST(test_direct_misaligned)
{
	int b = _i == 0 ? B_THREADS : B_URING;
	struct env e;

	if (!env_open_direct(&e, b))
		return;
	ck_assert_uint_ge(e.io->mem_align, 512);

	/* EOF in the middle of an aligned direct read. */
	uint8_t *buf = qsm_io_alloc(e.io, 8192);
	uint8_t pat[1000];
	fill_pattern(pat, sizeof(pat), 13);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, pat, sizeof(pat), 0), 0);
	memset(buf, 0xaa, 8192);
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 0, 8192, buf, QSM_IO_EV_NONE), 0);
	ck_assert_mem_eq(buf, pat, sizeof(pat));
	ck_assert(all_zero(buf + sizeof(pat), 8192 - sizeof(pat)));
	free(buf);

	run_workload(&e, 77 + (uint64_t)b, 600, WL_SLOTS, 1);
	check_zero_discard(&e, false);
	env_close(&e);
}
END_TEST

/* An abandon with misaligned direct transfers in flight frees their bounce
 * buffers (the handle's own memory): the requests are the caller's, so under
 * LeakSanitizer any leak reported here is the io layer's. */
START_TEST(test_direct_abandon_bounces)
{
	int b = _i == 0 ? B_THREADS : B_URING;
	struct env e;

	if (!env_open_direct(&e, b))
		return;
	enum { N = 16 };
	static struct treq t[N];
	static uint8_t bytes[N][3000];
	for (int i = 0; i < N; i++) {
		/* Odd offsets: reads bounce, writes read-modify-write (one at a
		 * time, the rest wait behind it). */
		treq_set(&t[i], i % 2 ? QSM_IO_READ : QSM_IO_WRITE, (uint64_t)i * 7000 + 1,
			 sizeof(bytes[i]), bytes[i], QSM_IO_EV_NONE);
		submit(e.io, &t[i]);
	}
	ck_assert_uint_gt(e.io->stats.in_flight, 0);
	qsm_io_abandon(e.io);
	e.io = NULL;
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(t[i].done, 0); /* forgotten, never completed */
	env_close(&e);
}
END_TEST

/* Whole-block writes from misaligned buffers (a caller's malloc()) are
 * copied to aligned memory and overlap each other like aligned writes; only
 * a write that is not whole blocks needs the read-modify-write that runs
 * alone.  Seen in in_flight before the loop runs: each request counts once
 * and each bounce sub-request at the backend once more. */
START_TEST(test_direct_whole_blocks_overlap)
{
	int b = _i == 0 ? B_THREADS : B_URING;
	struct env e;

	if (!env_open_direct(&e, b))
		return;
	enum { N = 8, BS = 4096 };
	static struct treq t[N + 2];
	static uint8_t mem[N + 2][BS + 1];
	for (int i = 0; i < N; i++) {
		fill_pattern(mem[i] + 1, BS, 500 + (uint64_t)i);
		treq_set(&t[i], QSM_IO_WRITE, (uint64_t)i * BS, BS, mem[i] + 1, QSM_IO_EV_NONE);
		submit(e.io, &t[i]);
	}
	ck_assert_uint_eq(e.io->stats.in_flight, 2 * N); /* all at the backend */
	/* A partial-block write waits for those; a whole-block write after it
	 * waits behind it (FIFO). */
	fill_pattern(mem[N] + 1, 100, 600);
	treq_set(&t[N], QSM_IO_WRITE, 10, 100, mem[N] + 1, QSM_IO_EV_NONE);
	submit(e.io, &t[N]);
	fill_pattern(mem[N + 1] + 1, BS, 601);
	treq_set(&t[N + 1], QSM_IO_WRITE, (uint64_t)N * BS, BS, mem[N + 1] + 1, QSM_IO_EV_NONE);
	submit(e.io, &t[N + 1]);
	ck_assert_uint_eq(e.io->stats.in_flight, 2 * N + 2);
	env_drain(&e);
	for (int i = 0; i < N + 2; i++) {
		ck_assert_int_eq(t[i].done, 1);
		ck_assert_int_eq(t[i].ret, 0);
	}
	uint8_t *rd = qsm_io_alloc(e.io, (N + 1) * BS);
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 0, (N + 1) * BS, rd, QSM_IO_EV_NONE), 0);
	ck_assert_mem_eq(rd + 10, mem[N] + 1, 100);
	ck_assert_mem_eq(rd, mem[0] + 1, 10);
	ck_assert_mem_eq(rd + 110, mem[0] + 1 + 110, BS - 110);
	for (int i = 1; i < N; i++)
		ck_assert_mem_eq(rd + (size_t)i * BS, mem[i] + 1, BS);
	ck_assert_mem_eq(rd + (size_t)N * BS, mem[N + 1] + 1, BS);
	free(rd);
	env_close(&e);
}
END_TEST

START_TEST(test_direct_tmpfs_refused)
{
	struct statfs sfs;
	if (statfs("/dev/shm", &sfs) < 0 || sfs.f_type != TMPFS_MAGIC_) {
		QSM_SKIP("/dev/shm is not tmpfs");
		return;
	}
	struct event_base *base = event_base_new();
	struct qsm_io *io = (struct qsm_io *)1;
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "/dev/shm/qsm-test-io-%d-direct", (int)getpid());
	int ret = qsm_io_open_path(base, path, QSM_IO_CREATE | QSM_IO_DIRECT, "threads", &io);
	unlink(path);
	if (ret == 0) {
		QSM_SKIP("this kernel's tmpfs supports O_DIRECT");
		qsm_io_close(io);
	} else {
		ck_assert_int_eq(ret, -EINVAL);
		ck_assert_ptr_null(io);
	}
	event_base_free(base);
}
END_TEST

/* --- Contract 1 and the checked wrapper ---------------------------------------------- */

START_TEST(test_invalid_requests)
{
	struct env e;
	if (!env_open(&e, _i, 0, 7))
		return;
	uint8_t buf[512];
	struct treq t[7] = { 0 };

	treq_set(&t[0], QSM_IO_READ, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	t[0].req.op = (enum qsm_io_op)42;
	treq_set(&t[1], QSM_IO_WRITE, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	t[1].req.len = sizeof(buf) + 1;                 /* iov total != len */
	treq_set(&t[2], QSM_IO_READ, UINT64_MAX - 10, sizeof(buf), buf, QSM_IO_EV_NONE);
	treq_set(&t[3], QSM_IO_WRITE, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	t[3].req.event = (enum qsm_io_event)999;
	treq_set(&t[4], QSM_IO_READ, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	t[4].req.iovcnt = -1;
	treq_set(&t[5], QSM_IO_ZERO, INT64_MAX, 2, NULL, QSM_IO_EV_NONE);
	treq_set(&t[6], QSM_IO_TRUNCATE, UINT64_MAX, 0, NULL, QSM_IO_EV_NONE);
	for (int i = 0; i < 7; i++) {
		submit(e.io, &t[i]);
		ck_assert_int_eq(t[i].done, 0);
	}
	ck_assert_uint_eq(e.io->stats.in_flight, 7);
	env_drain(&e);
	for (int i = 0; i < 7; i++) {
		ck_assert_int_eq(t[i].done, 1);
		ck_assert_msg(t[i].ret == -EINVAL, "request %d: %d", i, t[i].ret);
	}
	for (int op = 0; op <= QSM_IO_TRUNCATE; op++)
		ck_assert_uint_eq(e.io->stats.ops[op], 0); /* never reached the backend */
	env_close(&e);
}
END_TEST

/* Zero-length transfers, truncates, flushes: all complete after submit returns. */
START_TEST(test_never_inline)
{
	struct env e;
	if (!env_open(&e, _i, 0, 8))
		return;
	uint8_t buf[16];
	struct treq t[5] = { 0 };
	treq_set(&t[0], QSM_IO_READ, 0, 0, buf, QSM_IO_EV_NONE);
	treq_set(&t[1], QSM_IO_WRITE, 0, 0, buf, QSM_IO_EV_NONE);
	treq_set(&t[2], QSM_IO_TRUNCATE, 4096, 0, NULL, QSM_IO_EV_NONE);
	treq_set(&t[3], QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_NONE);
	treq_set(&t[4], QSM_IO_READ, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	t[4].req.iovcnt = 0; /* no iov but len 16: invalid */
	for (int i = 0; i < 5; i++) {
		submit(e.io, &t[i]);
		ck_assert_int_eq(t[i].done, 0);
	}
	env_drain(&e);
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(t[i].ret, 0);
	ck_assert_int_eq(t[4].ret, -EINVAL);
	ck_assert_uint_eq(g_inline, 0);
	env_close(&e);
}
END_TEST

START_TEST(test_rdonly)
{
	int b = _i;
	struct env e;
	if (!env_open(&e, b, 0, 9))
		return;
	uint8_t pat[4096], buf[4096];
	fill_pattern(pat, sizeof(pat), 14);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, pat, sizeof(pat), 0), 0);
	ck_assert_int_eq(qsm_io_flush_sync(e.io), 0);
	qsm_io_close(e.io);
	e.io = NULL;
	int ret = b == B_SIM ? qsm_io_open_sim(e.base, e.sim, QSM_IO_RDONLY, &e.io)
			     : qsm_io_open_path(e.base, e.path, QSM_IO_RDONLY, backend_names[b], &e.io);
	ck_assert_int_eq(ret, 0);

	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, sizeof(buf), buf, QSM_IO_EV_NONE), -EBADF);
	ck_assert_int_eq(do_op(&e, QSM_IO_ZERO, 0, 4096, NULL, QSM_IO_EV_NONE), -EBADF);
	ck_assert_int_eq(do_op(&e, QSM_IO_DISCARD, 0, 4096, NULL, QSM_IO_EV_NONE), -EBADF);
	ck_assert_int_eq(do_op(&e, QSM_IO_TRUNCATE, 0, 0, NULL, QSM_IO_EV_NONE), -EBADF);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, buf, sizeof(buf), 0), -EBADF);
	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 0), -EBADF);
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 0, sizeof(buf), buf, QSM_IO_EV_NONE), 0);
	ck_assert_mem_eq(buf, pat, sizeof(buf));
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_NONE), 0);
	uint64_t size;
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, sizeof(pat));
	env_close(&e);
}
END_TEST

START_TEST(test_open_path)
{
	struct event_base *base = event_base_new();
	struct qsm_io *io;
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/qsm-test-io-%d-open.img", test_dir(), (int)getpid());
	unlink(path);

	ck_assert_int_eq(qsm_io_open_path(base, path, 0, NULL, &io), -ENOENT);
	ck_assert_int_eq(qsm_io_open_path(base, path, QSM_IO_CREATE, "bogus", &io), -EINVAL);
	ck_assert_ptr_null(io);
	ck_assert_int_eq(qsm_io_open_path(base, path, QSM_IO_CREATE | QSM_IO_RDONLY, "threads", &io),
			 -EINVAL);
	ck_assert_int_eq(qsm_io_open_path(base, path, 0x100 | QSM_IO_CREATE, "threads", &io), -EINVAL);

	ck_assert_int_eq(qsm_io_open_path(base, path, QSM_IO_CREATE, NULL, &io), 0);
	ck_assert_str_eq(io->ops->name, qsm_io_uring_available() ? "io_uring" : "threads");
	ck_assert_uint_eq(io->mem_align, 4096);
	void *p = qsm_io_zalloc(io, 10000);
	ck_assert_ptr_nonnull(p);
	ck_assert_uint_eq((uintptr_t)p % 4096, 0);
	ck_assert_int_eq(((uint8_t *)p)[9999], 0);
	free(p);
	qsm_io_close(io);

	ck_assert_int_eq(qsm_io_open_path(base, path, 0, "threads", &io), 0);
	ck_assert_str_eq(io->ops->name, "threads");
	qsm_io_close(io);
	if (qsm_io_uring_available()) {
		ck_assert_int_eq(qsm_io_open_path(base, path, 0, "io_uring", &io), 0);
		ck_assert_str_eq(io->ops->name, "io_uring");
		qsm_io_close(io);
	}
	unlink(path);

	ck_assert_str_eq(qsm_io_event_name(QSM_IO_EV_L2_UPDATE), "l2_update");
	ck_assert_str_eq(qsm_io_event_name(QSM_IO_EV_HEADER_UPDATE), "header_update");
	ck_assert_str_eq(qsm_io_event_name((enum qsm_io_event)1000), "invalid");
	ck_assert_str_eq(qsm_io_op_name(QSM_IO_DISCARD), "discard");
	ck_assert_str_eq(qsm_io_op_name((enum qsm_io_op)77), "invalid");
	event_base_free(base);
}
END_TEST

struct trace_count {
	unsigned submits, dones, errors;
	uint64_t last_seq;
};

static void trace_hook(void *opaque, const struct qsm_io_req *req, bool done, int ret)
{
	struct trace_count *tc = opaque;
	if (done) {
		tc->dones++;
		tc->errors += ret != 0;
	} else {
		tc->submits++;
		ck_assert_uint_gt(req->io_seq, tc->last_seq); /* numbered in order */
		tc->last_seq = req->io_seq;
	}
}

START_TEST(test_trace_and_stats)
{
	struct env e;
	if (!env_open(&e, _i, 0, 10))
		return;
	struct trace_count tc = { 0 };
	e.io->trace = trace_hook;
	e.io->trace_opaque = &tc;
	uint8_t buf[1000];
	fill_pattern(buf, sizeof(buf), 3);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, sizeof(buf), buf, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 0, 500, buf, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_NONE), 0);
	struct treq bad = { 0 };
	treq_set(&bad, QSM_IO_READ, 0, 5, NULL, QSM_IO_EV_NONE);
	bad.req.iovcnt = 0; /* len 5 without buffers */
	submit(e.io, &bad);
	env_drain(&e);
	ck_assert_int_eq(bad.ret, -EINVAL);
	ck_assert_uint_eq(tc.submits, 4);
	ck_assert_uint_eq(tc.dones, 4);
	ck_assert_uint_eq(tc.errors, 1);
	ck_assert_uint_eq(e.io->stats.bytes_written, 1000);
	ck_assert_uint_eq(e.io->stats.bytes_read, 500);
	ck_assert_uint_eq(e.io->stats.ops[QSM_IO_READ], 1);
	env_close(&e);
}
END_TEST

/* Closing the handle from inside the last completion callback is allowed. */
static void close_in_cb(struct treq *t)
{
	struct env *e = t->opaque;
	qsm_io_close(e->io);
	e->io = NULL;
}

START_TEST(test_close_in_callback)
{
	struct env e;
	if (!env_open(&e, _i, 0, 11))
		return;
	uint8_t buf[4096];
	struct treq t = { 0 };
	treq_set(&t, QSM_IO_READ, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	t.on_done = close_in_cb;
	t.opaque = &e;
	submit(e.io, &t);
	while (e.io)
		event_base_loop(e.base, EVLOOP_ONCE);
	ck_assert_int_eq(t.done, 1);
	/* And from an invalid request's deferred completion. */
	ck_assert_int_eq(e.sim ? qsm_io_open_sim(e.base, e.sim, 0, &e.io)
			       : qsm_io_open_path(e.base, e.path, 0, backend_names[_i], &e.io), 0);
	treq_set(&t, QSM_IO_READ, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	t.req.len++; /* invalid */
	t.on_done = close_in_cb;
	t.opaque = &e;
	submit(e.io, &t);
	while (e.io)
		event_base_loop(e.base, EVLOOP_ONCE);
	ck_assert_int_eq(t.ret, -EINVAL);
	/* The loop has nothing left registered: dispatch returns. */
	ck_assert_int_eq(event_base_dispatch(e.base), 1);
	env_close(&e);
}
END_TEST

/* Many more requests than io_uring slots, with large iovec arrays. */
START_TEST(test_overflow_and_big_iov)
{
	struct env e;
	if (!env_open(&e, _i, 0, 12))
		return;
	enum { N = 600, PIECES = 1500 };
	static struct treq t[N];
	static uint8_t data[N][64];
	static struct iovec big[PIECES];
	static uint8_t bigbuf[PIECES * 3];
	for (int i = 0; i < N; i++) {
		fill_pattern(data[i], 64, (uint64_t)i);
		treq_set(&t[i], QSM_IO_WRITE, (uint64_t)i * 64, 64, data[i], QSM_IO_EV_NONE);
		submit(e.io, &t[i]);
	}
	ck_assert_uint_eq(e.io->stats.in_flight, N);
	env_drain(&e);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(t[i].ret, 0);
	/* Read back through an iovec array longer than IOV_MAX. */
	for (int i = 0; i < PIECES; i++)
		big[i] = (struct iovec){ bigbuf + 3 * i, 3 };
	struct treq r = { 0 };
	treq_set(&r, QSM_IO_READ, 0, sizeof(bigbuf), NULL, QSM_IO_EV_NONE);
	r.req.iov = big;
	r.req.iovcnt = PIECES;
	submit(e.io, &r);
	env_drain(&e);
	ck_assert_int_eq(r.ret, 0);
	size_t bad = sizeof(bigbuf);
	for (size_t off = 0; off < sizeof(bigbuf) && bad == sizeof(bigbuf); off++) {
		size_t i = off / 64;
		if (bigbuf[off] != (i < N ? data[i][off % 64] : 0))
			bad = off;
	}
	ck_assert_msg(bad == sizeof(bigbuf), "byte %zu", bad);
	env_close(&e);
}
END_TEST

/* --- Sim: scheduler ---------------------------------------------------------------------- */

static void record_order(struct treq *t)
{
	int *order = t->opaque;
	int n = order[0]++;
	order[1 + n] = t->idx;
}

/* Submit nreq mixed requests at once; order[1..] gets the completion order. */
static void sim_run_batch(uint64_t seed, unsigned max_batch, int nreq, int *order)
{
	struct env e;
	env_open(&e, B_SIM, 0, seed);
	qsm_sim_set_max_batch(e.sim, max_batch);
	struct treq *t = calloc((size_t)nreq, sizeof(*t));
	uint8_t(*bufs)[512] = calloc((size_t)nreq, 512);
	order[0] = 0;
	for (int i = 0; i < nreq; i++) {
		enum qsm_io_op op = i % 5 == 4 ? QSM_IO_FLUSH : i % 2 ? QSM_IO_WRITE : QSM_IO_READ;
		treq_set(&t[i], op, (uint64_t)i * 512, op == QSM_IO_FLUSH ? 0 : 512, bufs[i],
			 QSM_IO_EV_NONE);
		t[i].on_done = record_order;
		t[i].opaque = order;
		t[i].idx = i;
		submit(e.io, &t[i]);
	}
	env_drain(&e);
	ck_assert_int_eq(order[0], nreq);
	ck_assert_uint_eq(qsm_sim_races(e.sim), 0);
	free(t);
	free(bufs);
	env_close(&e);
}

START_TEST(test_sim_reorders)
{
	enum { N = 32 };
	int order[N + 1];
	for (unsigned mb = 1; mb <= 8; mb *= 2) {
		bool reordered = false;
		for (uint64_t seed = 1; seed <= 10 && !reordered; seed++) {
			sim_run_batch(seed, mb, N, order);
			bool seen[N] = { 0 };
			for (int i = 0; i < N; i++) {
				ck_assert(!seen[order[1 + i]]); /* each exactly once */
				seen[order[1 + i]] = true;
				if (order[1 + i] != i)
					reordered = true;
			}
		}
		ck_assert_msg(reordered, "max_batch %u: completions always in submission order", mb);
	}
}
END_TEST

START_TEST(test_sim_replay)
{
	enum { N = 64 };
	int a[N + 1], b[N + 1];
	sim_run_batch(42, 4, N, a);
	sim_run_batch(42, 4, N, b);
	ck_assert_mem_eq(a, b, sizeof(a));
	bool differs = false;
	for (uint64_t seed = 43; seed < 53 && !differs; seed++) {
		sim_run_batch(seed, 4, N, b);
		differs = memcmp(a, b, sizeof(a)) != 0;
	}
	ck_assert_msg(differs, "the seed does not influence the order");
}
END_TEST

/* --- Sim: durability and crashes ------------------------------------------------------------ */

/* Reopen after a crash and read len bytes at off. */
static void sim_reopen(struct env *e)
{
	if (e->io)
		qsm_io_close(e->io);
	ck_assert_int_eq(qsm_io_open_sim(e->base, e->sim, 0, &e->io), 0);
}

static bool sim_holds(struct env *e, uint64_t off, const uint8_t *want, size_t len)
{
	uint8_t buf[4096];
	ck_assert_uint_le(len, sizeof(buf));
	ck_assert_int_eq(do_op(e, QSM_IO_READ, off, len, buf, QSM_IO_EV_NONE), 0);
	return memcmp(buf, want, len) == 0;
}

static bool sim_zero(struct env *e, uint64_t off, size_t len)
{
	static const uint8_t zeros[4096];
	return sim_holds(e, off, zeros, len);
}

START_TEST(test_sim_durability)
{
	struct env e;
	uint8_t a[512], b[512];
	fill_pattern(a, sizeof(a), 21);
	fill_pattern(b, sizeof(b), 22);

	/* Write, crash without flush: gone. */
	env_open(&e, B_SIM, 0, 31);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0);
	ck_assert(sim_holds(&e, 0, a, 512)); /* visible before the crash */
	ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 1);
	qsm_sim_crash(e.sim, 0, false);
	sim_reopen(&e);
	ck_assert(sim_zero(&e, 0, 512));
	uint64_t size;
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 0); /* the extension was not durable either */

	/* Write, flush, crash: kept. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 0);
	qsm_sim_crash(e.sim, 0, false);
	sim_reopen(&e);
	ck_assert(sim_holds(&e, 0, a, 512));

	/* A write submitted after the flush was submitted is not covered,
	 * whatever the completion order. */
	for (uint64_t seed = 0; seed < 16; seed++) {
		env_close(&e);
		env_open(&e, B_SIM, 0, seed);
		ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0);
		struct treq f = { 0 }, w = { 0 };
		treq_set(&f, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH);
		treq_set(&w, QSM_IO_WRITE, 512, 512, b, QSM_IO_EV_DATA_WRITE);
		submit(e.io, &f);
		submit(e.io, &w);
		env_drain(&e);
		ck_assert_int_eq(f.ret, 0);
		ck_assert_int_eq(w.ret, 0);
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 1);
		qsm_sim_crash(e.sim, 0, false);
		sim_reopen(&e);
		ck_assert(sim_holds(&e, 0, a, 512));
		ck_assert(sim_zero(&e, 512, 512));
	}

	/* A write in flight when the flush is submitted is not covered even
	 * when it completes first. */
	for (uint64_t seed = 0; seed < 16; seed++) {
		env_close(&e);
		env_open(&e, B_SIM, 0, seed);
		struct treq f = { 0 }, w = { 0 };
		treq_set(&w, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE);
		treq_set(&f, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH);
		submit(e.io, &w);
		submit(e.io, &f);
		env_drain(&e);
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 1);
		qsm_sim_crash(e.sim, 0, false);
		sim_reopen(&e);
		ck_assert(sim_zero(&e, 0, 512));
	}
	env_close(&e);
}
END_TEST

START_TEST(test_sim_keep_mask)
{
	uint8_t d[3][512];
	for (int i = 0; i < 3; i++)
		fill_pattern(d[i], 512, 100 + (uint64_t)i);

	for (uint64_t mask = 0; mask < 8; mask++) {
		struct env e;
		env_open(&e, B_SIM, 0, mask);
		for (int i = 0; i < 3; i++)
			ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, (uint64_t)i * 4096, 512, d[i],
					       QSM_IO_EV_NONE), 0);
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 3);
		qsm_sim_crash(e.sim, mask, false);
		sim_reopen(&e);
		for (int i = 0; i < 3; i++) {
			bool kept = sim_holds(&e, (uint64_t)i * 4096, d[i], 512);
			ck_assert_msg(kept == ((mask >> i) & 1), "mask %llu write %d kept=%d",
				      (unsigned long long)mask, i, kept);
			if (!kept)
				ck_assert(sim_zero(&e, (uint64_t)i * 4096, 512));
		}
		env_close(&e);
	}

	/* Overlapping writes apply in completion order. */
	for (uint64_t mask = 1; mask < 4; mask++) {
		struct env e;
		env_open(&e, B_SIM, 0, mask);
		ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, d[0], QSM_IO_EV_NONE), 0);
		ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, d[1], QSM_IO_EV_NONE), 0);
		qsm_sim_crash(e.sim, mask, false);
		sim_reopen(&e);
		ck_assert(sim_holds(&e, 0, d[mask & 2 ? 1 : 0], 512));
		env_close(&e);
	}

	/* More than 64 unflushed writes: keep_all_beyond decides past bit 63. */
	for (int beyond = 0; beyond < 2; beyond++) {
		struct env e;
		env_open(&e, B_SIM, 0, 5);
		uint8_t blk[70][16];
		for (int i = 0; i < 70; i++) {
			fill_pattern(blk[i], 16, 500 + (uint64_t)i);
			ck_assert_int_eq(qsm_io_pwrite_sync(e.io, blk[i], 16, (uint64_t)i * 16), 0);
		}
		ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 70);
		uint64_t mask = beyond ? 0 : UINT64_MAX;
		qsm_sim_crash(e.sim, mask, beyond);
		sim_reopen(&e);
		for (int i = 0; i < 70; i++) {
			bool want = i < 64 ? !beyond : beyond;
			ck_assert_msg(sim_holds(&e, (uint64_t)i * 16, blk[i], 16) == want,
				      "beyond=%d write %d", beyond, i);
		}
		env_close(&e);
	}
}
END_TEST

static bool g_crashed;

static void crash_in_cb(struct treq *t)
{
	struct env *e = t->opaque;
	qsm_sim_crash(e->sim, 0, false);
	g_crashed = true;
}

static void fail_if_crashed(struct treq *t)
{
	ck_assert_msg(!g_crashed, "a request completed after the crash");
}

START_TEST(test_sim_crash_in_flight)
{
	struct env e;
	env_open(&e, B_SIM, 0, 77);
	uint8_t a[512];
	fill_pattern(a, sizeof(a), 1);
	struct treq t[8] = { 0 };
	for (int i = 0; i < 8; i++) {
		treq_set(&t[i], QSM_IO_WRITE, (uint64_t)i * 512, 512, a, QSM_IO_EV_NONE);
		submit(e.io, &t[i]);
	}
	struct treq bad = { 0 };
	treq_set(&bad, QSM_IO_READ, 0, 1, NULL, QSM_IO_EV_NONE); /* deferred -EINVAL */
	submit(e.io, &bad);
	qsm_sim_crash(e.sim, UINT64_MAX, true);
	ck_assert_uint_eq(e.io->stats.in_flight, 0);
	/* After a crash the handle takes requests but never completes them. */
	struct treq late = { 0 };
	treq_set(&late, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_NONE);
	submit(e.io, &late);
	/* Nor those io.c would complete itself: an invalid request, and a
	 * flush on a cache=unsafe handle (NO_FLUSH).  They used to be queued
	 * for a deferred completion, and the crashed handle was then closed
	 * with them "in flight" (qsm fuzz seed 900020). */
	struct treq late_bad = { 0 }, late_flush = { 0 };
	treq_set(&late_bad, QSM_IO_READ, 0, 1, NULL, QSM_IO_EV_NONE);
	submit(e.io, &late_bad);
	e.io->flags |= QSM_IO_NO_FLUSH;
	treq_set(&late_flush, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH);
	submit(e.io, &late_flush);
	e.io->flags &= ~QSM_IO_NO_FLUSH;
	ck_assert_uint_eq(e.io->stats.in_flight, 0);
	event_base_loop(e.base, EVLOOP_NONBLOCK);
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(t[i].done, 0);
	ck_assert_int_eq(bad.done + late.done + late_bad.done + late_flush.done, 0);
	sim_reopen(&e);
	ck_assert(sim_zero(&e, 0, 4096));

	/* Crash from a completion callback: the other requests never complete. */
	for (int i = 0; i < 8; i++) {
		treq_set(&t[i], QSM_IO_WRITE, (uint64_t)i * 512, 512, a, QSM_IO_EV_NONE);
		t[i].on_done = i == 3 ? crash_in_cb : fail_if_crashed;
		t[i].opaque = &e;
		submit(e.io, &t[i]);
	}
	qsm_sim_set_max_batch(e.sim, 8);
	for (int k = 0; k < 100; k++)
		event_base_loop(e.base, EVLOOP_NONBLOCK);
	ck_assert(g_crashed);
	ck_assert_int_eq(t[3].done, 1);
	ck_assert_uint_eq(e.io->stats.in_flight, 0);
	/* Only the writes that completed before the crash may be there, and
	 * with keep_mask 0 none of them is. */
	sim_reopen(&e);
	ck_assert(sim_zero(&e, 0, 4096));
	env_close(&e);
}
END_TEST

START_TEST(test_sim_crash_random)
{
	/* Same seed, same survivors; and across seeds both outcomes occur. */
	bool seen_kept = false, seen_lost = false;
	for (uint64_t seed = 0; seed < 20; seed++) {
		bool kept[2];
		for (int run = 0; run < 2; run++) {
			struct env e;
			uint8_t a[64];
			fill_pattern(a, sizeof(a), 7);
			env_open(&e, B_SIM, 0, seed);
			ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 64, a, QSM_IO_EV_NONE), 0);
			qsm_sim_crash_random(e.sim);
			sim_reopen(&e);
			kept[run] = sim_holds(&e, 0, a, 64);
			env_close(&e);
		}
		ck_assert_int_eq(kept[0], kept[1]);
		seen_kept |= kept[0];
		seen_lost |= !kept[0];
	}
	ck_assert(seen_kept && seen_lost);
}
END_TEST

START_TEST(test_sim_sync_helpers)
{
	struct env e;
	uint8_t a[300];
	uint64_t size;
	fill_pattern(a, sizeof(a), 8);
	env_open(&e, B_SIM, 0, 1);

	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, a, sizeof(a), 1000), 0);
	ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 1);
	qsm_sim_crash(e.sim, 0, false);
	sim_reopen(&e);
	ck_assert(sim_zero(&e, 1000, sizeof(a)));

	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, a, sizeof(a), 1000), 0);
	ck_assert_int_eq(qsm_io_flush_sync(e.io), 0);
	qsm_sim_crash(e.sim, 0, false);
	sim_reopen(&e);
	ck_assert(sim_holds(&e, 1000, a, sizeof(a)));

	/* A truncate is a write: not durable until flushed. */
	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 10 * MiB), 0);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 10 * MiB);
	qsm_sim_crash(e.sim, 0, false);
	sim_reopen(&e);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 1300);
	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 1100), 0);
	ck_assert_int_eq(qsm_io_flush_sync(e.io), 0);
	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 2000), 0);
	qsm_sim_crash(e.sim, 0, false);
	sim_reopen(&e);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 1100);
	ck_assert(sim_holds(&e, 1000, a, 100));
	ck_assert(sim_zero(&e, 1100, 200));

	/* CREATE empties the disk. */
	qsm_io_close(e.io);
	ck_assert_int_eq(qsm_io_open_sim(e.base, e.sim, QSM_IO_CREATE, &e.io), 0);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 0);
	/* One handle at a time. */
	struct qsm_io *second;
	ck_assert_int_eq(qsm_io_open_sim(e.base, e.sim, 0, &second), -EBUSY);
	env_close(&e);
}
END_TEST

/* --- Sim: faults and races ------------------------------------------------------------------ */

START_TEST(test_sim_faults)
{
	struct env e;
	uint8_t a[512];
	fill_pattern(a, sizeof(a), 2);
	env_open(&e, B_SIM, 0, 3);

	qsm_sim_fault_add(e.sim, QSM_IO_EV_L2_UPDATE, EIO, true);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 4096, 512, a, QSM_IO_EV_L2_UPDATE), -EIO);
	ck_assert(sim_zero(&e, 4096, 512)); /* a failed write changes nothing */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 4096, 512, a, QSM_IO_EV_L2_UPDATE), 0);
	ck_assert(sim_holds(&e, 4096, a, 512));
	ck_assert_uint_eq(qsm_sim_faults_fired(e.sim), 1);

	qsm_sim_fault_add(e.sim, QSM_IO_EV_FLUSH, ENOSPC, false);
	qsm_sim_fault_add(e.sim, QSM_IO_EV_L2_LOAD, EIO, false);
	for (int i = 0; i < 3; i++) {
		ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), -ENOSPC);
		uint8_t buf[512];
		ck_assert_int_eq(do_op(&e, QSM_IO_READ, 0, 512, buf, QSM_IO_EV_L2_LOAD), -EIO);
	}
	ck_assert_uint_eq(qsm_sim_faults_fired(e.sim), 7);
	ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 2); /* failed flushes flushed nothing */
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 0);

	qsm_sim_fault_clear(e.sim);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_FLUSH), 0);
	ck_assert_uint_eq(qsm_sim_faults_fired(e.sim), 7);
	env_close(&e);
}
END_TEST

START_TEST(test_sim_races)
{
	struct env e;
	uint8_t a[4096], b[4096];
	env_open(&e, B_SIM, 0, 4);
	struct treq w = { 0 }, r = { 0 }, r2 = { 0 };

	/* Disjoint: no race. */
	treq_set(&w, QSM_IO_WRITE, 0, 4096, a, QSM_IO_EV_NONE);
	treq_set(&r, QSM_IO_READ, 4096, 4096, b, QSM_IO_EV_NONE);
	submit(e.io, &w);
	submit(e.io, &r);
	env_drain(&e);
	ck_assert_uint_eq(qsm_sim_races(e.sim), 0);

	/* Read submitted while an overlapping write is in flight. */
	treq_set(&w, QSM_IO_WRITE, 0, 4096, a, QSM_IO_EV_NONE);
	treq_set(&r, QSM_IO_READ, 4095, 10, b, QSM_IO_EV_NONE);
	submit(e.io, &w);
	submit(e.io, &r);
	env_drain(&e);
	ck_assert_uint_eq(qsm_sim_races(e.sim), 1);

	/* Write submitted over two in-flight reads: one race per read. */
	treq_set(&r, QSM_IO_READ, 0, 100, b, QSM_IO_EV_NONE);
	treq_set(&r2, QSM_IO_READ, 200, 100, b + 200, QSM_IO_EV_NONE);
	treq_set(&w, QSM_IO_ZERO, 50, 200, NULL, QSM_IO_EV_NONE);
	submit(e.io, &r);
	submit(e.io, &r2);
	submit(e.io, &w);
	env_drain(&e);
	ck_assert_uint_eq(qsm_sim_races(e.sim), 3);
	env_close(&e);
}
END_TEST

START_TEST(test_sim_save_load)
{
	struct env e;
	char path[PATH_MAX];
	uint8_t a[5000];
	const uint64_t far = 8ull << 30; /* 8 GiB: must stay sparse and cheap */
	fill_pattern(a, sizeof(a), 6);
	snprintf(path, sizeof(path), "%s/qsm-test-io-%d-sim.img", test_dir(), (int)getpid());

	env_open(&e, B_SIM, 0, 1);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 70000, sizeof(a), a, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, far, sizeof(a), a, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(qsm_sim_save_file(e.sim, path), 0); /* the view, unflushed too */
	env_close(&e);

	struct stat st;
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_uint_eq((uint64_t)st.st_size, far + sizeof(a));
	ck_assert_uint_lt((uint64_t)st.st_blocks * 512, 4 * MiB);

	env_open(&e, B_SIM, 0, 2);
	ck_assert_int_eq(qsm_sim_load_file(e.sim, path), 0);
	qsm_sim_crash(e.sim, 0, false); /* loaded data is durable */
	sim_reopen(&e);
	uint64_t size;
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, far + sizeof(a));
	ck_assert(sim_holds(&e, 70000, a, 4096));
	ck_assert(sim_holds(&e, far + 904, a + 904, 4096));
	ck_assert(sim_zero(&e, 0, 4096));
	ck_assert(sim_zero(&e, far - 4096, 4096));
	/* Truncating the huge sparse disk down is cheap too. */
	ck_assert_int_eq(do_op(&e, QSM_IO_TRUNCATE, 72000, 0, NULL, QSM_IO_EV_NONE), 0);
	ck_assert(sim_holds(&e, 70000, a, 2000));
	ck_assert(sim_zero(&e, 72000, 3000));
	ck_assert_int_eq(qsm_sim_load_file(e.sim, "/nonexistent/qsm"), -ENOENT);
	env_close(&e);
	unlink(path);
}
END_TEST

START_TEST(test_sim_load_buf)
{
	struct env e;
	enum { LEN = 3 * 65536 + 777 };
	uint8_t *img = calloc(1, LEN);
	fill_pattern(img + 100, 5000, 7);          /* chunk 0 */
	fill_pattern(img + 2 * 65536 + 10, 4000, 8); /* chunk 2; chunk 1 stays zero */
	img[LEN - 1] = 0x5a;                       /* the short last chunk */

	env_open(&e, B_SIM, 0, 1);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 4096, img + 100, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(qsm_sim_load_buf(e.sim, img, LEN), 0); /* replaces everything */
	ck_assert_uint_eq(qsm_sim_unflushed(e.sim), 0);
	uint64_t size;
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, LEN);
	qsm_sim_crash(e.sim, 0, false); /* loaded data is durable */
	sim_reopen(&e);
	ck_assert(sim_holds(&e, 0, img, 4096));
	ck_assert(sim_holds(&e, 4096, img + 4096, 4096));
	ck_assert(sim_zero(&e, 65536, 4096));
	ck_assert(sim_holds(&e, 2 * 65536, img + 2 * 65536, 4096));
	ck_assert(sim_holds(&e, LEN - 1, img + LEN - 1, 1));
	ck_assert(sim_zero(&e, LEN, 512)); /* past the end */
	ck_assert_int_eq(qsm_sim_load_buf(e.sim, NULL, 0), 0);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, 0);
	env_close(&e);
	free(img);
}
END_TEST

START_TEST(test_sim_max_size)
{
	struct env e;
	uint8_t a[512];
	uint64_t size;
	fill_pattern(a, sizeof(a), 9);

	env_open(&e, B_SIM, 0, 1);
	qsm_sim_set_max_size(e.sim, MiB);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, MiB - 512, 512, a, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, MiB - 256, 512, a, QSM_IO_EV_NONE), -EFBIG);
	ck_assert_int_eq(do_op(&e, QSM_IO_ZERO, MiB, 512, NULL, QSM_IO_EV_NONE), -EFBIG);
	ck_assert_int_eq(do_op(&e, QSM_IO_PREALLOC, 0, 2 * MiB, NULL, QSM_IO_EV_NONE), -EFBIG);
	ck_assert_int_eq(do_op(&e, QSM_IO_TRUNCATE, MiB + 512, 0, NULL, QSM_IO_EV_NONE), -EFBIG);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, a, 512, MiB), -EFBIG);
	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 2 * MiB), -EFBIG);
	ck_assert_int_eq(qsm_io_get_size(e.io, &size), 0);
	ck_assert_uint_eq(size, MiB); /* nothing changed */
	ck_assert(sim_holds(&e, MiB - 512, a, 512));
	/* Discards never grow; shrinking and writing inside are fine. */
	ck_assert_int_eq(do_op(&e, QSM_IO_DISCARD, MiB - 512, 4096, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 4096), 0);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, a, 512, 8192), 0);
	qsm_sim_set_max_size(e.sim, 0); /* no limit again */
	ck_assert_int_eq(qsm_io_truncate_sync(e.io, 4 * MiB), 0);
	env_close(&e);
}
END_TEST

/* A chooser replaying a script of picks, then always the oldest. */
struct script {
	const uint8_t *picks;
	size_t n, used;
	uint64_t calls;
};

static uint64_t script_choose(void *opaque, uint64_t n)
{
	struct script *s = opaque;
	s->calls++;
	ck_assert_uint_ge(n, 1);
	return s->used < s->n ? s->picks[s->used++] : 0;
}

static void sim_run_chooser(struct script *sc, unsigned max_batch, int nreq, int *order)
{
	struct env e;
	env_open(&e, B_SIM, 0, 99);
	qsm_sim_set_max_batch(e.sim, max_batch);
	qsm_sim_set_chooser(e.sim, script_choose, sc);
	struct treq *t = calloc((size_t)nreq, sizeof(*t));
	uint8_t(*bufs)[512] = calloc((size_t)nreq, 512);
	order[0] = 0;
	for (int i = 0; i < nreq; i++) {
		treq_set(&t[i], QSM_IO_WRITE, (uint64_t)i * 512, 512, bufs[i], QSM_IO_EV_NONE);
		t[i].on_done = record_order;
		t[i].opaque = order;
		t[i].idx = i;
		submit(e.io, &t[i]);
	}
	env_drain(&e);
	ck_assert_int_eq(order[0], nreq);
	free(t);
	free(bufs);
	env_close(&e);
}

START_TEST(test_sim_chooser)
{
	enum { N = 6 };
	int order[N + 1];
	/* No script: every choice 0, so one completion per pass, oldest first. */
	struct script sc = { 0 };
	sim_run_chooser(&sc, 4, N, order);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(order[1 + i], i);
	ck_assert_uint_eq(sc.calls, 2 * N); /* a count and a pick per pass */

	/* max_batch 1: the count is still asked (n = 1), the picks follow the
	 * script modulo the pending count: 5 of 6 -> 5, 9 % 5 -> 4, 2, ... */
	static const uint8_t picks[] = { 0, 5, 0, 9, 0, 2 };
	sc = (struct script){ .picks = picks, .n = sizeof(picks) };
	sim_run_chooser(&sc, 1, N, order);
	static const int want[N] = { 5, 4, 2, 0, 1, 3 };
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(order[1 + i], want[i]);

	/* The same script replays the same order; the PRNG is not drawn. */
	int again[N + 1];
	sc = (struct script){ .picks = picks, .n = sizeof(picks) };
	sim_run_chooser(&sc, 1, N, again);
	ck_assert_mem_eq(order, again, sizeof(order));
}
END_TEST

/* --- The null backend (io/null.c) ------------------------------------------------------------ */

/* The null device's contract: its size, writes that change nothing, reads
 * of zeros or of the caller's buffer as it was, truncate refused, and no
 * completion from inside submit. */
START_TEST(test_null_contents)
{
	bool zeroes = _i;
	struct event_base *base = event_base_new();
	struct qsm_io *io;
	uint8_t buf[8192];
	uint64_t size;
	struct treq t[6] = { 0 };

	ck_assert_ptr_nonnull(base);
	ck_assert_int_eq(qsm_io_open_null(base, 3 * MiB, zeroes, 0, 0, &io), 0);
	ck_assert_int_eq(qsm_io_get_size(io, &size), 0);
	ck_assert_uint_eq(size, 3 * MiB);
	memset(buf, 0xab, sizeof(buf));
	treq_set(&t[0], QSM_IO_WRITE, 0, 4096, buf, QSM_IO_EV_NONE);
	treq_set(&t[1], QSM_IO_ZERO, 4096, 4096, NULL, QSM_IO_EV_NONE);
	treq_set(&t[2], QSM_IO_DISCARD, 0, 65536, NULL, QSM_IO_EV_NONE);
	treq_set(&t[3], QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_NONE);
	treq_set(&t[4], QSM_IO_READ, 0, sizeof(buf), buf, QSM_IO_EV_NONE);
	treq_set(&t[5], QSM_IO_TRUNCATE, MiB, 0, NULL, QSM_IO_EV_NONE);
	g_inline = 0;
	for (int i = 0; i < 6; i++) {
		submit(io, &t[i]);
		ck_assert_int_eq(t[i].done, 0); /* contract 1 */
	}
	while (io->stats.in_flight > 0)
		event_base_loop(base, EVLOOP_ONCE);
	for (int i = 0; i < 5; i++)
		ck_assert_int_eq(t[i].ret, 0);
	ck_assert_int_eq(t[5].ret, -ENOTSUP);
	ck_assert_uint_eq(g_inline, 0);
	for (size_t i = 0; i < sizeof(buf); i++)
		ck_assert_uint_eq(buf[i], zeroes ? 0 : 0xab);
	/* The blocking calls say the same. */
	memset(buf, 0xcd, sizeof(buf));
	ck_assert_int_eq(qsm_io_pwrite_sync(io, buf, 512, 0), 0);
	ck_assert_int_eq(qsm_io_pread_sync(io, buf, 512, 0), 0);
	ck_assert_uint_eq(buf[0], zeroes ? 0 : 0xcd);
	ck_assert_int_eq(qsm_io_truncate_sync(io, MiB), -ENOTSUP);
	ck_assert_int_eq(qsm_io_get_size(io, &size), 0);
	ck_assert_uint_eq(size, 3 * MiB);
	qsm_io_close(io);
	event_base_free(base);
}
END_TEST

/* latency-ns: every request completes no sooner than the latency after its
 * submission, in submission order; requests submitted together complete
 * together (one wait, not one per request). */
static uint64_t g_null_done_ns[16];
static int g_null_order[16], g_null_n;

static void null_done(struct treq *t)
{
	g_null_done_ns[t->idx] = qsm_now_ns();
	g_null_order[g_null_n++] = t->idx;
}

START_TEST(test_null_latency)
{
	const uint64_t lat = 20ull * 1000 * 1000; /* 20 ms */
	struct event_base *base = event_base_new();
	struct qsm_io *io;
	uint8_t buf[512];
	struct treq t[16] = { 0 };
	uint64_t t0;

	ck_assert_int_eq(qsm_io_open_null(base, MiB, true, lat, 0, &io), 0);
	g_null_n = 0;
	t0 = qsm_now_ns();
	for (int i = 0; i < 16; i++) {
		treq_set(&t[i], i % 2 ? QSM_IO_WRITE : QSM_IO_READ, (uint64_t)i * 512, 512, buf,
			 QSM_IO_EV_NONE);
		t[i].idx = i;
		t[i].on_done = null_done;
		submit(io, &t[i]);
		ck_assert_int_eq(t[i].done, 0);
	}
	while (io->stats.in_flight > 0)
		event_base_loop(base, EVLOOP_ONCE);
	uint64_t total = qsm_now_ns() - t0;
	ck_assert_int_eq(g_null_n, 16);
	for (int i = 0; i < 16; i++) {
		ck_assert_int_eq(t[i].ret, 0);
		ck_assert_int_eq(g_null_order[i], i);
		ck_assert_uint_ge(g_null_done_ns[i] - t0, lat - 2000000); /* timer granularity */
	}
	/* Submitted together, they waited together: far less than 16 x lat. */
	ck_assert_msg(total < 8 * lat, "16 requests took %llu ns", (unsigned long long)total);
	qsm_io_close(io);
	event_base_free(base);
}
END_TEST

/* A read-only null handle refuses writes before they reach it. */
START_TEST(test_null_rdonly)
{
	struct event_base *base = event_base_new();
	struct qsm_io *io;
	uint8_t buf[512] = { 0 };
	struct treq t = { 0 };

	ck_assert_int_eq(qsm_io_open_null(base, MiB, false, 0, QSM_IO_RDONLY, &io), 0);
	treq_set(&t, QSM_IO_WRITE, 0, 512, buf, QSM_IO_EV_NONE);
	submit(io, &t);
	while (io->stats.in_flight > 0)
		event_base_loop(base, EVLOOP_ONCE);
	ck_assert_int_eq(t.done, 1);
	ck_assert_int_lt(t.ret, 0);
	qsm_io_close(io);
	event_base_free(base);
}
END_TEST

/* --- Suite ------------------------------------------------------------------------------------- */

/* A loop test over the backends: threads and sim in tc, io_uring in tu. */
#define ADD_BACKENDS(tc, tu, fn)                                               \
	do {                                                                   \
		tcase_add_loop_test(tc, fn, B_THREADS, B_THREADS + 1);        \
		tcase_add_loop_test(tu, fn, B_URING, B_URING + 1);            \
		tcase_add_loop_test(tc, fn, B_SIM, B_SIM + 1);                \
	} while (0)


/* --- blkdebug (io/blkdebug.h) over the sim disk ----------------------------------------------- */

static int g_bd_suspended, g_bd_resumed;
static void bd_note(void *opaque, const char *tag, bool resumed)
{
	(void)opaque;
	(void)tag;
	if (resumed)
		g_bd_resumed++;
	else
		g_bd_suspended++;
}

/* Wrap e->io in a blkdebug handle with the options (key, value pairs). */
static void bd_wrap(struct env *e, const char *const *kv)
{
	struct qsm_blkdebug *bd = qsm_blkdebug_new();
	char err[256] = "";
	ck_assert_ptr_nonnull(bd);
	for (; kv && kv[0]; kv += 2)
		ck_assert_msg(qsm_blkdebug_set_opt(bd, kv[0], kv[1], err, sizeof(err)) == 0, "%s=%s: %s",
			      kv[0], kv[1], err);
	ck_assert_int_eq(qsm_blkdebug_finish(bd, err, sizeof(err)), 0);
	qsm_blkdebug_set_notify(bd, bd_note, NULL);
	struct qsm_io *w;
	ck_assert_int_eq(qsm_io_blkdebug_wrap(e->io, bd, &w), 0);
	e->io = w;
	g_bd_suspended = g_bd_resumed = 0;
}

START_TEST(test_blkdebug_events)
{
	enum qsm_io_event ev;
	ck_assert_int_eq(qsm_blkdebug_event_parse("l2_update", &ev), 0);
	ck_assert_int_eq(ev, QSM_IO_EV_L2_UPDATE);
	ck_assert_int_eq(qsm_blkdebug_event_parse("write_aio", &ev), 0);
	ck_assert_int_eq(ev, QSM_IO_EV_DATA_WRITE);
	ck_assert_int_eq(qsm_blkdebug_event_parse("refblock_alloc_hookup", &ev), 0);
	ck_assert_int_eq(ev, QSM_IO_EV_REFTABLE_UPDATE);
	ck_assert_int_eq(qsm_blkdebug_event_parse("cluster_alloc", &ev), 0);
	ck_assert_int_eq(ev, QSM_IO_EV_CLUSTER_ALLOC);
	ck_assert_int_eq(qsm_blkdebug_event_parse("cluster_alloc_bytes", &ev), -ENOTSUP);
	ck_assert_int_eq(qsm_blkdebug_event_parse("l1_grow_alloc_table", &ev), -ENOTSUP);
	ck_assert_int_eq(qsm_blkdebug_event_parse("l2_alloc.write", &ev), -ENOENT); /* pre-QAPI */
	ck_assert_int_eq(qsm_blkdebug_event_parse("bogus", &ev), -ENOENT);

	struct qsm_blkdebug *bd = qsm_blkdebug_new();
	char err[256];
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "inject-error.0.event", "bogus", err, sizeof(err)),
			 -EINVAL);
	ck_assert_str_eq(err, "invalid parameter value: bogus");
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "inject-error.0.event", "cluster_free", err,
					      sizeof(err)), -ENOTSUP);
	ck_assert_ptr_nonnull(strstr(err, "'cluster_free' is not supported by qsm"));
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "inject-error.1.once", "maybe", err, sizeof(err)),
			 -EINVAL);
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "set-state.0.errno", "5", err, sizeof(err)), -EINVAL);
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "inject-error.2.errno", "5", err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_blkdebug_finish(bd, err, sizeof(err)), -EINVAL); /* rule 2: no event */
	ck_assert_str_eq(err, "Missing event name for rule");
	qsm_blkdebug_free(bd);
}
END_TEST

/* The operations the wrapped handle saw (its trace hook, at submit). */
struct bd_rec {
	int n;
	struct { enum qsm_io_op op; uint64_t off, len; } a[64];
};
static void bd_rec_trace(void *opaque, const struct qsm_io_req *req, bool done, int ret)
{
	struct bd_rec *r = opaque;
	(void)ret;
	if (done || r->n == 64)
		return;
	r->a[r->n].op = req->op;
	r->a[r->n].off = req->offset;
	r->a[r->n].len = req->len;
	r->n++;
}
/* Expect exactly the listed (op, offset, length) triples, then reset. */
static void bd_rec_expect(struct bd_rec *r, const uint64_t (*want)[3], int n, const char *what)
{
	for (int i = 0; i < n && i < r->n; i++)
		ck_assert_msg(r->a[i].op == (enum qsm_io_op)want[i][0] && r->a[i].off == want[i][1] &&
			      r->a[i].len == want[i][2],
			      "%s: operation %d is %s %" PRIu64 "+%" PRIu64 ", expected %s %" PRIu64
			      "+%" PRIu64, what, i, qsm_io_op_name(r->a[i].op), r->a[i].off,
			      r->a[i].len, qsm_io_op_name((enum qsm_io_op)want[i][0]), want[i][1],
			      want[i][2]);
	ck_assert_msg(r->n == n, "%s: %d operations, expected %d", what, r->n, n);
	r->n = 0;
}
#define R QSM_IO_READ
#define W QSM_IO_WRITE
#define Z QSM_IO_ZERO
#define D QSM_IO_DISCARD

/* align, max-transfer, opt/max-write-zero, opt/max-discard: the requests
 * reaching the wrapped disk are QEMU's block layer's for a blkdebug node
 * with those limits (block/io.c: padding and read-modify-write, splitting,
 * zero-write fallback, discard cutting); the data is what it would be
 * without them. */
START_TEST(test_blkdebug_limits)
{
	struct env e;
	static uint8_t a[32768], b[32768], base[32768];
	struct bd_rec rec = { 0 };
	fill_pattern(a, sizeof(a), 31);
	fill_pattern(base, sizeof(base), 32);
	env_open(&e, B_SIM, 0, 33);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, sizeof(base), base, QSM_IO_EV_NONE), 0);
	e.io->trace = bd_rec_trace;
	e.io->trace_opaque = &rec;
	static const char *const kv[] = {
		"align", "4k", "max-transfer", "8192", "opt-write-zero", "8192",
		"max-write-zero", "16384", "opt-discard", "8k", NULL
	};
	bd_wrap(&e, kv);

	/* Inside one block: one merged read, one write of the block. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 5000, 100, a, QSM_IO_EV_DATA_WRITE), 0);
	static const uint64_t w1[][3] = { { R, 4096, 4096 }, { W, 4096, 4096 } };
	bd_rec_expect(&rec, w1, 2, "write 5000+100");
	/* Head and tail blocks apart: two reads; the write split at 8k. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 3000, 10000, a, QSM_IO_EV_DATA_WRITE), 0);
	static const uint64_t w2[][3] = {
		{ R, 0, 4096 }, { R, 12288, 4096 }, { W, 0, 8192 }, { W, 8192, 8192 }
	};
	bd_rec_expect(&rec, w2, 4, "write 3000+10000");
	/* Two adjacent blocks: one merged read of both. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 2048, 4096, a, QSM_IO_EV_DATA_WRITE), 0);
	static const uint64_t w3[][3] = { { R, 0, 8192 }, { W, 0, 8192 } };
	bd_rec_expect(&rec, w3, 2, "write 2048+4096");
	/* The data: the last write's, over the others', over the base. */
	memcpy(b, base, sizeof(b));
	memcpy(b + 5000, a, 100);
	memcpy(b + 3000, a, 10000);
	memcpy(b + 2048, a, 4096);
	static uint8_t got[32768];
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 100, 20000, got, QSM_IO_EV_DATA_READ), 0);
	ck_assert(memcmp(got, b + 100, 20000) == 0);
	static const uint64_t r1[][3] = { { R, 0, 8192 }, { R, 8192, 8192 }, { R, 16384, 4096 } };
	bd_rec_expect(&rec, r1, 3, "read 100+20000");

	/* Zero write, unaligned both ends: the head block read and written
	 * with zeros in it; the aligned middle cut at opt-write-zero (a piece
	 * below it falls back to writing zeros), max-write-zero; the tail
	 * block read and written. */
	ck_assert_int_eq(do_op(&e, QSM_IO_ZERO, 1000, 30000, NULL, QSM_IO_EV_NONE), 0);
	static const uint64_t z1[][3] = {
		{ R, 0, 4096 }, { R, 28672, 4096 }, { W, 0, 4096 },
		{ W, 4096, 4096 }, { Z, 8192, 16384 }, { W, 24576, 4096 }, { W, 28672, 4096 }
	};
	bd_rec_expect(&rec, z1, 7, "zero 1000+30000");
	memset(b + 1000, 0, 30000);
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 0, 32768, got, QSM_IO_EV_NONE), 0);
	ck_assert(memcmp(got, b, 32768) == 0);
	rec.n = 0;

	/* Discard: cut at opt-discard; pieces below align are dropped. */
	ck_assert_int_eq(do_op(&e, QSM_IO_DISCARD, 1000, 29000, NULL, QSM_IO_EV_NONE), 0);
	static const uint64_t d1[][3] = { { D, 4096, 4096 }, { D, 8192, 16384 }, { D, 24576, 4096 } };
	bd_rec_expect(&rec, d1, 3, "discard 1000+29000");

	/* Blocking calls take the same path (the trace hook sees only
	 * asynchronous operations: the data shows the read-modify-write). */
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, base, 8192, 65536), 0);
	ck_assert_int_eq(qsm_io_pwrite_sync(e.io, a, 100, 70000), 0);
	ck_assert_int_eq(qsm_io_pread_sync(e.io, got, 8192, 65536), 0);
	memcpy(b, base, 8192);
	memcpy(b + 70000 - 65536, a, 100);
	ck_assert(memcmp(got, b, 8192) == 0);
	env_close(&e);
}
END_TEST
#undef R
#undef W
#undef Z
#undef D

/* Rules see each piece: iotype picks the kind (a write's read-modify-write
 * read fails with iotype=read), sector the piece; the node's own events
 * (pwritev, pwritev_rmw_*) move the state and hold requests. */
START_TEST(test_blkdebug_pieces)
{
	struct env e;
	uint8_t a[8192];
	fill_pattern(a, sizeof(a), 41);
	env_open(&e, B_SIM, 0, 42);
	static const char *const kv[] = {
		"align", "4096", "inject-error.0.event", "write_aio", "inject-error.0.iotype", "read",
		"inject-error.0.once", "on",
		"set-state.0.event", "pwritev", "set-state.0.state", "1", "set-state.0.new_state", "2",
		"inject-error.1.event", "pwritev_done", "inject-error.1.state", "2",
		"inject-error.1.sector", "24", "inject-error.1.iotype", "write", NULL
	};
	bd_wrap(&e, kv);
	/* Aligned: no read, the read-only rule does not fire. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 4096, a, QSM_IO_EV_DATA_WRITE), 0);
	/* Unaligned: its RMW read fails, nothing is written. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 4096 + 10, 10, a, QSM_IO_EV_DATA_WRITE), -EIO);
	ck_assert(sim_zero(&e, 4096, 512));
	/* pwritev moved the state to 2; pwritev_done armed rule 1 for
	 * sector 24 (12k): a write over 12k fails, one elsewhere does not. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 8192, 4096, a, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 12288 + 100, 8, a, QSM_IO_EV_NONE), -EIO);

	/* A breakpoint on a node event holds the operation mid-way. */
	ck_assert_int_eq(qsm_io_blkdebug_break(e.io, "pwritev_rmw_after_head", "A"), 0);
	struct treq t = { 0 };
	treq_set(&t, QSM_IO_WRITE, 16384 + 1, 100, a, QSM_IO_EV_NONE);
	submit(e.io, &t);
	for (int i = 0; i < 10; i++)
		event_base_loop(e.base, EVLOOP_NONBLOCK);
	ck_assert(qsm_io_blkdebug_is_suspended(e.io, "A"));
	ck_assert_int_eq(t.done, 0);
	ck_assert_int_eq(qsm_io_blkdebug_resume(e.io, "A"), 0);
	env_drain(&e);
	ck_assert_int_eq(t.done, 1);
	ck_assert_int_eq(t.ret, 0);
	ck_assert(sim_holds(&e, 16385, a, 100));

	/* Option checks, QEMU's words. */
	struct qsm_blkdebug *bd = qsm_blkdebug_new();
	char err[512];
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "align", "4k", err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "max-transfer", "6k", err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_blkdebug_check_limits(bd, 1, err, sizeof(err)), -EINVAL);
	ck_assert_str_eq(err, "Cannot meet constraints with max-transfer 6144");
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "max-transfer", "1.5M", err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_blkdebug_check_limits(bd, 1, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "align", "3000", err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_blkdebug_check_limits(bd, 1, err, sizeof(err)), -EINVAL);
	ck_assert_str_eq(err, "Cannot meet constraints with align 3000");
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "max-discard", "x", err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "Parameter 'max-discard' expects a non-negative number"));
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "inject-error.0.iotype", "bogus", err,
					      sizeof(err)), -EINVAL);
	ck_assert_str_eq(err, "invalid parameter value: bogus");
	ck_assert_int_eq(qsm_blkdebug_set_opt(bd, "inject-error.0.offset", "1", err, sizeof(err)),
			 -EINVAL);
	ck_assert_str_eq(err, "[inject-error] section doesn't support the option 'offset'");
	qsm_blkdebug_free(bd);
	env_close(&e);
}
END_TEST

/* An event arms its rule; the armed rule fails what follows (QEMU's active
 * list), once on removes it, sector limits it, and nothing failed is done. */
START_TEST(test_blkdebug_inject)
{
	struct env e;
	uint8_t a[512], b[512];
	fill_pattern(a, sizeof(a), 4);
	env_open(&e, B_SIM, 0, 5);
	static const char *const kv[] = {
		"inject-error.0.event", "l2_update", "inject-error.0.errno", "28",
		"inject-error.0.once", "on", "inject-error.1.event", "l2_load",
		"inject-error.1.sector", "8", "inject-error.1.immediately", "on", NULL
	};
	bd_wrap(&e, kv);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 4096, 512, a, QSM_IO_EV_L2_UPDATE), -ENOSPC);
	ck_assert(sim_zero(&e, 4096, 512)); /* not done */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 4096, 512, a, QSM_IO_EV_L2_UPDATE), 0);
	ck_assert(sim_holds(&e, 4096, a, 512));
	/* l2_load armed, for sector 8 only: other ranges and flushes pass. */
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 0, 512, b, QSM_IO_EV_L2_LOAD), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_FLUSH, 0, 0, NULL, QSM_IO_EV_NONE), 0);
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 4096, 512, b, QSM_IO_EV_NONE), -EIO);
	ck_assert_int_eq(do_op(&e, QSM_IO_READ, 4096, 512, b, QSM_IO_EV_NONE), -EIO); /* once off */
	/* Blocking reads raise their event too. */
	ck_assert_int_eq(qsm_io_pread_sync_ev(e.io, b, 512, 4096, QSM_IO_EV_L2_LOAD), -EIO);
	env_close(&e);
}
END_TEST

/* set-state: rules of one event see the state before it; state-gated rules. */
START_TEST(test_blkdebug_state)
{
	struct env e;
	uint8_t a[512];
	fill_pattern(a, sizeof(a), 6);
	env_open(&e, B_SIM, 0, 7);
	static const char *const kv[] = {
		"set-state.0.event", "write_aio", "set-state.0.state", "1", "set-state.0.new_state", "2",
		"inject-error.0.event", "write_aio", "inject-error.0.state", "2",
		"inject-error.0.once", "on", NULL
	};
	bd_wrap(&e, kv);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0); /* 1 -> 2 */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), -EIO);
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0);
	env_close(&e);
}
END_TEST

/* Breakpoints: held before the wrapped disk sees it, resumed by tag,
 * removed when fired; hold() for the request machines. */
START_TEST(test_blkdebug_break)
{
	struct env e;
	uint8_t a[512];
	fill_pattern(a, sizeof(a), 8);
	env_open(&e, B_SIM, 0, 9);
	struct qsm_io *plain = e.io;
	ck_assert_int_eq(qsm_io_blkdebug_break(plain, "write_aio", "A"), -ENOTSUP);
	bd_wrap(&e, NULL);
	ck_assert_int_eq(qsm_io_blkdebug_break(e.io, "bogus", "A"), -ENOENT);
	ck_assert_int_eq(qsm_io_blkdebug_break(e.io, "write_aio", "A"), 0);
	struct treq t = { 0 };
	treq_set(&t, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE);
	submit(e.io, &t);
	for (int i = 0; i < 10; i++)
		event_base_loop(e.base, EVLOOP_NONBLOCK);
	ck_assert_int_eq(t.done, 0);
	ck_assert(qsm_io_blkdebug_is_suspended(e.io, "A"));
	ck_assert_int_eq(g_bd_suspended, 1);
	ck_assert_int_eq(qsm_io_blkdebug_resume(e.io, "B"), -ENOENT);
	ck_assert_int_eq(qsm_io_blkdebug_resume(e.io, "A"), 0);
	ck_assert_int_eq(g_bd_resumed, 1);
	env_drain(&e);
	ck_assert_int_eq(t.done, 1);
	ck_assert_int_eq(t.ret, 0);
	ck_assert(sim_holds(&e, 0, a, 512));
	/* Fired once: the next write passes. */
	ck_assert_int_eq(do_op(&e, QSM_IO_WRITE, 0, 512, a, QSM_IO_EV_DATA_WRITE), 0);
	ck_assert_int_eq(qsm_io_blkdebug_remove_break(e.io, "A"), -ENOENT);
	ck_assert_int_eq(qsm_io_blkdebug_break(e.io, "cow_read", "C"), 0);
	ck_assert_int_eq(qsm_io_blkdebug_remove_break(e.io, "C"), 0);

	/* hold(): the caller submits after resumed() and the breakpoint does
	 * not fire again for it. */
	ck_assert_int_eq(qsm_io_blkdebug_break(e.io, "write_aio", "H"), 0);
	ck_assert_int_eq(qsm_io_blkdebug_break(e.io, "write_aio", "H2"), 0);
	treq_set(&t, QSM_IO_WRITE, 512, 512, a, QSM_IO_EV_DATA_WRITE);
	ck_assert(qsm_io_blkdebug_hold(e.io, &t.req, treq_cb));
	ck_assert_int_eq(g_bd_suspended, 3); /* both tags fired */
	ck_assert_int_eq(qsm_io_blkdebug_resume(e.io, "H"), 0);
	ck_assert_int_eq(t.done, 0); /* H2 still holds it */
	ck_assert_int_eq(qsm_io_blkdebug_resume(e.io, "H2"), 0);
	ck_assert_int_eq(t.done, 1);
	t.done = 0;
	submit(e.io, &t);
	env_drain(&e);
	ck_assert_int_eq(t.done, 1);
	ck_assert_int_eq(t.ret, 0);
	ck_assert(!qsm_io_blkdebug_hold(plain, &t.req, treq_cb));
	env_close(&e);
}
END_TEST

static Suite *io_suite(void)
{
	Suite *s = suite_create("io");
	TCase *tc = tcase_create("backends");
	TCase *tu = tcase_create("backends_uring");
	TCase *tt = tcase_create("tmpfs");
	QSM_TCASE_REQUIRES(tu, "uring");
	QSM_TCASE_REQUIRES(tt, "tmpfs");
	tcase_set_timeout(tc, 300);
	tcase_set_timeout(tu, 300);
	tcase_set_timeout(tt, 300);
	ADD_BACKENDS(tc, tu, test_random_rw);
	ADD_BACKENDS(tc, tu, test_eof_zero_fill);
	ADD_BACKENDS(tc, tu, test_zero_discard);
	tcase_add_loop_test(tt, test_zero_fallback_tmpfs, B_THREADS, B_THREADS + 1);
	tcase_add_loop_test(tu, test_zero_fallback_tmpfs, B_URING, B_URING + 1);
	ADD_BACKENDS(tc, tu, test_truncate);
	ADD_BACKENDS(tc, tu, test_flush);
	ADD_BACKENDS(tc, tu, test_flush_elided);
	tcase_add_loop_test(tc, test_direct_misaligned, 0, 1); /* threads */
	tcase_add_loop_test(tu, test_direct_misaligned, 1, 2); /* io_uring */
	tcase_add_loop_test(tc, test_direct_abandon_bounces, 0, 1);
	tcase_add_loop_test(tu, test_direct_abandon_bounces, 1, 2);
	tcase_add_loop_test(tc, test_direct_whole_blocks_overlap, 0, 1);
	tcase_add_loop_test(tu, test_direct_whole_blocks_overlap, 1, 2);
	tcase_add_test(tt, test_direct_tmpfs_refused);
	ADD_BACKENDS(tc, tu, test_invalid_requests);
	ADD_BACKENDS(tc, tu, test_never_inline);
	ADD_BACKENDS(tc, tu, test_rdonly);
	tcase_add_test(tc, test_open_path);
	ADD_BACKENDS(tc, tu, test_trace_and_stats);
	ADD_BACKENDS(tc, tu, test_close_in_callback);
	ADD_BACKENDS(tc, tu, test_overflow_and_big_iov);
	suite_add_tcase(s, tc);
	suite_add_tcase(s, tu);
	suite_add_tcase(s, tt);

	TCase *sim = tcase_create("sim");
	tcase_set_timeout(sim, 300);
	tcase_add_test(sim, test_sim_random_rw_seeds);
	tcase_add_test(sim, test_sim_reorders);
	tcase_add_test(sim, test_sim_replay);
	tcase_add_test(sim, test_sim_durability);
	tcase_add_test(sim, test_sim_keep_mask);
	tcase_add_test(sim, test_sim_crash_in_flight);
	tcase_add_test(sim, test_sim_crash_random);
	tcase_add_test(sim, test_sim_sync_helpers);
	tcase_add_test(sim, test_sim_faults);
	tcase_add_test(sim, test_sim_races);
	tcase_add_test(sim, test_sim_save_load);
	tcase_add_test(sim, test_sim_load_buf);
	tcase_add_test(sim, test_sim_chooser);
	tcase_add_test(sim, test_sim_max_size);
	tcase_add_test(sim, test_blkdebug_events);
	tcase_add_test(sim, test_blkdebug_inject);
	tcase_add_test(sim, test_blkdebug_state);
	tcase_add_test(sim, test_blkdebug_break);
	tcase_add_test(sim, test_blkdebug_limits);
	tcase_add_test(sim, test_blkdebug_pieces);
	suite_add_tcase(s, sim);

	TCase *nul = tcase_create("null");
	tcase_add_loop_test(nul, test_null_contents, 0, 2); /* read-zeroes off, on */
	tcase_add_test(nul, test_null_latency);
	tcase_add_test(nul, test_null_rdonly);
	suite_add_tcase(s, nul);
	return s;
}

int main(void)
{
	return qsm_test_run(io_suite());
}
