"""benchmarks/streaming.py at its smoke size (40 PNG files): runs, and both residencies did the same work. Marked
slow (about 15 s on 2 cores: DataLoader workers start per loader); figures are never asserted."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "streaming.py"


def test_streaming_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location("streaming_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    results = mod.run("smoke", workers=1, device="cpu")
    assert [r.workload for r in results] == ["png folder, 1 workers", "tensors, 1 workers"]
    for r in results:
        assert math.isfinite(r.ratio) and r.ratio > 0
        assert r.val_loss_diff < 1e-3  # same split, batches and arithmetic up to the statistics' rounding
    assert "goal on a GPU: <= 1.3" in mod.format_report(results, "smoke", "cpu")
