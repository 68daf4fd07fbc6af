"""Issue 16, secrets: a storage password never leaves regsweep unmasked.

- ``mask`` (search/urls.py) is the ONE masking function: a table of password forms, and property checks that
  it never raises and never returns a password it was given.
- ``run --workers N`` hands its workers the URL in their environment, never on their command line (``ps``).
- End to end on PostgreSQL (trust auth accepts any password): a sweep with a password-bearing URL, then every
  output (stdout/stderr of run, worker, status, export, report, dashboard), every study and trial attr, the
  exported YAML, the artifacts and the report folder are searched for the password; so are the error lines of
  a failed connection.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import string
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest

from regsweep.search.urls import mask, reason, scrub, shown
from tests.search.conftest import tiny_spec  # pytest (importlib mode) registers it

# ------------------------------------------------------------------------------------------- the table
MASK_TABLE = [
    # plain userinfo
    ("postgresql://user:secret@127.0.0.1:5432/test", "postgresql://user:***@127.0.0.1:5432/test"),
    ("postgresql+psycopg://user:secret@db:5432/test", "postgresql+psycopg://user:***@db:5432/test"),
    ("mysql+pymysql://root:secret@localhost/optuna", "mysql+pymysql://root:***@localhost/optuna"),
    # the LAST '@' ends the userinfo (SQLAlchemy would show u:***@ss@h)
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:a@b@c@h:5432/db", "postgresql://u:***@h:5432/db"),
    # '/', '?', ':' inside the password (SQLAlchemy accepts them)
    ("postgresql://u:S3cr/t@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:a/b/c@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:p?w@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:p:w:x@h/db", "postgresql://u:***@h/db"),
    # percent-encoded passwords
    ("postgresql://u:S3cr%2Ft@h/db", "postgresql://u:***@h/db"),
    ("mysql+pymysql://root:p%40ss@db:3306/x", "mysql+pymysql://root:***@db:3306/x"),
    # query keys, any case, with or without a userinfo password
    ("postgresql://h/db?password=secret", "postgresql://h/db?password=***"),
    ("postgresql://h/db?sslmode=require&PassWord=secret", "postgresql://h/db?sslmode=require&PassWord=***"),
    ("mysql+pymysql://root@h/db?passwd=secret&charset=utf8mb4", "mysql+pymysql://root@h/db?passwd=***&charset=utf8mb4"),
    ("postgresql://h/db?SSLPASSWORD=secret", "postgresql://h/db?SSLPASSWORD=***"),
    ("postgresql://h/db?a=1;sslpassword=secret;b=2", "postgresql://h/db?a=1;sslpassword=***;b=2"),
    ("postgresql://h/db?pass%77ord=secret", "postgresql://h/db?pass%77ord=***"),  # a key SQLAlchemy decodes
    ("postgresql://u:secret@h/db?password=secret2", "postgresql://u:***@h/db?password=***"),
    # other schemes
    ("grpc://user:secret@host:13000", "grpc://user:***@host:13000"),
    ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
    # userinfo without a user
    ("postgresql://:secret@h/db", "postgresql://:***@h/db"),
    ("postgresql://:@h/db", "postgresql://:***@h/db"),
    # without a (proper) scheme separator
    ("user:secret@host/db", "user:***@host/db"),
    ("postgresql:/u:secret@h/db", "postgresql:***@h/db"),
    ("postgresql//u:secret@h/db", "postgresql//u:***@h/db"),
    ("postgresql:u:secret@h/db", "postgresql:***@h/db"),
    # no password: unchanged
    ("postgresql://user@db/test", "postgresql://user@db/test"),
    ("postgresql://db:5432/test", "postgresql://db:5432/test"),
    ("sqlite:////tmp/x/regsweep.db", "sqlite:////tmp/x/regsweep.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),  # ':' and '@' in a file name
    ("", ""),
    ("not a url", "not a url"),
]


@pytest.mark.parametrize("url, expected", MASK_TABLE, ids=[f"{i}" for i in range(len(MASK_TABLE))])
def test_mask_table(url, expected):
    assert mask(url) == expected
    assert "secret" not in mask(url)


def test_mask_table_has_25_password_forms():
    assert sum("***" in expected for _, expected in MASK_TABLE) >= 25


# ------------------------------------------------------------------------------------------- properties
class Unprintable:
    def __str__(self):
        raise RuntimeError("no")


def test_mask_never_raises_on_garbage():
    rng = random.Random(16)
    alphabet = string.printable + ":/@?&;=%#+\x00\u00e9\u2603\ud800\U0001f600"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert isinstance(mask(text), str)
        assert isinstance(shown(text), str) and "\n" not in shown(text)
        assert isinstance(scrub(text, text), str)
    for odd in (None, 3, b"postgresql://u:pw@h/db", Unprintable(), "@" * 10000, ":" * 10000, "://" * 3000):
        assert isinstance(mask(odd), str)
    assert mask(Unprintable()) == "***"


def _password(rng: random.Random) -> str:
    """A random password (with the characters URLs mangle) that cannot occur by chance elsewhere."""
    special = "/:@?%!*+$,'()~-._"
    body = "".join(rng.choice(string.ascii_letters + string.digits + special) for _ in range(rng.randint(4, 12)))
    return "Q" + body + "Z"


def _forms(rng: random.Random, pw: str) -> list[str]:
    scheme = rng.choice(["postgresql", "postgresql+psycopg", "mysql+pymysql", "grpc", "sqlite", "redis"])
    user = rng.choice(["", "u", "root", "a.b-c_d", "u%40corp"])
    host = rng.choice(["h", "127.0.0.1", "db.example.com:5432", "[::1]:3306", "h:1"])
    key = rng.choice(["password", "PASSWORD", "Passwd", "sslpassword", "SslPassWord"])
    enc = quote(pw, safe="")
    return [
        f"{scheme}://{user}:{pw}@{host}/db",
        f"{scheme}://{user}:{enc}@{host}/db?sslmode=require",
        f"{scheme}://{user}@{host}/db?{key}={enc}",
        f"{scheme}://{user}@{host}/db?a=1&{key}={enc}&b=2",
        f"{scheme}://{user}:{pw}@{host}/db?{key}={enc}",
        f"{user}:{pw}@{host}/db",
        f"{scheme}:/{user}:{pw}@{host}/db",
        f"{scheme}//{user}:{pw}@{host}",
        f"{scheme}:{user}:{pw}@{host}",
        f"{scheme}://:{pw}@{host}",
    ]


def test_mask_never_returns_a_password_it_was_given():
    rng = random.Random(1616)
    for _ in range(1500):
        pw = _password(rng)
        for url in _forms(rng, pw):
            masked = mask(url)
            for secret in (pw, quote(pw, safe="")):
                assert secret not in masked, (url, masked)


def test_scrub_removes_what_a_driver_echoes_of_a_password():
    url = "postgresql://u:p@ssw0rd@nohost.invalid/test"
    # SQLAlchemy takes 'ssw0rd@nohost.invalid' for the host; psycopg names it
    line = scrub("failed to resolve host 'ssw0rd@nohost.invalid': Name or service not known", url)
    assert "ssw0rd" not in line and "'***@nohost.invalid'" in line
    assert scrub("FATAL: password Zq7wX%2F9k is wrong", "postgresql://u:Zq7wX%2F9k@h/db") == \
        "FATAL: password *** is wrong"
    assert scrub("bad Zq7wX/9k", "postgresql://u:Zq7wX%2F9k@h/db") == "bad ***"  # the decoded form too
    assert reason(ValueError("bad sslpassword Yv3uT\nsecond line"), "postgresql://h/db?sslpassword=Yv3uT") == \
        "bad sslpassword ***"


def test_shown_is_one_short_line():
    text = shown("postgresql://u:pw@h/db\n" + "x" * 1000)
    assert "\n" not in text and len(text) <= 160 and "pw" not in text


# ------------------------------------------------------------------------------------------- PostgreSQL
def _conftest():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_regsweep_tests_conftest_secrets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_c = _conftest()
POSTGRES_URL = _c.POSTGRES_URL
PASSWORD = "Zq7wX/9k"  # raw '/': SQLAlchemy accepts it, the old mask printed it
SSL_PASSWORD = "Yv3uT"
TOKENS = ("Zq7wX", "9k@", SSL_PASSWORD)  # pieces of the passwords that must appear nowhere
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "REGSWEEP_PROGRESS": "plain"}
ENV.pop("REGSWEEP_STORAGE", None)



def pw_url(password: str = PASSWORD, query: str = f"?sslpassword={SSL_PASSWORD}", port: int = 5432,
           host: str = "127.0.0.1") -> str:
    return POSTGRES_URL.replace("postgres@127.0.0.1:5432", f"postgres:{password}@{host}:{port}") + query


@pytest.fixture
def pg_study(tmp_path):
    """(spec path, study name) of a new study on the shared PostgreSQL; deleted afterwards."""
    _c.require(_c.reachable(POSTGRES_URL), f"postgresql at {POSTGRES_URL}")
    name = f"t-secrets-{uuid.uuid4().hex[:10]}"
    spec = tmp_path / "secrets.yaml"
    spec.write_text(tiny_spec(name, 2, 1, extra="description: secrets test\n"))
    yield spec, name
    try:
        optuna.delete_study(study_name=name, storage=POSTGRES_URL)
    except KeyError:
        pass


def cli(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", *args], env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out + err


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def leaks(text: str, tokens=TOKENS) -> list[str]:
    return [t for t in tokens if t in text]


def db_rows(name: str) -> str:
    """Every study and trial attr (user and system: the dashboard note and artifact records live there) of
    study ``name``, read straight from Optuna's tables."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES_URL, poolclass=sqlalchemy.pool.NullPool)
    queries = [f"SELECT key, value_json FROM {t} WHERE study_id = :s"
               for t in ("study_user_attributes", "study_system_attributes")]
    queries += [f"SELECT a.key, a.value_json FROM {t} a JOIN trials USING (trial_id) WHERE trials.study_id = :s"
                for t in ("trial_user_attributes", "trial_system_attributes")]
    with engine.connect() as conn:
        sid = conn.execute(sqlalchemy.text("SELECT study_id FROM studies WHERE study_name = :n"), {"n": name}).scalar()
        rows = [row for q in queries for row in conn.execute(sqlalchemy.text(q), {"s": sid}).all()]
    engine.dispose()
    assert rows
    return json.dumps([list(r) for r in rows])


