"""Text-only pre-training data (``text_<split>.{bin,idx}`` or ``text_<split>.txt``) with span masks.

Sources, in this order of preference:

- ``text_<split>.bin/.idx``: SentencePiece ids binarized under the data dictionary (fairseq's
  indexed dataset, loaded with ``data_utils.load_indexed_dataset``; ``fairseq-preprocess``
  appends eos to every line);
- ``text_<split>.txt``: one utterance a line, encoded on load with the config's SentencePiece
  model, eos appended (for small corpora; everything is held in memory).

Checks: a source without a single line is an error; empty lines (nothing but eos) are skipped and
counted in a logged warning; an id outside the dictionary is an error naming the file (the data
was binarized with another dictionary). Texts longer than ``--max-text-positions`` are skipped
(and counted) when batches are made, by the task.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from slam_formats.manifest import ManifestError
from slam_formats.names import text_prefix_name
from slam_fairseq.data.pretraining.collate import collate_tokens, real_token_counts, target_index
from slam_fairseq.data.pretraining.modality import PretrainingModalityDataset
from slam_fairseq.data.pretraining.seeding import TEXT_SPAN_MASK, masking_rng
from slam_fairseq.data.pretraining.span_masks import SpanMaskingSettings, TextVocabulary, mask_text

logger = logging.getLogger(__name__)

__all__ = ["TokenSequences", "text_source_paths", "load_text_tokens", "PretrainingTextDataset",
           "collate_tokens", "check_token_ids"]


class TokenSequences:
    """Token id sequences with their lengths, backed by a fairseq indexed dataset or by a list.

    Args:
        name: the file they come from (for messages).
        source: an indexed dataset or a list of (L,) int arrays.
        keep: indices of ``source`` to expose (empty lines left out).
    """

    def __init__(self, name: str, source, keep: np.ndarray) -> None:
        self.name = name
        self.source = source
        self.keep = np.asarray(keep, dtype=np.int64)
        sizes = np.asarray(source.sizes if hasattr(source, "sizes") else [len(x) for x in source])
        self.sizes = sizes[self.keep].astype(np.int64)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> np.ndarray:
        item = self.source[int(self.keep[index])]
        return item.numpy() if torch.is_tensor(item) else np.asarray(item)


def text_source_paths(data_dir: str, split: str) -> Dict[str, Path]:
    prefix = Path(data_dir) / text_prefix_name(split)
    return {"bin": prefix.with_suffix(".bin"), "idx": prefix.with_suffix(".idx"),
            "txt": prefix.with_suffix(".txt"), "prefix": prefix}


def _non_empty(name: str, sizes: np.ndarray) -> np.ndarray:
    if len(sizes) == 0:
        raise ManifestError(f"{name}: empty text (no lines)")
    keep = np.flatnonzero(sizes > 1)
    if len(keep) < len(sizes):
        logger.warning(f"{name}: skipped {len(sizes) - len(keep)} of {len(sizes)} empty lines")
    if len(keep) == 0:
        raise ManifestError(f"{name}: every line is empty")
    return keep


def load_text_tokens(data_dir: str, split: str, dictionary, encode_lines) -> Optional[TokenSequences]:
    """The split's text, or None when neither ``.bin/.idx`` nor ``.txt`` exists.

    Args:
        dictionary: the data dictionary (with ``<mask>``).
        encode_lines: ``PretrainingDataConfig.encode_lines`` (for ``.txt``).
    """
    from fairseq.data import data_utils

    paths = text_source_paths(data_dir, split)
    if paths["bin"].is_file() and paths["idx"].is_file():
        name = str(paths["bin"])
        source = data_utils.load_indexed_dataset(str(paths["prefix"]), dictionary, dataset_impl="mmap")
        if source is None:
            raise ManifestError(f"{name}: cannot be read as fairseq's mmap indexed dataset")
        tokens = TokenSequences(name, source, _non_empty(name, np.asarray(source.sizes)))
        check_token_ids(tokens[0], len(dictionary), name, 0)
        return tokens
    if paths["txt"].is_file():
        name = str(paths["txt"])
        with open(paths["txt"], encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        encoded = encode_lines(lines)
        sizes = np.asarray([len(x) for x in encoded])
        return TokenSequences(name, encoded, _non_empty(name, sizes))
    return None


def check_token_ids(tokens: np.ndarray, vocab_size: int, name: str, index: int) -> None:
    """Raise when an id is outside the dictionary (the file was made with another dictionary)."""
    if len(tokens) and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        raise ManifestError(f"{name}: line {index} holds token id {int(tokens.max())} outside the dictionary "
                            f"of {vocab_size} symbols: was it binarized with another dictionary?")


class PretrainingTextDataset(PretrainingModalityDataset):
    """Text only -> span masking. Items: ``id``, ``source`` (masked ids), ``target``.

    Args:
        tokens: from :func:`load_text_tokens`.
        vocabulary: pad/eos/mask ids and the range of random replacements.
        masking: span masking (15%, spans of 5, 80/10/10 by default).
        seed: the run's seed.
    """

    modality = "text"

    def __init__(self, tokens: TokenSequences, vocabulary: TextVocabulary,
                 masking: SpanMaskingSettings, seed: int) -> None:
        super().__init__(seed)
        self.tokens = tokens
        self.vocabulary = vocabulary
        self.masking = masking
        self.sizes = tokens.sizes
        self.name = tokens.name

    def max_size_exceeded(self, max_positions) -> np.ndarray:
        return self.sizes > max_positions[1]

    def get_item(self, index: int, epoch: int) -> Dict[str, Any]:
        tokens = self.tokens[index]
        check_token_ids(tokens, self.vocabulary.size, self.name, int(self.tokens.keep[index]))
        rng = masking_rng(self.seed, epoch, index, TEXT_SPAN_MASK)
        source, target = mask_text(tokens, rng, self.vocabulary, self.masking)
        return {"id": index, "source": torch.from_numpy(source), "target": torch.from_numpy(target)}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            return {}
        pad = self.vocabulary.pad
        sources = [item["source"] for item in samples]
        target = collate_tokens([item["target"] for item in samples], pad)
        return {
            "id": torch.tensor([item["id"] for item in samples], dtype=torch.long),
            "tokens": collate_tokens(sources, pad),
            "target": target,
            "target_index": target_index(target, pad),
            "lengths_on_host": {"text": real_token_counts(sources, pad)},
            "ntokens": int(sum(len(source) for source in sources)),
        }
