"""Datasets outside the registry and the items every dataset is read as.

``data.name`` may name a torchvision dataset class (``torchvision:CIFAR100``: its own class, ``root=data.root``,
``download=data.download``, its official train/test split), a user factory by import path (``my_pkg.data:make``
returning ``(train, test)`` map-style Datasets, ``test`` may be None; ``data.args`` are its keyword arguments) or an
installed ``regsweep.datasets`` entry point: each is opened as a :class:`~regsweep.models.datasets.Source` of
``(tensor or PIL image, int)`` items. :func:`open_dataset` opens any ``data.name`` (registered ones in
:mod:`regsweep.models.datasets`), :func:`check_name` checks its form and :func:`check_files` that it opens.
:class:`Items` reads a Dataset's items as ``(float32 C x H x W tensor in [0, 1], int)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from regsweep.models import plugins
from regsweep.models.config import ConfigError, DataConfig, check_choice
from regsweep.models.datasets import (
    DATASETS,
    RawData,
    Source,
    check_registered_files,
    data_root,
    downloading,
    message_line,
)
from regsweep.models.yamlio import excerpt

# torchvision classes of natural images, where a horizontal flip keeps the label
NATURAL = {"CIFAR10", "CIFAR100", "STL10", "ImageFolder", "ImageNet", "Food101", "Flowers102", "OxfordIIITPet",
           "StanfordCars", "FGVCAircraft", "DTD", "Caltech101", "Caltech256", "SUN397", "Places365",
           "Country211", "GTSRB", "EuroSAT", "PCAM", "FER2013", "CelebA"}
TORCHVISION = "torchvision:"


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    cls_name = name[len(TORCHVISION):]
    cls = getattr(tvd, cls_name, None) if cls_name.isidentifier() and not cls_name.startswith("_") else None
    if not isinstance(cls, type):
        raise ConfigError(f"data.name: {excerpt(name)} is not allowed; torchvision.datasets has no class "
                          f"{excerpt(cls_name)} (e.g. torchvision:CIFAR100, torchvision:SVHN, torchvision:STL10)")
    return cls


def _torchvision(cfg: DataConfig) -> Source:
    """``torchvision:CLASS``: torchvision's own class, ``root=data.root``, ``download=data.download``, the
    official split as its ``train=True/False`` or ``split="train"/"test"`` argument; ``data.args`` too."""
    import inspect

    cls = _torchvision_class(cfg.name)
    root = data_root(cfg)
    params = inspect.signature(cls).parameters
    if "train" in params:
        splits: list[Optional[dict[str, Any]]] = [{"train": True}, {"train": False}]
    elif "split" in params:
        splits = [{"split": "train"}, {"split": "test"}]
    else:
        splits = [{}, None]  # no official split argument: one set, split by split_seed
    if not cfg.download and not root.is_dir():
        raise ConfigError(f"data.root: {cfg.root!r} is not an existing directory ({root}); give the directory that "
                          f"holds the {cfg.name} files, or set data.download: true")
    extra = {"download": cfg.download} if "download" in params else {}

    def make(split: dict[str, Any]):
        kwargs = {**cfg.args, **split, **extra}
        try:
            if cfg.download:
                return downloading(root, cfg.name, lambda: cls(str(root), **kwargs))
            return cls(str(root), **kwargs)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - missing/corrupt files, a bad argument: one line
            how = "put its files there or set data.download: true" if not cfg.download else "check data.args"
            raise ConfigError(f"data.root: {cfg.name} could not be read from {root} ({type(exc).__name__}: "
                              f"{message_line(exc)}); {how}") from None

    train = make(splits[0])
    test = make(splits[1]) if splits[1] is not None else None
    return Source(train, test, _count_classes(train), flip=cls.__name__ in NATURAL)


def _count_classes(ds: Any) -> Optional[int]:
    """The number of classes a dataset states (``num_classes``, ``classes``) or its label array implies."""
    for attr in ("num_classes",):
        n = getattr(ds, attr, None)
        if isinstance(n, int) and n >= 1:
            return n
    classes = getattr(ds, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    for attr in ("targets", "labels"):
        y = getattr(ds, attr, None)
        if y is not None:
            try:
                arr = np.asarray(y)
                if arr.ndim == 1 and arr.size and np.issubdtype(arr.dtype, np.integer):
                    return int(arr.max()) + 1
            except (TypeError, ValueError):
                pass
    return None


def _user_factory(cfg: DataConfig, base_dir: Optional[str | Path]) -> Callable[..., Any]:
    if plugins.is_ref(cfg.name):
        return plugins.load_ref(cfg.name, "data.name", base_dir)
    return plugins.load_entry_point("dataset", cfg.name, "data.name")


def _user_dataset(cfg: DataConfig, base_dir: Optional[str | Path]) -> Source:
    """A factory by import path (or entry point) called with ``data.args``: ``(train, test)`` Datasets."""
    factory = _user_factory(cfg, base_dir)
    try:
        got = factory(**cfg.args)
    except TypeError as exc:
        raise ConfigError(f"data.args: {excerpt(cfg.args)} is not allowed; {cfg.name} raised TypeError: "
                          f"{message_line(exc)}") from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory raised: one line with its reason
        raise ConfigError(f"data.name: {cfg.name!r} raised {type(exc).__name__}: {message_line(exc)}") from None
    if not (isinstance(got, tuple) and len(got) == 2):
        raise ConfigError(f"data.name: {cfg.name!r} returned a {type(got).__name__}; it must return a tuple "
                          "(train, test) of map-style torch.utils.data.Dataset (test may be None)")
    train, test = got
    for which, ds in (("train", train), ("test", test)):
        if ds is None and which == "test":
            continue
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")) or isinstance(ds, (str, bytes, dict)):
            raise ConfigError(f"data.name: {cfg.name!r} returned a {type(ds).__name__} as its {which} set; it must "
                              "be a map-style torch.utils.data.Dataset (__len__ and __getitem__)")
    return Source(train, test, _count_classes(train), flip=bool(getattr(train, "hflip", False)))


def is_source_name(name: str) -> bool:
    """Is ``name`` a dataset outside the registry (torchvision class, import path, entry point)?"""
    return name not in DATASETS.names()


def open_dataset(cfg: DataConfig, base_dir: Optional[str | Path] = None) -> "RawData | Source":
    """The dataset ``data.name`` names, opened: RawData (registered tensor datasets) or a Source."""
    if cfg.name.startswith(TORCHVISION):
        return _torchvision(cfg)
    if cfg.name in DATASETS.names():
        if cfg.args:
            check_files(cfg)  # says data.args are not for it
        return DATASETS.get(cfg.name)(cfg)
    return _user_dataset(cfg, base_dir)


def check_name(name: Any) -> None:
    """``data.name`` is a registered dataset, ``torchvision:CLASS``, an import path or an installed
    ``regsweep.datasets`` entry point (syntax only: nothing is imported but the entry-point list)."""
    if isinstance(name, str) and (name in DATASETS.names() or name.startswith(TORCHVISION)
                                  or (plugins.is_ref(name) and plugins.REF.fullmatch(name))):
        return
    eps = sorted(plugins.entry_points("dataset")) if isinstance(name, str) else []
    if name in eps:
        return
    check_choice("data.name", name, [*DATASETS.names(), *eps, "torchvision:CLASS", "package.module:function"])


def check_files(cfg: DataConfig, base_dir: Optional[str | Path] = None) -> None:
    """What `validate`, `run` and `train` check before any trial: the files a registered file-based dataset
    (mnist, fashion_mnist, cifar10) loads are there (nothing is read; nothing to check with data.download); an
    image folder has its class folders (train/ and test/ the same ones) and the first image of each split
    decodes (one directory listing per folder, never a walk of the tree); a torchvision class or a user dataset
    opens (downloading when data.download says so) and the first item of each split is an (image, int) pair.
    Every failure is one ConfigError line."""
    if cfg.name in DATASETS.names():
        check_registered_files(cfg)
        return
    import sys

    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # a check writes nothing, no __pycache__ either
    try:
        source = open_dataset(cfg, base_dir)
    finally:
        sys.dont_write_bytecode = before
    for which, ds in (("train", source.train), ("test", source.test)):
        if ds is not None:
            first_item(ds, f"data.name: {cfg.name!r}: its {which} set")


# ------------------------------------------------------------------------------ items
def to_image_tensor(x: Any) -> torch.Tensor:
    """A dataset item's image as float32 C x H x W in [0, 1]: PIL images and uint8 arrays are scaled, float
    tensors kept; a 2-D image gets a channel axis."""
    from PIL import Image

    if isinstance(x, Image.Image):
        from torchvision.transforms.v2 import functional as F

        return F.to_dtype(F.to_image(x), torch.float32, scale=True).as_subclass(torch.Tensor)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"an image must be a tensor or a PIL image, got {type(x).__name__}")
    x = x.as_subclass(torch.Tensor)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise TypeError(f"an image tensor must be C x H x W or H x W, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise TypeError(f"an image tensor must be float or uint8, got {x.dtype}")
    return x.float()


def to_label(y: Any) -> int:
    """A dataset item's label as an int (Python/numpy integers, 0-dim integer tensors or arrays)."""
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    if isinstance(y, torch.Tensor) and y.dim() == 0 and not y.is_floating_point() and y.dtype != torch.bool:
        return int(y)
    if isinstance(y, np.ndarray) and y.ndim == 0 and np.issubdtype(y.dtype, np.integer):
        return int(y)
    raise TypeError(f"a label must be an int, got {type(y).__name__} {excerpt(y)}")


