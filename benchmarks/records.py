"""Records that scale (issue 17): what one epoch writes, and what `status`, `export`, `report` and the
dashboard's study API cost on large studies, old record format and code vs new, in ONE process.

1. ``writes``: one trial recorded through ``regsweep.search.record.Recorder`` + ``TrialWriter`` for 301 epochs,
   per format: ``v1`` (the pre-0.3 recorder: the whole ``history`` list rewritten every epoch, kept here as the
   baseline) and ``v2`` with chunks of C epochs per attr (C = 1, 10, 25; 10 is regsweep's). Bytes of user-attr
   JSON and milliseconds of the storage write at epochs 1, 100 and 300 (median of 5 epochs around it).
2. ``reads``: studies of N trials x 100 epochs (N = 1,000 and 5,000) built with bulk ``study.add_trials``, one
   per format, then a few real trials recorded on top (their per-epoch write time is printed: it must not grow
   with the study). Then seconds of ``status``, ``export`` (best trial, YAML), ``report`` and the dashboard's
   ``GET /api/studies/<id>`` (payload MB too): ``before`` = the pre-issue-17 readers (every trial with every
   attr: Optuna's get_trials, optuna-dashboard on the plain storage), ``after`` = regsweep's readers now.
   Also plain Optuna's ``study.get_trials()`` per format (what a sampler or a user's script pays).

Storages: a SQLite file, and PostgreSQL when reachable (a database of its own, dropped at the end). Ratios are
printed against the baseline of the same run; nothing is asserted.

    .venv/bin/python benchmarks/records.py [--sizes 1000,5000] [--storages sqlite,postgresql] [--no-report]
    .venv/bin/python benchmarks/records.py --quick       # a few seconds: SQLite, 40 trials, 60 epochs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"

RECORD = {"epoch": 0, "train_loss": 0.123456789012, "train_eval_loss": 0.11223344556677,
          "train_acc": 0.9612345678901, "val_loss": 0.2345678901234, "val_acc": 0.9312345678901,
          "lr": 0.000987654321098, "seconds": 1.234567890123}  # ~236 bytes of JSON, as a real epoch


def record(e: int, loss: float) -> dict[str, Any]:
    return dict(RECORD, epoch=e, val_loss=loss)


# ------------------------------------------------------------------------------------ baselines
def old_recorder(sink, objective):
    """The pre-0.3 Recorder: format 1, the whole list rewritten every epoch (the baseline)."""
    import math

    from regsweep.search.record import HISTORY_ATTR, Recorder

    class V1(Recorder):
        def on_epoch(self, epoch, rec):
            self.history.append(rec)
            value = rec[self.objective.metric]
            self._flush({HISTORY_ATTR: self.history}, (value, epoch) if math.isfinite(value) else None)
            return None

    return V1(sink, objective)


def old_study_summary(study) -> dict[str, Any]:
    """search/report.py's study_summary before issue 17: every trial with every attr."""
    from collections import Counter

    from optuna.trial import TrialState

    from regsweep.search.report import stop_reason_kind

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    reasons = Counter(stop_reason_kind(t.user_attrs.get("stop_reason")) for t in trials
                      if t.state not in (TrialState.RUNNING, TrialState.WAITING))
    best = study.best_trial if states.get("COMPLETE") else None
    return {"name": study.study_name, "direction": study.direction.name.lower(),
            "budget": study.user_attrs.get("regsweep:n_trials"),
            "objective": study.user_attrs.get("regsweep:objective", "value"), "n_trials": len(trials),
            "states": dict(states), "stop_reasons": dict(reasons),
            "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                               "best_epoch": best.user_attrs.get("best_epoch"),
                                               "test_acc": best.user_attrs.get("test_acc")}}


@contextlib.contextmanager
def old_readers():
    """The CLI's status/export/report with the pre-issue-17 reads (patched in this process only)."""
    from optuna.trial import TrialState

    from regsweep.search import export, report

    def old_pick(study, number):
        if number is None:
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return study.best_trial
        return [t for t in study.get_trials(deepcopy=False) if t.number == number][0]

    saved = report.study_summary, report.without_epochs, export.pick_trial
    report.study_summary, report.without_epochs, export.pick_trial = old_study_summary, (lambda s: s), old_pick
    try:
        yield
    finally:
        report.study_summary, report.without_epochs, export.pick_trial = saved


# ------------------------------------------------------------------------------------ writes
class Counting:
    """A sink around TrialWriter: bytes of user-attr JSON and seconds per write."""

    def __init__(self, inner):
        self.inner, self.sizes, self.times = inner, [], []

    def write(self, attrs, report=None):
        t0 = time.perf_counter()
        self.inner.write(attrs, report)
        self.times.append(time.perf_counter() - t0)
        self.sizes.append(sum(len(k) + len(json.dumps(v)) for k, v in attrs.items()))


