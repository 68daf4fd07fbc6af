"""The study every worker shares: open or create it, check its spec hash, enqueue, its budget and budget lock.

The spec's hash is a study attr: resuming with a different spec is refused unless ``allow_spec_change``.
``n_trials`` is the study's total across runs (its ``regsweep:n_trials`` attr): the number of COMPLETE + PRUNED
trials :func:`budget_lock` lets the workers of search/loop.py reach, counting under the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import TYPE_CHECKING, Iterator, Optional

from regsweep.models.config import ConfigError
from regsweep.search.record import BASE_ATTR
from regsweep.search.storage import open_existing, open_storage
from regsweep.search.urls import check_url, mask, sqlite_file

if TYPE_CHECKING:  # annotations only: importing the study layer needs no torch (search/spec.py imports models)
    from regsweep.search.spec import StudySpec

SPEC_HASH_ATTR, SPEC_ATTR, BUDGET_ATTR = "regsweep:spec_hash", "regsweep:spec", "regsweep:n_trials"
OBJECTIVES_ATTR = "regsweep:objectives"  # a multi-objective study's metric names, in the order of trial values

class SweepFailed(RuntimeError):
    """The sweep cannot go on (e.g. every trial fails): exit 1."""


# ------------------------------------------------------------------------------------ the study
def done_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def budget(study, spec: StudySpec) -> int:
    """The study's budget of COMPLETE + PRUNED trials (its ``regsweep:n_trials`` attr, else the spec's)."""
    return int(study.user_attrs.get(BUDGET_ATTR, spec.n_trials))


def check_existing_study(spec: StudySpec, url: str, study_name: str) -> None:
    """Read-only version of open_study's checks (for `validate`): creates no file, table or study."""
    import optuna
    import sqlalchemy.exc

    storage = open_existing(url)
    if storage is None:
        return
    try:
        names = set(optuna.get_all_study_names(storage))  # summaries would load every trial
    except sqlalchemy.exc.SQLAlchemyError:  # a database without Optuna's tables holds no study yet
        return
    if study_name not in names:
        return
    study = optuna.load_study(study_name=study_name, storage=storage)
    old_hash = study.user_attrs.get(SPEC_HASH_ATTR)
    if old_hash is not None and old_hash != spec.spec_hash():
        raise spec.change_error(study_name, study.user_attrs.get(SPEC_ATTR, {}))


def open_study(spec: StudySpec, url: str, study_name: str, *, allow_spec_change: bool = False,
               heartbeat: bool = True):
    """Create or load the study; check the spec hash; returns (study, created)."""
    import optuna

    storage = open_storage(url, heartbeat=heartbeat)
    existing = set(optuna.get_all_study_names(storage))  # summaries would load every trial
    created = study_name not in existing
    study = optuna.create_study(storage=storage, study_name=study_name, directions=spec.directions,
                                sampler=spec.make_sampler(), pruner=spec.make_pruner(), load_if_exists=True)
    old_hash = study.user_attrs.get(SPEC_HASH_ATTR)
    if old_hash is None or (old_hash != spec.spec_hash() and allow_spec_change):
        study.set_user_attr(SPEC_HASH_ATTR, spec.spec_hash())
        study.set_user_attr(SPEC_ATTR, spec.stored())
        if old_hash is None:
            study.set_user_attr("regsweep:objective", spec.objective.metric)
            if spec.multi:  # the names of the trial values, in order (status, report, export, the note)
                study.set_user_attr(OBJECTIVES_ATTR, [o.metric for o in spec.objectives])
                name_metrics(study, [o.metric for o in spec.objectives])
        if created:  # every trial of a new study records format 2; an older study mixes (the attr stays absent)
            from regsweep.search.record import FORMAT_ATTR, RECORD_FORMAT

            study.set_user_attr(FORMAT_ATTR, RECORD_FORMAT)
    elif old_hash != spec.spec_hash():
        raise spec.change_error(study_name, study.user_attrs.get(SPEC_ATTR, {}))
    directions = [d.name.lower() for d in study.directions]
    if directions != spec.directions:
        fld = "objectives" if spec.multi or len(directions) > 1 else "objective.direction"
        raise ConfigError(f"{spec.path}: {fld}: study '{study_name}' is {', '.join(directions)}, the spec says "
                          f"{', '.join(spec.directions)}; use a new --study-name")
    return study, created


