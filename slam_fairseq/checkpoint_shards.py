"""Resume after a kill when every rank saves its own shard (``--ddp-backend fully_sharded
--use-sharded-state``).

fairseq then names each rank's files with ``-shard<rank>`` after ``--checkpoint-suffix``
(``checkpoint_last-shard0.pt``, ``checkpoint_3_2000-shard1.pt``, ...), and every rank writes and
copies its own file. A kill during a save can leave the ranks' ``checkpoint_last`` shards
unreadable, missing, or readable but from different updates (rank 0 finished its copy, rank 1 did
not); fairseq would load them as one model, or fail on one rank while the others wait.

:func:`recover_sharded_checkpoint_dir` runs on global rank 0 before fairseq loads (the save dir is
shared by the ranks, as fairseq's sharded saves need). The ``checkpoint_last`` shards are used as
they are only when every rank's shard is there, readable, and from one update. Otherwise each of
them is kept aside (``.corrupt`` when unreadable, ``.mismatched`` when readable) and the newest
complete set of another save (``checkpoint_E_U-shard*``, ``checkpoint<E>-shard*``, ... with every
rank's shard readable and from one update) is copied into place atomically. Without one, an error
names the shards and touches nothing (a run starting from scratch would overwrite the save dir):
each rank's write is atomic but the ranks' are not together, so a kill leaves that state when no
other complete save is kept (``checkpoint_last`` alone, or ``--keep-interval-updates 1``); keep
two or more. Shards of another number of ranks (more than this run has, or a readable set of
fewer) are an error too: fairseq cannot resume a sharded state at another world size. An explicit
``--restore-file`` is never substituted.
"""
from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from slam_fairseq.checkpoint_recovery import (CORRUPT_SUFFIX, DEFAULT_RESTORE_FILE, CheckpointRecoveryError,
                                              _being_written, _candidate_pattern, atomic_copy,
                                              checkpoint_problem, fairseq_restore_path, repair_best_checkpoint)
from slam_fairseq.rank_agreement import rank_and_world_size

logger = logging.getLogger(__name__)

__all__ = ["MISMATCHED_SUFFIX", "ShardedRecoveryResult", "rank_checkpoint_suffix", "saved_update",
           "saves_shards", "sharded_state_world_size", "recover_sharded_checkpoint_dir", "check_shard_set", "ShardSetCheck"]

#: kept aside: a readable ``checkpoint_last`` shard of another update than its sibling shards
MISMATCHED_SUFFIX = ".mismatched"


def saves_shards(ddp_backend: Optional[str], use_sharded_state: Optional[bool]) -> bool:
    """Whether every rank saves its own shard: ``--ddp-backend fully_sharded --use-sharded-state``."""
    return str(ddp_backend) == "fully_sharded" and bool(use_sharded_state)


def sharded_state_world_size(ddp_backend: Optional[str], use_sharded_state: Optional[bool]) -> int:
    """The number of shards each save writes: the data-parallel world size when every rank saves
    its own (:func:`saves_shards`), else 0 (one file per save)."""
    if not saves_shards(ddp_backend, use_sharded_state):
        return 0
    return rank_and_world_size()[1]


def rank_checkpoint_suffix(suffix: str, ddp_backend: Optional[str], use_sharded_state: Optional[bool],
                           rank: Optional[int] = None) -> str:
    """The suffix this rank's fairseq trainer puts in its checkpoint names
    (``Trainer.checkpoint_suffix``): ``--checkpoint-suffix``, then ``-shard<rank>`` under sharded
    state. ``rank`` defaults to this process's global rank."""
    suffix = suffix or ""
    if not saves_shards(ddp_backend, use_sharded_state):
        return suffix
    if rank is None:
        rank = rank_and_world_size()[0]
    return f"{suffix}-shard{rank}"


def saved_update(path: str) -> Optional[int]:
    """The update count a readable fairseq checkpoint was saved at (its optimizer history), None
    when it holds none. Reads the pickle only: the tensors are memory-mapped, not read."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # PyTorch's legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    history = state.get("optimizer_history") if isinstance(state, dict) else None
    if not history:
        return None
    updates = history[-1].get("num_updates")
    return None if updates is None else int(updates)


@dataclass
class ShardedRecoveryResult:
    """What :func:`recover_sharded_checkpoint_dir` did.

    action: ``none`` (no shards, or a complete set) or ``replaced`` (another save's complete set
        now stands in place).
    restore_paths: the shards fairseq will restore, by rank.
    set_aside: where the shards that could not be used were kept.
    source_paths: the shards copied into place (``replaced``).
    problems: why the shards could not be used, by path.
    """

    action: str
    restore_paths: List[str]
    set_aside: List[str] = field(default_factory=list)
    source_paths: List[str] = field(default_factory=list)
    problems: Dict[str, str] = field(default_factory=dict)


def _shard_paths(save_dir: str, restore_file: str, suffix: str, world_size: int) -> List[str]:
    """The file each rank's fairseq restores, by rank."""
    return [fairseq_restore_path(save_dir, restore_file, f"{suffix}-shard{rank}") for rank in range(world_size)]


