/*
 * tests/unit/test_l2entry.c: Check suite "l2entry" for metadata/l2entry.h,
 * the L2 entry codec.
 *
 *   - kinds: every kind of entry from hand-written bit patterns (the table
 *     of qcow2.txt), and the builders give back the kind they promise;
 *   - descriptors: hand-computed compressed entries (bit positions worked
 *     out from qcow2.txt, not from the codec), and for every cluster size a
 *     sweep of offsets and lengths: decoding an encoded entry gives the
 *     offset back and a length reaching exactly the end of the last sector
 *     the bytes touch; the host clusters counted are exactly those sectors'.
 * The engine's use of the codec against QEMU's images is tested by
 * test_compress (qemu-img reads what qsm writes) and test_check.
 */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "io/util.h"
#include "metadata/l2entry.h"

START_TEST(kinds)
{
	static const struct {
		uint64_t e;
		enum qcow2_entry_kind k;
	} cases[] = {
		{ 0, QCOW2_EK_UNALLOC },
		{ 1, QCOW2_EK_ZERO },                                  /* zero flag only */
		{ (1ull << 63) | 1, QCOW2_EK_ZERO },                   /* COPIED does not matter */
		{ 0x50000 | 1, QCOW2_EK_ZERO_ALLOC },
		{ (1ull << 63) | 0x50000 | 1, QCOW2_EK_ZERO_ALLOC },
		{ (1ull << 63) | 0x50000, QCOW2_EK_DATA },
		{ (1ull << 63) | 0x00fffffffffffe00ull, QCOW2_EK_DATA }, /* highest offset */
		{ 0x50000, QCOW2_EK_SHARED },
		{ 1ull << 62, QCOW2_EK_COMPRESSED },
		{ (1ull << 62) | 0x1234567, QCOW2_EK_COMPRESSED },
		{ (1ull << 62) | 1, QCOW2_EK_COMPRESSED },             /* bit 0 is offset there */
		/* Reserved bits (56-61, 1-8) are the caller's to check: the
		 * kind is read from the defined bits only. */
		{ (1ull << 63) | (1ull << 56) | 0x50000, QCOW2_EK_DATA },
		{ 0x100, QCOW2_EK_UNALLOC },
	};
	for (size_t i = 0; i < QSM_ARRAY_SIZE(cases); i++)
		ck_assert_msg(qcow2_entry_kind(cases[i].e) == cases[i].k,
			      "entry %#llx: kind %d, expected %d", (unsigned long long)cases[i].e,
			      (int)qcow2_entry_kind(cases[i].e), (int)cases[i].k);

	ck_assert(qcow2_kind_reads_zero(QCOW2_EK_UNALLOC));
	ck_assert(qcow2_kind_reads_zero(QCOW2_EK_ZERO));
	ck_assert(qcow2_kind_reads_zero(QCOW2_EK_ZERO_ALLOC));
	ck_assert(!qcow2_kind_reads_zero(QCOW2_EK_DATA));
	ck_assert(!qcow2_kind_reads_zero(QCOW2_EK_SHARED));
	ck_assert(!qcow2_kind_reads_zero(QCOW2_EK_COMPRESSED));

	ck_assert_uint_eq(qcow2_entry_offset((1ull << 63) | 0x50000 | 1), 0x50000);
	ck_assert_uint_eq(qcow2_entry_offset((1ull << 63) | (1ull << 56) | 0x50000 | 0x1fe), 0x50000);
	ck_assert_uint_eq(qcow2_entry_data(0x70000), (1ull << 63) | 0x70000);
	ck_assert(qcow2_entry_kind(qcow2_entry_data(0x70000)) == QCOW2_EK_DATA);
	ck_assert_uint_eq(qcow2_entry_zero(2), 0);
	ck_assert_uint_eq(qcow2_entry_zero(3), 1);
	ck_assert(qcow2_entry_kind(qcow2_entry_zero(3)) == QCOW2_EK_ZERO);
	ck_assert(qcow2_entry_kind(qcow2_entry_zero(2)) == QCOW2_EK_UNALLOC);
}
END_TEST

/* Worked by hand from qcow2.txt: x = 62 - (cluster_bits - 8); the sector
 * count field holds the sectors touched beyond the first. */
