/*
 * sm/snapops.c: internal snapshots taken, applied and deleted (qemu-img
 * snapshot -c / -a / -d, and the library's qsm_snapshot_create / _apply /
 * _delete).  The table's format is metadata/snapshot.c's; this file changes
 * the image: refcounts, L1 and L2 tables, the snapshot table, the header.
 *
 * Blocking, as qsm_truncate: nothing may be in flight (-EBUSY), the image is
 * written back first and its clean L2 tables dropped from the cache, then the
 * tables are read and edited on disk and the refcounts changed through the
 * refcount cache; every step ends with qsm_sync_writeback, whose levels
 * (refcounts, then tables, then the header) keep the order below.
 *
 * The refcount work is QEMU's qcow2_update_snapshot_refcount, batched: the
 * references an L1 table makes (its L2 tables, and through them data,
 * preallocated zero and compressed clusters, a compressed cluster once per
 * reference) are gathered into runs of consecutive host clusters, and each
 * run is one qsm_refcount_update, so a refcount block is read once and
 * changed in place however many clusters it counts; each L2 table is read
 * by the walk and by the COPIED pass and written at most once per operation
 * (by that pass, when a flag changed), and an L2 table whose entries are
 * all unallocated costs its reads only.
 *
 * Crash safety.  Each operation first makes the dirty bit (incompatible bit
 * 0) durable on a v3 image and holds it until the operation is over
 * (img->dirty_hold): qemu-img check may find refcounts one too high (leaks)
 * or COPIED flags that disagree with them in the middle of an operation,
 * and an image with the dirty bit set is repaired when QEMU or qsm opens it
 * read-write.  The order of each operation then makes every intermediate
 * state one whose repair gives the image before or after the operation,
 * never one where a cluster is referenced more than its refcount says:
 *   create: the L1 copy written; refcounts +1 (durable); COPIED cleared in
 *           the active tables; the new snapshot table written; the header
 *           naming it (the commit point); the old table freed.
 *   delete: the table without the entry, then the header (the commit
 *           point); then the old table, the snapshot's references and its
 *           L1 copy released; COPIED restored where refcounts are back to 1.
 *   apply:  refcounts +1 for the snapshot's tables (durable); a new active
 *           L1 table written to new clusters, then the header naming it
 *           (the commit point: a single sector write, so unlike QEMU's
 *           in-place L1 overwrite a crash never leaves a mix of the two
 *           tables); then the old active references and L1 released and
 *           COPIED set where refcounts are 1.
 * A v2 image has no dirty bit: the same order holds, and a crash can leave
 * what qemu-img check -r all repairs (leaks, COPIED cleared where the
 * refcount is 1: a copy on write where an in-place write would have done).
 */
#include <errno.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "metadata/l2entry.h"
#include "metadata/snapshot.h"
#include "sm/sm.h"

#define SNAP_FAIL(code, ...)                                                   \
	do {                                                                   \
		if (err)                                                       \
			snprintf(err, errlen, __VA_ARGS__);                    \
		return (code);                                                 \
	} while (0)

/* --- the batched reference walk -------------------------------------------- */

/* Runs of consecutive host clusters that get the same delta. */
struct refrun {
	struct qsm_image *img;
	int64_t delta;
	uint64_t start, n;   /* the run being gathered (n == 0: none) */
	uint64_t limit;      /* apply at most this many runs (a rollback) */
	uint64_t applied;    /* runs applied so far */
	uint64_t file_size;  /* bounds every table and cluster offset */
	int ret;
};

static void run_flush(struct refrun *r)
{
	if (!r->n || r->ret)
		return;
	if (r->applied >= r->limit) {
		r->ret = 1; /* the rollback is complete */
		return;
	}
	r->ret = qsm_image_rc_error(r->img, qsm_refcount_update(r->img->rc, r->start, r->n,
								r->delta, NULL));
	if (r->ret == 0)
		r->applied++;
	r->n = 0;
}

