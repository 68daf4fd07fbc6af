"""Models by import path and by installed entry point (issue 18): the factory contract (keyword arguments only:
in_shape/num_classes and the model knobs when the signature names them, model.args always), the checks of
model.args and of knobs a factory does not take, validate's dry build, and every regularisation knob on a model
that is not the built-in CNN. The user code lives in a temporary folder, outside the package; each test gives its
module a unique name (a module, once imported, stays in sys.modules)."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

from regsweep.models.build import build, check_model, check_names, load_config, make_model, model_factory
from regsweep.models.config import ConfigError, TrainConfig
from regsweep.models.train import fit

NETS = '''
import torch
from torch import nn

CALLS = []


class GNNet(nn.Module):
    """Conv -> GroupNorm -> SiLU blocks (`depth` of them), global pooling: not a variant of the built-in CNN."""

    def __init__(self, in_shape, num_classes, depth: int = 1, width: int = 8, dropout: float = 0.0):
        super().__init__()
        CALLS.append(dict(in_shape=in_shape, num_classes=num_classes, depth=depth, width=width, dropout=dropout))
        layers, c = [], in_shape[0]
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(2, width), nn.SiLU(), nn.Dropout2d(dropout)]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(c), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


def mlp(num_classes, hidden: int = 0, bn: str = "none", **extra):
    """A factory function: takes num_classes (not in_shape), hidden and bn, and any **extra."""
    CALLS.append(dict(num_classes=num_classes, hidden=hidden, bn=bn, **extra))
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(max(hidden, 4)), nn.ReLU(), nn.Linear(max(hidden, 4), num_classes))


def needs(num_classes, depth):
    return nn.Linear(1, num_classes)


def raises(num_classes):
    raise ValueError("width must be even")


def not_a_module(num_classes):
    return {"weights": 1}


def wrong_logits(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], 3))
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A user module (unique name) in a temporary folder, not yet on sys.path; yields (folder, module name)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # what load_ref appends is dropped after the test
    name = f"user_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(NETS)
    yield tmp_path, name
    sys.modules.pop(name, None)


def _cfg(name: str, **model) -> TrainConfig:
    return TrainConfig.from_dict({"model": {"name": name, **model}, "data": {"name": "digits", "batch_size": 64},
                                  "train": {"epochs": 1, "num_threads": 1, "train_eval_size": 64}})


def test_a_class_gets_in_shape_num_classes_its_knobs_and_model_args(nets):
    folder, mod = nets
    cfg = _cfg(f"{mod}:GNNet", dropout=0.2, args={"depth": 2, "width": 4})
    check_names(cfg, base_dir=folder)  # appends the folder to sys.path (never prepends) and imports it
    assert sys.path[-1] == str(folder.resolve()) and str(folder.resolve()) not in sys.path[:-1]
    model = make_model(cfg, (1, 8, 8), 10)
    assert sys.modules[mod].CALLS[-1] == dict(in_shape=(1, 8, 8), num_classes=10, depth=2, width=4, dropout=0.2)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert not (folder / "__pycache__").exists()  # importing user code writes nothing into its folder


def test_a_factory_function_gets_only_what_its_signature_names(nets):
    folder, mod = nets
    cfg = _cfg(f"{mod}:mlp", hidden=6, bn="before_act", args={"extra_flag": True})
    check_names(cfg, base_dir=folder)
    make_model(cfg, (1, 8, 8), 10)
    assert sys.modules[mod].CALLS[-1] == dict(num_classes=10, hidden=6, bn="before_act", extra_flag=True)


@pytest.mark.parametrize("model, expect", [
    ({"name": "GNNet", "bn": "before_act"}, "model.bn: 'before_act' is not allowed; {m}:GNNet does not take bn"),
    ({"name": "GNNet", "activation": "gelu"}, "model.activation: 'gelu' is not allowed; {m}:GNNet does not take"),
    ({"name": "GNNet", "args": {"depht": 2}}, "model.args.depht: 2 is not allowed; {m}:GNNet takes: in_shape, "
                                               "num_classes, depth, width, dropout"),
    ({"name": "GNNet", "args": {"depth": "deep"}}, "model.args.depth: 'deep' is not allowed; {m}:GNNet's depth is int"),
    ({"name": "GNNet", "args": {"dropout": 0.1}}, "model.args.dropout: 0.1 is not allowed; dropout comes from "
                                                  "model.dropout"),
    ({"name": "needs"}, "model.args: {{}} is not allowed; {m}:needs needs depth: give model.args.depth"),
    ({"name": "Nope"}, "model.name: '{m}:Nope' is not allowed; {m} has no attribute 'Nope'"),
])
def test_model_args_and_knobs_are_checked_against_the_signature(nets, model, expect):
    folder, mod = nets
    with pytest.raises(ConfigError) as err:
        check_names(_cfg(f"{mod}:{model.pop('name')}", **model), "cfg.yaml", base_dir=folder)
    assert str(err.value).startswith("cfg.yaml: " + expect.format(m=mod)), str(err.value)


def test_builtin_models_take_no_args_and_are_built_as_before():
    with pytest.raises(ConfigError, match=r"model.args: \{'depth': 2\} is not allowed; the built-in model cnn takes "
                                          "no args"):
        check_names(_cfg("cnn", args={"depth": 2}))
    assert TrainConfig().model.args == {}
    with pytest.raises(ConfigError, match="model.args.bad-key: 'bad-key' is not a keyword argument name"):
        TrainConfig().with_overrides({"model.args.bad-key": 1})
    assert TrainConfig().with_overrides({"model.args.depth": 3}).model.args == {"depth": 3}  # a free key


@pytest.mark.parametrize("factory, expect", [
    ("raises", "is not allowed; calling it with (num_classes=10) raised ValueError: width must be even"),
    ("not_a_module", "is not allowed; it returned a dict, not a torch.nn.Module"),
    ("wrong_logits", "on one zero batch of shape [1, 1, 8, 8] it returned [1, 3]; expected logits of shape [1, 10]"),
])
def test_the_dry_build_finds_a_factory_that_fails(nets, factory, expect):
    folder, mod = nets
    cfg = _cfg(f"{mod}:{factory}")
    check_names(cfg, base_dir=folder)
    with pytest.raises(ConfigError) as err:
        check_model(cfg)
    assert str(err.value).startswith(f"model.name: '{mod}:{factory}' ") and expect in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_dry_build_leaves_the_global_rng_alone_and_counts_parameters(nets):
    folder, mod = nets
    cfg = _cfg(f"{mod}:GNNet", args={"depth": 3})
    check_names(cfg, base_dir=folder)
    state = torch.get_rng_state()
    n3 = check_model(cfg)
    assert torch.equal(state, torch.get_rng_state())
    assert n3 > check_model(cfg.with_overrides({"model.args.depth": 1})) > 0


def test_every_knob_reaches_a_user_model(nets):
    """Init scheme, L1/L2 terms, decoupled weight decay, label smoothing, mixup + cutmix, input noise and a scheduler
    on the GroupNorm/LayerNorm net: built by build() and trained by fit() like a built-in."""
    folder, mod = nets
    cfg = TrainConfig.from_dict({
        "model": {"name": f"{mod}:GNNet", "init": "kaiming_normal", "dropout": 0.1, "args": {"depth": 2}},
        "data": {"name": "digits", "batch_size": 128},
        "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 1e-3},
        "regularization": {"l1": 1e-5, "l2": 1e-4, "label_smoothing": 0.1, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
                           "mix_prob": 0.5, "input_noise_std": 0.05},
        "scheduler": {"name": "cosine"},
        "train": {"epochs": 2, "num_threads": 1, "train_eval_size": 64}})
    check_names(cfg, base_dir=folder)
    parts = build(cfg, "cpu")
    m = parts.model
    norms = [x for x in m.modules() if isinstance(x, (nn.GroupNorm, nn.LayerNorm))]
    assert len(norms) == 3 and all(bool((x.weight == 1).all() and (x.bias == 0).all()) for x in norms)
    assert all(bool((x.bias == 0).all()) for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear)))
    decay, no_decay = parts.optimizer.param_groups
    assert decay["decoupled_weight_decay"] == 1e-3 and no_decay["decoupled_weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in m.parameters() if p.dim() >= 2}
    assert parts.penalty_fn and float(parts.penalty_fn().detach()) > 0 and parts.regularize_batch
    assert parts.loss_fn.label_smoothing == 0.1
    hist = fit(cfg, "cpu", parts=parts)
    assert hist.stop_reason == "completed" and hist.n_params == sum(p.numel() for p in m.parameters())
    assert hist.epochs[1]["lr"] < hist.epochs[0]["lr"]  # cosine


def test_train_config_looks_beside_the_config_then_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"cwd_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(NETS)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "best.yaml"
    config.write_text(_cfg(f"{name}:GNNet").to_yaml())
    with pytest.raises(ConfigError, match=f"best.yaml: model.name: '{name}:GNNet' is not allowed; no module named "):
        load_config(config)
    monkeypatch.chdir(tmp_path / "code")
    assert load_config(config).model.name == f"{name}:GNNet"
    assert sys.path[-2:] == [str((tmp_path / "configs").resolve()), str((tmp_path / "code").resolve())]
    sys.modules.pop(name, None)


def test_an_installed_entry_point_is_a_short_model_name(tmp_path, monkeypatch):
    """A real (tiny) installed distribution: a *.dist-info with entry_points.txt in a folder on sys.path."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"plugin_nets_{uuid.uuid4().hex[:8]}"
    short = f"tiny_{name[-8:]}"
    (tmp_path / f"{name}.py").write_text(NETS)
    info = tmp_path / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[regsweep.models]\n{short} = {name}:GNNet\n")
    with pytest.raises(ConfigError, match=f"model.name: '{short}' is not allowed; choose one of: cnn, resnet18, "):
        check_names(_cfg(short))
    sys.path.append(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"\(installed plugins: [^)]*{short}"):
        check_names(_cfg("not_installed_net"))
    cfg = check_names(_cfg(short, args={"depth": 2}))
    assert model_factory(short) is sys.modules[name].GNNet
    assert check_model(cfg) > 0
    sys.modules.pop(name, None)


