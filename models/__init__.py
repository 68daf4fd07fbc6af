"""regsweep's training side: plain PyTorch models, data, regularisers and the training loop.

Nothing here imports search code, Optuna or Ray. Importing the package does no work.
"""

if __name__ == "models":  # imported by its pre-0.2 name (a checkout on sys.path): refuse in one line
    import sys

    _MOVED = ("regsweep 0.2 moved 'models' to 'regsweep.models': import regsweep.models instead "
              "(README: Breaking changes in 0.2)")
    if sys.argv[:1] == ["-m"]:  # `python -m models.train`: runpy is locating it; one line, no traceback
        print(f"error: {_MOVED}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(_MOVED)
