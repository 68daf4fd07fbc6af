"""Storage URL -> Optuna storage, and password masking.

Precedence: ``--storage`` > ``$REGSWEEP_STORAGE`` > the spec's ``storage`` > ``sqlite:///<spec dir>/regsweep.db``
(printed as an absolute path). RDB studies beat a heartbeat and retry stale trials. A password never
leaves this module unmasked: use :func:`mask` for anything printed or stored.
"""

from __future__ import annotations

import os
import re
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
REASON_ATTEMPTS = 10  # ~30 s of attempts to record a failed trial's stop reason
STALE_REASON = "failed:stale heartbeat"  # + " (worker HOST:PID)": the worker that held it stopped beating
DATABASE_REASON = "failed:database"  # + ": <short reason>": a lost connection or a database outage
EXTERNAL_REASONS = (STALE_REASON, DATABASE_REASON)  # failed from outside the trial: retried with its params


MAX_SECONDS = 86400  # a heartbeat interval or grace period longer than a day is a typo


def _seconds(env: str, default: int) -> int:
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
    interval = _seconds("REGSWEEP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
    grace = _seconds("REGSWEEP_GRACE_PERIOD", GRACE_PERIOD)
    if grace <= interval:
        raise ConfigError(f"$REGSWEEP_GRACE_PERIOD: {grace} is not allowed; must exceed the heartbeat interval "
                          f"({interval} s, $REGSWEEP_HEARTBEAT_INTERVAL), or live trials are failed as stale")


def default_url(spec_dir: Path) -> str:
    return f"sqlite:///{(spec_dir / 'regsweep.db').resolve()}"


STORAGE_ENV = "REGSWEEP_STORAGE"  # also how `run --workers N` hands the URL to its workers (never argv)


def resolve_url(cli: Optional[str], spec_storage: Optional[str], spec_dir: Path) -> str:
    return cli or os.environ.get(STORAGE_ENV) or spec_storage or default_url(spec_dir)


_SCHEME_SEP = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
SECRET_KEYS = ("password", "passwd", "sslpassword", "pwd")  # query keys whose values are masked (any case)
_QUERY_PAIR = re.compile(r"(^|[?&;])([^=&;#?]*)=([^&;#]*)")
SHOWN_CHARS = 160  # a URL in an error line is cut to this many characters


def _userinfo_span(url: str) -> Optional[tuple[int, int]]:
    """(start, end) of the password in ``url``, or None.

    The password runs from the first ``:`` of the userinfo to the LAST ``@`` (SQLAlchemy's parser stops at
    the first ``@`` and renders ``u:p@ss@h`` as ``u:***@ss@h``; a password may also hold ``/``, ``?``, ``:``).
    Without ``scheme://`` (a typo such as ``postgresql:/u:pw@h``) the same rule applies to the whole text, so
    the password is masked however the URL is mangled. A ``sqlite:///PATH`` has no userinfo: ``:`` and ``@``
    there are part of a file name. When ``@`` also appears in the path or query, more than the password is
    masked, never less."""
    m = _SCHEME_SEP.match(url)
    head = m.end() if m else 0
    rest = url[head:]
    at = rest.rfind("@")
    if at < 0:
        return None
    if m is not None and url[:head].lower().startswith("sqlite") and rest.startswith("/"):
        return None
    colon = rest.find(":", 0, at)
    if colon < 0:
        return None  # user@host: no password
    return head + colon + 1, head + at


def _query_secrets(url: str) -> list[tuple[int, int]]:
    """(start, end) of every ``password=`` / ``passwd=`` / ``sslpassword=`` (any case, percent-encoded keys
    too) value in ``url``."""
    from urllib.parse import unquote

    spans = []
    for m in _QUERY_PAIR.finditer(url):
        if unquote(m.group(2)).strip().lower() in SECRET_KEYS:
            spans.append(m.span(3))
    return spans


def mask(url: str) -> str:
    """The storage URL with every password replaced by ``***``; a URL without one is returned unchanged.

    THE one masking function: anything printed, logged or stored (attrs, exports, artifacts, report, note,
    Ray's files, error messages) shows a URL only through it. Masks the userinfo password (split at the LAST
    ``@``; ``/``, ``:``, ``?`` and percent-encoding inside it; no user; no ``scheme://``) and the values of the
    query keys ``password``, ``passwd``, ``sslpassword``, ``pwd`` (any case). Never raises: text that cannot
    even be read as a string comes back as ``***``."""
    try:
        if not isinstance(url, str):
            url = str(url)
        spans = _query_secrets(url)
        user = _userinfo_span(url)
        if user is not None:
            spans = [s for s in spans if s[1] <= user[0] or s[0] >= user[1]] + [user]
        for start, end in sorted(spans, reverse=True):
            url = url[:start] + "***" + url[end:]
        return url
    except Exception:  # noqa: BLE001 - masking must never be the thing that fails
        return "***"


def shown(url: str) -> str:
    """The masked URL as an error line shows it: quoted, control characters escaped, cut to SHOWN_CHARS."""
    text = repr(mask(url))
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 4] + "...'"


