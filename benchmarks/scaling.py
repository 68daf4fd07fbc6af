"""How a sweep scales on a shared RDB storage (PostgreSQL by default), measured in one process.

Two measurements, each on fresh, uniquely named studies that are deleted at the end:

1. ``workers``: trials/hour of the real CLI, ``python -m regsweep.search.cli run SPEC --storage URL --study-name NAME
   --workers K``, for K = 1 and K = 2, on a spec whose trials are CPU-bound, short and all the same size
   (digits CNN, widths [16, 32], ``train.num_threads: 1``, no pruner, no early stopping; the space only
   moves dropout and L2, which do not change a trial's cost). The wall time runs from the first trial's
   ``datetime_start`` to the last trial's ``datetime_complete`` (read back with Optuna afterwards), so
   process start-up is excluded; each worker's first trial still loads the dataset. Goal: K=2 / K=1 >= 1.8x
   on 2 cores.
2. ``storage``: per-trial time of the recording path (``regsweep.search.record.Recorder`` over
   ``regsweep.search.storage.TrialWriter``, a trivial objective of 3 epochs; random sampler, median pruner) driven by
   ``regsweep.search.loop.worker_loop`` in this process — the real stale-trial check, budget lock, count, ask,
   heartbeat and tell — for the first 100 and the last 100 trials of a 1,000-trial study. Goal: last / first
   close to 1 (no cost that grows with the study).

Sizes: full 40 CLI trials of 10 epochs per K and a 1,000-trial storage study (windows of 100); ``--quick``
20 CLI trials and 300 storage trials (windows of 50); ``--tiny`` (a smoke test) 4 CLI trials of 1 epoch and
20 storage trials (windows of 5). Timings are printed, never asserted; the only checks are that every study
met its budget exactly. The benchmark's studies get one fresh unique prefix and are deleted at the end.

    .venv/bin/python benchmarks/scaling.py [--quick] [--tiny] [--storage URL]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_STORAGE = "postgresql://postgres@127.0.0.1:5432/test"
SPEC = """\
name: scaling
base:
  model: {{name: cnn, widths: [16, 32]}}
  data: {{name: digits, batch_size: 32}}
  optim: {{name: adamw, lr: 3.0e-3}}
  train: {{epochs: {epochs}, num_threads: 1}}
