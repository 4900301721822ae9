/*
 * tests/unit/test_vmstate.c: Check suite "vmstate" for the VM-state area
 * (sm/vmstate.c; qsm.h "VM state").
 *
 *  - offset: qsm_vmstate_offset is the virtual size rounded up to whole L2
 *    tables (64 KiB and 512-byte clusters, a size on a table boundary), 0
 *    on raw images.
 *  - roundtrip: writes at the start, across two L2 tables and over several
 *    tables read back after reopening; what was never written, and what
 *    lies past the L1 table, reads as zeros; the guest disk is untouched;
 *    the L1 table grew as QEMU grows it (1.5x) and only when needed; the
 *    image checks clean; a guest request past the virtual size is still
 *    refused.
 *  - contract: completions never run inside the submit call; bad ranges,
 *    raw images, read-only images and the L1 limit are refused at submit
 *    without a callback.
 *  - busy: a write that must grow the L1 table is accepted while a request
 *    is in flight (the growth waits for it: the write completes after it),
 *    from inside a completion callback, and with requests submitted after
 *    it (they wait for the growth); refused with -EBUSY while a snapshot
 *    operation runs; a write inside the table runs concurrently with guest
 *    writes.
 *  - backing: with copy_on_read a VM-state read copies nothing; a backing
 *    file no longer than the disk reads as zeros past the L1 table; past
 *    the table of a top shorter than its base, the base's data (zeros
 *    after its end), also in a read that starts inside the table; a close
 *    waits for such a read.
 *  - discard: qsm_vmstate_discard (sm.h, for snapshot create) frees the
 *    clusters of a saved state, whole clusters, and stops at the L1
 *    table's end; the rest of the area is kept.
 *  - grow_crash: the L1 growth on the sim disk with a fault at each named
 *    event (once) and none, then a power loss keeping a random subset of
 *    the unflushed writes: the image checks without corruption (a leak at
 *    most), the guest data is intact, each VM-state cluster reads as
 *    written or as zeros (metadata/l1.h's order).  QSM_TEST_SEED=N.
 * Files live in $QSM_TEST_DIR or /var/tmp.
 */
#include <check.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/sim.h"
#include "sm/sm.h"
#include "tests/unit/skip.h"

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/lsan_interface.h>
/* A request in flight at a power loss never completes (the sim drops it):
 * what it holds is not a leak. */
#define LSAN_OFF() __lsan_disable()
#define LSAN_ON() __lsan_enable()
#else
#define LSAN_OFF() ((void)0)
#define LSAN_ON() ((void)0)
#endif

#define KiB 1024ull
#define MiB (1024ull * 1024)

static char g_path[PATH_MAX], g_base[PATH_MAX];
static struct event_base *g_ev;

static void setup(void)
{
	const char *d = getenv("QSM_TEST_DIR");
	g_ev = event_base_new();
	ck_assert_ptr_nonnull(g_ev);
	snprintf(g_path, sizeof(g_path), "%s/qsm-test-vmstate-%d.img", d && *d ? d : "/var/tmp",
		 (int)getpid());
	snprintf(g_base, sizeof(g_base), "%s/qsm-test-vmstate-base-%d.img",
		 d && *d ? d : "/var/tmp", (int)getpid());
}

static void teardown(void)
{
	unlink(g_path);
	unlink(g_base);
	event_base_free(g_ev);
}

static void create(const char *path, uint64_t size, uint64_t cs, const char *backing)
{
	struct qsm_create_opts o = { QSM_OPTS_INIT(o), .size = size, .cluster_size = cs,
				     .backing_file = backing,
				     .backing_format = backing ? "qcow2" : NULL };
	char err[256];
	ck_assert_msg(qsm_create(path, &o, err, sizeof(err)) == 0, "%s", err);
}

