"""The seeds' MNIST CNN, generalised: conv stages (3x3, pad 1, act, 2x2 max-pool) then flatten -> FC.

With the default widths (32, 64) this is conv32 -> act -> pool -> conv64 -> act -> pool -> flatten -> FC.
Any input size and channel count works: a stage pools only while the feature map is at least 2x2, and the
classifier's input size is measured, never hand-computed.
"""

from __future__ import annotations

from torch import nn

from regsweep.models.layers import ConvBlock, Head, flat_features
from regsweep.models.registry import Registry

MODELS: Registry = Registry("model")


@MODELS.register("cnn")
class CNN(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, *, widths=(32, 64), hidden: int = 0,
                 dropout: float = 0.0, bn: str = "none", activation: str = "relu"):
        super().__init__()
        c, h, w = in_shape
        blocks = []
        for width in widths:
            pool = min(h, w) >= 2
            blocks.append(ConvBlock(c, width, bn=bn, activation=activation, dropout=dropout, pool=pool))
            c, h, w = width, (h // 2 if pool else h), (w // 2 if pool else w)
        self.features = nn.Sequential(*blocks)
        self.head = Head(flat_features(self.features, in_shape), num_classes, hidden=hidden, dropout=dropout,
                         activation=activation)

    def forward(self, x):
        return self.head(self.features(x))
