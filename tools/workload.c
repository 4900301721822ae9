/*
 * tools/workload.c: the workload engine and its oracles (see workload.h for
 * the contract; tools/fuzz.c drives it on sim disks with crashes and
 * faults).
 *
 * Invariants of struct wl:
 *  1. clock only grows; every submission and every completion the guest
 *     hears takes a new tick, so times of distinct events differ.
 *  2. t_done == WL_NEVER until the request's callback ran before w->stopped;
 *     once stopped, callbacks only count down w->pending.
 *  3. A request submitted before settled_at completed before it, and
 *     view[] holds what the image returned for the bytes it touched.
 *  4. Applies (accepted ones) are ordered by t_sub, and each completed
 *     before the next was submitted (one snapshot operation at a time).
 */
#include <errno.h>
#include <event2/event.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "io/sim.h"
#include "io/util.h"
#include "metadata/check.h"
#include "tools/workload.h"

static const char *const kind_names[WL__KINDS] = { "write", "read", "zero", "discard", "flush",
						    "compressed", "snapshot", "snapshot-delete",
						    "snapshot-apply" };

const char *wl_kind_name(enum wl_kind k)
{
	return k < WL__KINDS ? kind_names[k] : "?";
}

const char *wl_snapshot_name(uint64_t tag, char *buf, size_t len)
{
	snprintf(buf, len, "wl%" PRIu64, tag);
	return buf;
}

uint8_t wl_pattern(int id, uint64_t x)
{
	uint64_t h = x * 0x9E3779B97F4A7C15ull ^ ((uint64_t)id + 1) * 0xC2B2AE3D27D4EB4Full;
	h ^= h >> 29;
	h *= 0xBF58476D1CE4E5B9ull;
	h ^= h >> 32;
	return (uint8_t)h;
}

static inline bool is_data_write(enum wl_kind k)
{
	return k == WL_WRITE || k == WL_COMPRESSED;
}

bool wl_writes(enum wl_kind k)
{
	return is_data_write(k) || k == WL_ZERO || k == WL_DISCARD;
}

uint8_t wl_value(const struct wl_op *o, int id, uint64_t x)
{
	if (!is_data_write(o->kind))
		return 0;
	/* Compressible data: the pattern in runs of 64 equal bytes (about
	 * 10:1 with deflate), still different per request and place. */
	bool runs = (o->kind == WL_COMPRESSED) != !!(o->flags & WL_DATA_OTHER);
	return wl_pattern(id, runs ? x & ~63ull : x);
}

static bool sets_data(const struct wl_op *o, const struct wl_state *s)
{
	return s->submitted && s->eff_len && wl_writes(o->kind);
}

static inline bool covers(const struct wl_state *s, uint64_t x)
{
	return s->eff_off <= x && x < s->eff_off + s->eff_len;
}

void wl_note_error(struct wl *w, const char *fmt, ...)
{
	if (w->op_errors++ == 0) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(w->first_error, sizeof(w->first_error), fmt, ap);
		va_end(ap);
	}
}

void wl_violation(struct wl *w, const char *fmt, ...)
{
	if (w->violations++ == 0) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(w->first_violation, sizeof(w->first_violation), fmt, ap);
		va_end(ap);
	}
}

/* --- set-up ------------------------------------------------------------------ */

int wl_init(struct wl *w, const struct wl_op *ops, int nops, const struct wl_params *p)
{
	memset(w, 0, sizeof(*w));
	w->p = *p;
	w->ops = ops;
	w->nops = nops;
	w->st = calloc((size_t)QSM_MAX(nops, 1), sizeof(*w->st));
	w->init = calloc(1, p->size ? p->size : 1);
	if (!w->st || !w->init) {
		wl_fini(w);
		return -ENOMEM;
	}
	for (int i = 0; i < nops; i++) {
		const struct wl_op *o = &ops[i];
		struct wl_state *s = &w->st[i];
		s->w = w;
		s->id = i;
		s->t_done = WL_NEVER;
		s->eff_off = o->off;
		s->eff_len = wl_writes(o->kind) ? o->len : 0;
		if (o->kind == WL_DISCARD) {
			uint64_t a = QSM_ALIGN_UP(o->off, p->cluster);
			uint64_t b = QSM_ALIGN_DOWN(o->off + o->len, p->cluster);
			s->eff_off = a;
			s->eff_len = b > a ? b - a : 0;
			if (p->discard_noop)
				s->eff_len = 0; /* v2 cannot hide the backing data: no-op */
		}
		if (is_data_write(o->kind) || o->kind == WL_READ) {
			s->buf = malloc(o->len ? o->len : 1);
			if (!s->buf) {
				wl_fini(w);
				return -ENOMEM;
			}
			if (is_data_write(o->kind))
				for (uint64_t x = 0; x < o->len; x++)
					s->buf[x] = wl_value(o, i, o->off + x);
			uint64_t a = QSM_MIN(o->split_a, o->len), b = QSM_MIN(QSM_MAX(o->split_b, a), o->len);
			bool all = o->flags & WL_IOV_KEEP_EMPTY;
			int n = 0;
			if (a || all) s->iov[n++] = (struct iovec){ s->buf, a };
			if (b > a || all) s->iov[n++] = (struct iovec){ s->buf + a, b - a };
			if (o->len > b || all) s->iov[n++] = (struct iovec){ s->buf + b, o->len - b };
			s->iovcnt = n;
		}
	}
	return 0;
}

