"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slam_fairseq.modules.rotary import RotaryPositionalEmbedding


class RotarySelfAttention(nn.Module):
    """Self-attention with rotary positions and a key padding mask.

    Args:
        embed_dim: model width D.
        num_heads: attention heads (D must divide evenly).
        dropout: attention-probability dropout, applied inside the fused kernel.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.rotary = RotaryPositionalEmbedding(self.head_dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, T, D).
            padding_mask: (B, T) bool, True at padding; padded keys get no attention.
        Returns:
            (B, T, D).
        """
        batch_size, length, embed_dim = x.shape
        qkv = self.qkv_proj(x).view(batch_size, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        query, key = self.rotary(query, key)
        attend = (~padding_mask)[:, None, None, :]
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0)
        output = output.transpose(1, 2).reshape(batch_size, length, embed_dim)
        return self.out_proj(output)
