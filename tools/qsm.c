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
	{ "bench",  cmd_bench,  "run a simple sequential I/O benchmark (as qemu-img bench)" },
	{ "graph",  cmd_graph,  "draw the request state machines (Graphviz) from sm/states.def" },
	{ "fuzz",   cmd_fuzz,   "fuzz request orderings, crashes and faults on a simulated disk" },
};

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
