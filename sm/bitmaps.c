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
 * bitmap is given newly allocated data clusters, one per table entry
 * (QEMU leaves all-zeros and all-ones clusters out; qsm names every one),
 * not written but for the last (its bits are in memory, the bitmap is in
 * use, and the close writes every one of them), and a new table naming
 * them; the refcounts are made durable before the new table is written
 * and before the directory names it; the old table and data clusters are
 * released only after that.  So the close only
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
 *
 * Edits (qsm_bitmap_add and the others, the end of this file) are
 * blocking and follow one rule: nothing the header or directory names is
 * overwritten but the directory's own in-place fields (flags, a table
 * offset: one aligned write each).  A new directory goes to fresh
 * clusters, durable before the header names it; new bits go to fresh
 * clusters, durable before the directory names their table; old clusters
 * are released only after nothing names them.  A crash leaves the old
 * state or the new, at worst with leaked clusters.
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

static bool all_zero(const uint8_t *p, size_t n)
{
	return n == 0 || (p[0] == 0 && !memcmp(p, p + 1, n - 1));
}

/*
 * Fresh clusters for a bitmap of n table entries holding `data` (NULL:
 * all zeros): data clusters for every entry when `every` (a bitmap the
 * close overwrites in place: allocated, not written, but for the last),
 * else only for those with a bit set (QEMU's layout: entry 0 reads as
 * zeros), then the table.  The data written, the
 * refcounts made durable (the batch syncs the data first), the table
 * written and flushed: a directory may name it from then on.  Its entries
 * in *table (host endian, the caller frees them), its offset in *toff.
 */
static int write_fresh(struct qsm_image *img, const uint8_t *data, uint32_t n, bool every,
		       uint64_t **table, uint64_t *toff)
{
	uint64_t cs = img->cluster_size, tclusters = QSM_DIV_ROUND_UP((uint64_t)n * 8, cs);
	uint64_t nd = 0, base = 0, *t = calloc(n, sizeof(*t));
	uint8_t *tb = NULL;
	int ret;

	if (!(*table = t))
		return -ENOMEM;
	for (uint32_t i = 0; data && i < n; i++)
		nd += every || !all_zero(data + i * cs, cs);
	if (nd && (ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, nd, &base, NULL))) < 0)
		return ret;
	/* the chosen entries take base, base + cs, ... in order: a run of
	 * them is one write.  With every, the bitmap is in use until the
	 * close writes each of its clusters: only the last is written now,
	 * so that the file holds them all (what the others hold until then,
	 * zeros or an old cluster's bytes, no reader trusts). */
	for (uint32_t i = 0; every && i < nd; i++)
		t[i] = base + i * cs;
	if (every && nd && (ret = qsm_io_pwrite_sync(img->io, data + (n - 1) * cs, cs,
						     t[n - 1])) < 0)
		return ret;
	for (uint32_t i = 0, k = 0; !every && nd && i < n;) {
		if (!every && all_zero(data + i * cs, cs)) {
			i++;
			continue;
		}
		uint32_t j = i;
		while (j < n && (every || !all_zero(data + j * cs, cs)))
			t[j++] = base + k++ * cs;
		if ((ret = qsm_io_pwrite_sync(img->io, data + i * cs, (j - i) * cs, t[i])) < 0)
			return ret;
		i = j;
	}
	if ((ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, tclusters, toff, NULL))) < 0)
		return ret;
	img->file_end = QSM_MAX(img->file_end, QSM_MAX(base + nd * cs, *toff + tclusters * cs));
	if ((ret = qsm_sync_writeback(img)) < 0)
		return ret;
	if (!(tb = calloc(tclusters, cs)))
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++)
		qcow2_put_be64(tb + i * 8, t[i]);
	ret = qsm_io_pwrite_sync(img->io, tb, tclusters * cs, *toff);
	free(tb);
	return ret ? ret : qsm_io_flush_sync(img->io);
}

/* The directory as it is in memory, written in place and flushed. */
static int dir_write(struct qsm_image *img)
{
	const struct qcow2_bitmap_dir *d = &img->bitmaps;
	int ret = qsm_io_pwrite_sync(img->io, d->raw, d->ext.dir_size, d->ext.dir_offset);
	return ret ? ret : qsm_io_flush_sync(img->io);
}

/* Bitmap i's entry pointed at the table at toff, in place (an aligned
 * 8-byte field: the switch from the old table to the new is one write). */
static int dir_point(struct qsm_image *img, uint32_t i, uint64_t toff)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	d->bm[i].table_offset = toff;
	qcow2_put_be64(d->raw + d->bm[i].entry, toff);
	return dir_write(img);
}

