#!/usr/bin/env python3
"""make_bad_images.py OUTDIR: one malformed qcow2 image per opener rule.

Creates a valid image with qemu-img (1 GiB, 64 KiB clusters, compat 1.1) and
writes a few clusters with qemu-io so that L1, L2 and refcount entries exist:

    guest 0         64 KiB  -> L1[0] -> L2 table A, data cluster
    guest 512 MiB  128 KiB  -> L1[1] -> L2 table B, two data clusters

Then, for each rule of the opener checklist
(tools/doc/design.md, "Untrusted images"), copies it and breaks exactly that rule,
writing OUTDIR/NAME.qcow2 and one line of OUTDIR/manifest.tsv:

    NAME <TAB> expected substring of the error <TAB> phase <TAB> qemu-io command

  - the substring is the field the message must name (metadata/header.c's
    wording for header fields: "cluster_bits", "l1_size", ...; for table
    entries "L1", "L2", "refcount" or "overlap");
  - phase "open": `qsm info` must refuse the image;
    phase "io": the image may open, but the qemu-io style command in column 4
    (run with `qsm io -c CMD`) must fail; an engine that checks these entries
    already at open satisfies "io" rows as well;
    phase "accept": QEMU opens the image and finds the bad structure only
    when it is used; column 4 is a qemu-io script (commands separated by
    " ; ") that reads intact data and then writes through the bad
    structure; qsm run as qemu-io must print what qemu-io prints, exit as
    it does and leave the same image (test_malformed.sh); the substring is
    the corruption reason ("-" when the script finds none);
  - column 4 is "-" for open rows.
  - for open rows the substring is QEMU's message (qcow2_do_open's words,
    which qsm gives too), or qsm's naming of the field where QEMU opens the
    image and qsm refuses it (see QEMU_OPENS in test_malformed.sh).

OUTDIR/valid.qcow2 is the unbroken image (not in the manifest); every image
here except the broken field is byte-identical to it.  Python 3 stdlib only.
"""
import os
import shutil
import struct
import subprocess
import sys

CS = 65536
SIZE = 1 << 30