class Items(torch.utils.data.Dataset):
    """``base[indices[i]]`` as ``(float32 C x H x W tensor in [0, 1], int label)``; ``labels`` replaces the
    labels (label noise). Picklable: DataLoader workers read it."""

    def __init__(self, base: Any, indices: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None):
        self.base = base
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i]) if self.indices is not None else i
        item = self.base[j]
        x, y = item[0], item[1]
        if self.labels is not None and self.labels[i] >= 0:
            return to_image_tensor(x), int(self.labels[i])
        return to_image_tensor(x), to_label(y)


def first_item(ds: Any, what: str) -> tuple[torch.Tensor, int]:
    """``ds[0]`` decoded and type-checked; one ConfigError line naming ``what`` otherwise."""
    if len(ds) < 1:
        raise ConfigError(f"{what} is empty; it must hold at least one (image, label) item")
    try:
        item = ds[0]
    except Exception as exc:  # noqa: BLE001 - a missing or undecodable file, the user's __getitem__
        raise ConfigError(f"{what}: reading item 0 raised {type(exc).__name__}: {message_line(exc)}") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise ConfigError(f"{what}: item 0 is a {type(item).__name__}; items must be (image, label) pairs: "
                          "(tensor or PIL image, int)")
    try:
        return to_image_tensor(item[0]), to_label(item[1])
    except TypeError as exc:
        raise ConfigError(f"{what}: item 0 is not allowed; {exc}; items must be (tensor or PIL image, int)") from None
