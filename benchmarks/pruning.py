"""Pruners compared on the overfitting demo: epochs spent, wall time, best value, test accuracy.

The same seeded TPE study (studies/overfit_demo.yaml's base config and space, 40 trials by default) is run
once per arm and seed, with the same in-trial early-stopping setting in every arm (the base config's: off,
restore best weights). Arms:

- ``none``: no pruning (the baseline)
- ``median``: MedianPruner(n_startup_trials=5, n_warmup_steps=3)
- ``asha``: SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
- ``overfit``: the overfit pruner (warmup 3, patience 3, window 2, on_fire complete)
- ``median+overfit``: any_of of the two
- ``median+overfit(p6,w3)``: the same with the overfit pruner at patience 6, window 3 (the demo study's setting)

Per arm: total epochs trained (and the ratio to ``none``), wall seconds, the best trial's validation loss, the
test accuracy of each seed's best config (its restored best epoch; mean ± sd over seeds; the test set chooses
nothing), and whether the ``none`` arm's best configuration was lost: sampled in that arm too (same seed, same
params) but ended PRUNED. Goals (printed, never asserted): overfit (alone or composed) <= 0.4x the epochs of
none, test accuracy within one sd of none, and at least as good as median on both.

    .venv/bin/python benchmarks/pruning.py [--trials 40] [--seeds 3] [--jobs 2] [--quick] [--out docs/pruning.md]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARMS = {
    "none": {"name": "none"},
    "median": {"name": "median", "args": {"n_startup_trials": 5, "n_warmup_steps": 3}},
    "asha": {"name": "successive_halving", "args": {"min_resource": 1, "reduction_factor": 3}},
    "overfit": {"name": "overfit", "args": {"warmup": 3, "patience": 3, "window": 2}},
    "median+overfit": {"any_of": [{"name": "median", "args": {"n_startup_trials": 5, "n_warmup_steps": 3}},
                                  {"name": "overfit", "args": {"warmup": 3, "patience": 3, "window": 2}}]},
    "median+overfit(p6,w3)": {"any_of": [{"name": "median", "args": {"n_startup_trials": 5, "n_warmup_steps": 3}},
                                         {"name": "overfit", "args": {"warmup": 3, "patience": 6, "window": 3}}]},
}


def run_arm(arm: str, seed: int, n_trials: int, epochs: int | None, db_dir: str) -> dict:
    from optuna.trial import TrialState

    from regsweep.search.backends.optuna_backend import run
    from regsweep.search.record import n_epochs
    from regsweep.search.spec import load_spec

    spec = load_spec(ROOT / "studies" / "overfit_demo.yaml")
    spec.pruner = ARMS[arm]
    spec.sampler = {**spec.sampler, "seed": seed}
    if epochs is not None:
        spec.base = spec.base.with_overrides({"train.epochs": epochs})
    url = f"sqlite:///{db_dir}/{''.join(c if c.isalnum() else '_' for c in arm)}_{seed}.db"
    start = time.perf_counter()
    result = run(spec, url, f"{''.join(c if c.isalnum() else '-' for c in arm)}-{seed}", n_trials=n_trials,
                 device="cpu", out=io.StringIO())
    seconds = time.perf_counter() - start
    trials = result.study.get_trials(deepcopy=False)
    best = result.study.best_trial
    return {
        "arm": arm, "seed": seed, "seconds": seconds,
        "epochs": sum(n_epochs(t) for t in trials),
        "best_value": best.value, "test_acc": best.user_attrs.get("test_acc"), "best_params": best.params,
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "stopped": sum(str(t.user_attrs.get("stop_reason", "")).startswith("stopped:") for t in trials),
        "states": {tuple(sorted(t.params.items())): t.state.name for t in trials},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="arms x seeds run in this many processes")
    p.add_argument("--quick", action="store_true", help="12 trials, 1 seed, 8 epochs")
    p.add_argument("--tiny", action="store_true", help="a smoke test: 3 trials, 1 seed, 3 epochs, 2 arms")
    p.add_argument("--out", default=None, help="also write the table as Markdown to this file")
    args = p.parse_args(argv)
    epochs = None
    arms = list(ARMS)
    if args.quick:
        args.trials, args.seeds, epochs = 12, 1, 8
    if args.tiny:
        args.trials, args.seeds, epochs, arms = 3, 1, 3, ["none", "median+overfit"]
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    with tempfile.TemporaryDirectory() as tmp:
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                futures = [pool.submit(run_arm, a, s, args.trials, epochs, tmp) for a, s in jobs]
                results = [f.result() for f in futures]
        else:
            results = [run_arm(a, s, args.trials, epochs, tmp) for a, s in jobs]
    by_arm = {a: [r for r in results if r["arm"] == a] for a in arms}
    none_epochs = statistics.mean(r["epochs"] for r in by_arm["none"])

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    lines = [f"Pruners on studies/overfit_demo.yaml: TPE, {args.trials} trials, {args.seeds} seed(s)"
             + (f", {epochs} epochs" if epochs else "") + "; mean ± sd over seeds",
             "",
             "| arm | epochs | epochs / none | wall s | pruned | stopped (overfit) | best val_loss | test acc of best "
             "| none's best lost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = by_arm[arm]
        lost = []
        for r, base in zip(rs, by_arm["none"]):
            key = tuple(sorted(base["best_params"].items()))
            state = r["states"].get(key)
            lost.append("sampled, kept" if state == "COMPLETE" else "LOST (pruned)" if state == "PRUNED"
                        else "not sampled")
        lines.append(f"| {arm} | {statistics.mean(r['epochs'] for r in rs):.0f} | "
                     f"{statistics.mean(r['epochs'] for r in rs) / none_epochs:.2f} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} | "
                     f"{statistics.mean(r['pruned'] for r in rs):.1f} | "
                     f"{statistics.mean(r['stopped'] for r in rs):.1f} | "
                     f"{ms(r['best_value'] for r in rs)} | {ms(r['test_acc'] for r in rs)} | "
                     f"{', '.join(sorted(set(lost))) if arm != 'none' else '-'} |")
    lines += ["", "Goals: overfit (alone or composed) <= 0.4x the epochs of none; test accuracy within one sd of "
              "none; at least as good as median on both."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
