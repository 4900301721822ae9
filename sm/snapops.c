/*
 * sm/snapops.c: internal snapshots taken, applied and deleted (qemu-img
 * snapshot -c / -a / -d, and the library's qsm_snapshot_*_async and their
 * blocking forms).  The table's format is metadata/snapshot.c's; this file
 * changes the image: refcounts, L1 and L2 tables, the snapshot table, the
 * header.
 *
 * An operation is one request of machine SNAPSHOT (sm/states.def), run on
 * the image's loop like every other: it never blocks the loop, and it may
 * be submitted while guest requests are in flight (a live snapshot):
 *
 *   START > SNAP_DRAIN > DURABLE_WAIT > SNAP_NEXT > step > SNAP_NEXT > ...
 *                                       (> DURABLE_WAIT > SNAP_NEXT) > DONE
 *
 * What runs beside it.  From its submit until it is DONE, new requests of
 * the kinds it holds back wait in HELD (qsm_snap_holds), before anything is
 * looked up or counted; it first waits (SNAP_DRAIN) until the ones already
 * started are over, then one full write-back batch makes everything
 * durable, then its steps run.  At DONE (success or failure) the held
 * requests start, in the order they were submitted.
 *   - create and delete hold back write-zeroes, discards and compressed
 *     writes (and reads under copy-on-read, which write): requests that
 *     change L2 entries or refcounts.  Plain writes start (late writes,
 *     invariant 14): a run over clusters the active disk owns alone
 *     (COPIED) is written in place, as always, and the first run that
 *     would allocate, copy on write or create an L2 table sends the write
 *     to HELD instead (qsm_snap_defer), to be looked up again once the
 *     operation is over.  Reads, block status and flushes keep running
 *     throughout: the mapping of the active disk does not change, and the
 *     L2 tables the operation edits (COPIED flags) are edited in the L2
 *     cache the reads and late writes share.
 *   - apply holds back everything: the disk itself changes.
 *   - so does the one operation here that is no snapshot's: the growth of
 *     the active L1 table (OP_GROW, qsm_snap_grow_l1), which a VM-state
 *     write past the table's end starts (sm/vmstate.c invariant 2): the
 *     table every request reads is replaced.
 *
 * Its steps, each resumable where it stopped (a table or refcount block
 * not cached, an I/O in flight: the state's own WAKE edge):
 *   SNAP_L1_LOAD   read the snapshot's L1 table (apply, delete)
 *   SNAP_L1_WRITE  an L1 table to new clusters: the active table's copy
 *                  (create), the new active table (apply)
 *   SNAP_REFS      +1 or -1 on every cluster an L1 table references
 *   SNAP_COPIED    COPIED set exactly where the refcount is 1 (active tables)
 *   SNAP_TABLE     the new snapshot table to new clusters
 *   SNAP_COMMIT    the header names the new snapshot table (create, delete)
 *                  or the new active L1 table (apply): the commit point
 *   SNAP_VMSTATE   create with VM state (opts): the active copy of it
 *                  discarded, as QEMU does (a DISCARD request of its own,
 *                  neither held nor waited for by the drain)
 *   SNAP_FREE      the clusters of an L1 table nothing names any more
 * and SNAP_NEXT takes the next from the operation's plan (plans[] below),
 * through DURABLE_WAIT where the plan says SYNC.
 *
 * The refcount work is QEMU's qcow2_update_snapshot_refcount, batched: the
 * references an L1 table makes (its L2 tables, and through them data,
 * preallocated zero and compressed clusters, a compressed cluster once per
 * reference) are gathered per L2 table into runs of consecutive host
 * clusters, and each run is one qsm_refcount_update, so a refcount block
 * is changed in place however many clusters it counts; each L2 table is
 * read through the cache by the walk and by the COPIED pass and written at
 * most once per operation (by the write-back, when a flag changed), and an
 * L2 table whose entries are all unallocated costs its read only.
 *
 * Crash safety.  On a v3 image the dirty bit (incompatible bit 0) is
 * durable while an operation changes refcounts and COPIED flags together,
 * and held until the operation is over (img->dirty_hold): qemu-img check
 * may find refcounts one too high (leaks) or COPIED flags that disagree
 * with them in the middle of an operation, and an image with the dirty bit
 * set is repaired when QEMU or qsm opens it read-write.  A create writes
 * it first (its COPIED flags change before its commit), an apply or a
 * delete with its commit (they change COPIED flags after it; before it,
 * a crash leaves at most leaks, as QEMU's do).  The order of each plan then makes every intermediate state
 * one whose repair gives the image before or after the operation, never one
 * where a cluster is referenced more than its refcount says:
 *   create: the L1 copy and the new snapshot table written, refcounts +1
 *           and COPIED cleared in the active tables, the late writes over
 *           (invariant 14), all durable (one
 *           batch: the copy and the table before it; refcount blocks,
 *           L2 and L1 in one level under the dirty bit, in that order on
 *           v2); then the header naming the table (the commit point, with
 *           the dirty bit cleared: nothing is left to repair), the old
 *           table freed once that is durable.
 *   delete: the table without the entry, then the header (the commit
 *           point, with the dirty bit, in the batch whose first sync makes
 *           the table durable;
 *           the old table freed once the header is); then the snapshot's
 *           references and its L1 copy released; COPIED restored where
 *           refcounts are back to 1.
 *   apply:  refcounts +1 for the snapshot's tables and a new active L1
 *           table written to new clusters, then the header naming it and
 *           setting the dirty bit (one batch: refcount blocks and the L1
 *           durable before the header;
 *           the commit point is a single sector write, so unlike QEMU's
 *           in-place L1 overwrite a crash never leaves a mix of the two
 *           tables); then the old active references and L1 released and
 *           COPIED set where refcounts are 1.
 *   grow:   the grown copy of the active table written to new clusters,
 *           then the header naming it (one batch: the table and the
 *           refcounts counting it durable before the header; the drain's
 *           batch made every L2 table it names durable), no dirty bit
 *           (no intermediate state needs a repair); the old table's
 *           clusters released after (a crash before their refcount is
 *           written leaks them).
 * A v2 image has no dirty bit: the same order holds, and a crash can leave
 * what qemu-img check -r all repairs (leaks, COPIED cleared where the
 * refcount is 1: a copy on write where an in-place write would have done).
 *
 * Transition -> function
 *   START -> SNAP_DRAIN ................................ qsm_sm_begin
 *   SNAP_DRAIN -> SNAP_DRAIN|DURABLE_WAIT .............. qsm_snap_step
 *                                 (WAKE from qsm_snap_wake)
 *   SNAP_NEXT -> SNAP_DRAIN ............................ qsm_snap_step
 *                                 (create's QUIESCE, invariant 14)
 *   SNAP_DRAIN -> SNAP_NEXT ............................ qsm_snap_step
 *                                 (its late writes over: WAKE from
 *                                 qsm_snap_wake, qsm_snap_defer)
 *   DURABLE_WAIT -> SNAP_NEXT .......................... qsm_wb_join
 *                                 (the batch's WB_DONE)
 *   SNAP_NEXT -> SNAP_*|DURABLE_WAIT|DONE .............. qsm_snap_step
 *   SNAP_L1_LOAD, SNAP_L1_WRITE, SNAP_TABLE -> SNAP_L1_LOAD|SNAP_L1_WRITE|SNAP_TABLE|SNAP_NEXT ..
 *                                 qsm_snap_step (WAKE: snap_io_cb)
 *   SNAP_REFS, SNAP_COPIED, SNAP_FREE -> SNAP_REFS|SNAP_COPIED|SNAP_FREE|SNAP_NEXT ..
 *                                 qsm_snap_step (WAKE: snap_l2_cb,
 *                                 snap_rc_cb)
 *   SNAP_COMMIT -> SNAP_NEXT ........................... qsm_snap_step
 *   SNAP_VMSTATE -> SNAP_VMSTATE|SNAP_NEXT ............. qsm_snap_step
 *                                 (WAKE: vmstate_cb)
 *   START -> HELD ...................................... qsm_sm_start
 *   L1_LOOKUP, L2_LOOKUP -> HELD ....................... qsm_snap_defer
 *                                 (a late write, invariant 14)
 *   HELD -> L1_LOOKUP|COMPRESS|DURABLE_WAIT|DONE ....... qsm_snap_resume
 *                                 (from snap_release, at the operation's end)
 *
 * Invariants
 *  12. At most one snapshot operation exists (img->snap_req).  From its
 *      SNAP_DRAIN on, no request of a kind it holds back is started
 *      (img->writers == 0 for create and delete, img->active == 0 for
 *      apply and the L1 growth): whatever it reads and changes, only it
 *      changes.
 *  14. Late writes (req->late, counted in img->late_writes: begun while a
 *      create or delete runs) change no L1 entry, L2 entry or refcount:
 *      only an in-place run (QSM_E_IN_PLACE, a COPIED data cluster) gets
 *      past L2_LOOKUP, anything else defers.  So a delete needs nothing
 *      more: the clusters they write are the active disk's alone, no
 *      snapshot's.  A create makes those clusters shared; its COPIED pass
 *      clears the flags (later lookups defer), then QUIESCE closes the door
 *      (every new write held from START) and waits until no late write is
 *      in flight, before the table and header: no data write lands in a
 *      cluster the new snapshot shares once the create is committed.  A
 *      late write that completed before the create did is in the snapshot
 *      whole; one deferred part way may be in it in part (the runs it
 *      wrote in place), as a crash at that moment would leave it.
 *  13. A step holds no L2 table reference while it waits (as invariant 4
 *      for requests): a table is taken, used and put back within one run
 *      of a step, the position kept in the job.
 */
