"""Bad speech rows never end a pre-training run: cheap checks at load, skips mid-run, a limit.

At load (:func:`drop_bad_feature_rows`), every row of a speech or pair manifest is checked without
reading its features: the feature file exists, a ``zip:offset:length`` entry lies inside the zip,
and an ``.npy`` (stored in a zip or on its own) has a readable header whose shape is
``(frames >= 7, feature_dim)``, a numeric dtype, and a size that matches the entry. Bad rows are
dropped with one WARNING per manifest that counts them by problem and names the first few. Under
several data-parallel ranks, each rank checks its own block of the rows and every rank drops the
rows that any rank found bad (the task merges their reports): the ranks build one dataset (a file
one rank could not open for a moment would otherwise give them different datasets, different
numbers of steps, and a hang at the first collective one rank misses), and a start of W ranks
reads 1/W of the headers on each. A row that only some nodes cannot read (node-local copies of
the data) is then met mid-run, as below.

Mid-run, a row that still fails (a corrupt ``.npy`` body, a file deleted since) raises a
:class:`BadRowError` in the dataset; the round-robin dataset leaves that example out of its batch
and hands the message on in the batch (``sample["bad_rows"]``), so that the count is kept in the
training process whatever the number of data-loader workers. :class:`BadRowLimits` counts both
kinds per manifest and stops the run with a :class:`TooManyBadRowsError` once a manifest has more
than ``max(--max-bad-rows, --max-bad-row-fraction x its rows)`` bad rows. The rows dropped at load
are the same on every rank; the rows met mid-run are counted by each rank among its own batches, so
with W ranks up to about W times the limit can be met before a rank stops the run.
"""
from __future__ import annotations

import logging
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from slam_formats.features import parse_stored_zip_path
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES

logger = logging.getLogger(__name__)

__all__ = ["BAD_ROWS_KEY", "BadRowError", "TooManyBadRowsError", "RowCheckReport", "feature_row_problem",
           "check_feature_rows", "merged_reports", "without_bad_rows", "drop_bad_feature_rows", "BadRowLimits"]

BAD_ROWS_KEY = "bad_rows"  # batch key: [(manifest, row id, message), ...] of the examples left out
_NPY_MAGIC = b"\x93NUMPY"
_ROWS_NAMED = 5

# Problem kinds, in the order the warning lists them.
MISSING_FILE = "feature file missing"
OUTSIDE_FILE = "zip entry outside the file"
NOT_FEATURES = "not a readable .npy"
WRONG_SHAPE = "wrong shape or dtype"
TOO_SHORT = f"fewer than {MIN_INPUT_FRAMES} frames"
SIZE_MISMATCH = "npy size differs from the entry"


class BadRowError(ValueError):
    """An example that cannot be read. ``source``: the manifest it comes from; ``row``: its id."""

    def __init__(self, message: str, source: Optional[str] = None, row: Optional[str] = None) -> None:
        super().__init__(message)
        self.source = source
        self.row = row


class TooManyBadRowsError(RuntimeError):
    """More bad rows than the limit; the message names the manifest and the first bad rows."""


_DESCR = re.compile(r"'descr':\s*'([^']*)'")
_SHAPE = re.compile(r"'shape':\s*\(([^)]*)\)")
_FORTRAN = re.compile(r"'fortran_order':\s*(True|False)")


def _parse_npy_header(handle, start: int):
    """(shape, dtype, header size) of the ``.npy`` at ``start``; raises ValueError if unreadable.

    The dict ``np.save`` writes is parsed with three regular expressions (ten times faster than
    numpy's ``literal_eval``); anything else goes through numpy's own reader.
    """
    handle.seek(start)
    prefix = handle.read(12)
    if len(prefix) < 10 or prefix[:6] != _NPY_MAGIC:
        raise ValueError("no .npy magic")
    major = prefix[6]
    if major == 1:
        header_length, skip = struct.unpack("<H", prefix[8:10])[0], 10
    elif major in (2, 3):
        header_length, skip = struct.unpack("<I", prefix[8:12])[0], 12
    else:
        raise ValueError(f".npy format version {major} is unknown")
    handle.seek(start + skip)
    header = handle.read(header_length)
    if len(header) != header_length:
        raise ValueError("header cut short")
    text = header.decode("latin1")
    descr, shape, fortran = _DESCR.search(text), _SHAPE.search(text), _FORTRAN.search(text)
    if descr and shape and fortran:
        dims = tuple(int(part) for part in shape.group(1).replace(" ", "").split(",") if part)
        return dims, np.dtype(descr.group(1)), skip + header_length
    handle.seek(start)
    version = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    dims, _, dtype = reader(handle)
    return tuple(dims), dtype, handle.tell() - start


