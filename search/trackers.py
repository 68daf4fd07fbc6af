"""Experiment trackers, each optional and off unless configured (spec ``trackers:``, ``--mlflow``, ``--tensorboard``).

- **MLflow** (:class:`MlflowTracker`): one run per trial, nested under ONE study run. The study run is created
  once, under the study's budget lock, and kept as the study attr ``regsweep:mlflow`` (tracking URI masked,
  experiment id, run id), so every worker of every run nests under the same parent. Each trial run gets the
  sampled params, every epoch's metrics (step = epoch, one ``log_batch`` per epoch or fewer), the stop reason
  and state as tags, the best value, and the curves PNG as an artifact. Every call to MLflow happens in ONE
  background thread per worker process, fed by an outbox: the epoch never waits for the tracking server. The
  outbox holds at most ``EPOCH_LIMIT`` pending epochs (more are dropped and counted while the server is slow;
  whatever is pending is sent as one batch per run, at most one batch a second); at the end of a worker it is
  flushed for at most ``CLOSE_TIMEOUT`` seconds. When the study run cannot be made (server gone, bad URI) MLflow
  is off for that worker.
- **TensorBoard** (:class:`TensorBoardTracker`): event files of each trial in ``<log_dir>/<study>/trial-NNNNN``
  through ``torch.utils.tensorboard.SummaryWriter`` (which writes from its own thread), one scalar per metric
  per epoch (step = epoch), the params and the stop reason as text.

A tracker that fails warns ONCE (one stderr line per worker process) and never fails a trial. ``mlflow`` and
``tensorboard`` are imported only when configured (the ``[trackers]`` extra; search/cli_checks.py refuses a
configured tracker whose package is missing, in one line).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, TextIO

from regsweep.search import log
from regsweep.search.urls import mask, scrub

PARENT_ATTR = "regsweep:mlflow"  # study attr: {"tracking_uri" (masked), "experiment_id", "run_id"}
EPOCH_LIMIT = 10_000  # pending per-epoch records a slow server may fall behind by before they are dropped
CLOSE_TIMEOUT = 5.0  # seconds a worker waits at its end for the pending records to be sent
SEND_INTERVAL = 1.0  # seconds between the thread's batches: short epochs are sent many at once
MAX_METRICS = 1000  # MLflow's log_batch limit
# MLflow's HTTP client retries for minutes by default; a tracker must give up sooner (the user's values win)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of an epoch record, ``epoch`` (the step) left out."""
    return {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """Base: warns once per process, never raises to the trial."""

    name = "tracker"

    def __init__(self, err: Optional[TextIO] = None):
        self.err = err
        self.warned = False
        self.secret_url = ""  # scrubbed out of every warning

    def warn(self, what: str, exc: Optional[BaseException] = None) -> None:
        if self.warned:
            return
        self.warned = True
        detail = ""
        if exc is not None:
            text = str(exc).strip().splitlines()
            detail = f" ({exc.__class__.__name__}: {text[0][:200] if text else ''})"
        line = f"{self.name} tracker: {what}{detail}; the trials go on (further {self.name} errors are not shown)"
        line = scrub(line, self.secret_url) if self.secret_url else line
        if self.err is not None:
            print(f"warning: {line}", file=self.err, flush=True)
        else:
            log.get(__name__).warning(line)

    def start(self, trial) -> None: ...

    def epoch(self, trial, epoch: int, record: Mapping[str, Any]) -> None: ...

    def end(self, trial, state: str, reason: str, history: list, best_epoch: Optional[int],
            value: Optional[float]) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------ TensorBoard
class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: str, study_name: str, err: Optional[TextIO] = None):
        super().__init__(err)
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package ([trackers] extra)

        self.writer_class = SummaryWriter
        self.root = Path(log_dir) / study_name
        self.writers: dict[int, Any] = {}
        self.off = False

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if self.off:
            return
        try:
            fn()
        except Exception as exc:  # a full disk or a vanished directory: warn once, off for this worker
            self.off = True
            self.warn(what, exc)

    def start(self, trial) -> None:
        def go():
            writer = self.writer_class(log_dir=str(self.root / f"trial-{trial.number:05d}"))
            self.writers[trial.number] = writer
            writer.add_text("params", json.dumps(trial.params, sort_keys=True, default=str), 0)
        self._guard(f"trial {trial.number}: opening its event file", go)

    def epoch(self, trial, epoch: int, record: Mapping[str, Any]) -> None:
        writer = self.writers.get(trial.number)
        if writer is None:
            return

        def go():
            for key, value in numeric(record).items():
                writer.add_scalar(key, value, epoch)
        self._guard(f"trial {trial.number}: writing epoch {epoch}", go)

    def end(self, trial, state, reason, history, best_epoch, value) -> None:
        writer = self.writers.pop(trial.number, None)
        if writer is None:
            return

        def go():
            writer.add_text("stop_reason", f"{state} {reason}", len(history))
            writer.close()
        self._guard(f"trial {trial.number}: closing its event file", go)

    def close(self) -> None:
        for number in list(self.writers):
            with contextlib.suppress(Exception):
                self.writers.pop(number).close()


