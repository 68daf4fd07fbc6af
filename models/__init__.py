"""regsweep's training side: plain PyTorch models, data, regularisers and the training loop.

Nothing here imports search code, Optuna or Ray. Importing the package does no work: the public API for your
own loop (:mod:`regsweep.models.api`) loads on first use of a name:

- ``build(cfg)``: model, optimizer, LR schedule, loss, penalty and data from one TrainConfig
  (``regsweep.models.build`` is that module; calling it calls the function);
- ``load_config(path)``, ``TrainConfig``;
- ``init_weights(model, scheme)``, ``make_optimizer(model, name=..., lr=..., weight_decay=...)``,
  ``penalty(model, l1=..., l2=...)``, ``make_scheduler(optimizer, name=..., epochs=..., steps_per_epoch=...)``.

``regsweep export --format snippet`` writes the lines that call them with a trial's values.
"""

PUBLIC = ("build", "load_config", "TrainConfig", "init_weights", "make_optimizer", "penalty", "make_scheduler")
__all__ = list(PUBLIC)

if __name__ == "models":  # imported by its pre-0.2 name (a checkout on sys.path): refuse in one line
    import sys

    _MOVED = ("regsweep 0.2 moved 'models' to 'regsweep.models': import regsweep.models instead "
              "(README: Breaking changes in 0.2)")
    if sys.argv[:1] == ["-m"]:  # `python -m models.train`: runpy is locating it; one line, no traceback
        print(f"error: {_MOVED}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(_MOVED)


def __getattr__(name: str):
    """The public names, loaded on first use (PEP 562), so that importing the package imports no torch."""
    if name == "build":  # the submodule, which is callable (models/build.py): the package attribute is it anyway
        import regsweep.models.build

        return regsweep.models.build
    if name in PUBLIC:
        import regsweep.models.api as api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
