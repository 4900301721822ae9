/*
 * metadata/bitmap.c: the bitmaps extension and directory (see
 * metadata/bitmap.h for the layout and the contract).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/bitmap.h"

int qcow2_bitmaps_ext_get(const struct qcow2_header *h, struct qcow2_bitmaps_ext *ext,
			  bool *found, char *err, size_t errlen)
{
	*found = false;
	memset(ext, 0, sizeof(*ext));
	if (!(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;
	for (unsigned i = 0; i < h->nb_unknown_exts; i++) {
		const struct qcow2_ext *e = &h->unknown_exts[i];
		if (e->type != QCOW2_EXT_BITMAPS || e->len != 24) /* header.c checked the length */
			continue;
		if (qcow2_be32(e->data + 4) != 0) {
			qsm_set_err(err, errlen, "bitmaps_ext: Reserved field is not zero");
			return -EINVAL;
		}
		ext->nb = qcow2_be32(e->data);
		ext->dir_size = qcow2_be64(e->data + 8);
		ext->dir_offset = qcow2_be64(e->data + 16);
		if (ext->nb > QCOW2_MAX_BITMAPS) {
			qsm_set_err(err, errlen, "bitmaps_ext: Image has %" PRIu32 " bitmaps, exceeding "
				"the QEMU supported maximum of %u", ext->nb, QCOW2_MAX_BITMAPS);
			return -EINVAL;
		}
		if (ext->nb == 0) {
			qsm_set_err(err, errlen, "found bitmaps extension with zero bitmaps");
			return -EINVAL;
		}
		if (ext->dir_offset & ((1ull << h->cluster_bits) - 1)) {
			qsm_set_err(err, errlen, "bitmaps_ext: invalid bitmap directory offset");
			return -EINVAL;
		}
		if (ext->dir_size > QCOW2_MAX_BITMAP_DIR_SIZE) {
			qsm_set_err(err, errlen, "bitmaps_ext: bitmap directory size (%" PRIu64 ") "
				"exceeds the maximum supported size (%u)", ext->dir_size,
				QCOW2_MAX_BITMAP_DIR_SIZE);
			return -EINVAL;
		}
		*found = true;
		return 0;
	}
	return 0;
}

/* check_dir_entry: the entry's fields against the image. */
static bool entry_ok(const struct qcow2_bitmap *b, uint8_t type, uint64_t virtual_size,
		     unsigned cluster_bits)
{
	uint64_t cs = 1ull << cluster_bits;
	if (b->table_size == 0 || b->table_offset == 0 || (b->table_offset & (cs - 1)) ||
	    b->table_size > QCOW2_BITMAP_MAX_TABLE_SIZE || b->granularity_bits > 31 ||
	    b->granularity_bits < 9 || (b->flags & QCOW2_BITMAP_RESERVED_FLAGS) || type != 1)
		return false;
	uint64_t phys = (uint64_t)b->table_size << cluster_bits;
	/* phys <= 2^29, granularity_bits <= 31: the product fits in 64 bits.
	 * A table too short for the disk is fine for a bitmap in use: its
	 * bits mean nothing (and a resize leaves it so while it runs). */
	return phys <= QCOW2_BITMAP_MAX_PHYS_SIZE &&
	       ((b->flags & QCOW2_BITMAP_IN_USE) ||
		virtual_size <= ((phys * 8) << b->granularity_bits));
}

int qcow2_bitmap_dir_parse(const uint8_t *raw, const struct qcow2_bitmaps_ext *ext,
			   uint64_t virtual_size, unsigned cluster_bits,
			   struct qcow2_bitmap_dir *d, char *err, size_t errlen)
{
	uint64_t pos = 0, size = ext->dir_size;
	uint32_t n = 0;

