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
#include <inttypes.h>
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
	bool node; /* raised by this layer itself (QEMU's block layer raises
		    * it on the blkdebug node): the write steps of bd_plan */
} bd_events[] = {
	{ "l1_update", QSM_IO_EV_L1_UPDATE, false },
	{ "l1_grow_alloc_table", QSM_IO_EV_NONE, false },
	{ "l1_grow_write_table", QSM_IO_EV_NONE, false },
	{ "l1_grow_activate_table", QSM_IO_EV_NONE, false },
	{ "l2_load", QSM_IO_EV_L2_LOAD, false },
	{ "l2_update", QSM_IO_EV_L2_UPDATE, false },
	{ "l2_update_compressed", QSM_IO_EV_NONE, false },
	{ "l2_alloc_cow_read", QSM_IO_EV_NONE, false },
	{ "l2_alloc_write", QSM_IO_EV_L2_ALLOC, false },
	{ "read_aio", QSM_IO_EV_DATA_READ, false },
	{ "read_backing_aio", QSM_IO_EV_NONE, false },
	{ "read_compressed", QSM_IO_EV_NONE, false },
	{ "write_aio", QSM_IO_EV_DATA_WRITE, false },
	{ "write_compressed", QSM_IO_EV_COMPRESSED_WRITE, false },
	{ "vmstate_load", QSM_IO_EV_NONE, false },
	{ "vmstate_save", QSM_IO_EV_NONE, false },
	{ "cow_read", QSM_IO_EV_COW_READ, false },
	{ "cow_write", QSM_IO_EV_COW_WRITE, false },
	{ "reftable_load", QSM_IO_EV_NONE, false },
	{ "reftable_grow", QSM_IO_EV_NONE, false },
	{ "reftable_update", QSM_IO_EV_REFTABLE_UPDATE, false },
	{ "refblock_load", QSM_IO_EV_REFBLOCK_LOAD, false },
	{ "refblock_update", QSM_IO_EV_REFBLOCK_UPDATE, false },
	{ "refblock_update_part", QSM_IO_EV_REFBLOCK_UPDATE, false },
	{ "refblock_alloc", QSM_IO_EV_REFBLOCK_ALLOC, false },
	{ "refblock_alloc_hookup", QSM_IO_EV_REFTABLE_UPDATE, false },
	{ "refblock_alloc_write", QSM_IO_EV_REFBLOCK_ALLOC, false },
	{ "refblock_alloc_write_blocks", QSM_IO_EV_NONE, false },
	{ "refblock_alloc_write_table", QSM_IO_EV_NONE, false },
	{ "refblock_alloc_switch_table", QSM_IO_EV_NONE, false },
	{ "cluster_alloc", QSM_IO_EV_CLUSTER_ALLOC, false },
	{ "cluster_alloc_bytes", QSM_IO_EV_NONE, false },
	{ "cluster_free", QSM_IO_EV_NONE, false },
	{ "flush_to_os", QSM_IO_EV_NONE, false },
	{ "flush_to_disk", QSM_IO_EV_FLUSH, false },
	{ "pwritev_rmw_head", QSM_IO_EV_NONE, true },
	{ "pwritev_rmw_after_head", QSM_IO_EV_NONE, true },
	{ "pwritev_rmw_tail", QSM_IO_EV_NONE, true },
	{ "pwritev_rmw_after_tail", QSM_IO_EV_NONE, true },
	{ "pwritev", QSM_IO_EV_NONE, true },
	{ "pwritev_zero", QSM_IO_EV_NONE, true },
	{ "pwritev_done", QSM_IO_EV_NONE, true },
	{ "empty_image_prepare", QSM_IO_EV_NONE, false },
	{ "l1_shrink_write_table", QSM_IO_EV_NONE, false },
	{ "l1_shrink_free_l2_clusters", QSM_IO_EV_NONE, false },
	{ "cor_write", QSM_IO_EV_NONE, false },
	{ "cluster_alloc_space", QSM_IO_EV_NONE, false },
	{ "none", QSM_IO_EV_NONE, false },
};
#define BD_NEVENTS QSM_ARRAY_SIZE(bd_events)

int qsm_blkdebug_event_parse(const char *name, enum qsm_io_event *ev)
{
	for (size_t i = 0; i < BD_NEVENTS; i++) {
		if (!strcmp(bd_events[i].name, name)) {
			*ev = bd_events[i].ev;
			return bd_events[i].ev == QSM_IO_EV_NONE && !bd_events[i].node ? -ENOTSUP : 0;
		}
	}
	return -ENOENT;
}

/* --- Rules ---------------------------------------------------------------------- */

enum bd_action { BD_INJECT, BD_SET_STATE, BD_SUSPEND };

/* QEMU's BlkdebugIOType: what kind of operation an injected error fails
 * (inject-error's iotype; by default all but block-status). */
