"""search/samplers.py: every registered sampler runs a real tiny study, seeded samplers repeat themselves,
grid_values enumerates exactly, and limitation_warning names what a sampler cannot model."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from regsweep.models.config import ConfigError
from regsweep.search.backends import optuna_backend
from regsweep.search.cli import main
from regsweep.search.samplers import SAMPLERS, grid_values, limitation_warning, make_sampler
from regsweep.search.space import build_space
from regsweep.search.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "name": "tiny",
    "base": {
        "model": {"name": "cnn", "widths": [8, 16]},
        "data": {"name": "digits", "batch_size": 64},
        "optim": {"name": "adamw", "lr": 3.0e-3},
        "train": {"epochs": 2, "num_threads": 1, "train_eval_size": 128},
    },
    "objective": {"metric": "val_loss"},
    # small enough for grid (3 x 2 points): a stepped float and a categorical
    "space": {
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
        "model.bn": {"type": "categorical", "choices": ["none", "before_act"]},
    },
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 3},
    "enqueue": [],  # every trial is sampled
}
SEEDED = ("tpe", "random", "grid", "qmc", "cmaes", "gp")


def write_spec(tmp_path: Path, sampler: str, seed: int | None = 0, n_trials: int = 3) -> Path:
    data = copy.deepcopy(TINY)
    data["sampler"] = {"name": sampler, "seed": seed}
    data["budget"]["n_trials"] = n_trials
    path = tmp_path / f"{sampler}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_study(spec_path: Path, db: Path, n_trials: int):
    spec = load_spec(spec_path)
    with open(db.with_suffix(".log"), "w") as log:
        result = optuna_backend.run(spec, f"sqlite:///{db}", spec.name, n_trials=n_trials, device="cpu", out=log)
    return result.study


def done(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_registry_names_every_sampler():
    assert SAMPLERS.names() == ["tpe", "random", "grid", "qmc", "gp", "cmaes", "nsga2"]
    with pytest.raises(ValueError, match="unknown sampler 'sobol'; choose one of: tpe, random, grid"):
        SAMPLERS.get("sobol")


@pytest.mark.parametrize("name", SEEDED)
def test_each_sampler_runs_a_real_study_and_repeats_itself_with_the_same_seed(name, tmp_path):
    # gp: 2 trials keep it fast; both come from its seeded start-up sampler (n_startup_trials=10), so this
    # checks the seeded path, not the GP fit (which would need >= 11 trials: too slow for this suite)
    n = 2 if name == "gp" else 3
    spec = write_spec(tmp_path, name, seed=7, n_trials=n)
    first = run_study(spec, tmp_path / "a.db", n)
    assert len(done(first)) == n and len(first.trials) == n  # no FAIL, nothing extra
    expected_sampler = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
                        "qmc": "QMCSampler", "gp": "GPSampler", "cmaes": "CmaEsSampler"}[name]
    assert type(first.sampler).__name__ == expected_sampler
    for t in first.trials:
        assert set(t.params) == {"model.dropout", "model.bn"}
        assert t.params["model.dropout"] in (0.0, 0.1, 0.2)  # the step is honoured
        assert t.params["model.bn"] in ("none", "before_act")
        assert t.user_attrs["config"]["model"]["dropout"] == t.params["model.dropout"]
        assert t.user_attrs["config"]["model"]["bn"] == t.params["model.bn"]
    if name == "grid":  # no grid point twice
        points = [(t.params["model.dropout"], t.params["model.bn"]) for t in first.trials]
        assert len(set(points)) == n

    second = run_study(spec, tmp_path / "b.db", n)
    assert [t.params for t in second.trials] == [t.params for t in first.trials]
    assert [t.value for t in second.trials] == [t.value for t in first.trials]  # CPU replay: same metrics


@pytest.mark.parametrize("name", (*SEEDED, "nsga2"))  # nsga2 trains for real in tests/search/test_tradeoffs.py
def test_the_seed_reaches_the_sampler(name):
    """Different seeds give different params (a real sampler on an in-memory study; no training)."""
    base = load_spec_dict("tpe").base
    wide = build_space({"model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.01},
                        "regularization.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.01}},
                       base, "wide.yaml")

    def params(seed):
        study = optuna.create_study(sampler=make_sampler(name, seed, {}, wide))
        out = []
        for i in range(4):
            trial = study.ask()
            out.append(wide.sample(trial, base.to_dict()))
            study.tell(trial, float(i % 3))
        return out

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert params(1) == params(1)
    assert params(1) != params(2)


def load_spec_dict(sampler: str):
    from regsweep.search.spec import parse_spec

    data = copy.deepcopy(TINY)
    data["sampler"] = {"name": sampler, "seed": 0}
    return parse_spec(data, ROOT / "tiny.yaml", "tiny.yaml")


# ------------------------------------------------------------------------------------------ grid_values
def test_grid_values_are_exact():
    base = load_spec_dict("tpe").base
    space = build_space({
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
        "scheduler.gamma": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.15},
        "scheduler.step_size": {"type": "int", "low": 2, "high": 8, "step": 2},
        "train.epochs": {"type": "int", "low": 1, "high": 4},
        "model.bn": {"type": "categorical", "choices": ["none", "before_act", "after_act"]},
    }, base, "grid.yaml")
    assert grid_values(space) == {
        "model.dropout": [0.0, 0.1, 0.2],
        "scheduler.gamma": [0.1, 0.25, 0.4],  # never past high
        "scheduler.step_size": [2, 4, 6, 8],
        "train.epochs": [1, 2, 3, 4],
        "model.bn": ["none", "before_act", "after_act"],
    }


def test_grid_values_refuse_a_float_without_step():
    base = load_spec_dict("tpe").base
    space = build_space({"model.dropout": {"type": "float", "low": 0.0, "high": 0.5}}, base, "grid.yaml")
    with pytest.raises(ConfigError, match=r"space\.model\.dropout: grid needs a step"):
        grid_values(space)


# ------------------------------------------------------------------------------------ limitation_warning
CATEGORICAL = ["model.bn", "model.init", "scheduler.name"]
CONDITIONAL = ["scheduler.gamma", "scheduler.pct_start", "scheduler.step_size"]


@pytest.fixture(scope="module")
def digits_space():
    return load_spec(ROOT / "studies" / "digits_cnn.yaml").space


@pytest.mark.parametrize("name, what, params", [
    ("qmc", "categorical and conditional", sorted(CATEGORICAL + CONDITIONAL)),
    ("cmaes", "categorical and conditional", sorted(CATEGORICAL + CONDITIONAL)),
    ("gp", "conditional", CONDITIONAL),
])
def test_limitation_warning_names_the_params(name, what, params, digits_space):
    assert limitation_warning(name, digits_space) == (
        f"sampler {name} cannot model {what} params; it samples these at random: {', '.join(params)}")


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_no_limitation_warning_for_tpe_and_random(name, digits_space):
    assert limitation_warning(name, digits_space) is None


def test_limitation_warning_only_for_what_the_space_has():
    spec = load_spec_dict("qmc")  # model.bn is categorical, nothing is conditional
    assert limitation_warning("qmc", spec.space) == (
        "sampler qmc cannot model categorical params; it samples these at random: model.bn")
    assert limitation_warning("gp", spec.space) is None
    assert limitation_warning("grid", spec.space) is None


def test_validate_prints_the_qmc_warning_once(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REGSWEEP_STORAGE", raising=False)
    data = yaml.safe_load((ROOT / "studies" / "digits_cnn.yaml").read_text())
    data["base"] = str(ROOT / "studies" / data["base"])
    data["space"] = {"include": str((ROOT / "studies" / data["space"]["include"]).resolve())}
    data["sampler"] = {"name": "qmc", "seed": 0}
    spec = tmp_path / "digits_qmc.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["validate", str(spec), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}",
                 "--allow-outside", str(ROOT)]) == 0  # base and space are the repo's files
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines == [f"warning: sampler qmc cannot model categorical and conditional params; it samples these at "
                     f"random: {', '.join(sorted(CATEGORICAL + CONDITIONAL))}"]
    assert "sampler qmc" in captured.out and "(3 conditional)" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_qmc.yaml"]  # validate wrote nothing


# ------------------------------------------------------------------------------------ resume without repeats
@pytest.mark.parametrize("name", ["random", "tpe"])
def test_resumed_runs_draw_fresh_params_and_a_fresh_study_keeps_the_spec_seed(name, tmp_path):
    """Optuna's known trap: a seeded sampler rebuilt from the same seed re-proposes the earlier trials' params
    (before the fix, a resumed random study drew trial 0's params again as trial 3). Two resumes; no sampled
    parameter set repeats; the first run of a fresh study is what the spec's seed alone gives."""
    data = copy.deepcopy(TINY)
    data["base"]["data"] = {"name": "synthetic", "n_samples": 96, "shape": [1, 8, 8], "batch_size": 48}
    data["base"]["train"] = {"epochs": 1, "num_threads": 1, "train_eval_size": 16}
    data["space"] = {"model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
                     "regularization.l2": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}}
    data["sampler"] = {"name": name, "seed": 3}
    spec = tmp_path / "resume.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    db = tmp_path / "r.db"
    for n in (3, 6, 9):  # the first run, then two resumes with a larger budget
        study = run_study(spec, db, n)
    drawn = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(drawn) == 9 and len(set(drawn)) == 9, drawn

    fresh = run_study(spec, tmp_path / "fresh.db", 3)  # a fresh study's first run: the spec's seed, unchanged
    loaded = load_spec(spec)
    plain = optuna.create_study(sampler=make_sampler(name, 3, {}, loaded.space))  # Optuna alone, the spec's seed
    trial = plain.ask()
    loaded.space.sample(trial, loaded.base.to_dict())
    assert [t.params for t in fresh.trials] == [t.params for t in study.trials[:3]]
    assert fresh.trials[0].params == trial.params


def test_run_seed_is_the_spec_seed_only_for_a_fresh_studys_first_run():
    from regsweep.search.study import RESEEDED_SAMPLERS, run_seed

    assert run_seed(5, 0, None) == 5
    seeds = {run_seed(5, 0, "w0"), run_seed(5, 0, "w1"), run_seed(5, 20, None), run_seed(5, 40, None)}
    assert len(seeds) == 4 and 5 not in seeds and all(0 <= s < 2 ** 32 for s in seeds)
    assert run_seed(5, 20, None) == run_seed(5, 20, None)  # deterministic: a resumed run replays
    assert "qmc" not in RESEEDED_SAMPLERS and "grid" not in RESEEDED_SAMPLERS and "nsga2" in RESEEDED_SAMPLERS
