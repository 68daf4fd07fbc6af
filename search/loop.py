"""The worker loop every backend builds on: study open, exact budget, ask/tell, liveness, failure streak.

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

The spec's hash is a study attr: resuming with a different spec is refused unless ``allow_spec_change``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO, Union

from regsweep.models.config import ConfigError
from regsweep.search.optuna_internals import frozen_trial, study_storage, trial_id, trial_number
from regsweep.search.record import failure_reason
from regsweep.search.signals import Terminated, check_signals, terminate_on_sigterm
from regsweep.search.spec import StudySpec
from regsweep.search.storage import (
    MAX_RETRY,
    adopt_orphans,
    check_url,
    database_reason,
    is_external,
    open_existing,
    open_storage,
    retry_attrs,
    retry_transient,
    sqlite_file,
    transient_errors,
)
from regsweep.search.trial import BASE_ATTR, TrialFailed, make_objective, worker_label

THREADS_ENV = "REGSWEEP_NUM_THREADS"  # threads for configs that leave train.num_threads unset
WORKER_ENV = "REGSWEEP_WORKER"  # worker label printed in front of its lines
MAX_CONSECUTIVE_FAILURES = 5
TELL_ATTEMPTS = 16  # ~2 minutes of database outage before a worker gives up telling a trial
ORPHAN_AFTER = 10.0  # seconds a RUNNING trial may go without its first heartbeat before it is adopted
SPEC_HASH_ATTR, SPEC_ATTR, BUDGET_ATTR = "regsweep:spec_hash", "regsweep:spec", "regsweep:n_trials"


class SweepFailed(RuntimeError):
    """The sweep cannot go on (e.g. every trial fails): exit 1."""


# ------------------------------------------------------------------------------------ the study
def done_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def budget(study, spec: StudySpec) -> int:
    """The study's budget of COMPLETE + PRUNED trials (its ``regsweep:n_trials`` attr, else the spec's)."""
    return int(study.user_attrs.get(BUDGET_ATTR, spec.n_trials))


def check_existing_study(spec: StudySpec, url: str, study_name: str) -> None:
    """Read-only version of open_study's checks (for `validate`): creates no file, table or study."""
    import optuna
    import sqlalchemy.exc

    storage = open_existing(url)
    if storage is None:
        return
    try:
        names = set(optuna.get_all_study_names(storage))  # summaries would load every trial
    except sqlalchemy.exc.SQLAlchemyError:  # a database without Optuna's tables holds no study yet
        return
    if study_name not in names:
        return
    study = optuna.load_study(study_name=study_name, storage=storage)
    old_hash = study.user_attrs.get(SPEC_HASH_ATTR)
    if old_hash is not None and old_hash != spec.spec_hash():
        raise spec.change_error(study_name, study.user_attrs.get(SPEC_ATTR, {}))


def open_study(spec: StudySpec, url: str, study_name: str, *, allow_spec_change: bool = False,
               heartbeat: bool = True):
    """Create or load the study; check the spec hash; returns (study, created)."""
    import optuna

    storage = open_storage(url, heartbeat=heartbeat)
    existing = set(optuna.get_all_study_names(storage))  # summaries would load every trial
    created = study_name not in existing
    study = optuna.create_study(storage=storage, study_name=study_name, direction=spec.objective.direction,
                                sampler=spec.make_sampler(), pruner=spec.make_pruner(), load_if_exists=True)
    old_hash = study.user_attrs.get(SPEC_HASH_ATTR)
    if old_hash is None or (old_hash != spec.spec_hash() and allow_spec_change):
        study.set_user_attr(SPEC_HASH_ATTR, spec.spec_hash())
        study.set_user_attr(SPEC_ATTR, spec.stored())
        if old_hash is None:
            study.set_user_attr("regsweep:objective", spec.objective.metric)
        if created:  # every trial of a new study records format 2; an older study mixes (the attr stays absent)
            from regsweep.search.record import FORMAT_ATTR, RECORD_FORMAT

            study.set_user_attr(FORMAT_ATTR, RECORD_FORMAT)
    elif old_hash != spec.spec_hash():
        raise spec.change_error(study_name, study.user_attrs.get(SPEC_ATTR, {}))
    if study.direction.name.lower() != spec.objective.direction:
        raise ConfigError(f"{spec.path}: objective.direction: study '{study_name}' is "
                          f"{study.direction.name.lower()}, the spec says {spec.objective.direction}")
    return study, created


def enqueue(study, spec: StudySpec) -> None:
    for params in spec.enqueue:
        if params:
            study.enqueue_trial(params, skip_if_exists=True)
        else:
            study.enqueue_trial({}, user_attrs={BASE_ATTR: True})


def open_study_locked(spec: StudySpec, url: str, study_name: str, *, allow_spec_change: bool = False,
                      n_trials: Optional[int] = None):
    """open_study + enqueue under the budget lock, so workers starting at the same instant on a new study
    make one study and enqueue its first trials once. ``n_trials`` (from ``run``) becomes the study's budget,
    which workers joining later read."""
    with budget_lock(url, study_name):
        study, created = open_study(spec, url, study_name, allow_spec_change=allow_spec_change)
        if created:
            enqueue(study, spec)
        if n_trials is not None or BUDGET_ATTR not in study.user_attrs:
            study.set_user_attr(BUDGET_ATTR, n_trials if n_trials is not None else spec.n_trials)
    return study