static void run_add(struct refrun *r, uint64_t cluster, uint64_t n)
{
	if (r->n && cluster == r->start + r->n) {
		r->n += n;
		return;
	}
	run_flush(r);
	r->start = cluster;
	r->n = n;
}

/* Is host_offset, the target of an L1 or L2 entry, a cluster in the file? */
static int check_target(const struct refrun *r, uint64_t off, const char *what, uint64_t idx)
{
	struct qsm_image *img = r->img;
	if (off & (img->cluster_size - 1))
		return qsm_image_corrupt(img, "%s offset %#llx unaligned (index %#llx)", what,
					 (unsigned long long)off, (unsigned long long)idx);
	if (off >= r->file_size)
		return qsm_image_corrupt(img, "%s offset %#llx past the end of the file (index %#llx)",
					 what, (unsigned long long)off, (unsigned long long)idx);
	return 0;
}

/*
 * Add r->delta to the refcount of every cluster the L1 table l1 (l1_size
 * entries, on-disk byte order) references, the runs in a fixed order (the
 * order of the table), at most r->limit of them.  A second walk over the
 * same tables with -delta and limit = the first walk's r->applied undoes
 * it.  0, or -errno (r->applied says how far it got).
 */
static int refs_walk(struct refrun *r, const uint8_t *l1, uint64_t l1_size, uint8_t *buf)
{
	struct qsm_image *img = r->img;

	if ((r->ret = qsm_io_get_size(img->io, &r->file_size)) < 0)
		return r->ret;
	for (uint64_t i = 0; i < l1_size && !r->ret; i++) {
		uint64_t l2 = qcow2_be64(l1 + i * 8) & QCOW2_L1E_OFFSET_MASK;
		if (!l2)
			continue;
		if ((r->ret = check_target(r, l2, "L2 table", i)) < 0)
			break;
		run_add(r, l2 >> img->cluster_bits, 1);
		if ((r->ret = qsm_io_pread_sync(img->io, buf, img->cluster_size, l2)) < 0)
			break;
		for (uint64_t j = 0; j < img->l2_entries && !r->ret; j++) {
			uint64_t e = qcow2_be64(buf + j * 8), first, count;
			switch (qcow2_entry_kind(e)) {
			case QCOW2_EK_COMPRESSED:
				qcow2_compressed_clusters(img->cluster_bits, e, &first, &count);
				run_add(r, first, count);
				break;
			case QCOW2_EK_DATA:
			case QCOW2_EK_SHARED:
			case QCOW2_EK_ZERO_ALLOC:
				if ((r->ret = check_target(r, qcow2_entry_offset(e), "data cluster",
							   i * img->l2_entries + j)) < 0)
					break;
				run_add(r, qcow2_entry_offset(e) >> img->cluster_bits, 1);
				break;
			default:
				break;
			}
		}
	}
	run_flush(r);
	return r->ret == 1 ? 0 : r->ret;
}

/* refs_walk with delta over the whole table, undone if it fails part way
 * (a refcount that would overflow: -ERANGE, nothing changed then). */
static int refs_update(struct qsm_image *img, const uint8_t *l1, uint64_t l1_size, int64_t delta)
{
	uint8_t *buf;
	if (posix_memalign((void **)&buf, 4096, img->cluster_size))
		return -ENOMEM;
	struct refrun r = { .img = img, .delta = delta, .limit = UINT64_MAX };
	int ret = refs_walk(&r, l1, l1_size, buf);
	if (ret < 0 && r.applied && !img->corrupt) {
		struct refrun u = { .img = img, .delta = -delta, .limit = r.applied };
		if (refs_walk(&u, l1, l1_size, buf) < 0) {
			img->error = -EIO;
			snprintf(img->errmsg, sizeof(img->errmsg),
				 "undoing a failed snapshot's refcount changes failed; the image accepts no more writes");
		}
	}
	free(buf);
	return ret;
}

/* The refcount of a host cluster, 0 when it cannot be read. */
static uint64_t refcount_of(struct qsm_image *img, uint64_t off)
{
	uint64_t v = 0;
	if (qsm_refcount_read(img->rc, off >> img->cluster_bits, &v, NULL) < 0)
		return 0;
	return v;
}

