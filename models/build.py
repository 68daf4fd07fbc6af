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

import inspect
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from regsweep.models import data as data_mod
from regsweep.models import plugins
from regsweep.models.cnn import MODELS
from regsweep.models.config import NAMED_FIELDS, ConfigError, ModelConfig, TrainConfig, check, check_choice, get_path
from regsweep.models.init import INITS, initialize
from regsweep.models.layers import ACTIVATIONS
from regsweep.models.optim import OPTIMIZERS, make_optimizer
from regsweep.models.registry import fits, simple_types
from regsweep.models.regularize import BatchRegularizer, Penalty, loss_function, penalty_and_batch
from regsweep.models.resnet import ResNet  # noqa: F401  (registers resnet18/resnet20 in MODELS)
from regsweep.models.schedulers import SCHEDULERS, LRSchedule, make_schedule
from regsweep.models.yamlio import clip, excerpt

# config.NAMED_FIELDS -> the registry its value must name
REGISTRIES = {"model.name": MODELS, "model.init": INITS, "model.activation": ACTIVATIONS,
              "data.name": data_mod.DATASETS, "optim.name": OPTIMIZERS, "scheduler.name": SCHEDULERS}


def check_names(cfg: TrainConfig, source: str | None = None, base_dir: plugins.Folders = None) -> TrainConfig:
    """Every registry name of ``cfg`` is registered and ``model.widths`` fits the model's stage count.

    ``model.name`` may also be an import path (``pkg.mod:Factory``, imported here: ``base_dir``, the spec's or
    config's folder, is appended to ``sys.path`` first) or an installed ``regsweep.models`` plugin; a user
    model's ``model.args`` and knobs are checked against its factory's signature (:func:`check_user_model`).
    Raises one ConfigError line (``source: path: value is not allowed; choose one of: ...``, ``source`` when
    given); returns ``cfg``. TrainConfig itself checks structure and ranges only (see models/config.py).
    """
    try:
        data = cfg.to_dict()
        for path in NAMED_FIELDS:  # the schema says which fields are names; this layer knows the registries
            if path == "data.name":  # also torchvision:CLASS, an import path or an entry point (models/data.py)
                data_mod.check_name(get_path(data, path))
            elif path != "model.name":  # model.name: a built-in, a plugin or an import path (below)
                check_choice(path, get_path(data, path), REGISTRIES[path].names())
        m = cfg.model
        if m.name in MODELS and not plugins.is_ref(m.name):
            check(not m.args, "model.args", m.args, f"the built-in model {m.name} takes no args (they are keyword "
                  "arguments of a model by import path or plugin)")
        else:
            check_user_model(m, model_factory(m.name, base_dir))
        stages = getattr(MODELS.get(m.name), "STAGES", 0) if m.name in MODELS else 0
        check(not m.widths or not stages or len(m.widths) == stages, "model.widths", m.widths,
              f"{m.name} has {stages} stages: give {stages} widths or [] for its default")
    except ConfigError as exc:
        if source:
            raise ConfigError(f"{source}: {exc}") from None
        raise
    return cfg


# ------------------------------------------------------------------------------ user models
# The model knobs a user factory gets when its signature names them (the config's value, its default included;
# model.widths only when not []); model.init is applied by regsweep to any nn.Module.
MODEL_KNOBS = ("widths", "hidden", "dropout", "bn", "activation")
SHAPE_ARGS = ("in_shape", "num_classes")  # passed when the signature names them (a tuple (C, H, W), an int)
# the input shape and class count of the built-in datasets, known without reading them (validate's dry build)
KNOWN_SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
                "cifar10": ((3, 32, 32), 10)}


def model_factory(name: str, base_dir: plugins.Folders = None) -> Callable[..., Any]:
    """The factory ``model.name`` names: a built-in (registry), an import path ``pkg.mod:Factory`` or an installed
    ``regsweep.models`` entry point (a built-in name wins). One ConfigError line when there is none."""
    if plugins.is_ref(name):
        return plugins.load_ref(name, "model.name", base_dir)
    if name in MODELS:
        return MODELS.get(name)
    if name in plugins.entry_points("model"):
        return plugins.load_entry_point("model", name, "model.name")
    installed = sorted(plugins.entry_points("model"))
    raise ConfigError(f"model.name: {excerpt(name)} is not allowed; choose one of: {', '.join(MODELS.names())}"
                      f"{' (installed plugins: ' + ', '.join(installed) + ')' if installed else ''}, or an import "
                      "path 'package.module:Factory'")


