"""Storage cost of regsweep's recording path vs raw Optuna, on the same kind of SQLite storage, one process.

Two measurements, each arm on a fresh SQLite file opened the same way (search.storage.open_storage):

1. ``trials``: N trials (default 1,000) of a trivial objective with one epoch each. Raw: suggest, report,
   should_prune, return. regsweep: the same through ``regsweep.search.record.Recorder`` (config attr at the start,
   one history write + report per epoch, the final attrs). Also the per-trial time of the last 100 trials
   against the first 100 (goal <= 1.5x: no cost that grows with the study).
2. ``epochs``: 20 epochs per trial (default 50 trials): raw ``trial.report`` + ``should_prune`` per epoch
   vs regsweep's per-epoch record.

Goals (printed, never asserted): <= 1.1x for each.

    .venv/bin/python benchmarks/storage_overhead.py [--trials 1000] [--epoch-trials 50] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECORD = {"epoch": 0, "train_loss": 0.5, "train_eval_loss": 0.4, "train_acc": 0.9, "val_loss": 0.45,
          "val_acc": 0.88, "lr": 1e-3, "seconds": 0.1}


def _history(epochs: int):
    from regsweep.models.train import History

    return History(epochs=[dict(RECORD, epoch=e) for e in range(epochs)], best_epoch=epochs - 1,
                   n_params=21386, split_fingerprint="0123456789abcdef", test={"test_loss": 0.4, "test_acc": 0.9})


def raw_objective(epochs: int):
    def objective(trial):
        x = trial.suggest_float("model.dropout", 0.0, 0.5)
        for e in range(epochs):
            trial.report(0.45 + x, e)
            trial.should_prune()
        return 0.45 + x

    return objective


def regsweep_objective(epochs: int):
    from regsweep.search.record import Recorder
    from regsweep.search.spec import Objective
    from regsweep.search.storage import TrialWriter

    hist = _history(epochs)
    config = {"model": {"dropout": 0.0}}

    def objective(trial):
        x = trial.suggest_float("model.dropout", 0.0, 0.5)
        rec = Recorder(TrialWriter(trial), Objective(),
                       verdict=lambda epoch: "pruned" if trial.should_prune() else None)
        rec.start(config)
        for e in range(epochs):
            rec.on_epoch(e, dict(RECORD, epoch=e, val_loss=0.45 + x))
        _, value = rec.finish(hist)
        return value

    return objective


def timed_study(url: str, objective, n_trials: int) -> list[float]:
    """Seconds per trial (ask -> tell), in order."""
    import optuna

    from regsweep.search.storage import open_storage

    study = optuna.create_study(storage=open_storage(url), sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.MedianPruner())
    times: list[float] = []
    last = [time.perf_counter()]

    def callback(study, trial):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    last[0] = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, callbacks=[callback])
    return times


def main(argv: list[str] | None = None) -> int:
    import optuna

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--epoch-trials", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="200 trials and 20 epoch-trials")
    p.add_argument("--tiny", action="store_true", help="a smoke test: 20 trials, 3 epoch-trials")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.epoch_trials = 200, 20
    if args.tiny:
        args.trials, args.epoch_trials = 20, 3
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rounds = 5  # arms alternate A B A B ... on fresh studies, so drift of a shared machine hits both
    per_round: dict[tuple[str, str], list[float]] = {}
    growth: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        timed_study(f"sqlite:///{tmp}/warm.db", raw_objective(1), 5)  # imports, first connection
        arms = (("trials", 1, max(args.trials // rounds, 5)), ("epochs", 20, max(args.epoch_trials // rounds, 2)))
        for name, epochs, n in arms:
            for r in range(rounds):
                for arm, make in (("raw optuna", raw_objective), ("regsweep", regsweep_objective)):
                    times = timed_study(f"sqlite:///{tmp}/{name}_{r}_{arm.replace(' ', '_')}.db", make(epochs), n)
                    per_round.setdefault((name, arm), []).append(sum(times) / len(times) / epochs)
        for arm, make in (("raw optuna", raw_objective), ("regsweep", regsweep_objective)):
            growth[arm] = timed_study(f"sqlite:///{tmp}/growth_{arm.replace(' ', '_')}.db", make(1), args.trials)
    print(f"{'measure (median of ' + str(rounds) + ' alternating rounds)':<44}{'raw optuna':>11}{'regsweep':>10}"
          f"{'ratio':>7}  goal")
    for name, label in (("trials", f"trial of 1 epoch, {args.trials} trials (ms/trial)"),
                        ("epochs", f"epoch, {args.epoch_trials} trials x 20 epochs (ms/epoch)")):
        raw = 1000 * statistics.median(per_round[(name, "raw optuna")])
        ours = 1000 * statistics.median(per_round[(name, "regsweep")])
        print(f"{label:<44}{raw:>11.2f}{ours:>10.2f}{ours / raw:>7.2f}  <= 1.1x")
    k = max(1, min(100, args.trials // 10))
    for arm, t in growth.items():
        first, last = sum(t[:k]) / k, sum(t[-k:]) / k
        print(f"{arm}: per-trial time, last {k} / first {k} of {args.trials} in one study: {last / first:.2f}x "
              f"(goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
