"""Study summaries: the text one of `status`/`run` (counts per state, best value and params, stop reasons) and
the static HTML report of `regsweep report` (Optuna's matplotlib plots, curves of the top trials, outcomes)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from regsweep.search import optuna_internals as internals
from regsweep.search.record import EPOCH_KEY_PATTERNS, first_value, history, is_multi, minimizes


def stop_reason_kind(reason: str | None) -> str:
    """'pruned:median@3' -> 'pruned:median'; 'failed:RuntimeError: x' -> 'failed:RuntimeError';
    'failed:stale heartbeat (worker h:1)' -> 'failed:stale heartbeat'."""
    if not reason:
        return "(none)"
    reason = reason.split("@", 1)[0]
    if reason.startswith("failed:"):
        return "failed:" + reason[len("failed:"):].split(" (", 1)[0].split(":", 1)[0].strip()
    return reason


def without_epochs(study):
    """The same study, read through a storage that leaves every trial's per-epoch records (both record
    formats) out of its bulk trial reads, read once (a snapshot): for readers of many trials that do not show
    curves. A single trial (``get_trial``, ``best_trial``) stays whole; on a non-RDB storage: ``study``."""
    import optuna

    storage = internals.leaving_out(internals.study_storage(study), EPOCH_KEY_PATTERNS, snapshot=True)
    if storage is internals.study_storage(study):
        return study
    return optuna.load_study(study_name=study.study_name, storage=storage, sampler=study.sampler,
                             pruner=study.pruner)


def study_summary(study) -> dict[str, Any]:
    """Counts per state and stop reason, and the best trial: by GROUP BY queries and one trial read on an RDB
    storage (never every trial's attrs), by reading the trials elsewhere."""
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    states = internals.state_counts(study)
    raw = internals.user_attr_counts(study, "stop_reason", finished) if states is not None else None
    if states is None or raw is None:
        trials = study.get_trials(deepcopy=False)
        states = dict(Counter(t.state.name for t in trials))
        reasons = Counter(stop_reason_kind(t.user_attrs.get("stop_reason")) for t in trials
                          if t.state in finished)
    else:
        reasons = Counter()
        for reason, n in raw.items():
            reasons[stop_reason_kind(reason)] += n
        unrecorded = sum(states.get(s.name, 0) for s in finished) - sum(raw.values())
        if unrecorded > 0:
            reasons[stop_reason_kind(None)] += unrecorded
    summary = {"name": study.study_name, "direction": study.directions[0].name.lower(),
               "budget": study.user_attrs.get("regsweep:n_trials"),
               "objective": study.user_attrs.get("regsweep:objective", "value"), "n_trials": sum(states.values()),
               "states": dict(states), "stop_reasons": dict(reasons), "best": None, "front": None}
    if is_multi(study):  # no best trial: the Pareto front (Optuna's best_trials), by the first objective
        summary["objectives"] = objective_names(study)
        summary["directions"] = [d.name.lower() for d in study.directions]
        summary["front"] = [] if not states.get("COMPLETE") else [
            trial_row(t) for t in sorted(pareto_front(study), key=lambda t: (summary_key(study, t), t.number))]
        return summary
    best = study.best_trial if states.get("COMPLETE") else None
    summary["best"] = None if best is None else trial_row(best)
    return summary


def trial_row(t) -> dict[str, Any]:
    """What summaries show of one trial: number, value (the first objective's), values, params, best epoch."""
    return {"number": t.number, "value": first_value(t), "values": list(t.values or []), "params": t.params,
            "best_epoch": t.user_attrs.get("best_epoch"), "test_acc": t.user_attrs.get("test_acc")}


def objective_names(study) -> list[str]:
    """The names of a study's trial values, in order (the ``regsweep:objectives`` attr of a multi-objective
    study; else its one objective)."""
    names = study.user_attrs.get("regsweep:objectives")
    if isinstance(names, list) and len(names) == len(study.directions):
        return [str(n) for n in names]
    first = study.user_attrs.get("regsweep:objective", "value")
    return [first] + [f"value{i}" for i in range(1, len(study.directions))]


def pareto_front(study) -> list:
    """The COMPLETE trials no other COMPLETE trial dominates (``study.best_trials``; read without per-epoch
    records on an RDB storage)."""
    return list(without_epochs(study).best_trials)


def summary_key(study, t) -> float:
    """Sort key: the first objective, best first."""
    return (1 if minimizes(study) else -1) * first_value(t)


def values_text(names: list[str], values: list[float]) -> str:
    return " ".join(f"{n}={v:.4g}" for n, v in zip(names, values))


def value_text(v: Any) -> str:
    """A param value as summaries print it: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def objectives_text(s: dict[str, Any]) -> str:
    """'minimize val_loss' or, for several objectives, 'minimize val_loss, minimize overfit_gap'."""
    if s.get("front") is None:
        return f"{s['direction']} {s['objective']}"
    return ", ".join(f"{d} {n}" for d, n in zip(s["directions"], s["objectives"]))


def front_lines(s: dict[str, Any], indent: str = "  ") -> list[str]:
    """The Pareto front of a multi-objective summary, one trial a line, best first objective first."""
    front = s["front"]
    if not front:
        return [f"{indent}Pareto front: no COMPLETE trial yet"]
    lines = [f"{indent}Pareto front ({len(front)} trial(s); no single best: export one with --trial N):"]
    for row in front:
        params = ", ".join(f"{k}={value_text(v)}" for k, v in sorted(row["params"].items())) or "(base config)"
        lines.append(f"{indent}  trial {row['number']:>3}: {values_text(s['objectives'], row['values'])} "
                     f"at epoch {row['best_epoch']}; {params}")
    return lines


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"study {s['name']}: {s['n_trials']} trials ({objectives_text(s)})",
             "  states: " + (", ".join(f"{k} {v}" for k, v in sorted(s["states"].items())) or "none"),
             "  stop reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items())) or "none")]
    if s.get("front") is not None:
        return "\n".join(lines + front_lines(s))
    b = s["best"]
    if b is None:
        lines.append("  best: no COMPLETE trial yet")
    else:
        lines.append(f"  best: trial {b['number']} {s['objective']}={b['value']:.4f} at epoch {b['best_epoch']}")
        for k, v in sorted(b["params"].items()):
            lines.append(f"    {k}: {value_text(v)}")
        if not b["params"]:
            lines.append("    (the base config, no params)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ HTML report
TOP_CURVES = 4


def _trial_kind(t) -> str:
    """complete | stopped (COMPLETE but ended early by itself) | pruned | failed | running | waiting."""
    reason = t.user_attrs.get("stop_reason") or ""
    if t.state.name == "COMPLETE":
        return "stopped" if reason.startswith(("early_stopped", "stopped:")) else "complete"
    return {"PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}[t.state.name]


def _save_axes(ax, path, size=(8, 4.5)) -> None:
    fig = ax.figure if not hasattr(ax, "__len__") else ax.flat[0].figure
    fig.set_size_inches(*size)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)


# The importance evaluator the report uses, named in its title: Optuna's default since 4.x, PED-ANOVA, passed
# explicitly (the default may change again). It compares the top TARGET_QUANTILE of the COMPLETE trials with all
# of them, so below MIN_IMPORTANCE_TRIALS the top set holds a single trial and the bars say nothing.
IMPORTANCE_NAME = "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator)"
TARGET_QUANTILE = 0.1
MIN_IMPORTANCE_TRIALS = int(1 / TARGET_QUANTILE) + 1  # ceil(0.1 * n) >= 2 from n = 11


def importance_evaluator():
    from optuna.importance import PedAnovaImportanceEvaluator

    return PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE)


def importance_note(n_complete: int) -> str:
    """What the report says about the importances of a study with ``n_complete`` COMPLETE trials ("" = enough)."""
    if n_complete >= MIN_IMPORTANCE_TRIALS:
        return ""
    return (f"too few trials for importances: {n_complete} COMPLETE trial(s); PED-ANOVA compares the top "
            f"{TARGET_QUANTILE:.0%} of them with all, which needs at least {MIN_IMPORTANCE_TRIALS}")


def _optuna_plots(study, out, n_complete: int) -> list[tuple[str, str, str]]:
    """(file, title, note) of Optuna's matplotlib plots; a plot that cannot be drawn says why, and the
    importances say which evaluator drew them and when there are too few trials for them."""
    import functools
    import warnings

    import optuna
    import optuna.visualization.matplotlib as ovm

    target: dict[str, Any] = {}
    plots, done = [], []
    if is_multi(study):  # Optuna's one-objective plots need a target: the first objective's value
        names = objective_names(study)
        target = {"target": first_value, "target_name": names[0]}
        front = functools.partial(ovm.plot_pareto_front, target_names=names[:3]) if len(names) <= 3 else None
        if front is not None:
            plots.append(("pareto.png", f"Pareto front ({', '.join(names)}; red: the front)", front, (8, 5.5)))
        else:
            done.append(("", "Pareto front", f"not drawn: {len(names)} objectives (the plot takes 2 or 3); the "
                         "table above lists the front"))
    importances = functools.partial(ovm.plot_param_importances, evaluator=importance_evaluator(), **target)
    plots += [("history.png", "Optimisation history" + (f" ({target['target_name']})" if target else ""),
               functools.partial(ovm.plot_optimization_history, **target), (8, 4.5)),
              ("importances.png", f"Parameter importances ({IMPORTANCE_NAME})", importances, (8, 4.5)),
              ("parallel.png", "Parallel coordinates", functools.partial(ovm.plot_parallel_coordinate, **target),
               (13, 5.5))]
    for file, title, fn, size in plots:
        note = importance_note(n_complete) if file == "importances.png" else ""
        if note and n_complete < 2:  # nothing to compare: Optuna would draw equal bars
            done.append(("", title, f"not drawn: {note}"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                ax = fn(study)
            _save_axes(ax, out / file, size)
            done.append((file, title, note))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances need 2+ trials with params
            done.append(("", title, f"not drawn: {exc}"))
    return done


def _curves_plot(trials, objective: str, path) -> None:
    from regsweep.search.plots import draw_curves, new_figure

    fig = new_figure(10, 2.6 * len(trials))
    axes = fig.subplots(len(trials), 2, squeeze=False)
    for i, (row, t) in enumerate(zip(axes, trials)):
        draw_curves(row[0], row[1], history(t), t.user_attrs.get("best_epoch"), legend=i == 0)
        row[0].set_title(f"trial {t.number}: {objective}={first_value(t):.4g} ({t.user_attrs.get('stop_reason', '')})",
                         fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _bars_plot(counts: dict[str, int], title: str, path, colors: dict[str, str] | None = None) -> None:
    from regsweep.search.plots import new_figure

    items = sorted(counts.items(), key=lambda kv: -kv[1])
    fig = new_figure(8, 0.45 * len(items) + 1.2)
    ax = fig.subplots()
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1],
            color=[(colors or {}).get(k, "#1f77b4") for k, _ in items][::-1])
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("trials")
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_report(study, out, storage_masked: str) -> Path:
    """``out/index.html`` and its PNGs; only local, relative references. Built in a sibling temporary
    directory and moved in file by file, so a failure leaves the previous report as it was."""
    import html
    import os
    import shutil
    import tempfile

    import matplotlib

    matplotlib.use("Agg")  # Optuna's plots use pyplot: never a display
    from regsweep.models.config import ConfigError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a directory")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: directory {out.parent} does not exist")
    study = without_epochs(study)  # every trial but its per-epoch records; the curves read their own trials
    trials = study.get_trials(deepcopy=False)
    if not trials:
        raise ConfigError(f"study '{study.study_name}' has no trials yet; nothing to report")
    s = study_summary(study)
    sign = 1 if s["direction"] == "minimize" else -1
    complete = sorted((t for t in trials if t.state.name == "COMPLETE" and first_value(t) is not None),
                      key=lambda t: sign * first_value(t))  # by the first objective in a multi-objective study
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        sections = []
        for file, title, note in _optuna_plots(study, tmp, len(complete)):
            sections.append((title, file, note))
        if complete:
            top = [internals.frozen_trial(study, internals.trial_id(t)) for t in complete[:TOP_CURVES]]
            _curves_plot(top, s["objective"], tmp / "curves.png")
            sections.append((f"Train vs validation, top {min(TOP_CURVES, len(complete))} trials "
                             "(gap shaded; dotted line: best epoch)", "curves.png", ""))
        else:
            sections.append(("Train vs validation curves", "", "not drawn: no COMPLETE trial yet"))
        _bars_plot(Counter(_trial_kind(t) for t in trials),
                   "Trials: complete, stopped early by themselves, pruned, failed", tmp / "states.png",
                   {"complete": "#2ca02c", "stopped": "#17becf", "pruned": "#ff7f0e", "failed": "#d62728"})
        sections.append(("Trial outcomes", "states.png", ""))
        _bars_plot(s["stop_reasons"], "Stop reasons", tmp / "stop_reasons.png")
        sections.append(("Stop reasons", "stop_reasons.png", ""))
        (tmp / "index.html").write_text(_html(study, s, complete, sections, storage_masked, html.escape),
                                        encoding="utf-8")
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _front_table(s: dict[str, Any], esc) -> str:
    """A multi-objective study's Pareto front as an HTML table ("" for a single objective)."""
    if s.get("front") is None:
        return ""
    if not s["front"]:
        return "<h2>Pareto front</h2><p>No COMPLETE trial yet.</p>"
    head = "".join(f"<th>{esc(n)} ({esc(d)})</th>" for n, d in zip(s["objectives"], s["directions"]))
    rows = []
    for row in s["front"]:
        params = ", ".join(f"{k}={value_text(v)}" for k, v in sorted(row["params"].items())) or "(base config)"
        cells = "".join(f"<td>{v:.5g}</td>" for v in row["values"])
        rows.append(f"<tr><td>{row['number']}</td>{cells}<td>{row['best_epoch']}</td><td>{esc(params)}</td></tr>")
    return (f"<h2>Pareto front ({len(s['front'])} trial(s))</h2><p>No trial is better on every objective than "
            "these; values at the epoch best for the first objective. Export one with <code>regsweep export "
            "--trial N</code>.</p><table class=\"front\"><tr><th>trial</th>" + head
            + "<th>best epoch</th><th>params</th></tr>" + "".join(rows) + "</table>")


def _html(study, s, complete, sections, storage_masked, esc) -> str:
    rows = []
    for t in complete[:10]:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(t.params.items()))
        test = t.user_attrs.get("test_acc")
        value = " / ".join(f"{v:.5g}" for v in t.values)
        rows.append(f"<tr><td>{t.number}</td><td>{value}</td><td>{t.user_attrs.get('best_epoch')}</td>"
                    f"<td>{'' if test is None else f'{test:.4f}'}</td>"
                    f"<td>{esc(str(t.user_attrs.get('stop_reason', '')))}"
                    f"</td><td>{esc(params or '(base config)')}</td></tr>")
    body = [f"<h1>Study {esc(s['name'])}</h1>",
            f"<p>{esc(storage_masked)} &middot; {s['n_trials']} trials &middot; {esc(objectives_text(s))}</p>",
            "<pre>" + esc(format_summary(s)) + "</pre>",
            _front_table(s, esc),
            "<h2>Top trials" + (f" by {esc(s['objective'])}" if s.get("front") is not None else "") + "</h2>"
            + ("<table><tr><th>trial</th><th>" + esc(" / ".join(s.get("objectives") or ["value"]))
               + "</th><th>best epoch</th><th>test acc "
                                     "(reading only)</th><th>stop reason</th><th>params</th></tr>"
                                     + "".join(rows) + "</table>" if rows else "<p>No COMPLETE trial yet.</p>")]
    for title, file, note in sections:
        body.append(f"<h2>{esc(title)}</h2>")
        if file:
            body.append(f'<img src="{esc(file)}" alt="{esc(title)}">')
        if note:
            body.append(f"<p><em>{esc(note)}</em></p>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}img{max-width:100%}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>regsweep report: {esc(s['name'])}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
