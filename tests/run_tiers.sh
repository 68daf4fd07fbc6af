#!/usr/bin/env bash
# The README's `make test` (and test-fast, test-all): pytest as TWO processes at once on the tests a marker
# expression selects. One runs the tests that start processes, time heartbeats, share the Ray session or are
# benchmark-scale (tiers procs, ray, browser, slow), one after another as before, so two of them never overlap;
# the other runs every other test (in-process tests, db, bench) meanwhile. On 2 cores the process tests leave a
# core idle while they wait on their children; together the two halves take about the time of the longer one.
# The in-process half prints as it goes; the process half's output follows it (kept in a log until then).
#
#   tests/run_tiers.sh PYTHON 'MARKER EXPRESSION' [pytest args...]     ('' = every test)
#
# Exit: non-zero when either half fails; pytest's exit 5 (no tests collected) counts only when BOTH halves
# collected nothing (a -k that selects tests of one half only is fine).
set -u
py=$1 expr=$2
shift 2
serial="procs or ray or browser or slow"
if [ -n "$expr" ]; then
    inproc="($expr) and not ($serial)" procs="($expr) and ($serial)"
else
    inproc="not ($serial)" procs="$serial"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/regsweep-tests.XXXXXX")
# Each half has its own base temp folder (pytest clears a --basetemp; two sessions must not share one).
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
echo "in-process half: exit $inproc_rc; process half: exit $procs_rc"
case "$inproc_rc $procs_rc" in
    "0 0"|"0 5"|"5 0"|"5 5") rm -rf "$work" ;;
    *) echo "the tests' temporary folders are kept in $work" ;;
esac
if [ "$inproc_rc" -eq 5 ] && [ "$procs_rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
for rc in "$inproc_rc" "$procs_rc"; do
    case $rc in 0|5) ;; *) exit "$rc" ;; esac
done
exit 0
