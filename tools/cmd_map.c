/*
 * tools/cmd_map.c: `qsm map`, qemu-img map for qcow2 and raw images and
 * their backing chains.
 *
 *   qsm map [-f qcow2|raw] [--output=human|json] [--start-offset=OFF]
 *           [--max-length=LEN] [-U] FILE
 *
 * Design: qemu-img 7.2's img_map(), step for step:
 *  - each entry comes from cli_chain_status() (get_block_status(): ask the
 *    top image, then down the chain until a layer reports data or zeros),
 *    with depth, present (the deciding layer allocated it), zero, data and,
 *    when the layer maps the range to its file, offset and that layer's
 *    file name (the backing name combined with the directory of the image
 *    above, as QEMU names it);
 *  - offset is known for data clusters (not compressed ones), for zero
 *    clusters that keep a host cluster, and for every range of a raw image;
 *  - consecutive entries merge when every field agrees and the file offsets
 *    continue (entry_mergeable());
 *  - json: "[" then one object per line, ",\n" between them, "]" at the end;
 *    human: a header, then one line per data range that is not zero; zero
 *    and unallocated ranges are folded together first, so that they merge;
 *    a compressed range cannot be shown there and is an error, as in QEMU.
 * Exit status 0, or 1 on any error.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "sm/qsm.h"
#include "tools/cli.h"

#define MAP_MAX_DEPTH 65 /* qsm_open refuses chains deeper than 64 */

struct map_entry {
	int64_t start, length;
	bool data, zero, present, has_offset;
	int64_t offset;
	int depth;
	const char *filename; /* when has_offset */
};

static void map_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm map [-f FMT] [--output=human|json] [--start-offset=OFFSET]\n"
		"               [--max-length=LENGTH] [-U] filename\n"
		"Show how the image's guest ranges are mapped, as 'qemu-img map' does.\n"
		"\n"
		"  -f FMT              image format: qcow2 or raw; probed when not given\n"
		"  --output=FMT        human (default) or json\n"
		"  --start-offset=OFF  start at this guest offset\n"
		"  --max-length=LEN    stop after this many bytes\n"
		"  -U                  force share (accepted; the image is opened read-only)\n");
}

/* entry_mergeable() of qemu-img.c */
static bool mergeable(const struct map_entry *a, const struct map_entry *b)
{
	if (a->length == 0)
		return false;
	if (a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
	    a->present != b->present || !a->filename != !b->filename ||
	    a->has_offset != b->has_offset)
		return false;
	if (a->filename && strcmp(a->filename, b->filename))
		return false;
	if (a->has_offset && a->offset + a->length != b->offset)
		return false;
	return true;
}

/* dump_map_entry() of qemu-img.c; next may be changed (human folding). */
static int dump_entry(bool json, const struct map_entry *e, struct map_entry *next)
{
	if (json) {
		printf("{ \"start\": %" PRId64 ", \"length\": %" PRId64 ", \"depth\": %d,"
		       " \"present\": %s, \"zero\": %s, \"data\": %s",
		       e->start, e->length, e->depth, e->present ? "true" : "false",
		       e->zero ? "true" : "false", e->data ? "true" : "false");
		if (e->has_offset)
			printf(", \"offset\": %" PRId64, e->offset);
		putchar('}');
		if (next)
			puts(",");
		return 0;
	}
	if (e->data && !e->has_offset) {
		cli_error("map", "File contains external, encrypted or compressed clusters.");
		return -ENOTSUP;
	}
	if (e->data && !e->zero)
		printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
		       e->has_offset ? e->offset : 0, e->filename ? e->filename : "");
	/* The human format does not tell unallocated, zero and zero data
	 * apart: fold them so they merge. */
	if (next && (!next->data || next->zero)) {
		next->data = false;
		next->zero = true;
	}
	return 0;
}

