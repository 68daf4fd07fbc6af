"""models/layers.py (+ cnn.py, resnet.py): every model x BN placement x init builds and trains on any input
shape; the Placement contract (conv->BN->act / conv->act->BN, add before the final activation, dropout after
the activation and before the classifier, only in train mode); measured flatten size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regsweep.models.build import make_model
from regsweep.models.cnn import CNN, MODELS
from regsweep.models.config import BN_PLACEMENTS, TrainConfig
from regsweep.models.init import INITS
from regsweep.models.layers import ConvBlock, Head, flat_features
from regsweep.models.resnet import BasicBlock

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
RESNETS = {"resnet18": [4, 4, 4, 4], "resnet20": []}  # resnet18 kept tiny; resnet20 at its own widths
ACTS = (nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU)


def _cfg(name: str, bn: str, init: str, widths=(), dropout: float = 0.0, hidden: int = 0) -> TrainConfig:
    return TrainConfig.from_dict({"model": {"name": name, "widths": list(widths), "bn": bn, "init": init,
                                            "dropout": dropout, "hidden": hidden}})


def _forward_backward(model: nn.Module, in_shape) -> torch.Tensor:
    model.train()
    x = torch.randn(2, *in_shape)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    # a tiny net without BN may have a dead ReLU layer on a batch of 2; the classifier always learns
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    return out


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_registry_has_the_three_models():
    assert {"cnn", "resnet18", "resnet20"} <= set(MODELS.names())


@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("init", INITS.names())
@pytest.mark.parametrize("bn", BN_PLACEMENTS)
def test_cnn_builds_and_trains(bn, init, in_shape):
    torch.manual_seed(0)
    model = make_model(_cfg("cnn", bn, init), in_shape, num_classes=10)
    assert model.in_shape == in_shape and model.num_classes == 10
    assert (_bn_count(model) > 0) == (bn != "none")
    _forward_backward(model, in_shape)


# every placement x every shape for both resnets; the init scheme rotates so each is used
RESNET_CASES = [
    (name, bn, INITS.names()[(i + j + k) % len(INITS.names())], shape)
    for i, name in enumerate(RESNETS)
    for j, bn in enumerate(BN_PLACEMENTS)
    for k, shape in enumerate(SHAPES)
]


@pytest.mark.parametrize("name,bn,init,in_shape", RESNET_CASES,
                         ids=[f"{n}-{b}-{i}-{'x'.join(map(str, s))}" for n, b, i, s in RESNET_CASES])
def test_resnet_builds_and_trains(name, bn, init, in_shape):
    torch.manual_seed(0)
    model = make_model(_cfg(name, bn, init, widths=RESNETS[name], dropout=0.1), in_shape, num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == (8 if name == "resnet18" else 9)
    assert (_bn_count(model) > 0) == (bn != "none")
    _forward_backward(model, in_shape)


def test_every_init_is_exercised_on_resnets():
    assert {case[2] for case in RESNET_CASES} == set(INITS.names())


# ------------------------------------------------------------------------------------ ConvBlock order
def _kinds(modules) -> list[str]:
    out = []
    for m in modules:
        if isinstance(m, nn.Conv2d):
            out.append("conv")
        elif isinstance(m, nn.BatchNorm2d):
            out.append("bn")
        elif isinstance(m, ACTS):
            out.append("act")
        elif isinstance(m, nn.Dropout2d):
            out.append("drop2d")
        elif isinstance(m, nn.MaxPool2d):
            out.append("pool")
        else:
            out.append(type(m).__name__)
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bn,expected", [
    ("none", ["conv", "act"]),
    ("before_act", ["conv", "bn", "act"]),
    ("after_act", ["conv", "act", "bn"]),
])
def test_conv_block_order(bn, expected, dropout):
    block = ConvBlock(3, 8, bn=bn, activation="relu", dropout=dropout, pool=True)
    tail = (["drop2d"] if dropout > 0 else []) + ["pool"]
    assert _kinds(block.children()) == expected + tail
    conv = block[0]
    assert (conv.bias is not None) == (bn == "none")
    if dropout > 0:
        assert block[len(expected)].p == dropout


@pytest.mark.parametrize("bn", BN_PLACEMENTS)
def test_cnn_uses_the_placement_in_every_block(bn):
    model = CNN((1, 28, 28), 10, widths=(4, 8, 8), bn=bn, dropout=0.2)
    blocks = list(model.features)
    assert len(blocks) == 3 and all(isinstance(b, ConvBlock) for b in blocks)
    for block in blocks:
        kinds = _kinds(block.children())
        conv, act, drop = kinds.index("conv"), kinds.index("act"), kinds.index("drop2d")
        if bn == "before_act":
            assert conv < kinds.index("bn") < act < drop
        elif bn == "after_act":
            assert conv < act < kinds.index("bn") < drop
        else:
            assert "bn" not in kinds and conv < act < drop
        assert block[0].bias is not None if bn == "none" else block[0].bias is None


@pytest.mark.parametrize("hidden", [0, 6])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_head_dropout_precedes_the_classifier(dropout, hidden):
    head = Head(16, 10, hidden=hidden, dropout=dropout, activation="relu")
    layers = list(head.children())
    assert isinstance(layers[0], nn.Flatten)
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 10
    dropouts = [m for m in layers if isinstance(m, nn.Dropout)]
    if dropout > 0:
        assert isinstance(layers[-2], nn.Dropout) and layers[-2].p == dropout
        assert len(dropouts) == 1
    else:
        assert dropouts == []
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert len(linears) == (2 if hidden else 1)
    assert linears[0].in_features == 16
    if hidden:
        assert linears[0].out_features == hidden == linears[1].in_features


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_dropout_only_in_train_mode(name):
    torch.manual_seed(0)
    model = make_model(_cfg(name, "none", "default", widths=[4, 8, 8], dropout=0.5), (1, 8, 8), 10)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c, d)
    assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------------ residual blocks
def _bn_with_stats(bn: nn.BatchNorm2d) -> None:
    """Non-trivial running statistics and affine params so eval-mode BN is not the identity."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def _block(bn: str, cin=4, cout=4, stride=1, dropout=0.0) -> BasicBlock:
    torch.manual_seed(0)
    block = BasicBlock(cin, cout, stride, bn=bn, activation="relu", dropout=dropout)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            _bn_with_stats(m)
    return block.eval()


