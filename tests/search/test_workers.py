"""Distributed sweeps against real SQLite, PostgreSQL and MariaDB: exact budgets, crashes, signals.

Workers are real `regsweep worker` / `run --workers N` processes (tier `procs`); trials are tiny CPU trainings
through the real recording path. Exactness at 16 trials x 4 workers per storage and the 100-trial runs are in
the `slow` tier (`make test-all`; tests/conftest.py SLOW_IN_CI); `make test` keeps same-instant workers, SIGTERM and
the SQLite `run --workers 2` run.
"""

import os
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.models.config import ConfigError
from regsweep.search.backends.optuna_backend import assignments, parse_gpus
from regsweep.search.loop import THREADS_ENV
from regsweep.search.record import history
from tests.search.conftest import cli, tiny_spec, wait_ok  # pytest (importlib mode) registers it


def write_spec(tmp_path, name, n, epochs=1):
    p = tmp_path / f"{name}.yaml"
    p.write_text(tiny_spec(name, n, epochs, pruner="{name: median, args: {n_startup_trials: 5}}", enqueue=True))
    return p


def load(url, name):
    """The study through a storage without a connection pool: tests that poll the shared servers several times
    a second must not leave pooled connections behind them (max_connections is shared by everyone's tests)."""
    import sqlalchemy

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    return optuna.load_study(study_name=name, storage=storage)


def states(url, name):
    return [t.state for t in load(url, name).get_trials(deepcopy=False)]


def assert_exact(url, name, n):
    trials = load(url, name).get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    return trials


@pytest.mark.procs
@pytest.mark.parametrize("size", ["16", pytest.param("full", marks=pytest.mark.slow)])
def test_four_workers_make_exactly_the_budget(storage_url, tmp_path, size):
    url, name = storage_url
    n = 16 if size == "16" else 40 if url.startswith("sqlite") else 100
    spec = write_spec(tmp_path, name, n)
    out, err = wait_ok(cli("run", str(spec), "--storage", url, "--workers", "4"))
    trials = assert_exact(url, name, n)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert not failed, [t.user_attrs.get("stop_reason") for t in failed]  # no storage-error / locked FAIL
    assert "started 4 workers" in out and "[w3]" in out
    assert len({t.user_attrs.get("seed") for t in trials}) == 1


def running_with_history(url, name, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = load(url, name).get_trials(deepcopy=False)
        except KeyError:
            trials = []
        live = [t for t in trials if t.state == TrialState.RUNNING and history(t)]
        if live:
            return live[0]
        time.sleep(0.2)
    raise AssertionError("no trial started training")


@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
def test_more_workers_than_trials_stays_exact(storage_url, tmp_path):
    url, name = storage_url
    spec = write_spec(tmp_path, name, 3, epochs=3)
    wait_ok(cli("run", str(spec), "--storage", url, "--workers", "4"))
    assert_exact(url, name, 3)


@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["postgresql", "mysql", "sqlite"], indirect=True)
def test_two_workers_started_at_the_same_instant_make_one_study(storage_url, tmp_path):
    url, name = storage_url
    spec = write_spec(tmp_path, name, 8)
    procs = [cli("worker", str(spec), "--storage", url) for _ in range(2)]
    for p in procs:
        wait_ok(p)
    assert [s.study_name for s in optuna.get_all_study_summaries(url) if s.study_name == name] == [name]
    trials = assert_exact(url, name, 8)
    assert sum(bool(t.user_attrs.get("regsweep:base")) for t in trials) == 1  # enqueued once


@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
def test_a_killed_worker_trial_fails_within_grace_and_is_retried(storage_url, tmp_path):
    url, name = storage_url
    spec = write_spec(tmp_path, name, 3, epochs=40)  # one long trial per worker: the kill lands mid-trial
    env = {"REGSWEEP_HEARTBEAT_INTERVAL": "1", "REGSWEEP_GRACE_PERIOD": "3"}
    procs = [cli("worker", str(spec), "--storage", url, env=env) for _ in range(3)]
    victim = running_with_history(url, name)
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    killed = next(p for p in procs if p.pid == pid)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    deadline = killed_at + 30
    while time.monotonic() < deadline:
        st = load(url, name)
        if st.trials[victim.number].state == TrialState.FAIL:
            break
        time.sleep(0.2)
    assert st.trials[victim.number].state == TrialState.FAIL
    assert time.monotonic() - killed_at < 3 + 2 + 5  # grace + a heartbeat + a worker's poll
    for p in procs:
        if p is not killed:
            wait_ok(p)
    trials = assert_exact(url, name, 3)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)


# Every OTHER session on the test's own database: terminated (PostgreSQL) or listed to KILL (MariaDB/MySQL).
OTHER_SESSIONS = {
    "postgresql": "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    "mysql": "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()",
}


def kill_other_sessions(engine, kind) -> int:
    import sqlalchemy

    with engine.connect() as conn:
        rows = conn.exec_driver_sql(OTHER_SESSIONS[kind]).fetchall()
        if kind == "mysql":
            for (pid,) in rows:
                try:
                    conn.exec_driver_sql(f"KILL CONNECTION {int(pid)}")
                except sqlalchemy.exc.DBAPIError:
                    pass  # that connection closed by itself in the meantime
        return len(rows)


