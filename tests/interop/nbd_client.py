#!/usr/bin/env python3
"""tests/interop/nbd_client.py: a small raw-socket NBD client (Python 3
standard library only) that can misbehave on purpose, and the hostile-client
cases built on it.

The library part (class Conn) speaks the fixed newstyle handshake, options
and their replies, simple and structured replies and transmission requests,
each step separately, so a test can stop anywhere, send garbage, lie about
lengths or never read a reply.  Nothing here trusts the server either: every
read is bounded by a timeout and a reply length cap.

The command-line part runs against any qemu-nbd-compatible server listening
on a Unix socket (qemu-nbd 7.2, `qsm nbd`):
  hostile   the hostile and faulty client cases (test_nbd_hostile.sh)
  info      print the export's size and transmission flags as JSON
  write / verify / flush / durable / hold-write / hold-unread / tls   helpers for
            test_nbd_multi.sh and test_nbd_tls.sh (see each function)
Each check prints one line "PASS name: ..." / "FAIL name: ..." /
"XFAIL name: ..." (a qsm-only check failing on the reference qemu-nbd,
--reference); the exit status is 1 if any FAIL was printed.

Protocol facts: the NBD protocol document (doc/proto.md of
NetworkBlockDevice/nbd).
"""

import argparse
import errno
import json
import os
import signal
import socket
import ssl
import struct
import sys
import threading
import time

# --- protocol constants (doc/proto.md) ---
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9          # option reply magic
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
CFLAG_FIXED_NEWSTYLE = 1
CFLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_DF = 4
CMD_FLAG_REQ_ONE = 8
CMD_FLAG_FAST_ZERO = 16

TF = {
    "HAS_FLAGS": 1 << 0, "READ_ONLY": 1 << 1, "SEND_FLUSH": 1 << 2,
    "SEND_FUA": 1 << 3, "ROTATIONAL": 1 << 4, "SEND_TRIM": 1 << 5,
    "SEND_WRITE_ZEROES": 1 << 6, "SEND_DF": 1 << 7,
    "CAN_MULTI_CONN": 1 << 8, "SEND_RESIZE": 1 << 9,
    "SEND_CACHE": 1 << 10, "SEND_FAST_ZERO": 1 << 11,
}

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2
REPLY_FLAG_DONE = 1

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

MAX_REPLY = 64 << 20      # never believe a reply length above this


class Disconnected(Exception):
    """The server closed the connection (EOF or reset)."""


class OptError(Exception):
    def __init__(self, opt, rep, msg=b""):
        super().__init__("option %d: reply 0x%x %r" % (opt, rep, msg[:80]))
        self.opt, self.rep, self.msg = opt, rep, msg


class Reply:
    """One transmission reply: handle, error (NBD errno, 0 ok), data
    (READ payload, holes as zeros), chunks [(type, payload)]."""
    def __init__(self, handle, error=0, data=b"", chunks=None):
        self.handle, self.error, self.data = handle, error, data
        self.chunks = chunks or []


class Conn:
    """One client connection.  Every method may raise Disconnected; a read
    that waits longer than `timeout` raises socket.timeout."""

    def __init__(self, path, timeout=10.0, connect=True):
        self.path = path
        self.timeout = timeout
        self.sock = None
        self.structured = False
        self.size = None
        self.tflags = None
        self.next_handle = 1
        if connect:
            self.connect()

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # raw bytes
    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Disconnected(str(e))

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Disconnected(str(e))
            except ssl.SSLError as e:
                raise Disconnected("TLS: %s" % e)
            if not chunk:
                raise Disconnected("EOF after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def wait_closed(self, seconds):
        """True if the server closes the connection within `seconds`
        (whatever it sends meanwhile is read and dropped)."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return True
            except OSError:
                return True
            finally:
                if self.sock is not None:
                    self.sock.settimeout(self.timeout)
            if not chunk:
                return True

    # handshake
    def greeting(self):
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise AssertionError("not a fixed newstyle greeting: %x %x" % (magic, opt))
        self.hflags = hflags
        return hflags

    def client_flags(self, flags=None):
        if flags is None:
            flags = CFLAG_FIXED_NEWSTYLE | (self.hflags & FLAG_NO_ZEROES)
        self.cflags = flags
        self.send(struct.pack(">I", flags))

    def start(self):
        self.greeting()
        self.client_flags()

    def opt_send(self, opt, data=b"", length=None, magic=IHAVEOPT):
        self.send(struct.pack(">QII", magic, opt, len(data) if length is None else length) + data)

    def opt_reply(self):
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != REPLY_MAGIC:
            raise AssertionError("bad option reply magic 0x%x" % magic)
        if length > MAX_REPLY:
            raise AssertionError("option reply length %d" % length)
        return opt, rep, self.recv_exact(length)

    def opt_final(self, opt, data=b""):
        """Send an option, collect replies to the final one: returns
        (final reply type, [(type, data) of the replies before])."""
        self.opt_send(opt, data)
        infos = []
        while True:
            o, rep, payload = self.opt_reply()
            if o != opt:
                raise AssertionError("reply for option %d to option %d" % (o, opt))
            if rep == REP_ACK or rep & REP_ERR:
                return rep, infos, payload
            infos.append((rep, payload))

    def go(self, name=b"", infos=(), opt=OPT_GO):
        """OPT_GO (or OPT_INFO): sets size/tflags, raises OptError."""
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        rep, replies, payload = self.opt_final(opt, data)
        if rep != REP_ACK:
            raise OptError(opt, rep, payload)
        self.infos = {}
        for t, p in replies:
            if t == REP_INFO and len(p) >= 2:
                it = struct.unpack(">H", p[:2])[0]
                self.infos[it] = p[2:]
                if it == INFO_EXPORT:
                    self.size, self.tflags = struct.unpack(">QH", p[2:12])
        if self.size is None and opt == OPT_GO:
            raise AssertionError("OPT_GO acked without NBD_INFO_EXPORT")
        return self

    def export_name(self, name=b""):
        self.opt_send(OPT_EXPORT_NAME, name)
        self.size, self.tflags = struct.unpack(">QH", self.recv_exact(10))
        if not self.cflags & CFLAG_NO_ZEROES:
            self.recv_exact(124)

    def structured_reply(self):
        rep, _, payload = self.opt_final(OPT_STRUCTURED_REPLY)
        if rep != REP_ACK:
            raise OptError(OPT_STRUCTURED_REPLY, rep, payload)
        self.structured = True

    def set_meta(self, contexts, name=b"", opt=OPT_SET_META_CONTEXT):
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
        for c in contexts:
            data += struct.pack(">I", len(c)) + c
        rep, replies, payload = self.opt_final(opt, data)
        if rep != REP_ACK:
            raise OptError(opt, rep, payload)
        self.meta = {}
        for t, p in replies:
            if t == REP_META_CONTEXT:
                self.meta[p[4:]] = struct.unpack(">I", p[:4])[0]
        return self.meta

    # transmission
    def request(self, cmd, offset=0, length=0, flags=0, payload=b"", handle=None, magic=REQ_MAGIC):
        if handle is None:
            handle = self.next_handle
            self.next_handle += 1
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + payload)
        return handle

    def reply(self, read_len=0):
        """One complete reply (all chunks up to DONE for structured)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_MAGIC:
            err, handle = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_len) if err == 0 and read_len else b""
            return Reply(handle, err, data)
        if magic != STRUCT_MAGIC:
            raise AssertionError("bad reply magic 0x%x" % magic)
        r = None
        data = None
        while True:
            flags, typ, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            if length > MAX_REPLY:
                raise AssertionError("chunk length %d" % length)
            payload = self.recv_exact(length)
            if r is None:
                r = Reply(handle)
                data = bytearray(read_len)
            r.chunks.append((typ, payload))
            if typ == REPLY_TYPE_OFFSET_DATA:
                off = struct.unpack(">Q", payload[:8])[0]
                r.data_offsets = getattr(r, "data_offsets", []) + [(off, len(payload) - 8)]
                rel = off - getattr(self, "_read_base", 0)
                if 0 <= rel and rel + len(payload) - 8 <= read_len:
                    data[rel:rel + len(payload) - 8] = payload[8:]
            elif typ & (1 << 15):
                r.error = struct.unpack(">I", payload[:4])[0]
            if flags & REPLY_FLAG_DONE:
                break
            magic = struct.unpack(">I", self.recv_exact(4))[0]
            if magic != STRUCT_MAGIC:
                raise AssertionError("bad chunk magic 0x%x" % magic)
        r.data = bytes(data) if r.error == 0 else b""
        return r

    def cmd(self, cmd, offset=0, length=0, flags=0, payload=b""):
        """Send one request and wait for its reply; returns Reply."""
        h = self.request(cmd, offset, length, flags, payload)
        self._read_base = offset
        r = self.reply(length if cmd == CMD_READ else 0)
        if r.handle != h:
            raise AssertionError("reply handle %d for request %d" % (r.handle, h))
        return r

    def read(self, offset, length, flags=0):
        return self.cmd(CMD_READ, offset, length, flags)

    def write(self, offset, data, flags=0):
        return self.cmd(CMD_WRITE, offset, len(data), flags, data)

    def flush(self):
        return self.cmd(CMD_FLUSH)

    def disc(self):
        self.request(CMD_DISC)
        self.close()


