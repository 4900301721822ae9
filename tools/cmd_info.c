/*
 * tools/cmd_info.c: `qsm info`, qemu-img info for qcow2 images.
 *
 *   qsm info [--output=human|json] [-f qcow2] [-U] FILE
 *
 * Design: open read-only through qsm_open (no_repair: a dirty image is
 * reported, never repaired), take qsm_get_info() plus stat()'s allocated
 * blocks for "disk size", and print the fields qemu-img 7.2 prints for
 * qcow2, in its order.  The JSON form copies qemu's key order (its QDict
 * hash order, which is fixed for this key set) and 4-space indentation.
 * Not shown (the API does not expose them yet): the snapshot list.
 */
#include <errno.h>
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
		"Usage: qsm info [--output=human|json] [-f qcow2] [-U] filename\n"
		"Show information about a qcow2 image, as 'qemu-img info' does.\n"
		"\n"
		"  --output=FMT  human (default) or json\n"
		"  -f FMT        image format; only qcow2\n"
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

static void print_json(const char *file, const struct qsm_info *in, uint64_t disk,
		       const char *full_backing)
{
	const char *b = in->backing_file;

	printf("{\n");
	if (b[0] && in->backing_format[0]) {
		printf("    \"backing-filename-format\": ");
		json_string(in->backing_format);
		printf(",\n");
	}
	printf("    \"virtual-size\": %llu,\n", (unsigned long long)in->virtual_size);
	printf("    \"filename\": ");
	json_string(file);
	printf(",\n");
	printf("    \"cluster-size\": %llu,\n", (unsigned long long)in->cluster_size);
	printf("    \"format\": \"qcow2\",\n");
	printf("    \"actual-size\": %llu,\n", (unsigned long long)disk);
	printf("    \"format-specific\": {\n");
	printf("        \"type\": \"qcow2\",\n");
	printf("        \"data\": {\n");
	if (in->version >= 3) {
		printf("            \"compat\": \"1.1\",\n");
		printf("            \"compression-type\": \"zlib\",\n");
		printf("            \"lazy-refcounts\": %s,\n", in->lazy_refcounts ? "true" : "false");
		printf("            \"refcount-bits\": %u,\n", in->refcount_bits);
		printf("            \"corrupt\": %s,\n", in->corrupt ? "true" : "false");
		printf("            \"extended-l2\": false\n");
	} else {
		printf("            \"compat\": \"0.10\",\n");
		printf("            \"compression-type\": \"zlib\",\n");
		printf("            \"refcount-bits\": %u\n", in->refcount_bits);
	}
	printf("        }\n");
	printf("    },\n");
	if (b[0]) {
		printf("    \"full-backing-filename\": ");
		json_string(full_backing);
		printf(",\n");
		printf("    \"backing-filename\": ");
		json_string(b);
		printf(",\n");
	}
	printf("    \"dirty-flag\": %s\n", in->dirty ? "true" : "false");
	printf("}\n");
}

static void print_human(const char *file, const struct qsm_info *in, uint64_t disk,
			const char *full_backing)
{
	char vs[64], ds[64];

	cli_size_to_str(in->virtual_size, vs, sizeof(vs));
	cli_size_to_str(disk, ds, sizeof(ds));
	printf("image: %s\n"
	       "file format: qcow2\n"
	       "virtual size: %s (%llu bytes)\n"
	       "disk size: %s\n"
	       "cluster_size: %llu\n",
	       file, vs, (unsigned long long)in->virtual_size, ds,
	       (unsigned long long)in->cluster_size);
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
	printf("Format specific information:\n");
	cli_print_qcow2_specific(in);
}

int cmd_info(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256 };
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "force-share", no_argument, NULL, 'U' },
		{ "format", required_argument, NULL, 'f' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = "qcow2", *file;
	bool json = false;
	struct event_base *base = NULL;
	struct qsm_image *img = NULL;
	struct qsm_info info;
	struct stat st;
	char err[512] = "";
	char *full = NULL;
	int c, r;

	optind = 0;
	while ((c = getopt_long(argc, argv, "hf:U", lopt, NULL)) != -1) {
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
		default:
			fprintf(stderr, "Try 'qsm info --help' for more information\n");
			return 1;
		}
	}
	if (optind != argc - 1) {
		cli_error("info", "Expecting one image file name");
		fprintf(stderr, "Try 'qsm info --help' for more information\n");
		return 1;
	}
	file = argv[optind];
	if (strcmp(fmt, "qcow2")) {
		cli_error("info", "Unknown file format '%s' (qsm reads qcow2 only)", fmt);
		return 1;
	}

	base = event_base_new();
	if (!base) {
		cli_error("info", "cannot create an event loop");
		return 1;
	}
	struct qsm_open_opts o = { .read_only = true, .no_repair = true };
	r = qsm_open(base, file, &o, &img, err, sizeof(err));
	if (r < 0) {
		/* qemu-img: "Could not open 'F': <driver's message>" */
		cli_error("info", "Could not open '%s': %s", file,
			  err[0] ? err : qsm_strerror(r));
		event_base_free(base);
		return 1;
	}
	qsm_get_info(img, &info);
	info.backing_file[sizeof(info.backing_file) - 1] = '\0';
	info.backing_format[sizeof(info.backing_format) - 1] = '\0';
	uint64_t disk = stat(file, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
	full = cli_path_combine(file, info.backing_file);
	if (json)
		print_json(file, &info, disk, full ? full : info.backing_file);
	else
		print_human(file, &info, disk, full ? full : info.backing_file);
	free(full);
	r = qsm_close(img);
	event_base_free(base);
	if (r < 0) {
		cli_error("info", "%s: %s", file, qsm_strerror(r));
		return 1;
	}
	return 0;
}
