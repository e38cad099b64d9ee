"""Utterances too short for the 4x subsampling, made safe for fine-tuning and decoding.

The two stride-2 convolutions need ``MIN_INPUT_FRAMES`` (7) feature frames for one output frame.
fairseq's ``speech_to_text`` filters nothing by minimum length, so a shorter utterance would reach
the encoder mid-run. :func:`extend_short_inputs` appends zero frames to such an utterance until it
has 7 and counts them as real frames: it then has exactly one encoder frame, which the decoder
can attend to (an utterance with no unmasked encoder frame would give NaN attention), and
fairseq-generate writes a hypothesis for it like for every other utterance.

:class:`ShortInputCounter` counts them for a warning without making an accelerator's host wait.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from slam_fairseq.modules.padding import may_read_device_values
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES

__all__ = ["extend_short_inputs", "ShortInputCounter"]


def extend_short_inputs(features: torch.Tensor, lengths: torch.Tensor, min_frames: int = MIN_INPUT_FRAMES
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extend utterances shorter than ``min_frames`` with zero frames up to ``min_frames``.

    Where the device's values may be read (:func:`may_read_device_values`: a CPU), a batch without
    short utterances comes back as it is. Elsewhere nothing is read: the batch is at least
    ``min_frames`` wide, its first ``min_frames`` columns are rewritten (the other columns are the
    input's) and every length is clamped, which changes no utterance that was long enough.

    Args:
        features: (B, T, F) padded features.
        lengths: (B,) real frame counts.
    Returns:
        ((B, max(T, min_frames), F) features, (B,) lengths clamped to at least ``min_frames``,
        (B,) bool: which utterances were extended).
    """
    short = lengths < min_frames
    if may_read_device_values(lengths.device) and not bool(short.any()):
        return features, lengths, short
    if features.shape[1] < min_frames:
        features = F.pad(features, (0, 0, 0, min_frames - features.shape[1]))
    positions = torch.arange(min_frames, device=features.device).unsqueeze(0)
    added = short.unsqueeze(1) & (positions >= lengths.unsqueeze(1))  # (B, min_frames)
    head = features[:, :min_frames].masked_fill(added.unsqueeze(-1), 0.0)
    features = torch.cat((head, features[:, min_frames:]), dim=1)
    return features, lengths.clamp(min=min_frames), short


class ShortInputCounter:
    """How many utterances :func:`extend_short_inputs` has extended, with ``warn(total)`` called
    each time the total crosses a power of two (the 1st, 2nd, 4th, 8th, ... such utterance).

    Where device values may be read, and outside training (validation, generation), each batch's
    count is read at once, with whatever training left on the device. In training on an
    accelerator the counts add up on the device and are read by :meth:`flush` (the model's
    ``set_num_updates``, once per update however many micro-batches ``--update-freq`` gives it) at
    updates 1, 2, 4, ..., 1024 and every 1024th after: a few host syncs per thousand updates
    instead of one per step. Crossings between two reads make one warning, with the total."""

    FLUSH_EVERY = 1024

    def __init__(self, warn: Callable[[int], None]) -> None:
        self.total = 0
        self._pending: Optional[torch.Tensor] = None
        self._flushed_at = -1
        self._warn = warn

    def add(self, short: torch.Tensor, training: bool) -> None:
        """Count the (B,) bool ``short`` of one batch."""
        count = short.sum()
        if self._pending is not None:
            count, self._pending = count + self._pending, None
        if not training or may_read_device_values(short.device):
            self._add(int(count))
        else:
            self._pending = count

    def flush(self, num_updates: int) -> None:
        """Read the counts held on the device, at the updates named in the class docstring."""
        due = num_updates & (num_updates - 1) == 0 if num_updates <= self.FLUSH_EVERY else (
            num_updates % self.FLUSH_EVERY == 0)
        if self._pending is not None and due and num_updates != self._flushed_at:
            pending, self._pending, self._flushed_at = self._pending, None, num_updates
            self._add(int(pending))

    def _add(self, count: int) -> None:
        if count:
            before, self.total = self.total, self.total + count
            if self.total.bit_length() > before.bit_length():  # crossed a power of two
                self._warn(self.total)
