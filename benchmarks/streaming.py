"""The same dataset held whole on the device vs streamed through a DataLoader: epoch time ratio.

What is compared, in ONE process, with the same torch threads and settings: ``fit`` on a config with
``data.residency: device`` (the data decoded once and held as normalised tensors; batches by shuffled index)
against the same config with ``data.residency: stream`` (a ``DataLoader`` over the dataset with
``data.num_workers`` persistent workers; each batch decoded in the workers, copied, normalised and augmented
on the device). Both draw the same shuffled batches (``RandomSampler`` on the same seeded generator) from the
same split, so they do the same training arithmetic up to the normalisation statistics' rounding; the report
prints the largest per-epoch ``val_loss`` difference as evidence that the same work was timed.

Workloads: (a) a folder of small PNG files (``image_folder``, 3x32x32, 10 classes, written with Pillow into a
temporary directory) with a small CNN; (b) the same data as tensors first (``stream`` over a TensorDataset:
the DataLoader's own overhead without decoding). Timing: fit's per-epoch ``seconds`` (training plus the
train-eval and validation passes); the first epoch is a warm-up and dropped; the figure is the median of the
rest. Ratio = streamed / device-resident; the issue's goal (streamed within 1.3x) is for a GPU with a
ResNet-18 on 50,000 files and is printed, never asserted.

Run: ``.venv/bin/python benchmarks/streaming.py [--smoke | --tiny | --quick] [--workers N] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regsweep.models.build import build
from regsweep.models.config import TrainConfig
from regsweep.models.train import fit

GOAL = 1.3
# mode -> (PNG files, epochs per run including the warm-up, model widths)
MODES = {"smoke": (40, 2, [4, 8]), "tiny": (200, 2, [8, 16]), "quick": (2000, 3, [16, 32]),
         "full": (10000, 4, [32, 64])}


@dataclass
class Result:
    workload: str
    n: int
    device_s: float
    stream_s: float
    val_loss_diff: float

    @property
    def ratio(self) -> float:
        return self.stream_s / self.device_s


def write_pngs(root: Path, n: int, classes: int = 10, size: int = 32, seed: int = 0) -> Path:
    """``n`` learnable RGB PNG files in ``classes`` class folders (a colour pattern per class plus noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (classes, 4, 4, 3)).repeat(size // 4, 1).repeat(size // 4, 2)
    for i in range(n):
        c = i % classes
        folder = root / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        img = np.clip(protos[c] * 0.7 + rng.normal(0, 30, (size, size, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:06d}.png")
    return root


def config(root: Path, residency: str, epochs: int, widths: list[int], workers: int) -> TrainConfig:
    data = {"name": "image_folder", "root": str(root), "shape": [3, 32, 32]}
    return TrainConfig.from_dict({
        "model": {"name": "cnn", "widths": widths},
        "data": {**data, "residency": residency, "num_workers": workers, "batch_size": 128, "augment": True},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": epochs, "num_threads": None, "train_eval_size": 256},
    })


def timed(cfg: TrainConfig, device: str, data=None) -> tuple[float, list[float]]:
    parts = build(cfg, device, data=data)
    hist = fit(parts.config, device, parts=parts)
    secs = [e["seconds"] for e in hist.epochs[1:]] or [hist.epochs[0]["seconds"]]
    return statistics.median(secs), [e["val_loss"] for e in hist.epochs]


def run(mode: str, workers: int, device: str) -> list[Result]:
    n, epochs, widths = MODES[mode]
    out = []
    with tempfile.TemporaryDirectory(prefix="regsweep-stream-") as tmp:
        root = write_pngs(Path(tmp) / "imgs", n)
        dev_cfg = config(root, "device", epochs, widths, workers)
        d_s, d_loss = timed(dev_cfg, device)
        s_s, s_loss = timed(config(root, "stream", epochs, widths, workers), device)
        out.append(Result(f"png folder, {workers} workers", n, d_s, s_s,
                          max(abs(a - b) for a, b in zip(d_loss, s_loss))))
        # the same decoded tensors streamed from a TensorDataset: DataLoader overhead without decoding
        from regsweep.models import data as data_mod

        raw = data_mod.materialize(data_mod.open_dataset(dev_cfg.data), dev_cfg.data)
        tensor_cfg = dev_cfg.data
        d2, l2 = timed(dev_cfg, device, data_mod.load(tensor_cfg, device, opened=raw))
        stream_data = data_mod.load(config(root, "stream", epochs, widths, workers).data, device,
                                    opened=raw)
        s2, m2 = timed(config(root, "stream", epochs, widths, workers), device, stream_data)
        out.append(Result(f"tensors, {workers} workers", n, d2, s2, max(abs(a - b) for a, b in zip(l2, m2))))
    return out


def format_report(results: list[Result], mode: str, device: str) -> str:
    lines = [f"streaming benchmark ({mode}, {device}): median epoch seconds after a warm-up epoch; "
             f"ratio = streamed / device-resident (goal on a GPU: <= {GOAL}, never asserted)",
             f"{'workload':<28}{'files':>7}{'device s':>10}{'stream s':>10}{'ratio':>8}{'|dval_loss|':>13}"]
    for r in results:
        lines.append(f"{r.workload:<28}{r.n:>7}{r.device_s:>10.3f}{r.stream_s:>10.3f}{r.ratio:>8.2f}"
                     f"{r.val_loss_diff:>13.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--tiny", action="store_true")
    g.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "tiny" if args.tiny else "quick" if args.quick else "full"
    t0 = time.perf_counter()
    results = run(mode, args.workers, args.device)
    print(format_report(results, mode, args.device))
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
