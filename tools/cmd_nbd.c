/*
 * tools/cmd_nbd.c: `qsm nbd` (and `qemu-nbd` through the multi-call
 * binary): serve one image over NBD, with qemu-nbd 7.2's command line.
 *
 *   qsm nbd [-k SOCKET | -p PORT [-b ADDR]] [-x NAME] [-D DESC] [-r] [-t]
 *           [-e SHARED] [-f qcow2|raw] [--cache MODE] [--aio threads|io_uring]
 *           [--discard ignore|unmap] [-A] [--pid-file F] [--fork]
 *           [--object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]]
 *           [--tls-creds ID] [--handshake-limit N] [--poll-us N] IMAGE
 *
 * Design: this file owns the process (options, the image, the listening
 * socket, signals, --fork, the pid file); tools/nbd/conn.c owns the
 * connections.  Everything runs on one libevent loop, the image's.
 * Life of the process:
 *   open image -> listen -> (--fork: tell the parent) -> serve
 *   -> (last client gone without -t | SIGTERM/SIGINT) stop accepting
 *   -> connections drain (their requests finish, replies go out; after
 *      NBD_DRAIN_SECS_DEFAULT, 5 s, a client's unsent replies are dropped)
 *   -> qsm_close_async (write-back, clean close) -> exit 0.
 * qemu-nbd's defaults: port 10809 on 0.0.0.0, export name "", -e 1 (one
 * client at a time: accepting pauses while the limit is reached; 0 means
 * no limit), cache writeback, discard ignore (TRIM succeeds and does
 * nothing), exit once the last client has gone unless -t.
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sm/qsm.h"
#include "tools/cli.h"
#include "tools/nbd/proto.h"
#include "tools/nbd/server.h"
#ifdef QSM_NBD_TLS
#include "tools/nbd/tls.h"
#endif

struct nbd_main {
	struct nbd_server srv;
	struct event_base *base;
	int lfd;
	struct event *lev;
	bool listening;
	bool persistent;
	int shared;            /* 0: no limit */
	bool ever_connected;
	bool closing;          /* image close started */
	int close_ret;
	const char *sockpath;
	struct event *sigterm, *sigint, *sighup;
	unsigned poll_us;      /* --poll-us: serve()'s poll window; 0: none */
};

#define NBD_POLL_US_DEFAULT 50
#define NBD_POLL_US_MAX 10000

static const char *prog; /* "qemu-nbd" or "qsm nbd" */

static void nbd_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void nbd_err(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void usage(void)
{
	printf("Usage: %s [OPTIONS] FILE\n"
	       "Serve an image over NBD (a drop-in for qemu-nbd 7.2; qsm engine).\n"
	       "\n"
	       "  -h, --help                display this help and exit\n"
	       "  -V, --version             output version information and exit\n"
	       "\n"
	       "Connection properties:\n"
	       "  -p, --port=PORT           port to listen on (default 10809)\n"
	       "  -b, --bind=IFACE          interface to bind to (default 0.0.0.0)\n"
	       "  -k, --socket=PATH         path to the unix socket (replaces -p/-b)\n"
	       "  -e, --shared=NUM          device can be shared by NUM clients (default 1, 0 = no limit)\n"
	       "  -t, --persistent          don't exit on the last connection\n"
	       "  -x, --export-name=NAME    expose export by name (default \"\")\n"
	       "  -D, --description=TEXT    export a human-readable description\n"
	       "  -A, --allocation-depth    expose the allocation depth (qemu:allocation-depth)\n"
	       "  -B, --bitmap=NAME         expose a persistent dirty bitmap (qemu:dirty-bitmap:NAME;\n"
	       "                            may be given up to 16 times)\n"
	       "      --tls-creds=ID        use id of an earlier --object to provide TLS (required)\n"
	       "      --handshake-limit=N   seconds a client has to finish the handshake (default 10, 0: none)\n"
	       "      --poll-us=N           after activity, poll N microseconds before sleeping\n"
	       "                            (default 50, 0: never; qsm's own option)\n"
	       "      --pid-file=PATH       store the server's process ID in the given file\n"
	       "      --fork                fork off the server process and exit the parent once\n"
	       "                            the server is listening\n"
	       "\n"
	       "Block device options:\n"
	       "  -f, --format=FORMAT       qcow2 or raw; probed when not given\n"
	       "  -r, --read-only           export read-only\n"
	       "      --cache=MODE          writeback (default), none, writethrough, directsync, unsafe\n"
	       "      --aio=MODE            threads or io_uring\n"
	       "      --discard=MODE        ignore (default) or unmap: what TRIM does\n"
	       "      --object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]\n"
	       "                            X.509 credentials as QEMU reads them (ca-cert.pem,\n"
	       "                            server-cert.pem, server-key.pem in DIR)\n",
	       prog);
}

static void try_help(void)
{
	fprintf(stderr, "%s: Try `%s --help' for more information.\n", prog, prog);
}

static int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	return fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
}

