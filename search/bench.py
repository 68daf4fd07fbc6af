"""``regsweep bench``: how fast one trial trains on a device, and how many trials per hour the device gives.

Per model shape, in ONE process, on synthetic data of the real shapes (no dataset files needed):

- ``mnist_cnn``: the CNN, optimizer and batch size of ``studies/mnist_cnn.yaml`` on 1x28x28 images,
  60,000 train / 10,000 validation;
- ``resnet18``: ``studies/cifar10_resnet18.yaml`` (ResNet-18, batch 512, augmentation, bf16 autocast +
  channels_last on CUDA; fp32 on the CPU) on 3x32x32 images, 50,000 / 10,000.

Two ways to train each, both timed as wall time between consecutive epoch ends, the first (warm-up) epoch
dropped, median of the rest:

(a) **seeds**: the seed scripts' loop: ``DataLoader(TensorDataset(host tensors), batch_size=64,
    shuffle=True)``, fp32, a host->device copy of every batch, ``loss.item()`` every step, a validation pass
    per epoch, torch's default settings (no TF32 matmuls, no cudnn.benchmark), no augmentation;
(b) **fit**: ``regsweep.models.train.fit`` with the study's own config: data loaded onto the device once, batches
    by index there, the validation and train-eval passes, and every epoch recorded through
    ``regsweep.search.record.Recorder`` into an in-memory sink (the trial's recording path minus the database: each
    write is JSON-serialised, as a storage would).

Printed per workload: epoch seconds, images/s (training images per second of epoch), the speedup (a)/(b);
for ResNet-18 the achieved TFLOP/s of fit: FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``
on one real training step (forward AND backward counted, not forward x 3) plus the forward FLOPs of the
validation and train-eval passes, divided by the epoch seconds. Then **packing**: K = 1, 2, 4 worker
processes (``python -m regsweep.search.bench --pack-worker``), each loading the mnist_cnn data onto the device once and
warming up, then started together to run the same number of short recorded fits; trials/hour =
K x trials / (last end - first start). On the CPU each process gets ``cores // K`` threads.

Imports neither optuna nor ray: a bare GPU host runs it from the source tree with
``python -m regsweep.search.bench --device cuda`` (``benchmarks/gpu_check.sh``). Timings are printed
(and saved with ``--json``), never asserted; the targets of issue 11 are printed for full-size runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from regsweep.models.build import build, make_model, resolve_device
from regsweep.models.config import ConfigError, TrainConfig, load_yaml_file
from regsweep.models.data import DataBundle, load
from regsweep.models.train import configure_torch, fit, set_tf32
from regsweep.search.bench_report import PACK_K, device_name, format_report, plan
from regsweep.search.record import Objective, Recorder

ROOT = Path(__file__).resolve().parents[1]  # the regsweep package (its folder holds studies/)
STUDIES = ROOT / "studies"
WORKLOADS = ("mnist_cnn", "resnet18", "packing", "fused")
SEEDS_BATCH = 64


@dataclass(frozen=True)
class Sizes:
    mnist: tuple[int, int]  # (train, val) images
    mnist_widths: Optional[list[int]]  # None: the study's CNN
    cifar: tuple[int, int]
    resnet_widths: Optional[list[int]]  # None: ResNet-18's own (64, 128, 256, 512)
    resnet_batch: Optional[int]  # None: the study's (512)
    seeds_epochs: int  # measured epochs after one warm-up epoch
    fit_epochs: int
    pack: tuple[int, int, int]  # (trials per process, epochs per trial, train images)
    # fused arms: (epochs per trial, mnist train images, N of the CNNs, N of ResNet-20, ResNet-20 train images)
    fused: tuple[int, int, tuple[int, ...], tuple[int, ...], int] = (1, 128, (1, 2), (2,), 64)
    pack_k: tuple[int, ...] = PACK_K  # the packing rounds' K (processes side by side)


MODES = {
    "full": Sizes((60000, 10000), None, (50000, 10000), None, None, 2, 3, (3, 2, 60000),
                  (2, 60000, (1, 4, 8, 16, 32), (4, 8), 50000)),
    "quick": Sizes((4000, 1000), None, (2048, 512), [16, 32, 64, 128], None, 2, 2, (2, 1, 2000),
                   (1, 2000, (1, 4, 8), (4,), 1024)),
    "dry-run": Sizes((128, 32), [4, 8], (64, 32), [4, 8, 16, 32], 32, 1, 1, (1, 1, 128),
                     (1, 128, (1, 2), (2,), 64), (1, 2)),  # K = 1, 2: the code path, two processes fewer to start
}


# ------------------------------------------------------------------------------------------ configs
def study_config(study: str) -> tuple[TrainConfig, Objective]:
    """The base TrainConfig and objective of ``studies/<study>.yaml`` (read without optuna)."""
    path = STUDIES / f"{study}.yaml"
    spec = load_yaml_file(path)
    base = spec["base"]
    cfg = TrainConfig.load(path.parent / base) if isinstance(base, str) else TrainConfig.from_dict(base, str(path))
    return cfg, Objective(**spec.get("objective", {}))


def synthetic(cfg: TrainConfig, shape: list[int], n_train: int, n_val: int, epochs: int) -> TrainConfig:
    """``cfg`` on synthetic data of ``shape``: exactly n_train/n_val images, no test split, every epoch run."""
    n = n_train + n_val
    return cfg.with_overrides({
        "data.name": "synthetic", "data.root": None, "data.download": False, "data.shape": shape,
        "data.n_samples": n, "data.num_classes": 10, "data.val_fraction": n_val / n, "data.test_fraction": 0.0,
        "data.label_noise": 0.0, "train.epochs": epochs, "train.early_stopping.patience": None})


def workload_config(name: str, sizes: Sizes, dev: torch.device) -> tuple[TrainConfig, Objective]:
    epochs = 1 + sizes.fit_epochs
    if name == "mnist_cnn":
        cfg, objective = study_config("mnist_cnn")
        cfg = synthetic(cfg, [1, 28, 28], *sizes.mnist, epochs)
        return (cfg.with_overrides({"model.widths": sizes.mnist_widths}) if sizes.mnist_widths else cfg), objective
    cfg, objective = study_config("cifar10_resnet18")
    cfg = synthetic(cfg, [3, 32, 32], *sizes.cifar, epochs)
    over: dict[str, Any] = {}
    if sizes.resnet_widths:
        over["model.widths"] = sizes.resnet_widths
    if sizes.resnet_batch:
        over["data.batch_size"] = sizes.resnet_batch
    if dev.type != "cuda":  # bf16 autocast and channels_last are GPU settings
        over.update({"train.precision": "fp32", "train.channels_last": False})
    return (cfg.with_overrides(over) if over else cfg), objective


# ------------------------------------------------------------------------------------------ the two ways
def torch_defaults(dev: torch.device) -> None:
    """torch's out-of-the-box settings, as the seed scripts ran (process-wide)."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = False
    if dev.type == "cuda":
        set_tf32(False)


