/*
 * tests/unit/test_bitmap.c: Check suite "bitmap" for metadata/bitmap.c (the
 * bitmaps extension, directory and tables, as QEMU 7.2 reads them).
 *
 *  - ext: the extension means something only with autoclear bit 0 set;
 *    each of QEMU's extension checks (reserved field, bitmap count, zero
 *    bitmaps, directory offset alignment, directory size) refuses in its
 *    words;
 *  - dir: a well-formed directory parses (fields, names, where each entry
 *    starts), a flag change lands in the raw bytes at the entry's offset;
 *    every rule of bitmap_list_load/check_dir_entry refuses (QEMU's
 *    message), as do qsm's own (empty names, names holding NUL, a name
 *    twice); a count in the extension larger than the directory can hold
 *    is refused without an allocation the count asks for;
 *  - table: entries judged as check_table_entry judges them, and a table
 *    read through a reader converts to host order and stops at the first
 *    bad entry; qcow2_bitmaps_read checks only the tables of bitmaps not in
 *    use, each of exactly the entries the disk needs (a short one is
 *    accepted in use); qcow2_bitmap_set_table changes only its fields;
 *  - bits: qcow2_bitmap_set_range sets exactly the granules a byte range
 *    touches, least significant bit first (QEMU's layout: a 4 KiB write at
 *    64 KiB sets byte 0 bit 1), against a bit-by-bit model for ranges
 *    around byte and granule edges; qcow2_bitmap_run measures runs as
 *    reading bit by bit does.
 */
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "metadata/bitmap.h"
#include "metadata/qcow2.h"
#include "tests/unit/skip.h"

#define CB 16 /* 64 KiB clusters */

/* One directory entry at d + *pos: returns its size. */
static size_t put_entry(uint8_t *d, size_t pos, uint64_t table, uint32_t size, uint32_t flags,
			uint8_t type, uint8_t gran, const char *name, uint32_t extra)
{
	uint8_t *e = d + pos;
	size_t n = strlen(name);
	qcow2_put_be64(e, table);
	qcow2_put_be32(e + 8, size);
	qcow2_put_be32(e + 12, flags);
	e[16] = type;
	e[17] = gran;
	qcow2_put_be16(e + 18, (uint16_t)n);
	qcow2_put_be32(e + 20, extra);
	memcpy(e + 24 + extra, name, n);
	return (24 + n + extra + 7) & ~(size_t)7;
}

static uint8_t dir[4096];
static struct qcow2_bitmaps_ext ext;
static char err[256];

/* Two bitmaps: "b0" enabled at 64 KiB, "off one" disabled at 512 KiB. */
static void two(void)
{
	memset(dir, 0, sizeof(dir));
	size_t p = put_entry(dir, 0, 3ull << CB, 1, QCOW2_BITMAP_AUTO, 1, 16, "b0", 0);
	p += put_entry(dir, p, 5ull << CB, 1, 0, 1, 19, "off one", 0);
	ext = (struct qcow2_bitmaps_ext){ .nb = 2, .dir_size = p, .dir_offset = 7ull << CB };
}

static int parse(struct qcow2_bitmap_dir *d)
{
	err[0] = 0;
	return qcow2_bitmap_dir_parse(dir, &ext, 64ull << 20, CB, d, err, sizeof(err));
}

static void refused(const char *why)
{
	struct qcow2_bitmap_dir d;
	ck_assert_int_eq(parse(&d), -EINVAL);
	ck_assert_msg(strstr(err, why), "'%s' does not say '%s'", err, why);
	ck_assert_ptr_null(d.bm);
	ck_assert_ptr_null(d.raw);
}

START_TEST(dir_valid)
{
	struct qcow2_bitmap_dir d;
	two();
	ck_assert_msg(parse(&d) == 0, "%s", err);
	ck_assert_uint_eq(d.ext.nb, 2);
	ck_assert_str_eq(d.bm[0].name, "b0");
	ck_assert_str_eq(d.bm[1].name, "off one");
	ck_assert_uint_eq(d.bm[0].table_offset, 3ull << CB);
	ck_assert_uint_eq(d.bm[1].granularity_bits, 19);
	ck_assert_uint_eq(d.bm[0].flags, QCOW2_BITMAP_AUTO);
	ck_assert_uint_eq(d.bm[1].entry, 32);
	qcow2_bitmap_set_flags(&d, 1, QCOW2_BITMAP_IN_USE);
	ck_assert_uint_eq(qcow2_be32(d.raw + 32 + 12), QCOW2_BITMAP_IN_USE);
	ck_assert_uint_eq(qcow2_be32(d.raw + 12), QCOW2_BITMAP_AUTO);
	ck_assert(memcmp(d.raw + 32 + 16, dir + 32 + 16, ext.dir_size - 48) == 0);
	qcow2_bitmap_dir_release(&d);
	ck_assert_ptr_null(d.bm);
}
END_TEST

