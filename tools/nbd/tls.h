/*
 * tools/nbd/tls.h: the TLS layer of `qsm nbd` (server side only), on GnuTLS.
 *
 * What it is
 * ----------
 * X.509 credentials loaded from a directory laid out as QEMU's
 * `--object tls-creds-x509,dir=DIR,endpoint=server` reads it, and one TLS
 * server session per NBD connection, driven by the connection's own event
 * loop after NBD_OPT_STARTTLS.  No cryptography is written here: GnuTLS does
 * the handshake, the record layer, certificate parsing and verification; this
 * file only chooses GnuTLS's settings, feeds it the socket and turns its
 * results into qsm's conventions (0 or negative errno, a message per failure).
 * It is part of the qsm tool (a module qsm loads when asked for TLS, see
 * "Loading" at the end), never of libqsm: the engine does not depend on
 * GnuTLS.
 *
 * The credentials directory (the names QEMU 7.2's crypto/tlscredsx509.c
 * reads for a server endpoint)
 *   ca-cert.pem      CA certificate(s) that sign client certificates  required
 *   server-cert.pem  this server's certificate (signed by that CA)     required
 *   server-key.pem   its private key, unencrypted                       required
 *   ca-crl.pem       revoked client certificates                        optional
 *   dh-params.pem    PKCS#3 Diffie-Hellman parameters                   optional
 * A required file that cannot be stat()ed fails with QEMU's message
 * "Unable to access credentials DIR/NAME: <strerror>".  As QEMU's default
 * sanity-check=on does, loading also refuses a server certificate that is
 * not valid now, is itself a CA, or does not verify against ca-cert.pem, a
 * CA certificate that is not a CA or not valid now, and a key that does not
 * match the certificate; each message names the file(s).  Differences from
 * QEMU: without dh-params.pem QEMU generates fresh 2048-bit DH parameters
 * at start-up (seconds of CPU); qsm uses the RFC 7919 group of GnuTLS's
 * "medium" security level instead (gnutls_certificate_set_known_dh_params),
 * which is what the DHE key exchanges of TLS 1.2 negotiate with today's
 * clients anyway (TLS 1.3 and ECDHE do not use these parameters).
 *
 * verify_peer (QEMU's verify-peer property, default true in QEMU for every
 * tls-creds object, servers included): when set, a client must present a
 * certificate that verifies against ca-cert.pem (and is not in ca-crl.pem,
 * is within its validity period, uses no insecure algorithm), otherwise the
 * handshake fails with -EACCES and nbd_tls_error() says why; the client is
 * sent the matching TLS alert.  QEMU requests the certificate during the
 * handshake and checks it after; qsm has GnuTLS require and verify it during
 * the handshake (gnutls_session_set_verify_cert), so a refused client never
 * completes a handshake.  When clear, a client certificate is requested but
 * neither required nor checked (QEMU's behaviour).
 *
 * Priority string: "NORMAL", what QEMU 7.2 uses when the tls-creds object
 * has no priority property (CONFIG_TLS_PRIORITY, "NORMAL" by default and in
 * Debian's build: crypto/tlssession.c passes it to
 * gnutls_priority_set_direct).  So TLS 1.3 and 1.2 with the system's
 * default ciphers.  Session tickets are off (GNUTLS_NO_TICKETS): every
 * connection authenticates with a full handshake.
 *
 * Contracts
 *  1. Non-blocking only.  Every call returns at once: it never waits for the
 *     socket and never loops waiting for readiness (it loops only over EINTR).
 *     -EAGAIN means "nothing more can happen until the fd is ready": readable,
 *     or writable when nbd_tls_want_write(t) says so (see 4).  The fd must be
 *     O_NONBLOCK; this file does not change its flags, never closes it, and
 *     writes with MSG_NOSIGNAL (no SIGPIPE).
 *  2. Threads: a session is used by one thread at a time (the connection's
 *     loop thread); sessions may live on different threads.  Credentials are
 *     read-only after nbd_tls_creds_load and may be shared by every session
 *     on every thread; they must outlive every session made from them.
 *  3. Pending data.  GnuTLS decrypts a whole record (up to 16 KiB) at a
 *     time; what a recv() did not take stays inside GnuTLS, and the fd will
 *     NOT become readable for it.  An event loop must therefore drain:
 *     after a read event, call nbd_tls_recv while it returns > 0 and
 *     nbd_tls_pending(t) > 0 (or it returns -EAGAIN), and only then wait for
 *     the fd again.  nbd_tls_pending counts decrypted bytes only; GnuTLS
 *     reads no raw bytes beyond the record it is decrypting, so "pending is
 *     0 and the fd is not readable" means there is nothing to read.
 *     A reader that stops reading on purpose (flow control) must resume
 *     with a recv, not a wait, when pending() > 0.
 *  4. Direction.  After -EAGAIN from nbd_tls_handshake, nbd_tls_recv or
 *     nbd_tls_bye, nbd_tls_want_write(t) tells whether that call needs the fd
 *     writable (true) or readable (false) to progress (TLS 1.3 key updates
 *     make a recv write).  -EAGAIN from nbd_tls_send always waits for
 *     writable, and the caller must repeat the SAME (buf, len) before any
 *     other send: GnuTLS has already encrypted that record.  A recv may run
 *     between the two sends (GnuTLS keeps the directions apart), and
 *     nbd_tls_bye may replace the repeat (it flushes that record first).
 *  5. Errors: 0 or negative errno.  -EACCES: the client's certificate was
 *     refused (or none was presented while verify_peer); -EPROTO: a TLS
 *     protocol error, an alert from the client, garbage instead of TLS, a
 *     renegotiation request (refused); -ECONNRESET: the client closed the
 *     connection during the handshake; -EPIPE, -ECONNRESET, ...: the errno
 *     of the socket call that failed; -ENOMEM.  The first failure is sticky:
 *     every later call on the session returns the same error, and
 *     nbd_tls_error(t) keeps its message.
 *  6. EOF.  nbd_tls_recv returns 0 after the client's close_notify, and
 *     also when the client closed the socket without one (QEMU 7.2's NBD
 *     client shuts the socket down without sending close_notify; NBD frames
 *     its own messages, so a truncation shows up there as a short frame).
 *     nbd_tls_eof_clean(t) tells the two apart.
 */