def _seeds_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def run_seeds(cfg: TrainConfig, host: DataBundle, dev: torch.device, epochs: int) -> list[float]:
    """The seeds' loop on host tensors; returns the epoch-end timestamps."""
    from torch.utils.data import DataLoader, TensorDataset

    torch_defaults(dev)
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg, host.in_shape, host.num_classes).to(dev)
    opt = _seeds_optimizer(model, cfg)
    train = DataLoader(TensorDataset(host.train.x, host.train.y), batch_size=SEEDS_BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(cfg.train.seed))
    val = DataLoader(TensorDataset(host.val.x, host.val.y), batch_size=1000)
    stamps = []
    for _ in range(epochs):
        model.train()
        running = 0.0
        for x, y in train:
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item() * x.shape[0]
        model.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for x, y in val:
                x, y = x.to(dev), y.to(dev)
                out = model(x)
                total += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
        stamps.append(time.perf_counter())
    return stamps


class MemorySink:
    """A ``regsweep.search.record`` sink that keeps what a storage would get, JSON-serialised as a storage does."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}
        self.reports: list[tuple[float, int]] = []
        self.writes = 0

    def write(self, attrs: dict[str, Any], report: Optional[tuple[float, int]] = None) -> None:
        self.attrs.update(json.loads(json.dumps(attrs)))
        if report is not None:
            self.reports.append(report)
        self.writes += 1


def run_fit(cfg: TrainConfig, objective: Objective, bundle: DataBundle, dev: torch.device) -> list[float]:
    """``fit`` recorded through Recorder into a MemorySink; returns the epoch-end timestamps."""
    stamps: list[float] = []
    recorder = Recorder(MemorySink(), objective)
    recorder.start(cfg.to_dict())

    def report(epoch: int, record: dict[str, Any]) -> Optional[str]:
        verdict = recorder.on_epoch(epoch, record)
        stamps.append(time.perf_counter())
        return verdict

    hist = fit(cfg, dev, report=report, parts=build(cfg, dev, data=bundle))
    recorder.finish(hist)
    if len(hist.epochs) != cfg.train.epochs:
        raise RuntimeError(f"fit stopped early ({hist.stop_reason}); the benchmark needs every epoch")
    return stamps


def epoch_seconds(stamps: list[float]) -> float:
    """Median time between consecutive epoch ends: the first epoch (warm-up) has no left stamp."""
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def count_flops(cfg: TrainConfig, bundle: DataBundle, dev: torch.device, n: int = 8) -> tuple[float, float]:
    """(training FLOPs per image: forward + backward as counted, forward FLOPs per image) of cfg's model."""
    from torch.utils.flop_counter import FlopCounterMode

    from regsweep.models.train import autocast

    parts = build(cfg, dev, data=bundle)
    x, y = bundle.train.x[:n], bundle.train.y[:n]
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model = parts.model.train()
    with FlopCounterMode(display=False) as train_count:
        with autocast(dev, cfg.train.precision):
            loss = parts.loss_fn(model(x), y)
        loss.backward()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd_count, autocast(dev, cfg.train.precision):
        model(x)
    return train_count.get_total_flops() / len(y), fwd_count.get_total_flops() / len(y)


