"""Translation language modelling (XLM) on a packed [speech ; text] pair.

Both sides of the pair are masked (about 75% of the subsampled frames and 50% of the tokens) and
the multimodal output predicts the masked text tokens (text head) and the quantizer's code ids of
the masked frames (code-id head, the same targets as MSM's masked prediction).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from slam_fairseq.objectives.masked_prediction import ObjectiveOutput, masked_cross_entropy
from slam_fairseq.objectives.msm import code_prediction_loss


class TlmOutput(NamedTuple):
    """text: masked-token prediction; speech: masked-frame code-id prediction (each a mean)."""

    text: ObjectiveOutput
    speech: ObjectiveOutput

    @property
    def loss(self) -> torch.Tensor:
        """text loss + speech loss: each side normalised over its own masked positions."""
        return self.text.loss + self.speech.loss


def tlm_losses(text_logits: torch.Tensor, text_targets: torch.Tensor, code_logits: torch.Tensor,
               code_targets: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
               frame_mask: Optional[torch.Tensor] = None) -> TlmOutput:
    """
    Args:
        text_logits: (N_t, V) at the masked tokens (or (B, L, V) with ``text_mask``).
        text_targets: (N_t,) original token ids (or (B, L)).
        code_logits: (N_s, G, C) at the masked frames (or (B, T', G, C) with ``frame_mask``).
        code_targets: (N_s, G) the quantizer's code ids (or (B, T', G)).
        text_mask, frame_mask: optional bool masks over the leading dimensions.
    """
    return TlmOutput(masked_cross_entropy(text_logits, text_targets, text_mask),
                     code_prediction_loss(code_logits, code_targets, frame_mask))
