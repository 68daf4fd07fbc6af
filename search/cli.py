"""The ``regsweep`` command line. Exit codes: 0 done, 2 bad input (one line on stderr), 1 runtime
failure, 143 stopped by SIGTERM with the running trial re-queued.

The same flag means the same thing in every command (``--storage``, ``--study-name``/``--study``, ...).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from regsweep import __version__
from regsweep.models.config import ConfigError
from regsweep.search import cli_checks, log
from regsweep.search.signals import Terminated
from regsweep.search.study import SweepFailed
from regsweep.search.urls import mask, sqlite_file

DEFAULT_STUDIES_DIR = Path("studies")


# ------------------------------------------------------------------------------------ helpers
def _storage_url(args: argparse.Namespace, spec=None) -> str:
    from regsweep.search.urls import check_sqlite_path, check_url, resolve_url

    spec_dir = (Path.cwd() if spec.builtin else spec.directory) if spec is not None else DEFAULT_STUDIES_DIR
    url = resolve_url(getattr(args, "storage", None), spec.storage if spec is not None else None, spec_dir)
    try:
        check_url(url)
        check_sqlite_path(url)
    except ConfigError as exc:  # say where the URL came from
        where = ("--storage" if getattr(args, "storage", None) else
                 "$REGSWEEP_STORAGE" if os.environ.get("REGSWEEP_STORAGE") else
                 f"{spec.source}: storage" if spec is not None and spec.storage else "storage")
        raise ConfigError(f"{where}: {str(exc).removeprefix('storage: ')}") from None
    source = ("--storage" if getattr(args, "storage", None) else "$REGSWEEP_STORAGE" if os.environ.get(
        "REGSWEEP_STORAGE") else "the spec's storage" if spec is not None and spec.storage else "the default")
    log.get(__name__).debug(f"storage {mask(url)} (from {source})")
    return url


def _study_names(storage) -> list[str]:
    import optuna

    if storage is None:  # a database without Optuna's tables holds no study
        return []
    return list(optuna.get_all_study_names(storage))  # summaries would load every trial of every study


def _load_study(args: argparse.Namespace):
    """The study named by --study-name in the storage, or the only study there (creates nothing)."""
    import optuna

    from regsweep.search.storage import open_readonly
    from regsweep.search.urls import mask

    url = _storage_url(args)
    storage = open_readonly(url)
    names = _study_names(storage)
    name = args.study_name
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"--study-name: required; {mask(url)} holds "
                              f"{len(names)} studies: {', '.join(names) or 'none'}")
        name = names[0]
    if name not in names:
        raise ConfigError(f"--study-name: {cli_checks.shown(name)} not found in {mask(url)}; "
                          f"studies: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage), url


# ------------------------------------------------------------------------------------ commands
def cmd_train(args: argparse.Namespace) -> int:
    from regsweep.models.build import load_config
    from regsweep.models.data import check_files

    check_files(load_config(args.config).data, base_dir=Path(args.config).parent)
    from regsweep.models.train import run_training

    return run_training(args.config, args.device, args.out, quiet=not log.get(__name__).isEnabledFor(log.logging.INFO))


def cmd_validate(args: argparse.Namespace) -> int:
    from regsweep.search.spec import load_spec
    from regsweep.search.study import check_existing_study, warm_params
    from regsweep.search.urls import mask

    spec = load_spec(args.spec, allow_outside=args.allow_outside)
    cli_checks.check_data_files(spec)
    cli_checks.check_tracker_packages(_trackers(args, spec))
    url = _storage_url(args, spec)
    cli_checks.check_reachable(url)
    check_existing_study(spec, url, spec.name)  # the spec-hash rule of run, read-only
    warm = warm_params(spec)  # the warm-start study read (its storage reachable, values inside the space)
    cli_checks.warn_sampler_limits(spec)
    cond = spec.space.conditional()
    trackers = _trackers(args, spec)
    print(f"{args.spec}: ok — study '{spec.name}', {len(spec.space)} params"
          f"{f' ({len(cond)} conditional)' if cond else ''}, sampler {spec.sampler['name']}, "
          f"{', '.join(f'{o.direction} {o.metric}' for o in spec.all_objectives)}"
          f"{' (Pareto front)' if spec.multi else ''}, n_trials {spec.n_trials}, storage {mask(url)}"
          f"{f', warm start: {len(warm)} configs' if spec.warm_start else ''}"
          f"{', confirm: top {top_k} x {seeds} seeds'.format(**spec.confirm) if spec.confirm else ''}"
          + (f", trackers: {', '.join(trackers)}" if trackers else ""))
    return 0


def _trackers(args: argparse.Namespace, spec) -> dict:
    """The trackers this process runs: the spec's ``trackers:`` with ``--mlflow``/``$REGSWEEP_MLFLOW`` and
    ``--tensorboard`` on top (search/spec_checks.py ``tracker_settings``)."""
    from regsweep.search.spec_checks import tracker_settings

    flags = cli_checks.tracker_flags(args)
    return tracker_settings(spec.trackers, flags["mlflow"], flags["tensorboard"])


def _load_spec_and_storage(args: argparse.Namespace, spec=None):
    """The spec (loaded here unless given) and its reachable storage URL: what `run` and `worker` start from."""
    from regsweep.search.spec import load_spec
    from regsweep.search.study import warm_params

    spec = spec or load_spec(args.spec, allow_outside=args.allow_outside)
    _debug_spec(spec)
    cli_checks.check_data_files(spec)
    cli_checks.check_tracker_packages(_trackers(args, spec))
    url = _storage_url(args, spec)
    cli_checks.check_reachable(url)
    warm_params(spec)  # a warm start that cannot be read: one line before any study is created
    return spec, url


def _debug_spec(spec) -> None:
    """-v: what the spec resolved to (its file, hash, space, sampler, pruner, weights and trackers)."""
    logger = log.get(__name__)
    if logger.isEnabledFor(log.logging.DEBUG):
        params = ", ".join(p.path for p in spec.space) or "none"
        logger.debug(f"spec {spec.source or spec.path}: hash {spec.spec_hash()}, params {params}"
                     f"; sampler {spec.sampler}; pruner {spec.pruner}; keep_weights {spec.keep_weights}; trackers "
                     f"{', '.join(spec.trackers) or 'none'}")


def _run_setup(args: argparse.Namespace, spec=None):
    """What both backends of `run` start from: the spec, its reachable storage and the study name."""
    spec, url = _load_spec_and_storage(args, spec)
    cli_checks.warn_sampler_limits(spec)
    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials: {args.n_trials} is not allowed; must be >= 1")
    return spec, url, args.study_name or spec.name


def _apply_fuse(args: argparse.Namespace, spec) -> None:
    """``--fuse N`` (run, worker) over the spec's ``fuse:``; refused with several objectives or Ray."""
    from regsweep.search.spec_checks import check_fuse

    if args.fuse is not None:  # the spec's own fuse: was checked against its objectives when it was loaded
        spec.fuse = check_fuse(args.fuse, "--fuse")
        if spec.fuse > 1 and spec.multi:
            raise ConfigError(f"--fuse: {spec.fuse} is not allowed; fused trials need one objective (objectives: "
                              "is multi-objective); drop it or give one objective:")
    if spec.fuse > 1 and getattr(args, "backend", "optuna") == "ray":
        where = "--fuse" if args.fuse is not None else f"{spec.source}: fuse"
        raise ConfigError(f"{where}: {spec.fuse} is not allowed with --backend ray; fused trials run on regsweep's "
                          "own workers (--backend optuna), or set fuse to 1")


