"""Speech-only pre-training data (``speech_<split>.tsv``) with MSM frame masks.

Also home of what pairs share with speech: reading a speech manifest (with the checks below) and
collating features.

Checks, each naming the manifest (and the row or feature file):

- an empty manifest is an error;
- utterances shorter than ``MIN_INPUT_FRAMES`` (7) feature frames by ``n_frames`` are skipped and
  counted in a logged warning (the 4x subsampling has no output frame for them);
- the first row's features are read at load: a wrong feature dimension is an error before training;
- every read checks the dimension (``read_features``) and the length again (a file shorter than 7
  frames, whatever ``n_frames`` says, is an error).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from slam_formats.features import AudioError, read_features
from slam_formats.manifest import ManifestError, read_s2t_manifest
from slam_fairseq.data.pretraining.frame_masks import FrameMaskingSettings
from slam_fairseq.data.pretraining.modality import PretrainingModalityDataset
from slam_fairseq.data.pretraining.row_checks import BadRowError
from slam_fairseq.data.pretraining.seeding import SPEECH_FRAME_MASK, masking_rng
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES, subsampled_lengths

logger = logging.getLogger(__name__)

__all__ = ["SpeechDataError", "SpeechRows", "read_speech_rows", "SpeechFeatureReader",
           "PretrainingSpeechDataset", "collate_speech", "num_subsampled_frames"]


class SpeechDataError(BadRowError):
    """Unusable speech input; the message names the manifest and the row or feature file."""


def num_subsampled_frames(num_frames: int) -> int:
    """Subsampled frames (``subsampled_lengths``) of an utterance of ``num_frames`` feature frames."""
    return int(subsampled_lengths(torch.tensor(int(num_frames))))


@dataclass
class SpeechRows:
    """The usable rows of a speech (or pair) manifest."""

    manifest: Path
    ids: List[str]
    audio: List[str]
    n_frames: np.ndarray
    transcripts: List[str]

    def __len__(self) -> int:
        return len(self.ids)


def read_speech_rows(manifest: Path, need_transcript: bool = False) -> SpeechRows:
    """Read a manifest; skip (and count in a warning) rows too short or without a transcript.

    Raises :class:`ManifestError` for an empty manifest or one without any usable row.
    """
    manifest = Path(manifest)
    rows = read_s2t_manifest(str(manifest))
    if not rows:
        raise ManifestError(f"{manifest}: empty manifest (no rows)")
    if need_transcript and "tgt_text" not in rows[0]:
        raise ManifestError(f"{manifest}: no tgt_text column, needed for speech-text pairs")
    kept = SpeechRows(manifest, [], [], np.zeros(0, dtype=np.int64), [])
    n_frames, too_short, no_text = [], [], []
    for row in rows:
        frames = int(row["n_frames"])
        transcript = (row.get("tgt_text") or "").strip()
        if frames < MIN_INPUT_FRAMES:
            too_short.append(row["id"])
        elif need_transcript and not transcript:
            no_text.append(row["id"])
        else:
            kept.ids.append(row["id"])
            kept.audio.append(row["audio"])
            kept.transcripts.append(transcript)
            n_frames.append(frames)
    kept.n_frames = np.asarray(n_frames, dtype=np.int64)
    if too_short:
        logger.warning(f"{manifest}: skipped {len(too_short)} of {len(rows)} utterances shorter than "
                       f"{MIN_INPUT_FRAMES} frames (the 4x subsampling needs {MIN_INPUT_FRAMES}), "
                       f"first ids: {too_short[:5]}")
    if no_text:
        logger.warning(f"{manifest}: skipped {len(no_text)} of {len(rows)} pairs with an empty transcript, "
                       f"first ids: {no_text[:5]}")
    if not kept.ids:
        raise ManifestError(f"{manifest}: no usable rows ({len(too_short)} too short, {len(no_text)} without text)")
    return kept


class SpeechFeatureReader:
    """Reads and normalises the features of one row; checks dimension and length.

    Args:
        rows: from :func:`read_speech_rows`.
        data_dir: root for relative feature paths.
        transform: feature normalisation, (T, F) -> (T, F).
        feature_dim: expected F (``input_feat_per_channel``).
    """

    def __init__(self, rows: SpeechRows, data_dir: str, transform: Callable[[np.ndarray], np.ndarray],
                 feature_dim: int = 80) -> None:
        self.rows = rows
        self.data_dir = str(data_dir)
        self.transform = transform
        self.feature_dim = int(feature_dim)
        self.read(0)  # fail at load, not mid-run, on a wrong feature dimension

    def read(self, index: int) -> np.ndarray:
        """(T, F) float32 normalised features of row ``index``."""
        audio = self.rows.audio[index]
        where = f"{self.rows.manifest}: row {self.rows.ids[index]!r}"
        try:
            features = read_features(audio, self.data_dir, num_mel_bins=self.feature_dim)
        except (AudioError, ValueError, OSError, EOFError) as error:  # unreadable, wrong dimension, missing
            raise SpeechDataError(f"{where}: {error}", source=str(self.rows.manifest),
                                  row=self.rows.ids[index]) from error
        if len(features) < MIN_INPUT_FRAMES:
            raise SpeechDataError(f"{where}: {audio} has {len(features)} frames, fewer than "
                                  f"{MIN_INPUT_FRAMES} (n_frames in the manifest says {self.rows.n_frames[index]})",
                                  source=str(self.rows.manifest), row=self.rows.ids[index])
        return self.transform(features)


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
