import numpy as np
import pytest
import torch

from regsweep.models import data as data_mod
from regsweep.models import datasets as datasets_mod
from regsweep.models.config import ConfigError, DataConfig


def test_digits_split_sizes_and_normalisation():
    b = data_mod.load(DataConfig(name="digits", val_fraction=0.2, test_fraction=0.2))
    assert b.in_shape == (1, 8, 8) and b.num_classes == 10
    n = len(b.train) + len(b.val) + len(b.test)
    assert n == 1797
    assert len(b.val) == round(1797 * 0.2) and len(b.test) == round(1797 * 0.2)
    # normalised with TRAINING statistics
    assert abs(float(b.train.x.mean())) < 1e-4
    assert abs(float(b.train.x.std()) - 1.0) < 1e-2


def test_split_depends_on_split_seed_only():
    a = data_mod.load(DataConfig(split_seed=0))
    b = data_mod.load(DataConfig(split_seed=0))
    c = data_mod.load(DataConfig(split_seed=1))
    assert a.fingerprint == b.fingerprint and torch.equal(a.val.y, b.val.y)
    assert a.fingerprint != c.fingerprint


def test_split_indices_are_disjoint_and_cover():
    tr, va, te = data_mod.split_indices(100, 0.2, 0.1, split_seed=3, has_test=False)
    allidx = np.concatenate([tr, va, te])
    assert sorted(allidx.tolist()) == list(range(100))
    assert (len(tr), len(va), len(te)) == (70, 20, 10)
    tr2, va2, te2 = data_mod.split_indices(100, 0.2, 0.1, split_seed=3, has_test=True)
    assert len(te2) == 0 and len(va2) == 20 and len(tr2) == 80


def test_split_too_small_is_one_line_error():
    with pytest.raises(ConfigError, match="cannot be split"):
        data_mod.split_indices(3, 0.1, 0.1, 0, has_test=False)


def test_label_noise_changes_train_labels_only():
    clean = data_mod.load(DataConfig())
    noisy = data_mod.load(DataConfig(label_noise=0.5))
    changed = (clean.train.y != noisy.train.y).float().mean().item()
    assert 0.3 < changed < 0.6  # half replaced, 1/10 of those by the same label
    assert torch.equal(clean.val.y, noisy.val.y) and torch.equal(clean.test.y, noisy.test.y)
    assert clean.fingerprint == noisy.fingerprint


def test_synthetic_shape():
    b = data_mod.load(DataConfig(name="synthetic", shape=[3, 32, 32], n_samples=100, num_classes=4))
    assert b.in_shape == (3, 32, 32) and b.num_classes == 4
    assert b.train.x.shape[1:] == (3, 32, 32)


def test_batch_loader_matches_dataloader_random_sampler():
    """For a seed the on-device loader yields exactly the batches of torch's DataLoader."""
    b = data_mod.load(DataConfig(name="synthetic", n_samples=200))
    ours = data_mod.BatchLoader(b.train, 32, shuffle=True, seed=7)
    ref = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(b.train.x, b.train.y), batch_size=32,
                                      sampler=torch.utils.data.RandomSampler(
                                          b.train, generator=torch.Generator().manual_seed(7)))
    for _ in range(2):  # two epochs: the generator stream continues identically
        for (xa, ya), (xb, yb) in zip(ours, ref, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_unshuffled_loader_covers_split_in_order():
    b = data_mod.load(DataConfig())
    ys = torch.cat([y for _, y in data_mod.BatchLoader(b.val, 100)])
    assert torch.equal(ys, b.val.y)


def test_augment_keeps_shape_and_is_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = data_mod.random_crop(x, 1, g)
    assert out.shape == x.shape
    # every output is the input shifted by at most 1 pixel (zero padded)
    for i in range(2):
        ok = False
        for dy in range(3):
            for dx in range(3):
                ref = torch.nn.functional.pad(x[i], (1, 1, 1, 1))[:, dy:dy + 8, dx:dx + 8]
                ok |= torch.equal(ref, out[i])
        assert ok
    flipped = data_mod.random_flip(x, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


# ------------------------------------------------------------------- real formats, tiny files
def _write_idx(path, array, gz=False):
    import gzip
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _make_mnist(root, folder="MNIST", n=60, nt=20, gz=False):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(n) % 10, gz)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (nt, 28, 28)), gz)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(nt) % 10, gz)


