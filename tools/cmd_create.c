/*
 * tools/cmd_create.c: `qsm create`, qemu-img create for qcow2.
 *
 *   qsm create [-q] [-f qcow2] [-b BACKING -F FMT] [-u] [-o OPTIONS] FILE [SIZE]
 *
 * Design: the same three phases as qemu-img create, so that messages come
 * out in the same order:
 *  1. parse: option names and value types are checked first (unknown
 *     parameter, unparsable number or bool); nothing is printed on success;
 *  2. print "Formatting 'FILE', fmt=qcow2 ..." exactly as qemu-img does
 *     (values as given for compat/lazy_refcounts, in bytes for sizes);
 *  3. validate the combination (cluster size, compat, refcount width, lazy
 *     refcounts on v2, size limit) with qemu's wording, then qsm_create().
 * A missing SIZE is taken from the backing image, opened read-only through
 * qsm_open (or stat() for a raw backing file).  Exit status 0 or 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/util.h"
#include "sm/qsm.h"
#include "tools/cli.h"

#define QCOW_MAX_L1_SIZE (32u << 20) /* bytes of L1 table qemu accepts */

static const char *const create_keys[] = {
	"size", "compat", "backing_file", "backing_fmt", "cluster_size",
	"extended_l2", "preallocation", "lazy_refcounts", "refcount_bits",
	"compression_type", NULL,
};

static void create_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm create [-q] [-f qcow2] [-b backing_file [-F backing_fmt]] [-u]\n"
		"                  [-o options] filename [size]\n"
		"Create a qcow2 image, as 'qemu-img create -f qcow2' does.\n"
		"\n"
		"  -f FMT        image format; only qcow2\n"
		"  -b FILE       backing file (relative to the new image's directory)\n"
		"  -F FMT        backing file format (required with -b)\n"
		"  -u            do not open the backing file (SIZE is then required)\n"
		"  -o OPTIONS    comma-separated name=value list; '-o help' lists them\n"
		"  -q            quiet: do not print the 'Formatting' line\n"
		"  SIZE          bytes, or with a k, M, G, T, P or E suffix (1k = 1024)\n");
}

static void create_opts_help(void)
{
	printf("Supported qcow2 options:\n"
	       "  backing_file=<str>     - File name of a base image\n"
	       "  backing_fmt=<str>      - Image format of the base image\n"
	       "  cluster_size=<size>    - qcow2 cluster size\n"
	       "  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n"
	       "  compression_type=<str> - Compression method used for image cluster compression\n"
	       "  extended_l2=<bool (on/off)> - Extended L2 tables\n"
	       "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"
	       "  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)\n"
	       "  refcount_bits=<num>    - Width of a reference count entry in bits\n"
	       "  size=<size>            - Virtual disk size\n");
}

static void bad_size_msg(void)
{
	cli_error("create", "Invalid image size specified. You may use k, M, G, T, P or E suffixes for");
	cli_error("create", "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
}

/* qemu's QEMU_OPT_SIZE parameter; messages start with cmd and pfx. */
static int opt_size(const char *cmd, const char *pfx, const char *key, const char *val,
		    uint64_t *out)
{
	if (cli_parse_size(val, out) < 0) {
		cli_error(cmd, "%sParameter '%s' expects a non-negative number below 2^64", pfx, key);
		fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
				"and exabytes, respectively.\n");
		return -EINVAL;
	}
	return 0;
}

/* qemu's QEMU_OPT_NUMBER parameter: strtoull base 0, whole string. */
static int opt_number(const char *cmd, const char *pfx, const char *key, const char *val,
		      uint64_t *out)
{
	char *end;

	errno = 0;
	*out = strtoull(val, &end, 0);
	if (!*val || *end || errno || strchr(val, '-')) {
		cli_error(cmd, "%sParameter '%s' expects a number", pfx, key);
		return -EINVAL;
	}
	return 0;
}

static int opt_bool(const char *cmd, const char *pfx, const char *key, const char *val, bool *out)
{
	if (cli_parse_bool(val, out) < 0) {
		cli_error(cmd, "%sParameter '%s' expects 'on' or 'off'", pfx, key);
		return -EINVAL;
	}
	return 0;
}

/* Print a value as qemu_opts_print does: commas doubled. */
static void print_escaped(const char *s)
{
	for (; *s; s++) {
		if (*s == ',')
			putchar(',');
		putchar(*s);
	}
}

/* Virtual size of the backing image (for a missing SIZE, and to check that
 * the backing file can be opened at all, as qemu-img does). */
