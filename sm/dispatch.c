/*
 * sm/dispatch.c: the one dispatcher of the request state machines, and the
 * life of a request (new, start, trace, complete).
 *
 * Design
 * ------
 * Every request (read, write, write-zeroes, discard, flush, block status,
 * compressed write, and the internal write-back batch) is one `struct
 * qsm_req` with a `state`.  The machines are drawn in sm/states.def; `qsm
 * graph` renders the same table.  The steps live by concern, each file
 * opening with its part of this design (diagram, transitions, invariants):
 *   sm/lookup.c      L1_LOOKUP, FROZEN, L2_ALLOC, L2_LOOKUP, L2_LOAD
 *   sm/classify.c    what the run's L2 entries mean: L2_LOOKUP's decision
 *   sm/data.c        DATA_READ, DATA_WRITE, ZERO_FILL, FILE_RANGE
 *   sm/alloc.c       CLUSTER_ALLOC, ZERO_CLUSTERS, COW_READ, ALLOC_WRITE,
 *                    L2_UPDATE, JOIN_WRITE, JOIN_WAIT, ZERO_UPDATE,
 *                    NEXT_RUN, DURABLE_WAIT
 *   sm/backing.c     BACKING_READ, BACKING_STATUS, COW from a backing file
 *   sm/compressed.c  COMPRESS, BYTE_ALLOC, COMPRESSED_WRITE,
 *                    COMPRESSED_READ, DECOMPRESS
 *   sm/writeback.c   the WRITEBACK machine
 *   sm/image.c       the CLOSE machine
 * and sm/steps.h declares what they share.
 *
 *   read:   START > L1_LOOKUP > L2_LOOKUP (> L2_LOAD > L2_LOOKUP)
 *                 > DATA_READ | ZERO_FILL | BACKING_READ
 *                 | COMPRESSED_READ > DECOMPRESS
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
 * Transition -> function (the function that produces the event; each file
 * lists the transitions out of its states, and tests/teach/test_design.py
 * checks that together they cover every TRANSITION of sm/states.def)
 *   START -> L1_LOOKUP|COMPRESS|WB_COLLECT|CLOSE_DRAIN|DURABLE_WAIT|DONE ..
 *                                                  qsm_sm_start
 *   START -> DATA_READ|DATA_WRITE|FILE_RANGE|DONE ............. raw_start
 *                                                  (a raw image: RAW)
 *   WB_* -> WB_*|REFBLOCK_LOAD|DONE ................... qsm_wb_step
 *                                                  (sm/writeback.c)
 *   CLOSE_* -> CLOSE_*|DURABLE_WAIT|DONE .............. qsm_close_step
 *                                                  (sm/image.c)
 *   and on ERROR, from any state: qsm_sm_run enters DONE (the table's
 *   implicit edges); req_complete is DONE's entry action.
 *
 * Invariants (numbered across the files of sm/)
 *  1. Steps never run re-entrantly: events are queued and the queue is
 *     drained by one loop (qsm_sm_drain), from a libevent callback.  A user
 *     callback therefore never runs from inside a submit call.
 *  2, 5 are in sm/alloc.c (allocations in flight, metadata reaching disk),
 *  3, 4 in sm/lookup.c (freezes, L2 references), 6 in sm/classify.c, 7 in
 *  sm/data.c, 8 and 11 in sm/backing.c, 9 and 10 in sm/compressed.c.
 */
#include <assert.h>
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sm/steps.h"

static const unsigned char transitions[QSM_M__COUNT][QSM_S__COUNT][QSM_E__COUNT] = {
#define TRANSITION(m, from, ev, to) [QSM_M_##m][QSM_S_##from][QSM_E_##ev] = QSM_S_##to + 1,
#include "sm/states.def"
};

/* The TRANSITION_BACK edges: back_edges[m][to] for BREAK --RESUME--> to,
 * taken back to the state the request stopped in (req->brk_from). */
static const bool back_edges[QSM_M__COUNT][QSM_S__COUNT] = {
#define TRANSITION_BACK(m, from, ev, to) [QSM_M_##m][QSM_S_##to] = true,
#include "sm/states.def"
};

