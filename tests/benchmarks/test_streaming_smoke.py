"""benchmarks/streaming.py at its smoke size (40 PNG files): runs, and both residencies did the same work. Marked
slow (about 15 s on 2 cores: DataLoader workers start per loader); figures are never asserted."""

import math

import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it

pytestmark = [pytest.mark.bench, pytest.mark.slow]


def test_streaming_benchmark_smoke(capsys):
    mod = load_script("streaming")
    results = mod.run("smoke", workers=1, device="cpu")
    assert [r.workload for r in results] == ["png folder, 1 workers", "tensors, 1 workers"]
    for r in results:
        assert math.isfinite(r.ratio) and r.ratio > 0
        assert r.val_loss_diff < 1e-3  # same split, batches and arithmetic up to the statistics' rounding
    assert "goal on a GPU: <= 1.3" in mod.format_report(results, "smoke", "cpu")
