/*
 * tests/unit/test_deflate.c: Check suite "deflate" for metadata/compress.c,
 * the compressed-cluster codecs.
 *
 * zlib (tcase "codec"):
 *   - round trip for every cluster size: compressible data deflates into
 *     less than a cluster and inflates back to the same bytes;
 *   - no gain: random data does not fit in cluster_size - 1 bytes and is
 *     reported as such (length 0, no error);
 *   - the stream is raw deflate with a 4 KiB window, as QEMU reads it:
 *     zlib's own inflate with windowBits -12 decodes what qcow2_deflate
 *     wrote, and qcow2_inflate decodes a stream zlib's deflate wrote with
 *     QEMU's parameters (qcow2_compress);
 *   - inflate is strict about the size: a stream of less than a cluster,
 *     a zlib-wrapped stream and garbage fail with -EIO; bytes after the end
 *     of the stream (the rest of its last sector) are ignored.
 * zstd (tcase "zstd"):
 *   - the same round trip and no-gain cases through qcow2_compress and
 *     qcow2_decompress with type 1;
 *   - the bytes are libzstd's default one-shot frame, the frame QEMU's
 *     ZSTD_compressStream2(ZSTD_e_end) writes: ZSTD_decompress reads it,
 *     and it is ZSTD_compress(level 3)'s output byte for byte;
 *   - a cluster stored as two frames reads back; padding after the frame
 *     is ignored;
 *   - strict: half a cluster, a frame that goes on past the cluster, a
 *     truncated frame, garbage and nothing at all fail with -EIO;
 *   - names: "zlib"/"zstd" parse and print, anything else is -EINVAL, and
 *     an unknown type is refused by both directions.
 * What the engine stores is read by qemu-img in test_compress.
 */
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "io/util.h"
#include "metadata/compress.h"

static uint64_t rng_state;

static uint64_t rnd(void)
{
	rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
	return rng_state >> 33;
}

/* Runs of repeated bytes with text-like noise: deflates about 5:1, with
 * back references far apart (up to 3 KiB, inside the 4 KiB window). */
static void fill_compressible(uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		b[i] = i >= 3000 && rnd() % 8 ? b[i - 3000] : (uint8_t)('a' + rnd() % 4);
}

START_TEST(round_trip)
{
	unsigned cb = (unsigned)_i;
	size_t cs = (size_t)1 << cb, clen;
	uint8_t *in = malloc(cs), *z = malloc(cs), *out = malloc(cs);
	ck_assert(in && z && out);
	rng_state = cb;
	fill_compressible(in, cs);
	ck_assert_int_eq(qcow2_deflate(in, cs, z, cs - 1, &clen), 0);
	ck_assert_uint_gt(clen, 0);
	ck_assert_uint_lt(clen, cs);
	memset(out, 0xaa, cs);
	ck_assert_int_eq(qcow2_inflate(z, clen, out, cs), 0);
	ck_assert(memcmp(in, out, cs) == 0);
	/* A cluster of zeros: tiny. */
	memset(in, 0, cs);
	ck_assert_int_eq(qcow2_deflate(in, cs, z, cs - 1, &clen), 0);
	ck_assert_uint_gt(clen, 0);
	ck_assert_uint_lt(clen, 64 + cs / 256);
	memset(out, 0xaa, cs);
	ck_assert_int_eq(qcow2_inflate(z, clen, out, cs), 0);
	ck_assert(memcmp(in, out, cs) == 0);
	free(in);
	free(z);
	free(out);
}
END_TEST

START_TEST(no_gain)
{
	size_t cs = 65536, clen = 12345;
	uint8_t *in = malloc(cs), *z = malloc(cs);
	ck_assert(in && z);
	rng_state = 7;
	for (size_t i = 0; i < cs; i++)
		in[i] = (uint8_t)rnd();
	ck_assert_int_eq(qcow2_deflate(in, cs, z, cs - 1, &clen), 0);
	ck_assert_uint_eq(clen, 0);
	free(in);
	free(z);
}
END_TEST

/* zlib's deflate with QEMU's qcow2_compress parameters. */
static size_t zlib_deflate(const uint8_t *in, size_t n, uint8_t *out, size_t cap, int wbits)
{
	z_stream s = { 0 };
	ck_assert_int_eq(deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, wbits, 9,
				      Z_DEFAULT_STRATEGY), Z_OK);
	s.next_in = (Bytef *)in;
	s.avail_in = (uInt)n;
	s.next_out = out;
	s.avail_out = (uInt)cap;
	ck_assert_int_eq(deflate(&s, Z_FINISH), Z_STREAM_END);
	size_t len = cap - s.avail_out;
	deflateEnd(&s);
	return len;
}

