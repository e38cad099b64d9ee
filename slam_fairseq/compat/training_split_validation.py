"""Validating on the training split (``--valid-subset valid,train``) leaves training as it was.

fairseq 0.12's ``Trainer.get_valid_iterator(subset)`` asks the task for a batch iterator over
``task.dataset(subset)`` with the iterator cache on. For the training split that dataset is the
one being trained on, and fairseq's tasks cache one ``EpochBatchIterator`` per dataset, so the
validation gets the training iterator itself. ``next_epoch_itr`` on it then starts the training
epoch over: the dry-run validation before the first update moves training into epoch 2, every
later validation of ``train`` restarts the epoch's position, and the checkpoints record those
positions, so a resumed run skips or repeats batches. The training losses differ from a run that
validates on ``valid`` alone from the first update on.

:func:`install_training_split_validation` wraps ``Trainer.get_valid_iterator``: the training split
is validated through an *evaluation view* of it, a dataset of its own over the same examples, read
as an evaluation split is read, so the training iterator, its batches and its random draws are left
alone:

- ``slam_pretraining`` makes its own (``SlamPretrainingTask.evaluation_view``: every batch of every
  modality once, the masks of epoch 1, as its ``valid`` split is read);
- for fairseq's ``speech_to_text`` it is a copy of the ``SpeechToTextDataset`` as an evaluation
  split (:func:`speech_to_text_evaluation_view`): the config's transforms for evaluation (``_eval``)
  instead of ``_train``'s (a validation reads the examples as they are, without SpecAugment; its
  copy keeps no hold on training's augmentation epoch, :mod:`slam_fairseq.compat.augmentation_seeds`),
  no shuffling. Any other validation subset whose name makes fairseq read
  it as a training split (``--valid-subset dev,train_small``) is read through such a view too;
- any other task gets the training dataset with the iterator cache off: a fresh iterator for every
  validation, which sets the training dataset's epoch to 1 (harmless for datasets that ignore
  ``set_epoch``; ``ResamplingDataset`` or ``MaskTokensDataset`` would draw epoch 1's samples for
  the rest of the epoch).

Training drops examples longer than the model's positions (``ignore_invalid_inputs``); the
validation of the training split skips those too, whatever ``--skip-invalid-size-inputs-valid-test``
says. (Training also drops examples longer than ``--max-tokens``; validation batches by
``--max-tokens-valid`` and fails on a longer one, as for any validation subset.)

``fairseq-generate`` and ``fairseq-validate`` over a training split (``--gen-subset train_asr``) read
it through the same view (:func:`install_checkpoint_evaluation_splits`): fairseq's
``speech_to_text`` calls every split whose name starts with ``train`` a training split and applies
its SpecAugment, so the hypotheses of a training split were decoded from masked features. Both
tools load their split with the checkpoint's task config (``load_dataset(..., task_cfg=...)``),
which ``fairseq-train`` never passes; that is how a load for evaluation is told apart.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_training_split_validation", "install_checkpoint_evaluation_splits",
           "speech_to_text_evaluation_view", "loaded_for_checkpoint_evaluation"]

logger = logging.getLogger(__name__)

_VIEW_ATTRIBUTE = "_slam_fairseq_evaluation_view"


def speech_to_text_evaluation_view(dataset):
    """A ``SpeechToTextDataset`` of a training split read as an evaluation split: the same rows,
    the config's evaluation transforms, no shuffling; made once per dataset (kept on it).
    Anything else, an evaluation split included, is returned as it is."""
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset
    from fairseq.data.audio.dataset_transforms import CompositeAudioDatasetTransform
    from fairseq.data.audio.feature_transforms import CompositeAudioFeatureTransform
    from fairseq.data.audio.waveform_transforms import CompositeAudioWaveformTransform

    if not isinstance(dataset, SpeechToTextDataset) or not dataset.is_train_split:
        return dataset
    view = vars(dataset).get(_VIEW_ATTRIBUTE)
    if view is None:
        view = copy.copy(dataset)
        view.is_train_split, view.shuffle = False, False
        split, config = dataset.split, dataset.cfg
        view.feature_transforms = CompositeAudioFeatureTransform.from_config_dict(
            config.get_feature_transforms(split, False))
        view.waveform_transforms = CompositeAudioWaveformTransform.from_config_dict(
            config.get_waveform_transforms(split, False))
        view.dataset_transforms = CompositeAudioDatasetTransform.from_config_dict(
            config.get_dataset_transforms(split, False))
        setattr(dataset, _VIEW_ATTRIBUTE, view)
    return view


@contextmanager
def _skipping_invalid_sizes(dataset_cfg) -> Iterator[None]:
    """``skip_invalid_size_inputs_valid_test`` set for the duration (fairseq's validation passes
    it as ``ignore_invalid_inputs``); a read-only OmegaConf node is written through ``read_write``."""
    from omegaconf import DictConfig, read_write

    def writable():
        return read_write(dataset_cfg) if isinstance(dataset_cfg, DictConfig) else contextlib.nullcontext()

    with writable():
        before = dataset_cfg.skip_invalid_size_inputs_valid_test
        dataset_cfg.skip_invalid_size_inputs_valid_test = True
    try:
        yield
    finally:
        with writable():
            dataset_cfg.skip_invalid_size_inputs_valid_test = before


def _leaving_training_alone(fairseq_get_valid_iterator: Callable) -> Callable:
    @functools.wraps(fairseq_get_valid_iterator)
    def get_valid_iterator(self, subset, disable_iterator_cache=False):
        task = self.task
        datasets = getattr(task, "datasets", {})
        if subset not in datasets:
            return fairseq_get_valid_iterator(self, subset, disable_iterator_cache)
        loaded = datasets[subset]
        is_training_split = subset == self.cfg.dataset.train_subset
        view_of = getattr(task, "evaluation_view", None)
        # a speech_to_text validation subset named train* is read as a training split by fairseq too
        view = view_of(subset) if view_of is not None and is_training_split else _evaluation_view_of_loaded(loaded)
        if view is loaded and not is_training_split:
            return fairseq_get_valid_iterator(self, subset, disable_iterator_cache)
        with _skipping_invalid_sizes(self.cfg.dataset):
            if view is loaded:
                return fairseq_get_valid_iterator(self, subset, disable_iterator_cache=True)
            datasets[subset] = view
            try:
                return fairseq_get_valid_iterator(self, subset, disable_iterator_cache)
            finally:
                datasets[subset] = loaded

    return get_valid_iterator


def loaded_for_checkpoint_evaluation(load_dataset_kwargs: dict) -> bool:
    """True for a ``load_dataset`` call of ``fairseq-generate`` / ``fairseq-validate`` (they pass
    the checkpoint's ``task_cfg``; ``fairseq-train`` does not)."""
    return load_dataset_kwargs.get("task_cfg") is not None


def _evaluation_view_of_loaded(dataset):
    """:func:`speech_to_text_evaluation_view` of an S2T dataset, or of each part of a ``--gen-subset
    a,b`` concatenation (a part fairseq resampled, ``sampling_alpha`` != 1 for training splits,
    is replaced by the view of its whole split: evaluation reads every row once); anything else
    as it is."""
    from fairseq.data import ConcatDataset, ResamplingDataset

    if isinstance(dataset, ConcatDataset):
        parts = [speech_to_text_evaluation_view(part.dataset if isinstance(part, ResamplingDataset) else part)
                 for part in dataset.datasets]
        if all(part is original for part, original in zip(parts, dataset.datasets)):
            return dataset
        return ConcatDataset(parts, dataset.sample_ratios)
    return speech_to_text_evaluation_view(dataset)


def _evaluating_training_splits_as_evaluation_splits(fairseq_load_dataset: Callable) -> Callable:
    @functools.wraps(fairseq_load_dataset)
    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        result = fairseq_load_dataset(self, split, epoch, combine, **kwargs)
        if loaded_for_checkpoint_evaluation(kwargs) and split in self.datasets:
            loaded = self.datasets[split]
            view = _evaluation_view_of_loaded(loaded)
            if view is not loaded:
                self.datasets[split] = view
                logger.info(f"{split}: read as an evaluation split (the config's transforms for evaluation, "
                            "not _train's SpecAugment; no shuffling), not as the training split its name makes it")
        return result

    return load_dataset


def install_checkpoint_evaluation_splits() -> bool:
    """Wrap ``SpeechToTextTask.load_dataset`` as the module docstring says (its subclasses, the
    plugin's ``slam_speech_to_text`` included, inherit it). Idempotent; returns True when it
    wrapped, False when it had been installed already."""
    from fairseq.tasks.speech_to_text import SpeechToTextTask

    return wrap_once(SpeechToTextTask, "load_dataset", _evaluating_training_splits_as_evaluation_splits)


def install_training_split_validation() -> bool:
    """Wrap ``fairseq.trainer.Trainer.get_valid_iterator`` as the module docstring says.
    Idempotent; returns True when it wrapped, False when it had been installed already."""
    from fairseq.trainer import Trainer

    return wrap_once(Trainer, "get_valid_iterator", _leaving_training_alone)
