"""models/script.py: the source transformations, and the generated script against regsweep's own training over
every registry entry (models, inits, BN placements, activations, optimizers, schedulers, regularisers), 2 epochs
each on tiny synthetic data, in this process (the subprocess runs without regsweep are in
tests/search/test_export_python.py)."""

from __future__ import annotations

import ast
import json
import sys
import textwrap
import types

import pytest
import torch

from regsweep.models.build import REGISTRIES
from regsweep.models.config import TrainConfig
from regsweep.models.script import (
    ScriptError,
    decide,
    drop_calls,
    flatten_module_attrs,
    fold,
    free_names,
    render_script,
    render_snippet,
    value_origins,
)
from regsweep.models.train import train

# ------------------------------------------------------------------------------------------ transformations
TRAIN_LIKE = textwrap.dedent('''\
    def train(cfg, parts=None, state=None, checkpoint=None):
        dev = resolve(cfg) if parts is None else parts.device
        net = compile_model(model) if cfg.compile else model
        if state is not None:
            first = restore(state)
        for epoch in range(3):
            step()
            if checkpoint is not None and epoch + 1 < 3:
                checkpoint(save())
        if state is None:
            # a comment kept with its branch
            fresh()
        else:
            resumed()
        return net
    ''')


def test_fold_keeps_the_taken_branches_only():
    text, folded = fold(TRAIN_LIKE, {"state": None, "checkpoint": None, "parts": None, "cfg.compile": False})
    assert text == textwrap.dedent('''\
        def train(cfg, parts=None, state=None, checkpoint=None):
            dev = resolve(cfg)
            net = model
            for epoch in range(3):
                step()
            # a comment kept with its branch
            fresh()
            return net
        ''')
    assert "state is not None -> False" in folded and "checkpoint is not None and epoch + 1 < 3 -> False" in folded
    ast.parse(text)


def test_fold_leaves_pass_in_an_emptied_block_and_refuses_elif():
    text, _ = fold("for i in x:\n    if flag:\n        y()\n", {"flag": False})
    assert text == "for i in x:\n    pass\n"
    with pytest.raises(ScriptError, match="elif"):
        fold("if a:\n    x()\nelif b:\n    y()\n", {"a": False})


@pytest.mark.parametrize("expr, known, value", [
    ("a is None", {"a": None}, True), ("a is not None", {"a": None}, False), ("not a.b", {"a.b": False}, True),
    ("a is None and b", {"a": 1}, False), ("a or b", {"b": True}, True), ("a or b", {"b": False}, "unknown"),
    ("x == 2", {"x": 2}, True), ("f(a)", {"a": None}, "unknown"),
])
def test_decide(expr, known, value):
    got = decide(ast.parse(expr, mode="eval").body, known)
    assert (type(got).__name__ == "_Unknown") if value == "unknown" else got == value


def test_drop_calls_and_flatten_module_attrs():
    text, dropped = drop_calls("def f(cfg):\n    check_names(cfg)\n    return g(cfg)\n", ("check_names",))
    assert text == "def f(cfg):\n    return g(cfg)\n" and dropped == ["check_names(cfg)"]
    text, used = flatten_module_attrs("x = dm.load(dm.Split(1))\n", {"dm": "regsweep.models.data"})
    assert text == "x = load(Split(1))\n" and sorted(used) == [("regsweep.models.data", "Split"),
                                                              ("regsweep.models.data", "load")]
    with pytest.raises(ScriptError, match="other than"):
        flatten_module_attrs("y = dm\n", {"dm": "regsweep.models.data"})


def test_free_names_split_runtime_and_annotation_names():
    source = "def f(a: Foo, b=DEFAULT) -> Bar:\n    x: Baz = g(a)\n    return [h(y) for y in x]\n"
    runtime, annotated = free_names(source)
    assert runtime == {"DEFAULT", "g", "h"} and annotated == {"Foo", "Bar", "Baz"}


