"""search/export.py: the exported trial is a plain TrainConfig (YAML/JSON/params) with provenance, written
atomically, that a 20-line PyTorch loop trains with nothing but yaml, TrainConfig and build."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import regsweep
from regsweep.search.cli import main
from regsweep.search.export import render
from regsweep.search.record import history
from regsweep.search.urls import mask

SPEC = """
name: tiny
base:
  model: {name: cnn, widths: [8, 16]}
  data: {name: digits, batch_size: 32}
  optim: {name: adamw, lr: 1.0e-2}
  train: {epochs: 3, train_eval_size: 128}   # num_threads unset: the export fills in what the trial used
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.0, high: 0.3}
  regularization.l2: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
  model.bn: {type: categorical, choices: [none, before_act]}
sampler: {name: random, seed: 0}
pruner: {name: none}
budget: {n_trials: 3}
enqueue: [{}]
"""


@pytest.fixture(scope="module")
def study_env(tmp_path_factory):
    """One tiny run shared by the module (read-only after this)."""
    tmp = tmp_path_factory.mktemp("export")
    spec = tmp / "tiny.yaml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp / 'db.sqlite'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the unset train.num_threads runs with here (2 threads on 2 busy cores: 20x slower)
    try:
        assert main(["run", str(spec), "--storage", url, "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    study = optuna.load_study(study_name="tiny", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    return url, study


def export(capsys, url, *args) -> str:
    capsys.readouterr()
    assert main(["export", "--storage", url, "--study-name", "tiny", *args]) == 0
    return capsys.readouterr().out


def test_json_export_is_config_and_provenance(study_env, capsys):
    url, study = study_env
    best = study.best_trial
    doc = json.loads(export(capsys, url, "--format", "json"))
    assert set(doc) == {"config", "provenance"}
    prov = doc["provenance"]
    expected = {
        "study": "tiny", "trial": best.number, "value": best.value, "storage": url,
        "torch_version": torch.__version__, "regsweep_version": regsweep.__version__, "device_type": "cpu",
        "num_threads": best.user_attrs["num_threads"], "split_fingerprint": best.user_attrs["split_fingerprint"],
        "params": best.params, "state": "COMPLETE", "best_epoch": best.user_attrs["best_epoch"],
        "stop_reason": "completed", "objective": "val_loss",
    }
    assert {k: prov[k] for k in expected} == expected
    assert isinstance(prov["num_threads"], int) and prov["num_threads"] >= 1
    assert len(prov["split_fingerprint"]) >= 8
    config = dict(best.user_attrs["config"])
    config["train"] = {**config["train"], "num_threads": best.user_attrs["num_threads"]}
    assert doc["config"] == config


def test_params_export_is_the_trials_flat_params(study_env, capsys):
    url, study = study_env
    best = study.best_trial
    assert json.loads(export(capsys, url, "--format", "params")) == best.params
    sampled = study.trials[1]
    params = json.loads(export(capsys, url, "--format", "params", "--trial", "1"))
    assert params == sampled.params and set(params) == {"model.dropout", "regularization.l2", "model.bn"}
    assert json.loads(export(capsys, url, "--format", "params", "--trial", "0")) == {}  # the enqueued base


def test_yaml_export_is_a_plain_train_config_with_a_comment_header(study_env, capsys):
    url, study = study_env
    for number in (0, 2):
        trial = study.trials[number]
        text = export(capsys, url, "--trial", str(number))
        lines = text.splitlines()
        body_start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        header = lines[:body_start]
        assert body_start > 5 and all(line.startswith("#") for line in header)
        assert "# provenance:" in header and f"#   trial: {number}" in header
        assert not any(line.startswith("#") for line in lines[body_start:])
        loaded = yaml.safe_load(text)  # plain PyYAML, no regsweep loader
        assert isinstance(loaded, dict) and "provenance" not in loaded
        recorded = trial.user_attrs["config"]
        assert recorded["train"]["num_threads"] is None
        assert loaded["train"]["num_threads"] == trial.user_attrs["num_threads"] == 1
        assert {**loaded, "train": {**loaded["train"], "num_threads": None}} == recorded
    base = yaml.safe_load(export(capsys, url, "--trial", "0"))
    assert base["model"]["dropout"] == 0.0 and base["model"]["bn"] == "none"  # the base config itself


def test_a_plain_pytorch_loop_trains_the_exported_yaml(study_env, tmp_path):
    url, study = study_env
    out = tmp_path / "best.yaml"
    assert main(["export", "--storage", url, "--study-name", "tiny", "--out", str(out)]) == 0

    # --- what a user writes: nothing from search/, no regsweep trainer -------------------------------
    from regsweep.models.build import build
    from regsweep.models.config import TrainConfig

    cfg = TrainConfig.from_dict(yaml.safe_load(out.read_text()))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.num_threads)
    try:
        parts = build(cfg, "cpu")
        for epoch in range(cfg.train.epochs):
            parts.model.train()
            for x, y in parts.train_loader():
                loss = parts.loss_fn(parts.model(x), y) + parts.penalty_fn()
                parts.optimizer.zero_grad()
                loss.backward()
                parts.optimizer.step()
                parts.scheduler.after_batch()
            parts.model.eval()
            with torch.no_grad():
                logits = parts.model(parts.data.val.x)
                val_loss = parts.loss_fn(logits, parts.data.val.y).item()
                val_acc = (logits.argmax(1) == parts.data.val.y).float().mean().item()
            parts.scheduler.after_epoch(val_loss)
    finally:
        torch.set_num_threads(threads)
    # ---------------------------------------------------------------------------------------------------
    assert cfg.train.epochs == 3 and len(parts.data.val) > 300
    assert val_acc > 0.5, val_acc  # 10 classes: chance is 0.1
    best = study.best_trial
    assert val_loss < 2.0 and abs(val_loss - history(best)[-1]["val_loss"]) < 0.5


def test_out_is_written_atomically(study_env, tmp_path, capsys):
    url, study = study_env
    out = tmp_path / "best.json"
    out.write_text("stale")  # replaced, not appended to
    capsys.readouterr()
    assert main(["export", "--storage", url, "--study-name", "tiny", "--format", "json", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"wrote trial {study.best_trial.number} (json) to {out}" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]  # no best.json.tmp left
    assert json.loads(out.read_text())["provenance"]["trial"] == study.best_trial.number


def test_out_in_a_missing_directory_exits_2(study_env, tmp_path, capsys):
    url, _ = study_env
    out = tmp_path / "missing" / "best.yaml"
    capsys.readouterr()
    assert main(["export", "--storage", url, "--study-name", "tiny", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: --out: directory {out.parent} does not exist"]
    assert list(tmp_path.iterdir()) == []


def test_a_password_in_the_storage_url_never_shows(study_env):
    _, study = study_env
    masked = mask("postgresql://u:secret@h/db")
    assert masked == "postgresql://u:***@h/db"
    for fmt in ("yaml", "json", "params"):
        text = render(study, study.best_trial, fmt, masked)
        assert "secret" not in text
        if fmt != "params":
            assert "postgresql://u:***@h/db" in text
    prov = json.loads(render(study, study.best_trial, "json", masked))["provenance"]
    assert prov["storage"] == "postgresql://u:***@h/db"


@pytest.mark.parametrize("url, shown", [
    ("mysql+pymysql://root:p%40ss@db:3306/x", "mysql+pymysql://root:***@db:3306/x"),
    ("postgresql://u:a@b@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_mask(url, shown):
    assert mask(url) == shown
