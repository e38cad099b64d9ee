#!/usr/bin/env bash
# The prepared GPU check: at most GPU_CHECK_TIMEOUT seconds (default 480) on one H100/H200 for
# slam_paper, writing only OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (see
# benchmarks/gpu_check.py for the parts, the time budget and --data-dir).
#
#   bash benchmarks/gpu_check.sh OUT_DIR                  # GPU_CHECK_PRESET (default slam_paper)
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke      # slam_tiny on CPU, under a minute (CI)
#   GPU_CHECK_PRESET=slam_tiny bash benchmarks/gpu_check.sh OUT_DIR
#   GPU_CHECK_TIMEOUT=470 bash benchmarks/gpu_check.sh OUT_DIR --updates 24 --compile-timeout 120
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [--cpu-smoke] [--updates N] [--peak-tflops T] [--compile-timeout S]" \
         "[--data-dir DIR] [--deadline-seconds S]" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source scripts/python.sh
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# gpu_check.py takes its deadline from this (less a margin), so that it ends before the timeout.
export GPU_CHECK_TIMEOUT="${GPU_CHECK_TIMEOUT:-480}"

# Before spending any time: the packages the check imports beside torch.
"$PYTHON" - <<'EOF' || exit 3
import importlib
import sys

missing = []
for name in ("fairseq", "hydra", "omegaconf"):
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("gpu_check.sh: cannot import " + "; ".join(missing) + ".\n"
             "Supply them before the check: put the wheels in .whl/ (BENCHMARKS.md, \"GPU: slam_paper on one "
             "H200\", lists the pip download and pip wheel commands: ve-fairseq, hydra-core, omegaconf, "
             "antlr4-python3-runtime, bitarray, editdistance, fairscale), then\n"
             "    pip install --no-index --no-deps --target .whl/site .whl/*.whl\n"
             "    PYTHONPATH=$PWD/.whl/site bash benchmarks/gpu_check.sh OUT_DIR ...\n"
             "or, with a network, run scripts/install.sh.")
try:
    importlib.import_module("fairscale")
except Exception:
    print("gpu_check.sh: fairscale is missing: the 1-GPU fully_sharded part will be skipped", file=sys.stderr)
EOF

if [ "${GPU_CHECK_PRESET:-}" = "slam_tiny" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    set -- "$@" --cpu-smoke
fi
# -k: a process stuck in CUDA that ignores SIGTERM is killed 10 s later.
exec timeout -k 10 "$GPU_CHECK_TIMEOUT" "$PYTHON" benchmarks/gpu_check.py "$@"
