"""search/pruners: the registry builds each spec into the right Optuna pruner; any_of / all_of decide on a
real in-memory study and credit the child that fired."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

import regsweep
from regsweep.models.config import ConfigError
from regsweep.search.pruners.compose import AllOf, AnyOf
from regsweep.search.pruners.overfit import OverfitPruner
from regsweep.search.pruners.registry import PRUNERS, PrunerContext, build_pruner, label

ROOT = Path(regsweep.__file__).parent

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PatientPruner

CTX = PrunerContext(epochs=12, source="/specs/study.yaml")


# ------------------------------------------------------------------------------------------ registry
# one buildable spec per registered name (args a name requires included)
BUILD_CASES = [
    ({"name": "none"}, optuna.pruners.NopPruner),
    ("median", optuna.pruners.MedianPruner),
    ({"name": "median", "args": {"n_warmup_steps": 3}}, optuna.pruners.MedianPruner),
    ({"name": "percentile", "args": {"percentile": 25.0}}, optuna.pruners.PercentilePruner),
    ({"name": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
    ({"name": "hyperband", "args": {"reduction_factor": 3}}, optuna.pruners.HyperbandPruner),
    ({"name": "threshold", "args": {"upper": 2.0}}, optuna.pruners.ThresholdPruner),
    ({"name": "threshold", "args": {"lower": 0.1}}, optuna.pruners.ThresholdPruner),
    ({"name": "patient", "args": {"patience": 2}, "wrapped": {"name": "median"}}, optuna.pruners.PatientPruner),
    ({"name": "overfit", "args": {"patience": 2, "window": 3}}, OverfitPruner),
    (None, optuna.pruners.NopPruner),
]
COMPOSITES = {"any_of", "all_of"}


@pytest.mark.parametrize("spec, cls", BUILD_CASES)
def test_build_each_registered_name(spec, cls):
    assert type(build_pruner(spec, CTX)) is cls


def _readme_pruners() -> set[str]:
    """The names the README's spec example lists after ``pruner:`` (``# none | median | ... | {all_of: [...]}``)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pruner:"))
    comment = [lines[start].split("#", 1)[1]]
    for line in lines[start + 1:]:
        if not line.lstrip().startswith("#"):
            break
        comment.append(line.split("#", 1)[1])
    names = {chunk.strip().split()[0].strip("{:") for chunk in " ".join(comment).split("|") if chunk.strip()}
    return names - COMPOSITES


def _backends_doc_pruners() -> set[str]:
    """The names in docs/backends.md's support table row ``| pruners `none`, `median`, ... |``."""
    row = next(line for line in (ROOT / "docs" / "backends.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| pruners "))
    return set(re.findall(r"`([a-z_]+)`", row.split("|")[1])) - COMPOSITES


def _accepted_by_the_validator() -> set[str]:
    """The names build_pruner (what spec loading calls) offers when refusing an unknown one."""
    with pytest.raises(ConfigError) as err:
        build_pruner({"name": "no_such_pruner"}, CTX)
    listed = str(err.value).split("choose one of: ", 1)[1].split(";")[0]
    return {name.strip() for name in listed.split(",")} - COMPOSITES


def test_every_registered_name_is_documented_accepted_and_built():
    """Removing, renaming or adding a pruner fails here until the README, docs/backends.md and the build cases
    above agree with the registry."""
    registered = set(PRUNERS.names())
    built = {label(spec) for spec, _ in BUILD_CASES if spec is not None}
    assert registered == _readme_pruners(), "README spec example vs registry"
    assert registered == _backends_doc_pruners(), "docs/backends.md vs registry"
    assert registered == _accepted_by_the_validator(), "validator's list vs registry"
    assert registered == built, "BUILD_CASES vs registry"
    assert "overfit" in registered and "median" in registered  # the ones the README's examples use


