"""Utterances too short for the 4x subsampling, made safe for fine-tuning and decoding.

The two stride-2 convolutions need ``MIN_INPUT_FRAMES`` (7) feature frames for one output frame.
fairseq's ``speech_to_text`` filters nothing by minimum length, so a shorter utterance would reach
the encoder mid-run. :func:`extend_short_inputs` appends zero frames to such an utterance until it
has 7 and counts them as real frames: it then has exactly one encoder frame, which the decoder
can attend to (an utterance with no unmasked encoder frame would give NaN attention), and
fairseq-generate writes a hypothesis for it like for every other utterance.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES

__all__ = ["extend_short_inputs"]


def extend_short_inputs(features: torch.Tensor, lengths: torch.Tensor,
                        min_frames: int = MIN_INPUT_FRAMES) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Extend utterances shorter than ``min_frames`` with zero frames up to ``min_frames``.

    Args:
        features: (B, T, F) padded features.
        lengths: (B,) real frame counts.
    Returns:
        ((B, max(T, min_frames), F) features, (B,) lengths clamped to at least ``min_frames``,
        the number of utterances extended). Inputs without short utterances come back unchanged.
    """
    short = lengths < min_frames
    num_short = int(short.sum())
    if num_short == 0:
        return features, lengths, 0
    if features.shape[1] < min_frames:
        features = F.pad(features, (0, 0, 0, min_frames - features.shape[1]))
    positions = torch.arange(features.shape[1], device=features.device).unsqueeze(0)
    added = short.unsqueeze(1) & (positions >= lengths.unsqueeze(1)) & (positions < min_frames)
    features = features.masked_fill(added.unsqueeze(-1), 0.0)
    return features, lengths.clamp(min=min_frames), num_short
