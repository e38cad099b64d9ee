"""GroupNorm whose statistics skip padded time steps, with its backward written out.

Written as one autograd function rather than left to autograd's chain of a dozen element-wise
operators: the backward is the textbook GroupNorm gradient restricted to real frames, a third
fewer dispatched operators per call (each one a kernel launch on a GPU), and only the normalised
activations are kept for it instead of every intermediate.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ["GroupNormFrames", "MaskedGroupNorm", "group_norm_frames", "masked_group_norm"]


class GroupNormFrames(NamedTuple):
    """What the statistics need from the padding mask: the same for every layer of a stack.

    real: (B, 1, 1, T) float32, 1 at real steps, 0 at padding.
    count: (B, 1, 1, 1) float32, real elements per group (real steps x channels per group, at least
        one group's worth of channels, so that an all-padded row divides by a positive count)."""

    real: torch.Tensor
    count: torch.Tensor


def group_norm_frames(padding_mask: torch.Tensor, channels_per_group: int) -> GroupNormFrames:
    """:class:`GroupNormFrames` of a (B, T) bool padding mask (True at padding)."""
    batch_size, length = padding_mask.shape
    real = (~padding_mask).to(torch.float32).view(batch_size, 1, 1, length)
    return GroupNormFrames(real, real.sum(dim=(2, 3), keepdim=True).clamp_(min=1.0).mul_(channels_per_group))


class _MaskedGroupNormFunction(torch.autograd.Function):
    """y = (x - mean) * rstd * weight + bias, mean and variance over the real frames of each group.

    With x̂ the normalised input, g = dy * weight, n the real elements of the group and [real] the
    real-frame indicator, the input gradient is
    ``rstd * (g - [real] * (sum(g) + x̂ * sum(g * x̂)) / n)``, the sums over the whole group (padded
    outputs depend on the statistics too); weight and bias get ``sum(dy * x̂)`` and ``sum(dy)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, real: torch.Tensor, count: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], groups: int, eps: float) -> torch.Tensor:
        batch_size, channels, length = x.shape
        x_float = x.to(torch.promote_types(x.dtype, torch.float32)).view(batch_size, groups, channels // groups, length)
        mean = (x_float * real).sum(dim=(2, 3), keepdim=True).div_(count)
        centered = x_float - mean
        real_centered = centered * real
        variance = (real_centered * real_centered).sum(dim=(2, 3), keepdim=True).div_(count)
        rstd = (variance + eps).rsqrt_()
        normalized = centered.mul_(rstd).view(batch_size, channels, length)
        ctx.save_for_backward(normalized, real, count, rstd, weight)
        ctx.groups = groups
        if weight is None:
            return normalized.to(x.dtype)
        affine = normalized.dtype
        return torch.addcmul(bias.to(affine)[None, :, None], normalized, weight.to(affine)[None, :, None]).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        normalized, real, count, rstd, weight = ctx.saved_tensors
        batch_size, channels, length = normalized.shape
        grad = grad_output.to(normalized.dtype)
        grad_weight = grad_bias = grad_input = None
        if weight is not None:
            if ctx.needs_input_grad[3]:
                grad_weight = (grad * normalized).sum(dim=(0, 2)).to(weight.dtype)
            if ctx.needs_input_grad[4]:
                grad_bias = grad.sum(dim=(0, 2)).to(weight.dtype)
            grad = grad * weight.to(grad.dtype)[None, :, None]
        if ctx.needs_input_grad[0]:
            grad = grad.view(batch_size, ctx.groups, channels // ctx.groups, length)
            x_hat = normalized.view_as(grad)
            grad_sum = grad.sum(dim=(2, 3), keepdim=True)
            grad_dot = (grad * x_hat).sum(dim=(2, 3), keepdim=True)
            correction = torch.addcmul(grad_sum, x_hat, grad_dot).mul_(real).div_(count)
            grad_input = (grad - correction).mul_(rstd).view(batch_size, channels, length).to(grad_output.dtype)
        return grad_input, None, None, grad_weight, grad_bias, None, None


def masked_group_norm(x: torch.Tensor, padding_mask: torch.Tensor, groups: int,
                      weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                      eps: float = 1e-5, frames: Optional[GroupNormFrames] = None) -> torch.Tensor:
    """GroupNorm of (B, C, T) ``x`` over (C / groups channels x real steps), in float32 (float64
    for float64 input).

    Args:
        x: (B, C, T), any float dtype; the output has the same.
        padding_mask: (B, T) bool, True at padding (excluded from the statistics; still normalised).
        groups: G, dividing C.
        weight, bias: optional (C,) affine parameters (both or neither).
        eps: added to the variance.
        frames: ``group_norm_frames(padding_mask, C // G)`` when the caller has made it (a layer
            stack makes it once for all its layers); made here otherwise.
    """
    if frames is None:
        frames = group_norm_frames(padding_mask, x.shape[1] // groups)
    return _MaskedGroupNormFunction.apply(x, frames.real, frames.count, weight, bias, groups, eps)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm over (channels-in-group x real time steps); padded steps do not enter the statistics.

    Statistics are computed in float32 so fp16/bf16 training stays stable.
    """

    def frames(self, padding_mask: torch.Tensor) -> GroupNormFrames:
        """What :meth:`forward` needs from ``padding_mask``, for norms of this size (made once per stack)."""
        return group_norm_frames(padding_mask, self.num_channels // self.num_groups)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor,  # type: ignore[override]
                frames: Optional[GroupNormFrames] = None) -> torch.Tensor:
        """
        Args:
            x: (B, C, T).
            padding_mask: (B, T) bool, True at padding.
            frames: :meth:`frames` of ``padding_mask`` when the caller has made it.
        """
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        return masked_group_norm(x, padding_mask, self.num_groups, weight, bias, self.eps, frames)
