/*
 * tests/unit/test_header.c: Check suite "header" for metadata/header.c and
 * metadata/create.c.
 *
 *   - create: qcow2_create_image() output compared byte for byte (and in
 *     length) with what the installed qemu-img writes, over a matrix of
 *     cluster sizes, compat levels, refcount widths, lazy refcounts, backing
 *     files and virtual sizes (TCase "create_qemu", tagged "qemu-img": its
 *     own ctest entry, reported skipped without qemu-img, tests/unit/skip.h);
 *   - parse: qemu-made images parse, and parse -> serialize reproduces
 *     cluster 0 exactly;
 *   - validate: one test per opener-checklist rule: a valid header with a
 *     single field broken must fail with the expected errno and a message
 *     naming the field;
 *   - extensions, feature names, copy/release, option errors.
 */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "io/util.h"
#include "metadata/qcow2.h"
#include "tests/unit/skip.h"

/* --- helpers ----------------------------------------------------------------- */

static char tmpdir[256];
static int have_qemu = -1;

/* Is qemu-img here?  When not, the case is reported skipped (QSM_SKIP). */
static bool qemu_available(void)
{
	if (have_qemu < 0)
		have_qemu = system("qemu-img --version >/dev/null 2>&1") == 0;
	if (!have_qemu)
		QSM_SKIP("qemu-img not found");
	return have_qemu;
}

static void setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/qsm_test_header.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void teardown(void)
{
	char cmd[512];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	ck_assert_int_eq(system(cmd), 0);
}

static uint8_t *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	struct stat st;
	uint8_t *buf;

	if (!f)
		return NULL;
	ck_assert_int_eq(fstat(fileno(f), &st), 0);
	*len = (size_t)st.st_size;
	buf = malloc(*len ? *len : 1);
	ck_assert_ptr_nonnull(buf);
	ck_assert_uint_eq(fread(buf, 1, *len, f), *len);
	fclose(f);
	return buf;
}

/* qemu-img create -f qcow2 -o OPTS into tmpdir/NAME; NULL when it refuses. */
static uint8_t *qemu_create(const char *name, const char *opts, uint64_t size,
			    const char *backing, const char *fmt, size_t *len)
{
	char cmd[2048], path[512];
	char bopt[1200] = "";

	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	if (backing)
		snprintf(bopt, sizeof(bopt), "-b '%s' -F %s", backing, fmt);
	snprintf(cmd, sizeof(cmd), "cd '%s' && qemu-img create -q -f qcow2 %s -o '%s' '%s' %"
		 PRIu64 " >/dev/null 2>&1", tmpdir, bopt, opts, path, size);
	unlink(path);
	if (system(cmd) != 0)
		return NULL;
	return read_file(path, len);
}

static void make_backing(void)
{
	char cmd[512];

	snprintf(cmd, sizeof(cmd), "cd '%s' && qemu-img create -q -f raw base.raw 1G", tmpdir);
	ck_assert_int_eq(system(cmd), 0);
}

static int bits_to_order(unsigned bits)
{
	int o = 0;

	while ((1u << o) < bits)
		o++;
	return o;
}

/*
 * Create with qsm and with qemu-img and compare.  Returns 1 when both made
 * identical images, 0 when both refused, fails the test otherwise.
 */
static int compare_create(unsigned cluster_size, unsigned version, unsigned rbits, bool lazy,
			  bool backing, uint64_t size)
{
	struct qcow2_create_opts o = {
		.size = size,
		.cluster_bits = (unsigned)bits_to_order(cluster_size),
		.version = version,
		.refcount_order = (unsigned)bits_to_order(rbits),
		.lazy_refcounts = lazy,
		.backing_file = backing ? "base.raw" : NULL,
		.backing_format = backing ? "raw" : NULL,
	};
	char opts[256], err[256] = "";
	uint8_t *mine = NULL, *ref;
	size_t mine_len = 0, ref_len = 0;
	int ret;

	snprintf(opts, sizeof(opts), "cluster_size=%u,compat=%s,refcount_bits=%u,"
		 "lazy_refcounts=%s", cluster_size, version == 2 ? "0.10" : "1.1", rbits,
		 lazy ? "on" : "off");
	ref = qemu_create("ref.qcow2", opts, size, backing ? "base.raw" : NULL, "raw", &ref_len);
	ret = qcow2_create_image(&o, &mine, &mine_len, err, sizeof(err));
	if (!ref) {
		ck_assert_msg(ret < 0, "qemu-img refused -o %s size %" PRIu64 " but qsm did not",
			      opts, size);
		ck_assert_msg(err[0], "no error message for -o %s", opts);
		return 0;
	}
	ck_assert_msg(ret == 0, "qsm refused -o %s size %" PRIu64 ": %s", opts, size, err);
	if (mine_len != ref_len || memcmp(mine, ref, ref_len) != 0) {
		size_t i = 0;

		while (i < mine_len && i < ref_len && mine[i] == ref[i])
			i++;
		ck_abort_msg("-o %s size %" PRIu64 ": qsm image (%zu bytes) differs from "
			     "qemu-img's (%zu bytes) at offset 0x%zx", opts, size, mine_len,
			     ref_len, i);
	}

	/* The image must also parse, and serialize back to the same cluster 0. */
	{
		struct qcow2_header h;
		uint64_t cs = cluster_size;
		uint8_t *c0 = malloc(cs);

		ret = qcow2_header_parse(ref, QSM_MIN(cs, ref_len), ref_len, &h, err,
					 sizeof(err));
		ck_assert_msg(ret == 0, "parse of qemu image -o %s failed: %s", opts, err);
		ck_assert_uint_eq(h.version, version);
		ck_assert_uint_eq(h.size, QSM_ALIGN_UP(size, 512));
		ck_assert_uint_eq(h.refcount_order, (unsigned)bits_to_order(rbits));
		ck_assert_uint_eq(!!(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS), lazy);
		ck_assert_int_eq(h.has_feature_table, version == 3 && cluster_size > 4096);
		if (backing) {
			ck_assert_str_eq(h.backing_file, "base.raw");
			ck_assert_str_eq(h.backing_format, "raw");
		}
		ck_assert_int_eq(qcow2_header_serialize(&h, c0, cs), 0);
		ck_assert_msg(memcmp(c0, ref, cs) == 0, "serialize(parse(cluster 0)) differs "
			      "for -o %s", opts);
		qcow2_header_release(&h);
		free(c0);
	}
	free(mine);
	free(ref);
	return 1;
}

