/*
 * tools/nbd/tls.c: the TLS server sessions of `qsm nbd`, on GnuTLS.
 *
 * Design
 * ------
 * tls.h states the contracts (non-blocking, threads, pending data, errors);
 * this file is the glue between them and GnuTLS:
 *
 *   nbd_tls_creds_load   stat the files (QEMU's message for a missing one),
 *                        sanity-check server cert against CA (QEMU's
 *                        sanity-check=on), then hand the files to GnuTLS
 *                        (trust, key pair, CRL, DH) and build the priority
 *   nbd_tls_new          one gnutls server session: priority, credentials,
 *                        client certificate REQUIRE+verify or REQUEST, our
 *                        push/pull on the fd, no handshake timeout (the
 *                        connection machine owns its timeouts)
 *   handshake/recv/send  one GnuTLS call each; GNUTLS_E_AGAIN becomes -EAGAIN
 *                        plus the direction GnuTLS reports; anything else
 *                        goes through session_fail (one message, one errno,
 *                        sticky)
 *
 * The session's life:
 *
 *   NEW --handshake() AGAIN--> NEW ... --0--> OPEN --recv() 0--> EOF
 *     \                                    |  \--bye()--> (OPEN, bye_sent)
 *      \--error--> FAILED <--error---------+
 *
 * Invariants
 *  1. t->failed != 0 iff t->err is a non-empty message; once set, every call
 *     returns t->failed and GnuTLS is not called again (free excepted).
 *  2. recv/send run only in OPEN or EOF or FAILED (asserted: the NBD
 *     connection machine must not read application data before the
 *     handshake, which is what "nothing but STARTTLS in the clear" needs).
 *  3. t->io_errno is the errno of the last push/pull that failed with
 *     anything but EAGAIN; it turns GNUTLS_E_PUSH_ERROR/PULL_ERROR back into
 *     the socket's errno.
 */
#include "tools/nbd/tls.h"

#include <assert.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>

struct nbd_tls_creds {
	gnutls_certificate_credentials_t tc_cred;
	gnutls_dh_params_t tc_dh;	/* from dh-params.pem, or NULL */
	gnutls_priority_t tc_prio;
	bool tc_verify_peer;
};

struct nbd_tls {
	gnutls_session_t t_sess;
	struct nbd_tls_creds *t_creds;
	int t_fd;
	int t_io_errno;		/* invariant 3 */
	int t_failed;		/* 0 or the sticky negative errno (invariant 1) */
	bool t_open;		/* the handshake completed */
	bool t_want_write;	/* direction of the last GNUTLS_E_AGAIN */
	bool t_eof;		/* recv returned 0 */
	bool t_eof_clean;	/* ... after close_notify */
	bool t_bye_sent;
	char *t_peer_dn;	/* client certificate DN, or NULL */
	char t_err[512];
};

