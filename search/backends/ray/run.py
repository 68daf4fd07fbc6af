"""``run --backend ray``: Ray itself (start or join), the Tuner (scheduler, overfit stopper, resources,
checkpoints), ``--resume`` of the study's latest experiment, and the driver around ``tuner.fit()``."""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO

from regsweep.models.config import ConfigError
from regsweep.search import log
from regsweep.search.backends.optuna_backend import RunResult, prune_after_budget
from regsweep.search.backends.ray import FORMAT_ATTR, RAY_FORMAT, RESULTS_ENV, STORAGE_ENV
from regsweep.search.backends.ray.driver import RayDriver, fail_dead_driver
from regsweep.search.backends.ray.trainable import storage_fingerprint, train_trial
from regsweep.search.spec import StudySpec
from regsweep.search.spec_checks import SCHEDULER_DEFAULTS, parse_scheduler
from regsweep.search.study import budget, done_count, open_study_locked
from regsweep.search.trial import warn_no_weights
from regsweep.search.urls import check_url, mask, sqlite_file

PAUSING = ("hyperband",)  # schedulers that pause and resume trials: every epoch is checkpointed (models.train)


# ------------------------------------------------------------------------------------ Ray itself
def init_ray(url: str, address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Start a local Ray (``address`` None) with the storage URL in the workers' inherited environment, or
    join a cluster passing it as the job's ``runtime_env`` env var. Quiet: Ray's own logging at ERROR."""
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address is None:
        os.environ[STORAGE_ENV] = url  # local workers inherit the driver's environment
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False, configure_logging=True)
    else:
        ray.init(address=address, runtime_env={"env_vars": {STORAGE_ENV: url}}, logging_level=logging.ERROR,
                 log_to_driver=False)


def check_user_models(spec: StudySpec, address: Optional[str]) -> None:
    """A model by import path from the spec's folder runs on a local Ray only (its workers see the driver's
    files, and the trainable appends that folder to ``sys.path`` as the driver does); joining a cluster
    (``--address``) with one is refused: the folder is not shipped. A model importable from an installed package
    (or a ``regsweep.models`` plugin) is assumed installed on every node."""
    from regsweep.models.plugins import module_file

    if address is None:
        return
    for ref in spec.user_models:
        path = module_file(ref)
        if path is None or path.is_relative_to(spec.directory):
            raise ConfigError(f"--address: {address!r} is not allowed with model.name {ref!r} from the spec's folder "
                              f"{spec.directory}: Ray does not ship it to a cluster; install it as a package on every "
                              "node (a regsweep.models entry point gives it a short name) or leave out --address")


def _check_workers_env(url: str) -> None:
    """The running Ray's workers must see this storage in $REGSWEEP_RAY_STORAGE (a Ray started elsewhere)."""
    import ray

    @ray.remote(num_cpus=0)
    def fingerprint() -> Optional[str]:
        value = os.environ.get(STORAGE_ENV)
        return storage_fingerprint(value) if value else None

    got = ray.get(fingerprint.remote())
    if got != storage_fingerprint(url):
        raise ConfigError(f"storage: the running Ray's workers {'lack' if got is None else 'have another'} "
                          f"${STORAGE_ENV}; start Ray with it exported (or let regsweep start Ray)")


def _quiet_ray_loggers() -> None:
    import logging

    for name in ("ray", "ray.tune", "ray.train", "ray.air", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------ checks
def check_run_args(url: str, *, n_trials: Optional[int], device: Optional[str], address: Optional[str],
                   gpus_per_trial: Optional[float], cpus_per_trial: Optional[int]) -> dict[str, float]:
    """The Ray flags, checked before anything is written; returns the per-trial resources."""
    cpus = 1 if cpus_per_trial is None else cpus_per_trial
    gpus = 0.0 if gpus_per_trial is None else gpus_per_trial
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"--cpus-per-trial: {cpus!r} is not allowed; must be an integer >= 1")
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus) or gpus < 0 \
            or (gpus > 1 and gpus != int(gpus)):
        raise ConfigError(f"--gpus-per-trial: {gpus!r} is not allowed; must be a fraction in [0, 1] or a whole "
                          "number of GPUs")
    if device is not None and device.startswith("cuda") and not gpus:
        raise ConfigError(f"--device: {device!r} is not allowed with --gpus-per-trial 0 on the Ray backend; "
                          "give --gpus-per-trial (Ray assigns each trial its GPUs)")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials: {n_trials} is not allowed; must be >= 1")
    if address is not None and (not isinstance(address, str) or not address or
                                (address != "auto" and ":" not in address and not address.startswith("ray://"))):
        raise ConfigError(f"--address: {address!r} is not allowed; use auto or HOST:PORT of the Ray head")
    if check_url(url) == "sqlite" and sqlite_file(url) is None:
        raise ConfigError(f"storage: {url!r} is not allowed with --backend ray; an in-memory SQLite database "
                          "is not shared with Ray's worker processes; use sqlite:///PATH")
    if address is not None and sqlite_file(url) is not None:
        log.get(__name__).warning(f"storage is a SQLite file ({sqlite_file(url)}); every Ray node must see that path")
    return {"cpu": cpus, "gpu": gpus}