#include <assert.h>
#include <errno.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "metadata/l2entry.h"
#include "metadata/snapshot.h"
#include "sm/steps.h"

#define SNAP_FAIL(code, ...)                                                   \
	do {                                                                   \
		if (err)                                                       \
			snprintf(err, errlen, __VA_ARGS__);                    \
		return (code);                                                 \
	} while (0)

/* OP_GROW: the active L1 table moved to a larger one (a VM-state write past
 * its end, qsm_snap_grow_l1): apply's L1 steps without its references. */
enum snap_op { OP_CREATE, OP_APPLY, OP_DELETE, OP_GROW };

/* The steps of a plan.  SYNC: one full write-back batch (DURABLE_WAIT);
 * QUIESCE: no more late writes, and those in flight over (SNAP_DRAIN
 * again, invariant 14); END: the dirty bit let go (the next SYNC clears
 * it); FAIL: done, with the error the plan was switched to (job->ret). */
enum snap_phase {
	PH_L1_LOAD, PH_L1_WRITE, PH_REFS, PH_COPIED, PH_QUIESCE, PH_TABLE, PH_COMMIT, PH_VMSTATE,
	PH_FREE_L1, PH_SYNC, PH_END, PH_FAIL, PH_STOP,
};

/*
 * Each plan starts after the first full write-back (SNAP_DRAIN's).  One
 * SYNC covers several steps where a write-back batch's own order is the
 * one needed: an L1 copy or snapshot table written by a step before the
 * batch is durable at its first sync, refcount blocks are durable before
 * the header, and a full batch releases deferred frees (the old snapshot
 * table's clusters, freed at SNAP_COMMIT) only once the header that
 * stopped naming them is durable.  While the dirty bit is durable, a batch
 * without a header write writes refcount blocks, L2 and L1 entries as one
 * level (qsm_snap_flat): what the dirty bit covers needs no order.  What
 * must be durable before the header names it and is not a refcount gets a
 * batch of its own before SNAP_COMMIT (create: the COPIED flags).  An
 * END before a commit lets that commit's header clear the dirty bit too
 * (sm/writeback.c: a full batch writing only the header, all else
 * durable).
 */
static const enum snap_phase plans[4][16] = {
	/* create: the L1 copy, +1 on what the active tables reference, COPIED
	 * cleared, the writes in place over, the new table (durable, one
	 * level); the header, clean again, the old table freed after it, the
	 * active VM state dropped (durable) */
	[OP_CREATE] = { PH_L1_WRITE, PH_REFS, PH_COPIED, PH_QUIESCE, PH_TABLE, PH_SYNC, PH_END,
			PH_COMMIT, PH_VMSTATE, PH_SYNC, PH_STOP },
	/* apply: +1 on what the snapshot references, the new active L1, the
	 * header (durable: refcounts and the L1 first); -1 on what the old
	 * active tables referenced, their L1 freed, COPIED set (durable) */
	[OP_APPLY] = { PH_L1_LOAD, PH_REFS, PH_L1_WRITE, PH_COMMIT, PH_SYNC, PH_REFS, PH_FREE_L1,
		       PH_COPIED, PH_END, PH_SYNC, PH_STOP },
	/* delete: the table without it, the header (durable: the table
	 * first), the old table freed after it; its references and its L1
	 * copy released, COPIED set where refcounts are 1 again (durable) */
	[OP_DELETE] = { PH_L1_LOAD, PH_TABLE, PH_COMMIT, PH_SYNC, PH_REFS, PH_FREE_L1, PH_COPIED,
			PH_END, PH_SYNC, PH_STOP },
	/* L1 growth: the grown copy to new clusters, the header naming it
	 * (durable: refcounts and the table first); the old table released
	 * (made durable by the next batch: a crash before it leaks it) */
	[OP_GROW] = { PH_L1_WRITE, PH_COMMIT, PH_SYNC, PH_FREE_L1, PH_STOP },
};
/* Mutant snap-early-free (sm/mutant.c): delete's references dropped first. */
static const enum snap_phase early_free_plan[16] = {
	PH_L1_LOAD, PH_REFS, PH_FREE_L1, PH_TABLE, PH_SYNC, PH_COMMIT, PH_SYNC, PH_COPIED,
	PH_END, PH_SYNC, PH_STOP,
};
/* A refcount overflow on the first +1 walk (undone): nothing changed but
 * (create) the L1 copy, which is freed. */
static const enum snap_phase abort_plan[4][4] = {
	[OP_CREATE] = { PH_FREE_L1, PH_END, PH_SYNC, PH_FAIL },
	[OP_APPLY] = { PH_END, PH_SYNC, PH_FAIL },
};

/* A run of consecutive host clusters that get the same delta. */
struct snap_run {
	uint64_t start, n;
};

struct qsm_snapjob {
	enum snap_op op;
	const enum snap_phase *plan;
	unsigned pc;                 /* next step of plan */
	int ret;                     /* the error a FAIL plan ends with */
	bool begun;                  /* the image changed: a failure is sticky */
	bool dirty_set;              /* the first batch writes the dirty bit */
	bool drained;                /* past the drain batch (qsm_snap_flat) */
	bool writes_closed;          /* create, from QUIESCE: every write held (invariant 14) */

