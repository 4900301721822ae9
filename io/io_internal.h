/*
 * io/io_internal.h: what io/ backends share and nothing above io/ may use.
 *
 * Every backend in io/ builds its private structure on `struct qsm_io_common`
 * (embedded first, itself starting with the public `struct qsm_io`), so that
 * io.c can defer a completion for any handle:
 *
 *   struct qsm_io_threads { struct qsm_io_common c; ... };
 *
 * Completion path (one exit, tools/doc/design.md "Code conventions"): every
 * request a backend accepted ends in exactly one call to qsm_io_complete_(),
 * from a libevent callback on io->base, never from inside ops->submit.  A backend that knows
 * the result at submit time (a synchronous error, an ftruncate) hands it to
 * qsm_io_defer_complete_(), which queues it on a per-handle list drained by
 * an event_active()'d event.
 *
 * Lifetime rule for every completion loop: callbacks may close the handle
 * (once nothing is in flight) or crash a sim disk.  Loops bracket each
 * callback with qsm_io_enter_()/qsm_io_leave_(); a close requested inside is
 * carried out by the outermost qsm_io_leave_(), which then returns true and
 * the loop must return without touching the handle again (libevent's
 * "finalize after callbacks drain", tools/doc/design.md "Code conventions").
 */
#ifndef QSM_IO_INTERNAL_H
#define QSM_IO_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io/io.h"

struct event;
struct qsm_io_bounce;

struct qsm_io_common {
	struct qsm_io io;                 /* public part; must be first */
	struct event *cm_defer_ev;        /* drains cm_defer_head */
	struct qsm_io_req *cm_defer_head; /* FIFO linked through io_next */
	struct qsm_io_req **cm_defer_tail;
	size_t cm_defer_count;
	unsigned cm_depth;                /* completion loops on the stack */
	bool cm_closing;                  /* qsm_io_close() called inside one */
	/* The machine is down (qsm_io_crash_, a sim crash): every request
	 * submitted from now on is dropped at the door, whether the backend
	 * or this layer would have completed it (NO_FLUSH flushes, invalid
	 * requests); its callback never runs and in_flight does not count it,
	 * so the handle can be closed.  Only closing is left to do. */
	bool cm_down;
	/* qsm_io_abandon() ran: the requests still at the backend are
	 * forgotten (their callbacks never run) and close may find them. */
	bool cm_abandoned;
	/* Built-in backends (optional): block until the backend has finished
	 * or cancelled every request it accepted and no longer touches their
	 * memory, then forget them without completing them (their count is
	 * not kept: qsm_io_abandon zeroes in_flight).  Loop thread. */
	void (*cm_quiesce)(struct qsm_io *io);

	/* Direct I/O alignment (0: the backend takes any transfer).  See
	 * "Misaligned transfers on direct handles" in io.c. */
	unsigned cm_dio_align, cm_dio_mem_align;
	unsigned cm_dio_writes;           /* writes at the backend */
	bool cm_rmw_active;               /* a read-modify-write is running */
	struct qsm_io_req *cm_wait_head;  /* writes waiting, FIFO via io_next */
	struct qsm_io_req **cm_wait_tail;
	/* Every bounce alive (started, not finished), so that an abandon can
	 * free the ones whose sub-requests will never complete. */
	struct qsm_io_bounce *cm_bounces;
};

/* Backends with O_DIRECT call this at open with their alignment. */
void qsm_io_set_dio_align_(struct qsm_io_common *c, unsigned off_align, unsigned mem_align);

/* Initialise the common part (zeroes the public part first).  0 or -errno. */
int qsm_io_common_init_(struct qsm_io_common *c, const struct qsm_io_ops *ops,
			struct event_base *base, int flags);
/* Release the common part.  The deferred list must be empty. */
void qsm_io_common_fini_(struct qsm_io_common *c);

/* Account, trace and call req->cb(req, ret).  Loop thread only; never from
 * ops->submit.  ret is 0 or -errno. */
