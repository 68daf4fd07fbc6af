"""Regularisers that act on the loss or the batch, each a distinct knob.

- ``l1`` / ``l2``: terms ADDED TO THE LOSS, ``l1 * sum|w| + l2 * sum w^2`` over weights with dim >= 2
  (conv kernels, linear matrices); biases and norm parameters are never penalised.
- Decoupled weight decay is NOT here: it is the optimizer's (models/optim.py), on the groups from
  :func:`param_groups`.
- Label smoothing (CrossEntropyLoss), mixup/cutmix (torchvision v2 transforms, soft targets) and Gaussian
  input noise change the TRAINING batches and loss only; ``train_eval_loss`` is measured without them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from regsweep.models.config import RegularizationConfig


def decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): weights with dim >= 2 decay; biases and norm weights (dim < 2) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups (nanoGPT's ``configure_optimizers``); returns the groups only."""
    decay, no_decay = decay_parameters(model)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Penalty:
    """``penalty(model_or_none) -> l1 * sum|w| + l2 * sum w^2`` over the weights with dim >= 2.

    Falsy when both strengths are 0, so a training loop can skip it at no cost.
    """

    def __init__(self, model: nn.Module, l1: float = 0.0, l2: float = 0.0):
        self.l1, self.l2 = float(l1), float(l2)
        self.weights = decay_parameters(model)[0]

    def __bool__(self) -> bool:
        return self.l1 > 0 or self.l2 > 0

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), device=self.weights[0].device if self.weights else None)
        if self.l1 > 0:
            total = total + self.l1 * sum(w.abs().sum() for w in self.weights)
        if self.l2 > 0:
            total = total + self.l2 * sum(w.pow(2).sum() for w in self.weights)
        return total


def loss_function(cfg: RegularizationConfig) -> nn.Module:
    """Cross-entropy with label smoothing; accepts class indices or soft targets (mixup/cutmix)."""
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


class BatchRegularizer:
    """Training-batch transforms: Gaussian input noise, then mixup or cutmix with probability
    ``mix_prob`` (one of them, chosen at random, when both are on). Returns (x, targets) where targets are
    class indices or, for a mixed batch, soft targets that sum to 1."""

    def __init__(self, cfg: RegularizationConfig, num_classes: int):
        self.noise = cfg.input_noise_std
        self.prob = cfg.mix_prob
        self.mixers: list = []
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            from torchvision.transforms import v2  # lazy: only when mixing is on

            if cfg.mixup_alpha > 0:
                self.mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
            if cfg.cutmix_alpha > 0:
                self.mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))

    def __bool__(self) -> bool:
        return self.noise > 0 or bool(self.mixers)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.noise > 0:
            x = x + self.noise * torch.randn_like(x)
        if self.mixers and (self.prob >= 1 or float(torch.rand(())) < self.prob):
            mixer = self.mixers[0] if len(self.mixers) == 1 else self.mixers[int(torch.randint(2, ()))]
            x, y = mixer(x, y)
        return x, y


def penalty_and_batch(model: nn.Module, cfg: RegularizationConfig,
                      num_classes: int) -> tuple[Penalty, Optional[BatchRegularizer]]:
    batch = BatchRegularizer(cfg, num_classes)
    return Penalty(model, cfg.l1, cfg.l2), (batch if batch else None)
