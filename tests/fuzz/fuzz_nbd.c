/*
 * tests/fuzz/fuzz_nbd.c: libFuzzer target, the NBD connection machine of
 * `qsm nbd` (tools/nbd/conn.c) driven with raw client bytes.
 *
 * One input is one connection: the server end of a socketpair is given to
 * nbd_conn_start() (server.h contract 4) on a libevent loop, the export a
 * 2 MiB image in memory (the sim disk, as fuzz_sched.c; byte 1), and the fuzzer writes the input's bytes into the client
 * end.  Layout (past the end, nothing more is sent):
 *   byte 0      bit 0: first send a canned valid handshake (client flags,
 *               STRUCTURED_REPLY, SET_META_CONTEXT base:allocation and
 *               qemu:allocation-depth, GO), so most inputs reach the
 *               transmission phase;
 *               bits 1-2: the client's reading: 0 reads every reply, 1
 *               never reads (the server's output backs up: its caps, the
 *               write event, replies dropped when the client goes), 2
 *               reads only after every other chunk, 3 as 0;
 *               bit 3: small socket buffers (4 KiB asked: backpressure
 *               within one reply);
 *               bit 4: the input ends with SIGTERM's path
 *               (nbd_server_shutdown, drain limit 0 s so the unread
 *               replies are dropped at once) instead of the client closing;
 *               bit 5: read-only export; bit 6: --discard=unmap;
 *               bit 7: -A (qemu:allocation-depth offered)
 *   byte 1      bits 0-1, the export: 0 or 3 a fresh 2 MiB qcow2, 1 the
 *               same over a 1 MiB qcow2 backing file with data in
 *               [0, 64K) and [512K, 576K) (block status walks the chain
 *               and past the shorter backing file's end), 2 a 2 MiB raw
 *               image; bit 2: an export description (-D); bit 3: TLS
 *               required (--tls-creds: credentials made once per process
 *               with GnuTLS in a temporary directory), so the canned
 *               handshake (byte 0 bit 0) is sent in the clear and every
 *               option but STARTTLS and ABORT must be refused, and the
 *               bytes after a STARTTLS are TLS records (the handshake of
 *               GnuTLS with whatever the input holds)
 *   then chunks: a control byte c, then the chunk's bytes: c < 0xf0 sends
 *               c + 1 bytes, c >= 0xf0 sends (c - 0xef) * 4096 bytes (the
 *               input's next bytes, fewer at its end).  Between chunks the
 *               loop runs (engine completions, replies) so the server sees
 *               the stream split where the input says: partial headers,
 *               options and payloads.
 * After the input the loop runs until the connection has closed (the
 * client end closed, or the shutdown), then the image is closed and freed.
 *
 * Oracle (any finding aborts): the reply stream of a canned session is
 * well formed (the greeting, option replies up to GO's ACK, then simple
 * replies without data and structured chunks of known types whose
 * lengths fit their type and whose offsets lie in the export: with
 * structured replies negotiated every reply frames itself); a crash, a
 * sanitizer report, a leak
 * (libFuzzer's leak detection: the connection, its requests and the
 * image must all be freed), an event the transition table does not allow
 * (conn_run aborts), a connection that does not close once its client is
 * gone or the server stops, a close of the image that fails, or an image
 * that the check finds corrupt or leaking afterwards.
 * With TLS required, also: no option other than STARTTLS or ABORT answered
 * with anything but an error, nothing after STARTTLS's ACK parsed as NBD,
 * and no request ever reaching the engine (a TLS handshake the input
 * cannot complete is the only way to transmission).
 * FUZZ_NBD_VERBOSE=1 prints, per input, what the client read and checked.
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/sim.h"
#include "metadata/check.h"
#include "metadata/qcow2.h"
#include "sm/qsm.h"
#include "tools/nbd/proto.h"
#include "tools/nbd/server.h"
#include "tools/nbd/tls.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <time.h>
#include "tools/workload.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EXPORT_SIZE   (2u << 20)
#define BACKING_SIZE  (1u << 20)
#define CLUSTER_BITS  16
#define MAX_IDLE      2000        /* loop passes without progress before giving up */
#define MAX_CLOSE     200000      /* loop passes for the connection to close */

