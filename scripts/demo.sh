#!/usr/bin/env bash
# Installs everything (scripts/install.sh) and runs the main job on a synthesized corpus:
# corpus -> manifests -> pre-training (2 stages) -> ST and ASR fine-tuning (pre-trained vs scratch,
# 2 seeds) -> fairseq-generate -> BLEU / WER report. About 25 minutes on 2 CPU cores.
# Extra arguments go to examples/demo/run_demo.py (e.g. --work DIR, --size ci).
# --realspeech (first argument) runs the real-speech track instead: examples/realspeech/run_realspeech.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/python.sh
if [ "${1:-}" = "--realspeech" ]; then
  shift
  exec "$PYTHON" examples/realspeech/run_realspeech.py "$@"
fi
exec "$PYTHON" examples/demo/run_demo.py "$@"
