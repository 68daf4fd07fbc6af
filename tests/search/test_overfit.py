"""search/pruners/overfit.py: the rule on fixed curves; the pruner in real Optuna studies (in memory and SQLite)
fed through the one recording path (Recorder over TrialWriter); composed with stock pruners; and end to end
through fit() and the CLI."""

from __future__ import annotations

import statistics
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.models.config import ConfigError
from regsweep.models.train import History
from regsweep.search.cli import main
from regsweep.search.pruners.compose import stop_verdict
from regsweep.search.pruners.overfit import OverfitPruner, overfit_rule
from regsweep.search.pruners.registry import PrunerContext, build_pruner, label
from regsweep.search.record import PRUNED, Objective, Recorder, history
from regsweep.search.report import stop_reason_kind
from regsweep.search.storage import TrialWriter, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

CTX = PrunerContext(epochs=20, source="s.yaml")

# val_loss falls to its best at epoch 4 and rises after it; train_eval_loss keeps falling. The clean gap
# (val - train_eval) narrows up to epoch 4 and widens at every epoch after it:
# gap = 0.3, 0.25, 0.18, 0.15, 0.1 | 0.2, 0.3, 0.39, 0.47, 0.55
DIVERGING_VAL = [1.0, 0.8, 0.6, 0.5, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65]
DIVERGING_TRAIN = [0.7, 0.55, 0.42, 0.35, 0.3, 0.25, 0.2, 0.16, 0.13, 0.1]
BEST = 4  # epoch of the lowest val_loss


def curve(val, train):
    return [{"val_loss": v, "train_eval_loss": t} for v, t in zip(val, train, strict=True)]


def first_fire(history, **kw):
    """(epoch, rule) of the first epoch at which the rule fires on the history so far, or None."""
    for n in range(1, len(history) + 1):
        rule = overfit_rule(history[:n], **kw)
        if rule is not None:
            return n - 1, rule
    return None


DIVERGING = curve(DIVERGING_VAL, DIVERGING_TRAIN)


# ------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("kw, expected", [
    ({"patience": 0, "window": 3}, (7, "gap")),  # widened at 5, 6, 7 and val 0.55 > val@4 0.4
    ({"patience": 0, "window": 2}, (6, "gap")),
    ({"patience": 3, "window": 0}, (7, "plateau")),  # last improvement at 4, + 3
    ({"patience": 2, "window": 0}, (6, "plateau")),
    ({"patience": 3, "window": 2}, (6, "gap")),  # both on: the gap comes first
    ({"patience": 2, "window": 3}, (6, "plateau")),  # both on: the plateau comes first
    ({"patience": 3, "window": 3}, (7, "plateau")),  # both at 7: plateau is checked first
])
def test_diverging_curve_fires_at_the_exact_epoch(kw, expected):
    assert first_fire(DIVERGING, warmup=3, **kw) == expected


def test_the_rule_keeps_firing_once_it_holds():
    assert [overfit_rule(DIVERGING[:n], warmup=3, patience=0, window=3) for n in range(1, 11)] == \
        [None] * 7 + ["gap"] * 3


def test_healthy_curve_never_fires_over_30_epochs():
    val = [0.3 + 2.0 * 0.9 ** e for e in range(30)]
    train = [2.0 * 0.85 ** e for e in range(30)]  # falls faster: the gap widens at first, val still falls
    healthy = curve(val, train)
    assert any(b["val_loss"] - b["train_eval_loss"] > a["val_loss"] - a["train_eval_loss"]
               for a, b in zip(healthy, healthy[1:]))  # the premise: a widening gap is in there
    for kw in ({}, {"warmup": 0, "patience": 1, "window": 1}, {"warmup": 0, "patience": 1, "window": 0},
               {"warmup": 0, "patience": 0, "window": 3}):
        assert first_fire(healthy, **kw) is None, kw


def test_a_widening_gap_while_val_loss_falls_is_not_gap():
    val = [1.0 - 0.05 * e for e in range(10)]
    train = [0.9 - 0.08 * e for e in range(10)]  # gap 0.1 + 0.03 e: widens at every epoch
    for window in (1, 2, 3, 5):
        assert first_fire(curve(val, train), warmup=0, patience=0, window=window) is None, window


