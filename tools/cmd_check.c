/*
 * tools/cmd_check.c: `qsm check`, qemu-img check for qcow2 images.
 *
 *   qsm check [-f qcow2] [-r leaks|all] [--output=human|json] [-q] FILE
 *
 * Design: open the file itself through io/ (read-only, or read-write with
 * -r), never through qsm_open, so dirty and corrupt-flagged images are
 * checked as they are; run qsm_check_image() with the findings on stderr;
 * when something was repaired, print qemu-img's summary and check again
 * without fixing ("Double checking the fixed image now..."), reporting the
 * fixed counts of the first pass.  Output, JSON key order (qemu's QDict
 * order for ImageCheck) and exit codes are qemu-img check 7.2's:
 * 0 clean or repaired, 1 check failed, 2 corruptions, 3 leaks only.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "io/io.h"
#include "metadata/check.h"
#include "tools/cli.h"
#include "sm/qsm.h"

static void check_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm check [-f qcow2] [-r leaks|all] [--output=human|json] [-q] filename\n"
		"Check (and with -r repair) a qcow2 image, as 'qemu-img check' does.\n"
		"\n"
		"  -r leaks      free leaked clusters\n"
		"  -r all        also fix refcounts that are too low and COPIED flags, clear\n"
		"                L1/L2 entries pointing outside the file or at unaligned\n"
		"                offsets (those clusters then read as zeros), and rebuild a\n"
		"                damaged refcount structure\n"
		"  --output=FMT  human (default) or json\n"
		"  -f FMT        image format; only qcow2\n"
		"  -q            quiet\n"
		"  -U            force share (accepted)\n"
		"Exit status: 0 clean (or repaired), 1 check failed, 2 corruptions, 3 leaks.\n");
}

static void json_string(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch < 0x20)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

/* qemu's ImageCheck after collect_image_check(): the counts of the final pass
 * plus the fixed counts of the repairing pass. */
struct image_check {
	unsigned long long corruptions, leaks, check_errors, corruptions_fixed, leaks_fixed;
	unsigned long long image_end_offset, total, allocated, fragmented, compressed;
};

static void dump_human(const struct image_check *c)
{
	if (!(c->corruptions || c->leaks || c->check_errors)) {
		printf("No errors were found on the image.\n");
	} else {
		if (c->corruptions)
			printf("\n%llu errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt it.\n",
			       c->corruptions);
		if (c->leaks)
			printf("\n%llu leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       c->leaks);
		if (c->check_errors)
			printf("\n%llu internal errors have occurred during the check.\n",
			       c->check_errors);
	}
	if (c->total && c->allocated)
		printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed "
		       "clusters\n", c->allocated, c->total, c->allocated * 100.0 / c->total,
		       c->fragmented * 100.0 / c->allocated, c->compressed * 100.0 / c->allocated);
	if (c->image_end_offset)
		printf("Image end offset: %llu\n", c->image_end_offset);
}

static void dump_json(const struct image_check *c, const char *file)
{
	/* Keys in qemu's QDict iteration order; optional ones only when nonzero. */
	printf("{\n");
	if (c->image_end_offset)
		printf("    \"image-end-offset\": %llu,\n", c->image_end_offset);
	if (c->compressed)
		printf("    \"compressed-clusters\": %llu,\n", c->compressed);
	if (c->total)
		printf("    \"total-clusters\": %llu,\n", c->total);
	if (c->corruptions)
		printf("    \"corruptions\": %llu,\n", c->corruptions);
	if (c->corruptions_fixed)
		printf("    \"corruptions-fixed\": %llu,\n", c->corruptions_fixed);
	printf("    \"check-errors\": %llu,\n", c->check_errors);
	if (c->leaks)
		printf("    \"leaks\": %llu,\n", c->leaks);
	if (c->leaks_fixed)
		printf("    \"leaks-fixed\": %llu,\n", c->leaks_fixed);
	if (c->allocated)
		printf("    \"allocated-clusters\": %llu,\n", c->allocated);
	printf("    \"filename\": ");
	json_string(file);
	printf(",\n    \"format\": \"qcow2\"");
	if (c->fragmented)
		printf(",\n    \"fragmented-clusters\": %llu", c->fragmented);
	printf("\n}\n");
}

static void to_image_check(const struct qsm_check_result *r, struct image_check *c)
{
	c->corruptions = r->corruptions_left;
	c->leaks = r->leaks_left;
	c->check_errors = r->check_errors;
	c->corruptions_fixed = r->corruptions_fixed;
	c->leaks_fixed = r->leaks_fixed;
	c->image_end_offset = r->image_end_offset;
	c->total = r->total_clusters;
	c->allocated = r->allocated_clusters;
	c->fragmented = r->fragmented_clusters;
	c->compressed = r->compressed_clusters;
}

