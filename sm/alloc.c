/*
 * sm/alloc.c: allocating writes: new clusters, COW, the L2 update that maps
 * them, writes joining another's fresh clusters, zero and discard updates,
 * and the end of every run (NEXT_RUN, DURABLE_WAIT).
 *
 *   L2_LOOKUP --need alloc--> CLUSTER_ALLOC
 *       --no COW--> ALLOC_WRITE --I/O done--> L2_UPDATE --updated--> NEXT_RUN
 *       --zero first--> ZERO_CLUSTERS --I/O done--> ALLOC_WRITE
 *       --COW--> COW_READ --I/O done--> ALLOC_WRITE
 *       --compressed--> COMPRESSED_READ > DECOMPRESS > ALLOC_WRITE
 *                                                  (sm/compressed.c)
 *   L2_LOOKUP --join--> JOIN_WRITE --I/O done--> JOIN_WAIT --updated--> NEXT_RUN
 *   L2_LOOKUP --alloc busy--> ALLOC_WAIT --wake--> L1_LOOKUP (looked up again)
 *   CLUSTER_ALLOC, L2_ALLOC --free busy--> FREE_WAIT --WB done--> L1_LOOKUP
 *   L2_LOOKUP --whole clusters--> ZERO_UPDATE --updated--> NEXT_RUN
 *   NEXT_RUN --more--> L1_LOOKUP | COMPRESS
 *            --need durable--> DURABLE_WAIT --WB done--> DONE
 *            --finished--> DONE
 *
 * Transition -> function
 *   CLUSTER_ALLOC -> ALLOC_WRITE|ZERO_CLUSTERS|COW_READ|COMPRESSED_READ|REFBLOCK_LOAD|BREAK ..
 *                                             qsm_step_cluster_alloc
 *   CLUSTER_ALLOC -> FREE_WAIT ........ qsm_step_cluster_alloc (a cluster
 *                                  below what it took is freed, its L2
 *                                  update not durable: given back)
 *   FREE_WAIT -> L1_LOOKUP ............ job_done (sm/writeback.c: the next
 *                                  batch, joined by qsm_wb_join_next,
 *                                  released the frees: WB_DONE)
 *   REFBLOCK_LOAD -> L2_ALLOC|L2_LOOKUP|WB_RELEASE .. rc_waiter_cb (the
 *                                  block is in: the step that needed it
 *                                  runs again, or the run is classified
 *                                  again; entered by qsm_rc_wait)
 *   ZERO_CLUSTERS -> ALLOC_WRITE ...... qsm_req_io_cb
 *                                  (qsm_step_zero_clusters' zero-range)
 *   COW_READ -> ALLOC_WRITE ........... qsm_req_io_cb (qsm_step_cow_read's
 *                                  read; from a backing file cow_backing_cb)
 *   ALLOC_WRITE -> L2_UPDATE .......... qsm_req_io_cb
 *                                  (qsm_step_alloc_write's write)
 *   L2_UPDATE -> NEXT_RUN ............. qsm_step_l2_update
 *   JOIN_WRITE -> JOIN_WAIT ........... qsm_req_io_cb (qsm_step_data_io's
 *                                  write into the owner's clusters)
 *   ALLOC_WAIT -> L1_LOOKUP ........... qsm_alloc_unlink (the allocation
 *                                  waited on is over: WAKE)
 *   JOIN_WAIT -> NEXT_RUN ............. qsm_alloc_unlink (the owner's L2
 *                                  update: WAKE), or qsm_step_join_wait
 *                                  when it came first (UPDATED)
 *   ZERO_UPDATE -> NEXT_RUN ........... qsm_step_zero_update
 *   NEXT_RUN -> L1_LOOKUP|COMPRESS|DURABLE_WAIT|DONE ....
 *                                             qsm_step_next_run
 *   DURABLE_WAIT -> DONE|CLOSE_BITMAPS ... job_done (sm/writeback.c: the
 *                                  batch joined by qsm_wb_join, WB_DONE)
 *   DURABLE_WAIT -> CLOSE_MARK_CORRUPT .. fail_waiters (sm/writeback.c: a
 *                                  close's batch failed, BROKEN)
 *
 * Invariants (numbered across sm/, see sm/dispatch.c)
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
 *  5. Metadata changes are made in memory (cached L2 tables and refcount
 *     blocks, resident L1) and reach the disk only through write-back batches, which
 *     order them refcounts < L2 < L1 with a sync between levels
 *     (sm/writeback.c); freed clusters are released only after the tables
 *     that stopped pointing at them are durable, and after every data I/O
 *     that found them through the old entries has completed (qsm_submit_io
 *     notes the host range in flight: an in-place write landing late in a
 *     cluster handed to another allocation would overwrite its data).
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/blkdebug.h"
#include "sm/steps.h"

/* The allocation of req's run is over: its L2 entries are updated (ret 0)
 * or it failed.  Wake who waited; tell who joined (their data is mapped now,
 * or lost with the allocation). */