/* ---- credentials ---------------------------------------------------- */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	if (!err || errlen == 0)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* DIR/NAME into *path (malloc'd).  A required file that cannot be stat()ed
 * is an error with QEMU's message; an optional one that does not exist
 * leaves *path NULL and returns 0. */
static int creds_path(const char *dir, const char *name, bool required, char **path,
		      char *err, size_t errlen)
{
	struct stat st;
	*path = NULL;
	char *p;
	if (asprintf(&p, "%s/%s", dir, name) < 0) {
		set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	if (stat(p, &st) < 0) {
		int e = errno;
		if (e == ENOENT && !required) {
			free(p);
			return 0;
		}
		set_err(err, errlen, "Unable to access credentials %s: %s", p, strerror(e));
		free(p);
		return -e;
	}
	*path = p;
	return 0;
}

/* A readable reason for a GnuTLS verification status (never 0). */
static void status_text(unsigned status, char *buf, size_t len)
{
	gnutls_datum_t out = { NULL, 0 };
	if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
		snprintf(buf, len, "%s", (const char *)out.data);
		gnutls_free(out.data);
	} else {
		snprintf(buf, len, "verification status 0x%x", status);
	}
}

/* Validity period of one certificate, now. */
static int check_times(gnutls_x509_crt_t crt, const char *what, const char *file,
		       char *err, size_t errlen)
{
	time_t now = time(NULL);
	if (gnutls_x509_crt_get_expiration_time(crt) < now) {
		set_err(err, errlen, "The %s certificate %s has expired", what, file);
		return -EINVAL;
	}
	if (gnutls_x509_crt_get_activation_time(crt) > now) {
		set_err(err, errlen, "The %s certificate %s is not yet active", what, file);
		return -EINVAL;
	}
	return 0;
}

/*
 * QEMU's sanity-check=on, in qsm's terms: the CA file holds CA
 * certificates valid now; the server certificate is valid now, is not a CA
 * and verifies against them.  What GnuTLS will do with the files later is
 * unaffected; this only turns a mistake in the directory into a message at
 * start-up instead of a failure at every client's handshake.
 */
static int sanity_check(const char *cafile, const char *certfile, char *err, size_t errlen)
{
	gnutls_datum_t data = { NULL, 0 };
	gnutls_x509_crt_t *cas = NULL;
	unsigned ncas = 0;
	gnutls_x509_crt_t crt = NULL;
	int r, ret = -EINVAL;

	r = gnutls_load_file(cafile, &data);
	if (r < 0) {
		set_err(err, errlen, "Cannot load CA certificate list %s: %s", cafile,
			gnutls_strerror(r));
		goto out;
	}
	r = gnutls_x509_crt_list_import2(&cas, &ncas, &data, GNUTLS_X509_FMT_PEM, 0);
	gnutls_free(data.data);
	data.data = NULL;
	if (r < 0 || ncas == 0) {
		set_err(err, errlen, "Unable to import CA certificate list %s: %s", cafile,
			r < 0 ? gnutls_strerror(r) : "no certificate in the file");
		ncas = 0;
		goto out;
	}
	for (unsigned i = 0; i < ncas; i++) {
		r = gnutls_x509_crt_get_basic_constraints(cas[i], NULL, NULL, NULL);
		if (r <= 0) {
			set_err(err, errlen,
				r == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE
					? "The certificate %s is missing basic constraints for a CA"
					: "The certificate %s basic constraints do not show a CA",
				cafile);
			goto out;
		}
		if ((ret = check_times(cas[i], "CA", cafile, err, errlen)) < 0)
			goto out;
		ret = -EINVAL;
	}

	r = gnutls_load_file(certfile, &data);
	if (r < 0) {
		set_err(err, errlen, "Cannot load server certificate %s: %s", certfile,
			gnutls_strerror(r));
		goto out;
	}
	r = gnutls_x509_crt_init(&crt);
	if (r == 0)
		r = gnutls_x509_crt_import(crt, &data, GNUTLS_X509_FMT_PEM);
	gnutls_free(data.data);
	if (r < 0) {
		set_err(err, errlen, "Unable to import server certificate %s: %s", certfile,
			gnutls_strerror(r));
		goto out;
	}
	if (gnutls_x509_crt_get_basic_constraints(crt, NULL, NULL, NULL) > 0) {
		set_err(err, errlen,
			"The certificate %s basic constraints show a CA, but we need one for a server",
			certfile);
		goto out;
	}
	if ((ret = check_times(crt, "server", certfile, err, errlen)) < 0)
		goto out;
	ret = -EINVAL;
	unsigned status = 0;
	r = gnutls_x509_crt_list_verify(&crt, 1, cas, ncas, NULL, 0, 0, &status);
	if (r < 0) {
		set_err(err, errlen, "Unable to verify server certificate %s against CA certificate %s: %s",
			certfile, cafile, gnutls_strerror(r));
		goto out;
	}
	if (status != 0) {
		char why[256];
		status_text(status, why, sizeof(why));
		set_err(err, errlen, "Our own certificate %s failed validation against %s: %s",
			certfile, cafile, why);
		goto out;
	}
	ret = 0;
out:
	if (crt)
		gnutls_x509_crt_deinit(crt);
	for (unsigned i = 0; i < ncas; i++)
		gnutls_x509_crt_deinit(cas[i]);
	gnutls_free(cas);
	return ret;
}

static int gnutls_errno(int r)
{
	return r == GNUTLS_E_MEMORY_ERROR ? -ENOMEM : -EINVAL;
}

int nbd_tls_creds_load(const char *dir, bool verify_peer, struct nbd_tls_creds **out,
		       char *err, size_t errlen)
{
	char *ca = NULL, *crl = NULL, *cert = NULL, *key = NULL, *dhp = NULL;
	struct nbd_tls_creds *c = NULL;
	int r, ret;

	*out = NULL;
	set_err(err, errlen, "%s", "");
	if ((ret = creds_path(dir, NBD_TLS_CA_CERT, true, &ca, err, errlen)) < 0 ||
	    (ret = creds_path(dir, NBD_TLS_CA_CRL, false, &crl, err, errlen)) < 0 ||
	    (ret = creds_path(dir, NBD_TLS_SERVER_CERT, true, &cert, err, errlen)) < 0 ||
	    (ret = creds_path(dir, NBD_TLS_SERVER_KEY, true, &key, err, errlen)) < 0 ||
	    (ret = creds_path(dir, NBD_TLS_DH_PARAMS, false, &dhp, err, errlen)) < 0)
		goto fail;
	if ((ret = sanity_check(ca, cert, err, errlen)) < 0)
		goto fail;

	c = calloc(1, sizeof(*c));
	if (!c) {
		set_err(err, errlen, "out of memory");
		ret = -ENOMEM;
		goto fail;
	}
	c->tc_verify_peer = verify_peer;
	r = gnutls_certificate_allocate_credentials(&c->tc_cred);
	if (r < 0) {
		c->tc_cred = NULL;
		set_err(err, errlen, "Cannot allocate credentials: %s", gnutls_strerror(r));
		ret = gnutls_errno(r);
		goto fail;
	}
	/* Returns the number of certificates read. */
	r = gnutls_certificate_set_x509_trust_file(c->tc_cred, ca, GNUTLS_X509_FMT_PEM);
	if (r <= 0) {
		set_err(err, errlen, "Cannot load CA certificate '%s': %s", ca,
			r < 0 ? gnutls_strerror(r) : "no certificate in the file");
		ret = r < 0 ? gnutls_errno(r) : -EINVAL;
		goto fail;
	}
	/* GnuTLS checks that the key belongs to the certificate
	 * (GNUTLS_E_CERTIFICATE_KEY_MISMATCH). */
	r = gnutls_certificate_set_x509_key_file2(c->tc_cred, cert, key, GNUTLS_X509_FMT_PEM,
						  NULL, 0);
	if (r < 0) {
		set_err(err, errlen, "Cannot load certificate '%s' & key '%s': %s", cert, key,
			gnutls_strerror(r));
		ret = gnutls_errno(r);
		goto fail;
	}
	if (crl) {
		r = gnutls_certificate_set_x509_crl_file(c->tc_cred, crl, GNUTLS_X509_FMT_PEM);
		if (r < 0) {
			set_err(err, errlen, "Cannot load CRL '%s': %s", crl, gnutls_strerror(r));
			ret = gnutls_errno(r);
			goto fail;
		}
	}
	if (dhp) {
		gnutls_datum_t data = { NULL, 0 };
		r = gnutls_load_file(dhp, &data);
		if (r == 0) {
			r = gnutls_dh_params_init(&c->tc_dh);
			if (r < 0)
				c->tc_dh = NULL;
			else
				r = gnutls_dh_params_import_pkcs3(c->tc_dh, &data, GNUTLS_X509_FMT_PEM);
			gnutls_free(data.data);
		}
		if (r < 0) {
			set_err(err, errlen, "Unable to load DH parameters from %s: %s", dhp,
				gnutls_strerror(r));
			ret = gnutls_errno(r);
			goto fail;
		}
		gnutls_certificate_set_dh_params(c->tc_cred, c->tc_dh);
	} else {
		r = gnutls_certificate_set_known_dh_params(c->tc_cred, GNUTLS_SEC_PARAM_MEDIUM);
		if (r < 0) {
			set_err(err, errlen, "Cannot set DH parameters: %s", gnutls_strerror(r));
			ret = gnutls_errno(r);
			goto fail;
		}
	}
	const char *errpos = NULL;
	r = gnutls_priority_init(&c->tc_prio, NBD_TLS_PRIORITY, &errpos);
	if (r < 0) {
		c->tc_prio = NULL;
		set_err(err, errlen, "Cannot set TLS priority %s: %s", NBD_TLS_PRIORITY,
			gnutls_strerror(r));
		ret = gnutls_errno(r);
		goto fail;
	}
	*out = c;
	c = NULL;
	ret = 0;
fail:
	nbd_tls_creds_free(c);
	free(ca);
	free(crl);
	free(cert);
	free(key);
	free(dhp);
	return ret;
}

void nbd_tls_creds_free(struct nbd_tls_creds *c)
{
	if (!c)
		return;
	if (c->tc_prio)
		gnutls_priority_deinit(c->tc_prio);
	if (c->tc_cred)
		gnutls_certificate_free_credentials(c->tc_cred);
	if (c->tc_dh)
		gnutls_dh_params_deinit(c->tc_dh);
	free(c);
}

bool nbd_tls_creds_verify_peer(const struct nbd_tls_creds *c)
{
	return c->tc_verify_peer;
}

/* ---- transport ------------------------------------------------------ */

/* GnuTLS's pull: one recv, EINTR retried; never waits (the fd is
 * non-blocking).  EAGAIN goes back to GnuTLS as GNUTLS_E_AGAIN. */
static ssize_t tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len)
{
	struct nbd_tls *t = p;
	for (;;) {
		ssize_t n = recv(t->t_fd, buf, len, 0);
		if (n >= 0)
			return n;
		int e = errno;
		if (e == EINTR)
			continue;
		if (e != EAGAIN && e != EWOULDBLOCK)
			t->t_io_errno = e;
		gnutls_transport_set_errno(t->t_sess, e == EWOULDBLOCK ? EAGAIN : e);
		return -1;
	}
}