def _npy_header_problem(handle, start: int, length: int, feature_dim: int) -> Optional[Tuple[str, str]]:
    """Read the ``.npy`` header at ``start`` of ``handle``; (kind, detail) or None when it fits."""
    try:
        shape, dtype, header_size = _parse_npy_header(handle, start)
    except (ValueError, TypeError, OSError, EOFError, SyntaxError) as error:
        return NOT_FEATURES, f"unreadable .npy header ({error})"
    if len(shape) != 2 or shape[1] != feature_dim or dtype.kind not in "fiu":
        return WRONG_SHAPE, f"array of shape {tuple(shape)} and dtype {dtype}, expected (frames, {feature_dim}) numbers"
    if shape[0] < MIN_INPUT_FRAMES:
        return TOO_SHORT, f"{shape[0]} frames (the 4x subsampling needs {MIN_INPUT_FRAMES})"
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if expected != length:
        return SIZE_MISMATCH, f"a {tuple(shape)} {dtype} array needs {expected:,} bytes, the entry has {length:,}"
    return None


class _FileCache:
    """File sizes and open handles, one per feature file, for checking many rows of one zip."""

    def __init__(self) -> None:
        self.sizes: Dict[str, Optional[int]] = {}
        self.handles: "OrderedDict[str, object]" = OrderedDict()

    def size(self, path: str) -> Optional[int]:
        if path not in self.sizes:
            try:
                self.sizes[path] = os.path.getsize(path) if os.path.isfile(path) else None
            except OSError:
                self.sizes[path] = None
        return self.sizes[path]

    def handle(self, path: str):
        if path not in self.handles:
            if len(self.handles) >= 16:
                self.handles.popitem(last=False)[1].close()
            self.handles[path] = open(path, "rb")
        self.handles.move_to_end(path)
        return self.handles[path]

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def feature_row_problem(audio_field: str, data_dir: str, feature_dim: int,
                        cache: Optional[_FileCache] = None) -> Optional[Tuple[str, str]]:
    """What is wrong with one manifest ``audio`` field, read cheaply, or None.

    Returns (problem kind, detail). Audio files (and audio stored in a zip) are only checked for
    existence and bounds; their length is known once decoded.
    """
    own_cache = cache is None
    cache = cache or _FileCache()
    try:
        path, byte_range = parse_stored_zip_path(audio_field)
        if data_dir is not None and not os.path.isabs(path):
            path = os.path.join(data_dir, path)
        size = cache.size(path)
        if size is None:
            return MISSING_FILE, f"{path} does not exist"
        if byte_range is not None:
            offset, length = byte_range
            if offset + length > size:
                return OUTSIDE_FILE, f"bytes {offset:,}..{offset + length:,} of a {size:,}-byte file"
            handle = cache.handle(path)
            handle.seek(offset)
            if handle.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                return None  # stored audio: decoded on the fly
            return _npy_header_problem(handle, offset, length, feature_dim)
        if path.endswith(".npy"):
            return _npy_header_problem(cache.handle(path), 0, size, feature_dim)
        return None
    except OSError as error:
        return MISSING_FILE, f"cannot be opened ({error})"
    finally:
        if own_cache:
            cache.close()


@dataclass
class RowCheckReport:
    """Rows a manifest lost at load. ``problems``: kind -> [(row id, detail), ...]."""

    manifest: str
    num_rows: int
    problems: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict)

    @property
    def num_bad(self) -> int:
        return sum(len(rows) for rows in self.problems.values())

    def first(self, count: int) -> "RowCheckReport":
        """The report of its first ``count`` bad rows (what a limit needs to be seen exceeded)."""
        kept: Dict[str, List[Tuple[str, str]]] = {}
        for kind, rows in self.problems.items():
            room = count - sum(len(held) for held in kept.values())
            if room <= 0:
                break
            kept[kind] = list(rows[:room])
        return RowCheckReport(self.manifest, self.num_rows, kept)

    def summary(self) -> str:
        counts = ", ".join(f"{len(rows)} {kind}" for kind, rows in self.problems.items())
        named = [f"{row_id!r} ({detail})" for rows in self.problems.values() for row_id, detail in rows][:_ROWS_NAMED]
        return (f"{self.manifest}: dropped {self.num_bad} of {self.num_rows} rows whose features cannot be "
                f"used: {counts}; first: {'; '.join(named)}")


