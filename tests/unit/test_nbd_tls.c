/*
 * tests/unit/test_nbd_tls.c: Check suite "nbd_tls" for tools/nbd/tls.c.
 *
 * Certificates are made fresh each run (main, before the cases fork) with
 * GnuTLS's X.509 API into a temporary directory: CA1 signs the server and
 * client1, CA2 signs client2; ECDSA P-256 keys (fast).  Each credentials
 * directory a case needs (good, missing file, wrong key, other CA, expired,
 * CRL, DH parameters...) is laid out there as QEMU's tls-creds-x509 reads it.
 *
 * A case runs the server session (nbd_tls_*) against a GnuTLS client session
 * in the same thread over a socketpair, both ends non-blocking.  The driver
 * is an event loop in miniature: it steps the server only when poll() says
 * its fd is ready in the direction nbd_tls_want_write() names, or when
 * nbd_tls_pending() is non-zero, so a wrong direction or an undrained
 * record shows as a stall (a failure), not as a pass by busy-looping.
 *
 * The "certtool" case builds the directory with README.md's own recipe (read
 * from the README: the certtool commands of gnutls-bin, RSA keys) and also
 * runs a TLS 1.2 DHE-RSA
 * handshake, which needs the server's DH parameters.  The "gnutls-cli"
 * case runs the real gnutls-cli client against a session on a TCP socket.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include "tests/unit/skip.h"
#include "tools/nbd/tls.h"

static char base[256];	/* the temporary directory */

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	int r = system(cmd);
	return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

static const char *bpath(const char *name)
{
	static char buf[4][512];
	static int i;
	i = (i + 1) % 4;
	snprintf(buf[i], sizeof(buf[i]), "%s/%s", base, name);
	return buf[i];
}

/* ---- certificates (GnuTLS X.509 API) ------------------------------- */

static void write_datum(const char *path, const gnutls_datum_t *d)
{
	FILE *f = fopen(path, "w");
	if (!f || fwrite(d->data, 1, d->size, f) != d->size || fclose(f) != 0) {
		perror(path);
		exit(1);
	}
}

#define G(call)                                                                       \
	do {                                                                          \
		int g_r_ = (call);                                                    \
		if (g_r_ < 0) {                                                       \
			fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, \
				gnutls_strerror(g_r_));                               \
			exit(1);                                                      \
		}                                                                     \
	} while (0)

static gnutls_x509_privkey_t make_key(const char *file)
{
	gnutls_x509_privkey_t k;
	gnutls_datum_t d;
	G(gnutls_x509_privkey_init(&k));
	G(gnutls_x509_privkey_generate(k, GNUTLS_PK_ECDSA,
				       GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0));
	G(gnutls_x509_privkey_export2(k, GNUTLS_X509_FMT_PEM, &d));
	write_datum(bpath(file), &d);
	gnutls_free(d.data);
	return k;
}

enum role { CA, SERVER, CLIENT };

/* A certificate for key, signed by (issuer, ikey) or self-signed when
 * issuer is NULL, valid from now+from to now+until seconds. */
static gnutls_x509_crt_t make_crt(const char *file, gnutls_x509_privkey_t key, const char *cn,
				  enum role role, gnutls_x509_crt_t issuer,
				  gnutls_x509_privkey_t ikey, unsigned serial, long from, long until)
{
	gnutls_x509_crt_t c;
	gnutls_datum_t d;
	time_t now = time(NULL);
	unsigned char ser[4] = { 0, 0, (unsigned char)(serial >> 8), (unsigned char)serial };
	G(gnutls_x509_crt_init(&c));
	G(gnutls_x509_crt_set_version(c, 3));
	G(gnutls_x509_crt_set_serial(c, ser, sizeof(ser)));
	G(gnutls_x509_crt_set_activation_time(c, now + from));
	G(gnutls_x509_crt_set_expiration_time(c, now + until));
	G(gnutls_x509_crt_set_dn_by_oid(c, GNUTLS_OID_X520_ORGANIZATION_NAME, 0, "qsm test", 8));
	G(gnutls_x509_crt_set_dn_by_oid(c, GNUTLS_OID_X520_COMMON_NAME, 0, cn, strlen(cn)));
	G(gnutls_x509_crt_set_key(c, key));
	G(gnutls_x509_crt_set_basic_constraints(c, role == CA, -1));
	if (role == CA) {
		G(gnutls_x509_crt_set_key_usage(c, GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN));
	} else {
		G(gnutls_x509_crt_set_key_usage(c, GNUTLS_KEY_DIGITAL_SIGNATURE));
		G(gnutls_x509_crt_set_key_purpose_oid(
			c, role == SERVER ? GNUTLS_KP_TLS_WWW_SERVER : GNUTLS_KP_TLS_WWW_CLIENT, 0));
	}
	if (role == SERVER)
		G(gnutls_x509_crt_set_subject_alt_name(c, GNUTLS_SAN_DNSNAME, "localhost", 9,
						       GNUTLS_FSAN_SET));
	unsigned char kid[64];
	size_t kidlen = sizeof(kid);
	G(gnutls_x509_crt_get_key_id(c, 0, kid, &kidlen));
	G(gnutls_x509_crt_set_subject_key_id(c, kid, kidlen));
	if (issuer) {
		kidlen = sizeof(kid);
		G(gnutls_x509_crt_get_subject_key_id(issuer, kid, &kidlen, NULL));
		G(gnutls_x509_crt_set_authority_key_id(c, kid, kidlen));
	}
	G(gnutls_x509_crt_sign2(c, issuer ? issuer : c, issuer ? ikey : key, GNUTLS_DIG_SHA256, 0));
	G(gnutls_x509_crt_export2(c, GNUTLS_X509_FMT_PEM, &d));
	write_datum(bpath(file), &d);
	gnutls_free(d.data);
	return c;
}

/* base/DIR/ with the named files copied from base/ ("src:dst" pairs). */
static void make_dir(const char *dir, const char *const *pairs)
{
	if (mkdir(bpath(dir), 0700) < 0) {
		perror(dir);
		exit(1);
	}
	for (; *pairs; pairs++) {
		char src[128];
		const char *colon = strchr(*pairs, ':');
		snprintf(src, sizeof(src), "%.*s", (int)(colon - *pairs), *pairs);
		if (sh("cp '%s/%s' '%s/%s/%s'", base, src, base, dir, colon + 1) != 0)
			exit(1);
	}
}

