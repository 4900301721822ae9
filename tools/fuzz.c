/*
 * tools/fuzz.c: the ordering fuzzer and crash explorer (see fuzz.h for the
 * oracles, cmd_fuzz.c for the command line).
 *
 * One run (fz_run):
 *   prepare   create the backing image (maybe) and the image in the scratch
 *             directory with the real engine, prefill clusters with known
 *             patterns, maybe recompress the image with qemu-img convert -c;
 *             the initial guest view init[] follows from the prefill alone
 *   load      the image onto a sim disk seeded with the case's seed (and
 *             the backing file onto a second one, opened through
 *             qsm_open_opts.open_backing_io)
 *   workload  the workload engine (tools/workload.h) submits the requests,
 *             at most `depth` in flight, while the sim completes I/O in PRNG
 *             order; an io trace hook counts the completions and crashes
 *             the disk at crash_at, or a fault rule fails every I/O of one
 *             named event
 *   judge     the engine's read oracle as reads complete; then the crash
 *             image or the cleanly closed image: structure (qsm_check_image,
 *             and qemu-img check when asked), the engine's durability
 *             register, reopen and reuse
 *
 * The requests' data, the logical clock and the oracles are the engine's
 * (workload.h); the prefill uses its pattern with ids above any request's.
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/sim.h"
#include "io/util.h"
#include "metadata/check.h"
#include "tools/fuzz.h"
#include "tools/workload.h"

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/lsan_interface.h>
/* qsm_abandon forgets the requests in flight with the "process": what a run
 * that crashes allocates is not a leak. */
#define LSAN_OFF() __lsan_disable()
#define LSAN_ON() __lsan_enable()
#else
#define LSAN_OFF() ((void)0)
#define LSAN_ON() ((void)0)
#endif

/* Pattern ids of the prefilled data (requests use 0..nops-1). */
#define PREFILL_TOP 1000001
#define PREFILL_BACKING 1000002

static const char *const mode_names[FZ__MODES] = { "keep-none", "keep-all", "keep-prefix",
						   "keep-all-but-one", "keep-random", "keep-mask" };

const char *fz_mode_name(enum fz_crash_mode m)
{
	return m < FZ__MODES ? mode_names[m] : "?";
}

/* --- environment ------------------------------------------------------------- */

int fz_env_init(struct fz_env *env, const char *parent)
{
	memset(env, 0, sizeof(*env));
	env->log = stderr;
	/* The images only pass through the scratch directory: a tmpfs spares
	 * each run's create and prefill their fdatasyncs. */
	if (!parent)
		parent = getenv("TMPDIR");
	if (!parent)
		parent = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/var/tmp";
	snprintf(env->tmpdir, sizeof(env->tmpdir), "%s/qsm-fuzz-XXXXXX", parent);
	if (!mkdtemp(env->tmpdir))
		return -errno;
	env->have_qemu_img = system("qemu-img --version >/dev/null 2>&1") == 0;
	return 0;
}

void fz_env_fini(struct fz_env *env)
{
	static const char *const files[] = { "top.qcow2", "top.c.qcow2", "backing.img", "work.qcow2",
					     "work.qcow2.raw", "schedule.log" };
	char p[400];
	for (size_t i = 0; i < QSM_ARRAY_SIZE(files); i++) {
		snprintf(p, sizeof(p), "%s/%s", env->tmpdir, files[i]);
		unlink(p);
	}
	rmdir(env->tmpdir);
}

/* --- cases ------------------------------------------------------------------- */

static const struct { unsigned cluster; uint64_t size; size_t tables; } shapes[] = {
	{ 512, 1 << 20, 1 },   /* an L2 table maps 32 KiB: many tables, many refblocks */
	{ 512, 2 << 20, 2 },
	{ 1024, 2 << 20, 1 },
	{ 2048, 1 << 20, 2 },
	{ 4096, 4 << 20, 1 },
	{ 4096, 8 << 20, 2 },
	{ 65536, 16 << 20, 1 },
};

/* Events a fault rule may name: every one the engine tags. */
static const enum qsm_io_event fault_events[] = {
	QSM_IO_EV_L1_UPDATE,       QSM_IO_EV_L2_LOAD,        QSM_IO_EV_L2_UPDATE,
	QSM_IO_EV_L2_ALLOC,        QSM_IO_EV_REFBLOCK_LOAD,  QSM_IO_EV_REFBLOCK_UPDATE,
	QSM_IO_EV_REFBLOCK_ALLOC,  QSM_IO_EV_REFTABLE_UPDATE, QSM_IO_EV_CLUSTER_ALLOC,
	QSM_IO_EV_COW_READ,        QSM_IO_EV_COW_WRITE,      QSM_IO_EV_DATA_READ,
	QSM_IO_EV_DATA_WRITE,      QSM_IO_EV_COMPRESSED_WRITE, QSM_IO_EV_FLUSH,
	QSM_IO_EV_HEADER_UPDATE,
};

static void gen_ops(struct fz_case *c, struct qsm_rng *g, int nops, unsigned max_clusters)
{
	c->nops = nops;
	c->ops = calloc((size_t)nops, sizeof(*c->ops));
	if (!c->ops)
		abort();
	uint64_t maxlen = QSM_MIN(c->size / 4, (uint64_t)c->cluster * max_clusters);
	for (int i = 0; i < nops; i++) {
		struct wl_op *o = &c->ops[i];
		uint64_t k = qsm_rng_below(g, 100);
		o->kind = k < 55 ? WL_WRITE : k < 68 ? WL_READ : k < 76 ? WL_ZERO : k < 84 ? WL_DISCARD
										   : WL_FLUSH;
		if (i == nops - 1)
			o->kind = WL_FLUSH;
		if (o->kind == WL_FLUSH)
			continue;
		o->len = 1 + qsm_rng_below(g, maxlen);
		/* Half of them near a few hot spots, so that requests overlap. */
		if (qsm_rng_below(g, 2))
			o->off = qsm_rng_below(g, c->size - o->len + 1);
		else
			o->off = QSM_MIN(qsm_rng_below(g, 4) * (c->size / 4) +
						 qsm_rng_below(g, 3 * (uint64_t)c->cluster),
					 c->size - o->len);
		if (qsm_rng_below(g, 3) == 0) {
			o->off = QSM_ALIGN_DOWN(o->off, c->cluster);
			o->len = QSM_ALIGN_UP(o->len, c->cluster);
		} else if (qsm_rng_below(g, 3) == 0) {
			o->off = QSM_ALIGN_DOWN(o->off, 512);
			o->len = QSM_ALIGN_UP(o->len, 512);
		}
		if (o->off + o->len > c->size)
			o->len = c->size - o->off;
		if (o->kind == WL_WRITE && qsm_rng_below(g, 8) == 0) {
			/* Compressed: whole clusters (the disk is a multiple). */
			o->kind = WL_COMPRESSED;
			o->off = QSM_ALIGN_DOWN(o->off, c->cluster);
			o->len = QSM_MIN(QSM_ALIGN_UP(o->len, c->cluster), (uint64_t)c->cluster * 4);
			if (o->off + o->len > c->size)
				o->len = c->size - o->off;
		}
		if (o->kind == WL_ZERO)
			o->flags = qsm_rng_below(g, 2) ? QSM_ZERO_MAY_UNMAP : 0;
		o->split_a = qsm_rng_below(g, o->len + 1);
		o->split_b = o->split_a + qsm_rng_below(g, o->len - o->split_a + 1);
	}
}

