/*
 * tools/qsm.c: the `qsm` command: one binary, one subcommand per word, in
 * the manner of qemu-img (qsm create/info/...) with qemu-io folded in as
 * `qsm io`.
 *
 * Design: cmds[] below is the whole dispatch table.  Adding a subcommand is
 * one line here plus its tools/cmd_<name>.c defining
 * `int cmd_<name>(int argc, char **argv)` (declared in cli.h), which gets
 * argv[0] == "<name>", parses its own options (and --help) and returns the
 * process exit status.  `qsm help CMD` runs `qsm CMD --help`.
 *
 * Multi-call (as BusyBox): the basename of argv[0] picks a personality.
 *  - "qemu-io": the whole command line is `qsm io`'s, and every message
 *    names the program "qemu-io" (cli_set_progname), as qemu-io does;
 *  - "qemu-img": `qemu-img SUBCMD ...` runs the subcommands qsm has
 *    (qemu_img_cmds[]) with qemu-img's prefixes; the ones qsm lacks, and
 *    unknown words, get qemu-img's own "Command not found: X";
 *  - "qemu-nbd": the whole command line is `qsm nbd`'s, messages say
 *    "qemu-nbd" (tools/cmd_nbd.c);
 *  - anything else is `qsm`, whose subcommands keep the names "qsm CMD".
 * Install with `ln -s qsm qemu-io` (README.md).
 */
#include <stdio.h>
#include <string.h>

#include "tools/cli.h"

#ifndef QSM_VERSION_STRING
#define QSM_VERSION_STRING "0.1.0" /* keep in step with project(VERSION) */
#endif

static const struct cli_cmd cmds[] = {
	{ "create", cmd_create, "create a new qcow2 image" },
	{ "info",   cmd_info,   "show information about an image" },
	{ "check",  cmd_check,  "check (and repair) an image's consistency" },
	{ "io",     cmd_io,     "exercise an image with qemu-io commands" },
	{ "convert", cmd_convert, "copy an image into a new one, qcow2 or raw (as qemu-img convert)" },
	{ "compare", cmd_compare, "compare the contents of two images (as qemu-img compare)" },
	{ "map",    cmd_map,    "show the guest-to-file mapping of an image (as qemu-img map)" },
	{ "resize", cmd_resize, "change the virtual size of an image" },
	{ "snapshot", cmd_snapshot, "list an image's internal snapshots (as qemu-img snapshot -l)" },
	{ "bitmap", cmd_bitmap, "add, remove, clear, enable, disable or merge persistent bitmaps" },
	{ "bench",  cmd_bench,  "run a simple sequential I/O benchmark (as qemu-img bench)" },
	{ "graph",  cmd_graph,  "draw the request state machines (Graphviz) from sm/states.def" },
	{ "fuzz",   cmd_fuzz,   "fuzz request orderings, crashes and faults on a simulated disk" },
	{ "nbd",    cmd_nbd,    "serve an image over NBD (as qemu-nbd)" },
};

static const struct cli_cmd *find_cmd(const char *name);

/* What qemu-img's command table has that qsm also has: the same code as
 * `qsm NAME` (argv[0] stays NAME, messages say "qemu-img"). */
static const char *const qemu_img_cmds[] = {
	"create", "info", "check", "map", "compare", "convert", "resize", "bench", "snapshot",
	"bitmap",
};

static int run_as_qemu_img(int argc, char **argv)
{
	const char *word;

	cli_set_progname("qemu-img");
	if (argc < 2) {
		cli_error(NULL, "Not enough arguments");
		cli_help_hint(NULL);
		return 1;
	}
	word = argv[1];
	if (!strcmp(word, "--version") || !strcmp(word, "-V")) {
		printf("qemu-img version %s (qsm)\n", QSM_VERSION_STRING);
		return 0;
	}
	if (!strcmp(word, "--help") || !strcmp(word, "-h")) {
		printf("usage: qemu-img command [command options]\n"
		       "qsm as qemu-img: the subcommands qsm has\n"
		       "\n"
		       "Command syntax: see 'qsm COMMAND --help' for each of:\n");
		for (size_t i = 0; i < sizeof(qemu_img_cmds) / sizeof(qemu_img_cmds[0]); i++)
			printf("  %s\n", qemu_img_cmds[i]);
		return 0;
	}
	for (size_t i = 0; i < sizeof(qemu_img_cmds) / sizeof(qemu_img_cmds[0]); i++) {
		const struct cli_cmd *c = find_cmd(qemu_img_cmds[i]);
		if (c && !strcmp(word, c->name))
			return c->fn(argc - 1, argv + 1);
	}
	/* qemu-img's words for a command it does not have; rebase,
	 * amend, commit, dd and measure land here too. */
	cli_error(NULL, "Command not found: %s", word);
	cli_help_hint(NULL);
	return 1;
}

static void usage(FILE *f)
{
	fprintf(f, "Usage: qsm COMMAND [OPTIONS]... [ARGS]...\n"
		   "qcow2 storage engine tool\n"
		   "\n"
		   "Commands:\n");
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		fprintf(f, "  %-10s %s\n", cmds[i].name, cmds[i].summary);
	fprintf(f, "\n"
		   "Run 'qsm COMMAND --help' (or 'qsm help COMMAND') for a command's options.\n");
}

static const struct cli_cmd *find_cmd(const char *name)
{
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (!strcmp(cmds[i].name, name))
			return &cmds[i];
	return NULL;
}

int main(int argc, char **argv)
{
	const struct cli_cmd *c;
	const char *base = argc > 0 ? strrchr(argv[0], '/') : NULL;

	base = base ? base + 1 : argc > 0 ? argv[0] : "qsm";
	if (!strcmp(base, "qemu-io")) {
		cli_set_progname("qemu-io");
		return cmd_io(argc, argv);
	}
	if (!strcmp(base, "qemu-img"))
		return run_as_qemu_img(argc, argv);
	if (!strcmp(base, "qemu-nbd")) {
		cli_set_progname("qemu-nbd");
		return cmd_nbd(argc, argv);
	}
	if (argc < 2) {
		usage(stderr);
		return 1;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
		printf("qsm version %s\n", QSM_VERSION_STRING);
		return 0;
	}
	if (!strcmp(argv[1], "help")) {
		if (argc < 3) {
			usage(stdout);
			return 0;
		}
		c = find_cmd(argv[2]);
		if (!c) {
			fprintf(stderr, "qsm: unknown command '%s'; try 'qsm --help'\n", argv[2]);
			return 1;
		}
		char *hargv[] = { (char *)c->name, (char *)"--help", NULL };
		return c->fn(2, hargv);
	}
	c = find_cmd(argv[1]);
	if (!c) {
		fprintf(stderr, "qsm: unknown command '%s'; try 'qsm --help'\n", argv[1]);
		return 1;
	}
	return c->fn(argc - 1, argv + 1);
}