START_TEST(dir_rules)
{
	static const struct { size_t off; uint32_t v; int width; const char *why; } r[] = {
		{ 8, 0, 4, "Bitmap 'b0' doesn't satisfy the constraints" },        /* table_size 0 */
		{ 0, 0, 8, "doesn't satisfy" },                                    /* table offset 0 */
		{ 0, 0x30200, 8, "doesn't satisfy" },                              /* unaligned */
		{ 8, 0x8000001, 4, "doesn't satisfy" },                            /* table too big */
		{ 12, 4, 4, "doesn't satisfy" },                                   /* reserved flag */
		{ 16, 2, 1, "doesn't satisfy" },                                   /* type */
		{ 17, 8, 1, "doesn't satisfy" },                                   /* granularity */
		{ 17, 32, 1, "doesn't satisfy" },
		{ 8, 0x2001, 4, "doesn't satisfy" },                               /* phys > 512 MiB */
		{ 20, 8, 4, "Bitmap extra data is not supported" },
	};
	for (size_t i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
		two();
		if (r[i].width == 8)
			qcow2_put_be64(dir + r[i].off, r[i].v);
		else if (r[i].width == 4)
			qcow2_put_be32(dir + r[i].off, r[i].v);
		else
			dir[r[i].off] = (uint8_t)r[i].v;
		refused(r[i].why);
	}
	/* The disk must fit: 1 entry at 512-byte granularity covers 256 MiB. */
	two();
	dir[17] = 9;
	struct qcow2_bitmap_dir d;
	ck_assert_int_eq(qcow2_bitmap_dir_parse(dir, &ext, 256ull << 20, CB, &d, err, sizeof(err)), 0);
	qcow2_bitmap_dir_release(&d);
	ck_assert_int_eq(qcow2_bitmap_dir_parse(dir, &ext, (256ull << 20) + 512, CB, &d, err,
						sizeof(err)), -EINVAL);
	/* ... unless the bitmap is in use (check_dir_entry: its bits mean
	 * nothing, and a resize leaves it so while it runs). */
	qcow2_put_be32(dir + 12, QCOW2_BITMAP_IN_USE);
	ck_assert_int_eq(qcow2_bitmap_dir_parse(dir, &ext, 128ull << 30, CB, &d, err, sizeof(err)), 0);
	/* a table moved and resized lands in the bytes, the rest untouched */
	qcow2_bitmap_set_table(&d, 1, 9ull << CB, 3);
	ck_assert_uint_eq(d.bm[1].table_offset, 9ull << CB);
	ck_assert_uint_eq(d.bm[1].table_size, 3);
	ck_assert_uint_eq(qcow2_be64(d.raw + 32), 9ull << CB);
	ck_assert_uint_eq(qcow2_be32(d.raw + 32 + 8), 3);
	ck_assert(memcmp(d.raw, dir, 32) == 0 && memcmp(d.raw + 44, dir + 44, ext.dir_size - 44) == 0);
	qcow2_bitmap_dir_release(&d);
	/* Counts and sizes against the extension. */
	two();
	ext.nb = 1;
	refused("More bitmaps found than specified in header extension");
	two();
	ext.nb = 3;
	refused("Less bitmaps found than specified in header extension");
	two();
	ext.dir_size -= 8;
	refused("Broken bitmap directory");
	two();
	ext.dir_size = 16;
	refused("Broken bitmap directory");
	two();
	ext.dir_size = 0;
	refused("Requested bitmap directory size is zero");
	/* A huge count over a small directory: refused, nothing huge allocated
	 * (ASan would report an allocation of 65535 entries' names). */
	two();
	ext.nb = QCOW2_MAX_BITMAPS;
	refused("Less bitmaps found");
	/* qsm's rules: empty names, NUL in a name, a name twice. */
	memset(dir, 0, sizeof(dir));
	ext = (struct qcow2_bitmaps_ext){ .nb = 1, .dir_size = 24, .dir_offset = 7ull << CB };
	qcow2_put_be64(dir, 3ull << CB);
	qcow2_put_be32(dir + 8, 1);
	dir[16] = 1;
	dir[17] = 16;
	refused("doesn't satisfy");
	two();
	dir[24 + 1] = 0; /* "b\0" */
	refused("doesn't satisfy");
	two();
	memcpy(dir + 32 + 24, "b0\0\0\0\0\0", 7);
	qcow2_put_be16(dir + 32 + 18, 2);
	ext.dir_size = 64;
	refused("Bitmap 'b0' appears twice in the bitmap directory");
}
END_TEST

