#!/usr/bin/env bash
# tests/guest/build_initramfs.sh: the kernel and initramfs of the test guest
# (tests/interop/test_guest_nbd.sh), built from Debian packages and cached.
#
# Prints two lines on stdout, KERNEL=<vmlinuz> and INITRD=<initramfs.cpio.gz>;
# progress goes to stderr.  Exit 77 when a prerequisite is missing (no
# busybox-static, no e2fsprogs, the kernel package cannot be downloaded and
# none is cached), 1 on any other failure.
#
# The kernel: Debian's linux-image-6.1.*-amd64 (the package linux-image-amd64
# depends on), fetched with `apt-get download` (never installed) and unpacked
# with dpkg-deb -x; only vmlinuz and the modules the guest loads are kept, in
# $CACHE/kernel-<package>_<version>/.  The .deb ships no modules.dep (depmod
# writes it at install time), so the dependencies are read where depmod reads
# them: each module's .modinfo `depends=` (and `softdep=pre:`, an alias such as
# crypto-crc32c, resolved to the module that declares it).  The load order,
# dependencies first, is kept in the file `load-order`.
#
# The initramfs: busybox (static), mke2fs and e2fsck with their shared
# libraries (ldd), the modules, and tests/guest/init as /init; a newc cpio
# (cpio, or busybox cpio) gzipped, cached as $CACHE/initramfs-<hash>.cpio.gz
# where <hash> covers every input (this script, init, the binaries, the
# libraries, the kernel directory's modules).
#
# Environment:
#   QSM_GUEST_CACHE       cache directory (default ${XDG_CACHE_HOME:-~/.cache}/qsm-guest)
#   QSM_GUEST_KERNEL_PKG  the kernel package (default: what linux-image-amd64 depends on)
#   QSM_GUEST_OFFLINE=1   never download; use a cached kernel or exit 77
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${QSM_GUEST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/qsm-guest}
# Modules the guest loads (their dependencies are added).
WANT_MODULES="virtio_pci virtio_blk ext4"

msg()  { printf 'build_initramfs: %s\n' "$*" >&2; }
skip() { msg "SKIPPED: $*"; exit 77; }
die()  { msg "FATAL: $*"; exit 1; }

BUSYBOX=$(command -v busybox) || skip "busybox not found (apt-get install busybox-static)"
case $(LC_ALL=C ldd "$BUSYBOX" 2>&1) in
*"not a dynamic executable"*|*"statically linked"*) ;;
*) skip "$BUSYBOX is not statically linked (apt-get install busybox-static)";;
esac
MKE2FS=$(PATH=$PATH:/usr/sbin:/sbin command -v mke2fs) || skip "mke2fs not found (e2fsprogs)"
E2FSCK=$(PATH=$PATH:/usr/sbin:/sbin command -v e2fsck) || skip "e2fsck not found (e2fsprogs)"
mkdir -p "$CACHE" || die "cannot create $CACHE"

# modinfo_field KO FIELD: the values of FIELD= in the module's .modinfo
# (NUL-separated key=value strings; no kmod needed).
modinfo_field() { tr '\0' '\n' <"$1" | sed -n "s/^$2=//p"; }

