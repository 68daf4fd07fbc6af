"""models/fused.py: a fused group trains each member as its solo run would (CPU, fp32)."""

import math

import pytest
import torch

from regsweep.models.build import build
from regsweep.models.config import TrainConfig
from regsweep.models.fused import Stacked, fit_fused, forward_backward, fusable, make_members, train_fused
from regsweep.models.train import HISTORY_KEYS, fit

BASE = {"model": {"name": "cnn", "widths": [8, 16]}, "data": {"name": "digits", "batch_size": 64},
        "optim": {"name": "adamw", "lr": 3e-3}, "scheduler": {"name": "step", "step_size": 1, "gamma": 0.5},
        "train": {"epochs": 3, "num_threads": 1, "train_eval_size": 256}}
# per member: dropout, L1, L2, decoupled weight decay, lr, schedule params, init, seed, label smoothing differ
MEMBERS = [{},
           {"model.dropout": 0.3, "regularization.l1": 1e-4, "optim.lr": 1e-3, "scheduler.gamma": 0.9,
            "train.seed": 1},
           {"model.dropout": 0.1, "regularization.l2": 1e-3, "optim.weight_decay": 0.05, "model.init": "kaiming_normal",
            "scheduler.step_size": 2, "train.seed": 2, "regularization.label_smoothing": 0.1},
           {"optim.weight_decay": 0.01, "optim.lr": 5e-3, "model.init": "xavier_uniform", "train.seed": 3,
            "regularization.l1": 1e-5, "regularization.l2": 1e-4, "regularization.input_noise_std": 0.05}]


def group(base=None, members=MEMBERS, **over):
    cfg = TrainConfig.from_dict(base or BASE).with_overrides(over)
    return [cfg.with_overrides(m) for m in members]


def curves(hist):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in hist.epochs]


def max_diff(a, b):
    """Largest relative difference of two histories' metrics (same epochs required)."""
    assert [e["epoch"] for e in a.epochs] == [e["epoch"] for e in b.epochs]
    worst = 0.0
    for ea, eb in zip(a.epochs, b.epochs):
        for k in HISTORY_KEYS:
            if k not in ("epoch", "seconds"):
                worst = max(worst, abs(ea[k] - eb[k]) / max(abs(eb[k]), 1e-12))
    return worst


def solo_first_step(cfg):
    """The first training batch of a solo run, as train.train does it: loss and every parameter's grad."""
    parts = build(cfg, "cpu")
    parts.model.train()
    x, y = next(iter(parts.train_loader()))
    if parts.regularize_batch is not None:
        x, y = parts.regularize_batch(x, y)
    loss = parts.loss_fn(parts.model(x), y)
    if parts.penalty_fn:
        loss = loss + parts.penalty_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in parts.model.parameters()]


# ------------------------------------------------------------------------------------ fusable
def test_fusable_names_the_first_structural_difference():
    cfgs = group()
    assert fusable(cfgs) is None
    assert fusable(cfgs + [cfgs[0].with_overrides({"model.bn": "before_act"})]) == (
        "model.bn differs: member 0 has 'none', member 4 has 'before_act'")
    assert fusable([cfgs[0], cfgs[1].with_overrides({"data.batch_size": 32})]).startswith("data differs")
    assert fusable([cfgs[0], cfgs[1].with_overrides({"scheduler.name": "cosine"})]).startswith("scheduler.name")
    assert fusable([cfgs[0], cfgs[1].with_overrides({"train.epochs": 4})]).startswith("train.epochs")
    assert "fp16" in fusable([c.with_overrides({"train.precision": "fp16"}) for c in cfgs])
    assert fusable([]) == "no configurations"
    with pytest.raises(ValueError, match="cannot fuse these configurations: optim.name differs"):
        train_fused([cfgs[0], cfgs[1].with_overrides({"optim.name": "sgd"})], "cpu")
    with pytest.raises(ValueError, match="unknown fused mode 'x'; choose one of: auto, vmap, loop"):
        train_fused(cfgs, "cpu", mode="x")


