/*
 * sm/vmstate.c: the VM-state area (qsm.h, "VM state"): qsm_vmstate_readv
 * and qsm_vmstate_writev, the READ and WRITE machines at addresses past the
 * virtual size.
 *
 * Where it is (QEMU 7.2, block/qcow2.c qcow2_vm_state_offset): the guest
 * address of the first L1 entry after the disk,
 *     vmstate_offset = ceil(virtual size / span) * span,
 *     span = l2_entries * cluster_size (the bytes one L2 table maps),
 * mapped through the active L1 and L2 tables like the disk: no request
 * state of its own.  A request of the area is an ordinary READ or WRITE
 * request (flag QSM_REQ_VMSTATE) whose range is checked here instead of
 * against the virtual size.
 *
 * Invariants:
 *  1. A machine request never goes past the L1 table: every run it makes
 *     has l1_index < l1_size (the dispatcher's run_ok), as for the disk.
 *  2. So a write that needs L1 entries past the table has the table grown
 *     first: submitting it starts an L1 growth (sm/snapops.c, OP_GROW: the
 *     grown copy to new clusters, then the header naming it), which holds
 *     every request submitted after it, this write included, and waits for
 *     those already running: the move replaces img->l1 and the header's
 *     L1 fields, which running requests read.  -EBUSY only while another
 *     snapshot operation runs.
 *  3. A read past the table is cut at its end: the machine request reads
 *     the part inside it (0 bytes when none: the machine goes START ->
 *     DONE), and delivers the completion from the loop, never inline.
 *     Past the end no L2 table maps anything: without a backing image, or
 *     past the end of the backing image, those bytes are zeros, filled
 *     into the caller's buffer at submit; where the backing image reaches
 *     past the table, they are its data (QEMU reads them there), read by a
 *     request of the backing image beside the machine's (struct vm_read),
 *     which the close waits for (img->vm_backing_reads).
 *  4. The table never shrinks while the image is open except by snapshot
 *     apply (nothing in flight), so invariant 1 holds for a request's life.
 */
#include <assert.h>
#include <errno.h>
#include <event2/event.h>
#include <stdint.h>
#include <stdlib.h>

#include "metadata/l1.h"
#include "sm/sm.h"

/* QEMU's largest request end, BDRV_MAX_LENGTH: INT64_MAX aligned down to
 * 1 GiB (BDRV_MAX_ALIGNMENT). */
#define VMSTATE_MAX_END (((uint64_t)INT64_MAX >> 30) << 30)

static uint64_t span_of(const struct qsm_image *img)
{
	return img->l2_entries << img->cluster_bits;
}

uint64_t qsm_vmstate_offset(struct qsm_image *img)
{
	if (!img || img->raw)
		return 0;
	uint64_t span = span_of(img);
	return QSM_DIV_ROUND_UP(img->hdr.size, span) * span;
}

/* The VM-state range [*start, +bytes) of pos and iov, or -EINVAL. */
static int vmstate_range(struct qsm_image *img, uint64_t pos, const struct iovec *iov,
			 int iovcnt, uint64_t *start, uint64_t *bytes)
{
	if (!img || iovcnt < 0 || (iovcnt > 0 && !iov))
		return -EINVAL;
	if (img->closing)
		return -ESHUTDOWN;
	if (img->raw)
		return -ENOTSUP; /* a raw file has no room past the disk */
	uint64_t base = qsm_vmstate_offset(img);
	*bytes = qsm_iov_size(iov, iovcnt);
	if (pos > VMSTATE_MAX_END - base || *bytes > VMSTATE_MAX_END - base - pos)
		return -EINVAL;
	*start = base + pos;
	return 0;
}

/*
 * A read that reaches past the L1 table over a backing image whose virtual
 * size reaches past it too (invariant 3): two requests, the machine's on
 * this image for the part inside the table (0 bytes when none) and one of
 * the backing image for its data past the table (zeros after its end,
 * filled at submit); the caller's callback runs once both are done, with
 * the first error.
 */
struct vm_read {
	struct qsm_image *img;
	qsm_cb cb;
	void *opaque;
	unsigned pending;         /* requests not completed yet */
	int ret;
	int iovcnt;
	struct iovec iov[];       /* the backing part of the caller's iovec */
};

static void vm_read_put(struct vm_read *vr, int ret)
{
	if (ret < 0 && !vr->ret)
		vr->ret = ret;
	if (--vr->pending)
		return;
	vr->cb(vr->opaque, vr->ret);
	free(vr);
}

static void vm_read_cb(void *opaque, int ret)
{
	vm_read_put(opaque, ret);
}

static void vm_backing_cb(void *opaque, int ret)
{
	struct vm_read *vr = opaque;
	struct qsm_image *img = vr->img;
	assert(img->vm_backing_reads > 0);
	img->vm_backing_reads--;
	vm_read_put(vr, ret);
	qsm_close_wake(img); /* a close may wait for this read */
}

