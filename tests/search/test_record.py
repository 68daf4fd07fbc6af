"""The one recording path: Recorder over TrialWriter, on an RDB storage (batched transactions) and on
Optuna's in-memory storage (public calls) — both must leave the same trial behind."""

import math

import optuna
import pytest

from regsweep.models.train import History
from regsweep.search.record import COMPLETE, FAIL, PRUNED, Objective, Recorder, best_epoch, history, outcome
from regsweep.search.storage import TrialWriter, open_storage

CURVE = [0.9, 0.5, 0.4, 0.45, 0.6]


def _study(kind, tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'r.db'}", heartbeat=False) if kind == "sqlite" else None
    return optuna.create_study(storage=storage, study_name=f"r-{kind}")


def _record(epoch, val_loss):
    return {"epoch": epoch, "train_loss": 0.3, "train_eval_loss": 0.2, "train_acc": 0.9, "val_loss": val_loss,
            "val_acc": 1 - val_loss, "lr": 0.001, "seconds": 0.01}


def _run(study, stop_at=None):
    trial = study.ask()
    writer = TrialWriter(trial)
    rec = Recorder(writer, Objective("val_loss", "minimize"), verdict=lambda epoch: None)
    rec.start({"model": {"dropout": 0.1}})
    assert "config" not in study.trials[-1].user_attrs  # written with the first epoch, not before
    for e, v in enumerate(CURVE[:stop_at]):
        rec.on_epoch(e, _record(e, v))
        frozen = trial._cached_frozen_trial if hasattr(trial, "_cached_frozen_trial") else None
        if frozen is not None:  # pruners read the trial's cached view: it must see every write
            assert frozen.intermediate_values[e] == v and len(history(frozen)) == e + 1
    hist = History(epochs=[_record(e, v) for e, v in enumerate(CURVE)], stop_reason="completed", n_params=7,
                   split_fingerprint="f" * 16, test={"test_loss": 0.5, "test_acc": 0.8})
    state, value = rec.finish(hist)
    study.tell(trial, value)
    return writer, state, value


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_recorder_writes_the_contract(kind, tmp_path):
    study = _study(kind, tmp_path)
    writer, state, value = _run(study)
    assert (writer._rdb is not None) == (kind == "sqlite")  # batched on RDB, public calls elsewhere
    t = study.trials[0]
    assert state == COMPLETE and value == 0.4 and t.value == 0.4
    assert t.intermediate_values == dict(enumerate(CURVE))
    assert [e["val_loss"] for e in history(t)] == CURVE
    assert t.user_attrs["best_epoch"] == 2 and t.user_attrs["stop_reason"] == "completed"
    assert t.user_attrs["config"] == {"model": {"dropout": 0.1}}
    assert t.user_attrs["n_params"] == 7 and t.user_attrs["test_acc"] == 0.8


def test_both_storages_record_the_same_trial(tmp_path):
    a, b = _study("sqlite", tmp_path), _study("memory", tmp_path)
    _run(a), _run(b)
    ta, tb = a.trials[0], b.trials[0]
    assert ta.user_attrs == tb.user_attrs and ta.intermediate_values == tb.intermediate_values


def test_non_finite_epochs_are_kept_in_history_but_not_reported(tmp_path):
    study = _study("sqlite", tmp_path)
    trial = study.ask()
    rec = Recorder(TrialWriter(trial), Objective())
    rec.on_epoch(0, _record(0, 0.5))
    rec.on_epoch(1, _record(1, math.nan))
    t = study.trials[0]
    assert len(history(t)) == 2 and t.intermediate_values == {0: 0.5}


def test_a_step_reported_twice_is_ignored_like_optuna_does(tmp_path):
    study = _study("sqlite", tmp_path)
    trial = study.ask()
    writer = TrialWriter(trial)
    writer.report(0.5, 0)
    writer.report(0.7, 0)
    assert study.trials[0].intermediate_values == {0: 0.5}


def test_fail_before_the_first_epoch_writes_config_and_reason(tmp_path):
    study = _study("sqlite", tmp_path)
    trial = study.ask()
    rec = Recorder(TrialWriter(trial), Objective())
    rec.start({"x": 1})
    rec.fail("failed:RuntimeError: boom")
    attrs = study.trials[0].user_attrs
    assert attrs == {"config": {"x": 1}, "stop_reason": "failed:RuntimeError: boom"}


def test_pruning_verdict_names_the_pruner_and_epoch(tmp_path):
    study = _study("sqlite", tmp_path)
    trial = study.ask()
    rec = Recorder(TrialWriter(trial), Objective(), verdict=lambda epoch: f"pruned:median@{epoch}")
    assert rec.on_epoch(0, _record(0, 0.5)) == "pruned:median@0"


def test_best_epoch_and_outcome_helpers():
    hist = [_record(0, 0.5), _record(1, math.nan), _record(2, 0.3), _record(3, 0.3)]
    assert best_epoch(hist, Objective("val_loss", "minimize")) == 2  # first of ties, NaN skipped
    assert best_epoch(hist, Objective("val_acc", "maximize")) == 2
    assert best_epoch([], Objective()) is None
    assert (outcome("completed"), outcome("early_stopped"), outcome("stopped:overfit:gap@3")) == (COMPLETE,) * 3
    assert outcome("pruned:median@2") == PRUNED and outcome("failed:x") == FAIL
