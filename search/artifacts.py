"""Per-trial artifacts through Optuna's artifact API: the curves plot and the exported config of each trial.

The artifact store's *location* is a study attr (``regsweep:artifacts``), so every worker and the dashboard
use the same one. A location is a directory (shared by the workers, e.g. NFS), ``s3://BUCKET`` (Optuna's
``Boto3ArtifactStore``) or ``gs://BUCKET`` (``GCSArtifactStore``), or ``off``.

Which location a process uses:
- ``--artifacts LOC`` given to ``run``: LOC, written to the study attr (``off`` switches artifacts off).
- ``--artifacts LOC`` given to ``worker``: LOC for this worker only (the share mounted at another path on
  its machine); the study attr is set only when the study has none.
- no flag: the study attr; for a study without one on a SQLite file, ``<db stem>-artifacts/`` beside the
  database file (recorded in the attr); otherwise off.

Uploads happen once per trial, at its end (never per epoch), while the trial is still RUNNING (Optuna
refuses attrs on a finished trial). A failed upload warns and never fails the trial.

Weights (the spec's ``keep_weights``): ``trial-<n>-weights.pt``, the trial's best-epoch state_dict with its config,
uploaded at its end when it becomes the study's best (``best``) or always (``all``); under ``best`` only the
coordinator removes the finished non-best trials' files (and their entries) after the budget (:func:`prune_weights`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from regsweep.models.config import ConfigError
from regsweep.search import log

ARTIFACTS_ATTR = "regsweep:artifacts"
OFF = "off"


def normalize(location: str, flag: str = "--artifacts") -> str:
    """A canonical location: an absolute directory path, s3://BUCKET, gs://BUCKET or 'off'."""
    loc = location.strip()
    if loc == OFF:
        return OFF
    scheme, sep, rest = loc.partition("://")
    if sep:
        if scheme not in ("s3", "gs") or not rest.strip("/") or "/" in rest.strip("/"):
            raise ConfigError(f"{flag}: {location!r} is not allowed; give a directory, s3://BUCKET, gs://BUCKET "
                              "or off")
        return f"{scheme}://{rest.strip('/')}"
    path = Path(loc).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {location!r} is a file; give a directory shared by the workers")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag}: {location!r}: directory {path.parent} does not exist")
    return str(path)


def default_location(url: str) -> Optional[str]:
    """``<db stem>-artifacts`` beside a SQLite database file; None for other storages."""
    from regsweep.search.urls import sqlite_file

    file = sqlite_file(url)
    if file is None:
        return None
    return str(file.resolve().with_name(f"{file.stem}-artifacts"))


def resolve(study, url: str, flag: Optional[str], *, coordinator: bool) -> Optional[str]:
    """The location this process uses for ``study`` (None: off); records it in the study attr as above."""
    current = study.user_attrs.get(ARTIFACTS_ATTR)
    if flag is not None:
        loc = normalize(flag)
        if coordinator or current is None:
            if loc != current:
                study.set_user_attr(ARTIFACTS_ATTR, loc)
        return None if loc == OFF else loc
    if current is not None:
        return None if current == OFF else current
    loc = default_location(url)
    if loc is not None:
        study.set_user_attr(ARTIFACTS_ATTR, loc)
    return loc


def open_store(location: str):
    """Optuna's artifact store for a location (a directory is created if missing)."""
    from optuna.artifacts import FileSystemArtifactStore

    if location.startswith("s3://"):
        from optuna.artifacts import Boto3ArtifactStore

        return Boto3ArtifactStore(location[len("s3://"):])
    if location.startswith("gs://"):
        from optuna.artifacts import GCSArtifactStore

        return GCSArtifactStore(location[len("gs://"):])
    Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)


class AnyStore:
    """Reads from whichever of several stores holds an artifact (the dashboard over studies whose workers
    used different locations); writes go to the first."""

    def __init__(self, stores: list):
        self.stores = stores

    def open_reader(self, artifact_id: str):
        from optuna.artifacts.exceptions import ArtifactNotFound

        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of {len(self.stores)} stores")

    def write(self, artifact_id: str, content_body) -> None:
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        from optuna.artifacts.exceptions import ArtifactNotFound

        for store in self.stores:
            try:
                store.remove(artifact_id)
            except ArtifactNotFound:
                continue


