"""Seed-robust selection (the read side): the sibling study ``<name>.confirm`` that ``confirm: {top_k, seeds}``
fills (search/backends/optuna_backend.py ``run_confirm``), its mean ± sd per configuration, and which trial
``export`` writes by default.

A confirm trial retrains one of the main study's top K configurations (by objective value, distinct params) with
another ``train.seed``; it carries the user attrs ``confirm_of`` (the original trial's number) and ``train.seed``.
Mean and sd are computed on read, over the COMPLETE confirm trials of each configuration (the new seeds only:
the original trial's value was selected for being good, so it would bias its own configuration's mean).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from typing import Any, Optional

SUFFIX = ".confirm"
OF_ATTR, SEED_ATTR = "confirm_of", "train.seed"


def confirm_name(study_name: str) -> str:
    return study_name + SUFFIX


def confirm_seeds(own_seed: int, n: int) -> list[int]:
    """``n`` training seeds derived from the configuration's own ``train.seed`` (so from the spec), none equal to
    it: 31-bit SHA-256 values of ("regsweep-confirm", own seed, i)."""
    seeds: list[int] = []
    i = 0
    while len(seeds) < n:
        digest = hashlib.sha256(f"regsweep-confirm:{own_seed}:{i}".encode()).digest()
        seed = int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
        if seed != own_seed and seed not in seeds:
            seeds.append(seed)
        i += 1
    return seeds


def config_key(trial) -> str:
    from regsweep.search.record import BASE_ATTR

    return "base" if trial.user_attrs.get(BASE_ATTR) else json.dumps(dict(trial.params), sort_keys=True, default=str)


def top_configs(study, k: int) -> list:
    """The study's ``k`` best COMPLETE trials with distinct configurations, best first (by the first objective
    in a multi-objective study: a warm start from one)."""
    from optuna.trial import TrialState

    from regsweep.search.record import first_value, minimizes

    sign = 1 if minimizes(study) else -1
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if first_value(t) is not None]
    done.sort(key=lambda t: (sign * first_value(t), t.number))
    out, seen = [], set()
    for t in done:
        key = config_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out[:k]


def confirm_study(study):
    """The sibling confirm study in the same storage, or None."""
    import optuna

    from regsweep.search.optuna_internals import study_storage

    storage = study_storage(study)
    if confirm_name(study.study_name) not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=confirm_name(study.study_name), storage=storage)


def table(study) -> list[dict[str, Any]]:
    """One row per confirmed configuration, best mean first: trial (the original), value (its own), n, mean, sd
    (sample sd; 0.0 for one seed), seeds. Empty when there is no confirm study or no COMPLETE confirm trial."""
    from optuna.trial import TrialState

    sibling = confirm_study(study)
    if sibling is None:
        return []
    values: dict[int, list[tuple[int, float]]] = {}
    for t in sibling.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get(OF_ATTR) is not None and t.value is not None:
            values.setdefault(int(t.user_attrs[OF_ATTR]), []).append((t.user_attrs.get(SEED_ATTR), t.value))
    rows = []
    for number, got in values.items():
        vals = [v for _, v in got]
        original = study.trials[number].value if number < len(study.trials) else None
        rows.append({"trial": number, "value": original, "n": len(vals), "mean": statistics.fmean(vals),
                     "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "seeds": sorted(s for s, _ in got)})
    sign = 1 if study.direction.name == "MINIMIZE" else -1
    rows.sort(key=lambda r: (sign * r["mean"], r["trial"]))
    return rows


def best_mean(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    return rows[0] if rows else None


def row_text(row: dict[str, Any], metric: str) -> str:
    own = "-" if row["value"] is None else f"{row['value']:.4f}"
    return (f"trial {row['trial']:>3}: {metric} mean {row['mean']:.4f} ± {row['sd']:.4f} over {row['n']} new "
            f"seed(s) (own seed: {own})")


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"confirm (top {len(rows)} configurations retrained on new train.seed values, best mean first):"]
    return "\n".join(lines + ["  " + row_text(r, metric) for r in rows])
