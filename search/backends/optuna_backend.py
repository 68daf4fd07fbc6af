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
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, TextIO

from regsweep.models.config import ConfigError
from regsweep.search.loop import THREADS_ENV, WORKER_ENV, budget, done_count, open_study_locked, worker_loop
from regsweep.search.signals import terminate_on_sigterm
from regsweep.search.spec import StudySpec
from regsweep.search.storage import STORAGE_ENV, mask
from regsweep.search.trial import make_objective


@dataclass
class RunResult:
    study: Any
    ran: int
    already_done: bool


def run(spec: StudySpec, url: str, study_name: str, *, n_trials: Optional[int] = None, timeout: Optional[float] = None,
        device: Optional[str] = None, allow_spec_change: bool = False, artifacts: Optional[str] = None,
        out: Optional[TextIO] = None) -> RunResult:
    """One in-process worker: the same loop every worker runs (search/loop.py)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = out or sys.stdout
    study = open_study_locked(spec, url, study_name, allow_spec_change=allow_spec_change, n_trials=n_trials)
    total = budget(study, spec)
    already = done_count(study)
    print(f"study '{study_name}' in {mask(url)}: {already}/{total} trials done", file=out, flush=True)
    if already >= total:
        print(f"budget met: {already} COMPLETE+PRUNED trials >= n_trials {total}; nothing to run", file=out)
        return RunResult(study, 0, True)
    start = time.monotonic()
    with terminate_on_sigterm():
        objective = make_objective(spec, study, url, device=device, artifacts=artifacts, out=out)
        ran = worker_loop(study, objective, url, total,
                          timeout=timeout if timeout is not None else spec.timeout, out=out)
    print(f"ran {ran} trials in {time.monotonic() - start:.1f}s", file=out, flush=True)
    return RunResult(study, ran, False)


def run_workers(spec: StudySpec, url: str, study_name: str, envs: list[dict[str, str]], *,
                n_trials: Optional[int] = None, timeout: Optional[float] = None, device: Optional[str] = None,
                allow_spec_change: bool = False, artifacts: Optional[str] = None,
                allow_outside: Sequence[str] = ()) -> tuple[Any, int]:
    """``run --workers N``: open the study (its budget and artifact store, which the workers read from it),
    then one worker process per env; returns (study, the worst exit code)."""
    from regsweep.search.artifacts import resolve

    study = open_study_locked(spec, url, study_name, allow_spec_change=allow_spec_change, n_trials=n_trials)
    total = budget(study, spec)
    location = resolve(study, url, artifacts, coordinator=True)  # the workers read it from the study
    print(f"study '{study_name}' in {mask(url)}: {done_count(study)}/{total} trials done"
          + (f"; artifacts: {location}" if location else ""), flush=True)
    return study, launch(str(spec.path), url, study_name, envs, device=device, timeout=timeout,
                         allow_outside=allow_outside)


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
           timeout: Optional[float] = None, out: Optional[TextIO] = None, allow_outside: Sequence[str] = ()) -> int:
    """Start one ``regsweep worker`` process per env (``python -P``: never the working directory first on the
    path; the storage URL in ``$REGSWEEP_STORAGE``, never in argv), forward SIGTERM/SIGINT, wait; the worst
    exit code wins (0 only when every worker finished)."""
    out = out or sys.stdout
    # the storage URL (maybe with a password) goes in the children's environment ($REGSWEEP_STORAGE, readable
    # only by this user in /proc/PID/environ), never on their command line, which `ps` shows to everyone
    cmd = [sys.executable, "-P", "-m", "regsweep.search.cli", "worker", spec_path,
           "--study-name", study_name, *(["--device", device] if device else []),
           *(["--timeout", str(timeout)] if timeout is not None else []),
           *[arg for d in allow_outside for arg in ("--allow-outside", str(d))]]  # each worker loads the same spec
    # children's lines go through `out` (the progress display's console when it is live), a line at a time
    procs = [subprocess.Popen(cmd, env={**os.environ, **env, STORAGE_ENV: url, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.PIPE, text=True, bufsize=1) for env in envs]

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
