"""Bad TrainConfig values, through `regsweep train CONFIG` and through a spec's base (`validate`, `run`): one
line naming the config file, the dotted field and the value; exit 2; nothing created (no runs/ directory)."""

from __future__ import annotations

import pytest

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

BOMB = [f"l0: &l0 [{', '.join(['x'] * 9)}]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
                                                for i in range(1, 9)]  # 9**9 values in under 1 KB


def cfg(*lines: str) -> dict[str, str]:
    """cfg.yaml: TINY_BASE plus lines (a later section line replaces TINY_BASE's line of that section)."""
    sections = {ln.split(":")[0]: ln for ln in TINY_BASE.splitlines()}
    extra = []
    for ln in lines:
        key = ln.split(":")[0]
        if key in sections and not ln.startswith(" "):
            sections[key] = ln
        else:
            extra.append(ln)
    return {"cfg.yaml": "\n".join([*sections.values(), *extra]) + "\n"}


def in_spec(*lines: str) -> dict[str, str]:
    """The same config as the spec's base file (base.yaml) next to tiny.yaml."""
    return {"base.yaml": cfg(*lines)["cfg.yaml"], "tiny.yaml": TINY_SPEC}


T = ["train", "{d}/cfg.yaml"]
V = ["validate", "{d}/tiny.yaml"]
R = ["run", "{d}/tiny.yaml"]

