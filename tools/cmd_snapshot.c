/*
 * tools/cmd_snapshot.c: `qsm snapshot`, qemu-img snapshot for qcow2 images.
 *
 *   qsm snapshot [-l | -c NAME | -a NAME | -d NAME] [-f qcow2] [-q] [-U] FILE
 *
 * Design: -l opens the image read-only (the table is read and validated by
 * qsm_open, sm/qsm.h) and prints it as qemu-img 7.2 does
 * (cli_print_snapshots: the same header, widths, size and clock formats;
 * nothing at all for an image without snapshots, exit 0).  Option errors,
 * "Cannot mix '-l', '-a', '-c', '-d'" (an action given twice too), the open
 * errors and exit codes are qemu-img's; run as qemu-img, -f is refused as
 * qemu-img 7.2's snapshot refuses it.  No action: the image is opened and
 * nothing printed, as qemu-img.
 *
 * Not supported yet: -c, -a and -d are parsed and refused ("not supported
 * yet", exit 1) after the image opened, so no image is ever changed.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "sm/qsm.h"
#include "tools/cli.h"

static void snapshot_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm snapshot [-l | -c NAME | -a NAME | -d NAME] [-f FMT] [-q] [-U] filename\n"
		"List the internal snapshots of a qcow2 image, as 'qemu-img snapshot' does.\n"
		"\n"
		"  -l        list the snapshots (ID, TAG, VM SIZE, DATE, VM CLOCK, ICOUNT)\n"
		"  -c NAME   create a snapshot: NOT SUPPORTED YET (exits 1, image untouched)\n"
		"  -a NAME   apply a snapshot: NOT SUPPORTED YET (exits 1, image untouched)\n"
		"  -d NAME   delete a snapshot: NOT SUPPORTED YET (exits 1, image untouched)\n"
		"  -f FMT    image format: qcow2 (the only one with snapshots)\n"
		"  -q        quiet (the listing is printed all the same, as qemu-img)\n"
		"  -U        force share (accepted; the image is opened read-only)\n");
}

int cmd_snapshot(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = "qcow2", *file, *name = NULL;
	struct event_base *base;
	struct qsm_image *img = NULL;
	char err[512] = "", action = 0;
	int c, r;

	optind = 0;
	/* qemu-img 7.2's snapshot has no -f */
	const char *optstr = cli_as_qemu() ? "hla:c:d:qU" : "hla:c:d:f:qU";
	while ((c = cli_getopt_long(argc, argv, optstr, lopt)) != -1) {
		switch (c) {
		case 'h':
			snapshot_usage(stdout);
			return 0;
		case 'l': case 'a': case 'c': case 'd':
			if (action) {
				cli_error("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
				cli_help_hint("snapshot");
				return 1;
			}
			action = (char)c;
			name = c == 'l' ? NULL : optarg;
			break;
		case 'f':
			fmt = optarg;
			break;
		case 'q': case 'U':
			break;
		default:
			cli_help_hint("snapshot");
			return 1;
		}
	}
	if (!(file = cli_image_arg("snapshot", argc, argv, optind, fmt, false)))
		return 1;

	base = event_base_new();
	if (!base) {
		cli_error("snapshot", "cannot create an event loop");
		return 1;
	}
	struct qsm_open_opts o = { .read_only = true, .no_repair = true, .format = fmt,
				   .no_backing = true };
	r = qsm_open(base, file, &o, &img, err, sizeof(err));
	if (r < 0) {
		cli_error("snapshot", "Could not open '%s': %s", file, err[0] ? err : qsm_strerror(r));
		event_base_free(base);
		return 1;
	}
	int rc = 0;
	if (action == 'l') {
		cli_print_snapshots(img);
	} else if (action) {
		static const char *const what[] = { ['c'] = "create", ['a'] = "apply", ['d'] = "delete" };
		cli_error("snapshot", "-%c (%s snapshot '%s') is not supported yet; the image was "
			  "not changed", action, what[(unsigned char)action], name);
		rc = 1;
	}
	r = qsm_close(img);
	event_base_free(base);
	if (r < 0) {
		cli_error("snapshot", "%s: %s", file, qsm_strerror(r));
		return 1;
	}
	return rc;
}