static void make_all(void)
{
	const long DAY = 86400;
	gnutls_x509_privkey_t ca1k = make_key("ca1-key.pem");
	gnutls_x509_crt_t ca1 = make_crt("ca1.pem", ca1k, "qsm test CA1", CA, NULL, NULL, 1, -3600, DAY);
	gnutls_x509_privkey_t ca2k = make_key("ca2-key.pem");
	/* CA2 has CA1's name (not its key), so that client2's GnuTLS, seeing
	 * CA1's name in the server's certificate request, sends its
	 * certificate and the server must refuse it on its signature. */
	gnutls_x509_crt_t ca2 = make_crt("ca2.pem", ca2k, "qsm test CA1", CA, NULL, NULL, 1, -3600, DAY);
	gnutls_x509_privkey_t sk = make_key("server-key.pem");
	gnutls_x509_crt_t sc = make_crt("server-cert.pem", sk, "localhost", SERVER, ca1, ca1k, 2, -3600, DAY);
	gnutls_x509_crt_t sxc = make_crt("server-expired.pem", sk, "localhost", SERVER, ca1, ca1k, 3,
					 -2 * DAY, -DAY);
	gnutls_x509_privkey_t ok = make_key("other-key.pem");
	gnutls_x509_privkey_t c1k = make_key("client1-key.pem");
	gnutls_x509_crt_t c1 = make_crt("client1-cert.pem", c1k, "client1", CLIENT, ca1, ca1k, 4, -3600, DAY);
	gnutls_x509_privkey_t c2k = make_key("client2-key.pem");
	gnutls_x509_crt_t c2 = make_crt("client2-cert.pem", c2k, "client2", CLIENT, ca2, ca2k, 5, -3600, DAY);
	gnutls_x509_privkey_t c3k = make_key("client3-key.pem");
	gnutls_x509_crt_t c3 = make_crt("client3-cert.pem", c3k, "client3", CLIENT, ca1, ca1k, 6,
					-2 * DAY, -DAY);

	/* A CRL of CA1 revoking client1. */
	gnutls_x509_crl_t crl;
	gnutls_datum_t d;
	G(gnutls_x509_crl_init(&crl));
	G(gnutls_x509_crl_set_version(crl, 2));
	G(gnutls_x509_crl_set_this_update(crl, time(NULL) - 60));
	G(gnutls_x509_crl_set_next_update(crl, time(NULL) + DAY));
	G(gnutls_x509_crl_set_crt(crl, c1, time(NULL) - 60));
	G(gnutls_x509_crl_sign2(crl, ca1, ca1k, GNUTLS_DIG_SHA256, 0));
	G(gnutls_x509_crl_export2(crl, GNUTLS_X509_FMT_PEM, &d));
	write_datum(bpath("crl.pem"), &d);
	gnutls_free(d.data);
	gnutls_x509_crl_deinit(crl);

	/* PKCS#3 DH parameters: the RFC 7919 2048-bit group GnuTLS ships. */
	gnutls_dh_params_t dh;
	G(gnutls_dh_params_init(&dh));
	G(gnutls_dh_params_import_raw2(dh, &gnutls_ffdhe_2048_group_prime,
				       &gnutls_ffdhe_2048_group_generator,
				       gnutls_ffdhe_2048_key_bits));
	G(gnutls_dh_params_export2_pkcs3(dh, GNUTLS_X509_FMT_PEM, &d));
	write_datum(bpath("dh.pem"), &d);
	gnutls_free(d.data);
	gnutls_dh_params_deinit(dh);
	if (sh("echo 'not DH parameters' > '%s/garbage.pem'", base) != 0)
		exit(1);

	static const char *const good[] = { "ca1.pem:ca-cert.pem", "server-cert.pem:server-cert.pem",
					    "server-key.pem:server-key.pem", NULL };
	make_dir("good", good);
	make_dir("noca", (const char *const[]){ "server-cert.pem:server-cert.pem",
						"server-key.pem:server-key.pem", NULL });
	make_dir("nocert", (const char *const[]){ "ca1.pem:ca-cert.pem",
						  "server-key.pem:server-key.pem", NULL });
	make_dir("nokey", (const char *const[]){ "ca1.pem:ca-cert.pem",
						 "server-cert.pem:server-cert.pem", NULL });
	make_dir("wrongkey", (const char *const[]){ "ca1.pem:ca-cert.pem",
						    "server-cert.pem:server-cert.pem",
						    "other-key.pem:server-key.pem", NULL });
	make_dir("otherca", (const char *const[]){ "ca2.pem:ca-cert.pem",
						   "server-cert.pem:server-cert.pem",
						   "server-key.pem:server-key.pem", NULL });
	make_dir("notca", (const char *const[]){ "client1-cert.pem:ca-cert.pem",
						 "server-cert.pem:server-cert.pem",
						 "server-key.pem:server-key.pem", NULL });
	make_dir("expired", (const char *const[]){ "ca1.pem:ca-cert.pem",
						   "server-expired.pem:server-cert.pem",
						   "server-key.pem:server-key.pem", NULL });
	make_dir("crl", (const char *const[]){ "ca1.pem:ca-cert.pem", "server-cert.pem:server-cert.pem",
					       "server-key.pem:server-key.pem", "crl.pem:ca-crl.pem",
					       NULL });
	make_dir("dh", (const char *const[]){ "ca1.pem:ca-cert.pem", "server-cert.pem:server-cert.pem",
					      "server-key.pem:server-key.pem", "dh.pem:dh-params.pem",
					      NULL });
	make_dir("baddh", (const char *const[]){ "ca1.pem:ca-cert.pem", "server-cert.pem:server-cert.pem",
						 "server-key.pem:server-key.pem",
						 "garbage.pem:dh-params.pem", NULL });
	make_dir("badcrl", (const char *const[]){ "ca1.pem:ca-cert.pem", "server-cert.pem:server-cert.pem",
						  "server-key.pem:server-key.pem",
						  "garbage.pem:ca-crl.pem", NULL });

	gnutls_x509_crt_deinit(ca1);
	gnutls_x509_crt_deinit(ca2);
	gnutls_x509_crt_deinit(sc);
	gnutls_x509_crt_deinit(sxc);
	gnutls_x509_crt_deinit(c1);
	gnutls_x509_crt_deinit(c2);
	gnutls_x509_crt_deinit(c3);
	gnutls_x509_privkey_deinit(ca1k);
	gnutls_x509_privkey_deinit(ca2k);
	gnutls_x509_privkey_deinit(sk);
	gnutls_x509_privkey_deinit(ok);
	gnutls_x509_privkey_deinit(c1k);
	gnutls_x509_privkey_deinit(c2k);
	gnutls_x509_privkey_deinit(c3k);
}

