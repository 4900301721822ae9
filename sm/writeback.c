/*
 * sm/writeback.c: the write-back batch, qsm's only path for metadata to disk.
 *
 * Requests change metadata in memory only (cached L2 tables, the resident L1
 * table and refcount blocks).  A write-back batch is an internal request of
 * machine WRITEBACK:
 *
 *   WB_COLLECT  snapshot every dirty refcount block, the refcount table, the
 *               header, every dirty L2 table and the dirty L1 range (copies,
 *               so later changes cannot slip into this batch)
 *   then, skipping empty levels, each level written in parallel and followed
 *   by its own fdatasync state, in this order only (sm/states.def has no
 *   other edges, so the dispatcher refuses any other order):
 *      WB_REFBLOCKS > WB_SYNC_REFBLOCKS > WB_REFTABLE > WB_SYNC_REFTABLE
 *      > WB_HEADER > WB_SYNC_HEADER > WB_L2 > WB_SYNC_L2 > WB_L1 > WB_SYNC_L1
 *   (a batch that does not start with refcount blocks starts with
 *   WB_SYNC_DATA, so the guest data is durable before any table); the
 *   level a sync state closes is named by the state itself, and the event
 *   leaving it names the next non-empty level (next_level_event)
 *   WB_RELEASE  drop the refcounts of clusters that the now durable tables no
 *               longer reference (those refcount blocks go in the next batch);
 *               a refcount block not cached is read first (REFBLOCK_LOAD and
 *               back, the frees made so far kept in wb->nb_released)
 *
 * Crash-safety rules this order keeps (tools/doc/design.md, "Metadata and
 * crash safety"), so on disk refcount >= references at every instant:
 *  1. A refcount block reaches the disk before any L2 entry using a cluster
 *     it counts, and before the refcount table entry pointing at it.
 *  2. Guest data and COW reach the disk before the L2 entry pointing at
 *     them: a request updates its cached L2 entry only after its data write
 *     completed, the snapshot is taken afterwards, and there is always a sync
 *     before the L2 level.
 *  3. An L2 table reaches the disk before the L1 entry pointing at it.
 *  4. A freed cluster's refcount drops only after the tables that stopped
 *     pointing at it are durable, and it can be reused only after that;
 *     nor while a data I/O that found it through the old entry is still in
 *     flight on it (held_frees, released as that I/O completes).
 *  5. A new refcount table is durable before the header names it; the old
 *     table is released after the header is durable.
 *
 * Lazy refcounts (img->lazy) defer the refcounts of data clusters only, as
 * QEMU does: refcount blocks and table are left dirty in memory by a batch
 * that writes only data cluster mappings (WB_COLLECT --lazy--> WB_SYNC_DATA)
 * and written by a full batch (close, resize, create), which then clears
 * the dirty bit, and by any batch that carries new metadata: an L1 entry
 * (a new L2 table, or one copied from a snapshot's) or a refcount table
 * entry (a new refcount block).  Such a batch takes the eager path
 * (WB_BLOCKS), so rule 1 holds for metadata even with lazy refcounts: the
 * refcount block counting a new L2 table (or refcount block) is durable
 * (WB_SYNC_REFBLOCKS) before the L2 level, and that before the L1 level
 * that makes the table reachable; a crash never leaves an L2 table or
 * refcount block with refcount 0.  The blocks it writes also carry the
 * data refcounts raised up to the snapshot (QEMU flushes its whole
 * refcount cache at an L2 allocation too, but before the allocating
 * write's own data cluster is counted: after a crash qsm's image may show
 * fewer lagging data clusters than QEMU's, never more).  The first
 * batch that writes an L2 or L1 entry writes the header with the dirty bit
 * and syncs before the tables (WB_COLLECT --mark dirty--> WB_HEADER): on disk,
 * a table may run ahead of the refcounts only while the dirty bit says so,
 * and opening such an image read-write repairs it first (sm/image.c).
 *
 * Batching: requests that need durability (flush, writethrough writes) join
 * img->wb_next_waiters; WB_COLLECT takes all of them, so one fdatasync
 * sequence completes every request that joined before the snapshot (group
 * commit).  Only one batch runs at a time.  A batch starts when every
 * writethrough write in flight has reached DURABLE_WAIT (img->wt_pending is
 * 0), or after QSM_GROUP_COMMIT_USEC, or at once for flushes in writeback
 * mode and cache pressure; after a batch the decision is made on the next
 * loop turn, so requests resubmitted by completion callbacks can join.  A
 * failed metadata write or sync puts the image in the sticky error state
 * (img->error = -EIO): waiters fail, later writes fail fast.
 *
 * Targeted batches (FUA): when every request a batch takes is a FUA write
 * or zero write (QSM_REQ_FUA, in a cache mode where other writes do not
 * wait for durability) and nothing asked for cache space (wb_wanted), a
 * close, a flush or a full batch, the batch writes what those requests need
 * and leaves everything else dirty for the next normal batch:
 *   - the L2 tables their runs mapped through (req->fua_l2, noted as each
 *     run lets its table go), those still dirty;
 *   - the 512-byte L1 sectors of their L1 entries that may not be durable
 *     (they differ from img->l1_disk, the copy of what the disk holds, kept
 *     at every collect; without a valid copy, after an L1 move, they lie in
 *     img->l1_dirty_lo..hi; a targeted batch leaves that range as it is, so
 *     a later normal batch writes those bytes again, unchanged or newer),
 *     and, for rule 3, every fresh L2 table (made by L2_ALLOC,
 *     never written) an entry of those sectors names: a table written once
 *     already is a valid table on disk, so an L1 entry may name it while
 *     its newer changes are still dirty;
 *   - when anything above is written: every dirty refcount block (and the
 *     refcount table and header when the table moved), as a normal batch
 *     (with lazy refcounts only when it writes an L1 sector or a new
 *     refcount block goes, else the dirty bit first).  Not only
 *     the FUA requests' own: an L2 table is written whole (its dirty span),
 *     so it carries other requests' entries too, and their clusters'
 *     refcounts must be durable first (rule 1); refcount blocks are few
 *     (one covers cluster_size * 8 / refcount_bits clusters), and a count
 *     reaching the disk early is only a leak after a crash, never a loss;
 *   - no releases: the pending frees wait for a normal batch, which has
 *     written every table that stopped pointing at them (rule 4).
 * Rule 2 holds for the other requests' entries those tables carry: an
 * entry changes only after its data write completed (L2_UPDATE follows
 * ALLOC_WRITE), before this snapshot, and the batch's first sync (WB_SYNC_DATA
 * or WB_SYNC_REFBLOCKS) comes before the L2 level.  A FUA in-place overwrite
 * whose table and L1 entry are durable needs no metadata: its batch is
 * WB_COLLECT > WB_SYNC_DATA > WB_RELEASE, one sync.  Joining: a FUA request
 * reaching DURABLE_WAIT while a batch runs joins that batch when it covers
 * it (running_covers: none of its tables or L1 entries is dirty, so each is
 * durable or in that batch (img->l1_disk includes what a batch collected),
 * and the batch still has a sync to submit,
 * which covers its data); otherwise it waits for the next one, and a flush,
 * a close or cache pressure queued with it makes that a normal batch, which
 * covers it too.  Header changes other than the refcount table's move or
 * the dirty bit (an L1 move, a resize) make the batch a normal one.
 *
 * Snapshot operations (sm/snapops.c): while one holds every writer and the
 * dirty bit is durable, a batch with no header or refcount table write
 * puts its L2 and L1 writes in the refcount block level, one sync for all
 * (qsm_snap_flat): only the operation's own refcounts and COPIED flags
 * change, no new reference, and the repair on open puts any mix right.
 *
 * Full batches (img->wb_full, asked for by a close or a blocking full flush,
 * qsm_sync_writeback): refcounts are written even with lazy refcounts, and
 * after WB_RELEASE the batch goes round again (WB_ROUND, at most
 * QSM_WB_MAX_ROUNDS) while releasing freed clusters left refcount blocks
 * dirty, and once more to write the header with the lazy dirty bit cleared
 * when everything else is durable.  This is the only path for metadata to
 * disk: close, resize and create use it too (there is no synchronous copy).
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sm/sm.h"

enum wb_level { WBL_BLOCKS, WBL_REFTABLE, WBL_HEADER, WBL_L2, WBL_L1, WBL__COUNT };

__attribute__((unused)) static const enum qsm_state level_state[WBL__COUNT] = {
	QSM_S_WB_REFBLOCKS, QSM_S_WB_REFTABLE, QSM_S_WB_HEADER, QSM_S_WB_L2, QSM_S_WB_L1,
};
static const enum qsm_event level_event[WBL__COUNT] = {
	QSM_E_WB_BLOCKS, QSM_E_WB_TABLE, QSM_E_WB_HEAD, QSM_E_WB_TABLES, QSM_E_WB_ENTRIES,
};
/* The sync state that follows each level. */
static const enum qsm_state level_sync[WBL__COUNT] = {
	QSM_S_WB_SYNC_REFBLOCKS, QSM_S_WB_SYNC_REFTABLE, QSM_S_WB_SYNC_HEADER, QSM_S_WB_SYNC_L2,
	QSM_S_WB_SYNC_L1,
};

