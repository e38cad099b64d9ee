"""Task ``slam_pretraining``: SLAM's speech + text + pairs pre-training, in two stages.

Data (``docs/data_formats.md``): ``DATA/speech_<split>.tsv`` (MSM), ``DATA/text_<split>.{bin,idx}``
or ``.txt`` (span masking), ``DATA/pair_<split>.tsv`` (TLM + STM), ``DATA/config.yaml`` (dictionary,
SentencePiece model, optional global CMVN). Every modality is optional; the ones the schedule needs
must be there (checked at setup).

One update = one batch of every *active* modality (``docs/pretraining_batches.md``). The task's
``train_step`` runs the criterion once per modality (``{"speech": batch}``, then ``{"text":
batch}``, then ``{"pair": batch}``) with a backward pass after each, so memory holds one
modality's graph at a time and the update's gradient is the sum of the per-modality gradients.

Schedule: before update ``--stage2-start-update N`` (0-based count of finished updates) the
``--stage1-modalities`` are active (speech, text: MSM + span masking); from update N on the
``--stage2-modalities`` (adding pairs: TLM + STM). The stage is a function of the update number,
so a resumed run is in the right stage. ``-1`` (default) means stage 1 only. An epoch whose
updates all fall before stage 2 does not read the pairs (:meth:`SlamPretrainingTask.modalities_left_out`).

Batching: each modality is batched on its own, ``--max-tokens-{speech,text,pair}`` (feature frames
for speech and pairs, tokens for text) and ``--max-sentences-{speech,text,pair}``; where one is
unset, fairseq's ``--max-tokens`` / ``--batch-size`` apply to that modality. An epoch is one pass
over ``--epoch-modality`` (default: the modality with the most batches); the others are cycled.
"""

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from slam_formats.manifest import ManifestError
from slam_formats.names import pair_manifest_name, speech_manifest_name
from slam_fairseq.checkpoint_recovery import (recover_checkpoint_dir_on_rank_zero,
                                              remove_interrupted_writes_on_rank_zero)
from slam_fairseq.checkpoint_shards import rank_checkpoint_suffix, sharded_state_world_size
from slam_fairseq.compat.ddp_backend import use_legacy_ddp_for_several_backward_passes
from slam_fairseq.compat.fairseq_internals import (forget_finished_aggregators, is_fully_sharded,
                                                   logged_num_updates, resolved_option)
from slam_fairseq.compat.training_split_validation import loaded_for_checkpoint_evaluation
from slam_fairseq.data.pretraining.config import FEATURE_NORMALIZATIONS, PretrainingDataConfig
from slam_fairseq.data.pretraining.feature_rows import (NoUsableRowsError, SpeechFeatureReader, SpeechRows,
                                                         read_speech_rows)
from slam_fairseq.data.pretraining.frame_masks import FrameMaskingSettings, expected_masked_fraction
from slam_fairseq.data.pretraining.pair import PretrainingPairDataset
from slam_fairseq.data.pretraining.round_robin import (LEFT_OUT_KEY, MODALITIES, RoundRobinBatchDataset,
                                                       RoundRobinEpochBatchIterator,
                                                       make_modality_batches)
from slam_fairseq.data.pretraining.row_checks import (BAD_ROWS_KEY, BadRowLimits, RowCheckReport,
                                                      check_feature_rows, merged_reports, without_bad_rows)
from slam_fairseq.data.pretraining.span_masks import (SPAN_DISTRIBUTIONS, SpanMaskingSettings,
                                                        TextVocabulary)
from slam_fairseq.data.pretraining.speech import PretrainingSpeechDataset
from slam_fairseq.data.pretraining.text import PretrainingTextDataset, load_text_tokens, text_source_paths
from slam_fairseq.host_memory import release_free_heap_memory
from slam_fairseq.rank_agreement import gathered_from_every_rank, rank_and_world_size
from slam_fairseq.tasks.logging_schema import complete_logging_output, logging_keys_of
from slam_fairseq.tasks.nonfinite_updates import NonFiniteUpdateGuard
from slam_fairseq.tasks.validation_scores import ValidationScores, check_best_checkpoint_metric, metric_modality

logger = logging.getLogger(__name__)

OBJECTIVES = {"speech": "MSM", "text": "span masking", "pair": "TLM + STM"}