/* --- create vs qemu-img -------------------------------------------------------- */

START_TEST(create_matrix)
{
	static const unsigned clusters[] = { 512, 4096, 65536, 2u << 20 };
	static const unsigned widths[] = { 1, 16, 64 };
	int same = 0, refused = 0;

	if (!qemu_available())
		return;
	make_backing();
	for (size_t c = 0; c < QSM_ARRAY_SIZE(clusters); c++)
		for (unsigned v = 2; v <= 3; v++)
			for (size_t w = 0; w < QSM_ARRAY_SIZE(widths); w++)
				for (int lazy = 0; lazy <= 1; lazy++)
					for (int b = 0; b <= 1; b++) {
						if (compare_create(clusters[c], v, widths[w], lazy,
								   b, 1ull << 30))
							same++;
						else
							refused++;
					}
	/* v2 refuses lazy refcounts and widths other than 16. */
	ck_assert_int_eq(same, 4 * (3 * 2 * 2 + 1 * 1 * 2));
	ck_assert_int_eq(refused, 96 - same);
}
END_TEST

struct size_case {
	unsigned cluster_size, rbits;
	uint64_t size;
};

static const struct size_case size_cases[] = {
	{ 65536, 16, 0 },
	{ 65536, 16, 1000 },                 /* rounded up to 1024 like qemu-img */
	{ 65536, 16, 100ull << 30 },
	{ 65536, 16, 16ull << 40 },
	{ 65536, 16, 256ull << 40 },
	{ 65536, 1, 256ull << 40 },
	{ 65536, 64, 256ull << 40 },
	{ 2u << 20, 16, 1ull << 58 },
	{ 4096, 16, 100ull << 30 },
	/* Tiny clusters: the L1 needs many refcount blocks and the refcount
	 * table grows (qemu's -EAGAIN restarts); sizes kept small enough for
	 * qemu-img to finish in seconds (128G at 512/64 takes it 4 minutes). */
	{ 512, 1, 100ull << 30 },
	{ 512, 16, 40ull << 30 },
	{ 512, 64, 8ull << 30 },
	{ 512, 64, 3ull << 30 },
	{ 512, 16, 16ull << 40 },            /* too large: both refuse */
	{ 1024, 64, 16ull << 30 },
	{ 1024, 64, 300ull << 30 },
	{ 1024, 16, 300ull << 30 },
	{ 4096, 64, 16ull << 40 },           /* too large: both refuse */
	{ 8192, 16, 1ull << 40 },
};

START_TEST(create_sizes)
{
	const struct size_case *c = &size_cases[_i];

	if (!qemu_available())
		return;
	compare_create(c->cluster_size, 3, c->rbits, false, false, c->size);
}
END_TEST

START_TEST(create_refcount_layout)
{
	/* Self-check independent of qemu-img: 1 GiB, 64 KiB clusters. */
	struct qcow2_create_opts o = { .size = 1ull << 30, .refcount_order = 4 };
	uint8_t *img;
	size_t len;
	char err[256];

	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), 0);
	ck_assert_uint_eq(len, 196624);
	ck_assert_uint_eq(qcow2_be64(img + 0x10000), 0x20000);       /* reftable[0] */
	ck_assert_uint_eq(qcow2_be16(img + 0x20000), 1);             /* clusters 0-3 */
	ck_assert_uint_eq(qcow2_be16(img + 0x20006), 1);
	ck_assert_uint_eq(qcow2_be16(img + 0x20008), 0);
	ck_assert_uint_eq(qcow2_be64(img + 40), 0x30000);             /* L1 offset */
	ck_assert_uint_eq(qcow2_be32(img + 36), 2);                   /* l1_size */
	ck_assert_uint_eq(qcow2_be32(img + 100), 112);                /* header_length */
	free(img);

	/* 1-bit refcounts pack LSB first: clusters 0-3 -> 0x0f. */
	o.refcount_order = 0;
	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), 0);
	ck_assert_uint_eq(img[0x20000], 0x0f);
	ck_assert_uint_eq(img[0x20001], 0);
	free(img);
}
END_TEST

struct opt_case {
	struct qcow2_create_opts o;
	const char *msg;
};

