/*
 * tools/workload.h: the one workload engine and its oracles, shared by
 * `qsm fuzz` (tools/fuzz.c), the crash suite (tests/unit/test_crash.c), the
 * engine workloads of tests/unit/test_sm.c, the compressed-write crash runs
 * of tests/unit/test_compress.c and the libFuzzer target
 * tests/fuzz/fuzz_sched.c.
 *
 * A workload is a list of requests (struct wl_op); how it is drawn (from a
 * seed, from fuzzer bytes) and on what image it runs (a sim disk, a file on
 * the thread pool or io_uring) are the caller's.  The engine:
 *   - owns one buffer per request, filled with the request's own pattern
 *     (wl_value: every request and guest offset looks different, so a
 *     misplaced or stale sector is recognised);
 *   - submits ranges of the list to an open image, at most `depth` in
 *     flight, and runs the image's loop until they complete (wl_run), on a
 *     logical clock: every submission and completion ticks it, so "A
 *     completed before B was submitted" is a comparison of two numbers;
 *   - judges as it goes (the shadow model, struct wl):
 *       reads: every byte a successful read returns is the content before
 *       the workload (or at the last wl_settle) or the value of a
 *       write-like request that may have been the last one to land there:
 *       submitted before the read ended, and not overwritten by a request
 *       that started after it completed and completed before the read
 *       started.  Concurrent overlapping writes may land in any order; for
 *       the rest, exactly the last write counts;
 *       no completion runs inside its submission; no request fails unless
 *       failures were injected (wl_params.faults); after a failed metadata
 *       write (wl_note_meta_fail), writes fail with -EIO, reads still work
 *       and flushes fail (the sticky error);
 *   - at a quiescent point, wl_settle reads back what the requests since
 *     the last settle touched, judges it as a read, and pins it: later
 *     reads must find exactly that (no value changes without a write);
 *   - after a crash or a close, wl_check_durable judges the whole disk as
 *     a durability register (see there).
 * Value of a write-like request at a byte it covers: wl_value (a write's
 * pattern; zeros for zero writes and for the whole clusters a discard
 * covers; a v2 image with a backing file discards nothing, sm/qsm.h).
 */
#ifndef QSM_TOOLS_WORKLOAD_H
#define QSM_TOOLS_WORKLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/uio.h>

#include "io/io.h"
#include "sm/qsm.h"

struct qsm_sim;
struct qsm_check_result;

/* WL_SNAPSHOT: a live internal snapshot, qsm_snapshot_create_async, named
 * wl_snapshot_name(off) (off: a tag, unique in the list);
 * WL_SNAPSHOT_DELETE: qsm_snapshot_delete_async of the snapshot with tag
 * off (skipped, ret -ECANCELED, when no earlier op took it);
 * WL_SNAPSHOT_APPLY: qsm_snapshot_apply_async of the snapshot with tag off
 * (skipped, ret -ECANCELED, when no earlier op took it or a delete of it
 * was submitted before).  All three have len 0, and are submitted only when
 * no other snapshot operation is pending (one runs at a time).  A
 * snapshot's disk is judged by wl_check_snapshot.
 *
 * An apply is a barrier in the model (sm/qsm.h: it waits for every request
 * submitted before it and holds back every one submitted after, which then
 * start in submission order once it is over).  The disk from the apply on
 * is an epoch: its base is the applied snapshot's disk (as
 * wl_check_snapshot defines it) and only requests submitted after the
 * apply build on it.  A request is judged in the epoch of the last apply
 * submitted before it; when that apply failed, it may have taken effect or
 * not, so the epoch before it counts too (a whole read agrees with one of
 * them). */
enum wl_kind { WL_WRITE, WL_READ, WL_ZERO, WL_DISCARD, WL_FLUSH, WL_COMPRESSED, WL_SNAPSHOT,
	       WL_SNAPSHOT_DELETE, WL_SNAPSHOT_APPLY, WL__KINDS };

/* wl_op.flags for write kinds: the data is of the other sort.  A plain
 * write's data is then compressible (runs of 64 equal bytes), a compressed
 * write's incompressible (stored as is).  For WL_ZERO, flags holds the
 * QSM_ZERO_* flags (below this bit). */
