/*
 * sm/steps.h: what the step files of the request machines share (not
 * installed; only sm/dispatch.c, lookup.c, classify.c, data.c, alloc.c,
 * backing.c and compressed.c include it).
 *
 * The step functions, one per state with an entry action, are called only
 * by the dispatcher's step() (sm/dispatch.c): each returns the event that
 * leaves the state at once, or QSM_E_WAIT when the event will be posted
 * later (qsm_sm_post) by whoever ends the wait.  They never change
 * req->state themselves.  Errors go through fail(): the first error is
 * kept in req->ret and the request leaves through DONE.
 */
#ifndef QSM_STEPS_H
#define QSM_STEPS_H

#include <assert.h>

#include "metadata/l2entry.h"
#include "sm/sm.h"

/* --- small helpers -------------------------------------------------------- */

static inline bool is_write_machine(enum qsm_machine m)
{
	return m == QSM_M_WRITE || m == QSM_M_ZEROES || m == QSM_M_DISCARD ||
	       m == QSM_M_WRITE_COMPRESSED;
}

static inline uint64_t cluster_of(const struct qsm_image *img, uint64_t off)
{
	return off >> img->cluster_bits;
}

static inline uint64_t in_cluster(const struct qsm_image *img, uint64_t off)
{
	return off & (img->cluster_size - 1);
}

/* Every valid host offset lies below this: the end of the file as opened or
 * written since, or of what the allocator handed out. */
static inline uint64_t host_limit(struct qsm_image *img)
{
	return QSM_MAX(img->file_end, qsm_refcount_image_end(img->rc));
}

/* Record the first error of a request and leave through DONE. */
static inline enum qsm_event fail(struct qsm_req *req, int ret)
{
	assert(ret < 0);
	if (!req->ret)
		req->ret = ret;
	return QSM_E_ERROR;
}

static inline void release_l2(struct qsm_req *req)
{
	if (req->run.l2) {
		if (req->flags & QSM_REQ_FUA)
			qsm_wb_note_fua(req);
		qsm_l2_put(&req->img->l2c, req->run.l2);
		req->run.l2 = NULL;
	}
}

static inline void wait_on(struct qsm_wait **list, struct qsm_req *req)
{
	assert(!req->waiting);
	req->wait.req = req;
	req->wait.next = *list;
	*list = &req->wait;
	req->waiting = true;
}

static inline struct qsm_l2alloc *l2alloc_find(const struct qsm_image *img, uint64_t l1_index)
{
	for (struct qsm_l2alloc *a = img->l2allocs; a; a = a->next)
		if (a->l1_index == l1_index)
			return a;
	return NULL;
}

/* Clusters of the run [run->offset, +bytes) and the last index it touches. */
static inline uint64_t run_clusters(const struct qsm_image *img, uint64_t off, uint64_t bytes)
{
	return cluster_of(img, off + bytes - 1) - cluster_of(img, off) + 1;
}

/* Does this read copy what it reads from below into the image
 * (qsm_open_opts.copy_on_read; never for the VM-state area)? */
static inline bool wants_cor(const struct qsm_req *req)
{
	return req->img->copy_on_read && req->machine == QSM_M_READ &&
	       !(req->flags & QSM_REQ_VMSTATE);
}

/* Does this write complete only once durable: the cache mode says so, or
 * the request has FUA (QSM_REQ_FUA, QSM_ZERO_FUA: the same bit)? */
static inline bool wants_durable(const struct qsm_req *req)
{
	enum qsm_cache_mode c = req->img->cache;
	if (req->flags & QSM_REQ_COR_FILL)
		return false;
	return c == QSM_CACHE_WRITETHROUGH || c == QSM_CACHE_DIRECTSYNC ||
	       (req->flags & QSM_REQ_FUA);
}

/* --- sm/data.c ------------------------------------------------------------ */
/* Completion of req->io: clears the request's busy host range, releases the
 * held frees it was the last to block, posts IO_DONE or ERROR and drains. */
void qsm_req_io_cb(struct qsm_io_req *io, int ret);
/* BREAK (sm/data.c): resume's callback, and the submit on the way back. */
void qsm_req_resume_cb(struct qsm_io_req *io, int ret);
enum qsm_event qsm_req_resubmit(struct qsm_req *req);
/*
 * Submit the request's one data I/O (req->io) of `iov` at host offset
 * `host`; its completion posts IO_DONE or ERROR.  Notes the host range in
 * flight (io_busy, invariant 5) and extends img->file_end for writes.
 * Returns QSM_E_WAIT.
 */
enum qsm_event qsm_submit_io(struct qsm_req *req, enum qsm_io_op op, enum qsm_io_event tag,
			     uint64_t host, const struct iovec *iov, int iovcnt);
/* The run's slice of the caller's buffers (the zero buffer for write-zeroes
 * runs written as data) into dst[0..cap); returns the iovec count. */
