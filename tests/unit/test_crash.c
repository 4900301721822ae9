/*
 * tests/unit/test_crash.c: Check suite "crash", crash consistency on the sim
 * disk (tools/doc/design.md, "The simulated disk" and "Cache modes"; issues 3
 * and 6), driven by the fuzzer's engine (tools/fuzz.h: the cases and the
 * run, shared with `qsm fuzz`, on the workload engine of tools/workload.h,
 * where the read oracle and the durability register live).
 *
 * Variants: every cache mode (writeback, none, writethrough, directsync,
 * unsafe), lazy refcounts off and on; shapes from 512 B clusters with 1-2
 * table L2 caches (L2 and refcount boundaries everywhere) to 64 KiB; images
 * with a backing file and with compressed clusters as the seed draws them.
 *
 *   crash_every_boundary  small workloads, a crash at every I/O completion
 *                         (keeping none / all / a prefix / all but one / a
 *                         random subset of the unflushed writes, some torn)
 *   crash_random          larger workloads, crash points spread over the run
 *   crash_faults          every named event x EIO/ENOSPC x once/persistent,
 *                         half of them followed by a power loss
 *
 * cache=unsafe promises nothing after a power loss: its crash points are
 * process kills (every completed write kept).
 *
 * Budget: QSM_CRASH_RUNS crash points over the suite (default 650 *
 * QSM_TEST_SCALE) plus the fault runs (QSM_FAULT_SEEDS per rule, default 2,
 * 1 when QSM_TEST_SCALE < 1).  One crash point in three also runs qemu-img
 * check, which must agree with the in-tree checker.
 * A failure prints the case and leaves a replay file: rerun it with
 * `qsm fuzz --replay FILE` (QSM_CRASH_ONLY=every:V|random:V|fault:E and
 * QSM_TEST_SEED=N narrow the suite to one test and seed).
 *
 * The oracle's teeth are proved by the mutant builds (-DQSM_MUTANTS=ON,
 * tests/interop/mutants.sh): each removed safety rule is caught.
 */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "tools/fuzz.h"
#include "tests/unit/skip.h"

enum variant { V_WB, V_WT, V_WB_LAZY, V_WT_LAZY, V_NONE, V_DS, V_UNSAFE, V__COUNT };
static const char *const variant_name[V__COUNT] = { "writeback", "writethrough",
						    "writeback+lazy", "writethrough+lazy",
						    "none", "directsync", "unsafe" };
static const enum qsm_cache_mode variant_cache[V__COUNT] = {
	QSM_CACHE_WRITEBACK, QSM_CACHE_WRITETHROUGH, QSM_CACHE_WRITEBACK, QSM_CACHE_WRITETHROUGH,
	QSM_CACHE_NONE, QSM_CACHE_DIRECTSYNC, QSM_CACHE_UNSAFE,
};

static struct fz_env env;
static char cur_test[32];

struct totals {
	uint64_t points, failures, torn, qemu_checks, fault_runs, fired;
};

static uint64_t env_u64(const char *name, uint64_t def)
{
	const char *s = getenv(name);
	return s && *s ? strtoull(s, NULL, 0) : def;
}

static double scale(void)
{
	const char *s = getenv("QSM_TEST_SCALE");
	double f = s && *s ? strtod(s, NULL) : 1.0;
	return f > 0 ? f : 1.0;
}

static uint64_t crash_runs(void)
{
	return QSM_MAX(env_u64("QSM_CRASH_RUNS", (uint64_t)(650 * scale())), 1);
}

/* QSM_CRASH_ONLY=every:V, random:V or fault:E runs only that one. */
static bool test_selected(const char *name, int i)
{
	const char *only = getenv("QSM_CRASH_ONLY");
	snprintf(cur_test, sizeof(cur_test), "%s:%d", name, i);
	return !only || !*only || !strcmp(only, cur_test);
}

static void setup(void)
{
	ck_assert_int_eq(fz_env_init(&env, NULL), 0);
}

static void teardown(void)
{
	fz_env_fini(&env);
}

static struct fz_gen variant_gen(enum variant var)
{
	struct fz_gen g = { .cache = (int)variant_cache[var], .lazy = -1, .backing = -1,
			    .compressed = -1 };
	if (var <= V_WT_LAZY)
		g.lazy = var == V_WB_LAZY || var == V_WT_LAZY;
	return g;
}

