"""`regsweep storage-proxy`: Optuna's gRPC storage proxy in front of ONE database, serving a storage that keeps
regsweep's budget and liveness contracts for workers that never connect to the database themselves.

The proxy serves :func:`proxy_storage`, an RDBStorage (heartbeats on, regsweep's stale-trial retry) that adds:

- **Admission.** A trial of a regsweep study (one with a ``regsweep:n_trials`` user attr) moves to RUNNING
  (``create_new_trial`` without a template, or a WAITING trial set RUNNING by ``ask``) only under the study's
  lock: a per-study lock in this process, then the study's budget lock on the database (search/study.py
  ``budget_lock``: the advisory lock on this process's own connection, so workers talking to the database
  directly are excluded too). Under it: stale trials are failed and re-queued, then COMPLETE + PRUNED + RUNNING
  is counted by one GROUP BY; at ``n_trials`` the move is refused (text search/proxy.py FULL; the worker sees
  BudgetFull and waits or exits). An admitted trial gets its first heartbeat at once, on this clock.
- **Heartbeats.** A worker's ``set_trial_system_attr(id, HEARTBEAT_KEY, ...)`` becomes ``record_heartbeat(id)``
  (the database's row, this process's clock); nothing is stored. A thread here fails stale trials of every
  study every heartbeat interval (as admission does), with the stop reason
  ``failed:stale heartbeat (worker HOST:PID)`` and Optuna's retry of the same params (at most MAX_RETRY).
- **Lock leases.** ``set_study_system_attr(_, LOCK_KEY, {study, op, token})`` takes or gives back the same
  study lock for a worker (study creation and enqueue, the MLflow study run); a lease older than LEASE seconds
  is taken back (its holder died). Nothing is stored.

The proxy's connections: a pool of POOL_SIZE (+ POOL_OVERFLOW) and one per held study lock.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Optional

from regsweep.models.config import ConfigError
from regsweep.search.proxy import BUSY, FULL, HEARTBEAT_KEY, LEASE, LOCK_KEY, LOCK_WAIT
from regsweep.search.storage import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    env_seconds,
    retry_transient,
    stale_trial_callback,
)
from regsweep.search.study import BUDGET_ATTR, budget_lock
from regsweep.search.urls import check_url, is_proxy, mask, reason

APPLICATION_NAME = "regsweep-storage-proxy"  # PostgreSQL's application_name of every connection of the proxy
POOL_SIZE, POOL_OVERFLOW = 4, 4
THREADS = 64  # gRPC server threads: calls served at once (a waiting lock request or admission holds one, briefly)
ADMIT_WAIT = 2.0  # seconds an admission waits for a study lock a worker holds before it says "full for now"


class Lease:
    """One study's lock in the proxy: a threading lock, and the database lock held while it is taken."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.token: Optional[str] = None
        self.since = 0.0
        self.held: Optional[contextlib.ExitStack] = None


