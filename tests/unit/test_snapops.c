/*
 * tests/unit/test_snapops.c: Check suite "snapops" for sm/snapops.c, the
 * snapshot operations, live: submitted while guest requests are in flight,
 * on the simulated disk (completions reordered from a seed; QSM_TEST_SEED=N
 * reruns one seed).
 *
 *  - create: writes in flight when qsm_snapshot_create_async is called are
 *    in the snapshot; of those submitted after it, the ones that complete
 *    before its callback ran in place (some do) and are in it, the others
 *    are not: every one over a cluster to allocate is among them (it waited
 *    in HELD); reads submitted after it keep running (some complete before
 *    that callback) and read what the disk holds; the snapshot then reads
 *    exactly as the disk did, the active disk as every write left it, the
 *    image checks clean;
 *  - apply: writes before it are lost with the old disk, reads and writes
 *    after it wait for it and see the snapshot's disk;
 *  - delete: the snapshot is gone, the writes around it all land, clean;
 *    beside it, writes over clusters the active disk owns alone run in
 *    place (some complete before its callback), those over clusters
 *    shared with another snapshot wait for it;
 *  - the rules: one operation at a time (-EBUSY), the blocking forms from a
 *    callback (-EDEADLK), a close waits for the operation, and a refcount
 *    overflow (refcount_bits=1) changes nothing and releases the writes;
 *  - VM state: a create with it keeps it (size and clock listed) and drops
 *    the active copy, an apply brings it back.
 * No race on the simulated disk (a read and a write of the same bytes in
 * flight together) in any of them.
 */
#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/sim.h"
#include "sm/qsm.h"

#define SIZE (16ull << 20)
#define CLUSTER 4096u
#define NW 24 /* writes per group */

static char tmpdir[256];

struct ctx {
	struct event_base *base;
	struct qsm_sim *sim;
	struct qsm_image *img;
	char path[320];
	uint8_t *before, *after; /* what the snapshot and the active disk must read */
	bool used[SIZE / CLUSTER]; /* clusters written by submit_writes */
	unsigned seq;            /* completions so far */
	unsigned pending;
	unsigned snap_seq;       /* seq of the snapshot operation's callback */
	int snap_ret;
	bool snap_done;
	char err[256];
};

struct io {
	struct ctx *c;
	uint8_t *buf;
	uint64_t off, len;
	struct iovec iov;
	unsigned seq;
	int ret;
	bool done;
};

static void io_cb(void *opaque, int ret)
{
	struct io *io = opaque;
	io->ret = ret;
	io->done = true;
	io->seq = ++io->c->seq;
	io->c->pending--;
}

static void snap_cb(void *opaque, int ret)
{
	struct ctx *c = opaque;
	c->snap_ret = ret;
	c->snap_done = true;
	c->snap_seq = ++c->seq;
}

static uint64_t seed_of(int i)
{
	const char *s = getenv("QSM_TEST_SEED");
	return s ? strtoull(s, NULL, 0) : 1000u + (uint64_t)i;
}

/* A 16 MiB v3 image with 4 KiB clusters (eight L2 tables) on the sim,
 * every byte written with a pattern first. */
