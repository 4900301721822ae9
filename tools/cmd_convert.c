/*
 * tools/cmd_convert.c: `qsm convert`, qemu-img convert between qcow2 and raw.
 *
 *   qsm convert [-p] [-q] [-c] [-f FMT] [-O qcow2|raw] [-o OPTIONS]
 *               [-B BACKING -F BFMT] [-t CACHE] [-T SRC_CACHE] [-m N]
 *               [--bitmaps [--skip-broken-bitmaps]] SRC DST
 *
 * Design.
 *  1. Plan (blocking, before any data moves): the source's block status is
 *     walked once into a list of extents, each DATA (must be copied), ZERO
 *     (reads as zeros) or BACKING (left to the target's backing file):
 *      - without -B the whole chain is flattened: cli_chain_status(), as
 *        bdrv_block_status_above(src, NULL);
 *      - with -B only the source's top layer counts, as qemu-img convert
 *        -B does (base = the source's backing image): what the top does
 *        not allocate is left unallocated, so the new backing file shows
 *        through there; zeros the top records become zero writes (v3 zero
 *        clusters) unless they lie past the end of the new backing file.
 *  2. Copy (a pipeline on the event loop): the target is cut into units
 *     (clusters of a qcow2 target, at least 4 KiB, qemu-img's -S default;
 *     4 KiB for raw or preallocated targets) and units of
 *     one kind are grouped into tasks of at most `chunk` bytes.  `slots`
 *     tasks run at once, each with its own buffer: qsm_readv from the
 *     source, then for each run of units in the buffer one qsm_writev (or
 *     qsm_write_compressed with -c) to the target; units that read as all
 *     zeros are not written at all (the new target reads zeros there), or
 *     written as zeros where a backing file would otherwise show through.
 *     A finished task frees its slot and the next task starts from that
 *     completion: reads and writes of different tasks overlap, and with -c
 *     the worker pool deflates the clusters of many tasks in parallel.
 *  3. With --bitmaps, copy the source's persistent dirty bitmaps (as
 *     qemu-img's convert_copy_bitmaps, after the data so that its writes
 *     set no bits): each is added to the target with its name,
 *     granularity and enabled state, then merged from the source
 *     (qsm_bitmap_add, qsm_bitmap_merge).  What qemu-img refuses is
 *     refused first, in its words: a source without bitmap support (raw,
 *     v2), an inconsistent (in-use) bitmap unless --skip-broken-bitmaps
 *     (then skipped with a warning), a target that cannot hold bitmaps
 *     (raw, compat=0.10).  qemu-img creates that last target before it
 *     refuses; qsm refuses before creating anything.
 *  4. Close both images (the target's metadata is written back then).
 * The target is created first (qcow2 through the -o parser qsm create uses,
 * raw as a sparse file of the source's size) and opened with cache=unsafe,
 * qemu-img convert's default (-t to change).  Errors are qemu-img's:
 * "error while reading/writing at byte N: ...", exit status 1.
 *
 * Invariants: tasks cover disjoint guest ranges, so writes never overlap;
 * a slot's buffer and iovecs stay untouched until its last write completed;
 * after the first error no new task starts, and the loop runs until every
 * request in flight has completed.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/util.h"
#include "sm/qsm.h"
#include "tools/cli.h"

enum cv_kind { CV_DATA, CV_ZERO, CV_BACKING };

struct cv_extent {
	uint64_t off, len;
	enum cv_kind kind;
};

struct cv_state;

/* One task in flight: a guest range, its buffer and its writes. */
struct cv_slot {
	struct cv_state *cv;
	bool busy;
	enum cv_kind kind;
	uint64_t off, len;
	uint8_t *buf;        /* chunk bytes */
	struct iovec *iov;   /* one per write of this task */
	int pending;         /* requests of this task not yet completed */
};

