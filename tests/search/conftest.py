"""Fixtures of the search tests: ONE local Ray per pytest run (session scope), shared by every Ray test."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _root_conftest():
    """tests/conftest.py's helpers (`require` fails under CI instead of skipping); --import-mode=importlib puts
    no conftest on sys.path, so it is loaded by path."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_regsweep_tests_root_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_c = _root_conftest()
SECRET = "Secr3t/pw"  # RAY_URL's password (trust auth takes any; a raw "/" is legal); no Ray file may hold it
RAY_URL = _c.POSTGRES_URL.replace("postgres@", f"postgres:{SECRET}@")


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray (num_cpus=2) for the whole pytest run, started the way `run --backend ray` starts it (the
    password-bearing PostgreSQL URL in the workers' environment); yields Ray's storage path (experiment dirs)."""
    _c.require(ray_installed(), "ray (pip install 'regsweep[ray]')")
    _c.require(_c.reachable(_c.POSTGRES_URL), f"postgresql at {_c.POSTGRES_URL}")
    import ray

    from regsweep.search.backends.ray import RESULTS_ENV, STORAGE_ENV
    from regsweep.search.backends.ray.run import init_ray

    results = tmp_path_factory.mktemp("ray_results")
    saved = {k: os.environ.get(k) for k in (STORAGE_ENV, RESULTS_ENV)}
    os.environ[RESULTS_ENV] = str(results)
    init_ray(RAY_URL, num_cpus=2)
    yield results
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ------------------------------------------------------------------------------------ tiny specs
# The process tests' spec: a 4-wide CNN on 120 synthetic 8x8 images, dropout searched, seeded random sampler.
# Test modules import it: `from tests.search.conftest import tiny_spec` (pytest's importlib mode registers it).
TINY_SPEC = """
name: {name}
base:
  model: {model}
  data: {{name: synthetic, n_samples: 120, shape: [1, 8, 8], batch_size: 64}}
  train: {{epochs: {epochs}, num_threads: 1, train_eval_size: 16}}
space:
  model.dropout: {{type: float, low: 0.0, high: 0.5}}
sampler: {{name: random, seed: 0}}
pruner: {pruner}
budget: {{n_trials: {n}}}
"""
TINY_MODEL = "{name: cnn, widths: [4]}"
# a user model (by import path, beside the spec) whose every training batch sleeps ``PAUSE`` seconds: a trial that
# must still be training when a test acts (cuts the database, kills its worker or node) cannot finish first
SLOW_NET = """
import time

from torch import nn

PAUSE = {pause}


class SlowNet(nn.Module):
    def __init__(self, in_shape, num_classes, dropout=0.0):
        super().__init__()
        c, h, w = in_shape
        self.body = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, num_classes))

    def forward(self, x):
        if self.training:
            time.sleep(PAUSE)
        return self.body(x)
"""


def tiny_spec(name: str, n: int, epochs: int, *, pruner: str = "none", enqueue: bool = False,
              extra: str = "") -> str:
    """TINY_SPEC's text; ``enqueue`` adds the base config as the first trial, ``extra`` more top-level YAML."""
    text = TINY_SPEC.format(name=name, n=n, epochs=epochs, pruner=pruner, model=TINY_MODEL)
    return text + ("enqueue: [{}]\n" if enqueue else "") + extra


def slow_net(folder: Path, pause: float) -> str:
    """Write SLOW_NET beside a spec in ``folder``; returns the ``model:`` value naming it."""
    (folder / "slownet.py").write_text(SLOW_NET.format(pause=pause))
    return "{name: 'slownet:SlowNet'}"


# ------------------------------------------------------------------------------------ process-test helpers
PROCS_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args, env=None, **kw):
    """`python -P -m regsweep.search.cli ARGS` in its own session (so a test can kill its whole group), pipes
    for its output; ``env`` adds to the environment."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", *args],
                            env={**PROCS_ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def wait_ok(proc, timeout=240):
    """(stdout, stderr) of a :func:`cli` process that must exit 0 within ``timeout`` s (else its group is killed)."""
    import signal
    import subprocess

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers: nothing outlives the test
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s\n{out[-2000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return out, err


_STORAGES: dict = {}  # one pool-less storage per URL: opening one per poll costs the CPU the workers need


def trials_of(url, name):
    """The study's trials read straight from the database (no pooled connection stays open), [] before it
    exists."""
    import optuna
    import sqlalchemy

    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    try:
        return optuna.load_study(study_name=name, storage=_STORAGES[url]).get_trials(deepcopy=False)
    except KeyError:
        return []


def assert_exact(trials, n):
    """The exact budget: ``n`` COMPLETE + PRUNED trials, unique numbers, none left RUNNING."""
    from optuna.trial import TrialState

    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == n, \
        [(t.number, t.state.name) for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
