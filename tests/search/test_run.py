"""End to end: a tiny study spec run through the CLI on SQLite, read back by plain Optuna, exported and
replayed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.models.config import TrainConfig
from regsweep.models.train import fit
from regsweep.search.cli import main
from regsweep.search.record import history

SPEC = """
name: tiny
base:
  model: {name: cnn, widths: [8, 16]}
  data: {name: digits, batch_size: 64}
  optim: {name: adamw, lr: 3.0e-3}
  train: {epochs: 4, num_threads: 1, train_eval_size: 128}
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
  regularization.l2: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
  scheduler.name: {type: categorical, choices: [none, step]}
  scheduler.gamma: {type: float, low: 0.1, high: 0.9, when: {scheduler.name: step}}
sampler: {name: tpe, seed: 0, args: {n_startup_trials: 3}}
pruner: {name: median, args: {n_startup_trials: 2, n_warmup_steps: 0}}
budget: {n_trials: 6}
enqueue: [{}, {model.dropout: 0.25}]
"""


@pytest.fixture
def study_env(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    return spec, url


def _study(url, name="tiny"):
    return optuna.load_study(study_name=name, storage=url)


def _done(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_run_records_every_trial_by_the_contract(study_env, capsys):
    spec, url = study_env
    assert main(["run", str(spec), "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "best: trial" in out and "regsweep export" in out
    study = _study(url)
    assert len(_done(study)) == 6 and not [t for t in study.trials if t.state == TrialState.RUNNING]
    base, forced = study.trials[0], study.trials[1]
    assert base.user_attrs["regsweep:base"] is True and base.params == {}
    from regsweep.search.spec import load_spec

    # the base config as trained: data.residency resolved at trial start (auto -> device for digits)
    assert base.user_attrs["config"] == load_spec(spec).base.with_overrides({"data.residency": "device"}).to_dict()
    assert forced.params["model.dropout"] == 0.25
    for t in study.trials:
        hist = history(t)
        assert [e["epoch"] for e in hist] == list(range(len(hist)))
        assert sorted(t.intermediate_values) == list(range(len(hist)))  # one report per epoch, from 0
        assert all(t.intermediate_values[e["epoch"]] == e["val_loss"] for e in hist)
        reason = t.user_attrs["stop_reason"]
        best = min(range(len(hist)), key=lambda i: hist[i]["val_loss"])
        assert t.user_attrs["best_epoch"] == best
        if t.state == TrialState.COMPLETE:
            assert reason in ("completed", "early_stopped")
            assert t.value == hist[best]["val_loss"]  # the value is the BEST epoch's objective
        else:
            assert reason == f"pruned:median@{len(hist) - 1}"
        for key in ("n_params", "device", "seed", "num_threads", "split_fingerprint", "test_acc"):
            assert key in t.user_attrs
        assert ("scheduler.gamma" in t.params) == (t.params.get("scheduler.name") == "step")
    assert study.user_attrs["regsweep:spec_hash"]


def test_plain_optuna_reads_the_study_without_regsweep(study_env):
    spec, url = study_env
    assert main(["run", str(spec), "--storage", url, "--n-trials", "3"]) == 0
    code = textwrap.dedent(f"""
        import sys, optuna
        s = optuna.load_study(study_name="tiny", storage={url!r})
        assert not any(m.split(".")[0] in ("regsweep", "models", "search") for m in sys.modules), "regsweep imported"
        b = s.best_trial
        assert len(b.intermediate_values) == b.user_attrs["history_len"], "a curve without regsweep"
        print(len(s.trials), b.number, len(b.intermediate_values))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, check=True)
    n, best, epochs = out.stdout.split()
    assert int(n) == 3 and int(epochs) >= 1
    optuna_cli = Path(sys.executable).parent / "optuna"
    trials = subprocess.run([str(optuna_cli), "trials", "--study-name", "tiny", "--storage", url, "-f", "json"],
                            capture_output=True, text=True, check=True, cwd="/", env=env)
    assert len(json.loads(trials.stdout)) == 3
    best_cli = subprocess.run([str(optuna_cli), "best-trial", "--study-name", "tiny", "--storage", url, "-f", "json"],
                              capture_output=True, text=True, check=True, cwd="/", env=env)
    assert json.loads(best_cli.stdout)["number"] == int(best)