static struct qsm_image *open_img(const char *path, bool ro, bool cor)
{
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .read_only = ro, .copy_on_read = cor };
	struct qsm_image *img;
	char err[256];
	ck_assert_msg(qsm_open(g_ev, path, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	return img;
}

/* A request's completion: ret, and whether it ran. */
struct done {
	bool called;
	int ret;
};

static void done_cb(void *opaque, int ret)
{
	struct done *d = opaque;
	ck_assert(!d->called);
	d->called = true;
	d->ret = ret;
}

static int wait_done(struct done *d)
{
	while (!d->called)
		ck_assert_int_ge(event_base_loop(g_ev, EVLOOP_ONCE), 0);
	return d->ret;
}

/* Synchronous VM-state I/O; the callback must not run inside the submit. */
static int vm_io(struct qsm_image *img, bool write, uint64_t pos, void *buf, size_t len)
{
	struct iovec iov = { buf, len };
	struct done d = { 0 };
	int r = write ? qsm_vmstate_writev(img, pos, &iov, 1, done_cb, &d)
		      : qsm_vmstate_readv(img, pos, &iov, 1, done_cb, &d);
	ck_assert(!d.called);
	return r < 0 ? r : wait_done(&d);
}

static void vm_fill(struct qsm_image *img, uint64_t pos, size_t len, int pat)
{
	uint8_t *b = malloc(len);
	memset(b, pat, len);
	ck_assert_int_eq(vm_io(img, true, pos, b, len), 0);
	free(b);
}

/* [pos, +len) of the VM state reads as pat. */
static void vm_expect(struct qsm_image *img, uint64_t pos, size_t len, int pat)
{
	uint8_t *b = malloc(len);
	memset(b, ~pat, len);
	ck_assert_int_eq(vm_io(img, false, pos, b, len), 0);
	for (size_t i = 0; i < len; i++)
		ck_assert_msg(b[i] == (uint8_t)pat, "VM state byte %llu is %#x, not %#x",
			      (unsigned long long)(pos + i), b[i], pat);
	free(b);
}

/* The header's l1_size (offset 36, big-endian). */
static uint32_t file_l1_size(const char *path)
{
	uint8_t b[4];
	FILE *f = fopen(path, "rb");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fseek(f, 36, SEEK_SET), 0);
	ck_assert_int_eq(fread(b, 1, 4, f), 4);
	fclose(f);
	return (uint32_t)b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3];
}

static void check_clean(const char *path)
{
	struct qsm_check_report rep = { .struct_size = sizeof(rep) };
	char err[256];
	int r = qsm_check(path, 0, &rep, NULL, err, sizeof(err));
	ck_assert_msg(r == 0, "qsm_check %d: %s (%llu corruptions, %llu leaks)", r, err,
		      (unsigned long long)rep.corruptions, (unsigned long long)rep.leaks);
}

START_TEST(offset)
{
	struct { uint64_t size, cs, want; } t[] = {
		{ 3 * MiB, 64 * KiB, 512 * MiB },   /* one table maps 512 MiB */
		{ 3 * MiB, 512, 3 * MiB },          /* 32 KiB per table: on a boundary */
		{ 3 * MiB + 512, 512, 3 * MiB + 32 * KiB },
		{ 1024 * MiB, 64 * KiB, 1024 * MiB },
	};
	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		create(g_path, t[i].size, t[i].cs, NULL);
		struct qsm_image *img = open_img(g_path, true, false);
		ck_assert_uint_eq(qsm_vmstate_offset(img), t[i].want);
		ck_assert_int_eq(qsm_close(img), 0);
	}
	FILE *f = fopen(g_path, "w");
	ck_assert_int_eq(ftruncate(fileno(f), MiB), 0);
	fclose(f);
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .format = "raw" };
	struct qsm_image *img;
	ck_assert_int_eq(qsm_open(g_ev, g_path, &oo, &img, NULL, 0), 0);
	ck_assert_uint_eq(qsm_vmstate_offset(img), 0);
	uint8_t b[512] = { 0 };
	ck_assert_int_eq(vm_io(img, true, 0, b, sizeof(b)), -ENOTSUP);
	ck_assert_int_eq(vm_io(img, false, 0, b, sizeof(b)), -ENOTSUP);
	ck_assert_int_eq(qsm_close(img), 0);
}
END_TEST

