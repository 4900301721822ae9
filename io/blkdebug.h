/*
 * io/blkdebug.h: QEMU's blkdebug on any io/ handle: error injection and
 * request breakpoints at the named events qsm tags its I/O with.
 *
 * A blkdebug handle wraps another handle (a file, the simulated disk) and
 * forwards every operation to it, except where a rule says otherwise.  The
 * rules are QEMU's (block/blkdebug.c, docs/devel/blkdebug.rst):
 *  - events: an operation tagged with qsm event E (req->event, or the event
 *    of a blocking read) raises the QEMU event(s) mapped onto E just before
 *    the operation starts (qsm_blkdebug_event_parse lists the mapping);
 *  - state: a number, 1 at open.  A rule with state N != 0 applies only
 *    while the state is N;
 *  - [set-state] event, state, new_state: the event moves the state to
 *    new_state (all rules of one event see the state before it);
 *  - [inject-error] event, errno (EIO), sector (-1: any), once (off),
 *    immediately (off), state: the event arms the rule; from then on the
 *    first armed rule covering an operation (sector inside its range, or
 *    -1; flushes only match -1 rules) fails it with -errno without doing
 *    it.  An event that arms rules disarms the ones it finds armed first
 *    (QEMU's active list); once=on removes the rule the first time it
 *    fires.  immediately=off delivers the error one loop turn later,
 *    immediately=on at once; neither does the I/O (as QEMU);
 *  - breakpoints (qemu-io's `break EVENT TAG`): the next operation raising
 *    EVENT is held before it reaches the wrapped handle (the request stays
 *    in its I/O wait state) until resumed; the breakpoint is removed when
 *    it fires.
 *
 *  - inject-error's iotype (read, write, write-zeroes, discard, flush,
 *    block-status; default all but block-status) limits a rule to one
 *    kind of operation;
 *  - the node's limits (align, max-transfer, opt-write-zero,
 *    max-write-zero, opt-discard, max-discard): an operation reaches the
 *    wrapped handle as QEMU's block layer hands it to blkdebug, padded to
 *    align (writes by read-modify-write), split at max-transfer, zero
 *    writes and discards cut at their alignments and maxima (a zero-write
 *    piece below its alignment written as zeros, a discard piece below
 *    align dropped), every piece checked by the rules on its own; writes
 *    raise the node's events pwritev, pwritev_zero, pwritev_done and,
 *    when padded, pwritev_rmw_head/after_head/tail/after_tail, which rules
 *    and breakpoints may name (a breakpoint there holds the operation in
 *    this layer).
 *
 * cluster_alloc has no I/O: the allocating step raises it
 * (qsm_io_blkdebug_event) before it takes clusters.
 *
 * Differences: QEMU's format layer also splits guest requests at the
 * file's max-transfer before the qcow2 driver sees them, which changes
 * how often qcow2's own events (write_aio, ...) are raised; qsm's engine
 * does not (this layer only sees the engine's requests to the file).  A
 * zero write QEMU's qcow2 sends with "no fallback" is written as zeros
 * here.  Not implemented (refused by name): the events qsm has no step
 * for (qsm_blkdebug_event_parse says which), take-child-perms and
 * unshare-child-perms.
 */
#ifndef QSM_IO_BLKDEBUG_H
#define QSM_IO_BLKDEBUG_H

#include <stdbool.h>
#include <stddef.h>

#include "io/io.h"

struct qsm_blkdebug;

/* Told when a request is suspended (resumed false) or resumed: qemu-io
 * prints "blkdebug: Suspended request 'TAG'" and "... Resuming ...". */
typedef void (*qsm_blkdebug_notify_fn)(void *opaque, const char *tag, bool resumed);

/* A rule set (empty, state 1).  NULL on ENOMEM. */
struct qsm_blkdebug *qsm_blkdebug_new(void);
void qsm_blkdebug_free(struct qsm_blkdebug *bd);
void qsm_blkdebug_set_notify(struct qsm_blkdebug *bd, qsm_blkdebug_notify_fn fn, void *opaque);

