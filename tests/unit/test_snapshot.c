/*
 * tests/unit/test_snapshot.c: Check suite "snapshot" for metadata/snapshot.c,
 * the qcow2 snapshot table.
 *
 *   - a table qemu-img 7.2 wrote (three snapshots, one with a long name and
 *     one whose name is another's id) parses to its fields and serializes
 *     back byte for byte; a parse from a short buffer asks for more and
 *     converges;
 *   - extra data: unknown bytes kept as they were, 16-byte (old) and empty
 *     extra data read as QEMU reads them, a 64-bit vm state size written
 *     with the 32-bit field zeroed;
 *   - every refusal on its own, with its field named: extra data over 1024
 *     bytes, a table over 64 MiB, too many entries, and the per-entry rules
 *     (L1 alignment, L1 size, L1 inside the file) and the v3 extra data
 *     rule check reports;
 *   - name resolution: id first then name; name only; id and name; new ids;
 *   - through the library (TCase "open", sim backend): qsm_open reads the
 *     table, qsm_snapshot_count/get list it (struct_size rules); a table
 *     breaking a rule refuses a read-write open naming the field, and the
 *     disk is byte for byte unchanged.
 */
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "io/io.h"
#include "io/sim.h"
#include "io/util.h"
#include "metadata/qcow2.h"
#include "metadata/snapshot.h"
#include "sm/qsm.h"

/* The snapshot table of a 64 MiB v3 image made by qemu-img 7.2:
 * snapshot -c first; -c "a longer name with spaces"; -c 1 (ids 1, 2, 3). */
static const char qemu_table_hex[] =
	"000000000006000000000001000100056b113e58247ab308000000000000000000000000"
	"00000018000000000000000000000000040000000000000000000000316669727374"
	"000000000000000a000000000001000100196b113e58269ea86000000000000000000000"
	"0000000000180000000000000000000000000400000000000000000000003261206c6f"
	"6e676572206e616d65207769746820737061636573000000000000000000000007000000"
	"000001000100016b113e58288d8fb00000000000000000000000000000001800000000"
	"00000000000000000400000000000000000000003331";

static size_t unhex(const char *s, uint8_t *out)
{
	size_t n = strlen(s) / 2;
	for (size_t i = 0; i < n; i++) {
		unsigned v;
		ck_assert_int_eq(sscanf(s + 2 * i, "%2x", &v), 1);
		out[i] = (uint8_t)v;
	}
	return n;
}

/* One entry at buf+off (8-aligned by the caller); returns its length. */
static size_t put_entry(uint8_t *p, uint64_t l1off, uint32_t l1size, const char *id,
			const char *name, uint32_t vm32, uint32_t extra, const uint8_t *extra_bytes)
{
	size_t idl = strlen(id), nml = strlen(name);
	memset(p, 0, QCOW2_SNAPSHOT_HDR);
	qcow2_put_be64(p, l1off);
	qcow2_put_be32(p + 8, l1size);
	qcow2_put_be16(p + 12, (uint16_t)idl);
	qcow2_put_be16(p + 14, (uint16_t)nml);
	qcow2_put_be32(p + 16, 1700000000);
	qcow2_put_be32(p + 20, 123456789);
	qcow2_put_be64(p + 24, 3723004000000ull);
	qcow2_put_be32(p + 32, vm32);
	qcow2_put_be32(p + 36, extra);
	if (extra_bytes)
		memcpy(p + QCOW2_SNAPSHOT_HDR, extra_bytes, extra);
	else
		memset(p + QCOW2_SNAPSHOT_HDR, 0, extra);
	memcpy(p + QCOW2_SNAPSHOT_HDR + extra, id, idl);
	memcpy(p + QCOW2_SNAPSHOT_HDR + extra + idl, name, nml);
	return QCOW2_SNAPSHOT_HDR + extra + idl + nml;
}

static struct qcow2_header v3_header(void)
{
	struct qcow2_header h;
	memset(&h, 0, sizeof(h));
	h.version = 3;
	h.cluster_bits = 16;
	h.size = 64 << 20;
	return h;
}

