"""``build(cfg) -> Parts``: everything a training loop needs, built from one TrainConfig.

The public API for users' own loops::

    parts = build(load_config("best.yaml"))
    for epoch in range(cfg.train.epochs):
        parts.model.train()
        for x, y in parts.train_loader():
            x, y = parts.regularize_batch(x, y) if parts.regularize_batch else (x, y)
            loss = parts.loss_fn(parts.model(x), y) + (parts.penalty_fn() if parts.penalty_fn else 0)
            parts.optimizer.zero_grad(); loss.backward(); parts.optimizer.step()
            parts.scheduler.after_batch()
        parts.scheduler.after_epoch(val_loss)

Registry names are checked here, not in models/config.py (the schema layer imports nothing of ours):
:func:`check_names` checks every field of ``config.NAMED_FIELDS`` against its registry and the stage count
of ``model.widths``; :func:`load_config` (a file), :func:`build` and :func:`make_model` call it, and so do
the spec parser and the search-space check (search/spec.py, search/space.py).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from regsweep.models import data as data_mod
from regsweep.models.cnn import MODELS
from regsweep.models.config import NAMED_FIELDS, ConfigError, TrainConfig, check, check_choice, get_path
from regsweep.models.init import INITS, initialize
from regsweep.models.layers import ACTIVATIONS
from regsweep.models.optim import OPTIMIZERS, make_optimizer
from regsweep.models.regularize import BatchRegularizer, Penalty, loss_function, penalty_and_batch
from regsweep.models.resnet import ResNet  # noqa: F401  (registers resnet18/resnet20 in MODELS)
from regsweep.models.schedulers import SCHEDULERS, LRSchedule, make_schedule

# config.NAMED_FIELDS -> the registry its value must name
REGISTRIES = {"model.name": MODELS, "model.init": INITS, "model.activation": ACTIVATIONS,
              "data.name": data_mod.DATASETS, "optim.name": OPTIMIZERS, "scheduler.name": SCHEDULERS}


def check_names(cfg: TrainConfig, source: str | None = None) -> TrainConfig:
    """Every registry name of ``cfg`` is registered and ``model.widths`` fits the model's stage count.

    Raises one ConfigError line (``source: path: value is not allowed; choose one of: ...``, ``source`` when
    given); returns ``cfg``. TrainConfig itself checks structure and ranges only (see models/config.py).
    """
    try:
        data = cfg.to_dict()
        for path in NAMED_FIELDS:  # the schema says which fields are names; this layer knows the registries
            check_choice(path, get_path(data, path), REGISTRIES[path].names())
        m = cfg.model
        stages = getattr(MODELS.get(m.name), "STAGES", 0)
        check(not m.widths or not stages or len(m.widths) == stages, "model.widths", m.widths,
              f"{m.name} has {stages} stages: give {stages} widths or [] for its default")
    except ConfigError as exc:
        if source:
            raise ConfigError(f"{source}: {exc}") from None
        raise
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """``TrainConfig.load`` plus :func:`check_names`: every error is one line naming the file."""
    return check_names(TrainConfig.load(path), str(path))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The one place a device is chosen: explicit, else CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    return dev


def make_model(cfg: TrainConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    check_names(cfg)
    m = cfg.model
    kwargs = dict(hidden=m.hidden, dropout=m.dropout, bn=m.bn, activation=m.activation)
    if m.widths:
        kwargs["widths"] = tuple(m.widths)
    model = initialize(MODELS.get(m.name)(in_shape, num_classes, **kwargs), m.init)
    model.in_shape, model.num_classes = tuple(in_shape), num_classes  # what a checkpoint needs to rebuild it
    return model


@dataclass
class Parts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    loss_fn: nn.Module
    penalty_fn: Penalty
    data: data_mod.DataBundle
    regularize_batch: Optional[BatchRegularizer]
    device: torch.device
    config: TrainConfig
    _train_loader: Optional[data_mod.BatchLoader] = field(default=None, init=False, repr=False)
    _train_eval: Optional[data_mod.Split] = field(default=None, init=False, repr=False)

    def train_loader(self) -> data_mod.BatchLoader:
        """The shuffled training batches (seeded by train.seed), augmented when data.augment is on."""
        if self._train_loader is None:
            # on the training device: augmentation draws its offsets there (on the CPU the same stream as before)
            gen = torch.Generator(device=self.device).manual_seed(self.config.train.seed + 1)
            aug = data_mod.Augment(self.data.in_shape, self.data.flip, gen) if self.config.data.augment else None
            self._train_loader = data_mod.BatchLoader(self.data.train, self.config.data.batch_size, shuffle=True,
                                                      seed=self.config.train.seed, transform=aug,
                                                      device=self.device)
        return self._train_loader

    def eval_loader(self, split: str) -> data_mod.BatchLoader:
        """Unshuffled batches of 'val', 'test' or 'train_eval' (a fixed training subset)."""
        bs = max(self.config.data.batch_size, 512)
        if split == "train_eval":
            return data_mod.BatchLoader(self.train_eval_split(), bs, device=self.device)
        return data_mod.BatchLoader(getattr(self.data, split), bs, device=self.device)

    def train_eval_split(self) -> data_mod.Split:
        if self._train_eval is None:
            n, k = len(self.data.train), self.config.train.train_eval_size
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values
            idx = idx.to(self.data.train.x.device)
            self._train_eval = data_mod.Split(self.data.train.x[idx], self.data.train.y[idx])
        return self._train_eval


def build(cfg: TrainConfig, device: str | torch.device | None = None,
          data: data_mod.DataBundle | None = None) -> Parts:
    """Model (seeded by train.seed, initialised, on device), optimizer, LR schedule, loss, penalty, data.

    ``data`` may be passed in to reuse an already loaded (device-resident) bundle of the same data config.
    """
    check_names(cfg)
    dev = resolve_device(device)
    bundle = data if data is not None else data_mod.load(cfg.data, dev)
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg, bundle.in_shape, bundle.num_classes).to(dev)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.optim)
    steps = (len(bundle.train) + cfg.data.batch_size - 1) // cfg.data.batch_size
    schedule = make_schedule(optimizer, cfg.scheduler, cfg.train.epochs, steps)
    penalty, batch_reg = penalty_and_batch(model, cfg.regularization, bundle.num_classes)
    return Parts(model, optimizer, schedule, loss_function(cfg.regularization).to(dev), penalty, bundle,
                 batch_reg, dev, cfg)


class CallableModule(types.ModuleType):
    """This module is also the public ``regsweep.models.build`` function: a submodule and a package attribute of
    the same name are one object in Python, so ``from regsweep.models import build; build(cfg)`` calls
    :func:`build` whichever was imported first, and ``regsweep.models.build.load_config`` still works.
    (Setting a module's ``__class__`` is Python's documented way to customise a module object.)"""

    def __call__(self, *args, **kwargs) -> Parts:
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = CallableModule
