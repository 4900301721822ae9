/*
 * tools/fuzz.h: the request-ordering fuzzer and crash explorer behind
 * `qsm fuzz` (issue 6; background: tools/doc/design.md, "The simulated disk").
 *
 * A *case* is everything one run depends on: the image (shape, cache mode,
 * lazy refcounts, a backing file, compressed clusters), the requests, the
 * simulated disk's seed (which decides the completion order), and at most
 * one crash point or one fault rule.  Running a case is deterministic: the
 * same case gives the same completions, the same crash image and the same
 * verdict, which is what makes replay files and shrinking work.
 *
 * The verdict (fz_run) rests on these oracles (the first three are the
 * workload engine's, tools/workload.h, shared with the unit tests):
 *  - reads: every byte a successful read returns is the initial content or
 *    the value of a write-like request that may have been the last one to
 *    land there: submitted before the read ended, and not overwritten by a
 *    request that started after it completed and completed before the read
 *    started (for concurrent overlapping writes, any order they could have
 *    taken; for the rest, exactly the last write);
 *  - the sim disk saw no read overlapping a write in flight (engine race);
 *  - no request hangs; no request fails unless a fault was injected;
 *  - after a clean close: the whole disk holds exactly what the requests
 *    wrote, and the structural check (metadata/check.c) is clean, leaks
 *    included;
 *  - after a crash (a chosen subset of the unflushed writes kept, maybe one
 *    torn at a sector boundary): no corruption (leaks allowed; with lazy
 *    refcounts, lagging refcounts only while the dirty bit is set), the
 *    image opens (repairing when dirty) and every write that was promised
 *    durable reads back; the image then takes a write, a flush and a clean
 *    close and checks clean;
 *  - after a fault: the request that met it (or the close) reported it,
 *    writes after a failed metadata write fail with -EIO while reads work,
 *    nothing promised was lost, no corruption, and the image reopens.
 * On request, `qemu-img check` runs on the final image and must agree with
 * the in-tree checker.
 */
#ifndef QSM_TOOLS_FUZZ_H
#define QSM_TOOLS_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "io/io.h"
#include "sm/qsm.h"
#include "tools/workload.h"

enum fz_crash_mode { FZ_KEEP_NONE, FZ_KEEP_ALL, FZ_KEEP_PREFIX, FZ_KEEP_ALL_BUT_ONE,
		     FZ_KEEP_RANDOM, FZ_KEEP_MASK, FZ__MODES };

struct fz_case {
	uint64_t seed;            /* the sim disk's PRNG and the images' prefill */
	/* The image. */
	unsigned cluster;
	uint64_t size;
	unsigned compat;          /* 2 or 3 */
	bool lazy;
	size_t l2_tables;         /* L2 cache size in tables */
	enum qsm_cache_mode cache;
	bool backing;             /* a backing file under the image */
	bool backing_raw;         /* ... in raw format */
	uint64_t backing_size;
	bool compressed;          /* prefilled clusters stored compressed */
	bool zstd;                /* compression_type=zstd (v3 only) */
	bool empty;               /* no prefill: the image starts empty (over its backing file) */
	/* The schedule. */
	int depth;                /* requests in flight at most */
	unsigned max_batch;       /* sim completions per scheduler pass */
	bool keyed;               /* keyed sim schedule (see io/sim.h): shrinks well */
	/* At most one of: */
	uint64_t crash_at;        /* crash at this I/O completion (1-based); 0: none */
	enum fz_crash_mode crash_mode;
	uint64_t keep_mask;       /* FZ_KEEP_MASK: bit i keeps the i-th oldest unflushed write */
	bool torn;                /* tear one kept write at a sector boundary */
	bool fault;
	enum qsm_io_event fev;
	int ferr;                 /* positive errno: EIO or ENOSPC */
	bool fonce;
	bool fcrash;              /* power loss after the faulty run instead of a close */
	/* The requests; the last one is a flush. */
	int nops;
	struct wl_op *ops;
};

