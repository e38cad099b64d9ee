"""Rotary position embedding (RoPE) for self-attention.

Why RoPE: it rotates queries and keys before attention, so the attention itself stays a plain
``scaled_dot_product_attention`` call and GPUs keep their fused kernels (flash / memory-efficient),
which an additive relative-position bias (Transformer-XL, T5) would forbid or slow down. It is
relative (scores depend on i - j only), needs no learned table, and works for any length, including
the concatenation [speech ; text] in the multimodal encoder.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

RotaryTables = Tuple[torch.Tensor, torch.Tensor]


def rotate(x: torch.Tensor, tables: RotaryTables, time_dim: int) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by position along ``time_dim``.

    ``x * cos + swap_halves(x) * signed_sin``, where ``swap_halves`` exchanges the two halves of the
    last dimension and ``signed_sin`` is sin with its first half negated: the RoFormer rotation
    ``x * cos + cat(-second, first) * sin``, in four operators. Computed in float32, returned in
    ``x``'s dtype.

    Args:
        x: (..., T, ..., head_dim) with T at ``time_dim``.
        tables: :meth:`RotaryPositionalEmbedding.tables` for T.
        time_dim: where T is in ``x`` (negative, counted from the end).
    """
    cos, signed_sin = tables
    shape = [cos.shape[0]] + [1] * (-time_dim - 2) + [cos.shape[1]]
    cos, signed_sin = cos.view(shape), signed_sin.view(shape)
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    return (x_float * cos + torch.cat((second, first), dim=-1) * signed_sin).to(x.dtype)


class RotaryPositionalEmbedding(nn.Module):
    """Applies RoPE to (B, H, T, head_dim) queries or keys.

    Args:
        head_dim: size of one attention head (must be even).
        base: wavelength base of the rotation frequencies (10000 as in RoFormer).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inverse_frequency = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)

    def tables(self, length: int, device: torch.device) -> RotaryTables:
        """(cos, signed sin), each (T, head_dim) float32, for :func:`rotate`.

        Every layer of a stack has the same tables for a given length: a stack makes them once."""
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = torch.outer(positions, self.inverse_frequency.to(device=device, dtype=torch.float32))
        sin = angles.sin()
        return angles.cos().repeat(1, 2), torch.cat((-sin, sin), dim=-1)

    def forward(self, query: torch.Tensor, key: torch.Tensor):
        """Rotate (B, H, T, head_dim) query and key; computed in float32, returned in their dtype."""
        tables = self.tables(query.shape[-2], query.device)
        return rotate(query, tables, time_dim=-2), rotate(key, tables, time_dim=-2)
