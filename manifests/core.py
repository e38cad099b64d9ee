"""What every manifest script shares: inputs, audio checks, features, shards, workers, resume, summary.

A script lists its corpus as :class:`AudioItem` s grouped by output split and hands them to
:func:`extract_features`, which

- sorts each group by id and cuts it into shards of ``--shard-size`` items (a shard is a fixed,
  deterministic chunk of that sorted list);
- runs the shards on ``--workers`` processes with a tqdm progress bar over items;
- per item, reads the audio (:func:`load_checked_audio`: skips bad files with a reason, resamples,
  optionally downmixes), computes ``audio_features.compute_fbank`` and stores it the way fairseq
  S2T does: one uncompressed zip per shard holding ``<id>.npy``, referenced as
  ``fbank/<zip>:<byte offset>:<byte length>`` (relative to the output directory);
- with ``--on-the-fly`` stores no features: ``audio`` names the source file when fairseq can read
  it as it is (16 kHz mono ``.flac``/``.wav``/``.ogg``); anything else (mp3, other rates, downmixed
  stereo, segments) becomes a 16 kHz 16-bit FLAC copy inside the shard zip, which fairseq's
  ``get_features_or_waveform`` reads like a stored ``.npy``;
- finishes a shard by renaming its zip into place and then writing a small shard record
  (``fbank/<shard>.json``: rows, skipped files, notes, CMVN sums) atomically. A re-run reuses every
  shard whose record matches (same items, file sizes and options) and recomputes the rest, so an
  interrupted run (Ctrl-C, crash, ``--max-shards``) loses at most the shards in flight. Final
  files (TSV, YAML, vocabularies) are written only after all shards are finished, each atomically.

Text files (transcripts, TSVs) may start with a UTF-8 byte-order mark; it is dropped. Two warnings
close the summary (and are kept in ``summary_<tag>.json``): utterance ids that land in more than one
output split, and manifests of an earlier run, left in the output directory, that reference a
feature file this run rewrote (two selections of a corpus mapped to the same split name share its
``fbank/<prefix>_<split>_*.zip``; the older manifest then points at other features).

Bad audio is skipped, never fatal: each skip is counted by reason and named (file path) in the end
summary, in ``skipped_<tag>.tsv`` and ``summary_<tag>.json`` in the output directory. The reasons
are the ``SKIP_*`` constants below. Policies (also in every script's ``--help``):

- stereo / multi-channel: skipped (``multi_channel``) unless ``--downmix`` (channel average,
  counted as a ``downmixed`` note);
- sample rate above 16 kHz: resampled to 16 kHz with ``audio_features.resample`` and counted
  (``resampled`` note, file named in the summary); below ``--min-sample-rate`` (default 16000):
  skipped (``low_sample_rate``), since upsampled narrow-band audio would not match the features
  of the rest; lower ``--min-sample-rate`` (e.g. 8000) to upsample those instead;
- shorter than ``--min-seconds`` (0.1 s): ``too_short``; peak below ``--silence-threshold``:
  ``silent``; 0 bytes: ``empty_file``; no samples: ``zero_length``; unreadable: ``unreadable_audio``;
  a WAV holding fewer samples than its header declares (cut short in a copy): ``truncated_audio``.

Test hook: the environment variable ``SLAM_MANIFESTS_CRASH_AFTER_SHARDS=N`` makes the main process
raise after N shards finished in this run (a crash that leaves finished shards behind).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import struct
import sys
import time
import zipfile
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # scripts run as `python manifests/prep_x.py`
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from slam_formats import features as audio_features  # noqa: E402
from slam_formats.atomic import atomic_output_path, atomic_write_text
from slam_formats.names import FEATURE_DIR_NAME

FORMAT_VERSION = 1
CRASH_HOOK_ENV = "SLAM_MANIFESTS_CRASH_AFTER_SHARDS"
FAIRSEQ_READABLE_AUDIO = (".flac", ".wav", ".ogg")  # fairseq's SF_AUDIO_FILE_EXTENSIONS

SKIP_EMPTY_FILE = "empty_file"
SKIP_UNREADABLE = "unreadable_audio"
SKIP_TRUNCATED = "truncated_audio"
SKIP_ZERO_LENGTH = "zero_length"
SKIP_TOO_SHORT = "too_short"
SKIP_SILENT = "silent"
SKIP_MULTI_CHANNEL = "multi_channel"
SKIP_LOW_SAMPLE_RATE = "low_sample_rate"
SKIP_ERROR = "error"  # an unexpected exception while processing one file
SKIP_MISSING_TRANSCRIPT = "missing_transcript"
SKIP_MISSING_AUDIO = "missing_audio"
SKIP_NON_UTF8 = "non_utf8_text"
SKIP_EMPTY_TEXT = "empty_text"
SKIP_MALFORMED = "malformed_line"
SKIP_DUPLICATE_ID = "duplicate_id"
SKIP_MISSING_CLIP = "missing_clip"
SKIP_EMPTY_TRANSLATION = "empty_translation"
NOTE_RESAMPLED = "resampled"
NOTE_DOWNMIXED = "downmixed"
NOTE_BEYOND_FULL_SCALE = "beyond_full_scale"


class UsageError(ValueError):
    """Refused input (bad flags, missing directories, vocabulary too large): exit 2 with the message."""


class StoppedEarly(Exception):
    """``--max-shards`` reached with shards left: nothing final written, a re-run continues."""


class SkipItem(Exception):
    """One input that is skipped, with a reason (a ``SKIP_*`` constant) and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class AudioItem:
    """One audio file to process.

    Args:
        id: utterance id (unique within its group; becomes ``<id>.npy`` in the shard zip).
        path: the audio file.
        size: its size in bytes (part of the shard fingerprint; a changed file is recomputed).
        fields: manifest columns other than id/audio/n_frames (``tgt_text``, ``speaker``, ...);
            not part of the fingerprint, so fixing a transcript recomputes nothing.
    """

    id: str
    path: str
    size: int
    fields: Dict[str, str] = dataclasses.field(default_factory=dict)