enum bd_iotype {
	BD_IO_READ, BD_IO_WRITE, BD_IO_WRITE_ZEROES, BD_IO_DISCARD, BD_IO_FLUSH,
	BD_IO_BLOCK_STATUS, BD_IO__COUNT
};
static const char *const bd_iotype_names[BD_IO__COUNT] = {
	"read", "write", "write-zeroes", "discard", "flush", "block-status",
};
#define BD_IO_DEFAULT_MASK                                                     \
	((1u << BD_IO_READ) | (1u << BD_IO_WRITE) | (1u << BD_IO_WRITE_ZEROES) | \
	 (1u << BD_IO_DISCARD) | (1u << BD_IO_FLUSH))

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
	unsigned iotypes;            /* 1 << enum bd_iotype: what it fails */
	char *tag;                   /* BD_SUSPEND */
	int group;                   /* set_opt's N, -1 from a config file */
	char *group_kind;
};

struct bd_op;

/* A held request (breakpoint fired). */
struct bd_susp {
	struct bd_susp *next;
	char *tag;
	struct qsm_io_req *req;
	qsm_io_cb resumed;           /* held by the request machine: tell it */
	struct bd_op *op;            /* held at a node event: run it on */
};

/* A request the request machine held and that was resumed: its next
 * submit has passed its breakpoints already. */
struct bd_passed {
	struct bd_passed *next;
	const struct qsm_io_req *req;
	enum qsm_io_event event;     /* the event it passed */
};

/* The node's limits (QEMU's align, max-transfer, opt-write-zero,
 * max-write-zero, opt-discard, max-discard options; 0: not set). */
struct bd_limits {
	uint64_t align, max_transfer, opt_wz, max_wz, opt_discard, max_discard;
};

struct qsm_blkdebug {
	struct bd_limits lim;
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
	r->iotypes = BD_IO_DEFAULT_MASK;
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

/* Set key=val on rule r (of the section kind); from_opts: a flattened
 * option (QEMU words an unknown key differently there). */
static int bd_rule_set(struct bd_rule *r, const char *k, const char *v, bool from_opts, char *err,
		       size_t errlen)
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
		if (!strcmp(k, "iotype")) {
			for (int t = 0; t < BD_IO__COUNT; t++) {
				if (!strcmp(v, bd_iotype_names[t])) {
					r->iotypes = 1u << t;
					return 0;
				}
			}
			qsm_set_err(err, errlen, "invalid parameter value: %s", v);
			return -EINVAL;
		}
	}
	if (from_opts)
		qsm_set_err(err, errlen, "[%s] section doesn't support the option '%s'",
			    r->action == BD_INJECT ? "inject-error" : "set-state", k);
	else
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
		if ((ret = bd_rule_set(cur, k, v, false, err, errlen)) < 0)
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

/* --- Flattened options: inject-error.N.KEY, set-state.N.KEY, the limits -------- */

/* QEMU's size option parsing (qemu_strtosz: a number, a fraction, an
 * optional suffix B, k, M, G, T, P or E in either case), with its message. */
static int bd_size(const char *k, const char *v, uint64_t *out, char *err, size_t errlen)
{
	const char *p = v;
	uint64_t n = 0, frac_num = 0, frac_den = 1, mul = 1;
	bool digits = false;

	for (; *p >= '0' && *p <= '9'; p++, digits = true) {
		if (n > (UINT64_MAX - 9) / 10)
			goto bad;
		n = n * 10 + (uint64_t)(*p - '0');
	}
	if (*p == '.') {
		for (p++; *p >= '0' && *p <= '9'; p++, digits = true) {
			if (frac_den < 1000000000000ull) {
				frac_num = frac_num * 10 + (uint64_t)(*p - '0');
				frac_den *= 10;
			}
		}
	}
	if (!digits)
		goto bad;
	if (*p) {
		static const char sfx[] = "BKMGTPE";
		const char *f = strchr(sfx, toupper((unsigned char)*p));
		if (!f || p[1])
			goto bad;
		for (long i = f - sfx; i > 0; i--)
			mul *= 1024;
		p++;
	}
	if (n > UINT64_MAX / mul)
		goto bad;
	*out = n * mul + (uint64_t)((long double)frac_num * mul / frac_den);
	return 0;
bad:
	qsm_set_err(err, errlen, "Parameter '%s' expects a non-negative number below 2^64\n"
		    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
		    "and exabytes, respectively.", k);
	return -EINVAL;
}

static const char *const bd_limit_names[] = {
	"align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard",
};

/* The field of bd->lim named key, NULL for another key. */
static uint64_t *bd_limit_key(struct qsm_blkdebug *bd, const char *key)
{
	uint64_t *const f[] = {
		&bd->lim.align, &bd->lim.max_transfer, &bd->lim.opt_wz,
		&bd->lim.max_wz, &bd->lim.opt_discard, &bd->lim.max_discard,
	};
	for (size_t i = 0; i < QSM_ARRAY_SIZE(bd_limit_names); i++)
		if (!strcmp(key, bd_limit_names[i]))
			return f[i];
	return NULL;
}