def _print_sqlite_file(url: str) -> None:
    if sqlite_file(url) is not None:
        log.get(__name__).info(f"storage: {mask(url)} (SQLite file {sqlite_file(url).resolve()})")


def _print_outcome(study, url: str, name: str) -> int:
    """The study's summary and how to export and replay its best trial; the run's exit code 0."""
    from regsweep.search.record import is_multi
    from regsweep.search.report import format_summary, study_summary
    from regsweep.search.urls import storage_arg

    print(format_summary(study_summary(study)), flush=True)
    if is_multi(study):
        log.get(__name__).info(f"export a trial of the front and train it with:\n  regsweep export {storage_arg(url)} "
                               f"--study-name {name} --trial N --out chosen.yaml\n  regsweep train chosen.yaml")
        return 0
    log.get(__name__).info(f"export the best config and train it with:\n  regsweep export {storage_arg(url)} "
                           f"--study-name {name} --out best.yaml\n  regsweep train best.yaml")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from regsweep.search.backends import optuna_backend

    if args.backend == "ray":
        return _run_on_ray(args)
    ray_only = [flag for flag, given in (("--address", args.address is not None),
                                         ("--gpus-per-trial", args.gpus_per_trial is not None),
                                         ("--cpus-per-trial", args.cpus_per_trial is not None),
                                         ("--resume", args.resume)) if given]
    if ray_only:
        raise ConfigError(f"{ray_only[0]}: not allowed with --backend optuna; it is a Ray flag (add --backend ray)")
    spec, url, name = _run_setup(args)
    _apply_fuse(args, spec)
    gpus = optuna_backend.parse_gpus(args.gpus) if args.workers > 1 or args.gpus else []
    envs = optuna_backend.assignments(args.workers, gpus, args.trials_per_gpu)
    _print_sqlite_file(url)
    common = dict(n_trials=args.n_trials, timeout=args.timeout, device=args.device,
                  allow_spec_change=args.allow_spec_change, artifacts=args.artifacts)
    with _progress(spec, url, name):
        if args.workers == 1:
            if args.gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = envs[0]["CUDA_VISIBLE_DEVICES"]
            study = optuna_backend.run(spec, url, name, trackers=_trackers(args, spec), **common).study
        else:
            study, code = optuna_backend.run_workers(spec, url, name, envs, allow_outside=args.allow_outside,
                                                     trackers=cli_checks.tracker_flags(args), fuse=args.fuse,
                                                     **common)
            if code != 0:
                return code
    _confirm_after_budget(spec, url, name, study, args.device)
    _replay_after_budget(spec, study, args.device)
    return _print_outcome(study, url, name)


