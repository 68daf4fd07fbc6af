"""The ONE recording path of a trial, shared by every backend.

Per epoch exactly one history write (the ``history`` user attr: the list of per-epoch dicts so far) plus
``report(objective, epoch)`` with epochs counted from 0. At the end: ``best_epoch``, ``stop_reason``
(completed | early_stopped | stopped:overfit:<rule>@<epoch> | pruned:<pruner>@<epoch> | failed:<error>),
``n_params``, ``device``, ``seed``, ``num_threads``, ``split_fingerprint`` and the test metrics (recorded for
reading, never used to choose). The trial's value is the best epoch's objective.

A *sink* is anything with ``set_user_attr(key, value)`` and ``report(value, step)``: an Optuna ``Trial``,
or the storage-backed sink the Ray backend uses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol

from search.spec import Objective

ATTR_PREFIX = "regsweep:"


class Sink(Protocol):
    def set_user_attr(self, key: str, value: Any) -> None: ...

    def report(self, value: float, step: int) -> None: ...


# outcome of a trial in backend-neutral words; backends map them to their states
COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"


def best_epoch(history: list[dict[str, Any]], objective: Objective) -> Optional[int]:
    """Index of the best finite objective value (first on ties), or None."""
    best, best_i = math.inf, None
    for i, rec in enumerate(history):
        v = rec.get(objective.metric)
        if v is not None and math.isfinite(v) and objective.sign * v < best:
            best, best_i = objective.sign * v, i
    return best_i


def outcome(stop_reason: str) -> str:
    if stop_reason.startswith("failed:"):
        return FAIL
    if stop_reason.startswith("pruned:"):
        return PRUNED
    return COMPLETE


class Recorder:
    """Records one trial. ``on_epoch`` is the ``report`` callback of ``models.train.fit``: it writes the
    epoch, then asks ``should_prune`` (if given) and returns a stop reason to stop the run."""

    def __init__(self, sink: Sink, objective: Objective, should_prune: Optional[Callable[[], bool]] = None,
                 pruner_label: Callable[[], str] = lambda: "pruner"):
        self.sink = sink
        self.objective = objective
        self.should_prune = should_prune
        self.pruner_label = pruner_label
        self.history: list[dict[str, Any]] = []

    def start(self, config: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> None:
        self.sink.set_user_attr("config", config)
        for key, value in (extra or {}).items():
            self.sink.set_user_attr(key, value)

    def on_epoch(self, epoch: int, record: dict[str, Any]) -> Optional[str]:
        self.history.append(record)
        self.sink.set_user_attr("history", self.history)
        value = record[self.objective.metric]
        if math.isfinite(value):
            self.sink.report(value, epoch)
        if self.should_prune is not None and self.should_prune():
            return f"pruned:{self.pruner_label()}@{epoch}"
        return None

    def finish(self, hist) -> tuple[str, Optional[float]]:
        """Write the final attrs from a ``models.train.History``; returns (outcome, value)."""
        best = best_epoch(self.history, self.objective)
        attrs = {"best_epoch": best, "stop_reason": hist.stop_reason, "n_params": hist.n_params,
                 "device": hist.device, "seed": hist.seed, "num_threads": hist.num_threads,
                 "split_fingerprint": hist.split_fingerprint, "torch_version": hist.torch_version}
        attrs.update(hist.test)
        for key, value in attrs.items():
            self.sink.set_user_attr(key, value)
        state = outcome(hist.stop_reason)
        if state != FAIL and best is None:
            self.fail("failed:no finite objective value")
            return FAIL, None
        value = None if best is None else self.history[best][self.objective.metric]
        return state, value

    def fail(self, reason: str) -> None:
        self.sink.set_user_attr("stop_reason", reason[:2000])
