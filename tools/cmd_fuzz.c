/*
 * tools/cmd_fuzz.c: `qsm fuzz`, random concurrent workloads on simulated
 * disks under random completion orders, crashes and faults (tools/fuzz.h
 * has the oracles).
 *
 * Run i uses seed S+i: its image, requests and schedule are drawn from it,
 * so `--seed S+i --runs 1` repeats one run.  With --crash a run is first
 * judged whole (the dry run, which also counts its I/O completions), then
 * crashed at --points completions drawn from the seed (keeping none, all, a
 * prefix, all but one or a random subset of the unflushed writes, one in
 * four with a torn write; the first point where at most three writes were
 * unflushed, every subset of them too).  With --faults a run may instead carry a fault
 * rule: EIO or ENOSPC, once or persistent, on one named event, and maybe a
 * power loss after it.  On the first failure the case goes to a replay file,
 * is shrunk, and the small case goes to a second one; `--replay FILE` runs
 * a replay file again, deterministically.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "io/util.h"
#include "sm/qsm_test.h"
#include "tools/cli.h"
#include "tools/fuzz.h"

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm fuzz [OPTIONS]\n"
		"Random concurrent workloads on a simulated disk that reorders completions,\n"
		"crashes and injects faults; every run replays from its seed.\n"
		"\n"
		"  --seed N            first seed (default: from the clock, printed)\n"
		"  --runs M            runs (default 100); run i uses seed N+i\n"
		"  --time SECONDS      stop starting runs after this long (default: no limit)\n"
		"  --ops K             requests per run (default 20..100)\n"
		"  --depth D           requests in flight at most (default 1..64)\n"
		"  --schedule keyed|random  completion order: hashed per operation (default;\n"
		"                      shrinks well) or drawn from the sim's PRNG stream\n"
		"  --crash             crash runs at random I/O completions\n"
		"  --points P          crash points per run (default 3)\n"
		"  --faults            fault-injection runs (EIO/ENOSPC at named events)\n"
		"  --fault-event EV    only at this event (l1_update, l2_load, ..., see --list-events)\n"
		"  --list-events       list the named events faults can target\n"
		"  --lazy-refcounts    images with lazy refcounts (default: one in three)\n"
		"  --snapshots         live snapshot creates, applies and deletes among the\n"
		"                      requests (v3 images); each snapshot's disk is judged\n"
		"  -t, --cache MODE    writeback|none|writethrough|directsync|unsafe (default: drawn)\n"
		"  --cluster-size N    cluster size (default: drawn, 512 B to 64 KiB)\n"
		"  --backing | --no-backing    always / never a backing file (default: one in three)\n"
		"  --compressed        prefill with compressed clusters (qemu-img convert -c)\n"
		"  --compression zlib|zstd  the v3 images' compression_type (default: zstd\n"
		"                      one in three)\n"
		"  --qemu-check-every N  qemu-img check every Nth run too (default 20; 0: never)\n"
		"  --out DIR           where replay files go (default: .)\n"
		"  --shrink-budget N   runs spent shrinking a failure (default 400)\n"
		"  --keep-going        do not stop at the first failure\n"
		"  --replay FILE       run a replay file again and judge it\n"
		"  --mutant NAME       run with a deliberate safety-rule violation (test builds)\n"
		"  --list-mutants      list the mutants of this build\n"
		"  -v, --verbose       one line per run\n"
		"  -h, --help          this help\n"
		"\n"
		"Exit status: 0 nothing found, 1 a failure was found, 2 usage or setup error.\n");
}

static int list_mutants(void)
{
	const char *rule;
	if (!qsm_mutant_name(0, &rule)) {
		cli_error("fuzz", "this build has no mutants (configure with -DQSM_MUTANTS=ON)");
		return 2;
	}
	for (unsigned i = 0; qsm_mutant_name(i, &rule); i++)
		printf("%-18s removes: %s\n", qsm_mutant_name(i, NULL), rule);
	return 0;
}

static int select_mutant(const char *name)
{
	int ret = qsm_mutant_select(name);
	if (ret == -ENOTSUP)
		cli_error("fuzz", "--mutant %s: this build has no mutants (configure with "
			  "-DQSM_MUTANTS=ON)", name);
	else if (ret < 0)
		cli_error("fuzz", "--mutant %s: no such mutant (see --list-mutants)", name);
	return ret;
}

static int replay(struct fz_env *env, const char *path)
{
	struct fz_case c;
	char mutant[64], err[300], cs[400];
	struct fz_result res;
	if (fz_case_load(&c, mutant, sizeof(mutant), path, err, sizeof(err)) < 0) {
		cli_error("fuzz", "%s", err);
		return 2;
	}
	if (mutant[0] && select_mutant(mutant) < 0) {
		fz_case_free(&c);
		return 2;
	}
	fz_case_str(&c, cs, sizeof(cs));
	printf("replay %s: %s%s%s\n", path, cs, mutant[0] ? " mutant " : "", mutant);
	int ret = fz_run(env, &c, env->have_qemu_img, false, &res);
	fz_case_free(&c);
	if (ret < 0) {
		cli_error("fuzz", "%s", res.why);
		return 2;
	}
	if (res.ok) {
		printf("passed (%" PRIu64 " I/O completions%s)\n", res.completions,
		       res.qemu_checked ? ", qemu-img check agrees" : "");
		return 0;
	}
	printf("FAILED: %s\n", res.why);
	return 1;
}

struct fuzz_opts {
	uint64_t seed, runs;
	double time_limit;
	unsigned points, qemu_every, shrink_budget;
	bool keep_going;
	const char *out;
	const char *mutant;
	int fault_event;          /* -1: drawn */
	struct fz_gen gen;
};

