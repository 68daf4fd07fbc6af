"""The only place regsweep touches Optuna's private API.

Every other module uses Optuna's public API; where that does not suffice, it calls a function here, and each
private use below carries a comment saying why the public API is not enough. Layer search.base: this module
imports only optuna, optuna-dashboard, sqlalchemy and the standard library, never a regsweep module. Tested
against the pinned
optuna range (pyproject: ``optuna>=5.0,<6``; installed and tested: 5.1.0) by tests/search/test_optuna_internals.py,
which also fails when any other module of the package reaches into a private name. On an Optuna upgrade, this
file is the one to read.
"""

from __future__ import annotations

import functools
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
    write_trials(backend, [(trial_id_, attrs, report)])


def write_trials(backend, writes: list[tuple[int, dict[str, Any], Optional[tuple[float, int]]]]) -> None:
    """:func:`write_trial` for several trials (trial id, attrs, report) in ONE transaction of ``backend``: a fused
    group's epoch records (search/fused_trial.py)."""
    from optuna.storages._rdb import models

    # Optuna's public API (Trial.set_user_attr, Trial.report, storage.set_trial_user_attr) commits every write
    # on its own: a regsweep epoch (history + report) and a trial's end (a dozen attrs) would cost one commit
    # each. RDBStorage's own ``_..._without_commit`` helpers do the same validated writes inside one session.
    with _session(backend, ignore_integrity_error=True) as session:
        for trial_id_, attrs, report in writes:
            for key, value in attrs.items():
                backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id_, key,
                                                       value)
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


def remove_artifact_meta(study, trial, artifact_id: str) -> bool:
    """Delete a finished trial's artifact entry (the file is already gone from the store); False when the storage
    is not an RDB storage (the entry stays)."""
    from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX
    from optuna.storages._rdb import models

    backend = rdb_backend(study_storage(study))
    if backend is None or not batched_writes_supported(backend):
        return False
    # Optuna's artifact API uploads and lists but never deletes an entry, and every public writer refuses a
    # finished trial's attrs (UpdateFinishedTrialError). keep_weights: best removes the weights files of finished
    # non-best trials after the budget; without this their entries would list a file that no longer opens (the
    # dashboard's trial page). The entry is one row of the trial system-attr table, keyed by Optuna's prefix.
    attr = models.TrialSystemAttributeModel
    with _session(backend, ignore_integrity_error=False) as session:
        session.query(attr).filter(attr.trial_id == trial_id(trial),
                                   attr.key == ARTIFACTS_ATTR_PREFIX + artifact_id).delete()
    return True


def _session(backend, *, ignore_integrity_error: bool):
    from optuna.storages._rdb.storage import _create_scoped_session

    # Optuna's session context (commit on success, rollback and StorageInternalError on a database error) is
    # private; using it keeps our transactions failing exactly like RDBStorage's own.
    return _create_scoped_session(backend.scoped_session, ignore_integrity_error)


def study_id_of_trial(backend, trial_id_: int) -> int:
    """The id of the study a trial (by id) belongs to, on an RDBStorage; KeyError when there is no such trial."""
    from optuna.storages._rdb import models  # private module: the ORM models of Optuna's schema

    # The public ``get_trial`` returns a FrozenTrial, which carries no study id; the storage proxy must know the
    # study of a trial ``ask`` moves to RUNNING to decide its admission under that study's budget.
    with _session(backend, ignore_integrity_error=False) as session:
        return int(models.TrialModel.find_or_raise_by_id(trial_id_, session).study_id)


def add_servicer(server, storage) -> None:
    """Serve ``storage`` on a ``grpc.Server`` with Optuna's storage-proxy servicer."""
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    # ``run_grpc_proxy_server`` blocks until termination and ``make_server`` binds a fixed port without saying
    # which port it got (``--port 0``) and without a way to stop it on SIGTERM: the proxy builds its own server
    # around Optuna's servicer (the same two calls make_server makes).
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)


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


# ---- reads of large studies that load only what they show (search/report.py, export.py, dashboard.py)
def study_id(study) -> int:
    """The storage id of a ``Study``."""
    # ``Study`` has no public id; the per-study storage methods and the direct queries below take it.
    return study._study_id