def connect_go(path, structured=False, meta=None, timeout=10.0, name=b""):
    c = Conn(path, timeout)
    c.start()
    if structured:
        c.structured_reply()
    if meta:
        c.set_meta(meta, name)
    c.go(name, [INFO_BLOCK_SIZE])
    return c


# --- checks ---
class Checks:
    def __init__(self, reference=False):
        self.reference = reference
        self.fails = 0
        self.count = 0

    def check(self, name, ok, msg="", qsm_only=False):
        self.count += 1
        if ok:
            print("PASS %s" % name, flush=True)
        elif qsm_only and self.reference:
            print("XFAIL %s: %s (qsm-only check; the reference server fails it)" % (name, msg), flush=True)
        else:
            self.fails += 1
            print("FAIL %s: %s" % (name, msg), flush=True)
        return ok


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
        return st not in ("Z", "X")
    except OSError:
        return False


PATTERN = 0x5A            # the image holds 0x5a in [0, PATTERN_LEN)
PATTERN_LEN = 8 << 20


class Hostile:
    """The hostile cases: each runs against a server with -t -e >= 4 whose
    image holds 0x5a in [0, 8 MiB) and zeros elsewhere.  A well-behaved
    connection `good` stays open through all of them and is checked after
    each case, and a fresh one is opened after each case (the server keeps
    serving both).  Writes by the cases that are valid requests write 0x5a
    over [0, 8 MiB) (content unchanged), so the shell can compare the image
    with an untouched copy at the end; invalid writes carry 0xee, which must
    never reach the image."""

    def __init__(self, a):
        self.a = a
        self.path = a.socket
        self.pid = a.pid
        self.ck = Checks(a.reference)
        self.good = connect_go(self.path)
        self.size = self.good.size

    def good_ok(self, case, conn=None):
        c = conn or self.good
        off = (self.ck.count * 4096) % (PATTERN_LEN - 65536)
        r = c.read(off, 65536)
        ok = r.error == 0 and r.data == bytes([PATTERN]) * 65536
        if ok:
            w = c.write(off, bytes([PATTERN]) * 4096)
            ok = w.error == 0
        return ok

    def after(self, case):
        self.ck.check(case + "/server-alive", alive(self.pid), "server pid %d gone" % self.pid)
        try:
            ok = self.good_ok(case)
            self.ck.check(case + "/old-conn-served", ok, "read/write on the connection opened before failed")
        except Exception as e:
            self.ck.check(case + "/old-conn-served", False, "connection opened before: %r" % e)
            self.good = None
            try:
                self.good = connect_go(self.path)
            except Exception:
                pass
        try:
            c = connect_go(self.path)
            ok = self.good_ok(case, c)
            c.close()
            self.ck.check(case + "/new-conn-served", ok, "read/write on a new connection failed")
        except Exception as e:
            self.ck.check(case + "/new-conn-served", False, "new connection: %r" % e)

    # --- handshake ---
    def case_bad_client_flags(self):
        c = Conn(self.path)
        c.greeting()
        c.client_flags(0xFFFFFFFF)       # unknown client flags: must disconnect
        self.ck.check("bad_client_flags", c.wait_closed(5), "server kept a client with unknown flags 0xffffffff")
        c.close()

    def case_garbage_init(self):
        c = Conn(self.path)
        c.send(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(200))
        self.ck.check("garbage_init", c.wait_closed(5), "server kept a client sending garbage")
        c.close()

    def case_bad_opt_magic(self):
        c = Conn(self.path)
        c.start()
        c.opt_send(OPT_GO, struct.pack(">IH", 0, 0), magic=0x4241444D41474943)
        self.ck.check("bad_opt_magic", c.wait_closed(5), "server kept a client with a bad option magic")
        c.close()

    def case_unknown_opt(self):
        c = Conn(self.path)
        c.start()
        for opt, data in ((0x7777, b"hello"), (0x4000, b""), (0xFFFFFFFF, b"x" * 100), (4, b"")):
            rep, _, _ = c.opt_final(opt, data)
            self.ck.check("unknown_opt/0x%x" % opt, rep == REP_ERR_UNSUP, "reply 0x%x, want NBD_REP_ERR_UNSUP" % rep)
        c.go()
        r = c.read(0, 4096)
        self.ck.check("unknown_opt/haggle-continues", r.error == 0 and r.data == bytes([PATTERN]) * 4096,
                      "OPT_GO after unknown options did not give a working export")
        c.close()

    def case_opt_huge(self):
        for opt in (0x7777, OPT_GO, OPT_SET_META_CONTEXT):
            c = Conn(self.path)
            c.start()
            rss0 = rss_kib(self.pid)
            c.opt_send(opt, length=0x40000000)        # 1 GiB of option data announced
            closed = False
            sent = 0
            c.sock.settimeout(2)
            try:
                junk = b"\x00\x00\x00\x01" * 16384     # 64 KiB
                while sent < (16 << 20):
                    c.sock.sendall(junk)
                    sent += len(junk)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            except socket.timeout:
                pass                                   # server stopped reading: fine
            c.sock.settimeout(c.timeout)
            if not closed:
                closed = c.wait_closed(2)
            rss1 = rss_kib(self.pid)
            grow = (rss1 - rss0) // 1024 if rss0 and rss1 else 0
            self.ck.check("opt_huge/0x%x/bounded" % opt, grow < 64,
                          "server RSS grew %d MiB on a 1 GiB option (%d MiB sent)" % (grow, sent >> 20))
            self.ck.check("opt_huge/0x%x/refused" % opt, closed,
                          "server accepted %d MiB of a 1 GiB option without disconnecting" % (sent >> 20),
                          qsm_only=(opt == 0x7777))
            c.close()

    def case_long_export_name(self):
        name = b"n" * 5000
        c = Conn(self.path)
        c.start()
        try:
            c.go(name)
            self.ck.check("long_export_name/go", False, "OPT_GO with a 5000-byte name was acked")
        except OptError as e:
            self.ck.check("long_export_name/go", True, "refused 0x%x" % e.rep)
            c.go()
            r = c.read(0, 512)
            self.ck.check("long_export_name/haggle-continues", r.error == 0, "OPT_GO after the refusal failed")
        except Disconnected:
            self.ck.check("long_export_name/go", True, "disconnected")
        c.close()
        c = Conn(self.path)
        c.start()
        c.opt_send(OPT_EXPORT_NAME, name)
        self.ck.check("long_export_name/export_name", c.wait_closed(5), "OPT_EXPORT_NAME of 5000 bytes kept open")
        c.close()

    def case_unknown_export(self):
        c = Conn(self.path)
        c.start()
        for opt in (OPT_INFO, OPT_GO):
            try:
                c.go(b"no-such-export", opt=opt)
                self.ck.check("unknown_export/%d" % opt, False, "acked")
            except OptError as e:
                self.ck.check("unknown_export/%d" % opt, e.rep == REP_ERR_UNKNOWN,
                              "reply 0x%x, want NBD_REP_ERR_UNKNOWN" % e.rep)
        c.go()
        r = c.read(0, 512)
        self.ck.check("unknown_export/haggle-continues", r.error == 0, "OPT_GO '' afterwards failed")
        c.close()
        c = Conn(self.path)
        c.start()
        c.opt_send(OPT_EXPORT_NAME, b"no-such-export")
        self.ck.check("unknown_export/export_name", c.wait_closed(5), "OPT_EXPORT_NAME of an unknown export kept open")
        c.close()

    def case_request_before_go(self):
        c = Conn(self.path)
        c.start()
        got = b""
        closed = False
        try:
            c.request(CMD_READ, 0, 4096)
            c.request(CMD_WRITE, 0, 4096, payload=b"\xee" * 4096)
        except Disconnected:
            closed = True
        c.sock.settimeout(5)
        try:
            while len(got) < 8192:
                b = c.sock.recv(65536)
                if not b:
                    closed = True
                    break
                got += b
        except (socket.timeout,):
            pass
        except OSError:
            closed = True
        self.ck.check("request_before_go", closed and bytes([PATTERN]) * 64 not in got,
                      "server did not disconnect a client sending requests in option phase (%d bytes back)" % len(got))
        c.close()

    # --- transmission ---
    def case_bad_request_magic(self):
        c = connect_go(self.path)
        c.request(CMD_WRITE, 0, 4096, payload=b"\xee" * 4096, magic=0xDEADBEEF)
        self.ck.check("bad_request_magic", c.wait_closed(5), "server kept a client with a bad request magic")
        c.close()

    def case_unknown_command(self):
        for structured in (False, True):
            tag = "unknown_command/%s" % ("structured" if structured else "simple")
            c = connect_go(self.path, structured)
            for cmd in (0x77, 0xFFFF, 8):
                r = c.cmd(cmd, 0, 4096)
                self.ck.check("%s/%d" % (tag, cmd), r.error == EINVAL, "error %d, want EINVAL" % r.error)
            r = c.read(0, 4096)
            self.ck.check(tag + "/continues", r.error == 0 and r.data == bytes([PATTERN]) * 4096, "read after failed")
            c.close()

    def case_past_end(self):
        c = connect_go(self.path)
        s = self.size
        probes = [
            ("read-straddle", CMD_READ, s - 4096, 8192, 0, b""),
            ("read-beyond", CMD_READ, s, 512, 0, b""),
            ("read-huge-offset", CMD_READ, 1 << 62, 512, 0, b""),
            ("read-wrap", CMD_READ, (1 << 64) - 512, 4096, 0, b""),
            ("write-straddle", CMD_WRITE, s - 4096, 8192, 0, b"\xee" * 8192),
            ("write-beyond", CMD_WRITE, s + 4096, 4096, 0, b"\xee" * 4096),
            ("write-wrap", CMD_WRITE, (1 << 64) - 512, 4096, 0, b"\xee" * 4096),
            ("trim-beyond", CMD_TRIM, s - 4096, 65536, 0, b""),
            ("zeroes-beyond", CMD_WRITE_ZEROES, s - 4096, 65536, 0, b""),
            ("zeroes-wrap", CMD_WRITE_ZEROES, (1 << 64) - 4096, 8192, 0, b""),
        ]
        for name, cmd, off, ln, fl, pl in probes:
            r = c.cmd(cmd, off, ln, fl, pl)
            ok = r.error in (EINVAL, ENOSPC) if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else r.error == EINVAL
            self.ck.check("past_end/" + name, ok, "error %d, want EINVAL" % r.error)
        r = c.read(s - 4096, 4096)
        self.ck.check("past_end/tail-unchanged", r.error == 0 and r.data == bytes(4096), "last 4 KiB changed or unreadable")
        c.close()

    def case_zero_length(self):
        c = connect_go(self.path)
        for name, cmd in (("read", CMD_READ), ("write", CMD_WRITE), ("trim", CMD_TRIM),
                          ("zeroes", CMD_WRITE_ZEROES), ("cache", CMD_CACHE)):
            r = c.cmd(cmd, 4096, 0)
            self.ck.check("zero_length/" + name, r.error in (0, EINVAL), "error %d, want 0 or EINVAL" % r.error)
        r = c.read(0, 4096)
        self.ck.check("zero_length/continues", r.error == 0 and r.data == bytes([PATTERN]) * 4096, "read after failed")
        c.close()

    def case_over_max(self):
        # READ above the 32 MiB maximum payload: EINVAL/EOVERFLOW, or the
        # data (doc/proto.md lets a server accept it); not a disconnect.
        for structured in (False, True):
            tag = "over_max/read-%s" % ("structured" if structured else "simple")
            c = connect_go(self.path, structured)
            try:
                r = c.read(0, 48 << 20)
                want = bytes([PATTERN]) * PATTERN_LEN + bytes((48 << 20) - PATTERN_LEN)
                self.ck.check(tag, r.error in (EINVAL, EOVERFLOW) or (r.error == 0 and r.data == want),
                              "error %d, want EINVAL/EOVERFLOW or the data" % r.error)
                r = c.read(0, 4096)
                self.ck.check(tag + "/continues", r.error == 0, "read after failed")
            except Disconnected as e:
                self.ck.check(tag, False, "disconnected: %s" % e)
            c.close()
        # WRITE above the maximum: EINVAL (payload skipped) or a disconnect;
        # the data must never be written.
        c = connect_go(self.path)
        ln = 48 << 20
        c.request(CMD_WRITE, 0, ln)
        sent = 0
        closed = False
        c.sock.settimeout(3)
        try:
            chunk = b"\xee" * (1 << 20)
            while sent < ln:
                c.sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        except socket.timeout:
            pass
        c.sock.settimeout(c.timeout)
        ok = closed
        msg = "disconnected after %d MiB" % (sent >> 20)
        if not closed:
            try:
                r = c.reply()
                ok = r.error in (EINVAL, EOVERFLOW)
                msg = "error %d" % r.error
            except (Disconnected, socket.timeout) as e:
                ok, msg = isinstance(e, Disconnected), repr(e)
        self.ck.check("over_max/write", ok, msg)
        c.close()

    def case_short_write(self):
        c = connect_go(self.path)
        c.request(CMD_WRITE, 1 << 20, 65536, payload=b"\xee" * 1000)
        c.close()
        time.sleep(0.3)
        c = connect_go(self.path)
        r = c.read(1 << 20, 65536)
        self.ck.check("short_write", r.error == 0 and r.data == bytes([PATTERN]) * 65536,
                      "a write whose payload never came changed the image")
        c.close()

    def case_flags(self):
        c = connect_go(self.path)
        for name, cmd, fl in (("read-DF-unnegotiated", CMD_READ, CMD_FLAG_DF),
                              ("read-unknown-flag", CMD_READ, 0x4000),
                              ("write-unknown-flag", CMD_WRITE, 0x8000)):
            pl = bytes([PATTERN]) * 4096 if cmd == CMD_WRITE else b""
            r = c.cmd(cmd, 0, 4096, fl, pl)
            self.ck.check("flags/" + name, r.error == EINVAL, "error %d, want EINVAL" % r.error)
        r = c.read(0, 4096)
        self.ck.check("flags/continues", r.error == 0 and r.data == bytes([PATTERN]) * 4096, "read after failed")
        c.close()

    def case_block_status_no_meta(self):
        for structured in (False, True):
            tag = "block_status_no_meta/%s" % ("structured" if structured else "simple")
            c = connect_go(self.path, structured)
            r = c.cmd(CMD_BLOCK_STATUS, 0, 65536)
            self.ck.check(tag, r.error == EINVAL, "error %d, want EINVAL" % r.error)
            r = c.read(0, 4096)
            self.ck.check(tag + "/continues", r.error == 0, "read after failed")
            c.close()

    def case_opt_bad_lengths(self):
        # Options whose own fields lie about their length: NBD_REP_ERR_INVALID
        # (doc/proto.md), and the haggle goes on.
        c = Conn(self.path)
        c.start()
        probes = [
            ("go-namelen", OPT_GO, struct.pack(">I", 1000) + b"abc" + struct.pack(">H", 0)),
            ("go-numinfo", OPT_GO, struct.pack(">IH", 0, 5) + struct.pack(">H", 3)),
            ("go-truncated", OPT_GO, b"\x00\x00"),
            ("info-numinfo", OPT_INFO, struct.pack(">IH", 0, 0x7FFF)),
            ("list-with-data", OPT_LIST, b"junk"),
            ("structured-with-data", OPT_STRUCTURED_REPLY, b"x"),
            ("meta-before-structured", OPT_SET_META_CONTEXT,
             struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"),
        ]
        for name, opt, data in probes:
            rep, _, _ = c.opt_final(opt, data)
            self.ck.check("opt_bad_lengths/" + name, rep == REP_ERR_INVALID, "reply 0x%x, want NBD_REP_ERR_INVALID" % rep)
        c.structured_reply()
        for name, data in (("meta-count", struct.pack(">II", 0, 5) + struct.pack(">I", 15) + b"base:allocation"),
                           ("meta-querylen", struct.pack(">II", 0, 1) + struct.pack(">I", 0x10000) + b"base:allocation"),
                           ("meta-namelen", struct.pack(">II", 0x7FFFFFFF, 0))):
            rep, _, _ = c.opt_final(OPT_SET_META_CONTEXT, data)
            self.ck.check("opt_bad_lengths/" + name, rep == REP_ERR_INVALID, "reply 0x%x, want NBD_REP_ERR_INVALID" % rep)
        rep, _, _ = c.opt_final(OPT_STRUCTURED_REPLY)
        self.ck.check("opt_bad_lengths/structured-twice", rep & REP_ERR != 0, "second OPT_STRUCTURED_REPLY reply 0x%x" % rep)
        c.go()
        r = c.read(0, 4096)
        self.ck.check("opt_bad_lengths/haggle-continues", r.error == 0 and r.data == bytes([PATTERN]) * 4096, "read failed")
        c.close()

    def case_pipelined(self):
        # Many requests in flight on one connection, answered in any order:
        # every handle exactly once, every read with the right bytes.
        for structured in (False, True):
            tag = "pipelined/%s" % ("structured" if structured else "simple")
            c = connect_go(self.path, structured)
            want = {}
            stream = bytearray()
            for i in range(300):
                h = 1000 + i
                kind = i % 5
                if kind in (0, 1, 2):
                    off = (i * 77 * 4096) % (self.size - 131072)
                    ln = (4096, 65536, 131072)[kind]
                    want[h] = ("read", off, ln)
                    stream += struct.pack(">IHHQQI", REQ_MAGIC, CMD_FLAG_DF if structured and kind == 1 else 0,
                                          CMD_READ, h, off, ln)
                elif kind == 3:
                    off = (i * 13 * 4096) % (PATTERN_LEN - 8192)
                    want[h] = ("write", off, 8192)
                    stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, h, off, 8192) + bytes([PATTERN]) * 8192
                else:
                    want[h] = ("flush", 0, 0)
                    stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_FLUSH, h, 0, 0)
            done = [False]

            def sender():
                try:
                    c.sock.sendall(stream)
                except OSError:
                    pass
                done[0] = True
            t = threading.Thread(target=sender)
            t.start()
            seen = {}
            bad = []
            try:
                while len(seen) < len(want):
                    # the reply's length is known only from its handle
                    magic = c.recv_exact(4)
                    m = struct.unpack(">I", magic)[0]
                    if m == SIMPLE_MAGIC:
                        err, h = struct.unpack(">IQ", c.recv_exact(12))
                        kind, off, ln = want.get(h, ("?", 0, 0))
                        data = c.recv_exact(ln) if kind == "read" and err == 0 else b""
                        chunks = None
                    else:
                        # structured: read chunks of this handle until DONE
                        chunks = []
                        hdr = c.recv_exact(16)
                        while True:
                            fl, typ, h, ln2 = struct.unpack(">HHQI", hdr)
                            chunks.append((typ, c.recv_exact(ln2)))
                            if fl & REPLY_FLAG_DONE:
                                break
                            if struct.unpack(">I", c.recv_exact(4))[0] != STRUCT_MAGIC:
                                raise AssertionError("bad chunk magic")
                            hdr = c.recv_exact(16)
                        kind, off, ln = want.get(h, ("?", 0, 0))
                        err = 0
                        buf = bytearray(ln)
                        for typ, pl in chunks:
                            if typ == REPLY_TYPE_OFFSET_DATA:
                                o = struct.unpack(">Q", pl[:8])[0] - off
                                buf[o:o + len(pl) - 8] = pl[8:]
                            elif typ & (1 << 15):
                                err = struct.unpack(">I", pl[:4])[0]
                        data = bytes(buf)
                        if kind == "read" and (h - 1000) % 5 == 1:     # sent with DF
                            n = sum(1 for typ, _ in chunks if typ in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE))
                            if n > 1:
                                bad.append("DF read %d came in %d chunks" % (h, n))
                    if h not in want:
                        bad.append("reply for unknown handle %d" % h)
                        continue
                    if h in seen:
                        bad.append("two replies for handle %d" % h)
                    seen[h] = True
                    if err:
                        bad.append("%s handle %d: error %d" % (kind, h, err))
                    elif kind == "read":
                        exp = bytes([PATTERN]) * max(0, min(off + ln, PATTERN_LEN) - off)
                        exp += bytes(ln - len(exp))
                        if data != exp:
                            bad.append("read %d at %d: wrong data" % (h, off))
            except Exception as e:
                bad.append("after %d replies: %r" % (len(seen), e))
            t.join(10)
            self.ck.check(tag, not bad and len(seen) == len(want), "; ".join(bad[:5]) or "%d of %d replies" % (len(seen), len(want)))
            c.close()

    def case_disc_in_flight(self):
        # NBD_CMD_DISC behind requests in flight: they are answered, then
        # the server closes the connection.
        c = connect_go(self.path)
        hs = list(range(1, 33))
        stream = bytearray()
        for i in range(16):
            stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 2 * i + 1, i * 65536, 65536)
            stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 2 * i + 2, i * 65536, 65536)
            stream += bytes([PATTERN]) * 65536
        stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_DISC, 99, 0, 0)
        t = threading.Thread(target=lambda: c.sock.sendall(stream))
        t.start()
        got = 0
        try:
            for _ in hs:
                m = struct.unpack(">I", c.recv_exact(4))[0]
                err, h = struct.unpack(">IQ", c.recv_exact(12))
                if h % 2 == 1 and err == 0:
                    c.recv_exact(65536)
                got += 1 if err == 0 else 0
        except Exception:
            pass
        closed = c.wait_closed(5)
        t.join(10)
        # qsm-only: qemu-nbd 7.2 shuts the socket down on DISC at once, so
        # under load a reply of a request still in flight can be lost;
        # doc/proto.md: the server "MUST handle all outstanding requests".
        self.ck.check("disc_in_flight/replies", got == len(hs), "%d of %d requests before DISC answered" % (got, len(hs)),
                      qsm_only=True)
        self.ck.check("disc_in_flight/closed", closed, "server did not close after NBD_CMD_DISC")
        c.close()

    def case_vanish_in_flight(self):
        # Requests sent without reading a reply, as many as the server takes
        # within 2 s, then the client is gone (close: FIN; SO_LINGER 0: RST).
        for rnd in range(3):
            c = connect_go(self.path, structured=(rnd == 1))
            data = bytes([PATTERN]) * (256 << 10)
            stream = bytearray()
            for i in range(32):
                stream += struct.pack(">IHHQQI", REQ_MAGIC, CMD_FLAG_FUA if i % 4 == 0 else 0, CMD_WRITE, 100 + i,
                                      (i * (256 << 10)) % PATTERN_LEN, len(data)) + data
                stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 200 + i,
                                      (i * (1 << 20)) % (self.size - (1 << 20)), 1 << 20)
                if i % 8 == 0:
                    stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_FLUSH, 300 + i, 0, 0)
            stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE_ZEROES, 400, PATTERN_LEN + (4 << 20), 1 << 20)
            stream += struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_TRIM, 401, PATTERN_LEN + (8 << 20), 1 << 20)
            c.sock.setblocking(False)
            sent, t0 = 0, time.monotonic()
            while sent < len(stream) and time.monotonic() - t0 < 2:
                try:
                    sent += c.sock.send(stream[sent:sent + (1 << 20)])
                except BlockingIOError:
                    time.sleep(0.02)
                except OSError:
                    break
            if rnd == 2:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            c.close()
            print("INFO vanish_in_flight round %d: %d of %d bytes of requests sent" % (rnd, sent, len(stream)), flush=True)
        time.sleep(1)
        self.ck.check("vanish_in_flight", alive(self.pid), "server died")

    def case_no_read_flood(self):
        c = connect_go(self.path)
        time.sleep(0.2)
        rss0 = rss_kib(self.pid)
        c.sock.setblocking(False)
        req = struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 7, 0, 1 << 20)
        buf = req * 1000
        sent = 0
        stuck_since = None
        t0 = time.monotonic()
        while sent < 20000 * len(req) and time.monotonic() - t0 < 20:
            try:
                n = c.sock.send(buf)
                sent += n
                stuck_since = None
            except BlockingIOError:
                if stuck_since is None:
                    stuck_since = time.monotonic()
                elif time.monotonic() - stuck_since > 2:
                    break
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                break
        nreq = sent // len(req)
        time.sleep(0.5)
        rss1 = rss_kib(self.pid)
        grow = (rss1 - rss0) // 1024 if rss0 and rss1 else -1
        self.ck.check("no_read_flood/bounded", 0 <= grow < 64,
                      "RSS %s -> %s KiB (+%d MiB) with %d 1 MiB reads unread" % (rss0, rss1, grow, nreq))
        # others are served while this client is stuck
        try:
            self.ck.check("no_read_flood/others-served", self.good_ok("flood"), "the other connection failed")
        except Exception as e:
            self.ck.check("no_read_flood/others-served", False, repr(e))
        # now read the replies: the ones sent are correct (simple replies)
        c.sock.setblocking(True)
        c.sock.settimeout(10)
        good = 0
        try:
            for _ in range(min(nreq, 64)):
                r = c.reply(1 << 20)
                if r.error == 0 and r.data[:PATTERN_LEN] == bytes([PATTERN]) * (1 << 20):
                    good += 1
        except Exception:
            pass
        self.ck.check("no_read_flood/replies", good == min(nreq, 64), "%d of %d replies correct" % (good, min(nreq, 64)))
        c.close()
        print("INFO no_read_flood: %d requests queued, RSS %s -> %s KiB" % (nreq, rss0, rss1), flush=True)

    def case_slowloris(self):
        # A valid but byte-at-a-time client finishing within a few seconds
        # is served; the other connection is served meanwhile.
        c = Conn(self.path)
        hs = c.recv_exact(18)
        msg = struct.pack(">I", CFLAG_FIXED_NEWSTYLE | (struct.unpack(">H", hs[16:])[0] & FLAG_NO_ZEROES))
        c.hflags = struct.unpack(">H", hs[16:])[0]
        c.cflags = struct.unpack(">I", msg)[0]
        msg += struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + struct.pack(">IH", 0, 0)
        served = True
        for i, b in enumerate(msg):
            c.send(bytes([b]))
            time.sleep(0.1)
            if i == len(msg) // 2:
                served = self.good_ok("slowloris")
        self.ck.check("slowloris/others-served", served, "other connection not served during the drip")
        while True:
            o, rep, p = c.opt_reply()
            if rep == REP_ACK or rep & REP_ERR:
                break
        self.ck.check("slowloris/go", rep == REP_ACK, "reply 0x%x" % rep)
        r = c.read(0, 4096)
        self.ck.check("slowloris/read", r.error == 0 and r.data == bytes([PATTERN]) * 4096, "read failed")
        c.close()

    def case_handshake_timeout(self):
        # Three handshakes that never complete: silent after the greeting,
        # silent mid-option, and a drip of one byte a second.  The limit is
        # 10 s (qsm; qemu-nbd 7.2 with the CVE-2024-7409 fix has the same).
        results = {}

        def idle(kind):
            c = Conn(self.path, timeout=30)
            t0 = time.monotonic()
            c.start()
            if kind == "mid-option":
                c.send(struct.pack(">QI", IHAVEOPT, OPT_GO))
            if kind == "drip":
                closed = False
                for b in struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"x" * 100:
                    try:
                        c.send(bytes([b]))
                    except Disconnected:
                        closed = True
                        break
                    if c.wait_closed(1.0):
                        closed = True
                        break
                    if time.monotonic() - t0 > 16:
                        break
            else:
                closed = c.wait_closed(16)
            results[kind] = (closed, time.monotonic() - t0)
            c.close()

        ths = [threading.Thread(target=idle, args=(k,)) for k in ("after-greeting", "mid-option", "drip")]
        for t in ths:
            t.start()
        time.sleep(1)
        try:
            served = self.good_ok("handshake_timeout")
        except Exception:
            served = False
        self.ck.check("handshake_timeout/others-served", served, "other connection not served")
        for t in ths:
            t.join()
        for kind, (closed, dt) in sorted(results.items()):
            self.ck.check("handshake_timeout/" + kind, closed and dt < 14,
                          "closed=%s after %.1f s (want closed within 10 s + slack)" % (closed, dt))
            print("INFO handshake_timeout/%s: closed=%s after %.1f s" % (kind, closed, dt), flush=True)

    def case_conn_flood(self):
        shared = self.a.shared
        # `good` holds one slot; fill the rest with negotiated connections.
        held = [connect_go(self.path) for _ in range(shared - 1)]
        extra = []
        greeted = 0
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(self.path)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                s.close()
                continue
            extra.append(s)
        time.sleep(1.5)
        for s in extra:
            try:
                if s.recv(18):
                    greeted += 1
            except (BlockingIOError, OSError):
                pass
        self.ck.check("conn_flood/limit", greeted == 0,
                      "%d connections beyond -e %d got a greeting" % (greeted, shared))
        # a slot frees: a waiting connection is served (qemu-nbd accepts
        # again below -e; the kernel's backlog held the others)
        held.pop().close()
        t0 = time.monotonic()
        late = 0
        while time.monotonic() - t0 < 5 and not late:
            for s in extra:
                try:
                    if s.recv(18):
                        late += 1
                except (BlockingIOError, OSError):
                    pass
            time.sleep(0.1)
        self.ck.check("conn_flood/queued-served", late == 1,
                      "%d waiting connections greeted after one of %d left (want 1)" % (late, shared))
        for c in held:
            c.close()
        for s in extra:
            s.close()
        # many short connections in a row
        for i in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(self.path)
                if i % 2:
                    s.recv(18)
            except OSError:
                pass
            s.close()
        time.sleep(0.5)
        c = connect_go(self.path)
        self.ck.check("conn_flood/after", self.good_ok("conn_flood", c), "a connection after the flood failed")
        c.close()

    def run(self, only=None):
        cases = [m for m in dir(self) if m.startswith("case_")]
        order = ["bad_client_flags", "garbage_init", "bad_opt_magic", "unknown_opt", "opt_huge",
                 "long_export_name", "unknown_export", "request_before_go", "bad_request_magic",
                 "unknown_command", "past_end", "zero_length", "over_max", "short_write", "flags",
                 "block_status_no_meta", "opt_bad_lengths", "pipelined", "disc_in_flight", "vanish_in_flight", "no_read_flood", "slowloris",
                 "handshake_timeout", "conn_flood"]
        assert sorted(order) == sorted(c[5:] for c in cases)
        for name in order:
            if only and name not in only:
                continue
            t0 = time.monotonic()
            try:
                getattr(self, "case_" + name)()
            except Exception as e:
                self.ck.check(name, False, "unexpected: %r" % e)
            if self.good is None:
                try:
                    self.good = connect_go(self.path)
                except Exception:
                    pass
            self.after(name)
            print("INFO case %s took %.1f s" % (name, time.monotonic() - t0), flush=True)
            if not alive(self.pid):
                break
        print("INFO %d checks, %d failed" % (self.ck.count, self.ck.fails), flush=True)
        return self.ck.fails