START_TEST(qemu_round_trip)
{
	uint8_t buf[1024], out[1024];
	size_t len = unhex(qemu_table_hex, buf), need = 0;
	struct qcow2_snapshot_table t;
	char err[256] = "";

	ck_assert_uint_eq(len, 234);
	ck_assert_int_eq(qcow2_snapshots_parse(buf, len, 3, 64 << 20, &t, &need, err, sizeof(err)), 0);
	ck_assert_uint_eq(t.nb, 3);
	ck_assert_uint_eq(t.size, 234);
	ck_assert_str_eq(t.sn[0].id, "1");
	ck_assert_str_eq(t.sn[0].name, "first");
	ck_assert_str_eq(t.sn[1].name, "a longer name with spaces");
	ck_assert_str_eq(t.sn[2].id, "3");
	ck_assert_str_eq(t.sn[2].name, "1");
	ck_assert_uint_eq(t.sn[0].l1_table_offset, 0x60000);
	ck_assert_uint_eq(t.sn[1].l1_table_offset, 0xa0000);
	ck_assert_uint_eq(t.sn[0].l1_size, 1);
	ck_assert_uint_eq(t.sn[0].date_sec, 1796292184);
	ck_assert_uint_eq(t.sn[0].date_nsec, 612021000);
	ck_assert_uint_eq(t.sn[0].extra_data_size, 24);
	ck_assert_uint_eq(t.sn[0].disk_size, 64 << 20);
	ck_assert_uint_eq(t.sn[0].icount, 0);
	ck_assert_uint_eq(t.sn[0].vm_state_size, 0);
	ck_assert_ptr_null(t.sn[0].unknown_extra);
	struct qcow2_header h = v3_header();
	for (uint32_t i = 0; i < t.nb; i++)
		ck_assert_int_eq(qcow2_snapshot_validate(&t.sn[i], i, &h, 1 << 20, err, sizeof(err)), 0);

	ck_assert_int_eq(qcow2_snapshots_size(&t), 234);
	memset(out, 0xaa, sizeof(out));
	ck_assert_int_eq(qcow2_snapshots_serialize(&t, out, sizeof(out)), 0);
	ck_assert_mem_eq(out, buf, len);
	ck_assert_int_eq(qcow2_snapshots_serialize(&t, out, 233), -ENOSPC);
	qcow2_snapshots_release(&t);
}
END_TEST

/* A parse from a prefix asks for more until it has the table. */
START_TEST(short_buffer)
{
	uint8_t buf[1024];
	size_t len = unhex(qemu_table_hex, buf);
	struct qcow2_snapshot_table t;
	size_t have = (size_t)_i, need = 0;
	int r, rounds = 0;

	while ((r = qcow2_snapshots_parse(buf, have, 3, 64 << 20, &t, &need, NULL, 0)) == -ENODATA) {
		ck_assert_uint_gt(need, have);
		have = need < len ? need : len;
		ck_assert_int_lt(++rounds, 12);
	}
	ck_assert_int_eq(r, 0);
	ck_assert_uint_eq(t.size, len);
	ck_assert_ptr_nonnull(t.sn);
	qcow2_snapshots_release(&t);
	ck_assert_ptr_null(t.sn);
}
END_TEST

