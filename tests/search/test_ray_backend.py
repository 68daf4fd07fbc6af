"""The Ray Tune backend: a local Ray (num_cpus=2) ASHA sweep on digits, recorded exactly like the Optuna backend,
on PostgreSQL through a password-bearing URL (trust auth accepts any password) that must never reach Ray's files.

One Ray session per pytest run (tests/search/conftest.py's ``ray_session``) and one sweep are shared by the
module's tests. Ray missing under CI is a failure (conftest's ``require``), never a skip.
"""

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.models.train import HISTORY_KEYS
from regsweep.search.cli import main
from regsweep.search.record import history


def _conftest():
    """tests/conftest.py's helpers (`require` fails under CI instead of skipping); --import-mode=importlib puts
    no conftest on sys.path, so it is loaded by path."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_regsweep_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_c = _conftest()
POSTGRES_URL, reachable, require = _c.POSTGRES_URL, _c.reachable, _c.require

SECRET = "Secr3t/pw"  # the same as tests/search/conftest.py RAY_URL's: a raw "/", which the old mask printed
PW_URL = POSTGRES_URL.replace("postgres@", f"postgres:{SECRET}@")
EPOCHS = 5
N_TRIALS = 8
SPEC = f"""
name: ray_tiny
base:
  model: {{name: cnn, widths: [8, 16]}}
  data: {{name: digits, batch_size: 64}}
  optim: {{name: adamw, lr: 3.0e-3}}
  train: {{epochs: {EPOCHS}, num_threads: 1, train_eval_size: 128}}
objective: {{metric: val_loss}}
space:
  model.dropout: {{type: float, low: 0.0, high: 0.5}}
  regularization.l2: {{type: float, low: 1.0e-6, high: 1.0e-2, log: true}}
  scheduler.name: {{type: categorical, choices: [none, step]}}
  scheduler.gamma: {{type: float, low: 0.1, high: 0.9, when: {{scheduler.name: step}}}}
sampler: {{name: tpe, seed: 0, args: {{n_startup_trials: 4}}}}
pruner: none
budget: {{n_trials: {N_TRIALS}}}
enqueue: [{{}}]
ray: {{scheduler: {{name: asha, args: {{grace_period: 1, reduction_factor: 2}}}}}}
"""
END_ATTRS = {"config", "history_len", "best_epoch", "stop_reason", "n_params", "device", "seed", "num_threads",
             "split_fingerprint", "torch_version", "test_loss", "test_acc", "worker"}


def _ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    """`regsweep run SPEC --backend ray` of 8 trials; yields (spec path, study name, stdout)."""
    root = tmp_path_factory.mktemp("ray_sweep")
    spec = root / "ray_tiny.yaml"
    spec.write_text(SPEC)
    name = f"t-ray-{uuid.uuid4().hex[:10]}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", str(spec), "--backend", "ray", "--storage", PW_URL, "--study-name", name,
                     "--artifacts", str(root / "artifacts")])
    assert code == 0, out.getvalue()
    yield spec, name, out.getvalue()
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=POSTGRES_URL)


def _study(name):
    """The study, its trials read at once (retried: other tests restart the shared PostgreSQL server)."""
    from regsweep.search.storage import retry_transient

    def load():
        study = optuna.load_study(study_name=name, storage=POSTGRES_URL)
        study.get_trials()
        return study

    return retry_transient(load)


def test_the_driver_uploads_every_trial_artifacts_and_keep_weights_best_leaves_the_best_trials(sweep, tmp_path):
    """Curves and config of every trial (the driver); the best-epoch weights (keep_weights: best, the spec's
    default) uploaded by the trainable, the non-best pruned by the driver after the budget: exactly one file left,
    whose predictions on the validation split give the best trial's val_loss."""
    import torch

    from regsweep.models.build import build
    from regsweep.models.config import TrainConfig
    from regsweep.models.train import evaluate
    from regsweep.search.artifacts import ARTIFACTS_ATTR, open_store, stored_weights, trial_artifacts

    spec, name, _ = sweep
    study = _study(name)
    store = open_store(study.user_attrs[ARTIFACTS_ATTR])
    best = study.best_trial.number
    assert list(stored_weights(study, store)) == [best]
    for t in study.get_trials():
        metas = {m["filename"]: m["artifact_id"] for m in trial_artifacts(study, t)}
        weights = {f"trial-{t.number}-weights.pt"} if t.number == best else set()
        assert set(metas) == {f"trial-{t.number}-curves.png", f"trial-{t.number}-config.yaml"} | weights
        text = store.open_reader(metas[f"trial-{t.number}-config.yaml"]).read().decode()
        assert f"state: {t.state.name}" in text  # the final state: PRUNED ones too (ended by the driver)
        assert SECRET not in text and store.open_reader(metas[f"trial-{t.number}-curves.png"]).read(4) == b"\x89PNG"
    reader = store.open_reader(stored_weights(study, store)[best])
    (tmp_path / "best.pt").write_bytes(reader.read())
    reader.close()
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (payload["trial"], payload["best_epoch"]) == (best, study.best_trial.user_attrs["best_epoch"])
    parts = build(TrainConfig.from_dict(payload["config"]), "cpu")
    parts.model.load_state_dict(payload["state_dict"])
    assert evaluate(parts.model, parts.eval_loader("val"))[0] == pytest.approx(study.best_value, rel=1e-9, abs=1e-12)


