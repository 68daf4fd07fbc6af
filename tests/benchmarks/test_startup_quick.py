"""benchmarks/startup.py --quick: each start-up shortcut timed against the way before it, one row each with a
finite ratio (the child-process arms through the note part; the digits part uses the same helper with torch
imported first, ~10 s more). Timings are never asserted."""

import math

import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it


@pytest.mark.bench
def test_quick_mode_prints_every_part_with_its_ratio(capsys):
    mod = load_script("startup")
    assert mod.main(["--quick", "--parts", "note,storage,png"]) == 0  # digits' children import torch: ~10 s more
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("start-up and per-trial costs")
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["note", "storage", "png"]
    for row in rows.values():
        before, after, ratio = map(float, row[1:4])
        assert before > 0 and after > 0 and math.isfinite(ratio)