bool qsm_blkdebug_is_limit(const char *key)
{
	for (size_t i = 0; i < QSM_ARRAY_SIZE(bd_limit_names); i++)
		if (!strcmp(key, bd_limit_names[i]))
			return true;
	return false;
}

int qsm_blkdebug_check_limits(struct qsm_blkdebug *bd, uint64_t file_align, char *err,
			      size_t errlen)
{
	const struct bd_limits *l = &bd->lim;
	uint64_t align;

	/* QEMU's blkdebug_open checks, in its order and words. */
	if (l->align && (l->align >= INT_MAX || (l->align & (l->align - 1)))) {
		qsm_set_err(err, errlen, "Cannot meet constraints with align %" PRIu64, l->align);
		return -EINVAL;
	}
	align = QSM_MAX(l->align, file_align);
#define BD_CHECK(val, name, mult)                                                        \
	if ((val) && ((val) >= INT_MAX || (val) % (mult))) {                              \
		qsm_set_err(err, errlen, "Cannot meet constraints with " name " %" PRIu64, \
			    (uint64_t)(val));                                             \
		return -EINVAL;                                                           \
	}
	BD_CHECK(l->max_transfer, "max-transfer", align)
	BD_CHECK(l->opt_wz, "opt-write-zero", align)
	BD_CHECK(l->max_wz, "max-write-zero", QSM_MAX(l->opt_wz, align))
	BD_CHECK(l->opt_discard, "opt-discard", align)
	BD_CHECK(l->max_discard, "max-discard", QSM_MAX(l->opt_discard, align))
#undef BD_CHECK
	return 0;
}

int qsm_blkdebug_set_opt(struct qsm_blkdebug *bd, const char *key, const char *val, char *err,
			 size_t errlen)
{
	enum bd_action a;
	const char *rest;
	uint64_t *lim = bd_limit_key(bd, key);

	if (lim)
		return bd_size(key, val, lim, err, errlen);
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
	return bd_rule_set(r, e + 1, val, true, err, errlen);
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

/* Raise the event bd_events[i]: QEMU's blkdebug_debug_event (every rule
 * sees the state before the event, then the state moves on). */
static int bd_raise_idx(struct qsm_blkdebug *bd, size_t i, struct bd_susp **tags,
			enum bd_raise_what what)
{
	long long new_state = bd->state;
	bool injected = false;
	int fired = 0;
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
	return fired;
}

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
		fired += bd_raise_idx(bd, i, tags, what);
	}
	return fired;
}

/* The error an armed rule gives an operation of kind t on [off, off+len)
 * (len 0: flushes, which only rules for any sector match), 0 for none;
 * *immediately says how.  QEMU's rule_check. */