_SHARD_NAME = re.compile(r"(.+)-shard(\d+)\.pt")


def _shards_by_save(directory: str, keep: Callable[[str], bool]) -> Dict[str, Dict[int, Path]]:
    """The shard files of ``directory`` by save (the name without ``-shard<rank>.pt``) and rank,
    for the saves whose name ``keep`` accepts."""
    by_save: Dict[str, Dict[int, Path]] = defaultdict(dict)
    for entry in Path(directory).iterdir():
        matched = _SHARD_NAME.fullmatch(entry.name)
        if matched and keep(matched.group(1)) and entry.is_file():
            by_save[matched.group(1)][int(matched.group(2))] = entry
    return by_save


def _saves_with(suffix: str, last: bool = False) -> Callable[[str], bool]:
    """Accepts the saves fairseq writes with ``suffix`` (epoch, update, best; with ``last``,
    ``checkpoint_last`` too), not another suffix's."""
    plain = _candidate_pattern(suffix)
    return lambda stem: bool(plain.fullmatch(stem + ".pt")) or (last and stem == f"checkpoint_last{suffix}")


@dataclass
class ShardSetCheck:
    """One save's shards, checked: ``problems`` says why each unusable shard cannot be used (missing,
    unreadable, or from another update than its siblings), ``unreadable`` holds those that are
    damaged, ``update`` is the set's update when it is complete."""

    problems: Dict[str, str]
    unreadable: List[str]
    update: Optional[int]


def check_shard_set(paths: List[str]) -> ShardSetCheck:
    """Whether ``paths`` (one shard per rank) form one readable save."""
    problems: Dict[str, str] = {}
    unreadable: List[str] = []
    updates: Dict[str, Optional[int]] = {}
    for path in paths:
        if not os.path.isfile(path):
            problems[path] = "is missing"
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                updates[path] = saved_update(path)
            except Exception as error:  # a zip whose pickle does not load
                problem = f"does not load ({type(error).__name__}: {str(error).strip()[:200]})"
        if problem is not None:
            problems[path] = problem
            unreadable.append(path)
    distinct = set(updates.values())
    if not problems and len(distinct) > 1:
        for path, update in updates.items():
            problems[path] = f"holds update {update} (its sibling shards: {sorted(map(str, distinct))})"
    update = next(iter(distinct)) if not problems and distinct else None
    return ShardSetCheck(problems, unreadable, update)


def _complete_sets(save_dir: str, suffix: str, world_size: int) -> List[Tuple[int, List[str]]]:
    """The other saves of ``save_dir`` whose every shard is readable and from one update, as
    (update, shard paths by rank), newest first; the search stops at the first complete one."""
    saves = _shards_by_save(save_dir, _saves_with(suffix))
    newest_first = sorted(saves.items(), key=lambda item: max(p.stat().st_mtime_ns for p in item[1].values()),
                          reverse=True)
    for stem, shards in newest_first:
        if set(shards) != set(range(world_size)):
            continue
        paths = [str(shards[rank]) for rank in range(world_size)]
        check = check_shard_set(paths)
        if not check.problems:
            return [(check.update, paths)]
        logger.warning(f"{stem}-shard*.pt not used for recovery: "
                       + "; ".join(f"{os.path.basename(p)} {why}" for p, why in check.problems.items()))
    return []


def _set_aside(path: str, unreadable: bool) -> str:
    aside = path + (CORRUPT_SUFFIX if unreadable else MISMATCHED_SUFFIX)
    os.replace(path, aside)
    return aside


def _written_by_fewer_ranks(paths: List[str], save_dir: str, suffix: str) -> Optional[int]:
    """k when exactly the shards of ranks 0..k-1 (k < the world size) are there, form one readable
    save, and no save of ``save_dir`` has a shard of a rank >= k: a state another number of ranks
    wrote, not one whose other shards a kill kept from being written."""
    present = [os.path.isfile(path) for path in paths]
    written = sum(present)
    if not 0 < written < len(paths) or not all(present[:written]):
        return None
    ranks = [rank for shards in _shards_by_save(save_dir, _saves_with(suffix, last=True)).values() for rank in shards]
    if max(ranks, default=-1) >= written or check_shard_set(paths[:written]).problems:
        return None
    return written


