/*
 * sm/request.c: the request state machines and their one dispatcher.
 *
 * Design
 * ------
 * Every request (read, write, write-zeroes, discard, flush, block status, and
 * the internal write-back batch) is one `struct qsm_req` with a `state`.  The
 * machines are drawn in sm/states.def; `qsm graph` renders the same table.
 *
 *   read:   START > L1_LOOKUP > L2_LOOKUP (> L2_LOAD > L2_LOOKUP)
 *                 > DATA_READ | ZERO_FILL | BACKING_READ
 *                 > NEXT_RUN > (L1_LOOKUP ... | DONE)
 *   write:  START > L1_LOOKUP (> FROZEN | L2_ALLOC) > L2_LOOKUP (> L2_LOAD)
 *                 > DATA_WRITE                                  (in place)
 *                 | CLUSTER_ALLOC (> COW_READ) > ALLOC_WRITE > L2_UPDATE
 *                 | ALLOC_WAIT > L1_LOOKUP                      (overlap)
 *                 > NEXT_RUN > (L1_LOOKUP ... | DURABLE_WAIT | DONE)
 *
 * How a state change happens (the only way):
 *   qsm_sm_run(req, ev): next = table[machine][state][ev] (abort if absent),
 *   trace "req#id FROM --ev--> TO", check the request's invariants, then run
 *   the entry step of the new state.  A step returns the event that leaves
 *   the state at once, or QSM_E_WAIT when it started I/O or joined a waiter
 *   list; whoever finishes the wait posts the event with qsm_sm_post().
 *
 * Transition -> function
 *   START -> L1_LOOKUP ........... step_l1_lookup
 *   * -> L2_ALLOC ................ step_l2_alloc
 *   * -> L2_LOOKUP ............... step_l2_lookup (classify_read/_write/...)
 *   START -> (raw image) ......... raw_start, then DATA_READ/DATA_WRITE/FILE_RANGE
 *   * -> DATA_READ/DATA_WRITE .... step_data_io
 *   * -> FILE_RANGE .............. step_file_range
 *   * -> CLUSTER_ALLOC ........... step_cluster_alloc
 *   * -> BACKING_READ ............ step_backing_read
 *   * -> BACKING_STATUS .......... step_backing_status (write zeroes; one
 *                                  image of the chain per entry, probe_cb)
 *   * -> COW_READ ................ step_cow_read (cow_read_backing)
 *   * -> ALLOC_WRITE ............. step_alloc_write
 *   * -> L2_UPDATE ............... step_l2_update
 *   * -> ZERO_UPDATE ............. step_zero_update
 *   * -> NEXT_RUN ................ step_next_run
 *   * -> REFBLOCK_LOAD ........... qsm_rc_wait (the step's refcount call
 *                                  returned -EAGAIN; rc_waiter_cb resumes)
 *   * -> DURABLE_WAIT ............ qsm_wb_join (sm/writeback.c)
 *   WB_* ......................... qsm_wb_step (sm/writeback.c)
 *   CLOSE_* ...................... qsm_close_step (sm/image.c)
 *   * -> DONE .................... req_complete
 *
 * Invariants
 *  1. Steps never run re-entrantly: events are queued and the queue is
 *     drained by one loop (qsm_sm_drain), from a libevent callback.  A user
 *     callback therefore never runs from inside a submit call.
 *  2. Two requests never allocate the same guest cluster: a run that needs
 *     allocation first checks img->allocs; an overlapping run waits
 *     (ALLOC_WAIT) and looks up again, or, when the owner writes fresh
 *     clusters with no COW at all, writes its data into them at once
 *     (JOIN_WRITE) and completes only after the owner's L2 update
 *     (JOIN_WAIT); if the owner fails, so do its joiners.  The record lives from CLUSTER_ALLOC
 *     to L2_UPDATE, and L2_UPDATE runs only after the data write completed,
 *     so a lookup never sees an entry pointing at half-written data.  Reads
 *     need not wait: until L2_UPDATE they see the old entry, after it the
 *     complete new cluster.
 *  3. Only a write that must create an L2 table (empty L1 entry, or a table
 *     shared with an internal snapshot, which is copied) freezes others, and
 *     only those writing under the same L1 slot (FROZEN); since the table is
 *     created in the cache, the freeze lasts only while a cache slot is
 *     unavailable.
 *  4. A request holds at most one L2 table reference, and never while
 *     waiting for another table or a slot, so the cache cannot deadlock.
 *     Nor while waiting for a refcount block (REFBLOCK_LOAD), which it
 *     waits for without any allocation claim: the step that needed it runs
 *     again (L2_ALLOC, WB_RELEASE) or the run is classified again
 *     (L2_LOOKUP).  The blocks read for it stay pinned (req->rcw) until
 *     the step that needed them succeeds, or the request completes.
 *  5. Metadata changes are made in memory (cached L2 tables and refcount
 *     blocks, resident L1) and reach the disk only through write-back batches, which
 *     order them refcounts < L2 < L1 with a sync between levels
 *     (sm/writeback.c); freed clusters are released only after the tables
 *     that stopped pointing at them are durable, and after every data I/O
 *     that found them through the old entries has completed (submit_io
 *     notes the host range in flight: an in-place write landing late in a
 *     cluster handed to another allocation would overwrite its data).
 */
#include <assert.h>
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metadata/compress.h"
#include "metadata/l2entry.h"
#include "sm/sm.h"

/* --- the table ------------------------------------------------------------ */

static const unsigned char transitions[QSM_M__COUNT][QSM_S__COUNT][QSM_E__COUNT] = {
#define MACHINE(name, desc)
#define STATE(name, desc)
#define EVENT(name, label)
#define TRANSITION(m, from, ev, to) [QSM_M_##m][QSM_S_##from][QSM_E_##ev] = QSM_S_##to + 1,
#include "sm/states.def"
#undef MACHINE
#undef STATE
#undef EVENT
#undef TRANSITION
};

static const char *const state_names[] = {
#define MACHINE(name, desc)
#define STATE(name, desc) #name,
#define EVENT(name, label)
#define TRANSITION(m, from, ev, to)
#include "sm/states.def"
#undef MACHINE
#undef STATE
#undef EVENT
#undef TRANSITION
};
static const char *const state_descs[] = {
#define MACHINE(name, desc)
#define STATE(name, desc) desc,
#define EVENT(name, label)
#define TRANSITION(m, from, ev, to)
#include "sm/states.def"
#undef MACHINE
#undef STATE
#undef EVENT
#undef TRANSITION
};
static const char *const event_names[] = {
#define MACHINE(name, desc)
#define STATE(name, desc)
#define EVENT(name, label) #name,
#define TRANSITION(m, from, ev, to)
#include "sm/states.def"
#undef MACHINE
#undef STATE
#undef EVENT
#undef TRANSITION
};
static const char *const event_labels[] = {
#define MACHINE(name, desc)
#define STATE(name, desc)
#define EVENT(name, label) label,
#define TRANSITION(m, from, ev, to)
#include "sm/states.def"
#undef MACHINE
#undef STATE
#undef EVENT
#undef TRANSITION
};
static const char *const machine_names[] = {
#define MACHINE(name, desc) #name,
#define STATE(name, desc)
#define EVENT(name, label)
#define TRANSITION(m, from, ev, to)
#include "sm/states.def"
#undef MACHINE
#undef STATE
#undef EVENT
#undef TRANSITION
};
static const char *const machine_descs[] = {
#define MACHINE(name, desc) desc,
#define STATE(name, desc)
#define EVENT(name, label)
#define TRANSITION(m, from, ev, to)
#include "sm/states.def"
#undef MACHINE
#undef STATE
#undef EVENT
#undef TRANSITION
};

const char *qsm_state_name(enum qsm_state s) { return state_names[s]; }
const char *qsm_state_desc(enum qsm_state s) { return state_descs[s]; }
const char *qsm_event_name(enum qsm_event e) { return e < QSM_E__COUNT ? event_names[e] : "WAIT"; }
const char *qsm_event_label(enum qsm_event e) { return e < QSM_E__COUNT ? event_labels[e] : "wait"; }
const char *qsm_machine_name(enum qsm_machine m) { return machine_names[m]; }
const char *qsm_machine_desc(enum qsm_machine m) { return machine_descs[m]; }

int qsm_transition(enum qsm_machine m, enum qsm_state from, enum qsm_event ev)
{
	if (m >= QSM_M__COUNT || from >= QSM_S__COUNT || ev >= QSM_E__COUNT)
		return -1;
	return (int)transitions[m][from][ev] - 1;
}

static const char *const kind_names[QSM_M__COUNT] = {
	[QSM_M_READ] = "read", [QSM_M_WRITE] = "write", [QSM_M_ZEROES] = "write_zeroes",
	[QSM_M_DISCARD] = "discard", [QSM_M_FLUSH] = "flush", [QSM_M_STATUS] = "status",
	[QSM_M_WRITEBACK] = "writeback", [QSM_M_WRITE_COMPRESSED] = "write_compressed",
	[QSM_M_CLOSE] = "close",
};

/* --- helpers -------------------------------------------------------------- */

static bool is_write_machine(enum qsm_machine m)
{
	return m == QSM_M_WRITE || m == QSM_M_ZEROES || m == QSM_M_DISCARD ||
	       m == QSM_M_WRITE_COMPRESSED;
}

static uint64_t cluster_of(const struct qsm_image *img, uint64_t off)
{
	return off >> img->cluster_bits;
}

static uint64_t in_cluster(const struct qsm_image *img, uint64_t off)
{
	return off & (img->cluster_size - 1);
}

/* Every valid host offset lies below this: the end of the file as opened or
 * written since, or of what the allocator handed out. */
static uint64_t host_limit(struct qsm_image *img)
{
	return QSM_MAX(img->file_end, qsm_refcount_image_end(img->rc));
}

/* Record the first error of a request and leave through DONE. */
static enum qsm_event fail(struct qsm_req *req, int ret)
{
	assert(ret < 0);
	if (!req->ret)
		req->ret = ret;
	return QSM_E_ERROR;
}

static void release_l2(struct qsm_req *req)
{
	if (req->run.l2) {
		qsm_l2_put(&req->img->l2c, req->run.l2);
		req->run.l2 = NULL;
	}
}

/* The allocation of req's run is over: its L2 entries are updated (ret 0)
 * or it failed.  Wake who waited; tell who joined (their data is mapped now,
 * or lost with the allocation). */
static void alloc_unlink(struct qsm_req *req, int ret)
{
	struct qsm_image *img = req->img;
	struct qsm_alloc *a = &req->run.alloc;
	if (!req->run.alloc_linked)
		return;
	if (a->prev)
		a->prev->next = a->next;
	else
		img->allocs = a->next;
	if (a->next)
		a->next->prev = a->prev;
	req->run.alloc_linked = false;
	qsm_wake_all(&a->waiters, QSM_E_WAKE, 0);
	while (a->joiners) {
		struct qsm_req *j = a->joiners;
		a->joiners = j->run.join_next;
		j->run.joined = NULL;
		j->run.join_done = true;
		j->run.join_ret = ret < 0 ? -EIO : 0;
		if (j->state == QSM_S_JOIN_WAIT)
			qsm_sm_post(j, ret < 0 ? QSM_E_ERROR : QSM_E_WAKE, -EIO);
	}
}

/* A joiner leaves early (its own write failed). */
static void join_unlink(struct qsm_req *req)
{
	struct qsm_alloc *a = req->run.joined;
	if (!a)
		return;
	for (struct qsm_req **pp = &a->joiners; *pp; pp = &(*pp)->run.join_next) {
		if (*pp == req) {
			*pp = req->run.join_next;
			break;
		}
	}
	req->run.joined = NULL;
}

/* The request an allocation record belongs to (it lives in its run). */
static struct qsm_req *alloc_owner(struct qsm_alloc *a)
{
	return container_of(a, struct qsm_req, run.alloc);
}

/* An in-flight allocation by another request overlapping guest clusters
 * [first, first+count), or NULL. */
static struct qsm_alloc *alloc_overlap(struct qsm_image *img, struct qsm_req *req,
				       uint64_t first, uint64_t count)
{
	if (QSM_MUTANT(DOUBLE_ALLOC))
		return NULL; /* mutant: nobody waits for anybody */
	for (struct qsm_alloc *a = img->allocs; a; a = a->next) {
		if (a == &req->run.alloc)
			continue;
		if (first < a->first + a->count && a->first < first + count)
			return a;
	}
	return NULL;
}

static void wait_on(struct qsm_wait **list, struct qsm_req *req)
{
	assert(!req->waiting);
	req->wait.req = req;
	req->wait.next = *list;
	*list = &req->wait;
	req->waiting = true;
}

/*
 * Invariant 2: if another request is allocating any guest cluster of the
 * run, drop our table and wait on that allocation (the caller returns
 * ALLOC_BUSY; the wakeup sends us back to L1_LOOKUP).
 */
static bool wait_for_overlapping_alloc(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	struct qsm_alloc *a = alloc_overlap(img, req, cluster_of(img, run->offset),
					    run->nb_clusters);
	if (!a)
		return false;
	if (!QSM_MUTANT(HOLD_L2_WAITING)) /* mutant: sleeps holding its table */
		release_l2(req);
	img->stats.alloc_waits++;
	req->wait_for = alloc_owner(a)->id;
	wait_on(&a->waiters, req);
	return true;
}

