"""A standalone PyTorch training script, generated from the source that trains the trials.

:func:`render_script` writes one Python file that needs torch, torchvision, numpy (and scikit-learn for
``digits``) but never regsweep. Its code is ``inspect``-ed out of this package: starting from
:func:`regsweep.models.train.train` it takes the module-level statement that binds every name the code uses
(functions, classes, constants, registries), recursively, so the script holds exactly the code a trial of
this config runs and cannot drift from it. Registries keep only the entries the config names. Where the
source must be adapted, the adaptation is one of three explicit, tested transformations:

- :func:`fold` -- partial evaluation: an ``if`` or ``x if c else y`` whose condition is decided by values
  known for the script (``state=None``, ``checkpoint=None``, ``parts=None``, ``train.compile``) keeps only the
  branch taken (the script never resumes, checkpoints or compiles unless configured);
- :func:`drop_calls` -- statements that only call a name the script has no use for (``check_names``: the
  registries hold just the config's entries);
- :func:`flatten_module_attrs` -- ``data_mod.load`` becomes ``load`` (one flat namespace).

Names must be unique across the included modules (a clash is a :class:`ScriptError`, never a silent rename).
The config is inlined as one ``CONFIG`` dict at the top, each value commented with where it came from; the
script turns it into attribute-access sections (``cfg.optim.lr``) as TrainConfig gives them.

:func:`render_snippet` writes the ~20 lines a user pastes into an existing loop, on the public API of
``regsweep.models`` (``init_weights``, ``make_optimizer``, ``make_scheduler``, ``penalty``).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import re
import symtable
import sys
import textwrap
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Sequence

from regsweep.models import build as build_mod
from regsweep.models import data as data_mod
from regsweep.models import plugins
from regsweep.models import train as train_mod
from regsweep.models.config import FREE_MAPPINGS, NAMED_FIELDS, ConfigError, TrainConfig, check_choice, get_path

PACKAGE = "regsweep.models"
# The config's dataclass sections: in the script the config is a namespace, so annotations naming them
# name SimpleNamespace (annotations are never evaluated there: `from __future__ import annotations`).
CONFIG_CLASSES = ("TrainConfig", "ModelConfig", "DataConfig", "OptimConfig", "RegularizationConfig",
                  "SchedulerConfig", "EarlyStoppingConfig", "TrainSection")
DROPPED_CALLS = ("check_names",)  # the script's registries hold only the config's entries: nothing to check


class ScriptError(ConfigError):
    """The config cannot be written as a standalone script (one line; the CLI exits 2)."""


# ------------------------------------------------------------------------------- source transformations
def _line_offsets(data: bytes) -> list[int]:
    starts = [0]
    for i, byte in enumerate(data):
        if byte == 0x0A:
            starts.append(i + 1)
    return starts


def _span(starts: list[int], node: ast.AST) -> tuple[int, int]:
    """Byte offsets of ``node`` (AST columns are UTF-8 byte offsets)."""
    return (starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset)


def _replace(text: str, edits: list[tuple[int, int, str]]) -> str:
    data = text.encode()
    for start, end, new in sorted(edits, reverse=True):
        data = data[:start] + new.encode() + data[end:]
    return data.decode()


class _Unknown:
    pass


UNKNOWN = _Unknown()


def decide(node: ast.expr, known: Mapping[str, Any]) -> Any:
    """The value of a condition from ``known`` (expression text -> value), or UNKNOWN. Understands names and
    attributes in ``known``, constants, ``is``/``is not``/``==``/``!=``, ``not``, ``and``/``or``."""
    text = ast.unparse(node)
    if text in known:
        return known[text]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = decide(node.operand, known)
        return UNKNOWN if value is UNKNOWN else not value
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right = decide(node.left, known), decide(node.comparators[0], known)
        if left is UNKNOWN or right is UNKNOWN:
            return UNKNOWN
        ops = {ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.Eq: lambda a, b: a == b,
               ast.NotEq: lambda a, b: a != b}
        op = ops.get(type(node.ops[0]))
        return UNKNOWN if op is None else op(left, right)
    if isinstance(node, ast.BoolOp):
        values = [decide(v, known) for v in node.values]
        is_and = isinstance(node.op, ast.And)
        if any(v is not UNKNOWN and bool(v) != is_and for v in values):
            return not is_and  # one False decides `and`, one True decides `or`
        return is_and if all(v is not UNKNOWN for v in values) else UNKNOWN
    return UNKNOWN


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _block_lines(lines: list[str], first: int, last: int, indent: int) -> list[str]:
    """Lines first..last (1-based) re-indented to ``indent`` (they keep their relative indentation)."""
    block = textwrap.dedent("\n".join(lines[first - 1:last]))
    return [(" " * indent + line) if line.strip() else line for line in block.split("\n")]


def fold(text: str, known: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Keep only the taken branch of every ``if``/conditional expression ``known`` decides.

    Returns the new source and the conditions folded (``"state is not None -> False"``). An ``if`` with a
    decided condition becomes the statements of its taken branch (dedented to its place), or ``pass`` where
    the block would be left empty; ``a if c else b`` becomes ``a`` or ``b``. ``elif`` chains are refused."""
    folded: list[str] = []
    while True:
        tree = ast.parse(text)
        target = next((n for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp))
                       and decide(n.test, known) is not UNKNOWN), None)
        if target is None:
            return text, folded
        taken = bool(decide(target.test, known))
        folded.append(f"{ast.unparse(target.test)} -> {taken}")
        starts = _line_offsets(text.encode())
        if isinstance(target, ast.IfExp):
            branch = target.body if taken else target.orelse
            segment = ast.get_source_segment(text, branch)
            start, end = _span(starts, target)
            text = _replace(text, [(start, end, segment)])
            continue
        if len(target.orelse) == 1 and isinstance(target.orelse[0], ast.If) and \
                text.splitlines()[target.orelse[0].lineno - 1].lstrip().startswith("elif"):
            raise ScriptError(f"cannot fold an elif chain: {ast.unparse(target.test)}")
        lines = text.split("\n")
        branch = target.body if taken else target.orelse
        if branch:
            first = target.test.end_lineno + 1 if taken else branch[0].lineno
            new = _block_lines(lines, first, branch[-1].end_lineno, target.col_offset)
        else:
            parent = _parents(tree)[target]
            siblings = next(getattr(parent, f) for f in ("body", "orelse", "finalbody")
                            if target in getattr(parent, f, []))
            new = [" " * target.col_offset + "pass"] if len(siblings) == 1 else []
        lines[target.lineno - 1:target.end_lineno] = new
        text = "\n".join(lines)