def state_counts(study) -> Optional[dict[str, int]]:
    """``{state name: number of trials}`` of a study by one ``GROUP BY`` query; None on a non-RDB storage."""
    backend = rdb_backend(study_storage(study))
    if backend is None:
        return None
    from optuna.storages._rdb import models  # private module: the ORM models of Optuna's schema
    from sqlalchemy import func

    # The public ``storage.get_n_trials`` costs one query per state, and ``study.get_trials`` loads every
    # trial with every attr (each trial's per-epoch records) just to count them.
    trial = models.TrialModel
    with _session(backend, ignore_integrity_error=False) as session:
        rows = (session.query(trial.state, func.count(trial.trial_id))
                .filter(trial.study_id == study_id(study)).group_by(trial.state).all())
        return {state.name: int(n) for state, n in rows}


def user_attr_counts(study, key: str, states: tuple) -> Optional[dict[Any, int]]:
    """``{value: number of trials}`` of one trial user attr over the trials in ``states`` (TrialState
    members), by one ``GROUP BY`` query; trials without the attr are not counted. None on a non-RDB storage."""
    import json

    backend = rdb_backend(study_storage(study))
    if backend is None:
        return None
    from optuna.storages._rdb import models
    from sqlalchemy import func

    # No public API reads one attr of many trials: ``study.get_trials`` loads every attr of every trial.
    trial, attr = models.TrialModel, models.TrialUserAttributeModel
    counts: dict[Any, int] = {}
    with _session(backend, ignore_integrity_error=False) as session:
        rows = (session.query(attr.value_json, func.count(attr.trial_user_attribute_id))
                .join(trial, trial.trial_id == attr.trial_id)
                .filter(trial.study_id == study_id(study), trial.state.in_(list(states)), attr.key == key)
                .group_by(attr.value_json).all())
    for value_json, n in rows:
        value = json.loads(value_json)
        counts[value] = counts.get(value, 0) + int(n)
    return counts


def trial_by_number(study, number: int):
    """One trial of a study by its number (a FrozenTrial with every attr), or None when there is none."""
    storage = study_storage(study)
    try:
        # public storage methods, but both need the study's storage id (private, see study_id)
        return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id(study), number))
    except KeyError:
        return None


def trials_leaving_out(backend, study_id_: int, states, patterns: tuple[str, ...]) -> list:
    """``backend.get_all_trials(study_id_, deepcopy=False, states=states)`` (an RDBStorage) without the user
    attrs whose keys match one of ``patterns`` (SQL ``LIKE`` patterns): those rows are never read. Long because
    it mirrors Optuna's FrozenTrial build from its schema in one place, step for step, so it can be checked against
    RDBStorage._build_frozen_trial_from_trial_model."""
    import json

    import sqlalchemy
    from optuna import distributions
    from optuna.storages._rdb import models
    from optuna.trial import FrozenTrial

    # RDBStorage.get_all_trials loads every user attr of every trial (no option to leave any out) through ORM
    # objects, ~50 us per row: 5,000 trials x 100 epochs of intermediate values alone take ~25 s. This reads
    # the same rows of Optuna's schema with plain Core selects (the user attrs filtered in SQL) and builds the
    # FrozenTrials exactly as RDBStorage._build_frozen_trial_from_trial_model does, with the models' own
    # converters for stored values.
    trial = models.TrialModel.__table__
    selected = sqlalchemy.select(trial.c.trial_id).where(trial.c.study_id == study_id_)
    if states is not None:
        selected = selected.where(trial.c.state.in_(list(states)))
    keep = sqlalchemy.and_(*(sqlalchemy.not_(models.TrialUserAttributeModel.__table__.c.key.like(p))
                             for p in patterns))

    def rows(model, *cols, where=None):  # in the server's order: Optuna's ORM load does not order attrs either
        table = model.__table__
        query = sqlalchemy.select(table.c.trial_id, *(table.c[c] for c in cols)).where(table.c.trial_id.in_(selected))
        if where is not None:
            query = query.where(where)
        return conn.execute(query)

    with backend.engine.connect() as conn:
        base = conn.execute(sqlalchemy.select(trial.c.trial_id, trial.c.number, trial.c.state, trial.c.datetime_start,
                                              trial.c.datetime_complete)
                            .where(trial.c.trial_id.in_(selected)).order_by(trial.c.trial_id)).all()
        fields = {tid: {"params": [], "values": {}, "user": {}, "system": {}, "inter": {}} for tid, *_ in base}
        dist_of: dict[str, Any] = {}
        for tid, pid, name, value, dist_json in rows(models.TrialParamModel, "param_id", "param_name", "param_value",
                                                     "distribution_json"):
            if dist_json not in dist_of:
                dist_of[dist_json] = distributions.json_to_distribution(dist_json)
            dist = dist_of[dist_json]
            fields[tid]["params"].append((pid, name, value, dist))
        for tid, objective, value, value_type in rows(models.TrialValueModel, "objective", "value", "value_type"):
            fields[tid]["values"][objective] = models.TrialValueModel.stored_repr_to_value(value, value_type)
        for tid, key, value_json in rows(models.TrialUserAttributeModel, "key", "value_json", where=keep):
            fields[tid]["user"][key] = json.loads(value_json)
        for tid, key, value_json in rows(models.TrialSystemAttributeModel, "key", "value_json"):
            fields[tid]["system"][key] = json.loads(value_json)
        to_value = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
        finite = models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
        inter = {tid: f["inter"] for tid, f in fields.items()}
        for tid, step, value, value_type in rows(models.TrialIntermediateValueModel, "step", "intermediate_value",
                                                 "intermediate_value_type"):  # ~100 per trial: the hot loop
            inter[tid][step] = value if value_type is finite and value is not None else to_value(value, value_type)
    trials = []
    for tid, number, state, start, complete in base:
        f = fields[tid]
        params = sorted(f["params"], key=lambda p: p[0])
        values = [f["values"][i] for i in sorted(f["values"])] if f["values"] else None
        trials.append(FrozenTrial(
            number=number, state=state,
            value=None, values=values, datetime_start=start, datetime_complete=complete,
            params={name: dist.to_external_repr(value) for _, name, value, dist in params},
            distributions={name: dist for _, name, _, dist in params},
            user_attrs=f["user"], system_attrs=f["system"], intermediate_values=f["inter"], trial_id=tid))
    return trials


