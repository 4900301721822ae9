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
 * -c, -a and -d open the image read-write (a dirty image is repaired
 * first, as qemu-img's open does) and call qsm_snapshot_create / _apply /
 * _delete; a failure prints qemu-img's "Could not create|apply|delete
 * snapshot 'NAME': REASON" and exits 1.
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
		"List, create, apply or delete the internal snapshots of a qcow2 image, as\n"
		"'qemu-img snapshot' does.\n"
		"\n"
		"  -l        list the snapshots (ID, TAG, VM SIZE, DATE, VM CLOCK, ICOUNT)\n"
		"  -c NAME   create a snapshot named NAME of the disk as it is now\n"
		"  -a NAME   apply (revert to) the snapshot with that id or name\n"
		"  -d NAME   delete the snapshot with that name\n"
		"  -f FMT    image format: qcow2 (the only one with snapshots)\n"
		"  -q        quiet (the listing is printed all the same, as qemu-img)\n"
		"  -U        force share (accepted; -l opens the image read-only)\n");
}

int cmd_snapshot(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *file, *name = NULL; /* no -f: probed */
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
	if (!(file = cli_image_arg("snapshot", argc, argv, optind, fmt, !fmt)))
		return 1;

	base = event_base_new();
	if (!base) {
		cli_error("snapshot", "cannot create an event loop");
		return 1;
	}
	/* -l only reads; the others change the image as qemu-img's
	 * read-write open would (a dirty image repaired first). */
	bool reading = action == 'l' || !action;
	struct qsm_open_opts o = { .read_only = reading, .no_repair = reading, .format = fmt,
				   .probe_format = !fmt,
				   .no_backing = reading };
	r = qsm_open(base, file, &o, &img, err, sizeof(err));
	if (r < 0) {
		cli_error("snapshot", "Could not open '%s': %s", file, err[0] ? err : qsm_strerror(r));
		event_base_free(base);
		return 1;
	}
	int rc = 0;
	struct qsm_info info;
	qsm_get_info(img, &info);
	cli_probed_warning(img, file);
	if (!strcmp(info.format, "raw")) {
		/* A probed raw image (-f raw is refused above): qemu-img's words
		 * for a driver without snapshots; -l lists none. */
		static const char *const why[] = { ['c'] = "-95 (Operation not supported)",
						   ['a'] = "Block driver does not support snapshots",
						   ['d'] = "snapshot not found" };
		static const char *const what[] = { ['c'] = "create", ['a'] = "apply", ['d'] = "delete" };
		if (action == 'a') /* QEMU's goto falls back to the file and reopens it */
			cli_probed_warning(img, file);
		if (action && action != 'l') {
			cli_error("snapshot", "Could not %s snapshot '%s': %s", what[(unsigned char)action],
				  name, why[(unsigned char)action]);
			rc = 1;
		}
	} else if (action == 'l') {
		cli_print_snapshots(img);
	} else if (action) {
		static const char *const what[] = { ['c'] = "create", ['a'] = "apply", ['d'] = "delete" };
		r = action == 'c' ? qsm_snapshot_create(img, name, err, sizeof(err))
		    : action == 'a' ? qsm_snapshot_apply(img, name, err, sizeof(err))
				    : qsm_snapshot_delete(img, name, err, sizeof(err));
		if (r < 0) {
			cli_error("snapshot", "Could not %s snapshot '%s': %s", what[(unsigned char)action],
				  name, err[0] ? err : qsm_strerror(r));
			rc = 1;
		}
	}
	r = qsm_close(img);
	event_base_free(base);
	if (r < 0) {
		cli_error("snapshot", "%s: %s", file, qsm_strerror(r));
		return 1;
	}
	return rc;
}
