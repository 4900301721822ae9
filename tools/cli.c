/*
 * tools/cli.c: helpers shared by the `qsm` subcommands.
 *
 * Design: each helper reproduces one piece of qemu 7.2's user-visible
 * behaviour, so that a script written for qemu-img or qemu-io gets the same
 * answer from qsm:
 *  - cli_parse_size() is util/cutils.c do_strtosz() with default suffix 'B'
 *    and unit 1024: "1.5k" = 1536, "1.5" and "1.5b" are rejected (a fraction
 *    needs a scaling suffix), "0x10" is hex, "010" is decimal ten, "-1" is
 *    junk, and a value that does not fit in 64 bits is -ERANGE.
 *  - cli_size_to_str() is qemu-img's size_to_str() ("%0.3g", switching to the
 *    next unit at 1000 of the current one); cli_cvtstr() is qemu-io's
 *    cvtstr() ("%.3f" with ".000" trimmed).  The two differ on purpose: each
 *    tool prints its own.
 *  - cli_opts_parse() is a small QemuOpts: "a=b,c=d", ",," for a comma,
 *    bare "key" meaning key=on.
 * Errors are 0 / negative errno; nothing here exits.
 */
#include <errno.h>
#include <inttypes.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sm/qsm.h"
#include "tools/cli.h"
#include "tools/json.h"

/* The name messages start with: "qsm" until main() says otherwise. */
static const char *progname = "qsm";

void cli_set_progname(const char *name)
{
	progname = name;
}

const char *cli_progname(void)
{
	return progname;
}

bool cli_as_qemu(void)
{
	return !strncmp(progname, "qemu-", 5);
}

