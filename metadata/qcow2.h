/*
 * metadata/qcow2.h: the qcow2 on-disk format (version 2 and 3) and its header.
 *
 * Everything on disk is big-endian.  In memory, `struct qcow2_header` holds
 * host-endian values; L1/L2 tables and refcount blocks stay in their on-disk
 * byte order inside their buffers so they can be written back unchanged
 * (accessors convert).  Reference: QEMU's docs/interop/qcow2.txt (the
 * format) and tools/doc/design.md.
 *
 * Host cluster layout of a fresh image (as qemu-img 7.2 writes it):
 *   cluster 0: header + extensions (+ backing file name)
 *   cluster 1: refcount table      cluster 2: first refcount block
 *   cluster 3: L1 table (not padded: the file ends at l1 + 8*l1_size)
 */
#ifndef QSM_QCOW2_H
#define QSM_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_DEFAULT_CLUSTER_BITS 16

/* Limits QEMU enforces (qcow2.h); qsm refuses images beyond them. */
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536u
#define QCOW2_MAX_SNAPSHOTS_BYTES (64u << 20)
#define QCOW2_MAX_BACKING_NAME 1023u
/* QEMU keeps the backing format in char[16]: a longer extension is refused. */
#define QCOW2_BACKING_FORMAT_MAX 16u
#define QCOW2_MAX_VIRTUAL_SIZE (1ull << 58) /* < 2^63 with room for arithmetic */

/* Incompatible feature bits. */
#define QCOW2_INCOMPAT_DIRTY        (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT      (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE    (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION  (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2        (1ull << 4)
/* The incompatible features qsm implements. */
#define QCOW2_INCOMPAT_SUPPORTED (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | \
				  QCOW2_INCOMPAT_COMPRESSION)

/* Compatible feature bits. */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)

/* Autoclear feature bits. */
#define QCOW2_AUTOCLEAR_BITMAPS       (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)
/* Autoclear bits qsm keeps valid when writing (none: it does not maintain
 * persistent bitmaps, so a writable open clears them all). */
#define QCOW2_AUTOCLEAR_SUPPORTED 0ull

/* Header extension types. */
#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u
#define QCOW2_EXT_BITMAPS        0x23852875u
#define QCOW2_EXT_CRYPTO         0x0537be77u
#define QCOW2_EXT_DATA_FILE      0x44415441u

/* L1 entries: bits 9-55 L2 table offset, bit 63 COPIED. */
#define QCOW2_L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_L1E_RESERVED    0x7f000000000001ffull
/* L2 entries (standard, 64-bit). */
#define QCOW2_L2E_ZERO        (1ull << 0)
#define QCOW2_L2E_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_L2E_RESERVED    0x3f000000000001feull
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_COPIED     (1ull << 63)
/* Refcount table entries: bits 9-63 block offset. */
#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define QCOW2_REFT_RESERVED    0x00000000000001ffull

#define QCOW2_V2_HEADER_LEN 72u
#define QCOW2_V3_HEADER_LEN 104u /* minimum; qemu-img writes 112 */
#define QCOW2_V3_HEADER_LEN_WRITTEN 112u

/* One entry of the feature name table extension. */
struct qcow2_feature_name {
	uint8_t type; /* 0 incompatible, 1 compatible, 2 autoclear */
	uint8_t bit;
	char name[47]; /* 46 bytes on disk, NUL added */
};

/* A header extension qsm does not interpret; preserved on rewrite. */
struct qcow2_ext {
	uint32_t type;
	uint32_t len;
	uint8_t *data;
};

struct qcow2_header {
	uint32_t version;                 /* 2 or 3 */
	uint64_t backing_file_offset;
	uint32_t backing_file_size;
	uint32_t cluster_bits;
	uint64_t size;                    /* virtual disk size in bytes */
	uint32_t crypt_method;
	uint32_t l1_size;                 /* entries */
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;          /* refcount_bits = 1 << order */
	uint32_t header_length;
	uint8_t compression_type;         /* enum qcow2_compression (v3, byte 104) */

	/* Extensions and the backing file name, parsed. */
	char backing_file[QCOW2_MAX_BACKING_NAME + 1]; /* "" when none */
	char backing_format[64];          /* "" when the extension is absent */
	bool has_feature_table;           /* the image had one */
	struct qcow2_feature_name *feature_names;
	unsigned nb_feature_names;
	struct qcow2_ext *unknown_exts;   /* in image order */
	unsigned nb_unknown_exts;
};

static inline uint64_t qcow2_cluster_size(const struct qcow2_header *h)
{
	return 1ull << h->cluster_bits;
}

