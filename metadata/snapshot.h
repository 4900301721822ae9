/*
 * metadata/snapshot.h: the qcow2 snapshot table (internal snapshots):
 * parse + validate (untrusted input), serialize (qemu-img 7.2's layout) and
 * find (qemu-img's name resolution).  Format knowledge only: the caller
 * reads and writes the bytes.
 *
 * On disk (docs/interop/qcow2.txt, "Snapshots"), nb_snapshots entries from
 * snapshots_offset, each starting 8-byte aligned:
 *    0  u64 l1_table_offset     8  u32 l1_size (entries)
 *   12  u16 id_str_size        14  u16 name_size
 *   16  u32 date_sec           20  u32 date_nsec
 *   24  u64 vm_clock_nsec      32  u32 vm_state_size (0 when it needs 64 bits)
 *   36  u32 extra_data_size    40  extra data, then id_str, then name
 * Extra data: u64 vm_state_size_large, u64 disk_size, u64 icount, then
 * bytes qsm does not know (kept and written back as they were).
 */
#ifndef QSM_SNAPSHOT_H
#define QSM_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metadata/qcow2.h"

#define QCOW2_SNAPSHOT_HDR 40u          /* fixed part of an entry */
#define QCOW2_SNAPSHOT_EXTRA 24u        /* the extra data QEMU 7.2 knows and writes */
#define QCOW2_SNAPSHOT_EXTRA_V3 16u     /* what a v3 entry must have (up to disk_size) */
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024u  /* QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA */
#define QCOW2_SNAPSHOT_NO_ICOUNT UINT64_MAX /* icount not recorded (QEMU's -1) */

struct qcow2_snapshot {
	uint64_t l1_table_offset;
	uint32_t l1_size;                 /* entries */
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t vm_state_size;           /* the 64-bit extra field if present, else the 32-bit one */
	uint32_t vm_state_size32;         /* the 32-bit header field as read */
	uint32_t extra_data_size;         /* as read (>= 24 after a serialize) */
	uint64_t disk_size;               /* from the extra data, else the image's virtual size */
	uint64_t icount;                  /* QCOW2_SNAPSHOT_NO_ICOUNT when absent */
	uint8_t *unknown_extra;           /* extra_data_size - 24 bytes, or NULL */
	uint32_t unknown_extra_len;
	char *id, *name;                  /* NUL-terminated (QEMU cuts at an inner NUL too) */
	uint32_t extra_cut_from;          /* QCOW2_SNAP_REPAIR: the extra_data_size on disk when
	                                   * it was over 1024 and cut to 1024, else 0 */
};

struct qcow2_snapshot_table {
	struct qcow2_snapshot *sn;        /* nb entries, in table order */
	uint32_t nb;
	uint64_t size;                    /* bytes the table spans on disk (QEMU's snapshots_size) */
	/* QCOW2_SNAP_REPAIR only: entries dropped off the end because the table
	 * passed 64 MiB (the first of them included), and that first entry's
	 * on-disk extra_data_size when it was over 1024 (QEMU reports its cut
	 * before it drops it), else 0. */
	uint32_t discarded;
	uint32_t discarded_extra;
};

/*
 * Parse nb entries from buf[0..len), the bytes at snapshots_offset (bytes
 * past the end of the file given as zeros, as QEMU's block layer reads
 * them).  virtual_size fills disk_size for entries without it.
 *
 * Returns 0 and fills *t (release with qcow2_snapshots_release), or:
 *  -ENODATA  buf is too short: *need is set to a length that lets the parse
 *            go further (a caller reads that much and parses again; the
 *            number of rounds is logarithmic, each at most doubles);
 *  -EFBIG    QEMU's refusals: extra data over 1024 bytes ("Too much extra
 *            metadata in snapshot table entry I"), the table over 64 MiB
 *            ("Snapshot table is too big");
 *  -EINVAL   nb over QCOW2_MAX_SNAPSHOTS ("Too many snapshots");
 *  -ENOMEM.
 * Nothing is allocated for an entry before its lengths are bounded: every
 * allocation is at most 64 KiB per string and 1 KiB of extra data, and the
 * entry array is bounded by nb <= 65536.
 */
int qcow2_snapshots_parse(const uint8_t *buf, size_t len, uint32_t nb, uint64_t virtual_size,
			  struct qcow2_snapshot_table *t, size_t *need, char *err, size_t errlen);

/*
 * The parse above over bytes the caller's reader gives: rd(opaque, buf, len,
 * off) fills len bytes at file offset off (zeros past the end of the file)
 * and returns 0 or a negative errno.  The table is read in a few large
 * reads (first one of min(64 KiB, ...) bytes, then each round at least
 * doubling, only the new tail read), never per entry.  Returns what the
 * parse returns, or the reader's error.
 */