static void setup(struct ctx *c, uint64_t seed, unsigned refcount_bits)
{
	char err[256];
	memset(c, 0, sizeof(*c));
	snprintf(c->path, sizeof(c->path), "%s/img-%llu.qcow2", tmpdir, (unsigned long long)seed);
	struct qsm_create_opts co = { .struct_size = sizeof(co), .size = SIZE,
				      .cluster_size = CLUSTER, .refcount_bits = refcount_bits };
	ck_assert_msg(qsm_create(c->path, &co, err, sizeof(err)) == 0, "%s", err);
	c->base = event_base_new();
	c->sim = qsm_sim_new(seed);
	ck_assert_int_eq(qsm_sim_load_file(c->sim, c->path), 0);
	qsm_sim_set_max_batch(c->sim, 1 + (unsigned)(seed % 4));
	struct qsm_io *io;
	ck_assert_int_eq(qsm_io_open_sim(c->base, c->sim, 0, &io), 0);
	struct qsm_open_opts oo = { .struct_size = sizeof(oo), .work_threads = -1,
				    .l2_cache_size = 3 * CLUSTER };
	ck_assert_msg(qsm_open_io(c->base, io, &oo, &c->img, err, sizeof(err)) == 0, "%s", err);
	c->before = malloc(SIZE);
	c->after = malloc(SIZE);
	for (uint64_t i = 0; i < SIZE; i++)
		c->before[i] = (uint8_t)(i / 512 * 7 + 1);
	/* some clusters left unallocated: zeros */
	for (uint64_t o = 0; o < SIZE; o += 5 * CLUSTER)
		memset(c->before + o, 0, CLUSTER);
	for (uint64_t o = 0; o < SIZE; o += 1 << 20)
		ck_assert_int_eq(qsm_sync_pwrite(c->img, c->before + o, 1 << 20, o), 0);
	memcpy(c->after, c->before, SIZE);
}

static void run_until_idle(struct ctx *c)
{
	while (c->pending || !c->snap_done)
		event_base_loop(c->base, EVLOOP_ONCE);
}

/* n writes of distinct clusters, none written before in the test (so
 * their order does not matter: a write beside a create or delete may run
 * in place beside the writes before it), sector-aligned lengths inside the
 * cluster; applied to the model(s) given. */
static struct io *submit_writes(struct ctx *c, uint64_t *rng, unsigned n, uint8_t pat,
				uint8_t *m1, uint8_t *m2)
{
	struct io *ios = calloc(n, sizeof(*ios));
	uint64_t nclusters = SIZE / CLUSTER;
	bool *used = c->used;
	for (unsigned i = 0; i < n; i++) {
		uint64_t cl;
		do {
			*rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
			cl = (*rng >> 33) % nclusters;
		} while (used[cl]);
		used[cl] = true;
		uint64_t sect = (*rng >> 20) % (CLUSTER / 512), len = (1 + (*rng >> 40) % 8) * 512;
		if (sect * 512 + len > CLUSTER)
			len = CLUSTER - sect * 512;
		struct io *io = &ios[i];
		io->c = c;
		io->off = cl * CLUSTER + sect * 512;
		io->len = len;
		io->buf = malloc(len);
		memset(io->buf, pat + (uint8_t)i, len);
		if (m1)
			memcpy(m1 + io->off, io->buf, len);
		if (m2)
			memcpy(m2 + io->off, io->buf, len);
		io->iov = (struct iovec){ io->buf, len };
		c->pending++;
		ck_assert_int_eq(qsm_writev(c->img, io->off, &io->iov, 1, io_cb, io), 0);
	}
	return ios;
}

/* n writes over the bytes of the writes `prev`, with pattern pat;
 * applied to model m1. */
static struct io *submit_rewrites(struct ctx *c, const struct io *prev, unsigned n, uint8_t pat,
				  uint8_t *m1)
{
	struct io *ios = calloc(n, sizeof(*ios));
	for (unsigned i = 0; i < n; i++) {
		struct io *io = &ios[i];
		io->c = c;
		io->off = prev[i].off;
		io->len = prev[i].len;
		io->buf = malloc(io->len);
		memset(io->buf, pat + (uint8_t)i, io->len);
		memcpy(m1 + io->off, io->buf, io->len);
		io->iov = (struct iovec){ io->buf, io->len };
		c->pending++;
		ck_assert_int_eq(qsm_writev(c->img, io->off, &io->iov, 1, io_cb, io), 0);
	}
	return ios;
}

/* n reads, none overlapping the writes `avoid` or `avoid2` (n_avoid of
 * them each, in flight beside them: their bytes would race on the sim
 * disk). */
