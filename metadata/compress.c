/*
 * metadata/compress.c: raw deflate and inflate of one cluster (see
 * metadata/compress.h for the contract).
 */
#include <errno.h>
#include <zlib.h>

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
