/*
 * tools/cmd_graph.c: `qsm graph`, the request state machines as Graphviz.
 *
 *   qsm graph [--machine read|write|zeroes|discard|flush|status|writeback|close|all|nbd]
 *             [--format dot|svg] [-o FILE] [--list]
 *
 * Design: everything drawn comes from sm/states.def, included here with
 * this file's own definitions of MACHINE/STATE/EVENT/TRANSITION, exactly the
 * table the dispatcher (sm/dispatch.c, qsm_sm_run) executes.  There is no
 * hand-written list of states or edges in this file, so the pictures cannot
 * drift from the code.
 *
 * What is drawn, per machine:
 *  - every state that appears in one of the machine's transitions, labelled
 *    with its name, its description as a tooltip; states whose description
 *    starts with "wait:" are filled (the request sleeps there);
 *  - one edge per TRANSITION(machine, from, event, to), labelled with the
 *    event's label, with id "MACHINE:FROM:EVENT:TO" (tests read it back);
 *  - the implicit edges: the dispatcher takes any state to DONE on event
 *    ERROR.  Drawn as one dashed grey edge from the box around all the other
 *    states (a Graphviz cluster) to DONE, id "MACHINE:*:ERROR:DONE".
 *  - the edges between requests, from the table's WAKES lines (who posts the
 *    event that ends a wait), dashed blue, id
 *    "wake:MACHINE:STATE:EVENT:BY_MACHINE:BY_STATE": in `all`, from the
 *    waker's state to the waiting state (an ANY waker is drawn from the
 *    waiting machine's own by_state when it has one, else from every machine
 *    that has it); in one machine's diagram, the same edge when the waker is
 *    that machine, and a note (shape=note) naming the other machines that
 *    wake it, id "note:MACHINE:STATE:EVENT:BY_STATE", with a dashed edge to
 *    the waiting state ("wake:MACHINE:STATE:EVENT:others:BY_STATE"); when
 *    this machine wakes others, a note naming them, id
 *    "note:wakes:STATE:EVENT:MACHINE:BY_STATE", with an edge from the waking
 *    state ("wake:*:STATE:EVENT:MACHINE:BY_STATE").
 *  - write-back levels: each edge into a sync state of WRITEBACK (its
 *    description starts with "fdatasync") gets a second label line saying
 *    what that sync makes durable: what the state it comes from writes (its
 *    description after "write "), plus the guest data written before the
 *    snapshot when no sync can come before it on the way from START (the
 *    batch's first sync), "when first" when some paths have one.  All
 *    derived from the table, so it follows the level order there.
 * Node ids are "MACHINE__STATE", so `--machine all` can hold every machine
 * side by side in one graph.  The output is deterministic (table order), so
 * the DOT files committed under tools/doc/ can be compared byte for byte.
 *
 * --list prints the table itself, one fact per line, for tests:
 *   machine NAME description / state NAME description /
 *   event NAME label / transition MACHINE FROM EVENT TO /
 *   wakes MACHINE|ANY STATE EVENT BY_MACHINE|ANY BY_STATE label
 *
 * SVG: the DOT text is piped through Graphviz's `dot -Tsvg`; without dot
 * the command fails with a message saying how to get it, and writes nothing.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sm/sm.h"
#include "tools/cli.h"

/* --- the table ------------------------------------------------------------ */
/* Machines, states and events are the engine's own (sm/sm.h: the enums and
 * qsm_*_name/desc/label); the edges come from sm/states.def in its order,
 * which is the order of the committed diagrams. */

struct g_transition {
	enum qsm_machine m;
	enum qsm_state from, to;
	enum qsm_event ev;
};

static const struct g_transition transitions[] = {
#define TRANSITION(m, from, ev, to) { QSM_M_##m, QSM_S_##from, QSM_S_##to, QSM_E_##ev },
/* BREAK's edges back to where a request stopped: drawn as any other. */
#define TRANSITION_BACK(m, from, ev, to) TRANSITION(m, from, ev, to)
#include "sm/states.def"
};

