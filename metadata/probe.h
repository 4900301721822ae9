/*
 * metadata/probe.h: what format a file's first bytes say it is, as QEMU's
 * bdrv_probe_all() finds it for an image named without a format.
 *
 * Each format QEMU 7.2 probes is recognised by its signature (the score
 * QEMU's probe functions give it decides between them; raw is what is left
 * when none matches).  Only the engine's callers that were asked to probe
 * use this: images a user named without -f.  Backing files and data files
 * are never probed (a guest can write any header into a raw disk).
 */
#ifndef QSM_PROBE_H
#define QSM_PROBE_H

#include <stddef.h>
#include <stdint.h>

/* The bytes a probe looks at (QEMU's BLOCK_PROBE_BUF_SIZE): a file shorter
 * than this is probed from what it has. */
#define QCOW2_PROBE_BYTES 512u

/*
 * The format name QEMU gives the image whose first `len` bytes (at most
 * QCOW2_PROBE_BYTES are looked at) are `buf`: "qcow2" (the qcow2 magic and
 * a version of 2 or more: a bad version is the opener's refusal), "raw"
 * when no signature matches, else the name of another format ("qcow",
 * "vmdk", "vdi", "vhdx", "vpc", "qed", "luks", "parallels", "bochs",
 * "cloop", "dmg").  `filename` may be NULL; dmg is known by its name only,
 * as QEMU knows it.  Pure; static strings.
 */
const char *qcow2_probe_format(const uint8_t *buf, size_t len, const char *filename);

#endif