int qsm_run_payload(struct qsm_req *req, struct iovec *dst, int cap);
enum qsm_event qsm_step_data_io(struct qsm_req *req);     /* DATA_READ, DATA_WRITE, JOIN_WRITE */
enum qsm_event qsm_step_file_range(struct qsm_req *req);  /* FILE_RANGE */
enum qsm_event qsm_step_zero_fill(struct qsm_req *req);   /* ZERO_FILL */

/* --- sm/lookup.c ---------------------------------------------------------- */
enum qsm_event qsm_step_l1_lookup(struct qsm_req *req);   /* L1_LOOKUP */
enum qsm_event qsm_step_l2_alloc(struct qsm_req *req);    /* L2_ALLOC */
enum qsm_event qsm_step_l2_lookup(struct qsm_req *req);   /* L2_LOOKUP */

/* --- sm/classify.c -------------------------------------------------------- */
/*
 * Validate the L2 entry e at index idx of the run's table (req->run.l2,
 * held): 0, or the error of qsm_image_corrupt() (-EIO, image marked
 * corrupt) when it is malformed or points outside the data area.
 */
int qsm_check_l2_entry(struct qsm_req *req, uint64_t idx, uint64_t e);
/* L2_LOOKUP's decision, per machine, with the run's table held (released
 * unless the next state needs it): the event leaving L2_LOOKUP. */
enum qsm_event qsm_classify_read(struct qsm_req *req);       /* READ, STATUS */
enum qsm_event qsm_classify_write(struct qsm_req *req);      /* WRITE */
enum qsm_event qsm_classify_zeroes(struct qsm_req *req);     /* ZEROES */
enum qsm_event qsm_classify_discard(struct qsm_req *req);    /* DISCARD */
enum qsm_event qsm_classify_compressed(struct qsm_req *req); /* WRITE_COMPRESSED */

/* --- sm/alloc.c ----------------------------------------------------------- */
/* The allocation of req's run is over: its L2 entries are updated (ret 0)
 * or it failed (ret < 0).  Unlinks it, wakes its waiters and tells its
 * joiners (their data is mapped now, or lost with the allocation).  Does
 * nothing when the run has no allocation linked. */
void qsm_alloc_unlink(struct qsm_req *req, int ret);
/* Drop the references of host bytes [off, +len) nothing points at (a
 * failed allocation) from a path that cannot wait: at once when their
 * refcount blocks are cached, else at the next write-back's release. */
void qsm_release_unmapped(struct qsm_req *req, uint64_t off, uint64_t len);
/* A joiner leaves its owner's list early (its own write failed). */
void qsm_join_unlink(struct qsm_req *req);
/* Where ALLOC_WRITE takes the tail of the run's last cluster from in the
 * COW buffer (run.bounce: the first cluster, then the last). */
uint8_t *qsm_cow_tail_buf(struct qsm_req *req);
enum qsm_event qsm_step_cluster_alloc(struct qsm_req *req); /* CLUSTER_ALLOC */
enum qsm_event qsm_step_zero_clusters(struct qsm_req *req); /* ZERO_CLUSTERS */
enum qsm_event qsm_step_cow_read(struct qsm_req *req);      /* COW_READ */
enum qsm_event qsm_step_alloc_write(struct qsm_req *req);   /* ALLOC_WRITE */
enum qsm_event qsm_step_l2_update(struct qsm_req *req);     /* L2_UPDATE */
enum qsm_event qsm_step_zero_update(struct qsm_req *req);   /* ZERO_UPDATE */
enum qsm_event qsm_step_next_run(struct qsm_req *req);      /* NEXT_RUN */
enum qsm_event qsm_step_join_wait(struct qsm_req *req);     /* JOIN_WAIT */
enum qsm_event qsm_step_durable_wait(struct qsm_req *req);  /* DURABLE_WAIT */
enum qsm_event qsm_step_free_wait(struct qsm_req *req);     /* FREE_WAIT */

/* --- sm/backing.c --------------------------------------------------------- */
/* COW_READ over a backing file: the head and tail the write leaves of its
 * first and last cluster read from the backing image into a zeroed
 * run.bounce; IO_DONE once every read is in. */
enum qsm_event qsm_cow_read_backing(struct qsm_req *req);
enum qsm_event qsm_step_backing_read(struct qsm_req *req);   /* BACKING_READ */
enum qsm_event qsm_step_cor_write(struct qsm_req *req);      /* COR_WRITE */
enum qsm_event qsm_step_backing_status(struct qsm_req *req); /* BACKING_STATUS */

/* --- sm/compressed.c ------------------------------------------------------ */
/* Free the compressed clusters of the request's batch (req->cz). */
void qsm_cz_release(struct qsm_req *req);
enum qsm_event qsm_step_compressed_read(struct qsm_req *req);  /* COMPRESSED_READ */
enum qsm_event qsm_step_decompress(struct qsm_req *req);       /* DECOMPRESS */
enum qsm_event qsm_step_compress(struct qsm_req *req);         /* COMPRESS */
enum qsm_event qsm_step_byte_alloc(struct qsm_req *req);       /* BYTE_ALLOC */
enum qsm_event qsm_step_compressed_write(struct qsm_req *req); /* COMPRESSED_WRITE */

#endif
