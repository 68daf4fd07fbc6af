"""Issue 21, trade-offs: a multi-objective study (`objectives:`) sampled by NSGA-II, run through `worker` and `run`,
read back by plain Optuna (`best_trials`), shown by `status`, `report` and the study note, exported by `--trial N`
only; Optuna's pruners, confirm and the Ray backend refused in one line."""

from __future__ import annotations

import textwrap

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.models.config import TrainConfig
from regsweep.models.train import fit
from regsweep.search.bench import MemorySink
from regsweep.search.cli import main
from regsweep.search.record import Objective, Recorder, history
from regsweep.search.spec import load_spec

SPEC = """
name: mo
base:
  model: {name: cnn, widths: [4, 8]}
  data: {name: digits, batch_size: 128}
  optim: {name: adamw, lr: 3.0e-3}
  train: {epochs: 3, num_threads: 1, train_eval_size: 64, seed: 7}
objectives:
  - {metric: val_loss, direction: minimize}
  - {metric: overfit_gap, direction: minimize}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
  optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
sampler: {name: nsga2, seed: 0, args: {population_size: 4}}
pruner: {name: overfit, args: {warmup: 1, patience: 1}}
budget: {n_trials: 2}
enqueue: [{}]
"""


def _write(tmp_path, text: str = SPEC, name: str = "mo.yaml", **replace: str):
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _values_at_best_epoch(trial, metrics):
    """The trial's recorded values recomputed from its per-epoch history at the first objective's best epoch."""
    rec = history(trial)[trial.user_attrs["best_epoch"]]
    got = {"val_loss": rec["val_loss"], "val_acc": rec["val_acc"],
           "overfit_gap": rec["val_loss"] - rec["train_eval_loss"], "n_params": float(trial.user_attrs["n_params"])}
    return [got[m] for m in metrics]


# ------------------------------------------------------------------------------------ spec and recorder
def test_spec_objectives_grammar_and_hash(tmp_path, capsys):
    spec = load_spec(_write(tmp_path))
    assert main(["validate", str(tmp_path / "mo.yaml"), "--storage", f"sqlite:///{tmp_path / 'v.db'}"]) == 0
    assert "minimize val_loss, minimize overfit_gap (Pareto front)" in capsys.readouterr().out
    assert spec.multi and [o.metric for o in spec.objectives] == ["val_loss", "overfit_gap"]
    assert spec.objective == Objective("val_loss", "minimize") and spec.directions == ["minimize", "minimize"]
    assert spec.canonical()["objectives"] == [vars(o) for o in spec.objectives]
    other = load_spec(_write(tmp_path, name="n.yaml", **{"overfit_gap, direction: minimize": "n_params"}))
    assert other.spec_hash() != spec.spec_hash()  # which objectives is what the search is
    single = load_spec(_write(tmp_path, name="s.yaml", **{
        "objectives:\n  - {metric: val_loss, direction: minimize}\n  - {metric: overfit_gap, direction: minimize}":
        "objective: {metric: val_loss, direction: minimize}", "{name: overfit, args: {warmup: 1, patience: 1}}":
        "median"}))
    assert not single.multi and "objectives" not in single.canonical()  # single-objective specs keep their hash


