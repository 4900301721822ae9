# tests/interop/tools_fixtures.sh: images for the tool tests (test_map.sh,
# test_compare.sh, test_convert.sh), all made by qemu-img/qemu-io 7.2 so
# that qsm is measured against images it did not write.  Source after
# lib.sh; `make_fixtures DIR` fills DIR and sets FIXTURES to a list of
# "NAME:FORMAT" (top images; chains are named by their top).
#
# What is in them (S = 8 MiB guest size unless said):
#  data.qcow2     64k clusters, v3: data runs, zero clusters both plain
#                 (write -z -u) and allocated (write -z over data),
#                 compressed clusters (write -c), partial-cluster data,
#                 unallocated gaps;
#  small.qcow2    512-byte clusters (an L2 table maps 32 KiB), v3: data and
#                 zero runs crossing many L2 tables;
#  v2.qcow2       4k clusters, compat=0.10: data and zero writes (v2 has no
#                 zero flag: qemu writes zeros or deallocates);
#  prealloc.qcow2 preallocation=metadata: data clusters that are holes in
#                 the file (QEMU reports zero and data);
#  comp.qcow2     qemu-img convert -c of data.qcow2 (every cluster compressed);
#  chain1.qcow2   over base.raw (sparse raw, 6 MiB: shorter than the top);
#  chain2.qcow2   over chain1.qcow2 (4k clusters) over base.raw;
#  chain3.qcow2   over mid3.qcow2 over chain1.qcow2 over base.raw: depth 3,
#                 with zero clusters hiding backing data;
#  sparse.raw     a raw file with data and holes, length not a whole cluster.

# qio IMG FMT CMD...: run qemu-io commands quietly
qio() {
    local img=$1 fmt=$2 a=()
    shift 2
    for c in "$@"; do a+=(-c "$c"); done
    qemu-io -f "$fmt" "${a[@]}" "$img" >/dev/null || die "qemu-io $img failed"
}

make_fixtures() {
    local d=$1
    (
    cd "$d" || exit 1
    qemu-img create -q -f qcow2 data.qcow2 8M
    qio data.qcow2 qcow2 'write -P 1 0 200k' 'write -P 2 448k 192k' 'write -P 3 1M 64k' \
        'write -z 1088k 128k' 'write -z -u 1280k 64k' 'write -P 4 2M 64k' 'write -z 2M 64k' \
        'write -c -P 5 3M 64k' 'write -c -P 6 3136k 64k' 'write -c -P 7 3264k 64k' \
        'write -P 8 5000k 3k' 'write -P 9 8128k 64k'
    qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 3M
    qio small.qcow2 qcow2 'write -P 1 20k 100k' 'write -z 60k 40k' 'write -P 2 1M 33k' \
        'write -z -u 1040k 8k' 'write -c -P 3 2M 512'
    qemu-img create -q -f qcow2 -o cluster_size=4k,compat=0.10 v2.qcow2 4M
    qio v2.qcow2 qcow2 'write -P 1 0 100k' 'write -z 40k 16k' 'write -z -u 80k 8k' \
        'write -P 2 3M 1k'
    qemu-img create -q -f qcow2 -o preallocation=metadata prealloc.qcow2 2M
    qio prealloc.qcow2 qcow2 'write -P 1 64k 64k' 'write -P 2 1M 4k'
    qemu-img convert -c -f qcow2 -O qcow2 data.qcow2 comp.qcow2
    truncate -s 6M base.raw
    qio base.raw raw 'write -P 21 0 1M' 'write -P 22 2M 512k' 'write -P 23 5M 1M'
    qemu-img create -q -f qcow2 -b base.raw -F raw chain1.qcow2 8M
    qio chain1.qcow2 qcow2 'write -P 31 512k 128k' 'write -z 2304k 64k' 'write -P 32 7M 64k' \
        'write -z -u 5248k 64k' 'write -P 33 5900k 200k'
    qemu-img create -q -f qcow2 -o cluster_size=4k -b chain1.qcow2 -F qcow2 chain2.qcow2 8M
    qio chain2.qcow2 qcow2 'write -P 41 100k 4k' 'write -z 2M 8k' 'write -P 42 6M 12k'
    qemu-img create -q -f qcow2 -o compat=0.10 -b chain1.qcow2 -F qcow2 mid3.qcow2 7M
    qio mid3.qcow2 qcow2 'write -P 51 0 64k' 'write -P 52 5M 128k'
    qemu-img create -q -f qcow2 -b mid3.qcow2 -F qcow2 chain3.qcow2 9M
    qio chain3.qcow2 qcow2 'write -z 0 32k' 'write -z 5M 64k' 'write -P 61 8M 4k' \
        'write -z -u 2112k 64k'
    truncate -s 3000000 sparse.raw
    qio sparse.raw raw 'write -P 71 0 4k' 'write -P 72 1M 100k' 'write -P 73 2949120 4096'
    ) || die "building the fixtures failed"
    FIXTURES="data.qcow2:qcow2 small.qcow2:qcow2 v2.qcow2:qcow2 prealloc.qcow2:qcow2
              comp.qcow2:qcow2 chain1.qcow2:qcow2 chain2.qcow2:qcow2 chain3.qcow2:qcow2
              base.raw:raw sparse.raw:raw"
}
