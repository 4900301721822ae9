/*
 * sm/sm.h: internals of the engine shared by the files in sm/ (not installed).
 *
 * One `struct qsm_image` per open image; one `struct qsm_req` per request,
 * carrying all of its state (no allocation per step).  States, events and
 * machines come from sm/states.def.
 */
#ifndef QSM_SM_H
#define QSM_SM_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/uio.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/util.h"
#include "io/work.h"
#include "metadata/batch.h"
#include "metadata/bitmap.h"
#include "metadata/l2cache.h"
#include "metadata/snapshot.h"
#include "metadata/qcow2.h"
#include "metadata/refcount.h"
#include "sm/qsm.h"

enum qsm_machine {
#define MACHINE(name, desc) QSM_M_##name,
#include "sm/states.def"
	QSM_M__COUNT
};

enum qsm_state {
#define STATE(name, desc) QSM_S_##name,
#include "sm/states.def"
	QSM_S__COUNT
};

enum qsm_event {
#define EVENT(name, label) QSM_E_##name,
#include "sm/states.def"
	QSM_E__COUNT,
	QSM_E_WAIT = QSM_E__COUNT, /* step result: suspend until an event is posted */
};

const char *qsm_state_name(enum qsm_state s);
const char *qsm_state_desc(enum qsm_state s);
const char *qsm_event_name(enum qsm_event e);
const char *qsm_event_label(enum qsm_event e);
const char *qsm_machine_name(enum qsm_machine m);
const char *qsm_machine_desc(enum qsm_machine m);
/* Next state for (machine, from, event), or -1 when the table has no such edge. */
int qsm_transition(enum qsm_machine m, enum qsm_state from, enum qsm_event ev);
/* Is BREAK --RESUME--> to one of machine m's TRANSITION_BACK edges (the way
 * back from a breakpoint, chosen per request: qsm_transition cannot say)? */
bool qsm_transition_back(enum qsm_machine m, enum qsm_state to);

/* A waiter list node: anything that sleeps on a condition (frozen L1 slot,
 * in-flight allocation, write-back batch) links one of these. */
struct qsm_wait {
	struct qsm_wait *next;
	struct qsm_req *req;
};

/*
 * An allocation in flight: guest clusters [first, first+count) of one
 * request, from CLUSTER_ALLOC until L2_UPDATE.  Lives inside the request.
 */
struct qsm_alloc {
	struct qsm_alloc *next, *prev;   /* image's in-flight list */
	uint64_t first, count;           /* guest cluster indices */
	struct qsm_wait *waiters;
	uint64_t host;                   /* host offset of cluster `first` */
	/* Fresh clusters written without any COW: another write may put its
	 * data into them at once (JOIN_WRITE) and complete after our L2 update. */
	bool joinable;
	struct qsm_req *joiners;         /* linked through run.join_next */
};

/* The current cluster run of a request (inside one L2 table). */
struct qsm_run {
	uint64_t offset;          /* guest byte offset */
	uint64_t bytes;
	uint64_t l1_index, l2_index;
	uint64_t nb_clusters;     /* clusters the run touches */
	struct qsm_l2_table *l2;  /* referenced while held */
	uint64_t host;            /* host offset of the run's first cluster */
	bool allocating;
	bool reuse;               /* allocated zero cluster rewritten in place */
	/* Unallocated clusters of an image with a backing file: the parts of
	 * the first and last cluster the write leaves (cow_head bytes before
	 * it, cow_tail after it, each 0 when not needed or past the end of the
	 * backing image) are read from the backing image in COW_READ. */
	bool cow_backing;
	uint64_t cow_head, cow_tail;
	uint64_t old_entry;       /* L2 entry before the write (COW source) */
	struct qsm_alloc alloc;
	bool alloc_linked;
	struct qsm_alloc *joined;     /* another's allocation we write into */
	struct qsm_req *join_next;
	bool join_done;               /* its L2 update happened (or it failed) */
	int join_ret;
	struct iovec *iov;        /* the run's iovec (points into req->iov_buf) */
	int iovcnt;
	uint8_t *bounce;          /* COW buffer (cluster run sized) when needed */
	uint8_t *cbuf;            /* compressed bytes of old_entry's cluster */
	size_t csize;
	/* WRITE_COMPRESSED: the run's cluster goes compressed (BYTE_ALLOC on):
	 * clen bytes at cdata (owned by the request's batch, req->cz), placed
	 * at host; bytes_held while they are reserved and not yet mapped. */
	bool compressed;
	bool bytes_held;
	const uint8_t *cdata;
	size_t clen;
};

/* One cluster of a compressed write, compressed on a worker (COMPRESS). */
struct qsm_cjob {
	struct qsm_work work;
	struct qsm_req *req;
	uint64_t skip, len;       /* the cluster's bytes in the request's iovec */
	uint8_t *out;             /* compressed, clen bytes; NULL when it does not shrink */
	size_t clen;
	int ret;
};

struct qsm_image;

/* L2 tables a FUA request notes for a targeted write-back batch. */
#define QSM_FUA_TABLES 4

/* Clusters a compressed write compresses at once (in parallel). */
#define QSM_CZ_BATCH 16

