/*
 * metadata/create.c: the bytes of a fresh qcow2 image, identical to what
 * qemu-img 7.2 `create -f qcow2` writes for the same options.
 *
 * Design
 * ------
 * qemu does not lay a new image out from a formula: qcow2_co_create() writes
 * a bare header (cluster 0), a refcount table (cluster 1, entry 0 -> cluster
 * 2) and an empty refcount block (cluster 2), reopens the image, allocates
 * clusters 0-2 through the normal allocator, rewrites the full header, and
 * then "truncates" to the requested size, which allocates the L1 table with
 * qcow2_alloc_clusters().  For small L1 tables that lands at cluster 3 and the
 * file ends at the end of the L1.  For large ones (tiny clusters, wide
 * refcounts, big disks) the allocator has to create refcount blocks and may
 * grow the refcount table, restarting the allocation (-EAGAIN) each time, and
 * the result depends on the exact order of those steps.
 *
 * So this file replays qemu's allocator on an in-memory model instead of
 * guessing the outcome:
 *
 *   sim_alloc_clusters()       = qcow2_alloc_clusters()
 *   sim_alloc_noref()          = alloc_clusters_noref()
 *   sim_update_refcount()      = update_refcount()  (undo on error, restart
 *                                 hint on -EAGAIN)
 *   sim_alloc_refblock()       = alloc_refcount_block()
 *   sim_refcount_area()        = qcow2_refcount_area() (reftable growth)
 *   sim_metadata_size()        = qcow2_refcount_metadata_size()
 *
 * Model: refcounts live in one flat array indexed by host cluster (a cluster
 * not covered by a refcount block reads as 0, as in qemu); the refcount table
 * is an array of block offsets; every write qemu issues to the file (tables,
 * 8-byte reftable hook-ups, the zeroed L1) is applied in order to a byte
 * buffer, so stale bytes qemu leaves behind (an old refcount table after a
 * growth) are reproduced too.  Refcount blocks are emitted at the end from
 * the flat array, which is what qemu's refcount cache flushes at close.
 *
 * Invariants: (1) refcounts of clusters not covered by the current table are
 * zero in the array; (2) a refcount block, once hooked up, is never freed;
 * (3) every block in the final table was written at least once, so the
 * final file length covers it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "io/util.h"
#include "metadata/qcow2.h"
#include "metadata/compress.h"

#define QEMU_MAX_REFTABLE_ENTRIES (QCOW2_MAX_REFTABLE_BYTES / 8) /* QCOW_MAX_REFTABLE_SIZE */

struct sim {
	unsigned cluster_bits;
	uint64_t cs;
	unsigned refcount_order;
	unsigned rb_bits;         /* log2(refcount entries per block) */
	uint64_t rb_size;         /* refcount entries per block */
	uint64_t refcount_max;

	uint64_t *rc;             /* refcount per host cluster */
	uint64_t rc_cap;          /* entries allocated in rc */

	uint64_t *reftable;       /* block offsets (host-endian) */
	uint64_t reftable_size;   /* entries */
	uint64_t reftable_offset;

	uint64_t free_cluster_index;

	uint8_t *file;            /* the image file as qemu would leave it */
	uint64_t file_len;
	uint64_t file_cap;
	uint64_t file_max;        /* refuse to grow beyond (sanity bound) */
};

/* Apply a write of len bytes at off (data NULL = zeroes), extending the file. */
static int sim_write(struct sim *s, uint64_t off, const void *data, uint64_t len)
{
	uint64_t end = off + len;

	if (end > s->file_max)
		return -EFBIG;
	if (end > s->file_cap) {
		uint64_t cap = QSM_MAX(end, s->file_cap * 2);
		uint8_t *p = realloc(s->file, cap);

		if (!p)
			return -ENOMEM;
		memset(p + s->file_cap, 0, cap - s->file_cap);
		s->file = p;
		s->file_cap = cap;
	}
	if (data)
		memcpy(s->file + off, data, len);
	else
		memset(s->file + off, 0, len);
	if (end > s->file_len)
		s->file_len = end;
	return 0;
}

