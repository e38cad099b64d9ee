"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from slam_fairseq.modules.padding import may_read_device_values, require
from slam_fairseq.modules.rotary import RotaryPositionalEmbedding, RotaryTables, rotate


def attention_bias(padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32,
                   padded: Optional[bool] = None) -> Optional[torch.Tensor]:
    """The ``attn_mask`` that keeps SDPA's fused kernels, made once per layer stack.

    An additive (B, 1, 1, T) float mask, 0 at real keys and -inf at padded ones; a boolean mask
    gives the same result but rules out the flash kernel on CUDA and is slower than a float one in
    the other kernels. None when no position is padding, which leaves every kernel open, flash
    included.

    Whether a position is padding is ``padded`` when the caller knows it on the host (the
    collaters ship each row's length as Python ints, ``lengths_on_host``); a ``False`` is checked
    against the mask (on an accelerator by an asynchronous assert). Otherwise it is read from the
    mask on a CPU; on an accelerator reading it would be a host sync per stack (see
    :func:`~slam_fairseq.modules.padding.may_read_device_values`), so there the mask is made.

    Args:
        padding_mask: (B, T) bool, True at padding; every row has at least one real position.
        dtype: the dtype of the mask (cast to the query's dtype in each layer).
        padded: whether any position of ``padding_mask`` is True, known on the host; None: unknown.
    """
    if padded is None:
        padded = not may_read_device_values(padding_mask.device) or bool(padding_mask.any())
    elif not padded:
        require(~padding_mask.any(), "a batch said to have no padding (lengths_on_host) has padded positions")
    if not padded:
        return None
    bias = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
    return bias.masked_fill_(padding_mask, float("-inf"))[:, None, None, :]


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

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor,
                bias: Union[torch.Tensor, None, str] = "auto",
                rotary_tables: Optional[RotaryTables] = None) -> torch.Tensor:
        """
        Args:
            x: (B, T, D).
            padding_mask: (B, T) bool, True at padding; padded keys get no attention.
            bias: :func:`attention_bias` of ``padding_mask`` when the caller has made it (None: no
                padding); by default it is made here.
            rotary_tables: ``self.rotary.tables(T, device)`` when the caller has made them.
        Returns:
            (B, T, D).
        """
        batch_size, length, embed_dim = x.shape
        qkv = self.qkv_proj(x).view(batch_size, length, 3, self.num_heads, self.head_dim)
        if rotary_tables is None:
            rotary_tables = self.rotary.tables(length, x.device)
        # Query and key rotated together: (B, T, 2, H, head_dim), T at dim -4.
        query, key = rotate(qkv[:, :, :2], rotary_tables, time_dim=-4).permute(2, 0, 3, 1, 4).unbind(0)
        value = qkv[:, :, 2].transpose(1, 2)
        if isinstance(bias, str):
            bias = attention_bias(padding_mask)
        if bias is not None:
            bias = bias.to(query.dtype)
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        output = output.transpose(1, 2).reshape(batch_size, length, embed_dim)
        return self.out_proj(output)
