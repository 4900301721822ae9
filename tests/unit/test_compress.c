/*
 * tests/unit/test_compress.c: Check suite "compress", compressed writes
 * (qsm_write_compressed, the WRITE_COMPRESSED machine of sm/states.def).
 *
 *  - api: round trip with many requests in flight on the worker pool,
 *    incompressible clusters stored as is, the partial last cluster, v2,
 *    overwrites both ways, refusals (alignment, range, raw, read-only), and
 *    the on-disk packing read back from the file (byte-packed descriptors,
 *    a shared host cluster's refcount raised once per compressed cluster),
 *    then qsm's own check and qemu-img check (when installed) clean; the
 *    same with compression_type=zstd (the header and the stored bytes say
 *    zstd), which a v2 image refuses.
 *  - crash: the fuzzer's engine (tools/fuzz.h) on the sim disk, CPU work
 *    inline (deterministic replay): a dry run counts the I/O completions N
 *    of a workload of compressed and plain whole-cluster writes and
 *    flushes on an empty image; the run is replayed crashing at every
 *    completion k in 1..N (a random subset of unflushed writes kept).  The
 *    engine's oracles judge it: after a clean close no corruption nor leak
 *    and exactly the data written; after a crash no corruption (leaks
 *    allowed) and every byte holds the data of a write that could be
 *    there, not one superseded by a durable write; the image reopens.
 *  - faults: EIO on data_write, l2_update, l1_update and flush (once,
 *    persistent): the failing request reports it, the sticky error follows
 *    metadata failures, nothing durable is lost, no corruption.
 * Seeds are printed on failure with a replay file (qsm fuzz --replay FILE;
 * QSM_TEST_SEED replays one seed).
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/util.h"
#include "metadata/check.h"
#include "sm/qsm.h"
#include "tests/unit/skip.h"
#include "tools/fuzz.h"

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

/* QSM_TEST_SCALE (default 1): multiplies the number of seeds a case runs;
 * every case runs at least one seed, however small the scale. */
static double scale(void)
{
	const char *s = getenv("QSM_TEST_SCALE");
	double v = s ? atof(s) : 1.0;
	return v > 0 ? v : 1.0;
}

static int scaled_seeds(int n)
{
	int v = (int)(n * scale());
	return v > 0 ? v : 1;
}

/* The data of write `id` at guest offset off: the workload engine's
 * pattern (tools/workload.h), compressible ones in runs of 64 equal bytes
 * (about 10:1 with deflate), still different per write and per place. */
