/*
 * metadata/header.c: the qcow2 header, its extensions and the backing file
 * name: parse + validate (untrusted input) and serialize (qemu-img's layout).
 *
 * Design
 * ------
 * Parsing works on an in-memory copy of cluster 0 (or of the whole file when
 * it is shorter) and never trusts a field before it has been range-checked:
 * every count is bounded before it is multiplied, every offset+length sum is
 * checked for overflow before it is compared.  The order follows the opener
 * checklist (tools/doc/design.md, "Untrusted images"):
 *
 *   1. magic, version                       6. tables: reftable, L1, snapshots
 *   2. cluster_bits                         7. l1_size covers the virtual size
 *   3. header_length                        8. backing file offset/size
 *   9. header extensions (before 4, so the image's own feature-name table can
 *      name an unknown incompatible bit)
 *   4. feature bits, compression type, crypt_method
 *   5. refcount_order, refcount_table_clusters
 *
 * Errors: -EINVAL for a malformed header, -ENOTSUP for a well-formed header
 * that uses something qsm does not implement (unknown or unsupported
 * incompatible features, encryption, version > 3, a virtual size beyond
 * QCOW2_MAX_VIRTUAL_SIZE).  The message names the field and its value.
 *
 * Table offsets versus the file size (a qsm rule; qemu only checks
 * offset+len <= INT64_MAX): a non-empty table must lie entirely inside the
 * file, i.e. offset + bytes <= file_size, where bytes is 8*l1_size for the L1
 * (qemu-img writes it unpadded and a fresh image ends exactly at its end),
 * refcount_table_clusters*cluster_size for the refcount table (qemu always
 * writes it in whole clusters) and 40*nb_snapshots for the snapshot table
 * (the smallest possible entries; metadata/snapshot code checks the exact
 * size).  Every image qemu-img 7.2 writes satisfies this; an image whose
 * tables run past EOF is truncated or hostile.
 *
 * Serializing reproduces qcow2_update_header() of qemu 7.2: the fixed header
 * (72 bytes for v2, 112 for v3), then the extensions in qemu's order --
 * backing format, data file, crypto, feature table (v3 with clusters > 4 KiB
 * only), bitmaps, the other preserved extensions (in image order; qemu
 * happens to reverse them) -- the end marker, and the backing file name
 * right after it.
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

#define FEATURE_ENTRY_LEN 48u
#define FEATURE_NAME_LEN 46u
#define SNAPSHOT_ENTRY_MIN 40u

/* Names qemu 7.2 writes in its feature table, in its order. */
static const struct {
	uint8_t type, bit;
	const char *name;
} std_features[] = {
	{ 0, 0, "dirty bit" },
	{ 0, 1, "corrupt bit" },
	{ 0, 2, "external data file" },
	{ 0, 3, "compression type" },
	{ 0, 4, "extended L2 entries" },
	{ 1, 0, "lazy refcounts" },
	{ 2, 0, "bitmaps" },
	{ 2, 1, "raw external data" },
};

#define INCOMPAT_KNOWN (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | \
			QCOW2_INCOMPAT_DATA_FILE | QCOW2_INCOMPAT_COMPRESSION | \
			QCOW2_INCOMPAT_EXTL2)

uint64_t qcow2_l1_entries_for(uint64_t size, unsigned cluster_bits)
{
	/* One L1 entry maps an L2 table: cluster_size/8 clusters. */
	unsigned shift = 2 * cluster_bits - 3;
	uint64_t n = size >> shift;

	if (size & ((1ull << shift) - 1))
		n++;
	return n;
}