/* ---- a server session and a client session over a socketpair ---------- */

struct pair {
	int sfd, cfd;
	struct nbd_tls_creds *creds;
	struct nbd_tls *srv;
	gnutls_session_t cli;
	gnutls_certificate_credentials_t ccred;
	int srv_rc, cli_rc;	/* handshake results */
};

static void nonblock(int fd)
{
	ck_assert_int_eq(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), 0);
}

/* Client options: its certificate (NULL: none), the CA it trusts (NULL:
 * CA1), its priority (NULL: NORMAL). */
struct client_opts {
	const char *cert, *key, *ca, *prio;
};

static void client_new(struct pair *p, int fd, const struct client_opts *o)
{
	G(gnutls_certificate_allocate_credentials(&p->ccred));
	ck_assert_int_gt(gnutls_certificate_set_x509_trust_file(p->ccred, o->ca ? o->ca : bpath("ca1.pem"),
								 GNUTLS_X509_FMT_PEM), 0);
	if (o->cert)
		G(gnutls_certificate_set_x509_key_file(p->ccred, o->cert, o->key, GNUTLS_X509_FMT_PEM));
	G(gnutls_init(&p->cli, GNUTLS_CLIENT | GNUTLS_NO_SIGNAL));
	G(gnutls_priority_set_direct(p->cli, o->prio ? o->prio : "NORMAL", NULL));
	G(gnutls_credentials_set(p->cli, GNUTLS_CRD_CERTIFICATE, p->ccred));
	G(gnutls_server_name_set(p->cli, GNUTLS_NAME_DNS, "localhost", 9));
	gnutls_session_set_verify_cert(p->cli, "localhost", 0);
	gnutls_handshake_set_timeout(p->cli, 0);
	gnutls_transport_set_int(p->cli, fd);
}

static void pair_open(struct pair *p, const char *dir, bool verify, const struct client_opts *o)
{
	int fds[2];
	char err[512];
	memset(p, 0, sizeof(*p));
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	p->sfd = fds[0];
	p->cfd = fds[1];
	nonblock(p->sfd);
	nonblock(p->cfd);
	int r = nbd_tls_creds_load(bpath(dir), verify, &p->creds, err, sizeof(err));
	ck_assert_msg(r == 0, "load %s: %d %s", dir, r, err);
	ck_assert_int_eq(nbd_tls_new(p->creds, p->sfd, &p->srv), 0);
	client_new(p, p->cfd, o);
}

static void pair_close(struct pair *p)
{
	nbd_tls_free(p->srv);
	nbd_tls_creds_free(p->creds);
	if (p->cli)
		gnutls_deinit(p->cli);
	if (p->ccred)
		gnutls_certificate_free_credentials(p->ccred);
	if (p->sfd >= 0)
		close(p->sfd);
	if (p->cfd >= 0)
		close(p->cfd);
}

static bool ready(int fd, bool write)
{
	struct pollfd pfd = { .fd = fd, .events = write ? POLLOUT : POLLIN };
	return poll(&pfd, 1, 0) == 1 && (pfd.revents & (pfd.events | POLLHUP | POLLERR));
}

static bool again(int r)
{
	return r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED;
}

/* Step both handshakes until neither is waiting (or nothing can move: a
 * stall).  The server is stepped only when its fd is ready the way
 * nbd_tls_want_write says.  Returns the server's result; p->cli_rc the
 * client's. */
static int pair_handshake(struct pair *p)
{
	int s = nbd_tls_handshake(p->srv), c = GNUTLS_E_AGAIN;
	for (int idle = 0; idle < 3 && (s == -EAGAIN || again(c));) {
		bool moved = false;
		if (again(c)) {
			c = gnutls_handshake(p->cli);
			/* A real client tells the server why it gives up. */
			if (c < 0 && !again(c))
				(void)gnutls_alert_send_appropriate(p->cli, c);
			moved = true;
		}
		if (s == -EAGAIN && ready(p->sfd, nbd_tls_want_write(p->srv))) {
			s = nbd_tls_handshake(p->srv);
			moved = true;
		}
		idle = moved && !(again(c) && s == -EAGAIN && !ready(p->sfd, nbd_tls_want_write(p->srv)) &&
				  !ready(p->cfd, gnutls_record_get_direction(p->cli)))
			       ? 0
			       : idle + 1;
	}
	p->srv_rc = s;
	p->cli_rc = c;
	return s;
}

static void pair_handshake_ok(struct pair *p)
{
	int s = pair_handshake(p);
	ck_assert_msg(s == 0, "server handshake: %d %s", s, nbd_tls_error(p->srv));
	ck_assert_msg(p->cli_rc == 0, "client handshake: %s", gnutls_strerror(p->cli_rc));
	ck_assert_str_eq(nbd_tls_error(p->srv), "");
	ck_assert_int_eq(nbd_tls_handshake(p->srv), 0);	/* done stays done */
}

/* Clients with client1..3's certificate (filled in by main), and none. */
static struct client_opts c1, c2, c3, nocert;

/* The client's next read result after the server failed: an alert. */
static int client_read_result(struct pair *p)
{
	char b[64];
	int r = GNUTLS_E_AGAIN;
	for (int i = 0; i < 10 && again(r); i++)
		r = (int)gnutls_record_recv(p->cli, b, sizeof(b));
	return r;
}

/* ---- cases: handshakes ---------------------------------------------- */

START_TEST(test_handshake)
{
	struct pair p;
	pair_open(&p, "good", true, &c1);
	ck_assert(nbd_tls_creds_verify_peer(p.creds));
	pair_handshake_ok(&p);
	ck_assert_ptr_nonnull(nbd_tls_peer_dn(p.srv));
	ck_assert_msg(strstr(nbd_tls_peer_dn(p.srv), "CN=client1"), "dn %s", nbd_tls_peer_dn(p.srv));
	ck_assert_int_eq(gnutls_protocol_get_version(p.cli), GNUTLS_TLS1_3);
	pair_close(&p);
}
END_TEST

START_TEST(test_handshake_tls12)
{
	struct pair p;
	struct client_opts o = c1;
	o.prio = "NORMAL:-VERS-ALL:+VERS-TLS1.2";
	pair_open(&p, "good", true, &o);
	pair_handshake_ok(&p);
	ck_assert_int_eq(gnutls_protocol_get_version(p.cli), GNUTLS_TLS1_2);
	pair_close(&p);
}
END_TEST

/* Loop cases run as TLS 1.3 (_i == 0) and TLS 1.2 (_i == 1), whose
 * certificate messages and GnuTLS errors differ. */
