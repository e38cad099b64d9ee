"""Span masks over subsampled speech frames (w2v-BERT / wav2vec 2.0 style), for MSM and TLM.

Every subsampled frame starts a masked span with probability ``start_prob``; a span covers
``span_length`` frames (clipped at the end of the utterance) and spans may overlap. The expected
masked fraction far from the edges is ``1 - (1 - start_prob) ** span_length``:

- MSM, w2v-BERT's recipe: start 0.065, spans of 10 -> about 49% of frames;
- TLM: start 0.13, spans of 10 -> about 75% of frames.

At least ``min_spans`` spans are drawn (default 1, as wav2vec 2.0's ``min_masks``), so that no
utterance is left without a masked frame; that only matters for very short utterances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["FrameMaskingSettings", "frame_span_mask", "expected_masked_fraction",
           "start_prob_for_fraction"]


@dataclass(frozen=True)
class FrameMaskingSettings:
    """
    Args:
        start_prob: probability that a subsampled frame starts a masked span.
        span_length: frames per span.
        min_spans: spans drawn at least (uniform starts) per utterance.
    """

    start_prob: float = 0.065
    span_length: int = 10
    min_spans: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_prob <= 1.0:
            raise ValueError(f"start probability must be in [0, 1], got {self.start_prob}")
        if self.span_length < 1:
            raise ValueError(f"span length must be >= 1, got {self.span_length}")

    def draw(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        """(num_frames,) bool mask, see :func:`frame_span_mask`."""
        return frame_span_mask(num_frames, self.start_prob, self.span_length, rng, self.min_spans)


def expected_masked_fraction(start_prob: float, span_length: int) -> float:
    """Masked fraction far from the utterance edges: ``1 - (1 - start_prob) ** span_length``."""
    return 1.0 - (1.0 - start_prob) ** span_length


def start_prob_for_fraction(fraction: float, span_length: int) -> float:
    """The start probability that masks ``fraction`` of the frames with spans of ``span_length``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"masked fraction must be in [0, 1), got {fraction}")
    return 1.0 - math.pow(1.0 - fraction, 1.0 / span_length)


def frame_span_mask(num_frames: int, start_prob: float, span_length: int,
                    rng: np.random.Generator, min_spans: int = 1) -> np.ndarray:
    """Draw a frame mask.

    Args:
        num_frames: number of subsampled frames T'.
        start_prob: probability that a frame starts a span.
        span_length: frames per span.
        rng: the example's generator (``pretraining_seeding.masking_rng``).
        min_spans: spans to draw (uniform starts) when the Bernoulli draw gives fewer.
    Returns:
        (T',) bool, True at masked frames.
    """
    if not 0.0 <= start_prob <= 1.0:
        raise ValueError(f"start probability must be in [0, 1], got {start_prob}")
    if span_length < 1:
        raise ValueError(f"span length must be >= 1, got {span_length}")
    if num_frames <= 0:
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(rng.random(num_frames) < start_prob)
    missing = min(min_spans, num_frames) - len(starts)
    if start_prob > 0 and missing > 0:
        free = np.setdiff1d(np.arange(num_frames), starts)
        starts = np.concatenate((starts, rng.choice(free, size=missing, replace=False)))
    boundaries = np.zeros(num_frames + span_length + 1, dtype=np.int64)
    np.add.at(boundaries, starts, 1)
    np.add.at(boundaries, starts + span_length, -1)
    return np.cumsum(boundaries[:num_frames]) > 0