def _check_best_shards(save_dir: str, suffix: str, world_size: int) -> List[str]:
    """Repair each rank's ``checkpoint_best`` shard (:func:`repair_best_checkpoint`), then set the
    set aside (``.mismatched``) when its shards hold different updates (a rank killed before it wrote
    its shard of a new best): ``fairseq-generate --path checkpoint_best.pt`` would read a model of two
    updates. fairseq writes them again at the next best validation. Returns the paths set aside."""
    for rank in range(world_size):
        repair_best_checkpoint(save_dir, f"{suffix}-shard{rank}")
    best = _shard_paths(save_dir, os.path.join(save_dir, "checkpoint_best.pt"), suffix, world_size)
    present = [path for path in best if os.path.isfile(path)]
    if not present:
        return []
    check = check_shard_set(best)
    mismatched = [why for why in check.problems.values() if why.startswith("holds update")]
    if not mismatched or check.unreadable:
        return []
    aside = [_set_aside(path, unreadable=False) for path in present]
    logger.warning(f"the checkpoint_best shards hold different updates ({'; '.join(mismatched)}): moved them to "
                   f"{aside}; the next best validation writes them again")
    return aside


def recover_sharded_checkpoint_dir(save_dir: str, restore_file: str, suffix: str,
                                   world_size: int) -> ShardedRecoveryResult:
    """Make the shards fairseq's ranks are about to restore one readable save (module docstring),
    and check each rank's ``checkpoint_best`` shard (:func:`_check_best_shards`).

    Args:
        save_dir: ``--save-dir``.
        restore_file: ``--restore-file``; the default ``checkpoint_last.pt`` means the run's own
            ``checkpoint_last<suffix>-shard<rank>.pt``; any other name is checked, not substituted.
        suffix: ``--checkpoint-suffix``.
        world_size: the number of ranks (one shard each).
    Raises:
        CheckpointRecoveryError: an explicit ``--restore-file``'s shards are unusable; the run's
            shards were written by another number of ranks; or they are unusable and no other save
            is complete, so that nothing is overwritten by a run starting from scratch.
    """
    explicit = restore_file != DEFAULT_RESTORE_FILE
    paths = _shard_paths(save_dir, restore_file, suffix, world_size)
    directory = os.path.dirname(os.path.abspath(paths[0]))
    if os.path.isdir(directory):
        stem = _SHARD_NAME.fullmatch(os.path.basename(paths[0])).group(1)
        found = _shards_by_save(directory, lambda name: name == stem).get(stem, {})
        extra = [str(path) for rank, path in sorted(found.items()) if rank >= world_size]
        if extra and any(os.path.isfile(path) for path in paths):
            raise CheckpointRecoveryError(
                f"{', '.join(extra)}: shards beyond this run's {world_size} ranks; a sharded state "
                f"(--use-sharded-state) resumes only with the number of ranks that wrote it")
    present = [path for path in paths if os.path.isfile(path)]
    if not present:
        return ShardedRecoveryResult("none", paths)
    fewer = None if explicit else _written_by_fewer_ranks(paths, save_dir, suffix)
    if fewer is not None:
        raise CheckpointRecoveryError(
            f"{', '.join(paths[:fewer])}: a sharded state (--use-sharded-state) of {fewer} ranks; this run has "
            f"{world_size}, and a sharded state resumes only with the number of ranks that wrote it")
    check = check_shard_set(paths)
    problems = check.problems
    if not problems:
        if not explicit:
            _check_best_shards(save_dir, suffix, world_size)
        return ShardedRecoveryResult("none", paths)
    described = "; ".join(f"{path} {why}" for path, why in problems.items())
    if explicit:
        raise CheckpointRecoveryError(f"--restore-file {restore_file} (sharded state): {described}")
    if any(_being_written(path) for path in check.unreadable):
        logger.warning(f"{described}; a shard is being written (a run still saving into {save_dir}?): left alone")
        return ShardedRecoveryResult("none", paths, problems=problems)
    complete = _complete_sets(save_dir, suffix, world_size)
    if not complete:
        raise CheckpointRecoveryError(
            f"{described}; no other save in {save_dir} has all {world_size} shards readable and from one update. "
            "Each rank writes its own shard, so a kill during a save leaves shards of two updates when no other "
            "complete save is kept: keep at least two (--save-interval-updates with --keep-interval-updates 2 or "
            "more, or epoch checkpoints). To train from scratch, move these files away")
    aside = [_set_aside(path, unreadable=path in check.unreadable) for path in present]
    update, sources = complete[0]
    for source, path in zip(sources, paths):
        atomic_copy(source, path)
    logger.warning(f"{described} (a kill during a save?); moved the shards to {aside} and resuming every rank "
                   f"from {[os.path.basename(s) for s in sources]} (update {update}), the newest complete set")
    _check_best_shards(save_dir, suffix, world_size)
    return ShardedRecoveryResult("replaced", paths, set_aside=aside, source_paths=sources, problems=problems)
