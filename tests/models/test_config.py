"""models/config.py: TrainConfig round-trips (plain dict, YAML, file), overrides and one-line errors.

Registry names (model/init/activation/data/optim/scheduler) are checked by models/build.py's check_names, which
every loader path calls; their cases below go through it, with the same one-line messages as before.
"""

from __future__ import annotations

import pytest

from regsweep.models.build import REGISTRIES, check_names, load_config
from regsweep.models.cnn import MODELS
from regsweep.models.config import BN_PLACEMENTS, NAMED_FIELDS, ConfigError, TrainConfig, load_yaml_text
from regsweep.models.data import DATASETS
from regsweep.models.init import INITS
from regsweep.models.optim import OPTIMIZERS
from regsweep.models.resnet import ResNet  # noqa: F401  (registers resnet18/resnet20 in MODELS)
from regsweep.models.schedulers import SCHEDULERS

# Every field differs from its default, every type (list, Optional, nested section) is exercised.
CUSTOM = {
    "model": {"name": "resnet20", "widths": [8, 16, 32], "hidden": 12, "dropout": 0.25, "bn": "after_act",
              "init": "kaiming_normal", "activation": "gelu",
              "args": {"depth": 3, "block": {"width": 2.5, "norm": None, "kind": "gn"}, "tags": ["a", 1, True]}},
    "data": {"name": "synthetic", "root": "/tmp/some data", "val_fraction": 0.15, "test_fraction": 0.1,
             "split_seed": 7, "batch_size": 32, "augment": True, "num_workers": 1, "download": True,
             "n_samples": 123, "shape": [3, 16, 12], "num_classes": 4, "label_noise": 0.05,
             "args": {"fold": 1, "names": ["a", "b"]}, "train_fraction": 0.5, "residency": "stream",
             "memory_budget_mb": 512.0},
    "optim": {"name": "sgd", "lr": 3e-4, "momentum": 0.85, "nesterov": True, "betas": [0.8, 0.95],
              "weight_decay": 5e-4},
    "regularization": {"l1": 1e-5, "l2": 2.5e-6, "label_smoothing": 0.1, "mixup_alpha": 0.2,
                       "cutmix_alpha": 1.0, "mix_prob": 0.5, "input_noise_std": 0.01},
    "scheduler": {"name": "onecycle", "step_size": 3, "gamma": 0.5, "milestones": [5, 9], "eta_min": 1e-6,
                  "warmup_epochs": 2, "factor": 0.2, "patience": 1, "max_lr": 0.1, "pct_start": 0.25},
    "train": {"epochs": 3, "seed": 11, "num_threads": 2, "deterministic": False,
              "early_stopping": {"monitor": "val_acc", "patience": 4, "min_delta": 1e-3, "restore_best": False},
              "precision": "bf16", "channels_last": True, "compile": True, "train_eval_size": 256},
}


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "args":  # data.args is one free-form leaf
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _assert_plain(obj):
    if isinstance(obj, dict):
        assert all(isinstance(k, str) for k in obj)
        for v in obj.values():
            _assert_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_plain(v)
    else:
        assert obj is None or type(obj) in (str, int, float, bool), f"not plain: {obj!r}"


def _same_leaves(a: dict, b: dict):
    """Equal values AND equal types (1.0 must stay a float, 2 an int)."""
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    assert la == lb
    for key in la:
        assert type(la[key]) is type(lb[key]), key


@pytest.fixture
def custom() -> TrainConfig:
    cfg = TrainConfig.from_dict(CUSTOM)
    default = dict(_leaves(TrainConfig().to_dict()))  # model.args ({}) has no leaves
    leaves = dict(_leaves(cfg.to_dict()))
    assert all(leaves[p] != v for p, v in default.items()), "CUSTOM should change every field"
    assert cfg.model.args != TrainConfig().model.args
    return cfg


