"""The ONE recording path of a trial, shared by every backend.

Per epoch exactly one write of constant size: the current chunk of per-epoch dicts (user attr
``history:NNNNN``, the epochs from NNNNN on, at most :data:`CHUNK` of them) and ``history_len`` (the number of
epochs recorded), plus ``report(objective, epoch)`` with epochs counted from 0 (record format 2). Studies made
before 0.3 hold record format 1: one ``history`` user attr with the whole list, rewritten every epoch (O(E^2)
bytes per trial, past MySQL's 64 KB TEXT limit at ~277 epochs). :func:`history` reads both; it is the ONE
reader of the per-epoch records. At the end:
``best_epoch``, ``stop_reason``
(completed | early_stopped | stopped:overfit:<rule>@<epoch> | pruned:<pruner>@<epoch> | failed:<error>),
``n_params``, ``device``, ``seed``, ``num_threads``, ``split_fingerprint`` and the test metrics (recorded for
reading, never used to choose). The trial's value is the best epoch's objective.

A multi-objective study (spec ``objectives:``) reports nothing per epoch (Optuna has no ``report`` for several
objectives): the per-epoch records are its curves. Its trial values are :func:`objective_values` taken at the
epoch best for the FIRST objective (:func:`best_epoch`), ``n_params`` from the end of the run.

A *sink* has ``write(attrs, report=None)``: set several user attrs and (optionally) report ``(value, step)``
in one storage transaction — ``regsweep.search.storage.TrialWriter`` for a live Optuna trial, or the storage-backed
sink the Ray backend uses. Per trial that is one write at the start (``config``), one per epoch and one at
the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

ATTR_PREFIX = "regsweep:"
HISTORY_ATTR = "history"  # record format 1: the whole list of per-epoch records (read only, never written now)
CHUNK_PREFIX = "history:"  # record format 2: ``history:00040`` = the epochs 40.. of its chunk
LEN_ATTR = "history_len"  # record format 2: epochs recorded (chunks may hold stale epochs past it after a resume)
CHUNK = 10  # epochs per chunk attr: ~2.4 KB at most per write, and E/10 attr rows per trial (benchmarks/records.py)
BASE_ATTR = "regsweep:base"  # user attr of the enqueued base trial: it trains the base config, suggests nothing
CODE_DIR_ATTR = "code_dir"  # user attr: the spec's folder, on sys.path for a model or dataset by import path
FORMAT_ATTR = "regsweep:record_format"  # study attr: 2 when every trial is format 2; absent: format 1 (or mixed)
RECORD_FORMAT = 2
EPOCH_KEY_PATTERNS = (HISTORY_ATTR, CHUNK_PREFIX + "%")  # SQL LIKE patterns of the per-epoch attrs


@dataclass
class Objective:
    metric: str = "val_loss"
    direction: str = "minimize"

    @property
    def sign(self) -> float:
        """+1 when lower is better: multiply once at the edge, compare one way inside."""
        return 1.0 if self.direction == "minimize" else -1.0


def metric_value(record: dict[str, Any], metric: str, n_params: Optional[int] = None) -> Optional[float]:
    """An objective's value from one per-epoch record: a recorded key, ``overfit_gap`` = ``val_loss -
    train_eval_loss`` (the clean gap the overfit rule watches), ``n_params`` from the trial's end; None when
    missing."""
    if metric == "overfit_gap":
        val, train = record.get("val_loss"), record.get("train_eval_loss")
        return None if val is None or train is None else float(val) - float(train)
    if metric == "n_params":
        return None if n_params is None else float(n_params)
    value = record.get(metric)
    return None if value is None else float(value)


def objective_values(record: dict[str, Any], objectives: list[Objective],
                     n_params: Optional[int] = None) -> list[Optional[float]]:
    """The values of several objectives at one epoch's record (a multi-objective trial's values)."""
    return [metric_value(record, o.metric, n_params) for o in objectives]


def first_value(trial: Any) -> Optional[float]:
    """The trial's value, or its FIRST objective's in a multi-objective study (``FrozenTrial.value`` raises
    there); None when it has none."""
    values = trial.values
    return None if not values else values[0]


def is_multi(study: Any) -> bool:
    """Whether a study has several objectives (``study.direction``, ``best_trial``, ``best_value`` raise then)."""
    return len(study.directions) > 1


def minimizes(study: Any) -> bool:
    """Whether the study's (first) objective is minimised."""
    return study.directions[0].name == "MINIMIZE"


