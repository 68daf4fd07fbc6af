"""The solo replay reference of a fused trial (issue 20; the Replay contract in docs/architecture.md).

A fused trial trained in ``vmap`` mode (the default on an accelerator) is not bit-identical to a solo run of its
config, so its recorded history is not what ``regsweep train`` on its export gives. The coordinator (``regsweep
run``, after the budget) trains the study's best trial ALONE once when it was fused, and ``export --trial N`` does
the same for the fused trial it exports; that solo history is recorded as the trial's replay reference. Optuna
cannot set attrs on a finished trial through its public API, so the reference lives in study user attrs
(record.py ``replay_key``): ``regsweep:replay:<number>`` (its summary) and ``regsweep:replay:<number>:history:NNNNN``
(its per-epoch records in format-2 chunks, read by ``record.replay_reference``). The chunks are written first and
the summary last, so a reader never sees a summary without its records. On the CPU fused trials train in ``loop``
mode, which is bit-identical: the reference then equals the recorded history (tested).
"""

from __future__ import annotations

from typing import Any, Optional

from regsweep.models.train import fit
from regsweep.search.export import trial_config
from regsweep.search.record import (
    FUSED_ATTR,
    Objective,
    best_epoch,
    chunk_attrs,
    minimizes,
    replay_key,
    replay_reference,
)
from regsweep.search.storage import retry_transient


def needs_reference(study, trial) -> bool:
    """Whether ``trial`` was trained fused and has no replay reference yet."""
    return trial.user_attrs.get(FUSED_ATTR) is not None and replay_reference(study.user_attrs, trial.number) is None


def record_reference(study, trial, device: Optional[str] = None) -> dict[str, Any]:
    """Train ``trial``'s exported config alone (``fit``, the config's threads) and record the history as its
    replay reference; returns the reference (``record.replay_reference``'s form)."""
    cfg = trial_config(trial)
    hist = fit(cfg, device)
    records = [dict(r) for r in hist.epochs]
    metric = study.user_attrs.get("regsweep:objective") or "val_loss"
    objective = Objective(metric, "minimize" if minimizes(study) else "maximize")
    best = best_epoch(records, objective)
    key = replay_key(trial.number)
    for name, chunk in chunk_attrs(records).items():
        retry_transient(study.set_user_attr, f"{key}:{name}", chunk)
    head = {"trial": trial.number, "history_len": len(records), "best_epoch": best,
            "value": None if best is None else records[best].get(metric), "stop_reason": hist.stop_reason,
            "device": hist.device, "num_threads": hist.num_threads, "torch_version": hist.torch_version,
            "split_fingerprint": hist.split_fingerprint, FUSED_ATTR: trial.user_attrs.get(FUSED_ATTR)}
    retry_transient(study.set_user_attr, key, head)  # last: a reader sees the summary only with its records
    return replay_reference(study.user_attrs, trial.number) or {**head, "history": records}
