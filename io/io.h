/*
 * io/io.h: the asynchronous block I/O interface under the qcow2 engine,
 * private part (not installed).  The public part, what a backend written
 * outside the tree sees, is io/qsm_io.h (<qsm/qsm_io.h>): the operations,
 * the request, the ops table and the completion and blocking contracts.
 * This header adds what the engine and the in-tree backends share: the
 * handle's structure, the checked wrapper the engine calls
 * (qsm_io_submit and the synchronous helpers), and the built-in backends'
 * constructors.
 *
 * The engine side of the contracts in qsm_io.h:
 *  6. The synchronous helpers (qsm_io_pread_sync and friends, get_size,
 *     allocated) block the caller.  They exist for open, create, close,
 *     truncate and check, and must not be used while asynchronous requests
 *     are in flight or while the handle is live (qsm_io_set_live): both
 *     asserted here.
 */
#ifndef QSM_IO_H
#define QSM_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io/qsm_io.h"

/* Counters kept by qsm_io_submit for every backend. */
struct qsm_io_stats {
	uint64_t ops[QSM_IO_PREALLOC + 1];
	uint64_t bytes_read, bytes_written;
	uint64_t in_flight;
};

/* The handle: base of every in-tree backend's private structure (embedded
 * first, inside struct qsm_io_common: io_internal.h). */
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
	/* Nonzero while an image runs requests on the handle (between the end
	 * of its open and the start of its close or truncate): the blocking
	 * calls are then refused by assertion (qsm_io.h, "Blocking").  Zero in
	 * a fresh handle, so tools and tests may use the helpers freely. */
	bool live;
	void *priv;               /* qsm_io_new's priv; NULL for built-in backends */
	/* Owners besides the first (qsm_io_hold): qsm_io_close only drops one
	 * while this is nonzero. */
	unsigned extra_refs;
	/* Flushes with nothing to flush (QEMU's write_gen/flushed_gen):
	 * write_gen counts completed writing requests (successful or not);
	 * flushed_gen is write_gen as it was when the last flush that
	 * succeeded was submitted, recorded only when it ran alone
	 * (flush_alone: no other flush overlapped it).  A flush submitted
	 * with write_gen == flushed_gen and no flush in flight completes at
	 * once with 0, never reaching the backend: every write that had
	 * completed is durable already.  flushes_elided counts those. */
	uint64_t write_gen, flushed_gen, flush_gen;
	unsigned flushes_in_flight;
	bool flush_alone;
	uint64_t flushes_elided;
};

/* Take one more owner's reference (qsm_create_io lends the caller's handle
 * to an image that closes it).  Each owner ends with one qsm_io_close. */
void qsm_io_hold(struct qsm_io *io);

/* Close a handle with requests possibly in flight (qsm_abandon: a process
 * crash).  When it returns no backend touches those requests' memory any
 * more and none of their callbacks will ever run: the built-in backends
 * wait for (or cancel) what they started, a caller's backend is told to in
 * its close (qsm_io.h).  Drops one owner's reference as qsm_io_close does;
 * the handle's requests are forgotten even when another owner keeps it. */
void qsm_io_abandon(struct qsm_io *io);

/* Mark the handle live (on: the image starts serving requests) or not (off:
 * a blocking entry point begins).  Returns the previous value. */
bool qsm_io_set_live(struct qsm_io *io, bool on);

/* --- Opening backends (qsm_io_open_path: qsm_io.h) ------------------------- */

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

/* Buffer helpers honouring io->mem_align (posix_memalign, zeroed or not). */
void *qsm_io_alloc(struct qsm_io *io, size_t len);
void *qsm_io_zalloc(struct qsm_io *io, size_t len);

#endif
