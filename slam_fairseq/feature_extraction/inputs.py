"""What feature extraction reads: a shard of a manifest's rows and their log-Mel frames.

Two kinds of list are read, told apart by their first line:

- fairseq's S2T manifest (``speech_<split>.tsv``, ``pair_<split>.tsv``, fine-tuning ``<split>.tsv``):
  a header with ``id`` and ``audio``; ``audio`` is a stored zip entry (``fbank.zip:offset:length``),
  an ``.npy`` of frames or an audio file;
- wav2vec 2.0 / HuBERT's list (``examples/wav2vec/wav2vec_manifest.py``): a root directory on the
  first line, then one ``relative/path.flac<TAB>num_samples`` per line; the id of a row is its path.

Relative paths are resolved against ``audio_root`` when given, else the list's root directory
(wav2vec) or the manifest's directory (S2T; the data directory of the scripts in ``manifests/``).
Both are read as UTF-8 with or without a byte-order mark (as the shared manifest reader does), so
a list saved by an editor that adds one reads the same.
Shards are HuBERT's: contiguous ranges, shard k of K starting at row ``round(N / K * k)``, so a
shard's outputs line up with its rows. Only the shard's rows are kept in memory (a manifest of
millions of rows is read twice: counted, then the shard taken).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from slam_formats.features import AudioError, MultiChannelAudioError, read_features
from slam_formats.manifest import TSV_DIALECT, ManifestError, not_utf8_error

__all__ = ["InputRow", "InputShard", "read_input_shard", "shard_range", "read_row_features", "list_name"]


@dataclass
class InputRow:
    """One utterance: its id and its ``audio`` field as written in the list."""

    id: str
    audio: str


@dataclass
class InputShard:
    """path: the list file; rows: the shard's rows, [start, end) of ``num_rows``; root: what
    relative ``audio`` fields are resolved against; kind: ``s2t`` or ``wav2vec``."""

    path: Path
    rows: List[InputRow]
    start: int
    end: int
    num_rows: int
    root: Path
    kind: str

    @property
    def name(self) -> str:
        """The ``split`` of the output files (:func:`list_name`)."""
        return list_name(self.path)


def list_name(path: Path) -> str:
    """A list's file name without ``.tsv`` (HuBERT's ``split``)."""
    path = Path(path)
    return path.name[:-len(".tsv")] if path.name.endswith(".tsv") else path.stem


def shard_range(num_rows: int, num_shards: int, shard: int) -> Tuple[int, int]:
    """[start, end) of shard ``shard`` of ``num_shards``: HuBERT's contiguous, near-equal ranges."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: expected 0 <= shard < num_shards")
    return round(num_rows / num_shards * shard), round(num_rows / num_shards * (shard + 1))


_ENCODING = "utf-8-sig"  # UTF-8, a leading byte-order mark dropped (it would be part of the first column's name)


def _s2t_rows(path: Path) -> Iterator[Tuple[int, InputRow]]:
    with open(path, newline="", encoding=_ENCODING) as handle:
        reader = csv.DictReader(handle, **TSV_DIALECT)
        for line_number, row in enumerate(reader, start=2):
            if not row.get("id") or row.get("audio") is None:
                raise ManifestError(f"{path}:{line_number}: a row without id or audio")
            yield line_number, InputRow(row["id"], row["audio"])


def _wav2vec_rows(path: Path) -> Iterator[Tuple[int, InputRow]]:
    with open(path, encoding=_ENCODING) as handle:
        next(handle)
        for line_number, line in enumerate(handle, start=2):
            fields = line.rstrip("\r\n").split("\t")
            relative = fields[0].strip()
            if not relative:
                continue
            if len(fields) > 2:
                raise ManifestError(f"{path}:{line_number}: {len(fields)} tab-separated fields; a wav2vec list "
                                    "has 'relative/path<TAB>num_samples' after its root line")
            yield line_number, InputRow(relative, relative)


def read_input_shard(path: str, num_shards: int = 1, shard: int = 0,
                     audio_root: Optional[str] = None) -> InputShard:
    """Shard ``shard`` of ``num_shards`` of an S2T manifest or a wav2vec list (module docstring).

    Raises :class:`ManifestError` naming the file for anything else, a list without rows, more
    shards than rows, or an id twice in the shard."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    try:
        return _read_input_shard(path, num_shards, shard, audio_root)
    except UnicodeDecodeError as error:
        raise not_utf8_error(str(path), error) from None


def _read_input_shard(path: Path, num_shards: int, shard: int, audio_root: Optional[str]) -> InputShard:
    with open(path, encoding=_ENCODING) as handle:
        first = handle.readline().rstrip("\r\n")
    columns = first.split("\t")
    if "id" in columns and "audio" in columns:
        kind, root, rows_of = "s2t", Path(audio_root) if audio_root else path.parent, _s2t_rows
    elif len(columns) == 1 and first.strip():
        kind, root, rows_of = "wav2vec", Path(audio_root or first.strip()), _wav2vec_rows
    else:
        raise ManifestError(f"{path}: neither an S2T manifest (a header with id and audio) nor a wav2vec list "
                            f"(a root directory on the first line); the first line is {first[:80]!r}")
    num_rows = sum(1 for _ in rows_of(path))
    if num_rows == 0:
        raise ManifestError(f"{path}: no rows")
    if num_shards > num_rows:
        raise ManifestError(f"{path}: {num_rows} rows cannot make {num_shards} shards (some would be empty)")
    start, end = shard_range(num_rows, num_shards, shard)
    rows, seen = [], {}
    for index, (line_number, row) in enumerate(rows_of(path)):
        if index >= end:
            break
        if index >= start:
            if row.id in seen:
                raise ManifestError(f"{path}:{line_number}: id {row.id!r} again (first on line {seen[row.id]}); "
                                    "the outputs name rows by id")
            seen[row.id] = line_number
            rows.append(row)
    return InputShard(path, rows, start, end, num_rows, root, kind)


def read_row_features(root: Path, row: InputRow, feature_dim: int, downmix: bool = False,
                      mel_high_freq: float = 0.0) -> np.ndarray:
    """(T, F) float32 log-Mel frames of ``row`` (relative paths from ``root``), not normalised;
    audio of several channels averaged with ``downmix``; the filterbank of an audio file spans 20 Hz
    to ``mel_high_freq`` (0: Nyquist), the band the checkpoint's training features had. Raises
    :class:`AudioError` whose message names the file and the problem (unreadable, missing, several
    channels, wrong dimension, NaN or inf)."""
    try:
        features = read_features(row.audio, str(root), num_mel_bins=feature_dim, downmix=downmix,
                                 high_freq=mel_high_freq)
    except MultiChannelAudioError as error:
        raise AudioError(f"{error} (--downmix averages them)") from error
    except (AudioError, ValueError, OSError, EOFError) as error:
        problem = str(error)
        raise AudioError(problem if row.audio in problem else f"{row.audio}: {problem}") from error
    finite = np.isfinite(features)
    if not finite.all():
        raise AudioError(f"{row.audio}: {int(finite.size - finite.sum())} non-finite values (NaN or inf)")
    return features