START_TEST(roundtrip)
{
	const uint64_t cs = 512, span = cs * cs / 8, size = 3 * MiB + 512;
	create(g_path, size, cs, NULL);
	struct qsm_image *img = open_img(g_path, false, false);
	uint64_t l1 = file_l1_size(g_path); /* 97 entries for the disk */
	ck_assert_uint_eq(l1, (size + span - 1) / span);
	uint8_t *g = malloc(64 * KiB);
	memset(g, 0x5a, 64 * KiB);
	ck_assert_int_eq(qsm_sync_pwrite(img, g, 64 * KiB, size - 64 * KiB), 0);

	vm_fill(img, 0, 4 * KiB, 0x11);              /* grows the table: 97 -> 146 */
	ck_assert_uint_eq(file_l1_size(g_path), 146);
	vm_fill(img, span - 4 * KiB, 8 * KiB, 0x22); /* two tables, inside the table */
	ck_assert_uint_eq(file_l1_size(g_path), 146);
	vm_fill(img, 10 * span + 512, 5 * span, 0x33); /* over six tables */
	ck_assert_uint_eq(file_l1_size(g_path), 146);
	vm_fill(img, 60 * span, 4 * KiB, 0x44);       /* 97 + 61 > 146: grows to 219 */
	ck_assert_uint_eq(file_l1_size(g_path), 219);
	/* A guest request past the disk is still refused. */
	struct iovec iov = { g, 512 };
	struct done d = { 0 };
	ck_assert_int_eq(qsm_writev(img, size, &iov, 1, done_cb, &d), -EINVAL);
	ck_assert_int_eq(qsm_readv(img, size - 256, &iov, 1, done_cb, &d), -EINVAL);
	ck_assert(!d.called);
	ck_assert_int_eq(qsm_close(img), 0);
	check_clean(g_path);

	img = open_img(g_path, true, false);
	vm_expect(img, 0, 4 * KiB, 0x11);
	vm_expect(img, 4 * KiB, 4 * KiB, 0);           /* never written */
	vm_expect(img, span - 4 * KiB, 8 * KiB, 0x22);
	vm_expect(img, 10 * span, 512, 0);
	vm_expect(img, 10 * span + 512, 5 * span, 0x33);
	vm_expect(img, 15 * span + 512, 512, 0);
	vm_expect(img, 60 * span, 4 * KiB, 0x44);
	/* Past the L1 table (219 entries: 122 past the disk), and a read that
	 * starts inside it and ends past it. */
	vm_expect(img, 500 * span, 4 * KiB, 0);
	vm_expect(img, 122 * span - 1024, 2048, 0);
	vm_expect(img, 1ull << 40, 512, 0);
	/* The guest disk. */
	ck_assert_int_eq(qsm_sync_pread(img, g, 64 * KiB, size - 64 * KiB), 0);
	for (size_t i = 0; i < 64 * KiB; i++)
		ck_assert_uint_eq(g[i], 0x5a);
	ck_assert_int_eq(qsm_sync_pread(img, g, 64 * KiB, 0), 0);
	for (size_t i = 0; i < 64 * KiB; i++)
		ck_assert_uint_eq(g[i], 0);
	ck_assert_int_eq(qsm_close(img), 0);
	free(g);
}
END_TEST

