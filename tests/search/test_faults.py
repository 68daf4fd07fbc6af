"""Faults (issue 16): a killed coordinator, a worker killed by a signal, a database outage, stale trials.

No worker is lost with its coordinator, `run` says when a worker died, every FAIL has its stop reason, and a
trial failed from outside itself (database outage, stale worker) is retried with the same params. The outage is
made WITHOUT touching the shared database servers: a loopback TCP proxy of this test stands between the
workers and the database and is cut (listening socket closed, every relayed connection dropped), then restored.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from regsweep.search import optuna_internals as internals
from regsweep.search.loop import FailureStreak, ask_within_budget, fail_stale, run_one
from regsweep.search.record import history
from regsweep.search.storage import database_reason, open_storage, worker_label
from tests.search.conftest import (  # pytest (importlib mode) registers it
    TINY_MODEL,
    assert_exact,
    slow_net,
    tiny_spec,
    trials_of,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAST_HEARTBEAT = {"REGSWEEP_HEARTBEAT_INTERVAL": "1", "REGSWEEP_GRACE_PERIOD": "3"}
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

EXTERNAL = ("failed:database: ", "failed:stale heartbeat (worker ")


# ------------------------------------------------------------------------------------ helpers
def write_spec(tmp_path, name, n, epochs, pause=None):
    """The tiny spec (base config enqueued); with ``pause`` its model is SLOW_NET (each training batch sleeps
    ``pause`` seconds)."""
    path = tmp_path / f"{name}.yaml"
    text = tiny_spec(name, n, epochs, enqueue=True)
    if pause is not None:
        text = text.replace(TINY_MODEL, slow_net(tmp_path, pause))
    path.write_text(text)
    return path


def start_run(spec, url, workers, env=None):
    """`regsweep run --workers N` in its own session (the workers' log directory under the spec's, through
    TMPDIR); returns (process, worker pids) once they started."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(spec.parent), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", "run", str(spec), "--storage", url,
                             "--workers", str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if line.startswith("started "):
            return proc, [int(p) for p in re.findall(r"pid (\d+)", line)]
        if not line and proc.poll() is not None:
            break
    kill(proc.pid)
    raise AssertionError("the workers did not start:\n" + "".join(seen) + proc.stderr.read()[-3000:])