static int backing_size(const char *file, const char *path, const char *fmt, uint64_t *size)
{
	char err[512] = "";
	struct qsm_image *img = NULL;
	struct qsm_info info;
	struct event_base *base;
	int r;

	if (!strcmp(fmt, "raw")) {
		struct stat st;
		if (stat(path, &st) < 0) {
			r = -errno;
			cli_error("create", "%s: Could not open '%s': %s", file, path, strerror(-r));
			fprintf(stderr, "Could not open backing image.\n");
			return r;
		}
		*size = (uint64_t)st.st_size;
		return 0;
	}
	base = event_base_new();
	if (!base)
		return -ENOMEM;
	struct qsm_open_opts o = { .read_only = true, .no_repair = true };
	r = qsm_open(base, path, &o, &img, err, sizeof(err));
	if (r < 0) {
		/* The engine's message may already say "Could not open ...". */
		if (!strncmp(err, "Could not open", 14))
			cli_error("create", "%s: %s", file, err);
		else
			cli_error("create", "%s: Could not open '%s': %s", file, path,
				  err[0] ? err : qsm_strerror(r));
		fprintf(stderr, "Could not open backing image.\n");
		event_base_free(base);
		return r;
	}
	qsm_get_info(img, &info);
	*size = info.virtual_size;
	qsm_close(img);
	event_base_free(base);
	return 0;
}

/* qemu-img's "Detected format of X." hint when -F is missing. */
static const char *probe_format(const char *path)
{
	unsigned char magic[4];
	int fd = open(path, O_RDONLY);
	ssize_t n = fd >= 0 ? read(fd, magic, 4) : -1;

	if (fd >= 0)
		close(fd);
	if (n == 4 && !memcmp(magic, "QFI\xfb", 4))
		return "qcow2";
	return n >= 0 ? "raw" : NULL;
}

static bool is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

/*
 * Phase 1 (cmd_create and cmd_convert): option names and value types, in
 * qemu's order; messages are "qsm CMD: PFX..." (create: PFX = "FILE: ").
 * Fills p with the values given or the defaults.
 */
int cli_create_parse(const char *cmd, const char *pfx, const struct cli_opts *opts,
		     struct cli_create_params *p)
{
	const char *v;

	*p = (struct cli_create_params){ .cluster_size = 65536, .refcount_bits = 16 };
	for (int i = 0; i < opts->n; i++) {
		bool known = false;
		for (int k = 0; create_keys[k]; k++)
			known |= !strcmp(opts->v[i].key, create_keys[k]);
		if (!known) {
			cli_error(cmd, "%sInvalid parameter '%s'", pfx, opts->v[i].key);
			return -EINVAL;
		}
	}
	if ((v = cli_opts_get(opts, "size"))) {
		if (opt_size(cmd, pfx, "size", v, &p->size) < 0)
			return -EINVAL;
		p->size_given = true;
	}
	if ((v = cli_opts_get(opts, "cluster_size")) &&
	    opt_size(cmd, pfx, "cluster_size", v, &p->cluster_size) < 0)
		return -EINVAL;
	if ((v = cli_opts_get(opts, "refcount_bits")) &&
	    opt_number(cmd, pfx, "refcount_bits", v, &p->refcount_bits) < 0)
		return -EINVAL;
	if ((v = cli_opts_get(opts, "lazy_refcounts")) &&
	    opt_bool(cmd, pfx, "lazy_refcounts", v, &p->lazy) < 0)
		return -EINVAL;
	if ((v = cli_opts_get(opts, "extended_l2")) &&
	    opt_bool(cmd, pfx, "extended_l2", v, &p->ext_l2) < 0)
		return -EINVAL;
	return 0;
}

/*
 * Phase 3: the combination, in qcow2_co_create()'s order, with qemu's
 * messages after "qsm CMD: PFX" (create: "FILE: ", convert: "FILE: error
 * while converting qcow2: ").  p->size is the image size (rounded up to
 * whole sectors here); backing_file/backing_fmt come from opts.  On
 * success co describes the image (its strings point into opts).
 */
int cli_create_validate(const char *cmd, const char *pfx, const struct cli_opts *opts,
			struct cli_create_params *p, struct qsm_create_opts *co)
{
	const char *v;
	unsigned compat = 3;
	const char *backing = cli_opts_get(opts, "backing_file");
	const char *backing_fmt = cli_opts_get(opts, "backing_fmt");

