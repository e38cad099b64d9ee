"""``--no-repeat-ngram-size`` that works without fairseq's CUDA extension.

fairseq 0.12's beam search hands :class:`fairseq.ngram_repeat_block.NGramRepeatBlock` its whole
token buffer, ``(bsz * beam, max_len + 2)``, of which only the first ``step + 1`` columns are
written. The CUDA kernel reads the buffer through ``step``; the Python fallback (every CPU run,
and GPUs without the extension) takes the n-gram to check from the buffer's *last* columns, which
are padding, so it bans nothing and the option silently does nothing (fairseq issues #4709,
#5206). :class:`PrefixNGramRepeatBlock` gives the fallback the written prefix only. For size 1
the fallback compares the whole row with an empty slice and bans nothing at any length: there it
bans every token written after the begin symbol.
"""
from __future__ import annotations

from fairseq.ngram_repeat_block import NGramRepeatBlock
from torch import Tensor

__all__ = ["PrefixNGramRepeatBlock", "fix_ngram_repeat_block"]


class PrefixNGramRepeatBlock(NGramRepeatBlock):
    """:class:`NGramRepeatBlock` whose Python path reads ``tokens[:, :step + 1]``, the tokens written so far."""

    def forward(self, tokens: Tensor, lprobs: Tensor, bsz: int, beam_size: int, step: int) -> Tensor:
        if self.use_extension:
            return super().forward(tokens, lprobs, bsz, beam_size, step)
        if self.no_repeat_ngram_size == 1:
            if step >= 1:  # column 0 is the begin symbol (eos), which must stay possible
                lprobs.scatter_(1, tokens[:, 1: step + 1], float("-inf"))
            return lprobs
        return super().forward(tokens[:, : step + 1], lprobs, bsz, beam_size, step)


def fix_ngram_repeat_block(generator) -> None:
    """Swaps a fairseq ``SequenceGenerator``'s n-gram blocker (if it has one) for :class:`PrefixNGramRepeatBlock`."""
    blocker = getattr(generator, "repeat_ngram_blocker", None)
    if blocker is not None and not isinstance(blocker, PrefixNGramRepeatBlock):
        fixed = PrefixNGramRepeatBlock(blocker.no_repeat_ngram_size, use_extension=blocker.use_extension)
        generator.repeat_ngram_blocker = fixed
