/*
 * sm/bitmaps.c: recording writes into persistent dirty bitmaps.
 *
 * Which: the bitmaps a read-write open finds enabled ("auto") and not in
 * use.  The open marks them in use (sm/image.c bitmaps_open_rw), then
 * qsm_bitmaps_load() reads their bits into memory and gives each one fresh
 * clusters (below).  From then on every guest write, zero write, discard
 * and compressed write sets the bits of the granules it touches when it is
 * submitted (qsm_bitmaps_dirty), and a snapshot apply sets them all: a
 * request that fails leaves its bits set, so a bitmap may name more than
 * changed, never less.  Copy-on-read fills and VM state change nothing a
 * guest reads and set nothing.  The close writes the bits back and clears
 * the in-use mark (CLOSE_BITMAPS, qsm_bitmaps_store_next).
 *
 * Fresh clusters (the load's "re-homing", QEMU's store done at open): the
 * bitmap's data is copied to newly allocated clusters, one per table entry
 * (QEMU leaves all-zeros and all-ones clusters out; qsm names every one),
 * and its table to a new one; the refcounts are made durable before the
 * new table is written and before the directory names it; the old table
 * and data clusters are released only after that.  So the close only
 * overwrites clusters this open allocated, which nothing else can name:
 * it never allocates (a close cannot block on refcount blocks) and never
 * writes into a cluster of the image's that a damaged table pointed at.
 *
 * Crash safety: the in-use mark guards everything between the open and
 * the close's last write.  A crash leaves the bitmap in use (QEMU's state
 * after its own crash: not to be used, removable) and at worst leaked
 * clusters; never a table naming a cluster whose refcount is not durable,
 * never a freed cluster still named.  The close clears the mark only
 * after the data is durable (write, flush, directory, flush).
 *
 * A bitmap whose load or re-homing fails stays in use and untracked: the
 * open goes on (nothing is lost; the bitmap says, as after a crash, that
 * it cannot be trusted).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "metadata/bitmap.h"
#include "sm/sm.h"

/* The bits of bitmap t->index, read from its table (checked at open). */
static int load_bits(struct qsm_image *img, struct qsm_tracked_bitmap *t)
{
	const struct qcow2_bitmap *b = &img->bitmaps.bm[t->index];
	uint64_t cs = img->cluster_size, *old;
	struct qsm_file_src src = { img->io, img->file_end };
	int ret = qcow2_bitmap_table_read(qsm_file_rd, &src, b, cs, &old);
	if (ret < 0)
		return ret;
	/* table_size * cs <= 512 MiB (metadata/bitmap.c). */
	if (!(t->data = calloc(b->table_size, cs))) {
		free(old);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < b->table_size && ret == 0; i++) {
		uint64_t off = old[i] & QCOW2_BITMAP_TABLE_OFFSET_MASK;
		if (off)
			ret = qsm_file_rd(&src, t->data + i * cs, cs, off);
		else if (old[i] & QCOW2_BITMAP_TABLE_ALL_ONES)
			memset(t->data + i * cs, 0xff, cs);
	}
	t->old_table = old;
	return ret;
}

/* Re-home bitmap t (see the top): fresh table and data clusters, durable
 * and named by the directory, then the old ones released. */
