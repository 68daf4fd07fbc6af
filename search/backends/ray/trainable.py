"""The Ray trainable: a thin adapter over ``regsweep.search.trial.run_trial`` that reports every epoch to Ray
and, under a pausing scheduler, saves and restores ``fit``'s training state as Ray checkpoints."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from regsweep.search.backends.ray import STORAGE_ENV
from regsweep.search.loop import Heartbeat
from regsweep.search.record import FAIL, history
from regsweep.search.spec import StudySpec
from regsweep.search.storage import worker_label
from regsweep.search.trial import BestWeights, DataCache, run_trial, upload_best_weights
from regsweep.search.urls import mask

CHECKPOINT_FILE = "state.pt"  # models.train's training state in a Ray checkpoint dir (torch.save)


def storage_fingerprint(url: str) -> str:
    """A short hash of the masked URL: lets the driver and a trial check that they mean the same storage, with
    nothing derived from the password in any config."""
    return hashlib.sha256(mask(url).encode()).hexdigest()[:12]


def worker_url(expected: Optional[str] = None) -> str:
    """The storage URL in this Ray worker's environment, checked against the driver's fingerprint."""
    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise RuntimeError(f"${STORAGE_ENV} is not set in this Ray worker: start the Ray nodes with it exported, "
                           "or let `regsweep run --backend ray` start or join Ray itself")
    if expected is not None and storage_fingerprint(url) != expected:
        raise RuntimeError(f"${STORAGE_ENV} of this Ray worker names another storage ({mask(url)})")
    return url


class ProcessCache:
    """Per Ray worker process: the opened study (one storage engine per process) and the loaded datasets,
    reused by every trial the process runs."""

    def __init__(self):
        self.key: Optional[tuple[str, str, str]] = None
        self.opened = None
        self.data = DataCache()
        self.stores: dict[str, Any] = {}  # artifact location -> its opened store

    def store(self, location: str):
        """The study's artifact store at ``location`` (opened once per process), for the trials' weights."""
        if location not in self.stores:
            from regsweep.search.artifacts import open_store

            self.stores[location] = open_store(location)
        return self.stores[location]

    def study(self, spec: StudySpec, study_name: str, fingerprint: str):
        import optuna

        from regsweep.search.storage import open_storage

        url = worker_url(fingerprint)
        key = (url, study_name, spec.spec_hash())
        if self.key != key:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.opened = optuna.load_study(study_name=study_name, storage=open_storage(url),
                                            pruner=spec.make_pruner(), sampler=optuna.samplers.RandomSampler())
            self.key = key
        return self.opened


PROCESS = ProcessCache()  # this process's cache (a Ray worker runs many trials when actors are reused)


def load_checkpoint(device) -> Optional[dict[str, Any]]:
    """The training state of the Ray checkpoint this trial resumes from (HyperBand unpaused it), else None."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    import torch

    with ckpt.as_directory() as path:
        return torch.load(Path(path) / CHECKPOINT_FILE, map_location=device, weights_only=True)


def report_with_checkpoint(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """``tune.report`` with the training state as the result's checkpoint (Ray copies it to its storage)."""
    import torch
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="regsweep-ckpt-") as tmp:
        torch.save(state, Path(tmp) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def train_trial(config: dict[str, Any], spec: Optional[StudySpec] = None, device: Optional[str] = None,
                checkpoints: bool = False, artifacts: Optional[str] = None) -> None:
    """One Ray trial: ``run_trial`` on the Optuna trial the searcher asked (``config["trial_id"]``).

    Every epoch is recorded (history + report from step 0), then reported to Ray. An epoch after which the trial
    stops by itself (the spec pruner's verdict, a non-finite loss, the last epoch) is reported to Ray only after
    the trial's end is written, so a scheduler acting on that result cannot hide the trial's own stop reason.

    ``checkpoints`` (a pausing scheduler): every epoch after which training goes on is reported from ``fit``'s
    checkpoint callback with the training state as a Ray checkpoint, and a trial started with a checkpoint
    resumes ``fit`` from it and continues the trial's recorded history (Ray pauses a trial only while it waits
    in ``tune.report``, so the recorded history ends exactly at the checkpoint's epoch).

    ``artifacts`` (the study's artifact location, resolved by the driver): with ``keep_weights`` other than none,
    the trial's best-epoch weights are uploaded from here at its end, as regsweep's own workers do
    (``search.trial.upload_best_weights``); the driver prunes the non-best ones after the budget. A trial Ray
    stops from outside (its scheduler) never reaches its end here, and one HyperBand resumed keeps them only when
    its best epoch came after the resume (the copy lives in the process). (Long: its three callbacks to
    ``run_trial`` are closures over the trial's deferred and pending reports.)
    """
    import optuna
    from ray import tune

    from regsweep.models.build import resolve_device
    from regsweep.models.plugins import add_search_path

    if spec.user_models:  # a local Ray's workers share the driver's files: the spec's folder, appended as there
        add_search_path(spec.directory)
    study = PROCESS.study(spec, config["study"], config["storage"])
    trial = optuna.trial.Trial(study, config["trial_id"])
    dev = resolve_device(device)
    state = load_checkpoint(dev) if checkpoints else None
    extra: dict[str, Any] = {"worker": f"ray:{worker_label()}"}
    recorded: list[dict[str, Any]] = []
    if state is not None:
        attrs = trial.user_attrs
        if attrs.get("stop_reason") is not None:  # it had ended by itself before Ray paused it: nothing left
            return
        recorded = history(trial)[: int(state["epoch"])]
        extra["resumed_at"] = [*(attrs.get("resumed_at") or []), int(state["epoch"])]
    deferred: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # with checkpoints: this epoch's metrics, reported by the checkpoint

    def after_epoch(cfg, epoch: int, record: dict[str, Any], reason: Optional[str]) -> None:
        metrics = {**record, "epochs": cfg.train.epochs, "trial_number": trial.number}
        finite = all(math.isfinite(record[k]) for k in ("train_loss", "val_loss"))
        if reason or not finite or epoch + 1 >= cfg.train.epochs:
            deferred.append(metrics if finite else {})
        elif checkpoints:
            pending.append(metrics)  # fit calls the checkpoint next unless early stopping ends the run here
        else:
            tune.report(metrics)

    def on_checkpoint(train_state: dict[str, Any]) -> None:
        report_with_checkpoint(pending.pop(), train_state)

    keeper = BestWeights(spec.objective) if artifacts and spec.keep_weights != "none" else None

    def on_end(ended, recorded_history, end_state: str, value: Optional[float]) -> None:
        if keeper is not None:
            upload_best_weights(PROCESS.store(artifacts), spec, ended, keeper, end_state, value)

    with Heartbeat(study, config["trial_id"]):
        # a FAIL is recorded with its reason and not reported: no Ray retry, it would fail again
        got = run_trial(spec, trial, device=dev, data=PROCESS.data, extra=extra, history=recorded,
                        after_epoch=after_epoch, state=state, checkpoint=on_checkpoint if checkpoints else None,
                        on_end=on_end, weights=keeper)
    if got.state == FAIL:
        return
    for metrics in pending + deferred:  # pending: the epoch early stopping ended the run at
        if metrics:
            tune.report(metrics)
