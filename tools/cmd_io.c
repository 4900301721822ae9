/*
 * tools/cmd_io.c: `qsm io`, the qemu-io command language over libqsm.
 *
 *   qsm io [-f qcow2] [-r] [-n] [-t CACHE] [-i threads|io_uring] [-m] [-U]
 *          [--trace FILE] [--trace-text FILE] [-c CMD]... [FILE]
 *
 * Design: a script written for qemu-io 7.2 must run unchanged and print the
 * same stdout (timing numbers aside).  So this file copies qemu-io's
 * observable behaviour rather than its structure:
 *  - lines are split on single spaces (qemu's breakline: no quoting, tabs
 *    are not separators); each command parses its options with getopt()
 *    with argv[0] = the command name, so option errors read the same;
 *  - numbers go through cli_cvtnum() (qemu's cvtnum), and parse errors,
 *    usage lines, "read failed: ..." and pattern messages go to stdout,
 *    while "command not found", argument-count and open/permission errors
 *    go to stderr, as qemu-io does;
 *  - a request outside the image fails with EIO before reaching the engine
 *    (qemu's blk_check_byte_request), so the message does not depend on how
 *    the engine words its own EINVAL;
 *  - the default cache mode is writethrough, as in qemu-io (-n and -t
 *    change it);
 *  - the exit status is 1 if the image could not be opened or any command
 *    failed (aio requests count as successful once submitted), else 0;
 *  - `help` texts are qemu-io's, word for word (even where they name qemu
 *    internals), except for open/reopen whose options differ.
 *
 * Requests: synchronous commands use qsm_sync_* or submit and run the loop
 * until their own callback fired (io_wait); other requests' completions (aio_read,
 * aio_write) are printed whenever the loop runs, as in qemu-io.  Buffers
 * are 4096-aligned (posix_memalign) so cache=none works; -m misaligns
 * them by 16 bytes on purpose.
 *
 * Not supported by the engine API, and refused with ENOTSUP: truncate -m
 * other than off, shrinking over allocated clusters,
 * break/resume/wait_break.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <ctype.h>

#include <event2/event.h>

#include "io/null.h"
#include "io/qsm_io.h"
#include "io/util.h"
#include "sm/qsm.h"
#include "tools/cli.h"
#include "tools/json.h"
#include "io/blkdebug.h"
#include "tools/trace.h"

#define IO_PROMPT "qemu-io> "
#define IO_MAX_BYTES 2147483136LL /* BDRV_REQUEST_MAX_BYTES: INT_MAX, 512-aligned */
#define IO_ALIGN 4096
#define IO_MISALIGN 16
#define NOT_DONE INT_MAX

struct io_ctx {
	struct event_base *base;
	struct qsm_image *img;
	char *path;                  /* of the open image */
	struct qsm_open_opts oo;     /* how it was opened */
	int inflight;                /* aio requests not completed yet */
	bool misalign;               /* -m */
	bool quit;                   /* `quit` ran */
	struct qsm_tracer *tracer;   /* --trace/--trace-text, or NULL */
	char last_err[256];          /* qsm_image_error() last shown */
	/* discard=ignore|off (QEMU: no BDRV_O_UNMAP): discards succeed doing
	 * nothing and write -z -u does not unmap; qemu-io's default is unmap. */
	bool discard_ignore;
	/* The image is a null-co / null-aio device (io/null.c), named by its
	 * driver (what `info` says) and opened with these settings, which a
	 * reopen keeps (QEMU: "Cannot change the option 'size'"). */
	struct io_null_cfg {
		const char *driver;  /* "null-co", "null-aio" (static), or NULL: not null */
		uint64_t size, latency_ns;
		bool read_zeroes;
		bool under_raw;      /* driver=raw over it: `info` says raw */
	} null;
	bool reopening;              /* reopen_f: an open keeps io->null's settings */
	bool snap_next;              /* -s: the next open puts a temporary overlay on top */
	bool cor_next;               /* -C: the next open copies on read */
	/* How the open image copies on read: 0 not, COR_FLAG (-C, QEMU's
	 * BDRV_O_COPY_ON_READ) or COR_FILTER (driver=copy-on-read). */
	int cor;
	char *snap_tmp;              /* that overlay's file while open (removed at close) */
	/* The blkdebug handle the image was opened on (blkdebug: names,
	 * driver=blkdebug), for break/resume; NULL otherwise.  Owned by img. */
	struct qsm_io *bdio;
};

#define COR_FLAG   1
#define COR_FILTER 2

#define CMD_NOFILE_OK 0x1 /* runs without an open image */
#define CMD_GLOBAL    0x2 /* no checks at all (help, quit) */
#define CMD_WRITE     0x4 /* needs a writable image */

struct io_cmd {
	const char *name, *altname;
	int (*fn)(struct io_ctx *io, int argc, char **argv);
	int argmin, argmax;          /* -1: no limit */
	unsigned flags;
	const char *args;            /* NULL: none shown */
	const char *oneline;
	const char *help;            /* extended help, or NULL */
};

static const struct io_cmd *find_cmd(const char *name);
static void help_all(void);

/* --- Small helpers, each a piece of qemu-io ------------------------------ */

static void print_cvtnum_err(int rc, const char *arg)
{
	if (rc == -EINVAL)
		printf("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n",
		       arg);
	else if (rc == -ERANGE)
		printf("Parsing error: argument too large -- %s\n", arg);
	else
		printf("Parsing error: %s\n", arg);
}

static int parse_pattern(const char *arg)
{
	char *end = NULL;
	long p = strtol(arg, &end, 0);

	if (p < 0 || p > UCHAR_MAX || *end != '\0') {
		printf("%s is not a valid pattern byte\n", arg);
		return -1;
	}
	return (int)p;
}

static void usage_line(const struct io_cmd *c)
{
	printf("%s %s -- %s\n", c->name, c->args ? c->args : "", c->oneline);
}

static void *io_alloc(struct io_ctx *io, size_t len, int pattern)
{
	size_t extra = io->misalign ? IO_MISALIGN : 0;
	void *p;

	if (posix_memalign(&p, IO_ALIGN, QSM_MAX(len + extra, 1)))
		return NULL;
	memset(p, pattern, len + extra);
	return (char *)p + extra;
}

static void io_free(struct io_ctx *io, void *p);

/* qemu-io's qemu_io_alloc_from_file: the buffer filled with the file's
 * first len bytes, repeated when the file is shorter.  NULL after printing
 * why. */
static void *io_alloc_from_file(struct io_ctx *io, size_t len, const char *path)
{
	char *buf = io_alloc(io, len, 0);
	FILE *f = fopen(path, "r");
	size_t n = 0;

	if (!f) {
		perror(path);
		goto fail;
	}
	if (!buf) {
		printf("write failed: %s\n", strerror(ENOMEM));
		goto fail;
	}
	n = fread(buf, 1, len, f);
	if (ferror(f)) {
		printf("%s: I/O error\n", path);
		goto fail;
	}
	if (n == 0 && len) {
		printf("%s: file is empty\n", path);
		goto fail;
	}
	for (size_t x = n; x < len; x += n)
		memcpy(buf + x, buf, QSM_MIN(n, len - x));
	fclose(f);
	return buf;
fail:
	if (f)
		fclose(f);
	io_free(io, buf);
	return NULL;
}

static void io_free(struct io_ctx *io, void *p)
{
	if (p)
		free((char *)p - (io->misalign ? IO_MISALIGN : 0));
}

static void dump_buffer(const void *buffer, int64_t offset, int64_t len)
{
	const uint8_t *p = buffer;

	for (int64_t i = 0; i < len; i += 16) {
		const uint8_t *s = p;
		int j;
		printf("%08" PRIx64 ":  ", (uint64_t)(offset + i));
		for (j = 0; j < 16 && i + j < len; j++, p++)
			printf("%02x ", *p);
		printf(" ");
		for (j = 0; j < 16 && i + j < len; j++, s++)
			putchar(isalnum(*s) ? *s : '.');
		printf("\n");
	}
}

static double tdiv(double v, struct timespec t)
{
	return v / ((double)t.tv_sec + (double)t.tv_nsec / 1e9);
}

static struct timespec tnow(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t;
}

static struct timespec tsub(struct timespec a, struct timespec b)
{
	a.tv_nsec -= b.tv_nsec;
	if (a.tv_nsec < 0) {
		a.tv_nsec += 1000000000;
		a.tv_sec--;
	}
	a.tv_sec -= b.tv_sec;
	return a;
}

static void timestr(struct timespec t, char *ts, size_t size, bool verbose)
{
	double frac = (double)t.tv_nsec / 1e9;
	unsigned h = (unsigned)(t.tv_sec / 3600), m = (unsigned)(t.tv_sec % 3600 / 60);
	double s = (double)(t.tv_sec % 60) + frac;

	if (verbose || t.tv_sec)
		snprintf(ts, size, "%u:%02u:%05.2f", h, m, s);
	else
		snprintf(ts, size, "%05.2f sec", frac);
}

/* The two lines after every successful request (or one with -C). */
static void print_report(const char *op, struct timespec t, int64_t offset, int64_t count,
			 int64_t total, int cnt, bool Cflag)
{
	char s1[64], s2[64], ts[64];

	timestr(t, ts, sizeof(ts), Cflag);
	if (!Cflag) {
		cli_cvtstr((double)total, s1, sizeof(s1));
		cli_cvtstr(tdiv((double)total, t), s2, sizeof(s2));
		printf("%s %" PRId64 "/%" PRId64 " bytes at offset %" PRId64 "\n", op, total, count,
		       offset);
		printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, cnt, ts, s2,
		       tdiv((double)cnt, t));
	} else {
		printf("%" PRId64 ",%d,%s,%.3f,%.3f\n", total, cnt, ts, tdiv((double)total, t),
		       tdiv((double)cnt, t));
	}
}

static uint64_t image_size(struct io_ctx *io)
{
	struct qsm_info info;

	qsm_get_info(io->img, &info);
	return info.virtual_size;
}

/* qemu's blk_check_byte_request(): EIO outside the image. */
static int check_range(struct io_ctx *io, int64_t offset, int64_t bytes)
{
	uint64_t size = image_size(io);

	if (offset < 0 || bytes < 0 || (uint64_t)offset > size || size - (uint64_t)offset < (uint64_t)bytes)
		return -EIO;
	return 0;
}

static void done_cb(void *opaque, int ret)
{
	*(int *)opaque = ret;
}

/* Run the loop until *ret is set by done_cb.  Other requests' callbacks
 * (aio_*) run meanwhile, as they would in qemu-io. */
static int io_wait(struct io_ctx *io, int *ret)
{
	while (*ret == NOT_DONE) {
		int r = event_base_loop(io->base, EVLOOP_ONCE);
		if (r < 0 || (r == 1 && *ret == NOT_DONE)) {
			cli_error("io", "event loop has nothing left to wait for, "
				  "but a request did not complete");
			return -EIO;
		}
	}
	return *ret;
}

static void io_drain(struct io_ctx *io)
{
	while (io->inflight > 0) {
		int r = event_base_loop(io->base, EVLOOP_ONCE);
		if (r < 0 || (r == 1 && io->inflight > 0)) {
			cli_error("io", "%d aio request(s) never completed", io->inflight);
			return;
		}
	}
}

static int do_readv(struct io_ctx *io, int64_t offset, struct iovec *iov, int iovcnt)
{
	int ret = NOT_DONE;
	int r = check_range(io, offset, (int64_t)qsm_iov_size(iov, iovcnt));

	if (r < 0 || qsm_iov_size(iov, iovcnt) == 0)
		return r;
	r = qsm_readv(io->img, (uint64_t)offset, iov, iovcnt, done_cb, &ret);
	return r < 0 ? r : io_wait(io, &ret);
}

static int do_writev(struct io_ctx *io, int64_t offset, struct iovec *iov, int iovcnt, bool fua)
{
	int ret = NOT_DONE;
	int r = check_range(io, offset, (int64_t)qsm_iov_size(iov, iovcnt));

	if (r < 0 || qsm_iov_size(iov, iovcnt) == 0)
		return r;
	/* -f: the engine's FUA (QSM_REQ_FUA): durable when it completes, by
	 * a sync of its own batch, not a flush of everything dirty. */
	r = qsm_writev_flags(io->img, (uint64_t)offset, iov, iovcnt, fua ? QSM_REQ_FUA : 0, done_cb,
			     &ret);
	return r < 0 ? r : io_wait(io, &ret);
}

/* QEMU's BDRV_MAX_LENGTH: no request reaches past it (EIO). */
#define IO_MAX_LENGTH (((uint64_t)INT64_MAX >> 30) << 30)

/* read -b / write -b: the VM-state area (qemu-io's blk_load_vmstate and
 * blk_save_vmstate), at offset past the image's vm state offset.  Not
 * bounded by the virtual size: a request past BDRV_MAX_LENGTH fails with
 * EIO here, as QEMU's qcow2_check_vmstate_request; the engine refuses
 * writes past the largest L1 table (EFBIG) and raw images (ENOTSUP, as
 * QEMU's file driver, which has no VM state). */
static int do_vmstate(struct io_ctx *io, int64_t offset, struct iovec *iov, int iovcnt,
		      bool write)
{
	uint64_t base = qsm_vmstate_offset(io->img), len = qsm_iov_size(iov, iovcnt);
	int ret = NOT_DONE;
	int r;

	if (offset < 0 || (uint64_t)offset > IO_MAX_LENGTH - len ||
	    base > IO_MAX_LENGTH - len - (uint64_t)offset)
		return -EIO;
	r = write ? qsm_vmstate_writev(io->img, (uint64_t)offset, iov, iovcnt, done_cb, &ret)
		  : qsm_vmstate_readv(io->img, (uint64_t)offset, iov, iovcnt, done_cb, &ret);
	return r < 0 ? r : io_wait(io, &ret);
}

/* Allocation status of [offset, offset+bytes): 1 allocated, 0 not, *pnum the
 * run length (0 at or past the end of the image), or a negative errno. */
