"""ONE trial body, :func:`run_trial`: an asked Optuna trial -> TrainConfig -> ``fit``, recorded through
search/record.py. Both backends call it through thin adapters that differ only in how the outcome is signalled:
:class:`OptunaObjective` (the worker loop's objective: raises ``TrialPruned``/:class:`TrialFailed`, returns the
value) and the Ray trainable (search/backends/ray/trainable.py: reports epochs to Ray, checkpoints).

The enqueued base trial (user attr ``regsweep:base``) trains the base config itself and suggests nothing.
A bad combination of sampled values, an exception or a NaN ends the trial FAIL with its reason; the sweep
goes on. SIGTERM/SIGINT end it FAIL (``failed:terminated`` / ``failed:interrupted``) and propagate. Datasets are
loaded once per worker process (:class:`DataCache`) and reused by every trial with the same data config.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import torch

from regsweep.models.build import build, resolve_device
from regsweep.models.config import ConfigError, DataConfig, TrainConfig
from regsweep.models.data import DataBundle, load, open_dataset, resolve_residency
from regsweep.models.plugins import is_ref
from regsweep.models.train import fit
from regsweep.search import log
from regsweep.search.optuna_internals import latest_trial
from regsweep.search.record import (
    BASE_ATTR,
    CODE_DIR_ATTR,
    FAIL,
    PRUNED,
    Objective,
    Recorder,
    TrialFailed,
    failure_reason,
)
from regsweep.search.signals import Terminated, check_signals
from regsweep.search.spec import StudySpec
from regsweep.search.storage import TrialWriter, database_reason, retry_transient, transient_errors, worker_label
from regsweep.search.urls import mask

# data fields that do not change the loaded tensors
LOADER_ONLY = ("batch_size", "augment", "num_workers")


class DataCache:
    """Loaded datasets by data config, most recent first: the opened dataset (to resolve ``data.residency``)
    and the split, normalised bundle on its residency. ``base_dir`` (the spec's folder) is where a dataset by
    import path is looked for, after ``sys.path``."""

    def __init__(self, size: int = 2, base_dir: Optional[str | Path] = None):
        self.size = size
        self.base_dir = base_dir
        self._items: OrderedDict[str, DataBundle] = OrderedDict()
        self._opened: OrderedDict[str, Any] = OrderedDict()

    def _put(self, cache: OrderedDict, key: str, value: Any) -> Any:
        cache[key] = value
        while len(cache) > self.size:
            cache.popitem(last=False)
        return value

    def opened(self, cfg: DataConfig) -> Any:
        key = json.dumps({k: v for k, v in vars(cfg).items() if k not in (*LOADER_ONLY, "residency")},
                         sort_keys=True, default=str)
        if key in self._opened:
            self._opened.move_to_end(key)
            return self._opened[key]
        return self._put(self._opened, key, open_dataset(cfg, self.base_dir))

    def resolve(self, cfg: TrainConfig, device: torch.device) -> TrainConfig:
        """``cfg`` with ``data.residency`` resolved on ``device`` (once, at trial start; the trial records it)."""
        residency = resolve_residency(cfg.data, self.opened(cfg.data), device)
        return cfg if residency == cfg.data.residency else cfg.with_overrides({"data.residency": residency})

    def get(self, cfg: DataConfig, device: torch.device) -> DataBundle:
        key = json.dumps({k: v for k, v in vars(cfg).items() if k not in LOADER_ONLY}, sort_keys=True,
                         default=str) + str(device)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return self._put(self._items, key, load(cfg, device, opened=self.opened(cfg)))


def config_for(spec: StudySpec, trial) -> TrainConfig:
    """The trial's TrainConfig: the base config for the enqueued base trial, else the space sampled on it; a
    confirm trial (user attr ``train.seed``, search/confirm.py) with its own training seed."""
    cfg = spec.base if trial.user_attrs.get(BASE_ATTR) else spec.base.with_overrides(
        spec.space.sample(trial, spec.base.to_dict()))
    seed = trial.user_attrs.get("train.seed") if trial.user_attrs.get("confirm_of") is not None else None
    return cfg if seed is None else cfg.with_overrides({"train.seed": int(seed)})


def pruner_verdict(spec: StudySpec, trial, epoch: int) -> Optional[str]:
    """The study's pruner on this trial after ``epoch``, as a stop reason (or None)."""
    from regsweep.search.pruners.compose import stop_verdict
    from regsweep.search.pruners.registry import label

    pruner = trial.study.pruner
    if not hasattr(pruner, "verdict"):  # Optuna's own pruners: through the public API
        if spec.multi:  # only `none` gets here (spec.py refuses the others): should_prune refuses several objectives
            return None
        return f"pruned:{label(spec.pruner)}@{epoch}" if trial.should_prune() else None
    return stop_verdict(pruner, trial.study, latest_trial(trial), label(spec.pruner))


@dataclass
class Outcome:
    """How a trial ended, in record.py's words: state COMPLETE | PRUNED | FAIL, the best epoch's value (a list of
    values, one per objective, in a multi-objective study), the recorded stop reason and the recorded history."""

    state: str
    value: Any
    reason: str
    history: list[dict[str, Any]] = field(default_factory=list)


class BestWeights:
    """A CPU copy of the model's weights at the trial's best epoch, by the study objective and record.py's rule
    (``record.best_epoch``: the first epoch with the best finite value), so the copy is of the very epoch the
    trial's value and ``best_epoch`` attr come from, whatever ``train.early_stopping`` (monitor, min_delta,
    restore_best) does. ``see`` runs in ``fit``'s report callback, right after the epoch's evaluation and
    before any later step changes the weights. Only the search side holds it: models/ knows nothing of it."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.model: Optional[torch.nn.Module] = None
        self.score = float("inf")
        self.epoch: Optional[int] = None
        self.state: Optional[dict[str, torch.Tensor]] = None

    def watch(self, model: torch.nn.Module) -> None:
        self.model = model

    def see(self, epoch: int, record: dict[str, Any]) -> None:
        value = record.get(self.objective.metric)
        if self.model is None or value is None or not math.isfinite(value):
            return
        if self.objective.sign * value < self.score:
            self.score, self.epoch = self.objective.sign * value, epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def upload_best_weights(store, spec: StudySpec, trial, weights: BestWeights, state: str,
                        value: Optional[float]) -> None:
    """At the trial's end (still RUNNING): its best-epoch weights when ``keep_weights`` keeps them
    (search/artifacts.py ``keeps_weights``) and the copy is of the recorded best epoch; both backends call it."""
    from regsweep.search.artifacts import keeps_weights, upload_weights
    from regsweep.search.export import trial_config

    if (weights.state is not None and weights.epoch == trial.user_attrs.get("best_epoch")
            and trial.user_attrs.get("config") is not None
            and keeps_weights(spec.keep_weights, state, value, trial.study)):
        model = weights.model
        upload_weights(store, trial, weights.state, trial_config(trial).to_dict(), best_epoch=weights.epoch,
                       value=value, in_shape=getattr(model, "in_shape", ()),
                       num_classes=getattr(model, "num_classes", 0))


# called after each recorded epoch with (config, epoch, record, the stop reason the recorder returned)
EpochHook = Callable[[TrainConfig, int, dict[str, Any], Optional[str]], None]
# called at the trial's end with (trial, history, state, value) while it is still RUNNING
EndHook = Callable[[Any, list[dict[str, Any]], str, Optional[float]], None]


def run_trial(spec: StudySpec, trial, *, device: torch.device, data: DataCache, extra: dict[str, Any],
              history: Optional[list[dict[str, Any]]] = None, after_epoch: Optional[EpochHook] = None,
              on_end: Optional[EndHook] = None, state: Optional[dict[str, Any]] = None,
              checkpoint: Optional[Callable[[dict[str, Any]], None]] = None,
              weights: Optional[BestWeights] = None) -> Outcome:
    """Run one asked trial to its end and record it; returns its :class:`Outcome` (FAIL included).

    ``extra`` joins the config in the first write (``worker``, ``resumed_at``); ``history`` is what an
    earlier run of the trial recorded (a Ray trial resumed from ``state``, ``fit``'s training state);
    ``checkpoint`` is ``fit``'s per-epoch checkpoint callback. ``on_end`` (artifacts) runs when epochs were
    recorded. ``weights`` (a :class:`BestWeights`) is shown every recorded epoch of this run.
    KeyboardInterrupt and :class:`Terminated` end the trial FAIL and propagate. (Long: every way a trial ends --
    bad config, database gone, dataset not opened, an error, Ctrl-C, SIGTERM -- is recorded here, in the one
    trial body, so the two backends cannot differ.)
    """
    def verdict(epoch: int) -> Optional[str]:
        check_signals()  # a SIGTERM/SIGINT swallowed somewhere during the epoch takes effect here
        return retry_transient(pruner_verdict, spec, trial, epoch)

    recorder = Recorder(TrialWriter(trial), spec.objective, verdict=verdict, history=history,
                        objectives=spec.all_objectives)
    try:
        cfg = config_for(spec, trial)
    except ConfigError as exc:
        record_failure(recorder, f"failed:config: {exc}")
        return Outcome(FAIL, None, recorder.stop_reason or "", recorder.history)
    except transient_errors() as exc:  # the database went away while the params were sampled
        record_failure(recorder, database_reason(exc) or failure_reason(exc))
        return Outcome(FAIL, None, recorder.stop_reason or "", recorder.history)
    if log.get(__name__).isEnabledFor(log.logging.DEBUG):  # -v
        log.get(__name__).debug(f"trial {trial.number}: params {dict(trial.params)}")
    if is_ref(cfg.model.name) or is_ref(cfg.data.name):  # where that code came from: export --format python
        extra = {**extra, CODE_DIR_ATTR: str(spec.directory)}

    def report(epoch: int, record: dict[str, Any]) -> Optional[str]:
        reason = recorder.on_epoch(epoch, record)
        if weights is not None:
            weights.see(epoch, record)
        if after_epoch is not None:
            after_epoch(cfg, epoch, record, reason)
        return reason

    try:
        cfg = data.resolve(cfg, device)  # data.residency, once: the recorded config says where the data lived
    except Exception as exc:  # the dataset could not be opened here: FAIL with the reason, the sweep goes on
        recorder.start(cfg.to_dict(), extra)
        record_failure(recorder, f"failed:config: {exc}" if isinstance(exc, ConfigError) else failure_reason(exc))
        return Outcome(FAIL, None, recorder.stop_reason or "", recorder.history)
    recorder.start(cfg.to_dict(), extra)
    try:
        parts = build(cfg, device, data=data.get(cfg.data, device))
        if weights is not None:
            weights.watch(parts.model)
        hist = fit(cfg, device, report=report, parts=parts, state=state, checkpoint=checkpoint)
        end_state, value = recorder.finish(hist)
    except KeyboardInterrupt:  # Ctrl-C: the trial ends FAIL, never RUNNING
        record_failure(recorder, "failed:interrupted")
        raise
    except Terminated:  # SIGTERM: FAIL here, re-queued by the worker loop
        record_failure(recorder, "failed:terminated")
        raise
    except Exception as exc:  # any error of this trial (or a database outage): FAIL with the reason
        record_failure(recorder, database_reason(exc) or failure_reason(exc))
        outcome = Outcome(FAIL, None, recorder.stop_reason or "", recorder.history)
    else:
        outcome = Outcome(end_state, value, recorder.stop_reason or "", recorder.history)
    if on_end is not None and outcome.history:
        on_end(trial, outcome.history, outcome.state, outcome.value)
    return outcome


def record_failure(recorder: Recorder, reason: str) -> None:
    """``recorder.fail(reason)``; while the database is away the reason is only kept (``recorder.stop_reason``)
    and the worker loop writes it when the database is back (search/loop.py ``fail_trial``)."""
    try:
        recorder.fail(reason)
    except transient_errors():
        recorder.stop_reason = reason[:2000]


class OptunaObjective:
    """The worker loop's objective: :func:`run_trial` on the asked trial; returns the value, or raises
    ``optuna.TrialPruned`` / :class:`TrialFailed` with the recorded stop reason."""

    def __init__(self, spec: StudySpec, device: Optional[str] = None, data_cache: Optional[DataCache] = None):
        self.spec = spec
        # the objective's name, or the names of several (search/loop.py trial_line)
        self.metric = [o.metric for o in spec.objectives] if spec.multi else spec.objective.metric
        self.device = resolve_device(device)
        self.data = data_cache or DataCache(base_dir=spec.path.parent)
        self.artifact_store = None  # set by make_objective: search.artifacts.open_store(location)
        self.trackers = None  # set by the worker: search.trackers.Trackers (MLflow, TensorBoard), or None
        self.storage_label = ""  # the masked storage URL, for the exported config's provenance

    @property
    def keeps_weights(self) -> bool:
        return self.artifact_store is not None and self.spec.keep_weights != "none"

    def upload_artifacts(self, trial, history: list[dict[str, Any]], state: str, value: Optional[float],
                         weights: Optional[BestWeights] = None) -> None:
        """The trial's curves and exported config, at its end, before it is told (search/artifacts.py); and its
        best-epoch weights when ``keep_weights`` says so."""
        if self.artifact_store is None:
            return
        from regsweep.search.artifacts import upload_trial_end

        upload_trial_end(self.artifact_store, trial, history, state, value, self.storage_label)
        if weights is not None:
            upload_best_weights(self.artifact_store, self.spec, trial, weights, state, value)

    def __call__(self, trial) -> Any:
        from optuna import TrialPruned

        keeper = BestWeights(self.spec.objective) if self.keeps_weights else None

        def on_end(*end) -> None:
            self.upload_artifacts(*end, weights=keeper)

        got = self.tracked(trial, on_end, keeper) if self.trackers is not None else run_trial(
            self.spec, trial, device=self.device, data=self.data, extra={"worker": worker_label()},
            on_end=on_end, weights=keeper)
        if got.state == PRUNED:
            raise TrialPruned(got.reason)
        if got.state == FAIL:
            raise TrialFailed(got.reason)
        return got.value

    @property
    def fuse(self) -> int:
        """Trials the worker loop asks and trains as one fused group (the spec's ``fuse:`` or ``--fuse N``)."""
        return self.spec.fuse

    def fixed_params(self, trial) -> dict[str, Any]:
        """Sample ``trial`` and return its structural params: the rest of its group is asked with them fixed."""
        from regsweep.search.fused_trial import fixed_params

        return fixed_params(self.spec, trial)

    def run_group(self, trials: list, told: Optional[Callable[[int, Outcome], None]] = None,
                  refill: Optional[Callable[[int], list]] = None) -> list[Outcome]:
        """An asked group of trials (search/fused_trial.py): fused where ``fusable()`` allows, else each alone;
        ``told(position, outcome)`` as soon as each has ended; ``refill(k)``: up to k new trials for freed slots
        (their positions follow the asked trials')."""
        from regsweep.search.fused_trial import run_group

        def solo(trial) -> Outcome:
            keeper = BestWeights(self.spec.objective) if self.keeps_weights else None
            on_end = lambda *end: self.upload_artifacts(*end, weights=keeper)  # noqa: E731
            if self.trackers is not None:
                return self.tracked(trial, on_end, keeper)
            return run_trial(self.spec, trial, device=self.device, data=self.data,
                             extra={"worker": worker_label()}, on_end=on_end, weights=keeper)

        return run_group(self.spec, trials, device=self.device, data=self.data, extra={"worker": worker_label()},
                         solo=solo, on_end=lambda t, h, st, v, w: self.upload_artifacts(t, h, st, v, weights=w),
                         keep_weights=self.keeps_weights, trackers=self.trackers, told=told, refill=refill)

    def tracked(self, trial, on_end: EndHook, weights: Optional[BestWeights]) -> Outcome:
        """:func:`run_trial` with the trackers told of its start, each epoch and its end (search/trackers.py:
        they never wait on a server and never raise)."""
        trackers, started = self.trackers, []

        def after_epoch(cfg: TrainConfig, epoch: int, record: dict[str, Any], reason: Optional[str]) -> None:
            if not started:
                started.append(True)
                trackers.start(trial)
            trackers.epoch(trial, epoch, record)

        try:
            got = run_trial(self.spec, trial, device=self.device, data=self.data, extra={"worker": worker_label()},
                            after_epoch=after_epoch, on_end=on_end, weights=weights)
        except BaseException as exc:  # Ctrl-C / SIGTERM: the trial ended FAIL, its run too
            if started:
                reason = "failed:terminated" if isinstance(exc, Terminated) else "failed:interrupted"
                trackers.end(trial, FAIL, reason, [], None, None)
            raise
        if started:
            from regsweep.search.record import best_epoch

            value = got.value[0] if isinstance(got.value, list) else got.value  # several: the first objective's
            trackers.end(trial, got.state, got.reason, got.history, best_epoch(got.history, self.spec.objective),
                         value)
        return got


def make_objective(spec: StudySpec, study, url: str, *, device: Optional[str] = None, artifacts: Optional[str] = None,
                   coordinator: bool = True, out: Optional[TextIO] = None) -> OptunaObjective:
    """The worker's objective with the study's artifact store attached (search/artifacts.py)."""
    from regsweep.search.artifacts import open_store, resolve

    objective = OptunaObjective(spec, device)
    objective.storage_label = mask(url)
    location = resolve(study, url, artifacts, coordinator=coordinator)
    if location is not None:
        objective.artifact_store = open_store(location)
        print(f"artifacts: {location}", file=log.info_stream(__name__, out), flush=True)
    elif coordinator:
        warn_no_weights(spec)
    return objective


def warn_no_weights(spec: StudySpec) -> None:
    """The one warning of a run (the coordinator's) whose weights cannot be kept: no artifact store."""
    if spec.keep_weights != "none":
        log.get(__name__).warning(f"keep_weights: {spec.keep_weights}: no artifact store (--artifacts off), so no "
                                  "trial's weights are kept")
