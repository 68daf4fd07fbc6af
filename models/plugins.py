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
import logging
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

from regsweep.models.yamlio import ConfigError, clip, excerpt

REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
GROUPS = {"model": "regsweep.models", "dataset": "regsweep.datasets"}


def is_ref(name: Any) -> bool:
    """Does ``name`` look like an import path (``module:attr``) rather than a registry name?"""
    return isinstance(name, str) and ":" in name


Folders = Optional[str | Path | Sequence[str | Path]]


def _folders(base_dir: Folders) -> list[Path]:
    if base_dir is None:
        return []
    items = [base_dir] if isinstance(base_dir, (str, Path)) else list(base_dir)
    return [Path(f).resolve() for f in items]


def add_search_path(folder: Folders) -> None:
    """Append ``folder`` (or each of several) to ``sys.path`` once (never prepend)."""
    for path in _folders(folder):
        if str(path) not in sys.path:
            sys.path.append(str(path))
            logging.getLogger(__name__).debug(f"appended {path} to sys.path (for code by import path)")


def load_ref(ref: str, field: str, base_dir: Folders = None) -> Any:
    """The object ``ref`` (``module:attr``) names; ``base_dir`` (the spec's or config's folder, or several) is
    appended to ``sys.path`` first. Raises one ConfigError line: ``FIELD: 'ref' is not allowed; <why>``.

    The import writes no ``__pycache__`` into the user's folder (``validate`` writes nothing)."""
    if not isinstance(ref, str) or not REF.fullmatch(ref):
        raise ConfigError(f"{field}: {excerpt(ref)} is not allowed; an import path is 'package.module:name'")
    module_name, attr = ref.split(":", 1)
    add_search_path(base_dir)
    no_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        folders = list(dict.fromkeys(_folders(base_dir)))
        where = f" (searched sys.path, which ends with {', '.join(map(str, folders))})" if folders else ""
        if exc.name and module_name != exc.name and not module_name.startswith(f"{exc.name}."):
            raise ConfigError(f"{field}: {ref!r} is not allowed; importing {module_name} raised "
                              f"ModuleNotFoundError: {first_line(exc)}") from None
        raise ConfigError(f"{field}: {ref!r} is not allowed; no module named {exc.name!r}{where}; put it beside the "
                          "spec or config, or install it") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing: one line, its reason
        raise ConfigError(f"{field}: {ref!r} is not allowed; importing {module_name} raised "
                          f"{type(exc).__name__}: {first_line(exc)}") from None
    finally:
        sys.dont_write_bytecode = no_bytecode
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: {ref!r} is not allowed; {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field}: {ref!r} is not allowed; {attr} is a {type(obj).__name__}, not a class or "
                          "function")
    return obj


def module_file(ref: str) -> Optional[Path]:
    """The file of the (already imported) module ``ref`` names, or None (a namespace or built-in module)."""
    module = sys.modules.get(ref.split(":", 1)[0])
    path = getattr(module, "__file__", None)
    return Path(path).resolve() if path else None


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
                          f"{type(exc).__name__}: {first_line(exc)}") from None


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first message line, cut to ``limit`` characters (for a one-line error)."""
    return clip(str(exc).strip(), limit) or "(no message)"
