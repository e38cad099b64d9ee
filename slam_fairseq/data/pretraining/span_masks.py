"""SpanBERT-style span masking of token ids, with BERT's 80/10/10 replacement.

Used for the text-only objective (15% of tokens, spans of 5) and for the text side of TLM (50%).

How a mask is drawn for a sequence of ``n`` maskable tokens (the trailing end-of-sentence is never
masked):

1. the budget is ``floor(mask_prob * n + u)`` tokens with ``u ~ U[0, 1)``, so the expected masked
   fraction is exactly ``mask_prob`` (fairseq's ``MaskTokensDataset`` rounds the same way);
2. span lengths: ``fixed`` (default) cuts the budget into spans of ``span_length`` (one shorter
   span takes the remainder); ``geometric`` draws SpanBERT's lengths, ``Geometric(p)`` restricted
   to ``1 .. max_span_length`` and renormalised as SpanBERT's code does (p = 0.2, max 10: mean
   3.8), the last one cut to fit the budget;
3. the spans and the unmasked tokens are put in a uniformly random order: spans never overlap,
   may touch, and exactly ``budget`` tokens are masked;
4. every masked token is replaced by ``<mask>`` (80%), a random ordinary token (10%) or kept
   (10%); the target holds the original id at masked positions and pad elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

__all__ = ["SpanMaskingSettings", "TextVocabulary", "draw_spans", "spans_to_mask", "span_mask",
           "bert_corrupt", "mask_text", "SPAN_DISTRIBUTIONS"]

SPAN_DISTRIBUTIONS = ("fixed", "geometric")


@dataclass(frozen=True)
class SpanMaskingSettings:
    """
    Args:
        mask_prob: expected fraction of maskable tokens to mask (0.15 text-only, 0.5 TLM).
        span_length: span length for the ``fixed`` distribution.
        distribution: ``fixed`` or ``geometric`` (SpanBERT).
        geometric_p: success probability of the geometric distribution.
        max_span_length: longest geometric span (longer lengths are never drawn).
        random_token_prob: share of masked tokens replaced by a random token (BERT: 0.1).
        leave_unmasked_prob: share of masked tokens left as they are (BERT: 0.1).
    """

    mask_prob: float = 0.15
    span_length: int = 5
    distribution: str = "fixed"
    geometric_p: float = 0.2
    max_span_length: int = 10
    random_token_prob: float = 0.1
    leave_unmasked_prob: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask probability must be in [0, 1], got {self.mask_prob}")
        if self.distribution not in SPAN_DISTRIBUTIONS:
            raise ValueError(f"span distribution must be one of {SPAN_DISTRIBUTIONS}, got {self.distribution!r}")
        if self.span_length < 1 or self.max_span_length < 1:
            raise ValueError(f"span lengths must be >= 1, got {self.span_length} and {self.max_span_length}")
        if not 0.0 < self.geometric_p <= 1.0:
            raise ValueError(f"geometric p must be in (0, 1], got {self.geometric_p}")
        if self.random_token_prob < 0 or self.leave_unmasked_prob < 0 or \
                self.random_token_prob + self.leave_unmasked_prob > 1.0:
            raise ValueError("random-token and leave-unmasked probabilities must be >= 0 and sum to <= 1, "
                             f"got {self.random_token_prob} and {self.leave_unmasked_prob}")


@dataclass(frozen=True)
class TextVocabulary:
    """The ids masking needs. Random replacements are drawn uniformly from the ordinary tokens
    ``[num_special, size)`` except ``<mask>``."""

    pad: int
    eos: int
    mask: int
    num_special: int
    size: int

    @classmethod
    def from_dictionary(cls, dictionary) -> "TextVocabulary":
        """From a fairseq ``Dictionary`` that holds ``<mask>``."""
        mask = dictionary.index("<mask>")
        if mask == dictionary.unk():
            raise ValueError("the dictionary has no <mask> symbol")
        return cls(pad=dictionary.pad(), eos=dictionary.eos(), mask=mask,
                   num_special=dictionary.nspecial, size=len(dictionary))


def _span_lengths(budget: int, rng: np.random.Generator, settings: SpanMaskingSettings) -> np.ndarray:
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    if settings.distribution == "fixed":
        full, remainder = divmod(budget, settings.span_length)
        lengths = [settings.span_length] * full + ([remainder] if remainder else [])
        lengths = np.asarray(lengths, dtype=np.int64)
        rng.shuffle(lengths)  # the short span is anywhere, not always last
        return lengths
    choices = np.arange(1, settings.max_span_length + 1)
    weights = settings.geometric_p * (1.0 - settings.geometric_p) ** (choices - 1)
    drawn = rng.choice(choices, size=budget, p=weights / weights.sum())  # never more than budget spans
    cut = int(np.searchsorted(np.cumsum(drawn), budget))
    drawn = drawn[: cut + 1].astype(np.int64)
    drawn[-1] -= int(drawn.sum()) - budget
    return drawn


def draw_spans(num_tokens: int, rng: np.random.Generator,
               settings: SpanMaskingSettings) -> Tuple[np.ndarray, np.ndarray]:
    """Spans to mask in a sequence of ``num_tokens`` maskable tokens.

    Returns:
        (starts, lengths): two (S,) int64 arrays, sorted by start; spans do not overlap.
    """
    if num_tokens <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    budget = int(np.floor(settings.mask_prob * num_tokens + rng.random()))
    budget = min(budget, num_tokens)
    lengths = _span_lengths(budget, rng, settings)
    num_spans, num_unmasked = len(lengths), num_tokens - budget
    if num_spans == 0:
        return np.zeros(0, dtype=np.int64), lengths
    # A uniformly random order of num_spans span blocks and num_unmasked single tokens.
    slots = np.sort(rng.choice(num_spans + num_unmasked, size=num_spans, replace=False))
    tokens_before = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    starts = slots - np.arange(num_spans) + tokens_before
    return starts.astype(np.int64), lengths


def spans_to_mask(num_tokens: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(num_tokens,) bool, True inside the spans."""
    boundaries = np.zeros(num_tokens + 1, dtype=np.int64)
    np.add.at(boundaries, starts, 1)
    np.add.at(boundaries, starts + lengths, -1)
    return np.cumsum(boundaries[:-1]) > 0