# val rises from epoch 0 while train_eval falls: plateau (patience 1) and gap (window 1) both hold from epoch 1
RISING = curve([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [0.5, 0.4, 0.3, 0.2, 0.1, 0.05])


@pytest.mark.parametrize("warmup, expected", [(0, 1), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, None)])
@pytest.mark.parametrize("kw, rule", [({"patience": 1, "window": 0}, "plateau"),
                                      ({"patience": 0, "window": 1}, "gap")])
def test_warmup_is_respected(warmup, expected, kw, rule):
    fired = first_fire(RISING, warmup=warmup, **kw)
    assert fired == (None if expected is None else (expected, rule))
    if expected is not None and expected == warmup:  # the condition held before: silent until epoch == warmup
        assert overfit_rule(RISING[:warmup], warmup=warmup, **kw) is None
        assert overfit_rule(RISING[:warmup + 1], warmup=warmup, **kw) == rule


@pytest.mark.parametrize("val, patience, expected", [
    ([1.0, 0.9, 0.8] + [0.8] * 8, 1, 3),  # an equal value is no improvement
    ([1.0, 0.9, 0.8] + [0.8] * 8, 2, 4),
    ([1.0, 0.9, 0.8] + [0.8] * 8, 3, 5),
    ([1.0, 0.9, 0.8] + [0.8] * 8, 6, 8),
    ([1.0, 0.9, 0.8] + [0.8] * 8, 9, None),  # 8 epochs after the last improvement is all the curve has
    ([1.0, 0.9, 0.95, 0.85, 0.9, 0.86, 0.87], 2, 5),  # an improvement at 3 restarts the count
    ([1.0, 0.9, 0.95, 0.85, 0.9, 0.86, 0.87], 4, None),
])
def test_patience_counts_epochs_since_the_last_improvement(val, patience, expected):
    fired = first_fire(curve(val, [0.1] * len(val)), warmup=0, patience=patience, window=0)
    assert fired == (None if expected is None else (expected, "plateau"))


MIN_DELTA_VAL = [1.0, 0.8, 0.76, 0.74, 0.73, 0.72, 0.65, 0.64, 0.63, 0.62]  # falls at every epoch


@pytest.mark.parametrize("min_delta, patience, expected", [
    (0.0, 1, None),  # every epoch improves
    (0.1, 3, 4),  # best 0.8 at 1; 0.76 .. 0.73 are less than 0.1 better
    (0.1, 5, None),  # 0.65 at 6 is more than 0.1 better than 0.8: the count restarts
    (0.05, 3, 9),  # against the BEST: 0.74 at 3 improves on 0.8 (by 0.06), 0.65 at 6 on 0.74; then 3 short steps
])
def test_improvements_smaller_than_min_delta_do_not_count(min_delta, patience, expected):
    fired = first_fire(curve(MIN_DELTA_VAL, [0.1] * 10), warmup=0, patience=patience, window=0,
                       min_delta=min_delta)
    assert fired == (None if expected is None else (expected, "plateau"))


def test_a_gap_widening_for_window_minus_one_epochs_does_not_fire():
    # val rises after epoch 4 throughout; the gap widens at 5, 6, narrows at 7, widens at 8, 9, narrows at 10
    val = [1.0, 0.8, 0.6, 0.5, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    gap = [0.3, 0.25, 0.18, 0.15, 0.1, 0.2, 0.3, 0.25, 0.3, 0.35, 0.3]
    hist = curve(val, [v - g for v, g in zip(val, gap)])
    assert first_fire(hist, warmup=0, patience=0, window=3) is None
    assert first_fire(hist, warmup=0, patience=0, window=2) == (6, "gap")


# ------------------------------------------------------------------------------------ the pruner
@pytest.mark.parametrize("kw, match", [
    ({"patience": -1}, "patience must be an integer >= 0"),
    ({"warmup": -1}, "warmup must be an integer >= 0"),
    ({"window": 1.5}, "window must be an integer >= 0"),
    ({"patience": True}, "patience must be an integer >= 0"),
    ({"min_delta": -0.1}, "min_delta must be a number >= 0"),
    ({"on_fire": "bogus"}, "on_fire must be one of complete, prune, got 'bogus'"),
    ({"patience": 0, "window": 0}, "patience and window cannot both be 0"),
])
def test_bad_constructor_args_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        OverfitPruner(**kw)


def test_bad_args_in_a_spec_are_a_one_line_config_error():
    with pytest.raises(ConfigError) as exc:
        build_pruner({"name": "overfit", "args": {"on_fire": "bogus"}}, CTX)
    msg = str(exc.value)
    assert msg.startswith("s.yaml: pruner.args: {'on_fire': 'bogus'}") and "overfit: on_fire must be" in msg
    assert "\n" not in msg


def record(epoch, val_loss, train_eval_loss):
    return {"epoch": epoch, "train_loss": train_eval_loss + 0.05, "train_eval_loss": train_eval_loss,
            "train_acc": 0.9, "val_loss": val_loss, "val_acc": 1 - val_loss, "lr": 0.001, "seconds": 0.01}


def make_study(kind, tmp_path, pruner, direction="minimize"):
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat=False) if kind == "sqlite" else None
    return optuna.create_study(storage=storage, pruner=pruner, direction=direction)


