"""Worker processes: the trial loop, the exact budget, liveness, GPU assignment and signals.

Every worker — the in-process one of ``regsweep run``, the N children of ``run --workers N`` and any
``regsweep worker`` started on another machine — runs :func:`worker_loop` against one RDB study:

1. Under the study's *budget lock* (PostgreSQL advisory lock, MySQL ``GET_LOCK``, or an ``flock`` beside a
   SQLite file) count COMPLETE + PRUNED + live RUNNING trials; ask a new trial only while that is below
   ``n_trials``. Optuna's ``ask`` pops WAITING trials (enqueued ones, retries) first. So COMPLETE + PRUNED
   ends exactly at ``n_trials``: a trial that fails frees its place for another.
2. Run the trial with a heartbeat thread (Optuna's RDB heartbeat). A worker that finds live-looking RUNNING
   trials filling the budget waits and calls ``fail_stale_trials``: a killed worker's trial is failed after
   the grace period and retried (same params, ``failed_trial`` system attr) by
   ``RetryHeartbeatStaleTrialCallback``. A worker exits 0 only when the budget is done.
3. SIGTERM/SIGINT: the running trial ends FAIL (``failed:terminated`` / ``failed:interrupted``); after SIGTERM
   it is also re-queued, and the worker exits 143 (130 for Ctrl-C), so a preempted pod is simply replaced.

GPU assignment: ``run --workers N --gpus 0,1 --trials-per-gpu K`` pins worker i to GPU ``gpus[i // K]``
through ``CUDA_VISIBLE_DEVICES``; without GPUs every worker uses the CPU and gets ``cores // N`` threads
when the config leaves ``train.num_threads`` unset.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional, Sequence, TextIO

from regsweep.models.config import ConfigError
from regsweep.search.storage import adopt_orphans, check_url, retry_transient, sqlite_file, transient_errors

THREADS_ENV = "REGSWEEP_NUM_THREADS"  # threads for configs that leave train.num_threads unset
WORKER_ENV = "REGSWEEP_WORKER"  # worker label printed in front of its lines
MAX_CONSECUTIVE_FAILURES = 5
TELL_ATTEMPTS = 16  # ~2 minutes of database outage before a worker gives up telling a trial
ORPHAN_AFTER = 10.0  # seconds a RUNNING trial may go without its first heartbeat before it is adopted




class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (BaseException: no `except Exception` swallows it)."""


class SweepFailed(RuntimeError):
    """The sweep cannot go on (e.g. every trial fails): exit 1."""


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


# ------------------------------------------------------------------------------------ heartbeat
class Heartbeat:
    """Beats ``storage.record_heartbeat(trial_id)`` every heartbeat interval in a daemon thread (Optuna's
    RDB heartbeat, run here because regsweep asks trials itself). A failed beat is retried next time."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{self.trial_id}")
            self._thread.start()
        return self

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a dropped connection: the next beat reconnects (NullPool / pre-ping)
                pass
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------ signals
_pending: list[type[BaseException]] = []  # a signal whose exception may have been swallowed


def check_signals() -> None:
    """Raise the exception of a SIGTERM/SIGINT received earlier. A signal handler's exception can be swallowed
    when it lands inside a destructor or GC callback ("Exception ignored in ..."); the trial loop calls this at
    every epoch and every trial so the signal still takes effect."""
    if _pending:
        raise _pending[0]()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM -> :class:`Terminated`, SIGINT -> KeyboardInterrupt in the main thread for the duration (raised
    at once, and again at the next :func:`check_signals` in case the first was swallowed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _pending:  # a repeated signal (Ctrl-C reaches the whole process group, `run` forwards it too):
            return  # the first one is being handled; raising again could interrupt the trial's FAIL write
        exc = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        _pending.append(exc)
        raise exc()

    _pending.clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def apply_thread_share() -> None:
    """In a worker child: the share of cores its parent gave it, for configs without train.num_threads."""
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


# ------------------------------------------------------------------------------------ the loop
def _counts(study) -> tuple[int, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    done = sum(t.state != TrialState.RUNNING for t in trials)
    return done, len(trials) - done


def _fail_stale(study) -> None:
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _requeue(study, trial_id: int) -> None:
    """Re-queue a failed trial with the same params, linked to the original (Optuna's retry callback)."""
    import copy
    import warnings

    import optuna

    from regsweep.search.storage import MAX_RETRY

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        frozen = copy.deepcopy(study._storage.get_trial(trial_id))
        optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)(study, frozen)