/* A table of n entries at toff and its data clusters, named by nothing
 * any more, released (QEMU's free_bitmap_clusters), durably; a cluster a
 * damaged table named inside other metadata leaks rather than being
 * handed out again.  table NULL: the table alone. */
static int release_clusters(struct qsm_image *img, const uint64_t *table, uint32_t n,
			    uint64_t toff)
{
	uint64_t cs = img->cluster_size, tclusters = QSM_DIV_ROUND_UP((uint64_t)n * 8, cs);
	int ret = 0;
	for (uint32_t i = 0; table && i < n && ret == 0; i++) {
		uint64_t off = table[i] & QCOW2_BITMAP_TABLE_OFFSET_MASK;
		if (off && !qsm_is_metadata(img, off))
			ret = qsm_refcount_update(img->rc, off / cs, 1, -1, NULL);
	}
	for (uint64_t i = 0; i < tclusters && ret == 0; i++)
		if (!qsm_is_metadata(img, toff + i * cs))
			ret = qsm_refcount_update(img->rc, toff / cs + i, 1, -1, NULL);
	if (ret == 0)
		ret = qsm_sync_writeback(img);
	return qsm_image_rc_error(img, ret);
}

/* Re-home bitmap t (see the top), its bits and old table loaded: fresh
 * clusters for every entry, the directory pointed at them, the old
 * clusters released.  A crash leaves the directory naming either table
 * (the bitmap is in use: nobody trusts either). */