#define WL_DATA_OTHER 0x100u
/* wl_op.flags for writes and reads: pass all three iovec pieces, empty
 * ones included (an iovec of length 0 is valid input). */
#define WL_IOV_KEEP_EMPTY 0x200u

struct wl_op {
	enum wl_kind kind;
	uint64_t off, len;         /* len 0 for flushes */
	unsigned flags;            /* QSM_ZERO_* for WL_ZERO; WL_DATA_OTHER, WL_IOV_KEEP_EMPTY */
	uint64_t split_a, split_b; /* data buffer cut into iovecs at these offsets */
};

const char *wl_kind_name(enum wl_kind k);

/* The pattern byte of `id` at guest offset x (ids of requests are their
 * index in the list; callers prefill with ids far above). */
uint8_t wl_pattern(int id, uint64_t x);
/* A snapshot operation (len 0, no data)? */
static inline bool wl_is_snapshot(enum wl_kind k)
{
	return k == WL_SNAPSHOT || k == WL_SNAPSHOT_DELETE || k == WL_SNAPSHOT_APPLY;
}
/* The name of the snapshot with tag `tag`, into buf. */
const char *wl_snapshot_name(uint64_t tag, char *buf, size_t len);
/* Does the request set data (write, compressed write, zero, discard)? */
bool wl_writes(enum wl_kind k);
/* The byte a write-like request `id` sets at x. */
uint8_t wl_value(const struct wl_op *o, int id, uint64_t x);

#define WL_NEVER UINT64_MAX

/* The engine's record of one request. */
struct wl_state {
	struct wl *w;
	int id;
	uint64_t eff_off, eff_len; /* the bytes it sets (discard: whole clusters) */
	uint8_t *buf;
	struct iovec iov[3];
	int iovcnt;
	bool submitted;
	bool accepted;             /* a snapshot op the engine took (not refused, not skipped) */
	uint64_t t_sub, t_done;    /* logical clock; t_done WL_NEVER unless acknowledged */
	int ret;
	char err[160];             /* a snapshot operation's message */
};

struct wl_params {
	uint64_t size;             /* the guest disk */
	unsigned cluster;          /* its cluster size (what a discard can drop) */
	enum qsm_cache_mode cache; /* what a completion and a flush promise */
	bool discard_noop;         /* a v2 image with a backing file: discards change nothing */
	bool faults;               /* failures are injected: a failed request is no violation */
	bool read_every_byte;      /* check every byte of long reads (else a spread) */
};

/*
 * The shadow model of one workload.  Fields below the line are the
 * verdict so far, for the caller to judge; the caller fills init before the
 * first request runs.
 */
struct wl {
	struct wl_params p;
	const struct wl_op *ops;   /* borrowed: the caller keeps the list alive */
	int nops;
	struct wl_state *st;
	uint8_t *init;             /* the guest view before request 0 (zeroed by wl_init) */
	uint8_t *view;             /* the view pinned by the last wl_settle, or NULL */
	uint64_t settled_at;       /* requests submitted before it are settled */
	uint64_t sync_at;          /* a clean close: what completed before is durable */
	uint64_t clock;
	int pending;
	int snap_pending;          /* snapshot operations in flight (0 or 1) */
	bool stopped;              /* set by a crash hook: the guest hears nothing more */
	bool claim_all_durable;    /* oracle self-test: wrongly call every write durable */
	uint64_t meta_fail;        /* clock at the first failed metadata write, or 0 */
	enum qsm_io_event meta_fail_ev;
	bool read_faults;          /* faults may hit reads too (they may then fail) */
	/* --- */
	int op_errors;
	char first_error[200];
	int violations;
	char first_violation[400];
	uint64_t races;            /* wl_sim_race_cb: engine races */
	char first_race[200];
};

/* Set up the model of ops[0, nops) (borrowed) on a disk of p->size bytes:
 * buffers and iovecs for every request, init zeroed.  0 or -ENOMEM. */