int cmd_map(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256, OPT_START, OPT_MAXLEN };
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "format", required_argument, NULL, 'f' },
		{ "start-offset", required_argument, NULL, OPT_START },
		{ "max-length", required_argument, NULL, OPT_MAXLEN },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *file; /* no -f: probed */
	bool json = false;
	int64_t start = 0, max_len = -1;
	struct event_base *base = NULL;
	struct qsm_image *img = NULL;
	char *names[MAP_MAX_DEPTH] = { 0 };
	bool raw[MAP_MAX_DEPTH] = { 0 };
	char err[512] = "";
	int c, r, ret = 1, nlayers = 0;

	optind = 0;
	while ((c = cli_getopt_long(argc, argv, "hf:U", lopt)) != -1) {
		switch (c) {
		case 'h':
			map_usage(stdout);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case 'U':
			break;
		case OPT_OUTPUT:
			if (cli_parse_output("map", optarg, &json) < 0)
				return 1;
			break;
		case OPT_START:
			if (cli_cvtnum(optarg, &start) < 0) {
				cli_error("map", "Invalid start offset specified! You may use k, M, G, T, "
					  "P or E suffixes for ");
				cli_error("map", "kilobytes, megabytes, gigabytes, terabytes, petabytes "
					  "and exabytes.");
				return 1;
			}
			break;
		case OPT_MAXLEN:
			if (cli_cvtnum(optarg, &max_len) < 0) {
				cli_error("map", "Invalid length specified! You may use k, M, G, T, P or "
					  "E suffixes for ");
				cli_error("map", "kilobytes, megabytes, gigabytes, terabytes, petabytes "
					  "and exabytes.");
				return 1;
			}
			break;
		default:
			cli_help_hint("map");
			return 1;
		}
	}
	if (!(file = cli_image_arg("map", argc, argv, optind, fmt, true)))
		return 1;
	base = event_base_new();
	if (!base) {
		cli_error("map", "cannot create an event loop");
		return 1;
	}
	struct qsm_open_opts o = { .read_only = true, .no_repair = true, .format = fmt,
				   .probe_format = !fmt };
	r = qsm_open(base, file, &o, &img, err, sizeof(err));
	if (r < 0) {
		cli_error("map", "Could not open '%s': %s", file, err[0] ? err : qsm_strerror(r));
		event_base_free(base);
		return 1;
	}
	/* Each layer's file name, as QEMU names it, and whether it is raw. */
	struct qsm_info info;
	for (struct qsm_image *l = img; l && nlayers < MAP_MAX_DEPTH; l = qsm_get_backing(l)) {
		/* info still describes the layer above (which names this one). */
		info.backing_file[sizeof(info.backing_file) - 1] = '\0';
		names[nlayers] = nlayers ? cli_path_combine(names[nlayers - 1], info.backing_file)
					 : strdup(file);
		if (!names[nlayers]) {
			cli_error("map", "out of memory");
			goto out;
		}
		qsm_get_info(l, &info);
		raw[nlayers++] = !strcmp(info.format, "raw");
	}
	qsm_get_info(img, &info);
	/* QEMU counts a raw file in whole sectors: a partial last sector is
	 * followed by zeros up to the sector end (mapped, past the file). */
	int64_t size = (int64_t)info.virtual_size;
	int64_t length = raw[0] ? (size + 511) / 512 * 512 : size;
	if (max_len != -1 && start + max_len < length)
		length = start + max_len;

	struct map_entry curr = { .start = start }, next;
	if (json)
		putchar('[');
	else
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
	while (curr.start + curr.length < length) {
		int64_t off = curr.start + curr.length;
		struct cli_chain_status st;

		r = 0;
		if (off >= size) /* the raw tail, see above */
			st = (struct cli_chain_status){ (uint64_t)off, (uint64_t)(length - off),
							QSM_STATUS_ZERO | QSM_STATUS_ALLOCATED,
							(uint64_t)off, 0, img, true, false };
		else
			r = cli_chain_status(img, (uint64_t)off,
					     (uint64_t)((length < size ? length : size) - off), &st);
		if (r < 0) {
			cli_error("map", "Could not read file metadata: %s", qsm_strerror(r));
			goto out;
		}
		bool has_off = !st.past_end &&
			       (raw[st.depth] ||
				((st.flags & QSM_STATUS_DATA) && !(st.flags & QSM_STATUS_COMPRESSED)) ||
				((st.flags & QSM_STATUS_ZERO) && (st.flags & QSM_STATUS_ALLOCATED) &&
				 st.host_offset));
		next = (struct map_entry){
			.start = off,
			.length = (int64_t)st.length,
			.data = !!(st.flags & QSM_STATUS_DATA),
			.zero = !!(st.flags & QSM_STATUS_ZERO),
			.present = !!(st.flags & QSM_STATUS_ALLOCATED),
			.has_offset = has_off,
			.offset = has_off ? (int64_t)st.host_offset : 0,
			.depth = st.depth,
			.filename = has_off ? names[st.depth] : NULL,
		};
		if (mergeable(&curr, &next)) {
			curr.length += next.length;
			continue;
		}
		if (curr.length > 0 && dump_entry(json, &curr, &next) < 0)
			goto out;
		curr = next;
	}
	if (dump_entry(json, &curr, NULL) < 0)
		goto out;
	if (json)
		puts("]");
	ret = 0;
out:
	fflush(stdout);
	qsm_close(img);
	event_base_free(base);
	for (int i = 0; i < nlayers; i++)
		free(names[i]);
	return ret;
}