int qsm_vmstate_readv(struct qsm_image *img, uint64_t pos, const struct iovec *iov, int iovcnt,
		      qsm_cb cb, void *opaque)
{
	uint64_t start, bytes;
	int ret = vmstate_range(img, pos, iov, iovcnt, &start, &bytes);
	if (ret < 0)
		return ret;
	uint64_t cover = img->l1_size * span_of(img); /* the L1 table's reach */
	uint64_t in = start >= cover ? 0 : QSM_MIN(bytes, cover - start);
	uint64_t past = start + in, bsize = img->backing ? img->backing->hdr.size : 0;
	uint64_t blen = past < bsize ? QSM_MIN(bytes - in, bsize - past) : 0;

	/* Invariant 3: past the table, zeros, or the backing image's data
	 * up to its end. */
	if (in + blen < bytes)
		qsm_iov_memset(iov, iovcnt, in + blen, 0, bytes - in - blen);
	if (!blen)
		return qsm_vmstate_submit(img, QSM_M_READ, start, iov, iovcnt, in, cb, opaque);
	struct vm_read *vr = malloc(sizeof(*vr) + (size_t)iovcnt * sizeof(struct iovec));
	if (!vr)
		return -ENOMEM;
	*vr = (struct vm_read){ .img = img, .cb = cb, .opaque = opaque, .pending = 1 };
	vr->iovcnt = qsm_iov_slice(vr->iov, iovcnt, iov, iovcnt, in, blen);
	assert(vr->iovcnt > 0);
	ret = qsm_vmstate_submit(img, QSM_M_READ, start, iov, iovcnt, in, vm_read_cb, vr);
	if (ret < 0) {
		free(vr);
		return ret;
	}
	/* Accepted: from here on errors go to the callback. */
	vr->pending++;
	img->vm_backing_reads++;
	ret = qsm_readv(img->backing, past, vr->iov, vr->iovcnt, vm_backing_cb, vr);
	if (ret < 0) {
		img->vm_backing_reads--;
		vr->ret = ret;
		vr->pending--;
	}
	return 0;
}

/* QEMU's qcow2_grow_l1_table without exact_size: the table grows by half
 * (rounded up) until it has min_size entries. */
static uint64_t l1_grown_size(uint64_t cur, uint64_t min_size)
{
	uint64_t n = cur ? cur : 1;
	if (min_size > QCOW2_MAX_L1_BYTES / 8)
		return min_size; /* refused anyway; no loop over huge sizes */
	while (n < min_size)
		n = QSM_DIV_ROUND_UP(n * 3, 2);
	return n;
}

/* Invariant 2: the L1 table made to reach `end` before the write runs:
 * the growth is an operation of the SNAPSHOT machine (qsm_snap_grow_l1),
 * which holds the write back (HELD) until the table has moved. */
static int vmstate_grow(struct qsm_image *img, uint64_t end)
{
	uint64_t need = QSM_DIV_ROUND_UP(end, span_of(img));
	/* QEMU refuses the grown size past QCOW_MAX_L1_SIZE, even when the
	 * entries needed would fit. */
	uint64_t n = l1_grown_size(img->l1_size, need);
	if (need > QCOW2_MAX_L1_BYTES / 8 || n > QCOW2_MAX_L1_BYTES / 8)
		return -EFBIG;
	return qsm_snap_grow_l1(img, n);
}

int qsm_vmstate_writev(struct qsm_image *img, uint64_t pos, const struct iovec *iov,
		       int iovcnt, qsm_cb cb, void *opaque)
{
	uint64_t start, bytes;
	int ret = vmstate_range(img, pos, iov, iovcnt, &start, &bytes);
	if (ret < 0)
		return ret;
	if ((ret = qsm_check_writable(img)) < 0)
		return ret;
	uint64_t end = start + bytes;
	if (bytes && QSM_DIV_ROUND_UP(end, span_of(img)) > img->l1_size &&
	    (ret = vmstate_grow(img, end)) < 0)
		return ret;
	return qsm_vmstate_submit(img, QSM_M_WRITE, start, iov, iovcnt, bytes, cb, opaque);
}

int qsm_vmstate_discard(struct qsm_image *img, uint64_t pos, uint64_t bytes, qsm_cb cb,
			void *opaque)
{
	if (!img)
		return -EINVAL;
	if (img->closing)
		return -ESHUTDOWN;
	if (img->raw)
		return -ENOTSUP;
	uint64_t base = qsm_vmstate_offset(img), cover = img->l1_size * span_of(img);
	if (pos > VMSTATE_MAX_END - base || bytes > VMSTATE_MAX_END - base - pos)
		return -EINVAL;
	uint64_t start = base + pos, end = QSM_ALIGN_UP(start + bytes, img->cluster_size);
	/* Invariant 1; a request of 0 bytes still completes from the loop. */
	uint64_t n = start >= cover ? 0 : QSM_MIN(end, cover) - start;
	return qsm_vmstate_submit(img, QSM_M_DISCARD, start, NULL, 0, n, cb, opaque);
}