size_t qcow2_header_probe_len(const uint8_t *buf, size_t len, uint64_t file_size)
{
	uint32_t version, cluster_bits;
	uint64_t cs;

	if (len < 24 || qcow2_be32(buf) != QCOW2_MAGIC)
		return 0;
	version = qcow2_be32(buf + 4);
	cluster_bits = qcow2_be32(buf + 20);
	if (version < 2 || version > 3 || cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
	    cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return 0;
	cs = 1ull << cluster_bits;
	return (size_t)QSM_MIN(cs, file_size);
}

const char *qcow2_feature_name(const struct qcow2_header *h, unsigned type, unsigned bit)
{
	if (h) {
		for (unsigned i = 0; i < h->nb_feature_names; i++) {
			const struct qcow2_feature_name *f = &h->feature_names[i];

			if (f->type == type && f->bit == bit && f->name[0])
				return f->name;
		}
	}
	for (size_t i = 0; i < QSM_ARRAY_SIZE(std_features); i++)
		if (std_features[i].type == type && std_features[i].bit == bit)
			return std_features[i].name;
	return NULL;
}

void qcow2_header_release(struct qcow2_header *h)
{
	if (!h)
		return;
	free(h->feature_names);
	h->feature_names = NULL;
	h->nb_feature_names = 0;
	for (unsigned i = 0; i < h->nb_unknown_exts; i++)
		free(h->unknown_exts[i].data);
	free(h->unknown_exts);
	h->unknown_exts = NULL;
	h->nb_unknown_exts = 0;
}

int qcow2_header_copy(struct qcow2_header *dst, const struct qcow2_header *src)
{
	*dst = *src;
	dst->feature_names = NULL;
	dst->unknown_exts = NULL;
	dst->nb_feature_names = 0;
	dst->nb_unknown_exts = 0;

	if (src->nb_feature_names) {
		dst->feature_names = malloc(src->nb_feature_names * sizeof(*dst->feature_names));
		if (!dst->feature_names)
			goto nomem;
		memcpy(dst->feature_names, src->feature_names,
		       src->nb_feature_names * sizeof(*dst->feature_names));
		dst->nb_feature_names = src->nb_feature_names;
	}
	if (src->nb_unknown_exts) {
		dst->unknown_exts = calloc(src->nb_unknown_exts, sizeof(*dst->unknown_exts));
		if (!dst->unknown_exts)
			goto nomem;
		for (unsigned i = 0; i < src->nb_unknown_exts; i++) {
			const struct qcow2_ext *s = &src->unknown_exts[i];
			struct qcow2_ext *d = &dst->unknown_exts[i];

			d->type = s->type;
			d->len = s->len;
			d->data = malloc(s->len ? s->len : 1);
			if (!d->data)
				goto nomem;
			if (s->len)
				memcpy(d->data, s->data, s->len);
			dst->nb_unknown_exts = i + 1;
		}
	}
	return 0;

nomem:
	qcow2_header_release(dst);
	return -ENOMEM;
}

/* --- Parsing ---------------------------------------------------------------- */

static const char *ext_type_name(uint32_t type)
{
	switch (type) {
	case QCOW2_EXT_BACKING_FORMAT: return "backing format";
	case QCOW2_EXT_FEATURE_TABLE: return "feature name table";
	case QCOW2_EXT_BITMAPS: return "bitmaps";
	case QCOW2_EXT_CRYPTO: return "crypto header";
	case QCOW2_EXT_DATA_FILE: return "external data file name";
	default: return "unknown";
	}
}

/* Bit index of a known extension type for duplicate detection, or -1. */
static int ext_known_index(uint32_t type)
{
	switch (type) {
	case QCOW2_EXT_BACKING_FORMAT: return 0;
	case QCOW2_EXT_FEATURE_TABLE: return 1;
	case QCOW2_EXT_BITMAPS: return 2;
	case QCOW2_EXT_CRYPTO: return 3;
	case QCOW2_EXT_DATA_FILE: return 4;
	default: return -1;
	}
}

static int keep_unknown_ext(struct qcow2_header *h, uint32_t type, const uint8_t *data,
			    uint32_t len)
{
	struct qcow2_ext *v;
	uint8_t *copy;

	v = realloc(h->unknown_exts, (h->nb_unknown_exts + 1) * sizeof(*v));
	if (!v)
		return -ENOMEM;
	h->unknown_exts = v;
	copy = malloc(len ? len : 1);
	if (!copy)
		return -ENOMEM;
	if (len)
		memcpy(copy, data, len);
	v[h->nb_unknown_exts].type = type;
	v[h->nb_unknown_exts].len = len;
	v[h->nb_unknown_exts].data = copy;
	h->nb_unknown_exts++;
	return 0;
}

static int parse_feature_table(struct qcow2_header *h, const uint8_t *p, uint32_t len,
			       char *err, size_t errlen)
{
	unsigned n;

	if (len % FEATURE_ENTRY_LEN) {
		qsm_set_err(err, errlen, "feature name table header extension length %" PRIu32
			" is not a multiple of %u", len, FEATURE_ENTRY_LEN);
		return -EINVAL;
	}
	n = len / FEATURE_ENTRY_LEN;
	h->has_feature_table = true;
	if (!n)
		return 0;
	h->feature_names = calloc(n, sizeof(*h->feature_names));
	if (!h->feature_names)
		return -ENOMEM;
	for (unsigned i = 0; i < n; i++, p += FEATURE_ENTRY_LEN) {
		struct qcow2_feature_name *f = &h->feature_names[i];

		f->type = p[0];
		f->bit = p[1];
		memcpy(f->name, p + 2, FEATURE_NAME_LEN);
		f->name[FEATURE_NAME_LEN] = '\0';
	}
	h->nb_feature_names = n;
	return 0;
}

static bool printable(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] < 0x21 || p[i] > 0x7e)
			return false;
	return true;
}

