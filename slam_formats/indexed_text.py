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

import struct
from typing import BinaryIO, List, Sequence

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# fairseq's dtype codes (indexed_dataset._code_to_dtype) for the dtypes token ids are stored in
DTYPE_CODES = {np.uint16: 8, np.uint32: 9, np.int64: 5}


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
        self._sizes: List[int] = []

    def add(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"id {int(array.max()) if array.max() >= self.vocab_size else int(array.min())} "
                             f"outside the dictionary of {self.vocab_size}")
        self._data.write(array.astype(self.dtype).tobytes(order="C"))
        self._sizes.append(int(array.size))

    def finalize(self, idx_path: str) -> None:
        self._data.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * np.dtype(self.dtype).itemsize
        with open(idx_path, "wb") as index:
            index.write(INDEX_MAGIC)
            index.write(struct.pack("<Q", INDEX_VERSION))
            index.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            index.write(struct.pack("<Q", len(sizes)))
            index.write(sizes.tobytes(order="C"))
            index.write(pointers.tobytes(order="C"))

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()