/*
 * --snapshots: some requests become live snapshot creates (about 1 in 16),
 * deletes of an earlier one (1 in 12) and applies of an earlier one (1 in
 * 12, with requests submitted while it runs: the engine holds them), in
 * flight among the others.  A
 * v3 image: a snapshot operation holds the dirty bit, so a crash in the
 * middle of one is repaired on open (on v2, QEMU's image and ours alike, a
 * crash can leave COPIED flags that only check -r all mends).  The tags
 * are the ops' indices when drawn (unique, stable while shrinking).
 */
static void gen_snapshots(struct fz_case *c, struct qsm_rng *g)
{
	c->compat = 3;
	for (int i = 0; i + 1 < c->nops; i++) {
		struct wl_op *o = &c->ops[i];
		uint64_t k = qsm_rng_below(g, 48);
		int live[64], nlive = 0; /* creates before i not deleted yet */
		for (int j = 0; j < i && nlive < 64; j++) {
			if (c->ops[j].kind == WL_SNAPSHOT)
				live[nlive++] = j;
			else if (c->ops[j].kind == WL_SNAPSHOT_DELETE)
				for (int l = 0; l < nlive; l++)
					if (c->ops[live[l]].off == c->ops[j].off)
						live[l--] = live[--nlive];
		}
		if (k < 3) {
			*o = (struct wl_op){ .kind = WL_SNAPSHOT, .off = (uint64_t)i + 1 };
		} else if (k < 7 && nlive) {
			int pick = live[qsm_rng_below(g, (uint64_t)nlive)];
			*o = (struct wl_op){ .kind = WL_SNAPSHOT_DELETE, .off = c->ops[pick].off };
		} else if (k < 11 && nlive) {
			int pick = live[qsm_rng_below(g, (uint64_t)nlive)];
			*o = (struct wl_op){ .kind = WL_SNAPSHOT_APPLY, .off = c->ops[pick].off };
		}
	}
}

void fz_case_generate(struct fz_case *c, uint64_t seed, const struct fz_gen *gen,
		      bool have_qemu_img)
{
	struct qsm_rng g;
	qsm_rng_seed(&g, seed * 7919 + 17);
	memset(c, 0, sizeof(*c));
	c->seed = seed;
	int sh = (int)qsm_rng_below(&g, QSM_ARRAY_SIZE(shapes));
	c->cluster = shapes[sh].cluster;
	c->size = shapes[sh].size;
	c->l2_tables = shapes[sh].tables;
	if (gen->cluster) {
		c->cluster = gen->cluster;
		c->size = QSM_MAX((uint64_t)gen->cluster * 64, (uint64_t)1 << 20);
	}
	if (qsm_rng_below(&g, 3) == 0)
		c->l2_tables = 3 - c->l2_tables;
	static const enum qsm_cache_mode modes[] = {
		QSM_CACHE_WRITEBACK, QSM_CACHE_WRITEBACK, QSM_CACHE_WRITETHROUGH,
		QSM_CACHE_WRITETHROUGH, QSM_CACHE_NONE, QSM_CACHE_DIRECTSYNC, QSM_CACHE_UNSAFE,
	};
	uint64_t m = qsm_rng_below(&g, QSM_ARRAY_SIZE(modes));
	c->cache = gen->cache >= 0 ? (enum qsm_cache_mode)gen->cache : modes[m];
	bool lazy = qsm_rng_below(&g, 3) == 0;
	c->lazy = gen->lazy >= 0 ? gen->lazy : lazy;
	c->compat = (!c->lazy && qsm_rng_below(&g, 4) == 0) ? 2 : 3;
	bool backing = qsm_rng_below(&g, 3) == 0;
	c->backing = gen->backing >= 0 ? gen->backing : backing;
	if (c->backing) {
		c->backing_raw = qsm_rng_below(&g, 3) == 0;
		/* Sometimes shorter than the image: zeros past its end. */
		c->backing_size = qsm_rng_below(&g, 3) == 0
			? QSM_ALIGN_DOWN(c->size / 2 + qsm_rng_below(&g, c->size / 2), 512)
			: c->size;
	}
	bool compressed = !c->backing && have_qemu_img && qsm_rng_below(&g, 4) == 0;
	c->compressed = gen->compressed >= 0 ? gen->compressed && !c->backing && have_qemu_img
					     : compressed;
	/* From a stream of its own, so that the draws above and below stay
	 * what they were for every seed before zstd. */
	struct qsm_rng gz;
	qsm_rng_seed(&gz, seed * 104729 + 3);
	c->zstd = c->compat == 3 && (gen->zstd > 0 || (gen->zstd == 0 && qsm_rng_below(&gz, 3) == 0));
	int nops = gen->ops ? gen->ops : 20 + (int)qsm_rng_below(&g, 81);
	if (gen->depth)
		c->depth = gen->depth;
	else switch (qsm_rng_below(&g, 4)) {
	case 0: c->depth = 1; break;
	case 1: c->depth = 2 + (int)qsm_rng_below(&g, 7); break;
	case 2: c->depth = 9 + (int)qsm_rng_below(&g, 24); break;
	default: c->depth = 33 + (int)qsm_rng_below(&g, 32); break;
	}
	c->max_batch = 1 + (unsigned)qsm_rng_below(&g, 4);
	c->keyed = !gen->prng_schedule;
	unsigned max_clusters = qsm_rng_below(&g, 4) == 0 ? 48 : 5;
	gen_ops(c, &g, QSM_MAX(nops, 2), max_clusters);
	if (gen->snapshots)
		gen_snapshots(c, &g);
}

void fz_case_free(struct fz_case *c)
{
	free(c->ops);
	c->ops = NULL;
	c->nops = 0;
}

int fz_case_copy(struct fz_case *dst, const struct fz_case *src)
{
	*dst = *src;
	dst->ops = malloc(sizeof(*src->ops) * (size_t)QSM_MAX(src->nops, 1));
	if (!dst->ops)
		return -ENOMEM;
	memcpy(dst->ops, src->ops, sizeof(*src->ops) * (size_t)src->nops);
	return 0;
}

void fz_case_str(const struct fz_case *c, char *buf, size_t len)
{
	int n = snprintf(buf, len, "seed %" PRIu64 " cache=%s%s compat %s cluster %u size %" PRIu64
			 "K l2 %zu tables%s%s%s ops %d depth %d batch %u%s", c->seed,
			 qsm_cache_mode_name(c->cache), c->lazy ? "+lazy" : "",
			 c->compat == 2 ? "0.10" : "1.1", c->cluster, c->size >> 10, c->l2_tables,
			 c->backing ? (c->backing_raw ? " backing raw" : " backing qcow2") : "",
			 c->backing && c->backing_size < c->size ? " (shorter)" : "",
			 c->compressed ? (c->zstd ? " compressed zstd" : " compressed")
				       : c->empty ? " empty" : c->zstd ? " zstd" : "", c->nops, c->depth,
			 c->max_batch,
			 c->keyed ? "" : " prng-schedule");
	if (n < 0 || (size_t)n >= len)
		return;
	if (c->crash_at)
		n += snprintf(buf + n, len - (size_t)n, " crash at %" PRIu64 " %s%s", c->crash_at,
			      c->crash_mode == FZ_KEEP_MASK ? "keep-mask" : fz_mode_name(c->crash_mode),
			      c->torn ? " torn" : "");
	if (c->crash_at && c->crash_mode == FZ_KEEP_MASK && n > 0 && (size_t)n < len)
		n += snprintf(buf + n, len - (size_t)n, " %#" PRIx64, c->keep_mask);
	if (c->fault && (size_t)n < len)
		snprintf(buf + n, len - (size_t)n, " fault %s %s %s%s", qsm_io_event_name(c->fev),
			 c->ferr == ENOSPC ? "ENOSPC" : "EIO", c->fonce ? "once" : "persistent",
			 c->fcrash ? " then power loss" : "");
}

