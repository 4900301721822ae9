/*
 * tools/nbd/conn.c: one NBD connection of `qsm nbd`, a state machine.
 *
 * Design
 * ------
 * The states, events and transitions are tools/nbd/conn_states.def; the
 * one dispatcher, conn_run(), looks every step's event up in that table
 * (an event the table does not allow from the current state is a bug and
 * aborts), traces the transition when QSM_NBD_TRACE is set, and runs the
 * next state's step until a step waits.  Steps never change c->state.
 *
 *   ACCEPTED -> GREETING -> CLIENT_FLAGS -> OPT_HEADER -> OPT_DATA -> OPT_REPLY
 *        OPT_REPLY --NEXT--> OPT_HEADER, --STARTTLS--> TLS_HANDSHAKE -> OPT_HEADER,
 *                  --GO--> XMIT_HEADER, --ABORT--> CLOSED
 *   XMIT_HEADER -> XMIT_ADMIT -> (XMIT_PAYLOAD ->) XMIT_HEADER ...
 *   XMIT_* --EOF|ERROR|SHUTDOWN|DISC--> DRAINING --IDLE--> CLOSED
 *   handshake states --ERROR|TIMEOUT|SHUTDOWN--> CLOSED
 *
 * Who runs the machine: conn_resume() (the current state's step, then
 * conn_run) is called only from top-level loop callbacks: the socket's read
 * and write events, the handshake timer, and the connection's "kick" event,
 * which everything else (an engine completion, a reply sent, the server
 * stopping) activates instead of running the machine itself.  So the
 * machine never re-enters, and the connection is freed (on entering
 * CLOSED) only from the top of a callback.
 *
 * Transport: a plain socket or a TLS session (tools/nbd/tls.h), behind
 * conn_recv()/conn_send().  Input goes through a fixed 64 KiB buffer (many
 * small headers per read); large write payloads are read straight into
 * the request's buffer.  Output is a queue of items (struct nbd_out), each
 * an iovec array; it is written whenever the socket takes more, gathering
 * several items per writev.  Handshake replies are written at once;
 * transmission replies are queued and written by the connection's "flush"
 * event, which runs after the callback that completed them: the engine
 * completes requests in batches (one io_uring wake-up reaps every CQE), so
 * a batch's replies leave in one sendmsg instead of one each.
 *
 * Invariants
 *  1. c->nreqs counts the requests the connection owns (admitted, not yet
 *     freed): a request is freed once its reply is sent or dropped, and only
 *     after none of its engine operations is pending (r->pending == 0).
 *     DRAINING reaches CLOSED only when c->nreqs == 0.
 *  2. Memory per connection is bounded: at most NBD_CONN_MAX_REQS requests
 *     and NBD_CONN_MAX_BYTES of their buffers (one request of up to
 *     NBD_MAX_PAYLOAD is always admitted when nothing else is in flight);
 *     at the cap the machine waits in XMIT_ADMIT and reads nothing.
 *     Option data is read whole only up to NBD_OPT_MAX, skipped beyond.
 *  3. Nothing the client sends reaches the engine unchecked: magic, flags,
 *     command, offset + length within the export, payload size.  A request
 *     the engine must not see gets its error reply without the engine.
 *  4. With TLS required, until the TLS handshake is done only STARTTLS
 *     and ABORT are answered; everything else gets NBD_REP_ERR_TLS_REQD
 *     (EXPORT_NAME, which has no error reply, closes the connection).
 */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "sm/qsm.h"
#include "tools/nbd/proto.h"
#include "tools/nbd/server.h"
#ifdef QSM_NBD_TLS
#include "tools/nbd/tls.h"
#endif

#define NBD_CONN_MAX_REQS  64
#define NBD_CONN_MAX_BYTES (32U << 20)  /* = NBD_MAX_PAYLOAD: one largest request */
#define NBD_OPT_MAX        65536        /* option data read whole up to this */
#define NBD_INBUF          65536
#define NBD_WALK_MAX_RUNS  1024         /* block status runs per request */
#define NBD_OUT_GATHER     64           /* iovecs per writev */
#define NBD_BUF_ALIGN      4096         /* READ/WRITE buffers: any O_DIRECT alignment */

/* --- the table -------------------------------------------------------------- */

enum nbd_state {
#define NBD_STATE(name, desc) NBD_S_##name,
#include "tools/nbd/conn_states.def"
	NBD_S__COUNT
};

enum nbd_event {
#define NBD_EVENT(name, label) NBD_E_##name,
#include "tools/nbd/conn_states.def"
	NBD_E__COUNT,
	NBD_E__WAIT = -1, /* a step's "nothing happened yet" */
};

static const char *const state_names[] = {
#define NBD_STATE(name, desc) #name,
#include "tools/nbd/conn_states.def"
};

static const char *const event_names[] = {
#define NBD_EVENT(name, label) #name,
#include "tools/nbd/conn_states.def"
};

static const struct {
	enum nbd_state from;
	enum nbd_event ev;
	enum nbd_state to;
} transitions[] = {
#define NBD_TRANSITION(from, ev, to) { NBD_S_##from, NBD_E_##ev, NBD_S_##to },
#include "tools/nbd/conn_states.def"
};

/* --- objects ------------------------------------------------------------------ */

struct nbd_out;
typedef void (*nbd_out_done_fn)(struct nbd_conn *c, struct nbd_out *o);

/* One queued piece of output: iov[cur] from byte off onward is what is left. */
struct nbd_out {
	TAILQ_ENTRY(nbd_out) link;
	struct iovec *iov;
	int iovcnt, cur;
	size_t off;
	nbd_out_done_fn done; /* frees the item (sent or dropped) */
};

/* Block status of a request's range through the backing chain, one run at
 * a time (an engine call per run and layer). */
struct nbd_run {
	uint64_t len;
	uint32_t flags;  /* NBD_STATE_HOLE | NBD_STATE_ZERO */
	uint32_t depth;  /* qemu:allocation-depth: 0 unallocated, 1 the image, 2 its backing... */
};
struct nbd_walk {
	uint64_t off, end;      /* next byte to resolve; end of the range */
	uint64_t seg_end;       /* end of the run the lower layers are asked about */
	uint64_t lim;           /* end of the current query */
	int layer;
	unsigned max_runs;
	struct qsm_extent ext;
	struct nbd_run *runs;
	unsigned nruns, cap;
	int err;
};

struct nbd_req {
	struct nbd_conn *c;
	uint64_t handle, offset;
	uint32_t len;
	uint16_t type, flags;
	int err;               /* first error (negative errno) */
	unsigned pending;      /* engine operations not completed */
	bool flush_after;      /* TRIM with FUA: a flush after the discard */
	uint8_t *buf;          /* READ data / WRITE payload */
	size_t bytes;          /* charged to c->inflight_bytes */
	struct nbd_walk walk;
	bool walking;
	struct nbd_out out;
	uint8_t *hdrs;         /* reply headers the iovecs point into */
	struct iovec iov_small[2];
	struct iovec data_iov; /* the engine's iov (valid until its callback) */
	uint8_t hdr_small[32];
};

struct nbd_conn {
	struct nbd_server *srv;
	LIST_ENTRY(nbd_conn) link;
	uint64_t id;
	enum nbd_state state;
	int fd;
	struct event *rev, *wev, *kick, *timer;
	struct event *flush;            /* writes the queued replies: conn_queue_later */
	bool rev_on, wev_on;
	bool flush_pending;             /* c->flush is active */
	/* The last recv() of a plain socket returned less than it asked for, so
	 * the socket had nothing more: the next read waits for the read event
	 * (level-triggered; conn_read_cb clears this) instead of a recv() that
	 * would only say EAGAIN. */
	bool rx_empty;
	bool running, rekick;
	bool dead;             /* the socket failed: output is dropped */
	bool eof;
	bool timed_out;
	/* Negotiated. */
	bool no_zeroes, structured, tls_done;
	bool ctx_alloc, ctx_depth;
	uint32_t ctx_bitmaps;  /* bit i: srv->bitmaps[i]'s context */
	bool negotiated;       /* it reached transmission (GO, EXPORT_NAME) */
	/* Input: inbuf[rpos, rlen) is read but not consumed; an exact read of
	 * rd_want bytes into rd_dst is in progress (rd_have so far). */
	uint8_t *inbuf;
	size_t rpos, rlen;
	uint8_t *rd_dst;
	size_t rd_want, rd_have;
	bool rd_active;
	uint8_t hdr[NBD_REQUEST_SIZE];
	/* The option being handled. */
	uint32_t opt, optlen;
	uint8_t *optbuf;
	uint64_t skip;          /* option bytes still to skip */
	enum nbd_event opt_next;
	/* Output. */
	TAILQ_HEAD(, nbd_out) outq;
	size_t out_bytes;
	/* Requests. */
	struct nbd_req *cur;    /* being admitted / its payload read */
	unsigned nreqs;
	size_t inflight_bytes;
	uint16_t xmit_flags;
#ifdef QSM_NBD_TLS
	struct nbd_tls *tls;
#endif
};