static struct io *submit_reads2(struct ctx *c, uint64_t *rng, unsigned n, const struct io *avoid,
				const struct io *avoid2, unsigned n_avoid)
{
	struct io *ios = calloc(n, sizeof(*ios));
	for (unsigned i = 0; i < n; i++) {
		struct io *io = &ios[i];
		bool clash;
		do {
			*rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
			io->len = CLUSTER * (1 + (*rng >> 50) % 4);
			io->off = ((*rng >> 30) % (SIZE / 512)) * 512;
			if (io->off + io->len > SIZE)
				io->off = SIZE - io->len;
			clash = false;
			for (unsigned k = 0; k < n_avoid; k++)
				clash |= (avoid && io->off < avoid[k].off + avoid[k].len &&
					  avoid[k].off < io->off + io->len) ||
					 (avoid2 && io->off < avoid2[k].off + avoid2[k].len &&
					  avoid2[k].off < io->off + io->len);
		} while (clash);
		io->c = c;
		io->buf = malloc(io->len);
		io->iov = (struct iovec){ io->buf, io->len };
		c->pending++;
		ck_assert_int_eq(qsm_readv(c->img, io->off, &io->iov, 1, io_cb, io), 0);
	}
	return ios;
}

static struct io *submit_reads(struct ctx *c, uint64_t *rng, unsigned n, const struct io *avoid,
			       unsigned n_avoid)
{
	return submit_reads2(c, rng, n, avoid, NULL, n_avoid);
}

static void free_ios(struct io *ios, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		free(ios[i].buf);
	free(ios);
}

/* Close, check clean (qsm's check, as qemu-img check counts), and compare
 * the disk (snap: the snapshot named so) with model. */
static void close_and_verify(struct ctx *c, uint64_t seed, const char *snap, const uint8_t *snap_model,
			     unsigned nb_snapshots)
{
	char err[256];
	ck_assert_msg(qsm_sim_races(c->sim) == 0, "seed %llu: %llu races", (unsigned long long)seed,
		      (unsigned long long)qsm_sim_races(c->sim));
	ck_assert_int_eq(qsm_snapshot_count(c->img), nb_snapshots);
	ck_assert_int_eq(qsm_close(c->img), 0);
	ck_assert_int_eq(qsm_sim_save_file(c->sim, c->path), 0);
	qsm_sim_free(c->sim);

	struct qsm_check_report rep = { .struct_size = sizeof(rep) };
	int rc = qsm_check(c->path, 0, &rep, stderr, err, sizeof(err));
	ck_assert_msg(rc == 0, "seed %llu: check exit %d %s", (unsigned long long)seed, rc, err);
	ck_assert_msg(rep.corruptions == 0 && rep.leaks == 0,
		      "seed %llu: check: %llu corruptions, %llu leaks", (unsigned long long)seed,
		      (unsigned long long)rep.corruptions, (unsigned long long)rep.leaks);

	uint8_t *buf = malloc(SIZE);
	for (int pass = 0; pass < (snap ? 2 : 1); pass++) {
		struct qsm_open_opts ro = { .struct_size = sizeof(ro), .read_only = true,
					    .snapshot_name = pass ? snap : NULL };
		struct qsm_image *img;
		ck_assert_msg(qsm_open(c->base, c->path, &ro, &img, err, sizeof(err)) == 0, "%s", err);
		for (uint64_t o = 0; o < SIZE; o += 1 << 20)
			ck_assert_int_eq(qsm_sync_pread(img, buf + o, 1 << 20, o), 0);
		const uint8_t *want = pass ? snap_model : c->after;
		if (memcmp(buf, want, SIZE)) {
			uint64_t o = 0;
			while (buf[o] == want[o])
				o++;
			ck_abort_msg("seed %llu: %s disk at %#llx: %#x, want %#x",
				     (unsigned long long)seed, pass ? "the snapshot's" : "the active",
				     (unsigned long long)o, buf[o], want[o]);
		}
		ck_assert_int_eq(qsm_close(img), 0);
	}
	free(buf);
	free(c->before);
	free(c->after);
	event_base_free(c->base);
	unlink(c->path);
}