# Header field offsets (big-endian; docs/interop/qcow2.txt).
OFF = {
    "magic": (0, ">I"), "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857


def run(*cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if r.returncode != 0:
        sys.exit("make_bad_images: %s failed: %s" % (" ".join(cmd), r.stderr.strip()))


def get(img, field):
    off, fmt = OFF[field]
    return struct.unpack_from(fmt, img, off)[0]


def put(img, field, value):
    off, fmt = OFF[field]
    struct.pack_into(fmt, img, off, value)


def get64(img, off):
    return struct.unpack_from(">Q", img, off)[0]


def put64(img, off, value):
    struct.pack_into(">Q", img, off, value)


def ext_area(exts):
    """Serialize (type, data) extensions plus the end marker."""
    out = bytearray()
    for typ, data in exts:
        out += struct.pack(">II", typ, len(data)) + data
        out += b"\0" * (-len(data) % 8)
    return out + b"\0" * 8


class Images:
    def __init__(self, outdir, base):
        self.outdir = outdir
        self.base = base
        self.rows = []
        self.names = set()

    def add(self, name, expect, phase, cmd, mutate):
        assert name not in self.names, name
        assert phase in ("open", "io", "accept")
        self.names.add(name)
        img = bytearray(self.base)
        mutate(img)
        assert img != self.base, name
        with open(os.path.join(self.outdir, name + ".qcow2"), "wb") as f:
            f.write(img)
        self.rows.append("%s\t%s\t%s\t%s\n" % (name, expect, phase, cmd if cmd else "-"))

    def header(self, name, expect, **fields):
        def mutate(img):
            for k, v in fields.items():
                put(img, k, v)
        self.add(name, expect, "open", None, mutate)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_bad_images.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit("make_bad_images: %s not found" % tool)

    valid = os.path.join(outdir, "valid.qcow2")
    if os.path.exists(valid):
        os.unlink(valid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        "cluster_size=%d,compat=1.1" % CS, valid, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k",
        "-c", "write -P 0xcd 512M 128k", valid)
    run("qemu-img", "check", "-q", valid)
    with open(valid, "rb") as f:
        base = bytes(f.read())
    fsize = len(base)

    l1 = get(base, "l1_table_offset")
    reftable = get(base, "refcount_table_offset")
    l1e0 = get64(base, l1)
    l2a = l1e0 & 0x00FFFFFFFFFFFE00
    l2e0 = get64(base, l2a)
    assert l1e0 >> 63 and l2a and l2e0 >> 63, "unexpected qemu-io layout"
    beyond = (fsize + CS - 1) // CS * CS + 16 * CS  # aligned, past EOF

    im = Images(outdir, base)

    # 1. magic and version
    im.header("bad_magic", "Image is not in qcow2 format", magic=0x514649FA)
    im.header("version_4", "Unsupported qcow2 version 4", version=4)
    im.header("version_1", "Unsupported qcow2 version 1", version=1)
    # 2. cluster_bits
    im.header("cluster_bits_8", "Unsupported cluster size: 2^8", cluster_bits=8)
    im.header("cluster_bits_22", "Unsupported cluster size: 2^22", cluster_bits=22)
    # 3. header_length (113: QEMU walks the extensions from there)
    im.header("header_length_100", "qcow2 header too short", header_length=100)
    im.header("header_length_odd", "Header extension too large", header_length=113)
    im.header("header_length_past_cluster", "qcow2 header exceeds cluster size",
              header_length=CS + 8)

    # 4. features: an unknown incompatible bit, named in the feature table.
    def unknown_bit(img):
        at = 0x70
        typ, length = struct.unpack_from(">II", img, at)
        assert typ == EXT_FEATURE_TABLE and length == 384
        entry = struct.pack(">BB", 0, 5) + b"foo".ljust(46, b"\0")
        struct.pack_into(">I", img, at + 4, length + 48)
        img[at + 8 + length:at + 8 + length + 48] = entry
        img[at + 8 + length + 48:at + 8 + length + 56] = b"\0" * 8
        put(img, "incompatible_features", 1 << 5)
    im.add("unknown_incompatible_bit", "Unsupported qcow2 feature(s): foo", "open",
           None, unknown_bit)
    im.header("unknown_incompatible_bit_unnamed",
              "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000",
              incompatible_features=1 << 40)
    # (16-byte L2 entries: this image's L1 is too small for them)
    im.header("extended_l2", "L1 table is too small", incompatible_features=1 << 4)
    im.header("external_data_file", "'data-file' is required for this image",
              incompatible_features=1 << 2)
    im.header("zstd_without_bit", "Compression type incompatible feature bit must be set",
              compression_type=1)
    im.header("compression_bit_without_type",
              "Compression type incompatible feature bit must not be set",
              incompatible_features=1 << 3)
    im.header("compression_type_unknown", "qcow2: unknown compression type: 9",
              incompatible_features=1 << 3, compression_type=9)
    im.header("crypt_method_1", "crypt_method", crypt_method=1)
    im.header("crypt_method_2", "Missing CRYPTO header for crypt method 2", crypt_method=2)
    # 5. refcounts
    im.header("refcount_order_7", "Reference count entry width too large", refcount_order=7)
    im.header("refcount_table_clusters_0", "Image does not contain a reference count table",
              refcount_table_clusters=0)
    im.header("refcount_table_huge", "Reference count table too large",
              refcount_table_clusters=(8 << 20) // CS + 1)
    # 6. tables
    im.header("l1_size_too_small", "L1 table is too small", l1_size=1)
    im.header("l1_size_huge", "Active L1 table too large", l1_size=(32 << 20) // 8 + 1)
    im.header("virtual_size_beyond_l1", "L1 table is too small", size=SIZE + CS)
    im.header("l1_offset_unaligned", "Active L1 table offset invalid",
              l1_table_offset=l1 + 512)
    im.header("l1_offset_zero", "l1_table_offset", l1_table_offset=0)
    im.header("l1_offset_past_eof", "l1_table_offset", l1_table_offset=beyond)
    im.header("l1_offset_overflow", "Active L1 table offset invalid",
              l1_table_offset=0x7FFFFFFFFFFF0000, l1_size=0x10000)
    im.header("reftable_offset_unaligned", "Reference count table offset invalid",
              refcount_table_offset=reftable + 512)
    im.header("reftable_offset_overflow", "Reference count table offset invalid",
              refcount_table_offset=0xFFFFFFFFFFFF0000)
    im.header("nb_snapshots_too_large", "Snapshot table too large", nb_snapshots=65537,
              snapshots_offset=CS)
    im.header("snapshots_offset_unaligned", "Snapshot table offset invalid", nb_snapshots=1,
              snapshots_offset=CS + 512)
    # 8. backing file name
    im.header("backing_offset_past_cluster", "Invalid backing file offset",
              backing_file_offset=CS + 8, backing_file_size=4)
    im.header("backing_size_past_cluster", "Backing file name too long",
              backing_file_offset=CS - 8, backing_file_size=16)
    im.header("backing_size_1024", "Backing file name too long",
              backing_file_offset=0x1000, backing_file_size=1024)

    # 9. extensions
    def ext_too_long(img):
        struct.pack_into(">I", img, 0x70 + 4, CS)
    im.add("extension_length_past_end", "Header extension too large", "open", None,
           ext_too_long)

    def dup_backing_fmt(img):
        area = ext_area([(EXT_BACKING_FORMAT, b"raw"), (EXT_BACKING_FORMAT, b"raw")])
        img[0x70:0x70 + 384 + 16] = b"\0" * (384 + 16)
        img[0x70:0x70 + len(area)] = area
    # --- accepted at open, as QEMU does (the last duplicate wins, a trailing
    # partial feature entry is ignored); the scripts write new clusters.
    readall = "read -P 0xab 0 64k ; read -P 0xcd 512M 128k ; read -P 0 64k 64k"
    im.add("duplicate_backing_format", "-", "accept",
           readall + " ; write -P 0x22 768M 64k ; read -P 0x22 768M 64k", dup_backing_fmt)

    def feature_table_bad_len(img):
        struct.pack_into(">I", img, 0x70 + 4, 383)
    im.add("feature_table_length", "-", "accept",
           readall + " ; write -P 0x22 768M 64k", feature_table_bad_len)

    # A snapshot table past the end of the file, where the next cluster the
    # allocator hands out lies: the write that allocates it marks the image
    # corrupt (QEMU's overlap check).
    eof = (fsize + CS - 1) // CS * CS
    def snap_at_eof(img):
        put(img, "nb_snapshots", 1)
        put(img, "snapshots_offset", eof)
    im.add("snapshots_offset_past_eof",
           "Preventing invalid write on metadata (overlaps with snapshot table)", "accept",
           readall + " ; write -P 0x22 768M 64k", snap_at_eof)
    # Further past the end: nothing reaches it, the image stays writable.
    im.add("snapshots_offset_far_past_eof", "-", "accept",
           readall + " ; write -P 0x22 768M 64k ; read -P 0x22 768M 64k",
           lambda img: (put(img, "nb_snapshots", 1), put(img, "snapshots_offset", beyond)))

    # 11. L1/L2 entries (checked on use; an opener may check the L1 earlier).
    read0 = "read 0 64k"
    # Reserved bits: QEMU ignores them (its check reports them); the script
    # writes in place through the entry and allocates elsewhere.
    inplace = readall + " ; write -P 0x22 768M 64k ; read -P 0x22 768M 64k" \
        " ; write -P 0x11 0 4k ; read -P 0x11 0 4k ; read -P 0xab 4k 60k"
    im.add("l1_entry_reserved_bits", "-", "accept", inplace,
           lambda img: put64(img, l1, l1e0 | (1 << 56) | 0x1))
    im.add("l1_entry_unaligned", "L1", "io", read0,
           lambda img: put64(img, l1, l1e0 + 512))
    im.add("l1_entry_past_eof", "L1", "io", read0,
           lambda img: put64(img, l1, (1 << 63) | beyond))
    im.add("l1_entry_overlaps_reftable", "overlap", "io", "write -P 0x11 0 4k",
           lambda img: put64(img, l1, (1 << 63) | reftable))
    im.add("l2_entry_reserved_bits", "-", "accept", inplace,
           lambda img: put64(img, l2a, l2e0 | 0x2 | (1 << 56)))
    im.add("l2_entry_unaligned", "L2", "io", read0,
           lambda img: put64(img, l2a, l2e0 + 512))
    im.add("l2_entry_past_eof", "L2", "io", read0,
           lambda img: put64(img, l2a, (1 << 63) | beyond))
    im.add("l2_entry_overlaps_reftable", "overlap", "io", "write -P 0x11 0 4k",
           lambda img: put64(img, l2a, (1 << 63) | reftable))
    # The header cluster cannot be named by a standard entry (offset 0 means
    # unallocated), but a compressed descriptor can point at it.
    im.add("l2_entry_compressed_at_header", "L2", "io", read0,
           lambda img: put64(img, l2a, (1 << 62) | (1 << 54)))
    im.add("l2_entry_overlaps_l1", "overlap", "io", "write -P 0x11 0 4k",
           lambda img: put64(img, l2a, (1 << 63) | l1))

    # Refcount table entries: used when a write allocates clusters.
    alloc = "write -P 0x22 768M 64k"
    rt0 = get64(base, reftable)
    im.add("reftable_entry_unaligned", "Refblock offset %#x unaligned (reftable index: 0)"
           % (rt0 + 512), "accept", readall + " ; " + alloc,
           lambda img: put64(img, reftable, rt0 + 512))
    im.add("reftable_entry_reserved_bits", "-", "accept", inplace,
           lambda img: put64(img, reftable, rt0 | 0x1))
    # Damaged refcounts QEMU reads as zeros: it opens the image, reads it,
    # writes in place, and trips its overlap check at the first allocation
    # (the lowest cluster with refcount 0 is the header, or, when its range
    # has no refcount block, the new block's place, the cluster after it).
    # (QEMU's reads fail after that, "No medium found"; qsm keeps reading
    # what is intact: test_refcount checks it, not this comparison.)
    damaged = readall + " ; write -P 0x11 0 4k ; read -P 0x11 0 4k ; " + alloc
    header_overlap = "Preventing invalid write on metadata (overlaps with qcow2_header)"
    im.add("refblock_past_eof", header_overlap, "accept", damaged,
           lambda img: put64(img, reftable, beyond))
    im.add("reftable_entry_zero",
           "Preventing invalid write on metadata (overlaps with refcount table)", "accept",
           damaged, lambda img: put64(img, reftable, 0))
    im.add("reftable_offset_zero", header_overlap, "accept", damaged,
           lambda img: put(img, "refcount_table_offset", 0))
    im.add("reftable_offset_past_eof", header_overlap, "accept", damaged,
           lambda img: put(img, "refcount_table_offset", beyond))

    with open(os.path.join(outdir, "manifest.tsv"), "w") as f:
        f.writelines(im.rows)
    print("make_bad_images: %d images in %s" % (len(im.rows), outdir))


if __name__ == "__main__":
    main()
