"""``fit(cfg, device=None, report=None) -> History``: train one configuration and record every epoch.

Per epoch the history holds: epoch (from 0), train_loss (the regularised training objective as optimised:
noise/mixup/label smoothing/penalty included, batch-mean), train_eval_loss and train_acc (eval mode, clean,
on a fixed training subset), val_loss, val_acc, lr (at the epoch's start) and seconds.

Stopping: ``early_stopping`` as Keras' EarlyStopping (monitor, patience, min_delta, restore_best);
``report(epoch, record)`` may return a truthy value (a stop-reason string) to stop after that epoch; a
non-finite loss stops with ``failed:...``. Stop reasons: ``completed``, ``early_stopped``, whatever
``report`` returned, ``failed:<error>``.

Resuming: ``train(..., checkpoint=fn)`` hands ``fn`` the training state at the end of every epoch after which
training goes on, and ``train(..., state=that_state)`` resumes from it, giving exactly the later epochs of the
uninterrupted run (the Ray backend's HyperBand pauses and resumes trials this way).

Run as ``python -m regsweep.models.train CONFIG.yaml [--device cpu|cuda] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from regsweep.models.build import Parts, build, check_model, load_config, make_model, resolve_device
from regsweep.models.config import MONITORS, ConfigError, TrainConfig
from regsweep.models.data import BatchLoader
from regsweep.models.plugins import add_search_path

Report = Callable[[int, dict[str, Any]], Any]
Checkpoint = Callable[[dict[str, Any]], None]  # called with train()'s state at the end of an epoch
HISTORY_KEYS = ("epoch", "train_loss", "train_eval_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: Optional[int] = None  # by train.early_stopping.monitor
    stop_reason: str = "completed"
    n_params: int = 0
    device: str = "cpu"
    seed: int = 0
    num_threads: int = 1
    split_fingerprint: str = ""
    test: dict[str, float] = field(default_factory=dict)  # final weights on the test split; chooses nothing
    torch_version: str = field(default_factory=lambda: str(torch.__version__))
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metric(self, name: str, epoch: Optional[int] = None) -> float:
        ep = self.best_epoch if epoch is None else epoch
        return self.epochs[ep][name]


def configure_torch(cfg: TrainConfig, device: torch.device) -> int:
    """Threads and determinism from the config (process-wide, as torch has them). Returns the threads.

    On CUDA, fp32 matmuls and convolutions may use TF32 tensor cores (``train.precision: fp32`` means
    fp32/TF32 there), and cuDNN picks its fastest kernels (``cudnn.benchmark``) unless ``train.deterministic``.
    Nothing here changes the CPU's arithmetic."""
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = cfg.train.deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.train.deterministic
    if device.type == "cuda":
        set_tf32(True)
    return torch.get_num_threads()


