"""Speech-text matching (ALBEF's image-text matching): does this speech go with this text?

Pooling. SLAM's encoder has no [CLS] position, so the pair is summarised by the mean of the
multimodal encoder's output over every real position of the packed [speech ; text] sequence (padding
excluded). Whether the two sides match can only be decided inside the shared self-attention layers,
where every position attends to both sides; after them any position can carry that evidence, and the
mean gathers it from all of them without depending on padding or on the other rows of the batch. A
BERT-style pooler (dense + tanh) then a linear layer give two scores (mismatch, match).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slam_fairseq.modules.dropout import Dropout
from slam_fairseq.objectives.masked_prediction import ObjectiveOutput


def masked_mean_pool(hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states and (B, T) bool padding mask (True at padding) -> (B, D) mean of real positions."""
    real = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
    total = (hidden * real).float().sum(dim=1)
    return (total / real.float().sum(dim=1).clamp(min=1.0)).to(hidden.dtype)


class PairMatchingClassifier(nn.Module):
    """masked mean pool -> dense -> tanh -> dropout -> linear to 2 classes (0: mismatch, 1: match).

    Args:
        embed_dim: model width D.
        dropout: dropout after the pooler.
    """

    def __init__(self, embed_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.dropout = Dropout(dropout)
        self.output_projection = nn.Linear(embed_dim, 2)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) packed pair states, (B, T) padding mask -> (B, 2) scores."""
        pooled = torch.tanh(self.dense(masked_mean_pool(hidden, padding_mask)))
        return self.output_projection(self.dropout(pooled))


def stm_loss(logits: torch.Tensor, labels: torch.Tensor) -> ObjectiveOutput:
    """Binary cross-entropy (as a 2-way softmax) of the match labels, averaged over the pairs.

    Args:
        logits: (B, 2) scores (mismatch, match), any dtype (computed in float32).
        labels: (B,) long, 1 for a true pair, 0 for a mismatched one.
    """
    logits = logits.float()
    count = torch.full((), labels.numel(), dtype=torch.long, device=logits.device)  # no host-to-device copy
    loss = F.cross_entropy(logits, labels, reduction="sum") / count.clamp(min=1)
    return ObjectiveOutput(loss, (logits.argmax(dim=-1) == labels).sum(), count)