#define NB_TRANSITIONS (sizeof(transitions) / sizeof(transitions[0]))

/* WAKES lines: machine -1 = ANY. */
enum {
#define MACHINE(name, desc) GM_##name = QSM_M_##name,
#include "sm/states.def"
	GM_ANY = -1
};

struct g_wake {
	int m;                  /* waiting machine, or -1: every machine with the edge */
	enum qsm_state s;
	enum qsm_event ev;
	int by;                 /* waking machine, or -1: any that has by_s */
	enum qsm_state by_s;
	const char *label;
};

static const struct g_wake wakes[] = {
#define WAKES(m, s, e, by, bs, label) { GM_##m, QSM_S_##s, QSM_E_##e, GM_##by, QSM_S_##bs, label },
#include "sm/states.def"
};

#define NB_WAKES (sizeof(wakes) / sizeof(wakes[0]))

/* --- DOT ------------------------------------------------------------------ */

/* Print s as the inside of a DOT double-quoted string. */
static void dot_str(FILE *f, const char *s)
{
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			fputc('\\', f);
		fputc(*s, f);
	}
}

static bool is_wait_state(enum qsm_state s)
{
	return !strncmp(qsm_state_desc(s), "wait:", 5);
}

/* Which states machine m uses (appear in one of its transitions). */
static void machine_states(enum qsm_machine m, bool used[QSM_S__COUNT])
{
	memset(used, 0, sizeof(bool) * QSM_S__COUNT);
	for (size_t i = 0; i < NB_TRANSITIONS; i++) {
		if (transitions[i].m != m)
			continue;
		used[transitions[i].from] = used[transitions[i].to] = true;
	}
	used[QSM_S_DONE] = true; /* every machine ends there, at least on ERROR */
	used[QSM_S_START] = true;
}

static bool machine_uses(enum qsm_machine m, enum qsm_state s)
{
	bool used[QSM_S__COUNT];
	machine_states(m, used);
	return used[s];
}

/* Does the WAKES line w apply to machine m (m has its edge)? */
static bool wake_applies(const struct g_wake *w, enum qsm_machine m)
{
	return (w->m < 0 || w->m == (int)m) && qsm_transition(m, w->s, w->ev) >= 0;
}

/* Is machine b one that posts w's event to machine m?  An ANY waker is m
 * itself when m has by_s, otherwise every machine that has it. */
static bool wake_by(const struct g_wake *w, enum qsm_machine m, enum qsm_machine b)
{
	if (!machine_uses(b, w->by_s))
		return false;
	if (w->by >= 0)
		return w->by == (int)b;
	return machine_uses(m, w->by_s) ? b == m : true;
}

/* layout: "constraint=false" (an edge inside one machine: leave its layout
 * alone), "weight=0" (between clusters, where dot cannot take
 * constraint=false), or "" (to a note: place the note next to the state). */
static void put_wake_style(FILE *f, const struct g_wake *w, const char *layout)
{
	/* In `all` (weight=0) the many dashed edges are left unlabelled: the
	 * tooltip says it all. */
	fprintf(f, "label=\"");
	if (strcmp(layout, "weight=0"))
		dot_str(f, w->label);
	fprintf(f, "\", tooltip=\"%s --%s--> is posted by another request in %s: ",
		qsm_state_name(w->s), qsm_event_name(w->ev), qsm_state_name(w->by_s));
	dot_str(f, w->label);
	fprintf(f, "\", style=dashed, "
		   "color=\"#3366cc\", fontcolor=\"#3366cc\", arrowsize=0.6%s%s",
		*layout ? ", " : "", layout);
}

/* The wake edges of the `all` diagram. */
static void dot_wakes_all(FILE *f)
{
	for (size_t i = 0; i < NB_WAKES; i++) {
		const struct g_wake *w = &wakes[i];
		for (int m = 0; m < QSM_M__COUNT; m++) {
			if (!wake_applies(w, m))
				continue;
			for (int b = 0; b < QSM_M__COUNT; b++) {
				if (!wake_by(w, m, b))
					continue;
				const char *mn = qsm_machine_name(m), *bn = qsm_machine_name(b);
				fprintf(f, "\t%s__%s -> %s__%s [id=\"wake:%s:%s:%s:%s:%s\", ", bn,
					qsm_state_name(w->by_s), mn, qsm_state_name(w->s), mn,
					qsm_state_name(w->s), qsm_event_name(w->ev), bn,
					qsm_state_name(w->by_s));
				put_wake_style(f, w, "weight=0");
				fprintf(f, "];\n");
			}
		}
	}
}

