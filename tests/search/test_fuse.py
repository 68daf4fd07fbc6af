"""Fused trials through the real search path (issue 20): `fuse: N` sweeps on SQLite, the group's asking and
recording, a member pruned and one sent to NaN, the solo replay reference and the export that replays it."""

from __future__ import annotations

import json
import textwrap
from collections import Counter

import optuna
import pytest
import torch
from optuna.trial import TrialState

from regsweep.search.cli import main
from regsweep.search.record import history as records_of
from regsweep.search.record import replay_reference
from tests.search.conftest import assert_exact, cli, tiny_spec, wait_ok  # pytest (importlib mode) registers it

BASE = """
model: {name: cnn, widths: [8], dropout: 0.0, bn: none, init: default}
data: {name: digits, val_fraction: 0.2, test_fraction: 0.2, split_seed: 0, batch_size: 64}
optim: {name: adamw, lr: 3.0e-3, weight_decay: 0.0}
scheduler: {name: none}
train: {epochs: 3, seed: 0, num_threads: 1, train_eval_size: 64,
        early_stopping: {monitor: val_loss, patience: 5, min_delta: 0.0, restore_best: true}}
"""
# the digits demo's structural choices (BN placement, scheduler) are searched: groups must fix them
SWEEP = """
name: {name}
base: base.yaml
objective: {{metric: val_loss, direction: minimize}}
space:
  model.dropout: {{type: float, low: 0.0, high: 0.6}}
  optim.weight_decay: {{type: float, low: 1.0e-6, high: 1.0e-1, log: true}}
  model.bn: {{type: categorical, choices: [none, before_act, after_act]}}
  scheduler.name: {{type: categorical, choices: [none, step, cosine]}}
  scheduler.gamma: {{type: float, low: 0.1, high: 0.9, when: {{scheduler.name: step}}}}
sampler: {{name: tpe, seed: 0, args: {{n_startup_trials: 8}}}}
pruner: {{name: median, args: {{n_startup_trials: 5, n_warmup_steps: 1}}}}
budget: {{n_trials: {n}}}
enqueue: [{{}}]
fuse: {fuse}
"""
STRUCTURAL_PARAMS = ("model.bn", "scheduler.name")


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv("REGSWEEP_PROGRESS", "off")


def write_spec(d, text: str):
    (d / "base.yaml").write_text(BASE)
    (d / "s.yaml").write_text(textwrap.dedent(text))
    return d / "s.yaml"


def load(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def fused_sweep(tmp_path_factory):
    """`regsweep run` of 24 digits trials with `fuse: 8` on SQLite (in process), once for this module."""
    root = tmp_path_factory.mktemp("fz")
    spec = write_spec(root, SWEEP.format(name="fz", n=24, fuse=8))
    url = f"sqlite:///{root}/fz.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGSWEEP_PROGRESS", "off")
        assert main(["run", str(spec), "--storage", url]) == 0
    return root, url, load(url, "fz")


def test_a_fused_digits_sweep_keeps_the_budget_and_records_every_trial_as_a_solo_one(fused_sweep):
    _, _, study = fused_sweep
    trials = study.get_trials()
    assert_exact(trials, 24)
    assert len(trials) == 24
    groups: dict[int, list] = {}
    for t in trials:
        fused = t.user_attrs["fused"]
        assert set(fused) == {"group", "size"}
        groups.setdefault(fused["group"], []).append(t)
        recs = records_of(t)
        assert [r["epoch"] for r in recs] == list(range(len(recs))) and recs  # dense from epoch 0
        assert t.user_attrs["history_len"] == len(recs)
        # plain Optuna reads the same values: one intermediate value per epoch, the value at the best epoch
        assert t.intermediate_values == {r["epoch"]: r["val_loss"] for r in recs}
        assert t.value == recs[t.user_attrs["best_epoch"]]["val_loss"]
        for key in ("stop_reason", "best_epoch", "n_params", "device", "seed", "num_threads", "split_fingerprint",
                    "config", "worker"):
            assert key in t.user_attrs, (t.number, key)
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["stop_reason"].startswith("pruned:median@")
    for number, members in groups.items():
        assert number == min(t.number for t in members)
        assert all(t.user_attrs["fused"]["size"] <= min(8, len(members)) for t in members)  # slots (refills join)
        for path in STRUCTURAL_PARAMS:  # the base trial has no params: its config holds the base's values
            values = {_get(t.user_attrs["config"], path) for t in members}
            assert len(values) == 1, (number, path, values)
    assert sum(len(m) for m in groups.values()) / len(groups) >= 0.75 * 8