def name_metrics(study, names: list[str]) -> None:
    """Optuna's own names of the trial values (``study.metric_names``: optuna-dashboard's axes, plain Optuna's
    ``trials_dataframe`` columns)."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # set_metric_names is "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


# ------------------------------------------------------------------------------------ sampler seeds
# Samplers whose draws depend only on their RNG and the trials so far: a resumed run (or another worker) gets a
# seed of its own, derived from the spec's, the number of trials already started and the worker. qmc and grid
# are never reseeded: their sequence itself is a function of the seed (a new seed would restart or reshuffle it).
RESEEDED_SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2")


def run_seed(seed: int, started: int, worker: Optional[str]) -> int:
    """The sampler seed of one run: the spec's ``seed`` itself for the first run of a fresh study in one process
    (so the demo sweep stays what it was), else a 32-bit hash of (seed, trials already started, worker label).
    Rebuilding a seeded sampler from the same seed re-proposes earlier trials' params (Optuna's known behaviour:
    a resumed random sampler draws trial 0's params again)."""
    if started == 0 and worker is None:
        return seed
    digest = hashlib.sha256(f"regsweep-seed:{seed}:{started}:{worker or ''}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def started_trials(study) -> int:
    """Trials of the study that ever started (every state but WAITING: enqueued trials have drawn nothing)."""
    from regsweep.search.optuna_internals import state_counts

    counts = state_counts(study)
    if counts is None:
        from optuna.trial import TrialState

        return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    return sum(n for state, n in counts.items() if state != "WAITING")


def seed_sampler(study, spec: StudySpec, worker: Optional[str] = None) -> bool:
    """Give ``study`` this run's sampler seed (:func:`run_seed`); False when the sampler is not reseeded (qmc,
    grid, or no ``sampler.seed``: then each process draws from fresh OS entropy anyway)."""
    seed = spec.sampler.get("seed")
    if spec.sampler["name"] not in RESEEDED_SAMPLERS or seed is None:
        return False
    new = run_seed(seed, started_trials(study), worker)
    if new != seed:
        study.sampler = spec.make_sampler(seed=new)
    return True


# ------------------------------------------------------------------------------------ warm start
def warm_url(spec: StudySpec) -> str:
    """``warm_start.storage``: a URL, or ``env:VAR`` read from the environment now (never stored)."""
    where = f"{spec.source or spec.path}: warm_start.storage"
    url = spec.warm_start["storage"]
    if url.startswith("env:"):
        var = url[4:]
        if not os.environ.get(var):
            raise ConfigError(f"{where}: ${var[:60]} is not set; give a storage URL or env:VAR with VAR set")
        url = os.environ[var]
    try:
        check_url(url)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('storage: ')}") from None
    return url


def warm_params(spec: StudySpec) -> list[dict]:
    """The params of the ``warm_start.top_k`` best COMPLETE trials (distinct) of the earlier study, best first,
    read without creating anything. Refused with one line (ConfigError): an unreachable storage, a missing
    study, a param the new space does not have or a value outside it (never clipped: a clipped config is one
    the earlier study never tried). A trial without params (an enqueued base config) is skipped."""
    import optuna

    from regsweep.search.confirm import top_configs
    from regsweep.search.storage import open_existing

    if not spec.warm_start:
        return []
    where, url = f"{spec.source or spec.path}: warm_start", warm_url(spec)
    name = spec.warm_start["study"]
    try:
        storage = open_existing(url)
        names = optuna.get_all_study_names(storage) if storage is not None else []
    except ConfigError as exc:
        raise ConfigError(f"{where}.storage: {str(exc).removeprefix('storage: ')}") from None
    except Exception as exc:  # noqa: BLE001 - a database without Optuna's tables, a dropped connection
        from regsweep.search.urls import reason

        raise ConfigError(f"{where}.storage: cannot read {mask(url)}: {reason(exc, url)}") from None
    if name not in names:
        raise ConfigError(f"{where}.study: {name!r} not found in {mask(url)}; studies: "
                          f"{', '.join(sorted(names)[:10]) or 'none'}")
    params = {p.path: p for p in spec.space}
    out = []
    for trial in top_configs(optuna.load_study(study_name=name, storage=storage), spec.warm_start["top_k"] * 4):
        if not trial.params:
            continue
        for key, value in trial.params.items():
            if key not in params:
                raise ConfigError(f"{where}: trial {trial.number} of {name!r} sets {key[:60]}, not a param of this "
                                  f"space; params: {', '.join(params)}")
            if not params[key].contains(value):
                raise ConfigError(f"{where}: trial {trial.number} of {name!r} has {key} = {value!r}, outside this "
                                  f"space's range {params[key].to_dict()} (warm-start values are never clipped)")
        out.append(dict(trial.params))
        if len(out) == spec.warm_start["top_k"]:
            break
    return out


