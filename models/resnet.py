"""CIFAR-style ResNets (He et al., 2016), with regsweep's BN placement, dropout and init rules.

A BasicBlock is two 3x3 convs. With ``bn=before_act`` each conv is followed by BN; the first then gets its
activation, the second is added to the shortcut and the activation comes after the add:
``act(BN(conv2(act(BN(conv1 x)))) + shortcut(x))``. With ``after_act`` the same order holds with BN moved
behind each activation: ``BN(act(conv2(BN(act(conv1 x))) + shortcut(x)))``. With ``none`` the convs get
biases and there is no norm. Dropout2d follows the block's final activation; the head applies Dropout
before the classifier.

Shortcuts: identity when shape is kept; when a stage halves the resolution or changes width, a projection
(1x1 conv with stride 2, plus BN unless ``bn=none``) — He et al.'s option B.

- ``resnet18``: the CIFAR variant of ResNet-18 (3x3 stem conv, no max-pool), stages 64-128-256-512, two
  blocks each; 11.2 M parameters for 10 classes.
- ``resnet20``: the original CIFAR ResNet (6n+2 with n=3), stages 16-32-64, three blocks each; 0.27 M.
"""

from __future__ import annotations

from torch import nn

from regsweep.models.cnn import MODELS
from regsweep.models.layers import ACTIVATIONS, Head, conv_bn_act


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, bn: str, activation: str, dropout: float):
        super().__init__()
        self.conv1 = nn.Sequential(*conv_bn_act(cin, cout, bn, activation, stride=stride))
        # second conv: its BN (before_act) precedes the add; the activation (and after_act's BN) follow it
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=(bn == "none"))
        self.bn2 = nn.BatchNorm2d(cout) if bn == "before_act" else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            proj: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=(bn == "none"))]
            if bn != "none":
                proj.append(nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential(*proj)
        self.act = ACTIVATIONS.get(activation)()
        self.post_bn = nn.BatchNorm2d(cout) if bn == "after_act" else nn.Identity()
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x)
        return self.drop(self.post_bn(self.act(out)))


class ResNet(nn.Module):
    STAGES = 0  # set by subclasses: number of stages (= length of model.widths)
    DEPTHS: tuple[int, ...] = ()
    WIDTHS: tuple[int, ...] = ()

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, *, widths=(), hidden: int = 0,
                 dropout: float = 0.0, bn: str = "before_act", activation: str = "relu"):
        super().__init__()
        widths = tuple(widths) or self.WIDTHS
        self.stem = nn.Sequential(*conv_bn_act(in_shape[0], widths[0], bn, activation))
        blocks, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, self.DEPTHS)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, width, stride, bn=bn, activation=activation, dropout=dropout))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = Head(cin, num_classes, hidden=hidden, dropout=dropout, activation=activation)

    def forward(self, x):
        return self.head(self.pool(self.layers(self.stem(x))))


@MODELS.register("resnet18")
class ResNet18(ResNet):
    STAGES, DEPTHS, WIDTHS = 4, (2, 2, 2, 2), (64, 128, 256, 512)


@MODELS.register("resnet20")
class ResNet20(ResNet):
    STAGES, DEPTHS, WIDTHS = 3, (3, 3, 3), (16, 32, 64)