def _replay_after_budget(spec, study, device) -> None:
    """The study's best trial, when it was fused, trained alone once as its replay reference (search/replay.py),
    once the budget is met."""
    from regsweep.search.export import pick_trial
    from regsweep.search.record import is_multi
    from regsweep.search.study import budget, done_count

    if is_multi(study) or done_count(study) < budget(study, spec):
        return
    try:
        best = pick_trial(study, None)
    except ConfigError:  # no COMPLETE trial
        return
    _ensure_replay(study, best, device)


def _ensure_replay(study, trial, device) -> None:
    """A fused trial's solo replay reference, trained and recorded now when missing (one note line)."""
    from regsweep.search.replay import needs_reference, record_reference

    if trial.user_attrs.get("config") is None or not needs_reference(study, trial):
        return
    log.note(__name__, f"replay: trial {trial.number} was trained fused; training it alone once as its replay "
                       "reference")
    ref = record_reference(study, trial, device)
    log.note(__name__, f"replay: trial {trial.number}'s reference recorded ({ref['history_len']} epochs, best epoch "
                       f"{ref['best_epoch']}, {ref['stop_reason']}) as study attr regsweep:replay:{trial.number}")


def _confirm_after_budget(spec, url: str, name: str, study, device) -> None:
    """`run` with `confirm:` in the spec: the confirm study once the budget is met (not after a timeout)."""
    from regsweep.search.backends import optuna_backend
    from regsweep.search.study import budget, done_count

    if not spec.confirm:
        return
    if done_count(study) < budget(study, spec):
        log.get(__name__).info("confirm: skipped, the budget is not met yet (run again, or `regsweep confirm` later)")
        return
    optuna_backend.run_confirm(spec, url, name, device=device)


def cmd_confirm(args: argparse.Namespace) -> int:
    """`regsweep confirm STUDY.yaml`: the spec's confirm section on its (finished or not) study."""
    from regsweep.search.backends import optuna_backend

    spec, url = _load_spec_and_storage(args)
    if not spec.confirm:
        raise ConfigError(f"{spec.source}: confirm: missing; add confirm: {{top_k: K, seeds: S}} to the spec")
    optuna_backend.run_confirm(spec, url, args.study_name or spec.name, device=args.device)
    return 0