/* GnuTLS's vectored push: one sendmsg, MSG_NOSIGNAL, EINTR retried. */
static ssize_t tls_vec_push(gnutls_transport_ptr_t p, const giovec_t *iov, int iovcnt)
{
	struct nbd_tls *t = p;
	struct msghdr mh = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt };
	for (;;) {
		ssize_t n = sendmsg(t->t_fd, &mh, MSG_NOSIGNAL);
		if (n >= 0)
			return n;
		int e = errno;
		if (e == EINTR)
			continue;
		if (e != EAGAIN && e != EWOULDBLOCK)
			t->t_io_errno = e;
		gnutls_transport_set_errno(t->t_sess, e == EWOULDBLOCK ? EAGAIN : e);
		return -1;
	}
}

/* ---- sessions ------------------------------------------------------- */

int nbd_tls_new(struct nbd_tls_creds *c, int fd, struct nbd_tls **out)
{
	*out = NULL;
	struct nbd_tls *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->t_creds = c;
	t->t_fd = fd;
	int r = gnutls_init(&t->t_sess, GNUTLS_SERVER | GNUTLS_NO_TICKETS);
	if (r < 0) {
		free(t);
		return r == GNUTLS_E_MEMORY_ERROR ? -ENOMEM : -EPROTO;
	}
	r = gnutls_priority_set(t->t_sess, c->tc_prio);
	if (r == 0)
		r = gnutls_credentials_set(t->t_sess, GNUTLS_CRD_CERTIFICATE, c->tc_cred);
	if (r < 0) {
		gnutls_deinit(t->t_sess);
		free(t);
		return r == GNUTLS_E_MEMORY_ERROR ? -ENOMEM : -EPROTO;
	}
	if (c->tc_verify_peer) {
		/* Required, and verified by GnuTLS inside the handshake
		 * against the trust list and CRL (no hostname: a client
		 * certificate names a client, not the address it comes from). */
		gnutls_certificate_server_set_request(t->t_sess, GNUTLS_CERT_REQUIRE);
		gnutls_session_set_verify_cert(t->t_sess, NULL, 0);
	} else {
		gnutls_certificate_server_set_request(t->t_sess, GNUTLS_CERT_REQUEST);
	}
	/* The NBD connection machine times its handshake out itself. */
	gnutls_handshake_set_timeout(t->t_sess, 0);
	gnutls_transport_set_ptr(t->t_sess, t);
	gnutls_transport_set_pull_function(t->t_sess, tls_pull);
	gnutls_transport_set_vec_push_function(t->t_sess, tls_vec_push);
	*out = t;
	return 0;
}

