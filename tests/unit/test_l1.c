/*
 * tests/unit/test_l1.c: Check suite "l1" for metadata/l1.c, growing the L1
 * table.
 *
 *   - the new table keeps every old entry byte for byte, zeros the rest
 *     to the end of its last cluster, and says how many clusters to
 *     allocate and to release, for every cluster size and sizes around
 *     cluster boundaries;
 *   - limits: QEMU's 32 MiB maximum (the last size allowed, the first
 *     refused), and a table that would not grow.
 * The move on disk (the order of metadata/l1.h) is exercised by the resize
 * tests: tests/interop/test_resize.sh checks the grown images with qemu-img.
 */
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/l1.h"
#include "metadata/qcow2.h"

START_TEST(grow)
{
	unsigned cb = (unsigned)_i;
	uint64_t cs = 1ull << cb, per = cs / 8;
	const uint64_t sizes[][2] = {
		{ 0, 1 }, { 1, 2 }, { 1, per }, { 1, per + 1 }, { per - 1, per },
		{ per, per + 1 }, { per, 2 * per }, { per + 3, 5 * per - 1 }, { 7, 3 * per + 2 },
	};
	for (size_t k = 0; k < QSM_ARRAY_SIZE(sizes); k++) {
		uint64_t old_n = sizes[k][0], new_n = sizes[k][1];
		uint8_t *old = malloc(QSM_MAX(old_n * 8, 8));
		struct qcow2_l1_growth g;
		ck_assert(old);
		for (uint64_t i = 0; i < old_n; i++)
			qcow2_put_be64(old + i * 8, (1ull << 63) | ((i + 5) << cb));
		ck_assert_int_eq(qcow2_l1_grow(old, old_n, new_n, cb, &g), 0);
		ck_assert_uint_eq(g.entries, new_n);
		ck_assert_uint_eq(g.bytes % cs, 0);
		ck_assert_uint_ge(g.bytes, new_n * 8);
		ck_assert_uint_lt(g.bytes - new_n * 8, cs);
		ck_assert_uint_eq(g.clusters, g.bytes / cs);
		ck_assert_uint_eq(g.old_clusters, (old_n * 8 + cs - 1) / cs);
		ck_assert_uint_eq((uintptr_t)g.table % 4096, 0);
		ck_assert(memcmp(g.table, old, old_n * 8) == 0);
		for (uint64_t i = old_n * 8; i < g.bytes; i++)
			if (g.table[i])
				ck_abort_msg("cluster_bits %u, %llu -> %llu entries: byte %llu not zero",
					     cb, (unsigned long long)old_n, (unsigned long long)new_n,
					     (unsigned long long)i);
		free(g.table);
		free(old);
	}
}
END_TEST

START_TEST(limits)
{
	uint8_t old[16] = { 0 };
	struct qcow2_l1_growth g;
	uint64_t max = QCOW2_MAX_L1_BYTES / 8;

	ck_assert_int_eq(qcow2_l1_grow(old, 2, max, 16, &g), 0);
	ck_assert_uint_eq(g.bytes, QCOW2_MAX_L1_BYTES);
	ck_assert_uint_eq(g.clusters, QCOW2_MAX_L1_BYTES >> 16);
	free(g.table);
	ck_assert_int_eq(qcow2_l1_grow(old, 2, max + 1, 16, &g), -EFBIG);
	ck_assert_ptr_null(g.table);
	ck_assert_int_eq(qcow2_l1_grow(old, 2, 1ull << 62, 16, &g), -EFBIG); /* no overflow */
	ck_assert_int_eq(qcow2_l1_grow(old, 2, 2, 16, &g), -EINVAL);
	ck_assert_int_eq(qcow2_l1_grow(old, 2, 1, 16, &g), -EINVAL);
	ck_assert_ptr_null(g.table);
}
END_TEST

static Suite *l1_suite(void)
{
	Suite *s = suite_create("l1");
	TCase *tc = tcase_create("grow");
	tcase_add_loop_test(tc, grow, QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS + 1);
	tcase_add_test(tc, limits);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(l1_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
