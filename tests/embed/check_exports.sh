#!/usr/bin/env bash
# tests/embed/check_exports.sh LIBQSM_SO INCLUDEDIR: the shared library's
# dynamic symbol table is exactly the installed API.
#  1. every symbol libqsm.so exports is declared by an installed header
#     (compiled: a C file that takes the address of each one, built from
#     INCLUDEDIR alone with implicit declarations an error);
#  2. every function the installed headers declare is exported (the
#     prototypes gcc -aux-info lists from INCLUDEDIR/qsm/*.h), so a public
#     function that lacks QSM_EXPORT fails too.
# Prints what is wrong; exit 0 when both hold.
set -u
so=$1 inc=$2
work=$(mktemp -d) || exit 1
trap 'rm -rf "$work"' EXIT
cc=${CC:-cc}
fail=0

nm -D --defined-only "$so" | awk '$2 ~ /^[TDBRVWiu]$/ { print $3 }' | sort -u >"$work/exported"
n=$(wc -l <"$work/exported")
if [ "$n" -lt 10 ]; then
    echo "check_exports: only $n symbols exported by $so" >&2
    exit 1
fi

# 1. exported => declared
{
    echo '#include <qsm/qsm.h>'
    echo '#include <qsm/qsm_io.h>'
    echo '#include <qsm/qsm_version.h>'
    echo 'void *qsm_exported_[] = {'
    sed 's/.*/\t(void *)\&&,/' "$work/exported"
    echo '};'
} >"$work/decl.c"
if ! LC_ALL=C "$cc" -std=c11 -Werror=implicit-function-declaration -c -I"$inc" "$work/decl.c" \
        -o "$work/decl.o" 2>"$work/decl.err"; then
    echo "check_exports: exported by $so but not declared in $inc/qsm/*.h:" >&2
    grep -o "'[a-z_0-9]*' undeclared" "$work/decl.err" | tr -d "'" | sed 's/ undeclared//' |
        sort -u | sed 's/^/    /' >&2
    grep -q undeclared "$work/decl.err" || cat "$work/decl.err" >&2
    fail=1
fi

# 2. declared => exported
head -3 "$work/decl.c" >"$work/hdrs.c"
if ! "$cc" -std=c11 -fsyntax-only -aux-info "$work/aux" -I"$inc" "$work/hdrs.c"; then
    echo "check_exports: the installed headers do not compile alone" >&2
    exit 1
fi
grep -F "$inc/qsm/" "$work/aux" | sed -E 's/.*[^a-zA-Z0-9_]([a-zA-Z_][a-zA-Z0-9_]*) \(.*/\1/' |
    sort -u >"$work/declared"
if [ ! -s "$work/declared" ]; then
    echo "check_exports: found no function declarations in $inc/qsm" >&2
    fail=1
fi
missing=$(comm -23 "$work/declared" "$work/exported")
if [ -n "$missing" ]; then
    echo "check_exports: declared in $inc/qsm/*.h but not exported by $so (QSM_EXPORT missing?):" >&2
    echo "$missing" | sed 's/^/    /' >&2
    fail=1
fi
[ $fail = 0 ] && echo "check_exports: $n exported symbols = the $(wc -l <"$work/declared") functions of the installed headers"
exit $fail
