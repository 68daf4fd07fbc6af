"""The parts of a study spec's checks that need nothing of search/spec.py (which imports this module; this
module never imports it): :class:`SpecError` and its one-line ``fail`` helper, the Ray backend's ``ray:``
section (``parse_ray_section``, ``parse_scheduler``) and the in-memory dry run of a spec's sampler and pruner
(``dry_run``; ``spec`` there is a :class:`regsweep.search.spec.StudySpec`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from regsweep.models.config import ConfigError, excerpt

DRY_RUN_TRIALS = 12  # ask/report/tell cycles of the sampler and pruner on the real space, in memory


class SpecError(ConfigError):
    """A bad study spec (one line: file, field, value, what is allowed)."""


def fail(source: str, fld: str, value: Any, allowed: str) -> SpecError:
    return SpecError(f"{source}: {fld}: {excerpt(value)} is not allowed; {allowed}")


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
    base = spec.base.to_dict()
    steps = max(1, min(spec.base.train.epochs, 4))
    phase = ["sampler"]  # who runs now: ask/tell (and sampling) are the sampler's, should_prune the pruner's

    def objective(trial) -> float:
        spec.space.sample(trial, base)
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
            study = optuna.create_study(direction=spec.objective.direction, pruner=spec.make_pruner(),
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
