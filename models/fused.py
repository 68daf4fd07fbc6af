"""Fused training: N configurations of ONE architecture trained together, each exactly as its own solo run
would be set up (issue 20's CPU core; no search code here).

Each member is built by ``build(cfg)`` as a solo run is (its seed's initial weights, optimizer, LR schedule,
loss with its label smoothing, L1/L2 penalty, batch regulariser, seeded batch order) and keeps its own RNG
stream (the global CPU RNG state a solo run would have: dropout masks, noise and mixup draw from it). Per
batch the members' forward passes run as ONE computation: ``torch.func.functional_call`` of a template
module under ``torch.func.vmap`` over the members' parameters stacked from their own leaf tensors
(``mode="vmap"``), so the backward fills each member's own ``.grad`` and each member's own optimizer and
scheduler step it (per-member lr, decoupled weight decay, momentum/betas and every scheduler's parameters,
plateau included). ``mode="loop"`` runs the members' own models one after the other in one graph instead
(the solo arithmetic exactly). ``mode="auto"`` (the default) is ``loop`` on the CPU, where it measured
faster (vmap turns convolutions into grouped convolutions, slower there: benchmarks/fused.py), and ``vmap``
on an accelerator (issue 20's H100 figure: 16 vmapped copies 1.8x (fp32) one in-process model).

Structural fields must be equal (:data:`STRUCTURAL`, :func:`fusable` says why not); per member may differ:
model.dropout and model.init, optim.lr/weight_decay/momentum/nesterov/betas, every regularization field,
every scheduler parameter but its name, train.seed and train.early_stopping.

Per epoch each member gets its own record (the keys of ``train.fit``'s history; ``seconds`` is the group's
epoch time) through ``report(member, epoch, record)``; a truthy return stops that member, as does its own
early stopping or a non-finite loss (``failed:...``). A stopped member leaves the stack: its weights stop
changing and its records stop, and the others go on unchanged. Not bit-identical to a solo run in ``vmap``
mode (batched kernels sum in another order); see docs/architecture.md "Fused training".
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from regsweep.models.build import Parts, build, resolve_device
from regsweep.models.config import MONITORS, TrainConfig, get_path
from regsweep.models.train import History, autocast, configure_torch, evaluate

# (member index, epoch, record) -> a truthy value (a stop-reason string) stops that member after the epoch
MemberReport = Callable[[int, int, dict[str, Any]], Any]
# every active member's (index, epoch, record) of one epoch, before the first member's report: a caller that
# writes the group's records in one storage transaction (search/fused_trial.py) does it here
EpochRecords = Callable[[list[tuple[int, int, dict[str, Any]]]], None]
# on_end(member index, its Parts, its History): the member has ended (train_fused)
MemberEnd = Callable[[int, Parts, History], None]
# refill(free slots) -> up to that many configurations to join the group now (train_fused)
Refill = Callable[[int], Sequence[TrainConfig]]
MODES = ("auto", "vmap", "loop")  # auto: loop on the CPU (measured faster there), vmap on an accelerator
# dotted fields every member of a group must share ("data" and "model.args": the whole mapping)
STRUCTURAL = ("model.name", "model.widths", "model.hidden", "model.bn", "model.activation", "model.args", "data",
              "optim.name", "scheduler.name", "train.epochs", "train.precision", "train.num_threads",
              "train.deterministic", "train.channels_last", "train.compile", "train.train_eval_size")
# values a fused group cannot train yet: (field, value, why)
UNSUPPORTED = (("train.compile", True, "torch.compile of a vmapped model is not supported"),
               ("train.channels_last", True, "channels_last is not supported fused"),
               ("train.precision", "fp16", "fp16 needs a GradScaler per member; use fp32 or bf16"))
_DROPOUTS = (nn.Dropout, nn.Dropout2d)


def fusable(cfgs: Sequence[TrainConfig]) -> Optional[str]:
    """None when ``cfgs`` can train as one fused group, else one line saying why not (the first
    structural field that differs, with both values, or a setting fused training does not support)."""
    if not cfgs:
        return "no configurations"
    dicts = [c.to_dict() for c in cfgs]
    for path in STRUCTURAL:
        first = get_path(dicts[0], path)
        for i, d in enumerate(dicts[1:], 1):
            if get_path(d, path) != first:
                return f"{path} differs: member 0 has {first!r}, member {i} has {get_path(d, path)!r}"
    for path, value, why in UNSUPPORTED:
        if get_path(dicts[0], path) == value:
            return f"{path}: {value!r}: {why}"
    return None


# ------------------------------------------------------------------------------------ RNG streams
def _rng_get(dev: torch.device) -> tuple[torch.Tensor, ...]:
    """The global RNG states a training step draws from: the CPU's (dropout and noise on the CPU, mixup's
    coin) and, on CUDA, the device's too."""
    if dev.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(dev)
    return (torch.get_rng_state(),)