static int rehome(struct qsm_image *img, struct qsm_tracked_bitmap *t)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	struct qcow2_bitmap *b = &d->bm[t->index];
	uint64_t cs = img->cluster_size, n = b->table_size;
	uint64_t tclusters = QSM_DIV_ROUND_UP(n * 8, cs), base, toff;
	int ret;

	if (!(t->table = calloc(n, sizeof(*t->table))))
		return -ENOMEM;
	/* 1. clusters for the data and the table, the data written */
	if ((ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, n, &base, NULL))) < 0)
		return ret;
	for (uint64_t i = 0; i < n; i++)
		t->table[i] = base + i * cs;
	if ((ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, tclusters, &toff, NULL))) < 0)
		return ret;
	if ((ret = qsm_io_pwrite_sync(img->io, t->data, n * cs, base)) < 0)
		return ret;
	img->file_end = QSM_MAX(img->file_end, QSM_MAX(base + n * cs, toff + tclusters * cs));
	/* 2. their refcounts durable (the batch syncs the data first) */
	if ((ret = qsm_sync_writeback(img)) < 0)
		return ret;
	/* 3. the table, then the directory naming it (b is in use: a crash
	 *    leaves a bitmap nobody trusts, pointing at either table) */
	uint8_t *tb = calloc(tclusters, cs);
	if (!tb)
		return -ENOMEM;
	for (uint64_t i = 0; i < n; i++)
		qcow2_put_be64(tb + i * 8, t->table[i]);
	ret = qsm_io_pwrite_sync(img->io, tb, tclusters * cs, toff);
	free(tb);
	if (ret == 0)
		ret = qsm_io_flush_sync(img->io);
	if (ret < 0)
		return ret;
	uint64_t old_toff = b->table_offset;
	b->table_offset = toff;
	qcow2_put_be64(d->raw + b->entry, toff);
	if ((ret = qsm_io_pwrite_sync(img->io, d->raw, d->ext.dir_size, d->ext.dir_offset)) < 0 ||
	    (ret = qsm_io_flush_sync(img->io)) < 0)
		return ret;
	/* 4. the old table and data released (QEMU's free_bitmap_clusters),
	 *    but a cluster a damaged table named inside other metadata: that
	 *    one leaks rather than being handed out again */
	for (uint64_t i = 0; i < n && ret == 0; i++) {
		uint64_t off = t->old_table[i] & QCOW2_BITMAP_TABLE_OFFSET_MASK;
		if (off && !qsm_is_metadata(img, off))
			ret = qsm_refcount_update(img->rc, off / cs, 1, -1, NULL);
	}
	for (uint64_t i = 0; i < tclusters && ret == 0; i++)
		if (!qsm_is_metadata(img, old_toff + i * cs))
			ret = qsm_refcount_update(img->rc, old_toff / cs + i, 1, -1, NULL);
	if (ret == 0)
		ret = qsm_sync_writeback(img);
	return qsm_image_rc_error(img, ret);
}

static void tracked_release(struct qsm_tracked_bitmap *t)
{
	free(t->data);
	free(t->table);
	free(t->old_table);
	memset(t, 0, sizeof(*t));
}

void qsm_bitmaps_load(struct qsm_image *img)
{
	uint32_t k = 0;
	for (uint32_t i = 0; i < img->nb_tracked; i++) {
		struct qsm_tracked_bitmap *t = &img->tracked[i];
		if (load_bits(img, t) < 0 || rehome(img, t) < 0 || img->error) {
			tracked_release(t);
			continue;
		}
		free(t->old_table);
		t->old_table = NULL;
		t->recording = true;
		img->tracked[k++] = *t;
	}
	img->nb_tracked = k;
}

void qsm_bitmaps_dirty(struct qsm_image *img, uint64_t offset, uint64_t bytes)
{
	for (uint32_t i = 0; i < img->nb_tracked; i++) {
		const struct qsm_tracked_bitmap *t = &img->tracked[i];
		const struct qcow2_bitmap *b = &img->bitmaps.bm[t->index];
		if (!t->recording)
			continue;
		/* The data covers table_size * cs * 8 granules: at least the
		 * disk (qsm_bitmaps_cover keeps it so). */
		uint64_t covers = ((uint64_t)b->table_size << (img->cluster_bits + 3))
				  << b->granularity_bits;
		if (offset >= covers)
			continue;
		qcow2_bitmap_set_range(t->data, b->granularity_bits, offset,
				       QSM_MIN(bytes, covers - offset));
	}
}