void qsm_wake_all(struct qsm_wait **list, enum qsm_event ev, int ret)
{
	struct qsm_wait *w = *list;
	*list = NULL;
	while (w) {
		struct qsm_wait *next = w->next;
		w->req->waiting = false;
		qsm_sm_post(w->req, ev, ret);
		w = next;
	}
}

/* --- I/O ------------------------------------------------------------------ */

static void req_io_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_req *req = container_of(io, struct qsm_req, io);
	struct qsm_image *img = req->img;
	if (req->io_busy) {
		req->io_busy = false;
		img->io_busy--;
	}
	if (img->nb_held_frees)
		qsm_wb_release_held(img);
	if (ret < 0)
		qsm_sm_post(req, QSM_E_ERROR, ret);
	else
		qsm_sm_post(req, QSM_E_IO_DONE, 0);
	qsm_sm_drain(img);
}

bool qsm_host_io_busy(const struct qsm_image *img, uint64_t cluster)
{
	uint64_t lo = cluster << img->cluster_bits, hi = lo + img->cluster_size;
	if (!img->io_busy)
		return false;
	for (const struct qsm_req *r = img->all; r; r = r->all_next)
		if (r->io_busy && r->io_lo < hi && lo < r->io_hi)
			return true;
	return false;
}

/*
 * Submit the request's one data I/O; completion posts IO_DONE or ERROR.
 * The host range is noted while in flight: a cluster found through an L2
 * entry (in-place writes, reads, COW sources, joined allocations) may be
 * unmapped meanwhile by a discard, a zero write or a compressed write, and
 * must not be handed to another allocation before this I/O is over, or a
 * late write would land in someone else's data (writeback.c, rule 4).
 */
static enum qsm_event submit_io(struct qsm_req *req, enum qsm_io_op op, enum qsm_io_event tag,
				uint64_t host, const struct iovec *iov, int iovcnt)
{
	struct qsm_image *img = req->img;
	uint64_t len = qsm_iov_size(iov, iovcnt);
	if (op != QSM_IO_READ && img->corrupt)
		return fail(req, -EIO); /* nothing more is written (sm/image.c) */
	req->io = (struct qsm_io_req){
		.op = op, .event = tag, .offset = host, .len = len,
		.iov = iov, .iovcnt = iovcnt, .cb = req_io_cb,
	};
	if (op == QSM_IO_WRITE && host + len > img->file_end)
		img->file_end = host + len;
	assert(!req->io_busy);
	req->io_busy = len > 0;
	img->io_busy += req->io_busy;
	req->io_lo = host;
	req->io_hi = host + len;
	qsm_io_submit(img->io, &req->io);
	return QSM_E_WAIT;
}

/* The run's slice of the caller's buffers (or of the zero buffer for
 * write-zeroes runs written as data), placed at run.iov[first..]. */
static int run_payload(struct qsm_req *req, struct iovec *dst, int cap)
{
	struct qsm_run *run = &req->run;
	if (req->machine == QSM_M_ZEROES) {
		/* Zero data for a partial cluster or a v2 image: at most one
		 * cluster per run, see classify_zeroes. */
		assert(run->bytes <= req->img->cluster_size);
		dst[0].iov_base = req->img->zero_buf;
		dst[0].iov_len = run->bytes;
		return 1;
	}
	return qsm_iov_slice(dst, cap, req->iov, req->iovcnt, req->done, run->bytes);
}

/* --- steps ---------------------------------------------------------------- */

/* Set up the next run at offset+done, inside one L2 table. */
static void run_init(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t pos = req->offset + req->done;
	uint64_t table_span = img->l2_entries << img->cluster_bits;
	uint64_t table_end = QSM_ALIGN_DOWN(pos, table_span) + table_span;

	assert(!run->l2 && !run->alloc_linked && !run->joined);
	free(run->bounce);
	free(run->cbuf);
	memset(run, 0, sizeof(*run));
	run->offset = pos;
	run->bytes = QSM_MIN(req->bytes - req->done, table_end - pos);
	run->l1_index = pos / table_span;
	run->l2_index = cluster_of(img, pos) & (img->l2_entries - 1);
}

static struct qsm_l2alloc *l2alloc_find(const struct qsm_image *img, uint64_t l1_index)
{
	for (struct qsm_l2alloc *a = img->l2allocs; a; a = a->next)
		if (a->l1_index == l1_index)
			return a;
	return NULL;
}

static enum qsm_event step_l1_lookup(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	if (QSM_MUTANT(HOLD_L2_WAITING)) /* mutant: the table kept over ALLOC_WAIT */
		release_l2(req);
	run_init(req);
	if (img->error && is_write_machine(req->machine))
		return fail(req, -EIO); /* sticky error: nothing more is written */
	if (run->l1_index >= img->l1_size)
		return fail(req, qsm_image_corrupt(img, "guest offset %#llx is beyond the L1 table",
						    (unsigned long long)run->offset));
	uint64_t l1e = qsm_l1_get(img, run->l1_index);
	uint64_t l2_off = l1e & QCOW2_L1E_OFFSET_MASK;

	if (l1e & QCOW2_L1E_RESERVED)
		return fail(req, qsm_image_corrupt(img, "L1 entry %llu (%#llx) has reserved bits set",
						    (unsigned long long)run->l1_index,
						    (unsigned long long)l1e));
	if (is_write_machine(req->machine) && img->l2allocs) {
		/* Invariant 3: the slot's L2 table is being created or copied. */
		struct qsm_l2alloc *a = l2alloc_find(img, run->l1_index);
		if (a && !QSM_MUTANT(NO_FREEZE)) {
			img->stats.frozen++;
			req->wait_for = a->owner->id;
			wait_on(&a->waiters, req);
			return QSM_E_L1_BUSY;
		}
	}
	if (l2_off == 0) {
		bool backing = qsm_has_backing(img);
		switch (req->machine) {
		case QSM_M_READ:
			return backing ? QSM_E_BACKING : QSM_E_L1_EMPTY;
		case QSM_M_STATUS:
			/* With a backing file the chain decides: neither flag. */
			*req->status_out = (struct qsm_extent){ run->offset, run->bytes,
								backing ? 0 : QSM_STATUS_ZERO, 0 };
			return QSM_E_L1_EMPTY;
		case QSM_M_DISCARD:
			/* Unallocated reads as zeros without a backing file; with
			 * one, v3 hides it behind zero clusters (v2 cannot). */
			if (!backing || img->hdr.version < 3)
				return QSM_E_NOTHING_TO_DO;
			return QSM_E_L1_EMPTY;
		case QSM_M_ZEROES:
			/* v3 records zero clusters (as QEMU, which creates the L2
			 * table for them); v2 has nothing to record unless a
			 * backing file would show through (it writes zeros). */
			if (img->hdr.version < 3 && !backing)
				return QSM_E_NOTHING_TO_DO;
			/* fall through */
		default:
			return QSM_E_L1_EMPTY;
		}
	}
	if (!QSM_IS_ALIGNED(l2_off, img->cluster_size))
		return fail(req, qsm_image_corrupt(img, "L1 entry %llu: L2 table offset %#llx is not cluster aligned",
						    (unsigned long long)run->l1_index,
						    (unsigned long long)l2_off));
	if (l2_off >= host_limit(img))
		return fail(req, qsm_image_corrupt(img, "L1 entry %llu: L2 table offset %#llx is past the end of the image file",
						    (unsigned long long)run->l1_index,
						    (unsigned long long)l2_off));
	if (qsm_is_metadata_not_l2(img, l2_off))
		return fail(req, qsm_image_corrupt(img, "L1 entry %llu: L2 table offset %#llx overlaps other metadata",
						    (unsigned long long)run->l1_index,
						    (unsigned long long)l2_off));
	return QSM_E_L1_FOUND;
}

static void l2_waiter_cb(struct qsm_l2_waiter *w, int ret)
{
	struct qsm_req *req = container_of(w, struct qsm_req, l2w);
	if (ret < 0) {
		qsm_sm_post(req, QSM_E_ERROR, ret);
	} else if (w->table) {
		req->run.l2 = w->table; /* reference handed to us */
		qsm_sm_post(req, QSM_E_LOADED, 0);
	} else {
		qsm_sm_post(req, QSM_E_WAKE, 0);
	}
}

static void rc_waiter_cb(struct qsm_rc_waiter *w, int ret)
{
	struct qsm_req *req = container_of(w, struct qsm_req, rcw);
	if (ret < 0)
		qsm_sm_post(req, QSM_E_ERROR, ret);
	else
		qsm_sm_post(req, req->rb_resume, 0);
}

struct qsm_rc_waiter *qsm_req_rcw(struct qsm_req *req)
{
	req->rcw.fn = rc_waiter_cb;
	req->rcw.tag = req->id;
	return &req->rcw;
}

enum qsm_event qsm_rc_wait(struct qsm_req *req, enum qsm_event resume)
{
	assert(!req->run.l2); /* invariant 4 */
	req->rb_resume = resume;
	req->wait_for = req->rcw.waiting_on == req->id ? 0 : req->rcw.waiting_on;
	return QSM_E_REFBLOCK_MISS;
}

/* Drop references nothing points at (a failed allocation) from a path that
 * cannot wait: at once when their refcount blocks are cached (they usually
 * are: the allocation just used them), else at the next write-back's
 * release, like any deferred free. */
static void release_unmapped(struct qsm_req *req, uint64_t off, uint64_t len)
{
	struct qsm_image *img = req->img;
	uint64_t first = cluster_of(img, off), last = cluster_of(img, off + len - 1), v;
	bool cached = true;
	for (uint64_t c = first; c <= last; c++)
		cached &= qsm_refcount_peek(img->rc, c, &v);
	if (cached) {
		(void)qsm_refcount_free_bytes(img->rc, off, len, qsm_req_rcw(req));
		return;
	}
	for (uint64_t c = first; c <= last; c++)
		(void)qsm_free_cluster_deferred(img, c << img->cluster_bits); /* ENOMEM: a leak */
}

static enum qsm_event step_l2_alloc(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	struct qsm_l2alloc *a = l2alloc_find(img, run->l1_index);
	int ret;

	if (QSM_MUTANT(NO_FREEZE)) /* mutant: a second record for the same slot */
		for (a = img->l2allocs; a && a->owner != req; a = a->next)
			;
	if (!a) {
		a = calloc(1, sizeof(*a));
		if (!a)
			return fail(req, -ENOMEM);
		a->l1_index = run->l1_index;
		a->owner = req;
		a->next = img->l2allocs;
		img->l2allocs = a;
	}
	assert(a->owner == req);
	if (img->error) {
		ret = -EIO;
		goto out_unfreeze;
	}
	if (!run->host) {
		ret = qsm_refcount_alloc(img->rc, 1, &run->host, qsm_req_rcw(req));
		if (ret == -EAGAIN) /* the slot stays claimed (a) while we wait */
			return qsm_rc_wait(req, QSM_E_RETRY_L2_ALLOC);
		qsm_refcount_unpin(img->rc, &req->rcw);
		if (ret < 0)
			goto out_unfreeze;
		if (qsm_is_metadata(img, run->host)) {
			ret = qsm_image_corrupt(img, "the allocator returned cluster %#llx, which holds metadata: refcounts are damaged",
						(unsigned long long)run->host);
			run->host = 0;
			goto out_unfreeze;
		}
	}
	req->l2w.fn = l2_waiter_cb;
	/* run->bounce holds the shared table's entries when this is a COW. */
	ret = qsm_l2_create(&img->l2c, run->host, run->bounce, &run->l2, &req->l2w);
	if (ret == -EAGAIN)
		return QSM_E_WAIT; /* slot waiter posts WAKE: run this step again */
	if (ret < 0) {
		release_unmapped(req, run->host, img->cluster_size);
		goto out_unfreeze;
	}
	qsm_note_l2_table(img, run->host);
	qsm_l1_set(img, run->l1_index, run->host | QCOW2_OFLAG_COPIED);
	img->stats.clusters_allocated++;
	if (run->bounce) {
		/* The snapshot keeps the old table; our reference to it goes
		 * once the new L1 entry is durable. */
		ret = qsm_free_cluster_deferred(img, run->old_entry & QCOW2_L1E_OFFSET_MASK);
		free(run->bounce);
		run->bounce = NULL;
	}
	run->host = 0;
out_unfreeze:
	for (struct qsm_l2alloc **pp = &img->l2allocs; *pp; pp = &(*pp)->next) {
		if (*pp == a) {
			*pp = a->next;
			break;
		}
	}
	qsm_wake_all(&a->waiters, QSM_E_WAKE, 0);
	free(a);
	return ret < 0 ? fail(req, ret) : QSM_E_L2_READY;
}

/* A host range that guest data (or a compressed cluster) may occupy:
 * inside the image and clear of metadata. */