def test_budget_is_the_total_across_runs(study_env, capsys):
    spec, url = study_env
    assert main(["run", str(spec), "--storage", url, "--n-trials", "3"]) == 0
    assert len(_done(_study(url))) == 3
    capsys.readouterr()
    assert main(["run", str(spec), "--storage", url, "--n-trials", "3"]) == 0
    assert "budget met" in capsys.readouterr().out
    assert len(_study(url).trials) == 3  # nothing ran
    assert main(["run", str(spec), "--storage", url, "--n-trials", "5"]) == 0
    assert len(_done(_study(url))) == 5  # only the difference ran


def test_export_then_train_reproduces_the_best_epoch_metric(study_env, tmp_path):
    spec, url = study_env
    assert main(["run", str(spec), "--storage", url, "--n-trials", "4"]) == 0
    study = _study(url)
    out = tmp_path / "best.yaml"
    assert main(["export", "--storage", url, "--study-name", "tiny", "--out", str(out)]) == 0
    text = out.read_text()
    assert "# provenance:" in text and f"#   trial: {study.best_trial.number}" in text
    hist = fit(TrainConfig.load(out), device="cpu")
    best = study.best_trial
    assert hist.epochs[best.user_attrs["best_epoch"]]["val_loss"] == best.value  # exact replay on CPU
    assert hist.split_fingerprint == best.user_attrs["split_fingerprint"]


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(study_env, capsys):
    """SGD with l2 = 1000 at lr 3e-3 diverges (|1 - 2 lr l2| > 1): that trial FAILs, the others run."""
    spec, url = study_env
    spec.write_text(SPEC.replace("enqueue: [{}, {model.dropout: 0.25}]", "enqueue: [{regularization.l2: 1000.0}]")
                    .replace("optim: {name: adamw, lr: 3.0e-3}", "optim: {name: sgd, lr: 3.0e-3}")
                    .replace("high: 1.0e-2, log: true}", "high: 1.0e+3, log: true}"))
    assert main(["run", str(spec), "--storage", url, "--n-trials", "3"]) == 0
    study = _study(url)
    first = study.trials[0]
    assert first.params["regularization.l2"] == 1000.0 and first.state == TrialState.FAIL
    assert first.user_attrs["stop_reason"].startswith("failed:non-finite")
    assert history(first)  # what it trained before diverging is kept
    assert len(_done(study)) == 3  # the failed trial does not count towards the budget


def test_spec_change_on_resume_is_refused_unless_allowed(study_env, capsys):
    spec, url = study_env
    assert main(["run", str(spec), "--storage", url, "--n-trials", "1"]) == 0
    before = [(t.number, t.state) for t in _study(url).trials]
    spec.write_text(SPEC.replace("high: 0.5}", "high: 0.4}"))
    capsys.readouterr()
    assert main(["run", str(spec), "--storage", url, "--n-trials", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "space.model.dropout.high: 0.5 -> 0.4" in err and "--allow-spec-change" in err and "\n" not in err
    assert [(t.number, t.state) for t in _study(url).trials] == before  # nothing changed
    assert main(["run", str(spec), "--storage", url, "--n-trials", "2", "--allow-spec-change"]) == 0
    assert len(_done(_study(url))) == 2


def test_status_lists_counts_best_and_stop_reasons(study_env, capsys):
    spec, url = study_env
    assert main(["run", str(spec), "--storage", url, "--n-trials", "3"]) == 0
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "study tiny: 3 trials" in out and "stop reasons:" in out and "best: trial" in out
    assert main(["status", "--storage", url, "--study-name", "nope"]) == 2