void wl_fini(struct wl *w)
{
	if (w->st)
		for (int i = 0; i < w->nops; i++)
			free(w->st[i].buf);
	free(w->st);
	free(w->init);
	free(w->view);
	w->st = NULL;
	w->init = w->view = NULL;
}

const uint8_t *wl_view(const struct wl *w)
{
	return w->view ? w->view : w->init;
}

/* --- the read oracle ----------------------------------------------------------- */

/* The requests that may have set a byte of [off, off + len) since the last
 * settle, into cand (room for nops).  Their count. */
static int candidates(const struct wl *w, uint64_t off, uint64_t len, int *cand)
{
	int n = 0;
	for (int i = 0; i < w->nops; i++) {
		const struct wl_state *s = &w->st[i];
		if (sets_data(&w->ops[i], s) && s->t_sub >= w->settled_at &&
		    s->eff_off < off + len && off < s->eff_off + s->eff_len)
			cand[n++] = i;
	}
	return n;
}

/*
 * The read oracle works on queries: a read of the disk that ended at t_done
 * and started at t_sub, in the epoch chosen at time `at` (its submission;
 * a snapshot's disk is a query with the create's times swapped, see
 * snap_query).  An epoch is named by the accepted apply that began it, or
 * -1 for the disk before any.  write_hi: plain writes submitted before it
 * are candidates too (a snapshot's: those beside the create, which may
 * have run in place before its commit); 0 for a read.
 */
struct query {
	uint64_t at, t_sub, t_done, write_hi;
};

/* The disk a create took: every request completed before it was submitted
 * is in it (they all completed before it did: its drain), and of the plain
 * writes beside it, those that completed before it (in place before its
 * commit), and perhaps some of the others in part (the runs they wrote in
 * place before one had to wait for it). */
static struct query snap_query(const struct wl_state *c)
{
	return (struct query){ .at = c->t_sub, .t_sub = c->t_done, .t_done = c->t_sub,
			       .write_hi = c->t_done };
}

/* One judgement: the requests that may set the bytes judged (cand, a
 * superset: byte_ok tests coverage) and the accepted applies in order. */
struct judge {
	const struct wl *w;
	const int *cand;
	int nc;
	int *ap;
	int na;
};

static bool succeeded(const struct wl_state *s)
{
	return s->t_done != WL_NEVER && s->ret == 0;
}

static void judge_init(struct judge *j, const struct wl *w, const int *cand, int nc)
{
	j->w = w;
	j->cand = cand;
	j->nc = nc;
	j->ap = malloc(sizeof(int) * (size_t)QSM_MAX(w->nops, 1));
	if (!j->ap)
		abort();
	j->na = 0;
	for (int i = 0; i < w->nops; i++)
		if (w->ops[i].kind == WL_SNAPSHOT_APPLY && w->st[i].accepted)
			j->ap[j->na++] = i;
}

static void judge_fini(struct judge *j)
{
	free(j->ap);
}

/* The last accepted apply submitted before time t, or -1. */
static int apply_before(const struct judge *j, uint64_t t)
{
	int e = -1;
	for (int k = 0; k < j->na && j->w->st[j->ap[k]].t_sub < t; k++)
		e = j->ap[k];
	return e;
}

/* The submission of the first accepted apply at or after time t (a
 * request submitted after it runs after whatever was submitted before t
 * completed), or WL_NEVER. */
static uint64_t barrier_after(const struct judge *j, uint64_t t)
{
	for (int k = 0; k < j->na; k++)
		if (j->w->st[j->ap[k]].t_sub >= t)
			return j->w->st[j->ap[k]].t_sub;
	return WL_NEVER;
}

/* The epochs a query at time `at` may see, latest first, into ep (room for
 * na + 1): the last apply before it, and while that one failed (it may not
 * have taken effect), the one before, down to -1.  Their count. */