def _rng_set(dev: torch.device, state: tuple[torch.Tensor, ...]) -> None:
    torch.set_rng_state(state[0])
    if dev.type == "cuda":
        torch.cuda.set_rng_state(state[1], dev)


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


# ------------------------------------------------------------------------------------ the stacked model
class Stacked:
    """One vmapped ``functional_call`` over the members' stacked parameters and buffers.

    The template is a copy of the member model with the most dropout sites, its nn.Dropout/Dropout2d
    replaced by :class:`MaskDropout`; members map onto it by parameter/buffer POSITION (a model without
    dropout has the same parameters under shifted names)."""

    def __init__(self, models: Sequence[nn.Module]):
        with_sites = max(models, key=lambda m: len(_sites(m)))
        self.template = copy.deepcopy(with_sites)
        self.sites: list[MaskDropout] = []
        for parent in list(self.template.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _DROPOUTS):
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

    def train_forward(self, params, buffers, x, masks) -> torch.Tensor:
        self.template.train()
        return self._train(params, buffers, x, masks)

    @torch.no_grad()
    def eval_forward(self, params, buffers, x) -> torch.Tensor:
        self.template.eval()
        return self._eval(params, buffers, x, None)


def _sites(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _DROPOUTS)]


# ------------------------------------------------------------------------------------ members
@dataclass
class Member:
    """One configuration of the group: its solo Parts, loader, RNG stream and early-stopping bookkeeping."""

    index: int
    parts: Parts
    hist: History
    rng: tuple[torch.Tensor, ...]  # the global RNG states its solo run would have now (dropout, noise, mixup)
    params: list[nn.Parameter] = field(default_factory=list)  # by position, as the template's
    buffers: list[torch.Tensor] = field(default_factory=list)
    p: list[float] = field(default_factory=list)  # dropout rate per template site ([] = no dropout)
    loader: Any = None
    batches: Optional[Iterator] = None
    loss_sum: Optional[torch.Tensor] = None
    best_score: float = math.inf
    best_state: Optional[dict[str, torch.Tensor]] = None
    since_best: int = 0
    active: bool = True
    ended: bool = False  # finish() ran and on_end was told
    epoch: int = 0  # its next epoch (a member that refilled a slot starts at 0 while the others go on)
    start: float = 0.0  # perf_counter when it joined the group


def make_members(cfgs: Sequence[TrainConfig], dev: torch.device, data: Any = None, first: int = 0) -> list[Member]:
    """Each member as ``build(cfg)`` makes it for a solo run (one data bundle shared: ``data`` when given, a
    loaded ``DataBundle`` of the members' data config), with the global RNG state that run would train from; the
    process's global RNG ends as it was. Their indices count from ``first``."""
    members: list[Member] = []
    saved = _rng_get(dev)
    bundle = data
    try:
        for i, cfg in enumerate(cfgs):
            parts = build(cfg, dev, data=bundle)
            bundle = parts.data
            model = parts.model
            hist = History(n_params=sum(p.numel() for p in model.parameters()), device=str(dev),
                           seed=cfg.train.seed, num_threads=torch.get_num_threads(),
                           split_fingerprint=parts.data.fingerprint)
            members.append(Member(first + i, parts, hist, _rng_get(dev), list(model.parameters()),
                                  list(model.buffers()), [float(m.p) for m in _sites(model)], parts.train_loader(),
                                  start=time.perf_counter()))
    finally:
        _rng_set(dev, saved)
    shapes = [[tuple(t.shape) for t in m.params + m.buffers] for m in members]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("the members' parameter/buffer shapes differ; they cannot be fused")
    return members


