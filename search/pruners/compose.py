"""Composition of pruners: ``any_of`` prunes when any child would, ``all_of`` only when every child would.

Each child keeps its label (the spec name) so a stop reason can name the pruner that fired.
"""

from __future__ import annotations

from optuna.pruners import BasePruner


class Composite(BasePruner):
    """Children as (label, pruner); ``fired[trial_number]`` is the label the decision is credited to."""

    mode = "any"

    def __init__(self, children: list[tuple[str, BasePruner]]):
        self.children = list(children)
        self.fired: dict[int, str] = {}

    def prune(self, study, trial) -> bool:
        votes = [(label, pruner.prune(study, trial)) for label, pruner in self.children]
        hits = [label for label, vote in votes if vote]
        decision = bool(hits) if self.mode == "any" else (len(hits) == len(votes) and bool(votes))
        if decision:
            self.fired[trial.number] = "+".join(hits) if self.mode == "all" else hits[0]
        return decision

    def label_for(self, trial_number: int) -> str | None:
        return self.fired.get(trial_number)


class AnyOf(Composite):
    """Prune if ANY child pruner would prune the trial at this step."""

    mode = "any"


class AllOf(Composite):
    """Prune only if EVERY child pruner would prune the trial at this step."""

    mode = "all"
