"""LR scheduler registry. Each factory wraps a torch scheduler and says when it steps.

| name | torch scheduler | steps |
|---|---|---|
| none | (constant lr) | - |
| step | StepLR(step_size, gamma) | epoch |
| multistep | MultiStepLR(milestones, gamma) | epoch |
| exponential | ExponentialLR(gamma) | epoch |
| cosine | CosineAnnealingLR(T_max=epochs, eta_min) | epoch |
| plateau | ReduceLROnPlateau(factor, patience) on val_loss | epoch |
| onecycle | OneCycleLR(max_lr, total_steps=epochs*batches, pct_start) | batch |
| warmup_cosine | LinearLR warm-up for warmup_epochs, then CosineAnnealingLR | epoch |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.optim import lr_scheduler as tls

from regsweep.models.config import SchedulerConfig
from regsweep.models.registry import Registry


@dataclass
class LRSchedule:
    """A torch scheduler (or none) and its granularity. Call ``after_batch()`` after every optimizer
    step and ``after_epoch(val_loss)`` after every epoch; each steps only at its own granularity."""

    scheduler: Optional[object]
    interval: str  # "batch" | "epoch" | "none"

    def after_batch(self) -> None:
        if self.interval == "batch":
            self.scheduler.step()

    def after_epoch(self, val_loss: float | None = None) -> None:
        if self.interval != "epoch":
            return
        if isinstance(self.scheduler, tls.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        """The torch scheduler's state (``{}`` for none): plain values, loadable with weights_only=True."""
        return {} if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


Factory = Callable[[torch.optim.Optimizer, SchedulerConfig, int, int], LRSchedule]
SCHEDULERS: Registry[Factory] = Registry("scheduler")


def _epoch(make: Callable[[torch.optim.Optimizer, SchedulerConfig, int], object]) -> Factory:
    return lambda opt, cfg, epochs, steps: LRSchedule(make(opt, cfg, epochs), "epoch")


SCHEDULERS.add("none", lambda opt, cfg, epochs, steps: LRSchedule(None, "none"))
SCHEDULERS.add("step", _epoch(lambda o, c, e: tls.StepLR(o, step_size=c.step_size, gamma=c.gamma)))
SCHEDULERS.add("multistep", _epoch(lambda o, c, e: tls.MultiStepLR(o, milestones=c.milestones, gamma=c.gamma)))
SCHEDULERS.add("exponential", _epoch(lambda o, c, e: tls.ExponentialLR(o, gamma=c.gamma)))
SCHEDULERS.add("cosine", _epoch(lambda o, c, e: tls.CosineAnnealingLR(o, T_max=e, eta_min=c.eta_min)))
SCHEDULERS.add("plateau", _epoch(lambda o, c, e: tls.ReduceLROnPlateau(o, mode="min", factor=c.factor,
                                                                       patience=c.patience)))


@SCHEDULERS.register("onecycle")
def _onecycle(opt, cfg: SchedulerConfig, epochs: int, steps: int) -> LRSchedule:
    max_lr = cfg.max_lr if cfg.max_lr is not None else 10 * opt.param_groups[0]["lr"]
    return LRSchedule(tls.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs * steps, pct_start=cfg.pct_start),
                      "batch")


@SCHEDULERS.register("warmup_cosine")
def _warmup_cosine(opt, cfg: SchedulerConfig, epochs: int, steps: int) -> LRSchedule:
    warm = min(cfg.warmup_epochs, epochs - 1)
    cosine = tls.CosineAnnealingLR(opt, T_max=max(epochs - warm, 1), eta_min=cfg.eta_min)
    if warm == 0:
        return LRSchedule(cosine, "epoch")
    warmup = tls.LinearLR(opt, start_factor=1.0 / (warm + 1), total_iters=warm)
    return LRSchedule(tls.SequentialLR(opt, [warmup, cosine], milestones=[warm]), "epoch")


def make_schedule(opt: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, steps_per_epoch: int) -> LRSchedule:
    return SCHEDULERS.get(cfg.name)(opt, cfg, epochs, steps_per_epoch)
