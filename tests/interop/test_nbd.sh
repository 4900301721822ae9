#!/bin/bash
# tests/interop/test_nbd.sh: `qsm nbd` against real NBD clients.
#
#  - qemu-io over nbd+unix:// and --image-opts driver=nbd: the same random
#    workload (gen_workload.py) over NBD on one image and by qemu-io on a
#    local copy gives images qemu-img compare calls identical, and a clean
#    qemu-img check;
#  - qemu-img info/map/compare/convert over NBD; block status over NBD
#    (qemu-img map of the export, nbdinfo --map) equals qemu-img map of the
#    image; nbdinfo --list/--json, --map=qemu:allocation-depth with -A on a
#    backing chain; nbdcopy out of the export;
#  - structured reads of holes carry no data bytes (the server's byte
#    counter: reading 64 MiB of an empty image sends far less);
#  - -r refuses writes with EPERM; -e 2 serves two clients at once, and a
#    flush on one makes the other's writes durable (CAN_MULTI_CONN).
# Servers are started by PID and stopped by PID (SIGTERM: clean exit 0).
. "$(dirname "$0")/lib.sh"
interop_init
for t in nbdinfo nbdcopy; do
    command -v $t >/dev/null || skip "$t not found (tests/run installs libnbd-bin)"
done

SRV_PID=
# serve SOCK ARGS...: start qsm nbd in the background, wait for its socket.
serve() {
    local sock=$1; shift
    rm -f "$sock"
    "$QSM" nbd -k "$sock" "$@" 2>"$WORK/srv.err" &
    SRV_PID=$!
    for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
    fail "qsm nbd $* did not listen"; show_tail "$WORK/srv.err"; return 1
}
# stop: SIGTERM the server started last, expect exit 0.
stop() {
    [ -n "$SRV_PID" ] || return 0
    kill -TERM "$SRV_PID" 2>/dev/null
    wait "$SRV_PID"; local rc=$?
    CHECKS=$((CHECKS + 1))
    [ $rc = 0 ] || { fail "qsm nbd exited $rc after SIGTERM"; show_tail "$WORK/srv.err"; }
    SRV_PID=
}
trap 'stop; interop_cleanup' EXIT
S=$WORK/s.sock
U="nbd+unix:///?socket=$S"
N=$(scaled 400)

# 1. The workload over NBD vs qemu-io locally.
for cl in 64k 4k; do
    log "workload, cluster $cl, $N commands"
    qemu_create "$WORK/n.qcow2" "cluster_size=$cl" 256M
    cp "$WORK/n.qcow2" "$WORK/l.qcow2"
    python3 "$GEN" $((BASE_SEED + 1)) "$N" 256M "$cl" >"$WORK/cmds" || die gen_workload
    # --discard=unmap: the model reads discarded ranges as zeros (qemu-nbd's
    # default, ignore, makes TRIM a no-op).
    serve "$S" -t --discard=unmap -f qcow2 "$WORK/n.qcow2" || continue
    CHECKS=$((CHECKS + 1))
    timeout "$TIMEOUT" qemu-io --image-opts "driver=nbd,server.type=unix,server.path=$S" \
        <"$WORK/cmds" >"$WORK/nbd.out" 2>&1 \
        || { fail "qemu-io over NBD failed (cluster $cl)"; show_tail "$WORK/nbd.out"; }
    # Block status over NBD (while serving) against the image's own map.
    CHECKS=$((CHECKS + 1))
    qemu-img map --output=json -f raw "$U" >"$WORK/map.nbd" 2>&1 || fail "qemu-img map over NBD"
    CHECKS=$((CHECKS + 1))
    timeout 60 nbdinfo --map "$U" >"$WORK/map.nbdinfo" 2>&1 || fail "nbdinfo --map"
    stop
    timeout "$TIMEOUT" qemu-io -f qcow2 "$WORK/l.qcow2" <"$WORK/cmds" >"$WORK/l.out" 2>&1 || fail "local qemu-io"
    compare_images "cluster $cl: NBD vs local" "$WORK/n.qcow2" "$WORK/l.qcow2"
    check_clean "cluster $cl: image written over NBD" "$WORK/n.qcow2"
    qemu-img map --output=json -f qcow2 "$WORK/n.qcow2" >"$WORK/map.img"
    CHECKS=$((CHECKS + 1))
    python3 - "$WORK/map.img" "$WORK/map.nbd" "$WORK/map.nbdinfo" <<'PY' || fail "cluster $cl: block status over NBD differs from qemu-img map"