def span_mask(num_tokens: int, rng: np.random.Generator, settings: SpanMaskingSettings) -> np.ndarray:
    """(num_tokens,) bool mask drawn as described in the module docstring."""
    starts, lengths = draw_spans(num_tokens, rng, settings)
    return spans_to_mask(num_tokens, starts, lengths)


def bert_corrupt(tokens: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 vocabulary: TextVocabulary,
                 settings: SpanMaskingSettings) -> Tuple[np.ndarray, np.ndarray]:
    """BERT replacement of the masked positions.

    Args:
        tokens: (L,) int ids.
        mask: (L,) bool, positions to predict.
    Returns:
        (source, target): (L,) int64 each; source has the replacements, target the original ids at
        masked positions and pad elsewhere.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    source = tokens.copy()
    target = np.full_like(tokens, vocabulary.pad)
    target[mask] = tokens[mask]
    positions = np.flatnonzero(mask)
    if len(positions) == 0:
        return source, target
    choice = rng.random(len(positions))
    to_random = choice < settings.random_token_prob
    to_keep = ~to_random & (choice < settings.random_token_prob + settings.leave_unmasked_prob)
    to_mask = ~to_random & ~to_keep
    source[positions[to_mask]] = vocabulary.mask
    num_ordinary = vocabulary.size - vocabulary.num_special - 1  # without <mask>
    if to_random.any() and num_ordinary > 0:
        random_ids = rng.integers(vocabulary.num_special, vocabulary.num_special + num_ordinary,
                                  size=int(to_random.sum()))
        random_ids = np.where(random_ids >= vocabulary.mask, random_ids + 1, random_ids)
        source[positions[to_random]] = random_ids
    elif to_random.any():
        source[positions[to_random]] = vocabulary.mask
    return source, target


def mask_text(tokens: np.ndarray, rng: np.random.Generator, vocabulary: TextVocabulary,
              settings: SpanMaskingSettings) -> Tuple[np.ndarray, np.ndarray]:
    """Span-mask and BERT-corrupt one token sequence; a trailing end-of-sentence is never masked.

    Args:
        tokens: (L,) ids, usually ending with eos.
    Returns:
        (source, target) as :func:`bert_corrupt`.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    num_maskable = len(tokens) - 1 if len(tokens) and tokens[-1] == vocabulary.eos else len(tokens)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[:num_maskable] = span_mask(num_maskable, rng, settings)
    return bert_corrupt(tokens, mask, rng, vocabulary, settings)
