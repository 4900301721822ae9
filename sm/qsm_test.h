/*
 * sm/qsm_test.h: test-only hooks of the engine, NOT installed and not
 * exported from libqsm.so: for tools/ and tests/, which link the static
 * library.  Programs embedding libqsm use only the installed headers
 * (qsm.h, qsm_io.h, qsm_version.h).
 */
#ifndef QSM_TEST_H
#define QSM_TEST_H

#include "sm/qsm.h"

/* --- Mutants (fuzzer self-test) ------------------------------------------ */
/* Builds configured with -DQSM_MUTANTS=ON carry deliberate safety-rule
 * violations (sm/mutant.c) so that `qsm fuzz` can prove it catches them.
 * qsm_mutant_name(i) names the i-th (and its rule in *rule), NULL past the
 * end (at once in normal builds).  qsm_mutant_select(name) turns one on for
 * the whole process (NULL or "": none); -ENOENT for an unknown name,
 * -ENOTSUP in a build without mutants.  Process-wide, not thread-safe: for
 * test programs only. */
const char *qsm_mutant_name(unsigned i, const char **rule);
int qsm_mutant_select(const char *name);

#endif
