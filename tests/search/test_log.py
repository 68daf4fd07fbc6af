"""Messages through `logging` (search/log.py): `-q` keeps a command's results, warnings and errors and drops the
info/progress chatter; `-v` adds debug lines on stderr and leaves stdout as it is; either flag goes before or after
the command; the default output is unchanged (the other tests compare it)."""

from __future__ import annotations

import logging

import optuna
import pytest
import torch

from regsweep.search import log
from regsweep.search.cli import main

SPEC = """
name: quiet
base:
  model: {name: cnn, widths: [4, 8]}
  data: {name: digits, batch_size: 128}
  train: {epochs: 1, num_threads: 1, train_eval_size: 64}
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.0, high: 0.3}
sampler: {name: random, seed: 0}
pruner: {name: none}
budget: {n_trials: 1}
"""


@pytest.fixture(autouse=True)
def default_verbosity():
    before = optuna.logging.get_verbosity()
    yield
    log.set_verbosity(0)  # main() sets it on every call; library calls after this test get the default
    optuna.logging.set_verbosity(before)  # -q quietens Optuna's own info lines too


def test_quiet_and_verbose_on_a_real_run_and_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REGSWEEP_PROGRESS", "plain")
    spec = tmp_path / "quiet.yaml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    capsys.readouterr()
    # -q after the command: the summary (the run's result) and the warning stay; no chatter
    assert main(["run", str(spec), "--storage", url, "--device", "cpu", "--artifacts", "off", "-q"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("study quiet: 1 trials (minimize val_loss)\n"), out
    for chatter in ("storage: ", "study 'quiet' in", "trial   0", "ran 1 trials", "progress:", "export the best"):
        assert chatter not in out and chatter not in err, chatter
    assert err == "warning: keep_weights: best: no artifact store (--artifacts off), so no trial's weights are kept\n"
    assert logging.getLogger("regsweep").level == logging.WARNING
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING

    # -v before the command, on a resume for one more trial: debug lines on stderr, the default stdout
    assert main(["-v", "run", str(spec), "--storage", url, "--device", "cpu", "--n-trials", "2"]) == 0
    out, err = capsys.readouterr()
    assert "study 'quiet' in" in out and "trial   1 COMPLETE" in out and "export the best config" in out
    assert "debug:" not in out
    trial = optuna.load_study(study_name="quiet", storage=url).trials[1]
    assert f"debug: trial 1: params {{'model.dropout': {trial.params['model.dropout']!r}}}\n" in err
    assert f"debug: storage {url} (from --storage)\n" in err and "debug: spec " in err

    # export: stdout is the export itself under -v and -q alike; the "wrote" note is chatter
    assert main(["export", "--storage", url, "--format", "params"]) == 0
    plain = capsys.readouterr()
    assert main(["export", "-v", "--storage", url, "--format", "params"]) == 0
    verbose = capsys.readouterr()
    assert verbose.out == plain.out and f"debug: storage {url} (from --storage)" in verbose.err
    assert main(["-q", "export", "--storage", url, "--out", str(tmp_path / "best.yaml")]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["export", "--storage", url, "--out", str(tmp_path / "best.yaml")]) == 0
    assert capsys.readouterr().err == f"wrote trial 0 (yaml) to {tmp_path / 'best.yaml'}\n"

    # train -q: no per-epoch table, the final line only
    threads = torch.get_num_threads()
    try:
        assert main(["-q", "train", str(tmp_path / "best.yaml"), "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert out.startswith("completed; best epoch 0: val_loss ") and out.count("\n") == 1 and err == "", (out, err)

    # errors stay under -q: one line, exit 2
    assert main(["export", "-q", "--storage", url, "--study-name", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --study-name: 'nope' not found") and err.count("\n") == 1


def test_verbose_and_quiet_together_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-v", "-q", "status"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-q" in err and "not allowed with argument -v" in err
