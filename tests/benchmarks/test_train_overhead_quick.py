"""benchmarks/train_overhead.py: the tiny mode runs in CI in seconds; the quick mode is marked slow."""

import math
import statistics

import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it

pytestmark = pytest.mark.bench


def _check(mod, results, mode):
    epochs, rounds, _ = mod.MODES[mode]
    assert [("digits" in r.workload, "resnet20" in r.workload) for r in results] == [(True, False),
                                                                                   (False, True)]
    for r in results:
        for series in (r.baseline, r.fit, r.fit_te1):
            assert len(series) == epochs * rounds
            assert all(math.isfinite(s) and s > 0 for s in series)
        assert r.ratio == pytest.approx(statistics.median(r.fit) / statistics.median(r.baseline))
        assert r.train_eval_seconds == pytest.approx(statistics.median(r.fit) - statistics.median(r.fit_te1))
        # same model, weights, batches and optimizer: the two loops did the same arithmetic
        assert r.val_loss_diff < 1e-5, r
    text = mod.format_report(results, mode)
    assert "goal: fit/baseline <= 1.03" in text
    for r in results:
        row = next(line for line in text.splitlines() if line.startswith(r.workload))
        fields = row[len(r.workload):].split()
        assert int(fields[0]) == r.batch_size and int(fields[1]) == r.n_train
        assert float(fields[4]) == pytest.approx(r.ratio, abs=6e-4)
        assert float(fields[6]) == pytest.approx(r.ratio_te1, abs=6e-4)
    return text


def test_tiny_mode_measures_both_loops_on_the_same_work():
    mod = load_script("train_overhead")
    results = mod.measure_all("tiny", threads=1)
    _check(mod, results, "tiny")
    assert results[0].threads == 1


@pytest.mark.slow
def test_quick_mode_runs_and_prints_the_table(capsys):
    mod = load_script("train_overhead")
    assert mod.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "mode quick" in out and "goal: fit/baseline <= 1.03" in out
    assert any(line.startswith("digits cnn [32, 64]") for line in out.splitlines())
    assert any(line.startswith("synthetic 3x32x32 resnet20") for line in out.splitlines())
