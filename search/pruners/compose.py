"""Composition of pruners: ``any_of`` stops when any child would, ``all_of`` only when every child would.

Each child keeps its label (the spec name) so a stop reason can name the pruner that fired. Decisions are
stop reasons (:func:`stop_verdict`): ``pruned:<pruner>@<epoch>`` from Optuna's pruners, and from the overfit
pruner ``stopped:overfit:<rule>@<epoch>`` (the trial ends COMPLETE) or ``pruned:overfit:<rule>@<epoch>``.
``any_of`` prefers a pruned verdict over a stopped one; ``all_of`` prunes only when every child prunes, and
otherwise stops (COMPLETE) when every child fired.
"""

from __future__ import annotations

from typing import Optional

from optuna.pruners import BasePruner


def stop_verdict(pruner, study, trial, label: str) -> Optional[str]:
    """A pruner's decision for ``trial`` (a FrozenTrial) as a stop reason, or None to go on.

    Pruners with ``verdict`` (overfit, composites) say it themselves; any other Optuna pruner prunes.
    """
    if hasattr(pruner, "verdict"):
        return pruner.verdict(study, trial)
    if pruner.prune(study, trial):
        return f"pruned:{label}@{trial.last_step}"
    return None


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

    def verdict(self, study, trial) -> Optional[str]:
        verdicts = [v for v in (stop_verdict(p, study, trial, label) for label, p in self.children) if v]
        if self.mode == "any":
            if not verdicts:
                return None
            pruned = [v for v in verdicts if v.startswith("pruned:")]
            return (pruned or verdicts)[0]
        if len(verdicts) != len(self.children) or not verdicts:
            return None
        kind = "pruned" if all(v.startswith("pruned:") for v in verdicts) else "stopped"
        epoch = verdicts[0].rsplit("@", 1)[1]
        names = "+".join(v.split(":", 1)[1].rsplit("@", 1)[0] for v in verdicts)
        return f"{kind}:{names}@{epoch}"


class AnyOf(Composite):
    """Prune if ANY child pruner would prune the trial at this step."""

    mode = "any"


class AllOf(Composite):
    """Prune only if EVERY child pruner would prune the trial at this step."""

    mode = "all"