	memset(d, 0, sizeof(*d));
	d->ext = *ext;
	if (size == 0) {
		qsm_set_err(err, errlen, "Requested bitmap directory size is zero");
		return -EINVAL;
	}
	if (size > QCOW2_MAX_BITMAP_DIR_SIZE) {
		qsm_set_err(err, errlen, "Requested bitmap directory size is too big");
		return -EINVAL;
	}
	/* An entry takes at least 24 bytes: no more than size / 24 of them fit,
	 * whatever nb says, and the names take no more than size bytes. */
	size_t cap = (size_t)QSM_MIN((uint64_t)ext->nb, size / 24);
	d->raw = malloc((size_t)size);
	d->bm = calloc(QSM_MAX(cap, 1), sizeof(*d->bm));
	d->names = malloc((size_t)size + cap);
	if (!d->raw || !d->bm || !d->names) {
		qcow2_bitmap_dir_release(d);
		qsm_set_err(err, errlen, "Failed to allocate space for bitmap directory");
		return -ENOMEM;
	}
	memcpy(d->raw, raw, (size_t)size);
	char *names = d->names;
	while (pos < size) {
		const uint8_t *e = raw + pos;
		if (pos + 24 > size)
			goto broken;
		if (++n > ext->nb) {
			qsm_set_err(err, errlen, "More bitmaps found than specified in header extension");
			goto fail;
		}
		uint16_t name_size = qcow2_be16(e + 18);
		uint32_t extra = qcow2_be32(e + 20);
		uint64_t esize = QSM_ALIGN_UP(24 + (uint64_t)name_size + extra, 8);
		if (pos + esize > size)
			goto broken;
		if (extra != 0) {
			qsm_set_err(err, errlen, "Bitmap extra data is not supported");
			goto fail;
		}
		/* n <= size / 24: this entry's 24 bytes are inside. */
		struct qcow2_bitmap *b = &d->bm[n - 1];
		b->table_offset = qcow2_be64(e);
		b->table_size = qcow2_be32(e + 8);
		b->flags = qcow2_be32(e + 12);
		b->granularity_bits = e[17];
		b->entry = (size_t)pos;
		memcpy(names, e + 24, name_size);
		names[name_size] = 0;
		b->name = names;
		names += name_size + 1;
		if (!entry_ok(b, e[16], virtual_size, cluster_bits) || name_size > QCOW2_BITMAP_MAX_NAME ||
		    name_size == 0 || memchr(e + 24, 0, name_size)) {
			/* QEMU checks only the name's maximum size; an empty name
			 * or one holding a NUL is qsm's refusal (names are printed
			 * and looked up, and QEMU never writes them). */
			qsm_set_err(err, errlen, "Bitmap '%.*s' doesn't satisfy the constraints",
				    (int)strnlen(b->name, QCOW2_BITMAP_MAX_NAME), b->name);
			goto fail;
		}
		for (uint32_t j = 0; j + 1 < n; j++) {
			if (!strcmp(d->bm[j].name, b->name)) {
				qsm_set_err(err, errlen, "Bitmap '%s' appears twice in the bitmap "
					    "directory", b->name);
				goto fail;
			}
		}
		pos += esize;
	}
	if (n != ext->nb) {
		qsm_set_err(err, errlen, "Less bitmaps found than specified in header extension");
		goto fail;
	}
	return 0;
broken:
	qsm_set_err(err, errlen, "Broken bitmap directory");
fail:
	qcow2_bitmap_dir_release(d);
	return -EINVAL;
}

void qcow2_bitmap_dir_release(struct qcow2_bitmap_dir *d)
{
	free(d->raw);
	free(d->bm);
	free(d->names);
	memset(d, 0, sizeof(*d));
}

void qcow2_bitmap_set_flags(struct qcow2_bitmap_dir *d, uint32_t i, uint32_t flags)
{
	d->bm[i].flags = flags;
	qcow2_put_be32(d->raw + d->bm[i].entry + 12, flags);
}

void qcow2_bitmap_set_table(struct qcow2_bitmap_dir *d, uint32_t i, uint64_t offset,
			    uint32_t size)
{
	d->bm[i].table_offset = offset;
	d->bm[i].table_size = size;
	qcow2_put_be64(d->raw + d->bm[i].entry, offset);
	qcow2_put_be32(d->raw + d->bm[i].entry + 8, size);
}

int qcow2_bitmap_table_entry_check(uint64_t entry, uint64_t cluster_size)
{
	uint64_t off = entry & QCOW2_BITMAP_TABLE_OFFSET_MASK;
	if (entry & QCOW2_BITMAP_TABLE_RESERVED)
		return -EINVAL;
	if (off && ((entry & QCOW2_BITMAP_TABLE_ALL_ONES) || off % cluster_size))
		return -EINVAL;
	return 0;
}

int qcow2_bitmap_table_read(qcow2_snapshot_reader rd, void *opaque, const struct qcow2_bitmap *b,
			    uint64_t cluster_size, uint64_t **table)
{
	/* table_size <= 2^27 (entry_ok): at most 1 GiB, as QEMU allows. */
	uint64_t *t = malloc((size_t)b->table_size * 8);
	int ret;

	*table = NULL;
	if (!t)
		return -ENOMEM;
	if ((ret = rd(opaque, t, (size_t)b->table_size * 8, b->table_offset)) < 0)
		goto fail;
	for (uint32_t i = 0; i < b->table_size; i++) {
		t[i] = qcow2_be64((const uint8_t *)&t[i]);
		if ((ret = qcow2_bitmap_table_entry_check(t[i], cluster_size)) < 0)
			goto fail;
	}
	*table = t;
	return 0;
fail:
	free(t);
	return ret;
}