/* Run one case; on failure keep a replay file and say how to rerun it. */
static bool judge(const struct fz_case *c, bool qemu_check, struct totals *t, struct fz_result *res)
{
	int ret = fz_run(&env, c, qemu_check, false, res);
	ck_assert_msg(ret == 0, "seed %" PRIu64 ": the run could not be set up: %s", c->seed, res->why);
	t->torn += res->torn;
	t->qemu_checks += res->qemu_checked;
	if (res->ok)
		return true;
	t->failures++;
	char cs[400], path[512];
	const char *dir = getenv("TMPDIR");
	fz_case_str(c, cs, sizeof(cs));
	snprintf(path, sizeof(path), "%s/qsm-crash-%s-%" PRIu64 "-%" PRIu64 ".replay",
		 dir ? dir : "/var/tmp", cur_test, c->seed, c->crash_at);
	for (char *p = strrchr(path, '/'); p && *p; p++)
		if (*p == ':')
			*p = '-';
	fz_case_save(c, NULL, path, NULL, res->why);
	fprintf(stderr, "crash FAIL [%s] %s: %s\n  rerun: qsm fuzz --replay %s "
		"(or QSM_CRASH_ONLY=%s QSM_TEST_SEED=%" PRIu64 ")\n",
		cur_test, cs, res->why, path, cur_test, c->seed);
	return false;
}

static enum fz_crash_mode mode_for(const struct fz_case *c, enum fz_crash_mode m)
{
	return c->cache == QSM_CACHE_UNSAFE ? FZ_KEEP_ALL : m; /* unsafe: process kills */
}

static void report(const char *what, const struct totals *t)
{
	fprintf(stderr, "crash %s: %" PRIu64 " crash points, %" PRIu64 " torn writes, %" PRIu64
		" qemu-img checks, %" PRIu64 " failures\n", what, t->points, t->torn, t->qemu_checks,
		t->failures);
}

/* _i: variant.  Small workloads, a crash at every I/O completion. */
START_TEST(crash_every_boundary)
{
	enum variant var = (enum variant)_i;
	struct totals t = { 0 };
	if (!test_selected("every", _i))
		return;
	uint64_t budget = QSM_MAX(crash_runs() / 4 / V__COUNT, 1);
	const char *one = getenv("QSM_TEST_SEED");
	struct fz_gen g = variant_gen(var);
	for (uint64_t s = 0; t.points < budget && s <= 50; s++) {
		uint64_t seed = one ? strtoull(one, NULL, 0) : 9000 + (uint64_t)var * 100 + s;
		g.ops = 6 + (int)(seed % 10);
		g.depth = 1 + (int)(seed % 6);
		struct fz_case c;
		struct fz_result res;
		fz_case_generate(&c, seed, &g, env.have_qemu_img);
		if (judge(&c, true, &t, &res)) {
			uint64_t n = res.completions;
			for (uint64_t k = 1; k <= n && t.points < budget; k++) {
				c.crash_at = k;
				c.crash_mode = mode_for(&c, (enum fz_crash_mode)((k + seed) % FZ_KEEP_MASK));
				c.torn = c.cache != QSM_CACHE_UNSAFE && (k + seed) % 4 == 0;
				judge(&c, (k + seed) % 3 == 0, &t, &res);
				t.points++;
			}
		}
		fz_case_free(&c);
		if (one)
			break;
	}
	report(variant_name[var], &t);
	ck_assert_msg(t.failures == 0, "%" PRIu64 " failures (cases above)", t.failures);
}
END_TEST

/* _i: variant.  Random workloads, crash points spread over each run, half
 * of them right after a metadata write or a sync. */
