"""The parts of a study spec's checks that need nothing of search/spec.py (which imports this module; this
module never imports it): :class:`SpecError` and its one-line ``fail`` helper, the Ray backend's ``ray:``
section (``parse_ray_section``, ``parse_scheduler``) and the in-memory dry run of a spec's sampler and pruner
(``dry_run``; ``spec`` there is a :class:`regsweep.search.spec.StudySpec`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

from regsweep.models.config import ConfigError, clip, excerpt

DRY_RUN_TRIALS = 12  # ask/report/tell cycles of the sampler and pruner on the real space, in memory


class SpecError(ConfigError):
    """A bad study spec (one line: file, field, value, what is allowed)."""


def fail(source: str, fld: str, value: Any, allowed: str) -> SpecError:
    return SpecError(f"{source}: {fld}: {excerpt(value)} is not allowed; {allowed}")


MAX_FUSE = 64  # trials trained as one fused group (issue 20): more adds nothing a GPU can use and costs memory


def check_fuse(value: Any, where: str) -> int:
    """``fuse: N`` / ``--fuse N`` as an int 1..MAX_FUSE (``where`` names the field or flag); absent = 1."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FUSE:
        raise SpecError(f"{where}: {excerpt(value)} is not allowed; must be a whole number of trials trained as one "
                        f"fused group, 1..{MAX_FUSE} (1 = one trial at a time)")
    return value


# ------------------------------------------------------------------------------------ the dry run
def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text[:160]}" if text else exc.__class__.__name__


def _dry_run_once(spec: Any, sampler_args: dict[str, Any]) -> Optional[tuple[str, BaseException]]:
    """DRY_RUN_TRIALS trials of the real space on an in-memory study (ask, sample, report + should_prune each
    step, tell), through ``optimize`` as a sweep runs them; returns ('sampler' | 'pruner', the exception) of
    the first failure, else None."""
    import random
    import warnings

    import optuna

    from regsweep.search.samplers import make_sampler

    rng = random.Random(0)
    directions = spec.directions  # several: no report/should_prune (Optuna refuses them; the pruner is checked
    multi = len(directions) > 1   # to be one that reads the history), one value per objective
    base = spec.base.to_dict()
    steps = max(1, min(spec.base.train.epochs, 4))
    phase = ["sampler"]  # who runs now: ask/tell (and sampling) are the sampler's, should_prune the pruner's

    def objective(trial):
        spec.space.sample(trial, base)
        if multi:
            return [rng.random() for _ in directions]
        phase[0] = "pruner"
        for step in range(steps):
            trial.report(rng.random(), step)
            if trial.should_prune():
                break
        phase[0] = "sampler"
        return rng.random()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            study = optuna.create_study(directions=directions, pruner=spec.make_pruner(),
                                        sampler=make_sampler(spec.sampler["name"], spec.sampler.get("seed"),
                                                             sampler_args, spec.space))
            study.optimize(objective, n_trials=DRY_RUN_TRIALS)
        except Exception as exc:  # noqa: BLE001 - any failure of the sampler or pruner is the spec's
            return phase[0], exc
    return None