static const char *const prios[] = { NULL, "NORMAL:-VERS-ALL:+VERS-TLS1.2" };

START_TEST(test_no_client_cert)
{
	struct pair p;
	struct client_opts o = nocert;
	o.prio = prios[_i];
	pair_open(&p, "good", true, &o);
	int s = pair_handshake(&p);
	ck_assert_msg(s == -EACCES, "%d %s", s, nbd_tls_error(p.srv));
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "TLS handshake failed") &&
			      strstr(nbd_tls_error(p.srv), "no certificate"),
		      "%s", nbd_tls_error(p.srv));
	/* Sticky. */
	ck_assert_int_eq(nbd_tls_handshake(p.srv), -EACCES);
	ck_assert_int_eq(nbd_tls_bye(p.srv), 0);
	/* The client hears why (an alert), not a reset. */
	int c = p.cli_rc == 0 ? client_read_result(&p) : p.cli_rc;
	ck_assert_msg(c == GNUTLS_E_FATAL_ALERT_RECEIVED, "client: %s", gnutls_strerror(c));
	pair_close(&p);

	/* verify_peer off: no certificate needed. */
	pair_open(&p, "good", false, &o);
	ck_assert(!nbd_tls_creds_verify_peer(p.creds));
	pair_handshake_ok(&p);
	ck_assert_ptr_null(nbd_tls_peer_dn(p.srv));
	pair_close(&p);
}
END_TEST

START_TEST(test_other_ca_client)
{
	struct pair p;
	struct client_opts o = c2;
	o.prio = prios[_i];
	pair_open(&p, "good", true, &o);
	int s = pair_handshake(&p);
	ck_assert_msg(s == -EACCES, "%d %s", s, nbd_tls_error(p.srv));
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "client certificate was refused") &&
			      strstr(nbd_tls_error(p.srv), "issuer is unknown"),
		      "%s", nbd_tls_error(p.srv));
	int c = p.cli_rc == 0 ? client_read_result(&p) : p.cli_rc;
	ck_assert_msg(c == GNUTLS_E_FATAL_ALERT_RECEIVED, "client: %s", gnutls_strerror(c));
	pair_close(&p);

	/* verify_peer off: accepted unchecked (QEMU's verify-peer=off). */
	pair_open(&p, "good", false, &o);
	pair_handshake_ok(&p);
	ck_assert(strstr(nbd_tls_peer_dn(p.srv), "CN=client2"));
	pair_close(&p);
}
END_TEST

START_TEST(test_expired_client)
{
	struct pair p;
	pair_open(&p, "good", true, &c3);
	ck_assert_int_eq(pair_handshake(&p), -EACCES);
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "expired"), "%s", nbd_tls_error(p.srv));
	pair_close(&p);
}
END_TEST

START_TEST(test_revoked_client)
{
	struct pair p;
	struct client_opts o = c1;
	o.prio = prios[_i];
	pair_open(&p, "crl", true, &o);
	ck_assert_int_eq(pair_handshake(&p), -EACCES);
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "revoked"), "%s", nbd_tls_error(p.srv));
	pair_close(&p);
}
END_TEST

START_TEST(test_client_refuses_server)
{
	/* The client trusts only CA2: it refuses the server's certificate and
	 * says so with an alert, which the server reports. */
	struct pair p;
	struct client_opts o = c1;
	o.ca = bpath("ca2.pem");
	pair_open(&p, "good", true, &o);
	int s = pair_handshake(&p);
	ck_assert_msg(s == -EPROTO, "%d %s; client %s", s, nbd_tls_error(p.srv), gnutls_strerror(p.cli_rc));
	ck_assert_int_lt(p.cli_rc, 0);
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "the client sent the alert"), "%s",
		      nbd_tls_error(p.srv));
	pair_close(&p);
}
END_TEST

START_TEST(test_garbage_client)
{
	/* A client that speaks plain NBD after STARTTLS. */
	struct pair p;
	pair_open(&p, "good", true, &c1);
	static const char junk[] = "NBDMAGIC\0\0\x42\x02\x81\x86\x12\x53 and more junk, lots";
	for (int i = 0; i < 20; i++)
		ck_assert_int_eq(write(p.cfd, junk, sizeof(junk)), (ssize_t)sizeof(junk));
	int s = nbd_tls_handshake(p.srv);
	ck_assert_msg(s == -EPROTO, "%d %s", s, nbd_tls_error(p.srv));
	ck_assert(strncmp(nbd_tls_error(p.srv), "TLS handshake failed: ", 22) == 0);
	pair_close(&p);
}
END_TEST

START_TEST(test_client_vanishes_in_handshake)
{
	struct pair p;
	pair_open(&p, "good", true, &c1);
	ck_assert(again(gnutls_handshake(p.cli)));	/* ClientHello sent */
	ck_assert_int_eq(nbd_tls_handshake(p.srv), -EAGAIN);	/* ServerHello... sent */
	ck_assert(!nbd_tls_want_write(p.srv));
	/* The client reads what the server sent, then closes: EOF. */
	char sink[65536];
	while (read(p.cfd, sink, sizeof(sink)) > 0)
		;
	close(p.cfd);
	p.cfd = -1;
	int s = nbd_tls_handshake(p.srv);
	ck_assert_msg(s == -ECONNRESET, "%d %s", s, nbd_tls_error(p.srv));
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "the client closed the connection"), "%s",
		      nbd_tls_error(p.srv));
	pair_close(&p);

	/* The client closes with the server's bytes unread: the socket's
	 * ECONNRESET. */
	pair_open(&p, "good", true, &c1);
	ck_assert(again(gnutls_handshake(p.cli)));
	ck_assert_int_eq(nbd_tls_handshake(p.srv), -EAGAIN);
	close(p.cfd);
	p.cfd = -1;
	s = nbd_tls_handshake(p.srv);
	ck_assert_msg(s == -ECONNRESET, "%d %s", s, nbd_tls_error(p.srv));
	ck_assert_msg(strstr(nbd_tls_error(p.srv), strerror(ECONNRESET)), "%s", nbd_tls_error(p.srv));
	pair_close(&p);
}
END_TEST

START_TEST(test_handshake_waits)
{
	/* Nothing from the client yet: -EAGAIN waiting to read, at once. */
	struct pair p;
	pair_open(&p, "good", true, &c1);
	for (int i = 0; i < 3; i++) {
		ck_assert_int_eq(nbd_tls_handshake(p.srv), -EAGAIN);
		ck_assert(!nbd_tls_want_write(p.srv));
	}
	ck_assert_uint_eq(nbd_tls_pending(p.srv), 0);
	pair_handshake_ok(&p);
	pair_close(&p);
}
END_TEST

