"""The report of ``regsweep bench`` (search/bench.py): the plan, the figures as a table, and issue 11's targets.

Pure formatting of the figures dict that bench.run measures; imports no optuna or ray.
"""

from __future__ import annotations

import platform
from typing import Any, Optional

import torch

PACK_K = (1, 2, 4)  # processes packed per device
# (label, figure key, comparison, bound): issue 11's goals on an H100-class GPU, full sizes
TARGETS = (("mnist_cnn fit epoch (s)", "mnist_cnn.fit.epoch_s", "<=", 0.12),
           ("resnet18 fit epoch (s)", "resnet18.fit.epoch_s", "<=", 0.6),
           ("4 packed / 1: trials/hour", "packing.ratio.4", ">=", 2.5),
           ("fused mnist_cnn best N / 1: trials/hour (issue 20)", "fused.mnist_cnn.best_ratio", ">=", 6.0))


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or "cpu"


def plan(mode: str, s, dev: torch.device, only: tuple[str, ...], cores: int) -> str:
    """The plan printed before measuring: what each workload will run (``s`` is bench.Sizes)."""
    lines = [f"plan ({mode}, {dev}):"]
    if "mnist_cnn" in only:
        lines.append(f"  mnist_cnn: studies/mnist_cnn.yaml's base on synthetic 1x28x28, {s.mnist[0]} train / "
                     f"{s.mnist[1]} val, widths {s.mnist_widths or 'the study'}'s; seeds' way {1 + s.seeds_epochs} "
                     f"epochs, fit {1 + s.fit_epochs} epochs "
                     "(first dropped)")
    if "resnet18" in only:
        lines.append(f"  resnet18: studies/cifar10_resnet18.yaml's base on synthetic 3x32x32, {s.cifar[0]} train / "
                     f"{s.cifar[1]} val, widths {s.resnet_widths or 'default'}, batch {s.resnet_batch or 'the study'}"
                     f"'s; {1 + s.seeds_epochs} / {1 + s.fit_epochs} epochs; FLOPs of one step counted")
    if "packing" in only:
        t, e, n = s.pack
        lines.append(f"  packing: {'/'.join(map(str, s.pack_k))} processes x {t} mnist_cnn trial(s) of {e} epoch(s) "
                     f"on {n} images" + (f", cores // K threads each ({cores} cores)" if dev.type == "cpu" else ""))
    if "fused" in only:
        e, n, ns, ns_resnet, n_cifar = s.fused
        lines.append(f"  fused: N = {'/'.join(map(str, ns))} mnist_cnn and digits_cnn trials ({n} / 1079 images), "
                     f"N = {'/'.join(map(str, ns_resnet))} resnet20 ({n_cifar} images), {e} epoch(s) each, as one "
                     "fused group vs one trial at a time")
    return "\n".join(lines)


def lookup(figures: dict[str, Any], key: str) -> Optional[float]:
    node: Any = figures
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def format_report(figures: dict[str, Any]) -> str:
    lines = [f"regsweep bench: {figures['device_name']} ({figures['device']}), torch {figures['torch']}, "
             f"python {figures['python']}, {figures['threads']} thread(s), mode {figures['mode']}",
             f"{'workload':<10} {'way':<6} {'batch':>5} {'n_train':>7} {'precision':<16} {'epoch s':>9} "
             f"{'images/s':>10} {'speedup':>8}"]
    for name in ("mnist_cnn", "resnet18"):
        w = figures.get(name)
        if not w:
            continue
        prec = w["precision"] + ("+channels_last" if w["channels_last"] else "")
        for way in ("seeds", "fit"):
            r = w[way]
            speed = f"{w['speedup']:>7.2f}x" if way == "fit" else f"{'1.00x':>8}"
            lines.append(f"{name:<10} {way:<6} {r['batch']:>5d} {w['n_train']:>7d} "
                         f"{(prec if way == 'fit' else 'fp32'):<16} {r['epoch_s']:>9.4f} {r['images_per_s']:>10.0f} "
                         f"{speed}")
        if "flops" in w:
            f = w["flops"]
            lines.append(f"{name:<10} fit achieved {f['tflops']:.3f} TFLOP/s ({f['per_epoch'] / 1e12:.2f} TFLOP per "
                         f"epoch: forward+backward of a training step counted by FlopCounterMode, not x3, "
                         f"{f['train_per_image'] / 1e9:.3f} GFLOP/image, plus the eval passes' forward)")
    p = figures.get("packing")
    if p:
        lines.append(f"packing: {p['workload']} trials of {p['epochs']} epoch(s) on {p['n_train']} images, "
                     f"{p['trials_per_process']} per process")
        for k, r in p["k"].items():
            threads = f", {r['threads']} thread(s) each" if r["threads"] else ""
            lines.append(f"  {k} packed: {r['trials_per_hour']:>9.0f} trials/hour ({r['trials']} trials in "
                         f"{r['wall_s']:.2f} s, median trial {r['trial_s']:.2f} s{threads}) = "
                         f"{p['ratio'][k]:.2f}x of 1")
    for name, w in (figures.get("fused") or {}).items():
        lines.append(f"fused {name}: {w['epochs']} epoch(s) on {w['n_train']} images, mode {w['mode']}; one at a "
                     f"time {w['solo_trials_per_hour']:.0f} trials/hour ({w['solo_s']:.2f} s a trial)")
        for n, r in w["n"].items():
            lines.append(f"  fused N = {n:>2}: {r['trials_per_hour']:>9.0f} trials/hour ({r['wall_s']:.2f} s a group) "
                         f"= {r['ratio']:.2f}x one at a time")
    lines.append("targets (issues 11 and 20, H100-class GPU, full sizes; printed, never asserted):")
    for label, key, op, bound in TARGETS:
        value = lookup(figures, key)
        if value is None:
            verdict = "not measured"
        elif figures["mode"] != "full" or figures["device"] == "cpu":
            verdict = f"{value:.3f} (n/a: {figures['mode']} sizes on {figures['device']})"
        else:
            ok = value <= bound if op == "<=" else value >= bound
            verdict = f"{value:.3f} {'MET' if ok else 'NOT MET'}"
        lines.append(f"  {label} {op} {bound}: {verdict}")
    return "\n".join(lines)