static int check_data_range(struct qsm_req *req, uint64_t off, uint64_t len, const char *what)
{
	struct qsm_image *img = req->img;
	/* It must start inside the file; its end may not be written yet (a
	 * crash can leave the last cluster short, and reads past the end of
	 * the file return zeros). */
	if (off >= host_limit(img) || off + len < off)
		return qsm_image_corrupt(img, "%s %#llx+%llu is past the end of the image file",
					 what, (unsigned long long)off, (unsigned long long)len);
	for (uint64_t c = off >> img->cluster_bits; c <= (off + len - 1) >> img->cluster_bits; c++)
		if (qsm_is_metadata(img, c << img->cluster_bits))
			return qsm_image_corrupt(img, "%s %#llx overlaps metadata at %#llx", what,
						 (unsigned long long)off,
						 (unsigned long long)(c << img->cluster_bits));
	return 0;
}

/* Validate an L2 entry before use.  0 or a corruption error. */
static int check_l2_entry(struct qsm_req *req, uint64_t idx, uint64_t e)
{
	struct qsm_image *img = req->img;
	uint64_t off = qcow2_entry_offset(e);
	if (e & QCOW2_OFLAG_COMPRESSED) {
		uint64_t coff, clen;
		qcow2_compressed_extent(img->cluster_bits, e, &coff, &clen);
		return check_data_range(req, coff, clen, "L2 entry: compressed cluster");
	}
	if (e & QCOW2_L2E_RESERVED)
		return qsm_image_corrupt(img, "L2 table %#llx entry %llu (%#llx) has reserved bits set",
					 (unsigned long long)req->run.l2->offset,
					 (unsigned long long)idx, (unsigned long long)e);
	if (off && !QSM_IS_ALIGNED(off, img->cluster_size))
		return qsm_image_corrupt(img, "L2 table %#llx entry %llu: cluster offset %#llx is not aligned",
					 (unsigned long long)req->run.l2->offset,
					 (unsigned long long)idx, (unsigned long long)off);
	if (off && !(e & QCOW2_L2E_ZERO) && off >= host_limit(img))
		return qsm_image_corrupt(img, "L2 table %#llx entry %llu: data cluster %#llx is past the end of the image file",
					 (unsigned long long)req->run.l2->offset,
					 (unsigned long long)idx, (unsigned long long)off);
	if ((e & QCOW2_L2E_ZERO) && img->hdr.version < 3)
		return qsm_image_corrupt(img, "L2 table %#llx entry %llu: zero flag in a version 2 image",
					 (unsigned long long)req->run.l2->offset,
					 (unsigned long long)idx);
	return 0;
}

/* Host clusters a write may modify in place: refcounted, not metadata. */
static int check_write_target(struct qsm_req *req, uint64_t host)
{
	struct qsm_image *img = req->img;
	if (qsm_is_metadata(img, host))
		return qsm_image_corrupt(img, "data cluster %#llx overlaps metadata",
					 (unsigned long long)host);
	uint64_t v;
	int ret = qsm_refcount_read(img->rc, cluster_of(img, host), &v, qsm_req_rcw(req));
	if (ret < 0)
		return ret; /* -EAGAIN: the caller waits */
	if (v == 0)
		return qsm_image_corrupt(img, "data cluster %#llx is in use but its refcount is 0",
					 (unsigned long long)host);
	return 0;
}

/* Release the host clusters an old L2 entry held (deferred, see writeback.c).
 * A compressed cluster holds every cluster its sectors touch. */
static int free_old_entry(struct qsm_image *img, uint64_t e)
{
	if (e & QCOW2_OFLAG_COMPRESSED) {
		uint64_t first, count;
		qcow2_compressed_clusters(img->cluster_bits, e, &first, &count);
		for (uint64_t c = first; c < first + count; c++) {
			int ret = qsm_free_cluster_deferred(img, c << img->cluster_bits);
			if (ret < 0)
				return ret;
		}
		return 0;
	}
	uint64_t host = qcow2_entry_offset(e);
	return host ? qsm_free_cluster_deferred(img, host) : 0;
}

/* Does a cluster of this kind read as zeros in this image?  Unallocated
 * clusters do only when there is no backing file. */
static bool reads_zero_here(const struct qsm_image *img, enum qcow2_entry_kind k)
{
	return qcow2_kind_reads_zero(k) && !(k == QCOW2_EK_UNALLOC && qsm_has_backing(img));
}

/* Clusters of the run [run->offset, +bytes) and the last index it touches. */
static uint64_t run_clusters(const struct qsm_image *img, uint64_t off, uint64_t bytes)
{
	return cluster_of(img, off + bytes - 1) - cluster_of(img, off) + 1;
}

/* Shorten the run to its first n clusters (n >= 1). */
static void run_clip(struct qsm_req *req, uint64_t n)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t end = (cluster_of(img, run->offset) + n) << img->cluster_bits;
	if (run->offset + run->bytes > end)
		run->bytes = end - run->offset;
	run->nb_clusters = run_clusters(img, run->offset, run->bytes);
}

/*
 * QEMU's qcow2_detect_metadata_preallocation(), decided once per image at
 * its first block status query: count the clusters with a refcount, and
 * call the image preallocated when they reach max(10/9, +2 clusters) of
 * the storage the file occupies.  Only then does QEMU (BDRV_BLOCK_RECURSE)
 * look for holes under data clusters, so only then does qsm; a backend
 * that cannot tell the storage used never qualifies.
 */
static int meta_prealloc(struct qsm_req *req, bool *yes)
{
	struct qsm_image *img = req->img;
	uint64_t file_len, real, count = 0;

	if (img->meta_prealloc >= 0) {
		*yes = img->meta_prealloc;
		return 0;
	}
	*yes = false;
	/* The file's size and storage as open found them: the handle may not
	 * block now (qsm_io.h), and a map is asked right after an open. */
	if (img->open_allocated < 0) {
		img->meta_prealloc = 0;
		return 0;
	}
	file_len = img->open_size;
	real = (uint64_t)img->open_allocated;
	uint64_t real_clusters = real / img->cluster_size;
	uint64_t threshold = QSM_MAX(real_clusters * 10 / 9, real_clusters + 2);
	uint64_t end = (file_len + img->cluster_size - 1) / img->cluster_size;
	/* Blocks seen count from the summary; the others are read (-EAGAIN). */
	int ret = qsm_refcount_count_used(img->rc, end, threshold, &count, qsm_req_rcw(req));
	if (ret < 0)
		return ret;
	qsm_refcount_unpin(img->rc, &req->rcw);
	img->meta_prealloc = count >= threshold;
	*yes = img->meta_prealloc;
	return 0;
}

static enum qsm_event classify_read(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t n = run_clusters(img, run->offset, run->bytes);
	uint64_t e0 = qsm_l2_entry(run->l2, run->l2_index);
	enum qcow2_entry_kind k0 = qcow2_entry_kind(e0);
	int ret = check_l2_entry(req, run->l2_index, e0);
	if (ret < 0)
		return fail(req, ret);
	if (k0 == QCOW2_EK_COMPRESSED) {
		run_clip(req, 1);
		release_l2(req);
		run->old_entry = e0;
		if (req->machine == QSM_M_STATUS) {
			*req->status_out = (struct qsm_extent){
				run->offset, run->bytes,
				QSM_STATUS_DATA | QSM_STATUS_ALLOCATED | QSM_STATUS_COMPRESSED, 0 };
			return QSM_E_REPORTED;
		}
		return QSM_E_COMPRESSED;
	}
	uint64_t host0 = qcow2_entry_offset(e0);
	bool from_backing = k0 == QCOW2_EK_UNALLOC && qsm_has_backing(img);
	uint64_t i;
	for (i = 1; i < n; i++) {
		uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
		enum qcow2_entry_kind k = qcow2_entry_kind(e);
		if ((ret = check_l2_entry(req, run->l2_index + i, e)) < 0)
			return fail(req, ret);
		/* A read merges every kind that reads as zeros; a status query
		 * reports unallocated and zero clusters apart, as QEMU's map.
		 * Unallocated clusters over a backing file form runs of their own. */
		/* Zero clusters that keep their host cluster report it (as
		 * QEMU's map shows their offset): runs of them stay host-contiguous. */
		if (from_backing ? k != QCOW2_EK_UNALLOC :
		    qcow2_kind_reads_zero(k0) ? (req->machine == QSM_M_STATUS ?
				      k != k0 || (k0 == QCOW2_EK_ZERO_ALLOC &&
						  qcow2_entry_offset(e) != host0 + (i << img->cluster_bits)) :
				      !reads_zero_here(img, k)) :
		    (k == QCOW2_EK_COMPRESSED || qcow2_kind_reads_zero(k) ||
		     qcow2_entry_offset(e) != host0 + (i << img->cluster_bits)))
			break;
	}
	run_clip(req, i);
	release_l2(req);
	if (from_backing) {
		if (req->machine == QSM_M_STATUS) {
			*req->status_out = (struct qsm_extent){ run->offset, run->bytes, 0, 0 };
			return QSM_E_REPORTED;
		}
		return QSM_E_BACKING;
	}
	if (qcow2_kind_reads_zero(k0)) {
		if (req->machine == QSM_M_STATUS)
			*req->status_out = (struct qsm_extent){
				run->offset, run->bytes,
				QSM_STATUS_ZERO | (k0 == QCOW2_EK_UNALLOC ? 0 : QSM_STATUS_ALLOCATED),
				k0 == QCOW2_EK_ZERO_ALLOC ? host0 + in_cluster(img, run->offset) : 0 };
		return req->machine == QSM_M_STATUS ? QSM_E_REPORTED : QSM_E_ZERO;
	}
	run->host = host0 + in_cluster(img, run->offset);
	if (req->machine == QSM_M_STATUS) {
		/* As QEMU, which on a preallocated image asks the file under it
		 * too: host clusters that are a hole in the file read as zeros. */
		bool data = true, prealloc;
		uint64_t len = run->bytes;
		if ((ret = meta_prealloc(req, &prealloc)) == -EAGAIN) {
			release_l2(req);
			return qsm_rc_wait(req, QSM_E_LOADED);
		}
		if (ret < 0)
			return fail(req, ret);
		if (prealloc && (ret = qsm_io_extent(img->io, run->host, run->bytes, &data, &len)) < 0)
			return fail(req, ret);
		*req->status_out = (struct qsm_extent){
			run->offset, len,
			QSM_STATUS_DATA | QSM_STATUS_ALLOCATED | (data ? 0 : QSM_STATUS_ZERO),
			run->host };
		return QSM_E_REPORTED;
	}
	return QSM_E_DATA;
}

/*
 * Write (and zero data) runs: the first cluster decides the kind of run.
 *  - QCOW2_EK_DATA: in place, extended over host-contiguous QCOW2_EK_DATA
 *    clusters;
 *  - QCOW2_EK_UNALLOC/_ZERO/_ZERO_ALLOC: allocate, extended over clusters of
 *    those kinds (no old data to keep: COW regions are zeros); with a
 *    backing file, unallocated clusters form runs of their own whose
 *    partial head and tail are copied from the backing image (cow_backing);
 *  - QCOW2_EK_SHARED: allocate one cluster, COW from the shared one.
 */
static enum qsm_event classify_write(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t n = run_clusters(img, run->offset, run->bytes);
	uint64_t e0 = qsm_l2_entry(run->l2, run->l2_index);
	enum qcow2_entry_kind k0 = qcow2_entry_kind(e0);
	uint64_t host0 = qcow2_entry_offset(e0);
	int ret = check_l2_entry(req, run->l2_index, e0);
	uint64_t i;

	if (ret < 0)
		return fail(req, ret);
	if (k0 == QCOW2_EK_DATA) {
		for (i = 1; i < n; i++) {
			uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
			if ((ret = check_l2_entry(req, run->l2_index + i, e)) < 0)
				return fail(req, ret);
			if (qcow2_entry_kind(e) != QCOW2_EK_DATA ||
			    qcow2_entry_offset(e) != host0 + (i << img->cluster_bits))
				break;
		}
		run_clip(req, i);
		for (i = 0; i < run->nb_clusters; i++) {
			if ((ret = check_write_target(req, host0 + (i << img->cluster_bits))) == -EAGAIN) {
				release_l2(req);
				return qsm_rc_wait(req, QSM_E_LOADED);
			}
			if (ret < 0)
				return fail(req, ret);
		}
		qsm_refcount_unpin(img->rc, &req->rcw);
		release_l2(req);
		if (req->machine == QSM_M_ZEROES)
			/* Zero data: one cluster per run, see run_payload. */
			run_clip(req, 1);
		run->host = host0 + in_cluster(img, run->offset);
		return QSM_E_IN_PLACE;
	}
	bool from_backing = k0 == QCOW2_EK_UNALLOC && qsm_has_backing(img);
	if (k0 == QCOW2_EK_SHARED || k0 == QCOW2_EK_COMPRESSED) {
		i = 1; /* one cluster, copied from its old contents */
	} else {
		for (i = 1; i < n; i++) {
			uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
			enum qcow2_entry_kind k = qcow2_entry_kind(e);
			if ((ret = check_l2_entry(req, run->l2_index + i, e)) < 0)
				return fail(req, ret);
			if (!qcow2_kind_reads_zero(k) || (from_backing != (k == QCOW2_EK_UNALLOC && qsm_has_backing(img))))
				break;
		}
	}
	run_clip(req, i);

	/* Invariant 2 against allocations in flight over these clusters. */
	uint64_t c0 = cluster_of(img, run->offset);
	struct qsm_alloc *first = NULL;
	for (struct qsm_alloc *a = img->allocs; a; a = a->next)
		if (a != &run->alloc && c0 < a->first + a->count && a->first < c0 + run->nb_clusters &&
		    (!first || a->first < first->first))
			first = a;
	if (first && first->first > c0) {
		/* Allocate the clusters before it ourselves. */
		run_clip(req, first->first - c0);
	} else if (first && first->joinable && req->machine == QSM_M_WRITE) {
		/* Fresh clusters written without COW: put our data there now and
		 * complete after the owner's L2 update. */
		run_clip(req, QSM_MIN(run->nb_clusters, first->first + first->count - c0));
		release_l2(req);
		run->host = first->host + ((c0 - first->first) << img->cluster_bits) +
			    in_cluster(img, run->offset);
		run->joined = first;
		req->wait_for = alloc_owner(first)->id;
		run->join_next = first->joiners;
		first->joiners = req;
		img->stats.alloc_joins++;
		return QSM_E_JOIN;
	} else if (first) {
		if (!QSM_MUTANT(HOLD_L2_WAITING)) /* mutant: sleeps holding its table */
			release_l2(req);
		img->stats.alloc_waits++;
		req->wait_for = alloc_owner(first)->id;
		wait_on(&first->waiters, req);
		return QSM_E_ALLOC_BUSY;
	}
	run->old_entry = e0;
	run->allocating = true;
	run->cow_backing = from_backing;
	return QSM_E_NEED_ALLOC;
}

