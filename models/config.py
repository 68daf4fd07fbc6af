"""TrainConfig: the ONE configuration format of regsweep (the bottom layer: it imports only models/yamlio.py).

Nested typed dataclasses, one per section (model, data, optim, regularization, scheduler, train). A config
round-trips exactly through a plain dict and YAML; the plain dict (``to_dict()``) is what checkpoints,
studies and exports store. ``from_dict`` rejects unknown keys, wrong types and out-of-range values with one
:class:`ConfigError` that names the dotted path, the value and what is allowed.

Where names are checked: this module checks structure, types and ranges only. The fields that name a
registry entry (:data:`NAMED_FIELDS`: model.name, model.init, model.activation, data.name, optim.name,
scheduler.name) and the stage count of ``model.widths`` are checked against the registries by
``regsweep.models.build.check_names``, which every loader path calls: ``load_config`` (``regsweep train``,
``python -m regsweep.models.train``), ``build``/``make_model`` (every trial, a user's own loop,
``load_checkpoint``), the spec parser's ``base:`` (``regsweep validate``/``run``, search/spec.py) and the
search-space check of every bound and choice (search/space.py). The messages have the same shape either way:
``path: value is not allowed; choose one of: ...``.

``model.name`` may also name a model by import path (``module:Factory``) or an installed ``regsweep.models`` plugin;
``model.args`` (a free mapping, :data:`FREE_MAPPINGS`) holds its keyword arguments as plain YAML data. Both are
resolved and checked against the factory's signature by ``regsweep.models.build`` (never here: this layer imports
no user code).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from regsweep.models.yamlio import ConfigError, clip, dump_yaml, excerpt, load_yaml_file, load_yaml_text

BN_PLACEMENTS = ("none", "before_act", "after_act")
PRECISIONS = ("fp32", "bf16", "fp16")
RESIDENCIES = ("auto", "device", "host", "stream")
# monitor -> +1 when lower is better, -1 when higher is better (one sign, applied at the edge)
MONITORS = {"val_loss": 1.0, "val_acc": -1.0, "train_loss": 1.0, "train_eval_loss": 1.0, "train_acc": -1.0}
# The fields whose value names a registry entry: checked by regsweep.models.build.check_names, not here.
NAMED_FIELDS = ("model.name", "model.init", "model.activation", "data.name", "optim.name", "scheduler.name")
# Mappings whose keys are free (keyword arguments of user code): a space may search ``model.args.KEY`` and
# ``with_overrides`` may set a key that is not there yet. Their values are plain YAML data (_plain).
FREE_MAPPINGS = ("model.args", "data.args")
KWARG_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# -------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    name: str = "cnn"  # registry: models.cnn / models.resnet
    widths: list[int] = field(default_factory=list)  # channels per stage; [] = the architecture's own
    hidden: int = 0  # units of a hidden FC layer before the classifier; 0 = flatten -> FC directly
    dropout: float = 0.0  # Dropout2d after each block's activation, Dropout before the classifier
    bn: str = "none"  # none | before_act (conv->BN->act) | after_act (conv->act->BN)
    init: str = "default"  # registry: models.init
    activation: str = "relu"  # relu | gelu | silu | elu | leaky_relu
    # keyword arguments of a model by import path or plugin (model.name "pkg.mod:Factory"); {} for built-ins
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "digits"  # registry: models.data
    root: Optional[str] = None  # directory holding the dataset's files (real image datasets)
    val_fraction: float = 0.2
    test_fraction: float = 0.2  # for datasets without an official test split
    split_seed: int = 0  # the ONLY source of the train/val/test split
    batch_size: int = 64
    augment: bool = False  # random crop with padding + horizontal flip (image datasets)
    num_workers: int = 0  # DataLoader workers when the data does not fit on the device
    download: bool = False  # let torchvision download into root (never by default)
    n_samples: int = 2000  # synthetic only
    shape: list[int] = field(default_factory=lambda: [1, 8, 8])  # synthetic only: C, H, W
    num_classes: int = 10  # synthetic only
    label_noise: float = 0.0  # fraction of TRAINING labels replaced at random (seeded by split_seed)
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a dataset given by import path
    train_fraction: float = 1.0  # seeded subset of the training split (from split_seed); val/test unchanged
    residency: str = "auto"  # auto | device | host | stream; resolved once at trial start and recorded
    memory_budget_mb: Optional[float] = None  # auto: largest dataset held whole; null = a default per device


@dataclass
class OptimConfig:
    name: str = "adamw"  # sgd | adam | adamw
    lr: float = 1.0e-3
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    weight_decay: float = 0.0  # always decoupled (p <- p - lr*wd*p), weights with dim >= 2 only


@dataclass
class RegularizationConfig:
    l1: float = 0.0  # + l1 * sum|w| over weights with dim >= 2
    l2: float = 0.0  # + l2 * sum w^2 over weights with dim >= 2
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0 = off
    cutmix_alpha: float = 0.0  # 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed when mixup/cutmix is on
    input_noise_std: float = 0.0  # Gaussian noise added to (normalised) training inputs


@dataclass
class SchedulerConfig:
    name: str = "none"  # none|step|multistep|exponential|cosine|plateau|onecycle|warmup_cosine
    step_size: int = 10  # step
    gamma: float = 0.1  # step, multistep, exponential
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # multistep
    eta_min: float = 0.0  # cosine, warmup_cosine
    warmup_epochs: int = 1  # warmup_cosine
    factor: float = 0.1  # plateau
    patience: int = 2  # plateau
    max_lr: Optional[float] = None  # onecycle; None = 10 x optim.lr
    pct_start: float = 0.3  # onecycle


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val_loss"
    patience: Optional[int] = None  # None = off; else stop after this many epochs without improvement
    min_delta: float = 0.0
    restore_best: bool = True  # end with the best epoch's weights (the trial's value is that epoch's)


@dataclass
class TrainSection:
    epochs: int = 20
    seed: int = 0  # weights, dropout, shuffling; never the split
    num_threads: Optional[int] = None  # torch intra-op threads; None = torch's default (recorded)
    deterministic: bool = True
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    channels_last: bool = False
    compile: bool = False
    train_eval_size: int = 512  # fixed training subset scored in eval mode each epoch (train_eval_loss)


SECTIONS = ("model", "data", "optim", "regularization", "scheduler", "train")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainSection = field(default_factory=TrainSection)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str | None = None) -> "TrainConfig":
        """Build and validate; errors are prefixed with ``source`` (a file name) when given."""
        try:
            cfg = _build(cls, {} if data is None else data, "")
            cfg.validate()
        except ConfigError as exc:
            if source:
                raise ConfigError(f"{source}: {exc}") from None
            raise
        return cfg

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> "TrainConfig":
        return cls.from_dict(load_yaml_text(text, source), source)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_yaml_file(path), str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        """A new, validated config with dotted-path values replaced: ``{"model.dropout": 0.3}``."""
        data = self.to_dict()
        for path, value in overrides.items():
            set_path(data, path, value)
        return TrainConfig.from_dict(data)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Structure and ranges (registry names: ``regsweep.models.build.check_names``)."""
        _validate(self)


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested plain dict; unknown paths raise ConfigError."""
    keys = path.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        free = i == len(keys) - 1 and ".".join(keys[:i]) in FREE_MAPPINGS and isinstance(node, dict)
        if free and not KWARG_RE.fullmatch(key):
            raise ConfigError(f"{path}: {clip(key, 60)!r} is not a keyword argument name (letters, digits, _)")
        if not free and (not isinstance(node, dict) or key not in node):
            raise ConfigError(f"{path}: unknown config path; '{'.'.join(keys[: i + 1])}' does not exist")
        if i == len(keys) - 1:
            node[key] = copy.deepcopy(value)
        else:
            node = node[key]


def get_path(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise ConfigError(f"{path}: unknown config path")
        node = node[key]
    return node


def config_paths() -> dict[str, Any]:
    """Every leaf dotted path of TrainConfig with its type annotation (for search-space checks)."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        for f, tp in _hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f}.")
            else:
                out[f"{prefix}{f}"] = tp

    walk(TrainConfig, "")
    return out


