/*
 * metadata/header.c: the qcow2 header, its extensions and the backing file
 * name: parse + validate (untrusted input) and serialize (qemu-img's layout).
 *
 * Design
 * ------
 * Parsing works on an in-memory copy of cluster 0 (or of the whole file when
 * it is shorter) and never trusts a field before it has been range-checked:
 * every count is bounded before it is multiplied, every offset+length sum is
 * checked for overflow before it is compared.  The order is QEMU's
 * qcow2_do_open(): magic, version, cluster_bits, header_length, backing
 * file offset, compression type, unknown incompatible features (named from
 * the image's feature table: the extensions are walked first, their own
 * errors held back), subclusters, refcount_order, the refcount table, the
 * snapshot table and the L1 (qcow2_validate_table), the L1's size, then the
 * extensions' errors, the crypto header, the backing file name; then qsm's
 * own rules (tools/doc/design.md, "Untrusted images").
 *
 * Errors: -EINVAL for a malformed header, -ENOTSUP for a well-formed header
 * that uses something qsm does not implement (unknown or unsupported
 * incompatible features, encryption, version > 3, a virtual size beyond
 * QCOW2_MAX_VIRTUAL_SIZE).
 *
 * Messages: where QEMU refuses the image too, the message is QEMU's
 * (qcow2_do_open, qcow2_read_extensions, qcow2_validate_table), and the
 * checks run in QEMU's order, so the same image gets the same line from
 * qemu-io and from qsm run as qemu-io.  qsm's own checks come after all of
 * QEMU's and name the field and its value.
 *
 * Accepted as QEMU accepts them: a known extension given twice (the last
 * wins), a feature table whose length is not a multiple of 48 (its whole
 * entries are read), a snapshot table past the end of the file (placed in
 * the overlap set at open, so the allocator's cluster over it marks the
 * image corrupt), a refcount table at offset 0 or past the end of the file
 * (QEMU reads the image and finds the damage at its first allocation; qsm's
 * open gives QEMU's words then, sm/image.c).
 *
 * L1 table offset versus the file size (a qsm rule; qemu only checks
 * offset+len <= INT64_MAX, and then reads the header, or zeros, as the L1
 * table): a non-empty L1 table must lie entirely inside the file, i.e.
 * offset + 8*l1_size <= file_size (qemu-img writes it unpadded and a fresh
 * image ends exactly at its end), and not at offset 0.  Every image
 * qemu-img 7.2 writes satisfies this; an image whose tables run past EOF is
 * truncated or hostile.
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

unsigned qcow2_header_drop_ext(struct qcow2_header *h, uint32_t type)
{
	unsigned k = 0;
	for (unsigned i = 0; i < h->nb_unknown_exts; i++) {
		if (h->unknown_exts[i].type == type)
			free(h->unknown_exts[i].data);
		else
			h->unknown_exts[k++] = h->unknown_exts[i];
	}
	unsigned dropped = h->nb_unknown_exts - k;
	h->nb_unknown_exts = k;
	return dropped;
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

/* Does the image carry a crypto header extension (kept in unknown_exts)? */
static bool has_crypto_ext(const struct qcow2_header *h)
{
	for (unsigned i = 0; i < h->nb_unknown_exts; i++)
		if (h->unknown_exts[i].type == QCOW2_EXT_CRYPTO)
			return true;
	return false;
}

/* Forget the kept extensions of `type` (a later one replaces them). */
static void drop_ext(struct qcow2_header *h, uint32_t type)
{
	unsigned j = 0;

	for (unsigned i = 0; i < h->nb_unknown_exts; i++) {
		if (h->unknown_exts[i].type == type)
			free(h->unknown_exts[i].data);
		else
			h->unknown_exts[j++] = h->unknown_exts[i];
	}
	h->nb_unknown_exts = j;
}

