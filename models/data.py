"""Datasets, splits, residency and the batch loaders.

A dataset is one of: a registered name (``digits``, ``mnist``, ``cifar10``, ``image_folder``, ...;
:mod:`regsweep.models.datasets`), a torchvision dataset class by name (``torchvision:CIFAR100``: its own class,
``root=data.root``, ``download=data.download``, its official train/test split), a user factory by import path
(``my_pkg.data:make`` returning ``(train, test)`` map-style Datasets, ``test`` may be None; ``data.args`` are its
keyword arguments) or an installed ``regsweep.datasets`` entry point (:mod:`regsweep.models.sources`). Registered
names return raw tensors (:class:`RawData`: images N x C x H x W in [0, 1], integer labels); the others return
Datasets of ``(tensor or PIL image, int)`` items (:class:`Source`).

:func:`load` splits by ``data.split_seed`` ALONE (train.seed never touches it; ``data.train_fraction`` keeps a
seeded subset of the training split), records a fingerprint (hash of the index lists; :mod:`regsweep.models.splits`),
applies label noise to training labels only and normalises per channel with TRAINING statistics. Where the data lives
is ``data.residency``, resolved once (:func:`resolve_residency`): ``device`` (tensors on the training device,
batches by shuffled index: :class:`BatchLoader`), ``host`` (tensors in host memory, pinned on CUDA, copied per
batch) or ``stream`` (a ``torch.utils.data.DataLoader`` with ``data.num_workers`` workers, persistent workers,
pinned memory on CUDA and non-blocking copies: :class:`StreamLoader`; normalisation and augmentation happen on
the device). ``auto`` streams folders of encoded images and datasets larger than ``data.memory_budget_mb``.

The public names of datasets.py, sources.py and splits.py are importable from here too, as they were before this
module was split (issue 15).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from regsweep.models.config import ConfigError, DataConfig
from regsweep.models.datasets import (  # noqa: F401 - also re-exported
    CIFAR_FILES,
    DATASETS,
    IDX_FILES,
    IDX_FOLDERS,
    IMAGE_EXTENSIONS,
    RawData,
    Source,
    downloading,
    read_idx,
)
from regsweep.models.sources import (  # noqa: F401 - also re-exported
    NATURAL,
    TORCHVISION,
    Items,
    check_files,
    check_name,
    first_item,
    is_source_name,
    open_dataset,
    to_image_tensor,
    to_label,
)
from regsweep.models.splits import (  # noqa: F401 - also re-exported
    fingerprint,
    noisy_labels,
    split_for,
    split_indices,
    train_subset,
)


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
