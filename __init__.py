"""regsweep: hyperparameter search for the regularisation of image classifiers (Optuna / Ray Tune).

The installed package maps the repository's folders (setuptools ``package-dir``): ``regsweep.models``
(plain PyTorch, ``models/``), ``regsweep.search`` (``search/``), ``regsweep.studies`` and
``regsweep.spaces`` (the built-in YAML specs). Importing it does no work.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("regsweep")
except PackageNotFoundError:  # a source tree on PYTHONPATH without an install (benchmarks/gpu_check.sh)
    __version__ = "0.2.0+source"
