"""The public API for your own training loop: thin, documented names over what regsweep.models already has.

Import them from the package (``from regsweep.models import make_optimizer, penalty, ...``); importing the
package does no work, each name loads its module on first use. ``regsweep export --format snippet`` writes the
lines that call them with a trial's values::

    init_weights(model, "kaiming_normal")                        # model.init
    optimizer = make_optimizer(model, name="adamw", lr=1e-3, weight_decay=1e-4)
    scheduler = make_scheduler(optimizer, name="onecycle", epochs=20, steps_per_epoch=len(train_loader))
    reg_term = penalty(model, l1=1e-5, l2=1e-4)
    for epoch in range(20):
        for x, y in train_loader:
            loss = criterion(model(x), y) + reg_term()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            scheduler.after_batch()          # steps only a per-batch scheduler (onecycle)
        scheduler.after_epoch(val_loss)      # steps only a per-epoch scheduler

Every value is checked as TrainConfig checks it (one ConfigError line naming ``optim.lr`` etc.); each
function also takes the config section itself (``make_optimizer(model, cfg.optim)``) with keywords on top.
``build(cfg)`` (everything at once: model, optimizer, schedule, loss, penalty, data) is
:func:`regsweep.models.build.build`; ``regsweep.models.build`` is that module, and calling it calls the function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch import nn

from regsweep.models.build import REGISTRIES, build, load_config
from regsweep.models.config import ConfigError, OptimConfig, SchedulerConfig, TrainConfig, check_choice
from regsweep.models.init import initialize
from regsweep.models.optim import make_optimizer as _optimizer_from_section
from regsweep.models.regularize import Penalty
from regsweep.models.schedulers import LRSchedule, make_schedule

__all__ = ["build", "load_config", "TrainConfig", "init_weights", "make_optimizer", "penalty", "make_scheduler"]


def _section(name: str, cfg: Any, values: Mapping[str, Any], extra: Optional[dict] = None) -> Any:
    """``cfg`` (a section dataclass, a mapping or None) with ``values`` on top, checked as TrainConfig does."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    data.update(values)
    section = getattr(TrainConfig.from_dict({name: data, **(extra or {})}), name)
    path = f"{name}.name"
    check_choice(path, section.name, REGISTRIES[path].names())
    return section


def init_weights(model: nn.Module, scheme: str = "default") -> nn.Module:
    """Initialise ``model`` in place by ``model.init``'s rule (conv/linear weights by the scheme, biases 0,
    norm weights 1 / biases 0; ``default`` keeps PyTorch's); returns it. Seed torch first for a replay."""
    check_choice("model.init", scheme, REGISTRIES["model.init"].names())
    return initialize(model, scheme)


def make_optimizer(model: nn.Module, cfg: OptimConfig | Mapping[str, Any] | None = None,
                   **values: Any) -> torch.optim.Optimizer:
    """``optim.name`` (sgd | adam | adamw) over two parameter groups: the weights with dim >= 2, with DECOUPLED
    weight decay (``p <- p - lr * wd * p``, for sgd and adam too), and the rest (biases, norms) undecayed.
    Keywords are OptimConfig's fields: name, lr, momentum, nesterov, betas, weight_decay."""
    return _optimizer_from_section(model, _section("optim", cfg, values))


def penalty(model: nn.Module, l1: float = 0.0, l2: float = 0.0) -> Penalty:
    """The loss term ``l1 * sum|w| + l2 * sum w^2`` over ``model``'s weights with dim >= 2 (``regularization.l1``
    and ``.l2``): call it each step and add it to the loss. Falsy when both are 0 (then it returns 0)."""
    section = TrainConfig.from_dict({"regularization": {"l1": l1, "l2": l2}}).regularization
    return Penalty(model, section.l1, section.l2)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig | Mapping[str, Any] | None = None, *,
                   epochs: int, steps_per_epoch: int = 1, **values: Any) -> LRSchedule:
    """``scheduler.name``'s schedule over ``epochs`` (``steps_per_epoch`` batches each: onecycle counts batches).
    Call ``after_batch()`` after every optimizer step and ``after_epoch(val_loss)`` after every epoch; each steps
    only at the schedule's own granularity. Keywords are SchedulerConfig's fields (name, step_size, gamma,
    milestones, eta_min, warmup_epochs, factor, patience, max_lr, pct_start)."""
    if not isinstance(epochs, int) or epochs < 1 or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ConfigError(f"make_scheduler: epochs={epochs!r}, steps_per_epoch={steps_per_epoch!r} are not allowed; "
                          "both must be integers >= 1")
    lr = optimizer.defaults.get("lr", optimizer.param_groups[0]["lr"])
    section = _section("scheduler", cfg, values, {"optim": {"lr": lr}, "train": {"epochs": epochs}})
    return make_schedule(optimizer, section, epochs, steps_per_epoch)