/* Full batches: rounds at most (each round's releases dirty fewer blocks). */
#define QSM_WB_MAX_ROUNDS 8

/* The level a sync state closes; -1 for WB_SYNC_DATA (before any level). */
static int sync_level(enum qsm_state s)
{
	for (int l = 0; l < WBL__COUNT; l++)
		if (level_sync[l] == s)
			return l;
	assert(s == QSM_S_WB_SYNC_DATA);
	return -1;
}

static enum qsm_event next_level_event(struct qsm_wb *wb, int level);
static int wb_collect_targeted(struct qsm_image *img, struct qsm_wb *wb);
static void l1_disk_note(struct qsm_image *img, uint64_t lo, uint64_t hi);

struct wb_io {
	struct qsm_io_req io;
	struct qsm_req *job;
	bool l2;
};

static struct qsm_meta_batch *level_batch(struct qsm_wb *wb, int level)
{
	switch (level) {
	case WBL_BLOCKS: return &wb->blocks;
	case WBL_REFTABLE: return &wb->reftable;
	case WBL_HEADER: return &wb->header;
	case WBL_L2: return &wb->l2;
	default: return &wb->l1;
	}
}

/* Drop what a round collected (the next round collects afresh). */
static void wb_reset(struct qsm_wb *wb)
{
	for (int l = 0; l < WBL__COUNT; l++) {
		qsm_meta_batch_clear(level_batch(wb, l));
		free(level_batch(wb, l)->w);
		memset(level_batch(wb, l), 0, sizeof(struct qsm_meta_batch));
	}
	free(wb->frees);
	free(wb->ios);
	wb->frees = NULL;
	wb->nb_frees = 0;
	wb->ios = NULL;
	wb->nb_ios = 0;
	wb->l2_submitted = 0;
	wb->marks_dirty = false;
	memset(&wb->rc, 0, sizeof(wb->rc));
}

static void wb_free(struct qsm_wb *wb)
{
	wb_reset(wb);
	free(wb);
}

