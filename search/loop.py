"""The worker loop every backend builds on: exact budget, ask/tell, liveness, failure streak.

Every worker (``regsweep run``, the N children of ``run --workers N``, ``regsweep worker`` on any machine, the
Ray driver's searcher) asks trials of one RDB study through :func:`ask_within_budget`:

1. Under the study's *budget lock* (PostgreSQL advisory lock, MySQL ``GET_LOCK``, or an ``flock`` beside a
   SQLite file) count COMPLETE + PRUNED + live RUNNING trials; ask only while that is below ``n_trials``
   (``ask`` pops WAITING trials first). So COMPLETE + PRUNED ends exactly at ``n_trials``: a failed trial
   frees its place. ``n_trials`` is the study's total across runs (its ``regsweep:n_trials`` attr).
2. Run the trial under a :class:`Heartbeat`. A worker that finds live-looking RUNNING trials filling the budget
   waits and calls ``fail_stale_trials``: a killed worker's trial is failed after the grace period, with the stop
   reason ``failed:stale heartbeat (worker HOST:PID)``, and retried (same params) by the storage's stale-trial
   callback (search/storage.py). Every FAIL has its stop reason (:func:`fail_trial`); one failed by a lost
   connection or a database outage (``failed:database: ...``) is retried the same way. A worker exits 0 only
   when the budget is done.
3. SIGTERM/SIGINT (search/signals.py): the running trial ends FAIL; after SIGTERM it is re-queued and the
   worker exits 143 (130 for Ctrl-C), so a preempted pod is simply replaced.

Opening the study (spec-hash check, enqueue), its budget and the budget lock are search/study.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO, Union

from regsweep.models.config import ConfigError
from regsweep.search import log
from regsweep.search.optuna_internals import frozen_trial, study_storage, trial_id, trial_number
from regsweep.search.record import BASE_ATTR, TrialFailed, failure_reason
from regsweep.search.signals import Terminated, check_signals, terminate_on_sigterm
from regsweep.search.storage import (
    MAX_RETRY,
    adopt_orphans,
    database_reason,
    is_external,
    retry_attrs,
    retry_transient,
    transient_errors,
    worker_label,
)
from regsweep.search.study import SweepFailed, budget, budget_lock, done_count, open_study_locked, seed_sampler
from regsweep.search.urls import is_proxy

THREADS_ENV = "REGSWEEP_NUM_THREADS"  # threads for configs that leave train.num_threads unset
WORKER_ENV = "REGSWEEP_WORKER"  # worker label printed in front of its lines
MAX_CONSECUTIVE_FAILURES = 5
TELL_ATTEMPTS = 16  # ~2 minutes of database outage before a worker gives up telling a trial
ORPHAN_AFTER = 10.0  # seconds a RUNNING trial may go without its first heartbeat before it is adopted

def trial_line(trial, metric: Union[str, Sequence[str]]) -> str:
    """One line per finished trial; ``metric`` is the objective's name, or the names of several objectives."""
    attrs = trial.user_attrs
    metrics = [metric] if isinstance(metric, str) else list(metric)
    values = trial.values or [None] * len(metrics)
    shown = " ".join(f"{m}={'-' if v is None else f'{v:.4f}'}" for m, v in zip(metrics, values))
    base = " (base config)" if attrs.get(BASE_ATTR) else ""
    return (f"trial {trial.number:>3} {trial.state.name:<8} {shown} best_epoch={attrs.get('best_epoch')} "
            f"{attrs.get('stop_reason', '')}{base}")


# ------------------------------------------------------------------------------------ heartbeat, ask, tell
class Heartbeat:
    """Beats ``record_heartbeat`` every heartbeat interval from a daemon thread (Optuna's RDB heartbeat, run here
    because regsweep asks trials itself) for one trial id, or for the ids a callable returns at each beat (the
    Ray driver's trials that HyperBand paused). A failed beat is retried next time."""

    def __init__(self, study, trial_ids: Union[int, Callable[[], Iterable[int]]]):
        self.storage = study_storage(study)
        self.ids = (lambda: (trial_ids,)) if isinstance(trial_ids, int) else trial_ids
        self.interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="regsweep-heartbeat")
            self._thread.start()
        return self

    def _beat(self) -> None:
        while True:
            for tid in list(self.ids()):
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:  # a dropped connection (or a trial finished meanwhile): the next beat
                    pass
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def beat_once(study, tid: int) -> None:
    """First heartbeat right after ask (retried): Optuna never fails a RUNNING trial that has no heartbeat."""
    storage = study_storage(study)
    if not getattr(storage, "get_heartbeat_interval", lambda: None)():
        return
    for attempt in range(8):
        try:
            storage.record_heartbeat(tid)
            return
        except transient_errors():
            time.sleep(0.25 * 2 ** min(attempt, 4))
    storage.record_heartbeat(tid)


