/*
 * tools/cmd_bench.c: `qsm bench`, qemu-img bench over libqsm.
 *
 *   qsm bench [-c count] [-d depth] [-f fmt] [-n] [-i aio] [-o offset]
 *             [-s size] [-S step] [-t cache] [-w] [--pattern=N]
 *             [--flush-interval=N] [--no-drain] [-q] [-U] [--trace FILE]
 *             [--trace-text FILE] FILE
 *
 * Design: the options, their defaults and the first output lines are
 * qemu-img 7.2's (img_bench in qemu-img.c), so a command line written for
 * qemu-img bench runs unchanged and the two can be compared side by side
 * (tests/bench/compare.sh).  The request loop is a port of qemu's bench_cb:
 *  - `count` requests of `size` bytes, at most `depth` in flight; offsets
 *    start at -o and advance by -S (default: -s), wrapping modulo the image
 *    size; each in-flight slot has its own region of one 4096-aligned buffer
 *    filled with the pattern byte;
 *  - --flush-interval=N (writes only, N >= depth) flushes whenever the
 *    number of requests not yet submitted is a multiple of N: by default the
 *    queue is drained first and submission resumes when the flush is done;
 *    with --no-drain the flush runs alongside the writes.  As in qemu, the
 *    tail (nothing left to submit) flushes after every completion with
 *    --no-drain, and the clock stops when the last request completes even
 *    if a flush is still running (that flush is waited for, untimed);
 *  - "Run completed in" times the loop only: opening and qsm_close (which
 *    writes back dirty metadata) are outside it, as in qemu-img.
 * Differences, on purpose:
 *  - -n and -i native select io_uring (qsm's native backend); qemu-img's
 *    "aio=native requires cache.direct=on" rule is kept, so the same
 *    command lines fail the same way;
 *  - -f accepts qcow2 only; -U is accepted and does nothing;
 *  - -d 0 is refused (qemu-img 7.2 accepts it and then waits forever);
 *  - after the qemu lines, qsm prints throughput, per-request latency
 *    percentiles (submit to completion, CLOCK_MONOTONIC, from a log-linear
 *    histogram: 64 buckets per power of two, so within ~1.6%; the max is
 *    exact) and the engine's counters (qsm_get_stats, taken before close).
 *    -q drops these extra lines (qemu-img's -q does not quiet its own two
 *    lines either, so neither does ours);
 *  - --trace FILE / --trace-text FILE write the timeline of every request
 *    (tools/trace.h), as `qsm io` does; meant for short runs.
 * Exit status: 0, or 1 on a bad option, an open failure or a failed request
 * ("Failed request: ..." ends the run at once, as in qemu-img).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "io/null.h"
#include "io/qsm_io.h"
#include "sm/qsm.h"
#include "tools/cli.h"
#include "tools/trace.h"

#define BENCH_ALIGN 4096

/* Latency histogram: values < 64 ns exact, then 64 sub-buckets per octave. */
#define HIST_SUB_BITS 6
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

struct bench_hist {
	uint64_t count[HIST_BUCKETS];
	uint64_t total, max;
};

struct bench;

struct bench_slot {
	struct bench *b;
	struct iovec iov;
	uint64_t t_submit;
	struct bench_slot *next_free;
};

