/*
 * tests/unit/test_check.c: Check suite "check" for metadata/check.c.
 *
 * The oracle is qemu-img check 7.2 on the same files:
 *  - clean: images of several geometries (cluster 512/64k/2M, refcount_bits
 *    1/16/64, v2/v3, internal snapshots, compressed clusters) check 0/0 with
 *    the statistics qemu-img check --output=json prints;
 *  - damage: each kind gives qemu's leak and corruption counts;
 *  - repair: after -r all (and -r leaks for leaks), qemu-img check is clean
 *    and the guest contents equal the undamaged copy (qemu-img compare);
 *  - crash: a repair on the sim disk is cut after its n-th write (every n),
 *    the unflushed writes are dropped at random (qsm_sim_crash_random), and a
 *    second repair must leave an image qemu-img check finds clean, with the
 *    guest data intact.  Seeds are printed; QSM_TEST_SEED overrides them.
 */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/sim.h"
#include "metadata/check.h"
#include "metadata/qcow2.h"
#include "tests/unit/skip.h"

static char tmpdir[256];

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	char cmd[2048];
	va_list ap;
	int r;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	r = system(cmd);
	return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

static void path_of(char *buf, size_t len, const char *name)
{
	snprintf(buf, len, "%s/%s.qcow2", tmpdir, name);
}

/* qemu-img check --output=json: exit status and the numbers. */
struct qres {
	int rc;
	uint64_t corruptions, leaks, check_errors, end, total, alloc, frag, comp;
};

static uint64_t jnum(const char *json, const char *key)
{
	char k[64];
	const char *p;

	snprintf(k, sizeof(k), "\"%s\": ", key);
	p = strstr(json, k);
	return p ? strtoull(p + strlen(k), NULL, 10) : 0;
}

static struct qres qemu_check(const char *path)
{
	char cmd[1024], json[8192] = "";
	struct qres q = { 0 };
	size_t n;
	FILE *f;
	int st;

	snprintf(cmd, sizeof(cmd), "qemu-img check --output=json '%s' 2>/dev/null", path);
	f = popen(cmd, "r");
	ck_assert_ptr_nonnull(f);
	n = fread(json, 1, sizeof(json) - 1, f);
	json[n] = '\0';
	st = pclose(f);
	q.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	q.corruptions = jnum(json, "corruptions");
	q.leaks = jnum(json, "leaks");
	q.check_errors = jnum(json, "check-errors");
	q.end = jnum(json, "image-end-offset");
	q.total = jnum(json, "total-clusters");
	q.alloc = jnum(json, "allocated-clusters");
	q.frag = jnum(json, "fragmented-clusters");
	q.comp = jnum(json, "compressed-clusters");
	return q;
}

/* qsm_check_image on a file. */
static int qsm_check(const char *path, unsigned fix, struct qsm_check_result *res)
{
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	char err[256];
	int r;

	ck_assert_ptr_nonnull(b);
	ck_assert_int_eq(qsm_io_open_path(b, path, fix ? 0 : QSM_IO_RDONLY, NULL, &io), 0);
	r = qsm_check_image(io, fix, res, NULL, err, sizeof(err));
	ck_assert_msg(r == 0, "%s: qsm_check_image: %d %s", path, r, err);
	qsm_io_close(io);
	event_base_free(b);
	return qsm_check_exit_code(res);
}

static void expect_same(const char *path)
{
	struct qsm_check_result r;
	struct qres q = qemu_check(path);
	int rc = qsm_check(path, 0, &r);

	ck_assert_msg(rc == q.rc && r.corruptions_left == q.corruptions && r.leaks_left == q.leaks &&
			      r.check_errors == q.check_errors,
		      "%s: qsm rc=%d c=%" PRIu64 " l=%" PRIu64 " e=%" PRIu64 ", qemu rc=%d c=%" PRIu64
		      " l=%" PRIu64 " e=%" PRIu64, path, rc, r.corruptions_left, r.leaks_left,
		      r.check_errors, q.rc, q.corruptions, q.leaks, q.check_errors);
	if (q.rc != 1) {
		ck_assert_uint_eq(r.image_end_offset, q.end);
		ck_assert_uint_eq(r.total_clusters, q.total);
		ck_assert_uint_eq(r.allocated_clusters, q.alloc);
		ck_assert_uint_eq(r.fragmented_clusters, q.frag);
		ck_assert_uint_eq(r.compressed_clusters, q.comp);
	}
}

/* --- clean images --------------------------------------------------------- */

static const char *geoms[] = {
	"cluster_size=512,refcount_bits=1",
	"cluster_size=512,compat=0.10",
	"cluster_size=64k",
	"cluster_size=64k,refcount_bits=64",
	"cluster_size=64k,compat=0.10",
	"cluster_size=2M,refcount_bits=16",
	"cluster_size=4k,refcount_bits=8",
};
#define NGEOM (int)(sizeof(geoms) / sizeof(geoms[0]))

