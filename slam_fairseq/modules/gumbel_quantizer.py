"""fairseq's Gumbel-softmax quantizer with its codevectors looked up by a matrix product.

fairseq's ``GumbelVectorQuantizer`` forms each codevector as ``(choice.unsqueeze(-1) * vars).sum``
over the codebook: an (N, G x V, d) intermediate, which for ``slam_paper`` (V = 1024 codes of
d = 256) is a megabyte per frame in float32, 3 GB for 3000 masked frames, and as much again in
backward. The same sum is one batched product per group, (G, N, V) @ (G, V, d). Parameters,
statistics, random draws and outputs are those of the parent class (``tests/test_gumbel_quantizer.py``
compares the two), so checkpoints and logs do not change.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from fairseq.modules import GumbelVectorQuantizer

from slam_fairseq.modules.codebook_usage import codebook_perplexity


class GumbelQuantizer(GumbelVectorQuantizer):
    """``GumbelVectorQuantizer`` (same constructor) whose codevectors come from a batched product."""

    def forward(self, x: torch.Tensor, produce_targets: bool = False) -> Dict[str, object]:
        """
        Args:
            x: (B, T, D) features (``time_first``; (B, D, T) otherwise).
            produce_targets: also return the chosen code of each frame and group.
        Returns:
            dict: ``x`` (B, T, G x d) codevectors (B, G x d, T without ``time_first``), ``targets``
            (B, T, G), ``code_perplexity`` (of the hard choices), ``prob_perplexity`` (of the mean
            softmax), ``num_vars`` (G x V), ``temp``.
        """
        if not self.time_first:
            x = x.transpose(1, 2)
        batch_size, length, _ = x.shape
        logits = self.weight_proj(x.reshape(batch_size * length, -1)).view(batch_size * length * self.groups, -1)
        result: Dict[str, object] = {"num_vars": self.num_vars * self.groups, "temp": self.curr_temp}
        with torch.no_grad():
            hard = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
            hard = hard.view(batch_size * length, self.groups, -1)
            result["code_perplexity"] = codebook_perplexity(hard.float().mean(dim=0))
        soft_usage = torch.softmax(logits.view(batch_size * length, self.groups, -1).float(), dim=-1).mean(dim=0)
        result["prob_perplexity"] = codebook_perplexity(soft_usage)
        if self.training:
            choice = F.gumbel_softmax(logits.float(), tau=self.curr_temp, hard=self.hard).type_as(logits)
        else:
            choice = hard
        choice = choice.view(batch_size * length, self.groups, -1)  # (N, G, V)
        if produce_targets:
            result["targets"] = choice.argmax(dim=-1).view(batch_size, length, self.groups).detach()
        codebook = self.vars.repeat(1, self.groups, 1) if self.combine_groups else self.vars
        codebook = codebook.view(self.groups, self.num_vars, -1)  # (G, V, d)
        # In the promoted dtype and outside autocast, as the parent's broadcast product computes it.
        dtype = torch.promote_types(choice.dtype, codebook.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            codevectors = torch.bmm(choice.transpose(0, 1).to(dtype), codebook.to(dtype))  # (G, N, d)
        codevectors = codevectors.transpose(0, 1).reshape(batch_size, length, -1)
        result["x"] = codevectors if self.time_first else codevectors.transpose(1, 2)
        return result