# ------------------------------------------------------------------------------------ typed building
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {excerpt(value)}")
        return _build(tp, value, f"{path}.")
    if origin is dict:  # a free mapping of keyword arguments (model.args, data.args)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of keyword arguments, got {excerpt(value)}")
        for key in value:
            if not isinstance(key, str) or not KWARG_RE.fullmatch(key):
                raise ConfigError(f"{path}: {excerpt(key)} is not a keyword argument name (letters, digits, _)")
        return _plain(value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a {_type_name(tp)}, got {excerpt(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every annotation above is covered
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {excerpt(value)}")


def _plain(value: Any, path: str) -> Any:
    """A deep copy of plain YAML data (null, booleans, finite numbers, strings, lists, string-keyed mappings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError(f"{path}: {excerpt(value)} is not allowed; use plain YAML data (null, booleans, finite "
                      "numbers, strings, lists, mappings with string keys)")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a config dataclass, once per class (it evaluates every annotation string
    anew on each call; a config is built per trial, and per spec check)."""
    return typing.get_type_hints(cls)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {excerpt(data)}")
    hints = _hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{prefix}{clip(unknown[0], 60)}: unknown key in {where}; allowed: {', '.join(hints)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


# ------------------------------------------------------------------------------------ value checks
def check(ok: bool, path: str, value: Any, allowed: str) -> None:
    """Raise the one-line ConfigError ``path: value is not allowed; allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{path}: {excerpt(value)} is not allowed; {allowed}")


def check_choice(path: str, value: Any, names: list[str]) -> None:
    """``value`` must be one of ``names`` (the message lists every choice)."""
    check(value in names, path, value, f"choose one of: {', '.join(names)}")


MAX_EPOCHS = 100_000  # a sane bound: 10**9 epochs was accepted and ran "forever"


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _validate(cfg: TrainConfig) -> None:
    """Every range check of every section; long because it is a flat table, one ``check`` per field, which
    reads (and diffs) better than one helper per section."""
    m = cfg.model
    check(all(w >= 1 for w in m.widths), "model.widths", m.widths, "must be positive integers ([] = default)")
    check(m.hidden >= 0, "model.hidden", m.hidden, "must be >= 0")
    check(_finite(m.dropout) and 0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    check(m.bn in BN_PLACEMENTS, "model.bn", m.bn, f"choose one of: {', '.join(BN_PLACEMENTS)}")

    d = cfg.data
    check(_finite(d.val_fraction) and 0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction,
           "must be in (0, 1)")
    check(_finite(d.test_fraction) and 0.0 <= d.test_fraction < 1.0, "data.test_fraction",
           d.test_fraction, "must be in [0, 1)")
    check(d.val_fraction + d.test_fraction < 1.0, "data.test_fraction", d.test_fraction,
           f"val_fraction + test_fraction must be < 1 (val_fraction is {d.val_fraction})")
    check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    check(d.n_samples >= 10, "data.n_samples", d.n_samples, "must be >= 10")
    check(len(d.shape) == 3 and all(s >= 1 for s in d.shape), "data.shape", d.shape,
           "must be [channels, height, width] of positive integers")
    check(d.num_classes >= 2, "data.num_classes", d.num_classes, "must be >= 2")
    check(_finite(d.label_noise) and 0.0 <= d.label_noise <= 1.0, "data.label_noise", d.label_noise,
           "must be in [0, 1]")
    check(_finite(d.train_fraction) and 0.0 < d.train_fraction <= 1.0, "data.train_fraction", d.train_fraction,
           "must be in (0, 1]")
    check(d.residency in RESIDENCIES, "data.residency", d.residency, f"choose one of: {', '.join(RESIDENCIES)}")
    check(d.memory_budget_mb is None or (_finite(d.memory_budget_mb) and d.memory_budget_mb > 0),
           "data.memory_budget_mb", d.memory_budget_mb, "must be > 0 or null (a default per device)")

    o = cfg.optim
    check(_finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be > 0")
    check(_finite(o.momentum) and 0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "must be in [0, 1)")
    check(len(o.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in o.betas), "optim.betas",
           o.betas, "must be two numbers in [0, 1)")
    check(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay,
           "must be >= 0")
    check(not (o.nesterov and o.name == "sgd" and o.momentum == 0), "optim.nesterov", o.nesterov,
           "nesterov needs optim.momentum > 0")

    r = cfg.regularization
    for key in ("l1", "l2", "mixup_alpha", "cutmix_alpha", "input_noise_std"):
        v = getattr(r, key)
        check(_finite(v) and v >= 0, f"regularization.{key}", v, "must be >= 0")
    check(_finite(r.label_smoothing) and 0.0 <= r.label_smoothing < 1.0, "regularization.label_smoothing",
           r.label_smoothing, "must be in [0, 1)")
    check(_finite(r.mix_prob) and 0.0 <= r.mix_prob <= 1.0, "regularization.mix_prob", r.mix_prob,
           "must be in [0, 1]")

    s = cfg.scheduler
    check(s.step_size >= 1, "scheduler.step_size", s.step_size, "must be >= 1")
    check(_finite(s.gamma) and 0.0 < s.gamma <= 1.0, "scheduler.gamma", s.gamma, "must be in (0, 1]")
    check(all(b > a for a, b in zip(s.milestones, s.milestones[1:])) and all(x >= 1 for x in s.milestones),
           "scheduler.milestones", s.milestones, "must be increasing positive integers")
    check(_finite(s.eta_min) and 0 <= s.eta_min < o.lr, "scheduler.eta_min", s.eta_min,
           f"must be >= 0 and < optim.lr ({o.lr})")
    check(s.warmup_epochs >= 0, "scheduler.warmup_epochs", s.warmup_epochs, "must be >= 0")
    check(_finite(s.factor) and 0.0 < s.factor < 1.0, "scheduler.factor", s.factor, "must be in (0, 1)")
    check(s.patience >= 0, "scheduler.patience", s.patience, "must be >= 0")
    check(s.max_lr is None or (_finite(s.max_lr) and s.max_lr > 0), "scheduler.max_lr", s.max_lr,
           "must be > 0 or null (10 x optim.lr)")
    check(_finite(s.pct_start) and 0.0 < s.pct_start < 1.0, "scheduler.pct_start", s.pct_start,
           "must be in (0, 1)")

    t = cfg.train
    check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    check(t.epochs <= MAX_EPOCHS, "train.epochs", t.epochs, f"must be <= {MAX_EPOCHS}")
    check(t.num_threads is None or t.num_threads >= 1, "train.num_threads", t.num_threads,
           "must be >= 1 or null")
    check(t.precision in PRECISIONS, "train.precision", t.precision, f"choose one of: {', '.join(PRECISIONS)}")
    check(t.train_eval_size >= 1, "train.train_eval_size", t.train_eval_size, "must be >= 1")
    es = t.early_stopping
    check(es.monitor in MONITORS, "train.early_stopping.monitor", es.monitor,
           f"choose one of: {', '.join(MONITORS)}")
    check(es.patience is None or es.patience >= 1, "train.early_stopping.patience", es.patience,
           "must be >= 1 or null (off)")
    check(_finite(es.min_delta) and es.min_delta >= 0, "train.early_stopping.min_delta", es.min_delta,
           "must be >= 0")
