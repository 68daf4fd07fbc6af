"""search/progress.py: counts from the study, plain lines off a terminal, a rich table on one."""

import io

import optuna
from optuna.trial import TrialState

from regsweep.search.progress import Progress, render, snapshot


def _study(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="p", storage=url)
    study.set_user_attr("regsweep:n_trials", 6)
    study.set_user_attr("regsweep:objective", "val_loss")
    for value, state in ((0.5, TrialState.COMPLETE), (0.3, TrialState.COMPLETE), (None, TrialState.PRUNED),
                         (None, TrialState.FAIL)):
        t = study.ask()
        study.tell(t, value, state=state) if value is not None else study.tell(t, state=state)
    running = study.ask()
    running.set_user_attr("history", [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}])
    return url, study, running


def test_snapshot_counts_states_best_and_running_epochs(tmp_path):
    _, study, running = _study(tmp_path)
    s = snapshot(study)
    assert (s.total, s.complete, s.pruned, s.failed, s.done) == (6, 2, 1, 1, 3)
    assert s.running == [(running.number, 3)] and s.best == (1, 0.3) and s.metric == "val_loss"
    assert s.line() == ("progress: 3/6 done (2 complete, 1 pruned, 1 failed), 1 running [#4 epoch 3], "
                        "best val_loss 0.3 (trial 1)")


def test_snapshot_best_follows_the_direction(tmp_path):
    study = optuna.create_study(direction="maximize")
    for v in (0.2, 0.9, 0.5):
        study.tell(study.ask(), v)
    assert snapshot(study).best == (1, 0.9)


def test_plain_lines_when_not_a_terminal_and_on_change_per_finished_trial(tmp_path):
    url, study, running = _study(tmp_path)
    out, seen = io.StringIO(), []
    with Progress(url, "p", out=out, live=False, interval=0.05, on_change=lambda st: seen.append(len(st.trials))):
        pass
    lines = out.getvalue().splitlines()
    assert lines and all(line.startswith("progress: 3/6 done") for line in lines)
    assert len(lines) == 1  # the same counts are not repeated
    prog = Progress(url, "p", out=out, live=False)
    prog.poll()
    study.tell(running, 0.1)
    s = prog.poll()
    assert s.complete == 3 and s.best == (4, 0.1)
    assert out.getvalue().splitlines()[-1].startswith("progress: 4/6 done (3 complete")
    assert seen == [5]


def test_the_live_table_shows_the_counts_and_running_trials(tmp_path):
    from rich.console import Console

    _, study, running = _study(tmp_path)
    console = Console(file=io.StringIO(), width=120, record=True, force_terminal=True)
    console.print(render(snapshot(study)))
    text = console.export_text()
    assert "3/6 done" in text and "2 complete" in text and "1 pruned" in text and "1 failed" in text
    assert "0.3" in text and "running trial" in text and f"{running.number}" in text


def test_progress_waits_for_a_study_that_does_not_exist_yet(tmp_path):
    url = f"sqlite:///{tmp_path / 'later.db'}"
    optuna.create_study(study_name="other", storage=url)
    prog = Progress(url, "later", out=io.StringIO(), live=False)
    assert prog.poll() is None
    optuna.create_study(study_name="later", storage=url)
    assert prog.poll().done == 0


def test_progress_never_creates_the_database(tmp_path):
    """The run creates the database and its schema; a progress thread doing it too raced it (alembic's
    UNIQUE constraint on a new SQLite file)."""
    db = tmp_path / "new.db"
    prog = Progress(f"sqlite:///{db}", "s", out=io.StringIO(), live=False)
    assert prog.poll() is None and not db.exists()
