/*
 * tools/cmd_resize.c: `qsm resize`, qemu-img resize for qcow2 and raw.
 *
 *   qsm resize [-q] [-f qcow2|raw] [--shrink] FILE [+|-]SIZE
 *
 * Design: qemu-img 7.2's img_resize(), step for step, so that the same
 * command line gets the same message and exit status:
 *  1. the size is the LAST argument and is taken off argv before option
 *     parsing (so "-5M" is not read as an option), as qemu-img does;
 *  2. a leading '+' or '-' makes it relative; the rest is parsed as qemu's
 *     'size' parameter (suffixes, "out of range" above 2^64);
 *  3. open read-write, compute the new size, refuse "New image size must be
 *     positive" and shrinking without --shrink (with qemu's warning);
 *  4. qsm_truncate(): qcow2 grows (L1 table moved crash-safely when needed)
 *     and shrinks, releasing what is allocated past the new end (as
 *     qemu; refused on an image with internal snapshots, as qemu).
 * Exit status 0 on success, 1 on any error; nothing is changed on error.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "sm/qsm.h"
#include "tools/cli.h"

static void resize_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm resize [-q] [-f FMT] [--shrink] filename [+|-]size\n"
		"Change the virtual size of an image, as 'qemu-img resize' does.\n"
		"\n"
		"  -f FMT     image format: qcow2 or raw; probed when not given\n"
		"  --shrink   allow making the image smaller (data past the new end\n"
		"             is discarded)\n"
		"  -q         quiet: do not print 'Image resized.'\n"
		"  SIZE       bytes, or with a k, M, G, T, P or E suffix (1k = 1024);\n"
		"             +SIZE grows by, -SIZE shrinks by that amount\n");
}

int cmd_resize(int argc, char **argv)
{
	enum { OPT_SHRINK = 256 };
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "shrink", no_argument, NULL, OPT_SHRINK },
		{ "format", required_argument, NULL, 'f' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *file, *size_arg; /* no -f: probed */
	bool quiet = false, shrink = false;
	struct event_base *base = NULL;
	struct qsm_image *img = NULL;
	char err[512] = "";
	int c, r, relative = 0, ret = 1;
	uint64_t n;

	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			resize_usage(stdout);
			return 0;
		}
	if (argc < 3) {
		cli_error("resize", "Not enough arguments");
		cli_help_hint("resize");
		return 1;
	}
	/* The size is always last; remove it before getopt sees "-5M". */
	size_arg = argv[--argc];

	optind = 0;
	while ((c = cli_getopt_long(argc, argv, "hf:q", lopt)) != -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 'q':
			quiet = true;
			break;
		case OPT_SHRINK:
			shrink = true;
			break;
		default:
			cli_help_hint("resize");
			return 1;
		}
	}
	if (optind != argc - 1) {
		cli_error("resize", "Expecting image file name and size");
		cli_help_hint("resize");
		return 1;
	}
	file = argv[optind];
	if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
		cli_error("resize", "Unknown file format '%s' (qsm resizes qcow2 and raw)", fmt);
		return 1;
	}

	if (size_arg[0] == '+' || size_arg[0] == '-')
		relative = size_arg[0] == '+' ? 1 : -1;
	r = cli_parse_size(size_arg + (relative != 0), &n);
	if (r == -ERANGE) {
		cli_error("resize", "Value '%s' is out of range for parameter 'size'",
			  size_arg + (relative != 0));
		return 1;
	}
	if (r < 0) {
		cli_error("resize", "Parameter 'size' expects a non-negative number below 2^64");
		fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
				"and exabytes, respectively.\n");
		return 1;
	}

	base = event_base_new();
	if (!base) {
		cli_error("resize", "cannot create an event loop");
		return 1;
	}
	struct qsm_open_opts o = { .format = fmt, .probe_format = !fmt };
	r = qsm_open(base, file, &o, &img, err, sizeof(err));
	if (r < 0) {
		cli_error("resize", "Could not open '%s': %s", file, err[0] ? err : qsm_strerror(r));
		goto out;
	}
	cli_probed_warning(img, file);
	struct qsm_info info;
	qsm_get_info(img, &info);
	/* qemu computes in int64_t: anything at or above 2^63 is "not positive". */
	int64_t cur = (int64_t)info.virtual_size, total;
	if (relative)
		total = (int64_t)((uint64_t)cur + (uint64_t)relative * n);
	else
		total = (int64_t)n;
	if (total <= 0) {
		cli_error("resize", "New image size must be positive");
		goto out;
	}
	if (total < cur && !shrink) {
		cli_error("resize", "Use the --shrink option to perform a shrink operation.");
		cli_error("resize", "warning: Shrinking an image will delete all data beyond the "
			  "shrunken image's end. Before performing such an operation, make sure there "
			  "is no important data there.");
		goto out;
	}
	r = qsm_truncate(img, (uint64_t)total, err, sizeof(err));
	if (r == -ENOTSUP && total < cur && !err[0])
		snprintf(err, sizeof(err), "Cannot shrink: data is allocated past the new end "
			 "(qsm does not discard it)");
	if (r < 0) {
		cli_error("resize", "%s", err[0] ? err : qsm_strerror(r));
		goto out;
	}
	r = qsm_close(img);
	img = NULL;
	if (r < 0) {
		cli_error("resize", "%s: %s", file, qsm_strerror(r));
		goto out;
	}
	if (!quiet)
		printf("Image resized.\n");
	ret = 0;
out:
	if (img)
		qsm_close(img);
	event_base_free(base);
	return ret;
}