def walk_files(root: Path, suffixes: Sequence[str]) -> List[Path]:
    """All files under ``root`` (symlinks followed) whose lower-cased name ends with a suffix, sorted."""
    found = []
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        subdirectories.sort()
        found.extend(Path(directory) / name for name in names if name.lower().endswith(tuple(suffixes)))
    return sorted(found)


def file_size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def open_text_binary(path) -> io.BufferedIOBase:
    """Open a text file as bytes, gunzipping ``*.gz``."""
    path = str(path)
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_text_lines(path) -> Iterator[Tuple[int, Optional[str]]]:
    """``(line_number, text)`` for each line of a (possibly gzipped) file; ``text`` is None where
    the line is not valid UTF-8 (the caller skips and counts it). Line endings are stripped, and a
    byte-order mark at the start of the file (Windows editors write one) is dropped."""
    with open_text_binary(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                yield line_number, raw.decode("utf-8-sig" if line_number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield line_number, None


def normalize_space(text: str) -> str:
    """Collapse whitespace (tabs, newlines) to single spaces: TSV fields must hold neither."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# Audio


@dataclasses.dataclass(frozen=True)
class AudioOptions:
    """How audio is checked and stored (all of it is part of the shard fingerprint).

    Args:
        on_the_fly: store no features; ``audio`` names the file (or a 16 kHz FLAC copy in the zip).
        downmix: average the channels of multi-channel audio instead of skipping it.
        min_sample_rate: files below this rate are skipped; files between it and 16 kHz upsampled.
        min_seconds: shorter audio (after resampling) is skipped.
        silence_threshold: audio whose peak |x| (in [-1, 1]) is below this is skipped.
        segment_seconds: if > 0, cut each file into segments of this length (ids ``<id>_0000``, ...;
            a last segment shorter than ``min_seconds`` is dropped).
        num_mel_bins: filterbank size.
        mel_high_freq: the filterbank's upper edge in Hz (0: Nyquist, 8 kHz); the real bandwidth
            of upsampled audio (4000 for 8 kHz telephone speech), so that no bin is empty.
        accumulate_cmvn: compute features in on-the-fly mode too, for global CMVN statistics
            (stored mode always accumulates them).
    """

    on_the_fly: bool = False
    downmix: bool = False
    min_sample_rate: int = audio_features.SAMPLE_RATE
    min_seconds: float = 0.1
    silence_threshold: float = 1e-4
    segment_seconds: float = 0.0
    num_mel_bins: int = audio_features.NUM_MEL_BINS
    mel_high_freq: float = 0.0
    accumulate_cmvn: bool = False


def load_checked_audio(path: str, options: AudioOptions) -> Tuple[np.ndarray, List[Tuple[str, str]], bool]:
    """Read one file as 16 kHz mono, or raise :class:`SkipItem` saying why it cannot be used.

    Returns:
        waveform: (num_samples,) float32 at 16 kHz, in [-1, 1] unless noted.
        notes: ``(NOTE_RESAMPLED | NOTE_DOWNMIXED, detail)`` for what was changed, and
            ``(NOTE_BEYOND_FULL_SCALE, detail)`` for a float file with samples outside [-1, 1]
            (clipped in the source, or stored at an integer scale: with global CMVN such a file's
            features are far from the others'): stored features and a file fairseq reads as it is
            use them as they are; a 16-bit copy (:func:`stores_pcm16_copy`) is clipped.
        as_is: True when fairseq can read the file itself with the same result (16 kHz mono
            flac/wav/ogg, unchanged).
    """
    size = file_size(path)
    if size < 0:
        raise SkipItem(SKIP_MISSING_AUDIO, "file not found")
    if size == 0:
        raise SkipItem(SKIP_EMPTY_FILE, "0 bytes")
    try:
        channels, sample_rate = audio_features.read_audio(str(path))
    except audio_features.TruncatedAudioError as error:
        raise SkipItem(SKIP_TRUNCATED, str(error).replace(str(path) + ": ", "")) from None
    except audio_features.AudioError as error:
        raise SkipItem(SKIP_UNREADABLE, str(error).replace(str(path) + ": ", "")) from None
    if channels.shape[1] == 0:
        raise SkipItem(SKIP_ZERO_LENGTH, "no samples")
    if not np.isfinite(channels).all():
        raise SkipItem(SKIP_UNREADABLE, "samples that are not finite numbers")
    notes = []
    peak = float(np.abs(channels).max())
    if channels.shape[0] > 1:
        if not options.downmix:
            raise SkipItem(SKIP_MULTI_CHANNEL, f"{channels.shape[0]} channels (--downmix averages them)")
        waveform = channels.mean(axis=0)
        notes.append((NOTE_DOWNMIXED, f"{channels.shape[0]} channels averaged"))
    else:
        waveform = channels[0]
    if sample_rate != audio_features.SAMPLE_RATE:
        if sample_rate < options.min_sample_rate:
            raise SkipItem(SKIP_LOW_SAMPLE_RATE,
                           f"{sample_rate} Hz, below --min-sample-rate {options.min_sample_rate}")
        waveform = audio_features.resample(waveform, sample_rate, audio_features.SAMPLE_RATE)
        notes.append((NOTE_RESAMPLED, f"{sample_rate} Hz -> {audio_features.SAMPLE_RATE} Hz"))
    _check_waveform(waveform, options)
    as_is = not notes and str(path).endswith(FAIRSEQ_READABLE_AUDIO)
    # integer samples decode to [-1, 1]; lossy decoders overshoot it a little by design
    if peak > 1.0 and audio_features.is_float_pcm(path):
        use = ("clipped to [-1, 1] in the stored 16-bit copy" if stores_pcm16_copy(options, as_is)
               else "used as they are")
        notes.append((NOTE_BEYOND_FULL_SCALE, f"float samples up to {peak:.4g} in magnitude, beyond full scale "
                                              f"[-1, 1]: {use}"))
    return np.ascontiguousarray(waveform, dtype=np.float32), notes, as_is


def stores_pcm16_copy(options: AudioOptions, as_is: bool) -> bool:
    """Whether the manifest's ``audio`` will be a 16-bit FLAC copy in the shard zip (on the fly,
    for audio fairseq cannot read as it is, or cut into segments) rather than stored features or
    the file itself."""
    return options.on_the_fly and not (as_is and options.segment_seconds <= 0)


def _check_waveform(waveform: np.ndarray, options: AudioOptions) -> None:
    seconds = len(waveform) / audio_features.SAMPLE_RATE
    if seconds < options.min_seconds:
        raise SkipItem(SKIP_TOO_SHORT, f"{seconds:.3f} s, below --min-seconds {options.min_seconds}")
    peak = float(np.abs(waveform).max())
    if peak < options.silence_threshold:
        raise SkipItem(SKIP_SILENT, f"peak {peak:.1e}, below --silence-threshold {options.silence_threshold}")


def _segments(item_id: str, waveform: np.ndarray, options: AudioOptions) -> List[Tuple[str, np.ndarray]]:
    if options.segment_seconds <= 0:
        return [(item_id, waveform)]
    length = int(round(options.segment_seconds * audio_features.SAMPLE_RATE))
    return [(f"{item_id}_{index:04d}", waveform[start:start + length])
            for index, start in enumerate(range(0, len(waveform), length))]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Shards


@dataclasses.dataclass
class ShardTask:
    out_dir: str
    name: str  # "<prefix>_<group>_<index:05d>"
    items: List[AudioItem]
    options: AudioOptions
    fingerprint: str


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def shard_paths(out_dir, shard_name: str) -> Tuple[Path, Path]:
    """(zip path, record path) of a shard."""
    feature_dir = Path(out_dir) / FEATURE_DIR_NAME
    return feature_dir / f"{shard_name}.zip", feature_dir / f"{shard_name}.json"


def shard_fingerprint(items: Sequence[AudioItem], options: AudioOptions) -> str:
    payload = json.dumps([FORMAT_VERSION, dataclasses.asdict(options),
                          [(item.id, str(item.path), item.size) for item in items]])
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


class _ShardZip:
    """An uncompressed zip written to a temporary file, renamed into place by :meth:`finish`."""

    def __init__(self, path: Path):
        self.path = path
        self._temporary: Optional[str] = None
        self._zip: Optional[zipfile.ZipFile] = None

    def add(self, name: str, data: bytes) -> None:
        if self._zip is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._temporary = str(self.path.parent / f".tmp-{self.path.name}-{os.getpid()}")
            self._zip = zipfile.ZipFile(self._temporary, "w", zipfile.ZIP_STORED)
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        self._zip.writestr(info, data)

    def finish(self) -> Dict[str, Tuple[int, int]]:
        """Close, rename into place; returns entry name -> (byte offset of the data, byte length)."""
        if self._zip is None:
            return {}
        self._zip.close()
        entries = stored_zip_entries(self._temporary)
        os.replace(self._temporary, self.path)
        self._temporary = None
        return entries

    def discard(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._temporary and os.path.exists(self._temporary):
            os.unlink(self._temporary)


def stored_zip_entries(zip_path) -> Dict[str, Tuple[int, int]]:
    """Entry name -> (offset, length) of the raw bytes of each member of an uncompressed zip,
    read from the local headers (what fairseq's ``zip:offset:length`` paths point at)."""
    entries = {}
    with zipfile.ZipFile(zip_path) as archive, open(zip_path, "rb") as raw:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{zip_path}: {info.filename} is compressed; fairseq needs stored zips")
            raw.seek(info.header_offset)
            header = raw.read(30)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            entries[info.filename] = (info.header_offset + 30 + name_length + extra_length, info.file_size)
    return entries


class _CmvnSums:
    def __init__(self, num_mel_bins: int):
        self.count = 0
        self.sum = np.zeros(num_mel_bins, dtype=np.float64)
        self.sum_squares = np.zeros(num_mel_bins, dtype=np.float64)

    def add(self, features: np.ndarray) -> None:
        features = features.astype(np.float64)
        self.count += features.shape[0]
        self.sum += features.sum(axis=0)
        self.sum_squares += (features ** 2).sum(axis=0)

    def to_json(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sum_squares": self.sum_squares.tolist()}


_progress_counter = None  # a multiprocessing.Value in pool workers


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must end workers at once


def _advance(progress: Optional[Callable[[int], None]]) -> None:
    if progress is not None:
        progress(1)
    elif _progress_counter is not None:
        with _progress_counter.get_lock():
            _progress_counter.value += 1


def process_shard(task: ShardTask, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Compute one shard: its zip (renamed into place) and then its record (written atomically).

    Returns the record (what ``fbank/<shard>.json`` holds).
    """
    started = time.time()
    options = task.options
    zip_path, record_path = shard_paths(task.out_dir, task.name)
    shard_zip = _ShardZip(zip_path)
    rows, skipped, notes = [], [], []
    cmvn = _CmvnSums(options.num_mel_bins) if (options.accumulate_cmvn or not options.on_the_fly) else None
    try:
        for item in task.items:
            try:
                _process_item(item, options, shard_zip, rows, skipped, notes, cmvn)
            except SkipItem as skip:
                skipped.append({"reason": skip.reason, "item": str(item.path), "detail": skip.detail})
            except Exception as error:  # one bad file must not stop the run
                skipped.append({"reason": SKIP_ERROR, "item": str(item.path),
                                "detail": f"{type(error).__name__}: {error}"})
            _advance(progress)
        entries = shard_zip.finish()
    except BaseException:
        shard_zip.discard()
        raise
    relative_zip = f"{FEATURE_DIR_NAME}/{zip_path.name}"
    for row in rows:
        entry = row.pop("entry", None)
        if entry is not None:
            offset, length = entries[entry]
            row["audio"] = f"{relative_zip}:{offset}:{length}"
    record = {
        "format": FORMAT_VERSION, "fingerprint": task.fingerprint, "shard": task.name,
        "zip": relative_zip if entries else None, "zip_size": zip_path.stat().st_size if entries else 0,
        "rows": rows, "skipped": skipped, "notes": notes,
        "cmvn": cmvn.to_json() if cmvn is not None else None,
        "seconds_taken": round(time.time() - started, 3),
    }
    atomic_write_text(str(record_path), json.dumps(record))
    return record


def _process_item(item: AudioItem, options: AudioOptions, shard_zip: _ShardZip, rows: list,
                  skipped: list, notes: list, cmvn: Optional[_CmvnSums]) -> None:
    waveform, item_notes, as_is = load_checked_audio(item.path, options)
    notes.extend({"kind": kind, "item": str(item.path), "detail": detail} for kind, detail in item_notes)
    pcm16_copy = stores_pcm16_copy(options, as_is)
    if pcm16_copy:  # global CMVN statistics from the samples that the copy keeps
        waveform = audio_features.clip_to_pcm16_range(waveform)
    for segment_id, segment in _segments(item.id, waveform, options):
        if options.segment_seconds > 0:
            try:
                _check_waveform(segment, options)
            except SkipItem as skip:
                skipped.append({"reason": skip.reason, "item": f"{item.path}#{segment_id}",
                                "detail": skip.detail})
                continue
        num_samples = len(segment)
        row = {"id": segment_id, "item_id": item.id, "num_samples": num_samples,
               "n_frames": audio_features.num_fbank_frames(num_samples)}
        features = None
        if not options.on_the_fly or cmvn is not None:
            features = audio_features.compute_fbank(segment, num_mel_bins=options.num_mel_bins,
                                                    high_freq=options.mel_high_freq)
            if features.shape[0] != row["n_frames"]:
                raise RuntimeError(f"{features.shape[0]} frames, expected {row['n_frames']}")
            if cmvn is not None:
                cmvn.add(features)
        if not options.on_the_fly:
            row["entry"] = f"{segment_id}.npy"
            shard_zip.add(row["entry"], npy_bytes(features))
        elif not pcm16_copy:
            row["audio"] = os.path.abspath(item.path)
        else:
            row["entry"] = f"{segment_id}.flac"
            shard_zip.add(row["entry"], audio_features.encode_flac(segment))
        rows.append(row)


def _failed_with_errors(record: dict) -> List[dict]:
    """The skips of a shard record that were errors (an exception no audio check expects), which
    a later run retries rather than reuses."""
    return [skip for skip in record.get("skipped", ()) if skip.get("reason") == SKIP_ERROR]


def _load_finished_shard(task: ShardTask) -> Optional[dict]:
    zip_path, record_path = shard_paths(task.out_dir, task.name)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("format") != FORMAT_VERSION or record.get("fingerprint") != task.fingerprint:
        return None
    if record.get("zip") and (not zip_path.is_file() or zip_path.stat().st_size != record.get("zip_size")):
        return None
    return record


# ----------------------------------------------------------------------------------------------
# Runs


class RunSummary:
    """Counts and names what a run wrote, skipped and changed; :meth:`finish` reports it.

    Writes ``skipped_<tag>.tsv`` (split, reason, item, detail) and ``summary_<tag>.json`` in the
    output directory and prints the summary to stdout.
    """

    def __init__(self, tag: str, out_dir):
        self.tag, self.out_dir = tag, Path(out_dir)
        self.started = time.time()
        self.skipped: List[Dict[str, str]] = []
        self.notes: List[Dict[str, str]] = []
        self.written: Dict[str, Optional[int]] = {}
        self.not_written: List[str] = []  # manifests left out for lack of rows
        self.audio_items = 0
        self.audio_seconds = 0.0
        self.text_lines = 0
        self.workers = 1
        self.shards_computed = 0
        self.shards_reused = 0
        self.rewritten_features: set = set()  # feature files (``fbank/x.zip``) this run replaced or removed
        self.warnings: List[str] = []  # printed last and kept in summary_<tag>.json

    def skip(self, reason: str, item: str, detail: str = "", split: str = "") -> None:
        self.skipped.append({"split": split, "reason": reason, "item": str(item), "detail": detail})

    def note(self, kind: str, item: str, detail: str = "", split: str = "", count: int = 1) -> None:
        """Record a change made to an input (``NOTE_RESAMPLED``, ...); ``count`` > 1 for a summary line."""
        self.notes.append({"split": split, "kind": kind, "item": str(item), "detail": detail, "count": count})

    def wrote(self, file_name: str, rows: Optional[int] = None) -> None:
        """Record a written file (with its row count for manifests)."""
        self.written[file_name] = rows

    def skip_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for entry in self.skipped:
            counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
        return dict(sorted(counts.items()))

    def stale_manifests(self) -> Dict[str, List[str]]:
        """Manifests in the output directory that this run did not write but whose ``audio``
        column points into a feature file it replaced or removed -> those files (as
        ``fbank/<name>.zip``). Their byte offsets now point at other utterances' features (or past
        the end of a file). Paths are resolved against the manifest's directory, so a manifest
        pointing into a same-named file of another directory is not one of them."""
        stale: Dict[str, List[str]] = {}
        if not self.rewritten_features:
            return stale
        from slam_formats.manifest import ManifestError, read_s2t_manifest

        rewritten = {str((self.out_dir / name).resolve()): name for name in self.rewritten_features}
        for manifest in sorted(self.out_dir.glob("*.tsv")):
            if manifest.name in self.written or manifest.name.startswith("skipped_"):
                continue
            try:
                rows = read_s2t_manifest(str(manifest))
            except (ManifestError, UnicodeDecodeError, OSError):
                continue  # not a manifest
            named = set()
            for row in rows:
                path, byte_range = audio_features.parse_stored_zip_path(row["audio"])
                if byte_range is not None:
                    named.add(rewritten.get(str((manifest.parent / path).resolve())))
            named.discard(None)
            if named:
                stale[manifest.name] = sorted(named)
        return stale

    def finish(self, status: str = "complete", listed: int = 20) -> dict:
        seconds_taken = time.time() - self.started
        stale = self.stale_manifests()
        note_counts: Dict[str, int] = {}
        for entry in self.notes:
            note_counts[entry["kind"]] = note_counts.get(entry["kind"], 0) + entry.get("count", 1)
        report = {
            "status": status, "written": self.written, "not_written": self.not_written, "audio_items": self.audio_items,
            "audio_hours": round(self.audio_seconds / 3600, 4), "text_lines": self.text_lines,
            "skipped": len(self.skipped), "skipped_by_reason": self.skip_counts(),
            "notes_by_kind": dict(sorted(note_counts.items())), "notes": self.notes,
            "shards_computed": self.shards_computed, "shards_reused": self.shards_reused,
            "workers": self.workers, "seconds_taken": round(seconds_taken, 2), "stale_manifests": stale,
            "warnings": self.warnings,
        }
        skipped_name = f"skipped_{self.tag}.tsv"
        lines = ["split\treason\titem\tdetail"] + [
            "\t".join(normalize_space(entry[key]) for key in ("split", "reason", "item", "detail"))
            for entry in self.skipped]
        atomic_write_text(str(self.out_dir / skipped_name), "\n".join(lines) + "\n")
        atomic_write_text(str(self.out_dir / f"summary_{self.tag}.json"), json.dumps(report, indent=1) + "\n")

        out = [f"== {self.tag}: {status} in {seconds_taken:.1f} s ({self.workers} worker(s); "
               f"shards computed {self.shards_computed}, reused {self.shards_reused}) =="]
        for name, rows in self.written.items():
            out.append(f"  wrote {name}" + (f" ({rows} rows)" if rows is not None else ""))
        if self.not_written:
            out.append(f"  not written (no usable rows): {', '.join(self.not_written)}")
        if self.audio_items:
            out.append(f"  audio: {self.audio_items} items, {self.audio_seconds / 3600:.3f} h "
                       f"({self.audio_seconds:.1f} s)")
        if self.text_lines:
            out.append(f"  text: {self.text_lines} lines")
        for kind, count in report["notes_by_kind"].items():
            named = [entry for entry in self.notes if entry["kind"] == kind]
            out.append(f"  {kind}: {count}")
            out.extend(f"    {entry['item']}  ({entry['detail']})" for entry in named[:listed])
        counts = ", ".join(f"{reason} {count}" for reason, count in report["skipped_by_reason"].items())
        out.append(f"  skipped: {len(self.skipped)}" + (f" ({counts}); all listed in {skipped_name}"
                                                          if self.skipped else ""))
        for entry in self.skipped[:listed]:
            out.append(f"    {entry['reason']}  {entry['item']}  ({entry['detail']})")
        if len(self.skipped) > listed:
            out.append(f"    ... {len(self.skipped) - listed} more in {skipped_name}")
        out.extend(f"  WARNING: {warning}" for warning in self.warnings)
        for manifest, names in stale.items():
            out.append(f"  WARNING: {manifest}, written by an earlier run, references {', '.join(names)}, which "
                       f"this run rewrote from other audio: its rows now point at other features. Run the "
                       f"command that wrote it again, or delete it (use another --out for a different "
                       f"selection of the same corpus)")
        print("\n".join(out), flush=True)
        return report


@dataclasses.dataclass
class RunContext:
    """Where and how a script runs: output directory, workers, shard size, limits, summary."""

    out_dir: Path
    summary: RunSummary
    workers: int = 1
    shard_size: int = 256
    max_shards: Optional[int] = None
    progress: bool = True


@dataclasses.dataclass
class GroupFeatures:
    """The features of one group (output split): rows per item id and CMVN sums."""

    rows_by_item: Dict[str, List[dict]]
    cmvn_count: int
    cmvn_sum: np.ndarray
    cmvn_sum_squares: np.ndarray

    def manifest_rows(self, items: Iterable[AudioItem]) -> List[dict]:
        """S2T rows (``id, audio, n_frames`` + the item's fields) in item order, skipped items left out."""
        rows = []
        for item in items:
            for row in self.rows_by_item.get(item.id, []):
                rows.append({"id": row["id"], "audio": row["audio"], "n_frames": row["n_frames"],
                             **item.fields})
        return rows


def extract_features(context: RunContext, options: AudioOptions, groups: Dict[str, List[AudioItem]],
                     shard_prefix: str) -> Dict[str, GroupFeatures]:
    """Features (or on-the-fly references) for every group, resuming finished shards.

    Args:
        groups: output split -> its items, in any order; updated in place: sorted by id, later
            items with an id already seen dropped (``duplicate_id``).
        shard_prefix: names the shard files, ``fbank/<prefix>_<group>_<index>.{zip,json}``.
    Raises:
        StoppedEarly: when ``context.max_shards`` new shards were computed and some are left.
    """
    summary = context.summary
    tasks_by_group: Dict[str, List[ShardTask]] = {}
    for group, items in groups.items():
        items = _drop_duplicates(sorted(items, key=lambda item: item.id), summary, group)
        groups[group] = items
        tasks_by_group[group] = [
            ShardTask(str(context.out_dir), f"{_group_stem(shard_prefix, group)}_{index:05d}",
                      chunk, options, shard_fingerprint(chunk, options))
            for index, chunk in enumerate(_chunks(items, context.shard_size))]
    splits_of: Dict[str, List[str]] = {}
    for group, items in groups.items():
        for item in items:
            splits_of.setdefault(item.id, []).append(group)
    shared = {item_id: names for item_id, names in splits_of.items() if len(names) > 1}
    if shared:
        examples = ", ".join(f"{item_id} ({' and '.join(names)})" for item_id, names in list(shared.items())[:5])
        summary.warnings.append(f"{len(shared)} utterance id(s) are in more than one output split, e.g. {examples}: "
                                f"the same utterances would be trained on and evaluated on (check --splits)")
    records: Dict[str, dict] = {}
    todo: List[ShardTask] = []
    retried: List[str] = []
    for tasks in tasks_by_group.values():
        for task in tasks:
            record = _load_finished_shard(task)
            if record is not None and _failed_with_errors(record):
                retried.append(task.name)  # a missing package, a full disk: not the files' fault
                record = None
            if record is not None:
                records[task.name] = record
            else:
                todo.append(task)
    if retried:
        summary.warnings.append(f"{len(retried)} shard(s) computed again because files of theirs had failed with an "
                                f"error (not a skip for bad audio) in an earlier run, e.g. {retried[0]}")
    summary.shards_reused += len(records)
    summary.workers = context.workers
    feature_dir = Path(context.out_dir) / FEATURE_DIR_NAME
    summary.rewritten_features.update(f"{FEATURE_DIR_NAME}/{task.name}.zip" for task in todo
                                      if (feature_dir / f"{task.name}.zip").exists())
    limit = len(todo) if context.max_shards is None else max(0, context.max_shards - summary.shards_computed)
    _run_shards(context, todo[:limit], records)
    if limit < len(todo):
        raise StoppedEarly(f"--max-shards {context.max_shards}: {summary.shards_computed} shard(s) computed, "
                           f"{len(todo) - limit} left; run the same command again to continue")
    results = {}
    for group, tasks in tasks_by_group.items():
        results[group] = _collect_group(group, [records[task.name] for task in tasks], options, summary)
        summary.rewritten_features.update(
            _remove_stale_shards(context.out_dir, _group_stem(shard_prefix, group), len(tasks)))
    return results


def _group_stem(shard_prefix: str, group: str) -> str:
    return f"{_safe_name(shard_prefix)}_{_safe_name(group)}"


def _chunks(items: List[AudioItem], size: int) -> Iterator[List[AudioItem]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


def _drop_duplicates(items: List[AudioItem], summary: RunSummary, group: str) -> List[AudioItem]:
    kept, seen = [], {}
    for item in items:
        if item.id in seen:
            summary.skip(SKIP_DUPLICATE_ID, item.path, f"id {item.id} already used by {seen[item.id]}", group)
            continue
        seen[item.id] = item.path
        kept.append(item)
    return kept


def _run_shards(context: RunContext, tasks: List[ShardTask], records: Dict[str, dict]) -> None:
    if not tasks:
        return
    from tqdm import tqdm

    crash_after = int(os.environ.get(CRASH_HOOK_ENV, "0") or 0)
    bar = tqdm(total=sum(len(task.items) for task in tasks), unit="file", desc=context.summary.tag,
               disable=not context.progress, file=sys.stderr, dynamic_ncols=True)

    def finished(record: dict) -> None:
        records[record["shard"]] = record
        context.summary.shards_computed += 1
        errors = _failed_with_errors(record)
        if (context.summary.shards_computed == 1 and len(tasks) > 1 and not record["rows"]
                and errors and len(errors) == len(record["skipped"])):
            raise UsageError(
                f"{record['shard']}: every one of its {len(errors)} file(s) failed with an error, e.g. "
                f"{errors[0]['item']}: {errors[0]['detail']}; stopped before the other {len(tasks) - 1} shard(s). "
                "Fix the cause (a missing package or codec?) and run the same command again: finished shards "
                "are kept, and shards whose files failed with an error are computed again")
        if crash_after and context.summary.shards_computed >= crash_after:
            raise RuntimeError(f"{CRASH_HOOK_ENV}={crash_after}: simulated crash after "
                               f"{context.summary.shards_computed} shard(s)")

    try:
        if context.workers <= 1 or len(tasks) == 1:
            for task in tasks:
                finished(process_shard(task, progress=bar.update))
        else:
            _run_pool(context.workers, tasks, bar, finished)
    finally:
        bar.close()
        _remove_temporaries(context.out_dir, tasks)


def _run_pool(workers: int, tasks: List[ShardTask], bar, finished: Callable[[dict], None]) -> None:
    """Shards on worker processes. A worker that dies (killed, out of memory) raises
    ``BrokenProcessPool`` here instead of hanging; Ctrl-C / an error ends the workers at once."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    methods = multiprocessing.get_all_start_methods()
    mp = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    counter = mp.Value("q", 0)
    executor = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp, initializer=_init_worker,
                                   initargs=(counter,))
    shown = 0
    try:
        pending = {executor.submit(process_shard, task) for task in tasks}
        while pending:
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            bar.update(counter.value - shown)
            shown = counter.value
            for future in done:
                finished(future.result())  # re-raises a worker's exception
    except BaseException:
        for process in list(getattr(executor, "_processes", {}).values()):
            process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()


def _remove_temporaries(out_dir, tasks: List[ShardTask]) -> None:
    feature_dir = Path(out_dir) / FEATURE_DIR_NAME
    if not feature_dir.is_dir():
        return
    names = {f"{task.name}." for task in tasks}
    for path in feature_dir.glob(".tmp-*"):
        if any(path.name[len(".tmp-"):].startswith(name) for name in names):
            path.unlink(missing_ok=True)


def _remove_stale_shards(out_dir, group_stem: str, num_shards: int) -> List[str]:
    """Delete shard files of this group beyond the current shard count (left by a larger input);
    returns the removed zips as ``fbank/<name>.zip``."""
    pattern = re.compile(re.escape(group_stem) + r"_(\d{5})\.(zip|json)$")
    removed = []
    for path in (Path(out_dir) / FEATURE_DIR_NAME).glob(f"{group_stem}_*"):
        match = pattern.match(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink(missing_ok=True)
            if path.suffix == ".zip":
                removed.append(f"{FEATURE_DIR_NAME}/{path.name}")
    return removed


def _collect_group(group: str, records: List[dict], options: AudioOptions, summary: RunSummary) -> GroupFeatures:
    rows_by_item: Dict[str, List[dict]] = {}
    count, total, total_squares = 0, np.zeros(options.num_mel_bins), np.zeros(options.num_mel_bins)
    for record in records:
        for row in record["rows"]:
            rows_by_item.setdefault(row["item_id"], []).append(row)
            summary.audio_items += 1
            summary.audio_seconds += row["num_samples"] / audio_features.SAMPLE_RATE
        for entry in record["skipped"]:
            summary.skip(entry["reason"], entry["item"], entry["detail"], group)
        for entry in record["notes"]:
            summary.note(entry["kind"], entry["item"], entry["detail"], group)
        if record.get("cmvn"):
            count += record["cmvn"]["count"]
            total += np.asarray(record["cmvn"]["sum"])
            total_squares += np.asarray(record["cmvn"]["sum_squares"])
    return GroupFeatures(rows_by_item, count, total, total_squares)


def write_global_cmvn(path, groups: Sequence[GroupFeatures]) -> Path:
    """fairseq's global CMVN stats (``mean``, ``std`` float32 arrays in an npz), as its recipes'
    ``cal_gcmvn_stats``: std = sqrt(max(E[x^2] - mean^2, 1e-8))."""
    count = sum(group.cmvn_count for group in groups)
    if count == 0:
        raise UsageError(f"{path}: no frames to compute global CMVN from (no training features)")
    mean = sum(group.cmvn_sum for group in groups) / count
    variance = sum(group.cmvn_sum_squares for group in groups) / count - mean ** 2
    std = np.sqrt(np.maximum(variance, 1e-8))
    with atomic_output_path(str(path)) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, mean=mean.astype(np.float32), std=std.astype(np.float32))
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Command line


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--out, --workers, --shard-size, --max-shards, --no-progress."""
    parser.add_argument("--out", required=True, type=Path, help="output (data) directory")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (default: the CPUs this process may use)")
    parser.add_argument("--shard-size", type=int, default=256,
                        help="files per shard: the unit of parallel work and of resuming (default 256)")
    parser.add_argument("--max-shards", type=int, default=None,
                        help="compute at most this many new shards, then stop without final files "
                             "(exit code 3); the next run resumes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_audio_arguments(parser: argparse.ArgumentParser, on_the_fly_help: str = "") -> None:
    """Audio checks and storage flags (see the ``core`` module docstring for the policies)."""
    group = parser.add_argument_group("audio")
    group.add_argument("--on-the-fly", action="store_true",
                       help="store no features: `audio` names the source file (16 kHz mono "
                            "flac/wav/ogg) or a 16 kHz FLAC copy in the shard zip for anything else; "
                            "n_frames from the sample count. " + on_the_fly_help)
    group.add_argument("--downmix", action="store_true",
                       help="average the channels of stereo/multi-channel files (default: skip them "
                            "as multi_channel)")
    group.add_argument("--min-sample-rate", type=int, default=audio_features.SAMPLE_RATE,
                       help="skip files below this rate (low_sample_rate); rates from it up to any "
                            "higher rate are resampled to 16 kHz and counted (default 16000: 8 kHz "
                            "files are skipped, 22.05/44.1/48 kHz ones resampled)")
    group.add_argument("--min-seconds", type=float, default=0.1, help="skip shorter audio (default 0.1)")
    group.add_argument("--silence-threshold", type=float, default=1e-4,
                       help="skip audio whose peak |x| (in [-1, 1]) is below this (default 1e-4)")
    group.add_argument("--mel-high-freq", type=float, default=0.0,
                       help="upper edge of the Mel filterbank in Hz (default 0: Nyquist, 8000). For "
                            "audio recorded at a lower rate and upsampled, its own Nyquist (4000 for "
                            "8 kHz telephone speech): the bins above it are empty, and CMVN scales "
                            "their noise up to the size of speech. Needs stored features")
    group.add_argument("--cmvn", choices=("utterance", "global"), default="utterance",
                       help="feature normalisation named in the config: fairseq's utterance_cmvn, "
                            "or global_cmvn with mean/std computed from the training split's features")


def audio_options_from_args(args: argparse.Namespace, segment_seconds: float = 0.0) -> AudioOptions:
    if args.min_sample_rate <= 0 or args.min_sample_rate > audio_features.SAMPLE_RATE:
        raise UsageError(f"--min-sample-rate must be in 1..{audio_features.SAMPLE_RATE}")
    try:
        mel_high_freq = audio_features.check_high_freq(args.mel_high_freq)
    except ValueError as error:
        raise UsageError(f"--mel-high-freq: {error}") from error
    if mel_high_freq and args.on_the_fly:
        raise UsageError("--mel-high-freq needs stored features: the on-the-fly readers (fairseq's and "
                         "the pre-training task's) compute the full-band filterbank; drop --on-the-fly")
    return AudioOptions(on_the_fly=args.on_the_fly, downmix=args.downmix,
                        min_sample_rate=args.min_sample_rate, min_seconds=args.min_seconds,
                        silence_threshold=args.silence_threshold, segment_seconds=segment_seconds,
                        mel_high_freq=mel_high_freq,
                        accumulate_cmvn=args.on_the_fly and args.cmvn == "global")


def context_from_args(args: argparse.Namespace, tag: str) -> RunContext:
    if args.workers < 1 or args.shard_size < 1:
        raise UsageError("--workers and --shard-size must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    return RunContext(out_dir=args.out, summary=RunSummary(tag, args.out), workers=args.workers,
                      shard_size=args.shard_size, max_shards=args.max_shards,
                      progress=not args.no_progress)


def parse_split_map(specs: Sequence[str], flag: str) -> List[Tuple[str, str]]:
    """``["train-clean-100:train", "dev-clean:dev"]`` -> [(source, split), ...]; ``x`` alone maps to ``x``."""
    pairs = []
    for spec in specs:
        source, _, split = spec.rpartition(":") if ":" in spec else (spec, "", spec)
        if not source or not split or not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
            raise UsageError(f"{flag} {spec!r}: expected SOURCE:SPLIT with SPLIT made of letters, digits, ._-")
        pairs.append((source, split))
    return pairs


def write_manifest(summary: RunSummary, path: Path, rows: List[dict], columns: Sequence[str]) -> None:
    """Write an S2T manifest atomically and record it; a manifest without rows is not written
    (fairseq refuses empty manifests) and the summary says so."""
    from slam_formats.manifest import write_s2t_manifest

    if not rows:
        summary.not_written.append(path.name)
        return
    summary.wrote(path.name, write_s2t_manifest(str(path), rows, columns))


def run_script(main: Callable[[], Optional[RunSummary]]) -> None:
    """Run a script's main: clear messages and exit codes for refusals (2), ``--max-shards`` (3)
    and Ctrl-C or SIGTERM (130). Finished shards stay on disk in every case."""
    def _terminated(signal_number, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except StoppedEarly as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    except BrokenProcessPool:
        print("error: a worker process died (killed, or out of memory: try fewer --workers or a smaller "
              "--shard-size); finished shards are kept, run the same command again to resume", file=sys.stderr)
        sys.exit(1)


def console_command(main: Callable[[], Optional[RunSummary]]) -> Callable[[], None]:
    """The entry point of an installed ``slam-prep-*`` command: ``main`` run by :func:`run_script`."""
    def command() -> None:
        run_script(main)

    command.__doc__ = main.__doc__
    return command