/*
 * Walk the extensions in buf[start, end).  Fills backing_format,
 * feature_names and unknown_exts.  Contract: start <= end <= buffer length.
 */
static int parse_extensions(struct qcow2_header *h, const uint8_t *buf, uint64_t start,
			    uint64_t end, char *err, size_t errlen)
{
	unsigned seen = 0;
	uint64_t off = start;
	int ret;

	while (off < end) {
		uint32_t type, len;
		int idx;

		if (end - off < 8) {
			qsm_set_err(err, errlen, "header extension at offset %" PRIu64
				" is truncated (%" PRIu64 " bytes left before %" PRIu64 ")",
				off, end - off, end);
			return -EINVAL;
		}
		type = qcow2_be32(buf + off);
		len = qcow2_be32(buf + off + 4);
		off += 8;
		if (type == QCOW2_EXT_END)
			return 0;
		if (len > end - off) {
			qsm_set_err(err, errlen, "header extension 0x%08" PRIx32 " (%s) at offset %"
				PRIu64 ": length %" PRIu32 " exceeds the %" PRIu64
				" bytes left in the header area", type, ext_type_name(type),
				off - 8, len, end - off);
			return -EINVAL;
		}
		idx = ext_known_index(type);
		if (idx >= 0) {
			if (seen & (1u << idx)) {
				qsm_set_err(err, errlen, "duplicate header extension 0x%08" PRIx32
					" (%s) at offset %" PRIu64, type, ext_type_name(type),
					off - 8);
				return -EINVAL;
			}
			seen |= 1u << idx;
		}

		switch (type) {
		case QCOW2_EXT_BACKING_FORMAT:
			if (len >= sizeof(h->backing_format) || !printable(buf + off, len)) {
				qsm_set_err(err, errlen, "invalid backing format header extension "
					"(length %" PRIu32 "; must be a printable name shorter "
					"than %zu bytes)", len, sizeof(h->backing_format));
				return -EINVAL;
			}
			memcpy(h->backing_format, buf + off, len);
			h->backing_format[len] = '\0';
			break;
		case QCOW2_EXT_FEATURE_TABLE:
			ret = parse_feature_table(h, buf + off, len, err, errlen);
			if (ret)
				return ret;
			break;
		case QCOW2_EXT_BITMAPS:
			if (len != 24) {
				qsm_set_err(err, errlen, "bitmaps header extension length %" PRIu32
					" (must be 24)", len);
				return -EINVAL;
			}
			goto keep;
		case QCOW2_EXT_CRYPTO:
			if (len != 16) {
				qsm_set_err(err, errlen, "crypto header extension length %" PRIu32
					" (must be 16)", len);
				return -EINVAL;
			}
			if (h->crypt_method != 2) {
				qsm_set_err(err, errlen, "crypto header extension present but "
					"crypt_method is %" PRIu32 " (must be 2, LUKS)",
					h->crypt_method);
				return -EINVAL;
			}
			goto keep;
		default:
		keep:
			ret = keep_unknown_ext(h, type, buf + off, len);
			if (ret)
				return ret;
			break;
		}
		off += QSM_ALIGN_UP((uint64_t)len, 8);
	}
	return 0;
}

