/*
 * io/blkdebug.c: QEMU's blkdebug as an io/ layer over another handle.
 * The rules and what they mean are in io/blkdebug.h; this file holds the
 * event map, the two rule parsers (config file, flattened options), and
 * the wrapper backend.
 *
 * Design
 * ------
 * Every operation submitted to the wrapper goes:
 *   submit > raise the QEMU events of req->event (set-state, arm injects,
 *            breakpoints) > held? (a breakpoint fired: wait for resume)
 *          > armed rule covers it? complete with -errno (never done)
 *          > else forwarded to the wrapped handle as a sub-request whose
 *            completion completes the original.
 * Blocking calls (open, close, check) raise events and inject the same way
 * but are never held: a breakpoint there would wait on a loop that does not
 * run.
 *
 * Invariants
 *  1. Each request the wrapper accepted completes exactly once, through
 *     qsm_io_complete_ on the wrapper (directly from the wrapped handle's
 *     completion, or deferred for injected errors): never inline.
 *  2. A held request is on bd->susp with its tag until resumed, removed or
 *     the handle is closed (close requires none in flight, so none held).
 *  3. bd->state only changes while raising an event; all rules of that
 *     event see the state it had before (QEMU's new_state).
 */
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/blkdebug.h"
#include "io/io_internal.h"
#include "io/util.h"

/* --- Events -------------------------------------------------------------------
 * QEMU 7.2's BlkdebugEvent names and where qsm raises them: the qsm event
 * tag of the operation QEMU's event precedes.  QSM_IO_EV_NONE: QEMU has
 * the name, qsm has no step for it (refused by name, -ENOTSUP). */
static const struct {
	const char *name;
	enum qsm_io_event ev;
} bd_events[] = {
	{ "l1_update", QSM_IO_EV_L1_UPDATE },
	{ "l1_grow_alloc_table", QSM_IO_EV_NONE },
	{ "l1_grow_write_table", QSM_IO_EV_NONE },
	{ "l1_grow_activate_table", QSM_IO_EV_NONE },
	{ "l2_load", QSM_IO_EV_L2_LOAD },
	{ "l2_update", QSM_IO_EV_L2_UPDATE },
	{ "l2_update_compressed", QSM_IO_EV_NONE },
	{ "l2_alloc_cow_read", QSM_IO_EV_NONE },
	{ "l2_alloc_write", QSM_IO_EV_L2_ALLOC },
	{ "read_aio", QSM_IO_EV_DATA_READ },
	{ "read_backing_aio", QSM_IO_EV_NONE },
	{ "read_compressed", QSM_IO_EV_NONE },
	{ "write_aio", QSM_IO_EV_DATA_WRITE },
	{ "write_compressed", QSM_IO_EV_COMPRESSED_WRITE },
	{ "vmstate_load", QSM_IO_EV_NONE },
	{ "vmstate_save", QSM_IO_EV_NONE },
	{ "cow_read", QSM_IO_EV_COW_READ },
	{ "cow_write", QSM_IO_EV_COW_WRITE },
	{ "reftable_load", QSM_IO_EV_NONE },
	{ "reftable_grow", QSM_IO_EV_NONE },
	{ "reftable_update", QSM_IO_EV_REFTABLE_UPDATE },
	{ "refblock_load", QSM_IO_EV_REFBLOCK_LOAD },
	{ "refblock_update", QSM_IO_EV_REFBLOCK_UPDATE },
	{ "refblock_update_part", QSM_IO_EV_REFBLOCK_UPDATE },
	{ "refblock_alloc", QSM_IO_EV_REFBLOCK_ALLOC },
	{ "refblock_alloc_hookup", QSM_IO_EV_REFTABLE_UPDATE },
	{ "refblock_alloc_write", QSM_IO_EV_REFBLOCK_ALLOC },
	{ "refblock_alloc_write_blocks", QSM_IO_EV_NONE },
	{ "refblock_alloc_write_table", QSM_IO_EV_NONE },
	{ "refblock_alloc_switch_table", QSM_IO_EV_NONE },
	{ "cluster_alloc", QSM_IO_EV_CLUSTER_ALLOC },
	{ "cluster_alloc_bytes", QSM_IO_EV_NONE },
	{ "cluster_free", QSM_IO_EV_NONE },
	{ "flush_to_os", QSM_IO_EV_NONE },
	{ "flush_to_disk", QSM_IO_EV_FLUSH },
	{ "pwritev_rmw_head", QSM_IO_EV_NONE },
	{ "pwritev_rmw_after_head", QSM_IO_EV_NONE },
	{ "pwritev_rmw_tail", QSM_IO_EV_NONE },
	{ "pwritev_rmw_after_tail", QSM_IO_EV_NONE },
	{ "pwritev", QSM_IO_EV_NONE },
	{ "pwritev_zero", QSM_IO_EV_NONE },
	{ "pwritev_done", QSM_IO_EV_NONE },
	{ "empty_image_prepare", QSM_IO_EV_NONE },
	{ "l1_shrink_write_table", QSM_IO_EV_NONE },
	{ "l1_shrink_free_l2_clusters", QSM_IO_EV_NONE },
	{ "cor_write", QSM_IO_EV_NONE },
	{ "cluster_alloc_space", QSM_IO_EV_NONE },
	{ "none", QSM_IO_EV_NONE },
};
#define BD_NEVENTS QSM_ARRAY_SIZE(bd_events)

