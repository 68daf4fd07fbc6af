"""Name -> factory registries: the one shape for models, inits, datasets, optimizers, schedulers.

An unknown name raises ``ValueError("unknown model 'foo'; choose one of: cnn, resnet18")`` so every
lookup explains itself (timm's ``@register_model`` pattern).
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Generic, Iterator, Mapping, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict from name to factory whose failed lookups list the choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


# ------------------------------------------------------------------------------ keyword arguments
SIMPLE_TYPES = ("int", "float", "bool", "str", "None")


def simple_types(annotation: Any) -> Optional[tuple[str, ...]]:
    """``int``, ``float | None``, ``Optional[bool]``, ... as a tuple of type names; None for any other
    annotation (callables, classes, containers: those are left to the constructor and a dry run)."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "").replace("NoneType", "None").strip()
    match = re.fullmatch(r"Optional\[(.+)\]", text)
    if match:
        text = f"{match.group(1)} | None"
    parts = tuple(p.strip() for p in text.split("|"))
    return parts if all(p in SIMPLE_TYPES for p in parts) else None


def fits(value: Any, types: tuple[str, ...]) -> bool:
    """Does a YAML value fit the type names (an integer fits float; a bool is no number)?"""
    if value is None:
        return "None" in types
    if isinstance(value, bool):
        return "bool" in types
    if isinstance(value, int):
        return "int" in types or "float" in types
    if isinstance(value, float):
        return "float" in types and math.isfinite(value)
    if isinstance(value, str):
        return "str" in types
    return False


def check_kwargs(cls: type, args: Mapping[str, Any], fld: str, reserved: Mapping[str, str] | None = None) -> None:
    """Keyword arguments from YAML against ``cls.__init__``: known names, and values of the type its simple
    annotations (int/float/bool/str/Optional) say; constructors alone accept wrong types. A ConfigError names
    ``FLD.KEY`` (``sampler.args.n_startup_trials``)."""
    from regsweep.models.config import ConfigError

    params = inspect.signature(cls.__init__).parameters
    named = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    any_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for key, value in args.items():
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        if reserved and key in reserved:
            raise ConfigError(f"{fld}.{key}: {shown} is not allowed; {reserved[key]}")
        if key not in named:
            if any_kw:
                continue
            allowed = [n for n in named if not reserved or n not in reserved]
            raise ConfigError(f"{fld}.{key}: {shown} is not allowed; {cls.__name__} takes: {', '.join(allowed)}")
        types = simple_types(params[key].annotation)
        if types is not None and not fits(value, types):
            raise ConfigError(f"{fld}.{key}: {shown} is not allowed; {cls.__name__}'s {key} is "
                              f"{' | '.join(types)}")
