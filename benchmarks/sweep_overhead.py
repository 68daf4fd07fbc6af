"""regsweep's sweep vs a plain Optuna loop over the same trials, in one process.

Both arms use the same spec (studies/digits_cnn.yaml by default): the same base config, the same space
sampled by the same seeded TPE, the same pruner, a fresh SQLite file each. The baseline's objective calls
``regsweep.models.train.fit`` with a raw ``trial.report`` / ``trial.should_prune`` callback — no history attr, no
stop reasons, no spec hash, no data cache. regsweep's arm is ``regsweep.search.backends.optuna_backend.run``, which
records everything the Recording contract asks for. Goal: regsweep <= 1.2x the baseline's wall time.

    .venv/bin/python benchmarks/sweep_overhead.py [--quick] [--spec studies/digits_cnn.yaml]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plain_optuna(spec, url: str, n_trials: int) -> tuple[float, int, int]:
    import optuna

    from regsweep.models.train import fit

    study = optuna.create_study(storage=url, study_name=spec.name, direction=spec.objective.direction,
                                sampler=spec.make_sampler(), pruner=spec.make_pruner())
    study.enqueue_trial({}, user_attrs={"regsweep:base": True})
    base = spec.base.to_dict()
    epochs = 0

    def objective(trial):
        nonlocal epochs
        cfg = spec.base if trial.user_attrs.get("regsweep:base") else \
            spec.base.with_overrides(spec.space.sample(trial, base))

        def report(epoch, record):
            trial.report(record[spec.objective.metric], epoch)
            return "pruned" if trial.should_prune() else None

        hist = fit(cfg, "cpu", report=report)
        epochs += len(hist.epochs)
        if hist.stop_reason == "pruned":
            raise optuna.TrialPruned()
        return min(spec.objective.sign * e[spec.objective.metric] for e in hist.epochs) * spec.objective.sign

    t0 = time.perf_counter()
    study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(
        n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))])
    pruned = len(study.get_trials(states=(optuna.trial.TrialState.PRUNED,)))
    return time.perf_counter() - t0, epochs, pruned


def regsweep_run(spec, url: str, n_trials: int, artifacts: str | None = None) -> tuple[float, int, int]:
    """regsweep's loop; artifacts on by default (a SQLite study keeps them beside the database file)."""
    from optuna.trial import TrialState

    from regsweep.search.backends.optuna_backend import run
    from regsweep.search.record import n_epochs

    t0 = time.perf_counter()
    result = run(spec, url, spec.name, n_trials=n_trials, device="cpu", artifacts=artifacts, out=io.StringIO())
    seconds = time.perf_counter() - t0
    trials = result.study.get_trials()
    epochs = sum(n_epochs(t) for t in trials)
    return seconds, epochs, sum(t.state == TrialState.PRUNED for t in trials)


def main(argv: list[str] | None = None) -> int:
    import optuna

    from regsweep.search.spec import load_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "studies" / "digits_cnn.yaml"))
    p.add_argument("--quick", action="store_true", help="8 trials of at most 5 epochs")
    p.add_argument("--tiny", action="store_true", help="3 trials of 2 epochs on a tiny CNN (a smoke test)")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(args.spec)
    n_trials = spec.n_trials
    if args.quick or args.tiny:
        n_trials = 3 if args.tiny else 8
        over = {"train.epochs": 2 if args.tiny else 5}
        if args.tiny:
            over["model.widths"] = [8, 16]
        spec.base = spec.base.with_overrides(over)
    from regsweep.models.train import fit

    fit(spec.base.with_overrides({"train.epochs": 1}), "cpu")  # warm-up: imports, first-step costs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm, fn in (("plain optuna", plain_optuna), ("regsweep", regsweep_run),
                        ("no artifacts", lambda *a: regsweep_run(*a, artifacts="off"))):
            seconds, epochs, pruned = fn(spec, f"sqlite:///{tmp}/{arm.replace(' ', '_')}.db", n_trials)
            rows.append((arm, seconds, epochs, pruned))
    print(f"{'arm':<14}{'trials':>7}{'pruned':>7}{'epochs':>7}{'seconds':>9}{'s/epoch':>9}")
    for arm, seconds, epochs, pruned in rows:
        print(f"{arm:<14}{n_trials:>7}{pruned:>7}{epochs:>7}{seconds:>9.2f}{seconds / max(epochs, 1):>9.4f}")
    (_, base_s, base_e, _), (_, ours_s, ours_e, _), (_, bare_s, bare_e, _) = rows
    print(f"ratio regsweep / plain optuna: wall {ours_s / base_s:.3f}x, per epoch "
          f"{(ours_s / max(ours_e, 1)) / (base_s / max(base_e, 1)):.3f}x (goal <= 1.2x wall)")
    print(f"ratio regsweep without artifacts / plain optuna: wall {bare_s / base_s:.3f}x, per epoch "
          f"{(bare_s / max(bare_e, 1)) / (base_s / max(base_e, 1)):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