START_TEST(qemu_stream_format)
{
	size_t cs = 65536, clen;
	uint8_t *in = malloc(cs), *z = malloc(2 * cs), *out = malloc(cs);
	ck_assert(in && z && out);
	rng_state = 11;
	fill_compressible(in, cs);

	/* What qcow2_deflate writes, zlib's raw 4 KiB-window inflate reads. */
	ck_assert_int_eq(qcow2_deflate(in, cs, z, cs - 1, &clen), 0);
	z_stream s = { 0 };
	ck_assert_int_eq(inflateInit2(&s, -12), Z_OK);
	s.next_in = z;
	s.avail_in = (uInt)clen;
	s.next_out = out;
	s.avail_out = (uInt)cs;
	ck_assert_int_eq(inflate(&s, Z_FINISH), Z_STREAM_END);
	ck_assert_uint_eq(s.avail_out, 0);
	inflateEnd(&s);
	ck_assert(memcmp(in, out, cs) == 0);

	/* What zlib writes with QEMU's parameters, qcow2_inflate reads, with
	 * the rest of the last sector after it (garbage, ignored). */
	clen = zlib_deflate(in, cs, z, cs, -12);
	memset(z + clen, 0x5a, QSM_ALIGN_UP(clen, 512) + 512 - clen);
	memset(out, 0, cs);
	ck_assert_int_eq(qcow2_inflate(z, QSM_ALIGN_UP(clen, 512) + 512, out, cs), 0);
	ck_assert(memcmp(in, out, cs) == 0);

	/* A zlib-wrapped stream (header and checksum) is not qcow2's. */
	clen = zlib_deflate(in, cs, z, 2 * cs, 15);
	ck_assert_int_eq(qcow2_inflate(z, clen, out, cs), -EIO);
	free(in);
	free(z);
	free(out);
}
END_TEST

START_TEST(inflate_strict)
{
	size_t cs = 4096, clen;
	uint8_t in[4096], z[8192], out[4096];
	rng_state = 13;
	fill_compressible(in, cs);

	/* Half a cluster of data does not make a cluster. */
	clen = zlib_deflate(in, cs / 2, z, sizeof(z), -12);
	ck_assert_int_eq(qcow2_inflate(z, clen, out, cs), -EIO);
	/* A truncated stream stops short of a cluster. */
	clen = zlib_deflate(in, cs, z, sizeof(z), -12);
	ck_assert_int_eq(qcow2_inflate(z, clen / 2, out, cs), -EIO);
	/* Garbage. */
	memset(z, 0xff, sizeof(z));
	ck_assert_int_eq(qcow2_inflate(z, sizeof(z), out, cs), -EIO);
	/* Nothing at all. */
	ck_assert_int_eq(qcow2_inflate(z, 0, out, cs), -EIO);
}
END_TEST

/* --- zstd ------------------------------------------------------------------ */

START_TEST(zstd_round_trip)
{
	unsigned cb = (unsigned)_i;
	size_t cs = (size_t)1 << cb, clen;
	uint8_t *in = malloc(cs), *z = malloc(cs), *out = malloc(cs);
	ck_assert(in && z && out);
	rng_state = cb + 100;
	fill_compressible(in, cs);
	ck_assert_int_eq(qcow2_compress(QCOW2_COMPRESSION_ZSTD, in, cs, z, cs - 1, &clen), 0);
	ck_assert_uint_gt(clen, 0);
	ck_assert_uint_lt(clen, cs);
	memset(out, 0xaa, cs);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, clen, out, cs), 0);
	ck_assert(memcmp(in, out, cs) == 0);
	memset(in, 0, cs);
	ck_assert_int_eq(qcow2_compress(QCOW2_COMPRESSION_ZSTD, in, cs, z, cs - 1, &clen), 0);
	ck_assert_uint_gt(clen, 0);
	ck_assert_uint_lt(clen, 128);
	memset(out, 0xaa, cs);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, clen, out, cs), 0);
	ck_assert(memcmp(in, out, cs) == 0);
	free(in);
	free(z);
	free(out);
}
END_TEST

START_TEST(zstd_no_gain)
{
	size_t cs = 65536, clen = 12345;
	uint8_t *in = malloc(cs), *z = malloc(cs);
	ck_assert(in && z);
	rng_state = 17;
	for (size_t i = 0; i < cs; i++)
		in[i] = (uint8_t)rnd();
	ck_assert_int_eq(qcow2_compress(QCOW2_COMPRESSION_ZSTD, in, cs, z, cs - 1, &clen), 0);
	ck_assert_uint_eq(clen, 0);
	/* Room for the frame but not its last bytes is no gain either. */
	fill_compressible(in, cs);
	ck_assert_int_eq(qcow2_compress(QCOW2_COMPRESSION_ZSTD, in, cs, z, cs - 1, &clen), 0);
	size_t full = clen;
	ck_assert_uint_gt(full, 8);
	ck_assert_int_eq(qcow2_compress(QCOW2_COMPRESSION_ZSTD, in, cs, z, full - 1, &clen), 0);
	ck_assert_uint_eq(clen, 0);
	free(in);
	free(z);
}
END_TEST

