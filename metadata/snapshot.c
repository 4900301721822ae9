/*
 * metadata/snapshot.c: the qcow2 snapshot table (metadata/snapshot.h).
 *
 * Parsing follows qcow2_read_snapshots() of QEMU 7.2 entry by entry and in
 * its order: align to 8, the fixed 40 bytes, the extra data size bound
 * (1024), the known extra data (vm_state_size_large at >= 8 bytes,
 * disk_size at >= 16, icount at >= 24), the unknown rest kept, id, name,
 * then the running table length bound (64 MiB).  Every length read from
 * the buffer is bounded (u16 strings, extra <= 1024) before it is used for
 * an allocation or an offset, so a hostile table costs at most the bytes it
 * really occupies.  The buffer may be shorter than the table (its size is
 * not in the header): the parse then asks for more (-ENODATA, *need).
 *
 * Serializing follows qcow2_write_snapshots() of QEMU 7.2, so a table
 * QEMU wrote comes back byte for byte.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/util.h"
#include "metadata/snapshot.h"

/* The longest entry: header, extra data, id and name at their bounds. */
#define ENTRY_MAX (QCOW2_SNAPSHOT_HDR + QCOW2_MAX_SNAPSHOT_EXTRA + 2u * 65535u)

/* QEMU's BDRV_MAX_LENGTH (INT64_MAX aligned down to 1 GiB): its block layer
 * fails a read that reaches past it (-EIO) before any driver sees it, so a
 * table whose bytes reach past it is refused ("Failed to read snapshot
 * table: Input/output error"), though the header check let its offset by. */
#define BDRV_MAX_LEN (INT64_MAX & ~((1ull << 30) - 1))

void qcow2_snapshots_release(struct qcow2_snapshot_table *t)
{
	for (uint32_t i = 0; t->sn && i < t->nb; i++) {
		free(t->sn[i].id);
		free(t->sn[i].name);
		free(t->sn[i].unknown_extra);
	}
	free(t->sn);
	memset(t, 0, sizeof(*t));
}

/* Ask for the bytes up to `end`: at least double, never past the bound. */
static int want(size_t len, uint64_t end, size_t *need)
{
	uint64_t n = end > 2 * (uint64_t)len ? end : 2 * (uint64_t)len;
	uint64_t cap = (uint64_t)QCOW2_MAX_SNAPSHOTS_BYTES + 8 + ENTRY_MAX;

	if (need)
		*need = (size_t)(n < cap ? n : cap);
	return -ENODATA;
}

static char *dup_str(const uint8_t *p, size_t n)
{
	char *s = malloc(n + 1);

	if (s) {
		memcpy(s, p, n);
		s[n] = '\0';
	}
	return s;
}

/* An entry's extra data, `extra` bytes at e (at most what is kept): the
 * 64-bit VM state size, disk size and icount when present (disk size
 * otherwise the image's, icount QCOW2_SNAPSHOT_NO_ICOUNT), and any bytes
 * past them kept as unknown extra data.  0 or -ENOMEM. */
static int parse_extra(struct qcow2_snapshot *sn, const uint8_t *e, uint32_t extra,
		       uint64_t virtual_size)
{
	if (extra >= 8)
		sn->vm_state_size = qcow2_be64(e);
	sn->disk_size = extra >= 16 ? qcow2_be64(e + 8) : virtual_size;
	sn->icount = extra >= 24 ? qcow2_be64(e + 16) : QCOW2_SNAPSHOT_NO_ICOUNT;
	if (extra > QCOW2_SNAPSHOT_EXTRA) {
		sn->unknown_extra_len = extra - QCOW2_SNAPSHOT_EXTRA;
		sn->unknown_extra = malloc(sn->unknown_extra_len);
		if (!sn->unknown_extra)
			return -ENOMEM;
		memcpy(sn->unknown_extra, e + QCOW2_SNAPSHOT_EXTRA, sn->unknown_extra_len);
	}
	return 0;
}

int qcow2_snapshots_parse(const uint8_t *buf, size_t len, uint32_t nb, uint64_t virtual_size,
			  struct qcow2_snapshot_table *t, size_t *need, char *err, size_t errlen)
{
	uint64_t off = 0;
	int ret;

