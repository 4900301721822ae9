#!/usr/bin/env bash
# tests/embed/run.sh BUILD_DIR: libqsm as a distribution ships it.
#  1. cmake --install BUILD_DIR into a temporary prefix;
#  2. build tests/embed/embed.c from the installed headers and
#     `pkg-config qsm` alone (PKG_CONFIG_PATH at the prefix) against the
#     shared library, run it (LD_LIBRARY_PATH at the prefix), and check with
#     ldd that it used the installed libqsm.so;
#  3. the same linked statically against libqsm.a (pkg-config --static);
#  4. check_exports.sh: libqsm.so exports exactly the installed API;
#     the installed qsm, without GnuTLS, loads its TLS module from the
#     prefix;
#  5. the installed headers compile as C++ (g++ or clang++; SKIPPED when
#     neither exists; the extern "C" guards are checked by grep regardless).
# Exit 0 when every step passed.
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:?usage: tests/embed/run.sh BUILD_DIR}
cc=${CC:-cc}
work=$(mktemp -d) || exit 1
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
fail=0
say() { printf 'embed: %s\n' "$*"; }

if ! cmake --install "$build" --prefix "$prefix" >"$work/install.log" 2>&1; then
    cat "$work/install.log"; say "FAIL: cmake --install"; exit 1
fi
pcdir=$(dirname "$(find "$prefix" -name qsm.pc | head -1)")
libdir=$(cd "$pcdir/.." && pwd)
export PKG_CONFIG_PATH=$pcdir
say "installed in $prefix: $(cd "$prefix" && find . -type f | sort | tr '\n' ' ')"
if ls "$prefix"/include/qsm | grep -qv -E '^(qsm|qsm_io|qsm_version)\.h$'; then
    say "FAIL: headers other than qsm.h, qsm_io.h, qsm_version.h installed"; fail=1
fi

# The program may see only the installed headers: no -I into the tree.
cflags=$(pkg-config --cflags qsm) libs=$(pkg-config --libs qsm) || { say "FAIL: pkg-config qsm"; exit 1; }
say "pkg-config --cflags --libs qsm: $cflags $libs"
if $cc -std=c11 -Wall -Wextra -Werror $cflags "$SRC/tests/embed/embed.c" -o "$work/embed" $libs; then
    if LD_LIBRARY_PATH=$libdir "$work/embed"; then
        if LD_LIBRARY_PATH=$libdir ldd "$work/embed" | grep -q "$libdir/libqsm.so"; then
            say "PASS shared"
        else
            say "FAIL shared: not linked against $libdir/libqsm.so"; fail=1
        fi
    else
        say "FAIL shared: embed exited $?"; fail=1
    fi
else
    say "FAIL shared: embed.c does not build from the installed headers"; fail=1
fi

# The installed qsm links no GnuTLS and finds its TLS module where the
# install put it (tools/nbd/tls.h, "Loading"): asked for credentials from a
# directory that does not exist, it gets as far as the credentials' own
# message, not "TLS is not available".
if [ -x "$prefix/bin/qsm" ]; then
    "$prefix/bin/qsm" create -q -f qcow2 "$work/tls.qcow2" 1M
    out=$(timeout 20 "$prefix/bin/qsm" nbd --object tls-creds-x509,id=t0,dir="$work/no-creds",endpoint=server \
        --tls-creds t0 "$work/tls.qcow2" 2>&1)
    if ldd "$prefix/bin/qsm" | grep -q gnutls; then
        say "FAIL tls module: the installed qsm links GnuTLS"; fail=1
    elif printf '%s' "$out" | grep -q "Unable to access credentials $work/no-creds/ca-cert.pem"; then
        say "PASS tls module (loaded from the install)"
    else
        say "FAIL tls module: qsm nbd said: $out"; fail=1
    fi
else
    say "FAIL: qsm not installed in $prefix/bin"; fail=1
fi

slibs=$(pkg-config --libs --static qsm | sed 's/-lqsm/-l:libqsm.a/')
if $cc -std=c11 -Wall -Wextra -Werror $cflags "$SRC/tests/embed/embed.c" -o "$work/embed-static" $slibs; then
    if "$work/embed-static"; then
        if ldd "$work/embed-static" 2>/dev/null | grep -q libqsm; then
            say "FAIL static: linked against a libqsm.so"; fail=1
        else
            say "PASS static"
        fi
    else
        say "FAIL static: embed exited $?"; fail=1
    fi
else
    say "FAIL static: embed.c does not link with pkg-config --static qsm"; fail=1
fi

so=$(ls "$libdir"/libqsm.so.* 2>/dev/null | head -1)
if [ -n "$so" ] && bash "$SRC/tests/embed/check_exports.sh" "$so" "$prefix/include"; then
    say "PASS exports"
else
    say "FAIL exports"; fail=1
fi

for h in qsm.h qsm_io.h; do
    if ! grep -q 'extern "C"' "$prefix/include/qsm/$h"; then
        say "FAIL: $h has no extern \"C\" guard"; fail=1
    fi
done
cxx=""
for c in g++ clang++; do command -v $c >/dev/null && { cxx=$c; break; }; done
if [ -z "$cxx" ]; then
    say "SKIPPED c++: no g++ or clang++"
else
    printf '#include <qsm/qsm.h>\n#include <qsm/qsm_io.h>\nint main() { const char *v; return qsm_version(&v) ? 0 : 1; }\n' >"$work/cxx.cc"
    if $cxx -Wall -Werror $cflags -c "$work/cxx.cc" -o "$work/cxx.o"; then
        say "PASS c++ ($cxx)"
    else
        say "FAIL c++ ($cxx): the installed headers do not compile as C++"; fail=1
    fi
fi
exit $fail