/*
 * QEMU's COPIED rule on the active tables: set exactly on the L1 and
 * standard L2 entries (data and preallocated zero) whose cluster has
 * refcount 1.  Each L2 table is read once and written only if it changed;
 * L1 entries change in memory (the write-back writes them).
 */
static int fix_copied(struct qsm_image *img)
{
	uint8_t *buf;
	int ret = 0;

	if (posix_memalign((void **)&buf, 4096, img->cluster_size))
		return -ENOMEM;
	for (uint64_t i = 0; i < img->l1_size && !ret; i++) {
		uint64_t e1 = qsm_l1_get(img, i), l2 = e1 & QCOW2_L1E_OFFSET_MASK;
		if (!l2)
			continue;
		uint64_t want = refcount_of(img, l2) == 1 ? l2 | QCOW2_OFLAG_COPIED : l2;
		if (want != e1)
			qsm_l1_set(img, i, want);
		if ((ret = qsm_io_pread_sync(img->io, buf, img->cluster_size, l2)) < 0)
			break;
		bool changed = false;
		for (uint64_t j = 0; j < img->l2_entries; j++) {
			uint64_t e = qcow2_be64(buf + j * 8);
			enum qcow2_entry_kind k = qcow2_entry_kind(e);
			if (k != QCOW2_EK_DATA && k != QCOW2_EK_SHARED && k != QCOW2_EK_ZERO_ALLOC)
				continue;
			uint64_t ne = refcount_of(img, qcow2_entry_offset(e)) == 1 ? e | QCOW2_OFLAG_COPIED
										 : e & ~QCOW2_OFLAG_COPIED;
			if (ne != e) {
				qcow2_put_be64(buf + j * 8, ne);
				changed = true;
			}
		}
		if (changed)
			ret = qsm_io_pwrite_sync(img->io, buf, img->cluster_size, l2);
	}
	free(buf);
	return ret;
}

/* --- steps shared by the operations ---------------------------------------- */

/* Tables edited behind the cache durable, then one full write-back. */
static int sync_all(struct qsm_image *img)
{
	int ret = 0;
	if (!(img->io->flags & QSM_IO_NO_FLUSH))
		ret = qsm_io_flush_sync(img->io);
	return ret ? ret : qsm_sync_writeback(img);
}

/* Everything written back, the clean L2 tables dropped (the operation edits
 * tables on disk), and on v3 the dirty bit durable and held. */
static int op_begin(struct qsm_image *img)
{
	int ret = qsm_sync_writeback(img);
	if (ret < 0)
		return ret;
	qsm_l2_cache_drop_clean(&img->l2c);
	if (qsm_l2_dirty_count(&img->l2c))
		return -EBUSY; /* cannot be: just written back */
	if (img->hdr.version >= 3) {
		img->dirty_hold = true;
		if (!img->disk_dirty) {
			img->hdr.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
			img->header_dirty = true;
			if ((ret = qsm_sync_writeback(img)) < 0)
				return ret;
			img->disk_dirty = true;
		}
	}
	return 0;
}

/* The dirty bit let go: the last full write-back clears it. */
static int op_end(struct qsm_image *img, int ret)
{
	if (img->dirty_hold) {
		img->dirty_hold = false;
		if (ret == 0 || img->error == 0) {
			int r = qsm_sync_writeback(img);
			if (ret == 0)
				ret = r;
		}
	}
	return ret;
}

/* A failure after the image changed: no more writes (a repair on the next
 * read-write open puts it right; the dirty bit is on disk for v3). */
static int op_broken(struct qsm_image *img, int ret, const char *what)
{
	if (!img->error) {
		img->error = -EIO;
		snprintf(img->errmsg, sizeof(img->errmsg),
			 "%s failed (%s); the image accepts no more writes", what, strerror(-ret));
	}
	return ret;
}

