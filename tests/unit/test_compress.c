/*
 * tests/unit/test_compress.c: Check suite "compress", compressed writes
 * (qsm_write_compressed, the WRITE_COMPRESSED machine of sm/states.def).
 *
 *  - api: round trip with many requests in flight on the worker pool,
 *    incompressible clusters stored as is, the partial last cluster, v2,
 *    overwrites both ways, refusals (alignment, range, raw, read-only), and
 *    the on-disk packing read back from the file (byte-packed descriptors,
 *    a shared host cluster's refcount raised once per compressed cluster),
 *    then qsm's own check and qemu-img check (when installed) clean.
 *  - crash: the sim disk, CPU work inline (deterministic replay): a dry run
 *    counts the I/O completions N of a workload of compressed and plain
 *    whole-cluster writes and flushes; the run is replayed crashing at every
 *    completion k in 1..N (a random subset of unflushed writes kept).  After
 *    reopening: no corruption (leaks allowed) and every cluster holds the
 *    data of one write that could be there: not one superseded by a write
 *    that was durable (completed before a successful flush was submitted).
 *  - faults: EIO on data_write, l2_update and flush (once, persistent):
 *    the failing request reports it, the sticky error follows metadata
 *    failures, nothing durable is lost, no corruption.
 * Seeds are printed on failure (QSM_TEST_SEED replays one).
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/lsan_interface.h>
#define LSAN_OFF() __lsan_disable()
#define LSAN_ON() __lsan_enable()
#else
#define LSAN_OFF() ((void)0)
#define LSAN_ON() ((void)0)
#endif

#include "io/sim.h"
#include "io/util.h"
#include "metadata/check.h"
#include "sm/qsm.h"

static char tmpdir[256];

static void make_tmpdir(void)
{
	const char *base = getenv("TMPDIR");
	snprintf(tmpdir, sizeof(tmpdir), "%s/qsm-test-compress-XXXXXX", base ? base : "/var/tmp");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void rm_tmpdir(void)
{
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	(void)!system(cmd);
}

static bool have_qemu_img(void)
{
	return system("qemu-img --version >/dev/null 2>&1") == 0;
}

static double scale(void)
{
	const char *s = getenv("QSM_TEST_SCALE");
	double v = s ? atof(s) : 1.0;
	return v > 0 ? v : 1.0;
}

/* Byte of write `id` at guest offset x; compressible data repeats each
 * byte over 64-byte blocks (about 10:1 with deflate), and still differs per
 * write and per place. */
static inline uint8_t pat(int id, uint64_t x, bool compressible)
{
	if (compressible)
		x >>= 6;
	uint64_t h = x * 0x9E3779B97F4A7C15ull ^ ((uint64_t)id + 1) * 0xC2B2AE3D27D4EB4Full;
	h ^= h >> 29;
	h *= 0xBF58476D1CE4E5B9ull;
	h ^= h >> 32;
	return (uint8_t)h;
}

static void fill(uint8_t *buf, int id, uint64_t off, uint64_t len, bool compressible)
{
	for (uint64_t x = 0; x < len; x++)
		buf[x] = pat(id, off + x, compressible);
}

static void own_check_file(const char *path, struct qsm_check_result *res)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	char err[256] = "";
	ck_assert_int_eq(qsm_io_open_path(b, path, QSM_IO_RDONLY, "threads", &io), 0);
	ck_assert_msg(qsm_check_image(io, 0, res, NULL, err, sizeof(err)) == 0, "check: %s", err);
	qsm_io_close(io);
	event_base_free(b);
}

static void qemu_check_clean(const char *path)
{
	if (!have_qemu_img())
		return;
	char cmd[600];
	snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s'", path);
	ck_assert_msg(system(cmd) == 0, "qemu-img check %s is not clean", path);
}

/* --- api --------------------------------------------------------------------- */

struct done {
	int ret;
	bool called;
};

static void done_cb(void *opaque, int ret)
{
	struct done *d = opaque;
	d->ret = ret;
	d->called = true;
}

