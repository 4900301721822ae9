/*
 * tests/unit/test_probe.c: Check suite "probe" for metadata/probe.c (format
 * probing) and what the engine does with it (qsm_open_opts.probe_format,
 * qsm_probe_format, the probed raw image's guard on block 0).
 *
 *  - signatures: every format QEMU probes is named from its first bytes,
 *    qcow2 only with a version of 2 or more and a whole header, dmg by its
 *    file name only; anything else, an empty file and a file shorter than a
 *    header are raw; bytes past the first 512 are never looked at;
 *  - open: probe_format opens a qcow2 image as qcow2 and a plain file as
 *    raw (info.format_probed set), refuses another format naming it
 *    (-ENOTSUP, the file unchanged) and is ignored when a format is given;
 *    qsm_probe_format says the same without opening;
 *  - the guard: on a probed raw image a write that would leave the first
 *    512 bytes looking like qcow2 (whole or partial, across two requests in
 *    flight, at the end of a write that starts at 0) is refused with -EPERM
 *    before anything is written; writes that keep them raw go through, so
 *    do writes past byte 512; a zero write that would complete a signature
 *    is refused too; an image opened raw by name has no guard.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "io/qsm_io.h"
#include "io/util.h"
#include "metadata/probe.h"
#include "metadata/qcow2.h"
#include "sm/qsm.h"
#include "tests/unit/skip.h"

static char tmpdir[256];

static void make_tmpdir(void)
{
	const char *base = getenv("TMPDIR");
	snprintf(tmpdir, sizeof(tmpdir), "%s/qsm-test-probe-XXXXXX", base ? base : "/var/tmp");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void rm_tmpdir(void)
{
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	(void)!system(cmd);
}

/* A buffer of `len` bytes of text (no signature) with `sig` at `at`. */
static const char *probe_with(const void *sig, size_t n, size_t at, size_t len,
			      const char *name)
{
	static uint8_t b[1024];
	for (size_t i = 0; i < sizeof(b); i++)
		b[i] = (uint8_t)('a' + i % 26);
	memcpy(b + at, sig, n);
	return qcow2_probe_format(b, len, name);
}

START_TEST(signatures)
{
	uint8_t q[8];
	qcow2_put_be32(q, QCOW2_MAGIC);
	for (uint32_t v = 0; v < 5; v++) {
		qcow2_put_be32(q + 4, v);
		ck_assert_str_eq(probe_with(q, 8, 0, 512, NULL),
				 v >= 2 ? "qcow2" : v == 1 ? "qcow" : "raw");
	}
	/* A qcow2 magic in a file shorter than a header is raw, as in QEMU. */
	qcow2_put_be32(q + 4, 3);
	ck_assert_str_eq(probe_with(q, 8, 0, 103, NULL), "raw");
	ck_assert_str_eq(probe_with(q, 8, 0, 104, NULL), "qcow2");
	qcow2_put_be32(q + 4, 1);
	ck_assert_str_eq(probe_with(q, 8, 0, 47, NULL), "raw");
	ck_assert_str_eq(probe_with(q, 8, 0, 48, NULL), "qcow");
	/* Only at offset 0. */
	qcow2_put_be32(q + 4, 3);
	ck_assert_str_eq(probe_with(q, 8, 512, 1024, NULL), "raw");

	static const struct { const char *sig; size_t n, at; const char *fmt; } s[] = {
		{ "KDMV", 4, 0, "vmdk" },
		{ "COWD", 4, 0, "vmdk" },
		{ "createType=\"", 12, 0, "vmdk" }, /* a descriptor's key line */
		{ "\x7f\x10\xda\xbe", 4, 64, "vdi" },
		{ "vhdxfile", 8, 0, "vhdx" },
		{ "conectix", 8, 0, "vpc" },
		{ "QED\0", 4, 0, "qed" },
		{ "LUKS\xba\xbe", 6, 0, "luks" },
		{ "WithoutFreeSpace", 16, 0, "parallels" },
		{ "WithouFreSpacExt", 16, 0, "parallels" },
		{ "Bochs Virtual HD Image", 22, 0, "bochs" },
		{ "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
		  83, 0, "cloop" },
	};
	for (size_t i = 0; i < sizeof(s) / sizeof(s[0]); i++) {
		ck_assert_msg(!strcmp(probe_with(s[i].sig, s[i].n, s[i].at, 512, NULL), s[i].fmt),
			      "signature %zu: %s, expected %s", i,
			      probe_with(s[i].sig, s[i].n, s[i].at, 512, NULL), s[i].fmt);
		/* Cut one byte short: raw. */
		ck_assert_str_eq(probe_with(s[i].sig, s[i].n, s[i].at, s[i].at + s[i].n - 1, NULL),
				 "raw");
	}
	ck_assert_str_eq(probe_with("# Disk DescriptorFile\ncreateType=\"flat\"\n", 40, 0, 512, NULL),
			 "vmdk");
	/* The descriptor key must start a line. */
	ck_assert_str_eq(probe_with("x createType=\"flat\"", 19, 0, 512, NULL), "raw");
	/* dmg: by name only. */
	ck_assert_str_eq(probe_with("", 0, 0, 512, "disk.dmg"), "dmg");
	ck_assert_str_eq(probe_with("", 0, 0, 512, "disk.dmg.raw"), "raw");
	ck_assert_str_eq(probe_with("", 0, 0, 512, "dmg"), "raw");
	/* Nothing at all. */
	ck_assert_str_eq(qcow2_probe_format(NULL, 0, NULL), "raw");
}
END_TEST

