/*
 * tests/bench/fua.c: `bench_fua`, a FUA-heavy random-write workload through
 * the library (run by hand: the figures of FUA's targeted write-back).
 *
 *   bench_fua IMAGE COUNT DEPTH FUA_EVERY [SEED]
 *
 * COUNT 4 KiB writes at random 4 KiB-aligned offsets of the (existing)
 * qcow2 IMAGE, DEPTH in flight, cache=writeback; every FUA_EVERY-th one
 * with QSM_REQ_FUA (a guest file system's journal commits among its other
 * writes).  Prints the wall time from the first submission to the last
 * completion, writes per second, and the engine's syncs, metadata writes
 * and write-back batches; the close after it is not timed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "sm/qsm.h"

struct slot {
	struct iovec iov;
	bool busy;
};

static uint64_t g_rng, g_issued, g_done, g_count, g_fua_every, g_size;
static int g_err;

static uint64_t rnd(void)
{
	g_rng ^= g_rng << 13;
	g_rng ^= g_rng >> 7;
	g_rng ^= g_rng << 17;
	return g_rng;
}

static void done_cb(void *opaque, int ret)
{
	struct slot *s = opaque;
	s->busy = false;
	if (ret && !g_err)
		g_err = ret;
	g_done++;
}

static void submit(struct qsm_image *img, struct slot *s)
{
	uint64_t off = rnd() % (g_size / 4096) * 4096;
	unsigned flags = g_fua_every && g_issued % g_fua_every == g_fua_every - 1 ? QSM_REQ_FUA : 0;
	s->busy = true;
	g_issued++;
	int ret = qsm_writev_flags(img, off, &s->iov, 1, flags, done_cb, s);
	if (ret) {
		fprintf(stderr, "bench_fua: submit at %llu: %s\n", (unsigned long long)off,
			strerror(-ret));
		exit(1);
	}
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: bench_fua IMAGE COUNT DEPTH FUA_EVERY [SEED]\n");
		return 2;
	}
	g_count = strtoull(argv[2], NULL, 0);
	unsigned depth = (unsigned)strtoul(argv[3], NULL, 0);
	g_fua_every = strtoull(argv[4], NULL, 0);
	g_rng = argc > 5 ? strtoull(argv[5], NULL, 0) : 1;
	if (!g_rng)
		g_rng = 1;
	struct event_base *base = event_base_new();
	struct qsm_open_opts oo = { .struct_size = sizeof(oo), .cache = QSM_CACHE_WRITEBACK };
	struct qsm_image *img;
	char err[256];
	if (qsm_open(base, argv[1], &oo, &img, err, sizeof(err)) < 0) {
		fprintf(stderr, "bench_fua: %s\n", err);
		return 1;
	}
	struct qsm_info info;
	qsm_get_info(img, &info);
	g_size = info.virtual_size;
	struct slot *slots = calloc(depth, sizeof(*slots));
	for (unsigned i = 0; i < depth; i++) {
		void *buf = aligned_alloc(4096, 4096);
		memset(buf, 0x5a, 4096);
		slots[i].iov = (struct iovec){ buf, 4096 };
	}
	double t0 = now();
	while (g_done < g_count && !g_err) {
		for (unsigned i = 0; i < depth && g_issued < g_count; i++)
			if (!slots[i].busy)
				submit(img, &slots[i]);
		event_base_loop(base, EVLOOP_ONCE);
	}
	double t = now() - t0;
	struct qsm_stats st;
	qsm_get_stats(img, &st);
	printf("%llu writes (1 in %llu FUA), depth %u: %.3f s, %.0f writes/s, %llu syncs, "
	       "%llu metadata writes, %llu batches\n",
	       (unsigned long long)g_count, (unsigned long long)g_fua_every, depth, t,
	       (double)g_count / t, (unsigned long long)st.io_flushes,
	       (unsigned long long)st.meta_writes, (unsigned long long)st.wb_batches);
	int ret = qsm_close(img);
	event_base_free(base);
	if (g_err || ret) {
		fprintf(stderr, "bench_fua: %s\n", strerror(-(g_err ? g_err : ret)));
		return 1;
	}
	return 0;
}