/* --- create ------------------------------------------------------------------ */

START_TEST(live_create)
{
	uint64_t seed = seed_of(_i), rng = seed;
	struct ctx c;
	setup(&c, seed, 0);
	/* the zero clusters unallocated: a write there allocates */
	for (uint64_t o = 0; o < SIZE; o += 5 * CLUSTER)
		ck_assert_int_eq(qsm_sync_discard(c.img, o, CLUSTER), 0);
	uint8_t *orig = malloc(SIZE);
	memcpy(orig, c.before, SIZE);
	/* before: in the snapshot and the active disk */
	struct io *w1 = submit_writes(&c, &rng, NW, 0x40, c.before, c.after);
	ck_assert_int_eq(qsm_snapshot_create_async(c.img, "live", NULL, c.err, sizeof(c.err), snap_cb,
						   &c), 0);
	ck_assert_int_eq(qsm_snapshot_create_async(c.img, "again", NULL, NULL, 0, snap_cb, &c),
			 -EBUSY);
	/* after: the active disk, and the snapshot for those that complete
	 * first; and reads of bytes no write touches from here on (what
	 * they return is known) */
	struct io *w2 = submit_writes(&c, &rng, NW, 0x80, c.after, NULL);
	struct io *r = submit_reads2(&c, &rng, NW, w1, w2, NW);
	run_until_idle(&c);
	ck_assert_msg(c.snap_ret == 0, "seed %llu: create: %d %s", (unsigned long long)seed,
		      c.snap_ret, c.err);
	struct qsm_stats st;
	qsm_get_stats(c.img, &st);
	unsigned reads_first = 0, writes_first = 0, to_alloc = 0;
	for (unsigned i = 0; i < NW; i++) {
		ck_assert_int_eq(w1[i].ret, 0);
		ck_assert_int_eq(w2[i].ret, 0);
		ck_assert_int_eq(r[i].ret, 0);
		if (w2[i].off / CLUSTER % 5 == 0) {
			to_alloc++;
			ck_assert_msg(w2[i].seq > c.snap_seq, "seed %llu: a write submitted after the "
				      "create allocated before it", (unsigned long long)seed);
		}
		if (w2[i].seq < c.snap_seq) { /* in place, before the create's commit */
			writes_first++;
			memcpy(c.before + w2[i].off, w2[i].buf, w2[i].len);
		}
		reads_first += r[i].seq < c.snap_seq;
		/* a read is not held: it runs beside w1's writes still in
		 * flight (old or new bytes) and w2's held ones (which it must
		 * never see) */
		for (uint64_t o = 0; o < r[i].len; o++) {
			uint64_t at = r[i].off + o;
			uint8_t b = r[i].buf[o];
			ck_assert_msg(b == c.before[at] || b == orig[at],
				      "seed %llu: read at %#llx: %#x, want %#x or %#x",
				      (unsigned long long)seed, (unsigned long long)at, b, c.before[at],
				      orig[at]);
		}
	}
	ck_assert_msg(reads_first > 0, "seed %llu: every read waited for the create",
		      (unsigned long long)seed);
	ck_assert_msg(writes_first > 0, "seed %llu: every write waited for the create",
		      (unsigned long long)seed);
	ck_assert_msg(st.snap_late_writes == NW && st.snap_deferred >= to_alloc,
		      "seed %llu: %llu late writes, %llu deferred (%u to allocate)",
		      (unsigned long long)seed, (unsigned long long)st.snap_late_writes,
		      (unsigned long long)st.snap_deferred, to_alloc);
	free_ios(w1, NW);
	free_ios(w2, NW);
	free_ios(r, NW);
	free(orig);
	close_and_verify(&c, seed, "live", c.before, 1);
}
END_TEST

/* --- apply ------------------------------------------------------------------- */