static const struct opt_case opt_cases[] = {
	{ { .size = 1 << 20, .version = 2, .refcount_order = 4, .lazy_refcounts = true },
	  "Lazy refcounts only supported with compatibility level 1.1 and above" },
	{ { .size = 1 << 20, .version = 2, .refcount_order = 3 },
	  "Different refcount widths than 16 bits require compatibility level 1.1" },
	{ { .size = 1 << 20, .refcount_order = 7 },
	  "Refcount width must be a power of two and may not exceed 64 bits" },
	{ { .size = 1 << 20, .cluster_bits = 8, .refcount_order = 4 },
	  "Cluster size must be a power of two between 512 and 2048k" },
	{ { .size = 1 << 20, .cluster_bits = 22, .refcount_order = 4 },
	  "Cluster size must be a power of two between 512 and 2048k" },
	{ { .size = 1 << 20, .version = 4, .refcount_order = 4 },
	  "Invalid compatibility level" },
	{ { .size = 16ull << 40, .cluster_bits = 9, .refcount_order = 4 },
	  "The image size is too large for file format 'qcow2'" },
	{ { .size = (1ull << 58) + 512, .cluster_bits = 21, .refcount_order = 4 },
	  "The image size is too large for file format 'qcow2'" },
	{ { .size = 1 << 20, .refcount_order = 4, .backing_format = "raw" },
	  "Backing format cannot be used without backing file" },
	{ { .size = 1 << 20, .refcount_order = 4, .backing_file = "b.img" },
	  "Backing file specified without backing format" },
	{ { .size = 1 << 20, .refcount_order = 4, .backing_file = "b.img",
	    .backing_format = "r\001w" },
	  "Invalid backing format" },
};

START_TEST(create_bad_options)
{
	const struct opt_case *c = &opt_cases[_i];
	uint8_t *img = (uint8_t *)1;
	size_t len = 1;
	char err[256] = "";

	ck_assert_int_eq(qcow2_create_image(&c->o, &img, &len, err, sizeof(err)), -EINVAL);
	ck_assert_msg(strstr(err, c->msg), "message '%s' lacks '%s'", err, c->msg);
	ck_assert_ptr_null(img);
	ck_assert_uint_eq(len, 0);
}
END_TEST

START_TEST(create_backing_name_too_long_for_cluster)
{
	char name[600];
	struct qcow2_create_opts o = { .size = 1 << 20, .cluster_bits = 9, .refcount_order = 4,
				       .backing_file = name, .backing_format = "raw" };
	uint8_t *img;
	size_t len;
	char err[256] = "";

	memset(name, 'a', sizeof(name) - 1);
	name[sizeof(name) - 1] = '\0';
	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "backing file"));
}
END_TEST

/* --- validation: one broken field at a time ------------------------------------ */

/* A valid v3 image (1 GiB, 64 KiB clusters) with a backing file, as qemu-img
 * makes it; tests patch one field. */
static uint8_t *base_image(size_t *len, bool backing)
{
	struct qcow2_create_opts o = { .size = 1ull << 30, .refcount_order = 4,
				       .backing_file = backing ? "base.raw" : NULL,
				       .backing_format = backing ? "raw" : NULL };
	uint8_t *img;
	char err[256];

	ck_assert_int_eq(qcow2_create_image(&o, &img, len, err, sizeof(err)), 0);
	return img;
}

static void expect_fail(const uint8_t *img, size_t len, uint64_t file_size, int errnum,
			const char *needle)
{
	struct qcow2_header h;
	char err[512] = "";
	int ret;

	ret = qcow2_header_parse(img, len, file_size, &h, err, sizeof(err));
	ck_assert_msg(ret == errnum, "expected %d (%s), got %d: '%s'", errnum, needle, ret, err);
	ck_assert_msg(strstr(err, needle), "message '%s' lacks '%s'", err, needle);
	/* A failed parse leaves nothing to release. */
	ck_assert_ptr_null(h.unknown_exts);
	ck_assert_ptr_null(h.feature_names);
}

static void expect_ok(const uint8_t *img, size_t len, uint64_t file_size)
{
	struct qcow2_header h;
	char err[512] = "";
	int ret = qcow2_header_parse(img, len, file_size, &h, err, sizeof(err));

	ck_assert_msg(ret == 0, "parse failed: %s", err);
	qcow2_header_release(&h);
}

#define CS 65536u

/* Append an extension (with its own end marker) at offset `at` of cluster 0. */
static size_t put_ext(uint8_t *img, size_t at, uint32_t type, const void *data, uint32_t len)
{
	qcow2_put_be32(img + at, type);
	qcow2_put_be32(img + at + 4, len);
	memcpy(img + at + 8, data, len);
	memset(img + at + 8 + len, 0, QSM_ALIGN_UP(len, 8) - len);
	at += 8 + QSM_ALIGN_UP(len, 8);
	memset(img + at, 0, 8);
	return at;
}

START_TEST(valid_base_parses)
{
	size_t len;
	uint8_t *img = base_image(&len, true);

	expect_ok(img, len, len);
	expect_ok(img, CS, len);
	free(img);
	img = base_image(&len, false);
	expect_ok(img, len, len);
	free(img);
}
END_TEST

START_TEST(bad_magic)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	img[0] = 'X';
	expect_fail(img, len, len, -EINVAL, "Image is not in qcow2 format");
	ck_assert_uint_eq(qcow2_header_probe_len(img, len, len), 0);
	free(img);
}
END_TEST

START_TEST(bad_version)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 4, 4);
	expect_fail(img, len, len, -ENOTSUP, "Unsupported qcow2 version 4");
	qcow2_put_be32(img + 4, 1);
	expect_fail(img, len, len, -EINVAL, "Unsupported qcow2 version 1");
	ck_assert_uint_eq(qcow2_header_probe_len(img, len, len), 0);
	free(img);
}
END_TEST