void cli_error(const char *prefix, const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	if (cli_as_qemu() || !prefix)
		fprintf(stderr, "%s: ", progname);
	else
		fprintf(stderr, "qsm %s: ", prefix);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* 1024^n for the suffix letter c, 0 when c is not a suffix. */
static uint64_t suffix_mul(char c)
{
	switch (c) {
	case 'b': case 'B': return 1;
	case 'k': case 'K': return 1ULL << 10;
	case 'm': case 'M': return 1ULL << 20;
	case 'g': case 'G': return 1ULL << 30;
	case 't': case 'T': return 1ULL << 40;
	case 'p': case 'P': return 1ULL << 50;
	case 'e': case 'E': return 1ULL << 60;
	}
	return 0;
}

int cli_parse_size(const char *s, uint64_t *out)
{
	const char *end;
	char *e;
	uint64_t val, mul;
	double fraction = 0;
	bool hex = false;

	if (!s)
		return -EINVAL;
	errno = 0;
	val = strtoull(s, &e, 10);
	end = e;
	if (end == s)
		return -EINVAL;
	if (errno == ERANGE)
		return -ERANGE;
	if (memchr(s, '-', (size_t)(end - s)))
		return -EINVAL;
	if (val == 0 && (*end == 'x' || *end == 'X')) {
		errno = 0;
		val = strtoull(s, &e, 16);
		end = e;
		if (errno == ERANGE)
			return -ERANGE;
		if (*end == '.')
			return -EINVAL;
		hex = true;
	} else if (*end == '.') {
		/* "1.k" is allowed (no digits); exponents are not. */
		const char *f = end;
		errno = 0;
		fraction = strtod(f, &e);
		if (e == f) {
			fraction = 0;
			end = f + 1;
		} else {
			if (memchr(f, 'e', (size_t)(e - f)) || memchr(f, 'E', (size_t)(e - f)) ||
			    !isfinite(fraction))
				return -EINVAL;
			end = e;
		}
	}
	mul = suffix_mul(*end);
	if (mul) {
		if (hex && mul > 1)
			fprintf(stderr, "%s: warning: Using a multiplier suffix on hex numbers "
				"is deprecated: %s\n", progname, s);
		end++;
	} else {
		mul = 1;
	}
	if (*end)
		return -EINVAL;
	if (mul == 1) {
		if (fraction != 0)
			return -EINVAL;
		*out = val;
		return 0;
	}
	if (val > UINT64_MAX / mul)
		return -ERANGE;
	uint64_t frac = (uint64_t)(fraction * (double)mul);
	if (val * mul > UINT64_MAX - frac)
		return -ERANGE;
	*out = val * mul + frac;
	return 0;
}

int cli_cvtnum(const char *s, int64_t *out)
{
	uint64_t v;
	int r = cli_parse_size(s, &v);

	if (r < 0)
		return r;
	if (v > INT64_MAX)
		return -ERANGE;
	*out = (int64_t)v;
	return 0;
}

int cli_parse_output(const char *cmd, const char *arg, bool *json)
{
	if (!strcmp(arg, "json") || !strcmp(arg, "human")) {
		*json = !strcmp(arg, "json");
		return 0;
	}
	cli_error(cmd, "--output must be used with human or json as argument.");
	return -EINVAL;
}

int cli_parse_bool(const char *s, bool *out)
{
	static const char *const yes[] = { "on", "yes", "true", "y" };
	static const char *const no[] = { "off", "no", "false", "n" };

	for (size_t i = 0; i < 4; i++) {
		if (!strcmp(s, yes[i])) {
			*out = true;
			return 0;
		}
		if (!strcmp(s, no[i])) {
			*out = false;
			return 0;
		}
	}
	return -EINVAL;
}

void cli_size_to_str(uint64_t v, char *buf, size_t len)
{
	static const char *const sfx[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
	int i;

	/* frexp gives floor(log2(v * 1024 / 1000)) + 1: switch units at 1000. */
	frexp((double)v / (1000.0 / 1024.0), &i);
	i = (i - 1) / 10;
	if (i < 0)
		i = 0;
	snprintf(buf, len, "%0.3g %sB", (double)v / (double)(1ULL << (i * 10)), sfx[i]);
}

void cli_print_snapshots(struct qsm_image *img)
{
	unsigned n = qsm_snapshot_count(img);

	if (!n)
		return;
	printf("Snapshot list:\n");
	printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
	for (unsigned i = 0; i < n; i++) {
		struct qsm_snapshot_info sn = { .struct_size = sizeof(sn) };
		char date[128] = "", clock[128], size[64], icount[32] = "";
		struct tm tm;
		time_t t;

		if (qsm_snapshot_get(img, i, &sn) < 0)
			break;
		t = (time_t)sn.date_sec;
		if (localtime_r(&t, &tm))
			strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		uint64_t secs = sn.vm_clock_nsec / 1000000000;
		snprintf(clock, sizeof(clock), "%02d:%02d:%02d.%03d", (int)(secs / 3600),
			 (int)((secs / 60) % 60), (int)(secs % 60),
			 (int)((sn.vm_clock_nsec / 1000000) % 1000));
		cli_size_to_str(sn.vm_state_size, size, sizeof(size));
		if (sn.icount != QSM_SNAPSHOT_NO_ICOUNT)
			snprintf(icount, sizeof(icount), "%" PRId64, (int64_t)sn.icount);
		printf("%-9s %-16s %8s%20s%13s%11s\n", sn.id, sn.name, size, date, clock, icount);
	}
}

void cli_cvtstr(double v, char *buf, size_t len)
{
	static const struct {
		int shift;
		const char *sfx;
	} units[] = {
		{ 60, " EiB" }, { 50, " PiB" }, { 40, " TiB" },
		{ 30, " GiB" }, { 20, " MiB" }, { 10, " KiB" },
	};
	const char *sfx = " bytes";
	char *trim;

	snprintf(buf, len > 6 ? len - 6 : len, "%f", v);
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		double u = (double)(1ULL << units[i].shift);
		if (v >= u) {
			sfx = units[i].sfx;
			snprintf(buf, len - 4, "%.3f", v / u);
			break;
		}
	}
	trim = strstr(buf, ".000");
	if (trim)
		*trim = '\0';
	if (strlen(buf) + strlen(sfx) < len)
		strcat(buf, sfx);
}

int cli_opts_parse(struct cli_opts *o, const char *s)
{
	const char *p = s;

	while (*p) {
		size_t klen = strcspn(p, "=,");
		char *key, *val;
		size_t vlen = 0;

		if (klen == 0 && *p == ',') {
			p++;
			continue;
		}
		key = strndup(p, klen);
		p += klen;
		val = malloc(strlen(p) + 3);
		if (!key || !val) {
			free(key);
			free(val);
			return -ENOMEM;
		}
		if (*p == '=') {
			p++;
			while (*p) {
				if (*p == ',') {
					if (p[1] != ',')
						break;
					p++;
				}
				val[vlen++] = *p++;
			}
			val[vlen] = '\0';
		} else {
			strcpy(val, "on");
		}
		if (*p == ',')
			p++;
		struct cli_opt *nv = realloc(o->v, (size_t)(o->n + 1) * sizeof(*nv));
		if (!nv) {
			free(key);
			free(val);
			return -ENOMEM;
		}
		o->v = nv;
		o->v[o->n].key = key;
		o->v[o->n].val = val;
		o->v[o->n].null = false;
		o->n++;
	}
	return 0;
}

int cli_opts_add(struct cli_opts *o, const char *key, const char *val, bool null)
{
	struct cli_opt *nv = realloc(o->v, (size_t)(o->n + 1) * sizeof(*nv));
	char *k, *v;

	if (!nv)
		return -ENOMEM;
	o->v = nv;
	k = strdup(key);
	v = strdup(val);
	if (!k || !v) {
		free(k);
		free(v);
		return -ENOMEM;
	}
	o->v[o->n++] = (struct cli_opt){ k, v, null };
	return 0;
}

const char *cli_opts_get(const struct cli_opts *o, const char *key)
{
	for (int i = o->n - 1; i >= 0; i--)
		if (!strcmp(o->v[i].key, key))
			return o->v[i].val;
	return NULL;
}

void cli_opts_free(struct cli_opts *o)
{
	for (int i = 0; i < o->n; i++) {
		free(o->v[i].key);
		free(o->v[i].val);
	}
	free(o->v);
	o->v = NULL;
	o->n = 0;
}

char *cli_path_combine(const char *base, const char *name)
{
	const char *slash = strrchr(base, '/');
	char *r;

	/* A json: name's file (file.filename) is taken as it is, as QEMU
	 * does (and names the layer by it). */
	if (!strncmp(name, "json:", 5)) {
		struct cli_opts o = { 0 };
		char e[256];
		const char *f = NULL;
		if (cli_json_parse(name + 5, &o, e, sizeof(e)) == 0)
			f = cli_opts_get(&o, "file.filename") ? cli_opts_get(&o, "file.filename")
							       : cli_opts_get(&o, "filename");
		r = strdup(f ? f : name);
		cli_opts_free(&o);
		return r;
	}
	if (name[0] == '/' || !slash)
		return strdup(name);
	size_t dlen = (size_t)(slash - base) + 1;
	r = malloc(dlen + strlen(name) + 1);
	if (!r)
		return NULL;
	memcpy(r, base, dlen);
	strcpy(r + dlen, name);
	return r;
}

void cli_print_qcow2_specific(struct qsm_image *img, const struct qsm_info *info)
{
	if (info->version >= 3) {
		printf("    compat: 1.1\n");
		printf("    compression type: %s\n", info->compression_type);
		printf("    lazy refcounts: %s\n", info->lazy_refcounts ? "true" : "false");
		unsigned n = qsm_bitmap_count(img);
		if (n)
			printf("    bitmaps:\n");
		for (unsigned i = 0; i < n; i++) {
			struct qsm_bitmap_info b = { .struct_size = sizeof(b) };
			if (qsm_bitmap_get(img, i, &b) < 0)
				break;
			printf("        [%u]:\n            flags:\n", i);
			unsigned k = 0;
			if (b.flags & QSM_BITMAP_IN_USE)
				printf("                [%u]: in-use\n", k++);
			if (b.flags & QSM_BITMAP_AUTO)
				printf("                [%u]: auto\n", k++);
			printf("            name: %s\n            granularity: %llu\n", b.name,
			       (unsigned long long)b.granularity);
		}
		printf("    refcount bits: %u\n", info->refcount_bits);
		printf("    corrupt: %s\n", info->corrupt ? "true" : "false");
		printf("    extended l2: false\n");
	} else {
		printf("    compat: 0.10\n");
		printf("    compression type: %s\n", info->compression_type);
		printf("    refcount bits: %u\n", info->refcount_bits);
	}
}

int cli_chain_status(struct qsm_image *top, uint64_t off, uint64_t bytes,
		     struct cli_chain_status *out)
{
	struct qsm_image *layer = top;
	struct qsm_info info;
	struct qsm_extent e;
	int depth = 0, r;

	for (;;) {
		r = qsm_sync_block_status(layer, off, bytes, &e);
		if (r < 0)
			return r;
		if (e.length == 0 || e.length > bytes)
			return -EIO; /* the engine's contract: 0 < length <= bytes */
		bytes = e.length;
		if (e.flags & (QSM_STATUS_DATA | QSM_STATUS_ZERO))
			break;
		struct qsm_image *b = qsm_get_backing(layer);
		if (!b) {
			e.flags = QSM_STATUS_ZERO;
			break;
		}
		qsm_get_info(b, &info);
		if (off >= info.virtual_size) {
			*out = (struct cli_chain_status){ off, bytes, QSM_STATUS_ZERO, 0, depth,
							  layer, true, true };
			return 0;
		}
		if (bytes > info.virtual_size - off)
			bytes = info.virtual_size - off;
		layer = b;
		depth++;
	}
	*out = (struct cli_chain_status){ off, bytes, e.flags, e.host_offset, depth, layer,
					  !!(e.flags & QSM_STATUS_ALLOCATED), false };
	return 0;
}

static struct {
	bool enabled;
	float current, last_print, min_skip;
} progress;

void cli_progress_init(bool enabled, float min_skip)
{
	progress.enabled = enabled;
	progress.current = progress.last_print = 0;
	progress.min_skip = min_skip;
}

void cli_progress_add(float delta)
{
	float cur = progress.current + delta;

	if (!progress.enabled)
		return;
	if (cur > 100)
		cur = 100;
	progress.current = cur;
	if (cur > progress.last_print + progress.min_skip ||
	    cur < progress.last_print - progress.min_skip || cur == 0 || cur == 100) {
		progress.last_print = cur;
		printf("    (%3.2f/100%%)\r", cur);
		fflush(stdout);
	}
}

void cli_progress_set(float percent)
{
	cli_progress_add(percent - progress.current);
}

void cli_progress_end(void)
{
	if (progress.enabled) {
		printf("\n");
		fflush(stdout);
	}
	progress.enabled = false;
}

bool cli_qemu_driver(const char *name)
{
	static const char *const drivers[] = {
		"qcow2", "raw", "file", "host_device", "host_cdrom", "qcow", "vmdk", "vdi",
		"vhdx", "vpc", "qed", "parallels", "bochs", "cloop", "dmg", "luks", "nbd",
		"blkdebug", "blkverify", "blklogwrites", "null-co", "null-aio", "throttle",
		"quorum", "copy-on-read", "compress", "preallocate", "nvme", "iscsi", "rbd",
		"ssh", "http", "https", "ftp", "ftps", "replication", "snapshot-access",
		"copy-before-write", "vvfat", "gluster", "nfs",
	};

	for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++)
		if (!strcmp(drivers[i], name))
			return true;
	return false;
}

