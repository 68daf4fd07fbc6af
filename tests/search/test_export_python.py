"""export --format python|snippet (issue 19): the exported script runs where importing regsweep is IMPOSSIBLE and
gives the trial's best-epoch val_loss exactly (digits CNN; ResNet-20 on synthetic data); edited, it trains as
`regsweep train` on the same edited config; the snippet, pasted into a plain loop, gives the trial's values.
Also: --version, and a closed pipe ends export without a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml

import regsweep
from regsweep.search.cli import main
from regsweep.search.record import history

pytestmark = [pytest.mark.procs, pytest.mark.oneshot]  # scripts run to completion: the in-process half

DIGITS = """
name: digits_export
base:
  model: {name: cnn, widths: [8, 16], dropout: 0.1, bn: after_act, init: kaiming_normal}
  data: {name: digits, batch_size: 64}
  optim: {name: adamw, lr: 3.0e-3, weight_decay: 1.0e-3}
  regularization: {l1: 1.0e-5, l2: 1.0e-4}
  scheduler: {name: onecycle}
  train: {epochs: 4, num_threads: 1, train_eval_size: 128, early_stopping: {patience: 2, restore_best: true}}
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.05, high: 0.3}
sampler: {name: random, seed: 0}
pruner: {name: none}
budget: {n_trials: 2}
enqueue: [{}]
"""

RESNET = """
name: resnet_export
base:
  model: {name: resnet20, widths: [4, 8, 8], bn: before_act, init: kaiming_normal}
  data: {name: synthetic, n_samples: 160, shape: [3, 8, 8], num_classes: 4, batch_size: 32}
  optim: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}
  regularization: {label_smoothing: 0.1, mixup_alpha: 0.4}
  scheduler: {name: cosine}
  train: {epochs: 3, num_threads: 1, train_eval_size: 64}
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.0, high: 0.2}
sampler: {name: random, seed: 0}
pruner: {name: none}
budget: {n_trials: 1}
enqueue: [{}]
"""

# A meta-path finder that makes `import regsweep` fail, installed before anything runs (regsweep is an editable
# install in .venv: its own finder is on sys.meta_path from a .pth file; this one goes in front of it).
BLOCKER = '''import sys


class BlockRegsweep:
    def find_spec(self, name, path=None, target=None):
        if name == "regsweep" or name.startswith("regsweep."):
            raise ImportError(f"importing {name} is blocked in this test")
        return None


sys.meta_path.insert(0, BlockRegsweep())
'''


def make_study(tmp_path: Path, spec_text: str, name: str) -> tuple[str, optuna.Study]:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(spec_text)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    threads = torch.get_num_threads()
    try:
        assert main(["run", str(spec), "--storage", url, "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    return url, optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("digits"), DIGITS, "digits_export")


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """(env, cwd) for running a script where `import regsweep` fails; checked once."""
    d = tmp_path_factory.mktemp("blocked")
    (d / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "REGSWEEP"))}
    env["PYTHONPATH"] = str(d)
    proc = subprocess.run([sys.executable, "-c", "import torch, numpy, sklearn, torchvision; import regsweep"],
                          env=env, cwd=d, capture_output=True, text=True)
    assert proc.returncode == 1 and "importing regsweep is blocked" in proc.stderr, proc.stderr
    return env, d


def export(url: str, study: str, fmt: str, out: Path, *extra: str) -> str:
    assert main(["export", "--storage", url, "--study-name", study, "--format", fmt, "--out", str(out), *extra]) == 0
    return out.read_text()


def run_blocked(script: Path, blocked) -> tuple[list[dict], dict]:
    env, cwd = blocked
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu"], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "regsweep" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return [r for r in lines if "summary" not in r], lines[-1]["summary"]


def without_seconds(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in epochs]


def check_reproduces(study: optuna.Study, epochs: list[dict], summary: dict) -> None:
    best = study.best_trial
    assert summary["best_epoch"] == best.user_attrs["best_epoch"]
    assert summary["val_loss"] == best.value  # exactly: the same code, torch, threads
    assert without_seconds(epochs) == without_seconds(history(best))
    assert summary["split_fingerprint"] == best.user_attrs["split_fingerprint"]


def test_the_digits_script_reproduces_the_trial_without_regsweep_and_edits_train_as_regsweep_train(
        digits_study, blocked, tmp_path):
    url, study = digits_study
    best = study.best_trial
    script = tmp_path / "train_best.py"
    text = export(url, "digits_export", "python", script)
    assert f"Trial {best.number} of study 'digits_export'" in text and f"val_loss {best.value:.6g}" in text
    assert re.search(r'"dropout": [0-9.e-]+,  # sampled by trial', text) or best.number == 0
    assert '"num_threads": 1,  # base config' in text
    epochs, summary = run_blocked(script, blocked)
    check_reproduces(study, epochs, summary)
    assert summary["stop_reason"] == best.user_attrs["stop_reason"]

    # edit two inlined values in the script text; `regsweep train` gets the same edit in a YAML export
    edited = re.sub(r'"lr": [0-9.e-]+,', '"lr": 0.005,', text, count=1)
    edited = re.sub(r'"dropout": [0-9.e-]+,', '"dropout": 0.25,', edited, count=1)
    assert edited.count("0.005,") == 1 and edited.count('"dropout": 0.25,') == 1
    script.write_text(edited)
    epochs, summary = run_blocked(script, blocked)
    cfg = yaml.safe_load(export(url, "digits_export", "yaml", tmp_path / "best.yaml"))
    cfg["optim"]["lr"], cfg["model"]["dropout"] = 0.005, 0.25
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(tmp_path / "edited.yaml"), "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    ours = json.loads((tmp_path / "run" / "history.json").read_text())
    assert without_seconds(epochs) == without_seconds(ours["epochs"])
    assert epochs != without_seconds(history(best))  # the edit changed the run
    assert (summary["best_epoch"], summary["stop_reason"], summary["test_loss"]) == (
        ours["best_epoch"], ours["stop_reason"], ours["test"]["test_loss"])


def test_the_resnet20_script_with_label_smoothing_and_mixup_reproduces_the_trial(blocked, tmp_path):
    url, study = make_study(tmp_path, RESNET, "resnet_export")
    script = tmp_path / "train_best.py"
    text = export(url, "resnet_export", "python", script)
    assert "class ResNet20(ResNet)" in text and "v2.MixUp" in text and "class CNN" not in text
    epochs, summary = run_blocked(script, blocked)
    check_reproduces(study, epochs, summary)


def test_the_snippet_pasted_into_a_plain_loop_gives_the_trials_values(digits_study, tmp_path):
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from regsweep.models.cnn import CNN  # the user's model: the same architecture
    from regsweep.models.config import TrainConfig
    from regsweep.models.data import load

    url, study = digits_study
    best = study.best_trial
    snippet = export(url, "digits_export", "snippet", tmp_path / "snippet.py")
    assert len(snippet.splitlines()) <= 30 and "from regsweep.models import" in snippet
    cfg = TrainConfig.from_dict(best.user_attrs["config"])
    data = load(cfg.data)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        # --- the user's code: model, data, validation; the snippet in between ---------------------------------
        torch.manual_seed(cfg.train.seed)
        model = CNN((1, 8, 8), 10, widths=(8, 16), dropout=cfg.model.dropout, bn="after_act")
        train_loader = DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=cfg.data.batch_size,
                                  sampler=RandomSampler(data.train.x,
                                                        generator=torch.Generator().manual_seed(cfg.train.seed)),
                                  generator=torch.Generator())  # its worker seed not from the global RNG
        val_losses = []

        def validate():
            model.eval()
            with torch.no_grad():
                logits = model(data.val.x)
                loss = torch.nn.functional.cross_entropy(logits, data.val.y, reduction="sum").double()
            val_losses.append(float(torch.zeros((), dtype=torch.float64) + loss) / len(data.val))
            return val_losses[-1]

        exec(compile(snippet, "snippet.py", "exec"), {"model": model, "train_loader": train_loader,
                                                       "validate": validate})
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    recorded = [r["val_loss"] for r in history(best)]
    assert len(val_losses) == cfg.train.epochs >= len(recorded)
    assert val_losses[:len(recorded)] == recorded  # exactly, epoch by epoch
    assert val_losses[best.user_attrs["best_epoch"]] == best.value


def test_version_and_a_closed_pipe(digits_study):
    url, _ = digits_study
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-m", "regsweep.search.cli", "--version"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0 and proc.stdout == f"regsweep {regsweep.__version__}\n"
    # `regsweep export --format python | head -1`: the reader closes the pipe after one line
    export_cmd = [sys.executable, "-m", "regsweep.search.cli", "export", "--storage", url, "--format", "python"]
    with subprocess.Popen(export_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    assert first.startswith(b'"""Trial') and "Traceback" not in err and "BrokenPipe" not in err, err
    assert code in (0, 1)  # 1 when the write hit the closed pipe (Python's docs: EPIPE exits 1), 0 if it fit