START_TEST(test_clean)
{
	char p[512], pc[512], name[32];
	struct qsm_check_result r;

	snprintf(name, sizeof(name), "clean%d", _i);
	path_of(p, sizeof(p), name);
	ck_assert_int_eq(sh("qemu-img create -q -f qcow2 -o %s %s 128M", geoms[_i], p), 0);
	ck_assert_int_eq(sh("qemu-io -f qcow2 -c 'write -P 1 0 300k' -c 'write -P 2 5M 3M' "
			    "-c 'write -z 100M 1M' -c 'write -P 3 127M 4k' %s >/dev/null", p), 0);
	expect_same(p);
	ck_assert_int_eq(qsm_check(p, 0, &r), 0);
	/* snapshots need refcounts of 2 at least */
	if (!strstr(geoms[_i], "refcount_bits=1") || strstr(geoms[_i], "refcount_bits=16")) {
		ck_assert_int_eq(sh("qemu-img snapshot -c s1 %s", p), 0);
		ck_assert_int_eq(sh("qemu-io -f qcow2 -c 'write -P 4 0 64k' -c 'write -P 5 "
				    "60M 64k' %s >/dev/null", p), 0);
		ck_assert_int_eq(sh("qemu-img snapshot -c s2 %s", p), 0);
		expect_same(p);
		ck_assert_int_eq(qsm_check(p, 0, &r), 0);
	}
	snprintf(name, sizeof(name), "comp%d", _i);
	path_of(pc, sizeof(pc), name);
	ck_assert_int_eq(sh("qemu-img convert -c -O qcow2 -o %s %s %s", geoms[_i], p, pc), 0);
	expect_same(pc);
	ck_assert_int_eq(qsm_check(pc, 0, &r), 0);
	ck_assert_uint_gt(r.compressed_clusters, 0);
}
END_TEST

/* --- damage ----------------------------------------------------------------- */

/* A 64k-cluster, 16-bit-refcount image with data, optionally snapshotted. */
struct img {
	FILE *f;
	uint64_t cs, l1, rt, rb, l2, size;
};

static uint64_t g64(struct img *m, uint64_t off)
{
	uint8_t b[8];
	ck_assert_int_eq(fseeko(m->f, (off_t)off, SEEK_SET), 0);
	ck_assert_int_eq(fread(b, 1, 8, m->f), 8);
	return qcow2_be64(b);
}

static void p64(struct img *m, uint64_t off, uint64_t v)
{
	uint8_t b[8];
	qcow2_put_be64(b, v);
	ck_assert_int_eq(fseeko(m->f, (off_t)off, SEEK_SET), 0);
	ck_assert_int_eq(fwrite(b, 1, 8, m->f), 8);
}

static void setrc(struct img *m, uint64_t cl, unsigned v)
{
	uint8_t b[2];
	qcow2_put_be16(b, (uint16_t)v);
	ck_assert_uint_lt(cl, m->cs / 2);
	ck_assert_int_eq(fseeko(m->f, (off_t)(m->rb + 2 * cl), SEEK_SET), 0);
	ck_assert_int_eq(fwrite(b, 1, 2, m->f), 2);
}

static void img_open(struct img *m, const char *path)
{
	m->f = fopen(path, "r+b");
	ck_assert_ptr_nonnull(m->f);
	m->cs = 65536;
	m->l1 = g64(m, 40);
	m->rt = g64(m, 48);
	m->rb = g64(m, m->rt);
	m->l2 = g64(m, m->l1) & QCOW2_L1E_OFFSET_MASK;
	fseeko(m->f, 0, SEEK_END);
	m->size = (uint64_t)ftello(m->f);
}

enum dmg { D_LEAK, D_LOW, D_EOF, D_OVERLAP, D_COPIED, D_RBZERO, D_RTRESERVED, D_UNALIGNED, D_N };
static const char *dmg_names[] = { "leak", "low", "eof", "overlap", "copied", "rbzero",
				   "rtreserved", "unaligned" };
/* repairable by -r all with the guest data intact */
static const bool dmg_keep[] = { true, true, true, false, true, true, true, false };

