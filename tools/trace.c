/*
 * tools/trace.c: the one trace writer of the qsm tools (see trace.h).
 *
 * Input: the engine calls on_transition() for every state change of every
 * request (struct qsm_trace_event, sm/qsm.h), in time order, on the loop
 * thread.  A request is first seen on its transition out of START and last
 * on its transition into DONE.
 *
 * JSON output ({"traceEvents": [...]}; every event has ph, ts, pid, tid and
 * name; ts in microseconds since the first event, pid 1):
 *  - "M" thread_name / thread_sort_index: each request's track is named
 *    "#17 write 1M+64k"; tid is a counter (unique even when a reopened
 *    image restarts its request ids); tid 0 holds the counters.
 *  - "X" slices, cat "request": the whole request, from leaving START to
 *    DONE, args the request and the transition out of START;
 *    cat "state": one per state visited, nested in the request slice, in
 *    order, never overlapping; args: "exit" (event name), "next" (state),
 *    and what the state found or touched: "l2" (L2 table offset), "host"
 *    (data or new clusters), "run" (guest offset+bytes), "wait_for",
 *    "meta_writes"/"meta_offset" (write-back levels; WB_COLLECT also
 *    "refblocks", "reftable", "header", "l2_tables", "l1_ranges": the
 *    batch's writes per level), "ret" (errors).
 *    Slices are written when they end, so per track they appear in ts order
 *    (the request slice, written at the start with its final duration
 *    unknown, is written at the end too: it is the last event of its track
 *    and the first in ts).
 *  - flows, cat "wait": when a request leaves FROZEN, ALLOC_WAIT, JOIN_WAIT
 *    or DURABLE_WAIT naming the request it waited on, an "s" event on that
 *    request's track (inside the slice it was in when it released the
 *    waiter, or its last slice if it finished) and an "f" event ("bp":"e")
 *    inside the waiter's wait slice, at its end: an arrow "who waited for
 *    whom".  Ids are unique, each used by exactly one s and one f.
 *  - "C" counters on tid 0 when they change: "requests in flight",
 *    "dirty metadata" (L2 tables, refcounts), "fdatasync calls".
 *
 * Text output: one line per request, printed when it completes; each state
 * visited in order (every state slice of the JSON, START left out), with what
 * it found: "L2 lookup (hit @0x50000)", "L2 lookup (miss) > L2 load @0x50000"
 * ("L2 load @0x50000 by #2" when another request's load was waited for, with
 * an arrow from it), "cluster alloc @0x230000", "frozen behind #3", "next run
 * (more)" or "(last)", "durable wait (batch #9)", then "done 143us".  A
 * write-back batch: "WB collect (1 refcount block, 1 L2 table, 1 L1 range)"
 * (the batch's writes per level), "WB L2 x1 @0x40000" (a level: its writes
 * and the first offset), "WB sync (durable: L2 tables)" (what the level before
 * it wrote, from its description in sm/states.def; the batch's first sync
 * also "the data written before the batch").
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sm/qsm.h"
#include "sm/sm.h"
#include "tools/cli.h"
#include "tools/trace.h"

#define TR_BUCKETS 1024
#define TR_RECENT 256

/* A live request. */
struct trec {
	struct trec *hnext;
	uint64_t id, tid;
	const char *kind;
	uint64_t offset, bytes;
	double begin_us;          /* left START */
	double start_us;          /* entered the current state */
	const char *first_event;  /* the event out of START */
	const char *first_to;
	/* Text line. */
	char *line;
	size_t len, cap;
	const char *prev_from;    /* the state left before the current one */
	bool synced;              /* a write-back batch: a sync is behind it */
};

/* A request that finished recently: where to draw arrows from it. */
struct trecent {
	uint64_t id, tid;
	double last_start_us, end_us;
	bool valid;
};

