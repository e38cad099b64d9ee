"""Writes that a crash or a kill leaves either the old file or the new one, never half of one.

Everything is written under a temporary name in the target's directory (same file system), flushed
to disk, given the usual permissions and renamed onto the target with ``os.replace``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; it is renamed onto ``path`` when the block succeeds
    and deleted when it raises (binary outputs: zips, npz, SentencePiece models, checkpoints)."""
    target = str(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(target))
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_output_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8", newline="") as out:
            out.write(text)
