/*
 * metadata/compress.h: the compressed-cluster codec (qcow2 compression type
 * 0, zlib), as QEMU's qcow2_compress/qcow2_decompress use it: raw deflate
 * (no zlib header or checksum), windowBits -12, default level, memLevel 9.
 *
 * Contracts: both functions are pure and thread-safe (they touch only the
 * buffers they are given: the engine calls them on worker threads, see
 * io/work.h), allocate only zlib's own state, and return 0 or a negative
 * errno.  Where the bytes go on disk is metadata/l2entry.h's business.
 */
#ifndef QSM_COMPRESS_H
#define QSM_COMPRESS_H

#include <stddef.h>
#include <stdint.h>

/*
 * Deflate `in_len` bytes (a whole cluster, zero padded by the caller) into
 * at most `out_cap` bytes (cluster_size - 1 for a cluster: a compressed
 * cluster must be smaller than a cluster).  *out_len is the compressed
 * length, or 0 when the data does not fit in out_cap (no gain: the caller
 * stores the cluster as is).  -ENOMEM when zlib cannot start, -EIO on any
 * other zlib failure.
 */
int qcow2_deflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
		  size_t *out_len);

/*
 * Inflate `in_len` bytes (a compressed cluster as read from disk, possibly
 * followed by the rest of its last sector) into exactly `out_len` bytes (a
 * cluster).  -EIO when the stream is bad or does not produce exactly
 * out_len bytes, -ENOMEM when zlib cannot start.
 */
int qcow2_inflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len);

#endif