/*
 * Write zeroes, with QEMU's results (so `map` agrees):
 *  - whole clusters: v3 sets the zero flag (keeping the allocation unless
 *    QSM_ZERO_MAY_UNMAP; never unallocated, so a backing file stays hidden);
 *    v2, which has no zero flag, deallocates them, or with a backing file
 *    writes zeros into them;
 *  - a partial cluster that is unallocated over a backing file: allocated,
 *    the rest copied from the backing image (COW) and the part zeroed,
 *    unless (v3) the rest of the cluster reads as zeros through the chain
 *    (BACKING_STATUS): then it becomes a zero cluster, as in QEMU;
 *  - a partial cluster that already reads as zeros: v3 turns it into a zero
 *    cluster, v2 leaves it;
 *  - a partial cluster with data: zero data is written over the part.
 */
static enum qsm_event classify_zeroes(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t head = in_cluster(img, run->offset);
	bool v3 = img->hdr.version >= 3;

	if (head == 0 && run->bytes >= img->cluster_size) {
		run->bytes = QSM_ALIGN_DOWN(run->bytes, img->cluster_size);
	} else {
		run->bytes = QSM_MIN(run->bytes, img->cluster_size - head);
	}
	run->nb_clusters = run_clusters(img, run->offset, run->bytes);
	if (wait_for_overlapping_alloc(req))
		return QSM_E_ALLOC_BUSY;
	if (run->bytes >= img->cluster_size && head == 0) {
		if (v3 || !qsm_has_backing(img))
			return QSM_E_WHOLE_CLUSTERS;
		/* v2 over a backing file: only real zeros hide it, one
		 * cluster per run (see run_payload). */
		run_clip(req, 1);
		return classify_write(req);
	}

	uint64_t e = qsm_l2_entry(run->l2, run->l2_index);
	int ret = check_l2_entry(req, run->l2_index, e);
	if (ret < 0)
		return fail(req, ret);
	enum qcow2_entry_kind k = qcow2_entry_kind(e);
	/* As QEMU, which asks the chain whether the rest of the cluster reads
	 * as zeros and then, on v3, makes it a zero cluster (BACKING_STATUS
	 * asks, then the run is looked up again).  v2 with a backing file
	 * writes zeros (QEMU's fallback). */
	bool chain_zero = false;
	if (v3 && k == QCOW2_EK_UNALLOC && img->backing) {
		uint64_t c0 = run->offset - head, end = run->offset + run->bytes;
		if (!req->probe_done || req->probe_cluster != c0) {
			release_l2(req);
			req->probe_cluster = c0;
			req->probe_off = c0;
			req->probe_len = head;
			req->probe_off2 = end;
			req->probe_len2 = QSM_MIN(c0 + img->cluster_size, img->hdr.size) - end;
			req->probe_img = NULL;
			req->probe_done = false;
			return QSM_E_BACKING;
		}
		chain_zero = req->probe_zero;
	}
	if (reads_zero_here(img, k) || chain_zero) {
		if (v3)
			return QSM_E_WHOLE_CLUSTERS;
		release_l2(req);
		return QSM_E_NOTHING_TO_DO;
	}
	return classify_write(req);
}

static enum qsm_event classify_discard(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t head = in_cluster(img, run->offset);
	uint64_t first_whole = head ? img->cluster_size - head : 0;

	if (img->hdr.version < 3 && qsm_has_backing(img)) {
		/* As QEMU (qcow2_co_pdiscard returns ENOTSUP, which the block
		 * layer ignores): v2 cannot hide the backing data, so a discard
		 * changes nothing. */
		release_l2(req);
		return QSM_E_NOTHING_TO_DO;
	}
	if (first_whole) {
		/* Skip the partial head cluster: qcow2 discards whole clusters. */
		run->bytes = QSM_MIN(run->bytes, first_whole);
		release_l2(req);
		return QSM_E_NOTHING_TO_DO;
	}
	if (run->bytes < img->cluster_size) {
		release_l2(req);
		return QSM_E_NOTHING_TO_DO;
	}
	run->bytes = QSM_ALIGN_DOWN(run->bytes, img->cluster_size);
	run->nb_clusters = run->bytes >> img->cluster_bits;
	if (wait_for_overlapping_alloc(req))
		return QSM_E_ALLOC_BUSY;
	return QSM_E_WHOLE_CLUSTERS;
}

/*
 * Compressed write, one cluster per run (the request is cluster aligned).
 * A cluster that deflated smaller goes to BYTE_ALLOC, whatever the old entry
 * (released at L2_UPDATE; QEMU refuses to overwrite an allocated cluster
 * here, qsm treats it as any overwrite); one that did not shrink is an
 * ordinary write of the cluster, as QEMU falls back to.
 */
static enum qsm_event classify_compressed(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t idx = (run->offset - req->offset) >> img->cluster_bits;
	assert(in_cluster(img, run->offset) == 0);
	assert(idx >= req->cz_first && idx < req->cz_first + req->nb_cz);
	struct qsm_cjob *j = &req->cz[idx - req->cz_first];

	run_clip(req, 1);
	if (!j->out) {
		img->stats.compress_fallbacks++;
		return classify_write(req);
	}
	uint64_t e0 = qsm_l2_entry(run->l2, run->l2_index);
	int ret = check_l2_entry(req, run->l2_index, e0);
	if (ret < 0)
		return fail(req, ret);
	if (wait_for_overlapping_alloc(req))
		return QSM_E_ALLOC_BUSY;
	run->old_entry = e0;
	run->compressed = true;
	run->cdata = j->out;
	run->clen = j->clen;
	return QSM_E_COMPRESSED;
}

static enum qsm_event step_l2_lookup(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	uint64_t l2_off = qsm_l1_get(img, run->l1_index) & QCOW2_L1E_OFFSET_MASK;
	if (run->l2 && run->l2->offset != l2_off) {
		/* Loaded for an L1 entry that changed meanwhile: a write copied
		 * the shared table (L2_SHARED > L2_ALLOC) while this request
		 * waited for the same load.  The table the entry names now is
		 * the one to read and change. */
		release_l2(req);
	}
	if (!run->l2) {
		req->l2w.fn = l2_waiter_cb;
		req->l2w.tag = req->id;
		int ret = qsm_l2_get(&img->l2c, l2_off, &run->l2, &req->l2w);
		if (ret == -EAGAIN) {
			req->wait_for = req->l2w.waiting_on; /* another request's load */
			img->stats.l2_misses++;
			return QSM_E_CACHE_MISS;
		}
		if (ret < 0)
			return fail(req, ret);
		img->stats.l2_hits++;
	}
	uint64_t l1e = qsm_l1_get(img, run->l1_index);
	if (is_write_machine(req->machine) && !(l1e & QCOW2_OFLAG_COPIED)) {
		/* Shared with an internal snapshot: copy the table first.  Keep
		 * a private copy rather than the reference (invariant 4). */
		if (posix_memalign((void **)&run->bounce, 4096, img->cluster_size))
			return fail(req, -ENOMEM);
		memcpy(run->bounce, run->l2->data, img->cluster_size);
		run->old_entry = l1e;
		release_l2(req);
		return QSM_E_L2_SHARED;
	}
	switch (req->machine) {
	case QSM_M_READ:
	case QSM_M_STATUS:
		return classify_read(req);
	case QSM_M_WRITE:
		return classify_write(req);
	case QSM_M_ZEROES:
		return classify_zeroes(req);
	case QSM_M_DISCARD:
		return classify_discard(req);
	case QSM_M_WRITE_COMPRESSED:
		return classify_compressed(req);
	default:
		abort();
	}
}

static enum qsm_event step_data_io(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	int cnt = run_payload(req, req->iov_buf, req->iov_cap);
	assert(cnt > 0);
	if (req->state == QSM_S_DATA_READ)
		return submit_io(req, QSM_IO_READ, QSM_IO_EV_DATA_READ, run->host, req->iov_buf, cnt);
	return submit_io(req, QSM_IO_WRITE, QSM_IO_EV_DATA_WRITE, run->host, req->iov_buf, cnt);
}

/* Raw image, write-zeroes or discard: one zero-range or discard operation
 * on the file (discard is advisory there, as io/ documents). */
static enum qsm_event step_file_range(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	req->io = (struct qsm_io_req){
		.op = req->machine == QSM_M_ZEROES ? QSM_IO_ZERO : QSM_IO_DISCARD,
		.event = QSM_IO_EV_DATA_WRITE, .offset = run->host, .len = run->bytes,
		.cb = req_io_cb,
	};
	qsm_io_submit(req->img->io, &req->io);
	return QSM_E_WAIT;
}

static void backing_read_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	qsm_sm_post(req, ret < 0 ? QSM_E_ERROR : QSM_E_IO_DONE, ret);
}

/*
 * Unallocated clusters over a backing file: the part inside the backing
 * image's virtual size is read from it (a request of its own there, on the
 * same loop); past its end, and when the backing file was not opened
 * (no_backing), the run reads as zeros.
 */
static enum qsm_event step_backing_read(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	struct qsm_image *b = req->img->backing;
	uint64_t bsize = b ? b->hdr.size : 0;
	uint64_t n = run->offset < bsize ? QSM_MIN(run->bytes, bsize - run->offset) : 0;

	if (n < run->bytes)
		qsm_iov_memset(req->iov, req->iovcnt, req->done + n, 0, run->bytes - n);
	if (n == 0)
		return QSM_E_IO_DONE;
	int cnt = qsm_iov_slice(req->iov_buf, req->iov_cap, req->iov, req->iovcnt, req->done, n);
	int ret = qsm_readv(b, run->offset, req->iov_buf, cnt, backing_read_cb, req);
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

/*
 * BACKING_STATUS answers the block status request of one image of the chain
 * (probe_img) about one range ([probe_off, +probe_len)): unallocated there
 * and the image has a backing file: the next image down decides (BACKING,
 * back into BACKING_STATUS); zeros: that range is answered (ZERO, back into
 * BACKING_STATUS for the next range); anything else: not known zeros (DATA).
 */
static void probe_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	struct qsm_image *b = req->probe_img;
	if (ret < 0) {
		qsm_sm_post(req, QSM_E_ERROR, ret);
		return;
	}
	uint64_t len = QSM_MIN(req->probe_len, b->hdr.size - req->probe_off);
	bool whole = req->probe_ext.length == len;
	if (whole && req->probe_ext.flags == 0 && qsm_get_backing(b)) {
		req->probe_img = qsm_get_backing(b);
		qsm_sm_post(req, QSM_E_BACKING, 0);
	} else if (whole && (req->probe_ext.flags & QSM_STATUS_ZERO)) {
		req->probe_len = 0;
		req->probe_img = NULL;
		qsm_sm_post(req, QSM_E_ZERO, 0);
	} else {
		req->probe_done = true; /* data, or not one run: not known zeros */
		req->probe_zero = false;
		qsm_sm_post(req, QSM_E_DATA, 0);
	}
}

/*
 * A partial zero write over an unallocated cluster of a v3 image with a
 * backing file.  QEMU turns it into a zero cluster when the rest of the
 * cluster (head and tail) already reads as zeros; find that out, image by
 * image down the chain, one entry of this state per question (one block
 * status request per image and range; past an image's end counts as zeros;
 * a run shorter than the range as not known zeros).  probe_img NULL: the
 * current range starts from the top of the chain.  The answer stays in the
 * request (FINISHED: all zeros; DATA from probe_cb: not) and the run is
 * looked up again, since the cluster may have changed meanwhile.
 */