def experiment_dirs(root: Path, study_name: str) -> list[Path]:
    """The study's Ray experiments under Ray's storage path, oldest first."""
    return sorted((p for p in root.glob(f"{study_name}-ray-*") if p.is_dir()), key=lambda p: p.name)


def resumable_experiment(study, study_name: str, root: Path) -> Path:
    """The experiment ``--resume`` restores: the study's latest, made by regsweep >= 0.2 (one-line refusals)."""
    previous = experiment_dirs(root, study_name)
    if not previous:
        raise ConfigError(f"--resume: no Ray experiment of study '{study_name}' under {root}; run without --resume")
    if study.user_attrs.get(FORMAT_ATTR) != RAY_FORMAT:
        raise ConfigError(f"--resume: the Ray experiment {previous[-1].name} of study '{study_name}' was made by "
                          "regsweep < 0.2 and cannot be resumed; run without --resume (the study's finished "
                          "trials are kept)")
    return previous[-1]


# ------------------------------------------------------------------------------------ the Tuner
def scheduler_label(sched: Mapping[str, Any]) -> str:
    return str(sched["name"])


def make_scheduler(sched: Mapping[str, Any], spec: StudySpec):
    """Ray's scheduler; time is counted in epochs (training_iteration), ASHA's and HyperBand's max_t is
    train.epochs."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    if sched["name"] == "fifo":
        return FIFOScheduler()
    args = {**SCHEDULER_DEFAULTS[sched["name"]], **sched.get("args", {})}
    if sched["name"] == "asha":
        return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=spec.base.train.epochs, **args)
    if sched["name"] == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=spec.base.train.epochs, **args)
    return MedianStoppingRule(time_attr="training_iteration", **args)


def scrubbed(spec: StudySpec) -> StudySpec:
    """The spec as Ray may pickle it: without the spec's own storage URL or its trackers (a tracking URI may hold
    a password; the Ray backend runs no trackers)."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("storage", "trackers")}
    return replace(spec, storage=None, raw=raw, trackers={})


def _trial_dirname(trial) -> str:
    return f"trial-{trial.config.get('number', trial.trial_id)}-{trial.trial_id}"


def new_tuner(spec: StudySpec, trainable, sched: Mapping[str, Any], run_name: str, root: Path):
    """A Tuner for a new experiment: the study searcher, Ray's scheduler, the overfit stopper (``ray.overfit``).
    Ray never retries a trial (``max_failures=0``): the driver owns retries (driver.py, ``LOST_REASON``)."""
    from ray import tune

    from regsweep.search.backends.ray.searcher import overfit_stopper_class, study_searcher_class

    metric, mode = spec.objective.metric, spec.objective.direction[:3]
    stopper = overfit_stopper_class()(spec.ray["overfit"]) if "overfit" in spec.ray else None
    return tune.Tuner(
        trainable, param_space={},
        tune_config=tune.TuneConfig(search_alg=study_searcher_class()(metric, mode),
                                    scheduler=make_scheduler(sched, spec), metric=metric, mode=mode, num_samples=-1,
                                    reuse_actors=True, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=run_name, storage_path=str(root), stop=stopper, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  checkpoint_config=tune.CheckpointConfig(
                                      checkpoint_at_end=False, num_to_keep=2 if sched["name"] in PAUSING else None)))


def _fit_quietly(tuner) -> None:
    """``tuner.fit()`` with Ray's progress tables and banners kept off the terminal (trial lines are ours)."""
    import warnings

    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        # HyperBand forces the result buffer to 1, which run() sets for every scheduler anyway
        warnings.filterwarnings("ignore", message=".*TUNE_RESULT_BUFFER_LENGTH is set")
        tuner.fit()


