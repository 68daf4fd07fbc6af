"""models/regularize.py, the batch and loss side: label smoothing, mixup, cutmix, input noise, and how
fit() uses them (train_loss is the regularised objective; train_eval_loss is clean)."""

import pytest
import torch
import torch.nn.functional as F

from regsweep.models.config import RegularizationConfig
from regsweep.models.regularize import BatchRegularizer, loss_function, penalty_and_batch
from regsweep.models.train import evaluate, fit, train

N_CLASSES = 10


def _batch(n=8, shape=(3, 16, 16), seed=0, distinct_labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)  # continuous values: two images never share a pixel by chance
    y = torch.arange(n) % N_CLASSES if distinct_labels else torch.randint(N_CLASSES, (n,), generator=g)
    return x, y


def _curves(hist):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in hist.epochs]


# ------------------------------------------------------------------------------------ label smoothing
def test_label_smoothing_is_torch_cross_entropy_with_smoothing():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(32, N_CLASSES, generator=g), torch.randint(N_CLASSES, (32,), generator=g)
    logits[torch.arange(32), y] += 5.0  # confident and right: smoothing must raise the loss
    smoothed = loss_function(RegularizationConfig(label_smoothing=0.1))(logits, y)
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-6)
    plain = loss_function(RegularizationConfig())(logits, y)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert smoothed.item() > plain.item() + 0.1


def test_label_smoothing_applies_to_soft_targets_too():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, N_CLASSES, generator=g)
    soft = torch.softmax(torch.randn(16, N_CLASSES, generator=g), 1)
    got = loss_function(RegularizationConfig(label_smoothing=0.2))(logits, soft)
    assert got.item() == pytest.approx(F.cross_entropy(logits, soft, label_smoothing=0.2).item(), rel=1e-6)
    assert abs(got.item() - F.cross_entropy(logits, soft).item()) > 1e-3


