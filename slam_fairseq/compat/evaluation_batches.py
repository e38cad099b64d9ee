"""Every utterance of an evaluation split is decoded and validated, whatever the batch multiple.

fairseq 0.12's ``data_utils.batch_by_size`` drops the last batch when its size is not a multiple
of ``--required-batch-size-multiple`` (8 by default). For training that is a few utterances an
epoch; for ``fairseq-generate`` and validation it scores a subset without a word (13 test
utterances in batches of at most 5 decode 10; under 8 utterances decode none, and fairseq-generate
then fails with ZeroDivisionError).

:func:`install_evaluation_batches` wraps ``SpeechToTextDataset.batch_by_size`` (and fairseq's
``ConcatDataset``'s, for ``--gen-subset a,b``): for a split that is not a training split, batches
are made with a multiple of 1, and an INFO line says how many utterances that keeps which fairseq
would have left out, once per dataset. A training split is what fairseq's ``speech_to_text`` calls
one (``is_train_split``: a split whose name starts with ``train``, the same rule that decides its
SpecAugment and shuffling); those are batched as fairseq batches them.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Set

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_evaluation_batches"]

logger = logging.getLogger(__name__)

_NAMED: Set[str] = set()


def _evaluation_split(dataset) -> Optional[str]:
    """The name of the S2T evaluation split(s) ``dataset`` holds (``a,b`` for a ``--gen-subset a,b``
    concatenation), or None for anything else (a training split, other datasets)."""
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset

    parts = getattr(dataset, "datasets", None) if not isinstance(dataset, SpeechToTextDataset) else [dataset]
    if not parts or not all(isinstance(part, SpeechToTextDataset) and not part.is_train_split for part in parts):
        return None
    return ",".join(str(part.split) for part in parts)


def _keeping_every_evaluation_row(fairseq_batch_by_size: Callable) -> Callable:
    @functools.wraps(fairseq_batch_by_size)
    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        split = _evaluation_split(self) if required_batch_size_multiple > 1 else None
        if split is None:
            return fairseq_batch_by_size(self, indices, max_tokens, max_sentences, required_batch_size_multiple)
        batches = fairseq_batch_by_size(self, indices, max_tokens, max_sentences, 1)
        key = f"{id(self)}:{split}"
        if key not in _NAMED:
            _NAMED.add(key)
            kept = sum(len(batch) for batch in batches)
            dropped = kept - sum(len(batch) for batch in fairseq_batch_by_size(
                self, indices, max_tokens, max_sentences, required_batch_size_multiple))
            if dropped:
                logger.info(f"{split}: batched with a multiple of 1, not --required-batch-size-multiple "
                            f"{required_batch_size_multiple}, so that all {kept} utterances are evaluated "
                            f"(fairseq would leave out the last {dropped})")
        return batches

    return batch_by_size


def install_evaluation_batches() -> bool:
    """Wrap the ``batch_by_size`` of ``SpeechToTextDataset`` and of fairseq's ``ConcatDataset``
    (``--gen-subset a,b``) as the module docstring says. Idempotent; returns True when it wrapped,
    False when it had been installed already."""
    from fairseq.data import ConcatDataset
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset

    wrapped = [wrap_once(dataset_class, "batch_by_size", _keeping_every_evaluation_row)
               for dataset_class in (SpeechToTextDataset, ConcatDataset)]
    return any(wrapped)
