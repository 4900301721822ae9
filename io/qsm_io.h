/*
 * qsm_io.h: the block I/O interface under the qcow2 engine, public part
 * (installed as <qsm/qsm_io.h>): what a storage backend written outside
 * the qsm tree (librbd, a hypervisor's own storage stack, an in-memory
 * disk) implements, and what a program needs to hand such a backend, or a
 * file, to qsm_open_io() and qsm_create_io() (qsm.h).
 *
 * io/ knows nothing of qcow2.  A handle (`struct qsm_io`, opaque here) is
 * one image file, device or object; the engine submits caller-owned
 * `struct qsm_io_req` operations to it and blocks on it only where its own
 * API blocks.
 *
 * Writing a backend:
 *
 *   static const struct qsm_io_ops my_ops = {
 *           .name = "mem", .submit = my_submit, .pread_sync = ..., ...
 *   };
 *   struct qsm_io *io;
 *   qsm_io_new(base, &my_ops, 0, my_state, &io);   // my_state: qsm_io_priv(io)
 *   qsm_open_io(base, io, &opts, &img, err, sizeof err);  // img owns io now
 *
 * Completion contract (every backend keeps it; the engine's checked wrapper
 * asserts what it can):
 *  1. Every request passed to ops->submit is completed exactly once, by
 *     qsm_io_complete() on the loop thread or qsm_io_complete_threadsafe()
 *     from any thread.  Both post the completion to the handle's event loop:
 *     the engine's callback runs later, on the loop, never inside submit or
 *     inside the backend's call to them.  So a backend may complete from
 *     inside submit (a synchronous result) and from its own threads.
 *  2. ret is 0 or a negative errno (> -4096).  No short transfers: a read
 *     past the end of the file returns zeros for that part, a write that
 *     cannot be done whole fails.
 *  3. The request and its iovec array belong to the engine and stay valid
 *     until the completion is posted; after qsm_io_complete*() returns the
 *     backend must not touch them again.  A backend reads op, event, offset,
 *     len, iov and iovcnt and never writes any field.
 *  4. A FLUSH makes durable every write that completed before the flush was
 *     submitted.  Writes still in flight when it is submitted are not covered.
 *  5. Requests in flight together may complete in any order.
 *
 * Blocking (the rule that keeps a remote store from stalling the loop):
 *  - Loop calls, made on the loop thread at any time, must return at once
 *    without waiting on a network or a device: ops->submit and
 *    ops->extent.  A backend that cannot answer extent from local state
 *    leaves it NULL (everything then reads as data: correct, less sparse).
 *  - Blocking calls: ops->pread_sync, pwrite_sync, flush_sync,
 *    truncate_sync, get_size and allocated.  The engine makes them only
 *    inside its blocking entry points (qsm_open/qsm_open_io, qsm_close,
 *    qsm_truncate, qsm_create/qsm_create_io, qsm_check), with no request in
 *    flight on the handle; a remote backend may wait there.  Between the end
 *    of an open and the start of close or truncate the handle is "live" and
 *    the engine's wrapper asserts that no blocking call is made (io/io.c).
 *    Size, grow and extent are therefore never asked of a remote store on
 *    the request path: the engine remembers the size it read at open.
 *
 * Threads: ops->submit, extent, the blocking calls and close run on the
 * loop thread (the caller's).  Only qsm_io_complete_threadsafe() may be
 * called from another thread.
 */
