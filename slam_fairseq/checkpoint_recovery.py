"""Resume after a kill, whenever it came: replace an unreadable ``checkpoint_last.pt`` before
fairseq loads it.

fairseq 0.12 writes the first checkpoint of a save atomically (``.tmp`` + rename) but then *copies*
it onto ``checkpoint_last.pt`` (and ``checkpoint_best.pt``) in place. A kill during that copy
leaves a truncated ``checkpoint_last.pt`` next to an intact ``checkpoint_E_U.pt``, and re-running
the same command fails in ``torch.load`` ("failed finding central directory").

:func:`recover_checkpoint_dir` runs before fairseq loads the checkpoint (the task calls it from
``setup_task``; fairseq builds the task first). If the file fairseq is about to restore exists but
is unreadable, the bytes are kept as ``checkpoint_last.pt.corrupt`` and the newest intact
checkpoint of the save dir is put in its place atomically (copy to a temporary file, then
``os.replace``), with a WARNING naming both files. The file never disappears on the way (the
corrupt bytes are hard-linked aside, then replaced), so another rank that only asks whether it
exists never sees a gap. Without an intact checkpoint an error names the file and nothing is
touched: a kill does not leave that state (fairseq writes the first file of each save atomically,
then copies it), and a run starting from scratch would overwrite the save dir's checkpoints.
The temporaries a kill left (fairseq's ``checkpoint*.pt.tmp`` of a save stopped before its
rename, an earlier recovery's copy), a whole checkpoint each, are removed by the next training
process of the run when its first epoch begins (:func:`remove_interrupted_writes_on_rank_zero`,
from ``slam_pretraining`` and ``slam_speech_to_text``).

An explicit ``--restore-file`` (any name but ``checkpoint_last.pt``) is the user's choice and is
not substituted: an unreadable one is an error naming it and the intact checkpoints beside it.

"Readable" is checked cheaply: PyTorch's zip format must have its central directory (it sits at
the end of the file, so a truncated file has none), a ``data.pkl`` entry whose CRC matches, and
every entry must lie inside the file. A file in PyTorch's legacy (non-zip) format is loaded fully
(``torch.load`` on CPU, weights only).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set, Tuple

from slam_fairseq.compat.fairseq_internals import resolved_option

logger = logging.getLogger(__name__)

__all__ = ["CheckpointRecoveryError", "RecoveryResult", "checkpoint_problem", "fairseq_restore_path",
           "intact_checkpoints", "recover_checkpoint_dir", "recover_checkpoint_dir_on_rank_zero",
           "recover_for_training_args", "repair_best_checkpoint", "atomic_copy", "remove_interrupted_writes",
           "remove_interrupted_writes_on_rank_zero"]

DEFAULT_RESTORE_FILE = "checkpoint_last.pt"
CORRUPT_SUFFIX = ".corrupt"
#: an unreadable checkpoint whose size or time changes within this many seconds is being written
#: (by a run still training in that directory): it is left alone
WRITE_SETTLE_SECONDS = 1.0


def _being_written(path: str) -> bool:
    """Whether another process is writing ``path`` now (its size or modification time moves)."""
    import time

    before = os.stat(path)
    time.sleep(WRITE_SETTLE_SECONDS)
    try:
        after = os.stat(path)
    except FileNotFoundError:
        return True
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)


class CheckpointRecoveryError(RuntimeError):
    """An unreadable checkpoint that cannot be replaced; the message names the file."""


@dataclass
class RecoveryResult:
    """What :func:`recover_checkpoint_dir` did.

    action: ``none`` (nothing to do: no file, or a readable one) or ``replaced`` (an intact
        checkpoint now stands in its place).
    restore_path: the file fairseq will restore.
    corrupt_path: where the unreadable bytes were kept (``replaced``).
    source_path: the intact checkpoint copied into place (``replaced``).
    problem: why the file was unreadable.
    """

    action: str
    restore_path: str
    corrupt_path: Optional[str] = None
    source_path: Optional[str] = None
    problem: Optional[str] = None


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a loadable PyTorch checkpoint, or None when it looks intact.

    Zip format (PyTorch >= 1.6): central directory present, a ``<archive>/data.pkl`` entry whose
    bytes match its CRC, every entry inside the file. Other files: a full ``torch.load`` on CPU.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as error:
        return f"cannot be read ({error})"
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return _legacy_load_problem(path, size)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            pickles = [info for info in entries if info.filename.endswith("/data.pkl") or info.filename == "data.pkl"]
            if not pickles:
                return f"is a zip of {size:,} bytes without the data.pkl entry of a PyTorch checkpoint"
            for info in entries:
                if info.header_offset + info.compress_size > size:
                    return f"entry {info.filename} ends past the end of the file ({size:,} bytes)"
            with archive.open(pickles[0]) as handle:
                while handle.read(1 << 20):  # the CRC is checked when the entry is read to its end
                    pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        return f"is a damaged zip of {size:,} bytes ({error})"
    return None


def _legacy_load_problem(path: str, size: int) -> Optional[str]:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types; all mean "not loadable"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"is not a loadable checkpoint ({size:,} bytes; torch.load: {first_line[:200]})"
    return None


#: ``checkpoint.best_<metric>_<value><suffix>.pt``: fairseq writes the value as ``{:.3f}`` followed
#: by a random digit or two (``--keep-best-checkpoints``), so it has 4 or more decimals right before
#: the suffix; another --checkpoint-suffix's files (``_2``, ``_run_1``) then never match
_BEST_NAME = r"\.best_.+_-?\d+\.\d{4,}"
#: the names of fairseq's saves but ``checkpoint_last``, between ``checkpoint`` and the suffix:
#: epoch, epoch and update, best, best of a metric
_SAVE_NAMES = rf"\d+|_\d+_\d+|_best|{_BEST_NAME}"


def _candidate_pattern(suffix: str) -> re.Pattern:
    """The checkpoints fairseq's ``save_checkpoint`` writes (epoch, update, best), with ``suffix``."""
    return re.compile(rf"checkpoint(?:{_SAVE_NAMES})" + re.escape(suffix) + r"\.pt")


