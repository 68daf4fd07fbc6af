"""`regsweep storage-proxy` and grpc:// storage URLs (issue 22) against the real local PostgreSQL.

Each test uses a PostgreSQL database of its own (``regsweep_proxy_<pid>``), so ``pg_stat_activity`` on it shows
exactly who connects to it: through a proxy, only the proxy (application_name ``regsweep-storage-proxy``).
The in-process tests drive the proxy's storage with Optuna's GrpcStorageProxy (regsweep's ProxyClient) and
take seconds; the process tests run `regsweep run --workers N` / `regsweep worker` through a proxy process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from regsweep.search.optuna_internals import trial_id
from regsweep.search.proxy import BudgetFull
from regsweep.search.storage import STALE_REASON
from regsweep.search.study import BUDGET_ATTR
from tests.conftest import require  # pytest (importlib mode) registers it
from tests.search.conftest import (
    PROCS_ENV,
    TINY_MODEL,
    assert_exact,
    cli,
    slow_net,
    tiny_spec,
    trials_of,
    wait_ok,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

PG = "postgresql://postgres@127.0.0.1:5432/{db}"
APP = "regsweep-storage-proxy"
FAST_HEARTBEAT = {"REGSWEEP_HEARTBEAT_INTERVAL": "1", "REGSWEEP_GRACE_PERIOD": "3"}


@pytest.fixture(autouse=True)
def grpc_installed():
    """The [grpc] extra (make install has it): skipped locally without it, a failure under CI."""
    import importlib.util

    require(importlib.util.find_spec("grpc") is not None, "grpcio (pip install 'regsweep[grpc]')")


@pytest.fixture
def proxy_db(postgres_url):
    """(url, database name) of a PostgreSQL database of this test's own, dropped afterwards."""
    db = f"regsweep_proxy_{os.getpid()}"
    admin = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {db}")
    try:
        yield PG.format(db=db), db
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.dispose()


@contextlib.contextmanager
def proxy_process(url, env=None):
    """`regsweep storage-proxy --port 0` serving ``url`` (given in $REGSWEEP_STORAGE only); yields (grpc URL,
    process). Stopped with SIGTERM afterwards (it must exit 0)."""
    proc = subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", "storage-proxy", "--port", "0"],
                            env={**PROCS_ENV, **(env or {}), "REGSWEEP_STORAGE": url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"on (grpc://127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read()[-2000:] if proc.poll() is not None else "")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # a full pipe must not stall it
        yield m.group(1), proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def proxy_in_process(url, monkeypatch, env=None):
    """The proxy's server in this process (port 0); yields (grpc URL, its storage)."""
    from regsweep.search.proxy_server import start

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    server, storage, port = start(url, "127.0.0.1", 0)
    try:
        yield f"grpc://127.0.0.1:{port}", storage
    finally:
        server.stop(grace=1).wait()
        storage.engine.dispose()


class Sessions:
    """Samples ``pg_stat_activity`` of one database every 0.5 s (from the shared `test` database, so the sampler
    itself is not counted): the application_name of every session seen, and the most sessions at once."""

    def __init__(self, db):
        self.db, self.names, self.most, self.samples = db, set(), 0, 0
        self._stop = threading.Event()
        self._engine = sqlalchemy.create_engine(PG.format(db="test"), poolclass=sqlalchemy.pool.NullPool)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        with self._engine.connect() as conn:
            while not self._stop.is_set():
                rows = conn.execute(sqlalchemy.text("SELECT application_name FROM pg_stat_activity WHERE datname = :d"),
                                    {"d": self.db}).fetchall()
                conn.commit()
                self.names.update(r[0] for r in rows)
                self.most, self.samples = max(self.most, len(rows)), self.samples + 1
                self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self._engine.dispose()


# ------------------------------------------------------------------------------------ in process: seconds
def test_the_proxy_admits_within_the_budget_and_beats_for_the_worker(proxy_db, monkeypatch):
    """Admission in the proxy: RUNNING + COMPLETE + PRUNED never pass n_trials (a WAITING trial popped by ask
    included); a FAIL frees a place; an admitted trial has a heartbeat row at once."""
    from regsweep.search import optuna_internals as internals
    from regsweep.search.storage import open_storage

    url, _ = proxy_db
    with proxy_in_process(url, monkeypatch) as (grpc_url, served):
        storage = open_storage(grpc_url)
        study = optuna.create_study(storage=storage, study_name="adm")
        study.set_user_attr(BUDGET_ATTR, 2)
        study.enqueue_trial({"x": 1.0})  # an enqueue is never refused (it is WAITING)
        first, second = study.ask(), study.ask()
        assert first.params == {} and study.trials[0].state == TrialState.RUNNING  # the enqueued one, popped
        with pytest.raises(BudgetFull):
            study.ask()
        study.enqueue_trial({"x": 2.0})
        with pytest.raises(BudgetFull):  # the WAITING trial's move to RUNNING is refused as well
            study.ask()
        assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING, TrialState.RUNNING,
                                                                       TrialState.WAITING]
        study.tell(second, state=TrialState.FAIL)
        third = study.ask()
        assert third.number == 2  # the queued one
        study.tell(first, 1.0)
        study.tell(third, 2.0)
        beating = internals.beating_trial_ids(served, [internals.trial_id(t) for t in (first, second, third)])
        assert len(beating) == 3
        with pytest.raises(BudgetFull):  # two COMPLETE fill the budget
            study.ask()
    assert [t.state for t in trials_of(url, "adm")] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