/* The wake edges and notes of machine m's own diagram. */
static void dot_wakes_one(FILE *f, enum qsm_machine m, const char *ind)
{
	const char *mn = qsm_machine_name(m);
	for (size_t i = 0; i < NB_WAKES; i++) {
		const struct g_wake *w = &wakes[i];
		/* Waits of m ended by other requests: of m itself (an edge), of
		 * other machines (one note naming them). */
		if (wake_applies(w, m)) {
			bool others = false;
			for (int b = 0; b < QSM_M__COUNT; b++)
				others |= b != (int)m && wake_by(w, m, b);
			if (wake_by(w, m, m)) {
				fprintf(f, "%s%s__%s -> %s__%s [id=\"wake:%s:%s:%s:%s:%s\", ", ind, mn,
					qsm_state_name(w->by_s), mn, qsm_state_name(w->s), mn,
					qsm_state_name(w->s), qsm_event_name(w->ev), mn,
					qsm_state_name(w->by_s));
				put_wake_style(f, w, "constraint=false");
				fprintf(f, "];\n");
			}
			if (others) {
				fprintf(f, "%snote_%zu_by [id=\"note:%s:%s:%s:%s\", shape=note, style=\"\", "
					   "color=\"#3366cc\", fontcolor=\"#3366cc\", fontsize=9, label=\"",
					ind, i, mn, qsm_state_name(w->s), qsm_event_name(w->ev),
					qsm_state_name(w->by_s));
				bool first = true;
				for (int b = 0; b < QSM_M__COUNT; b++) {
					if (b == (int)m || !wake_by(w, m, b))
						continue;
					fprintf(f, "%s%s", first ? "" : ", ", qsm_machine_name(b));
					first = false;
				}
				fprintf(f, "\\nrequest in %s\"];\n", qsm_state_name(w->by_s));
				fprintf(f, "%snote_%zu_by -> %s__%s [id=\"wake:%s:%s:%s:others:%s\", ", ind, i,
					mn, qsm_state_name(w->s), mn, qsm_state_name(w->s),
					qsm_event_name(w->ev), qsm_state_name(w->by_s));
				put_wake_style(f, w, "");
				fprintf(f, "];\n");
			}
		}
		/* Waits of other machines that m ends. */
		bool others = false;
		for (int o = 0; o < QSM_M__COUNT; o++)
			others |= o != (int)m && wake_applies(w, o) && wake_by(w, o, m);
		if (!others)
			continue;
		fprintf(f, "%snote_%zu_wakes [id=\"note:wakes:%s:%s:%s:%s\", shape=note, style=\"\", "
			   "color=\"#3366cc\", fontcolor=\"#3366cc\", fontsize=9, label=\"",
			ind, i, qsm_state_name(w->s), qsm_event_name(w->ev), mn, qsm_state_name(w->by_s));
		bool first = true;
		for (int o = 0; o < QSM_M__COUNT; o++) {
			if (o == (int)m || !wake_applies(w, o) || !wake_by(w, o, m))
				continue;
			fprintf(f, "%s%s", first ? "" : ", ", qsm_machine_name(o));
			first = false;
		}
		fprintf(f, "\\nrequests in %s\"];\n", qsm_state_name(w->s));
		fprintf(f, "%s%s__%s -> note_%zu_wakes [id=\"wake:*:%s:%s:%s:%s\", ", ind, mn,
			qsm_state_name(w->by_s), i, qsm_state_name(w->s), qsm_event_name(w->ev), mn,
			qsm_state_name(w->by_s));
		put_wake_style(f, w, "");
		fprintf(f, "];\n");
	}
}

