/*
 * tests/unit/test_image.c: Check suite "image" for sm/image.c: what a
 * session does once it finds the image corrupt (sm/image.c, "Corruption";
 * the contract is at the top of sm/qsm.h).
 *
 * Every case builds a valid image with qsm (1 GiB, 64 KiB clusters; guest
 * 0 = 0xaa, guest 128 KiB = 0xbb, both under L2 table A), breaks one entry
 * so that the engine detects the corruption at run time, opens it
 * read-write and checks:
 *   - the request that hits the corruption fails with -EIO;
 *   - later writes, zero writes, compressed writes and discards are refused
 *     at submit with -ENOMEDIUM without running their callback, and
 *     qsm_truncate fails with -ENOMEDIUM; a flush completes with -EIO;
 *   - reads of intact mappings still return the right data, including a
 *     write acknowledged before the detection whose L2 entry is only in the
 *     cache;
 *   - after close, the file's bytes are those it had just before the
 *     detection, except the corrupt bit (byte 79, bit 1): the dirty L2
 *     table and refcount block of that acknowledged write were not written,
 *     and neither was anything at close;
 *   - a read-write reopen is refused (-EACCES), before any lazy-refcounts
 *     repair could write; a read-only reopen reads the intact data.
 * And, for contrast, a failed metadata write: -EIO, not corrupt.
 * Breakages: an L2 entry pointing at the L1 table (found by a write), an L2
 * entry past the end of the file (found by a read), and the first on a lazy
 * refcounts image whose dirty bit is on disk.  Backends: threads, sim (in
 * memory; its "bytes" are the disk's durable plus completed writes) and
 * io_uring (a TCase of its own, tagged "uring": skipped where the kernel
 * refuses io_uring).  qemu-img info/check on a marked image: TCase tagged
 * "qemu-img" (tests/unit/skip.h for the skip rule).
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
#include "sm/sm.h"
#include "tests/unit/skip.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define CS (64 * KiB)

enum { B_THREADS, B_SIM, B_URING };
static const char *const backend_names[] = { "threads", "sim", "io_uring" };

static char tmpdir[256];

static void setup(void)
{
	const char *base = getenv("TMPDIR");
	snprintf(tmpdir, sizeof(tmpdir), "%s/qsm-test-image-XXXXXX", base ? base : "/var/tmp");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void teardown(void)
{
	char cmd[400];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	ck_assert_int_eq(system(cmd), 0);
}

static uint8_t *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	ck_assert_msg(f != NULL, "open %s", path);
	ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
	long n = ftell(f);
	ck_assert_int_ge(n, 0);
	rewind(f);
	uint8_t *buf = malloc((size_t)n + 1);
	ck_assert_ptr_nonnull(buf);
	ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	*len = (size_t)n;
	return buf;
}

static uint64_t file_be64(const char *path, uint64_t off)
{
	uint8_t b[8];
	int fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, b, 8, (off_t)off), 8);
	close(fd);
	return qcow2_be64(b);
}

static void file_put_be64(const char *path, uint64_t off, uint64_t v)
{
	uint8_t b[8];
	qcow2_put_be64(b, v);
	int fd = open(path, O_WRONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, b, 8, (off_t)off), 8);
	ck_assert_int_eq(fsync(fd), 0);
	close(fd);
}

/* --- one session on one backend --------------------------------------------- */

struct env {
	int backend;
	char path[300];        /* the image (file backends; sim: loaded from it) */
	struct qsm_sim *sim;
	struct event_base *base;
};

static void env_init(struct env *e, int backend, const char *path)
{
	memset(e, 0, sizeof(*e));
	e->backend = backend;
	snprintf(e->path, sizeof(e->path), "%s", path);
	e->base = event_base_new();
	ck_assert_ptr_nonnull(e->base);
	if (backend == B_SIM) {
		e->sim = qsm_sim_new(0x1234);
		ck_assert_ptr_nonnull(e->sim);
		ck_assert_int_eq(qsm_sim_load_file(e->sim, path), 0);
	}
}

static void env_free(struct env *e)
{
	if (e->sim)
		qsm_sim_free(e->sim);
	event_base_free(e->base);
}

static int env_open(struct env *e, bool read_only, struct qsm_image **img, char *err,
		    size_t errlen)
{
	struct qsm_open_opts oo = { .read_only = read_only, .work_threads = -1 };
	if (e->backend != B_SIM) {
		oo.aio = backend_names[e->backend];
		return qsm_open(e->base, e->path, &oo, img, err, errlen);
	}
	struct qsm_io *io;
	ck_assert_int_eq(qsm_io_open_sim(e->base, e->sim, read_only ? QSM_IO_RDONLY : 0, &io), 0);
	return qsm_open_io(e->base, io, &oo, img, err, errlen);
}

