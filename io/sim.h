/*
 * io/sim.h: a deterministic simulated disk for tests.
 *
 * A `struct qsm_sim` is a disk: durable bytes D plus a list of writes that
 * completed but are not yet durable.  Any number of qsm_io handles may be
 * opened on it, one at a time (open, close, crash, reopen).
 *
 * Rules (tools/doc/design.md, "The simulated disk"):
 *  1. Submitted operations stay pending until the seeded scheduler completes
 *     them; it picks which pending operation completes next, so completions
 *     are reordered.  The scheduler runs from a libevent callback, never from
 *     submit.
 *  2. A read sees D plus the completed writes, in completion order.  A read
 *     that overlaps a write still in flight is an engine race: it is counted
 *     in qsm_sim_races() (tests assert it stays zero).
 *  3. A write becomes durable when a flush submitted after the write
 *     completed has itself completed.
 *  4. qsm_sim_crash() throws away everything not durable except a chosen
 *     subset of the completed-but-not-durable writes, and cancels what is in
 *     flight (their callbacks never run).  The handle is then down: what is
 *     submitted to it later is dropped too (never completes, not counted in
 *     flight), and all that is left to do with it is qsm_io_close.
 *  5. Faults: a rule fails operations tagged with a named event with an errno,
 *     once or every time (blocking reads too: qsm_io_pread_sync_ev).
 * Every choice comes from one PRNG seeded at qsm_sim_new(); the same seed and
 * the same sequence of calls replay the same run.
 */
#ifndef QSM_IO_SIM_H
#define QSM_IO_SIM_H

#include "io/io.h"

struct qsm_sim;

struct qsm_sim *qsm_sim_new(uint64_t seed);
void qsm_sim_free(struct qsm_sim *sim);
uint64_t qsm_sim_seed(const struct qsm_sim *sim);

/* Load the disk's durable contents from a file / save the current view
 * (durable + completed writes) to a file.  0 or -errno. */
int qsm_sim_load_file(struct qsm_sim *sim, const char *path);
int qsm_sim_save_file(struct qsm_sim *sim, const char *path);
/* Load the disk's durable contents from len bytes at buf (copied; the disk's
 * size becomes len, nothing is pending or unflushed afterwards), as
 * qsm_sim_load_file does from a file.  For fuzz targets, whose input is an
 * image in memory.  0, or -EBUSY while a handle has requests in flight. */
int qsm_sim_load_buf(struct qsm_sim *sim, const void *buf, size_t len);

/* Open a handle on the disk (flags as qsm_io_open_path; CREATE empties it). */
int qsm_io_open_sim(struct event_base *base, struct qsm_sim *sim, int flags,
		    struct qsm_io **out);

/* Scheduler knobs.  max_batch: at most this many pending operations complete
 * per scheduler pass (1 = strictly one at a time; default 4). */
void qsm_sim_set_max_batch(struct qsm_sim *sim, unsigned max_batch);

/* A byte-driven scheduler instead of the PRNG (fuzz targets).  Once set,
 * every scheduling choice (how many operations a scheduler pass completes,
 * which pending operation completes next) calls choose(opaque, n) with n >= 1
 * and uses its result modulo n; the PRNG is no longer drawn for them (crash
 * subsets of qsm_sim_crash_random still are).  choose must not call into
 * the sim or the engine.  fn NULL restores the PRNG. */
typedef uint64_t (*qsm_sim_chooser)(void *opaque, uint64_t n);
void qsm_sim_set_chooser(struct qsm_sim *sim, qsm_sim_chooser fn, void *opaque);

/* Keyed schedules: instead of drawing from the PRNG stream, each
 * submitted operation gets a rank hashed from the seed and what it is (op,
 * event, offset, length; flushes by their number), and every scheduler pass
 * completes pending operations lowest rank first.  The order of two
 * operations then does not depend on what else the run submitted, so a
 * shrinker that removes requests keeps the rest of the schedule mostly
 * intact (with the PRNG, removing one request reshuffles everything after
 * it).  Still a function of the seed: runs replay. */
void qsm_sim_set_keyed_schedule(struct qsm_sim *sim, bool on);

/* The largest file the disk holds, as a file system's maximum file size
 * (0, the default: no limit).  An operation that would make the disk larger
 * fails with -EFBIG and changes nothing: writes, zero ranges, truncates and
 * preallocations, asynchronous or synchronous.  Fuzz targets use it so that
 * an image naming a far offset cannot make a repair grow the disk (and the
 * checker's per-cluster table) to hundreds of GiB. */
void qsm_sim_set_max_size(struct qsm_sim *sim, uint64_t max_size);

/* Number of writes completed but not yet durable. */
size_t qsm_sim_unflushed(const struct qsm_sim *sim);
/* Reads that overlapped an in-flight write (engine races) so far. */
uint64_t qsm_sim_races(const struct qsm_sim *sim);
/* Called for each race as it is counted, with the read and the write (both
 * in flight), so a harness can tell engine races from what its own
 * workload asked for (a guest read of bytes a concurrent guest write
 * changes in place).  NULL removes it. */
typedef void (*qsm_sim_race_fn)(void *opaque, const struct qsm_io_req *read,
				const struct qsm_io_req *write);
void qsm_sim_set_race_hook(struct qsm_sim *sim, qsm_sim_race_fn fn, void *opaque);

/* Crash: keep durable data plus the unflushed completed writes whose index
 * (0 = oldest) has its bit set in keep_mask (for more than 64 unflushed
 * writes, bits past 63 are taken as set when keep_all_beyond is true).
 * In-flight operations are dropped. */
void qsm_sim_crash(struct qsm_sim *sim, uint64_t keep_mask, bool keep_all_beyond);
/* Crash keeping a random subset chosen by the disk's PRNG. */
void qsm_sim_crash_random(struct qsm_sim *sim);
/* As qsm_sim_crash, and the kept write at index `torn` (0 = oldest
 * unflushed) is torn at a sector boundary: only a prefix of its 512-byte
 * sectors, chosen by the PRNG, reaches the disk.  A write of one sector, or
 * a record that is not a write or not kept, is not torn. */
void qsm_sim_crash_torn(struct qsm_sim *sim, uint64_t keep_mask, bool keep_all_beyond,
			size_t torn);
/* Writes torn by crashes so far. */
uint64_t qsm_sim_torn(const struct qsm_sim *sim);

/* Faults. */
void qsm_sim_fault_add(struct qsm_sim *sim, enum qsm_io_event ev, int err, bool once);
void qsm_sim_fault_clear(struct qsm_sim *sim);
uint64_t qsm_sim_faults_fired(const struct qsm_sim *sim);

#endif
