"""fairseq's training-time audio augmentation drawn from a generator seeded per example.

fairseq 0.12's ``speech_to_text`` augmentations (SpecAugment, and the other random feature,
waveform and dataset transforms) draw from NumPy's global generator, whose state depends on
everything drawn before in that process and is saved in no checkpoint. So:

- a fine-tuning run killed and resumed draws other masks from the resumed position on than the
  run that was never stopped (its weights drift apart from the first update after the resume);
- ``--num-workers 0`` and ``--num-workers N`` draw other masks (each loader process seeds NumPy
  its own way).

:func:`install_augmentation_seeds` makes each training example draw its augmentation from NumPy's
global generator seeded by (``--seed``, epoch, example index) for the time of its ``__getitem__``,
and puts the generator's previous state back afterwards. An example's masks are then a function of
the run's seed, the epoch and the example alone: the same after a resume, in any loader process,
and different from epoch to epoch. The splits of ``--train-subset a,b`` draw from streams of
their own. An example drawn twice in one epoch (a ``ResamplingDataset`` with replacement) gets the
same masks both times. Evaluation splits (``is_train_split`` False) are read as fairseq reads
them; their transforms draw nothing.

Not covered: augmentations that draw in ``collater`` (fairseq's ``NoisyOverlapAugment``), and,
with ``--num-workers 0``, a draw of the main thread (fairseq seeding NumPy while it builds an
iterator) that falls inside an example's read in fairseq's ``BufferedIterator`` thread. A seeded
training dataset holds shared memory and cannot be pickled outside the start of a loader process.
"""
from __future__ import annotations

import multiprocessing
from typing import Iterator

import numpy as np

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_augmentation_seeds", "seed_training_augmentation", "AUGMENTATION_SEED_ATTRIBUTE"]

AUGMENTATION_SEED_ATTRIBUTE = "_slam_augmentation_seed"
_EPOCH_ATTRIBUTE = "_slam_augmentation_epoch"
_STREAM_ATTRIBUTE = "_slam_augmentation_stream"


def _speech_to_text_parts(dataset) -> Iterator[object]:
    """The ``SpeechToTextDataset`` objects inside ``dataset`` (itself, or the parts of a
    ``ConcatDataset`` and the datasets that ``ResamplingDataset`` wraps)."""
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset

    if isinstance(dataset, SpeechToTextDataset):
        yield dataset
    for part in getattr(dataset, "datasets", None) or ([dataset.dataset] if hasattr(dataset, "dataset") else []):
        yield from _speech_to_text_parts(part)


def seed_training_augmentation(dataset, seed: int, epoch: int = 1) -> None:
    """Make the training ``SpeechToTextDataset`` parts of ``dataset`` draw their augmentation per
    example from (``seed``, epoch, index) (module docstring).

    The epoch is kept in shared memory: fairseq 0.12 keeps one ``DataLoader`` with persistent
    workers for all epochs, so the copies of the dataset in its loader processes never see a later
    ``set_epoch``; they read the epoch the training process writes there."""
    for number, part in enumerate(_speech_to_text_parts(dataset)):
        if getattr(part, "is_train_split", False):
            setattr(part, AUGMENTATION_SEED_ATTRIBUTE, int(seed))
            setattr(part, _EPOCH_ATTRIBUTE, multiprocessing.RawValue("q", int(epoch)))
            # the splits of --train-subset a,b: example i of each draws from a stream of its own
            setattr(part, _STREAM_ATTRIBUTE, (number,) if number else ())


def _epoch(dataset) -> int:
    held = getattr(dataset, _EPOCH_ATTRIBUTE, 1)
    return int(held.value) if hasattr(held, "value") else int(held)


def _example_seed(seed: int, epoch: int, index: int, stream=()) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, *stream]).generate_state(1)[0])


def _seeded_getitem(getitem):
    def getitem_seeded_per_example(self, index):
        seed = getattr(self, AUGMENTATION_SEED_ATTRIBUTE, None)
        if seed is None or not getattr(self, "is_train_split", False):
            return getitem(self, index)
        state = np.random.get_state()
        np.random.seed(_example_seed(seed, _epoch(self), int(index), getattr(self, _STREAM_ATTRIBUTE, ())))
        try:
            return getitem(self, index)
        finally:
            np.random.set_state(state)

    getitem_seeded_per_example.__doc__ = getitem.__doc__
    return getitem_seeded_per_example


def _recording_epoch(set_epoch):
    def set_epoch_and_record(self, epoch):
        held = getattr(self, _EPOCH_ATTRIBUTE, None)
        if hasattr(held, "value") and getattr(self, "is_train_split", False):
            held.value = int(epoch)
        else:  # an evaluation view copied from a training dataset must not move training's epoch
            setattr(self, _EPOCH_ATTRIBUTE, int(epoch))
        return set_epoch(self, epoch)

    set_epoch_and_record.__doc__ = set_epoch.__doc__
    return set_epoch_and_record


def _seeding_created_datasets(from_tsv):
    def from_tsv_seeded(cls, *args, **kwargs):
        dataset = from_tsv(cls, *args, **kwargs)
        names = ("root", "cfg", "splits", "tgt_dict", "pre_tokenizer", "bpe_tokenizer", "is_train_split", "epoch",
                 "seed")
        given = dict(zip(names, args), **kwargs)
        if given.get("is_train_split") and given.get("seed") is not None:
            seed_training_augmentation(dataset, given["seed"], given.get("epoch") or 1)
        return dataset

    return classmethod(from_tsv_seeded)


def install_augmentation_seeds() -> bool:
    """Patch fairseq's ``SpeechToTextDataset`` and its creator as the module docstring says.
    Idempotent; returns True when it patched, False when it had been installed already."""
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset, SpeechToTextDatasetCreator

    patched = wrap_once(SpeechToTextDataset, "__getitem__", _seeded_getitem)
    patched = wrap_once(SpeechToTextDataset, "set_epoch", _recording_epoch) or patched
    creator = vars(SpeechToTextDatasetCreator)["from_tsv"].__func__
    return wrap_once(SpeechToTextDatasetCreator, "from_tsv",
                     lambda bound: _seeding_created_datasets(creator)) or patched
