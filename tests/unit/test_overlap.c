/*
 * tests/unit/test_overlap.c: Check suite "overlap" for metadata/overlap.c,
 * the set of host clusters holding metadata.
 *
 * An image as qemu-img lays it out (qcow2_create_image: header, refcount
 * table, refcount block, L1 in clusters 0-3) is loaded onto a simulated
 * disk and its refcounts read; then
 *   - layout: exactly clusters 0-3 are metadata, any offset inside them
 *     counts, and the L1 range follows qsm_overlap_set_l1 (size and move);
 *   - L2 tables: thousands of random tables against a plain model (the set
 *     rehashes as it grows), repeated adds, the "not L2" query;
 *   - refcount structure: a refcount block the allocator creates later is
 *     metadata at once (the set asks refcount.c, it keeps no copy);
 *   - release: an empty set again.
 */
#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"
#include "io/sim.h"
#include "io/util.h"
#include "metadata/overlap.h"
#include "metadata/qcow2.h"
#include "metadata/refcount.h"

#define CB 16
#define CS (1ull << CB)

struct fixture {
	struct event_base *base;
	struct qsm_sim *sim;
	struct qsm_io *io;
	struct qsm_refcounts *rc;
	uint64_t l1_offset, l1_size;
};

static void fixture_open(struct fixture *f)
{
	struct qcow2_create_opts co = { .size = 1ull << 30, .cluster_bits = CB, .refcount_order = 4 };
	struct qcow2_header h;
	uint8_t *img;
	size_t len;
	char err[256];

	memset(f, 0, sizeof(*f));
	ck_assert_int_eq(qcow2_create_image(&co, &img, &len, err, sizeof(err)), 0);
	ck_assert_int_eq(qcow2_header_parse(img, len, len, &h, err, sizeof(err)), 0);
	f->l1_offset = h.l1_table_offset;
	f->l1_size = h.l1_size;
	ck_assert_uint_eq(h.refcount_table_offset, CS);
	ck_assert_uint_eq(f->l1_offset, 3 * CS);
	ck_assert(f->base = event_base_new());
	ck_assert(f->sim = qsm_sim_new(1));
	ck_assert_int_eq(qsm_sim_load_buf(f->sim, img, len), 0);
	ck_assert_int_eq(qsm_io_open_sim(f->base, f->sim, 0, &f->io), 0);
	struct qsm_rc_params p = {
		.cluster_bits = CB, .refcount_order = 4,
		.table_offset = h.refcount_table_offset, .table_clusters = h.refcount_table_clusters,
	};
	ck_assert_int_eq(qsm_refcount_load(f->io, &p, len, &f->rc, err, sizeof(err)), 0);
	qcow2_header_release(&h);
	free(img);
}

static void fixture_close(struct fixture *f)
{
	qsm_refcount_free(f->rc);
	qsm_io_close(f->io);
	qsm_sim_free(f->sim);
	event_base_free(f->base);
}

START_TEST(layout)
{
	struct fixture f;
	struct qsm_overlap o;
	fixture_open(&f);
	qsm_overlap_init(&o, CB, f.rc);
	qsm_overlap_set_l1(&o, f.l1_offset, f.l1_size);

	for (uint64_t c = 0; c < 64; c++) {
		bool want = c <= 3; /* header, refcount table, refcount block, L1 */
		ck_assert_msg(qsm_overlap_is_meta(&o, c * CS) == want, "cluster %llu",
			      (unsigned long long)c);
		ck_assert(qsm_overlap_is_meta(&o, c * CS + CS - 1) == want);
		ck_assert(qsm_overlap_is_meta_not_l2(&o, c * CS + 512) == want);
	}
	/* An L1 table of one entry more than a cluster holds takes two. */
	qsm_overlap_set_l1(&o, 3 * CS, CS / 8 + 1);
	ck_assert(qsm_overlap_is_meta(&o, 4 * CS));
	ck_assert(!qsm_overlap_is_meta(&o, 5 * CS));
	/* Moved: the old clusters are no longer L1 (the caller released them). */
	qsm_overlap_set_l1(&o, 10 * CS, CS / 8);
	ck_assert(!qsm_overlap_is_meta(&o, 3 * CS));
	ck_assert(qsm_overlap_is_meta(&o, 10 * CS));
	ck_assert(!qsm_overlap_is_meta(&o, 11 * CS));
	/* No L1 at all. */
	qsm_overlap_set_l1(&o, 10 * CS, 0);
	ck_assert(!qsm_overlap_is_meta(&o, 10 * CS));
	ck_assert(qsm_overlap_is_meta(&o, 0)); /* the header always */
	qsm_overlap_release(&o);
	fixture_close(&f);
}
END_TEST

