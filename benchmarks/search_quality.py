"""Search quality at an equal budget of trained epochs: which search picks a configuration that holds up on new seeds.

Two studies, both studies/digits_cnn.yaml (its space, objective and enqueued base config, the base pinned to the
shipped studies/base/digits_cnn.yaml):

- ``digits``: the demo as shipped (1079 training images);
- ``lowdata``: the same with ``data.train_fraction`` 0.139 (150 training images; val/test unchanged).

Arms, each run per sampler seed on a fresh temporary SQLite study, in this process, through regsweep's own loop
(search/study.py ``open_study_locked`` + ``seed_sampler``, search/trial.py ``make_objective``, search/loop.py
``worker_loop``; no artifacts):

- ``random``: RandomSampler, no pruner;
- ``tpe``: the demo's TPE (multivariate, group, 8 start-up trials), no pruner;
- ``tpe+median``: TPE + MedianPruner (benchmarks/pruning.py's ``median`` arm, the demo's own pruner);
- ``tpe+median+overfit``: TPE + any_of(median, overfit patience 6 window 3) (pruning.py's ``median+overfit(p6,w3)``,
  the setting of studies/overfit_demo.yaml);
- ``<best pruning arm>+confirm``: the pruning arm of the two above whose selected configurations have the lower mean
  objective (val_loss) over their new-seed retrainings (the test set chooses nothing), with ``confirm: {top_k: 3,
  seeds: 2}`` (``--confirm K,S``; search/backends/optuna_backend.py ``run_confirm``).

Equal budget: an arm runs one trial at a time until the sum of the epochs its trials recorded (pruned, stopped and
failed ones included) reaches the budget; the last trial may overshoot it. The confirm arm searches until the sum
reaches ``budget - top_k * seeds * epochs`` (the most its confirm runs can train) and then confirms; its column
``epochs`` counts the confirm runs' epochs too. The selected configuration is what ``regsweep export`` writes
(search/export.py ``pick_trial``: the best trial, or with confirm the original trial of the best-mean
configuration); it is retrained with ``regsweep.models.train.fit`` (what ``regsweep train`` runs) on 3 new
``train.seed`` values (confirm.confirm_seeds of the base seed, after the ones confirm itself trains on, so no
evaluation seed chose anything), and its test accuracy (best-epoch weights restored) is read from the History.
The base configuration is retrained on the same seeds.

Figures: test accuracy mean and sd over (sampler seeds x retrain seeds); se = the standard error of that mean with
the sampler seed as the unit (sd of the per-sampler-seed means / sqrt(sampler seeds); the retrainings of one
selected configuration are not independent draws of the search); the base's over its retrain seeds (sd / sqrt(n)).
Goals (printed, never asserted): in ``lowdata`` the chosen configuration beats the base by >= 10 pp test accuracy;
with confirm, the mean test accuracy over new seeds is at least that without it.

    .venv/bin/python benchmarks/search_quality.py [--seeds 3] [--retrain-seeds 3] [--budget 300] \\
        [--lowdata-budget 300] [--epochs 15] [--lowdata-epochs 15] [--confirm 3,2] [--studies digits,lowdata] \\
        [--quick] [--out docs/search_quality.md]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "studies" / "digits_cnn.yaml"
LOWDATA_FRACTION = 0.139  # round(1079 * 0.139) = 150 training images (digits: 1797 = 1079 train + 359 val + 359 test)
STUDIES = {"digits": {}, "lowdata": {"data.train_fraction": LOWDATA_FRACTION}}
CONFIRM = {"top_k": 3, "seeds": 2}
PRUNING_ARMS = ("tpe+median", "tpe+median+overfit")
GOAL_PP = 10.0


def _pruning():
    """benchmarks/pruning.py (a script, not a package): its pruner arms are the ones compared here."""
    spec = importlib.util.spec_from_file_location("bench_pruning", Path(__file__).with_name("pruning.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def arms() -> dict[str, tuple[str, dict[str, Any]]]:
    """arm -> (sampler name, pruner section)."""
    pruners = _pruning().ARMS
    return {"random": ("random", pruners["none"]), "tpe": ("tpe", pruners["none"]),
            "tpe+median": ("tpe", pruners["median"]),
            "tpe+median+overfit": ("tpe", pruners["median+overfit(p6,w3)"])}


def study_spec(study: str, sampler: str, pruner: dict[str, Any], seed: int, overrides: dict[str, Any],
               confirm: Optional[dict[str, int]] = None):
    from regsweep.search.spec import load_spec

    spec = load_spec(SPEC)
    spec.base = spec.base.with_overrides({**STUDIES[study], **overrides})
    args = spec.sampler.get("args", {}) if sampler == spec.sampler["name"] else {}
    spec.sampler = {"name": sampler, "seed": seed, "args": copy.deepcopy(args)}
    spec.pruner = copy.deepcopy(pruner)
    spec.keep_weights = "none"  # no artifact store: nothing to keep
    spec.confirm = dict(confirm or {})
    return spec


def trained_epochs(study) -> int:
    from regsweep.search.record import n_epochs

    return sum(n_epochs(t) for t in study.get_trials(deepcopy=False))


def search(spec, url: str, name: str, budget: int) -> tuple[Any, int]:
    """Run ``spec`` one trial at a time until its trials recorded ``budget`` epochs; (study, trials run)."""
    from regsweep.search.loop import worker_loop
    from regsweep.search.study import done_count, open_study_locked, seed_sampler
    from regsweep.search.trial import make_objective

    sink = io.StringIO()
    study = open_study_locked(spec, url, name, n_trials=100_000)  # the epoch budget stops it, not n_trials
    seed_sampler(study, spec)
    objective = make_objective(spec, study, url, device="cpu", artifacts="off", out=sink)
    ran = 0
    while trained_epochs(study) < budget:
        ran += worker_loop(study, objective, url, done_count(study) + 1, out=sink)
    return study, ran


def retrain(cfg, seeds: list[int], metric: str, sign: int) -> list[dict[str, float]]:
    """``cfg`` trained once per seed as ``regsweep train`` does: test accuracy (best epoch restored) and the best
    epoch's objective."""
    from regsweep.models.train import fit

    out = []
    for seed in seeds:
        hist = fit(cfg.with_overrides({"train.seed": seed}), "cpu")
        best = min(sign * e[metric] for e in hist.epochs) * sign
        out.append({"seed": seed, "test_acc": hist.test["test_acc"], "objective": best})
    return out