	/* apply, delete: the snapshot (its numbers; strings die with the table) */
	struct qcow2_snapshot sn;
	/* create, delete: the new table (owned until committed) */
	struct qcow2_snapshot_table t;
	/* The L1 table the operation brings in or drops: create, the active
	 * table's copy; apply, the snapshot's (the new active table, room for
	 * l1_room entries); delete, the snapshot's. */
	uint8_t *l1;
	uint64_t l1_entries, l1_room;
	uint64_t l1_off;             /* create: the copy's clusters; apply: the new table's */
	/* apply: the old active table, released after the commit */
	uint8_t *old_l1;
	uint64_t old_l1_size, old_l1_off;
	/* delete: the old snapshot table, freed by SNAP_FREE once the header
	 * that stopped naming it is durable (then zeroed) */
	uint64_t old_table_off, old_table_size;

	/* SNAP_REFS: the walk of `walk` (walk_size entries) adding delta; the
	 * runs of L2 table `wi` (gathered), runs[ri..nb_runs) still to apply;
	 * applied so far, at most limit (an undo walk stops there). */
	const uint8_t *walk;
	uint64_t walk_size;
	int64_t delta;
	uint64_t wi, applied, limit;
	struct snap_run *runs;
	size_t nb_runs, ri;
	bool gathered, undoing;
	uint64_t file_size;          /* bounds every table and cluster offset */

	/* SNAP_COPIED: L1 index ci, its L1 entry done (ci_l1), L2 entry cj */
	uint64_t ci, cj;
	bool ci_l1;

	/* SNAP_L1_LOAD, SNAP_L1_WRITE, SNAP_TABLE: one I/O */
	struct qsm_io_req io;
	struct iovec iov;
	uint8_t *buf;                /* SNAP_TABLE's serialized table */
	uint64_t table_off, table_size;
	enum { IO_NONE, IO_OUT, IO_DONE } io_state;
	/* SNAP_VMSTATE: the discard submitted, then over (vm_ret its result) */
	uint64_t vm_state_size;
	enum { VM_NONE, VM_OUT, VM_DONE } vm_state;
	int vm_ret;

	struct qsm_l2_waiter l2w;
	struct qsm_l2_table *l2;     /* handed over by snap_l2_cb */

	struct qsm_req *req;         /* the SNAPSHOT request running the job */
	char *err;
	size_t errlen;
	qsm_cb cb;
	void *opaque;
};

/* --- holding requests back (invariant 12) ----------------------------------- */

/* Apply and the L1 growth change the active disk's tables under every
 * request: they hold everything back. */
static bool holds_all(const struct qsm_snapjob *j)
{
	return j->op == OP_APPLY || j->op == OP_GROW;
}

static bool holds_writes(const struct qsm_image *img, enum qsm_machine m)
{
	return is_write_machine(m) || (m == QSM_M_READ && img->copy_on_read);
}

/* The VM-state discard of a create (qsm_vmstate_discard: only sm/snapops.c
 * submits one) is the operation's own: neither held nor waited for. */
static bool own_request(const struct qsm_req *req)
{
	return req->machine == QSM_M_DISCARD && (req->flags & QSM_REQ_VMSTATE);
}

bool qsm_snap_writer(const struct qsm_image *img, const struct qsm_req *req)
{
	return holds_writes(img, req->machine) && !own_request(req);
}

bool qsm_snap_holds(const struct qsm_image *img, const struct qsm_req *req)
{
	const struct qsm_req *s = img->snap_req;
	enum qsm_machine m = req->machine;
	if (!s || m == QSM_M_WRITEBACK || m == QSM_M_CLOSE || m == QSM_M_SNAPSHOT || img->raw)
		return false;
	/* A copy-on-read fill belongs to a read already started (and waited
	 * for): holding it would hold the operation up for ever. */
	if ((req->flags & QSM_REQ_COR_FILL) || own_request(req))
		return false;
	if (m == QSM_M_FLUSH ? img->cache == QSM_CACHE_UNSAFE : req->bytes == 0)
		return false; /* nothing to do: no reason to wait */
	if (holds_all(s->snap))
		return true;
	/* Plain writes start, late (in place only, invariant 14), until a
	 * create closes the door. */
	return holds_writes(img, m) && (m != QSM_M_WRITE || s->snap->writes_closed);
}

bool qsm_snap_admits(const struct qsm_image *img, const struct qsm_req *req)
{
	const struct qsm_req *s = img->snap_req;
	return s && !holds_all(s->snap) && !s->snap->writes_closed &&
	       req->machine == QSM_M_WRITE && !(req->flags & QSM_REQ_COR_FILL) && !img->raw;
}

enum qsm_event qsm_snap_defer(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	assert(req->late && img->snap_req);
	release_l2(req);
	qsm_refcount_unpin(img->rc, &req->rcw);
	req->late = false;
	img->late_writes--;
	img->stats.snap_deferred++;
	qsm_snap_wake(img); /* a create may be waiting for the last late write */
	return QSM_E_HOLD;
}

/* A started write counted among the writers from now on: the next
 * operation's drain waits for it. */
static void count_as_writer(struct qsm_req *req)
{
	req->counted_writer = true;
	req->img->writers++;
}

void qsm_snap_resume(struct qsm_req *req)
{
	if (!req->counted) {
		qsm_sm_begin(req);
		return;
	}
	count_as_writer(req);
	qsm_sm_post(req, QSM_E_BEGIN, 0);
}

bool qsm_snap_flat(const struct qsm_image *img)
{
	const struct qsm_req *r = img->snap_req;
	return r && r->snap && r->snap->drained && img->disk_dirty && img->hdr.version >= 3;
}

bool qsm_snap_drained(const struct qsm_image *img)
{
	const struct qsm_req *s = img->snap_req;
	if (!s)
		return false;
	if (holds_all(s->snap))
		return img->active == 0;
	return img->writers == 0 && (!s->snap->writes_closed || img->late_writes == 0);
}

void qsm_snap_wake(struct qsm_image *img)
{
	struct qsm_req *s = img->snap_req;
	if (s && s->state == QSM_S_SNAP_DRAIN && !s->queued && qsm_snap_drained(img))
		qsm_sm_post(s, QSM_E_WAKE, 0);
}

/* The held requests start, oldest first (or fail, the image in error). */
static void snap_release(struct qsm_image *img)
{
	struct qsm_wait *w = img->held, *rev = NULL;
	img->held = NULL;
	img->nb_held = 0;
	while (w) {
		struct qsm_wait *next = w->next;
		w->next = rev;
		rev = w;
		w = next;
	}
	for (w = rev; w;) {
		struct qsm_wait *next = w->next;
		struct qsm_req *req = w->req;
		req->waiting = false;
		if (img->error && holds_writes(img, req->machine))
			qsm_sm_post(req, QSM_E_ERROR, img->error);
		else
			qsm_snap_resume(req);
		w = next;
	}
}

/* --- waiting inside a step (invariant 13) ----------------------------------- */

/* A table read for a step, or a cache slot: back into the step (WAKE). */
static void snap_l2_cb(struct qsm_l2_waiter *w, int ret)
{
	struct qsm_snapjob *j = container_of(w, struct qsm_snapjob, l2w);
	if (ret == 0 && w->table)
		j->l2 = w->table; /* reference handed to us */
	qsm_sm_post(j->req, ret < 0 ? QSM_E_ERROR : QSM_E_WAKE, ret);
}

/* A refcount block read (the request's own waiter, rb_resume = WAKE). */
static struct qsm_rc_waiter *snap_rcw(struct qsm_req *req)
{
	req->rb_resume = QSM_E_WAKE;
	return qsm_req_rcw(req);
}