static const char *const state_names[] = {
#define STATE(name, desc) #name,
#include "sm/states.def"
};
static const char *const state_descs[] = {
#define STATE(name, desc) desc,
#include "sm/states.def"
};
static const char *const event_names[] = {
#define EVENT(name, label) #name,
#include "sm/states.def"
};
static const char *const event_labels[] = {
#define EVENT(name, label) label,
#include "sm/states.def"
};
static const char *const machine_names[] = {
#define MACHINE(name, desc) #name,
#include "sm/states.def"
};
static const char *const machine_descs[] = {
#define MACHINE(name, desc) desc,
#include "sm/states.def"
};

const char *qsm_state_name(enum qsm_state s) { return state_names[s]; }
const char *qsm_state_desc(enum qsm_state s) { return state_descs[s]; }
const char *qsm_event_name(enum qsm_event e) { return e < QSM_E__COUNT ? event_names[e] : "WAIT"; }
const char *qsm_event_label(enum qsm_event e) { return e < QSM_E__COUNT ? event_labels[e] : "wait"; }
const char *qsm_machine_name(enum qsm_machine m) { return machine_names[m]; }
const char *qsm_machine_desc(enum qsm_machine m) { return machine_descs[m]; }

bool qsm_transition_back(enum qsm_machine m, enum qsm_state to)
{
	return (unsigned)m < QSM_M__COUNT && (unsigned)to < QSM_S__COUNT && back_edges[m][to];
}

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
	[QSM_M_CLOSE] = "close", [QSM_M_SNAPSHOT] = "snapshot",
};

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

