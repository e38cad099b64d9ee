"""Conformer block (macaron FFN halves, self-attention, convolution, FFN half, LayerNorm).

Differences from the textbook block, both required by SLAM's multimodal use:
- the convolution module normalises with :class:`MaskedGroupNorm` instead of BatchNorm;
- padded positions never reach a real one: the depthwise convolution sees zeros at padding and the
  GroupNorm statistics are taken over real frames only, so a sequence gives the same output alone
  or in a padded batch.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slam_fairseq.modules.attention import RotarySelfAttention, attention_bias
from slam_fairseq.modules.dropout import Dropout
from slam_fairseq.modules.masked_group_norm import GroupNormFrames, MaskedGroupNorm
from slam_fairseq.modules.rotary import RotaryTables

__all__ = ["ConformerLayer", "ConformerStack", "MaskedGroupNorm"]


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    In the convolution module the (B, C, T) activations after the depthwise convolution are
    contiguous, but their gradient arrives through ``transpose(1, 2)`` as a (B, T, C) layout; the
    element-wise backwards of SiLU and the GroupNorm then pair two layouts, which on a CPU leaves
    their vectorised loops (3-5x slower per element). One explicit transposing copy puts the
    gradient in the activations' layout first."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.contiguous()


class _FeedForward(nn.Module):
    """Pre-LayerNorm position-wise FFN with Swish (one macaron half; the 0.5 is applied by the layer)."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float, activation_dropout: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation_dropout = Dropout(activation_dropout)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation_dropout(F.silu(self.fc1(self.layer_norm(x))))
        return self.dropout(self.fc2(hidden))


class _ConvolutionModule(nn.Module):
    """Pointwise conv + GLU, masked depthwise conv, masked GroupNorm, Swish, pointwise conv."""

    def __init__(self, embed_dim: int, kernel_size: int, norm_groups: int, dropout: float) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"depthwise kernel_size must be odd, got {kernel_size}")
        if embed_dim % norm_groups != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by conv_norm_groups {norm_groups}")
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.pointwise_in = nn.Linear(embed_dim, 2 * embed_dim)
        self.depthwise = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2,
                                   groups=embed_dim)
        self.norm = MaskedGroupNorm(norm_groups, embed_dim)
        self.pointwise_out = nn.Linear(embed_dim, embed_dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor,
                norm_frames: Optional[GroupNormFrames] = None) -> torch.Tensor:
        """x: (B, T, D); padding_mask: (B, T); norm_frames: the stack's ``self.norm.frames(padding_mask)``
        (made here by default). Returns (B, T, D)."""
        hidden = F.glu(self.pointwise_in(self.layer_norm(x)), dim=-1)
        hidden = hidden.masked_fill(padding_mask.unsqueeze(-1), 0.0).transpose(1, 2)
        hidden = _ContiguousGradient.apply(F.silu(self.norm(self.depthwise(hidden), padding_mask, norm_frames)))
        return self.dropout(self.pointwise_out(hidden.transpose(1, 2)))


class ConformerLayer(nn.Module):
    """One macaron Conformer block.

    Args:
        embed_dim: model width D.
        ffn_dim: hidden size of each feed-forward half.
        num_heads: attention heads.
        kernel_size: depthwise convolution kernel (odd).
        conv_norm_groups: groups of the convolution module's GroupNorm.
        dropout, attention_dropout, activation_dropout: as in fairseq.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_heads: int, kernel_size: int,
                 conv_norm_groups: int = 1, dropout: float = 0.1, attention_dropout: float = 0.1,
                 activation_dropout: float = 0.1) -> None:
        super().__init__()
        self.ffn_first = _FeedForward(embed_dim, ffn_dim, dropout, activation_dropout)
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.attention = RotarySelfAttention(embed_dim, num_heads, attention_dropout)
        self.attention_dropout = Dropout(dropout)
        self.convolution = _ConvolutionModule(embed_dim, kernel_size, conv_norm_groups, dropout)
        self.ffn_second = _FeedForward(embed_dim, ffn_dim, dropout, activation_dropout)
        self.final_norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor,
                bias: Union[torch.Tensor, None, str] = "auto",
                rotary_tables: Optional[RotaryTables] = None,
                norm_frames: Optional[GroupNormFrames] = None) -> torch.Tensor:
        """x: (B, T, D); padding_mask: (B, T) bool, True at padding; bias: the stack's
        :func:`attention_bias` (made here by default); rotary_tables: the stack's RoPE tables for T
        (made here by default); norm_frames: the stack's GroupNorm frames (made here by default).
        Returns (B, T, D)."""
        # x + 0.5 * f(x) as one operator: the same sum in float32 and bfloat16, where the halving is
        # exact; in float16 (--fp16) a halved value below 2**-14 no longer rounds to a subnormal first
        x = torch.add(x, self.ffn_first(x), alpha=0.5)
        x = x + self.attention_dropout(self.attention(self.attention_norm(x), padding_mask, bias, rotary_tables))
        x = x + self.convolution(x, padding_mask, norm_frames)
        x = torch.add(x, self.ffn_second(x), alpha=0.5)
        return self.final_norm(x)


class ConformerStack(nn.Module):
    """A stack of :class:`ConformerLayer`, optionally with activation checkpointing per layer.

    Args:
        num_layers: number of blocks.
        checkpoint_activations: recompute each block in backward (``torch.utils.checkpoint``) to
            trade compute for memory on large presets.
        other arguments: see :class:`ConformerLayer`.
    """

    def __init__(self, num_layers: int, embed_dim: int, ffn_dim: int, num_heads: int,
                 kernel_size: int, conv_norm_groups: int = 1, dropout: float = 0.1,
                 attention_dropout: float = 0.1, activation_dropout: float = 0.1,
                 checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ConformerLayer(embed_dim, ffn_dim, num_heads, kernel_size, conv_norm_groups, dropout,
                           attention_dropout, activation_dropout)
            for _ in range(num_layers))
        self.checkpoint_activations = checkpoint_activations

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor,
                return_all_hiddens: bool = False, *, padded: Optional[bool] = None,
                num_layers: Optional[int] = None) -> List[torch.Tensor]:
        """x: (B, T, D); padding_mask: (B, T) bool, True at padding; padded: whether any position
        is padding, when the host knows it (see :func:`attention_bias`); num_layers: run only the
        first ones (feature extraction from an inner layer), all by default. Returns the outputs of
        every layer run (or only the last, in a list).

        The attention mask (:func:`attention_bias`), the RoPE tables and the GroupNorm's real frames
        are made once for all layers."""
        hiddens = []
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        if not len(layers):
            return hiddens if return_all_hiddens else [x]
        bias: Optional[torch.Tensor] = attention_bias(padding_mask, padded=padded)
        tables = self.layers[0].attention.rotary.tables(x.shape[1], x.device)
        frames = self.layers[0].convolution.norm.frames(padding_mask)
        for layer in layers:
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, padding_mask, bias, tables, frames, use_reentrant=False)
            else:
                x = layer(x, padding_mask, bias, tables, frames)
            if return_all_hiddens:
                hiddens.append(x)
        return hiddens if return_all_hiddens else [x]
