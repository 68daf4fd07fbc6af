import json
import math

import pytest
import torch

from regsweep.models.build import build
from regsweep.models.config import TrainConfig
from regsweep.models.train import HISTORY_KEYS, evaluate, fit, load_checkpoint, main, save_checkpoint, train

BASE = "studies/base/digits_cnn.yaml"


def _curves(hist):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in hist.epochs]


def test_base_digits_config_reaches_97_percent():
    hist = fit(TrainConfig.load(BASE), device="cpu")
    assert hist.stop_reason in ("completed", "early_stopped")
    assert max(e["val_acc"] for e in hist.epochs) >= 0.97
    assert hist.epochs[hist.best_epoch]["val_acc"] >= 0.97


def test_history_records_the_contract_fields(tiny_cfg):
    hist = fit(tiny_cfg, device="cpu")
    assert [e["epoch"] for e in hist.epochs] == [0, 1, 2]
    for e in hist.epochs:
        assert set(e) == set(HISTORY_KEYS)
        assert all(math.isfinite(e[k]) for k in HISTORY_KEYS)
    assert hist.n_params == sum(p.numel() for p in build(tiny_cfg, "cpu").model.parameters())
    assert hist.device == "cpu" and hist.num_threads == 1 and len(hist.split_fingerprint) == 16
    assert set(hist.test) == {"test_loss", "test_acc"}


def test_two_runs_give_identical_metrics(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"model.dropout": 0.2, "data.augment": True})
    assert _curves(fit(cfg, "cpu")) == _curves(fit(cfg, "cpu"))


def test_train_seed_keeps_split_and_split_seed_changes_it(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"train.epochs": 1})
    a = fit(cfg, "cpu")
    b = fit(cfg.with_overrides({"train.seed": 1}), "cpu")
    c = fit(cfg.with_overrides({"data.split_seed": 1}), "cpu")
    assert a.split_fingerprint == b.split_fingerprint
    assert _curves(a) != _curves(b)  # the seed still changes the weights
    assert a.split_fingerprint != c.split_fingerprint


def _overfitting_cfg(tiny_cfg, patience=None, min_delta=0.0):
    return tiny_cfg.with_overrides({
        "data.val_fraction": 0.5, "data.test_fraction": 0.1, "optim.lr": 0.01, "model.widths": [16, 32],
        "train.epochs": 14, "train.early_stopping": {"monitor": "val_loss", "patience": patience,
                                                     "min_delta": min_delta, "restore_best": True}})


def _expected_stop(epochs, patience, min_delta):
    best, best_epoch, since = math.inf, None, 0
    for e in epochs:
        if e["val_loss"] < best - min_delta or best_epoch is None:
            best, best_epoch, since = e["val_loss"], e["epoch"], 0
        else:
            since += 1
        if since >= patience:
            return e["epoch"], best_epoch
    return None, best_epoch


@pytest.mark.parametrize("patience,min_delta", [(2, 0.0), (1, 0.0), (3, 0.02)])
def test_early_stopping_stops_at_the_right_epoch_and_restores_best(tiny_cfg, patience, min_delta):
    full = fit(_overfitting_cfg(tiny_cfg), "cpu")
    stop_epoch, best_epoch = _expected_stop(full.epochs, patience, min_delta)
    assert stop_epoch is not None, "the reference run must overfit for this test to mean anything"
    parts, hist = train(_overfitting_cfg(tiny_cfg, patience, min_delta), "cpu")
    assert hist.stop_reason == "early_stopped"
    assert hist.epochs[-1]["epoch"] == stop_epoch and hist.best_epoch == best_epoch
    assert _curves(hist) == _curves(full)[: stop_epoch + 1]
    val_loss, val_acc = evaluate(parts.model, parts.eval_loader("val"))
    assert val_loss == pytest.approx(hist.epochs[best_epoch]["val_loss"], rel=1e-6)
    assert val_acc == hist.epochs[best_epoch]["val_acc"]


