"""Ctrl-C during `regsweep run`: the running trial ends FAIL with stop reason failed:interrupted (never
RUNNING), the process exits 130, and the next run resumes the budget."""

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from regsweep.search.record import history

SPEC = """
name: intr
base:
  model: {name: cnn, widths: [8, 16]}
  data: {name: digits, batch_size: 64}
  train: {epochs: 40, num_threads: 1, train_eval_size: 128}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
sampler: {name: random, seed: 0}
budget: {n_trials: 2}
enqueue: []
"""


def _trials(url):
    try:
        return optuna.load_study(study_name="intr", storage=url).get_trials(deepcopy=False)
    except Exception:  # the study does not exist yet
        return []


def test_ctrl_c_fails_the_running_trial_and_the_next_run_resumes(tmp_path):
    spec = tmp_path / "intr.yaml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    proc = subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", "run", str(spec), "--storage", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [t for t in _trials(url) if t.state == TrialState.RUNNING and history(t)]
        if running:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError(f"no trial started: {proc.communicate()}")
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err
    trials = _trials(url)
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["stop_reason"] == "failed:interrupted"
    assert history(trials[0])  # what it trained is kept

    spec.write_text(SPEC.replace("epochs: 40", "epochs: 3"))
    from regsweep.search.cli import main

    assert main(["run", str(spec), "--storage", url, "--allow-spec-change"]) == 0
    states = [t.state for t in _trials(url)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 2
    assert TrialState.RUNNING not in states