/* The image's bytes now (sim: durable plus completed writes, through a file). */
static uint8_t *env_bytes(struct env *e, size_t *len)
{
	if (!e->sim)
		return read_file(e->path, len);
	char p[400];
	snprintf(p, sizeof(p), "%s.sim", e->path);
	ck_assert_int_eq(qsm_sim_save_file(e->sim, p), 0);
	uint8_t *b = read_file(p, len);
	unlink(p);
	return b;
}

/* Same bytes except the corrupt bit, clear before, set after. */
static void assert_only_corrupt_bit(const uint8_t *before, size_t blen, const uint8_t *after,
				    size_t alen)
{
	ck_assert_uint_eq(alen, blen);
	ck_assert_msg((before[79] & 2) == 0, "corrupt bit already set before");
	ck_assert_msg(after[79] & 2, "corrupt bit not written");
	for (size_t i = 0; i < blen; i++) {
		uint8_t mask = i == 79 ? 2 : 0;
		if ((before[i] & ~mask) != (after[i] & ~mask))
			ck_abort_msg("byte %#zx changed: %#x -> %#x", i, before[i], after[i]);
	}
}

struct done {
	bool called;
	int ret;
};

static void done_cb(void *opaque, int ret)
{
	struct done *d = opaque;
	d->called = true;
	d->ret = ret;
}

static void wait_done(struct qsm_image *img, struct done *d)
{
	while (!d->called)
		ck_assert_int_ge(event_base_loop(qsm_image_base(img), EVLOOP_ONCE), 0);
}

/* Let the loop run until nothing internal is in flight (a preallocation,
 * the corrupt mark), so a snapshot of the bytes is stable. */
static void settle(struct qsm_image *img)
{
	while (img->prealloc_busy || img->wb_job || img->corrupt_mark == QSM_MARK_BUSY)
		ck_assert_int_ge(event_base_loop(qsm_image_base(img), EVLOOP_ONCE), 0);
}

/* Watches every operation that may change the image (io/ trace hook): once
 * the image knows it is corrupt, only the 8-byte corrupt mark may go out. */
struct watch {
	struct qsm_image *img;
	unsigned before;      /* writes submitted before the detection */
	unsigned marks;       /* the corrupt mark (8 bytes at 72) */
	unsigned others;      /* anything else after the detection */
	char what[160];       /* the first of those */
};

static void watch_cb(void *opaque, const struct qsm_io_req *req, bool done, int ret)
{
	struct watch *w = opaque;
	if (done || req->op == QSM_IO_READ || req->op == QSM_IO_FLUSH)
		return;
	if (!w->img->corrupt) {
		w->before++;
	} else if (req->op == QSM_IO_WRITE && req->offset == 72 && req->len == 8) {
		w->marks++;
	} else if (!w->others++) {
		snprintf(w->what, sizeof(w->what), "%s %s %#llx+%llu", qsm_io_op_name(req->op),
			 qsm_io_event_name(req->event), (unsigned long long)req->offset,
			 (unsigned long long)req->len);
	}
}

static void watch_start(struct watch *w, struct qsm_image *img)
{
	memset(w, 0, sizeof(*w));
	w->img = img;
	img->io->trace = watch_cb;
	img->io->trace_opaque = w;
}

static void watch_check(const struct watch *w)
{
	ck_assert_msg(w->others == 0, "%u writes after the detection, first: %s", w->others,
		      w->what);
	ck_assert_uint_eq(w->marks, 1);
}

static void write_pattern(struct qsm_image *img, uint64_t off, size_t len, int pat)
{
	uint8_t *buf = malloc(len);
	ck_assert_ptr_nonnull(buf);
	memset(buf, pat, len);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, len, off), 0);
	free(buf);
}

static void assert_reads(struct qsm_image *img, uint64_t off, size_t len, int pat)
{
	uint8_t *buf = malloc(len);
	ck_assert_ptr_nonnull(buf);
	memset(buf, pat ^ 0x5a, len);
	int ret = qsm_sync_pread(img, buf, len, off);
	ck_assert_msg(ret == 0, "read %#llx+%zu: %s (%s)", (unsigned long long)off, len,
		      strerror(-ret), qsm_image_error(img));
	for (size_t i = 0; i < len; i++)
		if (buf[i] != pat)
			ck_abort_msg("guest %#llx reads %#x, expected %#x",
				     (unsigned long long)(off + i), buf[i], pat);
	free(buf);
}