def test_without_restore_best_the_last_weights_stay(tiny_cfg):
    cfg = _overfitting_cfg(tiny_cfg).with_overrides({"train.early_stopping.restore_best": False,
                                                     "train.epochs": 5})
    parts, hist = train(cfg, "cpu")
    val_loss, _ = evaluate(parts.model, parts.eval_loader("val"))
    assert val_loss == pytest.approx(hist.epochs[-1]["val_loss"], rel=1e-6)


def test_report_can_stop_the_run(tiny_cfg):
    seen = []

    def report(epoch, record):
        seen.append((epoch, record["val_loss"]))
        return "pruned:test@1" if epoch == 1 else None

    hist = fit(tiny_cfg.with_overrides({"train.epochs": 5}), "cpu", report=report)
    assert [e for e, _ in seen] == [0, 1]
    assert hist.stop_reason == "pruned:test@1" and len(hist.epochs) == 2


def test_non_finite_loss_stops_with_a_clear_reason(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"optim.name": "sgd", "optim.lr": 1e12, "train.epochs": 4})
    hist = fit(cfg, "cpu")
    assert hist.stop_reason.startswith("failed:non-finite")
    assert len(hist.epochs) < 4 or not math.isfinite(hist.epochs[-1]["train_loss"])


def test_checkpoint_reload_gives_the_same_predictions(tiny_cfg, tmp_path):
    parts, hist = train(tiny_cfg, "cpu")
    save_checkpoint(tmp_path / "c.pt", parts.model, tiny_cfg, hist)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert payload["config"] == tiny_cfg.to_dict() and isinstance(payload["config"], dict)
    model, cfg = load_checkpoint(tmp_path / "c.pt")
    assert cfg == tiny_cfg
    x = parts.data.val.x[:50]
    parts.model.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(parts.model(x), model(x))


def test_a_plain_pytorch_loop_trains_with_build(tiny_cfg):
    """A user's own 20-line loop over build(cfg) trains exactly as fit() does."""
    cfg = tiny_cfg.with_overrides({"train.epochs": 5, "regularization.l2": 1e-4, "scheduler.name": "cosine",
                                   "train.early_stopping.restore_best": False})
    reference = fit(cfg, "cpu")
    parts = build(cfg, "cpu")
    model, opt, loss_fn = parts.model, parts.optimizer, parts.loss_fn
    for epoch in range(cfg.train.epochs):
        model.train()
        for x, y in parts.train_loader():
            loss = loss_fn(model(x), y)
            if parts.penalty_fn:
                loss = loss + parts.penalty_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            parts.scheduler.after_batch()
        model.eval()
        with torch.no_grad():
            val_logits = model(parts.data.val.x)
            val_loss = float(loss_fn(val_logits, parts.data.val.y))
        parts.scheduler.after_epoch(val_loss)
    acc = (val_logits.argmax(1) == parts.data.val.y).float().mean().item()
    assert acc > 0.8
    assert acc == pytest.approx(reference.epochs[-1]["val_acc"], abs=1e-6)
    assert val_loss == pytest.approx(reference.epochs[-1]["val_loss"], rel=1e-5)
    assert opt.param_groups[0]["lr"] < cfg.optim.lr  # the cosine schedule stepped