/* L2 entries per table (standard 8-byte entries). */
static inline uint64_t qcow2_l2_entries(const struct qcow2_header *h)
{
	return 1ull << (h->cluster_bits - 3);
}

/* L1 entries needed to map `size` bytes with this cluster size. */
uint64_t qcow2_l1_entries_for(uint64_t size, unsigned cluster_bits);

/*
 * Parse and validate a header.  `buf` holds the first `len` bytes of the
 * image (at least the whole of cluster 0 when the file has it; the caller
 * reads 512 bytes first to learn cluster_bits, then the cluster).
 * `file_size` bounds table offsets.  Returns 0, -EINVAL for a malformed
 * header, -ENOTSUP for a valid header using a feature qsm lacks, with a
 * message naming the field and its value in err.
 * Checklist: tools/doc/design.md, "Untrusted images".
 */
int qcow2_header_parse(const uint8_t *buf, size_t len, uint64_t file_size,
		       struct qcow2_header *h, char *err, size_t errlen);

/* Number of bytes of the header to read before parsing (cluster 0, or the
 * file when shorter).  Needs the first 24 bytes only; 0 when they are bad. */
size_t qcow2_header_probe_len(const uint8_t *buf, size_t len, uint64_t file_size);

/*
 * Serialize the header, its extensions (backing format, feature table for
 * v3 with clusters > 4 KiB, unknown ones preserved, end marker) and the
 * backing file name into buf (cluster_size bytes, zero-filled first), in the
 * order qemu-img writes them.  Updates h->header_length and
 * h->backing_file_offset/size to match.  -ENOSPC when it does not fit.
 */
int qcow2_header_serialize(struct qcow2_header *h, uint8_t *buf, size_t buflen);

/* Name of an incompatible feature bit from the image's feature table, or the
 * standard name, or NULL when neither knows it. */
const char *qcow2_feature_name(const struct qcow2_header *h, unsigned type, unsigned bit);

void qcow2_header_release(struct qcow2_header *h);
/* Deep copy (extensions included). */
int qcow2_header_copy(struct qcow2_header *dst, const struct qcow2_header *src);
/* Forget the kept extensions of this type (returns how many): headers
 * serialized from h no longer carry them. */
unsigned qcow2_header_drop_ext(struct qcow2_header *h, uint32_t type);

/* --- Creating images ------------------------------------------------------ */

struct qcow2_create_opts {
	uint64_t size;
	unsigned cluster_bits;        /* 9..21; 0 means the default 16 */
	unsigned version;             /* 2 (compat=0.10) or 3 (compat=1.1); 0 means 3 */
	unsigned refcount_order;      /* 0..6, taken literally (0 = 1-bit refcounts,
	                               * not a default): set 4 for qemu's default
	                               * 16 bits; v2 must be 4 */
	bool lazy_refcounts;          /* v3 only */
	const char *backing_file;     /* NULL or name as stored */
	const char *backing_format;   /* "qcow2"/"raw"...; required with backing_file */
	unsigned compression_type;    /* enum qcow2_compression; non-zlib needs v3 */
};

/*
 * Build the metadata of a fresh image exactly as qemu-img create lays it out
 * (header cluster, refcount table, refcount block, L1), as a byte image of
 * *out_len bytes (malloc'd into *out).  The caller writes it at offset 0 and
 * truncates the file to *out_len.  Returns 0, -EINVAL with err set for bad
 * options.
 */
int qcow2_create_image(const struct qcow2_create_opts *o, uint8_t **out,
		       size_t *out_len, char *err, size_t errlen);

/* Big-endian helpers. */
static inline uint64_t qcow2_be64(const void *p)
{
	const uint8_t *b = p;
	return ((uint64_t)b[0] << 56) | ((uint64_t)b[1] << 48) | ((uint64_t)b[2] << 40) |
	       ((uint64_t)b[3] << 32) | ((uint64_t)b[4] << 24) | ((uint64_t)b[5] << 16) |
	       ((uint64_t)b[6] << 8) | b[7];
}
static inline uint32_t qcow2_be32(const void *p)
{
	const uint8_t *b = p;
	return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}
static inline uint16_t qcow2_be16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)((b[0] << 8) | b[1]);
}
static inline void qcow2_put_be64(void *p, uint64_t v)
{
	uint8_t *b = p;
	for (int i = 7; i >= 0; i--, v >>= 8)
		b[i] = (uint8_t)v;
}
static inline void qcow2_put_be32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 24); b[1] = (uint8_t)(v >> 16);
	b[2] = (uint8_t)(v >> 8); b[3] = (uint8_t)v;
}
static inline void qcow2_put_be16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 8); b[1] = (uint8_t)v;
}

#endif
