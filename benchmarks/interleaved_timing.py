"""Interleaved A/B timing shared by the benchmark scripts.

Each side is called once to warm up (allocator, kernels, lazy initialisation), then the two are
timed in turn, A B A B ..., so that a machine whose speed drifts during the run slows both alike;
on CUDA each call is bracketed by synchronisations so that it is timed to its end.
"""
from __future__ import annotations

import time
from typing import Callable, List, Tuple


def time_once(step: Callable[[], None], device) -> float:
    """Seconds of one call of ``step`` on ``device`` (a ``torch.device``)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(first: Callable[[], None], second: Callable[[], None], repeats: int,
                device) -> Tuple[List[float], List[float]]:
    """Seconds of ``repeats`` calls of each side, timed first, second, first, ... after one warm-up
    call of each; the two lists are paired by position."""
    first(), second()
    first_times, second_times = [], []
    for _ in range(repeats):
        first_times.append(time_once(first, device))
        second_times.append(time_once(second, device))
    return first_times, second_times