def set_tf32(on: bool) -> None:
    """TF32 for fp32 matmuls (cuDNN convolutions use it by default). Process-wide; call it for CUDA only.
    Uses ``set_float32_matmul_precision``, the API every torch >= 1.12 has and inductor reads."""
    torch.set_float32_matmul_precision("high" if on else "highest")


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` on ``device`` (none for fp32); also used by search/bench.py."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, precision: str = "fp32",
             channels_last: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode, with one host sync at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=loader.device, dtype=torch.float64)
    correct = torch.zeros((), device=loader.device, dtype=torch.int64)
    n = 0
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(loader.device, precision):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
    return float(loss_sum) / max(n, 1), int(correct) / max(n, 1)


def fit(cfg: TrainConfig, device: str | torch.device | None = None, report: Optional[Report] = None,
        parts: Optional[Parts] = None, state: Optional[dict[str, Any]] = None,
        checkpoint: Optional[Checkpoint] = None) -> History:
    """Train ``cfg``; return its History. The model (best weights if restore_best) stays in ``parts``
    when given, so callers can save it; see :func:`train` for the variant returning both (and for
    ``state``/``checkpoint``: resuming exactly)."""
    return train(cfg, device, report, parts, state=state, checkpoint=checkpoint)[1]


def _generators(parts: Parts, loader: BatchLoader) -> dict[str, torch.Generator]:
    """Every generator of the training loop that is not the global RNG: the shuffle, the augmentation's and
    the batch regulariser's (when it has its own; mixup/cutmix/noise draw from the global RNG)."""
    gens = {"loader": loader.generator}
    aug = getattr(loader.transform, "gen", None)
    if isinstance(aug, torch.Generator):
        gens["augment"] = aug
    reg = getattr(parts.regularize_batch, "generator", None)
    if isinstance(reg, torch.Generator):
        gens["batch_regularizer"] = reg
    return gens


def train(cfg: TrainConfig, device: str | torch.device | None = None, report: Optional[Report] = None,
          parts: Optional[Parts] = None, *, state: Optional[dict[str, Any]] = None,
          checkpoint: Optional[Checkpoint] = None) -> tuple[Parts, History]:
    """Train ``cfg``; return (parts, History).

    ``checkpoint(state)``, when given, is called at the end of every epoch after which training goes on (after
    ``report`` and the early-stopping bookkeeping) with the training state: a plain dict of tensors and Python
    values (``torch.save`` it; ``torch.load(weights_only=True)`` reads it back). ``state`` resumes from such a
    dict: the later epochs are exactly those of an uninterrupted run (same config, device type and threads),
    since it holds everything that decides them: weights, optimizer, LR schedule, GradScaler, every generator
    of the loop (shuffle, augmentation, batch regulariser), the global CPU RNG (dropout, mixup/cutmix, noise)
    and the CUDA one, and the early-stopping bookkeeping and history so far. It must come from the same
    config (and ``parts`` built from it, or none). Long because it is the one epoch loop (batches, evaluation,
    report, early stopping, checkpoint) whose order of steps and RNG draws exact replay and resume depend on."""
    dev = resolve_device(device) if parts is None else parts.device
    threads = configure_torch(cfg, dev)
    parts = parts if parts is not None else build(cfg, dev)
    model, opt, sched = parts.model, parts.optimizer, parts.scheduler
    tcfg, es = cfg.train, cfg.train.early_stopping
    sign = MONITORS[es.monitor]  # +1: lower is better
    hist = History(n_params=sum(p.numel() for p in model.parameters()), device=str(dev), seed=tcfg.seed,
                   num_threads=threads, split_fingerprint=parts.data.fingerprint)
    net = compile_model(model) if tcfg.compile else model
    scaler = torch.amp.GradScaler(dev.type, enabled=tcfg.precision == "fp16" and dev.type == "cuda")
    loader, tr_eval, val = parts.train_loader(), parts.eval_loader("train_eval"), parts.eval_loader("val")
    best_score, best_state, since_best = math.inf, None, 0
    first = 0
    if state is not None:
        first, best_score, best_state, since_best = _restore(state, parts, loader, scaler, hist, dev)
    start = time.perf_counter()

    for epoch in range(first, tcfg.epochs):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        net.train()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        seen = 0
        for x, y in loader:
            if parts.regularize_batch is not None:
                x, y = parts.regularize_batch(x, y)
            if tcfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, tcfg.precision):
                loss = parts.loss_fn(net(x), y)
            if parts.penalty_fn:
                loss = loss + parts.penalty_fn()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.after_batch()
            loss_sum += loss.detach().double() * x.shape[0]
            seen += x.shape[0]
        train_loss = float(loss_sum) / max(seen, 1)
        tel, tea = evaluate(net, tr_eval, tcfg.precision, tcfg.channels_last)
        vl, va = evaluate(net, val, tcfg.precision, tcfg.channels_last)
        sched.after_epoch(vl)
        record = {"epoch": epoch, "train_loss": train_loss, "train_eval_loss": tel, "train_acc": tea,
                  "val_loss": vl, "val_acc": va, "lr": lr, "seconds": time.perf_counter() - t0}
        hist.epochs.append(record)
        verdict = report(epoch, record) if report is not None else None  # every epoch is reported
        if not all(math.isfinite(record[k]) for k in ("train_loss", "val_loss")):
            bad = "train_loss" if not math.isfinite(train_loss) else "val_loss"
            hist.stop_reason = f"failed:non-finite {bad} at epoch {epoch}"
            break

        score = sign * record[es.monitor]
        if score < best_score - es.min_delta or hist.best_epoch is None:
            best_score, hist.best_epoch, since_best = score, epoch, 0
            if es.restore_best:
                best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1

        if verdict:
            hist.stop_reason = verdict if isinstance(verdict, str) else f"stopped@{epoch}"
            break
        if es.patience is not None and since_best >= es.patience:
            hist.stop_reason = "early_stopped"
            break
        if checkpoint is not None and epoch + 1 < tcfg.epochs:
            checkpoint(training_state(epoch + 1, parts, loader, scaler, hist, best_score, best_state, since_best))

    if es.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    if not hist.stop_reason.startswith("failed:"):
        tl, ta = evaluate(model, parts.eval_loader("test"), tcfg.precision, tcfg.channels_last)
        hist.test = {"test_loss": tl, "test_acc": ta}
    hist.seconds = time.perf_counter() - start
    return parts, hist


def training_state(epoch: int, parts: Parts, loader: BatchLoader, scaler: torch.amp.GradScaler, hist: History,
                   best_score: float, best_state: Optional[dict[str, torch.Tensor]],
                   since_best: int) -> dict[str, Any]:
    """The state to resume before ``epoch`` from (see :func:`train`): a copy, never the live tensors."""
    dev = parts.device
    out = {"epoch": epoch, "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
           "scheduler": parts.scheduler.state_dict(), "scaler": scaler.state_dict(),
           "generators": {k: g.get_state() for k, g in _generators(parts, loader).items()},
           "cpu_rng": torch.get_rng_state(), "best_score": best_score, "best_state": best_state,
           "since_best": since_best, "best_epoch": hist.best_epoch, "epochs": hist.epochs}
    if dev.type == "cuda":
        out["cuda_rng"] = torch.cuda.get_rng_state(dev)
    return copy.deepcopy(out)


def _restore(state: dict[str, Any], parts: Parts, loader: BatchLoader, scaler: torch.amp.GradScaler,
             hist: History, dev: torch.device) -> tuple[int, float, Optional[dict[str, torch.Tensor]], int]:
    """Load a :func:`training_state` into the loop's objects; returns (epoch, best_score, best_state,
    since_best). The global RNGs are set last, so nothing drawn while loading shifts them."""
    state = copy.deepcopy(state)  # the caller's dict stays as it was (it may resume again)
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    gens = _generators(parts, loader)
    if set(gens) != set(state["generators"]):
        raise ValueError(f"training state: generators {sorted(state['generators'])} do not match this config's "
                         f"{sorted(gens)}; resume with the config the state was saved from")
    for key, gen in gens.items():
        gen.set_state(state["generators"][key])
    hist.epochs = list(state["epochs"])
    hist.best_epoch = state["best_epoch"]
    best_state = state["best_state"]
    if best_state is not None:
        best_state = {k: v.to(dev) for k, v in best_state.items()}
    torch.set_rng_state(state["cpu_rng"].cpu())
    if dev.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), dev)
    return int(state["epoch"]), float(state["best_score"]), best_state, int(state["since_best"])


# ---------------------------------------------------------------------------------------- compile
class TensorRateDropout(nn.Module):
    """Dropout (``channelwise``: Dropout2d) whose rate is a 0-dim buffer instead of a Python float.

    torch.compile guards on float attributes, so every new ``model.dropout`` would compile the model again;
    a tensor is a graph input, so trials that differ only in p share one compiled graph. Used only under
    compile, where the random stream differs from eager mode's anyway (inductor draws its own)."""

    def __init__(self, p: float, channelwise: bool):
        super().__init__()
        self.channelwise = channelwise
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)  # not in the state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (*x.shape[:2], *([1] * (x.dim() - 2))) if self.channelwise else x.shape
        keep = torch.rand(shape, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile(model, dynamic=False)`` with the dropout rates as tensors (see TensorRateDropout).

    torch.compile caches compiled graphs per code object and guards (architecture, input shapes, train/eval,
    dtype, device) for the whole process, so the next trial of the same architecture reuses them whatever
    its dropout, weights or seed; the recompile limit is raised so that a sweep over architectures (BN
    placement, widths, ...) does not fall back to eager mode. Mutates ``model``'s dropout modules in place
    (its state_dict is unchanged)."""
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Dropout, nn.Dropout2d)):
                swap = TensorRateDropout(child.p, isinstance(child, nn.Dropout2d)).to(dev)
                setattr(parent, name, swap.train(child.training))
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), 64))
            break
    return torch.compile(model, dynamic=False, **options)


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, model: nn.Module, cfg: TrainConfig, history: History | None = None) -> None:
    """state_dict + plain config dict (+ history dict): loadable with ``torch.load(weights_only=True)``."""
    payload = {"state_dict": model.state_dict(), "config": cfg.to_dict(),
               "in_shape": list(getattr(model, "in_shape", ())), "num_classes": getattr(model, "num_classes", 0)}
    if history is not None:
        payload["history"] = history.to_dict()
    torch.save(payload, path)


def load_checkpoint(path: str | Path, device: str | torch.device | None = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model from the checkpoint's own config and load its weights (no pickled objects)."""
    payload = torch.load(path, map_location=device, weights_only=True)
    cfg = TrainConfig.from_dict(payload["config"])
    model = make_model(cfg, tuple(payload["in_shape"]), int(payload["num_classes"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device), cfg


# ---------------------------------------------------------------------------------------- CLI
COLUMNS = (("epoch", "{:>5d}"), ("train_loss", "{:>10.4f}"), ("train_eval_loss", "{:>15.4f}"),
           ("train_acc", "{:>9.4f}"), ("val_loss", "{:>8.4f}"), ("val_acc", "{:>7.4f}"), ("lr", "{:>9.2e}"),
           ("seconds", "{:>7.2f}"))


def format_header() -> str:
    widths = {"epoch": 5, "train_loss": 10, "train_eval_loss": 15, "train_acc": 9, "val_loss": 8,
              "val_acc": 7, "lr": 9, "seconds": 7}
    return " ".join(f"{k:>{widths[k]}}" for k, _ in COLUMNS)


def format_row(record: dict[str, Any]) -> str:
    return " ".join(fmt.format(record[k]) for k, fmt in COLUMNS)


def run_training(config_path: str, device: str | None = None, out: str | None = None, quiet: bool = False) -> int:
    """Load, train with a per-epoch table, write config.yaml, history.json and checkpoint.pt to ``out``.
    ``quiet`` (``regsweep -q train``): no table, only the final line and errors."""
    cfg = load_config(config_path)
    add_search_path(Path(config_path).parent)  # a dataset by import path may live beside the config
    try:  # a model by import path: built once first, so that a factory's error is one line before any output
        check_model(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    dev = resolve_device(device)
    out_dir = Path(out) if out else Path("runs") / Path(config_path).stem
    if not quiet:
        print(f"training {cfg.model.name} on {cfg.data.name} ({dev}); output: {out_dir.resolve()}", flush=True)
        print(format_header(), flush=True)

    def show(epoch: int, record: dict[str, Any]) -> None:
        print(format_row(record), flush=True)

    parts, hist = train(cfg, dev, report=None if quiet else show)
    cfg = parts.config  # data.residency resolved: the saved config replays the same way on any machine
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    (out_dir / "history.json").write_text(json.dumps(hist.to_dict(), indent=2) + "\n", encoding="utf-8")
    save_checkpoint(out_dir / "checkpoint.pt", parts.model, cfg, hist)
    if hist.best_epoch is not None:
        best = hist.epochs[hist.best_epoch]
        print(f"{hist.stop_reason}; best epoch {hist.best_epoch}: val_loss {best['val_loss']:.4f} "
              f"val_acc {best['val_acc']:.4f}; test_acc {hist.test.get('test_acc', float('nan')):.4f}; "
              f"{hist.seconds:.1f}s, {hist.n_params} params, split {hist.split_fingerprint}")
    if hist.stop_reason.startswith("failed:"):
        print(f"error: {hist.stop_reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m regsweep.models.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Train one TrainConfig YAML.")
    parser.add_argument("config", help="TrainConfig YAML file")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<config name>)")
    args = parser.parse_args(argv)
    try:
        return run_training(args.config, args.device, args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
