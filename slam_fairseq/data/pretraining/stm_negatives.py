"""Speech-text matching (STM) negatives, drawn inside one pair batch.

Each row is made a negative with probability ``negative_prob`` (0.5: about half the rows). A
negative row keeps its speech and takes the clean transcript of another row of the same batch,
chosen uniformly among the rows whose token sequence differs from its own; a row whose transcript
every other row shares (a batch of 1, or duplicate sentences) stays a positive, so a negative is
never the row's own transcript, token for token.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

__all__ = ["draw_stm_negatives"]


def draw_stm_negatives(transcripts: Sequence[Sequence[int]], rng: np.random.Generator,
                       negative_prob: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """
    Args:
        transcripts: the batch's B clean token sequences (any int sequences).
        rng: the batch's generator.
        negative_prob: probability that a row is made a negative.
    Returns:
        (text_index, label): (B,) int64 each; row b's speech is paired with row ``text_index[b]``'s
        transcript; ``label[b]`` is 1 for a true pair (``text_index[b] == b``), else 0.
    """
    if not 0.0 <= negative_prob <= 1.0:
        raise ValueError(f"STM negative probability must be in [0, 1], got {negative_prob}")
    batch_size = len(transcripts)
    keys = [tuple(int(token) for token in transcript) for transcript in transcripts]
    text_index = np.arange(batch_size, dtype=np.int64)
    wants_negative = rng.random(batch_size) < negative_prob
    for row in np.flatnonzero(wants_negative):
        candidates = [other for other in range(batch_size) if keys[other] != keys[row]]
        if candidates:
            text_index[row] = candidates[int(rng.integers(len(candidates)))]
    label = (text_index == np.arange(batch_size)).astype(np.int64)
    return text_index, label
