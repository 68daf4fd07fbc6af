"""The closure of module-level statements a config's training run uses, for the standalone script
(:mod:`regsweep.models.script`).

Starting from :func:`regsweep.models.train.train`, :class:`Collector` takes the module-level statement that binds
every name the code uses (functions, classes, constants, registries), recursively, following
``from regsweep.models.X import Y`` to X and ``alias.NAME`` of a regsweep module (flattened to ``NAME``) to that
module; registries keep only the entries the config names. Each statement is transformed by
:mod:`regsweep.models.script_source` first. Names must be unique across the included modules (a clash is a
:class:`~regsweep.models.script_source.ScriptError`, never a silent rename).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Optional

from regsweep.models import build as build_mod
from regsweep.models import data as data_mod
from regsweep.models import plugins
from regsweep.models import train as train_mod
from regsweep.models.config import TrainConfig, get_path
from regsweep.models.script_source import ScriptError, drop_calls, flatten_module_attrs, fold, free_names

PACKAGE = "regsweep.models"
# The config's dataclass sections: in the script the config is a namespace, so annotations naming them
# name SimpleNamespace (annotations are never evaluated there: `from __future__ import annotations`).
CONFIG_CLASSES = ("TrainConfig", "ModelConfig", "DataConfig", "OptimConfig", "RegularizationConfig",
                  "SchedulerConfig", "EarlyStoppingConfig", "TrainSection")
DROPPED_CALLS = ("check_names",)  # the script's registries hold only the config's entries: nothing to check


# ----------------------------------------------------------------------------------------- the collector
@dataclass
class Unit:
    module: str  # short module name (layers, train, ...)
    lineno: int
    text: str
    binds: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def _module_tree(module: ModuleType) -> tuple[ast.Module, str]:
    source = inspect.getsource(module)
    return ast.parse(source), source


def _statement_text(source_lines: list[str], node: ast.stmt) -> tuple[int, str]:
    """The statement with its decorators and the comment lines right above it."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    while first > 1 and source_lines[first - 2].lstrip().startswith("#"):
        first -= 1
    return first, "\n".join(source_lines[first - 1:node.end_lineno])