struct qsm_req {
	struct qsm_image *img;
	uint64_t id;
	enum qsm_machine machine;
	enum qsm_state state;
	int ret;                  /* first error */
	uint64_t offset, bytes;   /* the whole request */
	uint64_t done;            /* bytes finished so far */
	const struct iovec *iov;  /* caller's (READ/WRITE) */
	int iovcnt;
	unsigned flags;           /* QSM_REQ_FUA, QSM_ZERO_*, QSM_REQ_FULL_WRITEBACK */
	qsm_cb cb;
	void *opaque;
	struct qsm_extent *status_out;
	/* ZEROES over a backing file: do the parts of the cluster at
	 * probe_cluster that the zero write leaves (probe_off/len now, then
	 * probe_off2/len2) read as zeros through the chain?  Asked in
	 * BACKING_STATUS, one image of the chain at a time (probe_img),
	 * answered in probe_zero. */
	uint64_t probe_cluster;
	uint64_t probe_off, probe_len, probe_off2, probe_len2;
	struct qsm_image *probe_img;
	struct qsm_extent probe_ext;
	bool probe_done, probe_zero;
	/* READ with copy-on-read: the run widened to whole clusters
	 * [cor_off, +cor_len), read into cor_buf (BACKING_READ), then written
	 * into the image (COR_WRITE) and copied to the caller. */
	uint8_t *cor_buf;
	uint64_t cor_off, cor_len;
	struct iovec cor_iov;

	struct qsm_run run;
	struct iovec *iov_buf;    /* scratch iovecs: caller's count + 2 */
	int iov_cap;

	/* Waiting. */
	struct qsm_l2_waiter l2w;
	struct qsm_rc_waiter rcw;  /* REFBLOCK_LOAD; also holds its pins */
	enum qsm_event rb_resume;  /* posted when the refcount block is read */
	struct qsm_wait wait;     /* our node while in a waiter list */
	bool waiting;

	/* Posted events (image run queue). */
	struct qsm_req *q_next;
	enum qsm_event q_event;
	int q_ret;
	bool queued;

	/* CPU work on the image's worker pool (DECOMPRESS): one job, or a
	 * wait for room in the pool's queue (work_waiting). */
	struct qsm_work work;
	struct qsm_work_waiter work_wait;
	bool work_waiting;
	int work_ret;

	/* WRITE_COMPRESSED: the batch of clusters [cz_first, +nb_cz) (indices
	 * from offset) compressed by COMPRESS; cz has QSM_CZ_BATCH entries. */
	struct qsm_cjob *cz;
	uint64_t cz_first;
	unsigned nb_cz, cz_pending;
	int cz_ret;

	/* The host bytes [io_lo, io_hi) of the data I/O in flight through
	 * qsm_submit_io (io_busy): their clusters are not released (WB_RELEASE)
	 * until it completes, see qsm_host_io_busy. */
	bool io_busy;
	uint64_t io_lo, io_hi;
	/* In BREAK: the state it stopped in, where resume takes it back
	 * (TRANSITION_BACK), req->io prepared and not submitted yet. */
	enum qsm_state brk_from;
	enum qsm_state brk_back;  /* where resume takes it (a TRANSITION_BACK edge) */
	bool brk_rerun;           /* nothing prepared: brk_back's step runs as usual */

	/* Parallel I/O of one step (write-back levels issue several). */
	struct qsm_io_req io;
	unsigned io_pending;
	int io_ret;

	bool wt_counted;          /* counted in img->wt_pending */
	/* QEMU's host extent (qcow2_alloc_host_offset): the host offset just
	 * past the write's previous run, in place or allocated, or 0.  The
	 * next allocating run takes the free clusters there first
	 * (qsm_refcount_alloc_at), as QEMU's handle_alloc does. */
	uint64_t next_host;
	/* FREE_WAIT entries so far (sm/alloc.c, free_lower_pending): bounded,
	 * so frees that keep coming cannot starve an allocation. */
	unsigned free_waits;
	/* FUA writes and zero writes (sm/writeback.c, "Targeted batches"):
	 * the L2 tables (host offsets) and L1 indices its runs mapped
	 * through, noted as each run lets its table go (release_l2), so that
	 * its batch writes those alone; fua_many when more than fit (its
	 * batch is then a normal one). */
	uint64_t fua_l2[QSM_FUA_TABLES];
	uint64_t fua_l1[QSM_FUA_TABLES];
	unsigned nb_fua;
	bool fua_many;
	/* Tracing only: the request this one waits on (FROZEN, ALLOC_WAIT,
	 * JOIN_WRITE/JOIN_WAIT, DURABLE_WAIT), reported as wait_for. */
	uint64_t wait_for;

	/* WRITEBACK machine only. */
	struct qsm_wb *wb;
	/* SNAPSHOT machine only: the operation (sm/snapops.c). */
	struct qsm_snapjob *snap;
	/* Counted in img->active (and img->writers for the kinds a create or
	 * delete holds back) from its start to its completion; never while
	 * HELD from START.  late: a guest write begun while a create or delete
	 * runs (not held: qsm_snap_holds), counted in img->late_writes instead
	 * of img->writers; it writes in place only, and the first run that
	 * would change an L2 entry goes to HELD instead (qsm_snap_defer),
	 * still counted in img->active, neither late nor a writer until the
	 * operation is over (sm/snapops.c invariant 14). */
	bool counted, counted_writer, late;

