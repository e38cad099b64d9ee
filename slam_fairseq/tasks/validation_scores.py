"""The validation scores fairseq-train compares across a run, kept comparable across SLAM's stages.

Stage 2 adds TLM, STM (and pair CTC) to stage 1's objectives, so a stage-2 validation loss is a
sum of more terms than a stage-1 one, and an accuracy of a stage-2 objective does not exist in
stage 1. fairseq-train compares every validation with the best so far: ``checkpoint_best.pt``,
``--patience`` and the ``reduce_lr_on_plateau`` scheduler would hold a stage-1 score against all
of stage 2 (a run stopped early at the switch, a best checkpoint from stage 1, a learning rate
halved at every validation). :class:`ValidationScores` restarts that comparison of the summed
loss when the stage of the validations changes: the first validation of the new stage is the new
best, and the scores that follow are compared with it. The stage behind the scores is kept in the
training iterator's state (``RoundRobinEpochBatchIterator.run_state``), so a resumed run knows it.

:func:`validation_metric_names` lists what a ``slam_multitask`` validation can log, so that a
``--best-checkpoint-metric`` that no validation logs is an error before training
(:func:`check_best_checkpoint_metric`) instead of a run with no best checkpoint and a
``--patience`` that never fires.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

from slam_fairseq.compat.fairseq_internals import forget_best_validation_scores, resolved_option
from slam_fairseq.data.pretraining.modality import MODALITIES

__all__ = ["ValidationScores", "validation_metric_names", "metric_modality", "check_best_checkpoint_metric",
           "SCORES_STAGE_KEY"]

logger = logging.getLogger(__name__)

#: run_state key: the stage of the validations behind fairseq's best scores
SCORES_STAGE_KEY = "validation_scores_stage"


def validation_metric_names() -> FrozenSet[str]:
    """Every value a ``slam_multitask`` validation can log (the objectives of both stages)."""
    from slam_fairseq.criterions.slam_multitask import _COUNTS, _WITH_ACCURACY, OBJECTIVE_WEIGHTS

    names = {"loss", "code_perplexity", "prob_perplexity", "gumbel_temperature", "stage", *_COUNTS,
             "wpb", "wps", "bsz", "num_updates"}  # the last four: fairseq's own
    names.update(f"{name}_loss" for name in OBJECTIVE_WEIGHTS)
    names.update(f"{name}_accuracy" for name in _WITH_ACCURACY)
    return frozenset(names)


def metric_modality(metric: str) -> Optional[str]:
    """The modality whose batches log ``metric`` ("speech", "text", "pair"), or None (``loss``,
    fairseq's own values: every validation logs them)."""
    from slam_fairseq.criterions.slam_multitask import OBJECTIVE_MODALITIES

    for name, modality in OBJECTIVE_MODALITIES.items():
        if metric in (f"{name}_loss", f"{name}_accuracy"):
            return modality
    if metric in ("code_perplexity", "prob_perplexity", "gumbel_temperature"):
        return "speech"
    for modality in MODALITIES:
        if metric.endswith(f"_{modality}") and metric.startswith("n"):
            return modality
    return None


_NOT_SCORES = ("stage", "wpb", "wps", "bsz", "num_updates", "gumbel_temperature")  # logged, but no measure of quality


def _scores(names, modalities: Optional[Sequence[str]], pair_ctc: bool):
    """The logged names worth choosing the best checkpoint by, for a run training ``modalities``."""
    return sorted(name for name in names
                  if not name.startswith(("n", "_")) and name not in _NOT_SCORES
                  and (modalities is None or metric_modality(name) in (None, *modalities))
                  and (pair_ctc or name != "pair_ctc_loss"))


def check_best_checkpoint_metric(metric: Optional[str], modalities: Optional[Sequence[str]] = None,
                                 pair_ctc: bool = True) -> None:
    """Raise ValueError for a ``--best-checkpoint-metric`` that no ``slam_multitask`` validation of
    this run logs: not a name any validation logs, of a modality that no stage of the run trains
    (``modalities``), or ``pair_ctc_loss`` for a model without ``--pair-ctc``."""
    metric = resolved_option(metric)
    if not metric:
        return  # not set from fairseq-train's command line (a unit test's config)
    names = validation_metric_names()
    if metric not in names:
        raise ValueError(f"--best-checkpoint-metric {metric}: no slam_multitask validation logs it; the scores "
                         f"this run's validations log are {', '.join(_scores(names, modalities, pair_ctc))}")
    modality = metric_modality(metric)
    if modalities is not None and modality is not None and modality not in modalities:
        raise ValueError(f"--best-checkpoint-metric {metric}: logged by {modality} batches, which no stage of this "
                         f"run trains (stages train {', '.join(modalities)}; see --stage2-start-update)")
    if metric == "pair_ctc_loss" and not pair_ctc:
        raise ValueError("--best-checkpoint-metric pair_ctc_loss: the model has no pair CTC head (--pair-ctc)")


class ValidationScores:
    """Restarts fairseq-train's comparison of validation scores when their stage changes.

    Only a metric that sums over the active objectives (``loss``) changes meaning with the stage;
    an objective's own loss or accuracy means the same in both stages (or is None where its
    objective is not trained), so its comparison goes on.

    Args:
        run_state: the task's dict that the training iterator saves and restores.
        save_dir, checkpoint_suffix: where fairseq writes ``checkpoint.best_<metric>_<value>.pt``
            (``--keep-best-checkpoints``), which it ranks by the values in their names; the suffix
            is this rank's (``-shard<rank>`` under ``--use-sharded-state``).
        per_rank_files: every rank writes its own files (``--use-sharded-state``) and renames them;
            otherwise rank 0 renames the one set.
    """

    def __init__(self, run_state: Dict[str, Any], save_dir: Optional[str] = None, checkpoint_suffix: str = "",
                 per_rank_files: bool = False) -> None:
        self.run_state = run_state
        self.save_dir = save_dir
        self.checkpoint_suffix = checkpoint_suffix or ""
        self.per_rank_files = per_rank_files
        #: the stage of the last update before this process started training, for a run_state
        #: without a stage (a resume with --reset-dataloader, or a checkpoint from before the key)
        self.start_stage: Optional[int] = None

    @property
    def stage(self) -> Optional[int]:
        """The stage of the validations behind fairseq's best scores (None: not known)."""
        stage = self.run_state.get(SCORES_STAGE_KEY)
        if stage is None:
            return self.start_stage
        return int(stage)

    def validated(self, stage: int, stats: Dict[str, Any], metric: str) -> None:
        """Call after each validation of stage ``stage`` (in ``post_validate``): for a metric that
        sums the active objectives, a stage other than that of the scores so far restarts the
        comparison, and ``stats``' ``best_<metric>`` is this validation's own value."""
        previous = self.stage
        self.run_state[SCORES_STAGE_KEY] = int(stage)
        if previous is None or previous == stage or metric_modality(metric) is not None:
            return
        forget_best_validation_scores()
        best_key = f"best_{metric}"
        if best_key in stats:
            stats[best_key] = stats.get(metric)
        set_aside = self._set_aside_best_checkpoints(metric, previous)
        logger.warning(f"validation scores restart at stage {stage}: its {metric} sums other objectives than "
                       f"stage {previous}'s, so checkpoint_best.pt, --patience and a reduce_lr_on_plateau "
                       f"scheduler compare stage-{stage} validations only, from this one on ({metric} "
                       f"{stats.get(metric)})" + (f"; --keep-best-checkpoints files of stage {previous} renamed: "
                                                  f"{', '.join(set_aside)}" if set_aside else ""))

    def _set_aside_best_checkpoints(self, metric: str, previous: int) -> List[str]:
        """Rename stage ``previous``'s ``checkpoint.best_<metric>_<value>.pt`` files (rank 0) to
        ``checkpoint.stage<previous>_best_...``: fairseq ranks the files by the value in their name,
        so a stage-1 file would keep every stage-2 score out. Returns the new names."""
        import torch.distributed as dist

        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        if not self.per_rank_files and dist.is_initialized() and dist.get_rank() != 0:
            return []
        pattern = re.compile(rf"checkpoint\.best_{re.escape(metric)}_(\d+\.?\d*){re.escape(self.checkpoint_suffix)}\.pt$")
        renamed = []
        for name in sorted(os.listdir(self.save_dir)):
            if pattern.match(name):
                target = name.replace("checkpoint.best_", f"checkpoint.stage{previous}_best_", 1)
                os.replace(os.path.join(self.save_dir, name), os.path.join(self.save_dir, target))
                renamed.append(target)
        return renamed
