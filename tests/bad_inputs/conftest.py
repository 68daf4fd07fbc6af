"""The bad-input table's harness (issue 16). Every case runs the CLI's ``main`` in-process (a few run the real
console script in a subprocess) and must end with exit code 2, exactly ONE line on stderr, no traceback, and
nothing created: the working directory's file tree and the study lists of SQLite, PostgreSQL and MariaDB are
the same before and after.

A test module here holds one category's cases (spec, config, cli, urls, env, files, ...) as a list of ``Case``
and parametrizes ``test_case`` over them; ``tests/bad_inputs/test_table.py`` counts them per category.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
MYSQL_URL = "mysql+pymysql://root@127.0.0.1:3306/test"

TINY_BASE = """\
model: {name: cnn, widths: [8, 16]}
data: {name: digits, batch_size: 64}
optim: {name: adamw, lr: 3.0e-3}
train: {epochs: 2, num_threads: 1, train_eval_size: 128}
"""

TINY_SPEC = """\
name: tiny
base: base.yaml
objective: {metric: val_loss, direction: minimize}
space:
  model.dropout: {type: float, low: 0.0, high: 0.5}
  model.bn: {type: categorical, choices: [none, before_act]}
sampler: {name: tpe, seed: 0}
pruner: {name: median}
budget: {n_trials: 2}
"""


@dataclass
class Case:
    """One bad input: ``argv`` for ``regsweep`` (``{d}`` is replaced by the case's directory), files to write
    into that directory first (name -> text or bytes), environment variables, and the words the one stderr
    line must contain (file/field/value: whatever names the mistake), and words that must appear nowhere in its
    output (``absent``: a password)."""

    id: str
    argv: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    subprocess: bool = False  # run the installed console script instead of main() in-process
    setup: Optional[Callable[[Path], None]] = None  # extra preparation in the case's directory
    absent: tuple[str, ...] = ()  # words that must appear nowhere in the output (e.g. a password)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime (what 'nothing created or changed' compares)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _ours(name: str) -> bool:
    """False for the uuid-suffixed studies (``t-1a2b3c4d...``) that the suite's DB tests create and delete on the
    shared servers while this runs; no bad-input case names a study so."""
    import re

    return re.search(r"-[0-9a-f]{8,}$", name) is None


_ENGINES: dict[str, object] = {}


def study_names(url: str) -> Optional[list[str]]:
    """The studies in a server database, or None when it is unreachable (the suite's DB tests say so). A plain
    select on Optuna's ``studies`` table through one pool-less engine per URL: opening an Optuna storage per call
    (four per case) cost ~0.5 s a case, ~2 minutes over the table."""
    import sqlalchemy

    try:
        engine = _ENGINES.get(url)
        if engine is None:
            # pymysql 1.2 sets up TLS ("preferred") on every connection, loading the system CA bundle (~0.1 s
            # a connect, ~30 s over the table): a plain local select needs none.
            args = {"ssl_disabled": True} if url.startswith("mysql+pymysql") else {}
            engine = _ENGINES[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                                              connect_args=args)
        with engine.connect() as conn:
            if not sqlalchemy.inspect(conn).has_table("studies"):
                return []
            names = conn.execute(sqlalchemy.text("SELECT study_name FROM studies")).scalars()
            return sorted(n for n in names if _ours(n))
    except Exception:  # noqa: BLE001 - unreachable server: nothing to compare
        return None


@pytest.fixture
def bad_input(tmp_path, capsys, monkeypatch):
    """Run one Case and check the bad-input contract; returns the stderr line."""

    def run(case: Case) -> str:
        d = tmp_path / "case"
        d.mkdir()
        for name, text in case.files.items():
            f = d / name
            f.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, bytes):
                f.write_bytes(text)
            else:
                f.write_text(text.replace("{d}", str(d)))
        if case.setup is not None:
            case.setup(d)
        argv = [a.replace("{d}", str(d)) for a in case.argv]
        env = {k: v.replace("{d}", str(d)) for k, v in case.env.items()}
        before = (tree(d), study_names(POSTGRES_URL), study_names(MYSQL_URL))
        monkeypatch.chdir(d)
        if case.subprocess:
            exe = Path(sys.executable).parent / "regsweep"
            res = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=120, cwd=d,
                                 env={**os.environ, **env}, stdin=subprocess.DEVNULL)
            rc, err, out = res.returncode, res.stderr, res.stdout
        else:
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            from regsweep.search.cli import main

            capsys.readouterr()
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse
                rc = exc.code
            out, err = capsys.readouterr()
        after = (tree(d), study_names(POSTGRES_URL), study_names(MYSQL_URL))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
        assert len(lines) == 1, f"{len(lines)} stderr lines: {err[-2000:]}"
        assert len(lines[0]) <= 400, f"stderr line of {len(lines[0])} chars: {lines[0][:400]}"
        for word in case.expect:
            assert word in lines[0], f"{word!r} not in: {lines[0]}"
        for word in case.absent:
            assert word not in out + err, f"{word!r} shown: {(out + err)[-2000:]}"
        assert after[0] == before[0], f"files changed: {set(after[0].items()) ^ set(before[0].items())}"
        assert after[1] == before[1], "a PostgreSQL study was created or removed"
        assert after[2] == before[2], "a MariaDB study was created or removed"
        return lines[0]

    return run
