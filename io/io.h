/*
 * io/io.h: the asynchronous block I/O interface under the qcow2 engine.
 *
 * io/ knows nothing of qcow2.  An image file (or a simulated disk, or later an
 * RBD image) is a `struct qsm_io`; the layers above see only this interface:
 * size, vectored read and write, flush (fdatasync), zero range, discard and
 * truncate, each submitted as a caller-owned `struct qsm_io_req`.
 *
 * Contracts (every backend keeps them; qsm_io_submit() asserts what it can):
 *  1. A request's callback runs exactly once, on the event loop given at open,
 *     and never from inside qsm_io_submit() (no re-entrant completion).
 *  2. ret is 0 or a negative errno.  There are no short reads or writes: a
 *     read past the end of the file returns zeros for the part past the end,
 *     a write that cannot be completed whole fails.
 *  3. The request structure is owned by the caller and must stay valid and
 *     untouched from submit until its callback runs.  The iovec array is
 *     read by the backend until completion too.
 *  4. A FLUSH makes durable every write that completed before the flush was
 *     submitted (the dm-log-writes rule).  Writes still in flight when the
 *     flush is submitted are not covered.
 *  5. Requests in flight together complete in any order.
 *  6. The synchronous helpers (qsm_io_pread_sync and friends) block the
 *     caller.  They exist for open, create, close and check, and must not be
 *     used while asynchronous requests are in flight.
 */
#ifndef QSM_IO_H
#define QSM_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct event_base;

enum qsm_io_op {
	QSM_IO_READ,
	QSM_IO_WRITE,
	QSM_IO_FLUSH,    /* fdatasync */
	QSM_IO_ZERO,     /* offset, len: make the range read as zeros (may allocate) */
	QSM_IO_DISCARD,  /* offset, len: advisory; contents afterwards unspecified */
	QSM_IO_TRUNCATE, /* offset: new file size */
	QSM_IO_PREALLOC, /* offset, len: reserve space, extending the file; never
			  * changes contents (safe beside concurrent writes);
			  * advisory: succeeds where the file system cannot */
};

/*
 * The named event an operation belongs to.  Used for tracing and, by the sim
 * backend, for fault injection (the blkdebug event names of QEMU's iotest 026).
 */
#define QSM_IO_EVENTS(X)                                                       \
	X(NONE, "none")                                                        \
	X(L1_UPDATE, "l1_update")                                              \
	X(L2_LOAD, "l2_load")                                                  \
	X(L2_UPDATE, "l2_update")                                              \
	X(L2_ALLOC, "l2_alloc")                                                \
	X(REFBLOCK_LOAD, "refblock_load")                                      \
	X(REFBLOCK_UPDATE, "refblock_update")                                  \
	X(REFBLOCK_ALLOC, "refblock_alloc")                                    \
	X(REFTABLE_UPDATE, "reftable_update")                                  \
	X(CLUSTER_ALLOC, "cluster_alloc")                                      \
	X(COW_READ, "cow_read")                                                \
	X(COW_WRITE, "cow_write")                                              \
	X(DATA_READ, "data_read")                                              \
	X(DATA_WRITE, "data_write")                                            \
	X(COMPRESSED_WRITE, "compressed_write")                                \
	X(FLUSH, "flush")                                                      \
	X(HEADER_UPDATE, "header_update")

enum qsm_io_event {
#define X(name, str) QSM_IO_EV_##name,
	QSM_IO_EVENTS(X)
#undef X
	QSM_IO_EV__COUNT
};

const char *qsm_io_event_name(enum qsm_io_event ev);
const char *qsm_io_op_name(enum qsm_io_op op);

struct qsm_io_req;
typedef void (*qsm_io_cb)(struct qsm_io_req *req, int ret);

/* One operation.  Embed it in the owner's request and recover the owner with
 * container_of in the callback. */
struct qsm_io_req {
	/* Set by the caller before qsm_io_submit(). */
	enum qsm_io_op op;
	enum qsm_io_event event;
	uint64_t offset;          /* byte offset; new size for TRUNCATE */
	uint64_t len;             /* bytes; for READ/WRITE the sum of iov lengths */
	const struct iovec *iov;  /* READ/WRITE only */
	int iovcnt;
	qsm_io_cb cb;

	/* Private to io/: queue links and results. */
	struct qsm_io_req *io_next;
	int io_ret;
	uint64_t io_seq;          /* submission number, for tracing */
	uint64_t io_flushed_upto; /* sim: completion epoch, see io_sim.c */
	unsigned io_priv;         /* io.c: QSM_IO_PRIV_* */
};

/* Open flags. */
#define QSM_IO_RDONLY  0x1  /* refuse writes */
#define QSM_IO_DIRECT  0x2  /* O_DIRECT where the backend has it (cache=none) */
#define QSM_IO_CREATE  0x4  /* create or truncate the file (path backends) */
/* Flushes complete at once without syncing anything (cache=unsafe, as
 * QEMU's BDRV_O_NO_FLUSH, which skips the image format's internal ordering
 * flushes too).  May be set in io->flags after opening. */