def add_finished(study, values, steps=10):
    """Finished trials that reported ``value`` at every step (the others the median guard looks at)."""
    for value in values:
        trial = study.ask()
        for step in range(steps):
            trial.report(value, step)
        study.tell(trial, value)


def drive(study, pruner, objective=Objective("val_loss", "minimize"), val=DIVERGING_VAL, train=DIVERGING_TRAIN):
    """One trial as a sweep runs it: Recorder over TrialWriter, the pruner's verdict after every epoch, the loop
    stopping on a verdict as fit() does, finish() and tell. Returns the trial as stored."""
    trial = study.ask()
    rec = Recorder(TrialWriter(trial), objective,
                   verdict=lambda epoch: stop_verdict(pruner, study, trial._get_latest_trial(), "overfit"))
    epochs, reason = [], "completed"
    for e, (v, t) in enumerate(zip(val, train)):
        epochs.append(record(e, v, t))
        verdict = rec.on_epoch(e, epochs[-1])
        if verdict:
            reason = verdict
            break
    state, value = rec.finish(History(epochs=epochs, stop_reason=reason, n_params=1, split_fingerprint="f" * 16))
    if state == PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value)
    return study.trials[trial.number]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_diverging_trial_stops_complete_with_its_best_epoch(kind, tmp_path):
    pruner = OverfitPruner(warmup=3, patience=5, window=3)  # gap at 7 comes before a plateau at 9
    study = make_study(kind, tmp_path, pruner)
    t = drive(study, pruner)
    assert t.user_attrs["stop_reason"] == "stopped:overfit:gap@7"
    assert t.state == TrialState.COMPLETE
    assert t.value == DIVERGING_VAL[BEST] == 0.4  # the best epoch's value, not the last one (0.55)
    assert t.user_attrs["best_epoch"] == BEST
    assert [e["val_loss"] for e in history(t)] == DIVERGING_VAL[:8]
    assert t.intermediate_values == dict(enumerate(DIVERGING_VAL[:8]))  # stopped right after epoch 7
    assert study.best_trial.number == t.number


@pytest.mark.parametrize("kind, others, verdict", [
    ("sqlite", [0.2, 0.2, 0.2], "pruned:overfit:gap@7"),  # its best (0.4) is behind the median (0.2) at epoch 7
    ("sqlite", [0.6, 0.6, 0.6], "stopped:overfit:gap@7"),
    ("memory", [0.2, 0.2, 0.2], "pruned:overfit:gap@7"),
    ("memory", [0.6, 0.6, 0.6], "stopped:overfit:gap@7"),
    ("memory", [0.4, 0.4, 0.4], "stopped:overfit:gap@7"),  # level with the median is not behind it
    ("memory", [0.2, 0.3, 0.9], "pruned:overfit:gap@7"),  # the median (0.3), not the mean (0.47)
    ("memory", [0.1, 0.5, 0.9], "stopped:overfit:gap@7"),  # the median (0.5), not the best (0.1)
])
def test_complete_unless_behind_the_median_of_finished_trials(kind, tmp_path, others, verdict):
    pruner = OverfitPruner(warmup=3, patience=5, window=3, on_fire="complete")
    study = make_study(kind, tmp_path, pruner)
    add_finished(study, others)
    running = study.ask()  # a RUNNING trial far ahead is not a finished one: it never counts
    for step in range(10):
        running.report(0.01, step)
    t = drive(study, pruner)
    assert t.user_attrs["stop_reason"] == verdict
    assert t.state == (TrialState.PRUNED if verdict.startswith("pruned:") else TrialState.COMPLETE)
    assert t.user_attrs["best_epoch"] == BEST and len(history(t)) == 8
    if t.state == TrialState.COMPLETE:
        assert t.value == 0.4