def test_the_driver_writes_the_study_note_and_progress(sweep):
    from regsweep.search.dashboard import read_note

    spec, name, out = sweep
    study = _study(name)
    note = read_note(study)
    assert note.startswith("# ray_tiny\n") and f"Trial **{study.best_trial.number}**" in note
    assert f"progress: {N_TRIALS}/{N_TRIALS} done" in out


def test_sweep_records_every_trial_as_the_optuna_backend_does(sweep, tmp_path):
    spec, name, out = sweep
    study = _study(name)
    trials = study.get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == N_TRIALS  # the budget: COMPLETE + PRUNED
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert pruned and complete, [(t.number, t.state.name, t.user_attrs.get("stop_reason")) for t in trials]
    assert trials[0].user_attrs["regsweep:base"] is True and trials[0].params == {}
    for t in done:
        hist = history(t)
        assert hist and all(tuple(e) == HISTORY_KEYS for e in hist)  # the Optuna backend's history, key for key
        assert [e["epoch"] for e in hist] == list(range(len(hist)))
        assert sorted(t.intermediate_values) == list(range(len(hist)))  # one value per trained epoch, from 0
        assert all(t.intermediate_values[e["epoch"]] == e["val_loss"] for e in hist)
        best = min(range(len(hist)), key=lambda i: hist[i]["val_loss"])
        assert t.user_attrs["best_epoch"] == best
        assert t.user_attrs["regsweep:ray_run"].startswith(f"{name}-ray-")
        reason = t.user_attrs["stop_reason"]
        if t.state == TrialState.PRUNED:
            assert reason == f"pruned:asha@{len(hist) - 1}" and len(hist) < EPOCHS  # ASHA stopped it early
        else:
            assert reason in ("completed", "early_stopped")
            assert t.value == hist[best]["val_loss"]  # the BEST epoch's value, not the last
            assert END_ATTRS <= set(t.user_attrs)
        step = t.params.get("scheduler.name") == "step"
        assert ("scheduler.gamma" in t.params) == step  # the condition held through the Optuna sampler
    lines = [line for line in out.splitlines() if line.startswith("trial ")]
    assert len(lines) == N_TRIALS and all("pruned:asha@" in line for line in lines if " PRUNED " in line)

    # the Optuna backend on the same spec writes the same attrs and history keys
    from regsweep.search.backends import optuna_backend
    from regsweep.search.spec import load_spec

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    ref = optuna_backend.run(load_spec(spec), url, "ref", n_trials=1, device="cpu", out=io.StringIO()).study
    ref_trial = ref.get_trials()[0]
    ray_base = trials[0]
    assert set(ref_trial.user_attrs) - {"artifacts", "regsweep:artifacts"} <= set(ray_base.user_attrs)
    assert history(ref_trial)[0].keys() == history(ray_base)[0].keys()
    assert ref_trial.user_attrs["config"] == ray_base.user_attrs["config"]
    assert [e["val_loss"] for e in history(ref_trial)] == \
        [e["val_loss"] for e in history(ray_base)]  # same config, same CPU threads: same curve


