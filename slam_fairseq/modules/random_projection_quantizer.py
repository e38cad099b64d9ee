"""A frozen random-projection quantizer (BEST-RQ, Chiu et al. 2022) as an alternative MSM target.

Why: a learned Gumbel-softmax quantizer (wav2vec 2.0 / w2v-BERT) can collapse to a single code when
training is short or batches are small, because a collapsed codebook makes both the contrastive and
the code-prediction losses trivial. A frozen random projection and a frozen random codebook cannot
collapse: the targets depend on the input features only. It returns the same fields as fairseq's
``GumbelVectorQuantizer`` so the rest of MSM is unchanged.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from slam_fairseq.modules.codebook_usage import codebook_perplexity


class RandomProjectionQuantizer(nn.Module):
    """
    Args:
        input_dim: width of the features to quantize (D).
        codebook_size: codes per group (C).
        groups: independent codebooks (G); a frame's target is one code per group.
        codevector_dim: width of the codevectors returned as ``x`` (Q, split evenly over groups).
        seed: the projection and codebook are drawn from this seed, so every rank and every run of
            the same configuration has the same targets.
    """

    def __init__(self, input_dim: int, codebook_size: int, groups: int, codevector_dim: int,
                 seed: int = 1234) -> None:
        super().__init__()
        if codevector_dim % groups != 0:
            raise ValueError(f"codevector_dim {codevector_dim} is not divisible by groups {groups}")
        generator = torch.Generator().manual_seed(seed)
        group_dim = codevector_dim // groups
        projection = torch.empty(groups, input_dim, group_dim)
        for group in range(groups):
            projection[group] = nn.init.xavier_uniform_(torch.empty(input_dim, group_dim), generator=generator)
        codebook = F.normalize(torch.randn(groups, codebook_size, group_dim, generator=generator), dim=-1)
        self.register_buffer("projection", projection)
        self.register_buffer("vars", codebook)  # named as fairseq's quantizer's codebook (model dtype)
        self.groups = groups
        self.codebook_size = codebook_size
        self.curr_temp = 0.0  # no temperature: kept for the logs' shape

    def set_num_updates(self, num_updates: int) -> None:  # nothing anneals
        pass

    @torch.no_grad()
    def forward(self, x: torch.Tensor, produce_targets: bool = True) -> Dict[str, torch.Tensor]:
        """x: (B, T, D) features -> ``x`` (B, T, Q) codevectors, ``targets`` (B, T, G) code ids,
        ``code_perplexity`` / ``prob_perplexity`` (the same: codes are hard), ``num_vars``."""
        batch_size, length, _ = x.shape
        flat = x.reshape(-1, x.shape[-1]).float()
        projected = F.normalize(torch.einsum("nd,gdq->gnq", flat, self.projection.float()), dim=-1)
        similarity = torch.einsum("gnq,gcq->gnc", projected, self.vars.float())
        codes = similarity.argmax(dim=-1)  # nearest codevector on the unit sphere
        codevectors = torch.stack([self.vars[group][codes[group]] for group in range(self.groups)], dim=1)
        counts = F.one_hot(codes, self.codebook_size).float().mean(dim=1)  # (G, C) code use
        perplexity = codebook_perplexity(counts)
        return {
            "x": codevectors.reshape(batch_size, length, -1).to(x.dtype),
            "targets": codes.t().reshape(batch_size, length, self.groups),
            "code_perplexity": perplexity, "prob_perplexity": perplexity,
            "num_vars": self.groups * self.codebook_size, "temp": self.curr_temp,
        }