START_TEST(contract)
{
	create(g_path, 3 * MiB, 512, NULL);
	struct qsm_image *img = open_img(g_path, false, false);
	uint8_t b[1024];
	struct iovec iov = { b, sizeof(b) };
	struct done d = { 0 };
	uint64_t max = (((uint64_t)INT64_MAX >> 30) << 30) - qsm_vmstate_offset(img);

	ck_assert_int_eq(qsm_vmstate_readv(img, max, &iov, 1, done_cb, &d), -EINVAL);
	ck_assert_int_eq(qsm_vmstate_writev(img, max - 512, &iov, 1, done_cb, &d), -EINVAL);
	ck_assert_int_eq(qsm_vmstate_readv(img, 0, NULL, 1, done_cb, &d), -EINVAL);
	ck_assert_int_eq(qsm_vmstate_writev(NULL, 0, &iov, 1, done_cb, &d), -EINVAL);
	/* Past the largest L1 table (32 MiB of entries, 32 KiB each): -EFBIG,
	 * nothing grown. */
	ck_assert_int_eq(qsm_vmstate_writev(img, (4ull << 20) * 32 * KiB, &iov, 1, done_cb, &d),
			 -EFBIG);
	/* Entry 3999999 fits, but QEMU's growth from 96 entries (x1.5) goes
	 * from 3639105 to 5458658, past the limit: -EFBIG as in QEMU. */
	ck_assert_int_eq(qsm_vmstate_writev(img, (3999999ull - 96) * 32 * KiB, &iov, 1, done_cb,
					    &d), -EFBIG);
	ck_assert(!d.called);
	/* Reads far away are fine (zeros). */
	ck_assert_int_eq(vm_io(img, false, max - sizeof(b), b, sizeof(b)), 0);
	/* Zero-length requests complete, from the loop. */
	ck_assert_int_eq(vm_io(img, true, 1ull << 40, b, 0), 0);
	ck_assert_int_eq(vm_io(img, false, 1ull << 50, b, 0), 0);
	ck_assert_int_eq(qsm_close(img), 0);
	ck_assert_uint_eq(file_l1_size(g_path), 96); /* nothing grew */

	img = open_img(g_path, true, false);
	ck_assert_int_eq(vm_io(img, true, 0, b, sizeof(b)), -EBADF);
	ck_assert_int_eq(vm_io(img, false, 0, b, sizeof(b)), 0);
	ck_assert_int_eq(qsm_close(img), 0);
	check_clean(g_path);
}
END_TEST

struct in_cb {
	struct qsm_image *img;
	struct iovec iov;         /* must live until the writes complete */
	int grow_ret, inside_ret;
	struct done grow, inside;
	bool called;
};

/* A completion that submits VM-state writes: one that must grow the table
 * (accepted: the growth starts from here), one inside it (accepted, held
 * until the growth is over). */
static void submit_from_cb(void *opaque, int ret)
{
	struct in_cb *c = opaque;
	ck_assert_int_eq(ret, 0);
	c->called = true;
	c->grow_ret = qsm_vmstate_writev(c->img, 200 * 32 * KiB, &c->iov, 1, done_cb, &c->grow);
	c->inside_ret = qsm_vmstate_writev(c->img, 512, &c->iov, 1, done_cb, &c->inside);
}