# --- helpers for the shell tests ---
def cmd_info(a):
    c = connect_go(a.socket, structured=a.structured)
    names = [k for k, v in TF.items() if c.tflags & v]
    print(json.dumps({"size": c.size, "tflags": c.tflags, "flags": names}))
    c.close()


def cmd_write(a):
    c = connect_go(a.socket)
    r = c.write(a.offset, bytes([a.pattern]) * a.length, CMD_FLAG_FUA if a.fua else 0)
    c.close()
    sys.exit(0 if r.error == 0 else 1)


def cmd_durable(a):
    """Two connections at once: A writes fresh clusters (no FUA), B (a
    different connection) flushes, then the server is SIGKILLed while both
    are still open: with CAN_MULTI_CONN, B's flush made A's writes durable."""
    ck = Checks(a.reference)
    ca = connect_go(a.socket)
    cb = connect_go(a.socket)
    ck.check("durable/multi-conn-flag", bool(ca.tflags & TF["CAN_MULTI_CONN"]),
             "CAN_MULTI_CONN not advertised (tflags 0x%x)" % ca.tflags)
    ck.check("durable/flush-flag", bool(ca.tflags & TF["SEND_FLUSH"]), "SEND_FLUSH not advertised")
    for i in range(a.count):
        r = ca.write(a.offset + i * a.length, bytes([a.pattern]) * a.length)
        if r.error:
            ck.check("durable/write", False, "write %d: error %d" % (i, r.error))
            break
    r = cb.flush()
    ck.check("durable/flush", r.error == 0, "flush error %d" % r.error)
    os.kill(a.kill_pid, signal.SIGKILL)
    time.sleep(0.5)
    ca.close()
    cb.close()
    sys.exit(1 if ck.fails else 0)