/* ---- cases: data ---------------------------------------------------- */

static void fill(unsigned char *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)((i * 2654435761u + seed) >> 13);
}

/* Client to server: N bytes sent by the client in records of up to 16 KiB
 * (several in flight), read by the server in chunks of rsz bytes following
 * the event-loop rule of tls.h (contract 3): the server reads only when its
 * fd is readable or pending() > 0; a stall fails. */
static void client_to_server(struct pair *p, size_t n, size_t rsz, size_t *max_pending)
{
	unsigned char *out = malloc(n), *in = malloc(n), *chunk = malloc(rsz);
	fill(out, n, 7);
	size_t sent = 0, got = 0;
	int idle = 0;
	*max_pending = 0;
	while (got < n) {
		bool moved = false;
		if (sent < n) {
			ssize_t w = gnutls_record_send(p->cli, out + sent, n - sent);
			if (w > 0) {
				sent += (size_t)w;
				moved = true;
			} else {
				ck_assert_msg(again((int)w), "client send %s", gnutls_strerror((int)w));
			}
		}
		while (nbd_tls_pending(p->srv) > 0 || ready(p->sfd, nbd_tls_want_write(p->srv))) {
			ssize_t r = nbd_tls_recv(p->srv, chunk, rsz);
			if (r == -EAGAIN)
				break;
			ck_assert_msg(r > 0, "server recv %zd %s", r, nbd_tls_error(p->srv));
			ck_assert_uint_le(got + (size_t)r, n);
			memcpy(in + got, chunk, (size_t)r);
			got += (size_t)r;
			size_t pend = nbd_tls_pending(p->srv);
			if (pend > *max_pending)
				*max_pending = pend;
			moved = true;
		}
		idle = moved ? 0 : idle + 1;
		ck_assert_msg(idle < 3, "stall: sent %zu got %zu of %zu (pending %zu)", sent, got, n,
			      nbd_tls_pending(p->srv));
	}
	ck_assert(memcmp(in, out, n) == 0);
	free(out);
	free(in);
	free(chunk);
}

/* Server to client: one nbd_tls_send call per step with everything left
 * (short writes), -EAGAIN answered by repeating the same buf/len once the
 * fd is writable.  Counts short writes and -EAGAINs. */
static void server_to_client(struct pair *p, size_t n, unsigned *shorts, unsigned *eagains)
{
	unsigned char *out = malloc(n), *in = malloc(n);
	fill(out, n, 11);
	size_t sent = 0, got = 0;
	int idle = 0;
	bool blocked = false;
	*shorts = *eagains = 0;
	while (got < n) {
		bool moved = false;
		if (sent < n && (!blocked || ready(p->sfd, true))) {
			ssize_t w = nbd_tls_send(p->srv, out + sent, n - sent);
			if (w == -EAGAIN) {
				ck_assert(nbd_tls_want_write(p->srv));
				blocked = true;
				(*eagains)++;
			} else {
				ck_assert_msg(w > 0, "server send %zd %s", w, nbd_tls_error(p->srv));
				if ((size_t)w < n - sent)
					(*shorts)++;
				sent += (size_t)w;
				blocked = false;
				moved = true;
			}
		}
		while (got < n) {
			ssize_t r = gnutls_record_recv(p->cli, in + got, n - got);
			if (again((int)r))
				break;
			ck_assert_msg(r > 0, "client recv %s", gnutls_strerror((int)r));
			got += (size_t)r;
			moved = true;
		}
		idle = moved ? 0 : idle + 1;
		ck_assert_msg(idle < 3, "stall: sent %zu got %zu of %zu", sent, got, n);
	}
	ck_assert(memcmp(in, out, n) == 0);
	free(out);
	free(in);
}

START_TEST(test_data_both_ways)
{
	struct pair p;
	pair_open(&p, "good", true, &c1);
	/* A small send buffer, so that the server's sends block. */
	int sz = 4096;
	ck_assert_int_eq(setsockopt(p.sfd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz)), 0);
	pair_handshake_ok(&p);
	size_t maxp;
	client_to_server(&p, (1 << 20) + 15000, 7000, &maxp);	/* last record > 7000 */
	ck_assert_uint_gt(maxp, 0);	/* records were read in pieces */
	unsigned shorts, eagains;
	server_to_client(&p, (1 << 20) + 999, &shorts, &eagains);
	ck_assert_uint_gt(shorts, 0);
	ck_assert_uint_gt(eagains, 0);
	/* Small exchanges after big ones, in the other order. */
	server_to_client(&p, 1, &shorts, &eagains);
	client_to_server(&p, 3, 1, &maxp);
	ck_assert_uint_eq(maxp, 2);
	client_to_server(&p, 65536 + 17, 65536 * 2, &maxp);
	server_to_client(&p, 65536 + 17, &shorts, &eagains);
	ck_assert_uint_gt(shorts, 0);
	pair_close(&p);
}
END_TEST

START_TEST(test_pending)
{
	/* Two full records from the client, in the socket before the server
	 * reads.  A 100-byte recv decrypts the whole first record: the rest
	 * is pending(), the second record still in the socket (GnuTLS reads
	 * no further than the record it decrypts), so draining pending and
	 * then waiting for the fd loses nothing. */
	struct pair p;
	pair_open(&p, "good", true, &c1);
	pair_handshake_ok(&p);
	static unsigned char out[2 * 16384], in[2 * 16384];
	fill(out, sizeof(out), 3);
	ck_assert_int_eq(gnutls_record_send(p.cli, out, 16384), 16384);
	ck_assert_int_eq(gnutls_record_send(p.cli, out + 16384, 16384), 16384);
	ck_assert_uint_eq(nbd_tls_pending(p.srv), 0);
	ck_assert_int_eq(nbd_tls_recv(p.srv, in, 100), 100);
	ck_assert_uint_eq(nbd_tls_pending(p.srv), 16384 - 100);
	ck_assert(ready(p.sfd, false));
	ck_assert_int_eq(nbd_tls_recv(p.srv, in + 100, sizeof(in)), 16384 - 100);
	ck_assert_uint_eq(nbd_tls_pending(p.srv), 0);
	ck_assert(ready(p.sfd, false));
	ck_assert_int_eq(nbd_tls_recv(p.srv, in + 16384, sizeof(in)), 16384);
	ck_assert_uint_eq(nbd_tls_pending(p.srv), 0);
	ck_assert(!ready(p.sfd, false));
	ck_assert_int_eq(nbd_tls_recv(p.srv, in, sizeof(in)), -EAGAIN);
	ck_assert(!nbd_tls_want_write(p.srv));
	ck_assert(memcmp(in, out, sizeof(out)) == 0);
	pair_close(&p);
}
END_TEST