def upload_trial(store, trial, history: list[dict[str, Any]], best_epoch: Optional[int], title: str,
                 config_yaml: Optional[str]) -> list[str]:
    """Upload ``trial-<n>-curves.png`` (when there is history) and ``trial-<n>-config.yaml``; returns the
    artifact ids. Errors warn on stderr and return what was uploaded."""
    from optuna.artifacts import upload_artifact

    from regsweep.search.plots import curves_png

    ids: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="regsweep-artifacts-") as tmp:
            files = []
            if history:
                png = os.path.join(tmp, f"trial-{trial.number}-curves.png")
                curves_png(png, history, title, best_epoch)
                files.append(png)
            if config_yaml is not None:
                cfg = os.path.join(tmp, f"trial-{trial.number}-config.yaml")
                Path(cfg).write_text(config_yaml, encoding="utf-8")
                files.append(cfg)
            for f in files:
                ids.append(upload_artifact(artifact_store=store, file_path=f, study_or_trial=trial))
    except Exception as exc:  # an unreachable bucket or a full disk must not fail a trained trial
        log.get(__name__).warning(f"trial {trial.number}: artifact upload failed ({exc.__class__.__name__}: {exc})")
    return ids


def upload_trial_end(store, trial, history: list[dict[str, Any]], state: str, value: Optional[float],
                     storage_label: str) -> list[str]:
    """A live (RUNNING) ``optuna.trial.Trial`` at its end: its curves and its export with the FINAL state and
    value (the trial is told right after). Both backends call this; the Ray driver for every Ray trial."""
    from regsweep.search.export import config_yaml, provenance, trial_config

    # the live Trial's public user_attrs/params/number are what the export reads (state and value are given)
    attrs = trial.user_attrs
    text = None
    if attrs.get("config") is not None:
        text = config_yaml(trial_config(trial), provenance(trial.study, trial, storage_label, state, value))
    title = f"{trial.study.study_name} trial {trial.number}: {state} {attrs.get('stop_reason', '')}"
    return upload_trial(store, trial, history, attrs.get("best_epoch"), title, text)


def trial_artifacts(study, trial) -> list[dict[str, Any]]:
    """The artifact metadata of a trial (id, filename, mimetype)."""
    from optuna.artifacts import get_all_artifact_meta

    from regsweep.search.optuna_internals import study_storage

    return [vars(m) for m in get_all_artifact_meta(trial, storage=study_storage(study))]


# ------------------------------------------------------------------------------------ weights (keep_weights)
WEIGHTS_SUFFIX = "-weights.pt"


def weights_filename(number: int) -> str:
    return f"trial-{number}{WEIGHTS_SUFFIX}"


def keeps_weights(policy: str, state: str, value: Optional[float], study) -> bool:
    """Whether a trial ending with ``state``/``value`` stores its best-epoch weights under ``policy``
    (the spec's ``keep_weights``): ``all`` every COMPLETE or PRUNED trial, ``best`` a COMPLETE trial at least
    as good as the study's best so far (ties kept: the coordinator removes the extras after the budget)."""
    if policy == "none" or state not in ("COMPLETE", "PRUNED") or value is None:
        return False
    if policy == "all":
        return True
    if state != "COMPLETE":
        return False
    from regsweep.search.record import is_multi

    if is_multi(study):  # a Pareto front, no best value: kept; the coordinator keeps the front's after the budget
        return True
    try:
        best = study.best_value
    except ValueError:  # no COMPLETE trial yet: this one becomes the best
        return True
    except Exception:  # a storage hiccup: keep it; the coordinator's clean-up removes it if it is not the best
        return True
    minimize = study.direction.name == "MINIMIZE"
    return value <= best if minimize else value >= best


def upload_weights(store, trial, state_dict: dict[str, Any], config: dict[str, Any], *, best_epoch: int,
                   value: Optional[float], in_shape: Any, num_classes: int) -> Optional[str]:
    """Upload ``trial-<n>-weights.pt``: the best epoch's ``state_dict`` with the config beside it, in the format
    of ``regsweep.models.train.save_checkpoint`` (so ``load_checkpoint`` rebuilds the model; every value is a
    tensor or plain data: ``torch.load(weights_only=True)`` reads it). Errors warn and return None."""
    import torch
    from optuna.artifacts import upload_artifact

    payload = {"state_dict": state_dict, "config": config, "in_shape": [int(x) for x in (in_shape or ())],
               "num_classes": int(num_classes or 0), "study": trial.study.study_name, "trial": trial.number,
               "best_epoch": best_epoch, "value": value}
    try:
        with tempfile.TemporaryDirectory(prefix="regsweep-weights-") as tmp:
            path = os.path.join(tmp, weights_filename(trial.number))
            torch.save(payload, path)
            return upload_artifact(artifact_store=store, file_path=path, study_or_trial=trial,
                                   mimetype="application/octet-stream")
    except Exception as exc:  # a full disk or a gone bucket must not fail a trained trial
        log.get(__name__).warning(f"trial {trial.number}: weights upload failed ({exc.__class__.__name__}: {exc})")
        return None


