/*
 * sm/lookup.c: finding a run's L2 table: the L1 lookup, the freeze of an L1
 * slot whose table is being created, L2 table allocation (or the copy of a
 * table shared with a snapshot), and the L2 lookup through the cache.
 *
 *   L1_LOOKUP --L1 found--> L2_LOOKUP --cache miss--> L2_LOAD --loaded--> L2_LOOKUP
 *       |--L1 busy--> FROZEN --wake--> L1_LOOKUP
 *       |--L1 empty (writes)--> L2_ALLOC --L2 ready--> L2_LOOKUP
 *       |--backing / L1 empty / nothing to do--> BACKING_READ | ZERO_FILL | NEXT_RUN
 *   L2_LOOKUP --L2 shared--> L2_ALLOC (copy)
 *   L2_LOOKUP, L2_ALLOC --L1 busy--> FROZEN (the slot's table is being
 *       copied or created by another write meanwhile)
 *   L2_LOOKUP --(the run's entries, sm/classify.c)--> where the run goes next
 *
 * Transition -> function
 *   L1_LOOKUP -> L2_LOOKUP|L2_ALLOC|FROZEN|BACKING_READ|ZERO_FILL ..
 *                                                  qsm_step_l1_lookup
 *   L1_LOOKUP -> NEXT_RUN|DONE ............ qsm_step_l1_lookup
 *                                  (nothing to do; a status query reported)
 *   FROZEN -> L1_LOOKUP ................... qsm_step_l2_alloc
 *                                  (the slot's owner wakes its waiters)
 *   L2_ALLOC -> L2_LOOKUP|REFBLOCK_LOAD|FREE_WAIT ... qsm_step_l2_alloc
 *                                  (REFBLOCK_LOAD through qsm_rc_wait;
 *                                  FREE_WAIT: a lower cluster is freed,
 *                                  not yet durable, the slot let go)
 *   L2_ALLOC -> L2_ALLOC .................. l2_waiter_cb
 *                                  (a cache slot came free: WAKE)
 *   L2_LOOKUP -> L2_LOAD|L2_ALLOC ......... qsm_step_l2_lookup
 *                                  (the rest: the classifiers, sm/classify.c)
 *   L2_LOOKUP -> FROZEN ................... qsm_step_l2_lookup
 *                                  (a shared table another write copies)
 *   L1_LOOKUP, L2_LOOKUP -> HELD .......... qsm_snap_defer
 *                                  (a late write beside a snapshot
 *                                  operation would create or copy a table)
 *   L2_ALLOC -> FROZEN .................... qsm_step_l2_alloc
 *                                  (the slot claimed by another request)
 *   L2_LOAD -> L2_LOOKUP .................. l2_waiter_cb
 *                                  (metadata/l2cache.c: loaded, or WAKE)
 *
 * Invariants (numbered across sm/, see sm/dispatch.c)
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
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "sm/steps.h"

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

enum qsm_event qsm_step_l1_lookup(struct qsm_req *req)
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

	/* Reserved bits are ignored, as QEMU does (qemu-img check and qsm
	 * check report them); the offset mask drops them. */
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
			/* Copy-on-read copies these clusters, zeros or not. */
			return backing || wants_cor(req) ? QSM_E_BACKING : QSM_E_L1_EMPTY;
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
			/* A new L2 table: not beside a snapshot operation. */
			return req->late ? qsm_snap_defer(req) : QSM_E_L1_EMPTY;
		}
	}
	if (!QSM_IS_ALIGNED(l2_off, img->cluster_size))
		return fail(req, qsm_image_corrupt(img, "L2 table offset %#llx unaligned (L1 index: %#llx)",
						    (unsigned long long)l2_off,
						    (unsigned long long)run->l1_index));
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

enum qsm_event qsm_step_l2_alloc(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	struct qsm_l2alloc *a = l2alloc_find(img, run->l1_index);
	bool free_busy = false;
	int ret;

	if (QSM_MUTANT(NO_FREEZE)) /* mutant: a second record for the same slot */
		for (a = img->l2allocs; a && a->owner != req; a = a->next)
			;
	if (a && a->owner != req) {
		/* Invariant 3 again: the slot was claimed after this request
		 * decided to allocate or copy its table (nothing of ours is
		 * claimed yet: the claim comes first below). */
		free(run->bounce);
		run->bounce = NULL;
		img->stats.frozen++;
		req->wait_for = a->owner->id;
		wait_on(&a->waiters, req);
		return QSM_E_L1_BUSY;
	}
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
		ret = qsm_image_rc_error(img, ret);
		if (ret < 0)
			goto out_unfreeze;
		if (qsm_is_metadata(img, run->host)) {
			ret = qsm_image_corrupt(img, "Preventing invalid write on metadata (overlaps with %s)",
						qsm_metadata_kind(img, run->host));
			run->host = 0;
			goto out_unfreeze;
		}
		if (req->free_waits < QSM_FREE_WAITS_MAX &&
		    qsm_wb_free_pending_below(img, run->host >> img->cluster_bits)) {
			/* As for data (qsm_step_cluster_alloc): QEMU's l2_allocate
			 * would reuse a cluster freed below; give this one back,
			 * let the slot go and wait for the batch that releases
			 * it (FREE_WAIT), then look the slot up again. */
			qsm_release_unmapped(req, run->host, img->cluster_size);
			run->host = 0;
			req->free_waits++;
			img->stats.free_waits++;
			free_busy = true;
			goto out_unfreeze;
		}
	}
	req->l2w.fn = l2_waiter_cb;
	/* run->bounce holds the shared table's entries when this is a COW. */
	ret = qsm_l2_create(&img->l2c, run->host, run->bounce, &run->l2, &req->l2w);
	if (ret == -EAGAIN)
		return QSM_E_WAIT; /* slot waiter posts WAKE: run this step again */
	if (ret < 0) {
		qsm_release_unmapped(req, run->host, img->cluster_size);
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
	return ret < 0 ? fail(req, ret) : free_busy ? QSM_E_FREE_BUSY : QSM_E_L2_READY;
}

enum qsm_event qsm_step_l2_lookup(struct qsm_req *req)
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
		/* Invariant 3: another write is copying this shared table
		 * already (it holds the slot in L2_ALLOC, waiting for a
		 * refcount block or a cache slot); copying it a second time
		 * would drop the snapshot's reference twice and lose that
		 * write's table.  Wait for it, then look the slot up again. */
		struct qsm_l2alloc *a = l2alloc_find(img, run->l1_index);
		if (a && !QSM_MUTANT(NO_FREEZE)) {
			release_l2(req);
			img->stats.frozen++;
			req->wait_for = a->owner->id;
			wait_on(&a->waiters, req);
			return QSM_E_L1_BUSY;
		}
		/* Shared with an internal snapshot: copy the table first (not
		 * beside a snapshot operation).  Keep a private copy rather
		 * than the reference (invariant 4). */
		if (req->late)
			return qsm_snap_defer(req);
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
		return qsm_classify_read(req);
	case QSM_M_WRITE:
		return qsm_classify_write(req);
	case QSM_M_ZEROES:
		return qsm_classify_zeroes(req);
	case QSM_M_DISCARD:
		return qsm_classify_discard(req);
	case QSM_M_WRITE_COMPRESSED:
		return qsm_classify_compressed(req);
	default:
		abort();
	}
}
