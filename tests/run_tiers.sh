#!/usr/bin/env bash
# The README's `make test` (and test-fast, test-all): pytest as THREE processes at once on the tests a marker
# expression selects, then the timing tests alone.
#   - the process tests (tiers procs, browser, slow; not ray): they start processes, time heartbeats or are
#     benchmark-scale; run one after another as before, so two of them never overlap;
#   - the Ray tests (tier ray): one after another in ONE process, which holds the shared local Ray session; a
#     Ray test spends most of its time waiting on Ray (node start-up, death detection, Tune's loop: the killed-node
#     test is ~30 s of wall time for ~15 s of CPU), so it fills the cores the others leave idle;
#   - every other test (in-process tests, db, bench).
# Last, the tests marked `timing` (they compare wall-clock times of two arms, so a burst of another part would
# skew one arm) run alone on the quiet machine.
# The in-process part prints as it goes; the other parts' output follows it (kept in a log until then).
#
#   tests/run_tiers.sh PYTHON 'MARKER EXPRESSION' [pytest args...]     ('' = every test)
#
# Exit: non-zero when any part fails; pytest's exit 5 (no tests collected) counts only when EVERY part collected
# nothing (a -k that selects tests of one part only is fine).
set -u
py=$1 expr=$2
shift 2
sel=${expr:+($expr) and }
inproc="${sel}not (procs or ray or browser or slow) and not timing"
procs="${sel}(procs or browser or slow) and not ray and not timing"
ray="${sel}ray and not timing"
timing="${sel}timing"
work=$(mktemp -d "${TMPDIR:-/tmp}/regsweep-tests.XXXXXX")
# Each part has its own base temp folder (pytest clears a --basetemp; two sessions must not share one).
"$py" -m pytest -m "$procs" --basetemp "$work/procs" -p no:cacheprovider "$@" > "$work/procs.log" 2>&1 &
procs_pid=$!
"$py" -m pytest -m "$ray" --basetemp "$work/ray" -p no:cacheprovider "$@" > "$work/ray.log" 2>&1 &
ray_pid=$!
trap 'kill "$procs_pid" "$ray_pid" 2>/dev/null; wait "$procs_pid" "$ray_pid" 2>/dev/null; exit 130' INT TERM
"$py" -m pytest -m "$inproc" --basetemp "$work/inproc" "$@"
inproc_rc=$?
wait "$procs_pid"
procs_rc=$?
wait "$ray_pid"
ray_rc=$?
trap - INT TERM
for part in procs ray; do
    expr_var=$part
    echo
    echo "=================== the $part tests (-m \"${!expr_var}\"), run meanwhile ==================="
    cat "$work/$part.log"
done
echo
echo "=================== the timing tests (-m \"$timing\"), alone ==================="
"$py" -m pytest -m "$timing" --basetemp "$work/timing" -p no:cacheprovider "$@"
timing_rc=$?
echo "in-process tests: exit $inproc_rc; process tests: exit $procs_rc; Ray tests: exit $ray_rc;" \
     "timing tests: exit $timing_rc"
failed=0
for rc in "$inproc_rc" "$procs_rc" "$ray_rc" "$timing_rc"; do
    case $rc in 0|5) ;; *) failed=$rc ;; esac
done
if [ "$failed" -eq 0 ]; then
    rm -rf "$work"
else
    echo "the tests' temporary folders are kept in $work"
fi
if [ "$inproc_rc" -eq 5 ] && [ "$procs_rc" -eq 5 ] && [ "$ray_rc" -eq 5 ] && [ "$timing_rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$failed"