START_TEST(l2_tables)
{
	struct fixture f;
	struct qsm_overlap o;
	enum { SPAN = 1 << 16, N = 6000 };
	uint8_t *model = calloc(SPAN, 1);
	uint64_t seed = 12345;
	ck_assert(model);
	fixture_open(&f);
	qsm_overlap_init(&o, CB, f.rc);
	qsm_overlap_set_l1(&o, f.l1_offset, f.l1_size);

	ck_assert_int_eq(qsm_overlap_add_l2(&o, 7 * CS), 0);
	ck_assert(qsm_overlap_is_meta(&o, 7 * CS + 123));
	ck_assert(!qsm_overlap_is_meta_not_l2(&o, 7 * CS));
	ck_assert(!qsm_overlap_is_meta(&o, 8 * CS));
	model[7] = 1;
	size_t n = 1;
	for (int i = 0; i < N; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		uint64_t c = 4 + (seed >> 33) % (SPAN - 4);
		n += !model[c];
		model[c] = 1;
		/* Any offset inside the cluster names it. */
		ck_assert_int_eq(qsm_overlap_add_l2(&o, c * CS + (seed & (CS - 1))), 0);
	}
	ck_assert_uint_eq(o.ov_l2_n, n);
	ck_assert_uint_ge(o.ov_l2_cap, 2 * n);
	for (uint64_t c = 4; c < SPAN; c++) {
		if (qsm_overlap_is_meta(&o, c * CS) != (bool)model[c])
			ck_abort_msg("cluster %llu: set says %d, model %d", (unsigned long long)c,
				     !model[c], model[c]);
		if (qsm_overlap_is_meta_not_l2(&o, c * CS))
			ck_abort_msg("cluster %llu is metadata other than L2", (unsigned long long)c);
	}
	/* Adding again changes nothing. */
	ck_assert_int_eq(qsm_overlap_add_l2(&o, 7 * CS), 0);
	ck_assert_uint_eq(o.ov_l2_n, n);

	qsm_overlap_release(&o);
	ck_assert_uint_eq(o.ov_l2_cap, 0);
	ck_assert_ptr_null(o.ov_l2);
	qsm_overlap_release(&o); /* a zeroed set releases too */
	fixture_close(&f);
	free(model);
}
END_TEST

START_TEST(refcount_structure)
{
	struct fixture f;
	struct qsm_overlap o;
	fixture_open(&f);
	qsm_overlap_init(&o, CB, f.rc);
	qsm_overlap_set_l1(&o, f.l1_offset, f.l1_size);

	uint64_t before = 0, after = 0;
	for (uint64_t c = 0; c < 64; c++)
		before += qsm_overlap_is_meta(&o, c * CS);
	/* A block of 16-bit refcounts covers 32768 clusters: raising one
	 * beyond that makes the allocator create a second block. */
	ck_assert_int_eq(qsm_refcount_update(f.rc, 40000, 1, 1, NULL), 0);
	for (uint64_t c = 0; c < 64; c++)
		after += qsm_overlap_is_meta(&o, c * CS);
	ck_assert_uint_eq(before, 4);
	ck_assert_uint_eq(after, 5);
	ck_assert(!qsm_overlap_is_meta(&o, 40000 * CS)); /* a data cluster */
	qsm_overlap_release(&o);
	fixture_close(&f);
}
END_TEST

/* The snapshot table (maybe past the end of the file), the bitmap
 * directory, and QEMU's names. */
START_TEST(kinds_and_snapshots)
{
	struct fixture f;
	struct qsm_overlap o;
	fixture_open(&f);
	qsm_overlap_init(&o, CB, f.rc);
	qsm_overlap_set_l1(&o, f.l1_offset, f.l1_size);
	ck_assert_int_eq(qsm_overlap_add_l2(&o, 7 * CS), 0);

	ck_assert_str_eq(qsm_overlap_kind(&o, 100), "qcow2_header");
	ck_assert_str_eq(qsm_overlap_kind(&o, CS + 8), "refcount table");
	ck_assert_str_eq(qsm_overlap_kind(&o, 2 * CS), "refcount block");
	ck_assert_str_eq(qsm_overlap_kind(&o, 3 * CS + 8), "active L1 table");
	ck_assert_str_eq(qsm_overlap_kind(&o, 7 * CS), "active L2 table");
	ck_assert_ptr_null(qsm_overlap_kind(&o, 20 * CS));
	ck_assert(!qsm_overlap_is_meta(&o, 20 * CS));

	/* 2000 entries of at least 40 bytes from 20 clusters on: two clusters */
	qsm_overlap_set_snapshots(&o, 20 * CS, 2000 * 40);
	ck_assert(qsm_overlap_is_meta(&o, 20 * CS));
	ck_assert(qsm_overlap_is_meta_not_l2(&o, 21 * CS + CS - 1));
	ck_assert(!qsm_overlap_is_meta(&o, 22 * CS));
	ck_assert(!qsm_overlap_is_meta(&o, 19 * CS));
	ck_assert_str_eq(qsm_overlap_kind(&o, 21 * CS), "snapshot table");
	/* none */
	qsm_overlap_set_snapshots(&o, 20 * CS, 0);
	ck_assert(!qsm_overlap_is_meta(&o, 20 * CS));

	/* A bitmap directory of one cluster and 8 bytes: two clusters. */
	qsm_overlap_set_bitmap_dir(&o, 30 * CS, CS + 8);
	ck_assert(qsm_overlap_is_meta_not_l2(&o, 31 * CS + 8));
	ck_assert(!qsm_overlap_is_meta(&o, 32 * CS));
	ck_assert(!qsm_overlap_is_meta(&o, 29 * CS));
	ck_assert_str_eq(qsm_overlap_kind(&o, 30 * CS), "bitmap directory");
	qsm_overlap_set_bitmap_dir(&o, 30 * CS, 0);
	ck_assert(!qsm_overlap_is_meta(&o, 30 * CS));
	qsm_overlap_release(&o);
	fixture_close(&f);
}
END_TEST

static Suite *overlap_suite(void)
{
	Suite *s = suite_create("overlap");
	TCase *tc = tcase_create("set");
	tcase_add_test(tc, layout);
	tcase_add_test(tc, l2_tables);
	tcase_add_test(tc, refcount_structure);
	tcase_add_test(tc, kinds_and_snapshots);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(overlap_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
