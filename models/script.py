"""A standalone PyTorch training script, generated from the source that trains the trials.

:func:`render_script` writes one Python file that needs torch, torchvision, numpy (and scikit-learn for
``digits``) but never regsweep. Its code is ``inspect``-ed out of this package: starting from
:func:`regsweep.models.train.train` it takes the module-level statement that binds every name the code uses
(functions, classes, constants, registries), recursively, so the script holds exactly the code a trial of
this config runs and cannot drift from it (:mod:`regsweep.models.script_collect`). Registries keep only the
entries the config names. Where the source must be adapted, the adaptation is one of three explicit, tested
transformations (:mod:`regsweep.models.script_source`):

- :func:`fold` -- partial evaluation: an ``if`` or ``x if c else y`` whose condition is decided by values
  known for the script (``state=None``, ``checkpoint=None``, ``parts=None``, ``train.compile``) keeps only the
  branch taken (the script never resumes, checkpoints or compiles unless configured);
- :func:`drop_calls` -- statements that only call a name the script has no use for (``check_names``: the
  registries hold just the config's entries);
- :func:`flatten_module_attrs` -- ``data_mod.load`` becomes ``load`` (one flat namespace).

Names must be unique across the included modules (a clash is a :class:`ScriptError`, never a silent rename).
The config is inlined as one ``CONFIG`` dict at the top, each value commented with where it came from; the
script turns it into attribute-access sections (``cfg.optim.lr``) as TrainConfig gives them.

:func:`render_snippet` writes the ~20 lines a user pastes into an existing loop, on the public API of
``regsweep.models`` (``init_weights``, ``make_optimizer``, ``make_scheduler``, ``penalty``).

The public names of script_collect.py and script_source.py are importable from here too, as they were before this
module was split (issue 15).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from regsweep.models import build as build_mod
from regsweep.models import data as data_mod
from regsweep.models import plugins
from regsweep.models.config import FREE_MAPPINGS, NAMED_FIELDS, ConfigError, TrainConfig, check_choice, get_path
from regsweep.models.script_collect import (  # noqa: F401 - also re-exported
    CONFIG_CLASSES,
    DROPPED_CALLS,
    PACKAGE,
    Collector,
    Unit,
    collect,
    user_code,
)
from regsweep.models.script_source import (  # noqa: F401 - also re-exported
    UNKNOWN,
    ScriptError,
    decide,
    drop_calls,
    flatten_module_attrs,
    fold,
    free_names,
)


# ------------------------------------------------------------------------------------------- CONFIG
def config_literal(cfg: TrainConfig, comment: Callable[[str], str]) -> str:
    """``CONFIG = {...}``: one value per line with ``comment(dotted_path)`` after it."""
    out = ["CONFIG = {"]

    def walk(d: dict, prefix: str, indent: int) -> None:
        pad = " " * indent
        for key, value in d.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                out.append(f"{pad}{_literal(key)}: {{")
                walk(value, path + ".", indent + 4)
                out.append(f"{pad}}},")
            else:
                out.append(f"{pad}{_literal(key)}: {_literal(value)},  # {comment(path)}")

    walk(cfg.to_dict(), "", 4)
    out.append("}")
    return "\n".join(out)


def _literal(value: Any) -> str:
    """A Python literal of a config value (strings double-quoted; floats by repr, which round-trips)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def value_origins(cfg: TrainConfig, params: Mapping[str, Any], trial: Optional[int],
                  filled: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """The comment naming where a CONFIG value came from: sampled by the trial, filled in by the export,
    or the study's base config (marked when it equals TrainConfig's default)."""
    defaults = TrainConfig().to_dict()

    def comment(path: str) -> str:
        if path in params:
            return f"sampled by trial {trial}" if trial is not None else "sampled"
        if filled and path in filled:
            return filled[path]
        try:
            is_default = get_path(defaults, path) == get_path(cfg.to_dict(), path)
        except ConfigError:
            is_default = False
        return "base config (TrainConfig default)" if is_default else "base config"

    return comment


# ------------------------------------------------------------------------------------------- the script
DRIVER = '''

# ------------------------------------------------------------------------------------------------ driver
FREE_MAPPINGS = __FREE_MAPPINGS__  # keyword-argument mappings: they stay dicts


class Config(SimpleNamespace):
    """CONFIG as attribute-access sections (cfg.optim.lr), the shape of regsweep's TrainConfig."""

    def with_overrides(self, overrides):  # TrainConfig.with_overrides: a copy with dotted paths set
        import copy

        out = copy.deepcopy(self)
        for path, value in overrides.items():
            *sections, leaf = path.split(".")
            node = out
            for name in sections:
                node = getattr(node, name)
            setattr(node, leaf, value)
        return out


def namespace(d, prefix=""):
    return Config(**{k: namespace(v, f"{prefix}{k}.") if isinstance(v, dict) and f"{prefix}{k}" not in FREE_MAPPINGS
                     else v for k, v in d.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--save", metavar="FILE.pt", default=None,
                        help="save the final weights (the best epoch's with restore_best) as a state_dict")
    args = parser.parse_args(argv)
    cfg = namespace(CONFIG)
    __USER_CODE__

    def report(epoch, record):  # one JSON line per epoch: epoch, train_loss, ..., val_loss, val_acc, lr, seconds
        print(json.dumps(record), flush=True)

    parts, hist = train(cfg, args.device, report=report)
    best = hist.epochs[hist.best_epoch] if hist.best_epoch is not None else {}
    print(json.dumps({"summary": {"best_epoch": hist.best_epoch, "stop_reason": hist.stop_reason,
                                  "val_loss": best.get("val_loss"), "val_acc": best.get("val_acc"), **hist.test,
                                  "n_params": hist.n_params, "num_threads": hist.num_threads,
                                  "split_fingerprint": hist.split_fingerprint, "torch_version": hist.torch_version}}),
          flush=True)
    if args.save:
        torch.save(parts.model.state_dict(), args.save)
    return 1 if hist.stop_reason.startswith("failed:") else 0


if __name__ == "__main__":
    sys.exit(main())
'''

USER_CODE_CALL = ("    add_search_path([*USER_CODE_DIRS, os.path.dirname(os.path.abspath(__file__))])  # appended, "
                  "never prepended\n")
DRIVER_IMPORTS = ("import argparse", "import json", "import os", "import sys", "from types import SimpleNamespace",
                  "import torch")


def check_user_code(cfg: TrainConfig) -> dict[str, str]:
    """:func:`user_code`, each checked without importing it: an import path by its form, a short name by the
    installed entry points (metadata only). A ``torchvision:`` dataset is refused (one line)."""
    found = user_code(cfg)
    if cfg.data.name.startswith(data_mod.TORCHVISION):
        raise ScriptError(f"data.name: {cfg.data.name!r} is not allowed with --format python; it writes built-in "
                          "datasets and your own by import path (export --format yaml and train it with regsweep)")
    for path, value in found.items():
        kind = "model" if path == "model.name" else "dataset"
        if plugins.is_ref(value):
            if not plugins.REF.fullmatch(value):
                raise ScriptError(f"{path}: {value!r} is not allowed with --format python; an import path is "
                                  "'package.module:name'")
        elif value not in plugins.entry_points(kind):
            raise ScriptError(f"{path}: {value!r} is not allowed with --format python; it is neither built in, an "
                              f"import path nor an installed {plugins.GROUPS[kind]} entry point here")
    return found


def check_builtin_names(cfg: TrainConfig) -> None:
    """``build.check_names`` for a config whose model or dataset is the user's own: the other registry names only
    (the user's code is never imported by export)."""
    found = check_user_code(cfg)
    if "model.name" not in found:  # data.name is checked by its form only: nothing is imported
        build_mod.check_names(cfg)
        return
    data = cfg.to_dict()
    data_mod.check_name(cfg.data.name)  # its form only
    for path in NAMED_FIELDS:
        if path != "model.name" and path != "data.name":
            check_choice(path, get_path(data, path), build_mod.REGISTRIES[path].names())


def user_code_lines(found: Mapping[str, str], code_dirs: list[str]) -> list[str]:
    """The script's statement (and comment) putting the folder(s) the user's code was imported from on
    ``sys.path``, appended as regsweep appends them."""
    named = ", ".join(f"{path} {value!r}" for path, value in found.items())
    modules = ", ".join(sorted({v.split(":")[0].split(".")[0] for v in found.values() if plugins.is_ref(v)}))
    lines = [f"# Your own code, imported by load_ref/load_entry_point below (regsweep.models.plugins): {named}.",
             "# As regsweep did, main() APPENDS its folder to sys.path with add_search_path (never prepends: an",
             "# installed package of the same name wins), then this script's own folder"
             + (f" (so {modules} may also sit beside it)." if modules else ".")]
    if code_dirs:
        lines.append("# The folder that held the study's spec, recorded by the trial that ran it:")
    else:
        lines.append("# The trial recorded no folder (a plugin, or a trial made before regsweep recorded it).")
    lines.append(f"USER_CODE_DIRS = {_literal(list(code_dirs))}")
    return lines


def render_script(cfg: TrainConfig, header: list[str], comment: Callable[[str], str],
                  version: str = "", code_dirs: Sequence[str] = ()) -> str:
    """The standalone script for ``cfg``. ``header``: provenance lines for the docstring; ``comment(path)``:
    where each CONFIG value came from (:func:`value_origins`); ``code_dirs``: the folders a model or dataset by
    import path was imported from (the spec's folder the trial recorded), appended to ``sys.path`` by the
    script. The user's code is never imported here."""
    check_builtin_names(cfg)
    found = user_code(cfg)
    col = collect(cfg)
    if found:
        col.need(plugins.__name__, "add_search_path")
    imports = {"from __future__ import annotations", *col.imports.values(), *DRIVER_IMPORTS}
    names = set(col.owner)
    if col.aliases_needed:
        names.add("SimpleNamespace")
    driver_names = {"argparse", "json", "os", "sys", "namespace", "main", "CONFIG", "USER_CODE_DIRS"}
    clash = names & driver_names - set(col.imports)
    if clash:
        raise ScriptError(f"the script's driver names clash with regsweep code: {sorted(clash)}")
    stdlib, third = import_lines(imports - {"from __future__ import annotations"})
    safe = [line.replace("\\", "/").replace('"""', "'''") for line in header]
    doc = ['"""' + safe[0], "", *safe[1:], '"""', "", "from __future__ import annotations", "", *stdlib, "",
           *third, "", "", *config_literal(cfg, comment).split("\n")]
    if col.aliases_needed:
        doc += ["", "# regsweep's config dataclasses, named in annotations below: the config is a namespace here.",
                " = ".join(sorted(col.aliases_needed)) + " = SimpleNamespace"]
    if found:
        doc += ["", "", *user_code_lines(found, list(code_dirs))]
    body: list[str] = []
    current = None
    for unit in col.ordered():
        if unit.module != current:
            current = unit.module
            body += ["", "", f"# {'-' * 10} from {PACKAGE}.{current}{f' (regsweep {version})' if version else ''} "
                     + "-" * max(0, 70 - len(current) - len(version))]
        body += ["", ""] if body[-1].strip() else [""]
        body += [f"# {note}" for note in unit.notes]
        body += unit.text.split("\n")
    driver = DRIVER.replace("__FREE_MAPPINGS__", repr(FREE_MAPPINGS))
    driver = driver.replace("    __USER_CODE__\n", USER_CODE_CALL if found else "")
    text = "\n".join(doc + body).rstrip() + "\n" + driver
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    compile(text, "train_best.py", "exec")  # a transformation that broke the syntax fails here, not at the user
    return text


def import_lines(imports: set[str]) -> tuple[list[str], list[str]]:
    """(stdlib, third-party) import lines; ``from M import a`` and ``from M import b`` merge into one line."""
    plain, froms = set(), {}
    for stmt in imports:
        words = stmt.split()
        if words[0] == "import":
            plain.add(stmt)
        else:
            froms.setdefault(words[1], set()).add(" ".join(words[3:]))
    lines = sorted(plain) + [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(froms.items())]
    std = [line for line in lines if line.split()[1].split(".")[0] in sys.stdlib_module_names]
    return std, [line for line in lines if line not in std]


# ------------------------------------------------------------------------------------------- the snippet
OPTIM_FIELDS = {"sgd": ("lr", "momentum", "nesterov", "weight_decay"), "adam": ("lr", "betas", "weight_decay"),
                "adamw": ("lr", "betas", "weight_decay")}
SCHEDULER_FIELDS = {"none": (), "step": ("step_size", "gamma"), "multistep": ("milestones", "gamma"),
                    "exponential": ("gamma",), "cosine": ("eta_min",), "plateau": ("factor", "patience"),
                    "onecycle": ("max_lr", "pct_start"), "warmup_cosine": ("warmup_epochs", "eta_min")}


def render_snippet(cfg: TrainConfig, header: list[str]) -> str:
    """The lines a user pastes into an existing loop, on regsweep.models' public API."""
    o, s, r, m = cfg.optim, cfg.scheduler, cfg.regularization, cfg.model
    optim_args = ", ".join(f"{k}={getattr(o, k)!r}" for k in OPTIM_FIELDS[o.name])
    sched_args = "".join(f", {k}={getattr(s, k)!r}" for k in SCHEDULER_FIELDS[s.name])
    interval = {"onecycle": "per batch"}.get(s.name, "none" if s.name == "none" else "per epoch")
    lines = [f"# {line}" for line in header]
    lines += [
        f"# Your model: {m.name}{f' widths {m.widths}' if m.widths else ''}, model.dropout={m.dropout!r}, "
        f"model.bn={m.bn!r}, model.activation={m.activation!r}; call torch.manual_seed({cfg.train.seed}) before "
        "building it.",
        "# Needs: `model`, `train_loader` and `validate()` (your validation loss) from your code. For an exact "
        "replay give DataLoader",
        "# generator=torch.Generator() (else it draws its seed from the global RNG that dropout and mixup use).",
    ]
    mixing = [k for k in ("mixup_alpha", "cutmix_alpha", "input_noise_std") if getattr(r, k)]
    if mixing:
        lines.append("# Not in these lines: " + ", ".join(f"regularization.{k}={getattr(r, k)!r}" for k in mixing)
                     + " (regsweep.models.regularize.BatchRegularizer; or --format python)")
    lines += [
        "import torch",
        "from regsweep.models import init_weights, make_optimizer, make_scheduler, penalty",
        "",
        f"EPOCHS = {cfg.train.epochs}  # train.epochs",
        f"init_weights(model, {m.init!r})  # model.init",
        "# two parameter groups: weights with dim >= 2 decay (decoupled: p <- p - lr*wd*p), biases and norms do not",
        f"optimizer = make_optimizer(model, name={o.name!r}, {optim_args})",
        f"scheduler = make_scheduler(optimizer, name={s.name!r}{sched_args}, epochs=EPOCHS, "
        "steps_per_epoch=len(train_loader))",
        f"criterion = torch.nn.CrossEntropyLoss(label_smoothing={r.label_smoothing!r})",
        f"reg_term = penalty(model, l1={r.l1!r}, l2={r.l2!r})  # l1*sum|w| + l2*sum w^2 over weights with dim >= 2",
        "",
        "for epoch in range(EPOCHS):",
        "    model.train()",
        "    for x, y in train_loader:",
        "        loss = criterion(model(x), y) + reg_term()",
        "        optimizer.zero_grad(set_to_none=True)",
        "        loss.backward()",
        "        optimizer.step()",
        f"        scheduler.after_batch()  # steps only a per-batch scheduler ({s.name}: {interval})",
        "    val_loss = validate()",
        "    scheduler.after_epoch(val_loss)  # steps only a per-epoch scheduler (plateau reads val_loss)",
    ]
    return "\n".join(lines) + "\n"
