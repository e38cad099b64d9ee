"""Values every data-parallel rank computed on its own, gathered so that all take one decision.

A rank that decides alone (which rows to drop because a file could not be opened) can end with
other batches and another number of steps than the others, and the ranks then wait forever in a
collective that one of them never reaches. Gathering the inputs of such a decision, and deciding on
the gathered values, gives every rank the same result.
"""
from __future__ import annotations

from typing import Any, List, Tuple

__all__ = ["gathered_from_every_rank", "rank_and_world_size"]


def rank_and_world_size() -> Tuple[int, int]:
    """(this rank, number of ranks) of ``torch.distributed``, or (0, 1) when it is not running."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gathered_from_every_rank(value: Any) -> List[Any]:
    """``[value of rank 0, ..., value of rank W-1]`` when ``torch.distributed`` runs several ranks,
    else ``[value]``. Every rank must call it at the same point (a collective); ``value`` is
    pickled, so keep it small."""
    import torch.distributed as dist

    _, world_size = rank_and_world_size()
    if world_size < 2:
        return [value]
    gathered: List[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered
