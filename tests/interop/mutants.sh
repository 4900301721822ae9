#!/usr/bin/env bash
# tests/interop/mutants.sh: proof that `qsm fuzz` has teeth (issue 6).
# Registered only in builds configured with -DQSM_MUTANTS=ON (tests/run
# makes one, build-mutants/), whose engine carries the deliberate
# safety-rule violations of sm/mutant.c.
#
# For every mutant `qsm fuzz --list-mutants` names:
#  - qsm fuzz with that mutant must fail within BUDGET runs (seeds 1..), and
#    the report says after how many runs;
#  - its replay file and the shrunk one fail again when replayed (the
#    replay file records the mutant), and the shrunk case passes once the
#    mutant line is removed: the failure is the mutant's;
#  - a mutant that breaks only an asserted invariant (hold-l2-waiting) must
#    be caught through the abort, with the assertion's message: the proof
#    that the fuzzer's "engine aborted" oracle works (this build must have
#    assertions on: QSM_ASSERTS, the default with QSM_MUTANTS);
# and the unmutated engine must pass the same budget with the same options.
# The jobs run QSM_TEST_JOBS at a time (default: the cores).
# QSM_MUTANT_BUDGET overrides BUDGET (default 120 * QSM_TEST_SCALE, at
# least 60).
source "$(dirname "$0")/lib.sh"
interop_init

BUDGET=${QSM_MUTANT_BUDGET:-$(scaled 120)}
[ "$BUDGET" -lt 60 ] && BUDGET=60
ok() { CHECKS=$((CHECKS + 1)); }

mutants=$("$QSM" fuzz --list-mutants | awk '{print $1}') ||
    die "this qsm has no mutants: configure with -DQSM_MUTANTS=ON"

# The options per mutant: every run kind; lazy refcounts where the rule
# only exists with them.
opts_for() {
    case $1 in
    dirty-not-durable) echo --crash --faults --lazy-refcounts;;
    snap-*) echo --crash --faults --snapshots;;
    *) echo --crash --faults;;
    esac
}

# What the failure report must say, for the mutants only an assertion sees.
expect_for() {
    case $1 in
    hold-l2-waiting) echo "Assertion .req_invariants(req). failed";;
    esac
}

# One job per mutant and per unmutated option set, JOBS at a time (each is
# one single-threaded qsm fuzz; default: the machine's cores).  A job runs
# in a subshell in its own directory (replay files are named by seed, and
# two mutants may fail at the same one); its log lines go to DIR/log, its
# counts to DIR/counts ("CHECKS FAILS [RUNS-TO-CATCH]"), replayed below in
# job order so that the output reads as if the jobs had run one by one.
JOBS=${QSM_TEST_JOBS:-$(nproc 2>/dev/null || echo 2)}