START_TEST(extra_data)
{
	uint8_t buf[512] = { 0 }, out[512], ex[40];
	struct qcow2_snapshot_table t;
	size_t off = 0;
	char err[256] = "";

	/* entry 0: 40 bytes of extra data, 16 unknown ones kept */
	for (unsigned i = 0; i < sizeof(ex); i++)
		ex[i] = (uint8_t)(0x10 + i);
	qcow2_put_be64(ex, 5ull << 32);      /* vm_state_size_large > 4 GiB */
	qcow2_put_be64(ex + 8, 1 << 30);     /* disk_size */
	qcow2_put_be64(ex + 16, 77);         /* icount */
	off += put_entry(buf + off, 0x10000, 1, "7", "ext", 0, 40, ex);
	off = (off + 7) & ~7ul;
	size_t e1 = off;
	/* entry 1: 16 bytes (QEMU before icount) */
	qcow2_put_be64(ex, 4096);
	qcow2_put_be64(ex + 8, 2 << 20);
	off += put_entry(buf + off, 0x20000, 1, "8", "old", 4096, 16, ex);
	off = (off + 7) & ~7ul;
	/* entry 2: no extra data (v2 era): the 32-bit size, the image's size */
	off += put_entry(buf + off, 0, 0, "9", "", 512, 0, NULL);

	ck_assert_int_eq(qcow2_snapshots_parse(buf, off, 3, 123 << 20, &t, NULL, err, sizeof(err)), 0);
	ck_assert_uint_eq(t.size, off);
	ck_assert_uint_eq(t.sn[0].vm_state_size, 5ull << 32);
	ck_assert_uint_eq(t.sn[0].disk_size, 1 << 30);
	ck_assert_uint_eq(t.sn[0].icount, 77);
	ck_assert_uint_eq(t.sn[0].unknown_extra_len, 16);
	ck_assert_mem_eq(t.sn[0].unknown_extra, buf + 40 + 24, 16);
	ck_assert_uint_eq(t.sn[0].vm_clock_nsec, 3723004000000ull);
	ck_assert_uint_eq(t.sn[1].vm_state_size, 4096);
	ck_assert_uint_eq(t.sn[1].disk_size, 2 << 20);
	ck_assert_uint_eq(t.sn[1].icount, QCOW2_SNAPSHOT_NO_ICOUNT);
	ck_assert_uint_eq(t.sn[2].vm_state_size, 512);
	ck_assert_uint_eq(t.sn[2].disk_size, 123 << 20);
	ck_assert_str_eq(t.sn[2].name, "");

	/* written back: entry 0 unchanged except the 32-bit size (0 already);
	 * entries 1 and 2 grow to QEMU's 24 bytes of extra data */
	int64_t sz = qcow2_snapshots_size(&t);
	ck_assert_int_eq(sz, (int64_t)e1 + 40 + 24 + 1 + 3 + 4 + 40 + 24 + 1);
	ck_assert_int_eq(qcow2_snapshots_serialize(&t, out, sizeof(out)), 0);
	ck_assert_mem_eq(out, buf, e1);
	ck_assert_uint_eq(qcow2_be32(out + e1 + 36), 24);
	ck_assert_uint_eq(qcow2_be64(out + e1 + 40 + 16), UINT64_MAX);
	/* and that parses back to the same fields */
	struct qcow2_snapshot_table t2;
	ck_assert_int_eq(qcow2_snapshots_parse(out, (size_t)sz, 3, 123 << 20, &t2, NULL, NULL, 0), 0);
	for (unsigned i = 0; i < 3; i++) {
		ck_assert_uint_eq(t2.sn[i].vm_state_size, t.sn[i].vm_state_size);
		ck_assert_uint_eq(t2.sn[i].disk_size, t.sn[i].disk_size);
		ck_assert_uint_eq(t2.sn[i].icount, t.sn[i].icount);
		ck_assert_str_eq(t2.sn[i].id, t.sn[i].id);
	}
	/* a 64-bit vm state size: the 32-bit field is written as 0 */
	t.sn[1].vm_state_size = 1ull << 32;
	ck_assert_int_eq(qcow2_snapshots_serialize(&t, out, sizeof(out)), 0);
	ck_assert_uint_eq(qcow2_be32(out + e1 + 32), 0);
	ck_assert_uint_eq(qcow2_be64(out + e1 + 40), 1ull << 32);
	qcow2_snapshots_release(&t);
	qcow2_snapshots_release(&t2);
}
END_TEST

START_TEST(refuse_extra_too_large)
{
	static uint8_t buf[4096];
	struct qcow2_snapshot_table t;
	char err[256] = "";
	size_t n = put_entry(buf, 0x10000, 1, "1", "a", 0, 24, NULL);
	n = (n + 7) & ~7ul;
	n += put_entry(buf + n, 0x10000, 1, "2", "b", 0, QCOW2_MAX_SNAPSHOT_EXTRA, NULL);
	/* 1024 is allowed */
	ck_assert_int_eq(qcow2_snapshots_parse(buf, n, 2, 1, &t, NULL, err, sizeof(err)), 0);
	ck_assert_uint_eq(t.sn[1].unknown_extra_len, 1000);
	qcow2_snapshots_release(&t);
	/* 1025 is not, whatever the buffer holds */
	ck_assert_uint_eq(n, 72 + 40 + 1024 + 2);
	qcow2_put_be32(buf + 72 + 36, QCOW2_MAX_SNAPSHOT_EXTRA + 1);
	ck_assert_int_eq(qcow2_snapshots_parse(buf, 72 + 40, 2, 1, &t, NULL, err, sizeof(err)), -EFBIG);
	ck_assert_ptr_nonnull(strstr(err, "Too much extra metadata in snapshot table entry 1"));
	ck_assert_ptr_nonnull(strstr(err, "extra_data_size 1025"));
	ck_assert_ptr_null(t.sn);
}
END_TEST

