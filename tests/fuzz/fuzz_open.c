/*
 * tests/fuzz/fuzz_open.c: libFuzzer target, untrusted images.
 *
 * Input: the bytes of an image file, whole (a crash file is an image:
 * `qemu-img info crash-...` shows it).  The last TAIL_LEN bytes, which are
 * also part of the image, are decoded into options and a few requests (see
 * decode()), so a seed's tail (usually zeros in a table or a data cluster)
 * gives a plain script and the fuzzer varies it by mutating the tail.
 *
 * Per input, on a simulated disk loaded from the bytes (io/sim.h), which
 * refuses to grow past MAX_FILE (-EFBIG):
 *  1. The checker (metadata/check.c parses untrusted images too): a plain
 *     check on a read-only handle; then a repair (-r all) on a fresh copy,
 *     and when the repair reports no corruption left, a second check must
 *     find none (the repair's promise).
 *  2. A read-only open, without the backing file or with it: reads and
 *     block status.
 *  3. A read-write open (of a fresh copy): every kind of request (compressed
 *     writes too), some concurrent, truncate, close.
 *     Backing files are simulated disks too (open_backing_io below): the
 *     first holds the input's bytes again, deeper ones do not exist; no file
 *     of the host is ever opened.  Compression work runs on the loop
 *     (work_threads -1), so a run is a function of its input.
 *     Oracle: an image the checker called clean (no corruption, no leak),
 *     on which the engine reported no error, is still free of corruption
 *     after the session and close.
 * Any sanitizer report, assertion, leak or hang (an accepted request that
 * never completes) is a bug.
 */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/sim.h"
#include "io/util.h"
#include "metadata/check.h"
#include "sm/qsm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define TAIL_LEN 64u
#define OP_LEN 7u
#define MAX_OPS ((TAIL_LEN - 1) / OP_LEN)
#define MAX_REQ (1u << 20)  /* longest request */
#define MAX_GROW (8ull << 30) /* truncate targets */
#define MAX_FILE (64ull << 20) /* the sim disk's maximum size */

enum kind { K_READ, K_WRITE, K_ZERO, K_ZERO_UNMAP, K_DISCARD, K_STATUS, K_FLUSH, K_TRUNCATE };

struct op {
	enum kind kind;
	bool barrier;          /* wait for everything in flight before it */
	uint64_t base;         /* 24 bits */
	unsigned shift;        /* offset = (base << shift) % size */
	uint64_t len;
	uint8_t fill;
};

struct script {
	enum qsm_cache_mode cache;
	bool small_cache;      /* an L2 cache of one table */
	uint64_t seed;         /* sim scheduler */
	bool ro_backing;       /* the read-only open opens the backing chain */
	unsigned max_batch;
	unsigned nops;
	struct op ops[MAX_OPS];
};

/* The tail: byte 0 options, then OP_LEN bytes per request. */
static void decode(const uint8_t *data, size_t size, struct script *s)
{
	uint8_t t[TAIL_LEN] = { 0 };
	size_t n = size < TAIL_LEN ? size : TAIL_LEN;
	memcpy(t + TAIL_LEN - n, data + size - n, n);
	memset(s, 0, sizeof(*s));
	s->cache = (enum qsm_cache_mode)(t[0] % 5);
	s->small_cache = t[0] & 0x08;
	s->max_batch = 1 + ((t[0] >> 4) & 3);
	s->seed = (t[0] >> 6) & 1;
	s->ro_backing = t[0] & 0x80;
	for (unsigned i = 0; i < MAX_OPS; i++) {
		const uint8_t *b = t + 1 + i * OP_LEN;
		struct op *o = &s->ops[s->nops++];
		o->kind = (enum kind)(b[0] & 7);
		o->barrier = b[0] & 8;
		o->shift = (b[0] >> 4) * 3;
		o->base = (uint64_t)b[1] << 16 | (uint64_t)b[2] << 8 | b[3];
		o->len = 1 + ((uint64_t)b[4] << 8 | b[5]);
		if (b[6] & 1)
			o->len <<= 4;
		o->fill = b[6];
	}
}

/* --- running requests ----------------------------------------------------- */

struct run {
	struct event_base *base;
	struct qsm_image *img;
	int pending;
};

struct req {
	struct run *r;
	uint8_t *buf;
	struct iovec iov[2];
	struct qsm_extent ext;
	int ret;
};

static void req_cb(void *opaque, int ret)
{
	struct req *q = opaque;
	q->ret = ret;
	q->r->pending--;
}

