"""benchmarks/scaling.py: the tiny mode runs the real CLI with 1 and 2 workers and the worker loop on
PostgreSQL, prints both sections and deletes its studies. Timings are never asserted.

`slow` (`make test-all`): it mostly checks the benchmark's printout (25 s); the exact budgets with 1, 2 and 4
workers are asserted by tests/search/test_workers.py in the default run."""

import re

import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it

pytestmark = [pytest.mark.bench, pytest.mark.slow]


def test_tiny_mode_prints_both_sections_and_deletes_its_studies(capsys, postgres_url):
    import optuna

    mod = load_script("scaling")
    before = set(optuna.get_all_study_names(storage=postgres_url))
    assert mod.main(["--tiny", "--storage", postgres_url]) == 0
    out = capsys.readouterr().out
    cli_trials, _, store_trials, window = mod.MODES["tiny"]

    assert "1. workers: `regsweep run --workers K`" in out
    # workers, trials, wall s, first trial s, median trial s, trials/hour
    row = re.compile(r"^\s+([12])\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", re.M)
    rows = {int(m[1]): m for m in row.finditer(out)}
    assert sorted(rows) == [1, 2], out
    per_hour = {}
    for k, m in rows.items():
        trials, wall, per_hour[k] = int(m[2]), float(m[3]), int(m[6])
        assert trials == cli_trials  # the budget was met exactly by 1 and by 2 workers
        assert wall > 0 and per_hour[k] == pytest.approx(3600 * trials / wall, rel=0.01, abs=1)
    speedup = float(re.search(r"speed-up 2 workers / 1 worker: ([\d.]+)x \(goal >= 1.8x on 2 cores\)", out)[1])
    assert speedup == pytest.approx(per_hour[2] / per_hour[1], rel=0.02)

    assert f"2. storage: worker_loop + Recorder/TrialWriter, {store_trials} trials x 3 epochs" in out
    first = re.search(rf"^first {window}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    last = re.search(rf"^last {window} \(of {store_trials}\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert first and last, out
    for m in (first, last):  # a turn of the loop = the recording + the loop's own storage calls
        assert float(m[1]) == pytest.approx(float(m[2]) + float(m[3]), abs=0.02)
        assert float(m[2]) > 0 and float(m[3]) > 0
    ratio = float(re.search(rf"per-trial time, last {window} / first {window}: ([\d.]+)x \(goal: close to 1\)", out)[1])
    assert ratio == pytest.approx(float(last[1]) / float(first[1]), rel=0.02, abs=0.01)

    deleted = re.search(r"^deleted studies: (.+)$", out, re.M)[1].split(", ")
    assert len(deleted) == 4 and len({name.rsplit("-", 1)[0] for name in deleted}) == 1  # one fresh prefix
    assert not set(deleted) & before  # fresh names
    assert not set(deleted) & set(optuna.get_all_study_names(storage=postgres_url))  # cleaned up