typedef int (*qcow2_snapshot_reader)(void *opaque, void *buf, size_t len, uint64_t off);
int qcow2_snapshots_read(qcow2_snapshot_reader rd, void *opaque, uint64_t offset, uint32_t nb,
			 uint64_t virtual_size, struct qcow2_snapshot_table *t, char *err,
			 size_t errlen);

/*
 * The reader of `qemu-img check` (QEMU's qcow2_check_read_snapshot_table,
 * which reads the table after an open that skipped it): entry by entry
 * through a window of reads (a few large reads, bytes it skips are never
 * read), nb <= QCOW2_MAX_SNAPSHOTS (the caller applies that bound).
 * flags:
 *   QCOW2_SNAP_REPAIR  (check -r all) instead of refusing: extra data over
 *       1024 bytes is cut to 1024 (sn->extra_cut_from says so, the entry's
 *       extra_data_size becomes 1024, the bytes past it are skipped); the
 *       entry at which the table (counted with the cut sizes) passes 64 MiB,
 *       or its bytes pass 2 GiB, is dropped with every entry after it
 *       (t->discarded, t->discarded_extra; t->nb is what is kept and t->size
 *       ends where the last kept entry ends).
 * Without it the refusals carry qemu-img check's words, the message, then
 * "\n" and QEMU's hint line: "Too much extra metadata in snapshot table
 * entry I" / "Snapshot table is too big" (-EFBIG).  A read error is
 * "Failed to read snapshot table: <strerror>".  Returns 0, -EFBIG, -ENOMEM
 * or the reader's error.
 */
#define QCOW2_SNAP_REPAIR 0x1u
int qcow2_snapshots_read_check(qcow2_snapshot_reader rd, void *opaque, uint64_t offset,
			       uint32_t nb, uint64_t virtual_size, unsigned flags,
			       struct qcow2_snapshot_table *t, char *err, size_t errlen);

/*
 * qsm's rules for one parsed entry (index i) of an image with header h and
 * file size file_size, beyond what QEMU's open checks (qemu-img check
 * reports the first two as corruptions; qsm refuses to open the image, so
 * that nothing built on the table reads a hostile L1 table):
 *   l1_table_offset cluster aligned; l1_size <= QCOW2_MAX_L1_BYTES / 8;
 *   a non-empty L1 table inside the file (offset + 8 * l1_size <= file_size).
 * Returns 0 or -EINVAL with a message naming the entry (index and id) and
 * the field with its value.
 */
int qcow2_snapshot_validate(const struct qcow2_snapshot *sn, uint32_t i,
			    const struct qcow2_header *h, uint64_t file_size, char *err,
			    size_t errlen);

/* A v3 image's entry without the extra data up to disk_size (16 bytes):
 * QEMU opens the image and its check reports "snapshot table entry I is
 * incomplete" as a corruption (qcow2_check_read_snapshot_table); so does
 * qsm check.  A table lying past the end of the file reads as such entries. */
bool qcow2_snapshot_incomplete(const struct qcow2_snapshot *sn, const struct qcow2_header *h);

/*
 * The table as qcow2_write_snapshots() of QEMU 7.2 writes it: entries
 * 8-byte aligned (zero padding), the 32-bit vm_state_size set only when the
 * size fits (else 0), extra data of max(24, extra_data_size) bytes:
 * vm_state_size_large, disk_size, icount, then the unknown bytes; id and
 * name by their C length.  qcow2_snapshots_size() is the byte count (its
 * end is not padded); it returns -EFBIG beyond 64 MiB, -EINVAL for an id
 * or name longer than 65535 bytes.  qcow2_snapshots_serialize() writes
 * that many bytes to out (which must hold them).
 */
int64_t qcow2_snapshots_size(const struct qcow2_snapshot_table *t);
int qcow2_snapshots_serialize(const struct qcow2_snapshot_table *t, uint8_t *out, size_t len);

/*
 * Name resolution, QEMU's.  Each returns the entry index or -ENOENT.
 *  _id_or_name:   by id first, then by name (qcow2's find_snapshot_by_id_or_name:
 *                 qemu-img snapshot -a, convert -l).
 *  _name:         the first entry with that name (bdrv_snapshot_find: qemu-img
 *                 snapshot -d).
 *  _id_and_name:  id and/or name (NULL = any) both matching (find_snapshot_by_id_and_name).
 */
int qcow2_snapshot_find_id_or_name(const struct qcow2_snapshot_table *t, const char *s);
int qcow2_snapshot_find_name(const struct qcow2_snapshot_table *t, const char *name);
int qcow2_snapshot_find_id_and_name(const struct qcow2_snapshot_table *t, const char *id,
				    const char *name);

/* The id qcow2_snapshot_create gives a new snapshot: one more than the
 * largest strtoul() of the existing ids ("1" for an empty table). */
void qcow2_snapshot_new_id(const struct qcow2_snapshot_table *t, char *buf, size_t len);

void qcow2_snapshots_release(struct qcow2_snapshot_table *t);

#endif