START_TEST(zstd_frame_format)
{
	size_t cs = 65536, clen;
	uint8_t *in = malloc(cs), *z = malloc(2 * cs), *ref = malloc(2 * cs), *out = malloc(cs);
	ck_assert(in && z && ref && out);
	rng_state = 19;
	fill_compressible(in, cs);

	ck_assert_int_eq(qcow2_compress(QCOW2_COMPRESSION_ZSTD, in, cs, z, cs - 1, &clen), 0);
	ck_assert(z[0] == 0x28 && z[1] == 0xb5 && z[2] == 0x2f && z[3] == 0xfd); /* frame magic */
	/* libzstd reads it as one frame holding the cluster... */
	ck_assert_uint_eq(ZSTD_getFrameContentSize(z, clen), cs);
	ck_assert_uint_eq(ZSTD_findFrameCompressedSize(z, clen), clen);
	ck_assert_uint_eq(ZSTD_decompress(out, cs, z, clen), cs);
	ck_assert(memcmp(in, out, cs) == 0);
	/* ...and it is the default one-shot frame, byte for byte. */
	size_t rlen = ZSTD_compress(ref, 2 * cs, in, cs, ZSTD_CLEVEL_DEFAULT);
	ck_assert(!ZSTD_isError(rlen));
	ck_assert_uint_eq(rlen, clen);
	ck_assert(memcmp(ref, z, clen) == 0);

	/* The rest of the last sector after the frame is never read. */
	memset(z + clen, 0x5a, QSM_ALIGN_UP(clen, 512) + 512 - clen);
	memset(out, 0, cs);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, QSM_ALIGN_UP(clen, 512) + 512,
					  out, cs), 0);
	ck_assert(memcmp(in, out, cs) == 0);

	/* A cluster stored as two frames (another writer's choice) reads. */
	size_t a = ZSTD_compress(z, 2 * cs, in, cs / 4, 1);
	ck_assert(!ZSTD_isError(a));
	size_t b = ZSTD_compress(z + a, 2 * cs - a, in + cs / 4, cs - cs / 4, 1);
	ck_assert(!ZSTD_isError(b));
	memset(out, 0, cs);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, a + b, out, cs), 0);
	ck_assert(memcmp(in, out, cs) == 0);
	free(in);
	free(z);
	free(ref);
	free(out);
}
END_TEST

START_TEST(zstd_strict)
{
	size_t cs = 4096, clen;
	uint8_t in[8192], z[16384], out[4096];
	rng_state = 23;
	fill_compressible(in, sizeof(in));

	/* Half a cluster of data does not make a cluster. */
	clen = ZSTD_compress(z, sizeof(z), in, cs / 2, 3);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, clen, out, cs), -EIO);
	/* Two clusters' worth: the frame does not end with the cluster. */
	clen = ZSTD_compress(z, sizeof(z), in, 2 * cs, 3);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, clen, out, cs), -EIO);
	/* A truncated frame stops short of a cluster. */
	clen = ZSTD_compress(z, sizeof(z), in, cs, 3);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, clen / 2, out, cs), -EIO);
	/* A zlib stream is not a zstd frame, nor garbage, nor nothing. */
	ck_assert_int_eq(qcow2_deflate(in, cs, z, cs - 1, &clen), 0);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, clen, out, cs), -EIO);
	memset(z, 0xff, sizeof(z));
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, sizeof(z), out, cs), -EIO);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, z, 0, out, cs), -EIO);
}
END_TEST

START_TEST(names_and_types)
{
	enum qcow2_compression t;
	uint8_t in[512] = { 0 }, z[512];
	size_t clen = 7;
	ck_assert_str_eq(qcow2_compression_name(0), "zlib");
	ck_assert_str_eq(qcow2_compression_name(1), "zstd");
	ck_assert_ptr_null(qcow2_compression_name(2));
	ck_assert_int_eq(qcow2_compression_parse("zstd", &t), 0);
	ck_assert_int_eq(t, QCOW2_COMPRESSION_ZSTD);
	ck_assert_int_eq(qcow2_compression_parse("zlib", &t), 0);
	ck_assert_int_eq(t, QCOW2_COMPRESSION_ZLIB);
	ck_assert_int_eq(qcow2_compression_parse("lz4", &t), -EINVAL);
	ck_assert_int_eq(qcow2_compression_parse("ZSTD", &t), -EINVAL);
	ck_assert_int_eq(qcow2_compress((enum qcow2_compression)2, in, 512, z, 511, &clen), -EINVAL);
	ck_assert_uint_eq(clen, 0);
	ck_assert_int_eq(qcow2_decompress((enum qcow2_compression)2, z, 100, in, 512), -EINVAL);
}
END_TEST

static Suite *deflate_suite(void)
{
	Suite *s = suite_create("deflate");
	TCase *tc = tcase_create("codec");
	tcase_add_loop_test(tc, round_trip, 9, 22);
	tcase_add_test(tc, no_gain);
	tcase_add_test(tc, qemu_stream_format);
	tcase_add_test(tc, inflate_strict);
	suite_add_tcase(s, tc);
	tc = tcase_create("zstd");
	tcase_add_loop_test(tc, zstd_round_trip, 9, 22);
	tcase_add_test(tc, zstd_no_gain);
	tcase_add_test(tc, zstd_frame_format);
	tcase_add_test(tc, zstd_strict);
	tcase_add_test(tc, names_and_types);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(deflate_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
