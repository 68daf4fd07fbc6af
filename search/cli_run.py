"""The ``regsweep`` commands that train or run trials: ``train``, ``validate`` (the checks of ``run``, read-only),
``run`` (regsweep's own workers or Ray Tune), ``confirm``, ``worker`` and ``bench``; and the storage URL resolution
(:func:`storage_url`) and the fused trial's replay reference (:func:`ensure_replay`) that search/cli_read.py shares.
The parser and the exit codes are search/cli.py's; torch, Optuna and Ray are imported inside the commands only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from regsweep.models.config import ConfigError
from regsweep.search import cli_checks, log
from regsweep.search.urls import mask, sqlite_file

DEFAULT_STUDIES_DIR = Path("studies")


# ------------------------------------------------------------------------------------ helpers
def storage_url(args: argparse.Namespace, spec=None) -> str:
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
    url = storage_url(args, spec)
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
    url = storage_url(args, spec)
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
    ensure_replay(study, best, device)


def ensure_replay(study, trial, device) -> None:
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


def cmd_bench(args: argparse.Namespace) -> int:
    from regsweep.search.bench import run_args

    return run_args(args)