#ifndef QSM_NBD_TLS_H
#define QSM_NBD_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* The file names of the credentials directory (see above). */
#define NBD_TLS_CA_CERT "ca-cert.pem"
#define NBD_TLS_CA_CRL "ca-crl.pem"
#define NBD_TLS_SERVER_CERT "server-cert.pem"
#define NBD_TLS_SERVER_KEY "server-key.pem"
#define NBD_TLS_DH_PARAMS "dh-params.pem"
/* GnuTLS priority string of every session (QEMU 7.2's default). */
#define NBD_TLS_PRIORITY "NORMAL"

struct nbd_tls_creds;

/*
 * Load the server credentials of DIR (the layout above).  On success
 * returns 0 and *out owns the credentials (nbd_tls_creds_free).  On failure
 * returns a negative errno (-ENOENT/-EACCES for a file that cannot be
 * accessed, -EINVAL for a file GnuTLS refuses or a failed sanity check,
 * -ENOMEM), leaves *out NULL and writes a message naming the file into err
 * (errlen bytes, always NUL-terminated when errlen > 0).
 */
int nbd_tls_creds_load(const char *dir, bool verify_peer, struct nbd_tls_creds **out,
		       char *err, size_t errlen);
/* Free credentials (NULL is fine).  No session made from them may remain. */
void nbd_tls_creds_free(struct nbd_tls_creds *c);
/* verify_peer as loaded. */
bool nbd_tls_creds_verify_peer(const struct nbd_tls_creds *c);

/* One server session on a connected non-blocking socket fd (not owned, not
 * closed). */
struct nbd_tls;

/* A new session on fd with credentials c; nothing is sent yet (the first
 * nbd_tls_handshake reads the ClientHello).  0 and *out, or -ENOMEM /
 * -EPROTO (GnuTLS refused a setting; nothing allocated) with *out NULL. */
int nbd_tls_new(struct nbd_tls_creds *c, int fd, struct nbd_tls **out);
/* Advance the handshake: 0 done (again 0 once done), -EAGAIN call again when
 * the fd is readable, or writable if nbd_tls_want_write(t), other -errno
 * failed (contract 5; nbd_tls_error says why, certificate verification
 * failures included). */