def enqueue(study, spec: StudySpec) -> None:
    """The warm-start configs first (best first), then the spec's ``enqueue`` entries."""
    for params in warm_params(spec):
        study.enqueue_trial(params, user_attrs={"warm_start": spec.warm_start["study"]}, skip_if_exists=True)
    for params in spec.enqueue:
        if params:
            study.enqueue_trial(params, skip_if_exists=True)
        else:
            study.enqueue_trial({}, user_attrs={BASE_ATTR: True})


def open_study_locked(spec: StudySpec, url: str, study_name: str, *, allow_spec_change: bool = False,
                      n_trials: Optional[int] = None):
    """open_study + enqueue under the budget lock, so workers starting at the same instant on a new study
    make one study and enqueue its first trials once. ``n_trials`` (from ``run``) becomes the study's budget,
    which workers joining later read."""
    with budget_lock(url, study_name):
        study, created = open_study(spec, url, study_name, allow_spec_change=allow_spec_change)
        if created:
            enqueue(study, spec)
        if n_trials is not None or BUDGET_ATTR not in study.user_attrs:
            study.set_user_attr(BUDGET_ATTR, n_trials if n_trials is not None else spec.n_trials)
    return study


# ------------------------------------------------------------------------------------ budget lock
@contextlib.contextmanager
def budget_lock(url: str, study_name: str, timeout: float = 600.0) -> Iterator[None]:
    """A lock shared by every worker of one study, held only around count-then-ask.

    PostgreSQL: ``pg_advisory_lock``; MySQL/MariaDB: ``GET_LOCK``; SQLite: ``flock`` on ``<db>.lock``. Each is
    released by the database / kernel when its holder dies, so a killed worker never leaves it taken. Through a
    storage proxy (``grpc://``): the proxy takes the same lock on its own connection and holds it for this worker
    (a lease the proxy takes back after search/proxy.py LEASE seconds, when its holder died).
    """
    scheme = check_url(url)
    if scheme == "grpc":
        from regsweep.search.storage import open_proxy

        client = open_proxy(url)
        try:
            with client.lock(study_name):
                yield
        finally:
            client.close()
        return
    key = int.from_bytes(hashlib.sha256(f"regsweep:{study_name}".encode()).digest()[:8], "big", signed=True)
    if scheme == "sqlite":
        file = sqlite_file(url)
        if file is None:  # in-memory: one process, nothing to share
            yield
            return
        with open(f"{file}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    import sqlalchemy
    import sqlalchemy.exc

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            if scheme == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
                unlock = f"SELECT pg_advisory_unlock({key})"
            else:
                name = f"regsweep_{key & 0xFFFFFFFFFFFF:x}"
                got = conn.exec_driver_sql(f"SELECT GET_LOCK('{name}', {int(timeout)})").scalar()
                if got != 1:
                    raise SweepFailed(f"could not take the budget lock of study '{study_name}' in {timeout:.0f}s")
                unlock = f"SELECT RELEASE_LOCK('{name}')"
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.exec_driver_sql(unlock)
                    conn.commit()
                except sqlalchemy.exc.SQLAlchemyError:
                    pass  # the connection died: the server released the lock with it
    finally:
        engine.dispose()
