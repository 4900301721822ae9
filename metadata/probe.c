/*
 * metadata/probe.c: format probing (see metadata/probe.h).  The signatures
 * and scores are those of QEMU 7.2's block drivers' bdrv_probe functions;
 * the highest score wins, as in bdrv_probe_all(), and raw scores 1.
 */
#include <string.h>

#include "metadata/probe.h"
#include "metadata/qcow2.h"

static int starts(const uint8_t *buf, size_t len, const char *sig, size_t n)
{
	return len >= n && memcmp(buf, sig, n) == 0;
}

/* vmdk's text descriptor: a line starting with createType=" (vmdk_probe). */
static int vmdk_descriptor(const uint8_t *buf, size_t len)
{
	static const char key[] = "createType=\"";
	size_t k = sizeof(key) - 1;
	for (size_t i = 0; i + k <= len; i++) {
		if ((i == 0 || buf[i - 1] == '\n') && memcmp(buf + i, key, k) == 0)
			return 1;
		if (buf[i] == 0)
			return 0; /* binary: not a descriptor */
	}
	return 0;
}

const char *qcow2_probe_format(const uint8_t *buf, size_t len, const char *filename)
{
	static const char cloop_magic[] =
		"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
	uint32_t version;

	if (len > QCOW2_PROBE_BYTES)
		len = QCOW2_PROBE_BYTES;
	/* 100: a signature no raw disk is expected to start with. */
	if (len >= QCOW2_V3_HEADER_LEN && qcow2_be32(buf) == QCOW2_MAGIC) {
		version = qcow2_be32(buf + 4);
		return version >= 2 ? "qcow2" : version == 1 ? "qcow" : "raw";
	}
	if (len >= 48 && qcow2_be32(buf) == QCOW2_MAGIC && qcow2_be32(buf + 4) == 1)
		return "qcow"; /* QCowHeader (v1) is 48 bytes */
	if (starts(buf, len, "KDMV", 4) || starts(buf, len, "COWD", 4) || vmdk_descriptor(buf, len))
		return "vmdk";
	if (len >= 68 && buf[64] == 0x7f && buf[65] == 0x10 && buf[66] == 0xda && buf[67] == 0xbe)
		return "vdi"; /* signature 0xbeda107f, little-endian, at 64 */
	if (starts(buf, len, "vhdxfile", 8))
		return "vhdx";
	if (starts(buf, len, "conectix", 8))
		return "vpc";
	if (starts(buf, len, "QED\0", 4) && len >= 64)
		return "qed";
	if (starts(buf, len, "LUKS\xba\xbe", 6))
		return "luks";
	if (starts(buf, len, "WithoutFreeSpace", 16) || starts(buf, len, "WithouFreSpacExt", 16))
		return "parallels";
	if (starts(buf, len, "Bochs Virtual HD Image", 22))
		return "bochs";
	/* 2: weaker evidence, still above raw's 1. */
	if (starts(buf, len, cloop_magic, sizeof(cloop_magic) - 1))
		return "cloop";
	size_t n = filename ? strlen(filename) : 0;
	if (n >= 4 && strcmp(filename + n - 4, ".dmg") == 0)
		return "dmg";
	return "raw";
}