static enum qsm_event step_backing_status(struct qsm_req *req)
{
	if (!req->probe_len) {
		if (!req->probe_len2) {
			req->probe_done = req->probe_zero = true;
			return QSM_E_FINISHED;
		}
		req->probe_off = req->probe_off2;
		req->probe_len = req->probe_len2;
		req->probe_len2 = 0;
		req->probe_img = NULL;
	}
	if (!req->probe_img)
		req->probe_img = req->img->backing;
	struct qsm_image *b = req->probe_img;
	if (req->probe_off >= b->hdr.size) {
		req->probe_len = 0; /* past its end: zeros */
		req->probe_img = NULL;
		return QSM_E_ZERO;
	}
	uint64_t len = QSM_MIN(req->probe_len, b->hdr.size - req->probe_off);
	int ret = qsm_block_status(b, req->probe_off, len, &req->probe_ext, probe_cb, req);
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

static enum qsm_event step_zero_fill(struct qsm_req *req)
{
	qsm_iov_memset(req->iov, req->iovcnt, req->done, 0, req->run.bytes);
	return QSM_E_FINISHED;
}

static enum qsm_event step_compressed_read(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t off, len;
	qcow2_compressed_extent(img->cluster_bits, run->old_entry, &off, &len);
	run->csize = (size_t)len;
	if (posix_memalign((void **)&run->cbuf, 4096, QSM_ALIGN_UP(run->csize, 4096)))
		return fail(req, -ENOMEM);
	req->iov_buf[0] = (struct iovec){ run->cbuf, run->csize };
	return submit_io(req, QSM_IO_READ, req->machine == QSM_M_READ ? QSM_IO_EV_DATA_READ
								       : QSM_IO_EV_COW_READ,
			 off, req->iov_buf, 1);
}

/* The pool has room again: run the waiting step again (WAKE). */
static void work_room_cb(struct qsm_work_waiter *w)
{
	struct qsm_req *req = container_of(w, struct qsm_req, work_wait);
	req->work_waiting = false;
	/* From the pool's loop callback: the image's run event (or the
	 * finishing job's done, which drains) runs the posted event. */
	qsm_sm_post(req, QSM_E_WAKE, 0);
}

/*
 * Hand req->work to the image's pool.  QSM_E_WAIT either way: the job's done
 * callback posts the next event, or, when the pool is full (-EAGAIN), the
 * room waiter posts WAKE and the state's step runs again.
 */
static enum qsm_event submit_work(struct qsm_req *req, qsm_work_fn fn, qsm_work_fn done)
{
	struct qsm_work_pool *pool;
	int ret = qsm_image_work(req->img, &pool);
	if (ret < 0)
		return fail(req, ret);
	req->work = (struct qsm_work){ .fn = fn, .done = done };
	req->work_ret = 0;
	ret = qsm_work_submit(pool, &req->work);
	if (ret == -EAGAIN) {
		req->work_wait.cb = work_room_cb;
		req->work_waiting = true;
		qsm_work_wait(pool, &req->work_wait);
		return QSM_E_WAIT;
	}
	return ret < 0 ? fail(req, ret) : QSM_E_WAIT;
}

/*
 * DECOMPRESS, on a worker thread: inflate (metadata/compress.c)
 * run->cbuf into run->bounce, which must come out exactly one cluster long;
 * a read copies its part out to the caller's buffers (the request owns them
 * until it completes, and nothing else runs for it meanwhile).  Touches only
 * the request's buffers and constants of the image (io/work.h contract 1).
 */
static void decompress_fn(struct qsm_work *w)
{
	struct qsm_req *req = container_of(w, struct qsm_req, work);
	struct qsm_run *run = &req->run;
	uint64_t cluster_size = req->img->cluster_size;

	req->work_ret = qcow2_inflate(run->cbuf, run->csize, run->bounce, (size_t)cluster_size);
	if (req->work_ret < 0)
		return;
	if (req->machine == QSM_M_READ)
		qsm_iov_from_buf(req->iov, req->iovcnt, req->done,
				 run->bounce + (run->offset & (cluster_size - 1)), run->bytes);
}

/* DECOMPRESS, back on the loop. */
static void decompress_done(struct qsm_work *w)
{
	struct qsm_req *req = container_of(w, struct qsm_req, work);
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	free(run->cbuf);
	run->cbuf = NULL;
	if (req->machine == QSM_M_READ || req->work_ret < 0) {
		free(run->bounce);
		run->bounce = NULL;
	}
	if (req->work_ret == -EIO)
		snprintf(img->errmsg, sizeof(img->errmsg),
			 "compressed cluster at guest offset %#llx does not inflate to one cluster",
			 (unsigned long long)QSM_ALIGN_DOWN(run->offset, img->cluster_size));
	qsm_sm_post(req, req->work_ret < 0 ? QSM_E_ERROR : QSM_E_FINISHED, req->work_ret);
	qsm_sm_drain(img);
}

/*
 * Inflate the compressed bytes COMPRESSED_READ fetched, on the image's worker
 * pool: the loop serves other requests meanwhile.  Reads get their part
 * copied out; writes keep the cluster as the COW source for ALLOC_WRITE.
 * Entered again (WAKE) when the pool was full.
 */
static enum qsm_event step_decompress(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	if (posix_memalign((void **)&run->bounce, 4096, img->cluster_size))
		return fail(req, -ENOMEM);
	enum qsm_event ev = submit_work(req, decompress_fn, decompress_done);
	if (req->work_waiting) {
		free(run->bounce); /* not needed until the job is accepted */
		run->bounce = NULL;
	}
	return ev;
}

/* Free the deflated clusters of the request's batch. */
static void cz_release(struct qsm_req *req)
{
	for (unsigned i = 0; i < req->nb_cz; i++) {
		free(req->cz[i].out);
		req->cz[i].out = NULL;
	}
	req->nb_cz = 0;
}

/*
 * COMPRESS, on a worker thread: deflate one cluster of the caller's data
 * (zero padded past the end of the disk) as QEMU's qcow2_compress does
 * (metadata/compress.c), into at most cluster_size - 1 bytes; a cluster
 * that does not fit is stored as is (out NULL).  Touches only the job's
 * buffers and the caller's data.
 */
static void compress_fn(struct qsm_work *w)
{
	struct qsm_cjob *j = container_of(w, struct qsm_cjob, work);
	struct qsm_req *req = j->req;
	size_t cs = (size_t)req->img->cluster_size;
	uint8_t *in = malloc(cs), *out = malloc(cs);

	j->out = NULL;
	j->clen = 0;
	j->ret = 0;
	if (!in || !out) {
		j->ret = -ENOMEM;
		goto out;
	}
	qsm_iov_to_buf(req->iov, req->iovcnt, j->skip, in, j->len);
	memset(in + j->len, 0, cs - j->len);
	j->ret = qcow2_deflate(in, cs, out, cs - 1, &j->clen);
	if (j->ret == 0 && j->clen) {
		j->out = out;
		out = NULL;
	}
out:
	free(in);
	free(out);
}

/* COMPRESS, back on the loop: the batch moves on when its last job is in. */
static void compress_done(struct qsm_work *w)
{
	struct qsm_cjob *j = container_of(w, struct qsm_cjob, work);
	struct qsm_req *req = j->req;
	if (j->ret < 0 && !req->cz_ret)
		req->cz_ret = j->ret;
	assert(req->cz_pending > 0);
	if (--req->cz_pending == 0) {
		qsm_sm_post(req, req->cz_ret < 0 ? QSM_E_ERROR : QSM_E_FINISHED, req->cz_ret);
		qsm_sm_drain(req->img);
	}
}

/*
 * COMPRESS: the run's cluster must be deflated before its lookup.  When it
 * is in the current batch, pass through; otherwise deflate the next
 * QSM_CZ_BATCH clusters of the request (fewer when the pool is nearly full,
 * or wait for room: WAKE runs this again), one job each, in parallel.
 */
static enum qsm_event step_compress(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	uint64_t cs = img->cluster_size;
	uint64_t idx = req->done >> img->cluster_bits;
	struct qsm_work_pool *pool;
	int ret;

	assert(QSM_IS_ALIGNED(req->done, cs));
	if (req->nb_cz && idx >= req->cz_first && idx < req->cz_first + req->nb_cz)
		return QSM_E_FINISHED;
	cz_release(req);
	if (!req->cz && !(req->cz = calloc(QSM_CZ_BATCH, sizeof(*req->cz))))
		return fail(req, -ENOMEM);
	if ((ret = qsm_image_work(img, &pool)) < 0)
		return fail(req, ret);
	uint64_t left = QSM_DIV_ROUND_UP(req->bytes - req->done, cs);
	unsigned n = (unsigned)QSM_MIN(left, QSM_CZ_BATCH);
	req->cz_first = idx;
	req->cz_pending = 0;
	req->cz_ret = 0;
	for (unsigned i = 0; i < n; i++) {
		struct qsm_cjob *j = &req->cz[i];
		uint64_t skip = req->done + i * cs;
		*j = (struct qsm_cjob){
			.work = { .fn = compress_fn, .done = compress_done },
			.req = req, .skip = skip, .len = QSM_MIN(cs, req->bytes - skip),
		};
		ret = qsm_work_submit(pool, &j->work);
		if (ret < 0)
			break;
		req->nb_cz++;
		req->cz_pending++;
	}
	if (req->nb_cz)
		return QSM_E_WAIT; /* the last job's done posts FINISHED */
	if (ret != -EAGAIN)
		return fail(req, ret);
	req->work_wait.cb = work_room_cb;
	req->work_waiting = true;
	qsm_work_wait(pool, &req->work_wait);
	return QSM_E_WAIT;
}

/*
 * BYTE_ALLOC: reserve the compressed bytes (metadata/refcount.c,
 * qsm_refcount_alloc_bytes: packed after the previous compressed cluster, as
 * qemu-img does) and claim the guest cluster for the allocation (invariant 2)
 * until L2_UPDATE.  In memory, on the loop: allocations stay ordered however
 * the deflates finished.
 */
static enum qsm_event step_byte_alloc(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t fresh;

	if (img->error) {
		release_l2(req);
		return fail(req, -EIO);
	}
	int ret = qsm_refcount_alloc_bytes(img->rc, run->clen, &run->host, &fresh, qsm_req_rcw(req));
	if (ret == -EAGAIN) {
		/* No claim on the guest cluster yet: L2_LOOKUP classifies again. */
		release_l2(req);
		return qsm_rc_wait(req, QSM_E_LOADED);
	}
	qsm_refcount_unpin(img->rc, &req->rcw);
	if (ret < 0) {
		release_l2(req);
		return fail(req, ret);
	}
	run->bytes_held = true;
	if (fresh) {
		if (qsm_is_metadata(img, fresh)) {
			release_l2(req);
			return fail(req, qsm_image_corrupt(img, "the allocator returned cluster %#llx, which holds metadata: refcounts are damaged",
							    (unsigned long long)fresh));
		}
		img->stats.clusters_allocated++;
		qsm_prealloc_ahead(img, fresh + img->cluster_size);
	}
	run->alloc = (struct qsm_alloc){ .first = cluster_of(img, run->offset), .count = 1,
					 .host = run->host };
	run->alloc.next = img->allocs;
	if (img->allocs)
		img->allocs->prev = &run->alloc;
	img->allocs = &run->alloc;
	run->alloc_linked = true;
	run->allocating = true;
	return QSM_E_ALLOCATED;
}

static enum qsm_event step_compressed_write(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	req->iov_buf[0] = (struct iovec){ (void *)run->cdata, run->clen };
	return submit_io(req, QSM_IO_WRITE, QSM_IO_EV_COMPRESSED_WRITE, run->host, req->iov_buf, 1);
}

static enum qsm_event step_cluster_alloc(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t n = run->nb_clusters;
	if (img->error) {
		release_l2(req);
		return fail(req, -EIO);
	}
	int ret = qsm_refcount_alloc(img->rc, n, &run->host, qsm_req_rcw(req));
	if (ret == -EAGAIN) {
		/* No claim on the guest clusters yet: L2_LOOKUP classifies again. */
		release_l2(req);
		return qsm_rc_wait(req, QSM_E_LOADED);
	}
	qsm_refcount_unpin(img->rc, &req->rcw);
	if (ret < 0) {
		release_l2(req);
		if (ret == -EFBIG || ret == -ENOSPC)
			snprintf(img->errmsg, sizeof(img->errmsg),
				 "cannot allocate %llu clusters: %s", (unsigned long long)n,
				 strerror(-ret));
		return fail(req, ret);
	}
	for (uint64_t i = 0; i < n; i++) {
		if (qsm_is_metadata(img, run->host + (i << img->cluster_bits))) {
			release_l2(req);
			return fail(req, qsm_image_corrupt(img, "the allocator returned cluster %#llx, which holds metadata: refcounts are damaged",
							    (unsigned long long)(run->host + (i << img->cluster_bits))));
		}
	}
	img->stats.clusters_allocated += n;
	qsm_prealloc_ahead(img, run->host + (n << img->cluster_bits));
	run->alloc = (struct qsm_alloc){ .first = cluster_of(img, run->offset), .count = n };
	run->alloc.next = img->allocs;
	if (img->allocs)
		img->allocs->prev = &run->alloc;
	img->allocs = &run->alloc;
	run->alloc_linked = true;

	if (qcow2_entry_kind(run->old_entry) == QCOW2_EK_SHARED)
		return QSM_E_COW;
	if (run->cow_backing) {
		/* Copy what the write leaves of its first and last cluster from
		 * the backing image; past its end the data is zeros already. */
		uint64_t bsize = img->backing ? img->backing->hdr.size : 0;
		uint64_t end = run->offset + run->bytes;
		uint64_t head = in_cluster(img, run->offset);
		uint64_t tail = in_cluster(img, end) ? img->cluster_size - in_cluster(img, end) : 0;
		run->cow_head = run->offset - head < bsize ? QSM_MIN(head, bsize - (run->offset - head)) : 0;
		run->cow_tail = end < bsize ? QSM_MIN(tail, bsize - end) : 0;
		if (run->cow_head || run->cow_tail)
			return QSM_E_COW;
	}
	if (qcow2_entry_kind(run->old_entry) == QCOW2_EK_COMPRESSED)
		return QSM_E_COMPRESSED;
	/* Clusters never written since open read as zeros already (holes past
	 * the old end of file): the COW regions need no write at all, and other
	 * writes into these clusters may go ahead at once (JOIN_WRITE).  Reused
	 * clusters are zeroed first when the run leaves parts unwritten. */
	run->alloc.host = run->host;
	if (run->host < img->file_end &&
	    (in_cluster(img, run->offset) || in_cluster(img, run->offset + run->bytes)))
		return QSM_E_ZERO_FIRST;
	return QSM_E_NO_COW;
}

/* One zero-range operation over the new clusters (fallocate; io/ falls back
 * to writing zeros), instead of writing zero buffers with the data. */
static enum qsm_event step_zero_clusters(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	if (img->corrupt)
		return fail(req, -EIO); /* nothing more is written (sm/image.c) */
	req->io = (struct qsm_io_req){
		.op = QSM_IO_ZERO, .event = QSM_IO_EV_COW_WRITE, .offset = run->host,
		.len = run->nb_clusters << img->cluster_bits, .cb = req_io_cb,
	};
	qsm_io_submit(img->io, &req->io);
	return QSM_E_WAIT;
}

/* Where ALLOC_WRITE takes the tail of the last cluster from: the COW buffer
 * holds the first cluster, then (for runs of several clusters) the last. */
static uint8_t *cow_tail_buf(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	return run->bounce + (run->nb_clusters > 1 ? img->cluster_size : 0) +
	       in_cluster(img, run->offset + run->bytes);
}

static void cow_backing_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	if (ret < 0 && !req->io_ret)
		req->io_ret = ret;
	if (--req->io_pending == 0)
		qsm_sm_post(req, req->io_ret ? QSM_E_ERROR : QSM_E_IO_DONE, req->io_ret);
}

