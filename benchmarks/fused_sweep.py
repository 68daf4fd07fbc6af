"""Fused trials through the real search path: trials/hour of a digits sweep with ``fuse: N`` against one trial at a
time (``fuse: 1``), in ONE process, plus the storage seconds per fused epoch.

Every arm runs the same sweep (``optuna_backend.run``, the in-process worker ``regsweep run`` uses: budget lock,
ask, sampling, recording through search/record.py, tell) on its own fresh SQLite file: the digits demo's base
config (``studies/base/digits_cnn.yaml``: widths [32, 64], batch 32, AdamW) for a few epochs, the demo's whole
regularisation space (``spaces/regularization.yaml``: BN placement and scheduler are structural, so a group fixes
them), TPE (seed 0), no pruner (every trial trains every epoch: the arms do the same work), no enqueued base
trial. Arms: fuse 1 (the baseline), 8 and 16, run in alternating order over the rounds (the machine is shared;
the median counts). trials/hour = trials / wall seconds of the run x 3600; ratio = against fuse 1 here.

Storage seconds: the time in ``write_group`` per call (one call per fused epoch: every member's record in
one transaction) and, for fuse 1, in ``TrialWriter.write`` per epoch write of a solo trial (its record and
report). Goals are printed, never asserted.
Run: ``.venv/bin/python benchmarks/fused_sweep.py [--quick | --tiny] [--threads N] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

GOAL = 3.0  # issue 20: fused N = 8 and 16 vs one at a time, trials/hour on 2 cores
# mode -> (epochs, data.train_fraction, fuse sizes (the first is the baseline), trials per arm, rounds)
MODES = {"tiny": (1, 0.1, (1, 2), 4, 1), "quick": (1, 0.25, (1, 8, 16), 16, 1),
         "full": (2, 1.0, (1, 8, 16), 32, 3)}

SPEC = """
name: {name}
base: {base}
objective: {{metric: val_loss, direction: minimize}}
space: {{include: {space}}}
sampler: {{name: tpe, seed: 0}}
pruner: none
budget: {{n_trials: {n}}}
enqueue: []
keep_weights: none
fuse: {fuse}
"""


@dataclass
class Row:
    fuse: int
    trials: int
    seconds: float  # median wall seconds of the run
    trials_per_hour: float
    ratio: float = 1.0  # against fuse 1
    storage: list[float] = field(default_factory=list)  # seconds per storage write of an epoch (see the docstring)


class Timer:
    """Wraps a function and adds each call's seconds to ``calls`` (the benchmark's instrumentation)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kw):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kw)
        finally:
            self.calls.append(time.perf_counter() - start)


def write_spec(folder: Path, fuse: int, n: int, epochs: int, fraction: float, threads: int, tag: str) -> Path:
    import yaml

    from regsweep.models.config import TrainConfig

    base = TrainConfig.load(ROOT / "studies" / "base" / "digits_cnn.yaml").with_overrides({
        "train.epochs": epochs, "data.train_fraction": fraction, "train.num_threads": threads,
        "train.early_stopping.patience": None})
    (folder / "base.yaml").write_text(yaml.safe_dump(base.to_dict(), sort_keys=False))
    path = folder / f"sweep_{fuse}_{tag}.yaml"
    path.write_text(SPEC.format(name=f"sweep-{fuse}-{tag}", base="base.yaml", n=n, fuse=fuse,
                                space=ROOT / "spaces" / "regularization.yaml"))
    return path


