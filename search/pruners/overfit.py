"""Stop a trial that has stopped generalising, without throwing away its best epoch.

Rule: after ``warmup`` epochs, fire when the validation loss has not improved by more than ``min_delta`` for
``patience`` epochs (``plateau``), or when the clean generalisation gap — ``val_loss - train_eval_loss``, both
measured in eval mode on clean data, so dropout, mixup, noise and penalties do not distort it — has widened
at each of the last ``window`` epochs while the validation loss rose over them (``gap``).

Parameters: ``warmup`` (epochs before the rule may fire; epochs count from 0, so it can fire from epoch
``warmup`` on), ``patience``, ``min_delta``, ``window``, and ``on_fire``:

- ``complete`` (default): the trial stops and ends COMPLETE with its best epoch's value (the trainer restores
  that epoch's weights) and stop reason ``stopped:overfit:<rule>@<epoch>`` — a trial that peaked and then
  overfit may hold the best configuration, and Optuna's ``best_trial`` and TPE ignore or penalise PRUNED
  trials. If the trial is also worse than the median of the other finished trials at that epoch, it ends
  PRUNED (``pruned:overfit:<rule>@<epoch>``): it was both overfitting and behind.
- ``prune``: the trial ends PRUNED.

It reads the trial's recorded ``history`` user attr (written every epoch by search/record.py), so it decides
the same in every worker and after a resume. :func:`overfit_rule` is the rule as a plain function (the Ray
backend's stopper uses it). Through Optuna's plain ``prune()`` the pruner answers True whenever it fires.

How it relates to in-trial early stopping (``train.early_stopping``): both stop a run, neither discards it,
and the first to fire ends the trial with one stop reason — never both. ``plateau`` is early stopping on the
validation loss seen from the study; with ``train.early_stopping.patience`` set to the same patience it is
redundant, so give the pruner a smaller patience or rely on ``gap``, which early stopping cannot see.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

from optuna.pruners import BasePruner

from regsweep.search import record

ON_FIRE = ("complete", "prune")


def overfit_rule(history: Sequence[dict[str, Any]], *, warmup: int = 3, patience: int = 3, min_delta: float = 0.0,
                 window: int = 3) -> Optional[str]:
    """'plateau', 'gap' or None for a history of per-epoch dicts (val_loss, train_eval_loss)."""
    n = len(history)
    if n <= warmup:
        return None
    val = [float(h["val_loss"]) for h in history]
    best, since = math.inf, 0
    for v in val:
        if v < best - min_delta:
            best, since = v, 0
        else:
            since += 1
    if patience and since >= patience:
        return "plateau"
    if window and n > window:
        gap = [float(h["val_loss"]) - float(h["train_eval_loss"]) for h in history]
        widened = all(gap[i] > gap[i - 1] for i in range(n - window, n))
        if widened and val[-1] > val[-1 - window]:
            return "gap"
    return None


class OverfitPruner(BasePruner):
    """Fire when a trial stops generalising (see the module docstring for the rule)."""

    def __init__(self, warmup: int = 3, patience: int = 3, min_delta: float = 0.0, window: int = 3,
                 on_fire: str = "complete"):
        for name, value in (("warmup", warmup), ("patience", patience), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if patience == 0 and window == 0:
            raise ValueError("patience and window cannot both be 0 (the rule could never fire)")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        if on_fire not in ON_FIRE:
            raise ValueError(f"on_fire must be one of {', '.join(ON_FIRE)}, got {on_fire!r}")
        self.warmup, self.patience, self.min_delta, self.window, self.on_fire = (
            warmup, patience, float(min_delta), window, on_fire)

    def rule(self, trial) -> Optional[str]:
        return overfit_rule(record.history(trial), warmup=self.warmup, patience=self.patience, min_delta=self.min_delta,
                            window=self.window)

    def verdict(self, study, trial) -> Optional[str]:
        """The stop reason when the rule fires: 'stopped:overfit:<rule>@<epoch>' or 'pruned:...'; else None."""
        rule = self.rule(trial)
        if rule is None:
            return None
        epoch = len(record.history(trial)) - 1
        prune = self.on_fire == "prune" or _behind_median(study, trial, epoch)
        return f"{'pruned' if prune else 'stopped'}:overfit:{rule}@{epoch}"

    def prune(self, study, trial) -> bool:
        return self.rule(trial) is not None


def _behind_median(study, trial, step: int) -> bool:
    """Is the trial's best value so far worse than the median of other finished trials' values at ``step``?"""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    values = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
    others = [t.intermediate_values[step] for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.number != trial.number and step in t.intermediate_values and math.isfinite(t.intermediate_values[step])]
    if not values or not others:
        return False
    median = statistics.median(others)
    if study.direction == StudyDirection.MAXIMIZE:
        return max(values) < median
    return min(values) > median