# ----------------------------------------------------------------------------------- round trips
def test_dict_round_trip_is_exact(custom):
    data = custom.to_dict()
    _assert_plain(data)
    assert data == CUSTOM
    again = TrainConfig.from_dict(data)
    assert again == custom
    _same_leaves(again.to_dict(), data)


def test_to_dict_is_a_copy(custom):
    data = custom.to_dict()
    data["model"]["widths"].append(64)
    data["train"]["early_stopping"]["patience"] = 99
    assert custom.model.widths == [8, 16, 32]
    assert custom.train.early_stopping.patience == 4


@pytest.mark.parametrize("which", ["default", "custom"])
def test_yaml_round_trip_is_exact(which, custom):
    cfg = TrainConfig() if which == "default" else custom
    text = cfg.to_yaml()
    again = TrainConfig.from_yaml(text)
    assert again == cfg
    _same_leaves(again.to_dict(), cfg.to_dict())


def test_save_load_round_trip(tmp_path, custom):
    path = tmp_path / "cfg.yaml"
    custom.save(path)
    assert TrainConfig.load(path) == custom


def test_yaml_round_trip_of_float_looking_string():
    cfg = TrainConfig.from_dict({"data": {"root": "1e5"}})
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg


def test_yaml_exponent_without_dot_is_float():
    cfg = TrainConfig.from_yaml("regularization:\n  l1: 1e-5\n  l2: 2E-3\noptim:\n  lr: 1e-2\n")
    assert cfg.regularization.l1 == 1e-5 and type(cfg.regularization.l1) is float
    assert cfg.regularization.l2 == 2e-3 and type(cfg.regularization.l2) is float
    assert cfg.optim.lr == 1e-2
    assert load_yaml_text("x: 1e-5\ny: 10\nz: '1e-5'") == {"x": 1e-5, "y": 10, "z": "1e-5"}
    assert type(load_yaml_text("y: 10")["y"]) is int


def test_empty_mapping_and_none_give_defaults():
    assert TrainConfig.from_dict({}) == TrainConfig()
    assert TrainConfig.from_dict(None) == TrainConfig()
    assert TrainConfig.from_yaml("") == TrainConfig()


# ----------------------------------------------------------------------------------- overrides
def test_with_overrides_returns_new_validated_config():
    cfg = TrainConfig()
    before = cfg.to_dict()
    new = cfg.with_overrides({"model.dropout": 0.3, "regularization.l1": 1e-5})
    assert new is not cfg
    assert new.model.dropout == 0.3
    assert new.regularization.l1 == 1e-5
    assert cfg.to_dict() == before  # original untouched
    expected = TrainConfig().to_dict()
    expected["model"]["dropout"] = 0.3
    expected["regularization"]["l1"] = 1e-5
    assert new.to_dict() == expected


def test_with_overrides_coerces_and_copies_values():
    widths = [4, 8]
    new = TrainConfig().with_overrides({"model.widths": widths, "optim.lr": 1, "train.early_stopping.patience": 3})
    widths.append(16)
    assert new.model.widths == [4, 8]
    assert new.optim.lr == 1.0 and type(new.optim.lr) is float
    assert new.train.early_stopping.patience == 3


def test_with_overrides_validates():
    with pytest.raises(ConfigError, match=r"model\.dropout") as err:
        TrainConfig().with_overrides({"model.dropout": 1.5})
    assert "1.5" in str(err.value)


@pytest.mark.parametrize("path", ["model.dropuot", "modle.dropout", "model.dropout.p", "train.early_stopping.x"])
def test_with_overrides_unknown_path(path):
    cfg = TrainConfig()
    with pytest.raises(ConfigError) as err:
        cfg.with_overrides({path: 0.1})
    msg = str(err.value)
    assert path in msg and "\n" not in msg
    assert cfg == TrainConfig()