bool qsm_bitmaps_store_next(struct qsm_image *img, uint64_t step, enum qsm_io_op *op,
			    uint64_t *offset, void **buf, size_t *len)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	uint64_t cs = img->cluster_size;
	bool any = false;
	for (uint32_t i = 0; i < img->nb_tracked; i++)
		any |= img->tracked[i].recording;
	if (!any)
		return false;
	/* steps: every data cluster of every tracked bitmap, a flush, the
	 * directory with their in-use marks cleared, a flush */
	for (uint32_t i = 0; i < img->nb_tracked; i++) {
		const struct qsm_tracked_bitmap *t = &img->tracked[i];
		uint32_t n = t->recording ? d->bm[t->index].table_size : 0;
		if (step < n) {
			*op = QSM_IO_WRITE;
			*offset = t->table[step];
			*buf = t->data + step * cs;
			*len = (size_t)cs;
			return true;
		}
		step -= n;
	}
	*buf = NULL;
	*len = 0;
	*offset = 0;
	*op = QSM_IO_FLUSH;
	if (step == 1) {
		for (uint32_t i = 0; i < img->nb_tracked; i++) {
			uint32_t x = img->tracked[i].index;
			if (img->tracked[i].recording)
				qcow2_bitmap_set_flags(d, x, d->bm[x].flags & ~QCOW2_BITMAP_IN_USE);
		}
		*op = QSM_IO_WRITE;
		*offset = d->ext.dir_offset;
		*buf = d->raw;
		*len = (size_t)d->ext.dir_size;
	}
	return step <= 2;
}

static struct qsm_tracked_bitmap *find_loaded(struct qsm_image *img, unsigned index)
{
	for (uint32_t i = 0; i < img->nb_tracked; i++)
		if (img->tracked[i].index == index)
			return &img->tracked[i];
	return NULL;
}

int qsm_bitmap_load(struct qsm_image *img, unsigned index, char *err, size_t errlen)
{
	const struct qcow2_bitmap_dir *d = &img->bitmaps;
	if (err && errlen)
		err[0] = 0;
	if (index >= d->ext.nb) {
		qsm_set_err(err, errlen, "no bitmap %u", index);
		return -ENOENT;
	}
	if (find_loaded(img, index))
		return 0;
	if (d->bm[index].flags & QCOW2_BITMAP_IN_USE) {
		qsm_set_err(err, errlen, "Bitmap '%s' is inconsistent and cannot be used",
			    d->bm[index].name);
		return -EBUSY;
	}
	if (img->in_flight) {
		qsm_set_err(err, errlen, "Requests are in flight");
		return -EBUSY;
	}
	/* Room for every bitmap once: each index is loaded at most once. */
	if (!img->tracked && !(img->tracked = calloc(d->ext.nb, sizeof(*img->tracked))))
		return -ENOMEM;
	struct qsm_tracked_bitmap *t = &img->tracked[img->nb_tracked];
	*t = (struct qsm_tracked_bitmap){ .index = index };
	bool live = qsm_io_set_live(img->io, false);
	int ret = load_bits(img, t);
	qsm_io_set_live(img->io, live);
	free(t->old_table);
	t->old_table = NULL;
	if (ret < 0) {
		tracked_release(t);
		qsm_set_err(err, errlen, "Could not read bitmap '%s': %s", d->bm[index].name,
			    strerror(-ret));
		return ret;
	}
	img->nb_tracked++;
	return 0;
}

int qsm_bitmap_extent(struct qsm_image *img, unsigned index, uint64_t offset, uint64_t bytes,
		      bool *dirty, uint64_t *len)
{
	const struct qsm_tracked_bitmap *t = find_loaded(img, index);
	if (!t)
		return -ENOENT;
	if (!bytes || offset >= img->hdr.size || !dirty || !len)
		return -EINVAL;
	unsigned g = img->bitmaps.bm[index].granularity_bits;
	uint64_t end = QSM_MIN(img->hdr.size - offset, bytes) + offset;
	uint64_t first = offset >> g, n = qcow2_bitmap_run(t->data, first, ((end - 1) >> g) + 1, dirty);
	*len = QSM_MIN(end, (first + n) << g) - offset;
	return 0;
}

void qsm_bitmaps_release(struct qsm_image *img)
{
	for (uint32_t i = 0; i < img->nb_tracked; i++)
		tracked_release(&img->tracked[i]);
	free(img->tracked);
	img->tracked = NULL;
	img->nb_tracked = 0;
}

