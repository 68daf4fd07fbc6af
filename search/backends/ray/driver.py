"""The Ray driver's state and what it does with the study: ask trials for Ray (under the budget lock), write the
end of a trial Ray stopped from outside, tell every trial's end, keep paused trials' heartbeats, and fail the
trials a dead or interrupted driver left RUNNING. Imports no Ray."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Mapping, Optional, TextIO

from regsweep.search import log
from regsweep.search.backends.ray import RUN_ATTR, STOP_KEY
from regsweep.search.backends.ray.trainable import storage_fingerprint
from regsweep.search.loop import FailureStreak, Heartbeat, ask_within_budget, requeue, tell_trial, trial_line
from regsweep.search.optuna_internals import frozen_trial, trial_id
from regsweep.search.record import FAIL, Recorder, history, outcome
from regsweep.search.spec import StudySpec
from regsweep.search.storage import TrialWriter, retry_transient
from regsweep.search.study import budget
from regsweep.search.trial import BASE_ATTR
from regsweep.search.urls import mask

FINISHED = "FINISHED"  # RayDriver.suggest: the budget (or the deadline, or the failure streak) is done
# the end of a trial that Ray reports failed without the trial having written its own end: its process died (its
# node was lost, or the process was killed) before run_trial could record anything. Ray never retries a trial
# (max_failures=0); the driver fails it with this reason (+ " (worker ray:HOST:PID)") and re-queues it with the
# same params, at most MAX_RETRY times (Optuna's retry-callback semantics, as for a stale Optuna worker). It
# counts in the failure streak: a cluster whose every trial dies stops the sweep.
LOST_REASON = "failed:ray: the trial's process died"


def end_from_driver(spec: StudySpec, study, tid: int, reason: str):
    """The end of a trial its trainable could not write (stopped from outside): through record.py."""
    import optuna

    trial = optuna.trial.Trial(study, tid)
    return Recorder(TrialWriter(trial), spec.objective, history=history(trial)).end(reason)


def tell(study, tid: int, state: str, value: Optional[float]):
    """Finish the trial by id, ``state`` a record.py outcome name (search.loop.tell_trial)."""
    from optuna.trial import TrialState

    return tell_trial(study, tid, TrialState[state], value)


def fail_dead_driver(spec: StudySpec, study, run_name: str, out: TextIO) -> list[int]:
    """RUNNING trials the dead driver of ``run_name`` asked: FAIL (``failed:driver died``) and re-queued."""
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(RUN_ATTR) != run_name:
            continue
        end_from_driver(spec, study, trial_id(t), "failed:driver died (resumed)")
        frozen = tell(study, trial_id(t), "FAIL", None)
        if frozen is not None and frozen.state == TrialState.FAIL:
            retry_transient(requeue, study, trial_id(t))
        failed.append(t.number)
    if failed:
        print(f"resume: failed and re-queued trials {', '.join(map(str, failed))} of the dead driver", file=out)
    return failed


_ATTACHED: list["RayDriver"] = []  # the driver whose tuner runs in this process (see current_driver)


def current_driver() -> "RayDriver":
    """The driver attached in this process. Ray pickles the searcher and the stopper (tuner.pkl, with
    cloudpickle, which copies what a locally defined class reads) and on ``--resume`` runs the unpickled copies;
    they reach the live driver, whose open study is never pickled, only through this function (pickled by
    reference)."""
    if not _ATTACHED:
        raise RuntimeError("no regsweep Ray driver is attached in this process")
    return _ATTACHED[-1]


class RayDriver:
    """The live state of one ``run --backend ray``: the study, the Ray trials it asked and has not finished
    (``open``: Ray trial id -> Optuna trial id), the failure streak, the trials run, the deadline, and where
    trial lines and artifacts go. Ray's searcher and stopper act through it while it is :meth:`attached`."""

    def __init__(self, spec: StudySpec, study, url: str, *, run_name: str, scheduler: str,
                 out: Optional[TextIO] = None, deadline: Optional[float] = None, artifact_store: Any = None):
        self.spec, self.study, self.url = spec, study, url
        self.run_name, self.scheduler = run_name, scheduler
        self.fingerprint, self.storage_label = storage_fingerprint(url), mask(url)
        self.out = log.info_stream(__name__, out)
        self.deadline = deadline  # time.monotonic() after which no trial is asked
        self.artifact_store = artifact_store  # the driver uploads every trial's curves + config at its end
        self.open: dict[str, int] = {}
        self.streak = FailureStreak()
        self.ran = 0

    @contextlib.contextmanager
    def attached(self) -> Iterator["RayDriver"]:
        _ATTACHED.append(self)
        try:
            yield self
        finally:
            _ATTACHED.remove(self)

    def heartbeat(self) -> Heartbeat:
        """Beats every open trial (HyperBand leaves paused trials RUNNING with no process beating them), so no
        ``fail_stale_trials`` fails them while the driver lives. Ray itself reports a trial whose process died."""
        return Heartbeat(self.study, lambda: list(self.open.values()))

    def done(self) -> bool:
        return self.streak.broken or (self.deadline is not None and time.monotonic() >= self.deadline)

    def suggest(self, ray_trial_id: str):
        """A new trial's config for Ray, None to wait (the rest of the budget is running), or FINISHED."""
        if self.done():
            return FINISHED
        total = budget(self.study, self.spec)
        trial, done = ask_within_budget(self.study, self.url, total)
        if trial is None:
            return FINISHED if done >= total else None
        trial.set_user_attr(RUN_ATTR, self.run_name)
        if not trial.user_attrs.get(BASE_ATTR):
            self.spec.space.sample(trial, self.spec.base.to_dict())  # define-by-run: the study's sampler
        self.open[ray_trial_id] = trial_id(trial)
        return {"study": self.study.study_name, "trial_id": trial_id(trial), "number": trial.number,
                "storage": self.fingerprint, "params": dict(trial.params)}

    def complete(self, ray_trial_id: str, result: Optional[dict], error: bool) -> None:
        """Ray finished a trial: record and tell its end, print its line, count it."""
        tid = self.open.pop(ray_trial_id, None)
        if tid is None:
            return
        frozen = self.finish_trial(tid, error=error, result=result)
        if frozen is None:
            return
        self.ran += 1
        print(trial_line(frozen, self.spec.objective.metric), file=self.out, flush=True)
        self.streak.add(frozen)

    def overfit_verdict(self, args: dict[str, Any], ray_trial_id: str) -> Optional[str]:
        from regsweep.search.pruners.overfit import OverfitPruner

        tid = self.open.get(ray_trial_id)
        if tid is None:
            return None
        return OverfitPruner(**args).verdict(self.study, retry_transient(frozen_trial, self.study, tid))

    def finish_trial(self, tid: int, *, error: bool, result: Optional[Mapping[str, Any]]):
        """Record and tell the end of a Ray trial; returns the finished FrozenTrial (None if finished elsewhere)."""
        frozen = retry_transient(frozen_trial, self.study, tid)
        if frozen.state.is_finished():  # failed as stale by another worker meanwhile: leave it
            return None
        reason, recorded = frozen.user_attrs.get("stop_reason"), history(frozen)
        if reason is not None:  # the trainable ended it itself
            state, best = outcome(reason), frozen.user_attrs.get("best_epoch")
            value = recorded[best][self.spec.objective.metric] if best is not None and state != FAIL else None
            if state != FAIL and best is None:
                state = FAIL
        else:  # stopped from outside: the driver writes the end
            if error:
                worker = frozen.user_attrs.get("worker") or "unknown"
                reason = f"{LOST_REASON} (worker {worker}; its node lost or the process killed: see error.txt " \
                         "in the Ray trial dir)"
            elif result and result.get(STOP_KEY):
                reason = str(result[STOP_KEY])
            elif not recorded:
                reason = "failed:ray: stopped before its first epoch"
            else:
                reason = f"pruned:{self.scheduler}@{len(recorded) - 1}"
            state, value = end_from_driver(self.spec, self.study, tid, reason)
        if self.artifact_store is not None and recorded:  # at its end, while still RUNNING (search/artifacts.py)
            import optuna

            from regsweep.search.artifacts import upload_trial_end

            upload_trial_end(self.artifact_store, optuna.trial.Trial(self.study, tid), recorded, state, value,
                             self.storage_label)
        told = tell(self.study, tid, state, value)
        if error and reason.startswith(LOST_REASON) and told is not None and told.state.name == "FAIL":
            retry_transient(requeue, self.study, tid)  # the driver owns retries: at most MAX_RETRY per trial
        return told

    def fail_open_trials(self, reason: str) -> None:
        """Trials this driver asked that Ray never finished (Ctrl-C, a Tune error): FAIL, never left RUNNING."""
        for ray_trial_id, tid in list(self.open.items()):
            if not retry_transient(frozen_trial, self.study, tid).state.is_finished():
                end_from_driver(self.spec, self.study, tid, reason)
                tell(self.study, tid, "FAIL", None)
            self.open.pop(ray_trial_id, None)
