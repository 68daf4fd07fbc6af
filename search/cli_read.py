"""The ``regsweep`` commands on an existing storage: ``status``, ``export``, ``report``, ``dashboard`` and
``storage-proxy`` (search/cli.py holds the parser and the exit codes; the run commands are search/cli_run.py's).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from regsweep.models.config import ConfigError
from regsweep.search import cli_checks, log
from regsweep.search.cli_run import ensure_replay, storage_url
from regsweep.search.urls import mask


# ------------------------------------------------------------------------------------ helpers
def _study_names(storage) -> list[str]:
    import optuna

    if storage is None:  # a database without Optuna's tables holds no study
        return []
    return list(optuna.get_all_study_names(storage))  # summaries would load every trial of every study


def _load_study(args: argparse.Namespace):
    """The study named by --study-name in the storage, or the only study there (creates nothing)."""
    import optuna

    from regsweep.search.storage import open_readonly
    from regsweep.search.urls import mask

    url = storage_url(args)
    storage = open_readonly(url)
    names = _study_names(storage)
    name = args.study_name
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"--study-name: required; {mask(url)} holds "
                              f"{len(names)} studies: {', '.join(names) or 'none'}")
        name = names[0]
    if name not in names:
        raise ConfigError(f"--study-name: {cli_checks.shown(name)} not found in {mask(url)}; "
                          f"studies: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage), url


# ------------------------------------------------------------------------------------ commands
def cmd_dashboard(args: argparse.Namespace) -> int:
    from regsweep.search.dashboard import serve
    from regsweep.search.storage import require_sqlite_file

    url = storage_url(args)
    cli_checks.check_reachable(url)
    require_sqlite_file(url)  # the dashboard reads a study: it never creates a database file
    return serve(url, host=args.host, port=args.port, artifacts=args.artifacts)


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    """Serve $REGSWEEP_STORAGE's database to workers through gRPC (search/proxy_server.py)."""
    from regsweep.search.proxy_server import serve
    from regsweep.search.urls import STORAGE_ENV, check_sqlite_path, check_url, is_proxy

    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise ConfigError(f"${STORAGE_ENV}: not set; the proxy reads its database URL from ${STORAGE_ENV} only "
                          "(never the command line: a URL may hold a password)")
    try:
        check_url(url)
        check_sqlite_path(url)
    except ConfigError as exc:
        raise ConfigError(f"${STORAGE_ENV}: {str(exc).removeprefix('storage: ')}") from None
    if is_proxy(url):
        raise ConfigError(f"${STORAGE_ENV}: {mask(url)!r} is not allowed; the proxy serves a database "
                          "(postgresql://, mysql+pymysql:// or sqlite:///), not another proxy")
    cli_checks.check_grpc()
    cli_checks.check_reachable(url)
    try:
        return serve(url, args.host, args.port)
    except KeyboardInterrupt:
        return 0


def cmd_report(args: argparse.Namespace) -> int:
    from regsweep.search.report import write_report
    from regsweep.search.urls import mask

    study, url = _load_study(args)
    index = write_report(study, Path(args.out), mask(url))
    print(f"wrote {index} ({len(list(index.parent.glob('*.png')))} plots)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import optuna

    from regsweep.search.storage import open_readonly
    from regsweep.search.urls import mask

    if args.study_name is None:
        url = storage_url(args)
        storage = open_readonly(url)
        names = _study_names(storage)
        print(f"{mask(url)}: {len(names)} studies")
        for name in names:
            _print_status(optuna.load_study(study_name=name, storage=storage))
        return 0
    study, _ = _load_study(args)
    _print_status(study)
    return 0


def _print_status(study) -> None:
    """A study's summary, then its confirm table (mean ± sd per configuration) when it has a confirm study."""
    from regsweep.search import confirm
    from regsweep.search.report import format_summary, study_summary

    print(format_summary(study_summary(study)))
    rows = [] if study.study_name.endswith(confirm.SUFFIX) else confirm.table(study)
    if rows:
        print(confirm.format_table(rows, study.user_attrs.get("regsweep:objective", "value")))


def cmd_export(args: argparse.Namespace) -> int:
    from regsweep.search.export import pick_trial, render
    from regsweep.search.urls import mask

    study, url = _load_study(args)
    if args.trial is None:
        _print_front(study)  # a multi-objective study: its front, then pick_trial asks for --trial N (exit 2)
    trial = pick_trial(study, args.trial)
    if args.weights is not None:
        return _export_weights(args, study, trial, url)
    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out: directory {Path(args.out).parent} does not exist")
    if args.format != "params":
        ensure_replay(study, trial, None)
    text = render(study, trial, args.format, mask(url))
    if args.trial is None:
        from regsweep.search import confirm

        row = confirm.best_mean(confirm.table(study))
        if row is not None and row["trial"] == trial.number:
            log.note(__name__, "confirm: best mean: "
                     f"{confirm.row_text(row, study.user_attrs.get('regsweep:objective', 'value'))}")
    if args.out:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise ConfigError(f"--out: directory {out.parent} does not exist")
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)  # never a half-written export
        log.note(__name__, f"wrote trial {trial.number} ({args.format}) to {out}")
    else:
        sys.stdout.write(text)
    return 0


def _print_front(study) -> None:
    """A multi-objective study's Pareto front on stdout (plain `export` has no single best trial to write)."""
    from regsweep.search.record import is_multi
    from regsweep.search.report import front_lines, study_summary

    if is_multi(study):
        s = study_summary(study)
        if s["front"]:
            print("\n".join(front_lines(s, indent="")), flush=True)


def _export_weights(args: argparse.Namespace, study, trial, url: str) -> int:
    """`export --weights FILE`: the trial's stored best-epoch weights (keep_weights), written whole or not at all;
    with --out, its config export too (both checked before either is written)."""
    from regsweep.search.artifacts import read_weights
    from regsweep.search.export import render

    target = Path(args.weights)
    if not target.parent.is_dir():
        raise ConfigError(f"--weights: directory {target.parent} does not exist")
    if target.is_dir():
        raise ConfigError(f"--weights: {target} is a directory; give a file such as best.pt")
    data = read_weights(study, trial, url)
    text = render(study, trial, args.format, mask(url)) if args.out else None
    if text is not None and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out: directory {Path(args.out).parent} does not exist")
    writes = [(target, data)] + ([(Path(args.out), text.encode("utf-8"))] if text is not None else [])
    for path, body in writes:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(body)
        tmp.replace(path)  # never a half-written file
    log.note(__name__, f"wrote trial {trial.number}'s best-epoch weights to {target}"
             + (f" and its config ({args.format}) to {args.out}" if text is not None else "")
             + "; load them with torch.load(FILE, weights_only=True) or regsweep.models.train.load_checkpoint(FILE)")
    return 0
