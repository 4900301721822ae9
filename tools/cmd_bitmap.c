/*
 * tools/cmd_bitmap.c: `qsm bitmap`, qemu-img bitmap for qcow2 images.
 *
 *   qsm bitmap (--merge SOURCE | --add | --remove | --clear | --enable |
 *               --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE]
 *               [-f FMT] FILE BITMAP
 *
 * Design: the options are checked as qemu-img 7.2 checks them, in its
 * order and words; FILE is opened read-write (probed without -f), the -b
 * source read-only.  The actions run in the order given, each one call of
 * the engine's bitmap API (sm/qsm.h: qsm_bitmap_add and the others, each
 * durable when it returns); the first that fails prints "Operation OP on
 * bitmap NAME failed: REASON" and ends the run with exit 1, the actions
 * before it kept, as qemu-img keeps them.  --add then --disable is a
 * disabled bitmap from the start (qemu-img adds it enabled and disables
 * it at once: the image ends the same).  The close stores the bits of
 * the bitmaps this run records into, as always.
 *
 * Differences from qemu-img: a message that names a node ("persistent in
 * '#block129'") names none.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "sm/qsm.h"
#include "tools/cli.h"

enum act { ACT_ADD, ACT_REMOVE, ACT_CLEAR, ACT_ENABLE, ACT_DISABLE, ACT_MERGE };
static const char *const act_name[] = { "add", "remove", "clear", "enable", "disable", "merge" };

struct action {
	enum act act;
	const char *src; /* --merge's source bitmap */
};

static void bitmap_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm bitmap (--merge SOURCE | --add | --remove | --clear |\n"
		"                   --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]]\n"
		"                  [-g GRANULARITY] [-f FMT] FILENAME BITMAP\n"
		"Change the persistent dirty bitmaps of a qcow2 image, as 'qemu-img bitmap'\n"
		"does: the actions run in the order given; the first that fails ends the run.\n"
		"\n"
		"  --add            create BITMAP, enabled (it records every write from now on)\n"
		"  --remove         delete BITMAP\n"
		"  --clear          unset every bit of BITMAP\n"
		"  --enable         BITMAP records writes\n"
		"  --disable        BITMAP stops recording writes\n"
		"  --merge SOURCE   set in BITMAP every bit set in bitmap SOURCE (of FILENAME,\n"
		"                   or of SOURCE_FILE with -b)\n"
		"  -g GRANULARITY   bytes per bit for --add (a power of 2, 512 to 2G; default\n"
		"                   the cluster size, within 4k and 64k)\n"
		"  -b SOURCE_FILE   the image holding --merge's source (opened read-only)\n"
		"  -F SOURCE_FMT    its format (probed when not given)\n"
		"  -f FMT           the image's format (probed when not given)\n");
}

/* One action on bitmap `name`: 0, or -errno with the reason in err. */
static int run_action(struct qsm_image *img, struct qsm_image *src, const struct action *a,
		      const char *name, uint64_t granularity, bool disabled, char *err,
		      size_t errlen)
{
	if (a->act == ACT_ADD)
		return qsm_bitmap_add(img, name, granularity, !disabled, err, errlen);
	int i = qsm_bitmap_find(img, name), s = 0;
	if (i >= 0 && a->act == ACT_MERGE)
		name = a->src, s = qsm_bitmap_find(src, a->src);
	if (i < 0 || s < 0) {
		snprintf(err, errlen, "Dirty bitmap '%s' not found", name);
		return -ENOENT;
	}
	switch (a->act) {
	case ACT_REMOVE:
		return qsm_bitmap_remove(img, (unsigned)i, err, errlen);
	case ACT_CLEAR:
		return qsm_bitmap_clear(img, (unsigned)i, err, errlen);
	case ACT_ENABLE:
	case ACT_DISABLE:
		return qsm_bitmap_enable(img, (unsigned)i, a->act == ACT_ENABLE, err, errlen);
	default:
		return qsm_bitmap_merge(img, (unsigned)i, src, (unsigned)s, err, errlen);
	}
}

static struct qsm_image *open_image(struct event_base *base, const char *file, const char *fmt,
				    bool read_only)
{
	struct qsm_open_opts o = { .read_only = read_only, .no_repair = read_only,
				   .format = fmt, .probe_format = !fmt };
	struct qsm_image *img = NULL;
	char err[512] = "";
	int r = qsm_open(base, file, &o, &img, err, sizeof(err));
	if (r < 0) {
		cli_error("bitmap", "Could not open '%s': %s", file, err[0] ? err : qsm_strerror(r));
		return NULL;
	}
	cli_probed_warning(img, file);
	return img;
}

