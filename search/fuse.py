"""Fused trials (issue 20), the worker-loop side: asking a group under the budget lock and telling its members.

:func:`ask_group` asks one trial under the study's budget lock (as :func:`regsweep.search.loop.ask_within_budget`
does: stale trials failed and re-queued first), samples it (the objective's ``fixed_params``: its structural
params, those every member of a fused group shares), then up to ``size - 1`` more under the SAME lock with those
params fixed (Optuna's ``PartialFixedSampler`` around the study's sampler; TPE has ``constant_liar`` when
``fuse > 1``, so it sees the RUNNING members). COMPLETE + PRUNED + RUNNING never exceed ``n_trials``: the group is
at most the room left. A WAITING trial (a retry, an enqueued config) is popped first, with its own params; the
trial side runs a member ``fusable()`` refuses alone. Through a storage proxy the proxy admits each ask.

:func:`run_group` runs the objective's ``run_group`` (search/fused_trial.py) under ONE :class:`Heartbeat` over
every member and tells each member's end like :func:`regsweep.search.loop.run_one` tells a solo trial's.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Optional

from regsweep.search.loop import (
    Heartbeat,
    ask_through_proxy,
    ask_within_budget,
    claim,
    counts,
    fail_stale,
    fail_trial,
    run_one,
    tell_trial,
)
from regsweep.search.optuna_internals import trial_id
from regsweep.search.record import COMPLETE, PRUNED, failure_reason
from regsweep.search.signals import Terminated, check_signals
from regsweep.search.storage import database_reason, is_external, retry_transient
from regsweep.search.study import budget_lock
from regsweep.search.urls import is_proxy


def ask_group(study, url: str, n_trials: int, size: int,
              fixed_params: Callable[[Any], dict[str, Any]]) -> tuple[list, int]:
    """Up to ``size`` new trials sharing the first one's structural params (see the module docstring);
    ([], COMPLETE + PRUNED) when the budget is full."""
    if is_proxy(url):
        return _ask_through_proxy(study, size, fixed_params)
    with budget_lock(url, study.study_name):
        retry_transient(fail_stale, study)
        done, running = counts(study)
        room = min(size, n_trials - done - running)
        if room <= 0:
            return [], done
        trials = [claim(study)]
        trials += _claim_fixed(study, room - 1, fixed_params(trials[0]), fixed_params)
    return trials, done


def _claim_fixed(study, k: int, fixed: dict[str, Any], fixed_params: Callable[[Any], dict[str, Any]]) -> list:
    """``k`` trials claimed (the caller holds the budget lock) and sampled now with ``fixed`` params."""
    trials = []
    with _fixed_sampler(study, fixed):
        for _ in range(k):
            trials.append(claim(study))
            fixed_params(trials[-1])  # sampled now, under the fixed sampler
    return trials


def ask_more(study, url: str, n_trials: int, k: int, fixed: dict[str, Any],
             fixed_params: Callable[[Any], dict[str, Any]]) -> list:
    """Up to ``k`` new trials with ``fixed`` structural params, to refill a running group's freed slots: under
    the budget lock as :func:`ask_group` asks (never past ``n_trials``: COMPLETE + PRUNED + RUNNING), or each
    admitted by the storage proxy. [] when the budget has no room."""
    if is_proxy(url):
        return _proxy_fixed(study, k, fixed, fixed_params)[0]
    with budget_lock(url, study.study_name):
        done, running = counts(study)
        return _claim_fixed(study, max(0, min(k, n_trials - done - running)), fixed, fixed_params)


def _ask_through_proxy(study, size: int, fixed_params) -> tuple[list, int]:
    """:func:`ask_group` through a storage proxy, which admits (or refuses) each ask under its own lock."""
    first, done = ask_through_proxy(study)
    if first is None:
        return [], done
    more, last = _proxy_fixed(study, size - 1, fixed_params(first), fixed_params)
    return [first, *more], done if last is None else last


def _proxy_fixed(study, k: int, fixed: dict[str, Any], fixed_params) -> tuple[list, Optional[int]]:
    """Up to ``k`` trials through the proxy (each admitted or refused by it), sampled with ``fixed`` params;
    (trials, COMPLETE + PRUNED of the last answer, or None when none was asked)."""
    trials: list = []
    done = None
    with _fixed_sampler(study, fixed):
        while len(trials) < k:
            trial, done = ask_through_proxy(study)
            if trial is None:
                break
            fixed_params(trial)
            trials.append(trial)
    return trials, done


class _fixed_sampler:
    """The study's sampler wrapped in ``PartialFixedSampler(fixed)`` for the duration (nothing when ``fixed`` is
    empty); the study's own sampler keeps its state (TPE's RNG, constant liar)."""

    def __init__(self, study, fixed: dict[str, Any]):
        self.study, self.fixed, self.saved = study, fixed, study.sampler

    def __enter__(self):
        if self.fixed:
            import optuna

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.sampler = optuna.samplers.PartialFixedSampler(self.fixed, self.saved)
        return self

    def __exit__(self, *exc) -> None:
        self.study.sampler = self.saved


def run_group(study, trials: list, objective, url: Optional[str] = None, n_trials: Optional[int] = None,
              deadline: Optional[float] = None) -> list:
    """The objective's ``run_group`` on the asked trials under one heartbeat over every member still running;
    each member told (COMPLETE with its value, PRUNED, or FAIL with its stop reason, re-queued when the failure
    came from outside it) AS SOON AS it ends (a member pruned at epoch 2 is PRUNED then, while the others train
    on, and leaves the heartbeat), and returned frozen, in order. With ``url`` and ``n_trials``, a slot a member
    frees while others train on is refilled: :func:`ask_more` asks new trials with the group's structural params
    (within the budget; none once ``time.monotonic()`` has passed ``deadline``, the worker's time limit), they join
    the heartbeat and the list (after the asked ones). On KeyboardInterrupt /
    Terminated the members that had ended are told as they ended and every other member FAIL (re-queued on
    Terminated), then the exception goes on."""
    trials = list(trials)  # grows with the refills
    ids = [trial_id(t) for t in trials]
    frozen: dict[int, Any] = {}
    fixed: list[dict[str, Any]] = []  # the group's structural params, from its first trial (once)

    def told(i: int, got) -> None:
        frozen[i] = tell_outcome(study, ids[i], trials[i], got)

    def refill(k: int) -> list:
        if deadline is not None and time.monotonic() >= deadline:
            return []
        if not fixed:
            fixed.append(objective.fixed_params(trials[0]))
        new = ask_more(study, url, n_trials, k, fixed[0], objective.fixed_params)
        trials.extend(new)
        ids.extend(trial_id(t) for t in new)
        return new

    try:
        with Heartbeat(study, lambda: [tid for i, tid in enumerate(ids) if i not in frozen]):
            can_refill = url is not None and n_trials is not None
            outcomes = objective.run_group(trials[:], told=told, refill=refill if can_refill else None)
            check_signals()
    except (Terminated, KeyboardInterrupt) as exc:  # members that ended before it (exc.outcomes) keep their end
        ended = getattr(exc, "outcomes", {})
        reason = "failed:terminated" if isinstance(exc, Terminated) else "failed:interrupted"
        for i, (tid, t) in enumerate(zip(ids, trials)):
            if i in frozen:
                continue
            if i in ended:
                tell_outcome(study, tid, t, ended[i])
            else:
                fail_trial(study, tid, reason, t, retry=isinstance(exc, Terminated))
        raise
    except Exception as exc:  # the sweep goes on
        reason = database_reason(exc) or failure_reason(exc)
        return [frozen[i] if i in frozen else fail_trial(study, tid, reason, t, retry=is_external(reason))
                for i, (tid, t) in enumerate(zip(ids, trials))]
    return [frozen[i] if i in frozen else tell_outcome(study, tid, t, got)
            for i, (tid, t, got) in enumerate(zip(ids, trials, outcomes))]


def tell_outcome(study, tid: int, trial, got):
    """One member's end told as ``run_one`` tells a solo trial's: COMPLETE with its value, PRUNED, or FAIL with
    its stop reason (re-queued when the failure came from outside it); returns it frozen."""
    from optuna.trial import TrialState

    if got.state == COMPLETE:
        return tell_trial(study, tid, TrialState.COMPLETE, got.value, trial)
    if got.state == PRUNED:
        return tell_trial(study, tid, TrialState.PRUNED, None, trial)
    reason = got.reason or "failed"
    return fail_trial(study, tid, reason, trial, retry=is_external(reason))


def ask_trials(study, objective, url: str, n_trials: int) -> tuple[list, int]:
    """The next trials this worker runs: one (:func:`ask_within_budget`), or a fused group of up to the objective's
    ``fuse`` (:func:`ask_group`); (trials, COMPLETE + PRUNED)."""
    size = getattr(objective, "fuse", 1)
    if size > 1:
        return ask_group(study, url, n_trials, size, objective.fixed_params)
    trial, done = ask_within_budget(study, url, n_trials)
    return ([] if trial is None else [trial]), done


def run_trials(study, trials: list, objective, url: Optional[str] = None, n_trials: Optional[int] = None,
               deadline: Optional[float] = None) -> list:
    """:func:`run_one`, or a fused group's :func:`run_group` (its freed slots refilled within ``n_trials`` when
    ``url`` and ``n_trials`` are given, until ``deadline``); the trials frozen."""
    if getattr(objective, "fuse", 1) > 1:
        return run_group(study, trials, objective, url, n_trials, deadline)
    return [run_one(study, trials[0], objective)]