def _masks(stacked: Stacked, x_shape: tuple[int, ...], dev: torch.device,
           member: Member) -> list[torch.Tensor]:
    """``member``'s dropout masks for one batch, one per template site, drawn in forward order from the global
    RNG (set to the member's stream by the caller); ones where the member has no dropout (its solo model has
    no module there, so multiplying by one changes nothing)."""
    masks: list[Optional[torch.Tensor]] = [None] * len(stacked.sites)
    for k, shape in stacked.draws(x_shape, dev):
        site = stacked.sites[k]
        if member.p and member.p[k] > 0:
            masks[k] = draw_mask(shape, member.p[k], site.channelwise, dev)
        else:
            masks[k] = torch.ones(noise_shape(shape, site.channelwise), device=dev)
    return masks  # type: ignore[return-value]


def _next_batches(active: list[Member], stacked: Optional[Stacked], dev: torch.device):
    """Each active member's next batch, batch regulariser and dropout masks, drawn from its own RNG stream in
    a solo run's order. Returns (xs, ys, masks per member)."""
    xs, ys, masks = [], [], []
    for m in active:
        x, y = next(m.batches)
        _rng_set(dev, m.rng)
        if m.parts.regularize_batch is not None:
            x, y = m.parts.regularize_batch(x, y)
        if stacked is not None:
            masks.append(_masks(stacked, tuple(x.shape), dev, m))
        m.rng = _rng_get(dev)
        xs.append(x)
        ys.append(y)
    return xs, ys, masks


def _logits_loop(active: list[Member], xs, dev: torch.device, precision: str) -> list[torch.Tensor]:
    """mode 'loop': each member's own model on its own batch, its dropout drawn from its own stream."""
    out = []
    for m, x in zip(active, xs):
        _rng_set(dev, m.rng)
        with autocast(dev, precision):
            out.append(m.parts.model(x))
        m.rng = _rng_get(dev)
    return out


def forward_backward(active: list[Member], stacked: Optional[Stacked], stacked_buffers: list[torch.Tensor],
                     dev: torch.device, precision: str) -> list[torch.Tensor]:
    """One batch for every active member: one fused forward (vmap) or the members' own forwards (loop), each
    member's own loss and penalty, one backward filling each member's own ``.grad``. Returns the losses."""
    saved = _rng_get(dev)
    xs, ys, masks = _next_batches(active, stacked, dev)
    if stacked is None:
        logits = _logits_loop(active, xs, dev, precision)
    else:
        params = [torch.stack([m.params[k] for m in active]) for k in range(len(active[0].params))]
        site_masks = [torch.stack([mm[k] for mm in masks]) for k in range(len(stacked.sites))]
        with autocast(dev, precision):
            logits = stacked.train_forward(params, stacked_buffers, torch.stack(xs), site_masks)
    _rng_set(dev, saved)
    losses = []
    for i, (m, y) in enumerate(zip(active, ys)):
        with autocast(dev, precision):  # as train.train computes it
            loss = m.parts.loss_fn(logits[i], y)
        if m.parts.penalty_fn:
            loss = loss + m.parts.penalty_fn()
        m.loss_sum += loss.detach().double() * y.shape[0]
        losses.append(loss)
        m.parts.optimizer.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()  # d(sum)/d(loss_i) = 1: each member's grads are its own loss's
    return losses


def train_step(active: list[Member], stacked: Optional[Stacked], stacked_buffers: list[torch.Tensor],
               dev: torch.device, precision: str) -> None:
    """:func:`forward_backward`, then each member's own optimizer step and scheduler."""
    forward_backward(active, stacked, stacked_buffers, dev, precision)
    for m in active:
        m.parts.optimizer.step()
        m.parts.scheduler.after_batch()


