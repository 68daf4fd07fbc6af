"""Safe YAML for specs, spaces and configs, and the one error type (the bottom layer: imports nothing of ours).

:class:`ConfigError` is the one-line error of every bad value; :func:`load_yaml_text`/:func:`load_yaml_file`
parse YAML safely (size limit, alias-bomb budget, recursive aliases, duplicate keys, ``1e-5`` as a float);
:func:`dump_yaml` writes what they read back; :func:`excerpt`/:func:`clip` cut user values and foreign
messages for error lines. models/config.py (TrainConfig) builds on this module.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any, Iterator

import yaml


class ConfigError(ValueError):
    """A bad configuration value: the message names the path, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------- YAML
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


MAX_FILE_BYTES = 1 << 20  # a spec, space or config file above 1 MiB is refused before it is parsed
MAX_YAML_NODES = 100_000  # values of one document with every alias expanded: an alias bomb stops here
EXCERPT_SCAN = 100_000  # excerpt() measures a value's repr up to this many characters


def excerpt(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with ``...`` and the total size.

    Every error that echoes a user value goes through this: a value may be huge (a long string, a list of
    100,000 items sharing aliases) or recursive, and its full repr is never built. ``excerpt("ab")`` is
    ``'ab'``; a long string reads ``'aaaa... (50,000 chars)'``.
    """
    head: list[str] = []
    size = 0
    for chunk in _repr_chunks(value, set()):
        if size < limit:
            head.append(chunk[: limit - size])
        size += len(chunk)
        if size > EXCERPT_SCAN:
            break
    if size <= limit:
        return "".join(head)
    if isinstance(value, (str, bytes)):  # a string's size is its length
        total = f"{len(value):,}"
    else:
        total = f"more than {EXCERPT_SCAN:,}" if size > EXCERPT_SCAN else f"{size:,}"
    return f"{''.join(head)}... ({total} chars)"


def path_excerpt(path: Any, limit: int = 80) -> str:
    """``repr(str(path))`` for an error message; a long path keeps its END (the part the user typed last, e.g.
    the file name) and says how long it was: ``'.../case/nope' (120 chars)``. Never reads the path."""
    text = str(path)
    if len(text) <= limit:
        return repr(text)
    return f"'...{text[-(limit - 3):]}' ({len(text):,} chars)"


def _repr_chunks(value: Any, active: set[int]) -> Iterator[str]:
    """The pieces of ``repr(value)`` one at a time: containers item by item, long strings in slices."""
    if type(value) in (list, tuple, dict):
        if id(value) in active:  # a recursive structure: shown as repr shows it
            yield "{...}" if isinstance(value, dict) else "[...]"
            return
        active.add(id(value))
        opening, closing = {list: "[]", tuple: "()", dict: "{}"}[type(value)]
        yield opening
        for i, item in enumerate(value.items() if isinstance(value, dict) else value):
            if i:
                yield ", "
            if isinstance(value, dict):
                yield from _repr_chunks(item[0], active)
                yield ": "
                yield from _repr_chunks(item[1], active)
            else:
                yield from _repr_chunks(item, active)
        if isinstance(value, tuple) and len(value) == 1:
            yield ","
        yield closing
        active.discard(id(value))
    elif isinstance(value, (str, bytes)) and len(value) > 4096:
        first = repr(value[:4096])
        yield first[:-1]
        skip = 2 if isinstance(value, bytes) else 1  # b'...' / '...'
        for start in range(4096, min(len(value), EXCERPT_SCAN + 4096), 4096):
            yield repr(value[start:start + 4096])[skip:-1]
        yield first[-1]
    else:
        yield repr(value)


def clip(text: Any, limit: int = 200) -> str:
    """The first line of a message from elsewhere (an exception), cut to ``limit`` characters."""
    lines = str(text).splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line):,} chars)"


class _Refused(Exception):
    """Raised inside the loader (alias budget, recursive alias, duplicate key); load_yaml_text turns it into
    one ConfigError line naming the file and the line."""

    def __init__(self, line: int, message: str, unquoted: str | None = None):
        super().__init__(message)
        self.line, self.unquoted = line, unquoted or message  # unquoted: without the file's own text


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (PyYAML's YAML 1.1 reads it as a string).

    It counts every node as it is composed, an alias as the whole subtree it names: past MAX_YAML_NODES the
    document is refused before anything is constructed, so an alias bomb never materialises. An alias inside
    the node it names (a recursive structure) and a key given twice in one mapping are refused too.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its node count, aliases expanded
        self._nodes = 0

    def _count(self, n: int, mark: Any) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(mark.line + 1, f"more than {MAX_YAML_NODES:,} values once aliases are expanded "
                                          "(an alias bomb?); not allowed")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # (an undefined alias: PyYAML's own error)
                if id(node) not in self._sizes:
                    what = "is inside the node it names (a recursive structure); not allowed"
                    raise _Refused(event.start_mark.line + 1, f"alias *{clip(event.anchor, 40)} {what}",
                                   f"an alias {what}")
                self._count(self._sizes[id(node)], event.start_mark)
            return super().compose_node(parent, index)
        self._count(1, self.peek_event().start_mark)
        node = super().compose_node(parent, index)
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
            self._check_keys(node)
        self._sizes[id(node)] = 1 + sum(self._sizes.get(id(c), 1) for c in children)
        return node

    @staticmethod
    def _check_keys(node: Any) -> None:
        """A key given twice in one mapping (before any ``<<`` merge, whose overrides are on purpose)."""
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            ident, line = (key.tag, key.value), key.start_mark.line + 1
            if ident in seen:
                rule = f"(first on line {seen[ident]}); a key may appear once in a mapping"
                raise _Refused(line, f"duplicate key {excerpt(key.value, 60)} {rule}", f"duplicate key {rule}")
            seen[ident] = line


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings _Loader would read as floats (e.g. '1e5')."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def load_yaml_text(text: str, source: str = "<string>", *, quote: bool = True) -> Any:
    """Parse YAML safely (never executes anything): a syntax error, a text above MAX_FILE_BYTES, an alias
    bomb, a recursive alias or a duplicate key becomes one ConfigError line naming ``source`` and the line.
    ``quote=False`` (a file named by another: ``base:``, ``include:``) leaves out anything quoted from it."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters is more than the {MAX_FILE_BYTES:,} allowed "
                          "for a spec or config")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except _Refused as exc:
        raise ConfigError(f"{source}: line {exc.line}: {exc if quote else exc.unquoted}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if not quote:  # PyYAML quotes the offending text ('found undefined alias 'x'', a tag, a character)
            problem = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", problem)
        raise ConfigError(f"{source}:{where}: malformed YAML: {clip(problem)}") from None


def load_yaml_file(path: str | Path, *, quote: bool = True) -> Any:
    """A YAML file of at most MAX_FILE_BYTES (a regular file, UTF-8), parsed by :func:`load_yaml_text`."""
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{path}: is a directory, not a YAML file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO, a device (/dev/zero): never read
            raise ConfigError(f"{path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {info.st_size:,} bytes is more than the {MAX_FILE_BYTES:,} allowed for a "
                              "spec or config file")
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # a file that grew since stat
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: more than the {MAX_FILE_BYTES:,} bytes allowed for a spec or config file")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a spec or config is a YAML text file"
                          ) from None
    except OSError as exc:  # permission, a path through a file, a name too long, ...
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc.__class__.__name__}") from None
    return load_yaml_text(text, str(path), quote=quote)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None)
