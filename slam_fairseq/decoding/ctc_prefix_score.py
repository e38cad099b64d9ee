"""CTC prefix scores for joint CTC/attention decoding (Watanabe et al., 2017, "Hybrid CTC/Attention
Architecture for End-to-End Speech Recognition", section on one-pass beam search).

For a label prefix ``g`` the *prefix score* ``psi(g)`` is the log-probability, under the CTC
posteriors of one utterance, that the label sequence CTC emits starts with ``g``: the sum over all
alignments whose collapsed output begins with ``g``. Beam search adds the increment
``psi(g + c) - psi(g)`` of each candidate token ``c`` to the decoder's score; for end-of-sentence
the increment uses the *full* probability ``p(g)`` (the output is exactly ``g``). A prefix longer
than the frames can carry gets ``-inf``, so a hypothesis cannot run past what the audio supports.

The forward variables, over frames ``t = 0 .. T-1``:

- ``r_n[t](g)``: log-probability of the frames ``0..t`` emitting exactly ``g``, frame ``t``
  emitting ``g``'s last label;
- ``r_b[t](g)``: the same with frame ``t`` emitting blank.

Extending ``g`` by ``c`` (``phi[t] = r_b[t](g) (+) r_n[t](g)``, without ``r_n`` when ``c`` repeats
``g``'s last label, which needs a blank in between; ``(+)`` is log-add):

- ``r_n[t](g+c) = (r_n[t-1](g+c) (+) phi[t-1]) + y[t, c]``
- ``r_b[t](g+c) = (r_b[t-1](g+c) (+) r_n[t-1](g+c)) + y[t, blank]``
- ``psi(g+c) = (+)_t  phi[t-1] + y[t, c]``  (the frame where ``c`` is first emitted), and
  ``p(g) = r_n[T-1](g) (+) r_b[T-1](g)``.

Frames past an utterance's length are made certain blanks (blank log-probability 0, every label
``-inf``), which changes no probability and lets a padded batch share one ``T``. Everything is
vectorised over rows (hypotheses) and candidate tokens; the loop runs over frames only, from the
first frame at which the extended prefix can end. The (T, S, V) posteriors are held once per
utterance, never per hypothesis: each row names its utterance (``source``), and a step reads only
the (T, N, K) posteriors of its candidates, so memory and copying do not grow with the beam
times the vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CTCPrefixState", "CTCCandidateStates", "CTCPrefixScorer"]

_NO_LABEL = -1  # "last label" of the empty prefix: equals no candidate


@dataclass
class CTCPrefixState:
    """The forward variables of one prefix per row.

    Attributes:
        log_probs: (T, S, V) CTC log-posteriors of each utterance, padded frames made blank; shared
            by every state of one search.
        source: (N,) the utterance (index into ``log_probs``'s S) of each row.
        blank_log_probs: (T, N) each row's blank log-posteriors.
        ends_in_label: (T, N) ``r_n``.
        ends_in_blank: (T, N) ``r_b``.
        prefix_score: (N,) ``psi`` of the prefix (0 for the empty prefix).
        last_label: (N,) the prefix's last label (``-1`` for the empty prefix).
        prefix_length: labels in the prefix (the same for every row: beam search extends all rows
            together).
    """

    log_probs: Tensor
    source: Tensor
    blank_log_probs: Tensor
    ends_in_label: Tensor
    ends_in_blank: Tensor
    prefix_score: Tensor
    last_label: Tensor
    prefix_length: int

    def index_select(self, rows: Tensor) -> "CTCPrefixState":
        """The state of the rows ``rows`` (M,), in that order (beam search reordering)."""
        return CTCPrefixState(
            log_probs=self.log_probs,
            source=self.source.index_select(0, rows),
            blank_log_probs=self.blank_log_probs.index_select(1, rows),
            ends_in_label=self.ends_in_label.index_select(1, rows),
            ends_in_blank=self.ends_in_blank.index_select(1, rows),
            prefix_score=self.prefix_score.index_select(0, rows),
            last_label=self.last_label.index_select(0, rows),
            prefix_length=self.prefix_length,
        )


@dataclass
class CTCCandidateStates:
    """Forward variables of every scored extension ``g + c`` of each row's prefix ``g``.

    Attributes:
        parent: the state of the prefixes ``g``.
        candidates: (N, K) the candidate tokens ``c``.
        ends_in_label: (T, N, K) ``r_n(g + c)``.
        ends_in_blank: (T, N, K) ``r_b(g + c)``.
        prefix_scores: (N, K) ``psi(g + c)`` (``p(g)`` for end-of-sentence, ``-inf`` for blank).
    """

    parent: CTCPrefixState
    candidates: Tensor
    ends_in_label: Tensor
    ends_in_blank: Tensor
    prefix_scores: Tensor


class CTCPrefixScorer:
    """Scores label prefixes under CTC posteriors.

    Args:
        blank: the blank's index in the vocabulary.
        eos: end-of-sentence index: its "extension" scores the full probability of the prefix.
    """

    def __init__(self, blank: int, eos: int) -> None:
        if blank == eos:
            raise ValueError(f"the CTC blank ({blank}) and end-of-sentence ({eos}) must differ")
        self.blank = blank
        self.eos = eos

    def initial_state(self, log_probs: Tensor, lengths: Tensor, source: Optional[Tensor] = None) -> CTCPrefixState:
        """The empty prefix of every row.

        Args:
            log_probs: (T, S, V) CTC log-posteriors (log-softmax over V) of S utterances, padded in time.
            lengths: (S,) frames of each utterance (at most T).
            source: (N,) the utterance of each row (hypothesis); default one row per utterance.
        """
        if log_probs.dim() != 3:
            raise ValueError(f"CTC log-probs must be (T, S, V), got shape {tuple(log_probs.shape)}")
        frames, utterances, _ = log_probs.shape
        if lengths.shape != (utterances,) or (utterances and int(lengths.max()) > frames):
            raise ValueError(f"lengths of shape {tuple(lengths.shape)} do not fit CTC log-probs of "
                             f"{frames} frames and {utterances} utterances")
        if source is None:
            source = torch.arange(utterances, device=log_probs.device)
        source = source.to(device=log_probs.device, dtype=torch.long)
        if source.dim() != 1 or (source.numel() and (int(source.min()) < 0 or int(source.max()) >= utterances)):
            raise ValueError(f"row sources must be (N,) utterance indices below {utterances}")
        log_probs = log_probs.float()
        padded = torch.arange(frames, device=log_probs.device).unsqueeze(1) >= lengths.to(log_probs.device)
        log_probs = log_probs.masked_fill(padded.unsqueeze(-1), -math.inf)
        log_probs[..., self.blank] = log_probs[..., self.blank].masked_fill(padded, 0.0)
        blank_log_probs = log_probs[..., self.blank].index_select(1, source)
        rows = source.numel()
        return CTCPrefixState(
            log_probs=log_probs,
            source=source,
            blank_log_probs=blank_log_probs,
            ends_in_label=torch.full_like(blank_log_probs, -math.inf),
            ends_in_blank=torch.cumsum(blank_log_probs, dim=0),
            prefix_score=torch.zeros(rows, device=log_probs.device),
            last_label=torch.full((rows,), _NO_LABEL, dtype=torch.long, device=log_probs.device),
            prefix_length=0,
        )

    def full_score(self, state: CTCPrefixState) -> Tensor:
        """(N,) ``log p(g)``: CTC emits exactly each row's prefix."""
        return torch.logaddexp(state.ends_in_label[-1], state.ends_in_blank[-1])

    def score_candidates(self, state: CTCPrefixState, candidates: Tensor) -> CTCCandidateStates:
        """Extends each row's prefix by each of its candidates.

        Args:
            state: N prefixes.
            candidates: (N, K) token indices; ``eos`` scores ``p(g)``, ``blank`` gets ``-inf``.
        """
        frames, rows = state.blank_log_probs.shape
        if candidates.dim() != 2 or candidates.size(0) != rows:
            raise ValueError(f"candidates must be (N={rows}, K), got shape {tuple(candidates.shape)}")
        width = candidates.size(1)
        # y[t, n, k] = log p(candidate k of row n at frame t), read from the row's utterance
        vocabulary = state.log_probs.size(2)
        flat = (state.source.unsqueeze(1) * vocabulary + candidates).reshape(1, rows * width)
        label_log_probs = state.log_probs.reshape(frames, -1).gather(1, flat.expand(frames, -1))
        label_log_probs = label_log_probs.view(frames, rows, width)
        repeats = (candidates == state.last_label.unsqueeze(1)).unsqueeze(0)
        # phi[t]: g is complete by frame t and c may start at t + 1
        before = torch.logaddexp(
            state.ends_in_blank.unsqueeze(2),
            state.ends_in_label.unsqueeze(2).masked_fill(repeats, -math.inf))

        ends_in_label = torch.full((frames, rows, width), -math.inf, device=label_log_probs.device)
        ends_in_blank = torch.full_like(ends_in_label, -math.inf)
        if state.prefix_length == 0:
            ends_in_label[0] = label_log_probs[0]
        # g + c (length L + 1) first ends at frame L: earlier frames stay -inf
        start = max(state.prefix_length, 1)
        blank = state.blank_log_probs.unsqueeze(2)
        for t in range(start, frames):
            ends_in_label[t] = torch.logaddexp(ends_in_label[t - 1], before[t - 1]) + label_log_probs[t]
            ends_in_blank[t] = torch.logaddexp(ends_in_blank[t - 1], ends_in_label[t - 1]) + blank[t]

        first_emission = before[start - 1: frames - 1] + label_log_probs[start:]
        if state.prefix_length == 0:
            first_emission = torch.cat([label_log_probs[:1], first_emission], dim=0)
        prefix_scores = torch.logsumexp(first_emission, dim=0) if first_emission.size(0) else \
            torch.full((rows, width), -math.inf, device=label_log_probs.device)

        # (no host sync to ask whether eos is a candidate: joint search always makes it one)
        is_eos = candidates == self.eos
        prefix_scores = torch.where(is_eos, self.full_score(state).unsqueeze(1), prefix_scores)
        # an ended hypothesis is never extended; its forward variables stay those of g
        ends_in_label = torch.where(is_eos.unsqueeze(0), state.ends_in_label.unsqueeze(2), ends_in_label)
        ends_in_blank = torch.where(is_eos.unsqueeze(0), state.ends_in_blank.unsqueeze(2), ends_in_blank)
        prefix_scores = prefix_scores.masked_fill(candidates == self.blank, -math.inf)
        return CTCCandidateStates(state, candidates, ends_in_label, ends_in_blank, prefix_scores)

    def select(self, scored: CTCCandidateStates, rows: Tensor, tokens: Tensor) -> CTCPrefixState:
        """The states of the chosen extensions: row ``rows[m]``'s prefix extended by ``tokens[m]``.

        A token that was not among the row's candidates (a forced prefix token) is scored here.

        Args:
            scored: the candidates of the previous step.
            rows: (M,) parent rows.
            tokens: (M,) chosen tokens.
        """
        candidates = scored.candidates.index_select(0, rows)
        matches = candidates == tokens.unsqueeze(1)
        found = matches.any(dim=1)
        columns = matches.long().argmax(dim=1)
        ends_in_label = scored.ends_in_label[:, rows, columns]
        ends_in_blank = scored.ends_in_blank[:, rows, columns]
        prefix_score = scored.prefix_scores[rows, columns]
        if not bool(found.all()):
            missing = (~found).nonzero(as_tuple=True)[0]
            extra = self.score_candidates(scored.parent.index_select(rows[missing]), tokens[missing].unsqueeze(1))
            ends_in_label[:, missing] = extra.ends_in_label[:, :, 0]
            ends_in_blank[:, missing] = extra.ends_in_blank[:, :, 0]
            prefix_score[missing] = extra.prefix_scores[:, 0]
        parent = scored.parent
        return CTCPrefixState(
            log_probs=parent.log_probs,
            source=parent.source.index_select(0, rows),
            blank_log_probs=parent.blank_log_probs.index_select(1, rows),
            ends_in_label=ends_in_label,
            ends_in_blank=ends_in_blank,
            prefix_score=prefix_score,
            last_label=tokens.clone(),
            prefix_length=parent.prefix_length + 1,
        )

    def prefix_scores(self, log_probs: Tensor, lengths: Tensor, prefix: Tensor) -> Tuple[Tensor, Tensor]:
        """``psi`` and ``p`` of one prefix for every row, built label by label as beam search does.

        Args:
            log_probs: (T, N, V); lengths: (N,); prefix: (L,) labels (no blank, no eos).
        Returns:
            ((N,) ``psi(prefix)``, (N,) ``log p(prefix)``).
        """
        state = self.initial_state(log_probs, lengths)
        rows = torch.arange(log_probs.size(1), device=log_probs.device)
        for label in prefix.tolist():
            tokens = torch.full_like(rows, int(label))
            state = self.select(self.score_candidates(state, tokens.unsqueeze(1)), rows, tokens)
        return state.prefix_score, self.full_score(state)
