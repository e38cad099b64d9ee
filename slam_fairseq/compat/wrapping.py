"""Replacing an attribute of a fairseq module or class once per process, whoever imports first."""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["wrap_once"]


def wrap_once(owner: Any, name: str, replacement_for: Callable[[Any], Any]) -> bool:
    """Set ``owner.name`` to ``replacement_for(owner.name)`` unless this was done already (a mark
    in ``owner``'s own namespace, so a subclass or a second import does not wrap twice).
    Returns True when it replaced, False when it had been replaced already."""
    mark = f"_slam_fairseq_wrapped_{name}"
    if vars(owner).get(mark, False):
        return False
    setattr(owner, name, replacement_for(getattr(owner, name)))
    setattr(owner, mark, True)
    return True
