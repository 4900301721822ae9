/*
 * tests/unit/test_sm.c: Check suite "sm" for the request state machines.
 *
 *  - table: the transition table is well formed (every machine reaches DONE
 *    from every state it can enter, every state is reachable from START).
 *  - engine: random concurrent workloads (writes, reads, write-zeroes,
 *    discards, flushes at any alignment, overlapping, across L2 tables) on
 *    the sim, threads and io_uring backends, run and judged by the workload
 *    engine (tools/workload.h): each byte a read returns, and each byte a
 *    batch touched read back after it, must be a value some order of the
 *    concurrent requests leaves (the request's own pattern per offset);
 *    everything else exactly as before the batch.
 *    Tiny L2 caches (1 and 2 tables) force eviction and write-back under load.
 *    At the end the image is reopened and compared whole, and checked with
 *    `qemu-img check` when it is installed.
 *    The same over a backing file (engine_backing_*).
 *  - reuse: a cluster unmapped while a data I/O that found it through the
 *    old L2 entry is still in flight is not handed to a new allocation
 *    before that I/O is over (a late write would land in the new owner's
 *    data, a late read would return it): LIFO completion order on the sim.
 *  - backing: reads through a shorter backing file, COW from it, zero write,
 *    discard and block status semantics (v2 and v3), no_backing, loops and
 *    unknown formats refused; raw images.
 * Seeds are printed; QSM_TEST_SEED=N reruns one.
 */
#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/sim.h"
#include "metadata/qcow2.h"
#include "metadata/check.h"
#include "sm/sm.h"
#include "tests/unit/skip.h"
#include "tools/workload.h"

/* --- table ----------------------------------------------------------------- */

/* The targets of m's TRANSITION_BACK edges when BREAK is in the set. */
static uint64_t back_edges_from(enum qsm_machine m, uint64_t set)
{
	uint64_t r = 0;
	if (!(set & (1ull << QSM_S_BREAK)))
		return 0;
	for (int s = 0; s < QSM_S__COUNT; s++)
		if (qsm_transition_back(m, s))
			r |= 1ull << s;
	return r;
}

/* States of machine m reachable from START (bitmask over states). */
static uint64_t reachable(enum qsm_machine m)
{
	uint64_t seen = 1ull << QSM_S_START, prev = 0;
	while (seen != prev) {
		prev = seen;
		for (int s = 0; s < QSM_S__COUNT; s++)
			if (seen & (1ull << s))
				for (int e = 0; e < QSM_E__COUNT; e++) {
					int to = qsm_transition(m, s, e);
					if (to >= 0)
						seen |= 1ull << to;
				}
		seen |= back_edges_from(m, seen);
	}
	return seen;
}

START_TEST(table_well_formed)
{
	ck_assert_int_lt(QSM_S__COUNT, 64);
	for (int m = 0; m < QSM_M__COUNT; m++) {
		uint64_t seen = reachable(m);
		ck_assert_msg(seen & (1ull << QSM_S_DONE), "%s never reaches DONE", qsm_machine_name(m));
		/* From every reachable state, DONE is reachable without errors. */
		for (int s = 0; s < QSM_S__COUNT; s++) {
			if (!(seen & (1ull << s)) || s == QSM_S_DONE)
				continue;
			uint64_t r = 1ull << s, p = 0;
			while (r != p) {
				p = r;
				for (int x = 0; x < QSM_S__COUNT; x++)
					if (r & (1ull << x))
						for (int e = 0; e < QSM_E__COUNT; e++) {
							int to = qsm_transition(m, x, e);
							if (to >= 0)
								r |= 1ull << to;
						}
				r |= back_edges_from(m, r);
			}
			ck_assert_msg(r & (1ull << QSM_S_DONE), "%s: %s cannot reach DONE",
				      qsm_machine_name(m), qsm_state_name(s));
		}
		/* DONE is final. */
		for (int e = 0; e < QSM_E__COUNT; e++)
			ck_assert_int_lt(qsm_transition(m, QSM_S_DONE, e), 0);
	}
	/* The write machine has the states the design names. */
	uint64_t w = reachable(QSM_M_WRITE);
	ck_assert(w & (1ull << QSM_S_FROZEN));
	ck_assert(w & (1ull << QSM_S_COW_READ));
	ck_assert(w & (1ull << QSM_S_DURABLE_WAIT));
	ck_assert(!(reachable(QSM_M_READ) & (1ull << QSM_S_L2_ALLOC)));
	ck_assert_str_eq(qsm_state_name(QSM_S_L2_LOOKUP), "L2_LOOKUP");
	ck_assert_int_eq(qsm_transition(QSM_M_READ, QSM_S_L2_LOOKUP, QSM_E_CACHE_MISS), QSM_S_L2_LOAD);
	ck_assert_int_lt(qsm_transition(QSM_M_READ, QSM_S_L2_LOOKUP, QSM_E_NEED_ALLOC), 0);
	/* Breakpoints: entered by ordinary edges, left only by the way back. */
	ck_assert_int_eq(qsm_transition(QSM_M_WRITE, QSM_S_ALLOC_WRITE, QSM_E_BREAK), QSM_S_BREAK);
	ck_assert_int_lt(qsm_transition(QSM_M_WRITE, QSM_S_BREAK, QSM_E_RESUME), 0);
	ck_assert(qsm_transition_back(QSM_M_WRITE, QSM_S_ALLOC_WRITE));
	ck_assert(qsm_transition_back(QSM_M_WRITE, QSM_S_L2_LOOKUP));
	ck_assert(!qsm_transition_back(QSM_M_READ, QSM_S_ALLOC_WRITE));
	ck_assert(!qsm_transition_back(QSM_M_FLUSH, QSM_S_L2_LOOKUP));
}
END_TEST

/* --- engine workloads ------------------------------------------------------- */

/*
 * The requests, the model of expected contents and the oracles are the
 * workload engine's (tools/workload.h, shared with qsm fuzz): this suite
 * draws batches of requests, runs each batch with every request in flight
 * at once (so any two overlapping ones may land in either order), and then
 * settles: what the batch touched is read back, judged, and pinned as the
 * expected contents for the next batch.
 */
enum backend { B_SIM, B_THREADS, B_URING };

static char tmpdir[256];

