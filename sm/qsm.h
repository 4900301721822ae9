/*
 * sm/qsm.h: the public API of libqsm, a qcow2 engine whose requests are
 * explicit state machines on the caller's libevent loop.
 *
 * Threading and blocking:
 *  - Everything runs on the `struct event_base` given to qsm_open(); call the
 *    API from that loop's thread only.
 *  - qsm_readv/writev/flush/discard/write_zeroes/block_status never block and
 *    never call their callback before returning (completion is always
 *    delivered from the loop).
 *  - qsm_close_async never blocks either: callable from anywhere on the
 *    loop, completion callbacks included (see "Closing" below).
 *  - What blocks: qsm_open and qsm_open_io (they read the header and tables
 *    synchronously), qsm_create, qsm_truncate, qsm_close and the qsm_sync_*
 *    helpers (these run the loop until their work is done, so they must not
 *    be called from inside a callback of the loop: qsm_close detects it and
 *    returns -EDEADLK).
 *
 * Errors: every function returns 0 or a negative errno.  A submit function
 * that returns an error does not run the callback (the request was not
 * accepted: bad arguments, image read-only or in a sticky error state, out
 * of memory).  Once accepted, the callback runs exactly once with 0 or a
 * negative errno.  A write never reports success unless its data and the
 * metadata that maps it are in the image (durable too in
 * writethrough/directsync modes).
 *
 * Two sticky error states, both for the rest of the session:
 *  - After a failed metadata write: later writes, zero writes, compressed
 *    writes, discards and qsm_truncate fail with -EIO (refused at submit,
 *    no callback); requests already accepted fail with -EIO; flushes
 *    complete with -EIO; reads still work.
 *  - After a corruption is found (metadata no valid image holds: a table
 *    entry past the end of the file, a data cluster over a table, ...):
 *    the request that found it completes with -EIO; requests already
 *    accepted complete with -EIO from their next metadata step or data
 *    write on (one past both may still succeed); later writes, zero
 *    writes, compressed writes, discards and qsm_truncate are refused at
 *    submit with -ENOMEDIUM ("No medium found", as QEMU reports them), no
 *    callback.  Flushes are accepted and complete with -EIO (cache=unsafe
 *    ignores flushes, as always): QEMU's detached driver reports success,
 *    but the metadata of writes acknowledged before the corruption may
 *    never reach the disk, so qsm does not promise their durability.
 *    Reads whose mapping is intact keep working and see every acknowledged
 *    write.  Nothing more is written to the image but the corrupt bit of
 *    its header (incompatible feature bit 1): dirty tables are left
 *    unwritten, close writes nothing back and returns -EIO.  An image with
 *    the corrupt bit set is never opened read-write again (-EACCES) until
 *    repaired (qemu-img check -r).  A read-only image only records the
 *    finding.
 * qsm_image_error() says which state, and why.
 *
 * ABI (installed as <qsm/qsm.h>, with <qsm/qsm_io.h> and <qsm/qsm_version.h>;
 * `pkg-config --cflags --libs qsm`):
 *  - only what these headers declare is exported from libqsm.so;
 *  - option and result structures start with `size_t struct_size`: set it to
 *    sizeof the structure (QSM_OPTS_INIT does), and fields are only ever
 *    appended, so a program built against older headers keeps working with
 *    a newer library (the fields it does not know take their defaults, 0).
 *    0 is read as the size the structure had in release 0.1.0, the first
 *    with struct_size.  A struct_size larger than the library knows is
 *    accepted when the bytes it does not know are all zero (-EINVAL else);
 *  - QSM_VERSION_* (qsm_version.h) are the headers' version, qsm_version()
 *    the library's.
 */
#ifndef QSM_H
#define QSM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/uio.h>

#include "qsm_version.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Initialiser of a growable structure's first member, e.g.
 *   struct qsm_open_opts o = { QSM_OPTS_INIT(o), .cache = QSM_CACHE_NONE }; */
#define QSM_OPTS_INIT(var) .struct_size = sizeof(var)

/* The library's version, QSM_VERSION_NUMBER's encoding (0x00MMmmpp); with
 * str non-NULL, *str is set to "MAJOR.MINOR.PATCH" (static). */
QSM_EXPORT unsigned qsm_version(const char **str);

struct event_base;
struct qsm_io;
struct qsm_image;

typedef void (*qsm_cb)(void *opaque, int ret);

enum qsm_cache_mode {
	QSM_CACHE_WRITEBACK,   /* default */
	QSM_CACHE_NONE,        /* O_DIRECT */
	QSM_CACHE_WRITETHROUGH,
	QSM_CACHE_DIRECTSYNC,
	QSM_CACHE_UNSAFE,
};
/*
 * The format of the image on io, probed as qsm_open_opts.probe_format
 * probes it: *format "qcow2" or "raw" (static), or -ENOTSUP with err
 * naming the other format found; name (NULL allowed) is what the user
 * called it (dmg is known by its name).  Blocking, one read of 512 bytes;
 * io must not be live (no image open on it).  For tools that look at an
 * image without opening it (qemu-img check's raw refusal).
 */
QSM_EXPORT int qsm_probe_format(struct qsm_io *io, const char *name, const char **format,
				char *err, size_t errlen);

/* "writeback", "none", "writethrough", "directsync", "unsafe" -> mode; -EINVAL. */
QSM_EXPORT int qsm_cache_mode_parse(const char *s, enum qsm_cache_mode *out);
QSM_EXPORT const char *qsm_cache_mode_name(enum qsm_cache_mode m);

