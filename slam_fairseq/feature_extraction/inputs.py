"""What feature extraction reads: the rows of a manifest, a shard of them, their log-Mel frames.

Two kinds of list are read, told apart by their first line:

- fairseq's S2T manifest (``speech_<split>.tsv``, ``pair_<split>.tsv``, fine-tuning ``<split>.tsv``):
  a header with ``id``, ``audio`` and ``n_frames``; ``audio`` is a stored zip entry
  (``fbank.zip:offset:length``), an ``.npy`` of frames or an audio file;
- wav2vec 2.0 / HuBERT's list (``examples/wav2vec/wav2vec_manifest.py``): a root directory on the
  first line, then one ``relative/path.flac<TAB>num_samples`` per line; the id of a row is its path.

Relative paths are resolved against ``audio_root`` when given, else the list's root directory
(wav2vec) or the manifest's directory (S2T; the data directory of the scripts in ``manifests/``).
Shards are contiguous ranges of rows, as HuBERT's ``dump_*_feature.py`` cut them, so a shard's
outputs line up with its rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from slam_formats.features import AudioError, read_features
from slam_formats.manifest import ManifestError, read_s2t_manifest

__all__ = ["InputRow", "InputList", "read_input_list", "shard_range", "read_row_features"]


@dataclass
class InputRow:
    """One utterance: its id and its ``audio`` field as written in the list."""

    id: str
    audio: str


@dataclass
class InputList:
    """path: the list file; root: what relative ``audio`` fields are resolved against; kind:
    ``s2t`` or ``wav2vec``."""

    path: Path
    rows: List[InputRow]
    root: Path
    kind: str

    @property
    def name(self) -> str:
        """The list's file name without ``.tsv``: the ``split`` of the output files."""
        return self.path.name[:-len(".tsv")] if self.path.name.endswith(".tsv") else self.path.stem


def read_input_list(path: str, audio_root: Optional[str] = None) -> InputList:
    """Read an S2T manifest or a wav2vec list (module docstring); raise :class:`ManifestError`
    naming the file for anything else, or for a list without rows."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    with open(path, encoding="utf-8") as handle:
        first = handle.readline().rstrip("\n")
    columns = first.split("\t")
    if "id" in columns and "audio" in columns:
        rows = [InputRow(row["id"], row["audio"]) for row in read_s2t_manifest(str(path))]
        kind, root = "s2t", Path(audio_root) if audio_root else path.parent
    elif len(columns) == 1 and first.strip():
        kind, root = "wav2vec", Path(audio_root or first.strip())
        rows = []
        with open(path, encoding="utf-8") as handle:
            next(handle)
            for line_number, line in enumerate(handle, start=2):
                fields = line.rstrip("\n").split("\t")
                if not fields[0].strip():
                    continue
                if len(fields) > 2:
                    raise ManifestError(f"{path}:{line_number}: {len(fields)} tab-separated fields; a wav2vec "
                                        "list has 'relative/path<TAB>num_samples' after its root line")
                rows.append(InputRow(fields[0], fields[0]))
    else:
        raise ManifestError(f"{path}: neither an S2T manifest (a header with id, audio, n_frames) nor a wav2vec "
                            f"list (a root directory on the first line); the first line is {first[:80]!r}")
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return InputList(path, rows, root, kind)


def shard_range(num_rows: int, num_shards: int, shard: int) -> Tuple[int, int]:
    """[start, end) of shard ``shard`` of ``num_shards`` contiguous, near-equal ranges."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: expected 0 <= shard < num_shards")
    return round(num_rows * shard / num_shards), round(num_rows * (shard + 1) / num_shards)


def read_row_features(inputs: InputList, row: InputRow, feature_dim: int) -> np.ndarray:
    """(T, F) float32 log-Mel frames of ``row``, not normalised; raises :class:`AudioError`
    naming the list, the row and the problem (unreadable, missing, wrong dimension, NaN or inf)."""
    where = f"{inputs.path}: row {row.id!r}"
    try:
        features = read_features(row.audio, str(inputs.root), num_mel_bins=feature_dim)
    except (AudioError, ValueError, OSError, EOFError) as error:
        raise AudioError(f"{where}: {error}") from error
    finite = np.isfinite(features)
    if not finite.all():
        raise AudioError(f"{where}: {row.audio} holds {int(finite.size - finite.sum())} non-finite values")
    return features