	struct qsm_req *all_next, *all_prev; /* image's list of live requests */
};

/* A write-back batch: what WB_COLLECT snapshotted. */
struct qsm_wb {
	struct qsm_meta_batch blocks, reftable, header, l2, l1;
	struct qsm_rc_collect rc;
	bool marks_dirty;         /* the header level sets the dirty bit */
	bool lazy_deferred;       /* lazy refcounts: this batch defers them */
	size_t l2_submitted;      /* L2 writes handed to io/ (they report back) */
	uint64_t *frees;          /* host clusters whose refcount drops at WB_RELEASE */
	size_t nb_frees;
	size_t nb_released;       /* frees[0..nb_released) done (WB_RELEASE may wait) */
	struct qsm_wait *waiters; /* requests completed by this batch */
	bool full;                /* refcounts too, rounds until clean (img->wb_full) */
	/* Only FUA requests wait, nothing asked for space: write only what
	 * their tables need (sm/writeback.c, "Targeted batches"). */
	bool targeted;
	bool space_wanted;        /* started for cache pressure (img->wb_wanted) */
	bool cleaning;            /* this round writes the header with the dirty bit cleared */
	unsigned round;           /* rounds of a full batch done so far */
	struct qsm_io_req *ios;   /* one per write of the current level */
	size_t nb_ios;
};

/* A bitmap whose bits are in memory (sm/bitmaps.c): recorded into (its
 * data clusters as this open gave them), or loaded to be read. */
struct qsm_tracked_bitmap {
	uint32_t index;           /* in img->bitmaps */
	uint8_t *data;            /* table_size clusters of bits */
	uint64_t *table;          /* data cluster offsets, one per entry */
	uint64_t *old_table;      /* while loading: the table as found */
	bool recording;           /* writes set its bits; else loaded to be read
				   * (qsm_bitmap_load): no table, never stored */
};

struct qsm_image {
	struct event_base *base;
	struct qsm_io *io;
	struct qcow2_header hdr;  /* raw: only size is set (the file's size) */
	/* The snapshot table as read and validated at open (raw: empty), then
	 * as the snapshot operations change it (qsm_snapshot_get lists it). */
	struct qcow2_snapshot_table snaps;
	/* The persistent bitmaps as read and validated at open (zeroed when the
	 * image keeps none; read-write, with the enabled ones marked in use). */
	struct qcow2_bitmap_dir bitmaps;
	bool bitmaps_ext_dropped; /* the header held an extension bit 0 voids */
	/* The bitmaps whose bits are in memory (sm/bitmaps.c); room for
	 * bitmaps.ext.nb (each at most once). */
	struct qsm_tracked_bitmap *tracked;
	uint32_t nb_tracked;
	bool bitmaps_quiet;       /* set no bits (a truncate's own zeroing, as QEMU's) */
	/* A raw image: no metadata at all, guest offset = file offset.  Requests
	 * take the RAW edges (sm/states.def); rc, l1 and l2c stay empty. */
	bool raw;
	/* The format was probed (qsm_open_opts.probe_format).  A probed raw
	 * image keeps what its first 512 bytes hold once the writes submitted
	 * so far land (sector0: read at open, patched at every submission
	 * over it), to refuse the write that would make them probe as another
	 * format (probed_raw_guard, sm/image.c). */
	bool probed;
	uint8_t *sector0;         /* QCOW2_PROBE_BYTES; probed raw images only */
	/* The backing image (read-only, same loop, owned by this image), or NULL
	 * when the header names none or it was not opened (no_backing: the
	 * unallocated clusters then read as zeros). */
	struct qsm_image *backing;
	/* QEMU's metadata_preallocation: -1 not yet known, else whether far
	 * more clusters have a refcount than the file has storage (a
	 * preallocated image); only then does block status ask the file
	 * whether a data cluster is a hole (see meta_prealloc()). */
	int meta_prealloc;
	int64_t open_allocated;   /* storage the file used at open, -1 unknown */
	uint64_t cluster_size;
	unsigned cluster_bits;
	uint64_t l2_entries;      /* per table */
	bool read_only;
	bool copy_on_read;        /* qsm_open_opts.copy_on_read */
	enum qsm_cache_mode cache;
	/* Sticky error states (sm/image.c, "Corruption"):
	 *  - error = -EIO: nothing more is written (write-back, allocation,
	 *    data writes of requests already accepted fail with -EIO); set
	 *    after a failed metadata write, and by a corruption;
	 *  - corrupt: a corruption was found (qsm_image_corrupt); new writes,
	 *    zero writes, discards, compressed writes and resizes are refused
	 *    at submit with -ENOMEDIUM; implies error.  The only write left is
	 *    the header's corrupt bit (corrupt_mark). */
	int error;
	bool corrupt;
	enum qsm_corrupt_mark {
		QSM_MARK_NONE,     /* nothing to write */
		QSM_MARK_PENDING,  /* to write once no write-back batch runs */
		QSM_MARK_BUSY,     /* corrupt_io in flight (write, then flush) */
		QSM_MARK_DONE,     /* written (or failed: best effort) */
	} corrupt_mark;
	struct qsm_io_req corrupt_io;
	struct iovec corrupt_iov;
	uint8_t corrupt_be[8];    /* incompatible_features as on disk, bit 1 set */
	char errmsg[256];         /* last error explained (a corruption: the first) */
	/* Damaged refcounts found at open (check_metadata_refcounts): the
	 * reason QEMU gives at its first allocation, "" none. */
	char rc_damage[128];