def dry_run(spec: Any) -> None:
    """Run the sampler and pruner on the real space for a dozen trials in memory (constructors alone accept
    wrong values); a failure is one line naming ``sampler.args.X`` / ``pruner``."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        failure = _dry_run_once(spec, spec.sampler["args"])
        if failure is None:
            return
        who, exc = failure
        source = spec.source or str(spec.path)
        if who == "pruner":
            raise fail(source, "pruner", spec.pruner, f"it fails on this space: {_first_line(exc)}")
        args = spec.sampler["args"]
        # name the argument: the first one that fails on its own
        culprit = next((k for k in args if len(args) == 1 or _dry_run_once(spec, {k: args[k]}) is not None), None)
        if culprit is None:
            raise SpecError(f"{source}: sampler: {spec.sampler['name']} fails on this space "
                            f"({_first_line(exc)})")
        raise fail(source, f"sampler.args.{culprit}", args[culprit],
                    f"{spec.sampler['name']} fails with it: {_first_line(exc)}")
    finally:
        optuna.logging.set_verbosity(level)


# ------------------------------------------------------------------------------------ the ray: section
# read by the Ray backend only (search/backends/ray/); parsed here so a bad section fails `validate` and Ray is
# never imported to check it
SCHEDULERS = ("fifo", "asha", "median", "hyperband")
REFUSED = {
    "pbt": "PBT changes a trial's params mid-run (no single Optuna record) and Ray refuses search algorithms "
           "with it; use asha, median or fifo",
    "pb2": "PB2 changes a trial's params mid-run (no single Optuna record) and Ray refuses search algorithms "
           "with it; use asha, median or fifo",
}
# scheduler -> {arg: (kind, check, what is allowed)}; time is counted in epochs (Ray's training_iteration)
SCHEDULER_ARGS: dict[str, dict[str, tuple[str, str]]] = {
    "fifo": {},
    "asha": {"grace_period": ("int", "an integer in [1, train.epochs]"),
             "reduction_factor": ("float", "a number > 1"),
             "brackets": ("int", "an integer >= 1")},
    "median": {"grace_period": ("int", "an integer in [1, train.epochs]"),
               "min_samples_required": ("int", "an integer >= 1")},
    "hyperband": {"reduction_factor": ("float", "a number > 1")},
}
SCHEDULER_DEFAULTS = {"asha": {"grace_period": 1, "reduction_factor": 2, "brackets": 1},
                      "median": {"grace_period": 1, "min_samples_required": 3},
                      "hyperband": {"reduction_factor": 3}}
RAY_KEYS = ("scheduler", "overfit")


def parse_scheduler(value: Any, source: str, epochs: int, fld: str = "ray.scheduler") -> dict[str, Any]:
    """``NAME`` or ``{name, args}`` -> ``{name, args}`` (args checked; Ray is not imported)."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise fail(source, fld, value, f"must be a scheduler name or {{name, args}}; names: {', '.join(SCHEDULERS)}")
    unknown = sorted(set(value) - {"name", "args"})
    if unknown:
        raise fail(source, f"{fld}.{unknown[0]}", value[unknown[0]], "allowed keys: name, args")
    name = value.get("name")
    if name in REFUSED:
        raise fail(source, f"{fld}.name", name, REFUSED[name])
    if name not in SCHEDULERS:
        raise fail(source, f"{fld}.name", name, f"choose one of: {', '.join(SCHEDULERS)}")
    args = value.get("args") or {}
    if not isinstance(args, Mapping):
        raise fail(source, f"{fld}.args", args, "must be a mapping of keyword arguments")
    allowed = SCHEDULER_ARGS[name]
    for key, v in args.items():
        if key not in allowed:
            raise fail(source, f"{fld}.args.{key}", v, f"{name} takes: {', '.join(allowed) or 'no args'}")
        kind, what = allowed[key]
        number = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        ok = number and (kind == "float" or float(v) == int(v))
        if ok and key == "grace_period":
            ok = 1 <= v <= epochs
        elif ok and key == "reduction_factor":
            ok = v > 1
        elif ok:
            ok = v >= 1
        if not ok:
            raise fail(source, f"{fld}.args.{key}", v,
                        f"must be {what}" + (f" ({epochs})" if "epochs" in what else ""))
    return {"name": name, "args": {k: (int(v) if allowed[k][0] == "int" else float(v)) for k, v in args.items()}}


