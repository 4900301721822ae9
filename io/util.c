/* io/util.c: iovec helpers, clock and PRNG (see util.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include "io/util.h"

size_t qsm_iov_size(const struct iovec *iov, int iovcnt)
{
	size_t n = 0;
	for (int i = 0; i < iovcnt; i++)
		n += iov[i].iov_len;
	return n;
}

/* Walk iov from `skip`, calling op on each piece; shared by the copy helpers. */
#define IOV_WALK(iov, iovcnt, skip, len, PIECE)                                \
	size_t done = 0;                                                       \
	for (int i = 0; i < (iovcnt) && done < (len); i++) {                   \
		size_t l = (iov)[i].iov_len;                                   \
		if ((skip) >= l) {                                             \
			(skip) -= l;                                           \
			continue;                                              \
		}                                                              \
		size_t n = QSM_MIN(l - (skip), (len) - done);                  \
		char *p = (char *)(iov)[i].iov_base + (skip);                  \
		PIECE;                                                         \
		done += n;                                                     \
		(skip) = 0;                                                    \
	}                                                                      \
	return done;

size_t qsm_iov_to_buf(const struct iovec *iov, int iovcnt, size_t skip, void *buf, size_t len)
{
	IOV_WALK(iov, iovcnt, skip, len, memcpy((char *)buf + done, p, n));
}

size_t qsm_iov_from_buf(const struct iovec *iov, int iovcnt, size_t skip, const void *buf, size_t len)
{
	IOV_WALK(iov, iovcnt, skip, len, memcpy(p, (const char *)buf + done, n));
}

size_t qsm_iov_memset(const struct iovec *iov, int iovcnt, size_t skip, int c, size_t len)
{
	IOV_WALK(iov, iovcnt, skip, len, memset(p, c, n));
}

int qsm_iov_slice(struct iovec *dst, int dst_cap, const struct iovec *src, int srccnt,
		  size_t skip, size_t len)
{
	int cnt = 0;
	for (int i = 0; i < srccnt && len > 0; i++) {
		size_t l = src[i].iov_len;
		if (skip >= l) {
			skip -= l;
			continue;
		}
		if (cnt == dst_cap)
			return -1;
		size_t n = QSM_MIN(l - skip, len);
		dst[cnt].iov_base = (char *)src[i].iov_base + skip;
		dst[cnt].iov_len = n;
		cnt++;
		len -= n;
		skip = 0;
	}
	return cnt;
}

void qsm_set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

uint64_t qsm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

void qsm_rng_seed(struct qsm_rng *r, uint64_t seed)
{
	for (int i = 0; i < 4; i++)
		r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

uint64_t qsm_rng_next(struct qsm_rng *r)
{
	uint64_t *s = r->s;
	uint64_t result = rotl(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

uint64_t qsm_rng_below(struct qsm_rng *r, uint64_t n)
{
	/* Lemire's multiply-shift; the tiny bias is irrelevant for tests. */
	return (uint64_t)(((__uint128_t)qsm_rng_next(r) * n) >> 64);
}

int qsm_opts_import(void *dst, size_t dst_size, const void *src, size_t src_size,
		    size_t size_if_zero, const char *what, char *err, size_t errlen)
{
	size_t n = src_size ? src_size : size_if_zero;

	memset(dst, 0, dst_size);
	*(size_t *)dst = dst_size;
	if (!src)
		return 0;
	if (n < sizeof(size_t)) {
		qsm_set_err(err, errlen, "%s: struct_size %zu is too small", what, n);
		return -EINVAL;
	}
	for (size_t i = dst_size; i < n; i++) {
		if (((const unsigned char *)src)[i]) {
			qsm_set_err(err, errlen, "%s: a field this libqsm does not know is set "
				    "(struct_size %zu, this library's %zu): built against newer headers?",
				    what, n, dst_size);
			return -EINVAL;
		}
	}
	memcpy((char *)dst + sizeof(size_t), (const char *)src + sizeof(size_t),
	       QSM_MIN(n, dst_size) - sizeof(size_t));
	return 0;
}
