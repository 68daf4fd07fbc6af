"""regsweep's training side: plain PyTorch models, data, regularisers and the training loop.

Nothing here imports search code, Optuna or Ray. Importing the package does no work.
"""

__version__ = "0.1.0"
