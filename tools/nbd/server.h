/*
 * tools/nbd/server.h: the NBD export of `qsm nbd` (tools/cmd_nbd.c owns the
 * command line, the listening socket, signals and the image; this module
 * owns the connections).
 *
 * One image, one engine, one libevent loop: every connection is a state
 * machine (tools/nbd/conn_states.def) on the loop of the image, its
 * requests go to the engine through sm/qsm.h only, and nothing here blocks.
 *
 * Contracts:
 *  1. nbd_conn_start() takes the accepted socket (non-blocking) whatever it
 *     returns; the connection lives until its machine reaches CLOSED, which
 *     happens only once none of its requests is in the engine any more, so
 *     no engine callback can outlive it.
 *  2. srv->on_close(srv, negotiated) runs (from the loop) after each connection is
 *     freed, with srv->nconns already decremented.
 *  3. nbd_server_shutdown() makes every connection stop reading: handshakes
 *     close at once, transmissions finish the requests they started, send
 *     the replies (to a client still reading them) and close.  A client
 *     that does not take its replies within srv->drain_secs of the
 *     shutdown loses them: the connection drops its unsent output, waits
 *     only for its requests still in the engine, and closes, so a client
 *     that never reads cannot keep the server alive.  (qemu-nbd 7.2 has
 *     no such limit: test_nbd_multi's drain case finds it still running
 *     30 s after SIGTERM, waiting for that client.)
 *  4. nbd_server_init() and nbd_conn_start() are all a host needs: any
 *     connected stream socket can be served (cmd_nbd.c's accepted sockets,
 *     a socketpair in tests/fuzz/fuzz_nbd.c); no listening socket is
 *     involved here.
 */
#ifndef QSM_TOOLS_NBD_SERVER_H
#define QSM_TOOLS_NBD_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

struct event_base;
struct qsm_image;
struct nbd_tls_creds;
struct nbd_conn;

#define NBD_MAX_BITMAPS 16  /* -B given at most this often */
#define NBD_MAX_LAYERS 65   /* an image and its backing chain (qsm opens at most 64 below) */

struct nbd_server {
	struct event_base *base;
	struct qsm_image *img;
	/* The backing chain, for block status: layers[0] is img. */
	struct qsm_image *layers[NBD_MAX_LAYERS];
	uint64_t layer_size[NBD_MAX_LAYERS];
	int nlayers;
	uint64_t size;           /* export size (img's virtual size) */
	uint64_t cluster_size;   /* 0 for raw images */
	const char *name;        /* export name (-x), "" by default */
	const char *desc;        /* description (-D) or NULL */
	bool read_only;          /* -r */
	bool discard_unmap;      /* --discard=unmap: TRIM and MAY_UNMAP reach the engine */
	bool alloc_depth;        /* -A: qemu:allocation-depth offered */
	/* -B: qemu:dirty-bitmap:NAME offered for each (loaded by the caller,
	 * qsm_bitmap_load), context id NBD_CTX_ID_BITMAP0 + i. */
	unsigned nbitmaps;
	struct {
		const char *name;
		unsigned index;  /* qsm_bitmap_find's */
	} bitmaps[NBD_MAX_BITMAPS];
	bool multi_conn;         /* advertise CAN_MULTI_CONN */
	struct nbd_tls_creds *tls; /* --tls-creds: TLS required; NULL: no TLS */
	unsigned handshake_secs; /* time limit of the handshake; 0: none */
	unsigned drain_secs;     /* contract 3: replies' grace time after a shutdown */
	bool stopping;
	int nconns;
	LIST_HEAD(, nbd_conn) conns;
	/* A connection closed; negotiated: it had reached transmission. */
	void (*on_close)(struct nbd_server *srv, bool negotiated);
	void *opaque;
	/* Totals, for tests and the exit log. */
	uint64_t reqs, bytes_in, bytes_out;
};

#define NBD_DRAIN_SECS_DEFAULT 5

/* Set the fields that come from the image (base, img, size, cluster_size,
 * the backing chain for block status), drain_secs to its default, and an
 * empty connection list; the caller's other fields (name, desc, flags,
 * handshake_secs, on_close...) are left as they are.  The image stays the
 * caller's: it must outlive every connection. */
void nbd_server_init(struct nbd_server *srv, struct event_base *base, struct qsm_image *img);
/* Serve one accepted connection; 0 or -errno (the fd is closed then). */
int nbd_conn_start(struct nbd_server *srv, int fd);
/* Stop every connection (contract 3). */
void nbd_server_shutdown(struct nbd_server *srv);

#endif