def _option(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class SlamPretrainingConfig(FairseqDataclass):
    data: str = _option(MISSING, "data directory (config.yaml, speech_/text_/pair_<split> files)")

    # -- schedule ---------------------------------------------------------------------------------
    stage1_modalities: str = _option(
        "speech,text", "comma-separated modalities of stage 1 (speech: MSM, text: span masking, pair: TLM + STM)")
    stage2_modalities: str = _option("speech,text,pair", "comma-separated modalities of stage 2")
    stage2_start_update: int = _option(
        -1, "stage 2 is active once this many updates are done (0: from the start; -1: never, stage 1 only)")
    epoch_modality: ChoiceEnum(["largest", *MODALITIES]) = _option(
        "largest", "the modality one epoch passes over once (largest: the one with the most batches); "
                   "the others are cycled")

    # -- batching ---------------------------------------------------------------------------------
    max_tokens_speech: Optional[int] = _option(None, "feature frames per speech batch (default --max-tokens)")
    max_tokens_text: Optional[int] = _option(None, "tokens per text batch (default --max-tokens)")
    max_tokens_pair: Optional[int] = _option(None, "feature frames per pair batch (default --max-tokens)")
    max_sentences_speech: Optional[int] = _option(None, "utterances per speech batch (default --batch-size)")
    max_sentences_text: Optional[int] = _option(None, "sentences per text batch (default --batch-size)")
    max_sentences_pair: Optional[int] = _option(None, "pairs per pair batch (default --batch-size)")
    max_source_positions: int = _option(
        6000, "longest speech input in feature frames; longer ones are skipped (counted)")
    max_text_positions: int = _option(
        1024, "longest text in tokens (eos included); longer ones are skipped (counted)")
    feature_normalization: ChoiceEnum(FEATURE_NORMALIZATIONS) = _option(
        "auto", "auto: global CMVN when config.yaml names stats, else per utterance")
    max_bad_rows: int = _option(
        100, "speech/pair rows of a manifest that may be bad (dropped at load or skipped mid-run) before "
             "the run stops (-1: no limit)")
    max_bad_row_fraction: float = _option(
        0.001, "the same limit as a share of the manifest's rows; the larger of the two applies")
    release_host_memory: bool = _option(
        False, "CPU training: give freed activation memory back to the OS after every update (glibc "
               "malloc_trim + a fixed 1 MiB mmap threshold). Lowers the peak RSS of a demo-size stage-2 "
               "run from about 2.5 to 1.9 GB, but costs about 40%% more time in page faults; off by default")

    # -- text span masking (SpanBERT) -------------------------------------------------------------
    text_mask_prob: float = _option(0.15, "fraction of text tokens masked")
    text_span_length: int = _option(5, "span length (fixed distribution)")
    text_span_distribution: ChoiceEnum(SPAN_DISTRIBUTIONS) = _option(
        "fixed", "fixed spans of --text-span-length, or SpanBERT's geometric lengths")
    text_span_geometric_p: float = _option(0.2, "geometric distribution's p (SpanBERT: 0.2)")
    text_span_max_length: int = _option(10, "longest geometric span (SpanBERT: 10)")
    text_random_token_prob: float = _option(0.1, "share of masked tokens replaced by a random token")
    text_leave_unmasked_prob: float = _option(0.1, "share of masked tokens left unchanged")

    # -- MSM (w2v-BERT) ---------------------------------------------------------------------------
    speech_mask_prob: float = _option(
        0.065, "probability that a subsampled frame starts a masked span (0.065 x 10: about 49%)")
    speech_mask_length: int = _option(10, "masked span length in subsampled frames")

    # -- TLM and STM ------------------------------------------------------------------------------
    tlm_text_mask_prob: float = _option(0.5, "fraction of a pair's text tokens masked")
    tlm_text_span_length: int = _option(5, "TLM text span length")
    tlm_speech_mask_prob: float = _option(
        0.13, "TLM span start probability over subsampled frames (0.13 x 10: about 75%)")
    tlm_speech_mask_length: int = _option(10, "TLM masked span length")
    stm_negative_prob: float = _option(
        0.5, "share of pair rows re-paired with another row's transcript (STM negatives)")

    # -- from the rest of the configuration -------------------------------------------------------
    seed: int = II("common.seed")
    max_update: int = II("optimization.max_update")
    train_subset: str = II("dataset.train_subset")
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")
    ddp_backend: str = II("distributed_training.ddp_backend")
    use_sharded_state: bool = II("distributed_training.use_sharded_state")
    best_checkpoint_metric: str = II("checkpoint.best_checkpoint_metric")


def parse_modalities(value: str, option: str) -> Tuple[str, ...]:
    names = [name.strip() for name in str(value).split(",") if name.strip()]
    unknown = [name for name in names if name not in MODALITIES]
    if unknown or not names:
        raise ValueError(f"{option}: {value!r} must be a comma-separated subset of {MODALITIES}")
    return tuple(name for name in MODALITIES if name in names)


def _capped(limit: Optional[int], cap: Optional[int]) -> Optional[int]:
    """``limit`` lowered to ``cap`` (None: no limit, no cap)."""
    if cap is None:
        return limit
    return cap if limit is None else min(limit, cap)


def _objectives(modalities) -> str:
    return ", ".join(OBJECTIVES[name] for name in MODALITIES if name in modalities) or "nothing"


def merge_logging_outputs(outputs: List[Dict[str, Any]], sample_size: int) -> Dict[str, Any]:
    """Sum the per-modality logging outputs key by key (as fairseq sums them across GPUs);
    ``sample_size`` becomes the step's (1: the per-modality losses are summed, not averaged)."""
    merged: Dict[str, Any] = {}
    for output in outputs:
        for key, value in output.items():
            merged[key] = merged[key] + value if key in merged else value
    if "sample_size" in merged:
        merged["sample_size"] = sample_size
    return merged


def modality_loss(criterion, model, name: str, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The criterion on one modality's batch: (loss divided by its sample size, logging output).

    ``slam_multitask`` returns sample size 1 (its objectives are means already), so the division
    is a no-op there; another criterion's sum is turned into a mean, so that the per-modality
    losses of a step can be summed.
    """
    loss, sample_size, logging_output = criterion(model, {name: batch})
    sample_size = float(sample_size)
    if sample_size not in (0.0, 1.0):
        loss = loss / sample_size
    return loss, logging_output


def _summed_loss(losses: List[torch.Tensor]) -> torch.Tensor:
    """The step's loss: the modalities' (detached) losses in float32, added in order on their device
    (a host zero moved there would be a host-to-device copy, which waits for the queued kernels),
    or a host zero when the step had none."""
    if not losses:
        return torch.zeros(())
    total = losses[0].float()
    for loss in losses[1:]:
        total = total + loss.float()
    return total


def _step_logging_output(outputs: List[Dict[str, Any]], sample_size: int, model, criterion) -> Dict[str, Any]:
    """The step's merged logging output, completed to the criterion's key schema (when it has one)
    so that every data-parallel rank logs the same keys, whatever modalities its step held
    (``slam_fairseq/tasks/logging_schema.py``)."""
    merged = merge_logging_outputs(outputs, sample_size)
    keys = logging_keys_of(criterion)
    if keys is None:
        return merged
    merged["sample_size"] = sample_size
    device = next(iter(model.parameters())).device
    return complete_logging_output(merged, keys, device, type(criterion).__name__)


@register_task("slam_pretraining", dataclass=SlamPretrainingConfig)
class SlamPretrainingTask(FairseqTask):
    """See the module docstring. ``source_dictionary`` is the data dictionary plus ``<mask>``."""

    cfg: SlamPretrainingConfig

    def __init__(self, cfg: SlamPretrainingConfig, data_config: PretrainingDataConfig) -> None:
        super().__init__(cfg)
        self.data_config = data_config
        self.dictionary = data_config.dictionary
        self.vocabulary = TextVocabulary.from_dictionary(self.dictionary)
        self.stage1_modalities = parse_modalities(cfg.stage1_modalities, "--stage1-modalities")
        self.stage2_modalities = parse_modalities(cfg.stage2_modalities, "--stage2-modalities")
        self.loaded_modalities = tuple(
            name for name in MODALITIES if name in self.stage1_modalities
            or (self.stage2_reachable and name in self.stage2_modalities))
        self.text_masking = SpanMaskingSettings(
            cfg.text_mask_prob, cfg.text_span_length, str(cfg.text_span_distribution), cfg.text_span_geometric_p,
            cfg.text_span_max_length, cfg.text_random_token_prob, cfg.text_leave_unmasked_prob)
        self.tlm_text_masking = SpanMaskingSettings(
            cfg.tlm_text_mask_prob, cfg.tlm_text_span_length, str(cfg.text_span_distribution),
            cfg.text_span_geometric_p, cfg.text_span_max_length, cfg.text_random_token_prob,
            cfg.text_leave_unmasked_prob)
        self.speech_masking = FrameMaskingSettings(cfg.speech_mask_prob, cfg.speech_mask_length)
        self.tlm_speech_masking = FrameMaskingSettings(cfg.tlm_speech_mask_prob, cfg.tlm_speech_mask_length)
        self.model_max_positions: Optional[Tuple[int, int]] = None
        self.num_updates_seen = 0
        self.bad_row_limits = BadRowLimits(cfg.max_bad_rows, cfg.max_bad_row_fraction)
        self.update_guard = NonFiniteUpdateGuard()
        self._announced_stage: Optional[int] = None
        self._skipped_validation_modalities: set = set()
        # saved and restored with the training iterator's state (RoundRobinEpochBatchIterator.run_state)
        self.run_state: Dict[str, Any] = {}
        self._evaluation_views: Dict[str, Tuple[RoundRobinBatchDataset, RoundRobinBatchDataset]] = {}
        ddp_backend, sharded_state = resolved_option(cfg.ddp_backend), resolved_option(cfg.use_sharded_state)
        #: shards each save writes (``--use-sharded-state``: one per rank), else 0
        self.checkpoint_shards = sharded_state_world_size(ddp_backend, sharded_state)
        self.validation_scores = ValidationScores(
            self.run_state, resolved_option(cfg.save_dir),
            rank_checkpoint_suffix(resolved_option(cfg.checkpoint_suffix) or "", ddp_backend, sharded_state),
            per_rank_files=self.checkpoint_shards > 0)
        self.model_has_pair_ctc: Optional[bool] = None
        self._validating = False  # the last step was a validation step (for reduce_metrics)
        self._stashed_best: Optional[Tuple[float]] = None
        self._train_limits: Optional[Tuple[Optional[int], Optional[int]]] = None
        self._warned_stage_reset = False

    # -- setup ------------------------------------------------------------------------------------
    @classmethod
    def setup_task(cls, cfg: SlamPretrainingConfig, **kwargs):
        use_legacy_ddp_for_several_backward_passes(cfg, "slam_pretraining")
        task = cls(cfg, PretrainingDataConfig(cfg.data, str(cfg.feature_normalization)))
        task.check_training_data()
        # Before fairseq loads the checkpoint: an unreadable checkpoint_last.pt is replaced.
        recover_checkpoint_dir_on_rank_zero(cfg.save_dir, cfg.restore_file, cfg.checkpoint_suffix or "",
                                            task.checkpoint_shards)
        logger.info(f"dictionary: {len(task.dictionary)} symbols (<mask> = {task.vocabulary.mask}); "
                    f"features: {task.data_config.describe_normalization()}")
        logger.info(task.describe_schedule())
        return task

    @property
    def stage2_reachable(self) -> bool:
        start, max_update = int(self.cfg.stage2_start_update), int(self.cfg.max_update or 0)
        return start >= 0 and (max_update <= 0 or start < max_update)

    def modalities_left_out(self, steps_per_epoch: int, num_shards: int) -> Tuple[str, ...]:
        """The modalities of stage 2 alone while the coming epoch ends before stage 2 starts (its
        batches are then not read). A rank makes at most ``ceil(steps / num_shards)`` updates in an
        epoch (fairseq pads every shard to that many batches; ``--update-freq`` only lowers it),
        counted from the trainer's logged update count; with no count logged yet, none."""
        done = logged_num_updates()
        if not self.stage2_reachable or done is None:
            return ()
        done = max(done, self.num_updates_seen)
        updates_in_epoch = -(-int(steps_per_epoch) // max(int(num_shards), 1))
        if done + updates_in_epoch > int(self.cfg.stage2_start_update):
            return ()
        return tuple(name for name in self.stage2_modalities if name not in self.stage1_modalities)

    def describe_schedule(self) -> str:
        cfg = self.cfg
        masks = (f"masks: text {cfg.text_mask_prob:.0%} in {cfg.text_span_distribution} spans"
                 + (f" of {cfg.text_span_length}" if str(cfg.text_span_distribution) == "fixed" else "")
                 + f", MSM about {expected_masked_fraction(cfg.speech_mask_prob, cfg.speech_mask_length):.0%}"
                 f" of frames, TLM {cfg.tlm_text_mask_prob:.0%} of text and about "
                 f"{expected_masked_fraction(cfg.tlm_speech_mask_prob, cfg.tlm_speech_mask_length):.0%} of frames")
        stage1 = f"stage 1: {_objectives(self._with_training_data(self.stage1_modalities))}"
        stage2 = f"stage 2: {_objectives(self._with_training_data(self.stage2_modalities))}"
        if not self.stage2_reachable:
            never = "" if cfg.stage2_start_update < 0 else \
                f" (--stage2-start-update {cfg.stage2_start_update} >= --max-update {cfg.max_update})"
            return f"{stage1}; no stage 2{never}; {masks}"
        if cfg.stage2_start_update == 0:
            return f"{stage2} from the first update; {masks}"
        return f"{stage1} for updates 0 .. {cfg.stage2_start_update - 1}, then {stage2}; {masks}"

    def _with_training_data(self, modalities: Sequence[str]) -> List[str]:
        """The modalities of ``modalities`` that the training split has data for (the objectives
        a stage trains; :meth:`check_training_data` warns about the others)."""
        available = self.available_modalities(self.cfg.train_subset)
        return [name for name in modalities if name in available]

    def modality_files(self, split: str) -> Dict[str, List[str]]:
        """The files each modality of ``split`` is read from (what must exist)."""
        text = text_source_paths(self.cfg.data, split)
        return {"speech": [str(self.data_config.data_dir / speech_manifest_name(split))],
                "text": [f"{text['bin']} + {text['idx']}", str(text["txt"])],
                "pair": [str(self.data_config.data_dir / pair_manifest_name(split))]}

    def available_modalities(self, split: str) -> Tuple[str, ...]:
        data_dir = self.data_config.data_dir
        text = text_source_paths(self.cfg.data, split)
        present = {
            "speech": (data_dir / speech_manifest_name(split)).is_file(),
            "text": (text["bin"].is_file() and text["idx"].is_file()) or text["txt"].is_file(),
            "pair": (data_dir / pair_manifest_name(split)).is_file(),
        }
        return tuple(name for name in MODALITIES if present[name])

    def check_training_data(self) -> None:
        """Fail at setup, not mid-run, when the schedule needs data that is not there."""
        split = self.cfg.train_subset
        available = self.available_modalities(split)
        files = self.modality_files(split)
        stage1 = [name for name in self.stage1_modalities if name in available]
        if not stage1:
            wanted = "; ".join(f"{name}: {' or '.join(files[name])}" for name in self.stage1_modalities)
            raise FileNotFoundError(f"no training data for stage 1 ({_objectives(self.stage1_modalities)}) "
                                    f"in {self.cfg.data} for split {split!r}: expected {wanted}")
        for name in self.stage1_modalities:
            if name not in available:
                logger.warning(f"stage 1 has no {name} data ({' or '.join(files[name])} missing): "
                               f"{OBJECTIVES[name]} is left out")
        if self.stage2_reachable:
            for name in self.stage2_modalities:
                if name not in available and name not in self.stage1_modalities:
                    raise FileNotFoundError(
                        f"stage 2 is configured (--stage2-start-update {self.cfg.stage2_start_update}, "
                        f"--max-update {self.cfg.max_update}) and needs {name} data for {OBJECTIVES[name]}, "
                        f"but {' or '.join(files[name])} does not exist; add it, or train stage 1 only "
                        "with --stage2-start-update -1")

    # -- data -------------------------------------------------------------------------------------
    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        available = self.available_modalities(split)
        modalities = [name for name in self.loaded_modalities if name in available]
        if not modalities:
            files = self.modality_files(split)
            wanted = "; ".join(f"{name}: {' or '.join(files[name])}" for name in self.loaded_modalities)
            raise FileNotFoundError(f"no pre-training data for split {split!r} in {self.cfg.data}: expected {wanted}")
        missing = [name for name in self.loaded_modalities if name not in available]
        if missing:
            logger.info(f"split {split!r} has no {', '.join(missing)} data; using {', '.join(modalities)}")
        # fairseq-validate reads the training split as a validation split (it passes task_cfg)
        is_train = split == self.cfg.train_subset and not loaded_for_checkpoint_evaluation(kwargs)
        datasets = {}
        for name in modalities:
            try:
                datasets[name] = self._build_modality(name, split)
            except NoUsableRowsError as error:  # an empty manifest, or one without a usable row
                if is_train:
                    raise
                logger.warning(f"{error}: split {split!r} is evaluated without {name} data")
        if not datasets:
            raise ManifestError(f"split {split!r}: none of its {', '.join(modalities)} data has a usable row "
                                "(see the warnings above)")
        for name, dataset in datasets.items():
            logger.info(f"{split} {name}: {len(dataset)} examples from {dataset.name}")
        epoch_modality = str(self.cfg.epoch_modality)
        if is_train and epoch_modality != "largest" and epoch_modality not in datasets:
            logger.warning(f"--epoch-modality {epoch_modality}: split {split!r} has no {epoch_modality} data in this "
                           f"stage (loaded: {', '.join(datasets)}); an epoch is one pass over the largest of them")
        if not is_train or epoch_modality not in datasets:
            epoch_modality = "largest"
        self.datasets[split] = RoundRobinBatchDataset(datasets, self.cfg.seed, cycle=is_train,
                                                      epoch_modality=epoch_modality)

    def evaluation_view(self, split: str) -> RoundRobinBatchDataset:
        """The examples of ``split`` read as a validation split is read: every batch of every
        modality once, the masks of epoch 1. A training split's view is a zip of its own over the
        same examples, so validating on it (``--valid-subset valid,train``; see
        :mod:`slam_fairseq.compat.training_split_validation`) sets neither the batches nor the
        epoch of the dataset being trained on; it is made once per loaded dataset."""
        dataset = self.datasets[split]
        if not dataset.cycle:
            return dataset
        made = self._evaluation_views.get(split)
        if made is None or made[0] is not dataset:
            if made is not None:  # the split was loaded again (sharded data): drop the old view's iterator
                self.dataset_to_epoch_iter.pop(made[1], None)
            view = RoundRobinBatchDataset(dict(dataset.datasets), self.cfg.seed, cycle=False)
            made = self._evaluation_views[split] = (dataset, view)
        return made[1]

    def _build_modality(self, name: str, split: str):
        data_dir, seed = self.cfg.data, self.cfg.seed
        transform, dim = self.data_config.feature_transform, self.data_config.input_feat_per_channel
        if name == "speech":
            rows = self._checked_rows(read_speech_rows(self.data_config.data_dir / speech_manifest_name(split)))
            return PretrainingSpeechDataset(SpeechFeatureReader(rows, data_dir, transform, dim),
                                            self.speech_masking, seed)
        if name == "text":
            tokens = load_text_tokens(data_dir, split, self.dictionary, self.data_config.encode_lines)
            self.bad_row_limits.register(RowCheckReport(tokens.name, len(tokens)))
            return PretrainingTextDataset(tokens, self.vocabulary, self.text_masking, seed)
        rows = read_speech_rows(self.data_config.data_dir / pair_manifest_name(split), need_transcript=True)
        rows = self._checked_rows(rows)
        transcripts = self.data_config.encode_lines(rows.transcripts)
        return PretrainingPairDataset(SpeechFeatureReader(rows, data_dir, transform, dim), transcripts,
                                      self.vocabulary, self.tlm_text_masking, self.tlm_speech_masking,
                                      self.cfg.stm_negative_prob, seed)

    def _checked_rows(self, rows: SpeechRows) -> SpeechRows:
        """Rows whose features pass the cheap checks of ``row_checks`` (counted): each rank checks
        its block of the rows, and the ranks drop the rows any of them found bad, so that all
        build the same dataset. A rank sends at most one row past the limit (beyond it, the run
        stops on every rank anyway)."""
        report = check_feature_rows(rows, self.cfg.data, self.data_config.input_feat_per_channel,
                                    part=rank_and_world_size())
        limit = self.bad_row_limits.limit_for(report.num_rows)
        sent = report if limit == float("inf") else report.first(int(limit) + 1)
        report = merged_reports(gathered_from_every_rank(sent))
        rows = without_bad_rows(rows, report)
        self.bad_row_limits.register(report)
        return rows

    def _count_bad_rows(self, sample) -> None:
        """Count the examples a batch left out (``BAD_ROWS_KEY``); stops the run past the limit."""
        from fairseq import metrics

        if sample and sample.get(BAD_ROWS_KEY):
            self.bad_row_limits.record(sample[BAD_ROWS_KEY])
        if self.bad_row_limits.num_bad_mid_run:
            metrics.log_scalar("bad_rows", self.bad_row_limits.num_bad_mid_run, weight=0, priority=310, round=0)

    def position_limits(self) -> Tuple[int, int]:
        """(speech frames, text tokens): the task's limits, lowered to the model's when known."""
        limits = (int(self.cfg.max_source_positions), int(self.cfg.max_text_positions))
        if self.model_max_positions is not None:
            limits = tuple(min(a, int(b)) if b is not None else a for a, b in zip(limits, self.model_max_positions))
        return limits

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                           num_shards=1, shard_id=0, num_workers=0, epoch=1, data_buffer_size=0,
                           disable_iterator_cache=False, skip_remainder_batch=False,
                           grouped_shuffling=False, update_epoch_batch_itr=False):
        """fairseq's ``EpochBatchIterator`` over one round-robin step per batch.

        Per-modality limits replace ``max_tokens``/``max_sentences`` where set. Lengths are limited
        by ``--max-source-positions``/``--max-text-positions`` (and the model's): too long examples
        are always skipped with a counted warning (also in validation), and ``max_positions``
        (which fairseq mixes with ``--max-tokens``) and ``required_batch_size_multiple`` are
        ignored, so no batch, the last included, is dropped.
        """
        if not isinstance(dataset, RoundRobinBatchDataset):
            return super().get_batch_iterator(
                dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
                required_batch_size_multiple, seed, num_shards, shard_id, num_workers, epoch,
                data_buffer_size, disable_iterator_cache, skip_remainder_batch, grouped_shuffling,
                update_epoch_batch_itr)
        reuse = not disable_iterator_cache and not update_epoch_batch_itr
        if reuse and dataset in self.dataset_to_epoch_iter:
            return self.dataset_to_epoch_iter[dataset]
        limits = self.position_limits()
        split = next((name for name, loaded in self.datasets.items() if loaded is dataset), None)
        training = split == self.cfg.train_subset and dataset.cycle
        if training:
            self._train_limits = (max_tokens, max_sentences)
            valid_caps = (None, None)
        else:
            valid_caps = self._validation_caps(max_tokens, max_sentences)
        batches = {}
        for name, modality_dataset in dataset.datasets.items():
            tokens = getattr(self.cfg, f"max_tokens_{name}")
            sentences = getattr(self.cfg, f"max_sentences_{name}")
            batches[name] = make_modality_batches(
                modality_dataset, _capped(tokens if tokens is not None else max_tokens, valid_caps[0]),
                _capped(sentences if sentences is not None else max_sentences, valid_caps[1]), limits, seed,
                allow_empty=not training)
        if not any(batches.values()):
            raise ValueError(f"{split or 'this split'}: every example of every modality was skipped (see the "
                             "warnings above): raise the length or batch limits (--max-tokens-valid, "
                             "--max-source-positions, --max-text-positions)")
        dataset.set_batches(batches)
        dataset.set_epoch(epoch)
        if training:
            dataset.modalities_left_out = functools.partial(self.modalities_left_out, num_shards=num_shards)
        iterator = RoundRobinEpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=dataset.batch_sampler,
            seed=seed, num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
            buffer_size=data_buffer_size, skip_remainder_batch=skip_remainder_batch,
            grouped_shuffling=grouped_shuffling, reuse_dataloader=True, persistent_workers=True)
        iterator.run_state = self.run_state
        if reuse:
            self.dataset_to_epoch_iter[dataset] = iterator
        return iterator

    def _validation_caps(self, max_tokens: Optional[int], max_sentences: Optional[int]):
        """(tokens, sentences) that cap every modality's batches of a validation split:
        ``--max-tokens-valid`` / ``--batch-size-valid`` where they differ from the training
        iterator's ``--max-tokens`` / ``--batch-size`` (fairseq copies those into the valid
        options when they are not given), else None."""
        if self._train_limits is None:
            return None, None
        train_tokens, train_sentences = self._train_limits
        return (max_tokens if max_tokens != train_tokens else None,
                max_sentences if max_sentences != train_sentences else None)

    def build_model(self, cfg, from_checkpoint: bool = False):
        model = super().build_model(cfg, from_checkpoint)
        if hasattr(model, "max_positions"):
            positions = model.max_positions()
            if isinstance(positions, (tuple, list)) and len(positions) == 2:
                self.model_max_positions = tuple(positions)
        self.model_has_pair_ctc = getattr(model, "pair_ctc_head", None) is not None
        return model

    def max_positions(self) -> Tuple[int, int]:
        return (int(self.cfg.max_source_positions), int(self.cfg.max_text_positions))

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary

    # -- schedule ---------------------------------------------------------------------------------
    def stage_at(self, update_num: int) -> int:
        """1 or 2: the stage of the update that starts after ``update_num`` finished updates."""
        if self.stage2_reachable and update_num >= int(self.cfg.stage2_start_update):
            return 2
        return 1

    def active_modalities(self, update_num: int) -> Tuple[str, ...]:
        return self.stage2_modalities if self.stage_at(update_num) == 2 else self.stage1_modalities

    def _announce_stage(self, update_num: int) -> int:
        stage = self.stage_at(update_num)
        if stage != self._announced_stage:
            if stage == 2 and (self._announced_stage == 1 or update_num == self.cfg.stage2_start_update):
                stage2 = self._with_training_data(self.stage2_modalities)
                added = [name for name in stage2 if name not in self.stage1_modalities]
                logger.info(f"stage 2 starts at update {self.cfg.stage2_start_update}: adding "
                            f"{_objectives(added)} (active: {_objectives(stage2)})")
            else:
                logger.info(f"training in stage {stage} from update {update_num}: "
                            f"{_objectives(self._with_training_data(self.active_modalities(update_num)))}")
            self._announced_stage = stage
        return stage

    def _note_stage_reached(self, stage: int, update_num: int) -> None:
        """Keep the furthest stage trained (saved with the iterator); training in stage 1 after a
        checkpoint that had reached stage 2 (``--reset-optimizer`` restarts the update count) is
        said once."""
        if self.validation_scores.start_stage is None:  # the first update of this process
            self.validation_scores.start_stage = self.stage_at(max(update_num - 1, 0))
        reached = int(self.run_state.get("stage_reached", 0))
        if stage < reached and not self._warned_stage_reset:
            self._warned_stage_reset = True
            logger.warning(f"training in stage {stage} from update {update_num}, but this run's checkpoint had "
                           f"reached stage {reached}: the update count is below --stage2-start-update "
                           f"{self.cfg.stage2_start_update} (--reset-optimizer starts it over; or a later "
                           "--stage2-start-update was given), so stage 2 starts again there; "
                           "--stage2-start-update 0 goes on in stage 2")
        if stage > reached:
            self.run_state["stage_reached"] = stage

    # -- steps ------------------------------------------------------------------------------------
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        """One forward + backward per active modality; returns (summed loss, 1, summed logs).

        Each per-modality loss is divided by the criterion's sample size before backward (a no-op
        for ``slam_multitask``, which returns 1), and the step returns sample size 1, so the
        update's gradient is the sum of the per-modality gradients.
        """
        from fairseq import metrics
        from fairseq.optim.amp_optimizer import AMPOptimizer

        model.train()
        model.set_num_updates(update_num)
        self._validating = False
        stage = self._announce_stage(update_num)
        self._note_stage_reached(stage, update_num)
        metrics.log_scalar("stage", stage, weight=0, priority=300, round=0)
        unread = set(sample.get(LEFT_OUT_KEY, ())) & set(self.active_modalities(update_num)) if sample else set()
        if unread:
            raise RuntimeError(f"update {update_num} (stage {stage}) trains {', '.join(sorted(unread))}, but its batch "
                               f"was read without them: the epoch was planned from update {logged_num_updates()} as "
                               "a stage-1 epoch; please report this (--stage2-start-update 0 or a two-run schedule "
                               "avoids it)")
        modalities = [name for name in self.active_modalities(update_num) if name in sample]
        if not ignore_grad:  # fairseq's dummy batches repeat an earlier batch
            self._count_bad_rows(sample)
        use_amp = isinstance(optimizer, AMPOptimizer)
        losses, outputs = [], []
        for position, name in enumerate(modalities):
            is_last = position == len(modalities) - 1
            sync = contextlib.nullcontext()
            if not is_last and hasattr(model, "no_sync") and not is_fully_sharded(model):
                sync = model.no_sync()  # DDP: all-reduce once, after the last modality's backward
            with sync:
                with torch.autograd.profiler.record_function(f"forward-{name}"), \
                        (torch.autocast("cuda") if use_amp else contextlib.nullcontext()):
                    loss, logging_output = modality_loss(criterion, model, name, sample[name])
                if ignore_grad:
                    loss = loss * 0
                with torch.autograd.profiler.record_function(f"backward-{name}"):
                    optimizer.backward(self.update_guard.loss_for_backward(name, loss))
            losses.append(loss.detach())
            outputs.append(logging_output)
        total_loss = _summed_loss(losses)
        self.update_guard.after_backward(optimizer)  # a non-finite modality: the whole update is skipped
        outputs = self.update_guard.logged(modalities, outputs)
        self.num_updates_seen = update_num + 1
        if self.cfg.release_host_memory and total_loss.device.type == "cpu":
            release_free_heap_memory()  # the freed activations, not kept in malloc's heaps
        sample_size = 1 if modalities else 0
        return total_loss, sample_size, _step_logging_output(outputs, sample_size, model, criterion)

    def optimizer_step(self, optimizer, model, update_num) -> None:
        """fairseq's step, unless a modality's loss was not finite on any rank (``nonfinite_updates``)."""
        skip = self.update_guard.skip_update(model, update_num)
        self.update_guard.log()
        if not skip:
            super().optimizer_step(optimizer, model, update_num)

    def valid_step(self, sample, model, criterion):
        """As ``train_step`` without backward, for the modalities active at the last update.

        Random draws of the criterion (distractors, Gumbel noise) are seeded by ``--seed`` and the
        batch's ids, so a checkpoint's validation loss does not depend on the run's history.
        """
        from fairseq import metrics, utils

        model.eval()
        self._validating = True
        self._count_bad_rows(sample)
        metrics.log_scalar("stage", self.stage_at(self.num_updates_seen), weight=0, priority=300, round=0)
        active = self.active_modalities(self.num_updates_seen)
        modalities = [name for name in active if name in sample]
        self._note_skipped_validation(sample, active)
        losses, outputs = [], []
        ids = [MODALITIES.index(name) for name in modalities]
        ids += [int(i) for name in modalities for i in sample[name]["id"].tolist()]
        seed = int(np.random.SeedSequence([int(self.cfg.seed), *ids]).generate_state(1)[0] >> 1)
        with torch.no_grad(), utils.set_torch_seed(seed):
            for name in modalities:
                loss, logging_output = modality_loss(criterion, model, name, sample[name])
                losses.append(loss.detach())
                outputs.append(logging_output)
        total_loss = _summed_loss(losses)
        sample_size = 1 if modalities else 0
        return total_loss, sample_size, _step_logging_output(outputs, sample_size, model, criterion)

    def _note_skipped_validation(self, sample, active: Tuple[str, ...]) -> None:
        """Say once per modality that its validation batches are left out at this stage."""
        skipped = [name for name in MODALITIES if name in sample and name not in active
                   and name not in self._skipped_validation_modalities]
        if skipped:
            self._skipped_validation_modalities.update(skipped)
            logger.warning(f"validation at stage {self.stage_at(self.num_updates_seen)} leaves out the "
                           f"{' and '.join(skipped)} batches (active: {_objectives(active)}); stage 2 is "
                           f"validated from --stage2-start-update {self.cfg.stage2_start_update} on "
                           "(fairseq-validate: pass --stage2-start-update 0)")

    def build_criterion(self, cfg, from_checkpoint: bool = False):
        """fairseq's, and for ``slam_multitask`` a ``--best-checkpoint-metric`` that no validation
        logs is an error now rather than a run without a best checkpoint."""
        criterion = super().build_criterion(cfg, from_checkpoint)
        if hasattr(criterion, "log_validation_loss"):
            trained = set(self.stage1_modalities) | (set(self.stage2_modalities) if self.stage2_reachable else set())
            check_best_checkpoint_metric(self.cfg.best_checkpoint_metric, sorted(trained),
                                         pair_ctc=self.model_has_pair_ctc is not False)
        return criterion

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        """fairseq's; a validation's ``loss`` is the weighted sum of the objectives' means over the
        whole validation (``slam_multitask.log_validation_loss``), not a mean over its steps.
        fairseq's per-update leftovers in its metrics registry are dropped here (once an update)."""
        forget_finished_aggregators()
        if self._validating and hasattr(criterion, "log_validation_loss"):
            super().reduce_metrics([{key: value for key, value in log.items() if key != "loss"}
                                    for log in logging_outputs], criterion)
            criterion.log_validation_loss()
        else:
            super().reduce_metrics(logging_outputs, criterion)

    def begin_epoch(self, epoch, model) -> None:
        """At the first epoch this process trains, before it saves anything: rank 0 removes the
        unfinished checkpoint writes an earlier, killed process of this run left in the save dir
        (``checkpoint_recovery.remove_interrupted_writes_on_rank_zero``: a whole checkpoint each)."""
        super().begin_epoch(epoch, model)
        remove_interrupted_writes_on_rank_zero(self.cfg.save_dir, self.cfg.checkpoint_suffix)

    def begin_valid_epoch(self, epoch, model) -> None:
        """Before a validation whose stage does not log ``--best-checkpoint-metric`` (an objective
        of stage 2 during stage 1), fairseq's best is put aside until :meth:`post_validate`:
        fairseq-train reads the metric next to its best before the task sees the values."""
        super().begin_valid_epoch(epoch, model)
        from fairseq import checkpoint_utils

        metric = self.cfg.best_checkpoint_metric
        modality = metric_modality(metric) if isinstance(metric, str) else None
        if modality is not None and modality not in self.active_modalities(self.num_updates_seen) \
                and hasattr(checkpoint_utils.save_checkpoint, "best"):
            self._stashed_best = (checkpoint_utils.save_checkpoint.best,)
            del checkpoint_utils.save_checkpoint.best

    def post_validate(self, model, stats: Dict[str, Any], agg) -> None:
        """fairseq-train's hook between a validation and its use.

        A validation that held no example of an active modality (stage 1 when only pairs have
        validation data; told by ``slam_multitask``'s per-modality counts) reports its losses as
        None, not 0, so that it neither becomes ``checkpoint_best`` nor counts for ``--patience``
        (fairseq skips a None); a ``best_*`` value keeps the previous best. A
        ``--best-checkpoint-metric`` that this validation did not log (an objective of stage 2
        during stage 1) is None too, instead of fairseq's KeyError (:meth:`begin_valid_epoch`).
        The first validation of another stage than the scores so far restarts fairseq's best
        (:class:`~slam_fairseq.tasks.validation_scores.ValidationScores`)."""
        counts = [stats[key] for key in (f"nsentences_{name}" for name in MODALITIES) if key in stats]
        if counts and not any(float(count or 0) > 0 for count in counts):
            from fairseq import checkpoint_utils

            logger.warning(f"validation at update {self.num_updates_seen} held no example of the active "
                           f"modalities ({_objectives(self.active_modalities(self.num_updates_seen))}): "
                           "its loss is reported as None (not a score for checkpoint_best or --patience)")
            for key in [key for key in stats if not key.startswith("best_")
                        and (key == "loss" or key.endswith(("_loss", "_accuracy")))]:
                stats[key] = None
            for key in [key for key in stats if key.startswith("best_") and stats.get(key[len("best_"):], 0) is None]:
                stats[key] = getattr(checkpoint_utils.save_checkpoint, "best", None)
        metric = resolved_option(self.cfg.best_checkpoint_metric)
        if not metric:
            return  # not set by fairseq-train
        stats.setdefault(metric, None)
        if self._stashed_best is not None:  # put aside by begin_valid_epoch: this validation has no score
            from fairseq import checkpoint_utils

            (checkpoint_utils.save_checkpoint.best,), self._stashed_best = self._stashed_best, None
            stats[f"best_{metric}"] = checkpoint_utils.save_checkpoint.best
        self.validation_scores.validated(self.stage_at(self.num_updates_seen), stats, metric)