	/* L1 table, resident, on-disk byte order. */
	uint8_t *l1;
	uint64_t l1_size;         /* entries */
	uint64_t l1_dirty_lo, l1_dirty_hi; /* dirty entry range [lo, hi) */
	/* What the L1 on disk holds, or will once the running batch is done
	 * (sm/writeback.c, "Targeted batches"): valid while l1_disk_offset and
	 * l1_disk_size are the table's; an entry that differs from l1 may not
	 * be durable. */
	uint8_t *l1_disk;
	uint64_t l1_disk_offset, l1_disk_size;

	struct qsm_refcounts *rc;
	struct qsm_l2_cache l2c;
	uint64_t file_end;        /* bytes ever covered by writes; beyond reads zero */
	uint64_t open_size;       /* file size at open */
	/* Space reserved ahead of the allocator (QSM_IO_PREALLOC), so data
	 * writes into new clusters do not extend the file one by one. */
	uint64_t prealloc_end;
	bool prealloc_busy;
	/* VM-state reads of the backing image past the L1 table in flight
	 * (sm/vmstate.c): requests of the backing image, not of this one, so
	 * not in in_flight; the close waits for them too (close_drained). */
	unsigned vm_backing_reads;
	struct qsm_io_req prealloc_io;
	bool header_dirty;
	/* Lazy refcounts (compatible bit 0, v3, read-write): refcount blocks
	 * are written by a clean close and by a batch that carries new
	 * metadata (an L1 entry: a new L2 table; a new refcount block), as
	 * QEMU keeps metadata refcounts eager; before any L2/L1 write that may
	 * point at clusters whose refcounts are not on disk, the dirty bit
	 * (incompatible bit 0) is made durable.  disk_dirty: it is on disk. */
	bool lazy;
	bool disk_dirty;
	/* An operation holds the dirty bit on disk for its duration
	 * (sm/snapops.c): a full write-back does not clear it meanwhile. */
	bool dirty_hold;
	/* Refcount table location the on-disk header names (a lazy image
	 * defers a moved table, so the header keeps naming the old one). */
	uint64_t disk_reftable_offset;
	uint32_t disk_reftable_clusters;

	/* Scheduling. */
	struct qsm_alloc *allocs;         /* in-flight cluster allocations */
	struct qsm_l2alloc *l2allocs;     /* L1 slots whose L2 table is being allocated */
	struct qsm_req *wb_job;           /* the running write-back batch, or NULL */
	struct qsm_wait *wb_next_waiters; /* want the next batch */
	bool wb_wanted;                   /* a batch is needed for cache slots */
	bool wb_full;                     /* the next batch is a full one (close,
	                                   * qsm_sync_writeback): refcounts too */
	bool wb_closed;                   /* a close wrote everything back: no
	                                   * batch starts any more */
	/* qsm_close_async was called: the submit functions refuse new
	 * requests (-ESHUTDOWN).  close_req: the close request (machine
	 * CLOSE) until it is DONE. */
	bool closing;
	struct qsm_req *close_req;
	struct event *close_ev;           /* runs the close's last step: free, call back */
	qsm_cb close_cb;
	void *close_opaque;
	int close_ret;
	/* Group commit: writethrough writes accepted but not yet waiting for
	 * durability.  A batch waits (at most wb_ev's timeout) until they have
	 * all joined, so one fdatasync sequence covers every write in flight. */
	uint64_t wt_pending;
	struct event *wb_ev;
	bool wb_recheck;          /* wb_ev fired for a re-check, not a timeout */
	uint64_t *pending_frees;          /* see qsm_free_cluster_deferred */
	size_t nb_pending_frees, cap_pending_frees;
	/* Clusters whose release (their tables durable already) waits for
	 * guest I/O still in flight on them: released as it completes. */
	uint64_t *held_frees;
	size_t nb_held_frees, cap_held_frees;
	uint64_t io_busy;                 /* requests with io_busy set */

	/* The run queue (posted events), drained by run_ev or inline from I/O
	 * completions. */
	struct qsm_req *q_head, **q_tail;
	struct event *run_ev;
	bool draining;

	struct qsm_req *all;      /* live requests */
	uint64_t next_id;
	uint64_t in_flight;
	/* A snapshot operation (sm/snapops.c): its request (machine SNAPSHOT)
	 * from submit to DONE, at most one; the requests it holds back (HELD),
	 * released when it is over; the started guest requests (active) and
	 * among them those a create or delete waits for (writers), and the
	 * writes running in place beside it (late_writes: begun while it
	 * runs, not held). */
	struct qsm_req *snap_req;
	struct qsm_wait *held;
	uint64_t nb_held;
	uint64_t active, writers, late_writes;

	uint8_t *zero_buf;        /* cluster_size zeros, shared */

