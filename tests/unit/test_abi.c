/*
 * tests/unit/test_abi.c: the public backend interface and the ABI rules
 * (io/qsm_io.h, sm/qsm.h "ABI").
 *
 *  - A backend outside io/ (qsm_io_new) whose worker thread completes every
 *    request with qsm_io_complete_threadsafe() carries a whole image:
 *    qsm_create_io, qsm_open_io, concurrent writes, reads, flush, close,
 *    qsm_check_io clean; the completions all ran on the loop thread.
 *  - The same backend completing on the loop with qsm_io_complete(), from
 *    inside submit too, never calls back inside submit.
 *  - Required ops missing, or an ops table from newer headers with unknown
 *    members set: -EINVAL.  Unknown option bytes past struct_size: -EINVAL;
 *    an older, shorter struct_size: the rest takes defaults.
 *  - The backing-open hook receives the name as recorded ("rbd:pool/base")
 *    and the path resolved as a file name.
 *  - qsm_stats (no struct_size: qsm_get_stats_sized): the refcount block
 *    cache counters, on an image whose refcounts span several blocks with a
 *    one-block refcount-cache-size: hits, misses, loads and evictions all
 *    move, and the cache holds no more than its capacity once idle (the
 *    bound refcount_cache_size sets); the 0.1.0 entry point fills only the
 *    0.1.0 fields, a larger size gets zeros past the library's.  The same
 *    for qsm_info (qsm_get_info_sized).
 *  - The blocking rule: a blocking io/ call on a live handle aborts an
 *    assertion-enabled build (forked; skipped where NDEBUG removes it).
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/sim.h"
#include "io/util.h"
#include "metadata/refcount.h"
#include "sm/qsm.h"
#include "sm/sm.h"

#define MiB (1024u * 1024u)
#define DISK_MAX (64u * MiB)

/* --- An in-memory backend whose worker thread completes ------------------- */

struct mem {
	uint8_t *data;
	uint64_t size;
	pthread_t loop_thread;
	bool threaded;            /* complete from the worker, else from submit */
	bool in_submit;
	unsigned submitted;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct qsm_io_req *queue[256];
	unsigned qhead, qtail;
	bool stop;
	pthread_t worker;
	unsigned worker_completions;
	bool closed;
};

static int mem_exec(struct mem *m, struct qsm_io_req *req)
{
	switch (req->op) {
	case QSM_IO_READ: {
		uint64_t off = req->offset;
		for (int i = 0; i < req->iovcnt; i++) {
			uint8_t *p = req->iov[i].iov_base;
			size_t n = req->iov[i].iov_len;
			for (size_t j = 0; j < n; j++, off++)
				p[j] = off < m->size ? m->data[off] : 0;
		}
		return 0;
	}
	case QSM_IO_WRITE: {
		uint64_t off = req->offset;
		if (off + req->len > DISK_MAX)
			return -ENOSPC;
		for (int i = 0; i < req->iovcnt; i++) {
			memcpy(m->data + off, req->iov[i].iov_base, req->iov[i].iov_len);
			off += req->iov[i].iov_len;
		}
		if (off > m->size)
			m->size = off;
		return 0;
	}
	case QSM_IO_ZERO:
	case QSM_IO_DISCARD:
		if (req->offset + req->len > DISK_MAX)
			return -ENOSPC;
		memset(m->data + req->offset, 0, req->len);
		if (req->op == QSM_IO_ZERO && req->offset + req->len > m->size)
			m->size = req->offset + req->len;
		return 0;
	case QSM_IO_PREALLOC:
		if (req->offset + req->len > m->size && req->offset + req->len <= DISK_MAX)
			m->size = req->offset + req->len;
		return 0;
	case QSM_IO_TRUNCATE:
		if (req->offset > DISK_MAX)
			return -EFBIG;
		if (req->offset < m->size)
			memset(m->data + req->offset, 0, m->size - req->offset);
		m->size = req->offset;
		return 0;
	case QSM_IO_FLUSH:
		return 0;
	}
	return -EINVAL;
}