struct cv_state {
	struct qsm_image *src, *dst;
	uint64_t size;             /* bytes to convert: the source's virtual size */
	uint64_t dst_size;         /* the target's: size rounded up to 512 for qcow2 */
	uint64_t unit;             /* planning and zero-detection granularity */
	uint64_t chunk;            /* largest task */
	bool compress;
	bool zero_writes;          /* zeros must be written (target has a backing file) */
	uint64_t backing_size;     /* of the target's backing file */
	struct cv_extent *ext;
	size_t n_ext, ext_idx;
	uint64_t cursor;           /* next guest offset to plan */
	struct cv_slot *slots;
	int nslots, active;
	uint64_t work_total, work_done; /* bytes of tasks, for -p */
	int err;                   /* first error */
	bool done;
};

#define CV_MAX_SLOTS 64
enum { OPT_BITMAPS = 0x100, OPT_SKIP_BROKEN }; /* long options without a letter */

static void convert_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm convert [-p] [-q] [-c] [-f FMT] [-O FMT] [-o OPTIONS]\n"
		"                   [-B BACKING -F BFMT] [-t CACHE] [-T SRC_CACHE] [-m N] [-i AIO]\n"
		"                   [-l SNAPSHOT] [--bitmaps [--skip-broken-bitmaps]] SRC DST\n"
		"Copy an image into a new one, as 'qemu-img convert' does.\n"
		"\n"
		"  -f FMT       source format: qcow2 or raw; probed when not given\n"
		"  -O FMT       target format: raw (default, as qemu-img) or qcow2\n"
		"  -o OPTIONS   qcow2 target options, as 'qsm create -o' ('-o help' lists them)\n"
		"  -c           compress the target's clusters (qcow2)\n"
		"  -B BACKING   give the target this backing file and copy only what the\n"
		"               source's top image allocates (its own backing is left out)\n"
		"  -F BFMT      the backing file's format (required with -B)\n"
		"  -t CACHE     target cache mode (default unsafe); -T: source (default writeback)\n"
		"  -m N         tasks in flight, 1..%d (default 8; 16 with -c)\n"
		"  -i AIO       I/O backend for both images: threads or io_uring (default)\n"
		"  -l SNAPSHOT  copy the disk of the source's internal snapshot: an id or a\n"
		"               name (the id first), or snapshot.id=ID,snapshot.name=NAME\n"
		"  --bitmaps    copy the source's persistent dirty bitmaps (qcow2 v3 to qcow2 v3)\n"
		"  --skip-broken-bitmaps\n"
		"               with --bitmaps, leave out inconsistent ones (with a warning)\n"
		"               instead of refusing them\n"
		"  -p           show progress; -q: quiet\n"
		"Without -B the backing chain of the source is flattened.  Ranges that read\n"
		"as zeros are left unallocated (or written as zero clusters over a backing file).\n",
		CV_MAX_SLOTS);
}

/* --- plan ------------------------------------------------------------------ */

