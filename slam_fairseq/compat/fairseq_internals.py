"""The private parts of fairseq 0.12 and OmegaConf 2 that the plugin relies on, each behind a function.

- :func:`drop_config_fields`: removes an inherited field from a fairseq dataclass config (its
  ``__dataclass_fields__``), so that a model option does not clash with a task option of the same name.
- :func:`record_in_saved_config`: writes a value into the model config fairseq saves with each
  checkpoint, reaching the trainer's node through OmegaConf's ``_get_parent``.
- :func:`weights_restored_by_fairseq`: fairseq's rules for when a freshly built model is about to
  receive checkpoint weights (``fairseq.checkpoint_utils.load_checkpoint``), restated.
- :func:`whole_model_restore`: the checkpoint a user named that fairseq-train is about to load as a
  whole model (``--finetune-from-model``, ``--restore-file``, ``--continue-once``).
- :func:`reset_cached_batches`: drops an ``EpochBatchIterator``'s cached batch list (``_frozen_batches``).
- :func:`is_fully_sharded`: whether a model is wrapped by fairseq's FSDP wrapper.
- :func:`resolved_option`: an option value that fairseq filled in, or None for an interpolation
  (``${...}``) left unresolved in a config built outside fairseq-train.
- :func:`forget_best_validation_scores`: clears what fairseq-train remembers of past validation
  scores: ``checkpoint_utils.save_checkpoint.best`` (``checkpoint_best.pt``), the ``--patience``
  count (attributes of ``fairseq_cli.train.should_stop_early``) and each ``reduce_lr_on_plateau``
  scheduler's best (tracked from their construction by :func:`track_plateau_schedulers`, applied
  on import).
"""
from __future__ import annotations

import logging
import os
import sys
import weakref
from argparse import Namespace
from typing import Optional, Tuple

from omegaconf import OmegaConf, open_dict

logger = logging.getLogger(__name__)


def drop_config_fields(config_class, names) -> None:
    """Remove fields from ``config_class`` (not from its parents): its command-line options and
    config keys disappear, the constructor keeps its default."""
    for name in names:
        config_class.__dataclass_fields__.pop(name, None)


def record_in_saved_config(cfg, name: str, value) -> None:
    """Set a field in the model config fairseq will save with the checkpoints.

    fairseq's ``models.build_model`` passes the trainer's own config node when ``--arch`` is a
    preset, but a merged copy (whose parent is the trainer's root config) for ``--arch slam_s2t``;
    both get the value.
    """
    if isinstance(cfg, Namespace):
        setattr(cfg, name, value)
        return
    if not OmegaConf.is_config(cfg):
        return
    with open_dict(cfg):
        cfg[name] = value
    root = cfg._get_parent()
    if root is not None and OmegaConf.is_config(root) and "model" in root:
        original = root.model
        if OmegaConf.is_config(original) and original is not cfg and name in original:
            with open_dict(original):
                original[name] = value


def weights_restored_by_fairseq(task) -> Optional[str]:
    """Why the model being built will receive a fine-tuning checkpoint's weights, or None.

    fairseq builds the model before it restores a checkpoint: ``fairseq-train`` resuming
    (``checkpoint_last.pt`` in ``--save-dir``, ``--restore-file``, ``--continue-once``,
    ``--finetune-from-model``), and ``fairseq-generate`` / ``fairseq-validate`` loading ``--path``.
    The decision mirrors ``fairseq.checkpoint_utils.load_checkpoint``; it reads the command line of
    the running tool from ``task.args`` (fairseq's legacy tasks, such as ``speech_to_text``, keep
    the whole command line there).
    """
    source = _restored_weights_source(task)
    if source is None:
        return None
    option, path = source
    return {"--path": f"the weights come from --path {path}",
            "resume": f"fairseq-train resumes from {path}",
            "--continue-once": f"fairseq-train continues from --continue-once {path}",
            "--finetune-from-model": f"fairseq-train starts from --finetune-from-model {path}",
            "--restore-file": f"fairseq-train restores --restore-file {path}"}[option]


def whole_model_restore(task) -> Optional[Tuple[str, str]]:
    """(option, path) when fairseq-train is about to load a whole model from a checkpoint the user
    named (``--finetune-from-model``, ``--restore-file``, ``--continue-once``; not the run's own
    ``checkpoint_last.pt``), else None."""
    source = _restored_weights_source(task)
    named = ("--finetune-from-model", "--restore-file", "--continue-once")
    return source if source is not None and source[0] in named else None


