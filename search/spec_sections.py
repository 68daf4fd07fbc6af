"""The section parsers of a study spec, called by search/spec.py ``parse_spec`` (this module never imports
spec): ``base:`` (a TrainConfig file inside the allowed roots, or an inline mapping), ``objective:`` and
``objectives:``, ``space:``, ``sampler:``, ``budget:``, ``enqueue:``, ``confirm:`` and ``warm_start:``.

Every error is one line naming the file, the field, the value and what is allowed (spec_checks ``fail``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from regsweep.models.build import check_model, check_names
from regsweep.models.config import ConfigError, TrainConfig, clip, excerpt, get_path, load_yaml_file
from regsweep.search.record import Objective
from regsweep.search.space import Space, build_space, confine
from regsweep.search.spec_checks import SpecError, fail

# metric -> the only direction that makes sense for it
OBJECTIVES = {"val_loss": "minimize", "val_acc": "maximize"}
# objectives: the first is one of OBJECTIVES (per epoch: the best epoch, early stopping and the overfit rule use it);
# the others may also be these (record.py computes them: the gap per epoch, n_params once per trial)
TRADE_OFFS = {**OBJECTIVES, "overfit_gap": "minimize", "n_params": "minimize"}
MAX_OBJECTIVES = 4
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NAME_MAX = 128  # study names: Optuna's column holds 512, a 10,000-character name broke PostgreSQL/MariaDB


def _mapping(source: str, fld: str, value: Any, allowed_keys: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail(source, fld, value, f"must be a mapping with keys: {', '.join(allowed_keys)}")
    unknown = [k for k in value if k not in allowed_keys]
    if unknown:
        raise fail(source, f"{fld}.{clip(unknown[0], 60)}", value[unknown[0]],
                   f"allowed keys: {', '.join(allowed_keys)}")
    return value


def _positive(source: str, fld: str, value: Any, default: Any = None) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(source, fld, value, "must be an integer >= 1")
    return value


def load_base(base: Any, spec_path: Path, source: str, roots: Sequence[Path]) -> TrainConfig:
    if base is None:
        raise SpecError(f"{source}: base: missing; give a TrainConfig file (relative to the spec) or a mapping")
    if isinstance(base, str):
        target = (spec_path.parent / base).resolve()
        try:
            confine(target, roots, source, "base", base)  # before anything is read or its existence told
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
        if not target.is_file():
            raise SpecError(f"{source}: base: {excerpt(base)} not found (looked for {clip(target, 200)})")
        try:
            data = load_yaml_file(target, quote=False)  # never quote a referenced file's text
            if data is not None and not isinstance(data, Mapping):  # (an empty file: the defaults, as before)
                raise SpecError(f"{target}: the document is a {type(data).__name__}, not a TrainConfig mapping "
                                f"(base of {source})")
            # structure, ranges, names (a model by import path: imported with the spec's folder on sys.path)
            return check_names(TrainConfig.from_dict(data, str(target)), str(target), base_dir=spec_path.parent)
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
    if isinstance(base, Mapping):
        try:
            return check_names(TrainConfig.from_dict(base), base_dir=spec_path.parent)
        except ConfigError as exc:
            raise SpecError(f"{source}: base.{exc}") from None
    raise fail(source, "base", base, "must be a TrainConfig file path or an inline mapping")


def parse_objective(value: Any, source: str) -> Objective:
    obj = _mapping(source, "objective", value, ("metric", "direction"))
    metric = obj.get("metric", "val_loss")
    if metric not in OBJECTIVES:
        raise fail(source, "objective.metric", metric, f"choose one of: {', '.join(OBJECTIVES)} (the test set "
                   "never chooses anything)")
    direction = obj.get("direction", OBJECTIVES[metric])
    if direction != OBJECTIVES[metric]:
        raise fail(source, "objective.direction", direction, f"{metric} is optimised with {OBJECTIVES[metric]}")
    return Objective(metric, direction)


def parse_objectives(data: Mapping[str, Any], source: str) -> list[Objective]:
    """``objectives: [{metric, direction}, ...]`` (2..MAX_OBJECTIVES, distinct metrics, the first a per-epoch
    validation metric), or [] when absent; never together with ``objective:``."""
    value = data.get("objectives")
    if value is None:
        return []
    if data.get("objective") is not None:
        raise fail(source, "objectives", value, "give either objective: (one) or objectives: (several), not both")
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_OBJECTIVES:
        raise fail(source, "objectives", value, f"must be a list of 2 to {MAX_OBJECTIVES} {{metric, direction}} "
                   "mappings (one objective: use objective:)")
    out: list[Objective] = []
    for i, entry in enumerate(value):
        fld = f"objectives[{i}]"
        obj = _mapping(source, fld, entry, ("metric", "direction"))
        if not obj:
            raise fail(source, fld, entry, "must be a mapping {metric, direction}")
        metric = obj.get("metric")
        allowed = OBJECTIVES if i == 0 else TRADE_OFFS
        if not isinstance(metric, str) or metric not in allowed:
            why = (" (the first objective chooses the best epoch: a per-epoch validation metric)" if i == 0
                   and metric in TRADE_OFFS else " (the test set never chooses anything)")
            raise fail(source, f"{fld}.metric", metric, f"choose one of: {', '.join(allowed)}{why}")
        if metric in (o.metric for o in out):
            raise fail(source, f"{fld}.metric", metric, "each metric at most once")
        direction = obj.get("direction", TRADE_OFFS[metric])
        if direction != TRADE_OFFS[metric]:
            raise fail(source, f"{fld}.direction", direction, f"{metric} is optimised with {TRADE_OFFS[metric]}")
        out.append(Objective(metric, direction))
    return out


def parse_space(data: Mapping[str, Any], base: TrainConfig, source: str, roots: Sequence[Path],
                spec_dir: Path) -> Space:
    """``space:`` (params inline or ``include:`` files inside ``roots``), at least one param; then a model by
    import path is built once with the base's args and one zero batch goes through it (``check_model``)."""
    if "space" not in data:
        raise SpecError(f"{source}: space: missing; give params or include: a file from spaces/")
    space = build_space(data["space"], base, source, roots, spec_dir)
    if len(space) == 0:
        raise fail(source, "space", data["space"], "must define at least one param")
    try:  # a model by import path: built once with the base's args, one zero batch through it
        check_model(base)
    except ConfigError as exc:
        raise SpecError(f"{source}: base: {exc}") from None
    return space