static uint64_t clusters_for(const struct qsm_image *img, uint64_t bytes)
{
	return (bytes + img->cluster_size - 1) >> img->cluster_bits;
}

/* After the commit point of delete and apply: what an L1 table (l1_size
 * entries at l1_off, l1 its bytes) that nothing names any more referenced
 * is released, the table's own clusters too, durable; then the active
 * tables get COPIED back where refcounts are 1 again. */
static int release_table(struct qsm_image *img, const uint8_t *l1, uint64_t l1_size,
			 uint64_t l1_off)
{
	int ret = refs_update(img, l1, l1_size, -1);
	if (ret == 0 && l1_size)
		ret = qsm_image_rc_error(img, qsm_refcount_update(img->rc, l1_off >> img->cluster_bits,
								  clusters_for(img, l1_size * 8), -1,
								  NULL));
	if (ret == 0)
		ret = sync_all(img);
	if (ret == 0)
		ret = fix_copied(img);
	return ret ? ret : sync_all(img);
}

/* Write table t to new clusters and make the header name it (the commit
 * point of create and delete), then free the old table's clusters. */
static int table_commit(struct qsm_image *img, struct qcow2_snapshot_table *t)
{
	struct qcow2_header *h = &img->hdr;
	uint64_t new_off = 0, old_off = h->snapshots_offset, old_size = img->snaps.size;
	int64_t size = qcow2_snapshots_size(t);
	int ret;

	if (size < 0)
		return (int)size;
	if (t->nb) {
		uint64_t n = clusters_for(img, (uint64_t)size);
		uint8_t *buf;
		if (posix_memalign((void **)&buf, 4096, n << img->cluster_bits))
			return -ENOMEM;
		memset(buf, 0, n << img->cluster_bits);
		ret = qcow2_snapshots_serialize(t, buf, (size_t)size);
		if (ret == 0)
			ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, n, &new_off, NULL));
		if (ret == 0)
			ret = qsm_io_pwrite_sync(img->io, buf, (size_t)size, new_off);
		free(buf);
		if (ret == 0)
			ret = sync_all(img);
		if (ret < 0)
			return ret;
	}
	h->snapshots_offset = new_off;
	h->nb_snapshots = t->nb;
	img->header_dirty = true;
	if ((ret = qsm_sync_writeback(img)) < 0)
		return ret;
	t->size = t->nb ? (uint64_t)size : 0;
	qcow2_snapshots_release(&img->snaps);
	img->snaps = *t;
	memset(t, 0, sizeof(*t));
	if (old_size)
		ret = qsm_image_rc_error(img, qsm_refcount_update(img->rc, old_off >> img->cluster_bits,
								  clusters_for(img, old_size), -1,
								  NULL));
	return ret;
}

/* A copy of the table with room for one more entry (sn[nb] zeroed), the
 * strings and extra data duplicated. */
static int table_copy(const struct qcow2_snapshot_table *src, struct qcow2_snapshot_table *dst,
		      int skip)
{
	memset(dst, 0, sizeof(*dst));
	dst->sn = calloc(src->nb + 1u, sizeof(*dst->sn));
	if (!dst->sn)
		return -ENOMEM;
	for (uint32_t i = 0; i < src->nb; i++) {
		if ((int)i == skip)
			continue;
		struct qcow2_snapshot *d = &dst->sn[dst->nb++];
		*d = src->sn[i];
		d->id = strdup(src->sn[i].id);
		d->name = strdup(src->sn[i].name);
		d->unknown_extra = NULL;
		if (src->sn[i].unknown_extra_len) {
			d->unknown_extra = malloc(src->sn[i].unknown_extra_len);
			if (d->unknown_extra)
				memcpy(d->unknown_extra, src->sn[i].unknown_extra,
				       src->sn[i].unknown_extra_len);
		}
		if (!d->id || !d->name || (src->sn[i].unknown_extra_len && !d->unknown_extra)) {
			qcow2_snapshots_release(dst);
			return -ENOMEM;
		}
	}
	return 0;
}

