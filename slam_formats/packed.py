"""Columns of many short strings or id sequences held as two numpy arrays each.

A manifest of Libri-Light's size (millions of rows) held as Python lists costs several hundred
bytes a row in every training process, and more in every data-loader worker: reading a list's
items touches their reference counts, so the pages a forked worker shares with its parent are
copied into it one by one. A packed column is one flat array of the values and one array of
offsets (``values[offsets[i]:offsets[i + 1]]`` is item ``i``): about the value's own bytes plus 8
a row, and reading it writes nothing, so forked workers keep sharing it.
"""
from __future__ import annotations

from array import array
from typing import Iterable, Iterator, Sequence, Union

import numpy as np

__all__ = ["PackedStrings", "PackedStringsBuilder", "PackedSequences"]


def _offsets(lengths: Iterable[int]) -> np.ndarray:
    lengths = np.fromiter(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


class _Packed:
    """``values`` (N,) flat and ``offsets`` (rows + 1,) int64; item ``i`` is a slice of ``values``."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(values):
            raise ValueError(f"offsets must start at 0 and end at the {len(values)} values")
        self.values = values
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _span(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self.values[self.offsets[index]:self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        """(rows,) int64: each item's length (in bytes for strings, ids for sequences)."""
        return np.diff(self.offsets)

    def take(self, indices: Sequence[int]):
        """A new column of the items at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        offsets = _offsets(ends - starts)
        return type(self)(self.values[_gather_positions(starts, ends)], offsets)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.offsets.nbytes)


def _gather_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Positions ``[starts[0], ends[0]) + [starts[1], ends[1]) + ...`` as one int64 array."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    item_of_position = np.repeat(np.arange(len(starts)), lengths)
    first_of_item = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return starts[item_of_position] + (np.arange(total) - first_of_item[item_of_position])


class PackedStrings(_Packed):
    """Strings as UTF-8 bytes (``values``: uint8) and offsets; indexing gives back ``str``."""

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> "PackedStrings":
        builder = PackedStringsBuilder()
        for string in strings:
            builder.append(string)
        return builder.build()

    def __getitem__(self, index: int) -> str:
        return self._span(index).tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data = self.values.tobytes()
        offsets = self.offsets.tolist()
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield data[start:end].decode("utf-8")


class PackedStringsBuilder:
    """Appends strings one at a time; :meth:`build` gives the :class:`PackedStrings` (for reading
    several columns in one pass over a file)."""

    def __init__(self) -> None:
        self._data, self._lengths = bytearray(), array("q")

    def append(self, string: str) -> None:
        encoded = string.encode("utf-8")
        self._data += encoded
        self._lengths.append(len(encoded))

    def build(self) -> PackedStrings:
        return PackedStrings(np.frombuffer(self._data, dtype=np.uint8).copy(), _offsets(self._lengths))


class PackedSequences(_Packed):
    """Integer sequences (token ids) as one flat array and offsets; indexing gives a read-only
    view ``(L,)`` of that dtype."""

    @classmethod
    def from_arrays(cls, arrays: Iterable[np.ndarray], dtype: Union[str, np.dtype] = np.int32) -> "PackedSequences":
        arrays = [np.asarray(item).reshape(-1) for item in arrays]
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        if len(values) and values.dtype.kind not in "iub":
            raise ValueError(f"packed sequences hold integers, not {values.dtype.name}")
        limits = np.iinfo(dtype)
        if len(values) and (values.min() < limits.min or values.max() > limits.max):
            raise ValueError(f"values {values.min()} .. {values.max()} do not fit in {np.dtype(dtype).name}")
        return cls(values.astype(dtype, copy=False), _offsets(len(item) for item in arrays))

    @property
    def sizes(self) -> np.ndarray:
        """(rows,) int64 sequence lengths (as fairseq's indexed datasets name them)."""
        return self.lengths()

    def __getitem__(self, index: int) -> np.ndarray:
        view = self._span(index)
        view.flags.writeable = False
        return view

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self[index]