def measure_workload(name: str, sizes: Sizes, dev: torch.device) -> dict[str, Any]:
    cfg, objective = workload_config(name, sizes, dev)
    host = load(cfg.data)  # host tensors for the seeds' way; fit's copy goes to the device once
    on_dev = host.to(dev)
    n_train, n_val = len(host.train), len(host.val)
    seeds_s = epoch_seconds(run_seeds(cfg, host, dev, 1 + sizes.seeds_epochs))
    fit_s = epoch_seconds(run_fit(cfg, objective, on_dev, dev))
    out: dict[str, Any] = {
        "model": cfg.model.name, "widths": cfg.model.widths, "shape": cfg.data.shape, "n_train": n_train,
        "n_val": n_val, "batch": cfg.data.batch_size, "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last, "augment": cfg.data.augment,
        "deterministic": cfg.train.deterministic,
        "seeds": {"batch": SEEDS_BATCH, "epoch_s": seeds_s, "images_per_s": n_train / seeds_s},
        "fit": {"batch": cfg.data.batch_size, "epoch_s": fit_s, "images_per_s": n_train / fit_s},
        "speedup": seeds_s / fit_s}
    if name == "resnet18":
        train_flops, fwd_flops = count_flops(cfg, on_dev, dev)
        evaluated = n_val + min(cfg.train.train_eval_size, n_train)
        epoch_flops = train_flops * n_train + fwd_flops * evaluated
        out["flops"] = {"train_per_image": train_flops, "forward_per_image": fwd_flops,
                        "per_epoch": epoch_flops, "tflops": epoch_flops / fit_s / 1e12}
    del on_dev, host
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------ packing
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _send(proc: subprocess.Popen, msg: dict[str, Any]) -> None:
    proc.stdin.write(json.dumps(msg) + "\n")
    proc.stdin.flush()


def _receive(proc: subprocess.Popen, log: Path) -> dict[str, Any]:
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"pack worker exited with {proc.returncode}:\n{tail}")
    return json.loads(line)