def cmd_hold_write(a):
    """Connect, start a write and send half its payload, then print READY
    and wait to be killed."""
    c = connect_go(a.socket)
    c.request(CMD_WRITE, a.offset, a.length, payload=b"\xee" * (a.length // 2))
    print("READY", flush=True)
    time.sleep(3600)


def cmd_hold_unread(a):
    """Connect, write a.length bytes of a.pattern at a.offset (acknowledged),
    then send 1 MiB reads without ever reading a reply until the server
    stops taking them; print "READY n" (the reads sent) and wait to be
    killed, the socket open (test_nbd_multi.sh's drain case)."""
    c = connect_go(a.socket)
    r = c.write(a.offset, bytes([a.pattern]) * a.length)
    if r.error:
        print("write failed: error %d" % r.error, flush=True)
        sys.exit(1)
    c.sock.setblocking(False)
    req = struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, 7, 0, 1 << 20)
    sent, stuck = 0, None
    while True:
        try:
            sent += c.sock.send(req * 64)
            stuck = None
        except BlockingIOError:
            stuck = stuck or time.monotonic()
            if time.monotonic() - stuck > 1:
                break
            time.sleep(0.05)
    print("READY %d" % (sent // len(req)), flush=True)
    time.sleep(3600)


def cmd_tls(a):
    """TLS required: options in the clear get NBD_REP_ERR_TLS_REQD, no data
    can be read without TLS; after STARTTLS (Python's ssl, a client
    certificate from a.certs) the export works; a certificate from another
    CA (a.badcerts) is refused."""
    ck = Checks(a.reference)
    c = Conn(a.socket)
    c.start()
    for name, opt, data in (("list", OPT_LIST, b""),
                            ("go", OPT_GO, struct.pack(">IH", 0, 0)),
                            ("info", OPT_INFO, struct.pack(">IH", 0, 0)),
                            ("structured", OPT_STRUCTURED_REPLY, b""),
                            ("unknown", 0x7777, b"abc")):
        rep, _, _ = c.opt_final(opt, data)
        ck.check("tls/clear-%s" % name, rep == REP_ERR_TLS_REQD, "reply 0x%x, want NBD_REP_ERR_TLS_REQD" % rep)
    c.opt_send(OPT_EXPORT_NAME, b"")
    ck.check("tls/clear-export-name", c.wait_closed(5), "OPT_EXPORT_NAME in the clear was not refused by a disconnect")
    c.close()
    c = Conn(a.socket)
    c.start()
    c.request(CMD_READ, 0, 4096)
    closed = c.wait_closed(5)
    ck.check("tls/clear-read", closed, "a READ in the clear did not get a disconnect")
    c.close()

    def tls_conn(certdir):
        c = Conn(a.socket)
        c.start()
        rep, _, _ = c.opt_final(OPT_STARTTLS)
        if rep != REP_ACK:
            raise OptError(OPT_STARTTLS, rep)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(os.path.join(a.certs, "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(certdir, "client-cert.pem"), os.path.join(certdir, "client-key.pem"))
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        return c

    try:
        c = tls_conn(a.certs)
        rep, _, _ = c.opt_final(OPT_STARTTLS)
        ck.check("tls/starttls-twice", rep & REP_ERR != 0 and rep != REP_ACK, "second STARTTLS reply 0x%x" % rep)
        c.structured_reply()
        c.go(b"", [INFO_BLOCK_SIZE])
        r = c.read(0, 65536)
        ck.check("tls/read", r.error == 0 and r.data == bytes([a.pattern]) * 65536, "read over TLS: error %d" % r.error)
        r = c.write(65536, bytes([a.pattern]) * 65536, CMD_FLAG_FUA)
        ck.check("tls/write", r.error == 0, "write over TLS: error %d" % r.error)
        c.close()
    except Exception as e:
        ck.check("tls/read", False, "TLS session: %r" % e)
    # garbage where the TLS ClientHello belongs, and a TLS handshake that
    # never starts (the handshake limit covers it too)
    c = Conn(a.socket)
    c.start()
    rep, _, _ = c.opt_final(OPT_STARTTLS)
    c.send(b"\x16\x03\x01\xff\xff" + os.urandom(300))
    ck.check("tls/garbage-hello", rep == REP_ACK and c.wait_closed(5), "STARTTLS reply 0x%x; garbage hello not closed" % rep)
    c.close()
    c = Conn(a.socket, timeout=30)
    c.start()
    t0 = time.monotonic()
    rep, _, _ = c.opt_final(OPT_STARTTLS)
    closed = c.wait_closed(16)
    ck.check("tls/stalled-handshake", closed and time.monotonic() - t0 < 14,
             "closed=%s after %.1f s (want within 10 s + slack)" % (closed, time.monotonic() - t0))
    c.close()
    try:
        c = tls_conn(a.badcerts)
        c.go()
        r = c.read(0, 4096)
        ck.check("tls/wrong-ca", False, "a client certificate from another CA was accepted")
    except (ssl.SSLError, Disconnected, OSError, OptError, AssertionError) as e:
        ck.check("tls/wrong-ca", True, "refused: %s" % type(e).__name__)
    sys.exit(1 if ck.fails else 0)


def cmd_starttls_unconfigured(a):
    """A server without TLS: OPT_STARTTLS gets an error reply (qemu-nbd:
    NBD_REP_ERR_POLICY), then OPT_GO in the clear works."""
    ck = Checks(a.reference)
    c = Conn(a.socket)
    c.start()
    rep, _, _ = c.opt_final(OPT_STARTTLS)
    ck.check("starttls-unconfigured/refused", rep & REP_ERR != 0, "reply 0x%x" % rep)
    c.go()
    r = c.read(0, 4096)
    ck.check("starttls-unconfigured/continues", r.error == 0, "read error %d" % r.error)
    c.close()
    sys.exit(1 if ck.fails else 0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--socket", required=True)
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--kill-pid", type=int, default=0)
    p.add_argument("--shared", type=int, default=4)
    p.add_argument("--reference", action="store_true", help="the server is the reference qemu-nbd")
    p.add_argument("--only", nargs="*")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--pattern", type=lambda s: int(s, 0), default=PATTERN)
    p.add_argument("--fua", action="store_true")
    p.add_argument("--structured", action="store_true")
    p.add_argument("--certs")
    p.add_argument("--badcerts")
    a = p.parse_args()
    if a.cmd == "hostile":
        sys.exit(1 if Hostile(a).run(a.only) else 0)
    {"info": cmd_info, "write": cmd_write, "durable": cmd_durable,
     "hold-write": cmd_hold_write, "hold-unread": cmd_hold_unread, "tls": cmd_tls,
     "starttls-unconfigured": cmd_starttls_unconfigured}[a.cmd](a)


if __name__ == "__main__":
    main()