static void write_file(const char *path, const void *buf, size_t n, off_t size)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	ck_assert_int_ge(fd, 0);
	if (n)
		ck_assert_int_eq(pwrite(fd, buf, n, 0), (ssize_t)n);
	ck_assert_int_eq(ftruncate(fd, size), 0);
	close(fd);
}

static void read_file(const char *path, void *buf, size_t n)
{
	int fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, buf, n, 0), (ssize_t)n);
	close(fd);
}

START_TEST(open_probes)
{
	char qpath[300], rpath[300], vpath[300], err[256];
	snprintf(qpath, sizeof(qpath), "%s/a.qcow2", tmpdir);
	snprintf(rpath, sizeof(rpath), "%s/a.img", tmpdir);
	snprintf(vpath, sizeof(vpath), "%s/a.vmdk", tmpdir);
	struct qsm_create_opts co = { QSM_OPTS_INIT(co), .size = 1 << 20 };
	ck_assert_msg(qsm_create(qpath, &co, err, sizeof(err)) == 0, "%s", err);
	write_file(rpath, "hello", 5, 1 << 20);
	write_file(vpath, "KDMV\1\0\0\0", 8, 65536);

	struct event_base *base = event_base_new();
	struct qsm_image *img;
	struct qsm_info info;
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .probe_format = true };

	ck_assert_msg(qsm_open(base, qpath, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	qsm_get_info(img, &info);
	ck_assert_str_eq(info.format, "qcow2");
	ck_assert(info.format_probed);
	ck_assert_int_eq(qsm_close(img), 0);

	ck_assert_msg(qsm_open(base, rpath, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	qsm_get_info(img, &info);
	ck_assert_str_eq(info.format, "raw");
	ck_assert(info.format_probed);
	ck_assert_uint_eq(info.virtual_size, 1 << 20);
	ck_assert_int_eq(qsm_close(img), 0);

	uint8_t before[64], after[64];
	read_file(vpath, before, sizeof(before));
	ck_assert_int_eq(qsm_open(base, vpath, &oo, &img, err, sizeof(err)), -ENOTSUP);
	ck_assert_msg(strstr(err, "Image format 'vmdk' (probed) is not supported"), "%s", err);
	read_file(vpath, after, sizeof(after));
	ck_assert(memcmp(before, after, sizeof(before)) == 0);

	/* A given format wins: the vmdk file opens raw, unguarded. */
	oo.format = "raw";
	ck_assert_msg(qsm_open(base, vpath, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	qsm_get_info(img, &info);
	ck_assert(!info.format_probed);
	ck_assert_int_eq(qsm_close(img), 0);
	/* Without probe_format nothing is probed: qcow2 is assumed. */
	oo = (struct qsm_open_opts){ QSM_OPTS_INIT(oo) };
	ck_assert_int_lt(qsm_open(base, rpath, &oo, &img, err, sizeof(err)), 0);

	/* qsm_probe_format, without opening. */
	const char *fmt = NULL;
	struct qsm_io *io;
	ck_assert_int_eq(qsm_io_open_path(base, qpath, QSM_IO_RDONLY, NULL, &io), 0);
	ck_assert_int_eq(qsm_probe_format(io, qpath, &fmt, err, sizeof(err)), 0);
	ck_assert_str_eq(fmt, "qcow2");
	qsm_io_close(io);
	ck_assert_int_eq(qsm_io_open_path(base, vpath, QSM_IO_RDONLY, NULL, &io), 0);
	ck_assert_int_eq(qsm_probe_format(io, vpath, &fmt, err, sizeof(err)), -ENOTSUP);
	ck_assert_msg(strstr(err, "'vmdk'"), "%s", err);
	qsm_io_close(io);
	event_base_free(base);
}
END_TEST

struct done {
	int ret;
	bool called;
};

static void done_cb(void *opaque, int ret)
{
	struct done *d = opaque;
	d->ret = ret;
	d->called = true;
}

static int write_now(struct event_base *base, struct qsm_image *img, uint64_t off,
		     const void *buf, size_t n)
{
	struct iovec iov = { (void *)buf, n };
	struct done d = { 0 };
	int ret = qsm_writev(img, off, &iov, 1, done_cb, &d);
	if (ret < 0) {
		ck_assert(!d.called);
		return ret;
	}
	while (!d.called)
		event_base_loop(base, EVLOOP_ONCE);
	return d.ret;
}

START_TEST(raw_guard)
{
	char path[300], err[256];
	snprintf(path, sizeof(path), "%s/g.img", tmpdir);
	write_file(path, NULL, 0, 1 << 20);
	struct event_base *base = event_base_new();
	struct qsm_image *img;
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .probe_format = true };
	ck_assert_msg(qsm_open(base, path, &oo, &img, err, sizeof(err)) == 0, "%s", err);

	uint8_t hdr[512] = { 0 }, disk[512];
	qcow2_put_be32(hdr, QCOW2_MAGIC);
	qcow2_put_be32(hdr + 4, 3);
	/* The whole header at once, or its first 8 bytes alone: refused. */
	ck_assert_int_eq(write_now(base, img, 0, hdr, 512), -EPERM);
	ck_assert_int_eq(write_now(base, img, 0, hdr, 8), -EPERM);
	/* Ending in block 0 from a longer write: refused too. */
	uint8_t big[4096] = { 0 };
	memcpy(big, hdr, 8);
	ck_assert_int_eq(write_now(base, img, 0, big, sizeof(big)), -EPERM);
	/* Half the magic, then the other half: the second completes it. */
	ck_assert_int_eq(write_now(base, img, 0, hdr, 4), 0);
	ck_assert_int_eq(write_now(base, img, 4, hdr + 4, 4), -EPERM);
	/* A version that does not make qcow2 is fine; past block 0 anything is. */
	uint8_t v0[4] = { 0, 0, 0, 0 };
	ck_assert_int_eq(write_now(base, img, 4, v0, 4), 0);
	ck_assert_int_eq(write_now(base, img, 512, hdr, 512), 0);
	/* Two writes in flight: the second is judged on top of the first. */
	struct iovec a = { hdr, 4 }, b = { hdr + 4, 4 };
	struct done da = { 0 }, db = { 0 };
	uint8_t junk[4] = "junk";
	ck_assert_int_eq(write_now(base, img, 0, junk, 4), 0);
	ck_assert_int_eq(qsm_writev(img, 4, &b, 1, done_cb, &db), 0);
	ck_assert_int_eq(qsm_writev(img, 0, &a, 1, done_cb, &da), -EPERM);
	while (!db.called)
		event_base_loop(base, EVLOOP_ONCE);
	ck_assert_int_eq(db.ret, 0);
	ck_assert(!da.called);
	/* "QEDx": zeroing the last byte would make it qed. */
	ck_assert_int_eq(write_now(base, img, 0, "QEDx", 4), 0);
	struct done dz = { 0 };
	ck_assert_int_eq(qsm_write_zeroes(img, 3, 1, 0, done_cb, &dz), -EPERM);
	ck_assert_int_eq(qsm_discard(img, 3, 1, done_cb, &dz), -EPERM);
	ck_assert(!dz.called);
	ck_assert_int_eq(qsm_write_zeroes(img, 0, 4096, 0, done_cb, &dz), 0);
	while (!dz.called)
		event_base_loop(base, EVLOOP_ONCE);
	ck_assert_int_eq(dz.ret, 0);
	ck_assert_int_eq(qsm_close(img), 0);
	/* Nothing refused reached the file. */
	read_file(path, disk, sizeof(disk));
	for (size_t i = 0; i < 512; i++)
		ck_assert_uint_eq(disk[i], 0);

	/* Named raw: no guard (the user said what it is). */
	oo.format = "raw";
	ck_assert_msg(qsm_open(base, path, &oo, &img, err, sizeof(err)) == 0, "%s", err);
	ck_assert_int_eq(write_now(base, img, 0, hdr, 512), 0);
	ck_assert_int_eq(qsm_close(img), 0);
	read_file(path, disk, sizeof(disk));
	ck_assert(memcmp(disk, hdr, 512) == 0);
	/* ... and the next probe finds qcow2 (and refuses its bad tables). */
	oo = (struct qsm_open_opts){ QSM_OPTS_INIT(oo), .probe_format = true };
	ck_assert_int_lt(qsm_open(base, path, &oo, &img, err, sizeof(err)), 0);
	event_base_free(base);
}
END_TEST

static Suite *probe_suite(void)
{
	Suite *s = suite_create("probe");
	TCase *t = tcase_create("signatures");
	tcase_add_test(t, signatures);
	suite_add_tcase(s, t);
	t = tcase_create("engine");
	tcase_add_checked_fixture(t, make_tmpdir, rm_tmpdir);
	tcase_add_test(t, open_probes);
	tcase_add_test(t, raw_guard);
	suite_add_tcase(s, t);
	return s;
}

int main(void)
{
	return qsm_test_run(probe_suite());
}
