"""Run a study spec on Ray Tune, recorded exactly like the Optuna backend.

A Tuner runs a function trainable that calls ``regsweep.models.train.fit`` and reports every epoch to Ray. Trials come
from the study's own Optuna sampler through :class:`StudySearcher` (``study.ask`` + the spec's space sampled
define-by-run, conditions included) on the SAME RDB study, under the same budget lock as the Optuna workers, so
``n_trials`` stays the study's total of COMPLETE + PRUNED trials across runs and backends. search/record.py
writes every trial:

- the trainable writes the config, one history entry + ``report(objective, epoch)`` per epoch (epochs from 0)
  and, when it ends by itself, its end (``completed``, ``early_stopped``, the spec pruner's verdict, which runs
  inside the trial exactly as on the Optuna backend, or ``failed:<error>``);
- a trial that Ray stopped from outside cannot write its end; the driver writes it through the same
  ``Recorder`` in ``StudySearcher.on_trial_complete``: ``pruned:<scheduler>@<epoch>`` (PRUNED) when Ray's
  scheduler stopped it, ``stopped:overfit:<rule>@<epoch>`` (COMPLETE) or ``pruned:overfit:...`` when the
  overfit stopper did, ``failed:...`` when its process died after Ray's retries.

The spec's optional ``ray:`` section (read by this backend only)::

    ray:
      scheduler: {name: asha, args: {grace_period: 1, reduction_factor: 2}}   # fifo (default) | asha | median
                                                                              # | hyperband {reduction_factor}
      overfit: {patience: 3, window: 3}    # the overfit rule as a Ray stopper (search/pruners/overfit.py)

HyperBand pauses and resumes trials: under it the trainable reports every epoch with a Ray checkpoint holding
``regsweep.models.train``'s training state (``train(checkpoint=...)``) and a resumed trial continues from it
(``train(state=...)``, an exact replay) and continues the trial's recorded history (``resumed_at`` lists the epochs
it resumed at). A paused trial stays RUNNING in the study with no process beating its heartbeat; while Ray runs,
the driver beats the heartbeat of every trial it asked that Ray has not finished (:class:`_OpenTrialsHeartbeat`),
so neither it nor any other worker fails them as stale; when the driver dies, the beats stop and they are.

The storage URL (and its password) reaches the trials through the environment (``$REGSWEEP_RAY_STORAGE``), never
a trial's config: nothing Ray writes under its storage path contains it. Ray is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import pickle
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO

from regsweep.models.config import ConfigError
from regsweep.search.backends.optuna_backend import (BUDGET_ATTR, RunResult, budget, done_count, open_study_locked,
                                            trial_line)
from regsweep.search.spec import StudySpec
from regsweep.search.storage import mask

STORAGE_ENV = "REGSWEEP_RAY_STORAGE"  # the storage URL, in every Ray worker's environment
RESULTS_ENV = "REGSWEEP_RAY_RESULTS"  # Ray's storage path (experiment dirs); default ~/ray_results
RUN_ATTR = "regsweep:ray_run"  # user attr of every trial a Ray driver asked: the Ray experiment's name
STOP_KEY = "regsweep_stop"  # the overfit stopper's stop reason, put into the result it stopped on
SCHEDULERS = ("fifo", "asha", "median", "hyperband")
PAUSING = ("hyperband",)  # schedulers that pause and resume trials: every epoch is checkpointed (models.train)
CHECKPOINT_FILE = "state.pt"  # models.train's training state in a Ray checkpoint dir (torch.save)
REFUSED = {
    "pbt": "PBT changes a trial's params mid-run (no single Optuna record) and Ray refuses search algorithms "
           "with it; use asha, median or fifo",
    "pb2": "PB2 changes a trial's params mid-run (no single Optuna record) and Ray refuses search algorithms "
           "with it; use asha, median or fifo",
}
# scheduler -> {arg: (kind, check, what is allowed)}; time is counted in epochs (Ray's training_iteration)
SCHEDULER_ARGS: dict[str, dict[str, tuple[str, str]]] = {
    "fifo": {},
    "asha": {"grace_period": ("int", "an integer in [1, train.epochs]"),
             "reduction_factor": ("float", "a number > 1"),
             "brackets": ("int", "an integer >= 1")},
    "median": {"grace_period": ("int", "an integer in [1, train.epochs]"),
               "min_samples_required": ("int", "an integer >= 1")},
    "hyperband": {"reduction_factor": ("float", "a number > 1")},
}
DEFAULTS = {"asha": {"grace_period": 1, "reduction_factor": 2, "brackets": 1},
            "median": {"grace_period": 1, "min_samples_required": 3},
            "hyperband": {"reduction_factor": 3}}
RAY_KEYS = ("scheduler", "overfit")
MAX_CONSECUTIVE_FAILURES = 5

# ------------------------------------------------------------------------------------ the ray: section
def _bad(source: str, fld: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: {fld}: {value!r} is not allowed; {allowed}")


def parse_scheduler(value: Any, source: str, epochs: int, fld: str = "ray.scheduler") -> dict[str, Any]:
    """``NAME`` or ``{name, args}`` -> ``{name, args}`` (args checked; Ray is not imported)."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise _bad(source, fld, value, f"must be a scheduler name or {{name, args}}; names: {', '.join(SCHEDULERS)}")
    unknown = sorted(set(value) - {"name", "args"})
    if unknown:
        raise _bad(source, f"{fld}.{unknown[0]}", value[unknown[0]], "allowed keys: name, args")
    name = value.get("name")
    if name in REFUSED:
        raise _bad(source, f"{fld}.name", name, REFUSED[name])
    if name not in SCHEDULERS:
        raise _bad(source, f"{fld}.name", name, f"choose one of: {', '.join(SCHEDULERS)}")
    args = value.get("args") or {}
    if not isinstance(args, Mapping):
        raise _bad(source, f"{fld}.args", args, "must be a mapping of keyword arguments")
    allowed = SCHEDULER_ARGS[name]
    for key, v in args.items():
        if key not in allowed:
            raise _bad(source, f"{fld}.args.{key}", v, f"{name} takes: {', '.join(allowed) or 'no args'}")
        kind, what = allowed[key]
        number = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        ok = number and (kind == "float" or float(v) == int(v))
        if ok and key == "grace_period":
            ok = 1 <= v <= epochs
        elif ok and key == "reduction_factor":
            ok = v > 1
        elif ok:
            ok = v >= 1
        if not ok:
            raise _bad(source, f"{fld}.args.{key}", v, f"must be {what}" + (f" ({epochs})" if "epochs" in what else ""))
    return {"name": name, "args": {k: (int(v) if allowed[k][0] == "int" else float(v)) for k, v in args.items()}}


