"""Storage URL -> Optuna storage: opening, environment checks, retries, stale trials, batched trial writes.

RDB studies beat a heartbeat and retry stale trials. The URL as text (precedence, checks, password masking)
is search/urls.py: anything printed or stored shows a URL only through its :func:`~regsweep.search.urls.mask`.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

from regsweep.models.config import ConfigError
from regsweep.search import optuna_internals as internals
from regsweep.search.urls import check_sqlite_path, check_url, grpc_address, is_proxy, mask, reason, sqlite_file

HEARTBEAT_INTERVAL = 30  # seconds between a running trial's heartbeats ($REGSWEEP_HEARTBEAT_INTERVAL)
GRACE_PERIOD = 90  # a RUNNING trial without a heartbeat this long is failed and retried ($REGSWEEP_GRACE_PERIOD)
MAX_RETRY = 2
RETRIES = 5  # attempts of one write when the database dropped the connection
REASON_ATTEMPTS = 10  # ~30 s of attempts to record a failed trial's stop reason
STALE_REASON = "failed:stale heartbeat"  # + " (worker HOST:PID)": the worker that held it stopped beating
DATABASE_REASON = "failed:database"  # + ": <short reason>": a lost connection or a database outage
EXTERNAL_REASONS = (STALE_REASON, DATABASE_REASON)  # failed from outside the trial: retried with its params


MAX_SECONDS = 86400  # a heartbeat interval or grace period longer than a day is a typo


def env_seconds(env: str, default: int) -> int:
    value = os.environ.get(env)
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", value) or not 1 <= int(value) <= MAX_SECONDS:
        raise ConfigError(f"${env}: {value[:40]!r} is not allowed; must be a whole number of seconds, "
                          f"1..{MAX_SECONDS}")
    return int(value)


def check_env() -> None:
    """The storage's environment variables ($REGSWEEP_DB_POOL, $REGSWEEP_HEARTBEAT_INTERVAL,
    $REGSWEEP_GRACE_PERIOD), checked before anything is created, whatever the storage; ConfigError."""
    _pool_options()
    interval = env_seconds("REGSWEEP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
    grace = env_seconds("REGSWEEP_GRACE_PERIOD", GRACE_PERIOD)
    if grace <= interval:
        raise ConfigError(f"$REGSWEEP_GRACE_PERIOD: {grace} is not allowed; must exceed the heartbeat interval "
                          f"({interval} s, $REGSWEEP_HEARTBEAT_INTERVAL), or live trials are failed as stale")


POOLS = ("single", "null")


def _pool_options() -> dict:
    """Engine pool of a worker process, from $REGSWEEP_DB_POOL.

    - ``single`` (default): one persistent connection per process plus one overflow connection (Optuna's
      storage opens a second one while it starts, and the heartbeat thread may need one), checked with
      pre-ping and recycled every 5 minutes. 2.5x (PostgreSQL) to 7x (MySQL) faster per trial than
      reconnecting; N workers hold N to 2N connections.
    - ``null``: a new connection per operation (NullPool): no idle connections at all, for more workers than
      the server's max_connections allows (or put pgbouncer / Optuna's gRPC storage proxy in front).
    """
    kind = os.environ.get("REGSWEEP_DB_POOL", "single")
    if kind not in POOLS:
        raise ConfigError(f"$REGSWEEP_DB_POOL: {kind[:40]!r} is not allowed; choose one of: {', '.join(POOLS)}")
    if kind == "null":
        from sqlalchemy.pool import NullPool

        return {"poolclass": NullPool}
    return {"pool_size": 1, "max_overflow": 1, "pool_recycle": 300, "pool_timeout": 120}




def check_reachable(url: str) -> None:
    """Connect and run ``SELECT 1`` without creating tables or files; ConfigError when that fails."""
    import sqlalchemy
    import sqlalchemy.exc

    if check_url(url) == "sqlite":
        check_sqlite_path(url)
        return  # the file is created on first use
    if is_proxy(url):
        open_proxy(url, wait=PROXY_WAIT).close()
        return
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"storage: cannot reach {mask(url)}: {reason(exc, url)}") from None


PROXY_WAIT = 10.0  # seconds a command waits for a `regsweep storage-proxy` to answer


def open_proxy(url: str, *, heartbeat: bool = False, wait: float = PROXY_WAIT):
    """A storage reached through the `regsweep storage-proxy` of a ``grpc://HOST:PORT`` URL (search/proxy.py);
    ConfigError when grpcio is missing or nothing answers there within ``wait`` seconds."""
    host, port = grpc_address(url)
    try:
        from regsweep.search.proxy import connect

        interval = env_seconds("REGSWEEP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL) if heartbeat else None
        return connect(host, port, heartbeat_interval=interval, wait=wait)
    except ImportError as exc:
        raise ConfigError(f"storage: {mask(url)} needs grpcio ({exc.name or exc}); install regsweep[grpc]") from None
    except ConnectionError:
        raise ConfigError(f"storage: cannot reach {mask(url)}: no storage proxy answered in {wait:.0f} s "
                          "(start one with `regsweep storage-proxy`)") from None


def open_existing(url: str):
    """A read-only view of an EXISTING storage (no file, table or study is created), or None."""
    import optuna
    import sqlalchemy
    import sqlalchemy.exc

    if is_proxy(url):
        return open_proxy(url)  # the proxy's database: the proxy made its tables when it started
    if check_url(url) == "sqlite":
        check_sqlite_path(url)
        file = sqlite_file(url)
        if file is None or not file.is_file():
            return None
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            tables = set(sqlalchemy.inspect(engine).get_table_names())
            # Optuna stamps alembic_version LAST when it creates a schema, and RDBStorage() stamps it itself
            # when it finds it empty: opening before the stamp races the creator (UNIQUE alembic_version).
            stamped = False
            if "alembic_version" in tables:
                with engine.connect() as conn:
                    stamped = bool(conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM alembic_version")).scalar())
        finally:
            engine.dispose()
        if not {"studies", "version_info"} <= tables or not stamped:
            return None  # no (complete) Optuna schema: no study yet
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError) as exc:
        raise ConfigError(f"storage: cannot open {mask(url)}: {reason(exc, url)}") from None


def require_sqlite_file(url: str) -> None:
    """A command that reads a study refuses a missing SQLite file (SQLite would create an empty one)."""
    file = sqlite_file(url)
    if check_url(url) == "sqlite" and file is not None and not file.is_file():
        raise ConfigError(f"storage: {mask(url)}: the SQLite file {file} does not exist (nothing was created); "
                          "give the database a run wrote")


def open_readonly(url: str):
    """The storage of a command that only reads studies (status, export, report): never creates a file, table
    or study. A missing SQLite file is a ConfigError; a database without Optuna's tables gives None."""
    require_sqlite_file(url)
    if check_url(url) == "sqlite" and sqlite_file(url) is None:
        return None  # in-memory SQLite: empty by definition
    return open_existing(url)