struct bench {
	struct qsm_image *img;
	uint64_t image_size;
	uint64_t bufsize, step, offset;
	int nrreq;                 /* depth */
	int n;                     /* requests not yet completed */
	int in_flight;
	bool write;
	int flush_interval;
	bool drain_on_flush;
	bool in_flush;             /* a draining flush is running */
	int flushes_pending;       /* flushes submitted and not yet completed */
	int failed;                /* first error (negative errno) */
	struct bench_slot *slots, *free_slots;
	struct bench_hist hist;
	uint64_t t_end;            /* when n reached 0 */
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned hist_index(uint64_t v)
{
	if (v < HIST_SUB)
		return (unsigned)v;
	unsigned e = 63u - (unsigned)__builtin_clzll(v); /* >= HIST_SUB_BITS */
	unsigned sub = (unsigned)(v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
	return (e - HIST_SUB_BITS + 1) * HIST_SUB + sub;
}

/* The middle of bucket i's value range. */
static double hist_value(unsigned i)
{
	if (i < HIST_SUB)
		return i;
	unsigned e = i / HIST_SUB + HIST_SUB_BITS - 1, sub = i % HIST_SUB;
	double lo = (double)((uint64_t)(HIST_SUB + sub) << (e - HIST_SUB_BITS));
	return lo + (double)(1ull << (e - HIST_SUB_BITS)) / 2;
}

static void hist_add(struct bench_hist *h, uint64_t v)
{
	h->count[hist_index(v)]++;
	h->total++;
	if (v > h->max)
		h->max = v;
}

/* Value at quantile q (0..1]: the smallest bucket holding ceil(q * total). */
static double hist_quantile(const struct bench_hist *h, double q)
{
	uint64_t rank = (uint64_t)((double)h->total * q + 0.999999), seen = 0;

	if (rank < 1)
		rank = 1;
	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		seen += h->count[i];
		if (seen >= rank) {
			double v = hist_value(i);
			return v > (double)h->max ? (double)h->max : v;
		}
	}
	return (double)h->max;
}

static void bench_step(struct bench *b);

static void bench_fail(struct bench *b, int ret, const char *what)
{
	if (!b->failed) {
		b->failed = ret;
		cli_error("bench", "%s: %s", what, qsm_strerror(ret));
	}
}

static void bench_undrained_flush_cb(void *opaque, int ret)
{
	struct bench *b = opaque;

	b->flushes_pending--;
	if (ret < 0)
		bench_fail(b, ret, "Failed flush request");
}

static void bench_drained_flush_cb(void *opaque, int ret)
{
	struct bench *b = opaque;

	b->flushes_pending--;
	b->in_flush = false;
	if (ret < 0) {
		bench_fail(b, ret, "Failed flush request");
		return;
	}
	bench_step(b);
}

static void bench_req_cb(void *opaque, int ret)
{
	struct bench_slot *s = opaque;
	struct bench *b = s->b;

	hist_add(&b->hist, now_ns() - s->t_submit);
	s->next_free = b->free_slots;
	b->free_slots = s;
	if (ret < 0 || b->failed) {
		/* qemu-img exits here; we stop submitting and let the rest land. */
		b->in_flight--;
		if (ret < 0)
			bench_fail(b, ret, "Failed request");
		return;
	}

	/* qemu's bench_cb, the in_flight > 0 branch. */
	int remaining = b->n - b->in_flight;
	b->n--;
	b->in_flight--;
	if (b->n == 0)
		b->t_end = now_ns();
	if (b->flush_interval && remaining % b->flush_interval == 0) {
		if (!b->in_flight || !b->drain_on_flush) {
			int r;
			if (b->drain_on_flush) {
				b->in_flush = true;
				r = qsm_flush(b->img, bench_drained_flush_cb, b);
			} else {
				r = qsm_flush(b->img, bench_undrained_flush_cb, b);
			}
			if (r < 0) {
				b->in_flush = false;
				bench_fail(b, r, "Failed to issue flush request");
				return;
			}
			b->flushes_pending++;
		}
		if (b->drain_on_flush)
			return;
	}
	bench_step(b);
}

/* Submit until depth requests are in flight or none is left to submit. */
static void bench_step(struct bench *b)
{
	while (!b->failed && b->n > b->in_flight && b->in_flight < b->nrreq) {
		struct bench_slot *s = b->free_slots;
		uint64_t offset = b->offset;
		int r;

		b->free_slots = s->next_free;
		b->in_flight++;
		b->offset += b->step;
		b->offset = b->image_size ? b->offset % b->image_size : 0;
		s->t_submit = now_ns();
		if (b->write)
			r = qsm_writev(b->img, offset, &s->iov, 1, bench_req_cb, s);
		else
			r = qsm_readv(b->img, offset, &s->iov, 1, bench_req_cb, s);
		if (r < 0) {
			b->in_flight--;
			s->next_free = b->free_slots;
			b->free_slots = s;
			bench_fail(b, r, "Failed to issue request");
		}
	}
}

static void bench_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval]\n"
		"                 [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q]\n"
		"                 [-s buffer_size] [-S step_size] [-t cache] [-w] [-U]\n"
		"                 [--trace FILE] [--trace-text FILE] filename\n"
		"Run a simple sequential I/O benchmark on the image, as qemu-img bench does.\n"
		"\n"
		"  -c count           number of requests (default 75000)\n"
		"  -d depth           requests in flight (default 64)\n"
		"  -f fmt             image format (qcow2 only)\n"
		"  -i aio             AIO backend: threads or io_uring (native = io_uring)\n"
		"  -n                 native AIO, short for -i io_uring (needs -t none or directsync)\n"
		"  -o offset          offset of the first request (default 0)\n"
		"  -s buffer_size     bytes per request (default 4096)\n"
		"  -S step_size       offset step between requests, wrapping at the image end\n"
		"                     (default: buffer_size)\n"
		"  -t cache           cache mode: writeback (default), none, writethrough,\n"
		"                     directsync, unsafe\n"
		"  -w                 write test (default: read)\n"
		"  --pattern=N        byte the buffer is filled with (default 0)\n"
		"  --flush-interval=N write tests: flush every N requests (N >= depth)\n"
		"  --no-drain         don't wait for the queue to drain before each flush\n"
		"  -q                 print only the lines qemu-img bench prints\n"
		"  -U                 force share (accepted, no effect)\n"
		"  --trace FILE       write a timeline of every request, state by state, to FILE\n"
		"                     (Chrome Trace Event JSON: Perfetto, chrome://tracing)\n"
		"  --trace-text FILE  one line per request, state by state ('-': stderr)\n"
		"  -h, --help         display this help and exit\n"
		"\n"
		"After qemu-img's lines, qsm prints IOPS, throughput, latency percentiles\n"
		"(submit to completion) and the engine's counters.\n");
}

