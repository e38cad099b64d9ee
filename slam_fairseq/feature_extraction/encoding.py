"""Rows of log-Mel frames through the encoder in length-sorted batches, states back in row order.

A window of rows (several batches' worth) is sorted by length, cut into batches of at most
``max_frames`` padded frames, and run; each row's states are then handed back in the window's own
order. A batch that runs out of device memory is run again a row at a time; a row that still does
not fit, or whose states are not finite (reduced precision), gets a problem instead of states.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["RowStates", "length_sorted_batches", "encode_window"]


@dataclass
class RowStates:
    """One row's result: states {layer: (T', D) float32} (empty for a row without frames), or a
    problem saying why there are none."""

    states: Dict[int, np.ndarray] = field(default_factory=dict)
    problem: Optional[str] = None


def length_sorted_batches(lengths: Sequence[int], max_frames: int) -> List[List[int]]:
    """Indices of rows grouped into batches of at most ``max_frames`` padded frames (a longer row
    alone), longest rows first, so that rows of similar length share a batch."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: List[List[int]] = []
    for index in order:
        # sorted longest first: a batch's first row is its longest
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_frames:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error)


@torch.no_grad()
def _run(encoder, batch: Sequence[np.ndarray], layers: Sequence[int], device: torch.device,
         autocast: Optional[torch.dtype]) -> List[Dict[int, np.ndarray]]:
    """{layer: (T', D) float32 states} of each (T, F) row of a batch, in order."""
    lengths = torch.tensor([len(features) for features in batch])
    padded = torch.zeros(len(batch), int(lengths.max()), batch[0].shape[1])
    for row, features in enumerate(batch):
        padded[row, :len(features)] = torch.from_numpy(features)
    precision = (torch.autocast(device.type, dtype=autocast) if autocast is not None
                 else contextlib.nullcontext())
    with precision:
        result = encoder.layer_states(padded.to(device), lengths.to(device), layers)
    output_lengths = (~result.padding_mask).sum(dim=1).tolist()
    states = {layer: value.float().cpu().numpy() for layer, value in result.states.items()}
    return [{layer: value[row, :output_lengths[row]] for layer, value in states.items()} for row in range(len(batch))]


def _checked(states: Dict[int, np.ndarray]) -> RowStates:
    for layer, value in states.items():
        if not np.isfinite(value).all():
            return RowStates(problem=f"layer {layer} has {int((~np.isfinite(value)).sum())} non-finite states "
                                     "(reduced precision overflowed?)")
    return RowStates(states)


def _run_or_split(encoder, rows: List[np.ndarray], layers: Sequence[int], device: torch.device,
                  autocast: Optional[torch.dtype]) -> List[RowStates]:
    try:
        return [_checked(states) for states in _run(encoder, rows, layers, device, autocast)]
    except (RuntimeError, MemoryError) as error:
        if not _is_out_of_memory(error):
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if len(rows) == 1:
        return [RowStates(problem=f"out of memory at {len(rows[0])} frames (alone)")]
    return [result for row in rows for result in _run_or_split(encoder, [row], layers, device, autocast)]


def encode_window(encoder, window: Sequence[Optional[np.ndarray]], layers: Sequence[int], max_frames: int,
                  device: torch.device, autocast: Optional[torch.dtype] = None) -> Iterator[RowStates]:
    """Yield a :class:`RowStates` for each (T, F) row of the window, in its order; None (a row
    without encoder frames) gives empty states.

    Args:
        encoder: a :class:`SlamEncoder` (eval mode, on ``device``).
        window: normalised log-Mel frames of each row, or None.
        layers: layer numbers (:mod:`slam_fairseq.encoders.layer_states`).
        max_frames: padded frames per batch.
        autocast: a reduced precision to run in, or None (float32).
    """
    readable = [index for index, features in enumerate(window) if features is not None]
    results: Dict[int, RowStates] = {}
    for batch in length_sorted_batches([len(window[index]) for index in readable], max_frames):
        rows = [readable[position] for position in batch]
        for index, result in zip(rows, _run_or_split(encoder, [window[index] for index in rows], layers, device,
                                                     autocast)):
            results[index] = result
    width = encoder.embed_dim
    for index in range(len(window)):
        yield results.pop(index, None) or RowStates({layer: np.zeros((0, width), np.float32) for layer in layers})