static int rehome(struct qsm_image *img, struct qsm_tracked_bitmap *t)
{
	struct qcow2_bitmap *b = &img->bitmaps.bm[t->index];
	uint64_t old_toff = b->table_offset, toff;
	int ret = write_fresh(img, t->data, b->table_size, true, &t->table, &toff);
	if (ret == 0)
		ret = dir_point(img, t->index, toff);
	return ret ? ret : release_clusters(img, t->old_table, b->table_size, old_toff);
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
	for (uint32_t i = 0; i < img->nb_tracked && !img->bitmaps_quiet; i++) {
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

/* Bitmap index's bits read into the next slot of img->tracked (room for
 * it there), to be read, not recorded into: 0, or -errno with err set
 * and no slot taken. */
static int load_slot(struct qsm_image *img, uint32_t index, char *err, size_t errlen)
{
	struct qsm_tracked_bitmap *t = &img->tracked[img->nb_tracked];
	*t = (struct qsm_tracked_bitmap){ .index = index };
	int ret = load_bits(img, t);
	free(t->old_table);
	t->old_table = NULL;
	if (ret < 0) {
		tracked_release(t);
		qsm_set_err(err, errlen, "Could not read bitmap '%s': %s",
			    img->bitmaps.bm[index].name, strerror(-ret));
		return ret;
	}
	img->nb_tracked++;
	return 0;
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
	bool live = qsm_io_set_live(img->io, false);
	int ret = load_slot(img, index, err, errlen);
	qsm_io_set_live(img->io, live);
	return ret;
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

/* --- Editing (qemu-img bitmap) ------------------------------------------- */

int qsm_bitmap_find(struct qsm_image *img, const char *name)
{
	for (uint32_t i = 0; i < img->bitmaps.ext.nb; i++)
		if (!strcmp(img->bitmaps.bm[i].name, name))
			return (int)i;
	return -ENOENT;
}

/* Every edit: a read-write qcow2 image, nothing in flight or in error;
 * then blocking I/O with the handle not live. */
static int edit_check(struct qsm_image *img, char *err, size_t errlen)
{
	if (err && errlen)
		err[0] = 0;
	if (img->raw) {
		qsm_set_err(err, errlen, "Can't store persistent bitmaps: Operation not supported");
		return -ENOTSUP;
	}
	if (img->read_only) {
		qsm_set_err(err, errlen, "Cannot store dirty bitmaps in a read-only image");
		return -EROFS;
	}
	if (img->in_flight) {
		qsm_set_err(err, errlen, "Requests are in flight");
		return -EBUSY;
	}
	if (img->error) {
		qsm_set_err(err, errlen, "%s", strerror(-img->error));
		return img->error;
	}
	return 0;
}

/* Bitmap i may be read and changed: not in use, but as this session's own
 * recording mark (QEMU's bdrv_dirty_bitmap_check). */
static int usable(struct qsm_image *img, unsigned i, char *err, size_t errlen)
{
	const struct qsm_tracked_bitmap *t = find_loaded(img, i);
	if (i >= img->bitmaps.ext.nb)
		return -ENOENT;
	if ((img->bitmaps.bm[i].flags & QCOW2_BITMAP_IN_USE) && !(t && t->recording)) {
		qsm_set_err(err, errlen, "Bitmap '%s' is inconsistent and cannot be used",
			    img->bitmaps.bm[i].name);
		return -EBUSY;
	}
	return 0;
}

/* Room in img->tracked for one bitmap more than the directory has. */
static int tracked_room(struct qsm_image *img, uint32_t nb)
{
	struct qsm_tracked_bitmap *t = realloc(img->tracked, (nb + 1) * sizeof(*t));
	if (!t)
		return -ENOMEM;
	img->tracked = t;
	return 0;
}

/* A copy of the directory to edit: parsed again from its bytes. */
static int dir_copy(struct qsm_image *img, struct qcow2_bitmap_dir *nd)
{
	const struct qcow2_bitmap_dir *d = &img->bitmaps;
	memset(nd, 0, sizeof(*nd));
	if (!d->ext.nb)
		return 0;
	return qcow2_bitmap_dir_parse(d->raw, &d->ext, img->hdr.size, img->cluster_bits, nd, NULL,
				      0);
}

/*
 * The edited directory nd made the image's, as QEMU's bitmap_list_store
 * (not in place) and update_ext_header_and_dir do it: nd written to fresh
 * clusters, their refcounts durable; the header naming it (one sector: a
 * crash leaves the old directory or the new, each whole); then the old
 * directory's clusters released.  Takes nd (released on failure).
 */
static int dir_store(struct qsm_image *img, struct qcow2_bitmap_dir *nd)
{
	uint64_t cs = img->cluster_size, n = QSM_DIV_ROUND_UP(nd->ext.dir_size, cs), off = 0;
	struct qcow2_bitmaps_ext old = img->bitmaps.ext;
	int ret = 0;
	if (nd->ext.nb) {
		uint8_t *buf = calloc(n, cs);
		if (!buf)
			ret = -ENOMEM;
		if (ret == 0)
			ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, n, &off, NULL));
		if (ret == 0) {
			memcpy(buf, nd->raw, (size_t)nd->ext.dir_size);
			ret = qsm_io_pwrite_sync(img->io, buf, n * cs, off);
			img->file_end = QSM_MAX(img->file_end, off + n * cs);
		}
		free(buf);
	}
	/* The write-back done first: the header in memory then holds nothing
	 * the disk's lacks, but its dirty bit may run ahead of the disk's
	 * (sm/writeback.c), and the disk keeps its own. */
	if (ret == 0)
		ret = qsm_sync_writeback(img);
	nd->ext.dir_offset = off;
	if (ret == 0 && (ret = qcow2_bitmaps_ext_put(&img->hdr, &nd->ext)) == 0) {
		uint64_t f = img->hdr.incompatible_features;
		img->hdr.incompatible_features = (f & ~QCOW2_INCOMPAT_DIRTY) |
						 (img->disk_dirty ? QCOW2_INCOMPAT_DIRTY : 0);
		ret = qsm_header_write_sync(img);
		img->hdr.incompatible_features = f;
		if (ret < 0) /* the header in memory names the old one again */
			(void)qcow2_bitmaps_ext_put(&img->hdr, &old);
	}
	if (ret < 0) {
		qcow2_bitmap_dir_release(nd);
		return ret;
	}
	qcow2_bitmap_dir_release(&img->bitmaps);
	img->bitmaps = *nd;
	if ((ret = qsm_image_meta_rebuild(img)) < 0)
		return ret;
	for (uint64_t i = 0; old.nb && i < QSM_DIV_ROUND_UP(old.dir_size, cs) && ret == 0; i++)
		if (!qsm_is_metadata(img, old.dir_offset + i * cs))
			ret = qsm_refcount_update(img->rc, old.dir_offset / cs + i, 1, -1, NULL);
	if (ret == 0)
		ret = qsm_sync_writeback(img);
	return qsm_image_rc_error(img, ret);
}

/* A new bitmap (qsm_bitmap_add), its name and granularity checked: QEMU's
 * qcow2_co_can_store_new_dirty_bitmap, then the name's uniqueness, before
 * anything is allocated. */
static int add(struct qsm_image *img, const char *name, unsigned g, bool enabled, char *err,
	       size_t errlen)
{
	uint64_t cs = img->cluster_size;
	uint32_t n = qcow2_bitmap_table_size(img->hdr.size, g, img->cluster_bits);
	char why[256] = "";
	int ret = 0;
	if (img->hdr.version < 3) {
		qsm_set_err(why, sizeof(why), "Cannot store dirty bitmaps in qcow2 v2 files");
		ret = -ENOTSUP;
	} else if (n == 0 || (uint64_t)n * cs > QCOW2_BITMAP_MAX_PHYS_SIZE) {
		qsm_set_err(why, sizeof(why), "Too much space will be occupied by the bitmap. "
			    "Use larger granularity");
		ret = -EINVAL;
	} else {
		ret = qcow2_bitmap_dir_room(&img->bitmaps, strlen(name), why, sizeof(why));
	}
	if (ret < 0) {
		qsm_set_err(err, errlen, "Can't make bitmap '%s' persistent: %s", name, why);
		return ret;
	}
	if (qsm_bitmap_find(img, name) >= 0) {
		qsm_set_err(err, errlen, "Bitmap already exists: %s", name);
		return -EEXIST;
	}
	struct qsm_tracked_bitmap t = { .index = img->bitmaps.ext.nb, .recording = enabled };
	struct qcow2_bitmap_dir nd;
	uint64_t toff;
	ret = tracked_room(img, img->bitmaps.ext.nb);
	if (ret == 0 && enabled && !(t.data = calloc(n, cs)))
		ret = -ENOMEM;
	/* an enabled bitmap is recorded into from now on: in use, with a data
	 * cluster for every entry, as the open leaves the ones it tracks */
	if (ret == 0)
		ret = write_fresh(img, t.data, n, enabled, &t.table, &toff);
	if (ret == 0 && (ret = dir_copy(img, &nd)) == 0) {
		struct qcow2_bitmap b = {
			.table_offset = toff, .table_size = n, .granularity_bits = (uint8_t)g,
			.flags = enabled ? QCOW2_BITMAP_AUTO | QCOW2_BITMAP_IN_USE : 0, .name = name,
		};
		if ((ret = qcow2_bitmap_dir_append(&nd, &b, img->hdr.size, img->cluster_bits, err,
						   errlen)) < 0)
			qcow2_bitmap_dir_release(&nd);
		else
			ret = dir_store(img, &nd);
	}
	if (ret < 0 || !enabled) {
		tracked_release(&t);
		return ret;
	}
	img->tracked[img->nb_tracked++] = t;
	return 0;
}

int qsm_bitmap_add(struct qsm_image *img, const char *name, uint64_t granularity, bool enabled,
		   char *err, size_t errlen)
{
	if (err && errlen)
		err[0] = 0;
	if (!name[0]) {
		qsm_set_err(err, errlen, "Bitmap name cannot be empty");
		return -EINVAL;
	}
	if (!granularity) /* bdrv_get_default_bitmap_granularity */
		granularity = QSM_MIN(QSM_MAX(img->cluster_size, 4096), 65536);
	if (granularity < 512 || granularity > (1ull << 31) || (granularity & (granularity - 1))) {
		qsm_set_err(err, errlen, "Granularity must be power of 2 and at least 512");
		return -EINVAL;
	}
	int ret = edit_check(img, err, errlen);
	if (ret < 0)
		return ret;
	bool live = qsm_io_set_live(img->io, false);
	ret = add(img, name, (unsigned)__builtin_ctzll(granularity), enabled, err, errlen);
	qsm_io_set_live(img->io, live);
	return ret;
}

/* Bitmap i's table as the directory names it: this session's own for one
 * it records into, else read and checked (NULL when it cannot be: its
 * data clusters then leak, never freed on the word of a bad table). */
static uint64_t *table_of(struct qsm_image *img, uint32_t i)
{
	const struct qsm_tracked_bitmap *t = find_loaded(img, i);
	const struct qcow2_bitmap *b = &img->bitmaps.bm[i];
	struct qsm_file_src src = { img->io, img->file_end };
	uint64_t *table = NULL;
	if (t && t->recording)
		return (table = malloc(b->table_size * sizeof(*table)))
			       ? memcpy(table, t->table, b->table_size * sizeof(*table))
			       : NULL;
	if (qcow2_bitmap_table_read(qsm_file_rd, &src, b, img->cluster_size, &table) < 0)
		return NULL;
	return table;
}

/* Forget bitmap i's bits (it left the directory): later ones move down. */
static void tracked_drop(struct qsm_image *img, uint32_t i)
{
	uint32_t k = 0;
	for (uint32_t j = 0; j < img->nb_tracked; j++) {
		struct qsm_tracked_bitmap *t = &img->tracked[j];
		if (t->index == i) {
			tracked_release(t);
			continue;
		}
		if (t->index > i)
			t->index--;
		img->tracked[k++] = *t;
	}
	img->nb_tracked = k;
}

static int remove_one(struct qsm_image *img, uint32_t i, char *err, size_t errlen)
{
	const struct qcow2_bitmap *b = &img->bitmaps.bm[i];
	uint64_t toff = b->table_offset;
	uint32_t n = b->table_size;
	uint64_t *table = table_of(img, i);
	struct qcow2_bitmap_dir nd;
	int ret = dir_copy(img, &nd);
	if (ret == 0 && (ret = qcow2_bitmap_dir_remove(&nd, i, img->hdr.size, img->cluster_bits,
						       err, errlen)) < 0)
		qcow2_bitmap_dir_release(&nd);
	else if (ret == 0 && (ret = dir_store(img, &nd)) == 0) {
		tracked_drop(img, i);
		/* a table that could not be read: its data leaks, the table
		 * itself goes (the directory named it) */
		ret = release_clusters(img, table, n, toff);
	}
	free(table);
	return ret;
}

int qsm_bitmap_remove(struct qsm_image *img, unsigned index, char *err, size_t errlen)
{
	int ret = edit_check(img, err, errlen);
	if (ret < 0)
		return ret;
	if (index >= img->bitmaps.ext.nb)
		return -ENOENT;
	bool live = qsm_io_set_live(img->io, false);
	ret = remove_one(img, index, err, errlen);
	qsm_io_set_live(img->io, live);
	return ret;
}

/* The slot of bitmap i in img->tracked, its bits loaded (a fresh slot
 * when it had none): the old table in t->old_table. */
static struct qsm_tracked_bitmap *slot(struct qsm_image *img, uint32_t i)
{
	struct qsm_tracked_bitmap *t = find_loaded(img, i);
	if (t)
		tracked_release(t);
	else
		t = &img->tracked[img->nb_tracked];
	*t = (struct qsm_tracked_bitmap){ .index = i };
	return t;
}

/* Slot t given back: its bits dropped, a hole in img->tracked closed. */
static void slot_drop(struct qsm_image *img, struct qsm_tracked_bitmap *t)
{
	bool counted = t < img->tracked + img->nb_tracked;
	tracked_release(t);
	if (counted)
		*t = img->tracked[--img->nb_tracked];
}

static int enable(struct qsm_image *img, uint32_t i)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	int ret;
	/* in use from the first write on, as the open marks what it tracks */
	qcow2_bitmap_set_flags(d, i, d->bm[i].flags | QCOW2_BITMAP_AUTO | QCOW2_BITMAP_IN_USE);
	if ((ret = dir_write(img)) < 0)
		return ret;
	struct qsm_tracked_bitmap *t = slot(img, i);
	bool fresh = t == img->tracked + img->nb_tracked;
	if ((ret = load_bits(img, t)) < 0 || (ret = rehome(img, t)) < 0) {
		/* in use and untracked: untrusted, as after a crash */
		if (fresh)
			tracked_release(t);
		else
			slot_drop(img, t);
		return ret;
	}
	free(t->old_table);
	t->old_table = NULL;
	t->recording = true;
	if (fresh)
		img->nb_tracked++;
	return 0;
}