@pytest.mark.db
@pytest.mark.procs
@pytest.mark.parametrize("via", ["--storage", "$REGSWEEP_STORAGE"])
def test_workers_never_get_the_password_on_their_command_line(pg_study, via):
    spec, name = pg_study
    url = POSTGRES_URL.replace("postgres@", "postgres:S3cr%2Ft@")  # the task's example: '/' percent-encoded
    args, env = (["--storage", url], {}) if via == "--storage" else ([], {"REGSWEEP_STORAGE": url})
    proc = cli("run", str(spec), "--study-name", name, "--workers", "2", *args, env=env)
    seen: dict[int, bytes] = {}
    try:
        deadline = time.monotonic() + 120
        while len(seen) < 2 and proc.poll() is None and time.monotonic() < deadline:
            for kid in children(proc.pid):
                try:
                    cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{kid}/environ").read_bytes()
                except OSError:
                    continue
                # the argument `worker` itself: between fork and exec a child still shows the coordinator's
                # argv (`run ... --workers 2`) and environment, which is not what a worker gets
                if b"worker" in cmdline.split(b"\0"):
                    seen[kid] = cmdline
                    assert f"REGSWEEP_STORAGE={url}".encode() in environ.split(b"\0")  # the URL's route
                    assert os.stat(f"/proc/{kid}/environ").st_mode & 0o077 == 0  # only this user reads it
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # seen both: the sweep itself is another test's business
        _, output = finish(proc)
    assert len(seen) == 2, f"saw {len(seen)} workers\n{output[-2000:]}"
    for cmdline in seen.values():
        assert b"S3cr" not in cmdline and b"--storage" not in cmdline, cmdline
    assert "S3cr" not in output


