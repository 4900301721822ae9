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
 *               are always cluster-aligned; bit 5 the data of the other
 *               sort: a write's compressible, a compressed write's not),
 *               offset (bytes 1-2, a fraction of the size, plus byte 3
 *               sectors), length (byte 4, up to 3 clusters), iovec split
 *               (byte 5: two pieces, the first maybe empty, and an empty
 *               third)
 *   the rest    the completion schedule: every choice of the sim's
 *               scheduler (how many pending I/Os complete in a pass, which
 *               one next) takes the next byte (qsm_sim_set_chooser); when
 *               they run out, the oldest pending I/O completes alone.
 * The requests, their data (a pattern unique to request and guest offset,
 * compressible in runs of 64 bytes where the kind asks) and the oracles are
 * the workload engine's (tools/workload.h), shared with qsm fuzz and the
 * unit tests; this target only decodes bytes and drives sessions.
 *
 * Oracle (any finding aborts, with the case and the requests printed):
 *  1. Every request succeeds (no faults are injected), none completes
 *     inside its submission, none hangs, and a session without a crash
 *     closes with 0.
 *  2. Every successful read returns, per byte, the content before the
 *     requests (zeros) or the value of a write-like request that may have
 *     been the last to land there (the engine's read oracle: concurrent
 *     overlapping writes in any order, otherwise exactly the last one).
 *  3. The sim saw no read of bytes a write in flight was changing, unless
 *     the guest's own requests overlapped that way (engine races).
 *  4. After the run, the crash image's check finds no corruption (with lazy
 *     refcounts: none unless the dirty bit is set) and no leak without a
 *     crash; it opens read-write (a dirty image is repaired by the open).
 *  5. The whole disk passes the engine's durability register: each byte is
 *     the value of a request (or the initial zeros) not overwritten by a
 *     durable one.  Durable: it succeeded and a flush submitted after it
 *     completed succeeded (writeback, none), or it succeeded (writethrough,
 *     directsync), or its session closed cleanly (every mode).
 *  6. After the reopened image is closed, the check finds no corruption.
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
#include "sm/qsm_test.h"
#include "tools/workload.h"

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
	struct wl_op ops[MAX_OPS];
	struct wl w;                /* the engine's model of the requests */
	struct cursor sched;        /* the completion schedule */
	struct event_base *base;
	struct qsm_sim *sim;
	struct qsm_image *img;
	uint64_t completions;       /* non-read I/O completions */
};

static void decode(struct run *r, const uint8_t *data, size_t size)
{
	struct cursor in = { data, size, 0 };
	struct cfg *c = &r->c;
	static const unsigned cbits[4] = { 9, 10, 12, 16 };
	static const unsigned rorder[8] = { 4, 4, 4, 4, 0, 3, 5, 6 };
	static const enum wl_kind kinds[K__COUNT] = { WL_WRITE, WL_READ, WL_ZERO, WL_ZERO,
						      WL_DISCARD, WL_FLUSH, WL_COMPRESSED };

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
		struct wl_op *o = &r->ops[i];
		uint8_t k = next_byte(&in);
		uint64_t frac = (uint64_t)next_byte(&in) << 8;
		frac |= next_byte(&in);
		uint8_t sectors = next_byte(&in), l = next_byte(&in), split = next_byte(&in);

		enum kind kind = (enum kind)(k % K__COUNT);
		o->kind = kinds[kind];
		if (o->kind == WL_FLUSH)
			continue;
		o->off = (frac * c->size >> 16) + (uint64_t)sectors * 512;
		o->len = 1 + (uint64_t)l * 3 * c->cluster / 256;
		unsigned align = kind == K_COMPRESSED ? 2 : (k >> 3) & 3;
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
		if (kind == K_ZERO_UNMAP)
			o->flags = QSM_ZERO_MAY_UNMAP;
		else if ((o->kind == WL_WRITE || o->kind == WL_COMPRESSED) && (k >> 5) & 1)
			o->flags = WL_DATA_OTHER;
		/* Two pieces cut at the split byte, and an empty third (empty
		 * pieces are valid iovecs; so is an empty first one). */
		o->split_a = split * o->len / 256;
		o->split_b = o->len;
		if (o->kind != WL_ZERO)
			o->flags |= WL_IOV_KEEP_EMPTY;
	}
	r->sched = (struct cursor){ data + in.at, size - in.at, 0 };
}

/* --- the run -------------------------------------------------------------- */

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