/*
 * Check one table: nonzero (when non-empty), cluster-aligned, offset+bytes
 * not overflowing and inside the file.
 */
static int check_table(const char *field, uint64_t offset, uint64_t bytes, bool empty,
		       uint64_t cluster_size, uint64_t file_size, char *err, size_t errlen)
{
	if (!QSM_IS_ALIGNED(offset, cluster_size)) {
		qsm_set_err(err, errlen, "%s 0x%" PRIx64 " is not aligned to the cluster size (%"
			PRIu64 ")", field, offset, cluster_size);
		return -EINVAL;
	}
	if (empty)
		return 0;
	if (offset == 0) {
		qsm_set_err(err, errlen, "%s is 0 (the table would overlap the header)", field);
		return -EINVAL;
	}
	if (offset > (uint64_t)INT64_MAX - bytes) {
		qsm_set_err(err, errlen, "%s 0x%" PRIx64 " + %" PRIu64 " bytes overflows", field,
			offset, bytes);
		return -EINVAL;
	}
	if (offset + bytes > file_size) {
		qsm_set_err(err, errlen, "%s 0x%" PRIx64 " + %" PRIu64 " bytes is past the end of "
			"the file (%" PRIu64 " bytes)", field, offset, bytes, file_size);
		return -EINVAL;
	}
	return 0;
}

/* Refuse incompatible features qsm lacks, naming each. */
static int check_incompatible(const struct qcow2_header *h, char *err, size_t errlen)
{
	uint64_t bad = h->incompatible_features & ~QCOW2_INCOMPAT_SUPPORTED;
	char msg[512];
	size_t n;

	if (!bad)
		return 0;
	n = (size_t)snprintf(msg, sizeof(msg), "Unsupported qcow2 feature(s): ");
	for (unsigned bit = 0; bit < 64; bit++) {
		const char *name;
		const char *sep = "";

		if (!(bad & (1ull << bit)))
			continue;
		bad &= ~(1ull << bit);
		if (n >= sizeof(msg))
			break;
		if (bad)
			sep = ", ";
		name = qcow2_feature_name(h, 0, bit);
		if (bit == 3 && h->compression_type == 1)
			n += (size_t)snprintf(msg + n, sizeof(msg) - n,
					      "incompatible feature bit 3 (\"%s\", "
					      "compression_type 1 = zstd)%s",
					      name ? name : "compression type", sep);
		else if (name)
			n += (size_t)snprintf(msg + n, sizeof(msg) - n,
					      "incompatible feature bit %u (\"%s\")%s", bit,
					      name, sep);
		else
			n += (size_t)snprintf(msg + n, sizeof(msg) - n,
					      "incompatible feature bit %u%s", bit, sep);
	}
	qsm_set_err(err, errlen, "%s", msg);
	return -ENOTSUP;
}

static int parse_fields(const uint8_t *buf, size_t len, uint64_t file_size,
			struct qcow2_header *h, char *err, size_t errlen)
{
	uint64_t cs, ext_end, need, bytes;
	uint32_t magic;
	int ret;

