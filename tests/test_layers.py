"""The layer table of docs/architecture.md, enforced on every module file of the package (issue 15).

The table (between ``<!-- layers:begin -->`` and ``<!-- layers:end -->``, rows ``| layer | modules |``, lowest
layer first) puts every module of ``regsweep`` in exactly one layer. Every import of every module file is read
with ``ast`` (at module level AND inside functions; relative forms resolved) and must name a module of the same
or a lower layer. Also refused: ``regsweep.models.*`` importing ``regsweep.search.*``; a module marked "imports
nothing of ours" importing any regsweep module; importing a private (``_name``) name from another regsweep
module; the 0.1 top-level names (``models``, ``search``, ...); ``importlib.import_module`` / ``__import__`` /
``importlib.util.find_spec`` of a string that starts with ``regsweep``; a module file the table does not list;
a table entry with no module file. Every violation is one line: ``file:line: what``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- layers:begin -->", "<!-- layers:end -->"
OLD_TOP_LEVEL = ("models", "search", "studies", "spaces")  # the 0.1 import names
DYNAMIC_IMPORTS = ("import_module", "__import__", "find_spec")
NOTHING_OF_OURS = "imports nothing of ours"


# ------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Entry:
    pattern: str  # a full module name, or ``prefix.*`` for every module below ``prefix``
    layer: int
    layer_name: str
    isolated: bool  # "(imports nothing of ours)": no regsweep import at all

    def matches(self, module: str) -> bool:
        if self.pattern.endswith(".*"):
            return module.startswith(self.pattern[:-1])
        return module == self.pattern


def _split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside parentheses."""
    out, depth, cur, i = [], 0, "", 0
    while i < len(text):
        if text.startswith(sep, i) and depth == 0:
            out.append(cur)
            cur, i = "", i + len(sep)
            continue
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        cur += text[i]
        i += 1
    return [*out, cur]


def parse_table(markdown: str, source: str = "docs/architecture.md") -> list[Entry]:
    """The layer table's entries, lowest layer first; a malformed table raises ValueError (one line)."""
    if BEGIN not in markdown or END not in markdown:
        raise ValueError(f"{source}: no layer table between {BEGIN} and {END}")
    block = markdown.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [line.strip() for line in block.splitlines() if line.strip().startswith("|")]
    entries: list[Entry] = []
    for layer, row in enumerate(rows[2:]):  # rows[0] is the header, rows[1] the |---| rule
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) != 2:
            raise ValueError(f"{source}: layer row {row!r} must have two cells: | layer | modules |")
        name, modules = cells[0], cells[1].replace("`", "")
        package = None  # the package of the row's first full name: what a `.x` entry is relative to
        for piece in _split_top(modules, ","):
            isolated = NOTHING_OF_OURS in piece
            names = piece
            while re.search(r"\([^()]*\)", names):
                names = re.sub(r"\([^()]*\)", "", names)
            for token in (t.strip() for t in _split_top(names, " and ")):
                if not re.fullmatch(r"\.?[A-Za-z_][\w.]*?(\.\*)?", token):
                    raise ValueError(f"{source}: layer {name}: {token!r} is no module name")
                if token.startswith("."):
                    if package is None:
                        raise ValueError(f"{source}: layer {name}: {token!r} comes before a full module name")
                    token = package + token
                elif package is None:
                    package = token.rsplit(".", 1)[0] if "." in token else token
                entries.append(Entry(token, layer, name, isolated))
    if not entries:
        raise ValueError(f"{source}: the layer table has no rows")
    return entries


# ----------------------------------------------------------------------------------- the module files
def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module file of the package -> its dotted name (``regsweep`` is the repository root's __init__.py)."""
    files = [root / "__init__.py", root / "studies" / "__init__.py", root / "spaces" / "__init__.py"]
    for folder in ("models", "search"):
        files += sorted((root / folder).rglob("*.py"))
    out = {}
    for path in files:
        if "__pycache__" in path.parts or not path.is_file():
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(["regsweep", *parts])] = path
    return out