static int epochs_at(const struct judge *j, uint64_t at, int *ep)
{
	int n = 0, e = apply_before(j, at);
	for (;;) {
		ep[n++] = e;
		if (e < 0 || succeeded(&j->w->st[e]))
			return n;
		e = apply_before(j, j->w->st[e].t_sub);
	}
}

/* The WL_SNAPSHOT op an accepted apply `e` applied (wl_run accepts an apply
 * only after its create succeeded). */
static int apply_source(const struct wl *w, int e)
{
	for (int i = 0; i < e; i++)
		if (w->ops[i].kind == WL_SNAPSHOT && w->ops[i].off == w->ops[e].off)
			return i;
	abort();
}

static bool byte_ok(const struct judge *j, int e, const struct query *q, uint64_t x, uint8_t v);

/* May the base of epoch e (the view for -1, else the applied snapshot's
 * disk) hold v at x? */
static bool base_ok(const struct judge *j, int e, uint64_t x, uint8_t v)
{
	if (e < 0)
		return v == wl_view(j->w)[x];
	struct query q = snap_query(&j->w->st[apply_source(j->w, e)]);
	int ep[j->na + 1];
	int n = epochs_at(j, q.at, ep);
	for (int k = 0; k < n; k++)
		if (byte_ok(j, ep[k], &q, x, v))
			return true;
	return false;
}

/*
 * The read oracle for one byte, in epoch e: may query q see v at x?
 * Candidates are the write-like requests covering x submitted in the
 * epoch's window (after the apply that began it, before q ended and before
 * the next apply at or after q.at: that one waits for q and holds back what
 * comes after; plain writes up to q.write_hi when that is later), minus
 * those overwritten for sure: W is out when a
 * successful W2 covering x was submitted after W completed and completed
 * before q was submitted.  The epoch's base is a candidate until a
 * successful request covering x completed before q was submitted.
 */
static bool byte_ok(const struct judge *j, int e, const struct query *q, uint64_t x, uint8_t v)
{
	const struct wl *w = j->w;
	uint64_t lo = e < 0 ? 0 : w->st[e].t_sub;
	uint64_t barrier = barrier_after(j, q->at);
	uint64_t hi = QSM_MIN(q->t_done, barrier);
	uint64_t write_hi = QSM_MIN(QSM_MAX(q->write_hi, q->t_done), barrier);
	/* The latest submission among successful writes covering x that
	 * completed before q started: everything completed before it is
	 * overwritten. */
	uint64_t floor_sub = 0;
	bool base = true;
	for (int k = 0; k < j->nc; k++) {
		const struct wl_state *s = &w->st[j->cand[k]];
		uint64_t h = w->ops[j->cand[k]].kind == WL_WRITE ? write_hi : hi;
		if (!covers(s, x) || s->t_sub <= lo || s->t_sub >= h || s->t_done >= q->t_sub ||
		    s->ret)
			continue;
		base = false;
		floor_sub = QSM_MAX(floor_sub, s->t_sub);
	}
	for (int k = 0; k < j->nc; k++) {
		const struct wl_state *s = &w->st[j->cand[k]];
		uint64_t h = w->ops[j->cand[k]].kind == WL_WRITE ? write_hi : hi;
		if (!covers(s, x) || s->t_sub <= lo || s->t_sub >= h)
			continue;
		if (s->t_done != WL_NEVER && s->t_done < floor_sub)
			continue;
		if (wl_value(&w->ops[j->cand[k]], j->cand[k], x) == v)
			return true;
	}
	return base && base_ok(j, e, x, v);
}

/* Judge bytes [off, off + len) read as got[] by query q: all of them in
 * one of the epochs q may see.  The offset of the first wrong one (in the
 * latest epoch), or -1. */
static int64_t judge_read(const struct wl *w, uint64_t off, uint64_t len, const uint8_t *got,
			  const struct query *q, bool every_byte)
{
	int *cand = malloc(sizeof(int) * (size_t)QSM_MAX(w->nops, 1));
	if (!cand)
		abort();
	struct judge j;
	judge_init(&j, w, cand, candidates(w, off, len, cand));
	int ep[j.na + 1];
	int nep = epochs_at(&j, q->at, ep);
	int64_t first_bad = -1;
	/* Every byte of short reads, a spread of long ones (and both ends). */
	uint64_t step = len > 4096 && !every_byte ? 61 : 1;
	for (int k = 0; k < nep; k++) {
		int64_t bad = -1;
		for (uint64_t d = 0; d < len; d += step) {
			if (!byte_ok(&j, ep[k], q, off + d, got[d])) {
				bad = (int64_t)d;
				break;
			}
			if (d + step >= len && d != len - 1)
				d = len - 1 - step;
		}
		if (bad < 0) {
			first_bad = -1;
			break;
		}
		if (k == 0)
			first_bad = bad;
	}
	judge_fini(&j);
	free(cand);
	return first_bad;
}