import json, sys
def runs(entries):
    out = []
    for s, l, d, z in entries:
        if out and out[-1][2:] == [d, z] and out[-1][0] + out[-1][1] == s:
            out[-1][1] += l
        else:
            out.append([s, l, d, z])
    return out
img = runs((e["start"], e["length"], e["data"], e["zero"]) for e in json.load(open(sys.argv[1])))
nbd = runs((e["start"], e["length"], e["data"], e["zero"]) for e in json.load(open(sys.argv[2])))
ni = []
for line in open(sys.argv[3]):
    f = line.split()
    typ = int(f[2])
    ni.append((int(f[0]), int(f[1]), not typ & 1, bool(typ & 2)))
ni = runs(ni)
if img != nbd or img != ni:
    print("image:", img[:10]); print("nbd:", nbd[:10]); print("nbdinfo:", ni[:10]); sys.exit(1)
PY
done

# 2. Tools over NBD: info, compare, convert, nbdcopy, --list, --json.
log "qemu-img and libnbd tools"
qemu_create "$WORK/t.qcow2" "cluster_size=64k" 64M
qemu-io -f qcow2 -c 'write -P 3 0 1M' -c 'write -P 4 5M 64k' -c 'write -z 8M 1M' "$WORK/t.qcow2" >/dev/null
serve "$S" -t -x exp -D "qsm test export" -f qcow2 "$WORK/t.qcow2"
UX="nbd+unix:///exp?socket=$S"
CHECKS=$((CHECKS + 1))
out=$(qemu-img info -f raw "$UX" 2>&1)
case $out in *"virtual size: 64 MiB (67108864 bytes)"*) ;; *) fail "qemu-img info over NBD: $out";; esac
CHECKS=$((CHECKS + 1))
qemu-img compare -f raw -F qcow2 "$UX" "$WORK/t.qcow2" >/dev/null || fail "qemu-img compare NBD vs image"
CHECKS=$((CHECKS + 1))
qemu-img convert -f raw -O qcow2 "$UX" "$WORK/conv.qcow2" && qemu-img compare -f qcow2 -F qcow2 "$WORK/conv.qcow2" "$WORK/t.qcow2" >/dev/null \
    || fail "qemu-img convert out of NBD"
CHECKS=$((CHECKS + 1))
nbdcopy "$UX" "$WORK/copy.raw" && qemu-img compare -f raw -F qcow2 "$WORK/copy.raw" "$WORK/t.qcow2" >/dev/null \
    || fail "nbdcopy out of NBD"
CHECKS=$((CHECKS + 1))
out=$(nbdinfo --list "nbd+unix:///?socket=$S" 2>&1)
case $out in *'export="exp":'*"description: qsm test export"*"export-size: 67108864"*) ;; *) fail "nbdinfo --list: $out";; esac
CHECKS=$((CHECKS + 1))
nbdinfo --json "$UX" >"$WORK/info.json" 2>&1 && python3 - "$WORK/info.json" <<'PY' || fail "nbdinfo --json: $(cat "$WORK/info.json")"
import json, sys
j = json.load(open(sys.argv[1]))
e = j["exports"][0]
assert j["protocol"] == "newstyle-fixed" and j["structured"], j
assert e["export-name"] == "exp" and e["export-size"] == 64 << 20, e
for k in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache"):
    assert e[k], k
assert not e["is_read_only"] and not e["can_multi_conn"], e   # -e 1, as qemu-nbd
assert e["block_size_maximum"] == 32 << 20 and e["contexts"] == ["base:allocation"], e
PY
CHECKS=$((CHECKS + 1))
out=$(nbdinfo --size "nbd+unix:///nope?socket=$S" 2>&1) && fail "unknown export name accepted: $out"
# 3. Structured reads of holes send no data: read the whole (mostly
# empty) export and count the bytes that went out.
stop
qemu_create "$WORK/e.qcow2" "cluster_size=64k" 256M
serve "$S" -t -f qcow2 "$WORK/e.qcow2"
CHECKS=$((CHECKS + 1))
# strace-free byte count: the socket's bytes as the client sees them.
python3 - "$S" <<'PY' || fail "structured read of a hole sent data bytes"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
def rd(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b)); assert c; b += c
    return b