def storage_class():
    """``ProxyStorage`` (an RDBStorage subclass), built on first use: Optuna is imported lazily. (Long: its body
    is the class's, defined here rather than at module level so that importing this module imports no Optuna.)"""
    cls = globals().get("ProxyStorage")
    if cls is not None:
        return cls
    import optuna
    from optuna.trial import TrialState

    from regsweep.search.optuna_internals import state_counts, study_id_of_trial

    class ProxyStorage(optuna.storages.RDBStorage):
        """The storage a `regsweep storage-proxy` serves (see the module's docstring)."""

        def setup_proxy(self, url: str) -> None:
            self.proxy_url = url
            self._guard = threading.Lock()
            self._leases: dict[str, Lease] = {}
            self._studies: dict[int, optuna.Study] = {}

        # ---------------------------------------------------------------- study locks
        def _lease(self, name: str) -> Lease:
            with self._guard:
                return self._leases.setdefault(name, Lease())

        def take(self, name: str, token: str, timeout: float = 600.0) -> None:
            """Take the study's lock within ``timeout`` seconds (TimeoutError with BUSY in its text otherwise)."""
            lease, deadline = self._lease(name), time.monotonic() + timeout
            while not lease.lock.acquire(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                held_by = lease.token
                if held_by is not None and time.monotonic() - lease.since > LEASE:
                    self.give(name, held_by)  # its holder stopped talking: the lease is taken back
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{BUSY}: the lock of study '{name}' is held")
            held = contextlib.ExitStack()
            try:
                held.enter_context(budget_lock(self.proxy_url, name))
            except BaseException:
                lease.lock.release()
                raise
            with self._guard:
                lease.token, lease.since, lease.held = token, time.monotonic(), held

        def give(self, name: str, token: str) -> None:
            lease = self._lease(name)
            with self._guard:
                if lease.token != token:
                    return  # given back already (or taken back after its lease)
                held, lease.token, lease.held = lease.held, None, None
            try:
                if held is not None:
                    held.close()
            finally:
                lease.lock.release()

        @contextlib.contextmanager
        def locked(self, name: str):
            token = f"sweep-{threading.get_ident()}-{time.monotonic_ns()}"
            self.take(name, token)
            try:
                yield
            finally:
                self.give(name, token)

        # ---------------------------------------------------------------- admission
        def study(self, study_id: int):
            with self._guard:
                study = self._studies.get(study_id)
            if study is None:
                study = optuna.load_study(study_name=self.get_study_name_from_id(study_id), storage=self)
                with self._guard:
                    self._studies[study_id] = study
            return study

        def budget_of(self, study_id: int) -> Optional[int]:
            value = self.get_study_user_attrs(study_id).get(BUDGET_ATTR)
            return int(value) if value is not None else None

        def fail_stale(self, study) -> None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)

        def admit(self, study_id: int, move):
            """``move()`` (the change to RUNNING) under the study's lock while the budget has room; refused with
            FULL in the error text when COMPLETE + PRUNED + RUNNING trials fill it."""
            n_trials = self.budget_of(study_id)
            if n_trials is None:  # not a regsweep study (a plain Optuna client): no budget to keep
                return move()
            study = self.study(study_id)
            name, token = study.study_name, f"admission-{threading.get_ident()}-{time.monotonic_ns()}"
            try:
                self.take(name, token, ADMIT_WAIT)
            except TimeoutError:  # a worker holds the study's lock: "full for now", the worker asks again soon
                raise RuntimeError(f"{FULL}: the study's lock is busy") from None
            try:
                retry_transient(self.fail_stale, study)
                counts = state_counts(study) or {}
                taken = sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "RUNNING"))
                if taken >= n_trials:
                    raise RuntimeError(f"{FULL}: {taken} of {n_trials} trials of '{name}' are COMPLETE, PRUNED or "
                                       "RUNNING")
                return move()
            finally:
                self.give(name, token)

        def create_new_trial(self, study_id, template_trial=None):
            if template_trial is not None and template_trial.state != TrialState.RUNNING:
                return super().create_new_trial(study_id, template_trial)  # an enqueue (WAITING): not admission
            trial_id = self.admit(study_id, lambda: super(ProxyStorage, self).create_new_trial(study_id,
                                                                                            template_trial))
            self.record_heartbeat(trial_id)  # a worker that dies before its first beat still goes stale
            return trial_id

        def set_trial_state_values(self, trial_id, state, values=None):
            if state != TrialState.RUNNING:
                return super().set_trial_state_values(trial_id, state, values)
            study_id = study_id_of_trial(self, trial_id)
            moved = self.admit(study_id, lambda: super(ProxyStorage, self).set_trial_state_values(trial_id, state,
                                                                                                  values))
            if moved:
                self.record_heartbeat(trial_id)
            return moved

        # ---------------------------------------------------------------- intercepted writes
        def set_trial_system_attr(self, trial_id, key, value):
            if key == HEARTBEAT_KEY:
                self.record_heartbeat(trial_id)
                return
            super().set_trial_system_attr(trial_id, key, value)

        def set_study_system_attr(self, study_id, key, value):
            if key != LOCK_KEY:
                return super().set_study_system_attr(study_id, key, value)
            if not isinstance(value, dict) or value.get("op") not in ("acquire", "release"):
                raise ValueError(f"{LOCK_KEY}: {str(value)[:80]!r} is not a lock request")
            name, token = str(value.get("study")), str(value.get("token"))
            if value["op"] == "acquire":  # waits LOCK_WAIT at most: a waiting request holds a server thread
                self.take(name, token, LOCK_WAIT)
            else:
                self.give(name, token)

        # ---------------------------------------------------------------- the stale sweep
        def sweep_stale(self) -> None:
            """Fail stale trials of every study: a study with a budget under its lock (a failure and its retry are
            one step for admission). Only trials with a heartbeat row can go stale: those of regsweep workers
            (a confirm study's too), never a plain Optuna client's, which never beats."""
            for frozen in self.get_all_studies():
                study = self.study(self.get_study_id_from_name(frozen.study_name))
                with self.locked(study.study_name) if BUDGET_ATTR in frozen.user_attrs else contextlib.nullcontext():
                    retry_transient(self.fail_stale, study)

    ProxyStorage.__module__ = __name__
    globals()["ProxyStorage"] = ProxyStorage
    return ProxyStorage


