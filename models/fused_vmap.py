"""The vmap machinery of fused training (models/fused.py ``mode="vmap"``): the template module whose dropout
sites take per-member masks (:class:`MaskDropout`), the masks drawn as torch's dropout draws them
(:func:`draw_mask`) and one vmapped ``torch.func.functional_call`` over the members' stacked parameters and
buffers (:class:`Stacked`, which also evaluates the stacked members). Imports models/train.py's ``autocast``
only.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from regsweep.models.train import autocast

DROPOUTS = (nn.Dropout, nn.Dropout2d)  # the dropout modules a fused template replaces by MaskDropout


def dropout_sites(model: nn.Module) -> list[nn.Module]:
    """``model``'s dropout modules (:data:`DROPOUTS`) in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, DROPOUTS)]


class MaskDropout(nn.Module):
    """A dropout site of the fused template: multiplies by ``mask`` (set for one call; drawn per member as
    torch's dropout draws it) in train mode, passes ``x`` through otherwise. While ``calls`` is a list, each
    call appends (its index, its input shape) to it."""

    def __init__(self, index: int, channelwise: bool):
        super().__init__()
        self.index, self.channelwise = index, channelwise
        self.mask: Optional[torch.Tensor] = None
        self.calls: Optional[list[tuple[int, tuple[int, ...]]]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls is not None:
            self.calls.append((self.index, tuple(x.shape)))
        if not self.training or self.mask is None:
            return x
        return x * self.mask


def noise_shape(shape: tuple[int, ...], channelwise: bool) -> tuple[int, ...]:
    """The shape of the noise dropout multiplies by: the input's, or ``(N, C, 1, ...)`` for Dropout2d."""
    return (*shape[:2], *([1] * (len(shape) - 2))) if channelwise else shape


def draw_mask(shape: tuple[int, ...], p: float, channelwise: bool, device: torch.device) -> torch.Tensor:
    """The noise torch's (feature) dropout multiplies by on the CPU: Bernoulli(1 - p) / (1 - p), drawn from
    the global RNG."""
    shape = noise_shape(shape, channelwise)
    if p >= 1:
        return torch.zeros(shape, device=device)
    return torch.empty(shape, device=device).bernoulli_(1 - p).div_(1 - p)


class Stacked:
    """One vmapped ``functional_call`` over the members' stacked parameters and buffers.

    The template is a copy of the member model with the most dropout sites, its nn.Dropout/Dropout2d
    replaced by :class:`MaskDropout`; members map onto it by parameter/buffer POSITION (a model without
    dropout has the same parameters under shifted names)."""

    def __init__(self, models: Sequence[nn.Module]):
        with_sites = max(models, key=lambda m: len(dropout_sites(m)))
        self.template = copy.deepcopy(with_sites)
        self.sites: list[MaskDropout] = []
        for parent in list(self.template.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, DROPOUTS):
                    site = MaskDropout(len(self.sites), isinstance(child, nn.Dropout2d))
                    setattr(parent, name, site)
                    self.sites.append(site)
        self.pnames = [n for n, _ in self.template.named_parameters()]
        self.bnames = [n for n, _ in self.template.named_buffers()]
        self.order: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}  # batch shape -> draws
        self._train = vmap(self._call, in_dims=(0, 0, 0, 0), randomness="error")
        self._eval = vmap(self._call, in_dims=(0, 0, None, None), randomness="error")

    def _call(self, params: list[torch.Tensor], buffers: list[torch.Tensor], x: torch.Tensor,
              masks: Optional[list[torch.Tensor]]) -> torch.Tensor:
        for site, mask in zip(self.sites, masks or [None] * len(self.sites)):
            site.mask = mask
        try:
            return functional_call(self.template, (dict(zip(self.pnames, params)), dict(zip(self.bnames, buffers))),
                                   (x,))
        finally:
            for site in self.sites:
                site.mask = None

    def draws(self, x_shape: tuple[int, ...], device: torch.device) -> list[tuple[int, tuple[int, ...]]]:
        """(site index, input shape) of each dropout site in FORWARD order (the order a solo run draws its
        masks in) for a batch of ``x_shape``: one recording pass in eval mode, without grad, per batch shape."""
        if x_shape not in self.order:
            calls: list[tuple[int, tuple[int, ...]]] = []
            for site in self.sites:
                site.calls = calls
            was = self.template.training
            try:
                self.template.eval()
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    self.template(torch.zeros(x_shape, device=device))
            finally:
                self.template.train(was)
                for site in self.sites:
                    site.calls = None
            if len({k for k, _ in calls}) != len(calls):
                raise ValueError("a dropout module called twice in one forward pass cannot be fused")
            self.order[x_shape] = calls
        return self.order[x_shape]

    def masks(self, x_shape: tuple[int, ...], dev: torch.device, p: Sequence[float]) -> list[torch.Tensor]:
        """A member's dropout masks for one batch, one per template site, drawn in forward order from the global
        RNG (set to the member's stream by the caller); ``p`` is the member's dropout rate per site ([] = no
        dropout). Ones where the member has no dropout (its solo model has no module there, so multiplying by
        one changes nothing)."""
        masks: list[Optional[torch.Tensor]] = [None] * len(self.sites)
        for k, shape in self.draws(x_shape, dev):
            site = self.sites[k]
            if p and p[k] > 0:
                masks[k] = draw_mask(shape, p[k], site.channelwise, dev)
            else:
                masks[k] = torch.ones(noise_shape(shape, site.channelwise), device=dev)
        return masks  # type: ignore[return-value]

    def train_forward(self, params, buffers, x, masks) -> torch.Tensor:
        self.template.train()
        return self._train(params, buffers, x, masks)

    @torch.no_grad()
    def eval_forward(self, params, buffers, x) -> torch.Tensor:
        self.template.eval()
        return self._eval(params, buffers, x, None)

    @torch.no_grad()
    def evaluate(self, params: list[torch.Tensor], buffers: list[torch.Tensor], loader: Any, precision: str,
                 count: int) -> list[tuple[float, float]]:
        """(mean cross-entropy, accuracy) of each of the ``count`` members stacked in ``params``/``buffers`` on
        ``loader``'s (shared, unshuffled) batches: one vmapped forward per batch, each member's loss summed as
        ``train.evaluate`` sums it (models/fused.py ``evaluate_group``)."""
        dev = loader.device
        loss_sum = [torch.zeros((), device=dev, dtype=torch.float64) for _ in range(count)]
        correct = [torch.zeros((), device=dev, dtype=torch.int64) for _ in range(count)]
        n = 0
        for x, y in loader:
            with autocast(dev, precision):
                logits = self.eval_forward(params, buffers, x)
            for i in range(count):
                loss_sum[i] += nn.functional.cross_entropy(logits[i].float(), y, reduction="sum").double()
                correct[i] += (logits[i].argmax(1) == y).sum()
            n += y.shape[0]
        return [(float(s) / max(n, 1), int(c) / max(n, 1)) for s, c in zip(loss_sum, correct)]