@pytest.mark.parametrize("name,folder,gz", [("mnist", "MNIST", False), ("mnist", "MNIST", True),
                                            ("fashion_mnist", "FashionMNIST", False)])
def test_idx_datasets_load_from_tiny_files(tmp_path, name, folder, gz):
    _make_mnist(tmp_path, folder, gz=gz)
    b = data_mod.load(DataConfig(name=name, root=str(tmp_path), val_fraction=0.25))
    assert b.in_shape == (1, 28, 28) and b.num_classes == 10
    assert len(b.test) == 20 and len(b.train) + len(b.val) == 60 and len(b.val) == 15
    assert torch.equal(b.test.y, torch.arange(20) % 10)


def test_cifar10_loads_from_tiny_pickle_batches(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": list(rng.integers(0, 10, 8)),
                 "data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(8)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    b = data_mod.load(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.25))
    assert b.in_shape == (3, 32, 32) and len(b.test) == 8 and len(b.train) + len(b.val) == 40 and b.flip


def test_cifar_batch_refuses_arbitrary_pickles(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Path_like()}, f)
    with pytest.raises(ConfigError, match="not a CIFAR-10 python batch"):
        data_mod.load(DataConfig(name="cifar10", root=str(tmp_path)))


class Path_like:  # any non-numpy global must be refused by the CIFAR unpickler
    pass


def test_image_folder_loads_and_resizes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    b = data_mod.load(DataConfig(name="image_folder", root=str(tmp_path), shape=[3, 16, 16], val_fraction=0.25))
    assert b.in_shape == (3, 16, 16) and b.num_classes == 2 and len(b.test) == 4
    assert len(b.train) + len(b.val) == 12
    grey = data_mod.load(DataConfig(name="image_folder", root=str(tmp_path / "train"), shape=[1, 8, 8],
                                    val_fraction=0.25, test_fraction=0.25))
    assert grey.in_shape == (1, 8, 8) and len(grey.test) == 3


@pytest.mark.parametrize("name,needle", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte not found"),
    ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte not found"),
    ("cifar10", "cifar-10-batches-py/data_batch_1 not found"),
    ("image_folder", "is not a directory"),
])
def test_missing_files_give_one_line_naming_the_path(tmp_path, name, needle):
    with pytest.raises(ConfigError) as err:
        data_mod.load(DataConfig(name=name, root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and msg.startswith("data.root:")
    if name != "image_folder":
        assert "download" in msg


def test_real_dataset_without_root_is_an_error():
    with pytest.raises(ConfigError, match="data.root: required"):
        data_mod.load(DataConfig(name="mnist"))


def test_check_files_finds_a_missing_dataset_before_any_trial(tmp_path):
    """Before: a missing root surfaced only when a trial loaded the data (every trial FAIL)."""
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "data"))
    with pytest.raises(ConfigError, match=r"data.root: .* is not an existing directory.*data.download: true"):
        data_mod.check_files(cfg)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        (folder / name).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"test_batch not found"):
        data_mod.check_files(cfg)
    (folder / "test_batch").write_bytes(b"")
    data_mod.check_files(cfg)
    try:  # data.download: true downloads at the check (issue 18); without a network that is one line
        data_mod.check_files(DataConfig(name="mnist", root=str(tmp_path / "nope"), download=True))
    except ConfigError as exc:
        assert str(exc).startswith("data.download: downloading MNIST") and "\n" not in str(exc)
        assert not (tmp_path / "nope").exists()  # nothing half-written
    data_mod.check_files(DataConfig(name="digits"))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ConfigError, match=r"no class sub-folders"):
        data_mod.check_files(DataConfig(name="image_folder", root=str(tmp_path / "imgs"), shape=[3, 8, 8]))


def test_digits_read_without_sklearn_equal_load_digits_and_stay_read_only():
    """The digits are parsed from scikit-learn's bundled CSV without importing scikit-learn (issue 15: ~0.5 s per
    worker process); they must equal load_digits exactly, and the cached arrays cannot be changed by a caller."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    images, target = datasets_mod._digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images.astype(np.float32)) and images.dtype == np.float32
    assert np.array_equal(target, d.target) and target.dtype == np.int64
    assert not images.flags.writeable and not target.flags.writeable
    raw = data_mod.load(DataConfig(name="digits")).train.x
    raw.mul_(0)  # a caller's tensors are its own
    assert datasets_mod._digits_arrays()[0].any()
    code = ("import sys; from regsweep.models.datasets import _digits_arrays; _digits_arrays(); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