/* The table at l2_off for this step, or -EAGAIN (the step waits: WAKE). */
static int snap_l2_get(struct qsm_req *req, uint64_t l2_off, struct qsm_l2_table **out)
{
	struct qsm_snapjob *j = req->snap;
	if (j->l2) { /* handed over while we waited */
		*out = j->l2;
		j->l2 = NULL;
		if ((*out)->offset == l2_off)
			return 0;
		qsm_l2_put(&req->img->l2c, *out);
	}
	j->l2w.fn = snap_l2_cb;
	j->l2w.tag = req->id;
	int ret = qsm_l2_get(&req->img->l2c, l2_off, out, &j->l2w);
	if (ret == -EAGAIN)
		req->wait_for = j->l2w.waiting_on;
	return ret;
}

static void snap_io_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_snapjob *j = container_of(io, struct qsm_snapjob, io);
	struct qsm_image *img = j->req->img;
	j->io_state = IO_DONE;
	qsm_sm_post(j->req, ret < 0 ? QSM_E_ERROR : QSM_E_WAKE, ret);
	qsm_sm_drain(img);
}

/* One read or write of the job, tagged for tracing and fault injection. */
static enum qsm_event snap_io(struct qsm_req *req, enum qsm_io_op op, enum qsm_io_event ev,
			      void *buf, size_t len, uint64_t off)
{
	struct qsm_snapjob *j = req->snap;
	struct qsm_image *img = req->img;
	if (op == QSM_IO_WRITE && img->corrupt)
		return fail(req, -EIO);
	j->iov = (struct iovec){ buf, len };
	j->io = (struct qsm_io_req){ .op = op, .event = ev, .offset = off, .len = len,
				     .iov = &j->iov, .iovcnt = 1, .cb = snap_io_cb };
	if (op == QSM_IO_WRITE && off + len > img->file_end)
		img->file_end = off + len;
	j->io_state = IO_OUT;
	qsm_io_submit(img->io, &j->io);
	return QSM_E_WAIT;
}

static uint64_t clusters_for(const struct qsm_image *img, uint64_t bytes)
{
	return (bytes + img->cluster_size - 1) >> img->cluster_bits;
}

/* Is the step's one I/O over (snap_io_cb woke it)?  Then it leaves. */
static bool io_over(struct qsm_snapjob *j)
{
	if (j->io_state != IO_DONE)
		return false;
	j->io_state = IO_NONE;
	return true;
}

/* n new clusters at *off, unless the step took them already (*off != 0):
 * 0, -EAGAIN (a refcount block is read: the step waits, WAKE) or -errno. */
static int alloc_once(struct qsm_req *req, uint64_t n, uint64_t *off)
{
	struct qsm_image *img = req->img;
	if (*off)
		return 0;
	int ret = qsm_refcount_alloc(img->rc, n, off, snap_rcw(req));
	if (ret == -EAGAIN)
		return ret;
	qsm_refcount_unpin(img->rc, &req->rcw);
	return qsm_image_rc_error(img, ret);
}

/* --- SNAP_REFS: the batched reference walk ----------------------------------- */

/* Is off, the target of an L1 or L2 entry, a cluster in the file? */
static int check_target(struct qsm_req *req, uint64_t off, const char *what, uint64_t idx)
{
	struct qsm_image *img = req->img;
	if (off & (img->cluster_size - 1))
		return qsm_image_corrupt(img, "%s offset %#llx unaligned (index %#llx)", what,
					 (unsigned long long)off, (unsigned long long)idx);
	if (off >= req->snap->file_size)
		return qsm_image_corrupt(img, "%s offset %#llx past the end of the file (index %#llx)",
					 what, (unsigned long long)off, (unsigned long long)idx);
	return 0;
}

static void run_add(struct qsm_snapjob *j, uint64_t cluster, uint64_t n)
{
	struct snap_run *r = j->nb_runs ? &j->runs[j->nb_runs - 1] : NULL;
	if (r && cluster == r->start + r->n)
		r->n += n;
	else
		j->runs[j->nb_runs++] = (struct snap_run){ cluster, n };
}

/* The runs of L2 table wi: the table itself, then what its entries
 * reference, in table order (the same runs each walk, so an undo walk with
 * limit = applied undoes exactly what was done). */
static int gather(struct qsm_req *req, const struct qsm_l2_table *t, uint64_t l2)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	int ret;
	j->nb_runs = j->ri = 0;
	run_add(j, l2 >> img->cluster_bits, 1);
	for (uint64_t e_i = 0; e_i < img->l2_entries; e_i++) {
		uint64_t e = qsm_l2_entry(t, e_i), first, count;
		switch (qcow2_entry_kind(e)) {
		case QCOW2_EK_COMPRESSED:
			qcow2_compressed_clusters(img->cluster_bits, e, &first, &count);
			run_add(j, first, count);
			break;
		case QCOW2_EK_DATA:
		case QCOW2_EK_SHARED:
		case QCOW2_EK_ZERO_ALLOC:
			if ((ret = check_target(req, qcow2_entry_offset(e), "data cluster",
						j->wi * img->l2_entries + e_i)) < 0)
				return ret;
			run_add(j, qcow2_entry_offset(e) >> img->cluster_bits, 1);
			break;
		default:
			break;
		}
	}
	return 0;
}

/* Start a walk of l1 (entries) adding delta. */
static void walk_init(struct qsm_snapjob *j, const uint8_t *l1, uint64_t entries, int64_t delta)
{
	j->walk = l1;
	j->walk_size = entries;
	j->delta = delta;
	j->wi = j->applied = 0;
	j->limit = UINT64_MAX;
	j->gathered = j->undoing = false;
}

static enum qsm_event step_refs(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	int ret;

	/* Every valid host offset is below what the file holds or the
	 * refcounts cover (no blocking fstat: the image is live). */
	j->file_size = QSM_MAX(img->file_end, qsm_refcount_image_end(img->rc));
	for (; j->wi < j->walk_size; j->wi++) {
		uint64_t l2 = qcow2_be64(j->walk + j->wi * 8) & QCOW2_L1E_OFFSET_MASK;
		if (!l2)
			continue;
		if (!j->gathered) {
			struct qsm_l2_table *t;
			if ((ret = check_target(req, l2, "L2 table", j->wi)) < 0)
				return fail(req, ret);
			if ((ret = snap_l2_get(req, l2, &t)) == -EAGAIN)
				return QSM_E_WAIT;
			if (ret < 0)
				return fail(req, ret);
			ret = gather(req, t, l2);
			qsm_l2_put(&img->l2c, t);
			if (ret < 0)
				return fail(req, ret);
			j->gathered = true;
		}
		for (; j->ri < j->nb_runs; j->ri++) {
			if (j->applied >= j->limit)
				goto walked; /* the undo is complete */
			const struct snap_run *r = &j->runs[j->ri];
			ret = qsm_refcount_update(img->rc, r->start, r->n, j->delta, snap_rcw(req));
			if (ret == -EAGAIN)
				return QSM_E_WAIT;
			if (ret == -ERANGE && !j->undoing && j->delta > 0) {
				/* Nothing changed by this run: undo the runs
				 * before it, then fail (abort_plan). */
				qsm_refcount_unpin(img->rc, &req->rcw);
				j->limit = j->applied;
				j->delta = -j->delta;
				j->wi = j->applied = 0;
				j->gathered = false;
				j->undoing = true;
				j->ret = -ERANGE;
				return QSM_E_WAKE;
			}
			if ((ret = qsm_image_rc_error(img, ret)) < 0)
				return fail(req, ret);
			j->applied++;
		}
		qsm_refcount_unpin(img->rc, &req->rcw);
		j->gathered = false;
	}
walked:
	qsm_refcount_unpin(img->rc, &req->rcw);
	if (j->undoing) {
		snprintf(j->err, j->errlen,
			 "Refcount overflow: a cluster would be referenced more often than "
			 "refcount_bits=%u can count", 1u << img->hdr.refcount_order);
		j->plan = abort_plan[j->op];
		j->pc = 0;
	}
	return QSM_E_FINISHED;
}