def leaving_out(storage, patterns: tuple[str, ...], snapshot: bool = False):
    """A storage that reads and writes through ``storage`` but leaves the user attrs matching ``patterns`` out
    of its bulk trial reads (``get_all_trials``); single-trial reads (``get_trial``) stay whole. ``snapshot``:
    a study's trials are read once and kept (a report that reads them several times). ``storage`` itself when
    it is not an RDB storage."""
    backend = rdb_backend(storage)
    if backend is None:
        return storage
    return _leaving_out_class()(backend, patterns, snapshot)


@functools.cache
def _leaving_out_class():
    from optuna.storages import BaseStorage

    class LeavingOut(BaseStorage):
        def __init__(self, backend, patterns, snapshot):
            self.backend, self.patterns = backend, patterns
            self.snapshot: Optional[dict[int, list]] = {} if snapshot else None

        def get_all_trials(self, study_id, deepcopy=True, states=None):
            import copy

            if self.snapshot is None:
                trials = trials_leaving_out(self.backend, study_id, states, self.patterns)
            else:
                if study_id not in self.snapshot:
                    self.snapshot[study_id] = trials_leaving_out(self.backend, study_id, None, self.patterns)
                trials = [t for t in self.snapshot[study_id] if states is None or t.state in states]
            return copy.deepcopy(trials) if deepcopy else trials

        def get_all_studies(self):  # sorted by id, as optuna-dashboard sorts an RDBStorage's
            return sorted(self.backend.get_all_studies(), key=study_id)

        def get_best_trial(self, study_id):  # BaseStorage's version loads every trial; RDBStorage's does not
            return self.backend.get_best_trial(study_id)

        def __getattr__(self, name):
            return getattr(self.backend, name)

    def delegate(name):
        return lambda self, *args, **kwargs: getattr(self.backend, name)(*args, **kwargs)

    for name in BaseStorage.__abstractmethods__ | {"get_n_trials", "get_trial_params", "get_trial_user_attrs",
                                                   "get_trial_system_attrs", "remove_session",
                                                   "check_trial_is_updatable"}:
        if name not in LeavingOut.__dict__:
            setattr(LeavingOut, name, delegate(name))
    LeavingOut.__abstractmethods__ = frozenset()
    return LeavingOut


