/*
 * io/io_sim.c: the simulated disk (see sim.h for the rules it implements).
 *
 * Model.  A disk is three things:
 *   D    sm_durable: what survives any crash;
 *   L    sm_recs: completed-but-not-durable writes, in completion order, each
 *        a record (WRITE with a copy of its data, ZERO, DISCARD, TRUNCATE)
 *        numbered by a completion sequence number cseq;
 *   V    sm_view: D with L applied in order, kept materialised so reads are
 *        cheap.  Reads, get_size and save_file see V.
 * An open handle adds the in-flight list P (si_pending): submitted requests
 * the scheduler has not completed yet.
 *
 * Stores are sparse: 64 KiB chunks in a hash table keyed by chunk index,
 * allocated on first write, dropped when zeroed whole, so a multi-GiB sparse
 * disk costs only what was written.  Bytes at or past a store's size are
 * always zero in its chunks, so growing the size exposes zeros.
 *
 * Scheduler.  Submitting appends to P and activates si_sched_ev.  A pass of
 * that event completes 1..max_batch requests, each picked uniformly from P by
 * the disk's PRNG (or, when a chooser is set, by the chooser: both the count
 * and the picks), then re-activates itself while P is non-empty.  Effects
 * happen at completion: a READ copies from V, a WRITE-like request appends a
 * record to L and applies it to V, a FLUSH moves to D every record whose cseq
 * is at most the cseq current when the flush was submitted (a prefix of L;
 * kept in req->io_flushed_upto, the dm-log-writes rule).  A fault rule
 * matching req->event fails the request instead, with no effect.
 *
 * Races.  A READ and a write-like request (WRITE, ZERO, DISCARD, or TRUNCATE
 * as the range [new size, end)) that overlap and are in flight together count
 * one race per read; for a READ, io_flushed_upto is the "already counted" flag.
 *
 * Crash.  D becomes D plus the kept records of L (in order), V a copy of D,
 * L empties; P and the handle's deferred completions are dropped (their
 * callbacks never run) and the handle is marked crashed: it drops whatever
 * is submitted later and may only be closed.  qsm_io_crash_ marks it down in
 * io.c as well, so the requests io.c would complete itself (NO_FLUSH
 * flushes, invalid requests) are dropped too: once they were queued there
 * and the handle closed with one "in flight".
 *
 * Keyed schedules (qsm_sim_set_keyed_schedule): each submitted request
 * gets a rank hashed from the seed and the request itself (si_rank, parallel
 * to si_pending); a pass completes the lowest ranks first, and how many
 * comes from the lowest rank too.  No PRNG draw is involved.
 *
 * Determinism: every choice comes from sm_rng or the chooser; the hash table
 * depends only on chunk indices; nothing depends on addresses or time.  Out
 * of memory in the stores aborts (this is a test device).
 *
 * Invariants:
 *  1. V == D + L applied in order.
 *  2. L's cseq values increase strictly; sm_cseq is the last one handed out.
 *  3. si_sched_ev is active whenever P is non-empty and the handle is live.
 *  4. The handle's in_flight == |P| + deferred completions.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/io_internal.h"
#include "io/sim.h"
#include "io/util.h"

#define QSM_SIM_CHUNK_SHIFT 16
#define QSM_SIM_CHUNK (1u << QSM_SIM_CHUNK_SHIFT)
#define QSM_SIM_FLAGS_ALL (QSM_IO_RDONLY | QSM_IO_DIRECT | QSM_IO_CREATE)

/* --- Sparse store ------------------------------------------------------------ */

struct qsm_sim_store {
	uint64_t st_size;
	uint64_t *st_keys;      /* chunk index + 1; 0 marks an empty slot */
	uint8_t **st_vals;      /* QSM_SIM_CHUNK bytes each */
	size_t st_cap;          /* 0 or a power of two */
	size_t st_count;
};

static void *qsm_sim_xcalloc(size_t n, size_t sz)
{
	void *p = calloc(n ? n : 1, sz);
	if (!p) {
		fprintf(stderr, "qsm sim: out of memory\n");
		abort();
	}
	return p;
}

static size_t qsm_sim_hash(uint64_t key, size_t cap)
{
	key *= 0x9e3779b97f4a7c15ull;
	return (size_t)(key ^ (key >> 29)) & (cap - 1);
}

static uint8_t *qsm_sim_store_find(const struct qsm_sim_store *st, uint64_t idx)
{
	if (!st->st_cap)
		return NULL;
	for (size_t i = qsm_sim_hash(idx, st->st_cap); st->st_keys[i];
	     i = (i + 1) & (st->st_cap - 1)) {
		if (st->st_keys[i] == idx + 1)
			return st->st_vals[i];
	}
	return NULL;
}

static void qsm_sim_store_insert(struct qsm_sim_store *st, uint64_t idx, uint8_t *chunk)
{
	size_t i = qsm_sim_hash(idx, st->st_cap);
	while (st->st_keys[i])
		i = (i + 1) & (st->st_cap - 1);
	st->st_keys[i] = idx + 1;
	st->st_vals[i] = chunk;
	st->st_count++;
}

