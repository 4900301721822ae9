#!/usr/bin/env bash
# NBD over TLS, TLS required (issue #14), against NBD_SERVER (default the
# build's `qsm nbd`, "qemu-nbd" for the reference; see nbd_lib.sh).
# Certificates are made here with certtool (gnutls-bin) in QEMU's
# tls-creds-x509 layout (ca-cert.pem, server-cert.pem, server-key.pem;
# client-cert.pem, client-key.pem on the client side): a CA, a server and
# a client certificate, and a client certificate from another CA.  The
# server runs with --object tls-creds-x509,id=tls0,dir=DIR,endpoint=server
# --tls-creds tls0 (verify-peer on, QEMU's default).  Checks:
#  - qemu-io and qemu-img (--object tls-creds-x509,...,endpoint=client,
#    driver=nbd,...,tls-creds=tls0) read, write and convert over TLS;
#    nbdinfo (libnbd, nbds+unix:// with tls-certificates=) reads the size
#    and the map;
#  - in the clear (nbd_client.py tls): OPT_LIST, OPT_GO, OPT_INFO,
#    OPT_STRUCTURED_REPLY and an unknown option get NBD_REP_ERR_TLS_REQD,
#    OPT_EXPORT_NAME and a READ get a disconnect; a plain qemu-io cannot
#    read; a Python ssl session after STARTTLS reads and writes;
#  - garbage where the ClientHello belongs (closed), a TLS handshake that
#    never starts (closed within the 10 s handshake limit);
#  - a client certificate from another CA and a client without a
#    certificate are refused (qemu-io and nbd_client.py);
#  - a server without TLS refuses OPT_STARTTLS and goes on in the clear;
#  - SIGTERM: exit 0, no sanitizer report; the image holds exactly the
#    writes made over TLS, qemu-img check clean.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/nbd_lib.sh"
interop_init
command -v certtool >/dev/null || skip "certtool not found (Debian gnutls-bin)"
nbd_init

# --- certificates ---
C="$WORK/certs"
mkdir -p "$C/srv" "$C/cli" "$C/bad" "$C/nocert" "$C/other"
mkcert() {   # mkcert TEMPLATE-LINES... : writes $C/tmpl.info
    printf '%s\n' "$@" >"$C/tmpl.info"
}
(
    set -e
    cd "$C"
    for ca in ca other/ca; do
        certtool --generate-privkey --outfile "$ca-key.pem" 2>/dev/null
        mkcert "cn = qsm test $ca" ca cert_signing_key "expiration_days = 7"
        certtool --generate-self-signed --load-privkey "$ca-key.pem" --template tmpl.info \
            --outfile "$ca-cert.pem" 2>/dev/null
    done
    certtool --generate-privkey --outfile srv/server-key.pem 2>/dev/null
    mkcert "organization = qsm test" "cn = localhost" "dns_name = localhost" \
        "ip_address = 127.0.0.1" tls_www_server encryption_key signing_key "expiration_days = 7"
    certtool --generate-certificate --load-privkey srv/server-key.pem --load-ca-certificate ca-cert.pem \
        --load-ca-privkey ca-key.pem --template tmpl.info --outfile srv/server-cert.pem 2>/dev/null
    mkcert "organization = qsm test" "cn = qsm client" tls_www_client encryption_key signing_key "expiration_days = 7"
    certtool --generate-privkey --outfile cli/client-key.pem 2>/dev/null
    certtool --generate-certificate --load-privkey cli/client-key.pem --load-ca-certificate ca-cert.pem \
        --load-ca-privkey ca-key.pem --template tmpl.info --outfile cli/client-cert.pem 2>/dev/null
    certtool --generate-privkey --outfile bad/client-key.pem 2>/dev/null
    certtool --generate-certificate --load-privkey bad/client-key.pem --load-ca-certificate other/ca-cert.pem \
        --load-ca-privkey other/ca-key.pem --template tmpl.info --outfile bad/client-cert.pem 2>/dev/null
    for d in srv cli nocert; do cp ca-cert.pem "$d/"; done
    # Both CAs: the client trusts the server and qemu-io's own check of
    # its certificate passes, so the refusal is the server's.
    cat ca-cert.pem other/ca-cert.pem >bad/ca-cert.pem
) || die "certtool failed"

IMG="$WORK/tls.qcow2"
qemu-img create -q -f qcow2 "$IMG" 64M || die "qemu-img create failed"
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 8M' "$IMG" >/dev/null || die "prefill failed"
cp "$IMG" "$WORK/ref.qcow2"

