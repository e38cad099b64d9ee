"""Padding masks from lengths, made once and passed down (True marks a padded position)."""
from __future__ import annotations

from typing import Optional

import torch


def lengths_to_padding_mask(lengths: torch.Tensor, max_length: Optional[int] = None) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool mask, True where the position is padding."""
    max_length = int(lengths.max().item()) if max_length is None else max_length
    positions = torch.arange(max_length, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)


def padding_mask_to_lengths(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool padding mask -> (B,) long lengths (padding is always at the end)."""
    return (~padding_mask).long().sum(dim=1)