START_TEST(busy)
{
	const uint64_t span = 32 * KiB;
	create(g_path, 3 * MiB, 512, NULL);
	struct qsm_image *img = open_img(g_path, false, false);
	uint8_t *g = malloc(64 * KiB), v[512];
	memset(g, 0x61, 64 * KiB);
	memset(v, 0x62, sizeof(v));
	struct iovec gi = { g, 64 * KiB }, vi = { v, sizeof(v) };
	struct done dg = { 0 }, dv = { 0 };

	/* A guest write in flight: a write needing a larger table waits for
	 * it, then for the growth (96 -> 144), as does a guest write after it. */
	struct done dg2 = { 0 };
	ck_assert_int_eq(qsm_writev(img, 0, &gi, 1, done_cb, &dg), 0);
	ck_assert_int_eq(qsm_vmstate_writev(img, 0, &vi, 1, done_cb, &dv), 0);
	ck_assert_int_eq(qsm_writev(img, 0, &gi, 1, done_cb, &dg2), 0);
	ck_assert(!dv.called && !dg.called);
	ck_assert_int_eq(wait_done(&dv), 0);
	ck_assert(dg.called && dg.ret == 0);
	ck_assert_int_eq(wait_done(&dg2), 0);
	ck_assert_uint_eq(file_l1_size(g_path), 144);
	vm_expect(img, 0, 512, 0x62);
	vm_fill(img, 0, 8 * KiB, 0x63);
	ck_assert_uint_eq(file_l1_size(g_path), 144);

	/* Beside a snapshot operation: -EBUSY. */
	struct done ds = { 0 };
	ck_assert_int_eq(qsm_snapshot_create_async(img, "s", NULL, NULL, 0, done_cb, &ds), 0);
	ck_assert_int_eq(qsm_vmstate_writev(img, 300 * span, &vi, 1, done_cb, &dv), -EBUSY);
	ck_assert_int_eq(wait_done(&ds), 0);
	ck_assert_int_eq(qsm_snapshot_delete(img, "s", NULL, 0), 0);

	/* Inside the table: concurrent with guest writes, no -EBUSY. */
	struct done dd[8] = { { 0 } };
	uint8_t *vb = malloc(8 * 4 * KiB);
	struct iovec vio[8], gio[8];
	for (int i = 0; i < 8; i++) {
		memset(vb + i * 4 * KiB, 0x70 + i, 4 * KiB);
		vio[i] = (struct iovec){ vb + i * 4 * KiB, 4 * KiB };
		gio[i] = (struct iovec){ g, 4 * KiB };
	}
	struct done gd[8] = { { 0 } };
	for (int i = 0; i < 8; i++) {
		ck_assert_int_eq(qsm_writev(img, i * 300 * KiB, &gio[i], 1, done_cb, &gd[i]), 0);
		ck_assert_int_eq(qsm_vmstate_writev(img, i * 5 * span + 1024, &vio[i], 1, done_cb,
						    &dd[i]), 0);
	}
	for (int i = 0; i < 8; i++) {
		ck_assert_int_eq(wait_done(&gd[i]), 0);
		ck_assert_int_eq(wait_done(&dd[i]), 0);
	}
	ck_assert_uint_eq(file_l1_size(g_path), 144);

	/* From inside a completion callback. */
	struct in_cb c = { .img = img, .iov = { v, sizeof(v) } };
	struct iovec ri = { g, 512 };
	ck_assert_int_eq(qsm_readv(img, 0, &ri, 1, submit_from_cb, &c), 0);
	while (!c.called)
		event_base_loop(g_ev, EVLOOP_ONCE);
	ck_assert_int_eq(c.grow_ret, 0);
	ck_assert_int_eq(c.inside_ret, 0);
	ck_assert_int_eq(wait_done(&c.grow), 0);
	ck_assert_int_eq(wait_done(&c.inside), 0);
	ck_assert_uint_eq(file_l1_size(g_path), 324); /* 297 entries needed: 144 -> 216 -> 324 */
	vm_expect(img, 200 * span, 512, 0x62);

	for (int i = 0; i < 8; i++)
		vm_expect(img, i * 5 * span + 1024, 4 * KiB, 0x70 + i);
	vm_expect(img, 0, 512, 0x63);
	vm_expect(img, 512, 512, 0x62);
	vm_expect(img, 5 * KiB, 3 * KiB, 0x63); /* [1 KiB, 5 KiB) went to 0x70 */
	ck_assert_int_eq(qsm_close(img), 0);
	check_clean(g_path);
	free(vb);
	free(g);
}
END_TEST

/* The completion of a read that went to the backing image too: the
 * blocking calls are refused there as in any completion callback, and a
 * write that grows the table is accepted there as in any other. */
struct nested {
	struct qsm_image *img;
	struct iovec iov;
	int close_ret, grow_ret;
	struct done grow;
	bool called;
};

static void nested_cb(void *opaque, int ret)
{
	struct nested *n = opaque;
	ck_assert_int_eq(ret, 0);
	n->called = true;
	n->close_ret = qsm_close(n->img);
	n->grow_ret = qsm_vmstate_writev(n->img, 1000 * 32 * KiB, &n->iov, 1, done_cb, &n->grow);
}

