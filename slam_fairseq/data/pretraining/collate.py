"""Padding examples into batches: features with their frame masks, and token sequences."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from slam_fairseq.modules.subsampling import subsampled_lengths

__all__ = ["collate_speech", "collate_tokens"]


def collate_speech(items: List[Dict[str, Any]], mask_key: str = "frame_mask") -> Dict[str, Any]:
    """Pad ``features`` (T, F) with 0 and ``mask_key`` (T',) with False.

    Returns ``id`` (B,), ``features`` (B, T, F), ``feature_lengths`` (B,), ``frame_mask`` (B, T')
    and ``nframes`` (real subsampled frames in the batch).
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
        "nframes": int(subsampled.sum()),
    }


def collate_tokens(sequences: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    """(B, L) right-padded with ``pad``."""
    batch = torch.full((len(sequences), max(len(x) for x in sequences)), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return batch
