/*
 * sm/classify.c: what the L2 entries of a run mean for the request: the
 * decision that ends L2_LOOKUP, once the run's table is in hand.
 *
 * One classifier per machine reads the run's entries, validates them
 * (qsm_check_l2_entry), cuts the run where the kind of cluster changes
 * (run_clip), and returns the event that takes the request on:
 *   read, status:  data | zeros | backing | compressed  (status: reported)
 *   write:         in place | join | alloc busy | need alloc | held (a late
 *                  write beside a snapshot operation, sm/snapops.c)
 *   write zeroes:  whole clusters | backing (ask the chain first) | nothing
 *                  to do | alloc busy | as a write (partial clusters)
 *   discard:       whole clusters | nothing to do | alloc busy
 *   compressed:    compressed (it compressed smaller) | alloc busy | as a write
 *
 * Transition -> function
 *   L2_LOOKUP -> DATA_READ|ZERO_FILL|BACKING_READ|COMPRESSED_READ|DONE ..
 *                                          qsm_classify_read (DONE: status)
 *   L2_LOOKUP -> DATA_WRITE|JOIN_WRITE|ALLOC_WAIT|CLUSTER_ALLOC|HELD ..
 *                                          qsm_classify_write
 *   L2_LOOKUP -> NEXT_RUN .................. qsm_classify_write (a
 *                                          copy-on-read fill over clusters
 *                                          allocated meanwhile, cor_fill_skip)
 *   L2_LOOKUP -> ZERO_UPDATE|BACKING_STATUS|NEXT_RUN|ALLOC_WAIT ....
 *                                          qsm_classify_zeroes
 *   L2_LOOKUP -> ZERO_UPDATE|NEXT_RUN|ALLOC_WAIT .................
 *                                          qsm_classify_discard
 *   L2_LOOKUP -> BYTE_ALLOC|ALLOC_WAIT ..... qsm_classify_compressed
 *   L2_LOOKUP -> REFBLOCK_LOAD ............. qsm_rc_wait (a refcount a
 *                                          classifier reads is not cached)
 *   (a partial zero write over data, and a compressed cluster that did not
 *   shrink, go on as writes through qsm_classify_write)
 *
 * Invariants (numbered across sm/, see sm/dispatch.c)
 *  2. (the rule is in sm/alloc.c) A run that needs allocation never
 *     overlaps another's allocation in flight: qsm_classify_write cuts it
 *     before the first one, joins it or waits; the other classifiers wait.
 *  6. An entry is validated before its kind steers a request or its offset
 *     is used (qsm_check_l2_entry, here or in ZERO_UPDATE for whole
 *     clusters): a corrupt entry fails the request and marks the image
 *     corrupt, it never sends data to a cluster holding metadata.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "sm/steps.h"

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
int qsm_check_l2_entry(struct qsm_req *req, uint64_t idx, uint64_t e)
{
	struct qsm_image *img = req->img;
	uint64_t off = qcow2_entry_offset(e);
	if (e & QCOW2_OFLAG_COMPRESSED) {
		uint64_t coff, clen;
		qcow2_compressed_extent(img->cluster_bits, e, &coff, &clen);
		return check_data_range(req, coff, clen, "L2 entry: compressed cluster");
	}
	/* Reserved bits are ignored, as QEMU does (the checkers report them). */
	if (off && !QSM_IS_ALIGNED(off, img->cluster_size))
		return qsm_image_corrupt(img, "Cluster allocation offset %#llx unaligned (L2 offset: %#llx, L2 index: %#llx)",
					 (unsigned long long)off,
					 (unsigned long long)req->run.l2->offset,
					 (unsigned long long)idx);
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
		return qsm_image_corrupt(img, "Preventing invalid write on metadata (overlaps with %s)",
					 qsm_metadata_kind(img, host));
	uint64_t v;
	int ret = qsm_refcount_read(img->rc, cluster_of(img, host), &v, qsm_req_rcw(req));
	if (ret == -EUCLEAN)
		return 0; /* a block never read (R9): QEMU writes in place unasked */
	if (ret < 0)
		return ret; /* -EAGAIN: the caller waits */
	if (v == 0)
		return qsm_image_corrupt(img, "data cluster %#llx is in use but its refcount is 0",
					 (unsigned long long)host);
	return 0;
}

/* Does a cluster of this kind read as zeros in this image?  Unallocated
 * clusters do only when there is no backing file. */
static bool reads_zero_here(const struct qsm_image *img, enum qcow2_entry_kind k)
{
	return qcow2_kind_reads_zero(k) && !(k == QCOW2_EK_UNALLOC && qsm_has_backing(img));
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
		return qsm_image_rc_error(img, ret);
	qsm_refcount_unpin(img->rc, &req->rcw);
	img->meta_prealloc = count >= threshold;
	*yes = img->meta_prealloc;
	return 0;
}