USER_NETS = '''from torch import nn


class TinyNet(nn.Module):
    """The user's own model: conv -> GroupNorm -> SiLU -> Dropout2d, pooled, a linear classifier."""

    def __init__(self, in_shape, num_classes, width: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1), nn.GroupNorm(2, width), nn.SiLU(),
                                 nn.Dropout2d(dropout), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)
'''

USER_DATA = '''import torch
from torch.utils.data import TensorDataset


def make(n=200):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1)
    return TensorDataset(x / 3, y), None
'''

USER_SPEC = """
name: user_export
base:
  model: {name: "tinynets:TinyNet", args: {width: 4}}
  data: {name: "tinydata:make", args: {n: 200}, batch_size: 32}
  optim: {name: adamw, lr: 1.0e-2, weight_decay: 1.0e-3}
  regularization: {l2: 1.0e-4}
  train: {epochs: 3, num_threads: 1, train_eval_size: 64}
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.0, high: 0.3}
  model.args.width: {type: categorical, choices: [4, 8]}
sampler: {name: random, seed: 0}
pruner: {name: none}
budget: {n_trials: 2}
enqueue: [{}]
"""


def test_a_user_model_and_dataset_by_import_path_are_imported_by_the_script_from_the_specs_folder(blocked, tmp_path):
    """A model and a dataset by import path beside the spec: the script appends the folder the trial recorded to
    sys.path (run from another folder, regsweep unimportable), imports both and gives the trial's val_loss exactly;
    export itself never imports them."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "tinynets.py").write_text(USER_NETS)
    (proj / "tinydata.py").write_text(USER_DATA)
    url, study = make_study(proj, USER_SPEC, "user_export")
    for trial in study.trials:
        assert trial.user_attrs["code_dir"] == str(proj.resolve())
    for module in ("tinynets", "tinydata"):  # imported by the run in this process: export must not need them
        sys.modules.pop(module, None)
    script = tmp_path / "train_best.py"
    text = export(url, "user_export", "python", script)
    assert "tinynets" not in sys.modules and "tinydata" not in sys.modules
    assert f"USER_CODE_DIRS = [{json.dumps(str(proj.resolve()))}]" in text
    assert "model.name 'tinynets:TinyNet', data.name 'tinydata:make'" in text
    assert "class CNN" not in text and "def _digits" not in text  # no built-in model or dataset registered
    assert "sys.path.insert" not in text and "add_search_path([*USER_CODE_DIRS" in text
    epochs, summary = run_blocked(script, blocked)
    check_reproduces(study, epochs, summary)
    assert summary["n_params"] == study.best_trial.user_attrs["n_params"]


def test_export_python_refuses_a_user_model_that_is_neither_an_import_path_nor_installed(tmp_path):
    from regsweep.models.config import TrainConfig
    from regsweep.models.script import ScriptError, render_script

    cfg = TrainConfig.from_dict({"model": {"name": "cnn"}, "data": {"name": "digits"}})
    for path, value, expect in (("model.name", "no_such_plugin", "neither built in"),
                                ("data.name", "torchvision:CIFAR100", "built-in datasets and your own")):
        with pytest.raises(ScriptError, match=expect) as err:
            render_script(cfg.with_overrides({path: value}), ["x"], lambda p: "")
        assert str(err.value).startswith(f"{path}: {value!r} is not allowed with --format python")
        assert "\n" not in str(err.value)
