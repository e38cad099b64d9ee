"""Padding masks from lengths, made once and passed down (True marks a padded position), the rule
for when the model may read a device value to decide a shape or a branch, and the check of what
the host says about a batch's padding against its masks."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

_SYNC_FREE_EVERYWHERE = False


def may_read_device_values(device: torch.device) -> bool:
    """Whether the model may read a value of a tensor on ``device`` to take a cheaper path.

    On a CPU the value is already in host memory. On an accelerator reading it makes the host
    wait until every queued kernel has run (a host-device sync, which empties the launch queue),
    so there the model takes paths that need no value: an attention mask even for a batch without
    padding, a packed width from the padded widths, an asynchronous device assert.
    :func:`sync_free_paths` makes every device take those paths (tests run them on a CPU)."""
    return device.type == "cpu" and not _SYNC_FREE_EVERYWHERE


@contextlib.contextmanager
def sync_free_paths() -> Iterator[None]:
    """Within the block, :func:`may_read_device_values` is False on every device."""
    global _SYNC_FREE_EVERYWHERE
    previous, _SYNC_FREE_EVERYWHERE = _SYNC_FREE_EVERYWHERE, True
    try:
        yield
    finally:
        _SYNC_FREE_EVERYWHERE = previous


def require(condition: torch.Tensor, message: str) -> None:
    """Fail with ``message`` unless the 0-dim bool ``condition`` holds.

    Where :func:`may_read_device_values` allows it, a ValueError now; elsewhere an asynchronous
    device assert, which stops the run when the device reaches it without making the host wait."""
    if may_read_device_values(condition.device):
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def lengths_to_padding_mask(lengths: torch.Tensor, max_length: Optional[int] = None) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool mask, True where the position is padding."""
    max_length = int(lengths.max().item()) if max_length is None else max_length
    positions = torch.arange(max_length, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)


def padding_mask_to_lengths(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool padding mask -> (B,) long lengths (padding is always at the end)."""
    return (~padding_mask).long().sum(dim=1)