START_TEST(live_apply)
{
	uint64_t seed = seed_of(_i), rng = seed;
	struct ctx c;
	setup(&c, seed, 0);
	uint8_t *snap = malloc(SIZE);
	memcpy(snap, c.before, SIZE);
	ck_assert_int_eq(qsm_snapshot_create(c.img, "s0", c.err, sizeof(c.err)), 0);
	/* lost with the old disk */
	struct io *w1 = submit_writes(&c, &rng, NW, 0x40, NULL, NULL);
	ck_assert_int_eq(qsm_snapshot_apply_async(c.img, "s0", c.err, sizeof(c.err), snap_cb, &c), 0);
	memcpy(c.after, snap, SIZE);
	/* after: on top of the snapshot's disk; reads wait for the apply */
	struct io *w2 = submit_writes(&c, &rng, NW, 0x80, c.after, NULL);
	struct io *r = submit_reads(&c, &rng, NW, NULL, 0);
	run_until_idle(&c);
	ck_assert_msg(c.snap_ret == 0, "seed %llu: apply: %d %s", (unsigned long long)seed,
		      c.snap_ret, c.err);
	for (unsigned i = 0; i < NW; i++) {
		ck_assert_int_eq(w1[i].ret, 0);
		ck_assert_int_eq(w2[i].ret, 0);
		ck_assert_int_eq(r[i].ret, 0);
		ck_assert(w1[i].seq < c.snap_seq);
		ck_assert(w2[i].seq > c.snap_seq && r[i].seq > c.snap_seq);
		for (uint64_t o = 0; o < r[i].len; o++) {
			uint64_t at = r[i].off + o;
			if (c.after[at] == snap[at])
				ck_assert_msg(r[i].buf[o] == snap[at], "seed %llu: read at %#llx",
					      (unsigned long long)seed, (unsigned long long)at);
		}
	}
	free_ios(w1, NW);
	free_ios(w2, NW);
	free_ios(r, NW);
	close_and_verify(&c, seed, "s0", snap, 1);
	free(snap);
}
END_TEST

/* --- delete ------------------------------------------------------------------ */

START_TEST(live_delete)
{
	uint64_t seed = seed_of(_i), rng = seed;
	struct ctx c;
	setup(&c, seed, 0);
	ck_assert_int_eq(qsm_snapshot_create(c.img, "gone", c.err, sizeof(c.err)), 0);
	struct io *w0 = submit_writes(&c, &rng, NW, 0x20, c.after, NULL);
	while (c.pending)
		event_base_loop(c.base, EVLOOP_ONCE);
	ck_assert_int_eq(qsm_snapshot_create(c.img, "kept", c.err, sizeof(c.err)), 0);
	memcpy(c.before, c.after, SIZE);
	/* clusters the active disk owns alone again (copied on write) */
	struct io *w1b = submit_writes(&c, &rng, NW, 0x60, c.after, NULL);
	while (c.pending)
		event_base_loop(c.base, EVLOOP_ONCE);
	struct io *w1 = submit_writes(&c, &rng, NW, 0x40, c.after, NULL);
	ck_assert_int_eq(qsm_snapshot_delete_async(c.img, "gone", c.err, sizeof(c.err), snap_cb, &c),
			 0);
	struct qsm_stats st0, st;
	qsm_get_stats(c.img, &st0);
	/* beside the delete: w2 over clusters shared with "kept" (they wait
	 * for it), w3 over w1b's (in place, they need not) */
	struct io *w2 = submit_writes(&c, &rng, NW, 0x80, c.after, NULL);
	struct io *w3 = submit_rewrites(&c, w1b, NW, 0xa0, c.after);
	struct io *r = submit_reads2(&c, &rng, NW, w1, w3, NW);
	run_until_idle(&c);
	ck_assert_msg(c.snap_ret == 0, "seed %llu: delete: %d %s", (unsigned long long)seed,
		      c.snap_ret, c.err);
	qsm_get_stats(c.img, &st);
	unsigned in_place_first = 0;
	for (unsigned i = 0; i < NW; i++) {
		ck_assert_int_eq(w0[i].ret | w1b[i].ret | w1[i].ret | w2[i].ret | w3[i].ret | r[i].ret,
				 0);
		ck_assert(w2[i].seq > c.snap_seq);
		in_place_first += w3[i].seq < c.snap_seq;
	}
	ck_assert_msg(in_place_first > 0, "seed %llu: every write in place waited for the delete",
		      (unsigned long long)seed);
	ck_assert_msg(st.snap_late_writes - st0.snap_late_writes == 2 * NW &&
			      st.snap_deferred - st0.snap_deferred == NW,
		      "seed %llu: %llu late writes, %llu deferred", (unsigned long long)seed,
		      (unsigned long long)(st.snap_late_writes - st0.snap_late_writes),
		      (unsigned long long)(st.snap_deferred - st0.snap_deferred));
	free_ios(w0, NW);
	free_ios(w1b, NW);
	free_ios(w1, NW);
	free_ios(w2, NW);
	free_ios(w3, NW);
	free_ios(r, NW);
	close_and_verify(&c, seed, "kept", c.before, 1);
}
END_TEST