static void run_all(struct event_base *base, struct done *d, int n)
{
	for (;;) {
		int left = 0;
		for (int i = 0; i < n; i++)
			left += !d[i].called;
		if (!left)
			return;
		ck_assert_int_ge(event_base_loop(base, EVLOOP_ONCE), 0);
	}
}

static uint64_t be64_at(int fd, uint64_t off)
{
	uint8_t b[8];
	ck_assert_int_eq(pread(fd, b, 8, (off_t)off), 8);
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | b[i];
	return v;
}

/* L2 entry of guest cluster `gc` of the (closed) image at path. */
static uint64_t l2_entry(const char *path, unsigned cluster_bits, uint64_t gc)
{
	int fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	uint64_t l1_off = be64_at(fd, 40);
	uint64_t per = (1ull << cluster_bits) / 8;
	uint64_t l1e = be64_at(fd, l1_off + (gc / per) * 8) & 0x00fffffffffffe00ull;
	uint64_t e = l1e ? be64_at(fd, l1e + (gc % per) * 8) : 0;
	close(fd);
	return e;
}

static void api_case(unsigned compat, unsigned cluster_bits)
{
	uint64_t cs = 1ull << cluster_bits;
	uint64_t size = 64 * cs + 4608; /* a partial last cluster */
	char path[300], raw[300], err[256];
	snprintf(path, sizeof(path), "%s/a.qcow2", tmpdir);
	snprintf(raw, sizeof(raw), "%s/a.raw", tmpdir);
	struct qsm_create_opts co = { .size = size, .cluster_size = cs, .compat = compat };
	ck_assert_msg(qsm_create(path, &co, err, sizeof(err)) == 0, "create: %s", err);

	struct event_base *base = event_base_new();
	struct qsm_image *img;
	struct qsm_open_opts oo = { .work_threads = 2 };
	ck_assert_msg(qsm_open(base, path, &oo, &img, err, sizeof(err)) == 0, "open: %s", err);

	/* Refusals: no callback, nothing written. */
	uint8_t *buf = malloc(4 * cs);
	struct iovec iov = { buf, cs };
	struct done d = { 0 };
	ck_assert_int_eq(qsm_write_compressed(img, 512, &iov, 1, done_cb, &d), -EINVAL);
	iov.iov_len = cs - 512;
	ck_assert_int_eq(qsm_write_compressed(img, 0, &iov, 1, done_cb, &d), -EINVAL);
	iov.iov_len = 2 * cs;
	ck_assert_int_eq(qsm_write_compressed(img, 64 * cs, &iov, 1, done_cb, &d), -EINVAL);
	ck_assert(!d.called);

	/* 32 requests in flight: clusters 2i and 2i+1, the last one 62, 63
	 * and the partial 64; one cluster in four does not compress. */
	enum { N = 32 };
	static uint8_t *bufs[N];
	static struct iovec iovs[N][2];
	struct done dn[N];
	memset(dn, 0, sizeof(dn));
	unsigned expect_comp = 0, expect_plain = 0;
	for (int i = 0; i < N; i++) {
		uint64_t off = (uint64_t)i * 2 * cs;
		uint64_t len = i == N - 1 ? 2 * cs + 4608 : 2 * cs; /* 62, 63, 64 (partial) */
		if (i == N - 1)
			off = 62 * cs;
		bufs[i] = malloc(len);
		for (uint64_t c = 0; c < len; c += cs) {
			bool comp = (i + c / cs) % 4 != 3;
			fill(bufs[i] + c, i, off + c, QSM_MIN(cs, len - c), comp);
			comp ? expect_comp++ : expect_plain++;
		}
		/* Two iovec pieces, split mid-cluster. */
		iovs[i][0] = (struct iovec){ bufs[i], 1000 };
		iovs[i][1] = (struct iovec){ bufs[i] + 1000, len - 1000 };
		ck_assert_int_eq(qsm_write_compressed(img, off, iovs[i], 2, done_cb, &dn[i]), 0);
		ck_assert(!dn[i].called);
	}
	run_all(base, dn, N);
	for (int i = 0; i < N; i++)
		ck_assert_msg(dn[i].ret == 0, "request %d: %s", i, qsm_strerror(dn[i].ret));
	struct qsm_stats st;
	qsm_get_stats(img, &st);
	ck_assert_uint_eq(st.compressed_clusters + st.compress_fallbacks, expect_comp + expect_plain);
	ck_assert_uint_eq(st.compress_fallbacks, expect_plain);

	/* Read back everything. */
	uint8_t *rd = malloc(size);
	ck_assert_int_eq(qsm_sync_pread(img, rd, size, 0), 0);
	for (int i = 0; i < N - 1; i++)
		ck_assert_msg(memcmp(rd + (uint64_t)i * 2 * cs, bufs[i], 2 * cs) == 0,
			      "request %d reads back wrong", i);
	ck_assert_msg(memcmp(rd + 62 * cs, bufs[N - 1], 2 * cs + 4608) == 0, "last request reads back wrong");

	/* Overwrites: plain over compressed, compressed over plain data and
	 * over compressed; all old clusters released (checks below). */
	fill(buf, 100, 0, cs, false);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, cs, 0), 0);            /* compressed -> data */
	fill(buf, 101, 0, cs, true);
	ck_assert_int_eq(qsm_sync_write_compressed(img, buf, cs, 0), 0);  /* data -> compressed */
	fill(buf, 102, 2 * cs, cs, true);
	ck_assert_int_eq(qsm_sync_write_compressed(img, buf, cs, 2 * cs), 0); /* compressed -> compressed */
	fill(buf, 103, 3 * cs, cs, true);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf + 512, 512, 3 * cs + 512), 0); /* partial over compressed */
	ck_assert_int_eq(qsm_sync_pread(img, rd, 4 * cs, 0), 0);
	fill(buf, 101, 0, cs, true);
	ck_assert(memcmp(rd, buf, cs) == 0);
	fill(buf, 102, 2 * cs, cs, true);
	ck_assert(memcmp(rd + 2 * cs, buf, cs) == 0);
	fill(buf, 103, 3 * cs, cs, true);
	ck_assert(memcmp(rd + 3 * cs + 512, buf + 512, 512) == 0);
	ck_assert(memcmp(rd + 3 * cs, bufs[1] + cs, 512) == 0); /* request 1's second cluster */
	ck_assert_int_eq(qsm_close(img), 0);

	struct qsm_check_result res;
	own_check_file(path, &res);
	ck_assert_msg(res.corruptions == 0 && res.leaks == 0, "check: %llu corruptions, %llu leaks",
		      (unsigned long long)res.corruptions, (unsigned long long)res.leaks);
	ck_assert_uint_gt(res.compressed_clusters, 0);
	qemu_check_clean(path);

	/* Packing, read from the file: a fresh image, clusters written one
	 * after the other, land byte-packed; a shared host cluster's refcount
	 * (counted by check, which found no leak) is one per compressed cluster. */
	ck_assert(qsm_create(path, &co, err, sizeof(err)) == 0);
	ck_assert(qsm_open(base, path, &oo, &img, err, sizeof(err)) == 0);
	for (int i = 0; i < 6; i++) {
		fill(buf, 200 + i, (uint64_t)i * cs, cs, true);
		ck_assert_int_eq(qsm_sync_write_compressed(img, buf, cs, (uint64_t)i * cs), 0);
	}
	ck_assert_int_eq(qsm_close(img), 0);
	unsigned shift = 62 - (cluster_bits - 8);
	for (int i = 0; i < 6; i++) {
		uint64_t e = l2_entry(path, cluster_bits, (uint64_t)i);
		ck_assert_msg(e & (1ull << 62), "cluster %d not compressed (%#llx)", i, (unsigned long long)e);
		ck_assert_msg(!(e & (1ull << 63)), "COPIED set on a compressed cluster");
		if (i == 5)
			break;
		/* The next one starts inside this one's last sector or right
		 * after it (byte-packed; straddling into the next host cluster
		 * when it does not fit, as QEMU). */
		uint64_t off = e & ((1ull << shift) - 1);
		uint64_t nsec = ((e >> shift) & ((1ull << (cluster_bits - 8)) - 1)) + 1;
		uint64_t sec_end = QSM_ALIGN_DOWN(off, 512) + nsec * 512;
		uint64_t off2 = l2_entry(path, cluster_bits, (uint64_t)i + 1) & ((1ull << shift) - 1);
		ck_assert_msg(off2 > sec_end - 512 && off2 <= sec_end,
			      "cluster %d: %llu sectors from %#llx, the next at %#llx: not packed", i,
			      (unsigned long long)nsec, (unsigned long long)off, (unsigned long long)off2);
	}
	own_check_file(path, &res);
	ck_assert(res.corruptions == 0 && res.leaks == 0);
	ck_assert_uint_eq(res.compressed_clusters, 6);
	qemu_check_clean(path);

	/* Raw images and read-only opens refuse. */
	int fd = open(raw, O_CREAT | O_RDWR | O_TRUNC, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)(4 * cs)), 0);
	close(fd);
	struct qsm_open_opts ro = { .format = "raw" };
	ck_assert(qsm_open(base, raw, &ro, &img, err, sizeof(err)) == 0);
	iov = (struct iovec){ buf, cs };
	ck_assert_int_eq(qsm_write_compressed(img, 0, &iov, 1, done_cb, &d), -ENOTSUP);
	ck_assert_int_eq(qsm_close(img), 0);
	ro = (struct qsm_open_opts){ .read_only = true };
	ck_assert(qsm_open(base, path, &ro, &img, err, sizeof(err)) == 0);
	ck_assert_int_eq(qsm_write_compressed(img, 0, &iov, 1, done_cb, &d), -EBADF);
	ck_assert_int_eq(qsm_close(img), 0);
	ck_assert(!d.called);

	for (int i = 0; i < N; i++)
		free(bufs[i]);
	free(rd);
	free(buf);
	event_base_free(base);
}