def test_cli_train_writes_history_config_and_checkpoint(tmp_path, tiny_cfg, capsys):
    from regsweep.search.cli import main as cli_main

    cfg_path = tmp_path / "tiny.yaml"
    tiny_cfg.save(cfg_path)
    out = tmp_path / "out"
    assert cli_main(["train", str(cfg_path), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "val_loss" in printed and "best epoch" in printed
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["epochs"]) == 3 and hist["stop_reason"] == "completed"
    # the saved config is the one trained, data.residency resolved (auto -> device for digits)
    assert TrainConfig.load(out / "config.yaml") == tiny_cfg.with_overrides({"data.residency": "device"})
    assert (out / "checkpoint.pt").stat().st_size > 0


@pytest.mark.parametrize("text,needle", [
    ("model: {dropout: 1.5}\n", "model.dropout: 1.5"),
    ("model: [1, 2\n", "malformed YAML"),
    ("train: {epochs: 0}\n", "train.epochs: 0"),
    ("model: {name: vgg99}\n", "model.name: 'vgg99' is not allowed; choose one of: cnn, "),
    ("model: {activation: swish9}\n", "model.activation: 'swish9' is not allowed; choose one of: relu"),
    ("optim: {name: lion}\n", "optim.name: 'lion' is not allowed; choose one of: sgd, adam, adamw"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    out = tmp_path / "out"
    assert main([str(p), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and str(p) in err and "\n" not in err
    assert not out.exists()


def test_cli_trains_resnet20_on_small_synthetic_rgb_data(tmp_path, capsys):
    from regsweep.search.cli import main as cli_main

    cfg = TrainConfig.from_dict({
        "model": {"name": "resnet20", "bn": "before_act", "init": "kaiming_normal", "dropout": 0.1},
        "data": {"name": "synthetic", "shape": [3, 16, 16], "n_samples": 96, "batch_size": 32, "augment": True},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "scheduler": {"name": "onecycle"},
        "train": {"epochs": 2, "num_threads": 2, "train_eval_size": 32},
    })
    path = tmp_path / "resnet20.yaml"
    cfg.save(path)
    assert cli_main(["train", str(path), "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [e["epoch"] for e in hist["epochs"]] == [0, 1]
    assert hist["n_params"] > 250_000
    assert hist["epochs"][0]["lr"] != hist["epochs"][1]["lr"]  # onecycle stepped per batch


@pytest.mark.parametrize("augment", [False, True])
def test_resuming_from_any_epochs_state_replays_the_run_exactly(tiny_cfg, tmp_path, augment):
    """The state saved after epoch k (torch.save, weights_only load) resumes to the same later epochs as the
    uninterrupted run: dropout, shuffling, augmentation, a step LR schedule, early stopping and restore_best."""
    cfg = tiny_cfg.with_overrides({
        "model.dropout": 0.2, "model.widths": [16, 32], "data.augment": augment, "data.val_fraction": 0.5,
        "data.test_fraction": 0.1, "optim.lr": 0.03, "train.epochs": 10,
        "train.train_eval_size": 128, "scheduler": {"name": "step", "step_size": 3, "gamma": 0.5},
        "train.early_stopping": {"monitor": "val_loss", "patience": 1, "restore_best": True}})
    ref_parts, ref = train(cfg, "cpu")
    assert ref.stop_reason == ("completed" if augment else "early_stopped")  # both ways of ending are resumed
    saved = []

    def keep(state):
        path = tmp_path / f"state-{augment}-{state['epoch']}.pt"
        torch.save(state, path)
        saved.append(path)

    parts, hist = train(cfg, "cpu", checkpoint=keep)
    assert _curves(hist) == _curves(ref) and hist.stop_reason == ref.stop_reason  # checkpointing changes nothing
    assert len(saved) == len(ref.epochs) - 1 >= 2  # none after the last epoch: training does not go on
    reported = []
    for path in (saved[0], saved[3]):  # after epoch 0, and after epoch 3 (past an LR step, early stopping counting)
        state = torch.load(path, weights_only=True)
        reported.clear()
        parts, resumed = train(cfg, "cpu", report=lambda e, r: reported.append(e), state=state)
        k = state["epoch"]
        assert reported == list(range(k, len(ref.epochs)))  # only the later epochs are trained and reported
        assert _curves(resumed) == _curves(ref)
        assert (resumed.stop_reason, resumed.best_epoch, resumed.test) == (ref.stop_reason, ref.best_epoch, ref.test)
        for a, b in zip(parts.model.state_dict().values(), ref_parts.model.state_dict().values()):
            assert torch.equal(a, b)