static void bug(const struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bug(const struct run *r, const char *fmt, ...)
{
	va_list ap;
	cfg_print(&r->c);
	if (r->w.st)
		wl_dump(&r->w, stderr);
	fprintf(stderr, "fuzz_sched: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	abort();
}

/* Oracles 1-3 so far. */
static void check_verdict(const struct run *r, const char *when)
{
	if (r->w.violations)
		bug(r, "%s: %s", when, r->w.first_violation);
	if (r->w.op_errors)
		bug(r, "%s: %s", when, r->w.first_error);
	if (r->w.races)
		bug(r, "%s: %llu engine races; first: %s", when, (unsigned long long)r->w.races,
		    r->w.first_race);
}

static uint64_t choose(void *opaque, uint64_t n)
{
	struct run *r = opaque;
	return next_byte(&r->sched) % n;
}

static void trace_cb(void *opaque, const struct qsm_io_req *req, bool done, int ret)
{
	struct run *r = opaque;
	if (!done || r->w.stopped || req->op == QSM_IO_READ)
		return;
	if (++r->completions != r->c.crash_at)
		return;
	if (r->c.cache == QSM_CACHE_UNSAFE)
		qsm_sim_crash(r->sim, ~0ull, true); /* a process kill */
	else
		qsm_sim_crash(r->sim, r->c.keep_mask, r->c.keep_mask >> 63);
	r->w.stopped = true;
	event_base_loopbreak(r->base);
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
	wl_run(&r->w, r->img, from, to, c->depth);
	check_verdict(r, "during the requests");
	qsm_sim_set_chooser(r->sim, NULL, NULL);
	if (r->w.stopped) {
		qsm_abandon(r->img);
		LSAN_ON();
	} else {
		LSAN_ON();
		io->trace = NULL;
		int ret = qsm_close(r->img);
		if (ret)
			bug(r, "close failed: %s", qsm_strerror(ret));
		wl_note_sync(&r->w);
	}
	r->img = NULL;
}

/* --- after the run -------------------------------------------------------- */

static void check_image(struct run *r, const char *when, bool allow_corrupt, bool allow_leaks)
{
	struct qsm_check_result res;
	char err[256] = "";

	if (wl_sim_check(r->sim, &res, err, sizeof(err)) < 0 || res.incomplete)
		bug(r, "%s: the check cannot run: %s", when, err);
	if (res.corruptions && !allow_corrupt)
		bug(r, "%s: the check finds %llu corruptions", when,
		    (unsigned long long)res.corruptions);
	if (res.leaks && !allow_leaks)
		bug(r, "%s: the check finds %llu leaked clusters", when,
		    (unsigned long long)res.leaks);
}

/* Oracle 5 on the reopened image. */
static void check_data(struct run *r)
{
	char msg[600];
	uint8_t *disk = malloc(r->c.size);
	if (!disk)
		abort();
	int ret = qsm_sync_pread(r->img, disk, r->c.size, 0);
	if (ret)
		bug(r, "reading the reopened image fails: %s", qsm_strerror(ret));
	if (!wl_check_durable(&r->w, disk, msg, sizeof(msg)))
		bug(r, "durability%s: %s", r->w.stopped ? " after the crash" : "", msg);
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
	struct wl_params wp = { .size = c->size, .cluster = (unsigned)c->cluster, .cache = c->cache,
				.read_every_byte = true };
	if (wl_init(&r.w, r.ops, c->nops, &wp) < 0)
		abort();
	r.w.claim_all_durable = getenv("QSM_FUZZ_TAMPER") != NULL;

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
	qsm_sim_set_race_hook(r.sim, wl_sim_race_cb, &r.w);

	if (c->split)
		run_workload(&r, 0, c->split);
	if (!r.w.stopped)
		run_workload(&r, c->split, c->nops);
	qsm_sim_set_race_hook(r.sim, NULL, NULL);

	/* 4. The image as the run left it. */
	bool dirty = wl_sim_dirty(r.sim);
	check_image(&r, "after the run", c->lazy && dirty && r.w.stopped, r.w.stopped);
	struct qsm_io *io;
	struct qsm_open_opts oo = { .cache = QSM_CACHE_WRITEBACK, .work_threads = -1 };
	if (qsm_io_open_sim(r.base, r.sim, 0, &io) < 0)
		abort();
	if (qsm_open_io(r.base, io, &oo, &r.img, err, sizeof(err)) < 0)
		bug(&r, "the image does not reopen%s: %s", dirty ? " (dirty)" : "", err);
	/* 5. */
	check_data(&r);
	/* 6. */
	int ret = qsm_close(r.img);
	if (ret)
		bug(&r, "closing the reopened image fails: %s", qsm_strerror(ret));
	check_image(&r, "after the reopen", false, r.w.stopped);

	wl_fini(&r.w);
	qsm_sim_free(r.sim);
	event_base_free(r.base);
	return 0;
}