static void damage(const char *path, enum dmg d)
{
	struct img m;
	uint64_t e;

	img_open(&m, path);
	e = g64(&m, m.l2); /* guest cluster 0 */
	switch (d) {
	case D_LEAK:
		ck_assert_int_eq(ftruncate(fileno(m.f), (off_t)(m.size + m.cs)), 0);
		fflush(m.f);
		setrc(&m, (m.size + m.cs - 1) / m.cs, 1);
		setrc(&m, m.l1 / m.cs, 2);
		break;
	case D_LOW:
		setrc(&m, (e & QCOW2_L2E_OFFSET_MASK) / m.cs, 0);
		break;
	case D_EOF:
		p64(&m, m.l2 + 8 * 100, QCOW2_OFLAG_COPIED | (m.size / m.cs + 10) * m.cs);
		p64(&m, m.l2 + 8 * 101, (m.size / m.cs + 1000) * m.cs);
		break;
	case D_OVERLAP:
		p64(&m, m.l1 + 8, QCOW2_OFLAG_COPIED | m.rb);
		break;
	case D_COPIED:
		p64(&m, m.l2, e & ~QCOW2_OFLAG_COPIED);
		break;
	case D_RBZERO:
		setrc(&m, m.rb / m.cs, 0);
		break;
	case D_RTRESERVED:
		p64(&m, m.rt, m.rb | 1);
		break;
	case D_UNALIGNED:
		p64(&m, m.l2, e + 512);
		break;
	default:
		break;
	}
	fclose(m.f);
}

static void make_base(const char *p, bool snap)
{
	ck_assert_int_eq(sh("qemu-img create -q -f qcow2 %s 1G", p), 0);
	ck_assert_int_eq(sh("qemu-io -f qcow2 -c 'write -P 1 0 256k' -c 'write -P 2 10M 64k' %s "
			    ">/dev/null", p), 0);
	if (snap) {
		ck_assert_int_eq(sh("qemu-img snapshot -c s1 %s", p), 0);
		ck_assert_int_eq(sh("qemu-io -f qcow2 -c 'write -P 3 0 64k' %s >/dev/null", p), 0);
	}
}

START_TEST(test_damage)
{
	enum dmg d = (enum dmg)(_i % D_N);
	bool snap = _i >= D_N;
	char base[512], p[512], name[64];
	struct qsm_check_result r;
	struct qres q;

	snprintf(name, sizeof(name), "base%d", snap);
	path_of(base, sizeof(base), name);
	if (access(base, F_OK))
		make_base(base, snap);
	snprintf(name, sizeof(name), "dmg_%s_%d", dmg_names[d], snap);
	path_of(p, sizeof(p), name);
	ck_assert_int_eq(sh("cp %s %s", base, p), 0);
	damage(p, d);
	expect_same(p);

	/* -r leaks: the same verdict as qemu's -r leaks */
	ck_assert_int_eq(sh("cp %s %s.q && cp %s %s.s", p, p, p, p), 0);
	ck_assert_int_ge(sh("qemu-img check -r leaks %s.q >/dev/null 2>&1", p), 0);
	char ps[600], pq[600];
	snprintf(ps, sizeof(ps), "%s.s", p);
	snprintf(pq, sizeof(pq), "%s.q", p);
	qsm_check(ps, QSM_CHECK_FIX_LEAKS, &r);
	if (!r.incomplete) {
		q = qemu_check(pq);
		struct qsm_check_result r2;
		int rc = qsm_check(ps, 0, &r2);
		ck_assert_msg(d == D_LOW || d == D_RBZERO || rc == q.rc,
			      "%s -r leaks: then qsm %d qemu %d", p, rc, q.rc);
	}

	/* -r all */
	qsm_check(p, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r);
	ck_assert(!r.incomplete);
	q = qemu_check(p);
	if (d != D_OVERLAP) {
		ck_assert_msg(q.rc == 0, "%s: qemu-img check after -r all: rc %d", p, q.rc);
		ck_assert_uint_eq(r.corruptions_left, 0);
	}
	if (dmg_keep[d])
		ck_assert_msg(sh("qemu-img compare -q %s %s", base, p) == 0,
			      "%s: guest data changed by the repair", p);
	/* a repaired image checks clean in qsm as well */
	if (d != D_OVERLAP)
		ck_assert_int_eq(qsm_check(p, 0, &r), 0);
}
END_TEST

START_TEST(test_readonly_refuses_fix)
{
	char p[512];
	struct event_base *b = event_base_new();
	struct qsm_check_result r;
	struct qsm_io *io;
	char err[128];

	path_of(p, sizeof(p), "ro");
	ck_assert_int_eq(sh("qemu-img create -q -f qcow2 %s 64M", p), 0);
	ck_assert_int_eq(qsm_io_open_path(b, p, QSM_IO_RDONLY, NULL, &io), 0);
	ck_assert_int_eq(qsm_check_image(io, QSM_CHECK_FIX_LEAKS, &r, NULL, err, sizeof(err)),
			 -EBADF);
	qsm_io_close(io);
	event_base_free(b);
}
END_TEST