def secrets_of(url: str) -> list[str]:
    """The password strings of ``url`` as a driver or SQLAlchemy may echo them (raw, percent-decoded, and each
    piece after an ``@`` that SQLAlchemy would take for the host), longest first."""
    from urllib.parse import unquote

    try:
        found: set[str] = set()
        spans = _query_secrets(url)
        user = _userinfo_span(url)
        if user is not None:
            spans.append(user)
        for start, end in spans:
            raw = url[start:end]
            for text in (raw, unquote(raw), unquote(raw.replace("+", " "))):
                found.add(text)
                found.update(text.split("@")[1:])
        return sorted((s for s in found if s), key=len, reverse=True)
    except Exception:  # noqa: BLE001
        return []


def scrub(text: str, url: str) -> str:
    """``text`` (e.g. a driver's error message) without any password of ``url``: each one of 3+ characters,
    and each host-like piece of a password that held ``@`` (``'ss@h'`` -> ``'***@h'``), becomes ``***``."""
    try:
        text = str(text)
        for secret in secrets_of(url):
            if len(secret) >= 3:
                text = text.replace(secret, "***")
            text = text.replace(secret + "@", "***@")
        return text
    except Exception:  # noqa: BLE001
        return "***"


def reason(exc: BaseException, url: str, limit: int = 200) -> str:
    """The first line of an exception's message, without the URL's passwords, cut to ``limit`` characters."""
    try:
        first = (str(exc).strip().splitlines() or [""])[0] or exc.__class__.__name__
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails
        first = exc.__class__.__name__
    first = scrub(first, url)
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _query_has(url: str, *keys: str) -> bool:
    return any(m.group(2).lower() in keys and m.group(3) for m in _QUERY_PAIR.finditer(url.partition("?")[2]))


def check_url(url: str) -> str:
    """The URL's scheme (sqlite, postgresql or mysql) once it is a URL regsweep can use; ConfigError (one line,
    password masked) for anything else: unknown scheme, no ``://``, a port that is not 1..65535, no host, a
    ``sqlite://`` without the third slash."""
    allowed = "use sqlite:///PATH, postgresql://USER@HOST:PORT/DB or mysql+pymysql://USER@HOST:PORT/DB"
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in SCHEMES:
        raise ConfigError(f"storage: {shown(url)} is not allowed; {allowed}")
    if any(ch in url for ch in "\n\r\0"):
        raise ConfigError(f"storage: {shown(url)} is not allowed; a URL has no line breaks or NUL characters")
    if scheme == "sqlite":
        rest = url.split("://", 1)[1]
        if rest and not rest.startswith("/"):
            raise ConfigError(f"storage: {shown(url)} is not allowed; a SQLite URL is sqlite:///PATH (three slashes, "
                              "four for an absolute path)")
        return scheme
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's ValueError for a port like 'abc', ArgumentError, ...
        port = re.search(r"invalid literal for int\(\) with base 10: (.*)$", str(exc))
        why = (f"port {scrub(port.group(1), url)[:24]} is not a number" if port else
               "the port is not a number" if "integer string conversion" in str(exc) else reason(exc, url, 120))
        raise ConfigError(f"storage: {shown(url)} is not allowed; {why}") from None
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigError(f"storage: {shown(url)} is not allowed; port {parsed.port} must be 1..65535")
    if not parsed.host and not _query_has(url, "host", "unix_socket"):
        raise ConfigError(f"storage: {shown(url)} is not allowed; the host is empty ({scheme}://USER@HOST:PORT/DB, "
                          "or ?host=/socket/dir for a Unix socket)")
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
        raise ConfigError(f"$REGSWEEP_DB_POOL: {kind[:40]!r} is not allowed; choose one of: {', '.join(POOLS)}")
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


def check_sqlite_path(url: str) -> None:
    """A ``sqlite:///PATH`` must name a file (maybe not there yet) in an existing directory; ConfigError."""
    file = sqlite_file(url)
    if file is not None and not file.parent.is_dir():
        raise ConfigError(f"storage: {shown(url)}: directory {file.parent} does not exist")
    if file is not None and file.is_dir():
        raise ConfigError(f"storage: {shown(url)}: {file} is a directory, not a SQLite file")


def check_reachable(url: str) -> None:
    """Connect and run ``SELECT 1`` without creating tables or files; ConfigError when that fails."""
    import sqlalchemy
    import sqlalchemy.exc

    if check_url(url) == "sqlite":
        check_sqlite_path(url)
        return  # the file is created on first use
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"storage: cannot reach {mask(url)}: {reason(exc, url)}") from None


def open_existing(url: str):
    """A read-only view of an EXISTING storage (no file, table or study is created), or None."""
    import optuna
    import sqlalchemy
    import sqlalchemy.exc

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


def open_storage(url: str, *, heartbeat: bool = True):
    """An Optuna RDBStorage with engine options fit for many worker processes."""
    import optuna
    import sqlalchemy.exc

    scheme = check_url(url)
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
                kwargs = dict(heartbeat_interval=_seconds("REGSWEEP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
                              grace_period=_seconds("REGSWEEP_GRACE_PERIOD", GRACE_PERIOD),
                              heartbeat_stale_trial_callback=stale_trial_callback())
            # reachability was checked before (check_reachable); a connection dropped now is retried
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

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, optuna.exceptions.StorageInternalError)


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