struct qsm_open_opts {
	size_t struct_size;        /* sizeof(struct qsm_open_opts): see "ABI" above */
	bool read_only;
	enum qsm_cache_mode cache;
	const char *aio;           /* "threads", "io_uring" or NULL (default) */
	uint64_t l2_cache_size;    /* bytes of L2 cache; 0: enough for 256 GiB at 64 KiB clusters */
	bool no_repair;            /* open dirty images without repairing (read-only use) */
	/* "qcow2" (default) or "raw"; a format is not probed unless
	 * probe_format asks.  A raw image's virtual size is the file's size;
	 * requests go straight to the file, flush is one fdatasync. */
	const char *format;
	/* Do not open the backing file (read-only opens only): unallocated
	 * clusters then read as zeros.  For tools that inspect one layer. */
	bool no_backing;
	/* Format of the backing file when the image does not record one
	 * (no backing-format extension): "qcow2" or "raw".  Never probed. */
	const char *backing_format;
	/* Worker threads for CPU work off the loop (compressing compressed
	 * writes, decompressing compressed reads), started on first use:
	 * 0 = one per online CPU (at least 2), 1..64, or -1 = none (the work
	 * runs on the loop, deferred, in order: for deterministic tests).
	 * Backing images inherit it. */
	int work_threads;
	/* Open the I/O handle of a backing file instead of qsm_io_open_path:
	 * for embedders with their own storage ("rbd:pool/base") and for tests
	 * on simulated disks.  name is the backing file name exactly as the
	 * image records it; path is that name resolved as a file name (against
	 * the directory of the image that names it, when relative), what
	 * qsm_open would open.  A hook for non-file names reads name; one for
	 * files reads path.  flags are QSM_IO_* (QSM_IO_RDONLY).  The format
	 * is still the recorded or given one, never probed.  0 or -errno.
	 * Handles opened this way are not checked for loops by device and
	 * inode (the opener knows its files); the depth limit still applies.
	 * Inherited down the chain. */
	int (*open_backing_io)(void *opaque, struct event_base *base, const char *name,
			       const char *path, int flags, struct qsm_io **out);
	void *open_backing_opaque;
	/* Bytes of refcount block cache (QEMU's refcount-cache-size); 0: QEMU's
	 * default, 4 clusters.  At least one block is cached.  Blocks pinned,
	 * dirty or being written may take it past this for a while (a write-back
	 * is started when dirty blocks do).  Backing images inherit it. */
	uint64_t refcount_cache_size;
	/* Where the repair of a dirty image (read-write open of an image whose
	 * dirty bit is set: lazy refcounts at a crash) reports what it finds
	 * and fixes, one line per call without the newline, in QEMU's words and
	 * order ("ERROR cluster 9 refcount=0 reference=1", "Rebuilding refcount
	 * structure", "Repairing cluster 1 refcount=1 reference=0", ...: what
	 * qemu-io prints on stderr when it opens such an image).  Called from
	 * inside qsm_open, before it returns.  NULL: the repair is silent.  The
	 * library never prints. */
	void (*repair_log)(void *opaque, const char *line);
	void *repair_log_opaque;
	/* Copy-on-read (QEMU's -C, BDRV_O_COPY_ON_READ; the copy-on-read
	 * filter): a read of clusters the image does not allocate itself (they
	 * fall through to the backing chain, or read as zeros without one)
	 * also writes them into the image, whole clusters, before it completes:
	 * zero clusters where the data read is all zeros (v3), else the data.
	 * Reads of what the image allocates are unchanged.  Refused with
	 * read_only (-EINVAL, "Can't use copy-on-read on read-only device").
	 * Not inherited by backing images. */
	bool copy_on_read;
	/* Open an internal snapshot's disk instead of the active one (QEMU's
	 * bdrv_snapshot_load_tmp, qemu-img convert -l): the snapshot whose id
	 * is snapshot_id and whose name is snapshot_name (a NULL one matches
	 * any; both NULL: the active disk).  Read-only only (-EINVAL
	 * otherwise); the virtual size is the snapshot's; -ENOENT "Can't find
	 * snapshot" when none matches; -ENOTSUP on raw images. */
	const char *snapshot_id;
	const char *snapshot_name;
	/* With format NULL: probe it as qemu-img probes an image named without
	 * -f (metadata/probe.h): the qcow2 magic opens qcow2, another format's
	 * signature refuses the open naming that format (-ENOTSUP), anything
	 * else opens raw.  A raw image found so, as QEMU's, refuses a write
	 * (or a zero write or discard) that would leave its first 512 bytes
	 * looking like another format (-EPERM, nothing written): a guest must
	 * not turn its disk into an image the next probe would parse.  For
	 * images a user names; backing files are never probed.  One 512-byte
	 * read at open. */
	bool probe_format;
};

/* Open the image at `path`.  On error, a message naming what is wrong is put
 * in err (when non-NULL) and nothing was written to the file.
 *
 * A backing file named by the header is opened too (unless no_backing):
 * its name resolved against the directory of `path` (qsm_open_io: against
 * the current directory), its format from the backing-format extension or
 * else opts.backing_format (never probed, refused when unknown), read-only,
 * without repair, with the same loop, cache mode and aio backend, and so on
 * down the chain.  A chain that comes back to one of its own files (by
 * device and inode) or is deeper than 64 images is refused.  The chain is
 * released with the image. */
QSM_EXPORT int qsm_open(struct event_base *base, const char *path, const struct qsm_open_opts *opts,
	     struct qsm_image **out, char *err, size_t errlen);
/* Same, on an already open I/O handle; the image takes ownership of io
 * (closed by qsm_close, or on failure). */
QSM_EXPORT int qsm_open_io(struct event_base *base, struct qsm_io *io, const struct qsm_open_opts *opts,
		struct qsm_image **out, char *err, size_t errlen);
/*
 * Closing.
 *
 * qsm_close_async(img, cb, opaque) starts closing the image and returns at
 * once; it may be called from anywhere on the image's loop, including from
 * inside a completion callback of one of its requests.  From then on:
 *  1. every new request on img is refused: the submit functions (qsm_readv,
 *     qsm_writev, qsm_writev_flags, qsm_flush, qsm_discard, qsm_write_zeroes,
 *     qsm_write_compressed, qsm_block_status) return -ESHUTDOWN without
 *     calling their callback, and qsm_close_async itself -EALREADY;
 *  2. the requests already in flight complete normally (their callbacks run,
 *     with their own results) before anything else happens: closing with
 *     requests in flight is allowed;
 *  3. a read-write image writes back all its dirty metadata through the
 *     ordinary write-back machine, refcounts included, and, with lazy
 *     refcounts, clears the dirty bit once everything is durable (a clean
 *     close); space reserved ahead of the allocator is given back.  An image
 *     in the sticky error state writes nothing but the corrupt bit (when it
 *     found corruption) and closes with its error;
 *  4. the io handle and the backing chain are closed and everything freed;
 *  5. then cb(opaque, ret) runs, once, from the loop (never from inside
 *     qsm_close_async): ret is 0, or the first error met (the image's sticky
 *     error, a failed write-back: what could not be written is lost).
 * img must not be used after cb has been called (it is freed by then).
 * Returns 0 when the close was started; -EALREADY when a close is already in
 * progress; -ENOMEM when it could not be started (nothing was done, the
 * image stays open).  cb may be NULL.
 */
