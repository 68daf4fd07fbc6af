"""Bad command-line values (and the spec values only a run reveals): one line, exit 2, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

SPEC = {"base.yaml": TINY_BASE, "tiny.yaml": TINY_SPEC}
LONG_NAME = "s" * 10_000


def spec_files(edit=None, base_edit=None) -> dict[str, str]:
    """SPEC with ``edit(spec_dict)`` / ``base_edit(base_dict)`` applied."""
    spec, base = yaml.safe_load(TINY_SPEC), yaml.safe_load(TINY_BASE)
    if edit is not None:
        edit(spec)
    if base_edit is not None:
        base_edit(base)
    return {"base.yaml": yaml.safe_dump(base, sort_keys=False), "tiny.yaml": yaml.safe_dump(spec, sort_keys=False)}


def a_study(d: Path) -> None:
    """An SQLite file holding study 'tiny' with one finished trial (what export/report read)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{d / 'db.sqlite'}")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))


def a_study_of(config: dict):
    """a_study, its trial recorded with ``config`` (a TrainConfig dict): what export --format python reads."""
    def setup(d: Path) -> None:
        import optuna

        from regsweep.models.config import TrainConfig

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{d / 'db.sqlite'}")
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5, user_attrs={
            "config": TrainConfig.from_dict(config).to_dict(), "best_epoch": 0, "stop_reason": "completed"}))
    return setup


def _two_objectives(s):
    """TINY_SPEC as a two-objective study (no Optuna pruner, nsga2)."""
    del s["objective"]
    s.update(objectives=[{"metric": "val_loss"}, {"metric": "overfit_gap"}], pruner="none",
             sampler={"name": "nsga2", "seed": 0})


def _sampler_args(args):
    return lambda s: s["sampler"].update(args=args)


def _pruner(pruner):
    return lambda s: s.update(pruner=pruner)


def _cond_space(s):
    s["space"]["model.dropout"]["when"] = {"model.bn": "before_act"}


RUN = ["run", "{d}/tiny.yaml"]
DB = "sqlite:///{d}/db.sqlite"
MISSING_DB = "sqlite:///{d}/nope.db"

