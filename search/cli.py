"""The ``regsweep`` command line. Exit codes: 0 done, 2 bad input (one line on stderr), 1 runtime
failure, 143 stopped by SIGTERM with the running trial re-queued.

The same flag means the same thing in every command (``--storage``, ``--study-name``/``--study``, ...). This module
holds the parser, ``main`` and the exit codes; the commands that train or run trials are search/cli_run.py's, those
on an existing storage search/cli_read.py's, the flag and environment checks search/cli_checks.py's.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
from typing import Optional

from regsweep import __version__
from regsweep.models.config import ConfigError
from regsweep.search import cli_checks, log
from regsweep.search.cli_read import cmd_dashboard, cmd_export, cmd_report, cmd_status, cmd_storage_proxy
from regsweep.search.cli_run import cmd_bench, cmd_confirm, cmd_run, cmd_train, cmd_validate, cmd_worker
from regsweep.search.signals import Terminated
from regsweep.search.study import SweepFailed

# ------------------------------------------------------------------------------------ parser
ALLOW_OUTSIDE_HELP = ("also let the spec's base: and include: files come from DIR (repeatable; default: only "
                      "the project root, the nearest folder up with pyproject.toml or .regsweep, else the spec's)")
MLFLOW_HELP = ("log each trial as an MLflow run under one study run at this tracking URI (http(s)://HOST:PORT, "
               "sqlite:///FILE, ...; overrides the spec's trackers.mlflow; off: none; the [trackers] extra)")
TENSORBOARD_HELP = ("write each trial's TensorBoard event files under DIR/<study>/trial-NNNNN (overrides the spec's "
                    "trackers.tensorboard; off: none; the [trackers] extra)")
FUSE_HELP = ("train N trials of one architecture as one fused group (1..64; overrides the spec's fuse:; not with "
             "--backend ray or several objectives)")
ARTIFACTS_HELP = ("per-trial artifact store (curves PNG, config YAML, keep_weights files): a directory shared by "
                  "the workers, s3://BUCKET, gs://BUCKET or off (default: the study's; <db>-artifacts/ beside a "
                  "SQLite file)")


def _verbosity_flags(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/-q, before or after the command (after it they must not reset what was given before)."""
    group = p.add_mutually_exclusive_group()
    default = 0 if top else argparse.SUPPRESS
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                       help="debug details too (the spec and storage resolved, each trial's params)")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                       help="warnings and errors only: no progress, trial lines or notes (results still print)")


def _storage_flags(p: argparse.ArgumentParser, study: bool = True) -> None:
    p.add_argument("--storage", default=None,
                   help="storage URL (default: $REGSWEEP_STORAGE, the spec's storage, sqlite:///studies/regsweep.db)")
    if study:
        p.add_argument("--study-name", "--study", dest="study_name", default=None, help="study name")


def parser() -> argparse.ArgumentParser:
    """The CLI table: one ``add_argument`` line per flag, one helper per command (in the order --help lists them)."""
    p = cli_checks.Parser(prog="regsweep", description="Hyperparameter search for the regularisation "
                                "of image classifiers.")
    p.add_argument("--version", action="version", version=f"regsweep {__version__}")
    _verbosity_flags(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_train_parser, _validate_parser, _run_parser, _worker_parser, _status_parser, _confirm_parser,
                _export_parser, _dashboard_parser, _storage_proxy_parser, _report_parser, _bench_parser):
        add(sub)
    for command in sub.choices.values():
        _verbosity_flags(command)
    return p


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train one TrainConfig YAML and write its history and checkpoint")
    t.add_argument("config", metavar="CONFIG.yaml")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    t.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<config name>)")
    t.set_defaults(func=cmd_train)


def _validate_parser(sub) -> None:
    v = sub.add_parser("validate", help="check a study spec (every check of run); writes nothing")
    v.add_argument("spec", metavar="STUDY.yaml")
    _storage_flags(v, study=False)
    v.add_argument("--allow-outside", action="append", default=[], metavar="DIR", help=ALLOW_OUTSIDE_HELP)
    v.set_defaults(func=cmd_validate)


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="run a study spec until its budget of COMPLETE+PRUNED trials is met")
    r.add_argument("spec", metavar="STUDY.yaml")
    _storage_flags(r)
    r.add_argument("--n-trials", type=int, default=None, help="total COMPLETE+PRUNED trials (overrides budget)")
    r.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--allow-spec-change", action="store_true", help="resume although the spec changed")
    r.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: this process)")
    r.add_argument("--gpus", default=None, help="GPU indices for the workers, e.g. 0,1 (default: all visible)")
    r.add_argument("--trials-per-gpu", type=int, default=1, help="workers packed on each GPU")
    r.add_argument("--backend", default="optuna", choices=("optuna", "ray"),
                   help="optuna: regsweep's own workers (default); ray: a Ray Tune sweep (the [ray] extra)")
    r.add_argument("--address", default=None, help="Ray only: auto or HOST:PORT of a Ray head (default: local Ray)")
    r.add_argument("--gpus-per-trial", type=float, default=None, metavar="FLOAT",
                   help="Ray only: GPUs per trial, e.g. 0.5 packs two trials on a GPU (default 0)")
    r.add_argument("--cpus-per-trial", type=int, default=None, metavar="INT",
                   help="Ray only: CPUs per trial (default 1)")
    r.add_argument("--resume", action="store_true",
                   help="Ray only: restore the study's latest Ray experiment after its driver died")
    r.add_argument("--artifacts", default=None, metavar="LOC", help=ARTIFACTS_HELP)
    r.add_argument("--fuse", type=int, default=None, metavar="N", help=FUSE_HELP)
    r.add_argument("--allow-outside", action="append", default=[], metavar="DIR", help=ALLOW_OUTSIDE_HELP)
    r.add_argument("--mlflow", default=None, metavar="URI", help=MLFLOW_HELP)
    r.add_argument("--tensorboard", default=None, metavar="DIR", help=TENSORBOARD_HELP)
    r.set_defaults(func=cmd_run)


