"""Issue 17, records that scale: record format 2 (a constant-size write per epoch: the current chunk of
``CHUNK`` epochs + ``history_len``) behind ``record.history``; old-format studies resume and mix formats;
status/export read counts and one trial, never every trial's per-epoch attrs; the dashboard leaves them out."""

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import optuna
import pytest

from regsweep.search import optuna_internals as internals
from regsweep.search.cli import main
from regsweep.search.record import CHUNK, FORMAT_ATTR, Objective, Recorder, history, history_of, n_epochs
from regsweep.search.storage import TrialWriter, open_storage

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "golden_v0_1"
RECORD = {"epoch": 0, "train_loss": 0.123456789012, "train_eval_loss": 0.11223344556677, "train_acc": 0.96123456789,
          "val_loss": 0.2345678901234, "val_acc": 0.9312345678901, "lr": 0.000987654321098, "seconds": 1.2345678901}


def _bench():
    spec = importlib.util.spec_from_file_location("records_bench", ROOT / "benchmarks" / "records.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class DictSink:
    """A storage-free sink: the attrs as a trial would hold them, and the bytes of each write."""

    def __init__(self):
        self.attrs, self.sizes = {}, []

    def write(self, attrs, report=None):
        self.attrs.update(attrs)
        self.sizes.append(sum(len(k) + len(json.dumps(v)) for k, v in attrs.items()))


def test_per_epoch_write_bytes_are_flat_from_epoch_1_to_300():
    sink = DictSink()
    rec = Recorder(sink, Objective())
    for e in range(301):
        rec.on_epoch(e, dict(RECORD, epoch=e))
    one_record = len(json.dumps(RECORD))
    assert max(sink.sizes) <= (CHUNK + 1) * one_record  # never the whole history
    assert max(sink.sizes[291:301]) <= 1.05 * max(sink.sizes[1:11])  # epoch 300 costs what epoch 1 costs
    assert history_of(sink.attrs) == [dict(RECORD, epoch=e) for e in range(301)]


def test_a_resumed_trial_overwrites_its_chunk_and_stale_epochs_are_not_read():
    sink = DictSink()
    rec = Recorder(sink, Objective())
    for e in range(25):
        rec.on_epoch(e, dict(RECORD, epoch=e))
    resumed = Recorder(sink, Objective(), history=rec.history[:7])  # a Ray trial resumed at epoch 7's checkpoint
    resumed.on_epoch(7, dict(RECORD, epoch=7, val_loss=9.0))
    got = history_of(sink.attrs)
    assert [e["epoch"] for e in got] == list(range(8)) and got[7]["val_loss"] == 9.0


def test_a_400_epoch_trial_is_recorded_on_mariadb_and_read_back_whole(storage_url):
    url, name = storage_url  # sqlite, postgresql and mysql (MariaDB: TEXT is 64 KB, format 1 broke at ~277 epochs)
    study = optuna.create_study(storage=open_storage(url, heartbeat=False), study_name=name)
    trial = study.ask()
    rec = Recorder(TrialWriter(trial), Objective())
    rec.start({"model": {"name": "cnn"}})
    curve = [1.0 / (e + 1) for e in range(400)]
    for e, v in enumerate(curve):
        rec.on_epoch(e, dict(RECORD, epoch=e, val_loss=v))
    state, value = rec.end("completed")
    study.tell(trial, value)
    fresh = optuna.load_study(study_name=name, storage=url).trials[0]
    got = history(fresh)
    assert len(got) == 400 and [e["val_loss"] for e in got] == curve and n_epochs(fresh) == 400
    assert fresh.intermediate_values == dict(enumerate(curve))  # plain Optuna sees the whole curve
    assert fresh.user_attrs["best_epoch"] == 399


@pytest.mark.procs
def test_the_old_format_fixture_resumes_mixes_formats_and_plain_optuna_reads_both(tmp_path):
    for f in ("study.yaml", "golden.db"):
        shutil.copy2(GOLDEN / f, tmp_path / f)
    url = f"sqlite:///{tmp_path / 'golden.db'}"
    assert main(["run", str(tmp_path / "study.yaml"), "--storage", url, "--n-trials", "4", "--artifacts", "off"]) == 0
    study = optuna.load_study(study_name="golden", storage=url)
    trials = study.trials
    assert FORMAT_ATTR not in study.user_attrs  # an old study stays "format 1 (or mixed)"
    assert [("history" in t.user_attrs, "history_len" in t.user_attrs) for t in trials] == \
        [(True, False)] * 3 + [(False, True)]
    for t in trials:  # record.history reads both; plain Optuna reads both curves as intermediate values
        hist = history(t)
        assert hist and {e["epoch"]: e["val_loss"] for e in hist} == t.intermediate_values
    # a new study records format 2 from its first trial and says so
    assert main(["run", str(tmp_path / "study.yaml"), "--storage", url, "--study-name", "fresh", "--n-trials", "1",
                 "--artifacts", "off"]) == 0
    fresh = optuna.load_study(study_name="fresh", storage=url)
    assert fresh.user_attrs[FORMAT_ATTR] == 2 and history(fresh.trials[0])


@pytest.fixture(scope="module")
def big_study(tmp_path_factory):
    """1,000 trials x 20 epochs in format 2 (50 by add_trials, copied by SQL), plus 8 in format 1; read only."""
    bench = _bench()
    url = f"sqlite:///{tmp_path_factory.mktemp('big') / 'big.db'}"
    bench.build_study(url, "big", 1000, 20, "v2", block=50)
    study = optuna.load_study(study_name="big", storage=url)
    study.add_trials(bench.frozen_trials(8, 20, "v1"))
    return url, study, bench


def test_status_and_export_on_1000_trials_never_load_every_trial(big_study, monkeypatch, capsys):
    url, study, _ = big_study
    expected = dict(internals.state_counts(study))

    def refuse(*args, **kwargs):
        raise AssertionError("status/export loaded every trial")

    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_trials", refuse)  # what every bulk trial read runs
    monkeypatch.setattr(internals, "trials_leaving_out", refuse)
    assert main(["status", "--storage", url, "--study-name", "big"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(expected.values())} trials" in out and f"COMPLETE {expected['COMPLETE']}" in out
    assert "pruned:median " in out and "completed " in out
    assert main(["export", "--storage", url, "--study-name", "big", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["trial"] == study.best_trial.number
    assert main(["export", "--storage", url, "--study-name", "big", "--trial", "1003", "--format", "params"]) == 0
    assert main(["export", "--storage", url, "--study-name", "big", "--trial", "5000"]) == 2
    assert "(trials 0..1010)" in capsys.readouterr().err


def test_the_dashboard_payload_leaves_per_epoch_attrs_out_and_keeps_the_curves(big_study):
    from regsweep.search.dashboard import make_app

    url, study, bench = big_study
    app, _ = make_app(url)
    body = io.BytesIO()
    status = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/api/studies/{internals.study_id(study)}",
               "QUERY_STRING": "", "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.input": io.BytesIO(),
               "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http"}
    for chunk in app(environ, lambda s, h, exc=None: status.append(s)):
        body.write(chunk)
    assert status[0].startswith("200")
    payload = json.loads(body.getvalue())
    keys = {a["key"] for t in payload["trials"] for a in t["user_attrs"]}
    assert "history_len" in keys and "stop_reason" in keys
    assert not [k for k in keys if k == "history" or k.startswith("history:")]
    assert {a["key"] for a in payload["union_user_attrs"]} == keys
    t = payload["trials"][-1]
    assert t["intermediate_values"] and all(x["step"] >= 0 for x in t["intermediate_values"])
    whole = internals.frozen_trial(study, internals.trial_id(study.trials[0]))  # one trial stays whole
    assert len(history(whole)) == len(whole.intermediate_values) > 0
    assert len(payload["trials"]) == len(study.trials) == 1011


def test_report_reads_the_curves_of_its_top_trials_only(big_study, tmp_path, monkeypatch):
    url, study, _ = big_study
    from regsweep.search import report

    read = []
    whole = report.history
    monkeypatch.setattr(report, "history", lambda t: read.append(t.number) or whole(t))
    assert main(["report", "--storage", url, "--study-name", "big", "--out", str(tmp_path / "r")]) == 0
    assert 0 < len(read) <= report.TOP_CURVES and all(len(whole(t)) for t in [study.trials[n] for n in read])


def test_bulk_reads_without_per_epoch_attrs_are_optunas_trials_minus_those_attrs(storage_url):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    from regsweep.search.record import EPOCH_KEY_PATTERNS, is_epoch_key

    url, name = storage_url
    study = optuna.create_study(storage=open_storage(url, heartbeat=False), study_name=name)
    dists = {"a": FloatDistribution(0, 1), "b": IntDistribution(1, 9), "c": CategoricalDistribution([None, "x", 2])}
    study.add_trials(_bench().frozen_trials(3, 12, "v2") + _bench().frozen_trials(2, 5, "v1"))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"a": 0.5, "b": 3, "c": None}, distributions=dists,
                                 user_attrs={"history_len": 0, "x": [1, {"y": None}]}, system_attrs={"s": 1},
                                 intermediate_values={0: float("inf"), 1: float("nan"), 2: -float("inf")}))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=float("inf"), params={"c": 2},
                                 distributions={"c": dists["c"]}))
    study.enqueue_trial({"a": 0.25})
    running = study.ask()
    running.set_user_attr("history:00000", [{"epoch": 0}])
    backend = internals.rdb_backend(internals.study_storage(study))
    sid = internals.study_id(study)
    for states in (None, (TrialState.WAITING, TrialState.RUNNING), (TrialState.FAIL, TrialState.COMPLETE)):
        whole = backend.get_all_trials(sid, deepcopy=False, states=states)
        light = internals.trials_leaving_out(backend, sid, states, EPOCH_KEY_PATTERNS)
        for t in whole:
            t.user_attrs = {k: v for k, v in t.user_attrs.items() if not is_epoch_key(k)}
        # nan != nan: compare reprs, with the attrs in key order (neither read orders them: each server's own order)
        for t in whole + light:
            t.user_attrs, t.system_attrs = dict(sorted(t.user_attrs.items())), dict(sorted(t.system_attrs.items()))
            t.intermediate_values = dict(sorted(t.intermediate_values.items()))
        assert [repr(t) for t in light] == [repr(t) for t in whole] and light