int qcow2_bitmaps_read(qcow2_snapshot_reader rd, void *opaque, const struct qcow2_header *h,
		       uint64_t virtual_size, bool tables, struct qcow2_bitmap_dir *d,
		       bool *found, char *err, size_t errlen)
{
	struct qcow2_bitmaps_ext ext;
	uint8_t *raw;
	int ret;

	memset(d, 0, sizeof(*d));
	if ((ret = qcow2_bitmaps_ext_get(h, &ext, found, err, errlen)) < 0 || !*found)
		return ret;
	/* dir_size <= 64 MiB (qcow2_bitmaps_ext_get). */
	if (!(raw = malloc(QSM_MAX((size_t)ext.dir_size, 1)))) {
		qsm_set_err(err, errlen, "Failed to allocate space for bitmap directory");
		return -ENOMEM;
	}
	ret = ext.dir_size ? rd(opaque, raw, (size_t)ext.dir_size, ext.dir_offset) : 0;
	if (ret < 0)
		qsm_set_err(err, errlen, "Failed to read bitmap directory: %s", strerror(-ret));
	else
		ret = qcow2_bitmap_dir_parse(raw, &ext, virtual_size, h->cluster_bits, d, err, errlen);
	free(raw);
	for (uint32_t i = 0; ret == 0 && tables && i < d->ext.nb; i++) {
		const struct qcow2_bitmap *b = &d->bm[i];
		uint64_t *t;
		if (b->flags & QCOW2_BITMAP_IN_USE)
			continue;
		if ((ret = qcow2_bitmap_table_read(rd, opaque, b, qcow2_cluster_size(h), &t)) < 0)
			qsm_set_err(err, errlen, "Could not read bitmap_table table from image for "
				    "bitmap '%s': %s", b->name, strerror(-ret));
		free(t);
		/* load_bitmap_data: a table of exactly the entries the disk
		 * needs (check_dir_entry asked only that it covers it) */
		if (ret == 0 && b->table_size != qcow2_bitmap_table_size(virtual_size,
									 b->granularity_bits,
									 h->cluster_bits)) {
			ret = -EINVAL;
			qsm_set_err(err, errlen, "Could not read bitmap '%s' from image: %s",
				    b->name, strerror(-ret));
		}
	}
	if (ret < 0) {
		qcow2_bitmap_dir_release(d);
		*found = false;
	}
	return ret;
}

void qcow2_bitmap_set_range(uint8_t *data, unsigned granularity_bits, uint64_t offset,
			    uint64_t bytes)
{
	if (!bytes)
		return;
	uint64_t k = offset >> granularity_bits, last = (offset + bytes - 1) >> granularity_bits;
	for (; k <= last && (k & 7); k++)
		data[k >> 3] |= (uint8_t)(1u << (k & 7));
	if (k + 7 <= last) {
		memset(data + (k >> 3), 0xff, (size_t)((last + 1 - k) >> 3));
		k += (last + 1 - k) & ~7ull;
	}
	for (; k <= last; k++)
		data[k >> 3] |= (uint8_t)(1u << (k & 7));
}

uint64_t qcow2_bitmap_run(const uint8_t *data, uint64_t first, uint64_t end, bool *set)
{
	bool v = data[first >> 3] >> (first & 7) & 1;
	uint8_t whole = v ? 0xff : 0;
	uint64_t k = first + 1;
	*set = v;
	while (k < end) {
		if (!(k & 7) && k + 8 <= end && data[k >> 3] == whole) {
			k += 8;
			continue;
		}
		if ((data[k >> 3] >> (k & 7) & 1) != v)
			break;
		k++;
	}
	return k - first;
}

uint32_t qcow2_bitmap_table_size(uint64_t virtual_size, unsigned granularity_bits,
				 unsigned cluster_bits)
{
	/* get_bitmap_bytes_needed, then size_to_clusters */
	uint64_t bits = (virtual_size + (1ull << granularity_bits) - 1) >> granularity_bits;
	uint64_t n = QSM_DIV_ROUND_UP(QSM_DIV_ROUND_UP(bits, 8), 1ull << cluster_bits);
	return n > QCOW2_BITMAP_MAX_TABLE_SIZE ? 0 : (uint32_t)n;
}

/* d rebuilt from raw (ext.nb entries, dir_size bytes): parsed as an open
 * parses it, so an edit can only produce what an open accepts. */
