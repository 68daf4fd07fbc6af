"""Issue 18, the data half: a user dataset by import path (code outside the package), a torchvision dataset by
name from tiny files in its real on-disk format, a streamed image folder of a few hundred PNG files (trains,
replays exactly, sweeps 3 trials recording residency stream) and data.train_fraction (train split only)."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from regsweep.models import data as data_mod
from regsweep.models.build import build
from regsweep.models.config import DataConfig, TrainConfig
from regsweep.models.train import fit


def make_png_folder(root: Path, classes: int = 4, per_class: int = 60, size: int = 12, seed: int = 0) -> Path:
    """``classes`` class folders of learnable RGB PNGs (a colour per class plus noise), written with Pillow."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros((size, size, 3))
        base[..., c % 3] = 180
        if c >= 3:
            base[: size // 2] = 90
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (MNIST's on-disk format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def epochs_without_time(hist) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in hist.epochs]


USER_DATA = textwrap.dedent('''\
    import torch
    from torch.utils.data import Dataset


    class Blobs(Dataset):
        classes = ["low", "high"]

        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(2, (n,), generator=g)
            self.x = torch.rand(n, 1, 6, 6, generator=g) * 0.5 + self.y.view(-1, 1, 1, 1) * 0.5

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])


    def make(n=100, n_test=None):
        return Blobs(n, 0), (Blobs(n_test, 1) if n_test else None)
    ''')


def test_user_dataset_by_import_path_trains_with_its_args(tmp_path, capsys):
    from regsweep.search.cli import main

    (tmp_path / "udata18a.py").write_text(USER_DATA)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: cnn, widths: [4, 8]}\n"
                   "data: {name: 'udata18a:make', args: {n: 120, n_test: 30}, batch_size: 32}\n"
                   "train: {epochs: 2, num_threads: 1, train_eval_size: 32}\n")
    assert main(["train", str(cfg), "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(hist["epochs"]) == 2 and hist["stop_reason"] == "completed"
    saved = TrainConfig.load(tmp_path / "out" / "config.yaml")
    assert saved.data.args == {"n": 120, "n_test": 30} and saved.data.residency == "device"
    bundle = data_mod.load(saved.data, "cpu")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (96, 24, 30)  # official test: 30
    assert bundle.num_classes == 2 and bundle.in_shape == (1, 6, 6)


def test_torchvision_fashion_mnist_by_name_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    cfg = DataConfig(name="torchvision:FashionMNIST", root=str(tmp_path), val_fraction=0.2)
    data_mod.check_files(cfg)  # validate's check: both splits open, item 0 of each decodes
    bundle = data_mod.load(cfg, "cpu")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 20)
    assert bundle.in_shape == (1, 28, 28) and bundle.num_classes == 10 and not bundle.flip
    assert bundle.test.y.tolist() == [i % 10 for i in range(20)]  # the official test split, in order
    streamed = data_mod.load(DataConfig(**{**vars(cfg), "residency": "stream"}), "cpu")
    assert streamed.residency == "stream" and streamed.fingerprint == bundle.fingerprint
    x0, y0 = streamed.test.dataset[0]
    assert y0 == 0 and x0.shape == (1, 28, 28)


def image_cfg(root: Path, **data) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"name": "cnn", "widths": [8, 16]},
        "data": {"name": "image_folder", "root": str(root), "shape": [3, 12, 12], "num_workers": 2,
                 "batch_size": 32, "augment": True, **data},
        "train": {"epochs": 2, "num_threads": 1, "train_eval_size": 64},
    })


@pytest.fixture(scope="module")
def png_root(tmp_path_factory) -> Path:
    return make_png_folder(tmp_path_factory.mktemp("pngs") / "imgs")  # 240 PNG files