/* Run the loop until every accepted request completed; a loop with nothing
 * left to run while requests wait is a hang, a bug. */
static void drain(struct run *r)
{
	while (r->pending > 0) {
		if (event_base_loop(r->base, EVLOOP_ONCE) == 1) {
			fprintf(stderr, "fuzz_open: hang: %d requests never complete\n", r->pending);
			abort();
		}
	}
}

static void run_ops(struct run *r, const struct script *s, bool read_only)
{
	struct qsm_info info;
	struct req q[MAX_OPS];
	memset(q, 0, sizeof(q));

	for (unsigned i = 0; i < s->nops; i++) {
		const struct op *o = &s->ops[i];
		struct req *rq = &q[i];
		qsm_get_info(r->img, &info);
		uint64_t size = info.virtual_size;
		uint64_t off = size ? (o->base << o->shift) % size : 0;
		uint64_t len = o->len;
		enum kind k = o->kind;
		int ret = 0;

		if (o->barrier || k == K_TRUNCATE)
			drain(r);
		if (read_only && k != K_READ && k != K_STATUS)
			k = (k & 1) ? K_STATUS : K_READ;
		bool compressed = k == K_WRITE && (o->fill & 0x40);
		if (compressed && !(o->fill & 0x20) && info.cluster_size) {
			/* Whole clusters, mostly (the rest tests the refusal). */
			off = QSM_ALIGN_DOWN(off, info.cluster_size);
			len = QSM_ALIGN_UP(len, info.cluster_size);
		}
		/* Mostly inside the disk; the rest tests the bounds checks. */
		if (!(o->fill & 0x80) && len > size - off)
			len = size - off;
		rq->r = r;
		if (k == K_READ || k == K_WRITE) {
			if (len == 0 || len > MAX_REQ)
				continue;
			rq->buf = malloc(len);
			if (!rq->buf)
				abort();
			memset(rq->buf, o->fill, len);
			uint64_t a = (o->fill * len) >> 8; /* split into two iovecs */
			rq->iov[0] = (struct iovec){ rq->buf, a };
			rq->iov[1] = (struct iovec){ rq->buf + a, len - a };
		}
		r->pending++;
		switch (k) {
		case K_READ:
			ret = qsm_readv(r->img, off, rq->iov, 2, req_cb, rq);
			break;
		case K_WRITE:
			if (compressed)
				ret = qsm_write_compressed(r->img, off, rq->iov, 2, req_cb, rq);
			else
				ret = qsm_writev(r->img, off, rq->iov, 2, req_cb, rq);
			break;
		case K_ZERO:
		case K_ZERO_UNMAP:
			ret = qsm_write_zeroes(r->img, off, len, k == K_ZERO_UNMAP ? QSM_ZERO_MAY_UNMAP : 0,
					       req_cb, rq);
			break;
		case K_DISCARD:
			ret = qsm_discard(r->img, off, len, req_cb, rq);
			break;
		case K_STATUS:
			ret = qsm_block_status(r->img, off, len, &rq->ext, req_cb, rq);
			break;
		case K_FLUSH:
			ret = qsm_flush(r->img, req_cb, rq);
			break;
		case K_TRUNCATE: {
			r->pending--;
			/* Grow (to at most MAX_GROW) or shrink, 512-aligned but
			 * for the low bit of fill. */
			uint64_t ns = (o->base << 9) % MAX_GROW;
			if (o->fill & 2)
				ns = QSM_ALIGN_DOWN(off, 512);
			ns |= o->fill & 4 ? 1 : 0;
			(void)qsm_truncate(r->img, ns, NULL, 0);
			continue;
		}
		}
		if (ret < 0)
			r->pending--; /* refused: the callback never runs */
	}
	drain(r);
	for (unsigned i = 0; i < s->nops; i++)
		free(q[i].buf);
}

/* --- the three passes ----------------------------------------------------- */

static struct qsm_io *open_sim(struct event_base *base, struct qsm_sim *sim, int flags)
{
	struct qsm_io *io;
	if (qsm_io_open_sim(base, sim, flags, &io) < 0)
		abort();
	return io;
}

/* The checker: 0 when it ran; *res filled. */
static int check(struct event_base *base, struct qsm_sim *sim, unsigned fix,
		 struct qsm_check_result *res)
{
	char err[256];
	struct qsm_io *io = open_sim(base, sim, fix ? 0 : QSM_IO_RDONLY);
	memset(res, 0, sizeof(*res));
	int ret = qsm_check_image(io, fix, res, NULL, err, sizeof(err));
	qsm_io_close(io);
	return ret;
}