START_TEST(descriptors_by_hand)
{
	uint64_t off, len, first, count;

	/* 64 KiB clusters: x = 54.  1000 bytes at 0x50123 (328995) touch
	 * sectors 642 to 644 (329994 / 512): count field 2. */
	ck_assert_uint_eq(qcow2_csize_shift(16), 54);
	ck_assert_uint_eq(qcow2_compressed_entry(16, 0x50123, 1000), 0x4080000000050123ull);
	qcow2_compressed_extent(16, 0x4080000000050123ull, &off, &len);
	ck_assert_uint_eq(off, 0x50123);
	ck_assert_uint_eq(len, 3 * 512 - 0x123);
	qcow2_compressed_clusters(16, 0x4080000000050123ull, &first, &count);
	ck_assert_uint_eq(first, 5);
	ck_assert_uint_eq(count, 1);

	/* 512-byte clusters: x = 61, a one-bit count.  2 bytes at 0x1ff
	 * straddle sectors 0 and 1: count 1, two host clusters. */
	ck_assert_uint_eq(qcow2_csize_shift(9), 61);
	ck_assert_uint_eq(qcow2_compressed_entry(9, 0x1ff, 2), 0x60000000000001ffull);
	qcow2_compressed_extent(9, 0x60000000000001ffull, &off, &len);
	ck_assert_uint_eq(off, 0x1ff);
	ck_assert_uint_eq(len, 2 * 512 - 0x1ff);
	qcow2_compressed_clusters(9, 0x60000000000001ffull, &first, &count);
	ck_assert_uint_eq(first, 0);
	ck_assert_uint_eq(count, 2);

	/* 2 MiB clusters: x = 49.  One sector-aligned byte: count 0. */
	ck_assert_uint_eq(qcow2_csize_shift(21), 49);
	ck_assert_uint_eq(qcow2_compressed_entry(21, 0x400000, 1), (1ull << 62) | 0x400000);
	qcow2_compressed_extent(21, (1ull << 62) | 0x400000, &off, &len);
	ck_assert_uint_eq(off, 0x400000);
	ck_assert_uint_eq(len, 512);

	/* The count field's top bit and the offset field's top bit decode
	 * apart (no overlap at the boundary x). */
	uint64_t e = (1ull << 62) | (((1ull << 8) - 1) << 54) | ((1ull << 54) - 1);
	qcow2_compressed_extent(16, e, &off, &len);
	ck_assert_uint_eq(off, (1ull << 54) - 1);
	ck_assert_uint_eq(len, 256 * 512 - 511);
	/* COPIED (bit 63) is not part of the descriptor. */
	qcow2_compressed_extent(16, e | (1ull << 63), &off, &len);
	ck_assert_uint_eq(off, (1ull << 54) - 1);
	ck_assert_uint_eq(len, 256 * 512 - 511);
}
END_TEST

/* Every cluster size: encode, decode, count clusters, for many offsets and
 * lengths up to a whole cluster (what a compressed write may store). */
START_TEST(descriptors_round_trip)
{
	unsigned cb = (unsigned)_i;
	uint64_t cs = 1ull << cb;
	uint64_t seed = 0x9e3779b97f4a7c15ull ^ cb;
	for (int n = 0; n < 20000; n++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		uint64_t host = (seed >> 11) & ((1ull << 40) - 1);
		uint64_t clen = 1 + (seed >> 3) % cs;
		if (n < 512) { /* every sector phase, short and full lengths */
			host = 7 * cs + (uint64_t)n;
			clen = n & 1 ? cs : 1 + (uint64_t)n;
		}
		uint64_t e = qcow2_compressed_entry(cb, host, clen);
		uint64_t off, len, first, count;
		uint64_t end = QSM_ALIGN_UP(host + clen, 512);
		qcow2_compressed_extent(cb, e, &off, &len);
		qcow2_compressed_clusters(cb, e, &first, &count);
		/* One check per case (ck_assert costs a pipe write per call). */
		if (qcow2_entry_kind(e) != QCOW2_EK_COMPRESSED || (e & QCOW2_OFLAG_COPIED) ||
		    off != host || off + len != end || len < clen || first != host >> cb ||
		    first + count - 1 != (end - 1) >> cb || count > 2)
			ck_abort_msg("cluster_bits %u: %llu bytes at %#llx -> entry %#llx -> %llu bytes "
				     "at %#llx, clusters %llu+%llu", cb, (unsigned long long)clen,
				     (unsigned long long)host, (unsigned long long)e,
				     (unsigned long long)len, (unsigned long long)off,
				     (unsigned long long)first, (unsigned long long)count);
	}
}
END_TEST

static Suite *l2entry_suite(void)
{
	Suite *s = suite_create("l2entry");
	TCase *tc = tcase_create("codec");
	tcase_add_test(tc, kinds);
	tcase_add_test(tc, descriptors_by_hand);
	tcase_add_loop_test(tc, descriptors_round_trip, QCOW2_MIN_CLUSTER_BITS,
			    QCOW2_MAX_CLUSTER_BITS + 1);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(l2entry_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