/* --- the images -------------------------------------------------------------- */

/* 1 GiB, 64 KiB clusters: guest 0 = 0xaa and 128 KiB = 0xbb (64 KiB each),
 * under L2 table A (L1 entry 0).  Returns A's host offset; *l1 = the L1
 * table's. */
static uint64_t make_image(const char *path, bool lazy, uint64_t *l1)
{
	char err[256];
	struct qsm_create_opts co = { .size = 1ull << 30, .lazy_refcounts = lazy };
	ck_assert_msg(qsm_create(path, &co, err, sizeof(err)) == 0, "create: %s", err);
	struct env e;
	env_init(&e, B_THREADS, path);
	struct qsm_image *img;
	ck_assert_msg(env_open(&e, false, &img, err, sizeof(err)) == 0, "open: %s", err);
	write_pattern(img, 0, CS, 0xaa);
	write_pattern(img, 128 * KiB, CS, 0xbb);
	ck_assert_int_eq(qsm_close(img), 0);
	env_free(&e);
	*l1 = file_be64(path, 40);
	uint64_t l2 = file_be64(path, *l1) & QCOW2_L1E_OFFSET_MASK;
	ck_assert_uint_ne(l2, 0);
	return l2;
}

enum breakage {
	L2_OVER_L1,      /* L2 entry 1 (guest 64 KiB) -> the L1 table's cluster */
	L2_PAST_EOF,     /* L2 entry 5 (guest 320 KiB) -> far past the file's end */
};

static void make_broken(const char *path, enum breakage b, bool lazy)
{
	uint64_t l1, l2 = make_image(path, lazy, &l1);
	if (b == L2_OVER_L1)
		file_put_be64(path, l2 + 8, l1 | QCOW2_OFLAG_COPIED);
	else
		file_put_be64(path, l2 + 5 * 8, QCOW2_OFLAG_COPIED | (64ull << 30));
}

/* Make the engine find the corruption; the request fails with -EIO. */
static void trigger(struct qsm_image *img, enum breakage b)
{
	uint8_t buf[4096];
	struct iovec iov = { buf, sizeof(buf) };
	struct done d = { 0 };
	memset(buf, 0xdd, sizeof(buf));
	if (b == L2_OVER_L1)
		ck_assert_int_eq(qsm_writev(img, 64 * KiB, &iov, 1, done_cb, &d), 0);
	else
		ck_assert_int_eq(qsm_readv(img, 320 * KiB, &iov, 1, done_cb, &d), 0);
	wait_done(img, &d);
	ck_assert_msg(d.ret == -EIO, "the request that hit the corruption: %d (%s)", d.ret,
		      strerror(-d.ret));
	const char *why = qsm_image_error(img);
	ck_assert_msg(strstr(why, b == L2_OVER_L1 ? "Preventing invalid write on metadata (overlaps with active L1 table)" : "past the end"),
		      "qsm_image_error: '%s'", why);
}

/* Every kind of write is refused at submit, without a callback. */
static void assert_writes_refused(struct qsm_image *img)
{
	static uint8_t buf[CS];
	struct iovec iov = { buf, sizeof(buf) };
	struct done d = { 0 };
	char err[256] = "";

	ck_assert_int_eq(qsm_writev(img, 0, &iov, 1, done_cb, &d), -ENOMEDIUM);
	ck_assert_int_eq(qsm_writev(img, 4 * MiB, &iov, 1, done_cb, &d), -ENOMEDIUM);
	ck_assert_int_eq(qsm_writev(img, 0, &iov, 0, done_cb, &d), -ENOMEDIUM);
	ck_assert_int_eq(qsm_write_zeroes(img, 0, CS, 0, done_cb, &d), -ENOMEDIUM);
	ck_assert_int_eq(qsm_write_zeroes(img, 0, CS, QSM_ZERO_MAY_UNMAP, done_cb, &d), -ENOMEDIUM);
	ck_assert_int_eq(qsm_discard(img, 0, CS, done_cb, &d), -ENOMEDIUM);
	ck_assert_int_eq(qsm_write_compressed(img, 256 * KiB, &iov, 1, done_cb, &d), -ENOMEDIUM);
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, 512, 8 * MiB), -ENOMEDIUM);
	ck_assert_int_eq(qsm_truncate(img, 2ull << 30, err, sizeof(err)), -ENOMEDIUM);
	ck_assert_msg(strstr(err, "corrupt"), "truncate says '%s'", err);
	ck_assert_int_eq(qsm_truncate(img, 512 * MiB, err, sizeof(err)), -ENOMEDIUM);
	for (int i = 0; i < 20; i++)
		event_base_loop(qsm_image_base(img), EVLOOP_NONBLOCK);
	ck_assert_msg(!d.called, "a refused request ran its callback");
	ck_assert_str_eq(qsm_strerror(-ENOMEDIUM), "No medium found");
}

