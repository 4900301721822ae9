/*
 * metadata/l2cache.h: the L2 table cache.
 *
 * Whole L2 tables (one cluster each) are cached in their on-disk big-endian
 * form.  Entries are reference counted (qed-l2-cache.c style):
 *
 *  - qsm_l2_get() returns a READY table with a reference the caller owns, or
 *    -EAGAIN after queueing the caller's waiter; the waiter is called later
 *    from the event loop (never from inside qsm_l2_get) with 0 ("call get
 *    again, it will hit or a slot is free") or a negative errno (load failed).
 *  - qsm_l2_put() drops a reference.  Unreferenced tables stay cached and
 *    are evicted least-recently-used first, but never while dirty or while a
 *    write-back write of them is in flight (so a reload can never read a
 *    stale table from disk).
 *  - The cache never writes by itself.  When a slot is wanted and only dirty
 *    tables could be evicted it calls the owner's need_writeback hook; the
 *    owner (sm/writeback.c) collects dirty tables with qsm_l2_collect() and
 *    reports completed writes with qsm_l2_written().
 *
 * Invariants:
 *  1. At most one entry per host offset; nb_entries <= capacity, except
 *     once stuck (qsm_l2_cache_set_stuck), when the cache may grow.
 *  2. A LOADING entry has ref >= 1 (the loader's) and is never dirty.
 *  3. An entry with ref == 0, not dirty and not wb_busy is on the LRU list
 *     and may be evicted; every other entry is off it.
 */
#ifndef QSM_L2CACHE_H
#define QSM_L2CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/io.h"
#include "metadata/batch.h"
#include "metadata/qcow2.h"

/*
 * A party waiting for the cache.  fn runs from the event loop with:
 *  - ret < 0: the load failed;
 *  - ret == 0 and table != NULL: the table is READY and a reference to it
 *    was taken on the waiter's behalf (the waiter now owns it);
 *  - ret == 0 and table == NULL: a slot may be free, call get/create again.
 */
struct qsm_l2_waiter {
	struct qsm_l2_waiter *next;
	struct qsm_l2_table *table;
	void (*fn)(struct qsm_l2_waiter *w, int ret);
	uint64_t tag;        /* the owner's name for itself (sm/: the request id) */
	uint64_t waiting_on; /* set by -EAGAIN: the tag of the waiter whose get is
			      * loading the table, or 0 (a slot wait, or our own load) */
};

enum qsm_l2_state { QSM_L2_LOADING, QSM_L2_READY };

struct qsm_l2_table {
	uint64_t offset;            /* host offset of the table */
	uint8_t *data;              /* cluster_size bytes, on-disk byte order */
	unsigned ref;
	enum qsm_l2_state state;
	bool dirty;                 /* changed since last collected */
	uint32_t dirty_lo, dirty_hi; /* changed bytes [lo, hi) while dirty */
	uint64_t loader;            /* tag of the waiter whose get started the load */
	bool fresh;                 /* created by qsm_l2_create, never collected: its
				     * first write is tagged QSM_IO_EV_L2_ALLOC */
	unsigned wb_busy;           /* collected copies whose write is in flight */
	struct qsm_l2_waiter *waiters;  /* waiting for LOADING to finish */
	struct qsm_l2_cache *cache;
	struct qsm_io_req io;
	struct iovec iov;
	struct qsm_l2_table *hnext;               /* hash chain */
	struct qsm_l2_table *lru_prev, *lru_next; /* LRU list (invariant 3) */
};

struct qsm_l2_cache {
	struct qsm_io *io;
	size_t cluster_size;
	size_t capacity, nb_entries;
	struct qsm_l2_table **hash;
	size_t hash_size;
	struct qsm_l2_table lru;    /* sentinel; lru.lru_next is the oldest */
	struct qsm_l2_waiter *slot_waiters, **slot_waiters_tail;
	size_t nb_dirty;
	/* Owner hooks. */
	void (*need_writeback)(void *opaque);
	void *opaque;
	/* Counters. */
	uint64_t hits, misses, evictions;
	bool stuck;                 /* qsm_l2_cache_set_stuck: dirty tables are never written */
};

/* capacity: number of tables (>= 1). */
int qsm_l2_cache_init(struct qsm_l2_cache *c, struct qsm_io *io, size_t cluster_size,
		      size_t capacity);
/* No table may be referenced or loading. */
void qsm_l2_cache_destroy(struct qsm_l2_cache *c);
/* Free everything, referenced or not (the image is being abandoned: no
 * callback that could touch a table will run again). */