	if (backing && !*backing)
		backing = NULL;
	if ((v = cli_opts_get(opts, "compat"))) {
		if (!strcmp(v, "0.10") || !strcmp(v, "v2")) {
			compat = 2;
		} else if (!strcmp(v, "1.1") || !strcmp(v, "v3")) {
			compat = 3;
		} else {
			cli_error(cmd, "%sParameter 'version' does not accept value '%s'", pfx, v);
			return -EINVAL;
		}
	}
	enum qsm_compression compression = QSM_COMPRESSION_ZLIB;
	if ((v = cli_opts_get(opts, "compression_type")) &&
	    qsm_compression_parse(v, &compression) < 0) {
		cli_error(cmd, "%sParameter 'compression-type' does not accept value '%s'", pfx, v);
		return -EINVAL;
	}
	if (compression != QSM_COMPRESSION_ZLIB && compat < 3) {
		cli_error(cmd, "%sNon-zlib compression type is only supported with compatibility "
			  "level 1.1 and above (use version=v3 or greater)", pfx);
		return -EINVAL;
	}
	enum qsm_prealloc prealloc = QSM_PREALLOC_OFF;
	if ((v = cli_opts_get(opts, "preallocation")) && qsm_prealloc_parse(v, &prealloc) < 0) {
		cli_error(cmd, "%sParameter 'preallocation' does not accept value '%s'", pfx, v);
		return -EINVAL;
	}
	if (prealloc != QSM_PREALLOC_OFF && backing) {
		cli_error(cmd, "%sBacking file and preallocation can only be used at the same "
			  "time if extended_l2 is on", pfx);
		return -EINVAL;
	}
	if (!is_pow2(p->cluster_size) || p->cluster_size < 512 || p->cluster_size > (2u << 20)) {
		cli_error(cmd, "%sCluster size must be a power of two between 512 and 2048k", pfx);
		return -EINVAL;
	}
	if (p->ext_l2) {
		cli_error(cmd, "%sExtended L2 entries are not supported by qsm", pfx);
		return -EINVAL;
	}
	if (p->lazy && compat < 3) {
		cli_error(cmd, "%sLazy refcounts only supported with compatibility level 1.1 "
			  "and above (use version=v3 or greater)", pfx);
		return -EINVAL;
	}
	if (!is_pow2(p->refcount_bits) || p->refcount_bits > 64) {
		cli_error(cmd, "%sRefcount width must be a power of two and may not exceed 64 bits",
			  pfx);
		return -EINVAL;
	}
	if (compat < 3 && p->refcount_bits != 16) {
		cli_error(cmd, "%sDifferent refcount widths than 16 bits require compatibility "
			  "level 1.1 or above (use version=v3 or greater)", pfx);
		return -EINVAL;
	}
	if (backing_fmt && !backing) {
		cli_error(cmd, "%sBacking format cannot be used without backing file", pfx);
		return -EINVAL;
	}
	/* qemu rounds the size up to whole sectors. */
	p->size = QSM_ALIGN_UP(p->size, 512);
	uint64_t l2_cover = p->cluster_size * (p->cluster_size / 8);
	if (p->size / l2_cover + !!(p->size % l2_cover) > QCOW_MAX_L1_SIZE / 8) {
		cli_error(cmd, "%sThe image size is too large for file format 'qcow2' "
			  "(try using a larger cluster size)", pfx);
		return -EINVAL;
	}
	*co = (struct qsm_create_opts){
		.size = p->size,
		.cluster_size = p->cluster_size,
		.compat = compat,
		.refcount_bits = (unsigned)p->refcount_bits,
		.lazy_refcounts = p->lazy,
		.backing_file = backing,
		.backing_format = backing ? backing_fmt : NULL,
		.prealloc = prealloc,
		.compression = compression,
	};
	return 0;
}

