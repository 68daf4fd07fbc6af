"""The checks of the ``regsweep`` command line (imported by search/cli*.py only): every flag value and the
REGSWEEP_* environment a command reads, checked before anything is read, created or started; argparse errors
as one line (:class:`Parser`); the dataset files of a spec (validate/run). Each bad value is a one-line
:class:`ConfigError` naming the flag or variable, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Optional

from regsweep.models.config import ConfigError
from regsweep.search import log

DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:[0-9]+|mps|auto)$")
MESSAGE_MAX = 300  # an argparse message (which echoes the value) is cut to this many characters


class Parser(argparse.ArgumentParser):
    """argparse with its errors as ONE line (``error: regsweep run: argument --n-trials: invalid int value:
    'many'``) and exit 2, instead of a usage block; sub-parsers are made of this class too."""

    def error(self, message: str):
        if len(message) > MESSAGE_MAX:
            message = message[:MESSAGE_MAX] + "..."
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())}\n")


def shown(value: str, limit: int = 60) -> str:
    """repr of a user value, cut to an excerpt."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


# ------------------------------------------------------------------------------------ flag checks
def check_device(device: Optional[str], *, local: bool = True) -> None:
    """cpu, cuda, cuda:N or mps (auto: cuda when available); cuda/mps only when this machine has it."""
    if device is None:
        return
    if not DEVICE_RE.match(device):
        raise ConfigError(f"--device: {shown(device)} is not allowed; use cpu, cuda, cuda:N or mps")
    if not local or device in ("cpu", "auto"):
        return
    import torch

    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device: 'mps' is not allowed; MPS (Apple GPU) is not available on this machine; "
                              "use --device cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device: {device!r} is not allowed; CUDA is not available on this machine "
                          "(no GPU visible); use --device cpu")
    if ":" in device and int(device.split(":")[1]) >= count:
        raise ConfigError(f"--device: {device!r} is not allowed; {count} CUDA device(s) visible "
                          f"(cuda:0..cuda:{count - 1})")


def check_study_name(name: Optional[str]) -> None:
    from regsweep.search.spec import NAME_MAX, NAME_RE

    if name is not None and (len(name) > NAME_MAX or not NAME_RE.match(name)):
        raise ConfigError(f"--study-name: {shown(name)} is not allowed; give 1 to {NAME_MAX} letters, digits, "
                          "'_', '.', '-' (starting with a letter or digit)")


def _at_least(flag: str, value, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{flag}: {value} is not allowed; must be >= {low}")


def check_flags(args: argparse.Namespace) -> None:
    """Every command-line value, checked before anything is read, created or started."""
    get = lambda name: getattr(args, name, None)  # noqa: E731 - flags only some commands have
    timeout = get("timeout")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"--timeout: {timeout!r} is not allowed; must be a finite number of seconds > 0")
    _at_least("--n-trials", get("n_trials"), 1)
    _at_least("--workers", get("workers"), 1)
    _at_least("--trials-per-gpu", get("trials_per_gpu"), 1)
    _at_least("--cpus-per-trial", get("cpus_per_trial"), 1)
    _at_least("--trial", get("trial"), 0)
    gpt = get("gpus_per_trial")
    if gpt is not None and not (math.isfinite(gpt) and gpt >= 0):
        raise ConfigError(f"--gpus-per-trial: {gpt!r} is not allowed; must be a finite number >= 0")
    if get("gpus") is not None:
        from regsweep.search.backends.optuna_backend import parse_gpus

        parse_gpus(args.gpus)
    port = get("port")
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--port: {port} is not allowed; must be 0..65535 (0 picks a free port)")
    check_study_name(get("study_name"))
    # under Ray the trials run where Ray places them (a cluster's GPUs are not this machine's): the Ray backend
    # checks --device against --gpus-per-trial itself, with its documented message
    check_device(get("device"), local=get("backend") != "ray")
    if get("artifacts") is not None:
        from regsweep.search.artifacts import normalize

        normalize(args.artifacts)  # a file, a missing parent or a bad scheme: before any study is created
    from regsweep.search.spec_checks import OFF, check_log_dir, check_tracking_uri

    if get("mlflow") is not None and args.mlflow != OFF:
        check_tracking_uri(args.mlflow, "--mlflow")
    if get("tensorboard") is not None and args.tensorboard != OFF:
        args.tensorboard = check_log_dir(args.tensorboard, "--tensorboard")  # absolute: workers get the same