/* --- preparing the images ---------------------------------------------------- */

static uint64_t mix(uint64_t a, uint64_t b, uint64_t c)
{
	uint64_t h = (a + 1) * 0x9E3779B97F4A7C15ull ^ (b + 1) * 0xD6E8FEB86659FD93ull ^
		     c * 0xA0761D6478BD642Full;
	h ^= h >> 31;
	h *= 0xBF58476D1CE4E5B9ull;
	h ^= h >> 29;
	return h;
}

/* Which clusters the prefill writes: a function of the seed alone.  The
 * image's prefill leaves the ranges of half of its L2 tables untouched, so
 * that the workload still allocates L2 tables (and freezes). */
static bool prefilled(const struct fz_case *c, int layer, uint64_t cluster)
{
	uint64_t per_table = c->cluster / 8;
	if (layer == PREFILL_TOP && c->empty)
		return false;
	if (layer == PREFILL_TOP && mix(c->seed, cluster / per_table, 7) % 2)
		return false;
	return mix(c->seed, cluster, (uint64_t)layer) % 100 < (layer == PREFILL_BACKING ? 50u : 40u);
}

/* The guest view before the first request: the image's prefill over the
 * backing file's (over zeros). */
static void initial_view(const struct fz_case *c, uint8_t *init)
{
	memset(init, 0, c->size);
	for (uint64_t cl = 0; cl * c->cluster < c->size; cl++) {
		uint64_t a = cl * c->cluster, b = QSM_MIN(a + c->cluster, c->size);
		int id = prefilled(c, PREFILL_TOP, cl) ? PREFILL_TOP
			 : c->backing && a < c->backing_size && prefilled(c, PREFILL_BACKING, cl)
			 ? PREFILL_BACKING : 0;
		if (id == PREFILL_BACKING)
			b = QSM_MIN(b, c->backing_size);
		if (id)
			for (uint64_t x = a; x < b; x++)
				init[x] = wl_pattern(id, x);
	}
}

static int fill(const char *path, const char *fmt, const struct fz_case *c, int layer,
		uint64_t size, char *err, size_t errlen)
{
	struct event_base *base = event_base_new();
	struct qsm_image *img;
	/* Preparation is not under test: no syncs, and the thread backend
	 * (io_uring on tmpfs only adds worker wake-ups). */
	struct qsm_open_opts oo = { .format = fmt, .cache = QSM_CACHE_UNSAFE, .aio = "threads" };
	int ret = qsm_open(base, path, &oo, &img, err, errlen);
	if (ret < 0) {
		event_base_free(base);
		return ret;
	}
	uint8_t *buf = malloc(c->cluster);
	for (uint64_t cl = 0; ret == 0 && cl * c->cluster < size; cl++) {
		if (!prefilled(c, layer, cl))
			continue;
		uint64_t a = cl * c->cluster, n = QSM_MIN((uint64_t)c->cluster, size - a);
		for (uint64_t x = 0; x < n; x++)
			buf[x] = wl_pattern(layer, a + x);
		ret = qsm_sync_pwrite(img, buf, n, a);
		if (ret < 0)
			qsm_set_err(err, errlen, "prefill write at %#" PRIx64 ": %s", a,
				    qsm_strerror(ret));
	}
	free(buf);
	int r2 = qsm_close(img);
	event_base_free(base);
	return ret ? ret : r2;
}