START_TEST(bad_cluster_bits)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 20, 8);
	expect_fail(img, len, len, -EINVAL, "Unsupported cluster size: 2^8");
	qcow2_put_be32(img + 20, 22);
	expect_fail(img, len, len, -EINVAL, "Unsupported cluster size: 2^22");
	ck_assert_uint_eq(qcow2_header_probe_len(img, len, len), 0);
	free(img);
}
END_TEST

START_TEST(bad_header_length)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 100, 100);
	expect_fail(img, len, len, -EINVAL, "qcow2 header too short");
	qcow2_put_be32(img + 100, 116);
	expect_fail(img, len, len, -EINVAL, "header_length 116");
	qcow2_put_be32(img + 100, CS + 8);
	expect_fail(img, len, len, -EINVAL, "qcow2 header exceeds cluster size");
	/* The buffer must hold the header. */
	qcow2_put_be32(img + 100, 112);
	expect_fail(img, 100, len, -EINVAL, "truncated");
	free(img);
}
END_TEST

START_TEST(unknown_incompatible_bit_named)
{
	size_t len, at;
	uint8_t *img = base_image(&len, false);
	uint8_t entry[48] = { 0, 5 };

	/* Add a second feature table naming bit 5 (replace qemu's table). */
	memcpy(entry + 2, "foo", 3);
	at = put_ext(img, 112, QCOW2_EXT_FEATURE_TABLE, entry, sizeof(entry));
	(void)at;
	qcow2_put_be64(img + 72, 1ull << 5);
	expect_fail(img, len, len, -ENOTSUP,
		    "Unsupported qcow2 feature(s): foo");
	/* Without a name in the table: the bit number. */
	qcow2_put_be64(img + 72, 1ull << 9);
	expect_fail(img, len, len, -ENOTSUP,
		    "Unsupported qcow2 feature(s): Unknown incompatible feature: 200");
	free(img);
}
END_TEST

START_TEST(known_unsupported_features)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be64(img + 72, QCOW2_INCOMPAT_DATA_FILE);
	/* No data file named in the image: QEMU's words; named: qsm's. */
	expect_fail(img, len, len, -ENOTSUP, "'data-file' is required for this image");
	{
		uint8_t *c = malloc(len);
		memcpy(c, img, len);
		/* a data file name extension at the start of the extension area */
		uint32_t at = qcow2_be32(c + 100);
		memmove(c + at + 16, c + at, CS - at - 16);
		qcow2_put_be32(c + at, QCOW2_EXT_DATA_FILE);
		qcow2_put_be32(c + at + 4, 5);
		memcpy(c + at + 8, "d.raw\0\0\0", 8);
		expect_fail(c, len, len, -ENOTSUP, "external data file 'd.raw', which qsm does not support yet");
		free(c);
	}
	/* With 16-byte L2 entries the L1 must be twice as long (QEMU's
	 * message), then qsm refuses the feature by name. */
	qcow2_put_be64(img + 72, QCOW2_INCOMPAT_EXTL2);
	expect_fail(img, len, len, -EINVAL, "L1 table is too small");
	qcow2_put_be32(img + 36, 4);
	expect_fail(img, len, len + 16, -ENOTSUP, "\"extended L2 entries\"");
	qcow2_put_be32(img + 36, 2);
	/* zstd (bit 3 with compression_type 1) is supported. */
	qcow2_put_be64(img + 72, QCOW2_INCOMPAT_COMPRESSION);
	img[104] = 1;
	expect_ok(img, len, len);
	/* Dirty and corrupt are the opener's business, not refusals. */
	qcow2_put_be64(img + 72, QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
	img[104] = 0;
	expect_ok(img, len, len);
	free(img);
}
END_TEST

START_TEST(compression_mismatch)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	img[104] = 1; /* zstd without the bit */
	expect_fail(img, len, len, -EINVAL, "qcow2: Compression type incompatible feature bit must be set");
	img[104] = 0;
	qcow2_put_be64(img + 72, QCOW2_INCOMPAT_COMPRESSION);
	expect_fail(img, len, len, -EINVAL,
		    "qcow2: Compression type incompatible feature bit must not be set");
	img[104] = 7;
	expect_fail(img, len, len, -ENOTSUP, "qcow2: unknown compression type: 7");
	free(img);
}
END_TEST

START_TEST(extl2_small_clusters)
{
	struct qcow2_create_opts o = { .size = 1 << 30, .cluster_bits = 12, .refcount_order = 4 };
	uint8_t *img;
	size_t len;
	char err[128];

	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), 0);
	qcow2_put_be64(img + 72, QCOW2_INCOMPAT_EXTL2);
	expect_fail(img, len, len, -EINVAL, "Unsupported subcluster size: 128");
	free(img);
}
END_TEST

START_TEST(encryption)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 32, 1);
	expect_fail(img, len, len, -ENOTSUP, "encryption");
	qcow2_put_be32(img + 32, 2); /* LUKS needs its crypto header extension */
	expect_fail(img, len, len, -EINVAL, "Missing CRYPTO header for crypt method 2");
	qcow2_put_be32(img + 32, 3);
	expect_fail(img, len, len, -EINVAL, "Missing CRYPTO header for crypt method 3");
	free(img);
}
END_TEST

START_TEST(bad_refcount_order)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 96, 7);
	expect_fail(img, len, len, -EINVAL, "Reference count entry width too large; may not exceed 64 bits");
	free(img);
}
END_TEST