int qsm_blkdebug_event_parse(const char *name, enum qsm_io_event *ev)
{
	for (size_t i = 0; i < BD_NEVENTS; i++) {
		if (!strcmp(bd_events[i].name, name)) {
			*ev = bd_events[i].ev;
			return bd_events[i].ev == QSM_IO_EV_NONE ? -ENOTSUP : 0;
		}
	}
	return -ENOENT;
}

/* --- Rules ---------------------------------------------------------------------- */

enum bd_action { BD_INJECT, BD_SET_STATE, BD_SUSPEND };

struct bd_rule {
	struct bd_rule *next;        /* bd->rules, newest first (QEMU's order) */
	struct bd_rule *active_next; /* bd->active, when armed */
	bool active;
	enum bd_action action;
	size_t event;                /* index in bd_events */
	bool event_set;
	long long state;             /* 0: any */
	long long new_state;
	int error;                   /* positive errno */
	bool once, immediately;
	int64_t offset;              /* sector * 512, -1: any */
	char *tag;                   /* BD_SUSPEND */
	int group;                   /* set_opt's N, -1 from a config file */
	char *group_kind;
};

/* A held request (breakpoint fired). */
struct bd_susp {
	struct bd_susp *next;
	char *tag;
	struct qsm_io_req *req;
	qsm_io_cb resumed;           /* held by the request machine: tell it */
};

/* A request the request machine held and that was resumed: its next
 * submit has passed its breakpoints already. */
struct bd_passed {
	struct bd_passed *next;
	const struct qsm_io_req *req;
	enum qsm_io_event event;     /* the event it passed */
};

struct qsm_blkdebug {
	struct bd_rule *rules;
	struct bd_rule *active;
	struct bd_susp *susp;
	struct bd_passed *passed;
	long long state;
	qsm_blkdebug_notify_fn notify;
	void *notify_opaque;
};

struct qsm_blkdebug *qsm_blkdebug_new(void)
{
	struct qsm_blkdebug *bd = calloc(1, sizeof(*bd));
	if (bd)
		bd->state = 1;
	return bd;
}

static void bd_rule_free(struct bd_rule *r)
{
	free(r->tag);
	free(r->group_kind);
	free(r);
}

void qsm_blkdebug_free(struct qsm_blkdebug *bd)
{
	if (!bd)
		return;
	assert(!bd->susp);
	while (bd->passed) {
		struct bd_passed *p = bd->passed;
		bd->passed = p->next;
		free(p);
	}
	while (bd->rules) {
		struct bd_rule *r = bd->rules;
		bd->rules = r->next;
		bd_rule_free(r);
	}
	free(bd);
}

