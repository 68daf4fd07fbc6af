#!/usr/bin/env bash
# The README's `make test` (and test-fast, test-all): pytest as TWO processes at once on the tests a marker
# expression selects, then the timing tests alone. One process runs the tests that start processes, time
# heartbeats, share the Ray session or are benchmark-scale (tiers procs, ray, browser, slow), one after another as
# before, so two of them never overlap; the other runs every other test (in-process tests, db, bench, and the
# `oneshot` procs tests, whose subprocesses only run to completion: they load a core as an in-process test does and
# even out the two halves' times) meanwhile.
# On 2 cores the process tests leave a core idle while they wait on their children; together the two halves take
# about the time of the longer one. Last, the tests marked `timing` (they compare wall-clock times of two arms, so
# a burst of the other half would skew one arm) run alone on the quiet machine.
# The in-process half prints as it goes; the process half's output follows it (kept in a log until then).
#
#   tests/run_tiers.sh PYTHON 'MARKER EXPRESSION' [pytest args...]     ('' = every test)
#
# Exit: non-zero when any part fails; pytest's exit 5 (no tests collected) counts only when EVERY part collected
# nothing (a -k that selects tests of one part only is fine).
set -u
py=$1 expr=$2
shift 2
serial="(procs and not oneshot) or ray or browser or slow"  # a oneshot procs test may overlap them
sel=${expr:+($expr) and }
inproc="${sel}not ($serial) and not timing" procs="${sel}($serial) and not timing" timing="${sel}timing"
work=$(mktemp -d "${TMPDIR:-/tmp}/regsweep-tests.XXXXXX")
# Each part has its own base temp folder (pytest clears a --basetemp; two sessions must not share one).
"$py" -m pytest -m "$procs" --basetemp "$work/procs" -p no:cacheprovider "$@" > "$work/procs.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; exit 130' INT TERM
"$py" -m pytest -m "$inproc" --basetemp "$work/inproc" "$@"
inproc_rc=$?
wait "$pid"
procs_rc=$?
trap - INT TERM
echo
echo "=================== the process tests (-m \"$procs\"), run meanwhile ==================="
cat "$work/procs.log"
echo
echo "=================== the timing tests (-m \"$timing\"), alone ==================="
"$py" -m pytest -m "$timing" --basetemp "$work/timing" -p no:cacheprovider "$@"
timing_rc=$?
echo "in-process half: exit $inproc_rc; process half: exit $procs_rc; timing tests: exit $timing_rc"
failed=0
for rc in "$inproc_rc" "$procs_rc" "$timing_rc"; do
    case $rc in 0|5) ;; *) failed=$rc ;; esac
done
if [ "$failed" -eq 0 ]; then
    rm -rf "$work"
else
    echo "the tests' temporary folders are kept in $work"
fi
if [ "$inproc_rc" -eq 5 ] && [ "$procs_rc" -eq 5 ] && [ "$timing_rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$failed"
