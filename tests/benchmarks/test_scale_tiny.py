"""benchmarks/scale.py at its smallest: 1 and 2 worker processes directly on PostgreSQL and through the proxy.
Timings are never asserted; the table's rows, the exact budgets (checked inside the script) and who connected are.

`slow` (`make test-all`): six process starts of regsweep (~1 min on 2 cores)."""

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


def test_scale_prints_both_layouts_and_only_the_proxy_connects_through_it(postgres_url):
    import subprocess
    import sys

    pytest.importorskip("grpc")
    out = subprocess.run([sys.executable, str(SCRIPT), "--workers", "1,2", "--trials-per-worker", "2", "--sleep",
                          "0.05", "--admin", postgres_url], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^(direct|proxy)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(.*)$", out.stdout, re.M)
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [("direct", 1, 2), ("direct", 2, 4), ("proxy", 1, 2),
                                                             ("proxy", 2, 4)], out.stdout
    for layout, _, _, wall, per_hour, most, names in rows:
        assert float(wall) > 0 and int(per_hour) > 0 and int(most) >= 1
        if layout == "proxy":
            assert names == "regsweep-storage-proxy", out.stdout  # the workers never connect themselves