int qsm_free_cluster_deferred(struct qsm_image *img, uint64_t host_offset)
{
	if (img->nb_pending_frees == img->cap_pending_frees) {
		size_t cap = img->cap_pending_frees ? img->cap_pending_frees * 2 : 64;
		uint64_t *f = realloc(img->pending_frees, cap * sizeof(*f));
		if (!f)
			return -ENOMEM;
		img->pending_frees = f;
		img->cap_pending_frees = cap;
	}
	img->pending_frees[img->nb_pending_frees++] = host_offset >> img->cluster_bits;
	return 0;
}

/* Serialize the in-memory header into a batch.  It names the refcount table
 * this batch writes, or (when refcounts are deferred) the one on disk.
 * Cluster 0 belongs to the header alone. */
static int collect_header(struct qsm_image *img, struct qsm_meta_batch *b, bool with_refcounts)
{
	if (with_refcounts)
		qsm_refcount_table_location(img->rc, &img->disk_reftable_offset,
					    &img->disk_reftable_clusters);
	img->hdr.refcount_table_offset = img->disk_reftable_offset;
	img->hdr.refcount_table_clusters = img->disk_reftable_clusters;
	uint8_t *buf = calloc(1, img->cluster_size);
	if (!buf)
		return -ENOMEM;
	int ret = qcow2_header_serialize(&img->hdr, buf, img->cluster_size);
	if (ret == 0)
		ret = qsm_meta_batch_add(b, 0, buf, img->cluster_size, QSM_IO_EV_HEADER_UPDATE);
	free(buf);
	return ret;
}

/* Is m an L2 table's write (in whichever level the batch put it)? */
static bool is_l2_write(const struct qsm_meta_write *m)
{
	return m->event == QSM_IO_EV_L2_UPDATE || m->event == QSM_IO_EV_L2_ALLOC;
}

/* Append src's writes to dst (ownership of the copies moves too). */
static int batch_move(struct qsm_meta_batch *dst, struct qsm_meta_batch *src)
{
	for (size_t i = 0; i < src->n; i++) {
		struct qsm_meta_write *m = &src->w[i];
		int ret = qsm_meta_batch_add(dst, m->offset, m->buf, m->len, m->event);
		if (ret < 0)
			return ret;
	}
	qsm_meta_batch_clear(src);
	return 0;
}

/* The header level of a batch: the dirty bit set first when mark_dirty
 * (tables go out ahead of their refcounts), then the header whenever
 * anything dirtied it.  A full batch whose only write is the header, with
 * everything else durable (the rounds before, or earlier batches), clears
 * the dirty bit in that same write rather than in a round of its own:
 * pending frees may still drop refcounts after it, which a crash turns
 * into leaks only.  Called after the refcount and L2 levels are collected. */
static int collect_header_level(struct qsm_image *img, struct qsm_wb *wb, bool with_refcounts,
				bool mark_dirty)
{
	int ret;
	if (mark_dirty) {
		img->hdr.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
		img->header_dirty = true;
		wb->marks_dirty = true;
	}
	if (img->header_dirty && wb->full && with_refcounts && img->disk_dirty && !img->dirty_hold &&
	    !wb->cleaning && !wb->blocks.n && !wb->reftable.n && !wb->l2.n &&
	    img->l1_dirty_hi <= img->l1_dirty_lo && !qsm_l2_dirty_count(&img->l2c) &&
	    !qsm_refcount_dirty(img->rc)) {
		img->hdr.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
		wb->cleaning = true;
	}
	if (img->header_dirty) {
		if ((ret = collect_header(img, &wb->header, with_refcounts)) < 0)
			return ret;
		img->header_dirty = false;
	}
	return 0;
}

/*
 * Snapshot everything dirty into wb (WB_COLLECT).  With
 * lazy refcounts and !full, refcount blocks stay dirty in memory, and when
 * the batch writes tables while the dirty bit is not on disk yet, the header
 * level sets it first.
 */
static int wb_collect(struct qsm_image *img, struct qsm_wb *wb, bool full)
{
	/* Lazy refcounts defer data clusters only: a batch carrying new
	 * metadata (an L1 entry, so a new or copied L2 table; a refcount table
	 * entry, so a new refcount block) writes the refcount blocks first. */
	bool new_metadata = img->l1_dirty_hi > img->l1_dirty_lo ||
			    (img->lazy && qsm_refcount_table_dirty(img->rc));
	bool with_refcounts = full || !img->lazy || new_metadata;
	int ret;
	if (img->raw)
		return 0; /* no metadata: a raw image's batch is one fdatasync */
	if (wb->targeted)
		return wb_collect_targeted(img, wb);
	wb->lazy_deferred = !with_refcounts;
	if (with_refcounts) {
		if ((ret = qsm_refcount_collect(img->rc, &wb->blocks, &wb->reftable, &wb->rc)) < 0)
			return ret;
		if (wb->rc.table_moved)
			img->header_dirty = true;
	}
	if ((ret = qsm_l2_collect(&img->l2c, &wb->l2)) < 0)
		return ret;
	if ((ret = collect_header_level(img, wb, with_refcounts,
					!with_refcounts && !img->disk_dirty &&
						(wb->l2.n || img->l1_dirty_hi > img->l1_dirty_lo))) < 0)
		return ret;
	if (img->l1_dirty_hi > img->l1_dirty_lo) {
		/* Whole 512-byte sectors; the L1's clusters are all its own. */
		uint64_t lo = QSM_ALIGN_DOWN(img->l1_dirty_lo * 8, 512);
		uint64_t hi = QSM_ALIGN_UP(img->l1_dirty_hi * 8, 512);
		ret = qsm_meta_batch_add(&wb->l1, img->hdr.l1_table_offset + lo, img->l1 + lo,
					 hi - lo, QSM_IO_EV_L1_UPDATE);
		if (ret < 0)
			return ret;
		img->l1_dirty_lo = img->l1_dirty_hi = 0;
		l1_disk_note(img, lo, hi);
	}
	/* A snapshot operation's own changes under a durable dirty bit: one
	 * level, one sync (qsm_snap_flat).  Not with a header or refcount
	 * table write: those keep their order (rules 1, 5). */
	if (qsm_snap_flat(img) && !wb->header.n && !wb->reftable.n && !wb->marks_dirty &&
	    ((ret = batch_move(&wb->blocks, &wb->l2)) < 0 || (ret = batch_move(&wb->blocks, &wb->l1)) < 0))
		return ret;
#ifdef QSM_MUTANTS
	if (QSM_MUTANT(REFBLOCK_AFTER_L2) && batch_move(&wb->l1, &wb->blocks) < 0) /* mutant: refcount blocks last */
		abort(); /* a test build's mutant: no recovery */
	if (QSM_MUTANT(DIRTY_NOT_DURABLE) && wb->marks_dirty) {
		/* mutant: the dirty bit travels with the tables, unordered */
		if (batch_move(&wb->l2, &wb->header) < 0)
			abort();
		wb->marks_dirty = false;
		img->disk_dirty = true;
	}
#endif
	wb->frees = img->pending_frees;
	wb->nb_frees = img->nb_pending_frees;
	wb->nb_released = 0;
	img->pending_frees = NULL;
	img->nb_pending_frees = img->cap_pending_frees = 0;
	return 0;
}

