"""Progress of a running study, for the process that coordinates ``regsweep run``.

A thread polls the study (its own storage connection, once a second) and shows done/total, running, complete,
pruned, failed, the best value so far and the epoch each running trial has reached: a live rich table when
stdout is a terminal, otherwise one plain line when a trial starts or ends (and every 30 s). Whenever the finished count
changes it also calls ``on_change(study)`` (the coordinator's study note, search/dashboard.py).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO

from regsweep.search import log
from regsweep.search.record import first_value, minimizes, n_epochs


@dataclass
class Snapshot:
    total: Optional[int]
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: list[tuple[int, int]] = field(default_factory=list)  # (trial number, epochs recorded)
    best: Optional[tuple[int, float]] = None  # (trial number, value)
    metric: str = "value"

    @property
    def done(self) -> int:
        return self.complete + self.pruned

    def line(self) -> str:
        total = "?" if self.total is None else self.total
        run = ", ".join(f"#{n} epoch {e}" for n, e in self.running)
        best = "-" if self.best is None else f"{self.best[1]:.4g} (trial {self.best[0]})"
        return (f"progress: {self.done}/{total} done ({self.complete} complete, {self.pruned} pruned, "
                f"{self.failed} failed), {len(self.running)} running{f' [{run}]' if run else ''}, "
                f"best {self.metric} {best}")


def snapshot(study) -> Snapshot:
    """Counts from one read of the study's trials; a running trial's epoch = its recorded epochs (record.n_epochs)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    s = Snapshot(total=study.user_attrs.get("regsweep:n_trials"),
                 metric=study.user_attrs.get("regsweep:objective", "value"))
    sign = 1.0 if minimizes(study) else -1.0  # a multi-objective study: best by its first objective
    for t in trials:
        if t.state == TrialState.COMPLETE:
            s.complete += 1
            value = first_value(t)
            if value is not None and math.isfinite(value) and (s.best is None or sign * value < sign * s.best[1]):
                s.best = (t.number, value)
        elif t.state == TrialState.PRUNED:
            s.pruned += 1
        elif t.state == TrialState.FAIL:
            s.failed += 1
        elif t.state == TrialState.RUNNING:
            s.running.append((t.number, n_epochs(t)))
    return s


def render(s: Snapshot):
    """The rich renderable of a snapshot: a bar, the counts, one row per running trial."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    head = Table.grid(padding=(0, 1))
    total = s.total or max(s.done, 1)
    head.add_row(ProgressBar(total=total, completed=min(s.done, total), width=30),
                 f"{s.done}/{s.total if s.total is not None else '?'} done",
                 f"[green]{s.complete} complete[/] [yellow]{s.pruned} pruned[/] [red]{s.failed} failed[/] "
                 f"{len(s.running)} running",
                 "best " + ("-" if s.best is None else f"{s.metric} [bold]{s.best[1]:.4g}[/] (trial {s.best[0]})"))
    if not s.running:
        return head
    table = Table(show_edge=False, pad_edge=False, box=None)
    table.add_column("running trial", justify="right")
    table.add_column("epochs recorded", justify="right")
    for number, epoch in s.running:
        table.add_row(str(number), str(epoch))
    return Group(head, table)


class Progress:
    """``with Progress(url, study_name): ...`` around a run; shows progress until the block ends."""

    def __init__(self, url: str, study_name: str, *, out: Optional[TextIO] = None, interval: float = 1.0,
                 live: Optional[bool] = None, on_change: Optional[Callable] = None, plain_every: float = 30.0):
        self.url, self.study_name = url, study_name
        self.out = out or sys.stdout
        self.interval = interval
        self.plain_every = plain_every
        self.live = self.out.isatty() if live is None else live
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._live = None
        self._study = None
        self._last_key: Optional[tuple] = None
        self._last_print = 0.0
        self._last_done: Optional[int] = None

    def _load(self):
        """The study once the run has created it; never creates a database, a table or a study itself
        (racing the run's own creation of a new database's schema)."""
        if self._study is None:
            import optuna

            from regsweep.search.storage import open_existing

            storage = open_existing(self.url)
            if storage is None:
                return None
            try:
                self._study = optuna.load_study(study_name=self.study_name, storage=storage)
            except KeyError:  # not created yet
                return None
        return self._study

    def poll(self) -> Optional[Snapshot]:
        """One refresh (also called once more at the end)."""
        study = self._load()
        if study is None:
            return None
        s = snapshot(study)
        finished = s.done + s.failed
        if self.on_change is not None and finished != self._last_done:
            self._last_done = finished
            self.on_change(study)
        if self._live is not None:
            self._live.update(render(s))
        else:  # a plain line when a trial starts or ends, else at most every `plain_every` seconds
            key = (s.complete, s.pruned, s.failed, tuple(n for n, _ in s.running), s.total)
            now = time.monotonic()
            if key != self._last_key or now - self._last_print >= self.plain_every:
                self._last_key, self._last_print = key, now
                print(s.line(), file=self.out, flush=True)
        return s

    def _run(self) -> None:
        from regsweep.search.storage import transient_errors

        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except transient_errors():  # the database blinked; the next poll will tell
                pass
            except Exception as exc:  # progress must never stop a sweep
                log.get(__name__).warning(f"progress display stopped ({exc.__class__.__name__}: {exc})")
                return

    def __enter__(self) -> "Progress":
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.out), refresh_per_second=4, redirect_stdout=True,
                              redirect_stderr=True, transient=False)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._run, name="regsweep-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.poll()
        except Exception:
            pass
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
