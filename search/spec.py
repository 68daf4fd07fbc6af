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

Every error is one line naming the file, the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from regsweep.models.build import check_model, check_names
from regsweep.models.config import ConfigError, TrainConfig, clip, config_paths, excerpt, get_path, load_yaml_file
from regsweep.models.plugins import is_ref
from regsweep.models.yamlio import path_excerpt
from regsweep.search.record import Objective
from regsweep.search.space import PACKAGE_DIR, Space, build_space, confine, project_root
from regsweep.search.spec_checks import SpecError, check_fuse, dry_run, parse_ray_section, parse_trackers_section
from regsweep.search.spec_checks import fail as _fail

SPEC_FIELDS = ("name", "description", "base", "objective", "objectives", "space", "sampler", "pruner", "budget",
               "enqueue", "storage", "ray", "keep_weights", "confirm", "warm_start",
               "trackers", "fuse")
# keep_weights: best = the study's best trial's best-epoch weights only (the coordinator removes the others after
# the budget); all = every finished trial's; none = no weights. Not in the spec hash (it does not change the search)
KEEP_WEIGHTS = ("best", "all", "none")
# metric -> the only direction that makes sense for it
OBJECTIVES = {"val_loss": "minimize", "val_acc": "maximize"}
# objectives: the first is one of OBJECTIVES (per epoch: the best epoch, early stopping and the overfit rule use it);
# the others may also be these (record.py computes them: the gap per epoch, n_params once per trial)
TRADE_OFFS = {**OBJECTIVES, "overfit_gap": "minimize", "n_params": "minimize"}
MAX_OBJECTIVES = 4
# Optuna's pruners need one objective (``trial.report`` and ``should_prune`` refuse several): with objectives: only
# these pruners, which read the recorded history, not Optuna's intermediate values
MULTI_PRUNERS = ("none", "overfit")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NAME_MAX = 128  # study names: Optuna's column holds 512, a 10,000-character name broke PostgreSQL/MariaDB
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


def _mapping(source: str, fld: str, value: Any, allowed_keys: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, fld, value, f"must be a mapping with keys: {', '.join(allowed_keys)}")
    unknown = [k for k in value if k not in allowed_keys]
    if unknown:
        raise _fail(source, f"{fld}.{clip(unknown[0], 60)}", value[unknown[0]],
                    f"allowed keys: {', '.join(allowed_keys)}")
    return value


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

    base = _load_base(data.get("base"), path, source, roots)

    objectives = _parse_objectives(data, source)
    objective = objectives[0] if objectives else _parse_objective(data.get("objective"), source)

    if "space" not in data:
        raise SpecError(f"{source}: space: missing; give params or include: a file from spaces/")
    space = build_space(data["space"], base, source, roots, path.parent)
    if len(space) == 0:
        raise _fail(source, "space", data["space"], "must define at least one param")
    try:  # a model by import path: built once with the base's args, one zero batch through it
        check_model(base)
    except ConfigError as exc:
        raise SpecError(f"{source}: base: {exc}") from None

    sampler = _parse_sampler(data.get("sampler"), source)

    budget = _mapping(source, "budget", data.get("budget"), ("n_trials", "timeout"))
    n_trials = budget.get("n_trials", 20)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise _fail(source, "budget.n_trials", n_trials, "must be an integer >= 1")
    timeout = budget.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise _fail(source, "budget.timeout", timeout, "must be a number of seconds > 0 or null")

    enqueue = _parse_enqueue(data.get("enqueue", [{}]), space, source, base)
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
    spec.confirm, spec.warm_start = _parse_confirm(data.get("confirm"), source), _parse_warm(data, source)
    spec.fuse = check_fuse(data.get("fuse"), f"{source}: fuse")
    if spec.fuse > 1 and objectives:
        raise _fail(source, "fuse", spec.fuse, "fused trials need one objective (objectives: is multi-objective); "
                    "drop fuse: or give one objective:")
    # build sampler and pruner once now so their errors surface before any study is touched
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
    return spec


