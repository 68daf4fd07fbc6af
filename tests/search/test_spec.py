"""search/spec.py: the repo's study specs load without data; every bad input is one line naming file and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from regsweep.models.config import ConfigError, TrainConfig
from regsweep.search.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]

GOOD = {
    "name": "tiny",
    "base": {"model": {"name": "cnn", "widths": [8, 16]}, "train": {"epochs": 4}},
    "objective": {"metric": "val_loss", "direction": "minimize"},
    "space": {
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "optim.weight_decay": {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True},
        "model.bn": {"type": "categorical", "choices": ["none", "before_act"]},
    },
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median", "args": {"n_warmup_steps": 1}},
    "budget": {"n_trials": 5, "timeout": None},
    "enqueue": [{}],
}


def spec_with(**changes) -> dict:
    """GOOD with top-level fields replaced; a value of ... deletes the field."""
    data = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def write_spec(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def assert_one_line(exc: pytest.ExceptionInfo, path: Path, *fragments: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert path.name in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# --------------------------------------------------------------------------------------- repo specs
@pytest.mark.parametrize("name, metric, epochs", [
    ("digits_cnn", "val_loss", 15),
    ("mnist_cnn", "val_loss", 10),
    ("cifar10_resnet18", "val_acc", 30),
])
def test_repo_specs_validate_without_data(name, metric, epochs):
    spec = load_spec(ROOT / "studies" / f"{name}.yaml")
    assert spec.name == name
    assert spec.path == (ROOT / "studies" / f"{name}.yaml").resolve()
    assert spec.objective.metric == metric
    assert spec.objective.sign == (1.0 if metric == "val_loss" else -1.0)
    assert spec.base.train.epochs == epochs
    assert spec.enqueue == [{}]
    assert {"model.dropout", "optim.weight_decay", "model.bn", "scheduler.gamma"} <= set(spec.space.paths())
    assert len(spec.spec_hash()) == 16


def test_cifar_spec_uses_the_plus_space_and_hyperband():
    spec = load_spec(ROOT / "studies" / "cifar10_resnet18.yaml")
    assert "regularization.mixup_alpha" in spec.space.paths()
    pruner = spec.make_pruner()
    assert type(pruner).__name__ == "HyperbandPruner"
    assert pruner._max_resource == 30


def test_good_spec_loads(tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", GOOD))
    assert spec.base.model.widths == [8, 16]
    assert spec.space.paths() == ["model.dropout", "optim.weight_decay", "model.bn"]
    assert (spec.n_trials, spec.timeout) == (5, None)
    assert spec.directory == tmp_path.resolve()
    assert type(spec.make_sampler()).__name__ == "TPESampler"


# ------------------------------------------------------------------------------------- bad inputs
BAD = [
    ("malformed_yaml", "name: x\nbase: [unclosed\n", ("malformed YAML",)),
    ("empty_file", "", ("empty file",)),
    ("list_document", "- name: x\n- base: y\n", ("list", "not a mapping")),
    ("unknown_field", spec_with(trials=3), ("trials:",)),
    ("name_with_spaces", spec_with(name="my study"), ("name:", "'my study'")),
    ("base_missing", spec_with(base=...), ("base: missing",)),
    ("base_file_missing", spec_with(base="nope/base.yaml"), ("base:", "'nope/base.yaml' not found")),
    ("base_inline_bad_value", spec_with(base={"model": {"dropout": 2}}), ("base.model.dropout:",)),
    ("metric_test_acc", spec_with(objective={"metric": "test_acc"}), ("objective.metric:", "'test_acc'",
                                                                       "test set")),
    ("maximize_val_loss", spec_with(objective={"metric": "val_loss", "direction": "maximize"}),
     ("objective.direction:", "'maximize'")),
    ("space_missing", spec_with(space=...), ("space: missing",)),
    ("low_gt_high", spec_with(space={"model.dropout": {"type": "float", "low": 0.5, "high": 0.1}}),
     ("space.model.dropout.low:", "0.5")),
    ("log_low_zero", spec_with(space={"optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}),
     ("space.optim.weight_decay.low:", "log")),
    ("unknown_sampler", spec_with(sampler={"name": "bayes"}), ("sampler.name:", "'bayes'", "tpe")),
    ("unknown_pruner", spec_with(pruner={"name": "guillotine"}), ("pruner.name:", "'guillotine'", "median")),
    ("any_of_not_list", spec_with(pruner={"any_of": {"name": "median"}}), ("pruner:", "any_of")),
    ("patient_without_wrapped", spec_with(pruner={"name": "patient", "args": {"patience": 2}}),
     ("pruner.wrapped: missing",)),
    ("median_bogus_arg", spec_with(pruner={"name": "median", "args": {"bogus": 1}}),
     ("pruner.args.bogus: 1", "MedianPruner takes: n_startup_trials")),
    ("n_trials_zero", spec_with(budget={"n_trials": 0}), ("budget.n_trials:", "0")),
    ("timeout_negative", spec_with(budget={"n_trials": 3, "timeout": -1}), ("budget.timeout:", "-1")),
    ("enqueue_unknown_param", spec_with(enqueue=[{"model.hidden": 32}]), ("enqueue[0].model.hidden:",)),
    ("enqueue_out_of_range", spec_with(enqueue=[{}, {"model.dropout": 0.9}]), ("enqueue[1].model.dropout:", "0.9")),
    ("keep_weights_unknown", spec_with(keep_weights="last"), ("keep_weights:", "'last'", "best, all, none")),
    ("keep_weights_null", spec_with(keep_weights=None), ("keep_weights:", "None", "best, all, none")),
    ("keep_weights_bool", spec_with(keep_weights=True), ("keep_weights:", "True", "best, all, none")),
]


@pytest.mark.parametrize("content, fragments", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_spec_is_one_line_naming_file_and_field(tmp_path, content, fragments):
    path = write_spec(tmp_path / "bad_spec.yaml", content)
    with pytest.raises((SpecError, ConfigError)) as exc:
        load_spec(path)
    assert_one_line(exc, path, *fragments)


@pytest.mark.parametrize("entry", [{"model.bn": "sideways"}, {"model.dropout": "abc"}])
def test_enqueue_value_outside_categorical_or_wrong_type(tmp_path, entry):
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(enqueue=[entry]))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, f"enqueue[0].{next(iter(entry))}:")


def test_sampler_args_not_a_mapping(tmp_path):
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(sampler={"name": "tpe", "args": [1, 2]}))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, "sampler.args:")


def test_sampler_args_that_optuna_rejects(tmp_path):
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(sampler={"name": "random", "args": {"bogus": 1}}))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, "sampler.args.bogus: 1", "RandomSampler takes:")


def test_bad_base_file_names_the_base_file(tmp_path):
    base = write_spec(tmp_path / "base_bad.yaml", {"model": {"dropout": 2}})
    path = write_spec(tmp_path / "s.yaml", spec_with(base="base_bad.yaml"))
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    assert_one_line(exc, base, "model.dropout:")


def test_missing_spec_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_spec(tmp_path / "absent.yaml")
    assert_one_line(exc, tmp_path / "absent.yaml", "no such file")


# ---------------------------------------------------------------------------------------- hashing
def test_spec_hash_stable_and_sensitive_to_the_search_only(tmp_path):
    h1 = load_spec(write_spec(tmp_path / "a.yaml", GOOD)).spec_hash()
    h2 = load_spec(write_spec(tmp_path / "a.yaml", GOOD)).spec_hash()
    assert h1 == h2

    budget = load_spec(write_spec(tmp_path / "b.yaml", spec_with(budget={"n_trials": 99, "timeout": 60}))).spec_hash()
    assert budget == h1  # the budget is not part of what is searched
    renamed = load_spec(write_spec(tmp_path / "c.yaml", spec_with(name="other"))).spec_hash()
    assert renamed == h1

    space = spec_with()
    space["space"]["model.dropout"]["high"] = 0.4
    assert load_spec(write_spec(tmp_path / "d.yaml", space)).spec_hash() != h1
    base = spec_with()
    base["base"]["train"]["epochs"] = 5
    assert load_spec(write_spec(tmp_path / "e.yaml", base)).spec_hash() != h1
    pruner = load_spec(write_spec(tmp_path / "f.yaml", spec_with(pruner={"name": "none"}))).spec_hash()
    assert pruner != h1


def test_keep_weights_defaults_to_best_and_never_changes_the_spec_hash(tmp_path):
    default = load_spec(write_spec(tmp_path / "a.yaml", GOOD))
    assert default.keep_weights == "best"
    for policy in ("best", "all", "none"):
        spec = load_spec(write_spec(tmp_path / f"{policy}.yaml", spec_with(keep_weights=policy)))
        assert spec.keep_weights == policy
        assert spec.spec_hash() == default.spec_hash()  # what is kept is not what is searched


# ------------------------------------------------------------------------------ relative paths
def test_paths_relative_to_the_spec_file(tmp_path, monkeypatch):
    (tmp_path / ".regsweep").touch()  # the project root: ../ of the spec stays inside it
    TrainConfig.from_dict({"model": {"widths": [4, 8]}, "train": {"epochs": 2}}).save(tmp_path / "base.yaml")
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "s.yaml").write_text("model.dropout: {type: float, low: 0.0, high: 0.25}\n")
    path = write_spec(tmp_path / "studies" / "sub.yaml",
                      spec_with(base="../base.yaml", space={"include": "../spaces/s.yaml"}))
    monkeypatch.chdir(ROOT)  # anywhere but the spec's directory
    spec = load_spec(path)
    assert spec.base.model.widths == [4, 8]
    assert spec.base.train.epochs == 2
    assert spec.space.to_dict()["model.dropout"]["high"] == 0.25
    assert spec.directory == (tmp_path / "studies").resolve()


def test_relative_spec_path_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").touch()  # the project root
    TrainConfig().save(tmp_path / "base.yaml")
    write_spec(tmp_path / "studies" / "rel.yaml", spec_with(base="../base.yaml"))
    monkeypatch.chdir(tmp_path)
    spec = load_spec("studies/rel.yaml")
    assert spec.path == (tmp_path / "studies" / "rel.yaml").resolve()
    assert spec.base == TrainConfig()


# ------------------------------------------------------------------------------ input limits (issue 16)
BOMB_LINES = [f"l0: &l0 [{', '.join(['x'] * 9)}]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
                                                       for i in range(1, 9)]  # 9**9 values in under 1 KB
TINY_SPEC = """\
name: tiny
base: {model: {name: cnn, widths: [8, 16]}, train: {epochs: 2}}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
"""


def bomb_under(where: str) -> str:
    """TINY_SPEC with the alias bomb under an unknown key, description: or sampler.args."""
    if where == "unknown key":
        return TINY_SPEC + "bomb:\n" + "".join(f"  {ln}\n" for ln in BOMB_LINES)
    if where == "description":
        return TINY_SPEC + "description:\n" + "".join(f"  {ln}\n" for ln in BOMB_LINES)
    return TINY_SPEC + "sampler:\n  name: tpe\n  args:\n" + "".join(f"    {ln}\n" for ln in BOMB_LINES)


def validate_in_child(spec: Path, tmp_path: Path, timeout: float = 120) -> tuple[int, str, int]:
    """`regsweep validate SPEC` in a child process: its exit code, stderr and peak RSS in MiB (os.wait4's
    rusage of that child alone; no address-space limit, which would kill torch's import)."""
    import os
    import subprocess
    import sys
    import time

    err = tmp_path / f"{spec.stem}.err"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "regsweep"), "validate", str(spec), "--storage",
                                 f"sqlite:///{tmp_path / 'db.sqlite'}"], stdout=subprocess.DEVNULL, stderr=stderr,
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                pytest.fail(f"validate {spec.name} ran for more than {timeout}s")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return proc.returncode, err.read_text(), usage.ru_maxrss // 1024