/* The on-disk L1 copy (img->l1_disk) describes this table. */
static bool l1_disk_valid(const struct qsm_image *img)
{
	return img->l1_disk && img->l1_disk_offset == img->hdr.l1_table_offset &&
	       img->l1_disk_size == img->l1_size;
}

/* The L1 bytes [lo, hi) are on disk or in the batch being collected.  With
 * no valid copy, one is made when the dirty range is empty (then every
 * entry is), else nothing is known yet. */
static void l1_disk_note(struct qsm_image *img, uint64_t lo, uint64_t hi)
{
	uint64_t bytes = QSM_ALIGN_UP(img->l1_size * 8, 512);
	if (!l1_disk_valid(img)) {
		if (img->l1_dirty_hi > img->l1_dirty_lo)
			return;
		uint8_t *d = realloc(img->l1_disk, bytes ? bytes : 1);
		if (!d)
			return; /* no copy: l1_maybe_dirty falls back to the range */
		img->l1_disk = d;
		img->l1_disk_offset = img->hdr.l1_table_offset;
		img->l1_disk_size = img->l1_size;
		lo = 0;
		hi = bytes;
	}
	hi = QSM_MIN(hi, bytes);
	if (hi > lo)
		memcpy(img->l1_disk + lo, img->l1 + lo, hi - lo);
}

void qsm_wb_l1_loaded(struct qsm_image *img)
{
	l1_disk_note(img, 0, 0);
}

/* May L1 entry idx not be durable (nor in the running batch)?  It differs
 * from the on-disk copy, or, without one, lies in the dirty range (which
 * only a normal batch resets). */
static bool l1_maybe_dirty(struct qsm_image *img, uint64_t idx)
{
	l1_disk_note(img, 0, 0);
	if (l1_disk_valid(img))
		return memcmp(img->l1 + idx * 8, img->l1_disk + idx * 8, 8) != 0;
	return idx >= img->l1_dirty_lo && idx < img->l1_dirty_hi;
}

/* A FUA write or zero write whose noted tables say all it needs. */
static bool fua_targeted(const struct qsm_req *req)
{
	enum qsm_cache_mode c = req->img->cache;
	/* Not one in FREE_WAIT: it waits for releases, which a targeted
	 * batch never makes (it would wait forever). */
	return (req->machine == QSM_M_WRITE || req->machine == QSM_M_ZEROES) &&
	       req->state != QSM_S_FREE_WAIT &&
	       (req->flags & QSM_REQ_FUA) && !req->fua_many && c != QSM_CACHE_WRITETHROUGH &&
	       c != QSM_CACHE_DIRECTSYNC;
}

void qsm_wb_note_fua(struct qsm_req *req)
{
	if (req->machine != QSM_M_WRITE && req->machine != QSM_M_ZEROES)
		return;
	uint64_t off = req->run.l2->offset;
	for (unsigned i = 0; i < req->nb_fua; i++)
		if (req->fua_l2[i] == off)
			return;
	if (req->nb_fua == QSM_FUA_TABLES) {
		req->fua_many = true;
		return;
	}
	req->fua_l2[req->nb_fua] = off;
	req->fua_l1[req->nb_fua++] = req->run.l1_index;
}

/* A targeted batch's L1 sector holding entry idx, and the fresh tables its
 * entries name (rule 3); once per sector. */
static int collect_l1_sector(struct qsm_image *img, struct qsm_wb *wb, uint64_t idx)
{
	uint64_t lo = QSM_ALIGN_DOWN(idx * 8, 512);
	uint64_t at = img->hdr.l1_table_offset + lo;
	for (size_t i = 0; i < wb->l1.n; i++)
		if (wb->l1.w[i].offset == at)
			return 0;
	for (uint64_t e = lo / 8; e < lo / 8 + 512 / 8 && e < img->l1_size; e++) {
		uint64_t l2 = qcow2_be64(img->l1 + e * 8) & QCOW2_L1E_OFFSET_MASK;
		int r = l2 ? qsm_l2_collect_table(&img->l2c, l2, true, &wb->l2) : 0;
		if (r < 0)
			return r;
	}
	int ret = qsm_meta_batch_add(&wb->l1, at, img->l1 + lo, 512, QSM_IO_EV_L1_UPDATE);
	if (ret == 0 && l1_disk_valid(img))
		l1_disk_note(img, lo, lo + 512);
	return ret;
}

/* WB_COLLECT of a targeted batch (see the design block): the waiters' dirty
 * tables and L1 sectors, then what writing them needs. */