void qsm_alloc_unlink(struct qsm_req *req, int ret)
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
void qsm_join_unlink(struct qsm_req *req)
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
void qsm_release_unmapped(struct qsm_req *req, uint64_t off, uint64_t len)
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

enum qsm_event qsm_step_cluster_alloc(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t n = run->nb_clusters;
	if (img->error) {
		release_l2(req);
		return fail(req, -EIO);
	}
	/* blkdebug's cluster_alloc, before any cluster is taken: a breakpoint
	 * stops the run here with no claim and no table (BREAK; resumed, the
	 * run is classified again, as after a refcount block load). */
	req->io = (struct qsm_io_req){ .event = QSM_IO_EV_CLUSTER_ALLOC };
	if (qsm_io_blkdebug_event(img->io, &req->io, qsm_req_resume_cb)) {
		release_l2(req);
		req->brk_rerun = true;
		req->brk_back = QSM_S_L2_LOOKUP;
		return QSM_E_BREAK;
	}
	int ret = 0;
	bool extent = false;
	if (run->reuse) { /* the clusters the zero entries keep (classify) */
		run->host = qcow2_entry_offset(run->old_entry);
	} else if (req->machine == QSM_M_WRITE && req->next_host && !(req->flags & QSM_REQ_COR_FILL)) {
		/* Go on with the previous run's host extent when the clusters
		 * there are free (QEMU's qcow2_alloc_clusters_at), the run cut
		 * to those; else a new extent from the cursor. */
		uint64_t got = 0;
		ret = qsm_refcount_alloc_at(img->rc, req->next_host >> img->cluster_bits, n, &got,
					    qsm_req_rcw(req));
		if (ret == 0 && got) {
			uint64_t end = (cluster_of(img, run->offset) + got) << img->cluster_bits;
			if (run->offset + run->bytes > end)
				run->bytes = end - run->offset;
			run->nb_clusters = n = got;
			run->host = req->next_host;
			extent = true;
		}
	}
	if (!run->reuse && !extent && ret == 0)
		ret = qsm_refcount_alloc(img->rc, n, &run->host, qsm_req_rcw(req));
	if (ret == -EAGAIN) {
		/* No claim on the guest clusters yet: L2_LOOKUP classifies again. */
		release_l2(req);
		return qsm_rc_wait(req, QSM_E_LOADED);
	}
	qsm_refcount_unpin(img->rc, &req->rcw);
	ret = qsm_image_rc_error(img, ret);
	if (ret == 0 && !run->reuse && !extent && req->free_waits < QSM_FREE_WAITS_MAX &&
	    qsm_wb_free_pending_below(img, cluster_of(img, run->host))) {
		/* QEMU's allocator would have reused a cluster freed below what
		 * we got (its free_cluster_index drops on a free); qsm may hand
		 * it out only once the L2 update that dropped it is durable
		 * (writeback.c rule 4).  Give back what we took (its refcount
		 * blocks are cached: they just served) and wait for a batch. */
		release_l2(req);
		qsm_release_unmapped(req, run->host, n << img->cluster_bits);
		run->host = 0;
		req->free_waits++;
		img->stats.free_waits++;
		return QSM_E_FREE_BUSY;
	}
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
			return fail(req, qsm_image_corrupt(img, "Preventing invalid write on metadata (overlaps with %s)",
							    qsm_metadata_kind(img, run->host + (i << img->cluster_bits))));
		}
	}
	req->next_host = run->host + (n << img->cluster_bits);
	if (!run->reuse) {
		img->stats.clusters_allocated += n;
		qsm_prealloc_ahead(img, run->host + (n << img->cluster_bits));
	}
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
enum qsm_event qsm_step_zero_clusters(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	if (img->corrupt)
		return fail(req, -EIO); /* nothing more is written (sm/image.c) */
	req->io = (struct qsm_io_req){
		.op = QSM_IO_ZERO, .event = QSM_IO_EV_COW_WRITE, .offset = run->host,
		.len = run->nb_clusters << img->cluster_bits, .cb = qsm_req_io_cb,
	};
	qsm_io_submit(img->io, &req->io);
	return QSM_E_WAIT;
}

/* Where ALLOC_WRITE takes the tail of the last cluster from: the COW buffer
 * holds the first cluster, then (for runs of several clusters) the last. */
uint8_t *qsm_cow_tail_buf(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	return run->bounce + (run->nb_clusters > 1 ? img->cluster_size : 0) +
	       in_cluster(img, run->offset + run->bytes);
}

