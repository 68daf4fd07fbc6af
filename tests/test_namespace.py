"""The `regsweep` import namespace cannot collide with a user's own code (issue 15's "Must show").

A project directory holds its own `models/` and `search/` packages whose `__init__.py` leaves a marker file and
raises ImportError. From that directory (cwd, and the script's own directory first on sys.path, as python does):
`regsweep run SPEC --workers 2` finishes its budget, `regsweep export` writes the best trial's config, and a user
script trains it with regsweep's documented plain-PyTorch loop. No process imports the user's packages (no
marker file; the user script also checks sys.modules), and regsweep's own folders refuse their pre-0.2 names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.search.cli import main

ROOT = Path(__file__).resolve().parents[1]

# The user's own packages: importing one leaves a marker (so a swallowed ImportError still shows) and fails.
SHADOW_INIT = """\
import os
from pathlib import Path

Path(__file__).resolve().parents[1].joinpath(f"imported-{__name__}-{os.getpid()}").touch()
raise ImportError("the user's own {pkg!r} package was imported")
"""

SPEC = """\
name: ns
base:
  model: {name: cnn, widths: [4]}
  data: {name: synthetic, n_samples: 120, shape: [1, 8, 8], batch_size: 64}
  train: {epochs: 1, num_threads: 1, train_eval_size: 16}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
sampler: {name: random, seed: 0}
pruner: none
budget: {n_trials: 2}
enqueue: [{}]
"""

# The README's "your own training loop" example, on an exported config, for 1 epoch.
USER_SCRIPT = """\
import math
import sys

from regsweep.models import build as build_module
from regsweep.models.build import build
from regsweep.models.config import TrainConfig

assert build_module.build is build
cfg = TrainConfig.load(sys.argv[1])
data = cfg.to_dict()
data["train"]["epochs"] = 1
cfg = TrainConfig.from_dict(data)
parts = build(cfg, "cpu")
losses = []
for epoch in range(cfg.train.epochs):
    parts.model.train()
    for x, y in parts.train_loader():
        loss = parts.loss_fn(parts.model(x), y) + (parts.penalty_fn() if parts.penalty_fn else 0)
        parts.optimizer.zero_grad(); loss.backward(); parts.optimizer.step()
        parts.scheduler.after_batch()
        losses.append(float(loss))
    parts.scheduler.after_epoch()
assert losses and all(math.isfinite(v) for v in losses), losses
print("sys.path[0]:", sys.path[0])
print("top-level:", sorted(m for m in sys.modules if m.split(".")[0] in ("models", "search")))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _regsweep() -> str:
    """The installed entry point, as a user types it (next to this interpreter in the venv)."""
    exe = Path(sys.executable).parent / "regsweep"
    return str(exe) if exe.exists() else shutil.which("regsweep")


@pytest.fixture
def project(tmp_path):
    """A user's project directory with its own `models/` and `search/` packages."""
    proj = tmp_path / "project"
    for pkg in ("models", "search"):
        (proj / pkg).mkdir(parents=True)
        (proj / pkg / "__init__.py").write_text(SHADOW_INIT.replace("{pkg!r}", repr(pkg)))
        (proj / pkg / "build.py").write_text("raise ImportError('the user module')\n")
    (proj / "ns.yaml").write_text(SPEC)
    (proj / "train_mine.py").write_text(USER_SCRIPT)
    return proj


@pytest.mark.procs
def test_a_users_models_and_search_packages_shadow_nothing(project):
    url = f"sqlite:///{project / 'ns.db'}"
    run = subprocess.run([_regsweep(), "run", "ns.yaml", "--storage", url, "--workers", "2", "--n-trials", "4"],
                         cwd=project, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    assert "started 2 workers" in run.stdout
    trials = optuna.load_study(study_name="ns", storage=url).get_trials(deepcopy=False)
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 4
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials

    assert main(["export", "--storage", url, "--study-name", "ns", "--out", str(project / "best.yaml")]) == 0
    script = subprocess.run([sys.executable, "train_mine.py", "best.yaml"], cwd=project, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr[-3000:]
    assert f"sys.path[0]: {project}" in script.stdout  # the user's packages were first in line
    assert "top-level: []" in script.stdout

    assert sorted(p.name for p in project.glob("imported-*")) == []  # no process imported them


@pytest.mark.procs
def test_python_m_models_train_is_refused_in_one_line():
    res = subprocess.run([sys.executable, "-m", "models.train", "x.yaml"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "regsweep.models" in lines[0], res.stderr


def test_a_builtin_study_by_bare_name_loads_from_any_directory(tmp_path, monkeypatch):
    """`regsweep run digits_cnn` from a directory with nothing in it: the built-in spec's include of
    ../spaces/regularization.yaml resolves next to the installed spec, never in the working directory."""
    from regsweep.search.spec import load_spec

    monkeypatch.chdir(tmp_path)
    spec = load_spec("digits_cnn")
    assert spec.builtin and spec.name == "digits_cnn" and "regularization.l2" in spec.space.paths()