def run_arm(folder: Path, fuse: int, n: int, mode: str, threads: int, device: str, tag: str) -> tuple[float, list]:
    """One sweep of ``n`` trials with ``fuse``; (wall seconds, storage seconds per epoch write)."""
    from regsweep.search import fused_trial, storage
    from regsweep.search.backends import optuna_backend
    from regsweep.search.spec import load_spec

    epochs, fraction = MODES[mode][:2]
    spec = load_spec(write_spec(folder, fuse, n, epochs, fraction, threads, tag), allow_outside=[ROOT])
    url = f"sqlite:///{folder}/{spec.name}.db"
    group, solo, epoch_writes = Timer(fused_trial.write_group), Timer(storage.TrialWriter.write), []

    def solo_write(self, attrs, report=None):
        solo(self, attrs, report)
        if report is not None:  # an epoch's write (its record and report); start/end writes have no report
            epoch_writes.append(solo.calls[-1])

    fused_trial.write_group = group  # instrumentation of this process only
    storage.TrialWriter.write = solo_write
    try:
        start = time.perf_counter()
        result = optuna_backend.run(spec, url, spec.name, device=device, artifacts="off", out=io.StringIO())
        seconds = time.perf_counter() - start
    finally:
        fused_trial.write_group, storage.TrialWriter.write = group.fn, solo.fn
    if result.ran != n:
        raise RuntimeError(f"{result.ran} trials ran, not {n}")
    return seconds, group.calls if fuse > 1 else epoch_writes


def measure(mode: str, threads: int = 1, device: str = "cpu") -> list[Row]:
    """Every arm of ``mode``, once per round (alternating order); the first row is the baseline."""
    import logging

    from regsweep.models.config import TrainConfig
    from regsweep.models.train import fit

    logging.getLogger("regsweep").setLevel(logging.WARNING)
    epochs, fraction, sizes, n, rounds = MODES[mode]
    torch.set_num_threads(threads)
    fit(TrainConfig.load(ROOT / "studies" / "base" / "digits_cnn.yaml").with_overrides(
        {"train.epochs": 1, "data.train_fraction": 0.05}), device)  # warm-up: first data load, first kernels
    seconds: dict[int, list[float]] = {f: [] for f in sizes}
    writes: dict[int, list[float]] = {f: [] for f in sizes}
    with tempfile.TemporaryDirectory(prefix="fused-sweep-") as tmp:
        for r in range(rounds):
            for fuse in (sizes if r % 2 == 0 else tuple(reversed(sizes))):
                s, w = run_arm(Path(tmp), fuse, n, mode, threads, device, f"r{r}")
                seconds[fuse].append(s)
                writes[fuse] += w
    rows = [Row(f, n, statistics.median(seconds[f]), n * 3600 / statistics.median(seconds[f]), storage=writes[f])
            for f in sizes]
    for row in rows:
        row.ratio = row.trials_per_hour / rows[0].trials_per_hour
    return rows


def format_report(rows: list[Row], mode: str, threads: int, device: str) -> str:
    epochs, fraction, _, n, rounds = MODES[mode]
    lines = [f"fused sweep through the search path, digits cnn [32, 64], batch 32, {epochs} epoch(s), train_fraction "
             f"{fraction}, {n} trials per arm, SQLite, {device}, {threads} thread(s), torch {torch.__version__}, "
             f"mode {mode}, median of {rounds} round(s)",
             f"{'fuse':>4} {'trials':>6} {'seconds':>8} {'trials/hour':>12} {'ratio':>6} {'storage s/epoch':>16}"]
    for r in rows:
        write = statistics.median(r.storage) if r.storage else float("nan")
        lines.append(f"{r.fuse:>4d} {r.trials:>6d} {r.seconds:>8.2f} {r.trials_per_hour:>12.0f} {r.ratio:>6.2f} "
                     f"{write:>16.5f}")
    lines.append("storage s/epoch: median seconds of one epoch's write: fuse 1 one trial's record; fuse N the whole "
                 "group's N records in one transaction")
    lines.append(f"goal: fuse 8 and 16 >= {GOAL:g}x fuse 1 (printed, never asserted)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on a quarter of the training split, 16 trials")
    parser.add_argument("--tiny", action="store_true", help="fuse 1 and 2, 4 trials (the CI test's size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every arm (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    print(format_report(measure(mode, args.threads, args.device), mode, args.threads, args.device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