static void qsm_sim_store_grow(struct qsm_sim_store *st)
{
	uint64_t *keys = st->st_keys;
	uint8_t **vals = st->st_vals;
	size_t cap = st->st_cap;

	st->st_cap = cap ? cap * 2 : 64;
	st->st_keys = qsm_sim_xcalloc(st->st_cap, sizeof(*st->st_keys));
	st->st_vals = qsm_sim_xcalloc(st->st_cap, sizeof(*st->st_vals));
	st->st_count = 0;
	for (size_t i = 0; i < cap; i++) {
		if (keys[i])
			qsm_sim_store_insert(st, keys[i] - 1, vals[i]);
	}
	free(keys);
	free(vals);
}

/* The chunk for idx, created zeroed if absent. */
static uint8_t *qsm_sim_store_get(struct qsm_sim_store *st, uint64_t idx)
{
	uint8_t *c = qsm_sim_store_find(st, idx);
	if (c)
		return c;
	if ((st->st_count + 1) * 4 > st->st_cap * 3)
		qsm_sim_store_grow(st);
	c = qsm_sim_xcalloc(1, QSM_SIM_CHUNK);
	qsm_sim_store_insert(st, idx, c);
	return c;
}

/* Remove idx (linear probing with backward-shift deletion). */
static void qsm_sim_store_del(struct qsm_sim_store *st, uint64_t idx)
{
	size_t mask = st->st_cap - 1, i;

	if (!st->st_cap)
		return;
	for (i = qsm_sim_hash(idx, st->st_cap); st->st_keys[i] != idx + 1; i = (i + 1) & mask) {
		if (!st->st_keys[i])
			return;
	}
	free(st->st_vals[i]);
	st->st_keys[i] = 0;
	st->st_vals[i] = NULL;
	st->st_count--;
	for (size_t j = (i + 1) & mask; st->st_keys[j]; j = (j + 1) & mask) {
		size_t k = qsm_sim_hash(st->st_keys[j] - 1, st->st_cap);
		/* Entry j may stay when its home k lies cyclically in (i, j]. */
		if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
			continue;
		st->st_keys[i] = st->st_keys[j];
		st->st_vals[i] = st->st_vals[j];
		st->st_keys[j] = 0;
		st->st_vals[j] = NULL;
		i = j;
	}
}

static void qsm_sim_store_free(struct qsm_sim_store *st)
{
	for (size_t i = 0; i < st->st_cap; i++)
		free(st->st_vals[i]);
	free(st->st_keys);
	free(st->st_vals);
	memset(st, 0, sizeof(*st));
}

static void qsm_sim_store_copy(struct qsm_sim_store *dst, const struct qsm_sim_store *src)
{
	dst->st_size = src->st_size;
	dst->st_cap = src->st_cap;
	dst->st_count = src->st_count;
	dst->st_keys = NULL;
	dst->st_vals = NULL;
	if (!src->st_cap)
		return;
	dst->st_keys = qsm_sim_xcalloc(src->st_cap, sizeof(*dst->st_keys));
	dst->st_vals = qsm_sim_xcalloc(src->st_cap, sizeof(*dst->st_vals));
	memcpy(dst->st_keys, src->st_keys, src->st_cap * sizeof(*dst->st_keys));
	for (size_t i = 0; i < src->st_cap; i++) {
		if (src->st_keys[i]) {
			dst->st_vals[i] = qsm_sim_xcalloc(1, QSM_SIM_CHUNK);
			memcpy(dst->st_vals[i], src->st_vals[i], QSM_SIM_CHUNK);
		}
	}
}

/* Zero [off, end) within chunk idx, dropping the chunk when wholly zeroed. */
static void qsm_sim_store_zero_chunk(struct qsm_sim_store *st, uint64_t idx, uint64_t off,
				     uint64_t end)
{
	uint64_t base = idx << QSM_SIM_CHUNK_SHIFT;
	uint64_t lo = QSM_MAX(off, base) - base;
	uint64_t hi = QSM_MIN(end, base + QSM_SIM_CHUNK) - base;
	uint8_t *c = qsm_sim_store_find(st, idx);

	if (!c || lo >= hi)
		return;
	if (lo == 0 && hi == QSM_SIM_CHUNK)
		qsm_sim_store_del(st, idx);
	else
		memset(c + lo, 0, hi - lo);
}

/* Make [off, off+len) read as zeros; the size does not change. */
static void qsm_sim_store_zero(struct qsm_sim_store *st, uint64_t off, uint64_t len)
{
	uint64_t end = QSM_MIN(off + len, st->st_size); /* past the size is zero already */

	if (off >= end)
		return;
	uint64_t first = off >> QSM_SIM_CHUNK_SHIFT, last = (end - 1) >> QSM_SIM_CHUNK_SHIFT;
	if (last - first < st->st_cap) {
		for (uint64_t idx = first; idx <= last; idx++)
			qsm_sim_store_zero_chunk(st, idx, off, end);
		return;
	}
	/* A range wider than the table: visit the chunks that exist. */
	uint64_t *idxs = qsm_sim_xcalloc(st->st_count, sizeof(*idxs));
	size_t n = 0;
	for (size_t i = 0; i < st->st_cap; i++) {
		if (st->st_keys[i] && st->st_keys[i] - 1 >= first && st->st_keys[i] - 1 <= last)
			idxs[n++] = st->st_keys[i] - 1;
	}
	for (size_t i = 0; i < n; i++)
		qsm_sim_store_zero_chunk(st, idxs[i], off, end);
	free(idxs);
}