enum qsm_event qsm_classify_read(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t n = run_clusters(img, run->offset, run->bytes);
	uint64_t e0 = qsm_l2_entry(run->l2, run->l2_index);
	enum qcow2_entry_kind k0 = qcow2_entry_kind(e0);
	int ret = qsm_check_l2_entry(req, run->l2_index, e0);
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
	/* Copy-on-read: every unallocated cluster is copied (QEMU's
	 * bdrv_co_do_copy_on_readv: what the image does not allocate itself),
	 * with a backing file or not: a run of them goes to BACKING_READ. */
	bool from_backing = k0 == QCOW2_EK_UNALLOC &&
			    (qsm_has_backing(img) || wants_cor(req));
	uint64_t i;
	for (i = 1; i < n; i++) {
		uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
		enum qcow2_entry_kind k = qcow2_entry_kind(e);
		if ((ret = qsm_check_l2_entry(req, run->l2_index + i, e)) < 0)
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
 *  - QCOW2_EK_ZERO_ALLOC, not shared: written in place (run->reuse), extended
 *    over host-contiguous clusters of that kind; the rest of them zeroed;
 *  - QCOW2_EK_UNALLOC/_ZERO/shared _ZERO_ALLOC: allocate, extended over clusters of
 *    those kinds (no old data to keep: COW regions are zeros); with a
 *    backing file, unallocated clusters form runs of their own whose
 *    partial head and tail are copied from the backing image (cow_backing);
 *  - QCOW2_EK_SHARED: allocate one cluster, COW from the shared one.
 */
/*
 * A copy-on-read fill (QSM_REQ_COR_FILL) writes only clusters that are
 * still unallocated: cut the run where that changes.  Returns true when
 * the run's first clusters are allocated (the caller leaves them: NOTHING_TO_DO,
 * the run released), false when the run (cut) is all unallocated.
 */
static bool cor_fill_skip(struct qsm_req *req, int *ret)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t n = run_clusters(img, run->offset, run->bytes), i;
	bool unalloc0 = false;

	*ret = 0;
	for (i = 0; i < n; i++) {
		uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
		if ((*ret = qsm_check_l2_entry(req, run->l2_index + i, e)) < 0)
			return false;
		bool u = qcow2_entry_kind(e) == QCOW2_EK_UNALLOC;
		if (i == 0)
			unalloc0 = u;
		else if (u != unalloc0)
			break;
	}
	run_clip(req, i);
	if (unalloc0)
		return false;
	release_l2(req);
	return true;
}

enum qsm_event qsm_classify_write(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t n = run_clusters(img, run->offset, run->bytes);
	uint64_t e0 = qsm_l2_entry(run->l2, run->l2_index);
	enum qcow2_entry_kind k0 = qcow2_entry_kind(e0);
	uint64_t host0 = qcow2_entry_offset(e0);
	int ret = qsm_check_l2_entry(req, run->l2_index, e0);
	uint64_t i;

	if (ret < 0)
		return fail(req, ret);
	/* Classified again after CLUSTER_ALLOC let go (a refcount block to
	 * read, a breakpoint): what the last classification decided is void. */
	run->allocating = false;
	run->reuse = false;
	run->cow_backing = false;
	if (req->flags & QSM_REQ_COR_FILL) {
		if (cor_fill_skip(req, &ret))
			return QSM_E_NOTHING_TO_DO;
		if (ret < 0)
			return fail(req, ret);
		n = run->nb_clusters;
	}
	if (k0 == QCOW2_EK_DATA) {
		for (i = 1; i < n; i++) {
			uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
			if ((ret = qsm_check_l2_entry(req, run->l2_index + i, e)) < 0)
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
			/* Zero data: one cluster per run, see qsm_run_payload. */
			run_clip(req, 1);
		run->host = host0 + in_cluster(img, run->offset);
		req->next_host = host0 + (run->nb_clusters << img->cluster_bits);
		return QSM_E_IN_PLACE;
	}
	/* Beside a snapshot operation only the in place writes above run:
	 * everything below allocates, copies or changes the entries. */
	if (req->late)
		return qsm_snap_defer(req);
	bool from_backing = k0 == QCOW2_EK_UNALLOC && qsm_has_backing(img);
	/* A preallocated zero cluster that is not shared (COPIED, QEMU's
	 * QCOW2_CLUSTER_ZERO_ALLOC with refcount 1) is written in place, as
	 * QEMU's handle_copied does: the run keeps the host clusters
	 * (run->reuse), extended over host-contiguous ones of the same kind,
	 * zeroes what the write leaves of them and clears the zero flag in
	 * L2_UPDATE, which frees nothing.  It still takes an allocation
	 * record (invariant 2): the guest clusters change kind. */
	/* Not while a data I/O that found the cluster through its old data
	 * entry is still in flight on it (a read racing the zeroing). */
	bool reuse = k0 == QCOW2_EK_ZERO_ALLOC && (e0 & QCOW2_OFLAG_COPIED) &&
		     req->machine == QSM_M_WRITE && !(req->flags & QSM_REQ_COR_FILL) &&
		     !qsm_host_io_busy(img, host0 >> img->cluster_bits);
	if (reuse) {
		for (i = 1; i < n; i++) {
			uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
			if ((ret = qsm_check_l2_entry(req, run->l2_index + i, e)) < 0)
				return fail(req, ret);
			if (qcow2_entry_kind(e) != QCOW2_EK_ZERO_ALLOC || !(e & QCOW2_OFLAG_COPIED) ||
			    qcow2_entry_offset(e) != host0 + (i << img->cluster_bits) ||
			    qsm_host_io_busy(img, (host0 >> img->cluster_bits) + i))
				break;
		}
	} else if (k0 == QCOW2_EK_SHARED || k0 == QCOW2_EK_COMPRESSED) {
		i = 1; /* one cluster, copied from its old contents */
	} else {
		for (i = 1; i < n; i++) {
			uint64_t e = qsm_l2_entry(run->l2, run->l2_index + i);
			enum qcow2_entry_kind k = qcow2_entry_kind(e);
			if ((ret = qsm_check_l2_entry(req, run->l2_index + i, e)) < 0)
				return fail(req, ret);
			if (!qcow2_kind_reads_zero(k) || (from_backing != (k == QCOW2_EK_UNALLOC && qsm_has_backing(img))))
				break;
			/* QEMU takes an unshared preallocated zero cluster as it is
			 * (handle_copied): it starts a run of its own. */
			if (k == QCOW2_EK_ZERO_ALLOC && (e & QCOW2_OFLAG_COPIED) &&
			    req->machine == QSM_M_WRITE && !(req->flags & QSM_REQ_COR_FILL))
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
		req->next_host = 0; /* QEMU waits for it, then starts a new extent */
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
	run->reuse = reuse;
	run->cow_backing = from_backing;
	return QSM_E_NEED_ALLOC;
}

/*
 * Write zeroes, with QEMU's results (so `map` agrees):
 *  - whole clusters (the partial last cluster of the image counts as whole
 *    when the run reaches the image's end, as in QEMU): v3 sets the zero flag (keeping the allocation unless
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
enum qsm_event qsm_classify_zeroes(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	struct qsm_run *run = &req->run;
	uint64_t head = in_cluster(img, run->offset);
	bool v3 = img->hdr.version >= 3;
	/* A run reaching the end of the image covers its partial last cluster
	 * whole (QEMU's qcow2_co_pwrite_zeroes has no tail there). */
	bool to_end = run->offset + run->bytes >= img->hdr.size;
	bool whole = head == 0 && (run->bytes >= img->cluster_size || to_end);

	if (whole && !to_end)
		run->bytes = QSM_ALIGN_DOWN(run->bytes, img->cluster_size);
	else if (!whole)
		run->bytes = QSM_MIN(run->bytes, img->cluster_size - head);
	run->nb_clusters = run_clusters(img, run->offset, run->bytes);
	if (wait_for_overlapping_alloc(req))
		return QSM_E_ALLOC_BUSY;
	if (req->flags & QSM_REQ_COR_FILL) {
		int ret;
		if (cor_fill_skip(req, &ret))
			return QSM_E_NOTHING_TO_DO;
		if (ret < 0)
			return fail(req, ret);
	}
	if (whole && (v3 || !qsm_has_backing(img)))
		return QSM_E_WHOLE_CLUSTERS;
	if (whole && run->bytes >= img->cluster_size) {
		/* v2 over a backing file: only real zeros hide it, one
		 * cluster per run (see qsm_run_payload). */
		run_clip(req, 1);
		return qsm_classify_write(req);
	}
	/* (v2 over a backing file, the partial last cluster: as a partial one.) */

	uint64_t e = qsm_l2_entry(run->l2, run->l2_index);
	int ret = qsm_check_l2_entry(req, run->l2_index, e);
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
	return qsm_classify_write(req);
}

enum qsm_event qsm_classify_discard(struct qsm_req *req)
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
	/* The partial last cluster of an image is discarded whole when the run
	 * reaches the image's end (as QEMU's qcow2_co_pdiscard); any other
	 * partial tail is skipped. */
	bool to_end = run->offset + run->bytes >= img->hdr.size;
	if (run->bytes < img->cluster_size && !to_end) {
		release_l2(req);
		return QSM_E_NOTHING_TO_DO;
	}
	if (!to_end)
		run->bytes = QSM_ALIGN_DOWN(run->bytes, img->cluster_size);
	run->nb_clusters = run_clusters(img, run->offset, run->bytes);
	if (wait_for_overlapping_alloc(req))
		return QSM_E_ALLOC_BUSY;
	return QSM_E_WHOLE_CLUSTERS;
}

/*
 * Compressed write, one cluster per run (the request is cluster aligned).
 * A cluster that compressed smaller goes to BYTE_ALLOC, whatever the old entry
 * (released at L2_UPDATE; QEMU refuses to overwrite an allocated cluster
 * here, qsm treats it as any overwrite); one that did not shrink is an
 * ordinary write of the cluster, as QEMU falls back to.
 */
enum qsm_event qsm_classify_compressed(struct qsm_req *req)
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
		return qsm_classify_write(req);
	}
	uint64_t e0 = qsm_l2_entry(run->l2, run->l2_index);
	int ret = qsm_check_l2_entry(req, run->l2_index, e0);
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
