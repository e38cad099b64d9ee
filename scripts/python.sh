# Sourced by install.sh, test.sh and demo.sh: the Python they install into and run.
# $PYTHON when given; else the repository's .venv when install.sh made one (a system Python that
# pip may not install into, PEP 668); else python3.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON="$PWD/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
export PYTHON