# ------------------------------------------------------------------------------------ mixup / cutmix
def test_mixup_blends_two_images_and_their_labels():
    torch.manual_seed(0)
    x, y = _batch()
    xm, ym = BatchRegularizer(RegularizationConfig(mixup_alpha=0.4), N_CLASSES)(x, y)
    assert xm.shape == x.shape
    assert ym.shape == (x.shape[0], N_CLASSES) and ym.dtype.is_floating_point
    assert torch.allclose(ym.sum(1), torch.ones(x.shape[0]))
    assert float(ym.max()) < 0.999, "mixup with alpha > 0 must give soft, not one-hot, targets"
    lam = float(ym[0, y[0]])  # labels are distinct, so this is the weight of each image itself
    partner = x.roll(1, 0)  # torchvision pairs image i with image i-1
    assert torch.allclose(xm, lam * x + (1 - lam) * partner, atol=1e-6)
    onehot = F.one_hot(y, N_CLASSES).float()
    assert torch.allclose(ym, lam * onehot + (1 - lam) * onehot.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_a_box_from_another_image():
    torch.manual_seed(0)
    x, y = _batch(shape=(3, 32, 32))
    xc, yc = BatchRegularizer(RegularizationConfig(cutmix_alpha=1.0), N_CLASSES)(x, y)
    assert xc.shape == x.shape
    assert yc.shape == (x.shape[0], N_CLASSES) and torch.allclose(yc.sum(1), torch.ones(x.shape[0]))
    own = (xc == x).all(1)  # per pixel position: taken from the image itself ...
    other = (xc == x.roll(1, 0)).all(1)  # ... or from its partner
    assert bool((own | other).all()), "every cutmix pixel comes from one of the two images"
    own_frac = own.float().mean((1, 2))
    assert bool((own_frac > 0).all()) and bool((own_frac < 1).all()), "both images must contribute"
    # the soft label of the image itself is the area it keeps
    assert torch.allclose(yc[torch.arange(len(y)), y], own_frac, atol=1e-6)


def test_mix_prob_zero_leaves_batch_and_integer_labels_unchanged():
    torch.manual_seed(0)
    x, y = _batch()
    reg = BatchRegularizer(RegularizationConfig(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.0), N_CLASSES)
    assert reg  # mixing is configured ...
    for _ in range(20):  # ... but never applied
        xo, yo = reg(x, y)
        assert torch.equal(xo, x)
        assert torch.equal(yo, y) and yo.dtype == torch.int64 and yo.dim() == 1


def test_mix_prob_mixes_that_fraction_of_batches():
    torch.manual_seed(0)
    x, y = _batch()
    reg = BatchRegularizer(RegularizationConfig(mixup_alpha=0.4, mix_prob=0.3), N_CLASSES)
    mixed = sum(reg(x, y)[1].dim() == 2 for _ in range(400))
    assert 90 <= mixed <= 150  # binomial(400, 0.3): mean 120, sd 9.2


def test_mixup_and_cutmix_both_on_uses_both():
    torch.manual_seed(0)
    x, y = _batch()
    reg = BatchRegularizer(RegularizationConfig(mixup_alpha=0.4, cutmix_alpha=1.0), N_CLASSES)
    kinds = set()
    for _ in range(40):
        xo, _ = reg(x, y)
        from_sources = ((xo == x) | (xo == x.roll(1, 0))).all()
        kinds.add("cutmix" if bool(from_sources) else "mixup")
    assert kinds == {"mixup", "cutmix"}


# ------------------------------------------------------------------------------------ input noise
def test_input_noise_has_the_configured_std_and_leaves_labels_alone():
    torch.manual_seed(0)
    x, y = torch.zeros(64, 3, 32, 32), torch.arange(64) % N_CLASSES
    xn, yn = BatchRegularizer(RegularizationConfig(input_noise_std=0.1), N_CLASSES)(x, y)
    assert xn.shape == x.shape and not torch.equal(xn, x)
    assert float(xn.std()) == pytest.approx(0.1, rel=0.02)
    assert abs(float(xn.mean())) < 0.003
    assert torch.equal(yn, y) and yn.dtype == torch.int64


def test_input_noise_is_fresh_every_batch():
    torch.manual_seed(0)
    x, y = _batch()
    reg = BatchRegularizer(RegularizationConfig(input_noise_std=0.5), N_CLASSES)
    assert not torch.equal(reg(x, y)[0], reg(x, y)[0])


# ------------------------------------------------------------------------------------ truthiness
def test_batch_regularizer_is_falsy_when_everything_is_off():
    assert not BatchRegularizer(RegularizationConfig(), N_CLASSES)
    # loss-side knobs are not batch transforms
    assert not BatchRegularizer(RegularizationConfig(l1=1e-3, l2=1e-3, label_smoothing=0.1), N_CLASSES)
    for knob in ({"input_noise_std": 0.1}, {"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}):
        assert BatchRegularizer(RegularizationConfig(**knob), N_CLASSES), knob
    model = torch.nn.Linear(4, N_CLASSES)
    assert penalty_and_batch(model, RegularizationConfig(), N_CLASSES)[1] is None
    assert isinstance(penalty_and_batch(model, RegularizationConfig(mixup_alpha=0.2), N_CLASSES)[1],
                      BatchRegularizer)


# ------------------------------------------------------------------------------------ through fit()
def test_fit_with_mixup_records_clean_train_eval_loss(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"regularization.mixup_alpha": 0.4,
                                   "train.early_stopping.restore_best": False})
    parts, hist = train(cfg, "cpu")
    for e in hist.epochs:
        assert abs(e["train_loss"] - e["train_eval_loss"]) > 1e-3 * e["train_eval_loss"], e
    # train_eval_loss is the clean eval-mode loss of the fixed train subset: recompute it for the last epoch
    clean, acc = evaluate(parts.model, parts.eval_loader("train_eval"))
    assert hist.epochs[-1]["train_eval_loss"] == pytest.approx(clean, rel=1e-6)
    assert hist.epochs[-1]["train_acc"] == pytest.approx(acc)


def test_regularised_digits_fit_is_deterministic(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"regularization.label_smoothing": 0.1, "regularization.mixup_alpha": 0.2,
                                   "regularization.input_noise_std": 0.1})
    first, second = fit(cfg, "cpu"), fit(cfg, "cpu")
    assert _curves(first) == _curves(second)
    # ... and the regularisation was really applied (the same seed without it trains differently)
    plain = fit(tiny_cfg, "cpu")
    assert [e["train_loss"] for e in plain.epochs] != [e["train_loss"] for e in first.epochs]