# ------------------------------------------------------------------------------------ MLflow
class Outbox:
    """What the MLflow thread has to send, oldest first. Control records (a trial's start and end) are always
    kept; per-epoch records beyond ``limit`` pending are dropped (and counted) while the server is behind."""

    def __init__(self, limit: int = EPOCH_LIMIT):
        self.items: deque = deque()
        self.cond = threading.Condition()
        self.limit, self.pending_epochs, self.dropped, self.closed = limit, 0, 0, False

    def put(self, item: tuple, epoch: bool = False) -> None:
        with self.cond:
            if epoch:
                if self.pending_epochs >= self.limit:
                    self.dropped += 1
                    return
                self.pending_epochs += 1
            self.items.append(item)
            self.cond.notify()

    def take(self) -> Optional[list]:
        """Everything pending (waiting for something); None once closed and empty."""
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            if not self.items:
                return None
            batch = list(self.items)
            self.items.clear()
            self.pending_epochs = 0
            return batch

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` for more records to gather (returns at once when closed)."""
        with self.cond:
            self.cond.wait_for(lambda: self.closed, timeout=seconds)

    def __len__(self) -> int:
        with self.cond:
            return len(self.items)


class MlflowTracker(Tracker):
    """One MLflow run per trial under the study run, all sent from one background thread (see the module doc)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, study, lock: Callable[[], ContextManager],
                 err: Optional[TextIO] = None, limit: int = EPOCH_LIMIT):
        super().__init__(err)
        import mlflow  # noqa: F401 - the [trackers] extra: fail here, in the foreground, when it is missing

        self.uri, self.experiment, self.study, self.lock = uri, experiment, study, lock
        self.secret_url = uri
        self.outbox = Outbox(limit)
        self.broken = False  # no study run: nothing to nest under, MLflow is off for this worker
        self.client = None
        self.parent: Optional[dict[str, Any]] = None
        self.runs: dict[int, str] = {}  # trial number -> run id
        self.thread = threading.Thread(target=self._work, daemon=True, name="regsweep-mlflow")
        self.thread.start()

    # ---- the trial's side: never waits on the server
    def start(self, trial) -> None:
        if not self.broken:
            tags = {"regsweep.study": self.study.study_name, "regsweep.trial": str(trial.number)}
            if trial.user_attrs.get("regsweep:base"):
                tags["regsweep.base_config"] = "true"
            self.outbox.put(("start", trial.number, dict(trial.params), tags))

    def epoch(self, trial, epoch: int, record: Mapping[str, Any]) -> None:
        if not self.broken:
            self.outbox.put(("epoch", trial.number, epoch, numeric(record), int(time.time() * 1000)), epoch=True)

    def end(self, trial, state, reason, history, best_epoch, value) -> None:
        if not self.broken:
            title = f"{self.study.study_name} trial {trial.number}: {state} {reason}"
            self.outbox.put(("end", trial.number, state, reason, list(history), best_epoch, value, title))

    def close(self, study_done: bool = False, timeout: float = CLOSE_TIMEOUT) -> None:
        if study_done and not self.broken:  # the budget is done: end the study run (any worker may; idempotent)
            self.outbox.put(("study_done", -1))
        self.outbox.close()
        self.thread.join(timeout)
        left = len(self.outbox)
        if self.thread.is_alive() and left and not self.broken:
            self.warn(f"{left} records not sent within {timeout:.0f}s at the worker's end")
        if self.outbox.dropped and not self.broken:
            self.warn(f"{self.outbox.dropped} epoch records dropped while the tracking server was behind")

    # ---- the background thread
    def _work(self) -> None:
        try:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            self._make_parent()
        except Exception as exc:  # the server is gone or the URI is wrong: off for this worker
            self.broken = True
            self.warn(f"no study run in {mask(self.uri)} (MLflow is off for this worker)", exc)
        while True:
            batch = self.outbox.take()
            if batch is None:
                return
            if self.broken:
                continue  # drain: nothing to nest under
            self._send(batch)
            self.outbox.pause(SEND_INTERVAL)  # one batch a second at most: the thread's CPU stays off the epochs

    def _make_parent(self) -> None:
        """The study run, once per study under the budget lock (the first worker makes it, the others read it)."""
        from mlflow.tracking import MlflowClient

        with self.lock():  # the client's store (a new SQLite store's schema: workers would race) is made under it too
            self.client = MlflowClient(tracking_uri=self.uri)
            current = self.study.user_attrs.get(PARENT_ATTR)  # read from the storage: another worker's, maybe
            if (isinstance(current, dict) and current.get("tracking_uri") == mask(self.uri)
                    and current.get("experiment") == self.experiment):
                self.client.get_run(current["run_id"])  # reachable, and the run is there
                self.parent = current
                return
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                experiment_id = exp.experiment_id
            else:
                experiment_id = self.client.create_experiment(self.experiment,
                                                              artifact_location=artifact_location(self.uri))
            run = self.client.create_run(experiment_id, run_name=self.study.study_name,
                                         tags={"regsweep.study": self.study.study_name})
            self.parent = {"tracking_uri": mask(self.uri), "experiment": self.experiment,
                           "experiment_id": experiment_id, "run_id": run.info.run_id}
            self.study.set_user_attr(PARENT_ATTR, self.parent)

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the server went away or refused: warn once, go on with the next record
            self.warn(what, exc)
            return None

    def _send(self, batch: list) -> None:
        """Send pending records in order; consecutive epochs of one run go in one ``log_batch``."""
        from mlflow.entities import Metric, Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        metrics: list = []
        metrics_run: Optional[int] = None

        def flush() -> None:
            nonlocal metrics, metrics_run
            run_id = self.runs.get(metrics_run)
            for i in range(0, len(metrics), MAX_METRICS):
                if run_id is not None:
                    self._call(f"trial {metrics_run}: logging epochs", self.client.log_batch, run_id,
                               metrics=metrics[i:i + MAX_METRICS])
            metrics, metrics_run = [], None

        for item in batch:
            kind, number = item[0], item[1]
            if kind == "epoch":
                if metrics_run is not None and metrics_run != number:
                    flush()
                metrics_run = number
                _, _, epoch, values, stamp = item
                metrics += [Metric(k, v, stamp, epoch) for k, v in values.items()]
                continue
            flush()
            if kind == "start":
                _, _, params, tags = item
                run = self._call(f"trial {number}: creating its run", self.client.create_run,
                                 self.parent["experiment_id"], run_name=f"trial-{number}",
                                 tags={MLFLOW_PARENT_RUN_ID: self.parent["run_id"], **tags})
                if run is not None:
                    self.runs[number] = run.info.run_id
                    if params:
                        self._call(f"trial {number}: logging params", self.client.log_batch, run.info.run_id,
                                   params=[Param(k, str(v)[:6000]) for k, v in list(params.items())[:100]])
            elif kind == "end":
                self._end(*item[1:])
            elif kind == "study_done":
                self._call("ending the study run", self.client.set_terminated, self.parent["run_id"], "FINISHED")
        flush()

    def _end(self, number: int, state: str, reason: str, history: list, best_epoch: Optional[int],
             value: Optional[float], title: str) -> None:
        run_id = self.runs.pop(number, None)
        if run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        tags = [RunTag("stop_reason", reason[:5000]), RunTag("state", state)]
        metrics = []
        if value is not None and math.isfinite(value) and best_epoch is not None:
            metrics.append(Metric("best_value", float(value), int(time.time() * 1000), best_epoch))
        self._call(f"trial {number}: logging its end", self.client.log_batch, run_id, metrics=metrics, tags=tags)
        if history:
            self._call(f"trial {number}: uploading its curves", self._curves, run_id, number, history, best_epoch,
                       title)
        self._call(f"trial {number}: ending its run", self.client.set_terminated, run_id,
                   RUN_STATUS.get(state, "FINISHED"))

    def _curves(self, run_id: str, number: int, history: list, best_epoch: Optional[int], title: str) -> None:
        from regsweep.search.plots import curves_png

        with tempfile.TemporaryDirectory(prefix="regsweep-mlflow-") as tmp:
            png = os.path.join(tmp, f"trial-{number}-curves.png")
            curves_png(png, history, title, best_epoch)
            self.client.log_artifact(run_id, png)


def artifact_location(uri: str) -> Optional[str]:
    """For a new experiment in a SQLite tracking store: ``<db stem>-artifacts/`` beside the database file (MLflow's
    default would be ``./mlruns`` in whatever directory a worker runs in); None elsewhere (the store's default)."""
    if not uri.startswith("sqlite:///"):
        return None
    file = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()
    return (file.parent / f"{file.stem}-artifacts").as_uri()


# ------------------------------------------------------------------------------------ the set a worker runs
class Trackers:
    """The trackers of one worker process; every call is safe (a tracker's failure warns once, never raises)."""

    def __init__(self, items: list[Tracker]):
        self.items = items

    def _each(self, method: str, *args) -> None:
        for tracker in self.items:
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - never fail a trial
                tracker.warn(f"{method} failed", exc)

    def start(self, trial) -> None:
        self._each("start", trial)

    def epoch(self, trial, epoch: int, record: Mapping[str, Any]) -> None:
        self._each("epoch", trial, epoch, record)

    def end(self, trial, state: str, reason: str, history: list, best_epoch: Optional[int],
            value: Optional[float]) -> None:
        self._each("end", trial, state, reason, history, best_epoch, value)

    def close(self, study_done: bool = False) -> None:
        """Flush and close each tracker; ``study_done``: the study's budget is done (MLflow ends the study run)."""
        for tracker in self.items:
            try:
                if isinstance(tracker, MlflowTracker):
                    tracker.close(study_done)
                else:
                    tracker.close()
            except Exception as exc:  # noqa: BLE001 - never fail a worker
                tracker.warn("close failed", exc)


def open_trackers(settings: Mapping[str, Any], study, lock: Callable[[], ContextManager],
                  err: Optional[TextIO] = None) -> Optional[Trackers]:
    """The trackers ``settings`` (spec_checks.tracker_settings) switch on for a worker of ``study``; None when none
    is. ``lock`` gives the study's budget lock (search/study.py ``budget_lock``) for the MLflow study run."""
    items: list[Tracker] = []
    makers = {"mlflow": lambda cfg: MlflowTracker(cfg["tracking_uri"], cfg.get("experiment") or study.study_name,
                                                  study, lock, err),
              "tensorboard": lambda cfg: TensorBoardTracker(cfg["log_dir"], study.study_name, err)}
    for name, make in makers.items():
        if name in settings:
            try:
                items.append(make(settings[name]))
            except Exception as exc:  # a broken install (the package was checked before): off, the trials go on
                failed = Tracker(err)
                failed.name = name
                failed.warn(f"could not start ({name} is off for this worker)", exc)
    return Trackers(items) if items else None