static int sim_rc_reserve(struct sim *s, uint64_t ci)
{
	uint64_t cap;
	uint64_t *p;

	if (ci < s->rc_cap)
		return 0;
	if (ci >= s->file_max >> s->cluster_bits)
		return -EFBIG;
	cap = QSM_MAX(ci + 1, s->rc_cap * 2);
	p = realloc(s->rc, cap * sizeof(*p));
	if (!p)
		return -ENOMEM;
	memset(p + s->rc_cap, 0, (cap - s->rc_cap) * sizeof(*p));
	s->rc = p;
	s->rc_cap = cap;
	return 0;
}

/* qcow2_get_refcount(): 0 for clusters no refcount block covers. */
static uint64_t sim_get_refcount(const struct sim *s, uint64_t ci)
{
	uint64_t idx = ci >> s->rb_bits;

	if (idx >= s->reftable_size || !s->reftable[idx])
		return 0;
	return ci < s->rc_cap ? s->rc[ci] : 0;
}

static int sim_set_refcount(struct sim *s, uint64_t ci, uint64_t v)
{
	int ret = sim_rc_reserve(s, ci);

	if (ret)
		return ret;
	s->rc[ci] = v;
	return 0;
}

/* Zero the refcounts a fresh block at table index idx covers (memset). */
static void sim_zero_block(struct sim *s, uint64_t idx)
{
	uint64_t first = idx << s->rb_bits;

	for (uint64_t ci = first; ci < first + s->rb_size && ci < s->rc_cap; ci++)
		s->rc[ci] = 0;
}

/* Write a whole refcount block cluster (its current contents). */
static int sim_write_block(struct sim *s, uint64_t idx, uint64_t offset)
{
	uint8_t *buf = calloc(1, s->cs);
	uint64_t first = idx << s->rb_bits;
	int ret;

	if (!buf)
		return -ENOMEM;
	for (uint64_t j = 0; j < s->rb_size; j++) {
		uint64_t ci = first + j;
		uint64_t v = ci < s->rc_cap ? s->rc[ci] : 0;

		if (!v)
			continue;
		switch (s->refcount_order) {
		case 0: case 1: case 2: {
			unsigned bits = 1u << s->refcount_order;
			unsigned per = 8 / bits;

			buf[j / per] |= (uint8_t)(v << (bits * (j % per)));
			break;
		}
		case 3: buf[j] = (uint8_t)v; break;
		case 4: qcow2_put_be16(buf + 2 * j, (uint16_t)v); break;
		case 5: qcow2_put_be32(buf + 4 * j, (uint32_t)v); break;
		default: qcow2_put_be64(buf + 8 * j, v); break;
		}
	}
	ret = sim_write(s, offset, buf, s->cs);
	free(buf);
	return ret;
}

static int64_t sim_alloc_noref(struct sim *s, uint64_t size)
{
	uint64_t nb = QSM_DIV_ROUND_UP(size, s->cs);

retry:
	for (uint64_t i = 0; i < nb; i++) {
		uint64_t next = s->free_cluster_index++;

		if (sim_get_refcount(s, next) != 0)
			goto retry;
	}
	if ((s->free_cluster_index << s->cluster_bits) > s->file_max)
		return -EFBIG;
	return (int64_t)((s->free_cluster_index - nb) << s->cluster_bits);
}

/* qcow2_refcount_metadata_size(): number of refcount blocks. */
static uint64_t sim_metadata_blocks(const struct sim *s, uint64_t clusters, bool generous)
{
	uint64_t per_table_cluster = s->cs / 8;
	uint64_t table = 0, blocks = 0, last, n = 0;

	do {
		last = n;
		blocks = QSM_DIV_ROUND_UP(clusters + table + blocks, s->rb_size);
		table = QSM_DIV_ROUND_UP(blocks, per_table_cluster);
		n = clusters + blocks + table;
		if (n == last && generous) {
			clusters += QSM_DIV_ROUND_UP(table, 2);
			n = 0;
			generous = false;
		}
	} while (n != last);
	return blocks;
}

