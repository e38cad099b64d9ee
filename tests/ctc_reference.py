"""Brute-force CTC references for the decoding tests: every frame-level path of a tiny posterior,
collapsed to its output, with the exact (log-summed) probabilities of outputs and prefixes."""
from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Dict, Sequence, Tuple

import torch

__all__ = ["collapse", "brute_force_ctc"]


def collapse(path: Sequence[int], blank: int) -> Tuple[int, ...]:
    """A frame-level path's CTC output: repeats merged, then blanks dropped."""
    labels, previous = [], None
    for label in path:
        if label != previous and label != blank:
            labels.append(label)
        previous = label
    return tuple(labels)


def brute_force_ctc(log_probs: torch.Tensor, length: int, blank: int
                    ) -> Tuple[Dict[Tuple[int, ...], float], Dict[Tuple[int, ...], float]]:
    """({prefix: log sum over alignments whose output starts with it}, {output: log sum of its
    alignments}) of one (T, V) row, over every path of its first ``length`` frames."""
    prefix_terms, full_terms = defaultdict(list), defaultdict(list)
    vocabulary = log_probs.size(-1)
    for path in itertools.product(range(vocabulary), repeat=length):
        score = sum(float(log_probs[t, label]) for t, label in enumerate(path))
        output = collapse(path, blank)
        full_terms[output].append(score)
        for end in range(len(output) + 1):
            prefix_terms[output[:end]].append(score)

    def log_sum(terms):
        return float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), dim=0))

    return ({key: log_sum(value) for key, value in prefix_terms.items()},
            {key: log_sum(value) for key, value in full_terms.items()})