QSM_EXPORT int qsm_close_async(struct qsm_image *img, qsm_cb cb, void *opaque);
/*
 * Blocking close for tools: qsm_close_async, then run the loop until it has
 * completed; returns its result.  Must not be called from inside a callback
 * running on the image's loop: from a completion callback of one of the
 * image's requests it returns -EDEADLK and the image stays open (use
 * qsm_close_async); from any other event of that event_base it cannot be
 * detected, and libevent refuses the nested loop.  Requests still in flight
 * complete first.  Should the loop run out of events before the close is
 * over (I/O that never completes: a crashed simulated disk), the image is
 * released as by qsm_abandon and -EIO returned.
 */
QSM_EXPORT int qsm_close(struct qsm_image *img);
/*
 * Release without writing anything: what a process crash leaves on disk.
 * Requests in flight are forgotten (their callbacks never run), but their
 * I/O is not left running: before the image's memory is freed, every
 * operation already at a backend (this image's and its backing chain's)
 * has completed or been cancelled, so none lands in freed memory.  The
 * caller's iov buffers of those requests may be reused once this returns.
 */
QSM_EXPORT void qsm_abandon(struct qsm_image *img);

/*
 * Change the virtual size (blocking, like open and close; no request may be
 * in flight).  Growing past what the L1 table maps moves the L1 table, in
 * QEMU's crash-safe order: new table and its refcounts durable, then the
 * header, then the old table released.  Shrinking releases every cluster
 * wholly past the new end (as QEMU: a full discard, the L2 tables past it
 * freed once the tables no longer naming them are durable; the L1 table
 * keeps its size); refused (-ENOTSUP) on an image with internal snapshots
 * when something is allocated there.  The size must
 * be a multiple of 512 (qcow2; a raw file may have any length).  err (when
 * non-NULL) explains a failure.
 * Growing over a backing image longer than the old size zeroes the new area
 * (v3 zero clusters, as QEMU) so the backing data does not appear there; a
 * v2 image cannot and is refused (-ENOTSUP).  Persistent bitmaps go with
 * the disk, as QEMU's do: each table sized for the new size, the bits cut
 * or extended with clear ones, durable when this returns (a crash in the
 * middle leaves them in use: untrusted); refused before anything changes
 * for a bitmap in use that this session does not record into (-EBUSY,
 * QEMU's words) and one the format cannot hold at the new size (-EFBIG:
 * QEMU resizes and then loses it).  Raw images: the file is
 * truncated to the new size.  In the sticky error states (top of file):
 * -ENOMEDIUM once corrupt, -EIO after a failed metadata write.
 */
QSM_EXPORT int qsm_truncate(struct qsm_image *img, uint64_t size, char *err, size_t errlen);

/* --- Requests ------------------------------------------------------------ */
/* Offsets and lengths are in bytes, any alignment; a request must lie inside
 * the virtual disk.  iov arrays and buffers must stay valid until the callback. */
QSM_EXPORT int qsm_readv(struct qsm_image *img, uint64_t offset, const struct iovec *iov, int iovcnt,
	      qsm_cb cb, void *opaque);
QSM_EXPORT int qsm_writev(struct qsm_image *img, uint64_t offset, const struct iovec *iov, int iovcnt,
	       qsm_cb cb, void *opaque);
/*
 * Per-request flags.
 * QSM_REQ_FUA (force unit access), on writes (qsm_writev_flags) and zero
 * writes (qsm_write_zeroes, spelled QSM_ZERO_FUA there): the request
 * completes only when its data and the metadata that maps it are durable.
 * It joins the next write-back batch, as every write does in cache mode
 * writethrough (and is grouped with the writethrough and FUA writes in
 * flight, sharing one sequence of syncs).  When only FUA requests wait, the
 * batch writes what maps them (their L2 tables, their L1 entries, the
 * refcounts those need) and leaves other dirty metadata for a later flush;
 * an in-place overwrite whose mapping is durable costs one sync and no
 * metadata write.  Requests without the flag are not affected: they
 * neither wait nor cause a sync.  In cache=unsafe, where
 * nothing is ever synced, FUA has no effect beyond the batch's writes.
 */
#define QSM_REQ_FUA 0x2
/* qsm_writev with flags (0 or QSM_REQ_FUA; -EINVAL for any other bit). */
QSM_EXPORT int qsm_writev_flags(struct qsm_image *img, uint64_t offset, const struct iovec *iov,
		     int iovcnt, unsigned flags, qsm_cb cb, void *opaque);
QSM_EXPORT int qsm_flush(struct qsm_image *img, qsm_cb cb, void *opaque);
/* Whole clusters in the range are released and read as zeros afterwards
 * (v3: zero flag; v2: unallocated); partial clusters are left as they are.
 * With a backing file, v3 leaves zero clusters (unallocated ones included),
 * and v2, which cannot hide the backing data, discards nothing (as QEMU).
 * Raw images: the range is discarded in the file (advisory, as the file
 * system's hole punching: the contents afterwards are unspecified). */
QSM_EXPORT int qsm_discard(struct qsm_image *img, uint64_t offset, uint64_t bytes, qsm_cb cb, void *opaque);
/* With a backing file, zero writes never leave unallocated clusters: v3
 * whole clusters become zero clusters (even with QSM_ZERO_MAY_UNMAP), v2
 * clusters get zero data; partial clusters are copied from the backing
 * image with the range zeroed. */
#define QSM_ZERO_MAY_UNMAP 0x1 /* whole clusters may be deallocated (qemu-io write -z -u);
				* without it, a v3 allocated cluster keeps its host
				* cluster with the zero flag */
#define QSM_ZERO_FUA QSM_REQ_FUA /* durable before completion, see QSM_REQ_FUA */
QSM_EXPORT int qsm_write_zeroes(struct qsm_image *img, uint64_t offset, uint64_t bytes, unsigned flags,
		     qsm_cb cb, void *opaque);

