"""Helpers of the benchmark tests. Test modules import them: `from tests.benchmarks.conftest import load_script`
(pytest's importlib mode registers this conftest under that name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(stem: str) -> ModuleType:
    """benchmarks/<stem>.py as a module, registered in sys.modules as ``bench_<stem>`` (dataclasses and pickle
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"bench_{stem}", BENCHMARKS / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