/* What `qsm fuzz` options fix; the rest is drawn from each run's seed. */
struct fz_gen {
	int ops;                  /* requests per run (0: 20..100) */
	int depth;                /* 0: drawn, 1..64 */
	unsigned cluster;         /* 0: drawn from small shapes */
	int cache;                /* -1: drawn, else enum qsm_cache_mode */
	int lazy;                 /* -1: drawn, 0 or 1 */
	int backing;              /* -1: drawn, 0 or 1 */
	int compressed;           /* -1: drawn (needs qemu-img), 0 or 1 */
	int zstd;                 /* 0: drawn (one v3 image in three), 1: every v3 image, -1: none */
	bool crash, faults;       /* which run kinds to mix in */
	bool prng_schedule;       /* the sim's PRNG stream instead of keyed schedules */
	bool snapshots;           /* live snapshot creates, applies and deletes among the requests */
};

struct fz_totals {
	uint64_t runs, ops, crash_points, fault_runs, faults_fired, torn;
	uint64_t qemu_checks, failures;
	uint64_t snap_ops, applies; /* --snapshots: succeeded in the first run of each case */
	uint64_t late_writes;       /* ... and writes begun beside a create or delete */
};

struct fz_env {
	char tmpdir[256];         /* per-process scratch directory */
	bool have_qemu_img;
	bool verbose;
	bool in_process;          /* run cases in this process (default: a child each) */
	FILE *log;                /* progress and failures (stderr) */
};

/* Scratch directory and tool probe.  0 or -errno. */
int fz_env_init(struct fz_env *env, const char *parent);
void fz_env_fini(struct fz_env *env);

/* Draw a run's case from its seed (and gen's fixed choices). */
void fz_case_generate(struct fz_case *c, uint64_t seed, const struct fz_gen *gen,
		      bool have_qemu_img);
void fz_case_free(struct fz_case *c);
int fz_case_copy(struct fz_case *dst, const struct fz_case *src);
/* One line describing the case (without the requests). */
void fz_case_str(const struct fz_case *c, char *buf, size_t len);

/* The outcome of one run. */
struct fz_result {
	bool ok;
	char why[1024];           /* the first broken promise */
	uint64_t completions;     /* I/O completions that could be crash points */
	uint64_t meta_at[256];    /* the first of them that wrote metadata or synced */
	unsigned n_meta;
	uint64_t snap_at[256];    /* the first of them while a snapshot operation ran */
	unsigned n_snap;
	bool crashed;
	uint64_t unflushed;       /* completed writes not durable when it crashed */
	uint64_t faults_fired, torn;
	bool qemu_checked;
	unsigned snap_ops, applies; /* snapshot operations (applies) that succeeded */
	uint64_t late_writes;       /* writes begun beside a create or delete (qsm_stats) */
	char schedule_path[512];  /* with fz_run(..., trace=true): the schedule log */
};

/*
 * Run the case and judge it (see the file comment), in a child process
 * unless env->in_process: an engine that aborts fails the case ("the engine
 * died") instead of the caller, and what a crashed run leaves allocated goes
 * with the child.  qemu_check: also run
 * `qemu-img check` on the final image.  trace: write the I/O schedule (every
 * submission and completion) to result->schedule_path.  Returns 0, or -errno
 * when the run could not be set up at all (then result->why says why).
 */
int fz_run(struct fz_env *env, const struct fz_case *c, bool qemu_check, bool trace,
	   struct fz_result *res);

/* Replay files: the case as text (and, as comments, the schedule log). */
int fz_case_save(const struct fz_case *c, const char *mutant, const char *path,
		 const char *schedule_path, const char *why);
int fz_case_load(struct fz_case *c, char *mutant, size_t mutant_len, const char *path,
		 char *err, size_t errlen);

/*
 * Shrink a failing case: when its verdict `why` names a byte, keep only the
 * requests touching it (and the flushes); drop the reads unless a read
 * failed; then drop requests (halves, quarters, ... single ones) and
 * simplify the schedule, keeping each change that still fails.  A crash
 * case looks for a failing crash point again after each change.  At most
 * `budget` runs.  c is replaced by the smallest failing case found.
 */
void fz_shrink(struct fz_env *env, struct fz_case *c, unsigned budget, const char *why);

/* The named events a fault rule may target (every one the engine tags). */
size_t fz_fault_events(const enum qsm_io_event **out);

const char *fz_mode_name(enum fz_crash_mode m);

#endif