static int sim_update_refcount(struct sim *s, uint64_t offset, uint64_t length,
			       bool decrease);

/* qcow2_refcount_area(start, 0 additional clusters, exact_size false, ...). */
static int sim_refcount_area(struct sim *s, uint64_t start, uint64_t new_idx,
			     uint64_t new_block)
{
	uint64_t total, area_idx, table_size, table_clusters, extra = 0;
	uint64_t table_offset, end_offset, block_offset, old_offset, old_size;
	uint64_t *table;
	uint8_t *raw;
	int ret;

	total = sim_metadata_blocks(s, start >> s->cluster_bits, true);
	if (total > QEMU_MAX_REFTABLE_ENTRIES)
		return -EFBIG;
	area_idx = (start >> s->cluster_bits) >> s->rb_bits;
	table_size = total + QSM_DIV_ROUND_UP(total, 2);
	table_size = QSM_ALIGN_UP(table_size, s->cs / 8);
	table_clusters = table_size * 8 / s->cs;
	if (table_size > QEMU_MAX_REFTABLE_ENTRIES)
		return -EFBIG;

	table = calloc(table_size, sizeof(*table));
	if (!table)
		return -ENOMEM;
	memcpy(table, s->reftable, QSM_MIN(table_size, s->reftable_size) * sizeof(*table));
	if (new_block)
		table[new_idx] = new_block;
	for (uint64_t i = area_idx; i < total; i++)
		if (!table[i])
			extra++;
	table_offset = start + extra * s->cs;
	end_offset = table_offset + table_clusters * s->cs;

	/* Install the table first so the refcount helpers see the new blocks. */
	old_offset = s->reftable_offset;
	old_size = s->reftable_size;
	block_offset = start;
	for (uint64_t i = area_idx; i < total; i++) {
		uint64_t first = i * s->rb_size * s->cs;

		if (!table[i]) {
			table[i] = block_offset;
			block_offset += s->cs;
			sim_zero_block(s, i);
		}
		if (first < end_offset) {
			uint64_t j = first < start ? (start - first) >> s->cluster_bits : 0;
			uint64_t end = QSM_MIN((end_offset - first) >> s->cluster_bits,
					       s->rb_size);

			for (; j < end; j++) {
				ret = sim_set_refcount(s, (i << s->rb_bits) + j, 1);
				if (ret)
					goto fail;
			}
		}
	}
	free(s->reftable);
	s->reftable = table;
	s->reftable_size = table_size;
	s->reftable_offset = table_offset;

	/* Blocks (cache flush), then the table. */
	for (uint64_t i = area_idx; i < total; i++) {
		ret = sim_write_block(s, i, table[i]);
		if (ret)
			return ret;
	}
	raw = calloc(table_size, 8);
	if (!raw)
		return -ENOMEM;
	for (uint64_t i = 0; i < table_size; i++)
		qcow2_put_be64(raw + 8 * i, table[i]);
	ret = sim_write(s, table_offset, raw, table_size * 8);
	free(raw);
	if (ret)
		return ret;

	/* Free the old table (qcow2_free_clusters). */
	return sim_update_refcount(s, old_offset, old_size * 8, true);

fail:
	free(table);
	return ret;
}

/* alloc_refcount_block(): 0 when the block covering ci exists, -EAGAIN after
 * creating one (the caller restarts its search), else -errno. */
