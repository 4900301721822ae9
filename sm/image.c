/*
 * sm/image.c: opening, closing and describing an image; the public submit
 * functions.
 *
 * Open validates everything before the first byte is written (a refused
 * image is never written): header (metadata/header.c), then the L1 table and
 * the refcount structure are read whole and kept resident.  Only then may a
 * read-write open rewrite the header (to clear autoclear bits).
 *
 * Contracts of the submit functions (sm/qsm.h): arguments are checked here
 * and a rejected request returns an error without a callback; an accepted
 * one always completes through the loop (qsm_sm_start posts its first event).
 */
#include <assert.h>
#include <errno.h>
#include <event2/event.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "metadata/compress.h"
#include "metadata/check.h"
#include "metadata/json_name.h"
#include "metadata/l1.h"
#include "metadata/l2entry.h"
#include "metadata/overlap.h"
#include "metadata/probe.h"
#include "sm/sm.h"

static struct qsm_overlap *meta_of(struct qsm_image *img);

/* --- image-level helpers used by the state machines ----------------------- */

/*
 * Corruption.  A request (or the write-back) that finds metadata no valid
 * image can hold (an entry past the end of the file, a data cluster over a
 * table, a refcount underflow) calls qsm_image_corrupt.  From then on:
 *  1. The request that found it fails with -EIO; so does every request
 *     already accepted when it reaches its next metadata step or data write
 *     (img->error, as after a failed metadata write).
 *  2. Writes, zero writes, compressed writes, discards and qsm_truncate are
 *     refused at submit with -ENOMEDIUM ("No medium found", what QEMU
 *     reports once its qcow2 driver has marked an image corrupt), flushes
 *     complete with -EIO (qsm.h), reads of intact mappings keep working and
 *     keep seeing acknowledged writes (dirty tables stay in the cache).
 *  3. Nothing more reaches the image but the corrupt bit: no write-back
 *     batch starts (start_job) and a running one stops before its next
 *     level (write_level), dirty L2 tables and refcount blocks are left
 *     unwritten, close writes nothing back, no space is preallocated, a
 *     lazy-refcounts image keeps its dirty bit.  What was written before
 *     detection stays: it was written in the crash-safe order, so the disk
 *     is at worst a leak plus the corruption that was found.
 *  4. The corrupt bit is written alone (8 bytes at header offset 72, then a
 *     flush), after any running batch (whose header level could otherwise
 *     land after it), so the image is never opened read-write again before
 *     a repair (open refuses it before even a lazy-refcounts repair).
 * A read-only image only records the message.  The first message is kept:
 * it names the cause, later findings are its consequences.
 */
int qsm_image_corrupt(struct qsm_image *img, const char *fmt, ...)
{
	if (!img->corrupt) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(img->errmsg, sizeof(img->errmsg), fmt, ap);
		va_end(ap);
	}
	if (img->read_only)
		return -EIO;
	if (!img->corrupt) {
		size_t n = strlen(img->errmsg);
		snprintf(img->errmsg + n, sizeof(img->errmsg) - n, "%s", QSM_CORRUPT_SUFFIX);
	}
	img->corrupt = true;
	if (!img->error)
		img->error = -EIO;
	if (!(img->hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
		img->hdr.incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
		img->corrupt_mark = QSM_MARK_PENDING;
		/* Dirty tables are never written now: a request waiting for a
		 * cache slot must not wait for a write-back that never comes. */
		qsm_l2_cache_set_stuck(&img->l2c);
		/* Fail those waiting for durability (start_job refuses). */
		qsm_wb_kick(img);
		qsm_image_corrupt_mark(img);
	}
	return -EIO;
}

int qsm_image_rc_error(struct qsm_image *img, int ret)
{
	uint64_t idx, off;

	if (ret != -EUCLEAN || !qsm_refcount_bad_entry(img->rc, &idx, &off))
		return ret;
	if (!off && img->rc_damage[0])
		return qsm_image_corrupt(img, "%s", img->rc_damage);
	if (!off) /* a block past the end of the file, met beyond what open foresaw */
		return qsm_image_corrupt(img, "Refblock of reftable index %#llx is past the end of the image file",
					 (unsigned long long)idx);
	return qsm_image_corrupt(img, "Refblock offset %#llx unaligned (reftable index: %#llx)",
				 (unsigned long long)off, (unsigned long long)idx);
}

void qsm_image_corrupt_bits(const struct qsm_image *img, uint8_t be[8])
{
	/* The in-memory dirty bit may be ahead of the disk's (lazy refcounts
	 * set it in the batch that writes it); the disk keeps its own. */
	uint64_t f = img->hdr.incompatible_features & ~QCOW2_INCOMPAT_DIRTY;
	if (img->disk_dirty)
		f |= QCOW2_INCOMPAT_DIRTY;
	qcow2_put_be64(be, f | QCOW2_INCOMPAT_CORRUPT);
}

static void corrupt_mark_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_image *img = container_of(io, struct qsm_image, corrupt_io);
	if (ret == 0 && io->op == QSM_IO_WRITE) {
		img->stats.io_flushes++;
		img->corrupt_io = (struct qsm_io_req){
			.op = QSM_IO_FLUSH, .event = QSM_IO_EV_FLUSH, .cb = corrupt_mark_cb,
		};
		qsm_io_submit(img->io, &img->corrupt_io);
		return;
	}
	/* Best effort: on failure the message still explains, and the image
	 * accepts no writes in this session. */
	img->corrupt_mark = QSM_MARK_DONE;
	if (img->close_req)
		qsm_close_wake(img); /* the close waits for this too */
}

void qsm_image_corrupt_mark(struct qsm_image *img)
{
	/* Not beside a batch (its header level would overwrite the bit). */
	if (img->corrupt_mark != QSM_MARK_PENDING || img->wb_job)
		return;
	img->corrupt_mark = QSM_MARK_BUSY;
	qsm_image_corrupt_bits(img, img->corrupt_be);
	img->corrupt_iov = (struct iovec){ img->corrupt_be, sizeof(img->corrupt_be) };
	img->stats.meta_writes++;
	img->corrupt_io = (struct qsm_io_req){
		.op = QSM_IO_WRITE, .event = QSM_IO_EV_HEADER_UPDATE, .offset = 72,
		.len = sizeof(img->corrupt_be), .iov = &img->corrupt_iov, .iovcnt = 1,
		.cb = corrupt_mark_cb,
	};
	qsm_io_submit(img->io, &img->corrupt_io);
}

void qsm_l1_set(struct qsm_image *img, uint64_t idx, uint64_t entry)
{
	qcow2_put_be64(img->l1 + idx * 8, entry);
	if (img->l1_dirty_hi == img->l1_dirty_lo) {
		img->l1_dirty_lo = idx;
		img->l1_dirty_hi = idx + 1;
	} else {
		img->l1_dirty_lo = QSM_MIN(img->l1_dirty_lo, idx);
		img->l1_dirty_hi = QSM_MAX(img->l1_dirty_hi, idx + 1);
	}
}

void qsm_note_l2_table(struct qsm_image *img, uint64_t host_offset)
{
	/* On ENOMEM the overlap check merely loses precision. */
	(void)qsm_overlap_add_l2(meta_of(img), host_offset);
}

bool qsm_is_metadata_not_l2(struct qsm_image *img, uint64_t host_offset)
{
	return qsm_overlap_is_meta_not_l2(meta_of(img), host_offset);
}

const char *qsm_metadata_kind(struct qsm_image *img, uint64_t host_offset)
{
	return qsm_overlap_kind(meta_of(img), host_offset);
}

bool qsm_is_metadata(struct qsm_image *img, uint64_t host_offset)
{
	return qsm_overlap_is_meta(meta_of(img), host_offset);
}

/*
 * A refcount as QEMU reads it at open: a damaged block (past the end of the
 * file, or a table not read) reads as zeros.  -EUCLEAN for an unaligned
 * block (found at use, R9 of metadata/refcount.c).
 */
static int open_refcount(struct qsm_image *img, uint64_t cluster, uint64_t *v)
{
	int ret = qsm_refcount_read(img->rc, cluster, v, NULL);
	if (ret == -EUCLEAN && qsm_refcount_damage_of(img->rc, cluster) == 1) {
		*v = 0;
		return 0;
	}
	return ret;
}

/* The lowest cluster at or after `from` whose refcount reads 0 (QEMU's
 * allocator's first choice), or a negative errno (-EUCLEAN: an unaligned
 * block on the way, nothing can be said). */
static int64_t first_free(struct qsm_image *img, uint64_t from)
{
	uint64_t limit = img->open_size / img->cluster_size + 1, v;
	for (uint64_t c = from; c <= limit; c++) {
		int ret = open_refcount(img, c, &v);
		if (ret < 0)
			return ret;
		if (v == 0)
			return (int64_t)c;
	}
	return (int64_t)limit; /* (the file's end: never metadata) */
}

/*
 * Damaged refcounts, QEMU's way.  QEMU opens an image whose metadata has
 * refcount 0 (or whose refcount blocks or table lie past the end of the
 * file or over the header, read as zeros), reads it, and finds the damage
 * at its first cluster allocation: it takes the lowest cluster with
 * refcount 0, F; when F's range has no refcount block it first places one
 * at the next such cluster, G, and writes it; then it writes the new table
 * at F.  The first of those writes that meets metadata trips its overlap
 * check: "Preventing invalid write on metadata (overlaps with KIND)", the
 * image is marked corrupt and nothing else is written.
 *
 * qsm opens such an image too when that first write is over metadata (F is
 * metadata): the block covering F is made damaged (metadata/refcount.c R9),
 * so the first allocation, or any refcount change there, fails and marks
 * the image corrupt with the reason computed here (img->rc_damage, given by
 * qsm_image_rc_error) before anything is written.  Reads, and writes into
 * clusters already allocated, work as in QEMU.  Where F is not metadata
 * QEMU's allocation would succeed and go on over damaged refcounts; qsm
 * refuses such an image (a qsm rule) unless only blocks past the end of
 * the file are damaged, which then fail where they are used.
 */
static int plan_damage(struct qsm_image *img, const char *what, char *err, size_t errlen)
{
	uint64_t cs = img->cluster_size;
	int64_t f = first_free(img, 0), g = -1;
	int dmg = f >= 0 ? qsm_refcount_damage_of(img->rc, (uint64_t)f) : -1;

	if (f >= 0 && qsm_is_metadata(img, (uint64_t)f * cs) && dmg >= 0) {
		if (dmg == 0) { /* QEMU writes a new block at G first */
			g = first_free(img, (uint64_t)f + 1);
			qsm_refcount_mark_damaged(img->rc, (uint64_t)f);
		}
		uint64_t at = g >= 0 && qsm_is_metadata(img, (uint64_t)g * cs) ? (uint64_t)g : (uint64_t)f;
		snprintf(img->rc_damage, sizeof(img->rc_damage),
			 "Preventing invalid write on metadata (overlaps with %s)",
			 qsm_metadata_kind(img, at * cs));
		return 0;
	}
	if (!what)
		return 0;
	snprintf(err, errlen, "refcount of the %s is 0: the refcount structure is damaged "
		 "(repair it with qemu-img check -r all, or open read-only)", what);
	return -EINVAL;
}