def factory_parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """(keyword-passable parameters by name, whether it takes ``**kwargs``); an unreadable signature (a C
    function) takes anything."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}, True
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_user_model(m: ModelConfig, factory: Callable[..., Any]) -> None:
    """``model.args`` against the factory's signature (names, simple annotations, required parameters), and
    every model knob set away from its default must be one the factory takes (else it would be ignored)."""
    named, any_kw = factory_parameters(factory)
    label = m.name
    takes = ", ".join(named) or "no named parameters"
    defaults = ModelConfig()
    for key, value in m.args.items():
        if key in MODEL_KNOBS or key in SHAPE_ARGS:
            where = f"model.{key}" if key in MODEL_KNOBS else "the dataset"
            check(False, f"model.args.{key}", value, f"{key} comes from {where}; regsweep passes it when {label} "
                  "takes it")
        if key not in named:
            check(any_kw, f"model.args.{key}", value, f"{label} takes: {takes}")
            continue
        types = simple_types(named[key].annotation)
        check(types is None or fits(value, types), f"model.args.{key}", value,
              f"{label}'s {key} is {' | '.join(types or ())}")
    for knob in MODEL_KNOBS:
        value = getattr(m, knob)
        check(knob in named or value == getattr(defaults, knob), f"model.{knob}", value,
              f"{label} does not take {knob} (it takes: {takes}); leave model.{knob} at "
              f"{getattr(defaults, knob)!r} or add a {knob} parameter")
    given = set(m.args) | set(SHAPE_ARGS) | {k for k in MODEL_KNOBS if k != "widths" or m.widths}
    missing = [n for n, p in named.items() if p.default is p.empty and n not in given]
    check(not missing, "model.args", m.args, f"{label} needs {', '.join(missing)}: give "
          f"{' and '.join('model.args.' + n for n in missing)}")


def user_model_kwargs(m: ModelConfig, factory: Callable[..., Any], in_shape: Sequence[int],
                      num_classes: int) -> dict[str, Any]:
    """The keyword arguments a user factory is called with: ``in_shape``/``num_classes`` and the knobs its
    signature names, then ``model.args``."""
    named, _ = factory_parameters(factory)
    kwargs: dict[str, Any] = {}
    if "in_shape" in named:
        kwargs["in_shape"] = tuple(in_shape)
    if "num_classes" in named:
        kwargs["num_classes"] = num_classes
    for knob in MODEL_KNOBS:
        if knob in named and (knob != "widths" or m.widths):
            kwargs[knob] = list(m.widths) if knob == "widths" else getattr(m, knob)
    kwargs.update(m.args)
    return kwargs


def searched_knob_error(m: ModelConfig, path: str, base_dir: plugins.Folders = None) -> Optional[str]:
    """Why a space may not search ``path`` (``model.bn``, ``model.args.depth``) for the model ``m`` names, or
    None: a knob or argument its factory does not take. Imports the model (it is a spec's base)."""
    key = path.split(".")[-1]
    if m.name in MODELS and not plugins.is_ref(m.name):
        return f"the built-in model {m.name} takes no args" if path.startswith("model.args.") else None
    if not (path.startswith("model.args.") or path in {f"model.{k}" for k in MODEL_KNOBS}):
        return None
    named, any_kw = factory_parameters(model_factory(m.name, base_dir))
    if key in named or (any_kw and path.startswith("model.args.")):
        return None
    return f"the model {m.name} does not take {key} (it takes: {', '.join(named) or 'no named parameters'})"


def check_model(cfg: TrainConfig) -> Optional[int]:
    """validate's dry build of a model by import path or plugin: call its factory with the config's args and run
    one zero batch (eval mode, no grad, the global RNG untouched) when the dataset's shape is known without
    reading it (:data:`KNOWN_SHAPES`, synthetic); returns its parameter count (None: built-in or shape unknown).
    Every failure is one ConfigError line."""
    m = cfg.model
    if m.name in MODELS and not plugins.is_ref(m.name):
        return None
    shape = tuple(cfg.data.shape) if cfg.data.name == "synthetic" else KNOWN_SHAPES.get(cfg.data.name, (None,))[0]
    classes = cfg.data.num_classes if cfg.data.name == "synthetic" else KNOWN_SHAPES.get(cfg.data.name, (0, 0))[1]
    if shape is None:
        check_names(cfg)
        return None
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = make_model(cfg, shape, classes)
        model.eval()
        batch = [1, *shape]
        try:
            out = model(torch.zeros(batch))
        except Exception as exc:  # noqa: BLE001 - the user's forward: one line with its reason
            raise ConfigError(f"model.name: {m.name!r} is not allowed; its forward pass on one zero batch of "
                              f"shape {batch} raised {type(exc).__name__}: {plugins.first_line(exc)}") from None
    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    check(got == [1, classes], "model.name", m.name, f"on one zero batch of shape {batch} it returned {got}; "
          f"expected logits of shape [1, {classes}] (data {cfg.data.name})")
    return sum(p.numel() for p in model.parameters())


def load_config(path: str | Path) -> TrainConfig:
    """``TrainConfig.load`` plus :func:`check_names`: every error is one line naming the file. A model by import
    path is looked for on ``sys.path``, then in the config's own folder, then in the working directory (both
    appended, never prepended)."""
    return check_names(TrainConfig.load(path), str(path), base_dir=(Path(path).parent, Path.cwd()))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The one place a device is chosen: explicit, else CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    return dev


def make_model(cfg: TrainConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The model of ``cfg``, initialised by ``model.init``. A built-in gets ``(in_shape, num_classes, hidden=,
    dropout=, bn=, activation=[, widths=])``; a model by import path or plugin gets keyword arguments only
    (:func:`user_model_kwargs`) and must return an ``nn.Module`` (else one ConfigError line)."""
    check_names(cfg)
    m = cfg.model
    if m.name in MODELS and not plugins.is_ref(m.name):
        kwargs = dict(hidden=m.hidden, dropout=m.dropout, bn=m.bn, activation=m.activation)
        if m.widths:
            kwargs["widths"] = tuple(m.widths)
        model = MODELS.get(m.name)(in_shape, num_classes, **kwargs)
    else:
        factory = model_factory(m.name)
        kwargs = user_model_kwargs(m, factory, in_shape, num_classes)
        try:
            model = factory(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's factory: one line with its reason
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ConfigError(f"model.name: {m.name!r} is not allowed; calling it with ({clip(shown, 120)}) raised "
                              f"{type(exc).__name__}: {plugins.first_line(exc)}") from None
        check(isinstance(model, nn.Module), "model.name", m.name,
              f"it returned a {type(model).__name__}, not a torch.nn.Module")
    model = initialize(model, m.init)
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
    _train_loader: Optional[data_mod.BatchLoader | data_mod.StreamLoader] = field(default=None, init=False,
                                                                                  repr=False)
    _train_eval: Optional[data_mod.Split | data_mod.StreamSplit] = field(default=None, init=False, repr=False)

    def _loader(self, split, batch_size: int, **kwargs):
        """A BatchLoader over tensors (residency device/host) or a StreamLoader (residency stream)."""
        if self.data.residency == "stream":
            return data_mod.StreamLoader(split, batch_size, mean=self.data.mean, std=self.data.std,
                                         device=self.device, num_workers=self.config.data.num_workers, **kwargs)
        return data_mod.BatchLoader(split, batch_size, device=self.device, **kwargs)

    def train_loader(self) -> data_mod.BatchLoader | data_mod.StreamLoader:
        """The shuffled training batches (seeded by train.seed), augmented when data.augment is on."""
        if self._train_loader is None:
            # on the training device: augmentation draws its offsets there (on the CPU the same stream as before)
            gen = torch.Generator(device=self.device).manual_seed(self.config.train.seed + 1)
            aug = data_mod.Augment(self.data.in_shape, self.data.flip, gen) if self.config.data.augment else None
            self._train_loader = self._loader(self.data.train, self.config.data.batch_size, shuffle=True,
                                              seed=self.config.train.seed, transform=aug)
        return self._train_loader

    def eval_loader(self, split: str) -> data_mod.BatchLoader | data_mod.StreamLoader:
        """Unshuffled batches of 'val', 'test' or 'train_eval' (a fixed training subset)."""
        bs = max(self.config.data.batch_size, 512)
        if split == "train_eval":
            return self._loader(self.train_eval_split(), bs)
        return self._loader(getattr(self.data, split), bs)

    def train_eval_split(self) -> data_mod.Split | data_mod.StreamSplit:
        if self._train_eval is None:
            n, k = len(self.data.train), self.config.train.train_eval_size
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values
            if isinstance(self.data.train, data_mod.StreamSplit):
                self._train_eval = data_mod.StreamSplit(torch.utils.data.Subset(self.data.train.dataset,
                                                                                idx.tolist()))
            else:
                idx = idx.to(self.data.train.x.device)
                self._train_eval = data_mod.Split(self.data.train.x[idx], self.data.train.y[idx])
        return self._train_eval


def build(cfg: TrainConfig, device: str | torch.device | None = None,
          data: data_mod.DataBundle | None = None) -> Parts:
    """Model (seeded by train.seed, initialised, on device), optimizer, LR schedule, loss, penalty, data.

    ``data`` may be passed in to reuse an already loaded (device-resident) bundle of the same data config.
    ``data.residency: auto`` is resolved here when the bundle is loaded; ``Parts.config`` holds the resolved
    value (what a run records and saves, so a replay never depends on this machine's memory).
    """
    check_names(cfg)
    dev = resolve_device(device)
    bundle = data if data is not None else data_mod.load(cfg.data, dev)
    if cfg.data.residency != bundle.residency:
        cfg = cfg.with_overrides({"data.residency": bundle.residency})
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
