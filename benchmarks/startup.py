"""Start-up and per-trial fixed costs (issue 15): each regsweep shortcut against the way it was done before, in
ONE run, printed with the ratio; nothing is asserted.

1. ``digits``: the digits arrays read from scikit-learn's bundled CSV (``models/datasets.py _digits_arrays``, without
   importing scikit-learn) vs ``sklearn.datasets.load_digits()``, each in a fresh process that has imported torch
   and regsweep's data module first, as a worker has (scikit-learn's import + the read are timed).
2. ``note``: the study note's module (``optuna_internals.dashboard_notes``: optuna-dashboard's ``_note.py`` alone)
   vs ``import optuna_dashboard`` (its app pulls ``optuna.importance``: scikit-learn, SciPy), each in a fresh
   process after ``import optuna``.
3. ``storage``: ``RDBStorage()`` on a new SQLite file, with Optuna's alembic scripts read per use (Optuna alone)
   vs once per process (``optuna_internals.cached_alembic_script``), in this process.
4. ``png``: one trial's curves PNG, a fresh matplotlib figure per trial (as before) vs the reused figure
   (``plots.curves_png``), in this process.
5. ``run``: a whole ``regsweep run`` of one 2-epoch digits trial on SQLite in a fresh process (what a worker or a
   CLI call pays), printed alone: its "before" is the git history's.

    .venv/bin/python benchmarks/startup.py            # ~1 minute on 2 cores (5 repeats, medians)
    .venv/bin/python benchmarks/startup.py --quick    # ~10 s: 1 repeat, no whole run
    .venv/bin/python benchmarks/startup.py --quick --parts note,storage,png   # the tests' cut (~3 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("digits", "note", "storage", "png", "run")

# (what a worker has imported anyway, code timed): torch and numpy come first in every worker, optuna in every run
DIGITS_NEW = ("import torch, numpy, regsweep.models.data", "regsweep.models.datasets._digits_arrays()")
DIGITS_OLD = ("import torch, numpy, regsweep.models.data", "from sklearn.datasets import load_digits; load_digits()")
NOTE_NEW = ("import optuna",
            "from regsweep.search.optuna_internals import dashboard_notes; dashboard_notes().save_note")
NOTE_OLD = ("import optuna", "import optuna_dashboard; optuna_dashboard.save_note")
# the code is timed inside the child (perf_counter around it), after the interpreter is up and the prelude ran
CHILD = "{prelude}; import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"

SPEC = """name: startup
base:
  model: {name: cnn, widths: [8, 16]}
  data: {name: digits, batch_size: 64}
  train: {epochs: 2, num_threads: 1, train_eval_size: 128}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
sampler: {name: random, seed: 0}
pruner: none
budget: {n_trials: 1}
"""


def child_seconds(arm: tuple[str, str]) -> float:
    prelude, code = arm
    out = subprocess.run([sys.executable, "-P", "-c", CHILD.format(prelude=prelude, code=code)],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def storage_arms(repeats: int) -> tuple[float, float]:
    """Seconds of RDBStorage() on a new SQLite file: Optuna's own script reading, then regsweep's cached one."""
    import warnings

    import optuna
    from optuna.storages._rdb.storage import _VersionManager  # a benchmark may look inside Optuna

    from regsweep.search import optuna_internals as internals

    warnings.simplefilter("ignore")
    internals.cached_alembic_script()
    cached = _VersionManager._create_alembic_script
    original = getattr(cached, "original", cached)
    with tempfile.TemporaryDirectory() as tmp:
        n = [0]

        def fresh() -> float:
            n[0] += 1
            return timed(lambda: optuna.storages.RDBStorage(f"sqlite:///{tmp}/s{n[0]}.db"))

        fresh()  # warm-up: SQLAlchemy's and alembic's imports
        _VersionManager._create_alembic_script = original
        try:
            before = median(fresh, repeats)
        finally:
            _VersionManager._create_alembic_script = cached
        after = median(fresh, repeats)
    return before, after


def png_arms(repeats: int) -> tuple[float, float]:
    """Seconds of one curves PNG: a fresh figure per call (curves_png before), then the reused figure."""
    from regsweep.search.plots import curves_png, draw_curves, new_figure

    history = [{"epoch": e, "train_eval_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1) + 0.01 * e,
                "train_acc": 1 - 1 / (e + 2), "val_acc": 1 - 1.1 / (e + 2)} for e in range(20)]

    def fresh(path: str) -> None:
        fig = new_figure(8, 3)
        ax_loss, ax_acc = fig.subplots(1, 2)
        draw_curves(ax_loss, ax_acc, history, 5)
        fig.suptitle("trial 0", fontsize=9)
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.88, wspace=0.25)
        fig.savefig(path, dpi=80)

    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "c.png")
        fresh(png)
        curves_png(png, history, "trial 0", 5)  # warm-up: the reused figure is made
        before = median(lambda: timed(lambda: fresh(png)), repeats)
        after = median(lambda: timed(lambda: curves_png(png, history, "trial 0", 5)), repeats)
    return before, after


def whole_run() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "startup.yaml"
        spec.write_text(SPEC)
        env = dict(os.environ, REGSWEEP_PROGRESS="off")
        return timed(lambda: subprocess.run([sys.executable, "-P", "-m", "regsweep.search.cli", "run", str(spec),
                                             "--storage", f"sqlite:///{tmp}/s.db", "--artifacts", f"{tmp}/a"],
                                            cwd=tmp, env=env, capture_output=True, check=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, no whole run (a few seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {','.join(PARTS)}")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: {unknown[0]!r} is not a part; choose from: {', '.join(PARTS)}")
    arms = {"digits": ("load_digits() in a fresh process", "the CSV read without scikit-learn",
                       lambda: (median(lambda: child_seconds(DIGITS_OLD), repeats),
                                median(lambda: child_seconds(DIGITS_NEW), repeats))),
            "note": ("import optuna_dashboard", "its note module alone",
                     lambda: (median(lambda: child_seconds(NOTE_OLD), repeats),
                              median(lambda: child_seconds(NOTE_NEW), repeats))),
            "storage": ("RDBStorage() on a new SQLite file", "alembic scripts read once",
                        lambda: storage_arms(max(repeats, 3))),
            "png": ("a fresh figure per curves PNG", "the reused figure", lambda: png_arms(max(repeats, 3)))}
    print(f"start-up and per-trial costs (median of {repeats}; seconds; ratio = before / after)")
    print(f"{'part':<8} {'before':>8} {'after':>8} {'ratio':>6}  before -> after")
    for part in (p for p in PARTS if p in parts and p in arms):
        old, new, measure = arms[part]
        before, after = measure()
        print(f"{part:<8} {before:8.3f} {after:8.3f} {before / after:6.1f}  {old} -> {new}")
    if not args.quick and "run" in parts:
        print(f"run      {median(whole_run, min(repeats, 3)):8.2f} s  a whole `regsweep run` of one 2-epoch digits "
              "trial in a fresh process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
