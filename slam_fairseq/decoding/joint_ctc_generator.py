"""Joint CTC/attention beam search in fairseq's own ``SequenceGenerator``.

fairseq's beam search asks its ``EnsembleModel`` for the next-token log-probabilities of every
hypothesis (``forward_decoder``) and tells it how hypotheses were reordered
(``reorder_encoder_out``). :class:`CTCPrefixFusedEnsemble` is a drop-in ``EnsembleModel`` that
answers with

    score(c) = (1 - weight) * log p_attention(c | g) + weight * (psi(g + c) - psi(g))

where ``psi`` is the CTC prefix score (:mod:`slam_fairseq.decoding.ctc_prefix_score`) and, for
end-of-sentence, ``psi(g + eos) = log p_ctc(g)``. Only the ``candidates`` tokens the decoder ranks
highest (and eos) are scored by CTC; every other token gets ``-inf``, as in ESPnet's pre-beam. A
prefix the frames cannot carry scores ``-inf``, so with ``weight > 0`` no hypothesis outgrows
the audio. Everything else (length limits, ``--lenpen``, ``--prefix-size``, batching, finished
sentences leaving the batch) is fairseq's own code.

The first ``skip_tokens`` output tokens are not CTC labels (``slam_s2t``'s
``ctc_target_prefix_size``: a language tag); they take the decoder's score alone. With
``--prefix-size P`` fairseq forces the reference's first P tokens whatever their score; the forced
token of each row is always among the CTC-scored candidates (unscored it would get ``-inf``, and
no hypothesis could end).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import torch
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator
from torch import Tensor

from slam_fairseq.decoding.ctc_prefix_score import CTCCandidateStates, CTCPrefixScorer, CTCPrefixState

__all__ = ["CTCPrefixFusedEnsemble", "add_ctc_prefix_scores", "STUCK_PENALTY"]

logger = logging.getLogger(__name__)

#: added to each decoder log-probability of a hypothesis that CTC scores ``-inf`` in every candidate
#: (far below any score CTC allows, finite so that fairseq's search can still end it)
STUCK_PENALTY = -1.0e4


class CTCPrefixFusedEnsemble(EnsembleModel):
    """One model with a CTC head, its decoder's log-probabilities fused with CTC prefix scores.

    Args:
        models: a list of one model with ``get_ctc_output(net_output)`` -> ((T', B, V) log-probs,
            (B,) lengths) reading the encoder-out dict as ``net_output[1]["encoder_out"]``.
        weight: the CTC weight lambda, in [0, 1].
        candidates: tokens per hypothesis scored by CTC each step (the decoder's best, plus eos).
        blank: the CTC blank's index; eos: end-of-sentence; pad: never a candidate.
        skip_tokens: leading output tokens that are not CTC labels.
    """

    def __init__(self, models: List, weight: float, candidates: int, blank: int, eos: int, pad: int,
                 skip_tokens: int = 0, min_len: int = 1) -> None:
        if len(models) != 1:
            raise ValueError(f"joint CTC/attention decoding takes one model, got an ensemble of {len(models)}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"the CTC decoding weight must be in [0, 1], got {weight}")
        if candidates < 1:
            raise ValueError(f"at least one CTC candidate per hypothesis is needed, got {candidates}")
        super().__init__(models)
        self.weight = weight
        self.candidates = candidates
        self.pad = pad
        self.skip_tokens = skip_tokens
        self.min_len = min_len  # fairseq forbids eos before this step
        self.scorer = CTCPrefixScorer(blank=blank, eos=eos)
        self._state: Optional[CTCPrefixState] = None
        self._scored: Optional[CTCCandidateStates] = None
        self._order: Optional[Tensor] = None
        self._forced: Optional[Tensor] = None
        self._warned_stuck = False

    def force_prefix(self, prefix_tokens: Optional[Tensor]) -> None:
        """(B, P) tokens fairseq will force at the first P steps of the next search (pad: none)."""
        self._forced = prefix_tokens

    def reorder_encoder_out(self, encoder_outs, new_order):
        """fairseq's reordering; also remembers ``new_order`` (rows of the previous step that the
        current rows continue) for the CTC states, and reorders the forced tokens the same way
        (the first call spreads each sentence over its beam)."""
        self._order = new_order
        if self._forced is not None:
            self._forced = self._forced.index_select(0, new_order)
        return super().reorder_encoder_out(encoder_outs, new_order)

    @torch.no_grad()
    def forward_decoder(self, tokens: Tensor, encoder_outs: List[Dict[str, List[Tensor]]],
                        incremental_states, temperature: float = 1.0):
        """
        Args:
            tokens: (N, S + 1) each hypothesis so far, starting with the begin symbol (step S).
        Returns:
            ((N, V) fused scores, attention as fairseq's ``EnsembleModel`` returns it).
        """
        attention_log_probs, attention = super().forward_decoder(tokens, encoder_outs, incremental_states,
                                                                 temperature)
        step = tokens.size(1) - 1
        self._advance(step, tokens, encoder_outs[0])
        if step < self.skip_tokens:
            return attention_log_probs, attention
        forced = None
        if self._forced is not None and step < self._forced.size(1):
            forced = self._forced[:, step]
        # fairseq forbids eos before --min-len only at steps where it forces no prefix token
        eos_allowed = step >= self.min_len or forced is not None
        return self._fuse(attention_log_probs, forced, eos_allowed=eos_allowed), attention

    def _advance(self, step: int, tokens: Tensor, encoder_out: Dict[str, List[Tensor]]) -> None:
        """Brings the CTC state to each row's current prefix."""
        if step == 0:
            log_probs, lengths = self.single_model.get_ctc_output((None, {"encoder_out": encoder_out}))
            rows = tokens.size(0)
            if log_probs.size(1) < rows:  # one row per sentence (a beamable decoder's)
                source = torch.arange(rows, device=log_probs.device) // (rows // log_probs.size(1))
            elif self._order is not None and self._order.numel() == rows:
                # fairseq spread each sentence over its beam (reorder_encoder_out): the rows of a
                # sentence are copies; one utterance's posteriors serve all of them
                source = self._order.to(log_probs.device)
                sentences = int(source.max()) + 1 if rows else 0
                first_row = torch.full((sentences,), rows, dtype=torch.long, device=log_probs.device)
                first_row.scatter_reduce_(0, source, torch.arange(rows, device=log_probs.device), "amin")
                log_probs, lengths = log_probs.index_select(1, first_row), lengths.index_select(0, first_row)
            else:
                source = None
            self._state = self.scorer.initial_state(log_probs, lengths, source)
            self._scored = None
            return
        assert self._state is not None and self._order is not None
        if step <= self.skip_tokens:
            self._state = self._state.index_select(self._order)
        else:
            assert self._scored is not None
            self._state = self.scorer.select(self._scored, self._order, tokens[:, -1])

    def _fuse(self, attention_log_probs: Tensor, forced: Optional[Tensor] = None, eos_allowed: bool = True) -> Tensor:
        """(N, V) decoder log-probs -> (N, V) fused scores (``-inf`` outside the candidates).

        ``forced``: (N,) the token fairseq forces on each row at this step (pad: none), made a
        candidate whatever the decoder thinks of it. ``eos_allowed``: False before ``--min-len``.
        A row left with no continuation fairseq may take at a finite score (CTC cannot carry any,
        or not the forced token) takes the decoder's scores plus :data:`STUCK_PENALTY`."""
        state = self._state
        ranked = attention_log_probs.float().clone()
        ranked[:, self.pad] = -math.inf
        if forced is not None:
            ranked.scatter_(1, forced.unsqueeze(1), torch.where(forced.eq(self.pad), -math.inf, 1e30).unsqueeze(1))
        ranked[:, self.scorer.eos] = math.inf  # always scored: ending must stay possible
        width = min(self.candidates + (1 if forced is None else 2), ranked.size(1))
        candidates = ranked.topk(width, dim=1).indices
        self._scored = self.scorer.score_candidates(state, candidates)
        increments = self._scored.prefix_scores - state.prefix_score.unsqueeze(1)
        candidate_log_probs = attention_log_probs.gather(1, candidates)
        increments = increments.to(candidate_log_probs)
        if self.weight == 1.0:
            fused = increments
        elif self.weight > 0.0:
            fused = (1.0 - self.weight) * candidate_log_probs + self.weight * increments
        else:  # CTC only restricts the candidates (and checks the machinery: equals plain beam search)
            fused = candidate_log_probs
        usable = torch.isfinite(fused)
        if not eos_allowed:
            usable &= candidates.ne(self.scorer.eos)
        if forced is not None:
            usable = torch.where(forced.ne(self.pad).unsqueeze(1), usable & candidates.eq(forced.unsqueeze(1)), usable)
        # Without --min-len or forced tokens no hypothesis of finite score is stuck (a prefix CTC
        # allows can always end), so ordinary searches are unchanged; a row the decoder gives
        # nothing finite is left to fairseq. A stuck row that went on has a prefix CTC cannot
        # carry (prefix score -inf) and stays stuck, so it keeps its penalised scores to the end.
        stuck = ~usable.any(dim=1) & torch.isfinite(attention_log_probs).any(dim=1)
        if bool(stuck.any()):
            fused = torch.where(stuck.unsqueeze(1), candidate_log_probs + STUCK_PENALTY, fused)
            self._warn_stuck(int(stuck.sum()))
        scores = torch.full_like(attention_log_probs, -math.inf)
        return scores.scatter_(1, candidates, fused)

    def _warn_stuck(self, rows: int) -> None:
        if not self._warned_stuck:
            self._warned_stuck = True
            logger.warning(
                f"joint CTC/attention search: {rows} hypotheses have no continuation the CTC frames can carry "
                f"(the utterance is shorter than --min-len or --prefix-size ask for, in CTC labels); they go on "
                f"with the decoder's scores {STUCK_PENALTY:g} lower per token, so that every utterance gets a "
                f"hypothesis (fairseq would stop at --max-len with an AssertionError)")


class _JointCTCSequenceGenerator(SequenceGenerator):
    """fairseq's ``SequenceGenerator`` that tells its :class:`CTCPrefixFusedEnsemble` which
    prefix tokens the search will force."""

    def generate(self, models, sample, **kwargs):
        self.model.force_prefix(kwargs.get("prefix_tokens"))
        return super().generate(models, sample, **kwargs)


def add_ctc_prefix_scores(generator: SequenceGenerator, weight: float, candidates: int, blank: int,
                          skip_tokens: int = 0) -> SequenceGenerator:
    """Turns a plain fairseq ``SequenceGenerator`` into joint CTC/attention beam search.

    Its ensemble is replaced by a :class:`CTCPrefixFusedEnsemble` over the same model. At least
    twice the beam size of candidates (at most the whole dictionary) are scored per hypothesis:
    fairseq's search takes the best ``2 * beam`` extensions of each sentence, and all of them can
    then be CTC-scored ones.

    Args:
        generator: built by fairseq's ``build_generator`` (beam search or sampling).
        weight: the CTC weight lambda; candidates: the decoder's top tokens scored by CTC.
        blank: the CTC blank; skip_tokens: leading output tokens that are not CTC labels.
    """
    if type(generator) is not SequenceGenerator:
        raise ValueError(f"joint CTC/attention decoding extends fairseq's SequenceGenerator, not "
                         f"{type(generator).__name__} (leave out --print-alignment / --score-reference)")
    if generator.lm_model is not None:
        raise ValueError("joint CTC/attention decoding does not combine with --lm-path")
    if generator.match_source_len:
        raise ValueError("joint CTC/attention decoding does not combine with --match-source-len: it asks for one "
                         "output token per input frame, which CTC (at most one label per subsampled frame) "
                         "cannot give")
    generator.model = CTCPrefixFusedEnsemble(
        list(generator.model.models), weight=weight,
        candidates=min(max(candidates, 2 * generator.beam_size), generator.vocab_size),
        blank=blank, eos=generator.eos, pad=generator.pad, skip_tokens=skip_tokens, min_len=generator.min_len)
    generator.model.eval()
    generator.__class__ = _JointCTCSequenceGenerator  # the same object, which now passes on prefix tokens
    return generator