static void bug(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void bug(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "fuzz_nbd: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	abort();
}

static void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static void put64(uint8_t *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }

/* Client flags, STRUCTURED_REPLY, SET_META_CONTEXT (two contexts), GO. */
static size_t canned_handshake(uint8_t *b)
{
	static const char *const ctx[] = { "base:allocation", "qemu:allocation-depth" };
	size_t n = 0, l;

	put32(b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	n = 4;
	put64(b + n, NBD_OPTS_MAGIC);
	put32(b + n + 8, NBD_OPT_STRUCTURED_REPLY);
	put32(b + n + 12, 0);
	n += 16;
	size_t hdr = n;
	put64(b + n, NBD_OPTS_MAGIC);
	put32(b + n + 8, NBD_OPT_SET_META_CONTEXT);
	n += 16;
	put32(b + n, 0); /* export name "" */
	put32(b + n + 4, 2);
	n += 8;
	for (int i = 0; i < 2; i++) {
		l = strlen(ctx[i]);
		put32(b + n, (uint32_t)l);
		memcpy(b + n + 4, ctx[i], l);
		n += 4 + l;
	}
	put32(b + hdr + 12, (uint32_t)(n - hdr - 16));
	put64(b + n, NBD_OPTS_MAGIC);
	put32(b + n + 8, NBD_OPT_GO);
	put32(b + n + 12, 6);
	put32(b + n + 16, 0);   /* export name "" */
	b[n + 20] = b[n + 21] = 0; /* no info requests */
	return n + 22;
}

static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* The reply stream of a canned session, parsed as it arrives. */
enum rx_phase { RX_GREETING, RX_OPTS, RX_XMIT, RX_TLS };
struct rx {
	bool on;                 /* a canned session: the stream is checked */
	bool tls_required;       /* options in the clear must be refused */
	enum rx_phase phase;
	uint8_t *buf;
	size_t len, cap;
	uint64_t replies, chunks;
};

struct harness {
	struct event_base *base;
	struct nbd_server srv;
	int cfd;                 /* the client end; -1 once closed */
	bool reading;
	uint64_t got;            /* reply bytes the client read */
	struct rx rx;
};

/* Consume what is complete in the stream; bug() on anything malformed. */
static void rx_parse(struct rx *x, uint64_t export_size)
{
	size_t at = 0;

	for (;;) {
		const uint8_t *p = x->buf + at;
		size_t n = x->len - at;
		if (x->phase == RX_GREETING) {
			if (n < 18)
				break;
			if (get64(p) != NBD_INIT_MAGIC || get64(p + 8) != NBD_OPTS_MAGIC)
				bug("reply stream: bad greeting");
			at += 18;
			x->phase = RX_OPTS;
		} else if (x->phase == RX_OPTS) {
			if (n < 20)
				break;
			uint32_t opt = get32(p + 8), type = get32(p + 12), l = get32(p + 16);
			if (get64(p) != NBD_REP_MAGIC)
				bug("reply stream: bad option reply magic");
			if (n < 20 + (size_t)l)
				break;
			at += 20 + l;
			if (x->tls_required) {
				/* In the clear: errors only, but for STARTTLS
				 * (after whose ACK come TLS records) and ABORT. */
				if (opt == NBD_OPT_STARTTLS && type == NBD_REP_ACK)
					x->phase = RX_TLS;
				else if (!(type & 0x80000000U) && opt != NBD_OPT_ABORT)
					bug("reply stream: option %u answered (0x%x) in the clear with TLS required",
					    opt, type);
				else if (opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT &&
					 type != NBD_REP_ERR_TLS_REQD)
					bug("reply stream: option %u refused with 0x%x, not TLS_REQD", opt, type);
				continue;
			}
			if (type & 0x80000000U)
				bug("reply stream: the canned handshake got error 0x%x for option %u", type, opt);
			if (opt == NBD_OPT_GO && type == NBD_REP_ACK)
				x->phase = RX_XMIT;
		} else if (x->phase == RX_TLS) {
			at = x->len; /* TLS records: not ours to parse */
			break;
		} else {
			if (n < 4)
				break;
			uint32_t magic = get32(p);
			if (magic == NBD_SIMPLE_REPLY_MAGIC) {
				/* Structured replies negotiated: a READ never gets a
				 * simple reply, so one has no data. */
				if (n < NBD_SIMPLE_REPLY_SIZE)
					break;
				at += NBD_SIMPLE_REPLY_SIZE;
				x->replies++;
				continue;
			}
			if (magic != NBD_STRUCTURED_REPLY_MAGIC)
				bug("reply stream: bad reply magic 0x%08x after %llu replies", magic,
				    (unsigned long long)x->replies);
			if (n < NBD_CHUNK_HEADER_SIZE)
				break;
			uint16_t flags = get16(p + 4), type = get16(p + 6);
			uint32_t l = get32(p + 16);
			if (l > NBD_MAX_PAYLOAD + 8)
				bug("reply stream: chunk of %u bytes", l);
			if (n < NBD_CHUNK_HEADER_SIZE + (size_t)l)
				break;
			const uint8_t *d = p + NBD_CHUNK_HEADER_SIZE;
			if (flags & ~NBD_REPLY_FLAG_DONE)
				bug("reply stream: chunk flags 0x%x", flags);
			switch (type) {
			case NBD_REPLY_TYPE_NONE:
				if (l || !(flags & NBD_REPLY_FLAG_DONE))
					bug("reply stream: bad NONE chunk");
				break;
			case NBD_REPLY_TYPE_OFFSET_DATA:
				if (l < 8 || get64(d) > export_size || l - 8 > export_size - get64(d))
					bug("reply stream: OFFSET_DATA of %u bytes at %llu", l,
					    (unsigned long long)(l >= 8 ? get64(d) : 0));
				break;
			case NBD_REPLY_TYPE_OFFSET_HOLE:
				if (l != 12 || get64(d) > export_size || get32(d + 8) > export_size - get64(d) ||
				    get32(d + 8) == 0)
					bug("reply stream: bad OFFSET_HOLE");
				break;
			case NBD_REPLY_TYPE_BLOCK_STATUS:
				if (l < 12 || (l - 4) % 8 || get32(d) > 1)
					bug("reply stream: BLOCK_STATUS of %u bytes, context %u", l,
					    l >= 4 ? get32(d) : 0);
				for (uint32_t i = 0; i < (l - 4) / 8; i++)
					if (get32(d + 4 + 8 * i) == 0)
						bug("reply stream: an empty block status extent");
				break;
			case NBD_REPLY_TYPE_ERROR:
				if (l < 6 || get32(d) == 0 || get16(d + 4) != l - 6)
					bug("reply stream: bad ERROR chunk");
				break;
			default:
				bug("reply stream: unknown chunk type %u", type);
			}
			at += NBD_CHUNK_HEADER_SIZE + l;
			x->chunks++;
			x->replies += flags & NBD_REPLY_FLAG_DONE;
		}
	}
	memmove(x->buf, x->buf + at, x->len - at);
	x->len -= at;
}

static void rx_feed(struct harness *h, const uint8_t *p, size_t n)
{
	struct rx *x = &h->rx;

	if (!x->on)
		return;
	if (x->len + n > x->cap) {
		size_t cap = x->cap ? x->cap : 1 << 16;
		while (cap < x->len + n)
			cap *= 2;
		uint8_t *nb = realloc(x->buf, cap);
		if (!nb)
			abort();
		x->buf = nb;
		x->cap = cap;
	}
	memcpy(x->buf + x->len, p, n);
	x->len += n;
	rx_parse(x, h->srv.size);
}

/* Read what the server sent, if the client reads now; true on progress. */
static bool client_read(struct harness *h)
{
	static uint8_t sink[1 << 16];
	bool progress = false;

	while (h->reading && h->cfd >= 0) {
		ssize_t n = recv(h->cfd, sink, sizeof(sink), MSG_DONTWAIT);
		if (n <= 0)
			break;
		h->got += (uint64_t)n;
		rx_feed(h, sink, (size_t)n);
		progress = true;
	}
	return progress;
}

/* One pass of the loop (whatever is ready, without waiting). */
static void loop_once(struct harness *h)
{
	event_base_loop(h->base, EVLOOP_NONBLOCK);
	client_read(h);
}

/* Send len bytes, running the loop while the socket is full.  false when
 * the server stopped taking them (it waits for the client to read, or it
 * closed the connection): the rest of the input is then not sent. */
static bool client_send(struct harness *h, const uint8_t *p, size_t len)
{
	unsigned idle = 0;

	while (len && h->srv.nconns) {
		ssize_t n = send(h->cfd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n > 0) {
			p += n;
			len -= (size_t)n;
			idle = 0;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			return false; /* the server closed its end */
		loop_once(h);
		if (++idle > MAX_IDLE)
			return false;
	}
	return len == 0;
}

/* A fresh qcow2 image of `size` into sim (with a backing file name when
 * backing). */
static void make_qcow2(struct qsm_sim *sim, uint64_t size, bool backing)
{
	struct qcow2_create_opts co = { .size = size, .cluster_bits = CLUSTER_BITS,
					.version = 3, .refcount_order = 4 };
	char err[256];
	uint8_t *img;
	size_t img_len;

	if (backing) {
		co.backing_file = "base.qcow2";
		co.backing_format = "qcow2";
	}
	if (qcow2_create_image(&co, &img, &img_len, err, sizeof(err)) < 0)
		bug("create: %s", err);
	qsm_sim_load_buf(sim, img, img_len);
	free(img);
}

static int open_backing_sim(void *opaque, struct event_base *base, const char *name,
			    const char *path, int flags, struct qsm_io **out)
{
	(void)name;
	(void)path;
	return qsm_io_open_sim(base, opaque, flags | QSM_IO_RDONLY, out);
}

/* The backing file: data in [0, 64K) and [512K, 576K), the rest
 * unallocated. */
static void make_backing(struct event_base *base, struct qsm_sim *bsim)
{
	static uint8_t pat[65536];
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo) };
	struct qsm_image *bi;
	struct qsm_io *io;
	char err[256];

	make_qcow2(bsim, BACKING_SIZE, false);
	memset(pat, 0xb5, sizeof(pat));
	oo.work_threads = -1;
	if (qsm_io_open_sim(base, bsim, 0, &io) < 0 || qsm_open_io(base, io, &oo, &bi, err, sizeof(err)) < 0)
		bug("backing open failed");
	if (qsm_sync_pwrite(bi, pat, sizeof(pat), 0) || qsm_sync_pwrite(bi, pat, sizeof(pat), 512 << 10) ||
	    qsm_close(bi))
		bug("backing writes failed");
}

/* --- TLS credentials, made once per process ------------------------------ */

static char tls_dir[64];

static void tls_dir_remove(void)
{
	static const char *const files[] = { "ca-cert.pem", "server-cert.pem", "server-key.pem" };
	char path[128];
	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		snprintf(path, sizeof(path), "%s/%s", tls_dir, files[i]);
		unlink(path);
	}
	rmdir(tls_dir);
}