def parse_sampler(value: Any, source: str) -> dict[str, Any]:
    from regsweep.search.samplers import SAMPLERS

    smp = _mapping(source, "sampler", value, ("name", "seed", "args"))
    if not isinstance(smp.get("args") or {}, Mapping):
        raise fail(source, "sampler.args", smp.get("args"), "must be a mapping of keyword arguments")
    sampler = {"name": smp.get("name", "tpe"), "seed": smp.get("seed", 0), "args": dict(smp.get("args") or {})}
    if sampler["name"] not in SAMPLERS:
        raise fail(source, "sampler.name", sampler["name"], f"choose one of: {', '.join(SAMPLERS.names())}")
    if sampler["seed"] is not None and (isinstance(sampler["seed"], bool) or not isinstance(sampler["seed"], int)):
        raise fail(source, "sampler.seed", sampler["seed"], "must be an integer or null")
    from regsweep.search.samplers import check_args

    try:
        check_args(sampler["name"], sampler["args"])  # names and simple types; a dry run follows
    except ConfigError as exc:
        raise SpecError(f"{source}: {exc}") from None
    return sampler


def parse_budget(value: Any, source: str) -> tuple[int, Any]:
    """``budget: {n_trials, timeout}``: (n_trials >= 1, default 20; timeout, seconds > 0 or None)."""
    budget = _mapping(source, "budget", value, ("n_trials", "timeout"))
    n_trials = budget.get("n_trials", 20)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise fail(source, "budget.n_trials", n_trials, "must be an integer >= 1")
    timeout = budget.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise fail(source, "budget.timeout", timeout, "must be a number of seconds > 0 or null")
    return n_trials, timeout


def parse_enqueue(enqueue: Any, space: Space, source: str, base: TrainConfig) -> list[dict[str, Any]]:
    if enqueue is None:
        return []
    if not isinstance(enqueue, list):
        raise fail(source, "enqueue", enqueue, "must be a list of params mappings ({} = the base config)")
    params = {p.path: p for p in space}
    base_values = base.to_dict()
    out = []
    for i, entry in enumerate(enqueue):
        if not isinstance(entry, Mapping):
            raise fail(source, f"enqueue[{i}]", entry, "must be a mapping of space params to values")
        for key, value in entry.items():
            if key not in params:
                raise fail(source, f"enqueue[{i}].{clip(key, 60)}", value,
                           f"not a space param; params: {', '.join(params)}")
            if not params[key].contains(value):
                raise fail(source, f"enqueue[{i}].{key}", value, f"outside the param's range {params[key].to_dict()}")
        for key, value in entry.items():  # a value whose condition is off would be dropped silently
            for dep, allowed in params[key].when:
                if dep in entry:
                    current, where = entry[dep], "this entry sets it to"
                elif dep in params:
                    continue  # sampled in the trial: the condition may hold
                else:
                    current, where = get_path(base_values, dep), "the base config has"
                if current not in allowed:
                    raise fail(source, f"enqueue[{i}].{key}", value,
                               f"{key} is sampled only when {dep} is {' or '.join(map(repr, allowed))}, and "
                               f"{where} {current!r}")
        out.append(dict(entry))
    return out


def parse_confirm(value: Any, source: str) -> dict[str, Any]:
    """``confirm: {top_k, seeds}`` (both >= 1) or {} when absent."""
    if value is None:
        return {}
    got = _mapping(source, "confirm", value, ("top_k", "seeds"))
    return {"top_k": _positive(source, "confirm.top_k", got.get("top_k"), 3),
            "seeds": _positive(source, "confirm.seeds", got.get("seeds"), 2)}


def parse_warm(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``warm_start: {study, storage, top_k}`` or {} when absent; ``storage`` is a URL or ``env:VAR`` (read when
    the study is opened, search/study.py ``warm_params``)."""
    if data.get("warm_start") is None:
        return {}
    got = _mapping(source, "warm_start", data["warm_start"], ("study", "storage", "top_k"))
    study, storage = got.get("study"), got.get("storage")
    if not isinstance(study, str) or not NAME_RE.match(study) or len(study) > NAME_MAX:
        raise fail(source, "warm_start.study", study, "must be the name of an earlier study")
    if not isinstance(storage, str) or not storage:
        raise fail(source, "warm_start.storage", storage, "must be a storage URL or env:VAR")
    return {"study": study, "storage": storage, "top_k": _positive(source, "warm_start.top_k", got.get("top_k"), 5)}