static void check_read(struct wl *w, int id)
{
	const struct wl_op *o = &w->ops[id];
	const struct wl_state *s = &w->st[id];
	struct query q = { .at = s->t_sub, .t_sub = s->t_sub, .t_done = s->t_done };
	int64_t d = judge_read(w, o->off, o->len, s->buf, &q, w->p.read_every_byte);
	if (d >= 0)
		wl_violation(w, "op %d read %#" PRIx64 "+%" PRIu64 " returned byte %#" PRIx64
			  " = %#x: neither the initial content nor any write that could be "
			  "the last there", id, o->off, o->len, o->off + (uint64_t)d, s->buf[d]);
}

/* --- running ------------------------------------------------------------------- */

static void op_cb(void *opaque, int ret)
{
	struct wl_state *s = opaque;
	struct wl *w = s->w;
	const struct wl_op *o = &w->ops[s->id];
	w->pending--;
	if (w->stopped)
		return; /* after the crash: the guest never heard of it */
	s->ret = ret;
	s->t_done = ++w->clock;
	if (wl_is_snapshot(o->kind))
		w->snap_pending--;
	if (ret)
		wl_note_error(w, "op %d (%s %#" PRIx64 "+%" PRIu64 ") failed: %s%s%s", s->id,
			  wl_kind_name(o->kind), o->off, o->len, qsm_strerror(ret),
			  s->err[0] ? ": " : "", s->err);
	if (o->kind == WL_READ && !ret)
		check_read(w, s->id);
	/* The sticky error: after a failed metadata write, later writes fail
	 * with -EIO and reads still work. */
	if (w->meta_fail && s->t_sub > w->meta_fail) {
		if (wl_writes(o->kind) && ret != -EIO)
			wl_violation(w, "op %d %s %#" PRIx64 "+%" PRIu64 " submitted after the failed %s "
				  "write returns %s, not -EIO (sticky error)", s->id,
				  wl_kind_name(o->kind), o->off, o->len,
				  qsm_io_event_name(w->meta_fail_ev), ret ? qsm_strerror(ret) : "success");
		else if (o->kind == WL_READ && ret && !w->read_faults)
			wl_violation(w, "op %d read %#" PRIx64 "+%" PRIu64 " fails (%s) after the failed %s "
				  "write: reads must still work", s->id, o->off, o->len,
				  qsm_strerror(ret), qsm_io_event_name(w->meta_fail_ev));
		else if (o->kind == WL_FLUSH && !ret && w->p.cache != QSM_CACHE_UNSAFE)
			wl_violation(w, "op %d flush succeeds after the failed %s write", s->id,
				  qsm_io_event_name(w->meta_fail_ev));
	}
}

static int submit(struct wl *w, struct qsm_image *img, int i)
{
	const struct wl_op *o = &w->ops[i];
	struct wl_state *s = &w->st[i];
	s->submitted = true;
	s->t_sub = ++w->clock;
	w->pending++;
	if (o->kind == WL_READ)
		memset(s->buf, 0xee, o->len);
	switch (o->kind) {
	case WL_WRITE: return qsm_writev(img, o->off, s->iov, s->iovcnt, op_cb, s);
	case WL_READ: return qsm_readv(img, o->off, s->iov, s->iovcnt, op_cb, s);
	case WL_ZERO:
		return qsm_write_zeroes(img, o->off, o->len, o->flags & ~(WL_DATA_OTHER | WL_IOV_KEEP_EMPTY),
					op_cb, s);
	case WL_DISCARD: return qsm_discard(img, o->off, o->len, op_cb, s);
	case WL_COMPRESSED: return qsm_write_compressed(img, o->off, s->iov, s->iovcnt, op_cb, s);
	case WL_SNAPSHOT:
	case WL_SNAPSHOT_DELETE:
	case WL_SNAPSHOT_APPLY: {
		char name[32];
		int ret;
		wl_snapshot_name(o->off, name, sizeof(name));
		w->snap_pending++;
		if (o->kind == WL_SNAPSHOT)
			ret = qsm_snapshot_create_async(img, name, NULL, s->err, sizeof(s->err), op_cb, s);
		else if (o->kind == WL_SNAPSHOT_DELETE)
			ret = qsm_snapshot_delete_async(img, name, s->err, sizeof(s->err), op_cb, s);
		else
			ret = qsm_snapshot_apply_async(img, name, s->err, sizeof(s->err), op_cb, s);
		if (ret)
			w->snap_pending--; /* refused: op_cb is called by the caller */
		s->accepted = ret == 0;
		return ret;
	}
	default: return qsm_flush(img, op_cb, s);
	}
}