/* --- SNAP_COPIED ------------------------------------------------------------- */

/* The refcount of a host cluster: 0 with *v, or -EAGAIN (wait), or -errno. */
static int refcount_of(struct qsm_req *req, uint64_t off, uint64_t *v)
{
	struct qsm_image *img = req->img;
	if (qsm_refcount_peek(img->rc, off >> img->cluster_bits, v))
		return 0;
	return qsm_refcount_read(img->rc, off >> img->cluster_bits, v, snap_rcw(req));
}

/*
 * QEMU's COPIED rule on the active tables: set exactly on the L1 and
 * standard L2 entries (data and preallocated zero) whose cluster has
 * refcount 1.  Tables change in the L2 cache (the reads running beside the
 * operation see the flags at once) and are written by the next write-back
 * only if a flag changed; L1 entries change in memory, likewise.
 */
static enum qsm_event step_copied(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	uint64_t v;
	int ret;

	for (; j->ci < img->l1_size; j->ci++, j->cj = 0, j->ci_l1 = false) {
		uint64_t e1 = qsm_l1_get(img, j->ci), l2 = e1 & QCOW2_L1E_OFFSET_MASK;
		if (!l2)
			continue;
		if (!j->ci_l1) {
			if ((ret = refcount_of(req, l2, &v)) == -EAGAIN)
				return QSM_E_WAIT;
			if ((ret = qsm_image_rc_error(img, ret)) < 0)
				return fail(req, ret);
			uint64_t want = v == 1 ? l2 | QCOW2_OFLAG_COPIED : l2;
			if (want != e1)
				qsm_l1_set(img, j->ci, want);
			j->ci_l1 = true;
		}
		struct qsm_l2_table *t;
		if ((ret = snap_l2_get(req, l2, &t)) == -EAGAIN)
			return QSM_E_WAIT;
		if (ret < 0)
			return fail(req, ret);
		bool changed = false;
		for (; j->cj < img->l2_entries; j->cj++) {
			uint64_t e = qsm_l2_entry(t, j->cj);
			enum qcow2_entry_kind k = qcow2_entry_kind(e);
			if (k != QCOW2_EK_DATA && k != QCOW2_EK_SHARED && k != QCOW2_EK_ZERO_ALLOC)
				continue;
			if ((ret = refcount_of(req, qcow2_entry_offset(e), &v)) < 0)
				break; /* the table goes back first (invariant 13) */
			uint64_t ne = v == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
			if (ne != e) {
				qsm_l2_set_entry(t, j->cj, ne);
				changed = true;
			}
		}
		if (changed)
			qsm_l2_mark_dirty(&img->l2c, t);
		qsm_l2_put(&img->l2c, t);
		if (ret == -EAGAIN)
			return QSM_E_WAIT;
		if ((ret = qsm_image_rc_error(img, ret)) < 0)
			return fail(req, ret);
		qsm_refcount_unpin(img->rc, &req->rcw);
	}
	qsm_refcount_unpin(img->rc, &req->rcw);
	return QSM_E_FINISHED;
}

/* --- SNAP_L1_LOAD, SNAP_L1_WRITE, SNAP_TABLE, SNAP_FREE, SNAP_COMMIT ------------ */

static enum qsm_event step_l1_load(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	if (io_over(j))
		return QSM_E_FINISHED;
	j->l1_entries = j->sn.l1_size;
	j->l1_room = j->op == OP_APPLY ? QSM_MAX(img->l1_size, (uint64_t)j->sn.l1_size) : j->l1_entries;
	size_t bytes = (size_t)QSM_ALIGN_UP(QSM_MAX(j->l1_room * 8, 8), img->cluster_size);
	if (posix_memalign((void **)&j->l1, 4096, bytes))
		return fail(req, -ENOMEM);
	memset(j->l1, 0, bytes);
	if (!j->l1_entries)
		return QSM_E_FINISHED;
	return snap_io(req, QSM_IO_READ, QSM_IO_EV_L1_UPDATE, j->l1,
		       (size_t)QSM_ALIGN_UP(j->l1_entries * 8, 512), j->sn.l1_table_offset);
}

/* create: the active table's copy; apply: the new active table (the
 * snapshot's entries, zeros after them up to l1_room). */
static enum qsm_event step_l1_write(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	int ret;
	if (io_over(j))
		return QSM_E_FINISHED;
	uint64_t entries = j->op == OP_CREATE ? img->l1_size : j->l1_room;
	if (!entries)
		return QSM_E_FINISHED;
	if ((ret = alloc_once(req, clusters_for(img, entries * 8), &j->l1_off)) == -EAGAIN)
		return QSM_E_WAIT;
	if (ret < 0)
		return fail(req, ret);
	if (j->op == OP_CREATE || j->op == OP_GROW) {
		/* The active table as it is (nothing changes it now: invariant
		 * 12), at its size (create) or grown, zeros after it (grow). */
		size_t bytes = (size_t)QSM_ALIGN_UP(entries * 8, img->cluster_size);
		if (!j->l1 && posix_memalign((void **)&j->l1, 4096, bytes))
			return fail(req, -ENOMEM);
		memset(j->l1, 0, bytes);
		memcpy(j->l1, img->l1, img->l1_size * 8);
		j->l1_entries = entries;
	}
	if (j->op == OP_CREATE) {
		j->t.sn[j->t.nb - 1].l1_table_offset = j->l1_off; /* the new entry */
		j->t.sn[j->t.nb - 1].l1_size = (uint32_t)entries;
	}
	return snap_io(req, QSM_IO_WRITE, QSM_IO_EV_L1_UPDATE, j->l1,
		       (size_t)QSM_ALIGN_UP(entries * 8, 512), j->l1_off);
}

static enum qsm_event step_table(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	int ret;
	if (io_over(j))
		return QSM_E_FINISHED;
	if (!j->t.nb)
		return QSM_E_FINISHED; /* no table: the header says 0 at 0 */
	int64_t size = qcow2_snapshots_size(&j->t);
	if (size < 0)
		return fail(req, (int)size);
	uint64_t n = clusters_for(img, (uint64_t)size);
	if ((ret = alloc_once(req, n, &j->table_off)) == -EAGAIN)
		return QSM_E_WAIT;
	if (ret < 0)
		return fail(req, ret);
	j->table_size = (uint64_t)size;
	if (posix_memalign((void **)&j->buf, 4096, n << img->cluster_bits))
		return fail(req, -ENOMEM);
	memset(j->buf, 0, n << img->cluster_bits);
	if ((ret = qcow2_snapshots_serialize(&j->t, j->buf, (size_t)size)) < 0)
		return fail(req, ret);
	return snap_io(req, QSM_IO_WRITE, QSM_IO_EV_HEADER_UPDATE, j->buf,
		       (size_t)QSM_ALIGN_UP((uint64_t)size, 512), j->table_off);
}

/* The header written by the next SYNC carries the dirty bit (v3), unless
 * the disk has it already. */
static void mark_dirty(struct qsm_image *img, struct qsm_snapjob *j)
{
	if (img->disk_dirty)
		return;
	img->hdr.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
	img->header_dirty = true;
	j->dirty_set = true;
}

/* The commit point: the header names the new table (create, delete) or the
 * new active L1 (apply); made durable by the SYNC after it.  Apply and
 * delete set the dirty bit in it (v3): what they change after it, the
 * references they release and the COPIED flags, needs it; nothing before
 * it does (a crash there leaves leaks at most). */