def fit_driver(driver: RayDriver, tuner, pausing: bool) -> None:
    """``tuner.fit()`` with the driver attached; this driver's trials never stay RUNNING (a Tune error, or
    Ctrl-C, after which Tune returns with trials it never finished: FAIL them, exit 130)."""
    try:
        with driver.attached(), driver.heartbeat() if pausing else contextlib.nullcontext():
            _fit_quietly(tuner)
    except BaseException as exc:
        driver.fail_open_trials(f"failed:ray: {exc.__class__.__name__}")
        raise
    if driver.open:
        driver.fail_open_trials("failed:interrupted")
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------------ run
def run(spec: StudySpec, url: str, study_name: str, *, n_trials: Optional[int] = None, timeout: Optional[float] = None,
        device: Optional[str] = None, address: Optional[str] = None, gpus_per_trial: Optional[float] = None,
        cpus_per_trial: Optional[int] = None, resume: bool = False, allow_spec_change: bool = False,
        scheduler: Any = None, out: Optional[TextIO] = None, storage_path: Optional[str] = None,
        num_cpus: Optional[int] = None, artifacts: Optional[str] = None) -> RunResult:
    """Run the study on Ray Tune until its budget of COMPLETE + PRUNED trials is met (see the package docstring).

    ``scheduler`` (a name or ``{name, args}``) overrides the spec's ``ray.scheduler``; ``storage_path`` is Ray's
    (default ``$REGSWEEP_RAY_RESULTS``, else ``~/ray_results``); ``resume`` restores this study's latest Ray
    experiment there (``Tuner.restore``) after failing and re-queuing the trials its dead driver left RUNNING.
    A trial whose process died (its node lost) is failed with a reason and re-queued once by the driver.
    """
    import optuna

    from regsweep.search.artifacts import open_store
    from regsweep.search.artifacts import resolve as resolve_artifacts

    out = log.info_stream(__name__, out)
    if spec.multi:  # the CLI refuses it first (search/cli_run.py); Tune's schedulers take one metric and mode
        raise ConfigError(f"{spec.source or spec.path}: objectives: several objectives are not allowed with the Ray "
                          "backend; run them with --backend optuna")
    check_user_models(spec, address)
    resources = check_run_args(url, n_trials=n_trials, device=device, address=address,
                               gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial)
    sched = parse_scheduler(scheduler, "scheduler", spec.base.train.epochs, "scheduler") if scheduler is not None \
        else spec.ray.get("scheduler", {"name": "fifo", "args": {}})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study_locked(spec, url, study_name, allow_spec_change=allow_spec_change, n_trials=n_trials)
    total, already = budget(study, spec), done_count(study)
    print(f"study '{study_name}' in {mask(url)}: {already}/{total} trials done (Ray Tune, scheduler "
          f"{scheduler_label(sched)})", file=out, flush=True)
    root = Path(storage_path or os.environ.get(RESULTS_ENV) or Path.home() / "ray_results").expanduser().resolve()
    previous = resumable_experiment(study, study_name, root) if resume else None
    if previous is not None:
        fail_dead_driver(spec, study, previous.name, out)
        already = done_count(study)
    if already >= total:
        print(f"budget met: {already} COMPLETE+PRUNED trials >= n_trials {total}; nothing to run", file=out)
        return RunResult(study, 0, True)

    os.environ["TUNE_RESULT_BUFFER_LENGTH"] = "1"  # a scheduler's STOP must reach a trial before its next epoch
    init_ray(url, address, num_cpus)
    _quiet_ray_loggers()
    _check_workers_env(url)
    deadline_s = timeout if timeout is not None else spec.timeout
    location = resolve_artifacts(study, url, artifacts, coordinator=True)
    if location is not None:
        print(f"artifacts: {location}", file=out, flush=True)
    else:
        warn_no_weights(spec)
    driver = RayDriver(scrubbed(spec), study, url, run_name=previous.name if previous else "", out=out,
                       scheduler=scheduler_label(sched), artifact_store=open_store(location) if location else None,
                       deadline=None if deadline_s is None else time.monotonic() + deadline_s)
    start = time.monotonic()
    root_run = run_experiments(driver, spec, sched, root, previous, resources, device or (
        "cuda" if resources["gpu"] else "cpu"), location)
    print(f"ran {driver.ran} trials in {time.monotonic() - start:.1f}s on Ray (experiment {root_run})",
          file=out, flush=True)
    if driver.streak.broken:
        raise driver.streak.error()
    if driver.artifact_store is not None:  # keep_weights: best: the driver is the coordinator
        prune_after_budget(spec, study, budget(study, spec), driver.artifact_store, out)
    return RunResult(study, driver.ran, False)


def run_experiments(driver: RayDriver, spec: StudySpec, sched: Mapping[str, Any], root: Path,
                    previous: Optional[Path], resources: dict[str, float], trial_device: str,
                    artifacts: Optional[str] = None) -> Path:
    """Restore ``previous`` (when resuming) and fit it; when it had already finished its search, or without
    one, fit a new experiment for the rest of the budget (under ``previous``'s name when Ray cannot restore
    it). Returns the last experiment's directory."""
    from ray import tune

    pausing = sched["name"] in PAUSING
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec=driver.spec, device=trial_device,
                                                         checkpoints=pausing, artifacts=artifacts), resources)
    new_name = f"{driver.study.study_name}-ray-{time.strftime('%Y%m%d-%H%M%S')}"
    if previous is not None and tune.Tuner.can_restore(str(previous)):
        print(f"resume: restoring Ray experiment {previous}", file=driver.out, flush=True)
        fit_driver(driver, tune.Tuner.restore(str(previous), trainable=trainable, resume_unfinished=False,
                                              resume_errored=False, restart_errored=False), pausing)
        if driver.done() or done_count(driver.study) >= budget(driver.study, spec):
            return root / previous.name
        new_name = f"{driver.study.study_name}-ray-{time.strftime('%Y%m%d-%H%M%S')}"  # the rest of the budget
    elif previous is not None:  # its driver died before Ray saved it: a new Tuner under the same name
        new_name = previous.name
    driver.run_name = new_name
    driver.study.set_user_attr(FORMAT_ATTR, RAY_FORMAT)  # --resume of this experiment is allowed
    fit_driver(driver, new_tuner(spec, trainable, sched, driver.run_name, root), pausing)
    return root / driver.run_name
