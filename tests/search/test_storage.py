"""search/urls.py and search/storage.py: URL precedence, password masking, scheme checks, opening a SQLite study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from regsweep.models.config import ConfigError
from regsweep.search.storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, open_storage
from regsweep.search.urls import check_url, default_url, mask, resolve_url

optuna.logging.set_verbosity(optuna.logging.WARNING)

CLI = "postgresql://cli@db/cli"
ENV = "mysql+pymysql://env@db/env"
SPEC = "sqlite:////somewhere/spec.db"


# ------------------------------------------------------------------------------------------- precedence
@pytest.mark.parametrize("cli, env, spec, expected", [
    (CLI, ENV, SPEC, CLI),
    (None, ENV, SPEC, ENV),
    (None, None, SPEC, SPEC),
    (CLI, None, None, CLI),
    (None, ENV, None, ENV),
])
def test_resolve_url_precedence(monkeypatch, tmp_path, cli, env, spec, expected):
    if env is None:
        monkeypatch.delenv("REGSWEEP_STORAGE", raising=False)
    else:
        monkeypatch.setenv("REGSWEEP_STORAGE", env)
    assert resolve_url(cli, spec, tmp_path) == expected


def test_default_is_sqlite_in_the_spec_dir_as_an_absolute_path(monkeypatch, tmp_path):
    monkeypatch.delenv("REGSWEEP_STORAGE", raising=False)
    (tmp_path / "studies").mkdir()
    monkeypatch.chdir(tmp_path)
    url = resolve_url(None, None, Path("studies"))
    assert url == f"sqlite:///{(tmp_path / 'studies' / 'regsweep.db').resolve()}"
    assert url.startswith("sqlite:////")  # sqlite:/// + an absolute path
    assert Path(url.removeprefix("sqlite:///")).is_absolute()
    assert url == default_url(Path("studies"))


def test_empty_env_falls_through(monkeypatch, tmp_path):
    monkeypatch.setenv("REGSWEEP_STORAGE", "")
    assert resolve_url(None, SPEC, tmp_path) == SPEC


# ------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("url, expected", [
    ("postgresql://user:secret@127.0.0.1:5432/test", "postgresql://user:***@127.0.0.1:5432/test"),
    ("postgresql+psycopg2://user:secret@db.example:5432/test", "postgresql+psycopg2://user:***@db.example:5432/test"),
    ("mysql+pymysql://root:secret@localhost/optuna", "mysql+pymysql://root:***@localhost/optuna"),
    ("mysql://root:secret@localhost:3306/optuna?charset=utf8mb4",
     "mysql://root:***@localhost:3306/optuna?charset=utf8mb4"),
    ("postgresql://user:p@ss:secret@host/db", "postgresql://user:***@host/db"),  # '@' in the password
])
def test_mask_hides_passwords(url, expected):
    masked = mask(url)
    assert "secret" not in masked
    assert "***" in masked
    assert masked == expected


@pytest.mark.parametrize("url", [
    "sqlite:////tmp/x/regsweep.db",
    "postgresql://user@db/test",
    "sqlite:///:memory:",
    "sqlite:////tmp/a+b@c.db",
])
def test_mask_leaves_urls_without_password_alone(url):
    assert mask(url) == url


# ---------------------------------------------------------------------------------------- check_url
@pytest.mark.parametrize("url, scheme", [
    ("sqlite:////tmp/a.db", "sqlite"),
    ("postgresql://u:p@h/db", "postgresql"),
    ("postgresql+psycopg2://u:p@h/db", "postgresql"),
    ("mysql+pymysql://u:p@h/db", "mysql"),
])
def test_check_url_accepts(url, scheme):
    assert check_url(url) == scheme


@pytest.mark.parametrize("url", ["redis://x", "foo", "sqlite", "http://example.com/db", "postgres-db"])
def test_check_url_refuses_with_one_line(url):
    with pytest.raises(ConfigError) as exc:
        check_url(url)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("storage: ")
    assert repr(url) in msg
    assert "sqlite:///" in msg  # says what is allowed


def test_check_url_masks_the_refused_password():
    with pytest.raises(ConfigError) as exc:
        check_url("redis://user:secret@cache:6379/0")
    assert "secret" not in str(exc.value)
    assert "***" in str(exc.value)


# ---------------------------------------------------------------------------------------- open_storage
def test_open_sqlite_storage_round_trip(tmp_path):
    db = tmp_path / "regsweep.db"
    url = f"sqlite:///{db}"
    storage = open_storage(url)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == HEARTBEAT_INTERVAL
    assert storage.grace_period == GRACE_PERIOD
    assert isinstance(storage.get_heartbeat_stale_trial_callback(), optuna.storages.RetryHeartbeatStaleTrialCallback)
    optuna.create_study(storage=storage, study_name="s")
    assert db.is_file()

    # ask/tell outside Study.optimize: without heartbeats (Optuna warns about heartbeats there)
    study = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat=False))
    study.enqueue_trial({"x": 0.25})
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    study.tell(trial, trial.params["x"] * 2)

    again = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat=False))
    assert [t.value for t in again.trials] == [0.5]
    assert again.trials[0].params == {"x": 0.25}


def test_open_without_heartbeat(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat=False)
    assert storage.get_heartbeat_interval() is None


def test_sqlite_in_missing_directory_is_a_config_error(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(ConfigError) as exc:
        open_storage(f"sqlite:///{missing / 'regsweep.db'}")
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(missing) in msg and "does not exist" in msg
    assert not missing.exists()  # nothing created


def test_open_refuses_unknown_scheme():
    with pytest.raises(ConfigError) as exc:
        open_storage("redis://x")
    assert "'redis://x' is not allowed" in str(exc.value)


def test_sqlite_storage_uses_wal_journal(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'w.db'}")
    import optuna

    optuna.create_study(storage=storage, study_name="w")
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
