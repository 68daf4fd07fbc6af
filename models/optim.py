"""Optimizer registry: sgd, adam, adamw — every one with DECOUPLED weight decay.

``optim.weight_decay`` always means ``p <- p - lr * wd * p`` (AdamW semantics) on weights with dim >= 2,
never the coupled L2-into-gradient of torch's SGD/Adam ``weight_decay``. Adam with decoupled decay is
exactly AdamW (torch's ``Adam(decoupled_weight_decay=True)``); SGD gets the same rule in :class:`SGDW`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from regsweep.models.config import OptimConfig
from regsweep.models.registry import Registry
from regsweep.models.regularize import param_groups

OPTIMIZERS: Registry[Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = Registry("optimizer")


class SGDW(torch.optim.SGD):
    """SGD (momentum, Nesterov) with decoupled weight decay applied before each step:
    ``p <- p * (1 - lr * wd)`` with the group's current lr, as torch's AdamW does."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)

    def add_param_group(self, param_group: dict) -> None:  # torch's __init__ calls this for every group
        group = dict(param_group)  # move the decay out of torch's coupled slot
        group["decoupled_weight_decay"] = group.pop("weight_decay", 0.0)
        group["weight_decay"] = 0.0
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd = group.get("decoupled_weight_decay", 0.0)
            params = [p for p in group["params"] if p.grad is not None]
            if wd and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * wd)
        return super().step(closure)


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return SGDW(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


@OPTIMIZERS.register("adam")
def _adam(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters:
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), decoupled_weight_decay=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))  # identical algorithm


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(param_groups(model, cfg.weight_decay), cfg)