START_TEST(api_v3)
{
	api_case(3, 16);
}
END_TEST

START_TEST(api_v2_small_clusters)
{
	api_case(2, 12);
}
END_TEST

/* --- crash and faults on the sim disk ---------------------------------------- */

enum okind { O_CWRITE, O_WRITE, O_FLUSH };

struct op {
	struct crun *r;
	int id;
	enum okind kind;
	uint64_t off, len;       /* whole clusters */
	bool comp;               /* compressible data */
	uint8_t *buf;
	struct iovec iov;
	bool submitted;
	uint64_t t_sub, t_done;  /* logical clock; t_done 0: never acknowledged */
	int ret;
};

struct crun {
	uint64_t seed;
	unsigned cluster;
	uint64_t size;
	int nops, depth;
	struct op *ops;
	struct event_base *base;
	struct qsm_sim *sim;
	struct qsm_image *img;
	int pending;
	uint64_t clock;
	uint64_t completions, crash_at;
	bool crashed;
	/* faults */
	bool fault;
	enum qsm_io_event fev;
	bool fonce;
	int failed_ops;
};

static void gen(struct crun *r)
{
	struct qsm_rng g;
	qsm_rng_seed(&g, r->seed);
	uint64_t nclusters = r->size / r->cluster;
	r->ops = calloc((size_t)r->nops, sizeof(*r->ops));
	for (int i = 0; i < r->nops; i++) {
		struct op *o = &r->ops[i];
		o->r = r;
		o->id = i;
		uint64_t k = qsm_rng_below(&g, 100);
		o->kind = k < 60 ? O_CWRITE : k < 85 ? O_WRITE : O_FLUSH;
		if (i == r->nops - 1)
			o->kind = O_FLUSH;
		if (o->kind == O_FLUSH)
			continue;
		uint64_t n = 1 + qsm_rng_below(&g, 3);
		uint64_t c0 = qsm_rng_below(&g, nclusters - n + 1);
		o->off = c0 * r->cluster;
		o->len = n * r->cluster;
		o->comp = qsm_rng_below(&g, 5) != 0;
		o->buf = malloc(o->len);
		fill(o->buf, i, o->off, o->len, o->comp);
		o->iov = (struct iovec){ o->buf, o->len };
	}
}

