"""The files of one extracted shard, and whether a shard is already done.

For each layer L, in ``OUT/layerL/``: ``STEM.npy`` (all rows' states), ``STEM.len`` (frames per
row), ``STEM.ids`` (row ids); in ``OUT/``: ``STEM.json`` (settings, counts) and, when some rows
have no states, ``STEM.skipped.tsv``. ``STEM`` is ``NAME_SHARD_NUMSHARDS``. The ``.json`` is
written last and removed first when a shard is redone, so it only exists beside a finished set.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from slam_formats.atomic import atomic_write_text
from slam_formats.npy_rows import NpyRowWriter

__all__ = ["ShardOutputs", "summary_path", "finished_summary", "write_summary"]


def summary_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}.json"


def finished_summary(out_dir: Path, stem: str, settings: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The summary of a shard done with the same ``settings`` whose files are all there, else None."""
    path = summary_path(out_dir, stem)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if summary.get("settings") != settings:
        return None
    files = [Path(name) for layer_files in summary.get("files", {}).values() for name in layer_files]
    return summary if files and all(file.is_file() for file in files) else None


def write_summary(out_dir: Path, stem: str, summary: Dict[str, object]) -> Path:
    path = summary_path(out_dir, stem)
    atomic_write_text(str(path), json.dumps(summary, indent=2) + "\n")
    return path


class ShardOutputs:
    """Writers of one shard's files (module docstring); rows are added in order.

    Args:
        out_dir: the output directory; stem: ``NAME_SHARD_NUMSHARDS``.
        layers: layer numbers; width: states per frame (D); dtype: stored type.
    """

    def __init__(self, out_dir: Path, stem: str, layers: Sequence[int], width: int, dtype: str) -> None:
        self.out_dir = out_dir
        self.stem = stem
        self.width = width
        summary_path(out_dir, stem).unlink(missing_ok=True)  # redone: no summary describes a mix of files
        self.directories = {layer: out_dir / f"layer{layer}" for layer in layers}
        self.writers = {layer: NpyRowWriter(str(directory / f"{stem}.npy"), width, np.dtype(dtype))
                        for layer, directory in self.directories.items()}
        self.lengths: List[int] = []
        self.ids: List[str] = []
        self.skipped: List[str] = []

    def add(self, row_id: str, states: Dict[int, np.ndarray]) -> None:
        """A row's (T', D) states for every layer (T' may be 0)."""
        for layer, writer in self.writers.items():
            writer.append(states[layer])
        self.lengths.append(len(next(iter(states.values()))))
        self.ids.append(row_id)

    def add_without_states(self, row_id: str, audio: str, problem: str) -> None:
        """A row that has no states: length 0 (the outputs keep one entry per row), listed."""
        self.add(row_id, {layer: np.zeros((0, self.width), np.float32) for layer in self.writers})
        self.skipped.append("\t".join(field.replace("\t", " ").replace("\n", " ")
                                      for field in (row_id, audio, problem)))

    def close(self) -> Dict[str, List[str]]:
        """Put every file in place; returns {layer: [its files]}."""
        files = {}
        for layer, writer in self.writers.items():
            writer.close()
            directory = self.directories[layer]
            atomic_write_text(str(directory / f"{self.stem}.len"), "".join(f"{n}\n" for n in self.lengths))
            atomic_write_text(str(directory / f"{self.stem}.ids"), "".join(f"{i}\n" for i in self.ids))
            files[str(layer)] = [str((directory / f"{self.stem}.{suffix}").resolve()) for suffix in ("npy", "len", "ids")]
        skipped = self.out_dir / f"{self.stem}.skipped.tsv"
        if self.skipped:
            atomic_write_text(str(skipped), "id\taudio\tproblem\n" + "".join(line + "\n" for line in self.skipped))
        else:
            skipped.unlink(missing_ok=True)
        return files

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
