/*
 * io/null.h: the null backend (QEMU's null-co driver), io/null.c.
 */
#ifndef QSM_IO_NULL_H
#define QSM_IO_NULL_H

#include <stdbool.h>
#include <stdint.h>

struct event_base;
struct qsm_io;

/* Default size of a null device, as QEMU's null-co: 1 GiB. */
#define QSM_IO_NULL_DEFAULT_SIZE (1ull << 30)

/*
 * A handle on a device of `size` bytes with no storage: writes, zero
 * writes, discards and flushes do nothing and succeed; reads fill the
 * buffer with zeros when read_zeroes, else leave it untouched (QEMU's
 * read-zeroes=off); truncate is -ENOTSUP.  Every request completes
 * latency_ns after it was submitted (0: at once, still from the loop).
 * flags: QSM_IO_RDONLY.  0, or -ENOMEM.
 */
int qsm_io_open_null(struct event_base *base, uint64_t size, bool read_zeroes,
		     uint64_t latency_ns, int flags, struct qsm_io **out);

#endif