static int is_allocated(struct io_ctx *io, int64_t offset, int64_t bytes, int64_t *pnum)
{
	uint64_t size = image_size(io);
	struct qsm_extent e;
	int r;

	*pnum = 0;
	if (bytes <= 0 || (uint64_t)offset >= size)
		return 0;
	bytes = (int64_t)QSM_MIN((uint64_t)bytes, size - (uint64_t)offset);
	r = qsm_sync_block_status(io->img, (uint64_t)offset, (uint64_t)bytes, &e);
	if (r < 0)
		return r;
	*pnum = (int64_t)QSM_MIN(e.length, (uint64_t)bytes);
	/* QEMU's null-co reports neither data nor zeros unless read-zeroes:
	 * not allocated. */
	if (io->null.driver && !io->null.read_zeroes)
		return 0;
	return !!(e.flags & QSM_STATUS_ALLOCATED);
}

/* Lengths for readv/writev/aio_*: one buffer, split into an iovec. */
static void *create_iovec(struct io_ctx *io, struct iovec **piov, char **argv, int nr, int pattern,
			  size_t *total)
{
	struct iovec *iov = calloc((size_t)nr, sizeof(*iov));
	size_t count = 0;
	char *buf = NULL, *p;

	if (!iov)
		return NULL;
	for (int i = 0; i < nr; i++) {
		int64_t len;
		int r = cli_cvtnum(argv[i], &len);
		if (r < 0) {
			print_cvtnum_err(r, argv[i]);
			goto fail;
		}
		if (len > IO_MAX_BYTES) {
			printf("Argument '%s' exceeds maximum size %" PRIu64 "\n", argv[i],
			       (uint64_t)IO_MAX_BYTES);
			goto fail;
		}
		if (count > (size_t)(IO_MAX_BYTES - len)) {
			printf("The total number of bytes exceed the maximum size %" PRIu64 "\n",
			       (uint64_t)IO_MAX_BYTES);
			goto fail;
		}
		iov[i].iov_len = (size_t)len;
		count += (size_t)len;
	}
	buf = p = io_alloc(io, count, pattern);
	if (!buf)
		goto fail;
	for (int i = 0; i < nr; i++) {
		iov[i].iov_base = p;
		p += iov[i].iov_len;
	}
	*piov = iov;
	*total = count;
	return buf;
fail:
	free(iov);
	return NULL;
}

/* --- read / readv / write / writev --------------------------------------- */