static uint64_t next_conn_id = 1;
static bool trace_on;

/* --- byte order -------------------------------------------------------------- */

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, v); }
static void put64(uint8_t *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, v); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

/* --- transport --------------------------------------------------------------- */

static bool conn_tls(const struct nbd_conn *c)
{
#ifdef QSM_NBD_TLS
	return c->tls != NULL;
#else
	(void)c;
	return false;
#endif
}

/* >0 bytes, 0 EOF, -EAGAIN, -errno. */
static ssize_t conn_recv(struct nbd_conn *c, void *buf, size_t len)
{
	ssize_t n;
#ifdef QSM_NBD_TLS
	if (c->tls)
		return nbd_tls_recv(c->tls, buf, len);
#endif
	do
		n = recv(c->fd, buf, len, 0);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	return n;
}

/* Bytes taken (>0), -EAGAIN or -errno. */
static ssize_t conn_sendv(struct nbd_conn *c, struct iovec *iov, int n)
{
	ssize_t r;
#ifdef QSM_NBD_TLS
	if (c->tls)
		return nbd_tls_send(c->tls, iov[0].iov_base, iov[0].iov_len);
#endif
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
	do
		r = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	return r;
}

static void conn_want_read(struct nbd_conn *c, bool on)
{
	if (on == c->rev_on || c->dead)
		return;
	if (on)
		event_add(c->rev, NULL);
	else
		event_del(c->rev);
	c->rev_on = on;
}

static void conn_want_write(struct nbd_conn *c, bool on)
{
	if (on == c->wev_on || (on && c->dead))
		return;
	if (on)
		event_add(c->wev, NULL);
	else
		event_del(c->wev);
	c->wev_on = on;
}

static void conn_schedule(struct nbd_conn *c)
{
	event_active(c->kick, 0, 0);
}

/* The socket is unusable: drop the output (freeing what it holds) and let
 * the machine see it at its next step. */
static void conn_set_dead(struct nbd_conn *c)
{
	struct nbd_out *o;

	if (c->dead)
		return;
	conn_want_read(c, false);
	conn_want_write(c, false);
	c->dead = true;
	while ((o = TAILQ_FIRST(&c->outq))) {
		TAILQ_REMOVE(&c->outq, o, link);
		o->done(c, o);
	}
	c->out_bytes = 0;
	conn_schedule(c);
}

/* Write what the socket takes.  Items fully written are released (their
 * done callback); the write event is armed while output remains. */
static void conn_flush_out(struct nbd_conn *c)
{
	struct iovec v[NBD_OUT_GATHER];

	while (!c->dead && !TAILQ_EMPTY(&c->outq)) {
		int n = 0;
		struct nbd_out *o;
		TAILQ_FOREACH(o, &c->outq, link) {
			for (int i = o->cur; i < o->iovcnt && n < NBD_OUT_GATHER; i++) {
				size_t skip = i == o->cur ? o->off : 0;
				if (o->iov[i].iov_len == skip)
					continue;
				v[n].iov_base = (uint8_t *)o->iov[i].iov_base + skip;
				v[n].iov_len = o->iov[i].iov_len - skip;
				n++;
			}
			if (n == NBD_OUT_GATHER)
				break;
		}
		ssize_t w = n ? conn_sendv(c, v, n) : 0;
		if (w == -EAGAIN) {
			conn_want_write(c, true);
			return;
		}
		if (w < 0) {
			conn_set_dead(c);
			return;
		}
		c->srv->bytes_out += (uint64_t)w;
		size_t left = (size_t)w;
		while ((o = TAILQ_FIRST(&c->outq))) {
			while (o->cur < o->iovcnt) {
				size_t rest = o->iov[o->cur].iov_len - o->off;
				if (rest > left) {
					o->off += left;
					left = 0;
					break;
				}
				left -= rest;
				o->cur++;
				o->off = 0;
			}
			if (o->cur < o->iovcnt)
				break;
			TAILQ_REMOVE(&c->outq, o, link);
			o->done(c, o);
		}
		assert(left == 0);
	}
	conn_want_write(c, false);
	if (TAILQ_EMPTY(&c->outq))
		c->out_bytes = 0;
}

/* Append o to the output; false (o released) when the socket is dead. */
static bool conn_enqueue(struct nbd_conn *c, struct nbd_out *o)
{
	if (c->dead) {
		o->done(c, o);
		return false;
	}
	o->cur = 0;
	o->off = 0;
	TAILQ_INSERT_TAIL(&c->outq, o, link);
	return true;
}

static void conn_queue(struct nbd_conn *c, struct nbd_out *o)
{
	if (conn_enqueue(c, o))
		conn_flush_out(c);
}

/* Queue o to be written once the current loop callback is over, with every
 * other item queued meanwhile (see "Transport" above).  Items keep their
 * order with those of conn_queue(). */
static void conn_queue_later(struct nbd_conn *c, struct nbd_out *o)
{
	if (conn_enqueue(c, o) && !c->flush_pending) {
		c->flush_pending = true;
		event_active(c->flush, 0, 0);
	}
}

/*
 * Read exactly `want` bytes into dst (across calls: the first call with
 * dst sets the read up, later calls continue it).  1 done, 0 wait (the read
 * event is armed), -EPIPE at end of input, -errno on error.  dst NULL
 * skips the bytes.
 */
static int conn_read_exact(struct nbd_conn *c, void *dst, size_t want)
{
	if (!c->rd_active) {
		c->rd_active = true;
		c->rd_dst = dst;
		c->rd_want = want;
		c->rd_have = 0;
	}
	for (;;) {
		size_t need = c->rd_want - c->rd_have;
		size_t avail = c->rlen - c->rpos;
		if (avail) {
			size_t take = avail < need ? avail : need;
			if (c->rd_dst)
				memcpy(c->rd_dst + c->rd_have, c->inbuf + c->rpos, take);
			c->rpos += take;
			c->rd_have += take;
			need -= take;
		}
		if (!need) {
			c->rd_active = false;
			return 1;
		}
		if (c->eof)
			return -EPIPE;
		if (c->dead)
			return -EIO;
		if (c->rx_empty && !conn_tls(c)) {
			conn_want_read(c, true);
			return 0;
		}
		ssize_t n;
		size_t asked;
		if (c->rd_dst && need >= NBD_INBUF / 4) {
			asked = need;
			n = conn_recv(c, c->rd_dst + c->rd_have, need);
			if (n > 0)
				c->rd_have += (size_t)n;
		} else {
			c->rpos = c->rlen = 0;
			asked = NBD_INBUF;
			n = conn_recv(c, c->inbuf, NBD_INBUF);
			if (n > 0)
				c->rlen = (size_t)n;
		}
		if (n > 0) {
			c->srv->bytes_in += (uint64_t)n;
			c->rx_empty = (size_t)n < asked && !conn_tls(c);
			continue;
		}
		if (n == 0) {
			c->eof = true;
			return -EPIPE;
		}
		if (n == -EAGAIN) {
#ifdef QSM_NBD_TLS
			if (c->tls && nbd_tls_want_write(c->tls)) {
				conn_want_write(c, true);
				return 0;
			}
#endif
			conn_want_read(c, true);
			return 0;
		}
		return (int)n;
	}
}

/* --- option replies ------------------------------------------------------------ */

struct nbd_blob {
	struct nbd_out out;
	struct iovec iov;
	uint8_t data[];
};

static void blob_done(struct nbd_conn *c, struct nbd_out *o)
{
	free((struct nbd_blob *)((char *)o - offsetof(struct nbd_blob, out)));
}

static void opt_reply(struct nbd_conn *c, uint32_t type, const void *data, size_t len)
{
	struct nbd_blob *b = malloc(sizeof(*b) + 20 + len);
	if (!b) {
		conn_set_dead(c);
		return;
	}
	put64(b->data, NBD_REP_MAGIC);
	put32(b->data + 8, c->opt);
	put32(b->data + 12, type);
	put32(b->data + 16, (uint32_t)len);
	if (len)
		memcpy(b->data + 20, data, len);
	b->iov.iov_base = b->data;
	b->iov.iov_len = 20 + len;
	b->out.iov = &b->iov;
	b->out.iovcnt = 1;
	b->out.done = blob_done;
	conn_queue(c, &b->out);
}