def _ask(study):
    import warnings

    with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for optimize(); we beat ourselves
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def _beat_once(study, trial_id: int) -> None:
    """First heartbeat right after ask (retried): Optuna never fails a RUNNING trial that has no heartbeat."""
    storage = study._storage
    if not getattr(storage, "get_heartbeat_interval", lambda: None)():
        return
    for attempt in range(8):
        try:
            storage.record_heartbeat(trial_id)
            return
        except transient_errors():
            time.sleep(0.25 * 2 ** min(attempt, 4))
    storage.record_heartbeat(trial_id)


def worker_loop(study, objective, url: str, n_trials: int, *, timeout: Optional[float] = None,
                out: Optional[TextIO] = None, label: str = "", poll: float = 2.0) -> int:
    """Run trials until COMPLETE + PRUNED reaches ``n_trials``; returns how many this worker ran.

    Raises KeyboardInterrupt / Terminated after ending the running trial FAIL (re-queued on Terminated),
    and SweepFailed after MAX_CONSECUTIVE_FAILURES failures in a row.
    """
    import optuna
    from optuna.trial import TrialState

    from regsweep.search.backends.optuna_backend import trial_line

    out = out or sys.stdout
    TRANSIENT = transient_errors()
    prefix = f"[{label}] " if label else ""
    deadline = None if timeout is None else time.monotonic() + timeout
    failures: list[str] = []
    ran = 0
    while True:
        check_signals()
        if deadline is not None and time.monotonic() >= deadline:
            return ran
        try:
            retry_transient(_fail_stale, study)
            with budget_lock(url, study.study_name):
                done, running = _counts(study)
                trial = _ask(study) if done + running < n_trials else None
                if trial is not None:  # beat at once: a worker dying right after ask leaves a trial that can go stale
                    _beat_once(study, trial._trial_id)
        except TRANSIENT as exc:  # a dropped connection or a restarting server: wait and try again
            print(f"{prefix}storage unavailable ({exc.__class__.__name__}); retrying", file=out, flush=True)
            time.sleep(poll)
            continue
        if trial is None:
            if done >= n_trials:
                return ran
            # others hold the rest of the budget; a dead one's trial goes stale (and an orphan is adopted so it can)
            try:
                retry_transient(adopt_orphans, study, ORPHAN_AFTER)
            except TRANSIENT:
                pass
            time.sleep(poll)
            continue
        state, value = TrialState.FAIL, None
        try:
            with Heartbeat(study._storage, trial._trial_id):
                value = objective(trial)
                check_signals()
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Terminated:
            _tell(study, trial, TrialState.FAIL, None)
            retry_transient(_requeue, study, trial._trial_id)
            raise
        except KeyboardInterrupt:
            _tell(study, trial, TrialState.FAIL, None)
            raise
        except Exception:  # recorded by the objective (stop_reason); the sweep goes on
            state = TrialState.FAIL
        frozen = _tell(study, trial, state, value)
        ran += 1
        print(prefix + trial_line(frozen, getattr(objective, "metric", "value")), file=out, flush=True)
        if state == TrialState.FAIL:
            failures.append(frozen.user_attrs.get("stop_reason", "failed"))
            if len(failures) >= MAX_CONSECUTIVE_FAILURES:
                raise SweepFailed(f"{len(failures)} trials in a row failed; last: {failures[-1]}")
        else:
            failures.clear()


def _tell(study, trial, state, value):
    return tell_trial(study, trial._trial_id, state, value, trial)