void qsm_blkdebug_set_notify(struct qsm_blkdebug *bd, qsm_blkdebug_notify_fn fn, void *opaque)
{
	bd->notify = fn;
	bd->notify_opaque = opaque;
}

static struct bd_rule *bd_rule_add(struct qsm_blkdebug *bd, enum bd_action a)
{
	struct bd_rule *r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	r->action = a;
	r->error = EIO;
	r->offset = -1;
	r->group = -1;
	r->next = bd->rules;
	bd->rules = r;
	return r;
}

static void bd_rule_unlink(struct qsm_blkdebug *bd, struct bd_rule *r)
{
	for (struct bd_rule **p = &bd->rules; *p; p = &(*p)->next) {
		if (*p == r) {
			*p = r->next;
			break;
		}
	}
	if (r->active) {
		for (struct bd_rule **p = &bd->active; *p; p = &(*p)->active_next) {
			if (*p == r) {
				*p = r->active_next;
				break;
			}
		}
	}
	bd_rule_free(r);
}

/* QEMU's number and bool option parsing, with its messages. */
static int bd_number(const char *k, const char *v, long long *out, char *err, size_t errlen)
{
	char *e;
	errno = 0;
	long long n = strtoll(v, &e, 0);
	if (!*v || *e || errno) {
		qsm_set_err(err, errlen, "Parameter '%s' expects a number", k);
		return -EINVAL;
	}
	*out = n;
	return 0;
}

static int bd_bool(const char *k, const char *v, bool *out, char *err, size_t errlen)
{
	if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true"))
		*out = true;
	else if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false"))
		*out = false;
	else {
		qsm_set_err(err, errlen, "Parameter '%s' expects 'on' or 'off'", k);
		return -EINVAL;
	}
	return 0;
}

/* Set key=val on rule r (of the section kind). */
static int bd_rule_set(struct bd_rule *r, const char *k, const char *v, char *err, size_t errlen)
{
	long long n;
	int ret;

	if (!strcmp(k, "event")) {
		enum qsm_io_event ev;
		ret = qsm_blkdebug_event_parse(v, &ev);
		if (ret == -ENOENT) {
			qsm_set_err(err, errlen, "invalid parameter value: %s", v);
			return -EINVAL;
		}
		if (ret == -ENOTSUP) {
			qsm_set_err(err, errlen, "blkdebug event '%s' is not supported by qsm "
				 "(its engine has no such step)", v);
			return -ENOTSUP;
		}
		for (size_t i = 0; i < BD_NEVENTS; i++)
			if (!strcmp(bd_events[i].name, v))
				r->event = i;
		r->event_set = true;
		return 0;
	}
	if (!strcmp(k, "state")) {
		if ((ret = bd_number(k, v, &n, err, errlen)))
			return ret;
		r->state = n;
		return 0;
	}
	if (r->action == BD_SET_STATE && !strcmp(k, "new_state")) {
		if ((ret = bd_number(k, v, &n, err, errlen)))
			return ret;
		r->new_state = n;
		return 0;
	}
	if (r->action == BD_INJECT) {
		if (!strcmp(k, "errno")) {
			if ((ret = bd_number(k, v, &n, err, errlen)))
				return ret;
			if (n < 0 || n >= 4096) {
				qsm_set_err(err, errlen, "Parameter 'errno' must be between 0 and 4095 in qsm");
				return -EINVAL;
			}
			r->error = (int)n;
			return 0;
		}
		if (!strcmp(k, "sector")) {
			if ((ret = bd_number(k, v, &n, err, errlen)))
				return ret;
			if (n >= INT64_MAX / 512) {
				qsm_set_err(err, errlen, "Parameter 'sector' is out of range");
				return -EINVAL;
			}
			r->offset = n < 0 ? -1 : n * 512;
			return 0;
		}
		if (!strcmp(k, "once"))
			return bd_bool(k, v, &r->once, err, errlen);
		if (!strcmp(k, "immediately"))
			return bd_bool(k, v, &r->immediately, err, errlen);
		if (!strcmp(k, "iotype") || !strcmp(k, "offset")) {
			qsm_set_err(err, errlen, "blkdebug option '%s' is not supported by qsm", k);
			return -ENOTSUP;
		}
	}
	qsm_set_err(err, errlen, "Invalid parameter '%s'", k);
	return -EINVAL;
}