def _progress(spec, url: str, name: str):
    """The coordinator's progress display (live table on a terminal, plain lines otherwise), which also keeps
    the study's dashboard note up to date; nothing when $REGSWEEP_PROGRESS=off."""
    import contextlib

    from regsweep.search.dashboard import write_note
    from regsweep.search.progress import Progress

    mode = cli_checks.progress_mode()
    if mode == "off":
        return contextlib.nullcontext()
    if not log.get(__name__).isEnabledFor(log.logging.INFO):  # -q: no display, the study note still kept current
        return Progress(url, name, live=False, out=log.InfoStream(log.get("regsweep.search.progress")),
                        on_change=lambda study: write_note(study, spec, url))
    return Progress(url, name, live=None if mode == "auto" else mode == "live",
                    on_change=lambda study: write_note(study, spec, url))


def _run_on_ray(args: argparse.Namespace) -> int:
    """`run --backend ray`: the study on Ray Tune (search/backends/ray/)."""
    for flag, refused in (("--workers", args.workers != 1), ("--gpus", args.gpus is not None),
                          ("--trials-per-gpu", args.trials_per_gpu != 1)):
        if refused:
            raise ConfigError(f"{flag}: not allowed with --backend ray; Ray places trials by --cpus-per-trial and "
                              "--gpus-per-trial")
    import importlib.util

    from regsweep.search.spec import load_spec

    spec = load_spec(args.spec, allow_outside=args.allow_outside)
    _apply_fuse(args, spec)
    if spec.multi:  # Tune's schedulers and searchers take one metric and mode
        raise ConfigError(f"{spec.source}: objectives: several objectives are not allowed with --backend ray (Ray "
                          "Tune's schedulers take one metric); run them with --backend optuna, or give one objective:")
    if importlib.util.find_spec("ray") is None:  # the [ray] extra
        raise ConfigError("--backend: 'ray' is not allowed here; Ray is not installed (pip install 'regsweep[ray]')")
    from regsweep.search.backends.ray import run as ray_run

    spec, url, name = _run_setup(args, spec)
    _refuse_trackers_on_ray(args, spec)
    _print_sqlite_file(url)
    with _progress(spec, url, name):  # the driver is the coordinator: progress and the study note
        result = ray_run.run(spec, url, name, n_trials=args.n_trials, timeout=args.timeout, device=args.device,
                             address=args.address, gpus_per_trial=args.gpus_per_trial,
                             cpus_per_trial=args.cpus_per_trial, resume=args.resume,
                             allow_spec_change=args.allow_spec_change, artifacts=args.artifacts)
    _confirm_after_budget(spec, url, name, result.study, args.device)
    return _print_outcome(result.study, url, name)


def _refuse_trackers_on_ray(args: argparse.Namespace, spec) -> None:
    """The Ray backend runs no trackers: a configured one (flag, $REGSWEEP_MLFLOW or the spec) is one line, exit 2,
    before Ray is started or a study is created."""
    from regsweep.search.spec_checks import MLFLOW_ENV

    settings = _trackers(args, spec)
    for tracker in ("mlflow", "tensorboard"):
        if tracker not in settings:
            continue
        where = (f"--{tracker}" if getattr(args, tracker, None) else f"${MLFLOW_ENV}" if tracker == "mlflow"
                 and os.environ.get(MLFLOW_ENV) else f"{spec.source}: trackers.{tracker}")
        raise ConfigError(f"{where}: not allowed with --backend ray; the Ray backend runs no trackers (MLflow, "
                          f"TensorBoard): run with --backend optuna, or turn it off (--{tracker} off)")


def cmd_worker(args: argparse.Namespace) -> int:
    from regsweep.search import loop

    spec, url = _load_spec_and_storage(args)
    _apply_fuse(args, spec)
    return loop.worker_main(spec, url, args.study_name or spec.name, device=args.device, timeout=args.timeout,
                            artifacts=args.artifacts, trackers=_trackers(args, spec))