/* Did an op before i take the snapshot the delete or apply op i names (and,
 * for an apply, no delete of it taken by the engine come before)? */
static bool snapshot_taken(const struct wl *w, int i)
{
	bool taken = false;
	for (int k = 0; k < i; k++) {
		if (w->ops[k].off != w->ops[i].off)
			continue;
		if (w->ops[k].kind == WL_SNAPSHOT && succeeded(&w->st[k]))
			taken = true;
		else if (w->ops[k].kind == WL_SNAPSHOT_DELETE && w->st[k].accepted &&
			 w->ops[i].kind == WL_SNAPSHOT_APPLY)
			return false;
	}
	return taken;
}

int wl_run(struct wl *w, struct qsm_image *img, int from, int to, int depth)
{
	struct event_base *base = qsm_image_base(img);
	int next = from;
	while (!w->stopped && (next < to || w->pending)) {
		while (!w->stopped && next < to && w->pending < depth) {
			/* One snapshot operation at a time: the next waits. */
			if (wl_is_snapshot(w->ops[next].kind) && w->snap_pending)
				break;
			int i = next++;
			if ((w->ops[i].kind == WL_SNAPSHOT_DELETE ||
			     w->ops[i].kind == WL_SNAPSHOT_APPLY) && !snapshot_taken(w, i)) {
				/* Its create failed or is gone (shrinking), or it
				 * was deleted: nothing to delete or apply, the op is
				 * skipped. */
				struct wl_state *s = &w->st[i];
				s->submitted = true;
				s->t_sub = ++w->clock;
				s->t_done = ++w->clock;
				s->ret = -ECANCELED;
				continue;
			}
			int ret = submit(w, img, i);
			if (ret) {
				if (!w->p.faults && !w->meta_fail)
					wl_violation(w, "submitting op %d (%s) fails: %s", i,
						  wl_kind_name(w->ops[i].kind), qsm_strerror(ret));
				/* Refused at submit: the same as a callback with ret. */
				if (wl_is_snapshot(w->ops[i].kind))
					w->snap_pending++; /* op_cb counts it off */
				op_cb(&w->st[i], ret);
			} else if (w->st[i].t_done != WL_NEVER) {
				wl_violation(w, "op %d (%s) completed inside its submission", i,
					  wl_kind_name(w->ops[i].kind));
			}
		}
		if (w->pending && event_base_loop(base, EVLOOP_ONCE) == 1) {
			wl_violation(w, "hang: %d requests never complete, the loop has no events left%s%s",
				  w->pending, w->meta_fail ? " after a failed metadata write: " : "",
				  w->meta_fail ? qsm_io_event_name(w->meta_fail_ev) : "");
			return -EDEADLK;
		}
	}
	return 0;
}

void wl_note_sync(struct wl *w)
{
	w->sync_at = ++w->clock;
}

void wl_note_meta_fail(struct wl *w, enum qsm_io_event ev)
{
	if (w->meta_fail)
		return;
	w->meta_fail = ++w->clock;
	w->meta_fail_ev = ev;
}

/* --- settling ------------------------------------------------------------------ */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