/* --- Config file: QEMU's qemu_config_parse format ------------------------------- */

static char *bd_trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = 0;
	return s;
}

int qsm_blkdebug_read_config(struct qsm_blkdebug *bd, const char *path, char *err,
			     size_t errlen)
{
	FILE *f = fopen(path, "r");
	char line[1024];
	struct bd_rule *cur = NULL;
	bool skip = false; /* a section of another kind: QEMU ignores its keys */
	int lineno = 0, ret = 0;

	if (!f) {
		ret = -errno;
		qsm_set_err(err, errlen, "Could not read blkdebug config file: %s", strerror(-ret));
		return ret;
	}
	while (fgets(line, sizeof(line), f)) {
		char *s = bd_trim(line);
		lineno++;
		if (!*s || *s == '#')
			continue;
		if (*s == '[') {
			char *e = strchr(s, ']');
			if (!e) {
				ret = -EINVAL;
				break;
			}
			*e = 0;
			char *name = bd_trim(s + 1);
			char *sp = strpbrk(name, " \t");
			if (sp)
				*sp = 0; /* [group "id"]: the id does not matter here */
			skip = false;
			if (!strcmp(name, "inject-error"))
				cur = bd_rule_add(bd, BD_INJECT);
			else if (!strcmp(name, "set-state"))
				cur = bd_rule_add(bd, BD_SET_STATE);
			else {
				cur = NULL;
				skip = true;
			}
			if (!cur && !skip) {
				ret = -ENOMEM;
				break;
			}
			continue;
		}
		/* key = "value" */
		char *eq = strchr(s, '=');
		if (!eq || (!cur && !skip)) {
			ret = -EINVAL;
			break;
		}
		*eq = 0;
		char *k = bd_trim(s), *v = bd_trim(eq + 1);
		size_t vl = strlen(v);
		if (vl < 2 || v[0] != '"' || v[vl - 1] != '"') {
			qsm_set_err(err, errlen, "invalid parameter value: ");
			ret = -EINVAL;
			goto out;
		}
		v[vl - 1] = 0;
		v++;
		if (skip)
			continue;
		if ((ret = bd_rule_set(cur, k, v, err, errlen)) < 0)
			goto out;
	}
	if (ret == -EINVAL) {
		qsm_set_err(err, errlen, "%s:%d: Could not parse blkdebug config file", path, lineno);
		goto out;
	}
	if (ret == 0)
		ret = qsm_blkdebug_finish(bd, err, errlen);
out:
	fclose(f);
	return ret;
}

/* --- Flattened options: inject-error.N.KEY, set-state.N.KEY -------------------- */

int qsm_blkdebug_set_opt(struct qsm_blkdebug *bd, const char *key, const char *val, char *err,
			 size_t errlen)
{
	enum bd_action a;
	const char *rest;

	if (!strncmp(key, "inject-error.", 13)) {
		a = BD_INJECT;
		rest = key + 13;
	} else if (!strncmp(key, "set-state.", 10)) {
		a = BD_SET_STATE;
		rest = key + 10;
	} else {
		qsm_set_err(err, errlen, "Invalid parameter '%s'", key);
		return -EINVAL;
	}
	char *e;
	long n = strtol(rest, &e, 10);
	if (e == rest || *e != '.' || n < 0 || n > INT_MAX) {
		qsm_set_err(err, errlen, "Invalid parameter '%s'", key);
		return -EINVAL;
	}
	struct bd_rule *r;
	for (r = bd->rules; r; r = r->next)
		if (r->group == (int)n && r->action == a)
			break;
	if (!r) {
		if (!(r = bd_rule_add(bd, a)))
			return -ENOMEM;
		r->group = (int)n;
	}
	return bd_rule_set(r, e + 1, val, err, errlen);
}

