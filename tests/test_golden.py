"""Golden fixtures made by regsweep 0.1.0 before the namespace move (tests/fixtures/golden_v0_1/) keep working:
the study resumes without --allow-spec-change, the exported YAML replays exactly, the checkpoint loads.

Every later change must keep this file green. The fixtures are never edited: each test works on a copy.
golden.db holds study `golden`: 3 trials (COMPLETE, COMPLETE, PRUNED) of study.yaml's 4-trial budget, run with
--n-trials 3 (stored as the study's n_trials); exported_trial1.yaml is trial 1's export; checkpoint.pt and
checkpoint_history.json are what `python -m models.train exported_trial1.yaml` wrote for it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from regsweep.models.config import TrainConfig
from regsweep.models.train import load_checkpoint
from regsweep.search.cli import main

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden_v0_1"
FILES = ("study.yaml", "golden.db", "exported_trial1.yaml", "checkpoint.pt", "checkpoint_history.json")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture
def golden(tmp_path):
    """A copy of the fixtures in tmp_path (the originals stay untouched) and its SQLite URL."""
    for name in FILES:
        shutil.copy2(GOLDEN / name, tmp_path / name)
    return tmp_path, f"sqlite:///{tmp_path / 'golden.db'}"


def _trials(url):
    return optuna.load_study(study_name="golden", storage=url).get_trials(deepcopy=True)


def _frozen(t) -> dict:
    """Everything a resume must leave alone in a finished trial."""
    return {"number": t.number, "state": t.state, "value": t.value, "params": t.params,
            "distributions": t.distributions, "intermediate_values": t.intermediate_values,
            "user_attrs": t.user_attrs, "system_attrs": t.system_attrs,
            "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete}


def test_the_golden_study_validates_and_resumes_without_allow_spec_change(golden, capsys):
    root, url = golden
    before = _trials(url)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert main(["validate", str(root / "study.yaml"), "--storage", url]) == 0
    assert "ok — study 'golden'" in capsys.readouterr().out
    assert _trials(url) == before  # validate writes nothing

    assert main(["run", str(root / "study.yaml"), "--storage", url, "--n-trials", "4", "--artifacts", "off"]) == 0
    after = _trials(url)
    assert len(after) == 4 and all(t.state in FINISHED for t in after)
    assert [_frozen(t) for t in after[:3]] == [_frozen(t) for t in before]
    assert set(after[3].params) == {"model.dropout", "regularization.l1", "model.bn"}  # sampled, not enqueued


def test_the_exported_trial_replays_its_recorded_value_exactly(golden, capsys):
    root, url = golden
    recorded = _trials(url)[1]
    out = root / "replay"
    assert main(["train", str(root / "exported_trial1.yaml"), "--out", str(out)]) == 0
    hist = json.loads((out / "history.json").read_text())
    assert hist["stop_reason"] == "completed"
    assert hist["split_fingerprint"] == recorded.user_attrs["split_fingerprint"]
    assert hist["best_epoch"] == max(recorded.intermediate_values, key=lambda e: -recorded.intermediate_values[e])
    # Bit-for-bit replay holds on the CPU kind that recorded the trial (docs/architecture.md, Replay); the
    # fixtures were made on another machine, and torch's CPU kernels (MKL, oneDNN) take per-CPU paths that
    # differ in the last bits (seen: an AMD EPYC AVX2 host differs from the fixture at 1.6e-7 relative in one
    # epoch). A changed meaning of any config field moves these values by far more than 1e-5.
    replayed = {e["epoch"]: e["val_loss"] for e in hist["epochs"]}
    assert replayed == pytest.approx(recorded.intermediate_values, rel=1e-5, abs=0)
    assert hist["epochs"][hist["best_epoch"]]["val_loss"] == pytest.approx(recorded.value, rel=1e-5, abs=0)


def test_the_exported_trial_replays_bit_for_bit_on_this_machine(golden):
    """The same export trained twice here: identical histories, bit for bit (the Replay contract on one CPU)."""
    root, _ = golden
    runs = []
    for name in ("a", "b"):
        assert main(["train", str(root / "exported_trial1.yaml"), "--out", str(root / name)]) == 0
        runs.append([e["val_loss"] for e in json.loads((root / name / "history.json").read_text())["epochs"]])
    assert runs[0] == runs[1]


def test_the_checkpoint_loads_with_weights_only_and_keeps_its_history(golden):
    root, _ = golden
    model, cfg = load_checkpoint(root / "checkpoint.pt")  # torch.load(..., weights_only=True) inside
    assert cfg.to_dict() == TrainConfig.load(root / "exported_trial1.yaml").to_dict()
    payload = torch.load(root / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert payload["history"] == json.loads((root / "checkpoint_history.json").read_text())
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, *payload["in_shape"]))
    assert logits.shape == (2, payload["num_classes"]) and torch.isfinite(logits).all()
