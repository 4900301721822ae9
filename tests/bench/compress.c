/*
 * tests/bench/compress.c: `bench_compress`, compressed writes through the
 * library, for the worker-pool scaling figure (run by hand, see compress.sh).
 *
 *   bench_compress SRC DST THREADS [DEPTH [REQUEST_BYTES]]
 *
 * Copies the raw file SRC into the (existing, empty) qcow2 image DST with
 * qsm_write_compressed, DEPTH requests (default 16) of REQUEST_BYTES
 * (default 1 MiB) in flight, the image opened with work_threads = THREADS.
 * Prints wall and CPU seconds (user + system of the whole process) and
 * their ratio: about THREADS when deflate, which dominates, runs in parallel.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "sm/qsm.h"

struct slot {
	struct iovec iov;
	uint64_t off;
	bool busy;
	int ret;
};

static uint64_t g_next, g_size, g_req, g_done;
static uint8_t *g_src;
static int g_err;

static void submit(struct qsm_image *img, struct slot *s);

static void done_cb(void *opaque, int ret)
{
	struct slot *s = opaque;
	s->busy = false;
	if (ret && !g_err)
		g_err = ret;
	g_done += s->iov.iov_len;
}

static void submit(struct qsm_image *img, struct slot *s)
{
	s->off = g_next;
	s->iov = (struct iovec){ g_src + g_next, (size_t)(g_size - g_next < g_req ? g_size - g_next : g_req) };
	g_next += s->iov.iov_len;
	s->busy = true;
	int ret = qsm_write_compressed(img, s->off, &s->iov, 1, done_cb, s);
	if (ret) {
		fprintf(stderr, "bench_compress: submit at %llu: %s\n", (unsigned long long)s->off,
			strerror(-ret));
		exit(1);
	}
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double cpu(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: bench_compress SRC DST THREADS [DEPTH [REQUEST_BYTES]]\n");
		return 2;
	}
	int threads = atoi(argv[3]);
	int depth = argc > 4 ? atoi(argv[4]) : 16;
	g_req = argc > 5 ? strtoull(argv[5], NULL, 0) : 1 << 20;
	int fd = open(argv[1], O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0 || depth < 1 || depth > 256) {
		fprintf(stderr, "bench_compress: %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	g_size = (uint64_t)st.st_size;
	g_src = malloc(g_size);
	if (!g_src || pread(fd, g_src, g_size, 0) != (ssize_t)g_size) {
		fprintf(stderr, "bench_compress: cannot read %s\n", argv[1]);
		return 1;
	}
	close(fd);

	struct event_base *base = event_base_new();
	struct qsm_image *img;
	char err[256];
	struct qsm_open_opts oo = { .work_threads = threads };
	if (qsm_open(base, argv[2], &oo, &img, err, sizeof(err)) < 0) {
		fprintf(stderr, "bench_compress: %s\n", err);
		return 1;
	}
	struct slot *slots = calloc((size_t)depth, sizeof(*slots));
	double t0 = now(), c0 = cpu();
	for (;;) {
		bool any = false;
		for (int i = 0; i < depth; i++) {
			if (!slots[i].busy && g_next < g_size && !g_err)
				submit(img, &slots[i]);
			any |= slots[i].busy;
		}
		if (!any)
			break;
		event_base_loop(base, EVLOOP_ONCE);
	}
	int ret = g_err ? g_err : qsm_close(img);
	double wall = now() - t0, c = cpu() - c0;
	if (ret) {
		fprintf(stderr, "bench_compress: %s\n", strerror(-ret));
		return 1;
	}
	printf("threads %d depth %d: %.1f MiB in %.2f s wall, %.2f s CPU, CPU/wall %.2f, %.1f MiB/s\n",
	       threads, depth, (double)g_size / 1048576, wall, c, c / wall,
	       (double)g_size / 1048576 / wall);
	free(slots);
	free(g_src);
	event_base_free(base);
	return 0;
}
