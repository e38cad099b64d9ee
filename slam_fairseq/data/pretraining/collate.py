"""Padding examples into batches: features with their frame masks, and token sequences."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from slam_fairseq.modules.subsampling import subsampled_lengths

__all__ = ["collate_speech", "collate_tokens", "nonzero_index", "real_token_counts", "target_index"]


def nonzero_index(mask: torch.Tensor) -> torch.Tensor:
    """(2, N) long: the row and column of each True of a (B, T) bool mask, in ``nonzero()`` order."""
    return torch.stack(mask.nonzero(as_tuple=True))


def target_index(target: torch.Tensor, pad: int) -> torch.Tensor:
    """(2, M) long: the row and position of each target token (not ``pad``) of a (B, L) batch."""
    return nonzero_index(target.ne(pad))


def collate_speech(items: List[Dict[str, Any]], mask_key: str = "frame_mask") -> Dict[str, Any]:
    """Pad ``features`` (T, F) with 0 and ``mask_key`` (T',) with False.

    Returns ``id`` (B,), ``features`` (B, T, F), ``feature_lengths`` (B,), ``frame_mask`` (B, T'),
    ``masked_frames`` (2, N): the row and subsampled frame of each masked frame in
    ``frame_mask.nonzero()`` order (found here on the host, so that the model need not wait for
    the device to learn N), ``lengths_on_host`` ``{"speech": each row's subsampled frames}`` as
    Python ints (they stay on the host when the batch moves to a device: the model takes its
    padding from them, without reading the device) and ``nframes`` (real subsampled frames in the
    batch).
    """
    lengths = torch.tensor([item["features"].shape[0] for item in items], dtype=torch.long)
    feature_dim = items[0]["features"].shape[1]
    features = torch.zeros(len(items), int(lengths.max()), feature_dim, dtype=torch.float32)
    subsampled = subsampled_lengths(lengths)
    frame_mask = torch.zeros(len(items), int(subsampled.max()), dtype=torch.bool)
    for row, item in enumerate(items):
        features[row, : lengths[row]] = item["features"]
        frame_mask[row, : len(item[mask_key])] = item[mask_key]
    return {
        "id": torch.tensor([item["id"] for item in items], dtype=torch.long),
        "features": features,
        "feature_lengths": lengths,
        "frame_mask": frame_mask,
        "masked_frames": nonzero_index(frame_mask),
        "lengths_on_host": {"speech": tuple(subsampled.tolist())},
        "nframes": int(subsampled.sum()),
    }


def collate_tokens(sequences: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    """(B, L) right-padded with ``pad``."""
    batch = torch.full((len(sequences), max(len(x) for x in sequences)), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return batch


def real_token_counts(sequences: Sequence[torch.Tensor], pad: int) -> Tuple[int, ...]:
    """Each sequence's tokens other than ``pad``, as Python ints: the lengths the model reads from
    a collated (B, L) batch's padding mask, known here on the host."""
    return tuple(int(sequence.ne(pad).sum()) for sequence in sequences)