def _restored_weights_source(task) -> Optional[Tuple[str, str]]:
    """(option, path) of the checkpoint fairseq is about to restore (see
    :func:`weights_restored_by_fairseq`); the option is ``resume`` for ``checkpoint_last.pt``."""
    from fairseq.file_io import PathManager

    args = getattr(task, "args", None)
    if args is None:
        return None
    path = getattr(args, "path", None)
    if path:
        return "--path", path
    save_dir = getattr(args, "save_dir", None)
    restore_file = getattr(args, "restore_file", None)
    if save_dir is None or restore_file is None:
        return None
    from slam_fairseq.checkpoint_recovery import DEFAULT_RESTORE_FILE, fairseq_restore_path
    from slam_fairseq.checkpoint_shards import rank_checkpoint_suffix

    suffix = rank_checkpoint_suffix(getattr(args, "checkpoint_suffix", "") or "", getattr(args, "ddp_backend", None),
                                    getattr(args, "use_sharded_state", False))
    if restore_file == DEFAULT_RESTORE_FILE:
        last = fairseq_restore_path(save_dir, restore_file, suffix)
        if PathManager.exists(last):
            return "resume", last
        continue_once = getattr(args, "continue_once", None)
        if continue_once and PathManager.isfile(continue_once):
            return "--continue-once", continue_once
        if continue_once:  # fairseq goes on without it, saying only "No existing checkpoint found"
            logger.warning(f"--continue-once {continue_once}: no such file; this run does not continue from it")
        finetune_from = getattr(args, "finetune_from_model", None)
        if finetune_from and PathManager.isfile(finetune_from):
            return "--finetune-from-model", finetune_from
        return None
    restore = fairseq_restore_path(save_dir, restore_file, suffix)
    if PathManager.exists(restore):
        return "--restore-file", restore
    return None


def reset_cached_batches(iterator) -> None:
    """Make a fairseq ``EpochBatchIterator`` call its batch sampler again on the next epoch."""
    iterator._frozen_batches = None


def logged_num_updates() -> Optional[int]:
    """The trainer's count of finished updates as it last logged it, or None when it has not
    logged one yet (a run's first epoch).

    ``Trainer.set_num_updates`` logs ``num_updates`` on every update and when a checkpoint is
    loaded, into the active root aggregator. Loading a mid-epoch checkpoint's metrics then puts
    the saved aggregator in the registry (``metrics.get_meter`` reads it) while the active one
    keeps receiving the count: the registered value stays at the resumed update. The larger of
    the two is the count."""
    from fairseq.logging import metrics

    values = []
    for registry in (getattr(metrics, "_active_aggregators", {}), getattr(metrics, "_aggregators", {})):
        meters = registry.get("default")
        meter = meters.get("num_updates") if meters is not None else None
        value = getattr(meter, "val", None)
        if value is not None:
            values.append(int(value))
    return max(values) if values else None


def forget_finished_aggregators() -> int:
    """Drop fairseq's leftover counts of finished temporary metrics aggregators; returns how many.

    ``Trainer._reduce_and_log_stats`` opens ``metrics.aggregate()`` (a new uuid-named
    aggregator) for every update, and ``metrics.aggregate`` counts it down to 0 on exit without
    deleting the count: about 120 bytes a update, 90 MB a rank over 750k updates. A count of 0 is
    an aggregator no longer active (fairseq removes it from the active ones at 0), so dropping it
    changes nothing logged."""
    from fairseq.logging import metrics

    counts = getattr(metrics, "_active_aggregators_cnt", None)
    if not counts:
        return 0
    finished = [name for name, count in counts.items() if count == 0 and name != "default"]
    for name in finished:
        del counts[name]
    return len(finished)


def is_fully_sharded(model) -> bool:
    """True for a model wrapped in fairseq's ``FullyShardedDataParallel`` (fairscale FSDP)."""
    try:
        from fairseq.distributed import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - fairseq without its distributed package
        return False
    return FullyShardedDataParallel is not None and isinstance(model, FullyShardedDataParallel)


def resolved_option(value):
    """``value``, or None when it is None or an OmegaConf interpolation (``${checkpoint.save_dir}``)
    that no fairseq config resolved: a task config built outside fairseq-train (a unit test)."""
    if value is None or (isinstance(value, str) and value.startswith("${")):
        return None
    return value


_PLATEAU_SCHEDULERS: "weakref.WeakSet" = weakref.WeakSet()


def track_plateau_schedulers() -> None:
    """Keep a weak reference to every fairseq ``reduce_lr_on_plateau`` scheduler built from now on
    (for :func:`forget_best_validation_scores`). Idempotent."""
    from fairseq.optim.lr_scheduler import reduce_lr_on_plateau

    schedule = reduce_lr_on_plateau.ReduceLROnPlateauLRSchedule
    if getattr(schedule.__init__, "_slam_tracked", False):
        return
    original = schedule.__init__

    def tracked_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _PLATEAU_SCHEDULERS.add(self)

    tracked_init._slam_tracked = True
    schedule.__init__ = tracked_init


def forget_best_validation_scores() -> None:
    """fairseq-train forgets every past validation score (see the module docstring): the next
    validation becomes ``checkpoint_best.pt``, ``--patience`` counts from it, and a
    ``reduce_lr_on_plateau`` scheduler waits for a plateau of the scores that follow."""
    from fairseq import checkpoint_utils

    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    # fairseq-train's module, whether it runs as fairseq_cli.train or as __main__
    for module in (sys.modules.get("fairseq_cli.train"), sys.modules.get("__main__")):
        should_stop_early = getattr(module, "should_stop_early", None)
        if should_stop_early is not None and hasattr(should_stop_early, "best"):
            del should_stop_early.best
            should_stop_early.num_runs = 0
    for scheduler in list(_PLATEAU_SCHEDULERS):
        plateau = scheduler.lr_scheduler  # torch's ReduceLROnPlateau
        plateau.best, plateau.num_bad_epochs, plateau.cooldown_counter = plateau.mode_worse, 0, 0