int cmd_create(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts opts = { 0 };
	const char *fmt = "qcow2", *file, *v;
	bool quiet = false, unsafe = false, size_given = false;
	uint64_t size = 0;
	struct cli_create_params cp;
	char err[512] = "", pfx[1100];
	char *backing_path = NULL;
	int c, ret = 1;

	optind = 0;
	while ((c = cli_getopt_long(argc, argv, "hf:o:b:F:uq", lopt)) != -1) {
		switch (c) {
		case 'h':
			create_usage(stdout);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case 'o':
			if (!strcmp(optarg, "help") || !strcmp(optarg, "?")) {
				create_opts_help();
				cli_opts_free(&opts);
				return 0;
			}
			if (cli_opts_parse(&opts, optarg) < 0)
				goto out;
			break;
		case 'b':
			if (cli_opts_parse(&opts, "backing_file=") < 0)
				goto out;
			free(opts.v[opts.n - 1].val);
			opts.v[opts.n - 1].val = strdup(optarg);
			break;
		case 'F':
			if (cli_opts_parse(&opts, "backing_fmt=") < 0)
				goto out;
			free(opts.v[opts.n - 1].val);
			opts.v[opts.n - 1].val = strdup(optarg);
			break;
		case 'u':
			unsafe = true;
			break;
		case 'q':
			quiet = true;
			break;
		default:
			cli_help_hint("create");
			goto out;
		}
	}
	if (strcmp(fmt, "qcow2")) {
		cli_error("create", "Unknown file format '%s' (qsm creates qcow2 only)", fmt);
		goto out;
	}
	if (optind >= argc) {
		cli_error("create", "Expecting image file name");
		cli_help_hint("create");
		goto out;
	}
	file = argv[optind++];
	if (optind < argc) {
		int64_t s;
		int r = cli_cvtnum(argv[optind], &s);
		if (r == -ERANGE) {
			cli_error("create", "Invalid image size specified. Must be between 0 and %lld.",
				  (long long)INT64_MAX);
			goto out;
		}
		if (r < 0) {
			bad_size_msg();
			goto out;
		}
		size = (uint64_t)s;
		size_given = true;
		optind++;
	}
	if (optind < argc) {
		cli_error("create", "Unexpected argument: %s", argv[optind]);
		cli_help_hint("create");
		goto out;
	}

	/* Phase 1: names and types. */
	snprintf(pfx, sizeof(pfx), "%s: ", file);
	if (cli_create_parse("create", pfx, &opts, &cp) < 0)
		goto out;
	if (cp.size_given) {
		if (size_given) {
			cli_error("create", "%s: The image size must be specified only once", file);
			goto out;
		}
		size = cp.size;
		size_given = true;
	}

	const char *backing = cli_opts_get(&opts, "backing_file");
	const char *backing_fmt = cli_opts_get(&opts, "backing_fmt");
	if (backing && !*backing)
		backing = NULL;
	if (backing) {
		backing_path = cli_path_combine(file, backing);
		if (!backing_path)
			goto out;
		if (!backing_fmt) {
			const char *probed = probe_format(backing_path);
			cli_error("create", "%s: Backing file specified without backing format", file);
			if (probed)
				fprintf(stderr, "Detected format of %s.\n", probed);
			goto out;
		}
		if (!unsafe || !size_given) {
			uint64_t bsize = 0;
			if (backing_size(file, backing_path, backing_fmt, &bsize) < 0)
				goto out;
			if (!size_given) {
				size = bsize;
				size_given = true;
			}
		}
	}
	if (!size_given) {
		cli_error("create", "%s: Image creation needs a size parameter", file);
		goto out;
	}

	/* Phase 2: the line qemu-img prints before creating. */
	if (!quiet) {
		printf("Formatting '%s', fmt=qcow2 cluster_size=%llu extended_l2=", file,
		       (unsigned long long)cp.cluster_size);
		print_escaped(cli_opts_get(&opts, "extended_l2") ?: "off");
		if ((v = cli_opts_get(&opts, "preallocation"))) {
			printf(" preallocation=");
			print_escaped(v);
		}
		printf(" compression_type=");
		print_escaped(cli_opts_get(&opts, "compression_type") ?: "zlib");
		printf(" size=%llu", (unsigned long long)size);
		if ((v = cli_opts_get(&opts, "compat"))) {
			printf(" compat=");
			print_escaped(v);
		}
		if (backing) {
			printf(" backing_file=");
			print_escaped(backing);
		}
		if (backing_fmt) {
			printf(" backing_fmt=");
			print_escaped(backing_fmt);
		}
		printf(" lazy_refcounts=");
		print_escaped(cli_opts_get(&opts, "lazy_refcounts") ?: "off");
		printf(" refcount_bits=%llu\n", (unsigned long long)cp.refcount_bits);
		fflush(stdout);
	}

	/* Phase 3: the combination, in qcow2_co_create()'s order. */
	struct qsm_create_opts co;
	cp.size = size;
	if (cli_create_validate("create", pfx, &opts, &cp, &co) < 0)
		goto out;
	int r = qsm_create(file, &co, err, sizeof(err));
	if (r < 0) {
		cli_error("create", "%s: %s", file, err[0] ? err : qsm_strerror(r));
		goto out;
	}
	ret = 0;
out:
	free(backing_path);
	cli_opts_free(&opts);
	return ret;
}