	/* Worker pool for CPU work (started on first use, qsm_image_work). */
	struct qsm_work_pool *work;
	int work_threads;         /* qsm_open_opts.work_threads */

	qsm_trace_fn trace;
	void *trace_opaque;
	struct qsm_stats stats;
};

/* L1 slot whose L2 table is being allocated by `owner` (FROZEN waits here). */
struct qsm_l2alloc {
	struct qsm_l2alloc *next;
	uint64_t l1_index;
	struct qsm_req *owner;
	struct qsm_wait *waiters;
};

/* --- sm/dispatch.c (the steps share more through sm/steps.h) ------------- */
/* Deliver ev to req through the run queue (never runs steps inline unless
 * the caller is the loop itself, see qsm_sm_drain). */
void qsm_sm_post(struct qsm_req *req, enum qsm_event ev, int ret);
/* Run queued events now.  Only from a libevent callback's top level. */
void qsm_sm_drain(struct qsm_image *img);
/* New request (zeroed, linked, with iov_cap scratch iovecs); NULL on ENOMEM. */
struct qsm_req *qsm_req_new(struct qsm_image *img, enum qsm_machine m, int iov_cap);
void qsm_sm_start(struct qsm_req *req);
/* qsm_sm_start past the snapshot hold: also how a HELD request leaves. */
void qsm_sm_begin(struct qsm_req *req);
/* Wake every waiter of a list with WAKE (or `ev`). */
void qsm_wake_all(struct qsm_wait **list, enum qsm_event ev, int ret);
/* Print every live request and its state (for gdb and failing tests). */
void qsm_image_dump(struct qsm_image *img, FILE *f);
/* (sm/data.c) Is a data I/O in flight on this host cluster (a read or write
 * that found it through an L2 entry, which may have changed since)? */
bool qsm_host_io_busy(const struct qsm_image *img, uint64_t cluster);

/* --- sm/writeback.c ------------------------------------------------------ */
/* req wants the next write-back batch to complete it (event WB_DONE).  Starts
 * a batch when none runs. */
void qsm_wb_join(struct qsm_image *img, struct qsm_req *req);
/* A FUA request's run lets its L2 table go (release_l2): note the table
 * for a targeted batch. */
void qsm_wb_note_fua(struct qsm_req *req);
/* img->l1 is what the disk holds (read at open, or a moved table made
 * durable): keep a copy for targeted batches. */
void qsm_wb_l1_loaded(struct qsm_image *img);
/* A batch is wanted (cache pressure); start one when none runs. */
void qsm_wb_kick(struct qsm_image *img);
/* Start the next batch if one is wanted and group commit says it is time;
 * otherwise arm the group-commit timer. */
void qsm_wb_maybe_start(struct qsm_image *img, bool now);
/* wb_ev's callback. */
void qsm_wb_timer_cb(evutil_socket_t fd, short what, void *arg);
/* Step functions of the WRITEBACK machine. */
enum qsm_event qsm_wb_step(struct qsm_req *req, enum qsm_event ev, int ret);
/* --- sm/sync.c ------------------------------------------------------------ */
/* Blocking (tools, resize, create; never from a callback): one full
 * write-back batch (QSM_REQ_FULL_WRITEBACK), running the loop until it
 * completed.  0 or -errno. */
int qsm_sync_writeback(struct qsm_image *img);

/* Drop a cluster's refcount once the tables no longer pointing at it are durable. */
/* The waiter a request passes to refcount calls (metadata/refcount.h,
 * "Waiting"), ready for use. */
struct qsm_rc_waiter *qsm_req_rcw(struct qsm_req *req);
/* A refcount call with qsm_req_rcw(req) returned -EAGAIN: the step leaves
 * with the returned event (REFBLOCK_MISS, to REFBLOCK_LOAD), and `resume`
 * is posted once the block is read (ERROR if the read failed). */
enum qsm_event qsm_rc_wait(struct qsm_req *req, enum qsm_event resume);
int qsm_free_cluster_deferred(struct qsm_image *img, uint64_t host_offset);
/* FREE_WAIT entries one request may make (qsm_step_cluster_alloc,
 * qsm_step_l2_alloc): frees that keep coming cannot starve it. */
#define QSM_FREE_WAITS_MAX 4
void qsm_wb_join_next(struct qsm_image *img, struct qsm_req *req);
/* qsm_abandon: free the requests asleep on a batch (qsm_req_forget). */
void qsm_wb_forget_waiters(struct qsm_image *img);
void qsm_req_forget(struct qsm_req *req);
bool qsm_wb_free_pending_below(struct qsm_image *img, uint64_t below);
/* A data I/O completed: release the held frees no I/O is in flight on any more. */
void qsm_wb_release_held(struct qsm_image *img);

/* Internal request flag (above the public QSM_REQ_ and QSM_ZERO_ bits): a
 * FLUSH that asks for a full write-back batch (refcounts included even with
 * lazy refcounts, rounds until nothing is dirty, the dirty bit cleared), and
 * is not ignored in cache=unsafe.  See qsm_sync_writeback. */