def _get(d: dict, path: str):
    for part in path.split("."):
        d = d[part]
    return d


def test_the_exported_best_fused_trial_replays_its_solo_reference_exactly(fused_sweep):
    root, url, study = fused_sweep
    best = study.best_trial
    ref = replay_reference(study.user_attrs, best.number)  # recorded by `run` after the budget
    assert ref is not None and ref["fused"] == best.user_attrs["fused"]
    # on the CPU a fused group trains in loop mode, bit-identical to a solo run: the reference is the history
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ref["history"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in records_of(best)]
    out = root / "best.yaml"
    assert main(["export", "--storage", url, "--study-name", "fz", "--out", str(out)]) == 0
    assert "replay_reference: {study_attr: 'regsweep:replay:" in out.read_text()
    assert main(["train", str(out), "--out", str(root / "replay")]) == 0
    replayed = json.loads((root / "replay" / "history.json").read_text())["epochs"]
    assert [r["val_loss"] for r in replayed] == [r["val_loss"] for r in ref["history"]]
    assert [r["train_loss"] for r in replayed] == [r["train_loss"] for r in ref["history"]]


def test_export_trial_of_a_fused_trial_records_its_missing_reference_once(fused_sweep, capsys):
    root, url, study = fused_sweep
    other = next(t for t in study.get_trials() if t.number != study.best_trial.number
                 and t.state == TrialState.COMPLETE)
    assert replay_reference(study.user_attrs, other.number) is None
    assert main(["export", "--storage", url, "--study-name", "fz", "--trial", str(other.number)]) == 0
    assert "training it alone once as its replay reference" in capsys.readouterr().err
    ref = replay_reference(load(url, "fz").user_attrs, other.number)
    assert [r["val_loss"] for r in ref["history"]] == [r["val_loss"] for r in records_of(other)]
    assert main(["export", "--storage", url, "--study-name", "fz", "--trial", str(other.number)]) == 0
    assert "training it alone" not in capsys.readouterr().err  # once


# a group of four enqueued trials: two ordinary, one pruned at epoch 1 (lr so small val_loss stays ~2.38, above
# the threshold), one sent to NaN by lr 1e30 at epoch 0; the failed one's place in the budget goes to a fifth
# enqueued trial, which refills its slot in the group at the group's epoch 1
GROUP = """
name: {name}
base: base.yaml
objective: {{metric: val_loss, direction: minimize}}
space:
  optim.lr: {{type: float, low: 1.0e-8, high: 1.0e+31, log: true}}
  model.dropout: {{type: float, low: 0.0, high: 0.5}}
sampler: {{name: random, seed: 0}}
pruner: {{name: threshold, args: {{upper: 2.2, n_warmup_steps: 1}}}}
budget: {{n_trials: {n}}}
enqueue: {enqueue}
fuse: {fuse}
keep_weights: all
"""
A, B = {"optim.lr": 3.0e-3, "model.dropout": 0.0}, {"optim.lr": 1.0e-2, "model.dropout": 0.2}
PRUNED_ONE, NAN_ONE = {"optim.lr": 1.0e-7, "model.dropout": 0.1}, {"optim.lr": 1.0e+30, "model.dropout": 0.0}
FIFTH = {"optim.lr": 1.0e-3, "model.dropout": 0.3}


def _run_group(d, name: str, members: list[dict], n: int):
    d.mkdir()
    spec = write_spec(d, GROUP.format(name=name, n=n, fuse=4, enqueue=json.dumps(members)))
    url = f"sqlite:///{d}/g.db"
    assert main(["run", str(spec), "--storage", url]) == 0
    trials = load(url, name).get_trials()
    assert_exact(trials, n)
    return trials