static int disable(struct qsm_image *img, uint32_t i)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	struct qsm_tracked_bitmap *t = find_loaded(img, i);
	uint64_t cs = img->cluster_size;
	int ret = 0;
	/* the bits this session recorded stored first, then the marks gone:
	 * the close's store, for one bitmap */
	for (uint32_t k = 0; t && t->recording && k < d->bm[i].table_size && ret == 0; k++)
		ret = qsm_io_pwrite_sync(img->io, t->data + k * cs, cs, t->table[k]);
	if (ret == 0 && t && t->recording)
		ret = qsm_io_flush_sync(img->io);
	if (ret < 0)
		return ret;
	qcow2_bitmap_set_flags(d, i, d->bm[i].flags & ~(QCOW2_BITMAP_AUTO | QCOW2_BITMAP_IN_USE));
	if ((ret = dir_write(img)) < 0)
		return ret;
	if (t && t->recording) { /* its bits stay loaded: they no longer change */
		t->recording = false;
		free(t->table);
		t->table = NULL;
	}
	return 0;
}

int qsm_bitmap_enable(struct qsm_image *img, unsigned index, bool on, char *err, size_t errlen)
{
	int ret = edit_check(img, err, errlen);
	if (ret < 0 || (ret = usable(img, index, err, errlen)) < 0)
		return ret;
	if (!(img->bitmaps.bm[index].flags & QCOW2_BITMAP_AUTO) == !on)
		return 0;
	if (on && (ret = tracked_room(img, img->bitmaps.ext.nb)) < 0)
		return ret;
	bool live = qsm_io_set_live(img->io, false);
	ret = on ? enable(img, index) : disable(img, index);
	qsm_io_set_live(img->io, live);
	return ret;
}

