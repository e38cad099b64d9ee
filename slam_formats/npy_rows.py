"""An ``.npy`` file written a block of rows at a time, whose length is only known at the end.

The header is written with room for any row count and rewritten, same size, when the file is
closed, so that ``np.load(path, mmap_mode="r")`` reads the result as one (rows, width) array
without a second copy of the data. The rows go to ``.NAME.partial`` beside the file, renamed onto
it when closed: a run stopped before that leaves no file that looks finished. A later writer of the
same file starts the partial one over, or, given the row count a finished block ended at
(``resume_rows``, from :meth:`NpyRowWriter.sync`), keeps those rows and writes on after them.
"""
from __future__ import annotations

import os

import numpy as np

from typing import Optional

from slam_formats.atomic import current_umask

__all__ = ["NpyRowWriter"]

_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_BYTES = 128  # magic, length and a header dict with room for a row count of 20 digits


def _header(dtype: np.dtype, rows: int, width: int) -> bytes:
    text = "{'descr': %r, 'fortran_order': False, 'shape': (%d, %d), }" % (np.lib.format.dtype_to_descr(dtype),
                                                                              rows, width)
    room = _HEADER_BYTES - len(_MAGIC) - 2 - 1  # the length field, the final newline
    if len(text) > room:
        raise ValueError(f"npy header of {len(text)} characters does not fit in {room}")
    text = text.ljust(room) + "\n"
    return _MAGIC + len(text).to_bytes(2, "little") + text.encode("latin1")


class NpyRowWriter:
    """Appends (n, width) blocks to ``path``; :meth:`close` makes it a valid ``.npy`` of all rows.

    Args:
        path: the ``.npy`` to write.
        width: columns of every row.
        dtype: stored type (blocks are converted to it).
        resume_rows: keep the first ``resume_rows`` rows of the partial file a stopped writer of
            ``path`` left (with the same width and type), drop anything after them, and append
            after them; None starts a new file.

    Raises ValueError naming the partial file when it cannot be resumed (missing, another width or
    type, fewer rows than ``resume_rows``).
    """

    def __init__(self, path: str, width: int, dtype: np.dtype = np.float32, resume_rows: Optional[int] = None) -> None:
        self.path = str(path)
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        directory, name = os.path.split(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # a fixed name: a run killed before close() leaves it, and the next writer of this file reuses it
        self._temporary = os.path.join(directory, f".{name}.partial")
        if resume_rows is None:
            self._handle = open(self._temporary, "wb")
            self._handle.write(_header(self.dtype, 0, self.width))
        else:
            self._handle = self._reopened(resume_rows)
            self.rows = resume_rows

    @property
    def partial_path(self) -> str:
        """Where the rows are until :meth:`close`."""
        return self._temporary

    def _reopened(self, rows: int):
        """The partial file opened for appending after its first ``rows`` rows (cut there)."""
        header = _header(self.dtype, 0, self.width)
        end = len(header) + rows * self.width * self.dtype.itemsize
        try:
            handle = open(self._temporary, "r+b")
        except FileNotFoundError:
            raise ValueError(f"{self._temporary}: no partial file to resume") from None
        if handle.read(len(header)) != header or os.fstat(handle.fileno()).st_size < end:
            handle.close()
            raise ValueError(f"{self._temporary}: not {rows} rows of width {self.width} in {self.dtype.name}; "
                             "cannot resume it")
        handle.truncate(end)
        handle.seek(end)
        return handle

    def append(self, block: np.ndarray) -> None:
        """Add the rows of a (n, width) block."""
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.width:
            raise ValueError(f"{self.path}: a block of shape {block.shape}, expected (rows, {self.width})")
        with np.errstate(over="ignore"):
            stored = np.ascontiguousarray(block, dtype=self.dtype)
        if self.dtype.kind == "f" and not np.isfinite(stored).all() and np.isfinite(block).all():
            raise ValueError(f"{self.path}: values beyond {self.dtype.name}'s range (largest magnitude "
                             f"{float(np.abs(block).max()):.4g}); store them in a wider type")
        self._handle.write(stored.tobytes())
        self.rows += len(block)

    def sync(self) -> int:
        """Flush the rows written so far to disk; returns their count (what ``resume_rows`` takes)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return self.rows

    def suspend(self) -> None:
        """Stop writing but keep the partial file, for a later writer given ``resume_rows``."""
        self._handle.close()

    def close(self) -> None:
        """Write the final header, flush to disk and put the file under its name."""
        self._handle.seek(0)
        self._handle.write(_header(self.dtype, self.rows, self.width))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.chmod(self._temporary, 0o666 & ~current_umask())
        os.replace(self._temporary, self.path)

    def abort(self) -> None:
        """Drop what was written: the file never appears under its name."""
        self._handle.close()
        if os.path.exists(self._temporary):
            os.unlink(self._temporary)

    def __enter__(self) -> "NpyRowWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