/* COW_READ over a backing file: head and tail read in parallel from the
 * backing image into a zeroed buffer (whatever is not read stays zeros). */
static enum qsm_event cow_read_backing(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	size_t blen = (size_t)img->cluster_size * (run->nb_clusters > 1 ? 2 : 1);
	struct { uint64_t off; uint64_t len; uint8_t *buf; } part[2];
	unsigned n = 0;

	if (posix_memalign((void **)&run->bounce, 4096, blen))
		return fail(req, -ENOMEM);
	memset(run->bounce, 0, blen);
	uint64_t cstart = QSM_ALIGN_DOWN(run->offset, img->cluster_size);
	uint64_t bsize = img->backing->hdr.size;
	if (run->nb_clusters == 1 && run->bytes <= img->cluster_size / 2 && cstart < bsize) {
		/* A small write: read the whole cluster, the part the write will
		 * cover included, in one request.  One read instead of two, and
		 * the reads of neighbouring clusters touch, so the block layer
		 * merges them (partial writes over a backing file go as fast as
		 * the backing file reads sequentially). */
		part[n++] = (typeof(part[0])){ cstart, QSM_MIN(img->cluster_size, bsize - cstart),
					       run->bounce };
	} else {
		if (run->cow_head)
			part[n++] = (typeof(part[0])){ cstart, run->cow_head, run->bounce };
		if (run->cow_tail)
			part[n++] = (typeof(part[0])){ run->offset + run->bytes, run->cow_tail,
						       cow_tail_buf(req) };
	}
	assert(n > 0 && req->iov_cap >= 2);
	req->io_pending = n;
	req->io_ret = 0;
	for (unsigned i = 0; i < n; i++) {
		req->iov_buf[i] = (struct iovec){ part[i].buf, part[i].len };
		int ret = qsm_readv(img->backing, part[i].off, &req->iov_buf[i], 1,
				    cow_backing_cb, req);
		if (ret < 0) {
			req->io_pending -= n - i;
			if (!req->io_pending)
				return fail(req, ret);
			req->io_ret = ret; /* the read in flight reports it */
			break;
		}
	}
	return QSM_E_WAIT;
}

static enum qsm_event step_cow_read(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	if (run->cow_backing)
		return cow_read_backing(req);
	assert(run->nb_clusters == 1);
	if (posix_memalign((void **)&run->bounce, 4096, img->cluster_size))
		return fail(req, -ENOMEM);
	req->iov_buf[0] = (struct iovec){ run->bounce, img->cluster_size };
	return submit_io(req, QSM_IO_READ, QSM_IO_EV_COW_READ,
			 qcow2_entry_offset(run->old_entry), req->iov_buf, 1);
}

/* Point the run's cached L2 entries at its new clusters and release what
 * they pointed at (deferred until the table is durable). */
static int l2_point_at_new(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	for (uint64_t i = 0; i < run->nb_clusters; i++) {
		uint64_t old = qsm_l2_entry(run->l2, run->l2_index + i);
		qsm_l2_set_entry(run->l2, run->l2_index + i,
				 qcow2_entry_data(run->host + (i << img->cluster_bits)));
		int ret = free_old_entry(img, old);
		if (ret < 0)
			return ret;
	}
	qsm_l2_mark_dirty(&img->l2c, run->l2);
	return 0;
}

static enum qsm_event step_alloc_write(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t head = in_cluster(img, run->offset);
	uint64_t span = run->nb_clusters << img->cluster_bits;
	uint64_t tail = span - head - run->bytes;
	/* The clusters read as zeros now (fresh or just zeroed): others may
	 * write into them while we do (JOIN_WRITE). */
	run->alloc.joinable = !run->bounce;
	bool fill = run->bounce != NULL; /* COW from old data; zeros need no write */
	int cnt = 0;

	if (fill && head)
		req->iov_buf[cnt++] = (struct iovec){ run->bounce, head };
	int n = run_payload(req, req->iov_buf + cnt, req->iov_cap - cnt - 1);
	assert(n > 0);
	cnt += n;
	if (fill && tail)
		req->iov_buf[cnt++] = (struct iovec){ cow_tail_buf(req), tail };
	uint64_t host = fill ? run->host : run->host + head;
	if (QSM_MUTANT(L2_BEFORE_DATA)) {
		/* mutant: the entries point at the new clusters (and a batch
		 * may write them) while the data is still on its way. */
		int ret = l2_point_at_new(req);
		if (ret < 0)
			return fail(req, ret);
		qsm_wb_kick(img);
	}
	return submit_io(req, QSM_IO_WRITE, run->bounce ? QSM_IO_EV_COW_WRITE : QSM_IO_EV_DATA_WRITE,
			 host, req->iov_buf, cnt);
}

static enum qsm_event step_l2_update(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	if (img->error) /* the table could never be written: do not dirty it */
		return fail(req, -EIO);
	if (run->compressed) {
		uint64_t old = qsm_l2_entry(run->l2, run->l2_index);
		qsm_l2_set_entry(run->l2, run->l2_index,
				 qcow2_compressed_entry(img->cluster_bits, run->host, run->clen));
		run->bytes_held = false; /* mapped now */
		img->stats.compressed_clusters++;
		int ret = free_old_entry(img, old);
		if (ret < 0)
			return fail(req, ret);
		qsm_l2_mark_dirty(&img->l2c, run->l2);
	} else if (!QSM_MUTANT(L2_BEFORE_DATA)) { /* the mutant did it before the data write */
		int ret = l2_point_at_new(req);
		if (ret < 0)
			return fail(req, ret);
	}
	release_l2(req);
	alloc_unlink(req, 0);
	return QSM_E_UPDATED;
}

static enum qsm_event step_zero_update(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	bool v3 = img->hdr.version >= 3;
	bool changed = false;

	if (img->error)
		return fail(req, -EIO);

	for (uint64_t i = 0; i < run->nb_clusters; i++) {
		uint64_t idx = run->l2_index + i;
		uint64_t old = qsm_l2_entry(run->l2, idx);
		int ret = check_l2_entry(req, idx, old);
		if (ret < 0)
			return fail(req, ret);
		enum qcow2_entry_kind k = qcow2_entry_kind(old);
		uint64_t old_host = (k == QCOW2_EK_COMPRESSED) ? 0 : qcow2_entry_offset(old);
		uint64_t new;
		bool unmap;

		if (k == QCOW2_EK_COMPRESSED) {
			/* As QEMU: a compressed cluster is always released; v2 has
			 * no zero flag, so it is deallocated (no backing file here,
			 * see classify_zeroes/classify_discard). */
			new = qcow2_entry_zero(img->hdr.version);
			unmap = true;
		} else if (req->machine == QSM_M_DISCARD) {
			/* As QEMU: v3 keeps a zero cluster so nothing shows through
			 * (unallocated clusters over a backing file included), v2
			 * can only deallocate (and never runs with a backing file,
			 * see classify_discard). */
			if (k == QCOW2_EK_ZERO || (k == QCOW2_EK_UNALLOC && !qsm_has_backing(img)))
				continue;
			new = qcow2_entry_zero(img->hdr.version);
			unmap = true;
		} else if (!v3) {
			/* v2 has no zero flag: a whole cluster is deallocated. */
			if (k == QCOW2_EK_UNALLOC)
				continue;
			new = 0;
			unmap = true;
		} else {
			unmap = (req->flags & QSM_ZERO_MAY_UNMAP) && old_host;
			new = (unmap ? 0 : old) | QCOW2_L2E_ZERO;
		}
		if (new == old)
			continue;
		qsm_l2_set_entry(run->l2, idx, new);
		changed = true;
		if (unmap && (ret = free_old_entry(img, old)) < 0)
			return fail(req, ret);
	}
	if (changed)
		qsm_l2_mark_dirty(&img->l2c, run->l2);
	release_l2(req);
	return QSM_E_UPDATED;
}

/* Does this write complete only once durable: the cache mode says so, or
 * the request has FUA (QSM_REQ_FUA, QSM_ZERO_FUA: the same bit)? */
static bool wants_durable(const struct qsm_req *req)
{
	enum qsm_cache_mode c = req->img->cache;
	return c == QSM_CACHE_WRITETHROUGH || c == QSM_CACHE_DIRECTSYNC ||
	       (req->flags & QSM_REQ_FUA);
}

static enum qsm_event step_next_run(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	assert(!run->l2 && !run->alloc_linked);
	req->done += run->bytes;
	if (req->machine == QSM_M_READ)
		img->stats.bytes_read += run->bytes;
	else if (req->machine == QSM_M_WRITE || req->machine == QSM_M_WRITE_COMPRESSED)
		img->stats.bytes_written += run->bytes;
	if (req->done < req->bytes)
		return QSM_E_MORE;
	if (is_write_machine(req->machine) && wants_durable(req))
		return QSM_E_NEED_DURABLE;
	return QSM_E_FINISHED;
}

static enum qsm_event step_join_wait(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	if (!run->join_done)
		return QSM_E_WAIT; /* alloc_unlink posts WAKE or ERROR */
	return run->join_ret < 0 ? fail(req, run->join_ret) : QSM_E_UPDATED;
}

static enum qsm_event step_durable_wait(struct qsm_req *req)
{
	/* A close, or a blocking full write-back: the batch writes the
	 * deferred refcounts too and goes round until clean. */
	if (req->machine == QSM_M_CLOSE || (req->flags & QSM_REQ_FULL_WRITEBACK))
		req->img->wb_full = true;
	qsm_wb_join(req->img, req);
	return QSM_E_WAIT;
}

