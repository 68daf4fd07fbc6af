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
