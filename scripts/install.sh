#!/usr/bin/env bash
# Installs slam-fairseq and everything it runs with, on a fresh machine or beside a working set-up.
#
# - keeps a torch that imports (GPU machines bring their own); else installs torch==${TORCH_VERSION}
#   by exact version: PyPI's (CUDA) build where nvidia-smi finds a GPU, PyTorch's CPU build
#   (torch==${TORCH_VERSION}+cpu from $TORCH_CPU_INDEX) elsewhere, never letting pip resolve torch
#   freely;
# - keeps a fairseq 0.12 that imports; else installs a Python-3.11-capable fairseq 0.12 build
#   (ve-fairseq wheels for CPython 3.11/3.12, fairseq-fixed from source otherwise) WITHOUT its
#   torchaudio requirement (torchaudio cannot load beside torch 2.13 CPU), plus fairseq's real deps;
# - installs fairscale (fairseq's --ddp-backend fully_sharded) without its dependencies;
# - installs espeak-ng and sox (speech synthesis for the demo corpus and the tests) when run as root
#   with apt-get;
# - installs this package in editable mode, and pytest (with pytest-timeout and pytest-xdist) with --tests.
#
# Usage: bash scripts/install.sh [--tests]      (PYTHON=python3.11 TORCH_VERSION=2.13.0
#        TORCH_CPU_INDEX=URL to override)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
WITH_TESTS=0
for argument in "$@"; do
  case "$argument" in
    --tests) WITH_TESTS=1 ;;
    *) echo "install.sh: unknown argument $argument (expected --tests)" >&2; exit 2 ;;
  esac
done
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }
say() { echo "[install] $*"; }

# 1. Speech synthesis tools (Debian/Ubuntu).
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null || ! [ -d /usr/share/games/fortunes ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "apt-get install espeak-ng sox libsox-fmt-mp3 fortunes"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox libsox-fmt-mp3 fortunes >/dev/null
  else
    say "WARNING: espeak-ng/sox missing and no root apt-get: the demo corpus and speech tests need them"
  fi
fi

# 1b. A Python that pip may install into: a system Python marked externally managed (PEP 668,
#     Debian 12, Ubuntu 24.04) or without pip gets a virtual environment, .venv, which test.sh and
#     demo.sh then use (scripts/python.sh).
if "$PYTHON" - <<'EOF'
import importlib.util, os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if not in_venv and (managed or importlib.util.find_spec("pip") is None) else 1)
EOF
then
  if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "apt-get install python3-venv (for .venv)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      echo "install.sh: $PYTHON is a system Python that pip may not install into, and it cannot make a" \
           "virtual environment (install python3-venv), or give PYTHON=/path/to/another/python" >&2
      exit 1
    fi
  fi
  say "$PYTHON is a system Python that pip may not install into: installing into .venv"
  "$PYTHON" -m venv .venv
  PYTHON="$PWD/.venv/bin/python"
  export PYTHON
fi

# 2. PyTorch: keep a working one.
if "$PYTHON" -c "import torch" 2>/dev/null; then
  say "keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  say "installing torch==$TORCH_VERSION (an NVIDIA GPU is here: PyPI's CUDA build)"
  pip_install "torch==$TORCH_VERSION"
else
  # without a GPU, PyPI's build would bring GBs of CUDA packages: PyTorch's CPU build instead
  say "installing torch==$TORCH_VERSION+cpu (no NVIDIA GPU; ${TORCH_CPU_INDEX})"
  pip_install "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX"
fi

# 3. fairseq 0.12: keep a working one.
FAIRSEQ_DEPS=(cffi cython "hydra-core>=1.3.2" omegaconf "numpy>=1.21.3" regex "sacrebleu>=1.4.12" tqdm bitarray scikit-learn packaging)
# A fairseq that imports, of the 0.12 series, with the internals of the builds after the 0.12.2
# release that the plugin calls (slam_fairseq/compat/__init__.py: missing_fairseq_internals).
USABLE_FAIRSEQ='import inspect, fairseq, fairseq.models, fairseq_cli.train
from fairseq.tasks import FairseqTask
from fairseq.data.iterators import EpochBatchIterator
assert fairseq.__version__.startswith("0.12")
assert "from_checkpoint" in inspect.signature(FairseqTask.build_criterion).parameters
assert "persistent_workers" in inspect.signature(EpochBatchIterator.__init__).parameters'
if "$PYTHON" -c "$USABLE_FAIRSEQ" 2>/dev/null; then
  say "keeping fairseq $("$PYTHON" -c 'import fairseq; print(fairseq.__version__)' 2>/dev/null)"
else
  for installed in fairseq ve-fairseq fairseq-fixed; do
    if "$PYTHON" -m pip show -q "$installed" >/dev/null 2>&1; then
      say "the installed '$installed' does not import on this Python or is not a 0.12.3 build: replacing it"
      "$PYTHON" -m pip uninstall -y -q "$installed"
    fi
  done
  PY_TAG=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
  case "$PY_TAG" in
    311|312) FAIRSEQ_DIST="ve-fairseq==0.12.3" ;;
    *) FAIRSEQ_DIST="fairseq-fixed==0.12.3.1" ;;
  esac
  say "installing $FAIRSEQ_DIST without torchaudio, and fairseq's other dependencies"
  pip_install "${FAIRSEQ_DEPS[@]}"
  pip_install --no-deps "$FAIRSEQ_DIST"
  "$PYTHON" -c "$USABLE_FAIRSEQ" 2>/dev/null \
    || { echo "install.sh: fairseq installed but does not import, or lacks what slam_fairseq calls" >&2; exit 1; }
fi

# 3b. fairscale: fairseq 0.12's --ddp-backend fully_sharded needs it (pure Python; no-deps keeps torch).
if ! "$PYTHON" -c "import fairscale" 2>/dev/null; then
  say "installing fairscale==0.4.13 (--ddp-backend fully_sharded)"
  pip_install --no-deps "fairscale==0.4.13"
fi

# 4. This package (its requirements name neither torch nor fairseq, see setup.py).
say "installing slam-fairseq (editable)"
pip_install --no-build-isolation -e .
if [ "$WITH_TESTS" = 1 ]; then pip_install pytest pytest-timeout pytest-xdist; fi
"$PYTHON" -c "import slam_fairseq, tensorboardX"
say "done"