# ------------------------------------------------------------------------------------ first step
@pytest.mark.parametrize("bn", ["none", "before_act", "after_act"])
def test_first_forward_and_backward_match_each_solo_run(bn):
    """The losses are equal; every gradient is within 1e-6 of the solo run's. With BatchNorm the first conv's
    gradient (a 4096-term fp32 sum per element, |g| up to ~4) may differ by up to 1e-5, as much as 1 vs 2
    threads make it differ: there the bound is twice that thread difference, measured here."""
    cfgs = group(**{"model.bn": bn})
    torch.set_num_threads(1)
    members = make_members(cfgs, torch.device("cpu"))
    stacked = Stacked([m.parts.model for m in members])
    for m in members:
        m.parts.model.train()
        m.batches = iter(m.loader)
        m.loss_sum = torch.zeros((), dtype=torch.float64)
    buffers = [torch.stack([m.buffers[k] for m in members]) for k in range(len(members[0].buffers))]
    losses = forward_backward(members, stacked, buffers, torch.device("cpu"), "fp32")
    assert len(stacked.sites) == 3  # two Dropout2d and the head's Dropout, drawn per member
    for cfg, m, loss in zip(cfgs, members, losses):
        solo_loss, solo_grads = solo_first_step(cfg)
        assert abs(float(loss.detach()) - float(solo_loss)) <= 1e-6
        if bn != "none":
            torch.set_num_threads(2)
            two = solo_first_step(cfg)[1]
            torch.set_num_threads(1)
        for k, (p, g) in enumerate(zip(m.params, solo_grads)):
            bound = 1e-6 if bn == "none" else max(1e-6, 2 * (two[k] - g).abs().max().item())
            assert (p.grad - g).abs().max().item() <= bound, (k, bound)
    if bn == "before_act":  # the batch statistics updated each member's own running mean
        parts = build(cfgs[1], "cpu")
        parts.model.train()
        parts.model(next(iter(parts.train_loader()))[0])
        solo_mean = parts.model.features[0][1].running_mean
        assert (buffers[0][1] - solo_mean).abs().max().item() <= 1e-6
        assert not torch.equal(buffers[0][0], buffers[0][1])


# ------------------------------------------------------------------------------------ whole histories
def test_loop_mode_is_the_solo_run_exactly_with_dropout_on():
    """mode 'loop' shares everything but the forward pass: the histories (dropout, mixup, input noise, label
    smoothing, augmentation, schedules, seeds, early stopping, test split) are bit-identical to solo runs,
    which checks the bookkeeping, each member's own RNG stream and its own batch order."""
    members = [{**MEMBERS[0], "regularization.mixup_alpha": 0.2}] + MEMBERS[1:]  # mixup and noise on too
    cfgs = group(members=members, **{"train.early_stopping.patience": 1, "data.train_fraction": 0.5,
                                     "data.augment": True})
    fused = fit_fused(cfgs, "cpu", mode="loop")
    for cfg, hist in zip(cfgs, fused):
        solo = fit(cfg, "cpu")
        assert curves(hist) == curves(solo)
        assert (hist.stop_reason, hist.best_epoch, hist.test) == (solo.stop_reason, solo.best_epoch, solo.test)


def assert_vmap_within_the_thread_spread(cfgs):
    """The group fused in vmap mode against each member's solo run: no member differs more than two legitimate
    solo runs (1 vs 2 threads, measured here) differ, or 2e-6 relative where threads make no difference. Returns
    (fused histories, solo histories)."""
    fused = fit_fused(cfgs, "cpu", mode="vmap")
    solos = [fit(cfg, "cpu") for cfg in cfgs]
    spread = max(max_diff(fit(cfg.with_overrides({"train.num_threads": 2}), "cpu"), solo)
                 for cfg, solo in zip(cfgs, solos))
    worst = max(max_diff(hist, solo) for hist, solo in zip(fused, solos))
    assert worst <= max(spread, 2e-6), (worst, spread)
    return fused, solos


@pytest.mark.parametrize("sched", [pytest.param({"scheduler.name": "step"}, marks=pytest.mark.slow),  # CI time:
                                   pytest.param({"scheduler.name": "cosine", "scheduler.eta_min": 1e-4,  # onecycle
                                                 "model.bn": "after_act"}, marks=pytest.mark.slow),  # runs there
                                   {"scheduler.name": "onecycle", "scheduler.pct_start": 0.2, "model.bn": "before_act",
                                    "optim.name": "sgd"}])
