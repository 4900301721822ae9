/*
 * tools/cmd_info.c: `qsm info`, qemu-img info for qcow2 images.
 *
 *   qsm info [--output=human|json] [--backing-chain] [-f qcow2|raw] [-U] FILE
 *
 * Design: open read-only through qsm_open (no_repair: a dirty image is
 * reported, never repaired), take qsm_get_info() plus stat()'s allocated
 * blocks for "disk size", and print the fields qemu-img 7.2 prints for
 * qcow2 and raw, in its order.  The JSON form copies qemu's key order (its QDict
 * hash order, which is fixed for this key set) and 4-space indentation.
 * The snapshot list (qsm_snapshot_get) as qemu-img prints it: the
 * human table before "Format specific information", the JSON array
 * "snapshots" after "backing-filename-format" (keys in qemu's order; icount
 * left out when not recorded, as qemu's has_icount).
 */
#include <errno.h>
#include <stdarg.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <event2/event.h>

#include "sm/qsm.h"
#include "tools/cli.h"

static void info_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm info [--output=human|json] [--backing-chain] [-f FMT] [-U] filename\n"
		"Show information about a qcow2 or raw image, as 'qemu-img info' does.\n"
		"\n"
		"  --output=FMT     human (default) or json\n"
		"  --backing-chain  also show every image of the backing chain\n"
		"  -f FMT           image format: qcow2 or raw; probed when not given\n"
		"  -U            force share (accepted; the image is opened read-only)\n");
}

static void json_string(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch == '\n')
			printf("\\n");
		else if (ch == '\t')
			printf("\\t");
		else if (ch < 0x20)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

