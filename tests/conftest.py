"""Shared fixtures. Under CI (CI=true) a missing prerequisite is a FAILURE, never a skip."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# ------------------------------------------------------------------------------------ tiers
# The markers are registered in pyproject.toml. A test gets its tier from the fixtures it uses (below), from a
# module-level `pytestmark` (tests/benchmarks, tests/search/test_workers.py, tests/test_namespace.py), or, for a
# test that needs a tier without a fixture that says so, from TIER_BY_TEST.
TIER_BY_FIXTURE = {
    "postgres_url": ("db",),
    "own_database": ("db",),
    "ray_session": ("ray", "db"),  # test_ray_backend.py's shared local Ray session records into PostgreSQL
    "chromium": ("browser",),
    "dashboard": ("procs",),  # test_dashboard.py's module fixture serves `regsweep dashboard` in a subprocess
}
TIER_BY_TEST = {  # (file name, test function) -> tiers
    ("test_interrupt.py", "test_ctrl_c_fails_the_running_trial_and_the_next_run_resumes"): ("procs",),
    ("test_ray_backend.py", "test_unsupported_ray_uses_give_the_documented_error"): ("ray",),
    ("test_ray_backend.py", "test_in_memory_sqlite_is_refused"): ("ray",),
    ("test_ray_backend.py", "test_the_driver_writes_the_end_of_a_trial_ray_stopped"): ("ray",),
}
SERVER_KINDS = ("postgresql", "mysql")  # storage_url's params on the shared servers


# Second-server copies of the longest multi-process runs (a PostgreSQL copy of each stays in `make test`),
# to keep .ci/run's pytest part near its 6-minute budget.
SLOW_IN_CI = {
    "test_workers_survive_dropped_connections[mysql]",
    "test_four_workers_make_exactly_the_budget[mysql-16]",
    "test_four_workers_make_exactly_the_budget[sqlite-16]",  # SQLite's multi-worker runs: run_n_trials, same_instant
    "test_two_workers_started_at_the_same_instant_make_one_study[mysql]",
    "test_a_database_outage_fails_trials_with_the_reason_and_retries_them[mysql]",
    "test_a_killed_coordinator_leaves_its_workers_running_to_the_budget[mysql]",
    "test_more_workers_than_trials_stays_exact[postgresql]",  # 4 workers for 3 trials: ~14 s of process starts
    # multi-worker exactness on PostgreSQL stays in `make test` through same_instant[postgresql] and the outage
    # test; a killed worker's stale trial through test_faults' in-process stale test; killed DB sessions: slow
    "test_four_workers_make_exactly_the_budget[postgresql-16]",
    "test_a_killed_worker_trial_fails_within_grace_and_is_retried[postgresql]",
    "test_workers_survive_dropped_connections[postgresql]",
}


@pytest.hookimpl(tryfirst=True)  # before -m selects: the markers must be on the items by then
def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = set()
        for fixture in item.fixturenames:
            tiers.update(TIER_BY_FIXTURE.get(fixture, ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("storage_url") in SERVER_KINDS:
            tiers.add("db")
        tiers.update(TIER_BY_TEST.get((item.path.name, getattr(item, "originalname", item.name)), ()))
        if item.name in SLOW_IN_CI:  # a second server's copy of a long run: `make test-all` runs it
            tiers.add("slow")
        for tier in sorted(tiers - {m.name for m in item.iter_markers()}):
            item.add_marker(tier)


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


SERVER_URLS = {"postgresql": "postgresql://postgres@127.0.0.1:5432/{db}",
               "mysql": "mysql+pymysql://root@127.0.0.1:3306/{db}"}


@pytest.fixture(params=list(SERVER_URLS))
def own_database(request):
    """(kind, url) of a database of the test's own on each shared server: CREATE DATABASE
    regsweep_conn_kill_<pid>, dropped afterwards. For tests that end other sessions (pg_terminate_backend, KILL),
    which must never reach the connections of other tests or of other people's runs on the same server."""
    import sqlalchemy

    kind = request.param
    admin_url = SERVER_URLS[kind].format(db="test")
    require(reachable(admin_url), f"{kind} at {admin_url}")
    db = f"regsweep_conn_kill_{os.getpid()}"
    drop = f"DROP DATABASE IF EXISTS {db}" + (" WITH (FORCE)" if kind == "postgresql" else "")
    admin = sqlalchemy.create_engine(admin_url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(drop)  # a leftover of an earlier, killed run with the same pid
        conn.exec_driver_sql(f"CREATE DATABASE {db}")
    try:
        yield kind, SERVER_URLS[kind].format(db=db)
    finally:
        with admin.connect() as conn:
            if kind == "mysql":  # MariaDB's DROP DATABASE has no FORCE: end what is still connected first
                for (pid,) in conn.exec_driver_sql(
                        f"SELECT id FROM information_schema.processlist WHERE db = '{db}'").fetchall():
                    try:
                        conn.exec_driver_sql(f"KILL CONNECTION {int(pid)}")
                    except sqlalchemy.exc.DBAPIError:
                        pass  # it closed by itself in the meantime
            conn.exec_driver_sql(drop)
        admin.dispose()


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


# ------------------------------------------------------------------------------------ time per tier
# Printed after every run (the figures docs/architecture.md's test-time table quotes): each test's setup + call +
# teardown seconds counted once, under its heaviest tier.
TIER_ORDER = ("slow", "browser", "ray", "bench", "procs", "db")
_SECONDS: dict[str, float] = {}
_TIER: dict[str, str] = {}


def pytest_runtest_logreport(report):  # the report's keywords hold the item's markers
    _SECONDS[report.nodeid] = _SECONDS.get(report.nodeid, 0.0) + report.duration
    _TIER.setdefault(report.nodeid, next((t for t in TIER_ORDER if t in report.keywords), "(none)"))


def pytest_terminal_summary(terminalreporter):
    if not _SECONDS:
        return
    rows: dict[str, list[float]] = {}
    for nodeid, seconds in _SECONDS.items():
        rows.setdefault(_TIER.get(nodeid, "(none)"), []).append(seconds)
    terminalreporter.section("seconds per tier (each test under its heaviest tier)")
    for tier in ("(none)",) + tuple(reversed(TIER_ORDER)):
        if tier in rows:
            terminalreporter.write_line(f"{tier:8s} {len(rows[tier]):5d} tests {sum(rows[tier]):8.1f} s")
    terminalreporter.write_line(f"{'total':8s} {sum(map(len, rows.values())):5d} tests "
                                f"{sum(map(sum, rows.values())):8.1f} s")
