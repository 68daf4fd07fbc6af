#!/usr/bin/env bash
# One command on a GPU host: regsweep's speed figures against issue 11's targets, from the source tree.
#
#   bash benchmarks/gpu_check.sh                 # full sizes on cuda (a few minutes on an H100)
#   bash benchmarks/gpu_check.sh --quick         # small sizes
#   bash benchmarks/gpu_check.sh --dry-run       # the plan + the smallest run of every measurement
#   DEVICE=cpu bash benchmarks/gpu_check.sh --dry-run    # the same on a machine without a GPU
#
# Needs python3 with torch, numpy and PyYAML (no optuna, no ray, no install of regsweep: a link
# regsweep -> this checkout in a temporary directory on PYTHONPATH).
# Missing packages are installed from wheels carried in $REGSWEEP_WHEELS (pip --no-index), if it is set.
# Environment: PYTHON (default: python3), DEVICE (default: cuda, or cpu with --dry-run when CUDA is absent),
# OUT (JSON figures; default: $TMPDIR/regsweep-bench-<device>-<mode>.json).
# Exit status: the bench's (0 when it ran; the targets are printed, never enforced).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
PY="${PYTHON:-python3}"
MODE="full"
for arg in "$@"; do
  case "$arg" in
    --quick) MODE="quick" ;;
    --dry-run) MODE="dry-run" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--quick | --dry-run]" >&2; exit 2 ;;
  esac
done

missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(p for m, p in (("torch", "torch"), ("numpy", "numpy"), ("yaml", "PyYAML"))
               if importlib.util.find_spec(m) is None))
PY
)
if [[ -n "$missing" ]]; then
  if [[ -n "${REGSWEEP_WHEELS:-}" ]]; then
    echo "installing $missing from $REGSWEEP_WHEELS"
    "$PY" -m pip install --no-index --find-links "$REGSWEEP_WHEELS" $missing
  else
    echo "error: $PY lacks $missing; set REGSWEEP_WHEELS to a directory of wheels or install them" >&2
    exit 2
  fi
fi

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
DEVICE="${DEVICE:-}"
if [[ -z "$DEVICE" ]]; then
  if [[ "$has_cuda" == 1 ]]; then DEVICE=cuda
  elif [[ "$MODE" == "dry-run" ]]; then DEVICE=cpu; echo "no CUDA here: dry run on the CPU"
  else echo "error: no CUDA device; run with DEVICE=cpu (and --dry-run or --quick)" >&2; exit 2
  fi
fi
OUT="${OUT:-${TMPDIR:-/tmp}/regsweep-bench-${DEVICE%%:*}-${MODE}.json}"

echo "== host: $(hostname), $("$PY" --version 2>&1)"
"$PY" - <<'PY'
import importlib.util, torch
print(f"== torch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
      f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or 'none'}; "
      f"optuna {'present' if importlib.util.find_spec('optuna') else 'absent'} (not needed)")
PY
if [[ "$DEVICE" == cuda* ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader || true
fi

ARGS=(--device "$DEVICE" --json "$OUT")
[[ "$MODE" == "quick" ]] && ARGS+=(--quick)
[[ "$MODE" == "dry-run" ]] && ARGS+=(--dry-run)
# The import name `regsweep` maps this checkout (as the installed package does): a link to it on PYTHONPATH.
LINKS="$(mktemp -d)"; trap 'rm -rf "$LINKS"' EXIT
ln -s "$HERE" "$LINKS/regsweep"
echo "== $PY -P -m regsweep.search.bench ${ARGS[*]}"
PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}" "$PY" -P -m regsweep.search.bench "${ARGS[@]}"