def test_a_fused_group_asked_through_the_proxy_shares_its_structure_within_the_budget(proxy_db, monkeypatch):
    """fuse.ask_group through a storage proxy: each ask admitted by the proxy, the group at most the budget's room,
    the first trial's structural param fixed for the rest (issue 20); a freed slot's refill (ask_more) likewise."""
    from regsweep.search.fuse import ask_group, ask_more
    from regsweep.search.storage import open_storage

    def fixed(trial):
        trial.suggest_float("x", 0.0, 1.0)
        return {"bn": trial.suggest_categorical("bn", ["none", "before_act", "after_act"])}

    url, _ = proxy_db
    with proxy_in_process(url, monkeypatch) as (grpc_url, _served):
        study = optuna.create_study(storage=open_storage(grpc_url), study_name="grp",
                                    sampler=optuna.samplers.RandomSampler(seed=3))
        study.set_user_attr(BUDGET_ATTR, 3)
        trials, done = ask_group(study, grpc_url, 3, 8, fixed)
        assert done == 0 and len(trials) == 3
        assert len({t.params["bn"] for t in trials}) == 1 and len({t.params["x"] for t in trials}) == 3
        assert ask_group(study, grpc_url, 3, 8, fixed)[0] == []
        study.tell(trials[1], state=TrialState.PRUNED)  # a freed slot: the refill asks, the proxy admits none
        assert ask_more(study, grpc_url, 3, 2, {"bn": trials[0].params["bn"]}, fixed) == []
        study.set_user_attr(BUDGET_ATTR, 4)  # room for one more: admitted, with the group's structure
        more = ask_more(study, grpc_url, 4, 2, {"bn": trials[0].params["bn"]}, fixed)
        assert len(more) == 1 and more[0].params["bn"] == trials[0].params["bn"]
        for t in [trials[0], trials[2], *more]:
            study.tell(t, 0.5)
    assert [t.state for t in trials_of(url, "grp")] == [TrialState.COMPLETE, TrialState.PRUNED,
                                                         TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_silent_trial_fails_stale_in_the_proxy_and_is_requeued_once(proxy_db, monkeypatch):
    """A trial whose worker stops beating (heartbeats are attr writes the proxy turns into record_heartbeat) is
    failed by the proxy with `failed:stale heartbeat (worker ...)` and re-queued with its params, once."""
    from regsweep.search.loop import Heartbeat
    from regsweep.search.storage import open_storage

    url, _ = proxy_db
    with proxy_in_process(url, monkeypatch, FAST_HEARTBEAT) as (grpc_url, served):
        storage = open_storage(grpc_url)
        assert storage.get_heartbeat_interval() == 1
        study = optuna.create_study(storage=storage, study_name="stale")
        study.set_user_attr(BUDGET_ATTR, 5)
        live, dead = study.ask(), study.ask()
        live.suggest_float("x", 0, 1)
        dead.suggest_float("x", 0, 1)
        dead.set_user_attr("worker", "host:4242")
        with Heartbeat(study, trial_id(live)):  # beats through the proxy; `dead` never beats after admission
            time.sleep(4.5)
            served.sweep_stale()  # what the proxy's main loop does every heartbeat interval
        trials = study.get_trials(deepcopy=False)
        assert trials[live.number].state == TrialState.RUNNING
        assert trials[dead.number].state == TrialState.FAIL
        assert trials[dead.number].user_attrs["stop_reason"] == f"{STALE_REASON} (worker host:4242)"
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retries) == 1 and retries[0].state == TrialState.WAITING
        assert retries[0].params == dead.params and "stop_reason" not in retries[0].user_attrs
        served.sweep_stale()  # a second sweep finds nothing new
        assert len(study.get_trials(deepcopy=False)) == 3
        assert not any(k.startswith("regsweep:proxy") for t in trials for k in t.system_attrs)  # nothing stored