# ----------------------------------------------------------------------------------- bad values
# (id, data, dotted path, text of the bad value, texts naming what is allowed)
BAD = [
    ("dropout_one", {"model": {"dropout": 1.0}}, "model.dropout", "1.0", ["[0, 1)"]),
    ("dropout_negative", {"model": {"dropout": -0.1}}, "model.dropout", "-0.1", ["[0, 1)"]),
    ("l1_negative", {"regularization": {"l1": -1e-3}}, "regularization.l1", "-0.001", [">= 0"]),
    ("l2_negative", {"regularization": {"l2": -0.5}}, "regularization.l2", "-0.5", [">= 0"]),
    ("weight_decay_negative", {"optim": {"weight_decay": -0.25}}, "optim.weight_decay", "-0.25", [">= 0"]),
    ("lr_zero", {"optim": {"lr": 0.0}}, "optim.lr", "0.0", ["> 0"]),
    ("lr_negative", {"optim": {"lr": -0.125}}, "optim.lr", "-0.125", ["> 0"]),
    ("epochs_zero", {"train": {"epochs": 0}}, "train.epochs", ": 0 ", [">= 1"]),
    ("epochs_negative", {"train": {"epochs": -3}}, "train.epochs", "-3", [">= 1"]),
    ("model_name", {"model": {"name": "vgg99"}}, "model.name", "'vgg99'", ["cnn", "resnet18", "resnet20"]),
    ("init_name", {"model": {"init": "he2"}}, "model.init", "'he2'", list(INITS.names())),
    ("optimizer_name", {"optim": {"name": "lion"}}, "optim.name", "'lion'", list(OPTIMIZERS.names())),
    ("scheduler_name", {"scheduler": {"name": "cyclic"}}, "scheduler.name", "'cyclic'",
     list(SCHEDULERS.names())),
    ("dataset_name", {"data": {"name": "imagenet99"}}, "data.name", "'imagenet99'", list(DATASETS.names())),
    ("bn_name", {"model": {"bn": "middle"}}, "model.bn", "'middle'", list(BN_PLACEMENTS)),
    ("unknown_key", {"model": {"dropuot": 0.3}}, "model.dropuot", "dropuot",
     ["name", "widths", "dropout", "bn", "init"]),
    ("unknown_section", {"modle": {}}, "modle", "modle", ["model", "data", "optim", "regularization"]),
    ("unknown_nested_key", {"train": {"early_stopping": {"patients": 3}}}, "train.early_stopping.patients",
     "patients", ["patience", "monitor"]),
    ("epochs_type", {"train": {"epochs": "ten"}}, "train.epochs", "'ten'", ["int"]),
    ("bn_type", {"model": {"bn": 3}}, "model.bn", "3", ["str"]),
    ("widths_type", {"model": {"widths": 32}}, "model.widths", "32", ["list of int"]),
    ("section_type", {"optim": "adam"}, "optim", "'adam'", ["mapping"]),
    ("fractions_sum", {"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "data.test_fraction", "0.5",
     ["val_fraction", "< 1"]),
    ("resnet18_three_widths", {"model": {"name": "resnet18", "widths": [4, 4, 4]}}, "model.widths",
     "[4, 4, 4]", ["4 stages", "4 widths"]),
]


@pytest.mark.parametrize("data,path,value,allowed", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_value_names_path_value_and_allowed(data, path, value, allowed):
    """Structure and ranges fail in TrainConfig.from_dict; registry names and stage counts in check_names."""
    with pytest.raises(ConfigError) as err:
        check_names(TrainConfig.from_dict(data))
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}:"), msg
    assert value in msg, msg
    for text in allowed:
        assert text in msg, msg


def test_registry_error_lists_every_choice():
    names = MODELS.names()
    assert {"cnn", "resnet18", "resnet20"} <= set(names)
    with pytest.raises(ConfigError) as err:
        check_names(TrainConfig.from_dict({"model": {"name": "vgg99"}}))
    assert f"choose one of: {', '.join(names)}" in str(err.value)


NAME_CASES = [b for b in BAD if b[2] in NAMED_FIELDS or b[0] == "resnet18_three_widths"]


@pytest.mark.parametrize("data,path,value,allowed", [b[1:] for b in NAME_CASES], ids=[b[0] for b in NAME_CASES])
def test_the_schema_leaves_registry_names_to_check_names(data, path, value, allowed):
    cfg = TrainConfig.from_dict(data)  # the schema layer knows no registry
    with pytest.raises(ConfigError, match=rf"^{path}: "):
        check_names(cfg)


def test_every_named_field_has_a_registry():
    assert set(REGISTRIES) == set(NAMED_FIELDS)


@pytest.mark.parametrize("text,path,value", [
    ("model:\n  name: vgg99\n", "model.name", "'vgg99'"),
    ("model:\n  activation: swish9\n", "model.activation", "'swish9'"),
    ("data:\n  name: imagenet99\n", "data.name", "'imagenet99'"),
])
def test_load_config_names_the_file_path_value_and_choices(tmp_path, text, path, value):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file)
    msg = str(err.value)
    assert msg.startswith(f"{cfg_file}: {path}: {value} is not allowed; choose one of: ") and "\n" not in msg