static void opt_error(struct nbd_conn *c, uint32_t type, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void opt_error(struct nbd_conn *c, uint32_t type, const char *fmt, ...)
{
	char msg[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	opt_reply(c, type, msg, strlen(msg));
}

/* Raw bytes (the EXPORT_NAME answer has no option reply header). */
static void conn_send_raw(struct nbd_conn *c, const void *data, size_t len)
{
	struct nbd_blob *b = malloc(sizeof(*b) + len);
	if (!b) {
		conn_set_dead(c);
		return;
	}
	memcpy(b->data, data, len);
	b->iov.iov_base = b->data;
	b->iov.iov_len = len;
	b->out.iov = &b->iov;
	b->out.iovcnt = 1;
	b->out.done = blob_done;
	conn_queue(c, &b->out);
}

static uint16_t conn_xmit_flags(const struct nbd_conn *c)
{
	const struct nbd_server *s = c->srv;
	uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
		     NBD_FLAG_SEND_CACHE;
	if (s->read_only)
		f |= NBD_FLAG_READ_ONLY;
	else
		f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
	if (s->multi_conn || s->read_only)
		f |= NBD_FLAG_CAN_MULTI_CONN;
	if (c->structured)
		f |= NBD_FLAG_SEND_DF;
	return f;
}

/* The name at p (u32 length + bytes) inside [p, end): 0 with *name and
 * *len set, or -EINVAL when it does not fit. */
static int parse_name(const uint8_t **p, const uint8_t *end, const char **name, uint32_t *len)
{
	if (end - *p < 4)
		return -EINVAL;
	uint32_t n = get32(*p);
	*p += 4;
	if ((uint64_t)(end - *p) < n)
		return -EINVAL;
	*name = (const char *)*p;
	*len = n;
	*p += n;
	return 0;
}

static bool name_is_export(const struct nbd_conn *c, const char *name, uint32_t len)
{
	return strlen(c->srv->name) == len && (len == 0 || !memcmp(c->srv->name, name, len));
}

/* The option's data as [*p, *end).  An empty option has no buffer
 * (optbuf NULL, optlen 0: a skipped one never gets here), and arithmetic
 * on a null pointer is undefined even by 0 (fuzz_nbd found it): its
 * range is an empty one elsewhere. */
static void opt_range(const struct nbd_conn *c, const uint8_t **p, const uint8_t **end)
{
	static const uint8_t empty[1];

	assert(c->optbuf || c->optlen == 0);
	*p = c->optbuf ? c->optbuf : empty;
	*end = *p + (c->optbuf ? c->optlen : 0);
}

static void opt_info_go(struct nbd_conn *c)
{
	const uint8_t *p, *end;
	const char *name;
	uint32_t nlen;
	bool want_name = false, want_desc = false;
	uint8_t b[18];

	opt_range(c, &p, &end);
	if (parse_name(&p, end, &name, &nlen) < 0 || end - p < 2)
		goto invalid;
	uint16_t nreq = get16(p);
	p += 2;
	if (end - p != 2 * (ptrdiff_t)nreq)
		goto invalid;
	for (unsigned i = 0; i < nreq; i++) {
		uint16_t t = get16(p + 2 * i);
		want_name |= t == NBD_INFO_NAME;
		want_desc |= t == NBD_INFO_DESCRIPTION;
	}
	if (!name_is_export(c, name, nlen)) {
		opt_error(c, NBD_REP_ERR_UNKNOWN, "export '%.*s' not present",
			  (int)(nlen > 256 ? 256 : nlen), name);
		return;
	}
	if (want_name) {
		size_t l = strlen(c->srv->name);
		uint8_t *nb = malloc(2 + l);
		if (!nb) {
			conn_set_dead(c);
			return;
		}
		put16(nb, NBD_INFO_NAME);
		memcpy(nb + 2, c->srv->name, l);
		opt_reply(c, NBD_REP_INFO, nb, 2 + l);
		free(nb);
	}
	if (want_desc && c->srv->desc) {
		size_t l = strlen(c->srv->desc);
		uint8_t *db = malloc(2 + l);
		if (!db) {
			conn_set_dead(c);
			return;
		}
		put16(db, NBD_INFO_DESCRIPTION);
		memcpy(db + 2, c->srv->desc, l);
		opt_reply(c, NBD_REP_INFO, db, 2 + l);
		free(db);
	}
	/* Block sizes, always (as qemu-nbd): any alignment is served. */
	put16(b, NBD_INFO_BLOCK_SIZE);
	put32(b + 2, 1);
	put32(b + 6, 4096);
	put32(b + 10, NBD_MAX_PAYLOAD);
	opt_reply(c, NBD_REP_INFO, b, 14);
	c->xmit_flags = conn_xmit_flags(c);
	put16(b, NBD_INFO_EXPORT);
	put64(b + 2, c->srv->size);
	put16(b + 10, c->xmit_flags);
	opt_reply(c, NBD_REP_INFO, b, 12);
	opt_reply(c, NBD_REP_ACK, NULL, 0);
	if (c->opt == NBD_OPT_GO)
		c->opt_next = NBD_E_GO;
	return;
invalid:
	opt_error(c, NBD_REP_ERR_INVALID, "malformed %s request",
		  c->opt == NBD_OPT_GO ? "NBD_OPT_GO" : "NBD_OPT_INFO");
}

#define CTX_ALLOC "base:allocation"
#define CTX_DEPTH "qemu:allocation-depth"
#define CTX_BITMAP "qemu:dirty-bitmap:"
#define CTX_ID_ALLOC 0
#define CTX_ID_DEPTH 1
#define CTX_ID_BITMAP0 2

static void ctx_reply(struct nbd_conn *c, uint32_t id, const char *name, const char *suffix)
{
	uint8_t b[4 + sizeof(CTX_BITMAP) + NBD_MAX_STRING];
	size_t l = strlen(name), ls = suffix ? strnlen(suffix, NBD_MAX_STRING) : 0;
	put32(b, id);
	memcpy(b + 4, name, l);
	if (ls)
		memcpy(b + 4 + l, suffix, ls);
	opt_reply(c, NBD_REP_META_CONTEXT, b, 4 + l + ls);
}

/* The -B bitmaps a context query of l bytes at s names: the one named
 * exactly, or (LIST only) all of them for "qemu:" or "qemu:dirty-bitmap:". */
static uint32_t ctx_bitmaps_named(const struct nbd_server *srv, const char *s, uint32_t l,
				  bool set)
{
	uint32_t all = srv->nbitmaps ? (uint32_t)((1ull << srv->nbitmaps) - 1) : 0, m = 0;
	size_t p = strlen(CTX_BITMAP);
	if (!set && ((l == 5 && !memcmp(s, "qemu:", 5)) || (l == p && !memcmp(s, CTX_BITMAP, p))))
		return all;
	if (l <= p || memcmp(s, CTX_BITMAP, p))
		return 0;
	for (unsigned i = 0; i < srv->nbitmaps; i++) {
		const char *n = srv->bitmaps[i].name;
		if (strlen(n) == l - p && !memcmp(s + p, n, l - p))
			m |= 1u << i;
	}
	return m;
}

static void opt_meta_context(struct nbd_conn *c)
{
	const uint8_t *p, *end;
	const char *name;
	uint32_t nlen;
	bool set = c->opt == NBD_OPT_SET_META_CONTEXT;
	bool alloc = false, depth = false;
	uint32_t bitmaps = 0;

	if (set && !c->structured) {
		opt_error(c, NBD_REP_ERR_INVALID, "use NBD_OPT_STRUCTURED_REPLY first");
		return;
	}
	opt_range(c, &p, &end);
	if (parse_name(&p, end, &name, &nlen) < 0 || end - p < 4)
		goto invalid;
	uint32_t nq = get32(p);
	p += 4;
	/* Check the whole request before answering anything. */
	const uint8_t *q = p;
	for (uint32_t i = 0; i < nq; i++) {
		const char *s;
		uint32_t l;
		if (parse_name(&q, end, &s, &l) < 0)
			goto invalid;
		if (l > NBD_MAX_STRING) {
			opt_error(c, NBD_REP_ERR_TOO_BIG, "context name too long");
			return;
		}
	}
	if (q != end)
		goto invalid;
	if (!name_is_export(c, name, nlen)) {
		opt_error(c, NBD_REP_ERR_UNKNOWN, "export '%.*s' not present",
			  (int)(nlen > 256 ? 256 : nlen), name);
		return;
	}
	if (nq == 0 && !set) {
		alloc = true;
		depth = c->srv->alloc_depth;
		bitmaps = ctx_bitmaps_named(c->srv, "qemu:", 5, false);
	}
	for (uint32_t i = 0; i < nq; i++) {
		const char *s;
		uint32_t l;
		if (parse_name(&p, end, &s, &l) < 0)
			break; /* cannot be: the loop above parsed the same bytes */
		bool is_alloc = l == strlen(CTX_ALLOC) && !memcmp(s, CTX_ALLOC, l);
		bool is_depth = l == strlen(CTX_DEPTH) && !memcmp(s, CTX_DEPTH, l);
		/* A bare namespace lists all of it (LIST only). */
		if (!set && l == 5 && !memcmp(s, "base:", 5))
			is_alloc = true;
		if (!set && l == 5 && !memcmp(s, "qemu:", 5))
			is_depth = true;
		alloc |= is_alloc;
		depth |= is_depth && c->srv->alloc_depth;
		bitmaps |= ctx_bitmaps_named(c->srv, s, l, set);
	}
	if (alloc)
		ctx_reply(c, CTX_ID_ALLOC, CTX_ALLOC, NULL);
	if (depth)
		ctx_reply(c, CTX_ID_DEPTH, CTX_DEPTH, NULL);
	for (unsigned i = 0; i < c->srv->nbitmaps; i++)
		if (bitmaps & (1u << i))
			ctx_reply(c, CTX_ID_BITMAP0 + i, CTX_BITMAP, c->srv->bitmaps[i].name);
	if (set) {
		c->ctx_alloc = alloc;
		c->ctx_depth = depth;
		c->ctx_bitmaps = bitmaps;
	}
	opt_reply(c, NBD_REP_ACK, NULL, 0);
	return;
invalid:
	opt_error(c, NBD_REP_ERR_INVALID, "malformed meta context request");
}

/* Answer the option in c->opt/c->optbuf: queue the replies and set
 * c->opt_next.  Returns NBD_E_ANSWERED, or NBD_E_ERROR to drop the client. */
static enum nbd_event conn_answer_option(struct nbd_conn *c)
{
	c->opt_next = NBD_E_NEXT;
	if (c->srv->tls && !c->tls_done && c->opt != NBD_OPT_STARTTLS && c->opt != NBD_OPT_ABORT) {
		if (c->opt == NBD_OPT_EXPORT_NAME)
			return NBD_E_ERROR;
		opt_error(c, NBD_REP_ERR_TLS_REQD, "Option 0x%x not permitted before TLS", c->opt);
		return NBD_E_ANSWERED;
	}
	if (c->skip || (!c->optbuf && c->optlen)) {
		/* Skipped: too long to be any option this server knows. */
		if (c->opt == NBD_OPT_EXPORT_NAME)
			return NBD_E_ERROR;
		if (c->opt < NBD_OPT_EXPORT_NAME || c->opt > NBD_OPT_SET_META_CONTEXT ||
		    c->opt == 4 /* PEEK_EXPORT, withdrawn */)
			opt_error(c, NBD_REP_ERR_UNSUP, "Unsupported option %u", c->opt);
		else
			opt_error(c, NBD_REP_ERR_TOO_BIG, "option too long");
		return NBD_E_ANSWERED;
	}
	switch (c->opt) {
	case NBD_OPT_ABORT:
		opt_reply(c, NBD_REP_ACK, NULL, 0);
		c->opt_next = NBD_E_ABORT;
		break;
	case NBD_OPT_EXPORT_NAME: {
		uint8_t b[8 + 2 + 124];
		if (!name_is_export(c, (const char *)c->optbuf, c->optlen))
			return NBD_E_ERROR;
		c->xmit_flags = conn_xmit_flags(c);
		memset(b, 0, sizeof(b));
		put64(b, c->srv->size);
		put16(b + 8, c->xmit_flags);
		conn_send_raw(c, b, c->no_zeroes ? 10 : sizeof(b));
		c->opt_next = NBD_E_GO;
		break;
	}
	case NBD_OPT_LIST: {
		if (c->optlen) {
			opt_error(c, NBD_REP_ERR_INVALID, "no payload expected");
			break;
		}
		size_t nl = strlen(c->srv->name), dl = c->srv->desc ? strlen(c->srv->desc) : 0;
		uint8_t *b = malloc(4 + nl + dl);
		if (!b)
			return NBD_E_ERROR;
		put32(b, (uint32_t)nl);
		memcpy(b + 4, c->srv->name, nl);
		if (dl)
			memcpy(b + 4 + nl, c->srv->desc, dl);
		opt_reply(c, NBD_REP_SERVER, b, 4 + nl + dl);
		free(b);
		opt_reply(c, NBD_REP_ACK, NULL, 0);
		break;
	}
	case NBD_OPT_STARTTLS:
		if (c->optlen)
			opt_error(c, NBD_REP_ERR_INVALID, "no payload expected");
		else if (c->tls_done)
			opt_error(c, NBD_REP_ERR_INVALID, "TLS already enabled");
		else if (!c->srv->tls)
			opt_error(c, NBD_REP_ERR_POLICY, "TLS not configured");
		else if (c->rpos != c->rlen)
			return NBD_E_ERROR; /* bytes after STARTTLS before its answer: injected */
		else {
			opt_reply(c, NBD_REP_ACK, NULL, 0);
			c->opt_next = NBD_E_STARTTLS;
		}
		break;
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		opt_info_go(c);
		break;
	case NBD_OPT_STRUCTURED_REPLY:
		if (c->optlen)
			opt_error(c, NBD_REP_ERR_INVALID, "no payload expected");
		else if (c->structured)
			opt_error(c, NBD_REP_ERR_INVALID, "structured reply already negotiated");
		else {
			c->structured = true;
			opt_reply(c, NBD_REP_ACK, NULL, 0);
		}
		break;
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		opt_meta_context(c);
		break;
	default:
		opt_error(c, NBD_REP_ERR_UNSUP, "Unsupported option %u", c->opt);
		break;
	}
	return NBD_E_ANSWERED;
}

/* --- requests --------------------------------------------------------------------- */

static int nbd_errno(int err)
{
	switch (-err) {
	case 0: return 0;
	case EPERM: case EROFS: case EACCES: return NBD_EPERM;
	case ENOMEM: return NBD_ENOMEM;
	case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
	case EOVERFLOW: return NBD_EOVERFLOW;
	case ENOTSUP: return NBD_ENOTSUP;
	case ESHUTDOWN: return NBD_ESHUTDOWN;
	case EINVAL: return NBD_EINVAL;
	default: return NBD_EIO;
	}
}

static void req_free(struct nbd_req *r)
{
	struct nbd_conn *c = r->c;

	assert(r->pending == 0);
	assert(c->nreqs > 0 && c->inflight_bytes >= r->bytes);
	c->nreqs--;
	c->inflight_bytes -= r->bytes;
	free(r->buf);
	free(r->walk.runs);
	free(r->hdrs);
	if (r->out.iov != r->iov_small)
		free(r->out.iov);
	free(r);
	/* Room under the caps, or one less to wait for. */
	if (c->state == NBD_S_XMIT_ADMIT || c->state == NBD_S_DRAINING)
		conn_schedule(c);
}

static void req_out_done(struct nbd_conn *c, struct nbd_out *o)
{
	req_free((struct nbd_req *)((char *)o - offsetof(struct nbd_req, out)));
}

static void req_simple_reply(struct nbd_req *r)
{
	uint8_t *h = r->hdr_small;
	put32(h, NBD_SIMPLE_REPLY_MAGIC);
	put32(h + 4, (uint32_t)nbd_errno(r->err));
	put64(h + 8, r->handle);
	r->iov_small[0] = (struct iovec){ h, NBD_SIMPLE_REPLY_SIZE };
	r->out.iovcnt = 1;
	if (r->type == NBD_CMD_READ && !r->err) {
		r->iov_small[1] = (struct iovec){ r->buf, r->len };
		r->out.iovcnt = 2;
	}
	r->out.iov = r->iov_small;
}

static void chunk_header(uint8_t *h, uint16_t flags, uint16_t type, uint64_t handle, uint32_t len)
{
	put32(h, NBD_STRUCTURED_REPLY_MAGIC);
	put16(h + 4, flags);
	put16(h + 6, type);
	put64(h + 8, handle);
	put32(h + 16, len);
}

/* One NBD_REPLY_TYPE_ERROR chunk, DONE. */
static void req_error_chunk(struct nbd_req *r)
{
	uint8_t *h = r->hdr_small;
	chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, r->handle, 6);
	put32(h + 20, (uint32_t)nbd_errno(r->err));
	put16(h + 24, 0);
	r->iov_small[0] = (struct iovec){ h, 26 };
	r->out.iov = r->iov_small;
	r->out.iovcnt = 1;
}

/* Structured READ reply: OFFSET_DATA chunks for data, OFFSET_HOLE chunks
 * for runs that read as zeros (no data bytes), the last chunk DONE.
 * Without a walk (DF, or none was possible) the data is one chunk. */
static int req_read_chunks(struct nbd_req *r)
{
	struct nbd_walk *w = &r->walk;
	unsigned n = r->walking ? w->nruns : 0;
	uint64_t covered = 0;

	if (r->len == 0) {
		chunk_header(r->hdr_small, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, r->handle, 0);
		r->iov_small[0] = (struct iovec){ r->hdr_small, NBD_CHUNK_HEADER_SIZE };
		r->out.iov = r->iov_small;
		r->out.iovcnt = 1;
		return 0;
	}
	r->hdrs = malloc((size_t)(n + 1) * 32);
	r->out.iov = malloc(sizeof(struct iovec) * (size_t)(n + 1) * 2);
	if (!r->hdrs || !r->out.iov) {
		free(r->out.iov);
		r->out.iov = NULL;
		return -ENOMEM;
	}
	int iv = 0;
	uint8_t *h = r->hdrs, *last = NULL;
	uint64_t pos = 0;
	for (unsigned i = 0; i <= n && pos < r->len; i++) {
		uint64_t len;
		bool hole;
		if (i < n) {
			len = w->runs[i].len;
			hole = w->runs[i].flags & NBD_STATE_ZERO;
			/* Merge the data runs that follow. */
			while (!hole && i + 1 < n && !(w->runs[i + 1].flags & NBD_STATE_ZERO))
				len += w->runs[++i].len;
			if (!hole && i + 1 == n) {
				len = r->len - pos; /* data to the end (runs cut short) */
				i = n;
			}
		} else {
			len = r->len - pos;
			hole = false;
		}
		if (len > r->len - pos)
			len = r->len - pos;
		last = h;
		if (hole) {
			chunk_header(h, 0, NBD_REPLY_TYPE_OFFSET_HOLE, r->handle, 12);
			put64(h + 20, r->offset + pos);
			put32(h + 28, (uint32_t)len);
			r->out.iov[iv++] = (struct iovec){ h, 32 };
		} else {
			chunk_header(h, 0, NBD_REPLY_TYPE_OFFSET_DATA, r->handle, (uint32_t)(8 + len));
			put64(h + 20, r->offset + pos);
			r->out.iov[iv++] = (struct iovec){ h, 28 };
			r->out.iov[iv++] = (struct iovec){ r->buf + pos, (size_t)len };
		}
		h += 32;
		pos += len;
		covered += len;
	}
	assert(covered == r->len && last);
	put16(last + 4, NBD_REPLY_FLAG_DONE);
	r->out.iovcnt = iv;
	return 0;
}

/* The extents of -B bitmap i over the request, into d (at most max):
 * how many.  In memory (qsm_bitmap_extent); a bitmap that cannot answer
 * (cannot be: loaded before the server started) ends the list. */
static unsigned bitmap_extents(struct nbd_req *r, unsigned i, uint8_t *d, unsigned max)
{
	const struct nbd_server *s = r->c->srv;
	uint64_t off = r->offset, end = r->offset + r->len;
	unsigned nd = 0;
	while (off < end && nd < max) {
		bool dirty;
		uint64_t len;
		uint64_t want = end - off < UINT32_MAX ? end - off : UINT32_MAX;
		if (qsm_bitmap_extent(s->img, s->bitmaps[i].index, off, want, &dirty, &len) < 0 ||
		    !len)
			break;
		put32(d + 8 * nd, (uint32_t)len);
		put32(d + 8 * nd + 4, dirty ? NBD_STATE_DIRTY : 0);
		nd++;
		off += len;
	}
	return nd;
}

/* BLOCK_STATUS reply: one chunk per negotiated context, the last DONE. */
static int req_status_chunks(struct nbd_req *r)
{
	struct nbd_conn *c = r->c;
	struct nbd_walk *w = &r->walk;
	int nwalk = (int)c->ctx_alloc + (int)c->ctx_depth;
	int nbm = __builtin_popcount(c->ctx_bitmaps), nctx = nwalk + nbm;
	unsigned bmax = r->flags & NBD_CMD_FLAG_REQ_ONE ? 1 : NBD_WALK_MAX_RUNS;
	size_t one = NBD_CHUNK_HEADER_SIZE + 4 + (size_t)w->nruns * 8;
	size_t one_bm = NBD_CHUNK_HEADER_SIZE + 4 + (size_t)bmax * 8;

	if (nctx == 0)
		return -EINVAL;
	r->hdrs = malloc(one * (size_t)nwalk + one_bm * (size_t)nbm);
	r->out.iov = malloc(sizeof(struct iovec) * (size_t)nctx);
	if (!r->hdrs || !r->out.iov) {
		free(r->out.iov);
		r->out.iov = NULL;
		return -ENOMEM;
	}
	uint8_t *h = r->hdrs;
	int iv = 0;
	for (int k = 0; k < 2; k++) {
		bool depth = k == 1;
		if (depth ? !c->ctx_depth : !c->ctx_alloc)
			continue;
		uint8_t *d = h + NBD_CHUNK_HEADER_SIZE + 4;
		unsigned nd = 0;
		for (unsigned i = 0; i < w->nruns; i++) {
			uint32_t v = depth ? w->runs[i].depth : w->runs[i].flags;
			uint64_t len = w->runs[i].len;
			while (i + 1 < w->nruns &&
			       (depth ? w->runs[i + 1].depth : w->runs[i + 1].flags) == v &&
			       len + w->runs[i + 1].len <= UINT32_MAX)
				len += w->runs[++i].len;
			put32(d + 8 * nd, (uint32_t)len);
			put32(d + 8 * nd + 4, v);
			nd++;
			if (r->flags & NBD_CMD_FLAG_REQ_ONE)
				break;
		}
		size_t clen = 4 + (size_t)nd * 8;
		chunk_header(h, 0, NBD_REPLY_TYPE_BLOCK_STATUS, r->handle, (uint32_t)clen);
		put32(h + NBD_CHUNK_HEADER_SIZE, depth ? CTX_ID_DEPTH : CTX_ID_ALLOC);
		r->out.iov[iv++] = (struct iovec){ h, NBD_CHUNK_HEADER_SIZE + clen };
		h += one;
	}
	for (unsigned i = 0; i < c->srv->nbitmaps; i++) {
		if (!(c->ctx_bitmaps & (1u << i)))
			continue;
		unsigned nd = bitmap_extents(r, i, h + NBD_CHUNK_HEADER_SIZE + 4, bmax);
		if (!nd)
			return -EIO;
		size_t clen = 4 + (size_t)nd * 8;
		chunk_header(h, 0, NBD_REPLY_TYPE_BLOCK_STATUS, r->handle, (uint32_t)clen);
		put32(h + NBD_CHUNK_HEADER_SIZE, CTX_ID_BITMAP0 + i);
		r->out.iov[iv++] = (struct iovec){ h, NBD_CHUNK_HEADER_SIZE + clen };
		h += one_bm;
	}
	put16((uint8_t *)r->out.iov[iv - 1].iov_base + 4, NBD_REPLY_FLAG_DONE);
	r->out.iovcnt = iv;
	return 0;
}

/* Every engine operation of r is over: build and queue its reply. */
static void req_finish(struct nbd_req *r)
{
	struct nbd_conn *c = r->c;

	assert(r->pending == 0);
	c->srv->reqs++;
	if (trace_on)
		fprintf(stderr, "nbd conn#%llu req type %u off %llu len %u: %d\n",
			(unsigned long long)c->id, r->type, (unsigned long long)r->offset, r->len, r->err);
	if (c->structured && (r->type == NBD_CMD_READ || r->type == NBD_CMD_BLOCK_STATUS)) {
		int ret = r->err;
		if (!ret)
			ret = r->type == NBD_CMD_READ ? req_read_chunks(r) : req_status_chunks(r);
		if (ret) {
			r->err = ret;
			req_error_chunk(r);
		}
	} else {
		req_simple_reply(r);
	}
	r->out.done = req_out_done;
	conn_queue_later(c, &r->out);
}

static void req_op_cb(void *opaque, int ret);

static void req_op_done(struct nbd_req *r, int ret)
{
	if (ret < 0 && !r->err)
		r->err = ret;
	assert(r->pending > 0);
	if (--r->pending)
		return;
	if (r->flush_after && !r->err) {
		r->flush_after = false;
		int e = qsm_flush(r->c->srv->img, req_op_cb, r);
		if (e == 0) {
			r->pending++;
			return;
		}
		r->err = e;
	}
	req_finish(r);
}

static void req_op_cb(void *opaque, int ret)
{
	req_op_done(opaque, ret);
}

static void walk_query(struct nbd_req *r);

/* Record a decided run of the walk and go on, or end the walk (its one
 * pending operation) when the range is covered or has enough runs. */
static void walk_record(struct nbd_req *r, uint64_t len, uint32_t flags, uint32_t depth)
{
	struct nbd_walk *w = &r->walk;
	struct nbd_run *last = w->nruns ? &w->runs[w->nruns - 1] : NULL;

	if (last && last->flags == flags && last->depth == depth && last->len + len <= UINT32_MAX) {
		last->len += len;
	} else {
		if (w->nruns == w->cap) {
			unsigned cap = w->cap ? 2 * w->cap : 8;
			struct nbd_run *nr = realloc(w->runs, sizeof(*nr) * cap);
			if (!nr) {
				req_op_done(r, -ENOMEM);
				return;
			}
			w->runs = nr;
			w->cap = cap;
		}
		w->runs[w->nruns++] = (struct nbd_run){ len, flags, depth };
	}
	w->off += len;
	w->layer = 0;
	w->seg_end = w->end;
	if (w->off >= w->end || w->nruns >= w->max_runs) {
		req_op_done(r, 0);
		return;
	}
	walk_query(r);
}

static void walk_cb(void *opaque, int ret)
{
	struct nbd_req *r = opaque;
	struct nbd_walk *w = &r->walk;
	struct nbd_server *s = r->c->srv;

	if (ret < 0) {
		req_op_done(r, ret);
		return;
	}
	uint64_t len = w->ext.length;
	if (len == 0 || len > w->lim - w->off)
		len = w->lim - w->off;
	unsigned f = w->ext.flags;
	if (f & (QSM_STATUS_DATA | QSM_STATUS_ZERO)) {
		uint32_t nf = (f & QSM_STATUS_DATA ? 0 : NBD_STATE_HOLE) |
			      (f & QSM_STATUS_ZERO ? NBD_STATE_ZERO : 0);
		uint32_t depth = f & QSM_STATUS_ALLOCATED ? (uint32_t)w->layer + 1 : 0;
		walk_record(r, len, nf, depth);
	} else if (w->layer + 1 >= s->nlayers) {
		walk_record(r, len, NBD_STATE_HOLE | NBD_STATE_ZERO, 0);
	} else {
		/* Unallocated here: the backing image decides this run. */
		w->layer++;
		w->seg_end = w->off + len;
		walk_query(r);
	}
}

/* Ask the current layer about [off, seg_end). */
static void walk_query(struct nbd_req *r)
{
	struct nbd_walk *w = &r->walk;
	struct nbd_server *s = r->c->srv;

	w->lim = w->seg_end;
	if (w->layer > 0) {
		if (w->off >= s->layer_size[w->layer]) {
			/* Past the end of a shorter backing image: zeros, decided
			 * by the layer above (as QEMU reports it). */
			walk_record(r, w->seg_end - w->off, NBD_STATE_HOLE | NBD_STATE_ZERO,
				    (uint32_t)w->layer);
			return;
		}
		if (w->lim > s->layer_size[w->layer])
			w->lim = s->layer_size[w->layer];
	}
	int e = qsm_block_status(s->layers[w->layer], w->off, w->lim - w->off, &w->ext, walk_cb, r);
	if (e < 0)
		req_op_done(r, e);
}

/* Start the walk of [offset, offset + len) as one pending operation. */
static void walk_start(struct nbd_req *r, unsigned max_runs)
{
	struct nbd_walk *w = &r->walk;

	r->walking = true;
	w->off = r->offset;
	w->end = w->seg_end = r->offset + r->len;
	w->layer = 0;
	w->max_runs = max_runs;
	r->pending++;
	walk_query(r);
}

/* Is [off, off + len) inside the export? */
static bool in_export(const struct nbd_server *s, uint64_t off, uint64_t len)
{
	return off <= s->size && len <= s->size - off;
}

/*
 * Check the request in c->hdr and make it a request object (charged to the
 * caps).  Sets r->err for a request answered without the engine.  Returns
 * NULL when the connection must end (bad magic, a write payload beyond
 * the maximum: the stream cannot be trusted any more).
 */
static struct nbd_req *req_new(struct nbd_conn *c, int *fatal)
{
	const uint8_t *h = c->hdr;
	struct nbd_server *s = c->srv;
	struct nbd_req *r;

	*fatal = 0;
	if (get32(h) != NBD_REQUEST_MAGIC) {
		*fatal = -EINVAL;
		return NULL;
	}
	uint16_t flags = get16(h + 4), type = get16(h + 6);
	uint32_t len = get32(h + 24);
	if (type == NBD_CMD_WRITE && len > NBD_MAX_PAYLOAD) {
		*fatal = -EINVAL;
		return NULL;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		*fatal = -ENOMEM;
		return NULL;
	}
	r->c = c;
	r->flags = flags;
	r->type = type;
	r->handle = get64(h + 8);
	r->offset = get64(h + 16);
	r->len = len;
	c->nreqs++;

	uint16_t valid = NBD_CMD_FLAG_FUA;
	switch (type) {
	case NBD_CMD_READ:
		if (c->structured)
			valid |= NBD_CMD_FLAG_DF;
		break;
	case NBD_CMD_WRITE_ZEROES:
		valid |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
		break;
	case NBD_CMD_BLOCK_STATUS:
		valid |= NBD_CMD_FLAG_REQ_ONE;
		break;
	case NBD_CMD_WRITE: case NBD_CMD_FLUSH: case NBD_CMD_TRIM: case NBD_CMD_CACHE:
		break;
	default:
		r->err = -EINVAL; /* unknown command */
		return r;
	}
	if (flags & ~valid) {
		r->err = -EINVAL;
	} else if (type == NBD_CMD_READ && len > NBD_MAX_PAYLOAD) {
		r->err = -EINVAL;
	} else if (type != NBD_CMD_FLUSH && !in_export(s, r->offset, len)) {
		r->err = -EINVAL;
	} else if (s->read_only && (type == NBD_CMD_WRITE || type == NBD_CMD_TRIM ||
				    type == NBD_CMD_WRITE_ZEROES)) {
		r->err = -EPERM;
	} else if (type == NBD_CMD_BLOCK_STATUS &&
		   (len == 0 || (!c->ctx_alloc && !c->ctx_depth && !c->ctx_bitmaps))) {
		r->err = -EINVAL;
	}
	if (type == NBD_CMD_WRITE || (type == NBD_CMD_READ && !r->err)) {
		r->bytes = len;
		c->inflight_bytes += len;
	}
	return r;
}

/* Could a zero write of [off, off + len) be done without writing data?
 * Whole clusters of a qcow2 image (or up to its end), and any range of a
 * raw one (the file's zero range). */
static bool zero_is_fast(const struct nbd_server *s, uint64_t off, uint64_t len)
{
	uint64_t cs = s->cluster_size;
	if (!cs)
		return true;
	return off % cs == 0 && (len % cs == 0 || off + len == s->size);
}

/* Hand the admitted request (payload read) to the engine, or answer it. */
static void req_submit(struct nbd_req *r)
{
	struct nbd_conn *c = r->c;
	struct nbd_server *s = c->srv;
	int e = 0;

	if (r->err || r->len == 0 ||
	    (r->type == NBD_CMD_TRIM && !s->discard_unmap)) {
		if (r->type != NBD_CMD_FLUSH || r->err) {
			req_finish(r);
			return;
		}
	}
	r->pending++;
	switch (r->type) {
	case NBD_CMD_READ: {
		r->data_iov = (struct iovec){ r->buf, r->len };
		e = qsm_readv(s->img, r->offset, &r->data_iov, 1, req_op_cb, r);
		if (e == 0 && c->structured && !(r->flags & NBD_CMD_FLAG_DF))
			walk_start(r, NBD_WALK_MAX_RUNS);
		break;
	}
	case NBD_CMD_WRITE: {
		r->data_iov = (struct iovec){ r->buf, r->len };
		e = qsm_writev_flags(s->img, r->offset, &r->data_iov, 1,
				     r->flags & NBD_CMD_FLAG_FUA ? QSM_REQ_FUA : 0, req_op_cb, r);
		break;
	}
	case NBD_CMD_FLUSH:
		e = qsm_flush(s->img, req_op_cb, r);
		break;
	case NBD_CMD_TRIM:
		r->flush_after = r->flags & NBD_CMD_FLAG_FUA;
		e = qsm_discard(s->img, r->offset, r->len, req_op_cb, r);
		break;
	case NBD_CMD_WRITE_ZEROES: {
		unsigned zf = 0;
		if (!(r->flags & NBD_CMD_FLAG_NO_HOLE) && s->discard_unmap)
			zf |= QSM_ZERO_MAY_UNMAP;
		if (r->flags & NBD_CMD_FLAG_FUA)
			zf |= QSM_ZERO_FUA;
		if ((r->flags & NBD_CMD_FLAG_FAST_ZERO) && !zero_is_fast(s, r->offset, r->len))
			e = -ENOTSUP;
		else
			e = qsm_write_zeroes(s->img, r->offset, r->len, zf, req_op_cb, r);
		break;
	}
	case NBD_CMD_BLOCK_STATUS:
		r->pending--; /* the walk is the operation */
		if (!c->ctx_alloc && !c->ctx_depth) {
			req_finish(r); /* bitmaps alone: in memory, no walk */
			return;
		}
		walk_start(r, r->flags & NBD_CMD_FLAG_REQ_ONE ? 1 : NBD_WALK_MAX_RUNS);
		return;
	case NBD_CMD_CACHE:
		/* Advisory: bring the range's metadata into the caches. */
		r->pending--;
		walk_start(r, NBD_WALK_MAX_RUNS);
		return;
	default:
		abort();
	}
	if (e < 0) {
		/* Refused at submit: no callback will come for this operation. */
		req_op_done(r, e);
	}
}

/* --- steps ---------------------------------------------------------------------- */

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg);