static int run_cmd(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int run_cmd(char *err, size_t errlen, const char *fmt, ...)
{
	char cmd[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	int st = system(cmd);
	if (st != 0) {
		qsm_set_err(err, errlen, "'%s' failed (status %d)", cmd, st);
		return -EIO;
	}
	return 0;
}

/* The image (and its backing file) as the run starts, in the scratch
 * directory: top.qcow2 and backing.img. */
static int prepare(struct fz_env *env, const struct fz_case *c, char *err, size_t errlen)
{
	char top[400], bk[400];
	snprintf(top, sizeof(top), "%s/top.qcow2", env->tmpdir);
	snprintf(bk, sizeof(bk), "%s/backing.img", env->tmpdir);
	int ret;
	unlink(top);
	unlink(bk);
	if (c->backing) {
		if (c->backing_raw) {
			int fd = open(bk, O_CREAT | O_TRUNC | O_WRONLY, 0644);
			if (fd < 0 || ftruncate(fd, (off_t)c->backing_size) < 0) {
				ret = -errno;
				if (fd >= 0)
					close(fd);
				qsm_set_err(err, errlen, "creating %s: %s", bk, strerror(-ret));
				return ret;
			}
			close(fd);
		} else {
			struct qsm_create_opts bo = { .size = c->backing_size, .cluster_size = c->cluster,
						      .compat = 3 };
			if ((ret = qsm_create(bk, &bo, err, errlen)) < 0)
				return ret;
		}
		if ((ret = fill(bk, c->backing_raw ? "raw" : "qcow2", c, PREFILL_BACKING,
				c->backing_size, err, errlen)) < 0)
			return ret;
	}
	struct qsm_create_opts co = { .size = c->size, .cluster_size = c->cluster,
				      .compat = c->compat, .lazy_refcounts = c->lazy,
				      .compression = c->zstd ? QSM_COMPRESSION_ZSTD : QSM_COMPRESSION_ZLIB };
	if (c->backing) {
		co.backing_file = "backing.img";
		co.backing_format = c->backing_raw ? "raw" : "qcow2";
	}
	if ((ret = qsm_create(top, &co, err, errlen)) < 0)
		return ret;
	if ((ret = fill(top, "qcow2", c, PREFILL_TOP, c->size, err, errlen)) < 0)
		return ret;
	if (c->compressed) {
		char ctop[400];
		snprintf(ctop, sizeof(ctop), "%s/top.c.qcow2", env->tmpdir);
		ret = run_cmd(err, errlen,
			      "qemu-img convert -c -O qcow2 -o cluster_size=%u,compat=%s,"
			      "lazy_refcounts=%s,compression_type=%s '%s' '%s' >/dev/null 2>&1",
			      c->cluster, c->compat == 2 ? "0.10" : "1.1", c->lazy ? "on" : "off",
			      c->zstd ? "zstd" : "zlib", top, ctop);
		if (ret == 0 && rename(ctop, top) < 0)
			ret = -errno;
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* --- the run ------------------------------------------------------------------- */

/* One run: the case, its sim disks, and the workload engine's model
 * (tools/workload.h) of the requests. */
struct run {
	const struct fz_case *c;
	struct fz_env *env;
	struct wl w;                 /* requests, clock, oracles; w.stopped: crashed */
	struct event_base *base;
	struct qsm_sim *sim, *bsim;
	struct qsm_image *img;
	uint64_t completions;
	int close_ret;
	uint64_t fired;
	struct fz_result *res;       /* metadata completions are noted there */
	FILE *sched;                 /* schedule log, or NULL */
};

static bool is_meta_event(enum qsm_io_event ev)
{
	switch (ev) {
	case QSM_IO_EV_L1_UPDATE: case QSM_IO_EV_L2_UPDATE: case QSM_IO_EV_L2_ALLOC:
	case QSM_IO_EV_REFBLOCK_UPDATE: case QSM_IO_EV_REFBLOCK_ALLOC:
	case QSM_IO_EV_REFTABLE_UPDATE: case QSM_IO_EV_HEADER_UPDATE: case QSM_IO_EV_FLUSH:
		return true;
	default:
		return false;
	}
}

static bool is_read_event(enum qsm_io_event ev)
{
	return ev == QSM_IO_EV_DATA_READ || ev == QSM_IO_EV_L2_LOAD || ev == QSM_IO_EV_COW_READ ||
	       ev == QSM_IO_EV_REFBLOCK_LOAD;
}

static void do_crash(struct run *r)
{
	const struct fz_case *c = r->c;
	struct qsm_rng g;
	qsm_rng_seed(&g, c->seed * 1000003 + c->crash_at);
	size_t n = qsm_sim_unflushed(r->sim);
	uint64_t j = qsm_rng_below(&g, n + 1);
	uint64_t keep;
	bool beyond;
	switch (c->crash_mode) {
	case FZ_KEEP_NONE: keep = 0, beyond = false; break;
	case FZ_KEEP_ALL: keep = ~0ull, beyond = true; break;
	case FZ_KEEP_PREFIX: keep = j >= 64 ? ~0ull : (1ull << j) - 1, beyond = j >= n; break;
	case FZ_KEEP_ALL_BUT_ONE: keep = j >= 64 ? ~0ull : ~(1ull << j), beyond = true; break;
	case FZ_KEEP_MASK: keep = c->keep_mask, beyond = false; break;
	default:
		keep = qsm_rng_next(&g) | (qsm_rng_next(&g) & 1 ? 0 : qsm_rng_next(&g));
		beyond = qsm_rng_below(&g, 2);
		break;
	}
	size_t torn = c->torn && n ? (size_t)qsm_rng_below(&g, n) : SIZE_MAX;
	uint64_t before = qsm_sim_torn(r->sim);
	if (r->res)
		r->res->unflushed = n;
	qsm_sim_crash_torn(r->sim, keep, beyond, torn);
	if (r->bsim)
		qsm_sim_crash(r->bsim, 0, false); /* read-only: only drops its reads */
	r->w.stopped = true;
	if (r->sched)
		fprintf(r->sched, "crash: %zu unflushed writes, %s, torn %s\n", n,
			fz_mode_name(c->crash_mode), qsm_sim_torn(r->sim) > before ? "yes" : "no");
	event_base_loopbreak(r->base);
}

static void io_trace_cb(void *opaque, const struct qsm_io_req *req, bool done, int ret)
{
	struct run *r = opaque;
	if (r->sched && !r->w.stopped)
		fprintf(r->sched, "%s %s %s %#" PRIx64 "+%" PRIu64 "%s%s\n", done ? "done" : "submit",
			qsm_io_op_name(req->op), qsm_io_event_name(req->event), req->offset, req->len,
			done && ret ? " " : "", done && ret ? qsm_strerror(ret) : "");
	if (done && ret < 0 && !r->w.stopped && is_meta_event(req->event) && req->op != QSM_IO_READ)
		wl_note_meta_fail(&r->w, req->event);
	/* Crash points are completions that change the disk or what is
	 * durable: a read's completion leaves the disk as the one before. */
	if (!done || r->w.stopped || req->op == QSM_IO_READ)
		return;
	++r->completions;
	if (r->res && r->res->n_meta < QSM_ARRAY_SIZE(r->res->meta_at) &&
	    (is_meta_event(req->event) || req->op == QSM_IO_FLUSH))
		r->res->meta_at[r->res->n_meta++] = r->completions;
	if (r->res && r->w.snap_pending && r->res->n_snap < QSM_ARRAY_SIZE(r->res->snap_at))
		r->res->snap_at[r->res->n_snap++] = r->completions;
	if (r->completions == r->c->crash_at)
		do_crash(r);
}

static int open_backing_sim(void *opaque, struct event_base *base, const char *name,
			    const char *path, int flags, struct qsm_io **out)
{
	struct run *r = opaque;
	(void)name; /* the case has one backing file */
	(void)path;
	return qsm_io_open_sim(base, r->bsim, flags | QSM_IO_RDONLY, out);
}

static struct qsm_open_opts open_opts(struct run *r, bool read_only)
{
	const struct fz_case *c = r->c;
	return (struct qsm_open_opts){
		.read_only = read_only, .cache = c->cache,
		.l2_cache_size = c->l2_tables * c->cluster,
		.work_threads = -1, /* deflate and inflate on the loop, in order: replayable */
		.open_backing_io = r->bsim ? open_backing_sim : NULL, .open_backing_opaque = r,
	};
}

/* The workload, to its end (then a clean close) or to the crash (then the
 * image is abandoned).  -errno when the image does not even open. */
static int run_workload(struct run *r, char *err, size_t errlen)
{
	const struct fz_case *c = r->c;
	struct qsm_io *io;
	bool lsan_off = c->crash_at || c->fault;
	int ret;
	if (lsan_off)
		LSAN_OFF();
	r->base = event_base_new();
	if ((ret = qsm_io_open_sim(r->base, r->sim, 0, &io)) < 0)
		goto out;
	io->trace = io_trace_cb;
	io->trace_opaque = r;
	if (c->fault)
		qsm_sim_fault_add(r->sim, c->fev, c->ferr, c->fonce);
	struct qsm_open_opts oo = open_opts(r, false);
	ret = qsm_open_io(r->base, io, &oo, &r->img, err, errlen);
	if (ret < 0) {
		/* A fault at open (refcount blocks are read there) must fail the
		 * open cleanly: the run is the open alone. */
		r->img = NULL;
		if (c->fault) {
			r->fired = qsm_sim_faults_fired(r->sim);
			qsm_sim_fault_clear(r->sim);
			if (r->fired) {
				wl_note_error(&r->w, "open failed: %s", err);
				ret = 0;
			}
		}
		goto out;
	}
	if (wl_run(&r->w, r->img, 0, c->nops, c->depth) < 0) {
		/* A hang (noted by the engine): end it as a process kill. */
		if (!lsan_off)
			LSAN_OFF(), lsan_off = true;
		qsm_sim_crash(r->sim, ~0ull, true);
		if (r->bsim)
			qsm_sim_crash(r->bsim, 0, false);
		r->w.stopped = true;
	}
	if (c->fault && c->fcrash && !r->w.stopped) {
		/* A power loss instead of the close; cache=unsafe never syncs
		 * (as QEMU), so it promises nothing then: a process kill. */
		if (c->cache == QSM_CACHE_UNSAFE)
			qsm_sim_crash(r->sim, ~0ull, true);
		else
			qsm_sim_crash_random(r->sim);
		if (r->bsim)
			qsm_sim_crash(r->bsim, 0, false);
		r->w.stopped = true;
	}
	struct qsm_stats st;
	qsm_get_stats(r->img, &st);
	r->res->late_writes = st.snap_late_writes;
	if (r->w.stopped) {
		qsm_abandon(r->img);
	} else {
		if (!c->fault)
			io->trace = NULL;
		r->close_ret = qsm_close(r->img);
		if (r->close_ret && !c->fault)
			wl_violation(&r->w, "close fails: %s", qsm_strerror(r->close_ret));
		if (r->close_ret == 0)
			wl_note_sync(&r->w);
	}
	r->img = NULL;
	ret = 0;
out:
	if (c->fault) {
		r->fired = QSM_MAX(r->fired, qsm_sim_faults_fired(r->sim));
		qsm_sim_fault_clear(r->sim);
	}
	if (lsan_off)
		LSAN_ON();
	event_base_free(r->base);
	r->base = NULL;
	return ret;
}

/* --- judging the disk ---------------------------------------------------------- */
/* qemu-img check of the sim disk's current contents: its exit code, or -1
 * when it cannot run. */
static int qemu_check(struct run *r, uint64_t *corrupt, uint64_t *leaks)
{
	char path[400], cmd[600], line[512];
	snprintf(path, sizeof(path), "%s/work.qcow2", r->env->tmpdir);
	*corrupt = *leaks = 0;
	if (qsm_sim_save_file(r->sim, path) < 0)
		return -1;
	snprintf(cmd, sizeof(cmd), "qemu-img check '%s' 2>&1", path);
	FILE *p = popen(cmd, "r");
	if (!p)
		return -1;
	while (fgets(line, sizeof(line), p)) {
		unsigned long long v;
		if (strstr(line, " errors were found on the image") && sscanf(line, "%llu", &v) == 1)
			*corrupt = v;
		else if (strstr(line, " leaked clusters were found on the image") &&
			 sscanf(line, "%llu", &v) == 1)
			*leaks = v;
	}
	int st = pclose(p);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

/* Read the whole guest view of the sim disk.  0 or -errno (msg says). */
static int read_all(struct run *r, bool read_only, uint8_t *disk, struct qsm_image **keep,
		    char *msg, size_t msglen)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	struct qsm_image *img;
	char err[256] = "";
	int ret = qsm_io_open_sim(b, r->sim, read_only ? QSM_IO_RDONLY : 0, &io);
	struct qsm_open_opts oo = open_opts(r, read_only);
	if (ret == 0)
		ret = qsm_open_io(b, io, &oo, &img, err, sizeof(err));
	if (ret < 0) {
		snprintf(msg, msglen, "%s open fails: %s (%s)", read_only ? "read-only" : "read-write",
			 qsm_strerror(ret), err);
		event_base_free(b);
		return ret;
	}
	ret = qsm_sync_pread(img, disk, r->c->size, 0);
	if (ret < 0)
		snprintf(msg, msglen, "reading the %s image fails: %s (%s)",
			 read_only ? "read-only" : "reopened", qsm_strerror(ret), qsm_image_error(img));
	if (keep && ret == 0) {
		*keep = img; /* the caller closes it and frees the base */
		return 0;
	}
	qsm_close(img);
	event_base_free(b);
	return ret;
}

/* The disk of the snapshot `name` (read-only, as found): 1, 0 when the
 * image has no such snapshot, or -errno with msg. */
static int read_snapshot(struct run *r, const char *name, uint8_t *disk, char *msg, size_t msglen)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	struct qsm_image *img;
	char err[256] = "";
	struct qsm_open_opts oo = open_opts(r, true);
	oo.snapshot_name = name;
	int ret = qsm_io_open_sim(b, r->sim, QSM_IO_RDONLY, &io);
	if (ret == 0)
		ret = qsm_open_io(b, io, &oo, &img, err, sizeof(err));
	if (ret == -ENOENT) {
		event_base_free(b);
		return 0;
	}
	if (ret < 0) {
		snprintf(msg, msglen, "opening snapshot %s fails: %s (%s)", name, qsm_strerror(ret), err);
		event_base_free(b);
		return ret;
	}
	/* The snapshot's disk size is the image's (no resize in a run). */
	ret = qsm_sync_pread(img, disk, r->c->size, 0);
	if (ret < 0)
		snprintf(msg, msglen, "reading snapshot %s fails: %s (%s)", name, qsm_strerror(ret),
			 qsm_image_error(img));
	qsm_close(img);
	event_base_free(b);
	return ret < 0 ? ret : 1;
}

/*
 * --snapshots: every snapshot a create of the run may have made, in the
 * image as found.  Present: its disk is the one the create took
 * (wl_check_snapshot), whether the create completed or the crash came
 * after its commit.  A create that succeeded (and no delete of it was
 * submitted) left one for sure, a delete that succeeded took it away, both
 * durable before their callbacks (a full write-back each): unless
 * cache=unsafe, where nothing is.
 */
static bool judge_snapshots(struct run *r, uint8_t *disk, char *why, size_t whylen)
{
	const struct fz_case *c = r->c;
	char name[32], msg[600];
	for (int i = 0; i < c->nops; i++) {
		const struct wl_op *o = &c->ops[i];
		const struct wl_state *s = &r->w.st[i];
		if (o->kind != WL_SNAPSHOT || !s->submitted)
			continue;
		bool del_sub = false, del_ok = false;
		for (int k = i + 1; k < c->nops; k++)
			if (c->ops[k].kind == WL_SNAPSHOT_DELETE && c->ops[k].off == o->off &&
			    r->w.st[k].submitted && r->w.st[k].ret != -ECANCELED) {
				del_sub = true;
				del_ok |= r->w.st[k].t_done != WL_NEVER && r->w.st[k].ret == 0;
			}
		bool sure = c->cache != QSM_CACHE_UNSAFE;
		bool made = s->t_done != WL_NEVER && s->ret == 0;
		int ret = read_snapshot(r, wl_snapshot_name(o->off, name, sizeof(name)), disk, msg,
					sizeof(msg));
		if (ret < 0) {
			snprintf(why, whylen, "%s", msg);
			return false;
		}
		if (ret == 0 && made && !del_sub && sure) {
			snprintf(why, whylen, "snapshot %s (op %d) succeeded and is missing", name, i);
			return false;
		}
		if (ret == 1 && del_ok && sure) {
			snprintf(why, whylen, "snapshot %s (op %d) was deleted and is still there", name, i);
			return false;
		}
		if (ret == 1 && !wl_check_snapshot(&r->w, i, disk, msg, sizeof(msg))) {
			snprintf(why, whylen, "%s (snapshot %s)", msg, name);
			return false;
		}
	}
	return true;
}

static bool has_snapshot_ops(const struct fz_case *c)
{
	for (int i = 0; i < c->nops; i++)
		if (wl_is_snapshot(c->ops[i].kind))
			return true;
	return false;
}

static int run_here(struct fz_env *env, const struct fz_case *c, bool qemu_check_it, bool trace,
		    struct fz_result *res)
{
	struct run r = { .c = c, .env = env, .res = res };
	char err[512] = "", msg[900];
	bool ok = true;
	int ret;
	memset(res, 0, sizeof(*res));

#define FAIL(...)                                                                  \
	do {                                                                       \
		if (ok)                                                            \
			snprintf(res->why, sizeof(res->why), __VA_ARGS__);         \
		ok = false;                                                        \
	} while (0)

	if ((ret = prepare(env, c, err, sizeof(err))) < 0) {
		snprintf(res->why, sizeof(res->why), "preparing the image: %s", err);
		return ret;
	}
	struct wl_params wp = { .size = c->size, .cluster = c->cluster, .cache = c->cache,
				.discard_noop = c->backing && c->compat == 2, .faults = c->fault };
	uint8_t *disk = malloc(c->size);
	if (!disk || wl_init(&r.w, c->ops, c->nops, &wp) < 0)
		abort();
	r.w.read_faults = c->fault && is_read_event(c->fev);
	initial_view(c, r.w.init);
	char top[400], bk[400];
	snprintf(top, sizeof(top), "%s/top.qcow2", env->tmpdir);
	snprintf(bk, sizeof(bk), "%s/backing.img", env->tmpdir);
	r.sim = qsm_sim_new(c->seed);
	if ((ret = qsm_sim_load_file(r.sim, top)) < 0)
		goto setup_fail;
	qsm_sim_set_max_batch(r.sim, c->max_batch);
	qsm_sim_set_keyed_schedule(r.sim, c->keyed);
	qsm_sim_set_race_hook(r.sim, wl_sim_race_cb, &r.w);
	if (c->backing) {
		r.bsim = qsm_sim_new(c->seed ^ 0x5eed5eedull);
		if ((ret = qsm_sim_load_file(r.bsim, bk)) < 0)
			goto setup_fail;
		qsm_sim_set_max_batch(r.bsim, c->max_batch);
		qsm_sim_set_keyed_schedule(r.bsim, c->keyed);
	}
	if (trace) {
		snprintf(res->schedule_path, sizeof(res->schedule_path), "%s/schedule.log", env->tmpdir);
		r.sched = fopen(res->schedule_path, "w");
	}

	/* The workload. */
	if ((ret = run_workload(&r, err, sizeof(err))) < 0) {
		FAIL("the image does not open: %s (%s)", qsm_strerror(ret), err);
		goto done;
	}
	res->completions = r.completions;
	for (int i = 0; i < c->nops; i++)
		if (wl_is_snapshot(c->ops[i].kind) && r.w.st[i].t_done != WL_NEVER && !r.w.st[i].ret) {
			res->snap_ops++;
			res->applies += c->ops[i].kind == WL_SNAPSHOT_APPLY;
		}
	res->crashed = r.w.stopped;
	res->faults_fired = r.fired;
	res->torn = qsm_sim_torn(r.sim);
	if (c->crash_at && !r.w.stopped)
		FAIL("the run ended after %" PRIu64 " completions without reaching crash point %" PRIu64
		     " (nondeterministic?)", r.completions, c->crash_at);
	if (r.w.races)
		FAIL("%" PRIu64 " engine races; first: %s", r.w.races, r.w.first_race);
	if (r.w.op_errors && !c->fault)
		FAIL("%d requests failed; first: %s", r.w.op_errors, r.w.first_error);
	if (r.w.violations)
		FAIL("%s", r.w.first_violation);
	if (c->fault) {
		/* A fault must surface: a request fails, or the close does (a
		 * write-back at close has no request to tell).  Preallocation
		 * (cluster_alloc) is advisory (io/io.h); a power loss takes the
		 * close away. */
		if (r.fired && !r.w.op_errors && !r.close_ret && !r.w.stopped &&
		    c->fev != QSM_IO_EV_CLUSTER_ALLOC)
			FAIL("%" PRIu64 " faults fired and no request nor the close reported an error",
			     r.fired);
		if (r.w.meta_fail && !r.w.stopped && !r.close_ret)
			FAIL("close returns success after the failed %s write",
			     qsm_io_event_name(r.w.meta_fail_ev));
	}
	if (!ok)
		goto done;

	/* The image as found. */
	bool dirty = wl_sim_dirty(r.sim);
	bool after_crash = r.w.stopped, plain = !c->crash_at && !c->fault;
	struct qsm_check_result cr;
	int orc = wl_sim_check(r.sim, &cr, err, sizeof(err));
	uint64_t found_end = cr.image_end_offset;
	if (orc < 0)
		FAIL("the structural check cannot run on the %s image: %s",
		     after_crash ? "crash" : "closed", err);
	else if (plain && orc != 0)
		FAIL("after a clean close, the check finds %" PRIu64 " corruptions and %" PRIu64
		     " leaks", cr.corruptions, cr.leaks);
	else if (orc == 2 && !((c->lazy || has_snapshot_ops(c)) && dirty))
		FAIL("the %s image has %" PRIu64 " corruptions%s", after_crash ? "crash" : "final",
		     cr.corruptions, c->lazy || has_snapshot_ops(c) ? " and the dirty bit is clear" : "");
	/* A snapshot operation in the middle (the dirty bit held) may leave
	 * COPIED flags its repair mends, as QEMU's does, and leaks; never a
	 * refcount below the references (refcounts are eager without lazy). */
	else if (orc == 2 && !c->lazy && cr.refcounts_low)
		FAIL("the %s image has %" PRIu64 " clusters referenced more often than their "
		     "refcount says", after_crash ? "crash" : "final", cr.refcounts_low);
	else if (orc != 0 && orc != 2 && orc != 3)
		FAIL("the structural check exits %d on the %s image", orc,
		     after_crash ? "crash" : "final");
	if (ok && qemu_check_it && env->have_qemu_img) {
		uint64_t qc, ql;
		int qrc = qemu_check(&r, &qc, &ql);
		res->qemu_checked = qrc >= 0;
		if (qrc >= 0 && (qrc != orc || qc != cr.corruptions || ql != cr.leaks))
			FAIL("qemu-img check (exit %d, %" PRIu64 " corruptions, %" PRIu64 " leaks) "
			     "disagrees with the in-tree check (exit %d, %" PRIu64 " corruptions, %" PRIu64
			     " leaks)", qrc, qc, ql, orc, cr.corruptions, cr.leaks);
	}
	/* A dirty image opens read-only, as found, and its data is there. */
	if (ok && dirty) {
		if (read_all(&r, true, disk, NULL, msg, sizeof(msg)) < 0)
			FAIL("dirty image: %s", msg);
		else if (!wl_check_durable(&r.w, disk, msg, sizeof(msg)))
			FAIL("durability (the dirty image read-only): %s", msg);
	}
	if (ok && !judge_snapshots(&r, disk, msg, sizeof(msg)))
		FAIL("%s", msg);
	/* It opens read-write (repairing when dirty) and holds what was
	 * promised; then it takes a write, a flush and a close. */
	if (ok) {
		struct qsm_image *img = NULL;
		if (read_all(&r, false, disk, &img, msg, sizeof(msg)) < 0) {
			FAIL("reopen: %s", msg);
		} else {
			if (!wl_check_durable(&r.w, disk, msg, sizeof(msg)))
				FAIL("durability%s: %s", after_crash ? " after the crash" : "", msg);
			struct qsm_rng g;
			qsm_rng_seed(&g, c->seed + 77);
			uint64_t len = QSM_MIN((uint64_t)c->cluster + 100, c->size);
			uint64_t off = qsm_rng_below(&g, c->size - len + 1);
			uint8_t *buf = malloc(len);
			memset(buf, 0xa5, len);
			ret = qsm_sync_pwrite(img, buf, len, off);
			if (!ret)
				ret = qsm_sync_flush(img);
			if (ret)
				FAIL("writing to the reopened image fails: %s (%s)", qsm_strerror(ret),
				     qsm_image_error(img));
			free(buf);
			struct event_base *b = qsm_image_base(img);
			if ((ret = qsm_close(img)) < 0)
				FAIL("closing the reopened image fails: %s", qsm_strerror(ret));
			event_base_free(b);
		}
	}
	if (ok && !plain) {
		orc = wl_sim_check(r.sim, &cr, err, sizeof(err));
		if (wl_sim_dirty(r.sim) && c->lazy)
			FAIL("dirty bit still set after a repairing open and a clean close");
		else if (orc == 2 || (orc != 0 && orc != 3))
			FAIL("after reopen, write and close, the check exits %d (%" PRIu64
			     " corruptions)", orc, cr.corruptions);
		else if (c->lazy && dirty && orc != 0 &&
			 cr.leaks > (cr.image_end_offset - QSM_MIN(found_end, cr.image_end_offset)) /
				    c->cluster)
			/* The repair leaves no leak it can see.  Nor can it (nor
			 * QEMU's) see refcounts the crash left for clusters past
			 * the end of the file (the metadata batch that wrote a
			 * refcount block counted data clusters whose writes were
			 * lost); they show as leaks once the file grows over them. */
			FAIL("after the repairing open and a close, %" PRIu64 " leaks remain: a repair "
			     "leaves none but past the end of the crashed file", cr.leaks);
	}
	goto done;

setup_fail:
	snprintf(res->why, sizeof(res->why), "loading the image onto the sim disk: %s",
		 qsm_strerror(ret));
	qsm_sim_free(r.sim);
	if (r.bsim)
		qsm_sim_free(r.bsim);
	wl_fini(&r.w);
	free(disk);
	return ret;
done:
	res->ok = ok;
	if (r.sched) {
		if (!ok)
			fprintf(r.sched, "verdict: %s\n", res->why);
		fclose(r.sched);
	}
	wl_fini(&r.w);
	qsm_sim_free(r.sim);
	if (r.bsim)
		qsm_sim_free(r.bsim);
	free(disk);
	return 0;
#undef FAIL
}

/* --- replay files -------------------------------------------------------------- */

int fz_case_save(const struct fz_case *c, const char *mutant, const char *path,
		 const char *schedule_path, const char *why)
{
	FILE *f = fopen(path, "w");
	if (!f)
		return -errno;
	fprintf(f, "# qsm fuzz replay: qsm fuzz --replay %s\n", path);
	if (why)
		fprintf(f, "# failure: %s\n", why);
	fprintf(f, "qsm-fuzz-replay 1\n");
	fprintf(f, "seed %" PRIu64 "\n", c->seed);
	/* " empty=1" and " zstd=1" came later, written only when set: files
	 * without them are prefilled zlib cases, and readers from before
	 * ignore them. */
	fprintf(f, "image cluster=%u size=%" PRIu64 " compat=%u lazy=%d l2-tables=%zu cache=%s "
		"backing=%d backing-raw=%d backing-size=%" PRIu64 " compressed=%d%s%s\n",
		c->cluster, c->size, c->compat, c->lazy, c->l2_tables, qsm_cache_mode_name(c->cache),
		c->backing, c->backing_raw, c->backing_size, c->compressed, c->empty ? " empty=1" : "",
		c->zstd ? " zstd=1" : "");
	fprintf(f, "schedule depth=%d batch=%u keyed=%d\n", c->depth, c->max_batch, c->keyed);
	if (c->crash_at)
		fprintf(f, "crash point=%" PRIu64 " mode=%s torn=%d mask=%#" PRIx64 "\n", c->crash_at,
			fz_mode_name(c->crash_mode), c->torn, c->keep_mask);
	if (c->fault)
		fprintf(f, "fault event=%s errno=%s once=%d then-crash=%d\n", qsm_io_event_name(c->fev),
			c->ferr == ENOSPC ? "ENOSPC" : "EIO", c->fonce, c->fcrash);
	if (mutant && *mutant)
		fprintf(f, "mutant %s\n", mutant);
	for (int i = 0; i < c->nops; i++) {
		const struct wl_op *o = &c->ops[i];
		fprintf(f, "op %s %#" PRIx64 " %" PRIu64 " flags=%u iov=%" PRIu64 ",%" PRIu64 "\n",
			wl_kind_name(o->kind), o->off, o->len, o->flags, o->split_a, o->split_b);
	}
	if (schedule_path && *schedule_path) {
		FILE *s = fopen(schedule_path, "r");
		char line[300];
		fprintf(f, "# the I/O schedule of this run (submissions and completions, in order):\n");
		while (s && fgets(line, sizeof(line), s))
			fprintf(f, "#   %s", line);
		if (s)
			fclose(s);
	}
	return fclose(f) ? -errno : 0;
}

static int find_name(const char *const *names, int n, const char *s)
{
	for (int i = 0; i < n; i++)
		if (!strcmp(names[i], s))
			return i;
	return -1;
}

int fz_case_load(struct fz_case *c, char *mutant, size_t mutant_len, const char *path,
		 char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	char line[512];
	int lineno = 0, ver = 0;
	memset(c, 0, sizeof(*c));
	if (mutant && mutant_len)
		mutant[0] = 0;
	if (!f) {
		qsm_set_err(err, errlen, "cannot open '%s': %s", path, strerror(errno));
		return -errno;
	}
	int cap = 0;
	while (fgets(line, sizeof(line), f)) {
		lineno++;
		char a[64] = "", b[64] = "", d[64] = "";
		int lazy, backing, braw, comp, torn, once, fc, keyed = 0;
		unsigned long long x, y, sa, sb;
		unsigned fl;
		if (line[0] == '#' || line[0] == '\n')
			continue;
		if (sscanf(line, "qsm-fuzz-replay %d", &ver) == 1)
			continue;
		if (sscanf(line, "seed %" SCNu64, &c->seed) == 1)
			continue;
		if (sscanf(line, "image cluster=%u size=%" SCNu64 " compat=%u lazy=%d l2-tables=%zu "
			   "cache=%63s backing=%d backing-raw=%d backing-size=%" SCNu64 " compressed=%d",
			   &c->cluster, &c->size, &c->compat, &lazy, &c->l2_tables, a, &backing,
			   &braw, &c->backing_size, &comp) == 10) {
			c->lazy = lazy, c->backing = backing, c->backing_raw = braw, c->compressed = comp;
			c->empty = strstr(line, " empty=1") != NULL;
			c->zstd = strstr(line, " zstd=1") != NULL;
			if (qsm_cache_mode_parse(a, &c->cache) < 0)
				goto bad;
			continue;
		}
		if (sscanf(line, "schedule depth=%d batch=%u keyed=%d", &c->depth, &c->max_batch,
			   &keyed) >= 2) {
			c->keyed = keyed; /* files from before keyed schedules: the PRNG */
			continue;
		}
		if (sscanf(line, "crash point=%" SCNu64 " mode=%63s torn=%d mask=%" SCNx64, &c->crash_at,
			   a, &torn, &c->keep_mask) >= 3) {
			int m = find_name(mode_names, FZ__MODES, a);
			if (m < 0)
				goto bad;
			c->crash_mode = (enum fz_crash_mode)m;
			c->torn = torn;
			continue;
		}
		if (sscanf(line, "fault event=%63s errno=%63s once=%d then-crash=%d", a, b, &once, &fc) == 4) {
			int e = -1;
			for (int i = 0; i < QSM_IO_EV__COUNT; i++)
				if (!strcmp(qsm_io_event_name((enum qsm_io_event)i), a))
					e = i;
			if (e < 0)
				goto bad;
			c->fault = true;
			c->fev = (enum qsm_io_event)e;
			c->ferr = !strcmp(b, "ENOSPC") ? ENOSPC : EIO;
			c->fonce = once;
			c->fcrash = fc;
			continue;
		}
		if (sscanf(line, "mutant %63s", a) == 1) {
			if (mutant)
				snprintf(mutant, mutant_len, "%s", a);
			continue;
		}
		if (sscanf(line, "op %63s %llx %llu flags=%u iov=%llu,%llu", d, &x, &y, &fl, &sa, &sb) == 6) {
			int k = -1;
			for (int i = 0; i < WL__KINDS; i++)
				if (!strcmp(wl_kind_name((enum wl_kind)i), d))
					k = i;
			if (k < 0)
				goto bad;
			if (c->nops == cap) {
				cap = cap ? cap * 2 : 64;
				struct wl_op *n = realloc(c->ops, sizeof(*n) * (size_t)cap);
				if (!n)
					abort();
				c->ops = n;
			}
			c->ops[c->nops++] = (struct wl_op){ (enum wl_kind)k, x, y, fl, sa, sb };
			continue;
		}
bad:
		qsm_set_err(err, errlen, "%s:%d: cannot parse: %.*s", path, lineno,
			    (int)strcspn(line, "\n"), line);
		fclose(f);
		fz_case_free(c);
		return -EINVAL;
	}
	fclose(f);
	if (ver != 1 || !c->cluster || !c->size || !c->nops || c->depth < 1 ||
	    (c->cluster & (c->cluster - 1)) || c->cluster < 512) {
		qsm_set_err(err, errlen, "%s: not a complete qsm fuzz replay file", path);
		fz_case_free(c);
		return -EINVAL;
	}
	for (int i = 0; i < c->nops; i++) {
		const struct wl_op *o = &c->ops[i];
		if (wl_is_snapshot(o->kind) ? o->len != 0
					    : o->kind != WL_FLUSH &&
						      (o->off > c->size || o->len > c->size - o->off || !o->len)) {
			qsm_set_err(err, errlen, "%s: op %d lies outside the %" PRIu64 "-byte disk", path,
				    i, c->size);
			fz_case_free(c);
			return -EINVAL;
		}
	}
	return 0;
}

/* --- shrinking ----------------------------------------------------------------- */

/* Does case c fail?  A crash case tries crash points spread over its run
 * (the old point means nothing once requests changed) and keeps the first
 * failing one in c. */
static bool still_fails(struct fz_env *env, struct fz_case *c, unsigned *budget)
{
	struct fz_result res;
	if (!*budget)
		return false;
	if (!c->crash_at) {
		(*budget)--;
		return fz_run(env, c, false, false, &res) == 0 && !res.ok;
	}
	struct fz_case dry;
	if (fz_case_copy(&dry, c) < 0)
		return false;
	dry.crash_at = 0;
	(*budget)--;
	if (fz_run(env, &dry, false, false, &res) < 0) {
		fz_case_free(&dry);
		return false;
	}
	fz_case_free(&dry);
	if (!res.ok)
		return c->crash_at = 0, true; /* fails without crashing: simpler still */
	uint64_t n = res.completions, tries = QSM_MIN(n, 24);
	for (uint64_t i = 0; i < tries && *budget; i++) {
		uint64_t k = tries == n ? i + 1 : 1 + i * n / tries;
		uint64_t old = c->crash_at;
		c->crash_at = k;
		(*budget)--;
		if (fz_run(env, c, false, false, &res) == 0 && !res.ok)
			return true;
		c->crash_at = old;
	}
	return false;
}

/* Keep only the flushes and the requests whose range satisfies keep(). */
static bool try_filter(struct fz_env *env, struct fz_case *c, unsigned *budget,
		       bool (*keep)(const struct wl_op *o, uint64_t arg), uint64_t arg)
{
	struct fz_case t;
	if (fz_case_copy(&t, c) < 0)
		return false;
	int n = 0;
	for (int i = 0; i < t.nops; i++)
		if (t.ops[i].kind == WL_FLUSH || wl_is_snapshot(t.ops[i].kind) || keep(&t.ops[i], arg))
			t.ops[n++] = t.ops[i];
	if (n == t.nops || n < 2) {
		fz_case_free(&t);
		return false;
	}
	t.nops = n;
	if (still_fails(env, &t, budget)) {
		fz_case_free(c);
		*c = t;
		return true;
	}
	fz_case_free(&t);
	return false;
}

static bool touches_byte(const struct wl_op *o, uint64_t x)
{
	return o->off <= x && x < o->off + o->len;
}

static bool not_a_read(const struct wl_op *o, uint64_t arg)
{
	(void)arg;
	return o->kind != WL_READ;
}

void fz_shrink(struct fz_env *env, struct fz_case *c, unsigned budget, const char *why)
{
	/* First the big cuts: when the verdict names a byte, only the requests
	 * touching it; then without the reads that did not fail. */
	const char *b = why ? strstr(why, "byte 0x") : NULL;
	if (b) {
		uint64_t x = strtoull(b + 5, NULL, 16);
		try_filter(env, c, &budget, touches_byte, x);
	}
	if (!why || !strstr(why, " read "))
		try_filter(env, c, &budget, not_a_read, 0);
	/* Requests: delta debugging over the list (the final flush stays). */
	for (int chunk = QSM_MAX(c->nops / 2, 1); chunk >= 1 && budget; chunk /= 2) {
		for (int at = 0; at + 1 < c->nops && budget;) {
			int n = QSM_MIN(chunk, c->nops - 1 - at);
			struct fz_case t;
			if (n <= 0 || fz_case_copy(&t, c) < 0)
				break;
			memmove(t.ops + at, t.ops + at + n, sizeof(*t.ops) * (size_t)(t.nops - at - n));
			t.nops -= n;
			if (still_fails(env, &t, &budget)) {
				fz_case_free(c);
				*c = t;
			} else {
				fz_case_free(&t);
				at += n;
			}
		}
		if (chunk == 1)
			break;
	}
	/* The schedule: fewer in flight, one completion per pass. */
	static const int depths[] = { 1, 2, 4, 8 };
	for (size_t i = 0; i < QSM_ARRAY_SIZE(depths) && budget; i++) {
		if (depths[i] >= c->depth)
			break;
		struct fz_case t;
		if (fz_case_copy(&t, c) < 0)
			break;
		t.depth = depths[i];
		if (still_fails(env, &t, &budget)) {
			fz_case_free(c);
			*c = t;
			break;
		}
		fz_case_free(&t);
	}
	if (c->max_batch > 1 && budget) {
		struct fz_case t;
		if (fz_case_copy(&t, c) == 0) {
			t.max_batch = 1;
			if (still_fails(env, &t, &budget)) {
				fz_case_free(c);
				*c = t;
			} else {
				fz_case_free(&t);
			}
		}
	}
}

size_t fz_fault_events(const enum qsm_io_event **out)
{
	*out = fault_events;
	return QSM_ARRAY_SIZE(fault_events);
}

/* --- isolation ------------------------------------------------------------------ */

/*
 * Each run happens in a child process: an engine that aborts (an assertion,
 * a sanitizer report) fails that case instead of killing the fuzzer, which
 * then still writes the replay file and shrinks; and the memory a crashed
 * run leaves behind by design (qsm_abandon forgets the requests in flight)
 * goes with the child.  A run that neither crashes nor injects faults is
 * checked for leaks before the child exits (LeakSanitizer builds).  The
 * result comes back through a pipe.
 */
int fz_run(struct fz_env *env, const struct fz_case *c, bool qemu_check_it, bool trace,
	   struct fz_result *res)
{
	struct { int ret; struct fz_result res; } msg;
	int p[2];
	if (env->in_process)
		return run_here(env, c, qemu_check_it, trace, res);
	memset(res, 0, sizeof(*res));
	fflush(NULL);
	if (pipe(p) < 0)
		return run_here(env, c, qemu_check_it, trace, res);
	pid_t pid = fork();
	if (pid < 0) {
		close(p[0]);
		close(p[1]);
		return run_here(env, c, qemu_check_it, trace, res);
	}
	if (pid == 0) {
		close(p[0]);
		msg.ret = run_here(env, c, qemu_check_it, trace, &msg.res);
#ifdef __SANITIZE_ADDRESS__
		if (msg.ret == 0 && msg.res.ok && !c->crash_at && !c->fault &&
		    __lsan_do_recoverable_leak_check()) {
			msg.res.ok = false;
			snprintf(msg.res.why, sizeof(msg.res.why),
				 "memory leaked (the LeakSanitizer report above says where)");
		}
#endif
		ssize_t w = write(p[1], &msg, sizeof(msg));
		_exit(w == (ssize_t)sizeof(msg) ? 0 : 1);
	}
	close(p[1]);
	size_t got = 0;
	while (got < sizeof(msg)) {
		ssize_t n = read(p[0], (char *)&msg + got, sizeof(msg) - got);
		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			break;
		}
		got += (size_t)n;
	}
	close(p[0]);
	int st;
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	if (got == sizeof(msg)) {
		*res = msg.res;
		return msg.ret;
	}
	res->ok = false;
	if (WIFSIGNALED(st))
		snprintf(res->why, sizeof(res->why), "the engine died: signal %d (%s); its message "
			 "is above", WTERMSIG(st), strsignal(WTERMSIG(st)));
	else
		snprintf(res->why, sizeof(res->why), "the engine exited with status %d in the middle "
			 "of the run", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	return 0;
}