def test_a_model_by_import_path_round_trips_through_a_checkpoint(nets, tmp_path):
    from regsweep.models.train import load_checkpoint, save_checkpoint

    folder, mod = nets
    cfg = _cfg(f"{mod}:GNNet", args={"depth": 2})
    check_names(cfg, base_dir=folder)
    model = make_model(cfg, (1, 8, 8), 10)
    save_checkpoint(tmp_path / "ck.pt", model, cfg)
    again, cfg2 = load_checkpoint(tmp_path / "ck.pt")
    assert cfg2 == cfg and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                  again.state_dict().values()))


def test_a_config_yaml_with_model_args_round_trips():
    text = textwrap.dedent("""\
        model: {name: "pkg.nets:Wide", args: {depth: 2, widths: [8, 16], block: {norm: group, eps: 1.0e-5}}}
        """)
    cfg = TrainConfig.from_yaml(text)
    assert cfg.model.args == {"depth": 2, "widths": [8, 16], "block": {"norm": "group", "eps": 1e-5}}
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ConfigError, match=r"model.args: expected a mapping of keyword arguments, got \[1, 2\]"):
        TrainConfig.from_yaml("model: {args: [1, 2]}")
    with pytest.raises(ConfigError, match="model.args: '1x' is not a keyword argument name"):
        TrainConfig.from_yaml("model: {args: {1x: 2}}")


@pytest.mark.parametrize("source, ref, expect", [
    ("NOT_CALLABLE = 3\n", "{m}:NOT_CALLABLE", "NOT_CALLABLE is a int, not a class or function"),
    ("import timm_not_here_xyz\n", "{m}:Net", "importing {m} raised ModuleNotFoundError: No module named "
                                             "'timm_not_here_xyz'"),
    ("", "{m}:", "is not allowed; an import path is 'package.module:name'"),
    ("", "{m}.sub:Net", "no module named '{m}.sub'"),
])
def test_load_ref_failures_are_one_line(tmp_path, monkeypatch, source, ref, expect):
    from regsweep.models.plugins import load_ref

    monkeypatch.setattr(sys, "path", list(sys.path))
    mod = f"ref_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(source)
    with pytest.raises(ConfigError) as err:
        load_ref(ref.format(m=mod), "model.name", tmp_path)
    assert str(err.value).startswith("model.name: ") and expect.format(m=mod) in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    sys.modules.pop(mod, None)
