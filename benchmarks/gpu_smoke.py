"""One-shot check that models/ trains on a CUDA device with the torch found there (no search code).

Runs from the source tree with only torch, torchvision, numpy, scikit-learn and PyYAML (what a bare GPU host
has):  .venv/bin/python benchmarks/gpu_smoke.py [--device cuda] [--quick]
Prints the device, torch version, and per workload the epoch seconds and final validation accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    import torch

    from regsweep.models.config import TrainConfig
    from regsweep.models.train import fit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU dry run)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)
    n = 600 if args.quick else 20000
    workloads = {
        "digits cnn (base config)": TrainConfig.load(ROOT / "studies/base/digits_cnn.yaml").with_overrides(
            {"train.epochs": 2 if args.quick else 15, "train.num_threads": None}),
        "resnet18 synthetic 3x32x32 bf16 channels_last": TrainConfig.from_dict({
            "model": {"name": "resnet18", "bn": "before_act", "init": "kaiming_normal",
                      **({"widths": [8, 16, 32, 64]} if args.quick else {})},
            "data": {"name": "synthetic", "shape": [3, 32, 32], "n_samples": n, "batch_size": 512, "augment": True},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "scheduler": {"name": "onecycle"},
            "train": {"epochs": 3, "precision": "bf16" if dev.type == "cuda" else "fp32",
                      "channels_last": dev.type == "cuda", "deterministic": False}}),
        "resnet20 mixup+cutmix+noise+label smoothing": TrainConfig.from_dict({
            "model": {"name": "resnet20", "bn": "after_act", "dropout": 0.1},
            "data": {"name": "synthetic", "shape": [3, 32, 32], "n_samples": n, "batch_size": 256, "augment": True},
            "regularization": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_prob": 0.5, "input_noise_std": 0.05,
                               "label_smoothing": 0.1, "l1": 1e-6, "l2": 1e-5},
            "scheduler": {"name": "warmup_cosine"},
            "train": {"epochs": 2, "deterministic": False}}),
    }
    for label, cfg in workloads.items():
        hist = fit(cfg, device=dev)
        secs = [e["seconds"] for e in hist.epochs]
        later = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
        print(f"{label}: {len(secs)} epochs, first {secs[0]:.3f}s, median after {later:.3f}s, "
              f"best val_acc {max(e['val_acc'] for e in hist.epochs):.4f}, {hist.stop_reason}, "
              f"{hist.n_params} params, {hist.device}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