static int sim_alloc_refblock(struct sim *s, uint64_t ci)
{
	uint64_t idx = ci >> s->rb_bits;
	uint64_t blocks_used, meta;
	int64_t nb;
	int ret;

	if (idx < s->reftable_size && s->reftable[idx])
		return 0;

	nb = sim_alloc_noref(s, s->cs);
	if (nb < 0)
		return (int)nb;
	if (nb == 0)
		return -EIO;
	if (((uint64_t)nb >> s->cluster_bits) >> s->rb_bits == idx) {
		/* The block describes itself. */
		sim_zero_block(s, idx);
		ret = sim_set_refcount(s, (uint64_t)nb >> s->cluster_bits, 1);
		if (ret)
			return ret;
	} else {
		ret = sim_update_refcount(s, (uint64_t)nb, s->cs, false);
		if (ret)
			return ret;
		sim_zero_block(s, idx);
	}
	ret = sim_write_block(s, idx, (uint64_t)nb);
	if (ret)
		return ret;

	if (idx < s->reftable_size) {
		uint8_t e[8];

		qcow2_put_be64(e, (uint64_t)nb);
		ret = sim_write(s, s->reftable_offset + idx * 8, e, 8);
		if (ret)
			return ret;
		s->reftable[idx] = (uint64_t)nb;
		return -EAGAIN;
	}

	/* Grow the refcount table. */
	blocks_used = QSM_DIV_ROUND_UP(QSM_MAX(ci + 1, ((uint64_t)nb >> s->cluster_bits) + 1),
				       s->rb_size);
	meta = blocks_used * s->rb_size * s->cs;
	ret = sim_refcount_area(s, meta, idx, (uint64_t)nb);
	if (ret)
		return ret;
	return -EAGAIN;
}

static int sim_update_refcount(struct sim *s, uint64_t offset, uint64_t length, bool decrease)
{
	uint64_t start, last, co;
	int64_t old_idx = -1;
	int ret = 0;

	if (length == 0)
		return 0;
	start = QSM_ALIGN_DOWN(offset, s->cs);
	last = QSM_ALIGN_DOWN(offset + length - 1, s->cs);
	for (co = start; co <= last; co += s->cs) {
		uint64_t ci = co >> s->cluster_bits;
		int64_t idx = (int64_t)(ci >> s->rb_bits);
		uint64_t rc;

		if (idx != old_idx) {
			ret = sim_alloc_refblock(s, ci);
			if (ret == -EAGAIN && s->free_cluster_index > (start >> s->cluster_bits))
				s->free_cluster_index = start >> s->cluster_bits;
			if (ret)
				goto fail;
		}
		old_idx = idx;
		rc = sim_get_refcount(s, ci);
		if (decrease ? rc == 0 : rc >= s->refcount_max) {
			ret = -EINVAL;
			goto fail;
		}
		rc = decrease ? rc - 1 : rc + 1;
		if (rc == 0 && ci < s->free_cluster_index)
			s->free_cluster_index = ci;
		ret = sim_set_refcount(s, ci, rc);
		if (ret)
			goto fail;
	}
	return 0;

fail:
	/* Undo what was done (qemu ignores the result). */
	(void)sim_update_refcount(s, offset, co - offset, !decrease);
	return ret;
}

/* qcow2_alloc_clusters(). */
static int64_t sim_alloc_clusters(struct sim *s, uint64_t size)
{
	int64_t off;
	int ret;

	do {
		off = sim_alloc_noref(s, size);
		if (off < 0)
			return off;
		ret = sim_update_refcount(s, (uint64_t)off, size, false);
	} while (ret == -EAGAIN);
	return ret ? ret : off;
}

static void sim_free(struct sim *s)
{
	free(s->rc);
	free(s->reftable);
	free(s->file);
}

static bool valid_format_name(const char *f)
{
	size_t n = strlen(f);

	if (n == 0 || n >= sizeof(((struct qcow2_header *)0)->backing_format))
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = f[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.' || c == '+'))
			return false;
	}
	return true;
}