# ---- the kernel ------------------------------------------------------------
kernel_from_deb() {   # kernel_from_deb DEB KDIR: vmlinuz + wanted modules into KDIR
    local deb=$1 kdir=$2 x mods kver
    x=$(mktemp -d "$CACHE/unpack.XXXXXX") || return 1
    msg "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$x" || { rm -rf "$x"; return 1; }
    mods=$(echo "$x"/lib/modules/*/kernel)
    [ -d "$mods" ] || { rm -rf "$x"; msg "no modules in $deb"; return 1; }
    kver=$(basename "$(dirname "$mods")")
    local tmp="$kdir.tmp.$$"
    rm -rf "$tmp" && mkdir -p "$tmp/modules" || { rm -rf "$x"; return 1; }
    cp "$x/boot/vmlinuz-$kver" "$tmp/vmlinuz" || { rm -rf "$x" "$tmp"; return 1; }
    # Resolve dependencies depth first: a module is listed after all it needs.
    local -A path=() done=()
    local order=() ko name
    while IFS= read -r ko; do
        name=${ko##*/}; name=${name%.ko}
        path[$name]=$ko
        path[${name//-/_}]=$ko
    done < <(find "$mods" -name '*.ko')
    alias_of() {      # alias_of ALIAS: a module (crypto/ first) declaring it
        local f
        for f in "$mods"/crypto/*.ko $(find "$mods" -name '*.ko'); do
            if modinfo_field "$f" alias | grep -qx "$1"; then basename "$f" .ko; return 0; fi
        done
        return 1
    }
    visit() {
        local m=${1//-/_} d deps
        [ -n "${done[$m]:-}" ] && return 0
        [ -n "${path[$m]:-}" ] || { msg "module $m not found"; return 1; }
        done[$m]=1
        deps=$(modinfo_field "${path[$m]}" depends | tr ',' ' ')
        for d in $(modinfo_field "${path[$m]}" softdep | sed -n 's/^pre: *//p'); do
            if [ -n "${path[${d//-/_}]:-}" ]; then deps="$deps $d"
            else deps="$deps $(alias_of "$d")" || { msg "no module for $d"; return 1; }
            fi
        done
        for d in $deps; do visit "$d" || return 1; done
        order+=("$m")
    }
    for name in $WANT_MODULES; do visit "$name" || { rm -rf "$x" "$tmp"; return 1; }; done
    for name in "${order[@]}"; do
        cp "${path[$name]}" "$tmp/modules/$name.ko" || { rm -rf "$x" "$tmp"; return 1; }
    done
    printf '%s\n' "${order[@]}" >"$tmp/load-order"
    echo "$kver" >"$tmp/release"
    rm -rf "$x" "$kdir" && mv "$tmp" "$kdir"
    msg "kernel $kver, modules: ${order[*]}"
}

pkg=${QSM_GUEST_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-6\.1[^ ]*-amd64\)$/\1/p' | head -1)}
ver=
[ -n "$pkg" ] && ver=$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -1)
KDIR=
if [ -n "$pkg" ] && [ -n "$ver" ] && [ "$ver" != "(none)" ]; then
    KDIR="$CACHE/kernel-${pkg}_$ver"
    if [ ! -f "$KDIR/load-order" ] && [ "${QSM_GUEST_OFFLINE:-0}" != 1 ]; then
        dl=$(mktemp -d "$CACHE/dl.XXXXXX") || die "mktemp failed"
        msg "apt-get download $pkg=$ver"
        if (cd "$dl" && apt-get download -q "$pkg=$ver" >"$dl/log" 2>&1); then
            kernel_from_deb "$dl"/*.deb "$KDIR" || { rm -rf "$dl"; die "unpacking $pkg failed"; }
        else
            msg "download failed: $(grep -v '^W:' "$dl/log" | tail -1)"
        fi
        rm -rf "$dl"
    fi
fi
if [ -z "$KDIR" ] || [ ! -f "$KDIR/load-order" ]; then
    # offline or no apt metadata: the newest cached kernel, if any
    KDIR=$(ls -d "$CACHE"/kernel-*/ 2>/dev/null | sort -V | tail -1)
    KDIR=${KDIR%/}
    [ -n "$KDIR" ] && [ -f "$KDIR/load-order" ] ||
        skip "no kernel: cannot download ${pkg:-the kernel of linux-image-amd64} and none cached in $CACHE"
    msg "using cached $(basename "$KDIR")"
fi

# ---- the initramfs ---------------------------------------------------------
libs_of() { ldd "$1" 2>/dev/null | awk '/=>/ { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }'; }
LIBS=$( { libs_of "$MKE2FS"; libs_of "$E2FSCK"; } | sort -u)
hash=$( {
    sha256sum "$HERE/build_initramfs.sh" "$HERE/init" "$BUSYBOX" "$MKE2FS" "$E2FSCK" \
        "$KDIR"/modules/*.ko "$KDIR/load-order"
    for l in $LIBS; do sha256sum "$(readlink -f "$l")"; done
    echo "$LIBS"
} | sed 's/ .*\// /' | sha256sum | cut -c1-16)
INITRD="$CACHE/initramfs-$hash.cpio.gz"
if [ ! -s "$INITRD" ]; then
    root=$(mktemp -d "$CACHE/root.XXXXXX") || die "mktemp failed"
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,lib/modules,lib64} || die "mkdir failed"
    cp "$BUSYBOX" "$root/bin/busybox" || die "cp busybox failed"
    for a in $("$BUSYBOX" --list); do
        case $a in   # e2fsprogs' own tools, not busybox's look-alikes
        busybox|mke2fs|mkfs.ext2|mkfs.ext3|mkfs.ext4|e2fsck|fsck|fsck.ext*|tune2fs) ;;
        *) ln -s busybox "$root/bin/$a";;
        esac
    done
    cp "$MKE2FS" "$root/sbin/mke2fs" && ln -sf mke2fs "$root/sbin/mkfs.ext4" &&
        cp "$E2FSCK" "$root/sbin/e2fsck" || die "cp e2fsprogs failed"
    [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
    for l in $LIBS; do
        mkdir -p "$root$(dirname "$l")" && cp -L "$l" "$root$l" || die "cp $l failed"
    done
    cp "$KDIR"/modules/*.ko "$KDIR/load-order" "$root/lib/modules/" || die "cp modules failed"
    cp "$HERE/init" "$root/init" && chmod 755 "$root/init" || die "cp init failed"
    if command -v cpio >/dev/null; then CPIO=(cpio); else CPIO=("$BUSYBOX" cpio); fi
    (cd "$root" && find . | LC_ALL=C sort | "${CPIO[@]}" -o -H newc 2>/dev/null) |
        gzip -1 >"$INITRD.tmp.$$" && mv "$INITRD.tmp.$$" "$INITRD" ||
        { rm -rf "$root" "$INITRD.tmp.$$"; die "cpio failed"; }
    rm -rf "$root"
    msg "built $INITRD ($(du -k "$INITRD" | cut -f1) KiB)"
    # keep the cache small: older initramfs images go
    ls -t "$CACHE"/initramfs-*.cpio.gz 2>/dev/null | tail -n +4 | xargs -r rm -f
fi
echo "KERNEL=$KDIR/vmlinuz"
echo "INITRD=$INITRD"