def _binds(node: ast.stmt) -> tuple[str, ...]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return (node.name,)
    if isinstance(node, ast.Assign):
        return tuple(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return (node.target.id,)
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return tuple((a.asname or a.name).split(".")[0] for a in node.names)
    return ()


def _registration_name(node: ast.stmt, registry_var: str) -> Optional[str]:
    """``"cnn"`` for ``@MODELS.register("cnn")`` / ``MODELS.add("cnn", ...)`` when registry_var is MODELS."""
    calls = []
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        calls = [d for d in node.decorator_list if isinstance(d, ast.Call)]
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        calls = [node.value]
    for call in calls:
        f = call.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == registry_var and \
                f.attr in ("register", "add") and call.args and isinstance(call.args[0], ast.Constant):
            return call.args[0].value
    return None


class Collector:
    """The closure of module-level statements the config's training run uses (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.units: dict[tuple[str, str], Unit] = {}  # (module, first bound name or registration key) -> unit
        self.owner: dict[str, tuple[str, str]] = {}  # script-level name -> (module, key) that binds it
        self.imports: dict[str, str] = {}  # bound name -> import statement
        self.aliases_needed: set[str] = set()  # config classes named in annotations
        self.trees: dict[str, tuple[ast.Module, list[str], ModuleType]] = {}
        self.registries = {id(reg): path for path, reg in build_mod.REGISTRIES.items()}
        self.specialise: dict[tuple[str, str], dict[str, Any]] = {}
        self.seen: set[tuple[str, str]] = set()

    # -- modules
    def _module(self, name: str) -> tuple[ast.Module, list[str], ModuleType]:
        if name not in self.trees:
            module = sys.modules.get(name)  # every regsweep.models module is loaded once train.py is imported
            if module is None:
                raise ScriptError(f"{name} is not loaded; the script is made from loaded modules only")
            tree, source = _module_tree(module)
            self.trees[name] = (tree, source.split("\n"), module)
        return self.trees[name]

    @staticmethod
    def short(module: str) -> str:
        return module.rsplit(".", 1)[-1]

    # -- the closure
    def need(self, module: str, name: str) -> None:
        if (module, name) in self.seen:
            return
        self.seen.add((module, name))
        if name in CONFIG_CLASSES and module == TrainConfig.__module__:
            self.aliases_needed.add(name)  # the config is a namespace in the script: never the dataclasses
            return
        tree, lines, mod = self._module(module)
        for node in tree.body:
            if name not in _binds(node):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                return self._imported(module, node, name)
            self._include(module, node, name, lines, mod)
            return
        if hasattr(builtins, name):
            return
        raise ScriptError(f"{module}: no module-level statement binds {name!r}")

    def _imported(self, module: str, node: ast.stmt, name: str) -> None:
        alias = next(a for a in node.names if (a.asname or a.name).split(".")[0] == name)
        if isinstance(node, ast.ImportFrom):
            source_mod = node.module if not node.level else \
                ".".join(module.split(".")[:-node.level] + ([node.module] if node.module else []))
            if source_mod == "regsweep" or source_mod.startswith("regsweep."):
                full = f"{source_mod}.{alias.name}"
                if full in sys.modules:
                    raise ScriptError(f"{module}: module alias {name} must be flattened")
                return self.need(source_mod, alias.name)
            stmt = f"from {source_mod} import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        else:
            if alias.name.startswith("regsweep"):
                raise ScriptError(f"{module}: imports {alias.name}")
            stmt = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        self._bind(name, ("import", stmt))
        self.imports[name] = stmt

    def _bind(self, name: str, owner: tuple[str, str]) -> None:
        if self.owner.setdefault(name, owner) != owner:
            raise ScriptError(f"two definitions of {name!r} in the script: {self.owner[name]} and {owner}")

    def _include(self, module: str, node: ast.stmt, name: str, lines: list[str], mod: ModuleType) -> None:
        lineno, text = _statement_text(lines, node)
        key = (module, name)
        unit = Unit(self.short(module), lineno, text, _binds(node))
        self.units[key] = unit
        for bound in unit.binds:
            self._bind(bound, key)
        self._process(module, unit, mod)
        value = getattr(mod, name, None)
        if id(value) in self.registries:
            self._registration(self.registries[id(value)], value)

    def _process(self, module: str, unit: Unit, mod: ModuleType) -> None:
        """Apply the transformations, then need() every name the unit uses."""
        known = self.specialise.get((module, unit.binds[0] if unit.binds else ""))
        if known:
            unit.text, folded = fold(unit.text, known)
            if folded:
                unit.notes.append("specialised for this script (regsweep.models.script.fold): " + "; ".join(folded))
        unit.text, dropped = drop_calls(unit.text, DROPPED_CALLS)
        if dropped:
            unit.notes.append("dropped (regsweep.models.script.drop_calls): " + "; ".join(dropped))
        runtime, annotated = free_names(unit.text)
        aliases = {n: getattr(mod, n).__name__ for n in runtime | annotated
                   if isinstance(getattr(mod, n, None), ModuleType) and getattr(mod, n).__name__.startswith("regsweep")}
        elsewhere: dict[str, str] = {}  # flattened NAME -> the module it comes from
        if aliases:
            unit.text, used = flatten_module_attrs(unit.text, aliases)
            unit.notes.append("flattened (regsweep.models.script.flatten_module_attrs): "
                              + ", ".join(f"{a}.NAME -> NAME" for a in sorted(aliases)))
            elsewhere = {attr: source for source, attr in used}
            runtime, annotated = free_names(unit.text)
        for n in sorted(runtime):
            self.need(elsewhere.get(n, module), n)
        for n in sorted(annotated):
            if n in CONFIG_CLASSES:
                self.aliases_needed.add(n)
            else:
                self.need(elsewhere.get(n, module), n)

    def _registration(self, path: str, registry: Any) -> None:
        """The statement registering the config's entry of ``registry`` (config field ``path``); none for the
        user's own code (a model or dataset by import path or plugin: the script imports it, the registry stays
        empty)."""
        entry = get_path(self.cfg.to_dict(), path)
        if path in user_code(self.cfg):
            return
        if entry not in registry:
            raise ScriptError(f"{path}: {entry!r} is not a built-in {registry.kind}; --format python writes "
                              "built-in models and datasets only (export --format yaml and train it with regsweep)")
        # the statement is in a regsweep.models module holding the registry (by any name): where the entry's object
        # was defined first (a lambda, a decorated class), else every loaded module (`ACTIVATIONS.add("gelu", nn.GELU)`)
        home = getattr(inspect.getmodule(registry.get(entry)), "__name__", "")
        candidates = [home] if home.startswith(PACKAGE + ".") else []
        candidates += sorted(m for m in sys.modules if m.startswith(PACKAGE + ".") and m not in candidates)
        for module in candidates:
            tree, lines, mod = self._module(module)
            for var in [k for k, v in vars(mod).items() if v is registry]:
                for node in tree.body:
                    if _registration_name(node, var) != entry:
                        continue
                    binds = _binds(node)
                    if binds:
                        return self.need(module, binds[0])
                    lineno, text = _statement_text(lines, node)
                    key = (module, f"<{var}[{entry!r}]>")
                    unit = Unit(self.short(module), lineno, text, ())
                    self.units[key] = unit
                    self._process(module, unit, mod)
                    return
        raise ScriptError(f"{path}: no registration statement of {entry!r} found in {PACKAGE}")

    # -- output
    def ordered(self) -> list[Unit]:
        """Units by module dependency order (a module after the modules it imports), then by line."""
        modules = {u.module for u in self.units.values()}
        deps = {}
        for name, (tree, _, _) in self.trees.items():
            short = self.short(name)
            targets = set()
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                    targets.add(self.short(node.module) if node.module != PACKAGE else "")
                    if node.module == PACKAGE:
                        targets |= {a.name for a in node.names}
            deps[short] = targets & modules
        order: list[str] = []

        def visit(m: str, stack: tuple[str, ...] = ()) -> None:
            if m in order:
                return
            if m in stack:
                raise ScriptError(f"import cycle among {stack}")
            for d in sorted(deps.get(m, ())):
                visit(d, stack + (m,))
            order.append(m)

        for m in sorted(modules):
            visit(m)
        return sorted(self.units.values(), key=lambda u: (order.index(u.module), u.lineno))


def collect(cfg: TrainConfig) -> Collector:
    """The closure of regsweep.models source this config's training run uses, transformed for the script."""
    col = Collector(cfg)
    col.specialise = {
        (train_mod.__name__, "train"): {"state": None, "checkpoint": None, "parts": None,
                                        "tcfg.compile": cfg.train.compile},
        (build_mod.__name__, "build"): {"data": None},
    }
    col.need(train_mod.__name__, "train")
    return col


def user_code(cfg: TrainConfig) -> dict[str, str]:
    """The config's fields naming the user's own code, never imported here: ``{"model.name": "nets:GNNet"}`` for a
    model or dataset by import path or by an installed plugin's short name (a name that is not built in)."""
    out = {}
    for path, registry in (("model.name", build_mod.MODELS), ("data.name", data_mod.DATASETS)):
        value = get_path(cfg.to_dict(), path)
        if isinstance(value, str) and (plugins.is_ref(value) or value not in registry) \
                and not value.startswith(data_mod.TORCHVISION):
            out[path] = value
    return out