CASES = [
    Case("config-model-dropout-range", T, cfg("model: {name: cnn, dropout: 1.5}"),
         expect=("cfg.yaml", "model.dropout", "1.5")),
    Case("config-model-name-unknown", T, cfg("model: {name: vgg}"), subprocess=True,
         expect=("cfg.yaml", "model.name", "'vgg'")),
    Case("config-model-widths-negative", T, cfg("model: {name: cnn, widths: [8, -1]}"),
         expect=("cfg.yaml", "model.widths", "[8, -1]")),
    Case("config-model-hidden-negative", T, cfg("model: {name: cnn, hidden: -4}"),
         expect=("cfg.yaml", "model.hidden", "-4")),
    Case("config-model-bn-bogus", T, cfg("model: {name: cnn, bn: sideways}"),
         expect=("cfg.yaml", "model.bn", "'sideways'")),
    Case("config-model-init-unknown", T, cfg("model: {name: cnn, init: he2}"),
         expect=("cfg.yaml", "model.init", "'he2'")),
    Case("config-model-activation-unknown", T, cfg("model: {name: cnn, activation: swishy}"),
         expect=("cfg.yaml", "model.activation", "'swishy'")),
    Case("config-data-name-unknown", T, cfg("data: {name: imagenet21k}"),
         expect=("cfg.yaml", "data.name", "'imagenet21k'")),
    Case("config-data-val-fraction-one", T, cfg("data: {name: digits, val_fraction: 1.0}"),
         expect=("cfg.yaml", "data.val_fraction", "1.0")),
    Case("config-data-batch-size-zero", T, cfg("data: {name: digits, batch_size: 0}"),
         expect=("cfg.yaml", "data.batch_size", "0")),
    Case("config-data-shape-2d", T, cfg("data: {name: synthetic, shape: [8, 8]}"),
         expect=("cfg.yaml", "data.shape", "[8, 8]")),
    Case("config-data-one-class", T, cfg("data: {name: synthetic, num_classes: 1}"),
         expect=("cfg.yaml", "data.num_classes", "1")),
    Case("config-optim-lr-negative", T, cfg("optim: {name: adamw, lr: -0.1}"), expect=("cfg.yaml", "optim.lr", "-0.1")),
    Case("config-optim-lr-text", T, cfg("optim: {name: adamw, lr: fast}"), expect=("cfg.yaml", "optim.lr", "'fast'")),
    Case("config-optim-lr-nan", T, cfg("optim: {name: adamw, lr: .nan}"), expect=("cfg.yaml", "optim.lr", "nan")),
    Case("config-optim-three-betas", T, cfg("optim: {name: adam, betas: [0.9, 0.99, 0.999]}"),
         expect=("cfg.yaml", "optim.betas", "[0.9, 0.99, 0.999]")),
    Case("config-optim-name-unknown", T, cfg("optim: {name: lion}"), expect=("cfg.yaml", "optim.name", "'lion'")),
    Case("config-regularization-l2-negative", T, cfg("regularization: {l2: -1.0e-4}"),
         expect=("cfg.yaml", "regularization.l2", "-0.0001")),
    Case("config-regularization-label-smoothing-one", T, cfg("regularization: {label_smoothing: 1.0}"),
         expect=("cfg.yaml", "regularization.label_smoothing", "1.0")),
    Case("config-regularization-mix-prob-two", T, cfg("regularization: {mix_prob: 2}"),
         expect=("cfg.yaml", "regularization.mix_prob", "2")),
    Case("config-scheduler-unknown", T, cfg("scheduler: {name: sawtooth}"),
         expect=("cfg.yaml", "scheduler.name", "'sawtooth'")),
    Case("config-scheduler-gamma-zero", T, cfg("scheduler: {name: step, gamma: 0}"),
         expect=("cfg.yaml", "scheduler.gamma", "0")),
    Case("config-scheduler-milestones-decreasing", T, cfg("scheduler: {name: multistep, milestones: [9, 3]}"),
         expect=("cfg.yaml", "scheduler.milestones", "[9, 3]")),
    Case("config-train-epochs-zero", T, cfg("train: {epochs: 0}"), expect=("cfg.yaml", "train.epochs", "0")),
    Case("config-train-epochs-bool", T, cfg("train: {epochs: true}"), expect=("cfg.yaml", "train.epochs", "True")),
    Case("config-train-precision-fp8", T, cfg("train: {epochs: 1, precision: fp8}"),
         expect=("cfg.yaml", "train.precision", "'fp8'")),
    Case("config-early-stopping-on-test", T, cfg("train: {epochs: 1, early_stopping: {monitor: test_acc}}"),
         expect=("cfg.yaml", "train.early_stopping.monitor", "'test_acc'")),
    Case("config-unknown-section", T, cfg("augmentations: {flip: true}"),
         expect=("cfg.yaml", "augmentations", "unknown key")),
    Case("config-unknown-field", T, cfg("optim: {name: adamw, learning_rate: 0.1}"),
         expect=("cfg.yaml", "optim.learning_rate", "unknown key")),
    Case("config-section-not-mapping", T, cfg("optim: adam"), expect=("cfg.yaml", "optim", "'adam'")),
    Case("config-huge-value", T, cfg("data: {name: " + "x" * 5000 + "}"),
         expect=("cfg.yaml", "data.name", "(5,000 chars)")),
    Case("config-duplicate-key", T, cfg("optim: {name: adamw, lr: 0.1, lr: 0.2}"),
         expect=("cfg.yaml", "line 3", "duplicate key 'lr'")),
    Case("config-alias-bomb", T, cfg("extra:", *("  " + ln for ln in BOMB)), expect=("cfg.yaml", "alias", "100,000")),
    Case("config-python-tag", T, cfg("model: !!python/object/apply:os.system [echo pwned]"),
         expect=("cfg.yaml", "malformed YAML", "python/object/apply")),
    Case("config-base-file-bad-value", V, in_spec("model: {name: cnn, dropout: -0.5}"),
         expect=("base.yaml", "model.dropout", "-0.5")),
    Case("config-base-file-unknown-key", R, in_spec("train: {epochs: 2, epoch: 3}"),
         expect=("base.yaml", "train.epoch", "unknown key")),
    Case("config-base-file-duplicate-key", V, {"base.yaml": TINY_BASE + "train: {epochs: 3}\n", "tiny.yaml": TINY_SPEC},
         expect=("base.yaml", "line 5", "duplicate key")),
    Case("config-inline-base-bad-epochs", V,
         {"tiny.yaml": TINY_SPEC.replace("base: base.yaml", "base: {train: {epochs: -1}}")},
         expect=("tiny.yaml", "base.train.epochs", "-1")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