def test_a_pruned_and_a_nan_member_leave_the_others_records_as_without_them(tmp_path, quiet):
    both = _run_group(tmp_path / "all", "all", [A, PRUNED_ONE, B, NAN_ONE, FIFTH], 4)
    assert [t.user_attrs["fused"]["size"] for t in both[:4]] == [4, 4, 4, 4]
    assert both[4].user_attrs["fused"] == {"group": 0, "size": 4} and both[4].params == FIFTH  # refilled slot
    assert both[4].datetime_start > both[3].datetime_complete  # asked when the NaN member had freed its slot
    assert both[1].state == TrialState.PRUNED and both[1].user_attrs["stop_reason"] == "pruned:threshold@1"
    assert [r["epoch"] for r in records_of(both[1])] == [0, 1]
    assert both[3].state == TrialState.FAIL
    assert both[3].user_attrs["stop_reason"].startswith("failed:non-finite train_loss at epoch 0")
    assert both[0].state == both[2].state == TrialState.COMPLETE
    # the pruned and the failed member ended when they stopped, while the others trained on (not at the group's end)
    assert both[3].datetime_complete < both[1].datetime_complete < min(both[0].datetime_complete,
                                                                       both[2].datetime_complete)
    alone = _run_group(tmp_path / "two", "two", [A, B], 2)
    assert [t.user_attrs["fused"]["size"] for t in alone] == [2, 2]

    def strip(t):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records_of(t)]

    assert strip(both[0]) == strip(alone[0]) and strip(both[2]) == strip(alone[1])
    assert both[0].value == alone[0].value and both[2].value == alone[1].value
    # the trial that joined at the group's epoch 1 trained its whole run as it does alone (a group of one)
    five = _run_group(tmp_path / "five", "five", [FIFTH], 1)
    assert "fused" not in five[0].user_attrs
    assert strip(both[4]) == strip(five[0]) and both[4].value == five[0].value
    # keep_weights: all stores every member's best-epoch weights, the refill's too (its model is watched as it joins)
    from regsweep.models.build import build
    from regsweep.models.config import TrainConfig
    from regsweep.models.train import evaluate
    from regsweep.search.artifacts import open_store, stored_weights

    store = open_store(str(tmp_path / "all" / "g-artifacts"))
    kept = stored_weights(load(f"sqlite:///{tmp_path / 'all'}/g.db", "all"), store)
    assert sorted(kept) == [0, 1, 2, 4]  # COMPLETE and PRUNED trials; the NaN member failed
    reader = store.open_reader(kept[4])
    try:
        (tmp_path / "w4.pt").write_bytes(reader.read())
    finally:
        reader.close()
    payload = torch.load(tmp_path / "w4.pt", weights_only=True)
    assert (payload["trial"], payload["best_epoch"]) == (4, both[4].user_attrs["best_epoch"])
    parts = build(TrainConfig.from_dict(payload["config"]), "cpu")
    parts.model.load_state_dict(payload["state_dict"])
    assert evaluate(parts.model, parts.eval_loader("val"))[0] == pytest.approx(both[4].value, rel=1e-9, abs=1e-12)


def test_fuse_flag_overrides_the_spec_and_members_fusable_refuses_run_alone(tmp_path, quiet):
    """`run --fuse 3` on a `fuse: 8` spec: groups of at most 3; three enqueued trials of three BN placements (a
    structural field) asked as one group run each alone, as solo trials (no `fused` attr)."""
    spec = write_spec(tmp_path, SWEEP.format(name="fl", n=6, fuse=8))
    url = f"sqlite:///{tmp_path}/fl.db"
    assert main(["run", str(spec), "--storage", url, "--fuse", "3"]) == 0
    sizes = Counter(t.user_attrs["fused"]["group"] for t in load(url, "fl").get_trials())
    assert max(sizes.values()) <= 3 and sum(sizes.values()) == 6
    text = SWEEP.format(name="w", n=3, fuse=4).replace(
        "enqueue: [{}]", "enqueue: [{model.bn: none}, {model.bn: before_act}, {model.bn: after_act}]")
    spec = write_spec(tmp_path, text)
    assert main(["run", str(spec), "--storage", url]) == 0
    trials = load(url, "w").get_trials()
    assert_exact(trials, 3)
    assert all("fused" not in t.user_attrs for t in trials)