static int wb_collect_targeted(struct qsm_image *img, struct qsm_wb *wb)
{
	bool with_refcounts = !img->lazy;
	int ret;
	for (struct qsm_wait *w = wb->waiters; w; w = w->next) {
		struct qsm_req *req = w->req;
		for (unsigned i = 0; i < req->nb_fua; i++)
			if ((ret = qsm_l2_collect_table(&img->l2c, req->fua_l2[i], false, &wb->l2)) < 0)
				return ret;
	}
	for (struct qsm_wait *w = wb->waiters; w; w = w->next) {
		struct qsm_req *req = w->req;
		for (unsigned i = 0; i < req->nb_fua; i++)
			if (l1_maybe_dirty(img, req->fua_l1[i]) &&
			    (ret = collect_l1_sector(img, wb, req->fua_l1[i])) < 0)
				return ret;
	}
	if (!wb->l2.n && !wb->l1.n) {
		wb->lazy_deferred = img->lazy;
		return 0; /* their mapping is durable: one sync of their data */
	}
	/* Lazy refcounts defer data clusters only (as wb_collect): an L1
	 * entry (a new table) or a new refcount block takes the refcounts. */
	with_refcounts = with_refcounts || wb->l1.n || qsm_refcount_table_dirty(img->rc);
	wb->lazy_deferred = !with_refcounts;
	if (with_refcounts) {
		if ((ret = qsm_refcount_collect(img->rc, &wb->blocks, &wb->reftable, &wb->rc)) < 0)
			return ret;
		if (wb->rc.table_moved)
			img->header_dirty = true;
	}
	if ((ret = collect_header_level(img, wb, with_refcounts,
					!with_refcounts && !img->disk_dirty)) < 0)
		return ret;
	return 0; /* wb->frees stays empty: the frees wait for a normal batch */
}

/* Does the running batch make req durable?  Every table and L1 entry req
 * mapped through is clean, so durable or in that batch, and the batch has a
 * sync still to submit, after req's data writes completed. */
static bool running_covers(struct qsm_image *img, struct qsm_req *req)
{
	struct qsm_req *job = img->wb_job;
	if (!job || !job->wb || !fua_targeted(req))
		return false;
	for (unsigned i = 0; i < req->nb_fua; i++)
		if (qsm_l2_is_dirty(&img->l2c, req->fua_l2[i]) || l1_maybe_dirty(img, req->fua_l1[i]))
			return false;
	switch (job->state) {
	case QSM_S_WB_REFBLOCKS:
	case QSM_S_WB_REFTABLE:
	case QSM_S_WB_HEADER:
	case QSM_S_WB_L2:
	case QSM_S_WB_L1:
		return true; /* its sync state follows */
	case QSM_S_WB_SYNC_DATA:
	case QSM_S_WB_SYNC_REFBLOCKS:
	case QSM_S_WB_SYNC_REFTABLE:
	case QSM_S_WB_SYNC_HEADER:
	case QSM_S_WB_SYNC_L2:
	case QSM_S_WB_SYNC_L1:
		/* This sync may have been submitted before req's data completed:
		 * only a later level's sync counts. */
		return next_level_event(job->wb, sync_level(job->state)) != QSM_E_WB_DONE;
	default:
		return false; /* collecting, releasing: no sync to come */
	}
}

/* Drop one reference of a freed cluster whose tables are durable.  With a
 * waiter, -EAGAIN when its refcount block must be read first. */
static int release_cluster(struct qsm_image *img, uint64_t cluster, struct qsm_rc_waiter *w)
{
	int r = qsm_refcount_update(img->rc, cluster, 1, -1, w);
	if (r == -EAGAIN)
		return r;
	if (r == -EUCLEAN)
		return qsm_image_rc_error(img, r);
	if (r < 0)
		return qsm_image_corrupt(img, "freeing cluster %#llx: refcount underflow",
					 (unsigned long long)(cluster << img->cluster_bits));
	return 0;
}

void qsm_wb_release_held(struct qsm_image *img)
{
	size_t n = 0;
	uint64_t v;
	for (size_t i = 0; i < img->nb_held_frees; i++) {
		uint64_t c = img->held_frees[i];
		if (qsm_host_io_busy(img, c))
			img->held_frees[n++] = c;
		else if (!qsm_refcount_peek(img->rc, c, &v))
			/* Its block is not cached and this I/O completion cannot
			 * wait: the next batch's WB_RELEASE frees it (its tables
			 * are durable already; a later free is only a later reuse). */
			(void)qsm_free_cluster_deferred(img, c << img->cluster_bits);
		else
			(void)release_cluster(img, c, NULL); /* a failure is sticky (corrupt) */
	}
	img->nb_held_frees = n;
}

/* WB_RELEASE: rules 4 and 5.  With a waiter (the batch's own request),
 * -EAGAIN when a refcount block must be read: call again, the frees already
 * made (wb->nb_released) are not made twice.  Without, blocking. */
static int wb_release(struct qsm_image *img, struct qsm_wb *wb, struct qsm_rc_waiter *w)
{
	int ret = 0;
	for (; wb->nb_released < wb->nb_frees; wb->nb_released++) {
		uint64_t c = wb->frees[wb->nb_released];
		if (qsm_host_io_busy(img, c)) {
			if (img->nb_held_frees == img->cap_held_frees) {
				size_t cap = img->cap_held_frees ? img->cap_held_frees * 2 : 16;
				uint64_t *h = realloc(img->held_frees, cap * sizeof(*h));
				if (!h)
					continue; /* a leak (check repairs it), never a reuse */
				img->held_frees = h;
				img->cap_held_frees = cap;
			}
			img->held_frees[img->nb_held_frees++] = c;
			continue;
		}
		int r = release_cluster(img, c, w);
		if (r == -EAGAIN)
			return r;
		if (r < 0 && !ret)
			ret = r;
	}
	if (wb->rc.table_moved) {
		int r = qsm_refcount_table_committed(img->rc, wb->rc.generation, w);
		if (r == -EAGAIN)
			return r;
		if (r < 0 && !ret)
			ret = r;
	}
	if (w)
		qsm_refcount_unpin(img->rc, w);
	return ret;
}