/* --- write-back levels: what each sync makes durable ----------------------- */

static bool is_sync_state(enum qsm_state s)
{
	return !strncmp(qsm_state_desc(s), "fdatasync", 9);
}

/* WRITEBACK states reachable from START on a path with no sync state before
 * them (after_sync false), or with one (after_sync true). */
static void wb_reach(bool after_sync, bool out[QSM_S__COUNT])
{
	memset(out, 0, sizeof(bool) * QSM_S__COUNT);
	bool seen[QSM_S__COUNT][2];
	memset(seen, 0, sizeof(seen));
	/* Walk (state, synced) pairs from (START, false). */
	enum qsm_state stack_s[QSM_S__COUNT * 2];
	bool stack_y[QSM_S__COUNT * 2];
	int n = 0;
	stack_s[n] = QSM_S_START;
	stack_y[n++] = false;
	seen[QSM_S_START][0] = true;
	while (n) {
		n--;
		enum qsm_state s = stack_s[n];
		bool y = stack_y[n];
		if (y == after_sync)
			out[s] = true;
		bool ny = y || is_sync_state(s);
		for (size_t i = 0; i < NB_TRANSITIONS; i++) {
			const struct g_transition *t = &transitions[i];
			if (t->m != QSM_M_WRITEBACK || t->from != s || seen[t->to][ny])
				continue;
			seen[t->to][ny] = true;
			stack_s[n] = t->to;
			stack_y[n++] = ny;
		}
	}
}

/* For a WRITEBACK edge into a sync state: the line saying what it makes
 * durable (empty when the edge goes elsewhere). */
static void sync_note(FILE *f, const struct g_transition *t)
{
	if (t->m != QSM_M_WRITEBACK || !is_sync_state(t->to))
		return;
	bool first[QSM_S__COUNT], later[QSM_S__COUNT];
	wb_reach(false, first);
	wb_reach(true, later);
	const char *d = qsm_state_desc(t->from);
	const char *what = !strncmp(d, "write ", 6) ? d + 6 : NULL;
	fprintf(f, "\\n=> sync makes durable: ");
	if (what)
		dot_str(f, what);
	if (first[t->from])
		fprintf(f, "%sthe guest data written before the snapshot%s", what ? " + " : "",
			later[t->from] ? " (when first)" : "");
}
/* One machine's nodes and edges (inside a cluster when `all`). */
static void dot_machine(FILE *f, enum qsm_machine m, const char *ind)
{
	const char *mn = qsm_machine_name(m);
	bool used[QSM_S__COUNT];
	machine_states(m, used);

	/* The implicit error edges start from this box: every state but DONE. */
	fprintf(f, "%ssubgraph cluster_%s_running {\n", ind, mn);
	fprintf(f, "%s\tlabel=\"\"; style=dashed; color=gray75;\n", ind);
	for (int s = 0; s < QSM_S__COUNT; s++) {
		if (!used[s] || s == QSM_S_DONE)
			continue;
		fprintf(f, "%s\t%s__%s [label=\"%s\", tooltip=\"", ind, mn, qsm_state_name(s),
			qsm_state_name(s));
		dot_str(f, qsm_state_desc(s));
		fputc('"', f);
		if (s == QSM_S_START)
			fprintf(f, ", shape=ellipse");
		else if (is_wait_state((enum qsm_state)s))
			fprintf(f, ", style=\"rounded,filled\", fillcolor=\"#fff2b3\"");
		fprintf(f, "];\n");
	}
	fprintf(f, "%s}\n", ind);
	fprintf(f, "%s%s__DONE [label=\"DONE\", tooltip=\"", ind, mn);
	dot_str(f, qsm_state_desc(QSM_S_DONE));
	fprintf(f, "\", shape=ellipse, peripheries=2];\n");

	for (size_t i = 0; i < NB_TRANSITIONS; i++) {
		const struct g_transition *t = &transitions[i];
		if (t->m != m)
			continue;
		fprintf(f, "%s%s__%s -> %s__%s [id=\"%s:%s:%s:%s\", label=\"", ind, mn,
			qsm_state_name(t->from), mn, qsm_state_name(t->to), mn, qsm_state_name(t->from),
			qsm_event_name(t->ev), qsm_state_name(t->to));
		dot_str(f, qsm_event_label(t->ev));
		sync_note(f, t);
		fprintf(f, "\", tooltip=\"%s --%s--> %s\"];\n", qsm_state_name(t->from),
			qsm_event_name(t->ev), qsm_state_name(t->to));
	}
	/* The dispatcher's implicit edges: ERROR from any state -> DONE. */
	fprintf(f, "%s%s__START -> %s__DONE [id=\"%s:*:ERROR:DONE\", ltail=cluster_%s_running, "
		   "label=\"", ind, mn, mn, mn, mn);
	dot_str(f, qsm_event_label(QSM_E_ERROR));
	fprintf(f, " (from any state)\", tooltip=\"any state --ERROR--> DONE (implicit in the "
		   "dispatcher)\", style=dashed, color=gray60, fontcolor=gray45, arrowsize=0.6, "
		   "constraint=false];\n");
}