@torch.no_grad()
def evaluate_group(active: list[Member], stacked: Optional[Stacked], split: str,
                   precision: str) -> list[tuple[float, float]]:
    """(mean cross-entropy, accuracy) per active member on ``split`` in eval mode: one vmapped forward per
    batch over the shared (unshuffled) batches, each member's loss summed as ``train.evaluate`` sums it."""
    loader = active[0].parts.eval_loader(split)
    if stacked is None:
        return [evaluate(m.parts.model, m.parts.eval_loader(split), precision) for m in active]
    for m in active:
        m.parts.model.eval()
    params = [torch.stack([m.params[k] for m in active]) for k in range(len(active[0].params))]
    buffers = [torch.stack([m.buffers[k] for m in active]) for k in range(len(active[0].buffers))]
    dev = loader.device
    loss_sum = [torch.zeros((), device=dev, dtype=torch.float64) for _ in active]
    correct = [torch.zeros((), device=dev, dtype=torch.int64) for _ in active]
    n = 0
    for x, y in loader:
        with autocast(dev, precision):
            logits = stacked.eval_forward(params, buffers, x)
        for i in range(len(active)):
            loss_sum[i] += nn.functional.cross_entropy(logits[i].float(), y, reduction="sum").double()
            correct[i] += (logits[i].argmax(1) == y).sum()
        n += y.shape[0]
    return [(float(s) / max(n, 1), int(c) / max(n, 1)) for s, c in zip(loss_sum, correct)]


def end_epoch(m: Member, record: dict[str, Any], report: Optional[MemberReport]) -> None:
    """``train.train``'s epoch-end rules for one member: record, report, fail on a non-finite loss, best-epoch
    bookkeeping, the report's stop, early stopping. Sets ``m.active`` False when the member stops."""
    cfg = m.parts.config
    es = cfg.train.early_stopping
    hist = m.hist
    hist.epochs.append(record)
    epoch = record["epoch"]
    verdict = report(m.index, epoch, record) if report is not None else None
    if not all(math.isfinite(record[k]) for k in ("train_loss", "val_loss")):
        bad = "train_loss" if not math.isfinite(record["train_loss"]) else "val_loss"
        hist.stop_reason = f"failed:non-finite {bad} at epoch {epoch}"
        m.active = False
        return
    score = MONITORS[es.monitor] * record[es.monitor]
    if score < m.best_score - es.min_delta or hist.best_epoch is None:
        m.best_score, hist.best_epoch, m.since_best = score, epoch, 0
        if es.restore_best:
            m.best_state = copy.deepcopy(m.parts.model.state_dict())
    else:
        m.since_best += 1
    if verdict:
        hist.stop_reason = verdict if isinstance(verdict, str) else f"stopped@{epoch}"
        m.active = False
    elif es.patience is not None and m.since_best >= es.patience:
        hist.stop_reason = "early_stopped"
        m.active = False


def run_epoch(members: list[Member], stacked: Optional[Stacked], dev: torch.device,
              report: Optional[MemberReport], records: Optional[EpochRecords] = None) -> None:
    """One epoch of every active member (each its own next epoch: a member that refilled a slot is behind the
    others): training batches in lock-step, evaluation, each member's record. A member that has trained its
    last epoch becomes inactive (its stop reason stays "completed")."""
    active = [m for m in members if m.active]
    precision = active[0].parts.config.train.precision
    t0 = time.perf_counter()
    lrs = [m.parts.optimizer.param_groups[0]["lr"] for m in active]
    buffers = [torch.stack([m.buffers[k] for m in active]) for k in range(len(active[0].buffers))]
    for m in active:
        m.parts.model.train()
        m.batches = iter(m.loader)
        m.loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    for _ in range(len(active[0].loader)):
        train_step(active, stacked, buffers, dev, precision)
    with torch.no_grad():  # the stacked running statistics back into each member's own buffers
        for k, buf in enumerate(buffers):
            for i, m in enumerate(active):
                m.buffers[k].copy_(buf[i])
    n_train = len(active[0].loader.split)
    tr_eval = evaluate_group(active, stacked, "train_eval", precision)
    val = evaluate_group(active, stacked, "val", precision)
    seconds = time.perf_counter() - t0
    done = []
    for i, m in enumerate(active):
        m.parts.scheduler.after_epoch(val[i][0])
        done.append({"epoch": m.epoch, "train_loss": float(m.loss_sum) / max(n_train, 1),
                     "train_eval_loss": tr_eval[i][0], "train_acc": tr_eval[i][1], "val_loss": val[i][0],
                     "val_acc": val[i][1], "lr": lrs[i], "seconds": seconds})
    if records is not None:
        records([(m.index, m.epoch, record) for m, record in zip(active, done)])
    for m, record in zip(active, done):
        end_epoch(m, record, report)
        m.epoch += 1
        if m.active and m.epoch >= m.parts.config.train.epochs:
            m.active = False