static void fail_waiters(struct qsm_wait **list, int ret);

/* Dirty refcount blocks hold their cache past refcount-cache-size: the
 * kick its trim gave (refcount_need_writeback, sm/image.c) during a batch,
 * from the frees WB_RELEASE made, must not be forgotten when it ends, or
 * the cache stays over its bound until some later write.  Lazy images
 * never write them before close. */
static bool refcounts_over_capacity(struct qsm_image *img)
{
	struct qsm_rc_stats st;
	if (img->lazy || !img->rc)
		return false;
	qsm_refcount_stats(img->rc, &st);
	return st.dirty && st.resident > st.capacity;
}

static void start_job(struct qsm_image *img)
{
	assert(!img->wb_job);
	if (img->error) {
		fail_waiters(&img->wb_next_waiters, img->error);
		img->wb_wanted = false;
		return;
	}
	struct qsm_wb *wb = calloc(1, sizeof(*wb));
	struct qsm_req *job = wb ? qsm_req_new(img, QSM_M_WRITEBACK, 0) : NULL;
	if (!job) {
		/* Cannot even start: fail those who wait rather than hang. */
		free(wb);
		fail_waiters(&img->wb_next_waiters, -ENOMEM);
		return;
	}
	job->wb = wb;
	wb->space_wanted = img->wb_wanted;
	img->wb_job = job;
	img->wb_wanted = false;
	img->stats.wb_batches++;
	qsm_sm_start(job);
}

/* How long a batch may wait for writethrough writes still in flight. */
#define QSM_GROUP_COMMIT_USEC 1000

void qsm_wb_maybe_start(struct qsm_image *img, bool now)
{
	/* Not once a close has written everything back (wb_closed): the io
	 * handle is about to go. */
	if (img->wb_closed || img->wb_job || (!img->wb_next_waiters && !img->wb_wanted))
		return;
	if (now || img->wb_wanted || img->wt_pending == 0) {
		event_del(img->wb_ev);
		start_job(img);
		return;
	}
	if (!event_pending(img->wb_ev, EV_TIMEOUT, NULL)) {
		struct timeval tv = { 0, QSM_GROUP_COMMIT_USEC };
		img->wb_recheck = false;
		event_add(img->wb_ev, &tv);
	}
}

void qsm_wb_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_image *img = arg;
	bool timeout = !img->wb_recheck;
	img->wb_recheck = false;
	qsm_wb_maybe_start(img, timeout);
	qsm_sm_drain(img);
}

/* Put req to sleep on `list` (a batch's waiters or wb_next_waiters); a
 * writethrough request asleep on a batch no longer counts as pending. */
static void wb_sleep_on(struct qsm_image *img, struct qsm_req *req, struct qsm_wait **list)
{
	req->wait.req = req;
	req->wait.next = *list;
	*list = &req->wait;
	req->waiting = true;
	if (req->wt_counted) {
		req->wt_counted = false;
		img->wt_pending--;
	}
}

void qsm_wb_join(struct qsm_image *img, struct qsm_req *req)
{
	if (running_covers(img, req)) {
		wb_sleep_on(img, req, &img->wb_job->wb->waiters);
		req->wait_for = img->wb_job->id;
	} else {
		wb_sleep_on(img, req, &img->wb_next_waiters);
	}
	qsm_wb_maybe_start(img, false);
}

/* FREE_WAIT: wait for the next batch, started at once when none runs (the
 * running one may have collected its tables before the free: the next one
 * releases every free made before it collects). */
void qsm_wb_join_next(struct qsm_image *img, struct qsm_req *req)
{
	wb_sleep_on(img, req, &img->wb_next_waiters);
	qsm_wb_maybe_start(img, true);
}

/* Is a cluster below `below` freed but not yet released by a batch (its
 * dropping L2 update maybe not durable)?  Frees held for data I/O in flight
 * (held_frees) are not counted: a batch does not release them. */
bool qsm_wb_free_pending_below(struct qsm_image *img, uint64_t below)
{
	for (size_t i = 0; i < img->nb_pending_frees; i++)
		if (img->pending_frees[i] < below)
			return true;
	struct qsm_wb *wb = img->wb_job ? img->wb_job->wb : NULL;
	for (size_t i = wb ? wb->nb_released : 0; wb && i < wb->nb_frees; i++)
		if (wb->frees[i] < below)
			return true;
	return false;
}

void qsm_wb_forget_waiters(struct qsm_image *img)
{
	struct qsm_wait **lists[2] = { &img->wb_next_waiters,
				       img->wb_job && img->wb_job->wb ? &img->wb_job->wb->waiters : NULL };
	for (int i = 0; i < 2; i++) {
		while (lists[i] && *lists[i]) {
			struct qsm_wait *w = *lists[i];
			*lists[i] = w->next;
			w->req->waiting = false;
			qsm_req_forget(w->req);
		}
	}
}

void qsm_wb_kick(struct qsm_image *img)
{
	img->wb_wanted = true;
	qsm_wb_maybe_start(img, true);
}

static void level_io_cb(struct qsm_io_req *io, int ret)
{
	struct wb_io *w = container_of(io, struct wb_io, io);
	struct qsm_req *job = w->job;
	struct qsm_image *img = job->img;
	if (w->l2)
		qsm_l2_written(&img->l2c, io->offset, ret);
	if (ret < 0 && !job->io_ret)
		job->io_ret = ret;
	if (--job->io_pending == 0) {
		if (job->io_ret)
			qsm_sm_post(job, QSM_E_ERROR, job->io_ret);
		else
			qsm_sm_post(job, QSM_E_IO_DONE, 0);
		qsm_sm_drain(img);
	}
}