def history(trial: Any) -> list[dict[str, Any]]:
    """The per-epoch records of a trial (a FrozenTrial, a live Trial or anything with ``user_attrs``), oldest
    first; [] when it has none. The ONE reader of the stored formats (1 and 2): every other module calls this."""
    return history_of(trial.user_attrs)


def history_of(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`history` from a trial's user attrs."""
    n = attrs.get(LEN_ATTR)
    if n is None:  # format 1 (or nothing recorded yet)
        return list(attrs.get(HISTORY_ATTR) or [])
    chunks = sorted((int(k[len(CHUNK_PREFIX):]), v) for k, v in attrs.items() if k.startswith(CHUNK_PREFIX))
    records: list[dict[str, Any]] = []
    for start, chunk in chunks:
        if start != len(records):  # a chunk of an earlier, longer run of a resumed trial: past history_len
            break
        records.extend(chunk)
    return records[:n]


def n_epochs(trial: Any) -> int:
    """How many epochs a trial recorded, without assembling its records where the format says it."""
    n = trial.user_attrs.get(LEN_ATTR)
    return int(n) if n is not None else len(trial.user_attrs.get(HISTORY_ATTR) or [])


def is_epoch_key(key: str) -> bool:
    """Whether a user attr holds per-epoch records (either format); readers of many trials leave these out."""
    return key == HISTORY_ATTR or key.startswith(CHUNK_PREFIX)


def epoch_attrs(records: list[dict[str, Any]], chunk: int = CHUNK) -> dict[str, Any]:
    """The format-2 write after the last of ``records``: its chunk (the only attr that changed) and the length."""
    last = len(records) - 1
    start = last - last % chunk
    return {f"{CHUNK_PREFIX}{start:05d}": records[start:], LEN_ATTR: len(records)}


def chunk_attrs(records: list[dict[str, Any]], chunk: int = CHUNK) -> dict[str, Any]:
    """Every format-2 chunk attr of ``records`` at once (the length attr not included): a whole history written
    in one go, e.g. a fused trial's solo replay reference (search/replay.py, under its own key prefix)."""
    return {f"{CHUNK_PREFIX}{start:05d}": records[start:start + chunk] for start in range(0, len(records), chunk)}


# the solo replay reference of a fused trial (issue 20; search/replay.py writes it): study user attrs
# ``regsweep:replay:<number>`` = its summary (history_len, best_epoch, value, stop_reason, device, num_threads,
# torch_version, fused) and ``regsweep:replay:<number>:history:NNNNN`` = its per-epoch records in format-2 chunks
REPLAY_PREFIX = "regsweep:replay:"
FUSED_ATTR = "fused"  # user attr of a fused trial: {"group": first member's trial number, "size": its slots}


def replay_key(number: int) -> str:
    return f"{REPLAY_PREFIX}{number}"


def replay_reference(study_attrs: dict[str, Any], number: int) -> Optional[dict[str, Any]]:
    """Trial ``number``'s solo replay reference from the study's user attrs: its summary with ``history`` (the
    per-epoch records, read like a trial's format-2 records); None when there is none."""
    head = study_attrs.get(replay_key(number))
    if not isinstance(head, dict):
        return None
    prefix = replay_key(number) + ":"
    attrs = {k[len(prefix):]: v for k, v in study_attrs.items() if k.startswith(prefix)}
    attrs[LEN_ATTR] = head.get("history_len", 0)
    return {**head, "history": history_of(attrs)}


class Sink(Protocol):
    def write(self, attrs: dict[str, Any], report: Optional[tuple[float, int]] = None) -> None: ...


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


class TrialFailed(RuntimeError):
    """Raised to end a trial FAIL; its message is the stop reason."""


def failure_reason(exc: BaseException) -> str:
    """``failed:<ExceptionClass>: <first line of its message>``: the stop reason of a trial that raised."""
    text = str(exc)
    return f"failed:{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}"


def outcome(stop_reason: str) -> str:
    if stop_reason.startswith("failed:"):
        return FAIL
    if stop_reason.startswith("pruned:"):
        return PRUNED
    return COMPLETE


class Recorder:
    """Records one trial. ``on_epoch`` is the ``report`` callback of ``regsweep.models.train.fit``: it writes the
    epoch, then asks ``verdict(epoch)`` (if given) for a stop reason — ``pruned:<pruner>@<epoch>``,
    ``stopped:overfit:<rule>@<epoch>`` — and returns it to stop the run."""

    def __init__(self, sink: Sink, objective: Objective, verdict: Optional[Callable[[int], Optional[str]]] = None,
                 history: Optional[list[dict[str, Any]]] = None, chunk: int = CHUNK,
                 objectives: Optional[list[Objective]] = None):
        self.sink = sink
        self.chunk = chunk
        self.objective = objective
        # several: nothing is reported per epoch and the value is a list (:func:`objective_values`)
        self.objectives = list(objectives) if objectives and len(objectives) > 1 else None
        self.verdict = verdict
        self.history: list[dict[str, Any]] = list(history or [])  # epochs already recorded (a driver's end write)
        self.stop_reason: Optional[str] = None  # as written by end() or fail()
        self._pending: dict[str, Any] = {}

    def start(self, config: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> None:
        """The trial's config (and extra attrs): written with the first epoch, or with a failure before it."""
        self._pending = {"config": config, **(extra or {})}

    def _stage(self, attrs: dict[str, Any], report: Optional[tuple[float, int]] = None
               ) -> tuple[dict[str, Any], Optional[tuple[float, int]]]:
        """``attrs`` with what :meth:`start` left pending (written with the first write), and ``report``."""
        pending, self._pending = self._pending, {}
        return {**pending, **attrs}, report

    def _flush(self, attrs: dict[str, Any], report: Optional[tuple[float, int]] = None) -> None:
        self.sink.write(*self._stage(attrs, report))

    def on_epoch(self, epoch: int, record: dict[str, Any]) -> Optional[str]:
        self.sink.write(*self.stage_epoch(epoch, record))
        return self.verdict(epoch) if self.verdict is not None else None

    def stage_epoch(self, epoch: int, record: dict[str, Any]) -> tuple[dict[str, Any], Optional[tuple[float, int]]]:
        """The epoch's ONE write (attrs, report), not yet written: ``on_epoch`` writes it through the sink; a fused
        group writes its members' in one transaction (search/fused_trial.py)."""
        self.history.append(record)
        value = record[self.objective.metric]
        report = (value, epoch) if math.isfinite(value) and self.objectives is None else None
        return self._stage(epoch_attrs(self.history, self.chunk), report)

    def finish(self, hist) -> tuple[str, Optional[float]]:
        """Write the final attrs from a ``regsweep.models.train.History``; returns (outcome, value)."""
        attrs = {"n_params": hist.n_params, "device": hist.device, "seed": hist.seed,
                 "num_threads": hist.num_threads, "split_fingerprint": hist.split_fingerprint,
                 "torch_version": hist.torch_version, **hist.test}
        return self.end(hist.stop_reason, attrs)

    def end(self, stop_reason: str, attrs: Optional[dict[str, Any]] = None) -> tuple[str, Any]:
        """Write ``best_epoch`` and ``stop_reason`` (plus ``attrs``) for the recorded history; returns (outcome,
        value; with several objectives the list of values at the best epoch). ``finish`` calls it; a driver calls
        it alone for a trial stopped from outside its trainer (a Ray scheduler or stopper), which cannot write its
        own end."""
        best = best_epoch(self.history, self.objective)
        attrs = {"best_epoch": best, "stop_reason": stop_reason, **(attrs or {})}
        state = outcome(stop_reason)
        if state != FAIL and best is None:
            state, attrs["stop_reason"] = FAIL, "failed:no finite objective value"
        value: Any = None
        if best is not None and self.objectives is not None:
            value = objective_values(self.history[best], self.objectives, attrs.get("n_params"))
            bad = [o.metric for o, v in zip(self.objectives, value) if v is None or not math.isfinite(v)]
            if bad and state != FAIL:
                state, attrs["stop_reason"] = FAIL, f"failed:no finite {bad[0]} at the best epoch {best}"
        elif best is not None:
            value = self.history[best][self.objective.metric]
        self._flush(attrs)
        self.stop_reason = attrs["stop_reason"]
        return state, value

    def fail(self, reason: str) -> None:
        self.stop_reason = reason[:2000]
        self._flush({"stop_reason": self.stop_reason})
