/*
 * tests/fuzz/fuzz_sched.c: libFuzzer target, request orderings and crashes.
 *
 * The input bytes are decoded (past the end, every byte reads as 0) into:
 *   byte 0      image shape: cluster size 512 B / 1 / 4 / 64 KiB (bits 0-1),
 *               virtual size 1..16 units of 64 KiB (bits 2-5)
 *   byte 1      bit 0 compat 0.10 (else 1.1), bit 1 lazy refcounts (1.1
 *               only), bits 2-4 cache mode (modulo 5: writeback, none,
 *               writethrough, directsync, unsafe), bits 5-7 refcount order
 *               (4 4 4 4 0 3 5 6; 0.10 always 4)
 *   byte 2      L2 cache of 1..4 tables (bits 0-1), sim max_batch 1..4
 *               (bits 2-3), at most 1..16 requests in flight (bits 4-7)
 *   bytes 3-4   crash point K (big-endian; 0: no crash): the disk crashes
 *               at the K-th completion of an I/O that is not a read
 *   bytes 5-12  keep mask: which completed-but-unflushed writes survive
 *               (qsm_sim_crash; bit 63 also stands for all later ones).
 *               cache=unsafe promises nothing across a power loss, so its
 *               crashes are process kills: every completed write kept.
 *   byte 13     number of requests, 1..32 (bits 0-4); bits 5-7: when not
 *               0, the run is two sessions, the first k/8 of the requests
 *               (k = bits 5-7) in a first one closed cleanly, the rest after
 *               a reopen (so tables exist on disk before a crash)
 *   6 bytes per request: kind (byte 0 modulo 7: write, read, zero write,
 *               zero write may-unmap, discard, flush, compressed write;
 *               bits 3-4 alignment: none, 512, cluster; compressed writes
 *               are always cluster-aligned), offset (bytes 1-2, a fraction of the
 *               size, plus byte 3 sectors), length (byte 4, up to 3
 *               clusters), iovec split (byte 5)
 *   the rest    the completion schedule: every choice of the sim's
 *               scheduler (how many pending I/Os complete in a pass, which
 *               one next) takes the next byte (qsm_sim_set_chooser); when
 *               they run out, the oldest pending I/O completes alone.
 * Each write writes a pattern unique to (request, guest offset).
 *
 * Oracle (test_crash.c has the full one; this one is deliberately simple):
 *  1. Every request succeeds (no faults are injected), none hangs, and a
 *     run without a crash closes with 0.
 *  2. Every successful read returns, per byte, zero or the pattern of a
 *     write covering it that was submitted before the read completed.
 *  3. After the run, the crash image's check finds no corruption (with lazy
 *     refcounts: none unless the dirty bit is set) and no leak without a
 *     crash; it opens read-write (a dirty image is repaired by the open).
 *  4. Every byte reads as zero or the pattern of a write covering it; a byte
 *     of a durable write-like request W reads as W left it (its pattern, or
 *     zero for zero writes and for the whole clusters of discards) when
 *     every other write-like request covering the byte completed before W
 *     was submitted.  Durable: W succeeded and a flush submitted after W
 *     completed succeeded (writeback, none), or W succeeded (writethrough,
 *     directsync), or the run closed cleanly (every mode).
 *  5. After the reopened image is closed, the check finds no corruption.
 * Self-test of the oracle: QSM_FUZZ_TAMPER=1 claims every successful write
 * durable even across a crash; the target must then fail within seconds.
 * In a -DQSM_MUTANTS=ON build, QSM_FUZZ_MUTANT=NAME selects a mutant.
 *
 * Replay: the input decides every choice of the sim disk, and compression
 * runs on the loop (work_threads -1), but one thing depends on time: the
 * write-back batch's group-commit timer (1 ms, waiting for writethrough
 * writes still in flight).  A report from a writethrough or directsync run
 * may need several replays of its input (-runs=100 FILE).
 */