int qsm_blkdebug_finish(struct qsm_blkdebug *bd, char *err, size_t errlen)
{
	for (struct bd_rule *r = bd->rules; r; r = r->next) {
		if (r->action != BD_SUSPEND && !r->event_set) {
			qsm_set_err(err, errlen, "Missing event name for rule");
			return -EINVAL;
		}
	}
	return 0;
}

/* --- Raising events and checking operations --------------------------------------- */

/* Raise every QEMU event mapped onto ev (what: all its rules, all but the
 * breakpoints, or only the breakpoints).  Returns the number of
 * breakpoints that fired (their tags are queued on *tags, to hold the
 * request; with tags NULL they do not fire). */
enum bd_raise_what { BD_RAISE_ALL, BD_RAISE_NO_SUSPEND, BD_RAISE_SUSPEND_ONLY };

static int bd_raise(struct qsm_blkdebug *bd, enum qsm_io_event ev, struct bd_susp **tags,
		    enum bd_raise_what what)
{
	int fired = 0;

	if (ev == QSM_IO_EV_NONE)
		return 0;
	/* A new L2 table goes to disk as QEMU's cache writes any table:
	 * l2_alloc_write, then l2_update. */
	enum qsm_io_event also = ev == QSM_IO_EV_L2_ALLOC ? QSM_IO_EV_L2_UPDATE : QSM_IO_EV_NONE;
	for (size_t i = 0; i < BD_NEVENTS; i++) {
		if (bd_events[i].ev != ev && (also == QSM_IO_EV_NONE || bd_events[i].ev != also))
			continue;
		long long new_state = bd->state;
		bool injected = false;
		struct bd_rule *r = bd->rules, *next;
		for (; r; r = next) {
			next = r->next;
			if (r->event != i || !r->event_set)
				continue;
			if (r->state && r->state != bd->state)
				continue;
			if (what == BD_RAISE_SUSPEND_ONLY && r->action != BD_SUSPEND)
				continue;
			if (what == BD_RAISE_NO_SUSPEND && r->action == BD_SUSPEND)
				continue;
			switch (r->action) {
			case BD_INJECT:
				if (!injected) {
					for (struct bd_rule *a = bd->active; a; a = a->active_next)
						a->active = false;
					bd->active = NULL;
					injected = true;
				}
				r->active = true;
				r->active_next = bd->active;
				bd->active = r;
				break;
			case BD_SET_STATE:
				new_state = r->new_state;
				break;
			case BD_SUSPEND: {
				struct bd_susp *s = calloc(1, sizeof(*s));
				if (s && tags) {
					s->tag = r->tag;
					r->tag = NULL;
					s->next = *tags;
					*tags = s;
					fired++;
				} else {
					free(s);
				}
				if (tags)
					bd_rule_unlink(bd, r);
				break;
			}
			}
		}
		bd->state = new_state;
	}
	return fired;
}

/* The error an armed rule gives an operation of [off, off+len) (flush:
 * is_flush, only rules for any sector), 0 for none; *immediately says how. */
static int bd_check(struct qsm_blkdebug *bd, uint64_t off, uint64_t len, bool is_flush,
		    bool *immediately)
{
	struct bd_rule *r;
	for (r = bd->active; r; r = r->active_next) {
		if (r->offset == -1)
			break;
		if (!is_flush && len && (uint64_t)r->offset >= off && (uint64_t)r->offset < off + len)
			break;
	}
	if (!r || !r->error)
		return 0;
	int error = r->error;
	*immediately = r->immediately;
	if (r->once)
		bd_rule_unlink(bd, r);
	return -error;
}

/* --- The wrapper backend ------------------------------------------------------------- */

