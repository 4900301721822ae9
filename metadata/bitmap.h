/*
 * metadata/bitmap.h: persistent dirty bitmaps (qcow2.txt, "Bitmaps"): the
 * bitmaps header extension, the bitmap directory and bitmap tables, parsed
 * and validated as QEMU 7.2's qcow2-bitmap.c does, in its words.
 *
 * On disk (big-endian):
 *   extension (type 0x23852875, 24 bytes): nb_bitmaps u32, reserved u32 (0),
 *     bitmap_directory_size u64, bitmap_directory_offset u64 (cluster
 *     aligned).  Valid only while autoclear bit 0 is set: a writer that does
 *     not keep bitmaps clears it, and the extension then means nothing.
 *   directory: nb_bitmaps entries, each 8-byte aligned:
 *     bitmap_table_offset u64, bitmap_table_size u32 (entries), flags u32
 *     (bit 0 in_use, bit 1 auto = enabled, others reserved), type u8 (1 =
 *     dirty tracking), granularity_bits u8 (9..31), name_size u16
 *     (1..1023), extra_data_size u32 (QEMU supports only 0), extra data,
 *     name (not NUL terminated), zero padding to 8.
 *   bitmap table: table_size u64 entries; bits 9-55 the offset of a cluster
 *     of bitmap data, 0 for an all-zeros cluster (bit 0 then: all ones);
 *     bits 1-8 and 56-63 reserved.
 * A bitmap with in_use set may be inconsistent with the disk (a writer was
 * tracking into memory and did not store it back): readers must not trust
 * its data.
 *
 * Contracts: pure functions over buffers the caller read; 0 or a negative
 * errno with a message in err naming what is wrong.
 */
#ifndef QSM_BITMAP_H
#define QSM_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metadata/qcow2.h"
#include "metadata/snapshot.h"

#define QCOW2_MAX_BITMAPS 65535u
#define QCOW2_MAX_BITMAP_DIR_SIZE (1024u * QCOW2_MAX_BITMAPS)
#define QCOW2_BITMAP_MAX_TABLE_SIZE 0x8000000u
#define QCOW2_BITMAP_MAX_PHYS_SIZE 0x20000000u
#define QCOW2_BITMAP_MAX_NAME 1023u
#define QCOW2_BITMAP_IN_USE 0x1u
#define QCOW2_BITMAP_AUTO 0x2u
#define QCOW2_BITMAP_RESERVED_FLAGS 0xfffffffcu
#define QCOW2_BITMAP_TABLE_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_BITMAP_TABLE_RESERVED 0xff000000000001feull
#define QCOW2_BITMAP_TABLE_ALL_ONES 0x1ull

struct qcow2_bitmaps_ext {
	uint32_t nb;
	uint64_t dir_size, dir_offset;
};

struct qcow2_bitmap {
	uint64_t table_offset;
	uint32_t table_size;      /* entries */
	uint32_t flags;
	uint8_t granularity_bits;
	const char *name;         /* NUL terminated, in the directory's names */
	size_t entry;             /* where the entry starts in the directory */
};

/* A directory as read: the bytes (to be rewritten in place when flags
 * change) and the entries parsed from them.  Zeroed: no bitmaps. */
struct qcow2_bitmap_dir {
	struct qcow2_bitmaps_ext ext;
	uint8_t *raw;             /* the directory as on disk (ext.dir_size bytes) */
	struct qcow2_bitmap *bm;  /* ext.nb, in directory order */
	char *names;              /* the names, each NUL terminated */
};

/*
 * The bitmaps extension of h, when h keeps one (header.c keeps it among the
 * extensions it does not interpret) and autoclear bit 0 says it is valid:
 * *found, and its fields checked as qcow2_read_extensions does.  0 with
 * *found false otherwise; -EINVAL.
 */
int qcow2_bitmaps_ext_get(const struct qcow2_header *h, struct qcow2_bitmaps_ext *ext,
			  bool *found, char *err, size_t errlen);

/*
 * The reader of metadata/snapshot.h: rd(opaque, buf, len, off) fills len
 * bytes at file offset off, zeros past the end of the file.
 *
 * Everything an open needs (qcow2_read_extensions, then
 * qcow2_load_dirty_bitmaps): the extension checked, the directory read and
 * parsed (below), and, with tables, the table of every bitmap not in use
 * read and its entries checked ("Could not read bitmap_table table from
 * image for bitmap '%s'"), and its size, which must be exactly what
 * virtual_size needs ("Could not read bitmap '%s' from image").  *found
 * false (d zeroed) when h has no valid extension.  0 or a negative errno
 * with err set.
 */