int cli_check_format(const char *cmd, const char *fmt, bool raw_ok)
{
	if (!fmt || !strcmp(fmt, "qcow2") || (raw_ok && !strcmp(fmt, "raw")))
		return 0;
	cli_error(cmd, "Unknown file format '%s' (qsm reads %s)", fmt,
		  raw_ok ? "qcow2 and raw" : "qcow2 only");
	return -EINVAL;
}

const char *cli_image_arg(const char *cmd, int argc, char **argv, int optind, const char *fmt,
			  bool raw_ok)
{
	if (optind != argc - 1) {
		cli_error(cmd, "Expecting one image file name");
		cli_help_hint(cmd);
		return NULL;
	}
	/* A name QEMU does not know either: qemu-img's words. */
	if (fmt && cli_as_qemu() && !cli_qemu_driver(fmt)) {
		cli_error(cmd, "Could not open '%s': Unknown driver '%s'", argv[optind], fmt);
		return NULL;
	}
	return cli_check_format(cmd, fmt, raw_ok) < 0 ? NULL : argv[optind];
}

void cli_probed_warning(struct qsm_image *img, const char *file)
{
	struct qsm_info info;
	qsm_get_info(img, &info);
	if (info.format_probed && !strcmp(info.format, "raw") && !info.read_only)
		cli_raw_probe_warning(file);
}