def test_the_worker_loop_through_the_proxy_requeues_a_terminated_trial_and_meets_the_budget(proxy_db, monkeypatch):
    """regsweep's own loop on a grpc:// URL: a trial ended `failed:terminated` (SIGTERM) is re-queued with its
    params through the proxy, the loop runs it first and stops at exactly the budget."""
    import io

    from regsweep.search.loop import ask_through_proxy, fail_trial, worker_loop
    from regsweep.search.storage import open_storage

    url, _ = proxy_db
    with proxy_in_process(url, monkeypatch) as (grpc_url, _):
        study = optuna.create_study(storage=open_storage(grpc_url), study_name="loop")
        study.set_user_attr(BUDGET_ATTR, 3)
        first, done = ask_through_proxy(study)
        assert done == 0 and first.user_attrs["worker"]
        x = first.suggest_float("x", 0.0, 1.0)
        fail_trial(study, trial_id(first), "failed:terminated", first, retry=True)

        def objective(trial):
            return trial.suggest_float("x", 0.0, 1.0)

        ran = worker_loop(study, objective, grpc_url, 3, out=io.StringIO(), poll=0.2)
        assert ran == 3
        assert ask_through_proxy(study) == (None, 3)  # the budget is done: refused, and the loop would exit 0
    trials = trials_of(url, "loop")
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[0].user_attrs["stop_reason"] == "failed:terminated"
    assert trials[1].system_attrs.get("failed_trial") == 0 and trials[1].params == {"x": x}


def test_a_worker_holds_the_study_lock_through_the_proxy(proxy_db, monkeypatch):
    """budget_lock on a grpc:// URL is the proxy's lock: a second holder asks again (each request waits at most
    LOCK_WAIT in the proxy, so waiters never fill its threads) until the first gives it back, and meanwhile the
    study admits no trial ("full for now": the worker's loop asks again)."""
    from regsweep.search.storage import open_storage
    from regsweep.search.study import budget_lock

    url, _ = proxy_db
    order = []
    with proxy_in_process(url, monkeypatch) as (grpc_url, _):
        study = optuna.create_study(storage=open_storage(grpc_url), study_name="lk")
        study.set_user_attr(BUDGET_ATTR, 5)

        def second():
            with budget_lock(grpc_url, "lk"):
                order.append("second")

        with budget_lock(grpc_url, "lk"):
            other = threading.Thread(target=second)
            other.start()
            with pytest.raises(BudgetFull):  # the lock is held: no admission (after ADMIT_WAIT)
                study.ask()
            time.sleep(0.5)
            order.append("first")
        other.join(timeout=10)
        assert study.ask().number == 0  # free again
    assert order == ["first", "second"]


def test_an_unreachable_proxy_is_one_line(monkeypatch):
    from regsweep.models.config import ConfigError
    from regsweep.search import storage

    monkeypatch.setattr(storage, "PROXY_WAIT", 0.5)
    with pytest.raises(ConfigError, match=r"cannot reach grpc://127\.0\.0\.1:1: no storage proxy answered"):
        storage.check_reachable("grpc://127.0.0.1:1")