/* Entry action of each state. */
static enum qsm_event step(struct qsm_req *req)
{
	switch (req->state) {
	case QSM_S_L1_LOOKUP:     return qsm_step_l1_lookup(req);
	case QSM_S_L2_ALLOC:      return qsm_step_l2_alloc(req);
	case QSM_S_L2_LOOKUP:     return qsm_step_l2_lookup(req);
	case QSM_S_DATA_READ:
	case QSM_S_DATA_WRITE:
	case QSM_S_JOIN_WRITE:    return qsm_step_data_io(req);
	case QSM_S_JOIN_WAIT:     return qsm_step_join_wait(req);
	case QSM_S_ZERO_FILL:     return qsm_step_zero_fill(req);
	case QSM_S_BACKING_READ:  return qsm_step_backing_read(req);
	case QSM_S_COR_WRITE:     return qsm_step_cor_write(req);
	case QSM_S_BACKING_STATUS: return qsm_step_backing_status(req);
	case QSM_S_FILE_RANGE:    return qsm_step_file_range(req);
	case QSM_S_CLUSTER_ALLOC: return qsm_step_cluster_alloc(req);
	case QSM_S_COW_READ:      return qsm_step_cow_read(req);
	case QSM_S_ZERO_CLUSTERS: return qsm_step_zero_clusters(req);
	case QSM_S_COMPRESSED_READ: return qsm_step_compressed_read(req);
	case QSM_S_DECOMPRESS:    return qsm_step_decompress(req);
	case QSM_S_COMPRESS:      return qsm_step_compress(req);
	case QSM_S_BYTE_ALLOC:    return qsm_step_byte_alloc(req);
	case QSM_S_COMPRESSED_WRITE: return qsm_step_compressed_write(req);
	case QSM_S_ALLOC_WRITE:   return qsm_step_alloc_write(req);
	case QSM_S_L2_UPDATE:     return qsm_step_l2_update(req);
	case QSM_S_ZERO_UPDATE:   return qsm_step_zero_update(req);
	case QSM_S_NEXT_RUN:      return qsm_step_next_run(req);
	case QSM_S_DURABLE_WAIT:  return qsm_step_durable_wait(req);
	case QSM_S_FREE_WAIT:     return qsm_step_free_wait(req);
	case QSM_S_HELD:          /* until the snapshot operation is over */
		if (!req->img->snap_req) { /* it ended while HOLD was queued */
			qsm_snap_resume(req);
			return QSM_E_WAIT;
		}
		req->wait.req = req;
		req->wait.next = req->img->held;
		req->img->held = &req->wait;
		req->img->nb_held++;
		req->waiting = true;
		return QSM_E_WAIT;
	case QSM_S_SNAP_DRAIN:
	case QSM_S_SNAP_NEXT:
	case QSM_S_SNAP_L1_LOAD:
	case QSM_S_SNAP_L1_WRITE:
	case QSM_S_SNAP_REFS:
	case QSM_S_SNAP_COPIED:
	case QSM_S_SNAP_TABLE:
	case QSM_S_SNAP_COMMIT:
	case QSM_S_SNAP_VMSTATE:
	case QSM_S_SNAP_FREE:
		return qsm_snap_step(req);
	/* Waiting states: the event comes from whoever we wait on. */
	case QSM_S_FROZEN:
	case QSM_S_L2_LOAD:
	case QSM_S_REFBLOCK_LOAD:
	case QSM_S_ALLOC_WAIT:
	case QSM_S_BREAK:
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
	case QSM_S_CLOSE_BITMAPS:
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
 *     pool wait, no compression job (whatever ends a wait posts its event once,
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
	if (req->state == QSM_S_BREAK) /* its I/O prepared, host range noted */
		return !req->queued && !req->waiting && !req->io_pending &&
		       qsm_transition(m, req->brk_from, QSM_E_BREAK) == QSM_S_BREAK;
	if (req->queued || req->io_busy || req->io_pending || req->work_waiting ||
	    req->cz_pending || req->done > req->bytes || (m == QSM_M_WRITEBACK) != !!req->wb)
		return false;
	/* (HELD's step puts it to sleep: not yet on entry.) */
	if (req->waiting != (req->state == QSM_S_FROZEN || req->state == QSM_S_ALLOC_WAIT))
		return false;
	if ((m == QSM_M_SNAPSHOT) != !!req->snap || (req->snap && img->snap_req != req))
		return false;
	if (run->cbuf && req->state != QSM_S_DECOMPRESS)
		return false;
	if (run->bytes_held && req->state != QSM_S_COMPRESSED_WRITE && req->state != QSM_S_L2_UPDATE)
		return false;

	switch (req->state) {
	case QSM_S_START:
		return req->done == 0 && run_unheld(run);
	case QSM_S_HELD:
		/* Held from START: not started, nothing looked up, nothing
		 * counted.  Deferred part way (a late write, qsm_snap_defer):
		 * counted as active only, its runs so far written in place. */
		if (run->l2 || run->alloc_linked || run->allocating || img->raw || req->late ||
		    req->counted_writer)
			return false;
		return req->counted ? m == QSM_M_WRITE : req->done == 0 && !req->wt_counted;
	/* A snapshot operation: the only one (img->snap_req); holds no L2
	 * table between steps, and after the drain what it waits for is
	 * over (sm/snapops.c invariant 12). */
	case QSM_S_SNAP_DRAIN:
		return m == QSM_M_SNAPSHOT && run_unheld(run);
	case QSM_S_SNAP_NEXT:
	case QSM_S_SNAP_L1_LOAD:
	case QSM_S_SNAP_L1_WRITE:
	case QSM_S_SNAP_REFS:
	case QSM_S_SNAP_COPIED:
	case QSM_S_SNAP_TABLE:
	case QSM_S_SNAP_COMMIT:
	case QSM_S_SNAP_VMSTATE:
	case QSM_S_SNAP_FREE:
		return m == QSM_M_SNAPSHOT && run_unheld(run) && qsm_snap_drained(img);
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
		return m == QSM_M_READ && run_ok(req) && run_unheld(run) &&
		       (qsm_has_backing(img) || img->copy_on_read);
	case QSM_S_COR_WRITE:
		return m == QSM_M_READ && run_ok(req) && run_unheld(run) && img->copy_on_read &&
		       req->cor_buf && req->cor_off <= run->offset &&
		       run->offset + run->bytes <= req->cor_off + req->cor_len;
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
	case QSM_S_FREE_WAIT: /* invariant 4: no table, no claim, no clusters while waiting */
		return wr && run_ok(req) && run_unheld(run) &&
		       !run->alloc_linked && !run->joined && req->free_waits > 0;
	case QSM_S_DURABLE_WAIT: /* a close waits for its full batch here too */
		return (wr || m == QSM_M_FLUSH || m == QSM_M_CLOSE || m == QSM_M_SNAPSHOT) &&
		       req->done == req->bytes &&
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
	case QSM_S_CLOSE_BITMAPS:
		return m == QSM_M_CLOSE && img->close_req == req && img->in_flight == 1 &&
		       !img->wb_job && req->ret == 0;
	case QSM_S_CLOSE_MARK_CORRUPT: /* in error: the close fails with it */
	case QSM_S_CLOSE_SYNC:
		return m == QSM_M_CLOSE && img->close_req == req && img->in_flight == 1 &&
		       !img->wb_job && req->ret < 0;
	case QSM_S_BREAK: /* checked above */
	case QSM_S_DONE:
	case QSM_S__COUNT:
		break;
	}
	return false;
}

/* States a request sleeps in on behalf of another (req->wait_for). */
static bool waits_on_other(enum qsm_state s)
{
	return s == QSM_S_FROZEN || s == QSM_S_ALLOC_WAIT || s == QSM_S_JOIN_WRITE ||
	       s == QSM_S_JOIN_WAIT || s == QSM_S_DURABLE_WAIT || s == QSM_S_FREE_WAIT ||
	       s == QSM_S_L2_LOAD || s == QSM_S_HELD || s == QSM_S_SNAP_DRAIN ||
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
	if (req->counted) {
		req->counted = false;
		img->active--;
		if (req->counted_writer)
			img->writers--;
		if (req->late)
			img->late_writes--;
		req->counted_writer = req->late = false;
		if (img->snap_req)
			qsm_snap_wake(img); /* a snapshot may be waiting for this one */
	}
	if (img->close_req && req != img->close_req)
		qsm_close_wake(img); /* a close may be waiting for this one */
}

/* qsm_abandon: a request asleep on a write-back batch (DURABLE_WAIT,
 * FREE_WAIT: no I/O, no table, no claim) goes with the "process": its
 * memory only, no callback. */
void qsm_req_forget(struct qsm_req *req)
{
	req->wt_counted = false;
	if (req->snap)
		qsm_snap_job_free(req);
	req_unlink(req);
	free(req->run.bounce);
	free(req->run.cbuf);
	free(req->cor_buf);
	qsm_cz_release(req);
	free(req->cz);
	free(req->iov_buf);
	free(req);
}

static void req_complete(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;

	/* Error exits may leave resources held; release them here.  Compressed
	 * bytes reserved but never mapped are referenced by nothing. */
	if (run->bytes_held) {
		qsm_release_unmapped(req, run->host, run->clen);
		run->bytes_held = false;
	}
	if (img->rc)
		qsm_refcount_unpin(img->rc, &req->rcw);
	release_l2(req);
	qsm_alloc_unlink(req, req->ret ? req->ret : -EIO);
	qsm_join_unlink(req);
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
	free(req->cor_buf);
	qsm_cz_release(req);
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
		} else if (from == QSM_S_BREAK && ev == QSM_E_RESUME) {
			/* The TRANSITION_BACK edge the stopping step chose. */
			to = req->brk_back;
			if (!back_edges[req->machine][to]) {
				fprintf(stderr, "qsm: BUG: req#%llu %s has no edge BREAK --RESUME--> %s\n",
					(unsigned long long)req->id, machine_names[req->machine],
					state_names[to]);
				abort();
			}
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
		if (from == QSM_S_BREAK && to != QSM_S_DONE && !req->brk_rerun) {
			/* Back in the state whose step ran already (its entry
			 * invariants no longer apply): submit the I/O it
			 * prepared and wait for it there.  (A step that stopped
			 * before doing anything, brk_rerun, runs again.) */
			ev = qsm_req_resubmit(req);
			if (ev == QSM_E_WAIT)
				return;
			ret = req->ret;
			continue;
		}
		if (to == QSM_S_BREAK)
			req->brk_from = from;
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
	if (qsm_snap_holds(req->img, req)) {
		qsm_sm_post(req, QSM_E_HOLD, 0); /* to HELD: qsm_sm_begin when it is over */
		return;
	}
	qsm_sm_begin(req);
}

void qsm_sm_begin(struct qsm_req *req)
{
	enum qsm_event ev = QSM_E_BEGIN;
	bool internal = req->machine == QSM_M_WRITEBACK || req->machine == QSM_M_CLOSE ||
			req->machine == QSM_M_SNAPSHOT;
	if (!internal) {
		req->counted = true;
		req->img->active++;
		if (qsm_snap_admits(req->img, req)) {
			req->late = true; /* in place only, beside the operation */
			req->img->late_writes++;
			req->img->stats.snap_late_writes++;
		} else if (qsm_snap_writer(req->img, req)) {
			req->counted_writer = true;
			req->img->writers++;
		}
	}
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
		fprintf(f, "  req#%llu %s %s off %#llx+%llu done %llu%s%s%s%s\n",
			(unsigned long long)r->id, kind_names[r->machine], state_names[r->state],
			(unsigned long long)r->offset, (unsigned long long)r->bytes,
			(unsigned long long)r->done, r->waiting ? " waiting" : "",
			r->queued ? " queued" : "", r->run.l2 ? " holds-l2" : "",
			r->late ? " late" : "");
}
