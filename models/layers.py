"""Building blocks that enforce the Placement contract.

BN ``before_act`` is conv -> BN -> act (CBR); ``after_act`` is conv -> act -> BN; ``none`` has no norm and
gives the conv a bias. Dropout (``Dropout2d`` in conv stages) comes after the block's activation (and its
BN in ``after_act``); the classifier head applies ``Dropout`` before its last Linear. Dropout is only
active in train mode, as torch's dropout modules are.
"""

from __future__ import annotations

import torch
from torch import nn

from regsweep.models.registry import Registry

ACTIVATIONS: Registry = Registry("activation")
ACTIVATIONS.add("relu", lambda: nn.ReLU(inplace=True))
ACTIVATIONS.add("gelu", nn.GELU)
ACTIVATIONS.add("silu", lambda: nn.SiLU(inplace=True))
ACTIVATIONS.add("elu", lambda: nn.ELU(inplace=True))
ACTIVATIONS.add("leaky_relu", lambda: nn.LeakyReLU(0.01, inplace=True))


def conv_bn_act(cin: int, cout: int, bn: str, activation: str, *, kernel: int = 3,
                stride: int = 1) -> list[nn.Module]:
    """conv, BN and activation in the order the BN placement says."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=(bn == "none"))
    act = ACTIVATIONS.get(activation)()
    if bn == "none":
        return [conv, act]
    if bn == "before_act":
        return [conv, nn.BatchNorm2d(cout), act]
    if bn == "after_act":
        return [conv, act, nn.BatchNorm2d(cout)]
    raise ValueError(f"unknown bn placement '{bn}'; choose one of: none, before_act, after_act")


class ConvBlock(nn.Sequential):
    """conv -> (BN placement) -> act -> Dropout2d -> optional 2x2 max-pool."""

    def __init__(self, cin: int, cout: int, *, bn: str, activation: str, dropout: float, pool: bool):
        layers = conv_bn_act(cin, cout, bn, activation)
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class Head(nn.Sequential):
    """flatten -> [Linear -> act] -> Dropout -> Linear(num_classes)."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: int, dropout: float, activation: str):
        layers: list[nn.Module] = [nn.Flatten()]
        if hidden > 0:
            layers += [nn.Linear(in_features, hidden), ACTIVATIONS.get(activation)()]
            in_features = hidden
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


@torch.no_grad()
def flat_features(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    """Number of features ``features`` produces for one input of ``in_shape`` (no hand arithmetic)."""
    was_training = features.training
    features.eval()
    out = features(torch.zeros(1, *in_shape))
    features.train(was_training)
    return int(out[0].numel())
