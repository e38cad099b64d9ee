"""Running a finished ``fairseq-train`` command again changes nothing.

fairseq 0.12 resumes from ``checkpoint_last.pt`` and only then compares the update count with
``--max-update``: a run that had finished trains one more update and writes a new
``checkpoint_last.pt`` (and, with validation, maybe a new ``checkpoint_best.pt``). A job scheduler
that starts a finished job again, or a pipeline run a second time, so changes the model it was
meant to keep.

:func:`install_finished_run_check` wraps ``Trainer.load_checkpoint``: when the restored update
count has reached ``--max-update`` (> 0), fairseq-train logs that the run is finished and exits
with status 0 before any update, on every rank (each restores the same count). A larger
``--max-update`` goes on training, as before; ``--reset-optimizer`` (and ``--finetune-from-model``,
which implies it) restores no update count.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_finished_run_check"]

logger = logging.getLogger(__name__)


def _stopping_a_finished_run(fairseq_load_checkpoint: Callable) -> Callable:
    @functools.wraps(fairseq_load_checkpoint)
    def load_checkpoint(self, filename, *args, **kwargs):
        extra_state = fairseq_load_checkpoint(self, filename, *args, **kwargs)
        max_update = int(getattr(getattr(self.cfg, "optimization", None), "max_update", 0) or 0)
        if extra_state is not None and max_update > 0 and self.get_num_updates() >= max_update:
            logger.info(f"{filename}: this run is finished ({self.get_num_updates()} updates, --max-update "
                        f"{max_update}); nothing to train. Give a larger --max-update to train on")
            raise SystemExit(0)
        return extra_state

    return load_checkpoint


def install_finished_run_check() -> bool:
    """Wrap ``fairseq.trainer.Trainer.load_checkpoint`` as the module docstring says. Idempotent;
    returns True when it wrapped, False when it had been installed already."""
    from fairseq.trainer import Trainer

    return wrap_once(Trainer, "load_checkpoint", _stopping_a_finished_run)
