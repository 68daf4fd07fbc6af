"""Bad environment variables (REGSWEEP_*): one line naming the variable, its value and what is allowed, exit 2,
nothing created. Checked before any command creates a file, a lock or a study, whatever the storage."""

from __future__ import annotations

import pytest

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

SPEC = {"base.yaml": TINY_BASE, "tiny.yaml": TINY_SPEC}
PG = "postgresql://postgres@127.0.0.1"
SECRET = ("Zq7wX", "9k@")
ARGS = {"validate": ["{d}/tiny.yaml"], "run": ["{d}/tiny.yaml"], "worker": ["{d}/tiny.yaml"],
        "status": ["--storage", "sqlite:///{d}/tiny.db"],
        "export": ["--storage", "sqlite:///{d}/tiny.db", "--study-name", "tiny"],
        "report": ["--storage", "sqlite:///{d}/tiny.db", "--study-name", "tiny", "--out", "{d}/rep"]}


def env_case(id_: str, command: str, env: dict[str, str], expect: tuple[str, ...], **kw) -> Case:
    return Case(id_, [command, *ARGS[command]], files=SPEC, env=env, expect=expect, **kw)


def storage_case(id_: str, command: str, url: str, expect: tuple[str, ...], **kw) -> Case:
    """$REGSWEEP_STORAGE set to ``url`` and no --storage."""
    args = {"validate": ["{d}/tiny.yaml"], "run": ["{d}/tiny.yaml"], "worker": ["{d}/tiny.yaml"], "status": [],
            "export": ["--study-name", "tiny"], "report": ["--study-name", "tiny", "--out", "{d}/rep"]}[command]
    return Case(id_, [command, *args], files=SPEC, env={"REGSWEEP_STORAGE": url},
                expect=("$REGSWEEP_STORAGE", *expect), **kw)


CASES = [
    # `regsweep storage-proxy` reads its database URL from $REGSWEEP_STORAGE only
    Case("proxy-storage-unset", ["storage-proxy"], expect=("$REGSWEEP_STORAGE", "not set", "never the command line")),
    Case("proxy-storage-flag", ["storage-proxy", "--storage", f"{PG}/test"], expect=("--storage",)),
    Case("proxy-of-a-proxy", ["storage-proxy"], env={"REGSWEEP_STORAGE": "grpc://127.0.0.1:13000"},
         expect=("$REGSWEEP_STORAGE", "not another proxy")),
    Case("proxy-storage-bad-url", ["storage-proxy"], env={"REGSWEEP_STORAGE": "postgresql://u:Zq7wX/9k@/test"},
         expect=("$REGSWEEP_STORAGE", "host is empty"), absent=SECRET),
    Case("proxy-storage-unreachable", ["storage-proxy"], env={"REGSWEEP_STORAGE": "postgresql://u:Zq7wX/9k@127.0.0.1:1/t"},
         expect=("cannot reach", "u:***@127.0.0.1:1"), absent=SECRET),
    Case("proxy-port", ["storage-proxy", "--port", "70000"], env={"REGSWEEP_STORAGE": f"{PG}/test"},
         expect=("--port", "70000", "0..65535")),
    storage_case("storage-unknown-scheme", "validate", "redis://h/0", ("'redis://h/0'", "sqlite:///")),
    storage_case("storage-missing-slashes", "status", "postgresql:/h/test", ("postgresql:/h/test",)),
    storage_case("storage-port-not-a-number", "run", f"{PG}:abc/test", ("port 'abc'",), subprocess=True),
    storage_case("storage-empty-host", "export", "postgresql://:5432/test", ("host is empty",)),
    storage_case("storage-sqlite-directory", "report", "sqlite:///{d}", ("is a directory",)),
    storage_case("storage-sqlite-missing-directory", "worker", "sqlite:///{d}/nodir/x.db", ("does not exist",)),
    Case("storage-unreachable-with-password", ["status"], env={
        "REGSWEEP_STORAGE": "postgresql://postgres:Zq7wX/9k@127.0.0.1:1/test?sslpassword=Yv3uT"},
        expect=("cannot", "postgres:***@127.0.0.1:1", "sslpassword=***"), absent=(*SECRET, "Yv3uT")),
    storage_case("storage-line-break", "validate", "sqlite:///{d}/a\nb.db", ("line breaks",)),
    env_case("threads-zero", "run", {"REGSWEEP_NUM_THREADS": "0"}, ("$REGSWEEP_NUM_THREADS", "'0'", "1..1024")),
    env_case("threads-negative", "worker", {"REGSWEEP_NUM_THREADS": "-1"}, ("$REGSWEEP_NUM_THREADS", "'-1'")),
    env_case("threads-text", "validate", {"REGSWEEP_NUM_THREADS": "x"}, ("$REGSWEEP_NUM_THREADS", "'x'"),
             subprocess=True),
    env_case("threads-huge", "run", {"REGSWEEP_NUM_THREADS": "1000000000"}, ("'1000000000'", "1..1024")),
    env_case("threads-fraction", "worker", {"REGSWEEP_NUM_THREADS": "1.5"}, ("'1.5'",)),
    env_case("threads-unicode-digit", "run", {"REGSWEEP_NUM_THREADS": "\u00b2"}, ("$REGSWEEP_NUM_THREADS",)),
    env_case("progress-bogus", "run", {"REGSWEEP_PROGRESS": "bogus"}, ("$REGSWEEP_PROGRESS", "'bogus'", "plain")),
    env_case("progress-bogus-validate", "validate", {"REGSWEEP_PROGRESS": "fancy"}, ("'fancy'",)),
    env_case("db-pool-bogus-sqlite", "run", {"REGSWEEP_DB_POOL": "bogus"}, ("$REGSWEEP_DB_POOL", "'bogus'", "null")),
    env_case("db-pool-bogus-status", "status", {"REGSWEEP_DB_POOL": "QueuePool"}, ("$REGSWEEP_DB_POOL",)),
    env_case("heartbeat-zero", "run", {"REGSWEEP_HEARTBEAT_INTERVAL": "0"}, ("$REGSWEEP_HEARTBEAT_INTERVAL", "'0'")),
    env_case("heartbeat-text", "worker", {"REGSWEEP_HEARTBEAT_INTERVAL": "fast"}, ("'fast'",)),
    env_case("heartbeat-huge", "run", {"REGSWEEP_HEARTBEAT_INTERVAL": "1000000000000"}, ("86400",)),
    env_case("grace-negative", "run", {"REGSWEEP_GRACE_PERIOD": "-5"}, ("$REGSWEEP_GRACE_PERIOD", "'-5'")),
    env_case("grace-below-heartbeat", "run", {"REGSWEEP_GRACE_PERIOD": "10"},
             ("$REGSWEEP_GRACE_PERIOD", "10", "heartbeat interval")),
    env_case("grace-text-export", "export", {"REGSWEEP_GRACE_PERIOD": "1m"}, ("'1m'",)),
    env_case("ray-results-is-a-file", "run", {"REGSWEEP_RAY_RESULTS": "{d}/base.yaml"},
             ("$REGSWEEP_RAY_RESULTS", "not a directory")),
    env_case("mlflow-env-bad-uri", "run", {"REGSWEEP_MLFLOW": "http://:5000"}, ("$REGSWEEP_MLFLOW", "host")),
    env_case("mlflow-env-with-space", "worker", {"REGSWEEP_MLFLOW": "a b"}, ("$REGSWEEP_MLFLOW", "'a b'")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    bad_input(case)
