"""``--ddp-backend legacy_ddp`` for a pre-training run that fairseq would wrap in PyTorch's DDP.

``slam_pretraining`` back-propagates once per modality inside one update (the speech, text and
pair batches), and each pass leaves some parameters without a gradient (the MSM heads in the text
pass, the text embedding in the speech pass). fairseq's default ``--ddp-backend pytorch_ddp`` (and
its alias ``c10d``) wraps the model in PyTorch's ``DistributedDataParallel``, whose reducer expects
every parameter of the synchronised pass to receive a gradient; and on the CPU fairseq hands it
``device_ids``, which it refuses. ``legacy_ddp`` (fairseq's own) all-reduces the summed gradients
once per update and counts a missing gradient as zero, which is what the update needs.

:func:`use_legacy_ddp_for_several_backward_passes` switches a ``pytorch_ddp``/``c10d`` run with
several ranks to ``legacy_ddp`` before fairseq builds its trainer (the task is set up first), with
a WARNING; ``slam-fairseq-train`` sets ``legacy_ddp`` itself. So ``fairseq-train --user-dir
slam_fairseq`` started on a node of several GPUs (fairseq spawns one process per GPU) trains.
"""
from __future__ import annotations

import logging
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["PYTORCH_DDP_BACKENDS", "use_legacy_ddp_for_several_backward_passes"]

PYTORCH_DDP_BACKENDS = ("pytorch_ddp", "c10d")
LEGACY_DDP_BACKEND = "legacy_ddp"


def _root_config(task_cfg):
    """The whole fairseq config that ``task_cfg`` (fairseq's ``cfg.task``) belongs to, or None
    (a task config built on its own, as tests and scripts do)."""
    parent = getattr(task_cfg, "__dict__", {}).get("_parent")
    while parent is not None and getattr(parent, "__dict__", {}).get("_parent") is not None:
        parent = parent.__dict__["_parent"]
    return parent


def use_legacy_ddp_for_several_backward_passes(task_cfg, task_name: str) -> Optional[str]:
    """Switch the run's ``--ddp-backend`` from PyTorch's DDP to ``legacy_ddp`` when it trains on
    several ranks (module docstring). Returns the backend it replaced, or None."""
    root = _root_config(task_cfg)
    training = getattr(root, "distributed_training", None) if root is not None else None
    if training is None:
        return None
    backend = training.get("ddp_backend")
    world_size = training.get("distributed_world_size") or 1
    if backend not in PYTORCH_DDP_BACKENDS or int(world_size) <= 1:
        return None
    training.ddp_backend = LEGACY_DDP_BACKEND
    logger.warning(f"--ddp-backend {backend} -> {LEGACY_DDP_BACKEND}: {task_name} runs one backward pass per "
                   f"modality in each update, each leaving some parameters without a gradient, which PyTorch's "
                   f"DistributedDataParallel does not allow ({LEGACY_DDP_BACKEND} all-reduces the update's "
                   f"gradients once, a missing gradient counted as zero); give --ddp-backend {LEGACY_DDP_BACKEND} "
                   f"to silence this")
    return backend