static enum qsm_event write_level(struct qsm_req *job, int level)
{
	struct qsm_image *img = job->img;
	struct qsm_wb *wb = job->wb;
	struct qsm_meta_batch *b = level_batch(wb, level);
	assert(b->n > 0 && job->state == level_state[level]);
	if (img->corrupt) {
		/* Found while this batch ran: nothing more is written
		 * (sm/image.c, "Corruption"); the levels already written were
		 * complete and in the crash-safe order. */
		job->ret = -EIO;
		return QSM_E_ERROR;
	}
	free(wb->ios);
	wb->ios = calloc(b->n, sizeof(struct wb_io));
	if (!wb->ios)
		return QSM_E_ERROR;
	struct wb_io *ios = (struct wb_io *)wb->ios;
	job->io_pending = (unsigned)b->n;
	job->io_ret = 0;
	img->stats.meta_writes += b->n;
	for (size_t i = 0; i < b->n; i++) {
		struct qsm_meta_write *m = &b->w[i];
		ios[i].job = job;
		ios[i].l2 = is_l2_write(m);
		ios[i].io = (struct qsm_io_req){
			.op = QSM_IO_WRITE, .event = m->event, .offset = m->offset, .len = m->len,
			.iov = NULL, .iovcnt = 1, .cb = level_io_cb,
		};
	}
	/* One iovec per write, parallel to the batch. */
	struct iovec *iov = calloc(b->n, sizeof(*iov));
	if (!iov) {
		job->io_pending = 0;
		return QSM_E_ERROR;
	}
	free(job->iov_buf);
	job->iov_buf = iov;
	for (size_t i = 0; i < b->n; i++) {
		wb->l2_submitted += ios[i].l2; /* level_io_cb reports each written */
		iov[i] = (struct iovec){ b->w[i].buf, b->w[i].len };
		ios[i].io.iov = &iov[i];
		if (b->w[i].offset + b->w[i].len > img->file_end)
			img->file_end = b->w[i].offset + b->w[i].len;
		qsm_io_submit(img->io, &ios[i].io);
	}
	return QSM_E_WAIT;
}

/* After the sync that closes `level` (-1: WB_SYNC_DATA): the event naming
 * the next non-empty level below it in the order, or WB_DONE. */
static enum qsm_event next_level_event(struct qsm_wb *wb, int level)
{
	for (int l = level + 1; l < WBL__COUNT; l++)
		if (level_batch(wb, l)->n)
			return level_event[l];
	return QSM_E_WB_DONE;
}

static void sync_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_req *job = container_of(io, struct qsm_req, io);
	struct qsm_image *img = job->img;
	struct qsm_wb *wb = job->wb;
	if (ret < 0) {
		qsm_sm_post(job, QSM_E_ERROR, ret);
	} else {
		if (job->state == QSM_S_WB_SYNC_HEADER && wb->marks_dirty)
			img->disk_dirty = true; /* tables may now run ahead of refcounts */
		if (job->state == QSM_S_WB_SYNC_HEADER && wb->cleaning)
			img->disk_dirty = false; /* the clean header is durable */
		qsm_sm_post(job, next_level_event(wb, sync_level(job->state)), 0);
	}
	qsm_sm_drain(img);
}

/* Fail the requests a batch was to complete.  A close learns it with BROKEN
 * (it still writes the corrupt bit, sm/states.def), everyone else with ERROR. */
static void fail_waiters(struct qsm_wait **list, int ret)
{
	struct qsm_wait *w = *list;
	*list = NULL;
	while (w) {
		struct qsm_wait *next = w->next;
		struct qsm_req *req = w->req;
		req->waiting = false;
		if (req->machine == QSM_M_CLOSE) {
			if (!req->ret)
				req->ret = ret;
			qsm_sm_post(req, QSM_E_BROKEN, ret);
		} else {
			qsm_sm_post(req, QSM_E_ERROR, ret);
		}
		w = next;
	}
}

static void job_done(struct qsm_req *job, int ret)
{
	struct qsm_image *img = job->img;
	struct qsm_wb *wb = job->wb;
	/* Collected refcount blocks may be evicted again (or, after a failure,
	 * are dirty again: what the disk has is unknown). */
	if (img->rc)
		qsm_refcount_written(img->rc, wb->rc.generation, ret);
	if (ret < 0) {
		/* Tables collected but never submitted stay wb_busy, hence
		 * unevictable, until told: requests waiting for a cache slot
		 * would sleep forever. */
		if (wb->l2_submitted == 0)
			for (int l = 0; l < WBL__COUNT; l++) {
				struct qsm_meta_batch *b = level_batch(wb, l);
				for (size_t i = 0; i < b->n; i++)
					if (is_l2_write(&b->w[i]))
						qsm_l2_written(&img->l2c, b->w[i].offset, -EIO);
			}
		if (!img->error) {
			img->error = -EIO;
			snprintf(img->errmsg, sizeof(img->errmsg),
				 "metadata write-back failed (%s); the image accepts no more writes",
				 strerror(-ret));
		}
		/* Nothing dirty will ever be written now: requests that need a
		 * cache slot fail rather than wait (the dirty tables stay, so
		 * reads keep seeing acknowledged writes). */
		qsm_l2_cache_set_stuck(&img->l2c);
		fail_waiters(&wb->waiters, -EIO);
	} else {
		qsm_wake_all(&wb->waiters, QSM_E_WB_DONE, 0);
	}
	/* A closing image's full batch is its close's: no batch after it
	 * (the close goes on to truncate and release the io handle).  Until
	 * a snapshot operation the close waits for is over, its batches are
	 * the operation's. */
	if (wb->full && img->closing && !img->snap_req)
		img->wb_closed = true;
	wb_free(wb);
	job->wb = NULL;
	img->wb_job = NULL;
	qsm_image_corrupt_mark(img); /* it waited for this batch to end */
	if (img->wb_wanted && !qsm_l2_dirty_count(&img->l2c) && !refcounts_over_capacity(img))
		img->wb_wanted = false;
	/* Not at once: the requests just completed are often resubmitted by
	 * their callbacks, and should join this next batch (group commit). */
	if (img->wb_next_waiters || img->wb_wanted) {
		struct timeval tv = { 0, 0 };
		img->wb_recheck = true;
		event_add(img->wb_ev, &tv);
	}
}

