"""SLAM speech encoder: log-Mel -> Conv2d subsampling (4x) -> N Conformer layers -> projection."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from slam_fairseq.modules.conformer import ConformerStack
from slam_fairseq.modules.dropout import Dropout
from slam_fairseq.modules.padding import lengths_to_padding_mask
from slam_fairseq.modules.subsampling import Conv2dSubsampling


@dataclass
class SpeechEncoderOutput:
    """What the objectives need from the speech side.

    subsampled: (B, T', D) features after subsampling, before any masking (the quantizer's input).
    output: (B, T', D) the speech encoder's projected output (the contrastive loss's input).
    padding_mask: (B, T') bool, True at padding.
    padded: whether any position is padding, when the host knows it (None: unknown); the
        multimodal pass over this output alone takes it too.
    """

    subsampled: torch.Tensor
    output: torch.Tensor
    padding_mask: torch.Tensor
    padded: Optional[bool] = None


class SpeechEncoder(nn.Module):
    """
    Args:
        input_dim: log-Mel bins (80).
        conv_channels: channels of the two Conv2d layers.
        embed_dim, ffn_dim, num_heads, kernel_size, conv_norm_groups, num_layers: Conformer sizes.
        dropout, attention_dropout, activation_dropout: as in fairseq.
        checkpoint_activations: recompute Conformer layers in backward.
    """

    def __init__(self, input_dim: int, conv_channels: int, embed_dim: int, ffn_dim: int,
                 num_heads: int, kernel_size: int, num_layers: int, conv_norm_groups: int = 1,
                 dropout: float = 0.1, attention_dropout: float = 0.1,
                 activation_dropout: float = 0.1, checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.subsampling = Conv2dSubsampling(input_dim, conv_channels, embed_dim)
        self.dropout = Dropout(dropout)
        self.mask_embedding = nn.Parameter(torch.empty(embed_dim).uniform_())
        self.conformer = ConformerStack(num_layers, embed_dim, ffn_dim, num_heads, kernel_size,
                                        conv_norm_groups, dropout, attention_dropout,
                                        activation_dropout, checkpoint_activations)
        self.output_projection = nn.Linear(embed_dim, embed_dim)

    def subsample(self, features: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) padded log-Mel frames and (B,) frame counts -> ((B, T', D) subsampled frames,
        (B, T') bool padding mask, True at padding). Deterministic (no dropout), so one result can
        feed several :meth:`encode_subsampled` passes of the same batch (masked and unmasked)."""
        subsampled, output_lengths = self.subsampling(features, lengths)
        return subsampled, lengths_to_padding_mask(output_lengths, subsampled.shape[1])

    def encode_subsampled(self, subsampled: torch.Tensor, padding_mask: torch.Tensor,
                          frame_mask: Optional[torch.Tensor] = None, *,
                          padded: Optional[bool] = None) -> SpeechEncoderOutput:
        """The Conformer stack and projection over :meth:`subsample`'s output.

        Args:
            subsampled: (B, T', D) subsampled frames; padding_mask: (B, T') bool, True at padding.
            frame_mask: optional (B, T') bool; True frames are replaced by a learned mask embedding
                (masked speech modelling).
            padded: whether any subsampled frame is padding, when the host knows it.
        """
        hidden = subsampled
        if frame_mask is not None:
            hidden = torch.where(frame_mask.unsqueeze(-1), self.mask_embedding.to(hidden.dtype), hidden)
        hidden = self.conformer(self.dropout(hidden), padding_mask, padded=padded)[-1]
        output = self.output_projection(hidden).masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return SpeechEncoderOutput(subsampled=subsampled, output=output, padding_mask=padding_mask, padded=padded)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                frame_mask: Optional[torch.Tensor] = None, *, padded: Optional[bool] = None) -> SpeechEncoderOutput:
        """
        Args:
            features: (B, T, F) padded log-Mel frames.
            lengths: (B,) real frame counts.
            frame_mask: optional (B, T') bool over *subsampled* frames; True frames are replaced by
                a learned mask embedding (masked speech modelling).
            padded: whether any subsampled frame is padding, when the host knows it.
        """
        return self.encode_subsampled(*self.subsample(features, lengths), frame_mask, padded=padded)