def check_feature_rows(rows, data_dir: str, feature_dim: int, part: Tuple[int, int] = (0, 1)) -> RowCheckReport:
    """Check rows cheaply (see the module docstring); returns what is wrong with which rows.

    Args:
        rows: ``SpeechRows`` of a speech or pair manifest.
        data_dir: root of relative feature paths.
        feature_dim: expected feature dimension (80).
        part: ``(k, n)``: check only the ``k``-th of ``n`` equal consecutive blocks of rows (the
            ranks of a run each check one and merge their reports; consecutive rows mostly
            share their zip). The report counts all the manifest's rows.
    """
    report = RowCheckReport(str(rows.manifest), len(rows))
    block, blocks = part
    start, end = len(rows) * block // blocks, len(rows) * (block + 1) // blocks
    cache = _FileCache()
    try:
        for index in range(start, end):
            audio_field = rows.audio[index]
            problem = feature_row_problem(audio_field, data_dir, feature_dim, cache)
            if problem is not None:
                kind, detail = problem
                report.problems.setdefault(kind, []).append((rows.ids[index], f"{audio_field}: {detail}"))
    finally:
        cache.close()
    return report


def merged_reports(reports: Sequence[RowCheckReport]) -> RowCheckReport:
    """One manifest's reports from several processes, each bad row once (the first detail given)."""
    merged = RowCheckReport(reports[0].manifest, reports[0].num_rows)
    seen = set()
    for report in reports:
        for kind, bad in report.problems.items():
            for row_id, detail in bad:
                if row_id not in seen:
                    seen.add(row_id)
                    merged.problems.setdefault(kind, []).append((row_id, detail))
    return merged


def without_bad_rows(rows, report: RowCheckReport):
    """``rows`` less the rows ``report`` names; raises when none is left."""
    if report.num_bad == 0:
        return rows
    bad = {row_id for problems in report.problems.values() for row_id, _ in problems}
    keep = np.flatnonzero(np.fromiter((row_id not in bad for row_id in rows.ids), dtype=bool, count=len(rows)))
    if not len(keep):
        raise TooManyBadRowsError(f"no usable rows: {report.summary()}")
    logger.warning(report.summary())
    return rows.take(keep)


def drop_bad_feature_rows(rows, data_dir: str, feature_dim: int):
    """:func:`check_feature_rows`, then the rows it found usable: (kept rows, report)."""
    report = check_feature_rows(rows, data_dir, feature_dim)
    return without_bad_rows(rows, report), report


class BadRowLimits:
    """Counts bad rows per manifest (at load and mid-run) and stops the run past the limit.

    Args:
        max_bad_rows: bad rows a manifest may have (-1: no count limit).
        max_bad_row_fraction: the same as a share of the manifest's rows; the larger limit applies.
    """

    def __init__(self, max_bad_rows: int, max_bad_row_fraction: float) -> None:
        self.max_bad_rows = int(max_bad_rows)
        self.max_bad_row_fraction = float(max_bad_row_fraction)
        self.num_rows: Dict[str, int] = {}
        self.bad: Dict[str, Dict[str, str]] = {}  # manifest -> row id -> message
        self.num_bad_mid_run = 0

    def limit(self, manifest: str) -> float:
        return self.limit_for(self.num_rows.get(manifest, 0))

    def limit_for(self, num_rows: int) -> float:
        """The bad rows a manifest of ``num_rows`` rows may have."""
        if self.max_bad_rows < 0:
            return float("inf")
        return max(self.max_bad_rows, self.max_bad_row_fraction * num_rows)

    def register(self, report: RowCheckReport) -> None:
        """A manifest as loaded; raises when its rows dropped at load are already too many."""
        self.num_rows[report.manifest] = report.num_rows
        self.bad[report.manifest] = {row_id: f"row {row_id!r}: {detail}" for rows in report.problems.values()
                                     for row_id, detail in rows}
        self._check(report.manifest)

    def record(self, bad_rows: Sequence[Tuple[str, str, str]]) -> int:
        """Examples left out of a batch ([(manifest, row id, message)]); warns for each new one,
        raises past the limit. Returns the number of distinct bad rows met mid-run so far."""
        for manifest, row_id, message in bad_rows:
            seen = self.bad.setdefault(manifest, {})
            if row_id in seen:
                continue  # met again in a later epoch or validation: counted once
            seen[row_id] = message
            self.num_bad_mid_run += 1
            logger.warning(f"skipped a bad row ({len(seen)} in {manifest}, limit {self._limit_text(manifest)}): "
                           f"{message}")
            self._check(manifest)
        return self.num_bad_mid_run

    def _limit_text(self, manifest: str) -> str:
        limit = self.limit(manifest)
        return "none" if limit == float("inf") else f"{int(limit)}"

    def _check(self, manifest: str) -> None:
        seen = self.bad.get(manifest, [])
        if len(seen) > self.limit(manifest):
            shown = "; ".join(list(seen.values())[:_ROWS_NAMED])
            raise TooManyBadRowsError(
                f"{manifest}: {len(seen)} bad rows (of {self.num_rows.get(manifest, '?')}), more than the limit "
                f"{self._limit_text(manifest)} (--max-bad-rows {self.max_bad_rows}, --max-bad-row-fraction "
                f"{self.max_bad_row_fraction}); first: {shown}. Fix the data (the manifest scripts rebuild "
                f"it), or raise the limits")