def cmd_dashboard(args: argparse.Namespace) -> int:
    from regsweep.search.dashboard import serve
    from regsweep.search.storage import require_sqlite_file

    url = _storage_url(args)
    cli_checks.check_reachable(url)
    require_sqlite_file(url)  # the dashboard reads a study: it never creates a database file
    return serve(url, host=args.host, port=args.port, artifacts=args.artifacts)


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    """Serve $REGSWEEP_STORAGE's database to workers through gRPC (search/proxy_server.py)."""
    from regsweep.search.proxy_server import serve
    from regsweep.search.urls import STORAGE_ENV, check_sqlite_path, check_url, is_proxy

    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise ConfigError(f"${STORAGE_ENV}: not set; the proxy reads its database URL from ${STORAGE_ENV} only "
                          "(never the command line: a URL may hold a password)")
    try:
        check_url(url)
        check_sqlite_path(url)
    except ConfigError as exc:
        raise ConfigError(f"${STORAGE_ENV}: {str(exc).removeprefix('storage: ')}") from None
    if is_proxy(url):
        raise ConfigError(f"${STORAGE_ENV}: {mask(url)!r} is not allowed; the proxy serves a database "
                          "(postgresql://, mysql+pymysql:// or sqlite:///), not another proxy")
    cli_checks.check_grpc()
    cli_checks.check_reachable(url)
    try:
        return serve(url, args.host, args.port)
    except KeyboardInterrupt:
        return 0


def cmd_report(args: argparse.Namespace) -> int:
    from regsweep.search.report import write_report
    from regsweep.search.urls import mask

    study, url = _load_study(args)
    index = write_report(study, Path(args.out), mask(url))
    print(f"wrote {index} ({len(list(index.parent.glob('*.png')))} plots)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import optuna

    from regsweep.search.storage import open_readonly
    from regsweep.search.urls import mask

    if args.study_name is None:
        url = _storage_url(args)
        storage = open_readonly(url)
        names = _study_names(storage)
        print(f"{mask(url)}: {len(names)} studies")
        for name in names:
            _print_status(optuna.load_study(study_name=name, storage=storage))
        return 0
    study, _ = _load_study(args)
    _print_status(study)
    return 0


def _print_status(study) -> None:
    """A study's summary, then its confirm table (mean ± sd per configuration) when it has a confirm study."""
    from regsweep.search import confirm
    from regsweep.search.report import format_summary, study_summary

    print(format_summary(study_summary(study)))
    rows = [] if study.study_name.endswith(confirm.SUFFIX) else confirm.table(study)
    if rows:
        print(confirm.format_table(rows, study.user_attrs.get("regsweep:objective", "value")))


def cmd_export(args: argparse.Namespace) -> int:
    from regsweep.search.export import pick_trial, render
    from regsweep.search.urls import mask

    study, url = _load_study(args)
    if args.trial is None:
        _print_front(study)  # a multi-objective study: its front, then pick_trial asks for --trial N (exit 2)
    trial = pick_trial(study, args.trial)
    if args.weights is not None:
        return _export_weights(args, study, trial, url)
    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out: directory {Path(args.out).parent} does not exist")
    if args.format != "params":
        _ensure_replay(study, trial, None)
    text = render(study, trial, args.format, mask(url))
    if args.trial is None:
        from regsweep.search import confirm

        row = confirm.best_mean(confirm.table(study))
        if row is not None and row["trial"] == trial.number:
            log.note(__name__, "confirm: best mean: "
                     f"{confirm.row_text(row, study.user_attrs.get('regsweep:objective', 'value'))}")
    if args.out:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise ConfigError(f"--out: directory {out.parent} does not exist")
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)  # never a half-written export
        log.note(__name__, f"wrote trial {trial.number} ({args.format}) to {out}")
    else:
        sys.stdout.write(text)
    return 0


def _print_front(study) -> None:
    """A multi-objective study's Pareto front on stdout (plain `export` has no single best trial to write)."""
    from regsweep.search.record import is_multi
    from regsweep.search.report import front_lines, study_summary

    if is_multi(study):
        s = study_summary(study)
        if s["front"]:
            print("\n".join(front_lines(s, indent="")), flush=True)