static void qsm_sim_store_truncate(struct qsm_sim_store *st, uint64_t size)
{
	if (size < st->st_size)
		qsm_sim_store_zero(st, size, st->st_size - size);
	st->st_size = size;
}

static void qsm_sim_store_write(struct qsm_sim_store *st, uint64_t off, const uint8_t *buf,
				uint64_t len)
{
	for (uint64_t done = 0; done < len;) {
		uint64_t pos = off + done, in = pos & (QSM_SIM_CHUNK - 1);
		uint64_t n = QSM_MIN(QSM_SIM_CHUNK - in, len - done);
		memcpy(qsm_sim_store_get(st, pos >> QSM_SIM_CHUNK_SHIFT) + in, buf + done, n);
		done += n;
	}
	if (len)
		st->st_size = QSM_MAX(st->st_size, off + len);
}

/* Read [off, off+len) into iov; zeros past the size (contract 2). */
static void qsm_sim_store_read(const struct qsm_sim_store *st, uint64_t off,
			       const struct iovec *iov, int iovcnt, uint64_t len)
{
	for (uint64_t done = 0; done < len;) {
		uint64_t pos = off + done, in = pos & (QSM_SIM_CHUNK - 1);
		uint64_t n = QSM_MIN(QSM_SIM_CHUNK - in, len - done);
		const uint8_t *c = NULL;
		if (pos >= st->st_size) {
			qsm_iov_memset(iov, iovcnt, done, 0, len - done);
			return;
		}
		c = qsm_sim_store_find(st, pos >> QSM_SIM_CHUNK_SHIFT);
		if (c)
			qsm_iov_from_buf(iov, iovcnt, done, c + in, n);
		else
			qsm_iov_memset(iov, iovcnt, done, 0, n);
		done += n;
	}
}

/* --- Records and the disk ------------------------------------------------------ */

/* A completed write-like operation; op is WRITE, ZERO, DISCARD or TRUNCATE
 * (offset is the new size for TRUNCATE). */
struct qsm_sim_rec {
	enum qsm_io_op rc_op;
	uint64_t rc_off, rc_len;
	uint8_t *rc_data;       /* WRITE only */
	uint64_t rc_cseq;
};

struct qsm_sim_fault {
	enum qsm_io_event fl_event;
	int fl_err;             /* negative errno */
	bool fl_once;
};

struct qsm_io_sim;

struct qsm_sim {
	uint64_t sm_seed;
	struct qsm_rng sm_rng;
	struct qsm_sim_store sm_durable;   /* D */
	struct qsm_sim_store sm_view;      /* V */
	struct qsm_sim_rec *sm_recs;       /* L */
	size_t sm_nrecs, sm_caprecs;
	uint64_t sm_cseq;
	unsigned sm_max_batch;
	uint64_t sm_max_size;              /* 0: unlimited, else -EFBIG past it */
	qsm_sim_chooser sm_choose;         /* NULL: scheduling choices from sm_rng */
	bool sm_keyed;                     /* qsm_sim_set_keyed_schedule */
	uint64_t sm_flushes;               /* flushes submitted (keyed ranks) */
	void *sm_choose_opaque;
	uint64_t sm_races;
	uint64_t sm_faults_fired;
	struct qsm_sim_fault *sm_faults;
	size_t sm_nfaults, sm_capfaults;
	struct qsm_io_sim *sm_open;        /* the open handle, if any */
	uint64_t sm_gen;                   /* bumped by crash and close */
	uint64_t sm_torn;                  /* writes torn by crashes */
	qsm_sim_race_fn sm_race_hook;
	void *sm_race_opaque;
};

struct qsm_io_sim {
	struct qsm_io_common c;            /* first */
	struct qsm_sim *si_sim;
	struct event *si_sched_ev;
	struct qsm_io_req **si_pending;    /* P, in submission order */
	uint64_t *si_rank;                 /* keyed schedules: each one's rank */
	size_t si_npending, si_cappending;
	bool si_crashed;
};

static struct qsm_io_sim *qsm_io_sim_of(struct qsm_io *io)
{
	return container_of(io, struct qsm_io_sim, c.io);
}

static void qsm_sim_rec_apply(struct qsm_sim_store *st, const struct qsm_sim_rec *rc)
{
	switch (rc->rc_op) {
	case QSM_IO_WRITE:
		qsm_sim_store_write(st, rc->rc_off, rc->rc_data, rc->rc_len);
		break;
	case QSM_IO_ZERO:
		/* Like FALLOC_FL_ZERO_RANGE without KEEP_SIZE: may extend. */
		qsm_sim_store_zero(st, rc->rc_off, rc->rc_len);
		if (rc->rc_len)
			st->st_size = QSM_MAX(st->st_size, rc->rc_off + rc->rc_len);
		break;
	case QSM_IO_DISCARD:
		/* Punch hole, keep size: discarded bytes read as zeros. */
		qsm_sim_store_zero(st, rc->rc_off, rc->rc_len);
		break;
	case QSM_IO_TRUNCATE:
		qsm_sim_store_truncate(st, rc->rc_off);
		break;
	case QSM_IO_PREALLOC:
		/* fallocate mode 0: contents unchanged, the file may grow. */
		st->st_size = QSM_MAX(st->st_size, rc->rc_off + rc->rc_len);
		break;
	default:
		assert(!"not a write-like record");
	}
}

