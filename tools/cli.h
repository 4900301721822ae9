/*
 * tools/cli.h: what the `qsm` subcommands share: the dispatch table's entry
 * type, qemu-compatible number parsing and printing, "a=b,c=d" option
 * strings, and the qcow2 "Format specific information" block.
 *
 * Everything here copies qemu's observable behaviour (qemu 7.2): scripts
 * written for qemu-img/qemu-io must see the same numbers accepted and the
 * same strings printed.  Functions return 0 or a negative errno.
 */
#ifndef QSM_TOOLS_CLI_H
#define QSM_TOOLS_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qsm_info;

/* One subcommand: `qsm NAME ARGS...` runs fn(argc, argv) with argv[0] ==
 * NAME; the return value is the exit status.  Every fn answers --help. */
struct cli_cmd {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *summary;
};

int cmd_create(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_io(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_graph(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_fuzz(int argc, char **argv);
int cmd_nbd(int argc, char **argv);
int cmd_bitmap(int argc, char **argv);

/* Is name one of QEMU 7.2's block driver names (formats and protocols)?
 * Used to word refusals: a name QEMU lacks too is its "Unknown driver". */
bool cli_qemu_driver(const char *name);
/* A format given with -f that qsm opens: "qcow2", or "raw" too when raw_ok;
 * NULL (no -f: the open probes it, qsm_open_opts.probe_format) passes.
 * 0, or -EINVAL after printing "qsm CMD: Unknown file format ...". */
int cli_check_format(const char *cmd, const char *fmt, bool raw_ok);
/* QEMU's warning on stderr when img was opened writable as raw because a
 * probe found no format (raw_open's "probing guessed raw"); else nothing. */
struct qsm_image;
void cli_probed_warning(struct qsm_image *img, const char *file);
/* That warning, unconditionally (for commands that probe without opening). */
void cli_raw_probe_warning(const char *file);
/* The one image FILE left after the options (argv[optind]) with its -f
 * format, checked as qemu-img does: NULL after printing "Expecting one image
 * file name" and the --help hint, or the format error. */
const char *cli_image_arg(const char *cmd, int argc, char **argv, int optind, const char *fmt,
			  bool raw_ok);

/*
 * The program's name in messages.  `qsm` is a multi-call binary (tools/qsm.c):
 * run as qemu-io / qemu-img it names itself that way, as QEMU prefixes its
 * own name.  cli_set_progname() is called once by main(); cli_as_qemu() is
 * true when the name is one of QEMU's ("qemu-io", "qemu-img").
 */
void cli_set_progname(const char *name);
const char *cli_progname(void);
bool cli_as_qemu(void);
/* "Try 'qsm CMD --help' for more information" (as qemu-img: "Try
 * 'qemu-img --help' ..."), on stderr. */
void cli_help_hint(const char *cmd);
/* getopt_long() for the qemu-img subcommands: as qsm, glibc's messages; as
 * qemu-img, qemu-img's ("unrecognized option '-x'", "missing argument for
 * option '-f'") and '?' returned for both (the caller prints the hint). */
struct option;
int cli_getopt_long(int argc, char **argv, const char *optstring, const struct option *lopt);

/* Print "qsm PREFIX: message\n" on stderr (prefix may be NULL: "qsm: ");
 * run under a QEMU name, "qemu-img: message" whatever the prefix. */
void cli_error(const char *prefix, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* qemu_strtosz(): decimal with optional fraction and a b/k/M/G/T/P/E suffix
 * (case-insensitive, 1k = 1024), or 0x hex.  Whole string must match.
 * -EINVAL for junk, -ERANGE when it does not fit in 64 bits. */
int cli_parse_size(const char *s, uint64_t *out);
/* qemu-io's cvtnum(): cli_parse_size, and also -ERANGE above INT64_MAX. */
int cli_cvtnum(const char *s, int64_t *out);
/* qemu's qapi bool: on/yes/true/y, off/no/false/n. */
/* --output=human|json as qemu-img takes it: sets *json, or prints qemu-img's
 * message (prefixed with cmd) and returns -EINVAL. */
int cli_parse_output(const char *cmd, const char *arg, bool *json);
int cli_parse_bool(const char *s, bool *out);

/* qemu's size_to_str(): "196 KiB", "1.5 MiB", "0 B". */
void cli_size_to_str(uint64_t v, char *buf, size_t len);
/* qemu-io's cvtstr(): "64 KiB", "1.500 KiB", "512 bytes". */
void cli_cvtstr(double v, char *buf, size_t len);

/* An option string "a=b,c=d" (",," is a literal comma; a bare key means
 * key=on).  Repeated -o options append; the last value of a key wins. */
struct cli_opt {
	char *key, *val;
	bool null;  /* JSON null (tools/json.h); val is "" then */
};
struct cli_opts {
	struct cli_opt *v;
	int n;
};
int cli_opts_parse(struct cli_opts *o, const char *s);
const char *cli_opts_get(const struct cli_opts *o, const char *key);
/* Append key=val (copied).  0 or -ENOMEM. */
int cli_opts_add(struct cli_opts *o, const char *key, const char *val, bool null);
void cli_opts_free(struct cli_opts *o);

/* Options of a new qcow2 image (-o of qsm create and qsm convert), as
 * cmd_create.c parses them: cli_create_parse() checks names and value
 * types (qemu's phase 1), cli_create_validate() the combination and fills
 * a qsm_create_opts (phase 3).  Messages: "qsm CMD: PFX<qemu's text>". */
struct cli_create_params {
	uint64_t size;
	bool size_given;
	uint64_t cluster_size, refcount_bits;
	bool lazy, ext_l2;
};
struct qsm_create_opts;
int cli_create_parse(const char *cmd, const char *pfx, const struct cli_opts *opts,
		     struct cli_create_params *p);
int cli_create_validate(const char *cmd, const char *pfx, const struct cli_opts *opts,
			struct cli_create_params *p, struct qsm_create_opts *co);

/* qemu's path_combine(): a relative backing file name is relative to the
 * directory of the image that names it; a json:{...} name gives its
 * file.filename as it is (QEMU does not combine those).  Returns malloc'd
 * string. */
char *cli_path_combine(const char *base, const char *name);

/*
 * Status of the guest range starting at off (at most `bytes` long, inside
 * top's virtual size) through top's backing chain, the way qemu-img map's
 * get_block_status() walks it: each layer is asked in turn (its run
 * narrowing the length) until one reports DATA or ZERO.  An unallocated run
 * at or past the end of a shorter backing image reads as zeros decided by
 * the layer above it (QEMU: ZERO, not ALLOCATED, at that depth; `past_end`).
 *  - flags: QSM_STATUS_* of the deciding layer (ZERO alone at the bottom of
 *    a chain or past a backing image's end);
 *  - depth: 0 for top, 1 for its backing image, ...; layer: that image;
 *  - allocated: what bdrv_block_status_above(top, NULL) calls ALLOCATED:
 *    some layer decided (ALLOCATED flag), or the run is past a backing end.
 * A layer opened without its backing image (no_backing) ends the walk with
 * ZERO.  Blocking (runs the loop): not for use inside callbacks.
 */
struct cli_chain_status {
	uint64_t offset, length;
	unsigned flags;
	uint64_t host_offset;
	int depth;
	struct qsm_image *layer;
	bool allocated, past_end;
};
int cli_chain_status(struct qsm_image *top, uint64_t off, uint64_t bytes,
		     struct cli_chain_status *out);

/* qemu-progress.c's simple progress printer: "    (12.34/100%)\r" on
 * stdout whenever the figure moved by more than min_skip percent (or is 0
 * or 100); cli_progress_end() prints the final newline.  Does nothing when
 * not enabled. */
void cli_progress_init(bool enabled, float min_skip);
void cli_progress_add(float delta_percent);
void cli_progress_set(float percent);
void cli_progress_end(void);

/* The indented qcow2 lines under "Format specific information:", as
 * qemu-img info and qemu-io info print them. */
void cli_print_qcow2_specific(struct qsm_image *img, const struct qsm_info *info);
/* The snapshot table as qemu-img prints it (bdrv_snapshot_dump of QEMU
 * 7.2): "Snapshot list:", the header row and one row per snapshot, each
 * line ended by a newline; nothing when the image has none.  Dates in local
 * time, as qemu-img. */
struct qsm_image;
void cli_print_snapshots(struct qsm_image *img);

#endif
