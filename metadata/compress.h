/*
 * metadata/compress.h: the compressed-cluster codecs, as QEMU's
 * qcow2-threads.c uses them.  The image header's compression_type picks
 * one (byte 104; incompatible bit 3 set when it is not zlib):
 *   0 zlib: raw deflate (no zlib header or checksum), windowBits -12,
 *     default level, memLevel 9 (qcow2_compress/qcow2_decompress);
 *   1 zstd: one zstd frame, libzstd's default parameters, written in one
 *     ZSTD_compressStream2(ZSTD_e_end) call (qcow2_zstd_compress); read as a
 *     stream, so that the rest of the last sector after the frame is
 *     ignored and a cluster split into several frames is read too
 *     (qcow2_zstd_decompress).
 * The compressed cluster descriptor (metadata/l2entry.h) is the same for
 * both: only the bytes it points at differ.
 *
 * Contracts: every function is pure and thread-safe (it touches only the
 * buffers it is given: the engine calls them on worker threads, see
 * io/work.h), allocates only the library's own state, and returns 0 or a
 * negative errno.
 */
#ifndef QSM_COMPRESS_H
#define QSM_COMPRESS_H

#include <stddef.h>
#include <stdint.h>

enum qcow2_compression {
	QCOW2_COMPRESSION_ZLIB = 0,
	QCOW2_COMPRESSION_ZSTD = 1,
};
#define QCOW2_COMPRESSION_MAX QCOW2_COMPRESSION_ZSTD

/* "zlib" or "zstd" (as qemu-img info prints them); NULL past the max. */
const char *qcow2_compression_name(unsigned type);
/* "zlib"/"zstd" -> type; -EINVAL for any other name. */
int qcow2_compression_parse(const char *name, enum qcow2_compression *out);

/*
 * Compress `in_len` bytes (a whole cluster, zero padded by the caller) into
 * at most `out_cap` bytes (cluster_size - 1 for a cluster: a compressed
 * cluster must be smaller than a cluster).  *out_len is the compressed
 * length, or 0 when the data does not fit in out_cap (no gain: the caller
 * stores the cluster as is).  -ENOMEM when the library cannot start,
 * -EINVAL for an unknown type, -EIO on any other failure.
 */
int qcow2_compress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
		   uint8_t *out, size_t out_cap, size_t *out_len);

/*
 * Decompress `in_len` bytes (a compressed cluster as read from disk,
 * possibly followed by the rest of its last sector) into exactly `out_len`
 * bytes (a cluster).  -EIO when the stream is bad or does not produce
 * exactly out_len bytes, -ENOMEM when the library cannot start, -EINVAL
 * for an unknown type.
 */
int qcow2_decompress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
		     uint8_t *out, size_t out_len);

/* The zlib codec alone (qcow2_compress/qcow2_decompress with type 0). */
int qcow2_deflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
		  size_t *out_len);
int qcow2_inflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len);

#endif