START_TEST(refuse_table_too_big)
{
	/* entries of 40 + 24 + 2 * 65535 bytes: the 64 MiB bound falls in entry 511 */
	size_t elen = 40 + 24 + 2 * 65535, alen = (elen + 7) & ~7ul;
	uint32_t nb = 520;
	size_t len = alen * nb;
	uint8_t *buf = calloc(1, len);
	char *s = malloc(65536);
	struct qcow2_snapshot_table t;
	char err[256] = "";
	size_t need = 0;

	ck_assert(buf && s);
	memset(s, 'x', 65535);
	s[65535] = 0;
	for (uint32_t i = 0; i < nb; i++)
		put_entry(buf + alen * i, 0, 0, s, s, 0, 24, NULL);
	uint32_t fit = (uint32_t)((QCOW2_MAX_SNAPSHOTS_BYTES - elen) / alen + 1);
	/* exactly the entries that fit are accepted */
	ck_assert_int_eq(qcow2_snapshots_parse(buf, len, fit, 1, &t, &need, err, sizeof(err)), 0);
	ck_assert_uint_le(t.size, QCOW2_MAX_SNAPSHOTS_BYTES);
	qcow2_snapshots_release(&t);
	ck_assert_int_eq(qcow2_snapshots_parse(buf, len, fit + 1, 1, &t, &need, err, sizeof(err)),
			 -EFBIG);
	ck_assert_ptr_nonnull(strstr(err, "Snapshot table is too big"));
	ck_assert_ptr_nonnull(strstr(err, "snapshot 511"));
	ck_assert_uint_eq(fit, 511);
	/* a short buffer never asks for more than the bound plus one entry */
	ck_assert_int_eq(qcow2_snapshots_parse(buf, 64, nb, 1, &t, &need, err, sizeof(err)), -ENODATA);
	ck_assert_uint_le(need, QCOW2_MAX_SNAPSHOTS_BYTES + 8 + 40 + 1024 + 2 * 65535);
	/* the serializer keeps to the same bound */
	struct qcow2_snapshot sn[520];
	memset(sn, 0, sizeof(sn));
	for (uint32_t i = 0; i < nb; i++)
		sn[i].id = sn[i].name = s;
	struct qcow2_snapshot_table big = { .sn = sn, .nb = fit };
	ck_assert_int_gt(qcow2_snapshots_size(&big), 0);
	big.nb = fit + 1;
	ck_assert_int_eq(qcow2_snapshots_size(&big), -EFBIG);
	free(buf);
	free(s);
}
END_TEST

START_TEST(refuse_too_many)
{
	uint8_t buf[64] = { 0 };
	struct qcow2_snapshot_table t;
	char err[256] = "";

	ck_assert_int_eq(qcow2_snapshots_parse(buf, sizeof(buf), QCOW2_MAX_SNAPSHOTS + 1, 1, &t,
					       NULL, err, sizeof(err)), -EFBIG);
	ck_assert_ptr_nonnull(strstr(err, "Snapshot table too large"));
	/* none: nothing read, nothing allocated */
	ck_assert_int_eq(qcow2_snapshots_parse(NULL, 0, 0, 1, &t, NULL, err, sizeof(err)), 0);
	ck_assert_uint_eq(t.nb, 0);
	ck_assert_uint_eq(t.size, 0);
}
END_TEST

/* Each per-entry rule broken on its own, the others kept. */
/* The check's reader over a memory "file": zeros past its end; counts reads. */
struct memfile {
	const uint8_t *buf;
	size_t len;
	unsigned reads;
	uint64_t bytes;
};

static int mem_rd(void *opaque, void *out, size_t len, uint64_t off)
{
	struct memfile *m = opaque;
	size_t n = off < m->len ? (m->len - off < len ? m->len - off : len) : 0;

	m->reads++;
	m->bytes += len;
	if (n)
		memcpy(out, m->buf + off, n);
	memset((uint8_t *)out + n, 0, len - n);
	return 0;
}

/* Without QCOW2_SNAP_REPAIR: qemu-img check's refusals (message, hint line);
 * with it: extra data over 1024 bytes cut (the rest skipped, never read),
 * the entries past 64 MiB dropped, the first dropped one's cut reported. */
