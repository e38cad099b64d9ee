# Sourced by install.sh, test.sh, demo.sh and benchmarks/gpu_check.sh: the Python they install
# into and run. $PYTHON when given (unless it is a system Python that pip may not install into,
# PEP 668, and install.sh made .venv from it); else the repository's .venv when install.sh made
# one; else python3.
if [ -x .venv/bin/python ]; then
  if [ -z "${PYTHON:-}" ]; then
    PYTHON="$PWD/.venv/bin/python"
  elif "$PYTHON" -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)' 2>/dev/null; then
    PYTHON="$PWD/.venv/bin/python"
  fi
fi
PYTHON=${PYTHON:-python3}
export PYTHON
