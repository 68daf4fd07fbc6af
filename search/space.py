"""Search spaces: dotted TrainConfig paths -> Optuna distributions (and Ray Tune domains), with conditions.

A space file is a mapping ``path: param`` (plus an optional ``include:`` of other space files, relative to
the including file; later entries override earlier ones)::

    model.dropout: {type: float, low: 0.0, high: 0.6}
    optim.weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
    model.bn: {type: categorical, choices: [none, before_act, after_act]}
    scheduler.gamma: {type: float, low: 0.1, high: 0.9, when: {scheduler.name: step}}

``when`` maps other config paths to a value or a list of values; the param is sampled only when all of them
hold, looking first at values sampled in this trial and then at the base config. Params are sampled in an
order where every condition's source comes first. Everything is checked against TrainConfig before any
trial runs: unknown paths, types that do not match the field, and bounds the config would reject.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from regsweep.models.build import check_names, searched_knob_error
from regsweep.models.config import FREE_MAPPINGS, KWARG_RE, ConfigError, TrainConfig, clip, config_paths, get_path
from regsweep.models.yamlio import excerpt, load_yaml_file

PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
Scalar = Union[None, bool, int, float, str]
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the installed regsweep package (a checkout's root)
ROOT_MARKERS = ("pyproject.toml", ".regsweep")


class SpaceError(ConfigError):
    """A bad search space: one line naming the file, the field, the value and what is allowed."""


@dataclass(frozen=True)
class Param:
    path: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple[Scalar, ...] = ()
    when: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()

    # ------------------------------------------------------------------ backends
    def distribution(self):
        import optuna.distributions as od

        if self.type == "float":
            return od.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return od.CategoricalDistribution(list(self.choices))

    def contains(self, value: Any) -> bool:
        """Can this param take ``value`` (range, step, choices)? False for a value of the wrong type."""
        from regsweep.search.optuna_internals import distribution_contains

        try:
            return distribution_contains(self.distribution(), value)
        except (TypeError, ValueError):
            return False

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.path, list(self.choices))

    def active(self, values: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
        for path, allowed in self.when:
            current = values[path] if path in values else get_path(base, path)
            if current not in allowed:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log, step=self.step)
        if self.when:
            d["when"] = {p: list(v) for p, v in self.when}
        return d


@dataclass
class Space:
    params: list[Param] = field(default_factory=list)

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def sample(self, trial, base: Mapping[str, Any]) -> dict[str, Any]:
        """Define-by-run: suggest each active param in order; returns {path: value} overrides."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values, base):
                values[p.path] = p.suggest(trial)
        return values

    def to_dict(self) -> dict[str, Any]:
        return {p.path: p.to_dict() for p in self.params}

    def conditional(self) -> list[str]:
        return [p.path for p in self.params if p.when]


# ------------------------------------------------------------------------------------------ parsing
def _err(source: str, fld: str, value: Any, allowed: str) -> SpaceError:
    return SpaceError(f"{source}: {fld}: {excerpt(value)} is not allowed; {allowed}")


def project_root(directory: Path, builtin: bool = False) -> Path:
    """Where a spec's ``base:`` and ``include:`` paths may point (``directory``: the spec's own): the nearest
    ancestor holding ``pyproject.toml`` or a ``.regsweep`` marker, else ``directory`` itself; the installed
    package for a built-in study or any spec inside the package (studies/ includes ../spaces/)."""
    directory = directory.resolve()
    if builtin or directory.is_relative_to(PACKAGE_DIR):
        return PACKAGE_DIR
    for d in (directory, *directory.parents):
        if any((d / marker).exists() for marker in ROOT_MARKERS):
            return d
    return directory


def confine(target: Path, roots: Sequence[Path], source: str, fld: str, given: str) -> None:
    """``target`` (resolved: a symlink counts where it points) must lie inside one of ``roots``."""
    if not any(target.is_relative_to(root) for root in roots):
        raise SpaceError(f"{source}: {fld}: {excerpt(given)} is outside the project root {roots[0]} (it resolves "
                         f"to {clip(target, 120)}); move it inside, or pass --allow-outside DIR")


