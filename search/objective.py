"""Optuna trial -> TrainConfig -> ``fit``, recorded through search/record.py.

The enqueued base trial (user attr ``regsweep:base``) trains the base config itself and suggests nothing.
A bad combination of sampled values, an exception or a NaN ends the trial FAIL with its reason; the sweep
goes on. Datasets are loaded once per worker process and reused by every trial with the same data config.
"""

from __future__ import annotations

import json
import os
import socket
from collections import OrderedDict
from typing import Optional

import torch

from regsweep.models.build import build, resolve_device
from regsweep.models.config import ConfigError, DataConfig, TrainConfig
from regsweep.models.data import DataBundle, load
from regsweep.models.train import fit
from regsweep.search.record import FAIL, PRUNED, Recorder, failure_reason
from regsweep.search.spec import StudySpec
from regsweep.search.storage import TrialWriter, retry_transient
from regsweep.search.workers import Terminated, check_signals

BASE_ATTR = "regsweep:base"
# data fields that do not change the loaded tensors
_LOADER_ONLY = ("batch_size", "augment", "num_workers")


class TrialFailed(RuntimeError):
    """Raised to end a trial FAIL; its message is the stop reason."""


class DataCache:
    """Loaded (device-resident) datasets by data config, most recent first."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[str, DataBundle] = OrderedDict()

    def get(self, cfg: DataConfig, device: torch.device) -> DataBundle:
        key = json.dumps({k: v for k, v in vars(cfg).items() if k not in _LOADER_ONLY}, sort_keys=True) + str(device)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        bundle = load(cfg, device)
        self._items[key] = bundle
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return bundle


class Objective:
    def __init__(self, spec: StudySpec, device: Optional[str] = None, data_cache: Optional[DataCache] = None):
        self.spec = spec
        self.metric = spec.objective.metric
        self.device = resolve_device(device)
        self.data = data_cache or DataCache()
        self.base_dict = spec.base.to_dict()
        self.artifact_store = None  # set by the worker: search.artifacts.open_store(location)
        self.storage_label = ""  # the masked storage URL, for the exported config's provenance

    def upload_artifacts(self, trial, recorder: Recorder, state: str, value: Optional[float]) -> None:
        """The trial's curves and exported config, at its end, before it is told (search/artifacts.py)."""
        if self.artifact_store is not None and recorder.history:
            from regsweep.search.artifacts import upload_trial_end

            upload_trial_end(self.artifact_store, trial, recorder.history, state, value, self.storage_label)

    def config_for(self, trial) -> TrainConfig:
        if trial.user_attrs.get(BASE_ATTR):
            return self.spec.base
        overrides = self.spec.space.sample(trial, self.base_dict)
        return self.spec.base.with_overrides(overrides)

    def verdict(self, trial, epoch: int) -> Optional[str]:
        """The study's pruner on this trial after ``epoch``, as a stop reason (or None)."""
        from regsweep.search.pruners.compose import stop_verdict
        from regsweep.search.pruners.registry import label

        pruner = trial.study.pruner
        if not hasattr(pruner, "verdict"):  # Optuna's own pruners: through the public API
            return f"pruned:{label(self.spec.pruner)}@{epoch}" if trial.should_prune() else None
        latest = trial._get_latest_trial() if hasattr(trial, "_get_latest_trial") else \
            trial.study._storage.get_trial(trial._trial_id)
        return stop_verdict(pruner, trial.study, latest, label(self.spec.pruner))

    def __call__(self, trial) -> float:
        from optuna import TrialPruned

        def verdict(epoch: int) -> Optional[str]:
            check_signals()  # a SIGTERM/SIGINT swallowed somewhere during the epoch takes effect here
            return retry_transient(self.verdict, trial, epoch)

        recorder = Recorder(TrialWriter(trial), self.spec.objective, verdict=verdict)
        try:
            cfg = self.config_for(trial)
        except ConfigError as exc:
            reason = f"failed:config: {exc}"
            recorder.fail(reason)
            raise TrialFailed(reason) from None
        recorder.start(cfg.to_dict(), {"worker": f"{socket.gethostname()}:{os.getpid()}"})
        try:
            parts = build(cfg, self.device, data=self.data.get(cfg.data, self.device))
            hist = fit(cfg, self.device, report=recorder.on_epoch, parts=parts)
        except KeyboardInterrupt:  # Ctrl-C: the trial ends FAIL, never RUNNING
            recorder.fail("failed:interrupted")
            raise
        except Terminated:  # SIGTERM: FAIL here, re-queued by the worker loop
            recorder.fail("failed:terminated")
            raise
        except Exception as exc:  # any error of this trial: FAIL with the reason, the sweep goes on
            reason = failure_reason(exc)
            recorder.fail(reason)
            self.upload_artifacts(trial, recorder, FAIL, None)
            raise TrialFailed(reason) from exc
        state, value = recorder.finish(hist)
        self.upload_artifacts(trial, recorder, state, value)
        if state == PRUNED:
            raise TrialPruned(hist.stop_reason)
        if state == FAIL:
            raise TrialFailed(hist.stop_reason if hist.stop_reason.startswith("failed:")
                              else "failed:no finite objective value")
        return value