def _worker_parser(sub) -> None:
    w = sub.add_parser("worker", help="join a study from any machine and run trials until its budget is done")
    w.add_argument("spec", metavar="STUDY.yaml")
    _storage_flags(w)
    w.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    w.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    w.add_argument("--artifacts", default=None, metavar="LOC",
                   help="this worker's path to the study's artifact store (default: the study's)")
    w.add_argument("--fuse", type=int, default=None, metavar="N", help=FUSE_HELP)
    w.add_argument("--allow-outside", action="append", default=[], metavar="DIR", help=ALLOW_OUTSIDE_HELP)
    w.add_argument("--mlflow", default=None, metavar="URI", help=MLFLOW_HELP)
    w.add_argument("--tensorboard", default=None, metavar="DIR", help=TENSORBOARD_HELP)
    w.set_defaults(func=cmd_worker)


def _status_parser(sub) -> None:
    s = sub.add_parser("status", help="studies in a storage: counts per state, best trial, stop reasons")
    _storage_flags(s)
    s.set_defaults(func=cmd_status)


def _confirm_parser(sub) -> None:
    c = sub.add_parser("confirm", help="retrain the top K configurations on S new train.seed values (the spec's "
                                       "confirm:) in the sibling study <name>.confirm")
    c.add_argument("spec", metavar="STUDY.yaml")
    _storage_flags(c)
    c.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    c.add_argument("--allow-outside", action="append", default=[], metavar="DIR", help=ALLOW_OUTSIDE_HELP)
    c.set_defaults(func=cmd_confirm)


def _export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a trial's complete TrainConfig (default: the best trial)")
    _storage_flags(e)
    e.add_argument("--trial", type=int, default=None, metavar="N",
                   help="trial number (default: best; with a confirm study, the best-mean configuration's trial)")
    e.add_argument("--format", default="yaml", choices=("yaml", "json", "params", "python", "snippet"),
                   help="yaml/json: the TrainConfig; params: the sampled params; python: a standalone PyTorch "
                        "script (no regsweep import); snippet: lines for your own loop (default yaml)")
    e.add_argument("--out", metavar="FILE", default=None, help="output file (default: stdout)")
    e.add_argument("--weights", metavar="FILE", default=None,
                   help="write the trial's stored best-epoch weights (spec keep_weights) to FILE, e.g. best.pt")
    e.set_defaults(func=cmd_export)


def _dashboard_parser(sub) -> None:
    d = sub.add_parser("dashboard", help="optuna-dashboard on the storage (127.0.0.1 only unless --host)")
    _storage_flags(d, study=False)
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; it has no login)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    d.add_argument("--artifacts", default=None, metavar="LOC", help="artifact store (default: the studies' own)")
    d.set_defaults(func=cmd_dashboard)


def _storage_proxy_parser(sub) -> None:
    sp = sub.add_parser("storage-proxy", help="serve $REGSWEEP_STORAGE to workers over gRPC (grpc://HOST:PORT "
                        "storage URLs): one process holds the database connections")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; it has no login)")
    sp.add_argument("--port", type=int, default=13000, help="port (default 13000; 0 picks a free one)")
    sp.set_defaults(func=cmd_storage_proxy)


def _report_parser(sub) -> None:
    rep = sub.add_parser("report", help="a static HTML report of a study: plots, curves, stop reasons")
    _storage_flags(rep)
    rep.add_argument("--out", metavar="DIR", required=True, help="output directory (index.html + PNGs)")
    rep.set_defaults(func=cmd_report)


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="epoch speed of the seeds' loop vs fit, ResNet-18 TFLOP/s, trials/hour packed")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    bench_size = b.add_mutually_exclusive_group()
    bench_size.add_argument("--quick", action="store_true", help="small sizes (minutes on a 2-core CPU)")
    bench_size.add_argument("--dry-run", action="store_true", help="the plan + the smallest run of each measurement")
    b.add_argument("--json", metavar="FILE", default=None, help="also write the figures to FILE")
    b.add_argument("--only", default="mnist_cnn,resnet18,packing", help="a subset of mnist_cnn,resnet18,packing")
    b.set_defaults(func=cmd_bench)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader of our output went away (`regsweep export | head`): as Python's docs recommend (signal module,
        # "Note on SIGPIPE"), point stdout at devnull so the interpreter's final flush does not raise again, and
        # exit 1 without a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Optional[list[str]]) -> int:
    args = parser().parse_args(argv)  # a bad flag: one line, exit 2 (Parser.error)
    log.set_verbosity(args.verbosity)  # every call: main() runs many times in one test process
    if args.verbosity < 0:  # -q: Optuna's own info lines ("A new study created ...") too
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)  # `kill -USR1 PID`: stacks
    try:
        cli_checks.check_environment(args.command)
        cli_checks.check_flags(args)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe raises here, inside main, not in the interpreter's exit
        return code
    except ConfigError as exc:
        log.get(__name__).error(str(exc))
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial ended FAIL (failed:interrupted); run again to resume",
              file=sys.stderr)
        return 130
    except SweepFailed as exc:
        log.get(__name__).error(str(exc))
        return 1
    except Terminated:
        print("terminated: the running trial was re-queued; another worker or run finishes it", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