static void listen_enable(struct nbd_main *m, bool on)
{
	if (m->lfd < 0 || on == m->listening)
		return;
	if (on)
		event_add(m->lev, NULL);
	else
		event_del(m->lev);
	m->listening = on;
}

static void close_done(void *opaque, int ret)
{
	struct nbd_main *m = opaque;
	m->close_ret = ret;
	m->srv.img = NULL;
	event_base_loopbreak(m->base);
}

/* No more clients: stop listening and close the image (once). */
static void main_stop(struct nbd_main *m)
{
	if (m->closing)
		return;
	listen_enable(m, false);
	if (m->lfd >= 0) {
		close(m->lfd);
		m->lfd = -1;
		if (m->sockpath)
			unlink(m->sockpath);
	}
	if (m->srv.nconns)
		return; /* on_close calls again */
	m->closing = true;
	int e = qsm_close_async(m->srv.img, close_done, m);
	if (e < 0) {
		m->close_ret = e;
		event_base_loopbreak(m->base);
	}
}

static uint64_t now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

/* Anything moved: a request taken, bytes received or sent. */
static uint64_t activity(const struct nbd_server *srv)
{
	return srv->reqs + srv->bytes_in + srv->bytes_out;
}

/*
 * The serving loop: libevent's loop with a poll window before each sleep,
 * as QEMU's event loop polls before it blocks (poll-max-ns).  After an
 * iteration, non-blocking iterations run for as long as something keeps
 * moving (activity()) and then poll_us more, before the loop blocks
 * again: a request or an I/O completion that comes within the window is
 * taken without a sleep and a wakeup, which at this latency is the
 * largest cost a request has (on a virtual machine, the host halts an
 * idle vCPU and has to wake it).  An idle server does not spin: a window
 * opens only after an iteration that ran something and closes poll_us
 * after the last activity.  Timers keep firing in the window (a
 * non-blocking iteration runs the expired ones).  Returns when the loop
 * is broken (close_done, a failed close) or has no events left.
 */
static void serve(struct nbd_main *m)
{
	for (;;) {
		if (event_base_loop(m->base, EVLOOP_ONCE) != 0 || event_base_got_break(m->base))
			return;
		uint64_t seen = activity(&m->srv), last = now_us();
		while (m->poll_us && now_us() - last < m->poll_us) {
			if (event_base_loop(m->base, EVLOOP_NONBLOCK) != 0 ||
			    event_base_got_break(m->base))
				return;
			if (activity(&m->srv) != seen) {
				seen = activity(&m->srv);
				last = now_us();
			}
		}
	}
}

/* As qemu-nbd's nbd_client_closed: without -t the server ends when the
 * last connection closes, but only one that had reached transmission (a
 * client that only listed exports, or gave up in the handshake, does not
 * end it). */
static void on_conn_close(struct nbd_server *srv, bool negotiated)
{
	struct nbd_main *m = srv->opaque;

	if (srv->stopping || (!m->persistent && srv->nconns == 0 && negotiated)) {
		srv->stopping = true;
		main_stop(m);
		return;
	}
	if (m->shared == 0 || srv->nconns < m->shared)
		listen_enable(m, true);
}

