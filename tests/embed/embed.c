/*
 * tests/embed/embed.c: a program that embeds libqsm as a distribution user
 * would, built only from the INSTALLED headers and `pkg-config qsm`
 * (tests/embed/run.sh builds it against an install in a temporary prefix,
 * once with the shared library and once static).
 *
 * It brings its own storage: an in-memory disk implementing the public
 * backend interface (<qsm/qsm_io.h>), creates a qcow2 image on it
 * (qsm_create_io), opens it (qsm_open_io), and then drives everything
 * asynchronously from completion callbacks on its own libevent loop:
 * write -> read back and verify -> flush -> close.  Afterwards the public
 * checker (qsm_check_io) must find the image on the memory disk clean.
 * Exit 0 on success, 1 with a message otherwise.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>
#include <qsm/qsm.h>
#include <qsm/qsm_io.h>

#define DISK_CAP (32u << 20)

static void die(const char *what, int ret)
{
	fprintf(stderr, "embed: %s: %s\n", what, ret < 0 ? qsm_strerror(ret) : "failed");
	exit(1);
}

/* --- The in-memory backend ---------------------------------------------------- */

struct memdisk {
	unsigned char *data;
	uint64_t size;
	unsigned submitted;
	int closed;
};

static int md_read(struct memdisk *d, void *buf, size_t len, uint64_t off)
{
	size_t have = off < d->size ? (size_t)(d->size - off < len ? d->size - off : len) : 0;
	if (have)
		memcpy(buf, d->data + off, have);
	memset((char *)buf + have, 0, len - have); /* past the end: zeros */
	return 0;
}

static int md_write(struct memdisk *d, const void *buf, size_t len, uint64_t off)
{
	if (off > DISK_CAP || len > DISK_CAP - off)
		return -ENOSPC;
	memcpy(d->data + off, buf, len);
	if (off + len > d->size)
		d->size = off + len;
	return 0;
}

static int md_resize(struct memdisk *d, uint64_t size)
{
	if (size > DISK_CAP)
		return -EFBIG;
	if (size < d->size)
		memset(d->data + size, 0, d->size - size);
	d->size = size;
	return 0;
}

static int md_exec(struct memdisk *d, const struct qsm_io_req *req)
{
	uint64_t off = req->offset;
	int ret = 0;

	switch (req->op) {
	case QSM_IO_READ:
	case QSM_IO_WRITE:
		for (int i = 0; i < req->iovcnt && !ret; i++) {
			ret = req->op == QSM_IO_READ
				      ? md_read(d, req->iov[i].iov_base, req->iov[i].iov_len, off)
				      : md_write(d, req->iov[i].iov_base, req->iov[i].iov_len, off);
			off += req->iov[i].iov_len;
		}
		return ret;
	case QSM_IO_FLUSH:
		return 0;
	case QSM_IO_ZERO:
	case QSM_IO_DISCARD:
		if (off > DISK_CAP || req->len > DISK_CAP - off)
			return -ENOSPC;
		memset(d->data + off, 0, req->len);
		if (req->op == QSM_IO_ZERO && off + req->len > d->size)
			d->size = off + req->len;
		return 0;
	case QSM_IO_TRUNCATE:
		return md_resize(d, off);
	case QSM_IO_PREALLOC:
		if (off + req->len > d->size)
			return md_resize(d, off + req->len);
		return 0;
	}
	return -EINVAL;
}

/* Runs everything at once and posts the completion: the library calls the
 * engine back later, on the loop (contract 1 of qsm_io.h). */
static void md_submit(struct qsm_io *io, struct qsm_io_req *req)
{
	struct memdisk *d = qsm_io_priv(io);
	d->submitted++;
	qsm_io_complete(req, md_exec(d, req));
}

static int md_pread_sync(struct qsm_io *io, void *buf, size_t len, uint64_t off)
{
	return md_read(qsm_io_priv(io), buf, len, off);
}

static int md_pwrite_sync(struct qsm_io *io, const void *buf, size_t len, uint64_t off)
{
	return md_write(qsm_io_priv(io), buf, len, off);
}

static int md_flush_sync(struct qsm_io *io)
{
	(void)io; /* memory is as durable as it gets */
	return 0;
}

static int md_truncate_sync(struct qsm_io *io, uint64_t size)
{
	return md_resize(qsm_io_priv(io), size);
}

static int md_get_size(struct qsm_io *io, uint64_t *size)
{
	*size = ((struct memdisk *)qsm_io_priv(io))->size;
	return 0;
}

static void md_close(struct qsm_io *io)
{
	((struct memdisk *)qsm_io_priv(io))->closed++;
}

static const struct qsm_io_ops md_ops = {
	.name = "embed-mem",
	.submit = md_submit,
	.pread_sync = md_pread_sync,
	.pwrite_sync = md_pwrite_sync,
	.flush_sync = md_flush_sync,
	.truncate_sync = md_truncate_sync,
	.get_size = md_get_size,
	.close = md_close,
};

/* --- The asynchronous session ---------------------------------------------- */

#define IO_OFFSET (3u * 65536 + 4096 + 512) /* unaligned: COW head and tail */
#define IO_LEN (100u * 1024)

struct session {
	struct event_base *base;
	struct qsm_image *img;
	unsigned char wbuf[IO_LEN], rbuf[IO_LEN];
	struct iovec wiov, riov;
	int stage;      /* 1 written, 2 read and verified, 3 flushed, 4 closed */
	int error;
};