struct qsm_tracer {
	FILE *json, *text;
	bool text_is_stderr;
	const char *cmd;
	char *title;
	bool first;               /* no JSON event written yet */
	bool have_t0;
	uint64_t t0_ns;
	uint64_t next_tid, next_flow;
	struct trec *buckets[TR_BUCKETS];
	struct trecent recent[TR_RECENT];
	/* Last counter values written (UINT64_MAX: none yet). */
	uint64_t c_in_flight, c_dirty_l2, c_dirty_rc, c_flushes;
	int err;
};

/* --- small helpers ---------------------------------------------------------- */

/* "1M", "64k", "3G", "1536" (bytes when no unit divides it). */
static void fmt_size(char *buf, size_t len, uint64_t v)
{
	if (v && v % (1ull << 30) == 0)
		snprintf(buf, len, "%" PRIu64 "G", v >> 30);
	else if (v && v % (1ull << 20) == 0)
		snprintf(buf, len, "%" PRIu64 "M", v >> 20);
	else if (v && v % 1024 == 0)
		snprintf(buf, len, "%" PRIu64 "k", v >> 10);
	else
		snprintf(buf, len, "%" PRIu64, v);
}

/* "#17 write 1M+64k" (flush, write-back and close have no range). */
static void fmt_request(char *buf, size_t len, uint64_t id, const char *kind, uint64_t off,
			uint64_t bytes)
{
	char o[32], b[32];
	if (!strcmp(kind, "flush") || !strcmp(kind, "writeback") || !strcmp(kind, "close")) {
		snprintf(buf, len, "#%" PRIu64 " %s", id, kind);
		return;
	}
	fmt_size(o, sizeof(o), off);
	fmt_size(b, sizeof(b), bytes);
	snprintf(buf, len, "#%" PRIu64 " %s %s+%s", id, kind, o, b);
}

/* A state's name as the text trace shows it: "L2_LOOKUP" -> "L2 lookup",
 * "COW_READ" -> "COW read", "WB_L1" -> "WB L1". */
static void fmt_state(char *buf, size_t len, const char *s)
{
	size_t n = 0;
	bool word_start = true;
	while (*s && n + 1 < len) {
		if (word_start) {
			/* Keep acronyms: L1, L2, COW, WB. */
			size_t wl = strcspn(s, "_");
			bool keep = (wl == 2 && s[0] == 'L' && (s[1] == '1' || s[1] == '2')) ||
				    (wl == 3 && !strncmp(s, "COW", 3)) ||
				    (wl == 2 && !strncmp(s, "WB", 2));
			for (size_t i = 0; i < wl && n + 1 < len; i++)
				buf[n++] = keep ? s[i] : (char)(s[i] >= 'A' && s[i] <= 'Z' ? s[i] - 'A' + 'a' : s[i]);
			s += wl;
			word_start = false;
			continue;
		}
		if (*s == '_') {
			buf[n++] = ' ';
			word_start = true;
		}
		s++;
	}
	buf[n] = '\0';
}

static double ts_us(struct qsm_tracer *t, uint64_t ns)
{
	if (!t->have_t0) {
		t->have_t0 = true;
		t->t0_ns = ns;
	}
	return ns >= t->t0_ns ? (double)(ns - t->t0_ns) / 1000.0 : 0.0;
}

static struct trec **bucket(struct qsm_tracer *t, uint64_t id)
{
	return &t->buckets[id % TR_BUCKETS];
}

static struct trec *rec_find(struct qsm_tracer *t, uint64_t id)
{
	for (struct trec *r = *bucket(t, id); r; r = r->hnext)
		if (r->id == id)
			return r;
	return NULL;
}

static void rec_free(struct qsm_tracer *t, struct trec *r)
{
	for (struct trec **pp = bucket(t, r->id); *pp; pp = &(*pp)->hnext) {
		if (*pp == r) {
			*pp = r->hnext;
			break;
		}
	}
	free(r->line);
	free(r);
}

/* --- JSON ------------------------------------------------------------------- */