/*
 * The one way a session fails (invariant 1): the errno for GnuTLS's error r
 * (contract 5 of tls.h), a message "<what>: <why>", and, for errors of the
 * TLS conversation itself, the alert GnuTLS deems appropriate, sent
 * best-effort (a non-blocking send that may not go out).
 */
static int session_fail(struct nbd_tls *t, int r, const char *what)
{
	char why[384];
	int e;
	bool alert = true;

	switch (r) {
	case GNUTLS_E_PUSH_ERROR:
	case GNUTLS_E_PULL_ERROR:
		e = t->t_io_errno ? t->t_io_errno : EIO;
		snprintf(why, sizeof(why), "%s", strerror(e));
		e = -e;
		alert = false;
		break;
	case GNUTLS_E_PREMATURE_TERMINATION:
		snprintf(why, sizeof(why), "the client closed the connection");
		e = -ECONNRESET;
		alert = false;
		break;
	case GNUTLS_E_NO_CERTIFICATE_FOUND:	/* TLS 1.2 */
	case GNUTLS_E_CERTIFICATE_REQUIRED:	/* TLS 1.3 */
		snprintf(why, sizeof(why),
			 "the client presented no certificate, and verify-peer requires one");
		e = -EACCES;
		break;
	case GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR: {
		char st[300];
		status_text(gnutls_session_get_verify_cert_status(t->t_sess), st, sizeof(st));
		snprintf(why, sizeof(why), "the client certificate was refused: %s", st);
		e = -EACCES;
		break;
	}
	case GNUTLS_E_CERTIFICATE_ERROR:
		snprintf(why, sizeof(why), "the client certificate was refused: %s",
			 gnutls_strerror(r));
		e = -EACCES;
		break;
	case GNUTLS_E_FATAL_ALERT_RECEIVED:
	case GNUTLS_E_WARNING_ALERT_RECEIVED:
		snprintf(why, sizeof(why), "the client sent the alert \"%s\"",
			 gnutls_alert_get_name(gnutls_alert_get(t->t_sess)));
		e = -EPROTO;
		alert = r == GNUTLS_E_WARNING_ALERT_RECEIVED;
		break;
	case GNUTLS_E_REHANDSHAKE:
		snprintf(why, sizeof(why), "the client asked for a renegotiation, which qsm refuses");
		e = -EPROTO;
		break;
	case GNUTLS_E_MEMORY_ERROR:
		snprintf(why, sizeof(why), "%s", gnutls_strerror(r));
		e = -ENOMEM;
		alert = false;
		break;
	default:
		snprintf(why, sizeof(why), "%s", gnutls_strerror(r));
		e = -EPROTO;
		break;
	}
	snprintf(t->t_err, sizeof(t->t_err), "%s: %s", what, why);
	t->t_failed = e;
	t->t_want_write = false;
	if (alert)
		(void)gnutls_alert_send_appropriate(t->t_sess, r);
	return e;
}