/* The machine's name as --machine takes it ("write"), or "all". */
static void put_lower(FILE *f, const char *s)
{
	for (; *s; s++)
		fputc(*s >= 'A' && *s <= 'Z' ? *s - 'A' + 'a' : *s, f);
}

static void dot_graph(FILE *f, int machine /* -1: all */)
{
	fprintf(f, "// Generated by `qsm graph --machine ");
	put_lower(f, machine < 0 ? "all" : qsm_machine_name(machine));
	fprintf(f, "` from sm/states.def: do not edit.\n");
	fprintf(f, "digraph qsm_%s {\n", machine < 0 ? "all" : qsm_machine_name(machine));
	fprintf(f, "\tgraph [compound=true, rankdir=TB, nodesep=0.25, ranksep=0.4, "
		   "fontname=\"Helvetica\", fontsize=12, labelloc=t, label=\"");
	if (machine < 0)
		fprintf(f, "qsm request state machines");
	else
		fprintf(f, "qsm %s machine: ", qsm_machine_name(machine)), dot_str(f, qsm_machine_desc(machine));
	fprintf(f, "\\n(generated from sm/states.def; dashed grey: any state goes to DONE on error; "
		   "dashed blue: another request ends the wait)\"];\n");
	fprintf(f, "\tnode [shape=box, style=rounded, fontname=\"Helvetica\", fontsize=10, "
		   "height=0.3];\n");
	fprintf(f, "\tedge [fontname=\"Helvetica\", fontsize=8, arrowsize=0.7];\n");
	if (machine >= 0) {
		dot_machine(f, (enum qsm_machine)machine, "\t");
		dot_wakes_one(f, (enum qsm_machine)machine, "\t");
	} else {
		for (int m = 0; m < QSM_M__COUNT; m++) {
			fprintf(f, "\tsubgraph cluster_%s {\n", qsm_machine_name(m));
			fprintf(f, "\t\tlabel=\"%s: ", qsm_machine_name(m));
			dot_str(f, qsm_machine_desc(m));
			fprintf(f, "\"; style=solid; color=gray40;\n");
			dot_machine(f, (enum qsm_machine)m, "\t\t");
			fprintf(f, "\t}\n");
		}
		dot_wakes_all(f);
	}
	fprintf(f, "}\n");
}

/* Every WAKES line must name an edge of the table and a state its waker
 * has; 0, or -1 with a message (the table is wrong, not the user). */
static int check_wakes(void)
{
	for (size_t i = 0; i < NB_WAKES; i++) {
		const struct g_wake *w = &wakes[i];
		bool applies = false, woken = false;
		for (int m = 0; m < QSM_M__COUNT; m++) {
			if (!wake_applies(w, m))
				continue;
			applies = true;
			for (int b = 0; b < QSM_M__COUNT; b++)
				woken |= wake_by(w, m, b);
		}
		if (!applies || !woken) {
			cli_error("graph", "sm/states.def: WAKES(%s, %s, %s, %s, %s) names %s",
				  w->m < 0 ? "ANY" : qsm_machine_name(w->m), qsm_state_name(w->s),
				  qsm_event_name(w->ev), w->by < 0 ? "ANY" : qsm_machine_name(w->by),
				  qsm_state_name(w->by_s),
				  !applies ? "no edge of the table" : "a state its waker never enters");
			return -1;
		}
	}
	return 0;
}

