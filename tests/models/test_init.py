"""models/init.py: every scheme's rule for weights, zero biases, BN weight 1 / bias 0; default keeps
PyTorch's own init; unknown names list the choices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regsweep.models.build import make_model
from regsweep.models.cnn import CNN
from regsweep.models.config import TrainConfig
from regsweep.models.init import INITS, initialize

SCHEMES = [s for s in INITS.names() if s != "default"]
N = 512  # big square Linear: fan_in == fan_out, so fan mode does not matter
# theoretical std of the weights for a 512x512 Linear with the ReLU gain
STD = {
    "xavier_uniform": math.sqrt(2.0 / (N + N)),
    "xavier_normal": math.sqrt(2.0 / (N + N)),
    "kaiming_uniform": math.sqrt(2.0 / N),
    "kaiming_normal": math.sqrt(2.0 / N),
}


def _mixed_model() -> nn.Module:
    """Conv/Linear with biases and every norm type, all parameters randomised so resets are visible."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16, bias=True), nn.BatchNorm1d(16), nn.LayerNorm(16), nn.Linear(16, 4),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    return model


def test_registry_names():
    assert INITS.names()[0] == "default"
    assert set(SCHEMES) == {"xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal"}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_zeroes_biases_and_resets_norms(scheme):
    torch.manual_seed(0)
    model = _mixed_model()
    assert initialize(model, scheme) is model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert (m.weight < 0.5).any(), "weights not re-initialised"  # all were in [0.5, 1.5)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), type(m).__name__
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), type(m).__name__


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bn", ["none", "before_act", "after_act"])
def test_scheme_on_built_model(scheme, bn):
    torch.manual_seed(0)
    cfg = TrainConfig.from_dict({"model": {"widths": [4, 8], "hidden": 6, "bn": bn, "init": scheme}})
    model = make_model(cfg, (1, 8, 8), 10)
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    assert len(biases) == (4 if bn == "none" else 2)
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (0 if bn == "none" else 2)
    for m in bns:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("scheme", sorted(STD))
def test_weight_std_matches_theory(scheme):
    torch.manual_seed(0)
    layer = nn.Linear(N, N)
    initialize(layer, scheme)
    w = layer.weight.detach()
    assert abs(w.mean().item()) < 0.05 * STD[scheme]
    assert w.std().item() == pytest.approx(STD[scheme], rel=0.05)
    bound = math.sqrt(3.0) * STD[scheme]  # uniform(-b, b) has std b / sqrt(3)
    if scheme.endswith("uniform"):
        assert w.abs().max().item() <= bound * (1 + 1e-6)
    else:
        assert w.abs().max().item() > 2 * STD[scheme]  # normal tails reach beyond the uniform bound


def test_kaiming_differs_from_xavier_and_default():
    # guard: the tolerance above is tight enough to tell the schemes (and PyTorch's default) apart
    default_std = 1.0 / math.sqrt(3.0 * N)  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
    values = sorted([default_std, STD["xavier_normal"], STD["kaiming_normal"]])
    assert all(b / a > 1.15 for a, b in zip(values, values[1:]))


def test_kaiming_on_conv_uses_relu_gain():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3)  # fan_in == fan_out == 64 * 9
    initialize(conv, "kaiming_normal")
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


def test_orthogonal_linear():
    torch.manual_seed(0)
    layer = nn.Linear(N, N)
    initialize(layer, "orthogonal")
    w = layer.weight.detach().double()
    eye = torch.eye(N, dtype=torch.float64)
    torch.testing.assert_close(w @ w.T, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(w.T @ w, eye, atol=1e-4, rtol=0)


def test_orthogonal_conv_rows_are_orthonormal():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    initialize(conv, "orthogonal")
    w = conv.weight.detach().reshape(32, -1).double()  # 32 x 144: rows orthonormal
    torch.testing.assert_close(w @ w.T, torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)


def test_default_keeps_pytorch_init():
    torch.manual_seed(3)
    reference = _default_model()
    torch.manual_seed(3)
    model = _default_model()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    initialize(model, "default")
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
        assert torch.equal(value, reference.state_dict()[key]), key
    # PyTorch's own init: non-zero biases, weights within kaiming_uniform(a=sqrt(5)) bounds
    linear = model[-1]
    assert torch.count_nonzero(linear.bias) > 0
    assert linear.weight.abs().max() <= 1.0 / math.sqrt(linear.in_features)


def _default_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_make_model_default_equals_plain_construction():
    cfg = TrainConfig.from_dict({"model": {"widths": [4, 8], "init": "default"}})
    torch.manual_seed(5)
    built = make_model(cfg, (1, 8, 8), 10)
    torch.manual_seed(5)
    plain = CNN((1, 8, 8), 10, widths=(4, 8))
    for (k1, v1), (k2, v2) in zip(built.state_dict().items(), plain.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_unknown_scheme_lists_choices():
    with pytest.raises(ValueError) as err:
        initialize(nn.Linear(2, 2), "he2")
    msg = str(err.value)
    assert "unknown init 'he2'" in msg
    assert f"choose one of: {', '.join(INITS.names())}" in msg
