"""The files of one extracted shard, and whether a shard is already done.

For each layer L, in ``OUT/layerL/``: ``STEM.npy`` (all rows' states), ``STEM.len`` (frames per
row), ``STEM.ids`` (row ids); in ``OUT/``: ``STEM.json`` (settings, counts) and, when some rows
have no states, ``STEM.skipped.tsv``. ``STEM`` is ``NAME_SHARD_NUMSHARDS``. The ``.json`` is
written last and removed first when a shard is redone, so it only exists beside a finished set.
Until a shard is finished its rows are in hidden partial files, with a record of how far they are
complete (:class:`ShardOutputs`), so that a stopped shard is resumed rather than redone. The record
goes only after the ``.json`` is written, so a shard stopped while its files are put in place is
finished by the next run, not redone.

A summary also names the data files whose content decided the frames (the data config, CMVN
statistics; :func:`content_identity`): a shard whose files changed since is not done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from slam_formats.atomic import atomic_write_text
from slam_formats.npy_rows import NpyRowWriter

__all__ = ["ShardOutputs", "summary_path", "progress_path", "finished_summary", "write_summary", "content_identity",
           "discard_progress", "recorded_runs", "OutputConflictError"]

logger = logging.getLogger("slam_fairseq.extract_features")


def summary_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}.json"


class OutputConflictError(ValueError):
    """Outputs of another job under the same file names; the message names both."""


def content_identity(path: Path) -> Dict[str, str]:
    """{path, sha256} of a small file (a data config, CMVN statistics): unlike a size and a time,
    a digest stays the same when the file is written again with the same content."""
    resolved = Path(path).resolve()
    return {"path": str(resolved), "sha256": hashlib.sha256(resolved.read_bytes()).hexdigest()}


def _unchanged(identity: Dict[str, str]) -> bool:
    try:
        return content_identity(Path(identity["path"])) == identity
    except (OSError, KeyError, TypeError):
        return False


def finished_summary(out_dir: Path, stem: str, settings: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The summary of a shard done with the same ``settings`` whose files are all there and whose
    data files (``resolved.data_files``) are unchanged, else None."""
    path = summary_path(out_dir, stem)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        data_files = list((summary.get("resolved") or {}).get("data_files") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if summary.get("settings") != settings or not all(_unchanged(identity) for identity in data_files):
        return None
    files = [Path(name) for layer_files in summary.get("files", {}).values() for name in layer_files]
    return summary if files and all(file.is_file() for file in files) else None


def recorded_runs(out_dir: Path, stem: str) -> List[Tuple[Path, Dict[str, object], object]]:
    """(record, settings, layers) of the runs whose summary or progress record is under ``stem``:
    what a run about to write these files would replace."""
    runs = []
    for path in (summary_path(out_dir, stem), progress_path(out_dir, stem)):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("settings"), dict):
            runs.append((path, record["settings"], record.get("layers")))
    return runs


def write_summary(out_dir: Path, stem: str, summary: Dict[str, object]) -> Path:
    path = summary_path(out_dir, stem)
    atomic_write_text(str(path), json.dumps(summary, indent=2) + "\n")
    return path


def progress_path(out_dir: Path, stem: str) -> Path:
    """Where an unfinished shard records how far its files are complete."""
    return out_dir / f".{stem}.progress.json"


def _rows_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}.rows.partial"


def discard_progress(out_dir: Path, stem: str) -> None:
    """Remove a shard's record of progress and its rows file (the layers' partial files are put in
    place or started over by their writers)."""
    progress_path(out_dir, stem).unlink(missing_ok=True)
    _rows_path(out_dir, stem).unlink(missing_ok=True)