objective: {{metric: val_loss, direction: minimize}}
space:
  model.dropout: {{type: float, low: 0.0, high: 0.5}}
  regularization.l2: {{type: float, low: 1.0e-6, high: 1.0e-2, log: true}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
budget: {{n_trials: {n_trials}}}
enqueue: [{{}}]
"""
# mode -> (trials and epochs per CLI run, storage-study trials, trials in each timed window)
MODES = {"full": (40, 10, 1000, 100), "quick": (20, 10, 300, 50), "tiny": (4, 1, 20, 5)}
RECORD = {"epoch": 0, "train_loss": 0.5, "train_eval_loss": 0.4, "train_acc": 0.9, "val_loss": 0.45,
          "val_acc": 0.88, "lr": 1e-3, "seconds": 0.1}
# a sweep that cannot finish (a trial stuck RUNNING, a lost database) ends with an error instead of hanging
CLI_SECONDS = (120.0, 3.0)  # limit of one CLI run: 120 s + 3 s per trial-epoch
LOOP_SECONDS = (60.0, 2.0)  # limit of the in-process loop: 60 s + 2 s per trial


@dataclass
class WorkersResult:
    workers: int
    study: str
    trials: int
    wall: float  # first datetime_start -> last datetime_complete, seconds
    median_trial: float  # median datetime_complete - datetime_start, seconds
    first_trial: float  # the longest of the first K trials to start: each worker's first loads the data

    @property
    def per_hour(self) -> float:
        return 3600.0 * self.trials / self.wall


# ------------------------------------------------------------------------------------ 1. workers
def run_cli(spec: Path, url: str, study: str, workers: int, limit: float) -> None:
    """The real CLI in a subprocess (its own process group, so a failure here never leaves workers behind)."""
    cmd = [sys.executable, "-P", "-m", "regsweep.search.cli", "run", str(spec), "--storage", url, "--study-name", study,
           "--workers", str(workers)]
    env = dict(os.environ)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise RuntimeError(f"`{' '.join(cmd[1:])}` did not finish in {limit:.0f}s") from None
        except BaseException:
            _stop_group(proc)
            raise
        if code != 0:
            log.seek(0)
            tail = "".join(log.readlines()[-15:])
            raise RuntimeError(f"`{' '.join(cmd[1:])}` exited {code}:\n{tail}")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_workers(url: str, study_name: str, workers: int, n_trials: int) -> WorkersResult:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=url)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(done) != n_trials:  # a correctness check of the budget, not a timing
        raise RuntimeError(f"study {study_name}: {len(done)} COMPLETE+PRUNED trials, expected exactly {n_trials} "
                           f"({_states(study)})")
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    seconds = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in done}
    firsts = sorted(done, key=lambda t: t.datetime_start)[:workers]
    return WorkersResult(workers, study_name, len(done), (end - start).total_seconds(),
                         statistics.median(seconds.values()), max(seconds[t.number] for t in firsts))


def _states(study) -> str:
    from collections import Counter

    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return ", ".join(f"{state} {n}" for state, n in sorted(counts.items()))


def measure_workers(url: str, tag: str, n_trials: int, epochs: int, created: list[str]) -> list[WorkersResult]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "scaling.yaml"
        spec.write_text(SPEC.format(epochs=epochs, n_trials=n_trials))
        for k in (1, 2):
            name = f"{tag}-k{k}"
            created.append(name)
            run_cli(spec, url, name, k, CLI_SECONDS[0] + CLI_SECONDS[1] * n_trials * epochs)
            results.append(read_workers(url, name, k, n_trials))
    return results


# ------------------------------------------------------------------------------------ 2. storage
def _history(epochs: int):
    from regsweep.models.train import History

    return History(epochs=[dict(RECORD, epoch=e) for e in range(epochs)], best_epoch=epochs - 1,
                   n_params=21386, split_fingerprint="0123456789abcdef", test={"test_loss": 0.4, "test_acc": 0.9})


class RecordingObjective:
    """A trivial trial through the ONE recording path: config attr, one history write + report per epoch, the
    final attrs. Keeps the seconds it spent inside, so the loop's own share can be told apart."""

    metric = "val_loss"

    def __init__(self, epochs: int):
        self.epochs, self.hist, self.inside = epochs, _history(epochs), []

    def __call__(self, trial) -> float:
        from regsweep.search.record import Recorder
        from regsweep.search.spec import Objective
        from regsweep.search.storage import TrialWriter

        t0 = time.perf_counter()
        try:
            x = trial.suggest_float("model.dropout", 0.0, 0.5)
            rec = Recorder(TrialWriter(trial), Objective(),
                           verdict=lambda epoch: "pruned" if trial.should_prune() else None)
            rec.start({"model": {"dropout": x}})
            for e in range(self.epochs):
                rec.on_epoch(e, dict(RECORD, epoch=e, val_loss=0.45 + x))
            _, value = rec.finish(self.hist)
            return value
        finally:
            self.inside.append(time.perf_counter() - t0)


class LineClock(io.TextIOBase):
    """worker_loop's ``out``: the time each trial line is printed (= the end of that trial's loop turn)."""

    def __init__(self):
        self.stamps: list[float] = []

    def write(self, text: str) -> int:
        if text.startswith("trial "):
            self.stamps.append(time.perf_counter())
        return len(text)


def timed_loop(url: str, name: str, n_trials: int, epochs: int) -> tuple[list[float], list[float], int]:
    """Per-trial seconds of whole loop turns and of the objective alone, in order, and how many trials
    failed (a dropped connection; each failure is replaced by another trial, as in a real sweep)."""
    import optuna
    from optuna.trial import TrialState

    from regsweep.search.loop import worker_loop
    from regsweep.search.storage import open_storage

    study = optuna.create_study(storage=open_storage(url), study_name=name,
                                sampler=optuna.samplers.RandomSampler(seed=0), pruner=optuna.pruners.MedianPruner())
    objective, clock = RecordingObjective(epochs), LineClock()
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # Optuna warns on every ask from a heartbeat storage outside optimize()
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", category=UserWarning)
        worker_loop(study, objective, url, n_trials, out=clock, poll=0.1,
                    timeout=LOOP_SECONDS[0] + LOOP_SECONDS[1] * n_trials)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(done) != n_trials:  # the budget contract, not a timing
        raise RuntimeError(f"study {name}: {len(done)} COMPLETE+PRUNED trials, expected exactly {n_trials} "
                           f"({_states(study)})")
    if len(clock.stamps) != len(objective.inside):
        raise RuntimeError(f"study {name}: {len(clock.stamps)} trial lines for {len(objective.inside)} trials run")
    stamps = [t0] + clock.stamps
    return [b - a for a, b in zip(stamps, stamps[1:])], objective.inside, len(clock.stamps) - n_trials


def measure_storage(url: str, tag: str, n_trials: int, window: int, created: list[str]):
    created.append(f"{tag}-warm")
    timed_loop(url, f"{tag}-warm", 5 if n_trials >= 100 else 2, 3)  # imports, first connections, the schema
    created.append(f"{tag}-store")
    return timed_loop(url, f"{tag}-store", n_trials, 3)


# ------------------------------------------------------------------------------------ main
def delete_studies(url: str, names: list[str]) -> list[str]:
    import optuna

    existing = set(optuna.get_all_study_names(storage=url))
    gone = [name for name in names if name in existing]
    for name in gone:
        optuna.delete_study(study_name=name, storage=url)
    return gone


def main(argv: list[str] | None = None) -> int:
    import optuna

    from regsweep.search.storage import check_reachable
    from regsweep.search.urls import mask

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"RDB storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--quick", action="store_true", help="20 CLI trials per worker count; a 300-trial study")
    p.add_argument("--tiny", action="store_true", help="a smoke test of a few seconds")
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    cli_trials, epochs, store_trials, window = MODES[mode]
    url = args.storage
    check_reachable(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tag = f"scaling-{uuid.uuid4().hex[:10]}"
    created: list[str] = []
    print(f"benchmarks/scaling.py, mode {mode}, storage {mask(url)}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine skews the speed-up)", flush=True)
    try:
        res = measure_workers(url, tag, cli_trials, epochs, created)
        print(f"\n1. workers: `regsweep run --workers K`, {cli_trials} trials of digits cnn [16, 32], {epochs} epochs, "
              f"1 thread")
        print(f"{'workers':>7}{'trials':>8}{'wall s':>9}{'first trial s':>15}{'median trial s':>16}{'trials/hour':>13}")
        for r in res:
            print(f"{r.workers:>7}{r.trials:>8}{r.wall:>9.2f}{r.first_trial:>15.2f}{r.median_trial:>16.3f}"
                  f"{r.per_hour:>13.0f}")
        speedup = res[1].per_hour / res[0].per_hour
        print(f"speed-up 2 workers / 1 worker: {speedup:.2f}x (goal >= 1.8x on 2 cores); "
              f"load average now {os.getloadavg()[0]:.2f}")

        turns, inside, failed = measure_storage(url, tag, store_trials, window, created)
        first, last = turns[:window], turns[-window:]
        ratio = statistics.mean(last) / statistics.mean(first)
        loop_first = statistics.mean(t - i for t, i in zip(first, inside[:window]))
        loop_last = statistics.mean(t - i for t, i in zip(last, inside[-window:]))
        print(f"\n2. storage: worker_loop + Recorder/TrialWriter, {store_trials} trials x 3 epochs, one process")
        print(f"{'trials':<26}{'ms/trial':>10}{'recording ms':>14}{'loop ms':>9}")
        for label, part, rec, loop in ((f"first {window}", first, inside[:window], loop_first),
                                       (f"last {window} (of {store_trials})", last, inside[-window:], loop_last)):
            print(f"{label:<26}{1000 * statistics.mean(part):>10.2f}{1000 * statistics.mean(rec):>14.2f}"
                  f"{1000 * loop:>9.2f}")
        print(f"per-trial time, last {window} / first {window}: {ratio:.2f}x (goal: close to 1)")
        if failed:
            print(f"  ({failed} trial(s) failed on a storage error and were replaced; their turns are included)")
        print("  (loop = stale check + budget lock + count + ask + heartbeat + tell; recording = the objective)")
    finally:
        gone = delete_studies(url, created)
        print(f"\ndeleted studies: {', '.join(gone)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
