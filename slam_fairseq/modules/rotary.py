"""Rotary position embedding (RoPE) for self-attention.

Why RoPE: it rotates queries and keys before attention, so the attention itself stays a plain
``scaled_dot_product_attention`` call and GPUs keep their fused kernels (flash / memory-efficient),
which an additive relative-position bias (Transformer-XL, T5) would forbid or slow down. It is
relative (scores depend on i - j only), needs no learned table, and works for any length, including
the concatenation [speech ; text] in the multimodal encoder.
"""
from __future__ import annotations

import torch
from torch import nn


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

    def _cos_sin(self, length: int, device: torch.device):
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = torch.outer(positions, self.inverse_frequency.to(device=device, dtype=torch.float32))
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, query: torch.Tensor, key: torch.Tensor):
        """Rotate (B, H, T, head_dim) query and key; computed in float32, returned in their dtype."""
        cos, sin = self._cos_sin(query.shape[-2], query.device)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x_float = x.float()
            first, second = x_float.chunk(2, dim=-1)
            rotated_half = torch.cat((-second, first), dim=-1)
            return (x_float * cos + rotated_half * sin).to(x.dtype)

        return rotate(query), rotate(key)