def _export_weights(args: argparse.Namespace, study, trial, url: str) -> int:
    """`export --weights FILE`: the trial's stored best-epoch weights (keep_weights), written whole or not at all;
    with --out, its config export too (both checked before either is written)."""
    from regsweep.search.artifacts import read_weights
    from regsweep.search.export import render

    target = Path(args.weights)
    if not target.parent.is_dir():
        raise ConfigError(f"--weights: directory {target.parent} does not exist")
    if target.is_dir():
        raise ConfigError(f"--weights: {target} is a directory; give a file such as best.pt")
    data = read_weights(study, trial, url)
    text = render(study, trial, args.format, mask(url)) if args.out else None
    if text is not None and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out: directory {Path(args.out).parent} does not exist")
    writes = [(target, data)] + ([(Path(args.out), text.encode("utf-8"))] if text is not None else [])
    for path, body in writes:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(body)
        tmp.replace(path)  # never a half-written file
    log.note(__name__, f"wrote trial {trial.number}'s best-epoch weights to {target}"
             + (f" and its config ({args.format}) to {args.out}" if text is not None else "")
             + "; load them with torch.load(FILE, weights_only=True) or regsweep.models.train.load_checkpoint(FILE)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from regsweep.search.bench import run_args

    return run_args(args)


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
    """The CLI table: one ``add_argument`` line per flag (long: a flat table reads better than pieces)."""
    p = cli_checks.Parser(prog="regsweep", description="Hyperparameter search for the regularisation "
                                "of image classifiers.")
    p.add_argument("--version", action="version", version=f"regsweep {__version__}")
    _verbosity_flags(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one TrainConfig YAML and write its history and checkpoint")
    t.add_argument("config", metavar="CONFIG.yaml")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    t.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<config name>)")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("validate", help="check a study spec (every check of run); writes nothing")
    v.add_argument("spec", metavar="STUDY.yaml")
    _storage_flags(v, study=False)
    v.add_argument("--allow-outside", action="append", default=[], metavar="DIR", help=ALLOW_OUTSIDE_HELP)
    v.set_defaults(func=cmd_validate)

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

    s = sub.add_parser("status", help="studies in a storage: counts per state, best trial, stop reasons")
    _storage_flags(s)
    s.set_defaults(func=cmd_status)

    c = sub.add_parser("confirm", help="retrain the top K configurations on S new train.seed values (the spec's "
                                       "confirm:) in the sibling study <name>.confirm")
    c.add_argument("spec", metavar="STUDY.yaml")
    _storage_flags(c)
    c.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    c.add_argument("--allow-outside", action="append", default=[], metavar="DIR", help=ALLOW_OUTSIDE_HELP)
    c.set_defaults(func=cmd_confirm)

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

    d = sub.add_parser("dashboard", help="optuna-dashboard on the storage (127.0.0.1 only unless --host)")
    _storage_flags(d, study=False)
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; it has no login)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    d.add_argument("--artifacts", default=None, metavar="LOC", help="artifact store (default: the studies' own)")
    d.set_defaults(func=cmd_dashboard)

    sp = sub.add_parser("storage-proxy", help="serve $REGSWEEP_STORAGE to workers over gRPC (grpc://HOST:PORT "
                        "storage URLs): one process holds the database connections")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; it has no login)")
    sp.add_argument("--port", type=int, default=13000, help="port (default 13000; 0 picks a free one)")
    sp.set_defaults(func=cmd_storage_proxy)

    rep = sub.add_parser("report", help="a static HTML report of a study: plots, curves, stop reasons")
    _storage_flags(rep)
    rep.add_argument("--out", metavar="DIR", required=True, help="output directory (index.html + PNGs)")
    rep.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="epoch speed of the seeds' loop vs fit, ResNet-18 TFLOP/s, trials/hour packed")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    bench_size = b.add_mutually_exclusive_group()
    bench_size.add_argument("--quick", action="store_true", help="small sizes (minutes on a 2-core CPU)")
    bench_size.add_argument("--dry-run", action="store_true", help="the plan + the smallest run of each measurement")
    b.add_argument("--json", metavar="FILE", default=None, help="also write the figures to FILE")
    b.add_argument("--only", default="mnist_cnn,resnet18,packing", help="a subset of mnist_cnn,resnet18,packing")
    b.set_defaults(func=cmd_bench)
    for command in sub.choices.values():
        _verbosity_flags(command)
    return p


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