/* Entry action of each state. */
static enum qsm_event step(struct qsm_req *req)
{
	switch (req->state) {
	case QSM_S_L1_LOOKUP:     return step_l1_lookup(req);
	case QSM_S_L2_ALLOC:      return step_l2_alloc(req);
	case QSM_S_L2_LOOKUP:     return step_l2_lookup(req);
	case QSM_S_DATA_READ:
	case QSM_S_DATA_WRITE:
	case QSM_S_JOIN_WRITE:    return step_data_io(req);
	case QSM_S_JOIN_WAIT:     return step_join_wait(req);
	case QSM_S_ZERO_FILL:     return step_zero_fill(req);
	case QSM_S_BACKING_READ:  return step_backing_read(req);
	case QSM_S_BACKING_STATUS: return step_backing_status(req);
	case QSM_S_FILE_RANGE:    return step_file_range(req);
	case QSM_S_CLUSTER_ALLOC: return step_cluster_alloc(req);
	case QSM_S_COW_READ:      return step_cow_read(req);
	case QSM_S_ZERO_CLUSTERS: return step_zero_clusters(req);
	case QSM_S_COMPRESSED_READ: return step_compressed_read(req);
	case QSM_S_DECOMPRESS:    return step_decompress(req);
	case QSM_S_COMPRESS:      return step_compress(req);
	case QSM_S_BYTE_ALLOC:    return step_byte_alloc(req);
	case QSM_S_COMPRESSED_WRITE: return step_compressed_write(req);
	case QSM_S_ALLOC_WRITE:   return step_alloc_write(req);
	case QSM_S_L2_UPDATE:     return step_l2_update(req);
	case QSM_S_ZERO_UPDATE:   return step_zero_update(req);
	case QSM_S_NEXT_RUN:      return step_next_run(req);
	case QSM_S_DURABLE_WAIT:  return step_durable_wait(req);
	/* Waiting states: the event comes from whoever we wait on. */
	case QSM_S_FROZEN:
	case QSM_S_L2_LOAD:
	case QSM_S_REFBLOCK_LOAD:
	case QSM_S_ALLOC_WAIT:
		return QSM_E_WAIT;
	case QSM_S_WB_COLLECT:
	case QSM_S_WB_REFBLOCKS:
	case QSM_S_WB_REFTABLE:
	case QSM_S_WB_HEADER:
	case QSM_S_WB_L2:
	case QSM_S_WB_L1:
	case QSM_S_WB_SYNC_DATA:
	case QSM_S_WB_SYNC_REFBLOCKS:
	case QSM_S_WB_SYNC_REFTABLE:
	case QSM_S_WB_SYNC_HEADER:
	case QSM_S_WB_SYNC_L2:
	case QSM_S_WB_SYNC_L1:
	case QSM_S_WB_RELEASE:
		return qsm_wb_step(req, QSM_E_BEGIN, 0);
	case QSM_S_CLOSE_DRAIN:
	case QSM_S_CLOSE_MARK_CORRUPT:
	case QSM_S_CLOSE_SYNC:
	case QSM_S_CLOSE_TRIM:
		return qsm_close_step(req);
	case QSM_S_START:
	case QSM_S_DONE:
	case QSM_S__COUNT:
		break;
	}
	abort();
}

/*
 * Per-state invariants (assert_pager_state style), checked by the dispatcher
 * on entry to every state: after the edge is taken, before the state's step
 * runs.  One case per state of sm/states.def and no default, so a new state
 * without its case is a compiler warning (-Wswitch).  Cheap: no list walk
 * but the short list of L1 slots being given a table (FROZEN).
 *
 * Everywhere but DONE (an error leaves through DONE from anywhere, with the
 * run half set up: req_complete releases what is held):
 *   - the request is not in the run queue, and nothing it started is still
 *     out: no data I/O (io_busy), no parallel I/O (io_pending), no worker
 *     pool wait, no deflate job (whatever ends a wait posts its event once,
 *     when it is over);
 *   - it sleeps in a waiter list (waiting) in FROZEN and ALLOC_WAIT only;
 *   - compressed bytes read (cbuf) exist only in DECOMPRESS, compressed bytes
 *     reserved and not yet mapped (bytes_held) only in COMPRESSED_WRITE and
 *     L2_UPDATE.
 * In the states of a run (run_ok): the run is the next bytes of the request,
 * not empty, inside one L2 table (design invariant 4: the only table it may
 * hold); the states that modify that table hold it, and it is the table
 * the L1 entry names, owned (COPIED) (l2_owned); the states from CLUSTER_ALLOC
 * (BYTE_ALLOC) to L2_UPDATE have the run's allocation record linked and
 * covering exactly the run's clusters (alloc_ok, design invariant 2); every
 * state that waits for another request holds no table (design invariant 4).
 */
__attribute__((unused)) static bool run_ok(const struct qsm_req *req)
{
	const struct qsm_image *img = req->img;
	const struct qsm_run *run = &req->run;
	if (run->bytes == 0 || run->offset != req->offset + req->done ||
	    run->offset + run->bytes > req->offset + req->bytes)
		return false;
	if (img->raw) /* one run, file offset = guest offset */
		return run->host == run->offset && !run->l2;
	uint64_t span = img->l2_entries << img->cluster_bits;
	return run->l1_index == run->offset / span && run->l1_index < img->l1_size &&
	       (run->offset + run->bytes - 1) / span == run->l1_index &&
	       run->l2_index == (cluster_of(img, run->offset) & (img->l2_entries - 1));
}

/* The run holds no cache reference and no allocation record. */
__attribute__((unused)) static bool run_unheld(const struct qsm_run *run)
{
	return !run->l2 && !run->alloc_linked;
}

/* The run holds its table, ready, and it is the one the L1 entry names now,
 * owned by this image (COPIED): the one a change must go to. */
__attribute__((unused)) static bool l2_owned(const struct qsm_req *req)
{
	const struct qsm_l2_table *t = req->run.l2;
	uint64_t l1e = qsm_l1_get(req->img, req->run.l1_index);
	return t && t->ref > 0 && t->state == QSM_L2_READY &&
	       t->offset == (l1e & QCOW2_L1E_OFFSET_MASK) && (l1e & QCOW2_OFLAG_COPIED);
}

/* The run's allocation record is linked and covers exactly its clusters. */
__attribute__((unused)) static bool alloc_ok(const struct qsm_req *req)
{
	const struct qsm_run *run = &req->run;
	return run->alloc_linked && run->allocating && run->host != 0 &&
	       run->alloc.first == cluster_of(req->img, run->offset) &&
	       run->alloc.count == run->nb_clusters &&
	       run->nb_clusters == run_clusters(req->img, run->offset, run->bytes);
}

/* CLUSTER_ALLOC's clusters: whole, for the run's whole clusters. */
__attribute__((unused)) static bool cluster_alloc_ok(const struct qsm_req *req)
{
	return run_ok(req) && l2_owned(req) && alloc_ok(req) && !req->run.compressed &&
	       QSM_IS_ALIGNED(req->run.host, req->img->cluster_size);
}

/* Data I/O through an L2 entry (or a raw file): the host bytes are the run's
 * place in its host cluster. */
__attribute__((unused)) static bool data_host_ok(const struct qsm_req *req)
{
	const struct qsm_run *run = &req->run;
	return (req->img->raw || run->host != 0) &&
	       in_cluster(req->img, run->host) == in_cluster(req->img, run->offset);
}

static const struct qsm_meta_batch *wb_level_batch(const struct qsm_wb *wb, enum qsm_state s);

__attribute__((unused)) static bool req_invariants(const struct qsm_req *req)
{
	const struct qsm_image *img = req->img;
	const struct qsm_run *run = &req->run;
	enum qsm_machine m = req->machine;
	bool wr = is_write_machine(m);

	if (req->state == QSM_S_DONE)
		return !req->waiting && !req->queued;
	if (req->queued || req->io_busy || req->io_pending || req->work_waiting ||
	    req->cz_pending || req->done > req->bytes || (m == QSM_M_WRITEBACK) != !!req->wb)
		return false;
	if (req->waiting != (req->state == QSM_S_FROZEN || req->state == QSM_S_ALLOC_WAIT))
		return false;
	if (run->cbuf && req->state != QSM_S_DECOMPRESS)
		return false;
	if (run->bytes_held && req->state != QSM_S_COMPRESSED_WRITE && req->state != QSM_S_L2_UPDATE)
		return false;

	switch (req->state) {
	case QSM_S_START:
		return req->done == 0 && run_unheld(run);
	/* Lookup. */
	case QSM_S_L1_LOOKUP: /* run_init sets up the next run */
		return !img->raw && req->done < req->bytes && run_unheld(run) && !run->joined;
	case QSM_S_FROZEN: {
		const struct qsm_l2alloc *a = l2alloc_find(img, run->l1_index);
		return wr && run_ok(req) && run_unheld(run) && a && a->owner != req;
	}
	case QSM_S_L2_ALLOC:
		return wr && run_ok(req) && run_unheld(run);
	case QSM_S_L2_LOOKUP: /* a table handed over by L2_ALLOC or a load, or none */
		return run_ok(req) && !run->alloc_linked && !run->joined &&
		       (!run->l2 || (run->l2->ref > 0 && run->l2->state == QSM_L2_READY));
	case QSM_S_L2_LOAD:
		return run_ok(req) && run_unheld(run);
	case QSM_S_REFBLOCK_LOAD: /* invariant 4: no table, no claim while waiting */
		return run_unheld(run) && (m == QSM_M_WRITEBACK || run_ok(req));
	case QSM_S_ALLOC_WAIT:
		return wr && run_ok(req) && run_unheld(run) && !run->joined && img->allocs;
	/* Reads. */
	case QSM_S_DATA_READ:
		return m == QSM_M_READ && run_ok(req) && run_unheld(run) && data_host_ok(req);
	case QSM_S_ZERO_FILL:
		return m == QSM_M_READ && run_ok(req) && run_unheld(run);
	case QSM_S_BACKING_READ:
		return m == QSM_M_READ && run_ok(req) && run_unheld(run) && qsm_has_backing(img);
	case QSM_S_BACKING_STATUS:
		return m == QSM_M_ZEROES && run_ok(req) && run_unheld(run) && img->backing &&
		       !req->probe_done;
	case QSM_S_COMPRESSED_READ:
		if (!run_ok(req) || run->nb_clusters != 1 || !(run->old_entry & QCOW2_OFLAG_COMPRESSED) ||
		    run->bounce)
			return false;
		return m == QSM_M_READ ? run_unheld(run) : l2_owned(req) && alloc_ok(req);
	case QSM_S_DECOMPRESS: /* also re-entered when the pool had no room */
		if (!run_ok(req) || !run->cbuf || run->bounce || run->nb_clusters != 1)
			return false;
		return m == QSM_M_READ ? run_unheld(run) : l2_owned(req) && alloc_ok(req);
	/* Compressed writes. */
	case QSM_S_COMPRESS:
		return m == QSM_M_WRITE_COMPRESSED && req->done < req->bytes &&
		       QSM_IS_ALIGNED(req->done, img->cluster_size) && run_unheld(run) && !run->joined;
	case QSM_S_BYTE_ALLOC:
		return m == QSM_M_WRITE_COMPRESSED && run_ok(req) && l2_owned(req) &&
		       !run->alloc_linked && run->compressed && run->nb_clusters == 1 &&
		       run->clen > 0 && run->clen < img->cluster_size;
	case QSM_S_COMPRESSED_WRITE:
		return run_ok(req) && l2_owned(req) && alloc_ok(req) && run->compressed &&
		       run->bytes_held;
	/* Writes. */
	case QSM_S_DATA_WRITE: /* in place */
		return wr && run_ok(req) && run_unheld(run) && !run->allocating && data_host_ok(req);
	case QSM_S_FILE_RANGE:
		return img->raw && (m == QSM_M_ZEROES || m == QSM_M_DISCARD) && run_ok(req);
	case QSM_S_CLUSTER_ALLOC:
		return wr && run_ok(req) && l2_owned(req) && !run->alloc_linked && run->allocating &&
		       !run->compressed && !run->bounce &&
		       run->nb_clusters == run_clusters(img, run->offset, run->bytes);
	case QSM_S_COW_READ:
		return cluster_alloc_ok(req) && !run->bounce &&
		       (run->cow_backing ? img->backing && (run->cow_head || run->cow_tail)
					 : qcow2_entry_kind(run->old_entry) == QCOW2_EK_SHARED);
	case QSM_S_ZERO_CLUSTERS:
		return cluster_alloc_ok(req) && !run->bounce && run->alloc.host == run->host;
	case QSM_S_ALLOC_WRITE:
		return cluster_alloc_ok(req);
	case QSM_S_L2_UPDATE: /* after the data write: invariant 2 */
		return run_ok(req) && l2_owned(req) && alloc_ok(req) &&
		       (run->compressed ? run->bytes_held
					: QSM_IS_ALIGNED(run->host, img->cluster_size));
	case QSM_S_JOIN_WRITE:
		return m == QSM_M_WRITE && run_ok(req) && run_unheld(run) && data_host_ok(req) &&
		       run->joined && run->joined != &run->alloc && run->joined->joinable &&
		       !run->join_done;
	case QSM_S_JOIN_WAIT: /* still joined, or told how the owner's update went */
		return run_ok(req) && run_unheld(run) && (run->joined != NULL) != run->join_done;
	case QSM_S_ZERO_UPDATE:
		return (m == QSM_M_ZEROES || m == QSM_M_DISCARD) && run_ok(req) && l2_owned(req) &&
		       !run->alloc_linked && run->nb_clusters >= 1 &&
		       run->nb_clusters == run_clusters(img, run->offset, run->bytes);
	/* The end of a run, of a request. */
	case QSM_S_NEXT_RUN: /* the run is over: done advances past it */
		return run_ok(req) && run_unheld(run) && !run->joined;
	case QSM_S_DURABLE_WAIT: /* a close waits for its full batch here too */
		return (wr || m == QSM_M_FLUSH || m == QSM_M_CLOSE) && req->done == req->bytes &&
		       run_unheld(run) && !run->joined;
	/* The write-back batch. */
	case QSM_S_WB_COLLECT: /* a full batch's later rounds keep their waiters */
		return m == QSM_M_WRITEBACK && img->wb_job == req &&
		       (!req->wb->waiters || req->wb->round > 0);
	case QSM_S_WB_REFBLOCKS:
	case QSM_S_WB_REFTABLE:
	case QSM_S_WB_HEADER:
	case QSM_S_WB_L2:
	case QSM_S_WB_L1: /* only a level with something to write is entered */
		return m == QSM_M_WRITEBACK && img->wb_job == req &&
		       wb_level_batch(req->wb, req->state)->n > 0;
	case QSM_S_WB_SYNC_DATA:
	case QSM_S_WB_SYNC_REFBLOCKS:
	case QSM_S_WB_SYNC_REFTABLE:
	case QSM_S_WB_SYNC_HEADER:
	case QSM_S_WB_SYNC_L2:
	case QSM_S_WB_SYNC_L1:
	case QSM_S_WB_RELEASE:
		return m == QSM_M_WRITEBACK && img->wb_job == req;
	/* The close: new requests refused from the start; after the drain it
	 * is the only request in flight. */
	case QSM_S_CLOSE_DRAIN:
		return m == QSM_M_CLOSE && img->closing && img->close_req == req && !req->waiting;
	case QSM_S_CLOSE_TRIM: /* its batch is over, nothing else runs */
		return m == QSM_M_CLOSE && img->close_req == req && img->in_flight == 1 &&
		       !img->wb_job && req->ret == 0;
	case QSM_S_CLOSE_MARK_CORRUPT: /* in error: the close fails with it */
	case QSM_S_CLOSE_SYNC:
		return m == QSM_M_CLOSE && img->close_req == req && img->in_flight == 1 &&
		       !img->wb_job && req->ret < 0;
	case QSM_S_DONE:
	case QSM_S__COUNT:
		break;
	}
	return false;
}