/* Save the failing case, shrink it, save the small one.  Prints the paths. */
static void report_failure(struct fz_env *env, const struct fuzz_opts *o, struct fz_case *c,
			   const char *why)
{
	char path[600], cs[400];
	struct fz_result res;
	fz_case_str(c, cs, sizeof(cs));
	fprintf(stderr, "qsm fuzz: FAILURE: %s\n  case: %s\n", why, cs);
	/* Once more with the schedule log, for the replay file. */
	fz_run(env, c, false, true, &res);
	snprintf(path, sizeof(path), "%s/qsm-fuzz-%" PRIu64 ".replay", o->out, c->seed);
	int ret = fz_case_save(c, o->mutant, path, res.schedule_path, why);
	if (ret == 0)
		fprintf(stderr, "  replay: qsm fuzz --replay %s\n", path);
	else
		cli_error("fuzz", "cannot write the replay file %s: %s", path, strerror(-ret));
	struct fz_case s;
	if (fz_case_copy(&s, c) < 0)
		return;
	fz_shrink(env, &s, o->shrink_budget, why);
	if (fz_run(env, &s, false, true, &res) == 0 && !res.ok) {
		snprintf(path, sizeof(path), "%s/qsm-fuzz-%" PRIu64 ".min.replay", o->out, c->seed);
		if (fz_case_save(&s, o->mutant, path, res.schedule_path, res.why) == 0)
			fprintf(stderr, "  shrunk to %d requests (depth %d): qsm fuzz --replay %s\n"
				"  shrunk failure: %s\n", s.nops, s.depth, path, res.why);
	}
	fz_case_free(&s);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Run c; -1 (after saying why) when the run could not even be set up. */
static int run_case(struct fz_env *env, const struct fz_case *c, bool qemu_check,
		    struct fz_result *res)
{
	if (fz_run(env, c, qemu_check, false, res) == 0)
		return 0;
	cli_error("fuzz", "seed %" PRIu64 ": %s", c->seed, res->why);
	return -1;
}

/*
 * The crash points of a run whose dry run (*res) passed: o->points of them
 * drawn from g, two in three during a snapshot operation when the run has
 * them, else half right after a metadata write or a sync, where ordering
 * bugs show; at the first point with at most three unflushed writes, every
 * subset of them too.  Stops at the first failure, leaving the failing
 * crash point in c and its verdict in *res.  -1 when a run cannot be set up.
 */
static int explore_crashes(struct fz_env *env, const struct fuzz_opts *o, struct fz_case *c,
			   struct qsm_rng *g, bool qc, struct fz_totals *t, struct fz_result *res)
{
	uint64_t n = res->completions;
	unsigned n_meta = res->n_meta, n_snap = res->n_snap;
	uint64_t meta_at[QSM_ARRAY_SIZE(res->meta_at)], snap_at[QSM_ARRAY_SIZE(res->snap_at)];
	memcpy(meta_at, res->meta_at, sizeof(meta_at));
	memcpy(snap_at, res->snap_at, sizeof(snap_at));
	bool subsets_done = false;

	for (unsigned p = 0; p < o->points && n && res->ok; p++) {
		/* With snapshot operations, mostly in the middle of one: each
		 * of their I/Os is a point where the image must be before or
		 * after it. */
		if (n_snap && qsm_rng_below(g, 3))
			c->crash_at = snap_at[qsm_rng_below(g, n_snap)];
		else if (n_meta && qsm_rng_below(g, 2))
			c->crash_at = meta_at[qsm_rng_below(g, n_meta)];
		else
			c->crash_at = 1 + qsm_rng_below(g, n);
		uint64_t m = qsm_rng_below(g, 10);
		c->crash_mode = c->cache == QSM_CACHE_UNSAFE ? FZ_KEEP_ALL
				: m < 1 ? FZ_KEEP_NONE : m < 2 ? FZ_KEEP_ALL
				: m < 4 ? FZ_KEEP_PREFIX : m < 6 ? FZ_KEEP_ALL_BUT_ONE
				: FZ_KEEP_RANDOM;
		c->torn = c->cache != QSM_CACHE_UNSAFE && qsm_rng_below(g, 4) == 0;
		if (run_case(env, c, qc && p == 0, res) < 0)
			return -1;
		t->crash_points++;
		t->torn += res->torn;
		t->qemu_checks += res->qemu_checked;

		uint64_t u = res->unflushed;
		if (!res->ok || subsets_done || u < 1 || u > 3 || c->cache == QSM_CACHE_UNSAFE)
			continue;
		subsets_done = true;
		enum fz_crash_mode drawn = c->crash_mode;
		bool torn = c->torn;
		c->crash_mode = FZ_KEEP_MASK;
		c->torn = false;
		for (uint64_t mask = 0; mask < (1ull << u) && res->ok; mask++) {
			c->keep_mask = mask;
			if (run_case(env, c, false, res) < 0)
				return -1;
			t->crash_points++;
		}
		if (res->ok)
			c->crash_mode = drawn, c->torn = torn;
	}
	return 0;
}

static int fuzz(struct fz_env *env, const struct fuzz_opts *o)
{
	struct fz_totals t = { 0 };
	const enum qsm_io_event *events;
	size_t nevents = fz_fault_events(&events);
	double start = now_s();
	uint64_t first_fail = 0;
	bool failed = false;

	for (uint64_t i = 0; i < o->runs && (!failed || o->keep_going); i++) {
		if (o->time_limit > 0 && now_s() - start > o->time_limit)
			break;
		uint64_t seed = o->seed + i;
		struct fz_case c;
		struct fz_result res;
		char cs[400];
		struct qsm_rng g;
		qsm_rng_seed(&g, seed ^ 0xf022f022ull);
		fz_case_generate(&c, seed, &o->gen, env->have_qemu_img);
		/* The run's kind. */
		bool fault = o->gen.faults && (!o->gen.crash || qsm_rng_below(&g, 2));
		if (fault) {
			c.fault = true;
			c.fev = events[qsm_rng_below(&g, nevents)];
			if (o->fault_event >= 0)
				c.fev = (enum qsm_io_event)o->fault_event;
			c.ferr = qsm_rng_below(&g, 2) ? ENOSPC : EIO;
			c.fonce = qsm_rng_below(&g, 2);
			c.fcrash = qsm_rng_below(&g, 2);
			if (c.fev == QSM_IO_EV_HEADER_UPDATE && !c.lazy && o->gen.lazy != 0)
				c.lazy = true, c.compat = 3; /* only the dirty bit writes it */
		}
		bool qc = o->qemu_every && (i % o->qemu_every) == o->qemu_every - 1;
		if (run_case(env, &c, qc, &res) < 0) {
			fz_case_free(&c);
			return 2;
		}
		t.runs++;
		t.ops += (uint64_t)c.nops;
		t.snap_ops += res.snap_ops;
		t.applies += res.applies;
		t.late_writes += res.late_writes;
		t.qemu_checks += res.qemu_checked;
		if (fault) {
			t.fault_runs++;
			t.faults_fired += res.faults_fired;
		}
		if (o->gen.crash && !fault && res.ok &&
		    explore_crashes(env, o, &c, &g, qc, &t, &res) < 0) {
			fz_case_free(&c);
			return 2;
		}
		fz_case_str(&c, cs, sizeof(cs));
		if (env->verbose)
			fprintf(stderr, "run %" PRIu64 ": %s: %s\n", i, cs, res.ok ? "ok" : "FAILED");
		if (!res.ok) {
			t.failures++;
			if (!failed)
				first_fail = seed;
			failed = true;
			report_failure(env, o, &c, res.why);
		}
		fz_case_free(&c);
	}
	char snaps[160] = "";
	if (o->gen.snapshots)
		snprintf(snaps, sizeof(snaps), " (%" PRIu64 " snapshot operations done, %" PRIu64
			 " of them applies, %" PRIu64 " writes beside them)", t.snap_ops, t.applies,
			 t.late_writes);
	printf("qsm fuzz: %" PRIu64 " runs (seeds %" PRIu64 "..%" PRIu64 "), %" PRIu64 " requests%s, "
	       "%" PRIu64 " crash points (%" PRIu64 " torn writes), %" PRIu64 " fault runs (%" PRIu64
	       " faults fired), %" PRIu64 " qemu-img checks%s%s, %.1f s: ",
	       t.runs, o->seed, o->seed + (t.runs ? t.runs - 1 : 0), t.ops, snaps, t.crash_points, t.torn,
	       t.fault_runs, t.faults_fired, t.qemu_checks, o->mutant ? ", mutant " : "",
	       o->mutant ? o->mutant : "", now_s() - start);
	if (t.failures)
		printf("%" PRIu64 " FAILED (first: seed %" PRIu64 ", after %" PRIu64 " runs)\n",
		       t.failures, first_fail, first_fail - o->seed + 1);
	else
		printf("no failures\n");
	return t.failures ? 1 : 0;
}

static int parse_u64(const char *opt, const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end || *s == '-') {
		cli_error("fuzz", "%s: invalid number '%s'", opt, s);
		return -EINVAL;
	}
	*out = v;
	return 0;
}

