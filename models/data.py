"""Datasets, splits, residency and the batch loaders.

A dataset is one of: a registered name (``digits``, ``mnist``, ``cifar10``, ``image_folder``, ...), a torchvision
dataset class by name (``torchvision:CIFAR100``: its own class, ``root=data.root``, ``download=data.download``,
its official train/test split), a user factory by import path (``my_pkg.data:make`` returning ``(train, test)``
map-style Datasets, ``test`` may be None; ``data.args`` are its keyword arguments) or an installed
``regsweep.datasets`` entry point. Registered names return raw tensors (:class:`RawData`: images N x C x H x W
in [0, 1], integer labels); the others return Datasets of ``(tensor or PIL image, int)`` items
(:class:`Source`).

:func:`load` splits by ``data.split_seed`` ALONE (train.seed never touches it; ``data.train_fraction`` keeps a
seeded subset of the training split), records a fingerprint (hash of the index lists), applies label noise to
training labels only and normalises per channel with TRAINING statistics. Where the data lives is
``data.residency``, resolved once (:func:`resolve_residency`): ``device`` (tensors on the training device,
batches by shuffled index: :class:`BatchLoader`), ``host`` (tensors in host memory, pinned on CUDA, copied per
batch) or ``stream`` (a ``torch.utils.data.DataLoader`` with ``data.num_workers`` workers, persistent workers,
pinned memory on CUDA and non-blocking copies: :class:`StreamLoader`; normalisation and augmentation happen on
the device). ``auto`` streams folders of encoded images and datasets larger than ``data.memory_budget_mb``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from regsweep.models import plugins
from regsweep.models.config import ConfigError, DataConfig, check_choice
from regsweep.models.registry import Registry
from regsweep.models.yamlio import excerpt


@dataclass
class RawData:
    x: torch.Tensor  # float32 N x C x H x W in [0, 1]
    y: torch.Tensor  # int64 N
    num_classes: int
    x_test: Optional[torch.Tensor] = None  # official test split, if the dataset has one
    y_test: Optional[torch.Tensor] = None
    flip: bool = False  # horizontal flips preserve the label (natural images, not digits)


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    in_shape: tuple[int, int, int]
    num_classes: int
    fingerprint: str  # sha256 prefix of the train/val/test index lists
    flip: bool
    mean: list[float]
    std: list[float]
    residency: str = "device"  # device | host (Splits of tensors) | stream (StreamSplits of Datasets)

    def to(self, device: torch.device | str) -> "DataBundle":
        """On ``device`` (residency device); host keeps the tensors in host memory (pinned for CUDA); a
        streamed bundle holds no tensors to move."""
        dev = torch.device(device)
        if self.residency == "stream":
            return self

        def move(s: Split) -> Split:
            if self.residency == "host":
                if dev.type != "cuda":
                    return s
                return Split(s.x.pin_memory(), s.y.pin_memory())
            return Split(s.x.to(dev, non_blocking=True), s.y.to(dev, non_blocking=True))

        return DataBundle(move(self.train), move(self.val), move(self.test), self.in_shape, self.num_classes,
                          self.fingerprint, self.flip, self.mean, self.std, self.residency)


DATASETS: Registry[Callable[[DataConfig], RawData]] = Registry("dataset")


@DATASETS.register("digits")
def _digits(cfg: DataConfig) -> RawData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): the offline default."""
    images, target = _digits_arrays()
    return RawData(torch.from_numpy(images / 16.0).unsqueeze(1), torch.from_numpy(target.copy()), 10)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """load_digits' images (float32) and targets (int64), read once per process (a worker or the tests train
    many trials in one). Read from scikit-learn's bundled ``digits.csv.gz`` directly, as ``load_digits`` parses
    it, without importing scikit-learn (~0.5 s per process, more than the file); ``load_digits`` itself where
    the file is not found. Read-only arrays: every caller makes its own tensors from them."""
    spec = find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    file = Path(folders[0], "datasets", "data", "digits.csv.gz") if folders else None
    if file is not None and file.is_file():
        with gzip.open(file, "rt", encoding="utf-8") as f:
            data = np.loadtxt(f, delimiter=",")
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    images, target = images.astype(np.float32), target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False
    return images, target


