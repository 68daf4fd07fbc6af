"""models/optim.py: decoupled weight decay (p <- p - lr*wd*p, weights with dim >= 2 only) for sgd, adam and
adamw; it is a different knob from regularization.l2; Nesterov SGD; unknown names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regsweep.models.build import build, make_model
from regsweep.models.config import ConfigError, OptimConfig, TrainConfig
from regsweep.models.optim import OPTIMIZERS, make_optimizer

SYNTHETIC = {"name": "synthetic", "n_samples": 40, "shape": [1, 8, 8], "num_classes": 3, "batch_size": 16}


def _model() -> nn.Module:
    """CNN with BN and a hidden layer; every parameter random and non-zero, so any decay of biases or BN
    weights would show."""
    torch.manual_seed(0)
    cfg = TrainConfig.from_dict({"model": {"widths": [3, 4], "hidden": 5, "bn": "before_act"}})
    model = make_model(cfg, (1, 8, 8), 4)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_registry_names():
    assert OPTIMIZERS.names() == ["sgd", "adam", "adamw"]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_decoupled_decay_with_zero_gradient(name):
    lr, wd = 0.1, 0.2
    model = _model()
    before = _snapshot(model)
    opt = make_optimizer(model, OptimConfig(name=name, lr=lr, momentum=0.0, weight_decay=wd))
    _zero_grads(model)
    opt.step()
    decayed = 0
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p.detach(), before[n] - lr * wd * before[n], rtol=1e-6, atol=0)
            decayed += 1
        else:  # biases, BN weights and biases
            assert torch.equal(p.detach(), before[n]), f"{n} was decayed"
    assert decayed == 4


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_no_decay_when_weight_decay_is_zero(name):
    model = _model()
    before = _snapshot(model)
    opt = make_optimizer(model, OptimConfig(name=name, lr=0.1, momentum=0.0, weight_decay=0.0))
    _zero_grads(model)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_sgd_decay_stays_out_of_the_momentum_buffer():
    # decoupled: two zero-gradient steps scale by (1 - lr*wd) twice; coupled decay would feed wd*p into the
    # momentum buffer and shrink the second step by an extra momentum * lr * wd * p
    lr, wd, momentum = 0.1, 0.2, 0.9
    model = _model()
    before = _snapshot(model)
    opt = make_optimizer(model, OptimConfig(name="sgd", lr=lr, momentum=momentum, weight_decay=wd))
    for _ in range(2):
        _zero_grads(model)
        opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - lr * wd) ** 2 if p.dim() >= 2 else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # torch's coupled slot stays empty


def test_decay_uses_the_current_lr():
    model = _model()
    before = _snapshot(model)
    opt = make_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5))
    for group in opt.param_groups:
        group["lr"] = 0.01  # as a scheduler would set it
    _zero_grads(model)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.01 * 0.5) if p.dim() >= 2 else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_weight_decay_and_l2_are_different_knobs(name):
    """Same start, same batch, one step: decoupled decay shrinks p outside Adam's normalisation; l2 enters
    the gradient and is normalised with it (lr * g / (|g| + eps) on Adam's first step)."""
    lr, wd, l2 = 0.01, 0.1, 0.05  # 2 * l2 == wd: the same strength on paper
    base = {"data": SYNTHETIC, "model": {"widths": [4, 8], "bn": "before_act"},
            "optim": {"name": name, "lr": lr}}
    cfg = TrainConfig.from_dict(base)
    cfg_wd = cfg.with_overrides({"optim.weight_decay": wd})
    cfg_l2 = cfg.with_overrides({"regularization.l2": l2})
    parts_wd = build(cfg_wd, device="cpu")
    parts_l2 = build(cfg_l2, device="cpu", data=parts_wd.data)
    assert not parts_wd.penalty_fn and parts_l2.penalty_fn
    start = _snapshot(parts_wd.model)
    assert all(torch.equal(start[n], p) for n, p in parts_l2.model.named_parameters())

    x, y = parts_wd.data.train.x[:16], parts_wd.data.train.y[:16]
    grads = {}
    for parts in (parts_wd, parts_l2):
        parts.model.train()
        parts.optimizer.zero_grad()
        ce = parts.loss_fn(parts.model(x), y)
        loss = ce + (parts.penalty_fn() if parts.penalty_fn else 0)
        loss.backward()
        if parts is parts_wd:
            grads = {n: p.grad.clone() for n, p in parts.model.named_parameters()}
        parts.optimizer.step()

    eps = 1e-8
    after_wd, after_l2 = _snapshot(parts_wd.model), _snapshot(parts_l2.model)
    for n, p0 in start.items():
        g = grads[n]
        decay = wd if p0.dim() >= 2 else 0.0
        expected_wd = p0 * (1 - lr * decay) - lr * g / (g.abs() + eps)
        g2 = g + 2 * l2 * p0 if p0.dim() >= 2 else g
        expected_l2 = p0 - lr * g2 / (g2.abs() + eps)
        torch.testing.assert_close(after_wd[n], expected_wd, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(after_l2[n], expected_l2, rtol=1e-4, atol=1e-6)
    weights = [n for n, p in start.items() if p.dim() >= 2]
    diff = max((after_wd[n] - after_l2[n]).abs().max().item() for n in weights)
    assert diff > 1e-3


def test_adam_never_uses_coupled_weight_decay():
    # coupled Adam with a zero gradient would move every decayed weight by ~lr (normalised wd*p)
    model = _model()
    before = _snapshot(model)
    opt = make_optimizer(model, OptimConfig(name="adam", lr=0.1, weight_decay=1e-3))
    _zero_grads(model)
    opt.step()
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            assert (before[n] - p.detach()).abs().max() < 1e-3, n


def test_betas_are_passed():
    opt = make_optimizer(_model(), OptimConfig(name="adamw", betas=[0.8, 0.95]))
    assert all(g["betas"] == (0.8, 0.95) for g in opt.param_groups)


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_nesterov(nesterov):
    lr, m = 0.1, 0.9
    model = _model()
    before = _snapshot(model)
    opt = make_optimizer(model, OptimConfig(name="sgd", lr=lr, momentum=m, nesterov=nesterov))
    assert all(g["nesterov"] is nesterov and g["momentum"] == m for g in opt.param_groups)
    torch.manual_seed(1)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for _ in range(2):
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    # buffers b1 = g, b2 = (1 + m) g; Nesterov steps along g + m * b, plain SGD along b
    factor = (1 + m) + (1 + m + m * m) if nesterov else 1 + (1 + m)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - lr * factor * grads[n], rtol=1e-5, atol=1e-6)


def test_nesterov_without_momentum_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^optim\.nesterov: True .*momentum"):
        TrainConfig.from_dict({"optim": {"name": "sgd", "nesterov": True, "momentum": 0.0}})


def test_unknown_optimizer_lists_choices():
    with pytest.raises(ValueError) as err:
        make_optimizer(_model(), OptimConfig(name="lion"))
    assert str(err.value) == "unknown optimizer 'lion'; choose one of: sgd, adam, adamw"


def test_sgd_group_added_later_is_decoupled_too():
    lr, wd, momentum = 0.1, 0.2, 0.9
    first, later = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    opt = make_optimizer(first, OptimConfig(name="sgd", lr=lr, momentum=momentum, weight_decay=wd))
    opt.add_param_group({"params": [later.weight], "weight_decay": wd})
    before = later.weight.detach().clone()
    for _ in range(2):
        _zero_grads(first)
        _zero_grads(later)
        opt.step()
    torch.testing.assert_close(later.weight.detach(), before * (1 - lr * wd) ** 2, rtol=1e-6, atol=0)