	/* 1. magic and version */
	if (len < 8) {
		qsm_set_err(err, errlen, "image too short for a qcow2 header (%zu bytes)", len);
		return -EINVAL;
	}
	magic = qcow2_be32(buf);
	if (magic != QCOW2_MAGIC) {
		qsm_set_err(err, errlen, "invalid magic 0x%08" PRIx32 " (not a qcow2 image; "
			"expected 0x%08x)", magic, QCOW2_MAGIC);
		return -EINVAL;
	}
	h->version = qcow2_be32(buf + 4);
	if (h->version != 2 && h->version != 3) {
		qsm_set_err(err, errlen, "unsupported qcow2 version %" PRIu32 " (must be 2 or 3)",
			h->version);
		return h->version < 2 ? -EINVAL : -ENOTSUP;
	}
	if (len < QCOW2_V2_HEADER_LEN || (h->version == 3 && len < QCOW2_V3_HEADER_LEN)) {
		qsm_set_err(err, errlen, "qcow2 header truncated (%zu bytes, version %" PRIu32 ")",
			len, h->version);
		return -EINVAL;
	}

	h->backing_file_offset = qcow2_be64(buf + 8);
	h->backing_file_size = qcow2_be32(buf + 16);
	h->cluster_bits = qcow2_be32(buf + 20);
	h->size = qcow2_be64(buf + 24);
	h->crypt_method = qcow2_be32(buf + 32);
	h->l1_size = qcow2_be32(buf + 36);
	h->l1_table_offset = qcow2_be64(buf + 40);
	h->refcount_table_offset = qcow2_be64(buf + 48);
	h->refcount_table_clusters = qcow2_be32(buf + 56);
	h->nb_snapshots = qcow2_be32(buf + 60);
	h->snapshots_offset = qcow2_be64(buf + 64);
	if (h->version == 2) {
		h->incompatible_features = 0;
		h->compatible_features = 0;
		h->autoclear_features = 0;
		h->refcount_order = 4;
		h->header_length = QCOW2_V2_HEADER_LEN;
		h->compression_type = 0;
	} else {
		h->incompatible_features = qcow2_be64(buf + 72);
		h->compatible_features = qcow2_be64(buf + 80);
		h->autoclear_features = qcow2_be64(buf + 88);
		h->refcount_order = qcow2_be32(buf + 96);
		h->header_length = qcow2_be32(buf + 100);
	}

	/* 2. cluster_bits */
	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
		qsm_set_err(err, errlen, "invalid cluster_bits %" PRIu32 " (must be %d..%d)",
			h->cluster_bits, QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
		return -EINVAL;
	}
	cs = 1ull << h->cluster_bits;

	/* 3. header_length */
	if (h->version == 3) {
		if (h->header_length < QCOW2_V3_HEADER_LEN || h->header_length % 8 ||
		    h->header_length > cs) {
			qsm_set_err(err, errlen, "invalid header_length %" PRIu32 " (must be a "
				"multiple of 8 between %u and the cluster size %" PRIu64 ")",
				h->header_length, QCOW2_V3_HEADER_LEN, cs);
			return -EINVAL;
		}
		if (h->header_length > len) {
			qsm_set_err(err, errlen, "header_length %" PRIu32 " is past the end of the "
				"image (%zu bytes)", h->header_length, len);
			return -EINVAL;
		}
		h->compression_type = h->header_length > 104 ? buf[104] : 0;
	}