static void accept_cb(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_main *m = arg;

	for (;;) {
		if (m->shared && m->srv.nconns >= m->shared) {
			listen_enable(m, false);
			return;
		}
		int cfd = accept4(m->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (cfd < 0)
			return; /* EAGAIN, or a client that went away: keep listening */
		m->ever_connected = true;
		nbd_conn_start(&m->srv, cfd);
	}
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
	struct nbd_main *m = arg;

	nbd_server_shutdown(&m->srv);
	main_stop(m);
}

static int listen_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		nbd_err("UNIX socket path '%s' is too long", path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		nbd_err("Failed to create socket: %s", strerror(errno));
		return -1;
	}
	unlink(path); /* as QEMU: a stale socket file is replaced */
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		nbd_err("Failed to bind socket to %s: %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	if (listen(fd, 128) < 0) {
		nbd_err("Failed to listen on socket: %s", strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

static int listen_tcp(const char *addr, const char *port)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE }, *res, *ai;
	int fd = -1, e, saved = 0;

	e = getaddrinfo(addr, port, &hints, &res);
	if (e) {
		nbd_err("address resolution failed for %s:%s: %s", addr, port, gai_strerror(e));
		return -1;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		int one = 1;
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0) {
			saved = errno;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0)
			break;
		saved = errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		nbd_err("Failed to find an available port: %s", strerror(saved));
	return fd;
}

enum {
	OPT_CACHE = 256, OPT_AIO, OPT_DISCARD, OPT_PID_FILE, OPT_FORK, OPT_OBJECT,
	OPT_TLS_CREDS, OPT_HANDSHAKE, OPT_POLL_US,
};

/* -B: each bitmap found by name and its bits loaded (qsm_bitmap_load),
 * in qemu-nbd's words when it cannot be.  0 or -1 (printed). */
static int load_bitmaps(struct nbd_server *srv)
{
	for (unsigned i = 0; i < srv->nbitmaps; i++) {
		int k = qsm_bitmap_find(srv->img, srv->bitmaps[i].name);
		char err[2048];
		if (k < 0) {
			nbd_err("Bitmap '%s' is not found", srv->bitmaps[i].name);
			return -1;
		}
		if (qsm_bitmap_load(srv->img, (unsigned)k, err, sizeof(err)) < 0) {
			nbd_err("%s", err);
			return -1;
		}
		srv->bitmaps[i].index = (unsigned)k;
	}
	return 0;
}

int cmd_nbd(int argc, char **argv)
{
	static const struct option lopt[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ "port", required_argument, NULL, 'p' },
		{ "bind", required_argument, NULL, 'b' },
		{ "socket", required_argument, NULL, 'k' },
		{ "export-name", required_argument, NULL, 'x' },
		{ "description", required_argument, NULL, 'D' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "persistent", no_argument, NULL, 't' },
		{ "shared", required_argument, NULL, 'e' },
		{ "format", required_argument, NULL, 'f' },
		{ "allocation-depth", no_argument, NULL, 'A' },
		{ "bitmap", required_argument, NULL, 'B' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "nocache", no_argument, NULL, 'n' },
		{ "cache", required_argument, NULL, OPT_CACHE },
		{ "aio", required_argument, NULL, OPT_AIO },
		{ "discard", required_argument, NULL, OPT_DISCARD },
		{ "pid-file", required_argument, NULL, OPT_PID_FILE },
		{ "fork", no_argument, NULL, OPT_FORK },
		{ "object", required_argument, NULL, OPT_OBJECT },
		{ "tls-creds", required_argument, NULL, OPT_TLS_CREDS },
		{ "handshake-limit", required_argument, NULL, OPT_HANDSHAKE },
		{ "poll-us", required_argument, NULL, OPT_POLL_US },
		{ NULL, 0, NULL, 0 },
	};
	static struct nbd_main m; /* signal and loop callbacks point into it */
	struct qsm_open_opts oo = { QSM_OPTS_INIT(oo) };
	/* No -f: the image is probed, as qemu-nbd probes it. */
	const char *port = "10809", *bindto = "0.0.0.0", *fmt = NULL, *pid_file = NULL;
	const char *tls_id = NULL, *obj_id = NULL, *obj_dir = NULL;
	bool fork_process = false, verify_peer = true, have_object = false;
	unsigned handshake = 10;
	unsigned poll_us = NBD_POLL_US_DEFAULT;
	char err[512];
	int c, ret = 1, ready_pipe[2] = { -1, -1 };

	prog = cli_as_qemu() ? cli_progname() : "qsm nbd";
	memset(&m, 0, sizeof(m));
	m.lfd = -1;
	m.shared = 1;
	m.srv.name = "";
	argv[0] = (char *)prog; /* getopt's own messages name the program */
	optind = 1;
	while ((c = getopt_long(argc, argv, "hVp:b:k:x:D:rte:f:AB:vn", lopt, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage();
			return 0;
		case 'V':
			printf("%s version 0.1.0 (qsm)\n", prog);
			return 0;
		case 'p':
			port = optarg;
			break;
		case 'b':
			bindto = optarg;
			break;
		case 'k':
			m.sockpath = optarg;
			break;
		case 'x':
			m.srv.name = optarg;
			if (strlen(optarg) > NBD_MAX_STRING) {
				nbd_err("export name '%s' too long", optarg);
				return 1;
			}
			break;
		case 'D':
			m.srv.desc = optarg;
			if (strlen(optarg) > NBD_MAX_STRING) {
				nbd_err("export description '%s' too long", optarg);
				return 1;
			}
			break;
		case 'r':
			m.srv.read_only = true;
			break;
		case 't':
			m.persistent = true;
			break;
		case 'e': {
			char *end;
			errno = 0;
			long v = strtol(optarg, &end, 0);
			if (errno || end == optarg || *end || v < 0 || v > INT32_MAX) {
				nbd_err("Invalid shared device number '%s'", optarg);
				return 1;
			}
			m.shared = (int)v;
			break;
		}
		case 'f':
			fmt = optarg;
			break;
		case 'A':
			m.srv.alloc_depth = true;
			break;
		case 'B':
			if (m.srv.nbitmaps == NBD_MAX_BITMAPS) {
				nbd_err("At most %d bitmaps can be exported", NBD_MAX_BITMAPS);
				return 1;
			}
			m.srv.bitmaps[m.srv.nbitmaps++].name = optarg;
			break;
		case 'v':
			break;
		case 'n':
			oo.cache = QSM_CACHE_NONE;
			break;
		case OPT_CACHE:
			if (qsm_cache_mode_parse(optarg, &oo.cache) < 0) {
				nbd_err("Invalid cache mode `%s'", optarg);
				return 1;
			}
			break;
		case OPT_AIO:
			if (!strcmp(optarg, "threads") || !strcmp(optarg, "io_uring"))
				oo.aio = optarg;
			else if (strcmp(optarg, "native")) {
				nbd_err("Invalid aio mode '%s'", optarg);
				return 1;
			}
			break;
		case OPT_DISCARD:
			if (!strcmp(optarg, "unmap") || !strcmp(optarg, "on"))
				m.srv.discard_unmap = true;
			else if (!strcmp(optarg, "ignore") || !strcmp(optarg, "off"))
				m.srv.discard_unmap = false;
			else {
				nbd_err("Invalid discard mode `%s'", optarg);
				return 1;
			}
			break;
		case OPT_PID_FILE:
			pid_file = optarg;
			break;
		case OPT_FORK:
			fork_process = true;
			break;
		case OPT_OBJECT: {
			struct cli_opts o = { 0 };
			if (cli_opts_parse(&o, optarg) < 0 || o.n == 0 ||
			    strcmp(o.v[0].key, "tls-creds-x509")) {
				nbd_err("Invalid object '%s': only tls-creds-x509 is supported", optarg);
				cli_opts_free(&o);
				return 1;
			}
			const char *id = cli_opts_get(&o, "id"), *dir = cli_opts_get(&o, "dir");
			const char *ep = cli_opts_get(&o, "endpoint"), *vp = cli_opts_get(&o, "verify-peer");
			if (!id) {
				nbd_err("Parameter 'id' is missing");
				cli_opts_free(&o);
				return 1;
			}
			if (ep && strcmp(ep, "server")) {
				nbd_err("Expecting TLS credentials with a server endpoint");
				cli_opts_free(&o);
				return 1;
			}
			if (vp && cli_parse_bool(vp, &verify_peer) < 0) {
				nbd_err("Parameter 'verify-peer' expects 'on' or 'off'");
				cli_opts_free(&o);
				return 1;
			}
			obj_id = strdup(id);
			obj_dir = dir ? strdup(dir) : strdup(".");
			have_object = true;
			cli_opts_free(&o);
			break;
		}
		case OPT_TLS_CREDS:
			tls_id = optarg;
			break;
		case OPT_HANDSHAKE: {
			char *end;
			long v = strtol(optarg, &end, 10);
			if (end == optarg || *end || v < 0 || v > 86400) {
				nbd_err("Invalid handshake limit '%s'", optarg);
				return 1;
			}
			handshake = (unsigned)v;
			break;
		}
		case OPT_POLL_US: {
			char *end;
			long v = strtol(optarg, &end, 10);
			if (end == optarg || *end || v < 0 || v > NBD_POLL_US_MAX) {
				nbd_err("Invalid poll time '%s' (0 to %d microseconds)", optarg,
					NBD_POLL_US_MAX);
				return 1;
			}
			poll_us = (unsigned)v;
			break;
		}
		default:
			try_help();
			return 1;
		}
	}
	if (argc - optind != 1) {
		nbd_err("Invalid number of arguments");
		fprintf(stderr, "Try `%s --help' for more information.\n", prog);
		return 1;
	}
	const char *image = argv[optind];
	if (tls_id && (!have_object || strcmp(tls_id, obj_id))) {
		nbd_err("Failed to get TLS creds: No TLS credentials with id '%s'", tls_id);
		return 1;
	}
	if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
		nbd_err("Failed to blk_new_open '%s': Unknown driver '%s'", image, fmt);
		return 1;
	}

	/* --fork: the parent waits for the server to listen (a byte on the
	 * pipe) and exits 0, or 1 if the child failed before that. */
	if (fork_process) {
		if (pipe(ready_pipe) < 0) {
			nbd_err("pipe: %s", strerror(errno));
			return 1;
		}
		pid_t pid = fork();
		if (pid < 0) {
			nbd_err("Failed to fork: %s", strerror(errno));
			return 1;
		}
		if (pid > 0) {
			char b;
			close(ready_pipe[1]);
			ssize_t n;
			do
				n = read(ready_pipe[0], &b, 1);
			while (n < 0 && errno == EINTR);
			return n == 1 ? 0 : 1;
		}
		close(ready_pipe[0]);
		setsid();
		int dn = open("/dev/null", O_RDWR);
		if (dn >= 0) {
			dup2(dn, 0);
			dup2(dn, 1);
			if (dn > 2)
				close(dn);
		}
	}

	signal(SIGPIPE, SIG_IGN);
	m.base = event_base_new();
	if (!m.base) {
		nbd_err("Failed to create the event loop");
		goto out;
	}
	oo.read_only = m.srv.read_only;
	oo.format = fmt;
	oo.probe_format = !fmt;
	if (qsm_open(m.base, image, &oo, &m.srv.img, err, sizeof(err)) < 0) {
		nbd_err("Failed to blk_new_open '%s': %s", image, err);
		goto out;
	}
	cli_probed_warning(m.srv.img, image);
	if (load_bitmaps(&m.srv) < 0)
		goto out_close;
#ifdef QSM_NBD_TLS
	if (tls_id) {
		if (nbd_tls_creds_load(obj_dir, verify_peer, &m.srv.tls, err, sizeof(err)) < 0) {
			nbd_err("%s", err);
			goto out;
		}
	}
#else
	if (tls_id) {
		nbd_err("TLS is not available in this build of qsm");
		goto out;
	}
#endif
	nbd_server_init(&m.srv, m.base, m.srv.img);
	m.srv.multi_conn = m.shared != 1;
	m.srv.handshake_secs = handshake;
	m.poll_us = poll_us;
	m.srv.on_close = on_conn_close;
	m.srv.opaque = &m;

	m.lfd = m.sockpath ? listen_unix(m.sockpath) : listen_tcp(bindto, port);
	if (m.lfd < 0)
		goto out_close;
	set_nonblock(m.lfd);
	m.lev = event_new(m.base, m.lfd, EV_READ | EV_PERSIST, accept_cb, &m);
	m.sigterm = evsignal_new(m.base, SIGTERM, signal_cb, &m);
	m.sigint = evsignal_new(m.base, SIGINT, signal_cb, &m);
	m.sighup = evsignal_new(m.base, SIGHUP, signal_cb, &m);
	if (!m.lev || !m.sigterm || !m.sigint || !m.sighup) {
		nbd_err("Failed to set up the event loop");
		goto out_close;
	}
	evsignal_add(m.sigterm, NULL);
	evsignal_add(m.sigint, NULL);
	evsignal_add(m.sighup, NULL);
	listen_enable(&m, true);
	if (pid_file) {
		FILE *pf = fopen(pid_file, "w");
		if (!pf || fprintf(pf, "%d\n", (int)getpid()) < 0 || fclose(pf) != 0) {
			nbd_err("Failed to write pid file '%s': %s", pid_file, strerror(errno));
			goto out_close;
		}
	}
	if (fork_process) {
		char b = 0;
		if (write(ready_pipe[1], &b, 1) != 1) {
			/* the parent is gone: serve anyway */
		}
		close(ready_pipe[1]);
		ready_pipe[1] = -1;
	}

	serve(&m);
	if (m.srv.img) {
		/* The loop ran out of events before the close finished. */
		ret = qsm_close(m.srv.img) < 0;
		m.srv.img = NULL;
	} else {
		ret = m.close_ret < 0;
	}
	if (ret)
		nbd_err("Closing the image failed: %s", qsm_strerror(m.close_ret));
	goto out_free;

out_close:
	if (m.lfd >= 0) {
		close(m.lfd);
		if (m.sockpath)
			unlink(m.sockpath);
	}
	qsm_close(m.srv.img);
	m.srv.img = NULL;
	ret = 1;
out_free:
	if (m.lev)
		event_free(m.lev);
	if (m.sigterm)
		event_free(m.sigterm);
	if (m.sigint)
		event_free(m.sigint);
	if (m.sighup)
		event_free(m.sighup);
#ifdef QSM_NBD_TLS
	if (m.srv.tls)
		nbd_tls_creds_free(m.srv.tls);
#endif
out:
	if (m.base)
		event_base_free(m.base);
	free((char *)obj_id);
	free((char *)obj_dir);
	(void)verify_peer;
	return ret;
}