struct bd_io {
	struct qsm_io_common c;
	struct qsm_io *inner;
	struct qsm_blkdebug *bd;
};

struct bd_sub {
	struct qsm_io_req sub;
	struct qsm_io_req *orig;
	struct bd_io *b;
};

static const struct qsm_io_ops bd_ops;
static bool bd_take_passed(struct qsm_blkdebug *bd, const struct qsm_io_req *req);

static struct bd_io *bd_of(struct qsm_io *io)
{
	return container_of(io, struct bd_io, c.io);
}

static void bd_sub_cb(struct qsm_io_req *sub, int ret)
{
	struct bd_sub *s = container_of(sub, struct bd_sub, sub);
	struct bd_io *b = s->b;
	struct qsm_io_req *orig = s->orig;
	free(s);
	qsm_io_enter_(&b->c.io);
	qsm_io_complete_(&b->c.io, orig, ret);
	qsm_io_leave_(&b->c.io); /* may close b: not touched after this */
}

/* The operation after its events: injected error or forwarded. */
static void bd_go(struct bd_io *b, struct qsm_io_req *req)
{
	bool imm = false;
	int err = 0;

	if (req->op == QSM_IO_FLUSH)
		err = bd_check(b->bd, 0, 0, true, &imm);
	else if (req->op != QSM_IO_TRUNCATE)
		err = bd_check(b->bd, req->offset, req->len, false, &imm);
	if (err) {
		/* Neither way is the operation done (QEMU's rule_check);
		 * both complete from the loop, never inline (invariant 1). */
		qsm_io_defer_complete_(&b->c.io, req, err);
		return;
	}
	struct bd_sub *s = malloc(sizeof(*s));
	if (!s) {
		qsm_io_defer_complete_(&b->c.io, req, -ENOMEM);
		return;
	}
	s->orig = req;
	s->b = b;
	s->sub = (struct qsm_io_req){
		.op = req->op, .event = req->event, .offset = req->offset, .len = req->len,
		.iov = req->iov, .iovcnt = req->iovcnt, .cb = bd_sub_cb,
	};
	qsm_io_submit(b->inner, &s->sub);
}

static void bd_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct bd_io *b = bd_of(io);
	struct bd_susp *tags = NULL;
	bool passed = false;

	passed = bd_take_passed(b->bd, req);
	/* cluster_alloc is raised by the allocating step itself
	 * (qsm_io_blkdebug_event); the preallocations tagged with it are not
	 * allocations of a request. */
	if (req->event == QSM_IO_EV_CLUSTER_ALLOC) {
		bd_go(b, req);
		return;
	}
	if (bd_raise(b->bd, req->event, passed ? NULL : &tags,
		     passed ? BD_RAISE_NO_SUSPEND : BD_RAISE_ALL) > 0) {
		/* Held (invariant 2): every tag that fired must be resumed. */
		while (tags) {
			struct bd_susp *s = tags;
			tags = s->next;
			s->req = req;
			s->next = b->bd->susp;
			b->bd->susp = s;
			if (b->bd->notify)
				b->bd->notify(b->bd->notify_opaque, s->tag, false);
		}
		return;
	}
	bd_go(b, req);
}

/* Blocking calls: events and injection, never held. */
static int bd_sync_check(struct bd_io *b, enum qsm_io_event ev, uint64_t off, uint64_t len,
			 bool flush)
{
	bool imm;
	bd_raise(b->bd, ev, NULL, BD_RAISE_NO_SUSPEND);
	return bd_check(b->bd, off, len, flush, &imm);
}

static int bd_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	struct bd_io *b = bd_of(io);
	int r = bd_sync_check(b, io->sync_event, off, len, false);
	return r ? r : qsm_io_pread_sync(b->inner, buf, len, off);
}

static int bd_pwrite_sync(struct qsm_io *io, const void *buf, size_t len, uint64_t off)
{
	struct bd_io *b = bd_of(io);
	int r = bd_sync_check(b, QSM_IO_EV_NONE, off, len, false);
	return r ? r : qsm_io_pwrite_sync(b->inner, buf, len, off);
}