	/* 8. backing file name */
	if (h->backing_file_offset) {
		if (h->backing_file_offset > cs ||
		    h->backing_file_offset < h->header_length) {
			qsm_set_err(err, errlen, "invalid backing_file_offset %" PRIu64 " (must be "
				"between header_length %" PRIu32 " and the cluster size %" PRIu64
				")", h->backing_file_offset, h->header_length, cs);
			return -EINVAL;
		}
		if (h->backing_file_size > QSM_MIN(QCOW2_MAX_BACKING_NAME,
						   cs - h->backing_file_offset)) {
			qsm_set_err(err, errlen, "invalid backing_file_size %" PRIu32 " (must be at "
				"most %" PRIu64 " at backing_file_offset %" PRIu64 ")",
				h->backing_file_size,
				QSM_MIN((uint64_t)QCOW2_MAX_BACKING_NAME,
					cs - h->backing_file_offset),
				h->backing_file_offset);
			return -EINVAL;
		}
		if (h->backing_file_offset + h->backing_file_size > len) {
			qsm_set_err(err, errlen, "backing file name (backing_file_offset %" PRIu64
				", backing_file_size %" PRIu32 ") is past the end of the image "
				"(%zu bytes)", h->backing_file_offset, h->backing_file_size, len);
			return -EINVAL;
		}
		if (memchr(buf + h->backing_file_offset, 0, h->backing_file_size)) {
			qsm_set_err(err, errlen, "backing file name (backing_file_offset %" PRIu64
				", backing_file_size %" PRIu32 ") contains a NUL byte",
				h->backing_file_offset, h->backing_file_size);
			return -EINVAL;
		}
		memcpy(h->backing_file, buf + h->backing_file_offset, h->backing_file_size);
		h->backing_file[h->backing_file_size] = '\0';
		ext_end = h->backing_file_offset;
	} else {
		ext_end = cs;
	}

	/* 9. extensions (crypt_method is needed for the crypto extension rule) */
	ret = parse_extensions(h, buf, h->header_length, QSM_MIN(ext_end, (uint64_t)len),
			       err, errlen);
	if (ret)
		return ret;

	/* 4. features, compression, encryption */
	if (h->incompatible_features & QCOW2_INCOMPAT_EXTL2 && h->cluster_bits < 14) {
		qsm_set_err(err, errlen, "invalid cluster_bits %" PRIu32 " with extended L2 entries "
			"(incompatible feature bit 4; must be at least 14)", h->cluster_bits);
		return -EINVAL;
	}
	if (h->compression_type > 1) {
		qsm_set_err(err, errlen, "unknown compression_type %u", h->compression_type);
		return -ENOTSUP;
	}
	if (!!(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) != !!h->compression_type) {
		qsm_set_err(err, errlen, "compression_type %u does not match incompatible feature "
			"bit 3 (compression type), which is %s", h->compression_type,
			h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION ? "set" : "clear");
		return -EINVAL;
	}
	if (h->crypt_method > 2) {
		qsm_set_err(err, errlen, "invalid crypt_method %" PRIu32 " (must be 0, 1 or 2)",
			h->crypt_method);
		return -EINVAL;
	}
	ret = check_incompatible(h, err, errlen);
	if (ret)
		return ret;
	if (h->crypt_method) {
		qsm_set_err(err, errlen, "Unsupported qcow2 feature(s): encryption (crypt_method %"
			PRIu32 ", %s)", h->crypt_method, h->crypt_method == 1 ? "AES" : "LUKS");
		return -ENOTSUP;
	}

	/* 5. refcounts */
	if (h->refcount_order > 6) {
		qsm_set_err(err, errlen, "invalid refcount_order %" PRIu32 " (must be 0..6)",
			h->refcount_order);
		return -EINVAL;
	}
	if (h->refcount_table_clusters == 0) {
		qsm_set_err(err, errlen, "refcount_table_clusters is 0 (the image has no refcount "
			"table)");
		return -EINVAL;
	}
	if (h->refcount_table_clusters > QCOW2_MAX_REFTABLE_BYTES >> h->cluster_bits) {
		qsm_set_err(err, errlen, "refcount_table_clusters %" PRIu32 " too large (the table "
			"may not exceed %u bytes)", h->refcount_table_clusters,
			QCOW2_MAX_REFTABLE_BYTES);
		return -EINVAL;
	}
	ret = check_table("refcount_table_offset", h->refcount_table_offset,
			  (uint64_t)h->refcount_table_clusters << h->cluster_bits, false, cs,
			  file_size, err, errlen);
	if (ret)
		return ret;