START_TEST(test_key_update)
{
	/* TLS 1.3: the client updates its keys and asks the server to update
	 * its own; the server's recv must answer (a write inside a read,
	 * contract 4 of tls.h) and data keeps flowing both ways. */
	struct pair p;
	pair_open(&p, "good", true, &c1);
	pair_handshake_ok(&p);
	ck_assert_int_eq(gnutls_session_key_update(p.cli, GNUTLS_KU_PEER), 0);
	size_t maxp;
	unsigned shorts, eagains;
	client_to_server(&p, 100000, 5000, &maxp);
	server_to_client(&p, 100000, &shorts, &eagains);
	client_to_server(&p, 10, 5000, &maxp);
	pair_close(&p);
}
END_TEST

START_TEST(test_renegotiation_refused)
{
	/* TLS 1.2: a client asking for a new handshake is refused (qsm never
	 * renegotiates), with -EPROTO and a message. */
	struct pair p;
	struct client_opts o = c1;
	o.prio = prios[1];
	pair_open(&p, "good", true, &o);
	pair_handshake_ok(&p);
	int c = gnutls_handshake(p.cli);
	ck_assert_msg(again(c), "client rehandshake: %s", gnutls_strerror(c));
	char b[64];
	ssize_t r = nbd_tls_recv(p.srv, b, sizeof(b));
	ck_assert_msg(r == -EPROTO, "%zd %s", r, nbd_tls_error(p.srv));
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "renegotiation"), "%s", nbd_tls_error(p.srv));
	pair_close(&p);
}
END_TEST

START_TEST(test_eof)
{
	struct pair p;
	char b[16];

	/* close_notify from the client: a clean EOF, and it stays EOF. */
	pair_open(&p, "good", true, &c1);
	pair_handshake_ok(&p);
	ck_assert_int_eq(gnutls_record_send(p.cli, "hi", 2), 2);
	ck_assert_int_eq(gnutls_bye(p.cli, GNUTLS_SHUT_WR), 0);
	ck_assert_int_eq(nbd_tls_recv(p.srv, b, sizeof(b)), 2);
	ck_assert_int_eq(nbd_tls_recv(p.srv, b, sizeof(b)), 0);
	ck_assert(nbd_tls_eof_clean(p.srv));
	ck_assert_int_eq(nbd_tls_recv(p.srv, b, sizeof(b)), 0);
	/* A half-close: the server may still answer. */
	ck_assert_int_eq(nbd_tls_send(p.srv, "reply", 5), 5);
	ck_assert_int_eq(gnutls_record_recv(p.cli, b, sizeof(b)), 5);
	ck_assert(memcmp(b, "reply", 5) == 0);
	/* The server says goodbye too; the client reads its EOF. */
	ck_assert_int_eq(nbd_tls_bye(p.srv), 0);
	ck_assert_int_eq(nbd_tls_bye(p.srv), 0);
	ck_assert_int_eq(gnutls_record_recv(p.cli, b, sizeof(b)), 0);
	pair_close(&p);

	/* The socket closed without close_notify (QEMU 7.2's client). */
	pair_open(&p, "good", true, &c1);
	pair_handshake_ok(&p);
	ck_assert_int_eq(gnutls_record_send(p.cli, "hello", 5), 5);
	close(p.cfd);
	p.cfd = -1;
	ck_assert_int_eq(nbd_tls_recv(p.srv, b, sizeof(b)), 5);
	ck_assert_int_eq(nbd_tls_recv(p.srv, b, sizeof(b)), 0);
	ck_assert(!nbd_tls_eof_clean(p.srv));
	ck_assert_str_eq(nbd_tls_error(p.srv), "");
	/* Writing after that EOF: -EPIPE, as on the socket. */
	ck_assert_int_eq(nbd_tls_send(p.srv, "x", 1), -EPIPE);
	pair_close(&p);

	/* Writing to a vanished client before reading its EOF: the socket's
	 * -EPIPE, no SIGPIPE (the test would die of it), and the failure is
	 * sticky. */
	pair_open(&p, "good", true, &c1);
	pair_handshake_ok(&p);
	close(p.cfd);
	p.cfd = -1;
	ssize_t w = nbd_tls_send(p.srv, "x", 1);
	ck_assert_msg(w == -EPIPE, "%zd %s", w, nbd_tls_error(p.srv));
	ck_assert_msg(strstr(nbd_tls_error(p.srv), "Cannot write to TLS channel") &&
			      strstr(nbd_tls_error(p.srv), strerror(EPIPE)),
		      "%s", nbd_tls_error(p.srv));
	ck_assert_int_eq(nbd_tls_send(p.srv, "x", 1), -EPIPE);
	ck_assert_int_eq(nbd_tls_recv(p.srv, b, 1), -EPIPE);
	ck_assert_uint_eq(nbd_tls_pending(p.srv), 0);
	pair_close(&p);
}
END_TEST

START_TEST(test_bye_blocked)
{
	/* close_notify when the socket is full: -EAGAIN waiting to write, then
	 * sent once the client reads. */
	struct pair p;
	pair_open(&p, "good", true, &c1);
	int sz = 4096;
	ck_assert_int_eq(setsockopt(p.sfd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz)), 0);
	pair_handshake_ok(&p);
	static unsigned char big[1 << 16];
	size_t queued = 0;
	ssize_t w;
	while ((w = nbd_tls_send(p.srv, big, sizeof(big))) > 0)
		queued += (size_t)w;
	ck_assert_int_eq(w, -EAGAIN);
	/* Finish that record (same buf/len) once the client has read. */
	static unsigned char sink[1 << 20];
	size_t got = 0;
	for (int i = 0; i < 1000 && w == -EAGAIN; i++) {
		ssize_t r = gnutls_record_recv(p.cli, sink, sizeof(sink));
		if (r > 0)
			got += (size_t)r;
		w = nbd_tls_send(p.srv, big, sizeof(big));
	}
	ck_assert_int_gt(w, 0);
	queued += (size_t)w;
	while ((w = nbd_tls_send(p.srv, big, sizeof(big))) > 0)
		queued += (size_t)w;
	int r = nbd_tls_bye(p.srv);
	ck_assert_int_eq(r, -EAGAIN);
	ck_assert(nbd_tls_want_write(p.srv));
	for (int i = 0; i < 1000 && r == -EAGAIN; i++) {
		ssize_t n = gnutls_record_recv(p.cli, sink, sizeof(sink));
		if (n > 0)
			got += (size_t)n;
		if (ready(p.sfd, true))
			r = nbd_tls_bye(p.srv);
	}
	ck_assert_int_eq(r, 0);
	/* The last send's -EAGAIN was not repeated: bye flushed its record
	 * (one record: 16 KiB of the 64 KiB offered) before close_notify.  The
	 * client sees all of it, then EOF. */
	ssize_t n;
	while ((n = gnutls_record_recv(p.cli, sink, sizeof(sink))) > 0)
		got += (size_t)n;
	ck_assert_int_eq(n, 0);
	ck_assert_uint_eq(got, queued + 16384);
	pair_close(&p);
}
END_TEST