START_TEST(backing)
{
	const uint64_t span = 32 * KiB;
	/* A base as long as the top: past the top's L1 table, zeros. */
	create(g_base, 3 * MiB, 512, NULL);
	struct qsm_image *b = open_img(g_base, false, false);
	vm_fill(b, 0, 4 * KiB, 0x99); /* the base's own VM state is never seen */
	uint8_t *g = malloc(64 * KiB);
	memset(g, 0x51, 64 * KiB);
	ck_assert_int_eq(qsm_sync_pwrite(b, g, 64 * KiB, 0), 0);
	ck_assert_int_eq(qsm_close(b), 0);
	create(g_path, 3 * MiB, 512, g_base);
	struct qsm_image *img = open_img(g_path, false, true);
	struct qsm_stats st;
	vm_expect(img, 0, 4 * KiB, 0);
	vm_expect(img, 50 * span, 4 * KiB, 0);
	qsm_get_stats(img, &st);
	ck_assert_uint_eq(st.clusters_allocated, 0); /* no copy-on-read */
	/* Written over the backing file: COW reads zeros past its end. */
	vm_fill(img, 1024, 1024, 0x52);
	vm_expect(img, 0, 1024, 0);
	vm_expect(img, 1024, 1024, 0x52);
	vm_expect(img, 2048, 2048, 0);
	/* A guest read still copies on read. */
	ck_assert_int_eq(qsm_sync_pread(img, g, 4096, 0), 0);
	ck_assert_uint_eq(g[0], 0x51);
	ck_assert_int_eq(qsm_close(img), 0);
	check_clean(g_path);

	/* A base far longer than the top: past the top's L1 table the VM
	 * state reads the base's data, zeros after its end (as QEMU). */
	create(g_base, 64 * MiB, 512, NULL);
	b = open_img(g_base, false, false);
	memset(g, 0x53, 64 * KiB);
	ck_assert_int_eq(qsm_sync_pwrite(b, g, 64 * KiB, 1 * MiB), 0);
	memset(g, 0x56, 4 * KiB);
	ck_assert_int_eq(qsm_sync_pwrite(b, g, 4 * KiB, 1 * MiB + 768 * KiB), 0);
	memset(g, 0x54, 4 * KiB);
	ck_assert_int_eq(qsm_sync_pwrite(b, g, 4 * KiB, 64 * MiB - 4 * KiB), 0);
	ck_assert_int_eq(qsm_close(b), 0);
	create(g_path, 1 * MiB, 512, g_base); /* VM state at 1 MiB, L1 table 32 entries */
	img = open_img(g_path, false, false);
	ck_assert_uint_eq(qsm_vmstate_offset(img), 1 * MiB);
	vm_expect(img, 0, 64 * KiB, 0x53);                 /* all past the table */
	vm_expect(img, 64 * KiB, 4 * KiB, 0);
	vm_expect(img, 63 * MiB - 4 * KiB, 4 * KiB, 0x54);
	uint8_t *r = malloc(8 * KiB);
	ck_assert_int_eq(vm_io(img, false, 63 * MiB - 2 * KiB, r, 4 * KiB), 0); /* the base's end */
	for (size_t i = 0; i < 4 * KiB; i++)
		ck_assert_uint_eq(r[i], i < 2 * KiB ? 0x54 : 0);
	vm_expect(img, 100 * MiB, 4 * KiB, 0);
	/* The table grows (32 -> 48 entries: 1.5 MiB); a read from inside it
	 * to past it: the top's own data, the base through the machine, the
	 * base beside it. */
	vm_fill(img, 0, 512, 0x55);
	uint8_t *big = malloc(MiB);
	ck_assert_int_eq(vm_io(img, false, 0, big, MiB), 0);
	for (size_t i = 0; i < MiB; i++) {
		int want = i < 512 ? 0x55 : i < 64 * KiB ? 0x53 :
			   (i >= 768 * KiB && i < 772 * KiB) ? 0x56 : 0;
		ck_assert_msg(big[i] == want, "byte %zu is %#x, not %#x", i, big[i], want);
	}
	/* Its callback cannot block, also when it runs from the backing
	 * image's completion (all past the table: the machine's part is empty
	 * and done first). */
	struct nested n = { .img = img, .iov = { r, 512 } };
	struct iovec ni = { r + 4 * KiB, 4 * KiB };
	ck_assert_int_eq(qsm_vmstate_readv(img, 63 * MiB - 4 * KiB, &ni, 1, nested_cb, &n), 0);
	while (!n.called)
		ck_assert_int_ge(event_base_loop(g_ev, EVLOOP_ONCE), 0);
	ck_assert_int_eq(n.close_ret, -EDEADLK);
	ck_assert_int_eq(n.grow_ret, 0);
	ck_assert_int_eq(wait_done(&n.grow), 0);
	ck_assert_uint_eq(r[4 * KiB], 0x54);
	/* Closing with such a read in flight waits for it. */
	struct iovec bi = { big, MiB };
	struct done d = { 0 }, dc = { 0 };
	memset(big, 0xee, MiB);
	ck_assert_int_eq(qsm_vmstate_readv(img, 0, &bi, 1, done_cb, &d), 0);
	ck_assert_int_eq(qsm_close_async(img, done_cb, &dc), 0);
	ck_assert_int_eq(wait_done(&dc), 0);
	ck_assert(d.called);
	ck_assert_int_eq(d.ret, 0);
	ck_assert_uint_eq(big[768 * KiB], 0x56);
	check_clean(g_path);
	free(big);
	free(r);
	free(g);
}
END_TEST

