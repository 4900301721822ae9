/*
 * tools/cmd_compare.c: `qsm compare`, qemu-img compare.
 *
 *   qsm compare [-f FMT] [-F FMT] [-T CACHE] [-p] [-q] [-s] [-U] FILE1 FILE2
 *
 * Design: qemu-img 7.2's img_compare(), so that messages, the offset
 * reported and the exit status are the same:
 *  - both images (and their backing chains) are opened read-only; the
 *    common length is walked by chain status (cli_chain_status, which is
 *    bdrv_block_status_above(bs, NULL)): ranges both report as zeros are
 *    skipped without reading; ranges both have allocated are read (at most
 *    2 MiB at a time) and compared; where only one is allocated, it must
 *    read as zeros;
 *  - the first difference is reported by its 512-byte sector ("Content
 *    mismatch at offset N!"), as compare_buffers()/find_nonzero() do;
 *  - images of different sizes: "Warning: Image size mismatch!" once the
 *    common part is equal, then the longer image's tail must read as
 *    zeros; with -s they differ ("Strict mode: Image size mismatch!");
 *  - -s also calls ranges different whose block status differs (QEMU's
 *    status word: data, zero, offset valid, allocated, end of image).
 * Exit status as qemu-img: 0 identical, 1 different (or a usage error), 2
 * an image could not be opened, 3 a block status query failed, 4 a read
 * failed.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "sm/qsm.h"
#include "tools/cli.h"

#define CMP_BUF_SIZE (2u << 20) /* qemu-img's IO_BUF_SIZE */
#define SECTOR 512

/* QEMU's BDRV_BLOCK_* bits, for strict mode's status comparison. */
#define BST_DATA 0x01
#define BST_ZERO 0x02
#define BST_OFFSET_VALID 0x04
#define BST_ALLOCATED 0x10
#define BST_EOF 0x20

struct cmp_img {
	const char *name;
	struct qsm_image *img;
	uint64_t size;
	bool raw;
};

static void compare_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm compare [-f FMT] [-F FMT] [-T CACHE] [-p] [-q] [-s] [-U] filename1 filename2\n"
		"Compare the guest-visible contents of two images, as 'qemu-img compare' does.\n"
		"\n"
		"  -f FMT   format of filename1: qcow2 or raw; probed when not given\n"
		"  -F FMT   format of filename2\n"
		"  -T MODE  cache mode (accepted, as qemu-img; reads use the default)\n"
		"  -p       show progress\n"
		"  -q       quiet: print nothing, only the exit status tells\n"
		"  -s       strict: sizes and allocation status must match too\n"
		"  -U       force share (accepted; images are opened read-only)\n"
		"\n"
		"Exit status: 0 identical, 1 different, 2 open error, 3 status error,\n"
		"4 read error.\n");
}

static bool quiet;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	va_list ap;

	if (quiet)
		return;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
}

/* Byte index of the first 512-byte sector of buf that is not all zeros, or
 * -1 (find_nonzero()). */
static int64_t find_nonzero(const uint8_t *buf, uint64_t n)
{
	static const uint8_t zero[SECTOR];

	for (uint64_t i = 0; i < n; i += SECTOR) {
		uint64_t len = n - i < SECTOR ? n - i : SECTOR;
		if (memcmp(buf + i, zero, len))
			return (int64_t)i;
	}
	return -1;
}

/* Offset (within n) of the first 512-byte sector where a and b differ, or
 * -1 (compare_buffers()). */
static int64_t first_difference(const uint8_t *a, const uint8_t *b, uint64_t n)
{
	for (uint64_t i = 0; i < n; i += SECTOR) {
		uint64_t len = n - i < SECTOR ? n - i : SECTOR;
		if (memcmp(a + i, b + i, len))
			return (int64_t)i;
	}
	return -1;
}

static int read_at(struct cmp_img *c, uint8_t *buf, uint64_t off, uint64_t len)
{
	int r = qsm_sync_pread(c->img, buf, len, off);
	if (r < 0) {
		cli_error("compare", "Error while reading offset %" PRIu64 " of %s: %s", off,
			  c->name, qsm_strerror(r));
		return 4;
	}
	return 0;
}

/* check_empty_sectors(): 0 when [off, +len) of c reads as zeros, 1 (and the
 * message) when not, 4 on a read error. */
static int check_empty(struct cmp_img *c, uint8_t *buf, uint64_t off, uint64_t len)
{
	int r = read_at(c, buf, off, len);
	if (r)
		return r;
	int64_t idx = find_nonzero(buf, len);
	if (idx >= 0) {
		say("Content mismatch at offset %" PRIu64 "!\n", off + (uint64_t)idx);
		return 1;
	}
	return 0;
}

static int status_of(struct cmp_img *c, uint64_t off, struct cli_chain_status *st)
{
	int r = cli_chain_status(c->img, off, c->size - off, st);
	if (r < 0) {
		cli_error("compare", "Sector allocation test failed for %s", c->name);
		return 3;
	}
	return 0;
}

/* The status word QEMU's strict mode compares. */
static unsigned qemu_status(const struct cmp_img *c, const struct cli_chain_status *st)
{
	unsigned s = 0;

	if (st->flags & QSM_STATUS_DATA)
		s |= BST_DATA;
	if (st->flags & QSM_STATUS_ZERO)
		s |= BST_ZERO;
	if (st->allocated)
		s |= BST_ALLOCATED;
	if (!st->past_end &&
	    (c->raw || ((st->flags & QSM_STATUS_DATA) && !(st->flags & QSM_STATUS_COMPRESSED)) ||
	     ((st->flags & QSM_STATUS_ZERO) && (st->flags & QSM_STATUS_ALLOCATED) && st->host_offset)))
		s |= BST_OFFSET_VALID;
	if (st->offset + st->length == c->size)
		s |= BST_EOF;
	return s;
}