static enum qsm_event step_commit(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qcow2_header *h = &img->hdr;
	struct qsm_snapjob *j = req->snap;
	int ret;

	if (holds_all(j)) {
		j->old_l1 = img->l1;
		j->old_l1_size = img->l1_size;
		j->old_l1_off = h->l1_table_offset;
		h->l1_table_offset = j->l1_off;
		h->l1_size = (uint32_t)j->l1_room;
		if (j->op == OP_APPLY)
			h->size = j->sn.disk_size; /* QEMU 7.2 resizes to the snapshot's size first */
		img->l1 = j->l1;
		j->l1 = NULL;
		img->l1_size = j->l1_room;
		img->l1_dirty_lo = img->l1_dirty_hi = 0;
		qsm_wb_l1_loaded(img);
		/* Nothing runs (apply holds everything): no table of the old
		 * disk stays cached. */
		if (j->op == OP_APPLY)
			qsm_l2_cache_drop_clean(&img->l2c);
	} else {
		uint64_t old_off = h->snapshots_offset, old_size = img->snaps.size;
		h->snapshots_offset = j->t.nb ? j->table_off : 0;
		h->nb_snapshots = j->t.nb;
		j->t.size = j->t.nb ? j->table_size : 0;
		qcow2_snapshots_release(&img->snaps);
		img->snaps = j->t;
		memset(&j->t, 0, sizeof(j->t));
		/* The old table's clusters: a delete frees them itself after
		 * the SYNC (SNAP_FREE, in the batch that writes its other
		 * refcounts); a create leaves them to the batch that makes
		 * this header durable, once it is (its WB_RELEASE). */
		if (j->op == OP_DELETE) {
			j->old_table_off = old_size ? old_off : 0;
			j->old_table_size = old_size;
		}
		for (uint64_t k = 0; j->op == OP_CREATE && old_size && k < clusters_for(img, old_size); k++)
			if ((ret = qsm_free_cluster_deferred(img, old_off + (k << img->cluster_bits))) < 0)
				return fail(req, ret);
	}
	img->header_dirty = true;
	if ((j->op == OP_APPLY || j->op == OP_DELETE) && h->version >= 3)
		mark_dirty(img, j);
	if ((ret = qsm_image_meta_rebuild(img)) < 0)
		return fail(req, ret);
	return QSM_E_FINISHED;
}

/* Drop one reference from the clusters of a table nothing names any more
 * (the committed header stopped naming it, or it was never named). */
static enum qsm_event step_free(struct qsm_req *req, uint64_t off, uint64_t bytes)
{
	struct qsm_image *img = req->img;
	if (!off || !bytes)
		return QSM_E_FINISHED;
	int ret = qsm_refcount_update(img->rc, off >> img->cluster_bits, clusters_for(img, bytes), -1,
				      snap_rcw(req));
	if (ret == -EAGAIN)
		return QSM_E_WAIT;
	qsm_refcount_unpin(img->rc, &req->rcw);
	if ((ret = qsm_image_rc_error(img, ret)) < 0)
		return fail(req, ret);
	return QSM_E_FINISHED;
}

/* The discard of the active VM state is over (from the loop). */
static void vmstate_cb(void *opaque, int ret)
{
	struct qsm_req *req = opaque;
	struct qsm_snapjob *j = req->snap;
	j->vm_state = VM_DONE;
	j->vm_ret = ret;
	qsm_sm_post(req, QSM_E_WAKE, 0);
}

/* After the commit (in memory; the SYNC after it makes both durable, the
 * header first): what the active L1 maps of the VM-state area the
 * snapshot now holds, dropped as QEMU's create does.  A failure leaves
 * the state where it was: the snapshot is taken, the image consistent. */
static enum qsm_event step_vmstate(struct qsm_req *req)
{
	struct qsm_snapjob *j = req->snap;
	if (j->vm_state == VM_DONE)
		return j->vm_ret < 0 ? fail(req, j->vm_ret) : QSM_E_FINISHED;
	if (!j->vm_state_size)
		return QSM_E_FINISHED;
	int ret = qsm_vmstate_discard(req->img, 0, j->vm_state_size, vmstate_cb, req);
	if (ret < 0)
		return fail(req, ret);
	j->vm_state = VM_OUT;
	return QSM_E_WAIT;
}

/* --- SNAP_DRAIN and SNAP_NEXT: the plan ----------------------------------------- */

/* Set up the step `ph` (the first time its state is entered). */
static enum qsm_event next_step(struct qsm_req *req, enum snap_phase ph)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	switch (ph) {
	case PH_L1_LOAD:
		return QSM_E_SN_L1_LOAD;
	case PH_L1_WRITE:
		j->begun = true;
		return QSM_E_SN_L1_WRITE;
	case PH_REFS:
		j->begun = true;
		if (j->op == OP_CREATE)
			walk_init(j, j->l1, j->l1_entries, +1);
		else if (j->op == OP_APPLY && !j->old_l1)
			walk_init(j, j->l1, j->sn.l1_size, +1); /* before the commit */
		else if (j->op == OP_APPLY)
			walk_init(j, j->old_l1, j->old_l1_size, -1);
		else
			walk_init(j, j->l1, j->l1_entries, -1);
		return QSM_E_SN_REFS;
	case PH_QUIESCE:
		j->writes_closed = true; /* new writes wait in HELD from here */
		return QSM_E_SN_DRAIN;
	case PH_COPIED:
		j->ci = j->cj = 0;
		j->ci_l1 = false;
		if (j->op == OP_CREATE && QSM_MUTANT(SNAP_COPIED_KEPT))
			return QSM_E_WAKE; /* mutant: the pass skipped */
		return QSM_E_SN_COPIED;
	case PH_TABLE:
		j->begun = true;
		return QSM_E_SN_TABLE;
	case PH_COMMIT:
		return QSM_E_SN_COMMIT;
	case PH_VMSTATE:
		return QSM_E_SN_VMSTATE;
	case PH_FREE_L1:
		return QSM_E_SN_FREE;
	case PH_SYNC:
		return QSM_E_NEED_DURABLE;
	case PH_END:
		img->dirty_hold = false;
		return QSM_E_WAKE; /* not a state: SNAP_NEXT goes on */
	case PH_FAIL: /* nothing changed: the image is as before */
		req->ret = j->ret;
		j->begun = false;
		return QSM_E_FINISHED;
	case PH_STOP:
		return QSM_E_FINISHED;
	}
	abort();
}