START_TEST(check_reader)
{
	size_t cap = 3u << 20;
	uint8_t *buf = calloc(1, cap), *ex = malloc(4000);
	struct qcow2_snapshot_table t;
	char err[256] = "";
	size_t n;

	ck_assert(buf && ex);
	for (int i = 0; i < 4000; i++)
		ex[i] = (uint8_t)(i * 7);
	n = put_entry(buf, 0x10000, 1, "1", "a", 0, 8, ex);            /* incomplete */
	n = (n + 7) & ~7ul;
	n += put_entry(buf + n, 0x20000, 1, "2", "b", 0, 2000, ex);   /* cut to 1024 */
	n = (n + 7) & ~7ul;
	n += put_entry(buf + n, 0x30000, 1, "3", "c", 0, 24, ex);
	struct memfile m = { .buf = buf, .len = n };

	ck_assert_int_eq(qcow2_snapshots_read_check(mem_rd, &m, 0, 3, 1 << 20, 0, &t, err,
						    sizeof(err)), -EFBIG);
	ck_assert_str_eq(err, "Too much extra metadata in snapshot table entry 1\n"
			 "You can force-remove this extra metadata with qemu-img check -r all");
	ck_assert_ptr_null(t.sn);

	ck_assert_int_eq(qcow2_snapshots_read_check(mem_rd, &m, 0, 3, 1 << 20, QCOW2_SNAP_REPAIR,
						    &t, err, sizeof(err)), 0);
	ck_assert_uint_eq(t.nb, 3);
	ck_assert_uint_eq(t.size, n);
	ck_assert_uint_eq(t.discarded, 0);
	ck_assert_uint_eq(t.sn[0].extra_data_size, 8);
	ck_assert_uint_eq(t.sn[0].disk_size, 1 << 20);        /* the image's size */
	ck_assert_uint_eq(t.sn[0].icount, QCOW2_SNAPSHOT_NO_ICOUNT);
	ck_assert_uint_eq(t.sn[1].extra_cut_from, 2000);
	ck_assert_uint_eq(t.sn[1].extra_data_size, QCOW2_MAX_SNAPSHOT_EXTRA);
	ck_assert_uint_eq(t.sn[1].unknown_extra_len, 1000);
	ck_assert_int_eq(memcmp(t.sn[1].unknown_extra, ex + 24, 1000), 0);
	ck_assert_str_eq(t.sn[1].id, "2");
	ck_assert_str_eq(t.sn[2].id, "3");
	ck_assert_uint_eq(t.sn[2].extra_cut_from, 0);
	/* rewritten as QEMU would: 24 bytes of extra data at least, 1024 at most */
	int64_t sz = qcow2_snapshots_size(&t);
	ck_assert_int_eq(sz, 40 + 24 + 2 + 6 + 40 + 1024 + 2 + 6 + 40 + 24 + 2);
	qcow2_snapshots_release(&t);

	/* a cut of 4 GiB is skipped, never read; the entry's bytes pass 2 GiB,
	 * so it is dropped with the one after it, its cut reported */
	qcow2_put_be32(buf + 56 + 36, UINT32_MAX);     /* entry 1 (entry 0 spans 50 bytes) */
	m.reads = 0;
	m.bytes = 0;
	ck_assert_int_eq(qcow2_snapshots_read_check(mem_rd, &m, 0, 3, 1 << 20, QCOW2_SNAP_REPAIR,
						    &t, err, sizeof(err)), 0);
	ck_assert_uint_le(m.bytes, 4u << 20);
	ck_assert_uint_eq(t.nb, 1);
	ck_assert_uint_eq(t.discarded, 2);
	ck_assert_uint_eq(t.discarded_extra, UINT32_MAX);
	ck_assert_uint_eq(t.size, 50);
	qcow2_snapshots_release(&t);

	/* 64 MiB counted with the cut sizes: entries of 40 + 2000 (cut to
	 * 1024) + 2 * 65535 bytes (zeros); the one that passes it is dropped
	 * with the rest, its cut reported */
	size_t per = (40 + 2000 + 2 * 65535 + 7) & ~7ul;
	size_t cut = (40 + 1024 + 2 * 65535 + 7) & ~7ul;
	uint32_t fit = (uint32_t)((QCOW2_MAX_SNAPSHOTS_BYTES - (40 + 1024 + 2 * 65535)) / cut + 1);
	uint32_t nb = fit + 5;
	uint8_t *big = calloc(1, per * nb);
	ck_assert_ptr_nonnull(big);
	for (uint32_t i = 0; i < nb; i++) {
		qcow2_put_be16(big + per * i + 12, 65535);
		qcow2_put_be16(big + per * i + 14, 65535);
		qcow2_put_be32(big + per * i + 36, 2000);
	}
	struct memfile mb = { .buf = big, .len = per * nb };
	ck_assert_int_eq(qcow2_snapshots_read_check(mem_rd, &mb, 0, nb, 1, 0, &t, err,
						    sizeof(err)), -EFBIG);
	ck_assert_str_eq(err, "Too much extra metadata in snapshot table entry 0\n"
			 "You can force-remove this extra metadata with qemu-img check -r all");
	ck_assert_int_eq(qcow2_snapshots_read_check(mem_rd, &mb, 0, nb, 1, QCOW2_SNAP_REPAIR, &t,
						    err, sizeof(err)), 0);
	ck_assert_uint_eq(t.nb, fit);
	ck_assert_uint_eq(t.discarded, 5);
	ck_assert_uint_eq(t.discarded_extra, 2000);
	ck_assert_uint_eq(t.size, per * (fit - 1) + 40 + 2000 + 2 * 65535);
	ck_assert_int_gt(qcow2_snapshots_size(&t), 0);   /* the rewrite fits */
	qcow2_snapshots_release(&t);
	free(big);
	free(buf);
	free(ex);
}
END_TEST

/* The bytes of a table must lie below QEMU's BDRV_MAX_LENGTH (2^63 - 1 GiB),
 * where its block layer fails the read: the open's and the check's readers
 * refuse in QEMU's words, and read no byte past it. */
START_TEST(read_limit)
{
	const uint64_t lim = (1ull << 63) - (1ull << 30);
	struct memfile m = { .buf = NULL, .len = 0 };
	struct qcow2_snapshot_table t;
	char err[256] = "";

	/* one all-zero entry: 40 bytes */
	ck_assert_int_eq(qcow2_snapshots_read(mem_rd, &m, lim - 40, 1, 1, &t, err, sizeof(err)), 0);
	ck_assert_uint_eq(t.nb, 1);
	ck_assert_uint_le(m.bytes, 40);
	qcow2_snapshots_release(&t);
	ck_assert_int_eq(qcow2_snapshots_read(mem_rd, &m, lim - 32, 1, 1, &t, err, sizeof(err)),
			 -EIO);
	ck_assert_str_eq(err, "Failed to read snapshot table: Input/output error");
	ck_assert_int_eq(qcow2_snapshots_read(mem_rd, &m, lim, 1, 1, &t, err, sizeof(err)), -EIO);
	ck_assert_int_eq(qcow2_snapshots_read_check(mem_rd, &m, lim - 40, 1, 1, 0, &t, err,
						    sizeof(err)), 0);
	qcow2_snapshots_release(&t);
	ck_assert_int_eq(qcow2_snapshots_read_check(mem_rd, &m, lim - 32, 1, 1, 0, &t, err,
						    sizeof(err)), -EIO);
	ck_assert_str_eq(err, "Failed to read snapshot table: Input/output error");
}
END_TEST

START_TEST(validate_rules)
{
	struct qcow2_header h = v3_header();
	struct qcow2_snapshot ok = {
		.l1_table_offset = 0x30000, .l1_size = 4, .extra_data_size = 24,
		.id = (char *)"5", .name = (char *)"n",
	}, sn;
	const uint64_t fsize = 0x40000;
	char err[256] = "";

	ck_assert_int_eq(qcow2_snapshot_validate(&ok, 2, &h, fsize, err, sizeof(err)), 0);

	sn = ok;
	sn.l1_table_offset = 0x30200;
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, fsize, err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "snapshot 2 (id \"5\"): l1_table_offset 0x30200"));
	ck_assert_ptr_nonnull(strstr(err, "not cluster aligned"));

	sn = ok;
	sn.l1_size = QCOW2_MAX_L1_BYTES / 8 + 1;
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, UINT64_MAX / 2, err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "snapshot 2 (id \"5\"): l1_size 4194305 is too large"));
	sn.l1_size = QCOW2_MAX_L1_BYTES / 8;
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, UINT64_MAX / 2, err, sizeof(err)), 0);

	sn = ok;
	sn.l1_size = (uint32_t)((fsize - 0x30000) / 8 + 1);
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, fsize, err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "L1 table (l1_table_offset 0x30000, l1_size 8193) is not "
					  "inside the file"));
	sn.l1_size--;
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, fsize, err, sizeof(err)), 0);
	sn = ok;
	sn.l1_table_offset = 0;
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, fsize, err, sizeof(err)), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "(l1_table_offset 0, l1_size 4)"));
	sn.l1_table_offset = 0x7fff0000ull << 16;
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, fsize, err, sizeof(err)), -EINVAL);
	sn.l1_size = 0; /* an empty L1 table may sit anywhere */
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, fsize, err, sizeof(err)), 0);

	/* v3 without disk_size: not an open refusal, a check finding */
	sn = ok;
	sn.extra_data_size = 15;
	ck_assert_int_eq(qcow2_snapshot_validate(&sn, 2, &h, fsize, err, sizeof(err)), 0);
	ck_assert(qcow2_snapshot_incomplete(&sn, &h));
	sn.extra_data_size = 16;
	ck_assert(!qcow2_snapshot_incomplete(&sn, &h));
	sn.extra_data_size = 0;
	h.version = 2; /* a v2 image needs no extra data */
	ck_assert(!qcow2_snapshot_incomplete(&sn, &h));
}
END_TEST