judge_mutant() {   # judge_mutant NAME DIR
    local m=$1 d=$2 out rc runs why want seed f n min
    out="$d/$m.out"
    # shellcheck disable=SC2046
    (cd "$d" && timeout "$TIMEOUT" "$QSM" fuzz --seed 1 --runs "$BUDGET" $(opts_for "$m") \
        --qemu-check-every 0 --shrink-budget 60 --mutant "$m" --out "$d") >"$out" 2>&1
    rc=$?
    ok
    if [ $rc != 1 ]; then
        fail "mutant $m: not caught within $BUDGET runs (exit $rc)"
        show_tail "$out"
        return
    fi
    runs=$(sed -n 's/.*FAILED (first: seed \([0-9]*\), after \([0-9]*\) runs).*/\2/p' "$out")
    why=$(sed -n 's/^qsm fuzz: FAILURE: //p' "$out" | head -1)
    CAUGHT=$runs
    log "mutant $m: caught after $runs runs: $why"
    want=$(expect_for "$m")
    if [ -n "$want" ]; then
        ok
        if ! grep -q "engine died: signal 6" <<<"$why" || ! grep -q "$want" "$out"; then
            fail "mutant $m: not caught by the assertion ('$want', an abort): $why"
            show_tail "$out"
        fi
    fi
    seed=$(sed -n 's/.*FAILED (first: seed \([0-9]*\),.*/\1/p' "$out")
    for f in "$d/qsm-fuzz-$seed.replay" "$d/qsm-fuzz-$seed.min.replay"; do
        ok
        if [ ! -s "$f" ]; then
            fail "mutant $m: no replay file $f"
            continue
        fi
        "$QSM" fuzz --replay "$f" >"$f.out" 2>&1
        rc=$?
        [ $rc = 1 ] || { fail "mutant $m: replaying $f exits $rc, expected 1 (the same failure)"; show_tail "$f.out"; }
    done
    min="$d/qsm-fuzz-$seed.min.replay"
    if [ -s "$min" ]; then
        ok
        log "mutant $m: shrunk to $(grep -c '^op ' "$min") requests"
        grep -v '^mutant ' "$min" >"$min.unmutated"
        if ! "$QSM" fuzz --replay "$min.unmutated" >"$min.unmutated.out" 2>&1; then
            # Crash points count I/O completions, and a mutant changes how
            # many there are: the unmutated engine may finish the workload
            # before the mutant's crash point.  Then the case must pass
            # with the crash moved to the last completion it reaches.
            n=$(sed -n 's/.*ended after \([0-9]*\) completions without reaching crash point.*/\1/p' "$min.unmutated.out")
            if [ -n "$n" ] && [ "$n" -gt 0 ]; then
                sed -i "s/^crash point=[0-9]*/crash point=$n/" "$min.unmutated"
                log "mutant $m: unmutated, the run ends after $n completions; crash moved there"
                "$QSM" fuzz --replay "$min.unmutated" >"$min.unmutated.out" 2>&1 ||
                    { fail "mutant $m: the shrunk case fails without the mutant too (crash at $n)"; show_tail "$min.unmutated.out"; }
            else
                fail "mutant $m: the shrunk case fails without the mutant too"; show_tail "$min.unmutated.out"
            fi
        fi
    fi
}

# The unmutated engine, same budgets and options.
judge_unmutated() {   # judge_unmutated DIR OPTIONS...
    local d=$1; shift
    ok
    if ! (cd "$d" && timeout "$TIMEOUT" "$QSM" fuzz --seed 1 --runs "$BUDGET" "$@" \
            --qemu-check-every 0 --out "$d") >"$d/unmutated.out" 2>&1; then
        fail "the unmutated engine fails the budget ($*)"
        show_tail "$d/unmutated.out"
    else
        log "unmutated ($*): $(grep '^qsm fuzz: [0-9]' "$d/unmutated.out")"
    fi
}

run_job() {   # run_job DIR CMD...: CMD in a subshell, its results in DIR
    local d=$1; shift
    mkdir -p "$d"
    (
        CHECKS=0 FAILS=0 CAUGHT=
        "$@" >"$d/log" 2>&1
        echo "$CHECKS $FAILS $CAUGHT" >"$d/counts"
    ) &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
}

unmutated_opts=("--crash --faults" "--crash --faults --lazy-refcounts" "--crash --faults --snapshots")
for m in $mutants; do run_job "$WORK/m-$m" judge_mutant "$m" "$WORK/m-$m"; done
for i in "${!unmutated_opts[@]}"; do
    # shellcheck disable=SC2086
    run_job "$WORK/u-$i" judge_unmutated "$WORK/u-$i" ${unmutated_opts[$i]}
done
wait

declare -A caught
collect() {   # collect DIR [MUTANT]: its log and counts into this shell's
    local d=$1 c f r
    cat "$d/log" 2>/dev/null
    if ! read -r c f r <"$d/counts" 2>/dev/null; then
        CHECKS=$((CHECKS + 1)); fail "job $d left no results"; return
    fi
    CHECKS=$((CHECKS + c)) FAILS=$((FAILS + f))
    [ -n "${2:-}" ] && [ -n "$r" ] && caught[$2]=$r
    return 0
}
for m in $mutants; do collect "$WORK/m-$m" "$m"; done
for i in "${!unmutated_opts[@]}"; do collect "$WORK/u-$i"; done

# A mutant the build does not have.
ok
if "$QSM" fuzz --mutant no-such-rule >"$WORK/unknown.out" 2>&1 || ! grep -q "no such mutant" "$WORK/unknown.out"; then
    fail "--mutant no-such-rule is not refused"
fi

log "runs to catch each mutant (budget $BUDGET):"
for m in $mutants; do log "  $m: ${caught[$m]:-not caught}"; done
interop_finish