START_TEST(ext_rules)
{
	uint8_t data[24] = { 0 };
	struct qcow2_ext e = { .type = QCOW2_EXT_BITMAPS, .len = 24, .data = data };
	struct qcow2_header h = { .version = 3, .cluster_bits = CB, .unknown_exts = &e,
				  .nb_unknown_exts = 1 };
	struct qcow2_bitmaps_ext x;
	bool found;

	qcow2_put_be32(data, 2);
	qcow2_put_be64(data + 8, 64);
	qcow2_put_be64(data + 16, 7ull << CB);
	/* autoclear bit 0 clear: the extension is void */
	ck_assert_int_eq(qcow2_bitmaps_ext_get(&h, &x, &found, err, sizeof(err)), 0);
	ck_assert(!found);
	h.autoclear_features = QCOW2_AUTOCLEAR_BITMAPS;
	ck_assert_int_eq(qcow2_bitmaps_ext_get(&h, &x, &found, err, sizeof(err)), 0);
	ck_assert(found);
	ck_assert_uint_eq(x.nb, 2);
	ck_assert_uint_eq(x.dir_size, 64);
	ck_assert_uint_eq(x.dir_offset, 7ull << CB);

	static const struct { size_t off; uint64_t v; int width; const char *why; } r[] = {
		{ 4, 1, 4, "bitmaps_ext: Reserved field is not zero" },
		{ 0, 65536, 4, "exceeding the QEMU supported maximum of 65535" },
		{ 0, 0, 4, "found bitmaps extension with zero bitmaps" },
		{ 16, (7ull << CB) + 512, 8, "bitmaps_ext: invalid bitmap directory offset" },
		{ 8, 1024ull * 65535 + 1, 8, "exceeds the maximum supported size" },
	};
	for (size_t i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
		uint8_t keep[24];
		memcpy(keep, data, sizeof(keep));
		if (r[i].width == 8)
			qcow2_put_be64(data + r[i].off, r[i].v);
		else
			qcow2_put_be32(data + r[i].off, (uint32_t)r[i].v);
		ck_assert_int_eq(qcow2_bitmaps_ext_get(&h, &x, &found, err, sizeof(err)), -EINVAL);
		ck_assert_msg(strstr(err, r[i].why), "'%s' does not say '%s'", err, r[i].why);
		memcpy(data, keep, sizeof(keep));
	}
}
END_TEST

/* A reader over a buffer standing for the file. */
static uint8_t file[10u << CB];
static int mem_rd(void *opaque, void *buf, size_t len, uint64_t off)
{
	(void)opaque;
	memset(buf, 0, len);
	if (off < sizeof(file))
		memcpy(buf, file + off, len < sizeof(file) - off ? len : sizeof(file) - off);
	return 0;
}