static int bd_check(struct qsm_blkdebug *bd, uint64_t off, uint64_t len, enum bd_iotype t,
		    bool *immediately)
{
	struct bd_rule *r;
	for (r = bd->active; r; r = r->active_next) {
		if (!(r->iotypes & (1u << t)))
			continue;
		if (r->offset == -1)
			break;
		if (len && (uint64_t)r->offset >= off && (uint64_t)r->offset < off + len)
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

/* --- Planning an operation: QEMU's block layer on the blkdebug node -----------------
 *
 * With align (request_alignment), max-transfer and the write-zero and
 * discard limits set, QEMU's block layer (block/io.c) does not hand a
 * request to blkdebug as it came: it pads it to the alignment
 * (read-modify-write for writes), splits it at max-transfer, cuts zero
 * writes and discards at their alignments and maxima, and falls back to
 * writing zeros where blkdebug refuses a zero write below its alignment.
 * Each piece is one blkdebug call, checked by the rules on its own (with
 * its iotype) and then passed to the file.  The write path also raises
 * the node's own events (pwritev_rmw_head ... pwritev_done).  bd_plan
 * turns one operation into that list of steps (bd_act), run in order, one
 * I/O at a time, by bd_op_run (asynchronous) or bd_sync_run (blocking).
 * Without limits the list is the operation itself, plus pwritev/
 * pwritev_done (or pwritev_zero) around a write.
 *
 * Data of an action (src):
 *  VIEW   the operation's own range, padded: [aoff, aend) in op->flat
 *         (a bounce buffer when the request was padded, the caller's
 *         buffer for blocking calls) or, unpadded, the caller's iovec;
 *  PAD    QEMU's padding buffer of a zero write (head block at 0, tail
 *         block at pad_len - align), zeros between after ZERO_MIDDLE;
 *  ZEROS  zeros (a zero write's fallback);
 *  NONE   ZERO and DISCARD operations.
 * After an error, only the "always" actions of the failed group run
 * (pwritev_done is raised after a failed write too).
 */
enum bd_act_kind { BD_A_EVENT, BD_A_IO, BD_A_SKIP, BD_A_ZERO_MIDDLE, BD_A_COPY_IN, BD_A_COPY_OUT };
enum bd_src { BD_SRC_NONE, BD_SRC_VIEW, BD_SRC_PAD, BD_SRC_ZEROS };

struct bd_act {
	uint8_t kind, src, iotype, op;
	unsigned group;
	bool always;
	size_t event;           /* BD_A_EVENT: index in bd_events */
	uint64_t off, len;      /* BD_A_IO: the piece */
	uint64_t srcoff;        /* BD_SRC_PAD: offset in the pad buffer */
};

struct bd_plan {
	struct bd_act *a;
	size_t n, cap;
	unsigned group;
	bool nomem;
	/* The padding (bdrv_init_padding), for reads and writes. */
	uint64_t align, aoff, aend, head, tail, pad_len;
	bool padded, merge;
};

static void bd_plan_add(struct bd_plan *p, struct bd_act a)
{
	if (p->n == p->cap) {
		size_t cap = p->cap ? p->cap * 2 : 16;
		struct bd_act *na = realloc(p->a, cap * sizeof(*na));
		if (!na) {
			p->nomem = true;
			return;
		}
		p->a = na;
		p->cap = cap;
	}
	a.group = p->group;
	p->a[p->n++] = a;
}

static size_t bd_event_idx(const char *name)
{
	for (size_t i = 0; i < BD_NEVENTS; i++)
		if (!strcmp(bd_events[i].name, name))
			return i;
	assert(0 && "not a blkdebug event");
	return 0;
}

static void bd_plan_event(struct bd_plan *p, const char *name, bool always)
{
	bd_plan_add(p, (struct bd_act){ .kind = BD_A_EVENT, .event = bd_event_idx(name),
					.always = always });
}

static uint64_t bd_req_align(const struct qsm_blkdebug *bd)
{
	return bd->lim.align ? bd->lim.align : 1;
}

/* bdrv_aligned_preadv/pwritev's max_transfer: the limit (or INT_MAX)
 * aligned down to the request alignment. */
static uint64_t bd_max_transfer(const struct qsm_blkdebug *bd)
{
	uint64_t a = bd_req_align(bd);
	uint64_t m = bd->lim.max_transfer ? QSM_MIN(bd->lim.max_transfer, (uint64_t)INT_MAX)
					  : (uint64_t)INT_MAX;
	return m / a * a;
}

/* Pieces of [off, off+len) of at most max_transfer each, from src. */
static void bd_plan_pieces(struct bd_plan *p, const struct qsm_blkdebug *bd, enum qsm_io_op op,
			   enum bd_iotype t, enum bd_src src, uint64_t off, uint64_t len,
			   uint64_t srcoff)
{
	uint64_t mt = bd_max_transfer(bd);
	for (uint64_t done = 0; done < len;) {
		uint64_t num = QSM_MIN(len - done, mt);
		bd_plan_add(p, (struct bd_act){ .kind = BD_A_IO, .op = op, .iotype = t, .src = src,
						.off = off + done, .len = num,
						.srcoff = srcoff + done });
		done += num;
	}
}

/* bdrv_init_padding. */
static void bd_plan_padding(struct bd_plan *p, const struct qsm_blkdebug *bd, uint64_t off,
			    uint64_t len)
{
	uint64_t a = bd_req_align(bd);
	p->align = a;
	p->head = off % a;
	p->tail = (off + len) % a;
	if (p->tail)
		p->tail = a - p->tail;
	p->aoff = off - p->head;
	p->aend = off + len + p->tail;
	p->padded = p->head || p->tail;
	if (!p->padded)
		return;
	uint64_t sum = p->head + len + p->tail;
	p->pad_len = sum > a && p->head && p->tail ? 2 * a : a;
	p->merge = sum == p->pad_len;
}

/* bdrv_padding_rmw_read: read the head and tail blocks (one read when
 * they are the whole padded range), into src (VIEW for writes, PAD for
 * zero writes). */
static void bd_plan_rmw(struct bd_plan *p, const struct qsm_blkdebug *bd, enum bd_src src)
{
	uint64_t a = p->align;
	if (p->head || p->merge) {
		uint64_t n = p->merge ? p->pad_len : a;
		if (p->head)
			bd_plan_event(p, "pwritev_rmw_head", false);
		if (p->merge && p->tail)
			bd_plan_event(p, "pwritev_rmw_tail", false);
		bd_plan_pieces(p, bd, QSM_IO_READ, BD_IO_READ, src, p->aoff, n, 0);
		if (p->head)
			bd_plan_event(p, "pwritev_rmw_after_head", false);
		if (p->merge && p->tail)
			bd_plan_event(p, "pwritev_rmw_after_tail", false);
		if (p->merge)
			return;
	}
	if (p->tail) {
		bd_plan_event(p, "pwritev_rmw_tail", false);
		bd_plan_pieces(p, bd, QSM_IO_READ, BD_IO_READ, src, p->aend - a, a,
			       src == BD_SRC_PAD ? p->pad_len - a : p->aend - a - p->aoff);
		bd_plan_event(p, "pwritev_rmw_after_tail", false);
	}
}

/* bdrv_aligned_pwritev of [off, off+len) from src (a new group). */
static void bd_plan_aligned_write(struct bd_plan *p, const struct qsm_blkdebug *bd,
				  enum bd_src src, uint64_t off, uint64_t len, uint64_t srcoff)
{
	p->group++;
	bd_plan_event(p, "pwritev", false);
	bd_plan_pieces(p, bd, QSM_IO_WRITE, BD_IO_WRITE, src, off, len, srcoff);
	bd_plan_event(p, "pwritev_done", true);
}

/* bdrv_co_do_pwrite_zeroes (after pwritev_zero) on an aligned range, with
 * blkdebug_co_pwrite_zeroes refusing pieces below its alignment, which
 * the block layer then writes as zeros. */
static void bd_plan_zeroes(struct bd_plan *p, const struct qsm_blkdebug *bd, uint64_t off,
			   uint64_t bytes)
{
	const uint64_t bounce_max = 32768 * 512; /* QEMU's MAX_BOUNCE_BUFFER */
	uint64_t ra = bd_req_align(bd);
	uint64_t zalign = QSM_MAX(bd->lim.opt_wz, ra);
	uint64_t maxwz = bd->lim.max_wz ? QSM_MIN(bd->lim.max_wz, (uint64_t)INT_MAX)
					: (uint64_t)INT_MAX;
	uint64_t mt = bd->lim.max_transfer ? QSM_MIN(bd->lim.max_transfer, bounce_max) : bounce_max;
	uint64_t head = off % zalign, tail = (off + bytes) % zalign;

	maxwz = maxwz / zalign * zalign;
	while (bytes > 0) {
		uint64_t num = bytes;
		if (head) {
			num = QSM_MIN(QSM_MIN(bytes, mt), zalign - head);
			head = (head + num) % zalign;
		} else if (tail && num > zalign) {
			num -= tail;
		}
		if (num > maxwz)
			num = maxwz;
		if (num < zalign) {
			/* -ENOTSUP from blkdebug: the bounce-buffer fallback. */
			num = QSM_MIN(num, mt);
			bd_plan_add(p, (struct bd_act){ .kind = BD_A_IO, .op = QSM_IO_WRITE,
							.iotype = BD_IO_WRITE, .src = BD_SRC_ZEROS,
							.off = off, .len = num });
		} else {
			bd_plan_add(p, (struct bd_act){ .kind = BD_A_IO, .op = QSM_IO_ZERO,
							.iotype = BD_IO_WRITE_ZEROES,
							.src = BD_SRC_NONE, .off = off, .len = num });
		}
		off += num;
		bytes -= num;
	}
}

/* bdrv_co_pdiscard's cutting; pieces below the request alignment are
 * blkdebug's -ENOTSUP, which a discard ignores (BD_A_SKIP). */
static void bd_plan_discard(struct bd_plan *p, const struct qsm_blkdebug *bd, uint64_t off,
			    uint64_t bytes)
{
	uint64_t ra = bd_req_align(bd);
	uint64_t align = QSM_MAX(bd->lim.opt_discard, ra);
	uint64_t head = off % align, tail = (off + bytes) % align;
	uint64_t maxd = bd->lim.max_discard ? bd->lim.max_discard : INT64_MAX;
	maxd = maxd / align * align;

	while (bytes > 0) {
		uint64_t num = bytes;
		if (head) {
			num = QSM_MIN(bytes, align - head);
			if (num % ra)
				num %= ra;
			head = (head + num) % align;
		} else if (tail) {
			if (num > align) {
				num -= tail;
			} else if (tail % ra && tail > ra) {
				tail %= ra;
				num -= tail;
			}
		}
		if (num > maxd)
			num = maxd;
		bd_plan_add(p, (struct bd_act){ .kind = num < ra ? BD_A_SKIP : BD_A_IO,
						.op = QSM_IO_DISCARD, .iotype = BD_IO_DISCARD,
						.src = BD_SRC_NONE, .off = off, .len = num });
		off += num;
		bytes -= num;
	}
}

/* The steps of one operation (0 or -ENOMEM; p zeroed by the caller). */
static int bd_plan(struct bd_plan *p, const struct qsm_blkdebug *bd, enum qsm_io_op op,
		   uint64_t off, uint64_t len)
{
	switch (op) {
	case QSM_IO_READ:
		bd_plan_padding(p, bd, off, len);
		bd_plan_pieces(p, bd, QSM_IO_READ, BD_IO_READ, BD_SRC_VIEW, p->aoff,
			       p->aend - p->aoff, 0);
		if (p->padded)
			bd_plan_add(p, (struct bd_act){ .kind = BD_A_COPY_OUT });
		break;
	case QSM_IO_WRITE:
		bd_plan_padding(p, bd, off, len);
		if (p->padded) {
			bd_plan_rmw(p, bd, BD_SRC_VIEW);
			bd_plan_add(p, (struct bd_act){ .kind = BD_A_COPY_IN });
		}
		bd_plan_aligned_write(p, bd, BD_SRC_VIEW, p->aoff, p->aend - p->aoff, 0);
		break;
	case QSM_IO_ZERO: { /* bdrv_co_do_zero_pwritev */
		uint64_t a = bd_req_align(bd);
		bd_plan_padding(p, bd, off, len);
		if (p->padded) {
			bd_plan_rmw(p, bd, BD_SRC_PAD);
			bd_plan_add(p, (struct bd_act){ .kind = BD_A_ZERO_MIDDLE });
			if (p->head || p->merge) {
				uint64_t wb = p->merge ? p->pad_len : a;
				bd_plan_aligned_write(p, bd, BD_SRC_PAD, p->aoff, wb, 0);
				if (p->merge)
					break;
				off += wb - p->head;
				len -= wb - p->head;
			}
		}
		if (len >= a) {
			uint64_t mid = len / a * a;
			p->group++;
			bd_plan_event(p, "pwritev_zero", false);
			bd_plan_zeroes(p, bd, off, mid);
			bd_plan_event(p, "pwritev_done", true);
			off += mid;
			len -= mid;
		}
		if (len)
			bd_plan_aligned_write(p, bd, BD_SRC_PAD, off, a, p->pad_len - a);
		break;
	}
	case QSM_IO_DISCARD:
		bd_plan_discard(p, bd, off, len);
		break;
	default:
		assert(0);
	}
	return p->nomem ? -ENOMEM : 0;
}

/* --- The wrapper backend ------------------------------------------------------------- */

struct bd_io {
	struct qsm_io_common c;
	struct qsm_io *inner;
	struct qsm_blkdebug *bd;
};

/* One operation on its way through its plan (asynchronous). */
struct bd_op {
	struct qsm_io_req sub;       /* the one piece at the wrapped handle */
	struct qsm_io_req *orig;
	struct bd_io *b;
	struct bd_plan plan;
	size_t next;                 /* next action */
	int ret;                     /* first error */
	unsigned err_group;
	char *flat;                  /* VIEW when padded: [aoff, aend) */
	char *pad;                   /* PAD: plan.pad_len bytes */
	char *zeros;                 /* ZEROS: zbuf_len bytes */
	size_t zbuf_len;
	struct iovec one;            /* a piece from a flat buffer */
	struct iovec *piov;          /* a piece of the caller's iovec */
	int piov_cap;
};

static const struct qsm_io_ops bd_ops;
static bool bd_take_passed(struct qsm_blkdebug *bd, const struct qsm_io_req *req);

static struct bd_io *bd_of(struct qsm_io *io)
{
	return container_of(io, struct bd_io, c.io);
}

static void bd_op_free(struct bd_op *op)
{
	free(op->plan.a);
	free(op->flat);
	free(op->pad);
	free(op->zeros);
	free(op->piov);
	free(op);
}

/* The iovec slice [skip, skip+len) of iov into dst (capacity cap). */
static int bd_iov_slice(const struct iovec *iov, int cnt, uint64_t skip, uint64_t len,
			struct iovec *dst, int cap)
{
	int n = 0;
	for (int i = 0; i < cnt && len; i++) {
		if (skip >= iov[i].iov_len) {
			skip -= iov[i].iov_len;
			continue;
		}
		uint64_t take = QSM_MIN((uint64_t)iov[i].iov_len - skip, len);
		assert(n < cap);
		dst[n++] = (struct iovec){ (char *)iov[i].iov_base + skip, (size_t)take };
		len -= take;
		skip = 0;
	}
	return n;
}

/* Hold op at a breakpoint of a node event (tags fired): resumed by
 * bd_resume_one, which runs it on. */
static void bd_op_hold(struct bd_op *op, struct bd_susp *tags)
{
	struct qsm_blkdebug *bd = op->b->bd;
	while (tags) {
		struct bd_susp *s = tags;
		tags = s->next;
		s->req = op->orig;
		s->op = op;
		s->next = bd->susp;
		bd->susp = s;
		if (bd->notify)
			bd->notify(bd->notify_opaque, s->tag, false);
	}
}

static void bd_op_sub_cb(struct qsm_io_req *sub, int ret);

/* Run op's actions from op->next until one waits (an I/O at the wrapped
 * handle, a breakpoint) or the plan ends, which completes the original
 * request: directly when called from a completion (in_cb), else from the
 * loop (never inline from submit, invariant 1). */
static void bd_op_run(struct bd_op *op, bool in_cb)
{
	struct bd_io *b = op->b;
	struct qsm_blkdebug *bd = b->bd;
	struct qsm_io_req *orig = op->orig;

	while (op->next < op->plan.n) {
		struct bd_act *a = &op->plan.a[op->next++];
		if (op->ret && !(a->always && a->group == op->err_group))
			continue;
		switch (a->kind) {
		case BD_A_EVENT: {
			struct bd_susp *tags = NULL;
			if (bd_raise_idx(bd, a->event, &tags, BD_RAISE_ALL) > 0) {
				bd_op_hold(op, tags);
				return;
			}
			break;
		}
		case BD_A_SKIP:
			break;
		case BD_A_ZERO_MIDDLE:
			memset(op->pad + op->plan.head, 0,
			       op->plan.pad_len - op->plan.head - op->plan.tail);
			break;
		case BD_A_COPY_IN:
			qsm_iov_to_buf(orig->iov, orig->iovcnt, 0, op->flat + op->plan.head, orig->len);
			break;
		case BD_A_COPY_OUT:
			qsm_iov_from_buf(orig->iov, orig->iovcnt, 0, op->flat + op->plan.head, orig->len);
			break;
		case BD_A_IO: {
			bool imm = false;
			int err = bd_check(bd, a->off, a->len, a->iotype, &imm);
			if (err) {
				/* Not done (QEMU's rule_check); the request
				 * completes from the loop either way. */
				op->ret = err;
				op->err_group = a->group;
				in_cb = false;
				break;
			}
			op->sub = (struct qsm_io_req){
				.op = a->op, .event = orig->event, .offset = a->off, .len = a->len,
				.cb = bd_op_sub_cb,
			};
			if (a->src == BD_SRC_VIEW && op->flat) {
				op->one = (struct iovec){ op->flat + (a->off - op->plan.aoff), a->len };
				op->sub.iov = &op->one;
				op->sub.iovcnt = 1;
			} else if (a->src == BD_SRC_VIEW) {
				op->sub.iovcnt = bd_iov_slice(orig->iov, orig->iovcnt,
							      a->off - op->plan.aoff, a->len,
							      op->piov, op->piov_cap);
				op->sub.iov = op->piov;
			} else if (a->src == BD_SRC_PAD) {
				op->one = (struct iovec){ op->pad + a->srcoff, a->len };
				op->sub.iov = &op->one;
				op->sub.iovcnt = 1;
			} else if (a->src == BD_SRC_ZEROS) {
				if (op->zbuf_len < a->len) {
					free(op->zeros);
					op->zbuf_len = 0;
					if (!(op->zeros = calloc(1, a->len))) {
						op->ret = -ENOMEM;
						op->err_group = a->group;
						in_cb = false;
						break;
					}
					op->zbuf_len = a->len;
				}
				op->one = (struct iovec){ op->zeros, a->len };
				op->sub.iov = &op->one;
				op->sub.iovcnt = 1;
			}
			qsm_io_submit(b->inner, &op->sub);
			return;
		}
		}
	}
	int ret = op->ret;
	bd_op_free(op);
	if (!in_cb) {
		qsm_io_defer_complete_(&b->c.io, orig, ret);
		return;
	}
	qsm_io_enter_(&b->c.io);
	qsm_io_complete_(&b->c.io, orig, ret);
	qsm_io_leave_(&b->c.io); /* may close b: not touched after this */
}

static void bd_op_sub_cb(struct qsm_io_req *sub, int ret)
{
	struct bd_op *op = container_of(sub, struct bd_op, sub);
	if (ret < 0 && !op->ret) {
		op->ret = ret;
		op->err_group = op->plan.a[op->next - 1].group;
	}
	bd_op_run(op, true);
}

/* The operation after its events: planned and run, or forwarded. */
static void bd_go(struct bd_io *b, struct qsm_io_req *req)
{
	bool imm = false;
	int err = 0;

	if (req->op == QSM_IO_READ || req->op == QSM_IO_WRITE || req->op == QSM_IO_ZERO ||
	    req->op == QSM_IO_DISCARD) {
		struct bd_op *op = calloc(1, sizeof(*op));
		if (!op) {
			qsm_io_defer_complete_(&b->c.io, req, -ENOMEM);
			return;
		}
		if (bd_plan(&op->plan, b->bd, req->op, req->offset, req->len) < 0)
			goto nomem_op;
		op->orig = req;
		op->b = b;
		if ((req->op == QSM_IO_READ || req->op == QSM_IO_WRITE) && op->plan.padded &&
		    !(op->flat = malloc(op->plan.aend - op->plan.aoff)))
			goto nomem_op;
		if (req->op == QSM_IO_ZERO && op->plan.padded &&
		    !(op->pad = calloc(1, op->plan.pad_len)))
			goto nomem_op;
		if (req->iovcnt && !(op->piov = calloc((size_t)req->iovcnt, sizeof(*op->piov))))
			goto nomem_op;
		op->piov_cap = req->iovcnt;
		bd_op_run(op, false);
		return;
nomem_op:
		bd_op_free(op);
		qsm_io_defer_complete_(&b->c.io, req, -ENOMEM);
		return;
	}
	if (req->op == QSM_IO_FLUSH)
		err = bd_check(b->bd, 0, 0, BD_IO_FLUSH, &imm);
	else if (req->op == QSM_IO_PREALLOC) /* QEMU's nearest: a zero write */
		err = bd_check(b->bd, req->offset, req->len, BD_IO_WRITE_ZEROES, &imm);
	if (err) {
		/* Neither way is the operation done (QEMU's rule_check);
		 * both complete from the loop, never inline (invariant 1). */
		qsm_io_defer_complete_(&b->c.io, req, err);
		return;
	}
	struct bd_op *op = calloc(1, sizeof(*op));
	if (!op) {
		qsm_io_defer_complete_(&b->c.io, req, -ENOMEM);
		return;
	}
	/* One action, the operation itself. */
	op->orig = req;
	op->b = b;
	op->sub = (struct qsm_io_req){
		.op = req->op, .event = req->event, .offset = req->offset, .len = req->len,
		.cb = bd_op_sub_cb,
	};
	bd_plan_add(&op->plan, (struct bd_act){ .kind = BD_A_SKIP });
	if (op->plan.nomem) {
		bd_op_free(op);
		qsm_io_defer_complete_(&b->c.io, req, -ENOMEM);
		return;
	}
	op->next = 1;
	qsm_io_submit(b->inner, &op->sub);
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

/* Blocking calls: events, the same plan run with the wrapped handle's
 * blocking calls, never held (a breakpoint would wait on a loop that
 * does not run). */
static int bd_sync_run(struct bd_io *b, enum qsm_io_event ev, enum qsm_io_op op, char *buf,
		       size_t len, uint64_t off)
{
	struct qsm_blkdebug *bd = b->bd;
	struct bd_plan p = { 0 };
	char *flat = buf;
	int ret = 0;
	unsigned err_group = 0;

	bd_raise(bd, ev, NULL, BD_RAISE_NO_SUSPEND);
	if (bd_plan(&p, bd, op, off, len) < 0) {
		free(p.a);
		return -ENOMEM;
	}
	if (p.padded && !(flat = malloc(p.aend - p.aoff))) {
		free(p.a);
		return -ENOMEM;
	}
	for (size_t i = 0; i < p.n; i++) {
		struct bd_act *a = &p.a[i];
		bool imm;
		if (ret && !(a->always && a->group == err_group))
			continue;
		int r = 0;
		switch (a->kind) {
		case BD_A_EVENT:
			bd_raise_idx(bd, a->event, NULL, BD_RAISE_NO_SUSPEND);
			break;
		case BD_A_COPY_IN:
			memcpy(flat + p.head, buf, len);
			break;
		case BD_A_COPY_OUT:
			memcpy(buf, flat + p.head, len);
			break;
		case BD_A_IO:
			assert(a->src == BD_SRC_VIEW);
			if (!(r = bd_check(bd, a->off, a->len, a->iotype, &imm))) {
				char *at = flat + (a->off - p.aoff);
				r = a->op == QSM_IO_READ ? qsm_io_pread_sync(b->inner, at, a->len, a->off)
							 : qsm_io_pwrite_sync(b->inner, at, a->len,
									      a->off);
			}
			break;
		default:
			assert(0);
		}
		if (r && !ret) {
			ret = r;
			err_group = a->group;
		}
	}
	if (flat != buf)
		free(flat);
	free(p.a);
	return ret;
}

static int bd_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	struct bd_io *b = bd_of(io);
	return bd_sync_run(b, io->sync_event, QSM_IO_READ, buf, len, off);
}

static int bd_pwrite_sync(struct qsm_io *io, const void *buf, size_t len, uint64_t off)
{
	struct bd_io *b = bd_of(io);
	/* Only read through buf's const-less alias (COPY_IN reads it). */
	return bd_sync_run(b, QSM_IO_EV_NONE, QSM_IO_WRITE, (char *)buf, len, off);
}

static int bd_flush_sync(struct qsm_io *io)
{
	struct bd_io *b = bd_of(io);
	bool imm;
	bd_raise(b->bd, QSM_IO_EV_FLUSH, NULL, BD_RAISE_NO_SUSPEND);
	int r = bd_check(b->bd, 0, 0, BD_IO_FLUSH, &imm);
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

/* Block status (a raw image's map): QEMU's blkdebug_co_block_status checks
 * the rules with iotype block-status on the aligned range. */
static int bd_extent(struct qsm_io *io, uint64_t off, uint64_t len, bool *data, uint64_t *run)
{
	struct bd_io *b = bd_of(io);
	uint64_t a = bd_req_align(b->bd), aoff = off / a * a;
	bool imm;
	int r = bd_check(b->bd, aoff, (off + len + a - 1) / a * a - aoff, BD_IO_BLOCK_STATUS, &imm);
	return r ? r : qsm_io_extent(b->inner, off, len, data, run);
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
		struct bd_op *op = s->op;
		free(s->tag);
		free(s);
		bool still = false;
		for (struct bd_susp *o = bd->susp; o; o = o->next)
			still |= o->req == req;
		if (still)
			return true;
		if (op) {
			bd_op_run(op, false);
			return true;
		}
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