/* Start one event: the separator, then the fields every event has. */
static void j_begin(struct qsm_tracer *t, const char *ph, const char *name, uint64_t tid,
		    double ts)
{
	fprintf(t->json, "%s\n{\"ph\":\"%s\",\"name\":\"%s\",\"pid\":1,\"tid\":%" PRIu64
		",\"ts\":%.3f", t->first ? "" : ",", ph, name, tid, ts);
	t->first = false;
}

static void j_end(struct qsm_tracer *t)
{
	fputc('}', t->json);
}

static void j_counters(struct qsm_tracer *t, const struct qsm_trace_event *ev, double ts)
{
	if (ev->in_flight != t->c_in_flight) {
		t->c_in_flight = ev->in_flight;
		j_begin(t, "C", "requests in flight", 0, ts);
		fprintf(t->json, ",\"args\":{\"requests\":%" PRIu64 "}", ev->in_flight);
		j_end(t);
	}
	if (ev->dirty_l2 != t->c_dirty_l2 || (uint64_t)ev->dirty_refcounts != t->c_dirty_rc) {
		t->c_dirty_l2 = ev->dirty_l2;
		t->c_dirty_rc = ev->dirty_refcounts;
		j_begin(t, "C", "dirty metadata", 0, ts);
		fprintf(t->json, ",\"args\":{\"L2 tables\":%" PRIu64 ",\"refcounts\":%d}",
			ev->dirty_l2, ev->dirty_refcounts ? 1 : 0);
		j_end(t);
	}
	if (ev->io_flushes != t->c_flushes) {
		t->c_flushes = ev->io_flushes;
		j_begin(t, "C", "fdatasync calls", 0, ts);
		fprintf(t->json, ",\"args\":{\"flushes\":%" PRIu64 "}", ev->io_flushes);
		j_end(t);
	}
}

/* The slice of the state a request leaves (ev->from), with what it found. */
static void j_state_slice(struct qsm_tracer *t, struct trec *r, const struct qsm_trace_event *ev,
			  double now)
{
	j_begin(t, "X", ev->from, r->tid, r->start_us);
	fprintf(t->json, ",\"cat\":\"state\",\"dur\":%.3f,\"args\":{\"exit\":\"%s\",\"next\":\"%s\"",
		now - r->start_us, ev->event_name, ev->to);
	if (ev->run_bytes)
		fprintf(t->json, ",\"run\":\"0x%" PRIx64 "+%" PRIu64 "\"", ev->run_offset,
			ev->run_bytes);
	if (ev->l2_offset)
		fprintf(t->json, ",\"l2\":\"0x%" PRIx64 "\"", ev->l2_offset);
	if (ev->host_offset)
		fprintf(t->json, ",\"host\":\"0x%" PRIx64 "\"", ev->host_offset);
	if (ev->wait_for)
		fprintf(t->json, ",\"wait_for\":%" PRIu64, ev->wait_for);
	if (ev->meta_writes)
		fprintf(t->json, ",\"meta_writes\":%" PRIu64 ",\"meta_offset\":\"0x%" PRIx64 "\"",
			ev->meta_writes, ev->meta_offset);
	if (!strcmp(ev->from, "WB_COLLECT"))
		fprintf(t->json, ",\"refblocks\":%" PRIu64 ",\"reftable\":%" PRIu64
			",\"header\":%" PRIu64 ",\"l2_tables\":%" PRIu64 ",\"l1_ranges\":%" PRIu64,
			ev->wb_refblocks, ev->wb_reftable, ev->wb_header, ev->wb_l2, ev->wb_l1);
	if (ev->ret)
		fprintf(t->json, ",\"ret\":%d,\"error\":\"%s\"", ev->ret, qsm_strerror(ev->ret));
	fputc('}', t->json);
	j_end(t);
}