def test_alias_bomb_in_a_spec_stays_small_in_a_child_process(tmp_path):
    good = write_spec(tmp_path / "good.yaml", TINY_SPEC)
    code, err, normal = validate_in_child(good, tmp_path)
    assert code == 0, err
    for where in ("unknown key", "description", "sampler.args"):
        text = bomb_under(where)
        assert len(text.encode()) < 1024
        spec = write_spec(tmp_path / f"bomb_{where.replace(' ', '_').replace('.', '_')}.yaml", text)
        code, err, peak = validate_in_child(spec, tmp_path)
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1, (where, code, err[:2000])
        assert len(lines[0]) < 300 and spec.name in lines[0] and "alias" in lines[0], lines[0]
        assert peak < normal + 200, f"{where}: peak RSS {peak} MiB vs {normal} MiB for a good spec"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".sqlite") == []  # validate wrote nothing


def test_duplicate_spec_keys_are_an_error(tmp_path):
    path = write_spec(tmp_path / "dup.yaml", TINY_SPEC + "budget: {n_trials: 3}\nname: other\n")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, "line 6: duplicate key 'name' (first on line 1)")
    path = write_spec(tmp_path / "dup2.yaml", TINY_SPEC + "  model.dropout: {type: float, low: 0.1, high: 0.2}\n")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, "line 5: duplicate key 'model.dropout' (first on line 4)")


