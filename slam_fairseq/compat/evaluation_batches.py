"""Every utterance of an evaluation split is decoded and validated, whatever the batch multiple.

fairseq 0.12's ``data_utils.batch_by_size`` drops the last batch when its size is not a multiple
of ``--required-batch-size-multiple`` (8 by default). For training that is a few utterances an
epoch; for ``fairseq-generate`` and validation it scores a subset without a word (13 test
utterances in batches of at most 5 decode 10; under 8 utterances decode none, and fairseq-generate
then fails with ZeroDivisionError).

:func:`install_evaluation_batches` wraps ``SpeechToTextDataset.batch_by_size``: for a split that
is not a training split (``is_train_split``: fairseq's ``speech_to_text`` says so of every split
whose name does not start with ``train``) batches are made with a multiple of 1, and an INFO line
says how many utterances that keeps which fairseq would have left out, once per split and
process. Training splits are batched as fairseq batches them.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Set

__all__ = ["install_evaluation_batches"]

logger = logging.getLogger(__name__)

_INSTALLED_MARK = "_slam_fairseq_evaluation_batches"
_NAMED: Set[str] = set()


def _keeping_every_evaluation_row(fairseq_batch_by_size: Callable) -> Callable:
    @functools.wraps(fairseq_batch_by_size)
    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        if getattr(self, "is_train_split", True) or required_batch_size_multiple <= 1:
            return fairseq_batch_by_size(self, indices, max_tokens, max_sentences, required_batch_size_multiple)
        batches = fairseq_batch_by_size(self, indices, max_tokens, max_sentences, 1)
        split = str(getattr(self, "split", "?"))
        if split not in _NAMED:
            _NAMED.add(split)
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
    """Wrap ``SpeechToTextDataset.batch_by_size`` as the module docstring says. Idempotent;
    returns True when it wrapped, False when it had been installed already."""
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset

    if getattr(SpeechToTextDataset, _INSTALLED_MARK, False):
        return False
    SpeechToTextDataset.batch_by_size = _keeping_every_evaluation_row(SpeechToTextDataset.batch_by_size)
    setattr(SpeechToTextDataset, _INSTALLED_MARK, True)
    return True
