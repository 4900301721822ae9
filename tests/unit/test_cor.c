/*
 * tests/unit/test_cor.c: copy-on-read (qsm_open_opts.copy_on_read, the
 * COR_WRITE state of sm/backing.c, invariant 11).
 *
 * A base image with a pattern under a top image that names it; the top is
 * opened with copy_on_read.  Checked: a read of part of a cluster leaves the
 * whole cluster allocated in the top with the base's data; zeros become zero
 * clusters; without a backing file too; a read-only open is refused; and a
 * guest write racing a copy-on-read of the same clusters is never
 * overwritten by the older data the read copied (many rounds, both orders
 * of submission, on the thread-pool backend whose completions come in any
 * order).  Files live in $QSM_TEST_DIR or /var/tmp.
 */
#include <check.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "sm/qsm.h"
#include "tests/unit/skip.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define CL (64 * KiB)

static char g_base[PATH_MAX], g_top[PATH_MAX];
static struct event_base *g_ev;

static void make_chain(bool backing)
{
	const char *d = getenv("QSM_TEST_DIR");
	char err[256];
	struct qsm_create_opts bo = { QSM_OPTS_INIT(bo), .size = 4 * MiB };
	struct qsm_create_opts to = { QSM_OPTS_INIT(to), .size = 8 * MiB };
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo) };
	struct qsm_image *b;
	uint8_t *buf = malloc(3 * CL);

	snprintf(g_base, sizeof(g_base), "%s/qsm-test-cor-base-%d.qcow2", d && *d ? d : "/var/tmp",
		 (int)getpid());
	snprintf(g_top, sizeof(g_top), "%s/qsm-test-cor-top-%d.qcow2", d && *d ? d : "/var/tmp",
		 (int)getpid());
	ck_assert_msg(qsm_create(g_base, &bo, err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(qsm_open(g_ev, g_base, &oo, &b, err, sizeof(err)) == 0, "%s", err);
	for (int i = 0; i < 3; i++)
		memset(buf + i * CL, 0x50 + i, CL);
	ck_assert_int_eq(qsm_sync_pwrite(b, buf, 3 * CL, 0), 0);   /* clusters 0-2 data */
	ck_assert_int_eq(qsm_sync_pwrite(b, buf, CL, 16 * CL), 0); /* cluster 16 */
	ck_assert_int_eq(qsm_close(b), 0);
	free(buf);
	if (backing) {
		to.backing_file = g_base;
		to.backing_format = "qcow2";
	}
	ck_assert_msg(qsm_create(g_top, &to, err, sizeof(err)) == 0, "%s", err);
}

static void setup(void)
{
	g_ev = event_base_new();
	ck_assert_ptr_nonnull(g_ev);
}

static void teardown(void)
{
	unlink(g_base);
	unlink(g_top);
	event_base_free(g_ev);
}

static struct qsm_image *open_top(bool cor, const char *aio)
{
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .copy_on_read = cor, .aio = aio };
	struct qsm_image *img;
	char err[256];
	ck_assert_msg(qsm_open(g_ev, g_top, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	return img;
}

/* Status flags of the top image alone at off (its own layer). */
static unsigned top_flags(struct qsm_image *img, uint64_t off, uint64_t *len)
{
	struct qsm_extent e;
	ck_assert_int_eq(qsm_sync_block_status(img, off, CL, &e), 0);
	if (len)
		*len = e.length;
	return e.flags;
}

START_TEST(cor_copies_whole_clusters)
{
	make_chain(true);
	struct qsm_image *img = open_top(true, NULL);
	uint8_t buf[8192];
	uint64_t len;

	/* Part of cluster 1: the whole cluster is copied, with the base's data. */
	ck_assert_int_eq(qsm_sync_pread(img, buf, 4096, CL + 8192), 0);
	for (size_t i = 0; i < 4096; i++)
		ck_assert_uint_eq(buf[i], 0x51);
	unsigned f = top_flags(img, CL, &len);
	ck_assert(f & QSM_STATUS_ALLOCATED);
	ck_assert(f & QSM_STATUS_DATA);
	ck_assert_uint_eq(len, CL);
	/* Neighbours not read stay unallocated (the chain decides). */
	ck_assert(!(top_flags(img, 0, NULL) & QSM_STATUS_ALLOCATED));
	ck_assert(!(top_flags(img, 2 * CL, NULL) & QSM_STATUS_ALLOCATED));
	/* A hole in the base (cluster 8) and past its end (cluster 100): zero clusters. */
	ck_assert_int_eq(qsm_sync_pread(img, buf, 512, 8 * CL), 0);
	ck_assert_int_eq(qsm_sync_pread(img, buf, 512, 100 * CL), 0);
	for (size_t i = 0; i < 512; i++)
		ck_assert_uint_eq(buf[i], 0);
	f = top_flags(img, 8 * CL, NULL);
	ck_assert((f & QSM_STATUS_ALLOCATED) && (f & QSM_STATUS_ZERO));
	f = top_flags(img, 100 * CL, NULL);
	ck_assert((f & QSM_STATUS_ALLOCATED) && (f & QSM_STATUS_ZERO));
	ck_assert_int_eq(qsm_close(img), 0);

	/* Reopened without copy-on-read and without the base's help: the top
	 * alone holds what was read. */
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .read_only = true, .no_backing = true };
	char err[256];
	ck_assert_msg(qsm_open(g_ev, g_top, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(qsm_sync_pread(img, buf, 8192, CL), 0);
	for (size_t i = 0; i < 8192; i++)
		ck_assert_uint_eq(buf[i], 0x51);
	ck_assert_int_eq(qsm_close(img), 0);
}
END_TEST

START_TEST(cor_without_backing)
{
	make_chain(false);
	struct qsm_image *img = open_top(true, NULL);
	uint8_t buf[512];
	ck_assert_int_eq(qsm_sync_pread(img, buf, sizeof(buf), 3 * CL), 0);
	unsigned f = top_flags(img, 3 * CL, NULL);
	ck_assert((f & QSM_STATUS_ALLOCATED) && (f & QSM_STATUS_ZERO));
	ck_assert(!(top_flags(img, 4 * CL, NULL) & QSM_STATUS_ALLOCATED));
	ck_assert_int_eq(qsm_close(img), 0);
}
END_TEST

START_TEST(cor_refused_read_only)
{
	make_chain(true);
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .read_only = true, .copy_on_read = true };
	struct qsm_image *img;
	char err[256] = "";
	ck_assert_int_eq(qsm_open(g_ev, g_top, &oo, &img, err, sizeof(err)), -EINVAL);
	ck_assert_str_eq(err, "Can't use copy-on-read on read-only device");
}
END_TEST

struct op {
	int ret, done;
};

static void op_cb(void *opaque, int ret)
{
	struct op *o = opaque;
	o->ret = ret;
	o->done++;
}

/* A copy-on-read and a guest write of the same cluster in flight together:
 * whatever order the engine and the disk give them, the write's data is
 * what the image holds afterwards. */
START_TEST(cor_never_overwrites_a_racing_write)
{
	make_chain(true);
	struct qsm_image *img = open_top(true, "threads");
	uint8_t *rbuf = malloc(2 * CL), *wbuf = malloc(CL), *check = malloc(2 * CL);

	memset(wbuf, 0xee, CL);
	for (int round = 0; round < 60; round++) {
		/* Clusters 0-2 hold base data; 3.. read as zeros: both kinds. */
		uint64_t c = (uint64_t)(round % 2 ? 0 : 3) * CL + (uint64_t)(round / 2) * 4 * CL;
		uint64_t woff = c + (round % 3) * 4096, wlen = round % 4 ? 4096 : CL - (round % 3) * 4096;
		struct iovec riov = { rbuf, 2 * CL }, wiov = { wbuf, wlen };
		struct op r = { 1, 0 }, w = { 1, 0 };
		bool write_first = round % 5 == 0;

		if (c + 2 * CL > 8 * MiB)
			break;
		if (write_first)
			ck_assert_int_eq(qsm_writev(img, woff, &wiov, 1, op_cb, &w), 0);
		ck_assert_int_eq(qsm_readv(img, c, &riov, 1, op_cb, &r), 0);
		if (!write_first)
			ck_assert_int_eq(qsm_writev(img, woff, &wiov, 1, op_cb, &w), 0);
		while (!r.done || !w.done)
			event_base_loop(g_ev, EVLOOP_ONCE);
		ck_assert_int_eq(r.ret, 0);
		ck_assert_int_eq(w.ret, 0);
		ck_assert_int_eq(qsm_sync_pread(img, check, 2 * CL, c), 0);
		for (uint64_t i = woff - c; i < woff - c + wlen; i++)
			ck_assert_msg(check[i] == 0xee, "round %d: byte %llu of the write was "
				      "overwritten (%#x)", round, (unsigned long long)(c + i), check[i]);
		/* The read's own copy: cluster c allocated in the top. */
		ck_assert(top_flags(img, c, NULL) & QSM_STATUS_ALLOCATED);
	}
	ck_assert_int_eq(qsm_close(img), 0);
	free(rbuf);
	free(wbuf);
	free(check);
}
END_TEST

static Suite *cor_suite(void)
{
	Suite *s = suite_create("cor");
	TCase *tc = tcase_create("cor");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, cor_copies_whole_clusters);
	tcase_add_test(tc, cor_without_backing);
	tcase_add_test(tc, cor_refused_read_only);
	tcase_add_test(tc, cor_never_overwrites_a_racing_write);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return qsm_test_run(cor_suite());
}