def run_arm(study: str, arm: str, sampler: str, pruner: dict[str, Any], seed: int, budget: int, eval_seeds: list[int],
            overrides: dict[str, Any], tmp: str, confirm: Optional[dict[str, int]] = None) -> dict[str, Any]:
    from optuna.trial import TrialState

    from regsweep.search.backends.optuna_backend import run_confirm
    from regsweep.search.export import pick_trial, trial_config

    spec = study_spec(study, sampler, pruner, seed, overrides, confirm)
    name = "".join(c if c.isalnum() else "-" for c in f"{study}-{arm}-{seed}")
    url = f"sqlite:///{tmp}/search_quality.db"  # one file, one study per arm and seed: Optuna's schema made once
    start = time.perf_counter()
    reserve = confirm["top_k"] * confirm["seeds"] * spec.base.train.epochs if confirm else 0
    main, ran = search(spec, url, name, budget - reserve)
    epochs = trained_epochs(main)
    if confirm:
        epochs += trained_epochs(run_confirm(spec, url, name, device="cpu", out=io.StringIO()))
    seconds = time.perf_counter() - start
    chosen = pick_trial(main, None)  # what `regsweep export` writes
    trials = main.get_trials(deepcopy=False)
    return {"study": study, "arm": arm, "seed": seed, "seconds": seconds, "epochs": epochs, "trials": len(trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials), "chosen": chosen.number,
            "chosen_base": bool(chosen.user_attrs.get("regsweep:base")), "value": chosen.value,
            "runs": retrain(trial_config(chosen), eval_seeds, spec.objective.metric, spec.objective.sign)}


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """mean and sd of test accuracy over every retraining; se with the sampler seed as the unit."""
    accs = [r["test_acc"] for row in rows for r in row["runs"]]
    per_seed = [statistics.fmean(r["test_acc"] for r in row["runs"]) for row in rows]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    se = statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else sd / math.sqrt(len(accs))
    return {"mean": statistics.fmean(accs), "sd": sd, "se": se, "n": len(accs),
            "objective": statistics.fmean(r["objective"] for row in rows for r in row["runs"])}