/*
 * The whole scenario on one backend.  before_detection writes one more
 * cluster (guest 192 KiB = 0xcc; with lazy refcounts after a flush that
 * put the dirty bit on disk, then 256 KiB = 0xee): acknowledged, its L2
 * entry only in the cache.
 */
static void corruption_scenario(int backend, enum breakage b, bool lazy)
{
	char path[300], err[256];
	snprintf(path, sizeof(path), "%s/img.qcow2", tmpdir);
	make_broken(path, b, lazy);

	struct env e;
	env_init(&e, backend, path);
	struct qsm_image *img;
	ck_assert_msg(env_open(&e, false, &img, err, sizeof(err)) == 0, "open: %s", err);
	uint64_t late = 192 * KiB;
	write_pattern(img, late, CS, 0xcc);
	if (lazy) {
		ck_assert_int_eq(qsm_sync_flush(img), 0);
		ck_assert(img->disk_dirty);
		late = 256 * KiB;
		write_pattern(img, late, CS, 0xee);
	}
	settle(img);
	ck_assert_uint_ne(qsm_l2_dirty_count(&img->l2c), 0);
	size_t blen, alen;
	uint8_t *before = env_bytes(&e, &blen);

	struct qsm_info info;
	qsm_get_info(img, &info);
	ck_assert(!info.corrupt);
	struct watch w;
	watch_start(&w, img);
	trigger(img, b);
	qsm_get_info(img, &info);
	ck_assert(info.corrupt);

	assert_writes_refused(img);
	/* A flush cannot promise the durability of what it may never write. */
	struct done d = { 0 };
	ck_assert_int_eq(qsm_flush(img, done_cb, &d), 0);
	wait_done(img, &d);
	ck_assert_int_eq(d.ret, -EIO);
	/* Intact mappings, and the acknowledged write, read back. */
	assert_reads(img, 0, CS, 0xaa);
	assert_reads(img, 128 * KiB, CS, 0xbb);
	assert_reads(img, 192 * KiB, CS, 0xcc);
	if (lazy)
		assert_reads(img, 256 * KiB, CS, 0xee);
	assert_reads(img, 384 * KiB, CS, 0);
	/* Even a burst of refused writes and some reads later, nothing more
	 * went to disk but the bit. */
	settle(img);
	ck_assert_int_eq(qsm_close(img), -EIO);
	watch_check(&w);

	uint8_t *after = env_bytes(&e, &alen);
	assert_only_corrupt_bit(before, blen, after, alen);
	if (lazy)
		ck_assert_msg(after[79] & 1, "the dirty bit was cleared");

	/* Never read-write again, and refusing writes nothing (no repair). */
	ck_assert_int_eq(env_open(&e, false, &img, err, sizeof(err)), -EACCES);
	ck_assert_msg(strstr(err, "corrupt"), "reopen says '%s'", err);
	size_t rlen;
	uint8_t *again = env_bytes(&e, &rlen);
	ck_assert_uint_eq(rlen, alen);
	ck_assert_msg(memcmp(again, after, alen) == 0, "a refused read-write open wrote");
	free(again);

	/* Read-only: the data mapped on disk; the late write's entry was
	 * dropped, so it reads as zeros (its cluster is a leak). */
	ck_assert_msg(env_open(&e, true, &img, err, sizeof(err)) == 0, "read-only: %s", err);
	qsm_get_info(img, &info);
	ck_assert(info.corrupt);
	assert_reads(img, 0, CS, 0xaa);
	assert_reads(img, 128 * KiB, CS, 0xbb);
	if (lazy)
		assert_reads(img, 192 * KiB, CS, 0xcc); /* flushed before */
	assert_reads(img, late, CS, 0);
	ck_assert_int_eq(qsm_close(img), 0);

	free(before);
	free(after);
	env_free(&e);
}