/* ---- cases: loading credentials --------------------------------------- */

static int load(const char *dir, char *err, size_t len)
{
	struct nbd_tls_creds *c = (void *)1;
	int r = nbd_tls_creds_load(bpath(dir), true, &c, err, len);
	if (r == 0) {
		ck_assert_ptr_nonnull(c);
		nbd_tls_creds_free(c);
	} else {
		ck_assert_ptr_null(c);
	}
	return r;
}

static void load_fails(const char *dir, int want, const char *const *needles)
{
	char err[512];
	int r = load(dir, err, sizeof(err));
	ck_assert_msg(r < 0 && (want == 0 || r == want), "%s: %d (want %d) %s", dir, r, want, err);
	for (; *needles; needles++)
		ck_assert_msg(strstr(err, *needles), "%s: \"%s\" lacks \"%s\"", dir, err, *needles);
}

START_TEST(test_load_missing)
{
	char file[512];
	snprintf(file, sizeof(file), "Unable to access credentials %s/noca/ca-cert.pem: %s", base,
		 strerror(ENOENT));
	load_fails("noca", -ENOENT, (const char *const[]){ file, NULL });
	load_fails("nocert", -ENOENT, (const char *const[]){ "nocert/server-cert.pem", NULL });
	load_fails("nokey", -ENOENT, (const char *const[]){ "nokey/server-key.pem", NULL });
	load_fails("no-such-dir", -ENOENT, (const char *const[]){ "no-such-dir/ca-cert.pem", NULL });
	/* A short error buffer is still a terminated string. */
	char small[8];
	ck_assert_int_eq(load("nokey", small, sizeof(small)), -ENOENT);
	ck_assert_uint_eq(strlen(small), sizeof(small) - 1);
	ck_assert_int_eq(load("nokey", NULL, 0), -ENOENT);
}
END_TEST

START_TEST(test_load_bad)
{
	load_fails("wrongkey", -EINVAL,
		   (const char *const[]){ "wrongkey/server-cert.pem", "wrongkey/server-key.pem", NULL });
	load_fails("otherca", -EINVAL,
		   (const char *const[]){ "Our own certificate", "otherca/server-cert.pem",
					  "otherca/ca-cert.pem", NULL });
	load_fails("notca", -EINVAL, (const char *const[]){ "notca/ca-cert.pem", "do not show a CA", NULL });
	load_fails("expired", -EINVAL,
		   (const char *const[]){ "server certificate", "expired/server-cert.pem", "has expired",
					  NULL });
	load_fails("baddh", -EINVAL, (const char *const[]){ "DH parameters", "baddh/dh-params.pem", NULL });
	load_fails("badcrl", -EINVAL, (const char *const[]){ "CRL", "badcrl/ca-crl.pem", NULL });
}
END_TEST