enum qsm_event qsm_snap_step(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_snapjob *j = req->snap;
	enum qsm_event ev;

	switch (req->state) {
	case QSM_S_SNAP_DRAIN:
		if (!qsm_snap_drained(img))
			return QSM_E_WAIT; /* qsm_snap_wake */
		if (j->writes_closed) /* QUIESCE: the late writes are over */
			return QSM_E_FINISHED;
		if (img->error || img->corrupt)
			return fail(req, img->corrupt ? -ENOMEDIUM : -EIO);
		/* Everything written back first; on v3 the dirty bit held
		 * until PH_END, and for a create written with it (apply and
		 * delete: with their commit, step_commit). */
		if (img->hdr.version >= 3 && j->op != OP_GROW) {
			img->dirty_hold = true;
			if (j->op == OP_CREATE)
				mark_dirty(img, j);
		}
		return QSM_E_NEED_DURABLE; /* (grow: every L2 table the new L1 names on disk) */
	case QSM_S_SNAP_NEXT:
		/* A SYNC just made the header with the dirty bit durable. */
		if (j->dirty_set && (j->pc == 0 || j->plan[j->pc - 1] == PH_SYNC)) {
			j->dirty_set = false;
			img->disk_dirty = true;
		}
		j->drained = true;
		do
			ev = next_step(req, j->plan[j->pc++]);
		while (ev == QSM_E_WAKE);
		return ev;
	case QSM_S_SNAP_L1_LOAD:
		return step_l1_load(req);
	case QSM_S_SNAP_L1_WRITE:
		return step_l1_write(req);
	case QSM_S_SNAP_REFS: /* WAKE out of it: an undo walk starts over */
		return step_refs(req);
	case QSM_S_SNAP_COPIED:
		return step_copied(req);
	case QSM_S_SNAP_TABLE:
		return step_table(req);
	case QSM_S_SNAP_COMMIT:
		return step_commit(req);
	case QSM_S_SNAP_VMSTATE:
		return step_vmstate(req);
	case QSM_S_SNAP_FREE:
		if (j->op == OP_CREATE) /* abort_plan: the unused L1 copy */
			return step_free(req, j->l1_off, j->l1_entries * 8);
		if (j->op == OP_GROW) /* the table it replaced */
			return step_free(req, j->old_l1_off, j->old_l1_size * 8);
		/* The tables only the released L1 named may be freed now: none
		 * stays cached (those in use by reads are the active ones). */
		qsm_l2_cache_drop_clean(&img->l2c);
		if (j->op == OP_APPLY)
			return step_free(req, j->old_l1_off, j->old_l1_size * 8);
		if (j->old_table_off) {
			ev = step_free(req, j->old_table_off, j->old_table_size);
			if (ev != QSM_E_FINISHED)
				return ev;
			j->old_table_off = 0; /* done: the L1 copy next */
		}
		return step_free(req, j->sn.l1_table_offset, (uint64_t)j->sn.l1_size * 8);
	default:
		abort();
	}
}

/* --- submit and completion ---------------------------------------------------- */

static void job_free(struct qsm_snapjob *j)
{
	qcow2_snapshots_release(&j->t);
	free(j->l1);
	free(j->old_l1);
	free(j->buf);
	free(j->runs);
	free(j);
}

void qsm_snap_forget(struct qsm_image *img)
{
	struct qsm_wait *w = img->held;
	img->held = NULL;
	img->nb_held = 0;
	while (w) {
		struct qsm_wait *next = w->next;
		w->req->waiting = false;
		qsm_req_forget(w->req);
		w = next;
	}
}

void qsm_snap_job_free(struct qsm_req *req)
{
	if (req->img->snap_req == req)
		req->img->snap_req = NULL;
	job_free(req->snap);
	req->snap = NULL;
}

/* DONE (req->cb, from req_complete): a failure after the image changed
 * leaves it accepting no more writes (a repair on the next read-write open
 * puts it right; the dirty bit is on disk for v3); then the held requests
 * start (held writes fail in that state) and the caller is told. */
static void snap_done(void *opaque, int ret)
{
	struct qsm_snapjob *j = opaque;
	struct qsm_image *img = j->req->img;
	static const char *const what[] = { "creating the snapshot", "applying the snapshot",
					    "deleting the snapshot", "growing the L1 table" };
	if (ret < 0 && j->begun && !img->error) {
		img->error = -EIO;
		snprintf(img->errmsg, sizeof(img->errmsg),
			 "%s failed (%s); the image accepts no more writes", what[j->op], strerror(-ret));
	}
	if (ret < 0 && j->err && j->errlen && !j->err[0])
		snprintf(j->err, j->errlen, "%s", strerror(-ret));
	if (j->l2)
		qsm_l2_put(&img->l2c, j->l2);
	img->dirty_hold = false;
	img->snap_req = NULL;
	/* Late writes still running are writers now: the next operation
	 * waits for them in its drain. */
	for (struct qsm_req *r = img->all; r; r = r->all_next)
		if (r->late) {
			r->late = false;
			img->late_writes--;
			count_as_writer(r);
		}
	assert(img->late_writes == 0);
	snap_release(img);
	qsm_cb cb = j->cb;
	void *cb_opaque = j->opaque;
	job_free(j);
	if (cb)
		cb(cb_opaque, ret);
}

/* Refusals common to the three operations; 0 when one may start. */
static int op_check(struct qsm_image *img, char *err, size_t errlen)
{
	if (img->raw)
		SNAP_FAIL(-ENOTSUP, "The image format does not support snapshots");
	if (img->read_only)
		SNAP_FAIL(-EBADF, "Image is read-only");
	if (img->corrupt)
		SNAP_FAIL(-ENOMEDIUM, "%s", img->errmsg);
	if (img->error)
		SNAP_FAIL(-EIO, "%s", img->errmsg);
	if (img->closing)
		SNAP_FAIL(-ESHUTDOWN, "The image is being closed");
	if (img->snap_req)
		SNAP_FAIL(-EBUSY, "Another snapshot operation is in progress");
	return 0;
}

static struct qsm_snapjob *job_new(struct qsm_image *img, enum snap_op op)
{
	struct qsm_snapjob *j = calloc(1, sizeof(*j));
	if (!j)
		return NULL;
	/* one L2 table's runs at most: the table and one per entry */
	j->runs = malloc((img->l2_entries + 1) * sizeof(*j->runs));
	if (!j->runs) {
		free(j);
		return NULL;
	}
	j->op = op;
	j->plan = op == OP_DELETE && QSM_MUTANT(SNAP_EARLY_FREE) ? early_free_plan : plans[op];
	return j;
}

static int job_start(struct qsm_image *img, struct qsm_snapjob *j, char *err, size_t errlen,
		     qsm_cb cb, void *opaque)
{
	struct qsm_req *req = qsm_req_new(img, QSM_M_SNAPSHOT, 0);
	if (!req) {
		job_free(j);
		SNAP_FAIL(-ENOMEM, "%s", strerror(ENOMEM));
	}
	req->flags = QSM_REQ_FULL_WRITEBACK; /* its DURABLE_WAITs are full batches */
	req->snap = j;
	req->cb = snap_done;
	req->opaque = j;
	j->req = req;
	j->err = err;
	j->errlen = err ? errlen : 0;
	j->cb = cb;
	j->opaque = opaque;
	img->snap_req = req;
	qsm_sm_start(req);
	return 0;
}

/* A copy of the table with room for one more entry (sn[nb] zeroed), the
 * strings and extra data duplicated, entry `skip` (or none: -1) left out. */
static int table_copy(const struct qcow2_snapshot_table *src, struct qcow2_snapshot_table *dst,
		      int skip)
{
	memset(dst, 0, sizeof(*dst));
	dst->sn = calloc(src->nb + 1u, sizeof(*dst->sn));
	if (!dst->sn)
		return -ENOMEM;
	for (uint32_t i = 0; i < src->nb; i++) {
		if ((int)i == skip)
			continue;
		struct qcow2_snapshot *d = &dst->sn[dst->nb++];
		*d = src->sn[i];
		d->id = strdup(src->sn[i].id);
		d->name = strdup(src->sn[i].name);
		d->unknown_extra = NULL;
		if (src->sn[i].unknown_extra_len) {
			d->unknown_extra = malloc(src->sn[i].unknown_extra_len);
			if (d->unknown_extra)
				memcpy(d->unknown_extra, src->sn[i].unknown_extra,
				       src->sn[i].unknown_extra_len);
		}
		if (!d->id || !d->name || (src->sn[i].unknown_extra_len && !d->unknown_extra)) {
			qcow2_snapshots_release(dst);
			return -ENOMEM;
		}
	}
	return 0;
}

#define QSM_SNAPSHOT_OPTS_SIZE_0 sizeof(struct qsm_snapshot_opts)

