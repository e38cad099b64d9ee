"""The rows of a speech or pair manifest and their features: what speech and pair datasets both read.

Checks, each naming the manifest (and the row or feature file):

- an empty manifest is an error;
- utterances shorter than ``MIN_INPUT_FRAMES`` (7) feature frames by ``n_frames`` are skipped and
  counted in a logged warning (the 4x subsampling has no output frame for them);
- the first row's features are read at load: a wrong feature dimension, or an ``n_frames`` that
  counts audio samples (about 160 per frame), is an error before training;
- every read checks the dimension (``read_features``) and the length again (a file shorter than 7
  frames, whatever ``n_frames`` says, is an error);
- every read compares the frames it got with ``n_frames``: a row more than
  :func:`frame_count_tolerance` away (audio cut short or replaced since the manifest was written,
  a manifest counting samples instead of frames) is a bad row, left out and counted, since
  batches were sized and bucketed by ``n_frames``. Small differences (other frame conventions,
  e.g. centred frames) are accepted.
"""
from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np
import torch

from slam_formats.features import FRAME_SHIFT_SAMPLES, AudioError, FeatureShapeError, read_features
from slam_formats.manifest import ManifestError, iter_s2t_manifest
from slam_formats.packed import PackedStrings, PackedStringsBuilder
from slam_fairseq.data.pretraining.row_checks import BadRowError
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES, subsampled_lengths

logger = logging.getLogger(__name__)

__all__ = ["SpeechDataError", "SpeechRows", "read_speech_rows", "SpeechFeatureReader", "num_subsampled_frames",
           "frame_count_tolerance"]


class NoUsableRowsError(ManifestError):
    """A manifest without rows, or whose every row is too short or lacks its transcript."""


#: rows the reader tries at load for the first readable one (the feature dimension check)
PROBED_ROWS = 20

class SpeechDataError(BadRowError):
    """Unusable speech input; the message names the manifest and the row or feature file."""