static int parse_feature_table(struct qcow2_header *h, const uint8_t *p, uint32_t len,
			       char *err, size_t errlen)
{
	unsigned n;

	/* A trailing partial entry is ignored (QEMU reads the table as whole
	 * entries and opens such an image).  A later table replaces an
	 * earlier one (duplicates: the last wins). */
	(void)err;
	(void)errlen;
	n = len / FEATURE_ENTRY_LEN;
	free(h->feature_names);
	h->feature_names = NULL;
	h->nb_feature_names = 0;
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
			/* QEMU: the 8-byte extension header runs past the area */
			qsm_set_err(err, errlen, "Header extension too large");
			return -EINVAL;
		}
		type = qcow2_be32(buf + off);
		len = qcow2_be32(buf + off + 4);
		off += 8;
		if (type == QCOW2_EXT_END)
			return 0;
		if (len > end - off) {
			qsm_set_err(err, errlen, "Header extension too large");
			return -EINVAL;
		}
		/* A known type seen before: QEMU reads every occurrence and keeps
		 * the last; so does qsm (the earlier one is dropped, so the header
		 * qsm rewrites names it once).  Unknown types are all kept. */
		idx = ext_known_index(type);
		if (idx >= 0 && (seen & (1u << idx)))
			drop_ext(h, type);
		if (idx >= 0)
			seen |= 1u << idx;

		switch (type) {
		case QCOW2_EXT_BACKING_FORMAT:
			if (len >= QCOW2_BACKING_FORMAT_MAX) {
				qsm_set_err(err, errlen, "ERROR: ext_backing_format: len=%" PRIu32
					" too large (>=%u)", len, QCOW2_BACKING_FORMAT_MAX);
				return -EINVAL;
			}
			/* A qsm rule (QEMU takes any bytes): the name is used
			 * as a format name and printed. */
			if (!printable(buf + off, len)) {
				qsm_set_err(err, errlen, "invalid backing format header extension "
					"(length %" PRIu32 "; must be a printable name)", len);
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
				qsm_set_err(err, errlen, "bitmaps_ext: Invalid extension length");
				return -EINVAL;
			}
			goto keep;
		case QCOW2_EXT_CRYPTO:
			if (h->crypt_method != 2) {
				qsm_set_err(err, errlen, "CRYPTO header extension only expected "
					"with LUKS encryption method");
				return -EINVAL;
			}
			if (len != 16) {
				qsm_set_err(err, errlen, "CRYPTO header extension size %" PRIu32
					", but expected size 16", len);
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
 * Check one table, QEMU's qcow2_validate_table() first: the entry count
 * bounded by `max_bytes` ("<table> too large"), the offset cluster aligned
 * and offset + entries*entry_len <= INT64_MAX ("<table> offset invalid").
 * Then qsm's own rules for a non-empty table (QEMU opens such images; qsm
 * refuses them, naming the field): the offset is not 0 (the header) unless
 * TABLE_AT_0_OK, and the table lies inside the file unless TABLE_PAST_EOF_OK.
 */
#define TABLE_PAST_EOF_OK 1u
#define TABLE_AT_0_OK 2u
static int check_table(const char *table, const char *field, uint64_t offset,
		       uint64_t entries, uint64_t entry_len, uint64_t max_bytes, unsigned lenient,
		       uint64_t cluster_size, uint64_t file_size, char *err, size_t errlen)
{
	uint64_t bytes;

	if (entries > max_bytes / entry_len) {
		qsm_set_err(err, errlen, "%s too large", table);
		return -EINVAL;
	}
	bytes = entries * entry_len; /* <= max_bytes: no overflow */
	if (offset > (uint64_t)INT64_MAX - bytes || !QSM_IS_ALIGNED(offset, cluster_size)) {
		qsm_set_err(err, errlen, "%s offset invalid", table);
		return -EINVAL;
	}
	if (entries == 0)
		return 0;
	if (offset == 0 && !(lenient & TABLE_AT_0_OK)) {
		qsm_set_err(err, errlen, "%s is 0 (the table would overlap the header)", field);
		return -EINVAL;
	}
	if (!(lenient & TABLE_PAST_EOF_OK) && offset + bytes > file_size) {
		qsm_set_err(err, errlen, "%s 0x%" PRIx64 " + %" PRIu64 " bytes is past the end of "
			"the file (%" PRIu64 " bytes)", field, offset, bytes, file_size);
		return -EINVAL;
	}
	return 0;
}

/*
 * Refuse incompatible features: first those QEMU does not know either, in
 * QEMU's words (report_unsupported_feature: the names the image's feature
 * table gives, in table order, then "Unknown incompatible feature: <hex
 * mask>" for the rest), then, with `qsm_only`, those QEMU implements and qsm
 * does not (each named, with its bit).
 */
static int check_incompatible(const struct qcow2_header *h, bool qsm_only, char *err,
			      size_t errlen)
{
	uint64_t bad = h->incompatible_features & ~INCOMPAT_KNOWN;
	char msg[512];
	size_t n;

	if (qsm_only)
		bad = h->incompatible_features & INCOMPAT_KNOWN & ~QCOW2_INCOMPAT_SUPPORTED;
	if (!bad)
		return 0;
	n = (size_t)snprintf(msg, sizeof(msg), "Unsupported qcow2 feature(s): ");
	if (!qsm_only) {
		bool first = true;

		for (unsigned i = 0; i < h->nb_feature_names; i++) {
			const struct qcow2_feature_name *f = &h->feature_names[i];

			/* QEMU's walk stops at the first entry without a name */
			if (!f->name[0])
				break;
			if (f->type != 0 || f->bit >= 64 || !(bad & (1ull << f->bit)))
				continue;
			if (n < sizeof(msg))
				n += (size_t)snprintf(msg + n, sizeof(msg) - n, "%s%s",
						      first ? "" : ", ", f->name);
			first = false;
			bad &= ~(1ull << f->bit);
		}
		if (bad && n < sizeof(msg))
			snprintf(msg + n, sizeof(msg) - n, "%sUnknown incompatible feature: %" PRIx64,
				 first ? "" : ", ", bad);
		qsm_set_err(err, errlen, "%s", msg);
		return -ENOTSUP;
	}
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
		if (name)
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

/*
 * The checks in qcow2_do_open()'s order, each refusal in QEMU's words (so
 * `qsm io` run as qemu-io prints what qemu-io prints); the checks QEMU does
 * not make come after QEMU's and say which field is wrong.  Only the
 * extensions are walked before their turn (the feature table names unknown
 * bits); their error is reported where QEMU reads them.
 */
static int parse_fields(const uint8_t *buf, size_t len, uint64_t file_size,
			struct qcow2_header *h, char *err, size_t errlen)
{
	uint64_t cs, ext_end, need, entry_bytes;
	char ext_err[256] = "";
	int ret, ext_ret;

	/* magic and version */
	if (len < 8) {
		qsm_set_err(err, errlen, "image too short for a qcow2 header (%zu bytes)", len);
		return -EINVAL;
	}
	if (qcow2_be32(buf) != QCOW2_MAGIC) {
		qsm_set_err(err, errlen, "Image is not in qcow2 format");
		return -EINVAL;
	}
	h->version = qcow2_be32(buf + 4);
	if (h->version != 2 && h->version != 3) {
		qsm_set_err(err, errlen, "Unsupported qcow2 version %" PRIu32, h->version);
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

	/* cluster_bits */
	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
		qsm_set_err(err, errlen, "Unsupported cluster size: 2^%" PRIu32, h->cluster_bits);
		return -EINVAL;
	}
	cs = 1ull << h->cluster_bits;

	/* header_length (its alignment is a qsm rule, checked below) */
	if (h->version == 3) {
		if (h->header_length < QCOW2_V3_HEADER_LEN) {
			qsm_set_err(err, errlen, "qcow2 header too short");
			return -EINVAL;
		}
		if (h->header_length > cs) {
			qsm_set_err(err, errlen, "qcow2 header exceeds cluster size");
			return -EINVAL;
		}
		if (h->header_length > len) {
			qsm_set_err(err, errlen, "header_length %" PRIu32 " is past the end of the "
				"image (%zu bytes)", h->header_length, len);
			return -EINVAL;
		}
		h->compression_type = h->header_length > 104 ? buf[104] : 0;
	}
	if (h->backing_file_offset > cs) {
		qsm_set_err(err, errlen, "Invalid backing file offset");
		return -EINVAL;
	}
	ext_end = h->backing_file_offset ? h->backing_file_offset : cs;

	/* The extensions, walked now for the feature names; a malformed one
	 * is reported in its turn below.  qsm rule: the area starts at
	 * header_length, so a name stored inside the header is refused. */
	if (h->backing_file_offset && h->backing_file_offset < h->header_length) {
		qsm_set_err(err, errlen, "invalid backing_file_offset %" PRIu64 " (must be "
			"between header_length %" PRIu32 " and the cluster size %" PRIu64 ")",
			h->backing_file_offset, h->header_length, cs);
		return -EINVAL;
	}
	ext_ret = parse_extensions(h, buf, h->header_length, QSM_MIN(ext_end, (uint64_t)len),
				   ext_err, sizeof(ext_err));
	if (ext_ret == -ENOMEM)
		return ext_ret;

	/* compression type (QEMU's validate_compression_type) */
	if (h->compression_type > 1) {
		qsm_set_err(err, errlen, "qcow2: unknown compression type: %u", h->compression_type);
		return -ENOTSUP;
	}
	if (!!(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) != !!h->compression_type) {
		qsm_set_err(err, errlen, "qcow2: Compression type incompatible feature bit must %s"
			"be set", h->compression_type ? "" : "not ");
		return -EINVAL;
	}
	/* incompatible features QEMU does not know either */
	ret = check_incompatible(h, false, err, errlen);
	if (ret)
		return ret;
	/* (the corrupt bit refuses a read-write open: sm/image.c) */
	if (h->incompatible_features & QCOW2_INCOMPAT_EXTL2 && h->cluster_bits < 14) {
		qsm_set_err(err, errlen, "Unsupported subcluster size: %" PRIu64, cs / 32);
		return -EINVAL;
	}
	if (h->refcount_order > 6) {
		qsm_set_err(err, errlen, "Reference count entry width too large; may not exceed "
			"64 bits");
		return -EINVAL;
	}

	/* tables: refcount table, snapshot table, L1 */
	if (h->refcount_table_clusters == 0) {
		qsm_set_err(err, errlen, "Image does not contain a reference count table");
		return -EINVAL;
	}
	/* A refcount table at offset 0 or past the end of the file: QEMU opens
	 * the image and reads it, and finds the damage when it allocates
	 * (metadata/refcount.c: the table is not read, every block is damaged;
	 * sm/image.c words what QEMU says then). */
	ret = check_table("Reference count table", "refcount_table_offset",
			  h->refcount_table_offset, h->refcount_table_clusters, cs,
			  QCOW2_MAX_REFTABLE_BYTES, TABLE_AT_0_OK | TABLE_PAST_EOF_OK, cs, file_size,
			  err, errlen);
	if (ret)
		return ret;
	/* The snapshot table may lie past the end of the file: QEMU opens such
	 * an image and reads zeros there (so does sm/image.c, through
	 * metadata/snapshot.c, which validates the entries).  The overlap set
	 * (sm/image.c) holds it, so a cluster allocated over it marks the image
	 * corrupt instead of being written. */
	ret = check_table("Snapshot table", "snapshots_offset", h->snapshots_offset,
			  h->nb_snapshots, SNAPSHOT_ENTRY_MIN,
			  (uint64_t)SNAPSHOT_ENTRY_MIN * QCOW2_MAX_SNAPSHOTS, TABLE_PAST_EOF_OK, cs, file_size,
			  err, errlen);
	if (ret)
		return ret;
	ret = check_table("Active L1 table", "l1_table_offset", h->l1_table_offset, h->l1_size, 8,
			  QCOW2_MAX_L1_BYTES, 0, cs, file_size, err, errlen);
	if (ret)
		return ret;
	/* L1 entries for the virtual size; with extended L2 entries (16 bytes)
	 * an L2 table maps half as many clusters */
	entry_bytes = h->incompatible_features & QCOW2_INCOMPAT_EXTL2 ? 16 : 8;
	need = qcow2_l1_entries_for(h->size, h->cluster_bits);
	if (entry_bytes == 16)
		need = qcow2_l1_entries_for(h->size > UINT64_MAX / 2 ? UINT64_MAX : h->size * 2,
					    h->cluster_bits);
	if (need > INT32_MAX) {
		qsm_set_err(err, errlen, "Image is too big");
		return -EINVAL;
	}
	if (h->l1_size < need) {
		qsm_set_err(err, errlen, "L1 table is too small");
		return -EINVAL;
	}

	/* the extensions, in their turn */
	if (ext_ret) {
		qsm_set_err(err, errlen, "%s", ext_err);
		return ext_ret;
	}
	if (h->crypt_method > 2 || (h->crypt_method == 2 && !has_crypto_ext(h))) {
		qsm_set_err(err, errlen, "Missing CRYPTO header for crypt method %" PRIu32,
			h->crypt_method);
		return -EINVAL;
	}

	/* backing file name */
	if (h->backing_file_offset) {
		if (h->backing_file_size > QSM_MIN(QCOW2_MAX_BACKING_NAME,
						   cs - h->backing_file_offset)) {
			qsm_set_err(err, errlen, "Backing file name too long");
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
	}

	/* qsm's own rules, after all of QEMU's */
	if (h->version == 3 && h->header_length % 8) {
		qsm_set_err(err, errlen, "invalid header_length %" PRIu32 " (must be a multiple "
			"of 8)", h->header_length);
		return -EINVAL;
	}
	if (h->size > QCOW2_MAX_VIRTUAL_SIZE) {
		qsm_set_err(err, errlen, "virtual size %" PRIu64 " exceeds qsm's limit of %llu bytes",
			h->size, QCOW2_MAX_VIRTUAL_SIZE);
		return h->size > (uint64_t)INT64_MAX ? -EINVAL : -ENOTSUP;
	}
	/* features QEMU implements and qsm does not.  An external data file:
	 * without its name in the image QEMU fails with these words; with a
	 * name, qsm says what it lacks (QEMU would open that file). */
	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		const struct qcow2_ext *name = NULL;
		for (unsigned i = 0; i < h->nb_unknown_exts; i++)
			if (h->unknown_exts[i].type == QCOW2_EXT_DATA_FILE)
				name = &h->unknown_exts[i];
		if (!name)
			qsm_set_err(err, errlen, "'data-file' is required for this image");
		else
			qsm_set_err(err, errlen, "the image keeps its data in the external data file "
				    "'%.*s', which qsm does not support yet", (int)QSM_MIN(name->len, 1024u),
				    (const char *)name->data);
		return -ENOTSUP;
	}
	ret = check_incompatible(h, true, err, errlen);
	if (ret)
		return ret;
	if (h->crypt_method) {
		qsm_set_err(err, errlen, "Unsupported qcow2 feature(s): encryption (crypt_method %"
			PRIu32 ", %s)", h->crypt_method, h->crypt_method == 1 ? "AES" : "LUKS");
		return -ENOTSUP;
	}
	return 0;
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