def test_args_reach_the_pruner():
    median = build_pruner({"name": "median", "args": {"n_warmup_steps": 3, "n_startup_trials": 7}}, CTX)
    assert (median._n_warmup_steps, median._n_startup_trials) == (3, 7)
    pct = build_pruner({"name": "percentile", "args": {"percentile": 25.0}}, CTX)
    assert pct._percentile == 25.0
    thr = build_pruner({"name": "threshold", "args": {"upper": 2.0}}, CTX)
    assert thr._upper == 2.0
    sha = build_pruner({"name": "successive_halving"}, CTX)
    assert sha._min_resource == 1


@pytest.mark.parametrize("epochs", [3, 12, 40])
def test_hyperband_max_resource_is_the_epochs(epochs):
    hb = build_pruner({"name": "hyperband"}, PrunerContext(epochs, "s.yaml"))
    assert hb._max_resource == epochs
    assert hb._min_resource == 1


def test_hyperband_explicit_max_resource_wins():
    assert build_pruner({"name": "hyperband", "args": {"max_resource": 5}}, CTX)._max_resource == 5


def test_patient_wraps_the_inner_spec():
    p = build_pruner({"name": "patient", "args": {"patience": 2, "min_delta": 0.01},
                      "wrapped": {"name": "percentile", "args": {"percentile": 30.0}}}, CTX)
    assert (p._patience, p._min_delta) == (2, 0.01)
    assert type(p._wrapped_pruner) is optuna.pruners.PercentilePruner
    assert p._wrapped_pruner._percentile == 30.0


def test_composites_build_children_with_labels():
    p = build_pruner({"any_of": ["median", {"all_of": [{"name": "threshold", "args": {"upper": 1.0}},
                                                       {"name": "none"}]}]}, CTX)
    assert type(p) is AnyOf
    assert [lbl for lbl, _ in p.children] == ["median", "all_of(threshold,none)"]
    inner = p.children[1][1]
    assert type(inner) is AllOf
    assert [type(c).__name__ for _, c in inner.children] == ["ThresholdPruner", "NopPruner"]


@pytest.mark.parametrize("spec, fragments", [
    ({"name": "guillotine"}, ("pruner.name: 'guillotine'", "median", "any_of")),
    ({"name": "percentile"}, ("pruner.args:", "percentile")),
    ({"name": "threshold"}, ("pruner.args:", "threshold: Either lower or upper")),
    ({"name": "median", "args": {"bogus": 1}}, ("pruner.args.bogus: 1", "MedianPruner takes:")),
    ({"name": "median", "args": [1]}, ("pruner.args:", "mapping")),
    ({"name": "patient", "args": {"patience": 1}}, ("pruner.wrapped: missing",)),
    ({"name": "median", "wrapped": "median"}, ("pruner.wrapped:", "only the patient")),
    ({"name": "median", "color": "red"}, ("pruner.color:",)),
    ({"any_of": "median"}, ("pruner:", "any_of takes a non-empty list")),
    ({"all_of": []}, ("pruner:", "all_of takes a non-empty list")),
    ({"any_of": ["median"], "name": "x"}, ("pruner:", "any_of takes")),
    ({"any_of": ["median", {"name": "nope"}]}, ("pruner.any_of[1].name: 'nope'",)),
    ({"name": "patient", "args": {"patience": 1}, "wrapped": {"name": "nope"}}, ("pruner.wrapped.name: 'nope'",)),
    (3, ("pruner: 3",)),
])
def test_bad_pruner_specs_are_one_line(spec, fragments):
    with pytest.raises(ConfigError) as exc:
        build_pruner(spec, CTX)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("/specs/study.yaml: "), msg
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("spec, expected", [
    (None, "none"),
    ("median", "median"),
    ({"name": "hyperband", "args": {"reduction_factor": 3}}, "hyperband"),
    ({"name": "patient", "wrapped": {"name": "median"}}, "patient"),
    ({"any_of": [{"name": "median"}, "threshold"]}, "any_of(median,threshold)"),
    ({"all_of": [{"any_of": ["median", {"name": "percentile"}]}, {"name": "threshold"}]},
     "all_of(any_of(median,percentile),threshold)"),
])
def test_label(spec, expected):
    assert label(spec) == expected


