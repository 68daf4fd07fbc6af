"""The only place regsweep touches Optuna's private API (tested against the pinned optuna range).

This text holds the trial/loop/backends section only; the storage/outputs section is written on another
branch, and the two are joined when they are merged.
"""

from __future__ import annotations

from typing import Any


# ---- used by the trial/loop/backends layers
def study_storage(study) -> Any:
    """The storage object behind a study: its public methods beat heartbeats (``record_heartbeat``,
    ``get_heartbeat_interval``) and read one trial by id (``get_trial``)."""
    # Study has no public accessor for its storage; regsweep asks trials itself (not study.optimize), so it must
    # beat their heartbeats and read single trials through the storage the study was opened with.
    return study._storage


def trial_id(trial) -> int:
    """The storage-wide id of a live Trial or a FrozenTrial (what the storage API is keyed by)."""
    # Trial and FrozenTrial expose only ``number``; the storage API (heartbeats, get_trial, Trial(study, id),
    # the retry callback's re-queue) is keyed by the storage-wide trial id, held only in ``_trial_id``.
    return trial._trial_id


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


def distribution_contains(dist, value: Any) -> bool:
    """Is ``value`` (external representation) inside the Optuna distribution ``dist``?"""
    # BaseDistribution has no public membership test; Study.enqueue_trial checks fixed params with this same
    # private ``_contains``, so an enqueued value is accepted here exactly when Optuna would accept it.
    return dist._contains(dist.to_internal_repr(value))