# ------------------------------------------------------------------------------------------------ the matrix
def _cfg(i: int) -> TrainConfig:
    """Case i takes the i-th entry (cyclically) of every registry and of the regulariser list: 8 cases cover all."""
    models = [("cnn", [4, 8]), ("resnet20", [4, 4, 8]), ("resnet18", [4, 4, 4, 4])]
    inits, bns = REGISTRIES["model.init"].names(), ["none", "before_act", "after_act"]
    acts, optims = REGISTRIES["model.activation"].names(), REGISTRIES["optim.name"].names()
    scheds = REGISTRIES["scheduler.name"].names()
    regs = [
        {"regularization": {"l1": 1e-4, "l2": 1e-3}, "optim": {"weight_decay": 1e-2}},
        {"regularization": {"label_smoothing": 0.1, "mixup_alpha": 0.4}},
        {"regularization": {"cutmix_alpha": 1.0}, "data": {"augment": True}},
        {"regularization": {"mixup_alpha": 0.2, "cutmix_alpha": 0.5, "mix_prob": 0.5}},
        {"regularization": {"input_noise_std": 0.1}, "data": {"label_noise": 0.1}, "model": {"hidden": 8}},
        {"train": {"early_stopping": {"patience": 1, "monitor": "val_acc", "restore_best": True}}},
        {"optim": {"nesterov": True, "weight_decay": 1e-3}, "regularization": {"l2": 1e-4}},
        {"model": {"dropout": 0.0}, "train": {"early_stopping": {"restore_best": False}}},
    ]
    name, widths = models[i % 3]
    data = {"model": {"name": name, "widths": widths, "init": inits[i % len(inits)], "bn": bns[i % 3],
                      "activation": acts[i % len(acts)], "dropout": 0.2},
            "data": {"name": "synthetic", "n_samples": 96, "shape": [2, 8, 8], "num_classes": 4, "batch_size": 32},
            "optim": {"name": optims[i % len(optims)], "lr": 0.01},
            "scheduler": {"name": scheds[i % len(scheds)], "step_size": 1, "milestones": [1], "warmup_epochs": 1},
            "train": {"epochs": 2, "num_threads": 1, "train_eval_size": 32, "seed": i}}
    for section, values in regs[i % len(regs)].items():
        for key, value in values.items():
            if isinstance(value, dict):
                data[section] = {**data.get(section, {}), key: {**data.get(section, {}).get(key, {}), **value}}
            else:
                data.setdefault(section, {})[key] = value
    return TrainConfig.from_dict(data)


CASES = 8


def test_the_matrix_covers_every_registry_entry():
    cfgs = [_cfg(i) for i in range(CASES)]
    for path in ("model.name", "model.init", "model.activation", "optim.name", "scheduler.name"):
        section, key = path.split(".")
        assert {getattr(getattr(c, section), key) for c in cfgs} == set(REGISTRIES[path].names()), path
    assert {c.model.bn for c in cfgs} == {"none", "before_act", "after_act"}
    r = [c.regularization for c in cfgs]
    assert all(any(getattr(x, k) > 0 for x in r) for k in ("l1", "l2", "label_smoothing", "mixup_alpha",
                                                           "cutmix_alpha", "input_noise_std"))
    assert any(x.mix_prob < 1 for x in r) and any(c.optim.weight_decay > 0 for c in cfgs)


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def run_script(text: str) -> list[dict]:
    """Execute the generated script's code in a fresh namespace and train its CONFIG (no subprocess)."""
    module = types.ModuleType("exported_script")  # @dataclass looks its module up in sys.modules
    sys.modules[module.__name__] = module
    try:
        exec(compile(text, "train_best.py", "exec"), module.__dict__)
        ns = module.__dict__
        _, hist = ns["train"](ns["namespace"](ns["CONFIG"]), "cpu")
    finally:
        del sys.modules[module.__name__]
    return hist


def without_seconds(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in epochs]


@pytest.mark.parametrize("i", range(CASES))
def test_the_script_trains_exactly_as_regsweep(i, threads):
    cfg = _cfg(i)
    text = render_script(cfg, ["a test script"], value_origins(cfg, {}, None))
    imports = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in imports for a in n.names] + [n.module or "" for n in imports
                                                          if isinstance(n, ast.ImportFrom)]
    assert not any(name.startswith("regsweep") for name in names), names
    _, ours = train(cfg, "cpu")
    theirs = run_script(text)
    assert without_seconds(theirs.epochs) == without_seconds(ours.epochs)
    assert (theirs.best_epoch, theirs.stop_reason, theirs.test) == (ours.best_epoch, ours.stop_reason, ours.test)