def test_long_description_and_name_are_refused_with_an_excerpt(tmp_path):
    path = write_spec(tmp_path / "desc.yaml", spec_with(description="d" * 10_001))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    msg = assert_one_line(exc, path, "description:", "(10,001 chars)", "at most 10,000 characters")
    assert len(msg) < 300
    assert load_spec(write_spec(tmp_path / "ok.yaml", spec_with(description="d" * 10_000))).description
    path = write_spec(tmp_path / "name.yaml", spec_with(name="n" * 129))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert len(assert_one_line(exc, path, "name:", "(129 chars)", "1 to 128")) < 300


def test_oversized_spec_file_is_refused(tmp_path):
    path = write_spec(tmp_path / "big.yaml", TINY_SPEC + "description: |\n" + ("  " + "z" * 98 + "\n") * 11_000)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, "bytes is more than the 1,048,576 allowed")


SECRET = "TOPSECRET-7c1e9b root-only first line"


def secret_files(outside: Path) -> dict[str, Path]:
    """Files outside the project: a plain first line (a str document), malformed YAML, a list."""
    outside.mkdir(parents=True, exist_ok=True)
    files = {"plain": f"{SECRET}\nsecond line\n", "malformed": f"{SECRET}: [unclosed\n  'q': {SECRET}\n",
             "list": f"- {SECRET}\n"}
    for name, text in files.items():
        (outside / f"{name}.txt").write_text(text)
    return {name: outside / f"{name}.txt" for name in files}


