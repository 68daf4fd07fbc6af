"""Sampler registry: name -> factory(seed, args, space) -> optuna sampler.

``tpe`` defaults to ``multivariate: true, group: true`` (conditional spaces); every sampler is seeded from
the spec's ``sampler.seed``.
"""

from __future__ import annotations

from typing import Any, Callable

from models.registry import Registry

SamplerFactory = Callable[[int | None, dict[str, Any], Any], Any]
SAMPLERS: Registry[SamplerFactory] = Registry("sampler")


@SAMPLERS.register("tpe")
def _tpe(seed, args, space):
    import warnings

    import optuna

    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna, and the point here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, **{"multivariate": True, "group": True, **args})


@SAMPLERS.register("random")
def _random(seed, args, space):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed, **args)


def make_sampler(name: str, seed: int | None, args: dict[str, Any], space: Any):
    return SAMPLERS.get(name)(seed, dict(args), space)