START_TEST(table)
{
	const uint64_t cs = 1ull << CB;
	ck_assert_int_eq(qcow2_bitmap_table_entry_check(0, cs), 0);
	ck_assert_int_eq(qcow2_bitmap_table_entry_check(1, cs), 0);        /* all ones */
	ck_assert_int_eq(qcow2_bitmap_table_entry_check(4 * cs, cs), 0);
	ck_assert_int_eq(qcow2_bitmap_table_entry_check(4 * cs + 1, cs), -EINVAL);
	ck_assert_int_eq(qcow2_bitmap_table_entry_check(4 * cs + 512, cs), -EINVAL);
	ck_assert_int_eq(qcow2_bitmap_table_entry_check(2, cs), -EINVAL);  /* bits 1-8 */
	ck_assert_int_eq(qcow2_bitmap_table_entry_check(1ull << 56, cs), -EINVAL);

	/* b0's table at cluster 3, "off one"'s at 5; the directory at 7. */
	memset(file, 0, sizeof(file));
	two();
	memcpy(file + (7u << CB), dir, ext.dir_size);
	qcow2_put_be64(file + (3u << CB), 8 * cs);
	qcow2_put_be64(file + (5u << CB), 1);
	uint8_t data[24];
	qcow2_put_be32(data, ext.nb);
	qcow2_put_be32(data + 4, 0);
	qcow2_put_be64(data + 8, ext.dir_size);
	qcow2_put_be64(data + 16, ext.dir_offset);
	struct qcow2_ext e = { .type = QCOW2_EXT_BITMAPS, .len = 24, .data = data };
	struct qcow2_header h = { .version = 3, .cluster_bits = CB, .unknown_exts = &e,
				  .nb_unknown_exts = 1, .autoclear_features = QCOW2_AUTOCLEAR_BITMAPS,
				  .size = 64ull << 20 };
	struct qcow2_bitmap_dir d;
	bool found;
	ck_assert_msg(qcow2_bitmaps_read(mem_rd, NULL, &h, h.size, true, &d, &found, err,
					 sizeof(err)) == 0, "%s", err);
	ck_assert(found);
	uint64_t *t;
	ck_assert_int_eq(qcow2_bitmap_table_read(mem_rd, NULL, &d.bm[0], cs, &t), 0);
	ck_assert_uint_eq(t[0], 8 * cs);
	free(t);
	qcow2_bitmap_dir_release(&d);

	/* A bad entry in a table: refused when the bitmap is not in use... */
	qcow2_put_be64(file + (5u << CB), 8 * cs + 2);
	ck_assert_int_eq(qcow2_bitmaps_read(mem_rd, NULL, &h, h.size, true, &d, &found, err,
					    sizeof(err)), -EINVAL);
	ck_assert(!found);
	ck_assert_msg(strstr(err, "Could not read bitmap_table table from image for bitmap "
			     "'off one'"), "%s", err);
	ck_assert_int_eq(qcow2_bitmap_table_read(mem_rd, NULL, &(struct qcow2_bitmap){
		.table_offset = 5ull << CB, .table_size = 1 }, cs, &t), -EINVAL);
	ck_assert_ptr_null(t);
	/* ... or when tables are not asked for; an in-use bitmap's is not read. */
	ck_assert_int_eq(qcow2_bitmaps_read(mem_rd, NULL, &h, h.size, false, &d, &found, err,
					    sizeof(err)), 0);
	qcow2_bitmap_dir_release(&d);
	qcow2_put_be32(file + (7u << CB) + 32 + 12, QCOW2_BITMAP_IN_USE);
	ck_assert_int_eq(qcow2_bitmaps_read(mem_rd, NULL, &h, h.size, true, &d, &found, err,
					    sizeof(err)), 0);
	ck_assert_uint_eq(d.bm[1].flags, QCOW2_BITMAP_IN_USE);
	qcow2_bitmap_dir_release(&d);
	/* A table longer than the disk needs: refused for a bitmap not in
	 * use (load_bitmap_data), as for b0's 2 entries on a 64 MiB disk. */
	qcow2_put_be32(file + (7u << CB) + 8, 2);
	ck_assert_int_eq(qcow2_bitmaps_read(mem_rd, NULL, &h, h.size, true, &d, &found, err,
					    sizeof(err)), -EINVAL);
	ck_assert_msg(strstr(err, "Could not read bitmap 'b0' from image: Invalid argument"), "%s",
		      err);
	qcow2_put_be32(file + (7u << CB) + 12, QCOW2_BITMAP_IN_USE | QCOW2_BITMAP_AUTO);
	ck_assert_int_eq(qcow2_bitmaps_read(mem_rd, NULL, &h, h.size, true, &d, &found, err,
					    sizeof(err)), 0);
	qcow2_bitmap_dir_release(&d);
}
END_TEST

