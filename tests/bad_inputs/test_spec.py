"""Bad study specs: one line naming the spec file, the field and the value; exit 2; nothing created."""

from __future__ import annotations

import pytest

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

BOMB = [f"l0: &l0 [{', '.join(['x'] * 9)}]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
                                                for i in range(1, 9)]  # 9**9 values in under 1 KB


def spec(text: str = TINY_SPEC, **replace: str) -> dict[str, str]:
    """base.yaml + tiny.yaml: TINY_SPEC with whole lines replaced (key -> new line, '' drops it) or added."""
    lines = text.splitlines()
    for key, new in replace.items():
        hits = [i for i, ln in enumerate(lines) if ln.startswith(f"{key}:")]
        if hits:
            end = hits[0] + 1
            while end < len(lines) and lines[end].startswith(" "):  # the key's nested lines go with it
                end += 1
            lines[hits[0]:end] = [new]
        else:
            lines.append(new)
    return {"base.yaml": TINY_BASE, "tiny.yaml": "\n".join(ln for ln in lines if ln) + "\n"}


def _source_study(path, params: dict) -> None:
    """A finished SQLite study 'earlier' with one COMPLETE trial of ``params`` (a warm-start source)."""
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="earlier", storage=f"sqlite:///{path}")
    study.add_trial(optuna.trial.create_trial(params=params, value=0.5,
                                              distributions={k: FloatDistribution(0.0, 1.0) for k in params}))


def nested(key: str, lines: list[str], indent: str = "  ") -> str:
    return f"{key}:\n" + "\n".join(indent + ln for ln in lines)


MO_OBJECTIVES = "objectives: [{metric: val_loss}, {metric: overfit_gap}]"


def mo(**replace: str) -> dict[str, str]:
    """TINY_SPEC as a two-objective study (val_loss, overfit_gap; nsga2, no pruner), then ``replace``."""
    return spec(**{"objective": "", "objectives": MO_OBJECTIVES, "pruner": "pruner: none",
                   "sampler": "sampler: {name: nsga2, seed: 0}", **replace})


V = ["validate", "{d}/tiny.yaml"]
R = ["run", "{d}/tiny.yaml"]

