"""The device data path of fit (models/data.py, models/build.py) and compile caching (models/train.py).

CPU tests run everywhere; the CUDA ones skip cleanly without a GPU (the one allowed skip)."""

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from regsweep.models.build import build
from regsweep.models.config import TrainConfig
from regsweep.models.train import TensorRateDropout, compile_model, configure_torch, fit

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(**data):
    return TrainConfig.from_dict({
        "model": {"name": "cnn", "widths": [4, 8]},
        "data": {"name": "synthetic", "shape": [3, 12, 12], "n_samples": 230, "batch_size": 32, **data},
        "train": {"epochs": 1, "num_threads": 1, "seed": 5, "train_eval_size": 64},
    })


def test_fit_loader_yields_exactly_the_reference_dataloader_batches_on_cpu():
    """Parts.train_loader (what fit iterates) == DataLoader(RandomSampler(generator seeded train.seed)),
    epoch after epoch, including the short last batch."""
    parts = build(_cfg(), "cpu")
    ours = parts.train_loader()
    assert ours.device == torch.device("cpu") and parts.data.train.x.device.type == "cpu"
    ds = TensorDataset(parts.data.train.x, parts.data.train.y)
    ref = DataLoader(ds, batch_size=32, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(5)))
    sizes = []
    for _ in range(3):
        for (xa, ya), (xb, yb) in zip(ours, ref, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            sizes.append(len(ya))
    assert sizes[-1] == len(parts.data.train) % 32 != 0  # the remainder batch was compared too


@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_keeps_shapes_dtypes_and_labels_and_changes_images(flip):
    plain, aug = build(_cfg(augment=False), "cpu"), build(_cfg(augment=True), "cpu")
    aug.data.flip = flip  # synthetic data has no flips; force them on to cover random_flip too
    aug._train_loader = None
    loader = aug.train_loader()
    assert loader.transform is not None and loader.transform.gen.device == aug.device  # no per-batch copy
    changed = 0
    for (xa, ya), (xb, yb) in zip(plain.train_loader(), loader, strict=True):
        assert xb.shape == xa.shape and xb.dtype == xa.dtype and xb.device == xa.device
        assert torch.equal(ya, yb)  # labels untouched, same order
        changed += int(not torch.equal(xa, xb))
    assert changed == len(loader)  # every batch is augmented, none is the identity


def test_configure_torch_on_cpu_leaves_fp32_matmuls_exact(tiny_cfg):
    before = torch.get_float32_matmul_precision()
    configure_torch(tiny_cfg, torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == before == "highest"


def _cnn(p):
    cfg = TrainConfig.from_dict({"model": {"name": "cnn", "widths": [4, 8], "hidden": 8, "dropout": p}})
    from regsweep.models.build import make_model

    return make_model(cfg, (1, 8, 8), 10)


def test_compiled_models_differing_only_in_dropout_share_their_graphs():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    x = torch.randn(16, 1, 8, 8)
    graphs = []
    for p in (0.1, 0.25, 0.4):
        net = compile_model(_cnn(p), backend="eager")  # dynamo's guards are what matter, not the backend
        net.train()
        net(x).sum().backward()
        net.eval()
        with torch.no_grad():
            net(x)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[2] == graphs[0]  # no recompile for a new p


def test_tensor_rate_dropout_is_dropout_and_leaves_the_state_dict_alone():
    model = _cnn(0.3)
    keys = set(model.state_dict())
    x = torch.randn(8, 1, 8, 8)
    model.eval()
    ref = model(x)
    compile_model(model, backend="eager")  # swaps the modules in place
    drops = [m for m in model.modules() if isinstance(m, TensorRateDropout)]
    assert len(drops) == 3 and {m.channelwise for m in drops} == {True, False}
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), ref)  # eval: identity
    d = TensorRateDropout(0.3, channelwise=False).train()
    torch.manual_seed(0)
    out = d(torch.ones(200_000))
    assert sorted(out.unique().tolist()) == [0.0, pytest.approx(1 / 0.7)]
    assert abs(float((out == 0).float().mean()) - 0.3) < 0.01
    d2 = TensorRateDropout(0.5, channelwise=True).train()
    y = d2(torch.ones(64, 8, 3, 3))
    assert torch.equal(y.amin(dim=(2, 3)), y.amax(dim=(2, 3)))  # whole channels dropped


@CUDA
def test_cuda_data_stays_on_the_device_and_fit_runs():
    cfg = _cfg(augment=True).with_overrides({"train.deterministic": False, "train.epochs": 2})
    parts = build(cfg, "cuda")
    assert parts.data.train.x.is_cuda and parts.data.val.x.is_cuda and parts.train_eval_split().x.is_cuda
    loader = parts.train_loader()
    assert loader.transform.gen.device.type == "cuda"
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda
    hist = fit(cfg, "cuda", parts=parts)
    assert hist.stop_reason == "completed" and hist.device.startswith("cuda")
    assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("highest")


@CUDA
def test_cuda_bf16_channels_last_fit_runs():
    cfg = _cfg().with_overrides({"train.precision": "bf16", "train.channels_last": True,
                                 "train.deterministic": False})
    hist = fit(cfg, "cuda")
    assert hist.stop_reason == "completed"
    torch.set_float32_matmul_precision("highest")