@pytest.mark.parametrize("kind", ["plain", "malformed", "list"])
def test_base_outside_the_project_root_is_refused_and_never_echoed(tmp_path, kind):
    project = tmp_path / "project"
    (project / "studies").mkdir(parents=True)
    (project / "pyproject.toml").touch()
    secret = secret_files(tmp_path / "etc")[kind]
    path = write_spec(project / "studies" / "s.yaml", spec_with(base=f"../../etc/{secret.name}"))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    msg = assert_one_line(exc, path, "base:", "is outside the project root", str(project.resolve()),
                          "--allow-outside")
    assert "TOPSECRET" not in msg
    with pytest.raises(SpecError) as exc:  # allowed: read, and still never echoed
        load_spec(path, allow_outside=[tmp_path / "etc"])
    msg = str(exc.value)
    assert secret.name in msg and "TOPSECRET" not in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kind", ["plain", "malformed", "list"])
def test_include_outside_the_project_root_is_refused_and_never_echoed(tmp_path, kind):
    secret = secret_files(tmp_path / "etc")[kind]
    path = write_spec(tmp_path / "studies" / "s.yaml", spec_with(space={"include": f"../etc/{secret.name}"}))
    with pytest.raises(ConfigError) as exc:  # no marker: the root is the spec's own directory
        load_spec(path)
    msg = assert_one_line(exc, path, "space.include:", "outside the project root", str(path.parent.resolve()))
    assert "TOPSECRET" not in msg
    with pytest.raises(ConfigError) as exc:
        load_spec(path, allow_outside=[str(tmp_path / "etc")])
    msg = str(exc.value)
    assert secret.name in msg and "TOPSECRET" not in msg and "\n" not in msg, msg