/* Append a completed write-like record to L and apply it to V. */
static void qsm_sim_commit(struct qsm_sim *sim, struct qsm_sim_rec rc)
{
	if (sim->sm_nrecs == sim->sm_caprecs) {
		size_t cap = sim->sm_caprecs ? sim->sm_caprecs * 2 : 16;
		struct qsm_sim_rec *r = realloc(sim->sm_recs, cap * sizeof(*r));
		if (!r) {
			fprintf(stderr, "qsm sim: out of memory\n");
			abort();
		}
		sim->sm_recs = r;
		sim->sm_caprecs = cap;
	}
	rc.rc_cseq = ++sim->sm_cseq;
	qsm_sim_rec_apply(&sim->sm_view, &rc);
	sim->sm_recs[sim->sm_nrecs++] = rc;
}

/* Move to D every record of L with cseq <= upto (a prefix of L). */
static void qsm_sim_make_durable(struct qsm_sim *sim, uint64_t upto)
{
	size_t n = 0;

	while (n < sim->sm_nrecs && sim->sm_recs[n].rc_cseq <= upto) {
		qsm_sim_rec_apply(&sim->sm_durable, &sim->sm_recs[n]);
		free(sim->sm_recs[n].rc_data);
		n++;
	}
	if (n > 0)
		memmove(sim->sm_recs, sim->sm_recs + n,
			(sim->sm_nrecs - n) * sizeof(*sim->sm_recs));
	sim->sm_nrecs -= n;
}

static void qsm_sim_drop_recs(struct qsm_sim *sim)
{
	for (size_t i = 0; i < sim->sm_nrecs; i++)
		free(sim->sm_recs[i].rc_data);
	sim->sm_nrecs = 0;
}

/* Forget everything: the disk becomes empty and durably so. */
static void qsm_sim_reset(struct qsm_sim *sim)
{
	qsm_sim_drop_recs(sim);
	qsm_sim_store_free(&sim->sm_durable);
	qsm_sim_store_free(&sim->sm_view);
}

struct qsm_sim *qsm_sim_new(uint64_t seed)
{
	struct qsm_sim *sim = calloc(1, sizeof(*sim));
	if (!sim)
		return NULL;
	sim->sm_seed = seed;
	qsm_rng_seed(&sim->sm_rng, seed);
	sim->sm_max_batch = 4;
	return sim;
}

void qsm_sim_free(struct qsm_sim *sim)
{
	if (!sim)
		return;
	assert(!sim->sm_open && "close the handle before freeing its disk");
	qsm_sim_reset(sim);
	free(sim->sm_recs);
	free(sim->sm_faults);
	free(sim);
}

uint64_t qsm_sim_seed(const struct qsm_sim *sim)
{
	return sim->sm_seed;
}

void qsm_sim_set_max_batch(struct qsm_sim *sim, unsigned max_batch)
{
	sim->sm_max_batch = max_batch ? max_batch : 1;
}

void qsm_sim_set_chooser(struct qsm_sim *sim, qsm_sim_chooser fn, void *opaque)
{
	sim->sm_choose = fn;
	sim->sm_choose_opaque = opaque;
}

void qsm_sim_set_keyed_schedule(struct qsm_sim *sim, bool on)
{
	sim->sm_keyed = on;
}

/* A keyed rank: a hash of the seed and what the operation is, not of when
 * it came (flushes, all alike, count instead). */
static uint64_t qsm_sim_rank(struct qsm_sim *sim, const struct qsm_io_req *req)
{
	uint64_t h = sim->sm_seed * 0x9E3779B97F4A7C15ull;
	uint64_t k[4] = { (uint64_t)req->op << 8 | (uint64_t)req->event, req->offset, req->len,
			  req->op == QSM_IO_FLUSH ? ++sim->sm_flushes : 0 };
	for (int i = 0; i < 4; i++) {
		h ^= k[i] + 0x632BE59BD9B4E019ull + (h << 6) + (h >> 2);
		h *= 0xBF58476D1CE4E5B9ull;
		h ^= h >> 31;
	}
	return h;
}

void qsm_sim_set_max_size(struct qsm_sim *sim, uint64_t max_size)
{
	sim->sm_max_size = max_size;
}

/* -EFBIG when an operation ending at `end` (a new size for truncates) would
 * make the disk larger than its maximum, else 0. */
static int qsm_sim_size_check(const struct qsm_sim *sim, uint64_t end)
{
	if (sim->sm_max_size && end > sim->sm_max_size && end > sim->sm_view.st_size)
		return -EFBIG;
	return 0;
}

/* A scheduling choice in [0, n), n >= 1: the chooser's, else the PRNG's. */
static uint64_t qsm_sim_sched_below(struct qsm_sim *sim, uint64_t n)
{
	if (sim->sm_choose)
		return sim->sm_choose(sim->sm_choose_opaque, n) % n;
	return qsm_rng_below(&sim->sm_rng, n);
}