def test_recorder_reports_nothing_and_values_come_from_the_first_objectives_best_epoch():
    sink = MemorySink()
    objs = [Objective("val_loss"), Objective("overfit_gap"), Objective("n_params")]
    rec = Recorder(sink, objs[0], objectives=objs)
    curves = [(0.9, 0.8), (0.5, 0.3), (0.6, 0.1)]  # (val_loss, train_eval_loss): epoch 1 is best for val_loss
    for epoch, (val, train) in enumerate(curves):
        rec.on_epoch(epoch, {"epoch": epoch, "val_loss": val, "train_eval_loss": train, "val_acc": 0.5})
    assert sink.reports == []  # Optuna refuses report() with several objectives: the history is the curve
    state, values = rec.end("completed", {"n_params": 1234})
    assert state == "COMPLETE" and values == pytest.approx([0.5, 0.2, 1234.0])
    assert sink.attrs["best_epoch"] == 1
    single = MemorySink()
    one = Recorder(single, objs[0], objectives=[objs[0]])
    one.on_epoch(0, {"epoch": 0, "val_loss": 0.7, "train_eval_loss": 0.6})
    assert single.reports == [(0.7, 0)] and one.end("completed")[1] == 0.7  # one objective: unchanged


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def mo_study(tmp_path_factory):
    """`regsweep worker` makes the study and runs the spec's 2 trials; `run --n-trials 4` resumes it (NSGA-II
    reseeded) with 2 more."""
    tmp = tmp_path_factory.mktemp("mo")
    spec = _write(tmp)
    url = f"sqlite:///{tmp / 'mo.db'}"
    assert main(["worker", str(spec), "--storage", url]) == 0
    assert len(optuna.load_study(study_name="mo", storage=url).trials) == 2
    assert main(["run", str(spec), "--storage", url, "--n-trials", "4"]) == 0
    return spec, url, tmp


def test_plain_optuna_reads_the_front_and_values_match_the_records(mo_study):
    _, url, _ = mo_study
    study = optuna.load_study(study_name="mo", storage=url)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and study.best_trials
    assert {t.number for t in study.best_trials} <= {t.number for t in done}
    assert study.user_attrs["regsweep:objectives"] == ["val_loss", "overfit_gap"]
    for t in done:
        assert t.values == pytest.approx(_values_at_best_epoch(t, ["val_loss", "overfit_gap"]), abs=1e-12)
        assert t.intermediate_values == {}  # nothing reported: the curves live in the records only
        assert len(history(t)) >= 2 and t.user_attrs["stop_reason"].startswith(("completed", "stopped:overfit"))
    assert len({(round(t.params.get("model.dropout", -1), 9)) for t in done}) == 4  # resumed without repeats


