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
on an accelerator (issue 20's H100 figure: 16 vmapped copies 1.8x (fp32) one in-process model). The vmap
machinery (the template with per-member dropout masks, the stacked forward) is models/fused_vmap.py.

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

from regsweep.models.build import Parts, build, resolve_device
from regsweep.models.config import MONITORS, TrainConfig, get_path
from regsweep.models.fused_vmap import Stacked, dropout_sites
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
                                  list(model.buffers()), [float(m.p) for m in dropout_sites(model)],
                                  parts.train_loader(), start=time.perf_counter()))
    finally:
        _rng_set(dev, saved)
    shapes = [[tuple(t.shape) for t in m.params + m.buffers] for m in members]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("the members' parameter/buffer shapes differ; they cannot be fused")
    return members


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
            masks.append(stacked.masks(tuple(x.shape), dev, m.p))
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
    return stacked.evaluate(params, buffers, loader, precision, len(active))


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
    dev, mode = _group_device(cfgs, device, mode)
    slots = len(cfgs)
    configure_torch(cfgs[0], dev)
    members = make_members(cfgs, dev, data)
    if on_build is not None:
        on_build([m.parts for m in members])
    stacked = Stacked([m.parts.model for m in members]) if mode == "vmap" else None
    saved = _rng_get(dev)
    try:
        while any(m.active for m in members):
            run_epoch(members, stacked, dev, report, records)
            stopped = [m for m in members if not m.active and not m.ended]
            for m in stopped:  # stopped or done at this epoch: ended now, the others go on
                _end_member(m, on_end)
            if refill is None or not stopped:
                continue
            joined = _refill_members(members, cfgs[0], dev, refill, slots)
            if not joined:
                continue
            members += joined
            if on_build is not None:
                on_build([m.parts for m in joined])
            if stacked is not None:  # the template must hold every member's dropout sites
                stacked = Stacked([m.parts.model for m in members])
    finally:
        _rng_set(dev, saved)
    for m in members:
        if not m.ended:
            _end_member(m, on_end)
    return [m.parts for m in members], [m.hist for m in members]


def _group_device(cfgs: Sequence[TrainConfig], device: str | torch.device | None,
                  mode: str) -> tuple[torch.device, str]:
    """The device a group of ``cfgs`` trains on and its mode (``auto`` resolved: loop on the CPU, vmap on an
    accelerator). Raises ValueError when ``mode`` is unknown or :func:`fusable` says no."""
    if mode not in MODES:
        raise ValueError(f"unknown fused mode {mode!r}; choose one of: {', '.join(MODES)}")
    why = fusable(cfgs)
    if why is not None:
        raise ValueError(f"cannot fuse these configurations: {why}")
    dev = resolve_device(device)
    if mode == "auto":
        mode = "loop" if dev.type == "cpu" else "vmap"
    return dev, mode


def _refill_members(members: list[Member], first_cfg: TrainConfig, dev: torch.device, refill: Refill,
                    slots: int) -> list[Member]:
    """The members that join the group after an epoch at which some ended: ``refill(free)``'s configurations (at
    most ``free`` = ``slots`` minus the members still training), each made as its solo run (:func:`make_members`,
    indexed on from the last member); [] when no member trains on, no slot is free or refill returns none.
    Raises ValueError when one is not fusable with the group (``first_cfg``: its first member's)."""
    live = sum(m.active for m in members)
    if not live or live >= slots:
        return []
    new = list(refill(slots - live))[:slots - live]
    if not new:
        return []
    why = fusable([first_cfg, *new])
    if why is not None:
        raise ValueError(f"a refill cannot join the group: {why}")
    return make_members(new, dev, members[0].parts.data, first=len(members))


def _end_member(m: Member, on_end: Optional[MemberEnd]) -> None:
    """``m`` has ended: :func:`finish`, its seconds since it joined, then ``on_end(index, parts, history)``."""
    finish(m)
    m.hist.seconds = time.perf_counter() - m.start
    m.ended = True
    if on_end is not None:
        on_end(m.index, m.parts, m.hist)


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