START_TEST(test_load_optional)
{
	char err[512];
	ck_assert_msg(load("good", err, sizeof(err)) == 0, "%s", err);
	ck_assert_str_eq(err, "");
	ck_assert_msg(load("dh", err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(load("crl", err, sizeof(err)) == 0, "%s", err);
	/* With the DH file, a handshake still works (its clients negotiate
	 * what they like; the DHE case with RSA keys is the certtool case). */
	struct pair p;
	pair_open(&p, "dh", true, &c1);
	pair_handshake_ok(&p);
	pair_close(&p);
}
END_TEST

/* ---- cases: README's certtool recipe, and gnutls-cli ------------------ */

static bool have(const char *prog)
{
	return sh("command -v %s >/dev/null 2>&1", prog) == 0;
}

/* README.md's certtool recipe ("TLS for qsm nbd": the indented block that
 * starts with "mkdir -p tls/client"), run as it is in base/DIR: it makes
 * DIR/tls (the server's directory) and DIR/tls/client. */
static int certtool_recipe(const char *dir)
{
	return sh("set -e; mkdir -p '%s/%s'; cd '%s/%s'; "
		  "awk '/^    mkdir -p tls\\/client/{f=1} f&&/^    /{print substr($0,5)} f&&/^$/{exit}' "
		  "'%s/README.md' > recipe.sh; grep -q certtool recipe.sh; bash -e recipe.sh > certtool.log 2>&1",
		  base, dir, base, dir, QSM_SOURCE_DIR);
}

START_TEST(test_certtool_dir)
{
	if (!have("certtool")) {
		QSM_SKIP("certtool (gnutls-bin) not found");
		return;
	}
	ck_assert_msg(certtool_recipe("ct") == 0, "README's recipe failed: see %s/ct/certtool.log", base);
	char cert[512], key[512], ca[512];
	snprintf(cert, sizeof(cert), "%s/ct/tls/client/client-cert.pem", base);
	snprintf(key, sizeof(key), "%s/ct/tls/client/client-key.pem", base);
	snprintf(ca, sizeof(ca), "%s/ct/tls/client/ca-cert.pem", base);
	struct client_opts o = { .cert = cert, .key = key, .ca = ca };
	struct pair p;
	pair_open(&p, "ct/tls", true, &o);
	pair_handshake_ok(&p);
	size_t maxp;
	client_to_server(&p, 100000, 4096, &maxp);
	pair_close(&p);
	/* TLS 1.2 with DHE-RSA only: the server's DH group (no dh-params.pem:
	 * GnuTLS's known RFC 7919 parameters). */
	o.prio = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+DHE-RSA";
	pair_open(&p, "ct/tls", true, &o);
	pair_handshake_ok(&p);
	ck_assert_int_eq(gnutls_kx_get(p.cli), GNUTLS_KX_DHE_RSA);
	pair_close(&p);
}
END_TEST

START_TEST(test_gnutls_cli)
{
	if (!have("gnutls-cli")) {
		QSM_SKIP("gnutls-cli (gnutls-bin) not found");
		return;
	}
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);
	ck_assert_int_eq(bind(l, (struct sockaddr *)&a, sizeof(a)), 0);
	ck_assert_int_eq(listen(l, 1), 0);
	ck_assert_int_eq(getsockname(l, (struct sockaddr *)&a, &al), 0);
	/* gnutls-cli sends its stdin, prints what it receives, and (with
	 * stdin at EOF) closes. */
	char cmd[2048];
	snprintf(cmd, sizeof(cmd),
		 "printf 'ping from gnutls-cli\\n' | timeout 20 gnutls-cli --port %d "
		 "--x509cafile '%s' --x509certfile '%s' --x509keyfile '%s' localhost > '%s' 2>&1",
		 ntohs(a.sin_port), bpath("ca1.pem"), c1.cert, c1.key, bpath("cli.out"));
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
		_exit(127);
	}
	int fd = accept(l, NULL, NULL);
	ck_assert_int_ge(fd, 0);
	nonblock(fd);
	char err[512];
	struct nbd_tls_creds *creds;
	ck_assert_msg(nbd_tls_creds_load(bpath("good"), true, &creds, err, sizeof(err)) == 0, "%s", err);
	struct nbd_tls *t;
	ck_assert_int_eq(nbd_tls_new(creds, fd, &t), 0);
	int r;
	time_t t0 = time(NULL);
	while ((r = nbd_tls_handshake(t)) == -EAGAIN && time(NULL) - t0 < 20) {
		struct pollfd pfd = { .fd = fd, .events = nbd_tls_want_write(t) ? POLLOUT : POLLIN };
		poll(&pfd, 1, 1000);
	}
	ck_assert_msg(r == 0, "%d %s", r, nbd_tls_error(t));
	ck_assert(strstr(nbd_tls_peer_dn(t), "CN=client1"));
	/* Read the line, answer, and say goodbye. */
	char line[256];
	size_t got = 0;
	while (!memchr(line, '\n', got) && time(NULL) - t0 < 20) {
		ssize_t n = nbd_tls_recv(t, line + got, sizeof(line) - 1 - got);
		if (n == -EAGAIN) {
			struct pollfd pfd = { .fd = fd, .events = POLLIN };
			poll(&pfd, 1, 1000);
			continue;
		}
		ck_assert_msg(n > 0, "%zd %s", n, nbd_tls_error(t));
		got += (size_t)n;
	}
	line[got] = 0;
	ck_assert_str_eq(line, "ping from gnutls-cli\n");
	static const char reply[] = "pong from qsm\n";
	ssize_t w;
	while ((w = nbd_tls_send(t, reply, sizeof(reply) - 1)) == -EAGAIN)
		poll(&(struct pollfd){ .fd = fd, .events = POLLOUT }, 1, 1000);
	ck_assert_int_eq(w, sizeof(reply) - 1);
	while ((r = nbd_tls_bye(t)) == -EAGAIN)
		poll(&(struct pollfd){ .fd = fd, .events = POLLOUT }, 1, 1000);
	ck_assert_int_eq(r, 0);
	int status;
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	nbd_tls_free(t);
	nbd_tls_creds_free(creds);
	close(fd);
	close(l);
	FILE *f = fopen(bpath("cli.out"), "r");
	ck_assert_ptr_nonnull(f);
	char out[8192];
	size_t n = fread(out, 1, sizeof(out) - 1, f);
	out[n] = 0;
	fclose(f);
	ck_assert_msg(strstr(out, "pong from qsm"), "gnutls-cli said:\n%s", out);
	ck_assert_msg(strstr(out, "Handshake was completed"), "gnutls-cli said:\n%s", out);
}
END_TEST

static Suite *tls_suite(void)
{
	Suite *s = suite_create("nbd_tls");
	struct {
		const char *name;
		const TTest *t;
		int loops;	/* 2: TLS 1.3 and 1.2 (prios) */
	} cases[] = {
		{ "handshake", test_handshake, 1 },
		{ "handshake_tls12", test_handshake_tls12, 1 },
		{ "handshake_waits", test_handshake_waits, 1 },
		{ "no_client_cert", test_no_client_cert, 2 },
		{ "other_ca_client", test_other_ca_client, 2 },
		{ "expired_client", test_expired_client, 1 },
		{ "revoked_client", test_revoked_client, 2 },
		{ "client_refuses_server", test_client_refuses_server, 1 },
		{ "garbage_client", test_garbage_client, 1 },
		{ "client_vanishes_in_handshake", test_client_vanishes_in_handshake, 1 },
		{ "data_both_ways", test_data_both_ways, 1 },
		{ "pending", test_pending, 1 },
		{ "key_update", test_key_update, 1 },
		{ "renegotiation_refused", test_renegotiation_refused, 1 },
		{ "eof", test_eof, 1 },
		{ "bye_blocked", test_bye_blocked, 1 },
		{ "load_missing", test_load_missing, 1 },
		{ "load_bad", test_load_bad, 1 },
		{ "load_optional", test_load_optional, 1 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		TCase *tc = tcase_create(cases[i].name);
		tcase_add_loop_test(tc, cases[i].t, 0, cases[i].loops ? cases[i].loops : 1);
		suite_add_tcase(s, tc);
	}
	TCase *tc = tcase_create("certtool");
	QSM_TCASE_REQUIRES(tc, "certtool");
	tcase_add_test(tc, test_certtool_dir);
	suite_add_tcase(s, tc);
	tc = tcase_create("gnutls_cli");
	QSM_TCASE_REQUIRES(tc, "gnutls-cli");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_gnutls_cli);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	snprintf(base, sizeof(base), "%s/qsm-nbd-tls-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(base)) {
		perror("mkdtemp");
		return 1;
	}
	make_all();
	static char p[8][512];
	snprintf(p[0], 512, "%s/client1-cert.pem", base);
	snprintf(p[1], 512, "%s/client1-key.pem", base);
	snprintf(p[2], 512, "%s/client2-cert.pem", base);
	snprintf(p[3], 512, "%s/client2-key.pem", base);
	snprintf(p[4], 512, "%s/client3-cert.pem", base);
	snprintf(p[5], 512, "%s/client3-key.pem", base);
	c1 = (struct client_opts){ .cert = p[0], .key = p[1] };
	c2 = (struct client_opts){ .cert = p[2], .key = p[3] };
	c3 = (struct client_opts){ .cert = p[4], .key = p[5] };
	nocert = (struct client_opts){ .cert = NULL };
	int ret = qsm_test_run(tls_suite());
	if (sh("rm -rf '%s'", base) != 0)
		fprintf(stderr, "could not remove %s\n", base);
	return ret;
}