class ShardOutputs:
    """Writers of one shard's files (module docstring); rows are added in order.

    While the shard runs, its rows' states go to each layer's ``.STEM.npy.partial`` and one JSON
    line per row (id, frames, audio, problem) to ``OUT/.STEM.rows.partial``. :meth:`save_progress`
    flushes them to disk and then records, in ``OUT/.STEM.progress.json``, the settings, the
    counts and how many bytes of the rows file are complete. A later ``ShardOutputs`` of the same
    stem and settings (``resume=True``) cuts the files back to that point and goes on from there:
    a run stopped in any way (SIGKILL included) loses at most the rows since the last call.

    :meth:`close` marks the record as closing (every row complete) before it puts the layers'
    files in place, and drops it only after the summary is written. A run stopped in between is
    finished by the next one: the layers already in place are kept (checked against the record),
    the others closed, and the ``.len``, ``.ids`` and ``.json`` written again.

    Args:
        out_dir: the output directory; stem: ``NAME_SHARD_NUMSHARDS``.
        layers: layer numbers; width: states per frame (D); dtype: stored type.
        settings: what decides the outputs (a stopped run is only resumed with the same).
        resume: go on from a stopped run's progress when there is one; False starts over.
    """

    def __init__(self, out_dir: Path, stem: str, layers: Sequence[int], width: int, dtype: str,
                 settings: Optional[Dict[str, object]] = None, resume: bool = False) -> None:
        self.out_dir = out_dir
        self.stem = stem
        self.width = width
        self.settings = settings
        self.layers = sorted(layers)
        summary_path(out_dir, stem).unlink(missing_ok=True)  # redone: no summary describes a mix of files
        self.directories = {layer: out_dir / f"layer{layer}" for layer in self.layers}
        self.lengths: List[int] = []
        self.ids: List[str] = []
        self.skipped: List[str] = []
        self.counts: Dict[str, int] = {}
        self._closing = False
        progress = self._stopped_progress() if resume else None
        if progress is not None:
            try:
                self._resume(progress, np.dtype(dtype))
                return
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.warning(f"{progress_path(out_dir, stem)}: cannot resume this shard ({error}); starting it over")
                self.lengths, self.ids, self.skipped, self.counts = [], [], [], {}
                self._closing = False
        self._discard_progress()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.writers = {layer: NpyRowWriter(str(directory / f"{stem}.npy"), width, np.dtype(dtype))
                        for layer, directory in self.directories.items()}
        self._rows = open(_rows_path(out_dir, stem), "wb")

    @property
    def rows_done(self) -> int:
        """Rows already in the files (those of a resumed run included)."""
        return len(self.ids)

    def _stopped_progress(self) -> Optional[Dict[str, object]]:
        try:
            progress = json.loads(progress_path(self.out_dir, self.stem).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if progress.get("settings") != self.settings or progress.get("layers") != self.layers:
            logger.info(f"{progress_path(self.out_dir, self.stem)}: a stopped run of this shard with other settings; "
                        "starting the shard over")
            return None
        return progress

    def _resume(self, progress: Dict[str, object], dtype: np.dtype) -> None:
        rows_path = _rows_path(self.out_dir, self.stem)
        complete = int(progress["rows_bytes"])
        counts = {str(name): int(count) for name, count in dict(progress["counts"]).items()}
        closing = bool(progress.get("closing", False))
        if complete < 0:
            raise ValueError(f"{progress_path(self.out_dir, self.stem)}: negative rows_bytes {complete}")
        with open(rows_path, "r+b") as handle:  # cut back to the last complete row
            if os.fstat(handle.fileno()).st_size < complete:
                raise ValueError(f"{rows_path} is shorter than its recorded {complete} bytes")
            handle.truncate(complete)
            handle.seek(0)
            for line in handle:
                row_id, frames, audio, problem = json.loads(line)
                self._remember(row_id, int(frames), audio, problem)
        frames = sum(self.lengths)
        writers = {}
        try:
            for layer, directory in self.directories.items():
                path = directory / f"{self.stem}.npy"
                if closing and self._in_place(path, frames, dtype):
                    continue
                writers[layer] = NpyRowWriter(str(path), self.width, dtype, resume_rows=frames)
        except ValueError:
            for writer in writers.values():
                writer.suspend()
            raise
        self.writers = writers
        self._rows = open(rows_path, "ab")
        self.counts = counts
        self._closing = closing

    def _in_place(self, path: Path, frames: int, dtype: np.dtype) -> bool:
        """Whether a closing run already put this layer's ``.npy`` in place: its partial file is
        gone (renamed onto it) and it holds the recorded rows. Raises ValueError when neither
        file is there as recorded."""
        if (path.parent / f".{path.name}.partial").exists():  # NpyRowWriter's partial file
            return False
        try:
            stored = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: neither its partial file nor a finished one ({error})") from error
        if stored.shape != (frames, self.width) or stored.dtype != dtype:
            raise ValueError(f"{path}: {stored.shape} {stored.dtype.name}, not the recorded "
                             f"({frames}, {self.width}) {dtype.name}")
        return True

    def _discard_progress(self) -> None:
        discard_progress(self.out_dir, self.stem)

    def _remember(self, row_id: str, frames: int, audio: str, problem: Optional[str]) -> None:
        self.lengths.append(frames)
        self.ids.append(row_id)
        if problem is not None:
            self.skipped.append("\t".join(field.replace("\t", " ").replace("\n", " ")
                                          for field in (row_id, audio, problem)))

    def _add(self, row_id: str, states: Dict[int, np.ndarray], audio: str, problem: Optional[str]) -> None:
        if self._closing:
            raise ValueError(f"{self.out_dir / self.stem}: every row is already in the files")
        for layer, writer in self.writers.items():
            writer.append(states[layer])
        frames = len(next(iter(states.values())))
        self._rows.write((json.dumps([row_id, frames, audio, problem], ensure_ascii=False) + "\n").encode("utf-8"))
        self._remember(row_id, frames, audio, problem)

    def add(self, row_id: str, states: Dict[int, np.ndarray], audio: str = "") -> None:
        """A row's (T', D) states for every layer (T' may be 0)."""
        self._add(row_id, states, audio, None)

    def add_without_states(self, row_id: str, audio: str, problem: str) -> None:
        """A row that has no states: length 0 (the outputs keep one entry per row), listed."""
        self._add(row_id, {layer: np.zeros((0, self.width), np.float32) for layer in self.layers}, audio, problem)

    def save_progress(self, counts: Dict[str, int]) -> None:
        """Flush the rows added so far to disk and record them (with ``counts``) as complete."""
        for writer in self.writers.values():
            writer.sync()
        self._rows.flush()
        os.fsync(self._rows.fileno())
        self.counts = dict(counts)
        progress = {"settings": self.settings, "layers": self.layers, "rows": self.rows_done,
                    "rows_bytes": self._rows.tell(), "counts": self.counts, "closing": self._closing}
        atomic_write_text(str(progress_path(self.out_dir, self.stem)), json.dumps(progress) + "\n")

    def close(self, summary: Optional[Dict[str, object]] = None) -> Dict[str, List[str]]:
        """Put every file in place, then write ``summary`` (given: with these files under
        ``files``) and only then drop the record of progress (class docstring); returns
        {layer: [its files]}."""
        self._closing = True
        self.save_progress(self.counts)
        self._rows.close()
        files = {}
        for layer in self.layers:
            writer = self.writers.pop(layer, None)
            if writer is not None:
                writer.close()
            files[str(layer)] = self._write_lists(layer)
        self._write_skipped()
        if summary is not None:
            write_summary(self.out_dir, self.stem, dict(summary, files=files))
        self._discard_progress()
        return files

    def _write_lists(self, layer: int) -> List[str]:
        """A layer's ``.len`` and ``.ids``; returns its three files."""
        directory = self.directories[layer]
        atomic_write_text(str(directory / f"{self.stem}.len"), "".join(f"{n}\n" for n in self.lengths))
        atomic_write_text(str(directory / f"{self.stem}.ids"), "".join(f"{i}\n" for i in self.ids))
        return [str((directory / f"{self.stem}.{suffix}").resolve()) for suffix in ("npy", "len", "ids")]

    def _write_skipped(self) -> None:
        skipped = self.out_dir / f"{self.stem}.skipped.tsv"
        if self.skipped:
            atomic_write_text(str(skipped), "id\taudio\tproblem\n" + "".join(line + "\n" for line in self.skipped))
        else:
            skipped.unlink(missing_ok=True)

    def suspend(self) -> None:
        """Stop writing and keep the partial files: a run with the same settings resumes from the
        last :meth:`save_progress` (or finishes a :meth:`close` that was stopped)."""
        self._rows.close()
        for writer in self.writers.values():
            writer.suspend()