@DATASETS.register("synthetic")
def _synthetic(cfg: DataConfig) -> RawData:
    """Learnable random images of ``data.shape``: one smooth prototype per class plus noise (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    c, h, w = cfg.shape
    protos = torch.rand(cfg.num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    protos = torch.nn.functional.interpolate(protos, size=(h, w), mode="bilinear", align_corners=False)
    y = torch.randint(cfg.num_classes, (cfg.n_samples,), generator=g)
    x = (0.6 * protos[y] + 0.4 * torch.rand(cfg.n_samples, c, h, w, generator=g)).clamp_(0, 1)
    return RawData(x, y, cfg.num_classes)


# ------------------------------------------------------------------------------ real image datasets
def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root: required for dataset '{cfg.name}'; give the directory that holds its files")
    return Path(os.path.expanduser(cfg.root))


def _find(folder: Path, name: str, how: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"data.root: {folder / name} not found; {how}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped: big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"data.root: {path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"data.root: {path} is truncated: {data.size} bytes for shape {dims}")
    return data.reshape(dims)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _idx_place(root: Path, folder_name: str) -> tuple[Path, str]:
    raw = root / folder_name / "raw"
    return raw, (f"put the {folder_name} IDX files ({', '.join(IDX_FILES)}; .gz accepted) there, "
                 "or set data.download: true")


def _cifar_place(root: Path) -> tuple[Path, str]:
    folder = root / "cifar-10-batches-py"
    return folder, ("extract cifar-10-python.tar.gz there (data_batch_1..5, test_batch), "
                    "or set data.download: true")


def check_files(cfg: DataConfig, base_dir: Optional[str | Path] = None) -> None:
    """What `validate`, `run` and `train` check before any trial: the files a registered file-based dataset
    (mnist, fashion_mnist, cifar10) loads are there (nothing is read; nothing to check with data.download); an
    image folder has its class folders (train/ and test/ the same ones) and the first image of each split
    decodes (one directory listing per folder, never a walk of the tree); a torchvision class or a user dataset
    opens (downloading when data.download says so) and the first item of each split is an (image, int) pair.
    Every failure is one ConfigError line."""
    if cfg.args and cfg.name in DATASETS.names():
        raise ConfigError(f"data.args: {excerpt(cfg.args)} is not allowed for data.name {cfg.name!r}; "
                          "data.args are for datasets given by import path or torchvision:CLASS")
    if cfg.name == "image_folder":
        _check_image_folder(cfg)
        return
    if cfg.name in DATASETS.names():
        _check_registered_files(cfg)
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


def _check_registered_files(cfg: DataConfig) -> None:
    if cfg.name not in (*IDX_FOLDERS, "cifar10"):
        return
    root = _root(cfg)
    if cfg.download:  # download now (torchvision skips files already there): a failure is one line here
        import torchvision.datasets as tvd

        cls = getattr(tvd, IDX_FOLDERS.get(cfg.name, "CIFAR10"))
        for train in (True, False):
            downloading(root, cls.__name__, lambda: cls(str(root), train=train, download=True))
        return
    if not root.is_dir():
        raise ConfigError(f"data.root: {cfg.root!r} is not an existing directory ({root}); give the directory that "
                          "holds its files, or set data.download: true")
    if cfg.name in IDX_FOLDERS:
        folder, how = _idx_place(root, IDX_FOLDERS[cfg.name])
        files: tuple[str, ...] = IDX_FILES
    else:
        (folder, how), files = _cifar_place(root), CIFAR_FILES
    for name in files:
        _find(folder, name, how)


def _check_image_folder(cfg: DataConfig) -> None:
    from PIL import Image

    train_dir, test_dir = _folder_layout(cfg)
    classes = _class_dirs(train_dir)
    if not classes:
        raise ConfigError(f"data.root: {train_dir} has no class sub-folders; give a folder with one sub-folder per "
                          "class (or train/ and test/ holding them)")
    folders = [train_dir] + ([test_dir] if test_dir is not None else [])
    if test_dir is not None:
        test_classes = _class_dirs(test_dir)
        missing = sorted(set(classes) ^ set(test_classes))
        if missing:
            raise ConfigError(f"data.root: class folder {excerpt(missing[0])} is in only one of {train_dir} and "
                              f"{test_dir}; give both the same class folders")
    for folder in folders:
        first = None
        for cls in _class_dirs(folder):
            with os.scandir(folder / cls) as it:
                first = next((Path(e.path) for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
                             None)
            if first is not None:
                break
        if first is None:
            raise ConfigError(f"data.root: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of "
                              f"{folder}")
        try:
            with Image.open(first) as im:
                im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL's errors are many: one line
            raise ConfigError(f"data.root: {first} cannot be decoded ({type(exc).__name__}: {_first_line(exc)})") \
                from None


def _idx_dataset(cfg: DataConfig, folder_name: str, tv_class: str) -> RawData:
    root = _root(cfg)
    if cfg.download:
        import torchvision.datasets as tvd  # lazy: only when the user asks for a download

        for train in (True, False):
            downloading(root, tv_class, lambda: getattr(tvd, tv_class)(str(root), train=train, download=True))
    raw, how = _idx_place(root, folder_name)
    arrays = [read_idx(_find(raw, f, how)) for f in IDX_FILES]
    x, y, xt, yt = (torch.from_numpy(a.copy()) for a in arrays)
    return RawData(x.float().div_(255).unsqueeze(1), y.long(), 10, xt.float().div_(255).unsqueeze(1), yt.long())


@DATASETS.register("mnist")
def _mnist(cfg: DataConfig) -> RawData:
    """MNIST from ``<root>/MNIST/raw/`` (torchvision's layout); 60k train (split into train/val), 10k test."""
    return _idx_dataset(cfg, "MNIST", "MNIST")


@DATASETS.register("fashion_mnist")
def _fashion_mnist(cfg: DataConfig) -> RawData:
    """Fashion-MNIST from ``<root>/FashionMNIST/raw/`` (torchvision's layout)."""
    return _idx_dataset(cfg, "FashionMNIST", "FashionMNIST")


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only what they hold (dicts, lists, numpy arrays)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as exc:
        raise ConfigError(f"data.root: {path} is not a CIFAR-10 python batch ({exc})") from None
    return x, y


@DATASETS.register("cifar10")
def _cifar10(cfg: DataConfig) -> RawData:
    """CIFAR-10 python batches from ``<root>/cifar-10-batches-py/`` (data_batch_1..5, test_batch)."""
    root = _root(cfg)
    if cfg.download:
        import torchvision.datasets as tvd

        downloading(root, "CIFAR10", lambda: tvd.CIFAR10(str(root), train=True, download=True))
    folder, how = _cifar_place(root)
    train = [_cifar_batch(_find(folder, f"data_batch_{i}", how)) for i in range(1, 6)]
    xt, yt = _cifar_batch(_find(folder, "test_batch", how))
    x = torch.from_numpy(np.concatenate([a for a, _ in train])).float().div_(255)
    y = torch.from_numpy(np.concatenate([b for _, b in train]))
    return RawData(x, y, 10, torch.from_numpy(xt).float().div_(255), torch.from_numpy(yt), flip=True)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _image_transform(shape: list[int]):
    """Decoded image -> float32 C x H x W in [0, 1] of ``data.shape`` (C = 1 grey or 3 RGB)."""
    from torchvision.transforms import v2

    c, h, w = shape
    return v2.Compose([v2.ToImage(), v2.Resize((h, w), antialias=True), *([v2.Grayscale()] if c == 1 else []),
                       v2.ToDtype(torch.float32, scale=True)])


def _folder_layout(cfg: DataConfig) -> tuple[Path, Optional[Path]]:
    """(train folder, test folder or None) of an image_folder root: ``<root>/train`` + ``<root>/test`` when both
    exist, else the root itself holds the class folders."""
    root = _root(cfg)
    if not root.is_dir():
        raise ConfigError(f"data.root: {cfg.root!r} is not a directory ({root}); give a folder with one "
                          "sub-folder per class (or train/ and test/ holding them)")
    c = cfg.shape[0]
    if c not in (1, 3):
        raise ConfigError(f"data.shape: {cfg.shape} is not allowed for image_folder; channels must be 1 or 3")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root / "train", root / "test"
    return root, None


def _class_dirs(folder: Path) -> list[str]:
    """The class sub-folders of ``folder`` (one directory listing, never a walk)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


@DATASETS.register("image_folder")
def _image_folder(cfg: DataConfig) -> "Source":
    """Encoded images in ``<root>/<class>/*.png|jpg|...`` (torchvision's ImageFolder), decoded and resized to
    ``data.shape`` (C = 1 grey or 3 RGB) per item: any size (``residency: auto`` streams them). With
    ``<root>/train`` and ``<root>/test`` the test folder is the official test split."""
    from torchvision import datasets as tvd

    train_dir, test_dir = _folder_layout(cfg)
    tf = _image_transform(cfg.shape)

    def read(folder: Path):
        try:
            return tvd.ImageFolder(str(folder), transform=tf)  # its default loader converts to RGB
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"data.root: {folder}: {_first_line(exc)}") from None

    train = read(train_dir)
    test = read(test_dir) if test_dir is not None else None
    if test is not None and test.classes != train.classes:
        raise ConfigError(f"data.root: {test_dir} has classes {excerpt(test.classes)}, {train_dir} has "
                          f"{excerpt(train.classes)}; give both the same class folders")
    return Source(train, test, len(train.classes), flip=True, encoded=True)


# ------------------------------------------------------------------------------ Dataset sources
@dataclass
class Source:
    """A dataset as map-style Datasets of ``(tensor or PIL image, int label)`` items (torchvision classes, user
    factories, image folders); :func:`load` splits, normalises and streams or materialises it."""

    train: Any
    test: Any = None  # the official test split, or None (then split from train by split_seed)
    num_classes: Optional[int] = None  # None: from the labels once materialised
    flip: bool = False
    encoded: bool = False  # items are decoded from files on every read (image folders): auto streams them


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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return excerpt(lines[0], 160) if lines else type(exc).__name__


def _cleanup_after(root: Path, before: Optional[set[str]], created: Optional[Path]) -> None:
    """Remove what a failed download wrote: the root folders it created, or the new entries of an existing root."""
    import shutil

    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    elif before is not None and root.is_dir():
        for entry in root.iterdir():
            if entry.name not in before:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def downloading(root: Path, what: str, make: Callable[[], Any]) -> Any:
    """``make()`` (a torchvision constructor with download=True); a failure is one line and leaves ``root`` as
    it was (folders it created and files it added are removed)."""
    created = None
    for parent in (root, *root.parents):
        if parent.exists():
            break
        created = parent
    before = {e.name for e in root.iterdir()} if root.is_dir() else None
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - no network, a moved URL, a bad checksum: one line
        _cleanup_after(root, before, created)
        raise ConfigError(f"data.download: downloading {what} into {root} failed ({type(exc).__name__}: "
                          f"{_first_line(exc)}); put its files there yourself or check the network") from None


def _torchvision(cfg: DataConfig) -> Source:
    """``torchvision:CLASS``: torchvision's own class, ``root=data.root``, ``download=data.download``, the
    official split as its ``train=True/False`` or ``split="train"/"test"`` argument; ``data.args`` too."""
    import inspect

    cls = _torchvision_class(cfg.name)
    root = _root(cfg)
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
                              f"{_first_line(exc)}); {how}") from None

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
                          f"{_first_line(exc)}") from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory raised: one line with its reason
        raise ConfigError(f"data.name: {cfg.name!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
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
        raise ConfigError(f"{what}: reading item 0 raised {type(exc).__name__}: {_first_line(exc)}") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise ConfigError(f"{what}: item 0 is a {type(item).__name__}; items must be (image, label) pairs: "
                          "(tensor or PIL image, int)")
    try:
        return to_image_tensor(item[0]), to_label(item[1])
    except TypeError as exc:
        raise ConfigError(f"{what}: item 0 is not allowed; {exc}; items must be (tensor or PIL image, int)") from None


def split_indices(n: int, val_fraction: float, test_fraction: float, split_seed: int,
                  has_test: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index lists (train, val, test) from ``split_seed`` alone. With an official test split, only
    train/val are carved from the ``n`` training examples and the test list is empty."""
    perm = np.random.default_rng(split_seed).permutation(n)
    n_test = 0 if has_test else int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n - n_test - n_val < 1 or n_val < 1:
        raise ConfigError(f"data: {n} examples cannot be split into val_fraction={val_fraction} and "
                         f"test_fraction={test_fraction} with a non-empty train and val set")
    return np.sort(perm[n_test + n_val:]), np.sort(perm[n_test:n_test + n_val]), np.sort(perm[:n_test])


def fingerprint(name: str, *index_lists: np.ndarray) -> str:
    h = hashlib.sha256(name.encode())
    for idx in index_lists:
        h.update(len(idx).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def train_subset(train_idx: np.ndarray, fraction: float, split_seed: int) -> np.ndarray:
    """``data.train_fraction``: a seeded subset (from split_seed alone) of the training indices; val/test
    never change. 1.0 returns the indices as they are."""
    if fraction >= 1.0:
        return train_idx
    k = max(1, int(round(len(train_idx) * fraction)))
    pick = np.random.default_rng([split_seed, 2]).permutation(len(train_idx))[:k]
    return np.sort(train_idx[pick])


def split_for(cfg: DataConfig, n: int, has_test: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(train, val, test) index lists and their fingerprint: the split contract, the same on every residency."""
    tr, va, te = split_indices(n, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, has_test)
    tr = train_subset(tr, cfg.train_fraction, cfg.split_seed)
    return tr, va, te, fingerprint(cfg.name, tr, va, te)


def noisy_labels(cfg: DataConfig, y_train: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Training labels with ``data.label_noise`` of them replaced at random (seeded by split_seed)."""
    y = y_train.clone()
    if cfg.label_noise > 0:
        rng = np.random.default_rng([cfg.split_seed, 1])
        flip = torch.from_numpy(rng.random(len(y)) < cfg.label_noise)
        noise = torch.from_numpy(rng.integers(0, num_classes, len(y)))
        y[flip] = noise[flip]
    return y


# ------------------------------------------------------------------------------------ residency
MB = float(1 << 20)
STATS_MAX = 10_000  # streamed data: normalisation statistics from at most this many training items (seeded)


def host_memory_mb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8192.0


def default_budget_mb(device: torch.device | str) -> float:
    """``data.memory_budget_mb: null``: 40% of a CUDA device's memory, 25% of host memory otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return 0.4 * torch.cuda.get_device_properties(dev).total_memory / MB
    return 0.25 * host_memory_mb()


def size_mb(opened: "RawData | Source") -> float:
    """The float32 size of the whole dataset held as tensors (a Source: its length times its first item's)."""
    if isinstance(opened, RawData):
        n = opened.x.numel() + (opened.x_test.numel() if opened.x_test is not None else 0)
        return 4 * n / MB
    per_item = first_item(opened.train, "data: the train set")[0].numel()
    n = len(opened.train) + (len(opened.test) if opened.test is not None else 0)
    return 4 * per_item * n / MB


def resolve_residency(cfg: DataConfig, opened: "RawData | Source", device: torch.device | str) -> str:
    """``data.residency`` resolved once: an explicit value stays; ``auto`` streams folders of encoded images and
    data larger than ``data.memory_budget_mb`` (on CUDA: ``host`` when it fits a quarter of host memory)."""
    if cfg.residency != "auto":
        return cfg.residency
    if isinstance(opened, Source) and opened.encoded:
        return "stream"
    size, dev = size_mb(opened), torch.device(device)
    if size <= (cfg.memory_budget_mb or default_budget_mb(dev)):
        return "device"
    if dev.type == "cuda" and size <= 0.25 * host_memory_mb():
        return "host"
    return "stream"


def _items(source: Source) -> tuple[Items, Optional[Items]]:
    return Items(source.train), (Items(source.test) if source.test is not None else None)


def _loader(ds: Any, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)


def materialize(source: Source, cfg: DataConfig) -> RawData:
    """A Source read whole into tensors (residency device/host), in item order, decoded by ``data.num_workers``
    DataLoader workers."""
    def read(ds: Items) -> tuple[torch.Tensor, torch.Tensor]:
        first_item(ds.base, "data: the dataset")
        xs, ys = zip(*_loader(ds, 256, cfg.num_workers))
        return torch.cat(xs), torch.cat(ys).long()

    train, test = _items(source)
    x, y = read(train)
    xt, yt = read(test) if test is not None else (None, None)
    n = source.num_classes or int(max(int(y.max()), int(yt.max()) if yt is not None else 0)) + 1
    return RawData(x, y, n, xt, yt, flip=source.flip)


def load(cfg: DataConfig, device: torch.device | str | None = None, base_dir: Optional[str | Path] = None,
         opened: "RawData | Source | None" = None) -> DataBundle:
    """The split, normalised dataset on its resolved residency (``opened``: :func:`open_dataset`'s result, to
    reuse it)."""
    opened = opened if opened is not None else open_dataset(cfg, base_dir)
    residency = resolve_residency(cfg, opened, device if device is not None else "cpu")
    if residency == "stream":
        return _stream_bundle(cfg, opened)
    raw = opened if isinstance(opened, RawData) else materialize(opened, cfg)
    has_test = raw.x_test is not None
    tr, va, te, fp = split_for(cfg, len(raw.y), has_test)
    x_tr, y_tr = raw.x[tr], noisy_labels(cfg, raw.y[tr], raw.num_classes)
    x_te, y_te = (raw.x_test, raw.y_test) if has_test else (raw.x[te], raw.y[te])
    mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)
    std = x_tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).contiguous()

    bundle = DataBundle(Split(norm(x_tr), y_tr), Split(norm(raw.x[va]), raw.y[va]), Split(norm(x_te), y_te),
                        tuple(raw.x.shape[1:]), raw.num_classes, fp, raw.flip,
                        mean.flatten().tolist(), std.flatten().tolist(), residency)
    return bundle.to(device) if device is not None else bundle


@dataclass
class StreamSplit:
    """A split of a streamed dataset: a Dataset of (float32 C x H x W in [0, 1], int) items, not normalised."""

    dataset: Any

    def __len__(self) -> int:
        return len(self.dataset)


def _stream_bundle(cfg: DataConfig, opened: "RawData | Source") -> DataBundle:
    if isinstance(opened, RawData):
        test = (torch.utils.data.TensorDataset(opened.x_test, opened.y_test) if opened.x_test is not None else None)
        opened = Source(torch.utils.data.TensorDataset(opened.x, opened.y), test, opened.num_classes, opened.flip)
    if opened.num_classes is None:
        raise ConfigError(f"data.name: {cfg.name!r} states no number of classes, which streaming needs; give its "
                          "train set a `classes` list or a `num_classes` int (or set data.residency: device)")
    tr, va, te, fp = split_for(cfg, len(opened.train), opened.test is not None)
    labels = None
    if cfg.label_noise > 0:  # -1 keeps the item's own label; only training labels change
        rng = np.random.default_rng([cfg.split_seed, 1])
        flip = rng.random(len(tr)) < cfg.label_noise
        noise = rng.integers(0, opened.num_classes, len(tr))
        labels = np.where(flip, noise, -1)
    train = Items(opened.train, tr, labels)
    test = Items(opened.test) if opened.test is not None else Items(opened.train, te)
    x0, _ = first_item(train, f"data.name: {cfg.name!r}: its train set")
    mean, std = _stream_stats(cfg, train)
    return DataBundle(StreamSplit(train), StreamSplit(Items(opened.train, va)), StreamSplit(test),
                      tuple(x0.shape), opened.num_classes, fp, opened.flip, mean, std, "stream")


def _stream_stats(cfg: DataConfig, train: "Items") -> tuple[list[float], list[float]]:
    """Per-channel mean and std (unbiased, over every pixel) of the training split, in float64, read by
    ``data.num_workers`` workers; at most :data:`STATS_MAX` items (a subset seeded by split_seed)."""
    ds: Any = train
    if len(train) > STATS_MAX:
        pick = np.sort(np.random.default_rng([cfg.split_seed, 3]).permutation(len(train))[:STATS_MAX])
        ds = torch.utils.data.Subset(train, pick.tolist())
    total = sq = None
    count = 0
    for xb, _ in _loader(ds, 256, cfg.num_workers):
        xb = xb.double()
        s, q = xb.sum(dim=(0, 2, 3)), (xb * xb).sum(dim=(0, 2, 3))
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += xb.shape[0] * xb.shape[2] * xb.shape[3]
    mean = total / count
    var = (sq - count * mean * mean) / max(count - 1, 1)
    std = var.clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float().tolist(), std.float().tolist()


# ------------------------------------------------------------------------------------ augmentation
def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch back to its size (one gather, no Python loop).

    The offsets are drawn on ``gen``'s device: with a generator on the batch's device (as
    :meth:`models.build.Parts.train_loader` makes it) no host->device copy happens per batch."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[n_idx, c_idx, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


class Augment:
    """Random crop with padding (1/8 of the side) and, for natural images, horizontal flips: tensor ops on the
    batch's device, random numbers from ``gen`` (on that device too, so nothing is copied per batch)."""

    def __init__(self, in_shape: tuple[int, int, int], flip: bool, gen: torch.Generator):
        self.pad = max(1, min(in_shape[1:]) // 8)
        self.flip = flip
        self.gen = gen

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = random_crop(x, self.pad, self.gen)
        return random_flip(x, self.gen) if self.flip else x


# ------------------------------------------------------------------------------------ batching
class BatchLoader:
    """Batches of a (device-resident) split by shuffled index.

    The permutation comes from a CPU ``torch.Generator`` seeded once, exactly as
    ``DataLoader(RandomSampler(generator=g))`` draws it, so for a seed both yield the same batches.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, device=None):
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.transform = transform
        self.device = torch.device(device) if device is not None else split.x.device

    def __len__(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.split.x.device)
            # RandomSampler also draws the (empty) remainder permutation each epoch; drawing it too keeps
            # the generator stream, and so every later epoch, identical to DataLoader's.
            torch.randperm(n, generator=self.generator)
        else:
            order = None
        for start in range(0, n, self.batch_size):
            if order is None:
                xb = self.split.x[start:start + self.batch_size]
                yb = self.split.y[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                xb, yb = self.split.x[idx], self.split.y[idx]
            if xb.device != self.device:
                xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, yb


class StreamLoader:
    """Batches of a streamed split from a ``torch.utils.data.DataLoader``: ``num_workers`` workers (persistent),
    pinned memory and non-blocking copies on CUDA; on the device each batch is normalised with the training
    statistics and then augmented (``transform``, tensor ops).

    The shuffle order comes from a ``RandomSampler`` on a CPU generator seeded with ``seed`` (train.seed): the
    same batches as :class:`BatchLoader` with that seed. The workers' base seeds come from a second seeded
    generator (nothing random runs in the workers; the seeds are fixed anyway)."""

    def __init__(self, split: StreamSplit, batch_size: int, *, mean: list[float], std: list[float],
                 shuffle: bool = False, seed: int = 0, device=None, num_workers: int = 0,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.split = split
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.transform = transform
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        sampler = torch.utils.data.RandomSampler(split.dataset, generator=self.generator) if shuffle else None
        self.loader = torch.utils.data.DataLoader(
            split.dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed + 0x5EED))
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(shape).to(self.device)
        self.std = torch.tensor(std, dtype=torch.float32).view(shape).to(self.device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in self.loader:
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            xb = ((xb - self.mean) / self.std).contiguous()
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, yb