def with_application_name(url: str) -> str:
    """A PostgreSQL URL with ``application_name=regsweep-storage-proxy`` (unless it names one): the proxy's
    connections are then told apart in ``pg_stat_activity``."""
    if check_url(url) != "postgresql" or "application_name=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}application_name={APPLICATION_NAME}"


def proxy_storage(url: str):
    """The storage a proxy serves for ``url`` (a database URL; never another proxy)."""
    import warnings

    import optuna
    import sqlalchemy.exc

    if is_proxy(url):
        raise ConfigError(f"$REGSWEEP_STORAGE: {mask(url)} is not allowed; the proxy needs a database URL "
                          "(postgresql://, mysql+pymysql:// or sqlite:///), not another proxy")
    url = with_application_name(url)
    engine: dict = {"pool_pre_ping": True}
    if check_url(url) == "sqlite":
        engine["connect_args"] = {"timeout": 60}
    else:
        engine.update(pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_recycle=300, pool_timeout=120)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = retry_transient(
                storage_class(), url, engine_kwargs=engine,
                heartbeat_interval=env_seconds("REGSWEEP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
                grace_period=env_seconds("REGSWEEP_GRACE_PERIOD", GRACE_PERIOD),
                heartbeat_stale_trial_callback=stale_trial_callback())
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"storage: cannot open {mask(url)}: {reason(exc, url)}") from None
    storage.setup_proxy(url)
    return storage


def start(url: str, host: str, port: int):
    """Start serving ``url`` on ``host:port`` (0: a free port); returns (grpc server, storage, bound port)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from regsweep.search.optuna_internals import add_servicer

    storage = proxy_storage(url)
    server = grpc.server(ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="regsweep-proxy"))
    add_servicer(server, storage)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises when it cannot bind
        bound = 0
    if not bound:
        storage.engine.dispose()
        raise ConfigError(f"--port: cannot listen on {host}:{port} (in use, or not an address of this machine)")
    server.start()
    return server, storage, bound


def serve(url: str, host: str, port: int, *, out=None, stop: Optional[threading.Event] = None) -> int:
    """Serve ``url`` on ``host:port`` until SIGTERM/SIGINT (or ``stop``), failing stale trials every heartbeat
    interval; prints one line with the bound address first."""
    import signal

    out = out or sys.stdout
    server, storage, bound = start(url, host, port)
    interval = storage.get_heartbeat_interval()
    print(f"storage-proxy: serving {mask(url)} on grpc://{host}:{bound} (heartbeat {interval} s, grace "
          f"{storage.grace_period} s)", file=out, flush=True)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(interval):
            try:
                storage.sweep_stale()
            except Exception as exc:  # noqa: BLE001 - a database outage: the next sweep (and admission) retries
                print(f"storage-proxy: stale check failed ({reason(exc, url)}); retrying", file=out, flush=True)
    finally:
        server.stop(grace=2).wait()
        storage.engine.dispose()
    return 0