static int read_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("read");
	bool Cflag = false, qflag = false, vflag = false, Pflag = false, sflag = false,
	     lflag = false, bflag = false;
	int64_t offset, count, poff = 0, pcount = 0;
	int c, r, pattern = 0;
	char *buf;

	while ((c = getopt(argc, argv, "bCl:pP:qs:v")) != -1) {
		switch (c) {
		case 'b':
			bflag = true;
			break;
		case 'C':
			Cflag = true;
			break;
		case 'l':
			lflag = true;
			if ((r = cli_cvtnum(optarg, &pcount)) < 0) {
				print_cvtnum_err(r, optarg);
				return r;
			}
			break;
		case 'p':
			break;
		case 'P':
			Pflag = true;
			if ((pattern = parse_pattern(optarg)) < 0)
				return -EINVAL;
			break;
		case 'q':
			qflag = true;
			break;
		case 's':
			sflag = true;
			if ((r = cli_cvtnum(optarg, &poff)) < 0) {
				print_cvtnum_err(r, optarg);
				return r;
			}
			break;
		case 'v':
			vflag = true;
			break;
		default:
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind != argc - 2) {
		usage_line(self);
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	}
	optind++;
	if ((r = cli_cvtnum(argv[optind], &count)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	} else if (count > IO_MAX_BYTES) {
		printf("length cannot exceed %" PRIu64 ", given %s\n", (uint64_t)IO_MAX_BYTES,
		       argv[optind]);
		return -EINVAL;
	}
	if (!Pflag && (lflag || sflag)) {
		usage_line(self);
		return -EINVAL;
	}
	if (!lflag)
		pcount = count - poff;
	if (pcount < 0 || pcount + poff > count) {
		printf("pattern verification range exceeds end of read data\n");
		return -EINVAL;
	}
	if (bflag) {
		if (!QSM_IS_ALIGNED((uint64_t)offset, 512)) {
			printf("%" PRId64 " is not a sector-aligned value for 'offset'\n", offset);
			return -EINVAL;
		}
		if (!QSM_IS_ALIGNED((uint64_t)count, 512)) {
			printf("%" PRId64 " is not a sector-aligned value for 'count'\n", count);
			return -EINVAL;
		}
	}
	buf = io_alloc(io, (size_t)count, 0xab);
	if (!buf) {
		printf("read failed: %s\n", strerror(ENOMEM));
		return -ENOMEM;
	}
	struct iovec iov = { buf, (size_t)count };
	struct timespec t1 = tnow();
	r = bflag ? do_vmstate(io, offset, &iov, 1, false) : do_readv(io, offset, &iov, 1);
	struct timespec t2 = tnow();
	if (r < 0) {
		printf("read failed: %s\n", strerror(-r));
		goto out;
	}
	if (Pflag) {
		for (int64_t i = 0; i < pcount; i++) {
			if ((uint8_t)buf[poff + i] != pattern) {
				printf("Pattern verification failed at offset %" PRId64 ", %" PRId64
				       " bytes\n", offset + poff, pcount);
				r = -EINVAL;
				break;
			}
		}
	}
	if (qflag)
		goto out;
	if (vflag)
		dump_buffer(buf, offset, count);
	print_report("read", tsub(t2, t1), offset, count, count, 1, Cflag);
out:
	io_free(io, buf);
	return r;
}

static int readv_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("readv");
	bool Cflag = false, qflag = false, vflag = false, Pflag = false;
	int c, r, pattern = 0;
	int64_t offset;
	struct iovec *iov = NULL;
	size_t total;
	char *buf;

	while ((c = getopt(argc, argv, "CP:qv")) != -1) {
		switch (c) {
		case 'C':
			Cflag = true;
			break;
		case 'P':
			Pflag = true;
			if ((pattern = parse_pattern(optarg)) < 0)
				return -EINVAL;
			break;
		case 'q':
			qflag = true;
			break;
		case 'v':
			vflag = true;
			break;
		default:
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind > argc - 2) {
		usage_line(self);
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	}
	optind++;
	buf = create_iovec(io, &iov, &argv[optind], argc - optind, 0xab, &total);
	if (!buf)
		return -EINVAL;
	struct timespec t1 = tnow();
	r = do_readv(io, offset, iov, argc - optind);
	struct timespec t2 = tnow();
	if (r < 0) {
		printf("readv failed: %s\n", strerror(-r));
		goto out;
	}
	if (Pflag) {
		for (size_t i = 0; i < total; i++) {
			if ((uint8_t)buf[i] != pattern) {
				printf("Pattern verification failed at offset %" PRId64 ", %zu bytes\n",
				       offset, total);
				r = -EINVAL;
				break;
			}
		}
	}
	if (qflag)
		goto out;
	if (vflag)
		dump_buffer(buf, offset, (int64_t)total);
	print_report("read", tsub(t2, t1), offset, (int64_t)total, (int64_t)total, 1, Cflag);
out:
	free(iov);
	io_free(io, buf);
	return r;
}

static int write_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("write");
	bool Cflag = false, qflag = false, bflag = false, Pflag = false, zflag = false,
	     cflag = false, sflag = false, fua = false, unmap = false, nofallback = false;
	const char *sfile = NULL;
	int c, r, pattern = 0xcd;
	int64_t offset, count;
	char *buf = NULL;

	while ((c = getopt(argc, argv, "bcCfnpP:qs:uz")) != -1) {
		switch (c) {
		case 'b':
			bflag = true;
			break;
		case 'c':
			cflag = true;
			break;
		case 'C':
			Cflag = true;
			break;
		case 'f':
			fua = true;
			break;
		case 'n':
			nofallback = true;
			break;
		case 'p':
			break;
		case 'P':
			Pflag = true;
			if ((pattern = parse_pattern(optarg)) < 0)
				return -EINVAL;
			break;
		case 'q':
			qflag = true;
			break;
		case 's':
			sflag = true;
			sfile = optarg;
			break;
		case 'u':
			unmap = true;
			break;
		case 'z':
			zflag = true;
			break;
		default:
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind != argc - 2) {
		usage_line(self);
		return -EINVAL;
	}
	if (bflag && zflag) {
		printf("-b and -z cannot be specified at the same time\n");
		return -EINVAL;
	}
	if (fua && (bflag || cflag)) {
		printf("-f and -b or -c cannot be specified at the same time\n");
		return -EINVAL;
	}
	if (nofallback && !zflag) {
		printf("-n requires -z to be specified\n");
		return -EINVAL;
	}
	if (unmap && !zflag) {
		printf("-u requires -z to be specified\n");
		return -EINVAL;
	}
	if (zflag + Pflag + sflag > 1) {
		printf("Only one of -z, -P, and -s can be specified at the same time\n");
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	}
	optind++;
	if ((r = cli_cvtnum(argv[optind], &count)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	} else if (count > IO_MAX_BYTES && !nofallback) {
		printf("length cannot exceed %" PRIu64 " without -n, given %s\n",
		       (uint64_t)IO_MAX_BYTES, argv[optind]);
		return -EINVAL;
	}
	if (bflag || cflag) {
		if (!QSM_IS_ALIGNED((uint64_t)offset, 512)) {
			printf("%" PRId64 " is not a sector-aligned value for 'offset'\n", offset);
			return -EINVAL;
		}
		if (!QSM_IS_ALIGNED((uint64_t)count, 512)) {
			printf("%" PRId64 " is not a sector-aligned value for 'count'\n", count);
			return -EINVAL;
		}
	}
	if (sflag && !(buf = io_alloc_from_file(io, (size_t)count, sfile)))
		return -EINVAL;
	if (!zflag && !sflag && !(buf = io_alloc(io, (size_t)count, pattern))) {
		printf("write failed: %s\n", strerror(ENOMEM));
		return -ENOMEM;
	}

	struct timespec t1 = tnow();
	if (bflag) {
		struct iovec iov = { buf, (size_t)count };
		r = do_vmstate(io, offset, &iov, 1, true);
	} else if (zflag) {
		r = check_range(io, offset, count);
		if (r == 0 && count > 0)
			r = qsm_sync_write_zeroes(io->img, (uint64_t)offset, (uint64_t)count,
						  (unmap && !io->discard_ignore ? QSM_ZERO_MAY_UNMAP : 0) |
						  (fua ? QSM_ZERO_FUA : 0));
	} else if (cflag) {
		/* qemu-io's blk_pwrite_compressed: whole clusters (or up to the
		 * end of the disk), else EINVAL from the engine. */
		struct iovec iov = { buf, (size_t)count };
		int ret = NOT_DONE;
		r = check_range(io, offset, count);
		if (r == 0 && count > 0) {
			r = qsm_write_compressed(io->img, (uint64_t)offset, &iov, 1, done_cb, &ret);
			r = r < 0 ? r : io_wait(io, &ret);
		}
	} else {
		struct iovec iov = { buf, (size_t)count };
		r = do_writev(io, offset, &iov, 1, fua);
	}
	struct timespec t2 = tnow();
	if (r < 0) {
		printf("write failed: %s\n", strerror(-r));
		goto out;
	}
	if (!qflag)
		print_report("wrote", tsub(t2, t1), offset, count, count, 1, Cflag);
out:
	io_free(io, buf);
	return r;
}

static int writev_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("writev");
	bool Cflag = false, qflag = false, fua = false;
	int c, r, pattern = 0xcd;
	int64_t offset;
	struct iovec *iov = NULL;
	size_t total;
	char *buf;

	while ((c = getopt(argc, argv, "CfqP:")) != -1) {
		switch (c) {
		case 'C':
			Cflag = true;
			break;
		case 'f':
			fua = true;
			break;
		case 'q':
			qflag = true;
			break;
		case 'P':
			if ((pattern = parse_pattern(optarg)) < 0)
				return -EINVAL;
			break;
		default:
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind > argc - 2) {
		usage_line(self);
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	}
	optind++;
	buf = create_iovec(io, &iov, &argv[optind], argc - optind, pattern, &total);
	if (!buf)
		return -EINVAL;
	struct timespec t1 = tnow();
	r = do_writev(io, offset, iov, argc - optind, fua);
	struct timespec t2 = tnow();
	if (r < 0) {
		printf("writev failed: %s\n", strerror(-r));
		goto out;
	}
	if (!qflag)
		print_report("wrote", tsub(t2, t1), offset, (int64_t)total, (int64_t)total, 1, Cflag);
out:
	free(iov);
	io_free(io, buf);
	return r;
}

/* --- aio_read / aio_write / aio_flush ------------------------------------ */

/* One asynchronous request; freed by its completion. */
struct aio_req {
	struct io_ctx *io;
	struct iovec *iov;
	int iovcnt;
	char *buf;
	size_t size;
	int64_t offset;
	bool qflag, vflag, Cflag, Pflag, zflag, fua;
	int pattern;
	struct timespec t1;
};

static void aio_req_free(struct aio_req *a)
{
	a->io->inflight--;
	free(a->iov);
	io_free(a->io, a->buf);
	free(a);
}

static void aio_write_done(void *opaque, int ret)
{
	struct aio_req *a = opaque;
	struct timespec t2 = tnow();

	if (ret < 0)
		printf("aio_write failed: %s\n", strerror(-ret));
	else if (!a->qflag)
		print_report("wrote", tsub(t2, a->t1), a->offset, (int64_t)a->size,
			     (int64_t)a->size, 1, a->Cflag);
	aio_req_free(a);
}

static void aio_read_done(void *opaque, int ret)
{
	struct aio_req *a = opaque;
	struct timespec t2 = tnow();

	if (ret < 0) {
		printf("readv failed: %s\n", strerror(-ret));
		goto out;
	}
	if (a->Pflag) {
		for (size_t i = 0; i < a->size; i++) {
			if ((uint8_t)a->buf[i] != a->pattern) {
				printf("Pattern verification failed at offset %" PRId64 ", %zu bytes\n",
				       a->offset, a->size);
				break;
			}
		}
	}
	if (a->qflag)
		goto out;
	if (a->vflag)
		dump_buffer(a->buf, a->offset, (int64_t)a->size);
	print_report("read", tsub(t2, a->t1), a->offset, (int64_t)a->size, (int64_t)a->size, 1,
		     a->Cflag);
out:
	aio_req_free(a);
}

/* Zero-length or out-of-range requests never reach the engine (and a
 * refused submit never runs its callback); complete them from the loop
 * like any other so that their messages come out the same way. */
struct aio_later {
	struct aio_req *a;
	qsm_cb cb;
	int ret;
};

static void aio_later_cb(evutil_socket_t fd, short what, void *opaque)
{
	struct aio_later *l = opaque;

	l->cb(l->a, l->ret);
	free(l);
}

static void aio_complete_later(struct aio_req *a, qsm_cb cb, int ret)
{
	struct aio_later *l = malloc(sizeof(*l));
	struct timeval tv = { 0, 0 };

	if (!l) {
		cb(a, ret);
		return;
	}
	l->a = a;
	l->cb = cb;
	l->ret = ret;
	if (event_base_once(a->io->base, -1, EV_TIMEOUT, aio_later_cb, l, &tv) < 0) {
		free(l);
		cb(a, ret);
	}
}

static int aio_submit(struct aio_req *a, bool write, unsigned zflags)
{
	struct io_ctx *io = a->io;
	int r = check_range(io, a->offset, (int64_t)a->size);
	qsm_cb cb = write ? aio_write_done : aio_read_done;

	io->inflight++;
	a->t1 = tnow();
	if (r < 0 || a->size == 0) {
		aio_complete_later(a, cb, r);
		return 0;
	}
	/* -f: the request itself is FUA (QSM_REQ_FUA, QSM_ZERO_FUA). */
	if (a->zflag)
		r = qsm_write_zeroes(io->img, (uint64_t)a->offset, a->size,
				     zflags | (a->fua ? QSM_ZERO_FUA : 0), cb, a);
	else if (write)
		r = qsm_writev_flags(io->img, (uint64_t)a->offset, a->iov, a->iovcnt,
				     a->fua ? QSM_REQ_FUA : 0, cb, a);
	else
		r = qsm_readv(io->img, (uint64_t)a->offset, a->iov, a->iovcnt, cb, a);
	if (r < 0)
		aio_complete_later(a, cb, r);
	return 0;
}

static int aio_read_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("aio_read");
	struct aio_req *a = calloc(1, sizeof(*a));
	int c, r;

	if (!a)
		return -ENOMEM;
	a->io = io;
	while ((c = getopt(argc, argv, "CP:iqv")) != -1) {
		switch (c) {
		case 'C':
			a->Cflag = true;
			break;
		case 'P':
			a->Pflag = true;
			if ((a->pattern = parse_pattern(optarg)) < 0) {
				free(a);
				return -EINVAL;
			}
			break;
		case 'i':
			printf("injecting invalid read request\n");
			free(a);
			return 0;
		case 'q':
			a->qflag = true;
			break;
		case 'v':
			a->vflag = true;
			break;
		default:
			free(a);
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind > argc - 2) {
		free(a);
		usage_line(self);
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &a->offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		free(a);
		return r;
	}
	optind++;
	a->iovcnt = argc - optind;
	a->buf = create_iovec(io, &a->iov, &argv[optind], a->iovcnt, 0xab, &a->size);
	if (!a->buf) {
		free(a);
		return -EINVAL;
	}
	return aio_submit(a, false, 0);
}

static int aio_write_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("aio_write");
	struct aio_req *a = calloc(1, sizeof(*a));
	int c, r, pattern = 0xcd;
	bool unmap = false;

	if (!a)
		return -ENOMEM;
	a->io = io;
	while ((c = getopt(argc, argv, "CfiqP:uz")) != -1) {
		switch (c) {
		case 'C':
			a->Cflag = true;
			break;
		case 'f':
			a->fua = true;
			break;
		case 'q':
			a->qflag = true;
			break;
		case 'u':
			unmap = true;
			break;
		case 'P':
			if ((pattern = parse_pattern(optarg)) < 0) {
				free(a);
				return -EINVAL;
			}
			break;
		case 'i':
			printf("injecting invalid write request\n");
			free(a);
			return 0;
		case 'z':
			a->zflag = true;
			break;
		default:
			free(a);
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind > argc - 2) {
		free(a);
		usage_line(self);
		return -EINVAL;
	}
	if (a->zflag && optind != argc - 2) {
		printf("-z supports only a single length parameter\n");
		free(a);
		return -EINVAL;
	}
	if (unmap && !a->zflag) {
		printf("-u requires -z to be specified\n");
		free(a);
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &a->offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		free(a);
		return r;
	}
	optind++;
	if (a->zflag) {
		int64_t count;
		if ((r = cli_cvtnum(argv[optind], &count)) < 0) {
			print_cvtnum_err(r, argv[optind]);
			free(a);
			return r;
		}
		a->size = (size_t)count;
	} else {
		a->iovcnt = argc - optind;
		a->buf = create_iovec(io, &a->iov, &argv[optind], a->iovcnt, pattern, &a->size);
		if (!a->buf) {
			free(a);
			return -EINVAL;
		}
	}
	return aio_submit(a, true, unmap && !io->discard_ignore ? QSM_ZERO_MAY_UNMAP : 0);
}

static int aio_flush_f(struct io_ctx *io, int argc, char **argv)
{
	io_drain(io);
	return 0;
}

/* --- flush, discard, truncate, length, info, alloc, map ------------------ */

static int flush_f(struct io_ctx *io, int argc, char **argv)
{
	int r = qsm_sync_flush(io->img);

	/* qemu-io prints nothing on stdout here; say why on stderr. */
	if (r < 0)
		cli_error("io", "flush failed: %s", strerror(-r));
	return r;
}

static int discard_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("discard");
	bool Cflag = false, qflag = false;
	int64_t offset, bytes;
	int c, r;

	while ((c = getopt(argc, argv, "Cq")) != -1) {
		switch (c) {
		case 'C':
			Cflag = true;
			break;
		case 'q':
			qflag = true;
			break;
		default:
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind != argc - 2) {
		usage_line(self);
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	}
	optind++;
	if ((r = cli_cvtnum(argv[optind], &bytes)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	} else if (bytes > IO_MAX_BYTES) {
		printf("length cannot exceed %" PRIu64 ", given %s\n", (uint64_t)IO_MAX_BYTES,
		       argv[optind]);
		return -EINVAL;
	}
	struct timespec t1 = tnow();
	r = check_range(io, offset, bytes);
	if (r == 0 && bytes > 0 && !io->discard_ignore)
		r = qsm_sync_discard(io->img, (uint64_t)offset, (uint64_t)bytes);
	struct timespec t2 = tnow();
	if (r < 0) {
		printf("discard failed: %s\n", strerror(-r));
		return r;
	}
	if (!qflag)
		print_report("discard", tsub(t2, t1), offset, bytes, bytes, 1, Cflag);
	return 0;
}

static int truncate_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("truncate");
	int64_t offset;
	int c, r;

	while ((c = getopt(argc, argv, "m:")) != -1) {
		switch (c) {
		case 'm':
			if (strcmp(optarg, "off")) {
				cli_error("io", "Invalid preallocation mode '%s'", optarg);
				return -EINVAL;
			}
			break;
		default:
			usage_line(self);
			return -EINVAL;
		}
	}
	if (optind != argc - 1) {
		usage_line(self);
		return -EINVAL;
	}
	if ((r = cli_cvtnum(argv[optind], &offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return r;
	}
	if ((uint64_t)offset == image_size(io))
		return 0;
	if (io->null.driver) {
		fflush(stdout);
		cli_error("io", "Image format driver does not support resize");
		return -ENOTSUP;
	}
	char err[256];
	if ((r = qsm_truncate(io->img, (uint64_t)offset, err, sizeof(err))) < 0) {
		fflush(stdout);
		cli_error("io", "%s", err[0] ? err : strerror(-r));
		return r;
	}
	return 0;
}

static int length_f(struct io_ctx *io, int argc, char **argv)
{
	char s[64];

	cli_cvtstr((double)image_size(io), s, sizeof(s));
	printf("%s\n", s);
	return 0;
}

static int info_f(struct io_ctx *io, int argc, char **argv)
{
	struct qsm_info info;
	char s1[64], s2[64];

	qsm_get_info(io->img, &info);
	if (io->null.driver && io->null.under_raw) {
		/* raw's bdrv_get_info asks its file, which cannot answer. */
		printf("format name: raw\n");
		return -ENOTSUP;
	}
	if (io->null.driver) {
		/* qemu-io 7.2 prints the name twice for a driver without
		 * bdrv_get_info, and the command fails. */
		printf("format name: %s\nformat name: %s\n", io->null.driver, io->null.driver);
		return -ENOTSUP;
	}
	if (strcmp(info.format, "qcow2")) {
		printf("format name: %s\ncluster size: 0 bytes\nvm state offset: 0 bytes\n", info.format);
		return 0;
	}
	/* vm_state_offset: the virtual size rounded up to whole L2 tables. */
	uint64_t vmstate = qsm_vmstate_offset(io->img);
	/* The copy-on-read filter names itself and passes its child's
	 * bdrv_get_info on, but has no format specific information. */
	printf("format name: %s\n", io->cor == COR_FILTER ? "copy-on-read" : "qcow2");
	cli_cvtstr((double)info.cluster_size, s1, sizeof(s1));
	cli_cvtstr((double)vmstate, s2, sizeof(s2));
	printf("cluster size: %s\n", s1);
	printf("vm state offset: %s\n", s2);
	if (io->cor == COR_FILTER)
		return 0;
	printf("Format specific information:\n");
	cli_print_qcow2_specific(io->img, &info);
	return 0;
}

static int alloc_f(struct io_ctx *io, int argc, char **argv)
{
	int64_t offset, start, count, remaining, num, sum = 0;
	char s1[64];
	int r;

	if ((r = cli_cvtnum(argv[1], &offset)) < 0) {
		print_cvtnum_err(r, argv[1]);
		return r;
	}
	start = offset;
	if (argc == 3) {
		if ((r = cli_cvtnum(argv[2], &count)) < 0) {
			print_cvtnum_err(r, argv[2]);
			return r;
		}
	} else {
		count = 512;
	}
	remaining = count;
	while (remaining) {
		r = is_allocated(io, offset, remaining, &num);
		if (r < 0) {
			printf("is_allocated failed: %s\n", strerror(-r));
			return r;
		}
		offset += num;
		remaining -= num;
		if (r)
			sum += num;
		if (num == 0) {
			count -= remaining;
			remaining = 0;
		}
	}
	cli_cvtstr((double)start, s1, sizeof(s1));
	printf("%" PRId64 "/%" PRId64 " bytes allocated at offset %s\n", sum, count, s1);
	return 0;
}

/* Runs of equal allocation status, merged as qemu-io's map_is_allocated(). */
static int map_is_allocated(struct io_ctx *io, int64_t offset, int64_t bytes, int64_t *pnum)
{
	int64_t num;
	int ret, first;

	ret = is_allocated(io, offset, QSM_MIN(bytes, IO_MAX_BYTES), &num);
	if (ret < 0)
		return ret;
	first = ret;
	*pnum = num;
	while (bytes > 0 && ret == first) {
		offset += num;
		bytes -= num;
		ret = is_allocated(io, offset, QSM_MIN(bytes, IO_MAX_BYTES), &num);
		if (ret == first && num)
			*pnum += num;
		else
			break;
	}
	return first;
}

static int map_f(struct io_ctx *io, int argc, char **argv)
{
	int64_t offset = 0, bytes = (int64_t)image_size(io), num;
	char s1[64], s2[64];

	while (bytes) {
		int r = map_is_allocated(io, offset, bytes, &num);
		if (r < 0) {
			cli_error("io", "Failed to get allocation status: %s", strerror(-r));
			return r;
		} else if (!num) {
			cli_error("io", "Unexpected end of image");
			return -EIO;
		}
		cli_cvtstr((double)num, s1, sizeof(s1));
		cli_cvtstr((double)offset, s2, sizeof(s2));
		printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64 ")\n", s1,
		       (uint64_t)num, r ? "    allocated" : "not allocated", s2, (uint64_t)offset);
		offset += num;
		bytes -= num;
	}
	return 0;
}

/* --- open, close, reopen --------------------------------------------------- */

/*
 * Open options, as qemu-io takes them from `open -o`, `reopen -o`,
 * `--image-opts` and json: names.  What each key does here:
 *  - honoured: driver (qcow2, raw), file / file.filename / file.driver
 *    (file, host_device, host_cdrom: qsm's file backend), read-only,
 *    backing (JSON null = no backing file; a string names a node, which
 *    qsm has not: QEMU's error), backing.driver, cache.direct,
 *    cache.no-flush, aio / file.aio, l2-cache-size, refcount-cache-size
 *    and cache-size (split between the two as QEMU's read_cache_sizes when
 *    one of them is given too: qsm_open_opts.l2_cache_size and
 *    refcount_cache_size; cache-size alone sizes the L2 cache, the refcount
 *    cache keeping its default), node-name (a name only: qsm has no node
 *    graph);
 *  - checked with QEMU's rules and wording, then ignored because they only
 *    tune memory or host allocation, never what any read returns or what
 *    the image file holds: l2-cache-entry-size (the engine caches whole
 *    L2 tables), cache-clean-interval (the engine never drops clean cache
 *    entries on a timer), discard=unmap|on (would punch holes in the file
 *    for freed clusters: host allocation only; qsm never does for qcow2);
 *    discard=ignore|off is honoured (struct io_ctx.discard_ignore);
 *  - accepted only where they ask for what qsm does anyway, refused by name
 *    otherwise: lazy-refcounts (must match the image header: the engine
 *    takes the mode from it), detect-zeroes (off only: on/unmap would turn
 *    zero writes into zero clusters, a different image).
 * Anything else is "Block format 'qcow2' does not support the option" (as
 * QEMU for names it does not know) or, for QEMU options qsm lacks, "qsm
 * does not support the option".
 */
struct open_req {
	const char *path;        /* file.filename, NULL: the name given */
	bool ro_on;              /* read-only=on was asked */
	bool ro_given;
	int lazy;                /* lazy-refcounts: -1 not given, else 0/1 */
	uint64_t entry_size;     /* l2-cache-entry-size, 0: not given */
	int discard_ignore;      /* discard=: -1 not given, else 1 for ignore/off */
	bool no_backing_null;    /* "backing": null */
	uint64_t rc_bytes;       /* refcount cache asked for, 0: not given */
	uint64_t cs_only;        /* cache-size given alone, 0: not */
};


/* QEMU's qcow2 and file options that qsm does not implement. */
static const char *const qemu_known_opts[] = {
	"auto-read-only", "force-share", "detect-zeroes", "pass-discard-request",
	"pass-discard-snapshot", "pass-discard-other", "overlap-check", "encrypt",
	"data-file", "file.locking", "file.pr-manager", "file.aio-max-batch",
	"file.drop-cache", "file.x-check-cache-dropped", "cache.writeback",
};

static bool in_list(const char *const *l, size_t n, const char *s)
{
	for (size_t i = 0; i < n; i++)
		if (!strcmp(l[i], s) || (strchr(l[i], '.') == NULL && !strncmp(s, l[i], strlen(l[i])) &&
					 s[strlen(l[i])] == '.'))
			return true;
	return false;
}

#define ERR(...) (snprintf(err, errlen, __VA_ARGS__), -EINVAL)

static int opt_driver(const char *v, const char **fmt, char *err, size_t errlen, bool file)
{
	if (file ? !strcmp(v, "file") || !strcmp(v, "host_device") || !strcmp(v, "host_cdrom")
		 : !strcmp(v, "qcow2") || !strcmp(v, "raw")) {
		if (fmt)
			*fmt = strcmp(v, "raw") ? "qcow2" : "raw";
		return 0;
	}
	if (cli_qemu_driver(v) ||
	    (!file && !strcmp(v, "file")) || (file && (!strcmp(v, "qcow2") || !strcmp(v, "raw"))))
		return ERR("Driver '%s' is not supported by qsm here (it opens %s)", v,
			   file ? "files: file, host_device, host_cdrom" : "qcow2 and raw over a file");
	return ERR("Unknown driver '%s'", v);
}

static int opt_size(const char *k, const char *v, uint64_t *out, char *err, size_t errlen)
{
	int r = cli_parse_size(v, out);
	if (r == -ERANGE) /* QEMU's parse_option_size */
		return ERR("Value '%s' is out of range for parameter '%s'", v, k);
	if (r < 0)
		return ERR("Parameter '%s' expects a non-negative number below 2^64\n"
			   "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
			   "and exabytes, respectively.", k);
	return 0;
}

static int opt_bool(const char *k, const char *v, bool *out, char *err, size_t errlen)
{
	if (cli_parse_bool(v, out) < 0)
		return ERR("Parameter '%s' expects 'on' or 'off'", k);
	return 0;
}

/*
 * Options QEMU takes that change nothing qsm can observe, checked with
 * QEMU's rules and words (reopen included):
 *  - pass-discard-request|snapshot|other (qcow2; on/off): what qsm passes
 *    down to the file on a discard is its own fixed rule;
 *  - overlap-check (none|constant|cached|all), overlap-check.template, and
 *    the on/off members overlap-check.<structure>: qsm always checks every
 *    metadata write against all structures (the strictest, QEMU's "all");
 *  - auto-read-only (on/off), file.locking (on|off|auto; cannot change on
 *    reopen, which QEMU names 'locking'): qsm takes no file locks;
 *  - force-share (on/off; on needs a read-only image, and cannot change);
 *  - encrypt.format on an image without encryption: QEMU's refusal;
 *  - data-file=NODE: no such node (qsm has no node names).
 * Returns 1 when k is none of these, else 0 or -EINVAL with err.
 */
static int opt_no_effect(const char *k, const char *v, bool reopen, bool raw,
			 const struct qsm_open_opts *oo, char *err, size_t errlen)
{
	static const char *const members[] = {
		"main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
		"snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory",
	};
	static const char *const modes[] = { "none", "constant", "cached", "all" };
	bool b;

	if (!strcmp(k, "auto-read-only"))
		return opt_bool(k, v, &b, err, errlen);
	if (!strcmp(k, "force-share")) {
		int r = opt_bool(k, v, &b, err, errlen);
		if (r || !reopen)
			return r ? r : b && !oo->read_only
			       ? ERR("force-share=on can only be used with read-only images") : 0;
		return ERR("Cannot change the option '%s'", k);
	}
	if (!strcmp(k, "file.locking")) {
		if (reopen)
			return ERR("Cannot change the option 'locking'");
		return strcmp(v, "on") && strcmp(v, "off") && strcmp(v, "auto")
		       ? ERR("invalid parameter value: %s", v) : 0;
	}
	if (raw)
		return 1;
	if (!strcmp(k, "pass-discard-request") || !strcmp(k, "pass-discard-snapshot") ||
	    !strcmp(k, "pass-discard-other"))
		return opt_bool(k, v, &b, err, errlen);
	if (!strcmp(k, "overlap-check") || !strcmp(k, "overlap-check.template")) {
		if (!in_list(modes, sizeof(modes) / sizeof(modes[0]), v) || strchr(v, '.'))
			return ERR("Unsupported value '%s' for qcow2 option 'overlap-check'. Allowed are "
				   "any of the following: none, constant, cached, all", v);
		return 0;
	}
	if (!strncmp(k, "overlap-check.", 14)) {
		for (size_t i = 0; i < sizeof(members) / sizeof(members[0]); i++)
			if (!strcmp(k + 14, members[i]))
				return opt_bool(k, v, &b, err, errlen);
		return reopen ? ERR("Cannot change the option '%s'", k)
			      : ERR("Block format 'qcow2' does not support the option '%s'", k);
	}
	if (!strcmp(k, "encrypt.format"))
		return ERR("No encryption in image header, but options specified format '%s'", v);
	if (!strcmp(k, "data-file"))
		return reopen ? ERR("Cannot change the option '%s'", k)
			      : ERR("Cannot find device='%s' nor node-name='%s'", v, v);
	return 1;
}

/* Apply the option list o to oo and req.  0, or -EINVAL with QEMU's text
 * (no program prefix) in err. */
static int apply_open_opts(struct qsm_open_opts *oo, const struct cli_opts *o,
			   struct open_req *req, bool reopen, char *err, size_t errlen)
{
	const char *old_format = oo->format ? oo->format : "qcow2";
	uint64_t l2 = 0, rc = 0, cs = 0;
	bool l2_set = false, rc_set = false, cs_set = false;
	const char *v;
	bool b;
	int r = 0;

	/* The driver first: the "does not support" message names it. */
	if ((v = cli_opts_get(o, "driver")) && (r = opt_driver(v, &oo->format, err, errlen, false)))
		return r;
	/* bdrv_reopen: the driver stays, and so do options it does not know. */
	if (reopen && v && strcmp(oo->format, old_format))
		return ERR("Cannot change the option 'driver'");
	for (int i = 0; i < o->n; i++) {
		const char *k = o->v[i].key;
		v = o->v[i].val;
		if (o->v[i].null && strcmp(k, "backing"))
			continue; /* QEMU drops a JSON null it has no use for */
		if (!strcmp(k, "driver")) {
			continue;
		} else if (!strcmp(k, "file.driver")) {
			r = opt_driver(v, NULL, err, errlen, true);
		} else if (!strcmp(k, "file.filename")) {
			req->path = v;
		} else if (!strcmp(k, "file")) {
			r = ERR("Cannot find device='%s' nor node-name='%s'", v, v);
		} else if (!strcmp(k, "backing")) {
			if (o->v[i].null) {
				req->no_backing_null = true;
				oo->no_backing = true;
			} else {
				r = ERR("Could not open backing file: Cannot find device='%s' nor "
					"node-name='%s'", v, v);
			}
		} else if (!strcmp(k, "read-only")) {
			if (!(r = opt_bool(k, v, &b, err, errlen))) {
				req->ro_on = b;
				req->ro_given = true;
			}
		} else if (!strcmp(k, "node-name")) {
			continue;
		} else if (!strcmp(k, "cache.direct")) {
			if (!(r = opt_bool(k, v, &b, err, errlen))) {
				bool sync = oo->cache == QSM_CACHE_WRITETHROUGH ||
					    oo->cache == QSM_CACHE_DIRECTSYNC;
				oo->cache = b ? (sync ? QSM_CACHE_DIRECTSYNC : QSM_CACHE_NONE)
					      : (sync ? QSM_CACHE_WRITETHROUGH : QSM_CACHE_WRITEBACK);
			}
		} else if (!strcmp(k, "cache.no-flush")) {
			if (!(r = opt_bool(k, v, &b, err, errlen)) && b)
				oo->cache = QSM_CACHE_UNSAFE;
		} else if (!strcmp(k, "backing.driver")) {
			if (strcmp(v, "qcow2") && strcmp(v, "raw"))
				r = opt_driver(v, NULL, err, errlen, false);
			else
				oo->backing_format = strcmp(v, "raw") ? "qcow2" : "raw";
		} else if (!strcmp(k, "aio") || !strcmp(k, "file.aio")) {
			if (strcmp(v, "threads") && strcmp(v, "io_uring"))
				r = ERR("Parameter 'aio' does not accept value '%s'", v);
			else
				oo->aio = !strcmp(v, "threads") ? "threads" : "io_uring";
		} else if ((r = opt_no_effect(k, v, reopen, !strcmp(oo->format ? oo->format : "qcow2",
								     "raw"), oo, err, errlen)) != 1 ||
			   (r = 0)) {
			/* checked (or refused) by opt_no_effect; 1 (not one of its
			 * options) goes on down the list with r = 0 */
		} else if (!strcmp(oo->format ? oo->format : "qcow2", "raw")) {
			r = ERR("Block format 'raw' does not support the option '%s'", k);
		} else if (!strcmp(k, "l2-cache-size")) {
			r = opt_size(k, v, &l2, err, errlen);
			l2_set = true;
		} else if (!strcmp(k, "refcount-cache-size")) {
			r = opt_size(k, v, &rc, err, errlen);
			rc_set = true;
		} else if (!strcmp(k, "cache-size")) {
			r = opt_size(k, v, &cs, err, errlen);
			cs_set = true;
		} else if (!strcmp(k, "l2-cache-entry-size")) {
			r = opt_size(k, v, &req->entry_size, err, errlen);
			if (!r && req->entry_size == 0)
				req->entry_size = 1; /* checked once the cluster size is known */
		} else if (!strcmp(k, "cache-clean-interval")) {
			char *e;
			errno = 0;
			unsigned long long n = strtoull(v, &e, 0);
			if (!*v || *e || errno)
				r = ERR("Parameter '%s' expects a number", k);
			else if (n > UINT_MAX)
				r = ERR("Cache clean interval too big");
		} else if (!strcmp(k, "lazy-refcounts")) {
			if (!(r = opt_bool(k, v, &b, err, errlen)))
				req->lazy = b;
		} else if (!strcmp(k, "discard")) {
			if (strcmp(v, "ignore") && strcmp(v, "off") && strcmp(v, "unmap") && strcmp(v, "on"))
				r = ERR("Invalid discard option");
			else
				req->discard_ignore = !strcmp(v, "ignore") || !strcmp(v, "off");
		} else if (!strcmp(k, "detect-zeroes")) {
			if (strcmp(v, "off") && strcmp(v, "on") && strcmp(v, "unmap"))
				r = ERR("invalid parameter value: %s", v);
			else if (strcmp(v, "off"))
				r = ERR("detect-zeroes=%s is not supported by qsm (only off)", v);
		} else if (reopen) {
			r = ERR("Cannot change the option '%s'", k);
		} else if (in_list(qemu_known_opts, sizeof(qemu_known_opts) / sizeof(qemu_known_opts[0]), k)) {
			r = ERR("qsm does not support the option '%s'", k);
		} else if (!strncmp(k, "file.", 5)) {
			r = ERR("Block protocol 'file' doesn't support the option '%s'", k + 5);
		} else {
			r = ERR("Block format 'qcow2' does not support the option '%s'", k);
		}
		if (r)
			return r;
	}
	/* QEMU's read_cache_sizes(): the combined size splits between the two
	 * caches; only the L2 share reaches the engine. */
	req->cs_only = cs_set && !l2_set && !rc_set ? cs : 0;
	if (cs_set) {
		if (l2_set && rc_set)
			return ERR("cache-size, l2-cache-size and refcount-cache-size may not be set "
				   "at the same time");
		if (l2_set && l2 > cs)
			return ERR("l2-cache-size may not exceed cache-size");
		if (rc > cs)
			return ERR("refcount-cache-size may not exceed cache-size");
		if (!l2_set)
			l2 = cs - rc;
		else
			rc = cs - l2;
		rc_set = rc_set || l2_set;
		l2_set = true;
	}
	/* QEMU bounds both caches in entries once the cluster size is known
	 * (check_open_req); an L2 cache larger than the image needs is cut
	 * down to what it needs, never refused. */
	req->rc_bytes = rc_set ? rc : 0;
	if (l2_set)
		oo->l2_cache_size = l2 ? l2 : 1; /* 0 would mean "the default": the smallest instead */
	if (rc_set)
		oo->refcount_cache_size = rc ? rc : 1; /* the engine keeps at least one block */
	return 0;
}

/* Checks QEMU makes once the header is read.  0 or -EINVAL with err. */
static int check_open_req(struct qsm_image *img, const struct open_req *req, char *err,
			  size_t errlen)
{
	struct qsm_info info;

	qsm_get_info(img, &info);
	if (strcmp(info.format, "qcow2"))
		return 0;
	if (req->entry_size && (req->entry_size < 512 || req->entry_size > info.cluster_size ||
				(req->entry_size & (req->entry_size - 1))))
		return ERR("L2 cache entry size must be a power of two between 512 and the cluster "
			   "size (%" PRIu64 ")", info.cluster_size);
	/* cache-size alone: QEMU's read_cache_sizes gives the L2 cache what
	 * the whole image needs and the refcount cache the rest (at most the
	 * whole when it is smaller than 4 clusters).  Only the check follows
	 * that split: the engine's refcount cache keeps its default size. */
	uint64_t rc_bytes = req->rc_bytes;
	if (req->cs_only) {
		uint64_t max_l2 = QSM_DIV_ROUND_UP(info.virtual_size, info.cluster_size) * 8;
		uint64_t min_rc = 4 * info.cluster_size;
		max_l2 = QSM_DIV_ROUND_UP(max_l2, info.cluster_size) * info.cluster_size;
		rc_bytes = req->cs_only >= max_l2 + min_rc ? req->cs_only - max_l2
							   : QSM_MIN(req->cs_only, min_rc);
	}
	/* qcow2_update_options_prepare: at least 4 blocks, at most INT_MAX. */
	if (rc_bytes / info.cluster_size > INT_MAX)
		return ERR("Refcount cache size too big");
	if (req->lazy == 1 && info.version < 3)
		return ERR("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
			   "compatibility level");
	if (req->lazy >= 0 && req->lazy != info.lazy_refcounts)
		return ERR("lazy-refcounts=%s is not supported by qsm on this image (the image "
			   "header says %s; change it with qemu-img amend)",
			   req->lazy ? "on" : "off", info.lazy_refcounts ? "on" : "off");
	return 0;
}

/*
 * QEMU's null block drivers, null-co and null-aio (io/null.c): named by
 * driver=null-co, by file.driver=null-co under driver=raw, or by the
 * protocol name null-co:// (null-aio://).  Their options are size (default
 * 1 GiB), read-zeroes (default off: reads leave the buffer as it was) and
 * latency-ns; none of them can change on reopen.
 *
 * Returns 1 when the options do not name a null driver (a file is opened
 * as usual), 0 with *cfg filled (and oo->format "raw": requests go straight
 * to the device), or -EINVAL with QEMU's text in err.  The generic
 * options (read-only, node-name, cache.*, discard) are taken as for files.
 */
static const char *null_driver_name(const char *v)
{
	return !v ? NULL : !strcmp(v, "null-co") ? "null-co" : !strcmp(v, "null-aio") ? "null-aio" : NULL;
}

static const char *null_protocol(const char *name)
{
	if (!name)
		return NULL;
	if (!strncmp(name, "null-co:", 8))
		return "null-co";
	if (!strncmp(name, "null-aio:", 9))
		return "null-aio";
	return NULL;
}

static int null_apply_opts(const struct io_ctx *io, const char *name, const struct cli_opts *o,
			   struct qsm_open_opts *oo, struct open_req *req, struct io_null_cfg *cfg,
			   bool reopen, char *err, size_t errlen)
{
	const char *drv = cli_opts_get(o, "driver"), *fdrv = cli_opts_get(o, "file.driver");
	const char *proto = null_protocol(name);
	bool under_raw;
	int r = 0;

	if (io->reopening && io->null.driver && proto) {
		*cfg = io->null;
		under_raw = cfg->under_raw;
	} else if (null_driver_name(drv)) {
		*cfg = (struct io_null_cfg){ null_driver_name(drv), QSM_IO_NULL_DEFAULT_SIZE, 0, false,
					     false };
		under_raw = false;
	} else if (drv && !strcmp(drv, "raw") && (null_driver_name(fdrv) || proto)) {
		*cfg = (struct io_null_cfg){ fdrv ? null_driver_name(fdrv) : proto,
					     QSM_IO_NULL_DEFAULT_SIZE, 0, false, true };
		under_raw = true;
		if (fdrv && !cfg->driver)
			return 1; /* file.driver names something else: the file path says */
	} else if (proto && (!drv || !strcmp(drv, "qcow2"))) {
		/* qemu-io probes the format of null-co:// and finds raw: qsm
		 * says what QEMU says and opens it raw (a null device has
		 * nothing to probe). */
		if (!io->reopening && !strcmp(name + strlen(proto), "://"))
			fprintf(stderr, "WARNING: Image format was not specified for '%s' and probing "
				"guessed raw.\n         Automatically detecting the format is dangerous "
				"for raw images, write operations on block 0 will be restricted.\n"
				"         Specify the 'raw' format explicitly to remove the "
				"restrictions.\n", name);
		*cfg = (struct io_null_cfg){ proto, QSM_IO_NULL_DEFAULT_SIZE, 0, false, true };
		under_raw = true;
	} else {
		return 1;
	}
	if (proto && !io->reopening && strcmp(name + strlen(proto), "://"))
		return ERR("The only allowed filename for this driver is '%s://'", proto);
	oo->format = "raw";
	for (int i = 0; i < o->n && !r; i++) {
		const char *k = o->v[i].key, *v = o->v[i].val, *nk = k;
		bool b;

		if (o->v[i].null)
			continue;
		if (under_raw) {
			if (!strcmp(k, "driver") || !strcmp(k, "file.driver") || !strcmp(k, "node-name") ||
			    !strcmp(k, "file.node-name"))
				continue;
			if (strncmp(k, "file.", 5)) {
				nk = NULL; /* a raw or generic option */
			} else {
				nk = k + 5;
			}
		} else if (!strcmp(k, "driver") || !strcmp(k, "node-name")) {
			continue;
		}
		if (nk && (!strcmp(nk, "size") || !strcmp(nk, "latency-ns") ||
			   !strcmp(nk, "read-zeroes"))) {
			if (reopen) {
				r = ERR("Cannot change the option '%s'", k);
			} else if (!strcmp(nk, "size")) {
				r = opt_size(k, v, &cfg->size, err, errlen);
			} else if (!strcmp(nk, "read-zeroes")) {
				if (!(r = opt_bool(k, v, &b, err, errlen)))
					cfg->read_zeroes = b;
			} else {
				char *e;
				errno = 0;
				long long n = strtoll(v, &e, 0);
				if (!*v || *e || errno)
					r = ERR("Parameter '%s' expects a number", k);
				else if (n < 0)
					r = ERR("latency-ns is invalid");
				else
					cfg->latency_ns = (uint64_t)n;
			}
		} else if (!strcmp(k, "filename") || !strcmp(k, "file.filename")) {
			if (!null_protocol(v) || strcmp(v + strlen(null_protocol(v)), "://"))
				r = ERR("The only allowed filename for this driver is '%s://'",
					cfg->driver);
		} else if (!strcmp(k, "read-only")) {
			if (!(r = opt_bool(k, v, &b, err, errlen))) {
				req->ro_on = b;
				req->ro_given = true;
			}
		} else if (!strcmp(k, "cache.direct") || !strcmp(k, "cache.no-flush") ||
			   !strcmp(k, "force-share")) {
			r = opt_bool(k, v, &b, err, errlen);
		} else if (!strcmp(k, "discard")) {
			if (strcmp(v, "ignore") && strcmp(v, "off") && strcmp(v, "unmap") && strcmp(v, "on"))
				r = ERR("Invalid discard option");
			else
				req->discard_ignore = !strcmp(v, "ignore") || !strcmp(v, "off");
		} else if (nk == NULL) {
			r = ERR("Block format 'raw' does not support the option '%s'", k);
		} else {
			r = ERR("Block protocol '%s' doesn't support the option '%s'", cfg->driver, nk);
		}
	}
	return r;
}

/*
 * driver=copy-on-read, QEMU's copy-on-read filter: the image below is its
 * `file` child, so its options are the file.* keys; the filter has none of
 * its own that qsm takes (bottom= is refused by name).  Rewrites o in place
 * (file.X becomes X) and sets *filter; leaves o alone when the driver is
 * another.  0 or -EINVAL/-ENOMEM with QEMU's text in err.  The copying is
 * the engine's (qsm_open_opts.copy_on_read).
 */
static int cor_filter_opts(struct cli_opts *o, bool *filter, char *err, size_t errlen)
{
	const char *drv = cli_opts_get(o, "driver");
	struct cli_opts in = { 0 };
	int r = 0;

	*filter = false;
	if (!drv || strcmp(drv, "copy-on-read"))
		return 0;
	*filter = true;
	for (int i = 0; i < o->n && !r; i++) {
		const char *k = o->v[i].key;
		if (!strcmp(k, "driver") || !strcmp(k, "node-name") || !strcmp(k, "read-only"))
			continue; /* read-only: io_open_spec's rules, from the caller's copy */
		if (!strcmp(k, "file")) {
			r = ERR("Cannot find device='%s' nor node-name='%s'", o->v[i].val, o->v[i].val);
		} else if (!strcmp(k, "bottom")) {
			r = ERR("qsm does not support the option '%s' of driver copy-on-read", k);
		} else if (strncmp(k, "file.", 5)) {
			r = ERR("Block format 'copy-on-read' does not support the option '%s'", k);
		} else {
			r = cli_opts_add(&in, k + 5, o->v[i].val, o->v[i].null);
		}
	}
	if (r == 0 && cli_opts_get(o, "read-only"))
		r = cli_opts_add(&in, "read-only", cli_opts_get(o, "read-only"), false);
	if (r < 0) {
		cli_opts_free(&in);
		return r;
	}
	cli_opts_free(o);
	*o = in;
	return 0;
}

/* Open the null device cfg describes as a raw image. */
static int null_open(struct event_base *base, const struct io_null_cfg *cfg,
		     const struct qsm_open_opts *oo, struct qsm_image **out, char *err, size_t errlen)
{
	struct qsm_io *nio;
	int r = qsm_io_open_null(base, cfg->size, cfg->read_zeroes, cfg->latency_ns,
				 oo->read_only ? QSM_IO_RDONLY : 0, &nio);

	if (r < 0)
		return r;
	return qsm_open_io(base, nio, oo, out, err, errlen);
}

/*
 * Snapshot mode (-s, QEMU's BDRV_O_SNAPSHOT): the image is opened
 * read-only (it is never written), and a temporary qcow2 overlay of the
 * same virtual size, with the image as its backing file, is created in
 * $TMPDIR (else /var/tmp) as vl.XXXXXX and opened in its place, with the
 * caller's mode and options: writes go to the overlay, reads fall through
 * to the image where the overlay has nothing.  The overlay is removed when
 * the image is closed (io_close); QEMU unlinks it at once, which qsm cannot
 * since its reopen opens by name, but nothing else sees the file.
 *
 * *img (the image, opened read-only) is closed and replaced by the overlay.
 * 0, or -errno with QEMU's text in err ("Could not open temporary file
 * ..."), *img then NULL.
 */
static int snapshot_overlay(struct io_ctx *io, const char *path, const struct qsm_open_opts *oo,
			    struct qsm_image **img, char *err, size_t errlen)
{
	struct qsm_create_opts co = { QSM_OPTS_INIT(co) };
	struct qsm_open_opts to = *oo;
	const char *dir = getenv("TMPDIR");
	struct qsm_info info;
	char tmp[PATH_MAX], *abs;
	int fd, r;

	qsm_get_info(*img, &info);
	qsm_close(*img);
	*img = NULL;
	snprintf(tmp, sizeof(tmp), "%s/vl.XXXXXX", dir && *dir ? dir : "/var/tmp");
	if ((fd = mkstemp(tmp)) < 0) {
		r = -errno;
		snprintf(err, errlen, "Could not open temporary file '%.300s': %s", tmp, strerror(-r));
		return r;
	}
	close(fd);
	if (!(abs = realpath(path, NULL))) {
		r = -errno;
		unlink(tmp);
		snprintf(err, errlen, "Could not open '%s': %s", path, strerror(-r));
		return r;
	}
	co.size = info.virtual_size;
	co.backing_file = abs;
	co.backing_format = info.format;
	r = qsm_create(tmp, &co, err, errlen);
	free(abs);
	if (r == 0) {
		to.format = "qcow2";
		to.backing_format = NULL; /* recorded in the overlay */
		to.no_backing = false;
		r = qsm_open(io->base, tmp, &to, img, err, errlen);
	}
	if (r < 0) {
		*img = NULL;
		unlink(tmp);
		return r;
	}
	free(io->snap_tmp);
	io->snap_tmp = strdup(tmp);
	return 0;
}

#undef ERR

/*
 * blkdebug (io/blkdebug.h) in the ways qemu-io names it:
 *  - the file name blkdebug:CONFIG:IMAGE or blkdebug::IMAGE (no config);
 *  - options driver=blkdebug (the image read raw through it) or
 *    file.driver=blkdebug (the qcow2 image's file), with the blkdebug
 *    node's keys under the same prefix: config, inject-error.N.*,
 *    set-state.N.*, image.filename and image.driver (file, host_device,
 *    host_cdrom), and the node's limits align, max-transfer,
 *    opt-write-zero, max-write-zero, opt-discard, max-discard (io/blkdebug.c
 *    pads and splits the requests to the file as QEMU's block layer does).
 * blkdebug_take() moves those keys out of *all (rebuilt without them), so
 * apply_open_opts sees a plain qcow2 or raw open of *path.
 */
struct bd_spec {
	struct qsm_blkdebug *bd;     /* NULL: no blkdebug */
	char *image;                 /* the file under it, from the name or options (owned) */
};

static int blkdebug_take(struct bd_spec *bs, const char **name, struct cli_opts *all, char *err,
			 size_t errlen)
{
	const char *pfx = NULL, *config = NULL;
	int r = 0;

	if (*name && !strncmp(*name, "blkdebug:", 9)) {
		const char *c = strchr(*name + 9, ':');
		if (!c) {
			snprintf(err, errlen, "blkdebug requires both config file and image path");
			return -EINVAL;
		}
		static char cfg[PATH_MAX];
		if (c > *name + 9) {
			snprintf(cfg, sizeof(cfg), "%.*s", (int)(c - (*name + 9)), *name + 9);
			config = cfg;
		}
		free(bs->image);
		bs->image = strdup(c + 1);
		*name = NULL;
		if (!bs->image)
			return -ENOMEM;
	}
	const char *d = cli_opts_get(all, "driver");
	const char *fd = cli_opts_get(all, "file.driver");
	if (d && !strcmp(d, "blkdebug"))
		pfx = "";
	else if (fd && !strcmp(fd, "blkdebug"))
		pfx = "file.";
	if (!pfx && !bs->image)
		return 0;
	if (!(bs->bd = qsm_blkdebug_new()))
		return -ENOMEM;
	struct cli_opts kept = { 0 };
	size_t pl = pfx ? strlen(pfx) : 0;
	for (int i = 0; r == 0 && i < all->n; i++) {
		const char *k = all->v[i].key, *v = all->v[i].val;
		if (!pfx || strncmp(k, pfx, pl)) {
			r = cli_opts_add(&kept, k, v, all->v[i].null);
			continue;
		}
		const char *bk = k + pl;
		if (!strcmp(bk, "driver")) {
			if (!*pfx) /* the blkdebug node on top: its bytes, raw */
				r = cli_opts_add(&kept, "driver", "raw", false);
		} else if (!strcmp(bk, "config")) {
			config = v;
		} else if (!strcmp(bk, "image.filename")) {
			free(bs->image);
			if (!(bs->image = strdup(v)))
				r = -ENOMEM;
		} else if (!strcmp(bk, "image.driver")) {
			if (strcmp(v, "file") && strcmp(v, "host_device") && strcmp(v, "host_cdrom"))
				r = -EINVAL, snprintf(err, errlen, "Driver '%s' under blkdebug is not "
						      "supported by qsm (it wraps files)", v);
		} else if (!strcmp(bk, "image")) {
			r = -EINVAL, snprintf(err, errlen, "Cannot find device='%s' nor node-name='%s'",
					      v, v);
		} else if (qsm_blkdebug_is_limit(bk)) {
			r = qsm_blkdebug_set_opt(bs->bd, bk, v, err, errlen);
		} else if (!strcmp(bk, "take-child-perms") || !strcmp(bk, "unshare-child-perms")) {
			r = -ENOTSUP, snprintf(err, errlen, "blkdebug option '%s' is not supported by "
					       "qsm", bk);
		} else if (!strncmp(bk, "inject-error.", 13) || !strncmp(bk, "set-state.", 10)) {
			r = qsm_blkdebug_set_opt(bs->bd, bk, v, err, errlen);
		} else if (*pfx) {
			r = cli_opts_add(&kept, k, v, all->v[i].null);
		} else {
			r = -EINVAL, snprintf(err, errlen, "Invalid parameter '%s'", bk);
		}
	}
	if (r == 0 && config)
		r = qsm_blkdebug_read_config(bs->bd, config, err, errlen);
	if (r == 0)
		r = qsm_blkdebug_finish(bs->bd, err, errlen);
	if (r == 0 && !bs->image)
		r = -EINVAL, snprintf(err, errlen, "Must specify either driver or file");
	cli_opts_free(all);
	*all = kept;
	return r;
}

/* qemu-io prints blkdebug's suspensions on stdout. */
static void blkdebug_notify(void *opaque, const char *tag, bool resumed)
{
	printf("blkdebug: %s request '%s'\n", resumed ? "Resuming" : "Suspended", tag);
}

/* Open path through the blkdebug rules of bs (taken: freed here or owned
 * by the image).  As qsm_open, with io->bdio set on success. */
static int blkdebug_open(struct io_ctx *io, struct bd_spec *bs, const char *path,
			 const struct qsm_open_opts *oo, char *err, size_t errlen)
{
	struct qsm_io *inner, *w;
	int flags = (oo->read_only ? QSM_IO_RDONLY : 0) |
		    (oo->cache == QSM_CACHE_NONE || oo->cache == QSM_CACHE_DIRECTSYNC ? QSM_IO_DIRECT : 0);
	int r = qsm_io_open_path(io->base, path, flags, oo->aio, &inner);
	if (r < 0) {
		qsm_blkdebug_free(bs->bd);
		bs->bd = NULL;
		snprintf(err, errlen, "Could not open '%s': %s", path, strerror(-r));
		return r;
	}
	/* The limits are checked against the file's own alignment once it is
	 * open (QEMU's order: a missing image is reported first).  QEMU probes
	 * a file's O_DIRECT alignment; 512 is taken here. */
	r = qsm_blkdebug_check_limits(bs->bd, flags & QSM_IO_DIRECT ? 512 : 1, err, errlen);
	if (r < 0) {
		qsm_io_close(inner);
		qsm_blkdebug_free(bs->bd);
		bs->bd = NULL;
		return r;
	}
	qsm_blkdebug_set_notify(bs->bd, blkdebug_notify, io);
	r = qsm_io_blkdebug_wrap(inner, bs->bd, &w);
	bs->bd = NULL;
	if (r < 0)
		return r;
	r = qsm_open_io(io->base, w, oo, &io->img, err, errlen);
	if (r == 0)
		io->bdio = w;
	return r;
}

/*
 * Open `name` (a file name, a json:{...} name, or NULL when the options
 * name the file) with the options o (may be NULL) on top of *base.
 * at_open: an open (qemu-io's open or its command line), where
 * read-only=on without -r is QEMU's "Block node is read-only"; a reopen
 * takes it as the new mode.  Errors are printed as qemu-io does:
 * "can't open device NAME: why" ("can't open: why" without a name).
 */
/* qsm_open_opts.repair_log: the repair of a dirty image reports on stderr,
 * unprefixed, as qemu-io's qcow2 driver prints it. */
static void io_repair_log(void *opaque, const char *line)
{
	(void)opaque;
	fflush(stdout);
	fprintf(stderr, "%s\n", line);
}

static int io_open_spec(struct io_ctx *io, const char *name, const struct cli_opts *o,
			const struct qsm_open_opts *base, bool at_open)
{
	struct qsm_open_opts oo = *base;
	struct open_req req = { .lazy = -1, .discard_ignore = -1 };
	struct io_null_cfg ncfg = { 0 };
	struct cli_opts all = { 0 };
	struct bd_spec bds = { 0 };
	const char *shown = name; /* the name error messages give */
	char err[512] = "";
	const char *path;
	int r = 0;

	if (io->img) {
		cli_error("io", "file open already, try 'help close'");
		return -EBUSY;
	}
	if (name && !strncmp(name, "json:", 5))
		r = cli_json_parse(name + 5, &all, err, sizeof(err));
	for (int i = 0; r == 0 && o && i < o->n; i++)
		r = cli_opts_add(&all, o->v[i].key, o->v[i].val, o->v[i].null);
	bool cor_filter = false;
	if (r == 0)
		r = blkdebug_take(&bds, &name, &all, err, sizeof(err));
	if (r == 0)
		r = cor_filter_opts(&all, &cor_filter, err, sizeof(err));
	if (r == 0 && cor_filter && at_open && oo.read_only)
		r = -EPERM, snprintf(err, sizeof(err), "Block node is read-only");
	if (r == 0 && at_open && !io->reopening)
		oo.copy_on_read = cor_filter || io->cor_next;
	if (r == 0)
		r = null_apply_opts(io, name, &all, &oo, &req, &ncfg, !at_open, err, sizeof(err));
	if (r == 1) {
		ncfg.driver = NULL;
		r = apply_open_opts(&oo, &all, &req, !at_open, err, sizeof(err));
	}
	path = ncfg.driver ? (!strcmp(ncfg.driver, "null-co") ? "null-co://" : "null-aio://")
	     : bds.image ? bds.image : req.path ? req.path
	     : name && strncmp(name, "json:", 5) ? name : NULL;
	if (r == 0 && !path)
		r = -EINVAL, snprintf(err, sizeof(err), "Must specify either driver or file");
	if (r == 0 && req.ro_given) {
		if (at_open && req.ro_on && !oo.read_only)
			r = -EPERM, snprintf(err, sizeof(err), "Block node is read-only");
		else if (!at_open && req.ro_on && !oo.read_only)
			/* qemu-io's BlockBackend keeps its write permission, so QEMU
			 * refuses (and keeps the image as it was); qsm has no node
			 * names: "#block000" stands for QEMU's generated one. */
			r = -EPERM, snprintf(err, sizeof(err), "Read-only block node '#block000' "
					     "cannot support read-write users");
		else if (!at_open)
			oo.read_only = req.ro_on;
	}
	if (r == 0 && req.no_backing_null && !oo.read_only)
		r = -ENOTSUP, snprintf(err, sizeof(err), "\"backing\": null is supported by qsm "
				       "read-only only (-r)");
	if (r == 0) {
		oo.repair_log = io_repair_log;
		/* -s: the image itself is only read (snapshot_overlay). */
		bool snap = io->snap_next && at_open && !io->reopening;
		struct qsm_open_opts img_oo = oo;
		if (snap) {
			img_oo.read_only = true;
			img_oo.copy_on_read = false; /* the overlay copies */
		}
		if (ncfg.driver)
			r = null_open(io->base, &ncfg, &img_oo, &io->img, err, sizeof(err));
		else if (bds.bd)
			r = blkdebug_open(io, &bds, path, &img_oo, err, sizeof(err));
		else
			r = qsm_open(io->base, path, &img_oo, &io->img, err, sizeof(err));
		if (r == 0 && snap) {
			if ((r = check_open_req(io->img, &req, err, sizeof(err))) == 0 && ncfg.driver) {
				r = -ENOTSUP;
				snprintf(err, sizeof(err), "snapshot mode (-s) is supported by qsm on "
					 "image files only");
			}
			if (r < 0) {
				qsm_close(io->img);
			} else if ((r = snapshot_overlay(io, path, &oo, &io->img, err,
							 sizeof(err))) == 0) {
				path = io->snap_tmp;
				oo.format = "qcow2";
				oo.backing_format = NULL;
			}
		}
		if (r < 0) {
			io->bdio = NULL;
			io->img = NULL;
			if (!err[0])
				snprintf(err, sizeof(err), "%s", qsm_strerror(r));
		} else if (!snap && (r = check_open_req(io->img, &req, err, sizeof(err))) < 0) {
			qsm_close(io->img);
			io->img = NULL;
			io->bdio = NULL;
		}
	}
	qsm_blkdebug_free(bds.bd); /* not opened */
	if (r < 0)
		free(bds.image);
	if (r < 0) {
		if (!at_open) /* reopen_f: qemu-io prints the reason alone */
			cli_error("io", "%s", err);
		else if (shown)
			cli_error("io", "can't open device %s: %s", shown, err);
		else
			cli_error("io", "can't open: %s", err);
		cli_opts_free(&all);
		return r;
	}
	free(io->path);
	io->path = strdup(path);
	free(bds.image);
	io->oo = oo;
	if (req.discard_ignore >= 0)
		io->discard_ignore = req.discard_ignore;
	else if (at_open)
		io->discard_ignore = false;
	/* A reopen must find the same file again: keep the resolved options
	 * (a probed format is probed again, so a probed raw image keeps its
	 * guard on block 0). */
	struct qsm_info pinfo;
	qsm_get_info(io->img, &pinfo);
	io->oo.format = pinfo.format_probed ? NULL
		      : oo.format && !strcmp(oo.format, "raw") ? "raw" : "qcow2";
	if (at_open && !io->reopening)
		cli_probed_warning(io->img, path);
	io->oo.backing_format = oo.backing_format && !strcmp(oo.backing_format, "raw") ? "raw"
			      : oo.backing_format ? "qcow2" : NULL;
	io->oo.aio = oo.aio;
	io->null = ncfg;
	if (at_open && !io->reopening)
		io->cor = cor_filter ? COR_FILTER : io->cor_next ? COR_FLAG : 0;
	cli_opts_free(&all);
	qsm_tracer_attach(io->tracer, io->img);
	return 0;
}

static int io_open(struct io_ctx *io, const char *path, const struct qsm_open_opts *oo)
{
	return io_open_spec(io, path, NULL, oo, true);
}

/* A corruption the engine found: as qemu-io, QEMU's line
 * (qcow2_signal_corruption: no program name); as qsm io, qsm's. */
static bool corrupt_reason(const char *msg, size_t *reason_len)
{
	size_t n = strlen(msg), k = strlen(QSM_CORRUPT_SUFFIX);

	if (n < k || strcmp(msg + n - k, QSM_CORRUPT_SUFFIX) != 0)
		return false;
	*reason_len = n - k;
	return true;
}

static void print_image_error(const char *msg)
{
	size_t n;

	if (cli_as_qemu() && corrupt_reason(msg, &n))
		fprintf(stderr, "qcow2: Marking image as corrupt: %.*s; further corruption "
			"events will be suppressed\n", (int)n, msg);
	else
		cli_error("io", "%s", msg);
}

static int io_close(struct io_ctx *io)
{
	int r = 0;
	size_t n;
	bool quiet;

	if (!io->img)
		return 0;
	/* qemu-io closes an image its driver gave up on without a word */
	quiet = cli_as_qemu() && corrupt_reason(qsm_image_error(io->img), &n);
	/* A request held at a breakpoint would never complete (qemu-io hangs
	 * there): let them all go first. */
	qsm_io_blkdebug_resume_all(io->bdio);
	io_drain(io);
	r = qsm_close(io->img);
	io->img = NULL;
	io->bdio = NULL;
	if (r < 0 && !quiet)
		cli_error("io", "closing %s: %s", io->path, qsm_strerror(r));
	if (io->snap_tmp && !io->reopening) {
		unlink(io->snap_tmp); /* -s: the overlay lives as long as the image */
		free(io->snap_tmp);
		io->snap_tmp = NULL;
	}
	return r;
}

static int open_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("open");
	struct qsm_open_opts oo = { .cache = QSM_CACHE_WRITETHROUGH, .probe_format = true };
	struct cli_opts o = { 0 };
	int c, r;

	bool snap = false, cor = false;

	while ((c = getopt(argc, argv, "rsCnUo:t:i:")) != -1) {
		switch (c) {
		case 'C':
			cor = true;
			break;
		case 'r':
			oo.read_only = true;
			break;
		case 's':
			snap = true;
			break;
		case 'n':
			oo.cache = QSM_CACHE_NONE;
			break;
		case 'U':
			break;
		case 't':
			if (qsm_cache_mode_parse(optarg, &oo.cache) < 0) {
				cli_error("io", "Invalid cache option: %s", optarg);
				cli_opts_free(&o);
				return -EINVAL;
			}
			break;
		case 'i':
			if (strcmp(optarg, "threads") && strcmp(optarg, "io_uring")) {
				cli_error("io", "Invalid aio option: %s", optarg);
				cli_opts_free(&o);
				return -EINVAL;
			}
			oo.aio = !strcmp(optarg, "threads") ? "threads" : "io_uring";
			break;
		case 'o':
			if (cli_opts_parse(&o, optarg) < 0) {
				cli_opts_free(&o);
				return -ENOMEM;
			}
			break;
		default:
			usage_line(self);
			cli_opts_free(&o);
			return -EINVAL;
		}
	}
	/* As qemu-io: the file name may be left to the options (file.filename). */
	if (optind != argc - 1 && optind != argc) {
		usage_line(self);
		cli_opts_free(&o);
		return -EINVAL;
	}
	io->snap_next = snap;
	io->cor_next = cor;
	r = io_open_spec(io, optind < argc ? argv[optind] : NULL, &o, &oo, true);
	io->snap_next = io->cor_next = false;
	cli_opts_free(&o);
	return r < 0 ? -EINVAL : 0;
}

static int close_f(struct io_ctx *io, int argc, char **argv)
{
	return io_close(io);
}

/* qsm has no reopen: drain, close, open again with the new options, and
 * fall back to the old ones if that fails. */
static int reopen_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *self = find_cmd("reopen");
	struct qsm_open_opts oo = io->oo, old = io->oo;
	struct cli_opts o = { 0 };
	bool has_rw = false, has_cache = false, ro_opt = false;
	int c, r;

	while ((c = getopt(argc, argv, "c:o:rw")) != -1) {
		switch (c) {
		case 'c':
			if (qsm_cache_mode_parse(optarg, &oo.cache) < 0) {
				cli_error("io", "Invalid cache option: %s", optarg);
				cli_opts_free(&o);
				return -EINVAL;
			}
			has_cache = true;
			break;
		case 'o':
			if (cli_opts_parse(&o, optarg) < 0) {
				cli_opts_free(&o);
				return -ENOMEM;
			}
			ro_opt = cli_opts_get(&o, "read-only") != NULL;
			break;
		case 'r':
		case 'w':
			if (has_rw) {
				cli_error("io", "Only one -r/-w option may be given");
				cli_opts_free(&o);
				return -EINVAL;
			}
			oo.read_only = c == 'r';
			has_rw = true;
			break;
		default:
			usage_line(self);
			cli_opts_free(&o);
			return -EINVAL;
		}
	}
	if (optind != argc) {
		usage_line(self);
		cli_opts_free(&o);
		return -EINVAL;
	}
	if (ro_opt && has_rw) {
		cli_error("io", "Cannot set both -r/-w and 'read-only'");
		cli_opts_free(&o);
		return -EINVAL;
	}
	(void)has_cache;
	char *path = strdup(io->path);
	if (!path) {
		cli_opts_free(&o);
		return -ENOMEM;
	}
	/* QEMU's copy-on-read filter cannot be reopened; with -C, the image
	 * cannot become read-only. */
	if (io->cor == COR_FILTER || (io->cor == COR_FLAG && oo.read_only && !old.read_only) ||
	    (io->cor == COR_FLAG && ro_opt && cli_opts_get(&o, "read-only") &&
	     !strcmp(cli_opts_get(&o, "read-only"), "on"))) {
		if (io->cor == COR_FILTER)
			cli_error("io", "Block format 'copy-on-read' used by node '#block000' does not "
				  "support reopening files");
		else
			cli_error("io", "Can't set node '#block000' to r/o with copy-on-read enabled");
		free(path);
		cli_opts_free(&o);
		return -EINVAL;
	}
	/* -s: QEMU reopens the overlay by name to change its mode, and finds it
	 * gone (it unlinked it at open); the image stays as it was. */
	if (io->snap_tmp && oo.read_only != old.read_only) {
		cli_error("io", "Could not open '%s': No such file or directory", io->snap_tmp);
		free(path);
		cli_opts_free(&o);
		return -EINVAL;
	}
	io->reopening = true;
	io_close(io);
	r = io_open_spec(io, path, &o, &oo, false);
	if (r < 0 && io_open(io, path, &old) < 0)
		cli_error("io", "could not reopen %s with its old options either", path);
	io->reopening = false;
	free(path);
	cli_opts_free(&o);
	return r < 0 ? -EINVAL : 0;
}

/* --- quit, help, abort, sigraise, sleep ------------------------------------ */

static int quit_f(struct io_ctx *io, int argc, char **argv)
{
	io->quit = true;
	return 0;
}

static void help_oneline(const char *name, const struct io_cmd *c)
{
	printf("%s ", name);
	if (c->args)
		printf("%s ", c->args);
	printf("-- %s\n", c->oneline);
}

static int help_f(struct io_ctx *io, int argc, char **argv)
{
	const struct io_cmd *c;

	if (argc == 1) {
		help_all();
		return 0;
	}
	c = find_cmd(argv[1]);
	if (!c) {
		printf("command %s not found\n", argv[1]);
		return -EINVAL;
	}
	help_oneline(argv[1], c);
	if (c->help)
		fputs(c->help, stdout);
	return 0;
}

static int abort_f(struct io_ctx *io, int argc, char **argv)
{
	/* A crash: nothing written back or flushed to the image; the exit
	 * status is abort(3)'s.  Unlike qemu-io, earlier commands' output is
	 * not lost when stdout is a pipe: io_command() flushes after each. */
	if (io->img)
		qsm_abandon(io->img);
	qsm_tracer_close(io->tracer); /* the trace is the tool's, not the image's */
	_exit(128 + SIGABRT);
}

static int sigraise_f(struct io_ctx *io, int argc, char **argv)
{
	int64_t sig;
	int r = cli_cvtnum(argv[1], &sig);

	if (r < 0) {
		print_cvtnum_err(r, argv[1]);
		return r;
	} else if (sig > NSIG) {
		printf("signal argument '%s' is too large to be a valid signal\n", argv[1]);
		return -EINVAL;
	}
	fflush(stdout);
	fflush(stderr);
	raise((int)sig);
	return 0;
}

/* --- blkdebug breakpoints (qemu-io's break, remove_break, resume,
 *     wait_break; their messages on stdout as qemu-io's) ------------------- */

static int break_f(struct io_ctx *io, int argc, char **argv)
{
	enum qsm_io_event ev;
	int r = -ENOTSUP;
	if (io->bdio && qsm_blkdebug_event_parse(argv[1], &ev) == -ENOTSUP) {
		printf("Could not set breakpoint: blkdebug event '%s' is not supported by qsm "
		       "(its engine has no such step)\n", argv[1]);
		return -ENOTSUP;
	}
	if (io->bdio)
		r = qsm_io_blkdebug_break(io->bdio, argv[1], argv[2]);
	if (r < 0)
		printf("Could not set breakpoint: %s\n", strerror(-r));
	return r;
}

static int remove_break_f(struct io_ctx *io, int argc, char **argv)
{
	int r = io->bdio ? qsm_io_blkdebug_remove_break(io->bdio, argv[1]) : -ENOTSUP;
	if (r < 0)
		printf("Could not remove breakpoint %s: %s\n", argv[1], strerror(-r));
	return r;
}

static int resume_f(struct io_ctx *io, int argc, char **argv)
{
	int r = io->bdio ? qsm_io_blkdebug_resume(io->bdio, argv[1]) : -ENOTSUP;
	if (r < 0)
		printf("Could not resume request: %s\n", strerror(-r));
	return r;
}

/* Run the loop until a request is held at tag.  qemu-io waits forever when
 * none can come; qsm says so when no aio request is in flight. */
static int wait_break_f(struct io_ctx *io, int argc, char **argv)
{
	while (!qsm_io_blkdebug_is_suspended(io->bdio, argv[1])) {
		if (io->inflight == 0) {
			fflush(stdout);
			cli_error("io", "wait_break: no request in flight can stop at '%s'", argv[1]);
			return -EINVAL;
		}
		event_base_loop(io->base, EVLOOP_ONCE);
	}
	return 0;
}

static void sleep_cb(evutil_socket_t fd, short what, void *opaque)
{
	*(bool *)opaque = true;
}

static int sleep_f(struct io_ctx *io, int argc, char **argv)
{
	char *end;
	long ms = strtol(argv[1], &end, 0);
	bool expired = false;

	if (ms < 0 || *end != '\0') {
		printf("%s is not a valid number\n", argv[1]);
		return -EINVAL;
	}
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
	if (event_base_once(io->base, -1, EV_TIMEOUT, sleep_cb, &expired, &tv) < 0)
		return -ENOMEM;
	while (!expired)
		event_base_loop(io->base, EVLOOP_ONCE);
	return 0;
}

/* --- The table (alphabetical: `help` lists it in this order) -------------- */

static const struct io_cmd io_cmds[] = {
	{ "abort", NULL, abort_f, 0, 0, CMD_NOFILE_OK, NULL,
	  "simulate a program crash using abort(3)", NULL },
	{ "aio_flush", NULL, aio_flush_f, 0, 0, 0, NULL,
	  "completes all outstanding aio requests", NULL },
	{ "aio_read", NULL, aio_read_f, 2, -1, 0, "[-Ciqv] [-P pattern] off len [len..]",
	  "asynchronously reads a number of bytes",
	  "\n"
	  " asynchronously reads a range of bytes from the given offset\n"
	  "\n"
	  " Example:\n"
	  " 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file\n"
	  "\n"
	  " Reads a segment of the currently open file, optionally dumping it to the\n"
	  " standard output stream (with -v option) for subsequent inspection.\n"
	  " The read is performed asynchronously and the aio_flush command must be\n"
	  " used to ensure all outstanding aio requests have been completed.\n"
	  " Note that due to its asynchronous nature, this command will be\n"
	  " considered successful once the request is submitted, independently\n"
	  " of potential I/O errors or pattern mismatches.\n"
	  " -C, -- report statistics in a machine parsable format\n"
	  " -P, -- use a pattern to verify read data\n"
	  " -i, -- treat request as invalid, for exercising stats\n"
	  " -v, -- dump buffer to standard output\n"
	  " -q, -- quiet mode, do not show I/O statistics\n"
	  "\n" },
	{ "aio_write", NULL, aio_write_f, 2, -1, CMD_WRITE, "[-Cfiquz] [-P pattern] off len [len..]",
	  "asynchronously writes a number of bytes",
	  "\n"
	  " asynchronously writes a range of bytes from the given offset source\n"
	  " from multiple buffers\n"
	  "\n"
	  " Example:\n"
	  " 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file\n"
	  "\n"
	  " Writes into a segment of the currently open file, using a buffer\n"
	  " filled with a set pattern (0xcdcdcdcd).\n"
	  " The write is performed asynchronously and the aio_flush command must be\n"
	  " used to ensure all outstanding aio requests have been completed.\n"
	  " Note that due to its asynchronous nature, this command will be\n"
	  " considered successful once the request is submitted, independently\n"
	  " of potential I/O errors or pattern mismatches.\n"
	  " -P, -- use different pattern to fill file\n"
	  " -C, -- report statistics in a machine parsable format\n"
	  " -f, -- use Force Unit Access semantics\n"
	  " -i, -- treat request as invalid, for exercising stats\n"
	  " -q, -- quiet mode, do not show I/O statistics\n"
	  " -u, -- with -z, allow unmapping\n"
	  " -z, -- write zeroes using blk_aio_pwrite_zeroes\n"
	  "\n" },
	{ "alloc", "a", alloc_f, 1, 2, 0, "offset [count]",
	  "checks if offset is allocated in the file", NULL },
	{ "break", NULL, break_f, 2, 2, 0, "event tag",
	  "sets a breakpoint on event and tags the stopped request as tag", NULL },
	{ "close", "c", close_f, 0, 0, 0, NULL, "close the current open file", NULL },
	{ "discard", "d", discard_f, 2, -1, CMD_WRITE, "[-Cq] off len",
	  "discards a number of bytes at a specified offset",
	  "\n"
	  " discards a range of bytes from the given offset\n"
	  "\n"
	  " Example:\n"
	  " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file\n"
	  "\n"
	  " Discards a segment of the currently open file.\n"
	  " -C, -- report statistics in a machine parsable format\n"
	  " -q, -- quiet mode, do not show I/O statistics\n"
	  "\n" },
	{ "flush", "f", flush_f, 0, 0, 0, NULL, "flush all in-core file state to disk", NULL },
	{ "help", "?", help_f, 0, 1, CMD_GLOBAL, "[command]", "help for one or all commands",
	  NULL },
	{ "info", "i", info_f, 0, 0, 0, NULL, "prints information about the current file", NULL },
	{ "length", "l", length_f, 0, 0, 0, NULL, "gets the length of the current file", NULL },
	{ "map", NULL, map_f, 0, 0, 0, "", "prints the allocated areas of a file", NULL },
	{ "open", "o", open_f, 1, -1, CMD_NOFILE_OK, "[-rsCnU] [-t cache] [-i aio] [-o options] [path]",
	  "open the file specified by path",
	  "\n"
	  " opens a new file in the requested mode\n"
	  "\n"
	  " Example:\n"
	  " 'open -n -o l2-cache-size=4M /tmp/data' - opens an image read-write, uncached\n"
	  "\n"
	  " Opens a file for subsequent use by all of the other qemu-io commands.\n"
	  " -r, -- open file read-only\n"
	  " -s, -- use snapshot file\n"
	  " -C, -- use copy-on-read\n"
	  " -n, -- disable host cache, short for -t none\n"
	  " -U, -- force shared permissions (accepted, no effect)\n"
	  " -i, -- use AIO mode (threads or io_uring)\n"
	  " -t, -- use the given cache mode for the image\n"
	  " -o, -- options (driver=qcow2, read-only, cache.direct, cache.no-flush,\n"
	  "        l2-cache-size, aio, backing.driver)\n" },
	{ "quit", "q", quit_f, -1, -1, CMD_GLOBAL, NULL, "exit the program", NULL },
	{ "read", "r", read_f, 2, -1, 0, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
	  "reads a number of bytes at a specified offset",
	  "\n"
	  " reads a range of bytes from the given offset\n"
	  "\n"
	  " Example:\n"
	  " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file\n"
	  "\n"
	  " Reads a segment of the currently open file, optionally dumping it to the\n"
	  " standard output stream (with -v option) for subsequent inspection.\n"
	  " -b, -- read from the VM state rather than the virtual disk\n"
	  " -C, -- report statistics in a machine parsable format\n"
	  " -l, -- length for pattern verification (only with -P)\n"
	  " -p, -- ignored for backwards compatibility\n"
	  " -P, -- use a pattern to verify read data\n"
	  " -q, -- quiet mode, do not show I/O statistics\n"
	  " -s, -- start offset for pattern verification (only with -P)\n"
	  " -v, -- dump buffer to standard output\n"
	  "\n" },
	{ "readv", NULL, readv_f, 2, -1, 0, "[-Cqv] [-P pattern] off len [len..]",
	  "reads a number of bytes at a specified offset",
	  "\n"
	  " reads a range of bytes from the given offset into multiple buffers\n"
	  "\n"
	  " Example:\n"
	  " 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file\n"
	  "\n"
	  " Reads a segment of the currently open file, optionally dumping it to the\n"
	  " standard output stream (with -v option) for subsequent inspection.\n"
	  " Uses multiple iovec buffers if more than one byte range is specified.\n"
	  " -C, -- report statistics in a machine parsable format\n"
	  " -P, -- use a pattern to verify read data\n"
	  " -v, -- dump buffer to standard output\n"
	  " -q, -- quiet mode, do not show I/O statistics\n"
	  "\n" },
	{ "remove_break", NULL, remove_break_f, 1, 1, 0, "tag", "remove a breakpoint by tag",
	  NULL },
	{ "reopen", NULL, reopen_f, 0, -1, 0, "[(-r|-w)] [-c cache] [-o options]",
	  "reopens an image with new options",
	  "\n"
	  " Changes the open options of an already opened image\n"
	  " (qsm closes the image and opens it again)\n"
	  "\n"
	  " Example:\n"
	  " 'reopen -r' - reopens the image read-only\n"
	  "\n"
	  " -r, -- Reopen the image read-only\n"
	  " -w, -- Reopen the image read-write\n"
	  " -c, -- Change the cache mode to the given value\n"
	  " -o, -- Changes block driver options (cf. 'open' command)\n"
	  "\n" },
	{ "resume", NULL, resume_f, 1, 1, 0, "tag", "resumes the request tagged as tag", NULL },
	{ "sigraise", NULL, sigraise_f, 1, 1, CMD_NOFILE_OK, "signal", "raises a signal",
	  "\n"
	  " raises the given signal\n"
	  "\n"
	  " Example:\n"
	  " 'sigraise 15' - raises SIGTERM\n"
	  "\n"
	  " Invokes raise(signal), where \"signal\" is the mandatory integer argument\n"
	  " given to sigraise.\n"
	  "\n" },
	{ "sleep", NULL, sleep_f, 1, 1, CMD_NOFILE_OK, NULL,
	  "waits for the given value in milliseconds", NULL },
	{ "truncate", "t", truncate_f, 1, 3, CMD_WRITE, "[-m prealloc_mode] off",
	  "truncates the current file at the given offset", NULL },
	{ "wait_break", NULL, wait_break_f, 1, 1, 0, "tag",
	  "waits for the suspension of a request", NULL },
	{ "write", "w", write_f, 2, -1, CMD_WRITE,
	  "[-bcCfnquz] [-P pattern | -s source_file] off len",
	  "writes a number of bytes at a specified offset",
	  "\n"
	  " writes a range of bytes from the given offset\n"
	  "\n"
	  " Example:\n"
	  " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file\n"
	  "\n"
	  " Writes into a segment of the currently open file, using a buffer\n"
	  " filled with a set pattern (0xcdcdcdcd).\n"
	  " -b, -- write to the VM state rather than the virtual disk\n"
	  " -c, -- write compressed data with blk_write_compressed\n"
	  " -f, -- use Force Unit Access semantics\n"
	  " -n, -- with -z, don't allow slow fallback\n"
	  " -p, -- ignored for backwards compatibility\n"
	  " -P, -- use different pattern to fill file\n"
	  " -s, -- use a pattern file to fill the write buffer\n"
	  " -C, -- report statistics in a machine parsable format\n"
	  " -q, -- quiet mode, do not show I/O statistics\n"
	  " -u, -- with -z, allow unmapping\n"
	  " -z, -- write zeroes using blk_co_pwrite_zeroes\n"
	  "\n" },
	{ "writev", NULL, writev_f, 2, -1, CMD_WRITE, "[-Cfq] [-P pattern] off len [len..]",
	  "writes a number of bytes at a specified offset",
	  "\n"
	  " writes a range of bytes from the given offset source from multiple buffers\n"
	  "\n"
	  " Example:\n"
	  " 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file\n"
	  "\n"
	  " Writes into a segment of the currently open file, using a buffer\n"
	  " filled with a set pattern (0xcdcdcdcd).\n"
	  " -P, -- use different pattern to fill file\n"
	  " -C, -- report statistics in a machine parsable format\n"
	  " -f, -- use Force Unit Access semantics\n"
	  " -q, -- quiet mode, do not show I/O statistics\n"
	  "\n" },
};
static const size_t io_ncmds = sizeof(io_cmds) / sizeof(io_cmds[0]);

static const struct io_cmd *find_cmd(const char *name)
{
	for (size_t i = 0; i < io_ncmds; i++)
		if (!strcmp(io_cmds[i].name, name) ||
		    (io_cmds[i].altname && !strcmp(io_cmds[i].altname, name)))
			return &io_cmds[i];
	return NULL;
}

static void help_all(void)
{
	for (size_t i = 0; i < io_ncmds; i++)
		help_oneline(io_cmds[i].name, &io_cmds[i]);
	printf("\nUse 'help commandname' for extended help.\n");
}

/* --- The command loop ------------------------------------------------------ */

/* Run one command line; returns 0 or a negative errno (the command failed). */
static int io_command(struct io_ctx *io, const char *line)
{
	char *input = strdup(line), *p = input, *tok;
	char **argv = NULL;
	int argc = 0, ret = 0;

	if (!input)
		return -ENOMEM;
	/* breakline(): single spaces separate; empty fields are skipped. */
	while ((tok = strsep(&p, " ")) != NULL) {
		if (!*tok)
			continue;
		char **nv = realloc(argv, (size_t)(argc + 2) * sizeof(*argv));
		if (!nv) {
			ret = -ENOMEM;
			goto out;
		}
		argv = nv;
		argv[argc++] = tok;
		argv[argc] = NULL;
	}
	if (!argc)
		goto out;
	const struct io_cmd *c = find_cmd(argv[0]);
	if (!c) {
		fflush(stdout);
		fprintf(stderr, "command \"%s\" not found\n", argv[0]);
		ret = -EINVAL;
		goto out;
	}
	if (!(c->flags & CMD_GLOBAL)) {
		if (!(c->flags & CMD_NOFILE_OK) && !io->img) {
			fflush(stdout);
			fprintf(stderr, "no file open, try 'help open'\n");
			ret = -EINVAL;
			goto out;
		}
		if (argc - 1 < c->argmin || (c->argmax != -1 && argc - 1 > c->argmax)) {
			fflush(stdout);
			if (c->argmax == -1)
				fprintf(stderr, "bad argument count %d to %s, expected at least %d arguments\n",
					argc - 1, argv[0], c->argmin);
			else if (c->argmin == c->argmax)
				fprintf(stderr, "bad argument count %d to %s, expected %d arguments\n",
					argc - 1, argv[0], c->argmin);
			else
				fprintf(stderr, "bad argument count %d to %s, expected between %d and %d arguments\n",
					argc - 1, argv[0], c->argmin, c->argmax);
			ret = -EINVAL;
			goto out;
		}
		if ((c->flags & CMD_WRITE) && io->oo.read_only) {
			fflush(stdout);
			cli_error("io", "Block node is read-only");
			ret = -EPERM;
			goto out;
		}
	}
	optind = 0;
	ret = c->fn(io, argc, argv);
	/* qemu-io's stdout stays identical; the reason the engine found (a
	 * corruption, an unsupported feature) goes to stderr, once. */
	if (io->img && qsm_image_error(io->img)[0] &&
	    strcmp(qsm_image_error(io->img), io->last_err) != 0) {
		snprintf(io->last_err, sizeof(io->last_err), "%s", qsm_image_error(io->img));
		fflush(stdout);
		print_image_error(io->last_err);
	}
out:
	free(argv);
	free(input);
	fflush(stdout);
	return ret;
}

static void io_usage(FILE *f)
{
	const char *name = cli_as_qemu() ? cli_progname() : "qsm io";

	fprintf(f,
		"Usage: %s [OPTIONS]... [-c STRING]... [file]\n"
		"qsm disk exerciser: the qemu-io command language over libqsm\n"
		"\n"
		"  -c, --cmd STRING     execute command with its arguments\n"
		"                       from the given string\n"
		"  -f, --format FMT     specifies the block driver to use (qcow2 or raw)\n"
		"  -r, --read-only      export read-only\n"
		"  -s, --snapshot       use snapshot file\n"
		"  -C, --copy-on-read   enable copy-on-read\n"
		"  -n, --nocache        disable host cache, short for -t none\n"
		"  -m, --misalign       misalign allocations for O_DIRECT\n"
		"  -i, --aio=MODE       use AIO mode (threads or io_uring)\n"
		"  -t, --cache=MODE     use the given cache mode for the image\n"
		"                       (writeback, none, writethrough (default),\n"
		"                       directsync, unsafe)\n"
		"  -T, --trace FILE     write a timeline of every request, state by state, to\n"
		"                       FILE (Chrome Trace Event JSON: Perfetto, chrome://tracing)\n"
		"      --trace-text FILE  one line per request, state by state, to FILE\n"
		"                       ('-': standard error)\n"
		"      --backing-format FMT  format of the backing file (qcow2 or raw) when\n"
		"                       the image does not record it (qsm never probes)\n"
		"      --image-opts     treat file as option string\n"
		"      --no-backing     do not open the backing file (with -r only): the\n"
		"                       unallocated clusters read as zeros (qsm only)\n"
		"  -U, --force-share    force shared permissions (accepted, no effect)\n"
		"  -h, --help           display this help and exit\n"
		"  -V, --version        output version information and exit\n"
		"\n"
		"See '%s -c help' for information on available commands.\n", name, name);
}

int cmd_io(int argc, char **argv)
{
	enum { OPT_BACKING_FORMAT = 256, OPT_NO_BACKING, OPT_TRACE_TEXT, OPT_IMAGE_OPTS };
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "cmd", required_argument, NULL, 'c' },
		{ "format", required_argument, NULL, 'f' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "nocache", no_argument, NULL, 'n' },
		{ "misalign", no_argument, NULL, 'm' },
		{ "aio", required_argument, NULL, 'i' },
		{ "cache", required_argument, NULL, 't' },
		{ "trace", required_argument, NULL, 'T' },
		{ "trace-text", required_argument, NULL, OPT_TRACE_TEXT },
		{ "force-share", no_argument, NULL, 'U' },
		{ "backing-format", required_argument, NULL, OPT_BACKING_FORMAT },
		{ "no-backing", no_argument, NULL, OPT_NO_BACKING },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "snapshot", no_argument, NULL, 's' },
		{ "copy-on-read", no_argument, NULL, 'C' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	struct io_ctx io = { 0 };
	struct qsm_open_opts oo = { .cache = QSM_CACHE_WRITETHROUGH };
	const char *fmt = NULL, *trace_path = NULL, *trace_text = NULL;
	struct cli_opts opts = { 0 };
	bool image_opts = false;
	char **cmds = NULL;
	int ncmds = 0, c, failed = 0;

	optind = 0;
	while ((c = getopt_long(argc, argv, "hc:f:rsCnmi:t:T:UV", lopt, NULL)) != -1) {
		switch (c) {
		case 'h':
			io_usage(stdout);
			free(cmds);
			return 0;
		case 'V': {
			const char *ver;
			qsm_version(&ver);
			if (cli_as_qemu())
				printf("%s version %s (qsm)\n", cli_progname(), ver);
			else
				printf("qsm version %s\n", ver);
			free(cmds);
			return 0;
		}
		case 'c': {
			char **nc = realloc(cmds, (size_t)(ncmds + 1) * sizeof(*cmds));
			if (!nc) {
				free(cmds);
				return 1;
			}
			cmds = nc;
			cmds[ncmds++] = optarg;
			break;
		}
		case 'f':
			fmt = optarg;
			break;
		case 'r':
			oo.read_only = true;
			break;
		case 's':
			io.snap_next = true;
			break;
		case 'C':
			io.cor_next = true;
			break;
		case 'n':
			oo.cache = QSM_CACHE_NONE;
			break;
		case 'm':
			io.misalign = true;
			break;
		case 'i':
			if (strcmp(optarg, "threads") && strcmp(optarg, "io_uring")) {
				cli_error("io", "Invalid aio option: %s", optarg);
				free(cmds);
				return 1;
			}
			oo.aio = !strcmp(optarg, "threads") ? "threads" : "io_uring";
			break;
		case 't':
			if (qsm_cache_mode_parse(optarg, &oo.cache) < 0) {
				cli_error("io", "Invalid cache option: %s", optarg);
				free(cmds);
				return 1;
			}
			break;
		case 'T':
			trace_path = optarg;
			break;
		case OPT_TRACE_TEXT:
			trace_text = optarg;
			break;
		case 'U':
			break;
		case OPT_BACKING_FORMAT:
			oo.backing_format = optarg;
			break;
		case OPT_NO_BACKING:
			oo.no_backing = true;
			break;
		case OPT_IMAGE_OPTS:
			image_opts = true;
			break;
		default:
			/* qemu-io prints its usage on stdout after getopt's line. */
			io_usage(cli_as_qemu() ? stdout : stderr);
			free(cmds);
			return 1;
		}
	}
	if (argc - optind > 1) {
		io_usage(cli_as_qemu() ? stdout : stderr);
		free(cmds);
		return 1;
	}
	if (image_opts && fmt) {
		cli_error("io", "--image-opts and -f are mutually exclusive");
		free(cmds);
		return 1;
	}
	/* As qemu-io: -f FMT is the option driver=FMT of the open, so a bad
	 * name is the open's error ("can't open device F: Unknown driver"). */
	if ((fmt && cli_opts_add(&opts, "driver", fmt, false) < 0) ||
	    (image_opts && argc - optind == 1 && cli_opts_parse(&opts, argv[optind]) < 0)) {
		cli_opts_free(&opts);
		free(cmds);
		return 1;
	}
	oo.format = NULL; /* -f, or driver= in --image-opts; else probed */
	oo.probe_format = true;
	io.oo = oo;
	io.base = event_base_new();
	if (!io.base) {
		cli_error("io", "cannot create an event loop");
		free(cmds);
		return 1;
	}
	if (qsm_tracer_open("io", trace_path, trace_text,
			    argc - optind == 1 ? argv[optind] : "qsm io", &io.tracer) < 0) {
		failed = 1;
		goto out;
	}
	if (argc - optind == 1 &&
	    io_open_spec(&io, image_opts ? NULL : argv[optind], &opts, &oo, true) < 0) {
		failed = 1;
		goto out;
	}
	io.snap_next = io.cor_next = false; /* for the image of the command line */

	if (ncmds) {
		for (int i = 0; i < ncmds && !io.quit; i++)
			if (io_command(&io, cmds[i]) < 0)
				failed = 1;
	} else {
		char *line = NULL;
		size_t cap = 0;
		ssize_t n;
		/* qemu-io prompts whether or not stdin is a terminal. */
		while (!io.quit) {
			printf("%s", IO_PROMPT);
			fflush(stdout);
			if ((n = getline(&line, &cap, stdin)) < 0)
				break;
			if (n > 0 && line[n - 1] == '\n')
				line[n - 1] = '\0';
			if (io_command(&io, line) < 0)
				failed = 1;
		}
		free(line);
	}
	/* Like qemu-io: wait for outstanding aio requests, then close. */
	if (io_close(&io) < 0)
		failed = 1;
out:
	if (qsm_tracer_close(io.tracer) < 0)
		failed = 1;
	cli_opts_free(&opts);
	free(io.path);
	free(cmds);
	event_base_free(io.base);
	fflush(stdout);
	return failed;
}
