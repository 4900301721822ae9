#!/usr/bin/env python3
"""tests/interop/bitmap_edit.py: damage the persistent bitmaps of a qcow2 v3
image in place, one field at a time, for test_bitmaps.sh.

  bitmap_edit.py IMG ext FIELD VALUE        nb | reserved | dir_size | dir_offset
  bitmap_edit.py IMG entry I FIELD VALUE    table_offset | table_size | flags |
                                            type | granularity_bits | name_size |
                                            extra_data_size | name (a string)
  bitmap_edit.py IMG table I K VALUE        entry K of bitmap I's table
  bitmap_edit.py IMG autoclear VALUE        the header's autoclear features

VALUE is an integer (0x... allowed).  Offsets come from the image itself:
the bitmaps extension (type 0x23852875) after the v3 header, then the
directory it names, entries walked as qcow2.txt lays them out.
"""
import struct
import sys

EXT_BITMAPS = 0x23852875
EXT_FIELDS = {"nb": (0, ">I"), "reserved": (4, ">I"), "dir_size": (8, ">Q"),
              "dir_offset": (16, ">Q")}
ENTRY_FIELDS = {"table_offset": (0, ">Q"), "table_size": (8, ">I"), "flags": (12, ">I"),
                "type": (16, ">B"), "granularity_bits": (17, ">B"), "name_size": (18, ">H"),
                "extra_data_size": (20, ">I")}


def find_ext(f):
    f.seek(100)
    pos = struct.unpack(">I", f.read(4))[0]
    while True:
        f.seek(pos)
        typ, length = struct.unpack(">II", f.read(8))
        if typ == 0:
            sys.exit("bitmap_edit.py: no bitmaps extension")
        if typ == EXT_BITMAPS:
            return pos + 8
        pos += 8 + (length + 7) // 8 * 8


def entry_pos(f, ext, index):
    f.seek(ext + 16)
    pos = struct.unpack(">Q", f.read(8))[0]
    for _ in range(index):
        f.seek(pos + 18)
        name_size, extra = struct.unpack(">HI", f.read(6))
        pos += (24 + name_size + extra + 7) // 8 * 8
    return pos


def put(f, off, fmt, value):
    f.seek(off)
    f.write(struct.pack(fmt, value))


def main(argv):
    img, what = argv[1], argv[2]
    with open(img, "r+b") as f:
        if what == "autoclear":
            put(f, 88, ">Q", int(argv[3], 0))
            return
        ext = find_ext(f)
        if what == "ext":
            off, fmt = EXT_FIELDS[argv[3]]
            put(f, ext + off, fmt, int(argv[4], 0))
        elif what == "entry":
            pos = entry_pos(f, ext, int(argv[3]))
            if argv[4] == "name":
                f.seek(pos + 24)
                f.write(argv[5].encode())
            else:
                off, fmt = ENTRY_FIELDS[argv[4]]
                put(f, pos + off, fmt, int(argv[5], 0))
        elif what == "table":
            pos = entry_pos(f, ext, int(argv[3]))
            f.seek(pos)
            table = struct.unpack(">Q", f.read(8))[0]
            put(f, table + 8 * int(argv[4]), ">Q", int(argv[5], 0))
        else:
            sys.exit("bitmap_edit.py: unknown edit " + what)


if __name__ == "__main__":
    main(sys.argv)