START_TEST(crash_random)
{
	enum variant var = (enum variant)_i;
	struct totals t = { 0 };
	if (!test_selected("random", _i))
		return;
	uint64_t per_seed = QSM_MAX(crash_runs() * 3 / 4 / V__COUNT / 3, 1);
	const char *one = getenv("QSM_TEST_SEED");
	struct fz_gen g = variant_gen(var);
	for (int s = 0; s < 3; s++) {
		uint64_t seed = one ? strtoull(one, NULL, 0) : 5000 + (uint64_t)var * 100 + (uint64_t)s;
		struct fz_case c;
		struct fz_result res;
		struct qsm_rng r;
		qsm_rng_seed(&r, seed ^ 0xc0ffee);
		fz_case_generate(&c, seed, &g, env.have_qemu_img);
		if (judge(&c, true, &t, &res)) {
			uint64_t n = res.completions;
			unsigned n_meta = res.n_meta;
			uint64_t meta_at[QSM_ARRAY_SIZE(res.meta_at)];
			memcpy(meta_at, res.meta_at, sizeof(meta_at));
			static const enum fz_crash_mode pick[] = {
				FZ_KEEP_NONE, FZ_KEEP_ALL, FZ_KEEP_PREFIX, FZ_KEEP_PREFIX,
				FZ_KEEP_ALL_BUT_ONE, FZ_KEEP_ALL_BUT_ONE, FZ_KEEP_RANDOM,
				FZ_KEEP_RANDOM, FZ_KEEP_RANDOM, FZ_KEEP_RANDOM,
			};
			for (uint64_t i = 0; i < per_seed && n; i++) {
				if (n_meta && i % 2)
					c.crash_at = meta_at[qsm_rng_below(&r, n_meta)];
				else
					c.crash_at = QSM_MIN(1 + (i * n) / per_seed +
								     qsm_rng_below(&r, QSM_MAX(n / per_seed, 1)),
							     n);
				c.crash_mode = mode_for(&c, pick[qsm_rng_below(&r, QSM_ARRAY_SIZE(pick))]);
				c.torn = c.cache != QSM_CACHE_UNSAFE && qsm_rng_below(&r, 4) == 0;
				judge(&c, i % 3 == 0, &t, &res);
				t.points++;
			}
		}
		fz_case_free(&c);
		if (one)
			break;
	}
	report(variant_name[var], &t);
	ck_assert_msg(t.failures == 0, "%" PRIu64 " failures (cases above)", t.failures);
}
END_TEST

/*
 * _i: index into fz_fault_events().  For EIO and ENOSPC, once and
 * persistent, a random workload with the rule on from open on (small
 * clusters, so tables, refcount blocks and the refcount table all get
 * written; every cache mode in turn; lazy refcounts for header_update, which
 * only the dirty bit writes), then the close or a power loss.  The oracle
 * (tools/fuzz.h): the fault surfaced, writes after a failed metadata write
 * fail with -EIO while reads work, nothing promised was lost, no corruption
 * (leaks allowed), and the image reopens and takes writes.
 */
START_TEST(crash_faults)
{
	const enum qsm_io_event *events;
	size_t nevents = fz_fault_events(&events);
	ck_assert_uint_lt((size_t)_i, nevents);
	enum qsm_io_event ev = events[_i];
	struct totals t = { 0 };
	if (!test_selected("fault", _i))
		return;
	const char *one = getenv("QSM_TEST_SEED");
	int seeds = (int)env_u64("QSM_FAULT_SEEDS", scale() >= 1.0 ? 2 : 1);
	for (int s = 0; s < seeds; s++) {
		for (int j = 0; j < 4; j++) {
			uint64_t seed = one ? strtoull(one, NULL, 0)
					    : 20000 + (uint64_t)_i * 100 + (uint64_t)s * 4 + (uint64_t)j;
			static const unsigned small_cluster[] = { 512, 512, 1024, 2048 };
			struct fz_gen g = variant_gen((enum variant)((seed + (uint64_t)_i) % V__COUNT));
			g.cluster = small_cluster[seed % 4];
			g.ops = 40 + (int)(seed % 40);
			if (ev == QSM_IO_EV_HEADER_UPDATE)
				g.lazy = 1;
			struct fz_case c;
			struct fz_result res;
			fz_case_generate(&c, seed, &g, env.have_qemu_img);
			c.fault = true;
			c.fev = ev;
			c.ferr = j & 1 ? ENOSPC : EIO;
			c.fonce = !(j & 2);
			c.fcrash = (s + j / 2) % 2 == 1;
			judge(&c, true, &t, &res);
			t.fault_runs++;
			t.fired += res.faults_fired;
			fz_case_free(&c);
		}
		if (one)
			break;
	}
	fprintf(stderr, "crash fault %s: %" PRIu64 " runs, %" PRIu64 " faults fired, %" PRIu64
		" failures\n", qsm_io_event_name(ev), t.fault_runs, t.fired, t.failures);
	ck_assert_msg(t.failures == 0, "%" PRIu64 " of %" PRIu64 " fault runs failed (cases above)",
		      t.failures, t.fault_runs);
}
END_TEST

static Suite *crash_suite(void)
{
	const enum qsm_io_event *events;
	size_t nevents = fz_fault_events(&events);
	Suite *s = suite_create("crash");
	TCase *t = tcase_create("sim");
	tcase_set_timeout(t, 900);
	tcase_add_checked_fixture(t, setup, teardown);
	tcase_add_loop_test(t, crash_every_boundary, 0, V__COUNT);
	tcase_add_loop_test(t, crash_random, 0, V__COUNT);
	tcase_add_loop_test(t, crash_faults, 0, (int)nevents);
	suite_add_tcase(s, t);
	return s;
}

int main(void)
{
	return qsm_test_run(crash_suite());
}
