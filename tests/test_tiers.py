"""tests/run_tiers.sh (the README's `make test`) puts every test in exactly one of its three parts by its markers:
the process half (procs, ray, browser, slow: one at a time), the in-process half (everything else, and `oneshot`
procs tests), the timing tests (alone, last). Run here on a folder of marked dummy tests, collected only."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "run_tiers.sh"
MARKERS = ("db", "procs", "oneshot", "ray", "browser", "bench", "slow", "timing")
CASES = {  # test name -> its markers
    "plain": (), "db": ("db",), "bench": ("bench",), "procs": ("procs",), "procs_db": ("procs", "db"),
    "oneshot": ("procs", "oneshot"), "ray": ("ray", "db"), "browser": ("browser", "procs"), "slow": ("slow",),
    "slow_oneshot": ("slow", "procs", "oneshot"), "timing": ("timing",), "timing_procs": ("timing", "procs"),
}


def _parts(tmp_path: Path, expr: str) -> dict[str, set[str]]:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n" + "".join(f"    {m}: -\n" for m in MARKERS))
    (tmp_path / "test_dummy.py").write_text("import pytest\n" + "".join(
        "".join(f"@pytest.mark.{m}\n" for m in marks) + f"def test_{name}():\n    pass\n"
        for name, marks in CASES.items()))
    proc = subprocess.run(["bash", str(SCRIPT), sys.executable, expr, "-c", str(tmp_path / "pytest.ini"),
                           "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "--collect-only", "-q",
                           str(tmp_path / "test_dummy.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    inproc, rest = proc.stdout.split("=== the process tests", 1)
    procs, timing = rest.split("=== the timing tests", 1)
    return {part: set(re.findall(r"::test_(\w+)", text))
            for part, text in (("inproc", inproc), ("procs", procs), ("timing", timing))}


@pytest.mark.parametrize("expr, slow", [("not slow", set()), ("", {"slow", "slow_oneshot"})])  # make test, test-all
def test_every_test_lands_in_exactly_one_part_by_its_markers(tmp_path, expr, slow):
    parts = _parts(tmp_path, expr)
    assert parts["inproc"] == {"plain", "db", "bench", "oneshot"}
    assert parts["procs"] == {"procs", "procs_db", "ray", "browser"} | slow  # a slow test never overlaps the others
    assert parts["timing"] == {"timing", "timing_procs"}


def test_the_export_script_tests_are_oneshot_procs_tests():
    """The tests moved to the in-process half keep their procs tier (the tier table) and carry oneshot."""
    path = Path(__file__).resolve().parent / "search" / "test_export_python.py"
    spec = importlib.util.spec_from_file_location("_regsweep_tests_export_python", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {m.name for m in module.pytestmark} == {"procs", "oneshot"}