# ------------------------------------------------------------------------------------------ the check
@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the imported module (dotted, absolute)
    names: tuple[str, ...] = ()  # for ``from target import a, b``: a, b


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[Import]:
    if node.level:
        package = module if is_package else module.rsplit(".", 1)[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    names = [a.name for a in node.names]
    modules = [n for n in names if f"{target}.{n}" in known]  # `from pkg import mod` imports pkg.mod
    rest = tuple(n for n in names if n not in modules)
    out = [Import(node.lineno, f"{target}.{n}") for n in modules]
    return [Import(node.lineno, target, rest), *out] if rest else out


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import anywhere in the tree (module level, functions, classes, conditionals)."""
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += _resolve_from(node, module, is_package, known)
    return out


def _dynamic_imports(tree: ast.AST) -> list[tuple[int, str, str]]:
    """``importlib.import_module("regsweep...")``, ``__import__(...)``, ``find_spec(...)`` of a regsweep name."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name not in DYNAMIC_IMPORTS:
            continue
        arg = node.args[0]
        if isinstance(arg, ast.JoinedStr) and arg.values:
            arg = arg.values[0]  # f"regsweep.{x}"
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("regsweep"):
            out.append((node.lineno, name, arg.value))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _ours(target: str) -> bool:
    return _within(target, "regsweep")


def check_module(module: str, path: str, source: str, entries: list[Entry], known: set[str]) -> list[str]:
    """The violations of one module's source: ``path:line: what`` each."""
    tree = ast.parse(source, filename=path)
    mine = [e for e in entries if e.matches(module)]
    if not mine:
        return [f"{path}:1: {module} is not in the layer table of docs/architecture.md"]
    if len(mine) > 1:
        rows = ", ".join(e.layer_name for e in mine)
        return [f"{path}:1: {module} is in more than one row of the layer table ({rows})"]
    me = mine[0]
    is_package = Path(path).name == "__init__.py"
    found = []
    for imp in imports_of(tree, module, is_package, known):
        where = f"{path}:{imp.line}"
        head = imp.target.split(".", 1)[0]
        if head in OLD_TOP_LEVEL:
            found.append(f"{where}: imports {imp.target}, a 0.1 name; use regsweep.{imp.target}")
            continue
        if not _ours(imp.target) or imp.target == module:
            continue
        if me.isolated:
            found.append(f"{where}: {module} imports {imp.target}; the table says it {NOTHING_OF_OURS}")
        if _within(module, "regsweep.models") and _within(imp.target, "regsweep.search"):
            found.append(f"{where}: {module} imports {imp.target}; models never imports search")
        target = [e for e in entries if e.matches(imp.target)]
        if not target:
            found.append(f"{where}: {module} imports {imp.target}, which is not in the layer table")
        elif target[0].layer > me.layer:
            found.append(f"{where}: upward import: {module} ({me.layer_name}) imports {imp.target} "
                         f"({target[0].layer_name}), a higher layer")
        private = [n for n in imp.names if _is_private(n)]
        if private:
            found.append(f"{where}: {module} imports the private name {private[0]} from {imp.target}")
    for line, func, arg in _dynamic_imports(tree):
        found.append(f"{path}:{line}: {func}({arg!r}): import regsweep modules with an import statement")
    return found


def check_tree(files: dict[str, Path], entries: list[Entry], root: Path = ROOT) -> list[str]:
    """Every violation of the package's module files, plus table entries without a module file."""
    known = set(files)
    found = []
    for module, path in sorted(files.items()):
        found += check_module(module, str(path.relative_to(root)), path.read_text(encoding="utf-8"), entries,
                              known)
    found += [f"docs/architecture.md: {e.pattern} ({e.layer_name}) has no module file"
              for e in entries if not any(e.matches(m) for m in known)]
    return found


# ------------------------------------------------------------------------------------------ the tests
ENTRIES = parse_table(ARCHITECTURE.read_text(encoding="utf-8"))
FILES = module_files()


@pytest.mark.parametrize("module", sorted(FILES))
def test_module_respects_the_layer_table(module):
    path = FILES[module]
    found = check_module(module, str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"), ENTRIES,
                         set(FILES))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.pattern for e in ENTRIES])
def test_every_table_entry_has_a_module_file(entry):
    assert any(entry.matches(m) for m in FILES), f"docs/architecture.md: {entry.pattern} has no module file"


# ------------------------------------------------------------------------- the checker fails when it must
PLANTED_CONFIG = '''"""A planted models/yamlio.py (the module marked "imports nothing of ours")."""
import yaml


def validate(cfg):
    from regsweep.search.spec import load_spec  # upward, inside a function
    return load_spec
'''


def _planted(module: str, source: str, path: str = "models/yamlio.py") -> list[str]:
    return check_module(module, path, source, ENTRIES, set(FILES))


