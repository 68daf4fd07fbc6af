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
    from regsweep.models.config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"name": "cnn", "widths": [8, 16]},
        "data": {"name": "digits", "batch_size": 64},
        "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"epochs": 3, "num_threads": 1, "train_eval_size": 256},
    })


# ------------------------------------------------------------------------------------ databases
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
MYSQL_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


def reachable(url: str) -> bool:
    from regsweep.models.config import ConfigError
    from regsweep.search.storage import check_reachable

    try:
        check_reachable(url)
        return True
    except ConfigError:
        return False


@pytest.fixture
def postgres_url():
    """The local PostgreSQL's URL (skipped locally when it is down; a failure under CI)."""
    require(reachable(POSTGRES_URL), f"postgresql at {POSTGRES_URL}")
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def storage_url(request, tmp_path):
    """One fixture for every storage: a SQLite file, the local PostgreSQL, the local MariaDB/MySQL.
    Yields (url, study_name); the study is deleted afterwards on the shared servers."""
    import uuid

    kind = request.param
    name = f"t-{uuid.uuid4().hex[:12]}"
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}", name
        return
    url = POSTGRES_URL if kind == "postgresql" else MYSQL_URL
    require(reachable(url), f"{kind} at {url}")
    yield url, name
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass


# ------------------------------------------------------------------------------------ a swept study
SWEPT_SPEC = """
name: swept
description: a tiny sweep shared by the dashboard, report and artifact tests
base:
  model: {name: cnn, widths: [8, 16]}
  data: {name: digits, batch_size: 64}
  optim: {name: adamw, lr: 3.0e-3}
  train: {epochs: 4, num_threads: 1, train_eval_size: 128}
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
  regularization.l2: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
sampler: {name: tpe, seed: 0, args: {n_startup_trials: 3}}
pruner: {name: median, args: {n_startup_trials: 2, n_warmup_steps: 0}}
budget: {n_trials: 5}
enqueue: [{}, {model.dropout: 0.0, regularization.l2: 1.0e-6}, {model.dropout: 0.5, regularization.l2: 1.0e-2}]
"""


@pytest.fixture(scope="session")
def swept_study(tmp_path_factory):
    """A 5-trial digits sweep run once through `regsweep run` on SQLite (artifacts on by default).
    Returns (spec path, storage url, artifact dir). Tests must not change it."""
    from regsweep.search.cli import main

    root = tmp_path_factory.mktemp("swept")
    spec = root / "swept.yaml"
    spec.write_text(SWEPT_SPEC)
    url = f"sqlite:///{root / 'swept.db'}"
    assert main(["run", str(spec), "--storage", url]) == 0
    return spec, url, root / "swept-artifacts"


@pytest.fixture(scope="session")
def chromium():
    """(chromium binary, chromedriver) — Debian's `chromium` and `chromium-driver`; a failure under CI."""
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    require(binary is not None and driver is not None,
            "chromium and chromedriver (apt-get install -y chromium chromium-driver)")
    return binary, driver
