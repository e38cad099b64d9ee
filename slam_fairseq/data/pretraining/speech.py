"""Speech-only pre-training data (``speech_<split>.tsv``) with MSM frame masks.

The manifest's rows and features are read by :mod:`slam_fairseq.data.pretraining.feature_rows`
(shared with pairs), batches collated by :mod:`slam_fairseq.data.pretraining.collate`.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch

from slam_fairseq.data.pretraining.collate import collate_speech
from slam_fairseq.data.pretraining.feature_rows import SpeechFeatureReader, num_subsampled_frames
from slam_fairseq.data.pretraining.frame_masks import FrameMaskingSettings
from slam_fairseq.data.pretraining.modality import PretrainingModalityDataset
from slam_fairseq.data.pretraining.seeding import SPEECH_FRAME_MASK, masking_rng

__all__ = ["PretrainingSpeechDataset"]


class PretrainingSpeechDataset(PretrainingModalityDataset):
    """Speech only -> MSM. Items: ``id``, ``features`` (T, F) float, ``frame_mask`` (T',) bool.

    Args:
        reader: the manifest's :class:`SpeechFeatureReader`.
        masking: MSM frame masking (start 0.065, spans of 10 by default).
        seed: the run's seed.
    """

    modality = "speech"

    def __init__(self, reader: SpeechFeatureReader, masking: FrameMaskingSettings, seed: int) -> None:
        super().__init__(seed)
        self.reader = reader
        self.masking = masking
        self.sizes = reader.rows.n_frames
        self.name = str(reader.rows.manifest)

    def max_size_exceeded(self, max_positions) -> np.ndarray:
        return self.sizes > max_positions[0]

    def get_item(self, index: int, epoch: int) -> Dict[str, Any]:
        features = self.reader.read(index)
        rng = masking_rng(self.seed, epoch, index, SPEECH_FRAME_MASK)
        frame_mask = self.masking.draw(num_subsampled_frames(len(features)), rng)
        return {"id": index, "features": torch.from_numpy(features), "frame_mask": torch.from_numpy(frame_mask)}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            return {}
        return collate_speech(samples)