# ------------------------------------------------------------------------------------ processes
@pytest.mark.procs
def test_workers_through_the_proxy_make_exactly_the_budget_and_only_the_proxy_connects(proxy_db, tmp_path, capsys):
    url, db = proxy_db
    workers, n = 3, 6  # 4 processes importing torch on 2 cores; the 16-worker run is `slow`
    spec = tmp_path / "px.yaml"
    spec.write_text(tiny_spec("px", n, 1, enqueue=True))
    with proxy_process(url) as (grpc_url, _), Sessions(db) as sessions:
        out, err = wait_ok(cli("run", str(spec), "--workers", str(workers), env={"REGSWEEP_STORAGE": grpc_url,
                                                                                 "REGSWEEP_PROGRESS": "plain"}),
                           timeout=120 + 15 * workers)
        from regsweep.search.cli import main  # status and export through grpc://, in this process (seconds saved)

        assert main(["status", "--storage", grpc_url, "--study-name", "px"]) == 0
        status = capsys.readouterr().out
        assert main(["export", "--storage", grpc_url, "--study-name", "px", "--format", "json"]) == 0
        exported = capsys.readouterr().out
    trials = trials_of(url, "px")
    assert_exact(trials, n)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert not failed, [t.user_attrs.get("stop_reason") for t in failed]  # no storage error
    assert f"started {workers} workers" in out
    assert sessions.samples >= 4 and sessions.names == {APP}, sessions.names  # nobody but the proxy connects
    assert sessions.most <= 10  # its pool (4 + 4) and a study lock or two
    assert "px" in status and "COMPLETE" in status
    assert '"model"' in exported


def _scale_worker_script() -> str:
    """benchmarks/scale.py's worker: regsweep's real worker loop (budget, ask, heartbeat, stale check, tell) on a
    torch-free objective (one suggested float, then a sleep), loaded by path (benchmarks/ is no package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("regsweep_bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WORKER


def _rss_mb(pid) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.db
@pytest.mark.procs
@pytest.mark.parametrize("workers", [16, pytest.param(64, marks=pytest.mark.slow)])  # the issue: CI 16, slow 64
def test_many_torch_free_workers_through_the_proxy_two_killed(proxy_db, tmp_path, workers):
    """K worker processes running regsweep's worker loop (importing no torch: tens of MB each) through one proxy on
    PostgreSQL, `max_connections` untouched; two SIGKILLed mid-trial. Exact budget, unique numbers, none RUNNING,
    the two trials failed stale naming their worker and retried once, no other FAIL (no storage error);
    pg_stat_activity, sampled every 0.5 s, shows only the proxy's sessions."""
    from regsweep.search.storage import open_storage
    from regsweep.search.study import BUDGET_ATTR

    url, db = proxy_db
    n, name = 2 * workers, "mx"
    # 64 workers on 2 cores wait seconds for the proxy: a 3-s grace would fail live trials as stale
    beat = FAST_HEARTBEAT if workers <= 16 else {"REGSWEEP_HEARTBEAT_INTERVAL": "2", "REGSWEEP_GRACE_PERIOD": "30"}
    script = tmp_path / "worker.py"
    script.write_text(_scale_worker_script())
    with proxy_process(url, beat) as (grpc_url, _), Sessions(db) as sessions:
        watch = open_storage(grpc_url)  # this test reads through the proxy too: nobody else may connect
        optuna.create_study(study_name=name, storage=watch).set_user_attr(BUDGET_ATTR, n)
        procs = [subprocess.Popen([sys.executable, "-P", str(script), grpc_url, name, str(n), "1.0"],
                                  env={**PROCS_ENV, **beat}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True) for _ in range(workers)]
        try:
            deadline, victims, rss = time.monotonic() + 120, [], 0.0
            while len(victims) < 2 and time.monotonic() < deadline:
                running = [t for t in optuna.load_study(study_name=name, storage=watch).get_trials(deepcopy=False)
                           if t.state == TrialState.RUNNING and "worker" in t.user_attrs and t.params]  # mid-trial
                victims = running[:2]
                rss = max([rss] + [_rss_mb(p.pid) for p in procs])
                time.sleep(0.2)
            assert len(victims) == 2, "two trials did not start"
            pids = [int(v.user_attrs["worker"].rsplit(":", 1)[1]) for v in victims]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for p in procs:
                if p.pid in pids:
                    p.wait()
                else:
                    _, err = p.communicate(timeout=300)
                    assert p.returncode == 0, err[-3000:]
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
    trials = trials_of(url, name)
    assert_exact(trials, n)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == sorted(v.number for v in victims), \
        [t.user_attrs.get("stop_reason") for t in failed]  # no storage error
    for victim in victims:
        assert trials[victim.number].user_attrs["stop_reason"] == \
            f"{STALE_REASON} (worker {victim.user_attrs['worker']})"
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert len(retries) == 1 and retries[0].params == victim.params == trials[victim.number].params
    assert sessions.samples >= 4 and sessions.names == {APP}, sessions.names
    assert sessions.most <= 10
    assert 0 < rss < 200, f"a worker held {rss:.0f} MB: did the worker loop import torch?"  # ~50 MB; torch: ~600