def intact_checkpoints(save_dir: str, suffix: str = "", exclude: Optional[str] = None,
                       limit: Optional[int] = None) -> List[str]:
    """Paths of readable fairseq checkpoints in ``save_dir`` (not ``checkpoint_last``), newest first;
    with ``limit``, the search stops once that many are found (each check reads a ``data.pkl``).

    Newest by modification time: fairseq writes every file of one save at the same moment (the
    first by a write, the others by copies), so the newest file holds the latest state.
    """
    directory = Path(save_dir)
    if not directory.is_dir():
        return []
    pattern = _candidate_pattern(suffix)
    found = []
    for entry in directory.iterdir():
        if not entry.is_file() or not pattern.fullmatch(entry.name):
            continue
        if exclude is not None and os.path.abspath(entry) == os.path.abspath(exclude):
            continue
        found.append((entry.stat().st_mtime_ns, entry.name, str(entry)))
    intact = []
    for _, _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            intact.append(path)
            if limit is not None and len(intact) >= limit:
                break
        else:
            logger.warning(f"{path} {problem}: not used for recovery")
    return intact


TEMPORARY_PREFIX = ".tmp-"


def remove_stale_temporaries(destination: str) -> List[str]:
    """Remove what :func:`atomic_copy` onto ``destination`` left when a kill stopped it (a whole
    checkpoint's bytes each). Call before copying, from the one process that recovers."""
    directory = os.path.dirname(os.path.abspath(destination))
    prefix = TEMPORARY_PREFIX + os.path.basename(destination)
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(prefix):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def _unfinished_write_pattern(suffix: str) -> re.Pattern:
    """Names of the whole-checkpoint temporaries of a run of ``--checkpoint-suffix suffix`` (of
    any rank's shard): fairseq's ``NAME.pt.tmp`` (``torch_persistent_save`` writes the first file
    of a save there, then renames it) and :func:`atomic_copy`'s ``.tmp-NAME.pt<random>``."""
    name = rf"checkpoint(?:{_SAVE_NAMES}|_last)" + re.escape(suffix) + r"(?:-shard\d+)?\.pt"
    return re.compile(rf"{name}\.tmp|{re.escape(TEMPORARY_PREFIX)}{name}[A-Za-z0-9_]+")


#: when this process imported the plugin (fairseq-train does so before it builds anything):
#: files an earlier process of the run left were last written before it
PROCESS_STARTED = time.time()


def remove_interrupted_writes(save_dir: str, suffix: str, written_before: float = PROCESS_STARTED) -> List[str]:
    """Remove the whole-checkpoint temporaries an earlier, killed process of this run left in
    ``save_dir`` (fairseq never looks at its ``.pt.tmp`` files again): those of this
    ``--checkpoint-suffix`` last written before ``written_before`` (the time this process
    started). Call once, from one rank of a training run, before it saves anything. Returns the
    names removed."""
    if not os.path.isdir(save_dir):
        return []
    pattern = _unfinished_write_pattern(suffix)
    removed, freed = [], 0
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if not pattern.fullmatch(name) or not os.path.isfile(path):
            continue
        status = os.stat(path)
        if status.st_mtime >= written_before:  # another process is writing it
            continue
        freed += status.st_size
        os.unlink(path)
        removed.append(name)
    if removed:
        plural = "s" if len(removed) > 1 else ""
        logger.warning(f"{save_dir}: removed {len(removed)} unfinished checkpoint write{plural} "
                       f"a kill left ({freed / 2 ** 20:.0f} MiB): {', '.join(removed[:5])}")
    return removed