START_TEST(bad_refcount_table)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 56, 0);
	expect_fail(img, len, len, -EINVAL, "Image does not contain a reference count table");
	qcow2_put_be32(img + 56, (8u << 20) / CS + 1);
	expect_fail(img, len, len, -EINVAL, "Reference count table too large");
	qcow2_put_be32(img + 56, 1);
	qcow2_put_be64(img + 48, 0x12345);
	expect_fail(img, len, len, -EINVAL, "Reference count table offset invalid");
	/* Over the header or past the end of the file: QEMU opens the image
	 * (the refcount module treats every block as damaged). */
	struct qcow2_header h;
	char err[256] = "";
	qcow2_put_be64(img + 48, 0);
	ck_assert_msg(qcow2_header_parse(img, len, len, &h, err, sizeof(err)) == 0, "%s", err);
	qcow2_header_release(&h);
	qcow2_put_be64(img + 48, 0x40000);
	ck_assert_msg(qcow2_header_parse(img, len, len, &h, err, sizeof(err)) == 0, "%s", err);
	qcow2_header_release(&h);
	qcow2_put_be64(img + 48, 0x7fffffffffff0000ull);
	expect_fail(img, len, len, -EINVAL, "Reference count table offset invalid");
	free(img);
}
END_TEST

START_TEST(bad_l1)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 36, 1); /* 1 GiB needs 2 entries */
	expect_fail(img, len, len, -EINVAL, "L1 table is too small");
	qcow2_put_be32(img + 36, (32u << 20) / 8 + 1);
	expect_fail(img, len, len, -EINVAL, "Active L1 table too large");
	qcow2_put_be32(img + 36, 2);
	qcow2_put_be64(img + 40, 0x30200);
	expect_fail(img, len, len, -EINVAL, "Active L1 table offset invalid");
	qcow2_put_be64(img + 40, 0);
	expect_fail(img, len, len, -EINVAL, "l1_table_offset is 0");
	qcow2_put_be64(img + 40, 0x40000);
	expect_fail(img, len, len, -EINVAL, "l1_table_offset 0x40000 + 16 bytes is past the end");
	qcow2_put_be64(img + 40, 0x7fffffffffff0000ull);
	qcow2_put_be32(img + 36, 0x100000);
	expect_fail(img, len, len, -EINVAL, "Active L1 table offset invalid");
	/* The L1 may end exactly at EOF (fresh images do), not one byte later. */
	qcow2_put_be64(img + 40, 0x30000);
	qcow2_put_be32(img + 36, 2);
	expect_ok(img, len, len);
	expect_fail(img, len, len - 1, -EINVAL, "l1_table_offset 0x30000 + 16 bytes is past");
	free(img);
}
END_TEST

START_TEST(bad_virtual_size)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	/* QEMU's checks come first: the L1 cannot cover these */
	qcow2_put_be64(img + 24, (1ull << 58) + 512);
	expect_fail(img, len, len, -EINVAL, "L1 table is too small");
	qcow2_put_be64(img + 24, 1ull << 63);
	expect_fail(img, len, len, -EINVAL, "Image is too big");
	qcow2_put_be64(img + 24, (1ull << 30) + 1); /* one more L2's worth needed */
	expect_fail(img, len, len, -EINVAL, "L1 table is too small");
	free(img);
}
END_TEST

START_TEST(bad_snapshots)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	qcow2_put_be32(img + 60, 65537);
	qcow2_put_be64(img + 64, 0x10000);
	expect_fail(img, len, len, -EINVAL, "Snapshot table too large");
	qcow2_put_be32(img + 60, 1);
	qcow2_put_be64(img + 64, 0x10200);
	expect_fail(img, len, len, -EINVAL, "Snapshot table offset invalid");
	qcow2_put_be64(img + 64, 0);
	expect_fail(img, len, len, -EINVAL, "snapshots_offset is 0");
	/* Past the end of the file: QEMU opens it (the overlap set guards it) */
	qcow2_put_be64(img + 64, 0x40000);
	expect_ok(img, len, len);
	qcow2_put_be32(img + 60, 65536);
	qcow2_put_be64(img + 64, 0x7fffffffffff0000ull); /* + 65536 * 40 overflows */
	expect_fail(img, len, len, -EINVAL, "Snapshot table offset invalid");
	qcow2_put_be32(img + 60, 1);
	/* No snapshots: offset 0 is what qemu writes. */
	qcow2_put_be32(img + 60, 0);
	qcow2_put_be64(img + 64, 0);
	expect_ok(img, len, len);
	free(img);
}
END_TEST

START_TEST(bad_backing_file)
{
	size_t len;
	uint8_t *img = base_image(&len, true);
	uint64_t off = qcow2_be64(img + 8);

	ck_assert_uint_ne(off, 0);
	qcow2_put_be64(img + 8, CS + 8);
	expect_fail(img, len, len, -EINVAL, "Invalid backing file offset");
	qcow2_put_be64(img + 8, 40);
	expect_fail(img, len, len, -EINVAL, "backing_file_offset 40");
	qcow2_put_be64(img + 8, off);
	qcow2_put_be32(img + 16, 1024);
	expect_fail(img, len, len, -EINVAL, "Backing file name too long");
	qcow2_put_be64(img + 8, CS - 4);
	qcow2_put_be32(img + 16, 8);
	expect_fail(img, len, len, -EINVAL, "Backing file name too long");
	qcow2_put_be64(img + 8, off);
	qcow2_put_be32(img + 16, 8);
	img[off + 3] = 0;
	expect_fail(img, len, len, -EINVAL, "NUL");
	free(img);
}
END_TEST