CASES = [
    Case("validate-missing-file", ["validate", "{d}/nope.yaml"], expect=("nope.yaml",)),
    Case("run-missing-file", ["run", "{d}/nope.yaml"], expect=("nope.yaml",)),
    Case("unknown-command", ["frobnicate"], expect=("frobnicate",)),
    Case("no-command", [], expect=("regsweep", "COMMAND"), subprocess=True),
    Case("run-unknown-flag", [*RUN, "--frob"], files=SPEC, expect=("--frob",)),
    Case("run-backend-bogus", [*RUN, "--backend", "bogus"], files=SPEC, expect=("bogus",)),
    Case("run-n-trials-text", [*RUN, "--n-trials", "many"], files=SPEC,
         expect=("regsweep run: argument --n-trials: invalid int value: 'many'",)),
    Case("run-n-trials-zero", [*RUN, "--n-trials", "0"], files=SPEC, expect=("--n-trials", ">= 1")),
    # --timeout
    Case("run-timeout-negative", [*RUN, "--timeout", "-1"], files=SPEC, expect=("--timeout", "-1", "> 0")),
    Case("run-timeout-nan", [*RUN, "--timeout", "nan"], files=SPEC, expect=("--timeout", "nan")),
    Case("run-timeout-inf", [*RUN, "--timeout", "inf"], files=SPEC, expect=("--timeout", "inf")),
    Case("worker-timeout-zero", ["worker", "{d}/tiny.yaml", "--timeout", "0"], files=SPEC, expect=("--timeout",)),
    # --study-name
    Case("run-study-name-empty", [*RUN, "--study-name", ""], files=SPEC, expect=("--study-name", "''")),
    Case("run-study-name-10000-chars", [*RUN, "--study-name", LONG_NAME], files=SPEC,
         expect=("--study-name", "128")),
    Case("run-study-name-10000-chars-postgres", [*RUN, "--study-name", LONG_NAME, "--storage",
                                                 "postgresql://postgres@127.0.0.1:5432/test"],
         files=SPEC, expect=("--study-name", "128")),
    Case("run-study-name-10000-chars-mariadb", [*RUN, "--study-name", LONG_NAME, "--storage",
                                                "mysql+pymysql://root@127.0.0.1:3306/test"],
         files=SPEC, expect=("--study-name", "128")),
    Case("run-study-name-slash", [*RUN, "--study-name", "a b/c"], files=SPEC, expect=("--study-name", "a b/c")),
    Case("spec-name-10000-chars", ["validate", "{d}/tiny.yaml"], files=spec_files(lambda s: s.update(name=LONG_NAME)),
         expect=("tiny.yaml", "name", "128")),
    Case("export-study-name-empty", ["export", "--storage", DB, "--study-name", ""], setup=a_study,
         expect=("--study-name",)),
    # --device
    Case("run-device-bogus", [*RUN, "--device", "bogus"], files=SPEC, expect=("--device", "bogus", "cpu")),
    Case("run-device-cuda-without-gpu", [*RUN, "--device", "cuda"], files=SPEC, env={"CUDA_VISIBLE_DEVICES": ""},
         expect=("--device", "cuda", "not available"), subprocess=True),
    Case("run-device-cuda-99", [*RUN, "--device", "cuda:99"], files=SPEC, expect=("--device", "cuda:99")),
    Case("run-device-mps", [*RUN, "--device", "mps"], files=SPEC, expect=("--device", "mps")),
    Case("worker-device-bogus", ["worker", "{d}/tiny.yaml", "--device", "gpu0"], files=SPEC,
         expect=("--device", "gpu0")),
    Case("train-device-bogus", ["train", "{d}/base.yaml", "--device", "tpu"], files=SPEC, expect=("--device", "tpu")),
    Case("bench-device-bogus", ["bench", "--dry-run", "--device", "tpu"], expect=("--device", "tpu")),
    # --fuse (issue 20)
    Case("run-fuse-zero", [*RUN, "--fuse", "0"], files=SPEC, expect=("--fuse", "0", "1..64")),
    Case("run-fuse-negative", [*RUN, "--fuse", "-2"], files=SPEC, expect=("--fuse", "-2", "1..64")),
    Case("run-fuse-too-many", [*RUN, "--fuse", "65"], files=SPEC, expect=("--fuse", "65", "1..64")),
    Case("run-fuse-text", [*RUN, "--fuse", "many"], files=SPEC, subprocess=True,
         expect=("argument --fuse: invalid int value: 'many'",)),
    Case("worker-fuse-zero", ["worker", "{d}/tiny.yaml", "--fuse", "0"], files=SPEC, expect=("--fuse", "0")),
    Case("run-fuse-with-ray", [*RUN, "--backend", "ray", "--fuse", "8"], files=SPEC,
         expect=("--fuse", "8", "--backend ray")),
    Case("run-fuse-multi-objective", [*RUN, "--fuse", "4"], files=spec_files(_two_objectives),
         expect=("--fuse", "4", "one objective")),
    Case("run-spec-fuse-with-ray", [*RUN, "--backend", "ray"], files=spec_files(lambda s: s.update(fuse=4)),
         expect=("tiny.yaml", "fuse", "4", "--backend ray")),
    # workers, GPUs, Ray flags
    Case("run-workers-zero", [*RUN, "--workers", "0"], files=SPEC, expect=("--workers", "0", ">= 1")),
    Case("run-gpus-bogus", [*RUN, "--gpus", "bogus"], files=SPEC, expect=("--gpus", "bogus")),
    Case("run-trials-per-gpu-zero", [*RUN, "--trials-per-gpu", "0"], files=SPEC, expect=("--trials-per-gpu",)),
    Case("run-gpus-per-trial-negative", [*RUN, "--backend", "ray", "--gpus-per-trial", "-1"], files=SPEC,
         expect=("--gpus-per-trial", "-1")),
    Case("run-cpus-per-trial-zero", [*RUN, "--backend", "ray", "--cpus-per-trial", "0"], files=SPEC,
         expect=("--cpus-per-trial", "0")),
    Case("run-ray-flag-on-optuna", [*RUN, "--address", "auto"], files=SPEC, expect=("--address", "--backend ray")),
    Case("run-ray-with-tensorboard", [*RUN, "--backend", "ray", "--tensorboard", "{d}/tb"], files=SPEC,
         expect=("--tensorboard", "not allowed with --backend ray", "runs no trackers")),
    Case("verbose-and-quiet", ["-v", "-q", "status"], expect=("-q", "not allowed with argument -v")),
    Case("run-verbose-and-quiet", [*RUN, "-q", "--verbose"], files=SPEC, expect=("--verbose", "-q")),
    Case("run-ray-with-workers", [*RUN, "--backend", "ray", "--workers", "2"], files=SPEC,
         expect=("--workers", "--backend ray")),
    # --artifacts (checked before the study is created)
    Case("run-artifacts-is-a-file", [*RUN, "--artifacts", "{d}/base.yaml"], files=SPEC,
         expect=("--artifacts", "base.yaml")),
    Case("run-artifacts-parent-missing", [*RUN, "--artifacts", "{d}/no/such/dir"], files=SPEC,
         expect=("--artifacts", "does not exist")),
    Case("run-artifacts-bad-scheme", [*RUN, "--artifacts", "ftp://host/x"], files=SPEC,
         expect=("--artifacts", "ftp://host/x")),
    Case("run-workers-artifacts-is-a-file", [*RUN, "--workers", "2", "--artifacts", "{d}/base.yaml"], files=SPEC,
         expect=("--artifacts",)),
    # ports
    Case("dashboard-port-negative", ["dashboard", "--storage", DB, "--port", "-1"], setup=a_study,
         expect=("--port", "-1", "65535")),
    Case("dashboard-port-too-big", ["dashboard", "--storage", DB, "--port", "70000"], setup=a_study,
         expect=("--port", "70000")),
    # commands that read a study never create a database
    Case("export-missing-sqlite", ["export", "--storage", MISSING_DB], expect=("nope.db", "does not exist")),
    Case("report-missing-sqlite", ["report", "--storage", MISSING_DB, "--out", "{d}/rep"],
         expect=("nope.db", "does not exist")),
    Case("dashboard-missing-sqlite", ["dashboard", "--storage", MISSING_DB], expect=("nope.db", "does not exist")),
    Case("status-missing-sqlite", ["status", "--storage", MISSING_DB], expect=("nope.db", "does not exist"),
         subprocess=True),
    Case("status-study-missing-sqlite", ["status", "--storage", MISSING_DB, "--study-name", "tiny"],
         expect=("nope.db",)),
    # export's own flags
    Case("export-format-bogus", ["export", "--storage", DB, "--format", "bogus"], setup=a_study,
         expect=("--format", "'bogus'", "yaml")),
    Case("export-python-trial-without-config", ["export", "--storage", DB, "--format", "python", "--out",
                                                "{d}/train_best.py"], setup=a_study,
         expect=("trial 0", "no recorded config")),
    Case("export-snippet-trial-without-config", ["export", "--storage", DB, "--format", "snippet"], setup=a_study,
         expect=("trial 0", "no recorded config")),
    Case("export-python-torchvision-dataset", ["export", "--storage", DB, "--format", "python"],
         setup=a_study_of({"model": {"name": "cnn"}, "data": {"name": "torchvision:CIFAR100"}}),
         expect=("data.name", "'torchvision:CIFAR100'", "--format python")),
    Case("export-python-model-plugin-not-installed", ["export", "--storage", DB, "--format", "python"],
         setup=a_study_of({"model": {"name": "no_such_plugin"}, "data": {"name": "digits"}}),
         expect=("model.name", "'no_such_plugin'", "entry point")),
    Case("export-trial-negative", ["export", "--storage", DB, "--trial", "-3"], setup=a_study,
         expect=("--trial", "-3")),
    Case("export-trial-missing", ["export", "--storage", DB, "--trial", "7"], setup=a_study,
         expect=("--trial: 7", "tiny")),
    # export --weights (keep_weights): a trial without stored weights, a bad target; nothing written
    Case("export-weights-none-stored", ["export", "--storage", DB, "--weights", "{d}/best.pt"], setup=a_study,
         expect=("--weights", "trial 0", "no stored weights", "keep_weights")),
    Case("export-weights-trial-none-stored", ["export", "--storage", DB, "--trial", "0", "--weights", "{d}/t.pt",
                                              "--out", "{d}/t.yaml"], setup=a_study,
         expect=("--weights", "trial 0", "no stored weights")),
    Case("export-weights-dir-missing", ["export", "--storage", DB, "--weights", "{d}/no/dir/best.pt"],
         setup=a_study, expect=("--weights", "does not exist")),
    Case("export-weights-is-a-directory", ["export", "--storage", DB, "--weights", "{d}"], setup=a_study,
         expect=("--weights", "is a directory")),
    Case("export-weights-none-stored-subprocess", ["export", "--storage", DB, "--weights", "{d}/best.pt"],
         setup=a_study, expect=("--weights", "no stored weights"), subprocess=True),
    # sampler / pruner arguments: types against the constructors, then a dry run of the real space
    Case("sampler-arg-wrong-type", ["validate", "{d}/tiny.yaml"],
         files=spec_files(_sampler_args({"n_startup_trials": "ten"})),
         expect=("sampler.args.n_startup_trials", "'ten'", "int")),
    Case("sampler-arg-unknown", ["run", "{d}/tiny.yaml"], files=spec_files(_sampler_args({"n_startup": 3})),
         expect=("sampler.args.n_startup", "TPESampler")),
    Case("sampler-arg-fails-in-dry-run", ["validate", "{d}/tiny.yaml"],
         files=spec_files(_sampler_args({"n_ei_candidates": 0})), expect=("sampler.args.n_ei_candidates",)),
    Case("pruner-arg-wrong-type", ["run", "{d}/tiny.yaml"],
         files=spec_files(_pruner({"name": "median", "args": {"n_warmup_steps": "3"}})),
         expect=("pruner.args.n_warmup_steps", "'3'")),
    # conditions and enqueued values
    Case("when-value-no-choice-has", ["validate", "{d}/tiny.yaml"],
         files=spec_files(lambda s: s["space"]["model.dropout"].update(when={"model.bn": "batch"})),
         expect=("space.model.dropout.when.model.bn", "'batch'", "before_act")),
    Case("enqueue-value-condition-off", ["run", "{d}/tiny.yaml"],
         files=spec_files(lambda s: (_cond_space(s), s.update(enqueue=[{"model.bn": "none", "model.dropout": 0.1}]))),
         expect=("enqueue[0].model.dropout", "model.bn")),
    # epochs and dataset files
    Case("epochs-10-to-the-9", ["run", "{d}/tiny.yaml"],
         files=spec_files(base_edit=lambda b: b["train"].update(epochs=10 ** 9)),
         expect=("train.epochs", "1000000000")),
    Case("mnist-root-missing-validate", ["validate", "{d}/tiny.yaml"],
         files=spec_files(base_edit=lambda b: b.update(data={"name": "mnist", "root": "{d}/data"})),
         expect=("data.root", "data.download")),
    Case("mnist-root-missing-run", ["run", "{d}/tiny.yaml"],
         files=spec_files(base_edit=lambda b: b.update(data={"name": "mnist", "root": "{d}/data"})),
         expect=("data.root",)),
    Case("cifar10-files-missing", ["validate", "{d}/tiny.yaml"],
         files={**spec_files(base_edit=lambda b: b.update(data={"name": "cifar10", "root": "{d}/data"})),
                "data/cifar-10-batches-py/data_batch_1": b"x"},
         expect=("data.root", "data_batch_2")),
    Case("image-folder-root-missing", ["train", "{d}/base.yaml"],
         files=spec_files(base_edit=lambda b: b.update(data={"name": "image_folder", "root": "{d}/imgs"})),
         expect=("data.root", "imgs")),
    # issue 19: the tracker flags (run and worker alike)
    Case("run-mlflow-uri-with-space", [*RUN, "--mlflow", "http://h :5000"], files=SPEC,
         expect=("--mlflow", "'http://h :5000'", "tracking URI")),
    Case("run-mlflow-port-zero", [*RUN, "--mlflow", "http://127.0.0.1:0"], files=SPEC,
         expect=("--mlflow", "'http://127.0.0.1:0'")),
    Case("worker-mlflow-no-host", ["worker", "{d}/tiny.yaml", "--mlflow", "https:///x"], files=SPEC,
         expect=("--mlflow", "'https:///x'", "host")),
    Case("run-tensorboard-is-a-file", [*RUN, "--tensorboard", "{d}/tb"], files={**SPEC, "tb": "a file"},
         expect=("--tensorboard", "is a file")),
    Case("worker-tensorboard-is-a-file", ["worker", "{d}/tiny.yaml", "--tensorboard", "tb"],
         files={**SPEC, "tb": "a file"}, expect=("--tensorboard", "'tb'", "is a file")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