def frame_count_tolerance(n_frames: int) -> int:
    """How far the frames read may be from a manifest's ``n_frames``: 3 frames or 1 %, the larger
    (frame conventions differ by 1-3 frames; a cut-short or replaced file by far more)."""
    return max(3, int(n_frames) // 100)


def num_subsampled_frames(num_frames: int) -> int:
    """Subsampled frames (``subsampled_lengths``) of an utterance of ``num_frames`` feature frames."""
    return int(subsampled_lengths(torch.tensor(int(num_frames))))


@dataclass
class SpeechRows:
    """The usable rows of a speech (or pair) manifest, as packed columns (``slam_formats.packed``:
    a few bytes over the text itself per row, shared with forked data-loader workers).

    ``transcripts`` holds each row's ``tgt_text`` where the rows were read for pairs, else empty
    strings. Lists given to the constructor are packed.
    """

    manifest: Path
    ids: PackedStrings
    audio: PackedStrings
    n_frames: np.ndarray
    transcripts: PackedStrings

    def __post_init__(self) -> None:
        for name in ("ids", "audio", "transcripts"):
            column = getattr(self, name)
            if not isinstance(column, PackedStrings):
                setattr(self, name, PackedStrings.from_strings(column))
        self.n_frames = np.asarray(self.n_frames, dtype=np.int64)
        if not len(self.ids) == len(self.audio) == len(self.n_frames) == len(self.transcripts):
            raise ValueError(f"{self.manifest}: columns of {len(self.ids)}, {len(self.audio)}, {len(self.n_frames)} "
                             f"and {len(self.transcripts)} rows")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Sequence[int]) -> "SpeechRows":
        """The rows at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return SpeechRows(self.manifest, self.ids.take(indices), self.audio.take(indices), self.n_frames[indices],
                          self.transcripts.take(indices))


def read_speech_rows(manifest: Path, need_transcript: bool = False) -> SpeechRows:
    """Read a manifest; skip (and count in a warning) rows too short or without a transcript.

    The file is read a row at a time into packed columns, so that a manifest of millions of rows
    never exists as Python objects. Raises :class:`NoUsableRowsError` for an empty manifest or
    one without any usable row, and :class:`ManifestError` for a malformed one.
    """
    manifest = Path(manifest)
    ids, audio, transcripts = PackedStringsBuilder(), PackedStringsBuilder(), PackedStringsBuilder()
    n_frames = array("q")
    num_rows, too_short, no_text = 0, _SkippedRows(), _SkippedRows()
    for row in iter_s2t_manifest(str(manifest)):
        if num_rows == 0 and need_transcript and "tgt_text" not in row:
            raise ManifestError(f"{manifest}: no tgt_text column, needed for speech-text pairs")
        num_rows += 1
        frames = int(row["n_frames"])
        transcript = (row.get("tgt_text") or "").strip() if need_transcript else ""
        if frames < MIN_INPUT_FRAMES:
            too_short.add(row["id"])
        elif need_transcript and not transcript:
            no_text.add(row["id"])
        else:
            ids.append(row["id"])
            audio.append(row["audio"])
            transcripts.append(transcript)
            n_frames.append(frames)
    if num_rows == 0:
        raise NoUsableRowsError(f"{manifest}: empty manifest (no rows)")
    if too_short.count:
        logger.warning(f"{manifest}: skipped {too_short.count} of {num_rows} utterances shorter than "
                       f"{MIN_INPUT_FRAMES} frames (the 4x subsampling needs {MIN_INPUT_FRAMES}), "
                       f"first ids: {too_short.first}")
    if no_text.count:
        logger.warning(f"{manifest}: skipped {no_text.count} of {num_rows} pairs with an empty transcript, "
                       f"first ids: {no_text.first}")
    if not n_frames:
        raise NoUsableRowsError(f"{manifest}: no usable rows ({too_short.count} too short, "
                                f"{no_text.count} without text)")
    return SpeechRows(manifest, ids.build(), audio.build(), np.frombuffer(n_frames, dtype=np.int64).copy(),
                      transcripts.build())


class _SkippedRows:
    """How many rows were skipped for one reason, and the first few ids (for the warning)."""

    def __init__(self, named: int = 5) -> None:
        self.count, self.first, self._named = 0, [], named

    def add(self, row_id: str) -> None:
        self.count += 1
        if len(self.first) < self._named:
            self.first.append(row_id)


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
        index, first = self._first_readable_row()  # fail at load, not mid-run, on a wrong feature dimension
        if rows.n_frames[index] >= len(first) * FRAME_SHIFT_SAMPLES // 2:  # about one count per sample
            raise SpeechDataError(f"{self._where(index)}: n_frames says {rows.n_frames[index]}, but "
                                  f"{rows.audio[index]} gives {len(first)} frames: n_frames seems to count audio "
                                  f"samples; this task needs the number of 10 ms feature frames (the manifest "
                                  f"scripts in manifests/ write it)", source=str(rows.manifest), row=rows.ids[index])

    def _first_readable_row(self) -> Tuple[int, np.ndarray]:
        """(index, features) of the first row that reads, among the first :data:`PROBED_ROWS`: a
        row that cannot be read there is left to the mid-run skips (counted as a bad row), as it
        would be anywhere else; features of another dimension end the load at once."""
        errors = []
        for index in range(min(len(self.rows), PROBED_ROWS)):
            try:
                return index, self._read_checked(index)
            except SpeechDataError as error:
                if isinstance(error.__cause__, FeatureShapeError):
                    raise
                errors.append(error)
        raise SpeechDataError(f"{self.rows.manifest}: none of its first {len(errors)} rows can be read; first: "
                              f"{errors[0]}", source=str(self.rows.manifest), row=self.rows.ids[0])

    def read(self, index: int) -> np.ndarray:
        """(T, F) float32 normalised features of row ``index``; a row holding NaN or inf is a bad
        row (left out and counted), which would otherwise make every update holding it
        non-finite."""
        features = self._read_checked(index)
        expected = int(self.rows.n_frames[index])
        if abs(len(features) - expected) > frame_count_tolerance(expected):
            raise SpeechDataError(f"{self._where(index)}: {self.rows.audio[index]} gives {len(features)} frames "
                                  f"where n_frames in the manifest says {expected} (the audio was cut short or "
                                  f"replaced since the manifest was written, or n_frames does not count "
                                  f"10 ms frames)", source=str(self.rows.manifest), row=self.rows.ids[index])
        finite = np.isfinite(features)
        if not finite.all():
            raise SpeechDataError(f"{self._where(index)}: {self.rows.audio[index]} holds "
                                  f"{int(finite.size - finite.sum())} non-finite values (NaN or inf; first in "
                                  f"frame {int(np.argmin(finite.all(axis=1)))})",
                                  source=str(self.rows.manifest), row=self.rows.ids[index])
        return self.transform(features)

    def _where(self, index: int) -> str:
        return f"{self.rows.manifest}: row {self.rows.ids[index]!r}"

    def _read_checked(self, index: int) -> np.ndarray:
        """(T, F) raw features of row ``index``, checked for readability, dimension and length."""
        audio = self.rows.audio[index]
        where = self._where(index)
        try:
            features = read_features(audio, self.data_dir, num_mel_bins=self.feature_dim)
        except (AudioError, ValueError, OSError, EOFError) as error:  # unreadable, wrong dimension, missing
            raise SpeechDataError(f"{where}: {error}", source=str(self.rows.manifest),
                                  row=self.rows.ids[index]) from error
        if len(features) < MIN_INPUT_FRAMES:
            raise SpeechDataError(f"{where}: {audio} has {len(features)} frames, fewer than "
                                  f"{MIN_INPUT_FRAMES} (n_frames in the manifest says {self.rows.n_frames[index]})",
                                  source=str(self.rows.manifest), row=self.rows.ids[index])
        return features