static void fail(struct session *s, const char *what, int ret)
{
	fprintf(stderr, "embed: %s: %s\n", what, qsm_strerror(ret));
	s->error = ret ? ret : -EIO;
	event_base_loopbreak(s->base);
}

/* The image is freed by now; the loop runs dry and main() checks. */
static void close_cb(void *opaque, int ret)
{
	struct session *s = opaque;
	if (ret < 0)
		{ fail(s, "close", ret); return; }
	s->img = NULL;
	s->stage = 4;
}

static void flush_cb(void *opaque, int ret)
{
	struct session *s = opaque;
	if (ret < 0)
		{ fail(s, "flush", ret); return; }
	s->stage = 3;
	/* From inside a completion callback: the blocking qsm_close says so. */
	if ((ret = qsm_close(s->img)) != -EDEADLK)
		{ fail(s, "qsm_close from a callback did not refuse", ret ? ret : -EIO); return; }
	if ((ret = qsm_close_async(s->img, close_cb, s)) < 0)
		fail(s, "qsm_close_async", ret);
}

static void read_cb(void *opaque, int ret)
{
	struct session *s = opaque;
	if (ret < 0)
		{ fail(s, "read", ret); return; }
	if (memcmp(s->rbuf, s->wbuf, IO_LEN) != 0)
		{ fail(s, "read back: data differs from what was written", -EIO); return; }
	s->stage = 2;
	if ((ret = qsm_flush(s->img, flush_cb, s)) < 0)
		fail(s, "submit flush", ret);
}

static void write_cb(void *opaque, int ret)
{
	struct session *s = opaque;
	if (ret < 0)
		{ fail(s, "write", ret); return; }
	s->stage = 1;
	s->riov = (struct iovec){ s->rbuf, IO_LEN };
	if ((ret = qsm_readv(s->img, IO_OFFSET, &s->riov, 1, read_cb, s)) < 0)
		fail(s, "submit read", ret);
}

int main(void)
{
	static struct session s;
	struct memdisk disk = { 0 };
	struct qsm_io *io;
	char err[256] = "";
	const char *vs;
	int ret;

	alarm(60); /* a hang fails the test */
	/* The headers and the library agree on the major version. */
	unsigned v = qsm_version(&vs);
	if ((v >> 16) != QSM_VERSION_MAJOR || strcmp(vs, QSM_VERSION_STRING) != 0) {
		fprintf(stderr, "embed: headers %s, library %s\n", QSM_VERSION_STRING, vs);
		return 1;
	}
	if (!(disk.data = calloc(1, DISK_CAP)) || !(s.base = event_base_new()))
		die("out of memory", -ENOMEM);

	if ((ret = qsm_io_new(s.base, &md_ops, 0, &disk, &io)) < 0)
		die("qsm_io_new", ret);
	struct qsm_create_opts co = { QSM_OPTS_INIT(co), .size = 64u << 20 };
	if ((ret = qsm_create_io(io, &co, err, sizeof(err))) < 0) {
		fprintf(stderr, "embed: qsm_create_io: %s\n", err);
		return 1;
	}
	if (memcmp(disk.data, "QFI\xfb", 4) != 0)
		die("no qcow2 header on the memory disk", -EIO);
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo), .cache = QSM_CACHE_WRITEBACK };
	if ((ret = qsm_open_io(s.base, io, &oo, &s.img, err, sizeof(err))) < 0) {
		fprintf(stderr, "embed: qsm_open_io: %s\n", err);
		return 1;
	}

	for (unsigned i = 0; i < IO_LEN; i++)
		s.wbuf[i] = (unsigned char)(i * 7 + 1);
	s.wiov = (struct iovec){ s.wbuf, IO_LEN };
	if ((ret = qsm_writev(s.img, IO_OFFSET, &s.wiov, 1, write_cb, &s)) < 0)
		die("submit write", ret);
	if (event_base_dispatch(s.base) < 0)
		die("event_base_dispatch", -EIO);
	if (s.error)
		return 1;
	if (s.stage < 4) {
		fprintf(stderr, "embed: the loop ran dry at stage %d\n", s.stage);
		return 1;
	}
	if (disk.closed != 1)
		die("the backend was not closed exactly once", -EIO);

	/* The image left on the memory disk is clean. */
	struct qsm_check_report rep = { QSM_OPTS_INIT(rep) };
	if ((ret = qsm_io_new(s.base, &md_ops, QSM_IO_RDONLY, &disk, &io)) < 0)
		die("qsm_io_new (check)", ret);
	ret = qsm_check_io(io, 0, &rep, stderr, err, sizeof(err));
	qsm_io_close(io);
	if (ret != 0 || rep.corruptions || rep.leaks) {
		fprintf(stderr, "embed: check: exit %d, %llu corruptions, %llu leaks %s\n", ret,
			(unsigned long long)rep.corruptions, (unsigned long long)rep.leaks, err);
		return 1;
	}
	printf("embed: OK: libqsm %s, %u backend requests, image of %llu bytes on the memory "
	       "disk, clean (%llu clusters allocated)\n", vs, disk.submitted,
	       (unsigned long long)disk.size, (unsigned long long)rep.allocated_clusters);
	event_base_free(s.base);
	free(disk.data);
	return 0;
}
