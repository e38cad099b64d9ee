"""Host-device syncs of one pre-training update: counted at the ATen dispatcher (any device), or
reported by CUDA's sync debug mode (on a GPU).

A sync makes the host wait until every queued kernel has run, so the launch queue empties and the
GPU idles while the host queues the next kernels. ``tests/test_pretraining_speed.py`` holds the
dispatcher count of a ``train_step`` on the paths an accelerator takes; ``gpu_check.py`` asks CUDA.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "cuda_sync_warnings"]

_ALWAYS_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2",
                "unique_dim", "_ctc_loss", "equal", "is_nonzero"}


class SyncCounter(TorchDispatchMode):
    """Counts the ATen calls that make the host wait for the device on CUDA: reading a scalar
    (``item``, ``bool``, ``int``), ops whose output size depends on values (nonzero, boolean
    indexing, masked_select, unique, repeat_interleave without ``output_size``), CTC's lengths,
    and tensors made from host data (``host_data``: copied from pageable host memory, which on
    CUDA waits for the stream). ``Tensor.tolist`` is counted where it is called (it does not
    dispatch on CPU). A host tensor moved with ``.to(device)`` is not seen on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _ALWAYS_SYNC:
            self.counts[name] += 1
        elif name == "lift_fresh":  # a tensor made from host data: copied to the device on an accelerator
            self.counts["host_data"] += 1
        elif name in ("index", "index_put", "index_put_") and any(
                torch.is_tensor(index) and index.dtype == torch.bool for index in (args[1] or ()) if index is not None):
            self.counts[f"{name}[bool]"] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and torch.is_tensor(args[0]):
            self.counts[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        original = torch.Tensor.tolist
        counts = self.counts

        def counted_tolist(tensor):
            counts["tolist"] += 1
            return original(tensor)

        self._tolist = original
        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def cuda_sync_warnings(step: Callable[[], None]) -> List[str]:
    """Where each warning ``torch.cuda.set_sync_debug_mode("warn")`` raises during ``step()`` comes
    from (``file:line`` of the Python call; one per synchronizing CUDA call: reads, ``nonzero``,
    copies from pageable memory). The message itself is the same for every sync."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return [f"{warning.filename}:{warning.lineno}" for warning in caught if "synchroniz" in str(warning.message)]