def base_summary(runs: list[dict[str, float]]) -> dict[str, float]:
    accs = [r["test_acc"] for r in runs]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"mean": statistics.fmean(accs), "sd": sd, "se": sd / math.sqrt(len(accs)), "n": len(accs),
            "objective": statistics.fmean(r["objective"] for r in runs)}


def row_text(study: str, arm: str, s: dict[str, float], base: dict[str, float], rows: list[dict[str, Any]]) -> str:
    def avg(key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    if not rows:  # the base config itself: retrained only
        return (f"| {study} | {arm} | - | - | - | - | - | {s['objective']:.4f} | {s['mean']:.4f} | {s['sd']:.4f} | "
                f"{s['se']:.4f} | {s['n']} | - |")
    delta = 100 * (s["mean"] - base["mean"])
    delta_se = 100 * math.hypot(s["se"], base["se"])
    return (f"| {study} | {arm} | {avg('epochs'):.0f} | {avg('trials'):.1f} | {avg('pruned'):.1f} | "
            f"{avg('seconds'):.0f} | {sum(r['chosen_base'] for r in rows)}/{len(rows)} | {s['objective']:.4f} | "
            f"{s['mean']:.4f} | {s['sd']:.4f} | {s['se']:.4f} | {s['n']} | {delta:+.2f} ± {delta_se:.2f} |")


HEADER = ["| study | arm | epochs | trials | pruned | wall s | chose base | retrain val_loss | test acc mean | sd "
          "| se | n | vs base (pp ± se) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def goals(results: dict[str, Any]) -> list[str]:
    """The issue's goals on whatever rows are done (printed, never asserted)."""
    lines = []
    for study, r in results.items():
        base = r["base"]
        if study == "lowdata":
            for arm, a in r["arms"].items():
                d = 100 * (a["summary"]["mean"] - base["mean"])
                lines.append(f"- lowdata {arm}: chosen config vs base {d:+.2f} pp (goal >= +{GOAL_PP:.0f} pp): "
                             + ("holds" if d >= GOAL_PP else "does not hold"))
        if r.get("confirm_arm") in r["arms"]:
            w, c = r["arms"][r["without"]]["summary"], r["arms"][r["confirm_arm"]]["summary"]
            d = 100 * (c["mean"] - w["mean"])
            lines.append(f"- {study} confirm: {r['confirm_arm']} {c['mean']:.4f} ± {c['se']:.4f} (se) vs "
                         f"{r['without']} {w['mean']:.4f} ± {w['se']:.4f} (se): {d:+.2f} ± "
                         f"{100 * math.hypot(c['se'], w['se']):.2f} pp (goal >= 0): "
                         + ("holds" if d >= 0 else "does not hold"))
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    import optuna
    import torch

    from regsweep.search.confirm import confirm_seeds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="sampler seeds per arm")
    p.add_argument("--retrain-seeds", type=int, default=3, help="new train.seed values per selected config")
    p.add_argument("--budget", type=int, default=300, help="trained epochs per arm and seed (digits)")
    p.add_argument("--lowdata-budget", type=int, default=None, help="the same for lowdata (default: --budget)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs per trial (default: the base's, 15)")
    p.add_argument("--lowdata-epochs", type=int, default=None, help="the same for lowdata (default: --epochs)")
    p.add_argument("--confirm", default=f"{CONFIRM['top_k']},{CONFIRM['seeds']}", metavar="K,S",
                   help="the confirm arm's top_k and seeds")
    p.add_argument("--studies", default="digits,lowdata", help="comma-separated, run in this order")
    p.add_argument("--quick", action="store_true",
                   help="CI size: 1 sampler seed, 1 retrain seed, a CNN of widths [8, 16], 1 epoch, budget 2, "
                        "confirm top 1 x 1 seed")
    p.add_argument("--out", default=None, help="also write the table as Markdown to this file (after every row, "
                                               "marked partial until the end)")
    args = p.parse_args(argv)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        p.error(f"--studies: unknown {unknown or args.studies!r}; choose from {list(STUDIES)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    common: dict[str, Any] = {}
    try:
        confirm = dict(zip(("top_k", "seeds"), (int(v) for v in args.confirm.split(",")), strict=True))
    except ValueError:
        p.error(f"--confirm: {args.confirm!r} is not K,S (two integers)")
    if min(confirm.values()) < 1:
        p.error(f"--confirm: {args.confirm!r}: K and S must be >= 1")
    if args.quick:
        args.seeds, args.retrain_seeds, args.budget, args.lowdata_budget = 1, 1, 2, 2
        common = {"model.widths": [8, 16], "train.epochs": 1}
        confirm = {"top_k": 1, "seeds": 1}
    overrides = {s: dict(common) for s in STUDIES}
    for study, epochs in (("digits", args.epochs), ("lowdata", args.lowdata_epochs or args.epochs)):
        if epochs is not None:
            overrides[study]["train.epochs"] = epochs
    budgets = {"digits": args.budget, "lowdata": args.lowdata_budget or args.budget}
    seed0 = study_spec(studies[0], "tpe", {"name": "none"}, 0, overrides[studies[0]]).base.train.seed
    # after the seeds confirm trains on (the same for every configuration: train.seed is not searched)
    eval_seeds = confirm_seeds(seed0, confirm["seeds"] + args.retrain_seeds)[confirm["seeds"]:]
    n_rows = len(studies) * (len(arms()) + 2)
    table = list(HEADER)
    results: dict[str, Any] = {}
    started = time.perf_counter()

    def emit(final: bool) -> str:
        setting = "; ".join(f"{s}: {budgets[s]} trained epochs per arm and seed"
                            + (f", overrides {overrides[s]}" if overrides[s] else "") for s in studies)
        state = "" if final else f"PARTIAL ({len(table) - len(HEADER)} of {n_rows} rows) "
        text = "\n".join([f"{state}Search quality on {SPEC.relative_to(ROOT)} (base: studies/base/digits_cnn.yaml"
                          f"); {args.seeds} sampler seed(s) per arm; {setting}; confirm {confirm}; test accuracy of "
                          f"the selected configuration retrained on {args.retrain_seeds} new seed(s) {eval_seeds}; "
                          f"{time.perf_counter() - started:.0f} s in all", "", *table, "", "Goals:", *goals(results)])
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        return text

    def progress(study: str, arm: str) -> None:
        print(f"[{time.perf_counter() - started:.0f}s] {study} {arm} done", file=sys.stderr, flush=True)
        emit(final=False)

    with tempfile.TemporaryDirectory() as tmp:
        for study in studies:
            spec = study_spec(study, "tpe", {"name": "none"}, 0, overrides[study])
            base = base_summary(retrain(spec.base, eval_seeds, spec.objective.metric, spec.objective.sign))
            results[study] = r = {"base": base, "arms": {}}
            table.append(row_text(study, "base config", base, base, []))
            progress(study, "base config")
            for arm, (sampler, pruner) in arms().items():
                rows = [run_arm(study, arm, sampler, pruner, seed, budgets[study], eval_seeds, overrides[study], tmp)
                        for seed in range(args.seeds)]
                r["arms"][arm] = {"rows": rows, "summary": summary(rows)}
                table.append(row_text(study, arm, r["arms"][arm]["summary"], base, rows))
                progress(study, arm)
            best = min(PRUNING_ARMS, key=lambda a: r["arms"][a]["summary"]["objective"])
            r["without"], r["confirm_arm"] = best, best + "+confirm"
            sampler, pruner = arms()[best]
            rows = [run_arm(study, best + "+confirm", sampler, pruner, seed, budgets[study], eval_seeds,
                            overrides[study], tmp, confirm) for seed in range(args.seeds)]
            r["arms"][best + "+confirm"] = {"rows": rows, "summary": summary(rows)}
            table.append(row_text(study, best + "+confirm", r["arms"][best + "+confirm"]["summary"], base, rows))
            progress(study, best + "+confirm")
    print(emit(final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