START_TEST(test_dirty)
{
	char p[512];
	struct qsm_check_result r;
	struct qres q;
	uint8_t hdr[80];
	FILE *f;

	path_of(p, sizeof(p), "dirty");
	ck_assert_int_eq(sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on %s 128M", p), 0);
	sh("(qemu-io -f qcow2 -c 'write -P 7 0 64k' -c 'write -P 8 5M 64k' -c 'sigraise 9' %s "
	   ">/dev/null 2>&1; true) 2>/dev/null", p);
	expect_same(p);
	qsm_check(p, QSM_CHECK_FIX_LEAKS, &r);
	ck_assert(r.incomplete); /* "need to rebuild refcount structures", as qemu */
	ck_assert_int_eq(qsm_check_exit_code(&r), 1);
	qsm_check(p, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r);
	ck_assert(r.rebuilt);
	ck_assert_uint_eq(r.corruptions_left, 0);
	f = fopen(p, "rb");
	ck_assert_int_eq(fread(hdr, 1, sizeof(hdr), f), sizeof(hdr));
	fclose(f);
	ck_assert_uint_eq(qcow2_be64(hdr + 72) & QCOW2_INCOMPAT_DIRTY, 0);
	q = qemu_check(p);
	ck_assert_int_eq(q.rc, 0);
	ck_assert_int_eq(sh("qemu-io -f qcow2 -c 'read -P 7 0 64k' -c 'read -P 8 5M 64k' %s | "
			    "grep -q 'verification failed'", p), 1);
}
END_TEST

/* --- crash safety of repair ------------------------------------------------ */

/* An io handle over another that fails every write and flush after `budget`. */
struct cutio {
	struct qsm_io io;
	struct qsm_io *in;
	long budget;
};

static struct cutio *cut_of(struct qsm_io *io)
{
	return (struct cutio *)io;
}

static int cut_pread(struct qsm_io *io, void *b, size_t l, uint64_t o)
{
	return qsm_io_pread_sync(cut_of(io)->in, b, l, o);
}

static int cut_pwrite(struct qsm_io *io, const void *b, size_t l, uint64_t o)
{
	if (cut_of(io)->budget-- <= 0)
		return -EIO;
	return qsm_io_pwrite_sync(cut_of(io)->in, b, l, o);
}

static int cut_flush(struct qsm_io *io)
{
	if (cut_of(io)->budget-- <= 0)
		return -EIO;
	return qsm_io_flush_sync(cut_of(io)->in);
}

static int cut_truncate(struct qsm_io *io, uint64_t s)
{
	if (cut_of(io)->budget-- <= 0)
		return -EIO;
	return qsm_io_truncate_sync(cut_of(io)->in, s);
}

static int cut_size(struct qsm_io *io, uint64_t *s)
{
	return qsm_io_get_size(cut_of(io)->in, s);
}

static const struct qsm_io_ops cut_ops = {
	.name = "cut",
	.pread_sync = cut_pread,
	.pwrite_sync = cut_pwrite,
	.flush_sync = cut_flush,
	.truncate_sync = cut_truncate,
	.get_size = cut_size,
};

/* Repair `src` on a sim disk, cut after n writes/flushes, crash, repair again:
 * returns false when the first repair finished within n (no cut happened). */
static bool crash_once(const char *src, const char *clean, long n, uint64_t seed)
{
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(seed);
	struct qsm_check_result r;
	struct cutio cut = { .io = { .ops = &cut_ops } };
	struct qsm_io *io;
	char err[256], out[600];
	bool cutoff;
	int rc;

	ck_assert_int_eq(qsm_sim_load_file(sim, src), 0);
	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	cut.io.base = b;
	cut.in = io;
	cut.budget = n;
	ck_assert_int_eq(qsm_check_image(&cut.io, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r,
					 NULL, err, sizeof(err)), 0);
	cutoff = cut.budget < 0;
	qsm_sim_crash_random(sim);
	qsm_io_close(io);

	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	rc = qsm_check_image(io, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r, NULL, err,
			     sizeof(err));
	ck_assert_msg(rc == 0 && !r.incomplete && r.corruptions_left == 0,
		      "seed %" PRIu64 " cut %ld: second repair rc %d incomplete %d left %" PRIu64
		      " (%s)", seed, n, rc, r.incomplete, r.corruptions_left, err);
	ck_assert_int_eq(qsm_check_image(io, 0, &r, NULL, err, sizeof(err)), 0);
	ck_assert_msg(qsm_check_exit_code(&r) == 0, "seed %" PRIu64 " cut %ld: not clean after "
		      "the second repair (corruptions %" PRIu64 ", leaks %" PRIu64 ", errors %"
		      PRIu64 ")", seed, n, r.corruptions_left, r.leaks_left, r.check_errors);
	ck_assert_int_eq(qsm_io_flush_sync(io), 0);
	qsm_io_close(io);
	snprintf(out, sizeof(out), "%s.crash", src);
	ck_assert_int_eq(qsm_sim_save_file(sim, out), 0);
	ck_assert_msg(qemu_check(out).rc == 0, "seed %" PRIu64 " cut %ld: qemu-img check", seed, n);
	ck_assert_msg(sh("qemu-img compare -q %s %s", clean, out) == 0,
		      "seed %" PRIu64 " cut %ld: guest data changed", seed, n);
	qsm_sim_free(sim);
	event_base_free(b);
	return cutoff;
}

START_TEST(test_crash_repair)
{
	/* _i: 0 dirty (rebuild), 1 leak + low refcount + COPIED, 2 past-EOF entries */
	char base[512], p[512], name[64];
	uint64_t seed = getenv("QSM_TEST_SEED") ? strtoull(getenv("QSM_TEST_SEED"), NULL, 0)
						: 0x5eed0000u + (uint64_t)_i;

	snprintf(name, sizeof(name), "cbase%d", _i);
	path_of(base, sizeof(base), name);
	snprintf(name, sizeof(name), "crash%d", _i);
	path_of(p, sizeof(p), name);
	if (_i == 0) {
		ck_assert_int_eq(sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on %s 1G", p), 0);
		sh("(qemu-io -f qcow2 -c 'write -P 7 0 64k' -c 'write -P 8 600M 64k' -c 'sigraise 9' "
		   "%s >/dev/null 2>&1; true) 2>/dev/null", p);
		/* the reference for the data: the same writes, cleanly */
		ck_assert_int_eq(sh("qemu-img create -q -f qcow2 %s 1G && qemu-io -f qcow2 -c "
				    "'write -P 7 0 64k' -c 'write -P 8 600M 64k' %s >/dev/null",
				    base, base), 0);
	} else {
		make_base(base, false);
		ck_assert_int_eq(sh("cp %s %s", base, p), 0);
		if (_i == 1) {
			damage(p, D_LEAK);
			damage(p, D_COPIED);
			damage(p, D_RTRESERVED);
		} else {
			damage(p, D_EOF);
			damage(p, D_LEAK);
		}
	}
	long n;
	for (n = 0; n < 200; n++) {
		bool cut = false;
		for (int k = 0; k < 3; k++)
			cut = crash_once(p, base, n, seed * 1000 + (uint64_t)n * 3 + (uint64_t)k);
		if (!cut)
			break;
	}
	printf("check crash %d: seed 0x%" PRIx64 ", repair cut at each of %ld writes/flushes, "
	       "3 random crashes each\n", _i, seed, n);
	ck_assert_int_gt(n, 2);
}
END_TEST

/* Found by fuzz_open: a v3 header whose L1 table lies past the end of the
 * file (441 bytes; reftable at 0x200 past it too).  The rebuilt refcount
 * structure is "still broken" (the L1's cluster stays unreferenced), and the
 * repair used to report corruptions_left 0 anyway (qemu's counting), which
 * the open-time repair of a dirty image trusts.  What it reports left must be
 * what a second check finds. */
START_TEST(test_rebuild_still_broken)
{
	uint8_t img[441] = { 0 };
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(1);
	struct qsm_check_result r1, r2;
	struct qsm_io *io;
	char err[128];

	qcow2_put_be32(img, QCOW2_MAGIC);
	qcow2_put_be32(img + 4, 3);        /* version */
	qcow2_put_be32(img + 20, 9);       /* cluster_bits */
	qcow2_put_be64(img + 24, 65536);   /* size */
	qcow2_put_be32(img + 36, 2);       /* l1_size */
	qcow2_put_be64(img + 40, 0x600);   /* l1_table_offset: past the end */
	qcow2_put_be64(img + 48, 0x200);   /* refcount_table_offset */
	qcow2_put_be32(img + 56, 1);       /* refcount_table_clusters */
	qcow2_put_be32(img + 96, 4);       /* refcount_order */
	qcow2_put_be32(img + 100, 0x70);   /* header_length */
	ck_assert_int_eq(qsm_sim_load_buf(sim, img, sizeof(img)), 0);

	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	ck_assert_int_eq(qsm_check_image(io, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r1, NULL,
					 err, sizeof(err)), 0);
	ck_assert(r1.rebuilt);
	ck_assert_int_eq(qsm_check_image(io, 0, &r2, NULL, err, sizeof(err)), 0);
	ck_assert_uint_gt(r2.corruptions, 0);
	ck_assert_uint_eq(r1.corruptions_left, r2.corruptions);
	ck_assert_int_eq(qsm_check_exit_code(&r1), 2);
	/* Found = fixed + left. */
	ck_assert_uint_eq(r1.corruptions, r1.corruptions_fixed + r1.corruptions_left);
	qsm_io_close(io);
	qsm_sim_free(sim);
	event_base_free(b);
}
END_TEST

/* Found by fuzz_open: a refcount table entry far past the end of the file.
 * As qemu, -r all grows the file to reach that refcount block and rebuilds;
 * the rebuilt table (1-bit.. here 64-bit refcounts, 512-byte clusters: 64
 * clusters per block) would exceed the 8 MiB the opener accepts, and used to
 * be written anyway, leaving an image neither check nor open accepted.  Now
 * the rebuild refuses (check incomplete, -EFBIG) and the header keeps the
 * old table. */
START_TEST(test_rebuild_too_large)
{
	struct qcow2_create_opts o = { .size = 65536, .cluster_bits = 9, .version = 3,
				       .refcount_order = 6 };
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(1);
	struct qsm_check_result r;
	struct qsm_io *io;
	uint8_t *img, hdr[60];
	size_t len;
	char err[128];

	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), 0);
	uint64_t rt = qcow2_be64(img + 48);
	/* 64 clusters per block, at most 1 Mi entries: block 2^20 + 5 is out of reach. */
	uint64_t far = ((1ull << 20) + 5) * 64 * 512;
	qcow2_put_be64(img + rt + 8 * 7, far);
	ck_assert_int_eq(qsm_sim_load_buf(sim, img, len), 0);

	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	ck_assert_int_eq(qsm_check_image(io, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r, NULL,
					 err, sizeof(err)), 0);
	ck_assert(r.incomplete);
	ck_assert_int_eq(r.error, -EFBIG);
	ck_assert(!r.rebuilt);
	ck_assert_int_eq(qsm_io_pread_sync(io, hdr, sizeof(hdr), 0), 0);
	ck_assert_uint_eq(qcow2_be64(hdr + 48), rt);
	ck_assert_uint_eq(qcow2_be32(hdr + 56), qcow2_be32(img + 56));
	qsm_io_close(io);
	qsm_sim_free(sim);
	event_base_free(b);
	free(img);
}
END_TEST

