"""Token sequences in fairseq's memory-mapped indexed dataset format (``.bin`` + ``.idx``), in numpy.

fairseq's ``data_utils.load_indexed_dataset(prefix, dictionary)`` reads what
:class:`MMapTokenWriter` writes (tested against fairseq's own reader), so the text prep script
binarizes text without importing torch or fairseq.

Layout (fairseq's ``MMapIndexedDataset``, version 1):
    ``.bin``: the tokens of every sequence, one after another, in the index's dtype.
    ``.idx``: ``MMIDIDX\\0\\0``, version ``<Q`` 1, dtype code ``<B``, sequence count ``<Q``, then the
    (N,) int32 sizes and the (N,) int64 byte offsets into ``.bin``.
"""
from __future__ import annotations

import array
import os
import shutil
import struct
from dataclasses import dataclass
from typing import BinaryIO, Optional, Sequence, Tuple

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# fairseq's integer dtype codes (indexed_dataset._code_to_dtype), both ways
INDEX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16, 9: np.uint32,
                10: np.uint64}
DTYPE_CODES = {dtype: code for code, dtype in INDEX_DTYPES.items()}


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype fairseq picks for ids below ``vocab_size`` (``best_fitting_int_dtype``)."""
    if vocab_size < 65500:
        return np.uint16
    if vocab_size < 4294967295:
        return np.uint32
    return np.int64


class MMapTokenWriter:
    """Write token sequences to ``<prefix>.bin`` while collecting sizes; :meth:`finalize` writes
    the ``.idx``.

    Args:
        bin_path: the data file to write.
        vocab_size: dictionary size (chooses the dtype; every id must be below it).
    """

    def __init__(self, bin_path: str, vocab_size: int) -> None:
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self._data: BinaryIO = open(bin_path, "wb")
        self._sizes = array.array("i")  # 4 bytes a sequence (a list of ints holds about 36)

    def add(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"id {int(array.max()) if array.max() >= self.vocab_size else int(array.min())} "
                             f"outside the dictionary of {self.vocab_size}")
        self._data.write(array.astype(self.dtype).tobytes(order="C"))
        self._sizes.append(int(array.size))

    def finalize(self, idx_path: str) -> None:
        self._data.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if len(self._sizes) else np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * np.dtype(self.dtype).itemsize
        with open(idx_path, "wb") as index:
            _write_index_header(index, self.dtype, len(sizes))
            index.write(sizes.tobytes(order="C"))
            index.write(pointers.tobytes(order="C"))

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()


def _write_index_header(index: BinaryIO, dtype: type, count: int) -> None:
    index.write(INDEX_MAGIC)
    index.write(struct.pack("<Q", INDEX_VERSION))
    index.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
    index.write(struct.pack("<Q", count))


def install_indexed(source_prefix: str, out_prefix: str) -> None:
    """Rename ``<source_prefix>.{bin,idx}`` to ``<out_prefix>.{bin,idx}``, ``.idx`` last and an older
    ``.idx`` removed first: a stop in between leaves no ``.idx`` next to a new ``.bin``."""
    if os.path.exists(f"{out_prefix}.idx"):
        os.unlink(f"{out_prefix}.idx")
    os.replace(f"{source_prefix}.bin", f"{out_prefix}.bin")
    os.replace(f"{source_prefix}.idx", f"{out_prefix}.idx")


def concatenate_indexed(parts: Sequence[str], out_prefix: str) -> int:
    """Write the sequences of the indexed datasets ``<part>.{bin,idx}`` (one dtype), in order, as
    ``<out_prefix>.{bin,idx}``, streaming (no part is held in memory whole). Written under
    temporary names, then renamed, ``.idx`` last. Returns the number of sequences.

    Raises:
        ValueError: no parts, or parts of different dtypes (naming them).
    """
    if not parts:
        raise ValueError(f"{out_prefix}: no indexed datasets to concatenate")
    indexes = [read_index(f"{part}.idx") for part in parts]
    dtypes = {str(dtype) for dtype, _, _ in indexes}
    if len(dtypes) > 1:
        raise ValueError(f"{out_prefix}: parts of different token types {sorted(dtypes)} ({', '.join(parts)})")
    dtype = indexes[0][0]
    total = sum(len(sizes) for _, sizes, _ in indexes)
    directory, name = os.path.split(os.path.abspath(out_prefix))
    temporary = os.path.join(directory, f".tmp-{name}-{os.getpid()}")
    try:
        with open(f"{temporary}.bin", "wb") as data:
            for part in parts:
                with open(f"{part}.bin", "rb") as source:
                    shutil.copyfileobj(source, data, 1 << 24)
        with open(f"{temporary}.idx", "wb") as index:
            _write_index_header(index, dtype.type, total)
            for _, sizes, _ in indexes:
                index.write(np.asarray(sizes, dtype=np.int32).tobytes(order="C"))
            offset = 0
            for part, (_, _, pointers) in zip(parts, indexes):
                index.write((np.asarray(pointers, dtype=np.int64) + offset).tobytes(order="C"))
                offset += os.path.getsize(f"{part}.bin")
        install_indexed(temporary, out_prefix)
    finally:
        for suffix in (".bin", ".idx"):
            if os.path.exists(f"{temporary}{suffix}"):
                os.unlink(f"{temporary}{suffix}")
    return total


SCAN_WINDOW_TOKENS = 1 << 24  # ids compared per step: 32 MiB of uint16


@dataclass
class TokenIdScan:
    """What :func:`scan_token_ids` found.

    first_outside: (sequence index, id) of the first id outside ``[0, vocab_size)``, or None.
    tokens_checked: ids compared (all of them unless the file was larger than ``max_bytes``).
    tokens_total: ids in the file.
    """

    first_outside: Optional[Tuple[int, int]]
    tokens_checked: int
    tokens_total: int


def read_index(idx_path: str) -> Tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, (N,) int32 sizes, (N,) int64 byte offsets) of a fairseq mmap ``.idx``, memory-mapped;
    ValueError naming the file when it is not one."""
    header_size = len(INDEX_MAGIC) + 8 + 1 + 8
    with open(idx_path, "rb") as handle:
        header = handle.read(header_size)
    if len(header) < header_size or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise ValueError(f"{idx_path}: not a fairseq mmap index (no MMIDIDX header)")
    version, code, count = struct.unpack("<QBQ", header[len(INDEX_MAGIC):])
    if version != INDEX_VERSION or code not in INDEX_DTYPES:
        raise ValueError(f"{idx_path}: index version {version}, dtype code {code}: not token ids")
    if os.path.getsize(idx_path) < header_size + 12 * count:
        raise ValueError(f"{idx_path}: cut short ({count:,} sequences declared)")
    if count == 0:
        return np.dtype(INDEX_DTYPES[code]), np.zeros(0, np.int32), np.zeros(0, np.int64)
    sizes = np.memmap(idx_path, dtype=np.int32, mode="r", offset=header_size, shape=(count,))
    pointers = np.memmap(idx_path, dtype=np.int64, mode="r", offset=header_size + 4 * count, shape=(count,))
    return np.dtype(INDEX_DTYPES[code]), sizes, pointers


