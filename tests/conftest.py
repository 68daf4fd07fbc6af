"""Shared fixtures. Under CI (CI=true) a missing prerequisite is a FAILURE, never a skip."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, what: str) -> None:
    """Skip locally when a prerequisite (database, browser, Ray) is missing; fail under CI."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {what}")
    pytest.skip(f"prerequisite missing: {what}")


@pytest.fixture
def tiny_cfg():
    """A seconds-fast digits config (tiny CNN, few epochs, one thread)."""
    from models.config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"name": "cnn", "widths": [8, 16]},
        "data": {"name": "digits", "batch_size": 64},
        "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"epochs": 3, "num_threads": 1, "train_eval_size": 256},
    })