int nbd_tls_handshake(struct nbd_tls *t);
/* After the handshake: > 0 bytes into buf (at most len, len > 0), 0 EOF
 * (contract 6), -EAGAIN (contract 4), -errno. */
ssize_t nbd_tls_recv(struct nbd_tls *t, void *buf, size_t len);
/* After the handshake: > 0 bytes of buf taken (may be short: at most one
 * record, 16 KiB, per call), -EAGAIN (the caller calls again later with the
 * SAME buf/len), -errno.  len > 0. */
ssize_t nbd_tls_send(struct nbd_tls *t, const void *buf, size_t len);
/* The direction the last -EAGAIN waits for (contract 4). */
bool nbd_tls_want_write(const struct nbd_tls *t);
/* Decrypted bytes readable without waiting for the fd (contract 3); 0
 * before the handshake completes. */
size_t nbd_tls_pending(const struct nbd_tls *t);
/* Send close_notify, non-blocking, best effort: 0 sent (or nothing to do:
 * no completed handshake, already sent, session failed), -EAGAIN (may be
 * called again on writable, or given up), other -errno.  Does not wait for
 * the client's close_notify.  The caller may then close the fd. */
int nbd_tls_bye(struct nbd_tls *t);
/* The message of the session's failure, "" while none. */
const char *nbd_tls_error(const struct nbd_tls *t);
/* The client certificate's distinguished name once the handshake has
 * completed with one, else NULL; for logs.  Without verify_peer it is
 * whatever the client claims (unverified). */
const char *nbd_tls_peer_dn(const struct nbd_tls *t);
/* After nbd_tls_recv returned 0: true if the client sent close_notify,
 * false if it closed the socket without one (contract 6). */
bool nbd_tls_eof_clean(const struct nbd_tls *t);
/* Free the session (NULL is fine); sends nothing, leaves fd open. */
void nbd_tls_free(struct nbd_tls *t);

/*
 * Loading.  The qsm binary links no GnuTLS: its libraries (GnuTLS, nettle,
 * gmp, p11-kit, libtasn1, libidn2, ...) cost about 4 ms at every start of
 * every command, for what only `qsm nbd --tls` uses.  So tls.c is built
 * twice: as the static library qsm_nbd_tls, linked by the tests and fuzz
 * targets that call it directly, and as the module NBD_TLS_MODULE_FILE
 * (qsm_nbd_tls_module, built with hidden symbols), which exports one
 * table, NBD_TLS_MODULE_SYMBOL, of the functions above.  qsm's own
 * nbd_tls_* (tools/nbd/tls_load.c) forward to that table, loading the
 * module at the first nbd_tls_creds_load: from the directory of the qsm
 * executable (a build tree), else from ${libdir}/qsm of its install (found
 * relative to the executable, then at the configured path).  A module that cannot be loaded fails the load with
 * -ENOTSUP and a message naming the file and dlerror()'s reason.  The
 * table's version changes whenever this interface does.
 */
#define NBD_TLS_MODULE_FILE "qsm-nbd-tls.so"
#define NBD_TLS_MODULE_SYMBOL "nbd_tls_module"
#define NBD_TLS_MODULE_VERSION 1
struct nbd_tls_module {
	unsigned version; /* NBD_TLS_MODULE_VERSION */
	int (*creds_load)(const char *dir, bool verify_peer, struct nbd_tls_creds **out, char *err,
			  size_t errlen);
	void (*creds_free)(struct nbd_tls_creds *c);
	bool (*creds_verify_peer)(const struct nbd_tls_creds *c);
	int (*new_session)(struct nbd_tls_creds *c, int fd, struct nbd_tls **out);
	int (*handshake)(struct nbd_tls *t);
	ssize_t (*recv)(struct nbd_tls *t, void *buf, size_t len);
	ssize_t (*send)(struct nbd_tls *t, const void *buf, size_t len);
	bool (*want_write)(const struct nbd_tls *t);
	size_t (*pending)(const struct nbd_tls *t);
	int (*bye)(struct nbd_tls *t);
	const char *(*error)(const struct nbd_tls *t);
	const char *(*peer_dn)(const struct nbd_tls *t);
	bool (*eof_clean)(const struct nbd_tls *t);
	void (*free_session)(struct nbd_tls *t);
};

#endif