START_TEST(bits)
{
	uint8_t d[64], m[64];
	memset(d, 0, sizeof(d));
	qcow2_bitmap_set_range(d, 16, 64 << 10, 4096);
	qcow2_bitmap_set_range(d, 16, 640 << 10, 1);
	ck_assert_uint_eq(d[0], 0x02);
	ck_assert_uint_eq(d[1], 0x04);
	for (size_t i = 2; i < sizeof(d); i++)
		ck_assert_uint_eq(d[i], 0);
	qcow2_bitmap_set_range(d, 16, 0, 0);
	ck_assert_uint_eq(d[0], 0x02);
	/* granularity 2^9: every range over 0..400 granules' edges */
	for (uint64_t a = 0; a < 200 * 512; a += 509)
		for (uint64_t n = 1; a + n < 400 * 512; n += 1531) {
			memset(d, 0, sizeof(d));
			memset(m, 0, sizeof(m));
			qcow2_bitmap_set_range(d, 9, a, n);
			for (uint64_t k = a >> 9; k <= (a + n - 1) >> 9; k++)
				m[k / 8] |= (uint8_t)(1u << (k % 8));
			ck_assert_msg(memcmp(d, m, sizeof(d)) == 0, "range %llu+%llu",
				      (unsigned long long)a, (unsigned long long)n);
		}
	/* runs: against the bit-by-bit reading, over bytes of all kinds */
	for (size_t i = 0; i < sizeof(d); i++)
		d[i] = i % 5 == 0 ? 0 : i % 5 == 1 ? 0xff : (uint8_t)(i * 37 + 11);
	for (uint64_t first = 0; first < 500; first += 3)
		for (uint64_t end = first + 1; end <= 512; end += 7) {
			bool set, v = d[first / 8] >> (first % 8) & 1;
			uint64_t k = first;
			while (k < end && (d[k / 8] >> (k % 8) & 1) == v)
				k++;
			ck_assert_uint_eq(qcow2_bitmap_run(d, first, end, &set), k - first);
			ck_assert(set == v);
		}
}
END_TEST

/* The edits: an entry appended and removed gives back the bytes an open
 * parses (the others untouched), the limits refused in QEMU's words, the
 * extension put where QEMU writes it and dropped with bit 0. */