@pytest.mark.slow  # `make test` keeps the lock through the proxy in process (test_a_worker_holds_the_study_lock...)
@pytest.mark.procs
def test_workers_started_at_the_same_instant_through_the_proxy_make_one_study(proxy_db, tmp_path):
    """Study creation and its enqueue under the proxy's study lock: one study, the base config enqueued once."""
    url, _ = proxy_db
    spec = tmp_path / "si.yaml"
    spec.write_text(tiny_spec("si", 4, 1, enqueue=True))
    with proxy_process(url) as (grpc_url, _):
        procs = [cli("worker", str(spec), env={"REGSWEEP_STORAGE": grpc_url}) for _ in range(3)]
        for p in procs:
            wait_ok(p)
    assert optuna.get_all_study_names(url) == ["si"]
    trials = trials_of(url, "si")
    assert_exact(trials, 4)
    assert sum(bool(t.user_attrs.get("regsweep:base")) for t in trials) == 1  # enqueued once


@pytest.mark.slow  # ~40 s; `make test` keeps the proxy's stale failing and retry in process (above)
@pytest.mark.procs
def test_killed_workers_trials_fail_stale_through_the_proxy_and_are_retried_once(proxy_db, tmp_path):
    """Two of three workers SIGKILLed mid-trial: the proxy fails each trial `failed:stale heartbeat (worker ...)`
    and re-queues it once; the third worker finishes exactly the budget."""
    url, _ = proxy_db
    spec = tmp_path / "kx.yaml"
    spec.write_text(tiny_spec("kx", 4, 10, enqueue=True).replace(TINY_MODEL, slow_net(tmp_path, 0.1)))
    with proxy_process(url, FAST_HEARTBEAT) as (grpc_url, _):
        env = {**FAST_HEARTBEAT, "REGSWEEP_STORAGE": grpc_url}
        procs = [cli("worker", str(spec), env=env) for _ in range(3)]
        try:
            deadline, victims = time.monotonic() + 120, []
            while len(victims) < 2 and time.monotonic() < deadline:
                victims = [t for t in trials_of(url, "kx") if t.state == TrialState.RUNNING
                           and "worker" in t.user_attrs and t.intermediate_values][:2]
                time.sleep(0.25)
            assert len(victims) == 2, "two trials did not start training"
            pids = [int(v.user_attrs["worker"].rsplit(":", 1)[1]) for v in victims]
            killed = [p for p in procs if p.pid in pids]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for p in killed:
                p.wait()
            for p in procs:
                if p not in killed:
                    wait_ok(p, timeout=240)
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
    trials = trials_of(url, "kx")
    assert_exact(trials, 4)
    for victim in victims:
        dead = trials[victim.number]
        assert dead.state == TrialState.FAIL
        assert dead.user_attrs["stop_reason"] == f"{STALE_REASON} (worker {victim.user_attrs['worker']})"
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert len(retries) == 1 and retries[0].params == victim.params
        assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert sum(t.state == TrialState.FAIL for t in trials) == 2  # nothing else failed (no storage error)