def test_basic_block_before_act_adds_before_the_activation():
    block = _block("before_act")
    assert _kinds(block.conv1.children()) == ["conv", "bn", "act"]
    assert block.conv1[0].bias is None and block.conv2.bias is None
    assert isinstance(block.bn2, nn.BatchNorm2d)
    assert isinstance(block.post_bn, nn.Identity) and isinstance(block.shortcut, nn.Identity)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = block(x)
        branch = block.bn2(block.conv2(block.conv1(x)))
        expected = torch.relu(branch + x)
    torch.testing.assert_close(out, expected)
    assert (out >= 0).all()
    # activation before the add would have let the (negative) shortcut through
    assert ((torch.relu(branch) + x) < 0).any()


def test_basic_block_after_act_puts_bn_after_the_final_activation():
    block = _block("after_act")
    assert _kinds(block.conv1.children()) == ["conv", "act", "bn"]
    assert block.conv1[0].bias is None and block.conv2.bias is None
    assert isinstance(block.bn2, nn.Identity)
    assert isinstance(block.post_bn, nn.BatchNorm2d)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = block(x)
        expected = block.post_bn(torch.relu(block.conv2(block.conv1(x)) + x))
    torch.testing.assert_close(out, expected)
    assert (out < 0).any()  # BN after the activation shifts values below zero


def test_basic_block_none_has_biases_and_no_bn():
    block = _block("none", cin=4, cout=8, stride=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3  # conv1, conv2, 1x1 projection
    assert all(c.bias is not None for c in convs)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = block(x)
        expected = torch.relu(block.conv2(block.conv1(x)) + block.shortcut(x))
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("bn", ["before_act", "after_act"])
def test_basic_block_projection_shortcut(bn):
    block = _block(bn, cin=4, cout=8, stride=2)
    proj = list(block.shortcut.children())
    assert _kinds(proj) == ["conv", "bn"]
    assert proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2) and proj[0].bias is None
    assert block(torch.randn(2, 4, 6, 6)).shape == (2, 8, 3, 3)


def test_basic_block_dropout2d_after_the_activation():
    assert isinstance(_block("before_act").drop, nn.Identity)
    block = _block("before_act", dropout=0.5)
    assert isinstance(block.drop, nn.Dropout2d) and block.drop.p == 0.5
    block.drop.train()  # BN stays in eval mode, dropout is active
    x = torch.randn(2, 4, 6, 6)
    torch.manual_seed(1)
    with torch.no_grad():
        out = block(x)
        kept = torch.relu(block.bn2(block.conv2(block.conv1(x))) + x) * 2.0
    zeroed = out.flatten(2).abs().sum(-1) == 0  # whole channels dropped
    assert zeroed.any() and not zeroed.all()
    torch.testing.assert_close(out[~zeroed], kept[~zeroed])


# ------------------------------------------------------------------------------------ flatten size
@pytest.mark.parametrize("widths", [(4, 8, 16), (4, 8, 16, 32)])
def test_cnn_on_8x8_pools_down_to_1x1(widths):
    model = CNN((1, 8, 8), 10, widths=widths)
    pools = [isinstance(b[-1], nn.MaxPool2d) for b in model.features]
    assert pools == [True, True, True] + [False] * (len(widths) - 3)  # stops at 1x1
    feats = model.features(torch.zeros(2, 1, 8, 8))
    assert feats.shape == (2, widths[-1], 1, 1)
    assert model.head[-1].in_features == widths[-1]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("in_shape,widths,flat", [
    ((1, 28, 28), (32, 64), 64 * 7 * 7),
    ((3, 32, 32), (32, 64), 64 * 8 * 8),
    ((3, 20, 9), (4, 8, 16), 16 * 2 * 1),  # 20x9 -> 10x4 -> 5x2 -> 2x1
])
def test_cnn_flatten_size_is_measured(in_shape, widths, flat):
    for hidden in (0, 5):
        model = CNN(in_shape, 10, widths=widths, hidden=hidden, bn="before_act")
        first = next(m for m in model.head if isinstance(m, nn.Linear))
        assert first.in_features == flat == flat_features(model.features, in_shape)
        assert model(torch.randn(2, *in_shape)).shape == (2, 10)


def test_flat_features_keeps_train_mode():
    features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    features.train()
    assert flat_features(features, (1, 5, 5)) == 2 * 3 * 3
    assert features.training and features[1].training
    assert int(features[1].num_batches_tracked) == 0  # measured in eval mode: running stats untouched


@pytest.mark.parametrize("name,widths", [("resnet18", [4, 4, 4, 4]), ("resnet20", [4, 8, 8])])
def test_resnet_head_in_features_is_last_width(name, widths):
    model = make_model(_cfg(name, "before_act", "default", widths=widths), (3, 32, 32), 10)
    assert model.head[-1].in_features == widths[-1]
    assert model.layers[-1].conv2.out_channels == widths[-1]


def test_resnet_default_widths():
    model = make_model(_cfg("resnet20", "before_act", "default"), (3, 32, 32), 10)
    assert [b.conv2.out_channels for b in model.layers] == [16] * 3 + [32] * 3 + [64] * 3
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.02)