static void op_cb(void *opaque, int ret)
{
	struct op *o = opaque;
	struct crun *r = o->r;
	r->pending--;
	if (r->crashed)
		return;
	o->ret = ret;
	o->t_done = ++r->clock;
	if (ret)
		r->failed_ops++;
}

static void trace_cb(void *opaque, const struct qsm_io_req *req, bool done, int ret)
{
	struct crun *r = opaque;
	if (!done || r->crashed || req->op == QSM_IO_READ)
		return;
	if (++r->completions == r->crash_at) {
		qsm_sim_crash_random(r->sim);
		r->crashed = true;
		event_base_loopbreak(r->base);
	}
}

static int submit(struct crun *r, struct op *o)
{
	o->submitted = true;
	o->t_sub = ++r->clock;
	r->pending++;
	switch (o->kind) {
	case O_CWRITE: return qsm_write_compressed(r->img, o->off, &o->iov, 1, op_cb, o);
	case O_WRITE: return qsm_writev(r->img, o->off, &o->iov, 1, op_cb, o);
	default: return qsm_flush(r->img, op_cb, o);
	}
}

/* Run the workload from the sim's current disk; crash at completion
 * crash_at (0: never), or close cleanly.  Returns the close result. */
static int run(struct crun *r)
{
	char err[256];
	struct qsm_io *io;
	r->base = event_base_new();
	ck_assert_int_eq(qsm_io_open_sim(r->base, r->sim, 0, &io), 0);
	/* CPU work inline: the same seed replays the same run. */
	struct qsm_open_opts oo = { .work_threads = -1, .l2_cache_size = 2 * r->cluster };
	ck_assert_msg(qsm_open_io(r->base, io, &oo, &r->img, err, sizeof(err)) == 0,
		      "seed %llu: open: %s", (unsigned long long)r->seed, err);
	io->trace = trace_cb;
	io->trace_opaque = r;
	if (r->fault)
		qsm_sim_fault_add(r->sim, r->fev, EIO, r->fonce);
	int next = 0;
	while (!r->crashed && (next < r->nops || r->pending)) {
		while (!r->crashed && next < r->nops && r->pending < r->depth) {
			struct op *o = &r->ops[next++];
			int ret = submit(r, o);
			if (ret) {
				ck_assert_msg(r->fault, "seed %llu: submit op %d: %s",
					      (unsigned long long)r->seed, o->id, qsm_strerror(ret));
				op_cb(o, ret); /* refused at submit: sticky error */
			}
		}
		if (r->pending && !r->crashed)
			ck_assert_msg(event_base_loop(r->base, EVLOOP_ONCE) != 1,
				      "seed %llu: hang with %d requests pending",
				      (unsigned long long)r->seed, r->pending);
	}
	int ret = 0;
	if (r->crashed)
		qsm_abandon(r->img);
	else
		ret = qsm_close(r->img);
	qsm_sim_fault_clear(r->sim);
	event_base_free(r->base);
	return ret;
}