START_TEST(bad_extensions)
{
	size_t len, at;
	uint8_t *img = base_image(&len, true);
	uint64_t boff = qcow2_be64(img + 8);
	uint8_t fmt[8] = "raw";

	/* Length running past the end of the extension area (the backing name). */
	qcow2_put_be32(img + 112 + 4, (uint32_t)boff);
	expect_fail(img, len, len, -EINVAL, "Header extension too large");
	free(img);

	/* Duplicate extensions: QEMU keeps the last, so does qsm. */
	img = base_image(&len, false);
	at = put_ext(img, 112, QCOW2_EXT_BACKING_FORMAT, fmt, 3);
	at = put_ext(img, at, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
	{
		static const uint8_t b1[24] = { 0, 0, 0, 1 }, b2[24] = { 0, 0, 0, 2 };
		struct qcow2_header h;
		char e[256];
		unsigned nbm = 0;

		at = put_ext(img, at, QCOW2_EXT_BITMAPS, b1, 24);
		at = put_ext(img, at, QCOW2_EXT_BITMAPS, b2, 24);
		ck_assert_int_eq(qcow2_header_parse(img, len, len, &h, e, sizeof(e)), 0);
		ck_assert_str_eq(h.backing_format, "qcow2");
		for (unsigned i = 0; i < h.nb_unknown_exts; i++)
			if (h.unknown_exts[i].type == QCOW2_EXT_BITMAPS) {
				nbm++;
				ck_assert_uint_eq(h.unknown_exts[i].data[3], 2);
			}
		ck_assert_uint_eq(nbm, 1);
		qcow2_header_release(&h);
	}
	free(img);

	/* Unprintable backing format. */
	img = base_image(&len, false);
	fmt[1] = 1;
	put_ext(img, 112, QCOW2_EXT_BACKING_FORMAT, fmt, 3);
	expect_fail(img, len, len, -EINVAL, "backing format");
	free(img);

	/* Feature table length not a multiple of 48. */
	img = base_image(&len, false);
	qcow2_put_be32(img + 112 + 4, 383); /* QEMU opens it: 7 whole entries */
	expect_ok(img, len, len);
	free(img);

	/* Fixed-size extensions. */
	img = base_image(&len, false);
	put_ext(img, 112, QCOW2_EXT_BITMAPS, fmt, 8);
	expect_fail(img, len, len, -EINVAL, "bitmaps_ext: Invalid extension length");
	put_ext(img, 112, QCOW2_EXT_CRYPTO, fmt, 8);
	expect_fail(img, len, len, -EINVAL, "CRYPTO header extension only expected with LUKS encryption method");
	free(img);

	/* An extension header cut by the end of the area (the backing name). */
	img = base_image(&len, true);
	qcow2_put_be64(img + 8, 116);
	qcow2_put_be32(img + 16, 4);
	memcpy(img + 116, "abcd", 4);
	expect_fail(img, len, len, -EINVAL, "Header extension too large");
	free(img);
}
END_TEST

START_TEST(short_file)
{
	size_t len;
	uint8_t *img = base_image(&len, false);

	/* The caller passes what the file has; tables then fall outside it. */
	expect_fail(img, 4096, 4096, -EINVAL, "l1_table_offset");
	expect_fail(img, 40, 40, -EINVAL, "truncated");
	expect_fail(img, 4, 4, -EINVAL, "too short");
	ck_assert_uint_eq(qcow2_header_probe_len(img, 23, len), 0);
	ck_assert_uint_eq(qcow2_header_probe_len(img, 24, len), CS);
	ck_assert_uint_eq(qcow2_header_probe_len(img, 24, 4096), 4096);
	free(img);
}
END_TEST

/* --- extensions, names, copy ----------------------------------------------------- */

START_TEST(unknown_extensions_round_trip)
{
	size_t len, at;
	uint8_t *img = base_image(&len, true);
	uint8_t *out = calloc(1, CS);
	struct qcow2_header h, c;
	char err[256];
	static const uint8_t d1[5] = { 1, 2, 3, 4, 5 };
	static const uint8_t d2[16] = { 9 };
	static const uint8_t df[4] = { 'd', 'a', 't', 'a' };

	/* Rebuild cluster 0 by hand: fmt, unknown A, data-file, unknown B, end. */
	ck_assert_int_eq(qcow2_header_parse(img, len, len, &h, err, sizeof(err)), 0);
	memset(img + 112, 0, CS - 112);
	at = put_ext(img, 112, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
	at = put_ext(img, at, 0x12345678, d1, sizeof(d1));
	at = put_ext(img, at, QCOW2_EXT_DATA_FILE, df, sizeof(df));
	at = put_ext(img, at, 0x9abcdef0, d2, sizeof(d2));
	memcpy(img + at + 8, "base.raw", 8);
	qcow2_put_be64(img + 8, at + 8);
	qcow2_header_release(&h);

	ck_assert_int_eq(qcow2_header_parse(img, len, len, &h, err, sizeof(err)), 0);
	ck_assert(!h.has_feature_table);
	ck_assert_uint_eq(h.nb_unknown_exts, 3);
	ck_assert_uint_eq(h.unknown_exts[0].type, 0x12345678);
	ck_assert_uint_eq(h.unknown_exts[0].len, 5);
	ck_assert_mem_eq(h.unknown_exts[0].data, d1, 5);
	ck_assert_uint_eq(h.unknown_exts[1].type, QCOW2_EXT_DATA_FILE);
	ck_assert_uint_eq(h.unknown_exts[2].type, 0x9abcdef0);
	ck_assert_str_eq(h.backing_file, "base.raw");

	/* Deep copy survives the original's release. */
	ck_assert_int_eq(qcow2_header_copy(&c, &h), 0);
	qcow2_header_release(&h);
	ck_assert_uint_eq(c.nb_unknown_exts, 3);
	ck_assert_mem_eq(c.unknown_exts[2].data, d2, 16);

	/* qemu's order: backing fmt, data file, feature table, then the others. */
	ck_assert_int_eq(qcow2_header_serialize(&c, out, CS), 0);
	ck_assert_uint_eq(qcow2_be32(out + 112), QCOW2_EXT_BACKING_FORMAT);
	ck_assert_uint_eq(qcow2_be32(out + 128), QCOW2_EXT_DATA_FILE);
	ck_assert_uint_eq(qcow2_be32(out + 144), QCOW2_EXT_FEATURE_TABLE);
	ck_assert_uint_eq(qcow2_be32(out + 144 + 8 + 384), 0x12345678);
	ck_assert_uint_eq(qcow2_be32(out + 144 + 8 + 384 + 16), 0x9abcdef0);
	ck_assert_uint_eq(qcow2_be32(out + 144 + 8 + 384 + 40), 0);
	ck_assert_uint_eq(c.backing_file_offset, 144 + 8 + 384 + 48);
	ck_assert_mem_eq(out + c.backing_file_offset, "base.raw", 8);

	/* And it parses back to the same extensions. */
	ck_assert_int_eq(qcow2_header_parse(out, CS, len, &h, err, sizeof(err)), 0);
	ck_assert_uint_eq(h.nb_unknown_exts, 3);
	ck_assert(h.has_feature_table);
	ck_assert_uint_eq(h.nb_feature_names, 8);
	qcow2_header_release(&h);
	qcow2_header_release(&c);
	free(out);
	free(img);
}
END_TEST

START_TEST(serialize_enospc)
{
	struct qcow2_header h;
	uint8_t buf[512];

	memset(&h, 0, sizeof(h));
	h.version = 3;
	h.cluster_bits = 9;
	h.refcount_order = 4;
	memset(h.backing_file, 'x', 400);
	snprintf(h.backing_format, sizeof(h.backing_format), "raw");
	ck_assert_int_eq(qcow2_header_serialize(&h, buf, sizeof(buf)), -ENOSPC);
	h.backing_file[300] = '\0';
	ck_assert_int_eq(qcow2_header_serialize(&h, buf, sizeof(buf)), 0);
	ck_assert_uint_eq(h.backing_file_offset, 112 + 16 + 8);
	ck_assert_uint_eq(h.backing_file_size, 300);
	/* v2 cannot carry v3 features. */
	h.version = 2;
	h.compatible_features = QCOW2_COMPAT_LAZY_REFCOUNTS;
	ck_assert_int_eq(qcow2_header_serialize(&h, buf, sizeof(buf)), -EINVAL);
}
END_TEST

START_TEST(feature_names)
{
	struct qcow2_header h;
	struct qcow2_feature_name f = { 0, 2, "my data file" };

	memset(&h, 0, sizeof(h));
	ck_assert_str_eq(qcow2_feature_name(&h, 0, 0), "dirty bit");
	ck_assert_str_eq(qcow2_feature_name(&h, 0, 4), "extended L2 entries");
	ck_assert_str_eq(qcow2_feature_name(&h, 1, 0), "lazy refcounts");
	ck_assert_str_eq(qcow2_feature_name(&h, 2, 1), "raw external data");
	ck_assert_ptr_null(qcow2_feature_name(&h, 0, 5));
	ck_assert_ptr_null(qcow2_feature_name(NULL, 0, 40));
	h.feature_names = &f;
	h.nb_feature_names = 1;
	ck_assert_str_eq(qcow2_feature_name(&h, 0, 2), "my data file");
}
END_TEST

START_TEST(feature_table_matches_qemu)
{
	size_t len;
	uint8_t *img = base_image(&len, false);
	/* From `qemu-img create` 7.2 (its feature-name table extension). */
	static const char *names[] = { "dirty bit", "corrupt bit", "external data file",
				       "compression type", "extended L2 entries",
				       "lazy refcounts", "bitmaps", "raw external data" };
	static const uint8_t tb[][2] = { { 0, 0 }, { 0, 1 }, { 0, 2 }, { 0, 3 }, { 0, 4 },
					 { 1, 0 }, { 2, 0 }, { 2, 1 } };

	ck_assert_uint_eq(qcow2_be32(img + 112), QCOW2_EXT_FEATURE_TABLE);
	ck_assert_uint_eq(qcow2_be32(img + 116), 384);
	for (int i = 0; i < 8; i++) {
		const uint8_t *e = img + 120 + 48 * i;

		ck_assert_uint_eq(e[0], tb[i][0]);
		ck_assert_uint_eq(e[1], tb[i][1]);
		ck_assert_str_eq((const char *)e + 2, names[i]);
	}
	ck_assert_uint_eq(qcow2_be64(img + 120 + 384), 0); /* end marker */
	free(img);
}
END_TEST

START_TEST(l1_entries)
{
	ck_assert_uint_eq(qcow2_l1_entries_for(0, 16), 0);
	ck_assert_uint_eq(qcow2_l1_entries_for(1, 16), 1);
	ck_assert_uint_eq(qcow2_l1_entries_for(1ull << 29, 16), 1);
	ck_assert_uint_eq(qcow2_l1_entries_for((1ull << 29) + 1, 16), 2);
	ck_assert_uint_eq(qcow2_l1_entries_for(1ull << 30, 9), 32768);
	ck_assert_uint_eq(qcow2_l1_entries_for(UINT64_MAX, 9), 1ull << 49);
	ck_assert_uint_eq(qcow2_l1_entries_for(1ull << 58, 21), 1ull << 19);
}
END_TEST

START_TEST(v2_parse)
{
	struct qcow2_create_opts o = { .size = 1ull << 30, .version = 2, .refcount_order = 4,
				       .backing_file = "b.qcow2", .backing_format = "qcow2" };
	struct qcow2_header h;
	uint8_t *img, *out;
	size_t len;
	char err[256];

	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), 0);
	ck_assert_uint_eq(qcow2_be64(img + 8), 0x60); /* as qemu-img: fmt ext at 72 */
	ck_assert_int_eq(qcow2_header_parse(img, len, len, &h, err, sizeof(err)), 0);
	ck_assert_uint_eq(h.version, 2);
	ck_assert_uint_eq(h.header_length, 72);
	ck_assert_uint_eq(h.refcount_order, 4);
	ck_assert_str_eq(h.backing_format, "qcow2");
	ck_assert_str_eq(h.backing_file, "b.qcow2");
	out = calloc(1, CS);
	ck_assert_int_eq(qcow2_header_serialize(&h, out, CS), 0);
	ck_assert_mem_eq(out, img, CS);
	/* v2 ignores bytes 72.. as features: a bogus "incompatible" there is an
	 * extension header, not a feature. */
	qcow2_header_release(&h);
	free(out);
	free(img);
}
END_TEST

