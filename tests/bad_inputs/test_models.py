"""Bad models by import path or plugin (issue 18): unimportable, raising on import, missing or not callable, a
factory that raises or returns no nn.Module (or the wrong logits), a searched knob or argument the factory does
not take, model.args it does not take, a plugin that is not installed. One line naming the spec (or config), the
field and the model; exit 2 at `validate` (and `run`, `train`); no study created, nothing written (user code is
imported without writing __pycache__). The user module lives in the case's folder, beside the spec; every case's
module has a name of its own (cases run in one process, where an imported module stays imported)."""

from __future__ import annotations

import pytest

from tests.bad_inputs.conftest import Case  # pytest (importlib mode) registers it

NETS = """\
from torch import nn


class Net(nn.Module):
    def __init__(self, in_shape, num_classes, depth: int = 1, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))

    def forward(self, x):
        return self.net(x)


def raises(num_classes):
    raise ValueError("width must be even")


def not_a_module(num_classes):
    return {"weights": 1}


def wrong_logits(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def bad_forward(num_classes):
    return nn.Linear(5, num_classes)


def needs(num_classes, depth):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


NOT_CALLABLE = 3
"""

SPEC = """\
name: um
base:
  model: MODEL
  data: {name: digits}
  train: {epochs: 1, num_threads: 1}
space:
  regularization.l2: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
EXTRA
budget: {n_trials: 1}
"""
V = ["validate", "{d}/um.yaml"]


def case(cid: str, model: str, expect: tuple[str, ...], extra: str = "", argv: list[str] = V,
         module: str = NETS, **kw) -> Case:
    """A spec whose base model is MODEL (``{m}`` = this case's own module name) beside that module."""
    mod = "bim_" + cid.removeprefix("models-").replace("-", "_")
    files = {f"{mod}.py": module, "um.yaml": SPEC.replace("MODEL", model.replace("{m}", mod)).replace("EXTRA\n", extra)}
    return Case(cid, argv, files, expect=tuple(e.replace("{m}", mod) for e in expect), **kw)


CASES = [
    case("models-unimportable", '{name: "{m}_missing.nets:Net"}',
         ("um.yaml", "base.model.name", "'{m}_missing.nets:Net'", "no module named '{m}_missing'")),
    case("models-raises-on-import", '{name: "{m}:Net"}', ("um.yaml", "importing {m} raised RuntimeError: no GPU"),
         module="raise RuntimeError('no GPU')\n"),
    case("models-missing-attribute", '{name: "{m}:WideNet"}', ("model.name", "{m} has no attribute 'WideNet'")),
    case("models-factory-raises", '{name: "{m}:raises"}',
         ("um.yaml", "base", "'{m}:raises'", "raised ValueError: width must be even")),
    case("models-factory-returns-no-module", '{name: "{m}:not_a_module"}',
         ("um.yaml", "'{m}:not_a_module'", "returned a dict, not a torch.nn.Module")),
    case("models-wrong-logits", '{name: "{m}:wrong_logits"}', ("returned [1, 3]", "expected logits of shape [1, 10]")),
    case("models-forward-raises", '{name: "{m}:bad_forward"}', ("'{m}:bad_forward'", "forward pass", "RuntimeError")),
    case("models-searched-bn-not-taken", '{name: "{m}:Net"}',
         ("um.yaml", "space.model.bn", "{m}:Net does not take bn"),
         extra="  model.bn: {type: categorical, choices: [none, before_act]}\n"),
    case("models-searched-arg-not-taken", '{name: "{m}:needs", args: {depth: 1}}',
         ("space.model.args.width", "{m}:needs does not take width"),
         extra="  model.args.width: {type: int, low: 4, high: 8}\n"),
    case("models-searched-arg-outside-annotation", '{name: "{m}:Net"}',
         ("space.model.args.depth.choices", "'deep'", "depth is int"),
         extra="  model.args.depth: {type: categorical, choices: [1, deep]}\n"),
    case("models-arg-unknown", '{name: "{m}:Net", args: {depht: 2}}',
         ("model.args.depht", "{m}:Net takes: in_shape, num_classes, depth, dropout")),
    case("models-required-arg-missing", '{name: "{m}:needs"}', ("model.args", "{m}:needs needs depth")),
    case("models-entry-point-not-installed", "{name: not_installed_net}",
         ("model.name", "'not_installed_net'", "choose one of: cnn", "an import path")),
    case("models-args-on-builtin", "{name: cnn, args: {depth: 2}}", ("model.args", "built-in model cnn takes no args")),
    case("models-run-factory-raises", '{name: "{m}:raises"}', ("um.yaml", "width must be even"),
         argv=["run", "{d}/um.yaml"]),
    case("models-ray-address-with-folder-model", '{name: "{m}:Net"}',
         ("--address", "'{m}:Net'", "Ray does not ship it to a cluster"),
         argv=["run", "{d}/um.yaml", "--backend", "ray", "--address", "127.0.0.1:1"]),
]
CASES.append(Case("models-train-factory-raises", ["train", "{d}/cfg.yaml"],
                  {"bim_train_raises.py": NETS, "cfg.yaml": 'model: {name: "bim_train_raises:raises"}\n'},
                  expect=("cfg.yaml", "model.name", "raised ValueError: width must be even")))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