#define QSM_REQ_FULL_WRITEBACK 0x100
/* Internal request flag: a copy-on-read fill (qsm_cor_fill), a WRITE or
 * ZEROES that writes only the clusters that are still unallocated in the
 * image when it looks them up (QEMU's BDRV_REQ_WRITE_UNCHANGED under its
 * request serialisation): a guest write that got there first is never
 * overwritten with the older data the read copied.  Not durable by itself
 * in writethrough (the data is the backing file's). */
#define QSM_REQ_COR_FILL 0x200
/* Internal request flag: a READ or WRITE of the VM-state area
 * (sm/vmstate.c, qsm_vmstate_submit): its range lies past the virtual size
 * and inside the L1 table, and a read never copies on read (QEMU's
 * load_vmstate goes to the driver, under the copy-on-read filter). */
#define QSM_REQ_VMSTATE 0x400
/* Submit a copy-on-read fill of [offset, +len) on img: the data in iov, or
 * zeros (zero: a ZEROES request, iov unused).  0 or -errno (cb not called). */
int qsm_cor_fill(struct qsm_image *img, uint64_t offset, const struct iovec *iov, int iovcnt,
		 uint64_t len, bool zero, qsm_cb cb, void *opaque);

/* --- sm/sync.c ----------------------------------------------------------- */
/* The blocking calls: submit with qsm_sync_cb and &w, then qsm_sync_run
 * runs the image's loop until the callback has run (not from inside a
 * callback of that loop).  `submitted`: the submit's return (< 0: it). */
struct qsm_sync_wait {
	bool done;
	int ret;
};
void qsm_sync_cb(void *opaque, int ret);
int qsm_sync_run(struct qsm_image *img, int submitted, struct qsm_sync_wait *w);

/* --- sm/snapops.c -------------------------------------------------------- */
/* Step functions of the SNAPSHOT machine. */
enum qsm_event qsm_snap_step(struct qsm_req *req);
/* Does a snapshot operation hold req (in START) back?  Then it goes to HELD. */
bool qsm_snap_holds(const struct qsm_image *img, const struct qsm_req *req);
/* A request left the image or stopped counting: wake the operation waiting
 * in SNAP_DRAIN when what it waits for is over. */
void qsm_snap_wake(struct qsm_image *img);
/* Is req one a create or delete waits for (counted in img->writers)? */
bool qsm_snap_writer(const struct qsm_image *img, const struct qsm_req *req);
/* Is req, a writer starting now, a late one (sm/sm.h, struct qsm_req)?
 * True while a create or delete runs: it writes in place beside it. */
bool qsm_snap_admits(const struct qsm_image *img, const struct qsm_req *req);
/* A late write's run would change an L2 entry (allocate, copy on write,
 * a new or shared L2 table): its table let go, it stops being late and
 * goes to HELD (returns HOLD), to look the run up again once the
 * operation is over. */
enum qsm_event qsm_snap_defer(struct qsm_req *req);
/* Start a held request (the operation is over): one held from START
 * begins (qsm_sm_begin); one deferred part way (qsm_snap_defer) counts as
 * a writer again and looks its run up again (HELD's BEGIN edge). */
void qsm_snap_resume(struct qsm_req *req);
/* qsm_abandon: the held requests go with the "process" (memory only, no
 * callbacks), as qsm_req_forget; and a forgotten SNAPSHOT request's job. */
void qsm_snap_forget(struct qsm_image *img);
void qsm_snap_job_free(struct qsm_req *req);
/* Grow the active L1 table to `entries` (more than it has), as an
 * operation of the SNAPSHOT machine that holds every request submitted
 * after it until the table has moved (the VM-state area, sm/vmstate.c):
 * 0 (started, or one at least as large is under way), -EBUSY while another
 * snapshot operation runs, -ENOMEM, or op_check's refusals (read-only,
 * closing, in error).  A failure once the move began leaves the image in
 * the sticky -EIO state; the held writes then fail. */
int qsm_snap_grow_l1(struct qsm_image *img, uint64_t entries);
/* Is what the running operation waits for over (img->snap_req set)? */
bool qsm_snap_drained(const struct qsm_image *img);
/* May the write-back put L2 and L1 writes in the refcount block level (one
 * sync for all three)?  True while an operation that holds every writer
 * runs past its drain batch on an image whose dirty bit is durable: the
 * only metadata changing is the operation's own (refcounts, COPIED flags,
 * no new references), and any mix of it that a crash leaves is one the
 * repair on open puts right (sm/snapops.c, "Crash safety"). */
bool qsm_snap_flat(const struct qsm_image *img);

/* --- sm/image.c ---------------------------------------------------------- */
/* Step functions of the CLOSE machine. */
enum qsm_event qsm_close_step(struct qsm_req *req);
/* A request left the image: wake the close waiting in CLOSE_DRAIN when
 * nothing else is in flight any more. */
void qsm_close_wake(struct qsm_image *img);
/* Does the image name a backing file (opened or not)?  Unallocated clusters
 * then belong to the backing chain: they are not zeros. */
static inline bool qsm_has_backing(const struct qsm_image *img)
{
	return img->hdr.backing_file[0] != '\0';
}
/* Record a corruption found by a request (or the write-back): the first
 * message is kept, the image enters the corrupt state (img->corrupt, sticky
 * -EIO), dirty metadata is never written, and the corrupt bit alone is
 * written to the header (read-write images).  Returns -EIO, for the request
 * that hit it. */