#ifndef QSM_IO_PUBLIC_H
#define QSM_IO_PUBLIC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "qsm_version.h"

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;
struct qsm_io;

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
 * The named event an operation belongs to: what the engine is doing with
 * it (for tracing, and fault injection by the test backend; the blkdebug
 * event names of QEMU's iotest 026).  Backends may ignore it.
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

QSM_EXPORT const char *qsm_io_event_name(enum qsm_io_event ev);
QSM_EXPORT const char *qsm_io_op_name(enum qsm_io_op op);

struct qsm_io_req;
typedef void (*qsm_io_cb)(struct qsm_io_req *req, int ret);

/* One operation.  The engine embeds it in its own request (and recovers that
 * with container_of in the callback).  Fields are only ever appended. */
struct qsm_io_req {
	/* Set by the submitter; read-only for the backend. */
	enum qsm_io_op op;
	enum qsm_io_event event;
	uint64_t offset;          /* byte offset; new size for TRUNCATE */
	uint64_t len;             /* bytes; for READ/WRITE the sum of iov lengths */
	const struct iovec *iov;  /* READ/WRITE only */
	int iovcnt;
	qsm_io_cb cb;

	/* Private to the library: queue links and results.  A backend never
	 * reads or writes them. */
	struct qsm_io_req *io_next;
	int io_ret;
	uint64_t io_seq;          /* submission number, for tracing */
	uint64_t io_flushed_upto; /* sim: completion epoch, see io_sim.c */
	unsigned io_priv;         /* io.c: QSM_IO_PRIV_* */
	struct qsm_io *io_handle; /* the handle it was submitted to */
};

/* Open flags. */
#define QSM_IO_RDONLY  0x1  /* refuse writes */
#define QSM_IO_DIRECT  0x2  /* O_DIRECT where the backend has it (cache=none) */
#define QSM_IO_CREATE  0x4  /* create or truncate the file (path backends) */
/* Flushes complete at once without syncing anything (cache=unsafe, as
 * QEMU's BDRV_O_NO_FLUSH, which skips the image format's internal ordering
 * flushes too).  Set by the engine; a backend never sees such a flush. */
#define QSM_IO_NO_FLUSH 0x8

/*
 * A backend's operations.  Unset optional members are NULL; members are
 * only ever appended (qsm_io_new() is told the size the backend was
 * compiled with, so an older backend keeps working).
 */
struct qsm_io_ops {
	const char *name;   /* shown by qsm info / qsm_get_info as the aio */
	/* Start req (a loop call: return at once).  Complete it later, or
	 * from here, with qsm_io_complete*(). */
	void (*submit)(struct qsm_io *io, struct qsm_io_req *req);
	/* Blocking calls (see "Blocking" above): whole transfers, 0 or -errno,
	 * never short; a read past the end returns zeros there. */
	int (*pread_sync)(struct qsm_io *io, void *buf, size_t len, uint64_t off);
	int (*pwrite_sync)(struct qsm_io *io, const void *buf, size_t len, uint64_t off);
	int (*flush_sync)(struct qsm_io *io);
	int (*truncate_sync)(struct qsm_io *io, uint64_t size);
	/* Current size of the file, device or object (blocking call). */
	int (*get_size)(struct qsm_io *io, uint64_t *size);
	/* Optional, a loop call (NULL: everything is data): does the file hold
	 * data or a hole at off, and for how many bytes from off (1 to len)?
	 * Must answer without waiting (lseek SEEK_DATA/SEEK_HOLE on a local
	 * file; a cached map for a remote store). */
	int (*extent)(struct qsm_io *io, uint64_t off, uint64_t len, bool *data, uint64_t *run);
	/* Optional blocking call (NULL: -ENOTSUP): bytes of storage the file
	 * occupies (st_blocks * 512, as QEMU's bdrv_get_allocated_file_size). */
	int (*allocated)(struct qsm_io *io, uint64_t *bytes);
	/* Release the backend's state (qsm_io_new backends: not the handle,
	 * which the library frees after this returns).  No request is in
	 * flight, except when the image was abandoned (qsm_abandon, a
	 * simulated process crash): close must then finish or cancel every
	 * request it still holds, never complete one (no qsm_io_complete*()
	 * from now on), and not touch their memory once it returns. */
	void (*close)(struct qsm_io *io);
};

/* --- Handles ----------------------------------------------------------------- */

/*
 * Open a file or block device with one of the built-in backends: aio is
 * "threads", "io_uring", or NULL for the default (io_uring when the kernel
 * allows it, else threads).  flags: QSM_IO_RDONLY, QSM_IO_DIRECT,
 * QSM_IO_CREATE.  0 or -errno.
 */
QSM_EXPORT int qsm_io_open_path(struct event_base *base, const char *path, int flags,
				const char *aio, struct qsm_io **out);

/*
 * A handle on a backend of the caller's: the library allocates the handle
 * (its completion queues included) and calls `ops` with it; `priv` is the
 * backend's state, returned by qsm_io_priv().  ops must outlive the handle;
 * submit, pread_sync, pwrite_sync, flush_sync, truncate_sync, get_size and
 * close are required (-EINVAL otherwise).  flags: QSM_IO_RDONLY makes the
 * library refuse writes before they reach the backend.  0 or -errno
 * (nothing allocated on failure).  Use the qsm_io_new() macro, which passes
 * the size of the ops structure the caller was compiled with.
 */
QSM_EXPORT int qsm_io_new_sized(struct event_base *base, const struct qsm_io_ops *ops,
				size_t ops_size, int flags, void *priv, struct qsm_io **out);
#define qsm_io_new(base, ops, flags, priv, out)                                \
	qsm_io_new_sized((base), (ops), sizeof(*(ops)), (flags), (priv), (out))

/* The priv given to qsm_io_new (NULL for built-in backends). */
QSM_EXPORT void *qsm_io_priv(const struct qsm_io *io);
/* The event loop the handle completes on. */
QSM_EXPORT struct event_base *qsm_io_base(const struct qsm_io *io);
/* The handle's QSM_IO_* flags. */
QSM_EXPORT int qsm_io_flags(const struct qsm_io *io);
/* Tell the engine to give data buffers this alignment (a power of two;
 * default 4096).  Call before opening an image on the handle. */
QSM_EXPORT int qsm_io_set_mem_align(struct qsm_io *io, unsigned align);

/* Release a handle nobody owns (an image owns the handle it was opened on
 * and closes it itself).  No request may be in flight. */
QSM_EXPORT void qsm_io_close(struct qsm_io *io);

/* --- Completing requests (contract 1) --------------------------------------- */

/* Loop thread only (inside submit too): post req's completion with ret. */
QSM_EXPORT void qsm_io_complete(struct qsm_io_req *req, int ret);
/* Any thread (the backend's own completion threads, librbd callbacks):
 * queue req's completion under a lock and wake the loop, which runs it.
 * Safe while the loop runs; the handle stays valid because it cannot be
 * closed with requests in flight. */
QSM_EXPORT void qsm_io_complete_threadsafe(struct qsm_io_req *req, int ret);

#ifdef __cplusplus
}
#endif

#endif