/* Read QEMU's config file format ([inject-error] / [set-state] sections of
 * key = "value" lines, # comments).  0 or -errno with a message in err. */
int qsm_blkdebug_read_config(struct qsm_blkdebug *bd, const char *path, char *err,
			     size_t errlen);
/* One flattened driver=blkdebug option: inject-error.N.KEY or
 * set-state.N.KEY (N groups keys into one rule).  0 or -EINVAL with err. */
int qsm_blkdebug_set_opt(struct qsm_blkdebug *bd, const char *key, const char *val, char *err,
			 size_t errlen);
/* Is key one of the node's limits (align, max-transfer, opt-write-zero,
 * max-write-zero, opt-discard, max-discard), which qsm_blkdebug_set_opt
 * takes as sizes ("4k")? */
bool qsm_blkdebug_is_limit(const char *key);
/* Check the limits as QEMU's blkdebug_open does, once the file under them
 * is open (file_align: its own request alignment, 1 for a file without
 * O_DIRECT): align a power of two below 2^31, the others multiples of it
 * (max-write-zero of opt-write-zero, max-discard of opt-discard), with
 * QEMU's "Cannot meet constraints with ...".  0 or -EINVAL with err. */
int qsm_blkdebug_check_limits(struct qsm_blkdebug *bd, uint64_t file_align, char *err,
			      size_t errlen);
/* Validate the rules set by qsm_blkdebug_set_opt (every rule names an
 * event).  0 or -EINVAL with err. */
int qsm_blkdebug_finish(struct qsm_blkdebug *bd, char *err, size_t errlen);

/* The qsm event a QEMU event name maps onto.  0, -ENOENT for a name QEMU
 * does not have, -ENOTSUP for one qsm's engine has no step for. */
int qsm_blkdebug_event_parse(const char *name, enum qsm_io_event *ev);

/* Wrap inner: the new handle owns inner and bd (both released when it is
 * closed, or here on failure).  0 or -errno. */
int qsm_io_blkdebug_wrap(struct qsm_io *inner, struct qsm_blkdebug *bd, struct qsm_io **out);

/* Breakpoints on a handle: -ENOTSUP when it is not a blkdebug handle (as
 * QEMU without blkdebug), -ENOENT for an unknown event or tag. */
int qsm_io_blkdebug_break(struct qsm_io *io, const char *event, const char *tag);
int qsm_io_blkdebug_remove_break(struct qsm_io *io, const char *tag);
int qsm_io_blkdebug_resume(struct qsm_io *io, const char *tag);
bool qsm_io_blkdebug_is_suspended(struct qsm_io *io, const char *tag);
/* Resume every held request (before a close: a held request never
 * completes otherwise). */
void qsm_io_blkdebug_resume_all(struct qsm_io *io);

/*
 * For the request machines (sm/data.c qsm_submit_io): should req, prepared
 * but not submitted, stop at a breakpoint of its event?  When one fires
 * (it is removed and the suspension reported), req is held and true
 * returned; on resume, resumed(req, 0) is called (from the resume call,
 * so post, do not run steps) and the caller then submits req with
 * qsm_io_submit as usual: that submit raises its event's other rules, not
 * its breakpoints again.  False (nothing held) for other handles.
 */
bool qsm_io_blkdebug_hold(struct qsm_io *io, struct qsm_io_req *req, qsm_io_cb resumed);

/*
 * An event with no I/O of its own (cluster_alloc: req->event is
 * QSM_IO_EV_CLUSTER_ALLOC, nothing submitted): raise it.  Held at a
 * breakpoint as qsm_io_blkdebug_hold (true); when resumed, the caller
 * raises it again with the same req, which then applies the event's
 * other rules (set-state, arming injections) and returns false.
 * Operations submitted with this tag (preallocations) raise nothing.
 */
bool qsm_io_blkdebug_event(struct qsm_io *io, struct qsm_io_req *req, qsm_io_cb resumed);

#endif