g = rd(18); assert g[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 3))
def opt(o, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)
def rep():
    m, o, t, l = struct.unpack(">QIII", rd(20)); return t, rd(l)
opt(8); assert rep()[0] == 1
opt(7, struct.pack(">I", 0) + struct.pack(">H", 0))
while True:
    t, d = rep()
    if t == 1: break
    assert t == 3, t
total = 0
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 32 << 20))
while True:
    m, fl, ty, h, l = struct.unpack(">IHHQI", rd(20))
    rd(l); total += 20 + l
    assert ty in (1, 2), ty
    if fl & 1: break
print("bytes for a 32 MiB read of a hole:", total)
sys.exit(0 if total < 4096 else 1)
PY

# 4. -r: writes refused with EPERM, reads work.
stop
serve "$S" -r -t -f qcow2 "$WORK/t.qcow2"
CHECKS=$((CHECKS + 1))
out=$(qemu-io -r -f raw -c 'read -P 3 0 64k' "$U" 2>&1)
case $out in "read 65536/65536"*) ;; *) fail "read over -r export: $out";; esac
CHECKS=$((CHECKS + 1))
out=$(python3 - "$S" <<'PY' 2>&1
import socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
def rd(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b)); assert c; b += c
    return b
rd(18); s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))
size, flags = struct.unpack(">QH", rd(10))
assert flags & 2, "READ_ONLY flag missing"
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 512) + b"x" * 512)
m, err, h = struct.unpack(">IIQ", rd(16))
print("write errno", err)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 8, size, 512))
m, err2, h = struct.unpack(">IIQ", rd(16))
print("read past end errno", err2)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 42, 9, 0, 0))
m, err3, h = struct.unpack(">IIQ", rd(16))
print("unknown command errno", err3)
PY
)
case $out in *"write errno 1"*"read past end errno 22"*"unknown command errno 22"*) ;; *) fail "-r write / bad requests: $out";; esac
stop
CHECKS=$((CHECKS + 1))
qemu-img compare -f qcow2 -F raw "$WORK/t.qcow2" "$WORK/copy.raw" >"$WORK/cmp.out" 2>&1 || fail "-r export changed the image: $(cat "$WORK/cmp.out")"

# 5. Two clients at once (-e 2): writes on one, flush on the other.
qemu_create "$WORK/m.qcow2" "cluster_size=64k" 64M
serve "$S" -t -e 2 -f qcow2 "$WORK/m.qcow2"
CHECKS=$((CHECKS + 1))
out=$(nbdinfo --json "$U" | python3 -c 'import json,sys; print(json.load(sys.stdin)["exports"][0]["can_multi_conn"])')
[ "$out" = True ] || fail "-e 2 should advertise CAN_MULTI_CONN, got $out"
CHECKS=$((CHECKS + 1))
out=$(python3 - "$S" <<'PY' 2>&1
import socket, struct, sys
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    def rd(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b)); assert c; b += c
        return b
    rd(18); s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))
    size, flags = struct.unpack(">QH", rd(10))
    assert flags & 0x100, "CAN_MULTI_CONN missing"
    return s, rd
def req(c, typ, off, ln, data=b""):
    s, rd = c
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, typ, 5, off, ln) + data)
    m, err, h = struct.unpack(">IIQ", rd(16))
    assert err == 0, (typ, err)
    return rd(ln) if typ == 0 else b""
a = conn(); b = conn()
req(a, 1, 1 << 20, 65536, b"\x05" * 65536)
req(b, 3, 0, 0)
assert req(b, 0, 1 << 20, 65536) == b"\x05" * 65536
for s, _ in (a, b):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 6, 0, 0)); s.close()
print("ok")
PY
)
[ "$out" = ok ] || fail "two clients: $out"
stop
# Without -t the server exits by itself after the last client: status 0.
qemu_create "$WORK/x.qcow2" "cluster_size=64k" 1M
serve "$S" -f qcow2 "$WORK/x.qcow2"
nbdinfo --size "$U" >/dev/null
CHECKS=$((CHECKS + 1))
for _ in $(seq 100); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.05; done
if kill -0 "$SRV_PID" 2>/dev/null; then fail "server without -t still running after its client left"; stop
else wait "$SRV_PID"; rc=$?; SRV_PID=; [ $rc = 0 ] || fail "exit status $rc after the last client"; fi
check_clean "multi-conn image" "$WORK/m.qcow2"
CHECKS=$((CHECKS + 1))
out=$(qemu-io -f qcow2 -c 'read -P 5 1M 64k' "$WORK/m.qcow2" 2>&1)
case $out in "read 65536/65536"*) ;; *) fail "multi-conn write not in the image: $out";; esac