def parse_ray_section(value: Any, source: str, epochs: int) -> dict[str, Any]:
    """The spec's ``ray:`` section, checked; {} when absent (then the spec hash is unchanged)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail(source, "ray", value, f"must be a mapping with keys: {', '.join(RAY_KEYS)}")
    unknown = [k for k in value if k not in RAY_KEYS]
    if unknown:
        raise fail(source, f"ray.{unknown[0]}", value[unknown[0]], f"allowed keys: {', '.join(RAY_KEYS)}")
    out: dict[str, Any] = {}
    if value.get("scheduler") is not None:
        out["scheduler"] = parse_scheduler(value["scheduler"], source, epochs)
    if "overfit" in value:
        args = value["overfit"] or {}
        if not isinstance(args, Mapping):
            raise fail(source, "ray.overfit", args, "must be a mapping of overfit args (warmup, patience, "
                       "min_delta, window, on_fire)")
        from regsweep.search.pruners.overfit import OverfitPruner

        try:
            OverfitPruner(**args)
        except (TypeError, ValueError) as exc:
            raise fail(source, "ray.overfit", dict(args), str(exc).splitlines()[0]) from None
        out["overfit"] = dict(args)
    return out


def scheduler_label(sched: Mapping[str, Any]) -> str:
    return str(sched["name"])


# ------------------------------------------------------------------------------------ the trackers: section
MLFLOW_ENV = "REGSWEEP_MLFLOW"  # the tracking URI of `--mlflow`, set by `run --workers N` for its workers
TRACKERS = ("mlflow", "tensorboard")  # each off unless configured (spec `trackers:` or --mlflow/--tensorboard)
OFF = "off"
EXPERIMENT_MAX = 256
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*$")


def check_tracking_uri(uri: Any, where: str) -> str:
    """An MLflow tracking URI (``http(s)://HOST[:PORT]``, ``sqlite:///FILE``, ``file:///DIR``, a database URL,
    ``databricks``, a local directory); ``where`` names the field or flag. Nothing is contacted here."""
    from regsweep.search.urls import mask

    shown = excerpt(mask(uri) if isinstance(uri, str) else uri)  # a password in the URI is never echoed
    allowed = ("must be an MLflow tracking URI string: http(s)://HOST[:PORT], sqlite:///FILE, file:///DIR, "
               "postgresql://..., or off")
    if not isinstance(uri, str) or not uri.strip() or any(c.isspace() for c in uri) or len(uri) > 2000:
        raise ConfigError(f"{where}: {shown} is not allowed; {allowed}")
    if "://" in uri:
        from urllib.parse import urlsplit

        scheme = uri.split("://", 1)[0]
        try:
            port = urlsplit(uri).port  # a non-numeric or out-of-range port raises
        except ValueError:
            port = -1
        if not URI_SCHEME.match(scheme) or port == -1 or port == 0:
            raise ConfigError(f"{where}: {shown} is not allowed; {allowed}")
        if scheme in ("http", "https") and not urlsplit(uri).hostname:
            raise ConfigError(f"{where}: {shown} is not allowed; an http(s) URI needs a host")
        if scheme == "sqlite":
            from pathlib import Path

            path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
            if not path or Path(path).is_dir():
                raise ConfigError(f"{where}: {shown} is not allowed; give sqlite:///FILE (a file, not a "
                                  "directory)")
    return uri


def check_log_dir(path: Any, where: str, base_dir: Any = None) -> str:
    """TensorBoard's log directory as an absolute path (relative to ``base_dir``: the spec's folder; a flag's is
    the working directory); an existing file is refused. Nothing is created here."""
    from pathlib import Path

    if not isinstance(path, str) or not path.strip() or "\0" in path:
        raise ConfigError(f"{where}: {excerpt(path)} is not allowed; must be a directory path for TensorBoard's "
                          "event files, or off")
    target = Path(path).expanduser()
    if not target.is_absolute() and base_dir is not None:
        target = Path(base_dir) / target
    target = target.resolve()
    for p in (target, *target.parents):  # a file anywhere on the way is refused (mkdir would fail later)
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{where}: {excerpt(path)} is not allowed; {p} is a file, not a directory for "
                                  "TensorBoard's event files")
            break
    return str(target)


def parse_trackers_section(value: Any, source: str, base_dir: Any) -> dict[str, dict[str, Any]]:
    """The spec's optional ``trackers:`` section -> ``{"mlflow": {"tracking_uri", "experiment"}, "tensorboard":
    {"log_dir"}}`` with only the trackers switched on (a tracker given as null, false or ``off`` is off). It does
    not define the search: it is never part of the spec hash."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail(source, "trackers", value, f"must be a mapping with keys: {', '.join(TRACKERS)}")
    out: dict[str, dict[str, Any]] = {}
    for name, section in value.items():
        if name not in TRACKERS:
            raise fail(source, f"trackers.{clip(name, 60)}", section,
                       f"unknown tracker; allowed: {', '.join(TRACKERS)}")
        if section is None or section is False or section == OFF:
            continue
        keys = ("tracking_uri", "experiment") if name == "mlflow" else ("log_dir",)
        if not isinstance(section, Mapping):
            raise fail(source, f"trackers.{name}", section, f"must be a mapping with keys: {', '.join(keys)}")
        unknown = [k for k in section if k not in keys]
        if unknown:
            raise fail(source, f"trackers.{name}.{clip(unknown[0], 60)}", section[unknown[0]],
                       f"allowed keys: {', '.join(keys)}")
        required = keys[0]
        if required not in section:
            raise SpecError(f"{source}: trackers.{name}.{required}: missing; "
                            + ("give the MLflow tracking URI" if name == "mlflow" else
                               "give a directory for TensorBoard's event files"))
        try:
            if name == "mlflow":
                experiment = section.get("experiment")
                if experiment is not None and (not isinstance(experiment, str) or not experiment.strip()
                                               or len(experiment) > EXPERIMENT_MAX):
                    raise ConfigError(f"trackers.mlflow.experiment: {excerpt(experiment)} is not allowed; must be "
                                      f"an experiment name of 1 to {EXPERIMENT_MAX} characters (default: the study's "
                                      "name)")
                out[name] = {"tracking_uri": check_tracking_uri(section["tracking_uri"],
                                                                "trackers.mlflow.tracking_uri"),
                             "experiment": experiment}
            else:
                out[name] = {"log_dir": check_log_dir(section["log_dir"], "trackers.tensorboard.log_dir", base_dir)}
        except SpecError:
            raise
        except ConfigError as exc:
            raise SpecError(f"{source}: {exc}") from None
    return out


def tracker_settings(spec_trackers: Mapping[str, Any], mlflow: Optional[str] = None,
                     tensorboard: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """The trackers a process runs: the spec's section with the flags on top (``--mlflow URI`` keeps the spec's
    experiment; ``off`` switches a tracker off). The flags' values are checked already (cli_checks)."""
    out = {name: dict(section) for name, section in spec_trackers.items()}
    if mlflow == OFF:
        out.pop("mlflow", None)
    elif mlflow is not None:
        out["mlflow"] = {"tracking_uri": mlflow, "experiment": out.get("mlflow", {}).get("experiment")}
    if tensorboard == OFF:
        out.pop("tensorboard", None)
    elif tensorboard is not None:
        out["tensorboard"] = {"log_dir": tensorboard}
    return out
