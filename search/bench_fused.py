"""``regsweep bench --only fused`` (issue 20): N trials of one architecture trained as one fused group
(models/fused.py ``fit_fused``) against one trial at a time (``fit``), trials/hour and their ratio, per workload:
the MNIST CNN and the digits CNN at N = 1, 4, 8, 16, 32 and ResNet-20 at N = 4, 8 (full sizes; see search/bench.py
``MODES`` for quick and dry-run), on synthetic data of each one's real shape. Imports neither optuna nor ray.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from regsweep.models.build import build
from regsweep.models.config import TrainConfig
from regsweep.models.data import load
from regsweep.models.train import fit
from regsweep.search.bench import Sizes, study_config, synthetic


def fused_configs(name: str, sizes: Sizes, dev: torch.device) -> tuple[TrainConfig, tuple[int, ...], int]:
    """The base config of a fused arm (synthetic data of its real shape), the group sizes N to time and the
    training images."""
    epochs, n_mnist, ns, ns_resnet, n_cifar = sizes.fused
    if name == "mnist_cnn":
        cfg, _ = study_config("mnist_cnn")
        cfg = synthetic(cfg, [1, 28, 28], n_mnist, max(n_mnist // 6, 10), epochs)
        return (cfg.with_overrides({"model.widths": sizes.mnist_widths}) if sizes.mnist_widths else cfg), ns, n_mnist
    if name == "digits_cnn":  # the demo's CNN on digits-shaped data (1,079 train / 359 val, as the real split)
        cfg, _ = study_config("digits_cnn")
        return synthetic(cfg, [1, 8, 8], 1079, 359, epochs), ns, 1079
    cfg, _ = study_config("cifar10_resnet18")
    cfg = synthetic(cfg, [3, 32, 32], n_cifar, max(n_cifar // 5, 10), epochs)
    over: dict[str, Any] = {"model.name": "resnet20", "model.widths": [16, 32, 64]}
    if dev.type != "cuda":
        over.update({"train.precision": "fp32", "train.channels_last": False})
    return cfg.with_overrides(over), ns_resnet, n_cifar


def measure_fused(sizes: Sizes, dev: torch.device) -> dict[str, Any]:
    """Trials/hour of N trials trained as one fused group (models/fused.py ``fit_fused``, mode ``auto``: loop on
    the CPU, vmap on a GPU) against one trial at a time (``fit``), per workload. The N members differ as a
    regularisation sweep's do (seed, dropout, lr): ``member(i)``. One solo fit and one group of the largest N
    first, as a warm-up (kernels, autotuning); then each timing once. No recording: the models layer only."""
    from regsweep.models.fused import fit_fused

    out: dict[str, Any] = {}
    for name in ("mnist_cnn", "digits_cnn", "resnet20"):
        base, ns, n_train = fused_configs(name, sizes, dev)
        lr = base.optim.lr

        def member(i: int, n: int) -> TrainConfig:
            return base.with_overrides({"train.seed": i, "model.dropout": round(0.05 + 0.4 * i / max(n, 1), 4),
                                        "optim.lr": lr * (0.5 + i / max(n, 1))})

        bundle = load(base.data, dev)  # both arms train from the same loaded data (the load is not timed)

        def solo() -> float:
            t = time.perf_counter()
            fit(member(0, 1), dev, parts=build(member(0, 1), dev, data=bundle))
            return time.perf_counter() - t

        solo()  # warm-up
        fit_fused([member(i, max(ns)) for i in range(max(ns))], dev, data=bundle)
        solo_s = solo()
        one = 3600.0 / solo_s
        rows = {}
        for n in ns:
            t = time.perf_counter()
            fit_fused([member(i, n) for i in range(n)], dev, data=bundle)
            wall = time.perf_counter() - t
            rows[str(n)] = {"wall_s": wall, "trials_per_hour": n * 3600.0 / wall, "ratio": n * 3600.0 / wall / one}
        out[name] = {"epochs": base.train.epochs, "n_train": n_train, "mode": "loop" if dev.type == "cpu" else "vmap",
                     "solo_s": solo_s, "solo_trials_per_hour": one, "n": rows,
                     "best_ratio": max(r["ratio"] for r in rows.values())}
    return out