/* qemu_strtoi(s, NULL, 0, &v): whole string, base auto-detected, fits int. */
static int parse_int(const char *s, int *out)
{
	char *e;
	long v;

	errno = 0;
	v = strtol(s, &e, 0);
	if (e == s || *e || errno || v < INT_MIN || v > INT_MAX)
		return -EINVAL;
	*out = (int)v;
	return 0;
}

static void print_extras(const struct bench *b, double secs, int count)
{
	struct qsm_stats st;
	double iops = secs > 0 ? count / secs : 0;
	double mib = secs > 0 ? (double)count * (double)b->bufsize / secs / 1048576.0 : 0;
	const struct bench_hist *h = &b->hist;

	printf("Elapsed %.6f s, %.0f IOPS, %.2f MiB/s\n", secs, iops, mib);
	if (h->total)
		printf("Latency (usec): p50 %.1f, p90 %.1f, p99 %.1f, p99.9 %.1f, max %.1f\n",
		       hist_quantile(h, 0.50) / 1e3, hist_quantile(h, 0.90) / 1e3,
		       hist_quantile(h, 0.99) / 1e3, hist_quantile(h, 0.999) / 1e3,
		       (double)h->max / 1e3);
	qsm_get_stats(b->img, &st);
	printf("Engine: flushes issued %" PRIu64 ", metadata writes %" PRIu64
	       ", write-back batches %" PRIu64 ",\n"
	       "        requests frozen %" PRIu64 ", allocation waits %" PRIu64
	       ", L2 hits %" PRIu64 ", L2 misses %" PRIu64 ",\n"
	       "        clusters allocated %" PRIu64 ",\n"
	       "        refcount block hits %" PRIu64 ", misses %" PRIu64
	       ", evictions %" PRIu64 ", loads %" PRIu64 "\n",
	       st.io_flushes, st.meta_writes, st.wb_batches, st.frozen, st.alloc_waits,
	       st.l2_hits, st.l2_misses, st.clusters_allocated, st.refblock_hits,
	       st.refblock_misses, st.refblock_evictions, st.refblock_loads);
}

