"""fairseq 0.12 checkpoints under PyTorch's weights-only loader (PyTorch >= 2.6).

fairseq 0.12 checkpoints written from the command line may hold an ``argparse.Namespace``
(``args``) and NumPy scalars in logged meters. We allow-list exactly those types instead of
switching the safe loader off.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

CHECKPOINT_SAFE_TYPES = [argparse.Namespace]


def _numpy_scalar_types() -> list:
    types = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    try:
        from numpy._core.multiarray import scalar  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar  # type: ignore
    return types + [scalar]


def allow_fairseq_checkpoint_types() -> None:
    """Register the types fairseq checkpoints hold with torch's weights-only unpickler."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:
        add_safe_globals(CHECKPOINT_SAFE_TYPES + _numpy_scalar_types())