@pytest.mark.parametrize("kind, others", [("sqlite", [0.6, 0.6, 0.6]), ("memory", []), ("memory", [0.6, 0.6, 0.6]),
                                          ("memory", [0.2, 0.2, 0.2])])
def test_on_fire_prune_always_prunes(kind, tmp_path, others):
    pruner = OverfitPruner(warmup=3, patience=5, window=3, on_fire="prune")
    study = make_study(kind, tmp_path, pruner)
    add_finished(study, others)
    t = drive(study, pruner)
    assert t.user_attrs["stop_reason"] == "pruned:overfit:gap@7" and t.state == TrialState.PRUNED
    assert t.user_attrs["best_epoch"] == BEST


@pytest.mark.parametrize("others, verdict", [([0.9, 0.9, 0.9], "pruned:overfit:gap@7"),
                                             ([0.3, 0.3, 0.3], "stopped:overfit:gap@7")])
def test_the_median_guard_follows_the_direction(others, verdict):
    """Objective val_acc (maximize): behind means a best val_acc BELOW the others' median."""
    pruner = OverfitPruner(warmup=3, patience=5, window=3)
    study = make_study("memory", None, pruner, direction="maximize")
    add_finished(study, others)
    t = drive(study, pruner, Objective("val_acc", "maximize"))
    assert t.user_attrs["stop_reason"] == verdict
    assert t.user_attrs["best_epoch"] == BEST  # the highest val_acc (0.6) is at val_loss's best
    if t.state == TrialState.COMPLETE:
        assert t.value == history(t)[BEST]["val_acc"]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_plain_prune_answers_whether_the_rule_fires(kind, tmp_path):
    pruner = OverfitPruner(warmup=3, patience=5, window=3)  # on_fire complete: prune() is True all the same
    study = make_study(kind, tmp_path, pruner)
    trial = study.ask()
    assert pruner.prune(study, study.trials[trial.number]) is False  # no history yet
    rec = Recorder(TrialWriter(trial), Objective())
    for e in range(8):
        rec.on_epoch(e, record(e, DIVERGING_VAL[e], DIVERGING_TRAIN[e]))
        frozen = study.trials[trial.number]
        assert pruner.prune(study, frozen) is (e == 7), e
        assert trial.should_prune() is (e == 7), e  # through Optuna's own API
    assert pruner.verdict(study, frozen) == "stopped:overfit:gap@7"


# ------------------------------------------------------------------------------------ composition
OVERFIT = {"name": "overfit", "args": {"warmup": 3, "patience": 5, "window": 3}}  # fires gap@7 on DIVERGING
MEDIAN = {"name": "median", "args": {"n_startup_trials": 1, "n_warmup_steps": 0}}
THRESHOLD_AT_7 = {"name": "threshold", "args": {"upper": 0.5, "n_warmup_steps": 5}}  # 0.55 at 7 is the first above
THRESHOLD_EARLY = {"name": "threshold", "args": {"upper": 0.5}}  # fires at 0, 1, 2 (and 7, 8, 9), not 3 to 6
THRESHOLD_NEVER = {"name": "threshold", "args": {"upper": 10.0}}


