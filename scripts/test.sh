#!/usr/bin/env bash
# Installs everything the tests use (scripts/install.sh --tests) and runs the test suite (CI's job).
# Slow end-to-end runs are marked `slow` and left out; run them with: python -m pytest -m slow tests
#
# The suite runs on TEST_WORKERS pytest-xdist workers (default 2, one test file per worker at a
# time), each with one torch thread (OMP_NUM_THREADS=1, which the fairseq processes the tests start
# inherit): most of the suite is fairseq processes that spend seconds importing and then train
# tiny models, so two of them share two cores better than one with two threads.
# TEST_WORKERS=0 runs everything in one process with torch's own thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --tests
source scripts/python.sh
WORKERS=${TEST_WORKERS:-2}
if [ "$WORKERS" = 0 ]; then
  exec "$PYTHON" -m pytest -q -m "not slow" tests "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m pytest -q -m "not slow" -n "$WORKERS" --dist loadfile tests "$@"