enum qsm_event qsm_step_cow_read(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	if (run->cow_backing) {
		/* The reads go to the backing image (requests of their own), but
		 * blkdebug's cow_read is the top image's event, as in QEMU: raised
		 * here, before anything is done (a breakpoint stops the run and
		 * the step runs again when resumed). */
		req->io = (struct qsm_io_req){ .event = QSM_IO_EV_COW_READ };
		if (qsm_io_blkdebug_event(img->io, &req->io, qsm_req_resume_cb)) {
			req->brk_rerun = true;
			req->brk_back = QSM_S_COW_READ;
			return QSM_E_BREAK;
		}
		return qsm_cow_read_backing(req);
	}
	assert(run->nb_clusters == 1);
	if (posix_memalign((void **)&run->bounce, 4096, img->cluster_size))
		return fail(req, -ENOMEM);
	req->iov_buf[0] = (struct iovec){ run->bounce, img->cluster_size };
	return qsm_submit_io(req, QSM_IO_READ, QSM_IO_EV_COW_READ,
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
		if (run->reuse)
			continue; /* the same host cluster, its zero flag cleared */
		int ret = free_old_entry(img, old);
		if (ret < 0)
			return ret;
	}
	qsm_l2_mark_dirty(&img->l2c, run->l2);
	return 0;
}

enum qsm_event qsm_step_alloc_write(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t head = in_cluster(img, run->offset);
	uint64_t span = run->nb_clusters << img->cluster_bits;
	uint64_t tail = span - head - run->bytes;
	/* The clusters read as zeros now (fresh or just zeroed): others may
	 * write into them while we do (JOIN_WRITE). */
	/* A copy-on-read fill writes whole clusters of older data: a guest
	 * write must never land in them before it (it waits, then finds the
	 * clusters allocated, and the fill leaves them). */
	run->alloc.joinable = !run->bounce && !(req->flags & QSM_REQ_COR_FILL);
	bool fill = run->bounce != NULL; /* COW from old data; zeros need no write */
	int cnt = 0;

	if (fill && head)
		req->iov_buf[cnt++] = (struct iovec){ run->bounce, head };
	int n = qsm_run_payload(req, req->iov_buf + cnt, req->iov_cap - cnt - 1);
	assert(n > 0);
	cnt += n;
	if (fill && tail)
		req->iov_buf[cnt++] = (struct iovec){ qsm_cow_tail_buf(req), tail };
	uint64_t host = fill ? run->host : run->host + head;
	if (QSM_MUTANT(L2_BEFORE_DATA)) {
		/* mutant: the entries point at the new clusters (and a batch
		 * may write them) while the data is still on its way. */
		int ret = l2_point_at_new(req);
		if (ret < 0)
			return fail(req, ret);
		qsm_wb_kick(img);
	}
	return qsm_submit_io(req, QSM_IO_WRITE, run->bounce ? QSM_IO_EV_COW_WRITE : QSM_IO_EV_DATA_WRITE,
			 host, req->iov_buf, cnt);
}

enum qsm_event qsm_step_l2_update(struct qsm_req *req)
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
	qsm_alloc_unlink(req, 0);
	return QSM_E_UPDATED;
}

enum qsm_event qsm_step_zero_update(struct qsm_req *req)
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
		int ret = qsm_check_l2_entry(req, idx, old);
		if (ret < 0)
			return fail(req, ret);
		enum qcow2_entry_kind k = qcow2_entry_kind(old);
		uint64_t old_host = (k == QCOW2_EK_COMPRESSED) ? 0 : qcow2_entry_offset(old);
		uint64_t new;
		bool unmap;

		if (k == QCOW2_EK_COMPRESSED) {
			/* As QEMU: a compressed cluster is always released; v2 has
			 * no zero flag, so it is deallocated (no backing file here,
			 * see qsm_classify_zeroes/qsm_classify_discard). */
			new = qcow2_entry_zero(img->hdr.version);
			unmap = true;
		} else if (req->machine == QSM_M_DISCARD) {
			/* As QEMU: v3 keeps a zero cluster so nothing shows through
			 * (unallocated clusters over a backing file included), v2
			 * can only deallocate (and never runs with a backing file,
			 * see qsm_classify_discard). */
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

enum qsm_event qsm_step_next_run(struct qsm_req *req)
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

enum qsm_event qsm_step_join_wait(struct qsm_req *req)
{
	struct qsm_run *run = &req->run;
	if (!run->join_done)
		return QSM_E_WAIT; /* qsm_alloc_unlink posts WAKE or ERROR */
	return run->join_ret < 0 ? fail(req, run->join_ret) : QSM_E_UPDATED;
}

enum qsm_event qsm_step_free_wait(struct qsm_req *req)
{
	qsm_wb_join_next(req->img, req);
	return QSM_E_WAIT;
}

enum qsm_event qsm_step_durable_wait(struct qsm_req *req)
{
	/* A close, or a blocking full write-back: the batch writes the
	 * deferred refcounts too and goes round until clean. */
	if (req->machine == QSM_M_CLOSE || (req->flags & QSM_REQ_FULL_WRITEBACK))
		req->img->wb_full = true;
	qsm_wb_join(req->img, req);
	return QSM_E_WAIT;
}