#: (save dir, suffix) already swept by this process
_SWEPT: Set[Tuple[str, str]] = set()


def remove_interrupted_writes_on_rank_zero(save_dir, suffix) -> List[str]:
    """:func:`remove_interrupted_writes` on global rank 0 (fairseq's saving rank) of a training
    run, once per save dir and process: for the tasks' ``begin_epoch``, which fairseq calls only
    in training, the first time before the process saves anything (a later sweep could meet this
    run's own save in progress under a skewed clock). Nothing when the save dir is not known."""
    from slam_fairseq.rank_agreement import rank_and_world_size

    save_dir, suffix = resolved_option(save_dir), str(resolved_option(suffix) or "")
    if save_dir is None or rank_and_world_size()[0] != 0 or (str(save_dir), suffix) in _SWEPT:
        return []
    _SWEPT.add((str(save_dir), suffix))
    return remove_interrupted_writes(str(save_dir), suffix)


def atomic_copy(source: str, destination: str) -> None:
    """Copy ``source`` onto ``destination`` so that a kill leaves the old file or the new one."""
    remove_stale_temporaries(destination)
    directory = os.path.dirname(os.path.abspath(destination))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX + os.path.basename(destination))
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        with open(temporary, "rb+") as out:
            os.fsync(out.fileno())
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _keep_corrupt_bytes(path: str) -> str:
    """Hard-link (else copy) ``path`` to ``path.corrupt``, leaving ``path`` where it is."""
    corrupt = path + CORRUPT_SUFFIX
    if os.path.lexists(corrupt):
        os.unlink(corrupt)
    try:
        os.link(path, corrupt)
    except OSError:  # no hard links on this filesystem
        shutil.copyfile(path, corrupt)
    return corrupt


def recover_checkpoint_dir(save_dir: str, restore_file: str = DEFAULT_RESTORE_FILE,
                           suffix: str = "") -> RecoveryResult:
    """Make the checkpoint fairseq is about to restore readable (see the module docstring), and,
    when it resumes the run's own ``checkpoint_last.pt``, ``checkpoint_best.pt`` too
    (:func:`repair_best_checkpoint`).

    Args:
        save_dir: ``--save-dir``.
        restore_file: ``--restore-file``; the default ``checkpoint_last.pt`` means
            ``<save_dir>/checkpoint_last<suffix>.pt``, any other value is used as fairseq uses it.
        suffix: ``--checkpoint-suffix``.
    Raises:
        CheckpointRecoveryError: an explicit ``--restore-file`` is unreadable, or the run's own
            checkpoint is unreadable and no other checkpoint of the save dir is intact.
    """
    result = _recover_restore_file(save_dir, restore_file, suffix)
    if restore_file == DEFAULT_RESTORE_FILE:
        repair_best_checkpoint(save_dir, suffix)
    return result


def repair_best_checkpoint(save_dir: str, suffix: str = "") -> Optional[str]:
    """fairseq copies a save onto ``checkpoint_best.pt`` in place too: a kill during that copy left
    it truncated while ``checkpoint_last.pt`` stayed intact, and it stayed so until a better score
    was saved (``fairseq-generate --path checkpoint_best.pt`` failed meanwhile). An unreadable one is
    kept as ``.corrupt`` and replaced by the newest intact checkpoint, the file of the save it was
    being copied from (epoch or update checkpoints; a save writing ``checkpoint_best.pt`` first
    writes it atomically). Returns the replacement's path, or None when nothing was done."""
    best = os.path.join(save_dir, f"checkpoint_best{suffix}.pt")
    if not os.path.isfile(best):
        return None
    problem = checkpoint_problem(best)
    if problem is None:
        return None
    if _being_written(best):
        logger.warning(f"{best} {problem}, but it is being written (a run still saving into {save_dir}?): left alone")
        return None
    corrupt = _keep_corrupt_bytes(best)
    candidates = intact_checkpoints(save_dir, suffix, exclude=best, limit=1)
    if not candidates:
        os.unlink(best)
        logger.warning(f"{best} {problem}; moved it to {corrupt}. No intact checkpoint of a save in {save_dir} to "
                       "put in its place: the next best validation writes it again")
        return None
    atomic_copy(candidates[0], best)
    logger.warning(f"{best} {problem} (a kill during fairseq's copy?); moved it to {corrupt} and put "
                   f"{candidates[0]}, the newest intact checkpoint (the save it was copied from), in its place")
    return candidates[0]