def test_a_planted_upward_import_is_reported_with_file_and_line():
    found = _planted("regsweep.models.yamlio", PLANTED_CONFIG)
    assert any(v.startswith("models/yamlio.py:6: upward import: regsweep.models.yamlio (models.schema) imports "
                            "regsweep.search.spec (search.spec)") for v in found), found
    assert any(v.startswith("models/yamlio.py:6:") and "models never imports search" in v for v in found), found
    assert any(v.startswith("models/yamlio.py:6:") and NOTHING_OF_OURS in v for v in found), found


@pytest.mark.parametrize("module,path,source,line,says", [
    ("regsweep.models.yamlio", "models/yamlio.py", "def f():\n    from . import cnn\n", 2,
     "imports regsweep.models.cnn; the table says it imports nothing of ours"),
    ("regsweep.models.cnn", "models/cnn.py", "import regsweep.models.build\n", 1,
     "upward import: regsweep.models.cnn (models.parts) imports regsweep.models.build (models.build)"),
    ("regsweep.models.registry", "models/registry.py", "from .build import build\n", 1,
     "upward import: regsweep.models.registry (models.parts) imports regsweep.models.build"),
    ("regsweep.search.spec", "search/spec.py", "\n\ndef f():\n    from ..search import cli\n", 4,
     "imports regsweep.search.cli (search.cli), a higher layer"),
    ("regsweep.search.record", "search/record.py", "import importlib\nimportlib.import_module('regsweep.search.cli')\n",
     2, "import_module('regsweep.search.cli')"),
    ("regsweep.search.record", "search/record.py", "x = __import__(f'regsweep.search.{name}')\n", 1,
     "__import__('regsweep.search.')"),
    ("regsweep.search.record", "search/record.py", "import importlib.util\nimportlib.util.find_spec('regsweep.x')\n",
     2, "find_spec('regsweep.x')"),
    ("regsweep.search.export", "search/export.py", "from regsweep.models.train import _autocast\n", 1,
     "imports the private name _autocast from regsweep.models.train"),
    ("regsweep.search.export", "search/export.py", "from models.config import TrainConfig\n", 1,
     "imports models.config, a 0.1 name"),
    ("regsweep.search.nowhere", "search/nowhere.py", "", 1, "regsweep.search.nowhere is not in the layer table"),
])
def test_the_checker_reports_each_rule(module, path, source, line, says):
    found = _planted(module, source, path)
    assert any(v.startswith(f"{path}:{line}:") and says in v for v in found), found


def test_the_checker_passes_allowed_imports():
    source = ("from regsweep.models.config import ConfigError\nimport torch\nfrom . import layers\n"
              "from regsweep import __version__\nimport importlib\nimportlib.import_module('torchvision')\n")
    assert _planted("regsweep.models.cnn", source, "models/cnn.py") == []


def test_the_table_parser_resolves_relative_entries_and_wildcards():
    table = (f"{BEGIN}\n| layer | modules |\n|---|---|\n| a | regsweep.x (y, z), .p and .q.* |\n"
             f"| b | regsweep.w.v (imports nothing of ours) |\n{END}\n")
    entries = parse_table(table)
    assert [(e.pattern, e.layer, e.isolated) for e in entries] == [
        ("regsweep.x", 0, False), ("regsweep.p", 0, False), ("regsweep.q.*", 0, False),
        ("regsweep.w.v", 1, True)]
    assert entries[2].matches("regsweep.q.r") and not entries[2].matches("regsweep.q")


def test_a_table_entry_without_a_module_file_is_reported(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    table = f"{BEGIN}\n| layer | modules |\n|---|---|\n| root | regsweep, regsweep.gone |\n{END}\n"
    found = check_tree({"regsweep": tmp_path / "__init__.py"}, parse_table(table), tmp_path)
    assert found == ["docs/architecture.md: regsweep.gone (root) has no module file"]


def test_the_worker_loop_and_the_storage_layer_import_no_torch():
    """A worker loop on a torch-free objective (benchmarks/scale.py, the proxy's many-worker test) stays ~50 MB a
    process: regsweep.search.loop, .study, .storage, .proxy and .record import neither torch nor regsweep.models'
    training code (search/spec.py and search/trial.py, which do, are imported only where a spec or a trial is)."""
    import subprocess
    import sys

    code = ("import sys, regsweep.search.loop, regsweep.search.study, regsweep.search.storage, regsweep.search.proxy, "
            "regsweep.search.record; print(sorted(m for m in ('torch', 'regsweep.search.spec', 'regsweep.search.trial',"
            " 'regsweep.models.build') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