int wl_settle(struct wl *w, struct qsm_image *img)
{
	int ret = 0;
	if (w->pending) {
		wl_violation(w, "settle with %d requests in flight", w->pending);
		return -EBUSY;
	}
	for (int i = 0; i < w->nops; i++)
		if (w->ops[i].kind == WL_SNAPSHOT_APPLY && w->st[i].submitted) {
			wl_violation(w, "settle after a snapshot apply (op %d): not supported", i);
			return -ENOTSUP;
		}
	if (!w->view) {
		w->view = malloc(w->p.size ? w->p.size : 1);
		if (!w->view)
			abort();
		memcpy(w->view, w->init, w->p.size);
	}
	/* The ranges touched since the last settle, as (start, end) pairs
	 * sorted by start, then merged: each byte is read once. */
	uint64_t (*rg)[2] = malloc(sizeof(*rg) * (size_t)QSM_MAX(w->nops, 1));
	if (!rg)
		abort();
	size_t n = 0;
	for (int i = 0; i < w->nops; i++) {
		const struct wl_op *o = &w->ops[i];
		const struct wl_state *s = &w->st[i];
		if (s->submitted && s->t_sub >= w->settled_at && wl_writes(o->kind) && o->len) {
			rg[n][0] = o->off;
			rg[n++][1] = o->off + o->len;
		}
	}
	qsort(rg, n, sizeof(*rg), cmp_u64);
	uint64_t now = ++w->clock;
	for (size_t i = 0; i < n && !ret;) {
		uint64_t a = rg[i][0], b = rg[i][1];
		for (i++; i < n && rg[i][0] <= b; i++)
			b = QSM_MAX(b, rg[i][1]);
		uint8_t *got = malloc(b - a);
		if (!got)
			abort();
		ret = qsm_sync_pread(img, got, b - a, a);
		if (ret < 0) {
			wl_violation(w, "reading back %#" PRIx64 "+%" PRIu64 " fails: %s (%s)", a, b - a,
				  qsm_strerror(ret), qsm_image_error(img));
		} else {
			struct query q = { .at = now, .t_sub = now, .t_done = now };
			int64_t d = judge_read(w, a, b - a, got, &q, true);
			if (d >= 0)
				wl_violation(w, "byte %#" PRIx64 " reads back as %#x after the requests "
					  "completed: neither the content before them nor any write that "
					  "could be the last there", a + (uint64_t)d, got[d]);
			memcpy(w->view + a, got, b - a);
		}
		free(got);
	}
	free(rg);
	w->settled_at = ++w->clock;
	return ret;
}

/* --- durability ---------------------------------------------------------------- */

/* wl_check_durable in epoch e (see workload.h): the requests submitted
 * after the apply that began it, on its base (the initial content for -1). */
