"""benchmarks/records.py --quick: the write bench and the read bench (status, export, dashboard API, before vs
after) on a tiny SQLite study. Timings are never asserted; the bytes per epoch are (they are not timings)."""


import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it


@pytest.mark.bench
def test_quick_mode_measures_writes_and_reads(capsys):
    mod = load_script("records")
    figures = mod.main(["--quick"])
    out = capsys.readouterr().out
    writes = figures["writes"]["sqlite"]
    assert writes["v2/10"]["max_bytes"] < 3000 < writes["v1"]["max_bytes"]  # constant vs growing
    reads = figures["reads"]["sqlite/24/v2"]
    for when in ("before", "after"):
        assert {"status", "export", "dashboard", "dashboard_mb"} <= set(reads[when])
    assert "format v1" in out and "format v2" in out and "after/before" in out