def test_export_and_train_reproduce_a_ray_trial_exactly(sweep, tmp_path, capsys):
    _, name, _ = sweep
    study = _study(name)
    trial = min((t for t in study.get_trials() if t.state == TrialState.COMPLETE and t.number != 0),
                key=lambda t: t.value, default=study.trials[0])
    exported = tmp_path / "best.yaml"
    assert main(["export", "--storage", PW_URL, "--study-name", name, "--trial", str(trial.number),
                 "--out", str(exported)]) == 0
    assert SECRET not in exported.read_text()
    assert main(["train", str(exported), "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist["num_threads"] == trial.user_attrs["num_threads"]
    assert hist["epochs"][trial.user_attrs["best_epoch"]]["val_loss"] == trial.value  # exactly, on CPU


def test_nothing_under_rays_storage_path_holds_the_password(sweep, ray_session):
    files = [p for p in Path(ray_session).rglob("*") if p.is_file()]
    assert any(p.name == "tuner.pkl" for p in files) and any(p.name == "params.json" for p in files)
    leaks = [str(p) for p in files if any(part.encode() in p.read_bytes() for part in (SECRET, "Secr3t"))]
    assert not leaks
    assert "Secr3t" not in sweep[2] and "postgres:***@" in sweep[2]  # the run's own lines


def test_resume_fails_the_dead_drivers_running_trials_and_restores(sweep, ray_session):
    from regsweep.search.backends.ray.run import run
    from regsweep.search.spec import load_spec

    spec_path, name, _ = sweep
    study = _study(name)
    run_name = study.trials[1].user_attrs["regsweep:ray_run"]
    orphan = study.ask({"model.dropout": optuna.distributions.FloatDistribution(0.0, 0.5)})  # left RUNNING
    orphan.set_user_attr("regsweep:ray_run", run_name)  # ... by the dead driver of that experiment
    out = io.StringIO()
    result = run(load_spec(spec_path), PW_URL, name, n_trials=N_TRIALS + 1, resume=True, out=out)
    study = _study(name)
    dead = study.trials[orphan.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["stop_reason"] == "failed:driver died (resumed)"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params["model.dropout"] == dead.params["model.dropout"]
    assert retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert result.ran == 1 and len([t for t in study.trials if t.state in (TrialState.COMPLETE,
                                                                          TrialState.PRUNED)]) == N_TRIALS + 1
    assert f"restoring Ray experiment {Path(ray_session) / run_name}" in out.getvalue()


HB_EPOCHS, HB_TRIALS = 4, 6


def test_hyperband_pauses_resumes_and_records_every_epoch_once(ray_session, tmp_path, monkeypatch):
    """HyperBand (max_t = 4 epochs, eta 4: a bracket of 2 full trials, then one of 4 halved after epoch 0) pauses
    trials and resumes them from their checkpoint: the budget is met exactly, every trial's history and reports
    run 0..n-1 once, the ones it stopped are PRUNED at their last epoch, and a resumed trial's curve is exactly
    what the same config gives in one uninterrupted run. The driver's own stale check runs with a 3 s grace
    period: a paused trial survives it only through the driver's heartbeats."""
    from regsweep.models.config import TrainConfig
    from regsweep.models.train import fit
    from regsweep.search.backends.ray.run import run
    from regsweep.search.spec import load_spec

    monkeypatch.setenv("REGSWEEP_HEARTBEAT_INTERVAL", "1")  # the driver's storage (the trials' keep 30 s)
    monkeypatch.setenv("REGSWEEP_GRACE_PERIOD", "3")
    spec_path = tmp_path / "hb.yaml"
    spec_path.write_text(SPEC.replace(f"epochs: {EPOCHS}", f"epochs: {HB_EPOCHS}")
                         .replace(f"n_trials: {N_TRIALS}", f"n_trials: {HB_TRIALS}")
                         .replace("{name: asha, args: {grace_period: 1, reduction_factor: 2}}",
                                  "{name: hyperband, args: {reduction_factor: 4}}"))
    name = f"t-ray-hb-{uuid.uuid4().hex[:10]}"
    out = io.StringIO()
    try:
        result = run(load_spec(spec_path), PW_URL, name, out=out)
        study = _study(name)
        trials = study.get_trials()
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == HB_TRIALS and result.ran == HB_TRIALS, out.getvalue()
        assert [t.state for t in trials if t not in done] == []  # none failed as stale, none left RUNNING
        resumed = []
        for t in done:
            hist = history(t)
            assert [e["epoch"] for e in hist] == list(range(len(hist)))  # once each, from 0
            assert sorted(t.intermediate_values) == list(range(len(hist)))
            assert all(t.intermediate_values[e["epoch"]] == e["val_loss"] for e in hist)
            if t.state == TrialState.PRUNED:
                assert t.user_attrs["stop_reason"] == f"pruned:hyperband@{len(hist) - 1}" and len(hist) < HB_EPOCHS
            else:
                assert t.user_attrs["stop_reason"] == "completed" and len(hist) == HB_EPOCHS
            at = t.user_attrs.get("resumed_at", [])
            assert at == sorted(set(at)) and all(0 < k < len(hist) for k in at)
            if at:
                resumed.append(t)
        assert any(t.state == TrialState.PRUNED for t in done)
        for t in resumed[:1]:  # the replay is exact: the same curve as one uninterrupted run of its config
            ref = fit(TrainConfig.from_dict(t.user_attrs["config"]), "cpu")
            assert [{k: v for k, v in e.items() if k != "seconds"} for e in ref.epochs] == \
                [{k: v for k, v in e.items() if k != "seconds"} for e in history(t)]
        print(f"hyperband: {len(resumed)} resumed trials: {[(t.number, t.user_attrs['resumed_at']) for t in resumed]}")
    finally:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=POSTGRES_URL)


# ------------------------------------------------------------------------------------ refusals (no Ray needed)
@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC)
    return path


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("name, says", [
    ("pbt", "PBT changes a trial's params mid-run"),
    ("bohb", "choose one of: fifo, asha, median, hyperband"),
])
def test_refused_schedulers_are_one_line_errors(tmp_path, capsys, name, says):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.replace("{name: asha, args: {grace_period: 1, reduction_factor: 2}}", name))
    err = _one_line_error(capsys, ["validate", str(spec), "--storage", f"sqlite:///{tmp_path / 'db'}"])
    assert f"ray.scheduler.name: '{name}' is not allowed" in err and says in err
    assert not (tmp_path / "db").exists()