static int bd_flush_sync(struct qsm_io *io)
{
	struct bd_io *b = bd_of(io);
	int r = bd_sync_check(b, QSM_IO_EV_FLUSH, 0, 0, true);
	return r ? r : qsm_io_flush_sync(b->inner);
}

static int bd_truncate_sync(struct qsm_io *io, uint64_t size)
{
	return qsm_io_truncate_sync(bd_of(io)->inner, size);
}

static int bd_get_size(struct qsm_io *io, uint64_t *size)
{
	return qsm_io_get_size(bd_of(io)->inner, size);
}

static int bd_extent(struct qsm_io *io, uint64_t off, uint64_t len, bool *data, uint64_t *run)
{
	return qsm_io_extent(bd_of(io)->inner, off, len, data, run);
}

static int bd_allocated(struct qsm_io *io, uint64_t *bytes)
{
	return qsm_io_allocated(bd_of(io)->inner, bytes);
}

static void bd_close(struct qsm_io *io)
{
	struct bd_io *b = bd_of(io);
	qsm_io_close(b->inner);
	qsm_blkdebug_free(b->bd);
	qsm_io_common_fini_(&b->c);
	free(b);
}

static const struct qsm_io_ops bd_ops = {
	.name = "blkdebug",
	.submit = bd_submit,
	.pread_sync = bd_pread_sync,
	.pwrite_sync = bd_pwrite_sync,
	.flush_sync = bd_flush_sync,
	.truncate_sync = bd_truncate_sync,
	.get_size = bd_get_size,
	.extent = bd_extent,
	.allocated = bd_allocated,
	.close = bd_close,
};

int qsm_io_blkdebug_wrap(struct qsm_io *inner, struct qsm_blkdebug *bd, struct qsm_io **out)
{
	struct bd_io *b = calloc(1, sizeof(*b));
	int r;

	*out = NULL;
	if (!b) {
		r = -ENOMEM;
		goto fail;
	}
	/* The inner handle's flags, but not NO_FLUSH: the engine sets that on
	 * the handle it is given, and it must reach the inner one through
	 * ours (a flush that got here is one to do). */
	r = qsm_io_common_init_(&b->c, &bd_ops, inner->base, inner->flags & ~QSM_IO_NO_FLUSH);
	if (r < 0)
		goto fail;
	b->c.io.mem_align = inner->mem_align;
	b->inner = inner;
	b->bd = bd;
	*out = &b->c.io;
	return 0;
fail:
	free(b);
	qsm_io_close(inner);
	qsm_blkdebug_free(bd);
	return r;
}

/* --- Breakpoints --------------------------------------------------------------------- */

static struct qsm_blkdebug *bd_of_handle(struct qsm_io *io)
{
	return io && io->ops == &bd_ops ? bd_of(io)->bd : NULL;
}

int qsm_io_blkdebug_break(struct qsm_io *io, const char *event, const char *tag)
{
	struct qsm_blkdebug *bd = bd_of_handle(io);
	enum qsm_io_event ev;
	if (!bd)
		return -ENOTSUP;
	int r = qsm_blkdebug_event_parse(event, &ev);
	if (r < 0)
		return r;
	struct bd_rule *rule = bd_rule_add(bd, BD_SUSPEND);
	if (!rule || !(rule->tag = strdup(tag))) {
		if (rule)
			bd_rule_unlink(bd, rule);
		return -ENOMEM;
	}
	for (size_t i = 0; i < BD_NEVENTS; i++)
		if (!strcmp(bd_events[i].name, event))
			rule->event = i;
	rule->event_set = true;
	return 0;
}