def drop_calls(text: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
    """Remove every expression statement that is only a call of one of ``names`` (``check_names(cfg)``)."""
    tree = ast.parse(text)
    lines = text.split("\n")
    dropped = []
    for node in sorted(ast.walk(tree), key=lambda n: -getattr(n, "lineno", 0)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Name) and node.value.func.id in names:
            dropped.append(ast.unparse(node))
            del lines[node.lineno - 1:node.end_lineno]
    return "\n".join(lines), dropped[::-1]


def flatten_module_attrs(text: str, aliases: Mapping[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """``alias.NAME`` -> ``NAME`` for every module alias in ``aliases`` (alias -> module); returns the new
    source and the (module, NAME) pairs used. A bare use of the alias (not ``alias.NAME``) is refused."""
    tree = ast.parse(text)
    starts = _line_offsets(text.encode())
    edits, used = [], []
    attr_bases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            attr_bases.add(id(node.value))
            start, end = _span(starts, node)
            edits.append((start, end, node.attr))
            used.append((aliases[node.value.id], node.attr))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in aliases and id(node) not in attr_bases:
            raise ScriptError(f"module alias {node.id} is used other than as {node.id}.NAME")
    return _replace(text, edits), used


# ------------------------------------------------------------------------------------- name analysis
def _strip_annotations(tree: ast.AST) -> ast.AST:
    """A copy without annotations (never evaluated in the script), for finding the names used at run time."""
    class Strip(ast.NodeTransformer):
        def visit_arg(self, node):
            node.annotation = None
            return node

        def visit_FunctionDef(self, node):
            node.returns = None
            self.generic_visit(node)
            return node

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_AnnAssign(self, node):
            if node.value is None:
                return ast.Expr(ast.Constant(None))
            return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)

    return ast.fix_missing_locations(Strip().visit(ast.parse(ast.unparse(tree))))


def _globals_used(table: symtable.SymbolTable) -> set[str]:
    out = set()
    for sym in table.get_symbols():
        if table.get_type() == "module":
            if sym.is_referenced() and not sym.is_assigned() and not sym.is_imported():
                out.add(sym.get_name())
        elif sym.is_global() and sym.is_referenced() and not sym.is_declared_global():
            out.add(sym.get_name())
        elif sym.is_declared_global():
            out.add(sym.get_name())
    for child in table.get_children():
        out |= _globals_used(child)
    return out


def free_names(text: str) -> tuple[set[str], set[str]]:
    """(names used at run time, names used only in annotations) that ``text`` does not bind itself."""
    tree = ast.parse(text)
    runtime = _globals_used(symtable.symtable(ast.unparse(_strip_annotations(tree)), "<unit>", "exec"))
    annotated = set()
    for node in ast.walk(tree):
        anns = []
        if isinstance(node, ast.arg) and node.annotation is not None:
            anns.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            anns.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            anns.append(node.annotation)
        for ann in anns:
            annotated |= {n.id for n in ast.walk(ann) if isinstance(n, ast.Name)}
    bound = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return runtime - set(dir(builtins)), annotated - runtime - bound - set(dir(builtins))


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


# ------------------------------------------------------------------------------------------- CONFIG
def config_literal(cfg: TrainConfig, comment: Callable[[str], str]) -> str:
    """``CONFIG = {...}``: one value per line with ``comment(dotted_path)`` after it."""
    out = ["CONFIG = {"]

    def walk(d: dict, prefix: str, indent: int) -> None:
        pad = " " * indent
        for key, value in d.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                out.append(f"{pad}{_literal(key)}: {{")
                walk(value, path + ".", indent + 4)
                out.append(f"{pad}}},")
            else:
                out.append(f"{pad}{_literal(key)}: {_literal(value)},  # {comment(path)}")

    walk(cfg.to_dict(), "", 4)
    out.append("}")
    return "\n".join(out)


def _literal(value: Any) -> str:
    """A Python literal of a config value (strings double-quoted; floats by repr, which round-trips)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def value_origins(cfg: TrainConfig, params: Mapping[str, Any], trial: Optional[int],
                  filled: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """The comment naming where a CONFIG value came from: sampled by the trial, filled in by the export,
    or the study's base config (marked when it equals TrainConfig's default)."""
    defaults = TrainConfig().to_dict()

    def comment(path: str) -> str:
        if path in params:
            return f"sampled by trial {trial}" if trial is not None else "sampled"
        if filled and path in filled:
            return filled[path]
        try:
            is_default = get_path(defaults, path) == get_path(cfg.to_dict(), path)
        except ConfigError:
            is_default = False
        return "base config (TrainConfig default)" if is_default else "base config"

    return comment


# ------------------------------------------------------------------------------------------- the script
DRIVER = '''

# ------------------------------------------------------------------------------------------------ driver
FREE_MAPPINGS = __FREE_MAPPINGS__  # keyword-argument mappings: they stay dicts


class Config(SimpleNamespace):
    """CONFIG as attribute-access sections (cfg.optim.lr), the shape of regsweep's TrainConfig."""

    def with_overrides(self, overrides):  # TrainConfig.with_overrides: a copy with dotted paths set
        import copy

        out = copy.deepcopy(self)
        for path, value in overrides.items():
            *sections, leaf = path.split(".")
            node = out
            for name in sections:
                node = getattr(node, name)
            setattr(node, leaf, value)
        return out


def namespace(d, prefix=""):
    return Config(**{k: namespace(v, f"{prefix}{k}.") if isinstance(v, dict) and f"{prefix}{k}" not in FREE_MAPPINGS
                     else v for k, v in d.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--save", metavar="FILE.pt", default=None,
                        help="save the final weights (the best epoch's with restore_best) as a state_dict")
    args = parser.parse_args(argv)
    cfg = namespace(CONFIG)
    __USER_CODE__

    def report(epoch, record):  # one JSON line per epoch: epoch, train_loss, ..., val_loss, val_acc, lr, seconds
        print(json.dumps(record), flush=True)

    parts, hist = train(cfg, args.device, report=report)
    best = hist.epochs[hist.best_epoch] if hist.best_epoch is not None else {}
    print(json.dumps({"summary": {"best_epoch": hist.best_epoch, "stop_reason": hist.stop_reason,
                                  "val_loss": best.get("val_loss"), "val_acc": best.get("val_acc"), **hist.test,
                                  "n_params": hist.n_params, "num_threads": hist.num_threads,
                                  "split_fingerprint": hist.split_fingerprint, "torch_version": hist.torch_version}}),
          flush=True)
    if args.save:
        torch.save(parts.model.state_dict(), args.save)
    return 1 if hist.stop_reason.startswith("failed:") else 0


if __name__ == "__main__":
    sys.exit(main())
'''

USER_CODE_CALL = ("    add_search_path([*USER_CODE_DIRS, os.path.dirname(os.path.abspath(__file__))])  # appended, "
                  "never prepended\n")
DRIVER_IMPORTS = ("import argparse", "import json", "import os", "import sys", "from types import SimpleNamespace",
                  "import torch")


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


def check_user_code(cfg: TrainConfig) -> dict[str, str]:
    """:func:`user_code`, each checked without importing it: an import path by its form, a short name by the
    installed entry points (metadata only). A ``torchvision:`` dataset is refused (one line)."""
    found = user_code(cfg)
    if cfg.data.name.startswith(data_mod.TORCHVISION):
        raise ScriptError(f"data.name: {cfg.data.name!r} is not allowed with --format python; it writes built-in "
                          "datasets and your own by import path (export --format yaml and train it with regsweep)")
    for path, value in found.items():
        kind = "model" if path == "model.name" else "dataset"
        if plugins.is_ref(value):
            if not plugins.REF.fullmatch(value):
                raise ScriptError(f"{path}: {value!r} is not allowed with --format python; an import path is "
                                  "'package.module:name'")
        elif value not in plugins.entry_points(kind):
            raise ScriptError(f"{path}: {value!r} is not allowed with --format python; it is neither built in, an "
                              f"import path nor an installed {plugins.GROUPS[kind]} entry point here")
    return found


def check_builtin_names(cfg: TrainConfig) -> None:
    """``build.check_names`` for a config whose model or dataset is the user's own: the other registry names only
    (the user's code is never imported by export)."""
    found = check_user_code(cfg)
    if "model.name" not in found:  # data.name is checked by its form only: nothing is imported
        build_mod.check_names(cfg)
        return
    data = cfg.to_dict()
    data_mod.check_name(cfg.data.name)  # its form only
    for path in NAMED_FIELDS:
        if path != "model.name" and path != "data.name":
            check_choice(path, get_path(data, path), build_mod.REGISTRIES[path].names())


def user_code_lines(found: Mapping[str, str], code_dirs: list[str]) -> list[str]:
    """The script's statement (and comment) putting the folder(s) the user's code was imported from on
    ``sys.path``, appended as regsweep appends them."""
    named = ", ".join(f"{path} {value!r}" for path, value in found.items())
    modules = ", ".join(sorted({v.split(":")[0].split(".")[0] for v in found.values() if plugins.is_ref(v)}))
    lines = [f"# Your own code, imported by load_ref/load_entry_point below (regsweep.models.plugins): {named}.",
             "# As regsweep did, main() APPENDS its folder to sys.path with add_search_path (never prepends: an",
             "# installed package of the same name wins), then this script's own folder"
             + (f" (so {modules} may also sit beside it)." if modules else ".")]
    if code_dirs:
        lines.append("# The folder that held the study's spec, recorded by the trial that ran it:")
    else:
        lines.append("# The trial recorded no folder (a plugin, or a trial made before regsweep recorded it).")
    lines.append(f"USER_CODE_DIRS = {_literal(list(code_dirs))}")
    return lines


def render_script(cfg: TrainConfig, header: list[str], comment: Callable[[str], str],
                  version: str = "", code_dirs: Sequence[str] = ()) -> str:
    """The standalone script for ``cfg``. ``header``: provenance lines for the docstring; ``comment(path)``:
    where each CONFIG value came from (:func:`value_origins`); ``code_dirs``: the folders a model or dataset by
    import path was imported from (the spec's folder the trial recorded), appended to ``sys.path`` by the
    script. The user's code is never imported here."""
    check_builtin_names(cfg)
    found = user_code(cfg)
    col = collect(cfg)
    if found:
        col.need(plugins.__name__, "add_search_path")
    imports = {"from __future__ import annotations", *col.imports.values(), *DRIVER_IMPORTS}
    names = set(col.owner)
    if col.aliases_needed:
        names.add("SimpleNamespace")
    driver_names = {"argparse", "json", "os", "sys", "namespace", "main", "CONFIG", "USER_CODE_DIRS"}
    clash = names & driver_names - set(col.imports)
    if clash:
        raise ScriptError(f"the script's driver names clash with regsweep code: {sorted(clash)}")
    stdlib, third = import_lines(imports - {"from __future__ import annotations"})
    safe = [line.replace("\\", "/").replace('"""', "'''") for line in header]
    doc = ['"""' + safe[0], "", *safe[1:], '"""', "", "from __future__ import annotations", "", *stdlib, "",
           *third, "", "", *config_literal(cfg, comment).split("\n")]
    if col.aliases_needed:
        doc += ["", "# regsweep's config dataclasses, named in annotations below: the config is a namespace here.",
                " = ".join(sorted(col.aliases_needed)) + " = SimpleNamespace"]
    if found:
        doc += ["", "", *user_code_lines(found, list(code_dirs))]
    body: list[str] = []
    current = None
    for unit in col.ordered():
        if unit.module != current:
            current = unit.module
            body += ["", "", f"# {'-' * 10} from {PACKAGE}.{current}{f' (regsweep {version})' if version else ''} "
                     + "-" * max(0, 70 - len(current) - len(version))]
        body += ["", ""] if body[-1].strip() else [""]
        body += [f"# {note}" for note in unit.notes]
        body += unit.text.split("\n")
    driver = DRIVER.replace("__FREE_MAPPINGS__", repr(FREE_MAPPINGS))
    driver = driver.replace("    __USER_CODE__\n", USER_CODE_CALL if found else "")
    text = "\n".join(doc + body).rstrip() + "\n" + driver
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    compile(text, "train_best.py", "exec")  # a transformation that broke the syntax fails here, not at the user
    return text


def import_lines(imports: set[str]) -> tuple[list[str], list[str]]:
    """(stdlib, third-party) import lines; ``from M import a`` and ``from M import b`` merge into one line."""
    plain, froms = set(), {}
    for stmt in imports:
        words = stmt.split()
        if words[0] == "import":
            plain.add(stmt)
        else:
            froms.setdefault(words[1], set()).add(" ".join(words[3:]))
    lines = sorted(plain) + [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(froms.items())]
    std = [line for line in lines if line.split()[1].split(".")[0] in sys.stdlib_module_names]
    return std, [line for line in lines if line not in std]


# ------------------------------------------------------------------------------------------- the snippet
OPTIM_FIELDS = {"sgd": ("lr", "momentum", "nesterov", "weight_decay"), "adam": ("lr", "betas", "weight_decay"),
                "adamw": ("lr", "betas", "weight_decay")}
SCHEDULER_FIELDS = {"none": (), "step": ("step_size", "gamma"), "multistep": ("milestones", "gamma"),
                    "exponential": ("gamma",), "cosine": ("eta_min",), "plateau": ("factor", "patience"),
                    "onecycle": ("max_lr", "pct_start"), "warmup_cosine": ("warmup_epochs", "eta_min")}


def render_snippet(cfg: TrainConfig, header: list[str]) -> str:
    """The lines a user pastes into an existing loop, on regsweep.models' public API."""
    o, s, r, m = cfg.optim, cfg.scheduler, cfg.regularization, cfg.model
    optim_args = ", ".join(f"{k}={getattr(o, k)!r}" for k in OPTIM_FIELDS[o.name])
    sched_args = "".join(f", {k}={getattr(s, k)!r}" for k in SCHEDULER_FIELDS[s.name])
    interval = {"onecycle": "per batch"}.get(s.name, "none" if s.name == "none" else "per epoch")
    lines = [f"# {line}" for line in header]
    lines += [
        f"# Your model: {m.name}{f' widths {m.widths}' if m.widths else ''}, model.dropout={m.dropout!r}, "
        f"model.bn={m.bn!r}, model.activation={m.activation!r}; call torch.manual_seed({cfg.train.seed}) before "
        "building it.",
        "# Needs: `model`, `train_loader` and `validate()` (your validation loss) from your code. For an exact "
        "replay give DataLoader",
        "# generator=torch.Generator() (else it draws its seed from the global RNG that dropout and mixup use).",
    ]
    mixing = [k for k in ("mixup_alpha", "cutmix_alpha", "input_noise_std") if getattr(r, k)]
    if mixing:
        lines.append("# Not in these lines: " + ", ".join(f"regularization.{k}={getattr(r, k)!r}" for k in mixing)
                     + " (regsweep.models.regularize.BatchRegularizer; or --format python)")
    lines += [
        "import torch",
        "from regsweep.models import init_weights, make_optimizer, make_scheduler, penalty",
        "",
        f"EPOCHS = {cfg.train.epochs}  # train.epochs",
        f"init_weights(model, {m.init!r})  # model.init",
        "# two parameter groups: weights with dim >= 2 decay (decoupled: p <- p - lr*wd*p), biases and norms do not",
        f"optimizer = make_optimizer(model, name={o.name!r}, {optim_args})",
        f"scheduler = make_scheduler(optimizer, name={s.name!r}{sched_args}, epochs=EPOCHS, "
        "steps_per_epoch=len(train_loader))",
        f"criterion = torch.nn.CrossEntropyLoss(label_smoothing={r.label_smoothing!r})",
        f"reg_term = penalty(model, l1={r.l1!r}, l2={r.l2!r})  # l1*sum|w| + l2*sum w^2 over weights with dim >= 2",
        "",
        "for epoch in range(EPOCHS):",
        "    model.train()",
        "    for x, y in train_loader:",
        "        loss = criterion(model(x), y) + reg_term()",
        "        optimizer.zero_grad(set_to_none=True)",
        "        loss.backward()",
        "        optimizer.step()",
        f"        scheduler.after_batch()  # steps only a per-batch scheduler ({s.name}: {interval})",
        "    val_loss = validate()",
        "    scheduler.after_epoch(val_loss)  # steps only a per-epoch scheduler (plateau reads val_loss)",
    ]
    return "\n".join(lines) + "\n"
