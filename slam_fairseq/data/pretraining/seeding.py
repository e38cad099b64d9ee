"""Random generators for the pre-training masks, seeded by ``(seed, epoch, index, purpose)``.

Every mask is drawn from its own generator, so a mask depends only on the run's seed, the epoch
and the example (never on batch composition, worker count or what was drawn before). The same
example in the same epoch gets the same mask after a resume; the next epoch gets a new one.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["masking_rng", "TEXT_SPAN_MASK", "SPEECH_FRAME_MASK", "TLM_TEXT_MASK",
           "TLM_FRAME_MASK", "STM_NEGATIVES", "BATCH_CYCLE_ORDER"]

# One purpose number per kind of draw, so the text mask and the speech mask of one index differ.
TEXT_SPAN_MASK = 1
SPEECH_FRAME_MASK = 2
TLM_TEXT_MASK = 3
TLM_FRAME_MASK = 4
STM_NEGATIVES = 5
BATCH_CYCLE_ORDER = 6


def masking_rng(seed: int, epoch: int, index: int, purpose: int,
                extra: Iterable[int] = ()) -> np.random.Generator:
    """A NumPy generator for one draw.

    Args:
        seed: the run's ``--seed``.
        epoch: 1-based epoch.
        index: the example's dataset index (or a cycle number for batch orders).
        purpose: one of the module constants (which mask this generator draws).
        extra: further integers that identify the draw (e.g. all ids of an STM batch).
    """
    entropy = [int(seed), int(epoch), int(index), int(purpose), *(int(value) for value in extra)]
    if any(value < 0 for value in entropy):
        raise ValueError(f"seeding values must be non-negative, got {entropy}")
    return np.random.default_rng(entropy)