def parse_ray_section(value: Any, source: str, epochs: int) -> dict[str, Any]:
    """The spec's ``ray:`` section, checked; {} when absent (then the spec hash is unchanged)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(source, "ray", value, f"must be a mapping with keys: {', '.join(RAY_KEYS)}")
    unknown = [k for k in value if k not in RAY_KEYS]
    if unknown:
        raise _bad(source, f"ray.{unknown[0]}", value[unknown[0]], f"allowed keys: {', '.join(RAY_KEYS)}")
    out: dict[str, Any] = {}
    if value.get("scheduler") is not None:
        out["scheduler"] = parse_scheduler(value["scheduler"], source, epochs)
    if "overfit" in value:
        args = value["overfit"] or {}
        if not isinstance(args, Mapping):
            raise _bad(source, "ray.overfit", args, "must be a mapping of overfit args (warmup, patience, "
                       "min_delta, window, on_fire)")
        from regsweep.search.pruners.overfit import OverfitPruner

        try:
            OverfitPruner(**args)
        except (TypeError, ValueError) as exc:
            raise _bad(source, "ray.overfit", dict(args), str(exc).splitlines()[0]) from None
        out["overfit"] = dict(args)
    return out


def scheduler_label(sched: Mapping[str, Any]) -> str:
    return str(sched["name"])


# ------------------------------------------------------------------------------------ the trainable
_WORKER: dict[str, Any] = {}  # per Ray worker process: the opened study and the data cache, reused by trials


def storage_fingerprint(url: str) -> str:
    """A short hash of the masked URL: lets the driver and a trial check that they mean the same storage, with
    nothing derived from the password in any config."""
    return hashlib.sha256(mask(url).encode()).hexdigest()[:12]


def _worker_url(expected: Optional[str] = None) -> str:
    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise RuntimeError(f"${STORAGE_ENV} is not set in this Ray worker: start the Ray nodes with it exported, "
                           "or let `regsweep run --backend ray` start or join Ray itself")
    if expected is not None and storage_fingerprint(url) != expected:
        raise RuntimeError(f"${STORAGE_ENV} of this Ray worker names another storage ({mask(url)})")
    return url


def _worker_study(spec: StudySpec, study_name: str, fingerprint: str):
    """The study in this worker process (one storage engine per process, reused by the trials it runs)."""
    import optuna

    from regsweep.search.storage import open_storage

    url = _worker_url(fingerprint)
    key = (url, study_name, spec.spec_hash())
    if _WORKER.get("key") != key:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(url)
        _WORKER["study"] = optuna.load_study(study_name=study_name, storage=storage, pruner=spec.make_pruner(),
                                             sampler=optuna.samplers.RandomSampler())
        _WORKER["key"] = key
    return _WORKER["study"]


def _load_checkpoint(device: str) -> Optional[dict[str, Any]]:
    """The training state of the Ray checkpoint this trial resumes from (HyperBand unpaused it), else None."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    import torch

    with ckpt.as_directory() as path:
        return torch.load(Path(path) / CHECKPOINT_FILE, map_location=device, weights_only=True)


