"""Text-only pre-training data (``text_<split>.{bin,idx}`` or ``text_<split>.txt``) with span masks.

Sources, in this order of preference:

- ``text_<split>.bin/.idx``: SentencePiece ids binarized under the data dictionary (fairseq's
  indexed dataset, loaded with ``data_utils.load_indexed_dataset``; ``fairseq-preprocess``
  appends eos to every line);
- ``text_<split>.txt``: one utterance a line, encoded on load with the config's SentencePiece
  model, eos appended (for small corpora; everything is held in memory, packed).

Checks: a source without a single line is an error; empty lines (nothing but eos) are skipped and
counted in a logged warning; an id outside the dictionary (the data was binarized with another,
larger dictionary) is an error at load naming the file and the line: ``.bin`` files are scanned
whole up to :data:`SCAN_BYTES_AT_LOAD` and in evenly spaced windows beyond it. A line read later
holding such an id (in the part of a larger file the load did not scan) is a bad row: left out,
counted against ``--max-bad-rows``. Texts longer than ``--max-text-positions`` are skipped (and
counted) when batches are made, by the task.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from slam_formats.indexed_text import scan_token_ids
from slam_formats.manifest import ManifestError, not_utf8_error
from slam_formats.packed import PackedSequences
from slam_formats.names import text_prefix_name
from slam_fairseq.data.pretraining.collate import collate_tokens, real_token_counts, target_index
from slam_fairseq.data.pretraining.modality import PretrainingModalityDataset
from slam_fairseq.data.pretraining.row_checks import BadRowError
from slam_fairseq.data.pretraining.seeding import TEXT_SPAN_MASK, masking_rng
from slam_fairseq.data.pretraining.span_masks import SpanMaskingSettings, TextVocabulary, mask_text

logger = logging.getLogger(__name__)

SCAN_BYTES_AT_LOAD = 1 << 31  # a .bin up to 2 GiB (about 1e9 ids) is checked whole at load

__all__ = ["TokenSequences", "text_source_paths", "load_text_tokens", "PretrainingTextDataset",
           "collate_tokens", "check_token_ids"]


class TokenSequences:
    """Token id sequences with their lengths, backed by a fairseq indexed dataset or by a list.

    Args:
        name: the file they come from (for messages).
        source: an indexed dataset or packed sequences (anything with ``sizes`` and indexing, or a
            list of (L,) int arrays).
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
        empty = len(sizes) - len(keep)
        logger.warning(f"{name}: skipped {empty} empty line{'s' if empty > 1 else ''} (of {len(sizes)} lines)")
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
        _scan_at_load(str(paths["prefix"]), name, len(dictionary))
        source = data_utils.load_indexed_dataset(str(paths["prefix"]), dictionary, dataset_impl="mmap")
        if source is None:
            raise ManifestError(f"{name}: cannot be read as fairseq's mmap indexed dataset")
        return TokenSequences(name, source, _non_empty(name, np.asarray(source.sizes)))
    if paths["txt"].is_file():
        name = str(paths["txt"])
        try:
            with open(paths["txt"], encoding="utf-8") as handle:
                lines = [line.strip() for line in handle]
        except UnicodeDecodeError as error:
            raise not_utf8_error(name, error) from None
        encoded = PackedSequences.from_arrays(encode_lines(lines))
        return TokenSequences(name, encoded, _non_empty(name, encoded.sizes))
    return None


def _outside_message(name: str, line: int, token_id: int, vocab_size: int) -> str:
    return (f"{name}: line {line} holds token id {token_id} outside the dictionary of {vocab_size} symbols: "
            f"was it binarized with another dictionary?")


def _scan_at_load(prefix: str, name: str, vocab_size: int) -> None:
    try:
        scan = scan_token_ids(prefix, vocab_size, max_bytes=SCAN_BYTES_AT_LOAD)
    except (ValueError, OSError) as error:
        raise ManifestError(f"{name}: cannot be scanned as fairseq's mmap indexed dataset ({error})") from error
    if scan.tokens_total == 0:
        raise ManifestError(f"{name}: empty text (no tokens)")
    if scan.first_outside is not None:
        raise ManifestError(_outside_message(name, *scan.first_outside, vocab_size))
    if scan.tokens_checked < scan.tokens_total:
        logger.info(f"{name}: checked {scan.tokens_checked:,} of {scan.tokens_total:,} token ids against the "
                    f"dictionary at load (evenly spaced windows); the others are checked as they are read")


def check_token_ids(tokens: np.ndarray, vocab_size: int, name: str, index: int) -> None:
    """Raise :class:`BadRowError` when an id is outside the dictionary (a line the load-time scan
    did not reach, of a file binarized with another dictionary)."""
    if not len(tokens):
        return
    largest, smallest = int(tokens.max()), int(tokens.min())
    if largest >= vocab_size or smallest < 0:
        outside = largest if largest >= vocab_size else smallest
        raise BadRowError(_outside_message(name, index, outside, vocab_size), source=name, row=f"line {index}")


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