/*
 * Compressed write of whole clusters (qemu-io write -c): offset is cluster
 * aligned and bytes a multiple of the cluster size, or ending at the end of
 * the disk.  Each cluster is compressed off the loop (worker threads) and
 * packed byte-wise after the previous compressed cluster, as qemu-img does;
 * a cluster that does not shrink is written uncompressed.  The clusters'
 * old contents are released.  -ENOTSUP for raw images.
 */
QSM_EXPORT int qsm_write_compressed(struct qsm_image *img, uint64_t offset, const struct iovec *iov,
			 int iovcnt, qsm_cb cb, void *opaque);

/* Allocation status of the run starting at offset (at most `bytes` long). */
#define QSM_STATUS_DATA      0x1 /* reads come from this image's host clusters */
#define QSM_STATUS_ZERO      0x2 /* reads as zeros (with DATA: host clusters that are a
				    * hole in the image file, reported as QEMU does:
				    * only on images that look preallocated) */
#define QSM_STATUS_ALLOCATED 0x4 /* decided by this image (not by a backing file) */
#define QSM_STATUS_COMPRESSED 0x8
struct qsm_extent {
	uint64_t offset, length; /* guest range of the run */
	unsigned flags;          /* QSM_STATUS_* */
	uint64_t host_offset;    /* when DATA and not compressed, and for
				  * ZERO|ALLOCATED clusters that keep a host
				  * cluster (v3 zero flag on an allocated
				  * cluster); 0 otherwise */
};
/* A run of unallocated clusters reports ZERO when the image has no backing
 * file, and no flag at all when it has one (opened or not): the backing
 * chain decides, so callers such as `qsm map` ask qsm_get_backing() and
 * query the next image.
 * Raw images report runs of data (DATA|ALLOCATED) and holes of a sparse
 * file (ZERO|ALLOCATED), as QEMU's file driver, with host_offset = offset
 * for both (backends that cannot tell report data). */
QSM_EXPORT int qsm_block_status(struct qsm_image *img, uint64_t offset, uint64_t bytes,
		     struct qsm_extent *out, qsm_cb cb, void *opaque);

/* --- Information --------------------------------------------------------- */
/* For a raw image only format, virtual_size, file_size (the file's size),
 * read_only, cache and aio are set; the rest is zero. */
/* The codec of an image's compressed clusters (header compression_type). */
enum qsm_compression {
	QSM_COMPRESSION_ZLIB = 0,   /* the default, and the only one of v2 images */
	QSM_COMPRESSION_ZSTD = 1,
};
/* "zlib"/"zstd" -> *out; -EINVAL for any other name. */
QSM_EXPORT int qsm_compression_parse(const char *s, enum qsm_compression *out);

struct qsm_info {
	const char *format;         /* "qcow2" or "raw" (static) */
	uint64_t virtual_size;
	uint64_t cluster_size;
	unsigned version;           /* 2 or 3 */
	unsigned refcount_bits;
	bool lazy_refcounts;
	bool corrupt;               /* corrupt bit set (found at open or in this session) */
	bool dirty;
	bool read_only;
	uint64_t file_size;         /* allocator's view of the image end */
	char backing_file[1024];
	char backing_format[64];
	unsigned nb_snapshots;
	enum qsm_cache_mode cache;
	const char *aio;            /* backend name */
	/* Fields below were appended after 0.1.0 (see qsm_get_info). */
	const char *compression_type; /* "zlib" or "zstd" (static; NULL for raw) */
	bool format_probed;         /* the format came from probe_format */
};
/*
 * What the image is.  struct qsm_info has no struct_size (it predates the
 * rule), so, as with qsm_get_stats, the macro passes the size the caller
 * was compiled with and the library fills only that much.
 */
QSM_EXPORT void qsm_get_info_sized(struct qsm_image *img, struct qsm_info *info, size_t size);
QSM_EXPORT void qsm_get_info(struct qsm_image *img, struct qsm_info *info);
#define qsm_get_info(img, info) qsm_get_info_sized((img), (info), sizeof(*(info)))

/* --- Internal snapshots --------------------------------------------------- */
/* The snapshot table is read and validated at open: a malformed one
 * refuses the open, naming the snapshot and the field (QEMU's refusals in
 * QEMU's words, e.g. "Too much extra metadata in snapshot table entry 1";
 * qsm's own: a snapshot L1 table misaligned, larger than 32 MiB or outside
 * the file), and nothing is written.  A v3 entry without disk_size opens, as
 * in QEMU (disk_size then reads as the virtual size; qsm check reports the
 * entry as qemu-img check does).  Open reads the table in a few large reads
 * (the first of 64 KiB), never per entry.  The list is the table in table
 * order (qemu-img snapshot -l's order). */
#define QSM_SNAPSHOT_NO_ICOUNT UINT64_MAX
struct qsm_snapshot_info {
	size_t struct_size;         /* sizeof(struct qsm_snapshot_info): see "ABI" above */
	const char *id;             /* valid until close or the next create/delete */
	const char *name;           /* the tag ("" when none); as long as id */
	uint64_t vm_state_size;     /* bytes of saved VM state (0: disk-only snapshot) */
	uint32_t date_sec, date_nsec; /* wall clock when taken (seconds since the epoch) */
	uint64_t vm_clock_nsec;     /* guest clock when taken */
	uint64_t icount;            /* instruction count, or QSM_SNAPSHOT_NO_ICOUNT */
	uint64_t disk_size;         /* virtual size when taken */
};
/* Snapshots in the image (0 for raw). */
QSM_EXPORT unsigned qsm_snapshot_count(struct qsm_image *img);
/* Fill *out (out->struct_size set by the caller; 0 or a size shorter than
 * this first version is -EINVAL, a longer one gets zeros past it) with
 * snapshot `index` (0 .. count-1), or -ENOENT past the end. */
QSM_EXPORT int qsm_snapshot_get(struct qsm_image *img, unsigned index,
				struct qsm_snapshot_info *out);