/* Found by fuzz_open (against the first fix above): corruptions a repair
 * does not fix (an L2 entry with reserved bits set, as qemu leaves it) and
 * are counted again after a rebuild must stay counted as left. */
START_TEST(test_rebuild_keeps_unfixed)
{
	struct qcow2_create_opts o = { .size = 65536, .cluster_bits = 9, .version = 3,
				       .refcount_order = 4 };
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(1);
	struct qsm_check_result r1, r2;
	struct qsm_io *io;
	uint8_t *img;
	size_t len;
	char err[128];

	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), 0);
	/* An L2 table and a data cluster after the end, without refcounts
	 * (refcount 0 with a reference: the structure gets rebuilt). */
	size_t l2 = (len + 511) / 512 * 512, data = l2 + 512, nlen = data + 512;
	img = realloc(img, nlen);
	memset(img + len, 0, nlen - len);
	uint64_t l1 = qcow2_be64(img + 40);
	qcow2_put_be64(img + l1, l2 | QCOW2_OFLAG_COPIED);
	qcow2_put_be64(img + l2, data | QCOW2_OFLAG_COPIED | 0x100); /* reserved bit 8 */
	memset(img + data, 0x5a, 512);
	ck_assert_int_eq(qsm_sim_load_buf(sim, img, nlen), 0);

	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	ck_assert_int_eq(qsm_check_image(io, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r1, NULL,
					 err, sizeof(err)), 0);
	ck_assert(r1.rebuilt);
	ck_assert_int_eq(qsm_check_image(io, 0, &r2, NULL, err, sizeof(err)), 0);
	ck_assert_uint_gt(r2.corruptions, 0);
	ck_assert_uint_eq(r1.corruptions_left, r2.corruptions);
	qsm_io_close(io);
	qsm_sim_free(sim);
	event_base_free(b);
	free(img);
}
END_TEST