/* Durable: acknowledged before a successful flush was submitted. */
static bool durable(const struct crun *r, const struct op *d)
{
	if (d->kind == O_FLUSH || !d->t_done || d->ret)
		return false;
	for (int i = 0; i < r->nops; i++) {
		const struct op *f = &r->ops[i];
		if (f->kind == O_FLUSH && f->t_done && !f->ret && d->t_done < f->t_sub)
			return true;
	}
	return false;
}

/* Reopen the sim disk, check it and every cluster's contents.  Returns a
 * description of the first problem, or NULL. */
static const char *verify(struct crun *r, char *msg, size_t msglen)
{
	char err[256];
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	ck_assert_int_eq(qsm_io_open_sim(b, r->sim, QSM_IO_RDONLY, &io), 0);
	struct qsm_check_result res;
	memset(&res, 0, sizeof(res));
	int cret = qsm_check_image(io, 0, &res, NULL, err, sizeof(err));
	qsm_io_close(io);
	if (cret < 0 || res.corruptions || res.incomplete) {
		snprintf(msg, msglen, "check: %s, %llu corruptions", cret < 0 ? err : "ran",
			 (unsigned long long)res.corruptions);
		event_base_free(b);
		return msg;
	}
	ck_assert_int_eq(qsm_io_open_sim(b, r->sim, 0, &io), 0);
	struct qsm_image *img;
	struct qsm_open_opts oo = { .work_threads = -1 };
	if (qsm_open_io(b, io, &oo, &img, err, sizeof(err)) < 0) {
		snprintf(msg, msglen, "reopen: %s", err);
		event_base_free(b);
		return msg;
	}
	uint8_t *c = malloc(r->cluster), *want = malloc(r->cluster);
	const char *bad = NULL;
	for (uint64_t x = 0; x < r->size && !bad; x += r->cluster) {
		if (qsm_sync_pread(img, c, r->cluster, x) < 0) {
			snprintf(msg, msglen, "read %#llx fails", (unsigned long long)x);
			bad = msg;
			break;
		}
		/* Which write (or the initial zeros, id -1) is it? */
		int who = -2;
		bool zero = true;
		for (uint64_t k = 0; k < r->cluster; k++)
			zero &= c[k] == 0;
		if (zero)
			who = -1;
		for (int i = 0; i < r->nops && who == -2; i++) {
			const struct op *o = &r->ops[i];
			if (o->kind == O_FLUSH || !o->submitted || x < o->off || x >= o->off + o->len)
				continue;
			fill(want, i, x, r->cluster, o->comp);
			if (memcmp(want, c, r->cluster) == 0)
				who = i;
		}
		if (who == -2) {
			snprintf(msg, msglen, "cluster %#llx holds data of no write", (unsigned long long)x);
			bad = msg;
			break;
		}
		uint64_t v_done = who < 0 ? 0 : r->ops[who].t_done ? r->ops[who].t_done : UINT64_MAX;
		for (int i = 0; i < r->nops; i++) {
			const struct op *d = &r->ops[i];
			if (i == who || d->kind == O_FLUSH || x < d->off || x >= d->off + d->len)
				continue;
			if (durable(r, d) && v_done < d->t_sub) {
				snprintf(msg, msglen, "cluster %#llx holds %s %d, but op %d (durable) "
					 "superseded it", (unsigned long long)x,
					 who < 0 ? "zeros" : "op", who, i);
				bad = msg;
				break;
			}
		}
	}
	free(c);
	free(want);
	qsm_close(img);
	event_base_free(b);
	return bad;
}