/* Resume the first held request with tag; true when there was one. */
static bool bd_resume_one(struct bd_io *b, const char *tag)
{
	struct qsm_blkdebug *bd = b->bd;
	for (struct bd_susp **p = &bd->susp; *p; p = &(*p)->next) {
		struct bd_susp *s = *p;
		if (strcmp(s->tag, tag))
			continue;
		*p = s->next;
		struct qsm_io_req *req = s->req;
		if (bd->notify)
			bd->notify(bd->notify_opaque, s->tag, true);
		qsm_io_cb resumed = s->resumed;
		free(s->tag);
		free(s);
		bool still = false;
		for (struct bd_susp *o = bd->susp; o; o = o->next)
			still |= o->req == req;
		if (still)
			return true;
		if (!resumed) {
			bd_go(b, req);
			return true;
		}
		struct bd_passed *pass = malloc(sizeof(*pass));
		if (pass) {
			pass->req = req;
			pass->event = req->event;
			pass->next = bd->passed;
			bd->passed = pass;
		}
		resumed(req, 0);
		return true;
	}
	return false;
}

int qsm_io_blkdebug_remove_break(struct qsm_io *io, const char *tag)
{
	struct qsm_blkdebug *bd = bd_of_handle(io);
	int ret = -ENOENT;
	if (!bd)
		return -ENOTSUP;
	for (struct bd_rule *r = bd->rules, *next; r; r = next) {
		next = r->next;
		if (r->action == BD_SUSPEND && !strcmp(r->tag, tag)) {
			bd_rule_unlink(bd, r);
			ret = 0;
		}
	}
	/* QEMU 7.2 resumes the requests held by the tag too, and still says
	 * ENOENT when no breakpoint was left to remove. */
	while (bd_resume_one(bd_of(io), tag))
		;
	return ret;
}

int qsm_io_blkdebug_resume(struct qsm_io *io, const char *tag)
{
	struct qsm_blkdebug *bd = bd_of_handle(io);
	if (!bd)
		return -ENOTSUP;
	return bd_resume_one(bd_of(io), tag) ? 0 : -ENOENT;
}

bool qsm_io_blkdebug_is_suspended(struct qsm_io *io, const char *tag)
{
	struct qsm_blkdebug *bd = bd_of_handle(io);
	if (!bd)
		return false;
	for (struct bd_susp *s = bd->susp; s; s = s->next)
		if (!strcmp(s->tag, tag))
			return true;
	return false;
}

bool qsm_io_blkdebug_hold(struct qsm_io *io, struct qsm_io_req *req, qsm_io_cb resumed)
{
	struct qsm_blkdebug *bd = bd_of_handle(io);
	struct bd_susp *tags = NULL;
	if (!bd || bd_raise(bd, req->event, &tags, BD_RAISE_SUSPEND_ONLY) == 0)
		return false;
	while (tags) {
		struct bd_susp *s = tags;
		tags = s->next;
		s->req = req;
		s->resumed = resumed;
		s->next = bd->susp;
		bd->susp = s;
		if (bd->notify)
			bd->notify(bd->notify_opaque, s->tag, false);
	}
	return true;
}

void qsm_io_blkdebug_resume_all(struct qsm_io *io)
{
	struct qsm_blkdebug *bd = bd_of_handle(io);
	while (bd && bd->susp)
		bd_resume_one(bd_of(io), bd->susp->tag);
}

/* Take req off the passed list; true when it was there. */
static bool bd_take_passed(struct qsm_blkdebug *bd, const struct qsm_io_req *req)
{
	for (struct bd_passed **p = &bd->passed; *p; p = &(*p)->next) {
		if ((*p)->req == req && (*p)->event == req->event) {
			struct bd_passed *x = *p;
			*p = x->next;
			free(x);
			return true;
		}
	}
	return false;
}

bool qsm_io_blkdebug_event(struct qsm_io *io, struct qsm_io_req *req, qsm_io_cb resumed)
{
	struct qsm_blkdebug *bd = bd_of_handle(io);
	if (!bd)
		return false;
	if (!bd_take_passed(bd, req) && qsm_io_blkdebug_hold(io, req, resumed))
		return true;
	bd_raise(bd, req->event, NULL, BD_RAISE_NO_SUSPEND);
	return false;
}