enum { OPT_ADD = 256, OPT_REMOVE, OPT_CLEAR, OPT_ENABLE, OPT_DISABLE, OPT_MERGE };

int cmd_bitmap(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "add", no_argument, NULL, OPT_ADD },
		{ "remove", no_argument, NULL, OPT_REMOVE },
		{ "clear", no_argument, NULL, OPT_CLEAR },
		{ "enable", no_argument, NULL, OPT_ENABLE },
		{ "disable", no_argument, NULL, OPT_DISABLE },
		{ "merge", required_argument, NULL, OPT_MERGE },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *src_file = NULL, *src_fmt = NULL;
	struct action *acts = calloc((size_t)argc, sizeof(*acts));
	size_t nacts = 0;
	bool add = false, merge = false;
	int64_t granularity = 0;
	int c, rc = 1;

	if (!acts) {
		cli_error("bitmap", "%s", strerror(ENOMEM));
		return 1;
	}
	optind = 0;
	while ((c = cli_getopt_long(argc, argv, ":b:f:F:g:h", lopt)) != -1) {
		switch (c) {
		case 'h':
			bitmap_usage(stdout);
			free(acts);
			return 0;
		case 'b':
			src_file = optarg;
			break;
		case 'f':
			fmt = optarg;
			break;
		case 'F':
			src_fmt = optarg;
			break;
		case 'g':
			if (cli_cvtnum(optarg, &granularity) < 0) {
				cli_error("bitmap", "Invalid granularity specified. You may use k, M, "
					  "G, T, P or E suffixes for");
				cli_error("bitmap", "kilobytes, megabytes, gigabytes, terabytes, "
					  "petabytes and exabytes.");
				goto out;
			}
			break;
		case OPT_ADD: case OPT_REMOVE: case OPT_CLEAR: case OPT_ENABLE: case OPT_DISABLE:
		case OPT_MERGE:
			acts[nacts++] = (struct action){ .act = (enum act)(c - OPT_ADD),
							 .src = c == OPT_MERGE ? optarg : NULL };
			add |= c == OPT_ADD;
			merge |= c == OPT_MERGE;
			break;
		default:
			cli_help_hint("bitmap");
			goto out;
		}
	}
	if (nacts == 0) {
		cli_error("bitmap", "Need at least one of --add, --remove, --clear, --enable, "
			  "--disable, or --merge");
		goto out;
	}
	if (granularity && !add) {
		cli_error("bitmap", "granularity only supported with --add");
		goto out;
	}
	if (src_fmt && !src_file) {
		cli_error("bitmap", "-F only supported with -b");
		goto out;
	}
	if (src_file && !merge) {
		cli_error("bitmap", "Merge bitmap source file only supported with --merge");
		goto out;
	}
	if (optind != argc - 2) {
		cli_error("bitmap", "Expecting filename and bitmap name");
		goto out;
	}
	if (cli_check_format("bitmap", fmt, true) < 0 || cli_check_format("bitmap", src_fmt, true) < 0)
		goto out;
	const char *file = argv[optind], *name = argv[optind + 1];

	struct event_base *base = event_base_new();
	if (!base) {
		cli_error("bitmap", "cannot create an event loop");
		goto out;
	}
	struct qsm_image *img = open_image(base, file, fmt, false), *src = NULL;
	if (img && src_file && !(src = open_image(base, src_file, src_fmt, true))) {
		qsm_close(img);
		img = NULL;
	}
	if (!src)
		src = img;
	if (img) {
		rc = 0;
		for (size_t k = 0; k < nacts; k++) {
			char err[4096] = ""; /* room for two 1023-byte names */
			/* --add --disable: disabled from the start */
			bool disabled = acts[k].act == ACT_ADD && k + 1 < nacts &&
					acts[k + 1].act == ACT_DISABLE;
			int r = run_action(img, src, &acts[k], name, (uint64_t)granularity, disabled,
					   err, sizeof(err));
			if (r < 0) {
				cli_error("bitmap", "Operation %s on bitmap %s failed: %s",
					  act_name[acts[k].act], name, err[0] ? err : qsm_strerror(r));
				if (r == -EBUSY && strstr(err, "is inconsistent"))
					fprintf(stderr, "Try block-dirty-bitmap-remove to delete this "
						"bitmap from disk\n");
				rc = 1;
				break;
			}
		}
		if (src != img && qsm_close(src) < 0)
			rc = 1;
		int r = qsm_close(img);
		if (r < 0) {
			cli_error("bitmap", "%s: %s", file, qsm_strerror(r));
			rc = 1;
		}
	}
	event_base_free(base);
out:
	free(acts);
	return rc;
}