void qsm_io_complete_(struct qsm_io *io, struct qsm_io_req *req, int ret);
/* Complete req with ret on a later turn of the loop (safe from submit). */
void qsm_io_defer_complete_(struct qsm_io *io, struct qsm_io_req *req, int ret);
/* Bracket a callback in a completion loop; see the lifetime rule above.
 * qsm_io_leave_() returns true when the handle is closing or closed. */
void qsm_io_enter_(struct qsm_io *io);
bool qsm_io_leave_(struct qsm_io *io);
/* The machine crashed (sim): forget deferred completions without running
 * them and mark the handle down (cm_down).  Returns how many were dropped;
 * the caller fixes io->stats.in_flight for them and for its own pending
 * requests. */
uint64_t qsm_io_crash_(struct qsm_io *io);
/* Is the handle abandoned (qsm_io_abandon)?  Backends' close functions
 * then accept requests still on their lists and drop them. */
bool qsm_io_abandoned_(const struct qsm_io *io);

/* --- File descriptor helpers shared by the threads and io_uring backends --- */

/*
 * QSM_IO_DIRECT opens the file twice: fd without O_DIRECT and dfd with it.
 * A transfer goes to dfd when its offset, length and every iovec base and
 * length are multiples of the direct-I/O alignment, otherwise to fd.  Mixing
 * the two concurrently is NOT safe (a direct write over pages a buffered
 * write dirtied fails to invalidate them and the next fdatasync returns
 * EIO), so qsm_io_submit bounces every misaligned asynchronous transfer on a
 * direct handle (io.c); fd serves only the synchronous helpers, which run
 * with nothing in flight.  Without QSM_IO_DIRECT, dfd == -1 and everything
 * uses fd.
 */
struct qsm_io_fds {
	int fd;
	int dfd;
	unsigned dio_off_align;  /* offset and length alignment for dfd */
	unsigned dio_mem_align;  /* buffer alignment for dfd */
};

/* A page-aligned buffer of zeros that nobody ever writes (it is not const
 * only so that it lives in .bss and can sit in a struct iovec). */
#define QSM_IO_ZERO_BUF_SIZE (1024 * 1024)
extern char qsm_io_zero_buf_[QSM_IO_ZERO_BUF_SIZE];

/* Open per the QSM_IO_* flags.  O_DIRECT refused (tmpfs) gives -EINVAL. */
int qsm_io_fds_open_(struct qsm_io_fds *f, const char *path, int flags);
void qsm_io_fds_close_(struct qsm_io_fds *f);
/* The descriptor a transfer of [off, off+len) from/to iov should use. */
int qsm_io_fds_pick_(const struct qsm_io_fds *f, uint64_t off, uint64_t len,
		     const struct iovec *iov, int iovcnt);
/* Blocking, whole transfers (contract 2): a read past EOF zero-fills, a write
 * is never short.  iovcnt may exceed IOV_MAX. */
int qsm_io_fds_rw_(const struct qsm_io_fds *f, bool write, const struct iovec *iov,
		   int iovcnt, uint64_t off, uint64_t len);
int qsm_io_fds_flush_(const struct qsm_io_fds *f);
/* ZERO_RANGE, falling back to writing zeros when the file system lacks it. */
int qsm_io_fds_zero_(const struct qsm_io_fds *f, uint64_t off, uint64_t len);
/* Punch a hole keeping the size; unsupported counts as success. */
int qsm_io_fds_discard_(const struct qsm_io_fds *f, uint64_t off, uint64_t len);
/* fallocate mode 0: allocate, extend, never change contents. */
int qsm_io_fds_prealloc_(const struct qsm_io_fds *f, uint64_t off, uint64_t len);
int qsm_io_fds_truncate_(const struct qsm_io_fds *f, uint64_t size);
int qsm_io_fds_get_size_(const struct qsm_io_fds *f, uint64_t *size);
/* fstat st_blocks * 512, for qsm_io_ops.allocated. */
int qsm_io_fds_allocated_(const struct qsm_io_fds *f, uint64_t *bytes);
/* lseek SEEK_DATA/SEEK_HOLE, for qsm_io_ops.extent. */
int qsm_io_fds_extent_(const struct qsm_io_fds *f, uint64_t off, uint64_t len, bool *data,
		       uint64_t *run);

#endif
