"""mSLAM's CTC loss on the speech side of a pair, against the pair's own transcript.

SLAM's TLM and STM can be solved from the text side alone early in training, so at small scale
the speech encoder learns little from pairs. mSLAM (arXiv 2202.01374) adds CTC on the speech of
the paired data: the speech alone goes through the whole encoder (no text, no masking) and a
linear head spells the transcript, in the text vocabulary (mSLAM) or in characters
(:class:`Speller`). It aligns speech with text directly, which is what fine-tuning for recognition
or translation needs first.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from slam_fairseq.objectives.masked_prediction import ObjectiveOutput

CTC_BLANK = 0  # fairseq's <s>: never a transcript token; the same blank as slam_s2t's CTC head


def kept_first(values: torch.Tensor, keep: torch.Tensor):
    """(B, S) values -> ((B, S) each row's kept values first, in order, then the others; (B,) how
    many are kept): the padded targets ``ctc_loss`` reads up to each row's length. A stable sort
    rather than ``values[keep]``, whose size the host would have to read from the device."""
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    return values.gather(1, order), keep.sum(dim=1)


def transcript_targets(tokens: torch.Tensor, ignore: torch.Tensor):
    """(B, L) padded transcripts -> ((B, L) padded targets, (B,) lengths), leaving out the ids in
    ``ignore`` (pad, eos, bos: not spoken); past its length a row holds left-out ids."""
    return kept_first(tokens, ~torch.isin(tokens, ignore))


def ctc_frames_needed(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """(B,) the fewest frames a CTC alignment of each row's target needs: one per token, plus a
    blank between each two equal neighbours ("ll" needs 3). ``targets``: (B, S) padded or (N,)
    concatenated, as ``ctc_loss`` takes them."""
    if targets.dim() == 1:  # concatenated: neighbours equal inside one row only
        ends = torch.cumsum(target_lengths, 0)
        row = torch.searchsorted(ends, torch.arange(targets.numel(), device=targets.device), right=True)
        same = (targets[1:] == targets[:-1]) & (row[1:] == row[:-1])
        repeats = torch.zeros_like(target_lengths).scatter_add_(0, row[1:], same.to(target_lengths.dtype))
        return target_lengths + repeats
    position = torch.arange(1, targets.shape[1], device=targets.device)
    same = (targets[:, 1:] == targets[:, :-1]) & (position < target_lengths.unsqueeze(1))
    return target_lengths + same.sum(dim=1).to(target_lengths.dtype)


def pair_ctc_loss(logits: torch.Tensor, output_lengths: torch.Tensor, targets: torch.Tensor,
                  target_lengths: torch.Tensor) -> ObjectiveOutput:
    """
    Args:
        logits: (B, T', V) scores over the text vocabulary at every subsampled frame (fastest as
            the transposed view of a contiguous (T', B, V) tensor).
        output_lengths: (B,) real frames.
        targets: (B, S) padded transcripts (no blank, pad or eos up to each row's length; as
            :func:`transcript_targets` makes them) or (N,) concatenated; target_lengths: (B,).
    Returns:
        :class:`ObjectiveOutput`: the summed CTC loss divided by the number of target tokens; rows
        too short for their transcript (:func:`ctc_frames_needed`) contribute 0 and are not
        counted; no accuracy
        (``num_correct`` is 0).
    """
    # time-first, as ctc_loss reads them (no reordering when ``logits`` is a view of (T', B, V))
    log_probs = F.log_softmax(logits.transpose(0, 1).float(), dim=-1)
    feasible = output_lengths >= ctc_frames_needed(targets, target_lengths)
    loss_sum = F.ctc_loss(log_probs, targets, output_lengths, target_lengths,
                          blank=CTC_BLANK, reduction="none", zero_infinity=True)
    count = (target_lengths * feasible).sum()
    loss = (loss_sum * feasible).sum() / count.clamp(min=1)
    return ObjectiveOutput(loss, count.new_zeros(()), count)



class Speller(torch.nn.Module):
    """Spells dictionary tokens as characters, for CTC over characters (``--pair-ctc-units characters``).

    Word-piece CTC over a large vocabulary leaves the blank-only plateau late at small scale; the
    same transcript spelled in its few dozen characters (SentencePiece's word boundary "▁" is one of
    them) is learned several times sooner. The table is derived from the dictionary, so it is not
    saved with the model. Character ids start at 1 (0 is the blank).
    """

    def __init__(self, symbols: Sequence[str], unspoken_ids: Sequence[int]) -> None:
        super().__init__()
        unspoken = set(unspoken_ids)
        spoken = [symbol if index not in unspoken and not _is_special(symbol) else ""
                  for index, symbol in enumerate(symbols)]
        self.characters = sorted(set("".join(spoken)))
        character_id = {character: index + 1 for index, character in enumerate(self.characters)}
        width = max(1, max(len(symbol) for symbol in spoken))
        table = torch.zeros(len(symbols), width, dtype=torch.long)
        for index, symbol in enumerate(spoken):
            table[index, : len(symbol)] = torch.tensor([character_id[c] for c in symbol], dtype=torch.long)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("lengths", torch.tensor([len(symbol) for symbol in spoken]), persistent=False)

    @property
    def num_classes(self) -> int:
        """Characters plus the blank."""
        return len(self.characters) + 1

    def forward(self, tokens: torch.Tensor):
        """(B, L) padded token ids -> ((B, L x W) padded character targets, (B,) lengths), W the
        longest spelling; unspoken ids spell nothing."""
        spelled = self.table[tokens]  # (B, L, W)
        keep = torch.arange(spelled.shape[-1], device=tokens.device) < self.lengths[tokens].unsqueeze(-1)
        return kept_first(spelled.flatten(1), keep.flatten(1))


def _is_special(symbol: str) -> bool:
    """fairseq's <...> symbols (<mask>, <unk>) and its madeupword fillers are not spelled."""
    return (symbol.startswith("<") and symbol.endswith(">")) or symbol.startswith("madeupword")
