"""The only place regsweep touches Optuna's private API.

Every other module uses Optuna's public API; where that does not suffice, it calls a function here, and each
private use below carries a comment saying why the public API is not enough. Layer search.base: this module
imports only optuna, sqlalchemy and the standard library, never a regsweep module. Tested against the pinned
optuna range (pyproject: ``optuna>=5.0,<6``; installed and tested: 5.0.0) by tests/search/test_optuna_internals.py,
which also fails when any other module of the package reaches into a private name. On an Optuna upgrade, this
file is the one to read.
"""

from __future__ import annotations

from typing import Any, Optional


# ---- used by storage/outputs
def trial_id(trial) -> int:
    """The storage-wide id of a ``Trial`` or ``FrozenTrial``."""
    # Optuna's public API names a trial by its per-study ``number``; the storage methods (get_trial,
    # record_heartbeat, the heartbeat rows) take the storage-wide id, which only ``_trial_id`` holds. Going
    # through ``storage.get_trial_id_from_study_id_trial_number`` would need the study's private ``_study_id``
    # and cost a query.
    return trial._trial_id


def study_storage(study):
    """The storage object a ``Study`` was opened with (Optuna's ``_CachedStorage`` around our RDBStorage)."""
    # ``Study`` exposes no public handle to its storage (``Trial.storage`` is public, ``Study`` has none), and
    # opening a second storage from the URL would lose this one's engine pool, heartbeat settings and cache.
    return study._storage


def rdb_backend(storage):
    """The ``RDBStorage`` behind ``storage`` (itself, or the one Optuna's ``_CachedStorage`` wraps); else None."""
    from optuna.storages import RDBStorage

    # create_study/load_study wrap an RDBStorage in ``_CachedStorage``, whose ``_backend`` has no public
    # accessor; the heartbeat-row query and the one-transaction writes below need the RDBStorage itself.
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def cached_view(trial) -> Optional[Any]:
    """The ``FrozenTrial`` a live ``Trial`` keeps in memory (what pruners and ``Trial.user_attrs`` read); None
    for anything without one."""
    # The public ``Trial`` properties return deep copies one field at a time, and ``storage.get_trial`` costs a
    # query and returns a copy; writers that bypass ``Trial.set_user_attr``/``Trial.report`` must update the
    # very view Optuna's pruners read, exactly as those methods do.
    return getattr(trial, "_cached_frozen_trial", None)


def beating_trial_ids(backend, trial_ids: list[int]) -> set[int]:
    """Those of ``trial_ids`` that have a heartbeat row in ``backend`` (an RDBStorage)."""
    from optuna.storages._rdb import models  # private module: the ORM models of Optuna's schema

    # RDBStorage's public heartbeat API is record_heartbeat/get_heartbeat_interval; "has this trial ever beaten"
    # (a trial without a row is never failed as stale) is only answerable from the heartbeat table itself.
    heartbeat = models.TrialHeartbeatModel
    with _session(backend, ignore_integrity_error=False) as session:
        rows = session.query(heartbeat.trial_id).filter(heartbeat.trial_id.in_(list(trial_ids)))
        return {row.trial_id for row in rows}


_WRITE_HELPERS = ("_set_trial_attr_without_commit", "_set_trial_intermediate_value_without_commit")


def batched_writes_supported(backend) -> bool:
    """Whether :func:`write_trial` can write to ``backend`` in one transaction (an RDBStorage of an Optuna that
    still has the helpers it needs); callers fall back to the public per-write calls otherwise."""
    # Probes the private modules write_trial needs (see there why); a future Optuna may move them.
    try:
        from optuna.storages._rdb import models  # noqa: F401
        from optuna.storages._rdb.storage import _create_scoped_session  # noqa: F401
    except ImportError:
        return False
    return backend is not None and hasattr(backend, "scoped_session") and \
        all(hasattr(backend, name) for name in _WRITE_HELPERS)


def write_trial(backend, trial_id_: int, attrs: dict[str, Any], report: Optional[tuple[float, int]]) -> None:
    """Set ``attrs`` as user attrs and ``report`` = (value, step) as an intermediate value of one trial, in ONE
    transaction of ``backend`` (an RDBStorage; check :func:`batched_writes_supported` first)."""
    from optuna.storages._rdb import models

    # Optuna's public API (Trial.set_user_attr, Trial.report, storage.set_trial_user_attr) commits every write
    # on its own: a regsweep epoch (history + report) and a trial's end (a dozen attrs) would cost one commit
    # each. RDBStorage's own ``_..._without_commit`` helpers do the same validated writes inside one session.
    with _session(backend, ignore_integrity_error=True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id_, key, value)
        if report is not None:
            backend._set_trial_intermediate_value_without_commit(session, trial_id_, int(report[1]),
                                                                 float(report[0]))


def set_finished_trial_user_attr(backend, trial_id_: int, key: str, value: Any) -> None:
    """Set one user attr of a trial that is already finished (``backend``: an RDBStorage): the stop reason of a
    trial that Optuna's ``fail_stale_trials`` failed."""
    import json

    from optuna.storages._rdb import models

    # fail_stale_trials sets the trial FAIL first and only then calls the stale-trial callback, and every
    # public writer (set_trial_user_attr; _set_trial_attr_without_commit too) refuses a finished trial with
    # UpdateFinishedTrialError. Writing the reason before the FAIL would race with a live worker's own end of
    # the trial; so the row of Optuna's user-attr table is written here, in the JSON form Optuna reads.
    attr = models.TrialUserAttributeModel
    with _session(backend, ignore_integrity_error=False) as session:
        row = session.query(attr).filter(attr.trial_id == trial_id_, attr.key == key).one_or_none()
        if row is None:
            session.add(attr(trial_id=trial_id_, key=key, value_json=json.dumps(value)))
        else:
            row.value_json = json.dumps(value)


def _session(backend, *, ignore_integrity_error: bool):
    from optuna.storages._rdb.storage import _create_scoped_session

    # Optuna's session context (commit on success, rollback and StorageInternalError on a database error) is
    # private; using it keeps our transactions failing exactly like RDBStorage's own.
    return _create_scoped_session(backend.scoped_session, ignore_integrity_error)


def distribution_contains(distribution, value) -> bool:
    """Whether ``value`` (external form) lies inside an Optuna distribution: range, step and choices.

    For search/spec.py's ``enqueue`` check."""
    try:
        internal = distribution.to_internal_repr(value)
        # BaseDistribution has no public containment check; re-deriving it per class (int/float, step, log,
        # categorical) could disagree with the values Optuna's samplers and enqueue_trial accept.
        return bool(distribution._contains(internal))
    except (TypeError, ValueError):
        return False


# ---- used by the trial/loop/backends layers (trial_id, study_storage and distribution_contains above too)
def frozen_trial(study, tid: int):
    """One trial by storage id, fresh from the storage (public storage method; see study_storage)."""
    return study_storage(study).get_trial(tid)


def trial_number(study, tid: int) -> int:
    """The study-local number of a trial given its storage id (what ``study.tell`` takes)."""
    return study_storage(study).get_trial_number_from_id(tid)


def latest_trial(trial):
    """A live trial as Optuna's own pruners see it inside ``Trial.should_prune`` (its reports and attrs so far)."""
    if hasattr(trial, "_get_latest_trial"):
        # should_prune() hands pruners ``trial._get_latest_trial()`` (the cached FrozenTrial, no database read);
        # a pruner with a richer verdict than a bool (search/pruners/compose.py) needs that same object, and
        # Trial has no public method returning it.
        return trial._get_latest_trial()
    return frozen_trial(trial.study, trial_id(trial))