	memset(t, 0, sizeof(*t));
	if (need)
		*need = 0;
	if (nb == 0)
		return 0;
	if (nb > QCOW2_MAX_SNAPSHOTS) {
		/* qcow2_validate_table's words (metadata/header.c refuses it first) */
		qsm_set_err(err, errlen, "Snapshot table too large");
		return -EFBIG;
	}
	t->sn = calloc(nb, sizeof(*t->sn));
	if (!t->sn)
		return -ENOMEM;
	t->nb = nb;
	for (uint32_t i = 0; i < nb; i++) {
		struct qcow2_snapshot *sn = &t->sn[i];
		const uint8_t *e;
		uint32_t extra;
		uint16_t idl, nml;

		off = (off + 7) & ~7ull;
		if (off + QCOW2_SNAPSHOT_HDR > len) {
			ret = want(len, off + QCOW2_SNAPSHOT_HDR, need);
			goto fail;
		}
		e = buf + off;
		sn->l1_table_offset = qcow2_be64(e);
		sn->l1_size = qcow2_be32(e + 8);
		idl = qcow2_be16(e + 12);
		nml = qcow2_be16(e + 14);
		sn->date_sec = qcow2_be32(e + 16);
		sn->date_nsec = qcow2_be32(e + 20);
		sn->vm_clock_nsec = qcow2_be64(e + 24);
		sn->vm_state_size32 = qcow2_be32(e + 32);
		sn->vm_state_size = sn->vm_state_size32;
		extra = qcow2_be32(e + 36);
		sn->extra_data_size = extra;
		if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
			qsm_set_err(err, errlen, "Too much extra metadata in snapshot table entry %" PRIu32
				" (snapshot %" PRIu32 ": extra_data_size %" PRIu32 " > %u)", i, i, extra,
				QCOW2_MAX_SNAPSHOT_EXTRA);
			ret = -EFBIG;
			goto fail;
		}
		uint64_t end = off + QCOW2_SNAPSHOT_HDR + extra + idl + nml;
		if (end > len) {
			ret = want(len, end, need);
			goto fail;
		}
		e += QCOW2_SNAPSHOT_HDR;
		if ((ret = parse_extra(sn, e, extra, virtual_size)) < 0)
			goto fail;
		e += extra;
		sn->id = dup_str(e, idl);
		sn->name = dup_str(e + idl, nml);
		if (!sn->id || !sn->name) {
			ret = -ENOMEM;
			goto fail;
		}
		off = end;
		if (off > QCOW2_MAX_SNAPSHOTS_BYTES) {
			qsm_set_err(err, errlen, "Snapshot table is too big (%" PRIu64 " bytes at "
				"snapshot %" PRIu32 " (id \"%s\"); the limit is %u)", off, i, sn->id,
				QCOW2_MAX_SNAPSHOTS_BYTES);
			ret = -EFBIG;
			goto fail;
		}
	}
	t->size = off;
	return 0;

fail:
	qcow2_snapshots_release(t);
	return ret;
}

int qcow2_snapshots_read(qcow2_snapshot_reader rd, void *opaque, uint64_t offset, uint32_t nb,
			 uint64_t virtual_size, struct qcow2_snapshot_table *t, char *err,
			 size_t errlen)
{
	/* the bytes QEMU can read at all (the parse asks only for bytes it needs) */
	uint64_t lim = offset < BDRV_MAX_LEN ? BDRV_MAX_LEN - offset : 0;
	size_t have = 0, need = nb ? 64u << 10 : 0;
	uint8_t *buf = NULL;
	int ret;

	memset(t, 0, sizeof(*t));
	for (;;) {
		if (need > lim)
			need = (size_t)lim;
		if (need > have) {
			uint8_t *nbuf = realloc(buf, need);
			if (!nbuf) {
				ret = -ENOMEM;
				break;
			}
			buf = nbuf;
			if ((ret = rd(opaque, buf + have, need - have, offset + have)) < 0)
				break;
			have = need;
		}
		ret = qcow2_snapshots_parse(buf, have, nb, virtual_size, t, &need, err, errlen);
		if (ret != -ENODATA)
			break;
		if (need > lim && have >= lim) {  /* the bytes it needs lie past the limit */
			qsm_set_err(err, errlen, "Failed to read snapshot table: %s", strerror(EIO));
			ret = -EIO;
			break;
		}
		if (need <= have && need <= lim) { /* cannot happen: the parse always asks for more */
			ret = -EIO;
			break;
		}
	}
	free(buf);
	return ret;
}

/* --- the check's reader ---------------------------------------------------- */

/* A window of file bytes: at most WIN_MIN bytes beyond what is asked, so a
 * table is read in a few large reads and skipped bytes are never read. */
#define WIN_MIN (1u << 20)

struct win {
	qcow2_snapshot_reader rd;
	void *opaque;
	uint8_t *buf;
	size_t cap, len;
	uint64_t start;
};

/* Point *p at len bytes of the file at off (len <= ENTRY_MAX). */
static int win_get(struct win *w, uint64_t off, size_t len, const uint8_t **p)
{
	static const uint8_t none[1];
	int ret;

	if (!len) {
		*p = none;
		return 0;
	}
	if (off > BDRV_MAX_LEN || len > BDRV_MAX_LEN - off)
		return -EIO;
	if (!(off >= w->start && off - w->start + len <= w->len)) {
		size_t n = len > WIN_MIN ? len : WIN_MIN;
		if (n > BDRV_MAX_LEN - off)
			n = (size_t)(BDRV_MAX_LEN - off);
		if (n > w->cap) {
			uint8_t *nb = realloc(w->buf, n);
			if (!nb)
				return -ENOMEM;
			w->buf = nb;
			w->cap = n;
		}
		w->len = 0;
		if ((ret = w->rd(w->opaque, w->buf, n, off)) < 0)
			return ret;
		w->start = off;
		w->len = n;
	}
	*p = w->buf + (off - w->start);
	return 0;
}

int qcow2_snapshots_read_check(qcow2_snapshot_reader rd, void *opaque, uint64_t offset,
			       uint32_t nb, uint64_t virtual_size, unsigned flags,
			       struct qcow2_snapshot_table *t, char *err, size_t errlen)
{
	struct win w = { .rd = rd, .opaque = opaque };
	bool repair = flags & QCOW2_SNAP_REPAIR;
	uint64_t off = offset, tlen = 0;  /* file offset; table length with cut extra data */
	const uint8_t *e;
	int ret = 0;

	memset(t, 0, sizeof(*t));
	if (nb == 0)
		return 0;
	if (nb > QCOW2_MAX_SNAPSHOTS)
		return -EFBIG;
	t->sn = calloc(nb, sizeof(*t->sn));
	if (!t->sn)
		return -ENOMEM;
	t->nb = nb;
	for (uint32_t i = 0; i < nb; i++) {
		struct qcow2_snapshot *sn = &t->sn[i];
		uint64_t pre = off;
		uint32_t extra, keep;
		uint16_t idl, nml;

		tlen = (tlen + 7) & ~7ull;
		off = (off + 7) & ~7ull;
		if ((ret = win_get(&w, off, QCOW2_SNAPSHOT_HDR, &e)) < 0)
			goto rd_fail;
		sn->l1_table_offset = qcow2_be64(e);
		sn->l1_size = qcow2_be32(e + 8);
		idl = qcow2_be16(e + 12);
		nml = qcow2_be16(e + 14);
		sn->date_sec = qcow2_be32(e + 16);
		sn->date_nsec = qcow2_be32(e + 20);
		sn->vm_clock_nsec = qcow2_be64(e + 24);
		sn->vm_state_size32 = qcow2_be32(e + 32);
		sn->vm_state_size = sn->vm_state_size32;
		extra = qcow2_be32(e + 36);
		off += QCOW2_SNAPSHOT_HDR;
		keep = extra;
		if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
			if (!repair) {
				qsm_set_err(err, errlen, "Too much extra metadata in snapshot table "
					"entry %" PRIu32 "\nYou can force-remove this extra metadata "
					"with qemu-img check -r all", i);
				ret = -EFBIG;
				goto fail;
			}
			sn->extra_cut_from = extra;
			keep = QCOW2_MAX_SNAPSHOT_EXTRA;
		}
		sn->extra_data_size = keep;
		if ((ret = win_get(&w, off, keep, &e)) < 0)
			goto rd_fail;
		if ((ret = parse_extra(sn, e, keep, virtual_size)) < 0)
			goto fail;
		off += extra;   /* the bytes past a cut are skipped, never read */
		if ((ret = win_get(&w, off, (size_t)idl + nml, &e)) < 0)
			goto rd_fail;
		sn->id = dup_str(e, idl);
		sn->name = dup_str(e + idl, nml);
		if (!sn->id || !sn->name) {
			ret = -ENOMEM;
			goto fail;
		}
		off += (uint64_t)idl + nml;
		tlen += QCOW2_SNAPSHOT_HDR + keep + idl + nml;
		if (tlen > QCOW2_MAX_SNAPSHOTS_BYTES || off - offset > INT32_MAX) {
			if (!repair) {
				qsm_set_err(err, errlen, "Snapshot table is too big\nYou can "
					"force-remove all %" PRIu32 " overhanging snapshots with "
					"qemu-img check -r all", nb - i);
				ret = -EFBIG;
				goto fail;
			}
			/* this entry and the rest are dropped; their clusters leak
			 * (the refcount check that follows frees them) */
			t->discarded = nb - i;
			t->discarded_extra = sn->extra_cut_from;
			for (uint32_t k = i; k < nb; k++) {
				free(t->sn[k].id);
				free(t->sn[k].name);
				free(t->sn[k].unknown_extra);
				memset(&t->sn[k], 0, sizeof(t->sn[k]));
			}
			t->nb = i;
			off = pre;
			break;
		}
	}
	t->size = off - offset;
	free(w.buf);
	return 0;

rd_fail:
	qsm_set_err(err, errlen, "Failed to read snapshot table: %s", strerror(-ret));
fail:
	free(w.buf);
	t->nb = nb;
	qcow2_snapshots_release(t);
	return ret;
}

int qcow2_snapshot_validate(const struct qcow2_snapshot *sn, uint32_t i,
			    const struct qcow2_header *h, uint64_t file_size, char *err,
			    size_t errlen)
{
	uint64_t cs = qcow2_cluster_size(h);

	if (sn->l1_table_offset & (cs - 1)) {
		qsm_set_err(err, errlen, "snapshot %" PRIu32 " (id \"%s\"): l1_table_offset %#" PRIx64
			" is not cluster aligned", i, sn->id, sn->l1_table_offset);
		return -EINVAL;
	}
	if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
		qsm_set_err(err, errlen, "snapshot %" PRIu32 " (id \"%s\"): l1_size %" PRIu32
			" is too large (the limit is %u entries)", i, sn->id, sn->l1_size,
			QCOW2_MAX_L1_BYTES / 8);
		return -EINVAL;
	}
	if (sn->l1_size && (sn->l1_table_offset == 0 || sn->l1_table_offset > file_size ||
			    (uint64_t)sn->l1_size * 8 > file_size - sn->l1_table_offset)) {
		qsm_set_err(err, errlen, "snapshot %" PRIu32 " (id \"%s\"): L1 table (l1_table_offset "
			"%#" PRIx64 ", l1_size %" PRIu32 ") is not inside the file (%" PRIu64 " bytes)",
			i, sn->id, sn->l1_table_offset, sn->l1_size, file_size);
		return -EINVAL;
	}
	return 0;
}

bool qcow2_snapshot_incomplete(const struct qcow2_snapshot *sn, const struct qcow2_header *h)
{
	return h->version >= 3 && sn->extra_data_size < QCOW2_SNAPSHOT_EXTRA_V3;
}

static uint32_t extra_len(const struct qcow2_snapshot *sn)
{
	return QCOW2_SNAPSHOT_EXTRA + (sn->unknown_extra ? sn->unknown_extra_len : 0);
}

int64_t qcow2_snapshots_size(const struct qcow2_snapshot_table *t)
{
	uint64_t off = 0;

	for (uint32_t i = 0; i < t->nb; i++) {
		const struct qcow2_snapshot *sn = &t->sn[i];
		size_t idl = strlen(sn->id), nml = strlen(sn->name);

		if (idl > UINT16_MAX || nml > UINT16_MAX)
			return -EINVAL;
		off = (off + 7) & ~7ull;
		off += QCOW2_SNAPSHOT_HDR + extra_len(sn) + idl + nml;
		if (off > QCOW2_MAX_SNAPSHOTS_BYTES)
			return -EFBIG;
	}
	return (int64_t)off;
}

int qcow2_snapshots_serialize(const struct qcow2_snapshot_table *t, uint8_t *out, size_t len)
{
	int64_t size = qcow2_snapshots_size(t);
	uint64_t off = 0;

	if (size < 0)
		return (int)size;
	if ((uint64_t)size > len)
		return -ENOSPC;
	memset(out, 0, (size_t)size);
	for (uint32_t i = 0; i < t->nb; i++) {
		const struct qcow2_snapshot *sn = &t->sn[i];
		size_t idl = strlen(sn->id), nml = strlen(sn->name);
		uint32_t extra = extra_len(sn);
		uint8_t *e;

		off = (off + 7) & ~7ull;
		e = out + off;
		qcow2_put_be64(e, sn->l1_table_offset);
		qcow2_put_be32(e + 8, sn->l1_size);
		qcow2_put_be16(e + 12, (uint16_t)idl);
		qcow2_put_be16(e + 14, (uint16_t)nml);
		qcow2_put_be32(e + 16, sn->date_sec);
		qcow2_put_be32(e + 20, sn->date_nsec);
		qcow2_put_be64(e + 24, sn->vm_clock_nsec);
		/* an older reader sees a disk-only snapshot rather than a truncated state */
		qcow2_put_be32(e + 32, sn->vm_state_size <= UINT32_MAX ? (uint32_t)sn->vm_state_size : 0);
		qcow2_put_be32(e + 36, extra);
		e += QCOW2_SNAPSHOT_HDR;
		qcow2_put_be64(e, sn->vm_state_size);
		qcow2_put_be64(e + 8, sn->disk_size);
		qcow2_put_be64(e + 16, sn->icount);
		if (extra > QCOW2_SNAPSHOT_EXTRA)
			memcpy(e + QCOW2_SNAPSHOT_EXTRA, sn->unknown_extra, extra - QCOW2_SNAPSHOT_EXTRA);
		e += extra;
		memcpy(e, sn->id, idl);
		memcpy(e + idl, sn->name, nml);
		off += QCOW2_SNAPSHOT_HDR + extra + idl + nml;
	}
	return 0;
}

int qcow2_snapshot_find_id_and_name(const struct qcow2_snapshot_table *t, const char *id,
				    const char *name)
{
	if (!id && !name)
		return -ENOENT;
	for (uint32_t i = 0; i < t->nb; i++) {
		if ((!id || strcmp(t->sn[i].id, id) == 0) &&
		    (!name || strcmp(t->sn[i].name, name) == 0))
			return (int)i;
	}
	return -ENOENT;
}

int qcow2_snapshot_find_id_or_name(const struct qcow2_snapshot_table *t, const char *s)
{
	int i = qcow2_snapshot_find_id_and_name(t, s, NULL);

	return i >= 0 ? i : qcow2_snapshot_find_id_and_name(t, NULL, s);
}

int qcow2_snapshot_find_name(const struct qcow2_snapshot_table *t, const char *name)
{
	return qcow2_snapshot_find_id_and_name(t, NULL, name);
}

void qcow2_snapshot_new_id(const struct qcow2_snapshot_table *t, char *buf, size_t len)
{
	unsigned long max = 0;

	for (uint32_t i = 0; i < t->nb; i++) {
		unsigned long id = strtoul(t->sn[i].id, NULL, 10);
		if (id > max)
			max = id;
	}
	snprintf(buf, len, "%lu", max + 1);
}
