"""Per-epoch speed of the seeds' loop vs regsweep's fit, ResNet-18's TFLOP/s, and trials/hour packed per device.

The logic is the importable module ``search/bench.py`` (``regsweep bench`` runs it too; it imports neither
optuna nor ray). Run from anywhere:

    .venv/bin/python benchmarks/bench.py [--device cuda|cpu] [--quick | --dry-run] [--json FILE]
    bash benchmarks/gpu_check.sh                                # a bare GPU host (no install)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from regsweep.search.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
