"""Best-path (greedy) CTC decoding, and a generator that gives ``fairseq-generate`` its hypotheses.

Best path: the most likely label of every frame, repeats collapsed, blanks dropped (a label
repeated across a blank is emitted twice). The path is the single most likely alignment, so the
output can never hold more labels than the utterance has frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

__all__ = ["BestPath", "ctc_best_paths", "CTCHeadGenerator", "CTCGreedyGenerator"]


@dataclass
class BestPath:
    """One utterance's best-path output.

    Attributes:
        tokens: (L,) the labels.
        token_scores: (L,) log-probability of the first frame that emits each label.
        path_score: log-probability of the whole best path (every frame).
    """

    tokens: Tensor
    token_scores: Tensor
    path_score: float


def ctc_best_paths(log_probs: Tensor, lengths: Tensor, blank: int) -> List[BestPath]:
    """Greedy CTC decoding of a padded batch.

    Args:
        log_probs: (T, B, V) CTC log-posteriors.
        lengths: (B,) frames of each utterance; later frames are padding and ignored.
        blank: the blank's index.
    Returns:
        B best paths, in batch order.
    """
    if log_probs.dim() != 3 or lengths.shape != (log_probs.size(1),):
        raise ValueError(f"expected (T, B, V) log-probs and (B,) lengths, got {tuple(log_probs.shape)} and "
                         f"{tuple(lengths.shape)}")
    best_scores, best_labels = log_probs.float().max(dim=-1)  # (T, B)
    paths = []
    for row, length in enumerate(lengths.tolist()):
        labels, scores = best_labels[:length, row], best_scores[:length, row]
        # a frame starts a label when it is not blank and differs from the frame before it
        starts = labels != blank
        starts[1:] &= labels[1:] != labels[:-1]
        paths.append(BestPath(labels[starts], scores[starts], float(scores.sum())))
    return paths


class CTCHeadGenerator:
    """What the generators that read only a model's CTC head share, in fairseq's generator interface
    (``generate(models, sample, ...)`` returning, per sentence, a list of hypothesis dicts): the
    encoder pass, and hypotheses ended as fairseq's beam search ends them.

    Args:
        model: a model with ``encoder`` and ``get_ctc_output(net_output)`` (``slam_s2t`` with a CTC
            head).
        eos: end-of-sentence index.
        symbols_to_strip_from_output: indices ``fairseq-generate`` leaves out of the printed text.
        normalize_scores, len_penalty: a hypothesis's ``score`` is its total over its length (with
            eos) to the power ``len_penalty``, or the total itself without ``normalize_scores``
            (fairseq's ``--lenpen`` and ``--unnormalized``).
        pad: the padding index (of forced prefix rows shorter than ``--prefix-size``).
    """

    def __init__(self, model, eos: int, symbols_to_strip_from_output: Iterable[int] = (),
                 normalize_scores: bool = True, len_penalty: float = 1.0, pad: int = 1) -> None:
        self.model = model
        self.eos = eos
        self.pad = pad
        self.normalize_scores = normalize_scores
        self.len_penalty = len_penalty
        self.symbols_to_strip_from_output = set(symbols_to_strip_from_output) | {eos}
        self.model.eval()

    def cuda(self):
        self.model.cuda()
        return self

    def ctc_output(self, sample: Dict):
        """((T', B, V) CTC log-probabilities, (B,) frames) of ``sample["net_input"]`` (``src_tokens``
        (B, T, F), ``src_lengths`` (B,))."""
        net_input = sample["net_input"]
        encoder_out = self.model.encoder(src_tokens=net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        return self.model.get_ctc_output((None, {"encoder_out": encoder_out}))

    def hypothesis(self, tokens: Tensor, scores: Tensor, total_score: float,
                   prefix: Optional[Tensor]) -> Dict[str, Optional[Tensor]]:
        """One hypothesis dict: ``prefix`` (a row of forced tokens, the language tag, padded with eos
        or pad; or None) in front with score 0, eos behind with score 0, ``score`` = ``total_score``
        normalised as the constructor's arguments say."""
        if prefix is not None:
            prefix = prefix[(prefix != self.eos) & (prefix != self.pad)].to(tokens)
            tokens = torch.cat([prefix, tokens])
            scores = torch.cat([scores.new_zeros(len(prefix)), scores])
        tokens = torch.cat([tokens, tokens.new_tensor([self.eos])])
        scores = torch.cat([scores, scores.new_zeros(1)])
        score = total_score / len(tokens) ** self.len_penalty if self.normalize_scores else total_score
        return {"tokens": tokens, "score": torch.tensor(score),
                "positional_scores": scores, "attention": None, "alignment": None}


class CTCGreedyGenerator(CTCHeadGenerator):
    """Best-path CTC decoding as a :class:`CTCHeadGenerator`.

    Each hypothesis: ``tokens`` (the labels followed by ``eos``), ``score`` (the best path's
    log-probability, normalised by the output length with eos as fairseq normalises),
    ``positional_scores`` (each label's first-frame log-probability; 0 for eos), ``attention`` and
    ``alignment`` None. Prefix tokens (``--prefix-size``, e.g. a language tag) are put in front of
    the labels with score 0.

    Args:
        model, eos, symbols_to_strip_from_output: as for :class:`CTCHeadGenerator`.
        blank: the CTC blank's index.
        normalisation: ``normalize_scores``, ``len_penalty``, ``pad`` of :class:`CTCHeadGenerator`.
    """

    def __init__(self, model, eos: int, blank: int, symbols_to_strip_from_output: Iterable[int] = (),
                 **normalisation) -> None:
        super().__init__(model, eos, symbols_to_strip_from_output, **normalisation)
        self.blank = blank

    @torch.no_grad()
    def generate(self, models, sample: Dict, prefix_tokens: Optional[Tensor] = None,
                 **unused) -> List[List[Dict[str, Optional[Tensor]]]]:
        """Decodes ``sample["net_input"]`` (``src_tokens`` (B, T, F), ``src_lengths`` (B,))."""
        log_probs, lengths = self.ctc_output(sample)
        return [[self.hypothesis(path.tokens, path.token_scores, path.path_score,
                                 None if prefix_tokens is None else prefix_tokens[row])]
                for row, path in enumerate(ctc_best_paths(log_probs, lengths, self.blank))]