int qsm_snapshot_create_async(struct qsm_image *img, const char *name,
			      const struct qsm_snapshot_opts *opts, char *err, size_t errlen,
			      qsm_cb cb, void *opaque)
{
	struct qsm_snapshot_opts o;
	int ret;

	if (err && errlen)
		err[0] = 0;
	if ((ret = qsm_opts_import(&o, sizeof(o), opts, opts ? opts->struct_size : 0,
				   QSM_SNAPSHOT_OPTS_SIZE_0, "qsm_snapshot_opts", err, errlen)) < 0)
		return ret;
	if (!name)
		SNAP_FAIL(-EINVAL, "No snapshot name"); /* "" is a name, as qemu-img takes it */
	if ((ret = op_check(img, err, errlen)) < 0)
		return ret;
	if (strlen(name) > UINT16_MAX)
		SNAP_FAIL(-EINVAL, "Snapshot name is too long");
	if (img->snaps.nb >= QCOW2_MAX_SNAPSHOTS)
		SNAP_FAIL(-EFBIG, "Too many snapshots");
	struct qsm_snapjob *j = job_new(img, OP_CREATE);
	if (!j)
		SNAP_FAIL(-ENOMEM, "%s", strerror(ENOMEM));
	if ((ret = table_copy(&img->snaps, &j->t, -1)) < 0) {
		job_free(j);
		SNAP_FAIL(ret, "%s", strerror(-ret));
	}
	struct qcow2_snapshot *sn = &j->t.sn[j->t.nb];
	char id[32];
	struct timespec now;
	qcow2_snapshot_new_id(&img->snaps, id, sizeof(id));
	clock_gettime(CLOCK_REALTIME, &now);
	sn->id = strdup(id);
	sn->name = strdup(name);
	j->t.nb++;
	/* The L1 copy's place is set by SNAP_L1_WRITE (writes are held
	 * from now on: the active table keeps this size). */
	sn->l1_size = (uint32_t)img->l1_size;
	sn->date_sec = (uint32_t)now.tv_sec;
	sn->date_nsec = (uint32_t)now.tv_nsec;
	sn->disk_size = img->hdr.size;
	sn->vm_state_size = o.vm_state_size;
	sn->vm_clock_nsec = o.vm_clock_nsec;
	j->vm_state_size = o.vm_state_size;
	sn->icount = 0; /* as qemu-img records it (its snapshot list shows 0) */
	sn->extra_data_size = QCOW2_SNAPSHOT_EXTRA;
	if (!sn->id || !sn->name) {
		job_free(j);
		SNAP_FAIL(-ENOMEM, "%s", strerror(ENOMEM));
	}
	if (qcow2_snapshots_size(&j->t) < 0) {
		job_free(j);
		SNAP_FAIL(-EFBIG, "Snapshot table is too big");
	}
	return job_start(img, j, err, errlen, cb, opaque);
}

/* The snapshot an operation names, as qemu-img resolves it: apply by id,
 * then by name (qcow2's find_snapshot_by_id_or_name), delete by name only
 * (bdrv_snapshot_find).  msg: qemu-img's words when there is none. */
static int find(struct qsm_image *img, const char *s, bool by_id, const char *msg, char *err,
		size_t errlen)
{
	int idx = !s ? -ENOENT
		     : by_id ? qcow2_snapshot_find_id_or_name(&img->snaps, s)
			     : qcow2_snapshot_find_name(&img->snaps, s);
	if (idx < 0)
		SNAP_FAIL(-ENOENT, "%s", msg);
	return idx;
}

int qsm_snapshot_delete_async(struct qsm_image *img, const char *name, char *err, size_t errlen,
			      qsm_cb cb, void *opaque)
{
	int ret, idx;
	if (err && errlen)
		err[0] = 0;
	if ((ret = op_check(img, err, errlen)) < 0)
		return ret;
	if ((idx = find(img, name, false, "snapshot not found", err, errlen)) < 0)
		return idx;
	struct qsm_snapjob *j = job_new(img, OP_DELETE);
	if (!j)
		SNAP_FAIL(-ENOMEM, "%s", strerror(ENOMEM));
	j->sn = img->snaps.sn[idx];
	j->sn.id = j->sn.name = NULL; /* the numbers only: the strings die with the table */
	j->sn.unknown_extra = NULL;
	if ((ret = table_copy(&img->snaps, &j->t, idx)) < 0) {
		job_free(j);
		SNAP_FAIL(ret, "%s", strerror(-ret));
	}
	return job_start(img, j, err, errlen, cb, opaque);
}

int qsm_snapshot_apply_async(struct qsm_image *img, const char *id_or_name, char *err,
			     size_t errlen, qsm_cb cb, void *opaque)
{
	int ret, idx;
	if (err && errlen)
		err[0] = 0;
	if ((ret = op_check(img, err, errlen)) < 0)
		return ret;
	if ((idx = find(img, id_or_name, true, "Failed to load snapshot: No such file or directory",
			err, errlen)) < 0)
		return idx;
	if ((ret = qsm_bitmaps_cover(img, img->snaps.sn[idx].disk_size, err, errlen)) < 0)
		return ret;
	/* The whole disk may change: every tracked bitmap says so. */
	qsm_bitmaps_dirty(img, 0, QSM_MAX(img->hdr.size, img->snaps.sn[idx].disk_size));
	struct qsm_snapjob *j = job_new(img, OP_APPLY);
	if (!j)
		SNAP_FAIL(-ENOMEM, "%s", strerror(ENOMEM));
	j->sn = img->snaps.sn[idx];
	j->sn.id = j->sn.name = NULL;
	j->sn.unknown_extra = NULL;
	return job_start(img, j, err, errlen, cb, opaque);
}

int qsm_snap_grow_l1(struct qsm_image *img, uint64_t entries)
{
	const struct qsm_req *s = img->snap_req;
	if (s && s->snap->op == OP_GROW && s->snap->l1_room >= entries)
		return 0; /* one large enough is under way: the write waits for it (HELD) */
	int ret = op_check(img, NULL, 0);
	if (ret < 0)
		return ret;
	struct qsm_snapjob *j = job_new(img, OP_GROW);
	if (!j)
		return -ENOMEM;
	j->l1_room = entries;
	return job_start(img, j, NULL, 0, NULL, NULL);
}

/* --- the blocking forms ------------------------------------------------------- */

/* The blocking forms run the loop, which a callback of it cannot do. */
static int may_block(struct qsm_image *img, char *err, size_t errlen)
{
	if (img->draining)
		SNAP_FAIL(-EDEADLK, "called from a qsm callback: use the _async form");
	return 0;
}

int qsm_snapshot_create(struct qsm_image *img, const char *name, char *err, size_t errlen)
{
	struct qsm_sync_wait w = { 0 };
	int ret = may_block(img, err, errlen);
	return ret ? ret : qsm_sync_run(img, qsm_snapshot_create_async(img, name, NULL, err, errlen,
								       qsm_sync_cb, &w), &w);
}

int qsm_snapshot_apply(struct qsm_image *img, const char *id_or_name, char *err, size_t errlen)
{
	struct qsm_sync_wait w = { 0 };
	int ret = may_block(img, err, errlen);
	return ret ? ret : qsm_sync_run(img, qsm_snapshot_apply_async(img, id_or_name, err, errlen,
								      qsm_sync_cb, &w), &w);
}

int qsm_snapshot_delete(struct qsm_image *img, const char *name, char *err, size_t errlen)
{
	struct qsm_sync_wait w = { 0 };
	int ret = may_block(img, err, errlen);
	return ret ? ret : qsm_sync_run(img, qsm_snapshot_delete_async(img, name, err, errlen,
								       qsm_sync_cb, &w), &w);
}
