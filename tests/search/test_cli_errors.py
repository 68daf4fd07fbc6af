"""search/cli.py: every bad input exits 2 with ONE stderr line naming the file, the field and the value, and
nothing is created or changed. Everything runs in-process through ``regsweep.search.cli.main``."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from regsweep.search.cli import main

GOOD = {
    "name": "tiny",
    "base": {
        "model": {"name": "cnn", "widths": [8, 16]},
        "data": {"name": "digits", "batch_size": 64},
        "optim": {"name": "adamw", "lr": 3.0e-3},
        "train": {"epochs": 2, "num_threads": 1, "train_eval_size": 128},
    },
    "objective": {"metric": "val_loss"},
    "space": {
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "regularization.l2": {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True},
    },
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median"},
    "budget": {"n_trials": 2},
    "enqueue": [],
}


@pytest.fixture(autouse=True)
def _no_env_storage(monkeypatch):
    monkeypatch.delenv("REGSWEEP_STORAGE", raising=False)


def spec_with(path: Path, edit=None, text: str | None = None) -> Path:
    """Write GOOD (changed by ``edit(data)``) or raw ``text`` to ``path``."""
    if text is None:
        data = copy.deepcopy(GOOD)
        if edit is not None:
            edit(data)
        text = yaml.safe_dump(data, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    for f in fragments:
        assert f in line, (f, line)
    return line


def run_cli(command: str, spec: Path, tmp_path: Path, storage: str | None = None) -> int:
    """``regsweep validate|run SPEC --storage URL``; run always gets a fresh SQLite file in tmp_path."""
    url = storage or f"sqlite:///{tmp_path / 'db.sqlite'}"
    return main([command, str(spec), "--storage", url])


# ----------------------------------------------------------------------------------- bad spec files
def _set(path: str, value):
    def edit(data):
        *parents, last = path.split("/")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


BAD_SPECS = {
    # id: (edit or raw text, fragments every error line must contain besides the file name)
    "malformed_yaml": ("name: tiny\nspace: {model.dropout: [unclosed\n", ("malformed YAML", "line ")),
    "empty_file": ("", ("empty file",)),
    "non_mapping": ("- name\n- tiny\n", ("the document is a list", "not a mapping")),
    "unknown_field": (_set("n_trails", 5), ("n_trails: 5 is not allowed", "allowed fields:")),
    "wrong_type": (_set("budget/n_trials", "ten"), ("budget.n_trials: 'ten' is not allowed", "integer")),
    "low_gt_high": (_set("space/model.dropout", {"type": "float", "low": 0.5, "high": 0.1}),
                    ("space.model.dropout.low: 0.5 is not allowed", "<= high (0.1)")),
    "log_low_zero": (_set("space/regularization.l2", {"type": "float", "low": 0.0, "high": 0.1, "log": True}),
                     ("space.regularization.l2.low: 0.0 is not allowed", "log: true needs low > 0")),
    "unknown_sampler": (_set("sampler/name", "annealing"),
                        ("sampler.name: 'annealing' is not allowed", "tpe", "cmaes")),
    "unknown_pruner": (_set("pruner/name", "hypercube"), ("pruner.name: 'hypercube' is not allowed", "median")),
    "unknown_model": (_set("base/model/name", "vgg99"), ("base.model.name: 'vgg99' is not allowed", "cnn")),
    "unknown_init": (_set("base/model/init", "he2"), ("base.model.init: 'he2' is not allowed", "kaiming_normal")),
    "unknown_scheduler": (_set("base/scheduler", {"name": "warmup_linear"}),
                          ("base.scheduler.name: 'warmup_linear' is not allowed", "cosine")),
    "unknown_dataset": (_set("base/data/name", "imagenet22k"),
                        ("base.data.name: 'imagenet22k' is not allowed", "digits")),
    "missing_base": (_set("base", "base/nope.yaml"), ("base: 'base/nope.yaml' not found",)),
    "missing_include": (_set("space", {"include": "spaces/nope.yaml"}),
                        ("space.include: 'spaces/nope.yaml' not found",)),
    "grid_float_without_step": (_set("sampler/name", "grid"),
                                ("space.model.dropout", "grid needs a step", "low: 0.0, high: 0.5")),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_exits_2_with_one_line_and_creates_nothing(case, command, tmp_path, capsys):
    edit, fragments = BAD_SPECS[case]
    spec = spec_with(tmp_path / "study.yaml", text=edit) if isinstance(edit, str) else \
        spec_with(tmp_path / "study.yaml", edit)
    before = snapshot(tmp_path)
    assert run_cli(command, spec, tmp_path) == 2
    one_error_line(capsys, str(spec), *fragments)
    assert not (tmp_path / "db.sqlite").exists()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["validate", "run"])
def test_include_cycle_names_the_chain(command, tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("include: b.yaml\nmodel.dropout: {type: float, low: 0.0, high: 0.5}\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    spec = spec_with(tmp_path / "study.yaml", _set("space", {"include": "a.yaml"}))
    before = snapshot(tmp_path)
    assert run_cli(command, spec, tmp_path) == 2
    line = one_error_line(capsys, "b.yaml", "space.include: 'a.yaml'", "include cycle")
    assert line.index("a.yaml ->") < line.rindex("b.yaml ->")  # a -> b -> a, in order
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_base_file_is_named_with_its_field(command, tmp_path, capsys):
    base = tmp_path / "base" / "cnn.yaml"
    base.parent.mkdir()
    base.write_text("model: {name: cnn, dropout: 1.5}\n")
    spec = spec_with(tmp_path / "study.yaml", _set("base", "base/cnn.yaml"))
    before = snapshot(tmp_path)
    assert run_cli(command, spec, tmp_path) == 2
    one_error_line(capsys, str(base), "model.dropout: 1.5 is not allowed", "[0, 1)")
    assert snapshot(tmp_path) == before


def test_run_n_trials_below_one_exits_2(tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml")
    before = snapshot(tmp_path)
    assert main(["run", str(spec), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}", "--n-trials", "0"]) == 2
    one_error_line(capsys, "--n-trials: 0 is not allowed", ">= 1")
    assert snapshot(tmp_path) == before


def test_missing_spec_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    one_error_line(capsys, str(tmp_path / "nope.yaml"), "no such file")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ storage
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_storage_scheme(command, tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml")
    before = snapshot(tmp_path)
    assert run_cli(command, spec, tmp_path, storage="redis://localhost:6379/0") == 2
    one_error_line(capsys, "storage", "'redis://localhost:6379/0' is not allowed", "sqlite:///", "postgresql://")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_storage_scheme_from_the_spec_names_it(command, tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml", _set("storage", "redis://localhost/0"))
    before = snapshot(tmp_path)
    assert main([command, str(spec)]) == 2
    one_error_line(capsys, "storage", "'redis://localhost/0' is not allowed")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("url", ["postgresql://u:pw@127.0.0.1:1/x", "mysql+pymysql://u:pw@127.0.0.1:1/x"])
def test_unreachable_database_masks_the_password(command, url, tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml")
    before = snapshot(tmp_path)
    assert run_cli(command, spec, tmp_path, storage=url) == 2
    captured = capsys.readouterr()
    assert "pw" not in captured.err and "pw" not in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: storage: "), captured.err
    assert url.replace(":pw@", ":***@") in lines[0]
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- spec change on resume
def test_spec_change_on_resume_exits_2_naming_the_difference(tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["run", str(spec), "--storage", url, "--n-trials", "1", "--device", "cpu"]) == 0
    study = optuna.load_study(study_name="tiny", storage=url)
    trials_before = [(t.number, t.state, t.params, t.value) for t in study.trials]
    attrs_before = dict(study.user_attrs)
    assert len(trials_before) == 1 and trials_before[0][1] == TrialState.COMPLETE

    spec_with(spec, _set("space/model.dropout", {"type": "float", "low": 0.0, "high": 0.4}))
    capsys.readouterr()
    assert main(["run", str(spec), "--storage", url, "--n-trials", "2", "--device", "cpu"]) == 2
    line = one_error_line(capsys, str(spec.resolve()), "space.model.dropout.high: 0.5 -> 0.4",
                          "--allow-spec-change")
    assert "study 'tiny'" in line
    study = optuna.load_study(study_name="tiny", storage=url)
    assert [(t.number, t.state, t.params, t.value) for t in study.trials] == trials_before
    assert dict(study.user_attrs) == attrs_before

    assert main(["run", str(spec), "--storage", url, "--n-trials", "2", "--device", "cpu",
                 "--allow-spec-change"]) == 0
    study = optuna.load_study(study_name="tiny", storage=url)
    assert [t.state for t in study.trials] in ([TrialState.COMPLETE] * 2,
                                               [TrialState.COMPLETE, TrialState.PRUNED])
    assert study.user_attrs["regsweep:spec_hash"] != attrs_before["regsweep:spec_hash"]
    assert study.user_attrs["regsweep:spec"]["space"]["model.dropout"]["high"] == 0.4


# ------------------------------------------------------------------------------------------ good spec
def test_validate_good_spec_exits_0_and_writes_nothing(tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml")
    before = snapshot(tmp_path)
    assert run_cli("validate", spec, tmp_path) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"{spec}: ok" in captured.out and "2 params" in captured.out and "sampler tpe" in captured.out
    assert not (tmp_path / "db.sqlite").exists()
    assert snapshot(tmp_path) == before


def test_validate_with_the_default_storage_writes_nothing(tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml")
    before = snapshot(tmp_path)
    assert main(["validate", str(spec)]) == 0
    assert f"sqlite:///{(tmp_path / 'regsweep.db').resolve()}" in capsys.readouterr().out  # absolute path
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture
def done_study(tmp_path):
    spec = spec_with(tmp_path / "study.yaml")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["run", str(spec), "--storage", url, "--n-trials", "1", "--device", "cpu"]) == 0
    return url


def test_export_missing_trial_exits_2(done_study, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "best.yaml"
    assert main(["export", "--storage", done_study, "--study-name", "tiny", "--trial", "7", "--out", str(out)]) == 2
    one_error_line(capsys, "--trial: 7 is not a trial of study 'tiny'", "0..0")
    assert not out.exists()


def test_export_unknown_study_exits_2(done_study, capsys):
    capsys.readouterr()
    assert main(["export", "--storage", done_study, "--study-name", "nope"]) == 2
    one_error_line(capsys, "--study-name: 'nope' not found", "studies: tiny")


def test_export_bad_format_is_an_argparse_error(done_study, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["export", "--storage", done_study, "--format", "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--format" in err and "'bogus'" in err and "yaml" in err and "params" in err


def test_export_of_a_study_with_only_failed_trials_exits_2(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(study_name="broken", storage=url)
    for _ in range(2):
        trial = study.ask()
        trial.set_user_attr("stop_reason", "failed:non-finite train_loss")
        study.tell(trial, state=TrialState.FAIL)
    assert main(["export", "--storage", url]) == 2  # the only study is picked without --study-name
    one_error_line(capsys, "study 'broken' has no COMPLETE trial yet", "--trial N")
    assert main(["export", "--storage", url, "--trial", "1"]) == 2
    one_error_line(capsys, "trial 1 has no recorded config", "failed:non-finite train_loss")



def test_validate_applies_the_spec_hash_rule_read_only(tmp_path, capsys):
    """validate refuses a spec that differs from the one an existing study was started with; writes nothing."""
    spec = spec_with(tmp_path / "study.yaml")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["run", str(spec), "--storage", url, "--n-trials", "1", "--device", "cpu"]) == 0
    spec_with(spec, _set("space/model.dropout", {"type": "float", "low": 0.0, "high": 0.4}))
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["validate", str(spec), "--storage", url]) == 2
    one_error_line(capsys, "space.model.dropout.high: 0.5 -> 0.4", "--allow-spec-change")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------- issue 16: every CLI value checked first
def test_argparse_errors_are_one_line_naming_the_command(tmp_path, capsys):
    spec = spec_with(tmp_path / "study.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["run", str(spec), "--n-trials", "many"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: regsweep run: argument --n-trials: invalid int value: 'many'\n"
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: regsweep: the following arguments are required: COMMAND\n"


@pytest.mark.parametrize("flags, fragments", [
    (["--timeout", "-1"], ("--timeout: -1.0 is not allowed", "finite number of seconds > 0")),
    (["--timeout", "nan"], ("--timeout: nan is not allowed",)),
    (["--study-name", ""], ("--study-name: '' is not allowed", "1 to 128")),
    (["--study-name", "x" * 10_000], ("--study-name: 'xxxx", "(10000 characters)", "1 to 128")),
    (["--device", "bogus"], ("--device: 'bogus' is not allowed", "cpu, cuda, cuda:N or mps")),
    (["--workers", "0"], ("--workers: 0 is not allowed", ">= 1")),
    (["--artifacts", "ftp://host/x"], ("--artifacts: 'ftp://host/x' is not allowed",)),
])
def test_bad_run_flags_exit_2_before_the_study_exists(flags, fragments, tmp_path, capsys):
    """Before: --timeout -1/nan exited 0 having run nothing; '' and 10,000-character names, --device bogus
    and a bad --artifacts got as far as creating the study (or a traceback)."""
    spec = spec_with(tmp_path / "study.yaml")
    before = snapshot(tmp_path)
    assert main(["run", str(spec), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}", *flags]) == 2
    line = one_error_line(capsys, *fragments)
    assert len(line) < 300
    assert snapshot(tmp_path) == before


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = spec_with(tmp_path / "study.yaml")
    before = snapshot(tmp_path)
    assert main(["run", str(spec), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}", "--device", "cuda"]) == 2
    one_error_line(capsys, "--device: 'cuda' is not allowed", "CUDA is not available")
    assert snapshot(tmp_path) == before


def test_bad_artifacts_location_creates_no_study(tmp_path, capsys):
    """Before: the study was created (and its budget written) before --artifacts was looked at."""
    spec = spec_with(tmp_path / "study.yaml")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for workers in ("1", "2"):
        assert main(["run", str(spec), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}", "--workers", workers,
                     "--artifacts", str(a_file)]) == 2
        one_error_line(capsys, "--artifacts", "is a file")
        assert not (tmp_path / "db.sqlite").exists()


@pytest.mark.parametrize("command", [["status"], ["status", "--study-name", "tiny"], ["export"],
                                     ["report", "--out", "REP"], ["dashboard", "--port", "0"]])
def test_commands_that_read_a_study_never_create_a_database(command, tmp_path, capsys):
    """Before: each of them left an empty SQLite file behind (and the dashboard served it)."""
    missing = tmp_path / "nope.db"
    argv = [a.replace("REP", str(tmp_path / "rep")) for a in command]
    assert main([*argv, "--storage", f"sqlite:///{missing}"]) == 2
    one_error_line(capsys, str(missing), "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_status_export_of_an_existing_database_still_read_it(done_study, capsys):
    capsys.readouterr()
    assert main(["status", "--storage", done_study]) == 0
    out = capsys.readouterr().out
    assert "1 studies" in out and "tiny" in out
    assert main(["export", "--storage", done_study, "--format", "params"]) == 0


def test_missing_dataset_root_is_found_by_validate_and_run(tmp_path, capsys):
    """Before: validate said ok and run recorded one FAIL trial after another."""
    root = tmp_path / "data"
    spec = spec_with(tmp_path / "study.yaml",
                     _set("base/data", {"name": "mnist", "root": str(root), "batch_size": 64}))
    before = snapshot(tmp_path)
    for command in ("validate", "run"):
        assert run_cli(command, spec, tmp_path) == 2
        one_error_line(capsys, str(spec), "data.root", str(root), "data.download: true")
    assert snapshot(tmp_path) == before
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte.gz"):
        (raw / name).write_bytes(b"")
    assert run_cli("validate", spec, tmp_path) == 2
    one_error_line(capsys, "t10k-labels-idx1-ubyte not found")
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"")
    assert run_cli("validate", spec, tmp_path) == 0  # present (their contents are read by the trial)


def test_a_wrong_sampler_argument_type_fails_validate_not_every_trial(tmp_path, capsys):
    """Before: TPESampler(n_startup_trials='3') was accepted and every trial then failed with no reason."""
    spec = spec_with(tmp_path / "study.yaml", _set("sampler/args", {"n_startup_trials": "3"}))
    for command in ("validate", "run"):
        assert run_cli(command, spec, tmp_path) == 2
        one_error_line(capsys, "sampler.args.n_startup_trials: '3' is not allowed", "TPESampler's", "int")
    assert not (tmp_path / "db.sqlite").exists()
