"""The pruning benchmark runs end to end in its tiny mode (a smoke test; figures are in docs/pruning.md)."""


import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it

pytestmark = pytest.mark.bench


def test_pruning_benchmark_tiny(capsys):
    mod = load_script("pruning")
    assert mod.main(["--tiny", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "| none | 9 | 1.00 |" in out  # 3 trials x 3 epochs, nothing pruned without a pruner
    assert "| median+overfit |" in out and "Goals:" in out
