"""Datasets, splits and the on-device batch loader.

A dataset factory returns raw tensors (images N x C x H x W in [0, 1], integer labels) and, where the
dataset has one, its official test split. :func:`load` then splits by ``data.split_seed`` ALONE (train.seed
never touches it), records a fingerprint (hash of the index lists), applies label noise to training labels
only, normalises per channel with TRAINING statistics, and puts the tensors on the device when they fit.
Batches are drawn by shuffled index on the device (:class:`BatchLoader`); augmentation is tensor ops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from models.config import ConfigError, DataConfig
from models.registry import Registry


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
    """Per-sample random crop of the zero-padded batch back to its size (one gather, no Python loop)."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[n_idx, c_idx, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


class Augment:
    """Random crop with padding (1/8 of the side) and, for natural images, horizontal flips."""

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