def test_scheduler_override_is_checked(spec_file, tmp_path):
    from regsweep.models.config import ConfigError
    from regsweep.search.backends.ray.run import run
    from regsweep.search.spec import load_spec

    with pytest.raises(ConfigError, match="scheduler.name: 'pbt' is not allowed; PBT"):
        run(load_spec(spec_file), f"sqlite:///{tmp_path / 'db'}", "x", scheduler="pbt")
    with pytest.raises(ConfigError, match=r"grace_period: 0 is not allowed; must be an integer in \[1, train"):
        run(load_spec(spec_file), f"sqlite:///{tmp_path / 'db'}", "x",
                        scheduler={"name": "asha", "args": {"grace_period": 0}})
    with pytest.raises(ConfigError, match=r"scheduler.args.reduction_factor: 1 is not allowed; must be a number > 1"):
        run(load_spec(spec_file), f"sqlite:///{tmp_path / 'db'}", "x",
                        scheduler={"name": "hyperband", "args": {"reduction_factor": 1}})
    with pytest.raises(ConfigError, match=r"scheduler.args.grace_period: 1 is not allowed; hyperband takes: "
                                          r"reduction_factor"):
        run(load_spec(spec_file), f"sqlite:///{tmp_path / 'db'}", "x",
                        scheduler={"name": "hyperband", "args": {"grace_period": 1}})
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("flags", [["--address", "auto"], ["--gpus-per-trial", "0.5"], ["--cpus-per-trial", "2"],
                                   ["--resume"]])
def test_ray_flags_are_refused_with_the_optuna_backend(spec_file, tmp_path, capsys, flags):
    err = _one_line_error(capsys, ["run", str(spec_file), "--storage", f"sqlite:///{tmp_path / 'db'}", *flags])
    assert f"{flags[0]}: not allowed with --backend optuna" in err
    assert not (tmp_path / "db").exists()  # nothing written