/* --- completion and the dispatcher ---------------------------------------- */

/* States a request sleeps in on behalf of another (req->wait_for). */
static bool waits_on_other(enum qsm_state s)
{
	return s == QSM_S_FROZEN || s == QSM_S_ALLOC_WAIT || s == QSM_S_JOIN_WRITE ||
	       s == QSM_S_JOIN_WAIT || s == QSM_S_DURABLE_WAIT || s == QSM_S_L2_LOAD ||
	       s == QSM_S_REFBLOCK_LOAD;
}

/* The metadata batch a write-back level state writes, or NULL. */
static const struct qsm_meta_batch *wb_level_batch(const struct qsm_wb *wb, enum qsm_state s)
{
	switch (s) {
	case QSM_S_WB_REFBLOCKS: return &wb->blocks;
	case QSM_S_WB_REFTABLE: return &wb->reftable;
	case QSM_S_WB_HEADER: return &wb->header;
	case QSM_S_WB_L2: return &wb->l2;
	case QSM_S_WB_L1: return &wb->l1;
	default: return NULL;
	}
}

/* Only called when a hook is set: the cost of tracing stays here. */
static void trace_transition(struct qsm_req *req, enum qsm_state from, enum qsm_state to,
			     enum qsm_event ev, int ret)
{
	struct qsm_image *img = req->img;
	const struct qsm_run *run = &req->run;
	struct qsm_trace_event te = {
		.req_id = req->id,
		.kind = kind_names[req->machine],
		.offset = req->offset,
		.bytes = req->bytes,
		.from = state_names[from],
		.to = state_names[to],
		.event = event_labels[ev],
		.event_name = event_names[ev],
		.ret = ret,
		.time_ns = qsm_now_ns(),
		.meta_offset = run->l2 ? run->l2->offset : run->host,
		.run_offset = run->offset,
		.run_bytes = run->bytes,
		.host_offset = run->host,
		.wait_for = req->wait_for,
		.in_flight = img->in_flight,
		.dirty_l2 = qsm_l2_dirty_count(&img->l2c),
		.dirty_refcounts = img->rc && qsm_refcount_dirty(img->rc),
		.io_flushes = img->stats.io_flushes,
	};
	/* The run is set up by L1_LOOKUP (run->bytes != 0): its L2 table is
	 * the one the L1 entry names now (cached, being loaded, or new). */
	if (run->bytes && !img->raw && req->machine != QSM_M_WRITEBACK &&
	    run->l1_index < img->l1_size)
		te.l2_offset = qsm_l1_get(img, run->l1_index) & QCOW2_L1E_OFFSET_MASK;
	if (req->machine == QSM_M_WRITEBACK && req->wb) {
		const struct qsm_wb *wb = req->wb;
		const struct qsm_meta_batch *b = wb_level_batch(wb, from);
		te.host_offset = 0;
		te.wb_refblocks = wb->blocks.n;
		te.wb_reftable = wb->reftable.n;
		te.wb_header = wb->header.n;
		te.wb_l2 = wb->l2.n;
		te.wb_l1 = wb->l1.n;
		if (b) {
			te.meta_writes = b->n;
			te.meta_offset = b->n ? b->w[0].offset : 0;
		} else if (from == QSM_S_WB_COLLECT) {
			te.meta_writes = wb->blocks.n + wb->reftable.n + wb->header.n + wb->l2.n +
					 wb->l1.n;
			te.meta_offset = 0;
		}
	}
	img->trace(img->trace_opaque, &te);
	if (!waits_on_other(to))
		req->wait_for = 0;
}

static void req_unlink(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	if (req->all_prev)
		req->all_prev->all_next = req->all_next;
	else
		img->all = req->all_next;
	if (req->all_next)
		req->all_next->all_prev = req->all_prev;
	img->in_flight--;
	if (img->close_req && req != img->close_req)
		qsm_close_wake(img); /* a close may be waiting for this one */
}

static void req_complete(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	/* Error exits may leave resources held; release them here.  Compressed
	 * bytes reserved but never mapped are referenced by nothing. */
	if (run->bytes_held) {
		release_unmapped(req, run->host, run->clen);
		run->bytes_held = false;
	}
	if (img->rc)
		qsm_refcount_unpin(img->rc, &req->rcw);
	release_l2(req);
	alloc_unlink(req, req->ret ? req->ret : -EIO);
	join_unlink(req);
	assert(!run->l2 && !run->alloc_linked);
	if (req->machine == QSM_M_WRITEBACK) {
		qsm_wb_step(req, QSM_E_FINISHED, req->ret);
	} else if (req->ret == 0) {
		switch (req->machine) {
		case QSM_M_READ: img->stats.reads++; break;
		case QSM_M_WRITE:
		case QSM_M_WRITE_COMPRESSED: img->stats.writes++; break;
		case QSM_M_ZEROES: img->stats.zero_writes++; break;
		case QSM_M_DISCARD: img->stats.discards++; break;
		case QSM_M_FLUSH: /* the caller's, not qsm_sync_writeback's */
			if (!(req->flags & QSM_REQ_FULL_WRITEBACK))
				img->stats.flushes++;
			break;
		default: break;
		}
	}
	if (req->wt_counted) { /* failed before DURABLE_WAIT */
		req->wt_counted = false;
		img->wt_pending--;
		qsm_wb_maybe_start(img, false);
	}
	req_unlink(req);
	free(run->bounce);
	free(run->cbuf);
	cz_release(req);
	free(req->cz);
	free(req->iov_buf);
	if (req->cb)
		req->cb(req->opaque, req->ret);
	free(req);
}

/*
 * The dispatcher: the only place a request changes state (invariant 1 of the
 * design block).  An edge missing from the table is a bug in qsm: abort with
 * the request's state printed rather than continue on a path nobody drew.
 */
static void qsm_sm_run(struct qsm_req *req, enum qsm_event ev, int ret)
{
	struct qsm_image *img = req->img;
	for (;;) {
		enum qsm_state from = req->state;
		int to;
		if (ev == QSM_E_ERROR) {
			if (!req->ret)
				req->ret = ret < 0 ? ret : -EIO;
			to = QSM_S_DONE;
		} else {
			to = qsm_transition(req->machine, from, ev);
			if (to < 0) {
				fprintf(stderr, "qsm: BUG: req#%llu %s has no edge %s --%s-->\n",
					(unsigned long long)req->id, machine_names[req->machine],
					state_names[from], event_names[ev]);
				abort();
			}
		}
		if (QSM_UNLIKELY(img->trace != NULL))
			trace_transition(req, from, (enum qsm_state)to, ev, req->ret);
		req->state = (enum qsm_state)to;
		assert(req_invariants(req));
		if (to == QSM_S_DONE) {
			req_complete(req);
			return;
		}
		ev = step(req);
		if (ev == QSM_E_WAIT)
			return;
		ret = req->ret;
	}
}

void qsm_sm_post(struct qsm_req *req, enum qsm_event ev, int ret)
{
	struct qsm_image *img = req->img;
	assert(!req->queued);
	req->queued = true;
	req->q_event = ev;
	req->q_ret = ret;
	req->q_next = NULL;
	*img->q_tail = req;
	img->q_tail = &req->q_next;
	if (!img->draining)
		event_active(img->run_ev, 0, 0);
}

void qsm_sm_drain(struct qsm_image *img)
{
	if (img->draining)
		return;
	img->draining = true;
	while (img->q_head) {
		struct qsm_req *req = img->q_head;
		img->q_head = req->q_next;
		if (!img->q_head)
			img->q_tail = &img->q_head;
		req->queued = false;
		qsm_sm_run(req, req->q_event, req->q_ret);
	}
	img->draining = false;
}

struct qsm_req *qsm_req_new(struct qsm_image *img, enum qsm_machine m, int iov_cap)
{
	struct qsm_req *req = calloc(1, sizeof(*req));
	if (!req)
		return NULL;
	if (iov_cap > 0) {
		req->iov_cap = iov_cap;
		req->iov_buf = malloc(sizeof(struct iovec) * (size_t)iov_cap);
		if (!req->iov_buf) {
			free(req);
			return NULL;
		}
	}
	req->img = img;
	req->machine = m;
	req->state = QSM_S_START;
	req->id = ++img->next_id;
	req->all_next = img->all;
	if (img->all)
		img->all->all_prev = req;
	img->all = req;
	img->in_flight++;
	return req;
}

/*
 * A raw image maps guest offset x to file offset x: the whole request is one
 * run, handed to DATA_READ, DATA_WRITE or FILE_RANGE by the RAW edges.  Block
 * status asks io/ whether the file holds data or a hole there (as QEMU's
 * file driver, with lseek): DATA or ZERO, always ALLOCATED (see qsm.h).
 */
static enum qsm_event raw_start(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	run->offset = run->host = req->offset;
	run->bytes = req->bytes;
	if (req->machine == QSM_M_STATUS) {
		bool data;
		uint64_t len;
		int ret = qsm_io_extent(req->img->io, req->offset, req->bytes, &data, &len);
		if (ret < 0)
			return fail(req, ret);
		*req->status_out = (struct qsm_extent){
			req->offset, len,
			(data ? QSM_STATUS_DATA : QSM_STATUS_ZERO) | QSM_STATUS_ALLOCATED, req->offset };
	}
	return QSM_E_RAW;
}

void qsm_sm_start(struct qsm_req *req)
{
	enum qsm_event ev = QSM_E_BEGIN;
	bool internal = req->machine == QSM_M_WRITEBACK || req->machine == QSM_M_CLOSE;
	if (req->bytes == 0 && !internal)
		ev = QSM_E_NOTHING_TO_DO;
	if (req->machine == QSM_M_FLUSH)
		ev = req->img->cache == QSM_CACHE_UNSAFE && !(req->flags & QSM_REQ_FULL_WRITEBACK)
			     ? QSM_E_IGNORED : QSM_E_NEED_DURABLE;
	if (is_write_machine(req->machine) && wants_durable(req) && ev == QSM_E_BEGIN) {
		req->wt_counted = true;
		req->img->wt_pending++;
	}
	if (req->img->raw && ev == QSM_E_BEGIN && !internal)
		ev = raw_start(req);
	qsm_sm_post(req, ev, 0);
}

/* For gdb and failing tests: every live request with its state. */
void qsm_image_dump(struct qsm_image *img, FILE *f)
{
	fprintf(f, "image: %llu in flight, wb_job %s, error %d, l2 cache %zu/%zu (%zu dirty)\n",
		(unsigned long long)img->in_flight, img->wb_job ? "running" : "idle", img->error,
		img->l2c.nb_entries, img->l2c.capacity, img->l2c.nb_dirty);
	for (struct qsm_req *r = img->all; r; r = r->all_next)
		fprintf(f, "  req#%llu %s %s off %#llx+%llu done %llu%s%s%s\n",
			(unsigned long long)r->id, kind_names[r->machine], state_names[r->state],
			(unsigned long long)r->offset, (unsigned long long)r->bytes,
			(unsigned long long)r->done, r->waiting ? " waiting" : "",
			r->queued ? " queued" : "", r->run.l2 ? " holds-l2" : "");
}