/* GNUTLS_E_AGAIN (or INTERRUPTED, which our push/pull never cause): note
 * the direction GnuTLS waits for (contract 4). */
static int session_again(struct nbd_tls *t)
{
	t->t_want_write = gnutls_record_get_direction(t->t_sess) == 1;
	return -EAGAIN;
}

static bool is_again(ssize_t r)
{
	return r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED;
}

/* The client certificate's DN, after a handshake, for nbd_tls_peer_dn. */
static void keep_peer_dn(struct nbd_tls *t)
{
	unsigned n = 0;
	const gnutls_datum_t *certs = gnutls_certificate_get_peers(t->t_sess, &n);
	gnutls_x509_crt_t crt;
	if (!certs || n == 0 || gnutls_x509_crt_init(&crt) < 0)
		return;
	gnutls_datum_t dn = { NULL, 0 };
	if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
	    gnutls_x509_crt_get_dn2(crt, &dn) == 0) {
		t->t_peer_dn = strndup((const char *)dn.data, dn.size);
		gnutls_free(dn.data);
	}
	gnutls_x509_crt_deinit(crt);
}

int nbd_tls_handshake(struct nbd_tls *t)
{
	if (t->t_failed)
		return t->t_failed;
	if (t->t_open)
		return 0;
	int r = gnutls_handshake(t->t_sess);
	if (r == 0) {
		t->t_open = true;
		t->t_want_write = false;
		keep_peer_dn(t);
		return 0;
	}
	if (is_again(r))
		return session_again(t);
	return session_fail(t, r, "TLS handshake failed");
}