def scan_token_ids(prefix: str, vocab_size: int, max_bytes: int = 1 << 31) -> TokenIdScan:
    """Look for ids outside ``[0, vocab_size)`` in ``<prefix>.bin`` (data binarized with another,
    larger dictionary), in windows of :data:`SCAN_WINDOW_TOKENS`.

    A file up to ``max_bytes`` is read whole (about a second for 2 GiB from the page cache);
    a larger one in evenly spaced windows adding up to ``max_bytes``, so that loading a corpus of
    hundreds of GB stays quick (its other ids are still checked as they are read).
    """
    dtype, sizes, pointers = read_index(f"{prefix}.idx")
    total = int(sizes.sum(dtype=np.int64))
    if os.path.getsize(f"{prefix}.bin") < total * dtype.itemsize:
        raise ValueError(f"{prefix}.bin: cut short ({os.path.getsize(f'{prefix}.bin'):,} bytes; its index "
                         f"lists {total:,} ids of {dtype.itemsize} bytes)")
    data = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r", shape=(total,)) if total else np.zeros(0, dtype)
    window = SCAN_WINDOW_TOKENS
    num_windows = -(-total // window)
    budget = max(1, int(max_bytes) // (window * dtype.itemsize))
    starts = (np.arange(num_windows) if num_windows <= budget
              else np.linspace(0, num_windows - 1, budget).astype(np.int64)) * window
    signed = np.issubdtype(dtype, np.signedinteger)
    checked = 0
    for start in starts.tolist():
        chunk = data[start:start + window]
        checked += len(chunk)
        if len(chunk) and (int(chunk.max()) >= vocab_size or (signed and int(chunk.min()) < 0)):
            position = start + int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
            line = int(np.searchsorted(pointers, position * dtype.itemsize, side="right")) - 1
            return TokenIdScan((line, int(data[position])), checked, total)
    return TokenIdScan(None, checked, total)