#include <errno.h>
#include <event2/event.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/sim.h"
#include "io/util.h"
#include "metadata/check.h"
#include "metadata/qcow2.h"
#include "sm/qsm.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QSM_FUZZ_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(QSM_FUZZ_ASAN)
#include <sanitizer/lsan_interface.h>
/* A crashed run abandons the engine with requests in flight, whose memory
 * qsm_abandon forgets by design (sm/qsm.h): not a leak. */
#define LSAN_OFF() __lsan_disable()
#define LSAN_ON() __lsan_enable()
#endif
#ifndef LSAN_OFF
#define LSAN_OFF() ((void)0)
#define LSAN_ON() ((void)0)
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_OPS 32
#define T_NEVER UINT64_MAX

/* --- decoding ------------------------------------------------------------- */

struct cursor {
	const uint8_t *p;
	size_t n, at;
};

static uint8_t next_byte(struct cursor *c)
{
	return c->at < c->n ? c->p[c->at++] : 0;
}

enum kind { K_WRITE, K_READ, K_ZERO, K_ZERO_UNMAP, K_DISCARD, K_FLUSH, K_COMPRESSED, K__COUNT };
static const char *const kind_name[] = { "write", "read", "zero", "zero-unmap", "discard",
					 "flush", "compressed-write" };

struct run;

struct op {
	struct run *r;
	int id;
	enum kind kind;
	uint64_t off, len;
	uint64_t eff_off, eff_len;  /* what it sets: discards whole clusters only */
	uint8_t *buf;
	struct iovec iov[2];
	bool submitted;
	uint64_t t_sub, t_done;     /* logical clock; t_done T_NEVER unless it completed */
	int ret;
};

struct cfg {
	unsigned cluster_bits;
	uint64_t cluster, size;
	unsigned version, refcount_order;
	bool lazy;
	enum qsm_cache_mode cache;
	unsigned l2_tables, max_batch;
	int depth;
	unsigned crash_at;
	uint64_t keep_mask;
	int nops;
	int split;          /* 0, or requests [0, split) run in a first session */
};

struct run {
	struct cfg c;
	struct op ops[MAX_OPS];
	struct cursor sched;        /* the completion schedule */
	struct event_base *base;
	struct qsm_sim *sim;
	struct qsm_image *img;
	int pending;
	uint64_t clock;
	uint64_t completions;       /* non-read I/O completions */
	bool crashed;
	int closed_upto;            /* requests [0, closed_upto) ran in a session
	                             * that closed cleanly: all durable */
};