/*
 * Bitmap i (not recorded into, its table `old` as read) given the bits
 * `data`: a fresh table and data clusters in QEMU's layout, the directory
 * pointed at them, the old ones released.  A crash leaves the old bits or
 * the new, each whole and durable.
 */
static int rewrite(struct qsm_image *img, uint32_t i, const uint8_t *data, const uint64_t *old)
{
	const struct qcow2_bitmap *b = &img->bitmaps.bm[i];
	uint64_t old_toff = b->table_offset, toff, *table = NULL;
	uint32_t n = b->table_size;
	int ret = write_fresh(img, data, n, false, &table, &toff);
	if (ret == 0)
		ret = dir_point(img, i, toff);
	if (ret == 0)
		ret = release_clusters(img, old, n, old_toff);
	free(table);
	return ret;
}

/* Bitmap i's bits changed by `change` (clear or merge): in memory when
 * recorded into (stored by the close), else rewritten now. */
static int change_bits(struct qsm_image *img, uint32_t i,
		       void (*change)(struct qsm_image *img, uint32_t i, uint8_t *data, void *arg),
		       void *arg)
{
	struct qsm_tracked_bitmap *t = find_loaded(img, i);
	if (t && t->recording) {
		change(img, i, t->data, arg);
		return 0;
	}
	struct qsm_tracked_bitmap tmp = { .index = i };
	int ret = load_bits(img, &tmp);
	if (ret == 0) {
		change(img, i, tmp.data, arg);
		ret = rewrite(img, i, tmp.data, tmp.old_table);
	}
	if (ret == 0 && t) /* loaded to be read: it reads the new bits */
		memcpy(t->data, tmp.data, (size_t)img->bitmaps.bm[i].table_size * img->cluster_size);
	tracked_release(&tmp);
	return ret;
}

