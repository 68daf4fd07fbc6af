"""Storage URL -> Optuna storage, and password masking.

Precedence: ``--storage`` > ``$REGSWEEP_STORAGE`` > the spec's ``storage`` > ``sqlite:///<spec dir>/regsweep.db``
(printed as an absolute path). RDB studies beat a heartbeat and retry stale trials. A password never
leaves this module unmasked: use :func:`mask` for anything printed or stored.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

from regsweep.models.config import ConfigError
from regsweep.search import optuna_internals as internals

SCHEMES = ("sqlite", "postgresql", "mysql")
HEARTBEAT_INTERVAL = 30  # seconds between a running trial's heartbeats ($REGSWEEP_HEARTBEAT_INTERVAL)
GRACE_PERIOD = 90  # a RUNNING trial without a heartbeat this long is failed and retried ($REGSWEEP_GRACE_PERIOD)
MAX_RETRY = 2
RETRIES = 5  # attempts of one write when the database dropped the connection


def _seconds(env: str, default: int) -> int:
    value = os.environ.get(env)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"${env}: {value!r} is not allowed; must be a whole number of seconds >= 1")
    return int(value)


def default_url(spec_dir: Path) -> str:
    return f"sqlite:///{(spec_dir / 'regsweep.db').resolve()}"


def resolve_url(cli: Optional[str], spec_storage: Optional[str], spec_dir: Path) -> str:
    return cli or os.environ.get("REGSWEEP_STORAGE") or spec_storage or default_url(spec_dir)


def mask(url: str) -> str:
    """The URL with any password replaced by ***; URLs without a password are returned unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" not in netloc:
        return url
    userinfo, _, host = netloc.rpartition("@")  # the LAST '@' ends the userinfo, even with '@' in a password
    if ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def check_url(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in SCHEMES:
        raise ConfigError(f"storage: {mask(url)!r} is not allowed; use sqlite:///PATH, postgresql://... or "
                          "mysql+pymysql://...")
    return scheme


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
        raise ConfigError(f"$REGSWEEP_DB_POOL: {kind!r} is not allowed; choose one of: {', '.join(POOLS)}")
    if kind == "null":
        from sqlalchemy.pool import NullPool

        return {"poolclass": NullPool}
    return {"pool_size": 1, "max_overflow": 1, "pool_recycle": 300, "pool_timeout": 120}


def sqlite_file(url: str) -> Optional[Path]:
    """The database file of a ``sqlite:///PATH`` URL; None for other schemes and for in-memory SQLite."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


def _check_sqlite_dir(url: str) -> None:
    file = sqlite_file(url)
    if file is not None and not file.parent.is_dir():
        raise ConfigError(f"storage: {url!r}: directory {file.parent} does not exist")


def check_reachable(url: str) -> None:
    """Connect and run ``SELECT 1`` without creating tables or files; ConfigError when that fails."""
    import sqlalchemy
    import sqlalchemy.exc

    if check_url(url) == "sqlite":
        _check_sqlite_dir(url)
        return  # the file is created on first use
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ConfigError(f"storage: cannot reach {mask(url)}: {first}") from None


def open_existing(url: str):
    """A read-only view of an EXISTING storage (no file, table or study is created), or None."""
    import optuna
    import sqlalchemy
    import sqlalchemy.exc

    if check_url(url) == "sqlite":
        file = sqlite_file(url)
        if file is None or not file.is_file():
            return None
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        engine.dispose()
        if not {"studies", "version_info"} <= tables:
            return None  # no Optuna schema: no study yet
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ConfigError(f"storage: cannot open {mask(url)}: {first}") from None


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
    engine: dict = {"pool_pre_ping": True}
    if scheme == "sqlite":
        _check_sqlite_dir(url)
        engine["connect_args"] = {"timeout": 60}
    else:
        engine.update(_pool_options())
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs = {}
            if heartbeat:
                kwargs = dict(heartbeat_interval=_seconds("REGSWEEP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
                              grace_period=_seconds("REGSWEEP_GRACE_PERIOD", GRACE_PERIOD),
                              heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                                  MAX_RETRY))
            # reachability was checked before (check_reachable); a connection dropped now is retried
            storage = retry_transient(optuna.storages.RDBStorage, url, engine_kwargs=engine, **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ModuleNotFoundError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ConfigError(f"storage: cannot open {mask(url)}: {first}") from None
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

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, optuna.exceptions.StorageInternalError)


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

    def set_user_attr(self, key: str, value) -> None:
        self.write({key: value})

    def report(self, value: float, step: int) -> None:
        self.write({}, (value, step))

    def write(self, attrs: dict, report: tuple[float, int] | None = None) -> None:
        cached = internals.cached_view(self.trial)
        if report is not None and cached is not None and report[1] in cached.intermediate_values:
            report = None  # Optuna ignores a step reported twice; so do we
        if self._rdb is None:
            for key, value in attrs.items():
                self.trial.set_user_attr(key, value)
            if report is not None:
                self.trial.report(*report)
            return
        # one transaction, retried when the connection was dropped
        retry_transient(internals.write_trial, self._rdb, self._trial_id, attrs, report)
        cached.user_attrs.update(attrs)
        if report is not None:
            cached.intermediate_values[int(report[1])] = float(report[0])
