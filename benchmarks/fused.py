"""Fused trials (models/fused.py) against one trial at a time, for the digits CNN, in ONE process.

Every arm trains the same sweep-like configurations (``studies/base/digits_cnn.yaml``: widths [32, 64],
batch 32, AdamW; per configuration a different lr, decoupled weight decay, L2, dropout and seed, drawn from a
seeded RNG) for the same epochs, with the same thread count:

- **one at a time**: ``train.fit`` of each configuration in turn (the first ``baseline`` configurations);
- **fused loop N**: ``fused.fit_fused(mode="loop")`` of the first N configurations: per batch the members' own
  models (per-member leaf tensors) one after the other in one graph, one backward, each member's own optimizer
  step; the solo arithmetic exactly;
- **fused vmap N**: ``fit_fused(mode="vmap")``: one vmapped ``functional_call`` over the stacked parameters per
  batch (convolutions become grouped convolutions).

Figure: trials/hour = configurations trained / wall seconds of the whole run (build, epochs, test split) x
3600 (the median over rounds that alternate the order of the runs), and its ratio to the one-at-a-time arm
measured here, in the same process. Goals are printed, never
asserted. Run: ``.venv/bin/python benchmarks/fused.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from regsweep.models.config import TrainConfig  # noqa: E402
from regsweep.models.fused import fit_fused  # noqa: E402
from regsweep.models.train import fit  # noqa: E402

DIGITS_YAML = ROOT / "studies" / "base" / "digits_cnn.yaml"
GOAL = 3.0  # issue 20: fused N = 8 and 16 vs one at a time, trials/hour on 2 cores
# mode -> (epochs, data.train_fraction, fused sizes, one-at-a-time trials, rounds); tiny: the CI test's
MODES = {"tiny": (1, 0.1, (1, 2), 1, 1), "quick": (1, 0.25, (1, 4, 8, 16), 2, 1),
         "full": (2, 1.0, (1, 4, 8, 16), 4, 3)}
ARMS = ("one at a time", "fused loop", "fused vmap")


@dataclass
class Row:
    arm: str  # one of ARMS
    n: int  # configurations trained by the run
    seconds: float  # wall seconds of the whole run
    trials_per_hour: float
    ratio: float = 1.0  # trials/hour against the one-at-a-time arm


def configs(n: int, epochs: int, fraction: float, threads: int) -> list[TrainConfig]:
    """``n`` sweep-like variations of the digits base config (seeded: the same every run)."""
    base = TrainConfig.load(DIGITS_YAML).with_overrides({
        "train.epochs": epochs, "data.train_fraction": fraction, "train.num_threads": threads,
        "train.early_stopping.patience": None})
    rng = random.Random(0)
    return [base.with_overrides({"optim.lr": 10 ** rng.uniform(-3.5, -2),
                                 "optim.weight_decay": 10 ** rng.uniform(-5, -2),
                                 "regularization.l2": 10 ** rng.uniform(-6, -3),
                                 "model.dropout": rng.choice([0.0, 0.1, 0.3]), "train.seed": i}) for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(mode: str, threads: int = 1) -> list[Row]:
    """Every arm of ``mode`` on the CPU, each run once per round (rounds alternate the order of the runs; the
    median seconds count: the machine is shared); the first row is the baseline every ratio is against."""
    epochs, fraction, sizes, n_base, rounds = MODES[mode]
    cfgs = configs(max(sizes), epochs, fraction, threads)
    fit(cfgs[0], "cpu")  # warm-up: the dataset's first load and torch's first kernels are in no arm
    runs = [("one at a time", n_base, lambda: [fit(c, "cpu") for c in cfgs[:n_base]])]
    runs += [(arm, n, lambda arm=arm, n=n: fit_fused(cfgs[:n], "cpu", mode=arm.split()[1]))
             for arm in ARMS[1:] for n in sizes]
    seconds: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    for r in range(rounds):
        for i in (range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))):
            seconds[i].append(timed(runs[i][2]))
    rows = []
    for i, (arm, n, _) in enumerate(runs):
        median = statistics.median(seconds[i])
        rows.append(Row(arm, n, median, n * 3600 / median))
    for row in rows:
        row.ratio = row.trials_per_hour / rows[0].trials_per_hour
    return rows


def format_report(rows: list[Row], mode: str, threads: int) -> str:
    epochs, fraction, _, _, rounds = MODES[mode]
    lines = [f"fused trials, digits cnn [32, 64], batch 32, {epochs} epoch(s), train_fraction {fraction}, "
             f"cpu, {threads} thread(s), torch {torch.__version__}, mode {mode}, median of {rounds} round(s)",
             f"{'arm':<14} {'N':>3} {'seconds':>8} {'trials/hour':>12} {'ratio':>6}"]
    lines += [f"{r.arm:<14} {r.n:>3d} {r.seconds:>8.3f} {r.trials_per_hour:>12.0f} {r.ratio:>6.2f}" for r in rows]
    lines.append(f"goal: fused N = 8 and 16 >= {GOAL:g}x one at a time (printed, never asserted)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on a quarter of the training split")
    parser.add_argument("--tiny", action="store_true", help="N = 1, 2 on a tenth of it (the CI test's size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every arm (default 1)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    print(format_report(measure(mode, args.threads), mode, args.threads), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
