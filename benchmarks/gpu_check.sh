#!/usr/bin/env bash
# The prepared GPU check: at most about 8 minutes on one H100/H200 for slam_paper, writing
# OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (see benchmarks/gpu_check.py for the parts).
#
#   bash benchmarks/gpu_check.sh OUT_DIR                  # GPU_CHECK_PRESET (default slam_paper)
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke      # slam_tiny on CPU, under a minute (CI)
#   GPU_CHECK_PRESET=slam_tiny bash benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [--cpu-smoke] [--updates N] [--peak-tflops T]" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "${GPU_CHECK_PRESET:-}" = "slam_tiny" ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    set -- "$@" --cpu-smoke
fi
exec timeout "${GPU_CHECK_TIMEOUT:-480}" python benchmarks/gpu_check.py "$@"