/*
 * Before a read-write open: every cluster the header and L1 name as metadata
 * must be refcounted, or the allocator would hand it out and guest data
 * would overwrite it.  Such an image needs a repair, not a write (or, as
 * QEMU, a corrupt mark at the first allocation: plan_damage).  The header,
 * L1 and refcount table are checked (their refcount blocks are read:
 * usually just the first); L2 tables only where their block is cached
 * already, since reading every block would make open cost grow with the
 * image.  An L2 table elsewhere with refcount 0 is caught when the allocator
 * returns it (qsm_is_metadata: the image is then marked corrupt).
 */
static int check_metadata_refcounts(struct qsm_image *img, char *err, size_t errlen)
{
	const struct qcow2_header *h = &img->hdr;
	uint64_t cs = img->cluster_size;
	struct { const char *what; uint64_t off, len; } spans[] = {
		{ "header cluster", 0, cs },
		{ "L1 table cluster", h->l1_table_offset, img->l1_size * 8 },
		{ "refcount table cluster", h->refcount_table_offset, (uint64_t)h->refcount_table_clusters * cs },
	};
	char l2what[96];
	for (size_t i = 0; i < QSM_ARRAY_SIZE(spans); i++) {
		if (!spans[i].len)
			continue;
		for (uint64_t off = QSM_ALIGN_DOWN(spans[i].off, cs); off < spans[i].off + spans[i].len; off += cs) {
			uint64_t v;
			if (off >= img->open_size)
				break; /* (a refcount table past the end: damaged) */
			int ret = open_refcount(img, off / cs, &v);
			if (ret == -EUCLEAN)
				continue; /* unaligned refcount block: found at use */
			if (ret < 0) {
				snprintf(err, errlen, "cannot read the refcount of the %s: %s",
					 spans[i].what, strerror(-ret));
				return ret;
			}
			if (v == 0)
				return plan_damage(img, spans[i].what, err, errlen);
		}
	}
	for (uint64_t i = 0; i < img->l1_size; i++) {
		uint64_t off = qsm_l1_get(img, i) & QCOW2_L1E_OFFSET_MASK, v;
		if (off && QSM_IS_ALIGNED(off, cs) && qsm_refcount_peek(img->rc, off / cs, &v) && v == 0) {
			snprintf(l2what, sizeof(l2what), "L2 table %#llx (L1 entry %llu)",
				 (unsigned long long)off, (unsigned long long)i);
			return plan_damage(img, l2what, err, errlen);
		}
	}
	return qsm_refcount_damaged(img->rc) ? plan_damage(img, NULL, err, errlen) : 0;
}

/* --- space reserved ahead of the allocator -------------------------------- */

static void prealloc_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_image *img = container_of(io, struct qsm_image, prealloc_io);
	/* Advisory: on failure the data writes simply extend the file. */
	img->prealloc_busy = false;
	if (img->close_req)
		qsm_close_wake(img); /* the close waits for this too */
}

/*
 * Extending a file with one O_DIRECT write per new cluster serializes them
 * in the file system (ext4 takes the inode lock exclusively to extend), so
 * qsm keeps a reserved, already-sized region ahead of the allocator, in
 * chunks of 1/8 of the file (1 to 64 MiB).  QSM_IO_PREALLOC never changes
 * contents, so it may run beside writes into the same range.  A clean close
 * gives back what was not used.
 */
void qsm_prealloc_ahead(struct qsm_image *img, uint64_t end)
{
	if (img->read_only || img->prealloc_busy || img->error)
		return;
	uint64_t chunk = QSM_MIN(64ull << 20, QSM_MAX(1ull << 20, img->prealloc_end / 8));
	chunk = QSM_ALIGN_UP(chunk, img->cluster_size);
	if (end + chunk / 2 <= img->prealloc_end)
		return;
	uint64_t from = QSM_MAX(img->prealloc_end, img->file_end);
	uint64_t to = QSM_ALIGN_UP(QSM_MAX(end, from) + chunk, chunk);
	img->prealloc_busy = true;
	img->prealloc_end = to;
	img->prealloc_io = (struct qsm_io_req){
		.op = QSM_IO_PREALLOC, .event = QSM_IO_EV_CLUSTER_ALLOC,
		.offset = from, .len = to - from, .cb = prealloc_cb,
	};
	qsm_io_submit(img->io, &img->prealloc_io);
}

/* --- open / close -------------------------------------------------------- */

struct qsm_image_priv {
	struct qsm_image img;
	struct qsm_overlap meta; /* host clusters holding metadata */
};

static struct qsm_overlap *meta_of(struct qsm_image *img)
{
	return &container_of(img, struct qsm_image_priv, img)->meta;
}

int qsm_image_meta_rebuild(struct qsm_image *img)
{
	struct qsm_overlap *o = meta_of(img);
	qsm_overlap_release(o);
	qsm_overlap_init(o, img->cluster_bits, img->rc);
	qsm_overlap_set_l1(o, img->hdr.l1_table_offset, img->l1_size);
	qsm_overlap_set_snapshots(o, img->hdr.snapshots_offset, img->snaps.size);
	qsm_overlap_set_bitmap_dir(o, img->bitmaps.ext.dir_offset, img->bitmaps.ext.dir_size);
	for (uint64_t i = 0; i < img->l1_size; i++) {
		uint64_t off = qsm_l1_get(img, i) & QCOW2_L1E_OFFSET_MASK;
		int ret = off ? qsm_overlap_add_l2(o, off) : 0;
		if (ret < 0)
			return ret;
	}
	return 0;
}

static void run_cb(evutil_socket_t fd, short what, void *arg)
{
	qsm_sm_drain(arg);
}

static void cache_need_writeback(void *opaque)
{
	qsm_wb_kick(opaque);
}

/* Dirty refcount blocks keep their cache over its capacity.  With lazy
 * refcounts no batch writes them before close: they stay. */
static void refcount_need_writeback(void *opaque)
{
	struct qsm_image *img = opaque;
	if (!img->lazy)
		qsm_wb_kick(img);
}

static void image_free(struct qsm_image *img, bool abandon)
{
	struct qsm_image_priv *p = container_of(img, struct qsm_image_priv, img);
	/* First: joins the workers, so none touches a request's buffers (an
	 * abandoned image may have jobs outstanding). */
	qsm_work_pool_free(img->work);
	img->work = NULL;
	/* Then, when abandoning, the I/O in flight on this image and on its
	 * backing chain (a backing read fills our buffers): each handle's
	 * backend finishes or cancels what it started before anything it may
	 * write into (tables, bounce buffers, requests) is freed below; no
	 * completion of it ever runs (qsm_io_abandon). */
	if (abandon) {
		for (struct qsm_image *b = img; b; b = b->backing) {
			qsm_work_pool_free(b->work);
			b->work = NULL;
			qsm_io_abandon(b->io);
			b->io = NULL;
		}
	}
	if (abandon)
		qsm_l2_cache_abandon(&img->l2c);
	else
		qsm_l2_cache_destroy(&img->l2c);
	if (img->rc)
		qsm_refcount_free(img->rc);
	if (img->run_ev)
		event_free(img->run_ev);
	if (img->wb_ev)
		event_free(img->wb_ev);
	if (img->close_ev)
		event_free(img->close_ev);
	if (img->io)
		qsm_io_close(img->io);
	if (img->backing) {
		/* Read-only, never written back: nothing to lose.  Its requests
		 * were all issued by ours, which have completed (a close drains
		 * them first). */
		assert(abandon || img->backing->in_flight == 0);
		image_free(img->backing, abandon);
	}
	qcow2_header_release(&img->hdr);
	qcow2_snapshots_release(&img->snaps);
	qsm_bitmaps_release(img);
	qcow2_bitmap_dir_release(&img->bitmaps);
	free(img->l1);
	free(img->sector0);
	free(img->l1_disk);
	free(img->zero_buf);
	free(img->pending_frees);
	free(img->held_frees);
	qsm_overlap_release(&p->meta);
	free(p);
}

#define OPEN_FAIL(code, ...)                                                   \
	do {                                                                   \
		if (err)                                                       \
			snprintf(err, errlen, __VA_ARGS__);                    \
		ret = (code);                                                  \
		goto fail;                                                     \
	} while (0)

int qsm_file_rd(void *opaque, void *buf, size_t len, uint64_t off)
{
	const struct qsm_file_src *src = opaque;
	size_t n = off < src->fsize ? (size_t)QSM_MIN(src->fsize - off, (uint64_t)len) : 0;
	int ret = n ? qsm_io_pread_sync(src->io, buf, n, off) : 0;

	if (ret >= 0 && n < len)
		memset((uint8_t *)buf + n, 0, len - n);
	return ret < 0 ? ret : 0;
}

/* Read and validate the snapshot table: QEMU's refusals in its words, then
 * qsm's per-entry rules (metadata/snapshot.h), each naming the snapshot and
 * the field.  Runs before anything is written. */