static void *mem_worker(void *arg)
{
	struct mem *m = arg;
	pthread_mutex_lock(&m->lock);
	for (;;) {
		while (m->qhead == m->qtail && !m->stop)
			pthread_cond_wait(&m->cond, &m->lock);
		if (m->qhead == m->qtail)
			break;
		struct qsm_io_req *req = m->queue[m->qhead++ % 256];
		int ret = mem_exec(m, req); /* under the lock: one writer at a time */
		m->worker_completions++;
		pthread_mutex_unlock(&m->lock);
		qsm_io_complete_threadsafe(req, ret);
		pthread_mutex_lock(&m->lock);
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

static void mem_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct mem *m = qsm_io_priv(io);
	ck_assert(pthread_equal(pthread_self(), m->loop_thread));
	m->submitted++;
	if (m->threaded) {
		pthread_mutex_lock(&m->lock);
		ck_assert_uint_lt(m->qtail - m->qhead, 256);
		m->queue[m->qtail++ % 256] = req;
		pthread_cond_signal(&m->cond);
		pthread_mutex_unlock(&m->lock);
		return;
	}
	/* On the loop thread, from inside submit: qsm_io_complete posts it. */
	m->in_submit = true;
	qsm_io_complete(req, mem_exec(m, req));
	m->in_submit = false;
}

static int mem_pread(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	struct mem *m = qsm_io_priv(io);
	struct iovec v = { buf, len };
	struct qsm_io_req r = { .op = QSM_IO_READ, .offset = off, .len = len, .iov = &v, .iovcnt = 1 };
	pthread_mutex_lock(&m->lock);
	int ret = mem_exec(m, &r);
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int mem_pwrite(struct qsm_io *io, const void *buf, size_t len, uint64_t off)
{
	struct mem *m = qsm_io_priv(io);
	struct iovec v = { (void *)buf, len };
	struct qsm_io_req r = { .op = QSM_IO_WRITE, .offset = off, .len = len, .iov = &v, .iovcnt = 1 };
	pthread_mutex_lock(&m->lock);
	int ret = mem_exec(m, &r);
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int mem_flush(struct qsm_io *io)
{
	return 0;
}

static int mem_truncate(struct qsm_io *io, uint64_t size)
{
	struct mem *m = qsm_io_priv(io);
	struct qsm_io_req r = { .op = QSM_IO_TRUNCATE, .offset = size };
	pthread_mutex_lock(&m->lock);
	int ret = mem_exec(m, &r);
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int mem_size(struct qsm_io *io, uint64_t *size)
{
	struct mem *m = qsm_io_priv(io);
	pthread_mutex_lock(&m->lock);
	*size = m->size;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static void mem_close(struct qsm_io *io)
{
	struct mem *m = qsm_io_priv(io);
	m->closed = true;
}

static const struct qsm_io_ops mem_ops = {
	.name = "mem",
	.submit = mem_submit,
	.pread_sync = mem_pread,
	.pwrite_sync = mem_pwrite,
	.flush_sync = mem_flush,
	.truncate_sync = mem_truncate,
	.get_size = mem_size,
	.close = mem_close,
};

static void mem_init(struct mem *m, bool threaded)
{
	memset(m, 0, sizeof(*m));
	m->data = calloc(1, DISK_MAX);
	ck_assert_ptr_nonnull(m->data);
	m->loop_thread = pthread_self();
	m->threaded = threaded;
	pthread_mutex_init(&m->lock, NULL);
	pthread_cond_init(&m->cond, NULL);
	if (threaded)
		ck_assert_int_eq(pthread_create(&m->worker, NULL, mem_worker, m), 0);
}

static void mem_fini(struct mem *m)
{
	if (m->threaded) {
		pthread_mutex_lock(&m->lock);
		m->stop = true;
		pthread_cond_signal(&m->cond);
		pthread_mutex_unlock(&m->lock);
		pthread_join(m->worker, NULL);
	}
	free(m->data);
}

/* --- Driving an image asynchronously ---------------------------------------- */

struct op {
	int ret;
	bool done;
	pthread_t thread;
};

static void op_cb(void *opaque, int ret)
{
	struct op *o = opaque;
	o->ret = ret;
	o->done = true;
	o->thread = pthread_self();
}

static void run_until(struct event_base *b, struct op *ops, int n)
{
	for (;;) {
		bool all = true;
		for (int i = 0; i < n; i++)
			all &= ops[i].done;
		if (all)
			return;
		ck_assert_int_ge(event_base_loop(b, EVLOOP_ONCE), 0);
	}
}

static void image_round_trip(bool threaded)
{
	struct event_base *b = event_base_new();
	struct mem m;
	struct qsm_io *io;
	struct qsm_image *img;
	char err[256];
	enum { N = 16, LEN = 24 * 1024 };
	static uint8_t wbuf[N][LEN], rbuf[N][LEN];

	mem_init(&m, threaded);
	ck_assert_int_eq(qsm_io_new(b, &mem_ops, 0, &m, &io), 0);
	ck_assert_ptr_eq(qsm_io_priv(io), &m);
	ck_assert_ptr_eq(qsm_io_base(io), b);

	struct qsm_create_opts co = { QSM_OPTS_INIT(co), .size = 256 * MiB, .cluster_size = 65536 };
	ck_assert_msg(qsm_create_io(io, &co, err, sizeof(err)) == 0, "%s", err);
	ck_assert(!m.closed); /* the handle stays the caller's */
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .cache = QSM_CACHE_WRITEBACK };
	ck_assert_msg(qsm_open_io(b, io, &oo, &img, err, sizeof(err)) == 0, "%s", err);

	struct qsm_info info;
	qsm_get_info(img, &info);
	ck_assert_str_eq(info.aio, "mem");
	ck_assert_uint_eq(info.virtual_size, 256 * MiB);
	ck_assert_str_eq(info.compression_type, "zlib");
	/* The 0.1.0 entry point fills what 0.1.0 knew, nothing past it; a
	 * newer caller's larger structure reads zeros past the library's. */
	struct qsm_info old;
	memset(&old, 0xa5, sizeof(old));
	(qsm_get_info)(img, &old);
	ck_assert_uint_eq(old.virtual_size, info.virtual_size);
	ck_assert_str_eq(old.aio, "mem");
	const uint8_t *tail = (const uint8_t *)&old + offsetof(struct qsm_info, compression_type);
	for (size_t i = 0; i < sizeof(old.compression_type); i++)
		ck_assert_uint_eq(tail[i], 0xa5);
	uint8_t ibig[sizeof(struct qsm_info) + 16];
	memset(ibig, 0xa5, sizeof(ibig));
	qsm_get_info_sized(img, (struct qsm_info *)ibig, sizeof(ibig));
	for (size_t i = sizeof(struct qsm_info); i < sizeof(ibig); i++)
		ck_assert_uint_eq(ibig[i], 0);
	ck_assert_str_eq(((struct qsm_info *)ibig)->compression_type, "zlib");

	/* Concurrent allocating writes at unaligned offsets (COW of the
	 * cluster heads and tails), then reads of all of them. */
	struct op w[N] = { 0 }, f = { 0 }, r[N] = { 0 };
	struct iovec wv[N], rv[N];
	for (int i = 0; i < N; i++) {
		memset(wbuf[i], 'a' + i, LEN);
		wv[i] = (struct iovec){ wbuf[i], LEN };
		ck_assert_int_eq(qsm_writev(img, (uint64_t)i * 5 * MiB + 1000, &wv[i], 1, op_cb, &w[i]), 0);
	}
	run_until(b, w, N);
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(w[i].ret, 0);
		ck_assert(pthread_equal(w[i].thread, m.loop_thread));
	}
	ck_assert_int_eq(qsm_flush(img, op_cb, &f), 0);
	run_until(b, &f, 1);
	ck_assert_int_eq(f.ret, 0);
	for (int i = 0; i < N; i++) {
		rv[i] = (struct iovec){ rbuf[i], LEN };
		ck_assert_int_eq(qsm_readv(img, (uint64_t)i * 5 * MiB + 1000, &rv[i], 1, op_cb, &r[i]), 0);
	}
	run_until(b, r, N);
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(r[i].ret, 0);
		ck_assert(memcmp(rbuf[i], wbuf[i], LEN) == 0);
	}
	if (threaded)
		ck_assert_uint_gt(m.worker_completions, N);
	ck_assert_uint_gt(m.submitted, 2 * N);
	ck_assert_int_eq(qsm_close(img), 0);
	ck_assert(m.closed);

	/* The image left on the backend is clean, by the public checker. */
	struct qsm_check_report rep = { QSM_OPTS_INIT(rep) };
	ck_assert_int_eq(qsm_io_new(b, &mem_ops, QSM_IO_RDONLY, &m, &io), 0);
	ck_assert_msg(qsm_check_io(io, 0, &rep, NULL, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(rep.corruptions + rep.leaks + rep.check_errors, 0);
	ck_assert_uint_ge(rep.allocated_clusters, N);
	qsm_io_close(io);
	mem_fini(&m);
	event_base_free(b);
}

START_TEST(worker_thread_completes)
{
	image_round_trip(true);
}
END_TEST

START_TEST(loop_completes)
{
	image_round_trip(false);
}
END_TEST

/* qsm_io_complete from inside submit is posted: the callback runs later. */
static bool cb_ran, cb_in_submit;
static struct mem *cb_mem;
static void raw_cb(struct qsm_io_req *req, int ret)
{
	cb_ran = true;
	cb_in_submit = cb_mem->in_submit;
	ck_assert_int_eq(ret, 0);
}

START_TEST(complete_inside_submit_is_deferred)
{
	struct event_base *b = event_base_new();
	struct mem m;
	struct qsm_io *io;
	uint8_t buf[512];
	struct iovec v = { buf, sizeof(buf) };

	mem_init(&m, false);
	cb_mem = &m;
	ck_assert_int_eq(qsm_io_new(b, &mem_ops, 0, &m, &io), 0);
	struct qsm_io_req req = { .op = QSM_IO_WRITE, .offset = 0, .len = sizeof(buf), .iov = &v,
				  .iovcnt = 1, .cb = raw_cb };
	memset(buf, 7, sizeof(buf));
	qsm_io_submit(io, &req);
	ck_assert(!cb_ran);
	while (!cb_ran)
		event_base_loop(b, EVLOOP_ONCE);
	ck_assert(!cb_in_submit);
	ck_assert_uint_eq(m.data[511], 7);
	/* An idle handle does not keep the loop running. */
	ck_assert_int_eq(event_base_dispatch(b), 1);
	qsm_io_close(io);
	ck_assert(m.closed);
	mem_fini(&m);
	event_base_free(b);
}
END_TEST

START_TEST(ops_validated)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io = (struct qsm_io *)1;
	struct qsm_io_ops ops = mem_ops;
	struct mem m;
	mem_init(&m, false);
	ops.get_size = NULL;
	ck_assert_int_eq(qsm_io_new(b, &ops, 0, NULL, &io), -EINVAL);
	ck_assert_ptr_null(io);
	ck_assert_int_eq(qsm_io_new(b, &mem_ops, QSM_IO_CREATE, NULL, &io), -EINVAL);
	/* A table from newer headers: unknown members must be unset. */
	struct {
		struct qsm_io_ops ops;
		void *newer;
	} big = { mem_ops, NULL };
	ck_assert_int_eq(qsm_io_new_sized(b, &big.ops, sizeof(big), 0, &m, &io), 0);
	qsm_io_close(io);
	big.newer = (void *)mem_close;
	ck_assert_int_eq(qsm_io_new_sized(b, &big.ops, sizeof(big), 0, NULL, &io), -EINVAL);
	/* An older, shorter table: the members it lacks are NULL (close is
	 * required and last, so a table without it is refused). */
	ck_assert_int_eq(qsm_io_new_sized(b, &mem_ops, offsetof(struct qsm_io_ops, close), 0, NULL,
					  &io), -EINVAL);
	ck_assert_int_eq(qsm_io_new(b, &mem_ops, 0, &m, &io), 0);
	ck_assert_int_eq(qsm_io_set_mem_align(io, 3), -EINVAL);
	ck_assert_int_eq(qsm_io_set_mem_align(io, 512), 0);
	qsm_io_close(io);
	mem_fini(&m);
	event_base_free(b);
}
END_TEST

/* --- Growable option structures --------------------------------------------- */

START_TEST(opts_struct_size)
{
	char err[256];
	char path[] = "/tmp/qsm-abi-XXXXXX";
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	close(fd);

	/* A caller whose structure is one field longer than this library's,
	 * with that field set: refused, nothing created. */
	struct {
		struct qsm_create_opts o;
		uint64_t newer;
	} big = { .o = { .size = MiB }, .newer = 1 };
	big.o.struct_size = sizeof(big);
	ck_assert_int_eq(qsm_create(path, &big.o, err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "does not know"));
	big.newer = 0;
	ck_assert_msg(qsm_create(path, &big.o, err, sizeof(err)) == 0, "%s", err);

	/* An older caller's shorter structure: what it lacks is default. */
	struct qsm_create_opts small = { .size = 2 * MiB, .lazy_refcounts = true,
					 .backing_file = "never-read" };
	small.struct_size = offsetof(struct qsm_create_opts, lazy_refcounts);
	ck_assert_msg(qsm_create(path, &small, err, sizeof(err)) == 0, "%s", err);
	struct event_base *b = event_base_new();
	struct qsm_image *img;
	struct qsm_open_opts oo = { .struct_size = offsetof(struct qsm_open_opts, cache),
				    .read_only = true, .cache = QSM_CACHE_UNSAFE };
	ck_assert_msg(qsm_open(b, path, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	struct qsm_info info;
	qsm_get_info(img, &info);
	ck_assert(!info.lazy_refcounts);       /* past struct_size: default */
	ck_assert_str_eq(info.backing_file, "");
	ck_assert_uint_eq(info.virtual_size, 2 * MiB);
	ck_assert(info.read_only);
	ck_assert_int_eq(info.cache, QSM_CACHE_WRITEBACK); /* past struct_size */
	ck_assert_int_eq(qsm_close(img), 0);

	struct qsm_open_opts tiny = { .struct_size = 1 };
	ck_assert_int_eq(qsm_open(b, path, &tiny, &img, err, sizeof(err)), -EINVAL);

	/* The public checker on it: clean. */
	struct qsm_check_report rep = { QSM_OPTS_INIT(rep) };
	ck_assert_int_eq(qsm_check(path, 0, &rep, NULL, err, sizeof(err)), 0);
	ck_assert_uint_eq(rep.corruptions + rep.leaks, 0);
	ck_assert_uint_gt(rep.image_end_offset, 0);
	unsigned v = qsm_version(NULL);
	const char *vs;
	ck_assert_uint_eq(qsm_version(&vs), v);
	ck_assert_uint_eq(v, QSM_VERSION_NUMBER);
	ck_assert_str_eq(vs, QSM_VERSION_STRING);
	event_base_free(b);
	unlink(path);
}
END_TEST

/* --- The public checker finds and repairs a leak ----------------------------- */

START_TEST(check_counts_and_repairs)
{
	char err[256], path[] = "/tmp/qsm-abi-XXXXXX";
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	struct qsm_create_opts co = { QSM_OPTS_INIT(co), .size = 8 * MiB };
	ck_assert_int_eq(qsm_create(path, &co, err, sizeof(err)), 0);
	/* Leak: raise the refcount of a cluster nothing uses.  With 64 KiB
	 * clusters the refcount block is cluster 2; entry 5 is cluster 5. */
	fd = open(path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	uint8_t one[2] = { 0, 1 };
	ck_assert_int_eq(pwrite(fd, one, 2, 2 * 65536 + 5 * 2), 2);
	ck_assert_int_eq(ftruncate(fd, 6 * 65536), 0);
	close(fd);
	struct qsm_check_report rep = { QSM_OPTS_INIT(rep) };
	ck_assert_int_eq(qsm_check(path, 0, &rep, NULL, err, sizeof(err)), 3);
	ck_assert_uint_eq(rep.leaks, 1);
	ck_assert_uint_eq(rep.corruptions, 0);
	ck_assert_int_eq(qsm_check(path, QSM_REPAIR_LEAKS, &rep, NULL, err, sizeof(err)), 0);
	ck_assert_uint_eq(rep.leaks_fixed, 1);
	ck_assert_uint_eq(rep.leaks_left, 0);
	ck_assert_int_eq(qsm_check(path, 0, &rep, NULL, err, sizeof(err)), 0);
	ck_assert_int_eq(qsm_check("/nonexistent/x", 0, &rep, NULL, err, sizeof(err)), -ENOENT);
	unlink(path);
}
END_TEST

/* --- The backing-open hook sees the recorded name ------------------------------ */

struct hook {
	struct qsm_sim *sim;
	char name[256], path[512];
	int calls;
};

static int hook_open(void *opaque, struct event_base *base, const char *name, const char *path,
		     int flags, struct qsm_io **out)
{
	struct hook *h = opaque;
	h->calls++;
	snprintf(h->name, sizeof(h->name), "%s", name);
	snprintf(h->path, sizeof(h->path), "%s", path);
	if (strcmp(name, "rbd:pool/base") != 0)
		return -ENOENT;
	return qsm_io_open_sim(base, h->sim, flags, out);
}

START_TEST(backing_hook_gets_recorded_name)
{
	struct event_base *b = event_base_new();
	struct hook h = { .sim = qsm_sim_new(1) };
	struct qsm_sim *top = qsm_sim_new(2);
	struct qsm_io *io;
	struct qsm_image *img;
	char err[256];
	uint8_t buf[4096], got[4096];

	/* The backing image, on its own simulated disk. */
	ck_assert_int_eq(qsm_io_open_sim(b, h.sim, 0, &io), 0);
	struct qsm_create_opts bo = { QSM_OPTS_INIT(bo), .size = 4 * MiB };
	ck_assert_msg(qsm_create_io(io, &bo, err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(qsm_open_io(b, io, NULL, &img, err, sizeof(err)) == 0, "%s", err);
	memset(buf, 0x5a, sizeof(buf));
	ck_assert_int_eq(qsm_sync_pwrite(img, buf, sizeof(buf), 65536), 0);
	ck_assert_int_eq(qsm_close(img), 0);

	/* The top image names it as a non-file name. */
	ck_assert_int_eq(qsm_io_open_sim(b, top, 0, &io), 0);
	struct qsm_create_opts to = { QSM_OPTS_INIT(to), .size = 4 * MiB,
				      .backing_file = "rbd:pool/base", .backing_format = "qcow2" };
	ck_assert_msg(qsm_create_io(io, &to, err, sizeof(err)) == 0, "%s", err);
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .read_only = true,
				    .open_backing_io = hook_open, .open_backing_opaque = &h };
	ck_assert_msg(qsm_open_io(b, io, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(h.calls, 1);
	ck_assert_str_eq(h.name, "rbd:pool/base");
	ck_assert_str_eq(h.path, "rbd:pool/base"); /* opened from a handle: cwd-relative */
	ck_assert_int_eq(qsm_sync_pread(img, got, sizeof(got), 65536), 0);
	ck_assert(memcmp(got, buf, sizeof(buf)) == 0);
	ck_assert_int_eq(qsm_close(img), 0);
	qsm_sim_free(top);
	qsm_sim_free(h.sim);
	event_base_free(b);
}
END_TEST

/* --- The blocking rule is enforced ------------------------------------------ */
#ifndef NDEBUG

START_TEST(blocking_call_on_live_handle_aborts)
{
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct event_base *b = event_base_new();
		struct qsm_sim *sim = qsm_sim_new(3);
		struct qsm_io *io;
		struct qsm_image *img;
		uint64_t size;
		if (qsm_io_open_sim(b, sim, 0, &io) < 0)
			_exit(10);
		struct qsm_create_opts co = { QSM_OPTS_INIT(co), .size = MiB };
		if (qsm_create_io(io, &co, NULL, 0) < 0 || qsm_io_get_size(io, &size) < 0)
			_exit(11); /* not live yet: allowed */
		if (qsm_open_io(b, io, NULL, &img, NULL, 0) < 0)
			_exit(12);
		(void)qsm_io_get_size(io, &size); /* live: must abort */
		_exit(13);
	}
	int st;
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT, "status %#x", st);
}
END_TEST
#endif

/* --- qsm_stats: refcount block cache counters ------------------------------ */

START_TEST(refblock_stats)
{
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(7);
	struct qsm_io *io;
	struct qsm_image *img;
	char err[256];
	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	/* 4 KiB clusters, 16-bit refcounts: one refcount block covers 8 MiB
	 * of file.  The cache holds one block. */
	struct qsm_create_opts co = { QSM_OPTS_INIT(co), .size = 64 * MiB, .cluster_size = 4096 };
	ck_assert_msg(qsm_create_io(io, &co, err, sizeof(err)) == 0, "%s", err);
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .work_threads = -1,
				    .refcount_cache_size = 4096 };
	ck_assert_msg(qsm_open_io(b, io, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	struct qsm_rc_stats rs;
	qsm_refcount_stats(img->rc, &rs);
	ck_assert_uint_eq(rs.capacity, 1);

	struct qsm_stats st;
	qsm_get_stats(img, &st);
	uint64_t hits0 = st.refblock_hits;
	/* 4 KiB every 8 KiB over 64 MiB: 8192 data clusters, ~4 blocks. */
	uint8_t buf[4096];
	memset(buf, 0x33, sizeof(buf));
	for (uint64_t off = 0; off < 64 * MiB; off += 8192) {
		ck_assert_int_eq(qsm_sync_pwrite(img, buf, sizeof(buf), off), 0);
		qsm_refcount_stats(img->rc, &rs);
		if (!rs.dirty) /* pinned or dirty blocks may exceed it for a while */
			ck_assert_uint_le(rs.resident, rs.capacity);
	}
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	qsm_refcount_stats(img->rc, &rs);
	ck_assert_uint_le(rs.resident, rs.capacity); /* idle and clean: bounded */
	/* Discards drop refcounts in the first blocks again: they are read back. */
	for (uint64_t off = 0; off < 64 * MiB; off += 16 * MiB)
		ck_assert_int_eq(qsm_sync_discard(img, off, 65536), 0);
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	/* Refcounts a discard drops change once its L2 update is durable, in
	 * memory: the cache is over capacity and dirty, and starts a write-back
	 * by itself; once the loop has nothing left to do it is bounded again. */
	ck_assert_int_eq(event_base_dispatch(b), 1);
	qsm_refcount_stats(img->rc, &rs);
	ck_assert_msg(rs.resident <= rs.capacity, "resident %zu dirty %zu cap %zu",
		      rs.resident, rs.dirty, rs.capacity);

	qsm_get_stats(img, &st);
	ck_assert_uint_eq(st.refblock_hits, rs.hits);
	ck_assert_uint_eq(st.refblock_misses, rs.misses);
	ck_assert_uint_eq(st.refblock_evictions, rs.evictions);
	ck_assert_uint_eq(st.refblock_loads, rs.loads);
	ck_assert_uint_gt(st.refblock_hits, hits0 + 8000); /* one lookup per allocation at least */
	ck_assert_uint_gt(st.refblock_misses, 0);          /* an evicted block read back */
	ck_assert_uint_ge(st.refblock_loads, st.refblock_misses);
	ck_assert_uint_ge(st.refblock_evictions, 3);       /* four blocks through one slot */
	ck_assert_uint_gt(st.writes, 8000);

	/* The 0.1.0 entry point: the fields it knew, nothing past them. */
	struct qsm_stats old;
	memset(&old, 0xa5, sizeof(old));
	(qsm_get_stats)(img, &old);
	ck_assert_uint_eq(old.writes, st.writes);
	ck_assert_uint_eq(old.compress_fallbacks, st.compress_fallbacks);
	ck_assert_uint_eq(old.refblock_hits, 0xa5a5a5a5a5a5a5a5ull);
	ck_assert_uint_eq(old.refblock_loads, 0xa5a5a5a5a5a5a5a5ull);
	/* A newer caller's larger structure: zeros past what the library has. */
	uint8_t big[sizeof(struct qsm_stats) + 16];
	memset(big, 0xa5, sizeof(big));
	qsm_get_stats_sized(img, (struct qsm_stats *)big, sizeof(big));
	for (size_t i = sizeof(struct qsm_stats); i < sizeof(big); i++)
		ck_assert_uint_eq(big[i], 0);
	ck_assert(memcmp(big, &st, sizeof(st)) == 0);

	ck_assert_int_eq(qsm_close(img), 0);
	event_base_free(b);
	qsm_sim_free(sim);
}
END_TEST

static Suite *abi_suite(void)
{
	Suite *s = suite_create("abi");
	TCase *t = tcase_create("backend");
	tcase_set_timeout(t, 120);
	tcase_add_test(t, worker_thread_completes);
	tcase_add_test(t, loop_completes);
	tcase_add_test(t, complete_inside_submit_is_deferred);
	tcase_add_test(t, ops_validated);
	tcase_add_test(t, backing_hook_gets_recorded_name);
	suite_add_tcase(s, t);
	TCase *o = tcase_create("options");
	tcase_add_test(o, opts_struct_size);
	tcase_add_test(o, check_counts_and_repairs);
	tcase_add_test(o, refblock_stats);
	suite_add_tcase(s, o);
#ifndef NDEBUG
	/* Only where the library's assertions are compiled in (the library
	 * and this test share the build type's flags). */
	TCase *bl = tcase_create("blocking");
	tcase_add_test(bl, blocking_call_on_live_handle_aborts);
	suite_add_tcase(s, bl);
#endif
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(abi_suite());
	srunner_run_all(sr, CK_ENV);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
