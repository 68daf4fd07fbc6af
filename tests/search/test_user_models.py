"""Issue 18, your own model, end to end: the README's "Your own model" section run as written (its files written
into a temporary folder, its commands run there as `python -P -m regsweep.search.cli ...`): a GroupNorm net by
import path with a `depth` argument, swept for 3 trials over dropout, init, L2 and model.args.depth, exported and
replayed exactly. Then `status`, `export`, `report` and `dashboard` on that study import no user module; the Ray
backend runs the same model on a local Ray and refuses it with --address (its folder is not shipped)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.procs

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Your own model"


def readme_section() -> tuple[dict[str, str], list[str]]:
    """The section's files (a python/yaml block whose first line is a comment naming it) and bash commands."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text[text.index(SECTION) + len(SECTION):]
    body = body[: body.index("\n## ")]
    files, commands = {}, []
    for lang, block in re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S):
        if lang == "bash":
            commands += [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
        else:
            name = block.splitlines()[0].lstrip("# ").split(",")[0].split()[0]
            files[name] = block
    return files, commands


def cli(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "REGSWEEP_PROGRESS": "plain", **(env or {})}
    res = subprocess.run([sys.executable, "-P", "-m", "regsweep.search.cli", *args], cwd=cwd, env=full,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, f"{args}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README section's files and commands, run as written; yields (folder, {command: result})."""
    files, commands = readme_section()
    assert set(files) == {"nets.py", "mine.yaml"} and len(commands) == 4, (files.keys(), commands)
    d = tmp_path_factory.mktemp("your_model")
    for name, text in files.items():
        (d / name).write_text(text)
    results = {}
    for line in commands:
        args = line.split()
        assert args[0] == "regsweep"
        results[args[1]] = cli(args[1:], d)
    return d, results


def test_the_readme_sweep_of_a_user_model_differs_in_n_params_and_replays_exactly(readme_run):
    d, results = readme_run
    assert "ok — study 'mine', 4 params" in results["validate"].stdout
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{d / 'regsweep.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(t.user_attrs["config"]["model"]["name"] == "nets:GNNet" for t in trials)
    assert {p for t in trials[1:] for p in t.params} == {"model.dropout", "model.init", "regularization.l2",
                                                          "model.args.depth"}
    assert len({t.user_attrs["n_params"] for t in trials}) >= 2  # depth changes the architecture
    for t in trials[1:]:
        assert t.user_attrs["config"]["model"]["args"] == {"width": 16, "depth": t.params["model.args.depth"]}
    best = study.best_trial
    exported = (d / "best.yaml").read_text()
    assert f"trial: {best.number}" in exported and "name: nets:GNNet" in exported
    hist = json.loads((d / "runs" / "best" / "history.json").read_text())
    assert hist["epochs"][best.user_attrs["best_epoch"]]["val_loss"] == best.value  # exactly, on CPU
    assert hist["n_params"] == best.user_attrs["n_params"]
    assert not (d / "__pycache__").exists()  # user code is imported without writing bytecode beside it


def test_status_export_report_and_dashboard_never_import_user_modules(readme_run, tmp_path, monkeypatch, capsys):
    """A `nets` module on sys.path that writes a marker when imported: none of the read commands imports it (run
    in this process, which has never imported a `nets`; the dashboard's WSGI app serves the trials' configs)."""
    from wsgiref.util import setup_testing_defaults

    from regsweep.search.cli import main
    from regsweep.search.dashboard import make_app

    d, _ = readme_run
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    marker = tmp_path / "imported.txt"
    (shadow / "nets.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                    "from torch import nn\nGNNet = nn.Linear\n")
    assert "nets" not in sys.modules
    monkeypatch.setattr(sys, "path", [*sys.path, str(shadow)])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    url = f"sqlite:///{d / 'regsweep.db'}"
    assert main(["status", "--storage", url]) == 0
    assert main(["status", "--storage", url, "--study-name", "mine"]) == 0
    for fmt in ("yaml", "json", "params", "python", "snippet"):
        assert main(["export", "--storage", url, "--format", fmt, "--out", str(tmp_path / f"x.{fmt}")]) == 0
    assert main(["report", "--storage", url, "--out", str(tmp_path / "report")]) == 0
    assert "study mine: 3 trials" in capsys.readouterr().out
    app, _ = make_app(url)

    def get(path: str) -> bytes:
        environ = {"PATH_INFO": path.split("?")[0], "QUERY_STRING": path.partition("?")[2]}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:300])
        return body

    sid = json.loads(get("/api/studies"))["study_summaries"][0]["study_id"]
    assert b"nets:GNNet" in get(f"/api/studies/{sid}?after=0")  # the trials' recorded configs were served
    assert "nets" not in sys.modules and not marker.exists()
    import importlib

    importlib.import_module("nets")  # the marker works: importing it writes the file
    assert marker.exists()
    sys.modules.pop("nets")


RAY_SPEC = """
name: ray_user_model
base:
  model: {name: "MODULE:GNNet", args: {width: 8}}
  data: {name: digits, batch_size: 128}
  optim: {lr: 1.0e-2}
  train: {epochs: 1, num_threads: 1, train_eval_size: 64}
space:
  model.dropout: {type: float, low: 0.0, high: 0.3}
  model.args.depth: {type: int, low: 1, high: 3}
budget: {n_trials: 1}
"""


@pytest.mark.slow  # ~10 s of Ray Tune start-up for one trial (the --address refusal alone is in the bad-input table)
def test_the_ray_backend_runs_a_user_model_locally_and_refuses_it_on_a_cluster(ray_session, tmp_path, capsys):
    """A local Ray's workers append the spec's folder as the driver does; joining a cluster (--address) with a model
    from the spec's folder is one line, exit 2, before Ray is touched or a study is created."""
    from regsweep.search.cli import main

    files, _ = readme_section()
    module = f"ray_nets_{uuid.uuid4().hex[:8]}"  # Ray's worker processes outlive a test: a name of its own
    (tmp_path / f"{module}.py").write_text(files["nets.py"])
    spec = tmp_path / "ray_user_model.yaml"
    spec.write_text(RAY_SPEC.replace("MODULE", module))
    url = _ray_url()
    name = f"t-usermodel-{uuid.uuid4().hex[:10]}"
    assert main(["run", str(spec), "--backend", "ray", "--address", "127.0.0.1:1", "--storage", url,
                 "--study-name", name]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --address: '127.0.0.1:1' is not allowed with model.name") \
        and "Ray does not ship it to a cluster" in err, err
    assert name not in optuna.get_all_study_names(url)
    assert main(["run", str(spec), "--backend", "ray", "--storage", url, "--study-name", name]) == 0
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    try:
        assert [t.state for t in trials] == [TrialState.COMPLETE], [t.user_attrs.get("stop_reason") for t in trials]
        assert all(t.user_attrs["config"]["model"]["name"] == f"{module}:GNNet" for t in trials)
        assert all(t.user_attrs["worker"].startswith("ray:") for t in trials) and trials[0].user_attrs["n_params"] > 0
    finally:
        optuna.delete_study(study_name=name, storage=url)


def _ray_url() -> str:
    """tests/search/conftest.py's RAY_URL: the storage the session's Ray workers have in their environment."""
    import importlib.util

    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("_user_models_search_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.RAY_URL