static bool anything_dirty(struct qsm_image *img)
{
	if (img->raw)
		return false;
	return qsm_refcount_dirty(img->rc) || img->header_dirty || qsm_l2_dirty_count(&img->l2c) ||
	       img->l1_dirty_hi > img->l1_dirty_lo || img->nb_pending_frees;
}

/* WB_COLLECT: the requests to complete (first round), then the snapshot,
 * then the first level or sync. */
static enum qsm_event wb_step_collect(struct qsm_req *job)
{
	struct qsm_image *img = job->img;
	struct qsm_wb *wb = job->wb;
	int ret;
	if (wb->round == 0) {
		/* qsm_wb_join pushes at the head: turn the list round so the
		 * batch completes its requests in the order they joined (as
		 * QEMU, whose writes each flush in turn, completes them). */
		struct qsm_wait *w = img->wb_next_waiters, *rev = NULL;
		img->wb_next_waiters = NULL;
		while (w) {
			struct qsm_wait *next = w->next;
			w->next = rev;
			rev = w;
			w = next;
		}
		wb->waiters = rev;
		for (w = wb->waiters; w; w = w->next)
			w->req->wait_for = job->id; /* for traces: who completes them */
		wb->full = img->wb_full;
		img->wb_full = false;
		/* Targeted: FUA requests only (see the design block). */
		wb->targeted = wb->waiters && !wb->full && !wb->space_wanted &&
			       !img->header_dirty && !img->raw;
		for (w = wb->waiters; w && wb->targeted; w = w->next)
			wb->targeted = fua_targeted(w->req);
	} else {
		wb_reset(wb);
	}
	if ((ret = wb_collect(img, wb, wb->full)) < 0) {
		job->ret = ret;
		return QSM_E_ERROR;
	}
	if (QSM_MUTANT(EARLY_ACK) && wb->round == 0) /* mutant: acknowledged before any sync */
		qsm_wake_all(&wb->waiters, QSM_E_WB_DONE, 0);
	if (wb->blocks.n)
		return QSM_E_WB_BLOCKS;
	if (wb->marks_dirty)
		return QSM_E_WB_MARK_DIRTY;
	return wb->lazy_deferred ? QSM_E_WB_LAZY : QSM_E_WB_SYNCNOW;
}

/* WB_RELEASE: rules 4 and 5; a full batch may go round again. */
static enum qsm_event wb_step_release(struct qsm_req *job)
{
	struct qsm_image *img = job->img;
	struct qsm_wb *wb = job->wb;
	int ret;
	if ((ret = wb_release(img, wb, qsm_req_rcw(job))) == -EAGAIN)
		return qsm_rc_wait(job, QSM_E_LOADED);
	if (ret < 0) {
		job->ret = ret;
		return QSM_E_ERROR;
	}
	if (!wb->full || wb->round + 1 >= QSM_WB_MAX_ROUNDS)
		return QSM_E_FINISHED;
	if (anything_dirty(img)) {
		wb->round++; /* releasing frees dirtied refcount blocks again */
		return QSM_E_WB_ROUND;
	}
	if (img->disk_dirty && !wb->cleaning && !img->raw && !img->dirty_hold) {
		/* Everything, refcounts included, is durable: clear the bit. */
		img->hdr.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
		img->header_dirty = true;
		wb->cleaning = true;
		wb->round++;
		return QSM_E_WB_ROUND;
	}
	return QSM_E_FINISHED;
}

enum qsm_event qsm_wb_step(struct qsm_req *job, enum qsm_event ev, int ret)
{
	struct qsm_image *img = job->img;

	if (ev == QSM_E_FINISHED) { /* from req_complete: the batch is over */
		job_done(job, ret);
		return QSM_E_WAIT;
	}
	switch (job->state) {
	case QSM_S_WB_COLLECT:   return wb_step_collect(job);
	case QSM_S_WB_REFBLOCKS: return write_level(job, WBL_BLOCKS);
	case QSM_S_WB_REFTABLE:  return write_level(job, WBL_REFTABLE);
	case QSM_S_WB_HEADER:    return write_level(job, WBL_HEADER);
	case QSM_S_WB_L2:        return write_level(job, WBL_L2);
	case QSM_S_WB_L1:        return write_level(job, WBL_L1);
	case QSM_S_WB_SYNC_DATA:
	case QSM_S_WB_SYNC_REFBLOCKS:
	case QSM_S_WB_SYNC_REFTABLE:
	case QSM_S_WB_SYNC_HEADER:
	case QSM_S_WB_SYNC_L2:
	case QSM_S_WB_SYNC_L1:
		img->stats.io_flushes++;
		job->io = (struct qsm_io_req){
			.op = QSM_IO_FLUSH, .event = QSM_IO_EV_FLUSH, .cb = sync_cb,
		};
		qsm_io_submit(img->io, &job->io);
		return QSM_E_WAIT;
	case QSM_S_WB_RELEASE:   return wb_step_release(job);
	default:
		abort();
	}
}