int wl_init(struct wl *w, const struct wl_op *ops, int nops, const struct wl_params *p);
void wl_fini(struct wl *w);

/*
 * Submit ops[from, to) to img in order, at most depth in flight, and run
 * img's loop until all of them completed or w->stopped (a crash hook set
 * it and broke the loop).  A request refused at submission counts as one
 * that completed with that error.  Returns 0, or -EDEADLK when requests
 * remain pending but the loop has no events left (a hang: noted as a
 * violation; the caller decides what to do with the image).
 */
int wl_run(struct wl *w, struct qsm_image *img, int from, int to, int depth);

/*
 * At a quiescent point (nothing pending): read back through img every byte
 * the write-like requests submitted since the last settle covered, judge it
 * as a read submitted now, and pin it as the view later reads are judged
 * against (those requests no longer count).  0, or the read's -errno (a
 * violation is noted either way).  Not with snapshot applies: a settle
 * forgets the requests a snapshot's disk is judged by (-ENOTSUP, a
 * violation).
 */
int wl_settle(struct wl *w, struct qsm_image *img);
/* The view a read would be judged against now (init, or the pinned one). */
const uint8_t *wl_view(const struct wl *w);

/* Note a broken promise the caller found (the first one is kept in
 * first_violation), or a request-level failure (first_error). */
void wl_violation(struct wl *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void wl_note_error(struct wl *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A clean close (or any sync of everything) just happened: every request
 * that completed before is durable, whatever the cache mode. */
void wl_note_sync(struct wl *w);
/* A metadata write or sync failed (the io trace saw it): the sticky error
 * applies to requests submitted from now on.  Only the first counts. */
void wl_note_meta_fail(struct wl *w, enum qsm_io_event ev);

/*
 * Durability, per byte, as a register: disk[0, size) (the guest view after
 * a crash or a close) must hold at each byte the value of some request W
 * covering it (the initial content counts as a request before all others)
 * such that W did not complete before the submission of a durable request
 * D covering it.  D is durable when it succeeded and then a flush submitted
 * after its completion succeeded (writeback, none), or it simply succeeded
 * (writethrough, directsync), or never (unsafe), or, after wl_note_sync,
 * when it completed before that.
 * With applies, the disk is in one epoch as a whole (see WL_SNAPSHOT_APPLY):
 * that of the last apply that succeeded and is durable (any cache mode but
 * unsafe, or completed before wl_note_sync), or that of an apply submitted
 * after it (failed, or cut by the crash: before or after it); within the
 * epoch the rule above holds, with the applied snapshot's disk as the
 * initial content and only the requests submitted after the apply.  False
 * with msg saying which byte.
 */
bool wl_check_durable(const struct wl *w, const uint8_t *disk, char *msg, size_t msglen);

/*
 * A snapshot's disk, snap[0, size), read after the run: it must be the disk
 * as every write-like request submitted before op `id` (a WL_SNAPSHOT that
 * succeeded) left it, none submitted after (a live create drains the first
 * and holds the others back): judged as a read that ended when the create
 * was submitted and started when it completed, in the epoch of the applies
 * before it.  False with msg saying which byte.
 */
bool wl_check_snapshot(const struct wl *w, int id, const uint8_t *snap, char *msg, size_t msglen);

/* A qsm_sim race hook (qsm_sim_set_race_hook, opaque = the struct wl):
 * counts the reads that overlapped a write in flight, except those the
 * workload asked for (see workload.c), in w->races. */
void wl_sim_race_cb(void *opaque, const struct qsm_io_req *read, const struct qsm_io_req *write);

/* The requests and their times, one a line (for failure reports). */
void wl_dump(const struct wl *w, FILE *f);

/* --- the structural oracle on a sim disk --------------------------------- */

/* The in-tree checker (metadata/check.c) on the sim disk, read-only: its
 * exit code (qemu-img check's meaning), or -1 when it cannot run (err says). */
int wl_sim_check(struct qsm_sim *sim, struct qsm_check_result *res, char *err, size_t errlen);
/* The header's dirty bit (lazy refcounts in use and not yet clean). */
bool wl_sim_dirty(struct qsm_sim *sim);

#endif