ssize_t nbd_tls_recv(struct nbd_tls *t, void *buf, size_t len)
{
	assert(t->t_open || t->t_failed);	/* invariant 2 */
	assert(len > 0);
	if (t->t_failed)
		return t->t_failed;
	if (t->t_eof)
		return 0;
	ssize_t r = gnutls_record_recv(t->t_sess, buf, len);
	if (r > 0)
		return r;
	if (r == 0 || r == GNUTLS_E_PREMATURE_TERMINATION) {
		t->t_eof = true;
		t->t_eof_clean = r == 0;
		return 0;
	}
	if (is_again(r))
		return session_again(t);
	return session_fail(t, (int)r, "Cannot read from TLS channel");
}

ssize_t nbd_tls_send(struct nbd_tls *t, const void *buf, size_t len)
{
	assert(t->t_open || t->t_failed);	/* invariant 2 */
	assert(len > 0);
	if (t->t_failed)
		return t->t_failed;
	/* GnuTLS invalidates a session whose peer closed the socket without
	 * close_notify; to the caller that is a closed socket. */
	if (t->t_eof && !t->t_eof_clean) {
		t->t_io_errno = EPIPE;
		return session_fail(t, GNUTLS_E_PUSH_ERROR, "Cannot write to TLS channel");
	}
	ssize_t r = gnutls_record_send(t->t_sess, buf, len);
	if (r > 0)
		return r;
	if (is_again(r)) {
		t->t_want_write = true;
		return -EAGAIN;
	}
	return session_fail(t, r == 0 ? GNUTLS_E_INTERNAL_ERROR : (int)r,
			    "Cannot write to TLS channel");
}

bool nbd_tls_want_write(const struct nbd_tls *t)
{
	return t->t_want_write;
}

size_t nbd_tls_pending(const struct nbd_tls *t)
{
	if (!t->t_open || t->t_failed)
		return 0;
	return gnutls_record_check_pending(t->t_sess);
}

int nbd_tls_bye(struct nbd_tls *t)
{
	if (t->t_failed || !t->t_open || t->t_bye_sent)
		return 0;
	int r = gnutls_bye(t->t_sess, GNUTLS_SHUT_WR);
	if (r == 0) {
		t->t_bye_sent = true;
		return 0;
	}
	if (is_again(r))
		return session_again(t);
	return session_fail(t, r, "TLS termination failed");
}

const char *nbd_tls_error(const struct nbd_tls *t)
{
	return t->t_err;
}

const char *nbd_tls_peer_dn(const struct nbd_tls *t)
{
	return t->t_peer_dn;
}

bool nbd_tls_eof_clean(const struct nbd_tls *t)
{
	return t->t_eof && t->t_eof_clean;
}

void nbd_tls_free(struct nbd_tls *t)
{
	if (!t)
		return;
	gnutls_deinit(t->t_sess);
	free(t->t_peer_dn);
	free(t);
}

#ifdef QSM_NBD_TLS_MODULE
/* The module's one exported symbol (tls.h, "Loading"); everything else in
 * it is hidden, so these pointers bind to this file's functions. */
__attribute__((visibility("default"))) const struct nbd_tls_module nbd_tls_module = {
	.version = NBD_TLS_MODULE_VERSION,
	.creds_load = nbd_tls_creds_load,
	.creds_free = nbd_tls_creds_free,
	.creds_verify_peer = nbd_tls_creds_verify_peer,
	.new_session = nbd_tls_new,
	.handshake = nbd_tls_handshake,
	.recv = nbd_tls_recv,
	.send = nbd_tls_send,
	.want_write = nbd_tls_want_write,
	.pending = nbd_tls_pending,
	.bye = nbd_tls_bye,
	.error = nbd_tls_error,
	.peer_dn = nbd_tls_peer_dn,
	.eof_clean = nbd_tls_eof_clean,
	.free_session = nbd_tls_free,
};
#endif
