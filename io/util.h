/*
 * io/util.h: small helpers shared by every layer (io/ is the bottom layer, so
 * anything may include this).  No qcow2 knowledge here.
 */
#ifndef QSM_UTIL_H
#define QSM_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>  /* struct iovec in the prototypes below */

#define container_of(ptr, type, member)                                        \
	((type *)(void *)((char *)(ptr) - offsetof(type, member)))

#define QSM_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define QSM_MIN(a, b) ((a) < (b) ? (a) : (b))
#define QSM_MAX(a, b) ((a) > (b) ? (a) : (b))
#define QSM_DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
/* Power-of-two alignment. */
#define QSM_ALIGN_DOWN(n, a) ((n) & ~((uint64_t)(a) - 1))
#define QSM_ALIGN_UP(n, a) QSM_ALIGN_DOWN((n) + (a) - 1, (a))
#define QSM_IS_ALIGNED(n, a) (((n) & ((uint64_t)(a) - 1)) == 0)

#define QSM_LIKELY(x) __builtin_expect(!!(x), 1)
#define QSM_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Total length of an iovec array. */
size_t qsm_iov_size(const struct iovec *iov, int iovcnt);
/* Copy between a flat buffer and an iovec array, starting `skip` bytes into
 * the iovec; returns bytes copied. */
size_t qsm_iov_to_buf(const struct iovec *iov, int iovcnt, size_t skip, void *buf, size_t len);
size_t qsm_iov_from_buf(const struct iovec *iov, int iovcnt, size_t skip, const void *buf, size_t len);
size_t qsm_iov_memset(const struct iovec *iov, int iovcnt, size_t skip, int c, size_t len);
/* Fill dst (capacity dst_cap entries) with the part [skip, skip+len) of src.
 * Returns the entry count, or -1 when dst_cap is too small. */
int qsm_iov_slice(struct iovec *dst, int dst_cap, const struct iovec *src, int srccnt,
		  size_t skip, size_t len);

/* Format an error message into err[errlen] (nothing when err is NULL or
 * errlen 0): the one way every layer fills a caller's error buffer. */
void qsm_set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/*
 * Import a caller's growable structure (first member `size_t struct_size`,
 * fields only ever appended; qsm.h "ABI") into dst, this library's full
 * version: the src_size bytes the caller has are copied, the rest of dst
 * zeroed (defaults), dst's struct_size set to dst_size.  src_size 0 is read
 * as size_if_zero (the size in the first release with struct_size).  A src
 * larger than dst must have zeros in the bytes dst lacks.  src NULL: all
 * defaults.  0, or -EINVAL with err naming `what`.
 */
int qsm_opts_import(void *dst, size_t dst_size, const void *src, size_t src_size,
		    size_t size_if_zero, const char *what, char *err, size_t errlen);

/* Monotonic clock in nanoseconds. */
uint64_t qsm_now_ns(void);

/* xoshiro256** PRNG: small, fast, seedable; every seeded test uses it. */
struct qsm_rng {
	uint64_t s[4];
};
void qsm_rng_seed(struct qsm_rng *r, uint64_t seed);
uint64_t qsm_rng_next(struct qsm_rng *r);
/* Uniform in [0, n); n > 0. */
uint64_t qsm_rng_below(struct qsm_rng *r, uint64_t n);

#endif