def fairseq_restore_path(save_dir: str, restore_file: str, suffix: str = "") -> str:
    """The file fairseq's ``load_checkpoint`` restores: ``<save_dir>/checkpoint_last<suffix>.pt``
    for the default ``--restore-file``, else ``--restore-file`` with the suffix put before
    ``.pt`` as fairseq puts it. ``suffix`` is the trainer's (``--checkpoint-suffix``, then
    ``-shard<rank>`` under ``--use-sharded-state``)."""
    if restore_file == DEFAULT_RESTORE_FILE:
        return os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    return restore_file.replace(".pt", suffix + ".pt") if suffix else restore_file


def _recover_restore_file(save_dir: str, restore_file: str, suffix: str) -> RecoveryResult:
    restore_path = fairseq_restore_path(save_dir, restore_file, suffix)
    if not os.path.isfile(restore_path):
        return RecoveryResult("none", restore_path)
    problem = checkpoint_problem(restore_path)
    if problem is None:
        return RecoveryResult("none", restore_path)
    explicit = restore_file != DEFAULT_RESTORE_FILE
    if not explicit and _being_written(restore_path):
        # a model loaded in a script while a run is saving into the save dir it names
        logger.warning(f"{restore_path} {problem}, but it is being written (a run still saving into {save_dir}?): "
                       "left alone")
        return RecoveryResult("none", restore_path, problem=problem)
    candidates = intact_checkpoints(save_dir, suffix, exclude=restore_path, limit=None if explicit else 1)
    if explicit:
        raise CheckpointRecoveryError(
            f"--restore-file {restore_path} {problem}; intact checkpoints in {save_dir}: "
            f"{[os.path.basename(path) for path in candidates] or 'none'}")
    if not candidates:
        raise CheckpointRecoveryError(
            f"{restore_path} {problem}, and no other checkpoint in {save_dir} is intact. A kill during a save "
            "does not leave this (fairseq writes the first file of each save atomically): check the storage. "
            f"To train from scratch, move {restore_path} away")
    corrupt = _keep_corrupt_bytes(restore_path)
    source = candidates[0]
    atomic_copy(source, restore_path)
    logger.warning(f"{restore_path} {problem} (a kill during fairseq's copy?); moved it to {corrupt} and "
                   f"resuming from {source}, the newest intact checkpoint")
    return RecoveryResult("replaced", restore_path, corrupt_path=corrupt, source_path=source, problem=problem)


def recover_checkpoint_dir_on_rank_zero(save_dir: str, restore_file: str = DEFAULT_RESTORE_FILE,
                                        suffix: str = "", shards: int = 0):
    """:func:`recover_checkpoint_dir` on global rank 0 only, the other ranks waiting for its outcome
    (fairseq's rank 0 loads the checkpoint, the others only ask whether it exists). With
    ``shards`` (the world size of a ``--use-sharded-state`` run, where every rank loads its own
    shard), :func:`slam_fairseq.checkpoint_shards.recover_sharded_checkpoint_dir` instead. When
    rank 0 fails, every rank raises (the others with rank 0's message), so that none goes on into
    fairseq's load to wait for rank 0 there.

    Returns the result on rank 0, None on the other ranks.
    """
    from slam_fairseq.checkpoint_shards import recover_sharded_checkpoint_dir
    from slam_fairseq.rank_agreement import gathered_from_every_rank, rank_and_world_size

    if any(resolved_option(value) is None for value in (save_dir, restore_file)):
        return None  # a task config built outside fairseq's (no checkpoint settings to follow)
    result = None
    failure: Optional[BaseException] = None
    if rank_and_world_size()[0] == 0:
        try:
            if shards:
                result = recover_sharded_checkpoint_dir(save_dir, restore_file, suffix, shards)
            else:
                result = recover_checkpoint_dir(save_dir, restore_file, suffix)
        except BaseException as error:  # raised on every rank once all know of it
            failure = error
    outcome = gathered_from_every_rank(None if failure is None else f"{type(failure).__name__}: {failure}")[0]
    if failure is not None:
        raise failure
    if outcome is not None:
        raise CheckpointRecoveryError(f"rank 0 could not prepare the checkpoint to resume: {outcome}")
    return result


def recover_for_training_args(args) -> Optional[RecoveryResult]:
    """:func:`recover_checkpoint_dir_on_rank_zero` from a fairseq command line (``task.args`` of
    fairseq's legacy tasks such as ``speech_to_text``), for ``fairseq-train`` only: nothing is done
    when the arguments name ``--path`` (fairseq-generate, fairseq-validate) or no save dir."""
    if args is None or getattr(args, "path", None):
        return None
    save_dir, restore_file = getattr(args, "save_dir", None), getattr(args, "restore_file", None)
    if not save_dir or not restore_file:
        return None
    from slam_fairseq.checkpoint_shards import sharded_state_world_size

    shards = sharded_state_world_size(getattr(args, "ddp_backend", None), getattr(args, "use_sharded_state", False))
    return recover_checkpoint_dir_on_rank_zero(save_dir, restore_file, getattr(args, "checkpoint_suffix", "") or "",
                                               shards)