/* --- Persistent dirty bitmaps ---------------------------------------------- */
/*
 * The bitmaps an image keeps (qcow2 "Bitmaps" extension) are read and
 * validated at open, as QEMU 7.2 reads them: a bad extension, directory, or
 * table of a bitmap not in use refuses the open in QEMU's words ("Bitmap
 * 'b0' doesn't satisfy the constraints", ...), and nothing is written.
 *
 * A read-write open records writes into every enabled bitmap it finds
 * consistent, as QEMU does (sm/bitmaps.c): marked in use while open (QEMU's
 * mark, so a crash leaves it untrusted, never wrong), its bits set by every
 * write, zero write, discard and compressed write as submitted (a snapshot
 * apply sets them all), written back and the mark cleared by the close.
 * The open gives each such bitmap fresh clusters (QEMU's store done early:
 * the close then overwrites only clusters it allocated).  Disabled and
 * in-use bitmaps are left as they are, and `qsm check` counts every
 * bitmap's clusters as QEMU's check does.  qsm_truncate resizes them
 * (above); a snapshot apply to another size is refused (-ENOTSUP, naming
 * it) when some bitmap's table would change size.  Editing (qemu-img
 * bitmap): below.
 */
#define QSM_BITMAP_IN_USE 0x1u /* may not match the disk: not to be used */
#define QSM_BITMAP_AUTO 0x2u   /* enabled: tracks writes */
struct qsm_bitmap_info {
	size_t struct_size;         /* sizeof(struct qsm_bitmap_info): see "ABI" above */
	const char *name;           /* valid until close */
	uint64_t granularity;       /* bytes of disk per bit */
	uint32_t flags;             /* QSM_BITMAP_* (as on disk now) */
};
/* Bitmaps in the image, in directory order (0 for raw). */
QSM_EXPORT unsigned qsm_bitmap_count(struct qsm_image *img);
/* As qsm_snapshot_get: bitmap `index`, -ENOENT past the end, -EINVAL for a
 * struct_size shorter than this first version. */
QSM_EXPORT int qsm_bitmap_get(struct qsm_image *img, unsigned index, struct qsm_bitmap_info *out);
/* Have bitmap `index`'s bits in memory to read them (an NBD export's
 * qemu:dirty-bitmap context): at once for a bitmap this session records
 * into, else read now, blocking (no request may be in flight).  A disabled
 * bitmap's bits never change; an enabled one's do as writes come, only
 * when this session records into it.  -ENOENT; -EBUSY for a bitmap in use
 * ("Bitmap 'b0' is inconsistent and cannot be used": QEMU's refusal). */
QSM_EXPORT int qsm_bitmap_load(struct qsm_image *img, unsigned index, char *err, size_t errlen);
/* A loaded bitmap from guest `offset` (< virtual size) on: *dirty for the
 * granule there, *len the bytes (at most `bytes`, never past the end of
 * the disk) whose granules all say the same.  In memory, never blocks.
 * -ENOENT when not loaded, -EINVAL. */
QSM_EXPORT int qsm_bitmap_extent(struct qsm_image *img, unsigned index, uint64_t offset,
				 uint64_t bytes, bool *dirty, uint64_t *len);
/* The index of the bitmap named `name`, or -ENOENT. */
QSM_EXPORT int qsm_bitmap_find(struct qsm_image *img, const char *name);
/*
 * Editing bitmaps, as qemu-img bitmap and QEMU's block-dirty-bitmap-*
 * commands do, in their words on failure (err).  Each is blocking (for
 * tools and maintenance: no request may be in flight, -EBUSY) on a qcow2
 * image open read-write (-EROFS; -ENOTSUP for raw), and durable when it
 * returns, but for the bits of a bitmap this session records into, which
 * the close stores as always.  Directory changes go to fresh clusters and
 * the header then names them (a crash leaves the old directory or the
 * new, whole); bits of a bitmap not recorded into are rewritten to fresh
 * clusters the same way.  A bitmap in use that this session does not
 * record into is refused (-EBUSY, "Bitmap 'b0' is inconsistent and cannot
 * be used") by all but remove.
 *  - add: a new bitmap, empty, of granularity bytes per bit (a power of 2,
 *    512 .. 2 GiB; 0: QEMU's default, the cluster size within 4 KiB .. 64
 *    KiB), enabled (recorded into from now on) or disabled.  Needs v3;
 *    -EEXIST for a name taken.  Indices of the others are kept.
 *  - remove: bitmap `index` gone with its clusters (indices after it move
 *    down by one); the last one gone takes the extension with it.
 *  - enable / disable: starts or stops recording (a disabled bitmap's
 *    bits are stored at once).
 *  - clear: every bit unset.
 *  - merge: bitmap dst |= bitmap src of src_img (img itself, or another
 *    image open read-only or read-write, of the same virtual size: else
 *    -EINVAL), granule by granule when their granularities differ.
 */
QSM_EXPORT int qsm_bitmap_add(struct qsm_image *img, const char *name, uint64_t granularity,
			      bool enabled, char *err, size_t errlen);
QSM_EXPORT int qsm_bitmap_remove(struct qsm_image *img, unsigned index, char *err,
				 size_t errlen);
QSM_EXPORT int qsm_bitmap_enable(struct qsm_image *img, unsigned index, bool on, char *err,
				 size_t errlen);
QSM_EXPORT int qsm_bitmap_clear(struct qsm_image *img, unsigned index, char *err,
				size_t errlen);
QSM_EXPORT int qsm_bitmap_merge(struct qsm_image *img, unsigned dst, struct qsm_image *src_img,
				unsigned src, char *err, size_t errlen);
