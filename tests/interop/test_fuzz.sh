#!/usr/bin/env bash
# tests/interop/test_fuzz.sh: `qsm fuzz` on the unmutated engine (issue 6).
#
#  1. a bounded budget of random runs must find nothing: mixed plain, crash
#     and fault runs, then lazy refcounts, backing files, compressed
#     clusters (zlib, then zstd: a third of the other budgets' v3 images
#     are zstd too) and live snapshot creates, applies and deletes (--snapshots) in turn (QSM_TEST_SCALE scales the run counts; a sample of
#     the final images also goes through qemu-img check, which must agree
#     with the in-tree checker);
#  2. every regression case (tests/interop/fuzz-regressions/*.replay: cases
#     the fuzzer once failed, shrunk) replays and passes;
#  3. a run replays: the same seed gives the same summary, and a replay file
#     written by a failure is read back (round trip through --replay is
#     covered by tests/interop/mutants.sh in -DQSM_MUTANTS=ON builds);
#  4. bad input: usage errors, unknown events and mutants, unreadable or
#     malformed replay files are refused with a message and exit 2.
# Mutants (proof the fuzzer bites) run in their own build: mutants.sh.
source "$(dirname "$0")/lib.sh"
interop_init

SEED=${QSM_FUZZ_SEED:-1}
ok() { CHECKS=$((CHECKS + 1)); }

# fuzz TAG EXPECTED_EXIT ARGS...: run qsm fuzz, check the exit code.
fuzz() {
    local tag=$1 want=$2 rc
    shift 2
    (cd "$WORK" && timeout "$TIMEOUT" "$QSM" fuzz --out "$WORK" "$@") >"$WORK/$tag.out" 2>&1
    rc=$?
    ok
    if [ $rc != "$want" ]; then
        fail "$tag: qsm fuzz $* exits $rc, expected $want"
        show_tail "$WORK/$tag.out" 20
        return 1
    fi
    return 0
}

# 1. Budgets.
# QSM_FUZZ_SCALE scales them instead of QSM_TEST_SCALE where set (tests/run
# sets it in the sanitizer pass, which has a fuzz budget step of its own).
budget() {   # budget TAG RUNS ARGS...
    local tag=$1 runs
    runs=$(SCALE=${QSM_FUZZ_SCALE:-$SCALE} scaled "$2")
    shift 2
    if fuzz "$tag" 0 --seed "$SEED" --runs "$runs" --qemu-check-every 10 "$@"; then
        log "$tag: $(grep '^qsm fuzz: [0-9]' "$WORK/$tag.out")"
    fi
}
budget mixed 240 --crash --faults
budget lazy 80 --crash --faults --lazy-refcounts
budget backing 80 --crash --faults --backing
budget compressed 40 --crash --compressed
budget zstd 40 --crash --faults --compressed --compression zstd
budget writethrough 60 --crash -t writethrough
budget random-schedule 100 --crash --faults --schedule random
budget snapshots 40 --crash --faults --snapshots
# The snapshot runs did apply snapshots (live, requests held behind them),
# and writes ran beside creates and deletes (in place, or deferred).
if [ -e "$WORK/snapshots.out" ] && ! grep -Eq '^qsm fuzz: .* [1-9][0-9]* of them applies' "$WORK/snapshots.out"; then
    fail "snapshots: no snapshot apply succeeded in the budget"
    show_tail "$WORK/snapshots.out" 5
fi
if [ -e "$WORK/snapshots.out" ] && ! grep -Eq '^qsm fuzz: .* [1-9][0-9]* writes beside them' "$WORK/snapshots.out"; then
    fail "snapshots: no write ran beside a snapshot create or delete in the budget"
    show_tail "$WORK/snapshots.out" 5
fi
ok

# 2. Regressions.
for f in "$INTEROP_DIR"/fuzz-regressions/*.replay; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .replay)
    if fuzz "regression-$name" 0 --replay "$f"; then
        grep -q '^passed' "$WORK/regression-$name.out" ||
            fail "regression $name: no 'passed' line"
    fi
done

# 3. Determinism: the same seed, the same outcome (time aside).
fuzz det1 0 --seed 77 --runs 3 --crash --faults --qemu-check-every 0 &&
fuzz det2 0 --seed 77 --runs 3 --crash --faults --qemu-check-every 0 &&
if ! diff <(sed 's/, [0-9.]* s: /, T: /' "$WORK/det1.out") \
          <(sed 's/, [0-9.]* s: /, T: /' "$WORK/det2.out") >/dev/null; then
    fail "two runs of seed 77 differ"
fi

# 4. Bad input.
refused() {   # refused TAG PATTERN ARGS...
    local tag=$1 pat=$2
    shift 2
    fuzz "$tag" 2 "$@" && { grep -q -- "$pat" "$WORK/$tag.out" ||
        { fail "$tag: message lacks '$pat'"; show_tail "$WORK/$tag.out"; }; }
}
refused bad-option "unrecognized option" --no-such-option
refused bad-event "no such event" --fault-event l3_update
refused bad-runs "invalid number" --runs many
refused bad-cluster "power of two" --cluster-size 1000
refused bad-schedule "keyed or random" --schedule fifo
refused bad-compression "zlib or zstd" --compression lz4
refused bad-out "not a directory" --runs 1 --out "$WORK/no-such-dir"
refused missing-replay "cannot open" --replay "$WORK/nonexistent.replay"
printf 'qsm-fuzz-replay 1\nseed 1\nimage cluster=512 size=1048576\n' >"$WORK/bad.replay"
refused bad-replay "bad.replay:3: cannot parse" --replay "$WORK/bad.replay"
printf 'qsm-fuzz-replay 1\nseed 1\nimage cluster=512 size=1048576 compat=3 lazy=0 l2-tables=1 cache=writeback backing=0 backing-raw=0 backing-size=0 compressed=0\nschedule depth=1 batch=1\nop write 0x100000 512 flags=0 iov=0,0\n' >"$WORK/outside.replay"
refused outside-replay "outside the" --replay "$WORK/outside.replay"
if "$QSM" fuzz --list-mutants >/dev/null 2>&1; then
    log "this build has mutants: the --mutant refusal is checked by mutants.sh"
else
    refused no-mutants "no mutants" --mutant early-ack
fi

interop_finish