def trial_line(trial, metric: str) -> str:
    attrs = trial.user_attrs
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    base = " (base config)" if attrs.get(BASE_ATTR) else ""
    return (f"trial {trial.number:>3} {trial.state.name:<8} {metric}={value} best_epoch={attrs.get('best_epoch')} "
            f"{attrs.get('stop_reason', '')}{base}")


# ------------------------------------------------------------------------------------ budget lock
@contextlib.contextmanager
def budget_lock(url: str, study_name: str, timeout: float = 600.0) -> Iterator[None]:
    """A lock shared by every worker of one study, held only around count-then-ask.

    PostgreSQL: ``pg_advisory_lock``; MySQL/MariaDB: ``GET_LOCK``; SQLite: ``flock`` on ``<db>.lock``. Each is
    released by the database / kernel when its holder dies, so a killed worker never leaves it taken.
    """
    scheme = check_url(url)
    key = int.from_bytes(hashlib.sha256(f"regsweep:{study_name}".encode()).digest()[:8], "big", signed=True)
    if scheme == "sqlite":
        file = sqlite_file(url)
        if file is None:  # in-memory: one process, nothing to share
            yield
            return
        with open(f"{file}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    import sqlalchemy
    import sqlalchemy.exc

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            if scheme == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
                unlock = f"SELECT pg_advisory_unlock({key})"
            else:
                name = f"regsweep_{key & 0xFFFFFFFFFFFF:x}"
                got = conn.exec_driver_sql(f"SELECT GET_LOCK('{name}', {int(timeout)})").scalar()
                if got != 1:
                    raise SweepFailed(f"could not take the budget lock of study '{study_name}' in {timeout:.0f}s")
                unlock = f"SELECT RELEASE_LOCK('{name}')"
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.exec_driver_sql(unlock)
                    conn.commit()
                except sqlalchemy.exc.SQLAlchemyError:
                    pass  # the connection died: the server released the lock with it
    finally:
        engine.dispose()


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
    with budget_lock(url, study.study_name):
        # inside the lock: failing a stale trial and enqueueing its retry are two writes; a worker counting
        # between them would ask a NEW trial, fill the budget and strand the retry WAITING
        retry_transient(fail_stale, study)
        done, running = counts(study)
        if done + running >= n_trials:
            return None, done
        trial = ask(study)
        with contextlib.suppress(*transient_errors()):  # the database went away: the trial runs anyway; its
            # heartbeat thread beats when it is back, and its first write fails it `failed:database` (retried)
            beat_once(study, trial_id(trial))  # a worker dying right after ask leaves a trial that can go stale
            # who holds it, for `failed:stale heartbeat (worker HOST:PID)` if this worker dies before its 1st epoch
            retry_transient(trial.set_user_attr, "worker", worker_label())
    return trial, done


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
    out = out or sys.stdout
    transient = transient_errors()
    prefix = f"[{label}] " if label else ""
    deadline = None if timeout is None else time.monotonic() + timeout
    streak, ran = FailureStreak(), 0
    while True:
        check_signals()
        if deadline is not None and time.monotonic() >= deadline:
            return ran
        try:
            trial, done = ask_within_budget(study, url, n_trials)
        except transient as exc:  # a dropped connection or a restarting server: wait and try again
            print(f"{prefix}storage unavailable ({exc.__class__.__name__}); retrying", file=out, flush=True)
            time.sleep(poll)
            continue
        if trial is None:
            if done >= n_trials:
                return ran
            # others hold the rest of the budget; a dead one's trial goes stale (and an orphan is adopted so it can)
            with contextlib.suppress(*transient), budget_lock(url, study.study_name):  # fail + requeue as one
                retry_transient(adopt_orphans, study, ORPHAN_AFTER)
            time.sleep(poll)
            continue
        frozen = run_one(study, trial, objective)
        ran += 1
        print(prefix + trial_line(frozen, getattr(objective, "metric", "value")), file=out, flush=True)
        streak.add(frozen)
        if streak.broken:
            raise streak.error()


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


def worker_main(spec, url: str, study_name: str, *, device: Optional[str] = None, timeout: Optional[float] = None,
                artifacts: Optional[str] = None, out: Optional[TextIO] = None) -> int:
    """``regsweep worker``: join (or create) the study and run trials until its budget is done.

    The budget is the study's (set by the ``run`` that created or resumed it), else the spec's. Each worker
    reseeds its sampler: workers built from one seeded spec would otherwise all draw the same params.
    """
    apply_thread_share()
    study = retry_transient(open_study_locked, spec, url, study_name)
    study.sampler.reseed_rng()
    total = budget(study, spec)
    objective = make_objective(spec, study, url, device=device, artifacts=artifacts, coordinator=False, out=out)
    label = os.environ.get(WORKER_ENV, f"pid{os.getpid()}")
    with terminate_on_sigterm():
        worker_loop(study, objective, url, total, timeout=timeout if timeout is not None else spec.timeout,
                    out=out, label=label)
    return 0
