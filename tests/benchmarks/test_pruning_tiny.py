"""The pruning benchmark runs end to end in its tiny mode (a smoke test; figures are in docs/pruning.md)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench


def test_pruning_benchmark_tiny(capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "pruning.py"
    spec = importlib.util.spec_from_file_location("bench_pruning", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "| none | 9 | 1.00 |" in out  # 3 trials x 3 epochs, nothing pruned without a pruner
    assert "| median+overfit |" in out and "Goals:" in out
