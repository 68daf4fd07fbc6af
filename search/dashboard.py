"""optuna-dashboard on a regsweep storage, and the study note the run's coordinator keeps up to date.

``regsweep dashboard`` serves optuna-dashboard's WSGI app (wsgiref, as ``optuna-dashboard`` itself does) bound
to 127.0.0.1 unless told otherwise: the dashboard has no authentication and can delete studies, so binding
elsewhere prints a warning. The artifact store is ``--artifacts`` or, without it, the stores recorded in the
studies' ``regsweep:artifacts`` attrs (search/artifacts.py), so trial artifacts open from the trial pages.

The study note (optuna-dashboard's note API: study system attrs) holds the spec summary and the best trial.
Only the coordinator of a run writes it (``regsweep run``, never ``regsweep worker``), so concurrent workers
never interleave its chunks.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any, Optional, TextIO

from regsweep.models.config import ConfigError
from regsweep.search import log

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def study_stores(storage, flag: Optional[str]):
    """The artifact store the dashboard reads: --artifacts, else every location recorded by the studies."""

    from regsweep.search.artifacts import ARTIFACTS_ATTR, OFF, AnyStore, normalize, open_store

    if flag is not None:
        loc = normalize(flag)
        return (None, []) if loc == OFF else (open_store(loc), [loc])
    locations: list[str] = []
    for s in storage.get_all_studies():  # get_all_study_summaries would load every trial of every study
        loc = s.user_attrs.get(ARTIFACTS_ATTR)
        if loc and loc != OFF and loc not in locations:
            locations.append(loc)
    if not locations:
        return None, []
    stores = [open_store(loc) for loc in locations]
    return (stores[0] if len(stores) == 1 else AnyStore(stores)), locations


def dashboard_storage(storage):
    """The storage the dashboard reads: ``storage`` with every trial's per-epoch records (both record formats)
    left out of its study payload. They would flood it: format 2 makes one user-attr column per chunk of 10
    epochs in the trials table, format 1 puts a whole curve in every trial's row (a 5,000-trial study of 100
    epochs: ~120 MB of JSON). The curves are there anyway: intermediate values per epoch, the curves artifact."""
    from regsweep.search.optuna_internals import leaving_out
    from regsweep.search.record import EPOCH_KEY_PATTERNS

    return leaving_out(storage, EPOCH_KEY_PATTERNS)


def make_app(url: str, artifacts: Optional[str] = None):
    """optuna-dashboard's WSGI app on the storage; returns (app, artifact locations)."""
    import optuna_dashboard

    from regsweep.search.optuna_internals import fast_trial_serializer
    from regsweep.search.storage import open_readonly
    from regsweep.search.urls import mask

    storage = open_readonly(url)  # the dashboard reads: it never creates a database file or Optuna's tables
    if storage is None:
        raise ConfigError(f"--storage: {mask(url)} holds no Optuna study yet (no Optuna tables); run a study first")
    store, locations = study_stores(storage, artifacts)
    fast_trial_serializer()
    return optuna_dashboard.wsgi(dashboard_storage(storage), artifact_store=store), locations