def tracker_flags(args: argparse.Namespace) -> dict[str, Optional[str]]:
    """``--mlflow`` (else ``$REGSWEEP_MLFLOW``) and ``--tensorboard`` of `run`/`worker`, None where not given."""
    from regsweep.search.spec_checks import MLFLOW_ENV

    return {"mlflow": getattr(args, "mlflow", None) or os.environ.get(MLFLOW_ENV) or None,
            "tensorboard": getattr(args, "tensorboard", None)}


def check_tracker_packages(settings: dict) -> None:
    """A configured tracker's package is installed (the [trackers] extra); else one line, exit 2. Nothing is
    imported here."""
    import importlib.util

    for name, package in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        if name in settings and importlib.util.find_spec(package) is None:
            raise ConfigError(f"trackers.{name}: the {package} package is not installed; install the extra: "
                              "pip install 'regsweep[trackers]'")


def warn_sampler_limits(spec) -> None:
    from regsweep.search.samplers import limitation_warning

    line = limitation_warning(spec.sampler["name"], spec.space)
    if line:
        log.get(__name__).warning(line)


def check_data_files(spec) -> None:
    """The dataset files of the base config (and of every data.* choice of the space) are present, so a
    missing dataset root is found by validate/run, not by every trial."""
    from regsweep.models.data import check_files

    configs = [spec.base] + [spec.base.with_overrides({p.path: c}) for p in spec.space
                             if p.type == "categorical" and p.path.startswith("data.") for c in p.choices]
    for cfg in configs:
        try:
            check_files(cfg.data, base_dir=spec.path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{spec.source}: base.{exc}") from None


def check_reachable(url: str) -> None:
    """Connect (and write nothing): an unreachable database or a missing driver is bad input."""
    from regsweep.search.storage import check_reachable as reach

    reach(url)


def check_grpc() -> None:
    """grpcio (and protobuf, which Optuna's gRPC stubs need) installed: else one line naming the extra."""
    import importlib.util

    for module, package in (("grpc", "grpcio"), ("google.protobuf", "protobuf")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(f"storage-proxy: needs {package}, which is not installed; pip install 'regsweep[grpc]'")


def progress_mode() -> str:
    mode = os.environ.get("REGSWEEP_PROGRESS", "auto")
    if mode not in ("auto", "live", "plain", "off"):
        raise ConfigError(f"$REGSWEEP_PROGRESS: {mode[:40]!r} is not allowed; use auto, live, plain or off")
    return mode


def check_environment(command: str) -> None:
    """The REGSWEEP_* environment a command reads, checked before it creates anything ($REGSWEEP_STORAGE is
    checked with the URL itself, naming where it came from)."""
    from regsweep.search.loop import thread_share
    from regsweep.search.storage import check_env

    if command in ("validate", "run", "worker", "status", "export", "dashboard", "report", "storage-proxy"):
        check_env()
    if command in ("validate", "run", "worker"):
        thread_share()
        progress_mode()
        from regsweep.search.spec_checks import MLFLOW_ENV, OFF, check_tracking_uri

        if os.environ.get(MLFLOW_ENV) and os.environ[MLFLOW_ENV] != OFF:
            check_tracking_uri(os.environ[MLFLOW_ENV], f"${MLFLOW_ENV}")
    results = os.environ.get("REGSWEEP_RAY_RESULTS")
    if command == "run" and results and Path(results).expanduser().exists() and not Path(results).expanduser().is_dir():
        raise ConfigError(f"$REGSWEEP_RAY_RESULTS: {results[:120]!r} is not allowed; it is a file, not a directory "
                          "for Ray's experiments")