int qcow2_bitmaps_read(qcow2_snapshot_reader rd, void *opaque, const struct qcow2_header *h,
		       uint64_t virtual_size, bool tables, struct qcow2_bitmap_dir *d,
		       bool *found, char *err, size_t errlen);

/*
 * Parse the directory raw (ext->dir_size bytes read at ext->dir_offset) of
 * an image of virtual_size bytes and 2^cluster_bits clusters, each entry
 * checked as bitmap_list_load/check_dir_entry check it (plus: names are
 * unique, as QEMU's bitmap layer insists).  d owns a copy of raw.
 */
int qcow2_bitmap_dir_parse(const uint8_t *raw, const struct qcow2_bitmaps_ext *ext,
			   uint64_t virtual_size, unsigned cluster_bits,
			   struct qcow2_bitmap_dir *d, char *err, size_t errlen);
void qcow2_bitmap_dir_release(struct qcow2_bitmap_dir *d);

/* Set bitmap i's flags, in d->bm and in d->raw (to be written in place). */
void qcow2_bitmap_set_flags(struct qcow2_bitmap_dir *d, uint32_t i, uint32_t flags);
/* Set bitmap i's table (offset, entries), in d->bm and in d->raw. */
void qcow2_bitmap_set_table(struct qcow2_bitmap_dir *d, uint32_t i, uint64_t offset,
			    uint32_t size);

/* A bitmap table entry as check_table_entry judges it: 0 or -EINVAL. */
int qcow2_bitmap_table_entry_check(uint64_t entry, uint64_t cluster_size);

/*
 * Bitmap b's table read into *table (b->table_size entries, host endian,
 * the caller frees it), each entry checked: -EINVAL at the first bad one
 * (*table then NULL), -ENOMEM, or the reader's error.
 */
int qcow2_bitmap_table_read(qcow2_snapshot_reader rd, void *opaque, const struct qcow2_bitmap *b,
			    uint64_t cluster_size, uint64_t **table);

/*
 * Bitmap data: bit k (disk bytes [k << granularity_bits, +granularity))
 * is bit k % 8 of byte k / 8 of the data, least significant bit first (as
 * QEMU serializes it); table entry i holds data bytes [i * cluster_size,
 * (i + 1) * cluster_size).  Set the bits of every granule that disk bytes
 * [offset, offset + bytes) touch, in data (large enough for them).
 */
void qcow2_bitmap_set_range(uint8_t *data, unsigned granularity_bits, uint64_t offset,
			    uint64_t bytes);
/* From bit `first` (< end): its value in *set, and how many bits from it
 * on, up to bit `end`, share that value (at least 1).  Whole bytes of one
 * value are skipped a byte at a time. */
uint64_t qcow2_bitmap_run(const uint8_t *data, uint64_t first, uint64_t end, bool *set);

/* --- Editing (qemu-img bitmap) --------------------------------------------- */

/* Entries of the table of a bitmap of 2^granularity_bits covering
 * virtual_size bytes (QEMU's size_to_clusters(get_bitmap_bytes_needed)):
 * 0 when it exceeds the format's maximum. */
uint32_t qcow2_bitmap_table_size(uint64_t virtual_size, unsigned granularity_bits,
				 unsigned cluster_bits);
/* Room in d for one entry more, named name_len bytes: 0, or -EINVAL in
 * QEMU's words past its limits ("Name length exceeds maximum (1023
 * characters)", "Maximum number of persistent bitmaps is already
 * reached", "Not enough space in the bitmap directory"). */
int qcow2_bitmap_dir_room(const struct qcow2_bitmap_dir *d, size_t name_len, char *err,
			  size_t errlen);
/* d with entry b (its name, table, flags, granularity) added at the end /
 * entry i taken out: the bytes rebuilt and parsed again as an open parses
 * them (an edit never makes what an open refuses).  ext.dir_offset is
 * kept (0 once no entry is left): the caller writes the bytes to new
 * clusters and sets it.  -EINVAL past the limits (qcow2_bitmap_dir_room)
 * or for an entry an open would refuse; d unchanged on failure. */
int qcow2_bitmap_dir_append(struct qcow2_bitmap_dir *d, const struct qcow2_bitmap *b,
			    uint64_t virtual_size, unsigned cluster_bits, char *err, size_t errlen);
int qcow2_bitmap_dir_remove(struct qcow2_bitmap_dir *d, uint32_t i, uint64_t virtual_size,
			    unsigned cluster_bits, char *err, size_t errlen);
/* The header's bitmaps extension set to ext (autoclear bit 0 with it), or
 * dropped with the bit when ext->nb is 0, as qcow2_update_header writes
 * it.  -ENOMEM (h unchanged). */
int qcow2_bitmaps_ext_put(struct qcow2_header *h, const struct qcow2_bitmaps_ext *ext);

#endif
