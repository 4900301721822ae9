/*
 * tools/nbd/tls_load.c: the TLS layer of `qsm nbd` as the qsm binary sees
 * it: tls.h's functions, each forwarding to the module built from tls.c
 * (tls.h, "Loading"), so that qsm links no GnuTLS and only `qsm nbd --tls`
 * pays for loading it.
 *
 * Contracts
 *  1. nbd_tls_creds_load loads the module (dlopen, once: it stays loaded
 *     until exit, sessions may run until then) from the directory of the
 *     running executable, else from QSM_MODULE_RELDIR relative to it (an
 *     installed qsm), else from QSM_MODULE_DIR; when none loads, or
 *     the module's table is missing or of another version, it fails with
 *     -ENOTSUP and a message naming the path tried last and why.
 *  2. Every other function needs credentials or a session, which only a
 *     successful nbd_tls_creds_load hands out: the module is loaded then
 *     (asserted).  nbd_tls_creds_free and nbd_tls_free take NULL as tls.c
 *     does, module or not.
 *  3. Called from one thread at a time until the first load has returned
 *     (qsm nbd loads its credentials at start-up, before any thread).
 */
#include "tools/nbd/tls.h"

#include <assert.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifndef QSM_MODULE_DIR
#define QSM_MODULE_DIR "/usr/local/lib/qsm"
#endif
#ifndef QSM_MODULE_RELDIR
#define QSM_MODULE_RELDIR "../lib/qsm"
#endif

static const struct nbd_tls_module *mod;

/* Try the module at path: 0 and mod set, or -ENOTSUP with why. */
static int try_load(const char *path, char *why, size_t whylen)
{
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		snprintf(why, whylen, "%s", dlerror());
		return -ENOTSUP;
	}
	const struct nbd_tls_module *m = dlsym(h, NBD_TLS_MODULE_SYMBOL);
	if (!m || m->version != NBD_TLS_MODULE_VERSION) {
		snprintf(why, whylen, "%s: %s", path,
			 m ? "a module of another qsm version" : "not a qsm TLS module");
		dlclose(h);
		return -ENOTSUP;
	}
	mod = m;
	return 0;
}

static int load(char *err, size_t errlen)
{
	char self[PATH_MAX], path[2 * PATH_MAX], why[2 * PATH_MAX + 256];
	if (mod)
		return 0;
	/* Next to the executable, then where an install of it puts modules
	 * (relative: the prefix may have moved), present ones only. */
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	char *slash = n > 0 ? memrchr(self, '/', (size_t)n) : NULL;
	if (slash) {
		*slash = '\0';
		static const char *const rel[] = { "", "/" QSM_MODULE_RELDIR };
		for (size_t i = 0; i < sizeof(rel) / sizeof(rel[0]); i++) {
			snprintf(path, sizeof(path), "%s%s/%s", self, rel[i], NBD_TLS_MODULE_FILE);
			if (access(path, F_OK) == 0 && try_load(path, why, sizeof(why)) == 0)
				return 0;
		}
	}
	snprintf(path, sizeof(path), "%s/%s", QSM_MODULE_DIR, NBD_TLS_MODULE_FILE);
	if (try_load(path, why, sizeof(why)) == 0)
		return 0;
	if (errlen)
		snprintf(err, errlen, "TLS is not available: cannot load its module (%s)", why);
	return -ENOTSUP;
}

int nbd_tls_creds_load(const char *dir, bool verify_peer, struct nbd_tls_creds **out,
		       char *err, size_t errlen)
{
	*out = NULL;
	int ret = load(err, errlen);
	return ret < 0 ? ret : mod->creds_load(dir, verify_peer, out, err, errlen);
}

void nbd_tls_creds_free(struct nbd_tls_creds *c)
{
	if (c)
		mod->creds_free(c);
}

bool nbd_tls_creds_verify_peer(const struct nbd_tls_creds *c)
{
	assert(mod);
	return mod->creds_verify_peer(c);
}

int nbd_tls_new(struct nbd_tls_creds *c, int fd, struct nbd_tls **out)
{
	assert(mod);
	return mod->new_session(c, fd, out);
}

int nbd_tls_handshake(struct nbd_tls *t)
{
	return mod->handshake(t);
}

ssize_t nbd_tls_recv(struct nbd_tls *t, void *buf, size_t len)
{
	return mod->recv(t, buf, len);
}

ssize_t nbd_tls_send(struct nbd_tls *t, const void *buf, size_t len)
{
	return mod->send(t, buf, len);
}

bool nbd_tls_want_write(const struct nbd_tls *t)
{
	return mod->want_write(t);
}

size_t nbd_tls_pending(const struct nbd_tls *t)
{
	return mod->pending(t);
}

int nbd_tls_bye(struct nbd_tls *t)
{
	return mod->bye(t);
}

const char *nbd_tls_error(const struct nbd_tls *t)
{
	return mod->error(t);
}

const char *nbd_tls_peer_dn(const struct nbd_tls *t)
{
	return mod->peer_dn(t);
}

bool nbd_tls_eof_clean(const struct nbd_tls *t)
{
	return mod->eof_clean(t);
}

void nbd_tls_free(struct nbd_tls *t)
{
	if (t)
		mod->free_session(t);
}