static int cv_add_extent(struct cv_state *cv, size_t *cap, uint64_t off, uint64_t len,
			 enum cv_kind kind)
{
	if (cv->n_ext && cv->ext[cv->n_ext - 1].kind == kind &&
	    cv->ext[cv->n_ext - 1].off + cv->ext[cv->n_ext - 1].len == off) {
		cv->ext[cv->n_ext - 1].len += len;
		return 0;
	}
	if (cv->n_ext == *cap) {
		size_t ncap = *cap ? *cap * 2 : 256;
		struct cv_extent *n = realloc(cv->ext, ncap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		cv->ext = n;
		*cap = ncap;
	}
	cv->ext[cv->n_ext++] = (struct cv_extent){ off, len, kind };
	return 0;
}

/* Walk the source's status into cv->ext (see the design note, 1). */
static int cv_plan(struct cv_state *cv, bool top_only)
{
	size_t cap = 0;
	uint64_t off = 0;
	int r;

	while (off < cv->size) {
		enum cv_kind kind;
		uint64_t len;
		if (top_only) {
			struct qsm_extent e;
			if ((r = qsm_sync_block_status(cv->src, off, cv->size - off, &e)) < 0)
				return r;
			len = e.length;
			kind = (e.flags & QSM_STATUS_ZERO) ? CV_ZERO :
			       (e.flags & QSM_STATUS_DATA) ? CV_DATA : CV_BACKING;
			/* Zeros past the new backing file's end need no writing
			 * (it reads as zeros there): split the run at that end. */
			if (kind == CV_ZERO && off >= cv->backing_size)
				kind = CV_BACKING;
			else if (kind == CV_ZERO && len > cv->backing_size - off)
				len = cv->backing_size - off;
		} else {
			struct cli_chain_status st;
			if ((r = cli_chain_status(cv->src, off, cv->size - off, &st)) < 0)
				return r;
			len = st.length;
			kind = (st.flags & QSM_STATUS_ZERO) || !(st.flags & QSM_STATUS_DATA) ?
			       CV_ZERO : CV_DATA;
		}
		if (len == 0 || len > cv->size - off)
			return -EIO;
		if ((r = cv_add_extent(cv, &cap, off, len, kind)) < 0)
			return r;
		off += len;
	}
	return 0;
}

/* The kind of the unit at u: DATA if any of it is data, ZERO or BACKING if
 * all of it is, and DATA (copied from the source) for a mix of zeros and
 * backing data, which no single cheaper write can express. */
static enum cv_kind cv_unit_kind(struct cv_state *cv, uint64_t u)
{
	uint64_t end = u + cv->unit < cv->size ? u + cv->unit : cv->size;
	bool zero = false, backing = false;