@pytest.mark.parametrize("flags, says", [
    (["--workers", "2"], "--workers: not allowed with --backend ray"),
    (["--gpus", "0"], "--gpus: not allowed with --backend ray"),
    (["--device", "cuda"], "--device: 'cuda' is not allowed with --gpus-per-trial 0"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial: 0 is not allowed"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial: 1.5 is not allowed"),
    (["--address", "nowhere"], "--address: 'nowhere' is not allowed; use auto or HOST:PORT"),
])
def test_unsupported_ray_uses_give_the_documented_error(spec_file, tmp_path, capsys, flags, says):
    require(_ray_installed(), "ray (pip install 'regsweep[ray]')")
    err = _one_line_error(capsys, ["run", str(spec_file), "--backend", "ray", "--storage",
                                   f"sqlite:///{tmp_path / 'db'}", *flags])
    assert says in err
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("where, flags, env, says", [
    ("spec", [], {}, "{d}/s.yaml: trackers.tensorboard: not allowed with --backend ray"),
    ("flag", ["--tensorboard", "{d}/tb"], {}, "--tensorboard: not allowed with --backend ray"),
    ("env", [], {"REGSWEEP_MLFLOW": "sqlite:///{d}/mlflow.db"}, "$REGSWEEP_MLFLOW: not allowed with --backend ray"),
])
def test_trackers_are_refused_on_the_ray_backend(tmp_path, capsys, monkeypatch, where, flags, env, says):
    """The Ray backend runs no trackers: a configured one is one line naming where it came from, exit 2, before
    Ray starts or anything is written; `--tensorboard off` turns the spec's off and the refusal with it."""
    require(_ray_installed(), "ray (pip install 'regsweep[ray]')")
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC + ("trackers: {tensorboard: {log_dir: tb}}\n" if where == "spec" else ""))
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(d=tmp_path))
    argv = ["run", str(spec), "--backend", "ray", "--storage", f"sqlite:///{tmp_path / 'db'}", "--workers", "2"]
    err = _one_line_error(capsys, argv[:-2] + [f.format(d=tmp_path) for f in flags])
    assert err.startswith(f"error: {says.format(d=tmp_path)}") and "--backend optuna" in err, err
    assert not (tmp_path / "db").exists() and not (tmp_path / "tb").exists()
    if where == "spec":  # with the tracker off, the next check speaks: the flag refused with Ray
        assert "--workers: not allowed" in _one_line_error(capsys, [*argv, "--tensorboard", "off"])


def test_in_memory_sqlite_is_refused(spec_file, capsys):
    require(_ray_installed(), "ray (pip install 'regsweep[ray]')")
    err = _one_line_error(capsys, ["run", str(spec_file), "--backend", "ray", "--storage", "sqlite://"])
    assert "in-memory SQLite database is not shared with Ray's worker processes" in err


def test_spec_without_a_ray_section_keeps_its_hash():
    from regsweep.search.spec import load_spec

    root = Path(__file__).resolve().parents[2]
    spec = load_spec(root / "studies" / "digits_cnn.yaml")
    assert spec.ray == {} and "ray" not in spec.canonical()


# every module of the Ray sub-package, and what imports it, imported in a fresh interpreter whose meta-path
# finder refuses Ray (and records each attempt); then the finder is shown to work: `import ray` fails there
NO_RAY_PROBE = """
import sys

class RefuseRay:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            RefuseRay.attempts.append(name)
            raise ImportError(f"{name}: refused by the test's meta-path finder")
        return None

sys.meta_path.insert(0, RefuseRay())
import regsweep.search.backends.ray
import regsweep.search.backends.ray.driver
import regsweep.search.backends.ray.run
import regsweep.search.backends.ray.searcher
import regsweep.search.backends.ray.trainable
import regsweep.search.cli
import regsweep.search.spec
imported = [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
try:
    import ray
    refused = False
except ImportError:
    refused = True
print(RefuseRay.attempts[:-1] if refused else "the finder did not refuse ray", imported)
"""