static void write_pem(const char *name, const gnutls_datum_t *d)
{
	char path[128];
	snprintf(path, sizeof(path), "%s/%s", tls_dir, name);
	FILE *f = fopen(path, "w");
	if (!f || fwrite(d->data, 1, d->size, f) != d->size || fclose(f) != 0)
		bug("cannot write %s", path);
}

/* A certificate for `key` signed by (ca, ca_key), or self-signed (ca NULL). */
static gnutls_x509_crt_t make_cert(gnutls_x509_privkey_t key, const char *dn, bool is_ca,
				   gnutls_x509_crt_t ca, gnutls_x509_privkey_t ca_key)
{
	gnutls_x509_crt_t c;
	time_t now = time(NULL);
	unsigned char serial[4] = { 0x51, 0x53, 0x4d, is_ca ? 1 : 2 };
	const char *bad;

	if (gnutls_x509_crt_init(&c) < 0 || gnutls_x509_crt_set_version(c, 3) < 0 ||
	    gnutls_x509_crt_set_serial(c, serial, sizeof(serial)) < 0 ||
	    gnutls_x509_crt_set_activation_time(c, now - 3600) < 0 ||
	    gnutls_x509_crt_set_expiration_time(c, now + 30 * 86400) < 0 ||
	    gnutls_x509_crt_set_dn(c, dn, &bad) < 0 || gnutls_x509_crt_set_key(c, key) < 0 ||
	    gnutls_x509_crt_set_basic_constraints(c, is_ca, -1) < 0 ||
	    gnutls_x509_crt_set_key_usage(c, is_ca ? GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN
						   : GNUTLS_KEY_DIGITAL_SIGNATURE) < 0 ||
	    (!is_ca && gnutls_x509_crt_set_key_purpose_oid(c, GNUTLS_KP_TLS_WWW_SERVER, 0) < 0) ||
	    gnutls_x509_crt_sign2(c, ca ? ca : c, ca ? ca_key : key, GNUTLS_DIG_SHA256, 0) < 0)
		bug("making the %s certificate failed", is_ca ? "CA" : "server");
	return c;
}