size_t qsm_sim_unflushed(const struct qsm_sim *sim)
{
	return sim->sm_nrecs;
}

uint64_t qsm_sim_races(const struct qsm_sim *sim)
{
	return sim->sm_races;
}

/* --- Crash and faults ------------------------------------------------------------- */

/* Apply the kept records to D.  torn (an index into L, or SIZE_MAX for
 * none) names a kept WRITE that reaches D only in part: a prefix of its
 * 512-byte sectors chosen by the PRNG (possibly none, never all), as a
 * power loss in the middle of a multi-sector write leaves it. */
static void qsm_sim_crash_(struct qsm_sim *sim, uint64_t keep_mask, bool keep_all_beyond,
			   bool random, size_t torn)
{
	for (size_t i = 0; i < sim->sm_nrecs; i++) {
		bool keep;
		if (random)
			keep = qsm_rng_below(&sim->sm_rng, 2);
		else if (i < 64)
			keep = (keep_mask >> i) & 1;
		else
			keep = keep_all_beyond;
		if (!keep)
			continue;
		struct qsm_sim_rec rc = sim->sm_recs[i];
		if (i == torn && rc.rc_op == QSM_IO_WRITE && rc.rc_len > 512) {
			uint64_t sectors = (rc.rc_len + 511) / 512;
			rc.rc_len = 512 * qsm_rng_below(&sim->sm_rng, sectors);
			sim->sm_torn++;
		}
		qsm_sim_rec_apply(&sim->sm_durable, &rc);
	}
	qsm_sim_drop_recs(sim);
	qsm_sim_store_free(&sim->sm_view);
	qsm_sim_store_copy(&sim->sm_view, &sim->sm_durable);

	struct qsm_io_sim *s = sim->sm_open;
	if (s) {
		uint64_t dropped = s->si_npending + qsm_io_crash_(&s->c.io);
		assert(s->c.io.stats.in_flight == dropped);
		s->c.io.stats.in_flight -= dropped;
		s->si_npending = 0;
		s->si_crashed = true;
		event_del(s->si_sched_ev);
	}
	sim->sm_gen++;
}

void qsm_sim_crash(struct qsm_sim *sim, uint64_t keep_mask, bool keep_all_beyond)
{
	qsm_sim_crash_(sim, keep_mask, keep_all_beyond, false, SIZE_MAX);
}

void qsm_sim_crash_random(struct qsm_sim *sim)
{
	qsm_sim_crash_(sim, 0, false, true, SIZE_MAX);
}

void qsm_sim_crash_torn(struct qsm_sim *sim, uint64_t keep_mask, bool keep_all_beyond,
			size_t torn)
{
	qsm_sim_crash_(sim, keep_mask, keep_all_beyond, false, torn);
}

void qsm_sim_set_race_hook(struct qsm_sim *sim, qsm_sim_race_fn fn, void *opaque)
{
	sim->sm_race_hook = fn;
	sim->sm_race_opaque = opaque;
}

uint64_t qsm_sim_torn(const struct qsm_sim *sim)
{
	return sim->sm_torn;
}

void qsm_sim_fault_add(struct qsm_sim *sim, enum qsm_io_event ev, int err, bool once)
{
	if (sim->sm_nfaults == sim->sm_capfaults) {
		size_t cap = sim->sm_capfaults ? sim->sm_capfaults * 2 : 8;
		struct qsm_sim_fault *f = realloc(sim->sm_faults, cap * sizeof(*f));
		if (!f) {
			fprintf(stderr, "qsm sim: out of memory\n");
			abort();
		}
		sim->sm_faults = f;
		sim->sm_capfaults = cap;
	}
	if (err > 0)
		err = -err;
	sim->sm_faults[sim->sm_nfaults++] = (struct qsm_sim_fault){
		.fl_event = ev,
		.fl_err = err ? err : -EIO,
		.fl_once = once,
	};
}

void qsm_sim_fault_clear(struct qsm_sim *sim)
{
	sim->sm_nfaults = 0;
}

uint64_t qsm_sim_faults_fired(const struct qsm_sim *sim)
{
	return sim->sm_faults_fired;
}

/* 0, or the errno of the first rule matching req (removed if once). */
static int qsm_sim_fault_check(struct qsm_sim *sim, enum qsm_io_event ev)
{
	for (size_t i = 0; i < sim->sm_nfaults; i++) {
		struct qsm_sim_fault f = sim->sm_faults[i];
		if (f.fl_event != ev || ev == QSM_IO_EV_NONE)
			continue;
		if (f.fl_once) {
			memmove(sim->sm_faults + i, sim->sm_faults + i + 1,
				(sim->sm_nfaults - i - 1) * sizeof(f));
			sim->sm_nfaults--;
		}
		sim->sm_faults_fired++;
		return f.fl_err;
	}
	return 0;
}

/* --- The handle ----------------------------------------------------------------------- */

static bool qsm_sim_op_writes(enum qsm_io_op op)
{
	return op == QSM_IO_WRITE || op == QSM_IO_ZERO || op == QSM_IO_DISCARD ||
	       op == QSM_IO_TRUNCATE || op == QSM_IO_PREALLOC;
}