def _positive(source: str, fld: str, value: Any, default: Any = None) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(source, fld, value, "must be an integer >= 1")
    return value


def _parse_confirm(value: Any, source: str) -> dict[str, Any]:
    """``confirm: {top_k, seeds}`` (both >= 1) or {} when absent."""
    if value is None:
        return {}
    got = _mapping(source, "confirm", value, ("top_k", "seeds"))
    return {"top_k": _positive(source, "confirm.top_k", got.get("top_k"), 3),
            "seeds": _positive(source, "confirm.seeds", got.get("seeds"), 2)}


def _parse_warm(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``warm_start: {study, storage, top_k}`` or {} when absent; ``storage`` is a URL or ``env:VAR`` (read when
    the study is opened, search/study.py ``warm_params``)."""
    if data.get("warm_start") is None:
        return {}
    got = _mapping(source, "warm_start", data["warm_start"], ("study", "storage", "top_k"))
    study, storage = got.get("study"), got.get("storage")
    if not isinstance(study, str) or not NAME_RE.match(study) or len(study) > NAME_MAX:
        raise _fail(source, "warm_start.study", study, "must be the name of an earlier study")
    if not isinstance(storage, str) or not storage:
        raise _fail(source, "warm_start.storage", storage, "must be a storage URL or env:VAR")
    return {"study": study, "storage": storage, "top_k": _positive(source, "warm_start.top_k", got.get("top_k"), 5)}


def _parse_objective(value: Any, source: str) -> Objective:
    obj = _mapping(source, "objective", value, ("metric", "direction"))
    metric = obj.get("metric", "val_loss")
    if metric not in OBJECTIVES:
        raise _fail(source, "objective.metric", metric, f"choose one of: {', '.join(OBJECTIVES)} (the test set "
                    "never chooses anything)")
    direction = obj.get("direction", OBJECTIVES[metric])
    if direction != OBJECTIVES[metric]:
        raise _fail(source, "objective.direction", direction, f"{metric} is optimised with {OBJECTIVES[metric]}")
    return Objective(metric, direction)


def _parse_objectives(data: Mapping[str, Any], source: str) -> list[Objective]:
    """``objectives: [{metric, direction}, ...]`` (2..MAX_OBJECTIVES, distinct metrics, the first a per-epoch
    validation metric), or [] when absent; never together with ``objective:``."""
    value = data.get("objectives")
    if value is None:
        return []
    if data.get("objective") is not None:
        raise _fail(source, "objectives", value, "give either objective: (one) or objectives: (several), not both")
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_OBJECTIVES:
        raise _fail(source, "objectives", value, f"must be a list of 2 to {MAX_OBJECTIVES} {{metric, direction}} "
                    "mappings (one objective: use objective:)")
    out: list[Objective] = []
    for i, entry in enumerate(value):
        fld = f"objectives[{i}]"
        obj = _mapping(source, fld, entry, ("metric", "direction"))
        if not obj:
            raise _fail(source, fld, entry, "must be a mapping {metric, direction}")
        metric = obj.get("metric")
        allowed = OBJECTIVES if i == 0 else TRADE_OFFS
        if not isinstance(metric, str) or metric not in allowed:
            why = (" (the first objective chooses the best epoch: a per-epoch validation metric)" if i == 0
                   and metric in TRADE_OFFS else " (the test set never chooses anything)")
            raise _fail(source, f"{fld}.metric", metric, f"choose one of: {', '.join(allowed)}{why}")
        if metric in (o.metric for o in out):
            raise _fail(source, f"{fld}.metric", metric, "each metric at most once")
        direction = obj.get("direction", TRADE_OFFS[metric])
        if direction != TRADE_OFFS[metric]:
            raise _fail(source, f"{fld}.direction", direction, f"{metric} is optimised with {TRADE_OFFS[metric]}")
        out.append(Objective(metric, direction))
    return out


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


def _parse_sampler(value: Any, source: str) -> dict[str, Any]:
    from regsweep.search.samplers import SAMPLERS

    smp = _mapping(source, "sampler", value, ("name", "seed", "args"))
    if not isinstance(smp.get("args") or {}, Mapping):
        raise _fail(source, "sampler.args", smp.get("args"), "must be a mapping of keyword arguments")
    sampler = {"name": smp.get("name", "tpe"), "seed": smp.get("seed", 0), "args": dict(smp.get("args") or {})}
    if sampler["name"] not in SAMPLERS:
        raise _fail(source, "sampler.name", sampler["name"], f"choose one of: {', '.join(SAMPLERS.names())}")
    if sampler["seed"] is not None and (isinstance(sampler["seed"], bool) or not isinstance(sampler["seed"], int)):
        raise _fail(source, "sampler.seed", sampler["seed"], "must be an integer or null")
    from regsweep.search.samplers import check_args

    try:
        check_args(sampler["name"], sampler["args"])  # names and simple types; a dry run follows
    except ConfigError as exc:
        raise SpecError(f"{source}: {exc}") from None
    return sampler


def _load_base(base: Any, spec_path: Path, source: str, roots: Sequence[Path]) -> TrainConfig:
    if base is None:
        raise SpecError(f"{source}: base: missing; give a TrainConfig file (relative to the spec) or a mapping")
    if isinstance(base, str):
        target = (spec_path.parent / base).resolve()
        try:
            confine(target, roots, source, "base", base)  # before anything is read or its existence told
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
        if not target.is_file():
            raise SpecError(f"{source}: base: {excerpt(base)} not found (looked for {clip(target, 200)})")
        try:
            data = load_yaml_file(target, quote=False)  # never quote a referenced file's text
            if data is not None and not isinstance(data, Mapping):  # (an empty file: the defaults, as before)
                raise SpecError(f"{target}: the document is a {type(data).__name__}, not a TrainConfig mapping "
                                f"(base of {source})")
            # structure, ranges, names (a model by import path: imported with the spec's folder on sys.path)
            return check_names(TrainConfig.from_dict(data, str(target)), str(target), base_dir=spec_path.parent)
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
    if isinstance(base, Mapping):
        try:
            return check_names(TrainConfig.from_dict(base), base_dir=spec_path.parent)
        except ConfigError as exc:
            raise SpecError(f"{source}: base.{exc}") from None
    raise _fail(source, "base", base, "must be a TrainConfig file path or an inline mapping")


def _parse_enqueue(enqueue: Any, space: Space, source: str, base: TrainConfig) -> list[dict[str, Any]]:
    if enqueue is None:
        return []
    if not isinstance(enqueue, list):
        raise _fail(source, "enqueue", enqueue, "must be a list of params mappings ({} = the base config)")
    params = {p.path: p for p in space}
    base_values = base.to_dict()
    out = []
    for i, entry in enumerate(enqueue):
        if not isinstance(entry, Mapping):
            raise _fail(source, f"enqueue[{i}]", entry, "must be a mapping of space params to values")
        for key, value in entry.items():
            if key not in params:
                raise _fail(source, f"enqueue[{i}].{clip(key, 60)}", value,
                            f"not a space param; params: {', '.join(params)}")
            if not params[key].contains(value):
                raise _fail(source, f"enqueue[{i}].{key}", value, f"outside the param's range {params[key].to_dict()}")
        for key, value in entry.items():  # a value whose condition is off would be dropped silently
            for dep, allowed in params[key].when:
                if dep in entry:
                    current, where = entry[dep], "this entry sets it to"
                elif dep in params:
                    continue  # sampled in the trial: the condition may hold
                else:
                    current, where = get_path(base_values, dep), "the base config has"
                if current not in allowed:
                    raise _fail(source, f"enqueue[{i}].{key}", value,
                                f"{key} is sampled only when {dep} is {' or '.join(map(repr, allowed))}, and "
                                f"{where} {current!r}")
        out.append(dict(entry))
    return out