# ----------------------------------------------------------------------------------- YAML / files
@pytest.mark.parametrize("text", ["model: [1, 2", "model:\n  dropout: 0.1\n bad: 2\n", "a: b: c\n"])
def test_malformed_yaml_names_the_source(text):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(text, source="studies/cfg.yaml")
    msg = str(err.value)
    assert msg.startswith("studies/cfg.yaml:"), msg
    assert "malformed YAML" in msg and "line" in msg
    assert "\n" not in msg


def test_yaml_that_is_not_a_mapping():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml("- a\n- b\n", source="list.yaml")
    msg = str(err.value)
    assert msg.startswith("list.yaml:") and "mapping" in msg and "\n" not in msg


def test_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "missing.yaml"
    with pytest.raises(ConfigError) as err:
        TrainConfig.load(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_load_bad_file_names_the_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: ten\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        TrainConfig.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: train.epochs:") and "'ten'" in msg



# ------------------------------------------------------------------------------ input limits (issue 16)
def alias_bomb(levels: int = 9, width: int = 9, indent: str = "") -> str:
    """Under 1 KB of YAML that names width**levels values (9**9: 387 million) through aliases."""
    lines = [f"{indent}l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_excerpt_is_the_repr_when_short_and_a_cut_with_the_size_when_long():
    from regsweep.models.config import excerpt

    for value in ("ab", "it's", 1.5, None, True, [1, (2,)], {"a": [1, 2]}, (), b"xy"):
        assert excerpt(value) == repr(value)
    assert excerpt("a" * 50_000) == "'" + "a" * 79 + "... (50,000 chars)"
    big = list(range(10_000))
    cut = excerpt(big, limit=30)
    assert cut.startswith(repr(big)[:30]) and cut.endswith(f"... ({len(repr(big)):,} chars)")
    loop = [1]
    loop.append(loop)  # YAML can build a recursive value: never an endless repr
    assert excerpt(loop) == "[1, [...]]"
    shared = ["x"] * 9
    for _ in range(8):  # the alias bomb's shape built in Python: 387 million items, never expanded
        shared = [shared] * 9
    assert excerpt(shared).endswith("... (more than 100,000 chars)") and len(excerpt(shared)) < 120


def test_a_long_path_keeps_its_end_in_an_error():
    from regsweep.models.yamlio import path_excerpt

    assert path_excerpt("/a/b") == "'/a/b'"
    long = "/tmp/" + "d" * 200 + "/case/nope"
    cut = path_excerpt(long)
    assert cut.endswith("/case/nope' (215 chars)") and len(cut) < 100  # the part the user named survives


def test_alias_bomb_is_refused_while_composing():
    text = alias_bomb()
    assert len(text) < 1024
    with pytest.raises(ConfigError) as err:
        load_yaml_text(text, "bomb.yaml")
    msg = str(err.value)
    assert msg.startswith("bomb.yaml: line ") and "alias" in msg and "100,000" in msg and len(msg) < 200


def test_aliases_within_the_budget_and_merge_keys_still_load():
    assert load_yaml_text(alias_bomb(levels=4, width=9), "ok.yaml")["l3"][0][0][0] == ["x"] * 9
    data = load_yaml_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n", "merge.yaml")
    assert data["b"] == {"x": 1, "y": 3}  # a merge key's override is not a duplicate


def test_recursive_alias_is_refused():
    with pytest.raises(ConfigError) as err:
        load_yaml_text("a: &a [1, *a]\n", "rec.yaml")
    assert str(err.value).startswith("rec.yaml: line 1: alias *a is inside the node it names")


@pytest.mark.parametrize("text, line, key", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", 3, "'lr'"),
    ("train: {epochs: 1, epochs: 2}\n", 1, "'epochs'"),
    ("model: {}\ndata: {}\nmodel: {}\n", 3, "'model'"),
])
def test_duplicate_keys_are_an_error_naming_file_line_and_key(text, line, key):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(text, source="dup.yaml")
    msg = str(err.value)
    assert msg.startswith(f"dup.yaml: line {line}: duplicate key {key} (first on line "), msg
    assert "\n" not in msg


def test_oversized_text_and_file_are_refused_before_parsing(tmp_path):
    from regsweep.models.yamlio import MAX_FILE_BYTES, load_yaml_file

    big = tmp_path / "big.yaml"
    big.write_text("description: '" + "x" * MAX_FILE_BYTES + "'\n")
    with pytest.raises(ConfigError) as err:
        load_yaml_file(big)
    msg = str(err.value)
    assert msg.startswith(f"{big}: ") and f"{MAX_FILE_BYTES:,}" in msg and len(msg) < 300
    with pytest.raises(ConfigError) as err:
        load_yaml_text("x" * (MAX_FILE_BYTES + 1), "text.yaml")
    assert str(err.value).startswith("text.yaml: ") and len(str(err.value)) < 200


def test_files_that_are_not_yaml_text_are_one_line(tmp_path):
    import os

    from regsweep.models.config import load_yaml_file

    (tmp_path / "latin1.yaml").write_bytes(b"model: {name: caf\xe9}\n")
    os.mkfifo(tmp_path / "fifo.yaml")  # never opened: reading it would block
    cases = {tmp_path / "latin1.yaml": "not UTF-8", tmp_path: "is a directory", tmp_path / "fifo.yaml":
             "not a regular file", tmp_path / "missing.yaml": "no such file"}
    for path, words in cases.items():
        with pytest.raises(ConfigError) as err:
            load_yaml_file(path)
        assert str(err.value).startswith(f"{path}: ") and words in str(err.value), str(err.value)


def test_huge_values_are_echoed_as_an_excerpt():
    for data, fld in (({"model": {"dropout": "x" * 100_000}}, "model.dropout"),
                      ({"model": {"widths": list(range(100_000))}}, "model.widths"),
                      ({"train": "y" * 100_000}, "train"),
                      ({"k" * 100_000: 1}, "kkkk")):
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_dict(data)
        msg = str(err.value)
        assert msg.startswith(fld) and len(msg) < 400, msg[:500]


def test_epochs_have_a_sane_bound():
    """Before: 10**9 epochs was accepted."""
    with pytest.raises(ConfigError, match=r"train.epochs: 1000000000 is not allowed; must be <= 100000"):
        TrainConfig.from_dict({"train": {"epochs": 10 ** 9}})
    assert TrainConfig.from_dict({"train": {"epochs": 100_000}}).train.epochs == 100_000
