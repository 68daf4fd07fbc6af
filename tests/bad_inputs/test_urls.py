"""Bad storage URLs (``--storage``, the spec's ``storage``): one line naming the URL (password masked) and what is
allowed, exit 2, nothing created (no SQLite file, no lock file, no study on the servers)."""

from __future__ import annotations

import pytest

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

SPEC = {"base.yaml": TINY_BASE, "tiny.yaml": TINY_SPEC}
PG = "postgresql://postgres@127.0.0.1"
PW = "postgresql://postgres:Zq7wX/9k@127.0.0.1"  # a password with '/', which SQLAlchemy accepts
SECRET = ("Zq7wX", "9k@")


def _mkdir(name: str):
    return lambda d: (d / name).mkdir()


def url_case(id_: str, command: str, url: str, expect: tuple[str, ...], **kw) -> Case:
    args = {"validate": ["{d}/tiny.yaml"], "run": ["{d}/tiny.yaml"], "worker": ["{d}/tiny.yaml"], "status": [],
            "export": ["--study-name", "tiny"], "report": ["--study-name", "tiny", "--out", "{d}/rep"],
            "dashboard": ["--port", "0"]}[command]
    return Case(id_, [command, *args, "--storage", url], files=kw.pop("files", SPEC), expect=expect, **kw)


CASES = [
    url_case("unknown-scheme", "validate", "redis://h:6379/0", ("--storage", "'redis://h:6379/0'", "sqlite:///")),
    url_case("unknown-scheme-http", "status", "http://example.com/db", ("http://example.com/db", "postgresql://")),
    url_case("missing-slashes", "run", "postgresql:/127.0.0.1/test", ("postgresql:/127.0.0.1/test", "not allowed")),
    url_case("missing-colon", "export", "postgresql//127.0.0.1/test", ("postgresql//127.0.0.1/test",)),
    url_case("bare-scheme", "report", "postgresql", ("'postgresql'", "not allowed")),
    url_case("no-scheme", "validate", "127.0.0.1:5432/test", ("127.0.0.1:5432/test", "not allowed")),
    url_case("port-not-a-number", "validate", f"{PG}:abc/test", ("port 'abc' is not a number",)),
    url_case("port-not-a-number-status", "status", "mysql+pymysql://root@127.0.0.1:33o6/test",
             ("port '33o6' is not a number",)),
    url_case("port-not-a-number-worker", "worker", f"{PG}:5432x/test", ("port '5432x'",)),
    url_case("port-zero", "run", f"{PG}:0/test", ("port 0", "1..65535")),
    url_case("port-too-big", "export", f"{PG}:99999/test", ("port 99999", "1..65535")),
    url_case("empty-host", "validate", "postgresql://:5432/test", ("host is empty", "?host=")),
    url_case("empty-host-with-password", "status", "postgresql://u:Zq7wX/9k@/test", ("host is empty", "u:***@"),
             absent=SECRET),
    url_case("empty-host-mysql", "run", "mysql+pymysql://root@/test", ("host is empty",)),
    url_case("sqlite-path-is-a-directory", "validate", "sqlite:///{d}/adir", ("adir", "is a directory"),
             setup=_mkdir("adir")),
    url_case("sqlite-path-is-a-directory-run", "run", "sqlite:///{d}/adir", ("is a directory",), setup=_mkdir("adir")),
    url_case("sqlite-missing-directory-status", "status", "sqlite:///{d}/nodir/x.db", ("nodir", "does not exist")),
    url_case("sqlite-missing-directory-export", "export", "sqlite:///{d}/nodir/x.db", ("does not exist",)),
    url_case("sqlite-missing-directory-report", "report", "sqlite:///{d}/nodir/x.db", ("does not exist",)),
    url_case("sqlite-two-slashes", "validate", "sqlite://relative.db", ("sqlite://relative.db", "three slashes")),
    url_case("unreachable-export", "export", f"{PG}:1/test", ("cannot", "127.0.0.1:1")),
    url_case("unreachable-status", "status", "mysql+pymysql://root@127.0.0.1:1/test", ("cannot", "127.0.0.1:1")),
    url_case("unreachable-with-password", "validate", f"{PW}:1/test?sslpassword=Yv3uT",
             ("postgres:***@127.0.0.1:1", "sslpassword=***"), absent=(*SECRET, "Yv3uT"), subprocess=True),
    url_case("unreachable-with-password-status", "status", f"{PW}:1/test", ("postgres:***@",), absent=SECRET),
    url_case("at-sign-in-password-unknown-host", "run", "postgresql://postgres:Zq7wX@9k@nohost.invalid/test",
             ("postgres:***@nohost.invalid",), absent=(*SECRET, "9k@")),
    url_case("query-password-unreachable", "dashboard", f"{PG}:1/test?password=Zq7wX", ("password=***",),
             absent=SECRET),
    url_case("line-break", "validate", f"{PG}:5432/te\nst", ("line breaks",)),
    url_case("unknown-driver", "validate", "postgresql+nosuchdriver://127.0.0.1/test", ("cannot reach",)),
    url_case("huge-url", "validate", f"postgresql://u:Zq7wX@h:{'9' * 5000}x/test", ("not a number",),
             absent=SECRET),
    url_case("grpc-no-port", "status", "grpc://127.0.0.1", ("grpc://127.0.0.1", "port is missing")),
    url_case("grpc-user-password", "run", "grpc://u:Zq7wX@127.0.0.1:13000", ("u:***@", "no user or password"),
             absent=SECRET),
    url_case("grpc-path", "export", "grpc://127.0.0.1:13000/db", ("nothing after the port",)),
    url_case("grpc-port-zero", "worker", "grpc://127.0.0.1:0", ("port 0", "1..65535")),
    url_case("grpc-port-word", "report", "grpc://127.0.0.1:abc", ("port 'abc' is not a number",)),
    url_case("grpc-query", "dashboard", "grpc://127.0.0.1:13000?password=Zq7wX", ("nothing after the port",),
             absent=SECRET),
    Case("spec-storage-port", ["validate", "{d}/s.yaml"],
         files={"base.yaml": TINY_BASE, "s.yaml": TINY_SPEC + f"storage: {PW}:abc/test\n"},
         expect=("s.yaml", "storage", "port 'abc'"), absent=SECRET),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