START_TEST(discard)
{
	const uint64_t span = 32 * KiB;
	create(g_path, 3 * MiB, 512, NULL);
	struct qsm_image *img = open_img(g_path, false, false);
	struct qsm_check_report rep = { .struct_size = sizeof(rep) };
	vm_fill(img, 0, 2 * span + 4 * KiB, 0x31);   /* over three L2 tables */
	vm_fill(img, 10 * span, 4 * KiB, 0x32);
	ck_assert_int_eq(qsm_close(img), 0);
	ck_assert_int_eq(qsm_check(g_path, 0, &rep, NULL, NULL, 0), 0);
	uint64_t before = rep.allocated_clusters;

	/* As snapshot create drops the active copy of a saved state: a length
	 * rounded up to whole clusters; past the L1 table nothing to do. */
	img = open_img(g_path, false, false);
	struct done d = { 0 };
	ck_assert_int_eq(qsm_vmstate_discard(img, 0, 2 * span + 4 * KiB - 100, done_cb, &d), 0);
	ck_assert(!d.called);
	ck_assert_int_eq(wait_done(&d), 0);
	d = (struct done){ 0 };
	ck_assert_int_eq(qsm_vmstate_discard(img, 40 * span, 1000 * span, done_cb, &d), 0);
	ck_assert_int_eq(wait_done(&d), 0);
	vm_expect(img, 0, 2 * span + 4 * KiB, 0);
	vm_expect(img, 10 * span, 4 * KiB, 0x32);
	ck_assert_int_eq(qsm_close(img), 0);
	check_clean(g_path);
	ck_assert_int_eq(qsm_check(g_path, 0, &rep, NULL, NULL, 0), 0);
	/* The 136 data clusters are free again (the L2 tables stay). */
	ck_assert_uint_eq(rep.allocated_clusters, before - (2 * span + 4 * KiB) / 512);

	img = open_img(g_path, true, false);
	d = (struct done){ 0 };
	ck_assert_int_eq(qsm_vmstate_discard(img, 0, 512, done_cb, &d), -EBADF);
	ck_assert(!d.called);
	ck_assert_int_eq(qsm_close(img), 0);
}
END_TEST

/* One run of `grow_crash`: on the sim disk, a flushed guest pattern, then
 * a VM-state write that grows the L1 table with a fault at the first
 * operation tagged ev (none: no fault), then a power loss keeping a random
 * subset of the unflushed writes.  The image must check without
 * corruption (leaks allowed), keep its guest data, and every VM-state
 * cluster must read as written or as zeros. */
