"""search/space.py: parsing, includes, conditions, ordering, sampling on a real Optuna study, config checks."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from regsweep.models.config import ConfigError, TrainConfig
from regsweep.search.space import Param, SpaceError, build_space, load_space, order_params

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(exc: pytest.ExceptionInfo, source: str | Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert str(source) in msg, msg
    return msg


def sample_many(space, base: dict, n: int = 30, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        values = space.sample(trial, base)
        assert values == trial.params  # nothing suggested that is not returned, and the reverse
        out.append(values)
        study.tell(trial, 0.0)
    return out


SCHED = {
    "scheduler.name": {"type": "categorical", "choices": ["none", "step", "cosine"]},
    "scheduler.gamma": {"type": "float", "low": 0.1, "high": 0.9, "when": {"scheduler.name": "step"}},
}


# ------------------------------------------------------------------------------------------- parsing
def test_parse_float_int_categorical():
    params = load_space({
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.6},
        "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "regularization.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
        "scheduler.step_size": {"type": "int", "low": 2, "high": 8, "step": 2},
        "model.hidden": {"type": "int", "low": 16, "high": 256, "log": True},
        "model.bn": {"type": "categorical", "choices": ["none", "before_act", "after_act"]},
    }, "inline.yaml")
    assert list(params) == ["model.dropout", "optim.weight_decay", "regularization.label_smoothing",
                            "scheduler.step_size", "model.hidden", "model.bn"]
    assert params["model.dropout"] == Param("model.dropout", "float", 0.0, 0.6)
    wd = params["optim.weight_decay"].distribution()
    assert isinstance(wd, optuna.distributions.FloatDistribution)
    assert (wd.low, wd.high, wd.log, wd.step) == (1e-6, 1e-2, True, None)
    ls = params["regularization.label_smoothing"].distribution()
    assert (ls.low, ls.high, ls.step) == (0.0, 0.2, 0.05)
    ss = params["scheduler.step_size"].distribution()
    assert isinstance(ss, optuna.distributions.IntDistribution)
    assert (ss.low, ss.high, ss.step, ss.log) == (2, 8, 2, False)
    hid = params["model.hidden"].distribution()
    assert (hid.low, hid.high, hid.log) == (16, 256, True)
    bn = params["model.bn"].distribution()
    assert isinstance(bn, optuna.distributions.CategoricalDistribution)
    assert bn.choices == ("none", "before_act", "after_act")


def test_parse_when_single_value_and_list():
    params = load_space({
        "scheduler.gamma": {"type": "float", "low": 0.1, "high": 0.9, "when": {"scheduler.name": "step"}},
        "scheduler.eta_min": {"type": "float", "low": 0.0, "high": 1e-4,
                              "when": {"scheduler.name": ["cosine", "warmup_cosine"], "optim.name": "sgd"}},
    }, "inline.yaml")
    assert params["scheduler.gamma"].when == (("scheduler.name", ("step",)),)
    assert params["scheduler.eta_min"].when == (("scheduler.name", ("cosine", "warmup_cosine")),
                                                ("optim.name", ("sgd",)))
    assert params["scheduler.eta_min"].to_dict()["when"] == {"scheduler.name": ["cosine", "warmup_cosine"],
                                                             "optim.name": ["sgd"]}
    base = TrainConfig().to_dict()
    eta = params["scheduler.eta_min"]
    assert eta.active({"scheduler.name": "cosine", "optim.name": "sgd"}, base)
    assert eta.active({"scheduler.name": "warmup_cosine", "optim.name": "sgd"}, base)
    assert not eta.active({"scheduler.name": "step", "optim.name": "sgd"}, base)
    assert not eta.active({"scheduler.name": "cosine"}, base)  # optim.name from the base: adamw


@pytest.mark.parametrize("spec, fld", [
    ({"type": "float", "low": 0.5, "high": 0.1}, "space.model.dropout.low"),
    ({"type": "float", "low": 0.0, "high": 0.1, "log": True}, "space.model.dropout.low"),
    ({"type": "float", "low": 0.0}, "space.model.dropout.high"),
    ({"type": "uniform", "low": 0.0, "high": 0.1}, "space.model.dropout.type"),
    ({"type": "float", "low": 0.0, "high": 0.1, "bogus": 1}, "space.model.dropout.bogus"),
    ({"type": "float", "low": 0.0, "high": 0.1, "step": 0}, "space.model.dropout.step"),
    ({"type": "float", "low": "a", "high": 0.1}, "space.model.dropout.low"),
    ({"type": "categorical", "choices": []}, "space.model.dropout.choices"),
    ({"type": "categorical", "choices": [0.1], "low": 0}, "space.model.dropout.low"),
])
def test_parse_errors_name_the_field(spec, fld):
    with pytest.raises(SpaceError) as exc:
        load_space({"model.dropout": spec}, "/x/inline.yaml")
    msg = one_line_error(exc, "/x/inline.yaml")
    assert f": {fld}:" in msg, msg


# ------------------------------------------------------------------------------------------ includes
def test_include_relative_to_including_file(tmp_path):
    (tmp_path / ".regsweep").touch()  # the project root: ../spaces/ of the spec stays inside it
    write(tmp_path / "spaces" / "a.yaml", "include: sub/b.yaml\nmodel.dropout: {type: float, low: 0.0, high: 0.3}\n")
    write(tmp_path / "spaces" / "sub" / "b.yaml", "include: ../c.yaml\n"
          "model.bn: {type: categorical, choices: [none, before_act]}\n")
    write(tmp_path / "spaces" / "c.yaml", "optim.weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}\n")
    spec_file = tmp_path / "studies" / "s.yaml"
    space = build_space({"include": "../spaces/a.yaml"}, TrainConfig(), str(spec_file))
    assert space.paths() == ["optim.weight_decay", "model.bn", "model.dropout"]  # includes first
    assert space.to_dict()["optim.weight_decay"]["log"] is True


def test_later_entries_override_included(tmp_path):
    write(tmp_path / "base.yaml", "model.dropout: {type: float, low: 0.0, high: 0.5}\n"
          "model.bn: {type: categorical, choices: [none, before_act, after_act]}\n")
    write(tmp_path / "mid.yaml", "include: base.yaml\nmodel.dropout: {type: float, low: 0.1, high: 0.3}\n")
    params = load_space({"include": "mid.yaml", "model.bn": {"type": "categorical", "choices": ["after_act"]}},
                        str(tmp_path / "spec.yaml"))
    assert (params["model.dropout"].low, params["model.dropout"].high) == (0.1, 0.3)
    assert params["model.bn"].choices == ("after_act",)
    assert len(params) == 2


def test_include_list_of_files(tmp_path):
    write(tmp_path / "a.yaml", "model.dropout: {type: float, low: 0.0, high: 0.5}\n")
    write(tmp_path / "b.yaml", "model.dropout: {type: float, low: 0.0, high: 0.2}\n")
    params = load_space({"include": ["a.yaml", "b.yaml"]}, str(tmp_path / "spec.yaml"))
    assert params["model.dropout"].high == 0.2  # the later file wins


def test_include_cycle_names_the_cycle(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\nmodel.dropout: {type: float, low: 0.0, high: 0.5}\n")
    b = write(tmp_path / "b.yaml", "include: a.yaml\nmodel.hidden: {type: int, low: 0, high: 8}\n")
    spec = tmp_path / "spec.yaml"
    with pytest.raises(SpaceError) as exc:
        load_space({"include": "a.yaml"}, str(spec))
    msg = one_line_error(exc, b.resolve())
    assert "include cycle" in msg
    chain = msg.split("include cycle: ", 1)[1]
    assert chain == f"spec.yaml -> a.yaml -> b.yaml -> a.yaml (under {tmp_path.resolve()})"  # the root, once


def test_include_self_is_a_cycle(tmp_path):
    c = write(tmp_path / "c.yaml", "include: c.yaml\n")
    with pytest.raises(SpaceError) as exc:
        load_space({"include": "c.yaml"}, str(tmp_path / "spec.yaml"))
    msg = one_line_error(exc, c.resolve())
    assert msg.endswith(f"c.yaml -> c.yaml (under {tmp_path.resolve()})"), msg


def test_missing_include_names_the_file(tmp_path):
    (tmp_path / ".regsweep").touch()  # the project root
    with pytest.raises(SpaceError) as exc:
        load_space({"include": "../spaces/nope.yaml"}, str(tmp_path / "studies" / "spec.yaml"))
    msg = one_line_error(exc, tmp_path / "studies" / "spec.yaml")
    assert "'../spaces/nope.yaml' not found" in msg
    assert str((tmp_path / "spaces" / "nope.yaml").resolve()) in msg


def test_bad_param_in_included_file_names_that_file(tmp_path):
    inc = write(tmp_path / "inc.yaml", "model.dropout: {type: float, low: 0.9, high: 0.1}\n")
    with pytest.raises(SpaceError) as exc:
        load_space({"include": "inc.yaml"}, str(tmp_path / "spec.yaml"))
    msg = one_line_error(exc, inc.resolve())
    assert "space.model.dropout.low" in msg


# ------------------------------------------------------------------------------- conditions & order
def test_condition_cycle_is_an_error():
    params = load_space({
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": {"model.hidden": 64}},
        "model.hidden": {"type": "int", "low": 0, "high": 64, "when": {"model.dropout": 0.1}},
    }, "/x/cyc.yaml")
    with pytest.raises(SpaceError) as exc:
        order_params(params, "/x/cyc.yaml")
    msg = one_line_error(exc, "/x/cyc.yaml")
    assert "condition cycle" in msg
    assert "model.dropout -> model.hidden -> model.dropout" in msg


def test_condition_source_sampled_first_even_if_listed_later():
    space = build_space({
        "scheduler.gamma": SCHED["scheduler.gamma"],
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "scheduler.name": SCHED["scheduler.name"],
    }, TrainConfig(), "inline.yaml")
    paths = space.paths()
    assert paths.index("scheduler.name") < paths.index("scheduler.gamma")
    assert space.conditional() == ["scheduler.gamma"]
    # and sampling honours it: gamma shows up (the base scheduler is 'none', so reading the base would hide it)
    draws = sample_many(space, TrainConfig().to_dict())
    assert any("scheduler.gamma" in d for d in draws)
    for d in draws:
        assert ("scheduler.gamma" in d) == (d["scheduler.name"] == "step"), d


def test_sample_returns_only_active_params():
    space = build_space(SCHED, TrainConfig(), "inline.yaml")
    draws = sample_many(space, TrainConfig().to_dict(), n=30)
    names = [d["scheduler.name"] for d in draws]
    assert set(names) == {"none", "step", "cosine"}  # 30 random draws hit all three
    for d in draws:
        if d["scheduler.name"] == "step":
            assert set(d) == {"scheduler.name", "scheduler.gamma"}
            assert 0.1 <= d["scheduler.gamma"] <= 0.9
        else:
            assert set(d) == {"scheduler.name"}


def test_condition_list_when_sampling():
    spec = {
        "scheduler.name": {"type": "categorical", "choices": ["none", "step", "exponential"]},
        "scheduler.gamma": {"type": "float", "low": 0.1, "high": 0.9,
                            "when": {"scheduler.name": ["step", "exponential"]}},
    }
    draws = sample_many(build_space(spec, TrainConfig(), "inline.yaml"), TrainConfig().to_dict())
    assert {d["scheduler.name"] for d in draws} == {"none", "step", "exponential"}
    for d in draws:
        assert ("scheduler.gamma" in d) == (d["scheduler.name"] != "none"), d


@pytest.mark.parametrize("optimizer, expect_momentum", [("sgd", True), ("adamw", False)])
def test_condition_on_base_value_reads_the_base(optimizer, expect_momentum):
    base = TrainConfig().with_overrides({"optim.name": optimizer})
    space = build_space({
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "optim.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optim.name": "sgd"}},
    }, base, "inline.yaml")
    for d in sample_many(space, base.to_dict(), n=5):
        assert "model.dropout" in d
        assert ("optim.momentum" in d) is expect_momentum


# ---------------------------------------------------------------------------------------- check_space
@pytest.mark.parametrize("path, hint", [
    ("regularization.dropout", "did you mean model.dropout?"),
    ("dropout", "did you mean model.dropout?"),
    ("optim.gamma", "did you mean scheduler.gamma?"),
    ("model.nonexistent_knob", "see models/config.py"),
])
def test_unknown_path(path, hint):
    with pytest.raises(SpaceError) as exc:
        build_space({path: {"type": "float", "low": 0.1, "high": 0.5}}, TrainConfig(), "/s/space.yaml")
    msg = one_line_error(exc, "/s/space.yaml")
    assert f"space.{path}: unknown config path" in msg
    assert hint in msg, msg


@pytest.mark.parametrize("path, spec, fld", [
    ("train.epochs", {"type": "float", "low": 1.0, "high": 5.0}, "space.train.epochs.type"),
    ("model.name", {"type": "float", "low": 0.0, "high": 1.0}, "space.model.name.type"),
    ("model.dropout", {"type": "int", "low": 0, "high": 1}, "space.model.dropout.type"),
])
def test_param_type_must_fit_the_field(path, spec, fld):
    with pytest.raises(SpaceError) as exc:
        build_space({path: spec}, TrainConfig(), "/s/space.yaml")
    msg = one_line_error(exc, "/s/space.yaml")
    assert f"{fld}:" in msg, msg


@pytest.mark.parametrize("path, spec, fld, value", [
    ("model.dropout", {"type": "float", "low": 0.0, "high": 1.0}, "space.model.dropout.high", "1.0"),
    ("optim.lr", {"type": "float", "low": 0.0, "high": 0.1}, "space.optim.lr.low", "0.0"),
    ("train.epochs", {"type": "int", "low": 0, "high": 5}, "space.train.epochs.low", "0"),
    ("model.bn", {"type": "categorical", "choices": ["none", "sideways"]}, "space.model.bn.choices", "'sideways'"),
    ("model.init", {"type": "categorical", "choices": ["default", "he2"]}, "space.model.init.choices", "'he2'"),
])
def test_values_the_config_rejects(path, spec, fld, value):
    with pytest.raises(SpaceError) as exc:
        build_space({path: spec}, TrainConfig(), "/s/space.yaml")
    msg = one_line_error(exc, "/s/space.yaml")
    assert f"{fld}: {value} would be rejected by the config" in msg, msg


def test_when_on_unknown_path():
    spec = {"scheduler.gamma": {"type": "float", "low": 0.1, "high": 0.9, "when": {"sched.name": "step"}}}
    with pytest.raises(SpaceError) as exc:
        build_space(spec, TrainConfig(), "/s/space.yaml")
    msg = one_line_error(exc, "/s/space.yaml")
    assert "space.scheduler.gamma.when" in msg and "'sched.name'" in msg


def test_repo_spaces_check_against_the_default_config():
    root = Path(__file__).resolve().parents[2]
    plus = build_space({"include": "spaces/regularization_plus.yaml"}, TrainConfig(), str(root / "x.yaml"))
    base = build_space({"include": "spaces/regularization.yaml"}, TrainConfig(), str(root / "x.yaml"))
    assert set(base.paths()) < set(plus.paths())
    assert "data.augment" in plus.paths()
    assert set(base.conditional()) == {"scheduler.step_size", "scheduler.gamma", "scheduler.pct_start"}


# ------------------------------------------------------------------------------ input limits (issue 16)
def test_include_outside_the_project_root_is_refused_unless_allowed(tmp_path):
    from regsweep.search.space import project_root

    write(tmp_path / "shared" / "s.yaml", "model.dropout: {type: float, low: 0.0, high: 0.5}\n")
    spec = tmp_path / "proj" / "studies" / "spec.yaml"
    write(tmp_path / "proj" / ".regsweep", "")
    assert project_root(spec.parent) == (tmp_path / "proj").resolve()
    with pytest.raises(SpaceError) as exc:
        load_space({"include": "../../shared/s.yaml"}, str(spec))
    msg = one_line_error(exc, spec)
    assert "space.include: '../../shared/s.yaml' is outside the project root" in msg
    assert str((tmp_path / "proj").resolve()) in msg and "--allow-outside" in msg
    roots = [(tmp_path / "proj").resolve(), (tmp_path / "shared").resolve()]
    assert list(load_space({"include": "../../shared/s.yaml"}, str(spec), roots=roots)) == ["model.dropout"]


def test_nested_include_is_confined_too(tmp_path):
    write(tmp_path / "proj" / "pyproject.toml", "")
    write(tmp_path / "proj" / "a.yaml", "include: ../outside.yaml\n")
    write(tmp_path / "outside.yaml", "model.dropout: {type: float, low: 0.0, high: 0.5}\n")
    with pytest.raises(SpaceError) as exc:
        load_space({"include": "a.yaml"}, str(tmp_path / "proj" / "spec.yaml"))
    msg = one_line_error(exc, tmp_path / "proj" / "a.yaml")
    assert "'../outside.yaml' is outside the project root" in msg


def test_included_file_that_is_no_mapping_is_named_never_quoted(tmp_path):
    write(tmp_path / "notes.yaml", "TOPSECRET-2b first line\n")
    write(tmp_path / "broken.yaml", "TOPSECRET-2b: [\n")
    for name, words in (("notes.yaml", "the document is a str, not a mapping"), ("broken.yaml", "malformed YAML")):
        with pytest.raises(ConfigError) as exc:
            load_space({"include": name}, str(tmp_path / "spec.yaml"))
        msg = str(exc.value)
        assert msg.startswith(str(tmp_path / name)) and words in msg and "TOPSECRET" not in msg, msg


def test_long_values_in_a_space_are_echoed_as_an_excerpt():
    for spec, fld in (({"type": "float", "low": "x" * 100_000, "high": 1}, "space.model.dropout.low"),
                      ({"type": "categorical", "choices": [["y"] * 100_000]}, "space.model.dropout.choices")):
        with pytest.raises(SpaceError) as exc:
            load_space({"model.dropout": spec}, "/x/inline.yaml")
        msg = one_line_error(exc, "/x/inline.yaml")
        assert f": {fld}:" in msg and len(msg) < 400, msg[:500]


# ------------------------------------------------------------------- issue 16: when values against the choices
@pytest.mark.parametrize("when, fragment", [
    ({"model.bn": "batch"}, "'batch' is not allowed; model.bn is a space param that never takes it"),
    ({"model.bn": ["before_act", "after"]}, "'after' is not allowed"),
    ({"model.hidden": 1000}, "1000 is not allowed; model.hidden is a space param"),
    ({"model.hidden": 32.5}, "32.5 is not allowed"),
])
def test_when_value_the_conditioning_param_never_takes(when, fragment):
    """Before: accepted, and the param was never sampled."""
    spec = {"model.bn": {"type": "categorical", "choices": ["none", "before_act"]},
            "model.hidden": {"type": "int", "low": 16, "high": 128},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": when}}
    with pytest.raises(SpaceError) as exc:
        build_space(spec, TrainConfig(), "inline.yaml")
    msg = one_line_error(exc, "inline.yaml")
    assert f"space.model.dropout.when.{next(iter(when))}" in msg and fragment in msg, msg
    spec["model.dropout"]["when"] = {"model.bn": "before_act", "model.hidden": 64}
    build_space(spec, TrainConfig(), "inline.yaml")