def write_bench(url: str, epochs: int, chunks: list[int], at: list[int]) -> dict[str, dict[int, tuple]]:
    """{format: {epoch: (bytes, ms)}}."""
    import optuna

    from regsweep.search.record import Objective, Recorder, history
    from regsweep.search.storage import TrialWriter, open_storage

    storage = open_storage(url, heartbeat=False)
    out: dict[str, dict[int, tuple]] = {}
    for fmt in ["v1"] + [f"v2/{c}" for c in chunks]:
        study = optuna.create_study(storage=storage, study_name=f"records-write-{fmt}-{os.getpid()}")
        trial = study.ask()
        sink = Counting(TrialWriter(trial))
        rec = old_recorder(sink, Objective()) if fmt == "v1" else \
            Recorder(sink, Objective(), chunk=int(fmt.split("/")[1]))
        for e in range(epochs):
            rec.on_epoch(e, record(e, 1.0 / (e + 1)))
        t0 = time.perf_counter()
        back = history(storage.get_trial(trial._trial_id))
        read_ms = 1000 * (time.perf_counter() - t0)
        assert len(back) == epochs and back[-1]["epoch"] == epochs - 1  # read back whole
        out[fmt] = {}
        for e in at:  # the mean bytes over the 10 epochs up to e (a whole chunk cycle), the median time
            window = range(max(0, e - 9), e + 1)
            out[fmt][e] = (statistics.mean(sink.sizes[i] for i in window),
                           1000 * statistics.median(sink.times[i] for i in window))
        out[fmt]["read_ms"] = read_ms
        out[fmt]["max_bytes"] = max(sink.sizes)
        optuna.delete_study(study_name=study.study_name, storage=storage)
    return out


# ------------------------------------------------------------------------------------ reads
def frozen_trials(n: int, epochs: int, fmt: str, seed: int = 0) -> list:
    """``n`` finished trials of ``epochs`` epochs in record format ``fmt`` (v1 | v2), as ``add_trials`` takes."""
    import random

    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from regsweep.search.record import HISTORY_ATTR, epoch_attrs

    rng = random.Random(seed)
    dists = {"model.dropout": FloatDistribution(0.0, 0.5), "regularization.l2": FloatDistribution(1e-6, 1e-2, log=True),
             "model.bn": CategoricalDistribution(["none", "before_act", "after_act"])}
    trials = []
    for i in range(n):
        params = {"model.dropout": rng.uniform(0, 0.5), "regularization.l2": 10 ** rng.uniform(-6, -2),
                  "model.bn": rng.choice(["none", "before_act", "after_act"])}
        pruned = i % 4 == 3
        stop = epochs // 3 if pruned else epochs
        base = rng.uniform(0.2, 0.6)
        curve = [base + 1.0 / (e + 1) for e in range(stop)]
        recs = [record(e, v) for e, v in enumerate(curve)]
        best = min(range(stop), key=curve.__getitem__)
        attrs: dict[str, Any] = {"config": {"model": {"name": "cnn", "dropout": params["model.dropout"]}},
                                 "worker": "bench:1", "best_epoch": best, "n_params": 21386, "device": "cpu",
                                 "seed": 0, "num_threads": 1, "split_fingerprint": "0123456789abcdef",
                                 "torch_version": "2.x", "test_loss": 0.3, "test_acc": 0.9,
                                 "stop_reason": f"pruned:median@{stop - 1}" if pruned else "completed"}
        if fmt == "v1":
            attrs[HISTORY_ATTR] = recs
        else:
            for end in range(10, stop + 10, 10):  # the chunks a format-2 trial leaves behind
                attrs.update(epoch_attrs(recs[:min(end, stop)]))
        trials.append(create_trial(state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                                   value=None if pruned else curve[best], params=params, distributions=dists,
                                   user_attrs=attrs, intermediate_values=dict(enumerate(curve))))
    return trials


