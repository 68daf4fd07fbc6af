"""Scale-out (issue 22): trials/hour and database connections with K worker processes, on PostgreSQL directly and
through `regsweep storage-proxy`.

Each worker is a separate process running regsweep's real worker loop (``regsweep.search.loop.worker_loop``: the
budget, ask, heartbeat, stale check and tell) on a trivial objective (one suggested float, ``--sleep`` seconds of
"training", no torch work), so what is measured is the storage path, not training. For each layout (``direct``:
every worker connects to PostgreSQL; ``proxy``: every worker talks to one `regsweep storage-proxy`) and each K,
a fresh study with a budget of K x ``--trials-per-worker`` is swept; ``pg_stat_activity`` of the benchmark's own
database (``regsweep_scale_<pid>``, created and dropped here) is sampled every 0.5 s for the most sessions at
once. Trials/hour runs from the first trial's start to the last trial's end (process start-up excluded).
Checked, never timed: every study ends with exactly its budget COMPLETE and nothing RUNNING.

    .venv/bin/python benchmarks/scale.py [--workers 1,8,32,64] [--layouts direct,proxy] [--trials-per-worker 4]
                                         [--sleep 0.2] [--admin postgresql://postgres@127.0.0.1:5432/test]

Each worker imports regsweep's worker loop, which imports no torch (~50 MB resident a process; with torch it was
~0.6 GB). Reuses benchmarks/scaling.py's process helpers.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import _states, _stop_group  # noqa: E402 - the sibling benchmark's process helpers

ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
WORKER = """
import io, sys, time, warnings
import optuna
from regsweep.search.loop import worker_loop
from regsweep.search.storage import open_storage
url, name, n, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore")
study = optuna.load_study(study_name=name, storage=open_storage(url))

def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(sleep)
    return x

worker_loop(study, objective, url, n, out=io.StringIO(), poll=0.5)
"""


class Sessions(threading.Thread):
    """The most sessions at once on database ``db`` (sampled every 0.5 s from the admin database)."""

    def __init__(self, admin_url: str, db: str):
        super().__init__(daemon=True)
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(admin_url, poolclass=sqlalchemy.pool.NullPool)
        self.db, self.most, self.names, self.stop = db, 0, set(), threading.Event()

    def run(self) -> None:
        import sqlalchemy

        with self.engine.connect() as conn:
            while not self.stop.is_set():
                rows = conn.execute(sqlalchemy.text("SELECT application_name FROM pg_stat_activity WHERE datname = :d"),
                                    {"d": self.db}).fetchall()
                conn.commit()
                self.most = max(self.most, len(rows))
                self.names.update(r[0] or "(none)" for r in rows)
                self.stop.wait(0.5)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=10)
        self.engine.dispose()


def start_proxy(db_url: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", "storage-proxy", "--port", "0"],
                            env={**os.environ, "REGSWEEP_STORAGE": db_url, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    line = proc.stdout.readline()
    m = re.search(r"on (grpc://[^ ]+)", line)
    if m is None:
        _stop_group(proc)
        raise RuntimeError(f"the storage proxy did not start: {line}{proc.stdout.read()[-2000:]}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, m.group(1)


def sweep(url: str, db_url: str, admin_url: str, db: str, name: str, workers: int, n: int, sleep: float) -> dict:
    import optuna
    import sqlalchemy
    from optuna.trial import TrialState

    from regsweep.search.study import BUDGET_ATTR

    direct = optuna.storages.RDBStorage(db_url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    optuna.create_study(storage=direct, study_name=name).set_user_attr(BUDGET_ATTR, n)  # holds no connection
    sessions = Sessions(admin_url, db)
    sessions.start()
    procs = [subprocess.Popen([sys.executable, "-P", "-c", WORKER, url, name, str(n), str(sleep)],
                              env={**os.environ, "REGSWEEP_WORKER": f"w{i}"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for i in range(workers)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=120 + 3 * n * (sleep + 0.5))
            if p.returncode != 0:
                raise RuntimeError(f"a worker exited {p.returncode}: {err[-1500:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                _stop_group(p)
        sessions.finish()
    check = optuna.load_study(study_name=name, storage=direct)
    trials = check.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(done) != n or any(t.state == TrialState.RUNNING for t in trials):  # the budget contract, not a timing
        raise RuntimeError(f"study {name}: {len(done)} COMPLETE trials, expected exactly {n} ({_states(check)})")
    wall = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    direct.engine.dispose()
    return {"workers": workers, "trials": n, "wall": wall, "per_hour": 3600 * n / wall, "connections": sessions.most,
            "names": sorted(sessions.names)}


def main(argv: list[str] | None = None) -> int:
    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,8,32,64", help="worker process counts (default 1,8,32,64)")
    p.add_argument("--layouts", default="direct,proxy", help="direct, proxy or both (default)")
    p.add_argument("--trials-per-worker", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.2, help="seconds each trial 'trains' (default 0.2)")
    p.add_argument("--admin", default=ADMIN, help=f"a PostgreSQL database to create the benchmark's in ({ADMIN})")
    args = p.parse_args(argv)
    counts = [int(k) for k in args.workers.split(",")]
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"direct", "proxy"} or min(counts) < 1 or args.trials_per_worker < 1:
        p.error("--layouts takes direct,proxy; --workers and --trials-per-worker whole numbers >= 1")
    db = f"regsweep_scale_{os.getpid()}"
    db_url = args.admin.rsplit("/", 1)[0] + f"/{db}"
    admin = sqlalchemy.create_engine(args.admin, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {db}")
    print(f"benchmarks/scale.py: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, trials of "
          f"{args.sleep} s, {args.trials_per_worker} per worker, database {db}", flush=True)
    print(f"{'layout':<8}{'workers':>8}{'trials':>8}{'wall s':>9}{'trials/hour':>13}{'max DB connections':>20}  "
          "sessions seen", flush=True)
    proxy = None
    try:
        for layout in layouts:
            url = db_url
            if layout == "proxy":
                proxy, url = start_proxy(db_url)
            for k in counts:
                r = sweep(url, db_url, args.admin, db, f"scale-{layout}-{k}", k, k * args.trials_per_worker, args.sleep)
                print(f"{layout:<8}{r['workers']:>8}{r['trials']:>8}{r['wall']:>9.2f}{r['per_hour']:>13.0f}"
                      f"{r['connections']:>20}  {', '.join(r['names'])}", flush=True)
            if proxy is not None:
                proxy.send_signal(signal.SIGTERM)
                proxy.wait(timeout=20)
                proxy = None
    finally:
        if proxy is not None:
            _stop_group(proxy)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