START_TEST(write_finds_l2_over_l1)
{
	corruption_scenario(_i, L2_OVER_L1, false);
}
END_TEST

START_TEST(read_finds_l2_past_eof)
{
	corruption_scenario(_i, L2_PAST_EOF, false);
}
END_TEST

START_TEST(lazy_refcounts_not_repaired)
{
	corruption_scenario(_i, L2_OVER_L1, true);
}
END_TEST

START_TEST(uring_scenarios)
{
	if (!qsm_io_uring_available()) {
		QSM_SKIP("io_uring unavailable on this kernel");
		return;
	}
	corruption_scenario(B_URING, _i == 1 ? L2_PAST_EOF : L2_OVER_L1, _i == 2);
}
END_TEST

/*
 * A write-back batch in flight when the corruption is found stops before
 * its next level.  Sim backend, completing the oldest pending operation
 * first, one per pass: an acknowledged write that created L2 table B
 * (guest 512 MiB, L1 entry 1) leaves a refcount block, B and L1 entry 1
 * dirty.  A write that will hit the corruption is submitted (it loads
 * table A), then a flush, whose batch sends the refcount block out; the
 * load completes first and the write finds the corruption while that
 * block is on its way.  The block may land (a leak, never a corruption);
 * table B and the L1 entry never go out, nor anything but the corrupt
 * mark; both requests fail.
 */
static uint64_t oldest_first(void *opaque, uint64_t n)
{
	return 0;
}

START_TEST(batch_stops_at_detection)
{
	char path[300], err[256];
	snprintf(path, sizeof(path), "%s/img.qcow2", tmpdir);
	uint64_t l1, l2 = make_image(path, false, &l1);
	file_put_be64(path, l2 + 8, l1 | QCOW2_OFLAG_COPIED);
	uint64_t refblock = file_be64(path, file_be64(path, 48)) & ~(CS - 1);

	struct env e;
	env_init(&e, B_SIM, path);
	struct qsm_image *img;
	ck_assert_msg(env_open(&e, false, &img, err, sizeof(err)) == 0, "open: %s", err);
	write_pattern(img, 512 * MiB, CS, 0xcc);
	settle(img);
	size_t blen, alen;
	uint8_t *before = env_bytes(&e, &blen);

	qsm_sim_set_max_batch(e.sim, 1);
	qsm_sim_set_chooser(e.sim, oldest_first, NULL);
	struct watch w;
	watch_start(&w, img);
	struct done fl = { 0 }, wr = { 0 };
	uint8_t buf[4096];
	memset(buf, 0xdd, sizeof(buf));
	struct iovec iov = { buf, sizeof(buf) };
	ck_assert_int_eq(qsm_writev(img, 64 * KiB, &iov, 1, done_cb, &wr), 0);
	ck_assert_int_eq(qsm_flush(img, done_cb, &fl), 0);
	wait_done(img, &wr);
	wait_done(img, &fl);
	ck_assert_int_eq(wr.ret, -EIO);
	ck_assert_int_eq(fl.ret, -EIO);
	assert_writes_refused(img);
	assert_reads(img, 512 * MiB, CS, 0xcc);
	assert_reads(img, 0, CS, 0xaa);
	settle(img);
	ck_assert_int_eq(qsm_close(img), -EIO);
	watch_check(&w);
	ck_assert_uint_eq(w.before, 1); /* the refcount block, on its way */

	uint8_t *after = env_bytes(&e, &alen);
	ck_assert_uint_eq(alen, blen);
	ck_assert(after[79] & 2);
	for (size_t i = 0; i < blen; i++)
		if (i != 79 && (i < refblock || i >= refblock + CS) && before[i] != after[i])
			ck_abort_msg("byte %#zx changed", i);
	ck_assert_uint_eq(qcow2_be64(after + l1 + 8), 0); /* L1 entry 1: never written */
	free(before);
	free(after);
	env_free(&e);
}
END_TEST

/*
 * The other sticky state, for contrast: a metadata write that fails (an
 * injected EIO on the sim) is not a corruption.  Later writes are refused
 * with -EIO, not -ENOMEDIUM; the image is not marked corrupt, and opens
 * read-write again.
 */