static void clear_bits(struct qsm_image *img, uint32_t i, uint8_t *data, void *arg)
{
	(void)arg;
	memset(data, 0, (size_t)img->bitmaps.bm[i].table_size * img->cluster_size);
}

int qsm_bitmap_clear(struct qsm_image *img, unsigned index, char *err, size_t errlen)
{
	int ret = edit_check(img, err, errlen);
	if (ret < 0 || (ret = usable(img, index, err, errlen)) < 0)
		return ret;
	bool live = qsm_io_set_live(img->io, false);
	ret = change_bits(img, index, clear_bits, NULL);
	qsm_io_set_live(img->io, live);
	return ret;
}

struct merge_src {
	const uint8_t *data;
	unsigned granularity_bits;
};

/* dst |= src, granule by granule of the disk (granularities may differ). */
static void merge_bits(struct qsm_image *img, uint32_t i, uint8_t *data, void *arg)
{
	const struct merge_src *s = arg;
	unsigned g = img->bitmaps.bm[i].granularity_bits;
	uint64_t size = img->hdr.size, end = (size + (1ull << s->granularity_bits) - 1) >>
					      s->granularity_bits;
	if (g == s->granularity_bits) { /* bytes at a time, none past the disk */
		for (uint64_t k = 0; k < end / 8; k++)
			data[k] |= s->data[k];
		if (end % 8)
			data[end / 8] |= s->data[end / 8] & (uint8_t)((1u << (end % 8)) - 1);
		return;
	}
	for (uint64_t k = 0; k < end;) {
		bool set;
		uint64_t run = qcow2_bitmap_run(s->data, k, end, &set);
		if (set) {
			uint64_t off = k << s->granularity_bits;
			qcow2_bitmap_set_range(data, g, off,
					       QSM_MIN(size, (k + run) << s->granularity_bits) - off);
		}
		k += run;
	}
}

