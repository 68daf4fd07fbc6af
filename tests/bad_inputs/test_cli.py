"""Bad command-line values: one line, exit 2, nothing created."""

from __future__ import annotations

import pytest

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

SPEC = {"base.yaml": TINY_BASE, "tiny.yaml": TINY_SPEC}

CASES = [
    Case("validate-missing-file", ["validate", "{d}/nope.yaml"], expect=("nope.yaml",)),
    Case("run-missing-file", ["run", "{d}/nope.yaml"], expect=("nope.yaml",)),
    Case("unknown-command", ["frobnicate"], expect=("frobnicate",)),
    Case("run-unknown-flag", ["run", "{d}/tiny.yaml", "--frob"], files=SPEC, expect=("--frob",)),
    Case("run-backend-bogus", ["run", "{d}/tiny.yaml", "--backend", "bogus"], files=SPEC, expect=("bogus",)),
    Case("run-n-trials-text", ["run", "{d}/tiny.yaml", "--n-trials", "many"], files=SPEC, expect=("many",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
