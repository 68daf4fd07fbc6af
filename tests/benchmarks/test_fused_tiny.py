"""benchmarks/fused.py: the tiny mode runs every arm in seconds and prints the table (no timing asserted)."""

import math

import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it

pytestmark = pytest.mark.bench


def test_tiny_mode_prints_every_arm_against_the_baseline(capsys):
    mod = load_script("fused")
    assert mod.main(["--tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fused trials, digits cnn [32, 64], batch 32, 1 epoch(s)") and "mode tiny" in lines[0]
    assert lines[1].split() == ["arm", "N", "seconds", "trials/hour", "ratio"]
    assert lines[-1].startswith("goal: fused N = 8 and 16 >= 3x one at a time")
    rows = lines[2:-1]
    _, _, sizes, n_base, _ = mod.MODES["tiny"]
    expected = [("one at a time", n_base)] + [(arm, n) for arm in mod.ARMS[1:] for n in sizes]
    parsed = []
    for row in rows:
        arm, fields = row[:14].strip(), row[14:].split()
        parsed.append((arm, int(fields[0])))
        seconds, per_hour, ratio = map(float, fields[1:])
        assert seconds > 0 and math.isfinite(per_hour) and per_hour > 0
        # seconds are printed to 1 ms: the rounding bounds the recomputed figure
        assert per_hour == pytest.approx(int(fields[0]) * 3600 / seconds, rel=0.0006 / seconds + 0.001, abs=1)
        base = float(rows[0][14:].split()[2])
        assert ratio == pytest.approx(per_hour / base, abs=0.006)
    assert parsed == expected
    assert float(rows[0].split()[-1]) == 1.0


def test_the_configurations_differ_per_member_and_share_the_structure():
    mod = load_script("fused")
    from regsweep.models.fused import fusable

    cfgs = mod.configs(4, 1, 0.1, 1)
    assert fusable(cfgs) is None
    assert len({(c.optim.lr, c.train.seed) for c in cfgs}) == 4
    assert mod.configs(4, 1, 0.1, 1) == cfgs  # seeded: every run times the same configurations