static void free_ops(struct crun *r)
{
	for (int i = 0; i < r->nops; i++)
		free(r->ops[i].buf);
	free(r->ops);
	r->ops = NULL;
}

static uint64_t env_seed(uint64_t def)
{
	const char *s = getenv("QSM_TEST_SEED");
	return s ? strtoull(s, NULL, 0) : def;
}

static void make_initial(const char *path, unsigned cluster, uint64_t size, unsigned compat)
{
	char err[256];
	struct qsm_create_opts co = { .size = size, .cluster_size = cluster, .compat = compat };
	ck_assert_msg(qsm_create(path, &co, err, sizeof(err)) == 0, "create: %s", err);
}

static void crun_init(struct crun *r, uint64_t seed, const char *img_path)
{
	static const unsigned clusters[] = { 512, 4096, 65536 };
	memset(r, 0, sizeof(*r));
	r->seed = seed;
	r->cluster = clusters[seed % 3];
	r->size = r->cluster == 65536 ? (2u << 20) : r->cluster * 48;
	r->nops = 18;
	r->depth = 1 + (int)(seed % 4);
	make_initial(img_path, r->cluster, r->size, seed % 5 == 4 ? 2 : 3);
	r->sim = qsm_sim_new(seed);
	ck_assert_int_eq(qsm_sim_load_file(r->sim, img_path), 0);
	gen(r);
}

