"""Sampler registry: name -> factory(seed, args, space) -> optuna sampler, plus what each cannot model.

| name | sampler | cannot model (sampled independently, at random) |
|---|---|---|
| tpe | TPESampler, default ``multivariate: true, group: true`` | - |
| random | RandomSampler | - |
| grid | GridSampler, every value of every param | needs float ``step`` or choices; enumerates inactive conditionals |
| qmc | QMCSampler (Sobol, scrambled) | categorical and conditional params |
| gp | GPSampler | conditional params |
| cmaes | CmaEsSampler | categorical and conditional params |
| nsga2 | NSGAIISampler (multi-objective; a random first generation of ``population_size``, 50) | conditional params |

A multi-objective study (``objectives:``) takes the samplers of :data:`MULTI_OBJECTIVE`: ``nsga2`` or ``tpe``
(Optuna's TPE is multi-objective TPE on such a study), also ``random``.

Every sampler is seeded from the spec's ``sampler.seed``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from regsweep.models.config import ConfigError
from regsweep.models.registry import Registry

SamplerFactory = Callable[[int | None, dict[str, Any], Any], Any]
SAMPLERS: Registry[SamplerFactory] = Registry("sampler")


@dataclass(frozen=True)
class Limits:
    categorical: bool = True  # models categorical params jointly
    conditional: bool = True  # models params that are only sometimes active


LIMITS: dict[str, Limits] = {
    "tpe": Limits(), "random": Limits(), "grid": Limits(),
    "qmc": Limits(categorical=False, conditional=False), "gp": Limits(conditional=False),
    "cmaes": Limits(categorical=False, conditional=False), "nsga2": Limits(conditional=False),
}
# the samplers a multi-objective study (spec ``objectives:``) may use
MULTI_OBJECTIVE = ("nsga2", "tpe", "random")


@contextmanager
def _quiet():
    import optuna

    with warnings.catch_warnings():  # "experimental" flags of samplers we use knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@SAMPLERS.register("tpe")
def _tpe(seed, args, space):
    import optuna

    with _quiet():
        return optuna.samplers.TPESampler(seed=seed, **{"multivariate": True, "group": True, **args})


@SAMPLERS.register("random")
def _random(seed, args, space):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed, **args)


def grid_values(space) -> dict[str, list]:
    """Every value of every param; a float param needs ``step`` (an int param steps by 1 unless told)."""
    import numpy as np

    grid = {}
    for p in space:
        if p.type == "categorical":
            grid[p.path] = list(p.choices)
        elif p.type == "int":
            grid[p.path] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        elif p.step is not None:
            n = int(round((p.high - p.low) / p.step))
            grid[p.path] = [float(v) for v in np.round(p.low + p.step * np.arange(n + 1), 12) if v <= p.high + 1e-12]
        else:
            raise ConfigError(f"space.{p.path}: grid needs a step for float params (or choices); "
                              f"got {{low: {p.low}, high: {p.high}}} with no step")
    return grid


@SAMPLERS.register("grid")
def _grid(seed, args, space):
    import optuna

    return optuna.samplers.GridSampler(grid_values(space), seed=seed, **args)


@SAMPLERS.register("qmc")
def _qmc(seed, args, space):
    import optuna

    with _quiet():
        return optuna.samplers.QMCSampler(seed=seed, **{"qmc_type": "sobol", "scramble": True,
                                                         "warn_independent_sampling": False, **args})


@SAMPLERS.register("gp")
def _gp(seed, args, space):
    import optuna

    with _quiet():
        return optuna.samplers.GPSampler(seed=seed, **{"warn_independent_sampling": False, **args})


@SAMPLERS.register("cmaes")
def _cmaes(seed, args, space):
    import optuna

    with _quiet():
        return optuna.samplers.CmaEsSampler(seed=seed, **{"warn_independent_sampling": False, **args})


@SAMPLERS.register("nsga2")
def _nsga2(seed, args, space):
    import optuna

    with _quiet():
        return optuna.samplers.NSGAIISampler(seed=seed, **args)


# name -> the Optuna class its factory builds (what sampler.args are checked against)
CLASSES = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "qmc": "QMCSampler",
           "gp": "GPSampler", "cmaes": "CmaEsSampler", "nsga2": "NSGAIISampler"}
RESERVED = {"seed": "give the seed as sampler.seed", "search_space": "grid enumerates the space's own values"}


def check_args(name: str, args: dict[str, Any]) -> None:
    """``sampler.args`` against the sampler class's constructor: names and simple types (ConfigError)."""
    import optuna

    from regsweep.models.registry import check_kwargs

    if name in CLASSES:
        check_kwargs(getattr(optuna.samplers, CLASSES[name]), args, "sampler.args", RESERVED)


def make_sampler(name: str, seed: int | None, args: dict[str, Any], space: Any):
    return SAMPLERS.get(name)(seed, dict(args), space)


def limitation_warning(name: str, space) -> str | None:
    """One line naming the params a sampler samples independently, or None."""
    limits = LIMITS.get(name, Limits())
    cats = [p.path for p in space if p.type == "categorical"] if not limits.categorical else []
    cond = [p.path for p in space if p.when] if not limits.conditional else []
    if name == "grid" and any(p.when for p in space):
        return (f"sampler grid enumerates conditional params even when inactive (duplicate trials): "
                f"{', '.join(p.path for p in space if p.when)}")
    params = sorted(set(cats) | set(cond))
    if not params:
        return None
    what = " and ".join(w for w, ps in (("categorical", cats), ("conditional", cond)) if ps)
    return f"sampler {name} cannot model {what} params; it samples these at random: {', '.join(params)}"
