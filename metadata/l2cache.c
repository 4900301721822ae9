/*
 * metadata/l2cache.c: the L2 table cache (see l2cache.h for the contract).
 *
 * Life of an entry:
 *
 *   (miss) --alloc slot--> LOADING --read done--> READY <--get/put--> ...
 *                             |                    |
 *                             +--read failed--> freed (waiters get -errno)
 *   READY, ref 0, clean, not wb_busy  ==  on the LRU list  ==  evictable
 *
 * Slots: a miss takes a free slot or evicts the least recently used
 * evictable entry.  When neither is possible the caller's waiter joins
 * slot_waiters; they are all woken (table == NULL) whenever an entry becomes
 * evictable, and retry.  need_writeback is called when dirty tables are what
 * stands in the way.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/l2cache.h"

static size_t hash_index(const struct qsm_l2_cache *c, uint64_t offset)
{
	uint64_t h = (offset / c->cluster_size) * 0x9e3779b97f4a7c15ull;
	return (size_t)(h >> 32) & (c->hash_size - 1);
}

static struct qsm_l2_table *lookup(const struct qsm_l2_cache *c, uint64_t offset)
{
	for (struct qsm_l2_table *t = c->hash[hash_index(c, offset)]; t; t = t->hnext)
		if (t->offset == offset)
			return t;
	return NULL;
}

static bool on_lru(const struct qsm_l2_table *t)
{
	return t->lru_next != NULL;
}

static void lru_remove(struct qsm_l2_table *t)
{
	if (!on_lru(t))
		return;
	t->lru_prev->lru_next = t->lru_next;
	t->lru_next->lru_prev = t->lru_prev;
	t->lru_prev = t->lru_next = NULL;
}

static void entry_free(struct qsm_l2_cache *c, struct qsm_l2_table *t);

static bool evictable(const struct qsm_l2_table *t)
{
	return t->ref == 0 && t->state == QSM_L2_READY && !t->dirty && t->wb_busy == 0;
}

static void wake_slot_waiters(struct qsm_l2_cache *c)
{
	struct qsm_l2_waiter *w = c->slot_waiters;
	c->slot_waiters = NULL;
	c->slot_waiters_tail = &c->slot_waiters;
	while (w) {
		struct qsm_l2_waiter *next = w->next;
		w->next = NULL;
		w->table = NULL;
		w->fn(w, 0);
		w = next;
	}
}

/* Put t on the LRU list (newest end) if invariant 3 says it belongs there,
 * and let slot waiters retry. */
static void maybe_release(struct qsm_l2_cache *c, struct qsm_l2_table *t)
{
	if (!evictable(t) || on_lru(t))
		return;
	t->lru_prev = c->lru.lru_prev;
	t->lru_next = &c->lru;
	c->lru.lru_prev->lru_next = t;
	c->lru.lru_prev = t;
	if (c->slot_waiters)
		wake_slot_waiters(c);
}

static void unhash(struct qsm_l2_cache *c, struct qsm_l2_table *t)
{
	struct qsm_l2_table **pp = &c->hash[hash_index(c, t->offset)];
	while (*pp != t)
		pp = &(*pp)->hnext;
	*pp = t->hnext;
}

static void entry_free(struct qsm_l2_cache *c, struct qsm_l2_table *t)
{
	lru_remove(t);
	unhash(c, t);
	c->nb_entries--;
	free(t->data);
	free(t);
}

int qsm_l2_cache_init(struct qsm_l2_cache *c, struct qsm_io *io, size_t cluster_size,
		      size_t capacity)
{
	memset(c, 0, sizeof(*c));
	c->io = io;
	c->cluster_size = cluster_size;
	c->capacity = capacity ? capacity : 1;
	c->hash_size = 16;
	while (c->hash_size < c->capacity * 2 && c->hash_size < (1u << 20))
		c->hash_size *= 2;
	c->hash = calloc(c->hash_size, sizeof(*c->hash));
	if (!c->hash)
		return -ENOMEM;
	c->lru.lru_next = c->lru.lru_prev = &c->lru;
	c->slot_waiters_tail = &c->slot_waiters;
	return 0;
}

void qsm_l2_cache_destroy(struct qsm_l2_cache *c)
{
	if (!c->hash)
		return;
	for (size_t i = 0; i < c->hash_size; i++) {
		while (c->hash[i]) {
			struct qsm_l2_table *t = c->hash[i];
			assert(t->state == QSM_L2_READY && t->ref == 0);
			entry_free(c, t);
		}
	}
	free(c->hash);
	c->hash = NULL;
}

void qsm_l2_cache_abandon(struct qsm_l2_cache *c)
{
	if (!c->hash)
		return;
	for (size_t i = 0; i < c->hash_size; i++)
		while (c->hash[i])
			entry_free(c, c->hash[i]);
	free(c->hash);
	c->hash = NULL;
}

