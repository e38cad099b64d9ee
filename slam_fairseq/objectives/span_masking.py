"""Span masking (SpanBERT) on text: predict the original tokens at the masked positions."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from slam_fairseq.objectives.masked_prediction import ObjectiveOutput, masked_cross_entropy


class TextPredictionHead(nn.Module):
    """BERT/RoBERTa-style LM head whose output projection is the token embedding (tied weights).

    dense -> GELU -> LayerNorm -> ``hidden @ embedding.T + bias``.

    Args:
        embed_dim: model width D.
        embedding_weight: (V, D) the text encoder's ``embed_tokens.weight`` (shared, not copied).
    """

    def __init__(self, embed_dim: int, embedding_weight: nn.Parameter) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.weight = embedding_weight
        self.bias = nn.Parameter(torch.zeros(embedding_weight.shape[0]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) multimodal states -> (..., V) token scores (model dtype)."""
        hidden = self.layer_norm(F.gelu(self.dense(hidden)))
        return F.linear(hidden, self.weight, self.bias)


def span_masking_loss(logits: torch.Tensor, targets: torch.Tensor,
                      mask: Optional[torch.Tensor] = None) -> ObjectiveOutput:
    """Cross-entropy at the masked tokens only.

    Args:
        logits: (B, L, V) or (N, V) token scores.
        targets: (B, L) or (N,) original ids.
        mask: (B, L) bool, True at masked tokens (``target != pad`` in a TEXT_BATCH); None when the
            inputs already hold only the N masked positions.
    """
    return masked_cross_entropy(logits, targets, mask)