START_TEST(crash_every_point)
{
	char path[300], msg[300];
	snprintf(path, sizeof(path), "%s/c.qcow2", tmpdir);
	int seeds = (int)(3 * scale());
	uint64_t base = env_seed(1000 + (uint64_t)_i * 100);
	unsigned points = 0;
	for (int s = 0; s < seeds; s++) {
		uint64_t seed = base + (uint64_t)s;
		struct crun r;
		crun_init(&r, seed, path);
		ck_assert_int_eq(run(&r), 0);
		const char *bad = verify(&r, msg, sizeof(msg));
		ck_assert_msg(!bad, "seed %llu, no crash: %s", (unsigned long long)seed, bad);
		uint64_t n = r.completions;
		ck_assert_uint_gt(n, 0);
		qsm_sim_free(r.sim);
		free_ops(&r);
		for (uint64_t k = 1; k <= n; k++) {
			LSAN_OFF();
			crun_init(&r, seed, path);
			r.crash_at = k;
			run(&r);
			LSAN_ON();
			ck_assert_msg(r.crashed, "seed %llu: the replay did not reach point %llu",
				      (unsigned long long)seed, (unsigned long long)k);
			bad = verify(&r, msg, sizeof(msg));
			ck_assert_msg(!bad, "seed %llu (QSM_TEST_SEED=%llu), crash point %llu/%llu: %s",
				      (unsigned long long)seed, (unsigned long long)seed,
				      (unsigned long long)k, (unsigned long long)n, bad);
			qsm_sim_free(r.sim);
			free_ops(&r);
			points++;
		}
	}
	ck_assert_uint_gt(points, 0);
	printf("crash_every_point: %u crash points\n", points);
}
END_TEST

static const struct { enum qsm_io_event ev; bool once; } faults[] = {
	{ QSM_IO_EV_DATA_WRITE, true },
	{ QSM_IO_EV_DATA_WRITE, false },
	{ QSM_IO_EV_L2_UPDATE, true },
	{ QSM_IO_EV_L1_UPDATE, true },
	{ QSM_IO_EV_FLUSH, true },
};

START_TEST(faults_reported_nothing_lost)
{
	char path[300], msg[300];
	snprintf(path, sizeof(path), "%s/f.qcow2", tmpdir);
	int seeds = (int)(4 * scale());
	unsigned fired_runs = 0;
	for (int s = 0; s < seeds; s++) {
		uint64_t seed = env_seed(5000 + (uint64_t)_i * 100) + (uint64_t)s;
		struct crun r;
		LSAN_OFF();
		crun_init(&r, seed, path);
		r.fault = true;
		r.fev = faults[_i].ev;
		r.fonce = faults[_i].once;
		int close_ret = run(&r);
		LSAN_ON();
		uint64_t fired = qsm_sim_faults_fired(r.sim);
		if (fired) {
			fired_runs++;
			/* The failure was reported to someone. */
			ck_assert_msg(r.failed_ops > 0 || close_ret < 0,
				      "seed %llu: fault on %s fired %llu times, nobody was told",
				      (unsigned long long)seed, qsm_io_event_name(r.fev),
				      (unsigned long long)fired);
		}
		const char *bad = verify(&r, msg, sizeof(msg));
		ck_assert_msg(!bad, "seed %llu, fault %s %s: %s", (unsigned long long)seed,
			      qsm_io_event_name(r.fev), r.fonce ? "once" : "persistent", bad);
		qsm_sim_free(r.sim);
		free_ops(&r);
	}
	ck_assert_msg(fired_runs > 0, "fault %s never fired", qsm_io_event_name(faults[_i].ev));
}
END_TEST

static Suite *compress_suite(void)
{
	Suite *s = suite_create("compress");
	TCase *t = tcase_create("api");
	tcase_set_timeout(t, 120);
	tcase_add_checked_fixture(t, make_tmpdir, rm_tmpdir);
	tcase_add_test(t, api_v3);
	tcase_add_test(t, api_v2_small_clusters);
	suite_add_tcase(s, t);
	t = tcase_create("sim");
	tcase_set_timeout(t, 300);
	tcase_add_checked_fixture(t, make_tmpdir, rm_tmpdir);
	tcase_add_loop_test(t, crash_every_point, 0, 2);
	tcase_add_loop_test(t, faults_reported_nothing_lost, 0, (int)QSM_ARRAY_SIZE(faults));
	suite_add_tcase(s, t);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(compress_suite());
	srunner_run_all(sr, CK_ENV);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