/* Found by fuzz_open: a snapshot whose L1 table is at offset 0, over the
 * header, so its first "entry" (the magic and version) points past the end
 * of the file.  -r all cleared it, writing zeros over the magic: the image
 * was no longer qcow2.  L1 entries lying on the header, the refcount
 * structure or the snapshot table are now never written (qemu's overlap
 * check refuses them too); the corruption stays, reported as left. */
START_TEST(test_l1_over_header)
{
	struct qcow2_create_opts o = { .size = 65536, .cluster_bits = 9, .version = 3,
				       .refcount_order = 4 };
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(1);
	struct qsm_check_result r1, r2;
	struct qsm_io *io;
	uint8_t *img, hdr[8];
	size_t len;
	char err[128];

	ck_assert_int_eq(qcow2_create_image(&o, &img, &len, err, sizeof(err)), 0);
	/* One snapshot (table in a new cluster at the end): L1 at 0, 1 entry,
	 * id "1", name "s", no extra data. */
	size_t st = (len + 511) / 512 * 512;
	img = realloc(img, st + 512);
	memset(img + len, 0, st + 512 - len);
	qcow2_put_be64(img + st, 0);     /* l1_table_offset */
	qcow2_put_be32(img + st + 8, 1); /* l1_size */
	qcow2_put_be16(img + st + 12, 1); /* id_str_size */
	qcow2_put_be16(img + st + 14, 1); /* name_size */
	img[st + 40] = '1';
	img[st + 41] = 's';
	qcow2_put_be32(img + 60, 1);     /* nb_snapshots */
	qcow2_put_be64(img + 64, st);    /* snapshots_offset */
	len = st + 512;
	ck_assert_int_eq(qsm_sim_load_buf(sim, img, len), 0);

	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	ck_assert_msg(qsm_check_image(io, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r1, NULL,
				      err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(qsm_io_pread_sync(io, hdr, sizeof(hdr), 0), 0);
	ck_assert_mem_eq(hdr, img, 8); /* magic and version untouched */
	ck_assert_msg(qsm_check_image(io, 0, &r2, NULL, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_gt(r2.corruptions, 0);
	ck_assert_uint_eq(r1.corruptions_left, r2.corruptions);
	qsm_io_close(io);
	qsm_sim_free(sim);
	event_base_free(b);
	free(img);
}
END_TEST

/* The only entry of a one-snapshot image qemu-img made, cut to
 * extra_data_size `extra` (its id and name moved down): on v3 an
 * "incomplete" entry that only a rewrite of the table repairs. */
static void cut_extra(const char *path, uint32_t extra)
{
	FILE *f = fopen(path, "r+b");
	uint8_t h[72], e[40 + 24 + 512];
	uint64_t off;

	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fread(h, 1, sizeof(h), f), sizeof(h));
	ck_assert_uint_eq(qcow2_be32(h + 60), 1);
	off = qcow2_be64(h + 64);
	ck_assert_int_eq(fseek(f, (long)off, SEEK_SET), 0);
	ck_assert_uint_eq(fread(e, 1, sizeof(e), f), sizeof(e));
	uint32_t ex = qcow2_be32(e + 36);
	size_t strs = qcow2_be16(e + 12) + (size_t)qcow2_be16(e + 14);
	ck_assert_uint_eq(ex, 24);
	memmove(e + 40 + extra, e + 40 + ex, strs);
	memset(e + 40 + extra + strs, 0, ex - extra);
	qcow2_put_be32(e + 36, extra);
	ck_assert_int_eq(fseek(f, (long)off, SEEK_SET), 0);
	ck_assert_uint_eq(fwrite(e, 1, 40 + ex + strs, f), 40 + ex + strs);
	fclose(f);
}

/* -r all rewrites an incomplete table (qcow2_check_fix_snapshot_table):
 * the counts qemu-img's repair gives, then clean for qemu-img, the entry
 * complete (24 bytes, the disk size filled in), and every crash of the
 * repair at each of its writes/flushes repaired by a second one. */
START_TEST(test_snapshot_table_repair)
{
	char base[512], p[512];
	struct qsm_check_result r;
	uint8_t h[72], e[64];
	uint64_t seed = getenv("QSM_TEST_SEED") ? strtoull(getenv("QSM_TEST_SEED"), NULL, 0)
						: 0x5eed5000u;

	path_of(base, sizeof(base), "snaptab_base");
	path_of(p, sizeof(p), "snaptab");
	make_base(base, true);
	ck_assert_int_eq(sh("cp %s %s", base, p), 0);
	cut_extra(p, _i == 0 ? 0 : 8);
	expect_same(p);
	ck_assert_int_eq(qsm_check(p, 0, &r), 2);
	ck_assert_uint_eq(r.corruptions_left, 1);

	char q[600];
	snprintf(q, sizeof(q), "%s.q", p);
	ck_assert_int_eq(sh("cp %s %s && qemu-img check -r all %s >/dev/null 2>&1", p, q, q), 0);
	long n;
	for (n = 0; n < 200; n++) {
		bool cut = false;
		for (int k = 0; k < 3; k++)
			cut = crash_once(p, base, n, seed * 1000 + (uint64_t)n * 3 + (uint64_t)k);
		if (!cut)
			break;
	}
	printf("check snapshot table repair %d: seed 0x%" PRIx64 ", cut at each of %ld "
	       "writes/flushes, 3 random crashes each\n", _i, seed, n);
	ck_assert_int_gt(n, 4);

	ck_assert_int_eq(qsm_check(p, QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS, &r), 0);
	ck_assert_uint_eq(r.corruptions_fixed, 1);
	ck_assert_uint_eq(r.leaks_fixed, 0);
	ck_assert_int_eq(qemu_check(p).rc, 0);
	ck_assert_int_eq(sh("qemu-img compare -q %s %s", base, p), 0);
	ck_assert_int_eq(sh("qemu-img snapshot -l %s | tail -n +2 >%s.l1 && qemu-img snapshot -l "
			    "%s | tail -n +2 >%s.l2 && cmp -s %s.l1 %s.l2", q, p, p, p, p, p), 0);
	FILE *f = fopen(p, "rb");
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fread(h, 1, sizeof(h), f), sizeof(h));
	ck_assert_int_eq(fseek(f, (long)qcow2_be64(h + 64), SEEK_SET), 0);
	ck_assert_uint_eq(fread(e, 1, sizeof(e), f), sizeof(e));
	fclose(f);
	ck_assert_uint_eq(qcow2_be32(e + 36), 24);
	ck_assert_uint_eq(qcow2_be64(e + 48), 1ull << 30);
	ck_assert_uint_eq(qcow2_be64(e + 56), UINT64_MAX);
}
END_TEST

/* The open-time repair (QSM_CHECK_OPENING) reads the table as the open
 * does: nb_snapshots over 65536 and extra data over 1024 bytes refuse it
 * before anything is written (qsm check -r all would drop / cut them), an
 * incomplete entry is still rewritten. */
START_TEST(test_opening_refuses_table)
{
	const unsigned fix = QSM_CHECK_FIX_LEAKS | QSM_CHECK_FIX_ERRORS | QSM_CHECK_OPENING;
	char p[512], q[600], err[256];
	struct qsm_check_result r;
	struct event_base *b = event_base_new();
	struct qsm_io *io;
	uint8_t be[4];
	FILE *f;

	path_of(p, sizeof(p), "opening");
	make_base(p, true);
	snprintf(q, sizeof(q), "%s.orig", p);
	if (_i == 0) {
		f = fopen(p, "r+b");
		ck_assert_ptr_nonnull(f);
		qcow2_put_be32(be, QCOW2_MAX_SNAPSHOTS + 1);
		ck_assert_int_eq(fseek(f, 60, SEEK_SET), 0);
		ck_assert_uint_eq(fwrite(be, 1, 4, f), 4);
		fclose(f);
	} else {
		cut_extra(p, _i == 1 ? 8 : 24);  /* 24: unchanged, then grown below */
		if (_i == 2) {
			f = fopen(p, "r+b");
			uint8_t h[72];
			ck_assert_ptr_nonnull(f);
			ck_assert_uint_eq(fread(h, 1, sizeof(h), f), sizeof(h));
			qcow2_put_be32(be, 2000);
			ck_assert_int_eq(fseek(f, (long)qcow2_be64(h + 64) + 36, SEEK_SET), 0);
			ck_assert_uint_eq(fwrite(be, 1, 4, f), 4);
			fclose(f);
		}
	}
	ck_assert_int_eq(sh("cp %s %s", p, q), 0);
	ck_assert_ptr_nonnull(b);
	ck_assert_int_eq(qsm_io_open_path(b, p, 0, NULL, &io), 0);
	int rc = qsm_check_image(io, fix, &r, NULL, err, sizeof(err));
	qsm_io_close(io);
	event_base_free(b);
	if (_i == 1) {
		ck_assert_int_eq(rc, 0);
		ck_assert_uint_eq(r.corruptions_fixed, 1);
		ck_assert_int_eq(qemu_check(p).rc, 0);
	} else {
		ck_assert_int_lt(rc, 0);
		ck_assert_ptr_nonnull(strstr(err, _i == 0 ? "Snapshot table too large"
							  : "Too much extra metadata"));
		ck_assert_int_eq(sh("cmp -s %s %s", p, q), 0);
	}
}
END_TEST

static void add_case(Suite *s, const char *name, const TTest *t, int loop_end)
{
	TCase *tc = tcase_create(name);
	tcase_set_timeout(tc, 600);
	tcase_add_loop_test(tc, t, 0, loop_end ? loop_end : 1);
	suite_add_tcase(s, tc);
}

static Suite *check_suite(void)
{
	Suite *s = suite_create("check");
	add_case(s, "clean", test_clean, NGEOM);
	add_case(s, "damage", test_damage, 2 * D_N);
	add_case(s, "readonly", test_readonly_refuses_fix, 0);
	add_case(s, "dirty", test_dirty, 0);
	add_case(s, "crash", test_crash_repair, 3);
	add_case(s, "rebuild_still_broken", test_rebuild_still_broken, 0);
	add_case(s, "rebuild_too_large", test_rebuild_too_large, 0);
	add_case(s, "rebuild_keeps_unfixed", test_rebuild_keeps_unfixed, 0);
	add_case(s, "l1_over_header", test_l1_over_header, 0);
	add_case(s, "snapshot_table_repair", test_snapshot_table_repair, 2);
	add_case(s, "opening_refuses_table", test_opening_refuses_table, 3);
	return s;
}

int main(void)
{
	/* qemu-img check is the oracle of every case (tests/unit/skip.h, 4). */
	if (system("qemu-img --version >/dev/null 2>&1") != 0 ||
	    system("qemu-io --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "SKIPPED: test_check: qemu-img or qemu-io not found (the oracle of every case)\n");
		return 77;
	}
	snprintf(tmpdir, sizeof(tmpdir), "%s/qsm-check-XXXXXX",
		 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	int ret = qsm_test_run(check_suite());
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd))
		fprintf(stderr, "could not remove %s\n", tmpdir);
	return ret;
}