START_TEST(edits)
{
	struct qcow2_bitmap_dir d;
	two();
	ck_assert_msg(parse(&d) == 0, "%s", err);
	struct qcow2_bitmap b = { .table_offset = 9ull << CB, .table_size = 1,
				  .flags = QCOW2_BITMAP_AUTO, .granularity_bits = 12, .name = "new" };
	ck_assert_msg(qcow2_bitmap_dir_append(&d, &b, 64ull << 20, CB, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(d.ext.nb, 3);
	ck_assert_uint_eq(d.ext.dir_size, ext.dir_size + 32);
	ck_assert_uint_eq(d.ext.dir_offset, ext.dir_offset);
	ck_assert_str_eq(d.bm[2].name, "new");
	ck_assert_uint_eq(d.bm[2].table_offset, 9ull << CB);
	ck_assert_uint_eq(d.bm[2].granularity_bits, 12);
	ck_assert(memcmp(d.raw, dir, ext.dir_size) == 0);
	/* names stay unique, as an open insists */
	b.name = "b0";
	ck_assert_int_eq(qcow2_bitmap_dir_append(&d, &b, 64ull << 20, CB, err, sizeof(err)), -EINVAL);
	ck_assert_uint_eq(d.ext.nb, 3);
	/* an entry an open would refuse: a table too small for the disk */
	b.name = "small";
	b.granularity_bits = 9;
	ck_assert_int_eq(qcow2_bitmap_dir_append(&d, &b, 1ull << 40, CB, err, sizeof(err)), -EINVAL);
	ck_assert_uint_eq(d.ext.nb, 3);
	/* the middle one out: the first and last as they were */
	ck_assert_msg(qcow2_bitmap_dir_remove(&d, 1, 64ull << 20, CB, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(d.ext.nb, 2);
	ck_assert_str_eq(d.bm[0].name, "b0");
	ck_assert_str_eq(d.bm[1].name, "new");
	ck_assert_uint_eq(d.ext.dir_size, 32 + 32);
	ck_assert(memcmp(d.raw, dir, 32) == 0);
	ck_assert_msg(qcow2_bitmap_dir_remove(&d, 0, 64ull << 20, CB, err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(qcow2_bitmap_dir_remove(&d, 0, 64ull << 20, CB, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(d.ext.nb, 0);
	ck_assert_uint_eq(d.ext.dir_size, 0);
	ck_assert_uint_eq(d.ext.dir_offset, 0);
	ck_assert_ptr_null(d.bm);

	char name[1100];
	memset(name, 'x', sizeof(name));
	name[1023] = 0;
	ck_assert_int_eq(qcow2_bitmap_dir_room(&d, strlen(name), err, sizeof(err)), 0);
	name[1023] = 'x';
	name[1024] = 0;
	ck_assert_int_eq(qcow2_bitmap_dir_room(&d, strlen(name), err, sizeof(err)), -EINVAL);
	ck_assert_str_eq(err, "Name length exceeds maximum (1023 characters)");
	d.ext.nb = QCOW2_MAX_BITMAPS;
	ck_assert_int_eq(qcow2_bitmap_dir_room(&d, 3, err, sizeof(err)), -EINVAL);
	ck_assert_str_eq(err, "Maximum number of persistent bitmaps is already reached");
	d.ext.nb = 1;
	d.ext.dir_size = QCOW2_MAX_BITMAP_DIR_SIZE - 24;
	ck_assert_int_eq(qcow2_bitmap_dir_room(&d, 1, err, sizeof(err)), -EINVAL);
	ck_assert_str_eq(err, "Not enough space in the bitmap directory");

	/* table sizes: bits for the disk, in bytes, in clusters */
	ck_assert_uint_eq(qcow2_bitmap_table_size(64ull << 20, 16, CB), 1);
	ck_assert_uint_eq(qcow2_bitmap_table_size((64ull << 20) + 1, 9, 12), 5);
	ck_assert_uint_eq(qcow2_bitmap_table_size(1ull << 62, 9, 9), 0);

	/* the extension: first of the kept ones, bit 0 with it */
	uint8_t other[8] = { 1 };
	struct qcow2_header h = { .version = 3, .cluster_bits = CB };
	h.unknown_exts = calloc(1, sizeof(*h.unknown_exts));
	ck_assert_ptr_nonnull(h.unknown_exts);
	h.unknown_exts[0] = (struct qcow2_ext){ .type = 0x12345678, .len = 8, .data = malloc(8) };
	memcpy(h.unknown_exts[0].data, other, 8);
	h.nb_unknown_exts = 1;
	struct qcow2_bitmaps_ext x = { .nb = 2, .dir_size = 64, .dir_offset = 7ull << CB }, y;
	bool found;
	ck_assert_int_eq(qcow2_bitmaps_ext_put(&h, &x), 0);
	ck_assert_uint_eq(h.nb_unknown_exts, 2);
	ck_assert_uint_eq(h.unknown_exts[0].type, QCOW2_EXT_BITMAPS);
	ck_assert_uint_eq(h.unknown_exts[1].type, 0x12345678);
	ck_assert_uint_eq(h.autoclear_features, QCOW2_AUTOCLEAR_BITMAPS);
	ck_assert_int_eq(qcow2_bitmaps_ext_get(&h, &y, &found, err, sizeof(err)), 0);
	ck_assert(found && y.nb == 2 && y.dir_size == 64 && y.dir_offset == 7ull << CB);
	x.dir_offset = 8ull << CB;
	ck_assert_int_eq(qcow2_bitmaps_ext_put(&h, &x), 0);
	ck_assert_uint_eq(h.nb_unknown_exts, 2);
	ck_assert_int_eq(qcow2_bitmaps_ext_get(&h, &y, &found, err, sizeof(err)), 0);
	ck_assert_uint_eq(y.dir_offset, 8ull << CB);
	x.nb = 0;
	ck_assert_int_eq(qcow2_bitmaps_ext_put(&h, &x), 0);
	ck_assert_uint_eq(h.nb_unknown_exts, 1);
	ck_assert_uint_eq(h.unknown_exts[0].type, 0x12345678);
	ck_assert_uint_eq(h.autoclear_features, 0);
	qcow2_header_release(&h);
}
END_TEST

static Suite *bitmap_suite(void)
{
	Suite *s = suite_create("bitmap");
	TCase *t = tcase_create("format");
	tcase_add_test(t, dir_valid);
	tcase_add_test(t, dir_rules);
	tcase_add_test(t, ext_rules);
	tcase_add_test(t, table);
	tcase_add_test(t, bits);
	tcase_add_test(t, edits);
	suite_add_tcase(s, t);
	return s;
}

int main(void)
{
	return qsm_test_run(bitmap_suite());
}
