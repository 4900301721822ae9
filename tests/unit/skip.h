/*
 * tests/unit/skip.h: how a Check suite of tests/unit reports a missing
 * prerequisite (qemu-img, io_uring, a tmpfs, ...) to ctest, instead of
 * passing without testing anything.
 *
 * The rule, for every binary of tests/unit:
 *  1. A case that cannot run here calls QSM_SKIP("why", ...) and returns at
 *     once.  That prints "SKIPPED: <tcase> (<file>:<line>): why" on stderr
 *     and counts the skip in memory shared with the runner (Check runs each
 *     case in a child process, so a plain global would be lost).  One call
 *     per case run (a loop test: per iteration).
 *  2. qsm_test_run(suite) runs the suite (CK_ENV verbosity) and returns 1
 *     when a case failed, 77 (ctest's SKIP_RETURN_CODE) when every case that
 *     ran skipped, 0 otherwise, the SKIPPED lines naming what did not run.
 *     No case run at all is a failure: a selection that matches nothing is
 *     a mistake, not a skip.
 *  3. So that a missing prerequisite shows as a skip in ctest rather than
 *     hide in a binary whose other cases pass, the cases that need one live
 *     in a TCase of their own tagged with it (QSM_TCASE_REQUIRES(tc, "uring"),
 *     "qemu-img", ...).  CMakeLists.txt finds the tags in the source and
 *     registers the binary as several ctest entries: unit/NAME without the
 *     tagged cases (CK_EXCLUDE_TAGS) and unit/NAME:TAG with only them
 *     (CK_INCLUDE_TAGS), all with SKIP_RETURN_CODE 77.  Running the binary
 *     by hand runs everything.
 *  4. A binary whose every case needs the prerequisite (test_check: qemu-img
 *     is its oracle) checks it in main and returns 77 at once, after a
 *     "SKIPPED:" line.
 * A skip inside an untagged case (a rare environment detail, e.g. a tmpfs
 * that accepts O_DIRECT) is still printed, but ctest sees the binary pass
 * on the strength of its other cases.
 */
#ifndef QSM_TEST_SKIP_H
#define QSM_TEST_SKIP_H

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

/* Skips counted by all the case processes: shared, anonymous. */
static unsigned *qsm_skips_;

static inline void qsm_skip_note_(const char *file, int line)
{
	const char *tc = tcase_name();
	fprintf(stderr, "SKIPPED: %s (%s:%d): ", tc ? tc : "?", file, line);
	if (qsm_skips_)
		__atomic_fetch_add(qsm_skips_, 1, __ATOMIC_SEQ_CST);
}

#define QSM_SKIP(...)                                                          \
	do {                                                                   \
		qsm_skip_note_(__FILE__, __LINE__);                            \
		fprintf(stderr, __VA_ARGS__);                                  \
		fputc('\n', stderr);                                           \
	} while (0)

/* The tag is also what CMakeLists.txt looks for (QSM_TCASE_REQUIRES(tc, "x")). */
#define QSM_TCASE_REQUIRES(tc, tag) tcase_set_tags((tc), (tag))

static inline int qsm_test_run(Suite *s)
{
	void *m = mmap(NULL, sizeof(unsigned), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	qsm_skips_ = m == MAP_FAILED ? NULL : m;
	if (!qsm_skips_) {
		perror("mmap");
		return 1;
	}
	*qsm_skips_ = 0;
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_ENV); /* CK_VERBOSITY=verbose lists each case */
	int run = srunner_ntests_run(sr);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	unsigned skipped = *qsm_skips_;
	munmap(m, sizeof(unsigned));
	qsm_skips_ = NULL;
	if (failed)
		return 1;
	if (run == 0) {
		fprintf(stderr, "no test case ran (CK_RUN_CASE / CK_*_TAGS select nothing?)\n");
		return 1;
	}
	if (skipped) {
		fprintf(stderr, "%u of %d cases skipped%s\n", skipped, run,
			skipped >= (unsigned)run ? ": reporting SKIPPED (exit 77)" : "");
		if (skipped >= (unsigned)run)
			return 77;
	}
	return 0;
}

#endif