/* One line of JSON output, after the indentation prefix. */
static void line(const char *ind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line(const char *ind, const char *fmt, ...)
{
	va_list ap;
	fputs(ind, stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
}

/* "bitmaps": [...] of the qcow2 data, when the image keeps any. */
static void print_json_bitmaps(const char *ind, struct qsm_image *img)
{
	unsigned n = qsm_bitmap_count(img);
	if (!n)
		return;
	line(ind, "            \"bitmaps\": [\n");
	for (unsigned i = 0; i < n; i++) {
		struct qsm_bitmap_info b = { .struct_size = sizeof(b) };
		if (qsm_bitmap_get(img, i, &b) < 0)
			break;
		line(ind, "                {\n                    \"flags\": [\n");
		if (b.flags & QSM_BITMAP_IN_USE)
			line(ind, "                        \"in-use\"%s\n",
			     b.flags & QSM_BITMAP_AUTO ? "," : "");
		if (b.flags & QSM_BITMAP_AUTO)
			line(ind, "                        \"auto\"\n");
		line(ind, "                    ],\n                    \"name\": ");
		json_string(b.name);
		fputs(",\n", stdout);
		line(ind, "                    \"granularity\": %llu\n", (unsigned long long)b.granularity);
		line(ind, "                }%s\n", i + 1 < n ? "," : "");
	}
	line(ind, "            ],\n");
}

/* "snapshots": [...] of qemu-img info's JSON, when the image has any. */
static void print_json_snapshots(const char *ind, struct qsm_image *img)
{
	unsigned n = qsm_snapshot_count(img);

	if (!n)
		return;
	line(ind, "    \"snapshots\": [\n");
	for (unsigned i = 0; i < n; i++) {
		struct qsm_snapshot_info sn = { .struct_size = sizeof(sn) };
		if (qsm_snapshot_get(img, i, &sn) < 0)
			break;
		line(ind, "        {\n");
		if (sn.icount != QSM_SNAPSHOT_NO_ICOUNT)
			line(ind, "            \"icount\": %llu,\n", (unsigned long long)sn.icount);
		line(ind, "            \"vm-clock-nsec\": %llu,\n",
		     (unsigned long long)(sn.vm_clock_nsec % 1000000000));
		line(ind, "            \"name\": ");
		json_string(sn.name);
		fputs(",\n", stdout);
		line(ind, "            \"date-sec\": %u,\n", sn.date_sec);
		line(ind, "            \"date-nsec\": %u,\n", sn.date_nsec);
		line(ind, "            \"vm-clock-sec\": %llu,\n",
		     (unsigned long long)(sn.vm_clock_nsec / 1000000000));
		line(ind, "            \"id\": ");
		json_string(sn.id);
		fputs(",\n", stdout);
		line(ind, "            \"vm-state-size\": %llu\n", (unsigned long long)sn.vm_state_size);
		line(ind, "        }%s\n", i + 1 < n ? "," : "");
	}
	line(ind, "    ],\n");
}

/* One image as qemu-img's JSON object; `ind` prefixes every line (the
 * --backing-chain array indents its objects by four more spaces). */
static void print_json(const char *ind, const char *file, struct qsm_image *img,
		       const struct qsm_info *in, uint64_t disk, const char *full_backing)
{
	const char *b = in->backing_file;

	line(ind, "{\n");
	if (strcmp(in->format, "qcow2")) {
		line(ind, "    \"virtual-size\": %llu,\n", (unsigned long long)in->virtual_size);
		line(ind, "    \"filename\": ");
		json_string(file);
		fputs(",\n", stdout);
		line(ind, "    \"format\": \"%s\",\n", in->format);
		line(ind, "    \"actual-size\": %llu,\n", (unsigned long long)disk);
		line(ind, "    \"dirty-flag\": false\n");
		line(ind, "}");
		return;
	}
	if (b[0] && in->backing_format[0]) {
		line(ind, "    \"backing-filename-format\": ");
		json_string(in->backing_format);
		fputs(",\n", stdout);
	}
	print_json_snapshots(ind, img);
	line(ind, "    \"virtual-size\": %llu,\n", (unsigned long long)in->virtual_size);
	line(ind, "    \"filename\": ");
	json_string(file);
	fputs(",\n", stdout);
	line(ind, "    \"cluster-size\": %llu,\n", (unsigned long long)in->cluster_size);
	line(ind, "    \"format\": \"qcow2\",\n");
	line(ind, "    \"actual-size\": %llu,\n", (unsigned long long)disk);
	line(ind, "    \"format-specific\": {\n");
	line(ind, "        \"type\": \"qcow2\",\n");
	line(ind, "        \"data\": {\n");
	if (in->version >= 3) {
		line(ind, "            \"compat\": \"1.1\",\n");
		line(ind, "            \"compression-type\": \"%s\",\n", in->compression_type);
		line(ind, "            \"lazy-refcounts\": %s,\n", in->lazy_refcounts ? "true" : "false");
		print_json_bitmaps(ind, img);
		line(ind, "            \"refcount-bits\": %u,\n", in->refcount_bits);
		line(ind, "            \"corrupt\": %s,\n", in->corrupt ? "true" : "false");
		line(ind, "            \"extended-l2\": false\n");
	} else {
		line(ind, "            \"compat\": \"0.10\",\n");
		line(ind, "            \"compression-type\": \"%s\",\n", in->compression_type);
		line(ind, "            \"refcount-bits\": %u\n", in->refcount_bits);
	}
	line(ind, "        }\n");
	line(ind, "    },\n");
	if (b[0]) {
		line(ind, "    \"full-backing-filename\": ");
		json_string(full_backing);
		fputs(",\n", stdout);
		line(ind, "    \"backing-filename\": ");
		json_string(b);
		fputs(",\n", stdout);
	}
	line(ind, "    \"dirty-flag\": %s\n", in->dirty ? "true" : "false");
	line(ind, "}");
}

static void print_human(const char *file, struct qsm_image *img, const struct qsm_info *in,
			uint64_t disk, const char *full_backing)
{
	char vs[64], ds[64];

	cli_size_to_str(in->virtual_size, vs, sizeof(vs));
	cli_size_to_str(disk, ds, sizeof(ds));
	printf("image: %s\n"
	       "file format: %s\n"
	       "virtual size: %s (%llu bytes)\n"
	       "disk size: %s\n",
	       file, in->format, vs, (unsigned long long)in->virtual_size, ds);
	if (strcmp(in->format, "qcow2"))
		return;
	printf("cluster_size: %llu\n", (unsigned long long)in->cluster_size);
	if (in->dirty)
		printf("cleanly shut down: no\n");
	if (in->backing_file[0]) {
		printf("backing file: %s", in->backing_file);
		if (strcmp(in->backing_file, full_backing))
			printf(" (actual path: %s)", full_backing);
		printf("\n");
		if (in->backing_format[0])
			printf("backing file format: %s\n", in->backing_format);
	}
	cli_print_snapshots(img);
	printf("Format specific information:\n");
	cli_print_qcow2_specific(img, in);
}

/* Print img and, with chain, every image below it (qemu-img info
 * --backing-chain): human entries separated by a blank line, JSON as an
 * array.  Each backing image is named as qemu names it, by its backing file
 * name combined with the directory of the image above. */
static int print_images(const char *file, struct qsm_image *img, bool json, bool chain)
{
	char *name = strdup(file);
	int r = 0;

	if (json && chain)
		printf("[\n");
	for (bool first = true; img && name; first = false) {
		struct qsm_info info;
		struct stat st;
		qsm_get_info(img, &info);
		info.backing_file[sizeof(info.backing_file) - 1] = '\0';
		info.backing_format[sizeof(info.backing_format) - 1] = '\0';
		uint64_t disk = stat(name, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
		char *full = cli_path_combine(name, info.backing_file);
		if (!full) {
			r = -ENOMEM;
			break;
		}
		/* A json: name is its own full name (QEMU resolves only plain
		 * names); the chain goes on by its file. */
		const char *shown = strncmp(info.backing_file, "json:", 5) ? full : info.backing_file;
		if (json) {
			if (!first)
				printf(",\n");
			print_json(chain ? "    " : "", name, img, &info, disk, shown);
		} else {
			if (!first)
				printf("\n");
			print_human(name, img, &info, disk, shown);
		}
		free(name);
		name = full;
		img = chain ? qsm_get_backing(img) : NULL;
	}
	if (json)
		printf(chain ? "\n]\n" : "\n");
	free(name);
	return r;
}

int cmd_info(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256, OPT_CHAIN };
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "backing-chain", no_argument, NULL, OPT_CHAIN },
		{ "force-share", no_argument, NULL, 'U' },
		{ "format", required_argument, NULL, 'f' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *file; /* no -f: probed */
	bool json = false, chain = false;
	struct event_base *base = NULL;
	struct qsm_image *img = NULL;
	char err[512] = "";
	int c, r;

	optind = 0;
	while ((c = cli_getopt_long(argc, argv, "hf:U", lopt)) != -1) {
		switch (c) {
		case 'h':
			info_usage(stdout);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case 'U':
			break;
		case OPT_OUTPUT:
			if (cli_parse_output("info", optarg, &json) < 0)
				return 1;
			break;
		case OPT_CHAIN:
			chain = true;
			break;
		default:
			cli_help_hint("info");
			return 1;
		}
	}
	if (!(file = cli_image_arg("info", argc, argv, optind, fmt, true)))
		return 1;

	base = event_base_new();
	if (!base) {
		cli_error("info", "cannot create an event loop");
		return 1;
	}
	/* As qemu-img: the backing chain is opened only when it is shown. */
	struct qsm_open_opts o = { .read_only = true, .no_repair = true, .format = fmt,
				   .probe_format = !fmt, .no_backing = !chain };
	r = qsm_open(base, file, &o, &img, err, sizeof(err));
	if (r < 0) {
		/* qemu-img: "Could not open 'F': <driver's message>" */
		cli_error("info", "Could not open '%s': %s", file,
			  err[0] ? err : qsm_strerror(r));
		event_base_free(base);
		return 1;
	}
	r = print_images(file, img, json, chain);
	int rc = qsm_close(img);
	event_base_free(base);
	if (r == 0)
		r = rc;
	if (r < 0) {
		cli_error("info", "%s: %s", file, qsm_strerror(r));
		return 1;
	}
	return 0;
}