static bool is_wait_exit(const char *from)
{
	return !strcmp(from, "FROZEN") || !strcmp(from, "ALLOC_WAIT") ||
	       !strcmp(from, "JOIN_WAIT") || !strcmp(from, "DURABLE_WAIT") ||
	       !strcmp(from, "L2_LOAD");
}

/* An arrow from the request waited on to the waiter resuming at `now`. */
static void j_flow(struct qsm_tracer *t, struct trec *waiter, uint64_t owner_id, double now)
{
	uint64_t owner_tid;
	double s_ts;
	struct trec *o = rec_find(t, owner_id);
	struct trecent *rc = &t->recent[owner_id % TR_RECENT];
	if (o) {
		/* Inside its current slice (written later, when it ends). */
		owner_tid = o->tid;
		s_ts = (o->start_us + now) / 2;
	} else if (rc->valid && rc->id == owner_id) {
		owner_tid = rc->tid;
		s_ts = (rc->last_start_us + rc->end_us) / 2;
	} else {
		return; /* unknown (hook installed late): no arrow */
	}
	/* The arrow ends on the wait slice itself, just before it ends
	 * ("bp":"e": bound to the enclosing slice), and never before it starts. */
	double span = now - waiter->start_us;
	double f_ts = now - (span < 0.002 ? span / 2 : 0.001);
	if (f_ts < s_ts)
		f_ts = s_ts;
	uint64_t id = ++t->next_flow;
	j_begin(t, "s", "wait", owner_tid, s_ts);
	fprintf(t->json, ",\"cat\":\"wait\",\"id\":%" PRIu64, id);
	j_end(t);
	j_begin(t, "f", "wait", waiter->tid, f_ts);
	fprintf(t->json, ",\"cat\":\"wait\",\"bp\":\"e\",\"id\":%" PRIu64, id);
	j_end(t);
}

/* --- text ------------------------------------------------------------------- */