/*
 * The image to bench on a null device (QEMU's null-co, io/null.c): what
 * the engine and the loop cost with the storage taken away.  Named by
 * -f null-co (or null-aio) with the name null-co://, or --image-opts
 * driver=null-co,size=N,read-zeroes=on|off,latency-ns=N.  Returns 1 when
 * the command line does not name a null device, 0 with *img open (raw on
 * the device), or -errno with a message in err.
 */
static int bench_open_null(struct event_base *base, const char *fmt, const char *filename,
			   bool image_opts, const struct qsm_open_opts *oo, struct qsm_image **img,
			   char *err, size_t errlen)
{
	struct cli_opts o = { 0 };
	uint64_t size = QSM_IO_NULL_DEFAULT_SIZE, latency = 0;
	bool zeroes = false;
	struct qsm_io *nio;
	const char *drv = fmt;
	int r = 0;

	if (image_opts) {
		if (cli_opts_parse(&o, filename) < 0)
			return -ENOMEM;
		drv = cli_opts_get(&o, "driver");
	} else if (!fmt && (!strncmp(filename, "null-co:", 8) || !strncmp(filename, "null-aio:", 9))) {
		drv = "null-co";
	}
	if (!drv || (strcmp(drv, "null-co") && strcmp(drv, "null-aio"))) {
		cli_opts_free(&o);
		return 1;
	}
	if (!image_opts && strcmp(filename, "null-co://") && strcmp(filename, "null-aio://")) {
		snprintf(err, errlen, "The only allowed filename for this driver is '%s://'", drv);
		return -EINVAL;
	}
	for (int i = 0; i < o.n && r == 0; i++) {
		const char *k = o.v[i].key, *v = o.v[i].val;
		if (!strcmp(k, "driver") || !strcmp(k, "node-name"))
			continue;
		if (!strcmp(k, "size"))
			r = cli_parse_size(v, &size);
		else if (!strcmp(k, "read-zeroes"))
			r = cli_parse_bool(v, &zeroes);
		else if (!strcmp(k, "latency-ns"))
			r = cli_parse_size(v, &latency);
		else
			r = -EINVAL;
		if (r < 0)
			snprintf(err, errlen, "Block protocol '%s' doesn't support the option '%s' "
				 "with the value '%s'", drv, k, v);
	}
	cli_opts_free(&o);
	if (r < 0)
		return -EINVAL;
	struct qsm_open_opts no = *oo;
	no.format = "raw";
	if ((r = qsm_io_open_null(base, size, zeroes, latency, no.read_only ? QSM_IO_RDONLY : 0,
				  &nio)) < 0)
		return r;
	return qsm_open_io(base, nio, &no, img, err, errlen);
}