	/* 6, 7. virtual size and L1 */
	if (h->size > QCOW2_MAX_VIRTUAL_SIZE) {
		qsm_set_err(err, errlen, "virtual size %" PRIu64 " exceeds qsm's limit of %llu bytes",
			h->size, QCOW2_MAX_VIRTUAL_SIZE);
		return h->size > (uint64_t)INT64_MAX ? -EINVAL : -ENOTSUP;
	}
	if (h->l1_size > QCOW2_MAX_L1_BYTES / 8) {
		qsm_set_err(err, errlen, "l1_size %" PRIu32 " too large (the L1 table may not exceed "
			"%u bytes)", h->l1_size, QCOW2_MAX_L1_BYTES);
		return -EINVAL;
	}
	need = qcow2_l1_entries_for(h->size, h->cluster_bits);
	if (h->l1_size < need) {
		qsm_set_err(err, errlen, "l1_size %" PRIu32 " too small for virtual size %" PRIu64
			" (needs %" PRIu64 " entries)", h->l1_size, h->size, need);
		return -EINVAL;
	}
	ret = check_table("l1_table_offset", h->l1_table_offset, (uint64_t)h->l1_size * 8,
			  h->l1_size == 0, cs, file_size, err, errlen);
	if (ret)
		return ret;

	/* 6. snapshot table (count and placement; entries are parsed elsewhere) */
	if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
		qsm_set_err(err, errlen, "nb_snapshots %" PRIu32 " too large (at most %u)",
			h->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
		return -EINVAL;
	}
	bytes = (uint64_t)h->nb_snapshots * SNAPSHOT_ENTRY_MIN;
	return check_table("snapshots_offset", h->snapshots_offset, bytes,
			   h->nb_snapshots == 0, cs, file_size, err, errlen);
}

int qcow2_header_parse(const uint8_t *buf, size_t len, uint64_t file_size,
		       struct qcow2_header *h, char *err, size_t errlen)
{
	int ret;

	memset(h, 0, sizeof(*h));
	if (err && errlen)
		err[0] = '\0';
	ret = parse_fields(buf, len, file_size, h, err, errlen);
	if (ret == -ENOMEM)
		qsm_set_err(err, errlen, "out of memory parsing the qcow2 header");
	if (ret) {
		qcow2_header_release(h);
		memset(h, 0, sizeof(*h));
	}
	return ret;
}

/* --- Serializing ------------------------------------------------------------ */

/* Append one extension at *pos (qemu's header_ext_add): -ENOSPC when full. */
static int ext_add(uint8_t *buf, size_t limit, size_t *pos, uint32_t type,
		   const void *data, size_t len)
{
	size_t total = 8 + QSM_ALIGN_UP(len, 8);

	if (limit - *pos < total)
		return -ENOSPC;
	qcow2_put_be32(buf + *pos, type);
	qcow2_put_be32(buf + *pos + 4, (uint32_t)len);
	if (len)
		memcpy(buf + *pos + 8, data, len);
	*pos += total;
	return 0;
}

/* Append the preserved extensions of one type (or all "other" ones). */
static int ext_add_kept(const struct qcow2_header *h, uint8_t *buf, size_t limit,
			size_t *pos, uint32_t type, bool others)
{
	for (unsigned i = 0; i < h->nb_unknown_exts; i++) {
		const struct qcow2_ext *e = &h->unknown_exts[i];
		bool match = others ? ext_known_index(e->type) < 0 : e->type == type;
		int ret;

		if (!match)
			continue;
		ret = ext_add(buf, limit, pos, e->type, e->data, e->len);
		if (ret)
			return ret;
	}
	return 0;
}