static void line_add(struct trec *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line_add(struct trec *r, const char *fmt, ...)
{
	va_list ap;
	for (;;) {
		va_start(ap, fmt);
		int n = vsnprintf(r->line ? r->line + r->len : NULL, r->cap - r->len, fmt, ap);
		va_end(ap);
		if (n < 0)
			return;
		if (r->len + (size_t)n < r->cap) {
			r->len += (size_t)n;
			return;
		}
		size_t cap = (r->cap ? r->cap * 2 : 256) + (size_t)n;
		char *l = realloc(r->line, cap);
		if (!l)
			return;
		r->line = l;
		r->cap = cap;
	}
}

/* What a write-back level state writes, from its description in
 * sm/states.def ("write refcount blocks" -> "refcount blocks"); NULL for a
 * state that writes nothing (WB_COLLECT). */
static const char *level_what(const char *state)
{
	for (int s = 0; s < QSM_S__COUNT; s++) {
		if (strcmp(qsm_state_name(s), state))
			continue;
		const char *d = qsm_state_desc(s);
		return !strncmp(d, "write ", 6) ? d + 6 : NULL;
	}
	return NULL;
}

static bool is_sync(const char *state)
{
	for (int s = 0; s < QSM_S__COUNT; s++)
		if (!strcmp(qsm_state_name(s), state))
			return !strncmp(qsm_state_desc(s), "fdatasync", 9);
	return false;
}

/* "1 refcount block, 2 L2 tables" for n and the singular noun. */
static void count_add(struct trec *r, bool *first, uint64_t n, const char *one, const char *many)
{
	if (!n)
		return;
	line_add(r, "%s%" PRIu64 " %s", *first ? "" : ", ", n, n == 1 ? one : many);
	*first = false;
}

/* Append the state the request leaves, described by what it found: every
 * state of the JSON trace, START left out. */
static void text_state(struct trec *r, const struct qsm_trace_event *ev)
{
	const char *s = ev->from, *e = ev->event_name;
	char name[64];

	if (!strcmp(s, "START"))
		return;
	fmt_state(name, sizeof(name), s);
	line_add(r, "%s%s", r->len ? " > " : "", name);
	if (!strcmp(s, "L1_LOOKUP")) {
		if (!strcmp(e, "L1_EMPTY"))
			line_add(r, " (empty)");
		else if (!strcmp(e, "L1_BUSY"))
			line_add(r, " (L2 table being allocated)");
		else if (!strcmp(e, "BACKING"))
			line_add(r, " (empty: backing file)");
		else if (!strcmp(e, "NOTHING_TO_DO"))
			line_add(r, " (empty: nothing to do)");
	} else if (!strcmp(s, "L2_LOOKUP")) {
		if (!strcmp(e, "CACHE_MISS")) {
			line_add(r, " (miss)");
		} else {
			line_add(r, " (hit");
			if (ev->l2_offset)
				line_add(r, " @0x%" PRIx64, ev->l2_offset);
			line_add(r, ")");
		}
	} else if (!strcmp(s, "L2_LOAD")) {
		/* LOADED: the table is in (read by us, or by the request named);
		 * WAKE: no table handed over (a cache slot freed), look up again. */
		if (!strcmp(e, "WAKE"))
			line_add(r, " (waited for a cache slot)");
		else
			line_add(r, " @0x%" PRIx64, ev->l2_offset);
		if (ev->wait_for)
			line_add(r, " by #%" PRIu64, ev->wait_for);
	} else if (!strcmp(s, "L2_ALLOC")) {
		if (!strcmp(e, "WAKE"))
			line_add(r, " (waited for a cache slot)");
		else if (ev->l2_offset)
			line_add(r, " @0x%" PRIx64, ev->l2_offset);
	} else if (!strcmp(s, "FROZEN")) {
		line_add(r, " behind #%" PRIu64, ev->wait_for);
	} else if (!strcmp(s, "ALLOC_WAIT")) {
		line_add(r, " on #%" PRIu64, ev->wait_for);
	} else if (!strcmp(s, "JOIN_WRITE")) {
		line_add(r, " @0x%" PRIx64 " into #%" PRIu64 "'s clusters", ev->host_offset,
			 ev->wait_for);
	} else if (!strcmp(s, "JOIN_WAIT")) {
		line_add(r, " for #%" PRIu64, ev->wait_for);
	} else if (!strcmp(s, "DURABLE_WAIT")) {
		if (ev->wait_for)
			line_add(r, " (batch #%" PRIu64 ")", ev->wait_for);
	} else if (!strcmp(s, "NEXT_RUN")) {
		line_add(r, !strcmp(e, "MORE") ? " (more)" : " (last)");
	} else if (!strcmp(s, "CLUSTER_ALLOC") || !strcmp(s, "DATA_READ") ||
		   !strcmp(s, "DATA_WRITE") || !strcmp(s, "ALLOC_WRITE")) {
		if (ev->host_offset)
			line_add(r, " @0x%" PRIx64, ev->host_offset);
	} else if (!strcmp(s, "L2_UPDATE") || !strcmp(s, "ZERO_UPDATE")) {
		if (ev->l2_offset)
			line_add(r, " (table @0x%" PRIx64 ")", ev->l2_offset);
	} else if (!strcmp(s, "WB_COLLECT")) {
		bool first = true;
		line_add(r, " (");
		count_add(r, &first, ev->wb_refblocks, "refcount block", "refcount blocks");
		count_add(r, &first, ev->wb_reftable, "refcount table write", "refcount table writes");
		count_add(r, &first, ev->wb_header, "header", "headers");
		count_add(r, &first, ev->wb_l2, "L2 table", "L2 tables");
		count_add(r, &first, ev->wb_l1, "L1 range", "L1 ranges");
		if (first)
			line_add(r, "nothing to write");
		line_add(r, "%s)", !strcmp(e, "WB_LAZY") ? "; refcounts deferred" :
				   !strcmp(e, "WB_MARK_DIRTY") ? "; marks the image dirty first" : "");
	} else if (is_sync(s) && ev->kind && !strcmp(ev->kind, "writeback")) {
		/* What this sync makes durable: the level just written, and for
		 * the batch's first sync the guest data written before it. */
		const char *what = r->prev_from ? level_what(r->prev_from) : NULL;
		line_add(r, " (durable: %s%s%s)", what ? what : "", what && !r->synced ? " + " : "",
			 r->synced ? "" : "the data written before the batch");
		r->synced = true;
	} else if (ev->meta_writes) {
		line_add(r, " x%" PRIu64 " @0x%" PRIx64, ev->meta_writes, ev->meta_offset);
	}
	if (!strcmp(e, "ERROR"))
		line_add(r, " > error: %s", qsm_strerror(ev->ret));
}

static void text_done(struct qsm_tracer *t, struct trec *r, double now)
{
	char head[96];
	double d = now - r->begin_us;
	fmt_request(head, sizeof(head), r->id, r->kind, r->offset, r->bytes);
	if (d < 10000)
		fprintf(t->text, "%s: %s%sdone %.0fus\n", head, r->line ? r->line : "",
			r->len ? " > " : "", d);
	else
		fprintf(t->text, "%s: %s%sdone %.1fms\n", head, r->line ? r->line : "",
			r->len ? " > " : "", d / 1000);
}

/* --- the hook ----------------------------------------------------------------- */

static void on_transition(void *opaque, const struct qsm_trace_event *ev)
{
	struct qsm_tracer *t = opaque;
	double now = ts_us(t, ev->time_ns);
	struct trec *r = rec_find(t, ev->req_id);

	if (!r) {
		r = calloc(1, sizeof(*r));
		if (!r) {
			t->err = -ENOMEM;
			return;
		}
		r->id = ev->req_id;
		r->tid = ++t->next_tid;
		r->kind = ev->kind;
		r->offset = ev->offset;
		r->bytes = ev->bytes;
		r->begin_us = r->start_us = now;
		r->first_event = ev->event_name;
		r->first_to = ev->to;
		r->hnext = *bucket(t, r->id);
		*bucket(t, r->id) = r;
		if (t->json) {
			char name[96];
			fmt_request(name, sizeof(name), r->id, r->kind, r->offset, r->bytes);
			j_begin(t, "M", "thread_name", r->tid, now);
			fprintf(t->json, ",\"args\":{\"name\":\"%s\"}", name);
			j_end(t);
			j_begin(t, "M", "thread_sort_index", r->tid, now);
			fprintf(t->json, ",\"args\":{\"sort_index\":%" PRIu64 "}", r->tid);
			j_end(t);
		}
	} else if (t->json) {
		j_state_slice(t, r, ev, now);
	}
	if (t->json) {
		if (ev->wait_for && is_wait_exit(ev->from))
			j_flow(t, r, ev->wait_for, now);
		j_counters(t, ev, now);
	}
	if (t->text)
		text_state(r, ev);
	r->prev_from = ev->from;
	double last_start = r->start_us;
	r->start_us = now;

	if (!strcmp(ev->to, "DONE")) {
		if (t->json) {
			char name[96];
			fmt_request(name, sizeof(name), r->id, r->kind, r->offset, r->bytes);
			/* The request slice encloses its states: written last on the
			 * track, so that nothing on the track comes after it in ts. */
			j_begin(t, "X", name + strcspn(name, " ") + 1, r->tid, r->begin_us);
			fprintf(t->json, ",\"cat\":\"request\",\"dur\":%.3f,\"args\":{\"id\":%" PRIu64
				",\"kind\":\"%s\",\"offset\":%" PRIu64 ",\"bytes\":%" PRIu64
				",\"first\":\"START\",\"first_event\":\"%s\",\"first_next\":\"%s\""
				",\"ret\":%d}",
				now - r->begin_us, r->id, r->kind, r->offset, r->bytes, r->first_event,
				r->first_to, ev->ret);
			j_end(t);
		}
		if (t->text)
			text_done(t, r, now);
		struct trecent *rc = &t->recent[r->id % TR_RECENT];
		*rc = (struct trecent){ .id = r->id, .tid = r->tid, .last_start_us = last_start,
					.end_us = now, .valid = true };
		rec_free(t, r);
	}
}

/* --- open / attach / close ---------------------------------------------------- */

int qsm_tracer_open(const char *cmd, const char *json_path, const char *text_path,
		    const char *title, struct qsm_tracer **out)
{
	*out = NULL;
	if (!json_path && !text_path)
		return 0;
	struct qsm_tracer *t = calloc(1, sizeof(*t));
	if (!t) {
		cli_error(cmd, "out of memory");
		return -ENOMEM;
	}
	t->cmd = cmd;
	t->first = true;
	t->c_in_flight = t->c_dirty_l2 = t->c_dirty_rc = t->c_flushes = UINT64_MAX;
	t->title = strdup(title ? title : "qsm");
	if (json_path && !(t->json = fopen(json_path, "w"))) {
		int e = errno;
		cli_error(cmd, "cannot open trace file %s: %s", json_path, strerror(e));
		free(t->title);
		free(t);
		return -e;
	}
	if (text_path && !strcmp(text_path, "-")) {
		t->text = stderr;
		t->text_is_stderr = true;
	} else if (text_path && !(t->text = fopen(text_path, "w"))) {
		int e = errno;
		cli_error(cmd, "cannot open trace file %s: %s", text_path, strerror(e));
		if (t->json)
			fclose(t->json);
		free(t->title);
		free(t);
		return -e;
	}
	if (t->json) {
		fprintf(t->json, "{\"displayTimeUnit\":\"ns\",\"traceEvents\":[");
		j_begin(t, "M", "process_name", 0, 0);
		fprintf(t->json, ",\"args\":{\"name\":\"");
		for (const char *c = t->title; *c; c++) {
			if (*c == '"' || *c == '\\')
				fputc('\\', t->json);
			if ((unsigned char)*c >= 0x20)
				fputc(*c, t->json);
		}
		fprintf(t->json, "\"}");
		j_end(t);
		j_begin(t, "M", "thread_name", 0, 0);
		fprintf(t->json, ",\"args\":{\"name\":\"counters\"}");
		j_end(t);
	}
	*out = t;
	return 0;
}

void qsm_tracer_attach(struct qsm_tracer *t, struct qsm_image *img)
{
	if (!t)
		return;
	/* Ids restart with a new image: forget the old one's finished requests. */
	memset(t->recent, 0, sizeof(t->recent));
	qsm_set_trace(img, on_transition, t);
}

int qsm_tracer_close(struct qsm_tracer *t)
{
	int ret;
	if (!t)
		return 0;
	for (size_t b = 0; b < TR_BUCKETS; b++) {
		while (t->buckets[b]) {
			struct trec *r = t->buckets[b];
			if (t->text) {
				char head[96];
				fmt_request(head, sizeof(head), r->id, r->kind, r->offset, r->bytes);
				fprintf(t->text, "%s: %s%snot finished\n", head, r->line ? r->line : "",
					r->len ? " > " : "");
			}
			rec_free(t, r);
		}
	}
	ret = t->err;
	if (t->json) {
		fprintf(t->json, "\n]}\n");
		if ((ferror(t->json) | fclose(t->json)) && !ret)
			ret = -EIO;
	}
	if (t->text) {
		if (t->text_is_stderr)
			fflush(stderr);
		else if ((ferror(t->text) | fclose(t->text)) && !ret)
			ret = -EIO;
	}
	if (ret < 0)
		cli_error(t->cmd, "writing the trace failed: %s", strerror(-ret));
	free(t->title);
	free(t);
	return ret;
}
