"""Study spec YAML -> :class:`StudySpec`, validated before anything runs.

Grammar (paths are relative to the spec file)::

    name: digits_cnn
    base: base/digits_cnn.yaml            # or an inline TrainConfig mapping
    objective: {metric: val_loss, direction: minimize}
    # or, for a multi-objective study (a Pareto front; instead of objective:):
    # objectives: [{metric: val_loss, direction: minimize}, {metric: overfit_gap, direction: minimize}]
    space: {include: ../spaces/regularization.yaml}   # or inline params (see search/space.py)
    sampler: {name: tpe, seed: 0, args: {multivariate: true, group: true}}
    pruner: {any_of: [{name: median, args: {n_warmup_steps: 3}}, {name: overfit, args: {patience: 3}}]}
    budget: {n_trials: 20, timeout: null}
    enqueue: [{}]                          # params dicts to try first; {} = the base config itself
    storage: null                          # optional; see search/urls.py for the precedence
    ray: {scheduler: asha, overfit: {patience: 3}}   # optional; only --backend ray reads it
    keep_weights: best                     # best | all | none: which trials' best-epoch weights are stored
    confirm: {top_k: 3, seeds: 2}          # optional; retrain the top K configs on S new train.seeds
    warm_start: {study: NAME, storage: URL or env:VAR, top_k: 5}   # optional; enqueue an earlier study's best
    trackers: {mlflow: {tracking_uri: sqlite:///mlflow.db}, tensorboard: {log_dir: tb}}   # optional; each off

Every error is one line naming the file, the field, the value and what is allowed. The section parsers
(``base:``, ``objective(s):``, ``space:``, ``sampler:``, ``budget:``, ``enqueue:``, ``confirm:``, ``warm_start:``)
are search/spec_sections.py; SpecError, ``ray:``, ``trackers:`` and the dry run are search/spec_checks.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from regsweep.models.config import ConfigError, TrainConfig, clip, config_paths, get_path, load_yaml_file
from regsweep.models.plugins import is_ref
from regsweep.models.yamlio import path_excerpt
from regsweep.search.record import Objective
from regsweep.search.space import PACKAGE_DIR, Space, project_root
from regsweep.search.spec_checks import SpecError, check_fuse, dry_run, parse_ray_section, parse_trackers_section
from regsweep.search.spec_checks import fail as _fail
from regsweep.search.spec_sections import MAX_OBJECTIVES as MAX_OBJECTIVES  # (and the two below: re-exported)
from regsweep.search.spec_sections import (
    NAME_MAX,
    NAME_RE,
    load_base,
    parse_budget,
    parse_confirm,
    parse_enqueue,
    parse_objective,
    parse_objectives,
    parse_sampler,
    parse_space,
    parse_warm,
)
from regsweep.search.spec_sections import OBJECTIVES as OBJECTIVES
from regsweep.search.spec_sections import TRADE_OFFS as TRADE_OFFS

SPEC_FIELDS = ("name", "description", "base", "objective", "objectives", "space", "sampler", "pruner", "budget",
               "enqueue", "storage", "ray", "keep_weights", "confirm", "warm_start",
               "trackers", "fuse")
# keep_weights: best = the study's best trial's best-epoch weights only (the coordinator removes the others after
# the budget); all = every finished trial's; none = no weights. Not in the spec hash (it does not change the search)
KEEP_WEIGHTS = ("best", "all", "none")
# Optuna's pruners need one objective (``trial.report`` and ``should_prune`` refuse several): with objectives: only
# these pruners, which read the recorded history, not Optuna's intermediate values
MULTI_PRUNERS = ("none", "overfit")
DESCRIPTION_MAX = 10_000  # characters: the description is a few lines shown on the dashboard


# TrainConfig's leaf fields in regsweep 0.1.0. A field added later is left out of the spec hash while it is at
# its default, so a study made before the field existed resumes without --allow-spec-change (Compatibility
# contract in docs/architecture.md; tests/test_golden.py). Never remove a name from this set.
FIELDS_0_1 = frozenset({
    "model.name", "model.widths", "model.hidden", "model.dropout", "model.bn", "model.init",
    "model.activation", "data.name", "data.root", "data.val_fraction", "data.test_fraction", "data.split_seed",
    "data.batch_size", "data.augment", "data.num_workers", "data.download", "data.n_samples", "data.shape",
    "data.num_classes", "data.label_noise", "optim.name", "optim.lr", "optim.momentum", "optim.nesterov",
    "optim.betas", "optim.weight_decay", "regularization.l1", "regularization.l2",
    "regularization.label_smoothing", "regularization.mixup_alpha", "regularization.cutmix_alpha",
    "regularization.mix_prob", "regularization.input_noise_std", "scheduler.name", "scheduler.step_size",
    "scheduler.gamma", "scheduler.milestones", "scheduler.eta_min", "scheduler.warmup_epochs",
    "scheduler.factor", "scheduler.patience", "scheduler.max_lr", "scheduler.pct_start", "train.epochs",
    "train.seed", "train.num_threads", "train.deterministic", "train.early_stopping.monitor",
    "train.early_stopping.patience", "train.early_stopping.min_delta", "train.early_stopping.restore_best",
    "train.precision", "train.channels_last", "train.compile", "train.train_eval_size",
})


def hashable_config(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg.to_dict()`` without the fields added after 0.1.0 that are at their default."""
    data, default = cfg.to_dict(), TrainConfig().to_dict()
    for path in config_paths():
        if path in FIELDS_0_1 or get_path(data, path) != get_path(default, path):
            continue
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[leaf]
    return data