def _number(source: str, fld: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(source, fld, value, "must be a finite number")
    return value


def parse_param(path: str, spec: Any, source: str, prefix: str = "space") -> Param:
    fld = f"{prefix}.{clip(path, 120)}"
    if not isinstance(spec, Mapping):
        raise _err(source, fld, spec, "must be a mapping like {type: float, low: 0.0, high: 0.5}")
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        raise _err(source, f"{fld}.{unknown[0]}", spec[unknown[0]], f"allowed keys: {', '.join(sorted(PARAM_KEYS))}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise _err(source, f"{fld}.type", kind, f"choose one of: {', '.join(PARAM_TYPES)}")
    when = _parse_when(spec.get("when"), source, f"{fld}.when")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _err(source, f"{fld}.choices", choices, "must be a non-empty list")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise _err(source, f"{fld}.choices", c, "choices must be null, booleans, numbers or strings")
        extra = sorted(set(spec) & {"low", "high", "log", "step"})
        if extra:
            raise _err(source, f"{fld}.{extra[0]}", spec[extra[0]], "categorical params take only choices and when")
        return Param(path, kind, choices=tuple(choices), when=when)
    if "choices" in spec:
        raise _err(source, f"{fld}.choices", spec["choices"], f"{kind} params take low/high/log/step, not choices")
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{source}: {fld}.{key}: missing; {kind} params need low and high")
    low, high = _number(source, f"{fld}.low", spec["low"]), _number(source, f"{fld}.high", spec["high"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _err(source, f"{fld}.log", log, "must be true or false")
    step = spec.get("step")
    if step is not None:
        step = _number(source, f"{fld}.step", step)
        if step <= 0:
            raise _err(source, f"{fld}.step", step, "must be > 0")
    if kind == "int":
        for key, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and float(v) != int(v):
                raise _err(source, f"{fld}.{key}", v, "int params need whole numbers")
    if low > high:
        raise _err(source, f"{fld}.low", low, f"must be <= high ({high})")
    if log and low <= 0:
        raise _err(source, f"{fld}.low", low, "log: true needs low > 0")
    if log and step is not None and kind == "float":
        raise _err(source, f"{fld}.step", step, "a float param cannot have both log: true and a step")
    return Param(path, kind, float(low) if kind == "float" else int(low), float(high) if kind == "float" else int(high),
                 log, step, (), when)


def _parse_when(when: Any, source: str, fld: str) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise _err(source, fld, when, "must be a mapping like {scheduler.name: step}")
    out = []
    for path, value in when.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        out.append((str(path), values))
    return tuple(out)


def load_space(spec: Any, source: str, prefix: str = "space", _stack: tuple[Path, ...] = (),
               roots: Optional[Sequence[Path]] = None) -> dict[str, Param]:
    """Parse an inline space mapping (which may ``include:`` files) into {path: Param}, includes first.

    Included files must lie inside ``roots`` (default: the :func:`project_root` of ``source``'s directory)."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise _err(source, prefix, spec, "must be a mapping of config paths to params (or include: FILE)")
    params: dict[str, Param] = {}
    include = spec.get("include")
    if include is not None:
        files = include if isinstance(include, list) else [include]
        for f in files:
            if not isinstance(f, str):
                raise _err(source, f"{prefix}.include", f, "must be a file path or a list of file paths")
            here = Path(source).parent if _stack or Path(source).suffix else Path(".")
            roots = roots or (project_root(here),)
            target = (here / f).resolve()
            confine(target, roots, source, f"{prefix}.include", f)
            if target in _stack:  # the chain's paths relative to the project root, which is named once
                chain = " -> ".join(str(p.relative_to(roots[0]) if p.is_relative_to(roots[0]) else p)
                                    for p in (*_stack, target))
                raise SpaceError(f"{source}: {prefix}.include: {excerpt(f)} is not allowed; include cycle: {chain} "
                                 f"(under {roots[0]})")
            if not target.is_file():
                raise SpaceError(f"{source}: {prefix}.include: {excerpt(f)} not found (looked for {target})")
            data = load_yaml_file(target, quote=False)  # never quote a referenced file's text
            if data is None:
                raise SpaceError(f"{target}: empty file; a space file maps config paths to params")
            if not isinstance(data, Mapping):
                raise SpaceError(f"{target}: the document is a {type(data).__name__}, not a mapping of config "
                                 f"paths to params (included from {source})")
            params.update(load_space(data, str(target), "space", (*(_stack or (Path(source).resolve(),)), target),
                                     roots))
    for path, p in spec.items():
        if path == "include":
            continue
        params[str(path)] = parse_param(str(path), p, source, prefix)
    return params


def order_params(params: Mapping[str, Param], source: str) -> list[Param]:
    """Topological order: a param comes after every space param its ``when`` reads."""
    ordered: list[Param] = []
    state: dict[str, int] = {}

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if state.get(path) == 2:
            return
        if state.get(path) == 1:
            raise SpaceError(f"{source}: space.{clip(path, 120)}.when: condition cycle: "
                             f"{clip(' -> '.join((*chain, path)), 200)}")
        state[path] = 1
        for dep, _ in params[path].when:
            if dep in params:
                visit(dep, (*chain, path))
        state[path] = 2
        ordered.append(params[path])

    for path in params:
        visit(path, ())
    return ordered


def _holds(q: Param, value: Any) -> bool:
    """Can the space param ``q`` take ``value``?"""
    if q.type == "categorical":
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in q.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not q.low <= value <= q.high:
        return False
    return q.type == "float" or float(value) == int(value)


def _check_condition(p: Param, dep: str, values: tuple, q: Optional[Param], source: str) -> None:
    """A ``when`` value the conditioning space param never takes would leave ``p`` never sampled, silently.
    (A condition on a base-config value may be off on purpose: a shared space file serves several bases.)"""
    if q is None:
        return
    for v in values:
        if not _holds(q, v):
            takes = (f"choices: {', '.join(map(repr, q.choices))}" if q.type == "categorical"
                     else f"{q.type} values in [{q.low}, {q.high}]")
            raise _err(source, f"space.{p.path}.when.{dep}", v, f"{dep} is a space param that never takes it ({takes})")


def free_path(path: str) -> bool:
    """``model.args.KEY``: a key of a free mapping (config.FREE_MAPPINGS), which any space may search."""
    prefix, _, key = path.rpartition(".")
    return prefix in FREE_MAPPINGS and bool(KWARG_RE.fullmatch(key))


def _check_model_knob(p: Param, params: list[Param], base: TrainConfig, source: str,
                      base_dir: Optional[Path]) -> None:
    """A searched model knob (``model.bn``) or argument (``model.args.depth``) must be one that the model (each
    searched ``model.name`` choice) takes."""
    names = [base.model.name] + [c for q in params if q.path == "model.name" for c in q.choices]
    for name in dict.fromkeys(n for n in names if isinstance(n, str)):
        try:
            why = searched_knob_error(dataclasses.replace(base.model, name=name, args={}), p.path, base_dir)
        except ConfigError as exc:
            raise SpaceError(f"{source}: space.model.name.choices: {exc}") from None
        if why:
            raise SpaceError(f"{source}: space.{clip(p.path, 120)}: searched, but {why}; remove it from the space")


def check_space(params: list[Param], base: TrainConfig, source: str, base_dir: Optional[Path] = None) -> None:
    """Every path exists in TrainConfig (or is ``model.args.KEY``), its type fits the field, a searched model knob
    is one the model takes, every bound/choice is a valid value. ``base_dir``: the spec's folder (searched
    ``model.name`` import paths are looked for there)."""
    fields = config_paths()
    by_path = {p.path: p for p in params}
    for p in params:
        fld = f"space.{clip(p.path, 120)}"
        if p.path.startswith("model.") and p.path != "model.name":
            _check_model_knob(p, params, base, source, base_dir)
        if free_path(p.path):
            pass  # any value the model's signature takes (checked by the probes below)
        elif p.path not in fields:
            near = [f for f in fields if f.split(".")[-1] == p.path.split(".")[-1]]
            hint = f"; did you mean {near[0]}?" if near else "; see models/config.py for the fields"
            raise SpaceError(f"{source}: {fld}: unknown config path{hint}")
        tp = fields.get(p.path, Any)
        tname = getattr(tp, "__name__", str(tp))
        if tp is not Any and p.type == "float" and tp not in (float,) and "float" not in str(tp):
            raise _err(source, f"{fld}.type", p.type, f"{p.path} is {tname}, not a float")
        if tp is not Any and p.type == "int" and tp is not int and "int" not in str(tp):
            raise _err(source, f"{fld}.type", p.type, f"{p.path} is {tname}, not an int")
        for dep, values in p.when:
            if dep not in fields and not (free_path(dep) and (dep in by_path or dep.split(".")[-1] in base.model.args)):
                raise SpaceError(f"{source}: {fld}.when: {excerpt(dep)} is not a config path")
            _check_condition(p, dep, values, by_path.get(dep), source)
        probes = list(p.choices) if p.type == "categorical" else [p.low, p.high]
        for value in probes:
            try:
                check_names(base.with_overrides({p.path: value}), base_dir=base_dir)  # ranges, then registry names
            except ConfigError as exc:
                what = "choices" if p.type == "categorical" else ("low" if value == p.low else "high")
                raise SpaceError(f"{source}: {fld}.{what}: {excerpt(value)} would be rejected by the config "
                                 f"({exc})") from None


def build_space(spec: Any, base: TrainConfig, source: str, roots: Optional[Sequence[Path]] = None,
                base_dir: Optional[Path] = None) -> Space:
    params = load_space(spec, source, roots=roots)
    ordered = order_params(params, source)
    check_space(ordered, base, source, base_dir)
    return Space(ordered)