def test_a_groups_epoch_records_are_one_transaction(tmp_path):
    """storage.write_group: the members' epoch writes (attrs + report) in ONE commit on an RDB storage, each
    trial's cached view kept as Trial.set_user_attr/report keep it."""
    from sqlalchemy import event

    from regsweep.search.fused_trial import write_group
    from regsweep.search.storage import TrialWriter

    url = f"sqlite:///{tmp_path}/w.db"
    study = optuna.create_study(study_name="w", storage=url)
    trials = [study.ask() for _ in range(3)]
    writers = [TrialWriter(t) for t in trials]
    commits = []
    engine = study._storage._backend.engine  # a test may look inside Optuna's cached storage (modules may not)
    event.listen(engine, "commit", lambda conn: commits.append(1))
    assert write_group([(w, {"history_len": 1, "k": i}, (0.5 + i, 0)) for i, w in enumerate(writers)]) == 1
    assert len(commits) == 1
    for i, t in enumerate(trials):
        assert t.user_attrs["k"] == i  # the live trial's cached view
    for i, t in enumerate(optuna.load_study(study_name="w", storage=url).trials):  # the database
        assert t.user_attrs["k"] == i and t.intermediate_values == {0: 0.5 + i}


def _hb_study(tmp_path, sampler=None):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/hb.db", heartbeat_interval=1)
    return optuna.create_study(study_name="hb", storage=storage, sampler=sampler), f"sqlite:///{tmp_path}/hb.db"


def _fixed(trial) -> dict:
    """A torch-free objective's fixed_params: one structural choice and one free number, sampled now."""
    trial.suggest_float("x", 0.0, 1.0)
    return {"bn": trial.suggest_categorical("bn", ["none", "before_act", "after_act"])}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_ask_group_fixes_the_first_trials_structure_and_never_exceeds_the_budget(tmp_path):
    from regsweep.search.fuse import ask_group
    from regsweep.search.loop import counts

    study, url = _hb_study(tmp_path, optuna.samplers.RandomSampler(seed=1))
    trials, done = ask_group(study, url, 5, 8, _fixed)
    assert done == 0 and len(trials) == 5 and counts(study) == (0, 5)  # the room left, not the group size
    assert len({t.params["bn"] for t in trials}) == 1 and len({t.params["x"] for t in trials}) == 5
    assert isinstance(study.sampler, optuna.samplers.RandomSampler)  # the study's own sampler back
    assert ask_group(study, url, 5, 8, _fixed) == ([], 0)
    for t in trials[:2]:
        study.tell(t, 0.5)
    more, done = ask_group(study, url, 7, 8, _fixed)
    assert done == 2 and len(more) == 2 and counts(study) == (2, 5)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_run_group_beats_for_every_member_and_tells_each_its_own_end(tmp_path):
    import time

    from regsweep.search import optuna_internals as internals
    from regsweep.search.fuse import run_group
    from regsweep.search.trial import Outcome

    study, _ = _hb_study(tmp_path)
    trials = [study.ask() for _ in range(3)]  # no first heartbeat: run_group's must cover all three
    ids = [internals.trial_id(t) for t in trials]
    backend = internals.rdb_backend(internals.study_storage(study))
    seen = []

    class Group:
        fuse = 3

        def run_group(self, asked, told=None, refill=None):
            deadline = time.monotonic() + 10
            while internals.beating_trial_ids(backend, ids) != set(ids) and time.monotonic() < deadline:
                time.sleep(0.1)
            seen.append(internals.beating_trial_ids(backend, ids))
            ends = [Outcome("COMPLETE", 0.25, "completed"), Outcome("PRUNED", None, "pruned:median@1"),
                    Outcome("FAIL", None, "failed:non-finite train_loss at epoch 0")]
            told(1, ends[1])  # member 1 ends first: told now, while the others still train
            seen.append([t.state for t in study.get_trials()])
            return ends

    frozen = run_group(study, trials, Group())
    assert seen == [set(ids), [TrialState.RUNNING, TrialState.PRUNED, TrialState.RUNNING]]
    assert [t.state for t in frozen] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert frozen[0].value == 0.25
    assert frozen[2].user_attrs["stop_reason"] == "failed:non-finite train_loss at epoch 0"
    assert len(study.get_trials()) == 3  # a member's own failure is not retried