int qsm_image_corrupt(struct qsm_image *img, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* Start writing the corrupt bit if it is pending and no write-back batch
 * runs (called again when the batch ends).  Asynchronous, best effort. */
void qsm_image_corrupt_mark(struct qsm_image *img);
/* The error of a metadata/refcount.c call: -EUCLEAN (it needed the block of
 * an unaligned or damaged refcount table entry) marks the image corrupt with
 * QEMU's reason and becomes -EIO; any other value is returned as it is. */
int qsm_image_rc_error(struct qsm_image *img, int ret);
/* What metadata the cluster at host_offset holds, in QEMU's overlap-check
 * names ("active L1 table", ...), or NULL (metadata/overlap.h). */
const char *qsm_metadata_kind(struct qsm_image *img, uint64_t host_offset);
/* The 8 bytes of incompatible_features (header offset 72) the disk must
 * hold once marked: the disk's dirty bit, the corrupt bit set. */
void qsm_image_corrupt_bits(const struct qsm_image *img, uint8_t be[8]);
void qsm_l1_set(struct qsm_image *img, uint64_t idx, uint64_t entry);
/* An L1 table of `entries` entries at `offset` (blocking) into a new
 * buffer of max(entries, room) entries rounded up to whole clusters,
 * zeros after the table, 4096-aligned: the form img->l1 has (write-back
 * writes whole sectors of it).  *out is the caller's; 0 or -errno. */
int qsm_l1_read(struct qsm_image *img, uint64_t offset, uint64_t entries, uint64_t room,
		uint8_t **out);
static inline uint64_t qsm_l1_get(const struct qsm_image *img, uint64_t idx)
{
	return qcow2_be64(img->l1 + idx * 8);
}

/* Blocking reader of the file at open (metadata/snapshot.h's and
 * bitmap.h's reader): opaque is a struct qsm_file_src; zeros past fsize,
 * as QEMU's block layer reads (header.c lets the snapshot table lie there). */
struct qsm_file_src {
	struct qsm_io *io;
	uint64_t fsize;
};
int qsm_file_rd(void *opaque, void *buf, size_t len, uint64_t off);
/* The header serialized from img->hdr, written in place and flushed
 * (blocking: open, and the blocking bitmap edits).  0 or -errno. */
int qsm_header_write_sync(struct qsm_image *img);

/* sm/bitmaps.c.  Load and re-home img->tracked (blocking, at a read-write
 * open once the image is set up, before it is live); those that fail are
 * dropped from it and stay in use. */
void qsm_bitmaps_load(struct qsm_image *img);
/* A guest change of [offset, +bytes), at submission: the tracked bitmaps'
 * bits set. */
void qsm_bitmaps_dirty(struct qsm_image *img, uint64_t offset, uint64_t bytes);
/* The close's store, step by step (CLOSE_BITMAPS): the operation of step
 * `step` (0, 1, ...) into *op, *offset, *buf, *len; false when done. */
bool qsm_bitmaps_store_next(struct qsm_image *img, uint64_t step, enum qsm_io_op *op,
			    uint64_t *offset, void **buf, size_t *len);
void qsm_bitmaps_release(struct qsm_image *img);

/* Can every persistent bitmap stay as it is on a disk of size bytes?  0
 * when the size is the disk's or each table has the entries that size
 * needs (no bitmap in use but those this session records into: else QEMU's
 * -EBUSY); else -ENOTSUP naming the first whose table would have to change
 * (qsm resizes bitmaps in a truncate only): snapshot apply asks. */
int qsm_bitmaps_cover(struct qsm_image *img, uint64_t size, char *err, size_t errlen);
/* A truncate: change(img, size, err, errlen) changes the disk's size, and
 * the bitmaps go with it (blocking; nothing in flight): refused first for a
 * bitmap in use that this session does not record into (QEMU's words,
 * -EBUSY) or one that cannot cover size (-EFBIG); then each bitmap's
 * table, for the size the disk has after change, exactly, its bits cut or
 * extended with zeros, durable before this returns, a crash in between
 * leaving them in use (sm/bitmaps.c, "Resizing").  change's result, or
 * the bitmaps' error. */
typedef int (*qsm_resize_fn)(struct qsm_image *img, uint64_t size, char *err, size_t errlen);
int qsm_bitmaps_resize(struct qsm_image *img, uint64_t size, qsm_resize_fn change, char *err,
		       size_t errlen);

/* Grow the L1 table to new_l1 (> l1_size) entries, the virtual size set
 * to `size` in the same header write (resize, VM state): a full write-back,
 * the new table written and its refcounts durable, the header naming it
 * durable, the old table released (metadata/l1.h's order).  Blocking: runs
 * the loop, so nothing may be in flight and the caller is not inside a
 * callback of it.  0 or -errno (err says why; a failure after the new table
 * was allocated leaves the image in the sticky -EIO state). */
int qsm_l1_grow_sync(struct qsm_image *img, uint64_t new_l1, uint64_t size, char *err,
		     size_t errlen);
/* Submit a READ or WRITE machine request (QSM_REQ_VMSTATE) of
 * [offset, +bytes) into the first `bytes` of iov, or a DISCARD of it (iov
 * unused), at a VM-state address: sm/vmstate.c checked it against the L1
 * table, not the virtual size.  Refuses as qsm_readv/qsm_writev/
 * qsm_discard do otherwise (closing; a WRITE or DISCARD on an image not
 * writable); 0 or -errno, cb not called on error. */
int qsm_vmstate_submit(struct qsm_image *img, enum qsm_machine m, uint64_t offset,
		       const struct iovec *iov, int iovcnt, uint64_t bytes, qsm_cb cb,
		       void *opaque);
/* Discard [pos, +bytes) of the VM-state area, bytes rounded up to whole
 * clusters (the area starts on one): QEMU's qcow2_snapshot_create drops
 * the active copy of the VM state a new snapshot took that way
 * (qcow2_cluster_discard of ROUND_UP(vm_state_size, cluster_size),
 * QCOW2_DISCARD_NEVER, not a full discard: the DISCARD machine's
 * semantics, v3 over a backing file leaving zero clusters).  Clipped at
 * the end of the L1 table (nothing is mapped past it).  For
 * sm/snapops.c; asynchronous as qsm_discard: 0 or -errno (cb not called
 * then), -ENOTSUP on raw images. */
/* May writes be submitted?  -EBADF read-only, -ENOMEDIUM corrupt, -EIO
 * after a failed metadata write (sm/image.c, the submit functions'). */
int qsm_check_writable(struct qsm_image *img);
int qsm_vmstate_discard(struct qsm_image *img, uint64_t pos, uint64_t bytes, qsm_cb cb,
			void *opaque);
/* Reserve file space ahead of newly allocated clusters ending at `end`. */
void qsm_prealloc_ahead(struct qsm_image *img, uint64_t end);
/* Is this host cluster metadata (header, L1, L2 tables, refcount structures)? */
bool qsm_is_metadata(struct qsm_image *img, uint64_t host_offset);
/* Same, ignoring L2 tables: is this cluster fit to be an L2 table? */
bool qsm_is_metadata_not_l2(struct qsm_image *img, uint64_t host_offset);
void qsm_note_l2_table(struct qsm_image *img, uint64_t host_offset);
/* The metadata map (overlap checks) rebuilt from the image as it is: the
 * active L1 table and its L2 tables, the snapshot table.  After an
 * operation replaced tables wholesale (sm/snapops.c).  0 or -ENOMEM. */
int qsm_image_meta_rebuild(struct qsm_image *img);
/* The image's worker pool, started on first use.  0 or -errno. */
int qsm_image_work(struct qsm_image *img, struct qsm_work_pool **out);

/* --- mutants (sm/mutant.c) ------------------------------------------------ */
/* X(id, name, the rule it removes).  The first entry is "no mutant". */
#define QSM_MUTANTS_LIST(X)                                                          \
	X(NONE, "none", "")                                                          \
	X(REFBLOCK_AFTER_L2, "refblock-after-l2",                                    \
	  "refcount blocks are durable before the L2 entries that use their clusters")  \
	X(L2_BEFORE_DATA, "l2-before-data",                                          \
	  "an L2 entry points at a new cluster only after its data and COW are written") \
	X(DIRTY_NOT_DURABLE, "dirty-not-durable",                                    \
	  "lazy refcounts: the dirty bit is durable before tables run ahead of refcounts") \
	X(NO_FREEZE, "no-freeze",                                                    \
	  "writes under an L1 slot whose L2 table is being created wait for it")       \
	X(DOUBLE_ALLOC, "double-alloc",                                              \
	  "two writes never allocate the same guest cluster at once")                 \
	X(EARLY_ACK, "early-ack",                                                    \
	  "group commit acknowledges a request only after the sync that makes it durable") \
	X(HOLD_L2_WAITING, "hold-l2-waiting",                                        \
	  "a request waiting for another's allocation holds no L2 table (the cache cannot deadlock)") \
	X(SNAP_COPIED_KEPT, "snap-copied-kept",                                      \
	  "a snapshot create clears COPIED where the refcount becomes 2 (shared clusters are copied on write)") \
	X(SNAP_EARLY_FREE, "snap-early-free",                                        \
	  "a snapshot delete drops the snapshot's references only after the table without it is durable")

#ifdef QSM_MUTANTS
enum qsm_mutant {
#define X(id, name, rule) QSM_MUT_##id,
	QSM_MUTANTS_LIST(X)
#undef X
};
extern enum qsm_mutant qsm_mutant_active;
#define QSM_MUTANT(id) (qsm_mutant_active == QSM_MUT_##id)
#else
#define QSM_MUTANT(id) 0
#endif

/* The size of qsm_open_opts and qsm_create_opts in release 0.1.0, the first
 * with struct_size, which a struct_size of 0 stands for (qsm.h "ABI").  0.1.0
 * is not released yet, so these are today's sizes; once it is, freeze each
 * at the offset of the first field appended after it. */
#define QSM_OPEN_OPTS_SIZE_0 sizeof(struct qsm_open_opts)
#define QSM_CREATE_OPTS_SIZE_0 sizeof(struct qsm_create_opts)

#endif
