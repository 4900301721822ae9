/*
 * metadata/check.c: `qsm check`, consistency check and repair of a qcow2
 * image (see check.h for the contract).
 *
 * Design: a port of the *algorithm* of qemu 7.2's qcow2_check_refcounts()
 * (block/qcow2-refcount.c), so the counts, the messages and the order in
 * which they appear are qemu-img check's (qcow2_co_check_locked):
 *   0. check_read_snapshots(): the snapshot table, which the open skipped
 *      (qcow2_check_read_snapshot_table), its damage reported, with
 *      FIX_ERRORS its overhanging entries dropped at once;
 *   1. calculate_refcounts(): an in-memory refcount table (the "imrt", one
 *      saturating 16-bit counter per host cluster of the file) gets +1 for
 *      the header cluster, the active L1 and every cluster its L2 tables
 *      reference, every snapshot's L1/L2 tables, the snapshot table, the
 *      refcount table and every refcount block (check_refblocks: a block
 *      must be counted exactly once, else the structure must be rebuilt);
 *   2. compare_refcounts(): each cluster's stored refcount against the imrt
 *      (leak / corruption / refcount 0 = rebuild), fixing what fix allows;
 *   3. with FIX_ERRORS and a damaged structure: rebuild_refcount_structure()
 *      writes new refcount blocks and a new table, taken from the imrt, into
 *      free clusters, flushes, then switches the header to them; the old
 *      structure is then leaked, and freed by a second pass;
 *   4. fix_snapshots(): with FIX_ERRORS, the snapshot table rewritten when
 *      only that repairs it (qcow2_check_fix_snapshot_table);
 *   5. check_oflag_copied(): COPIED must equal (refcount == 1) in the active
 *      L1 and its L2 tables.  Unlike qemu (which runs it inside 3, before
 *      4) it comes after the last step that changes a refcount, so a
 *      repair that says no corruption is left leaves none: the rewrite in
 *      4 frees the old table's clusters, and one it shared with an active
 *      L2 table or data cluster is then referenced once (qemu-img finds
 *      that flag wrong in its second check);
 *   6. with fix flags and nothing left broken: clear the dirty and corrupt
 *      bits (one 8-byte write of incompatible_features, then flush).
 * Beyond qemu, with FIX_ERRORS: L1/L2 entries that point past the end of
 * the file, or data entries at unaligned offsets, are cleared (the guest
 * cluster then reads as zeros: the zero flag on v3, unallocated on v2), each
 * reported; an L2 table that overlaps other metadata is never written.
 *
 * Crash safety of a repair: refcounts are only raised, or lowered to exactly
 * the references counted (leaks); entries are only removed; a rebuilt
 * structure is written and flushed before the header names it.  So on disk
 * refcount >= references at every instant, and an interrupted repair leaves
 * an image a new repair fixes.  Flushes separate the phases.
 *
 * Memory: 2 bytes per cluster of the file (refused beyond 1 GiB), one L2
 * table, the L1 tables one at a time, the refcount table and a small cache
 * of refcount blocks.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/check.h"
#include "metadata/l2entry.h"
#include "metadata/qcow2.h"
#include "metadata/bitmap.h"
#include "metadata/snapshot.h"

#define IMRT_MAX_BYTES (1ull << 30)
#define RBC_SLOTS 64

struct ck_res {
	uint64_t corruptions, leaks, check_errors, corruptions_fixed, leaks_fixed;
	uint64_t refcounts_low;
	uint64_t image_end_offset, total_clusters;
	uint64_t allocated, fragmented, compressed;
	uint64_t zeroed;
};

struct rb_slot {
	uint64_t off;
	uint8_t *buf;
	bool valid, dirty;
};

struct ck {
	struct qsm_io *io;
	FILE *log;
	struct qcow2_header h;
	unsigned cb, rorder, rb_bits;
	uint64_t cs, file_size, rmax, imrt_max, l2_entries;

	uint64_t *reft;          /* host endian */
	uint64_t reft_size;      /* entries */
	struct rb_slot rbc[RBC_SLOTS];

	uint16_t *imrt;
	uint64_t imrt_n;         /* counters allocated (>= nb_clusters) */
	uint64_t nb_clusters;

	uint8_t *meta;           /* bitmap: clusters of metadata other than L2 */
	uint64_t meta_n;

	uint64_t *l1;            /* active L1, host endian */
	struct qcow2_bitmap_dir bitmaps; /* zeroed when the image keeps none */
	struct qcow2_snapshot_table snaps;
	uint64_t snapshots_size;

	uint8_t *l2buf;
	struct ck_res *res;
	bool rebuilt;
	bool opening;            /* QSM_CHECK_OPENING */
	bool copied_repair;      /* check_copied() repairs (set by check_refcounts) */
};