/* Find a slot: a free one, or the oldest evictable entry's.  False when the
 * caller must wait (its waiter is then queued). */
/* A slot for a new table: 0, or -EAGAIN with w queued for a slot (a dirty
 * table must be written first).  Once the cache is stuck (no dirty table
 * will ever be written) the cache grows past its capacity instead of
 * waiting; the extra tables are clean and go at the next eviction. */
static int take_slot(struct qsm_l2_cache *c, struct qsm_l2_waiter *w)
{
	if (c->nb_entries < c->capacity)
		return 0;
	if (c->lru.lru_next != &c->lru) {
		struct qsm_l2_table *victim = c->lru.lru_next;
		assert(evictable(victim));
		entry_free(c, victim);
		c->evictions++;
		return 0;
	}
	if (c->stuck)
		return 0;
	w->next = NULL;
	w->table = NULL;
	*c->slot_waiters_tail = w;
	c->slot_waiters_tail = &w->next;
	if (c->nb_dirty && c->need_writeback)
		c->need_writeback(c->opaque);
	return -EAGAIN;
}

static struct qsm_l2_table *entry_new(struct qsm_l2_cache *c, uint64_t offset)
{
	struct qsm_l2_table *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	if (posix_memalign((void **)&t->data, 4096, c->cluster_size)) {
		free(t);
		return NULL;
	}
	t->offset = offset;
	t->cache = c;
	size_t h = hash_index(c, offset);
	t->hnext = c->hash[h];
	c->hash[h] = t;
	c->nb_entries++;
	return t;
}

static void load_cb(struct qsm_io_req *req, int ret)
{
	struct qsm_l2_table *t = container_of(req, struct qsm_l2_table, io);
	struct qsm_l2_cache *c = t->cache;
	struct qsm_l2_waiter *w = t->waiters;
	t->waiters = NULL;

	if (ret < 0) {
		/* Forget the table; every waiter hears the error. */
		assert(t->ref == 1);
		t->ref = 0;
		t->state = QSM_L2_READY;
		entry_free(c, t);
		while (w) {
			struct qsm_l2_waiter *next = w->next;
			w->table = NULL;
			w->fn(w, ret);
			w = next;
		}
		if (c->slot_waiters)
			wake_slot_waiters(c);
		return;
	}
	t->state = QSM_L2_READY;
	t->ref--; /* the loader's reference */
	while (w) {
		struct qsm_l2_waiter *next = w->next;
		t->ref++;
		w->table = t;
		w->fn(w, 0);
		w = next;
	}
	maybe_release(c, t);
}

int qsm_l2_get(struct qsm_l2_cache *c, uint64_t offset, struct qsm_l2_table **out,
	       struct qsm_l2_waiter *w)
{
	struct qsm_l2_table *t = lookup(c, offset);
	if (t && t->state == QSM_L2_READY) {
		c->hits++;
		lru_remove(t);
		t->ref++;
		*out = t;
		return 0;
	}
	if (t) { /* LOADING: join its waiters */
		c->hits++;
		w->table = NULL;
		w->waiting_on = t->loader;
		w->next = t->waiters;
		t->waiters = w;
		return -EAGAIN;
	}
	c->misses++;
	w->waiting_on = 0;
	int ret = take_slot(c, w);
	if (ret < 0)
		return ret;
	t = entry_new(c, offset);
	if (!t)
		return -ENOMEM;
	t->state = QSM_L2_LOADING;
	t->loader = w->tag;
	t->ref = 1; /* the loader's, invariant 2 */
	w->table = NULL;
	w->next = NULL;
	t->waiters = w;
	t->iov.iov_base = t->data;
	t->iov.iov_len = c->cluster_size;
	t->io = (struct qsm_io_req){
		.op = QSM_IO_READ,
		.event = QSM_IO_EV_L2_LOAD,
		.offset = offset,
		.len = c->cluster_size,
		.iov = &t->iov,
		.iovcnt = 1,
		.cb = load_cb,
	};
	qsm_io_submit(c->io, &t->io);
	return -EAGAIN;
}

int qsm_l2_create(struct qsm_l2_cache *c, uint64_t offset, const uint8_t *init,
		  struct qsm_l2_table **out, struct qsm_l2_waiter *w)
{
	assert(!lookup(c, offset));
	int ret = take_slot(c, w);
	if (ret < 0)
		return ret;
	struct qsm_l2_table *t = entry_new(c, offset);
	if (!t)
		return -ENOMEM;
	if (init)
		memcpy(t->data, init, c->cluster_size);
	else
		memset(t->data, 0, c->cluster_size);
	t->state = QSM_L2_READY;
	t->ref = 1;
	t->dirty = true;
	t->fresh = true;
	t->dirty_lo = 0; /* a new table is written whole */
	t->dirty_hi = (uint32_t)c->cluster_size;
	c->nb_dirty++;
	*out = t;
	return 0;
}

