"""How evenly a quantizer uses its codebook: the perplexity both MSM quantizers report."""
from __future__ import annotations

import torch

__all__ = ["codebook_perplexity"]


def codebook_perplexity(usage: torch.Tensor) -> torch.Tensor:
    """Sum over groups of exp(entropy) of code frequencies (wav2vec 2.0's code / prob perplexity).

    Args:
        usage: (G, V) frequency of each code per group (rows sum to 1).
    Returns:
        scalar in [G, G x V]: G x V when every code is used equally, G when one code per group is.
    """
    return torch.exp(-torch.sum(usage * torch.log(usage + 1e-7), dim=-1)).sum()
