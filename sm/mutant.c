/*
 * sm/mutant.c: deliberate safety-rule violations for proving that the
 * ordering fuzzer (`qsm fuzz`, issue 6) catches real bugs.
 *
 * Each mutant removes exactly one rule the engine's crash safety or request
 * isolation rests on.  They are compiled only when the build is configured
 * with -DQSM_MUTANTS=ON (the QSM_MUTANTS macro); in every other build the
 * list is empty, QSM_MUTANT(x) is the constant 0 and the compiler drops the
 * mutated branches, so a release cannot run one by accident.
 *
 * Sites (grep QSM_MUTANT):
 *   refblock-after-l2   sm/writeback.c wb_collect: refcount blocks move from
 *                       the first level to the last, after the L2 tables
 *   l2-before-data      sm/alloc.c qsm_step_alloc_write: the cached L2 entries
 *                       point at the new clusters before the data is written
 *   dirty-not-durable   sm/writeback.c wb_collect: with lazy refcounts, the
 *                       header carrying the dirty bit is written with the L2
 *                       tables instead of synced before them
 *   no-freeze           sm/lookup.c qsm_step_l1_lookup/qsm_step_l2_alloc: a write
 *                       whose L2 table another request is creating does not
 *                       wait; it creates a second table for the same slot
 *   double-alloc        sm/classify.c alloc_overlap: overlapping allocating
 *                       writes do not wait for each other
 *   early-ack           sm/writeback.c WB_COLLECT: the requests waiting for
 *                       durability (flushes, writethrough writes) are
 *                       acknowledged when the batch starts, not after its sync
 *   hold-l2-waiting     sm/classify.c wait_for_overlapping_alloc and
 *                       qsm_classify_write: a run that must wait for an
 *                       overlapping allocation (ALLOC_WAIT) keeps its L2
 *                       table reference through the wait, and drops it only
 *                       when it starts over (step_l1_lookup).  Nothing a
 *                       guest can read or a crash can leave shows it (the
 *                       table is merely pinned meanwhile, and the owner of
 *                       the allocation needs no slot to finish); only
 *                       req_invariants does, on entry to ALLOC_WAIT.  It
 *                       proves the fuzzer's "engine aborted" oracle, so it
 *                       needs assertions (the mutant build has them:
 *                       QSM_ASSERTS)
 *   snap-copied-kept    sm/snapops.c: a snapshot create skips its COPIED pass,
 *                       so the active tables still say "write in place" over
 *                       clusters the snapshot now shares
 *   snap-early-free     sm/snapops.c: a snapshot delete drops the snapshot's
 *                       references (and frees its L1 copy) before it writes
 *                       the table without it and commits the header, so its
 *                       clusters can be handed out while the snapshot is
 *                       still the one on disk
 */
#include <errno.h>
#include <string.h>

#include "sm/qsm_test.h"
#include "sm/sm.h"

static const struct {
	const char *name, *rule;
} mutants[] = {
#ifdef QSM_MUTANTS
#define X(id, name, rule) { name, rule },
	QSM_MUTANTS_LIST(X)
#undef X
#else
	{ "none", "" }, /* a normal build carries no mutant */
#endif
};

#ifdef QSM_MUTANTS
enum qsm_mutant qsm_mutant_active = QSM_MUT_NONE;
#endif

const char *qsm_mutant_name(unsigned i, const char **rule)
{
	if (i + 1 >= sizeof(mutants) / sizeof(mutants[0]))
		return NULL;
	if (rule)
		*rule = mutants[i + 1].rule;
	return mutants[i + 1].name;
}

int qsm_mutant_select(const char *name)
{
#ifdef QSM_MUTANTS
	if (!name || !*name) {
		qsm_mutant_active = QSM_MUT_NONE;
		return 0;
	}
	for (unsigned i = 1; i < sizeof(mutants) / sizeof(mutants[0]); i++) {
		if (!strcmp(mutants[i].name, name)) {
			qsm_mutant_active = (enum qsm_mutant)i;
			return 0;
		}
	}
	return -ENOENT;
#else
	return name && *name ? -ENOTSUP : 0;
#endif
}