def test_vmap_histories_differ_from_solo_no_more_than_thread_counts_do(sched):
    """Dropout off: every member's whole history against its solo run differs no more than two legitimate solo
    runs of the group's members (1 vs 2 threads) differ, measured here; 2e-6 relative where threads make no
    difference."""
    members = [{k: v for k, v in m.items() if k not in ("model.dropout", "regularization.input_noise_std")}
               for m in MEMBERS]
    members[1]["scheduler.max_lr"] = 2e-2
    cfgs = group(members=members, **sched, **{"data.train_fraction": 0.3, "train.train_eval_size": 128})
    fused, solos = assert_vmap_within_the_thread_spread(cfgs)
    assert [(h.stop_reason, h.best_epoch) for h in fused] == [(h.stop_reason, h.best_epoch) for h in solos]


@pytest.mark.parametrize("bn", [pytest.param("none", marks=pytest.mark.slow), "before_act"])
def test_vmap_histories_with_dropout_noise_and_mixup_on_stay_within_the_thread_spread_too(bn):
    """Each member draws its masks, noise and mixup from its solo run's RNG stream, so with them on the vmap
    histories still differ from the solo runs only by arithmetic order (no 8-seed statistics needed)."""
    members = [{**MEMBERS[0], "regularization.mixup_alpha": 0.2}] + MEMBERS[1:]
    cfgs = group(members=members, **{"model.bn": bn, "data.train_fraction": 0.3, "train.train_eval_size": 128})
    assert_vmap_within_the_thread_spread(cfgs)