/* --- the rules ----------------------------------------------------------------- */

static void deadlock_cb(void *opaque, int ret)
{
	struct ctx *c = opaque;
	char err[128];
	ck_assert_int_eq(ret, 0);
	ck_assert_int_eq(qsm_snapshot_create(c->img, "inside", err, sizeof(err)), -EDEADLK);
	c->pending--;
}

START_TEST(rules)
{
	uint64_t seed = seed_of(0), rng = seed;
	struct ctx c;
	setup(&c, seed, 0);
	/* the blocking form from a callback */
	static uint8_t sector[512];
	struct iovec iov = { sector, sizeof(sector) };
	c.pending++;
	ck_assert_int_eq(qsm_readv(c.img, 0, &iov, 1, deadlock_cb, &c), 0);
	while (c.pending)
		event_base_loop(c.base, EVLOOP_ONCE);
	/* a close waits for the operation (writes in flight too) */
	struct io *w = submit_writes(&c, &rng, NW, 0x40, c.before, c.after);
	ck_assert_int_eq(qsm_snapshot_create_async(c.img, "at-close", NULL, c.err, sizeof(c.err),
						   snap_cb, &c), 0);
	ck_assert_int_eq(qsm_snapshot_count(c.img), 0); /* not before it is done */
	struct qsm_image *img = c.img;
	c.img = NULL;
	ck_assert_int_eq(qsm_close(img), 0);
	ck_assert(c.snap_done && c.snap_ret == 0 && c.pending == 0);
	free_ios(w, NW);
	struct qsm_io *io;
	ck_assert_int_eq(qsm_io_open_sim(c.base, c.sim, 0, &io), 0);
	struct qsm_open_opts oo = { .struct_size = sizeof(oo), .work_threads = -1 };
	ck_assert_int_eq(qsm_open_io(c.base, io, &oo, &c.img, c.err, sizeof(c.err)), 0);
	close_and_verify(&c, seed, "at-close", c.before, 1);
}
END_TEST

/* refcount_bits=1: a second reference cannot be counted.  Nothing changes,
 * the held writes go on, the image stays writable and clean. */
START_TEST(overflow)
{
	uint64_t seed = seed_of(0), rng = seed;
	struct ctx c;
	setup(&c, seed, 1);
	struct io *w1 = submit_writes(&c, &rng, NW, 0x40, c.before, c.after);
	ck_assert_int_eq(qsm_snapshot_create_async(c.img, "no", NULL, c.err, sizeof(c.err), snap_cb,
						   &c), 0);
	struct io *w2 = submit_writes(&c, &rng, NW, 0x80, c.after, NULL);
	run_until_idle(&c);
	ck_assert_int_eq(c.snap_ret, -ERANGE);
	ck_assert_msg(strstr(c.err, "Refcount overflow"), "%s", c.err);
	for (unsigned i = 0; i < NW; i++)
		ck_assert_int_eq(w1[i].ret | w2[i].ret, 0);
	free_ios(w1, NW);
	free_ios(w2, NW);
	close_and_verify(&c, seed, NULL, NULL, 0);
}
END_TEST

