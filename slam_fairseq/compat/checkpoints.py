"""fairseq 0.12 checkpoints under PyTorch's weights-only loader (PyTorch >= 2.6).

fairseq 0.12 checkpoints written from the command line may hold an ``argparse.Namespace``
(``args``) and NumPy scalars in logged meters. We allow-list exactly those types instead of
switching the safe loader off. With several ranks, rank 0 reads the checkpoint and broadcasts it
as a torch-pickled object whose ``cfg`` is an OmegaConf ``DictConfig`` (``Trainer.load_checkpoint``):
omegaconf's container types and fairseq's tensor placeholder are allow-listed too
(:func:`_broadcast_checkpoint_types`).
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


def _broadcast_checkpoint_types() -> list:
    """The types of fairseq's broadcast checkpoint: a ``DictConfig`` of plain values, and the
    placeholders ``broadcast_object`` puts where the tensors were."""
    import collections
    import typing

    from fairseq.distributed.utils import _TensorPlaceholder  # tensors travel beside the pickle
    from omegaconf import DictConfig, ListConfig, base, nodes

    return [_TensorPlaceholder, DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, nodes.AnyNode,
            nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, typing.Any,
            collections.defaultdict, dict, list, int, float, str, bool]


def allow_fairseq_checkpoint_types() -> None:
    """Register the types fairseq checkpoints hold with torch's weights-only unpickler."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:
        add_safe_globals(CHECKPOINT_SAFE_TYPES + _numpy_scalar_types() + _broadcast_checkpoint_types())
        # a checkpoint names NumPy's scalar constructor by the module of the NumPy that wrote it
        # (numpy.core in 1.x, numpy._core in 2.x): both names, so that either loads under either
        scalar = _numpy_scalar_types()[-1]
        try:
            add_safe_globals([(scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")])
        except (TypeError, ValueError):  # a torch whose allow-list takes no (object, name) pairs
            pass
