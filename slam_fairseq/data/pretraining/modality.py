"""What the three pre-training datasets (speech, text, pairs) share: sizes, epochs, ordering.

An item depends on ``(index, epoch)`` only: :meth:`get_item` takes the epoch explicitly, so the
round-robin dataset (:mod:`slam_fairseq.data.pretraining.round_robin`) can hand it over with every step and data-loader
workers never hold a stale epoch. ``__getitem__`` uses the epoch last given to :meth:`set_epoch`,
for using a dataset on its own.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
from fairseq.data import FairseqDataset

__all__ = ["MODALITIES", "PretrainingModalityDataset"]

MODALITIES = ("speech", "text", "pair")  # the order of every per-modality loop and of a step's keys


class PretrainingModalityDataset(FairseqDataset):
    """Base class. Subclasses set ``self.sizes`` ((N,) batching sizes: feature frames or tokens),
    ``self.name`` (the file, for messages) and implement :meth:`get_item` and :meth:`collater`.

    Args:
        seed: the run's seed; masks are drawn with ``masking_rng(seed, epoch, index, ...)``.
    """

    modality = ""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = int(seed)
        self.epoch = 1
        self.sizes = np.zeros(0, dtype=np.int64)
        self.name = ""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return True

    def get_item(self, index: int, epoch: int) -> Dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.get_item(int(index), self.epoch)

    def __len__(self) -> int:
        return len(self.sizes)

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return self.sizes[indices]

    def size(self, index: int):
        return int(self.sizes[index])

    def max_size_exceeded(self, max_positions) -> np.ndarray:
        """(N,) bool: examples longer than ``max_positions`` (frames, tokens); subclasses say which."""
        raise NotImplementedError

    def ordered_indices(self) -> np.ndarray:
        """Indices sorted by size, ties in random order (call under ``data_utils.numpy_seed``)."""
        indices = np.random.permutation(len(self))
        return indices[np.argsort(self.sizes[indices], kind="mergesort")]

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        raise NotImplementedError