#define QSM_IO_NO_FLUSH 0x8

/* Counters kept by qsm_io_submit for every backend. */
struct qsm_io_stats {
	uint64_t ops[QSM_IO_PREALLOC + 1];
	uint64_t bytes_read, bytes_written;
	uint64_t in_flight;
};

struct qsm_io;

struct qsm_io_ops {
	const char *name;
	/* Start req.  Must not call req->cb before returning. */
	void (*submit)(struct qsm_io *io, struct qsm_io_req *req);
	/* Blocking helpers, see contract 6.  0 or -errno, never short. */
	int (*pread_sync)(struct qsm_io *io, void *buf, size_t len, uint64_t off);
	int (*pwrite_sync)(struct qsm_io *io, const void *buf, size_t len, uint64_t off);
	int (*flush_sync)(struct qsm_io *io);
	int (*truncate_sync)(struct qsm_io *io, uint64_t size);
	/* Current size of the underlying file or device. */
	int (*get_size)(struct qsm_io *io, uint64_t *size);
	/* Optional (NULL: everything is data): does the file hold data or a
	 * hole at off, and for how many bytes from off (at most len)?  Cheap
	 * and synchronous (lseek SEEK_DATA/SEEK_HOLE), callable any time. */
	int (*extent)(struct qsm_io *io, uint64_t off, uint64_t len, bool *data, uint64_t *run);
	/* Optional (NULL: -ENOTSUP): bytes of storage the file occupies
	 * (st_blocks * 512, as QEMU's bdrv_get_allocated_file_size). */
	int (*allocated)(struct qsm_io *io, uint64_t *bytes);
	/* Release the backend.  No request may be in flight. */
	void (*close)(struct qsm_io *io);
};

/* Base of every backend's private structure (embedded first). */
struct qsm_io {
	const struct qsm_io_ops *ops;
	struct event_base *base;
	int flags;                /* QSM_IO_* open flags */
	unsigned mem_align;       /* alignment callers should give data buffers */
	struct qsm_io_stats stats;
	uint64_t next_seq;
	/* Optional trace hook: called at submit (ret unused) and completion. */
	void (*trace)(void *opaque, const struct qsm_io_req *req, bool done, int ret);
	void *trace_opaque;
	/* The named event of the synchronous read in progress (set by
	 * qsm_io_pread_sync_ev for its duration, else NONE): what fault
	 * injection matches for blocking reads, as req->event for the rest. */
	enum qsm_io_event sync_event;
};

/* --- Opening backends ---------------------------------------------------- */

/* aio names accepted by qsm_io_open_path: "threads", "io_uring", or NULL for
 * the default (io_uring when the kernel allows it, else threads). */
int qsm_io_open_path(struct event_base *base, const char *path, int flags,
		     const char *aio, struct qsm_io **out);
int qsm_io_open_threads(struct event_base *base, const char *path, int flags,
			struct qsm_io **out);
int qsm_io_open_uring(struct event_base *base, const char *path, int flags,
		      struct qsm_io **out);
/* True when this build has the io_uring backend and the kernel allows it. */
bool qsm_io_uring_available(void);

/* --- Using any backend ---------------------------------------------------- */

/* Checked, traced wrapper around ops->submit.  Asserts the request is well
 * formed; an invalid request still completes (with -EINVAL) through the loop. */
void qsm_io_submit(struct qsm_io *io, struct qsm_io_req *req);

int qsm_io_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off);
/* Same, tagged with a named event (refcount blocks read at open:
 * QSM_IO_EV_REFBLOCK_LOAD) so that fault injection can fail it. */
int qsm_io_pread_sync_ev(struct qsm_io *io, void *buf, size_t len, uint64_t off,
			 enum qsm_io_event ev);
int qsm_io_pwrite_sync(struct qsm_io *io, const void *buf, size_t len, uint64_t off);
int qsm_io_flush_sync(struct qsm_io *io);
int qsm_io_truncate_sync(struct qsm_io *io, uint64_t size);
int qsm_io_get_size(struct qsm_io *io, uint64_t *size);
/* Data or hole at off, for *run bytes (1 <= *run <= len); backends that
 * cannot tell say data for all of it.  Used for raw images' block status. */
int qsm_io_extent(struct qsm_io *io, uint64_t off, uint64_t len, bool *data, uint64_t *run);
/* Storage the file occupies, in bytes; -ENOTSUP when the backend cannot tell. */
int qsm_io_allocated(struct qsm_io *io, uint64_t *bytes);
void qsm_io_close(struct qsm_io *io);

/* Buffer helpers honouring io->mem_align (posix_memalign, zeroed or not). */
void *qsm_io_alloc(struct qsm_io *io, size_t len);
void *qsm_io_zalloc(struct qsm_io *io, size_t len);

#endif
