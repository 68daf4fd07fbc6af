"""Storage URLs as text: precedence, checks, and password masking.

Precedence: ``--storage`` > ``$REGSWEEP_STORAGE`` > the spec's ``storage`` > ``sqlite:///<spec dir>/regsweep.db``
(printed as an absolute path). A password never leaves regsweep unmasked: use :func:`mask` for anything printed
or stored, :func:`scrub` / :func:`reason` for a driver's error text. Opening a storage is search/storage.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from regsweep.models.config import ConfigError

SCHEMES = ("sqlite", "postgresql", "mysql", "grpc")  # grpc://HOST:PORT: a `regsweep storage-proxy` (search/proxy.py)
STORAGE_ENV = "REGSWEEP_STORAGE"  # also how `run --workers N` hands the URL to its workers (never argv)


def default_url(spec_dir: Path) -> str:
    return f"sqlite:///{(spec_dir / 'regsweep.db').resolve()}"


def resolve_url(cli: Optional[str], spec_storage: Optional[str], spec_dir: Path) -> str:
    return cli or os.environ.get(STORAGE_ENV) or spec_storage or default_url(spec_dir)


_SCHEME_SEP = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
SECRET_KEYS = ("password", "passwd", "sslpassword", "pwd")  # query keys whose values are masked (any case)
_QUERY_PAIR = re.compile(r"(^|[?&;])([^=&;#?]*)=([^&;#]*)")
SHOWN_CHARS = 160  # a URL in an error line is cut to this many characters


def _userinfo_span(url: str) -> Optional[tuple[int, int]]:
    """(start, end) of the password in ``url``, or None.

    The password runs from the first ``:`` of the userinfo to the LAST ``@`` (SQLAlchemy's parser stops at
    the first ``@`` and renders ``u:p@ss@h`` as ``u:***@ss@h``; a password may also hold ``/``, ``?``, ``:``).
    Without ``scheme://`` (a typo such as ``postgresql:/u:pw@h``) the same rule applies to the whole text, so
    the password is masked however the URL is mangled. A ``sqlite:///PATH`` has no userinfo: ``:`` and ``@``
    there are part of a file name. When ``@`` also appears in the path or query, more than the password is
    masked, never less."""
    m = _SCHEME_SEP.match(url)
    head = m.end() if m else 0
    rest = url[head:]
    at = rest.rfind("@")
    if at < 0:
        return None
    if m is not None and url[:head].lower().startswith("sqlite") and rest.startswith("/"):
        return None
    colon = rest.find(":", 0, at)
    if colon < 0:
        return None  # user@host: no password
    return head + colon + 1, head + at


def _query_secrets(url: str) -> list[tuple[int, int]]:
    """(start, end) of every ``password=`` / ``passwd=`` / ``sslpassword=`` (any case, percent-encoded keys
    too) value in ``url``."""
    from urllib.parse import unquote

    spans = []
    for m in _QUERY_PAIR.finditer(url):
        if unquote(m.group(2)).strip().lower() in SECRET_KEYS:
            spans.append(m.span(3))
    return spans


def mask(url: str) -> str:
    """The storage URL with every password replaced by ``***``; a URL without one is returned unchanged.

    THE one masking function: anything printed, logged or stored (attrs, exports, artifacts, report, note,
    Ray's files, error messages) shows a URL only through it. Masks the userinfo password (split at the LAST
    ``@``; ``/``, ``:``, ``?`` and percent-encoding inside it; no user; no ``scheme://``) and the values of the
    query keys ``password``, ``passwd``, ``sslpassword``, ``pwd`` (any case). Never raises: text that cannot
    even be read as a string comes back as ``***``."""
    try:
        if not isinstance(url, str):
            url = str(url)
        spans = _query_secrets(url)
        user = _userinfo_span(url)
        if user is not None:
            spans = [s for s in spans if s[1] <= user[0] or s[0] >= user[1]] + [user]
        for start, end in sorted(spans, reverse=True):
            url = url[:start] + "***" + url[end:]
        return url
    except Exception:  # noqa: BLE001 - masking must never be the thing that fails
        return "***"


def has_password(url: str) -> bool:
    """Whether :func:`mask` would hide something in ``url``."""
    return mask(url) != url


def storage_arg(url: str) -> str:
    """``--storage URL`` for a command shown to the user (the study note, the end of a run): the URL shell-quoted,
    or ``--storage "$REGSWEEP_STORAGE"`` when it holds a password (a command line is copied, logged and shown by
    ``ps``; the password stays in the environment, never in the text)."""
    import shlex

    if has_password(url):
        return f'--storage "${STORAGE_ENV}"'
    return f"--storage {shlex.quote(url)}"


def shown(url: str) -> str:
    """The masked URL as an error line shows it: quoted, control characters escaped, cut to SHOWN_CHARS."""
    text = repr(mask(url))
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 4] + "...'"


def secrets_of(url: str) -> list[str]:
    """The password strings of ``url`` as a driver or SQLAlchemy may echo them (raw, percent-decoded, and each
    piece after an ``@`` that SQLAlchemy would take for the host), longest first."""
    from urllib.parse import unquote

    try:
        found: set[str] = set()
        spans = _query_secrets(url)
        user = _userinfo_span(url)
        if user is not None:
            spans.append(user)
        for start, end in spans:
            raw = url[start:end]
            for text in (raw, unquote(raw), unquote(raw.replace("+", " "))):
                found.add(text)
                found.update(text.split("@")[1:])
        return sorted((s for s in found if s), key=len, reverse=True)
    except Exception:  # noqa: BLE001
        return []


def scrub(text: str, url: str) -> str:
    """``text`` (e.g. a driver's error message) without any password of ``url``: each one of 3+ characters,
    and each host-like piece of a password that held ``@`` (``'ss@h'`` -> ``'***@h'``), becomes ``***``."""
    try:
        text = str(text)
        for secret in secrets_of(url):
            if len(secret) >= 3:
                text = text.replace(secret, "***")
            text = text.replace(secret + "@", "***@")
        return text
    except Exception:  # noqa: BLE001
        return "***"


def reason(exc: BaseException, url: str, limit: int = 200) -> str:
    """The first line of an exception's message, without the URL's passwords, cut to ``limit`` characters."""
    try:
        first = (str(exc).strip().splitlines() or [""])[0] or exc.__class__.__name__
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails
        first = exc.__class__.__name__
    first = scrub(first, url)
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _query_has(url: str, *keys: str) -> bool:
    return any(m.group(2).lower() in keys and m.group(3) for m in _QUERY_PAIR.finditer(url.partition("?")[2]))


def check_url(url: str) -> str:
    """The URL's scheme (sqlite, postgresql, mysql or grpc) once it is a URL regsweep can use; ConfigError (one
    line, password masked) for anything else: unknown scheme, no ``://``, a port that is not 1..65535, no host, a
    ``sqlite://`` without the third slash, a ``grpc://`` that is not exactly ``grpc://HOST:PORT``."""
    allowed = ("use sqlite:///PATH, postgresql://USER@HOST:PORT/DB, mysql+pymysql://USER@HOST:PORT/DB or "
               "grpc://HOST:PORT (a regsweep storage-proxy)")
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in SCHEMES:
        raise ConfigError(f"storage: {shown(url)} is not allowed; {allowed}")
    if any(ch in url for ch in "\n\r\0"):
        raise ConfigError(f"storage: {shown(url)} is not allowed; a URL has no line breaks or NUL characters")
    if scheme == "sqlite":
        rest = url.split("://", 1)[1]
        if rest and not rest.startswith("/"):
            raise ConfigError(f"storage: {shown(url)} is not allowed; a SQLite URL is sqlite:///PATH (three slashes, "
                              "four for an absolute path)")
        return scheme
    if scheme == "grpc":
        grpc_address(url)
        return scheme
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's ValueError for a port like 'abc', ArgumentError, ...
        port = re.search(r"invalid literal for int\(\) with base 10: (.*)$", str(exc))
        why = (f"port {scrub(port.group(1), url)[:24]} is not a number" if port else
               "the port is not a number" if "integer string conversion" in str(exc) else reason(exc, url, 120))
        raise ConfigError(f"storage: {shown(url)} is not allowed; {why}") from None
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigError(f"storage: {shown(url)} is not allowed; port {parsed.port} must be 1..65535")
    if not parsed.host and not _query_has(url, "host", "unix_socket"):
        raise ConfigError(f"storage: {shown(url)} is not allowed; the host is empty ({scheme}://USER@HOST:PORT/DB, "
                          "or ?host=/socket/dir for a Unix socket)")
    return scheme


_GRPC = re.compile(r"grpc://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-_]*)(?::([^/?#@]*))?/?")


def grpc_address(url: str) -> tuple[str, int]:
    """(host, port) of a ``grpc://HOST:PORT`` URL (a `regsweep storage-proxy`); ConfigError (one line) for
    anything else: a user or password, a path or query, no port, a port that is not 1..65535."""
    m = _GRPC.fullmatch(url)
    if m is None:
        why = ("a proxy URL holds no user or password" if "@" in url else
               "a proxy URL is grpc://HOST:PORT, nothing after the port")
        raise ConfigError(f"storage: {shown(url)} is not allowed; {why}")
    port = m.group(2)
    if port is None or port == "":
        raise ConfigError(f"storage: {shown(url)} is not allowed; the port is missing (grpc://HOST:PORT)")
    if not re.fullmatch(r"[0-9]{1,5}", port):
        raise ConfigError(f"storage: {shown(url)} is not allowed; port {scrub(port, url)[:24]!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"storage: {shown(url)} is not allowed; port {int(port)} must be 1..65535")
    return m.group(1).strip("[]"), int(port)


def is_proxy(url: str) -> bool:
    """Whether ``url`` names a `regsweep storage-proxy` (``grpc://``) rather than a database."""
    return url.startswith("grpc://")


def sqlite_file(url: str) -> Optional[Path]:
    """The database file of a ``sqlite:///PATH`` URL; None for other schemes and for in-memory SQLite."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


def check_sqlite_path(url: str) -> None:
    """A ``sqlite:///PATH`` must name a file (maybe not there yet) in an existing directory; ConfigError."""
    file = sqlite_file(url)
    if file is not None and not file.parent.is_dir():
        raise ConfigError(f"storage: {shown(url)}: directory {file.parent} does not exist")
    if file is not None and file.is_dir():
        raise ConfigError(f"storage: {shown(url)}: {file} is a directory, not a SQLite file")