/* What qemu-img reports through error_report() before a check stops: the
 * first line under the program's name, QEMU's hint lines as they are. */
static void print_report(const char *report)
{
	const char *nl = strchr(report, '\n');

	if (!report[0])
		return;
	cli_error("check", "%.*s", nl ? (int)(nl - report) : (int)strlen(report), report);
	if (nl)
		fprintf(stderr, "%s\n", nl + 1);
}

int cmd_check(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256 };
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "format", required_argument, NULL, 'f' },
		{ "repair", required_argument, NULL, 'r' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *file; /* no -f: probed */
	bool json = false, quiet = false;
	unsigned fix = 0;
	struct event_base *base = NULL;
	struct qsm_io *io = NULL;
	struct qsm_check_result res;
	struct image_check ic = { 0 };
	char err[512] = "";
	int c, r, ret;

	optind = 0;
	while ((c = cli_getopt_long(argc, argv, "hf:r:qUT:", lopt)) != -1) {
		switch (c) {
		case 'h':
			check_usage(stdout);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case 'r':
			if (!strcmp(optarg, "leaks")) {
				fix = QSM_CHECK_FIX_LEAKS;
			} else if (!strcmp(optarg, "all")) {
				fix = QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS;
			} else {
				cli_error("check", "Unknown option value for -r (expecting 'leaks' or "
					  "'all'): %s", optarg);
				if (cli_as_qemu())
					cli_help_hint("check");
				return 1;
			}
			break;
		case 'q':
			quiet = true;
			break;
		case 'U':
		case 'T':
			break;
		case OPT_OUTPUT:
			if (cli_parse_output("check", optarg, &json) < 0)
				return 1;
			break;
		default:
			cli_help_hint("check");
			return 1;
		}
	}
	if (!(file = cli_image_arg("check", argc, argv, optind, fmt, true)))
		return 1;

	base = event_base_new();
	if (!base) {
		cli_error("check", "cannot create an event loop");
		return 1;
	}
	r = qsm_io_open_path(base, file, fix ? 0 : QSM_IO_RDONLY, NULL, &io);
	if (r < 0) {
		/* qemu-img names the file twice: the format layer's message
		 * wraps the protocol's "Could not open 'F': why". */
		cli_error("check", "Could not open '%s': Could not open '%s': %s", file, file,
			  strerror(-r));
		event_base_free(base);
		return 1;
	}
	bool probed = !fmt;
	if (probed && (r = qsm_probe_format(io, file, &fmt, err, sizeof(err))) < 0) {
		cli_error("check", "Could not open '%s': %s", file, err[0] ? err : strerror(-r));
		ret = 1;
		goto out;
	}
	if (!strcmp(fmt, "raw")) {
		/* qemu-img's exit status for a format without checks; a probed
		 * raw image opened for repair gets the probe warning first. */
		if (fix && probed)
			cli_raw_probe_warning(file);
		cli_error("check", "This image format does not support checks");
		ret = 63;
		goto out;
	}
	r = qsm_check_image(io, fix, &res, stderr, err, sizeof(err));
	if (r < 0) {
		cli_error("check", "Could not open '%s': %s", file, err[0] ? err : strerror(-r));
		ret = 1;
		goto out;
	}
	if (!res.incomplete && (res.corruptions_fixed || res.leaks_fixed)) {
		unsigned long long cf = res.corruptions_fixed, lf = res.leaks_fixed;

		if (!json && !quiet)
			printf("The following inconsistencies were found and repaired:\n\n"
			       "    %llu leaked clusters\n"
			       "    %llu corruptions\n\n"
			       "Double checking the fixed image now...\n", lf, cf);
		fflush(stdout);
		r = qsm_check_image(io, 0, &res, stderr, err, sizeof(err));
		if (r < 0) {
			cli_error("check", "Check failed: %s", err[0] ? err : strerror(-r));
			ret = 1;
			goto out;
		}
		to_image_check(&res, &ic);
		ic.corruptions_fixed = cf;
		ic.leaks_fixed = lf;
	} else {
		to_image_check(&res, &ic);
	}
	if (res.incomplete) {
		print_report(res.report);
		cli_error("check", "Check failed: %s", strerror(-(res.error ? res.error : -EIO)));
		ret = 1;
		goto out;
	}
	if (!quiet) {
		if (json)
			dump_json(&ic, file);
		else
			dump_human(&ic);
	}
	if (ic.check_errors) {
		cli_error("check", "Check failed");
		ret = 1;
	} else if (ic.corruptions) {
		ret = 2;
	} else if (ic.leaks) {
		ret = 3;
	} else {
		ret = 0;
	}
out:
	fflush(stdout);
	qsm_io_close(io);
	event_base_free(base);
	return ret;
}
