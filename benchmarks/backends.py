"""The Optuna backend vs the Ray Tune backend on the same budget, in one process.

Both arms run the same spec (studies/digits_cnn.yaml by default: the same base config, space, seeded sampler
and pruner) into a fresh SQLite file each, on the CPU. The Optuna arm is ``regsweep run`` (one in-process
worker); the Ray arm is ``regsweep run --backend ray`` on a local Ray with every core (one CPU per trial,
the scheduler from the spec's ``ray:`` section, else fifo, so both arms prune by the same rule). Ray's start
is timed apart and is not in the Ray arm's wall time. Prints wall time, trials per hour, epochs trained and the
ratios ray / optuna.

    .venv/bin/python benchmarks/backends.py [--quick | --tiny] [--spec studies/digits_cnn.yaml] [--scheduler asha]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODES = {"full": (None, None), "quick": (10, 5), "tiny": (4, 2)}  # (n_trials, epochs); None: the spec's


def _arm_result(study, seconds: float) -> dict:
    from optuna.trial import TrialState

    from regsweep.search.record import history

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return {"seconds": seconds, "trials": len(done), "pruned": sum(t.state == TrialState.PRUNED for t in done),
            "epochs": sum(len(history(t)) for t in trials),
            "best": min((t.value for t in done if t.state == TrialState.COMPLETE), default=float("nan"))}


def optuna_arm(spec, url: str, n_trials: int) -> dict:
    from regsweep.search.backends.optuna_backend import run

    t0 = time.perf_counter()
    result = run(spec, url, spec.name, n_trials=n_trials, device="cpu", out=io.StringIO())
    return _arm_result(result.study, time.perf_counter() - t0)


def ray_arm(spec, url: str, n_trials: int, scheduler, results: str) -> tuple[dict, float]:
    from regsweep.search.backends.ray import run as ray_backend

    t0 = time.perf_counter()
    ray_backend.init_ray(url, num_cpus=os.cpu_count() or 1)
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = ray_backend.run(spec, url, spec.name, n_trials=n_trials, device="cpu", scheduler=scheduler,
                             storage_path=results, out=io.StringIO())
    return _arm_result(result.study, time.perf_counter() - t0), started


def main(argv: list[str] | None = None) -> int:
    import optuna

    from regsweep.search.spec import load_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "studies" / "digits_cnn.yaml"))
    p.add_argument("--quick", action="store_true", help="10 trials of at most 5 epochs")
    p.add_argument("--tiny", action="store_true", help="4 trials of 2 epochs on a tiny CNN (a smoke test)")
    p.add_argument("--scheduler", default=None, help="the Ray arm's scheduler (default: the spec's, else fifo)")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(args.spec)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    n_trials, epochs = MODES[mode]
    n_trials = n_trials or spec.n_trials
    if epochs is not None:
        over = {"train.epochs": epochs}
        if args.tiny:
            over["model.widths"] = [8, 16]
        spec.base = spec.base.with_overrides(over)
    from regsweep.models.train import fit

    fit(spec.base.with_overrides({"train.epochs": 1}), "cpu")  # warm-up: imports, first-step costs
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["optuna"] = optuna_arm(spec, f"sqlite:///{tmp}/optuna.db", n_trials)
        rows["ray"], ray_start = ray_arm(spec, f"sqlite:///{tmp}/ray.db", n_trials, args.scheduler, f"{tmp}/ray")
        import ray

        ray.shutdown()
    print(f"{n_trials} trials of at most {spec.base.train.epochs} epochs ({spec.name}, {mode}), CPU, "
          f"{os.cpu_count()} cores; ray: {os.cpu_count()} trials at a time, started in {ray_start:.1f}s (not counted)")
    print(f"{'backend':<8}{'trials':>7}{'pruned':>7}{'epochs':>7}{'wall s':>9}{'trials/h':>10}{'epochs/h':>10}"
          f"{'best':>9}")
    for name, r in rows.items():
        print(f"{name:<8}{r['trials']:>7}{r['pruned']:>7}{r['epochs']:>7}{r['seconds']:>9.1f}"
              f"{3600 * r['trials'] / r['seconds']:>10.0f}{3600 * r['epochs'] / r['seconds']:>10.0f}{r['best']:>9.4f}")
    o, r = rows["optuna"], rows["ray"]
    print(f"ratio ray / optuna: wall {r['seconds'] / o['seconds']:.2f}x, trials/hour "
          f"{(r['trials'] / r['seconds']) / (o['trials'] / o['seconds']):.2f}x, "
          f"epochs {r['epochs'] / max(o['epochs'], 1):.2f}x, "
          f"per epoch {(r['seconds'] / max(r['epochs'], 1)) / (o['seconds'] / max(o['epochs'], 1)):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