# ------------------------------------------------------------------------------------ stops and failures
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_a_stopped_member_and_a_nan_member_leave_the_others_unchanged(mode):
    """A member pruned after epoch 1 keeps its epoch-1 weights and records; one whose lr sends it to NaN fails
    alone; the other two train as they would alone (as a pair, and solo: exactly in loop mode)."""
    tol = 0.0 if mode == "loop" else 1e-5
    members = [{k: v for k, v in m.items() if k != "regularization.input_noise_std"}
               for m in MEMBERS if "model.dropout" not in m]  # 2 members
    members = members + [{"optim.lr": 1e30, "train.seed": 7}, {"train.seed": 8, "optim.lr": 2e-3}]
    cfgs = group(members=members, **{"train.epochs": 4, "train.early_stopping.restore_best": False,
                                     "data.train_fraction": 0.5})

    def report(member, epoch, record):
        assert set(record) == set(HISTORY_KEYS)
        if member == 3 and epoch == 1:
            return "pruned:test@1"
        return None

    parts, hists = train_fused(cfgs, "cpu", report=report, mode=mode)
    frozen = {k: v.clone() for k, v in parts[3].model.state_dict().items()}
    assert hists[3].stop_reason == "pruned:test@1" and len(hists[3].epochs) == 2
    assert hists[2].stop_reason.startswith("failed:non-finite") and len(hists[2].epochs) == 1
    assert all(h.stop_reason == "completed" and len(h.epochs) == 4 for h in hists[:2])
    # the pruned member's weights are those after its epoch 1: a solo run stopped there has them
    solo_parts = build(cfgs[3].with_overrides({"train.epochs": 2}), "cpu")
    fit(cfgs[3].with_overrides({"train.epochs": 2}), "cpu", parts=solo_parts)
    for k, v in solo_parts.model.state_dict().items():
        assert (frozen[k].float() - v.float()).abs().max().item() <= tol
    # the other two members: the same curves as the two trained alone as a group, and as their solo runs
    pair = fit_fused(cfgs[:2], "cpu", mode=mode)
    for i, (hist, alone) in enumerate(zip(hists[:2], pair)):
        assert max_diff(hist, alone) <= tol / 5
        assert max_diff(hist, fit(cfgs[i], "cpu")) <= tol
    assert all(math.isfinite(e["val_loss"]) for h in hists[:2] for e in h.epochs)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_a_bf16_group_trains_as_its_solo_runs(mode):
    """train.precision bf16 (autocast on the CPU): loop mode replays the solo runs exactly, vmap mode stays
    within bf16's rounding of them."""
    members = [{k: v for k, v in m.items() if k != "regularization.input_noise_std"} for m in MEMBERS[:2]]
    cfgs = group(members=members, **{"train.precision": "bf16", "train.epochs": 1, "data.train_fraction": 0.3,
                                     "train.train_eval_size": 128})
    for cfg, hist in zip(cfgs, fit_fused(cfgs, "cpu", mode=mode)):
        solo = fit(cfg, "cpu")
        if mode == "loop":
            assert curves(hist) == curves(solo)
        else:
            assert max_diff(hist, solo) <= 0.05, max_diff(hist, solo)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_a_refilled_slot_trains_its_new_member_as_its_solo_run_while_the_others_go_on(mode):
    """Two slots; member 1 is pruned after epoch 1 and ``refill`` puts a third configuration (with dropout, which
    neither first member has: vmap mode's template is rebuilt) into its slot at its epoch 0. The newcomer trains
    its whole run as it would alone, the member that never stopped is unchanged by it, every member ends once,
    and refill is asked again whenever a slot frees while members train on (an empty answer leaves it free)."""
    tol = 0.0 if mode == "loop" else 1e-5
    cfgs = group(members=[{}, {"optim.lr": 1e-3, "train.seed": 1}], **{"train.epochs": 4,
                 "data.train_fraction": 0.4, "train.early_stopping.restore_best": False})
    newcomer = cfgs[0].with_overrides({"model.dropout": 0.3, "train.seed": 5, "optim.lr": 2e-3})
    asked, built, ended = [], [], []

    def report(member, epoch, record):
        return "pruned:test@1" if (member, epoch) == (1, 1) else None

    def refill(free):
        asked.append(free)
        return [newcomer] if len(asked) == 1 else []

    parts, hists = train_fused(cfgs, "cpu", report=report, mode=mode, refill=refill,
                               on_build=lambda p: built.append(len(p)),
                               on_end=lambda i, _p, h: ended.append((i, len(h.epochs))))
    assert len(hists) == 3 and built == [2, 1]
    assert asked == [1, 1]  # after the prune; again when member 0 finished while the newcomer trains on
    assert ended == [(1, 2), (0, 4), (2, 4)]
    assert [e["epoch"] for e in hists[2].epochs] == [0, 1, 2, 3] and hists[2].stop_reason == "completed"
    assert max_diff(hists[2], fit(newcomer, "cpu")) <= tol
    assert max_diff(hists[0], fit(cfgs[0], "cpu")) <= tol
    with pytest.raises(ValueError, match="a refill cannot join the group: optim.name differs"):
        train_fused(cfgs, "cpu", report=report, mode=mode,
                    refill=lambda free: [cfgs[0].with_overrides({"optim.name": "sgd"})])


def test_with_dropout_mixup_and_noise_on_eight_seeds_fused_agree_with_their_solo_runs():
    """Issue 20's stochastic check, in vmap mode (an accelerator's default; loop mode replays solo runs exactly):
    eight seeds with dropout, mixup and input noise trained as ONE group. Each member draws its masks, mixing and
    noise from its own stream as its solo run does, so each final val_loss is within vmap's rounding of its solo
    run's, and the mean over the eight agrees within 2 standard errors."""
    reg = {"model.dropout": 0.3, "regularization.mixup_alpha": 0.4, "regularization.input_noise_std": 0.1}
    cfgs = group(members=[{**reg, "train.seed": s} for s in range(8)],
                 **{"train.epochs": 2, "data.train_fraction": 0.3, "train.train_eval_size": 64})
    fused = [h.epochs[-1]["val_loss"] for h in fit_fused(cfgs, "cpu", mode="vmap")]
    solo = [fit(c, "cpu").epochs[-1]["val_loss"] for c in cfgs]
    assert len(set(solo)) == 8  # the seeds differ: a real spread
    for f, s in zip(fused, solo):
        assert abs(f - s) <= 1e-4 * abs(s), (f, s)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    var = lambda xs: sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)  # noqa: E731
    se = math.sqrt(var(fused) / 8 + var(solo) / 8)
    assert abs(mean(fused) - mean(solo)) <= 2 * se