def test_allow_outside_accepts_base_and_include_from_that_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    TrainConfig.from_dict({"train": {"epochs": 3}}).save(shared / "base.yaml")
    (shared / "space.yaml").write_text("model.dropout: {type: float, low: 0.0, high: 0.2}\n")
    path = write_spec(tmp_path / "proj" / "s.yaml", spec_with(base="../shared/base.yaml",
                                                               space={"include": "../shared/space.yaml"}))
    with pytest.raises(ConfigError):
        load_spec(path)
    spec = load_spec(path, allow_outside=[shared])
    assert spec.base.train.epochs == 3 and spec.space.paths() == ["model.dropout"]
    with pytest.raises(SpecError) as exc:
        load_spec(path, allow_outside=[tmp_path / "nope"])
    assert str(exc.value).startswith("--allow-outside: ") and "not a directory" in str(exc.value)


def test_symlink_escaping_the_root_is_refused(tmp_path):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / ".regsweep").touch()
    secret = secret_files(tmp_path / "etc")["plain"]
    (tmp_path / "proj" / "base.yaml").symlink_to(secret)
    path = write_spec(tmp_path / "proj" / "s.yaml", spec_with(base="base.yaml"))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    msg = assert_one_line(exc, path, "base: 'base.yaml' is outside the project root", str(secret.resolve()))
    assert "TOPSECRET" not in msg


def test_builtin_study_resolves_inside_the_package_from_anywhere(tmp_path, monkeypatch):
    from regsweep.search.space import PACKAGE_DIR, project_root

    monkeypatch.chdir(tmp_path)  # no pyproject.toml up from here
    spec = load_spec("digits_cnn")
    assert spec.builtin and "model.dropout" in spec.space.paths()
    assert project_root(PACKAGE_DIR / "studies", builtin=True) == PACKAGE_DIR
    assert project_root(PACKAGE_DIR / "studies") == PACKAGE_DIR  # by path, also in an installed wheel


def test_cli_allow_outside_on_validate(tmp_path, capsys):
    from regsweep.search.cli import main

    shared = tmp_path / "shared"
    shared.mkdir()
    TrainConfig().save(shared / "base.yaml")
    path = write_spec(tmp_path / "proj" / "s.yaml", spec_with(base="../shared/base.yaml"))
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["validate", str(path), "--storage", db]) == 2
    assert "outside the project root" in capsys.readouterr().err
    assert main(["validate", str(path), "--storage", db, "--allow-outside", str(shared)]) == 0
    assert main(["validate", str(path), "--storage", db, "--allow-outside", str(tmp_path / "x"),
                 "--allow-outside", str(shared)]) == 2
    assert capsys.readouterr().err.startswith("error: --allow-outside: ")


# ------------------------------------------------------------ issue 16: sampler/pruner args, enqueue conditions
@pytest.mark.parametrize("sampler, fragments", [
    ({"name": "tpe", "args": {"n_startup_trials": "ten"}}, ("sampler.args.n_startup_trials: 'ten'", "int")),
    ({"name": "tpe", "args": {"multivariate": "yes"}}, ("sampler.args.multivariate: 'yes'", "bool | None")),
    ({"name": "tpe", "args": {"prior_weight": True}}, ("sampler.args.prior_weight: True", "float")),
    ({"name": "cmaes", "args": {"popsize": 2.5}}, ("sampler.args.popsize: 2.5", "int | None")),
    ({"name": "tpe", "args": {"seed": 3}}, ("sampler.args.seed: 3", "sampler.seed")),
    # constructors accept these; the dry run of the real space does not
    ({"name": "tpe", "args": {"n_ei_candidates": 0, "n_startup_trials": 2}}, ("sampler.args.n_ei_candidates: 0",)),
    ({"name": "tpe", "args": {"gamma": 5}}, ("sampler.args.gamma: 5", "fails with it")),
])
def test_sampler_args_are_checked_by_type_then_by_a_dry_run(sampler, fragments, tmp_path):
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(sampler={"seed": 0, **sampler}))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, *fragments)