static int read_snapshots(struct qsm_image *img, uint64_t fsize, char *err, size_t errlen)
{
	const struct qcow2_header *h = &img->hdr;
	struct qsm_file_src src = { img->io, fsize };
	char why[512] = "";
	int ret;

	ret = qcow2_snapshots_read(qsm_file_rd, &src, h->snapshots_offset, h->nb_snapshots, h->size,
				   &img->snaps, why, sizeof(why));
	if (ret < 0) {
		if (err && why[0])
			snprintf(err, errlen, "%s", why);
		else if (err)
			snprintf(err, errlen, "cannot read the snapshot table: %s", strerror(-ret));
		return ret;
	}
	for (uint32_t i = 0; i < img->snaps.nb; i++) {
		ret = qcow2_snapshot_validate(&img->snaps.sn[i], i, h, fsize, err, errlen);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* The bitmaps extension, directory and the tables of the bitmaps not in
 * use, refused as QEMU's open refuses them (metadata/bitmap.h), before
 * anything is written.  An extension autoclear bit 0 calls invalid is
 * dropped: no header qsm writes carries it again (QEMU's nb_bitmaps 0). */
static int read_bitmaps(struct qsm_image *img, uint64_t fsize, char *err, size_t errlen)
{
	struct qcow2_header *h = &img->hdr;
	struct qsm_file_src src = { img->io, fsize };
	bool found;
	int ret = qcow2_bitmaps_read(qsm_file_rd, &src, h, h->size, true, &img->bitmaps, &found, err,
				     errlen);
	if (ret == 0 && !found)
		img->bitmaps_ext_dropped = qcow2_header_drop_ext(h, QCOW2_EXT_BITMAPS) > 0;
	return ret;
}

int qsm_l1_read(struct qsm_image *img, uint64_t offset, uint64_t entries, uint64_t room,
		uint8_t **out)
{
	size_t bytes = (size_t)QSM_ALIGN_UP(QSM_MAX(QSM_MAX(entries, room) * 8, 8), img->cluster_size);
	uint8_t *l1;
	if (posix_memalign((void **)&l1, 4096, bytes))
		return -ENOMEM;
	memset(l1, 0, bytes);
	int ret = entries ? qsm_io_pread_sync(img->io, l1, entries * 8, offset) : 0;
	if (ret < 0) {
		free(l1);
		return ret;
	}
	*out = l1;
	return 0;
}

/* Open time, read-only: the snapshot's L1 table and size replace the active
 * ones (QEMU's qcow2_snapshot_load_tmp), so every read sees its disk. */
static int load_snapshot(struct qsm_image *img, const char *id, const char *name, char *err,
			 size_t errlen)
{
	int i = qcow2_snapshot_find_id_and_name(&img->snaps, id, name);
	if (!img->read_only) {
		if (err)
			snprintf(err, errlen, "a snapshot can be opened read-only only");
		return -EINVAL;
	}
	if (i < 0) {
		if (err)
			snprintf(err, errlen, "Can't find snapshot");
		return -ENOENT;
	}
	const struct qcow2_snapshot *sn = &img->snaps.sn[i];
	if (sn->l1_size < qcow2_l1_entries_for(sn->disk_size, img->cluster_bits)) {
		if (err)
			snprintf(err, errlen, "Snapshot %s: its L1 table (%u entries) does not cover its "
				 "disk size %llu", sn->id, sn->l1_size, (unsigned long long)sn->disk_size);
		return -EINVAL;
	}
	uint8_t *l1;
	int ret = qsm_l1_read(img, sn->l1_table_offset, sn->l1_size, 0, &l1);
	if (ret < 0) {
		if (err)
			snprintf(err, errlen, "cannot read the snapshot's L1 table: %s", strerror(-ret));
		return ret;
	}
	free(img->l1);
	img->l1 = l1;
	img->l1_size = sn->l1_size;
	img->hdr.l1_table_offset = sn->l1_table_offset;
	img->hdr.l1_size = sn->l1_size;
	img->hdr.size = sn->disk_size;
	qsm_wb_l1_loaded(img);
	return 0;
}

/* sm.h */
int qsm_header_write_sync(struct qsm_image *img)
{
	uint8_t *buf = calloc(1, img->cluster_size);
	if (!buf)
		return -ENOMEM;
	int ret = qcow2_header_serialize(&img->hdr, buf, img->cluster_size);
	if (ret == 0)
		ret = qsm_io_pwrite_sync(img->io, buf, img->cluster_size, 0);
	if (ret == 0)
		ret = qsm_io_flush_sync(img->io);
	free(buf);
	return ret;
}

/*
 * A read-write open's header work: qsm keeps no autoclear feature but
 * bitmaps (bit 0), so the others are cleared, as the spec asks of a writer
 * that does not know them.  Every enabled ("auto") bitmap not already in
 * use is tracked (sm/bitmaps.c): marked in use, as QEMU marks the bitmaps
 * it records into, until the close stores it back and clears the mark.
 * Disabled bitmaps are left as they are: writes do not change them.  A
 * voided extension (read_bitmaps) leaves the header now, as in QEMU.  In
 * QEMU's order (update_ext_header_and_dir_in_place): the header with bit 0
 * clear, flushed; the directory rewritten in place; the header with bit 0
 * set, flushed.  A crash between leaves bit 0 clear: every bitmap reads as
 * invalid then, never as consistent.
 */
static int bitmaps_open_rw(struct qsm_image *img)
{
	struct qcow2_header *h = &img->hdr;
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	uint64_t keep = d->ext.nb ? QCOW2_AUTOCLEAR_BITMAPS : 0;
	int ret;

	if (d->ext.nb && !(img->tracked = calloc(d->ext.nb, sizeof(*img->tracked))))
		return -ENOMEM;
	for (uint32_t i = 0; i < d->ext.nb; i++)
		if ((d->bm[i].flags & (QCOW2_BITMAP_AUTO | QCOW2_BITMAP_IN_USE)) == QCOW2_BITMAP_AUTO)
			img->tracked[img->nb_tracked++].index = i;
	bool mark = img->nb_tracked > 0;
	if (!mark) {
		if (h->autoclear_features == keep && !img->bitmaps_ext_dropped)
			return 0;
		h->autoclear_features = keep;
		return qsm_header_write_sync(img);
	}
	h->autoclear_features = 0;
	if ((ret = qsm_header_write_sync(img)) < 0)
		return ret;
	for (uint32_t i = 0; i < img->nb_tracked; i++) {
		uint32_t x = img->tracked[i].index;
		qcow2_bitmap_set_flags(d, x, d->bm[x].flags | QCOW2_BITMAP_IN_USE);
	}
	if ((ret = qsm_io_pwrite_sync(img->io, d->raw, d->ext.dir_size, d->ext.dir_offset)) < 0)
		return ret;
	h->autoclear_features = QCOW2_AUTOCLEAR_BITMAPS;
	if ((ret = qsm_header_write_sync(img)) < 0)
		return ret;
	qsm_bitmaps_load(img);
	return 0;
}

/*
 * Backing chains.  Every image of a chain opened by path is identified by
 * device and inode, so a chain that comes back to one of its images (a loop,
 * by any name) is refused, as is a chain deeper than QSM_MAX_CHAIN.
 */
#define QSM_MAX_CHAIN 64
struct chain {
	struct {
		dev_t dev;
		ino_t ino;
	} id[QSM_MAX_CHAIN];
	unsigned n;
	unsigned depth; /* images opened so far, for the depth limit */
};

static int open_io(struct event_base *base, struct qsm_io *io, const struct qsm_open_opts *opts,
		   const char *path, struct chain *ch, struct qsm_image **out, char *err,
		   size_t errlen);
static int open_path(struct event_base *base, const char *path, const struct qsm_open_opts *opts,
		     struct chain *ch, struct qsm_image **out, char *err, size_t errlen);
static int open_backing_named(struct qsm_image *img, const char *path,
			      const struct qsm_open_opts *opts, struct chain *ch, const char *name,
			      const char *fmt, const char *file, bool no_backing, char *err,
			      size_t errlen);

/* name resolved as QEMU does: relative to the directory of the image that
 * names it (`path`), or to the current directory when the image was opened
 * from an I/O handle (path NULL). */
static char *backing_path(const char *path, const char *name)
{
	const char *slash = path ? strrchr(path, '/') : NULL;
	if (name[0] == '/' || !slash)
		return strdup(name);
	size_t dlen = (size_t)(slash - path) + 1, nlen = strlen(name);
	char *r = malloc(dlen + nlen + 1);
	if (r) {
		memcpy(r, path, dlen);
		memcpy(r + dlen, name, nlen + 1);
	}
	return r;
}

/*
 * A backing file name `json:{...}` (qemu-img create -b 'json:{...}'), as
 * QEMU reads it: the options of the backing image, flattened.  qsm takes
 * driver (qcow2 or raw: it wins over the recorded format, as in QEMU),
 * file.driver (file, host_device, host_cdrom), file.filename or filename
 * (taken as it is: QEMU does not resolve a json: name's file against the
 * image's directory), "backing": null (the backing image opened alone),
 * node-name, and the cache tunings (l2-cache-size, cache-size,
 * refcount-cache-size, l2-cache-entry-size, cache-clean-interval: checked
 * by QEMU, here inherited from the image above, so ignored); anything else
 * is refused by name.  Still never probed: no driver and no recorded
 * format is refused as for any name.
 */
struct json_backing {
	char *driver, *filename;
	bool no_backing;
	char *err;
	size_t errlen;
};

static int json_backing_cb(void *opaque, const char *key, const char *val, bool null)
{
	struct json_backing *jb = opaque;
	static const char *const ignored[] = {
		"node-name", "l2-cache-size", "cache-size", "refcount-cache-size",
		"l2-cache-entry-size", "cache-clean-interval", "file.node-name",
	};
	char **slot = NULL;

	if (!strcmp(key, "backing") && null) {
		jb->no_backing = true;
		return 0;
	}
	if (null)
		return 0; /* QEMU drops a null it has no use for */
	if (!strcmp(key, "driver"))
		slot = &jb->driver;
	else if (!strcmp(key, "file.filename") || !strcmp(key, "filename"))
		slot = &jb->filename;
	if (slot) {
		free(*slot);
		return (*slot = strdup(val)) ? 0 : -ENOMEM;
	}
	if (!strcmp(key, "file.driver")) {
		if (strcmp(val, "file") && strcmp(val, "host_device") && strcmp(val, "host_cdrom")) {
			snprintf(jb->err, jb->errlen, "protocol '%s' is not supported (file, "
				 "host_device, host_cdrom)", val);
			return -ENOTSUP;
		}
		return 0;
	}
	for (size_t i = 0; i < sizeof(ignored) / sizeof(ignored[0]); i++)
		if (!strcmp(key, ignored[i]))
			return 0;
	snprintf(jb->err, jb->errlen, "option '%s' is not supported by qsm", key);
	return -ENOTSUP;
}

/*
 * Open img's backing file: read-only, never repaired, on the same loop with
 * the same cache mode and aio backend, and recursively its own backing file.
 * The format comes from the backing-format extension, else from
 * opts->backing_format; it is never probed (a raw file could hold a qcow2
 * header that names any file on the host).  Errors name the backing file;
 * one that fails to open says so as QEMU does ("Could not open backing
 * file: " and the backing file's own error, which names it).
 */
static int open_backing(struct qsm_image *img, const char *path, const struct qsm_open_opts *opts,
			struct chain *ch, char *err, size_t errlen)
{
	const char *name = img->hdr.backing_file;
	const char *fmt = img->hdr.backing_format[0] ? img->hdr.backing_format : opts->backing_format;
	char sub[512] = "";
	struct json_backing jb = { .err = sub, .errlen = sizeof(sub) };
	int ret;

	if (!strncmp(name, "json:", 5)) {
		ret = qcow2_json_name_parse(name + 5, json_backing_cb, &jb, sub, sizeof(sub));
		if (ret == 0 && !jb.filename) {
			snprintf(sub, sizeof(sub), "it names no file (file.filename)");
			ret = -EINVAL;
		}
		if (ret < 0) {
			qsm_set_err(err, errlen, "backing file '%s': %s", name, sub);
			free(jb.driver);
			free(jb.filename);
			return ret;
		}
		if (jb.driver)
			fmt = jb.driver;
	}
	ret = open_backing_named(img, path, opts, ch, name, fmt, jb.filename, jb.no_backing, err,
				 errlen);
	free(jb.driver);
	free(jb.filename);
	return ret;
}

/* open_backing, the name understood: fmt the format, file the file name of
 * a json: name (taken as it is) or NULL (name, resolved against path). */
static int open_backing_named(struct qsm_image *img, const char *path,
			      const struct qsm_open_opts *opts, struct chain *ch, const char *name,
			      const char *fmt, const char *file, bool no_backing, char *err,
			      size_t errlen)
{
	char sub[512] = "";
	int ret;

	if (!fmt || !fmt[0]) {
		qsm_set_err(err, errlen, "backing file '%s': its format is not recorded in the image "
			    "and was not given (qsm never probes formats: give it, e.g. "
			    "qsm io --backing-format qcow2|raw, or rebase with qemu-img rebase -F)", name);
		return -EINVAL;
	}
	if (strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
		qsm_set_err(err, errlen, "backing file '%s': format '%s' is not supported (qcow2 or raw)",
			    name, fmt);
		return -ENOTSUP;
	}
	char *full = file ? strdup(file) : backing_path(path, name);
	struct stat st;
	if (!full)
		return -ENOMEM;
	if (ch->depth >= QSM_MAX_CHAIN) {
		qsm_set_err(err, errlen, "backing chain longer than %d images: '%s' has "
			    "the backing file '%s'", QSM_MAX_CHAIN, path ? path : "the image", full);
		free(full);
		return -ELOOP;
	}
	if (!opts->open_backing_io && stat(full, &st) == 0) {
		for (unsigned i = 0; i < ch->n; i++) {
			if (ch->id[i].dev == st.st_dev && ch->id[i].ino == st.st_ino) {
				qsm_set_err(err, errlen, "backing chain loop: '%s', the backing file of "
					    "'%s', is image %u of the chain again", full,
					    path ? path : "the image", i + 1);
				free(full);
				return -ELOOP;
			}
		}
	}
	struct qsm_open_opts bo = {
		.read_only = true, .no_repair = true, .cache = opts->cache, .aio = opts->aio,
		.l2_cache_size = opts->l2_cache_size, .format = fmt,
		.refcount_cache_size = opts->refcount_cache_size,
		.work_threads = opts->work_threads,
		.open_backing_io = opts->open_backing_io,
		.open_backing_opaque = opts->open_backing_opaque,
		.no_backing = no_backing,
	};
	if (opts->open_backing_io) {
		struct qsm_io *io;
		ret = opts->open_backing_io(opts->open_backing_opaque, img->base, name, full,
					    QSM_IO_RDONLY, &io);
		if (ret == 0)
			ret = open_io(img->base, io, &bo, full, ch, &img->backing, sub, sizeof(sub));
		else
			snprintf(sub, sizeof(sub), "Could not open '%s': %s", full, strerror(-ret));
	} else {
		ret = open_path(img->base, full, &bo, ch, &img->backing, sub, sizeof(sub));
	}
	if (ret == -ELOOP) /* the message names both images already */
		qsm_set_err(err, errlen, "%s", sub);
	else if (ret < 0) /* QEMU's words (bdrv_open_backing_file) */
		qsm_set_err(err, errlen, "Could not open backing file: %s",
			    sub[0] ? sub : strerror(-ret));
	free(full);
	return ret;
}

/*
 * The open-time repair of a dirty image (QEMU's qcow2_do_open runs its check
 * with both fix flags): the check's findings, one line each, go to
 * opts->repair_log when there is one.  The check writes them to a memory
 * stream; the lines are handed over once it is done (the open is blocking
 * anyway), so the library itself never prints.  0 or -errno as
 * qsm_check_image.
 */
static int repair_dirty(struct qsm_io *io, const struct qsm_open_opts *opts,
			struct qsm_check_result *res, char *err, size_t errlen)
{
	const unsigned fix = QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS | QSM_CHECK_OPENING;
	char *text = NULL;
	size_t len = 0;
	FILE *log = NULL;

	if (opts->repair_log && !(log = open_memstream(&text, &len))) {
		qsm_set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	int ret = qsm_check_image(io, fix, res, log, err, errlen);
	if (!log)
		return ret;
	if (fclose(log) != 0) {
		free(text);
		if (ret < 0)
			return ret;
		qsm_set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	for (char *line = text, *nl; line && *line; line = nl ? nl + 1 : NULL) {
		if ((nl = strchr(line, '\n')))
			*nl = 0;
		opts->repair_log(opts->repair_log_opaque, line);
	}
	free(text);
	return ret;
}

/*
 * Probe io's format (metadata/probe.h) from its first bytes, read into buf
 * (QCOW2_PROBE_BYTES, zero padded past the end of a shorter file): "qcow2"
 * or "raw", or -ENOTSUP naming the other format found.  Blocking.
 */
static int probe_io(struct qsm_io *io, const char *name, uint8_t *buf, const char **fmt,
		    char *err, size_t errlen)
{
	uint64_t fsize;
	int ret = qsm_io_get_size(io, &fsize);
	size_t n = (size_t)QSM_MIN(ret < 0 ? 0 : fsize, QCOW2_PROBE_BYTES);
	memset(buf, 0, QCOW2_PROBE_BYTES);
	if (ret == 0 && n)
		ret = qsm_io_pread_sync(io, buf, n, 0);
	if (ret < 0) {
		qsm_set_err(err, errlen, "cannot read the image to probe its format: %s",
			    strerror(-ret));
		return ret;
	}
	*fmt = qcow2_probe_format(buf, n, name);
	if (strcmp(*fmt, "raw") && strcmp(*fmt, "qcow2")) {
		qsm_set_err(err, errlen, "Image format '%s' (probed) is not supported by qsm "
			    "(it opens qcow2 and raw images)", *fmt);
		return -ENOTSUP;
	}
	return 0;
}

int qsm_probe_format(struct qsm_io *io, const char *name, const char **format, char *err,
		     size_t errlen)
{
	uint8_t buf[QCOW2_PROBE_BYTES];
	if (err && errlen)
		err[0] = 0;
	if (!io || !format)
		return -EINVAL;
	return probe_io(io, name, buf, format, err, errlen);
}

static int open_io(struct event_base *base, struct qsm_io *io, const struct qsm_open_opts *opts,
		   const char *path, struct chain *ch, struct qsm_image **out, char *err,
		   size_t errlen)
{
	static const struct qsm_open_opts defaults;
	struct qsm_image_priv *p = calloc(1, sizeof(*p));
	struct qsm_image *img = &p->img;
	uint8_t *buf = NULL;
	uint64_t fsize;
	int ret;

	if (!opts)
		opts = &defaults;
	if (err && errlen)
		err[0] = 0;
	if (opts->cache == QSM_CACHE_UNSAFE)
		io->flags |= QSM_IO_NO_FLUSH; /* no fdatasync at all, as QEMU */
	if (!p) {
		qsm_io_close(io);
		return -ENOMEM;
	}
	img->meta_prealloc = -1; /* decided at the first block status */
	if (opts->no_backing && !opts->read_only) {
		free(p);
		qsm_io_close(io);
		if (err)
			snprintf(err, errlen, "opening without the backing file is allowed read-only only "
				 "(writes would copy from the wrong data)");
		return -EINVAL;
	}
	ch->depth++;
	img->base = base;
	img->io = io;
	img->read_only = opts->read_only || (io->flags & QSM_IO_RDONLY);
	if (opts->copy_on_read && img->read_only)
		OPEN_FAIL(-EINVAL, "Can't use copy-on-read on read-only device");
	img->copy_on_read = opts->copy_on_read;
	img->cache = opts->cache;
	img->work_threads = opts->work_threads;
	img->q_tail = &img->q_head;
	if (opts->work_threads < QSM_WORK_INLINE || opts->work_threads > QSM_WORK_MAX_THREADS)
		OPEN_FAIL(-EINVAL, "work_threads %d is out of range (-1 to %d)", opts->work_threads,
			  QSM_WORK_MAX_THREADS);

	if ((ret = qsm_io_get_size(io, &fsize)) < 0)
		OPEN_FAIL(ret, "cannot get the image size: %s", strerror(-ret));

	/* The format is given, or probed only when the caller asks (a raw file
	 * may hold a qcow2 header written by a guest). */
	const char *fmt = opts->format ? opts->format : "qcow2";
	if (!opts->format && opts->probe_format) {
		img->probed = true;
		img->sector0 = calloc(1, QCOW2_PROBE_BYTES);
		if (!img->sector0)
			OPEN_FAIL(-ENOMEM, "out of memory");
		if ((ret = probe_io(io, path, img->sector0, &fmt, err, errlen)) < 0)
			goto fail;
		if (strcmp(fmt, "raw")) {
			free(img->sector0);
			img->sector0 = NULL;
		}
	}
	if (strcmp(fmt, "raw") == 0) {
		if (opts->snapshot_id || opts->snapshot_name)
			OPEN_FAIL(-ENOTSUP, "raw images have no snapshots");
		img->raw = true;
		img->hdr.size = fsize;
		img->file_end = img->open_size = img->prealloc_end = fsize;
		img->run_ev = event_new(base, -1, 0, run_cb, img);
		img->wb_ev = evtimer_new(base, qsm_wb_timer_cb, img);
		if (!img->run_ev || !img->wb_ev)
			OPEN_FAIL(-ENOMEM, "out of memory");
		qsm_io_set_live(io, true); /* no blocking io/ call until close */
		*out = img;
		return 0;
	}
	if (strcmp(fmt, "qcow2") != 0)
		OPEN_FAIL(-EINVAL, "unknown image format '%s' (qsm opens qcow2 and raw images)", fmt);

	buf = calloc(1, 1u << QCOW2_MAX_CLUSTER_BITS);
	if (!buf)
		OPEN_FAIL(-ENOMEM, "out of memory");
	bool repaired = false;
read_header:;
	/* Header: the first 512 bytes tell the cluster size, then cluster 0. */
	size_t first = (size_t)QSM_MIN(fsize, 512);
	if ((ret = qsm_io_pread_sync(io, buf, first, 0)) < 0)
		OPEN_FAIL(ret, "cannot read the header: %s", strerror(-ret));
	size_t hlen = qcow2_header_probe_len(buf, first, fsize);
	if (hlen > first && (ret = qsm_io_pread_sync(io, buf, hlen, 0)) < 0)
		OPEN_FAIL(ret, "cannot read the header: %s", strerror(-ret));
	if (!hlen)
		hlen = first;
	if ((ret = qcow2_header_parse(buf, hlen, fsize, &img->hdr, err, errlen)) < 0)
		goto fail;

	struct qcow2_header *h = &img->hdr;
	/* Before the repair below: a corrupt image is never written, not even
	 * by a lazy-refcounts repair (qemu-img check -r repairs it). */
	if ((h->incompatible_features & QCOW2_INCOMPAT_CORRUPT) && !img->read_only)
		OPEN_FAIL(-EACCES, "qcow2: Image is corrupt; cannot be opened read/write");
	if ((h->incompatible_features & QCOW2_INCOMPAT_DIRTY) && !img->read_only &&
	    !opts->no_repair && !repaired) {
		/* Refcounts may lag behind the tables (lazy refcounts, crash):
		 * repair before anything else is read or written, then start
		 * over with the repaired header (QEMU's open-time check). */
		struct qsm_check_result res;
		qcow2_header_release(&img->hdr);
		memset(&img->hdr, 0, sizeof(img->hdr));
		ret = repair_dirty(io, opts, &res, err, errlen);
		if (ret < 0)
			goto fail;
		if (res.corruptions_left || res.incomplete)
			OPEN_FAIL(-EIO, "repairing the dirty image left %llu corruptions: run qsm check -r all",
				  (unsigned long long)res.corruptions_left);
		if ((ret = qsm_io_get_size(io, &fsize)) < 0)
			OPEN_FAIL(ret, "cannot get the image size: %s", strerror(-ret));
		repaired = true;
		goto read_header;
	}
	free(buf);
	buf = NULL;
	if ((h->incompatible_features & QCOW2_INCOMPAT_DIRTY) && !img->read_only)
		OPEN_FAIL(-EBUSY, "image is dirty (lazy refcounts were in use when it was last closed) "
			  "and opening it without repair was asked: open it read-only or repair it");

	img->lazy = !img->read_only && h->version >= 3 &&
		    (h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS);
	img->disk_dirty = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;
	img->disk_reftable_offset = h->refcount_table_offset;
	img->disk_reftable_clusters = h->refcount_table_clusters;
	img->cluster_bits = h->cluster_bits;
	img->cluster_size = 1ull << h->cluster_bits;
	img->l2_entries = img->cluster_size / 8;
	img->l1_size = h->l1_size;

	/* L1: resident, cluster-rounded so write-back can write whole sectors. */
	if ((ret = qsm_l1_read(img, h->l1_table_offset, img->l1_size, 0, &img->l1)) == -ENOMEM)
		OPEN_FAIL(-ENOMEM, "out of memory for the L1 table (%llu entries)",
			  (unsigned long long)img->l1_size);
	if (ret < 0)
		OPEN_FAIL(ret, "cannot read the L1 table: %s", strerror(-ret));
	qsm_wb_l1_loaded(img);
	if ((ret = read_snapshots(img, fsize, err, errlen)) < 0)
		goto fail;
	if ((ret = read_bitmaps(img, fsize, err, errlen)) < 0)
		goto fail;
	if ((opts->snapshot_id || opts->snapshot_name) &&
	    (ret = load_snapshot(img, opts->snapshot_id, opts->snapshot_name, err, errlen)) < 0)
		goto fail;

	struct qsm_rc_params rp = {
		.cluster_bits = h->cluster_bits,
		.refcount_order = h->refcount_order,
		.table_offset = h->refcount_table_offset,
		.table_clusters = h->refcount_table_clusters,
		/* QEMU's default is 4 clusters (docs/qcow2-cache.txt); a size
		 * below one cluster still caches one block. */
		.cache_blocks = opts->refcount_cache_size
					? (size_t)QSM_MAX(opts->refcount_cache_size >> h->cluster_bits, 1)
					: 0,
	};
	if ((ret = qsm_refcount_load(io, &rp, fsize, &img->rc, err, errlen)) < 0)
		goto fail;
	qsm_refcount_set_writeback_hook(img->rc, refcount_need_writeback, img);

	qsm_overlap_init(&p->meta, img->cluster_bits, img->rc);
	qsm_overlap_set_l1(&p->meta, h->l1_table_offset, img->l1_size);
	qsm_overlap_set_snapshots(&p->meta, h->snapshots_offset, img->snaps.size);
	qsm_overlap_set_bitmap_dir(&p->meta, img->bitmaps.ext.dir_offset, img->bitmaps.ext.dir_size);
	for (uint64_t i = 0; i < img->l1_size; i++) {
		uint64_t off = qsm_l1_get(img, i) & QCOW2_L1E_OFFSET_MASK;
		if (off && (ret = qsm_overlap_add_l2(&p->meta, off)) < 0)
			OPEN_FAIL(ret, "out of memory");
	}

	img->open_size = fsize;
	if (!img->read_only && (ret = check_metadata_refcounts(img, err, errlen)) < 0)
		goto fail;

	uint64_t cache_bytes = opts->l2_cache_size;
	if (!cache_bytes)
		cache_bytes = QSM_MIN(32ull << 20, QSM_MAX(img->l1_size, 1) * img->cluster_size);
	if ((ret = qsm_l2_cache_init(&img->l2c, io, img->cluster_size,
				     (size_t)QSM_MAX(cache_bytes / img->cluster_size, 1))) < 0)
		OPEN_FAIL(ret, "out of memory");
	img->l2c.need_writeback = cache_need_writeback;
	img->l2c.opaque = img;

	img->zero_buf = calloc(1, img->cluster_size);
	img->run_ev = event_new(base, -1, 0, run_cb, img);
	img->wb_ev = evtimer_new(base, qsm_wb_timer_cb, img);
	if (!img->zero_buf || !img->run_ev || !img->wb_ev)
		OPEN_FAIL(-ENOMEM, "out of memory");
	img->file_end = fsize;
	img->open_size = fsize;
	img->prealloc_end = fsize;
	/* What block status needs of the file's storage, asked now: once the
	 * image serves requests the handle may not block (qsm_io.h). */
	uint64_t used;
	img->open_allocated = qsm_io_allocated(io, &used) == 0 ? (int64_t)used : -1;

	if (h->backing_file[0] && !opts->no_backing &&
	    (ret = open_backing(img, path, opts, ch, err, errlen)) < 0)
		goto fail;

	/* Everything validated: only now may the file be written. */
	if (!img->read_only && (ret = bitmaps_open_rw(img)) < 0)
		OPEN_FAIL(ret, "cannot update the header: %s", strerror(-ret));
	qsm_io_set_live(io, true); /* no blocking io/ call until close */
	*out = img;
	return 0;

fail:
	free(buf);
	image_free(img, false);
	return ret;
}

int qsm_open_io(struct event_base *base, struct qsm_io *io, const struct qsm_open_opts *opts,
		struct qsm_image **out, char *err, size_t errlen)
{
	struct chain ch = { .n = 0 };
	struct qsm_open_opts o;
	int ret = qsm_opts_import(&o, sizeof(o), opts, opts ? opts->struct_size : 0,
				  QSM_OPEN_OPTS_SIZE_0, "qsm_open_opts", err, errlen);
	if (ret < 0) {
		qsm_io_close(io);
		return ret;
	}
	return open_io(base, io, &o, NULL, &ch, out, err, errlen);
}

static int open_path(struct event_base *base, const char *path, const struct qsm_open_opts *opts,
		     struct chain *ch, struct qsm_image **out, char *err, size_t errlen)
{
	static const struct qsm_open_opts defaults;
	struct qsm_io *io;
	struct stat st;
	if (!opts)
		opts = &defaults;
	if (stat(path, &st) == 0 && ch->n < QSM_MAX_CHAIN) { /* open_backing checks */
		ch->id[ch->n].dev = st.st_dev;
		ch->id[ch->n].ino = st.st_ino;
		ch->n++;
	}
	int flags = opts->read_only ? QSM_IO_RDONLY : 0;
	if (opts->cache == QSM_CACHE_NONE || opts->cache == QSM_CACHE_DIRECTSYNC)
		flags |= QSM_IO_DIRECT;
	int ret = qsm_io_open_path(base, path, flags, opts->aio, &io);
	if (ret < 0) {
		if (err)
			snprintf(err, errlen, "Could not open '%s': %s", path, strerror(-ret));
		return ret;
	}
	return open_io(base, io, opts, path, ch, out, err, errlen);
}

int qsm_open(struct event_base *base, const char *path, const struct qsm_open_opts *opts,
	     struct qsm_image **out, char *err, size_t errlen)
{
	struct chain ch = { .n = 0 };
	struct qsm_open_opts o;
	int ret = qsm_opts_import(&o, sizeof(o), opts, opts ? opts->struct_size : 0,
				  QSM_OPEN_OPTS_SIZE_0, "qsm_open_opts", err, errlen);
	if (ret < 0)
		return ret;
	return open_path(base, path, &o, &ch, out, err, errlen);
}

/*
 * Closing: the CLOSE machine (sm/states.def).  qsm_close_async starts a
 * request of machine CLOSE; from then on img->closing refuses new requests.
 *   CLOSE_DRAIN         wait until it is the only request in flight (and no
 *                       preallocation nor VM-state read of the backing image
 *                       runs): qsm_close_wake, called as every
 *                       other request leaves the image, posts WAKE
 *   DURABLE_WAIT        one full write-back batch (sm/writeback.c), as a
 *                       flush waits for an ordinary one
 *   CLOSE_BITMAPS       the tracked bitmaps written back, flushed, their
 *                       in-use marks cleared, flushed (sm/bitmaps.c)
 *   CLOSE_TRIM          truncate the space reserved ahead of the allocator
 *   CLOSE_MARK_CORRUPT  (image in error) the corrupt bit alone (or, when
 *                       the mark of qsm_image_corrupt is in flight, wait
 *                       for it: qsm_close_wake), then
 *   CLOSE_SYNC          its fdatasync
 * At DONE the request's callback (close_req_done) activates img->close_ev;
 * its callback, close_final_cb, runs on the next loop turn, outside the
 * image's run queue: it frees the image (io handle and backing chain
 * closed) and only then calls the caller back.  Invariants: after
 * CLOSE_DRAIN nothing but the close is in flight, and no new request can
 * start; after the write-back (wb_closed) no batch starts.
 */
static bool close_drained(const struct qsm_image *img)
{
	/* The corrupt mark too: the io handle is closed at the end. */
	return img->in_flight == 1 && !img->prealloc_busy && img->corrupt_mark != QSM_MARK_BUSY &&
	       !img->vm_backing_reads;
}

void qsm_close_wake(struct qsm_image *img)
{
	struct qsm_req *c = img->close_req;
	if (!c || c->queued)
		return;
	if ((c->state == QSM_S_CLOSE_DRAIN && close_drained(img)) ||
	    (c->state == QSM_S_CLOSE_MARK_CORRUPT && img->corrupt_mark != QSM_MARK_BUSY))
		qsm_sm_post(c, QSM_E_WAKE, 0);
}

static void close_io_cb(struct qsm_io_req *io, int ret)
{
	struct qsm_req *req = container_of(io, struct qsm_req, io);
	struct qsm_image *img = req->img;
	qsm_sm_post(req, ret < 0 ? QSM_E_ERROR : QSM_E_IO_DONE, ret);
	qsm_sm_drain(img);
}

static enum qsm_event close_submit(struct qsm_req *req, enum qsm_io_op op, uint64_t off,
				   void *buf, size_t len, enum qsm_io_event event)
{
	struct qsm_image *img = req->img;
	req->io = (struct qsm_io_req){
		.op = op, .event = op == QSM_IO_FLUSH ? QSM_IO_EV_FLUSH : event,
		.offset = off, .len = len, .cb = close_io_cb,
	};
	if (buf) {
		req->iov_buf[0] = (struct iovec){ buf, len };
		req->io.iov = req->iov_buf;
		req->io.iovcnt = 1;
	}
	qsm_io_submit(img->io, &req->io);
	return QSM_E_WAIT;
}

enum qsm_event qsm_close_step(struct qsm_req *req)
{
	struct qsm_image *img = req->img;
	switch (req->state) {
	case QSM_S_CLOSE_DRAIN:
		if (!close_drained(img))
			return QSM_E_WAIT; /* qsm_close_wake */
		if (img->error) {
			req->ret = img->error; /* what could not be written is lost */
			return QSM_E_BROKEN;
		}
		return img->read_only ? QSM_E_NOTHING_TO_DO : QSM_E_NEED_DURABLE;
	case QSM_S_CLOSE_MARK_CORRUPT: {
		/* As QEMU: an image found corrupt is marked so on disk, so it is
		 * not opened read-write again before a repair.  Only
		 * incompatible_features (8 bytes at 72) is written, with the
		 * dirty bit where the disk has it. */
		img->wb_closed = true;
		if (!req->ret)
			req->ret = img->error ? img->error : -EIO;
		/* The mark started when the corruption was found (after the
		 * batch the close waited for) is still in flight: the bit has
		 * one writer, and the io handle is closed only after it
		 * (corrupt_mark_cb wakes us). */
		if (img->corrupt_mark == QSM_MARK_BUSY)
			return QSM_E_WAIT;
		if (img->read_only || img->raw || img->corrupt_mark == QSM_MARK_DONE ||
		    !(img->hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT))
			return QSM_E_NOTHING_TO_DO;
		uint64_t f = img->hdr.incompatible_features & ~QCOW2_INCOMPAT_DIRTY;
		if (img->disk_dirty)
			f |= QCOW2_INCOMPAT_DIRTY;
		if (!(req->run.bounce = malloc(8)))
			return QSM_E_NOTHING_TO_DO; /* best effort */
		qcow2_put_be64(req->run.bounce, f);
		return close_submit(req, QSM_IO_WRITE, 72, req->run.bounce, 8,
				    QSM_IO_EV_HEADER_UPDATE);
	}
	case QSM_S_CLOSE_SYNC:
		return close_submit(req, QSM_IO_FLUSH, 0, NULL, 0, QSM_IO_EV_FLUSH);
	case QSM_S_CLOSE_BITMAPS: {
		/* run.l1_index: the store's next step (sm/bitmaps.c) */
		img->wb_closed = true;
		enum qsm_io_op op;
		uint64_t off;
		void *buf;
		size_t len;
		if (!qsm_bitmaps_store_next(img, req->run.l1_index++, &op, &off, &buf, &len))
			return QSM_E_NOTHING_TO_DO;
		return close_submit(req, op, off, buf, len, QSM_IO_EV_NONE);
	}
	case QSM_S_CLOSE_TRIM: {
		img->wb_closed = true;
		if (img->raw || img->prealloc_end <= img->open_size)
			return QSM_E_NOTHING_TO_DO;
		/* Give back the reserved space nothing used. */
		uint64_t end = QSM_MAX(QSM_MAX(img->open_size, img->file_end),
				       qsm_refcount_image_end(img->rc));
		if (end >= img->prealloc_end)
			return QSM_E_NOTHING_TO_DO;
		return close_submit(req, QSM_IO_TRUNCATE, end, NULL, 0, QSM_IO_EV_NONE);
	}
	default:
		abort();
	}
}

/* The CLOSE request is DONE (req_complete): finish from a fresh loop turn. */
static void close_req_done(void *opaque, int ret)
{
	struct qsm_image *img = opaque;
	img->close_ret = ret;
	img->close_req = NULL; /* freed by req_complete; img->closing stays */
	event_active(img->close_ev, 0, 0);
}

static void close_final_cb(evutil_socket_t fd, short what, void *arg)
{
	struct qsm_image *img = arg;
	qsm_cb cb = img->close_cb;
	void *opaque = img->close_opaque;
	int ret = img->close_ret;
	image_free(img, false);
	if (cb)
		cb(opaque, ret);
}

int qsm_close_async(struct qsm_image *img, qsm_cb cb, void *opaque)
{
	if (img->closing)
		return -EALREADY;
	if (!img->close_ev && !(img->close_ev = event_new(img->base, -1, 0, close_final_cb, img)))
		return -ENOMEM;
	/* One scratch iovec for the corrupt bit's write. */
	struct qsm_req *req = qsm_req_new(img, QSM_M_CLOSE, 1);
	if (!req)
		return -ENOMEM;
	req->cb = close_req_done;
	req->opaque = img;
	img->closing = true;
	img->close_req = req;
	img->close_cb = cb;
	img->close_opaque = opaque;
	qsm_sm_start(req);
	return 0;
}

void qsm_abandon(struct qsm_image *img)
{
	/* In-flight requests are forgotten with the process (tools call this
	 * just before _exit); only their memory is at stake.  Those asleep on
	 * a write-back batch (DURABLE_WAIT, FREE_WAIT) hold nothing else and
	 * no batch will ever wake them: freed here, without callbacks. */
	qsm_wb_forget_waiters(img);
	qsm_snap_forget(img);
	image_free(img, true);
}

/* --- resizing ------------------------------------------------------------ */

#define TRUNC_FAIL(code, ...)                                                  \
	do {                                                                   \
		if (err)                                                       \
			snprintf(err, errlen, __VA_ARGS__);                    \
		return (code);                                                 \
	} while (0)

/* Is any guest cluster at or past `from` (bytes) mapped, in any way?  Reads
 * L2 tables from disk: everything must have been written back. */
static int allocated_past(struct qsm_image *img, uint64_t from, bool *found)
{
	uint64_t first = QSM_DIV_ROUND_UP(from, img->cluster_size);
	uint8_t *t = NULL;
	*found = false;
	for (uint64_t i = first / img->l2_entries; i < img->l1_size && !*found; i++) {
		uint64_t off = qsm_l1_get(img, i) & QCOW2_L1E_OFFSET_MASK;
		if (!off)
			continue;
		if (!t && posix_memalign((void **)&t, 4096, img->cluster_size))
			return -ENOMEM;
		int ret = qsm_io_pread_sync(img->io, t, img->cluster_size, off);
		if (ret < 0) {
			free(t);
			return ret;
		}
		uint64_t j0 = i == first / img->l2_entries ? first % img->l2_entries : 0;
		for (uint64_t j = j0; j < img->l2_entries; j++)
			if (qcow2_be64(t + j * 8))
				*found = true;
	}
	free(t);
	return 0;
}

/*
 * Shrinking over allocated clusters (QEMU's qcow2_co_truncate: a full
 * discard from the first cluster wholly past the new end, then the L2
 * tables past it released).  Blocking, with everything written back and
 * nothing in flight.  The cached L2 tables are all clean, so they are
 * dropped and the tables edited on disk: entries past the end become 0, a
 * table wholly past it leaves the L1 table.  Every cluster they referenced
 * (data, compressed, preallocated zero, the tables themselves) is freed
 * through the pending frees, which the write-back batch releases only
 * after its syncs made the new tables and L1 durable: a crash in between
 * leaks clusters, never leaves a reference to a free one.
 */
static int discard_past(struct qsm_image *img, uint64_t from)
{
	uint64_t first = QSM_DIV_ROUND_UP(from, img->cluster_size);
	uint8_t *t = NULL;
	int ret = 0;

	qsm_l2_cache_drop_clean(&img->l2c);
	if (qsm_l2_dirty_count(&img->l2c))
		return -EBUSY; /* cannot be: resize_qcow2 wrote everything back */
	for (uint64_t i = first / img->l2_entries; i < img->l1_size && !ret; i++) {
		uint64_t l2 = qsm_l1_get(img, i) & QCOW2_L1E_OFFSET_MASK;
		if (!l2)
			continue;
		if (!t && posix_memalign((void **)&t, 4096, img->cluster_size))
			return -ENOMEM;
		if ((ret = qsm_io_pread_sync(img->io, t, img->cluster_size, l2)) < 0)
			break;
		uint64_t j0 = i == first / img->l2_entries ? first % img->l2_entries : 0;
		bool changed = false;
		for (uint64_t j = j0; j < img->l2_entries && !ret; j++) {
			uint64_t e = qcow2_be64(t + j * 8);
			if (!e)
				continue;
			changed = true;
			qcow2_put_be64(t + j * 8, 0);
			if (e & QCOW2_OFLAG_COMPRESSED) {
				uint64_t c0, n;
				qcow2_compressed_clusters(img->cluster_bits, e, &c0, &n);
				for (uint64_t c = c0; c < c0 + n && !ret; c++)
					ret = qsm_free_cluster_deferred(img, c << img->cluster_bits);
			} else if (qcow2_entry_offset(e)) {
				ret = qsm_free_cluster_deferred(img, qcow2_entry_offset(e));
			}
		}
		if (ret)
			break;
		if (j0 == 0) {
			qsm_l1_set(img, i, 0);
			ret = qsm_free_cluster_deferred(img, l2);
		} else if (changed) {
			ret = qsm_io_pwrite_sync(img->io, t, img->cluster_size, l2);
		}
	}
	free(t);
	/* The edited tables durable before the batch can release anything
	 * (its own syncs do not know about writes made behind the cache). */
	if (ret == 0 && !(img->io->flags & QSM_IO_NO_FLUSH))
		ret = qsm_io_flush_sync(img->io);
	if (ret == 0)
		ret = qsm_sync_writeback(img);
	return ret;
}

/* qsm_l1_grow_sync (sm.h): the move of metadata/l1.h, blocking. */
int qsm_l1_grow_sync(struct qsm_image *img, uint64_t new_l1, uint64_t size, char *err,
		     size_t errlen)
{
	struct qcow2_header *h = &img->hdr;
	uint64_t cs = img->cluster_size;
	int ret;

	assert(new_l1 > img->l1_size);
	/* Start from a clean image: every table on disk, nothing dirty. */
	if ((ret = qsm_sync_writeback(img)) < 0)
		TRUNC_FAIL(ret, "Could not write metadata back: %s", strerror(-ret));
	struct qcow2_l1_growth g;
	ret = qcow2_l1_grow(img->l1, img->l1_size, new_l1, img->cluster_bits, &g);
	if (ret == -EFBIG)
		TRUNC_FAIL(-EFBIG, "The L1 table for %llu bytes would exceed %u bytes",
			   (unsigned long long)size, QCOW2_MAX_L1_BYTES);
	if (ret < 0)
		return ret;
	uint8_t *l1 = g.table;
	uint64_t bytes = g.bytes;
	uint64_t new_off, old_off = h->l1_table_offset;
	if ((ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, g.clusters, &new_off, NULL))) < 0) {
		free(l1);
		TRUNC_FAIL(ret, "Could not allocate the new L1 table: %s", strerror(-ret));
	}
	/* 1. the new table and the refcounts counting it, durable (the
	 *    batch's first sync covers the table written before it) */
	ret = qsm_io_pwrite_sync(img->io, l1, bytes, new_off);
	if (ret == 0)
		ret = qsm_sync_writeback(img);
	/* 2. the header naming it (the batch's header level) */
	if (ret == 0) {
		h->l1_table_offset = new_off;
		h->l1_size = (uint32_t)new_l1;
		h->size = size;
		img->header_dirty = true;
		ret = qsm_sync_writeback(img);
	}
	if (ret < 0) {
		free(l1);
		img->error = -EIO;
		snprintf(img->errmsg, sizeof(img->errmsg),
			 "growing the L1 table failed (%s); the image accepts no more writes",
			 strerror(-ret));
		TRUNC_FAIL(ret, "%s", img->errmsg);
	}
	free(img->l1);
	img->l1 = l1;
	img->l1_size = new_l1;
	img->l1_dirty_lo = img->l1_dirty_hi = 0;
	qsm_wb_l1_loaded(img);
	qsm_overlap_set_l1(meta_of(img), new_off, new_l1);
	if (new_off + bytes > img->file_end)
		img->file_end = new_off + bytes;
	/* 3. the old table released */
	ret = qsm_refcount_update(img->rc, old_off / cs, g.old_clusters, -1, NULL);
	if (ret == 0)
		ret = qsm_sync_writeback(img);
	if (ret < 0)
		TRUNC_FAIL(ret, "Could not release the old L1 table: %s", strerror(-ret));
	return 0;
}

/* qsm_truncate for qcow2, once the request is known to be valid. */
static int resize_qcow2(struct qsm_image *img, uint64_t size, char *err, size_t errlen)
{
	struct qcow2_header *h = &img->hdr;
	int ret;

	/* Start from a clean image: every table on disk, nothing dirty. */
	if ((ret = qsm_sync_writeback(img)) < 0)
		TRUNC_FAIL(ret, "Could not write metadata back: %s", strerror(-ret));

	uint64_t new_l1 = qcow2_l1_entries_for(size, img->cluster_bits);
	if (size < h->size) {
		bool found;
		if ((ret = allocated_past(img, size, &found)) < 0)
			TRUNC_FAIL(ret, "Could not read L2 tables: %s", strerror(-ret));
		if (found && h->nb_snapshots)
			TRUNC_FAIL(-ENOTSUP, "Can't resize an image which has snapshots");
		if (found && (ret = discard_past(img, size)) < 0) {
			if (!img->error) {
				img->error = -EIO;
				snprintf(img->errmsg, sizeof(img->errmsg),
					 "discarding the clusters past the new end failed (%s); "
					 "the image accepts no more writes", strerror(-ret));
			}
			TRUNC_FAIL(ret, "%s", img->errmsg);
		}
		new_l1 = img->l1_size; /* keep the table; it may be larger than needed */
	}
	if (new_l1 > img->l1_size)
		return qsm_l1_grow_sync(img, new_l1, size, err, errlen);
	h->size = size;
	img->header_dirty = true;
	if ((ret = qsm_sync_writeback(img)) < 0)
		TRUNC_FAIL(ret, "Could not update the header: %s", strerror(-ret));
	return 0;
}

static int truncate_image(struct qsm_image *img, uint64_t size, char *err, size_t errlen)
{
	struct qcow2_header *h = &img->hdr;
	int ret;

	if (err && errlen)
		err[0] = 0;
	if (img->read_only)
		TRUNC_FAIL(-EBADF, "Image is read-only");
	if (img->corrupt)
		TRUNC_FAIL(-ENOMEDIUM, "%s", img->errmsg);
	if (img->error)
		TRUNC_FAIL(-EIO, "%s", img->errmsg);
	/* A raw file can have any length (as QEMU's file driver); qcow2 sizes
	 * are whole sectors. */
	if (size % 512 && !img->raw)
		TRUNC_FAIL(-EINVAL, "The new size must be a multiple of 512");
	if (size > QCOW2_MAX_VIRTUAL_SIZE)
		TRUNC_FAIL(-EFBIG, "The new size %llu is too large", (unsigned long long)size);
	while (img->wb_job)
		event_base_loop(img->base, EVLOOP_ONCE);
	if (img->in_flight)
		TRUNC_FAIL(-EBUSY, "Requests are in flight");
	if (size == h->size)
		return 0;
	if (img->raw) {
		if ((ret = qsm_io_truncate_sync(img->io, size)) < 0)
			TRUNC_FAIL(ret, "Could not resize the file: %s", strerror(-ret));
		h->size = img->file_end = size;
		return 0;
	}
	/* As QEMU (bdrv_co_truncate): growing over a backing image longer than
	 * the old size, the new area reads as zeros, not as the backing data
	 * that was out of reach: v3 zeroes it, v2 cannot and is refused before
	 * anything changes. */
	uint64_t old = h->size;
	bool zero_new = size > old && img->backing && img->backing->hdr.size > old;
	if (zero_new && h->version < 3)
		TRUNC_FAIL(-ENOTSUP, "Cannot grow a version 2 image over its longer backing file: "
			   "the new area would show the backing data (no zero clusters in v2)");
	/* the bitmaps resized with the disk (sm/bitmaps.c) */
	if ((ret = qsm_bitmaps_resize(img, size, resize_qcow2, err, errlen)) < 0)
		return ret;
	/* QEMU's truncate sets no bitmap bits, its zeroing neither */
	img->bitmaps_quiet = true;
	ret = zero_new ? qsm_sync_write_zeroes(img, old, size - old, 0) : 0;
	img->bitmaps_quiet = false;
	if (ret < 0)
		TRUNC_FAIL(ret, "Could not zero the new area: %s", strerror(-ret));
	return 0;
}

/* A blocking entry point: the handle may block for its duration. */
int qsm_truncate(struct qsm_image *img, uint64_t size, char *err, size_t errlen)
{
	bool live = qsm_io_set_live(img->io, false);
	int ret = truncate_image(img, size, err, errlen);
	qsm_io_set_live(img->io, live);
	return ret;
}

/* --- information --------------------------------------------------------- */

/* What struct qsm_info held in 0.1.0: everything before compression_type. */
#define QSM_INFO_SIZE_0 offsetof(struct qsm_info, compression_type)

static void get_info(struct qsm_image *img, struct qsm_info *info)
{
	const struct qcow2_header *h = &img->hdr;
	memset(info, 0, sizeof(*info));
	info->virtual_size = h->size;
	info->format_probed = img->probed;
	info->read_only = img->read_only;
	info->cache = img->cache;
	info->aio = img->io->ops->name;
	if (img->raw) {
		info->format = "raw";
		/* Kept at open and truncate (the handle may not block now). */
		info->file_size = img->file_end;
		return;
	}
	info->format = "qcow2";
	info->cluster_size = img->cluster_size;
	info->version = h->version;
	info->refcount_bits = 1u << h->refcount_order;
	info->lazy_refcounts = h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS;
	info->corrupt = h->incompatible_features & QCOW2_INCOMPAT_CORRUPT;
	info->dirty = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;
	info->file_size = QSM_MAX(qsm_refcount_image_end(img->rc), img->file_end);
	snprintf(info->backing_file, sizeof(info->backing_file), "%s", h->backing_file);
	snprintf(info->backing_format, sizeof(info->backing_format), "%s", h->backing_format);
	info->nb_snapshots = h->nb_snapshots;
	info->compression_type = qcow2_compression_name(h->compression_type);
}

void qsm_get_info_sized(struct qsm_image *img, struct qsm_info *info, size_t size)
{
	struct qsm_info all;
	get_info(img, &all);
	/* A newer caller's fields past ours read as zero. */
	memset(info, 0, size);
	memcpy(info, &all, QSM_MIN(size, sizeof(all)));
}

/* The 0.1.0 entry point (the header's macro of the same name calls
 * qsm_get_info_sized); the parentheses keep the macro out. */
void (qsm_get_info)(struct qsm_image *img, struct qsm_info *info)
{
	qsm_get_info_sized(img, info, QSM_INFO_SIZE_0);
}

unsigned qsm_snapshot_count(struct qsm_image *img)
{
	return img->snaps.nb;
}

int qsm_snapshot_get(struct qsm_image *img, unsigned index, struct qsm_snapshot_info *out)
{
	if (!out || out->struct_size < offsetof(struct qsm_snapshot_info, disk_size) + 8)
		return -EINVAL;
	if (index >= img->snaps.nb)
		return -ENOENT;
	const struct qcow2_snapshot *sn = &img->snaps.sn[index];
	size_t size = out->struct_size;
	struct qsm_snapshot_info v = {
		.struct_size = size,
		.id = sn->id,
		.name = sn->name,
		.vm_state_size = sn->vm_state_size,
		.date_sec = sn->date_sec,
		.date_nsec = sn->date_nsec,
		.vm_clock_nsec = sn->vm_clock_nsec,
		.icount = sn->icount,
		.disk_size = sn->disk_size,
	};
	/* A newer caller's fields past ours are zeroed. */
	memset(out, 0, size);
	memcpy(out, &v, QSM_MIN(size, sizeof(v)));
	return 0;
}

unsigned qsm_bitmap_count(struct qsm_image *img)
{
	return img->bitmaps.ext.nb;
}

int qsm_bitmap_get(struct qsm_image *img, unsigned index, struct qsm_bitmap_info *out)
{
	if (!out || out->struct_size < offsetof(struct qsm_bitmap_info, flags) + 4)
		return -EINVAL;
	if (index >= img->bitmaps.ext.nb)
		return -ENOENT;
	const struct qcow2_bitmap *b = &img->bitmaps.bm[index];
	size_t size = out->struct_size;
	struct qsm_bitmap_info v = {
		.struct_size = size,
		.name = b->name,
		.granularity = 1ull << b->granularity_bits,
		.flags = b->flags,
	};
	memset(out, 0, size);
	memcpy(out, &v, QSM_MIN(size, sizeof(v)));
	return 0;
}

struct qsm_image *qsm_get_backing(struct qsm_image *img)
{
	return img->backing;
}

/* What struct qsm_stats held in 0.1.0: everything before refblock_hits. */
#define QSM_STATS_SIZE_0 offsetof(struct qsm_stats, refblock_hits)

void qsm_get_stats_sized(struct qsm_image *img, struct qsm_stats *st, size_t size)
{
	struct qsm_stats all = img->stats;
	if (img->rc) {
		struct qsm_rc_stats rs;
		qsm_refcount_stats(img->rc, &rs);
		all.refblock_hits = rs.hits;
		all.refblock_misses = rs.misses;
		all.refblock_evictions = rs.evictions;
		all.refblock_loads = rs.loads;
	}
	/* A newer caller's fields past ours read as zero. */
	memcpy(st, &all, size < sizeof(all) ? size : sizeof(all));
	if (size > sizeof(all))
		memset((char *)st + sizeof(all), 0, size - sizeof(all));
}

/* The 0.1.0 entry point (the header's macro of the same name calls
 * qsm_get_stats_sized); the parentheses keep the macro out. */
void (qsm_get_stats)(struct qsm_image *img, struct qsm_stats *st)
{
	qsm_get_stats_sized(img, st, QSM_STATS_SIZE_0);
}

void qsm_set_trace(struct qsm_image *img, qsm_trace_fn fn, void *opaque)
{
	img->trace = fn;
	img->trace_opaque = opaque;
}

int qsm_image_work(struct qsm_image *img, struct qsm_work_pool **out)
{
	if (!img->work) {
		int ret = qsm_work_pool_new(img->base, img->work_threads, 0, &img->work);
		if (ret < 0) {
			snprintf(img->errmsg, sizeof(img->errmsg),
				 "cannot start the worker threads: %s", strerror(-ret));
			return ret;
		}
	}
	*out = img->work;
	return 0;
}

struct event_base *qsm_image_base(struct qsm_image *img)
{
	return img->base;
}

const char *qsm_image_error(struct qsm_image *img)
{
	/* A read that failed in the backing chain: the image that knows why. */
	for (struct qsm_image *i = img; i; i = i->backing)
		if (i->errmsg[0])
			return i->errmsg;
	return img->errmsg;
}

/* --- submitting requests --------------------------------------------------- */

static int check_range(struct qsm_image *img, uint64_t offset, uint64_t bytes)
{
	if (img->closing)
		return -ESHUTDOWN; /* qsm_close_async: no new request */
	if (offset > img->hdr.size || bytes > img->hdr.size - offset)
		return -EINVAL;
	return 0;
}

/* Writes of every kind (write, zero write, compressed write, discard):
 * refused on a read-only image, on a corrupt one (-ENOMEDIUM, as QEMU) and
 * after a failed metadata write (-EIO). */
int qsm_check_writable(struct qsm_image *img)
{
	if (img->read_only)
		return -EBADF;
	if (img->corrupt)
		return -ENOMEDIUM;
	if (img->error)
		return -EIO;
	return 0;
}

static struct qsm_req *new_req(struct qsm_image *img, enum qsm_machine m, uint64_t offset,
			       uint64_t bytes, const struct iovec *iov, int iovcnt,
			       qsm_cb cb, void *opaque)
{
	/* Scratch iovecs: the caller's pieces plus COW head and tail. */
	struct qsm_req *req = qsm_req_new(img, m, (iovcnt > 0 ? iovcnt : 1) + 2);
	if (!req)
		return NULL;
	req->offset = offset;
	req->bytes = bytes;
	req->iov = iov;
	req->iovcnt = iovcnt;
	req->cb = cb;
	req->opaque = opaque;
	return req;
}

/*
 * A probed raw image (sm.h, "probed"): its first 512 bytes as they will be
 * once this request lands must still probe raw, else -EPERM and nothing is
 * submitted (QEMU's raw_co_pwritev; zero writes and discards are checked
 * too, which QEMU does not need to: zeros alone never form a signature it
 * knows, but zeroing part of one can).  iov NULL: the range reads as zeros
 * afterwards.  The copy is patched at submission, so requests in flight
 * together are judged in submission order.
 */
static int probed_raw_guard(struct qsm_image *img, uint64_t offset, uint64_t bytes,
			    const struct iovec *iov, int iovcnt)
{
	uint8_t next[QCOW2_PROBE_BYTES];
	if (!img->sector0 || offset >= QCOW2_PROBE_BYTES || !bytes)
		return 0;
	size_t n = (size_t)QSM_MIN(bytes, QCOW2_PROBE_BYTES - offset);
	size_t have = (size_t)QSM_MIN(img->hdr.size, QCOW2_PROBE_BYTES);
	memcpy(next, img->sector0, sizeof(next));
	if (iov)
		qsm_iov_to_buf(iov, iovcnt, 0, next + offset, n);
	else
		memset(next + offset, 0, n);
	if (strcmp(qcow2_probe_format(next, have, NULL), "raw") != 0)
		return -EPERM;
	memcpy(img->sector0, next, sizeof(next));
	return 0;
}

/* A read or write of [offset, +bytes), the first bytes of iov; guest
 * requests are checked against the virtual size, VM-state ones (vmstate)
 * were checked by sm/vmstate.c against the L1 table instead. */
static int submit_rw_at(struct qsm_image *img, enum qsm_machine m, uint64_t offset,
			const struct iovec *iov, int iovcnt, uint64_t bytes, unsigned flags,
			bool vmstate, qsm_cb cb, void *opaque)
{
	int ret = vmstate ? (img->closing ? -ESHUTDOWN : 0) : check_range(img, offset, bytes);
	if (ret < 0)
		return ret;
	if (m == QSM_M_WRITE && (ret = qsm_check_writable(img)) < 0)
		return ret;
	if (m == QSM_M_WRITE && !vmstate &&
	    (ret = probed_raw_guard(img, offset, bytes, iov, iovcnt)) < 0)
		return ret;
	if (m == QSM_M_WRITE && !vmstate && !(flags & QSM_REQ_COR_FILL))
		qsm_bitmaps_dirty(img, offset, bytes);
	struct qsm_req *req = new_req(img, m, offset, bytes, iov, iovcnt, cb, opaque);
	if (!req)
		return -ENOMEM;
	req->flags = flags;
	qsm_sm_start(req);
	return 0;
}

static int submit_rw(struct qsm_image *img, enum qsm_machine m, uint64_t offset,
		     const struct iovec *iov, int iovcnt, unsigned flags, qsm_cb cb, void *opaque)
{
	if (iovcnt < 0 || (iovcnt > 0 && !iov))
		return -EINVAL;
	return submit_rw_at(img, m, offset, iov, iovcnt, qsm_iov_size(iov, iovcnt), flags, false,
			    cb, opaque);
}

static int submit_range(struct qsm_image *img, enum qsm_machine m, uint64_t offset,
			uint64_t bytes, unsigned flags, qsm_cb cb, void *opaque);

int qsm_vmstate_submit(struct qsm_image *img, enum qsm_machine m, uint64_t offset,
		       const struct iovec *iov, int iovcnt, uint64_t bytes, qsm_cb cb,
		       void *opaque)
{
	if (m == QSM_M_DISCARD)
		return submit_range(img, m, offset, bytes, QSM_REQ_VMSTATE, cb, opaque);
	assert(m == QSM_M_READ || m == QSM_M_WRITE);
	assert(bytes <= qsm_iov_size(iov, iovcnt));
	return submit_rw_at(img, m, offset, iov, iovcnt, bytes, QSM_REQ_VMSTATE, true, cb,
			    opaque);
}

int qsm_readv(struct qsm_image *img, uint64_t offset, const struct iovec *iov, int iovcnt,
	      qsm_cb cb, void *opaque)
{
	return submit_rw(img, QSM_M_READ, offset, iov, iovcnt, 0, cb, opaque);
}

int qsm_writev(struct qsm_image *img, uint64_t offset, const struct iovec *iov, int iovcnt,
	       qsm_cb cb, void *opaque)
{
	return submit_rw(img, QSM_M_WRITE, offset, iov, iovcnt, 0, cb, opaque);
}

int qsm_writev_flags(struct qsm_image *img, uint64_t offset, const struct iovec *iov,
		     int iovcnt, unsigned flags, qsm_cb cb, void *opaque)
{
	if (flags & ~QSM_REQ_FUA)
		return -EINVAL;
	return submit_rw(img, QSM_M_WRITE, offset, iov, iovcnt, flags, cb, opaque);
}

int qsm_flush(struct qsm_image *img, qsm_cb cb, void *opaque)
{
	if (img->closing)
		return -ESHUTDOWN;
	struct qsm_req *req = new_req(img, QSM_M_FLUSH, 0, 0, NULL, 0, cb, opaque);
	if (!req)
		return -ENOMEM;
	qsm_sm_start(req);
	return 0;
}

static int submit_range(struct qsm_image *img, enum qsm_machine m, uint64_t offset,
			uint64_t bytes, unsigned flags, qsm_cb cb, void *opaque)
{
	/* VM state (qsm_vmstate_submit): checked against the L1 table. */
	int ret = flags & QSM_REQ_VMSTATE ? (img->closing ? -ESHUTDOWN : 0)
					  : check_range(img, offset, bytes);
	if (ret == 0)
		ret = qsm_check_writable(img);
	if (ret == 0 && !(flags & QSM_REQ_VMSTATE))
		ret = probed_raw_guard(img, offset, bytes, NULL, 0);
	if (ret < 0)
		return ret;
	if (!(flags & (QSM_REQ_VMSTATE | QSM_REQ_COR_FILL)))
		qsm_bitmaps_dirty(img, offset, bytes);
	struct qsm_req *req = new_req(img, m, offset, bytes, NULL, 0, cb, opaque);
	if (!req)
		return -ENOMEM;
	req->flags = flags;
	qsm_sm_start(req);
	return 0;
}

int qsm_cor_fill(struct qsm_image *img, uint64_t offset, const struct iovec *iov, int iovcnt,
		 uint64_t len, bool zero, qsm_cb cb, void *opaque)
{
	if (img->closing)
		return -ESHUTDOWN;
	if (zero)
		return submit_range(img, QSM_M_ZEROES, offset, len, QSM_REQ_COR_FILL, cb, opaque);
	return submit_rw(img, QSM_M_WRITE, offset, iov, iovcnt, QSM_REQ_COR_FILL, cb, opaque);
}

int qsm_discard(struct qsm_image *img, uint64_t offset, uint64_t bytes, qsm_cb cb, void *opaque)
{
	return submit_range(img, QSM_M_DISCARD, offset, bytes, 0, cb, opaque);
}

int qsm_write_zeroes(struct qsm_image *img, uint64_t offset, uint64_t bytes, unsigned flags,
		     qsm_cb cb, void *opaque)
{
	if (flags & ~(QSM_ZERO_MAY_UNMAP | QSM_ZERO_FUA))
		return -EINVAL;
	return submit_range(img, QSM_M_ZEROES, offset, bytes, flags, cb, opaque);
}

int qsm_write_compressed(struct qsm_image *img, uint64_t offset, const struct iovec *iov,
			 int iovcnt, qsm_cb cb, void *opaque)
{
	if (img->closing)
		return -ESHUTDOWN;
	if (img->raw)
		return -ENOTSUP; /* no clusters to compress */
	if (iovcnt < 0 || (iovcnt > 0 && !iov))
		return -EINVAL;
	uint64_t bytes = qsm_iov_size(iov, iovcnt);
	int ret = check_range(img, offset, bytes);
	if (ret < 0)
		return ret;
	if ((ret = qsm_check_writable(img)) < 0)
		return ret;
	/* Dirty even when refused below: QEMU's block layer sets the bits of
	 * a write its driver then fails, this refusal included. */
	qsm_bitmaps_dirty(img, offset, bytes);
	/* Whole clusters, or up to the end of the disk (as QEMU). */
	if (!QSM_IS_ALIGNED(offset, img->cluster_size) ||
	    (!QSM_IS_ALIGNED(bytes, img->cluster_size) && offset + bytes != img->hdr.size))
		return -EINVAL;
	struct qsm_req *req = new_req(img, QSM_M_WRITE_COMPRESSED, offset, bytes, iov, iovcnt,
				      cb, opaque);
	if (!req)
		return -ENOMEM;
	qsm_sm_start(req);
	return 0;
}

int qsm_block_status(struct qsm_image *img, uint64_t offset, uint64_t bytes,
		     struct qsm_extent *out, qsm_cb cb, void *opaque)
{
	int ret = check_range(img, offset, bytes);
	if (ret < 0)
		return ret;
	if (!out)
		return -EINVAL;
	struct qsm_req *req = new_req(img, QSM_M_STATUS, offset, bytes, NULL, 0, cb, opaque);
	if (!req)
		return -ENOMEM;
	req->status_out = out;
	*out = (struct qsm_extent){ offset, 0, 0, 0 };
	qsm_sm_start(req);
	return 0;
}

/* --- small public helpers -------------------------------------------------- */

static const char *const cache_names[] = {
	[QSM_CACHE_WRITEBACK] = "writeback", [QSM_CACHE_NONE] = "none",
	[QSM_CACHE_WRITETHROUGH] = "writethrough", [QSM_CACHE_DIRECTSYNC] = "directsync",
	[QSM_CACHE_UNSAFE] = "unsafe",
};

int qsm_cache_mode_parse(const char *s, enum qsm_cache_mode *out)
{
	for (size_t i = 0; i < QSM_ARRAY_SIZE(cache_names); i++) {
		if (strcmp(s, cache_names[i]) == 0) {
			*out = (enum qsm_cache_mode)i;
			return 0;
		}
	}
	if (strcmp(s, "off") == 0) { /* qemu-io accepts off for none */
		*out = QSM_CACHE_NONE;
		return 0;
	}
	return -EINVAL;
}

const char *qsm_cache_mode_name(enum qsm_cache_mode m)
{
	return (unsigned)m < QSM_ARRAY_SIZE(cache_names) ? cache_names[m] : "?";
}

const char *qsm_strerror(int err)
{
	static __thread char buf[64];
	return strerror_r(err < 0 ? -err : err, buf, sizeof(buf));
}
