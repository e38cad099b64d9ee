#!/usr/bin/env bash
# Installs everything the tests use (scripts/install.sh --tests) and runs the test suite (CI's job).
# Slow end-to-end runs are marked `slow` and left out; run them with: python -m pytest -m slow tests
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --tests
exec "${PYTHON:-python3}" -m pytest -q -m "not slow" tests "$@"
