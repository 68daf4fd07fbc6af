"""Bad datasets (issue 18): an unimportable import path, a factory that raises or returns the wrong types,
missing or undecodable files, missing class folders, a failed download, bad data.* values. Each one line at
`validate` (or `train`), exit 2, no study and no file created (a failed download removes what it wrote)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

V = ["validate", "{d}/tiny.yaml"]


def with_data(data: dict, **files: str | bytes) -> dict[str, str | bytes]:
    """The tiny spec whose base config's ``data`` section is ``data`` (plus files beside it)."""
    base = yaml.safe_load(TINY_BASE)
    base["data"] = data
    return {"base.yaml": yaml.safe_dump(base, sort_keys=False), "tiny.yaml": TINY_SPEC, **files}


def module(body: str) -> str:
    return "import torch\nfrom torch.utils.data import Dataset, TensorDataset\n\n" + textwrap.dedent(body)


GOOD_X = "torch.rand(8, 1, 4, 4)"


def user(name: str, body: str, **data) -> dict[str, str | bytes]:
    """A user module ``name``.py beside the spec and ``data.name: name:make``; module names are unique per case
    (each is imported once per test process)."""
    return with_data({"name": f"{name}:make", **data}, **{f"{name}.py": module(body)})


def png(d: Path, rel: str) -> None:
    from PIL import Image

    (d / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(d / rel)


def folders(*rels: str, junk: tuple[str, ...] = (), dirs: tuple[str, ...] = ()):
    def setup(d: Path) -> None:
        for rel in rels:
            png(d, rel)
        for rel in junk:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(b"not a png at all")
        for rel in dirs:
            (d / rel).mkdir(parents=True, exist_ok=True)
    return setup


IMG = {"name": "image_folder", "root": "{d}/imgs", "shape": [3, 4, 4]}

CASES = [
    Case("data-ref-module-missing", V, with_data({"name": "nomod18x:make"}),
         expect=("tiny.yaml", "base.data.name", "'nomod18x:make'", "no module named 'nomod18x'")),
    Case("data-ref-module-missing-subprocess", V, with_data({"name": "nomod18y.sub:make"}), subprocess=True,
         expect=("data.name", "'nomod18y.sub:make'", "no module named")),
    Case("data-ref-attr-missing", V, user("ud18attr", "def other():\n    pass\n"),
         expect=("data.name", "'ud18attr:make'", "has no attribute 'make'")),
    Case("data-ref-import-raises", V, user("ud18imp", "raise RuntimeError('no GPU here')\n"),
         expect=("data.name", "importing ud18imp raised RuntimeError", "no GPU here")),
    Case("data-ref-not-callable", V, user("ud18list", "make = [1, 2]\n"),
         expect=("data.name", "'ud18list:make'", "not a class or function")),
    Case("data-ref-bad-syntax", V, with_data({"name": "my pkg:make"}),
         expect=("data.name", "'my pkg:make'", "torchvision:CLASS", "package.module:function")),
    Case("data-unknown-short-name", V, with_data({"name": "cifar100"}),
         expect=("data.name", "'cifar100'", "choose one of", "torchvision:CLASS")),
    Case("data-factory-raises", V, user("ud18raise", "def make():\n    raise ValueError('bad shard 3')\n"),
         expect=("data.name", "'ud18raise:make'", "ValueError", "bad shard 3")),
    Case("data-factory-bad-args", V, user("ud18args", f"def make(n=8):\n    return TensorDataset({GOOD_X}, "
                                                      "torch.zeros(8, dtype=torch.long)), None\n",
                                          args={"size": 3}),
         expect=("data.args", "size", "unexpected keyword argument")),
    Case("data-returns-one-dataset", V, user("ud18one", f"def make():\n    return TensorDataset({GOOD_X}, "
                                                        "torch.zeros(8, dtype=torch.long))\n"),
         expect=("data.name", "returned a TensorDataset", "tuple (train, test)")),
    Case("data-returns-not-datasets", V, user("ud18int", "def make():\n    return 42, None\n"),
         expect=("data.name", "returned a int as its train set", "map-style torch.utils.data.Dataset")),
    Case("data-item-label-is-a-string", V, user("ud18lbl", """\
        class Named(Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return torch.rand(1, 4, 4), "cat"


        def make():
            return Named(), None
        """), expect=("data.name", "its train set", "item 0", "a label must be an int, got str")),
    Case("data-item-image-is-a-path", V, user("ud18path", """\
        def make():
            return [("a.png", 1)], None
        """), expect=("its train set", "item 0", "tensor or a PIL image, got str")),
    Case("data-item-not-a-pair", V, user("ud18pair", f"def make():\n    return TensorDataset({GOOD_X}), None\n"),
         expect=("its train set", "item 0 is a tuple", "(image, label) pairs")),
    Case("data-test-set-empty", V, user("ud18empty", f"def make():\n    return TensorDataset({GOOD_X}, "
                                                     "torch.zeros(8, dtype=torch.long)), []\n"),
         expect=("its test set is empty",)),
    Case("data-torchvision-unknown-class", V, with_data({"name": "torchvision:CIFAR1000", "root": "{d}"}),
         expect=("data.name", "torchvision:CIFAR1000", "has no class")),
    Case("data-torchvision-root-missing", V, with_data({"name": "torchvision:CIFAR100", "root": "{d}/data"}),
         expect=("data.root", "not an existing directory", "data.download: true")),
    Case("data-torchvision-files-missing", V, with_data({"name": "torchvision:SVHN", "root": "{d}"}),
         expect=("data.root", "torchvision:SVHN could not be read", "Dataset not found")),
    Case("data-torchvision-corrupt-files", V,
         with_data({"name": "torchvision:CIFAR100", "root": "{d}/data"},
                   **{"data/cifar-100-python/train": b"junk", "data/cifar-100-python/test": b"junk",
                      "data/cifar-100-python/meta": b"junk"}),
         expect=("data.root", "torchvision:CIFAR100 could not be read", "corrupted")),
    Case("data-download-fails", V, with_data({"name": "torchvision:CIFAR100", "root": "{d}/dl/c100",
                                              "download": True}),
         expect=("data.download", "downloading torchvision:CIFAR100", "failed", "check the network")),
    Case("data-download-fails-stl10", V, with_data({"name": "torchvision:STL10", "root": "{d}/dl",
                                                    "download": True}),
         expect=("data.download", "downloading torchvision:STL10", "failed")),
    Case("data-registered-download-fails", ["train", "{d}/base.yaml"],
         with_data({"name": "mnist", "root": "{d}/mn", "download": True}),
         expect=("data.download", "downloading MNIST", "failed")),
    Case("data-image-folder-no-class-folders", V, with_data(IMG), setup=folders(junk=("imgs/readme.txt",)),
         expect=("data.root", "has no class sub-folders")),
    Case("data-image-folder-missing-class-in-test", V, with_data(IMG),
         setup=folders("imgs/train/cat/0.png", "imgs/train/dog/0.png", "imgs/test/cat/0.png"),
         expect=("data.root", "class folder 'dog' is in only one of")),
    Case("data-image-folder-no-images", V, with_data(IMG), setup=folders(dirs=("imgs/cat", "imgs/dog")),
         expect=("data.root", "no image files")),
    Case("data-image-folder-undecodable", V, with_data(IMG), setup=folders(junk=("imgs/cat/0.png",)),
         expect=("data.root", "0.png cannot be decoded")),
    Case("data-image-folder-bad-channels", V, with_data({**IMG, "shape": [2, 4, 4]}),
         setup=folders("imgs/cat/0.png"), expect=("data.shape", "channels must be 1 or 3")),
    Case("data-residency-unknown", V, with_data({"name": "digits", "residency": "ram"}),
         expect=("data.residency", "'ram'", "auto, device, host, stream")),
    Case("data-train-fraction-zero", V, with_data({"name": "digits", "train_fraction": 0.0}),
         expect=("data.train_fraction", "must be in (0, 1]")),
    Case("data-memory-budget-negative", V, with_data({"name": "digits", "memory_budget_mb": -5}),
         expect=("data.memory_budget_mb", "must be > 0 or null")),
    Case("data-args-not-a-mapping", V, with_data({"name": "digits", "args": [1, 2]}),
         expect=("data.args", "expected a mapping")),
    Case("data-args-for-a-registered-dataset", V, with_data({"name": "digits", "args": {"n": 3}}),
         expect=("data.args", "not allowed for data.name 'digits'")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