static int dir_reparse(struct qcow2_bitmap_dir *d, uint8_t *raw, struct qcow2_bitmaps_ext ext,
		       uint64_t virtual_size, unsigned cluster_bits, char *err, size_t errlen)
{
	struct qcow2_bitmap_dir nd;
	int ret = 0;
	if (ext.nb == 0)
		memset(&nd, 0, sizeof(nd));
	else
		ret = qcow2_bitmap_dir_parse(raw, &ext, virtual_size, cluster_bits, &nd, err, errlen);
	if (ret == 0) {
		qcow2_bitmap_dir_release(d);
		*d = nd;
	}
	free(raw);
	return ret;
}

int qcow2_bitmap_dir_room(const struct qcow2_bitmap_dir *d, size_t name_len, char *err,
			  size_t errlen)
{
	if (name_len > QCOW2_BITMAP_MAX_NAME) {
		qsm_set_err(err, errlen, "Name length exceeds maximum (%u characters)",
			    QCOW2_BITMAP_MAX_NAME);
		return -EINVAL;
	}
	if (d->ext.nb >= QCOW2_MAX_BITMAPS) {
		qsm_set_err(err, errlen, "Maximum number of persistent bitmaps is already reached");
		return -EINVAL;
	}
	if (d->ext.dir_size + QSM_ALIGN_UP(24 + name_len, 8) > QCOW2_MAX_BITMAP_DIR_SIZE) {
		qsm_set_err(err, errlen, "Not enough space in the bitmap directory");
		return -EINVAL;
	}
	return 0;
}

int qcow2_bitmap_dir_append(struct qcow2_bitmap_dir *d, const struct qcow2_bitmap *b,
			    uint64_t virtual_size, unsigned cluster_bits, char *err, size_t errlen)
{
	size_t nlen = strlen(b->name), esize = QSM_ALIGN_UP(24 + nlen, 8);
	struct qcow2_bitmaps_ext ext = d->ext;
	int ret = qcow2_bitmap_dir_room(d, nlen, err, errlen);
	if (ret < 0)
		return ret;
	uint8_t *raw = calloc(1, (size_t)ext.dir_size + esize), *e = raw + ext.dir_size;
	if (!raw)
		return -ENOMEM;
	if (ext.dir_size)
		memcpy(raw, d->raw, (size_t)ext.dir_size);
	qcow2_put_be64(e, b->table_offset);
	qcow2_put_be32(e + 8, b->table_size);
	qcow2_put_be32(e + 12, b->flags);
	e[16] = 1; /* dirty tracking */
	e[17] = b->granularity_bits;
	qcow2_put_be16(e + 18, (uint16_t)nlen);
	memcpy(e + 24, b->name, nlen);
	ext.nb++;
	ext.dir_size += esize;
	return dir_reparse(d, raw, ext, virtual_size, cluster_bits, err, errlen);
}

int qcow2_bitmap_dir_remove(struct qcow2_bitmap_dir *d, uint32_t i, uint64_t virtual_size,
			    unsigned cluster_bits, char *err, size_t errlen)
{
	struct qcow2_bitmaps_ext ext = d->ext;
	size_t start = d->bm[i].entry;
	size_t end = i + 1 < ext.nb ? d->bm[i + 1].entry : (size_t)ext.dir_size;
	uint8_t *raw = malloc(QSM_MAX((size_t)ext.dir_size - (end - start), 1));
	if (!raw)
		return -ENOMEM;
	memcpy(raw, d->raw, start);
	memcpy(raw + start, d->raw + end, (size_t)ext.dir_size - end);
	ext.nb--;
	ext.dir_size -= end - start;
	if (ext.nb == 0)
		ext.dir_offset = 0;
	return dir_reparse(d, raw, ext, virtual_size, cluster_bits, err, errlen);
}

int qcow2_bitmaps_ext_put(struct qcow2_header *h, const struct qcow2_bitmaps_ext *ext)
{
	uint8_t *data = NULL;
	if (ext->nb) {
		struct qcow2_ext *x = realloc(h->unknown_exts, (h->nb_unknown_exts + 1) * sizeof(*x));
		if (x)
			h->unknown_exts = x;
		if (!x || !(data = calloc(1, 24)))
			return -ENOMEM;
	}
	qcow2_header_drop_ext(h, QCOW2_EXT_BITMAPS);
	h->autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
	if (!data)
		return 0;
	qcow2_put_be32(data, ext->nb);
	qcow2_put_be64(data + 8, ext->dir_size);
	qcow2_put_be64(data + 16, ext->dir_offset);
	/* First of the kept ones: where qcow2_update_header writes it, after
	 * the feature table and before the extensions it does not know. */
	struct qcow2_ext *x = h->unknown_exts;
	memmove(x + 1, x, h->nb_unknown_exts * sizeof(*x));
	x[0] = (struct qcow2_ext){ .type = QCOW2_EXT_BITMAPS, .len = 24, .data = data };
	h->nb_unknown_exts++;
	h->autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
	return 0;
}