static void decode(struct run *r, const uint8_t *data, size_t size)
{
	struct cursor in = { data, size, 0 };
	struct cfg *c = &r->c;
	static const unsigned cbits[4] = { 9, 10, 12, 16 };
	static const unsigned rorder[8] = { 4, 4, 4, 4, 0, 3, 5, 6 };

	uint8_t b = next_byte(&in);
	c->cluster_bits = cbits[b & 3];
	c->cluster = 1ull << c->cluster_bits;
	c->size = (1 + ((b >> 2) & 15)) * (64 << 10);
	b = next_byte(&in);
	c->version = (b & 1) ? 2 : 3;
	c->lazy = c->version == 3 && (b & 2);
	c->cache = (enum qsm_cache_mode)(((b >> 2) & 7) % 5);
	c->refcount_order = c->version == 2 ? 4 : rorder[b >> 5];
	b = next_byte(&in);
	c->l2_tables = 1 + (b & 3);
	c->max_batch = 1 + ((b >> 2) & 3);
	c->depth = 1 + (b >> 4);
	c->crash_at = (unsigned)next_byte(&in) << 8;
	c->crash_at |= next_byte(&in);
	for (int i = 0; i < 8; i++)
		c->keep_mask = c->keep_mask << 8 | next_byte(&in);
	b = next_byte(&in);
	c->nops = 1 + (b & 31);
	c->split = (b >> 5) * c->nops / 8;

	for (int i = 0; i < c->nops; i++) {
		struct op *o = &r->ops[i];
		uint8_t k = next_byte(&in);
		uint64_t frac = (uint64_t)next_byte(&in) << 8;
		frac |= next_byte(&in);
		uint8_t sectors = next_byte(&in), l = next_byte(&in), split = next_byte(&in);

		o->r = r;
		o->id = i;
		o->kind = (enum kind)(k % K__COUNT);
		o->t_done = T_NEVER;
		if (o->kind == K_FLUSH)
			continue;
		o->off = (frac * c->size >> 16) + (uint64_t)sectors * 512;
		o->len = 1 + (uint64_t)l * 3 * c->cluster / 256;
		unsigned align = o->kind == K_COMPRESSED ? 2 : (k >> 3) & 3;
		if (align == 1) {
			o->off = QSM_ALIGN_DOWN(o->off, 512);
			o->len = QSM_ALIGN_UP(o->len, 512);
		} else if (align == 2) {
			o->off = QSM_ALIGN_DOWN(o->off, c->cluster);
			o->len = QSM_ALIGN_UP(o->len, c->cluster);
		}
		if (o->off >= c->size)
			o->off = c->size - QSM_MIN(o->len, c->size);
		if (o->len > c->size - o->off)
			o->len = c->size - o->off;
		o->eff_off = o->off;
		o->eff_len = o->len;
		if (o->kind == K_DISCARD) {
			uint64_t a = QSM_ALIGN_UP(o->off, c->cluster);
			uint64_t e = QSM_ALIGN_DOWN(o->off + o->len, c->cluster);
			o->eff_off = a;
			o->eff_len = e > a ? e - a : 0;
		}
		if (o->kind == K_READ)
			o->eff_len = 0;
		if (o->kind == K_WRITE || o->kind == K_READ || o->kind == K_COMPRESSED) {
			o->buf = malloc(o->len);
			if (!o->buf)
				abort();
			uint64_t a = split * o->len / 256;
			o->iov[0] = (struct iovec){ o->buf, a };
			o->iov[1] = (struct iovec){ o->buf + a, o->len - a };
		}
	}
	r->sched = (struct cursor){ data + in.at, size - in.at, 0 };
}

/* --- the run -------------------------------------------------------------- */

static bool is_write(const struct op *o)
{
	return o->kind == K_WRITE || o->kind == K_COMPRESSED;
}

static uint8_t pat(int id, uint64_t x)
{
	uint64_t h = x * 0x9E3779B97F4A7C15ull ^ ((uint64_t)id + 1) * 0xC2B2AE3D27D4EB4Full;
	h ^= h >> 29;
	h *= 0xBF58476D1CE4E5B9ull;
	h ^= h >> 32;
	return (uint8_t)h;
}

static void cfg_print(const struct cfg *c)
{
	fprintf(stderr, "fuzz_sched: cluster %llu size %llu compat %s%s refcount_bits %u cache %s "
		"l2 %u tables batch %u depth %d crash at %u keep %#llx, %d requests (%d in a "
		"first session)\n",
		(unsigned long long)c->cluster, (unsigned long long)c->size,
		c->version == 2 ? "0.10" : "1.1", c->lazy ? " lazy" : "", 1u << c->refcount_order,
		qsm_cache_mode_name(c->cache), c->l2_tables, c->max_batch, c->depth, c->crash_at,
		(unsigned long long)c->keep_mask, c->nops, c->split);
}

static void ops_print(const struct run *r)
{
	for (int i = 0; i < r->c.nops; i++) {
		const struct op *o = &r->ops[i];
		fprintf(stderr, "  op %d %s %#llx+%llu sub %llu done %lld ret %d\n", i,
			kind_name[o->kind], (unsigned long long)o->off, (unsigned long long)o->len,
			(unsigned long long)o->t_sub,
			o->t_done == T_NEVER ? -1ll : (long long)o->t_done, o->ret);
	}
}