@dataclass
class StudySpec:
    name: str
    path: Path  # the spec file (absolute)
    base: TrainConfig
    objective: Objective
    space: Space
    sampler: dict[str, Any]
    pruner: Any
    n_trials: int
    timeout: Optional[float]
    enqueue: list[dict[str, Any]]
    storage: Optional[str] = None
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the spec path as the user typed it (error messages)
    ray: dict[str, Any] = field(default_factory=dict)  # the Ray backend's section (parse_ray_section)
    builtin: bool = False  # run by bare name from regsweep.studies: default storage in the working directory
    keep_weights: str = "best"  # KEEP_WEIGHTS; search/artifacts.py stores and prunes the weights
    confirm: dict[str, Any] = field(default_factory=dict)  # {top_k, seeds} or {} (search/confirm.py)
    warm_start: dict[str, Any] = field(default_factory=dict)  # {study, storage, top_k} or {} (search/study.py)
    # the switched-on trackers (spec_checks.parse_trackers_section); how a sweep is watched, not what it
    # searches: never in the spec hash
    trackers: dict[str, Any] = field(default_factory=dict)
    # objectives: [...] (two or more; ``objective`` is their first) or [] for a single-objective study
    objectives: list[Objective] = field(default_factory=list)
    # trials trained as one fused group (issue 20; search/fuse.py); how trials are trained, not what is searched:
    # never in the spec hash (`run --fuse N` overrides it on a running study)
    fuse: int = 1

    @property
    def multi(self) -> bool:
        """A multi-objective study (``objectives:``): a Pareto front, no best trial, no Optuna pruner."""
        return len(self.objectives) > 1

    @property
    def all_objectives(self) -> list[Objective]:
        return list(self.objectives) if self.multi else [self.objective]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.all_objectives]

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def user_models(self) -> list[str]:
        """The models by import path this spec trains (its base's and every searched ``model.name`` choice): they
        are imported from ``sys.path`` with the spec's folder appended (plugins.load_ref)."""
        names = [self.base.model.name] + [c for p in self.space if p.path == "model.name" for c in p.choices]
        return [n for n in dict.fromkeys(names) if is_ref(n)]

    def canonical(self) -> dict[str, Any]:
        """What defines the search (not the budget, name or storage): hashed and stored in the study."""
        canonical = {"base": hashable_config(self.base), "objective": vars(self.objective),
                     "space": self.space.to_dict(),
                     "sampler": self.sampler, "pruner": self.pruner, "enqueue": self.enqueue}
        if self.multi:  # only when given: single-objective specs keep their hash
            canonical["objectives"] = [vars(o) for o in self.objectives]
        if self.ray:  # only when given: specs without it keep their hash
            canonical["ray"] = self.ray
        if self.confirm:  # the same: it changes which trial export picks
            canonical["confirm"] = self.confirm
        if self.warm_start:  # its storage is where, not what: never hashed (stored masked, see stored())
            canonical["warm_start"] = {k: v for k, v in self.warm_start.items() if k != "storage"}
        return canonical

    def spec_hash(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def stored(self) -> dict[str, Any]:
        """:meth:`canonical` as JSON stores it (the study's ``regsweep:spec`` attr), with the warm-start
        storage masked."""
        stored = json.loads(json.dumps(self.canonical(), default=str))
        if self.warm_start:
            from regsweep.search.urls import mask

            stored["warm_start"]["storage"] = mask(self.warm_start["storage"])
        return stored

    def change_error(self, study_name: str, old: dict[str, Any]) -> SpecError:
        """Resuming study ``study_name``, made with the stored spec ``old``, with this different spec."""
        diff = spec_difference(old, self.stored())
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        return SpecError(f"{self.source or self.path}: the spec differs from the one study '{study_name}' was "
                         f"started with ({shown}); use a new --study-name or pass --allow-spec-change")

    def make_sampler(self, seed: Optional[int] = None):
        """The spec's sampler, seeded by ``seed`` when given (a resumed run's, search/study.py ``seed_sampler``),
        else by ``sampler.seed``."""
        from regsweep.search.samplers import make_sampler

        args = dict(self.sampler.get("args", {}))
        if self.fuse > 1 and self.sampler["name"] == "tpe":  # a fused group's members run at once: TPE must see
            args.setdefault("constant_liar", True)  # the RUNNING ones (Optuna 5's default; not hashed: fuse is not)
        return make_sampler(self.sampler["name"], self.sampler.get("seed") if seed is None else seed, args,
                            self.space)

    def make_pruner(self):
        from regsweep.search.pruners.registry import PrunerContext, build_pruner

        return build_pruner(self.pruner, PrunerContext(self.base.train.epochs, self.source or str(self.path)))


def spec_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two canonical specs."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += spec_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


BUILTIN_STUDIES = PACKAGE_DIR / "studies"  # regsweep.studies (the repo's studies/)


def builtin_study(name: str) -> Optional[Path]:
    """The built-in spec ``regsweep.studies/<name>.yaml`` for a bare study name (``digits_cnn``), else None."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        return None
    path = BUILTIN_STUDIES / f"{name}.yaml"
    return path if path.is_file() else None


def load_spec(path: str | Path, allow_outside: Sequence[str | Path] = ()) -> StudySpec:
    """Load and validate a spec file; a bare name that is no file (``digits_cnn``) is a built-in study, whose
    default storage is ``./regsweep.db`` in the working directory (``StudySpec.builtin``).

    Its ``base:`` and ``include:`` files must lie inside the project root (search/space.py's
    ``project_root``) or one of the ``allow_outside`` directories (``--allow-outside DIR``)."""
    builtin = None if Path(path).exists() else builtin_study(str(path))
    path = builtin or Path(path)
    source = str(path)  # a built-in study by its file: its include/base paths resolve beside it
    roots = [project_root(path.resolve().parent, builtin is not None)]
    for extra in allow_outside:
        if not Path(extra).is_dir():
            raise SpecError(f"--allow-outside: {path_excerpt(extra)} is not a directory")
        roots.append(Path(extra).resolve())
    try:
        data = load_yaml_file(path)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    if data is None:
        raise SpecError(f"{source}: empty file; a study spec needs at least name, base and space")
    if not isinstance(data, Mapping):
        raise SpecError(f"{source}: the document is a {type(data).__name__}, not a mapping of spec fields "
                        f"({', '.join(SPEC_FIELDS)})")
    spec = parse_spec(data, path.resolve(), source, roots)
    spec.builtin = builtin is not None
    return spec


def parse_spec(data: Mapping[str, Any], path: Path, source: str, roots: Optional[Sequence[Path]] = None) -> StudySpec:
    """Validate a spec's fields; ``base:``/``include:`` files must lie inside ``roots`` (default: the project
    root of ``path``)."""
    roots = list(roots or [project_root(path.parent)])
    unknown = [k for k in data if k not in SPEC_FIELDS]
    if unknown:
        raise _fail(source, clip(unknown[0], 60), data[unknown[0]], f"allowed fields: {', '.join(SPEC_FIELDS)}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > NAME_MAX:
        raise _fail(source, "name", name, f"must be a study name of 1 to {NAME_MAX} letters, digits, '_', '.', '-'")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise _fail(source, "description", description, "must be a string")
    if len(description) > DESCRIPTION_MAX:
        raise _fail(source, "description", description, f"must be at most {DESCRIPTION_MAX:,} characters")

    base = load_base(data.get("base"), path, source, roots)

    objectives = parse_objectives(data, source)
    objective = objectives[0] if objectives else parse_objective(data.get("objective"), source)
    space = parse_space(data, base, source, roots, path.parent)
    sampler = parse_sampler(data.get("sampler"), source)
    n_trials, timeout = parse_budget(data.get("budget"), source)
    enqueue = parse_enqueue(data.get("enqueue", [{}]), space, source, base)
    storage = data.get("storage")
    if storage is not None and not isinstance(storage, str):
        raise _fail(source, "storage", storage, "must be a storage URL string")

    ray = parse_ray_section(data.get("ray"), source, base.train.epochs)
    keep_weights = data.get("keep_weights", "best")
    if not isinstance(keep_weights, str) or keep_weights not in KEEP_WEIGHTS:
        raise _fail(source, "keep_weights", keep_weights, f"choose one of: {', '.join(KEEP_WEIGHTS)}")
    trackers = parse_trackers_section(data.get("trackers"), source, path.parent)
    spec = StudySpec(name, path, base, objective, space, sampler, data.get("pruner"),
                     n_trials, timeout, enqueue, storage, description, dict(data), source, ray,
                     keep_weights=keep_weights, trackers=trackers, objectives=objectives)
    spec.confirm, spec.warm_start = parse_confirm(data.get("confirm"), source), parse_warm(data, source)
    spec.fuse = check_fuse(data.get("fuse"), f"{source}: fuse")
    if spec.fuse > 1 and objectives:
        raise _fail(source, "fuse", spec.fuse, "fused trials need one objective (objectives: is multi-objective); "
                    "drop fuse: or give one objective:")
    _check_search(spec, data, source)
    return spec


def _check_search(spec: StudySpec, data: Mapping[str, Any], source: str) -> None:
    """The sampler and pruner built once now, so their errors surface before any study is touched; a
    multi-objective study's limits (:func:`_check_multi`); the in-memory dry run (spec_checks ``dry_run``)."""
    sampler = spec.sampler
    spec.make_pruner()
    try:
        spec.make_sampler()
    except ConfigError as exc:
        raise SpecError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _fail(source, "sampler.args", sampler["args"], f"{sampler['name']}: {clip(exc)}") from None
    if spec.multi:
        _check_multi(spec, data, source)
    dry_run(spec)


def _check_multi(spec: StudySpec, data: Mapping[str, Any], source: str) -> None:
    """What a multi-objective study cannot do, refused in one line: Optuna's pruners (no report, no should_prune
    for several objectives), confirm (a mean over seeds of one value), samplers without multi-objective support."""
    from regsweep.search.pruners.registry import pruner_names
    from regsweep.search.samplers import MULTI_OBJECTIVE

    names = pruner_names(spec.pruner)
    refused = [n for n in names if n not in MULTI_PRUNERS]
    if refused:
        raise _fail(source, "pruner", spec.pruner if isinstance(spec.pruner, str) else refused[0],
                    f"Optuna's pruners need a single objective; with objectives: choose {' or '.join(MULTI_PRUNERS)} "
                    "(the overfit rule reads the first objective's curves)")
    if data.get("confirm") is not None:
        raise _fail(source, "confirm", data["confirm"], "confirm ranks configurations by one objective's mean; "
                    "with objectives: drop confirm:, or use one objective:")
    if spec.sampler["name"] not in MULTI_OBJECTIVE:
        raise _fail(source, "sampler.name", spec.sampler["name"], "with objectives: choose a multi-objective "
                    f"sampler: {', '.join(MULTI_OBJECTIVE)}")