/* Random byte mutations of cluster 0 (seeded, printed): the parser must
 * never crash or leak, and whatever it accepts must serialize. */
START_TEST(mutations_never_crash)
{
	const uint64_t seed = 0x5eed0001;
	struct qsm_rng rng;
	size_t len;
	uint8_t *base = base_image(&len, true);
	uint8_t *img = malloc(len), *out = malloc(CS);
	int accepted = 0;

	qsm_rng_seed(&rng, seed);
	for (int iter = 0; iter < 20000; iter++) {
		struct qcow2_header h;
		char err[256];
		int n = 1 + (int)qsm_rng_below(&rng, 4);

		memcpy(img, base, len);
		for (int k = 0; k < n; k++) {
			/* Mostly the fixed header and the first extensions. */
			size_t at = qsm_rng_below(&rng, 4) ? qsm_rng_below(&rng, 160)
							   : qsm_rng_below(&rng, 1024);
			img[at] = (uint8_t)qsm_rng_next(&rng);
		}
		if (qcow2_header_parse(img, CS, len, &h, err, sizeof(err)) == 0) {
			int ret;

			accepted++;
			ret = qcow2_header_serialize(&h, out, CS);
			ck_assert_msg(ret == 0 || ret == -ENOSPC || ret == -EINVAL,
				      "seed %#" PRIx64 " iter %d: serialize %d", seed, iter, ret);
			qcow2_header_release(&h);
		} else {
			ck_assert_msg(err[0], "seed %#" PRIx64 " iter %d: no message", seed, iter);
		}
	}
	ck_assert_int_gt(accepted, 0);
	free(img);
	free(out);
	free(base);
}
END_TEST