/* Server credentials as `qsm nbd --object tls-creds-x509,dir=...` loads
 * them (a CA and a server certificate it signed, ECDSA P-256 keys), in a
 * temporary directory removed at exit. */
static struct nbd_tls_creds *tls_creds(void)
{
	static struct nbd_tls_creds *creds;
	gnutls_x509_privkey_t ca_key, key;
	gnutls_datum_t d;
	char err[256];

	if (creds)
		return creds;
	snprintf(tls_dir, sizeof(tls_dir), "/tmp/fuzz_nbd_tls.XXXXXX");
	if (!mkdtemp(tls_dir))
		bug("mkdtemp: %s", strerror(errno));
	atexit(tls_dir_remove);
	unsigned bits = GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1);
	if (gnutls_x509_privkey_init(&ca_key) < 0 || gnutls_x509_privkey_init(&key) < 0 ||
	    gnutls_x509_privkey_generate(ca_key, GNUTLS_PK_ECDSA, bits, 0) < 0 ||
	    gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA, bits, 0) < 0)
		bug("key generation failed");
	gnutls_x509_crt_t ca = make_cert(ca_key, "CN=qsm fuzz_nbd CA", true, NULL, NULL);
	gnutls_x509_crt_t crt = make_cert(key, "CN=localhost", false, ca, ca_key);
	if (gnutls_x509_crt_export2(ca, GNUTLS_X509_FMT_PEM, &d) < 0)
		bug("export failed");
	write_pem("ca-cert.pem", &d);
	gnutls_free(d.data);
	if (gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &d) < 0)
		bug("export failed");
	write_pem("server-cert.pem", &d);
	gnutls_free(d.data);
	if (gnutls_x509_privkey_export2(key, GNUTLS_X509_FMT_PEM, &d) < 0)
		bug("export failed");
	write_pem("server-key.pem", &d);
	gnutls_free(d.data);
	gnutls_x509_crt_deinit(ca);
	gnutls_x509_crt_deinit(crt);
	gnutls_x509_privkey_deinit(ca_key);
	gnutls_x509_privkey_deinit(key);
	if (nbd_tls_creds_load(tls_dir, false, &creds, err, sizeof(err)) < 0)
		bug("loading the credentials: %s", err);
	return creds; /* kept for the process: libFuzzer runs many inputs */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct harness h = { .cfd = -1 };
	char err[256];
	size_t at = 0;
	uint8_t mode = size ? data[at++] : 0;
	uint8_t shape = at < size ? data[at++] : 0;
	unsigned kind = shape & 3;

	/* The export on the sim disk (byte 1). */
	h.base = event_base_new();
	struct qsm_sim *sim = qsm_sim_new(0), *bsim = NULL;
	if (!h.base || !sim)
		abort();
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo) };
	oo.work_threads = -1;
	oo.read_only = mode & 0x20;
	if (kind == 2) {
		uint8_t *zeros = calloc(1, EXPORT_SIZE);
		if (!zeros)
			abort();
		qsm_sim_load_buf(sim, zeros, EXPORT_SIZE);
		free(zeros);
		oo.format = "raw";
	} else if (kind == 1) {
		bsim = qsm_sim_new(0);
		if (!bsim)
			abort();
		make_backing(h.base, bsim);
		make_qcow2(sim, EXPORT_SIZE, true);
		oo.open_backing_io = open_backing_sim;
		oo.open_backing_opaque = bsim;
	} else {
		make_qcow2(sim, EXPORT_SIZE, false);
	}
	struct qsm_io *io;
	if (qsm_io_open_sim(h.base, sim, 0, &io) < 0)
		abort();
	struct qsm_image *qi;
	if (qsm_open_io(h.base, io, &oo, &qi, err, sizeof(err)) < 0)
		bug("open: %s", err);

	h.srv.name = "";
	h.srv.desc = shape & 4 ? "qsm fuzz_nbd export" : NULL;
	h.srv.read_only = mode & 0x20;
	h.srv.discard_unmap = mode & 0x40;
	h.srv.alloc_depth = mode & 0x80;
	bool tls = shape & 8;
	h.srv.tls = tls ? tls_creds() : NULL;
	h.rx.tls_required = tls;
	h.rx.on = tls; /* in the clear, the stream is the handshake's whatever the input */
	nbd_server_init(&h.srv, h.base, qi);
	h.srv.drain_secs = 0;
	h.srv.handshake_secs = 0; /* no timers: the run must not depend on time */

	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		bug("socketpair: %s", strerror(errno));
	if (mode & 0x08) {
		int small = 4096;
		for (int i = 0; i < 2; i++) {
			setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
			setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
		}
	}
	h.cfd = sv[0];
	if (nbd_conn_start(&h.srv, sv[1]) < 0)
		bug("nbd_conn_start failed");
	unsigned rmode = (mode >> 1) & 3;
	h.reading = rmode != 1;

	bool sending = true;
	if (mode & 1) {
		uint8_t hs[128];
		h.rx.on = true;
		size_t n = canned_handshake(hs);
		sending = client_send(&h, hs, n);
	}
	for (unsigned chunk = 0; sending && at < size; chunk++) {
		uint8_t c = data[at++];
		size_t n = c < 0xf0 ? (size_t)c + 1 : (size_t)(c - 0xef) * 4096;
		if (n > size - at)
			n = size - at;
		if (rmode == 2)
			h.reading = chunk & 1;
		sending = client_send(&h, data + at, n);
		at += n;
		for (int i = 0; i < 4 && h.srv.nconns; i++)
			loop_once(&h);
	}

	/* The end of the input: the server stops, or the client goes. */
	if (mode & 0x10 && h.srv.nconns) {
		nbd_server_shutdown(&h.srv);
	} else {
		close(h.cfd);
		h.cfd = -1;
	}
	for (unsigned i = 0; h.srv.nconns; i++) {
		if (i == MAX_CLOSE)
			bug("the connection does not close (%s)", mode & 0x10 ? "shutdown" : "client gone");
		loop_once(&h);
	}
	if (h.cfd >= 0)
		close(h.cfd);
	if (getenv("FUZZ_NBD_VERBOSE"))
		fprintf(stderr, "fuzz_nbd: %llu reply bytes read; checked: %llu replies, %llu chunks%s\n",
			(unsigned long long)h.got, (unsigned long long)h.rx.replies,
			(unsigned long long)h.rx.chunks, h.rx.on ? "" : " (no canned handshake: not parsed)");
	free(h.rx.buf);

	int ret = qsm_close(qi);
	if (ret)
		bug("closing the image fails: %s", qsm_strerror(ret));
	struct qsm_check_result res;
	if (kind != 2 && (wl_sim_check(sim, &res, err, sizeof(err)) < 0 || res.incomplete))
		bug("the check cannot run: %s", err);
	if (tls && h.srv.reqs)
		bug("%llu requests reached the engine with TLS required and no TLS session",
		    (unsigned long long)h.srv.reqs);
	if (kind != 2 && (res.corruptions || res.leaks))
		bug("the check finds %llu corruptions, %llu leaks after the session",
		    (unsigned long long)res.corruptions, (unsigned long long)res.leaks);
	qsm_sim_free(sim);
	if (bsim)
		qsm_sim_free(bsim);
	event_base_free(h.base);
	return 0;
}