def test_status_report_and_note_show_the_front(mo_study, capsys, tmp_path):
    from regsweep.search.dashboard import read_note

    _, url, _ = mo_study
    study = optuna.load_study(study_name="mo", storage=url)
    front = sorted(t.number for t in study.best_trials)
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study-name", "mo"]) == 0
    out = capsys.readouterr().out
    assert "minimize val_loss, minimize overfit_gap" in out and f"Pareto front ({len(front)} trial(s)" in out
    for n in front:
        assert f"trial {n:>3}: val_loss=" in out
    assert main(["report", "--storage", url, "--study-name", "mo", "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Pareto front (" in page and 'class="front"' in page and '<img src="pareto.png"' in page
    assert (tmp_path / "r" / "pareto.png").stat().st_size > 1000
    assert '<img src="history.png"' in page  # Optuna's one-objective plots drawn on the first objective
    note = read_note(study)
    assert "## Pareto front" in note and "- objectives: minimize `val_loss`, minimize `overfit_gap`" in note
    assert "--trial N" in note and "## Best trial" not in note
    for n in front:
        assert f"\n| {n} | " in note


def test_export_lists_the_front_and_asks_for_a_trial_then_replays_one(mo_study, capsys, tmp_path):
    _, url, _ = mo_study
    study = optuna.load_study(study_name="mo", storage=url)
    front = sorted(t.number for t in study.best_trials)
    capsys.readouterr()
    out_file = tmp_path / "chosen.yaml"
    assert main(["export", "--storage", url, "--study-name", "mo", "--out", str(out_file)]) == 2
    got = capsys.readouterr()
    assert not out_file.exists()
    err = got.err.strip().splitlines()
    assert len(err) == 1 and "--trial" in err[0] and "Pareto front" in err[0]
    assert all(f"trial {n:>3}:" in got.out for n in front)
    chosen = study.trials[front[-1]]
    assert main(["export", "--storage", url, "--study-name", "mo", "--trial", str(chosen.number),
                 "--out", str(out_file)]) == 0
    text = out_file.read_text()
    assert f"#   trial: {chosen.number}" in text and "overfit_gap:" in text
    hist = fit(TrainConfig.load(out_file), device="cpu")
    be = chosen.user_attrs["best_epoch"]
    rec = hist.epochs[be]
    assert [rec["val_loss"], rec["val_loss"] - rec["train_eval_loss"]] == chosen.values  # exact replay on CPU


# ------------------------------------------------------------------------------------ refused
@pytest.mark.parametrize("pruner", ["median", "{any_of: [{name: overfit}, {name: median}]}",
                                    "{name: patient, args: {patience: 1}, wrapped: {name: median}}"])
def test_optuna_pruners_are_refused_in_one_line(tmp_path, capsys, pruner):
    spec = _write(tmp_path, **{"{name: overfit, args: {warmup: 1, patience: 1}}": pruner})
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mo.yaml: pruner:" in err[0] and "choose none or overfit" in err[0]


def test_ray_backend_refuses_several_objectives(tmp_path, capsys):
    spec = _write(tmp_path)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["run", str(spec), "--storage", url, "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objectives" in err[0] and "--backend optuna" in err[0]
    assert not (tmp_path / "db.sqlite").exists()  # nothing created


@pytest.mark.slow  # two worker processes (~10 s on an idle 2-core machine, 60 s loaded); `worker` runs in-process
@pytest.mark.procs  # in mo_study, and `run --workers 2` itself is tested in test_workers.py
def test_run_workers_2_on_a_two_objective_study(tmp_path, capsys):
    spec = _write(tmp_path, **{"n_trials: 2": "n_trials: 4", "epochs: 3": "epochs: 2"})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["run", str(spec), "--storage", url, "--workers", "2"]) == 0
    study = optuna.load_study(study_name="mo", storage=url)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and study.best_trials
    assert {t.user_attrs["worker"] for t in done} and all(t.intermediate_values == {} for t in done)
    for t in done:
        assert t.values == pytest.approx(_values_at_best_epoch(t, ["val_loss", "overfit_gap"]), abs=1e-12)
    assert "Pareto front" in capsys.readouterr().out


@pytest.mark.parametrize("on_fire, state", [("complete", TrialState.COMPLETE), ("prune", TrialState.PRUNED)])
def test_the_overfit_rule_stops_on_the_first_objective(tmp_path, on_fire, state):
    """A plateau of val_loss (min_delta 10: never an improvement) fires at epoch 1: COMPLETE with the values of
    the best epoch so far, or PRUNED (no values: Optuna keeps none for several objectives)."""
    spec = _write(tmp_path, **{"{warmup: 1, patience: 1}": f"{{warmup: 0, patience: 1, min_delta: 10.0, "
                                                            f"on_fire: {on_fire}}}", "n_trials: 2": "n_trials: 1"})
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["run", str(spec), "--storage", url, "--artifacts", "off"]) == 0
    (t,) = optuna.load_study(study_name="mo", storage=url).trials
    assert t.state == state and len(history(t)) == 2 and t.intermediate_values == {}
    assert t.user_attrs["stop_reason"] == f"{'stopped' if on_fire == 'complete' else 'pruned'}:overfit:plateau@1"
    if state == TrialState.COMPLETE:
        assert t.values == pytest.approx(_values_at_best_epoch(t, ["val_loss", "overfit_gap"]), abs=1e-12)
    else:
        assert t.values is None


@pytest.mark.procs
def test_the_dashboard_serves_a_two_objective_study(mo_study):
    """optuna-dashboard reads the study natively (both directions, values, front, metric names, the note)."""
    import json
    import re
    import subprocess
    import sys
    import urllib.request

    _, url, _ = mo_study
    proc = subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", "dashboard", "--storage", url,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"http://(\S+?)/dashboard/", proc.stdout.readline())
        assert m is not None, proc.stderr.read()

        def get(path: str) -> bytes:
            with urllib.request.urlopen(f"http://{m.group(1)}{path}", timeout=30) as r:
                assert r.status == 200
                return r.read()

        (summary,) = json.loads(get("/api/studies"))["study_summaries"]
        detail = json.loads(get(f"/api/studies/{summary['study_id']}?after=0"))
        study = optuna.load_study(study_name="mo", storage=url)
        assert detail["directions"] == ["minimize", "minimize"] and len(detail["trials"]) == 4
        assert sorted(t["number"] for t in detail["best_trials"]) == sorted(t.number for t in study.best_trials)
        assert [t["values"] for t in detail["trials"]] == [t.values for t in study.trials]
        assert detail["has_intermediate_values"] is False and "Pareto front" in detail["note"]["body"]
        assert study.metric_names == ["val_loss", "overfit_gap"]
        assert b"<html" in get(f"/dashboard/studies/{summary['study_id']}").lower()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("metrics", [["val_loss", "overfit_gap", "n_params"],
                                     ["val_loss", "overfit_gap", "n_params", "val_acc"]])
def test_report_and_status_of_three_and_four_objectives(tmp_path, capsys, metrics):
    """Recorded trials (no training): the front is Optuna's; 3 objectives get a 3-D front plot, 4 say why not."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    directions = ["maximize" if m == "val_acc" else "minimize" for m in metrics]
    study = optuna.create_study(study_name="m", storage=url, directions=directions)
    study.set_user_attr("regsweep:objective", metrics[0])
    study.set_user_attr("regsweep:objectives", metrics)
    rows = [(0.5, 0.1, 900.0, 0.8), (0.4, 0.2, 1200.0, 0.85), (0.6, 0.3, 1500.0, 0.7)]  # the third is dominated
    for i, row in enumerate(rows):
        study.add_trial(create_trial(params={"model.dropout": 0.1 * i}, values=list(row[:len(metrics)]),
                                     distributions={"model.dropout": FloatDistribution(0.0, 0.5)},
                                     user_attrs={"best_epoch": 1, "stop_reason": "completed"}))
    assert main(["status", "--storage", url, "--study-name", "m"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front (2 trial(s)" in out and "trial   1: val_loss=0.4" in out and "trial   2:" not in out
    assert out.index("trial   1:") < out.index("trial   0:")  # best first objective first
    assert main(["report", "--storage", url, "--study-name", "m", "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert page.count("<tr><td>") >= 2 and "Pareto front (2 trial(s))" in page
    if len(metrics) == 3:
        assert (tmp_path / "r" / "pareto.png").is_file()
    else:
        assert "not drawn: 4 objectives" in page and not (tmp_path / "r" / "pareto.png").exists()


def test_a_warm_start_from_a_two_objective_study_takes_its_best_by_the_first_objective(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from regsweep.search.study import warm_params

    src = f"sqlite:///{tmp_path / 'src.db'}"
    earlier = optuna.create_study(study_name="earlier", storage=src, directions=["minimize", "minimize"])
    for dropout, values in ((0.1, [0.5, 0.01]), (0.2, [0.3, 0.2]), (0.3, [0.4, 0.0])):
        earlier.add_trial(create_trial(params={"model.dropout": dropout}, values=values,
                                       distributions={"model.dropout": FloatDistribution(0.0, 0.5)}))
    spec = load_spec(_write(tmp_path, **{"enqueue: [{}]": f"enqueue: [{{}}]\nwarm_start: {{study: earlier, "
                                                                   f"storage: '{src}', top_k: 2}}"}))
    assert warm_params(spec) == [{"model.dropout": 0.2}, {"model.dropout": 0.3}]