# ------------------------------------------------------------------------------ composition semantics
MEDIAN = {"name": "median", "args": {"n_startup_trials": 2, "n_warmup_steps": 0}}
THRESH = {"name": "threshold", "args": {"upper": 0.4}}  # prunes any trial whose last value is above 0.4


def study_with_history(pruner, n: int = 3, value: float = 1.0, steps: int = 3) -> optuna.Study:
    """A real in-memory study (minimize) with n completed trials reporting `value` at every step."""
    study = optuna.create_study(storage=None, pruner=pruner, direction="minimize")
    for _ in range(n):
        trial = study.ask()
        for step in range(steps):
            trial.report(value, step)
        study.tell(trial, value)
    return study


def new_trial(study: optuna.Study, value: float):
    trial = study.ask()
    trial.report(value, 0)
    return trial


def child_votes(study: optuna.Study, composite, trial) -> dict[str, bool]:
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    return {lbl: child.prune(study, frozen) for lbl, child in composite.children}


@pytest.mark.parametrize("value, votes, any_prunes, any_label, all_prunes, all_label", [
    # 0.5: better than the median (1.0) but above the threshold -> only the threshold votes
    (0.5, {"median": False, "threshold": True}, True, "threshold", False, None),
    # 2.0: worse than the median and above the threshold -> both vote
    (2.0, {"median": True, "threshold": True}, True, "median", True, "median+threshold"),
    # 0.3: better than the median and under the threshold -> nobody votes
    (0.3, {"median": False, "threshold": False}, False, None, False, None),
])
def test_any_of_and_all_of_on_a_real_study(value, votes, any_prunes, any_label, all_prunes, all_label):
    for key, prunes, expected_label in (("any_of", any_prunes, any_label), ("all_of", all_prunes, all_label)):
        pruner = build_pruner({key: [MEDIAN, THRESH]}, CTX)
        study = study_with_history(pruner)
        trial = new_trial(study, value)
        assert child_votes(study, pruner, trial) == votes  # the premise: what each child alone decides
        assert trial.should_prune() is prunes, key
        assert pruner.label_for(trial.number) == expected_label, key
        assert pruner.label_for(0) is None  # completed history trials were never pruned


def test_any_of_credits_the_first_child_that_fired():
    # the threshold comes first and fires alone; a NopPruner never fires
    pruner = build_pruner({"any_of": [{"name": "none"}, THRESH, {"name": "threshold", "args": {"upper": 10.0}}]},
                          CTX)
    study = study_with_history(pruner, n=0)
    low, high = new_trial(study, 0.1), new_trial(study, 0.9)
    assert low.should_prune() is False
    assert high.should_prune() is True
    assert pruner.label_for(low.number) is None
    assert pruner.label_for(high.number) == "threshold"


def test_all_of_needs_every_child():
    pruner = build_pruner({"all_of": [THRESH, {"name": "none"}]}, CTX)
    study = study_with_history(pruner, n=0)
    trial = new_trial(study, 5.0)  # the threshold would prune, the NopPruner never does
    assert trial.should_prune() is False
    assert pruner.label_for(trial.number) is None


def test_nested_composite_labels_the_inner_spec():
    pruner = build_pruner({"any_of": [{"name": "none"}, {"all_of": [THRESH, MEDIAN]}]}, CTX)
    study = study_with_history(pruner)
    trial = new_trial(study, 2.0)
    assert trial.should_prune() is True
    assert pruner.label_for(trial.number) == "all_of(threshold,median)"
    assert pruner.children[1][1].label_for(trial.number) == "threshold+median"


def test_pruned_trial_through_study_optimize():
    """End to end: a study.optimize objective raising TrialPruned when the composite says so."""
    pruner = build_pruner({"any_of": [MEDIAN, THRESH]}, CTX)
    study = optuna.create_study(storage=None, pruner=pruner)
    values = iter([0.3, 0.35, 0.9, 0.2])

    def objective(trial):
        v = next(values)
        for step in range(3):
            trial.report(v, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return v

    study.optimize(objective, n_trials=4)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert pruner.label_for(2) == "median"  # 0.9 is worse than the median of 0.3 and 0.35, listed first
    assert study.trials[2].last_step == 0