void cli_raw_probe_warning(const char *file)
{
	fprintf(stderr,
		"WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
		"         Automatically detecting the format is dangerous for raw images, "
		"write operations on block 0 will be restricted.\n"
		"         Specify the 'raw' format explicitly to remove the restrictions.\n",
		file);
}

void cli_help_hint(const char *cmd)
{
	if (cli_as_qemu())
		fprintf(stderr, "Try '%s --help' for more information\n", progname);
	else
		fprintf(stderr, "Try 'qsm %s --help' for more information\n", cmd);
}

int cli_getopt_long(int argc, char **argv, const char *optstring, const struct option *lopt)
{
	char buf[128];
	int c;

	if (strcmp(progname, "qemu-img") != 0)
		return getopt_long(argc, argv, optstring, lopt, NULL);
	/* qemu-img's own messages: getopt quiet (leading ':'), the offending
	 * word quoted whole. */
	snprintf(buf, sizeof(buf), ":%s", optstring[0] == ':' ? optstring + 1 : optstring);
	opterr = 0;
	c = getopt_long(argc, argv, buf, lopt, NULL);
	opterr = 1;
	if (c == '?' || c == ':') {
		/* argv[optind - 1], as qemu-img names it (inside a cluster such
		 * as "-qx" that is the word before: qemu-img's quirk, kept). */
		const char *word = optind > 0 && optind <= argc ? argv[optind - 1] : "";
		cli_error(NULL, c == '?' ? "unrecognized option '%s'" : "missing argument for option '%s'",
			  word);
		return '?';
	}
	return c;
}