/* Common refusals; 0 when the operation may run. */
static int op_check(struct qsm_image *img, char *err, size_t errlen)
{
	if (img->raw)
		SNAP_FAIL(-ENOTSUP, "The image format does not support snapshots");
	if (img->read_only)
		SNAP_FAIL(-EBADF, "Image is read-only");
	if (img->corrupt)
		SNAP_FAIL(-ENOMEDIUM, "%s", img->errmsg);
	if (img->error)
		SNAP_FAIL(-EIO, "%s", img->errmsg);
	while (img->wb_job)
		event_base_loop(img->base, EVLOOP_ONCE);
	if (img->in_flight)
		SNAP_FAIL(-EBUSY, "Requests are in flight");
	return 0;
}

/* --- create ----------------------------------------------------------------- */

static int create_snapshot(struct qsm_image *img, const char *name, char *err, size_t errlen)
{
	struct qcow2_header *h = &img->hdr;
	struct qcow2_snapshot_table t;
	uint64_t l1_off = 0, l1_clusters = clusters_for(img, img->l1_size * 8);
	int ret;

	if ((ret = op_check(img, err, errlen)) < 0)
		return ret;
	if (strlen(name) > UINT16_MAX)
		SNAP_FAIL(-EINVAL, "Snapshot name is too long");
	if (img->snaps.nb >= QCOW2_MAX_SNAPSHOTS)
		SNAP_FAIL(-EFBIG, "Too many snapshots");
	if ((ret = table_copy(&img->snaps, &t, -1)) < 0)
		SNAP_FAIL(ret, "%s", strerror(-ret));
	struct qcow2_snapshot *sn = &t.sn[t.nb];
	char id[32];
	struct timespec now;
	qcow2_snapshot_new_id(&img->snaps, id, sizeof(id));
	clock_gettime(CLOCK_REALTIME, &now);
	sn->id = strdup(id);
	sn->name = strdup(name);
	t.nb++;
	sn->l1_size = (uint32_t)img->l1_size;
	sn->date_sec = (uint32_t)now.tv_sec;
	sn->date_nsec = (uint32_t)now.tv_nsec;
	sn->disk_size = h->size;
	sn->icount = 0; /* as qemu-img records it (its snapshot list shows 0) */
	sn->extra_data_size = QCOW2_SNAPSHOT_EXTRA;
	if (!sn->id || !sn->name) {
		qcow2_snapshots_release(&t);
		SNAP_FAIL(-ENOMEM, "%s", strerror(ENOMEM));
	}
	if (qcow2_snapshots_size(&t) < 0) {
		qcow2_snapshots_release(&t);
		SNAP_FAIL(-EFBIG, "Snapshot table is too big");
	}

	if ((ret = op_begin(img)) < 0) {
		qcow2_snapshots_release(&t);
		SNAP_FAIL(op_end(img, ret), "Could not write metadata back: %s", strerror(-ret));
	}
	/* 1. the L1 copy, as the active table is now (QEMU copies it before
	 *    its COPIED flags change) */
	if (l1_clusters) {
		ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, l1_clusters, &l1_off, NULL));
		if (ret == 0)
			ret = qsm_io_pwrite_sync(img->io, img->l1, img->l1_size * 8, l1_off);
		if (ret < 0)
			goto broken;
	}
	sn->l1_table_offset = l1_off;
	/* 2. every reference of the active tables one more (undone on -ERANGE) */
	ret = refs_update(img, img->l1, img->l1_size, +1);
	if (ret < 0) {
		if (ret == -ERANGE && l1_clusters && !img->error) {
			qsm_refcount_update(img->rc, l1_off >> img->cluster_bits, l1_clusters, -1, NULL);
			qcow2_snapshots_release(&t);
			ret = op_end(img, qsm_sync_writeback(img));
			SNAP_FAIL(-ERANGE, "Refcount overflow: a cluster would be referenced more often "
				  "than refcount_bits=%u can count", 1u << h->refcount_order);
		}
		goto broken;
	}
	if ((ret = sync_all(img)) < 0)
		goto broken;
	/* 3. COPIED cleared (every refcount is now >= 2) */
	if ((ret = fix_copied(img)) < 0 || (ret = sync_all(img)) < 0)
		goto broken;
	/* 4. the table with the new entry, the header naming it */
	if ((ret = table_commit(img, &t)) < 0)
		goto broken;
	if ((ret = qsm_image_meta_rebuild(img)) < 0)
		goto broken;
	return op_end(img, 0);

