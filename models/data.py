"""Datasets, splits and the on-device batch loader.

A dataset factory returns raw tensors (images N x C x H x W in [0, 1], integer labels) and, where the
dataset has one, its official test split. :func:`load` then splits by ``data.split_seed`` ALONE (train.seed
never touches it), records a fingerprint (hash of the index lists), applies label noise to training labels
only, normalises per channel with TRAINING statistics, and puts the tensors on the device when they fit.
Batches are drawn by shuffled index on the device (:class:`BatchLoader`); augmentation is tensor ops.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from regsweep.models.config import ConfigError, DataConfig
from regsweep.models.registry import Registry


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

    def to(self, device: torch.device | str) -> "DataBundle":
        def move(s: Split) -> Split:
            return Split(s.x.to(device, non_blocking=True), s.y.to(device, non_blocking=True))

        return DataBundle(move(self.train), move(self.val), move(self.test), self.in_shape, self.num_classes,
                          self.fingerprint, self.flip, self.mean, self.std)


DATASETS: Registry[Callable[[DataConfig], RawData]] = Registry("dataset")


@DATASETS.register("digits")
def _digits(cfg: DataConfig) -> RawData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): the offline default."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return RawData(x, torch.from_numpy(d.target.astype(np.int64)), 10)


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


def check_files(cfg: DataConfig) -> None:
    """Cheap (nothing is read): the files a file-based dataset (mnist, fashion_mnist, cifar10, image_folder)
    loads are there, so `validate` and `run` say so before any trial; nothing to check with data.download."""
    if cfg.name not in (*IDX_FOLDERS, "cifar10", "image_folder") or (cfg.download and cfg.name != "image_folder"):
        return
    root = _root(cfg)
    if not root.is_dir():
        how = ("give a folder with one sub-folder per class" if cfg.name == "image_folder"
               else "give the directory that holds its files, or set data.download: true")
        raise ConfigError(f"data.root: {cfg.root!r} is not an existing directory ({root}); {how}")
    if cfg.name in IDX_FOLDERS:
        folder, how = _idx_place(root, IDX_FOLDERS[cfg.name])
        files: tuple[str, ...] = IDX_FILES
    elif cfg.name == "cifar10":
        (folder, how), files = _cifar_place(root), CIFAR_FILES
    else:
        if not any(p.is_dir() for p in root.iterdir()):
            raise ConfigError(f"data.root: {root} has no class sub-folders; give a folder with one sub-folder per "
                              "class (or train/ and test/ holding them)")
        return
    for name in files:
        _find(folder, name, how)


def _idx_dataset(cfg: DataConfig, folder_name: str, tv_class: str) -> RawData:
    root = _root(cfg)
    if cfg.download:
        import torchvision.datasets as tvd  # lazy: only when the user asks for a download

        for train in (True, False):
            getattr(tvd, tv_class)(str(root), train=train, download=True)
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

        tvd.CIFAR10(str(root), train=True, download=True)
    folder, how = _cifar_place(root)
    train = [_cifar_batch(_find(folder, f"data_batch_{i}", how)) for i in range(1, 6)]
    xt, yt = _cifar_batch(_find(folder, "test_batch", how))
    x = torch.from_numpy(np.concatenate([a for a, _ in train])).float().div_(255)
    y = torch.from_numpy(np.concatenate([b for _, b in train]))
    return RawData(x, y, 10, torch.from_numpy(xt).float().div_(255), torch.from_numpy(yt), flip=True)


@DATASETS.register("image_folder")
def _image_folder(cfg: DataConfig) -> RawData:
    """Images in ``<root>/<class>/*.png|jpg`` (torchvision's ImageFolder), resized to ``data.shape``
    (C = 1 grey or 3 RGB) and held in memory. With ``<root>/train`` and ``<root>/test`` the test folder is
    the official test split."""
    from torchvision import datasets as tvd
    from torchvision.transforms import v2

    root = _root(cfg)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a directory; give a folder with one sub-folder per class")
    c, h, w = cfg.shape
    if c not in (1, 3):
        raise ConfigError(f"data.shape: {cfg.shape} is not allowed for image_folder; channels must be 1 or 3")
    tf = v2.Compose([v2.ToImage(), v2.Resize((h, w), antialias=True), *([v2.Grayscale()] if c == 1 else []),
                     v2.ToDtype(torch.float32, scale=True)])

    def read(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        try:
            ds = tvd.ImageFolder(str(folder), transform=tf)  # its default loader converts to RGB
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"data.root: {folder}: {exc}") from None
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), ds.classes

    if (root / "train").is_dir() and (root / "test").is_dir():
        x, y, classes = read(root / "train")
        xt, yt, test_classes = read(root / "test")
        if test_classes != classes:
            raise ConfigError(f"data.root: {root}/test has classes {test_classes}, train has {classes}")
        return RawData(x, y, len(classes), xt, yt, flip=True)
    x, y, classes = read(root)
    return RawData(x, y, len(classes), flip=True)


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


def load(cfg: DataConfig, device: torch.device | str | None = None) -> DataBundle:
    raw = DATASETS.get(cfg.name)(cfg)
    has_test = raw.x_test is not None
    tr, va, te = split_indices(len(raw.y), cfg.val_fraction, cfg.test_fraction, cfg.split_seed, has_test)
    fp = fingerprint(cfg.name, tr, va, te)
    x_tr, y_tr = raw.x[tr], raw.y[tr].clone()
    if cfg.label_noise > 0:
        rng = np.random.default_rng([cfg.split_seed, 1])
        flip = torch.from_numpy(rng.random(len(tr)) < cfg.label_noise)
        noise = torch.from_numpy(rng.integers(0, raw.num_classes, len(tr)))
        y_tr[flip] = noise[flip]
    x_te, y_te = (raw.x_test, raw.y_test) if has_test else (raw.x[te], raw.y[te])
    mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)
    std = x_tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).contiguous()

    bundle = DataBundle(Split(norm(x_tr), y_tr), Split(norm(raw.x[va]), raw.y[va]), Split(norm(x_te), y_te),
                        tuple(raw.x.shape[1:]), raw.num_classes, fp, raw.flip,
                        mean.flatten().tolist(), std.flatten().tolist())
    return bundle.to(device) if device is not None else bundle


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