/* A create with VM state keeps it and drops the active copy (as QEMU's
 * savevm); an apply brings it back. */
static void vm_cb(void *opaque, int ret)
{
	int *r = opaque;
	*r = ret;
}

static int vm_io(struct ctx *c, bool write, uint8_t *buf, size_t len)
{
	int r = 1;
	struct iovec iov = { buf, len };
	int ret = write ? qsm_vmstate_writev(c->img, 0, &iov, 1, vm_cb, &r)
			: qsm_vmstate_readv(c->img, 0, &iov, 1, vm_cb, &r);
	if (ret)
		return ret;
	while (r == 1)
		event_base_loop(c->base, EVLOOP_ONCE);
	return r;
}

START_TEST(vm_state)
{
	uint64_t seed = seed_of(0);
	struct ctx c;
	setup(&c, seed, 0);
	size_t len = 50 * CLUSTER + 1536;
	uint8_t *st = malloc(len), *back = malloc(len);
	memset(st, 0x5a, len);
	ck_assert_int_eq(vm_io(&c, true, st, len), 0);
	struct qsm_snapshot_opts so = { .struct_size = sizeof(so), .vm_state_size = len,
					.vm_clock_nsec = 123456789 };
	ck_assert_int_eq(qsm_snapshot_create_async(c.img, "vm", &so, c.err, sizeof(c.err), snap_cb,
						   &c), 0);
	run_until_idle(&c);
	ck_assert_msg(c.snap_ret == 0, "%s", c.err);
	struct qsm_snapshot_info si = { .struct_size = sizeof(si) };
	ck_assert_int_eq(qsm_snapshot_get(c.img, 0, &si), 0);
	ck_assert_uint_eq(si.vm_state_size, len);
	ck_assert_uint_eq(si.vm_clock_nsec, 123456789);
	/* the active copy is gone */
	ck_assert_int_eq(vm_io(&c, false, back, len), 0);
	for (size_t i = 0; i < len; i++)
		ck_assert_msg(back[i] == 0, "active VM state byte %zu: %#x", i, back[i]);
	/* apply: the snapshot's VM state is the active one again */
	ck_assert_int_eq(qsm_snapshot_apply(c.img, "vm", c.err, sizeof(c.err)), 0);
	ck_assert_int_eq(vm_io(&c, false, back, len), 0);
	ck_assert(memcmp(back, st, len) == 0);
	free(st);
	free(back);
	close_and_verify(&c, seed, "vm", c.before, 1);
}
END_TEST

static Suite *snapops_suite(void)
{
	Suite *s = suite_create("snapops");
	TCase *tc = tcase_create("live");
	tcase_set_timeout(tc, 120);
	/* 6 seeds, fewer at a smaller QSM_TEST_SCALE (the sanitizer pass) */
	const char *sc = getenv("QSM_TEST_SCALE");
	int seeds = getenv("QSM_TEST_SEED") ? 1 : sc ? (int)(6 * atof(sc) + 0.5) : 6;
	if (seeds < 1)
		seeds = 1;
	tcase_add_loop_test(tc, live_create, 0, seeds);
	tcase_add_loop_test(tc, live_apply, 0, seeds);
	tcase_add_loop_test(tc, live_delete, 0, seeds);
	tcase_add_test(tc, rules);
	tcase_add_test(tc, overflow);
	tcase_add_test(tc, vm_state);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	const char *base = getenv("TMPDIR");
	snprintf(tmpdir, sizeof(tmpdir), "%s/qsm-test-snapops-XXXXXX", base ? base : "/var/tmp");
	if (!mkdtemp(tmpdir))
		return 1;
	SRunner *sr = srunner_create(snapops_suite());
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	rmdir(tmpdir);
	return failed ? 1 : 0;
}