broken:
	qcow2_snapshots_release(&t);
	op_broken(img, ret, "creating the snapshot");
	SNAP_FAIL(op_end(img, ret), "%s", strerror(-ret));
}

/* --- delete ----------------------------------------------------------------- */

static int delete_snapshot(struct qsm_image *img, int idx, char *err, size_t errlen)
{
	struct qcow2_snapshot_table t;
	uint8_t *l1 = NULL;
	int ret;

	struct qcow2_snapshot sn = img->snaps.sn[idx]; /* the numbers; its strings die with the table */
	if ((ret = qsm_l1_read(img, sn.l1_table_offset, sn.l1_size, 0, &l1)) < 0)
		SNAP_FAIL(ret, "Could not read the snapshot's L1 table: %s", strerror(-ret));
	if ((ret = table_copy(&img->snaps, &t, idx)) < 0) {
		free(l1);
		SNAP_FAIL(ret, "%s", strerror(-ret));
	}
	if ((ret = op_begin(img)) < 0) {
		free(l1);
		qcow2_snapshots_release(&t);
		return op_end(img, ret);
	}
	/* 1. the table without it, the header (the snapshot is gone) */
	if ((ret = table_commit(img, &t)) < 0 || (ret = qsm_image_meta_rebuild(img)) < 0)
		goto broken;
	/* 2. its references and its L1 copy released, COPIED back where
	 *    refcounts are 1 again */
	if ((ret = release_table(img, l1, sn.l1_size, sn.l1_table_offset)) < 0)
		goto broken;
	free(l1);
	return op_end(img, 0);

broken:
	free(l1);
	qcow2_snapshots_release(&t);
	op_broken(img, ret, "deleting the snapshot");
	SNAP_FAIL(op_end(img, ret), "%s", strerror(-ret));
}

/* --- apply ------------------------------------------------------------------ */

static int apply_snapshot(struct qsm_image *img, int idx, char *err, size_t errlen)
{
	struct qcow2_header *h = &img->hdr;
	const struct qcow2_snapshot *sn = &img->snaps.sn[idx];
	uint8_t *nl1 = NULL, *old = img->l1;
	uint64_t old_size = img->l1_size, old_off = h->l1_table_offset;
	int ret;

	uint64_t size = QSM_MAX(old_size, (uint64_t)sn->l1_size);
	uint64_t n = clusters_for(img, size * 8), new_off = 0;
	/* The new active table: the snapshot's entries, zeros after them up
	 * to `size` entries (its first sn->l1_size are the snapshot's table). */
	if ((ret = qsm_l1_read(img, sn->l1_table_offset, sn->l1_size, size, &nl1)) < 0)
		SNAP_FAIL(ret, "Could not read the snapshot's L1 table: %s", strerror(-ret));
	if ((ret = op_begin(img)) < 0) {
		free(nl1);
		return op_end(img, ret);
	}
	/* 1. the snapshot's references one more (undone on -ERANGE) */
	if ((ret = refs_update(img, nl1, sn->l1_size, +1)) < 0) {
		free(nl1);
		if (ret == -ERANGE && !img->error) {
			ret = op_end(img, qsm_sync_writeback(img));
			SNAP_FAIL(-ERANGE, "Refcount overflow: a cluster would be referenced more often "
				  "than refcount_bits=%u can count", 1u << h->refcount_order);
		}
		op_broken(img, ret, "applying the snapshot");
		SNAP_FAIL(op_end(img, ret), "%s", strerror(-ret));
	}
	/* 2. the new active L1 on new clusters, durable with those refcounts;
	 *    then the header naming it (the commit point) */
	if (n) {
		ret = qsm_image_rc_error(img, qsm_refcount_alloc(img->rc, n, &new_off, NULL));
		if (ret == 0)
			ret = qsm_io_pwrite_sync(img->io, nl1, size * 8, new_off);
		if (ret == 0)
			ret = sync_all(img);
		if (ret < 0)
			goto broken;
	}
	h->l1_table_offset = new_off;
	h->l1_size = (uint32_t)size;
	h->size = sn->disk_size; /* QEMU 7.2 resizes to the snapshot's size first */
	img->header_dirty = true;
	if ((ret = qsm_sync_writeback(img)) < 0)
		goto broken;
	img->l1 = nl1;
	nl1 = NULL;
	img->l1_size = size;
	img->l1_dirty_lo = img->l1_dirty_hi = 0;
	qsm_wb_l1_loaded(img);
	if (new_off + size * 8 > img->file_end)
		img->file_end = new_off + size * 8;
	qsm_l2_cache_drop_clean(&img->l2c); /* nothing of the old tables stays */
	if ((ret = qsm_image_meta_rebuild(img)) < 0)
		goto broken;
	/* 3. the old active references and its L1 released, COPIED where
	 *    the refcount is 1 */
	if ((ret = release_table(img, old, old_size, old_off)) < 0)
		goto broken;
	free(old);
	return op_end(img, 0);

broken:
	if (img->l1 != old)
		free(old);
	free(nl1);
	op_broken(img, ret, "applying the snapshot");
	SNAP_FAIL(op_end(img, ret), "%s", strerror(-ret));
}