static enum nbd_event step_accepted(struct nbd_conn *c)
{
	uint8_t g[18];

	put64(g, NBD_INIT_MAGIC);
	put64(g + 8, NBD_OPTS_MAGIC);
	put16(g + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	conn_send_raw(c, g, sizeof(g));
	if (c->srv->handshake_secs) {
		struct timeval tv = { (time_t)c->srv->handshake_secs, 0 };
		evtimer_add(c->timer, &tv);
	}
	return NBD_E_QUEUED;
}

/* What ends a handshake step before it does anything. */
static int handshake_abort(struct nbd_conn *c)
{
	if (c->srv->stopping)
		return NBD_E_SHUTDOWN;
	if (c->timed_out)
		return NBD_E_TIMEOUT;
	if (c->dead)
		return NBD_E_ERROR;
	return NBD_E__WAIT;
}

static enum nbd_event step_greeting(struct nbd_conn *c)
{
	int a = handshake_abort(c);
	if (a != NBD_E__WAIT)
		return a;
	conn_want_read(c, false);
	return TAILQ_EMPTY(&c->outq) ? NBD_E_SENT : NBD_E__WAIT;
}

static enum nbd_event step_client_flags(struct nbd_conn *c)
{
	int a = handshake_abort(c);
	if (a != NBD_E__WAIT)
		return a;
	int r = conn_read_exact(c, c->hdr, 4);
	if (r == 0)
		return NBD_E__WAIT;
	if (r < 0)
		return NBD_E_ERROR;
	uint32_t f = get32(c->hdr);
	if (f & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
		return NBD_E_ERROR; /* unknown client flags: the spec says disconnect */
	c->no_zeroes = f & NBD_FLAG_C_NO_ZEROES;
	return NBD_E_FLAGS_OK;
}

static enum nbd_event step_opt_header(struct nbd_conn *c)
{
	int a = handshake_abort(c);
	if (a != NBD_E__WAIT)
		return a;
	int r = conn_read_exact(c, c->hdr, 16);
	if (r == 0)
		return NBD_E__WAIT;
	if (r < 0 || get64(c->hdr) != NBD_OPTS_MAGIC)
		return NBD_E_ERROR;
	c->opt = get32(c->hdr + 8);
	c->optlen = get32(c->hdr + 12);
	free(c->optbuf);
	c->optbuf = NULL;
	c->skip = 0;
	/* As qemu-nbd: an option announcing more than the largest payload is
	 * not haggled over (nor its gigabytes read): the connection ends. */
	if (c->optlen > NBD_MAX_PAYLOAD)
		return NBD_E_ERROR;
	if (c->optlen > NBD_OPT_MAX) {
		c->skip = c->optlen;
	} else if (c->optlen) {
		c->optbuf = malloc(c->optlen);
		if (!c->optbuf)
			return NBD_E_ERROR;
	}
	return NBD_E_OPT;
}

static enum nbd_event step_opt_data(struct nbd_conn *c)
{
	int a = handshake_abort(c);
	if (a != NBD_E__WAIT)
		return a;
	while (c->skip) {
		size_t n = c->skip > NBD_INBUF ? NBD_INBUF : (size_t)c->skip;
		int r = conn_read_exact(c, NULL, n);
		if (r == 0)
			return NBD_E__WAIT;
		if (r < 0)
			return NBD_E_ERROR;
		c->skip -= n;
	}
	if (c->optbuf) {
		int r = conn_read_exact(c, c->optbuf, c->optlen);
		if (r == 0)
			return NBD_E__WAIT;
		if (r < 0)
			return NBD_E_ERROR;
	}
	if (c->optlen > NBD_OPT_MAX)
		c->skip = 1; /* remembered as "skipped" for the answer */
	enum nbd_event e = conn_answer_option(c);
	c->skip = 0;
	return e;
}

static enum nbd_event step_opt_reply(struct nbd_conn *c)
{
	int a = handshake_abort(c);
	if (a != NBD_E__WAIT)
		return a;
	conn_want_read(c, false);
	if (!TAILQ_EMPTY(&c->outq))
		return NBD_E__WAIT;
	if (c->opt_next == NBD_E_GO) {
		event_del(c->timer);
		c->negotiated = true;
	}
#ifdef QSM_NBD_TLS
	if (c->opt_next == NBD_E_STARTTLS) {
		if (nbd_tls_new(c->srv->tls, c->fd, &c->tls) < 0)
			return NBD_E_ERROR;
	}
#endif
	return c->opt_next;
}

static enum nbd_event step_tls_handshake(struct nbd_conn *c)
{
	int a = handshake_abort(c);
	if (a != NBD_E__WAIT)
		return a;
#ifdef QSM_NBD_TLS
	int r = nbd_tls_handshake(c->tls);
	if (r == -EAGAIN) {
		bool w = nbd_tls_want_write(c->tls);
		conn_want_write(c, w);
		conn_want_read(c, !w);
		return NBD_E__WAIT;
	}
	if (r < 0) {
		if (trace_on)
			fprintf(stderr, "nbd conn#%llu: TLS handshake failed: %s\n",
				(unsigned long long)c->id, nbd_tls_error(c->tls));
		return NBD_E_ERROR;
	}
	conn_want_write(c, false);
	c->tls_done = true;
	return NBD_E_TLS_DONE;
#else
	return NBD_E_ERROR;
#endif
}

static enum nbd_event xmit_abort(struct nbd_conn *c)
{
	if (c->srv->stopping)
		return NBD_E_SHUTDOWN;
	if (c->dead)
		return NBD_E_ERROR;
	return NBD_E__WAIT;
}

static enum nbd_event step_xmit_header(struct nbd_conn *c)
{
	int a = xmit_abort(c);
	if (a != NBD_E__WAIT)
		return a;
	int r = conn_read_exact(c, c->hdr, NBD_REQUEST_SIZE);
	if (r == 0)
		return NBD_E__WAIT;
	if (r == -EPIPE)
		return c->rd_have == 0 ? NBD_E_EOF : NBD_E_ERROR;
	if (r < 0)
		return NBD_E_ERROR;
	return NBD_E_HEADER;
}

static enum nbd_event step_xmit_admit(struct nbd_conn *c)
{
	int a = xmit_abort(c);
	if (a != NBD_E__WAIT)
		return a;
	uint16_t type = get16(c->hdr + 6);
	uint32_t len = get32(c->hdr + 24);
	if (get32(c->hdr) == NBD_REQUEST_MAGIC && type == NBD_CMD_DISC)
		return NBD_E_DISC;
	size_t need = type == NBD_CMD_READ || type == NBD_CMD_WRITE ? len : 0;
	if (need > NBD_MAX_PAYLOAD)
		need = 0; /* refused without a buffer */
	if (c->nreqs >= NBD_CONN_MAX_REQS ||
	    (c->inflight_bytes && c->inflight_bytes + need > NBD_CONN_MAX_BYTES)) {
		conn_want_read(c, false);
		return NBD_E__WAIT; /* req_free() kicks */
	}
	int fatal;
	struct nbd_req *r = req_new(c, &fatal);
	if (!r)
		return NBD_E_ERROR;
	if (r->bytes) {
		/* Page-aligned, so that with cache=none the engine's direct
		 * I/O takes the buffer as it is instead of copying it. */
		void *buf;
		r->buf = posix_memalign(&buf, NBD_BUF_ALIGN, r->bytes) ? NULL : buf;
		if (!r->buf) {
			r->err = -ENOMEM;
			if (r->type == NBD_CMD_WRITE) {
				req_free(r);
				return NBD_E_ERROR;
			}
		}
	}
	if (r->type == NBD_CMD_WRITE) {
		c->cur = r;
		return NBD_E_WRITE;
	}
	req_submit(r);
	return NBD_E_SUBMITTED;
}

static enum nbd_event step_xmit_payload(struct nbd_conn *c)
{
	struct nbd_req *r = c->cur;
	int a = xmit_abort(c);
	int rd = a != NBD_E__WAIT ? -ECANCELED : conn_read_exact(c, r->buf, r->len);
	if (rd == 0)
		return NBD_E__WAIT;
	c->cur = NULL;
	if (rd < 0) {
		c->rd_active = false;
		req_free(r); /* never submitted */
		return a != NBD_E__WAIT ? a : rd == -EPIPE ? NBD_E_EOF : NBD_E_ERROR;
	}
	req_submit(r);
	return NBD_E_SUBMITTED;
}

static enum nbd_event step_draining(struct nbd_conn *c)
{
	conn_want_read(c, false);
	if (c->nreqs || (!c->dead && !TAILQ_EMPTY(&c->outq)))
		return NBD_E__WAIT;
	return NBD_E_IDLE;
}

static enum nbd_event step_closed(struct nbd_conn *c)
{
	abort(); /* conn_run frees the connection on entering CLOSED */
}

static enum nbd_event (*const steps[NBD_S__COUNT])(struct nbd_conn *) = {
	[NBD_S_ACCEPTED] = step_accepted,
	[NBD_S_GREETING] = step_greeting,
	[NBD_S_CLIENT_FLAGS] = step_client_flags,
	[NBD_S_OPT_HEADER] = step_opt_header,
	[NBD_S_OPT_DATA] = step_opt_data,
	[NBD_S_OPT_REPLY] = step_opt_reply,
	[NBD_S_TLS_HANDSHAKE] = step_tls_handshake,
	[NBD_S_XMIT_HEADER] = step_xmit_header,
	[NBD_S_XMIT_ADMIT] = step_xmit_admit,
	[NBD_S_XMIT_PAYLOAD] = step_xmit_payload,
	[NBD_S_DRAINING] = step_draining,
	[NBD_S_CLOSED] = step_closed,
};

/* --- dispatcher and lifetime ------------------------------------------------------- */

static void conn_free(struct nbd_conn *c)
{
	struct nbd_server *s = c->srv;
	struct nbd_out *o;

	assert(c->nreqs == 0 && !c->cur);
	while ((o = TAILQ_FIRST(&c->outq))) {
		TAILQ_REMOVE(&c->outq, o, link);
		o->done(c, o);
	}
	event_free(c->rev);
	event_free(c->wev);
	event_free(c->kick);
	event_free(c->flush);
	event_free(c->timer);
#ifdef QSM_NBD_TLS
	if (c->tls) {
		if (!c->dead)
			(void)nbd_tls_bye(c->tls);
		nbd_tls_free(c->tls);
	}
#endif
	close(c->fd);
	free(c->inbuf);
	free(c->optbuf);
	LIST_REMOVE(c, link);
	bool c_negotiated = c->negotiated;
	free(c);
	s->nconns--;
	if (s->on_close)
		s->on_close(s, c_negotiated);
}

static enum nbd_state transition(enum nbd_state from, enum nbd_event ev)
{
	for (size_t i = 0; i < sizeof(transitions) / sizeof(transitions[0]); i++)
		if (transitions[i].from == from && transitions[i].ev == ev)
			return transitions[i].to;
	fprintf(stderr, "nbd: no transition from %s on %s\n", state_names[from], event_names[ev]);
	abort();
}

/* The one dispatcher: follow ev from the current state, then run steps
 * until one waits.  Frees the connection when it reaches CLOSED. */
static void conn_run(struct nbd_conn *c, enum nbd_event ev)
{
	assert(!c->running);
	c->running = true;
	for (;;) {
		if (ev == NBD_E__WAIT) {
			if (!c->rekick)
				break;
			c->rekick = false;
			ev = steps[c->state](c);
			continue;
		}
		enum nbd_state to = transition(c->state, ev);
		if (trace_on)
			fprintf(stderr, "nbd conn#%llu %s --%s--> %s\n", (unsigned long long)c->id,
				state_names[c->state], event_names[ev], state_names[to]);
		c->state = to;
		if (to == NBD_S_CLOSED) {
			conn_free(c);
			return;
		}
		ev = steps[to](c);
	}
	c->running = false;
}

static void conn_resume(struct nbd_conn *c)
{
	if (c->running) {
		c->rekick = true;
		return;
	}
	c->running = true;
	enum nbd_event ev = steps[c->state](c);
	c->running = false;
	conn_run(c, ev);
}

static void conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	c->rx_empty = false;
	conn_resume(c);
}

static void conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	if (c->state != NBD_S_TLS_HANDSHAKE)
		conn_flush_out(c);
	conn_resume(c);
}