/*
 * Take, apply and delete snapshots (qemu-img snapshot -c / -a / -d), as
 * QEMU does them and in qemu-img's words on failure (err, when non-NULL).
 *  - create: a new snapshot of the disk as it is now, named `name` (names
 *    need not be unique, "" is one), with the next free numeric id, the
 *    wall clock date, icount 0 (as qemu-img records them), and the VM
 *    state size and clock of opts (NULL: none, as qemu-img); -EFBIG past
 *    65536 snapshots or a 64 MiB table, -ERANGE when a refcount would
 *    overflow (refcount_bits too narrow, e.g. 1: nothing changed then).
 *  - apply: the disk becomes the snapshot's, its virtual size too (QEMU
 *    7.2 resizes the image to the snapshot's disk size); what only the old
 *    state referenced is freed.
 *  - delete: the snapshot is gone and what only it referenced is freed.
 *  - apply finds `id_or_name` by id first, then by name; delete finds
 *    `name` by name only (qemu-img's rules; -ENOENT, in its words).
 *
 * Live.  The _async forms may be called while requests are in flight and
 * return at once: 0 (cb runs from the loop when the operation is over,
 * never from inside the call; err, which must stay valid until then, holds
 * the message of a failure) or a refusal (-errno, err set, cb not called):
 * -EBUSY while another snapshot operation runs (one at a time), -ESHUTDOWN
 * once the image is closing, and the refusals below.  What is held, and for
 * how long:
 *  - create and delete: write-zeroes, discards, compressed writes, and
 *    reads when copy-on-read is on, submitted after the call, wait, not
 *    started, until the operation is over; it first waits for the requests
 *    already started that may change the mapping or refcounts (those kinds
 *    and writes) to complete (their L2 updates done), then runs: one
 *    write-back batch, the refcount and COPIED passes (one L2 table at a
 *    time, through the L2 cache), the new snapshot table, the header (each
 *    step made durable before the next, four to five batches in all).
 *    Reads, block status and flushes keep running all along, and so do
 *    writes submitted after the call, as far as they write in place (into
 *    clusters the active disk does not share with a snapshot): a write
 *    comes to a cluster it must allocate or copy, it waits there until the
 *    operation is over.  A create, once its COPIED pass is done, waits for
 *    the writes running in place and holds every new write from then on.
 *    A create is a snapshot of the disk with every write completed before
 *    the call in it, none submitted after its callback, and of the writes
 *    in between: those that completed before the callback, whole; the
 *    others not, or in part (the clusters they wrote in place before one
 *    made them wait), as a crash at that moment could leave them.
 *  - apply: every request submitted after the call waits, and the apply
 *    waits for every one already started: the disk changes under them.
 * The held requests then start in the order they were submitted (writes
 * fail with -EIO if the operation failed part way, see below).  Closing
 * the image waits for the operation.  The blocking forms submit the
 * operation and run the image's loop until it is over: they must not be
 * called from a qsm callback (-EDEADLK).
 *
 * Crash safety (sm/snapops.c): a crash at any write leaves the image as
 * before or as after the call, up to leaked clusters and COPIED flags that
 * a repair mends; on v3 the dirty bit is set for the duration, so the next
 * read-write open (QEMU's or qsm's) repairs it.  Refused: raw images
 * (-ENOTSUP), read-only ones (-EBADF); in the sticky error states,
 * -ENOMEDIUM once corrupt, -EIO after a failed metadata write (a failure in
 * the middle of an operation enters that state too).
 */
/* create's options (NULL: a disk-only snapshot, as qemu-img takes one).
 * With vm_state_size, the snapshot keeps bytes [0, vm_state_size) of the
 * VM-state area as the caller wrote them before the call
 * (qsm_vmstate_writev, below), and the active copy is then discarded, as
 * QEMU's savevm does: after an apply, qsm_vmstate_readv reads it back. */
struct qsm_snapshot_opts {
	size_t struct_size;       /* sizeof(struct qsm_snapshot_opts): see "ABI" above */
	uint64_t vm_state_size;   /* bytes of VM state kept with the snapshot (0: none) */
	uint64_t vm_clock_nsec;   /* the guest clock when taken */
};
QSM_EXPORT int qsm_snapshot_create_async(struct qsm_image *img, const char *name,
					 const struct qsm_snapshot_opts *opts, char *err,
					 size_t errlen, qsm_cb cb, void *opaque);
QSM_EXPORT int qsm_snapshot_apply_async(struct qsm_image *img, const char *id_or_name,
					char *err, size_t errlen, qsm_cb cb, void *opaque);
QSM_EXPORT int qsm_snapshot_delete_async(struct qsm_image *img, const char *name, char *err,
					 size_t errlen, qsm_cb cb, void *opaque);
QSM_EXPORT int qsm_snapshot_create(struct qsm_image *img, const char *name, char *err,
				   size_t errlen);
QSM_EXPORT int qsm_snapshot_apply(struct qsm_image *img, const char *id_or_name, char *err,
				  size_t errlen);
QSM_EXPORT int qsm_snapshot_delete(struct qsm_image *img, const char *name, char *err,
				   size_t errlen);

/* --- VM state -------------------------------------------------------------- */
/*
 * The VM-state area: where a hypervisor saves the VM state of a snapshot
 * being taken and reads it back when one is applied (QEMU's
 * bdrv_save_vmstate/bdrv_load_vmstate; qemu-io's `write -b`, `read -b`).
 * As QEMU stores it, it is a range of guest addresses past the disk,
 * mapped through the active L1 table like the disk itself: it starts at
 * qsm_vmstate_offset(), the address of the first L1 entry after the
 * virtual size (the size rounded up to whole L2 tables, each mapping
 * cluster_size * cluster_size / 8 bytes).  A snapshot's L1 table is a copy
 * of the whole active one (l1_size covers the area), so the VM state
 * written before a snapshot is taken is the snapshot's, and deleting the
 * snapshot frees what only it referenced.
 *
 * qsm_vmstate_readv/qsm_vmstate_writev(img, pos, iov, iovcnt, cb, opaque)
 * are qsm_readv/qsm_writev at qsm_vmstate_offset() + pos, with the same
 * contract (never inline completion; errors at submit without callback;
 * the cache mode's durability; the sticky error states), except:
 *  - the range is not bounded by the virtual size (guest reads and writes
 *    past it are still refused with -EINVAL): a write's last byte must be
 *    mapped by an L1 table within QEMU's limit (32 MiB of entries), the
 *    table grown as below (-EFBIG when that growth would pass the limit,
 *    as QEMU refuses it, even where the entries needed would fit); a read
 *    may go anywhere below QEMU's BDRV_MAX_LENGTH, 2^63 - 2^30 (-EINVAL
 *    past it);
 *  - what was never written reads as zeros (with a backing file: what the
 *    backing image has at those addresses, zeros past its end, as QEMU);
 *    reads never copy-on-read;
 *  - a write that needs L1 entries past the table's end grows the table
 *    first (to QEMU's size: 1.5 times until it is large enough), without
 *    blocking: the call starts the growth and returns; the growth waits
 *    for the requests in flight, holds back every request submitted after
 *    it (this write first), writes the grown table to new clusters and
 *    the header naming it (durable, one write-back batch after the one
 *    that makes every L2 table durable), then releases the held requests
 *    in order, as a snapshot apply does (see "Live" above).  It may be
 *    called from a callback.  Refused with -EBUSY while a snapshot
 *    operation runs (create, apply, delete); a write inside the table
 *    never waits.  A failure of the move after the new table was
 *    allocated puts the image in the sticky -EIO state, as a failed
 *    resize does, and the held writes fail;
 *  - raw images have no VM-state area: -ENOTSUP (offset 0).
 */
