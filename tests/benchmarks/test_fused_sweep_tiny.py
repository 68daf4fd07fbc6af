"""benchmarks/fused_sweep.py: the tiny mode runs fuse 1 and 2 through the real search path and prints the table
(no timing asserted)."""

import math

import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it

pytestmark = pytest.mark.bench


def test_tiny_mode_prints_each_fuse_size_against_one_at_a_time(capsys):
    mod = load_script("fused_sweep")
    rows = mod.measure("tiny")
    assert [r.fuse for r in rows] == [1, 2] and all(r.trials == 4 for r in rows)
    assert rows[0].ratio == 1.0 and rows[1].ratio == pytest.approx(rows[1].trials_per_hour / rows[0].trials_per_hour)
    assert len(rows[0].storage) == 4  # one epoch write per solo trial (1 epoch)
    assert len(rows[1].storage) == 2  # one transaction per fused epoch: 2 groups of 2, 1 epoch
    text = mod.format_report(rows, "tiny", 1, "cpu")
    lines = text.splitlines()
    assert "mode tiny" in lines[0] and lines[1].split()[:5] == ["fuse", "trials", "seconds", "trials/hour", "ratio"]
    for line, row in zip(lines[2:4], rows):
        fuse, trials, seconds, per_hour, ratio, storage = line.split()
        assert int(fuse) == row.fuse and float(seconds) > 0 and math.isfinite(float(storage))
    assert lines[-1].startswith("goal: fuse 8 and 16 >= 3x fuse 1")