int qsm_bitmap_merge(struct qsm_image *img, unsigned dst, struct qsm_image *src_img,
		     unsigned src, char *err, size_t errlen)
{
	int ret = edit_check(img, err, errlen);
	if (ret < 0 || (ret = usable(img, dst, err, errlen)) < 0 ||
	    (ret = usable(src_img, src, err, errlen)) < 0)
		return ret;
	if (src_img->hdr.size != img->hdr.size) {
		qsm_set_err(err, errlen, "Bitmaps are of different sizes (destination size is %llu, "
			    "source size is %llu) and can't be merged",
			    (unsigned long long)img->hdr.size, (unsigned long long)src_img->hdr.size);
		return -EINVAL;
	}
	if (src_img->in_flight) {
		qsm_set_err(err, errlen, "Requests are in flight");
		return -EBUSY;
	}
	const struct qsm_tracked_bitmap *st = find_loaded(src_img, src);
	struct qsm_tracked_bitmap tmp = { .index = src };
	bool live = qsm_io_set_live(img->io, false);
	bool src_live = src_img == img ? live : qsm_io_set_live(src_img->io, false);
	if (!st && (ret = load_bits(src_img, &tmp)) == 0)
		st = &tmp;
	if (ret == 0) {
		struct merge_src s = { st->data, src_img->bitmaps.bm[src].granularity_bits };
		ret = change_bits(img, dst, merge_bits, &s);
	}
	if (src_img != img)
		qsm_io_set_live(src_img->io, src_live);
	qsm_io_set_live(img->io, live);
	tracked_release(&tmp);
	return ret;
}

/* --- Resizing (qsm_truncate) --------------------------------------------- */
/*
 * A disk of a new size needs every bitmap's table sized for it exactly (an
 * open refuses any other, as QEMU's load_bitmap_data does) and no bit set
 * past its end.  QEMU cuts or extends its bitmaps in memory and stores
 * them at close; qsm rewrites them within the truncate, around the size
 * change:
 *  1. before anything changes, refuse a bitmap in use that this session
 *     does not record into (QEMU's qcow2_truncate_bitmaps_check, in its
 *     words) and one the format cannot hold at the new size; load the
 *     bits of every other and mark the ones not in use in use (in place,
 *     durable): from here a crash leaves every bitmap untrusted, none
 *     sized for the other size;
 *  2. the size change;
 *  3. each bitmap's bits cut or extended to the size the header now has,
 *     written to fresh clusters (every entry for one this session records
 *     into, which the close then overwrites as always), a new directory
 *     naming them with the marks of step 1 cleared, the old clusters
 *     released.  When step 2 failed and the size is as it was, the marks
 *     are cleared in place.
 * If step 3 fails the bitmaps stay in use and are no longer recorded into
 * (the close does not clear the marks): untrusted, never wrong.
 */

int qsm_bitmaps_cover(struct qsm_image *img, uint64_t size, char *err, size_t errlen)
{
	const struct qcow2_bitmap_dir *d = &img->bitmaps;
	for (uint32_t i = 0; i < d->ext.nb && size != img->hdr.size; i++) {
		const struct qcow2_bitmap *b = &d->bm[i];
		if (usable(img, i, err, errlen) < 0)
			return -EBUSY;
		if (b->table_size != qcow2_bitmap_table_size(size, b->granularity_bits,
							     img->cluster_bits)) {
			qsm_set_err(err, errlen, "Bitmap '%s' would need a table of another "
				    "size for %llu bytes: qsm resizes bitmaps only with the image "
				    "(qsm resize)", b->name, (unsigned long long)size);
			return -ENOTSUP;
		}
	}
	return 0;
}

struct resized {
	uint8_t *data;        /* the bits at the new size */
	uint64_t *fresh;      /* their new table */
	uint64_t *old;        /* the table before (NULL: unreadable, its data leaks) */
	uint64_t old_toff;
	uint32_t old_n;
	bool had;             /* loaded before step 1 */
};

/* Step 3 for all bitmaps (r: one each, step 1's state). */
static int resize_store(struct qsm_image *img, struct resized *r)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps, nd;
	uint64_t cs = img->cluster_size, size = img->hdr.size;
	int ret = dir_copy(img, &nd);
	for (uint32_t i = 0; i < d->ext.nb && ret == 0; i++) {
		struct qsm_tracked_bitmap *t = find_loaded(img, i);
		const struct qcow2_bitmap *b = &d->bm[i];
		unsigned g = b->granularity_bits;
		uint32_t n = qcow2_bitmap_table_size(size, g, img->cluster_bits);
		uint64_t bits = (size + (1ull << g) - 1) >> g, toff;
		if (!(r[i].data = calloc(n, cs))) {
			ret = -ENOMEM;
			break;
		}
		/* the bits of the disk's first `bits` granules, none after */
		memcpy(r[i].data, t->data, (size_t)(QSM_MIN(n, b->table_size) * cs));
		uint64_t whole = bits / 8 + !!(bits % 8); /* bytes holding them */
		memset(r[i].data + whole, 0, (size_t)(n * cs - whole));
		if (bits % 8)
			r[i].data[bits / 8] &= (uint8_t)((1u << (bits % 8)) - 1);
		r[i].old_toff = b->table_offset;
		r[i].old_n = b->table_size;
		r[i].old = table_of(img, i);
		if ((ret = write_fresh(img, r[i].data, n, t->recording, &r[i].fresh, &toff)) < 0)
			break;
		qcow2_bitmap_set_table(&nd, i, toff, n);
		if (!t->recording)
			qcow2_bitmap_set_flags(&nd, i, nd.bm[i].flags & ~QCOW2_BITMAP_IN_USE);
	}
	if (ret < 0) {
		qcow2_bitmap_dir_release(&nd);
		return ret;
	}
	if ((ret = dir_store(img, &nd)) < 0)
		return ret;
	for (uint32_t i = 0; i < d->ext.nb; i++) {
		struct qsm_tracked_bitmap *t = find_loaded(img, i);
		free(t->data);
		t->data = r[i].data;
		r[i].data = NULL;
		if (t->recording) {
			free(t->table);
			t->table = r[i].fresh;
			r[i].fresh = NULL;
		}
	}
	for (uint32_t i = 0; i < d->ext.nb && ret == 0; i++)
		ret = release_clusters(img, r[i].old, r[i].old_n, r[i].old_toff);
	return ret;
}