static int do_compare(struct cmp_img *a, struct cmp_img *b, bool strict)
{
	uint64_t total = a->size < b->size ? a->size : b->size;
	uint64_t base = a->size > b->size ? a->size : b->size;
	uint64_t off = 0, chunk;
	uint8_t *buf1 = NULL, *buf2 = NULL;
	int ret = 0;

	if (posix_memalign((void **)&buf1, 4096, CMP_BUF_SIZE) ||
	    posix_memalign((void **)&buf2, 4096, CMP_BUF_SIZE)) {
		cli_error("compare", "out of memory");
		ret = 2;
		goto out;
	}
	cli_progress_add(0);
	if (strict && a->size != b->size) {
		say("Strict mode: Image size mismatch!\n");
		ret = 1;
		goto out;
	}
	while (off < total) {
		struct cli_chain_status s1, s2;

		if ((ret = status_of(a, off, &s1)) || (ret = status_of(b, off, &s2)))
			goto out;
		chunk = s1.length < s2.length ? s1.length : s2.length;
		if (strict && qemu_status(a, &s1) != qemu_status(b, &s2)) {
			say("Strict mode: Offset %" PRIu64 " block status mismatch!\n", off);
			ret = 1;
			goto out;
		}
		if ((s1.flags & QSM_STATUS_ZERO) && (s2.flags & QSM_STATUS_ZERO)) {
			/* both read as zeros: nothing to read */
		} else if (s1.allocated == s2.allocated) {
			if (s1.allocated) {
				if (chunk > CMP_BUF_SIZE)
					chunk = CMP_BUF_SIZE;
				if ((ret = read_at(a, buf1, off, chunk)) ||
				    (ret = read_at(b, buf2, off, chunk)))
					goto out;
				int64_t d = first_difference(buf1, buf2, chunk);
				if (d >= 0) {
					say("Content mismatch at offset %" PRIu64 "!\n", off + (uint64_t)d);
					ret = 1;
					goto out;
				}
			}
		} else {
			if (chunk > CMP_BUF_SIZE)
				chunk = CMP_BUF_SIZE;
			if ((ret = check_empty(s1.allocated ? a : b, buf1, off, chunk)))
				goto out;
		}
		off += chunk;
		cli_progress_add((float)chunk / (float)base * 100);
	}
	if (a->size != b->size) {
		struct cmp_img *over = a->size > b->size ? a : b;

		say("Warning: Image size mismatch!\n");
		while (off < base) {
			struct cli_chain_status s;
			if ((ret = status_of(over, off, &s)))
				goto out;
			chunk = s.length;
			if (s.allocated && !(s.flags & QSM_STATUS_ZERO)) {
				if (chunk > CMP_BUF_SIZE)
					chunk = CMP_BUF_SIZE;
				if ((ret = check_empty(over, buf1, off, chunk)))
					goto out;
			}
			off += chunk;
			cli_progress_add((float)chunk / (float)base * 100);
		}
	}
	say("Images are identical.\n");
out:
	free(buf1);
	free(buf2);
	return ret;
}

static int open_one(struct event_base *base, struct cmp_img *c, const char *fmt)
{
	char err[512] = "";
	struct qsm_info info;

	if (cli_check_format("compare", fmt, true) < 0)
		return -EINVAL;
	struct qsm_open_opts o = { .read_only = true, .no_repair = true, .format = fmt,
				   .probe_format = !fmt };
	int r = qsm_open(base, c->name, &o, &c->img, err, sizeof(err));
	if (r < 0) {
		cli_error("compare", "Could not open '%s': %s", c->name, err[0] ? err : qsm_strerror(r));
		return r;
	}
	qsm_get_info(c->img, &info);
	c->size = info.virtual_size;
	c->raw = !strcmp(info.format, "raw");
	return 0;
}

int cmd_compare(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt1 = NULL, *fmt2 = NULL; /* no -f/-F: probed */
	bool progress = false, strict = false;
	struct cmp_img a = { 0 }, b = { 0 };
	struct event_base *base;
	enum qsm_cache_mode mode;
	int c, ret = 2;

	quiet = false;
	optind = 0;
	while ((c = cli_getopt_long(argc, argv, "hf:F:T:pqsU", lopt)) != -1) {
		switch (c) {
		case 'h':
			compare_usage(stdout);
			return 0;
		case 'f':
			fmt1 = optarg;
			break;
		case 'F':
			fmt2 = optarg;
			break;
		case 'T':
			if (qsm_cache_mode_parse(optarg, &mode) < 0) {
				cli_error("compare", "Invalid source cache option: %s", optarg);
				return 2;
			}
			break;
		case 'p':
			progress = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 's':
			strict = true;
			break;
		case 'U':
			break;
		default:
			cli_help_hint("compare");
			return 1;
		}
	}
	if (quiet)
		progress = false;
	if (optind != argc - 2) {
		cli_error("compare", "Expecting two image file names");
		cli_help_hint("compare");
		return 1;
	}
	a.name = argv[optind];
	b.name = argv[optind + 1];
	cli_progress_init(progress, 2.0);
	base = event_base_new();
	if (!base) {
		cli_error("compare", "cannot create an event loop");
		return 2;
	}
	if (open_one(base, &a, fmt1) == 0 && open_one(base, &b, fmt2) == 0)
		ret = do_compare(&a, &b, strict);
	cli_progress_end();
	if (b.img)
		qsm_close(b.img);
	if (a.img)
		qsm_close(a.img);
	event_base_free(base);
	return ret;
}