# 6. Allocation depth on a backing chain (-A).
qemu_create "$WORK/base.qcow2" "cluster_size=64k" 4M
qemu-io -f qcow2 -c 'write -P 1 0 1M' "$WORK/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b "$WORK/base.qcow2" -F qcow2 "$WORK/top.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 2 512k 1M' "$WORK/top.qcow2" >/dev/null
serve "$S" -A -r -t -f qcow2 "$WORK/top.qcow2"
CHECKS=$((CHECKS + 1))
out=$(nbdinfo --map=qemu:allocation-depth "$U" 2>&1 | awk '{print $1, $2, $3}' | tr '\n' ';')
[ "$out" = "0 524288 2;524288 1048576 1;1572864 2621440 0;4194304 4194304 1;" ] \
    || fail "allocation depth: got '$out'"
CHECKS=$((CHECKS + 1))
out=$(nbdinfo --map "$U" 2>&1 | awk '{print $1, $2, $3}' | tr '\n' ';')
[ "$out" = "0 1572864 0;1572864 6815744 3;" ] || fail "base:allocation on a chain: got '$out'"
stop
# 7. TLS required (--object tls-creds-x509 --tls-creds): qemu-io with the
# client credentials works, a client without TLS is refused.
if command -v certtool >/dev/null; then
    T=$WORK/tls
    mkdir -p "$T/client"
    (cd "$T" &&
     certtool --generate-privkey > ca-key.pem &&
     printf 'cn = test CA\nca\ncert_signing_key\nexpiration_days = 2\n' > ca.info &&
     certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem &&
     certtool --generate-privkey > server-key.pem &&
     printf 'cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' > server.info &&
     certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
         --load-privkey server-key.pem --template server.info --outfile server-cert.pem &&
     cp ca-cert.pem client/ &&
     certtool --generate-privkey > client/client-key.pem &&
     printf 'cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n' > client.info &&
     certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
         --load-privkey client/client-key.pem --template client.info --outfile client/client-cert.pem
    ) >"$WORK/certtool.log" 2>&1 || die "certtool failed: $(tail -3 "$WORK/certtool.log")"
    qemu_create "$WORK/tls.qcow2" "cluster_size=64k" 64M
    serve "$S" -t --object "tls-creds-x509,id=tls0,dir=$T,endpoint=server" --tls-creds tls0 -f qcow2 "$WORK/tls.qcow2"
    CHECKS=$((CHECKS + 1))
    out=$(timeout 60 qemu-io --object "tls-creds-x509,id=tls0,dir=$T/client,endpoint=client" \
        --image-opts "driver=nbd,server.type=unix,server.path=$S,tls-creds=tls0,tls-hostname=localhost" \
        -c 'write -P 6 1M 1M' -c 'read -P 6 1M 1M' -c 'read -P 0 4M 1M' 2>&1)
    case $out in *"wrote 1048576/1048576"*"read 1048576/1048576"*"read 1048576/1048576"*) ;;
        *) fail "qemu-io over TLS: $out";; esac
    CHECKS=$((CHECKS + 1))
    out=$(timeout 20 qemu-io -r -f raw -c 'read 0 512' "$U" 2>&1)
    case $out in *"TLS negotiation required"*) ;; *) fail "a client without TLS must be refused: $out";; esac
    CHECKS=$((CHECKS + 1))
    out=$(timeout 20 nbdinfo --map "nbds+unix:///?socket=$S&tls-certificates=$T/client&tls-hostname=localhost" 2>&1 | awk '{print $1, $2, $3}' | tr '\n' ';')
    [ "$out" = "0 1048576 3;1048576 1048576 0;2097152 65011712 3;" ] || fail "nbdinfo --map over TLS: $out"
    stop
    check_clean "image written over TLS" "$WORK/tls.qcow2"
else
    log "certtool not found (gnutls-bin): TLS part not run"
fi
interop_finish