def drain(proc):
    """Read the process's pipes in the background (a full pipe must not stall it); returns the collected text."""
    got = {"out": [], "err": []}
    for key, stream in (("out", proc.stdout), ("err", proc.stderr)):
        threading.Thread(target=lambda s=stream, k=key: got[k].extend(iter(s.readline, "")), daemon=True).start()
    return got


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (dead) parent's reaper is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(*pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_training(url, name, pids, logs, count=1, timeout=90):
    """Until ``count`` trials are RUNNING with at least one recorded epoch; else the workers' stacks and logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [t for t in trials_of(url, name) if t.state == TrialState.RUNNING and history(t)]
        if len(live) >= count:
            return live
        time.sleep(0.25)
    for pid in pids:  # `kill -USR1`: each worker's stacks into its log (faulthandler, search/cli.py)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(1)
    text = "".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("regsweep-workers-*/*")))
    raise AssertionError(f"{count} trials did not start training in {timeout}s: {trials_of(url, name)}\n{text}")


def check_reasons_and_retries(trials):
    """Every FAIL has a stop reason; each failed from outside (outage, stale worker) was retried exactly once
    with its params; returns those."""
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("stop_reason", "").startswith("failed:") for t in failed), \
        [(t.number, t.user_attrs.get("stop_reason")) for t in failed]
    external = [t for t in failed if t.user_attrs["stop_reason"].startswith(EXTERNAL)]
    for t in external:
        retries = [r for r in trials if (r.system_attrs.get("retry_history") or [None])[-1] == t.number]
        assert len(retries) == 1 and retries[0].params == t.params, (t.number, [r.number for r in retries])
        assert retries[0].state != TrialState.RUNNING
    return external


# ------------------------------------------------------------------------------------ a loopback TCP proxy
class Proxy:
    """127.0.0.1:<port> relayed to the database's port, one thread per direction of each connection.

    ``cut()`` closes the listening socket (a new connection is refused) and drops every relayed connection;
    ``restore()`` listens again on the same port. It closes itself after ``lifetime`` seconds whatever happens,
    so no test can leave it running."""

    def __init__(self, target_port, lifetime=240.0):
        self.target = ("127.0.0.1", target_port)
        self.port = None
        self.lock = threading.Lock()
        self.socks = set()
        self.listening = threading.Event()
        self.accepter = None
        self.timer = threading.Timer(lifetime, self.close)
        self.timer.daemon = True

    def __enter__(self):
        self.restore()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def url(self, url):
        return re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{self.port}/", url)

    def restore(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self.listening.set()
        self.accepter = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self.accepter.start()

    def _accept(self, listener):
        with listener:  # closed by this thread when the proxy is cut: the port then refuses connections
            while self.listening.is_set():
                try:
                    client, _ = listener.accept()
                except (TimeoutError, BlockingIOError):
                    continue
                except OSError:
                    return
                client.settimeout(None)
                try:
                    upstream = socket.create_connection(self.target)
                except OSError:
                    client.close()
                    continue
                with self.lock:
                    self.socks |= {client, upstream}
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            self._drop(s)

    def _drop(self, s):
        with self.lock:
            self.socks.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self):
        self.listening.clear()
        if self.accepter is not None:
            self.accepter.join(timeout=5)
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            self._drop(s)

    def close(self):
        self.timer.cancel()
        self.cut()


# ------------------------------------------------------------------------------------ in-process: reasons
def test_a_stale_trial_gets_its_reason_with_the_worker_and_a_clean_retry(tmp_path, monkeypatch):
    """Optuna's fail_stale_trials fails the trial; the reason names the worker that held it (written at ask)."""
    monkeypatch.setenv("REGSWEEP_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("REGSWEEP_GRACE_PERIOD", "1")
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    trial, _ = ask_within_budget(study, url, 5)  # writes the worker attr and the first heartbeat
    trial.suggest_float("x", 0, 1)
    assert trial.user_attrs["worker"] == worker_label()
    time.sleep(2.3)
    fail_stale(study)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["stop_reason"] == f"failed:stale heartbeat (worker {worker_label()})"
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert "stop_reason" not in trials[1].user_attrs  # the retry does not carry the failed end
    callback = study._storage.get_heartbeat_stale_trial_callback()
    assert isinstance(pickle.loads(pickle.dumps(callback)), optuna.storages.RetryHeartbeatStaleTrialCallback)


@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_a_finished_trial_takes_its_reason_on_every_storage(storage_url):
    url, name = storage_url
    study = optuna.create_study(storage=open_storage(url, heartbeat=False), study_name=name)
    trial = study.ask()
    trial.set_user_attr("stop_reason", "old")
    study.tell(trial, state=TrialState.FAIL)
    backend = internals.rdb_backend(internals.study_storage(study))
    internals.set_finished_trial_user_attr(backend, internals.trial_id(trial), "stop_reason", "failed:x (y)")
    internals.set_finished_trial_user_attr(backend, internals.trial_id(trial), "worker", "h:1")
    attrs = optuna.load_study(study_name=name, storage=url).trials[0].user_attrs
    assert attrs == {"stop_reason": "failed:x (y)", "worker": "h:1"}


def refused_error():
    """A real OperationalError of a connection refused (nothing listens on the port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = sqlalchemy.create_engine(f"postgresql://postgres@127.0.0.1:{port}/test",
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        engine.connect()
    except sqlalchemy.exc.OperationalError as exc:
        return exc
    raise AssertionError("connected to a closed port")


def test_a_trial_failed_by_a_lost_database_gets_the_reason_and_is_retried(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="d")
    error = refused_error()
    reason = database_reason(error)
    assert reason.startswith("failed:database: OperationalError: ") and "refused" in reason, reason
    assert database_reason(ValueError("x")) is None

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        raise error

    trial, _ = ask_within_budget(study, url, 5)
    frozen = run_one(study, trial, objective)
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["stop_reason"] == reason
    trials = optuna.load_study(study_name="d", storage=url).trials
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == 0

    def own_error(trial):  # a trial's own error: its reason, no retry
        raise KeyError("boom")

    trial, _ = ask_within_budget(study, url, 5)  # pops the retry
    assert trial.number == 1
    assert run_one(study, trial, own_error).user_attrs["stop_reason"] == "failed:KeyError: 'boom'"
    assert len(optuna.load_study(study_name="d", storage=url).trials) == 2


def test_the_summary_groups_the_new_reasons():
    from regsweep.search.report import stop_reason_kind

    assert stop_reason_kind("failed:stale heartbeat (worker host-1:4242)") == "failed:stale heartbeat"
    assert stop_reason_kind("failed:database: OperationalError: server closed the connection") == "failed:database"
    assert stop_reason_kind("failed:RuntimeError: x (y)") == "failed:RuntimeError"


def test_outside_failures_do_not_count_in_the_failure_streak():
    class T:
        state = TrialState.FAIL

        def __init__(self, reason):
            self.user_attrs = {"stop_reason": reason}

    streak = FailureStreak(limit=2)
    for reason in ("failed:database: OperationalError: x", "failed:stale heartbeat (worker h:1)") * 3:
        streak.add(T(reason))
    assert not streak.broken
    streak.add(T("failed:ValueError: nan"))
    streak.add(T("failed:ValueError: nan"))
    assert streak.broken


# ------------------------------------------------------------------------------------ processes
def killed_line(err, label, pid):
    lines = [line for line in err.splitlines() if "killed" in line]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: worker {label} (pid {pid}) was killed by SIGKILL; its log: "), lines[0]
    assert lines[0].endswith(f"/{label}.err")


@pytest.mark.procs
def test_run_exits_1_naming_a_worker_killed_by_a_signal(tmp_path):
    """A worker killed as it starts: the other one runs the budget, and `run` says which worker died how."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    spec = write_spec(tmp_path, "k", n=2, epochs=2)
    proc, pids = start_run(spec, url, 2, env={"REGSWEEP_PROGRESS": "off"})
    try:
        os.kill(pids[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc.pid, *pids)
    assert proc.returncode == 1, (proc.returncode, out[-2000:], err[-2000:])  # was 0
    killed_line(err, "w1", pids[1])
    assert_exact(trials_of(url, "k"), 2)


@pytest.mark.slow
@pytest.mark.procs
def test_a_killed_workers_trial_fails_stale_naming_the_worker_and_is_retried(tmp_path):
    """kill -9 of a worker mid-trial: its trial goes stale with its reason and is retried; `run` exits 1."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    spec = write_spec(tmp_path, "k", n=3, epochs=15, pause=0.1)
    proc, pids = start_run(spec, url, 2, env={**FAST_HEARTBEAT, "REGSWEEP_PROGRESS": "off"})
    try:
        victim = wait_training(url, "k", pids, tmp_path)[0]
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc.pid, *pids)
    assert proc.returncode == 1, (proc.returncode, out[-2000:], err[-2000:])
    killed_line(err, f"w{pids.index(pid)}", pid)
    trials = trials_of(url, "k")
    assert_exact(trials, 3)
    dead = trials[victim.number]
    assert dead.user_attrs["stop_reason"] == f"failed:stale heartbeat (worker {victim.user_attrs['worker']})"
    assert dead.number in [t.number for t in check_reasons_and_retries(trials)]


@pytest.mark.db
@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["postgresql", "mysql"], indirect=True)
def test_a_killed_coordinator_leaves_its_workers_running_to_the_budget(storage_url, tmp_path):
    url, name = storage_url
    n = 6
    spec = write_spec(tmp_path, name, n=n, epochs=10, pause=0.05)
    proc, pids = start_run(spec, url, 2, env={"REGSWEEP_PROGRESS": "off"})
    try:
        wait_training(url, name, pids, tmp_path)
        done_at_kill = sum(t.state in DONE for t in trials_of(url, name))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(0.5)
        assert all(alive(pid) for pid in pids), "a worker died with its coordinator"
        deadline = time.monotonic() + 90
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids), "the workers did not finish"
    finally:
        kill(proc.pid, *pids)
    trials = trials_of(url, name)
    assert done_at_kill < n
    assert_exact(trials, n)  # the trials after the kill were run by the orphaned workers
    check_reasons_and_retries(trials)


def outage(storage_url, tmp_path, seconds):
    """`run --workers 2` through the proxy; cut it for ``seconds`` while two trials train; then restored."""
    url, name = storage_url
    n = 2  # both fail in the outage (each still has seconds to train) and their retries fill the budget
    spec = write_spec(tmp_path, name, n=n, epochs=12, pause=0.1)
    port = int(re.search(r"@127\.0\.0\.1:(\d+)/", url).group(1))
    with Proxy(port) as proxy:
        proc, pids = start_run(spec, proxy.url(url), 2, env=FAST_HEARTBEAT)
        got = drain(proc)
        try:
            wait_training(url, name, pids, tmp_path, count=2)
            proxy.cut()
            cut_at = time.monotonic()
            with pytest.raises(ConnectionRefusedError):  # the database is gone for the workers
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            time.sleep(max(0.0, seconds - (time.monotonic() - cut_at)))
            with pytest.raises(ConnectionRefusedError):  # ... for the whole window
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            proxy.restore()
            proc.wait(timeout=150)
        finally:
            kill(proc.pid, *pids)
    out, err = "".join(got["out"]), "".join(got["err"])
    assert proc.returncode == 0, (proc.returncode, out[-3000:], err[-3000:])
    trials = trials_of(url, name)
    external = check_reasons_and_retries(trials)  # no trial without a reason; those failed by it: retried
    assert external, ([(t.number, t.state.name, t.user_attrs.get("stop_reason")) for t in trials], out[-2000:])
    assert_exact(trials, n)


@pytest.mark.db
@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["postgresql", "mysql"], indirect=True)
def test_a_database_outage_fails_trials_with_the_reason_and_retries_them(storage_url, tmp_path):
    outage(storage_url, tmp_path, seconds=6)


@pytest.mark.slow
@pytest.mark.db
@pytest.mark.procs
@pytest.mark.parametrize("storage_url", ["postgresql", "mysql"], indirect=True)
def test_a_20_second_database_outage(storage_url, tmp_path):
    outage(storage_url, tmp_path, seconds=20)
