"""README "Your own dataset", run as written: its files are written into a temporary directory (each code
block whose first line is ``# FILE``) and its ``regsweep`` commands run there through the console script."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.procs

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_your_own_dataset_section_runs_as_written(tmp_path):
    blocks = re.findall(r"```(\w+)\n(.*?)```", section("Your own dataset"), flags=re.S)
    files = {b.splitlines()[0][2:].strip(): b for lang, b in blocks if lang in ("python", "yaml")}
    assert set(files) == {"mydata.py", "mydata.yaml"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    commands = [line for lang, b in blocks if lang == "bash" for line in b.splitlines() if line.startswith("regsweep")]
    assert commands
    exe = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{exe}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONDONTWRITEBYTECODE": "1"}
    for command in commands:
        res = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    hist = json.loads((tmp_path / "runs" / "mydata" / "history.json").read_text())
    assert len(hist["epochs"]) == 2 and hist["stop_reason"] == "completed"
    assert "residency: device" in (tmp_path / "runs" / "mydata" / "config.yaml").read_text()