@pytest.mark.db
@pytest.mark.procs
def test_no_output_attr_export_artifact_report_or_note_holds_the_password(pg_study, tmp_path, capfd, monkeypatch):
    from regsweep.search.cli import main

    spec, name = pg_study
    url = pw_url()
    art, rep, best = tmp_path / "art", tmp_path / "rep", tmp_path / "best.yaml"
    texts: dict[str, str] = {}

    code, texts["run"] = finish(cli("run", str(spec), "--storage", url, "--study-name", name, "--workers", "2",
                                    "--artifacts", str(art)))
    assert code == 0, texts["run"][-3000:]
    assert "started 2 workers" in texts["run"]
    dash = cli("dashboard", "--storage", url, "--port", "0")  # meanwhile, in its own process
    capfd.readouterr()
    commands = {"status": ["status", "--storage", url, "--study-name", name],
                "status-all": ["status", "--storage", url],
                "export": ["export", "--storage", url, "--study-name", name, "--out", str(best)],
                "export-json": ["export", "--storage", url, "--study-name", name, "--format", "json"],
                "report": ["report", "--storage", url, "--study-name", name, "--out", str(rep)]}
    for label, argv in commands.items():
        assert main(argv) == 0, label
        texts[label] = "".join(capfd.readouterr())
    # a worker joining from elsewhere with the URL in its environment (budget met: it returns at once)
    monkeypatch.setenv("REGSWEEP_STORAGE", url)
    assert main(["worker", str(spec), "--study-name", name]) == 0
    texts["worker"] = "".join(capfd.readouterr())
    try:
        ready, _, _ = select.select([dash.stdout], [], [], 60)
        texts["dashboard"] = dash.stdout.readline() if ready else ""
    finally:
        os.killpg(dash.pid, signal.SIGTERM)
        texts["dashboard"] += "".join(dash.communicate(timeout=30))
    assert "optuna-dashboard on postgresql://postgres:***@" in texts["dashboard"], texts["dashboard"]
    assert "sslpassword=***" in texts["export-json"] + best.read_text()

    texts["attrs"] = db_rows(name)
    assert "dashboard" in texts["attrs"]  # the study note is among them
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != spec]
    assert any(p.suffix == ".html" for p in files) and any(p.suffix == ".png" for p in files)
    configs = [p for p in files if art in p.parents and b"provenance" in p.read_bytes()]
    assert configs and all(b"postgres:***@" in p.read_bytes() for p in configs)  # the artifacts' config YAML
    for p in files:
        texts[str(p)] = p.read_bytes().decode("latin-1")
    found = {label: leaks(text) for label, text in texts.items() if leaks(text)}
    assert not found, found