static void make_tmpdir(void)
{
	const char *base = getenv("TMPDIR");
	snprintf(tmpdir, sizeof(tmpdir), "%s/qsm-test-sm-XXXXXX", base ? base : "/var/tmp");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static bool have_qemu_img(void)
{
	return system("qemu-img --version >/dev/null 2>&1") == 0;
}

static bool overlap(const struct wl_op *a, const struct wl_op *b)
{
	return a->off < b->off + b->len && b->off < a->off + a->len;
}

/* Does op i overlap an earlier op of its batch (from `first`) that sets data
 * (or, with want_read, reads)? */
static bool overlaps_any(const struct wl_op *ops, int first, int i, bool want_read)
{
	for (int j = first; j < i; j++)
		if ((ops[j].kind == WL_READ) == want_read && ops[j].kind != WL_FLUSH &&
		    overlap(&ops[i], &ops[j]))
			return true;
	return false;
}

/*
 * Draw `batches` batches of 1..48 requests each into ops (room for
 * batches * 48), batch b ending at end[b]: writes 55 %, reads 25 %, zero
 * writes 8 % (may-unmap when seed & 2), discards 8 %, flushes 4 %, from a
 * byte to 5 clusters, a third of them cluster-aligned, data buffers split
 * into up to 3 iovecs.  With race_check, a read that would overlap an
 * earlier write of its batch (or a write an earlier read) becomes a flush,
 * so any read/write overlap the sim reports is the engine's own.
 */
static int draw_batches(struct qsm_rng *rng, uint64_t seed, unsigned cluster_size, uint64_t size,
			int batches, bool race_check, struct wl_op *ops, int *end)
{
	int nops = 0;
	for (int b = 0; b < batches; b++) {
		int first = nops, n = 1 + (int)qsm_rng_below(rng, 48);
		for (int k = 0; k < n; k++, nops++) {
			struct wl_op *o = &ops[nops];
			uint64_t r = qsm_rng_below(rng, 100);
			o->kind = r < 55 ? WL_WRITE : r < 80 ? WL_READ : r < 88 ? WL_ZERO
				: r < 96 ? WL_DISCARD : WL_FLUSH;
			/* Lengths from a byte to several clusters; sometimes
			 * cluster aligned, sometimes across an L2 table boundary. */
			uint64_t maxlen = QSM_MIN(size / 4, (uint64_t)cluster_size * 5);
			o->len = 1 + qsm_rng_below(rng, maxlen);
			o->off = qsm_rng_below(rng, size - o->len + 1);
			if (qsm_rng_below(rng, 3) == 0) {
				o->off = QSM_ALIGN_DOWN(o->off, cluster_size);
				o->len = QSM_ALIGN_UP(o->len, cluster_size);
				if (o->off + o->len > size)
					o->len = size - o->off;
			}
			/* Drawn as before, unused: each seed keeps its requests (the
			 * data is the engine's pattern per request and offset). */
			(void)qsm_rng_below(rng, 255);
			if (race_check && (o->kind == WL_READ ? overlaps_any(ops, first, nops, false)
							      : overlaps_any(ops, first, nops, true)))
				o->kind = WL_FLUSH;
			if (o->kind == WL_WRITE || o->kind == WL_READ) {
				o->split_a = qsm_rng_below(rng, o->len + 1);
				o->split_b = o->split_a + qsm_rng_below(rng, o->len - o->split_a + 1);
			} else if (o->kind == WL_ZERO) {
				o->flags = (seed & 2) ? QSM_ZERO_MAY_UNMAP : 0;
			} else if (o->kind == WL_FLUSH) {
				o->off = o->len = 0;
			}
		}
		end[b] = nops;
	}
	return nops;
}

/*
 * With `backing`, the image gets a backing file (absolute name, so the sim
 * disk opened by qsm_open_io finds it) one eighth shorter than the image,
 * with another cluster size, filled with data except every fifth 64 KiB
 * (unallocated there: zeros through the chain); the model starts from its
 * contents, so backing data showing through where it should not (after a
 * zero write or a v3 discard, around a COW) is caught like any wrong byte.
 */
static void make_backing(const char *bpath, uint64_t bsize, unsigned cluster_size,
			 uint64_t seed, uint8_t *model)
{
	char err[256];
	struct event_base *base = event_base_new();
	struct qsm_image *b;
	struct qsm_create_opts bo = { .size = bsize, .cluster_size = cluster_size == 65536 ? 4096 : 65536 };
	ck_assert_msg(qsm_create(bpath, &bo, err, sizeof(err)) == 0, "create backing: %s", err);
	ck_assert_msg(qsm_open(base, bpath, NULL, &b, err, sizeof(err)) == 0, "open backing: %s", err);
	for (uint64_t off = 0; off < bsize; off += 65536) {
		uint64_t len = QSM_MIN(65536, bsize - off);
		if ((off >> 16) % 5 == 4)
			continue;
		for (uint64_t x = off; x < off + len; x++)
			model[x] = (uint8_t)(((x >> 9) * 13 + seed) | 1);
		ck_assert_int_eq(qsm_sync_pwrite(b, model + off, len, off), 0);
	}
	ck_assert_int_eq(qsm_close(b), 0);
	event_base_free(base);
}

/* Fail the test with the engine's first finding, if any. */
static void assert_clean(const struct wl *w, struct qsm_image *img, uint64_t seed, int b,
			 const char *when)
{
	if (!w->violations && !w->op_errors)
		return;
	wl_dump(w, stderr);
	ck_abort_msg("seed %llu batch %d (%s): %s (%s)", (unsigned long long)seed, b, when,
		     w->violations ? w->first_violation : w->first_error,
		     img ? qsm_image_error(img) : "");
}

static void run_workload(enum backend be, uint64_t seed, unsigned cluster_size,
			 uint64_t size, size_t cache_tables, int batches, bool backing)
{
	char path[400], bpath[400] = "", err[256];
	struct qsm_sim *sim = NULL;
	struct qsm_io *io = NULL;
	struct qsm_image *img;
	struct qsm_rng rng;
	struct wl w;
	int ret;

	bool race_check = be == B_SIM && (seed & 4);
	unsigned compat = (seed & 1) ? 3 : 2;
	qsm_rng_seed(&rng, seed);
	struct wl_op *ops = calloc((size_t)batches * 48, sizeof(*ops));
	int *end = calloc((size_t)batches, sizeof(*end));
	ck_assert(ops && end);
	int nops = draw_batches(&rng, seed, cluster_size, size, batches, race_check, ops, end);
	struct wl_params wp = { .size = size, .cluster = cluster_size, .cache = QSM_CACHE_WRITEBACK,
				.discard_noop = backing && compat == 2, .read_every_byte = true };
	ck_assert_int_eq(wl_init(&w, ops, nops, &wp), 0);

	snprintf(path, sizeof(path), "%s/img-%d-%llu.qcow2", tmpdir, be, (unsigned long long)seed);
	if (backing) {
		snprintf(bpath, sizeof(bpath), "%s/base-%d-%llu.qcow2", tmpdir, be,
			 (unsigned long long)seed);
		make_backing(bpath, size - size / 8, cluster_size, seed, w.init);
	}
	struct qsm_create_opts co = { .size = size, .cluster_size = cluster_size, .compat = compat,
				      .backing_file = backing ? bpath : NULL,
				      .backing_format = backing ? "qcow2" : NULL };
	ret = qsm_create(path, &co, err, sizeof(err));
	ck_assert_msg(ret == 0, "create: %s", err);

	struct event_base *base = event_base_new();
	/* Every third seed: a one-block refcount cache, so allocations and
	 * frees keep waiting in REFBLOCK_LOAD for evicted blocks. */
	struct qsm_open_opts oo = { .l2_cache_size = cache_tables * cluster_size,
				    .refcount_cache_size = seed % 3 == 0 ? cluster_size : 0 };
	if (be == B_SIM) {
		sim = qsm_sim_new(seed);
		ck_assert_int_eq(qsm_sim_load_file(sim, path), 0);
		qsm_sim_set_max_batch(sim, 1 + (unsigned)(seed % 4));
		ck_assert_int_eq(qsm_io_open_sim(base, sim, 0, &io), 0);
	} else {
		ret = be == B_URING ? qsm_io_open_uring(base, path, 0, &io)
				    : qsm_io_open_threads(base, path, 0, &io);
		ck_assert_int_eq(ret, 0);
	}
	ret = qsm_open_io(base, io, &oo, &img, err, sizeof(err));
	ck_assert_msg(ret == 0, "open: %s", err);

	/* Each batch all in flight at once; then what it touched, read back,
	 * must be what some order of its requests leaves, and is pinned. */
	for (int b = 0; b < batches; b++) {
		ret = wl_run(&w, img, b ? end[b - 1] : 0, end[b], INT32_MAX);
		assert_clean(&w, img, seed, b, "the requests");
		ck_assert_int_eq(ret, 0);
		wl_settle(&w, img);
		assert_clean(&w, img, seed, b, "read back");
	}

	if (race_check)
		ck_assert_msg(qsm_sim_races(sim) == 0, "seed %llu: %llu engine races",
			      (unsigned long long)seed, (unsigned long long)qsm_sim_races(sim));
	ck_assert_int_eq(qsm_close(img), 0);

	/* Reopen (from the file, or the sim disk saved to it) and compare whole. */
	if (sim) {
		ck_assert_int_eq(qsm_sim_save_file(sim, path), 0);
		qsm_sim_free(sim);
	}
	struct qsm_open_opts ro = { .read_only = true };
	ck_assert_int_eq(qsm_open(base, path, &ro, &img, err, sizeof(err)), 0);
	uint8_t *all = malloc(size);
	ck_assert_int_eq(qsm_sync_pread(img, all, size, 0), 0);
	const uint8_t *want = wl_view(&w);
	for (uint64_t x = 0; x < size; x++)
		if (all[x] != want[x])
			ck_abort_msg("seed %llu: after reopen byte %#llx is %#x, want %#x",
			      (unsigned long long)seed, (unsigned long long)x, all[x], want[x]);
	free(all);
	qsm_close(img);
	if (have_qemu_img()) {
		char cmd[600];
		snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s'", path);
		ck_assert_msg(system(cmd) == 0, "qemu-img check failed on %s (seed %llu)", path,
			      (unsigned long long)seed);
	}
	unlink(path);
	if (backing)
		unlink(bpath);
	event_base_free(base);
	wl_fini(&w);
	free(ops);
	free(end);
}

static uint64_t seed_for(int i)
{
	const char *s = getenv("QSM_TEST_SEED");
	return s ? strtoull(s, NULL, 0) : 1000 + (uint64_t)i;
}

static const struct { unsigned cluster; uint64_t size; size_t cache; } shapes[] = {
	{ 512, 1 << 20, 1 },       /* L2 table = 32 KiB of guest: many tables */
	{ 512, 2 << 20, 2 },
	{ 4096, 8 << 20, 1 },      /* L2 table = 2 MiB */
	{ 4096, 8 << 20, 64 },
	{ 65536, 64 << 20, 2 },
};

START_TEST(engine_sim)
{
	for (int i = 0; i < 12; i++) {
		uint64_t seed = seed_for(i * 16 + _i);
		int sh = (int)(seed % QSM_ARRAY_SIZE(shapes));
		run_workload(B_SIM, seed, shapes[sh].cluster, shapes[sh].size, shapes[sh].cache, 12, false);
		if (getenv("QSM_TEST_SEED"))
			break;
	}
}
END_TEST

START_TEST(engine_threads)
{
	uint64_t seed = seed_for(500 + _i);
	int sh = _i % (int)QSM_ARRAY_SIZE(shapes);
	run_workload(B_THREADS, seed, shapes[sh].cluster, shapes[sh].size, shapes[sh].cache, 20, false);
}
END_TEST

START_TEST(engine_uring)
{
	if (!qsm_io_uring_available()) {
		QSM_SKIP("io_uring unavailable on this kernel");
		return;
	}
	uint64_t seed = seed_for(700 + _i);
	int sh = _i % (int)QSM_ARRAY_SIZE(shapes);
	run_workload(B_URING, seed, shapes[sh].cluster, shapes[sh].size, shapes[sh].cache, 20, false);
}
END_TEST

/* The random workloads over a backing file (both compat levels). */
START_TEST(engine_backing_sim)
{
	for (int i = 0; i < 6; i++) {
		uint64_t seed = seed_for(300 + i * 8 + _i);
		int sh = (int)(seed % QSM_ARRAY_SIZE(shapes));
		run_workload(B_SIM, seed, shapes[sh].cluster, shapes[sh].size, shapes[sh].cache, 10, true);
		if (getenv("QSM_TEST_SEED"))
			break;
	}
}
END_TEST

START_TEST(engine_backing_threads)
{
	uint64_t seed = seed_for(900 + _i);
	int sh = (_i + 2) % (int)QSM_ARRAY_SIZE(shapes);
	run_workload(B_THREADS, seed, shapes[sh].cluster, shapes[sh].size, shapes[sh].cache, 16, true);
}
END_TEST

/* Growing moves the L1 table (many times with 512-byte clusters); data
 * survives close and reopen; shrinking over allocated clusters releases
 * them, L2 tables included (as QEMU: the check finds no leak), keeps what
 * is before the new end, and growing again shows zeros there. */
START_TEST(truncate_grow_shrink)
{
	char path[400], err[256];
	struct qsm_image *img;
	struct event_base *base = event_base_new();
	uint8_t buf[4096], got[4096];
	snprintf(path, sizeof(path), "%s/trunc.qcow2", tmpdir);
	struct qsm_create_opts co = { .size = 1 << 20, .cluster_size = 512 };
	ck_assert_int_eq(qsm_create(path, &co, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_open(base, path, NULL, &img, err, sizeof(err)), 0);
	memset(buf, 0x11, sizeof(buf));
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, sizeof(buf), 1000), 0);
	uint64_t sizes[] = { 3 << 20, 64 << 20, 1ull << 30 };
	for (size_t i = 0; i < QSM_ARRAY_SIZE(sizes); i++) {
		ck_assert_int_eq(qsm_truncate(img, sizes[i], err, sizeof(err)), 0);
		memset(buf, 0x20 + (int)i, sizeof(buf));
		ck_assert_int_eq(qsm_sync_pwrite(img, buf, sizeof(buf), sizes[i] - 5000), 0);
	}
	/* Not a multiple of 512. */
	ck_assert_int_eq(qsm_truncate(img, 1000, err, sizeof(err)), -EINVAL);
	/* Shrinking over nothing works: grow, then shrink back. */
	ck_assert_int_eq(qsm_truncate(img, (1ull << 30) + (1 << 20), err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_truncate(img, 1ull << 30, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_close(img), 0);

	struct qsm_open_opts ro = { .read_only = true };
	ck_assert_int_eq(qsm_open(base, path, &ro, &img, err, sizeof(err)), 0);
	struct qsm_info info;
	qsm_get_info(img, &info);
	ck_assert_uint_eq(info.virtual_size, 1ull << 30);
	for (size_t i = 0; i < QSM_ARRAY_SIZE(sizes); i++) {
		ck_assert_int_eq(qsm_sync_pread(img, got, sizeof(got), sizes[i] - 5000), 0);
		memset(buf, 0x20 + (int)i, sizeof(buf));
		ck_assert(memcmp(got, buf, sizeof(buf)) == 0);
	}
	ck_assert_int_eq(qsm_sync_pread(img, got, sizeof(got), 1000), 0);
	ck_assert_int_eq(got[0], 0x11);
	qsm_close(img);

	/* Shrinking over data: to 3 MiB - 4 KiB, inside the write at 3 MiB -
	 * 5000 (the cluster straddling the new end stays), past the rest. */
	struct qsm_check_report before = { .struct_size = sizeof(before) }, after = before;
	ck_assert_int_ge(qsm_check(path, 0, &before, NULL, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_open(base, path, NULL, &img, err, sizeof(err)), 0);
	uint64_t end = (3 << 20) - 4096;
	ck_assert_msg(qsm_truncate(img, end, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(qsm_sync_pread(img, got, 904, end - 904), 0);
	memset(buf, 0x20, sizeof(buf));
	ck_assert(memcmp(got, buf, 904) == 0);
	ck_assert_int_eq(qsm_truncate(img, 1ull << 30, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_sync_pread(img, got, sizeof(got), (64 << 20) - 5000), 0);
	for (size_t i = 0; i < sizeof(got); i++)
		ck_assert_int_eq(got[i], 0);
	ck_assert_int_eq(qsm_sync_pread(img, got, sizeof(got), 1000), 0);
	ck_assert_int_eq(got[0], 0x11);
	ck_assert_int_eq(qsm_close(img), 0);
	ck_assert_int_eq(qsm_check(path, 0, &after, NULL, err, sizeof(err)), 0);
	ck_assert_uint_eq(after.corruptions, 0);
	ck_assert_uint_eq(after.leaks, 0);
	/* 1 GiB - 5000 and 64 MiB - 5000 are gone: 4 data clusters... and
	 * their L2 tables (each one cluster, mapping 32 KiB at 512 bytes). */
	ck_assert_uint_lt(after.allocated_clusters, before.allocated_clusters - 8);
	if (have_qemu_img()) {
		char cmd[600];
		snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s'", path);
		ck_assert_int_eq(system(cmd), 0);
	}
	unlink(path);
	event_base_free(base);
}
END_TEST

/* --- backing files and raw images ----------------------------------------- */

static void qemu_check_clean(const char *path)
{
	if (have_qemu_img()) {
		char cmd[600];
		snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s'", path);
		ck_assert_msg(system(cmd) == 0, "qemu-img check %s", path);
	}
}

/* buf[0, len) all equal to v? */
static bool all_eq(const uint8_t *buf, size_t len, uint8_t v)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i] != v)
			return false;
	return true;
}

/*
 * One image (v3 for _i 0, v2 for _i 1) over a backing file of 1 MiB + 32 KiB
 * full of 0x11 (shorter than the image, ending inside a cluster): reads fall
 * through and read zeros past its end; a partial write copies the rest of
 * its cluster from the backing file (zeros past its end); zero writes and
 * discards hide the backing data as QEMU does (v3 zero clusters, v2 zero
 * data; v2 discards nothing); block status reports the unallocated runs
 * with no flag.
 */
START_TEST(backing_semantics)
{
	const uint64_t K = 1024, bsize = 1024 * K + 32 * K, cs = 64 * K;
	bool v3 = _i == 0;
	char top[400], bpath[400], err[256];
	struct event_base *base = event_base_new();
	struct qsm_image *img, *b;
	struct qsm_extent ext;
	struct qsm_info info;
	struct qsm_stats st0, st1;
	uint8_t *buf = malloc(2048 * K);

	snprintf(bpath, sizeof(bpath), "%s/sem-base-%d.qcow2", tmpdir, _i);
	snprintf(top, sizeof(top), "%s/sem-top-%d.qcow2", tmpdir, _i);
	struct qsm_create_opts bo = { .size = bsize };
	ck_assert_int_eq(qsm_create(bpath, &bo, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_open(base, bpath, NULL, &b, err, sizeof(err)), 0);
	/* 0x11 everywhere but [768K, 832K), left unallocated (zeros) */
	memset(buf, 0x11, bsize);
	ck_assert_int_eq(qsm_sync_pwrite(b, buf, 768 * K, 0), 0);
	ck_assert_int_eq(qsm_sync_pwrite(b, buf, bsize - 832 * K, 832 * K), 0);
	ck_assert_int_eq(qsm_close(b), 0);
	/* relative name: resolved against the top image's directory */
	struct qsm_create_opts to = { .size = 2048 * K, .compat = v3 ? 3 : 2,
				      .backing_file = strrchr(bpath, '/') + 1, .backing_format = "qcow2" };
	ck_assert_int_eq(qsm_create(top, &to, err, sizeof(err)), 0);
	ck_assert_msg(qsm_open(base, top, NULL, &img, err, sizeof(err)) == 0, "open: %s", err);
	ck_assert_ptr_nonnull(b = qsm_get_backing(img));
	ck_assert_ptr_null(qsm_get_backing(b));
	qsm_get_info(b, &info);
	ck_assert_uint_eq(info.virtual_size, bsize);
	ck_assert(info.read_only);

	/* Fall through, zeros past the backing file's end; status: no flag. */
	ck_assert_int_eq(qsm_sync_pread(img, buf, 2048 * K, 0), 0);
	ck_assert(all_eq(buf, 768 * K, 0x11));
	ck_assert(all_eq(buf + 768 * K, 64 * K, 0));
	ck_assert(all_eq(buf + 832 * K, bsize - 832 * K, 0x11));
	ck_assert(all_eq(buf + bsize, 2048 * K - bsize, 0));
	ck_assert_int_eq(qsm_sync_block_status(img, 0, 2048 * K, &ext), 0);
	ck_assert_uint_eq(ext.flags, 0);
	ck_assert_uint_eq(ext.length, 2048 * K);

	/* A partial write in the cluster the backing file ends in. */
	qsm_get_stats(img, &st0);
	memset(buf, 0x22, 4 * K);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, 4 * K, 1024 * K + 16 * K + 100), 0);
	qsm_get_stats(img, &st1);
	/* the L2 table and one data cluster */
	ck_assert_uint_eq(st1.clusters_allocated - st0.clusters_allocated, 2);
	ck_assert_int_eq(qsm_sync_pread(img, buf, cs, 1024 * K), 0);
	ck_assert(all_eq(buf, 16 * K + 100, 0x11));
	ck_assert(all_eq(buf + 16 * K + 100, 4 * K, 0x22));
	ck_assert(all_eq(buf + 20 * K + 100, 12 * K - 100, 0x11));
	ck_assert(all_eq(buf + 32 * K, 32 * K, 0));
	/* A write over three clusters: head and tail copied. */
	memset(buf, 0x33, 2 * cs);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, 2 * cs, 512 * K + 1000), 0);
	ck_assert_int_eq(qsm_sync_pread(img, buf, 3 * cs, 512 * K), 0);
	ck_assert(all_eq(buf, 1000, 0x11));
	ck_assert(all_eq(buf + 1000, 2 * cs, 0x33));
	ck_assert(all_eq(buf + 1000 + 2 * cs, cs - 1000, 0x11));

	/* Zero writes: a whole cluster (even with MAY_UNMAP) and a part. */
	ck_assert_int_eq(qsm_sync_write_zeroes(img, 0, cs, QSM_ZERO_MAY_UNMAP), 0);
	ck_assert_int_eq(qsm_sync_write_zeroes(img, cs + 100, 200, 0), 0);
	ck_assert_int_eq(qsm_sync_pread(img, buf, 2 * cs, 0), 0);
	ck_assert(all_eq(buf, cs, 0));
	ck_assert(all_eq(buf + cs, 100, 0x11));
	ck_assert(all_eq(buf + cs + 100, 200, 0));
	ck_assert(all_eq(buf + cs + 300, cs - 300, 0x11));
	ck_assert_int_eq(qsm_sync_block_status(img, 0, cs, &ext), 0);
	ck_assert_uint_eq(ext.flags, v3 ? (QSM_STATUS_ZERO | QSM_STATUS_ALLOCATED)
				       : (QSM_STATUS_DATA | QSM_STATUS_ALLOCATED));

	/* A partial zero write past the backing file's end, and one over the
	 * cluster the backing file leaves unallocated: v3 makes zero clusters
	 * (QEMU finds the chain reads zeros there), v2 writes zeros; over
	 * backing data, a COW. */
	uint64_t zw[] = { 1536 * K, 768 * K, 832 * K };
	for (int z = 0; z < 3; z++) {
		ck_assert_int_eq(qsm_sync_write_zeroes(img, zw[z] + 512, 512, 0), 0);
		ck_assert_int_eq(qsm_sync_block_status(img, zw[z], cs, &ext), 0);
		ck_assert_uint_eq(ext.flags, v3 && z < 2 ? (QSM_STATUS_ZERO | QSM_STATUS_ALLOCATED)
						 : (QSM_STATUS_DATA | QSM_STATUS_ALLOCATED));
	}
	ck_assert_int_eq(qsm_sync_pread(img, buf, cs, 832 * K), 0);
	ck_assert(all_eq(buf, 512, 0x11) && all_eq(buf + 512, 512, 0) &&
		  all_eq(buf + 1024, cs - 1024, 0x11));

	/* Discard: an unallocated and a data cluster. */
	memset(buf, 0x44, cs);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, cs, 256 * K), 0);
	ck_assert_int_eq(qsm_sync_discard(img, 128 * K, 192 * K), 0);
	ck_assert_int_eq(qsm_sync_pread(img, buf, 3 * cs, 128 * K), 0);
	ck_assert(all_eq(buf, 2 * cs, v3 ? 0 : 0x11));
	ck_assert(all_eq(buf + 2 * cs, cs, v3 ? 0 : 0x44));

	ck_assert_int_eq(qsm_close(img), 0);
	qemu_check_clean(top);
	/* Reopened read-only without the backing file: unallocated reads zeros. */
	struct qsm_open_opts nb = { .read_only = true, .no_backing = true };
	ck_assert_int_eq(qsm_open(base, top, &nb, &img, err, sizeof(err)), 0);
	ck_assert_ptr_null(qsm_get_backing(img));
	ck_assert_int_eq(qsm_sync_pread(img, buf, cs, 1600 * K), 0);
	ck_assert(all_eq(buf, cs, 0));
	ck_assert_int_eq(qsm_sync_block_status(img, 1600 * K, cs, &ext), 0);
	ck_assert_uint_eq(ext.flags, 0);
	qsm_close(img);
	nb.read_only = false;
	ck_assert_int_eq(qsm_open(base, top, &nb, &img, err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "read-only"));
	/* Growing a smaller image over the longer backing file: the new area
	 * reads as zeros (v3), or the resize is refused (v2). */
	to.size = 512 * K;
	ck_assert_int_eq(qsm_create(top, &to, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_open(base, top, NULL, &img, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_truncate(img, 2048 * K, err, sizeof(err)), v3 ? 0 : -ENOTSUP);
	qsm_get_info(img, &info);
	ck_assert_uint_eq(info.virtual_size, v3 ? 2048 * K : 512 * K);
	ck_assert_int_eq(qsm_sync_pread(img, buf, info.virtual_size, 0), 0);
	ck_assert(all_eq(buf, 512 * K, 0x11));
	ck_assert(all_eq(buf + 512 * K, info.virtual_size - 512 * K, 0));
	ck_assert_int_eq(qsm_close(img), 0);
	qemu_check_clean(top);
	unlink(top);
	unlink(bpath);
	free(buf);
	event_base_free(base);
}
END_TEST

/* Loops are refused whatever the name; so is an unknown backing format;
 * nothing is written to a refused image. */
START_TEST(backing_refusals)
{
	char a[400], bb[400], err[512];
	struct event_base *base = event_base_new();
	struct qsm_image *img;
	struct stat st0, st1;
	snprintf(a, sizeof(a), "%s/loop-a.qcow2", tmpdir);
	snprintf(bb, sizeof(bb), "%s/loop-b.qcow2", tmpdir);
	struct qsm_create_opts o = { .size = 1 << 20, .backing_file = "loop-b.qcow2",
				     .backing_format = "qcow2" };
	ck_assert_int_eq(qsm_create(a, &o, err, sizeof(err)), 0);
	o.backing_file = bb; /* absolute this time */
	ck_assert_int_eq(qsm_create(bb, &o, err, sizeof(err)), 0);
	ck_assert_int_eq(stat(a, &st0), 0);
	ck_assert_int_eq(qsm_open(base, a, NULL, &img, err, sizeof(err)), -ELOOP);
	ck_assert_msg(strstr(err, "loop") && strstr(err, "loop-b.qcow2"), "%s", err);
	o.backing_file = "loop-a.qcow2";
	ck_assert_int_eq(qsm_create(bb, &o, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_open(base, a, NULL, &img, err, sizeof(err)), -ELOOP);
	ck_assert_msg(strstr(err, "backing chain loop"), "%s", err);
	ck_assert_int_eq(stat(a, &st1), 0);
	ck_assert(st0.st_mtim.tv_sec == st1.st_mtim.tv_sec && st0.st_mtim.tv_nsec == st1.st_mtim.tv_nsec);
	/* A format qsm does not open. */
	o.backing_file = "loop-b.qcow2";
	o.backing_format = "vmdk";
	ck_assert_int_eq(qsm_create(a, &o, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_open(base, a, NULL, &img, err, sizeof(err)), -ENOTSUP);
	ck_assert_msg(strstr(err, "vmdk"), "%s", err);
	unlink(a);
	unlink(bb);
	event_base_free(base);
}
END_TEST

/* A read that falls through to a corrupt backing file fails, and the top
 * image's qsm_image_error says why (the backing file's finding). */
START_TEST(backing_error_explained)
{
	char b[400], t[400], err[512];
	struct event_base *base = event_base_new();
	struct qsm_image *img;
	snprintf(b, sizeof(b), "%s/bad-base.qcow2", tmpdir);
	snprintf(t, sizeof(t), "%s/bad-top.qcow2", tmpdir);
	struct qsm_create_opts o = { .size = 1 << 20 };
	ck_assert_int_eq(qsm_create(b, &o, err, sizeof(err)), 0);
	uint8_t data[4096];
	memset(data, 0x5a, sizeof(data));
	ck_assert_int_eq(qsm_open(base, b, NULL, &img, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_sync_pwrite(img, data, sizeof(data), 0), 0);
	ck_assert_int_eq(qsm_close(img), 0);
	/* Misalign L2 entry 0 of the backing file (reserved bits would be
	 * ignored, as QEMU does). */
	int fd = open(b, O_RDWR);
	uint8_t be[8];
	ck_assert_int_eq(pread(fd, be, 8, 40), 8); /* l1_table_offset */
	uint64_t l1 = 0, l2 = 0, e = 0;
	for (int i = 0; i < 8; i++)
		l1 = l1 << 8 | be[i];
	ck_assert_int_eq(pread(fd, be, 8, (off_t)l1), 8);
	for (int i = 0; i < 8; i++)
		l2 = l2 << 8 | be[i];
	l2 &= 0x00fffffffffffe00ull;
	ck_assert_int_eq(pread(fd, be, 8, (off_t)l2), 8);
	for (int i = 0; i < 8; i++)
		e = e << 8 | be[i];
	e += 0x200;
	for (int i = 7; i >= 0; i--, e >>= 8)
		be[i] = (uint8_t)e;
	ck_assert_int_eq(pwrite(fd, be, 8, (off_t)l2), 8);
	close(fd);
	o.backing_file = "bad-base.qcow2";
	o.backing_format = "qcow2";
	ck_assert_int_eq(qsm_create(t, &o, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_open(base, t, NULL, &img, err, sizeof(err)), 0);
	ck_assert_str_eq(qsm_image_error(img), "");
	ck_assert_int_lt(qsm_sync_pread(img, data, sizeof(data), 0), 0);
	ck_assert_msg(strstr(qsm_image_error(img), "unaligned"), "error: '%s'", qsm_image_error(img));
	qsm_close(img);
	unlink(t);
	unlink(b);
	event_base_free(base);
}
END_TEST

/* A raw image: requests straight to the file, virtual size = file size. */
START_TEST(raw_image)
{
	char path[400], err[256];
	struct event_base *base = event_base_new();
	struct qsm_image *img;
	struct qsm_extent ext;
	struct qsm_info info;
	uint8_t buf[8192];
	snprintf(path, sizeof(path), "%s/img.raw", tmpdir);
	FILE *f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(ftruncate(fileno(f), 1 << 20), 0);
	fclose(f);
	/* Not qcow2: never probed, refused as qcow2. */
	ck_assert_int_lt(qsm_open(base, path, NULL, &img, err, sizeof(err)), 0);
	struct qsm_open_opts o = { .format = "raw" };
	ck_assert_int_eq(qsm_open(base, path, &o, &img, err, sizeof(err)), 0);
	qsm_get_info(img, &info);
	ck_assert_str_eq(info.format, "raw");
	ck_assert_uint_eq(info.virtual_size, 1 << 20);
	memset(buf, 0x5a, sizeof(buf));
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, 5000, 3000), 0);
	ck_assert_int_eq(qsm_sync_write_zeroes(img, 4000, 100, 0), 0);
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	ck_assert_int_eq(qsm_sync_pread(img, buf, sizeof(buf), 0), 0);
	ck_assert(all_eq(buf, 3000, 0) && all_eq(buf + 3000, 1000, 0x5a));
	ck_assert(all_eq(buf + 4000, 100, 0) && all_eq(buf + 4100, 3900, 0x5a));
	ck_assert(all_eq(buf + 8000, 192, 0));
	/* Data up to 8 KiB (file blocks written), then a hole (the file was
	 * sized with ftruncate), as QEMU's map shows a sparse raw file. */
	ck_assert_int_eq(qsm_sync_block_status(img, 4096, 8192, &ext), 0);
	ck_assert_uint_eq(ext.flags, QSM_STATUS_DATA | QSM_STATUS_ALLOCATED);
	ck_assert_uint_eq(ext.host_offset, 4096);
	ck_assert_uint_eq(ext.length, 4096);
	ck_assert_int_eq(qsm_sync_block_status(img, 8192, 65536, &ext), 0);
	ck_assert_uint_eq(ext.flags, QSM_STATUS_ZERO | QSM_STATUS_ALLOCATED);
	ck_assert_uint_eq(ext.length, 65536);
	ck_assert_int_eq(qsm_sync_discard(img, 0, 65536), 0);
	ck_assert_int_eq(qsm_truncate(img, 2 << 20, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf + 3000, 512, (2 << 20) - 512), 0);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, 512, 2 << 20), -EINVAL);
	ck_assert_int_eq(qsm_close(img), 0);
	struct stat st;
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_int_eq(st.st_size, 2 << 20);
	unlink(path);
	event_base_free(base);
}
END_TEST

/* Found by fuzz_open: an L2 entry naming the refcount block's own cluster
 * (without COPIED, 1-bit refcounts).  A write there copies the cluster away
 * and frees it; at close the deferred free underflows the refcount, and the
 * corruption it reports used to start an asynchronous write-back batch from
 * inside qsm_close (leaked with the image; blocking and asynchronous I/O
 * mixed).  Now close reports -EIO, starts nothing, and marks the image
 * corrupt on disk as QEMU does. */
START_TEST(close_finds_corruption)
{
	struct qcow2_create_opts o = { .size = 65536, .cluster_bits = 9, .version = 3,
				       .refcount_order = 0 };
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(1);
	struct qsm_open_opts oo = { .cache = QSM_CACHE_WRITEBACK };
	struct qsm_image *img;
	struct qsm_io *io;
	uint8_t *buf, *im, data[512], hdr[80];
	size_t len;
	char err[256];

	ck_assert_int_eq(qcow2_create_image(&o, &im, &len, err, sizeof(err)), 0);
	uint64_t rt = qcow2_be64(im + 48), l1 = qcow2_be64(im + 40);
	uint64_t rb = qcow2_be64(im + rt);
	uint64_t l2 = QSM_ALIGN_UP(len, 512);
	buf = calloc(1, l2 + 512);
	memcpy(buf, im, len);
	free(im);
	qcow2_put_be64(buf + l1, l2 | QCOW2_OFLAG_COPIED);
	qcow2_put_be64(buf + l2 + 8 * 3, rb); /* guest cluster 3 -> the refcount block */
	buf[rb] |= 1u << (l2 >> 9);              /* the L2 table's refcount (1 bit) */
	ck_assert_int_eq(qsm_sim_load_buf(sim, buf, l2 + 512), 0);

	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	ck_assert_int_eq(qsm_open_io(b, io, &oo, &img, err, sizeof(err)), 0);
	memset(data, 0x5a, sizeof(data));
	(void)qsm_sync_pwrite(img, data, 100, 3 * 512 + 7);
	ck_assert_int_eq(qsm_close(img), -EIO);

	ck_assert_int_eq(qsm_io_open_sim(b, sim, QSM_IO_RDONLY, &io), 0);
	ck_assert_int_eq(qsm_io_pread_sync(io, hdr, sizeof(hdr), 0), 0);
	qsm_io_close(io);
	ck_assert(qcow2_be64(hdr + 72) & QCOW2_INCOMPAT_CORRUPT);
	qsm_sim_free(sim);
	event_base_free(b);
	free(buf);
}
END_TEST

/* --- reuse of unmapped clusters --------------------------------------------- */

/* The newest pending operation completes first: the oldest stays in flight
 * as long as anything else is pending. */
static uint64_t lifo_choose(void *opaque, uint64_t n)
{
	(void)opaque;
	return n - 1;
}

struct reuse {
	struct qsm_image *img;
	uint8_t *abuf;
	struct iovec aiov;
	int a_ret, f_ret, w_ret, d_ret;
	int done;
};

static void reuse_cb(void *opaque, int ret)
{
	int *r = opaque;
	*r = ret;
}

static void reuse_a_cb(void *opaque, int ret)
{
	struct reuse *r = opaque;
	r->a_ret = ret;
	r->done++;
}

/* The flush completed, so the discarded cluster's release ran: allocate
 * now, while the old request's I/O is still pending. */
static void reuse_flush_cb(void *opaque, int ret)
{
	struct reuse *r = opaque;
	r->f_ret = ret;
	ck_assert_int_eq(qsm_writev(r->img, 4096, &r->aiov, 1, reuse_a_cb, r), 0);
}

/* The cluster is unmapped (in memory): make that durable. */
static void reuse_unmap_cb(void *opaque, int ret)
{
	struct reuse *r = opaque;
	r->d_ret = ret;
	ck_assert_int_eq(qsm_flush(r->img, reuse_flush_cb, r), 0);
}

/*
 * Guest cluster 0 is mapped to host cluster X.  An old request (an in-place
 * write, or a read) finds X and its I/O on X is kept pending (LIFO); then
 * cluster 0 is discarded (or a compressed write maps it elsewhere), from
 * that request's callback a flush makes the table durable (WB_RELEASE),
 * and from the flush's callback a write allocates guest cluster 1.  X must
 * not be that allocation: the old write landing late would overwrite guest
 * cluster 1 (found by qsm fuzz, seed 166), the old read would race the new
 * data write.
 */
START_TEST(unmapped_cluster_not_reused_under_io)
{
	bool old_is_read = _i == 1;
	bool by_compressed = _i == 2; /* a compressed write unmaps it, not a discard */
	char path[400], err[256];
	const unsigned cs = 4096;
	snprintf(path, sizeof(path), "%s/reuse-%d.qcow2", tmpdir, _i);
	struct qsm_create_opts co = { .size = 1 << 20, .cluster_size = cs, .compat = 3 };
	ck_assert_msg(qsm_create(path, &co, err, sizeof(err)) == 0, "create: %s", err);
	struct qsm_sim *sim = qsm_sim_new(7);
	ck_assert_int_eq(qsm_sim_load_file(sim, path), 0);
	struct event_base *base = event_base_new();
	struct qsm_io *io;
	ck_assert_int_eq(qsm_io_open_sim(base, sim, 0, &io), 0);
	struct qsm_open_opts oo = { .cache = QSM_CACHE_NONE, .work_threads = -1 };
	struct reuse r = { 0 };
	ck_assert_msg(qsm_open_io(base, io, &oo, &r.img, err, sizeof(err)) == 0, "open: %s", err);

	uint8_t *old = malloc(cs), *back = malloc(cs);
	r.abuf = malloc(cs);
	memset(old, 0x11, cs);
	memset(r.abuf, 0xaa, cs);
	r.aiov = (struct iovec){ r.abuf, cs };
	ck_assert_int_eq(qsm_sync_pwrite(r.img, old, cs, 0), 0);
	ck_assert_int_eq(qsm_sync_flush(r.img), 0);

	qsm_sim_set_max_batch(sim, 1);
	qsm_sim_set_chooser(sim, lifo_choose, NULL);
	uint8_t *wbuf = malloc(cs);
	memset(wbuf, 0x55, cs);
	struct iovec wiov = { wbuf, cs };
	r.w_ret = r.d_ret = r.f_ret = r.a_ret = 1;
	uint8_t *cbuf = malloc(cs);
	memset(cbuf, 0x77, cs);
	struct iovec ciov = { cbuf, cs };
	/* The compressed write looks its cluster up only after deflating
	 * (the old request, submitted after it, still finds X). */
	if (by_compressed)
		ck_assert_int_eq(qsm_write_compressed(r.img, 0, &ciov, 1, reuse_unmap_cb, &r), 0);
	ck_assert_int_eq(old_is_read ? qsm_readv(r.img, 0, &wiov, 1, reuse_cb, &r.w_ret)
				     : qsm_writev(r.img, 0, &wiov, 1, reuse_cb, &r.w_ret), 0);
	if (!by_compressed)
		ck_assert_int_eq(qsm_discard(r.img, 0, cs, reuse_unmap_cb, &r), 0);
	while (r.w_ret == 1 || r.a_ret == 1)
		ck_assert_int_ne(event_base_loop(base, EVLOOP_ONCE), -1);
	ck_assert_int_eq(r.w_ret, 0);
	ck_assert_int_eq(r.d_ret, 0);
	ck_assert_int_eq(r.f_ret, 0);
	ck_assert_int_eq(r.a_ret, 0);
	ck_assert_uint_eq(qsm_sim_races(sim), 0);
	if (old_is_read)
		ck_assert_msg(all_eq(wbuf, cs, 0x11) || all_eq(wbuf, cs, 0),
			      "the read returned %#x, neither the old data nor zeros", wbuf[0]);

	qsm_sim_set_chooser(sim, NULL, NULL);
	ck_assert_int_eq(qsm_sync_pread(r.img, back, cs, cs), 0);
	ck_assert_msg(all_eq(back, cs, 0xaa), "guest cluster 1 reads %#x, not the new write's 0xaa",
		      back[0]);
	ck_assert_int_eq(qsm_sync_pread(r.img, back, cs, 0), 0);
	ck_assert_msg(all_eq(back, cs, by_compressed ? 0x77 : 0) || all_eq(back, cs, 0x55),
		      "guest cluster 0 reads %#x", back[0]);
	ck_assert_int_eq(qsm_close(r.img), 0);
	event_base_free(base);

	/* Clean, leaks included: the held release happened. */
	base = event_base_new();
	ck_assert_int_eq(qsm_io_open_sim(base, sim, QSM_IO_RDONLY, &io), 0);
	struct qsm_check_result res;
	ck_assert_int_eq(qsm_check_image(io, 0, &res, NULL, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_check_exit_code(&res), 0);
	qsm_io_close(io);
	event_base_free(base);
	qsm_sim_free(sim);
	free(old);
	free(back);
	free(wbuf);
	free(cbuf);
	free(r.abuf);
}
END_TEST

static Suite *sm_suite(void)
{
	Suite *s = suite_create("sm");
	TCase *t = tcase_create("table");
	tcase_add_test(t, table_well_formed);
	suite_add_tcase(s, t);
	t = tcase_create("engine");
	tcase_set_timeout(t, 600);
	tcase_add_checked_fixture(t, make_tmpdir, NULL);
	tcase_add_loop_test(t, engine_sim, 0, 4);
	tcase_add_loop_test(t, engine_threads, 0, 5);
	tcase_add_test(t, truncate_grow_shrink);
	tcase_add_loop_test(t, engine_backing_sim, 0, 2);
	tcase_add_loop_test(t, engine_backing_threads, 0, 2);
	suite_add_tcase(s, t);
	t = tcase_create("engine_uring"); /* own ctest entry (tests/unit/skip.h) */
	QSM_TCASE_REQUIRES(t, "uring");
	tcase_set_timeout(t, 600);
	tcase_add_checked_fixture(t, make_tmpdir, NULL);
	tcase_add_loop_test(t, engine_uring, 0, 5);
	suite_add_tcase(s, t);
	t = tcase_create("reuse");
	tcase_add_checked_fixture(t, make_tmpdir, NULL);
	tcase_add_loop_test(t, unmapped_cluster_not_reused_under_io, 0, 3);
	suite_add_tcase(s, t);
	t = tcase_create("backing");
	tcase_set_timeout(t, 120);
	tcase_add_checked_fixture(t, make_tmpdir, NULL);
	tcase_add_loop_test(t, backing_semantics, 0, 2);
	tcase_add_test(t, backing_refusals);
	tcase_add_test(t, backing_error_explained);
	tcase_add_test(t, raw_image);
	tcase_add_test(t, close_finds_corruption);
	suite_add_tcase(s, t);
	return s;
}

int main(void)
{
	return qsm_test_run(sm_suite());
}
