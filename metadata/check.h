/*
 * metadata/check.h: consistency check and repair of a qcow2 image
 * (`qsm check`, and the repair a dirty image gets when opened read-write).
 *
 * The check runs on an image that no engine has open, through the blocking
 * io/ helpers (like `qemu-img check`, which opens with BDRV_O_CHECK).  It
 * walks the header, the active L1/L2 tables, every snapshot's L1/L2 tables,
 * the refcount table and blocks, counts the references to every host
 * cluster and compares them with the stored refcounts, with qemu-img
 * check's rules, wording and counts (tools/doc/design.md, "Checking and
 * repair"):
 *   - refcount < references: corruption ("ERROR cluster N refcount=a reference=b");
 *   - refcount > references: leak ("Leaked cluster N refcount=a reference=b");
 *   - COPIED flag != (refcount == 1): corruption ("ERROR OFLAG_COPIED ...");
 *   - entries pointing past the end of the file or at unaligned offsets,
 *     metadata overlapping metadata, reserved bits: corruption;
 *   - the snapshot table, read after the header as qemu-img check reads it
 *     (qcow2_check_read_snapshot_table): a v3 entry without disk_size
 *     ("snapshot table entry I is incomplete"), extra data over 1024
 *     bytes, more than 65536 entries, a table over 64 MiB: corruptions, the
 *     last three stopping the check (res->report) unless -r all; a
 *     snapshot L1 table unaligned or too large: corruption ("snapshot
 *     table entry corrupted"), its references not counted.
 * Memory stays bounded on large images: the reference counts are kept per
 * host cluster of the *file* (2 bytes each, as QEMU), tables are streamed.
 *
 * Repair (QSM_CHECK_FIX_LEAKS, QSM_CHECK_FIX_ERRORS as -r leaks / -r all):
 * leaks freed; refcounts too low raised; COPIED fixed; entries pointing
 * outside the file or at unaligned offsets cleared (those guest clusters then
 * read as zeros; each is reported); refcount structures rebuilt when they are
 * themselves damaged; the snapshot table (-r all, as qemu-img): the entries
 * past 65536 or past 64 MiB dropped (the header's count written at once),
 * extra data cut to 1024 bytes, incomplete entries completed (disk size
 * filled in), the table rewritten into free clusters after the refcount
 * pass (qcow2_check_fix_snapshot_table); an unaligned or oversized
 * snapshot L1 table stays (qemu-img leaves it too).  COPIED flags are
 * judged on the refcounts the whole repair left (after the table rewrite,
 * unlike qemu), so corruptions_left == 0 means a new check finds none;
 * what a repair cannot fix stays in corruptions_left.  A repair is
 * crash-safe: every step keeps refcount >= references on disk, so an
 * interrupted repair leaves an image the next repair still fixes.  With fix flags set, the dirty bit is cleared at the end
 * when no corruption remains.
 */
#ifndef QSM_CHECK_H
#define QSM_CHECK_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "io/io.h"

#define QSM_CHECK_FIX_LEAKS  0x1
#define QSM_CHECK_FIX_ERRORS 0x2
/* The open-time repair of a dirty image (sm/image.c): the snapshot table is
 * read as the open reads it, before the repair (QEMU's qcow2_do_open reads
 * it first and refuses a broken one), with the open's per-entry rules
 * (qcow2_snapshot_validate) too: a refusal makes qsm_check_image return its
 * -errno and message before anything is written, nothing dropped or cut;
 * incomplete v3 entries are still rewritten (QEMU's open-time check does). */
#define QSM_CHECK_OPENING    0x4

struct qsm_check_result {
	/* Found (before repair) and repaired, as qemu-img check counts them. */
	uint64_t corruptions, leaks, check_errors;
	uint64_t corruptions_fixed, leaks_fixed;
	/* After repair: what remains. */
	uint64_t corruptions_left, leaks_left;
	/* Among the corruptions: clusters whose refcount (before repair) is
	 * below the references to them, the kind that lets a cluster in use
	 * be allocated again (the rest: COPIED flags, bad entries). */
	uint64_t refcounts_low;
	bool rebuilt;                 /* refcount structures were rebuilt */
	bool incomplete;              /* check could not finish (exit 1) */
	int error;                    /* with incomplete: the -errno that stopped it
	                               * (qemu-img: "Check failed: <strerror>") */
	char report[512];             /* with incomplete, or "": what qemu-img reports
	                               * through error_report() before it stops (its
	                               * first line takes the program's name as prefix,
	                               * the hint lines after "\n" do not) */
	/* Statistics printed by qemu-img check. */
	uint64_t image_end_offset;
	uint64_t total_clusters;      /* guest clusters */
	uint64_t allocated_clusters, fragmented_clusters, compressed_clusters;
	uint64_t zeroed_entries;      /* L1/L2 entries cleared by -r all */
};

/*
 * Check (and with fix flags, repair) the image on io.  Messages, one per
 * finding, in qemu-img check's wording, go to `log` (may be NULL).  Returns 0
 * when the check ran (look at res for the verdict), or -errno when it could
 * not (unreadable, not qcow2: err says why).  Never writes unless fix != 0;
 * a read-only io handle with fix != 0 is -EBADF.
 */
int qsm_check_image(struct qsm_io *io, unsigned fix, struct qsm_check_result *res, FILE *log,
		    char *err, size_t errlen);

/* qemu-img check's exit code for a result: 0 clean (or all repaired),
 * 1 check incomplete, 2 corruptions left, 3 only leaks left. */
int qsm_check_exit_code(const struct qsm_check_result *res);

#endif
