"""Give freed host memory back to the operating system between updates (glibc only).

On CPU, every update allocates and frees activations whose sizes change with the batch's lengths.
glibc's malloc keeps freed chunks in its heaps, and after large blocks are freed it raises its
mmap threshold (up to 32 MiB), so later large activations also come from the heaps: the resident
set grows with every new mix of sizes and never shrinks (a 7 MB model's stage-2 run reached 2.7
GB, of which about 2 GB was free heap memory). ``malloc_trim(0)`` returns the free pages of every
heap at once; called once per update it costs about a millisecond.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

_LIBC: Optional[ctypes.CDLL] = None
_LOOKED_UP = False


def _libc() -> Optional[ctypes.CDLL]:
    global _LIBC, _LOOKED_UP
    if not _LOOKED_UP:
        _LOOKED_UP = True
        name = ctypes.util.find_library("c")
        try:
            library = ctypes.CDLL(name) if name else None
        except OSError:
            library = None
        _LIBC = library if library is not None and hasattr(library, "malloc_trim") else None
    return _LIBC


def release_free_heap_memory() -> bool:
    """``malloc_trim(0)``: free heap pages back to the OS. False where libc has no malloc_trim."""
    library = _libc()
    if library is None:
        return False
    library.malloc_trim(0)
    return True