def tell_trial(study, trial_id: int, state, value, trial=None):
    """Finish a trial (its live ``Trial``, or found by id) and return it frozen; a storage hiccup is retried, a
    trial already finished elsewhere (e.g. failed as stale) is left alone. Every backend tells through here."""
    import optuna

    target = trial if trial is not None else retry_transient(study._storage.get_trial_number_from_id, trial_id)

    def tell() -> None:
        try:
            if state == optuna.trial.TrialState.COMPLETE:
                study.tell(target, value)
            else:
                study.tell(target, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        except ValueError as exc:  # "Cannot tell a COMPLETE trial": already finished by fail_stale_trials
            if "Cannot tell" not in str(exc):
                raise

    retry_transient(tell, attempts=TELL_ATTEMPTS)  # a finished trial must not be lost to a short outage
    return retry_transient(study._storage.get_trial, trial_id, attempts=TELL_ATTEMPTS)


# ------------------------------------------------------------------------------------ launching
def parse_gpus(text: Optional[str]) -> list[str]:
    """'0,1' -> ['0', '1']; None -> the visible CUDA devices (none on a CPU machine)."""
    if text is not None:
        gpus = [g.strip() for g in text.split(",") if g.strip()]
        if not gpus or not all(g.isdigit() for g in gpus):
            raise ConfigError(f"--gpus: {text!r} is not allowed; give GPU indices like 0,1")
        return gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def assignments(workers: int, gpus: list[str], trials_per_gpu: int) -> list[dict[str, str]]:
    """Environment of each worker: its GPU (packed ``trials_per_gpu`` per GPU) or its CPU thread share."""
    if workers < 1:
        raise ConfigError(f"--workers: {workers} is not allowed; must be >= 1")
    if trials_per_gpu < 1:
        raise ConfigError(f"--trials-per-gpu: {trials_per_gpu} is not allowed; must be >= 1")
    if gpus and workers > len(gpus) * trials_per_gpu:
        raise ConfigError(f"--workers: {workers} workers do not fit {len(gpus)} GPU(s) x {trials_per_gpu} "
                          "trials per GPU; raise --trials-per-gpu or lower --workers")
    cores = os.cpu_count() or 1
    envs = []
    for i in range(workers):
        env = {WORKER_ENV: f"w{i}"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i // trials_per_gpu]
            env[THREADS_ENV] = str(max(1, cores // workers))
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env[THREADS_ENV] = str(max(1, cores // workers))
        envs.append(env)
    return envs


def launch(spec_path: str, url: str, study_name: str, envs: list[dict[str, str]], *, device: Optional[str] = None,
           timeout: Optional[float] = None, out: Optional[TextIO] = None, allow_outside: Sequence[str] = ()) -> int:
    """Start one ``regsweep worker`` process per env, forward SIGTERM/SIGINT, wait; the worst exit code wins
    (0 only when every worker finished the budget)."""
    out = out or sys.stdout
    cmd = [sys.executable, "-P", "-m", "regsweep.search.cli", "worker", spec_path, "--storage", url, "--study-name", study_name]
    if device:
        cmd += ["--device", device]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    for directory in allow_outside:  # the coordinator's --allow-outside: each worker loads the same spec
        cmd += ["--allow-outside", str(directory)]
    # children's lines go through `out` (the progress display's console when it is live), a line at a time
    procs = [subprocess.Popen(cmd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                              text=True, bufsize=1) for env in envs]

    def relay(stream) -> None:
        for line in stream:
            out.write(line)
            out.flush()

    relays = [threading.Thread(target=relay, args=(p.stdout,), daemon=True) for p in procs]
    for r in relays:
        r.start()
    print(f"started {len(procs)} workers: " + ", ".join(
        f"{e[WORKER_ENV]} (pid {p.pid}, {'GPU ' + e['CUDA_VISIBLE_DEVICES'] if e['CUDA_VISIBLE_DEVICES'] else 'CPU'}"
        f", {e[THREADS_ENV]} threads)" for p, e in zip(procs, envs)), file=out, flush=True)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for r in relays:
            r.join(timeout=5)
    for bad in (143, 130, 1, 2):
        if bad in codes:
            return bad
    return max(codes) if codes else 0


def worker_main(spec, url: str, study_name: str, *, device: Optional[str] = None, timeout: Optional[float] = None,
                artifacts: Optional[str] = None, out: Optional[TextIO] = None) -> int:
    """``regsweep worker``: join (or create) the study and run trials until its budget is done.

    The budget is the study's (set by the ``run`` that created or resumed it), else the spec's. Each worker
    reseeds its sampler: workers built from one seeded spec would otherwise all draw the same params.
    """
    from regsweep.search.backends.optuna_backend import budget, make_objective, open_study_locked

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