static bool durable_in_epoch(const struct wl *w, const struct judge *j, int e, const uint8_t *disk,
			     char *msg, size_t msglen)
{
	size_t n = (size_t)w->nops;
	const struct wl_op *ops = w->ops;
	bool wt = w->p.cache == QSM_CACHE_WRITETHROUGH || w->p.cache == QSM_CACHE_DIRECTSYNC;
	bool unsafe = w->p.cache == QSM_CACHE_UNSAFE;
	uint64_t lo_sub = e < 0 ? 0 : w->st[e].t_sub;
	uint64_t flush_sub = 0;
	for (size_t i = 0; i < n; i++) {
		const struct wl_state *s = &w->st[i];
		/* A snapshot operation's full write-back syncs what completed
		 * before it, as a flush does. */
		if ((ops[i].kind == WL_FLUSH || wl_is_snapshot(ops[i].kind)) && s->t_done != WL_NEVER &&
		    s->ret == 0)
			flush_sub = QSM_MAX(flush_sub, s->t_sub);
	}
	bool *durable = calloc(n + 1, sizeof(bool));
	bool *in_win = calloc(n + 1, sizeof(bool));
	uint64_t *bounds = malloc(sizeof(uint64_t) * (2 * n + 2));
	int *cand = malloc(sizeof(int) * (n + 1));
	int *cov = malloc(sizeof(int) * (n + 1));
	if (!durable || !in_win || !bounds || !cand || !cov)
		abort();
	size_t nb = 0;
	bounds[nb++] = 0;
	bounds[nb++] = w->p.size;
	for (size_t i = 0; i < n; i++) {
		const struct wl_state *s = &w->st[i];
		if (!sets_data(&ops[i], s))
			continue;
		in_win[i] = s->t_sub > lo_sub;
		durable[i] = in_win[i] && s->t_done != WL_NEVER && s->ret == 0 &&
			     (s->t_done < w->sync_at || wt || (!unsafe && s->t_done < flush_sub) ||
			      w->claim_all_durable);
		bounds[nb++] = s->eff_off;
		bounds[nb++] = s->eff_off + s->eff_len;
	}
	qsort(bounds, nb, sizeof(*bounds), cmp_u64);
	/* The base of an apply's epoch: judged through the requests covering
	 * the segment (all of them: the snapshot's disk is older). */
	struct judge bj = *j;
	bj.cand = cov;
	bool ok = true;
	for (size_t b = 0; b + 1 < nb && ok; b++) {
		uint64_t lo = bounds[b], hi = bounds[b + 1];
		if (lo == hi)
			continue;
		uint64_t T = 0;
		int tby = -1, ncov = 0;
		for (size_t i = 0; i < n; i++) {
			const struct wl_state *s = &w->st[i];
			if (sets_data(&ops[i], s) && s->eff_off <= lo && hi <= s->eff_off + s->eff_len)
				cov[ncov++] = (int)i;
			if (durable[i] && s->eff_off <= lo && hi <= s->eff_off + s->eff_len && s->t_sub > T)
				T = s->t_sub, tby = (int)i;
		}
		bj.nc = ncov;
		int nc = 0;
		bool zero_ok = false, init_ok = tby < 0;
		for (int k = 0; k < ncov; k++) {
			size_t i = (size_t)cov[k];
			const struct wl_state *s = &w->st[i];
			if (!in_win[i])
				continue;
			if (s->t_done != WL_NEVER && s->t_done < T)
				continue; /* overwritten by a durable request */
			if (is_data_write(ops[i].kind))
				cand[nc++] = (int)i;
			else
				zero_ok = true;
		}
		/* The common cases in bulk: untouched, or wholly one write.  No
		 * request covers the segment: every snapshot holds the initial
		 * content there too. */
		if (init_ok && (e < 0 || !ncov) && !memcmp(disk + lo, w->init + lo, hi - lo))
			continue;
		if (nc == 1 && !zero_ok && !init_ok &&
		    !memcmp(disk + lo, w->st[cand[0]].buf + (lo - ops[cand[0]].off), hi - lo))
			continue;
		for (uint64_t x = lo; x < hi; x++) {
			uint8_t v = disk[x];
			if ((zero_ok && v == 0) ||
			    (init_ok && (e < 0 ? v == w->init[x] : base_ok(&bj, e, x, v))))
				continue;
			int k;
			for (k = 0; k < nc && wl_value(&ops[cand[k]], cand[k], x) != v; k++)
				;
			if (k < nc)
				continue;
			int len = snprintf(msg, msglen, "byte %#" PRIx64 " reads %#x", x, v);
			for (size_t i = 0; i < n && len > 0 && (size_t)len < msglen; i++) {
				const struct wl_op *o = &ops[i];
				if (is_data_write(o->kind) && w->st[i].submitted && o->off <= x &&
				    x < o->off + o->len && wl_value(o, (int)i, x) == v) {
					len += snprintf(msg + len, msglen - (size_t)len,
							" (from op %zu write %#" PRIx64 "+%" PRIu64 ")", i,
							o->off, o->len);
					break;
				}
			}
			if (v == w->init[x] && len > 0 && (size_t)len < msglen)
				len += snprintf(msg + len, msglen - (size_t)len, " (the initial content)");
			if (tby >= 0 && len > 0 && (size_t)len < msglen) {
				const struct wl_op *d = &ops[tby];
				len += snprintf(msg + len, msglen - (size_t)len,
						"; durable: op %d %s %#" PRIx64 "+%" PRIu64, tby,
						wl_kind_name(d->kind), d->off, d->len);
			}
			if (len > 0 && (size_t)len < msglen)
				len += snprintf(msg + len, msglen - (size_t)len, "; %d candidate writes%s%s",
						nc, zero_ok ? " or zeros" : "",
						init_ok ? (e < 0 ? " or the initial content"
								 : " or the applied snapshot's content")
							: "");
			if (e >= 0 && len > 0 && (size_t)len < msglen)
				snprintf(msg + len, msglen - (size_t)len, " (in the epoch of op %d apply)", e);
			ok = false;
			break;
		}
	}
	free(cov);
	free(cand);
	free(bounds);
	free(in_win);
	free(durable);
	return ok;
}

/* An apply that succeeded is durable when its callback runs (a full
 * write-back, each step synced), but not with cache=unsafe before a sync. */
static bool apply_durable(const struct wl *w, int e)
{
	const struct wl_state *s = &w->st[e];
	return succeeded(s) && (w->p.cache != QSM_CACHE_UNSAFE || s->t_done < w->sync_at);
}

bool wl_check_durable(const struct wl *w, const uint8_t *disk, char *msg, size_t msglen)
{
	struct judge j;
	judge_init(&j, w, NULL, 0);
	/* The epochs the disk may be in: the last durable apply's (or the
	 * first), and every later accepted apply's. */
	int first = 0;
	for (int k = 0; k < j.na; k++)
		if (apply_durable(w, j.ap[k]))
			first = k + 1;
	bool ok = false;
	for (int k = j.na; k >= first && !ok; k--) {
		int e = k ? j.ap[k - 1] : -1;
		char m[400];
		ok = durable_in_epoch(w, &j, e, disk, k == j.na ? msg : m, k == j.na ? msglen : sizeof(m));
	}
	if (!ok && j.na > first) {
		size_t len = strlen(msg);
		if (len < msglen)
			snprintf(msg + len, msglen - len, "; nor in the %d epochs before it", j.na - first);
	}
	judge_fini(&j);
	return ok;
}