def train_fused(cfgs: Sequence[TrainConfig], device: str | torch.device | None = None,
                report: Optional[MemberReport] = None, mode: str = "auto", *, records: Optional[EpochRecords] = None,
                data: Any = None, on_build: Optional[Callable[[list[Parts]], None]] = None,
                on_end: Optional[MemberEnd] = None,
                refill: Optional[Refill] = None) -> tuple[list[Parts], list[History]]:
    """Train ``cfgs`` as one fused group (see the module docstring); returns each member's (Parts, History) as
    ``train.train`` would. ``records`` gets each epoch's records of every active member before their reports;
    ``data`` is the members' loaded DataBundle (loaded here when None); ``on_build`` gets the members' Parts
    before their first step (their models are the ones trained), once for the first members and again for each
    refill's; ``on_end(index, parts, history)`` is called once per member as soon as it has ended (its
    :func:`finish` done): a member that stops (pruned, early-stopped, non-finite) right after the epoch it
    stopped at, while the others train on; the rest after their last epoch.

    ``refill(free)``: after an epoch at which members ended while others train on, the group has ``free`` slots
    (``len(cfgs)`` minus the members still training); the configurations it returns (at most ``free``, each
    fusable with the group) join as new members at their epoch 0, indexed on from the last member, each exactly
    as its solo run would train; the group runs until no member trains. Returns every member, refills included.
    Raises ValueError when :func:`fusable` says no or ``mode`` is unknown."""
    if mode not in MODES:
        raise ValueError(f"unknown fused mode {mode!r}; choose one of: {', '.join(MODES)}")
    why = fusable(cfgs)
    if why is not None:
        raise ValueError(f"cannot fuse these configurations: {why}")
    dev = resolve_device(device)
    if mode == "auto":
        mode = "loop" if dev.type == "cpu" else "vmap"
    slots = len(cfgs)
    configure_torch(cfgs[0], dev)
    members = make_members(cfgs, dev, data)
    if on_build is not None:
        on_build([m.parts for m in members])
    stacked = Stacked([m.parts.model for m in members]) if mode == "vmap" else None

    def end(m: Member) -> None:
        finish(m)
        m.hist.seconds = time.perf_counter() - m.start
        m.ended = True
        if on_end is not None:
            on_end(m.index, m.parts, m.hist)

    saved = _rng_get(dev)
    try:
        while any(m.active for m in members):
            run_epoch(members, stacked, dev, report, records)
            stopped = [m for m in members if not m.active and not m.ended]
            for m in stopped:  # stopped or done at this epoch: ended now, the others go on
                end(m)
            live = sum(m.active for m in members)
            if refill is None or not stopped or not live or live >= slots:
                continue
            new = list(refill(slots - live))[:slots - live]
            if not new:
                continue
            why = fusable([cfgs[0], *new])
            if why is not None:
                raise ValueError(f"a refill cannot join the group: {why}")
            joined = make_members(new, dev, members[0].parts.data, first=len(members))
            members += joined
            if on_build is not None:
                on_build([m.parts for m in joined])
            if stacked is not None:  # the template must hold every member's dropout sites
                stacked = Stacked([m.parts.model for m in members])
    finally:
        _rng_set(dev, saved)
    for m in members:
        if not m.ended:
            end(m)
    return [m.parts for m in members], [m.hist for m in members]


def finish(m: Member) -> None:
    """restore_best and the test split, as ``train.train`` ends (the member's own model, unfused)."""
    tcfg = m.parts.config.train
    if tcfg.early_stopping.restore_best and m.best_state is not None:
        m.parts.model.load_state_dict(m.best_state)
    if not m.hist.stop_reason.startswith("failed:"):
        tl, ta = evaluate(m.parts.model, m.parts.eval_loader("test"), tcfg.precision)
        m.hist.test = {"test_loss": tl, "test_acc": ta}


def fit_fused(cfgs: Sequence[TrainConfig], device: str | torch.device | None = None,
              report: Optional[MemberReport] = None, mode: str = "auto", **hooks: Any) -> list[History]:
    """:func:`train_fused`'s histories, one per configuration, in order (``hooks``: its keyword arguments)."""
    return train_fused(cfgs, device, report, mode, **hooks)[1]
