/*
 * metadata/compress.c: compressing and decompressing one cluster with zlib
 * (raw deflate) or zstd (see metadata/compress.h for the contract).
 */
#include <errno.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "metadata/compress.h"

int qcow2_deflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
		  size_t *out_len)
{
	z_stream z = { 0 };
	int zr;

	*out_len = 0;
	if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
		return -ENOMEM;
	z.next_in = (Bytef *)in;
	z.avail_in = (uInt)in_len;
	z.next_out = out;
	z.avail_out = (uInt)out_cap;
	zr = deflate(&z, Z_FINISH);
	deflateEnd(&z);
	if (zr == Z_STREAM_END) {
		*out_len = out_cap - z.avail_out;
		return 0;
	}
	return zr == Z_OK ? 0 : -EIO; /* Z_OK: out of room, i.e. no gain */
}

int qcow2_inflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
	z_stream z = { 0 };
	int zr;

	if (inflateInit2(&z, -12) != Z_OK)
		return -ENOMEM;
	z.next_in = (Bytef *)in;
	z.avail_in = (uInt)in_len;
	z.next_out = out;
	z.avail_out = (uInt)out_len;
	zr = inflate(&z, Z_FINISH);
	inflateEnd(&z);
	/* As QEMU's qcow2_decompress: a full output is a whole cluster, even
	 * when zlib stopped short of the stream's end (Z_BUF_ERROR). */
	if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR) || z.avail_out != 0)
		return -EIO;
	return 0;
}

/*
 * One frame, written in a single call as QEMU does: libzstd compresses all
 * it can at once and returns how much it still had to flush, which is more
 * than 0 only when out_cap was too small.  QEMU cannot hand it a bigger
 * buffer either, so that (or a dstSize_tooSmall error) means no gain.
 */
static int zstd_compress(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
			 size_t *out_len)
{
	ZSTD_CCtx *cctx = ZSTD_createCCtx();
	ZSTD_inBuffer src = { in, in_len, 0 };
	ZSTD_outBuffer dst = { out, out_cap, 0 };
	size_t zr;
	int ret = 0;

	*out_len = 0;
	if (!cctx)
		return -ENOMEM;
	zr = ZSTD_compressStream2(cctx, &dst, &src, ZSTD_e_end);
	if (ZSTD_isError(zr))
		ret = ZSTD_getErrorCode(zr) == ZSTD_error_dstSize_tooSmall ? 0 : -EIO;
	else if (zr == 0)
		*out_len = dst.pos;
	ZSTD_freeCCtx(cctx);
	return ret;
}

/*
 * Decode frames until the cluster is full.  The input is the stored length
 * rounded to sectors, so what follows the last frame is padding, never
 * read.  Every call must make progress on one of the buffers (a damaged
 * stream could otherwise ask for more input forever), and the last frame
 * must end exactly at the cluster's end (zr == 0): a frame that would go
 * on is a cluster larger than a cluster.
 */
static int zstd_decompress(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
	ZSTD_DCtx *dctx = ZSTD_createDCtx();
	ZSTD_inBuffer src = { in, in_len, 0 };
	ZSTD_outBuffer dst = { out, out_len, 0 };
	size_t zr = 0;
	int ret = 0;

	if (!dctx)
		return -ENOMEM;
	while (dst.pos < dst.size) {
		size_t in_pos = src.pos, out_pos = dst.pos;
		zr = ZSTD_decompressStream(dctx, &dst, &src);
		if (ZSTD_isError(zr) || (src.pos <= in_pos && dst.pos <= out_pos)) {
			ret = -EIO;
			break;
		}
	}
	if (ret == 0 && zr != 0)
		ret = -EIO;
	ZSTD_freeDCtx(dctx);
	return ret;
}

const char *qcow2_compression_name(unsigned type)
{
	switch (type) {
	case QCOW2_COMPRESSION_ZLIB: return "zlib";
	case QCOW2_COMPRESSION_ZSTD: return "zstd";
	}
	return NULL;
}

int qcow2_compression_parse(const char *name, enum qcow2_compression *out)
{
	for (unsigned t = 0; t <= QCOW2_COMPRESSION_MAX; t++) {
		if (!strcmp(name, qcow2_compression_name(t))) {
			*out = (enum qcow2_compression)t;
			return 0;
		}
	}
	return -EINVAL;
}

int qcow2_compress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
		   uint8_t *out, size_t out_cap, size_t *out_len)
{
	switch (type) {
	case QCOW2_COMPRESSION_ZLIB: return qcow2_deflate(in, in_len, out, out_cap, out_len);
	case QCOW2_COMPRESSION_ZSTD: return zstd_compress(in, in_len, out, out_cap, out_len);
	}
	*out_len = 0;
	return -EINVAL;
}

int qcow2_decompress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
		     uint8_t *out, size_t out_len)
{
	switch (type) {
	case QCOW2_COMPRESSION_ZLIB: return qcow2_inflate(in, in_len, out, out_len);
	case QCOW2_COMPRESSION_ZSTD: return zstd_decompress(in, in_len, out, out_len);
	}
	return -EINVAL;
}
