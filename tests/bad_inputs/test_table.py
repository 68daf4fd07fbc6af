"""The bad-input table (issue 16; the data category: issue 18): at least 250 cases, at least 15 in each category,
about ten of them through the real console script in a subprocess. Each category's module holds ``CASES``; this
counts them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).parent
CATEGORIES = ("spec", "config", "cli", "urls", "env", "files", "data", "models")


def load_cases(category: str) -> list:
    path = HERE / f"test_{category}.py"
    spec = importlib.util.spec_from_file_location(f"_bad_inputs_{category}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CASES


def test_the_table_has_250_cases_15_per_category_and_subprocess_spot_checks():
    counts = {c: len(load_cases(c)) for c in CATEGORIES}
    assert all(n >= 15 for n in counts.values()), counts
    assert sum(counts.values()) >= 250, counts
    ids = [case.id for c in CATEGORIES for case in load_cases(c)]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    spot = sum(case.subprocess for c in CATEGORIES for case in load_cases(c))
    assert spot >= 10, f"{spot} subprocess spot checks"