QSM_EXPORT uint64_t qsm_vmstate_offset(struct qsm_image *img);
QSM_EXPORT int qsm_vmstate_readv(struct qsm_image *img, uint64_t pos, const struct iovec *iov,
				 int iovcnt, qsm_cb cb, void *opaque);
QSM_EXPORT int qsm_vmstate_writev(struct qsm_image *img, uint64_t pos, const struct iovec *iov,
				  int iovcnt, qsm_cb cb, void *opaque);
/* The backing image (opened read-only on the same loop, owned by img), or
 * NULL when there is none or it was not opened (no_backing). */
QSM_EXPORT struct qsm_image *qsm_get_backing(struct qsm_image *img);
/* A sentence explaining the image's last error (corruption found: the
 * first finding, which is the cause; feature not supported; write-back
 * failure), or "" when there was none.  When the
 * image has none, the first error of its backing chain (a corrupt backing
 * file fails the reads that fall through to it). */
QSM_EXPORT const char *qsm_image_error(struct qsm_image *img);
/* The message of an image this session marked corrupt is the reason (in
 * QEMU's words where QEMU detects the same thing, e.g. "Refblock offset
 * 0x20200 unaligned (reftable index: 0)") followed by this suffix, so a
 * tool can print the reason as QEMU does ("qcow2: Marking image as corrupt:
 * REASON; further corruption events will be suppressed"). */
#define QSM_CORRUPT_SUFFIX "; the image is marked corrupt and accepts no more writes"

struct qsm_stats {
	uint64_t reads, writes, flushes, discards, zero_writes; /* requests completed */
	uint64_t bytes_read, bytes_written;
	uint64_t io_flushes;        /* fdatasync calls issued */
	uint64_t meta_writes;       /* metadata write operations issued */
	uint64_t wb_batches;        /* write-back batches */
	uint64_t frozen;            /* requests that waited on an L2 allocation */
	uint64_t alloc_waits;       /* requests that waited on another's cluster allocation */
	uint64_t free_waits;        /* allocations that waited for a batch to release freed clusters (FREE_WAIT) */
	uint64_t alloc_joins;       /* writes into clusters another request was allocating */
	uint64_t l2_hits, l2_misses;
	uint64_t clusters_allocated;
	uint64_t compressed_clusters; /* clusters stored compressed */
	uint64_t compress_fallbacks;  /* compressed-write clusters stored as is (no gain) */
	/* Fields below were appended after 0.1.0 (see qsm_get_stats). */
	/* Refcount block cache (refcount-cache-size), as l2_hits/l2_misses:
	 * lookups of a resident block, lookups that issued a read, blocks
	 * dropped from the cache to make room, and blocks that became
	 * readable (reads completed; blocks known all free and made resident
	 * without a read are not counted).  0 for raw images. */
	uint64_t refblock_hits, refblock_misses;
	uint64_t refblock_evictions, refblock_loads;
	/* Writes beside a live snapshot create or delete (see "Live" below):
	 * those begun while it ran, written in place without waiting, and
	 * among them those that came to a cluster to allocate or copy and
	 * waited for it after all. */
	uint64_t snap_late_writes, snap_deferred;
};
/*
 * Counters since open.  struct qsm_stats has no struct_size (it predates
 * the rule), so the macro passes the size the caller was compiled with and
 * the library fills only that much: a program built against older headers
 * (calling the function qsm_get_stats directly) gets the 0.1.0 fields.
 */
QSM_EXPORT void qsm_get_stats_sized(struct qsm_image *img, struct qsm_stats *st, size_t size);
QSM_EXPORT void qsm_get_stats(struct qsm_image *img, struct qsm_stats *st);
#define qsm_get_stats(img, st) qsm_get_stats_sized((img), (st), sizeof(*(st)))

/* --- Tracing ------------------------------------------------------------- */
/*
 * One state transition of one request, reported by the dispatcher before the
 * request enters `to`.  Strings are static.  The run and metadata fields
 * describe the request as `from` left it (what that state found, loaded or
 * allocated), 0 when not applicable:
 *  - L2_LOOKUP --cache miss--> L2_LOAD: l2_offset is the table to be loaded;
 *  - L2_ALLOC --> *: l2_offset is the new table;
 *  - CLUSTER_ALLOC --> *: host_offset is the first cluster allocated;
 *  - DATA_READ/DATA_WRITE/ALLOC_WRITE/JOIN_WRITE --> *: host_offset is where
 *    the run's data is;
 *  - WB_* level states (WRITEBACK machine): meta_offset is the level's first
 *    write, meta_writes how many it issued (WB_COLLECT: the whole batch).
 * wait_for names the request waited on, on the transitions into and out of
 * FROZEN, ALLOC_WAIT (the request allocating the L2 table or the clusters),
 * JOIN_WRITE/JOIN_WAIT (the allocation joined) and out of DURABLE_WAIT (the
 * write-back batch that completed it); 0 elsewhere or when not known (a
 * hook installed while requests were in flight).  Request ids are per image.
 */