int cmd_fuzz(int argc, char **argv)
{
	enum { O_SEED = 256, O_RUNS, O_TIME, O_OPS, O_DEPTH, O_CRASH, O_POINTS, O_FAULTS, O_LAZY,
	       O_CLUSTER, O_BACKING, O_NO_BACKING, O_COMPRESSED, O_QEMU, O_OUT, O_SHRINK, O_KEEP,
	       O_REPLAY, O_MUTANT, O_LIST, O_FAULT_EVENT, O_LIST_EVENTS, O_SCHEDULE, O_SNAPSHOTS,
	       O_COMPRESSION };
	static const struct option longopts[] = {
		{ "seed", required_argument, NULL, O_SEED },
		{ "runs", required_argument, NULL, O_RUNS },
		{ "time", required_argument, NULL, O_TIME },
		{ "ops", required_argument, NULL, O_OPS },
		{ "depth", required_argument, NULL, O_DEPTH },
		{ "crash", no_argument, NULL, O_CRASH },
		{ "points", required_argument, NULL, O_POINTS },
		{ "faults", no_argument, NULL, O_FAULTS },
		{ "lazy-refcounts", no_argument, NULL, O_LAZY },
		{ "snapshots", no_argument, NULL, O_SNAPSHOTS },
		{ "cache", required_argument, NULL, 't' },
		{ "cluster-size", required_argument, NULL, O_CLUSTER },
		{ "backing", no_argument, NULL, O_BACKING },
		{ "no-backing", no_argument, NULL, O_NO_BACKING },
		{ "compressed", no_argument, NULL, O_COMPRESSED },
		{ "compression", required_argument, NULL, O_COMPRESSION },
		{ "qemu-check-every", required_argument, NULL, O_QEMU },
		{ "out", required_argument, NULL, O_OUT },
		{ "shrink-budget", required_argument, NULL, O_SHRINK },
		{ "keep-going", no_argument, NULL, O_KEEP },
		{ "replay", required_argument, NULL, O_REPLAY },
		{ "mutant", required_argument, NULL, O_MUTANT },
		{ "list-mutants", no_argument, NULL, O_LIST },
		{ "fault-event", required_argument, NULL, O_FAULT_EVENT },
		{ "list-events", no_argument, NULL, O_LIST_EVENTS },
		{ "schedule", required_argument, NULL, O_SCHEDULE },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct fuzz_opts o = {
		.seed = (uint64_t)time(NULL), .runs = 100, .points = 3, .qemu_every = 20,
		.shrink_budget = 400, .out = ".", .fault_event = -1,
		.gen = { .cache = -1, .lazy = -1, .backing = -1, .compressed = -1 },
	};
	const char *replay_path = NULL;
	bool verbose = false;
	uint64_t v;
	int ch;

	optind = 1;
	while ((ch = getopt_long(argc, argv, "t:vh", longopts, NULL)) != -1) {
		switch (ch) {
		case O_SEED: if (parse_u64("--seed", optarg, &o.seed)) return 2; break;
		case O_RUNS: if (parse_u64("--runs", optarg, &o.runs)) return 2; break;
		case O_TIME:
			if (parse_u64("--time", optarg, &v)) return 2;
			o.time_limit = (double)v;
			break;
		case O_OPS:
			if (parse_u64("--ops", optarg, &v) || v < 2 || v > 100000) {
				cli_error("fuzz", "--ops: 2 to 100000 requests");
				return 2;
			}
			o.gen.ops = (int)v;
			break;
		case O_DEPTH:
			if (parse_u64("--depth", optarg, &v) || v < 1 || v > 1024) {
				cli_error("fuzz", "--depth: 1 to 1024 requests in flight");
				return 2;
			}
			o.gen.depth = (int)v;
			break;
		case O_CRASH: o.gen.crash = true; break;
		case O_SCHEDULE:
			if (strcmp(optarg, "keyed") && strcmp(optarg, "random")) {
				cli_error("fuzz", "--schedule: keyed or random, not '%s'", optarg);
				return 2;
			}
			o.gen.prng_schedule = !strcmp(optarg, "random");
			break;
		case O_POINTS:
			if (parse_u64("--points", optarg, &v) || v > 1000) return 2;
			o.points = (unsigned)v;
			break;
		case O_FAULTS: o.gen.faults = true; break;
		case O_LAZY: o.gen.lazy = 1; break;
		case O_COMPRESSION: {
			enum qsm_compression t;
			if (qsm_compression_parse(optarg, &t) < 0) {
				cli_error("fuzz", "--compression: zlib or zstd, not '%s'", optarg);
				return 2;
			}
			o.gen.zstd = t == QSM_COMPRESSION_ZSTD ? 1 : -1;
			break;
		}
		case O_SNAPSHOTS: o.gen.snapshots = true; break;
		case 't': {
			enum qsm_cache_mode m;
			if (qsm_cache_mode_parse(optarg, &m) < 0) {
				cli_error("fuzz", "Invalid cache option: %s", optarg);
				return 2;
			}
			o.gen.cache = (int)m;
			break;
		}
		case O_CLUSTER:
			if (cli_parse_size(optarg, &v) < 0 || v < 512 || v > (2u << 20) || (v & (v - 1))) {
				cli_error("fuzz", "--cluster-size: a power of two from 512 to 2M");
				return 2;
			}
			o.gen.cluster = (unsigned)v;
			break;
		case O_BACKING: o.gen.backing = 1; break;
		case O_NO_BACKING: o.gen.backing = 0; break;
		case O_COMPRESSED: o.gen.compressed = 1; break;
		case O_QEMU:
			if (parse_u64("--qemu-check-every", optarg, &v)) return 2;
			o.qemu_every = (unsigned)v;
			break;
		case O_OUT: o.out = optarg; break;
		case O_SHRINK:
			if (parse_u64("--shrink-budget", optarg, &v)) return 2;
			o.shrink_budget = (unsigned)v;
			break;
		case O_KEEP: o.keep_going = true; break;
		case O_REPLAY: replay_path = optarg; break;
		case O_MUTANT: o.mutant = optarg; break;
		case O_LIST: return list_mutants();
		case O_LIST_EVENTS: {
			const enum qsm_io_event *ev;
			size_t n = fz_fault_events(&ev);
			for (size_t i = 0; i < n; i++)
				printf("%s\n", qsm_io_event_name(ev[i]));
			return 0;
		}
		case O_FAULT_EVENT: {
			const enum qsm_io_event *ev;
			size_t n = fz_fault_events(&ev);
			o.fault_event = -1;
			for (size_t i = 0; i < n; i++)
				if (!strcmp(qsm_io_event_name(ev[i]), optarg))
					o.fault_event = (int)ev[i];
			if (o.fault_event < 0) {
				cli_error("fuzz", "--fault-event %s: no such event (see --list-events)",
					  optarg);
				return 2;
			}
			o.gen.faults = true;
			break;
		}
		case 'v': verbose = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		cli_error("fuzz", "unexpected argument '%s'", argv[optind]);
		return 2;
	}
	if (o.mutant && select_mutant(o.mutant) < 0)
		return 2;
	struct stat st;
	if (!replay_path && (stat(o.out, &st) < 0 || !S_ISDIR(st.st_mode))) {
		cli_error("fuzz", "--out %s: not a directory (replay files go there)", o.out);
		return 2;
	}

	struct fz_env env;
	int ret = fz_env_init(&env, NULL);
	if (ret < 0) {
		cli_error("fuzz", "cannot create a scratch directory: %s", strerror(-ret));
		return 2;
	}
	env.verbose = verbose;
	if (o.gen.compressed == 1 && !env.have_qemu_img) {
		cli_error("fuzz", "--compressed needs qemu-img (apt-get install qemu-utils)");
		fz_env_fini(&env);
		return 2;
	}
	if (replay_path) {
		ret = replay(&env, replay_path);
	} else {
		printf("qsm fuzz: seed %" PRIu64 " (rerun one run with --seed N --runs 1)\n", o.seed);
		fflush(stdout);
		ret = fuzz(&env, &o);
	}
	fz_env_fini(&env);
	return ret;
}
