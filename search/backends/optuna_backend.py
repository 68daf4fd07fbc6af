"""Run a study spec with Optuna's own loop on an RDB storage.

Budget contract: ``n_trials`` is the study's TOTAL of COMPLETE + PRUNED trials across all runs; a run on a
study that already has them exits 0 saying so, and a larger ``--n-trials`` runs only the difference. The
spec's hash is a study attr: resuming with a different spec is refused unless ``allow_spec_change``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, TextIO

from regsweep.models.config import ConfigError
from regsweep.search.objective import BASE_ATTR, Objective
from regsweep.search.spec import StudySpec
from regsweep.search.storage import mask, open_storage

SPEC_HASH_ATTR = "regsweep:spec_hash"
SPEC_ATTR = "regsweep:spec"


@dataclass
class RunResult:
    study: Any
    ran: int
    already_done: bool


def done_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def spec_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two canonical specs."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += spec_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _refuse_spec_change(spec: StudySpec, study_name: str, old_spec: dict[str, Any], canonical: dict[str, Any]):
    diff = spec_difference(old_spec, canonical)
    shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
    raise ConfigError(f"{spec.source or spec.path}: the spec differs from the one study '{study_name}' was "
                      f"started with ({shown}); use a new --study-name or pass --allow-spec-change")


def check_existing_study(spec: StudySpec, url: str, study_name: str) -> None:
    """Read-only version of open_study's checks (for `validate`): creates no file, table or study."""
    import optuna

    from regsweep.search.storage import open_existing

    storage = open_existing(url)
    if storage is None:
        return
    import sqlalchemy.exc

    try:
        names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    except sqlalchemy.exc.SQLAlchemyError:  # a database without Optuna's tables holds no study yet
        return
    if study_name not in names:
        return
    study = optuna.load_study(study_name=study_name, storage=storage)
    old_hash = study.user_attrs.get(SPEC_HASH_ATTR)
    if old_hash is not None and old_hash != spec.spec_hash():
        _refuse_spec_change(spec, study_name, study.user_attrs.get(SPEC_ATTR, {}),
                            json.loads(json.dumps(spec.canonical(), default=str)))


def open_study(spec: StudySpec, url: str, study_name: str, *, allow_spec_change: bool = False,
               heartbeat: bool = True):
    """Create or load the study; check the spec hash; returns (study, created)."""
    import optuna

    storage = open_storage(url, heartbeat=heartbeat)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    created = study_name not in existing
    study = optuna.create_study(storage=storage, study_name=study_name, direction=spec.objective.direction,
                                sampler=spec.make_sampler(), pruner=spec.make_pruner(), load_if_exists=True)
    canonical = json.loads(json.dumps(spec.canonical(), default=str))
    old_hash = study.user_attrs.get(SPEC_HASH_ATTR)
    if old_hash is None:
        study.set_user_attr(SPEC_HASH_ATTR, spec.spec_hash())
        study.set_user_attr(SPEC_ATTR, canonical)
        study.set_user_attr("regsweep:objective", spec.objective.metric)
    elif old_hash != spec.spec_hash():
        if not allow_spec_change:
            _refuse_spec_change(spec, study_name, study.user_attrs.get(SPEC_ATTR, {}), canonical)
        study.set_user_attr(SPEC_HASH_ATTR, spec.spec_hash())
        study.set_user_attr(SPEC_ATTR, canonical)
    if study.direction.name.lower() != spec.objective.direction:
        raise ConfigError(f"{spec.path}: objective.direction: study '{study_name}' is "
                          f"{study.direction.name.lower()}, the spec says {spec.objective.direction}")
    return study, created


def enqueue(study, spec: StudySpec) -> None:
    for params in spec.enqueue:
        if params:
            study.enqueue_trial(params, skip_if_exists=True)
        else:
            study.enqueue_trial({}, user_attrs={BASE_ATTR: True})


def trial_line(trial, metric: str) -> str:
    attrs = trial.user_attrs
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    base = " (base config)" if attrs.get(BASE_ATTR) else ""
    return (f"trial {trial.number:>3} {trial.state.name:<8} {metric}={value} best_epoch={attrs.get('best_epoch')} "
            f"{attrs.get('stop_reason', '')}{base}")


BUDGET_ATTR = "regsweep:n_trials"


def open_study_locked(spec: StudySpec, url: str, study_name: str, *, allow_spec_change: bool = False,
                      n_trials: Optional[int] = None):
    """open_study + enqueue under the budget lock, so workers starting at the same instant on a new study
    make one study and enqueue its first trials once. ``n_trials`` (from ``run``) becomes the study's budget,
    which workers joining later read."""
    from regsweep.search.workers import budget_lock

    with budget_lock(url, study_name):
        study, created = open_study(spec, url, study_name, allow_spec_change=allow_spec_change)
        if created:
            enqueue(study, spec)
        if n_trials is not None or BUDGET_ATTR not in study.user_attrs:
            study.set_user_attr(BUDGET_ATTR, n_trials if n_trials is not None else spec.n_trials)
    return study


def budget(study, spec: StudySpec) -> int:
    return int(study.user_attrs.get(BUDGET_ATTR, spec.n_trials))


def make_objective(spec: StudySpec, study, url: str, *, device: Optional[str] = None, artifacts: Optional[str] = None,
                   coordinator: bool = True, out: Optional[TextIO] = None) -> Objective:
    """The worker's objective with the study's artifact store attached (search/artifacts.py)."""
    from regsweep.search.artifacts import open_store, resolve

    objective = Objective(spec, device)
    objective.storage_label = mask(url)
    location = resolve(study, url, artifacts, coordinator=coordinator)
    if location is not None:
        objective.artifact_store = open_store(location)
        print(f"artifacts: {location}", file=out or sys.stdout, flush=True)
    return objective


def run(spec: StudySpec, url: str, study_name: str, *, n_trials: Optional[int] = None, timeout: Optional[float] = None,
        device: Optional[str] = None, allow_spec_change: bool = False, artifacts: Optional[str] = None,
        out: Optional[TextIO] = None) -> RunResult:
    """One in-process worker: the same loop every worker runs (search/workers.py)."""
    import optuna

    from regsweep.search.workers import terminate_on_sigterm, worker_loop

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = out or sys.stdout
    study = open_study_locked(spec, url, study_name, allow_spec_change=allow_spec_change, n_trials=n_trials)
    total = budget(study, spec)
    already = done_count(study)
    print(f"study '{study_name}' in {mask(url)}: {already}/{total} trials done", file=out, flush=True)
    if already >= total:
        print(f"budget met: {already} COMPLETE+PRUNED trials >= n_trials {total}; nothing to run", file=out)
        return RunResult(study, 0, True)
    start = time.monotonic()
    with terminate_on_sigterm():
        objective = make_objective(spec, study, url, device=device, artifacts=artifacts, out=out)
        ran = worker_loop(study, objective, url, total,
                          timeout=timeout if timeout is not None else spec.timeout, out=out)
    print(f"ran {ran} trials in {time.monotonic() - start:.1f}s", file=out, flush=True)
    return RunResult(study, ran, False)
