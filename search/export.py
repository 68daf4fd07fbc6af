"""Export a trial's configuration as a file the plain training code reproduces.

- ``yaml``: the complete TrainConfig (``regsweep train best.yaml`` / ``regsweep.models.build``), provenance as a
  comment header, so the file stays one plain TrainConfig.
- ``json``: ``{"config": {...}, "provenance": {...}}``.
- ``params``: the trial's sampled params, flat dotted paths (what ``TrainConfig.with_overrides`` takes).
- ``python``: a standalone PyTorch script that trains the trial again without regsweep, generated from the
  regsweep.models source the trial ran (``regsweep.models.script``), the config inlined as ``CONFIG``.
- ``snippet``: the lines to paste into an existing training loop, on ``regsweep.models``' public API.

``train.num_threads`` is set to the threads the trial actually ran with, so a CPU replay gives the same
per-epoch metrics.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional

from regsweep import __version__ as regsweep_version
from regsweep.models.config import ConfigError, TrainConfig, dump_yaml
from regsweep.search.record import CODE_DIR_ATTR, is_multi

FORMATS = ("yaml", "json", "params", "python", "snippet")


def pick_trial(study, number: Optional[int]):
    """The best trial (with a confirm study, search/confirm.py: the original trial of the configuration with the
    best mean over the new seeds, so replay stays exact), or trial ``number``: one trial read (never every
    trial's attrs) on an RDB storage."""
    from optuna.trial import TrialState

    from regsweep.search import optuna_internals as internals

    counts = internals.state_counts(study)
    if counts is None:  # not an RDB storage: count by reading the trials
        counts = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    if number is None:
        if not counts.get(TrialState.COMPLETE.name):
            raise ConfigError(f"study '{study.study_name}' has no COMPLETE trial yet; pass --trial N")
        if is_multi(study):  # a Pareto front, no best trial: the user chooses (the CLI lists the front first)
            from regsweep.search.report import objective_names, pareto_front

            front = sorted(t.number for t in pareto_front(study))
            raise ConfigError(f"--trial: missing; study '{study.study_name}' has {len(study.directions)} objectives "
                              f"({', '.join(objective_names(study))}) and no single best trial; pass --trial N with "
                              f"N one of its Pareto front: {', '.join(map(str, front[:20]))}"
                              + (f" (and {len(front) - 20} more)" if len(front) > 20 else ""))
        from regsweep.search.confirm import best_mean, table

        row = best_mean(table(study))  # seed-robust selection: the best-mean configuration's ORIGINAL trial
        return study.best_trial if row is None else internals.trial_by_number(study, row["trial"])
    n_trials = sum(counts.values())
    if not n_trials:
        raise ConfigError(f"--trial: study '{study.study_name}' has no trials yet")
    trial = internals.trial_by_number(study, number) if 0 <= number < n_trials else None
    if trial is None:
        raise ConfigError(f"--trial: {number} is not a trial of study '{study.study_name}' "
                          f"(trials 0..{n_trials - 1})")
    return trial


def trial_config(trial) -> TrainConfig:
    cfg = trial.user_attrs.get("config")
    if cfg is None:
        raise ConfigError(f"trial {trial.number} has no recorded config (it failed before training: "
                          f"{trial.user_attrs.get('stop_reason', 'unknown')})")
    cfg = TrainConfig.from_dict(cfg)
    threads = trial.user_attrs.get("num_threads")
    if cfg.train.num_threads is None and threads:
        cfg = cfg.with_overrides({"train.num_threads": threads})
    return cfg


def provenance(study, trial, storage_masked: str, state: Optional[str] = None,
               value: Optional[float] = None) -> dict[str, Any]:
    """``state``/``value`` stand in for a live trial's (the artifact written just before it is told)."""
    a = trial.user_attrs
    device = str(a.get("device", ""))
    extra: dict[str, Any] = {}
    if is_multi(study):  # value: the first objective's; values: every objective's, by name
        from regsweep.search.report import objective_names

        values = value if state else trial.values
        extra["values"] = None if values is None else dict(zip(objective_names(study), values))
        value, state_value = (None if not values else values[0]), True
    else:
        state_value = bool(state)
    return {
        "study": study.study_name, "trial": trial.number, "state": state or trial.state.name,
        "objective": study.user_attrs.get("regsweep:objective"), "value": value if state_value else trial.value,
        **extra,
        "best_epoch": a.get("best_epoch"), "stop_reason": a.get("stop_reason"), "storage": storage_masked,
        "torch_version": a.get("torch_version"), "regsweep_version": regsweep_version,
        "device_type": device.split(":")[0] or None, "num_threads": a.get("num_threads"),
        "split_fingerprint": a.get("split_fingerprint"), "params": dict(trial.params),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **fused_provenance(study, trial),
    }


def fused_provenance(study, trial) -> dict[str, Any]:
    """A fused trial's group and its solo replay reference (search/replay.py): what ``regsweep train`` on this
    export reproduces exactly (the recorded fused history may differ from it in the last bits); {} unfused."""
    from regsweep.search.record import FUSED_ATTR, replay_key, replay_reference

    group = trial.user_attrs.get(FUSED_ATTR)
    if group is None:
        return {}
    ref = replay_reference(study.user_attrs, trial.number)
    if ref is None:
        return {"fused": group, "replay_reference": None}
    shown = {k: ref.get(k) for k in ("value", "best_epoch", "history_len", "stop_reason", "device", "num_threads",
                                     "torch_version")}
    return {"fused": group, "replay_reference": {"study_attr": replay_key(trial.number), **shown}}


def render(study, trial, fmt: str, storage_masked: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not allowed; choose one of: {', '.join(FORMATS)}")
    if fmt == "params":
        return json.dumps(dict(trial.params), indent=2, sort_keys=True) + "\n"
    cfg = trial_config(trial)
    prov = provenance(study, trial, storage_masked)
    if fmt in ("python", "snippet"):
        return code(cfg, trial, prov, fmt)
    if fmt == "json":
        return json.dumps({"config": cfg.to_dict(), "provenance": prov}, indent=2) + "\n"
    return config_yaml(cfg, prov)


def config_yaml(cfg: TrainConfig, prov: dict[str, Any]) -> str:
    """The YAML export: provenance as a comment header, then the plain TrainConfig."""
    header = "".join(f"# {line}\n" for line in dump_yaml({"provenance": prov}).splitlines())
    title = "# regsweep export: a complete TrainConfig. Train it with: regsweep train THIS_FILE\n"
    return title + header + cfg.to_yaml()


def code_header(prov: dict[str, Any], fmt: str) -> list[str]:
    """Where the exported code comes from: study, trial, its value, what was recorded."""
    value = prov["value"]
    shown = f"{value:.6g}" if isinstance(value, float) else str(value)
    lines = [
        f"Trial {prov['trial']} of study '{prov['study']}', exported by `regsweep export --format {fmt}` "
        f"(regsweep {prov['regsweep_version']}).",
        f"Storage {prov['storage']}; trial {prov['trial']} ({prov['state']}, {prov['stop_reason']}): "
        f"{prov['objective']} {shown} at epoch {prov['best_epoch']}.",
        f"Recorded: torch {prov['torch_version']}, device {prov['device_type']}, {prov['num_threads']} thread(s), "
        f"split fingerprint {prov['split_fingerprint']}; exported {prov['exported_at']}.",
    ]
    if fmt == "python":
        lines += [
            "Generated from the regsweep.models source the trial ran (inspect.getsource, see "
            "regsweep.models.script); it does not import regsweep.",
            "Run: python THIS_FILE [--device cpu] [--save weights.pt]: one JSON line per epoch, then a summary "
            "line.",
            "On the CPU, with the same torch version and train.num_threads, it reproduces the trial's per-epoch "
            "metrics exactly.",
            "Edit CONFIG to train a variant: it is the whole TrainConfig.",
        ]
    return lines


def code(cfg: TrainConfig, trial, prov: dict[str, Any], fmt: str) -> str:
    """The ``python`` script or the ``snippet`` for the trial's config (regsweep.models.script)."""
    from regsweep.models.script import render_script, render_snippet, value_origins

    header = code_header(prov, fmt)
    if fmt == "snippet":
        return render_snippet(cfg, header)
    filled = {}
    if trial.user_attrs.get("config", {}).get("train", {}).get("num_threads") is None:
        filled["train.num_threads"] = f"the threads trial {trial.number} ran with (recorded)"
    code_dir = trial.user_attrs.get(CODE_DIR_ATTR)  # the spec's folder, for a model or dataset by import path
    return render_script(cfg, header, value_origins(cfg, dict(trial.params), trial.number, filled),
                         regsweep_version, code_dirs=[code_dir] if isinstance(code_dir, str) else [])