@pytest.mark.parametrize("spec, others, reason, n_epochs", [
    # any_of: the first fire ends the trial; a pruned verdict wins over a stopped one, whatever the order
    ({"any_of": [OVERFIT, THRESHOLD_AT_7]}, [], "pruned:threshold@7", 8),
    ({"any_of": [THRESHOLD_AT_7, OVERFIT]}, [], "pruned:threshold@7", 8),
    ({"any_of": [OVERFIT, THRESHOLD_NEVER]}, [], "stopped:overfit:gap@7", 8),
    ({"any_of": [MEDIAN, OVERFIT]}, [0.2, 0.2, 0.2], "pruned:median@0", 1),  # 1.0 at 0 is behind 0.2
    ({"any_of": [MEDIAN, OVERFIT]}, [0.6, 0.6, 0.6], "pruned:median@0", 1),
    ({"any_of": [MEDIAN, OVERFIT]}, [1.5, 1.5, 1.5], "stopped:overfit:gap@7", 8),  # never behind
    # all_of: only when every child fires; pruned only when every child prunes, names joined
    ({"all_of": [MEDIAN, OVERFIT]}, [0.2, 0.2, 0.2], "pruned:median+overfit:gap@7", 8),
    ({"all_of": [OVERFIT, MEDIAN]}, [0.2, 0.2, 0.2], "pruned:overfit:gap+median@7", 8),
    ({"all_of": [THRESHOLD_EARLY, OVERFIT]}, [], "stopped:threshold+overfit:gap@7", 8),  # 0..2: threshold alone
    ({"all_of": [OVERFIT, THRESHOLD_AT_7]}, [], "stopped:overfit:gap+threshold@7", 8),
    ({"all_of": [MEDIAN, OVERFIT]}, [1.5, 1.5, 1.5], "completed", 10),  # overfit fires 7..9, median never
    ({"all_of": [THRESHOLD_NEVER, OVERFIT]}, [], "completed", 10),
])
def test_composites_decide_through_the_recorder(spec, others, reason, n_epochs):
    pruner = build_pruner(spec, CTX)
    study = make_study("memory", None, pruner)
    add_finished(study, others)
    trial = study.ask()
    rec = Recorder(TrialWriter(trial), Objective(),
                   verdict=lambda epoch: stop_verdict(pruner, study, trial._get_latest_trial(), label(spec)))
    got = "completed"
    for e in range(10):
        got = rec.on_epoch(e, record(e, DIVERGING_VAL[e], DIVERGING_TRAIN[e])) or got
        if got != "completed":
            break
    assert got == reason
    assert len(rec.history) == n_epochs
    state, value = rec.finish(History(epochs=rec.history, stop_reason=got))
    assert state == ("PRUNED" if reason.startswith("pruned:") else "COMPLETE")
    if state == "COMPLETE":
        assert value == 0.4 and study.trials[trial.number].user_attrs["best_epoch"] == BEST


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_composite_verdict_is_recorded_as_the_stop_reason(kind, tmp_path):
    spec = {"all_of": [MEDIAN, OVERFIT]}
    pruner = build_pruner(spec, CTX)
    study = make_study(kind, tmp_path, pruner)
    add_finished(study, [0.2, 0.2, 0.2])
    t = drive(study, pruner)
    assert t.user_attrs["stop_reason"] == "pruned:median+overfit:gap@7" and t.state == TrialState.PRUNED
    assert stop_reason_kind(t.user_attrs["stop_reason"]) == "pruned:median+overfit:gap"


# ------------------------------------------------------------------------------------ end to end
SPEC = """
name: ovf
base:
  model: {name: cnn, widths: [8, 16]}
  data: {name: digits, batch_size: 64}
  optim: {name: adamw, lr: 3.0e-3}
  train: {epochs: 6, num_threads: 1, train_eval_size: 128}
objective: {metric: val_loss}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
sampler: {name: tpe, seed: 0}
pruner: {name: overfit, args: {warmup: 1, patience: 2, window: 0, min_delta: 100.0}}
budget: {n_trials: 3}
"""


def test_every_trial_plateaus_at_epoch_2_through_fit_and_the_cli(tmp_path, capsys):
    """min_delta 100 makes no epoch an improvement after the first: with patience 2 and warmup 1 every trial
    plateaus at epoch 2, whatever it learns; it ends PRUNED only when behind the median of those before it."""
    spec = tmp_path / "ovf.yaml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["run", str(spec), "--storage", url]) == 0
    study = optuna.load_study(study_name="ovf", storage=url)
    assert len(study.trials) == 3
    for t in study.trials:
        hist = history(t)
        vals = [e["val_loss"] for e in hist]
        assert [e["epoch"] for e in hist] == [0, 1, 2]  # train.epochs is 6: the pruner stopped fit()
        assert t.intermediate_values == dict(enumerate(vals))
        assert t.user_attrs["best_epoch"] == vals.index(min(vals))
        earlier = [o.intermediate_values[2] for o in study.trials[:t.number]]
        behind = bool(earlier) and min(vals) > statistics.median(earlier)
        assert t.user_attrs["stop_reason"] == ("pruned" if behind else "stopped") + ":overfit:plateau@2"
        assert t.state == (TrialState.PRUNED if behind else TrialState.COMPLETE)
        if not behind:
            assert t.value == min(vals)  # the best of its 3 epochs
    assert study.trials[0].user_attrs["stop_reason"] == "stopped:overfit:plateau@2"  # nobody before it
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "ovf"]) == 0
    out = capsys.readouterr().out
    kinds = Counter(t.user_attrs["stop_reason"].split("@")[0] for t in study.trials)
    assert "stop reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) in out
    assert "stopped:overfit:plateau" in out