static void grow_crash_run(enum qsm_io_event ev, uint64_t seed, uint64_t *faults)
{
	struct qsm_sim *sim = qsm_sim_new(seed);
	struct qsm_io *io;
	struct qsm_image *img;
	char err[256];
	uint8_t *b = malloc(64 * KiB);

	ck_assert_int_eq(qsm_io_open_sim(g_ev, sim, 0, &io), 0);
	struct qsm_create_opts co = { QSM_OPTS_INIT(co), .size = 3 * MiB, .cluster_size = 512 };
	ck_assert_msg(qsm_create_io(io, &co, err, sizeof(err)) == 0, "%s", err);
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .cache = QSM_CACHE_WRITEBACK };
	ck_assert_msg(qsm_open_io(g_ev, io, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	memset(b, 0x5a, 64 * KiB);
	ck_assert_int_eq(qsm_sync_pwrite(img, b, 64 * KiB, 0), 0);
	ck_assert_int_eq(qsm_sync_flush(img), 0);
	/* Until the crashed image is closed: a write-back batch in flight at
	 * the power loss never completes (the other cases check for leaks). */
	LSAN_OFF();
	if (ev != QSM_IO_EV_NONE)
		qsm_sim_fault_add(sim, ev, EIO, true);
	memset(b, 0x77, 8 * KiB);
	int r = vm_io(img, true, 0, b, 8 * KiB); /* grows 96 -> 144 entries */
	if (r == 0)
		(void)qsm_sync_flush(img);
	*faults += qsm_sim_faults_fired(sim);
	qsm_sim_crash_random(sim);
	(void)qsm_close(img); /* the disk is down: nothing more reaches it */
	LSAN_ON();
	qsm_sim_fault_clear(sim);

	ck_assert_int_eq(qsm_io_open_sim(g_ev, sim, 0, &io), 0);
	struct qsm_check_report rep = { .struct_size = sizeof(rep) };
	int c = qsm_check_io(io, 0, &rep, NULL, err, sizeof(err));
	ck_assert_msg(c == 0 || c == 3, "event %s seed %llu: check %d (%llu corruptions): %s",
		      qsm_io_event_name(ev), (unsigned long long)seed, c,
		      (unsigned long long)rep.corruptions, err);
	oo.read_only = true;
	ck_assert_msg(qsm_open_io(g_ev, io, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(qsm_sync_pread(img, b, 64 * KiB, 0), 0);
	for (size_t i = 0; i < 64 * KiB; i++)
		ck_assert_uint_eq(b[i], 0x5a);
	ck_assert_int_eq(vm_io(img, false, 0, b, 8 * KiB), 0);
	for (size_t i = 0; i < 8 * KiB; i++)
		ck_assert_msg(b[i] == b[i & ~(size_t)511] && (b[i] == 0 || b[i] == 0x77),
			      "event %s seed %llu: VM state byte %zu is %#x",
			      qsm_io_event_name(ev), (unsigned long long)seed, i, b[i]);
	ck_assert_int_eq(qsm_close(img), 0);
	qsm_sim_free(sim);
	free(b);
}

START_TEST(grow_crash)
{
	uint64_t faults = 0, base = getenv("QSM_TEST_SEED") ? strtoull(getenv("QSM_TEST_SEED"), NULL, 0)
							     : 4242;
	printf("grow_crash: seeds from %llu\n", (unsigned long long)base);
	for (int ev = 0; ev < QSM_IO_EV__COUNT; ev++) {
		/* More seeds only for the events the growth meets. */
		uint64_t f0 = faults;
		for (uint64_t s = 0; s < (ev == QSM_IO_EV_NONE ? 4 : 6); s++) {
			grow_crash_run(ev, base + s * 101 + ev, &faults);
			if (ev != QSM_IO_EV_NONE && faults == f0)
				break;
		}
	}
	ck_assert_uint_gt(faults, 0); /* the faults did hit the growth */
}
END_TEST

static Suite *vmstate_suite(void)
{
	Suite *s = suite_create("vmstate");
	TCase *tc = tcase_create("vmstate");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, offset);
	tcase_add_test(tc, roundtrip);
	tcase_add_test(tc, contract);
	tcase_add_test(tc, busy);
	tcase_add_test(tc, backing);
	tcase_add_test(tc, discard);
	tcase_add_test(tc, grow_crash);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return qsm_test_run(vmstate_suite());
}