/* The byte range a request touches, for race detection; false if none. */
static bool qsm_sim_req_range(const struct qsm_io_req *req, uint64_t *start, uint64_t *end)
{
	switch (req->op) {
	case QSM_IO_READ:
	case QSM_IO_WRITE:
	case QSM_IO_ZERO:
	case QSM_IO_DISCARD:
		*start = req->offset;
		*end = req->offset + req->len;
		return req->len > 0;
	case QSM_IO_TRUNCATE:
		*start = req->offset; /* bytes from the new size on may change */
		*end = UINT64_MAX;
		return true;
	default:
		return false;
	}
}

static bool qsm_sim_overlap(const struct qsm_io_req *a, const struct qsm_io_req *b)
{
	uint64_t as, ae, bs, be;
	if (!qsm_sim_req_range(a, &as, &ae) || !qsm_sim_req_range(b, &bs, &be))
		return false;
	return as < be && bs < ae;
}

/* Count a race for each in-flight read that req (just submitted) collides
 * with, or for req itself when it is a read colliding with a write. */
/* Count (and report to the race hook) one race of read with write. */
static void qsm_sim_race(struct qsm_sim *sim, struct qsm_io_req *read,
			 const struct qsm_io_req *write)
{
	read->io_flushed_upto = 1;
	sim->sm_races++;
	if (sim->sm_race_hook)
		sim->sm_race_hook(sim->sm_race_opaque, read, write);
}

static void qsm_sim_race_check(struct qsm_io_sim *s, struct qsm_io_req *req)
{
	struct qsm_sim *sim = s->si_sim;

	if (req->op == QSM_IO_READ) {
		for (size_t i = 0; i < s->si_npending; i++) {
			if (qsm_sim_op_writes(s->si_pending[i]->op) &&
			    qsm_sim_overlap(req, s->si_pending[i])) {
				qsm_sim_race(sim, req, s->si_pending[i]);
				return;
			}
		}
	} else if (qsm_sim_op_writes(req->op)) {
		for (size_t i = 0; i < s->si_npending; i++) {
			struct qsm_io_req *r = s->si_pending[i];
			if (r->op == QSM_IO_READ && !r->io_flushed_upto && qsm_sim_overlap(req, r))
				qsm_sim_race(sim, r, req);
		}
	}
}

/* Carry out req's effect now (its completion).  0 or -errno. */
static int qsm_sim_perform(struct qsm_sim *sim, struct qsm_io_req *req)
{
	int err = qsm_sim_fault_check(sim, req->event);
	if (err)
		return err; /* a failed operation changes nothing */
	if (req->op == QSM_IO_WRITE || req->op == QSM_IO_ZERO || req->op == QSM_IO_PREALLOC)
		err = qsm_sim_size_check(sim, req->offset + req->len);
	else if (req->op == QSM_IO_TRUNCATE)
		err = qsm_sim_size_check(sim, req->offset);
	if (err)
		return err;

	switch (req->op) {
	case QSM_IO_READ:
		qsm_sim_store_read(&sim->sm_view, req->offset, req->iov, req->iovcnt, req->len);
		return 0;
	case QSM_IO_WRITE: {
		uint8_t *data = malloc(req->len ? req->len : 1);
		if (!data)
			return -ENOMEM;
		qsm_iov_to_buf(req->iov, req->iovcnt, 0, data, req->len);
		qsm_sim_commit(sim, (struct qsm_sim_rec){ .rc_op = QSM_IO_WRITE, .rc_off = req->offset,
							  .rc_len = req->len, .rc_data = data });
		return 0;
	}
	case QSM_IO_ZERO:
	case QSM_IO_DISCARD:
	case QSM_IO_TRUNCATE:
	case QSM_IO_PREALLOC:
		qsm_sim_commit(sim, (struct qsm_sim_rec){ .rc_op = req->op, .rc_off = req->offset,
							  .rc_len = req->len });
		return 0;
	case QSM_IO_FLUSH:
		qsm_sim_make_durable(sim, req->io_flushed_upto);
		return 0;
	}
	return -EINVAL;
}

/* One scheduler pass (see the file comment). */
static void qsm_sim_sched_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_io_sim *s = arg;
	struct qsm_sim *sim = s->si_sim;
	uint64_t gen = sim->sm_gen;

	if (!s->si_npending)
		return;
	uint64_t n;
	if (sim->sm_keyed) {
		/* Up to max_batch of the lowest ranks, how many from the lowest. */
		uint64_t lo = UINT64_MAX;
		for (size_t i = 0; i < s->si_npending; i++)
			lo = QSM_MIN(lo, s->si_rank[i]);
		n = 1 + (lo >> 7) % QSM_MIN((uint64_t)sim->sm_max_batch, (uint64_t)s->si_npending);
	} else {
		n = 1 + qsm_sim_sched_below(sim, QSM_MIN((uint64_t)sim->sm_max_batch,
							  (uint64_t)s->si_npending));
	}
	while (n-- > 0 && s->si_npending > 0) {
		size_t k = 0;
		if (sim->sm_keyed) {
			for (size_t i = 1; i < s->si_npending; i++)
				if (s->si_rank[i] < s->si_rank[k])
					k = i;
		} else {
			k = (size_t)qsm_sim_sched_below(sim, s->si_npending);
		}
		struct qsm_io_req *req = s->si_pending[k];
		memmove(s->si_pending + k, s->si_pending + k + 1,
			(s->si_npending - k - 1) * sizeof(*s->si_pending));
		memmove(s->si_rank + k, s->si_rank + k + 1,
			(s->si_npending - k - 1) * sizeof(*s->si_rank));
		s->si_npending--;

		int ret = qsm_sim_perform(sim, req);
		qsm_io_enter_(&s->c.io);
		qsm_io_complete_(&s->c.io, req, ret);
		if (qsm_io_leave_(&s->c.io) || sim->sm_gen != gen)
			return; /* closed or crashed meanwhile */
	}
	if (s->si_npending)
		event_active(s->si_sched_ev, EV_READ, 0);
}