def build_study(url: str, name: str, n: int, epochs: int, fmt: str, block: int = 1000) -> float:
    """The study of ``n`` trials (bulk ``add_trials``) then 3 real trials recorded on top; returns the median
    per-epoch write time of those (ms)."""
    import optuna

    from regsweep.search.record import FORMAT_ATTR, RECORD_FORMAT, Objective, Recorder
    from regsweep.search.storage import TrialWriter, open_storage

    storage = open_storage(url, heartbeat=False)
    study = optuna.create_study(storage=storage, study_name=name)
    study.set_user_attr("regsweep:objective", "val_loss")
    if fmt == "v2":
        study.set_user_attr(FORMAT_ATTR, RECORD_FORMAT)
    block = min(n, block)
    study.add_trials(frozen_trials(block, epochs, fmt))
    for k in range(1, -(-n // block)):
        replicate(storage, study._study_id, block, k)
    times: list[float] = []
    for k in range(3):
        trial = study.ask({"model.dropout": optuna.distributions.FloatDistribution(0.0, 0.5)})
        sink = Counting(TrialWriter(trial))
        rec = old_recorder(sink, Objective()) if fmt == "v1" else Recorder(sink, Objective())
        rec.start({"model": {"name": "cnn"}})
        for e in range(epochs):
            rec.on_epoch(e, record(e, 0.3 + 1.0 / (e + 1)))
        rec.end("completed")
        study.tell(trial, 0.31)
        times += sink.times[:-1]
    return 1000 * statistics.median(times)


def replicate(storage, study_id: int, block: int, k: int) -> None:
    """Copy the study's first ``block`` trials (rows of every trial table) as trials ``k*block..``: Optuna's
    ``add_trials`` writes a 100-epoch trial in ~0.1 s (one query per intermediate value), 5,000 in ~10 min."""
    import sqlalchemy

    engine = storage.engine
    with engine.begin() as c:
        lo, hi = c.execute(sqlalchemy.text("SELECT MIN(trial_id), MAX(trial_id) FROM trials WHERE study_id = :s "
                                           "AND number < :b"), {"s": study_id, "b": block}).one()
        top = c.execute(sqlalchemy.text("SELECT MAX(trial_id) FROM trials")).scalar()
        off = top + 1 - lo
        q = {"lo": lo, "hi": hi, "off": off, "dn": k * block}
        c.execute(sqlalchemy.text(
            "INSERT INTO trials (trial_id, number, study_id, state, datetime_start, datetime_complete) "
            "SELECT trial_id + :off, number + :dn, study_id, state, datetime_start, datetime_complete FROM trials "
            "WHERE trial_id BETWEEN :lo AND :hi"), q)
        for table, cols in (("trial_params", "param_name, param_value, distribution_json"),
                            ("trial_values", "objective, value, value_type"),
                            ("trial_user_attributes", "key, value_json"),
                            ("trial_system_attributes", "key, value_json"),
                            ("trial_intermediate_values", "step, intermediate_value, intermediate_value_type")):
            c.execute(sqlalchemy.text(f"INSERT INTO {table} (trial_id, {cols}) SELECT trial_id + :off, {cols} "
                                      f"FROM {table} WHERE trial_id BETWEEN :lo AND :hi"), q)
        if engine.dialect.name == "postgresql":
            for table, col in (("trials", "trial_id"),):
                c.execute(sqlalchemy.text(f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'), "
                                          f"(SELECT MAX({col}) FROM {table}))"))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cli(*argv: str) -> None:
    from regsweep.search.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"regsweep {' '.join(argv)}: exit {rc}")


def dashboard_api(app, study_id: int) -> int:
    """GET /api/studies/<id> through the WSGI app; returns the payload's bytes."""
    body = io.BytesIO()
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/api/studies/{study_id}", "QUERY_STRING": "",
               "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
               "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": False,
               "wsgi.run_once": False}
    for chunk in app(environ, lambda s, h, exc=None: status.append(s)):
        body.write(chunk)
    if not status[0].startswith("200"):
        raise RuntimeError(f"dashboard API: {status[0]}")
    return body.tell()


@contextlib.contextmanager
def original_serializer():
    """optuna-dashboard's own per-trial serializer while the block runs (``make_app`` installs regsweep's faster,
    output-identical one process-wide: search/optuna_internals.py ``fast_trial_serializer``)."""
    from optuna_dashboard import _serializer

    installed = _serializer.serialize_frozen_trial
    _serializer.serialize_frozen_trial = getattr(installed, "original", installed)
    try:
        yield
    finally:
        _serializer.serialize_frozen_trial = installed


def read_bench(url: str, name: str, report: bool, tmp: Path) -> dict[str, dict[str, float]]:
    """{before|after: {status, export, report, dashboard, dashboard_mb, get_trials}} in seconds."""
    import optuna
    import optuna_dashboard

    from regsweep.search.dashboard import make_app
    from regsweep.search.storage import open_storage

    sid = optuna.load_study(study_name=name, storage=url)._study_id
    args = ("--storage", url, "--study-name", name)
    out: dict[str, dict[str, float]] = {}
    cli("status", *args)  # warm-up: imports and first connections out of the timings
    for when in ("before", "after"):
        row: dict[str, float] = {}
        with old_readers() if when == "before" else contextlib.nullcontext():
            row["status"] = timed(lambda: cli("status", *args))
            row["export"] = timed(lambda: cli("export", *args, "--format", "yaml"))
            if report:
                row["report"] = timed(lambda: cli("report", *args, "--out", str(tmp / f"report-{when}")))
        app = optuna_dashboard.wsgi(open_storage(url, heartbeat=False)) if when == "before" else make_app(url)[0]
        size = [0]
        with original_serializer() if when == "before" else contextlib.nullcontext():
            row["dashboard"] = timed(lambda: size.__setitem__(0, dashboard_api(app, sid)))
        row["dashboard_mb"] = size[0] / 1e6
        out[when] = row
    study = optuna.load_study(study_name=name, storage=url)
    out["after"]["get_trials"] = out["before"]["get_trials"] = timed(lambda: study.get_trials(deepcopy=False))
    return out