int qcow2_header_serialize(struct qcow2_header *h, uint8_t *buf, size_t buflen)
{
	uint8_t table[QSM_ARRAY_SIZE(std_features) * FEATURE_ENTRY_LEN];
	size_t limit, pos, name_len;
	uint64_t cs;
	int ret;

	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS ||
	    (h->version != 2 && h->version != 3))
		return -EINVAL;
	/* A v2 header has no room for these: refuse rather than drop them. */
	if (h->version == 2 && (h->incompatible_features || h->compatible_features ||
				h->autoclear_features || h->refcount_order != 4 ||
				h->compression_type))
		return -EINVAL;
	cs = qcow2_cluster_size(h);
	limit = (size_t)QSM_MIN((uint64_t)buflen, cs);
	memset(buf, 0, limit);
	pos = h->version == 2 ? QCOW2_V2_HEADER_LEN : QCOW2_V3_HEADER_LEN_WRITTEN;
	if (limit < pos)
		return -ENOSPC;
	h->header_length = (uint32_t)pos;

	/* Extensions, in qcow2_update_header()'s order. */
	if (h->backing_format[0]) {
		ret = ext_add(buf, limit, &pos, QCOW2_EXT_BACKING_FORMAT, h->backing_format,
			      strnlen(h->backing_format, sizeof(h->backing_format) - 1));
		if (ret)
			return ret;
	}
	ret = ext_add_kept(h, buf, limit, &pos, QCOW2_EXT_DATA_FILE, false);
	if (!ret)
		ret = ext_add_kept(h, buf, limit, &pos, QCOW2_EXT_CRYPTO, false);
	if (ret)
		return ret;
	if (h->version >= 3 && cs > 4096) {
		memset(table, 0, sizeof(table));
		for (size_t i = 0; i < QSM_ARRAY_SIZE(std_features); i++) {
			uint8_t *e = table + i * FEATURE_ENTRY_LEN;

			e[0] = std_features[i].type;
			e[1] = std_features[i].bit;
			memcpy(e + 2, std_features[i].name, strlen(std_features[i].name));
		}
		ret = ext_add(buf, limit, &pos, QCOW2_EXT_FEATURE_TABLE, table, sizeof(table));
		if (ret)
			return ret;
	}
	ret = ext_add_kept(h, buf, limit, &pos, QCOW2_EXT_BITMAPS, false);
	if (!ret)
		ret = ext_add_kept(h, buf, limit, &pos, 0, true);
	if (!ret)
		ret = ext_add(buf, limit, &pos, QCOW2_EXT_END, NULL, 0);
	if (ret)
		return ret;

	/* The backing file name follows the end marker. */
	name_len = strnlen(h->backing_file, sizeof(h->backing_file));
	if (name_len > QCOW2_MAX_BACKING_NAME)
		return -EINVAL;
	if (name_len) {
		if (limit - pos < name_len)
			return -ENOSPC;
		memcpy(buf + pos, h->backing_file, name_len);
		h->backing_file_offset = pos;
		h->backing_file_size = (uint32_t)name_len;
	} else {
		h->backing_file_offset = 0;
		h->backing_file_size = 0;
	}

	qcow2_put_be32(buf, QCOW2_MAGIC);
	qcow2_put_be32(buf + 4, h->version);
	qcow2_put_be64(buf + 8, h->backing_file_offset);
	qcow2_put_be32(buf + 16, h->backing_file_size);
	qcow2_put_be32(buf + 20, h->cluster_bits);
	qcow2_put_be64(buf + 24, h->size);
	qcow2_put_be32(buf + 32, h->crypt_method);
	qcow2_put_be32(buf + 36, h->l1_size);
	qcow2_put_be64(buf + 40, h->l1_table_offset);
	qcow2_put_be64(buf + 48, h->refcount_table_offset);
	qcow2_put_be32(buf + 56, h->refcount_table_clusters);
	qcow2_put_be32(buf + 60, h->nb_snapshots);
	qcow2_put_be64(buf + 64, h->snapshots_offset);
	if (h->version >= 3) {
		qcow2_put_be64(buf + 72, h->incompatible_features);
		qcow2_put_be64(buf + 80, h->compatible_features);
		qcow2_put_be64(buf + 88, h->autoclear_features);
		qcow2_put_be32(buf + 96, h->refcount_order);
		qcow2_put_be32(buf + 100, h->header_length);
		buf[104] = h->compression_type;
	}
	return 0;
}
