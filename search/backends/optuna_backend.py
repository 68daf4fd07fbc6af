"""Run a study spec on regsweep's own Optuna workers (search/loop.py) on an RDB storage.

``run`` is one in-process worker; ``run --workers N`` starts N ``regsweep worker`` processes on this machine
(:func:`run_workers`), each pinned to a GPU or given its share of the CPU cores. Budget contract: ``n_trials``
is the study's TOTAL of COMPLETE + PRUNED trials across all runs; a run on a study that already has them exits 0
saying so, and a larger ``--n-trials`` runs only the difference.

GPU assignment: ``run --workers N --gpus 0,1 --trials-per-gpu K`` pins worker i to GPU ``gpus[i // K]`` through
``CUDA_VISIBLE_DEVICES``; without GPUs every worker uses the CPU and gets ``cores // N`` threads when the config
leaves ``train.num_threads`` unset.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from regsweep.models.config import ConfigError
from regsweep.search import log
from regsweep.search.loop import THREADS_ENV, WORKER_ENV, attach_trackers, close_trackers, worker_loop
from regsweep.search.signals import terminate_on_sigterm
from regsweep.search.spec import StudySpec
from regsweep.search.spec_checks import MLFLOW_ENV
from regsweep.search.study import budget, done_count, open_study_locked, seed_sampler
from regsweep.search.trial import make_objective
from regsweep.search.urls import STORAGE_ENV, mask


@dataclass
class RunResult:
    study: Any
    ran: int
    already_done: bool


def run(spec: StudySpec, url: str, study_name: str, *, n_trials: Optional[int] = None, timeout: Optional[float] = None,
        device: Optional[str] = None, allow_spec_change: bool = False, artifacts: Optional[str] = None,
        out: Optional[TextIO] = None, trackers: Optional[dict[str, Any]] = None) -> RunResult:
    """One in-process worker: the same loop every worker runs (search/loop.py). ``trackers``: the tracker
    settings (spec_checks.tracker_settings; None: the spec's)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = log.info_stream(__name__, out)
    study = open_study_locked(spec, url, study_name, allow_spec_change=allow_spec_change, n_trials=n_trials)
    seed_sampler(study, spec)  # a resumed run draws fresh params (its own seed); a fresh study's first, the spec's
    total = budget(study, spec)
    already = done_count(study)
    print(f"study '{study_name}' in {mask(url)}: {already}/{total} trials done", file=out, flush=True)
    if already >= total:
        print(f"budget met: {already} COMPLETE+PRUNED trials >= n_trials {total}; nothing to run", file=out)
        return RunResult(study, 0, True)
    start = time.monotonic()
    settings = spec.trackers if trackers is None else trackers
    with terminate_on_sigterm():
        objective = make_objective(spec, study, url, device=device, artifacts=artifacts, out=out)
        attach_trackers(objective, settings, study, url)
        try:
            ran = worker_loop(study, objective, url, total,
                              timeout=timeout if timeout is not None else spec.timeout, out=out)
        finally:
            close_trackers(objective, study, total)
    print(f"ran {ran} trials in {time.monotonic() - start:.1f}s", file=out, flush=True)
    if objective.artifact_store is not None:
        prune_after_budget(spec, study, total, objective.artifact_store, out)
    return RunResult(study, ran, False)


def prune_after_budget(spec: StudySpec, study, total: int, store, out: Optional[TextIO] = None) -> None:
    """``keep_weights: best``: the coordinator (never a worker) removes the non-best weights once the budget is
    done (search/artifacts.py ``prune_weights``; RUNNING trials' files are left alone)."""
    from regsweep.search.artifacts import prune_weights

    if spec.keep_weights == "best" and done_count(study) >= total:
        prune_weights(study, store, out=log.info_stream(__name__, out))


def run_workers(spec: StudySpec, url: str, study_name: str, envs: list[dict[str, str]], *,
                n_trials: Optional[int] = None, timeout: Optional[float] = None, device: Optional[str] = None,
                allow_spec_change: bool = False, artifacts: Optional[str] = None,
                allow_outside: Sequence[str] = (), trackers: Optional[dict[str, str]] = None,
                fuse: Optional[int] = None) -> tuple[Any, int]:
    """``run --workers N``: open the study (its budget and artifact store, which the workers read from it),
    then one worker process per env; returns (study, the worst exit code). ``trackers``: the ``--mlflow`` and
    ``--tensorboard`` flags given to ``run`` (None where not given), passed on to each worker; ``fuse``: ``run
    --fuse N`` (None where not given), passed on as each worker's ``--fuse N``."""
    from regsweep.search.artifacts import open_store, resolve
    from regsweep.search.trial import warn_no_weights

    study = open_study_locked(spec, url, study_name, allow_spec_change=allow_spec_change, n_trials=n_trials)
    total = budget(study, spec)
    location = resolve(study, url, artifacts, coordinator=True)  # the workers read it from the study
    log.get(__name__).info(f"study '{study_name}' in {mask(url)}: {done_count(study)}/{total} trials done"
                           + (f"; artifacts: {location}" if location else ""))
    if location is None:
        warn_no_weights(spec)
    code = launch(str(spec.path), url, study_name, envs, device=device, timeout=timeout,
                  allow_outside=allow_outside, trackers=trackers, fuse=fuse)
    if code == 0 and location is not None:  # every worker exited 0: the budget is done
        prune_after_budget(spec, study, total, open_store(location))
    return study, code


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
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return [{WORKER_ENV: f"w{i}", "CUDA_VISIBLE_DEVICES": gpus[i // trials_per_gpu] if gpus else "",
             THREADS_ENV: threads} for i in range(workers)]


def launch(spec_path: str, url: str, study_name: str, envs: list[dict[str, str]], *, device: Optional[str] = None,
           timeout: Optional[float] = None, out: Optional[TextIO] = None, allow_outside: Sequence[str] = (),
           trackers: Optional[dict[str, Optional[str]]] = None, fuse: Optional[int] = None) -> int:
    """Start one ``regsweep worker`` process per env (``python -P``: never the working directory first on the
    path; the storage URL in ``$REGSWEEP_STORAGE``, never in argv), relay their output, forward SIGTERM/SIGINT,
    wait. Returns 0 only when every worker exited 0; else 143/130 when they were stopped by SIGTERM/Ctrl-C, 1
    when one failed or was killed by a signal (one line on stderr per such worker: its label, pid and the signal
    or exit code), 2 for bad input.

    The workers outlive this process: each is the leader of its own session (no signal sent to this process's
    group or terminal reaches them) and writes to its own log files, which this process tails and relays. A
    pipe would tie them to this process: once it died, their next line would raise BrokenPipeError and stop
    them. Log files cannot break, keep the output of workers whose coordinator died (their directory is
    printed first), and need no code in the worker. The directory is removed when every worker exited 0."""
    out = log.info_stream(__name__, out)
    # the storage URL (maybe with a password) goes in the children's environment ($REGSWEEP_STORAGE, readable
    # only by this user in /proc/PID/environ), never on their command line, which `ps` shows to everyone
    cmd = [sys.executable, "-P", "-m", "regsweep.search.cli", *log.verbosity_flags(), "worker", spec_path,
           "--study-name", study_name, *(["--device", device] if device else []),
           *(["--timeout", str(timeout)] if timeout is not None else []),
           *(["--fuse", str(fuse)] if fuse is not None else []),
           *[arg for d in allow_outside for arg in ("--allow-outside", str(d))],  # each worker loads the same spec
           *(["--tensorboard", trackers["tensorboard"]] if (trackers or {}).get("tensorboard") else [])]
    child_env = {STORAGE_ENV: url, "PYTHONUNBUFFERED": "1",
                 **({MLFLOW_ENV: trackers["mlflow"]} if (trackers or {}).get("mlflow") else {})}
    logs = Path(tempfile.mkdtemp(prefix="regsweep-workers-"))
    procs, tails = [], []
    for env in envs:
        label = env[WORKER_ENV]
        stdout, stderr = logs / f"{label}.out", logs / f"{label}.err"
        with open(stdout, "wb") as fout, open(stderr, "wb") as ferr:
            procs.append(subprocess.Popen(cmd, env={**os.environ, **env, **child_env},
                                          stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                                          start_new_session=True))
        # children's lines go to `out` (the progress display's console when it is live) a line at a time
        tails += [Tail(stdout, procs[-1], out), Tail(stderr, procs[-1], sys.stderr)]
    print(f"started {len(procs)} workers: " + ", ".join(
        f"{e[WORKER_ENV]} (pid {p.pid}, {'GPU ' + e['CUDA_VISIBLE_DEVICES'] if e['CUDA_VISIBLE_DEVICES'] else 'CPU'}"
        f", {e[THREADS_ENV]} threads)" for p, e in zip(procs, envs)) + f"; their logs: {logs}", file=out, flush=True)
    for t in tails:
        t.start()

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
        for t in tails:
            t.join(timeout=5)
    code = worst(codes)
    for env, p in zip(envs, procs):
        if p.returncode < 0 or p.returncode not in (0, 130, 143):
            log.get(__name__).error(f"worker {env[WORKER_ENV]} (pid {p.pid}) {ended(p.returncode)}; its log: "
                                    f"{logs / env[WORKER_ENV]}.err")
    if code == 0:
        shutil.rmtree(logs, ignore_errors=True)
    return code


def ended(code: int) -> str:
    """How a worker process ended, from its return code: 'was killed by SIGKILL' or 'exited 1'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited {code}"


def worst(codes: list[int]) -> int:
    """The exit code of ``run --workers N`` from its workers': 0 only when all are 0; a SIGTERM (143) or Ctrl-C
    (130) stop wins; a failure or a death by a signal is 1; bad input 2."""
    for stop in (143, 130):
        if stop in codes:
            return stop
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    return 2 if all(c == 2 for c in bad) else 1


class Tail(threading.Thread):
    """Relays a worker's log file to ``out`` a whole line at a time until the worker has ended and the file is
    read to its end (``tail -f`` that stops with its process)."""

    def __init__(self, path: Path, proc: subprocess.Popen, out: TextIO, poll: float = 0.1):
        super().__init__(daemon=True, name=f"regsweep-tail-{path.name}")
        self.path, self.proc, self.out, self.poll = path, proc, out, poll

    def run(self) -> None:
        partial = b""
        with open(self.path, "rb") as fh:
            while True:
                ended = self.proc.poll() is not None  # before the read: nothing is written after the last one
                chunk = fh.read(65536)
                if chunk:
                    partial += chunk
                    *lines, partial = partial.split(b"\n")
                    for line in lines:
                        self.write(line + b"\n")
                    continue
                if ended:
                    if partial:
                        self.write(partial + b"\n")
                    return
                time.sleep(self.poll)

    def write(self, line: bytes) -> None:
        try:
            self.out.write(line.decode("utf-8", errors="replace"))
            self.out.flush()
        except (OSError, ValueError):  # our own output is gone (closed pipe or file): the log keeps it
            pass


def run_confirm(spec: StudySpec, url: str, study_name: str, *, device: Optional[str] = None,
                out: Optional[TextIO] = None) -> Any:
    """``confirm: {top_k, seeds}``: retrain the main study's top K configurations (distinct params, by value)
    with S new ``train.seed`` values each (search/confirm.py ``confirm_seeds``) in the sibling study
    ``<name>.confirm``: unpruned, its trials enqueued with the original's params and the user attrs
    ``confirm_of``/``train.seed``, run through the same trial body. The main study is only read (budget, best
    trial, sampler untouched). Resumable: pairs already COMPLETE (or queued) are not enqueued again. Returns the
    confirm study."""
    import optuna
    from optuna.trial import TrialState

    from regsweep.search import confirm
    from regsweep.search.loop import ask, run_one, trial_line
    from regsweep.search.storage import open_existing, open_storage
    from regsweep.search.study import SPEC_ATTR, budget_lock
    from regsweep.search.trial import OptunaObjective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = log.info_stream(__name__, out)
    if not spec.confirm:
        raise ConfigError(f"{spec.source or spec.path}: confirm: missing; add confirm: {{top_k: K, seeds: S}}")
    existing = open_existing(url)  # read-only first: confirming a study that is not there creates nothing
    if existing is None or study_name not in optuna.get_all_study_names(existing):
        raise ConfigError(f"--study-name: {study_name!r} not found in {mask(url)}; run the study first")
    storage = open_storage(url)
    main = optuna.load_study(study_name=study_name, storage=storage)
    old = {k: v for k, v in main.user_attrs.get(SPEC_ATTR, {}).items() if k != "confirm"}
    new = {k: v for k, v in spec.stored().items() if k != "confirm"}
    if old and old != new:  # the configs would not be the trials' (confirm itself may be added later)
        raise spec.change_error(study_name, old)
    top = confirm.top_configs(main, spec.confirm["top_k"])
    name = confirm.confirm_name(study_name)
    sibling = _confirm_study(spec, url, storage, study_name, name, top)
    print(f"confirm: top {len(top)} configurations of '{study_name}' x {spec.confirm['seeds']} new seeds in "
          f"'{name}'", file=out, flush=True)
    objective = OptunaObjective(spec, device)
    objective.storage_label = mask(url)
    with terminate_on_sigterm():
        while True:
            with budget_lock(url, name):  # pop a queued confirm trial; never sample a new one
                if not sibling.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                    break
                trial = ask(sibling)
            frozen = run_one(sibling, trial, objective)
            print(f"confirm of trial {frozen.user_attrs.get(confirm.OF_ATTR)} (train.seed "
                  f"{frozen.user_attrs.get(confirm.SEED_ATTR)}): {trial_line(frozen, spec.objective.metric)}",
                  file=out, flush=True)
    rows = confirm.table(main)
    if rows:
        print(confirm.format_table(rows, spec.objective.metric), file=out, flush=True)
    return sibling


def _confirm_study(spec: StudySpec, url: str, storage: Any, study_name: str, name: str, top: list) -> Any:
    """The confirm study ``name`` (created if new, under the budget lock), with every (top trial, new seed) pair
    it does not hold yet enqueued: the trial's params, ``confirm_of``/``train.seed`` (and the base mark)."""
    import optuna
    from optuna.trial import TrialState

    from regsweep.search import confirm
    from regsweep.search.record import BASE_ATTR, FORMAT_ATTR, RECORD_FORMAT
    from regsweep.search.study import budget_lock

    with budget_lock(url, name):
        sibling = optuna.create_study(storage=storage, study_name=name, direction=spec.objective.direction,
                                      sampler=optuna.samplers.RandomSampler(seed=0),
                                      pruner=optuna.pruners.NopPruner(), load_if_exists=True)
        for key, value in (("regsweep:objective", spec.objective.metric), ("regsweep:confirm", spec.confirm),
                           ("regsweep:confirm_of_study", study_name), (FORMAT_ATTR, RECORD_FORMAT)):
            sibling.set_user_attr(key, value)
        have = {(t.user_attrs.get(confirm.OF_ATTR), t.user_attrs.get(confirm.SEED_ATTR))
                for t in sibling.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING,
                                                                     TrialState.RUNNING, TrialState.PRUNED))}
        for trial in top:
            own = (trial.user_attrs.get("config") or {}).get("train", {}).get("seed", spec.base.train.seed)
            for seed in confirm.confirm_seeds(int(own), spec.confirm["seeds"]):
                if (trial.number, seed) in have:
                    continue
                attrs = {confirm.OF_ATTR: trial.number, confirm.SEED_ATTR: seed}
                if trial.user_attrs.get(BASE_ATTR):
                    attrs[BASE_ATTR] = True
                sibling.enqueue_trial(dict(trial.params), user_attrs=attrs)
    return sibling