static void fill(uint8_t *buf, int id, uint64_t off, uint64_t len, bool compressible)
{
	struct wl_op o = { .kind = compressible ? WL_COMPRESSED : WL_WRITE };
	for (uint64_t x = 0; x < len; x++)
		buf[x] = wl_value(&o, id, off + x);
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
	if (!have_qemu_img()) {
		/* A cross-check beside qsm's own: the case still tests. */
		fprintf(stderr, "NOTE: qemu-img not found: no qemu-img check of %s\n", path);
		return;
	}
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

static void api_case(unsigned compat, unsigned cluster_bits, enum qsm_compression type)
{
	uint64_t cs = 1ull << cluster_bits;
	uint64_t size = 64 * cs + 4608; /* a partial last cluster */
	char path[300], raw[300], err[256];
	snprintf(path, sizeof(path), "%s/a.qcow2", tmpdir);
	snprintf(raw, sizeof(raw), "%s/a.raw", tmpdir);
	struct qsm_create_opts co = { .size = size, .cluster_size = cs, .compat = compat,
				      .compression = type };
	ck_assert_msg(qsm_create(path, &co, err, sizeof(err)) == 0, "create: %s", err);

	struct event_base *base = event_base_new();
	struct qsm_image *img;
	struct qsm_open_opts oo = { .work_threads = 2 };
	ck_assert_msg(qsm_open(base, path, &oo, &img, err, sizeof(err)) == 0, "open: %s", err);
	struct qsm_info info;
	qsm_get_info(img, &info);
	ck_assert_str_eq(info.compression_type, type == QSM_COMPRESSION_ZSTD ? "zstd" : "zlib");

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
	/* The header names the codec (byte 104, incompatible bit 3) and the
	 * first cluster's bytes are its stream: a zstd frame, or raw deflate
	 * (never starting with the frame magic: its first block header's
	 * reserved bits would be set). */
	int hfd = open(path, O_RDONLY);
	ck_assert_int_ge(hfd, 0);
	uint8_t hb[112], magic[4];
	ck_assert_int_eq(pread(hfd, hb, sizeof(hb), 0), (ssize_t)sizeof(hb));
	uint64_t e0 = l2_entry(path, cluster_bits, 0) & ((1ull << shift) - 1);
	ck_assert_int_eq(pread(hfd, magic, 4, (off_t)e0), 4);
	close(hfd);
	bool zstd = type == QSM_COMPRESSION_ZSTD;
	ck_assert_uint_eq(compat == 3 ? hb[104] : 0, zstd ? 1 : 0);
	ck_assert_uint_eq(compat == 3 ? (hb[79] & 8) : 0, zstd ? 8 : 0);
	ck_assert_uint_eq(memcmp(magic, "\x28\xb5\x2f\xfd", 4) == 0, zstd);

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
	api_case(3, 16, QSM_COMPRESSION_ZLIB);
}
END_TEST

START_TEST(api_v2_small_clusters)
{
	api_case(2, 12, QSM_COMPRESSION_ZLIB);
}
END_TEST

START_TEST(api_v3_zstd)
{
	api_case(3, 16, QSM_COMPRESSION_ZSTD);
	api_case(3, 12, QSM_COMPRESSION_ZSTD);
}
END_TEST

/* compat=0.10 has no compression_type field: zstd is refused, nothing made. */
START_TEST(zstd_needs_v3)
{
	char path[300], err[256] = "";
	snprintf(path, sizeof(path), "%s/v2.qcow2", tmpdir);
	struct qsm_create_opts co = { .size = 1 << 20, .compat = 2, .compression = QSM_COMPRESSION_ZSTD };
	ck_assert_int_eq(qsm_create(path, &co, err, sizeof(err)), -EINVAL);
	ck_assert_msg(strstr(err, "compatibility level 1.1"), "%s", err);
	ck_assert_int_eq(access(path, F_OK), -1);
	co.compat = 3;
	co.compression = (enum qsm_compression)7;
	ck_assert_int_eq(qsm_create(path, &co, err, sizeof(err)), -EINVAL);
	ck_assert_msg(strstr(err, "Unknown compression type"), "%s", err);
	enum qsm_compression t;
	ck_assert_int_eq(qsm_compression_parse("zstd", &t), 0);
	ck_assert_int_eq(t, QSM_COMPRESSION_ZSTD);
	ck_assert_int_eq(qsm_compression_parse("deflate", &t), -EINVAL);
}
END_TEST

/* --- crash and faults on the sim disk ---------------------------------------- */

/*
 * Cases for the fuzzer's engine (tools/fuzz.h, tools/workload.h): its run,
 * crash and fault handling and every oracle are the ones `qsm fuzz` and the
 * crash suite use; this suite only chooses the workload.
 */
static struct fz_env env;

static void env_setup(void)
{
	ck_assert_int_eq(fz_env_init(&env, NULL), 0);
}

static void env_teardown(void)
{
	fz_env_fini(&env);
}

static uint64_t env_seed(uint64_t def)
{
	const char *s = getenv("QSM_TEST_SEED");
	return s ? strtoull(s, NULL, 0) : def;
}

/*
 * The case of a seed: an empty image of 48 clusters (512 B or 4 KiB) or
 * 2 MiB (64 KiB clusters), compat 0.10 one seed in five (of the v3 ones,
 * every other seed compresses with zstd), an L2 cache of two
 * tables, the sim's PRNG schedule, 1..4 requests in flight; 18 requests of
 * whole clusters (one to three): compressed writes (60 %), plain writes
 * (25 %) and flushes, the last one a flush; the data of one write in five
 * does not compress (a compressed write then stores the cluster as is).
 */
static void make_case(struct fz_case *c, uint64_t seed)
{
	static const unsigned clusters[] = { 512, 4096, 65536 };
	struct qsm_rng g;
	memset(c, 0, sizeof(*c));
	c->seed = seed;
	c->cluster = clusters[seed % 3];
	c->size = c->cluster == 65536 ? (2u << 20) : c->cluster * 48;
	c->compat = seed % 5 == 4 ? 2 : 3;
	c->zstd = c->compat == 3 && seed % 2;
	c->empty = true;
	c->l2_tables = 2;
	c->cache = QSM_CACHE_WRITEBACK;
	c->depth = 1 + (int)(seed % 4);
	c->max_batch = 4;
	c->nops = 18;
	c->ops = calloc((size_t)c->nops, sizeof(*c->ops));
	ck_assert_ptr_nonnull(c->ops);
	qsm_rng_seed(&g, seed);
	uint64_t nclusters = c->size / c->cluster;
	for (int i = 0; i < c->nops; i++) {
		struct wl_op *o = &c->ops[i];
		uint64_t k = qsm_rng_below(&g, 100);
		o->kind = k < 60 ? WL_COMPRESSED : k < 85 ? WL_WRITE : WL_FLUSH;
		if (i == c->nops - 1)
			o->kind = WL_FLUSH;
		if (o->kind == WL_FLUSH)
			continue;
		uint64_t n = 1 + qsm_rng_below(&g, 3);
		uint64_t c0 = qsm_rng_below(&g, nclusters - n + 1);
		o->off = c0 * c->cluster;
		o->len = n * c->cluster;
		bool compressible = qsm_rng_below(&g, 5) != 0;
		if (compressible != (o->kind == WL_COMPRESSED))
			o->flags = WL_DATA_OTHER;
	}
}

/* Run the case and judge it; on failure keep a replay file and say so. */
static bool judge(const struct fz_case *c, struct fz_result *res)
{
	char cs[400], path[512];
	int ret = fz_run(&env, c, false, false, res);
	ck_assert_msg(ret == 0, "seed %llu: the run could not be set up: %s",
		      (unsigned long long)c->seed, res->why);
	if (res->ok)
		return true;
	const char *dir = getenv("TMPDIR");
	snprintf(path, sizeof(path), "%s/qsm-compress-%llu-%llu.replay", dir ? dir : "/var/tmp",
		 (unsigned long long)c->seed, (unsigned long long)c->crash_at);
	fz_case_save(c, NULL, path, NULL, res->why);
	fz_case_str(c, cs, sizeof(cs));
	fprintf(stderr, "compress FAIL %s: %s\n  rerun: qsm fuzz --replay %s\n", cs, res->why, path);
	return false;
}

/*
 * A dry run counts the I/O completions N of the seed's workload; the run
 * is replayed crashing at every completion k in 1..N, a random subset of
 * the unflushed writes kept.  The oracle is the engine's (tools/fuzz.h):
 * reads, no corruption (leaks allowed after a crash, none after a clean
 * close), every durable write reads back, the image reopens and takes a
 * write.
 */
START_TEST(crash_every_point)
{
	int seeds = scaled_seeds(3);
	uint64_t base = env_seed(1000 + (uint64_t)_i * 100);
	unsigned points = 0, failures = 0;
	for (int s = 0; s < seeds; s++) {
		uint64_t seed = base + (uint64_t)s;
		struct fz_case c;
		struct fz_result res;
		make_case(&c, seed);
		ck_assert_msg(judge(&c, &res), "seed %llu, no crash: %s", (unsigned long long)seed,
			      res.why);
		uint64_t n = res.completions;
		ck_assert_uint_gt(n, 0);
		for (uint64_t k = 1; k <= n; k++) {
			c.crash_at = k;
			c.crash_mode = FZ_KEEP_RANDOM;
			if (!judge(&c, &res))
				failures++;
			ck_assert_msg(res.crashed, "seed %llu: the replay did not reach point %llu",
				      (unsigned long long)seed, (unsigned long long)k);
			points++;
		}
		fz_case_free(&c);
		if (getenv("QSM_TEST_SEED"))
			break;
	}
	ck_assert_uint_gt(points, 0);
	printf("crash_every_point: %u crash points\n", points);
	ck_assert_msg(failures == 0, "%u of %u crash points failed (cases above)", failures, points);
}
END_TEST

static const struct { enum qsm_io_event ev; bool once; } faults[] = {
	{ QSM_IO_EV_DATA_WRITE, true },
	{ QSM_IO_EV_DATA_WRITE, false },
	{ QSM_IO_EV_L2_UPDATE, true },
	{ QSM_IO_EV_L1_UPDATE, true },
	{ QSM_IO_EV_FLUSH, true },
};

/* EIO on one event, once or persistent: the engine's fault oracle (the
 * failing request or the close reports it, the sticky error follows a
 * failed metadata write, nothing durable is lost, no corruption, the image
 * reopens). */
START_TEST(faults_reported_nothing_lost)
{
	int seeds = scaled_seeds(4);
	unsigned fired_runs = 0;
	for (int s = 0; s < seeds; s++) {
		uint64_t seed = env_seed(5000 + (uint64_t)_i * 100) + (uint64_t)s;
		struct fz_case c;
		struct fz_result res;
		make_case(&c, seed);
		c.fault = true;
		c.fev = faults[_i].ev;
		c.ferr = EIO;
		c.fonce = faults[_i].once;
		bool ok = judge(&c, &res);
		fz_case_free(&c);
		ck_assert_msg(ok, "seed %llu, fault %s %s: %s", (unsigned long long)seed,
			      qsm_io_event_name(faults[_i].ev), faults[_i].once ? "once" : "persistent",
			      res.why);
		fired_runs += res.faults_fired > 0;
		if (getenv("QSM_TEST_SEED"))
			break;
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
	tcase_add_test(t, api_v3_zstd);
	tcase_add_test(t, zstd_needs_v3);
	suite_add_tcase(s, t);
	t = tcase_create("sim");
	tcase_set_timeout(t, 300);
	tcase_add_checked_fixture(t, env_setup, env_teardown);
	tcase_add_loop_test(t, crash_every_point, 0, 2);
	tcase_add_loop_test(t, faults_reported_nothing_lost, 0, (int)QSM_ARRAY_SIZE(faults));
	suite_add_tcase(s, t);
	return s;
}

int main(void)
{
	return qsm_test_run(compress_suite());
}