# ---- used by storage (opening an RDBStorage)
def cached_alembic_script() -> None:
    """Build Optuna's alembic ``ScriptDirectory`` once per process instead of per use (idempotent).

    ``RDBStorage()`` reads the schema's migration scripts to learn the head revision: executing the ten
    revision files, each defining SQLAlchemy models, takes ~0.03 s, and a new database does it three times
    (~0.1 s). A process that opens storages repeatedly (the CLI's run, export and status in one process, the
    tests) paid it per open. The scripts are files of the installed Optuna: they cannot change while the
    process runs, and the ``ScriptDirectory`` keeps no URL. Optuna offers no public hook for this
    (``_VersionManager`` is private), so a missing name leaves Optuna as it is."""
    try:
        from optuna.storages._rdb.storage import _VersionManager  # private class: see the docstring
    except ImportError:
        return
    original = getattr(_VersionManager, "_create_alembic_script", None)
    if original is None or getattr(original, "regsweep_cached", False):
        return
    cache: dict[str, Any] = {}

    def _create_alembic_script(self) -> Any:
        if "script" not in cache:
            cache["script"] = original(self)
        return cache["script"]

    _create_alembic_script.regsweep_cached = True  # type: ignore[attr-defined]
    _create_alembic_script.original = original  # type: ignore[attr-defined]
    _VersionManager._create_alembic_script = _create_alembic_script


# ---- optuna-dashboard (search/dashboard.py)
@functools.lru_cache(maxsize=1)
def dashboard_notes() -> Any:
    """optuna-dashboard's note functions (``save_note``, ``get_note``) without importing the whole package.

    ``import optuna_dashboard`` runs its package ``__init__``, which imports the web app and through it
    ``optuna.importance`` (scikit-learn, SciPy): ~1.2 s, paid by every ``regsweep run`` for its study note. The
    notes live in ``optuna_dashboard/_note.py``, which imports only optuna and the standard library; it is loaded
    here from the installed package's folder as a module of its own (not registered in ``sys.modules``, so a
    later ``import optuna_dashboard`` is unaffected). Anything unexpected (no such file, no such functions, an
    import error) falls back to the package's public ``save_note``/``get_note``, at the package's import cost.
    tests/search/test_optuna_internals.py checks both give the same note."""
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("optuna_dashboard")
        folder = (spec.submodule_search_locations or [None])[0] if spec is not None else None
        path = os.path.join(folder, "_note.py") if folder else None
        if path and os.path.isfile(path):
            # private module: see the docstring (optuna-dashboard's public names come only with the whole app)
            note_spec = importlib.util.spec_from_file_location("regsweep_optuna_dashboard_note", path)
            module = importlib.util.module_from_spec(note_spec)
            note_spec.loader.exec_module(module)
            if callable(getattr(module, "save_note", None)) and callable(getattr(module, "get_note", None)):
                return module
    except Exception:  # noqa: BLE001 - the package's public names below
        pass
    import optuna_dashboard

    return optuna_dashboard


def fast_trial_serializer() -> None:
    """Give optuna-dashboard's study payload a faster, output-identical per-trial serializer (idempotent).

    ``optuna_dashboard._serializer.serialize_frozen_trial`` classifies every intermediate value with three numpy
    calls (``np.isnan``, ``np.isposinf``, ``np.isneginf``: ~5 us per value on a Python float); a 5,000-trial
    study of 100 epochs spent ~2 of its ~5 s there. This wraps it: the original serializes the trial without its
    intermediate values (a shallow copy), then the values are classified with ``math`` into the very same list
    (``{"step", "value"}`` sorted by step; ``"nan"``/``"inf"``/``"-inf"`` for the non-finite ones).
    tests/search/test_optuna_internals.py checks the output equals the original's; optuna-dashboard has no public hook
    for this (its serializer module is private), so a missing name leaves the dashboard as it is."""
    import copy
    import math

    try:
        from optuna_dashboard import _serializer  # private module: see the docstring
    except ImportError:
        return
    original = getattr(_serializer, "serialize_frozen_trial", None)
    if original is None or getattr(original, "regsweep_fast", False):
        return

    def value(v: float) -> Any:
        if math.isfinite(v):
            return v
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")

    def serialize_frozen_trial(study_id: int, trial: Any, study_system_attrs: dict[str, Any]) -> dict[str, Any]:
        values = trial.intermediate_values
        if not values:
            return original(study_id, trial, study_system_attrs)
        light = copy.copy(trial)
        light.intermediate_values = {}
        out = original(study_id, light, study_system_attrs)
        out["intermediate_values"] = [{"step": step, "value": value(v)} for step, v in sorted(values.items())]
        return out

    serialize_frozen_trial.regsweep_fast = True  # type: ignore[attr-defined]
    serialize_frozen_trial.original = original  # type: ignore[attr-defined]
    _serializer.serialize_frozen_trial = serialize_frozen_trial