def test_tpe_sees_the_running_members_when_fused(tmp_path):
    from regsweep.search.spec import load_spec

    spec = load_spec(write_spec(tmp_path, SWEEP.format(name="t", n=4, fuse=4)))
    assert spec.make_sampler()._constant_liar is True  # (Optuna 5's default too; older ones defaulted to False)
    unfused = load_spec(write_spec(tmp_path, SWEEP.format(name="t", n=4, fuse=1)))
    assert unfused.spec_hash() == spec.spec_hash()  # fuse is not in the spec hash


@pytest.mark.slow  # ~23 s on 2 cores (two worker processes import torch): over this CI share
@pytest.mark.procs
def test_run_workers_passes_fuse_to_its_workers(tmp_path):
    """`run --workers 2 --fuse 3`: each `regsweep worker` child asks and trains groups of up to 3; the budget is
    exact across both."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec("wf", 6, 2))
    url = f"sqlite:///{tmp_path}/wf.db"
    wait_ok(cli("run", str(spec), "--storage", url, "--workers", "2", "--fuse", "3",
                env={"REGSWEEP_PROGRESS": "off"}))
    trials = load(url, "wf").get_trials()
    assert_exact(trials, 6)
    fused = [t.user_attrs.get("fused") for t in trials]
    assert all(f is not None and f["size"] <= 3 for f in fused), fused
    assert max(f["size"] for f in fused) > 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_sigterm_during_a_group_fails_and_requeues_the_unfinished_members(tmp_path):
    from regsweep.search.fuse import run_group
    from regsweep.search.signals import Terminated
    from regsweep.search.trial import Outcome

    study, _ = _hb_study(tmp_path)
    trials = [study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(3)]

    class Group:
        fuse = 3

        def run_group(self, asked, told=None, refill=None):  # member 0 trained alone and ended before the signal
            exc = Terminated()
            exc.outcomes = {0: Outcome("COMPLETE", 0.5, "completed")}
            raise exc

    with pytest.raises(Terminated):
        run_group(study, trials, Group())
    after = study.get_trials()
    assert [t.state for t in after[:3]] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert after[0].value == 0.5
    assert all(t.user_attrs["stop_reason"] == "failed:terminated" for t in after[1:3])
    assert [t.state for t in after[3:]] == [TrialState.WAITING] * 2  # each unfinished one re-queued, same params
    assert [t.params for t in after[3:]] == [t.params for t in after[1:3]]


def test_fused_members_each_get_their_tensorboard_run(tmp_path, quiet):
    """Trackers see every member of a group as its own trial (start, each epoch, end): one event directory per
    trial with its recorded curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec("tb", 3, 2) + "fuse: 3\n")
    url = f"sqlite:///{tmp_path}/tb.db"
    assert main(["run", str(spec), "--storage", url, "--tensorboard", str(tmp_path / "tb")]) == 0
    trials = load(url, "tb").get_trials()
    assert [t.user_attrs["fused"]["size"] for t in trials] == [3, 3, 3]
    for t in trials:
        acc = EventAccumulator(str(tmp_path / "tb" / "tb" / f"trial-{t.number:05d}"))
        acc.Reload()
        assert [s.value for s in acc.Scalars("val_loss")] == pytest.approx([r["val_loss"] for r in records_of(t)],
                                                                          rel=1e-6)