void qsm_l2_put(struct qsm_l2_cache *c, struct qsm_l2_table *t)
{
	assert(t->ref > 0 && t->state == QSM_L2_READY);
	t->ref--;
	maybe_release(c, t);
	/* A dirty table just became the only thing between a waiter and a slot. */
	if (t->ref == 0 && t->dirty && c->slot_waiters && c->need_writeback)
		c->need_writeback(c->opaque);
}

void qsm_l2_mark_dirty(struct qsm_l2_cache *c, struct qsm_l2_table *t)
{
	assert(t->ref > 0 && t->state == QSM_L2_READY);
	if (!t->dirty) {
		t->dirty = true;
		c->nb_dirty++;
	}
}

void qsm_l2_cancel_wait(struct qsm_l2_cache *c, struct qsm_l2_waiter *w)
{
	for (struct qsm_l2_waiter **pp = &c->slot_waiters; *pp; pp = &(*pp)->next) {
		if (*pp == w) {
			*pp = w->next;
			if (!*pp)
				c->slot_waiters_tail = pp;
			return;
		}
	}
}

/* Copy t's changed span into b, mark it clean and wb_busy. */
static int collect_one(struct qsm_l2_cache *c, struct qsm_l2_table *t, struct qsm_meta_batch *b)
{
	uint64_t lo = 0, hi = c->cluster_size;
	if (t->dirty_hi > t->dirty_lo) {
		lo = QSM_ALIGN_DOWN((uint64_t)t->dirty_lo, 4096);
		hi = QSM_MIN(QSM_ALIGN_UP((uint64_t)t->dirty_hi, 4096), c->cluster_size);
	}
	int ret = qsm_meta_batch_add(b, t->offset + lo, t->data + lo, hi - lo,
				     t->fresh ? QSM_IO_EV_L2_ALLOC : QSM_IO_EV_L2_UPDATE);
	if (ret < 0)
		return ret;
	t->fresh = false;
	t->dirty = false;
	t->dirty_lo = t->dirty_hi = 0;
	t->wb_busy++;
	c->nb_dirty--;
	return 0;
}

int qsm_l2_collect(struct qsm_l2_cache *c, struct qsm_meta_batch *b)
{
	int n = 0;
	for (size_t i = 0; i < c->hash_size && c->nb_dirty; i++) {
		for (struct qsm_l2_table *t = c->hash[i]; t; t = t->hnext) {
			if (!t->dirty)
				continue;
			int ret = collect_one(c, t, b);
			if (ret < 0)
				return ret;
			n++;
		}
	}
	return n;
}

int qsm_l2_collect_table(struct qsm_l2_cache *c, uint64_t offset, bool fresh_only,
			 struct qsm_meta_batch *b)
{
	struct qsm_l2_table *t = lookup(c, offset);
	if (!t || !t->dirty || (fresh_only && !t->fresh))
		return 0;
	int ret = collect_one(c, t, b);
	return ret < 0 ? ret : 1;
}

bool qsm_l2_is_dirty(const struct qsm_l2_cache *c, uint64_t offset)
{
	const struct qsm_l2_table *t = lookup(c, offset);
	return t && t->dirty;
}

void qsm_l2_written(struct qsm_l2_cache *c, uint64_t offset, int ret)
{
	/* offset is where the collected span was written: inside the table. */
	struct qsm_l2_table *t = lookup(c, QSM_ALIGN_DOWN(offset, c->cluster_size));
	assert(t && t->wb_busy > 0);
	t->wb_busy--;
	if (ret < 0) {
		if (!t->dirty)
			c->nb_dirty++;
		t->dirty = true;
		t->dirty_lo = 0;
		t->dirty_hi = (uint32_t)c->cluster_size;
		lru_remove(t);
	}
	maybe_release(c, t);
}

void qsm_l2_cache_set_stuck(struct qsm_l2_cache *c)
{
	c->stuck = true;
	/* Whoever waits for a slot must hear of it even if nothing became
	 * evictable: its retry gets a slot or -EIO. */
	if (c->slot_waiters)
		wake_slot_waiters(c);
}

void qsm_l2_cache_drop_clean(struct qsm_l2_cache *c)
{
	while (c->lru.lru_next != &c->lru)
		entry_free(c, c->lru.lru_next);
}

bool qsm_l2_cache_check(const struct qsm_l2_cache *c)
{
	size_t n = 0, dirty = 0;
	for (size_t i = 0; i < c->hash_size; i++) {
		for (const struct qsm_l2_table *t = c->hash[i]; t; t = t->hnext) {
			n++;
			dirty += t->dirty;
			if (t->state == QSM_L2_LOADING && (t->ref == 0 || t->dirty))
				return false;
			if (evictable(t) != on_lru(t))
				return false;
		}
	}
	return n == c->nb_entries && (n <= c->capacity || c->stuck) && dirty == c->nb_dirty;
}
