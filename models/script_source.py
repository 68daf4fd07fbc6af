"""The source transformations of the standalone script (:mod:`regsweep.models.script`) and the name analysis
that finds what a statement uses. Each is explicit and tested:

- :func:`fold` -- partial evaluation: an ``if`` or ``x if c else y`` whose condition is decided by values
  known for the script keeps only the branch taken;
- :func:`drop_calls` -- statements that only call a name the script has no use for;
- :func:`flatten_module_attrs` -- ``data_mod.load`` becomes ``load`` (one flat namespace);
- :func:`free_names` -- the names a statement uses at run time and those it names in annotations only.
"""

from __future__ import annotations

import ast
import builtins
import symtable
import textwrap
from typing import Any, Mapping

from regsweep.models.config import ConfigError


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
