"""The split contract: train/val/test index lists from ``data.split_seed`` ALONE (train.seed never touches them),
``data.train_fraction``'s seeded subset of the training indices, the split fingerprint (a hash of the index lists)
and label noise on training labels only. The same on every residency (:func:`regsweep.models.data.load`)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from regsweep.models.config import ConfigError, DataConfig


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