START_TEST(find_rules)
{
	struct qcow2_snapshot sn[4] = {
		{ .id = (char *)"1", .name = (char *)"first" },
		{ .id = (char *)"2", .name = (char *)"1" },
		{ .id = (char *)"10", .name = (char *)"twin" },
		{ .id = (char *)"3", .name = (char *)"twin" },
	};
	struct qcow2_snapshot_table t = { .sn = sn, .nb = 4 };
	char id[16];

	/* id first: "1" is snapshot 0's id although snapshot 1 is named "1" */
	ck_assert_int_eq(qcow2_snapshot_find_id_or_name(&t, "1"), 0);
	ck_assert_int_eq(qcow2_snapshot_find_id_or_name(&t, "first"), 0);
	ck_assert_int_eq(qcow2_snapshot_find_id_or_name(&t, "twin"), 2);
	ck_assert_int_eq(qcow2_snapshot_find_id_or_name(&t, "3"), 3);
	ck_assert_int_eq(qcow2_snapshot_find_id_or_name(&t, "4"), -ENOENT);
	ck_assert_int_eq(qcow2_snapshot_find_id_or_name(&t, ""), -ENOENT);
	/* by name only (qemu-img snapshot -d): "1" is snapshot 1 */
	ck_assert_int_eq(qcow2_snapshot_find_name(&t, "1"), 1);
	ck_assert_int_eq(qcow2_snapshot_find_name(&t, "2"), -ENOENT);
	ck_assert_int_eq(qcow2_snapshot_find_name(&t, "twin"), 2);
	/* id and name */
	ck_assert_int_eq(qcow2_snapshot_find_id_and_name(&t, "3", "twin"), 3);
	ck_assert_int_eq(qcow2_snapshot_find_id_and_name(&t, "3", "first"), -ENOENT);
	ck_assert_int_eq(qcow2_snapshot_find_id_and_name(&t, NULL, NULL), -ENOENT);
	/* new ids: one past the largest number */
	qcow2_snapshot_new_id(&t, id, sizeof(id));
	ck_assert_str_eq(id, "11");
	t.nb = 0;
	qcow2_snapshot_new_id(&t, id, sizeof(id));
	ck_assert_str_eq(id, "1");
	ck_assert_int_eq(qcow2_snapshot_find_id_or_name(&t, "1"), -ENOENT);
}
END_TEST

/* A fresh 16 MiB v3 image with the table of t appended in a new cluster;
 * the table's clusters get no refcount (read-only opens do not look). */
static uint8_t *image_with(const struct qcow2_snapshot_table *t, size_t *len)
{
	struct qcow2_create_opts o = { .size = 16 << 20, .version = 3, .refcount_order = 4 };
	uint8_t *img;
	size_t n;

	ck_assert_int_eq(qcow2_create_image(&o, &img, &n, NULL, 0), 0);
	int64_t ts = qcow2_snapshots_size(t);
	ck_assert_int_gt(ts, 0);
	size_t st = (n + 65535) & ~(size_t)65535;
	img = realloc(img, st + (size_t)ts);
	ck_assert_ptr_nonnull(img);
	memset(img + n, 0, st - n);
	ck_assert_int_eq(qcow2_snapshots_serialize(t, img + st, (size_t)ts), 0);
	qcow2_put_be32(img + 60, t->nb);
	qcow2_put_be64(img + 64, st);
	*len = st + (size_t)ts;
	return img;
}

static int open_sim(struct event_base *b, struct qsm_sim *sim, bool ro, struct qsm_image **img,
		    char *err, size_t errlen)
{
	struct qsm_open_opts oo = { .struct_size = sizeof(oo), .read_only = ro, .work_threads = -1 };
	struct qsm_io *io;

	ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
	return qsm_open_io(b, io, &oo, img, err, errlen);
}