static void conn_kick_cb(evutil_socket_t fd, short what, void *arg)
{
	conn_resume(arg);
}

static void conn_flush_cb(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	c->flush_pending = false;
	conn_flush_out(c); /* a reply sent frees its request, which kicks */
}

/* The connection's one timer: the handshake limit until GO (step_opt_reply
 * deletes it there), then the drain limit once the server stops
 * (server.h contract 3): the replies not yet sent are dropped, and
 * DRAINING waits only for the engine. */
static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	if (c->state < NBD_S_XMIT_HEADER) {
		c->timed_out = true;
	} else if (!c->dead) {
		fprintf(stderr, "nbd conn#%llu: replies not taken %u s after the shutdown: "
			"%zu requests' replies dropped, connection closed\n",
			(unsigned long long)c->id, c->srv->drain_secs, (size_t)c->nreqs);
		conn_set_dead(c);
	}
	conn_resume(c);
}

int nbd_conn_start(struct nbd_server *srv, int fd)
{
	struct nbd_conn *c = calloc(1, sizeof(*c));

	trace_on = getenv("QSM_NBD_TRACE") != NULL;
	if (!c || !(c->inbuf = malloc(NBD_INBUF))) {
		free(c);
		close(fd);
		return -ENOMEM;
	}
	c->srv = srv;
	c->fd = fd;
	c->id = next_conn_id++;
	c->state = NBD_S_ACCEPTED;
	TAILQ_INIT(&c->outq);
	c->rev = event_new(srv->base, fd, EV_READ | EV_PERSIST, conn_read_cb, c);
	c->wev = event_new(srv->base, fd, EV_WRITE | EV_PERSIST, conn_write_cb, c);
	c->kick = event_new(srv->base, -1, 0, conn_kick_cb, c);
	c->flush = event_new(srv->base, -1, 0, conn_flush_cb, c);
	c->timer = evtimer_new(srv->base, conn_timer_cb, c);
	if (!c->rev || !c->wev || !c->kick || !c->flush || !c->timer) {
		if (c->rev) event_free(c->rev);
		if (c->wev) event_free(c->wev);
		if (c->kick) event_free(c->kick);
		if (c->flush) event_free(c->flush);
		if (c->timer) event_free(c->timer);
		free(c->inbuf);
		free(c);
		close(fd);
		return -ENOMEM;
	}
	LIST_INSERT_HEAD(&srv->conns, c, link);
	srv->nconns++;
	conn_schedule(c);
	return 0;
}