bool wl_check_snapshot(const struct wl *w, int id, const uint8_t *snap, char *msg, size_t msglen)
{
	struct query q = snap_query(&w->st[id]);
	int64_t d = judge_read(w, 0, w->p.size, snap, &q, false);
	if (d < 0)
		return true;
	snprintf(msg, msglen, "snapshot of op %d: byte %#" PRIx64 " reads %#x: neither the content "
		 "before nor a write submitted before the create (or beside it) that could be the last there",
		 id, (uint64_t)d, snap[d]);
	return false;
}

/* --- races --------------------------------------------------------------------- */

/* Two guest requests in flight together, a read and a write-like one,
 * that overlap: the workload itself races there. */
static bool guest_overlap_in_flight(const struct wl *w)
{
	for (int i = 0; i < w->nops; i++) {
		const struct wl_op *rd = &w->ops[i];
		const struct wl_state *a = &w->st[i];
		if (rd->kind != WL_READ || !a->submitted || a->t_done != WL_NEVER)
			continue;
		for (int j = 0; j < w->nops; j++) {
			const struct wl_op *o = &w->ops[j];
			const struct wl_state *b = &w->st[j];
			/* A compressed write of a cluster that does not shrink is an
			 * ordinary write, in place when the cluster is allocated. */
			if ((o->kind == WL_WRITE || o->kind == WL_ZERO || o->kind == WL_COMPRESSED) &&
			    b->submitted &&
			    b->t_done == WL_NEVER && o->off < rd->off + rd->len && rd->off < o->off + o->len)
				return true;
		}
	}
	return false;
}

/*
 * The sim saw a read of host bytes a write in flight changes.  Not the
 * engine's fault:
 *  - a guest read racing a guest write in place, which the workload asked for;
 *  - a compressed cluster read (whole sectors from its descriptor's offset,
 *    since the stream's length is not recorded) while another compressed
 *    cluster packed after it into the same sector is being written: the
 *    reader's stream ends before those bytes.  A write covering the reader's
 *    first byte would be a real race.
 */
void wl_sim_race_cb(void *opaque, const struct qsm_io_req *read, const struct qsm_io_req *write)
{
	struct wl *w = opaque;
	if (read->event == QSM_IO_EV_DATA_READ && write->event == QSM_IO_EV_DATA_WRITE &&
	    guest_overlap_in_flight(w))
		return;
	if (write->event == QSM_IO_EV_COMPRESSED_WRITE && write->offset > read->offset)
		return;
	if (w->races++ == 0)
		snprintf(w->first_race, sizeof(w->first_race),
			 "%s read %#" PRIx64 "+%" PRIu64 " while %s write %#" PRIx64 "+%" PRIu64
			 " was in flight", qsm_io_event_name(read->event), read->offset, read->len,
			 qsm_io_event_name(write->event), write->offset, write->len);
}

void wl_dump(const struct wl *w, FILE *f)
{
	for (int i = 0; i < w->nops; i++) {
		const struct wl_op *o = &w->ops[i];
		const struct wl_state *s = &w->st[i];
		fprintf(f, "  op %d %s%s %#" PRIx64 "+%" PRIu64 " flags %#x sub %" PRIu64 " done %" PRId64
			" ret %d\n", i, wl_kind_name(o->kind), s->submitted ? "" : " (not submitted)",
			o->off, o->len, o->flags, s->t_sub,
			s->t_done == WL_NEVER ? (int64_t)-1 : (int64_t)s->t_done, s->ret);
	}
}

/* --- the structural oracle ----------------------------------------------------- */

int wl_sim_check(struct qsm_sim *sim, struct qsm_check_result *res, char *err, size_t errlen)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	int ret = qsm_io_open_sim(b, sim, QSM_IO_RDONLY, &io);
	memset(res, 0, sizeof(*res));
	if (ret == 0) {
		ret = qsm_check_image(io, 0, res, NULL, err, errlen);
		qsm_io_close(io);
	} else {
		qsm_set_err(err, errlen, "opening the sim disk: %s", qsm_strerror(ret));
	}
	event_base_free(b);
	return ret < 0 ? -1 : qsm_check_exit_code(res);
}

bool wl_sim_dirty(struct qsm_sim *sim)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	uint8_t h[80] = { 0 };
	if (qsm_io_open_sim(b, sim, QSM_IO_RDONLY, &io) == 0) {
		(void)qsm_io_pread_sync(io, h, sizeof(h), 0);
		qsm_io_close(io);
	}
	event_base_free(b);
	return h[79] & 1; /* incompatible_features bit 0 */
}
