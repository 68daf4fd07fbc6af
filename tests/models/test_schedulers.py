"""models/schedulers.py: every registered schedule gives exactly the lr sequence of the torch scheduler it
wraps, stepped by hand at that scheduler's own granularity (per batch or per epoch)."""

import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from regsweep.models.config import SchedulerConfig
from regsweep.models.schedulers import SCHEDULERS, make_schedule
from regsweep.models.train import fit

LR0 = 0.1
EPOCHS, STEPS = 6, 4
# falls, then plateaus: with patience 1 ReduceLROnPlateau must cut the lr (more than once)
VAL_LOSSES = [1.0, 0.8, 0.8, 0.8, 0.8, 0.8]

CONFIGS = {
    "none": SchedulerConfig(name="none"),
    "step": SchedulerConfig(name="step", step_size=2, gamma=0.5),
    "multistep": SchedulerConfig(name="multistep", milestones=[1, 4], gamma=0.3),
    "exponential": SchedulerConfig(name="exponential", gamma=0.7),
    "cosine": SchedulerConfig(name="cosine", eta_min=0.01),
    "plateau": SchedulerConfig(name="plateau", factor=0.5, patience=1),
    "onecycle": SchedulerConfig(name="onecycle", max_lr=0.5, pct_start=0.25),
    "warmup_cosine": SchedulerConfig(name="warmup_cosine", warmup_epochs=2, eta_min=0.005),
}


def _optimizer():
    p = torch.nn.Parameter(torch.ones(1))
    return torch.optim.SGD([p], lr=LR0), p


def _step(opt, p):
    p.grad = torch.ones_like(p)
    opt.step()


def _drive_ours(cfg):
    """lr of every optimizer step, [epoch][batch], driving LRSchedule exactly as fit() does."""
    opt, p = _optimizer()
    sched = make_schedule(opt, cfg, EPOCHS, STEPS)
    lrs = []
    for epoch in range(EPOCHS):
        row = []
        for _ in range(STEPS):
            row.append(opt.param_groups[0]["lr"])
            _step(opt, p)
            sched.after_batch()
        lrs.append(row)
        sched.after_epoch(VAL_LOSSES[epoch])
    return lrs


def _reference(name):
    """The raw torch scheduler for ``name`` built from CONFIGS[name], stepped by hand."""
    c = CONFIGS[name]
    opt, p = _optimizer()
    per_batch = False
    if name == "none":
        sched = None
    elif name == "step":
        sched = tls.StepLR(opt, step_size=c.step_size, gamma=c.gamma)
    elif name == "multistep":
        sched = tls.MultiStepLR(opt, milestones=c.milestones, gamma=c.gamma)
    elif name == "exponential":
        sched = tls.ExponentialLR(opt, gamma=c.gamma)
    elif name == "cosine":
        sched = tls.CosineAnnealingLR(opt, T_max=EPOCHS, eta_min=c.eta_min)
    elif name == "plateau":
        sched = tls.ReduceLROnPlateau(opt, mode="min", factor=c.factor, patience=c.patience)
    elif name == "onecycle":
        sched = tls.OneCycleLR(opt, max_lr=c.max_lr, total_steps=EPOCHS * STEPS, pct_start=c.pct_start)
        per_batch = True
    elif name == "warmup_cosine":  # the torch docs' order: warm-up first, then the cosine
        warm = c.warmup_epochs
        warmup = tls.LinearLR(opt, start_factor=1.0 / (warm + 1), total_iters=warm)
        cosine = tls.CosineAnnealingLR(opt, T_max=EPOCHS - warm, eta_min=c.eta_min)
        sched = tls.SequentialLR(opt, [warmup, cosine], milestones=[warm])
    else:
        raise AssertionError(f"no reference for scheduler {name!r}: add one")
    lrs = []
    for epoch in range(EPOCHS):
        row = []
        for _ in range(STEPS):
            row.append(opt.param_groups[0]["lr"])
            _step(opt, p)
            if per_batch:
                sched.step()
        lrs.append(row)
        if name == "plateau":
            sched.step(VAL_LOSSES[epoch])
        elif sched is not None and not per_batch:
            sched.step()
    return lrs


def test_every_registered_scheduler_is_covered():
    assert sorted(SCHEDULERS.names()) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lr_sequence_equals_the_wrapped_torch_scheduler(name):
    ours, ref = _drive_ours(CONFIGS[name]), _reference(name)
    flat = [lr for row in ours for lr in row]
    assert len(flat) == EPOCHS * STEPS
    assert flat == pytest.approx([lr for row in ref for lr in row], rel=1e-12, abs=1e-15)
    if name not in ("onecycle", "warmup_cosine"):  # those two start below the optimizer's lr
        assert flat[0] == LR0
    if name != "none":
        assert len(set(flat)) > 1, f"{name}: the lr never changed, so the comparison proves nothing"


def test_plateau_drops_only_after_patience_epochs_without_improvement():
    lrs = [row[0] for row in _drive_ours(CONFIGS["plateau"])]
    # best 0.8 at epoch 1; epochs 2, 3 do not improve -> patience 1 exceeded after epoch 3; again after 5
    assert lrs == pytest.approx([LR0, LR0, LR0, LR0, LR0 * 0.5, LR0 * 0.5])


