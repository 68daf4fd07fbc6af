"""`regsweep dashboard` (optuna-dashboard on the study storage) in a real headless Chromium, the artifact route,
and the study note only the run's coordinator writes."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from regsweep.search.artifacts import trial_artifacts
from regsweep.search.cli import main
from regsweep.search.dashboard import is_loopback, note_body, read_note

ROOT = Path(__file__).resolve().parents[2]


class Dashboard:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", "dashboard", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"http://(\S+?)/dashboard/", line)
        if m is None:
            self.proc.kill()
            raise AssertionError(f"no URL in {line!r}; stderr: {self.proc.stderr.read()}")
        self.base = f"http://{m.group(1)}"
        self.banner = line

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return r.read()

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture(scope="module")
def dashboard(swept_study):
    _, url, _ = swept_study
    d = Dashboard("--storage", url, "--port", "0")
    yield d
    d.stop()


def _study_id(d: Dashboard, name: str) -> int:
    studies = json.loads(d.get("/api/studies"))["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


def test_api_lists_the_study(dashboard, swept_study):
    studies = json.loads(dashboard.get("/api/studies"))["study_summaries"]
    assert [s["study_name"] for s in studies] == ["swept"]
    assert "127.0.0.1" in dashboard.base and "artifacts:" in dashboard.banner


def test_chromium_renders_the_study_and_its_trials(dashboard, swept_study, chromium, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    sid = _study_id(dashboard, "swept")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromium[1]), options=opts)
    try:
        driver.get(f"{dashboard.base}/dashboard/studies/{sid}")
        WebDriverWait(driver, 60).until(lambda d: "swept" in d.find_element("tag name", "body").text)
        driver.get(f"{dashboard.base}/dashboard/studies/{sid}/trials")
        WebDriverWait(driver, 60).until(lambda d: "Trial 4" in d.find_element("tag name", "body").text)
        text = driver.find_element("tag name", "body").text
        assert "swept" in text
        assert all(f"Trial {n}" in text for n in range(5))
        shot = Path(os.environ.get("REGSWEEP_SCREENSHOT_DIR", tmp_path)) / "dashboard.png"
        driver.get(f"{dashboard.base}/dashboard/studies/{sid}")
        WebDriverWait(driver, 60).until(lambda d: "swept" in d.find_element("tag name", "body").text)
        time.sleep(1.0)  # let the plots draw
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()


def test_a_trial_artifact_downloads_through_the_dashboard(dashboard, swept_study):
    _, url, art_dir = swept_study
    study = optuna.load_study(study_name="swept", storage=url)
    trial = study.trials[1]
    sid = _study_id(dashboard, "swept")
    for meta in trial_artifacts(study, trial):
        body = dashboard.get(f"/artifacts/{sid}/{trial._trial_id}/{meta['artifact_id']}")
        assert body == (art_dir / meta["artifact_id"]).read_bytes()
        assert len(body) > 100


def test_the_coordinator_writes_the_study_note(swept_study):
    _, url, _ = swept_study
    study = optuna.load_study(study_name="swept", storage=url)
    note = read_note(study)
    best = study.best_trial
    assert note.startswith("# swept\n") and "model.dropout" in note and "tpe" in note
    assert f"Trial **{best.number}**" in note and "states: COMPLETE" in note


def test_workers_never_write_the_note(swept_study, tmp_path):
    from regsweep.search.loop import worker_main
    from regsweep.search.spec import load_spec

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(swept_study[0].read_text().replace("epochs: 4", "epochs: 1")
                         .replace("n_trials: 5", "n_trials: 1")
                         .replace("enqueue: [{}, {model.dropout: 0.0, regularization.l2: 1.0e-6}, "
                                  "{model.dropout: 0.5, regularization.l2: 1.0e-2}]", "enqueue: [{}]"))
    url = f"sqlite:///{tmp_path / 'w.db'}"
    assert worker_main(load_spec(spec_file), url, "swept") == 0
    study = optuna.load_study(study_name="swept", storage=url)
    assert len(study.trials) == 1 and read_note(study) == ""
    assert "Trial **0**" in note_body(study, load_spec(spec_file))  # what a coordinator would write


def test_binding_beyond_loopback_warns(swept_study):
    _, url, _ = swept_study
    d = Dashboard("--storage", url, "--host", "0.0.0.0", "--port", "0")
    try:
        assert json.loads(d.get("/api/studies"))["study_summaries"]
    finally:
        err = d.stop()
    assert "warning: the dashboard is bound to 0.0.0.0" in err and "no authentication" in err


def test_a_port_in_use_is_one_line_exit_2(swept_study, capsys):
    _, url, _ = swept_study
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["dashboard", "--storage", url, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host/--port: cannot listen on 127.0.0.1:") and "\n" not in err


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
