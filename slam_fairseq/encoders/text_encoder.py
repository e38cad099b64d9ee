"""SLAM text encoder: scaled token embedding + sinusoidal positions, then LayerNorm."""
from __future__ import annotations

import math

import torch
from fairseq.modules import SinusoidalPositionalEmbedding
from fairseq.utils import make_positions
from torch import nn

from slam_fairseq.modules.dropout import Dropout


class TextEncoder(nn.Module):
    """Embeds token ids; the contextual work is left to the multimodal encoder, as in SLAM.

    Args:
        vocab_size: dictionary size.
        embed_dim: model width D.
        padding_idx: index of the padding token (its positions get no position signal).
        max_positions: longest text accepted.
        dropout: dropout on the embedded tokens.
    """

    def __init__(self, vocab_size: int, embed_dim: int, padding_idx: int, max_positions: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.max_positions = max_positions
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=embed_dim ** -0.5)
        nn.init.zeros_(self.embed_tokens.weight[padding_idx])
        self.embed_scale = math.sqrt(embed_dim)
        self.embed_positions = SinusoidalPositionalEmbedding(
            embed_dim, padding_idx, init_size=max_positions + padding_idx + 1)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = Dropout(dropout)

    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) fairseq's sinusoidal embeddings of the positions of ``tokens`` (padding: the
        padding row), read from its table directly: its ``forward`` reads the shape back from
        tensors, a scalar read per call."""
        positions = make_positions(tokens, self.padding_idx, onnx_trace=False)
        return self.embed_positions.weights.index_select(0, positions.reshape(-1)).view(*tokens.shape, -1).detach()

    def forward(self, tokens: torch.Tensor):
        """
        Args:
            tokens: (B, T) ids, right-padded with ``padding_idx``.
        Returns:
            ((B, T, D) embeddings, (B, T) bool padding mask).
        """
        if tokens.shape[1] > self.max_positions:
            raise ValueError(f"text of {tokens.shape[1]} tokens exceeds max_text_positions={self.max_positions}")
        padding_mask = tokens.eq(self.padding_idx)
        embedded = self.embed_scale * self.embed_tokens(tokens) + self._positions(tokens)
        embedded = self.dropout(self.layer_norm(embedded))
        return embedded.masked_fill(padding_mask.unsqueeze(-1), 0.0), padding_mask