static void qsm_io_sim_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct qsm_io_sim *s = qsm_io_sim_of(io);
	struct qsm_sim *sim = s->si_sim;

	if (s->si_crashed) {
		io->stats.in_flight--; /* the machine is down: never completes */
		return;
	}
	if (s->si_npending == s->si_cappending) {
		size_t cap = s->si_cappending ? s->si_cappending * 2 : 64;
		struct qsm_io_req **p = realloc(s->si_pending, cap * sizeof(*p));
		uint64_t *rk = p ? realloc(s->si_rank, cap * sizeof(*rk)) : NULL;
		if (p)
			s->si_pending = p;
		if (!rk) {
			qsm_io_defer_complete_(io, req, -ENOMEM);
			return;
		}
		s->si_rank = rk;
		s->si_cappending = cap;
	}
	qsm_sim_race_check(s, req);
	if (req->op == QSM_IO_FLUSH)
		req->io_flushed_upto = sim->sm_cseq;
	s->si_rank[s->si_npending] = sim->sm_keyed ? qsm_sim_rank(sim, req) : 0;
	s->si_pending[s->si_npending++] = req;
	event_active(s->si_sched_ev, EV_READ, 0);
}

static int qsm_io_sim_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	int err = qsm_sim_fault_check(qsm_io_sim_of(io)->si_sim, io->sync_event);
	if (err)
		return err;
	struct iovec v = { .iov_base = buf, .iov_len = len };
	qsm_sim_store_read(&qsm_io_sim_of(io)->si_sim->sm_view, off, &v, 1, len);
	return 0;
}

static int qsm_io_sim_pwrite_sync(struct qsm_io *io, const void *buf, size_t len, uint64_t off)
{
	struct qsm_io_sim *s = qsm_io_sim_of(io);
	uint8_t *data;

	if (s->si_crashed)
		return -EIO;
	if (qsm_sim_size_check(s->si_sim, off + len))
		return -EFBIG;
	data = malloc(len ? len : 1);
	if (!data)
		return -ENOMEM;
	if (len)
		memcpy(data, buf, len);
	qsm_sim_commit(s->si_sim, (struct qsm_sim_rec){ .rc_op = QSM_IO_WRITE, .rc_off = off,
							.rc_len = len, .rc_data = data });
	return 0;
}

static int qsm_io_sim_flush_sync(struct qsm_io *io)
{
	struct qsm_io_sim *s = qsm_io_sim_of(io);

	if (s->si_crashed)
		return -EIO;
	qsm_sim_make_durable(s->si_sim, UINT64_MAX);
	return 0;
}

static int qsm_io_sim_truncate_sync(struct qsm_io *io, uint64_t size)
{
	struct qsm_io_sim *s = qsm_io_sim_of(io);

	if (s->si_crashed)
		return -EIO;
	if (qsm_sim_size_check(s->si_sim, size))
		return -EFBIG;
	qsm_sim_commit(s->si_sim, (struct qsm_sim_rec){ .rc_op = QSM_IO_TRUNCATE, .rc_off = size });
	return 0;
}

static int qsm_io_sim_get_size(struct qsm_io *io, uint64_t *size)
{
	*size = qsm_io_sim_of(io)->si_sim->sm_view.st_size;
	return 0;
}

/* cm_quiesce (qsm_io_abandon): pending requests are only pointers here
 * (nothing runs them between loop passes), so forgetting them is enough. */
static void qsm_io_sim_quiesce(struct qsm_io *io)
{
	struct qsm_io_sim *s = qsm_io_sim_of(io);

	s->si_npending = 0;
	if (s->si_sched_ev)
		event_del(s->si_sched_ev);
}

static void qsm_io_sim_close(struct qsm_io *io)
{
	struct qsm_io_sim *s = qsm_io_sim_of(io);
	struct qsm_sim *sim = s->si_sim;

	assert(s->si_npending == 0);
	if (sim->sm_open == s)
		sim->sm_open = NULL;
	sim->sm_gen++;
	if (s->si_sched_ev)
		event_free(s->si_sched_ev);
	free(s->si_pending);
	free(s->si_rank);
	qsm_io_common_fini_(&s->c);
	free(s);
}

static const struct qsm_io_ops qsm_io_sim_ops = {
	.name = "sim",
	.submit = qsm_io_sim_submit,
	.pread_sync = qsm_io_sim_pread_sync,
	.pwrite_sync = qsm_io_sim_pwrite_sync,
	.flush_sync = qsm_io_sim_flush_sync,
	.truncate_sync = qsm_io_sim_truncate_sync,
	.get_size = qsm_io_sim_get_size,
	.close = qsm_io_sim_close,
};