def test_streamed_image_folder_trains_and_replays_exactly(png_root):
    cfg = image_cfg(png_root)
    runs = []
    for _ in range(2):
        parts = build(cfg, "cpu")
        assert parts.config.data.residency == "stream" and parts.data.residency == "stream"
        assert isinstance(parts.train_loader(), data_mod.StreamLoader)
        assert parts.train_loader().loader.num_workers == 2 and parts.train_loader().loader.persistent_workers
        runs.append(fit(parts.config, "cpu", parts=parts))
    assert epochs_without_time(runs[0]) == epochs_without_time(runs[1])
    assert runs[0].split_fingerprint == runs[1].split_fingerprint and runs[0].test == runs[1].test
    first, last = runs[0].epochs[0], runs[0].epochs[-1]
    assert last["val_loss"] < first["val_loss"] or last["val_acc"] > 0.5  # it learns something
    # the same data held whole: the same split, batches and arithmetic but for the statistics' rounding
    resident = fit(image_cfg(png_root, residency="device"), "cpu")
    assert resident.split_fingerprint == runs[0].split_fingerprint
    assert resident.epochs[-1]["val_loss"] == pytest.approx(runs[0].epochs[-1]["val_loss"], rel=1e-3)


def test_streamed_image_folder_is_swept_for_3_trials_recording_residency_stream(png_root, tmp_path, capsys):
    import optuna

    from regsweep.search.cli import main

    base = image_cfg(png_root).to_dict()
    base["train"]["epochs"] = 1
    (tmp_path / "base.yaml").write_text(TrainConfig.from_dict(base).to_yaml())
    (tmp_path / "stream.yaml").write_text(textwrap.dedent("""\
        name: stream
        base: base.yaml
        objective: {metric: val_loss, direction: minimize}
        space:
          model.dropout: {type: float, low: 0.0, high: 0.5}
          regularization.l2: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
        sampler: {name: random, seed: 0}
        pruner: none
        budget: {n_trials: 3}
        """))
    assert main(["validate", str(tmp_path / "stream.yaml")]) == 0
    assert main(["run", str(tmp_path / "stream.yaml"), "--device", "cpu"]) == 0
    study = optuna.load_study(study_name="stream", storage=f"sqlite:///{tmp_path / 'regsweep.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:
        assert t.user_attrs["config"]["data"]["residency"] == "stream"  # resolved at trial start, recorded
        assert t.user_attrs["config"]["data"]["num_workers"] == 2


def test_train_fraction_changes_the_train_split_only():
    full = DataConfig(name="digits")
    half = DataConfig(name="digits", train_fraction=0.5)
    tr, va, te, fp = data_mod.split_for(full, 1797, has_test=False)
    tr2, va2, te2, fp2 = data_mod.split_for(half, 1797, has_test=False)
    assert np.array_equal(va, va2) and np.array_equal(te, te2)
    assert set(tr2) < set(tr) and len(tr2) == round(len(tr) * 0.5)
    assert fp != fp2  # the fingerprint covers the train list
    assert np.array_equal(tr2, data_mod.split_for(half, 1797, has_test=False)[0])  # from split_seed alone
    other = data_mod.split_for(DataConfig(name="digits", train_fraction=0.5, split_seed=1), 1797, False)[0]
    assert not np.array_equal(tr2, other)
    a, b = data_mod.load(full, "cpu"), data_mod.load(half, "cpu")
    assert len(b.train) == len(tr2) and torch.equal(a.val.y, b.val.y) and torch.equal(a.test.y, b.test.y)
    # streamed: the same index lists, the same fingerprint
    s = data_mod.load(DataConfig(name="digits", train_fraction=0.5, residency="stream"), "cpu")
    assert s.fingerprint == b.fingerprint and len(s.train) == len(b.train)


def test_auto_residency_follows_the_memory_budget():
    raw = data_mod.open_dataset(DataConfig(name="digits"))
    assert data_mod.resolve_residency(DataConfig(name="digits"), raw, "cpu") == "device"
    tiny = DataConfig(name="digits", memory_budget_mb=0.01)  # digits are ~0.46 MB as float32
    assert data_mod.resolve_residency(tiny, raw, "cpu") == "stream"
    assert data_mod.resolve_residency(DataConfig(name="digits", residency="host"), raw, "cpu") == "host"