def serve(url: str, host: str = "127.0.0.1", port: int = 8080, artifacts: Optional[str] = None,
          out: Optional[TextIO] = None) -> int:
    """Serve until interrupted."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from regsweep.search.urls import mask

    out = out or sys.stdout
    if not 0 <= port < 65536:
        raise ConfigError(f"--port: {port} is not allowed; must be 0..65535")
    app, locations = make_app(url, artifacts)

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise here
            pass

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = make_server(host, port, app, server_class=Server, handler_class=QuietHandler)
    except OSError as exc:
        raise ConfigError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    if not is_loopback(host):
        log.get(__name__).warning(f"the dashboard is bound to {host}: anyone who can reach this port can read and "
                                  "delete studies (optuna-dashboard has no authentication); prefer 127.0.0.1 and an "
                                  "SSH tunnel")
    shown = f"[{host}]" if ":" in host else host
    print(f"optuna-dashboard on {mask(url)}: http://{shown}:{server.server_port}/dashboard/"
          + (f"  (artifacts: {', '.join(locations)})" if locations else "  (no artifact store)"), file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# ------------------------------------------------------------------------------------ study note
def note_body(study, spec, url: Optional[str] = None) -> str:
    """Markdown: the spec summary and the best trial so far; its reproduce command names the storage ``url``
    (as ``$REGSWEEP_STORAGE`` when the URL holds a password: search/urls.py ``storage_arg``)."""
    from regsweep.search.report import study_summary, value_text
    from regsweep.search.urls import STORAGE_ENV, has_password, mask, storage_arg

    s = study_summary(study)
    lines = [f"# {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    pruner = spec.pruner if spec.pruner else {"name": "none"}
    lines += ["## Spec", "",
              (f"- objectives: {', '.join(f'{o.direction} `{o.metric}`' for o in spec.objectives)} (a Pareto "
               "front; each trial's values at the epoch best for the first)" if spec.multi else
               f"- objective: {spec.objective.direction} `{spec.objective.metric}`"),
              f"- sampler: `{spec.sampler['name']}`, pruner: `{_compact(pruner)}`",
              f"- budget: {s['budget']} COMPLETE+PRUNED trials"
              + (f", timeout {spec.timeout}s" if spec.timeout else ""),
              f"- spec file: `{spec.source or spec.path}` (hash `{spec.spec_hash()[:12]}`)", "",
              "| param | distribution |", "|---|---|"]
    for p in spec.space:
        dist = (f"{p.type} [{p.low:g}, {p.high:g}]" + (" log" if p.log else "") if p.type != "categorical"
                else "one of " + ", ".join(map(str, p.choices)))
        when = " when " + ", ".join(f"{k} in {list(v)}" for k, v in p.when) if p.when else ""
        lines.append(f"| `{p.path}` | {dist}{when} |")
    lines += ["", "## Progress", "",
              "- states: " + (", ".join(f"{k} {v}" for k, v in sorted(s["states"].items())) or "none"),
              "- stop reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items())) or "none"),
              ""]
    if s.get("front") is not None:
        return "\n".join(lines + _front_note(s, study, url)) + "\n"
    lines += ["## Best trial", ""]
    b = s["best"]
    if b is None:
        lines.append("No COMPLETE trial yet.")
    else:
        lines.append(f"Trial **{b['number']}**: {s['objective']} = {b['value']:.4g} at epoch {b['best_epoch']}"
                     + (f", test accuracy {b['test_acc']:.4f} (for reading, never for choosing)"
                        if isinstance(b.get("test_acc"), float) else ""))
        lines += [""] + [f"- `{k}`: {value_text(v)}" for k, v in sorted(b["params"].items())]
        if not b["params"]:
            lines.append("- (the base config itself)")
        storage = f"{storage_arg(url)} " if url else ""
        lines += ["", f"Reproduce: `regsweep export {storage}--study-name {study.study_name} --trial {b['number']} "
                  "--out best.yaml` then `regsweep train best.yaml`."]
        if url and has_password(url):
            lines.append(f"(`${STORAGE_ENV}` holds the storage URL, {mask(url)}, with its password.)")
    return "\n".join(lines) + "\n"


def _front_note(s: dict, study, url: Optional[str]) -> list[str]:
    """The note's Pareto-front section (a multi-objective study): a table and how to export one of its trials."""
    from regsweep.search.report import value_text
    from regsweep.search.urls import STORAGE_ENV, has_password, mask, storage_arg

    lines = ["## Pareto front", ""]
    if not s["front"]:
        return lines + ["No COMPLETE trial yet."]
    lines += ["| trial | " + " | ".join(f"{n} ({d})" for n, d in zip(s["objectives"], s["directions"]))
              + " | best epoch | params |", "|---" * (len(s["objectives"]) + 3) + "|"]
    for row in s["front"]:
        params = ", ".join(f"`{k}` {value_text(v)}" for k, v in sorted(row["params"].items())) or "(base config)"
        lines.append(f"| {row['number']} | " + " | ".join(f"{v:.4g}" for v in row["values"])
                     + f" | {row['best_epoch']} | {params} |")
    storage = f"{storage_arg(url)} " if url else ""
    lines += ["", f"No single best trial: choose one on the front, then `regsweep export {storage}--study-name "
              f"{study.study_name} --trial N --out chosen.yaml` and `regsweep train chosen.yaml`."]
    if url and has_password(url):
        lines.append(f"(`${STORAGE_ENV}` holds the storage URL, {mask(url)}, with its password.)")
    return lines


def _compact(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def write_note(study, spec, url: Optional[str] = None) -> None:
    """Save the study note (the coordinator only)."""
    from regsweep.search.optuna_internals import dashboard_notes

    dashboard_notes().save_note(study, note_body(study, spec, url))


def read_note(study) -> str:
    """The study note's Markdown body ("" when none was saved)."""
    from regsweep.search.optuna_internals import dashboard_notes

    return dashboard_notes().get_note(study)
