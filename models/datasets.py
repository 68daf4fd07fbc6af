"""The registered datasets (``data.name``: ``digits``, ``synthetic``, ``mnist``, ``fashion_mnist``, ``cifar10``,
``image_folder``) and the two shapes an opened dataset takes: :class:`RawData` (tensors) and :class:`Source`
(map-style Datasets of items).

Registered names return raw tensors (images N x C x H x W in [0, 1], integer labels), except ``image_folder``,
a Source of encoded images. The file-based ones read torchvision's layouts under ``data.root`` (MNIST and
Fashion-MNIST IDX files, CIFAR-10 python batches, a folder per class) and download through torchvision only when
``data.download`` says so (:func:`downloading`). Other datasets are opened in :mod:`regsweep.models.sources`;
:mod:`regsweep.models.data` splits, normalises and batches them.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from regsweep.models.config import ConfigError, DataConfig
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
class Source:
    """A dataset as map-style Datasets of ``(tensor or PIL image, int label)`` items (torchvision classes, user
    factories, image folders); :func:`regsweep.models.data.load` splits, normalises and streams or materialises it."""

    train: Any
    test: Any = None  # the official test split, or None (then split from train by split_seed)
    num_classes: Optional[int] = None  # None: from the labels once materialised
    flip: bool = False
    encoded: bool = False  # items are decoded from files on every read (image folders): auto streams them


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
def data_root(cfg: DataConfig) -> Path:
    """``data.root`` with ``~`` expanded; one ConfigError line when it is not given."""
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


def check_registered_files(cfg: DataConfig) -> None:
    """:func:`regsweep.models.sources.check_files` for a registered dataset: ``data.args`` are refused; an image
    folder has its class folders and its first images decode; the files mnist, fashion_mnist and cifar10 load are
    there (nothing is read; with ``data.download`` they are downloaded now). Every failure is one ConfigError
    line."""
    if cfg.args:
        raise ConfigError(f"data.args: {excerpt(cfg.args)} is not allowed for data.name {cfg.name!r}; "
                          "data.args are for datasets given by import path or torchvision:CLASS")
    if cfg.name == "image_folder":
        _check_image_folder(cfg)
        return
    if cfg.name not in (*IDX_FOLDERS, "cifar10"):
        return
    root = data_root(cfg)
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
            raise ConfigError(f"data.root: {first} cannot be decoded ({type(exc).__name__}: {message_line(exc)})") \
                from None


def _idx_dataset(cfg: DataConfig, folder_name: str, tv_class: str) -> RawData:
    root = data_root(cfg)
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
    root = data_root(cfg)
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
    root = data_root(cfg)
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
            raise ConfigError(f"data.root: {folder}: {message_line(exc)}") from None

    train = read(train_dir)
    test = read(test_dir) if test_dir is not None else None
    if test is not None and test.classes != train.classes:
        raise ConfigError(f"data.root: {test_dir} has classes {excerpt(test.classes)}, {train_dir} has "
                          f"{excerpt(train.classes)}; give both the same class folders")
    return Source(train, test, len(train.classes), flip=True, encoded=True)


# ------------------------------------------------------------------------------ helpers
def message_line(exc: BaseException) -> str:
    """An exception's first message line, cut to 160 characters (its type's name when it has no message)."""
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
                          f"{message_line(exc)}); put its files there yourself or check the network") from None