static void say(struct ck *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(struct ck *c, const char *fmt, ...)
{
	va_list ap;

	if (!c->log)
		return;
	va_start(ap, fmt);
	vfprintf(c->log, fmt, ap);
	va_end(ap);
}

/* Read that returns zeros past the end of the file (as qemu's block layer). */
static int rd(struct ck *c, void *buf, uint64_t len, uint64_t off)
{
	uint64_t n = 0;

	if (off < c->file_size)
		n = c->file_size - off < len ? c->file_size - off : len;
	if (n) {
		int r = qsm_io_pread_sync(c->io, buf, n, off);
		if (r < 0)
			return r;
	}
	if (n < len)
		memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

/* rd() as the readers of metadata/snapshot.h and bitmap.h take it. */
static int snap_rd(void *opaque, void *buf, size_t len, uint64_t off)
{
	return rd(opaque, buf, len, off);
}

static uint64_t size_to_clusters(const struct ck *c, uint64_t size)
{
	return (size + c->cs - 1) >> c->cb;
}

/* --- refcount block packing ---------------------------------------------- */

static uint64_t rb_get(const struct ck *c, const uint8_t *b, uint64_t i)
{
	switch (c->rorder) {
	case 0: case 1: case 2: {
		unsigned bits = 1u << c->rorder;
		uint64_t bit = i * bits;
		return (b[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
	}
	case 3: return b[i];
	case 4: return qcow2_be16(b + 2 * i);
	case 5: return qcow2_be32(b + 4 * i);
	default: return qcow2_be64(b + 8 * i);
	}
}

static void rb_set(const struct ck *c, uint8_t *b, uint64_t i, uint64_t v)
{
	switch (c->rorder) {
	case 0: case 1: case 2: {
		unsigned bits = 1u << c->rorder;
		uint64_t bit = i * bits;
		uint8_t m = (uint8_t)(((1u << bits) - 1) << (bit % 8));
		b[bit / 8] = (uint8_t)((b[bit / 8] & ~m) | ((v << (bit % 8)) & m));
		break;
	}
	case 3: b[i] = (uint8_t)v; break;
	case 4: qcow2_put_be16(b + 2 * i, (uint16_t)v); break;
	case 5: qcow2_put_be32(b + 4 * i, (uint32_t)v); break;
	default: qcow2_put_be64(b + 8 * i, v); break;
	}
}

/* --- stored refcounts through a small block cache ------------------------ */

static int rbc_flush_slot(struct ck *c, struct rb_slot *s)
{
	int r;

	if (!s->valid || !s->dirty)
		return 0;
	r = qsm_io_pwrite_sync(c->io, s->buf, c->cs, s->off);
	if (r < 0)
		return r;
	s->dirty = false;
	return 0;
}

static int rbc_flush(struct ck *c)
{
	int r;

	for (unsigned i = 0; i < RBC_SLOTS; i++) {
		r = rbc_flush_slot(c, &c->rbc[i]);
		if (r < 0)
			return r;
	}
	return 0;
}

static void rbc_drop(struct ck *c)
{
	for (unsigned i = 0; i < RBC_SLOTS; i++)
		c->rbc[i].valid = c->rbc[i].dirty = false;
}

static int rbc_get(struct ck *c, uint64_t off, struct rb_slot **out)
{
	struct rb_slot *s = &c->rbc[(off >> c->cb) % RBC_SLOTS];
	int r;

	if (!s->buf) {
		s->buf = malloc(c->cs);
		if (!s->buf)
			return -ENOMEM;
	}
	if (!s->valid || s->off != off) {
		r = rbc_flush_slot(c, s);
		if (r < 0)
			return r;
		s->valid = false;
		r = rd(c, s->buf, c->cs, off);
		if (r < 0)
			return r;
		s->off = off;
		s->valid = true;
		s->dirty = false;
	}
	*out = s;
	return 0;
}

/* qcow2_get_refcount(): 0 for clusters the structure does not cover. */
static int get_refcount(struct ck *c, uint64_t cluster, uint64_t *rc)
{
	uint64_t idx = cluster >> c->rb_bits, off;
	struct rb_slot *s;
	int r;

	*rc = 0;
	if (idx >= c->reft_size)
		return 0;
	off = c->reft[idx] & QCOW2_REFT_OFFSET_MASK;
	if (!off)
		return 0;
	if (off & (c->cs - 1))
		return -EIO;
	r = rbc_get(c, off, &s);
	if (r < 0)
		return r;
	*rc = rb_get(c, s->buf, cluster & ((1ull << c->rb_bits) - 1));
	return 0;
}

/* Set a stored refcount (the block must exist); written back by rbc_flush. */
static int set_refcount(struct ck *c, uint64_t cluster, uint64_t v)
{
	uint64_t idx = cluster >> c->rb_bits, off;
	struct rb_slot *s;
	int r;

	if (idx >= c->reft_size)
		return -ERANGE;
	off = c->reft[idx] & QCOW2_REFT_OFFSET_MASK;
	if (!off || (off & (c->cs - 1)))
		return -EIO;
	r = rbc_get(c, off, &s);
	if (r < 0)
		return r;
	rb_set(c, s->buf, cluster & ((1ull << c->rb_bits) - 1), v);
	s->dirty = true;
	return 0;
}

/* --- the in-memory refcount table ----------------------------------------- */

static int imrt_grow(struct ck *c, uint64_t n)
{
	uint64_t nn;
	uint16_t *p;

	if (n <= c->imrt_n)
		return 0;
	/* whole refcount blocks, so slices can be written as blocks */
	nn = ((n >> c->rb_bits) + 1) << c->rb_bits;
	if (nn * 2 > IMRT_MAX_BYTES)
		return -EFBIG;
	p = realloc(c->imrt, nn * 2);
	if (!p)
		return -ENOMEM;
	memset(p + c->imrt_n, 0, (nn - c->imrt_n) * 2);
	c->imrt = p;
	c->imrt_n = nn;
	return 0;
}

static uint64_t imrt_get(const struct ck *c, uint64_t k)
{
	return k < c->imrt_n ? c->imrt[k] : 0;
}

/* qcow2_inc_refcounts_imrt(). */
static int inc_refs(struct ck *c, uint64_t offset, uint64_t size)
{
	uint64_t start, last;
	int r;

	if (!size)
		return 0;
	if (offset + size >= c->file_size + c->cs || offset + size < offset) {
		say(c, "ERROR: counting reference for region exceeding the end of the file by "
		       "one cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64 "\n",
		    offset, size);
		c->res->corruptions++;
		return 0;
	}
	start = offset >> c->cb;
	last = (offset + size - 1) >> c->cb;
	for (uint64_t k = start; k <= last; k++) {
		if (k >= c->imrt_n) {
			r = imrt_grow(c, k + 1);
			if (r < 0) {
				c->res->check_errors++;
				return r;
			}
		}
		if (k >= c->nb_clusters)
			c->nb_clusters = k + 1; /* the semi-allocated last cluster */
		if (c->imrt[k] >= c->imrt_max) {
			say(c, "ERROR: overflow cluster offset=0x%" PRIx64 "\n", k << c->cb);
			say(c, "Use qemu-img amend to increase the refcount entry width or qemu-img "
			       "convert to create a clean copy if the image cannot be opened for "
			       "writing\n");
			c->res->corruptions++;
			continue;
		}
		c->imrt[k]++;
	}
	return 0;
}

/* --- metadata map (for never writing an L2 table over other metadata) ---- */

static void meta_mark(struct ck *c, uint64_t off, uint64_t len)
{
	if (!len || off >= c->file_size)
		return;
	for (uint64_t k = off >> c->cb; k <= (off + len - 1) >> c->cb && k < c->meta_n; k++)
		c->meta[k / 8] |= (uint8_t)(1u << (k % 8));
}

static bool meta_has(const struct ck *c, uint64_t off)
{
	uint64_t k = off >> c->cb;
	return k < c->meta_n && (c->meta[k / 8] >> (k % 8)) & 1;
}

/* Would writing [off, off + len), entries of an L1 table, touch the header,
 * the refcount table or a refcount block, or the snapshot table?  An L1
 * table laid over them (a hostile or damaged header) is never written: as
 * qemu's overlap check, which refuses such writes. */
static bool l1_write_overlaps(const struct ck *c, uint64_t off, uint64_t len)
{
#define OVERLAP(o, l) ((l) != 0 && off < (o) + (l) && (o) < off + len)
	if (OVERLAP(0, c->cs) || OVERLAP(c->h.refcount_table_offset, c->reft_size * 8) ||
	    OVERLAP(c->h.snapshots_offset, c->snapshots_size))
		return true;
	for (uint64_t i = 0; i < c->reft_size; i++) {
		uint64_t o = c->reft[i] & QCOW2_REFT_OFFSET_MASK;
		if (o && OVERLAP(o, c->cs))
			return true;
	}
	return false;
#undef OVERLAP
}

static int build_meta(struct ck *c)
{
	free(c->meta);
	c->meta_n = c->nb_clusters;
	c->meta = calloc(c->meta_n / 8 + 1, 1);
	if (!c->meta)
		return -ENOMEM;
	meta_mark(c, 0, c->cs);
	meta_mark(c, c->h.l1_table_offset, (uint64_t)c->h.l1_size * 8);
	meta_mark(c, c->h.refcount_table_offset, c->reft_size * 8);
	meta_mark(c, c->h.snapshots_offset, c->snapshots_size);
	meta_mark(c, c->bitmaps.ext.dir_offset, c->bitmaps.ext.dir_size);
	for (uint32_t i = 0; i < c->snaps.nb; i++)
		meta_mark(c, c->snaps.sn[i].l1_table_offset, (uint64_t)c->snaps.sn[i].l1_size * 8);
	for (uint64_t i = 0; i < c->reft_size; i++) {
		uint64_t o = c->reft[i] & QCOW2_REFT_OFFSET_MASK;
		if (o && !(o & (c->cs - 1)))
			meta_mark(c, o, c->cs);
	}
	return 0;
}

/* --- L1 / L2 walk ---------------------------------------------------------- */

static uint64_t zero_entry(const struct ck *c)
{
	return qcow2_entry_zero(c->h.version);
}

/*
 * check_refcounts_l2().  guest_base: guest offset of entry 0 (for messages);
 * frag: gather allocation statistics (active L1 only).
 */
static int check_l2(struct ck *c, uint64_t l2_offset, uint64_t guest_base, bool frag,
		    unsigned fix)
{
	uint8_t *t = c->l2buf;
	uint64_t next_contig = 0;
	bool dirty = false;
	int r;

	r = rd(c, t, c->cs, l2_offset);
	if (r < 0) {
		say(c, "ERROR: I/O error in check_refcounts_l2\n");
		c->res->check_errors++;
		return r;
	}
	for (uint64_t i = 0; i < c->l2_entries; i++) {
		uint64_t e = qcow2_be64(t + 8 * i);
		uint64_t guest = guest_base + (i << c->cb);
		bool can_clear = (fix & QSM_CHECK_FIX_ERRORS) && !meta_has(c, l2_offset) &&
				 l2_offset < c->file_size;

		if (e & QCOW2_OFLAG_COMPRESSED) {
			uint64_t coff, csize;
			qcow2_compressed_extent(c->cb, e, &coff, &csize);

			if (e & QCOW2_OFLAG_COPIED) {
				say(c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never be set "
				       "for compressed clusters\n", coff);
				c->res->corruptions++;
			}
			if (can_clear && coff >= c->file_size) {
				say(c, "Clearing L2 entry %" PRIu64 " of the L2 table at 0x%" PRIx64
				       " (guest offset 0x%" PRIx64 "): points past the end of the "
				       "file\n", i, l2_offset, guest);
				qcow2_put_be64(t + 8 * i, zero_entry(c));
				dirty = true;
				c->res->corruptions_fixed++;
				c->res->zeroed++;
				continue;
			}
			r = inc_refs(c, coff, csize);
			if (r < 0)
				return r;
			if (frag) {
				c->res->allocated++;
				c->res->compressed++;
				c->res->fragmented++;
			}
			continue;
		}
		if (e & QCOW2_L2E_RESERVED) {
			say(c, "ERROR found l2 entry with reserved bits set: %" PRIx64 "\n", e);
			c->res->corruptions++;
		}
		uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
		if (!off)
			continue; /* unallocated or zero-plain */
		bool has_data = !(e & QCOW2_L2E_ZERO);
		if (can_clear && (off >= c->file_size || ((off & (c->cs - 1)) && has_data))) {
			say(c, "Clearing L2 entry %" PRIu64 " of the L2 table at 0x%" PRIx64
			       " (guest offset 0x%" PRIx64 "): %s\n", i, l2_offset, guest,
			    off >= c->file_size ? "points past the end of the file"
						: "data cluster is not properly aligned");
			qcow2_put_be64(t + 8 * i, zero_entry(c));
			dirty = true;
			c->res->corruptions_fixed++;
			c->res->zeroed++;
			continue;
		}
		if (off & (c->cs - 1)) {
			c->res->corruptions++;
			if (!has_data) {
				say(c, "%s offset=%" PRIx64 ": Preallocated cluster is not properly "
				       "aligned; L2 entry corrupted.\n",
				    fix & QSM_CHECK_FIX_ERRORS ? "Repairing" : "ERROR", off);
				if (can_clear) {
					qcow2_put_be64(t + 8 * i, QCOW2_L2E_ZERO);
					dirty = true;
					c->res->corruptions--;
					c->res->corruptions_fixed++;
					continue;
				}
			} else {
				say(c, "ERROR offset=%" PRIx64 ": Data cluster is not properly "
				       "aligned; L2 entry corrupted.\n", off);
			}
		}
		if (frag) {
			c->res->allocated++;
			if (next_contig && off != next_contig)
				c->res->fragmented++;
			next_contig = off + c->cs;
		}
		r = inc_refs(c, off, c->cs);
		if (r < 0)
			return r;
	}
	if (dirty) {
		/* Entries are only removed: no refcount ordering needed. */
		r = qsm_io_pwrite_sync(c->io, t, c->cs, l2_offset);
		if (r == 0)
			r = qsm_io_flush_sync(c->io);
		if (r < 0) {
			say(c, "ERROR: Could not write L2 table: %s\n", strerror(-r));
			c->res->check_errors++;
			return r;
		}
	}
	return 0;
}

/* check_refcounts_l1(); l1 (host endian, may be updated) is the table. */
static int check_l1(struct ck *c, uint64_t l1_offset, uint32_t l1_size, uint64_t *l1,
		    bool active, unsigned fix)
{
	int r;

	if (!l1_size)
		return 0;
	r = inc_refs(c, l1_offset, (uint64_t)l1_size * 8);
	if (r < 0)
		return r;
	for (uint32_t i = 0; i < l1_size; i++) {
		uint64_t e = l1[i], l2;

		if (!e)
			continue;
		l2 = e & QCOW2_L1E_OFFSET_MASK;
		if ((fix & QSM_CHECK_FIX_ERRORS) && (l2 >= c->file_size || (l2 & (c->cs - 1))) &&
		    !l1_write_overlaps(c, l1_offset + 8ull * i, 8)) {
			uint8_t z[8] = { 0 };
			say(c, "Clearing L1 entry %" PRIu32 " of the L1 table at 0x%" PRIx64
			       " (guest offset 0x%" PRIx64 "): %s\n", i, l1_offset,
			    (uint64_t)i << (2 * c->cb - 3),
			    l2 >= c->file_size ? "points past the end of the file"
					       : "L2 table is not cluster aligned");
			r = qsm_io_pwrite_sync(c->io, z, 8, l1_offset + 8ull * i);
			if (r == 0)
				r = qsm_io_flush_sync(c->io);
			if (r < 0) {
				say(c, "ERROR: Could not write L1 entry: %s\n", strerror(-r));
				c->res->check_errors++;
				return r;
			}
			l1[i] = 0;
			c->res->corruptions_fixed++;
			c->res->zeroed++;
			continue;
		}
		if (e & QCOW2_L1E_RESERVED) {
			say(c, "ERROR found L1 entry with reserved bits set: %" PRIx64 "\n", e);
			c->res->corruptions++;
		}
		r = inc_refs(c, l2, c->cs);
		if (r < 0)
			return r;
		if (l2 & (c->cs - 1)) {
			say(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry "
			       "corrupted\n", l2);
			c->res->corruptions++;
		}
		r = check_l2(c, l2, (uint64_t)i << (2 * c->cb - 3), active, fix);
		if (r < 0)
			return r;
	}
	return 0;
}

static int read_l1(struct ck *c, uint64_t off, uint32_t n, uint64_t **out)
{
	uint64_t *t = malloc((size_t)n * 8 + 8);
	int r;

	if (!t)
		return -ENOMEM;
	r = rd(c, t, (uint64_t)n * 8, off);
	if (r < 0) {
		free(t);
		return r;
	}
	for (uint32_t i = 0; i < n; i++)
		t[i] = qcow2_be64(&t[i]);
	*out = t;
	return 0;
}

/* check_refblocks(). */
static int check_refblocks(struct ck *c, unsigned fix, bool *rebuild)
{
	int r;

	for (uint64_t i = 0; i < c->reft_size; i++) {
		uint64_t off = c->reft[i] & QCOW2_REFT_OFFSET_MASK;
		uint64_t cl = off >> c->cb;

		if (c->reft[i] & QCOW2_REFT_RESERVED) {
			say(c, "ERROR refcount table entry %" PRIu64 " has reserved bits set\n", i);
			c->res->corruptions++;
			*rebuild = true;
			continue;
		}
		if (off & (c->cs - 1)) {
			say(c, "ERROR refcount block %" PRIu64 " is not cluster aligned; refcount "
			       "table entry corrupted\n", i);
			c->res->corruptions++;
			*rebuild = true;
			continue;
		}
		if (cl >= c->nb_clusters) {
			c->res->corruptions++;
			say(c, "%s refcount block %" PRIu64 " is outside image\n",
			    fix & QSM_CHECK_FIX_ERRORS ? "Repairing" : "ERROR", i);
			if (fix & QSM_CHECK_FIX_ERRORS) {
				uint64_t nsz = off + c->cs;
				r = off > (uint64_t)INT64_MAX - c->cs ? -EINVAL
								       : qsm_io_truncate_sync(c->io, nsz);
				if (r == 0)
					r = qsm_io_get_size(c->io, &c->file_size);
				if (r == 0) {
					uint64_t nn = size_to_clusters(c, c->file_size);
					r = imrt_grow(c, nn);
					if (r < 0) {
						c->res->check_errors++;
						return r;
					}
					c->nb_clusters = nn;
					if (cl < nn) {
						c->res->corruptions--;
						c->res->corruptions_fixed++;
						r = inc_refs(c, off, c->cs);
						if (r < 0)
							return r;
						continue;
					}
					r = -EINVAL;
				}
				*rebuild = true;
				say(c, "ERROR could not resize image: %s\n", strerror(-r));
			}
			continue;
		}
		if (off) {
			r = inc_refs(c, off, c->cs);
			if (r < 0)
				return r;
			if (imrt_get(c, cl) != 1) {
				say(c, "ERROR refcount block %" PRIu64 " refcount=%" PRIu64 "\n", i,
				    imrt_get(c, cl));
				c->res->corruptions++;
				*rebuild = true;
			}
		}
	}
	return 0;
}

/*
 * qcow2_check_bitmaps_refcounts(): the directory, each bitmap's table and
 * the clusters its entries name are references.  The open read the
 * directory and checked the tables of the bitmaps not in use; a table that
 * cannot be read or holds a bad entry (an in-use bitmap's) is a corruption
 * that ends the check, as in QEMU.
 */
static int count_bitmaps(struct ck *c)
{
	const struct qcow2_bitmap_dir *d = &c->bitmaps;
	int r;

	if (!d->ext.nb)
		return 0;
	if ((r = inc_refs(c, d->ext.dir_offset, d->ext.dir_size)) < 0)
		return r;
	for (uint32_t i = 0; i < d->ext.nb; i++) {
		const struct qcow2_bitmap *b = &d->bm[i];
		uint64_t *t;

		if ((r = inc_refs(c, b->table_offset, (uint64_t)b->table_size * 8)) < 0)
			return r;
		if ((r = qcow2_bitmap_table_read(snap_rd, c, b, c->cs, &t)) < 0) {
			c->res->corruptions++;
			return r;
		}
		for (uint32_t k = 0; k < b->table_size && r == 0; k++)
			if (t[k] & QCOW2_BITMAP_TABLE_OFFSET_MASK)
				r = inc_refs(c, t[k] & QCOW2_BITMAP_TABLE_OFFSET_MASK, c->cs);
		free(t);
		if (r < 0)
			return r;
	}
	return 0;
}

/* calculate_refcounts(). */
static int calculate(struct ck *c, unsigned fix, bool *rebuild)
{
	int r;

	r = imrt_grow(c, c->nb_clusters);
	if (r < 0) {
		c->res->check_errors++;
		return r;
	}
	r = build_meta(c);
	if (r < 0) {
		c->res->check_errors++;
		return r;
	}
	r = inc_refs(c, 0, c->cs);
	if (r < 0)
		return r;
	r = check_l1(c, c->h.l1_table_offset, c->h.l1_size, c->l1, true, fix);
	if (r < 0)
		return r;
	for (uint32_t i = 0; i < c->snaps.nb; i++) {
		const struct qcow2_snapshot *sn = &c->snaps.sn[i];
		uint64_t *l1;

		if (sn->l1_table_offset & (c->cs - 1)) {
			say(c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is not "
			       "cluster aligned; snapshot table entry corrupted\n", sn->id, sn->name,
			    sn->l1_table_offset);
			c->res->corruptions++;
			continue;
		}
		if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
			say(c, "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is too large; "
			       "snapshot table entry corrupted\n", sn->id, sn->name, sn->l1_size);
			c->res->corruptions++;
			continue;
		}
		if (!sn->l1_size)
			continue;
		r = read_l1(c, sn->l1_table_offset, sn->l1_size, &l1);
		if (r < 0) {
			say(c, "ERROR: I/O error in check_refcounts_l1\n");
			c->res->check_errors++;
			return r;
		}
		r = check_l1(c, sn->l1_table_offset, sn->l1_size, l1, false, fix);
		free(l1);
		if (r < 0)
			return r;
	}
	r = inc_refs(c, c->h.snapshots_offset, c->snapshots_size);
	if (r < 0)
		return r;
	r = inc_refs(c, c->h.refcount_table_offset, c->reft_size * 8);
	if (r < 0)
		return r;
	if ((r = count_bitmaps(c)) < 0)
		return r;
	return check_refblocks(c, fix, rebuild);
}

/* compare_refcounts(); fixes leaks / corruptions as fix allows. */
static void compare(struct ck *c, unsigned fix, bool *rebuild, uint64_t *highest)
{
	*highest = 0;
	for (uint64_t i = 0; i < c->nb_clusters; i++) {
		uint64_t r1, r2 = imrt_get(c, i);
		uint64_t *fixed = NULL;
		int r = get_refcount(c, i, &r1);

		if (r < 0) {
			say(c, "Can't get refcount for cluster %" PRIu64 ": %s\n", i, strerror(-r));
			c->res->check_errors++;
			continue;
		}
		if (r1 || r2)
			*highest = i;
		if (r1 == r2)
			continue;
		c->res->refcounts_low += r1 < r2;
		if (r1 == 0)
			*rebuild = true;
		else if (r1 > r2 && (fix & QSM_CHECK_FIX_LEAKS))
			fixed = &c->res->leaks_fixed;
		else if (r1 < r2 && (fix & QSM_CHECK_FIX_ERRORS))
			fixed = &c->res->corruptions_fixed;
		say(c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64 "\n",
		    fixed ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked", i, r1, r2);
		if (fixed && set_refcount(c, i, r2) == 0) {
			(*fixed)++;
			continue;
		}
		if (r1 < r2)
			c->res->corruptions++;
		else
			c->res->leaks++;
	}
}

/* alloc_clusters_imrt(): returns a cluster index, or -errno. */
static int64_t alloc_imrt(struct ck *c, uint64_t count, uint64_t *first_free)
{
	uint64_t cl = *first_free, run = 0;
	bool first_gap = true;
	int r;

	for (; cl < c->imrt_n && run < count; cl++) {
		if (!c->imrt[cl]) {
			run++;
			if (first_gap) {
				*first_free = cl;
				first_gap = false;
			}
		} else {
			run = 0;
		}
	}
	if (run < count) {
		r = imrt_grow(c, cl + count - run);
		if (r < 0)
			return r;
	}
	cl -= run;
	for (uint64_t i = 0; i < count; i++)
		c->imrt[cl + i] = 1;
	return (int64_t)cl;
}

/* rebuild_refcounts_write_refblocks(): 1 when the reftable grew, 0, -errno. */
static int write_refblocks(struct ck *c, uint64_t first, uint64_t end, uint64_t **rt,
			   uint64_t *rt_n, uint8_t *blk)
{
	uint64_t first_free = 0, per = 1ull << c->rb_bits;
	bool grown = false;
	int r;

	for (uint64_t cl = first; cl < end; cl++) {
		uint64_t idx, start, boff;

		if (!imrt_get(c, cl))
			continue;
		idx = cl >> c->rb_bits;
		start = idx << c->rb_bits;
		if (*rt_n > idx && (*rt)[idx]) {
			boff = (*rt)[idx];
		} else {
			int64_t b;
			if (first_free < start)
				first_free = start;
			b = alloc_imrt(c, 1, &first_free);
			if (b < 0) {
				say(c, "ERROR allocating refblock: %s\n", strerror((int)-b));
				return (int)b;
			}
			if ((uint64_t)b >= end)
				end = (uint64_t)b + 1;
			boff = (uint64_t)b << c->cb;
			if (*rt_n <= idx) {
				uint64_t nn = ((idx + 1) * 8 + c->cs - 1) / c->cs * c->cs / 8;
				if (nn * 8 > QCOW2_MAX_REFTABLE_BYTES) {
					say(c, "ERROR cannot rebuild the refcount structure: the "
					       "refcount table would exceed %u bytes\n",
					    QCOW2_MAX_REFTABLE_BYTES);
					return -EFBIG;
				}
				uint64_t *p = realloc(*rt, nn * 8);
				if (!p)
					return -ENOMEM;
				memset(p + *rt_n, 0, (nn - *rt_n) * 8);
				*rt = p;
				*rt_n = nn;
				grown = true;
			}
			(*rt)[idx] = boff;
		}
		memset(blk, 0, c->cs);
		for (uint64_t k = 0; k < per; k++)
			if (start + k < c->imrt_n && c->imrt[start + k])
				rb_set(c, blk, k, c->imrt[start + k]);
		r = qsm_io_pwrite_sync(c->io, blk, c->cs, boff);
		if (r < 0) {
			say(c, "ERROR writing refblock: %s\n", strerror(-r));
			return r;
		}
		cl = start + per - 1;
	}
	return grown;
}

/* rebuild_refcount_structure(). */
static int rebuild(struct ck *c)
{
	uint64_t *rt = NULL, rt_n = 0, rt_off = 0, rt_clusters = 0;
	uint8_t *blk = malloc(c->cs), hdr[12];
	int grown, r;

	if (!blk)
		return -ENOMEM;
	/* Never write a structure the opener refuses (header.c bounds the
	 * table): a reference far past the data (a refcount block "outside the
	 * image" grows the file to reach it, as qemu) may need more. */
	uint64_t top = c->imrt_n;
	while (top > 0 && !c->imrt[top - 1])
		top--;
	if (top && ((top - 1) >> c->rb_bits) + 1 > QCOW2_MAX_REFTABLE_BYTES / 8) {
		say(c, "ERROR cannot rebuild the refcount structure: cluster %" PRIu64 " would need "
		       "a refcount table larger than %u bytes\n", top - 1, QCOW2_MAX_REFTABLE_BYTES);
		free(blk);
		return -EFBIG;
	}
	rbc_drop(c);
	grown = write_refblocks(c, 0, c->nb_clusters, &rt, &rt_n, blk);
	if (grown < 0) {
		r = grown;
		goto fail;
	}
	do {
		uint64_t first_free = 0;
		int64_t b;

		rt_clusters = size_to_clusters(c, rt_n * 8);
		b = alloc_imrt(c, rt_clusters, &first_free);
		if (b < 0) {
			say(c, "ERROR allocating reftable: %s\n", strerror((int)-b));
			r = (int)b;
			goto fail;
		}
		rt_off = (uint64_t)b << c->cb;
		grown = write_refblocks(c, (uint64_t)b, (uint64_t)b + rt_clusters, &rt, &rt_n,
					blk);
		if (grown < 0) {
			r = grown;
			goto fail;
		}
	} while (grown);

	for (uint64_t i = 0; i < rt_n; i++)
		qcow2_put_be64(&rt[i], rt[i]);
	r = qsm_io_pwrite_sync(c->io, rt, rt_n * 8, rt_off);
	if (r < 0) {
		say(c, "ERROR writing reftable: %s\n", strerror(-r));
		goto fail;
	}
	/* the new structure is durable before the header names it */
	r = qsm_io_flush_sync(c->io);
	if (r < 0)
		goto fail;
	qcow2_put_be64(hdr, rt_off);
	qcow2_put_be32(hdr + 8, (uint32_t)rt_clusters);
	r = qsm_io_pwrite_sync(c->io, hdr, sizeof(hdr), 48);
	if (r == 0)
		r = qsm_io_flush_sync(c->io);
	if (r < 0) {
		say(c, "ERROR setting reftable: %s\n", strerror(-r));
		goto fail;
	}
	for (uint64_t i = 0; i < rt_n; i++)
		rt[i] = qcow2_be64(&rt[i]);
	free(c->reft);
	c->reft = rt;
	c->reft_size = rt_n;
	c->h.refcount_table_offset = rt_off;
	c->h.refcount_table_clusters = (uint32_t)rt_clusters;
	/* the file may have grown */
	r = qsm_io_get_size(c->io, &c->file_size);
	if (r < 0)
		goto fail2;
	if (size_to_clusters(c, c->file_size) > c->nb_clusters)
		c->nb_clusters = size_to_clusters(c, c->file_size);
	free(blk);
	return 0;
fail:
	free(rt);
fail2:
	free(blk);
	return r;
}

/*
 * check_oflag_copied(), repairing when c->copied_repair.  It judges the
 * stored refcounts, so it runs after every step of a repair that changes
 * one: the refcount pass, and the snapshot table rewrite (write_snapshots),
 * which lowers the old table's clusters by one.  A cluster the old table
 * shared with an active L2 table or data cluster (a damaged
 * snapshots_offset, or an entry pointing into the table) goes from 2 to 1
 * there, and its COPIED flag must then be set: judged before the rewrite
 * (as qemu does, whose qemu-img finds it in its second check), the flag
 * was left wrong while corruptions_left said 0.
 */
static int check_copied(struct ck *c)
{
	bool repair = c->copied_repair;
	uint8_t *t = c->l2buf;
	int r;

	for (uint32_t i = 0; i < c->h.l1_size; i++) {
		uint64_t e = c->l1[i], l2 = e & QCOW2_L1E_OFFSET_MASK, rc;
		uint64_t dirty = 0;

		if (!l2)
			continue;
		if (get_refcount(c, l2 >> c->cb, &rc) < 0)
			continue;
		if ((rc == 1) != !!(e & QCOW2_OFLAG_COPIED)) {
			bool fixing = repair &&
				      !l1_write_overlaps(c, c->h.l1_table_offset + 8ull * i, 8);
			c->res->corruptions++;
			say(c, "%s OFLAG_COPIED L2 cluster: l1_index=%" PRIu32 " l1_entry=%" PRIx64
			       " refcount=%" PRIu64 "\n", fixing ? "Repairing" : "ERROR", i, e, rc);
			if (fixing) {
				uint8_t be[8];
				c->l1[i] = rc == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
				qcow2_put_be64(be, c->l1[i]);
				r = qsm_io_pwrite_sync(c->io, be, 8, c->h.l1_table_offset + 8ull * i);
				if (r < 0) {
					c->res->check_errors++;
					return r;
				}
				c->res->corruptions--;
				c->res->corruptions_fixed++;
			}
		}
		r = rd(c, t, c->cs, l2);
		if (r < 0) {
			say(c, "ERROR: Could not read L2 table: %s\n", strerror(-r));
			c->res->check_errors++;
			return r;
		}
		for (uint64_t j = 0; j < c->l2_entries; j++) {
			uint64_t le = qcow2_be64(t + 8 * j), d = le & QCOW2_L2E_OFFSET_MASK;

			if ((le & QCOW2_OFLAG_COMPRESSED) || !d)
				continue;
			if (get_refcount(c, d >> c->cb, &rc) < 0)
				continue;
			if ((rc == 1) != !!(le & QCOW2_OFLAG_COPIED)) {
				c->res->corruptions++;
				say(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64
				       " refcount=%" PRIu64 "\n", repair ? "Repairing" : "ERROR", le,
				    rc);
				if (repair) {
					qcow2_put_be64(t + 8 * j, rc == 1 ? le | QCOW2_OFLAG_COPIED
									  : le & ~QCOW2_OFLAG_COPIED);
					dirty++;
				}
			}
		}
		if (dirty) {
			if (meta_has(c, l2)) {
				say(c, "ERROR: Could not write L2 table; metadata overlap check "
				       "failed: %s\n", strerror(EIO));
				c->res->check_errors++;
				return -EIO;
			}
			r = qsm_io_pwrite_sync(c->io, t, c->cs, l2);
			if (r < 0) {
				say(c, "ERROR: Could not write L2 table: %s\n", strerror(-r));
				c->res->check_errors++;
				return r;
			}
			c->res->corruptions -= dirty;
			c->res->corruptions_fixed += dirty;
		}
	}
	return 0;
}

/* qcow2_check_refcounts(). */
static int check_refcounts(struct ck *c, unsigned fix)
{
	struct ck_res *res = c->res, pre;
	uint64_t highest = 0;
	bool rb = false;
	int r;

	res->total_clusters = size_to_clusters(c, c->h.size / 512 * 512);
	r = calculate(c, fix, &rb);
	if (r < 0)
		return r;
	pre = *res;
	compare(c, 0, &rb, &highest);

	if (rb && (fix & QSM_CHECK_FIX_ERRORS)) {
		struct ck_res old = *res;
		uint64_t fresh_leaks = 0;

		say(c, "Rebuilding refcount structure\n");
		r = rebuild(c);
		if (r < 0) {
			res->check_errors++;
			return r;
		}
		c->rebuilt = true;
		res->corruptions = 0;
		res->leaks = 0;
		rb = false;
		memset(c->imrt, 0, c->imrt_n * 2);
		r = calculate(c, 0, &rb);
		if (r < 0)
			return r;
		/* As qemu, compare against the new structure (freeing the old
		 * one's clusters with FIX_LEAKS).  Unlike qemu, what is still
		 * broken is counted, so corruptions_left tells the truth (qemu
		 * relies on qemu-img's second check; the open-time repair of a
		 * dirty image trusts corruptions_left). */
		{
			struct ck_res saved = *res;
			*res = (struct ck_res){ 0 };
			compare(c, fix & QSM_CHECK_FIX_LEAKS, &rb, &highest);
			if (rb)
				say(c, "ERROR rebuilt refcount structure is still broken\n");
			if (fix & QSM_CHECK_FIX_LEAKS)
				fresh_leaks = res->leaks;
			uint64_t broken = res->corruptions ? res->corruptions : rb;
			*res = saved;
			res->corruptions += broken;
		}
		if (res->corruptions < old.corruptions)
			res->corruptions_fixed += old.corruptions - res->corruptions;
		if (res->leaks < old.leaks)
			res->leaks_fixed += old.leaks - res->leaks;
		res->leaks += fresh_leaks;
		r = rbc_flush(c);
		if (r == 0)
			r = qsm_io_flush_sync(c->io);
		if (r < 0) {
			res->check_errors++;
			return r;
		}
	} else if (fix) {
		if (rb) {
			say(c, "ERROR need to rebuild refcount structures\n");
			res->check_errors++;
			return -EIO;
		}
		if (res->leaks || res->corruptions) {
			*res = pre;
			compare(c, fix, &rb, &highest);
			/* raised and lowered refcounts are durable before COPIED changes */
			r = rbc_flush(c);
			if (r == 0)
				r = qsm_io_flush_sync(c->io);
			if (r < 0) {
				res->check_errors++;
				return r;
			}
		}
	}
	/* check_oflag_copied()'s choice, made on this pass's findings (as
	 * qemu's refcount_res), though the pass itself runs later (check_copied) */
	if (fix & QSM_CHECK_FIX_ERRORS)
		c->copied_repair = true;
	else if (fix & QSM_CHECK_FIX_LEAKS)
		c->copied_repair = !res->check_errors && !res->corruptions && !res->leaks;
	res->image_end_offset = (highest + 1) * c->cs;
	return 0;
}

/* --- opening: header, reftable, L1, snapshot table ------------------------ */

/*
 * qcow2_check_read_snapshot_table(): the open skipped the table (ck_open),
 * so a broken one is reported and, with FIX_ERRORS, repaired here, before
 * the refcounts are counted:
 *   - nb_snapshots over 65536: the entries past it are dropped;
 *   - then the table's place (qcow2_validate_table: count, offset aligned,
 *     offset + size <= INT64_MAX), else the check stops;
 *   - the entries (metadata/snapshot.c, QCOW2_SNAP_REPAIR with FIX_ERRORS):
 *     extra data over 1024 bytes cut, the entries past 64 MiB dropped, else
 *     the check stops;
 *   - entries dropped: the header's nb_snapshots is written now (the count
 *     the refcount pass then uses; what only they referenced is leaked, and
 *     freed by that pass): corruptions fixed at once;
 *   - a v3 entry without disk_size: a corruption ("incomplete").
 * *sn_corrupt gets the corruptions that only rewriting the table repairs
 * (cut extra data, incomplete entries): fix_snapshots() does it after the
 * refcount pass.  Returns 0 or -errno (then the check stops, res->report
 * says why in qemu-img's words).
 */
static int check_read_snapshots(struct ck *c, unsigned fix, uint64_t *sn_corrupt,
				struct qsm_check_result *out, char *err, size_t errlen)
{
	bool repair = fix & QSM_CHECK_FIX_ERRORS;
	uint32_t nb = c->h.nb_snapshots, reduced = 0, dropped = 0;
	uint64_t off = c->h.snapshots_offset;
	char why[400] = "";
	int r;

	*sn_corrupt = 0;
	if (c->opening) {
		/* the open's parser and words (the header parse applied the
		 * open's table checks already); a refusal refuses the open */
		r = qcow2_snapshots_read(snap_rd, c, off, nb, c->h.size, &c->snaps, err, errlen);
		if (r < 0) {
			if (err && errlen && !err[0])
				qsm_set_err(err, errlen, "cannot read the snapshot table: %s",
					    strerror(-r));
			return r;
		}
		/* and qsm's per-entry rules, which the open applies after the
		 * repair: refused before anything is written */
		for (uint32_t i = 0; i < c->snaps.nb; i++)
			if ((r = qcow2_snapshot_validate(&c->snaps.sn[i], i, &c->h, c->file_size,
							 err, errlen)) < 0)
				return r;
		c->snapshots_size = c->snaps.size;
		goto incomplete;
	}
	c->h.nb_snapshots = 0;  /* until read: nothing below counts a table not read */
	c->h.snapshots_offset = 0;
	if (nb > QCOW2_MAX_SNAPSHOTS && repair) {
		say(c, "Discarding %" PRIu32 " overhanging snapshots\n", nb - QCOW2_MAX_SNAPSHOTS);
		reduced += nb - QCOW2_MAX_SNAPSHOTS;
		nb = QCOW2_MAX_SNAPSHOTS;
	}
	if (nb > QCOW2_MAX_SNAPSHOTS || (off & (c->cs - 1)) ||
	    INT64_MAX - (uint64_t)nb * QCOW2_SNAPSHOT_HDR < off) {
		c->res->check_errors++;
		r = nb > QCOW2_MAX_SNAPSHOTS ? -EFBIG : -EINVAL;
		if (nb > QCOW2_MAX_SNAPSHOTS)
			qsm_set_err(out->report, sizeof(out->report), "ERROR snapshot table too "
				"large\nYou can force-remove all %" PRIu32 " overhanging snapshots "
				"with qemu-img check -r all", nb - QCOW2_MAX_SNAPSHOTS);
		else
			qsm_set_err(out->report, sizeof(out->report),
				    "ERROR snapshot table offset invalid");
		return r;
	}
	r = qcow2_snapshots_read_check(snap_rd, c, off, nb, c->h.size,
				       repair ? QCOW2_SNAP_REPAIR : 0, &c->snaps, why, sizeof(why));
	if (r < 0) {
		c->res->check_errors++;
		qsm_set_err(out->report, sizeof(out->report),
			    "ERROR failed to read the snapshot table: %s", why);
		return r;
	}
	for (uint32_t i = 0; i < c->snaps.nb; i++) {
		const struct qcow2_snapshot *sn = &c->snaps.sn[i];
		if (sn->extra_cut_from) {
			say(c, "Discarding too much extra metadata in snapshot table entry %" PRIu32
			       " (%" PRIu32 " > %u)\n", i, sn->extra_cut_from,
			    QCOW2_MAX_SNAPSHOT_EXTRA);
			dropped++;
		}
	}
	if (c->snaps.discarded_extra) {
		say(c, "Discarding too much extra metadata in snapshot table entry %" PRIu32
		       " (%" PRIu32 " > %u)\n", c->snaps.nb, c->snaps.discarded_extra,
		    QCOW2_MAX_SNAPSHOT_EXTRA);
		dropped++;
	}
	if (c->snaps.discarded) {
		say(c, "Discarding %" PRIu32 " overhanging snapshots (snapshot table is too big)\n",
		    c->snaps.discarded);
		reduced += c->snaps.discarded;
	}
	c->h.nb_snapshots = c->snaps.nb;
	c->h.snapshots_offset = off;
	c->snapshots_size = c->snaps.size;
	*sn_corrupt = dropped;
	if (reduced) {
		uint8_t be[4];

		qcow2_put_be32(be, c->snaps.nb);
		r = qsm_io_pwrite_sync(c->io, be, 4, 60);
		if (r == 0)
			r = qsm_io_flush_sync(c->io);
		if (r < 0) {
			c->res->check_errors++;
			c->res->corruptions += reduced + dropped;
			*sn_corrupt = 0;
			say(c, "ERROR failed to update the snapshot count in the image header: %s\n",
			    strerror(-r));
			return r;
		}
		c->res->corruptions_fixed += reduced;
	}
incomplete:
	if (c->h.version >= 3) {
		for (uint32_t i = 0; i < c->snaps.nb; i++) {
			if (qcow2_snapshot_incomplete(&c->snaps.sn[i], &c->h)) {
				say(c, "%s snapshot table entry %" PRIu32 " is incomplete\n",
				    repair ? "Repairing" : "ERROR", i);
				(*sn_corrupt)++;
			}
		}
	}
	return 0;
}

/*
 * qcow2_check_fix_snapshot_table() + qcow2_write_snapshots(): the table
 * rewritten as QEMU writes it (every entry with 24 bytes of extra data or
 * more: disk_size and icount filled in, cut extra data written cut) into
 * the first run of free clusters (stored refcount 0, a refcount block
 * present: the clusters qcow2_alloc_clusters hands out first), then the
 * header pointed at it, then the old table's clusters released.  Order
 * (crash safety, refcount >= references at every instant): new clusters'
 * refcounts, flush; the table, flush; nb_snapshots + snapshots_offset (one
 * 12-byte write), flush; old clusters' refcounts lowered, flush.  A crash
 * before the header write leaks the new clusters, after it the old ones.
 */
static int write_snapshots(struct ck *c)
{
	int64_t size = qcow2_snapshots_size(&c->snaps);
	uint64_t n, first = 0, run = 0, cl, noff = 0, ooff = c->h.snapshots_offset;
	uint64_t osize = c->snapshots_size;
	uint8_t *buf = NULL, hdr[12];
	int r;

	if (size < 0)
		return (int)size;
	n = size_to_clusters(c, (uint64_t)size);
	if (n) {
		uint64_t per = 1ull << c->rb_bits, end = c->reft_size * per;

		for (cl = 0; cl < end && run < n; cl++) {
			uint64_t rc;
			if (!c->reft[cl / per] || (c->reft[cl / per] & ~QCOW2_REFT_OFFSET_MASK) ||
			    get_refcount(c, cl, &rc) < 0 || rc ||
			    (cl < c->imrt_n && c->imrt[cl])) {  /* never over a reference */
				run = 0;
				continue;
			}
			if (!run++)
				first = cl;
		}
		if (run < n)
			return -ENOSPC;  /* would need a new refcount block: not done here */
		noff = first << c->cb;
		buf = calloc(1, n << c->cb);
		if (!buf)
			return -ENOMEM;
		r = qcow2_snapshots_serialize(&c->snaps, buf, (size_t)size);
		if (r == 0)
			r = qsm_io_pwrite_sync(c->io, buf, (size_t)size, noff);
		free(buf);
		if (r == 0)
			r = qsm_io_flush_sync(c->io);
		if (r < 0)
			return r;
		for (cl = first; cl < first + n; cl++)
			if ((r = set_refcount(c, cl, 1)) < 0)
				return r;
		if ((r = rbc_flush(c)) < 0 || (r = qsm_io_flush_sync(c->io)) < 0)
			return r;
	}
	qcow2_put_be32(hdr, c->snaps.nb);
	qcow2_put_be64(hdr + 4, noff);
	r = qsm_io_pwrite_sync(c->io, hdr, sizeof(hdr), 60);
	if (r == 0)
		r = qsm_io_flush_sync(c->io);
	if (r < 0)
		return r;
	c->h.snapshots_offset = noff;
	c->snapshots_size = (uint64_t)size;
	/* qcow2_free_clusters(): one reference less on each old cluster */
	if (osize) {
		for (cl = ooff >> c->cb; cl < (ooff + osize + c->cs - 1) >> c->cb; cl++) {
			uint64_t rc;
			if (get_refcount(c, cl, &rc) == 0 && rc)
				set_refcount(c, cl, rc - 1);
		}
		if ((r = rbc_flush(c)) < 0 || (r = qsm_io_flush_sync(c->io)) < 0)
			return r;
	}
	return 0;
}

static int fix_snapshots(struct ck *c, unsigned fix, uint64_t sn_corrupt)
{
	int r;

	if (!sn_corrupt)
		return 0;
	if (!(fix & QSM_CHECK_FIX_ERRORS)) {
		c->res->corruptions += sn_corrupt;
		return 0;
	}
	r = write_snapshots(c);
	if (r < 0) {
		c->res->check_errors++;
		c->res->corruptions += sn_corrupt;
		say(c, "ERROR failed to update snapshot table: %s\n", strerror(-r));
		return r;
	}
	c->res->corruptions_fixed += sn_corrupt;
	return 0;
}

static void ck_free(struct ck *c)
{
	for (unsigned i = 0; i < RBC_SLOTS; i++)
		free(c->rbc[i].buf);
	qcow2_snapshots_release(&c->snaps);
	qcow2_bitmap_dir_release(&c->bitmaps);
	free(c->reft);
	free(c->imrt);
	free(c->meta);
	free(c->l1);
	free(c->l2buf);
	qcow2_header_release(&c->h);
}

static int ck_open(struct ck *c, char *err, size_t errlen)
{
	uint8_t probe[512], *hbuf, snp[12] = { 0 };
	size_t hlen;
	int r;

	r = qsm_io_get_size(c->io, &c->file_size);
	if (r < 0) {
		qsm_set_err(err, errlen, "cannot get the file size: %s", strerror(-r));
		return r;
	}
	r = rd(c, probe, sizeof(probe), 0);
	if (r < 0) {
		qsm_set_err(err, errlen, "cannot read the header: %s", strerror(-r));
		return r;
	}
	/* table offsets are bounded by INT64_MAX only, as qemu: tables past the end
	 * of the file are damage the check reports (and a rebuild repairs) */
	hlen = qcow2_header_probe_len(probe, sizeof(probe), INT64_MAX);
	if (!hlen) {
		qsm_set_err(err, errlen, "Image is not in qcow2 format");
		return -EINVAL;
	}
	hbuf = calloc(1, hlen);
	if (!hbuf)
		return -ENOMEM;
	r = rd(c, hbuf, hlen, 0);
	/* As qcow2_do_open() in check mode: the snapshot table pointer is not
	 * validated here (the parser would refuse a broken one); it is read,
	 * reported and repaired by check_read_snapshots(). */
	if (r == 0 && hlen >= 72 && !c->opening) {
		memcpy(snp, hbuf + 60, sizeof(snp));
		memset(hbuf + 60, 0, sizeof(snp));
	}
	if (r == 0)
		r = qcow2_header_parse(hbuf, hlen, INT64_MAX, &c->h, err, errlen);
	free(hbuf);
	if (r < 0)
		return r;
	if (!c->opening) {
		c->h.nb_snapshots = qcow2_be32(snp);
		c->h.snapshots_offset = qcow2_be64(snp + 4);
	}
	c->cb = c->h.cluster_bits;
	c->cs = 1ull << c->cb;
	c->rorder = c->h.refcount_order;
	c->rb_bits = c->cb + 3 - c->rorder;
	c->rmax = c->rorder == 6 ? UINT64_MAX : (1ull << (1u << c->rorder)) - 1;
	c->imrt_max = c->rmax < 0xffff ? c->rmax : 0xffff;
	c->l2_entries = c->cs / 8;
	c->nb_clusters = size_to_clusters(c, c->file_size);
	if (c->nb_clusters * 2 > IMRT_MAX_BYTES) {
		qsm_set_err(err, errlen, "the file (%" PRIu64 " bytes) has too many clusters to check "
			"(%" PRIu64 "; the limit is %llu)", c->file_size, c->nb_clusters,
			IMRT_MAX_BYTES / 2);
		return -EFBIG;
	}

	c->reft_size = ((uint64_t)c->h.refcount_table_clusters << c->cb) / 8;
	c->reft = malloc(c->reft_size * 8);
	if (!c->reft)
		return -ENOMEM;
	r = rd(c, c->reft, c->reft_size * 8, c->h.refcount_table_offset);
	if (r < 0) {
		qsm_set_err(err, errlen, "cannot read the refcount table: %s", strerror(-r));
		return r;
	}
	for (uint64_t i = 0; i < c->reft_size; i++)
		c->reft[i] = qcow2_be64(&c->reft[i]);

	r = read_l1(c, c->h.l1_table_offset, c->h.l1_size, &c->l1);
	if (r < 0) {
		qsm_set_err(err, errlen, "cannot read the L1 table: %s", strerror(-r));
		return r;
	}
	c->l2buf = malloc(c->cs);
	if (!c->l2buf)
		return -ENOMEM;
	/* As QEMU's open: a bitmaps extension, directory or (of a bitmap not
	 * in use) table it would refuse refuses the check. */
	bool found;
	return qcow2_bitmaps_read(snap_rd, c, &c->h, c->h.size, true, &c->bitmaps, &found, err,
				  errlen);
}

/* qcow2_mark_clean() + qcow2_mark_consistent(): one 8-byte write, flushed. */
static int mark_clean(struct ck *c)
{
	uint64_t f = c->h.incompatible_features;
	uint8_t be[8];
	int r;

	if (c->h.version < 3 || !(f & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)))
		return 0;
	r = qsm_io_flush_sync(c->io);
	if (r < 0)
		return r;
	f &= ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
	qcow2_put_be64(be, f);
	r = qsm_io_pwrite_sync(c->io, be, 8, 72);
	if (r == 0)
		r = qsm_io_flush_sync(c->io);
	if (r == 0)
		c->h.incompatible_features = f;
	return r;
}

int qsm_check_image(struct qsm_io *io, unsigned fix, struct qsm_check_result *out, FILE *log,
		    char *err, size_t errlen)
{
	struct ck c = { .io = io, .log = log, .opening = fix & QSM_CHECK_OPENING };
	struct ck_res res = { 0 };
	int r;

	memset(out, 0, sizeof(*out));
	if (err && errlen)
		err[0] = '\0';
	if (fix && (io->flags & QSM_IO_RDONLY)) {
		qsm_set_err(err, errlen, "cannot repair an image opened read-only");
		return -EBADF;
	}
	c.res = &res;
	r = ck_open(&c, err, errlen);
	if (r < 0) {
		ck_free(&c);
		return r;
	}
	/* qcow2_co_check_locked(): the snapshot table, the refcounts, then
	 * the table rewritten when only that repairs it; the COPIED flags
	 * last, on the refcounts all of that left (check_copied) */
	uint64_t sn_corrupt = 0;
	r = check_read_snapshots(&c, fix, &sn_corrupt, out, err, errlen);
	if (r < 0 && c.opening) {
		ck_free(&c);
		return r;
	}
	if (r == 0) {
		struct ck_res sn = res;  /* a rebuild recounts res: keep these apart */
		res = (struct ck_res){ 0 };
		r = check_refcounts(&c, fix);
		res.corruptions += sn.corruptions;
		res.corruptions_fixed += sn.corruptions_fixed;
		res.check_errors += sn.check_errors;
		if (r == 0) {
			r = fix_snapshots(&c, fix, sn_corrupt);
			/* after a failed rewrite too: its refcounts are on disk */
			int r2 = check_copied(&c);
			if (r == 0)
				r = r2;
			if (r == 0 && fix && (r = qsm_io_flush_sync(c.io)) < 0)
				res.check_errors++;
		} else {
			res.corruptions += sn_corrupt;
		}
	}
	if (r == 0 && fix && res.check_errors == 0 && res.corruptions == 0) {
		r = mark_clean(&c);
		if (r < 0)
			res.check_errors++;
	}
	if (r < 0) {
		out->incomplete = true;
		out->error = r;
		if (err && errlen && !err[0])
			qsm_set_err(err, errlen, "Check failed: %s", strerror(-r));
	}
	out->corruptions_left = res.corruptions;
	out->leaks_left = res.leaks;
	out->corruptions_fixed = res.corruptions_fixed;
	out->leaks_fixed = res.leaks_fixed;
	out->refcounts_low = res.refcounts_low;
	out->corruptions = res.corruptions + res.corruptions_fixed;
	out->leaks = res.leaks + res.leaks_fixed;
	out->check_errors = res.check_errors;
	out->image_end_offset = res.image_end_offset;
	out->total_clusters = res.total_clusters;
	out->allocated_clusters = res.allocated;
	out->fragmented_clusters = res.fragmented;
	out->compressed_clusters = res.compressed;
	out->zeroed_entries = res.zeroed;
	out->rebuilt = c.rebuilt;
	ck_free(&c);
	return 0;
}

int qsm_check_exit_code(const struct qsm_check_result *res)
{
	if (res->incomplete || res->check_errors)
		return 1;
	if (res->corruptions_left)
		return 2;
	if (res->leaks_left)
		return 3;
	return 0;
}