def _report_with_checkpoint(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """``tune.report`` with the training state as the result's checkpoint (Ray copies it to its storage)."""
    import tempfile

    import torch
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="regsweep-ckpt-") as tmp:
        torch.save(state, Path(tmp) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _trainable(config: dict[str, Any], spec: Optional[StudySpec] = None, device: Optional[str] = None,
               checkpoints: bool = False) -> None:
    """One Ray trial: the asked Optuna trial -> TrainConfig -> ``fit``, recorded through search/record.py.

    Every epoch is recorded (history + report from step 0), then reported to Ray. An epoch after which the trial
    stops by itself (the spec pruner's verdict, a non-finite loss, early stopping when ``checkpoints``) is
    reported to Ray only after the trial's end is written, so a scheduler acting on that result cannot hide the
    trial's own stop reason.

    ``checkpoints`` (a pausing scheduler): every epoch after which training goes on is reported from ``fit``'s
    checkpoint callback with the training state as a Ray checkpoint, and a trial started with a checkpoint resumes ``fit`` from it and
    continues the trial's recorded history (Ray pauses a trial only while it waits in ``tune.report``, so the
    recorded history ends exactly at the checkpoint's epoch).
    """
    import optuna
    from ray import tune

    from regsweep.models.build import build
    from regsweep.models.train import fit
    from regsweep.search.objective import DataCache, Objective
    from regsweep.search.record import Recorder, failure_reason
    from regsweep.search.storage import TrialWriter, retry_transient
    from regsweep.search.workers import Heartbeat

    study = _worker_study(spec, config["study"], config["storage"])
    trial = optuna.trial.Trial(study, config["trial_id"])
    objective = Objective(spec, device, data_cache=_WORKER.setdefault("data", DataCache()))
    state = _load_checkpoint(objective.device) if checkpoints else None
    extra: dict[str, Any] = {"worker": f"ray:{socket.gethostname()}:{os.getpid()}"}
    history: list[dict[str, Any]] = []
    if state is not None:
        recorded = trial._cached_frozen_trial.user_attrs
        if recorded.get("stop_reason") is not None:  # it had ended by itself before Ray paused it: nothing left
            return
        history = list(recorded.get("history") or [])[: int(state["epoch"])]
        extra["resumed_at"] = [*(recorded.get("resumed_at") or []), int(state["epoch"])]
    recorder = Recorder(TrialWriter(trial), spec.objective, history=history,
                        verdict=lambda epoch: retry_transient(objective.verdict, trial, epoch))
    deferred: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # with checkpoints: this epoch's metrics, reported by the checkpoint

    def on_epoch(epoch: int, record: dict[str, Any]) -> Optional[str]:
        reason = recorder.on_epoch(epoch, record)
        metrics = {**record, "epochs": cfg.train.epochs, "trial_number": trial.number}
        finite = all(math.isfinite(record[k]) for k in ("train_loss", "val_loss"))
        if reason or not finite or epoch + 1 >= cfg.train.epochs:
            deferred.append(metrics if finite else {})
            return reason
        if checkpoints:
            pending.append(metrics)  # fit calls the checkpoint next unless early stopping ends the run here
        else:
            tune.report(metrics)
        return None

    def on_checkpoint(train_state: dict[str, Any]) -> None:
        _report_with_checkpoint(pending.pop(), train_state)

    with Heartbeat(study._storage, trial._trial_id):
        try:
            cfg = objective.config_for(trial)
        except ConfigError as exc:
            recorder.fail(f"failed:config: {exc}")
            return
        recorder.start(cfg.to_dict(), extra)
        try:
            parts = build(cfg, objective.device, data=objective.data.get(cfg.data, objective.device))
            hist = fit(cfg, objective.device, report=on_epoch, parts=parts, state=state,
                       checkpoint=on_checkpoint if checkpoints else None)
        except Exception as exc:  # this trial's error: FAIL with the reason (no Ray retry: it would fail again)
            recorder.fail(failure_reason(exc))
            return
        recorder.finish(hist)
    for metrics in pending + deferred:  # pending: the epoch early stopping ended the run at
        if metrics:
            tune.report(metrics)


# ------------------------------------------------------------------------------------ driver side
_RUN: dict[str, Any] = {}  # the driver's live context (study, out, deadline, open trials); never pickled


def _frozen(study, trial_id: int):
    from regsweep.search.storage import retry_transient

    return retry_transient(study._storage.get_trial, trial_id)


def _end_from_driver(spec: StudySpec, study, trial_id: int, reason: str):
    """The end of a trial its trainable could not write (stopped from outside): through record.py."""
    import optuna

    from regsweep.search.record import Recorder
    from regsweep.search.storage import TrialWriter

    trial = optuna.trial.Trial(study, trial_id)
    history = trial._cached_frozen_trial.user_attrs.get("history") or []
    return Recorder(TrialWriter(trial), spec.objective, history=history).end(reason)


def _tell(study, trial_id: int, state: str, value: Optional[float]):
    """Finish the trial by id, ``state`` a record.py outcome name (search.workers.tell_trial)."""
    from optuna.trial import TrialState

    from regsweep.search.workers import tell_trial

    return tell_trial(study, trial_id, TrialState[state], value)


def finish_trial(spec: StudySpec, study, trial_id: int, *, error: bool, result: Optional[Mapping[str, Any]],
                 scheduler: str) -> Any:
    """Record and tell the end of a Ray trial; returns the finished FrozenTrial (None if finished elsewhere)."""
    from regsweep.search.record import FAIL, outcome

    frozen = _frozen(study, trial_id)
    if frozen.state.is_finished():  # failed as stale by another worker meanwhile: leave it
        return None
    reason = frozen.user_attrs.get("stop_reason")
    history = frozen.user_attrs.get("history") or []
    if reason is not None:  # the trainable ended it itself
        state = outcome(reason)
        best = frozen.user_attrs.get("best_epoch")
        value = history[best][spec.objective.metric] if best is not None and state != FAIL else None
        if state != FAIL and best is None:
            state = FAIL
    else:  # stopped from outside: the driver writes the end
        if error:
            reason = "failed:ray: the trial's process failed after Ray's retries (see error.txt in the trial dir)"
        elif result and result.get(STOP_KEY):
            reason = str(result[STOP_KEY])
        elif not history:
            reason = "failed:ray: stopped before its first epoch"
        else:
            reason = f"pruned:{scheduler}@{len(history) - 1}"
        state, value = _end_from_driver(spec, study, trial_id, reason)
    store = _RUN.get("artifact_store")
    if store is not None and history:  # at the trial's end, while it is still RUNNING (search/artifacts.py)
        import optuna

        from regsweep.search.artifacts import upload_trial_end

        upload_trial_end(store, optuna.trial.Trial(study, trial_id), history, state, value, _RUN["storage_label"])
    return _tell(study, trial_id, state, value)


def _driver_ask(spec: StudySpec, run_name: str):
    """Under the budget lock: a new trial and its params, None to wait, or "FINISHED"."""
    from regsweep.search.backends.optuna_backend import BASE_ATTR
    from regsweep.search.storage import retry_transient
    from regsweep.search.workers import _ask, _beat_once, _counts, _fail_stale, budget_lock

    ctx = _context()
    study, url = ctx["study"], ctx["url"]
    if ctx.get("deadline") is not None and time.monotonic() >= ctx["deadline"]:
        return "FINISHED"
    if len(ctx["failures"]) >= MAX_CONSECUTIVE_FAILURES:
        return "FINISHED"
    total = budget(study, spec)
    retry_transient(_fail_stale, study)
    with budget_lock(url, study.study_name):
        done, running = _counts(study)
        if done >= total:
            return "FINISHED"
        if done + running >= total:
            return None  # the rest of the budget is running; a failure frees a place
        trial = _ask(study)
        _beat_once(study, trial._trial_id)
    trial.set_user_attr(RUN_ATTR, run_name)
    if not trial.user_attrs.get(BASE_ATTR):
        spec.space.sample(trial, spec.base.to_dict())  # define-by-run: the study's sampler, conditions included
    return trial


def _context() -> dict[str, Any]:
    """The driver's live context. Ray pickles the searcher and the stopper (tuner.pkl) with cloudpickle, which
    copies the globals a locally defined class reads; they reach the context only through this module-level
    function (pickled by reference), so the open study and its URL are never pickled."""
    return _RUN


def _suggest(spec: StudySpec, run_name: str, fingerprint: str, trial_id: str):
    ctx = _context()
    got = _driver_ask(spec, run_name)
    if got is None or got == "FINISHED":
        return got
    ctx["open"][trial_id] = got._trial_id
    return {"study": ctx["study"].study_name, "trial_id": got._trial_id, "number": got.number,
            "storage": fingerprint, "params": dict(got.params)}


def _complete(spec: StudySpec, scheduler: str, trial_id: str, result: Optional[dict], error: bool) -> None:
    ctx = _context()
    tid = ctx["open"].pop(trial_id, None)
    if tid is None:
        return
    frozen = finish_trial(spec, ctx["study"], tid, error=error, result=result, scheduler=scheduler)
    if frozen is None:
        return
    ctx["ran"] += 1
    print(trial_line(frozen, spec.objective.metric), file=ctx["out"], flush=True)
    if frozen.state.name == "FAIL":
        ctx["failures"].append(frozen.user_attrs.get("stop_reason", "failed"))
    else:
        ctx["failures"].clear()


def _overfit_verdict(args: dict[str, Any], trial_id: str) -> Optional[str]:
    from regsweep.search.pruners.overfit import OverfitPruner

    ctx = _context()
    tid = ctx["open"].get(trial_id)
    if tid is None:
        return None
    return OverfitPruner(**args).verdict(ctx["study"], _frozen(ctx["study"], tid))


def _searcher_class():
    from ray.tune.search import Searcher

    class StudySearcher(Searcher):
        """Ray searcher over the study's Optuna sampler (``study.ask`` under the budget lock, the spec's space
        sampled define-by-run). It holds the scrubbed spec and names only: the open study is the driver's."""

        def __init__(self, spec: StudySpec, run_name: str, scheduler: str, fingerprint: str):
            super().__init__(metric=spec.objective.metric, mode=spec.objective.direction[:3])
            self.spec, self.run_name, self.scheduler, self.fingerprint = spec, run_name, scheduler, fingerprint

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            got = _suggest(self.spec, self.run_name, self.fingerprint, trial_id)
            return Searcher.FINISHED if got == "FINISHED" else got

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # the trainable records every epoch itself

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            _complete(self.spec, self.scheduler, trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as fh:
                pickle.dump({"run_name": self.run_name}, fh)

        def restore(self, checkpoint_path: str) -> None:
            pass  # all state lives in the study

    return StudySearcher


def _overfit_stopper_class():
    from ray.tune import Stopper

    class OverfitStopper(Stopper):
        """The overfit pruner's rule (search/pruners/overfit.py) as a Ray stopper, on the study's recorded history:
        the same verdict as on the Optuna backend (COMPLETE ``stopped:overfit:<rule>@<epoch>``, or PRUNED when
        also behind the median / ``on_fire: prune``)."""

        def __init__(self, args: dict[str, Any]):
            self.args = dict(args)

        def __call__(self, trial_id: str, result: dict) -> bool:
            reason = _overfit_verdict(self.args, trial_id) if result.get("epoch") is not None else None
            if reason is None:
                return False
            result[STOP_KEY] = reason  # the searcher's on_trial_complete reads it from the last result
            return True

        def stop_all(self) -> bool:
            return False

    return OverfitStopper


def _scheduler(sched: Mapping[str, Any], spec: StudySpec):
    """Ray's scheduler; time is counted in epochs (training_iteration), ASHA's and HyperBand's max_t is
    train.epochs."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    if sched["name"] == "fifo":
        return FIFOScheduler()
    args = {**DEFAULTS[sched["name"]], **sched.get("args", {})}
    if sched["name"] == "asha":
        return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=spec.base.train.epochs, **args)
    if sched["name"] == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=spec.base.train.epochs, **args)
    return MedianStoppingRule(time_attr="training_iteration", **args)


def _scrubbed(spec: StudySpec) -> StudySpec:
    """The spec as Ray may pickle it: without the spec's own storage URL."""
    raw = {k: v for k, v in spec.raw.items() if k != "storage"}
    return replace(spec, storage=None, raw=raw)


# ------------------------------------------------------------------------------------ Ray itself
def init_ray(url: str, address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Start a local Ray (``address`` None) with the storage URL in the workers' inherited environment, or
    join a cluster passing it as the job's ``runtime_env`` env var. Quiet: Ray's own logging at ERROR."""
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address is None:
        os.environ[STORAGE_ENV] = url  # local workers inherit the driver's environment
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False, configure_logging=True)
    else:
        ray.init(address=address, runtime_env={"env_vars": {STORAGE_ENV: url}}, logging_level=logging.ERROR,
                 log_to_driver=False)


def _check_workers_env(url: str) -> None:
    """The running Ray's workers must see this storage in $REGSWEEP_RAY_STORAGE (a Ray started elsewhere)."""
    import ray

    @ray.remote(num_cpus=0)
    def fingerprint() -> Optional[str]:
        value = os.environ.get(STORAGE_ENV)
        return storage_fingerprint(value) if value else None

    got = ray.get(fingerprint.remote())
    if got != storage_fingerprint(url):
        raise ConfigError(f"storage: the running Ray's workers {'lack' if got is None else 'have another'} "
                          f"${STORAGE_ENV}; start Ray with it exported (or let regsweep start Ray)")


def _quiet_ray_loggers() -> None:
    import logging

    for name in ("ray", "ray.tune", "ray.train", "ray.air", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _experiment_dirs(storage_path: Path, study_name: str) -> list[Path]:
    return sorted((p for p in storage_path.glob(f"{study_name}-ray-*") if p.is_dir()), key=lambda p: p.name)


def _fail_dead_driver(spec: StudySpec, study, run_name: str, out: TextIO) -> list[int]:
    """RUNNING trials the dead driver of ``run_name`` asked: FAIL (``failed:driver died``) and re-queued."""
    from optuna.trial import TrialState

    from regsweep.search.storage import retry_transient
    from regsweep.search.workers import _requeue

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(RUN_ATTR) != run_name:
            continue
        _end_from_driver(spec, study, t._trial_id, "failed:driver died (resumed)")
        frozen = _tell(study, t._trial_id, "FAIL", None)
        if frozen is not None and frozen.state == TrialState.FAIL:
            retry_transient(_requeue, study, t._trial_id)
        failed.append(t.number)
    if failed:
        print(f"resume: failed and re-queued trials {', '.join(map(str, failed))} of the dead driver", file=out)
    return failed


# ------------------------------------------------------------------------------------ run
def run(spec: StudySpec, url: str, study_name: str, *, n_trials: Optional[int] = None, timeout: Optional[float] = None,
        device: Optional[str] = None, address: Optional[str] = None, gpus_per_trial: Optional[float] = None,
        cpus_per_trial: Optional[int] = None, resume: bool = False, allow_spec_change: bool = False,
        scheduler: Any = None, out: Optional[TextIO] = None, storage_path: Optional[str] = None,
        num_cpus: Optional[int] = None, max_failures: int = 2, artifacts: Optional[str] = None) -> RunResult:
    """Run the study on Ray Tune until its budget of COMPLETE + PRUNED trials is met (see the module docstring).

    ``scheduler`` (a name or ``{name, args}``) overrides the spec's ``ray.scheduler``; ``storage_path`` is Ray's
    (default ``$REGSWEEP_RAY_RESULTS``, else ``~/ray_results``); ``resume`` restores this study's latest Ray experiment there (``Tuner.restore``)
    after failing and re-queuing the trials its dead driver left RUNNING; ``max_failures`` is Ray's
    FailureConfig: retries of a trial whose process died.
    """
    import optuna

    from regsweep.search.artifacts import open_store
    from regsweep.search.artifacts import resolve as resolve_artifacts
    from regsweep.search.storage import check_url, sqlite_file

    out = out or sys.stdout
    cpus = 1 if cpus_per_trial is None else cpus_per_trial
    gpus = 0.0 if gpus_per_trial is None else gpus_per_trial
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"--cpus-per-trial: {cpus!r} is not allowed; must be an integer >= 1")
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus) or gpus < 0 \
            or (gpus > 1 and gpus != int(gpus)):
        raise ConfigError(f"--gpus-per-trial: {gpus!r} is not allowed; must be a fraction in [0, 1] or a whole "
                          "number of GPUs")
    if device is not None and device.startswith("cuda") and not gpus:
        raise ConfigError(f"--device: {device!r} is not allowed with --gpus-per-trial 0 on the Ray backend; "
                          "give --gpus-per-trial (Ray assigns each trial its GPUs)")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials: {n_trials} is not allowed; must be >= 1")
    if address is not None and (not isinstance(address, str) or not address or
                                (address != "auto" and ":" not in address and not address.startswith("ray://"))):
        raise ConfigError(f"--address: {address!r} is not allowed; use auto or HOST:PORT of the Ray head")
    if check_url(url) == "sqlite" and sqlite_file(url) is None:
        raise ConfigError(f"storage: {url!r} is not allowed with --backend ray; an in-memory SQLite database "
                          "is not shared with Ray's worker processes; use sqlite:///PATH")
    sched = parse_scheduler(scheduler, "scheduler", spec.base.train.epochs, "scheduler") if scheduler is not None \
        else spec.ray.get("scheduler", {"name": "fifo", "args": {}})
    trial_device = device or ("cuda" if gpus else "cpu")
    if address is not None and sqlite_file(url) is not None:
        print(f"warning: storage is a SQLite file ({sqlite_file(url)}); every Ray node must see that path",
              file=sys.stderr)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study_locked(spec, url, study_name, allow_spec_change=allow_spec_change, n_trials=n_trials)
    total = budget(study, spec)
    already = done_count(study)
    print(f"study '{study_name}' in {mask(url)}: {already}/{total} trials done (Ray Tune, scheduler "
          f"{scheduler_label(sched)})", file=out, flush=True)
    root = Path(storage_path or os.environ.get(RESULTS_ENV) or Path.home() / "ray_results").expanduser().resolve()
    previous = _experiment_dirs(root, study_name) if resume else []
    if resume and not previous:
        raise ConfigError(f"--resume: no Ray experiment of study '{study_name}' under {root}; run without --resume")
    if resume:
        _fail_dead_driver(spec, study, previous[-1].name, out)
        already = done_count(study)
    if already >= total:
        print(f"budget met: {already} COMPLETE+PRUNED trials >= n_trials {total}; nothing to run", file=out)
        return RunResult(study, 0, True)

    from ray import tune

    os.environ["TUNE_RESULT_BUFFER_LENGTH"] = "1"  # a scheduler's STOP must reach a trial before its next epoch
    init_ray(url, address, num_cpus)
    _quiet_ray_loggers()
    _check_workers_env(url)
    run_name = previous[-1].name if resume else f"{study_name}-ray-{time.strftime('%Y%m%d-%H%M%S')}"
    clean = _scrubbed(spec)
    fingerprint = storage_fingerprint(url)
    deadline_s = timeout if timeout is not None else spec.timeout
    _RUN.clear()
    _RUN.update(study=study, url=url, out=out, open={}, failures=[], ran=0, storage_label=mask(url),
                deadline=None if deadline_s is None else time.monotonic() + deadline_s)
    location = resolve_artifacts(study, url, artifacts, coordinator=True)
    if location is not None:  # the driver uploads every trial's curves + config at its end
        _RUN["artifact_store"] = open_store(location)
        print(f"artifacts: {location}", file=out, flush=True)
    resources = {"cpu": cpus, "gpu": gpus}
    pausing = sched["name"] in PAUSING
    trainable = tune.with_resources(tune.with_parameters(_trainable, spec=clean, device=trial_device,
                                                         checkpoints=pausing), resources)
    start = time.monotonic()
    restore = resume and tune.Tuner.can_restore(str(previous[-1]))
    while True:
        if restore:
            print(f"resume: restoring Ray experiment {previous[-1]}", file=out, flush=True)
            tuner = tune.Tuner.restore(str(previous[-1]), trainable=trainable, resume_unfinished=False,
                                       resume_errored=False, restart_errored=False)
        else:
            stopper = _overfit_stopper_class()(spec.ray["overfit"]) if "overfit" in spec.ray else None
            tuner = tune.Tuner(
                trainable,
                param_space={},
                tune_config=tune.TuneConfig(
                    search_alg=_searcher_class()(clean, run_name, scheduler_label(sched), fingerprint),
                    scheduler=_scheduler(sched, spec), metric=spec.objective.metric,
                    mode=spec.objective.direction[:3], num_samples=-1, reuse_actors=True,
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name=run_name, storage_path=str(root), stop=stopper, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=max_failures),
                                          checkpoint_config=tune.CheckpointConfig(
                                              checkpoint_at_end=False, num_to_keep=2 if pausing else None)))
        try:
            with _OpenTrialsHeartbeat(study) if pausing else contextlib.nullcontext():
                _fit_quietly(tuner)
        except BaseException as exc:  # a Tune error: this driver's trials never stay RUNNING
            _fail_open_trials(spec, study, f"failed:ray: {exc.__class__.__name__}")
            _RUN.clear()
            raise
        if _RUN["open"]:  # Tune returns on Ctrl-C with trials it never finished: FAIL them, exit 130
            _fail_open_trials(spec, study, "failed:interrupted")
            _RUN.clear()
            raise KeyboardInterrupt
        finished = (done_count(study) >= budget(study, spec) or len(_RUN["failures"]) >= MAX_CONSECUTIVE_FAILURES
                    or (_RUN["deadline"] is not None and time.monotonic() >= _RUN["deadline"]))
        if finished or not restore:
            break
        # the restored experiment had already finished its search: the rest of the budget in a new one
        restore, run_name = False, f"{study_name}-ray-{time.strftime('%Y%m%d-%H%M%S')}"
    ran = _RUN["ran"]
    print(f"ran {ran} trials in {time.monotonic() - start:.1f}s on Ray (experiment {root / run_name})",
          file=out, flush=True)
    failures = list(_RUN["failures"])
    _RUN.clear()
    if len(failures) >= MAX_CONSECUTIVE_FAILURES:
        from regsweep.search.workers import SweepFailed

        raise SweepFailed(f"{len(failures)} trials in a row failed; last: {failures[-1]}")
    return RunResult(study, ran, False)


class _OpenTrialsHeartbeat:
    """While Ray runs, beat the heartbeat of every trial this driver asked that Ray has not finished (``_RUN``'s
    open trials), every heartbeat interval, from a daemon thread. A trial that HyperBand paused has no process
    beating it but stays RUNNING in the study; these beats keep ``fail_stale_trials`` (this driver's, another
    driver's or an Optuna worker's) from failing it while the driver lives. Ray itself tells the driver about a
    trial whose process died (``on_trial_complete`` with an error), so nothing is left alive by this."""

    def __init__(self, study):
        import threading

        self.storage = study._storage
        self.interval = self.storage.get_heartbeat_interval() if hasattr(self.storage, "get_heartbeat_interval") \
            else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="regsweep-open-trials-heartbeat")

    def __enter__(self) -> "_OpenTrialsHeartbeat":
        if self.interval:
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(_RUN.get("open", {}).values()):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a dropped connection (or a trial finished meanwhile): next time
                    pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _trial_dirname(trial) -> str:
    return f"trial-{trial.config.get('number', trial.trial_id)}-{trial.trial_id}"


def _fit_quietly(tuner) -> None:
    """``tuner.fit()`` with Ray's progress tables and banners kept off the terminal (trial lines are ours)."""
    import warnings

    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), warnings.catch_warnings():
        # HyperBand forces the result buffer to 1, which run() sets for every scheduler anyway
        warnings.filterwarnings("ignore", message=".*TUNE_RESULT_BUFFER_LENGTH is set")
        tuner.fit()


def _fail_open_trials(spec: StudySpec, study, reason: str) -> None:
    """Trials this driver asked that Ray never finished (Ctrl-C, a Tune error): FAIL, never left RUNNING."""
    for trial_id, tid in list(_RUN.get("open", {}).items()):
        frozen = _frozen(study, tid)
        if not frozen.state.is_finished():
            _end_from_driver(spec, study, tid, reason)
            _tell(study, tid, "FAIL", None)
        _RUN["open"].pop(trial_id, None)


__all__ = ["run", "init_ray", "parse_ray_section", "parse_scheduler", "finish_trial", "STORAGE_ENV", "RUN_ATTR",
           "BUDGET_ATTR"]