def measure_packing(sizes: Sizes, dev: torch.device) -> dict[str, Any]:
    """trials/hour with K processes side by side: one pool of max(K) processes, K of them started per round."""
    trials, epochs, n_train = sizes.pack
    ks = sizes.pack_k
    cfg, objective = workload_config("mnist_cnn", sizes, dev)
    cfg = synthetic(cfg, [1, 28, 28], n_train, max(n_train // 6, 10), epochs)
    job = {"config": cfg.to_dict(), "objective": vars(objective), "device": str(dev), "trials": trials}
    import regsweep  # the pack workers import the same regsweep as this process (installed, or gpu_check.sh's link)

    home = str(Path(regsweep.__path__[0]).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")])))
    cores = _cores()
    rounds: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="regsweep-bench-") as tmp:
        logs = [Path(tmp) / f"worker{i}.log" for i in range(max(ks))]
        procs = []
        try:
            for log in logs:
                with open(log, "w") as err:
                    cmd = [sys.executable, "-P", "-m", "regsweep.search.bench", "--pack-worker"]
                    procs.append(subprocess.Popen(cmd, cwd=tmp,
                                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                  stderr=err, text=True))
            for proc in procs:
                _send(proc, job)
            for proc, log in zip(procs, logs):
                _receive(proc, log)  # ready: data on the device, one warm-up fit done
            for k in ks:
                threads = max(1, cores // k) if dev.type == "cpu" else None
                for proc in procs[:k]:
                    _send(proc, {"go": True, "threads": threads})
                done = [_receive(proc, log) for proc, log in zip(procs[:k], logs)]
                wall = max(d["t1"] for d in done) - min(d["t0"] for d in done)
                rounds[str(k)] = {"processes": k, "threads": threads, "trials": k * trials, "wall_s": wall,
                                  "trials_per_hour": k * trials * 3600.0 / wall,
                                  "trial_s": statistics.median(s for d in done for s in d["trial_s"])}
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.stdin.close()
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    one = rounds[str(ks[0])]["trials_per_hour"]
    return {"workload": "mnist_cnn", "trials_per_process": trials, "epochs": epochs, "n_train": n_train,
            "cores": cores, "k": rounds, "ratio": {k: r["trials_per_hour"] / one for k, r in rounds.items()}}


def pack_worker() -> int:
    """One packed process: read the job, load the data onto the device once, warm up, say ready; on each
    ``go`` run the trials (recorded fits with seeds 0, 1, ...) and print their start/end times."""
    job = json.loads(sys.stdin.readline())
    dev = resolve_device(job["device"])
    cfg = TrainConfig.from_dict(job["config"])
    objective = Objective(**job["objective"])
    bundle = load(cfg.data, dev)
    run_fit(cfg.with_overrides({"train.epochs": 1}), objective, bundle, dev)  # warm-up: context, kernels
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        threads = msg.get("threads")
        if threads:
            torch.set_num_threads(threads)
        run_cfg = cfg.with_overrides({"train.num_threads": threads}) if threads else cfg
        t0, trial_s = time.time(), []
        for seed in range(job["trials"]):
            t = time.perf_counter()
            run_fit(run_cfg.with_overrides({"train.seed": seed}), objective, bundle, dev)
            trial_s.append(time.perf_counter() - t)
        print(json.dumps({"t0": t0, "t1": time.time(), "trial_s": trial_s}), flush=True)
    return 0


def run(device: Optional[str] = None, mode: str = "full", json_path: Optional[str] = None,
        only: tuple[str, ...] = WORKLOADS) -> dict[str, Any]:
    """Measure, print the report, optionally save the figures as JSON; returns them."""
    dev = resolve_device(device)
    sizes = MODES[mode]
    print(plan(mode, sizes, dev, only, _cores()), flush=True)
    figures: dict[str, Any] = {"device": str(dev), "device_name": device_name(dev), "torch": str(torch.__version__),
                               "python": platform.python_version(), "threads": torch.get_num_threads(),
                               "mode": mode}
    for name in ("mnist_cnn", "resnet18"):
        if name in only:
            figures[name] = measure_workload(name, sizes, dev)
            print(f"  {name} done", flush=True)
    if "packing" in only:
        figures["packing"] = measure_packing(sizes, dev)
    if "fused" in only:
        from regsweep.search.bench_fused import measure_fused

        figures["fused"] = measure_fused(sizes, dev)
        print("  fused done", flush=True)
    configure_torch(TrainConfig(), dev)  # leave the process as fit would
    print(format_report(figures), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(f"figures saved to {json_path}", flush=True)
    return figures


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``regsweep bench`` and ``python -m regsweep.search.bench``."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (minutes on a 2-core CPU)")
    size.add_argument("--dry-run", action="store_true",
                      help="print the plan and run the smallest version of every measurement (seconds)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures to FILE")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of: {', '.join(WORKLOADS)} (default: all)")


def run_args(args: argparse.Namespace) -> int:
    only = tuple(w.strip() for w in args.only.split(",") if w.strip())
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown or not only:
        raise ConfigError(f"--only: {args.only!r} is not allowed; choose from: {', '.join(WORKLOADS)}")
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    run(args.device, mode, args.json, only)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m regsweep.search.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--pack-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pack_worker:
        return pack_worker()
    try:
        return run_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