int qcow2_create_image(const struct qcow2_create_opts *o, uint8_t **out, size_t *out_len,
		       char *err, size_t errlen)
{
	static const char too_large[] = "The image size is too large for file format 'qcow2' "
					"(try using a larger cluster size)";
	unsigned cluster_bits = o->cluster_bits ? o->cluster_bits : QCOW2_DEFAULT_CLUSTER_BITS;
	unsigned version = o->version ? o->version : 3;
	struct qcow2_header h;
	struct sim s;
	uint64_t size, l1_entries;
	int64_t l1_offset = 0;
	uint8_t e[8];
	int ret;

	*out = NULL;
	*out_len = 0;
	if (err && errlen)
		err[0] = '\0';

	/* Option checks, in qcow2_co_create()'s order and with its messages. */
	if (o->size > QCOW2_MAX_VIRTUAL_SIZE) {
		qsm_set_err(err, errlen, "%s", too_large);
		return -EINVAL;
	}
	size = QSM_ALIGN_UP(o->size, 512); /* qemu-img create rounds up too */
	if (version != 2 && version != 3) {
		qsm_set_err(err, errlen, "Invalid compatibility level: version %u (must be 2 for "
			"0.10 or 3 for 1.1)", version);
		return -EINVAL;
	}
	if (cluster_bits < QCOW2_MIN_CLUSTER_BITS || cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
		qsm_set_err(err, errlen, "Cluster size must be a power of two between %d and %dk",
			1 << QCOW2_MIN_CLUSTER_BITS, 1 << (QCOW2_MAX_CLUSTER_BITS - 10));
		return -EINVAL;
	}
	if (o->backing_format && !o->backing_file) {
		qsm_set_err(err, errlen, "Backing format cannot be used without backing file");
		return -EINVAL;
	}
	if (version < 3 && o->lazy_refcounts) {
		qsm_set_err(err, errlen, "Lazy refcounts only supported with compatibility level 1.1 "
			"and above (use version=v3 or greater)");
		return -EINVAL;
	}
	if (o->refcount_order > 6) {
		qsm_set_err(err, errlen, "Refcount width must be a power of two and may not exceed "
			"64 bits");
		return -EINVAL;
	}
	if (version < 3 && o->refcount_order != 4) {
		qsm_set_err(err, errlen, "Different refcount widths than 16 bits require "
			"compatibility level 1.1 or above (use version=v3 or greater)");
		return -EINVAL;
	}
	if (o->compression_type && version < 3) {
		qsm_set_err(err, errlen, "Non-zlib compression type is only supported with "
			"compatibility level 1.1 and above (use version=v3 or greater)");
		return -EINVAL;
	}
	if (o->compression_type > QCOW2_COMPRESSION_MAX) {
		qsm_set_err(err, errlen, "Unknown compression type");
		return -EINVAL;
	}
	if (o->backing_file && !o->backing_format) {
		qsm_set_err(err, errlen, "Backing file specified without backing format");
		return -EINVAL;
	}
	if (o->backing_file && (!o->backing_file[0] ||
				strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME)) {
		qsm_set_err(err, errlen, "Invalid backing file name (length %zu; must be 1..%u bytes)",
			strlen(o->backing_file), QCOW2_MAX_BACKING_NAME);
		return -EINVAL;
	}
	if (o->backing_format && !valid_format_name(o->backing_format)) {
		qsm_set_err(err, errlen, "Invalid backing format '%s'", o->backing_format);
		return -EINVAL;
	}
	l1_entries = qcow2_l1_entries_for(size, cluster_bits);
	if (l1_entries > QCOW2_MAX_L1_BYTES / 8) {
		qsm_set_err(err, errlen, "%s", too_large);
		return -EINVAL;
	}

	memset(&s, 0, sizeof(s));
	s.cluster_bits = cluster_bits;
	s.cs = 1ull << cluster_bits;
	s.refcount_order = o->refcount_order;
	s.rb_bits = cluster_bits + 3 - o->refcount_order;
	s.rb_size = 1ull << s.rb_bits;
	s.refcount_max = o->refcount_order == 6 ? UINT64_MAX :
			 (1ull << (1u << o->refcount_order)) - 1;
	/* Bound: the L1 plus its refcount metadata, generously. */
	s.file_max = 4 * (uint64_t)QCOW2_MAX_L1_BYTES + 64 * s.cs;

	/* Step 1: header cluster, reftable (entry 0 -> cluster 2), empty refblock. */
	ret = sim_write(&s, 0, NULL, s.cs);
	if (!ret)
		ret = sim_write(&s, s.cs, NULL, 2 * s.cs);
	if (ret)
		goto fail;
	qcow2_put_be64(e, 2 * s.cs);
	ret = sim_write(&s, s.cs, e, 8);
	if (ret)
		goto fail;
	s.reftable_size = s.cs / 8;
	s.reftable = calloc(s.reftable_size, sizeof(*s.reftable));
	if (!s.reftable) {
		ret = -ENOMEM;
		goto fail;
	}
	s.reftable[0] = 2 * s.cs;
	s.reftable_offset = s.cs;

	/* Step 2: reopen and allocate clusters 0-2. */
	if (sim_alloc_clusters(&s, 3 * s.cs) != 0) {
		ret = -EIO;
		goto fail;
	}

	/* Step 3: grow the L1 to its exact size (qcow2_grow_l1_table). */
	if (l1_entries) {
		l1_offset = sim_alloc_clusters(&s, l1_entries * 8);
		if (l1_offset < 0) {
			ret = (int)l1_offset;
			goto fail;
		}
		ret = sim_write(&s, (uint64_t)l1_offset, NULL, l1_entries * 8);
		if (ret)
			goto fail;
	}

	/* Step 4: refcount blocks as the cache leaves them at close. */
	for (uint64_t i = 0; i < s.reftable_size; i++) {
		if (!s.reftable[i])
			continue;
		ret = sim_write_block(&s, i, s.reftable[i]);
		if (ret)
			goto fail;
	}

	/* Step 5: the final header (qcow2_update_header plus the field patches). */
	memset(&h, 0, sizeof(h));
	h.version = version;
	h.cluster_bits = cluster_bits;
	h.size = size;
	h.l1_size = (uint32_t)l1_entries;
	h.l1_table_offset = (uint64_t)l1_offset;
	h.refcount_table_offset = s.reftable_offset;
	h.refcount_table_clusters = (uint32_t)(s.reftable_size * 8 / s.cs);
	h.refcount_order = version == 2 ? 4 : o->refcount_order;
	h.compatible_features = o->lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0;
	h.compression_type = (uint8_t)o->compression_type;
	if (o->compression_type)
		h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION;
	if (o->backing_file) {
		snprintf(h.backing_file, sizeof(h.backing_file), "%s", o->backing_file);
		snprintf(h.backing_format, sizeof(h.backing_format), "%s", o->backing_format);
	}
	ret = qcow2_header_serialize(&h, s.file, s.cs);
	if (ret == -ENOSPC) {
		qsm_set_err(err, errlen, "Could not assign backing file '%s' with format '%s': the "
			"name does not fit in the header cluster (%" PRIu64 " bytes)",
			o->backing_file ? o->backing_file : "",
			o->backing_format ? o->backing_format : "", s.cs);
		ret = -EINVAL;
		goto fail;
	}
	if (ret)
		goto fail;

	*out = s.file;
	*out_len = (size_t)s.file_len;
	s.file = NULL;
	sim_free(&s);
	return 0;

fail:
	if (err && errlen && !err[0]) {
		if (ret == -EFBIG)
			qsm_set_err(err, errlen, "%s", too_large);
		else
			qsm_set_err(err, errlen, "Could not create the qcow2 metadata: %s",
				strerror(-ret));
	}
	sim_free(&s);
	return ret == -EFBIG ? -EINVAL : ret;
}