def test_a_vmap_fused_best_trial_replays_its_solo_reference_not_its_fused_history(tmp_path, quiet, monkeypatch):
    """vmap mode (an accelerator's default, forced here on the CPU) is not bit-identical to a solo run: `run`
    records the best trial's solo reference, and `regsweep train` on the export reproduces THAT exactly."""
    import functools

    from regsweep.search import fused_trial, replay

    monkeypatch.setattr(fused_trial, "train_fused", functools.partial(fused_trial.train_fused, mode="vmap"))
    solo_fits, real_fit = [], replay.fit  # vmap is bit-identical to a solo run on some CPUs: spy on the solo fit

    def spy_fit(cfg, device=None):
        solo_fits.append(real_fit(cfg, device))
        return solo_fits[-1]

    monkeypatch.setattr(replay, "fit", spy_fit)
    spec = write_spec(tmp_path, SWEEP.format(name="vm", n=4, fuse=4).replace(
        "enqueue: [{}]", "enqueue: [{model.bn: before_act, scheduler.name: none}]"))
    url = f"sqlite:///{tmp_path}/vm.db"
    assert main(["run", str(spec), "--storage", url]) == 0
    study = load(url, "vm")
    best = study.best_trial
    assert best.user_attrs["fused"]["size"] == 4
    ref = replay_reference(study.user_attrs, best.number)
    recorded = [r["val_loss"] for r in records_of(best)]
    solo = [r["val_loss"] for r in ref["history"]]
    assert solo == pytest.approx(recorded, rel=1e-3)  # close; bit-identical on some CPUs, not on others
    assert len(solo_fits) == 1 and solo == [r["val_loss"] for r in solo_fits[0].epochs]  # a solo fit, not the fused
    out = tmp_path / "best.yaml"
    assert main(["export", "--storage", url, "--study-name", "vm", "--out", str(out)]) == 0
    assert main(["train", str(out), "--out", str(tmp_path / "replay")]) == 0
    replayed = json.loads((tmp_path / "replay" / "history.json").read_text())["epochs"]
    assert [r["val_loss"] for r in replayed] == solo


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_ask_more_refills_with_the_groups_structure_within_the_budget(tmp_path):
    """search/fuse.py ask_more (a freed slot's refill): the group's fixed params, never past the budget's room."""
    from regsweep.search.fuse import ask_group, ask_more
    from regsweep.search.loop import counts

    study, url = _hb_study(tmp_path, optuna.samplers.RandomSampler(seed=3))
    group, _ = ask_group(study, url, 6, 4, _fixed)
    fixed = {"bn": group[0].params["bn"]}
    study.tell(group[1], state=TrialState.PRUNED)  # a member stopped: its slot is free
    more = ask_more(study, url, 6, 3, fixed, _fixed)
    assert len(more) == 2 and counts(study) == (1, 5)  # asked 3; the room: 6 - 1 pruned - 3 running
    assert {t.params["bn"] for t in more} == {fixed["bn"]} and len({t.params["x"] for t in group + more}) == 6
    assert isinstance(study.sampler, optuna.samplers.RandomSampler)
    assert ask_more(study, url, 6, 3, fixed, _fixed) == []  # the budget is full


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_refills_join_the_heartbeat_and_the_results_and_stop_at_the_workers_deadline(tmp_path):
    """search/fuse.py run_group's refill: new trials (the first trial's structure, within the budget) join the
    list, the heartbeat and the results after the asked ones; past the worker's deadline it asks none."""
    import time

    from regsweep.search import optuna_internals as internals
    from regsweep.search.fuse import run_group
    from regsweep.search.loop import counts
    from regsweep.search.trial import Outcome

    for deadline, expect in ((None, 2), (time.monotonic() - 1, 0)):
        (tmp_path / str(expect)).mkdir()
        study, url = _hb_study(tmp_path / str(expect), optuna.samplers.RandomSampler(seed=0))
        trials = [study.ask() for _ in range(2)]
        for t in trials:
            _fixed(t)
        got = {}

        class Group:
            fuse = 2

            def fixed_params(self, trial):
                return _fixed(trial)

            def run_group(self, asked, told=None, refill=None):
                told(0, Outcome("PRUNED", None, "pruned:median@1"))  # a slot frees
                got["new"] = refill(2)
                got["running"] = counts(study)
                new_ids = {internals.trial_id(t) for t in got["new"]}
                backend = internals.rdb_backend(internals.study_storage(study))
                until = time.monotonic() + 10  # the heartbeat (1 s here) beats the refills too
                while internals.beating_trial_ids(backend, list(new_ids)) != new_ids and time.monotonic() < until:
                    time.sleep(0.1)
                got["beating"] = internals.beating_trial_ids(backend, list(new_ids)) == new_ids
                return [Outcome("PRUNED", None, "pruned:median@1")] + \
                    [Outcome("COMPLETE", 0.5, "completed")] * (1 + len(got["new"]))

        frozen = run_group(study, trials, Group(), url, 5, deadline)
        assert len(got["new"]) == expect and counts(study)[1] == 0
        assert {t.params["bn"] for t in got["new"]} <= {trials[0].params["bn"]}  # the first trial's structure
        assert [t.state for t in frozen] == [TrialState.PRUNED] + [TrialState.COMPLETE] * (1 + expect)
        assert got["running"] == (1, 1 + expect) and got["beating"]