void qsm_l2_cache_abandon(struct qsm_l2_cache *c);

/* Find or load the table at offset: 0 with a reference in *out; -EAGAIN
 * when it is loading or no slot is free (w is called later, see above);
 * -ENOMEM. */
int qsm_l2_get(struct qsm_l2_cache *c, uint64_t offset, struct qsm_l2_table **out,
	       struct qsm_l2_waiter *w);
/* Install a table for a newly allocated cluster, contents copied from init
 * (or zeros when NULL), marked dirty, returned referenced.  -EAGAIN when no
 * slot is free (waiter queued as for get). */
int qsm_l2_create(struct qsm_l2_cache *c, uint64_t offset, const uint8_t *init,
		  struct qsm_l2_table **out, struct qsm_l2_waiter *w);
void qsm_l2_put(struct qsm_l2_cache *c, struct qsm_l2_table *t);
void qsm_l2_mark_dirty(struct qsm_l2_cache *c, struct qsm_l2_table *t);
/* Remove a waiter that no longer wants its wakeup (request failed). */
void qsm_l2_cancel_wait(struct qsm_l2_cache *c, struct qsm_l2_waiter *w);

/* Copy the changed span of every dirty table into b (event L2_UPDATE; a
 * table made by qsm_l2_create is written whole), mark them clean and
 * wb_busy.  Returns the number collected or -ENOMEM.  Collected copies of
 * one table must reach the disk in collect order: the owner runs one
 * write-back at a time. */
int qsm_l2_collect(struct qsm_l2_cache *c, struct qsm_meta_batch *b);
/* The same for the one table at offset, if it is cached and dirty (and,
 * with fresh_only, made by qsm_l2_create and never collected): 1 when
 * collected, 0 when there was nothing to collect, -ENOMEM.  A table not
 * cached, or cached and clean, was written by an earlier write-back. */
int qsm_l2_collect_table(struct qsm_l2_cache *c, uint64_t offset, bool fresh_only,
			 struct qsm_meta_batch *b);
/* Is the table at offset cached with changes not yet collected? */
bool qsm_l2_is_dirty(const struct qsm_l2_cache *c, uint64_t offset);
/* The write of a collected copy of the table at offset finished with ret
 * (0 or -errno; a copy never submitted counts as failed).  A failed write
 * leaves the table dirty again, whole: what is on disk is unknown, and the
 * table must never be evicted and reloaded from there. */
void qsm_l2_written(struct qsm_l2_cache *c, uint64_t offset, int ret);
/* Tables that could be evicted if they were written back. */
static inline size_t qsm_l2_dirty_count(const struct qsm_l2_cache *c)
{
	return c->nb_dirty;
}
/* After a failed write-back nothing dirty will ever be written.  Dirty
 * tables stay cached and unevictable: they hold acknowledged changes, and a
 * reload would read stale entries from the disk (reads would return old
 * data for acknowledged writes).  From now on a request for a slot that
 * finds nothing evictable gets one past the capacity (reads keep working;
 * the image takes no more writes, so only clean tables are added, and they
 * are evicted first) instead of waiting for a write-back that will never
 * come; the requests already waiting are woken to retry. */
void qsm_l2_cache_set_stuck(struct qsm_l2_cache *c);
/* Drop every clean, unreferenced table (e.g. after a failed write-back, or
 * for tests).  */
void qsm_l2_cache_drop_clean(struct qsm_l2_cache *c);

static inline uint64_t qsm_l2_entry(const struct qsm_l2_table *t, uint64_t idx)
{
	return qcow2_be64(t->data + idx * 8);
}
/* Change an entry; the caller marks the table dirty (qsm_l2_mark_dirty).
 * Write-back writes only the span of changed entries (in 4 KiB units). */
static inline void qsm_l2_set_entry(struct qsm_l2_table *t, uint64_t idx, uint64_t v)
{
	qcow2_put_be64(t->data + idx * 8, v);
	uint32_t lo = (uint32_t)(idx * 8), hi = lo + 8;
	if (t->dirty_lo == t->dirty_hi) {
		t->dirty_lo = lo;
		t->dirty_hi = hi;
	} else {
		t->dirty_lo = lo < t->dirty_lo ? lo : t->dirty_lo;
		t->dirty_hi = hi > t->dirty_hi ? hi : t->dirty_hi;
	}
}

bool qsm_l2_cache_check(const struct qsm_l2_cache *c);

#endif