@pytest.mark.procs
def test_workers_survive_dropped_connections(own_database, tmp_path):
    """On a database of its own (conftest's own_database, one per server), so that ending every other session
    cannot reach another test's connections."""
    import sqlalchemy

    kind, url = own_database
    name = "conn-kill"
    spec = write_spec(tmp_path, name, 16, epochs=2)
    proc = cli("run", str(spec), "--storage", url, "--workers", "2",
               env={"REGSWEEP_HEARTBEAT_INTERVAL": "1", "REGSWEEP_GRACE_PERIOD": "3"})
    running_with_history(url, name)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
    killed = 0
    for _ in range(5):  # end every other session on the database, several times mid-sweep
        killed += kill_other_sessions(engine, kind)
        time.sleep(0.5)
    engine.dispose()
    wait_ok(proc)
    assert killed > 0
    assert_exact(url, name, 16)


@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
def test_sigterm_requeues_the_trial_and_exits_143(storage_url, tmp_path):
    url, name = storage_url
    spec = write_spec(tmp_path, name, 1, epochs=120)  # seconds long: SIGTERM lands mid-trial (40 epochs raced the poll)
    proc = cli("worker", str(spec), "--storage", url)
    victim = running_with_history(url, name)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err[-2000:]
    assert time.monotonic() - sent < 10
    trials = load(url, name).trials
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["stop_reason"] == "failed:terminated"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].system_attrs["failed_trial"] == victim.number
    from regsweep.search.cli import main

    assert main(["worker", str(spec), "--storage", url]) == 0  # a later worker finishes the budget
    trials = assert_exact(url, name, 1)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.params == victim.params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_gpu_assignment_packs_workers_and_splits_cpu_threads(monkeypatch):
    envs = assignments(4, ["0", "1"], 2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0", "1", "1"]
    cpu = assignments(2, [], 1)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in cpu] == ["", ""]
    assert all(int(e[THREADS_ENV]) == max(1, (os.cpu_count() or 1) // 2) for e in cpu)
    with pytest.raises(ConfigError, match="do not fit"):
        assignments(5, ["0", "1"], 2)
    with pytest.raises(ConfigError, match="--workers"):
        assignments(0, [], 1)
    assert parse_gpus("0, 2") == ["0", "2"]
    with pytest.raises(ConfigError, match="--gpus"):
        parse_gpus("a,b")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert parse_gpus(None) == ["3"]


def test_an_orphaned_trial_without_heartbeat_is_adopted_failed_and_retried(tmp_path, monkeypatch):
    """A trial asked by a worker that died before its first heartbeat would stay RUNNING forever in Optuna."""
    from regsweep.search.loop import fail_stale as _fail_stale
    from regsweep.search.storage import adopt_orphans, open_storage

    monkeypatch.setenv("REGSWEEP_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("REGSWEEP_GRACE_PERIOD", "1")
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), study_name="o")
    from regsweep.search.loop import ask as _ask

    orphan = _ask(study)
    orphan.suggest_float("x", 0, 1)
    live = _ask(study)
    study._storage.record_heartbeat(live._trial_id)
    assert adopt_orphans(study, older_than=3600) == []  # too young
    assert adopt_orphans(study, older_than=0) == [orphan._trial_id]  # the live one has its heartbeat
    assert adopt_orphans(study, older_than=0) == []  # adopted once
    time.sleep(2.2)
    study._storage.record_heartbeat(live._trial_id)
    _fail_stale(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[orphan.number].state == TrialState.FAIL and trials[live.number].state == TrialState.RUNNING
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING and retry[0].params == orphan.params


@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
def test_run_n_trials_reaches_the_workers_and_workers_draw_different_params(storage_url, tmp_path):
    url, name = storage_url
    spec = write_spec(tmp_path, name, 2)  # the spec says 2; --n-trials says 6
    out, _ = wait_ok(cli("run", str(spec), "--storage", url, "--workers", "2", "--n-trials", "6"))
    trials = assert_exact(url, name, 6)
    sampled = [t.params["model.dropout"] for t in trials if t.params]
    assert len(set(sampled)) == len(sampled)  # reseeded per worker: no configuration drawn twice


def test_a_swallowed_signal_still_takes_effect_at_the_next_check():
    """A handler's exception raised inside a destructor is lost ("Exception ignored in ..."): the trial loop's
    check_signals() raises it again, so SIGTERM/Ctrl-C always stop the worker."""
    from regsweep.search.signals import Terminated, check_signals, terminate_on_sigterm

    with terminate_on_sigterm():
        check_signals()  # nothing pending
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        except Terminated:
            pass  # swallowed, as a GC callback would
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat is ignored while the first is handled
        time.sleep(0.1)
        with pytest.raises(Terminated):
            check_signals()
    with terminate_on_sigterm():
        check_signals()  # a new guard starts clean