int cmd_bench(int argc, char **argv)
{
	enum { OPT_PATTERN = 256, OPT_FLUSH_INTERVAL, OPT_NO_DRAIN, OPT_TRACE, OPT_TRACE_TEXT };
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "flush-interval", required_argument, NULL, OPT_FLUSH_INTERVAL },
		{ "image-opts", no_argument, NULL, 'I' },
		{ "pattern", required_argument, NULL, OPT_PATTERN },
		{ "no-drain", no_argument, NULL, OPT_NO_DRAIN },
		{ "force-share", no_argument, NULL, 'U' },
		{ "trace", required_argument, NULL, OPT_TRACE },
		{ "trace-text", required_argument, NULL, OPT_TRACE_TEXT },
		{ NULL, 0, NULL, 0 },
	};
	struct qsm_open_opts oo = { .cache = QSM_CACHE_WRITEBACK };
	struct bench b = { .drain_on_flush = true };
	struct event_base *base = NULL;
	const char *fmt = NULL, *filename, *trace_path = NULL, *trace_text = NULL;
	struct qsm_tracer *tracer = NULL;
	int count = 75000, depth = 64, flush_interval = 0, pattern = 0, c, ret = 1;
	int64_t offset = 0, bufsize = 4096, step = 0;
	bool is_write = false, quiet = false, native = false, image_opts = false;
	char *buf = NULL, err[512] = "";
	uint64_t t0;

	optind = 0;
	while ((c = cli_getopt_long(argc, argv, ":hc:d:f:ni:o:qs:S:t:wU", lopt)) != -1) {
		switch (c) {
		case 'h':
			bench_usage(stdout);
			return 0;
		case ':':
			cli_error("bench", "option requires an argument -- '%s'", argv[optind - 1]);
			return 1;
		case '?':
			if (cli_as_qemu()) /* cli_getopt_long printed qemu-img's line */
				cli_help_hint("bench");
			else
				bench_usage(stderr);
			return 1;
		case 'c':
			if (parse_int(optarg, &count) < 0 || count < 0) {
				cli_error(NULL, "Invalid request count specified");
				return 1;
			}
			break;
		case 'd':
			if (parse_int(optarg, &depth) < 0 || depth <= 0) {
				cli_error(NULL, "Invalid queue depth specified");
				return 1;
			}
			break;
		case 'f':
			fmt = optarg;
			break;
		case 'n':
			native = true;
			oo.aio = "io_uring";
			break;
		case 'i':
			if (!strcmp(optarg, "native")) {
				native = true;
				oo.aio = "io_uring";
			} else if (!strcmp(optarg, "io_uring")) {
				oo.aio = "io_uring";
			} else if (!strcmp(optarg, "threads")) {
				oo.aio = "threads";
			} else {
				cli_error(NULL, "Invalid aio option: %s", optarg);
				return 1;
			}
			break;
		case 'o':
			if (cli_cvtnum(optarg, &offset) < 0) {
				cli_error(NULL, "Invalid offset specified");
				return 1;
			}
			break;
		case 'q':
			quiet = true;
			break;
		case 's':
			if (cli_cvtnum(optarg, &bufsize) < 0 || bufsize > INT_MAX) {
				cli_error(NULL, "Invalid buffer size specified");
				return 1;
			}
			break;
		case 'S':
			if (cli_cvtnum(optarg, &step) < 0 || step > INT_MAX) {
				cli_error(NULL, "Invalid step size specified");
				return 1;
			}
			break;
		case 't':
			if (qsm_cache_mode_parse(optarg, &oo.cache) < 0) {
				cli_error(NULL, "Invalid cache mode");
				return 1;
			}
			break;
		case 'w':
			is_write = true;
			break;
		case 'U':
			break;
		case 'I':
			image_opts = true;
			break;
		case OPT_PATTERN: {
			char *e;
			unsigned long v;
			errno = 0;
			v = strtoul(optarg, &e, 0);
			if (e == optarg || *e || errno || v > 0xff || optarg[0] == '-') {
				cli_error(NULL, "Invalid pattern byte specified");
				return 1;
			}
			pattern = (int)v;
			break;
		}
		case OPT_FLUSH_INTERVAL:
			if (parse_int(optarg, &flush_interval) < 0 || flush_interval < 0) {
				cli_error(NULL, "Invalid flush interval specified");
				return 1;
			}
			break;
		case OPT_NO_DRAIN:
			b.drain_on_flush = false;
			break;
		case OPT_TRACE_TEXT:
			trace_text = optarg;
			break;
		case OPT_TRACE:
			trace_path = optarg;
			break;
		}
	}
	if (optind != argc - 1) {
		cli_error(NULL, "Expecting one image file name");
		if (cli_as_qemu())
			cli_help_hint("bench");
		return 1;
	}
	filename = argv[optind];
	if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw") && strcmp(fmt, "null-co") &&
	    strcmp(fmt, "null-aio")) {
		cli_error(NULL, "Unknown driver '%s' (qsm opens qcow2, raw, null-co)", fmt);
		return 1;
	}
	if (flush_interval && flush_interval < depth) {
		cli_error(NULL, "Flush interval can't be smaller than depth");
		return 1;
	}
	if (!is_write && flush_interval) {
		cli_error(NULL, "--flush-interval is only available in write tests");
		return 1;
	}
	if (native && oo.cache != QSM_CACHE_NONE && oo.cache != QSM_CACHE_DIRECTSYNC) {
		cli_error(NULL, "Could not open '%s': aio=native was specified, but it requires "
			  "cache.direct=on, which was not specified.", filename);
		return 1;
	}
	oo.read_only = !is_write;

	base = event_base_new();
	if (!base) {
		cli_error("bench", "cannot create an event loop");
		return 1;
	}
	if (qsm_tracer_open("bench", trace_path, trace_text, filename, &tracer) < 0)
		goto out;
	if (fmt && !strcmp(fmt, "raw"))
		oo.format = "raw";
	oo.probe_format = !fmt; /* qemu-img bench without -f probes */
	int r = bench_open_null(base, fmt, filename, image_opts, &oo, &b.img, err, sizeof(err));
	if (r == 1)
		r = qsm_open(base, filename, &oo, &b.img, err, sizeof(err));
	if (r < 0) {
		b.img = NULL;
		cli_error(NULL, "Could not open '%s': %s", filename, err[0] ? err : qsm_strerror(r));
		goto out;
	}
	qsm_tracer_attach(tracer, b.img);
	cli_probed_warning(b.img, filename);
	{
		struct qsm_info info;
		qsm_get_info(b.img, &info);
		b.image_size = info.virtual_size;
	}
	b.bufsize = (uint64_t)bufsize;
	b.step = step ? (uint64_t)step : (uint64_t)bufsize;
	b.nrreq = depth;
	b.n = count;
	b.offset = (uint64_t)offset;
	b.write = is_write;
	b.flush_interval = flush_interval;

	printf("Sending %d %s requests, %d bytes each, %d in parallel "
	       "(starting at offset %" PRId64 ", step size %d)\n",
	       b.n, b.write ? "write" : "read", (int)b.bufsize, b.nrreq, offset, (int)b.step);
	if (flush_interval)
		printf("Sending flush every %d requests\n", flush_interval);
	fflush(stdout);

	/* One region per slot, as qemu-img does: depth * size bytes in all. */
	int nslots = depth < count ? depth : (count ? count : 1);
	size_t buflen = (size_t)nslots * (size_t)bufsize;
	if (posix_memalign((void **)&buf, BENCH_ALIGN, buflen ? buflen : BENCH_ALIGN) != 0 ||
	    !(b.slots = calloc((size_t)nslots, sizeof(*b.slots)))) {
		cli_error("bench", "out of memory for %d buffers of %" PRId64 " bytes", nslots, bufsize);
		goto out;
	}
	memset(buf, pattern, buflen);
	for (int i = nslots - 1; i >= 0; i--) {
		b.slots[i].b = &b;
		b.slots[i].iov.iov_base = buf + (size_t)i * (size_t)bufsize;
		b.slots[i].iov.iov_len = (size_t)bufsize;
		b.slots[i].next_free = b.free_slots;
		b.free_slots = &b.slots[i];
	}
	if (b.nrreq > nslots)
		b.nrreq = nslots;

	t0 = now_ns();
	b.t_end = t0;
	bench_step(&b);
	while (b.n > 0 && !b.failed)
		event_base_loop(base, EVLOOP_ONCE);
	/* Untimed: the tail flush, or what is still in flight after a failure
	 * (the image may not be closed with requests in flight). */
	while (b.in_flight > 0 || b.flushes_pending > 0)
		event_base_loop(base, EVLOOP_ONCE);
	if (b.failed)
		goto out;

	double secs = (double)(b.t_end - t0) / 1e9;
	printf("Run completed in %3.3f seconds.\n", secs);
	if (!quiet)
		print_extras(&b, secs, count);
	fflush(stdout);
	ret = 0;
out:
	if (b.img) {
		int cr = qsm_close(b.img);
		if (cr < 0 && ret == 0) {
			cli_error("bench", "closing %s: %s", filename, qsm_strerror(cr));
			ret = 1;
		}
	}
	if (qsm_tracer_close(tracer) < 0)
		ret = 1;
	free(b.slots);
	free(buf);
	if (base)
		event_base_free(base);
	return ret;
}