def weights_ids(study, trial) -> list[str]:
    """The artifact ids of a trial's weights files (uploaded; maybe removed from the store since)."""
    return [m["artifact_id"] for m in trial_artifacts(study, trial) if m["filename"] == weights_filename(trial.number)]


def has_artifact(store, artifact_id: str) -> bool:
    from optuna.artifacts.exceptions import ArtifactNotFound

    try:
        reader = store.open_reader(artifact_id)
    except ArtifactNotFound:
        return False
    reader.close()
    return True


def stored_weights(study, store) -> dict[int, str]:
    """trial number -> artifact id of every weights file still in ``store`` (reads the trials without their
    per-epoch records)."""
    from regsweep.search.report import without_epochs

    found: dict[int, str] = {}
    for t in without_epochs(study).get_trials(deepcopy=False):
        for aid in weights_ids(study, t):
            if has_artifact(store, aid):
                found[t.number] = aid
    return found


def prune_weights(study, store, out=None) -> int:
    """``keep_weights: best``, the coordinator only, after the budget: remove the weights of every FINISHED
    trial but the study's best (a RUNNING trial's file is never touched: its worker may be uploading it right
    now, so two workers never delete each other's files, and no worker deletes anything). Returns how many
    files were removed."""
    from optuna.artifacts.exceptions import ArtifactNotFound
    from optuna.trial import TrialState

    from regsweep.search.optuna_internals import remove_artifact_meta
    from regsweep.search.record import is_multi
    from regsweep.search.report import without_epochs

    if is_multi(study):  # the Pareto front's trials are the best ones
        kept = {t.number for t in study.best_trials}
    else:
        try:
            kept = {study.best_trial.number}
        except ValueError:
            kept = set()
    best = ", ".join(map(str, sorted(kept))) or None
    removed = 0
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    for t in without_epochs(study).get_trials(deepcopy=False, states=finished):
        if t.number in kept:
            continue
        for aid in weights_ids(study, t):
            try:
                store.remove(aid)
                removed += 1
            except ArtifactNotFound:
                pass  # removed before (a clean-up that stopped half-way): its entry goes now
            except Exception as exc:  # a bucket that refuses: the file and its entry stay, the run goes on
                log.get(__name__).warning(f"trial {t.number}: could not remove its weights "
                                          f"({exc.__class__.__name__}: {exc})")
                continue
            try:  # the trial's artifact entry too (RDB storages), so no listing names a file that is gone
                remove_artifact_meta(study, t, aid)
            except Exception as exc:  # the database went away: the entry stays, the file is gone
                log.get(__name__).warning(f"trial {t.number}: its weights' artifact entry stays "
                                          f"({exc.__class__.__name__})")
    if removed and out is not None:
        print(f"keep_weights: best: removed the weights of {removed} non-best trial(s); kept trial(s) {best}",
              file=out, flush=True)
    return removed


def read_weights(study, trial, url: str) -> bytes:
    """The stored weights file of ``trial`` (``regsweep export --weights``), from the study's artifact store;
    ConfigError (one line) when there is none."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    location = study.user_attrs.get(ARTIFACTS_ATTR) or default_location(url)
    why = ("its study has no artifact store (it ran with --artifacts off)" if location in (None, OFF) else
           f"none is in the artifact store {location}")
    if location not in (None, OFF) and (location.startswith(("s3://", "gs://")) or Path(location).is_dir()):
        store = open_store(location)
        for aid in weights_ids(study, trial):
            try:
                reader = store.open_reader(aid)
            except ArtifactNotFound:
                continue
            try:
                return reader.read()
            finally:
                reader.close()
    raise ConfigError(f"--weights: trial {trial.number} of study '{study.study_name}' has no stored weights ({why}; "
                      "keep_weights: best keeps only the best trial's, all every finished trial's, none no weights)")