static void list_table(FILE *f, int machine)
{
	for (int m = 0; m < QSM_M__COUNT; m++)
		if (machine < 0 || machine == m)
			fprintf(f, "machine %s %s\n", qsm_machine_name(m), qsm_machine_desc(m));
	for (int s = 0; s < QSM_S__COUNT; s++)
		fprintf(f, "state %s %s\n", qsm_state_name(s), qsm_state_desc(s));
	for (int e = 0; e < QSM_E__COUNT; e++)
		fprintf(f, "event %s %s\n", qsm_event_name(e), qsm_event_label(e));
	for (size_t i = 0; i < NB_TRANSITIONS; i++) {
		const struct g_transition *t = &transitions[i];
		if (machine < 0 || machine == (int)t->m)
			fprintf(f, "transition %s %s %s %s\n", qsm_machine_name(t->m),
				qsm_state_name(t->from), qsm_event_name(t->ev), qsm_state_name(t->to));
	}
	for (size_t i = 0; i < NB_WAKES; i++) {
		const struct g_wake *w = &wakes[i];
		if (machine >= 0 && !wake_applies(w, machine) &&
		    !(w->by == machine || (w->by < 0 && machine_uses(machine, w->by_s))))
			continue;
		fprintf(f, "wakes %s %s %s %s %s %s\n", w->m < 0 ? "ANY" : qsm_machine_name(w->m),
			qsm_state_name(w->s), qsm_event_name(w->ev),
			w->by < 0 ? "ANY" : qsm_machine_name(w->by), qsm_state_name(w->by_s), w->label);
	}
}

/* --- SVG through dot -------------------------------------------------------- */

/* Is `dot` an executable somewhere on PATH? */
static bool have_dot(void)
{
	const char *path = getenv("PATH");
	if (!path)
		return false;
	char *copy = strdup(path);
	bool found = false;
	for (char *save = NULL, *dir = strtok_r(copy, ":", &save); dir && !found;
	     dir = strtok_r(NULL, ":", &save)) {
		char buf[4096];
		snprintf(buf, sizeof(buf), "%s/dot", *dir ? dir : ".");
		found = access(buf, X_OK) == 0;
	}
	free(copy);
	return found;
}