@pytest.mark.db
# validate/run/worker share one URL path (_load_spec_and_storage), status/export/report/dashboard the other
# (_load_study): two of the first and one of the second keep CI time down (each case waits ~3 s of retries).
@pytest.mark.parametrize("command", ["run", "worker", "status"])
@pytest.mark.parametrize("url", [
    pw_url(port=1),  # wrong port: connection refused
    pw_url(host="nohost.invalid"),  # wrong host
    pw_url(password="Zq7wX@9k@p"),  # '@' in the password: SQLAlchemy takes '9k@p@127.0.0.1' for the host
], ids=["port", "host", "at-sign"])
def test_a_failed_connection_prints_the_masked_url(command, url, tmp_path, capsys):
    from regsweep.search.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_spec("s", 1, 1, extra="description: secrets test\n"))
    args = {"validate": [str(spec)], "run": [str(spec)], "worker": [str(spec)], "status": [],
            "export": ["--study-name", "s"], "report": ["--study-name", "s", "--out", str(tmp_path / "r")],
            "dashboard": ["--port", "0"]}[command]
    capsys.readouterr()
    assert main([command, *args, "--storage", url]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and "postgresql://postgres:***@" in lines[0], err
    assert not leaks(out + err, TOKENS + ("9k@p",)), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
