"""The ``regsweep`` command line. Exit codes: 0 done, 2 bad input (one line on stderr), 1 runtime
failure, 143 stopped by SIGTERM."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from models.config import ConfigError
    from models.train import run_training

    try:
        return run_training(args.config, args.device, args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regsweep", description="Hyperparameter search for the regularisation "
                                "of image classifiers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train one TrainConfig YAML and write its history and checkpoint")
    t.add_argument("config", metavar="CONFIG.yaml")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    t.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<config name>)")
    t.set_defaults(func=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
