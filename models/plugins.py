"""User code by import path (``"my_pkg.nets:WideNet"``) and installed plugins by entry point.

A reference is ``MODULE:ATTR`` (``ATTR`` may be dotted: ``mod:Outer.make``). The folder that holds the spec or
config naming it is APPENDED to ``sys.path`` (never prepended: a user's ``models/`` can never shadow ours, and
the user's own installed packages win over a same-named file beside the spec). Plugins installed as packages
appear by short name through the entry-point groups ``regsweep.models`` and ``regsweep.datasets``.

Every failure is one :class:`ConfigError` line naming the field, the reference and the reason; importing user
code runs it, so only the commands that train or validate call :func:`load_ref` (``status``, ``export``,
``report`` and ``dashboard`` never do).
"""

from __future__ import annotations

import importlib
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from regsweep.models.yamlio import ConfigError, excerpt

REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
GROUPS = {"model": "regsweep.models", "dataset": "regsweep.datasets"}


def is_ref(name: Any) -> bool:
    """Does ``name`` look like an import path (``module:attr``) rather than a registry name?"""
    return isinstance(name, str) and ":" in name


def add_search_path(folder: Optional[str | Path]) -> None:
    """Append ``folder`` to ``sys.path`` once (never prepend)."""
    if folder is None:
        return
    text = str(Path(folder).resolve())
    if text not in sys.path:
        sys.path.append(text)


def load_ref(ref: str, field: str, base_dir: Optional[str | Path] = None) -> Any:
    """The object ``ref`` (``module:attr``) names; ``base_dir`` (the spec's or config's folder) is appended to
    ``sys.path`` first. Raises one ConfigError line: ``FIELD: 'ref' is not allowed; <why>``."""
    if not isinstance(ref, str) or not REF.fullmatch(ref):
        raise ConfigError(f"{field}: {excerpt(ref)} is not allowed; an import path is 'package.module:name'")
    module_name, attr = ref.split(":", 1)
    add_search_path(base_dir)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f" (searched sys.path and {Path(base_dir).resolve()})" if base_dir is not None else ""
        raise ConfigError(f"{field}: {ref!r} is not allowed; no module named {exc.name!r}{where}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing: one line, its reason
        raise ConfigError(f"{field}: {ref!r} is not allowed; importing {module_name} raised "
                          f"{type(exc).__name__}: {_first_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: {ref!r} is not allowed; {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field}: {ref!r} is not allowed; {attr} is a {type(obj).__name__}, not a class or "
                          "function")
    return obj


def entry_points(kind: str) -> dict[str, Any]:
    """Installed plugins of ``kind`` (``model`` | ``dataset``): short name -> entry point (not loaded)."""
    return {ep.name: ep for ep in metadata.entry_points(group=GROUPS[kind])}


def load_entry_point(kind: str, name: str, field: str) -> Any:
    """The object the installed entry point ``name`` of ``kind`` names; one ConfigError line if it fails."""
    ep = entry_points(kind).get(name)
    if ep is None:
        raise ConfigError(f"{field}: {name!r} is not allowed; no installed {GROUPS[kind]} entry point of that name")
    try:
        return ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin: one line with its reason
        raise ConfigError(f"{field}: {name!r} is not allowed; loading entry point {ep.value} raised "
                          f"{type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return excerpt(text[0]) if text else "(no message)"
