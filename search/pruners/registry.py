"""Pruner registry: spec name -> factory(args, ctx) -> optuna pruner.

| name | pruner | notes |
|---|---|---|
| none | NopPruner | |
| median | MedianPruner | args: n_startup_trials, n_warmup_steps, interval_steps, n_min_trials |
| percentile | PercentilePruner | args: percentile (required), ... |
| successive_halving | SuccessiveHalvingPruner (ASHA) | args: min_resource, reduction_factor, ... |
| hyperband | HyperbandPruner | max_resource defaults to train.epochs, explicitly |
| patient | PatientPruner | args: patience, min_delta; ``wrapped:`` another pruner spec |
| threshold | ThresholdPruner | args: lower, upper, n_warmup_steps |
| overfit | search/pruners/overfit.py | args: warmup, patience, min_delta, window, on_fire (complete/prune) |

A spec is ``{name, args}``, ``{name: patient, args, wrapped: SPEC}``, ``{any_of: [SPEC, ...]}`` or
``{all_of: [SPEC, ...]}``; a bare string is ``{name: STRING}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from regsweep.models.config import ConfigError, clip, excerpt
from regsweep.models.registry import Registry


@dataclass(frozen=True)
class PrunerContext:
    epochs: int  # train.epochs of the base config: the max resource
    source: str  # spec file, for error messages


PrunerFactory = Callable[[dict[str, Any], PrunerContext], Any]
PRUNERS: Registry[PrunerFactory] = Registry("pruner")


def _optuna(cls_name: str, defaults: Callable[[PrunerContext], dict[str, Any]] = lambda ctx: {}) -> PrunerFactory:
    def factory(args: dict[str, Any], ctx: PrunerContext):
        import warnings

        import optuna

        with warnings.catch_warnings():  # PatientPruner is "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return getattr(optuna.pruners, cls_name)(**{**defaults(ctx), **args})

    factory.optuna_class = cls_name  # what check_kwargs reads the args' names and types from
    return factory


PRUNERS.add("none", _optuna("NopPruner"))
PRUNERS.add("median", _optuna("MedianPruner"))
PRUNERS.add("percentile", _optuna("PercentilePruner"))
PRUNERS.add("successive_halving", _optuna("SuccessiveHalvingPruner", lambda ctx: {"min_resource": 1}))
PRUNERS.add("hyperband", _optuna("HyperbandPruner", lambda ctx: {"min_resource": 1, "max_resource": ctx.epochs}))
PRUNERS.add("threshold", _optuna("ThresholdPruner"))
PRUNERS.add("patient", _optuna("PatientPruner"))  # wrapped_pruner is filled in by build_pruner


@PRUNERS.register("overfit")
def _overfit(args: dict[str, Any], ctx: PrunerContext):
    from regsweep.search.pruners.overfit import OverfitPruner

    return OverfitPruner(**args)

SPEC_KEYS = {"name", "args", "wrapped"}


def _fail(ctx: PrunerContext, fld: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{ctx.source}: {fld}: {excerpt(value)} is not allowed; {allowed}")


def label(spec: Any) -> str:
    """A short human name of a pruner spec: 'median', 'any_of(median,overfit)'."""
    if isinstance(spec, str):
        return spec
    if spec is None:
        return "none"
    for key in ("any_of", "all_of"):
        if key in spec:
            return f"{key}({','.join(label(s) for s in spec[key])})"
    return str(spec.get("name"))


def pruner_names(spec: Any) -> list[str]:
    """The pruner names a (valid) pruner spec uses, composites unfolded: {any_of: [median, overfit]} ->
    ['median', 'overfit']; a patient pruner is 'patient' (what it wraps runs through it)."""
    if spec is None or isinstance(spec, str):
        return [spec or "none"]
    for key in ("any_of", "all_of"):
        if key in spec:
            return [name for child in spec[key] for name in pruner_names(child)]
    return [str(spec.get("name"))]


def build_pruner(spec: Any, ctx: PrunerContext, fld: str = "pruner"):
    """Build (and so validate) a pruner spec; errors name the field and the allowed values."""
    from regsweep.search.pruners.compose import AllOf, AnyOf

    if spec is None:
        spec = {"name": "none"}
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise _fail(ctx, fld, spec, "must be a pruner name or a mapping {name, args} / {any_of: [...]}")
    for key, cls in (("any_of", AnyOf), ("all_of", AllOf)):
        if key in spec:
            children = spec[key]
            if set(spec) != {key} or not isinstance(children, list) or not children:
                raise _fail(ctx, fld, dict(spec), f"{key} takes a non-empty list of pruner specs and nothing else")
            return cls([(label(c), build_pruner(c, ctx, f"{fld}.{key}[{i}]")) for i, c in enumerate(children)])
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise _fail(ctx, f"{fld}.{clip(unknown[0], 60)}", spec[unknown[0]],
                    "allowed keys: name, args, wrapped, any_of, all_of")
    name = spec.get("name")
    if name not in PRUNERS:
        raise _fail(ctx, f"{fld}.name", name, f"choose one of: {', '.join(PRUNERS.names())}, any_of, all_of")
    args = spec.get("args") or {}
    if not isinstance(args, Mapping):
        raise _fail(ctx, f"{fld}.args", args, "must be a mapping of keyword arguments")
    args = dict(args)
    cls_name = getattr(PRUNERS.get(name), "optuna_class", None)
    if cls_name is not None:
        import optuna

        from regsweep.models.registry import check_kwargs

        try:
            check_kwargs(getattr(optuna.pruners, cls_name), args, f"{fld}.args",
                         {"wrapped_pruner": "give the wrapped pruner as wrapped: SPEC"})
        except ConfigError as exc:
            raise ConfigError(f"{ctx.source}: {exc}") from None
    if name == "patient":
        if "wrapped" not in spec:
            raise ConfigError(f"{ctx.source}: {fld}.wrapped: missing; patient wraps another pruner spec")
        args["wrapped_pruner"] = build_pruner(spec["wrapped"], ctx, f"{fld}.wrapped")
    elif "wrapped" in spec:
        raise _fail(ctx, f"{fld}.wrapped", spec["wrapped"], "only the patient pruner wraps another")
    try:
        return PRUNERS.get(name)(args, ctx)
    except (TypeError, ValueError) as exc:
        raise _fail(ctx, f"{fld}.args", {k: v for k, v in args.items() if k != "wrapped_pruner"},
                    f"{name}: {clip(exc)}") from None
