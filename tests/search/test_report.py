"""`regsweep report`: a static HTML page whose references are all local files, each image valid."""

import io
from html.parser import HTMLParser

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.search.cli import main
from regsweep.search.report import _trial_kind


class Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "data", "poster", "srcset") or (k == "style" and "url(" in (v or "")):
                self.refs.append((tag, v))


def test_report_is_self_contained_with_valid_images(swept_study, tmp_path, capsys):
    from PIL import Image

    _, url, _ = swept_study
    out = tmp_path / "report"
    assert main(["report", "--storage", url, "--study-name", "swept", "--out", str(out)]) == 0
    assert "index.html" in capsys.readouterr().out
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html
    parser = Refs()
    parser.feed(html)
    srcs = [v for tag, v in parser.refs]
    expected = {"history.png", "importances.png", "parallel.png", "curves.png", "states.png", "stop_reasons.png"}
    assert set(srcs) == expected
    for src in srcs:
        assert "/" not in src and (out / src).is_file()
        data = (out / src).read_bytes()
        Image.open(io.BytesIO(data)).verify()
        assert Image.open(io.BytesIO(data)).size[0] >= 400
    study = optuna.load_study(study_name="swept", storage=url)
    assert f"<td>{study.best_trial.number}</td>" in html  # the top-trials table starts with the best
    for reason in {t.user_attrs["stop_reason"].split("@")[0] for t in study.trials}:
        assert reason in html  # the summary lists every stop reason


def test_a_second_report_replaces_the_first_in_place(swept_study, tmp_path):
    _, url, _ = swept_study
    out = tmp_path / "r"
    assert main(["report", "--storage", url, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["report", "--storage", url, "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # nothing of the user's is lost
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r-")]  # no temporary directory left


def test_bad_out_and_empty_study_are_one_line_exit_2(swept_study, tmp_path, capsys):
    _, url, _ = swept_study
    (tmp_path / "file").write_text("x")
    assert main(["report", "--storage", url, "--out", str(tmp_path / "file")]) == 2
    assert main(["report", "--storage", url, "--out", str(tmp_path / "no" / "dir")]) == 2
    empty = f"sqlite:///{tmp_path / 'e.db'}"
    optuna.create_study(study_name="empty", storage=empty)
    assert main(["report", "--storage", empty, "--out", str(tmp_path / "o")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 3 and all(e.startswith("error: ") for e in errs)
    assert "is a file" in errs[0] and "does not exist" in errs[1] and "no trials" in errs[2]
    assert not (tmp_path / "o").exists()


def test_a_study_without_complete_trials_says_what_is_missing(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="p", storage=url)
    for reason in ("pruned:median@1", "failed:RuntimeError: boom"):
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        t.set_user_attr("stop_reason", reason)
        t.report(1.0, 0)
        study.tell(t, state=TrialState.PRUNED if reason.startswith("pruned") else TrialState.FAIL)
    assert main(["report", "--storage", url, "--out", str(tmp_path / "o")]) == 0
    html = (tmp_path / "o" / "index.html").read_text()
    assert "not drawn: no COMPLETE trial yet" in html and "pruned:median" in html


@pytest.mark.parametrize("state, reason, kind", [
    (TrialState.COMPLETE, "completed", "complete"), (TrialState.COMPLETE, "early_stopped", "stopped"),
    (TrialState.COMPLETE, "stopped:overfit:gap@4", "stopped"), (TrialState.PRUNED, "pruned:median@2", "pruned"),
    (TrialState.FAIL, "failed:x", "failed")])
def test_trial_kinds(state, reason, kind):
    t = optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                  user_attrs={"stop_reason": reason})
    assert _trial_kind(t) == kind


def test_the_report_names_its_importance_evaluator_and_says_when_trials_are_too_few(swept_study, tmp_path):
    from regsweep.search.report import MIN_IMPORTANCE_TRIALS, importance_evaluator, importance_note

    _, url, _ = swept_study
    out = tmp_path / "imp"
    assert main(["report", "--storage", url, "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    assert type(importance_evaluator()).__name__ == "PedAnovaImportanceEvaluator"
    assert "Parameter importances (PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator))" in html
    assert "fANOVA" not in html  # the evaluator it did NOT use
    n = sum(t.state == TrialState.COMPLETE for t in optuna.load_study(study_name="swept", storage=url).trials)
    assert n < MIN_IMPORTANCE_TRIALS  # the 5-trial fixture: the report says so under the plot
    assert f"too few trials for importances: {n} COMPLETE trial(s)" in html
    assert importance_note(MIN_IMPORTANCE_TRIALS) == "" and importance_note(1).startswith("too few")