/* Backing files live on simulated disks too (qsm_open_opts.open_backing_io):
 * whatever name the image gives, the first backing file holds the input's
 * bytes again (a qcow2 image naming itself is a chain of the same image, a
 * raw backing file is the bytes as a disk); deeper ones do not exist.  So
 * no file of the host is ever opened. */
#define MAX_BACKING 2
struct backing {
	const uint8_t *data;
	size_t size;
	struct qsm_sim *sims[MAX_BACKING];
	int n;
};

static int open_backing_io(void *opaque, struct event_base *base, const char *name,
			   const char *path, int flags, struct qsm_io **out)
{
	struct backing *b = opaque;
	(void)name;
	(void)path;
	if (b->n == MAX_BACKING)
		return -ENOENT;
	struct qsm_sim *sim = qsm_sim_new((uint64_t)b->n + 1);
	if (!sim)
		abort();
	b->sims[b->n++] = sim;
	qsm_sim_set_max_size(sim, MAX_FILE);
	qsm_sim_load_buf(sim, b->data, b->size);
	return qsm_io_open_sim(base, sim, flags, out);
}

/* After the image (and with it the chain) is closed. */
static void backing_free(struct backing *b)
{
	for (int i = 0; i < b->n; i++)
		qsm_sim_free(b->sims[i]);
	b->n = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct script s;
	struct qsm_check_result res, res2;
	char err[256];

	decode(data, size, &s);
	struct event_base *base = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(s.seed);
	if (!base || !sim)
		abort();
	qsm_sim_set_max_batch(sim, s.max_batch);
	/* A file system's maximum file size: a far offset in a table cannot
	 * make a repair grow the disk (and the checker's per-cluster counts)
	 * to hundreds of GiB; the engine sees -EFBIG instead. */
	qsm_sim_set_max_size(sim, MAX_FILE);

	/* 1. The checker, then a repair and its promise. */
	qsm_sim_load_buf(sim, data, size);
	int cret = check(base, sim, 0, &res);
	bool clean = cret == 0 && !res.incomplete && !res.corruptions && !res.leaks;
	if (cret == 0 && !res.incomplete) {
		if (check(base, sim, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &res2) == 0 &&
		    !res2.incomplete && !res2.corruptions_left) {
			if (check(base, sim, 0, &res2) != 0 || res2.incomplete || res2.corruptions) {
				fprintf(stderr, "fuzz_open: the repair reported no corruption left, a "
					"second check finds %llu (incomplete %d)\n",
					(unsigned long long)res2.corruptions, res2.incomplete);
				abort();
			}
		}
	}

	/* 2. Read-only, one layer or with the backing chain. */
	struct run r = { .base = base };
	struct backing bk = { .data = data, .size = size };
	struct qsm_open_opts oo = { .read_only = true, .no_backing = !s.ro_backing,
				    .cache = s.cache, .l2_cache_size = s.small_cache ? 512 : 0,
				    .work_threads = -1, .open_backing_io = open_backing_io,
				    .open_backing_opaque = &bk };
	qsm_sim_load_buf(sim, data, size);
	if (qsm_open_io(base, open_sim(base, sim, QSM_IO_RDONLY), &oo, &r.img, err, sizeof(err)) == 0) {
		run_ops(&r, &s, true);
		qsm_close(r.img);
	}
	backing_free(&bk);

	/* 3. Read-write, with the backing chain. */
	qsm_sim_load_buf(sim, data, size);
	oo.read_only = false;
	oo.no_backing = false;
	if (qsm_open_io(base, open_sim(base, sim, 0), &oo, &r.img, err, sizeof(err)) == 0) {
		run_ops(&r, &s, false);
		bool engine_error = qsm_image_error(r.img)[0] != 0;
		int close_ret = qsm_close(r.img);
		if (clean && !engine_error && close_ret == 0 &&
		    check(base, sim, 0, &res2) == 0 && (res2.incomplete || res2.corruptions)) {
			fprintf(stderr, "fuzz_open: a clean image has %llu corruptions after a "
				"read-write session without error (incomplete %d)\n",
				(unsigned long long)res2.corruptions, res2.incomplete);
			abort();
		}
	}
	backing_free(&bk);

	qsm_sim_free(sim);
	event_base_free(base);
	return 0;
}