static Suite *header_suite(void)
{
	Suite *s = suite_create("header");
	TCase *tc;

	tc = tcase_create("create_qemu");
	QSM_TCASE_REQUIRES(tc, "qemu-img");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 600);
	tcase_add_test(tc, create_matrix);
	tcase_add_loop_test(tc, create_sizes, 0, (int)QSM_ARRAY_SIZE(size_cases));
	suite_add_tcase(s, tc);

	tc = tcase_create("create");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 600);
	tcase_add_test(tc, create_refcount_layout);
	tcase_add_loop_test(tc, create_bad_options, 0, (int)QSM_ARRAY_SIZE(opt_cases));
	tcase_add_test(tc, create_backing_name_too_long_for_cluster);
	suite_add_tcase(s, tc);

	tc = tcase_create("validate");
	tcase_add_test(tc, valid_base_parses);
	tcase_add_test(tc, bad_magic);
	tcase_add_test(tc, bad_version);
	tcase_add_test(tc, bad_cluster_bits);
	tcase_add_test(tc, bad_header_length);
	tcase_add_test(tc, unknown_incompatible_bit_named);
	tcase_add_test(tc, known_unsupported_features);
	tcase_add_test(tc, compression_mismatch);
	tcase_add_test(tc, extl2_small_clusters);
	tcase_add_test(tc, encryption);
	tcase_add_test(tc, bad_refcount_order);
	tcase_add_test(tc, bad_refcount_table);
	tcase_add_test(tc, bad_l1);
	tcase_add_test(tc, bad_virtual_size);
	tcase_add_test(tc, bad_snapshots);
	tcase_add_test(tc, bad_backing_file);
	tcase_add_test(tc, bad_extensions);
	tcase_add_test(tc, short_file);
	tcase_add_test(tc, mutations_never_crash);
	suite_add_tcase(s, tc);

	tc = tcase_create("format");
	tcase_add_test(tc, unknown_extensions_round_trip);
	tcase_add_test(tc, serialize_enospc);
	tcase_add_test(tc, feature_names);
	tcase_add_test(tc, feature_table_matches_qemu);
	tcase_add_test(tc, l1_entries);
	tcase_add_test(tc, v2_parse);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return qsm_test_run(header_suite());
}
