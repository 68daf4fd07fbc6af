"""Weight-init registry. Every scheme (except ``default``, which keeps PyTorch's own) sets conv (1d/2d/3d,
transposed) and linear weights by its rule, their biases to 0, and every affine norm (BatchNorm, GroupNorm,
LayerNorm, InstanceNorm) to weight 1 / bias 0, in any ``nn.Module`` (a user's model by import path included);
other modules (embeddings, attention, a user's own layers) keep their own initialisation."""

from __future__ import annotations

from typing import Callable

from torch import nn

from regsweep.models.registry import Registry

INITS: Registry[Callable[[nn.Module], None]] = Registry("init")
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)


def _scheme(weight_fn: Callable[[nn.Parameter], object]) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, _WEIGHTED):
                weight_fn(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:  # LayerNorm(bias=False)
                    nn.init.zeros_(m.bias)

    return apply


INITS.add("default", lambda model: None)
INITS.add("xavier_uniform", _scheme(nn.init.xavier_uniform_))
INITS.add("xavier_normal", _scheme(nn.init.xavier_normal_))
INITS.add("kaiming_uniform", _scheme(lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu")))
INITS.add("kaiming_normal", _scheme(lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")))
INITS.add("orthogonal", _scheme(nn.init.orthogonal_))


def initialize(model: nn.Module, scheme: str) -> nn.Module:
    INITS.get(scheme)(model)
    return model