@pytest.mark.parametrize("dataset", ["digits", "mnist", "fashion_mnist", "cifar10", "image_folder"])
def test_every_dataset_writes_a_script_that_compiles(dataset):
    cfg = TrainConfig.from_dict({"data": {"name": dataset, "root": "data", "shape": [3, 8, 8]}})
    text = render_script(cfg, ["x"], value_origins(cfg, {}, None))
    compile(text, "train_best.py", "exec")
    assert "regsweep" not in "".join(line for line in text.splitlines() if line.startswith(("import", "from")))


def test_only_the_configs_registry_entries_are_in_the_script():
    cfg = TrainConfig.from_dict({"model": {"name": "cnn"}, "optim": {"name": "adamw"}})
    text = render_script(cfg, ["x"], value_origins(cfg, {}, None))
    assert "class CNN" in text and "class ResNet" not in text and "class SGDW" not in text
    assert 'ACTIVATIONS.add("relu"' in text and 'ACTIVATIONS.add("gelu"' not in text
    assert "def _restore" not in text and "def compile_model" not in text and "check_names" not in text.split(
        "CONFIG = {")[1].replace("# dropped (regsweep.models.script.drop_calls): check_names(cfg)", "")


USER_MODULE = '''from torch import nn


def widenet(in_shape, num_classes, width: int = 4, dropout: float = 0.0):
    return nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1), nn.ReLU(), nn.Dropout2d(dropout),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def tensors(n: int = 64):
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(torch.rand(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1), y), None
'''


def test_a_user_model_and_dataset_by_import_path_are_imported_from_the_recorded_folder(tmp_path, monkeypatch,
                                                                                         threads):
    """The script keeps regsweep's import-path loading, its registries hold no built-in entry, and main()'s
    add_search_path appends USER_CODE_DIRS (never prepends); it trains exactly as regsweep; rendering it imports
    nothing of the user's."""
    (tmp_path / "scriptnets.py").write_text(USER_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "scriptnets", raising=False)
    cfg = TrainConfig.from_dict({"model": {"name": "scriptnets:widenet", "args": {"width": 6}, "dropout": 0.1},
                                 "data": {"name": "scriptnets:tensors", "args": {"n": 64}, "batch_size": 16},
                                 "train": {"epochs": 2, "num_threads": 1, "train_eval_size": 16}})
    text = render_script(cfg, ["x"], value_origins(cfg, {}, None), code_dirs=[str(tmp_path)])
    assert "scriptnets" not in sys.modules and str(tmp_path) not in sys.path
    assert f"USER_CODE_DIRS = [{json.dumps(str(tmp_path))}]" in text and "class CNN" not in text
    assert "model.name 'scriptnets:widenet', data.name 'scriptnets:tensors'" in text
    module = types.ModuleType("exported_script")
    sys.modules[module.__name__] = module
    try:
        exec(compile(text, "train_best.py", "exec"), module.__dict__)
        ns = module.__dict__
        ns["add_search_path"](ns["USER_CODE_DIRS"])  # what main() does first
        assert sys.path[-1] == str(tmp_path)
        _, theirs = ns["train"](ns["namespace"](ns["CONFIG"]), "cpu")
    finally:
        del sys.modules[module.__name__]
    _, ours = train(cfg, "cpu")
    assert without_seconds(theirs.epochs) == without_seconds(ours.epochs) and theirs.n_params == ours.n_params


def test_the_snippet_names_the_public_api_and_the_values():
    cfg = _cfg(6)
    text = render_snippet(cfg, ["header"])
    assert "from regsweep.models import init_weights, make_optimizer, make_scheduler, penalty" in text
    assert f"name={cfg.optim.name!r}" in text and f"l2={cfg.regularization.l2!r}" in text
    assert len(text.splitlines()) <= 30