def counts(study) -> tuple[int, int]:
    """(COMPLETE + PRUNED, RUNNING) trials of the study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    done = sum(t.state != TrialState.RUNNING for t in trials)
    return done, len(trials) - done


def fail_stale(study) -> None:
    """Optuna's ``fail_stale_trials``: RUNNING trials whose heartbeat stopped are failed (and retried)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def requeue(study, tid: int) -> None:
    """Re-queue a failed trial with the same params, linked to the original (Optuna's retry callback)."""
    import copy
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        frozen = retry_attrs(copy.deepcopy(frozen_trial(study, tid)))  # the params, not the failed end
        optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)(study, frozen)


def ask(study):
    """``study.ask()`` without Optuna's warning that heartbeats are meant for optimize() (we beat ourselves)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def ask_within_budget(study, url: str, n_trials: int) -> tuple[Any, int]:
    """Under the budget lock: (a new trial, given its first heartbeat, or None when COMPLETE + PRUNED +
    RUNNING trials fill ``n_trials``; COMPLETE + PRUNED). Stale trials are failed and re-queued first, under the
    same lock (they free places, and ``ask`` pops their WAITING retries before sampling anything new)."""
    if is_proxy(url):
        return ask_through_proxy(study)
    with budget_lock(url, study.study_name):
        # inside the lock: failing a stale trial and enqueueing its retry are two writes; a worker counting
        # between them would ask a NEW trial, fill the budget and strand the retry WAITING
        retry_transient(fail_stale, study)
        done, running = counts(study)
        if done + running >= n_trials:
            return None, done
        trial = claim(study)
    return trial, done


def claim(study):
    """``ask`` under the caller's budget lock, then the new trial's first heartbeat and its ``worker`` attr."""
    trial = ask(study)
    with contextlib.suppress(*transient_errors()):  # the database went away: the trial runs anyway; its
        # heartbeat thread beats when it is back, and its first write fails it `failed:database` (retried)
        beat_once(study, trial_id(trial))  # a worker dying right after ask leaves a trial that can go stale
        # who holds it, for `failed:stale heartbeat (worker HOST:PID)` if this worker dies before its 1st epoch
        retry_transient(trial.set_user_attr, "worker", worker_label())
    return trial


def ask_through_proxy(study) -> tuple[Any, int]:
    """:func:`ask_within_budget` through a `regsweep storage-proxy`: the proxy itself fails stale trials, counts
    and admits (or refuses: BudgetFull) the trial's move to RUNNING under the study's lock, and gives it its
    first heartbeat (search/proxy_server.py); the worker only asks."""
    import optuna

    from regsweep.search.proxy import BudgetFull

    try:
        trial = ask(study)
        with contextlib.suppress(*transient_errors()):  # as ask_within_budget: the trial runs; its writes tell
            retry_transient(trial.set_user_attr, "worker", worker_label())
    except BudgetFull:
        trial = None
    except optuna.exceptions.UpdateFinishedTrialError:  # a loaded proxy failed it stale before this first write
        trial = None  # (and re-queued it): not this worker's trial any more; it asks again (seen: 64 workers, 2 cores)
    return trial, retry_transient(done_count, study)


def tell_trial(study, tid: int, state, value, trial=None):
    """Finish a trial (its live ``Trial``, or found by id) and return it frozen; a storage hiccup is retried, a
    trial already finished elsewhere (e.g. failed as stale) is left alone. Every backend tells through here."""
    return finish_trial(study, tid, state, value, trial)[0]


def finish_trial(study, tid: int, state, value, trial=None) -> tuple[Any, bool]:
    """:func:`tell_trial`, and whether this call finished the trial (False: it was finished elsewhere)."""
    import optuna

    target = trial if trial is not None else retry_transient(trial_number, study, tid)

    def tell() -> bool:
        try:
            if state == optuna.trial.TrialState.COMPLETE:
                study.tell(target, value)
            else:
                study.tell(target, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        except ValueError as exc:  # "Cannot tell a COMPLETE trial": already finished by fail_stale_trials
            if "Cannot tell" not in str(exc):
                raise
            return False
        return True

    told = retry_transient(tell, attempts=TELL_ATTEMPTS)  # a finished trial must not be lost to a short outage
    return retry_transient(frozen_trial, study, tid, attempts=TELL_ATTEMPTS), told


def fail_trial(study, tid: int, reason: str, trial=None, *, retry: bool = False):
    """End a trial FAIL with ``reason`` as its stop reason and return it frozen. The reason is written first,
    while the trial is still RUNNING (waiting out a database outage of up to ~2 minutes, as the tell does), so
    no FAIL is ever left without one; with ``retry`` the trial is re-queued with the same params (at most
    MAX_RETRY times, Optuna's retry-callback semantics) when this call was the one that failed it. A trial
    finished elsewhere meanwhile (failed as stale by another worker, which wrote its reason and re-queued it)
    is left alone."""
    import optuna
    from optuna.trial import TrialState

    storage = study_storage(study)

    def write() -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(tid, "stop_reason", reason[:2000])

    retry_transient(write, attempts=TELL_ATTEMPTS)
    frozen, told = finish_trial(study, tid, TrialState.FAIL, None, trial)
    if retry and told:
        retry_transient(requeue, study, tid, attempts=TELL_ATTEMPTS)
    return frozen


class FailureStreak:
    """Stop reasons of the trials that failed in a row; MAX_CONSECUTIVE_FAILURES of them end the sweep."""

    def __init__(self, limit: int = MAX_CONSECUTIVE_FAILURES):
        self.limit, self.reasons = limit, []

    def add(self, frozen) -> None:
        if frozen.state.name == "FAIL":
            reason = frozen.user_attrs.get("stop_reason", "failed")
            if not is_external(reason):  # a database outage or a stale worker says nothing of the trials
                self.reasons.append(reason)
        else:
            self.reasons.clear()

    @property
    def broken(self) -> bool:
        return len(self.reasons) >= self.limit

    def error(self) -> SweepFailed:
        return SweepFailed(f"{len(self.reasons)} trials in a row failed; last: {self.reasons[-1]}")


# ------------------------------------------------------------------------------------ the loop
def worker_loop(study, objective, url: str, n_trials: int, *, timeout: Optional[float] = None,
                out: Optional[TextIO] = None, label: str = "", poll: float = 2.0) -> int:
    """Run trials until COMPLETE + PRUNED reaches ``n_trials``; returns how many this worker ran.

    Raises KeyboardInterrupt / Terminated after ending the running trial FAIL (re-queued on Terminated),
    and SweepFailed after MAX_CONSECUTIVE_FAILURES failures in a row.
    """
    from regsweep.search.fuse import ask_trials, run_trials  # fused groups when the objective's fuse > 1

    out = log.info_stream(__name__, out)
    transient = transient_errors()
    prefix = f"[{label}] " if label else ""
    deadline = None if timeout is None else time.monotonic() + timeout
    streak, ran = FailureStreak(), 0
    idle = IDLE_FIRST  # waits while others hold the rest of the budget: short at first, growing to ``poll``
    while True:
        check_signals()
        if deadline is not None and time.monotonic() >= deadline:
            return ran
        try:
            trials, done = ask_trials(study, objective, url, n_trials)
        except transient as exc:  # a dropped connection or a restarting server: wait and try again
            print(f"{prefix}storage unavailable ({exc.__class__.__name__}); retrying", file=out, flush=True)
            time.sleep(poll)
            continue
        if not trials:
            if done >= n_trials:
                return ran
            # others hold the rest of the budget; a dead one's trial goes stale (and an orphan is adopted so it can;
            # through a proxy, the proxy beats an admitted trial's first heartbeat itself: there are no orphans)
            if not is_proxy(url):
                with contextlib.suppress(*transient), budget_lock(url, study.study_name):  # fail + requeue as one
                    retry_transient(adopt_orphans, study, ORPHAN_AFTER)
            time.sleep(min(idle, poll))  # the last trials usually end within seconds: a worker notices soon
            idle *= IDLE_GROWTH
            continue
        idle = IDLE_FIRST
        for frozen in run_trials(study, trials, objective, url, n_trials, deadline):
            ran += 1
            print(prefix + trial_line(frozen, getattr(objective, "metric", "value")), file=out, flush=True)
            streak.add(frozen)
            if streak.broken:
                raise streak.error()


IDLE_FIRST, IDLE_GROWTH = 0.2, 1.5  # worker_loop's idle waits: 0.2, 0.3, 0.45, ... s up to its ``poll`` (2 s)


def run_one(study, trial, objective):
    """Run the objective on an asked trial under its heartbeat and tell its end; returns it frozen. On
    KeyboardInterrupt / Terminated it is told FAIL (and re-queued on Terminated) before the exception goes on.

    Every FAIL gets its stop reason (:func:`fail_trial`): the objective's (:class:`TrialFailed`), else the error's;
    a trial failed from outside itself (``failed:database: ...``: a lost connection or an outage) is re-queued
    with the same params, like a killed worker's trial that goes stale."""
    import optuna
    from optuna.trial import TrialState

    state, value, tid = TrialState.FAIL, None, trial_id(trial)
    try:
        with Heartbeat(study, tid):
            value = objective(trial)
            check_signals()
        state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except Terminated:
        fail_trial(study, tid, "failed:terminated", trial, retry=True)
        raise
    except KeyboardInterrupt:
        fail_trial(study, tid, "failed:interrupted", trial)
        raise
    except Exception as exc:  # the sweep goes on
        reason = (str(exc) if isinstance(exc, TrialFailed) else "") or database_reason(exc) or failure_reason(exc)
        return fail_trial(study, tid, reason, trial, retry=is_external(reason))
    return tell_trial(study, tid, state, value, trial)


# ------------------------------------------------------------------------------------ worker processes
MAX_THREADS = 1024


def thread_share() -> Optional[int]:
    """$REGSWEEP_NUM_THREADS as a number of threads (None when unset or empty); ConfigError when it is not one."""
    threads = os.environ.get(THREADS_ENV)
    if not threads:
        return None
    if not threads.isascii() or not threads.isdigit() or not 1 <= int(threads) <= MAX_THREADS:
        raise ConfigError(f"${THREADS_ENV}: {threads[:40]!r} is not allowed; must be a whole number of threads, "
                          f"1..{MAX_THREADS}")
    return int(threads)


def apply_thread_share() -> None:
    """In a worker child: the share of cores its parent gave it, for configs without train.num_threads."""
    threads = thread_share()
    if threads:
        import torch

        torch.set_num_threads(threads)


def attach_trackers(objective, settings: Optional[dict], study, url: str) -> None:
    """The worker's trackers (search/trackers.py) on its objective; the MLflow study run is made under the budget
    lock. Nothing when ``settings`` switch none on."""
    if settings:
        from regsweep.search.trackers import open_trackers

        objective.trackers = open_trackers(settings, study, lambda: budget_lock(url, study.study_name))


def close_trackers(objective, study=None, total: Optional[int] = None) -> None:
    """Flush the worker's trackers (MLflow: at most a few seconds) at its end; a worker that ends with the study's
    budget done also ends the MLflow study run."""
    if getattr(objective, "trackers", None) is not None:
        done = False
        if study is not None and total is not None:
            with contextlib.suppress(Exception):
                done = done_count(study) >= total
        objective.trackers.close(study_done=done)


def worker_main(spec, url: str, study_name: str, *, device: Optional[str] = None, timeout: Optional[float] = None,
                artifacts: Optional[str] = None, out: Optional[TextIO] = None,
                trackers: Optional[dict] = None) -> int:
    """``regsweep worker``: join (or create) the study and run trials until its budget is done.

    The budget is the study's (set by the ``run`` that created or resumed it), else the spec's. Each worker
    seeds its sampler from the spec's seed, the trials started so far and its label (study.seed_sampler), or
    reseeds it from OS entropy: workers built from one seeded spec would otherwise all draw the same params.
    """
    apply_thread_share()
    study = retry_transient(open_study_locked, spec, url, study_name)
    label = os.environ.get(WORKER_ENV, f"pid{os.getpid()}")
    if not retry_transient(seed_sampler, study, spec, label):
        study.sampler.reseed_rng()
    total = budget(study, spec)
    from regsweep.search.trial import make_objective  # torch: the worker loop itself imports none (benchmarks/
    # scale.py and the proxy's many-worker test run it on a torch-free objective)

    objective = make_objective(spec, study, url, device=device, artifacts=artifacts, coordinator=False, out=out)
    attach_trackers(objective, spec.trackers if trackers is None else trackers, study, url)
    try:
        with terminate_on_sigterm():
            worker_loop(study, objective, url, total, timeout=timeout if timeout is not None else spec.timeout,
                        out=out, label=label)
    finally:
        close_trackers(objective, study, total)
    return 0