def test_warmup_cosine_closed_form():
    c = CONFIGS["warmup_cosine"]
    lrs = [row[0] for row in _drive_ours(c)]
    warm = c.warmup_epochs
    expected = [LR0 * (e + 1) / (warm + 1) for e in range(warm)]
    expected += [c.eta_min + (LR0 - c.eta_min) * (1 + math.cos(math.pi * (e - warm) / (EPOCHS - warm))) / 2
                 for e in range(warm, EPOCHS)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_cosine_closed_form():
    c = CONFIGS["cosine"]
    lrs = [row[0] for row in _drive_ours(c)]
    expected = [c.eta_min + (LR0 - c.eta_min) * (1 + math.cos(math.pi * e / EPOCHS)) / 2 for e in range(EPOCHS)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_onecycle_defaults_max_lr_to_ten_times_lr():
    lrs = [lr for row in _drive_ours(SchedulerConfig(name="onecycle", pct_start=0.25)) for lr in row]
    assert max(lrs) == pytest.approx(10 * LR0)


@pytest.mark.parametrize("name", ["step", "multistep", "exponential", "cosine", "plateau", "warmup_cosine"])
def test_epoch_schedulers_do_not_change_lr_within_an_epoch(name):
    lrs = _drive_ours(CONFIGS[name])
    assert all(len(set(row)) == 1 for row in lrs)
    assert len({row[0] for row in lrs}) > 1  # ... but between epochs


def test_step_changes_only_at_its_step_size():
    lrs = [row[0] for row in _drive_ours(CONFIGS["step"])]
    assert lrs == pytest.approx([LR0, LR0, LR0 * 0.5, LR0 * 0.5, LR0 * 0.25, LR0 * 0.25])


def test_onecycle_steps_every_batch():
    lrs = _drive_ours(CONFIGS["onecycle"])
    assert all(len(set(row)) == STEPS for row in lrs)


def test_none_keeps_lr_constant():
    lrs = _drive_ours(CONFIGS["none"])
    assert all(lr == LR0 for row in lrs for lr in row)


def test_unknown_scheduler_raises_value_error_listing_the_choices():
    opt, _ = _optimizer()
    with pytest.raises(ValueError) as err:
        make_schedule(opt, SchedulerConfig(name="cosine_restarts"), EPOCHS, STEPS)
    msg = str(err.value)
    assert "cosine_restarts" in msg
    assert all(name in msg for name in SCHEDULERS.names())


# ------------------------------------------------------------------------------------- through fit()
def test_fit_records_lr_at_each_epoch_start_for_step(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"optim.name": "sgd", "optim.lr": 0.05, "train.epochs": 4,
                                   "scheduler": {"name": "step", "step_size": 1, "gamma": 0.5}})
    hist = fit(cfg, "cpu")
    assert [e["lr"] for e in hist.epochs] == pytest.approx([0.05 * 0.5 ** e for e in range(4)], rel=1e-12)


def test_fit_records_onecycle_lr_at_each_epoch_start(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"optim.name": "sgd", "optim.lr": 0.01, "train.epochs": 3,
                                   "scheduler": {"name": "onecycle", "max_lr": 0.05, "pct_start": 0.3}})
    hist = fit(cfg, "cpu")
    n_train = 1797 - round(1797 * 0.2) - round(1797 * 0.2)  # digits, default val/test fractions
    steps = math.ceil(n_train / cfg.data.batch_size)
    opt, p = _optimizer()
    ref = tls.OneCycleLR(opt, max_lr=0.05, total_steps=3 * steps, pct_start=0.3)
    expected = []
    for i in range(3 * steps):
        if i % steps == 0:
            expected.append(opt.param_groups[0]["lr"])
        _step(opt, p)
        ref.step()
    assert [e["lr"] for e in hist.epochs] == pytest.approx(expected, rel=1e-9)
    assert expected[0] == pytest.approx(0.05 / 25)  # OneCycleLR's default div_factor


def _plateau_lrs(losses, lr0, factor, patience):
    opt, _ = _optimizer()
    opt.param_groups[0]["lr"] = lr0
    ref = tls.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience)
    lrs = []
    for loss in losses:
        lrs.append(opt.param_groups[0]["lr"])
        ref.step(loss)
    return lrs


def test_fit_feeds_plateau_the_epoch_val_loss(tiny_cfg):
    # label noise on the training labels and a big, noisy val split: val_loss stalls while train losses fall
    cfg = tiny_cfg.with_overrides({"optim.lr": 0.01, "data.label_noise": 0.4, "data.val_fraction": 0.5,
                                   "data.test_fraction": 0.1, "model.widths": [16, 32], "train.epochs": 6,
                                   "scheduler": {"name": "plateau", "factor": 0.5, "patience": 0}})
    hist = fit(cfg, "cpu")
    got = [e["lr"] for e in hist.epochs]
    assert got == pytest.approx(_plateau_lrs([e["val_loss"] for e in hist.epochs], 0.01, 0.5, 0), rel=1e-12)
    assert got[-1] < 0.01, "val_loss never stalled, so the plateau wiring went untested"
    # ... and it is val_loss that drives it, not a training loss
    assert got != pytest.approx(_plateau_lrs([e["train_eval_loss"] for e in hist.epochs], 0.01, 0.5, 0))
