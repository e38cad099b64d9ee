"""What every objective returns, and the masked cross-entropy that most of them are."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class ObjectiveOutput(NamedTuple):
    """One objective's result for one batch.

    loss: float32 scalar, the mean over the ``count`` positions it was computed on (0 when there
        are none; it stays connected to the graph so that a backward pass still works).
    num_correct: long scalar, positions whose prediction is right (for accuracy = num_correct / count).
    count: long scalar, positions the loss averages over.
    """

    loss: torch.Tensor
    num_correct: torch.Tensor
    count: torch.Tensor


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> ObjectiveOutput:
    """Cross-entropy averaged over the masked positions only.

    Args:
        logits: (..., V) scores, any dtype (computed in float32).
        targets: (...) long class ids.
        mask: optional (...) bool, True at the positions that count; None when ``logits`` already
            holds only those positions (as the model's heads give them).
    Returns:
        :class:`ObjectiveOutput` with the mean loss over the counted positions.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")
        logits, targets = logits[mask], targets[mask]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    count = torch.full((), targets.numel(), dtype=torch.long, device=logits.device)  # no host-to-device copy
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    num_correct = (logits.argmax(dim=-1) == targets).sum() if targets.numel() else count.new_zeros(())
    return ObjectiveOutput(loss_sum / count.clamp(min=1), num_correct, count)