int qsm_io_open_sim(struct event_base *base, struct qsm_sim *sim, int flags,
		    struct qsm_io **out)
{
	struct qsm_io_sim *s;
	int ret;

	*out = NULL;
	if (!base || !sim || (flags & ~QSM_SIM_FLAGS_ALL) ||
	    ((flags & QSM_IO_RDONLY) && (flags & QSM_IO_CREATE)))
		return -EINVAL;
	if (sim->sm_open)
		return -EBUSY; /* one handle at a time */
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	ret = qsm_io_common_init_(&s->c, &qsm_io_sim_ops, base, flags);
	if (ret == 0) {
		s->c.cm_quiesce = qsm_io_sim_quiesce;
		s->si_sched_ev = event_new(base, -1, 0, qsm_sim_sched_cb, s);
		if (!s->si_sched_ev)
			ret = -ENOMEM;
	}
	if (ret < 0) {
		qsm_io_common_fini_(&s->c);
		free(s);
		return ret;
	}
	s->si_sim = sim;
	if (flags & QSM_IO_CREATE)
		qsm_sim_reset(sim); /* "CREATE empties it", durably */
	sim->sm_open = s;
	*out = &s->c.io;
	return 0;
}

/* --- Files ------------------------------------------------------------------------------ */

int qsm_sim_load_file(struct qsm_sim *sim, const char *path)
{
	struct stat st;
	uint8_t *buf;
	int fd, ret = 0;

	if (sim->sm_open && sim->sm_open->si_npending)
		return -EBUSY;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		ret = -errno;
		close(fd);
		return ret;
	}
	buf = malloc(QSM_SIM_CHUNK);
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	qsm_sim_reset(sim);
	for (uint64_t off = 0; off < (uint64_t)st.st_size;) {
		/* Skip holes where the file system reports them. */
		if (off % QSM_SIM_CHUNK == 0) {
			off_t data = lseek(fd, (off_t)off, SEEK_DATA);
			if (data < 0 && errno == ENXIO)
				break; /* only a hole is left */
			if (data > (off_t)off)
				off = QSM_ALIGN_DOWN((uint64_t)data, QSM_SIM_CHUNK);
		}
		struct qsm_io_fds f = { .fd = fd, .dfd = -1 };
		uint64_t n = QSM_MIN((uint64_t)QSM_SIM_CHUNK - off % QSM_SIM_CHUNK,
				     (uint64_t)st.st_size - off);
		struct iovec v = { .iov_base = buf, .iov_len = n };
		ret = qsm_io_fds_rw_(&f, false, &v, 1, off, n);
		if (ret < 0)
			break;
		bool zero = true;
		for (uint64_t i = 0; i < n && zero; i++)
			zero = buf[i] == 0;
		if (!zero)
			qsm_sim_store_write(&sim->sm_durable, off, buf, n);
		off += n;
	}
	free(buf);
	close(fd);
	if (ret < 0) {
		qsm_sim_reset(sim);
		return ret;
	}
	sim->sm_durable.st_size = (uint64_t)st.st_size;
	qsm_sim_store_copy(&sim->sm_view, &sim->sm_durable);
	return 0;
}

int qsm_sim_load_buf(struct qsm_sim *sim, const void *buf, size_t len)
{
	const uint8_t *b = buf;

	if (sim->sm_open && sim->sm_open->si_npending)
		return -EBUSY;
	qsm_sim_reset(sim);
	/* All-zero chunks stay unallocated, as holes do in load_file. */
	for (size_t off = 0; off < len; off += QSM_SIM_CHUNK) {
		size_t n = QSM_MIN((size_t)QSM_SIM_CHUNK, len - off);
		bool zero = true;
		for (size_t i = 0; i < n && zero; i++)
			zero = b[off + i] == 0;
		if (!zero)
			qsm_sim_store_write(&sim->sm_durable, off, b + off, n);
	}
	sim->sm_durable.st_size = len;
	qsm_sim_store_copy(&sim->sm_view, &sim->sm_durable);
	return 0;
}

int qsm_sim_save_file(struct qsm_sim *sim, const char *path)
{
	const struct qsm_sim_store *v = &sim->sm_view;
	struct qsm_io_fds f = { .dfd = -1 };
	int ret = 0;

	f.fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (f.fd < 0)
		return -errno;
	for (size_t i = 0; i < v->st_cap && ret == 0; i++) {
		if (!v->st_keys[i])
			continue;
		uint64_t off = (v->st_keys[i] - 1) << QSM_SIM_CHUNK_SHIFT;
		if (off >= v->st_size)
			continue;
		uint64_t n = QSM_MIN((uint64_t)QSM_SIM_CHUNK, v->st_size - off);
		struct iovec iov = { .iov_base = v->st_vals[i], .iov_len = n };
		ret = qsm_io_fds_rw_(&f, true, &iov, 1, off, n);
	}
	if (ret == 0)
		ret = qsm_io_fds_truncate_(&f, v->st_size);
	if (close(f.fd) < 0 && ret == 0)
		ret = -errno;
	return ret;
}