START_TEST(open_lists)
{
	struct qcow2_snapshot sn[2] = {
		{ .id = (char *)"1", .name = (char *)"alpha", .date_sec = 1700000000,
		  .date_nsec = 5000, .vm_clock_nsec = 3723456789000ull, .vm_state_size = 5ull << 30,
		  .disk_size = 16 << 20, .icount = QCOW2_SNAPSHOT_NO_ICOUNT },
		{ .id = (char *)"7", .name = (char *)"", .disk_size = 8 << 20, .icount = 42 },
	};
	struct qcow2_snapshot_table t = { .sn = sn, .nb = 2 };
	struct event_base *b = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(1);
	struct qsm_image *img = NULL;
	char err[256] = "";
	size_t len;
	uint8_t *buf = image_with(&t, &len);

	ck_assert_int_eq(qsm_sim_load_buf(sim, buf, len), 0);
	ck_assert_msg(open_sim(b, sim, true, &img, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(qsm_snapshot_count(img), 2);
	struct qsm_snapshot_info si = { .struct_size = sizeof(si) };
	ck_assert_int_eq(qsm_snapshot_get(img, 0, &si), 0);
	ck_assert_str_eq(si.id, "1");
	ck_assert_str_eq(si.name, "alpha");
	ck_assert_uint_eq(si.vm_state_size, 5ull << 30);
	ck_assert_uint_eq(si.date_sec, 1700000000);
	ck_assert_uint_eq(si.date_nsec, 5000);
	ck_assert_uint_eq(si.vm_clock_nsec, 3723456789000ull);
	ck_assert_uint_eq(si.icount, QSM_SNAPSHOT_NO_ICOUNT);
	ck_assert_uint_eq(si.disk_size, 16 << 20);
	ck_assert_int_eq(qsm_snapshot_get(img, 1, &si), 0);
	ck_assert_str_eq(si.id, "7");
	ck_assert_str_eq(si.name, "");
	ck_assert_uint_eq(si.icount, 42);
	ck_assert_uint_eq(si.disk_size, 8 << 20);
	ck_assert_int_eq(qsm_snapshot_get(img, 2, &si), -ENOENT);
	/* struct_size: 0 or short refused; a longer one zeroed past ours */
	struct { struct qsm_snapshot_info s; uint64_t more; } big;
	memset(&big, 0xff, sizeof(big));
	big.s.struct_size = sizeof(big);
	ck_assert_int_eq(qsm_snapshot_get(img, 0, &big.s), 0);
	ck_assert_uint_eq(big.more, 0);
	ck_assert_str_eq(big.s.name, "alpha");
	si.struct_size = 0;
	ck_assert_int_eq(qsm_snapshot_get(img, 0, &si), -EINVAL);
	ck_assert_int_eq(qsm_close(img), 0);
	qsm_sim_free(sim);
	event_base_free(b);
	free(buf);
}
END_TEST

/* Each open-time rule broken on its own: the read-write open is refused
 * with the field named, and the disk is unchanged. */
START_TEST(open_refuses)
{
	static const struct {
		uint64_t l1_off;
		uint32_t l1_size, extra_patch;
		const char *want;
	} cases[] = {
		{ 0x30200, 1, 0, "l1_table_offset 0x30200 is not cluster aligned" },
		{ 0x30000, QCOW2_MAX_L1_BYTES / 8 + 1, 0, "l1_size 4194305 is too large" },
		{ 0x7ff0000, 1, 0, "is not inside the file" },
		{ 0x30000, 1, QCOW2_MAX_SNAPSHOT_EXTRA + 1, "Too much extra metadata in snapshot table entry 1" },
	};
	for (size_t k = 0; k < QSM_ARRAY_SIZE(cases); k++) {
		struct qcow2_snapshot sn[2] = {
			{ .id = (char *)"1", .name = (char *)"ok", .l1_table_offset = 0x30000, .l1_size = 1 },
			{ .id = (char *)"2", .name = (char *)"bad", .l1_table_offset = cases[k].l1_off,
			  .l1_size = cases[k].l1_size },
		};
		struct qcow2_snapshot_table t = { .sn = sn, .nb = 2 };
		struct event_base *b = event_base_new();
		struct qsm_sim *sim = qsm_sim_new(1);
		struct qsm_image *img = NULL;
		char err[256] = "";
		size_t len;
		uint8_t *buf = image_with(&t, &len), *after = malloc(len);
		if (cases[k].extra_patch) {
			uint64_t st = qcow2_be64(buf + 64);
			size_t e1 = (40 + 24 + 1 + 2 + 7) & ~7u;
			qcow2_put_be32(buf + st + e1 + 36, cases[k].extra_patch);
		}
		ck_assert_int_eq(qsm_sim_load_buf(sim, buf, len), 0);
		int r = open_sim(b, sim, false, &img, err, sizeof(err));
		ck_assert_msg(r < 0, "case %zu opened", k);
		ck_assert_msg(strstr(err, cases[k].want) != NULL, "case %zu: %s", k, err);
		if (!cases[k].extra_patch)
			ck_assert_msg(strstr(err, "snapshot 1 (id \"2\")") != NULL, "case %zu: %s", k, err);
		struct qsm_io *io;
		ck_assert_int_eq(qsm_io_open_sim(b, sim, 0, &io), 0);
		ck_assert_int_eq(qsm_io_pread_sync(io, after, len, 0), 0);
		uint64_t size;
		ck_assert_int_eq(qsm_io_get_size(io, &size), 0);
		ck_assert_uint_eq(size, len);
		ck_assert_mem_eq(after, buf, len);
		qsm_io_close(io);
		qsm_sim_free(sim);
		event_base_free(b);
		free(buf);
		free(after);
	}
}
END_TEST

static Suite *snapshot_suite(void)
{
	Suite *s = suite_create("snapshot");
	TCase *tc = tcase_create("core");
	tcase_add_test(tc, qemu_round_trip);
	tcase_add_loop_test(tc, short_buffer, 1, 64);
	tcase_add_test(tc, extra_data);
	tcase_add_test(tc, refuse_extra_too_large);
	tcase_add_test(tc, refuse_table_too_big);
	tcase_add_test(tc, refuse_too_many);
	tcase_add_test(tc, check_reader);
	tcase_add_test(tc, read_limit);
	tcase_add_test(tc, validate_rules);
	tcase_add_test(tc, find_rules);
	suite_add_tcase(s, tc);
	tc = tcase_create("open");
	tcase_add_test(tc, open_lists);
	tcase_add_test(tc, open_refuses);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(snapshot_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