@pytest.mark.parametrize("pruner, fragments", [
    ({"name": "median", "args": {"n_warmup_steps": "3"}}, ("pruner.args.n_warmup_steps: '3'", "int")),
    ({"any_of": [{"name": "median"}, {"name": "percentile", "args": {"percentile": "50"}}]},
     ("pruner.any_of[1].args.percentile: '50'", "float")),
])
def test_pruner_args_are_checked_by_type(pruner, fragments, tmp_path):
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(pruner=pruner))
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    assert_one_line(exc, path, *fragments)


def test_good_sampler_args_of_every_kind_pass(tmp_path):
    path = write_spec(tmp_path / "s.yaml", spec_with(sampler={"name": "tpe", "seed": 0, "args": {
        "n_startup_trials": 3, "prior_weight": 2, "consider_endpoints": True, "multivariate": None}}))
    assert load_spec(path).sampler["args"]["prior_weight"] == 2  # an integer is a float


def test_simple_types_reads_string_and_real_annotations():
    from typing import Optional

    from regsweep.models.registry import simple_types

    assert simple_types("int") == ("int",)
    assert simple_types("float | None") == ("float", "None")
    assert simple_types(Optional[bool]) == ("bool", "None")
    assert simple_types(int) == ("int",)
    assert simple_types("Callable[[int], int] | None") is None


COND_SPACE = {
    "model.bn": {"type": "categorical", "choices": ["none", "before_act"]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": {"model.bn": "before_act"}},
}


def test_enqueued_value_whose_condition_is_off_is_refused(tmp_path):
    """Before: the value was dropped silently (the param is not sampled when its condition is off)."""
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(space=COND_SPACE, enqueue=[
        {"model.bn": "before_act", "model.dropout": 0.2}, {"model.bn": "none", "model.dropout": 0.1}]))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert_one_line(exc, path, "enqueue[1].model.dropout: 0.1 is not allowed",
                    "only when model.bn is 'before_act'", "this entry sets it to 'none'")


def test_enqueued_value_whose_condition_reads_the_base(tmp_path):
    space = {"model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
             "optim.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optim.name": "sgd"}}}
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(space=space, enqueue=[{"optim.momentum": 0.9}]))
    with pytest.raises(SpecError) as exc:  # the base's optimizer is adamw
        load_spec(path)
    assert_one_line(exc, path, "enqueue[0].optim.momentum", "the base config has 'adamw'")
    # a condition on a param the trial samples may hold: allowed
    path = write_spec(tmp_path / "ok.yaml", spec_with(space=COND_SPACE, enqueue=[{"model.dropout": 0.1}]))
    assert load_spec(path).enqueue == [{"model.dropout": 0.1}]


def test_study_name_over_128_characters_is_refused(tmp_path):
    path = write_spec(tmp_path / "bad_spec.yaml", spec_with(name="n" * 10_000))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    msg = assert_one_line(exc, path, "name:", "(10,000 chars)", "1 to 128")
    assert len(msg) < 300
    assert load_spec(write_spec(tmp_path / "ok.yaml", spec_with(name="n" * 128))).name == "n" * 128


def test_model_args_at_their_default_leave_the_spec_hash_and_a_set_one_changes_it():
    """Issue 18: model.args ({}) joins the hash only when set, so studies made before it resume unchanged."""
    from regsweep.models.config import TrainConfig
    from regsweep.search.spec import hashable_config

    assert "args" not in hashable_config(TrainConfig())["model"]
    assert hashable_config(TrainConfig().with_overrides({"model.args.depth": 2}))["model"]["args"] == {"depth": 2}