START_TEST(failed_writeback_is_not_corruption)
{
	char path[300], err[256];
	snprintf(path, sizeof(path), "%s/img.qcow2", tmpdir);
	uint64_t l1;
	(void)make_image(path, false, &l1);

	struct env e;
	env_init(&e, B_SIM, path);
	struct qsm_image *img;
	ck_assert_msg(env_open(&e, false, &img, err, sizeof(err)) == 0, "open: %s", err);
	write_pattern(img, 192 * KiB, CS, 0xcc);
	qsm_sim_fault_add(e.sim, QSM_IO_EV_L2_UPDATE, EIO, false);
	ck_assert_int_eq(qsm_sync_flush(img), -EIO);
	qsm_sim_fault_clear(e.sim);
	ck_assert_msg(strstr(qsm_image_error(img), "write-back failed"), "'%s'",
		      qsm_image_error(img));
	uint8_t buf[512] = { 0 };
	struct iovec iov = { buf, sizeof(buf) };
	struct done d = { 0 };
	ck_assert_int_eq(qsm_writev(img, 0, &iov, 1, done_cb, &d), -EIO);
	ck_assert_int_eq(qsm_discard(img, 0, CS, done_cb, &d), -EIO);
	ck_assert_int_eq(qsm_truncate(img, 2ull << 30, err, sizeof(err)), -EIO);
	ck_assert(!d.called);
	struct qsm_info info;
	qsm_get_info(img, &info);
	ck_assert(!info.corrupt);
	assert_reads(img, 192 * KiB, CS, 0xcc);
	ck_assert_int_eq(qsm_close(img), -EIO);
	size_t len;
	uint8_t *after = env_bytes(&e, &len);
	ck_assert_int_eq(after[79] & 2, 0);
	free(after);
	ck_assert_msg(env_open(&e, false, &img, err, sizeof(err)) == 0, "reopen: %s", err);
	assert_reads(img, 0, CS, 0xaa);
	ck_assert_int_eq(qsm_close(img), 0);
	env_free(&e);
}
END_TEST

/* qemu-img sees the bit qsm wrote: info says corrupt, check finds the
 * planted corruption (exit 2). */
START_TEST(qemu_img_sees_corrupt_bit)
{
	if (system("qemu-img --version >/dev/null 2>&1") != 0) {
		QSM_SKIP("qemu-img not found");
		return;
	}
	char path[300], err[256], cmd[800];
	snprintf(path, sizeof(path), "%s/img.qcow2", tmpdir);
	make_broken(path, L2_OVER_L1, false);
	struct env e;
	env_init(&e, B_THREADS, path);
	struct qsm_image *img;
	ck_assert_msg(env_open(&e, false, &img, err, sizeof(err)) == 0, "open: %s", err);
	trigger(img, L2_OVER_L1);
	ck_assert_int_eq(qsm_close(img), -EIO);
	env_free(&e);

	snprintf(cmd, sizeof(cmd), "qemu-img info --output=json '%s' | grep -q '\"corrupt\": true'",
		 path);
	ck_assert_msg(system(cmd) == 0, "qemu-img info does not report corrupt: true");
	snprintf(cmd, sizeof(cmd), "qemu-img check '%s' >/dev/null 2>&1", path);
	int st = system(cmd);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 2, "qemu-img check exit %d, expected 2",
		      WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	/* qemu-io refuses it read-write, as qsm does. */
	snprintf(cmd, sizeof(cmd), "qemu-io -c 'read 0 512' '%s' 2>&1 | grep -qi corrupt", path);
	ck_assert_msg(system(cmd) == 0, "qemu-io opens the marked image read-write");
}
END_TEST

static Suite *image_suite(void)
{
	Suite *s = suite_create("image");
	TCase *tc = tcase_create("corruption");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	/* threads and sim (B_THREADS, B_SIM) */
	tcase_add_loop_test(tc, write_finds_l2_over_l1, B_THREADS, B_SIM + 1);
	tcase_add_loop_test(tc, read_finds_l2_past_eof, B_THREADS, B_SIM + 1);
	tcase_add_loop_test(tc, lazy_refcounts_not_repaired, B_THREADS, B_SIM + 1);
	tcase_add_test(tc, batch_stops_at_detection);
	tcase_add_test(tc, failed_writeback_is_not_corruption);
	suite_add_tcase(s, tc);

	tc = tcase_create("corruption_uring");
	QSM_TCASE_REQUIRES(tc, "uring");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_loop_test(tc, uring_scenarios, 0, 3);
	suite_add_tcase(s, tc);

	tc = tcase_create("corruption_qemu_img");
	QSM_TCASE_REQUIRES(tc, "qemu-img");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, qemu_img_sees_corrupt_bit);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return qsm_test_run(image_suite());
}