/* --- the public entry points (sm/qsm.h) ------------------------------------- */

/* Run op with the handle allowed to block (as qsm_truncate). */
#define BLOCKING(img, call)                                                    \
	({                                                                     \
		bool live_ = qsm_io_set_live((img)->io, false);               \
		int r_ = (call);                                               \
		qsm_io_set_live((img)->io, live_);                            \
		r_;                                                            \
	})

int qsm_snapshot_create(struct qsm_image *img, const char *name, char *err, size_t errlen)
{
	if (err && errlen)
		err[0] = 0;
	if (!name)
		SNAP_FAIL(-EINVAL, "No snapshot name"); /* "" is a name, as qemu-img takes it */
	return BLOCKING(img, create_snapshot(img, name, err, errlen));
}

/* The snapshot an operation names, as qemu-img resolves it: apply by id,
 * then by name (qcow2's find_snapshot_by_id_or_name), delete by name only
 * (bdrv_snapshot_find).  msg: qemu-img's words when there is none. */
static int find(struct qsm_image *img, const char *s, bool by_id, const char *msg, char *err,
		size_t errlen)
{
	int idx = !s ? -ENOENT
		     : by_id ? qcow2_snapshot_find_id_or_name(&img->snaps, s)
			     : qcow2_snapshot_find_name(&img->snaps, s);
	if (idx < 0)
		SNAP_FAIL(-ENOENT, "%s", msg);
	return idx;
}

int qsm_snapshot_delete(struct qsm_image *img, const char *name, char *err, size_t errlen)
{
	int ret;
	if (err && errlen)
		err[0] = 0;
	if ((ret = op_check(img, err, errlen)) < 0)
		return ret;
	if ((ret = find(img, name, false, "snapshot not found", err, errlen)) < 0)
		return ret;
	return BLOCKING(img, delete_snapshot(img, ret, err, errlen));
}

int qsm_snapshot_apply(struct qsm_image *img, const char *id_or_name, char *err, size_t errlen)
{
	int ret;
	if (err && errlen)
		err[0] = 0;
	if ((ret = op_check(img, err, errlen)) < 0)
		return ret;
	if ((ret = find(img, id_or_name, true, "Failed to load snapshot: No such file or directory", err,
			errlen)) < 0)
		return ret;
	return BLOCKING(img, apply_snapshot(img, ret, err, errlen));
}
