"""models/regularize.py: L1/L2 penalty over weights with dim >= 2 only; decay / no-decay groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regsweep.models.build import make_model
from regsweep.models.config import RegularizationConfig, TrainConfig
from regsweep.models.regularize import Penalty, decay_parameters, param_groups, penalty_and_batch


def _model() -> nn.Module:
    """conv (no bias, BN) -> BN -> ... -> Linear(hidden) -> Linear: weights, biases, BN params all present,
    every parameter randomised (BN weights 1 and biases 0 would hide an inclusion)."""
    torch.manual_seed(0)
    cfg = TrainConfig.from_dict({"model": {"widths": [3, 5], "hidden": 4, "bn": "before_act"}})
    model = make_model(cfg, (1, 8, 8), 10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _excluded(model: nn.Module) -> list[nn.Parameter]:
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            out.append(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            out += [m.weight, m.bias]
    return out


def test_model_has_all_parameter_kinds():
    model = _model()
    assert len(_weights(model)) == 4  # 2 convs, 2 linears
    assert len(_excluded(model)) == 2 * 2 + 2  # 2 BN (weight, bias), 2 linear biases
    assert len(_weights(model)) + len(_excluded(model)) == len(list(model.parameters()))


@pytest.mark.parametrize("l1,l2", [(0.01, 0.0), (0.0, 0.003), (0.01, 0.003)])
def test_penalty_equals_hand_computation(l1, l2):
    model = _model()
    weights = _weights(model)
    expected = 0.0
    for w in weights:
        expected += l1 * w.detach().double().abs().sum().item() + l2 * w.detach().double().pow(2).sum().item()
    penalty = Penalty(model, l1=l1, l2=l2)
    value = penalty()
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_penalty_ignores_biases_and_norm_parameters():
    model = _model()
    penalty = Penalty(model, l1=0.01, l2=0.003)
    before = penalty().item()
    with torch.no_grad():
        for p in _excluded(model):
            p.add_(10.0)
    assert penalty().item() == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        _weights(model)[0].add_(1.0)
    assert penalty().item() > before


def test_penalty_gradient_only_on_weights():
    model = _model()
    l1, l2 = 0.01, 0.003
    Penalty(model, l1=l1, l2=l2)().backward()
    for w in _weights(model):
        torch.testing.assert_close(w.grad, l1 * torch.sign(w.detach()) + 2 * l2 * w.detach())
    for p in _excluded(model):
        assert p.grad is None


def test_penalty_truthiness():
    model = _model()
    assert not Penalty(model)
    assert not Penalty(model, l1=0.0, l2=0.0)
    assert Penalty(model, l1=1e-6)
    assert Penalty(model, l2=1e-6)
    assert Penalty(model, l1=0.0, l2=0.0)().item() == 0.0


def test_penalty_and_batch():
    model = _model()
    penalty, batch = penalty_and_batch(model, RegularizationConfig(l1=0.0, l2=0.5), num_classes=10)
    assert isinstance(penalty, Penalty) and penalty and (penalty.l1, penalty.l2) == (0.0, 0.5)
    assert batch is None  # no noise and no mixing: nothing to do to the batch
    penalty, _ = penalty_and_batch(model, RegularizationConfig(), num_classes=10)
    assert not penalty


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_split_by_dim():
    model = _model()
    groups = param_groups(model, 0.05)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids(_weights(model))
    assert _ids(no_decay["params"]) == _ids(_excluded(model))
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert set(groups[0]) == {"params", "weight_decay"}  # the groups and nothing else


def test_param_groups_cover_every_trainable_parameter_once():
    model = _model()
    frozen = model.head[-1].bias
    frozen.requires_grad_(False)
    decay, no_decay = decay_parameters(model)
    assert not (_ids(decay) & _ids(no_decay))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert _ids(decay) | _ids(no_decay) == _ids(trainable)
    assert id(frozen) not in _ids(decay) | _ids(no_decay)


def test_param_groups_layernorm_and_groupnorm_are_not_decayed():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.Embedding(3, 4))
    decay, no_decay = param_groups(model, 0.1)
    assert _ids(decay["params"]) == {id(model[0].weight), id(model[3].weight)}
    assert _ids(no_decay["params"]) == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                        id(model[2].weight), id(model[2].bias)}