static void bug(const struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bug(const struct run *r, const char *fmt, ...)
{
	va_list ap;
	cfg_print(&r->c);
	ops_print(r);
	fprintf(stderr, "fuzz_sched: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	abort();
}

static uint64_t choose(void *opaque, uint64_t n)
{
	struct run *r = opaque;
	return next_byte(&r->sched) % n;
}

/* Oracle 2: zeros or a write submitted before the read completed. */
static void check_read(struct run *r, const struct op *o)
{
	for (uint64_t d = 0; d < o->len; d++) {
		uint64_t x = o->off + d;
		uint8_t v = o->buf[d];
		bool found = v == 0;
		for (int i = 0; i < r->c.nops && !found; i++) {
			const struct op *w = &r->ops[i];
			found = is_write(w) && w->submitted && w->t_sub < o->t_done &&
				w->off <= x && x < w->off + w->len && pat(i, x) == v;
		}
		if (!found)
			bug(r, "op %d read: byte %#llx reads %#x, neither zero nor any write's",
			    o->id, (unsigned long long)x, v);
	}
}

static void op_cb(void *opaque, int ret)
{
	struct op *o = opaque;
	struct run *r = o->r;
	r->pending--;
	if (r->crashed)
		return;
	o->ret = ret;
	o->t_done = ++r->clock;
	if (ret)
		bug(r, "op %d %s failed: %s", o->id, kind_name[o->kind], qsm_strerror(ret));
	if (o->kind == K_READ)
		check_read(r, o);
}

static void trace_cb(void *opaque, const struct qsm_io_req *req, bool done, int ret)
{
	struct run *r = opaque;
	if (!done || r->crashed || req->op == QSM_IO_READ)
		return;
	if (++r->completions != r->c.crash_at)
		return;
	if (r->c.cache == QSM_CACHE_UNSAFE)
		qsm_sim_crash(r->sim, ~0ull, true); /* a process kill */
	else
		qsm_sim_crash(r->sim, r->c.keep_mask, r->c.keep_mask >> 63);
	r->crashed = true;
	event_base_loopbreak(r->base);
}

static int submit(struct run *r, struct op *o)
{
	o->submitted = true;
	o->t_sub = ++r->clock;
	r->pending++;
	if (o->kind == K_WRITE || o->kind == K_COMPRESSED)
		for (uint64_t d = 0; d < o->len; d++)
			o->buf[d] = pat(o->id, o->off + d);
	else if (o->kind == K_READ)
		memset(o->buf, 0xee, o->len);
	switch (o->kind) {
	case K_WRITE: return qsm_writev(r->img, o->off, o->iov, 2, op_cb, o);
	case K_READ: return qsm_readv(r->img, o->off, o->iov, 2, op_cb, o);
	case K_ZERO: return qsm_write_zeroes(r->img, o->off, o->len, 0, op_cb, o);
	case K_ZERO_UNMAP:
		return qsm_write_zeroes(r->img, o->off, o->len, QSM_ZERO_MAY_UNMAP, op_cb, o);
	case K_DISCARD: return qsm_discard(r->img, o->off, o->len, op_cb, o);
	case K_COMPRESSED: return qsm_write_compressed(r->img, o->off, o->iov, 2, op_cb, o);
	default: return qsm_flush(r->img, op_cb, o);
	}
}

/* One session: open, requests [from, to), close (or the crash). */
static void run_workload(struct run *r, int from, int to)
{
	const struct cfg *c = &r->c;
	struct qsm_io *io;
	char err[256];

	LSAN_OFF();
	if (qsm_io_open_sim(r->base, r->sim, 0, &io) < 0)
		abort();
	struct qsm_open_opts oo = { .cache = c->cache, .l2_cache_size = c->l2_tables * c->cluster,
				    .work_threads = -1 };
	if (qsm_open_io(r->base, io, &oo, &r->img, err, sizeof(err)) < 0)
		bug(r, "the image does not open for requests %d..%d: %s", from, to - 1, err);
	io->trace = trace_cb;
	io->trace_opaque = r;
	qsm_sim_set_chooser(r->sim, choose, r);

	int next = from;
	while (!r->crashed && (next < to || r->pending)) {
		while (!r->crashed && next < to && r->pending < c->depth) {
			struct op *o = &r->ops[next++];
			int ret = submit(r, o);
			if (ret)
				bug(r, "op %d %s refused: %s", o->id, kind_name[o->kind], qsm_strerror(ret));
		}
		if (r->pending && !r->crashed && event_base_loop(r->base, EVLOOP_ONCE) == 1)
			bug(r, "hang: %d requests never complete", r->pending);
	}
	qsm_sim_set_chooser(r->sim, NULL, NULL);
	if (r->crashed) {
		qsm_abandon(r->img);
		LSAN_ON();
	} else {
		LSAN_ON();
		io->trace = NULL;
		int ret = qsm_close(r->img);
		if (ret)
			bug(r, "close failed: %s", qsm_strerror(ret));
		r->closed_upto = to;
	}
	r->img = NULL;
}

/* --- after the run -------------------------------------------------------- */

static void check_image(struct run *r, const char *when, bool allow_corrupt, bool allow_leaks)
{
	struct qsm_check_result res;
	struct qsm_io *io;
	char err[256];

	if (qsm_io_open_sim(r->base, r->sim, QSM_IO_RDONLY, &io) < 0)
		abort();
	int ret = qsm_check_image(io, 0, &res, NULL, err, sizeof(err));
	qsm_io_close(io);
	if (ret < 0 || res.incomplete)
		bug(r, "%s: the check cannot run: %s", when, err);
	if (res.corruptions && !allow_corrupt)
		bug(r, "%s: the check finds %llu corruptions", when,
		    (unsigned long long)res.corruptions);
	if (res.leaks && !allow_leaks)
		bug(r, "%s: the check finds %llu leaked clusters", when,
		    (unsigned long long)res.leaks);
}

static bool header_dirty(struct run *r)
{
	struct qsm_io *io;
	uint8_t h[80];
	if (qsm_io_open_sim(r->base, r->sim, QSM_IO_RDONLY, &io) < 0 ||
	    qsm_io_pread_sync(io, h, sizeof(h), 0) < 0)
		abort();
	qsm_io_close(io);
	return h[79] & 1; /* incompatible_features bit 0 */
}

static bool writes_data(const struct op *o)
{
	return o->submitted && o->kind != K_READ && o->kind != K_FLUSH;
}

static bool durable(const struct run *r, const struct op *w)
{
	if (w->t_done == T_NEVER || w->ret)
		return false;
	if (w->id < r->closed_upto)
		return true; /* its session closed cleanly */
	static int tamper = -1;
	if (tamper < 0)
		tamper = getenv("QSM_FUZZ_TAMPER") != NULL;
	if (tamper)
		return true;
	if (!r->crashed)
		return true; /* closed cleanly */
	switch (r->c.cache) {
	case QSM_CACHE_WRITETHROUGH:
	case QSM_CACHE_DIRECTSYNC:
		return true;
	case QSM_CACHE_UNSAFE:
		return false;
	default:
		for (int i = 0; i < r->c.nops; i++) {
			const struct op *f = &r->ops[i];
			if (f->kind == K_FLUSH && f->submitted && f->t_sub > w->t_done &&
			    f->t_done != T_NEVER && f->ret == 0)
				return true;
		}
		return false;
	}
}

/* Oracle 4 on the reopened image. */
static void check_data(struct run *r)
{
	const struct cfg *c = &r->c;
	uint8_t *disk = malloc(c->size);
	if (!disk)
		abort();
	int ret = qsm_sync_pread(r->img, disk, c->size, 0);
	if (ret)
		bug(r, "reading the reopened image fails: %s", qsm_strerror(ret));
	for (uint64_t x = 0; x < c->size; x++) {
		uint8_t v = disk[x];
		bool seen = v == 0;
		for (int i = 0; i < c->nops && !seen; i++) {
			const struct op *w = &r->ops[i];
			seen = is_write(w) && w->submitted && w->off <= x &&
			       x < w->off + w->len && pat(i, x) == v;
		}
		if (!seen)
			bug(r, "byte %#llx reads %#x after the run: neither zero nor any write's",
			    (unsigned long long)x, v);
	}
	uint8_t *skip = malloc(c->size);
	if (!skip)
		abort();
	for (int i = 0; i < c->nops; i++) {
		const struct op *w = &r->ops[i];
		if (!writes_data(w) || !w->eff_len || !durable(r, w))
			continue;
		uint64_t ws = w->eff_off, we = ws + w->eff_len;
		/* Bytes another write-like request may have changed after W
		 * began: any that had not completed when W was submitted. */
		memset(skip + ws, 0, we - ws);
		for (int j = 0; j < c->nops; j++) {
			const struct op *o = &r->ops[j];
			if (j == i || !writes_data(o) || o->t_done < w->t_sub)
				continue;
			uint64_t a = QSM_MAX(ws, o->off), e = QSM_MIN(we, o->off + o->len);
			if (a < e)
				memset(skip + a, 1, e - a);
		}
		for (uint64_t x = ws; x < we; x++) {
			uint8_t want = is_write(w) ? pat(i, x) : 0;
			if (!skip[x] && disk[x] != want)
				bug(r, "op %d %s was durable; byte %#llx reads %#x, not %#x", i,
				    kind_name[w->kind], (unsigned long long)x, disk[x], want);
		}
	}
	free(skip);
	free(disk);
}

/* QSM_FUZZ_MUTANT=NAME: run against one of the deliberate safety-rule
 * violations of a -DQSM_MUTANTS=ON build (qsm_mutant_name), to see the
 * oracle catch it. */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	const char *m = getenv("QSM_FUZZ_MUTANT");
	if (m && *m) {
		int ret = qsm_mutant_select(m);
		if (ret < 0) {
			fprintf(stderr, "fuzz_sched: mutant %s: %s\n", m, qsm_strerror(ret));
			abort();
		}
	}
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct run r; /* large: keep it off the stack */
	char err[256];

	memset(&r, 0, sizeof(r));
	decode(&r, data, size);
	const struct cfg *c = &r.c;

	struct qcow2_create_opts co = {
		.size = c->size, .cluster_bits = c->cluster_bits, .version = c->version,
		.refcount_order = c->refcount_order, .lazy_refcounts = c->lazy,
	};
	uint8_t *img;
	size_t img_len;
	if (qcow2_create_image(&co, &img, &img_len, err, sizeof(err)) < 0)
		bug(&r, "create: %s", err);
	r.base = event_base_new();
	r.sim = qsm_sim_new(0);
	if (!r.base || !r.sim)
		abort();
	qsm_sim_load_buf(r.sim, img, img_len);
	free(img);
	qsm_sim_set_max_batch(r.sim, c->max_batch);

	if (c->split)
		run_workload(&r, 0, c->split);
	if (!r.crashed)
		run_workload(&r, c->split, c->nops);

	/* 3. The image as the run left it. */
	bool dirty = header_dirty(&r);
	check_image(&r, "after the run", c->lazy && dirty && r.crashed, r.crashed);
	struct qsm_io *io;
	struct qsm_open_opts oo = { .cache = QSM_CACHE_WRITEBACK, .work_threads = -1 };
	if (qsm_io_open_sim(r.base, r.sim, 0, &io) < 0)
		abort();
	if (qsm_open_io(r.base, io, &oo, &r.img, err, sizeof(err)) < 0)
		bug(&r, "the image does not reopen%s: %s", dirty ? " (dirty)" : "", err);
	/* 4. */
	check_data(&r);
	/* 5. */
	int ret = qsm_close(r.img);
	if (ret)
		bug(&r, "closing the reopened image fails: %s", qsm_strerror(ret));
	check_image(&r, "after the reopen", false, r.crashed);

	for (int i = 0; i < c->nops; i++)
		free(r.ops[i].buf);
	qsm_sim_free(r.sim);
	event_base_free(r.base);
	return 0;
}