	while (cv->ext_idx < cv->n_ext &&
	       cv->ext[cv->ext_idx].off + cv->ext[cv->ext_idx].len <= u)
		cv->ext_idx++;
	for (size_t i = cv->ext_idx; i < cv->n_ext && cv->ext[i].off < end; i++) {
		if (cv->ext[i].kind == CV_DATA)
			return CV_DATA;
		if (cv->ext[i].kind == CV_ZERO)
			zero = true;
		else
			backing = true;
	}
	if (zero && backing)
		return CV_DATA;
	return zero ? CV_ZERO : CV_BACKING;
}

/* The next task from cv->cursor: a run of units of one kind. */
static void cv_next_task(struct cv_state *cv, uint64_t *off, uint64_t *len, enum cv_kind *kind)
{
	uint64_t u = cv->cursor;
	enum cv_kind k = cv_unit_kind(cv, u);

	*off = u;
	for (;;) {
		u += cv->unit;
		if (u >= cv->size) {
			u = cv->size;
			break;
		}
		if (k == CV_DATA && u - *off >= cv->chunk)
			break;
		if (cv_unit_kind(cv, u) != k)
			break;
	}
	*len = u - *off;
	*kind = k;
	cv->cursor = u;
}

/* --- copy ------------------------------------------------------------------ */

static void cv_pump(struct cv_state *cv);

static void cv_fail(struct cv_state *cv, bool writing, uint64_t off, int ret)
{
	if (cv->err)
		return;
	cv->err = ret;
	cli_error("convert", "error while %s at byte %" PRIu64 ": %s",
		  writing ? "writing" : "reading", off, qsm_strerror(ret));
}

static void cv_slot_done(struct cv_slot *s)
{
	struct cv_state *cv = s->cv;

	s->busy = false;
	cv->active--;
	cv->work_done += s->len;
	if (cv->work_total)
		cli_progress_set((float)((double)cv->work_done * 100 / (double)cv->work_total));
	cv_pump(cv);
}

static void cv_write_cb(void *opaque, int ret)
{
	struct cv_slot *s = opaque;

	if (ret < 0)
		cv_fail(s->cv, true, s->off, ret);
	if (--s->pending == 0)
		cv_slot_done(s);
}

static bool unit_is_zero(const uint8_t *p, uint64_t len)
{
	/* memcmp against itself shifted by 16: one pass, no zero buffer. */
	if (len < 16) {
		for (uint64_t i = 0; i < len; i++)
			if (p[i])
				return false;
		return true;
	}
	for (int i = 0; i < 16; i++)
		if (p[i])
			return false;
	return memcmp(p, p + 16, len - 16) == 0;
}

/* Submit one write of [off, +len) from the slot's buffer (or zeros). */
static void cv_submit_write(struct cv_slot *s, uint64_t off, uint64_t len, bool zero)
{
	struct cv_state *cv = s->cv;
	int r;

	if (zero) {
		r = qsm_write_zeroes(cv->dst, off, len, 0, cv_write_cb, s);
	} else {
		struct iovec *iov = &s->iov[s->pending];
		/* A compressed write must reach the end of the disk: the target
		 * may be longer than a raw source by a partial sector (the slot's
		 * buffer has room: the task ends inside its last unit). */
		if (cv->compress && off + len == cv->size && cv->dst_size > cv->size) {
			memset(s->buf + (cv->size - s->off), 0, cv->dst_size - cv->size);
			len = cv->dst_size - off;
		}
		iov->iov_base = s->buf + (off - s->off);
		iov->iov_len = len;
		r = cv->compress ? qsm_write_compressed(cv->dst, off, iov, 1, cv_write_cb, s)
				 : qsm_writev(cv->dst, off, iov, 1, cv_write_cb, s);
	}
	if (r < 0)
		cv_fail(cv, true, off, r);
	else
		s->pending++;
}

/* The source data of a task is in the buffer: write its non-zero runs. */
static void cv_read_cb(void *opaque, int ret)
{
	struct cv_slot *s = opaque;
	struct cv_state *cv = s->cv;

	s->pending = 0;
	if (ret < 0) {
		cv_fail(cv, false, s->off, ret);
	} else if (!cv->err) {
		uint64_t run = s->off, end = s->off + s->len;
		bool run_zero = false;
		for (uint64_t u = s->off; u < end;) {
			uint64_t ulen = end - u < cv->unit ? end - u : cv->unit;
			bool z = unit_is_zero(s->buf + (u - s->off), ulen);
			if (u > run && z != run_zero) {
				if (!run_zero || cv->zero_writes)
					cv_submit_write(s, run, u - run, run_zero);
				run = u;
			}
			if (u == run)
				run_zero = z;
			u += ulen;
		}
		if (!cv->err && (!run_zero || cv->zero_writes))
			cv_submit_write(s, run, end - run, run_zero);
	}
	if (s->pending == 0)
		cv_slot_done(s);
}

/* Start tasks while a slot is free (see the invariants above). */
static void cv_pump(struct cv_state *cv)
{
	while (!cv->err && cv->cursor < cv->size && cv->active < cv->nslots) {
		uint64_t off, len;
		enum cv_kind kind;
		cv_next_task(cv, &off, &len, &kind);
		if (kind == CV_BACKING || (kind == CV_ZERO && !cv->zero_writes))
			continue;
		struct cv_slot *s = NULL;
		for (int i = 0; i < cv->nslots && !s; i++)
			if (!cv->slots[i].busy)
				s = &cv->slots[i];
		*s = (struct cv_slot){ cv, true, kind, off, len, s->buf, s->iov, 0 };
		cv->active++;
		int r;
		if (kind == CV_ZERO) {
			r = qsm_write_zeroes(cv->dst, off, len, 0, cv_write_cb, s);
			s->pending = 1;
		} else {
			s->iov[0] = (struct iovec){ s->buf, len };
			r = qsm_readv(cv->src, off, &s->iov[0], 1, cv_read_cb, s);
		}
		if (r < 0) {
			cv_fail(cv, kind == CV_ZERO, off, r);
			s->busy = false;
			cv->active--;
		}
	}
	if (cv->active == 0 && (cv->err || cv->cursor >= cv->size))
		cv->done = true;
}

/* Bytes the tasks will move, for the progress figure. */
static uint64_t cv_work_total(struct cv_state *cv)
{
	uint64_t total = 0;

	for (size_t i = 0; i < cv->n_ext; i++)
		if (cv->ext[i].kind == CV_DATA || (cv->ext[i].kind == CV_ZERO && cv->zero_writes))
			total += cv->ext[i].len;
	return total;
}

/* --- bitmaps ---------------------------------------------------------------- */

/* --bitmaps before anything is created: can src give bitmaps, and is each
 * one consistent (or to be skipped)?  0, or -1 with qemu-img's message
 * (convert_check_bitmaps). */
static int cv_check_bitmaps(struct qsm_image *src, bool skip_broken)
{
	struct qsm_info info;

	qsm_get_info(src, &info);
	if (strcmp(info.format, "qcow2") || info.version < 3) {
		cli_error("convert", "Source lacks bitmap support");
		return -1;
	}
	for (unsigned i = 0; i < qsm_bitmap_count(src); i++) {
		struct qsm_bitmap_info b = { .struct_size = sizeof(b) };
		if (qsm_bitmap_get(src, i, &b) < 0 || skip_broken || !(b.flags & QSM_BITMAP_IN_USE))
			continue;
		cli_error("convert", "Cannot copy inconsistent bitmap '%s'", b.name);
		fprintf(stderr, "Try --skip-broken-bitmaps, or use '%s bitmap --remove' to delete it\n",
			cli_as_qemu() ? "qemu-img" : "qsm");
		return -1;
	}
	return 0;
}

/* After the data: each consistent bitmap of src added to dst as it is
 * (name, granularity, enabled) and its bits merged in; in-use ones were
 * refused by cv_check_bitmaps or are skipped.  0, or -1 with qemu-img's
 * message (convert_copy_bitmaps), the bitmap that failed to fill removed. */
static int cv_copy_bitmaps(struct qsm_image *src, struct qsm_image *dst)
{
	char err[512];

	for (unsigned i = 0; i < qsm_bitmap_count(src); i++) {
		struct qsm_bitmap_info b = { .struct_size = sizeof(b) };
		int r = qsm_bitmap_get(src, i, &b), d;
		if (r < 0)
			return -1;
		if (b.flags & QSM_BITMAP_IN_USE) {
			cli_error("convert", "warning: Skipping inconsistent bitmap '%s'", b.name);
			continue;
		}
		err[0] = 0;
		r = qsm_bitmap_add(dst, b.name, b.granularity, b.flags & QSM_BITMAP_AUTO, err,
				   sizeof(err));
		if (r < 0) {
			cli_error("convert", "Failed to create bitmap %s: %s", b.name,
				  err[0] ? err : qsm_strerror(r));
			return -1;
		}
		d = qsm_bitmap_find(dst, b.name);
		err[0] = 0;
		r = d < 0 ? d : qsm_bitmap_merge(dst, (unsigned)d, src, i, err, sizeof(err));
		if (r < 0) {
			cli_error("convert", "Failed to populate bitmap %s: %s", b.name,
				  err[0] ? err : qsm_strerror(r));
			if (d >= 0)
				qsm_bitmap_remove(dst, (unsigned)d, err, sizeof(err));
			return -1;
		}
	}
	return 0;
}

/* --- command ---------------------------------------------------------------- */

/* A sparse raw file of `size` bytes whose first block is allocated (zeros),
 * as QEMU's file driver creates it (allocate_first_block(): so that block
 * size probing works on it later). */
static int create_raw(const char *path, uint64_t size)
{
	static const char zeros[4096];
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	size_t first = size < sizeof(zeros) ? 512 : sizeof(zeros);
	int r = 0;

	if (fd < 0 || ftruncate(fd, (off_t)size) < 0 ||
	    (size && pwrite(fd, zeros, first, 0) != (ssize_t)first))
		r = fd < 0 || errno ? -errno : -EIO;
	if (fd >= 0)
		close(fd);
	if (r < 0)
		cli_error("convert", "%s: Could not create '%s': %s", path, path, strerror(-r));
	return r;
}

/* qemu-img's -l snapshot.id=ID,snapshot.name=NAME (QemuOpts: other keys
 * refused with its messages).  0 or -1 (reported). */
static int parse_snapshot_param(const char *arg, char **id, char **name)
{
	char *copy = strdup(arg), *save = NULL;
	int ret = 0;
	if (!copy)
		return -1;
	for (char *kv = strtok_r(copy, ",", &save); kv && !ret; kv = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(kv, '=');
		char **slot = NULL;
		if (eq)
			*eq = 0;
		if (!strcmp(kv, "snapshot.id"))
			slot = id;
		else if (!strcmp(kv, "snapshot.name"))
			slot = name;
		if (!slot) {
			cli_error("convert", "Invalid parameter '%s'", kv);
			ret = -1;
		} else {
			free(*slot);
			*slot = strdup(eq ? eq + 1 : "on");
		}
	}
	free(copy);
	if (ret < 0)
		cli_error("convert", "Failed in parsing snapshot param '%s'", arg);
	return ret;
}

int cmd_convert(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "aio", required_argument, NULL, 'i' },
		{ "bitmaps", no_argument, NULL, OPT_BITMAPS },
		{ "skip-broken-bitmaps", no_argument, NULL, OPT_SKIP_BROKEN },
		{ NULL, 0, NULL, 0 },
	};
	/* No -f: the source is probed.  The target is never: -O names it. */
	const char *fmt = NULL, *out_fmt = "raw", *backing = NULL, *backing_fmt = NULL;
	const char *src_name, *dst_name, *aio = NULL;
	const char *snap = NULL;           /* -l ID_OR_NAME */
	char *snap_id = NULL, *snap_name = NULL; /* -l snapshot.id=...,snapshot.name=... */
	bool snap_opts = false;
	enum qsm_cache_mode src_cache = QSM_CACHE_WRITEBACK, dst_cache = QSM_CACHE_UNSAFE;
	bool progress = false, quiet = false, compress = false, opts_given = false;
	bool prealloc_off = true, bitmaps = false, skip_broken = false;
	struct cli_opts opts = { 0 };
	struct cv_state cv = { 0 };
	struct event_base *base = NULL;
	char err[1024] = "";
	int c, r, ret = 1, nslots = 0;

	optind = 0;
	while ((c = cli_getopt_long(argc, argv, "hf:O:o:B:F:ct:T:m:pqUi:l:", lopt)) != -1) {
		switch (c) {
		case 'h':
			convert_usage(stdout);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case 'O':
			out_fmt = optarg;
			break;
		case 'o':
			if (!strcmp(optarg, "help") || !strcmp(optarg, "?")) {
				char *hargv[] = { (char *)"create", (char *)"-o", (char *)"help", NULL };
				cli_opts_free(&opts);
				return cmd_create(3, hargv);
			}
			if (cli_opts_parse(&opts, optarg) < 0)
				goto out;
			opts_given = true;
			break;
		case 'B':
			backing = optarg;
			break;
		case 'F':
			backing_fmt = optarg;
			break;
		case 'c':
			compress = true;
			break;
		case 't':
		case 'T':
			if (qsm_cache_mode_parse(optarg, c == 't' ? &dst_cache : &src_cache) < 0) {
				cli_error("convert", "Invalid %scache option: %s", c == 't' ? "" : "source ",
					  optarg);
				goto out;
			}
			break;
		case 'm': {
			char *end;
			long v = strtol(optarg, &end, 10);
			if (*end || v < 1 || v > CV_MAX_SLOTS) {
				cli_error("convert", "Invalid number of coroutines. Allowed number of "
					  "coroutines is between 1 and %d", CV_MAX_SLOTS);
				goto out;
			}
			nslots = (int)v;
			break;
		}
		case 'p':
			progress = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 'U':
			break;
		case 'i':
			aio = optarg;
			break;
		case OPT_BITMAPS:
			bitmaps = true;
			break;
		case OPT_SKIP_BROKEN:
			skip_broken = true;
			break;
		case 'l':
			if (strncmp(optarg, "snapshot.", 9) == 0) {
				if (parse_snapshot_param(optarg, &snap_id, &snap_name) < 0)
					goto out;
				snap_opts = true;
			} else {
				snap = optarg;
			}
			break;
		default:
			cli_help_hint("convert");
			goto out;
		}
	}
	if (quiet)
		progress = false;
	if (skip_broken && !bitmaps) {
		cli_error("convert", "Use of --skip-broken-bitmaps requires --bitmaps");
		goto out;
	}
	if (argc - optind < 2) {
		cli_error("convert", "Must specify image file name");
		goto out;
	}
	if (argc - optind > 2) {
		cli_error("convert", "At most one source image is supported by qsm");
		goto out;
	}
	src_name = argv[optind];
	dst_name = argv[optind + 1];
	if (cli_check_format("convert", fmt, true) < 0)
		goto out;
	if (strcmp(out_fmt, "qcow2") && strcmp(out_fmt, "raw")) {
		cli_error("convert", "Unknown file format '%s'", out_fmt);
		goto out;
	}
	bool out_raw = !strcmp(out_fmt, "raw");
	if (out_raw && compress) {
		cli_error("convert", "Compression not supported for this file format");
		goto out;
	}
	if (out_raw && backing) {
		cli_error("convert", "Backing file not supported for file format 'raw'");
		goto out;
	}
	if (out_raw && opts_given) {
		cli_error("convert", "Options (-o) are supported for qcow2 targets only");
		goto out;
	}
	if (backing && !backing_fmt) {
		cli_error("convert", "Use of backing file requires explicit backing format");
		goto out;
	}

	/* Phase 1 of the target's options before anything is opened. */
	struct cli_create_params cp;
	if (!out_raw) {
		if (backing) {
			if (cli_opts_parse(&opts, "backing_file=,backing_fmt=") < 0)
				goto out;
			free(opts.v[opts.n - 2].val);
			free(opts.v[opts.n - 1].val);
			opts.v[opts.n - 2].val = strdup(backing);
			opts.v[opts.n - 1].val = strdup(backing_fmt);
		}
		if (cli_create_parse("convert", "", &opts, &cp) < 0)
			goto out;
	}

	base = event_base_new();
	if (!base) {
		cli_error("convert", "cannot create an event loop");
		goto out;
	}
	struct qsm_open_opts so = { .read_only = true, .no_repair = true, .format = fmt,
				    .probe_format = !fmt,
				    .cache = src_cache, .aio = aio,
				    .snapshot_id = snap_opts ? snap_id : snap,
				    .snapshot_name = snap_opts ? snap_name : NULL };
	r = qsm_open(base, src_name, &so, &cv.src, err, sizeof(err));
	if (r == -ENOENT && snap) {
		/* As qemu-img's bdrv_snapshot_load_tmp_by_id_or_name: by id,
		 * then by name. */
		so.snapshot_id = NULL;
		so.snapshot_name = snap;
		r = qsm_open(base, src_name, &so, &cv.src, err, sizeof(err));
	}
	if (r < 0 && (snap || snap_opts) && !strcmp(err, "Can't find snapshot")) {
		cli_error("convert", "Failed to load snapshot: %s", err);
		goto out;
	}
	if (r < 0) {
		cli_error("convert", "Could not open '%s': %s", src_name, err[0] ? err : qsm_strerror(r));
		goto out;
	}
	struct qsm_info info;
	qsm_get_info(cv.src, &info);
	cv.size = info.virtual_size;
	if (bitmaps && cv_check_bitmaps(cv.src, skip_broken) < 0)
		goto out;

	/* Create the target. */
	if (bitmaps && out_raw) {
		cli_error("convert", "Format driver 'raw' does not support bitmaps");
		goto out;
	}
	if (out_raw) {
		if (create_raw(dst_name, cv.size) < 0)
			goto out;
	} else {
		struct qsm_create_opts co;
		char pfx[1100];
		snprintf(pfx, sizeof(pfx), "%s: error while converting qcow2: ", dst_name);
		cp.size = cv.size; /* -o size= is ignored, as qemu-img convert does */
		if (cli_create_validate("convert", pfx, &opts, &cp, &co) < 0)
			goto out;
		if (bitmaps && co.compat == 2) {
			cli_error("convert", "Format driver 'qcow2' does not support bitmaps");
			goto out;
		}
		prealloc_off = co.prealloc == QSM_PREALLOC_OFF;
		r = qsm_create(dst_name, &co, err, sizeof(err));
		if (r < 0) {
			cli_error("convert", "%s%s", pfx, err[0] ? err : qsm_strerror(r));
			goto out;
		}
	}
	struct qsm_open_opts dopt = { .format = out_fmt, .cache = dst_cache, .aio = aio };
	r = qsm_open(base, dst_name, &dopt, &cv.dst, err, sizeof(err));
	if (r < 0) {
		cli_error("convert", "Could not open '%s': %s", dst_name, err[0] ? err : qsm_strerror(r));
		goto out;
	}
	qsm_get_info(cv.dst, &info);
	cv.dst_size = info.virtual_size;
	/* Units: whole clusters of a qcow2 target (a cluster that is written
	 * at all is written whole, so the file has no holes inside clusters:
	 * as QEMU's, whose new clusters are zeroed with fallocate) but at least
	 * 4 KiB, qemu-img's default -S 4k (shorter zero runs are written); 4 KiB
	 * for raw and for preallocated targets, whose clusters exist already. */
	cv.unit = 4096;
	if (!out_raw && (compress || prealloc_off) && info.cluster_size > cv.unit)
		cv.unit = info.cluster_size;
	struct qsm_image *tb = qsm_get_backing(cv.dst);
	if (tb) {
		struct qsm_info binfo;
		qsm_get_info(tb, &binfo);
		cv.backing_size = binfo.virtual_size;
		cv.zero_writes = true;
	}
	cv.compress = compress;
	cv.nslots = nslots ? nslots : compress ? 16 : 8;
	/* Tasks: 2 MiB (qemu-img's buffer); with -c, 512 KiB (8 clusters of
	 * 64 KiB), so that 16 tasks keep ~128 clusters deflating on the
	 * worker pool; always whole units. */
	cv.chunk = QSM_ALIGN_UP((uint64_t)(compress ? 512u << 10 : 2u << 20), cv.unit);

	cli_progress_init(progress, 1.0);
	cli_progress_add(0);
	r = cv_plan(&cv, backing != NULL);
	if (r < 0) {
		cli_error("convert", "error while reading block status of '%s': %s", src_name,
			  qsm_strerror(r));
		goto out;
	}
	cv.work_total = cv_work_total(&cv);
	cv.slots = calloc((size_t)cv.nslots, sizeof(*cv.slots));
	if (!cv.slots)
		goto nomem;
	for (int i = 0; i < cv.nslots; i++) {
		cv.slots[i].cv = &cv;
		cv.slots[i].iov = calloc((size_t)(cv.chunk / cv.unit + 2), sizeof(struct iovec));
		if (posix_memalign((void **)&cv.slots[i].buf, 4096, cv.chunk) || !cv.slots[i].iov)
			goto nomem;
	}
	cv_pump(&cv);
	while (!cv.done)
		event_base_loop(base, EVLOOP_ONCE);
	if (cv.err)
		goto out;
	if (bitmaps && cv_copy_bitmaps(cv.src, cv.dst) < 0)
		goto out;
	if (progress)
		cli_progress_set(100);
	r = qsm_close(cv.dst);
	cv.dst = NULL;
	if (r < 0) {
		cli_error("convert", "error while writing '%s': %s", dst_name, qsm_strerror(r));
		goto out;
	}
	ret = 0;
	goto out;
nomem:
	cli_error("convert", "out of memory");
out:
	cli_progress_end();
	if (cv.dst)
		qsm_close(cv.dst);
	if (cv.src)
		qsm_close(cv.src);
	if (base)
		event_base_free(base);
	if (cv.slots)
		for (int i = 0; i < cv.nslots; i++) {
			free(cv.slots[i].buf);
			free(cv.slots[i].iov);
		}
	free(cv.slots);
	free(cv.ext);
	free(snap_id);
	free(snap_name);
	cli_opts_free(&opts);
	return ret;
}