void nbd_server_init(struct nbd_server *srv, struct event_base *base, struct qsm_image *img)
{
	struct qsm_info in;

	srv->base = base;
	srv->img = img;
	qsm_get_info(img, &in);
	srv->size = in.virtual_size;
	srv->cluster_size = strcmp(in.format, "raw") ? in.cluster_size : 0;
	srv->nlayers = 0;
	for (struct qsm_image *l = img; l && srv->nlayers < NBD_MAX_LAYERS; l = qsm_get_backing(l)) {
		struct qsm_info li;
		qsm_get_info(l, &li);
		srv->layers[srv->nlayers] = l;
		srv->layer_size[srv->nlayers++] = li.virtual_size;
	}
	srv->drain_secs = NBD_DRAIN_SECS_DEFAULT;
	LIST_INIT(&srv->conns);
}

void nbd_server_shutdown(struct nbd_server *srv)
{
	struct nbd_conn *c;
	struct timeval tv = { (time_t)srv->drain_secs, 0 };

	if (srv->stopping)
		return;
	srv->stopping = true;
	LIST_FOREACH(c, &srv->conns, link) {
		/* Handshakes close at their next step; transmissions drain,
		 * for at most drain_secs (contract 3). */
		if (c->state >= NBD_S_XMIT_HEADER && c->state != NBD_S_CLOSED)
			evtimer_add(c->timer, &tv);
		conn_schedule(c);
	}
}