/* Step 1's marks cleared in place: the size did not change. */
static int resize_unmark(struct qsm_image *img)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	for (uint32_t i = 0; i < d->ext.nb; i++)
		if (!find_loaded(img, i)->recording)
			qcow2_bitmap_set_flags(d, i, d->bm[i].flags & ~QCOW2_BITMAP_IN_USE);
	return dir_write(img);
}

int qsm_bitmaps_resize(struct qsm_image *img, uint64_t size, qsm_resize_fn change, char *err,
		       size_t errlen)
{
	struct qcow2_bitmap_dir *d = &img->bitmaps;
	uint32_t nb = d->ext.nb;
	uint64_t cs = img->cluster_size, old_size = img->hdr.size;
	struct resized *r;
	int ret = 0;
	if (!nb)
		return change(img, size, err, errlen);
	for (uint32_t i = 0; i < nb; i++) {
		const struct qcow2_bitmap *b = &d->bm[i];
		uint32_t n = qcow2_bitmap_table_size(size, b->granularity_bits, img->cluster_bits);
		if (usable(img, i, err, errlen) < 0) {
			size_t l = err && errlen ? strlen(err) : errlen;
			if (l + 1 < errlen)
				snprintf(err + l, errlen - l, "\nTry block-dirty-bitmap-remove "
					 "to delete this bitmap from disk");
			return -EBUSY;
		}
		if (n == 0 || (uint64_t)n * cs > QCOW2_BITMAP_MAX_PHYS_SIZE) {
			/* QEMU resizes, then loses the bitmap at close */
			qsm_set_err(err, errlen, "Bitmap '%s' cannot cover %llu bytes: too much "
				    "space would be occupied by the bitmap. Use larger granularity",
				    b->name, (unsigned long long)size);
			return -EFBIG;
		}
	}
	if (!(r = calloc(nb, sizeof(*r))) || (ret = tracked_room(img, nb)) < 0) {
		free(r);
		return -ENOMEM;
	}
	/* 1. */
	for (uint32_t i = 0; i < nb && ret == 0; i++)
		if (!(r[i].had = find_loaded(img, i) != NULL))
			ret = load_slot(img, i, err, errlen);
	for (uint32_t i = 0; i < nb && ret == 0; i++)
		qcow2_bitmap_set_flags(d, i, d->bm[i].flags | QCOW2_BITMAP_IN_USE);
	if (ret == 0 && (ret = dir_write(img)) < 0)
		qsm_set_err(err, errlen, "Could not mark the bitmaps in use: %s", strerror(-ret));
	/* 2., 3. */
	if (ret == 0) {
		ret = change(img, size, err, errlen);
		int sret = img->hdr.size == old_size ? resize_unmark(img) : resize_store(img, r);
		if (sret < 0) {
			if (ret == 0)
				qsm_set_err(err, errlen, "Could not store the resized bitmaps: %s; "
					    "they are left in use", strerror(-sret));
			ret = ret ? ret : sret;
			qsm_bitmaps_release(img); /* nothing recorded, nothing stored */
		}
	}
	for (uint32_t i = 0; i < nb; i++) {
		struct qsm_tracked_bitmap *t = img->tracked ? find_loaded(img, i) : NULL;
		if (t && !r[i].had)
			slot_drop(img, t);
		free(r[i].data);
		free(r[i].fresh);
		free(r[i].old);
	}
	free(r);
	return ret;
}
