"""Text summaries of studies: counts per state, best value and params, stop reasons."""

from __future__ import annotations

from collections import Counter
from typing import Any


def stop_reason_kind(reason: str | None) -> str:
    """'pruned:median@3' -> 'pruned:median'; 'failed:RuntimeError: x' -> 'failed:RuntimeError'."""
    if not reason:
        return "(none)"
    reason = reason.split("@", 1)[0]
    if reason.startswith("failed:"):
        return "failed:" + reason[len("failed:"):].split(":", 1)[0].strip()
    return reason


def study_summary(study) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    reasons = Counter(stop_reason_kind(t.user_attrs.get("stop_reason")) for t in trials
                      if t.state != TrialState.RUNNING and t.state != TrialState.WAITING)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return {"name": study.study_name, "direction": study.direction.name.lower(),
            "objective": study.user_attrs.get("regsweep:objective", "value"), "n_trials": len(trials),
            "states": dict(states), "stop_reasons": dict(reasons),
            "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                               "best_epoch": best.user_attrs.get("best_epoch"),
                                               "test_acc": best.user_attrs.get("test_acc")}}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"study {s['name']}: {s['n_trials']} trials ({s['direction']} {s['objective']})",
             "  states: " + (", ".join(f"{k} {v}" for k, v in sorted(s["states"].items())) or "none"),
             "  stop reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items())) or "none")]
    b = s["best"]
    if b is None:
        lines.append("  best: no COMPLETE trial yet")
    else:
        lines.append(f"  best: trial {b['number']} {s['objective']}={b['value']:.4f} at epoch {b['best_epoch']}")
        for k, v in sorted(b["params"].items()):
            lines.append(f"    {k}: {v:.4g}" if isinstance(v, float) else f"    {k}: {v}")
        if not b["params"]:
            lines.append("    (the base config, no params)")
    return "\n".join(lines)