def test_importing_the_backend_imports_no_ray():
    """Fails if any module of the Ray sub-package (or spec, cli) imports Ray when imported. Ray must be
    importable here (it is under CI), or the block below would prove nothing."""
    require(_ray_installed(), "ray (pip install 'regsweep[ray]')")
    proc = subprocess.run([sys.executable, "-P", "-c", NO_RAY_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []", proc.stdout  # no attempt to import Ray, none imported


def test_the_driver_writes_the_end_of_a_trial_ray_stopped(spec_file, tmp_path):
    """What the driver does when Ray's overfit stopper or scheduler stopped a trial from outside: the overfit
    pruner's own verdict, the end written through record.py, then the state told (no Ray process needed)."""
    require(_ray_installed(), "ray (pip install 'regsweep[ray]')")
    from regsweep.search.backends.ray import STOP_KEY
    from regsweep.search.backends.ray.driver import RayDriver
    from regsweep.search.backends.ray.searcher import overfit_stopper_class
    from regsweep.search.loop import ask
    from regsweep.search.optuna_internals import trial_id
    from regsweep.search.spec import load_spec
    from regsweep.search.study import open_study_locked

    spec = load_spec(spec_file)
    url = f"sqlite:///{tmp_path / 'db'}"
    study = open_study_locked(spec, url, "s")
    flat, falling = [0.9, 0.5, 0.6, 0.7, 0.8], [0.9, 0.8, 0.7]
    trials = []
    for losses in (flat, falling):
        trial = ask(study)
        hist = [{k: 0.0 for k in HISTORY_KEYS} | {"epoch": i, "val_loss": v, "train_eval_loss": v}
                for i, v in enumerate(losses)]
        trial.set_user_attr("history", hist)
        for i, v in enumerate(losses):
            trial.report(v, i)
        trials.append(trial)
    driver = RayDriver(spec, study, url, run_name="s-ray-x", scheduler="asha", out=io.StringIO())
    driver.open.update({"r0": trial_id(trials[0]), "r1": trial_id(trials[1])})
    with driver.attached():
        stopper = overfit_stopper_class()({"warmup": 1, "patience": 3, "window": 0})
        result = {"epoch": 4}
        assert stopper("r0", result) is True and result[STOP_KEY] == "stopped:overfit:plateau@4"
        assert stopper("r1", {"epoch": 2}) is False
    with pytest.raises(RuntimeError, match="no regsweep Ray driver is attached"):
        stopper("r0", {"epoch": 4})  # the driver's state lives in the driver, reached only while attached
    stopped = driver.finish_trial(trial_id(trials[0]), error=False, result=result)
    assert stopped.state == TrialState.COMPLETE and stopped.value == 0.5  # the best epoch's, not the last
    assert stopped.user_attrs["best_epoch"] == 1 and stopped.user_attrs["stop_reason"] == "stopped:overfit:plateau@4"
    pruned = driver.finish_trial(trial_id(trials[1]), error=False, result={"epoch": 2})
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["stop_reason"] == "pruned:asha@2"
    assert pruned.user_attrs["best_epoch"] == 2 and sorted(pruned.intermediate_values) == [0, 1, 2]


def test_resume_of_a_ray_run_made_before_0_2_is_refused(spec_file, tmp_path, capsys, monkeypatch):
    """A study whose Ray experiment was made by regsweep < 0.2 (no ``regsweep:ray_format`` study attr; its
    tuner.pkl names the old module paths) cannot be resumed: one line, exit 2, its trials left as they were."""
    require(_ray_installed(), "ray (pip install 'regsweep[ray]')")
    from regsweep.search.backends.ray import FORMAT_ATTR, RESULTS_ENV, RUN_ATTR
    from regsweep.search.backends.ray.run import resumable_experiment
    from regsweep.search.loop import ask
    from regsweep.search.spec import load_spec
    from regsweep.search.study import open_study_locked

    url, results = f"sqlite:///{tmp_path / 'db'}", tmp_path / "results"
    study = open_study_locked(load_spec(spec_file), url, "old")
    orphan = ask(study)  # left RUNNING by the 0.1 driver
    orphan.set_user_attr(RUN_ATTR, "old-ray-20250101-000000")
    (results / "old-ray-20250101-000000").mkdir(parents=True)
    monkeypatch.setenv(RESULTS_ENV, str(results))
    err = _one_line_error(capsys, ["run", str(spec_file), "--backend", "ray", "--storage", url, "--study-name", "old",
                                   "--resume"])
    assert err == ("error: --resume: the Ray experiment old-ray-20250101-000000 of study 'old' was made by regsweep "
                   "< 0.2 and cannot be resumed; run without --resume (the study's finished trials are kept)")
    assert optuna.load_study(study_name="old", storage=url).trials[orphan.number].state == TrialState.RUNNING
    study.set_user_attr(FORMAT_ATTR, 2)  # what a driver of this version records: the same experiment is resumable
    assert resumable_experiment(study, "old", results) == results / "old-ray-20250101-000000"