struct qsm_trace_event {
	uint64_t req_id;
	const char *kind;      /* "read", "write", ... */
	uint64_t offset, bytes;   /* the request */
	const char *from, *to, *event;   /* event: its label ("cache miss") */
	int ret;
	uint64_t time_ns;      /* CLOCK_MONOTONIC */
	uint64_t meta_offset;  /* host offset involved (L2 table, cluster), or 0 */
	const char *event_name;        /* the table's name of the event ("CACHE_MISS") */
	uint64_t run_offset, run_bytes; /* the current cluster run (guest bytes) */
	uint64_t l2_offset;    /* the run's L2 table (host offset) */
	uint64_t host_offset;  /* the run's data or newly allocated clusters */
	uint64_t wait_for;     /* request id waited on */
	uint64_t meta_writes;  /* write-back: metadata writes of the level */
	/* The image at this instant (for timelines and counters). */
	uint64_t in_flight;    /* live requests, write-back batches included */
	uint64_t dirty_l2;     /* dirty L2 tables in the cache */
	bool dirty_refcounts;  /* refcount blocks or table changed in memory only */
	uint64_t io_flushes;   /* fdatasync calls issued so far */
	/* WRITEBACK machine, from the transition out of WB_COLLECT on: what
	 * the batch writes, per level (refcount blocks, refcount table
	 * writes, header, L2 table writes, L1 ranges); 0 before and elsewhere. */
	uint64_t wb_refblocks, wb_reftable, wb_header, wb_l2, wb_l1;
};
typedef void (*qsm_trace_fn)(void *opaque, const struct qsm_trace_event *ev);
/* Install (or with fn NULL remove) the trace hook.  No cost when unset. */
QSM_EXPORT void qsm_set_trace(struct qsm_image *img, qsm_trace_fn fn, void *opaque);

/* --- Creating images ----------------------------------------------------- */
/* (Declared outside the structure so that C++ sees it at namespace scope.) */
enum qsm_prealloc {
	QSM_PREALLOC_OFF,       /* nothing (default) */
	QSM_PREALLOC_METADATA,  /* every L2 table and data cluster allocated, file sparse */
	QSM_PREALLOC_FALLOC,    /* ... and the file's space reserved (fallocate) */
	QSM_PREALLOC_FULL,      /* ... and the data clusters written with zeros */
};
struct qsm_create_opts {
	size_t struct_size;         /* sizeof(struct qsm_create_opts): see "ABI" above */
	uint64_t size;
	uint64_t cluster_size;      /* 0: 64 KiB */
	unsigned compat;            /* 2 (0.10) or 3 (1.1, default when 0) */
	unsigned refcount_bits;     /* 0: 16 */
	bool lazy_refcounts;
	const char *backing_file;
	const char *backing_format;
	enum qsm_prealloc prealloc;
	enum qsm_compression compression; /* of compressed clusters; zstd needs compat 3 */
};
/* "off", "metadata", "falloc", "full" -> mode; -EINVAL. */
QSM_EXPORT int qsm_prealloc_parse(const char *s, enum qsm_prealloc *out);
/* Create the image file at path (truncated when it exists), blocking; err
 * explains a failure.  Backing file names are recorded as given (nothing is
 * opened or probed). */
QSM_EXPORT int qsm_create(const char *path, const struct qsm_create_opts *o, char *err, size_t errlen);
/* Same on an open, writable I/O handle (any backend: qsm_io_new), which is
 * truncated to the new image and stays the caller's, ready for
 * qsm_open_io().  Blocking (qsm_io.h: the handle's blocking calls are used);
 * no request may be in flight on it. */
QSM_EXPORT int qsm_create_io(struct qsm_io *io, const struct qsm_create_opts *o, char *err,
			     size_t errlen);

/* --- Checking and repairing images ---------------------------------------- */
#define QSM_REPAIR_LEAKS  0x1   /* free leaked clusters (qemu-img check -r leaks) */
#define QSM_REPAIR_ERRORS 0x2   /* also fix corruptions (-r all) */
struct qsm_check_report {
	size_t struct_size;         /* set by the caller: sizeof(struct qsm_check_report) */
	/* Found before repair, as qemu-img check counts them. */
	uint64_t corruptions, leaks;
	uint64_t check_errors;      /* metadata that could not be read */
	uint64_t corruptions_fixed, leaks_fixed;
	/* What remains after repair (without repair flags: what was found). */
	uint64_t corruptions_left, leaks_left;
	bool incomplete;            /* the check could not finish (error says why) */
	int error;                  /* with incomplete: 0 or -errno */
	uint64_t image_end_offset;  /* bytes of the file in use */
	uint64_t allocated_clusters, fragmented_clusters, compressed_clusters;
};
/*
 * Check the qcow2 image at path (or on io, which stays the caller's) as
 * qemu-img check does, and with repair flags repair it.  Blocking; the
 * image must not be open in an engine.  One line per finding, in qemu-img
 * check's wording, goes to log (may be NULL).  Returns qemu-img check's
 * exit code: 0 clean (or all repaired), 1 check incomplete, 2 corruptions
 * left, 3 only leaks left; or -errno when the check could not start (not a
 * qcow2 image, unreadable header, bad arguments: err says why).
 */
QSM_EXPORT int qsm_check(const char *path, unsigned repair, struct qsm_check_report *report,
			 FILE *log, char *err, size_t errlen);
QSM_EXPORT int qsm_check_io(struct qsm_io *io, unsigned repair, struct qsm_check_report *report,
			    FILE *log, char *err, size_t errlen);

/* --- Synchronous convenience layer for tools ------------------------------ */
/* Each runs the image's event loop until the request completes.  Use only
 * from code that owns the loop (not from inside a callback). */
QSM_EXPORT int qsm_sync_pread(struct qsm_image *img, void *buf, size_t len, uint64_t offset);
QSM_EXPORT int qsm_sync_pwrite(struct qsm_image *img, const void *buf, size_t len, uint64_t offset);
QSM_EXPORT int qsm_sync_flush(struct qsm_image *img);
QSM_EXPORT int qsm_sync_discard(struct qsm_image *img, uint64_t offset, uint64_t bytes);
QSM_EXPORT int qsm_sync_write_compressed(struct qsm_image *img, const void *buf, size_t len,
			      uint64_t offset);
QSM_EXPORT int qsm_sync_write_zeroes(struct qsm_image *img, uint64_t offset, uint64_t bytes, unsigned flags);
QSM_EXPORT int qsm_sync_block_status(struct qsm_image *img, uint64_t offset, uint64_t bytes,
			  struct qsm_extent *out);
QSM_EXPORT struct event_base *qsm_image_base(struct qsm_image *img);

QSM_EXPORT const char *qsm_strerror(int err); /* strerror(-err), thread-safe */

#ifdef __cplusplus
}
#endif

#endif