def open_storage(url: str, *, heartbeat: bool = True):
    """An Optuna RDBStorage with engine options fit for many worker processes."""
    import optuna
    import sqlalchemy.exc

    scheme = check_url(url)
    if scheme == "grpc":
        return open_proxy(url, heartbeat=heartbeat)
    engine: dict = {"pool_pre_ping": True}
    if scheme == "sqlite":
        check_sqlite_path(url)
        engine["connect_args"] = {"timeout": 60}
    else:
        engine.update(_pool_options())
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs = {}
            if heartbeat:
                kwargs = dict(heartbeat_interval=env_seconds("REGSWEEP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
                              grace_period=env_seconds("REGSWEEP_GRACE_PERIOD", GRACE_PERIOD),
                              heartbeat_stale_trial_callback=stale_trial_callback())
            # reachability was checked before (check_reachable); a connection dropped now is retried
            internals.cached_alembic_script()
            storage = retry_transient(optuna.storages.RDBStorage, url, engine_kwargs=engine, **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(f"storage: cannot open {mask(url)}: {reason(exc, url)}") from None
    if scheme == "sqlite":
        _sqlite_wal(storage.engine)
    return storage


def _sqlite_wal(engine) -> None:
    """WAL journal + synchronous=NORMAL: a per-epoch write costs ~3 ms instead of ~14 ms, and readers (the
    dashboard, `regsweep status`) never block the writer. Not for SQLite files on network filesystems."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    engine.dispose()  # pooled connections were opened before the listener; new ones get the pragmas


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors of a dropped connection or a restarting server: worth retrying."""
    import optuna
    import sqlalchemy.exc

    from regsweep.search.proxy import rpc_errors

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, optuna.exceptions.StorageInternalError,
            *rpc_errors())


def database_reason(exc: BaseException) -> Optional[str]:
    """``failed:database: <short reason>`` when ``exc`` (or what it was raised from) is a lost connection or a
    database outage; None for any other error."""
    errors = transient_errors()
    seen: list[BaseException] = []
    cur: Optional[BaseException] = exc
    while cur is not None and len(seen) < 8 and not any(cur is s for s in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    found = [e for e in seen if isinstance(e, errors)]
    if not found:
        return None
    # the database driver's own error (SQLAlchemy keeps it as .orig) says it best: "Connection refused", ...
    root = next((e.orig for e in seen if getattr(e, "orig", None) is not None), found[0])
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.startswith("(") and ") " in text and "." in text.split(") ", 1)[0]:
        text = text.split(") ", 1)[1]  # SQLAlchemy's "(psycopg2.OperationalError) ..." prefix
    return f"{DATABASE_REASON}: {root.__class__.__name__}: {text[:200]}".rstrip(": ")


def worker_label() -> str:
    """``HOST:PID`` of this process: the ``worker`` attr of the trials it runs, named by a stale trial's reason."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def is_external(reason: Optional[str]) -> bool:
    """Whether a stop reason says the trial failed from outside itself (stale worker, database)."""
    return bool(reason) and reason.startswith(EXTERNAL_REASONS)


def stale_reason(trial) -> str:
    """The stop reason of a trial failed as stale: the worker that held it (its ``worker`` user attr)."""
    return f"{STALE_REASON} (worker {trial.user_attrs.get('worker') or 'unknown'})"


def retry_attrs(trial):
    """A copy of a failed FrozenTrial for Optuna's retry callback without its stop reason: the WAITING retry
    carries the params and user attrs (e.g. the base-config mark), never the failed attempt's end."""
    import copy

    frozen = copy.deepcopy(trial)
    frozen.user_attrs = {k: v for k, v in frozen.user_attrs.items() if k != "stop_reason"}
    return frozen


def stale_trial_callback():
    """The storage's stale-trial callback: a :class:`StaleTrialRetry` retrying at most MAX_RETRY times."""
    cls = globals().get("StaleTrialRetry") or __getattr__("StaleTrialRetry")
    return cls(MAX_RETRY)


def __getattr__(name: str):
    """``StaleTrialRetry`` is built on first use (it subclasses an Optuna class; this module imports Optuna
    lazily) and kept as a module attribute, so a pickled storage finds it by name."""
    if name != "StaleTrialRetry":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    import optuna

    class StaleTrialRetry(optuna.storages.RetryHeartbeatStaleTrialCallback):
        """Optuna's RetryHeartbeatStaleTrialCallback (re-queue the params) that first records the stop reason
        ``failed:stale heartbeat (worker HOST:PID)``. Optuna calls it right after ``fail_stale_trials`` set the
        trial FAIL, in the process that failed it (so once per trial)."""

        def __call__(self, study, trial) -> None:
            try:
                backend = internals.rdb_backend(internals.study_storage(study))
                if backend is not None:
                    retry_transient(internals.set_finished_trial_user_attr, backend, internals.trial_id(trial),
                                    "stop_reason", stale_reason(trial), attempts=REASON_ATTEMPTS)
            finally:  # the retry is queued even when the database would not take the reason
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    super().__call__(study, retry_attrs(trial))

    StaleTrialRetry.__module__, StaleTrialRetry.__qualname__ = __name__, name
    globals()[name] = StaleTrialRetry
    return StaleTrialRetry


def retry_transient(fn, *args, attempts: int = RETRIES, **kwargs):
    """``fn(*args, **kwargs)``, retried with backoff (0.2 s doubling, at most 10 s) on transient storage errors."""
    import time

    errors = transient_errors()
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except errors:
            if attempt == attempts - 1:
                raise
            time.sleep(min(10.0, 0.2 * 2 ** attempt))


def adopt_orphans(study, older_than: float) -> list[int]:
    """Give a first heartbeat to RUNNING trials that never got one and started over ``older_than`` seconds ago.

    Optuna fails a stale RUNNING trial only once it has a heartbeat row; a worker that died between ``ask`` and
    its first beat (or lost its connection right then) would leave its trial RUNNING forever. After this beat
    the trial goes stale after the grace period and Optuna's retry callback fails and re-queues it. Live
    trials always have a heartbeat row, so they are never touched. Returns the adopted trial ids.
    """
    import datetime as dt

    from optuna.trial import TrialState

    backend = internals.rdb_backend(internals.study_storage(study))
    if backend is None or not backend.get_heartbeat_interval():
        return []
    now = dt.datetime.now()
    old = [internals.trial_id(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > older_than]
    if not old:
        return []
    beating = internals.beating_trial_ids(backend, old)
    orphans = [tid for tid in old if tid not in beating]
    for trial_id in orphans:
        backend.record_heartbeat(trial_id)
    return orphans


class TrialWriter:
    """Writes a live Optuna trial's user attrs and its intermediate value in ONE transaction.

    Optuna's public API commits every ``set_user_attr`` and ``report`` separately; a regsweep epoch (history +
    report) and a trial's end (a dozen attrs) would cost one commit each. On an RDB storage this writer uses
    RDBStorage's own ``_without_commit`` helpers inside one session (through search/optuna_internals.py), and
    keeps the Trial's cached view in step exactly as ``Trial.set_user_attr``/``Trial.report`` do (pruners read
    that view). On any other storage, or an Optuna without those helpers, it falls back to the public calls.
    """

    def __init__(self, trial):
        self.trial = trial
        backend = internals.rdb_backend(trial.storage)
        usable = internals.batched_writes_supported(backend) and internals.cached_view(trial) is not None
        self._rdb = backend if usable else None
        self._trial_id = internals.trial_id(trial) if usable else None

    @property
    def batched_backend(self):
        """The RDBStorage this writer writes to in one transaction, or None (public per-write calls)."""
        return self._rdb

    @property
    def trial_id(self) -> int | None:
        return self._trial_id

    def set_user_attr(self, key: str, value) -> None:
        self.write({key: value})

    def report(self, value: float, step: int) -> None:
        self.write({}, (value, step))

    def fresh(self, report: tuple[float, int] | None) -> tuple[float, int] | None:
        """``report``, or None when its step was reported already (Optuna ignores a step reported twice; so do
        we)."""
        cached = internals.cached_view(self.trial)
        if report is not None and cached is not None and report[1] in cached.intermediate_values:
            return None
        return report

    def write(self, attrs: dict, report: tuple[float, int] | None = None) -> None:
        report = self.fresh(report)
        if self._rdb is None:
            for key, value in attrs.items():
                self.trial.set_user_attr(key, value)
            if report is not None:
                self.trial.report(*report)
            return
        # one transaction, retried when the connection was dropped
        retry_transient(internals.write_trial, self._rdb, self._trial_id, attrs, report)
        self.mirror(attrs, report)

    def mirror(self, attrs: dict, report: tuple[float, int] | None) -> None:
        """The Trial's cached view after a batched write, as ``Trial.set_user_attr``/``Trial.report`` keep it."""
        cached = internals.cached_view(self.trial)
        cached.user_attrs.update(attrs)
        if report is not None:
            cached.intermediate_values[int(report[1])] = float(report[0])