/* Pipe `text` through `dot -Tsvg` into fd out.  0 or -1 (message printed). */
static int run_dot(const char *text, size_t len, int out)
{
	int p[2];
	if (pipe(p) < 0) {
		cli_error("graph", "pipe: %s", strerror(errno));
		return -1;
	}
	pid_t pid = fork();
	if (pid < 0) {
		cli_error("graph", "fork: %s", strerror(errno));
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid == 0) {
		dup2(p[0], 0);
		dup2(out, 1);
		close(p[0]);
		close(p[1]);
		execlp("dot", "dot", "-Tsvg", (char *)NULL);
		fprintf(stderr, "qsm graph: cannot run dot: %s\n", strerror(errno));
		_exit(127);
	}
	close(p[0]);
	size_t off = 0;
	while (off < len) {
		ssize_t n = write(p[1], text + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	close(p[1]);
	int status;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (off < len || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		cli_error("graph", "dot failed to render the diagram");
		return -1;
	}
	return 0;
}

/* --- the command ------------------------------------------------------------ */

static void graph_usage(FILE *f)
{
	fprintf(f,
		"Usage: qsm graph [--machine NAME|all] [--format dot|svg] [-o FILE] [--list]\n"
		"Draw qsm's request state machines from the table the engine runs\n"
		"(sm/states.def): every state, every transition labelled with its event,\n"
		"(dashed grey) the implicit error edge from any state to DONE, (dashed\n"
		"blue) the requests that end each wait, and what each write-back sync\n"
		"makes durable.\n"
		"\n"
		"  -m, --machine NAME   one machine: ");
	for (int m = 0; m < QSM_M__COUNT; m++) {
		put_lower(f, qsm_machine_name(m));
		fputc('|', f);
	}
	fprintf(f, "all|nbd\n"
		"                       (default: all; nbd: the NBD connection machine of\n"
		"                       qsm nbd, tools/nbd/conn_states.def)\n"
		"  -T, --format FMT     dot (default) or svg (needs Graphviz's dot)\n"
		"  -o, --output FILE    write to FILE instead of standard output\n"
		"  -l, --list           print the table itself: machines, states, events,\n"
		"                       transitions and wakes, one per line\n"
		"  -h, --help           display this help and exit\n");
}

/* --- the NBD connection machine (tools/nbd/conn_states.def) ------------------
 * Not a request machine of the engine: its own table, drawn the same way
 * (states with a "wait:" description filled, one edge per transition,
 * id "NBD:FROM:EVENT:TO"), and left out of `all` and of the request
 * machines' --list, so those stay as they were. */
#define GRAPH_NBD (-3)

struct g_nbd_state { const char *name, *desc; };
static const struct g_nbd_state nbd_states[] = {
#define NBD_STATE(name, desc) { #name, desc },
#include "tools/nbd/conn_states.def"
};
struct g_nbd_event { const char *name, *label; };
static const struct g_nbd_event nbd_events[] = {
#define NBD_EVENT(name, label) { #name, label },
#include "tools/nbd/conn_states.def"
};
struct g_nbd_tr { const char *from, *ev, *to; };
static const struct g_nbd_tr nbd_transitions[] = {
#define NBD_TRANSITION(from, ev, to) { #from, #ev, #to },
#include "tools/nbd/conn_states.def"
};
#define NB_NBD_STATES (sizeof(nbd_states) / sizeof(nbd_states[0]))
#define NB_NBD_EVENTS (sizeof(nbd_events) / sizeof(nbd_events[0]))
#define NB_NBD_TR (sizeof(nbd_transitions) / sizeof(nbd_transitions[0]))

static const char *nbd_event_label(const char *name)
{
	for (size_t i = 0; i < NB_NBD_EVENTS; i++)
		if (!strcmp(nbd_events[i].name, name))
			return nbd_events[i].label;
	return name;
}

static void dot_nbd(FILE *f)
{
	fprintf(f, "// Generated by `qsm graph --machine nbd` from tools/nbd/conn_states.def.\n"
		   "digraph qsm_NBD {\n"
		   "\tlabel=\"qsm nbd connection machine\";\n"
		   "\tlabelloc=t;\n"
		   "\tnode [shape=box, style=rounded, fontname=\"Helvetica\"];\n"
		   "\tedge [fontname=\"Helvetica\", fontsize=10];\n");
	for (size_t i = 0; i < NB_NBD_STATES; i++) {
		bool wait = !strncmp(nbd_states[i].desc, "wait:", 5);
		fprintf(f, "\tNBD__%s [label=\"%s\", tooltip=\"", nbd_states[i].name, nbd_states[i].name);
		dot_str(f, nbd_states[i].desc);
		fprintf(f, "\"%s];\n", wait ? ", style=\"rounded,filled\", fillcolor=\"#e8eef8\"" : "");
	}
	for (size_t i = 0; i < NB_NBD_TR; i++) {
		const struct g_nbd_tr *t = &nbd_transitions[i];
		fprintf(f, "\tNBD__%s -> NBD__%s [id=\"NBD:%s:%s:%s\", label=\"", t->from, t->to,
			t->from, t->ev, t->to);
		dot_str(f, nbd_event_label(t->ev));
		fprintf(f, "\"];\n");
	}
	fprintf(f, "}\n");
}

static void list_nbd(FILE *f)
{
	fprintf(f, "machine NBD connection (tools/nbd/conn_states.def)\n");
	for (size_t i = 0; i < NB_NBD_STATES; i++)
		fprintf(f, "state %s %s\n", nbd_states[i].name, nbd_states[i].desc);
	for (size_t i = 0; i < NB_NBD_EVENTS; i++)
		fprintf(f, "event %s %s\n", nbd_events[i].name, nbd_events[i].label);
	for (size_t i = 0; i < NB_NBD_TR; i++)
		fprintf(f, "transition NBD %s %s %s\n", nbd_transitions[i].from, nbd_transitions[i].ev,
			nbd_transitions[i].to);
}

/* "write" or "WRITE" -> machine index; "all" -> -1; "nbd" -> GRAPH_NBD;
 * -2 when unknown. */
static int parse_machine(const char *s)
{
	if (!strcasecmp(s, "all"))
		return -1;
	if (!strcasecmp(s, "nbd"))
		return GRAPH_NBD;
	for (int m = 0; m < QSM_M__COUNT; m++)
		if (!strcasecmp(s, qsm_machine_name(m)))
			return m;
	return -2;
}

int cmd_graph(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "machine", required_argument, NULL, 'm' },
		{ "format", required_argument, NULL, 'T' },
		{ "output", required_argument, NULL, 'o' },
		{ "list", no_argument, NULL, 'l' },
		{ NULL, 0, NULL, 0 },
	};
	int machine = -1, c;
	bool svg = false, list = false;
	const char *out_path = NULL;

	optind = 0;
	while ((c = getopt_long(argc, argv, "hm:T:o:l", lopt, NULL)) != -1) {
		switch (c) {
		case 'h':
			graph_usage(stdout);
			return 0;
		case 'm':
			machine = parse_machine(optarg);
			if (machine == -2) {
				cli_error("graph", "unknown machine '%s' (try --help)", optarg);
				return 1;
			}
			break;
		case 'T':
			if (!strcmp(optarg, "svg")) {
				svg = true;
			} else if (!strcmp(optarg, "dot")) {
				svg = false;
			} else {
				cli_error("graph", "unknown format '%s' (dot or svg)", optarg);
				return 1;
			}
			break;
		case 'o':
			out_path = optarg;
			break;
		case 'l':
			list = true;
			break;
		default:
			graph_usage(stderr);
			return 1;
		}
	}
	if (optind < argc) {
		cli_error("graph", "unexpected argument '%s'", argv[optind]);
		return 1;
	}
	if (svg && list) {
		cli_error("graph", "--list prints text, not svg");
		return 1;
	}
	if (svg && !have_dot()) {
		cli_error("graph", "svg needs Graphviz's dot (apt-get install graphviz)");
		return 1;
	}

	if (check_wakes() < 0)
		return 1;
	/* Build the whole text first: nothing is written unless it all works. */
	char *text = NULL;
	size_t len = 0;
	FILE *mem = open_memstream(&text, &len);
	if (!mem) {
		cli_error("graph", "out of memory");
		return 1;
	}
	if (machine == GRAPH_NBD && list)
		list_nbd(mem);
	else if (machine == GRAPH_NBD)
		dot_nbd(mem);
	else if (list)
		list_table(mem, machine);
	else
		dot_graph(mem, machine);
	if (fclose(mem) != 0) {
		cli_error("graph", "out of memory");
		free(text);
		return 1;
	}

	int fd = 1, ret = 0;
	if (out_path) {
		fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd < 0) {
			cli_error("graph", "cannot open %s: %s", out_path, strerror(errno));
			free(text);
			return 1;
		}
	}
	if (svg) {
		fflush(stdout);
		ret = run_dot(text, len, fd) < 0 ? 1 : 0;
	} else {
		size_t off = 0;
		while (off < len) {
			ssize_t n = write(fd, text + off, len - off);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				cli_error("graph", "write: %s", strerror(errno));
				ret = 1;
				break;
			}
			off += (size_t)n;
		}
	}
	if (out_path) {
		if (close(fd) < 0 && !ret) {
			cli_error("graph", "%s: %s", out_path, strerror(errno));
			ret = 1;
		}
		if (ret)
			unlink(out_path);
	}
	free(text);
	return ret;
}