# tls_io TAG CERTDIR QEMU-IO-ARGS...: qemu-io over TLS with client creds
tls_io() {
    local dir=$2
    shift 2
    timeout 60 qemu-io --object "tls-creds-x509,id=tls0,dir=$dir,endpoint=client" \
        --image-opts "driver=nbd,server.type=unix,server.path=$SRV_SOCK,tls-creds=tls0,tls-hostname=localhost" "$@" 2>&1
}
io_ok() {   # io_ok OUTPUT BYTES: qemu-io output has the reads and no failure
    printf '%s\n' "$1" | grep -q "^read $2/$2" && ! printf '%s\n' "$1" | grep -q -i 'fail\|error'
}

if nbd_start tls "$IMG" -f qcow2 -t -e 3 \
    --object "tls-creds-x509,id=tls0,dir=$C/srv,endpoint=server" --tls-creds tls0; then
    out=$(tls_io ok "$C/cli" -c 'read -P 0x5a 0 1M' -c 'write -P 0x33 16M 1M' -c 'read -P 0x33 16M 1M')
    check "qemu-io over TLS: $out" io_ok "$out" 1048576
    qemu-io -f qcow2 -c 'write -q -P 0x33 16M 1M' "$WORK/ref.qcow2" >/dev/null
    out=$(timeout 60 qemu-img convert -O raw --object "tls-creds-x509,id=tls0,dir=$C/cli,endpoint=client" \
        --image-opts "driver=nbd,server.type=unix,server.path=$SRV_SOCK,tls-creds=tls0,tls-hostname=localhost" "$WORK/tls.raw" 2>&1)
    check "qemu-img convert over TLS: $out" [ $? = 0 ]
    out=$(qemu-img compare -f raw -F qcow2 "$WORK/tls.raw" "$WORK/ref.qcow2" 2>&1)
    check "qemu-img convert over TLS gave other data: $out" [ $? = 0 ]
    if command -v nbdinfo >/dev/null; then
        uri="nbds+unix:///?socket=$SRV_SOCK&tls-certificates=$C/cli"
        out=$(timeout 60 nbdinfo --size "$uri" 2>&1)
        check "nbdinfo --size over TLS: $out" [ "$out" = 67108864 ]
        out=$(timeout 60 nbdinfo --map "$uri" 2>&1)
        check "nbdinfo --map over TLS: $out" eval 'printf "%s\n" "$out" | grep -q "^ *0 *8388608 *0 *data"'
        out=$(timeout 60 nbdinfo --size "nbds+unix:///?socket=$SRV_SOCK&tls-certificates=$C/bad" 2>&1)
        check "nbdinfo with a certificate from another CA was served: $out" [ "$out" != 67108864 ]
    else
        log "nbdinfo not found (Debian libnbd-bin): its checks not run"
    fi
    nbd_py tls tls --socket "$SRV_SOCK" --certs "$C/cli" --badcerts "$C/bad" --pattern 0x5a
    out=$(timeout 60 qemu-io -r -f raw "$(NBD_URI "$SRV_SOCK")" -c 'read -P 0x5a 0 4096' 2>&1)
    check "a plain qemu-io read data from a TLS-only server: $out" not io_ok "$out" 4096
    out=$(tls_io bad "$C/bad" -r -c 'read -P 0x5a 0 4096')
    check "qemu-io with a certificate from another CA read data: $out" not io_ok "$out" 4096
    check "qemu-io refused its own certificate (the test's fault): $out" \
        not eval 'printf "%s\n" "$out" | grep -q "failed validation\|No hostname"' 
    out=$(tls_io nocert "$C/nocert" -r -c 'read -P 0x5a 0 4096')
    check "qemu-io without a client certificate read data (verify-peer): $out" not io_ok "$out" 4096
    out=$(tls_io again "$C/cli" -r -c 'read -P 0x5a 0 1M' -c 'read -P 0x33 16M 1M')
    check "qemu-io over TLS after the refused clients: $out" io_ok "$out" 1048576
    nbd_stop "TLS server" "$SRV_PID" "$SRV_ERR"
    compare_images "image after the TLS clients" "$IMG" "$WORK/ref.qcow2"
    check_clean "image after the TLS clients" "$IMG"
fi

# A server without TLS: STARTTLS refused, the haggle goes on in the clear.
if nbd_start plain "$IMG" -f qcow2 -t; then
    nbd_py plain starttls-unconfigured --socket "$SRV_SOCK"
    out=$(tls_io tls-to-plain "$C/cli" -r -c 'read -P 0x5a 0 4096')
    check "qemu-io with TLS read from a server without TLS: $out" not io_ok "$out" 4096
    nbd_stop "plain server" "$SRV_PID" "$SRV_ERR"
fi
interop_finish