# ------------------------------------------------------------------------------------ servers
@contextlib.contextmanager
def own_postgres():
    """A PostgreSQL database of this run's own (the shared server is never reconfigured); None if down."""
    import sqlalchemy

    db = f"regsweep_records_{os.getpid()}"
    try:
        admin = sqlalchemy.create_engine(PG_ADMIN, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {db}")
    except Exception as exc:  # noqa: BLE001 - any failure: the server is not there for us
        print(f"postgresql: skipped ({str(exc).splitlines()[0]})")
        yield None
        return
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + db
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def storages(kinds: list[str], tmp: Path):
    stack = contextlib.ExitStack()
    urls = {}
    for kind in kinds:
        if kind == "sqlite":
            urls[kind] = f"sqlite:///{tmp / 'records.db'}"
        elif kind == "postgresql":
            url = stack.enter_context(own_postgres())
            if url:
                urls[kind] = url
        else:
            raise SystemExit(f"--storages: {kind!r} is not allowed; choose sqlite, postgresql")
    return stack, urls


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,5000", help="trials per read-bench study (default 1000,5000)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per trial of the read-bench studies")
    p.add_argument("--write-epochs", type=int, default=301, help="epochs of the write bench (default 301)")
    p.add_argument("--chunks", default="1,10,25", help="format-2 chunk sizes the write bench compares")
    p.add_argument("--storages", default="sqlite,postgresql")
    p.add_argument("--no-report", action="store_true", help="leave `report` out (Optuna's plots dominate it)")
    p.add_argument("--quick", action="store_true", help="a few seconds: SQLite, 40 trials x 60 epochs")
    p.add_argument("--block", type=int, default=1000, help="trials built by add_trials; the rest are SQL copies")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.epochs, a.write_epochs, a.chunks, a.storages, a.no_report = "24", 30, 30, "10", "sqlite", True
        a.block = 8
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes = [int(s) for s in a.sizes.split(",") if s]  # --sizes "": the write bench only
    at = [e for e in (1, 100, 300) if e < a.write_epochs] or [a.write_epochs - 1]
    figures: dict[str, Any] = {"writes": {}, "reads": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        stack, urls = storages(a.storages.split(","), tmp)
        with stack:
            for kind, url in urls.items():
                w = write_bench(url, a.write_epochs, [int(c) for c in a.chunks.split(",")], at)
                figures["writes"][kind] = w
                print(f"\n== {kind}: one epoch's write (user-attr bytes: mean of the 10 epochs up to it; ms) at epoch "
                      + ", ".join(map(str, at)) + f"; the trial read back whole ({a.write_epochs} epochs)")
                for fmt, row in w.items():
                    cells = "  ".join(f"e{e}: {row[e][0]:>7.0f} B {row[e][1]:6.2f} ms" for e in at)
                    ratio = row[at[-1]][0] / row[at[-2 if len(at) > 1 else 0]][0]
                    print(f"  {fmt:<6} {cells}   bytes e{at[-1]}/e{at[-2 if len(at) > 1 else 0]} = {ratio:.1f}x   "
                          f"max {row['max_bytes']} B   read back {row['read_ms']:.1f} ms")
                for n in sizes:
                    for fmt in ("v1", "v2"):
                        name = f"records-{fmt}-{n}"
                        t0 = time.perf_counter()
                        live_ms = build_study(url, name, n, a.epochs, fmt, a.block)
                        built = time.perf_counter() - t0
                        r = read_bench(url, name, not a.no_report, tmp)
                        r["build_s"], r["live_epoch_ms"] = built, live_ms
                        figures["reads"][f"{kind}/{n}/{fmt}"] = r
                        print(f"\n== {kind}, {n} trials x {a.epochs} epochs, format {fmt} (built in {built:.0f} s; "
                              f"a real trial on top: {live_ms:.2f} ms per epoch write)")
                        b, f = r["before"], r["after"]
                        for key in ("status", "export", "report", "dashboard", "get_trials"):
                            if key in f:
                                print(f"  {key:<11} before {b[key]:7.2f} s   after {f[key]:7.2f} s   "
                                      f"after/before {f[key] / max(b[key], 1e-9):5.2f}")
                        print(f"  {'payload':<11} before {b['dashboard_mb']:7.1f} MB  "
                              f"after {f['dashboard_mb']:7.1f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