CASES = [
    Case("spec-unknown-field", V, spec(colour="colour: blue"), expect=("tiny.yaml", "colour", "'blue'")),
    Case("spec-name-missing", V, spec(name=""), expect=("tiny.yaml", "name", "None")),
    Case("spec-name-bad-chars", V, spec(name="name: 'bad name!'"), expect=("tiny.yaml", "name", "'bad name!'")),
    Case("spec-name-too-long", R, spec(name="name: " + "n" * 600), expect=("tiny.yaml", "name", "(600 chars)")),
    Case("spec-description-not-string", V, spec(description="description: [1, 2]"),
         expect=("tiny.yaml", "description", "[1, 2]")),
    Case("spec-description-huge", V, spec(description="description: " + "d" * 20_000),
         expect=("tiny.yaml", "description", "(20,000 chars)", "10,000")),
    Case("spec-base-missing", V, spec(base=""), expect=("tiny.yaml", "base: missing")),
    Case("spec-base-wrong-type", V, spec(base="base: 42"), expect=("tiny.yaml", "base", "42")),
    Case("spec-base-inline-bad-value", V, spec(base="base: {model: {dropout: 2.0}}"),
         expect=("tiny.yaml", "base.model.dropout", "2.0")),
    Case("spec-objective-test-metric", V, spec(objective="objective: {metric: test_acc}"),
         expect=("tiny.yaml", "objective.metric", "'test_acc'")),
    Case("spec-objective-wrong-direction", R, spec(objective="objective: {metric: val_loss, direction: maximize}"),
         expect=("tiny.yaml", "objective.direction", "'maximize'")),
    Case("spec-objective-unknown-key", V, spec(objective="objective: {metric: val_loss, goal: low}"),
         expect=("tiny.yaml", "objective.goal", "'low'")),
    Case("spec-space-missing", V, spec("name: tiny\nbase: base.yaml\n"), expect=("tiny.yaml", "space: missing")),
    Case("spec-space-empty", V, spec("name: tiny\nbase: base.yaml\nspace: {}\n"),
         expect=("tiny.yaml", "space", "at least one param")),
    Case("spec-space-unknown-path", V, spec(space="space: {model.dropuot: {type: float, low: 0, high: 1}}"),
         expect=("tiny.yaml", "space.model.dropuot", "unknown config path")),
    Case("spec-space-low-above-high", V, spec(space="space: {model.dropout: {type: float, low: 0.5, high: 0.1}}"),
         expect=("tiny.yaml", "space.model.dropout.low", "0.5")),
    Case("spec-space-bad-type", V, spec(space="space: {model.dropout: {type: decimal, low: 0, high: 1}}"),
         expect=("tiny.yaml", "space.model.dropout.type", "'decimal'")),
    Case("spec-space-when-unknown-path", V,
         spec(space="space: {model.dropout: {type: float, low: 0, high: 0.5, when: {model.nope: x}}}"),
         expect=("tiny.yaml", "space.model.dropout.when", "'model.nope'")),
    Case("spec-sampler-unknown", V, spec(sampler="sampler: {name: annealing}"),
         expect=("tiny.yaml", "sampler.name", "'annealing'")),
    Case("spec-sampler-seed-text", V, spec(sampler="sampler: {name: tpe, seed: abc}"),
         expect=("tiny.yaml", "sampler.seed", "'abc'")),
    Case("spec-sampler-args-not-mapping", V, spec(sampler="sampler: {name: tpe, args: [1]}"),
         expect=("tiny.yaml", "sampler.args", "[1]")),
    Case("spec-sampler-args-unknown-keyword", V, spec(sampler="sampler: {name: tpe, args: {bogus_kw: 1}}"),
         expect=("tiny.yaml", "sampler.args", "bogus_kw")),
    Case("spec-pruner-unknown", V, spec(pruner="pruner: {name: guillotine}"),
         expect=("tiny.yaml", "pruner.name", "'guillotine'")),
    Case("spec-pruner-bad-arg", V, spec(pruner="pruner: {name: median, args: {bogus: 1}}"),
         expect=("tiny.yaml", "pruner.args", "bogus")),
    Case("spec-budget-zero-trials", R, spec(budget="budget: {n_trials: 0}"),
         expect=("tiny.yaml", "budget.n_trials", "0")),
    Case("spec-budget-negative-timeout", V, spec(budget="budget: {n_trials: 2, timeout: -5}"),
         expect=("tiny.yaml", "budget.timeout", "-5")),
    Case("spec-budget-unknown-key", V, spec(budget="budget: {n_trial: 3}"),
         expect=("tiny.yaml", "budget.n_trial", "3")),
    Case("spec-enqueue-not-list", V, spec(enqueue="enqueue: {model.dropout: 0.1}"),
         expect=("tiny.yaml", "enqueue", "{'model.dropout': 0.1}")),
    Case("spec-enqueue-unknown-param", V, spec(enqueue="enqueue: [{optim.lr: 0.1}]"),
         expect=("tiny.yaml", "enqueue[0].optim.lr", "0.1")),
    Case("spec-enqueue-out-of-range", V, spec(enqueue="enqueue: [{model.dropout: 0.9}]"),
         expect=("tiny.yaml", "enqueue[0].model.dropout", "0.9")),
    Case("spec-storage-not-string", V, spec(storage="storage: 5"), expect=("tiny.yaml", "storage", "5")),
    Case("spec-alias-bomb-unknown-key", V, spec(bomb=nested("bomb", BOMB)), subprocess=True,
         expect=("tiny.yaml", "line", "alias", "100,000")),
    Case("spec-alias-bomb-description", V, spec(description=nested("description", BOMB)),
         expect=("tiny.yaml", "line", "alias", "100,000")),
    Case("spec-alias-bomb-sampler-args", R, spec(sampler="sampler:\n  name: tpe\n" + nested("  args", BOMB, "    ")),
         expect=("tiny.yaml", "line", "alias", "100,000")),
    Case("spec-recursive-alias", V, spec(bomb="bomb: &a [1, *a]"), expect=("tiny.yaml", "alias *a", "recursive")),
    Case("spec-duplicate-top-key", V, spec(again="name: other"), subprocess=True,
         expect=("tiny.yaml", "line 10", "duplicate key 'name'", "first on line 1")),
    Case("spec-duplicate-space-param", R, spec(space="space:\n  model.dropout: {type: float, low: 0, high: 0.5}\n"
                                                     "  model.dropout: {type: float, low: 0, high: 0.2}"),
         expect=("tiny.yaml", "line", "duplicate key 'model.dropout'")),
    Case("spec-python-tag", V, spec(name="name: !!python/object/apply:os.system [echo pwned]"),
         expect=("tiny.yaml", "malformed YAML", "python/object/apply")),
    Case("spec-document-is-a-list", V, {"tiny.yaml": "- name\n- base\n"}, expect=("tiny.yaml", "list", "mapping")),
    Case("spec-malformed-yaml", V, spec(name="name: [tiny"), expect=("tiny.yaml", "line", "malformed YAML")),
    Case("spec-keep-weights-unknown", ["run", "{d}/tiny.yaml"], spec(keep_weights="keep_weights: last"),
         expect=("tiny.yaml", "keep_weights", "'last'", "best, all, none")),
    Case("spec-keep-weights-list", V, spec(keep_weights="keep_weights: [best]"),
         expect=("tiny.yaml", "keep_weights", "best, all, none")),
    # issue 20: fuse
    Case("spec-fuse-zero", V, spec(fuse="fuse: 0"), expect=("tiny.yaml", "fuse", "0", "1..64")),
    Case("spec-fuse-negative", R, spec(fuse="fuse: -3"), expect=("tiny.yaml", "fuse", "-3", "1..64")),
    Case("spec-fuse-too-many", V, spec(fuse="fuse: 65"), expect=("tiny.yaml", "fuse", "65", "1..64")),
    Case("spec-fuse-float", V, spec(fuse="fuse: 2.5"), expect=("tiny.yaml", "fuse", "2.5", "whole number")),
    Case("spec-fuse-text", V, spec(fuse="fuse: eight"), expect=("tiny.yaml", "fuse", "'eight'", "1..64")),
    Case("spec-fuse-bool", V, spec(fuse="fuse: true"), expect=("tiny.yaml", "fuse", "True", "1..64")),
    Case("spec-fuse-multi-objective", V, mo(fuse="fuse: 4"), expect=("tiny.yaml", "fuse", "4", "one objective")),
    # issue 21: confirm and warm_start
    Case("spec-confirm-top-k-zero", V, spec(confirm="confirm: {top_k: 0, seeds: 2}"),
         expect=("tiny.yaml", "confirm.top_k", "0", ">= 1")),
    Case("spec-confirm-seeds-zero", R, spec(confirm="confirm: {top_k: 2, seeds: 0}"),
         expect=("tiny.yaml", "confirm.seeds", "0", ">= 1")),
    Case("spec-confirm-unknown-key", V, spec(confirm="confirm: {top_k: 2, repeats: 3}"),
         expect=("tiny.yaml", "confirm.repeats", "allowed keys")),
    Case("spec-confirm-command-without-confirm", ["confirm", "{d}/tiny.yaml"], spec(),
         expect=("tiny.yaml", "confirm: missing", "top_k")),
    Case("spec-confirm-command-study-not-run", ["confirm", "{d}/tiny.yaml"],
         spec(confirm="confirm: {top_k: 1, seeds: 1}"), expect=("--study-name", "'tiny'", "not found")),
    Case("spec-warm-start-study-missing", V,
         spec(warm_start="warm_start: {study: earlier, storage: 'sqlite:///{d}/none.db', top_k: 2}"),
         expect=("tiny.yaml", "warm_start.study", "'earlier'", "not found")),
    Case("spec-warm-start-unreachable", R,
         spec(warm_start="warm_start: {study: earlier, storage: 'postgresql://postgres:hunter2@127.0.0.1:1/x'}"),
         expect=("tiny.yaml", "warm_start.storage", "127.0.0.1:1"), absent=("hunter2",)),
    Case("spec-warm-start-env-unset", V,
         spec(warm_start="warm_start: {study: earlier, storage: 'env:REGSWEEP_TEST_NO_SUCH_VAR'}"),
         expect=("tiny.yaml", "warm_start.storage", "REGSWEEP_TEST_NO_SUCH_VAR", "not set")),
    Case("spec-warm-start-top-k-zero", V,
         spec(warm_start="warm_start: {study: earlier, storage: 'sqlite:///x.db', top_k: 0}"),
         expect=("tiny.yaml", "warm_start.top_k", "0")),
    Case("spec-warm-start-value-outside-space", R,
         spec(warm_start="warm_start: {study: earlier, storage: 'sqlite:///{d}/src.db', top_k: 2}"),
         setup=lambda d: _source_study(d / "src.db", {"model.dropout": 0.9}),
         expect=("tiny.yaml", "warm_start", "model.dropout = 0.9", "outside", "never clipped")),
    Case("spec-warm-start-param-not-in-space", V,
         spec(warm_start="warm_start: {study: earlier, storage: 'sqlite:///{d}/src.db', top_k: 2}"),
         setup=lambda d: _source_study(d / "src.db", {"optim.lr": 0.01}),
         expect=("tiny.yaml", "warm_start", "optim.lr", "not a param")),
    # issue 21: trade-offs (objectives:, several objectives)
    Case("spec-objectives-with-objective", V, spec(objectives=MO_OBJECTIVES, pruner="pruner: none"),
         expect=("tiny.yaml", "objectives", "either objective:", "not both")),
    Case("spec-objectives-only-one", V, mo(objectives="objectives: [{metric: val_loss}]"),
         expect=("tiny.yaml", "objectives", "2 to 4", "use objective:")),
    Case("spec-objectives-not-a-list", V, mo(objectives="objectives: {metric: val_loss}"),
         expect=("tiny.yaml", "objectives", "'val_loss'", "list")),
    Case("spec-objectives-entry-not-mapping", V, mo(objectives="objectives: [val_loss, n_params]"),
         expect=("tiny.yaml", "objectives[0]", "'val_loss'", "mapping")),
    Case("spec-objectives-first-not-per-epoch", V,
         mo(objectives="objectives: [{metric: n_params}, {metric: val_loss}]"),
         expect=("tiny.yaml", "objectives[0].metric", "'n_params'", "val_loss, val_acc", "per-epoch")),
    Case("spec-objectives-test-metric", V, mo(objectives="objectives: [{metric: val_loss}, {metric: test_acc}]"),
         expect=("tiny.yaml", "objectives[1].metric", "'test_acc'", "overfit_gap, n_params")),
    Case("spec-objectives-duplicate", V, mo(objectives="objectives: [{metric: val_loss}, {metric: val_loss}]"),
         expect=("tiny.yaml", "objectives[1].metric", "'val_loss'", "at most once")),
    Case("spec-objectives-wrong-direction", V,
         mo(objectives="objectives: [{metric: val_loss}, {metric: n_params, direction: maximize}]"),
         expect=("tiny.yaml", "objectives[1].direction", "'maximize'", "n_params is optimised with minimize")),
    Case("spec-objectives-unknown-key", V,
         mo(objectives="objectives: [{metric: val_loss}, {metric: n_params, weight: 2}]"),
         expect=("tiny.yaml", "objectives[1].weight", "allowed keys: metric, direction")),
    Case("spec-objectives-optuna-pruner", V, mo(pruner="pruner: {name: median}"),
         expect=("tiny.yaml", "pruner", "'median'", "choose none or overfit")),
    Case("spec-objectives-pruner-in-any-of", R, mo(pruner="pruner: {any_of: [{name: overfit}, {name: hyperband}]}"),
         expect=("tiny.yaml", "pruner", "'hyperband'", "choose none or overfit")),
    Case("spec-objectives-single-objective-sampler", V, mo(sampler="sampler: {name: cmaes, seed: 0}"),
         expect=("tiny.yaml", "sampler.name", "'cmaes'", "nsga2, tpe, random")),
    Case("spec-objectives-confirm", V, mo(confirm="confirm: {top_k: 2, seeds: 2}"),
         expect=("tiny.yaml", "confirm", "one objective's mean", "drop confirm:")),
    Case("spec-nsga2-bad-arg", V, mo(sampler="sampler: {name: nsga2, seed: 0, args: {population_size: big}}"),
         expect=("tiny.yaml", "sampler.args.population_size", "'big'")),
    Case("spec-objectives-on-ray", [*R, "--backend", "ray"], mo(),
         expect=("tiny.yaml", "objectives", "--backend ray", "--backend optuna")),
    # issue 19: the trackers: section
    Case("spec-trackers-unknown-name", V, spec(trackers="trackers: {wandb: {project: x}}"),
         expect=("tiny.yaml", "trackers.wandb", "unknown tracker", "mlflow, tensorboard")),
    Case("spec-trackers-not-a-mapping", V, spec(trackers="trackers: [mlflow]"),
         expect=("tiny.yaml", "trackers", "['mlflow']", "mapping")),
    Case("spec-trackers-mlflow-uri-not-string", V, spec(trackers="trackers: {mlflow: {tracking_uri: 5}}"),
         expect=("tiny.yaml", "trackers.mlflow.tracking_uri", "5", "tracking URI")),
    Case("spec-trackers-mlflow-uri-missing", V, spec(trackers="trackers: {mlflow: {experiment: e}}"),
         expect=("tiny.yaml", "trackers.mlflow.tracking_uri: missing")),
    Case("spec-trackers-mlflow-unknown-key", V, spec(trackers="trackers: {mlflow: {tracking_uri: 'sqlite:///m.db', "
                                                              "run: x}}"),
         expect=("tiny.yaml", "trackers.mlflow.run", "tracking_uri, experiment")),
    Case("spec-trackers-mlflow-bad-port", R, spec(trackers="trackers: {mlflow: {tracking_uri: 'http://h:99999'}}"),
         expect=("tiny.yaml", "trackers.mlflow.tracking_uri", "'http://h:99999'")),
    Case("spec-trackers-mlflow-uri-password-masked", V,
         spec(trackers="trackers: {mlflow: {tracking_uri: 'http://u:Pw0rdQ9@h:x1'}}"),
         expect=("tiny.yaml", "trackers.mlflow.tracking_uri", "u:***@h"), absent=("Pw0rdQ9",)),
    Case("spec-trackers-mlflow-experiment-empty", V,
         spec(trackers="trackers: {mlflow: {tracking_uri: 'sqlite:///m.db', experiment: ''}}"),
         expect=("tiny.yaml", "trackers.mlflow.experiment", "''")),
    Case("spec-trackers-mlflow-sqlite-directory", V, spec(trackers="trackers: {mlflow: {tracking_uri: 'sqlite:///{d}'}}"),
         expect=("tiny.yaml", "trackers.mlflow.tracking_uri", "not a directory")),
    Case("spec-trackers-tensorboard-log-dir-is-a-file", V,
         {**spec(trackers="trackers: {tensorboard: {log_dir: tb}}"), "tb": "a file"}, subprocess=True,
         expect=("tiny.yaml", "trackers.tensorboard.log_dir", "'tb'", "is a file")),
    Case("spec-trackers-tensorboard-log-dir-under-a-file", R,
         {**spec(trackers="trackers: {tensorboard: {log_dir: tb/runs}}"), "tb": "a file"},
         expect=("tiny.yaml", "trackers.tensorboard.log_dir", "'tb/runs'", "is a file")),
    Case("spec-trackers-tensorboard-log-dir-not-string", V, spec(trackers="trackers: {tensorboard: {log_dir: [a]}}"),
         expect=("tiny.yaml", "trackers.tensorboard.log_dir", "['a']")),
    Case("spec-trackers-tensorboard-not-a-mapping", V, spec(trackers="trackers: {tensorboard: tb}"),
         expect=("tiny.yaml", "trackers.tensorboard", "'tb'", "log_dir")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
