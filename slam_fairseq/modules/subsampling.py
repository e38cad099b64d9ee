"""Two Conv2d layers, stride (2, 2) each: 4x time reduction of log-Mel frames."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slam_fairseq.modules.padding import may_read_device_values

_KERNEL = 3
_STRIDE = 2
SUBSAMPLING_FACTOR = _STRIDE * _STRIDE  # frames of input per output frame


def _conv_output_length(length: torch.Tensor) -> torch.Tensor:
    return torch.div(length - _KERNEL, _STRIDE, rounding_mode="floor") + 1


def subsampled_lengths(input_lengths: torch.Tensor) -> torch.Tensor:
    """Exact output lengths: ``floor((floor((L - 3) / 2) + 1 - 3) / 2) + 1`` (no time padding)."""
    return _conv_output_length(_conv_output_length(input_lengths))


def _conv_output_size(size: int) -> int:
    """:func:`_conv_output_length` of one Python int."""
    return (size - _KERNEL) // _STRIDE + 1


def subsampled_length(input_length: int) -> int:
    """:func:`subsampled_lengths` of one Python int (no tensor, so no device read)."""
    return _conv_output_size(_conv_output_size(input_length))


MIN_INPUT_FRAMES = 7  # the shortest input with one output frame

BLOCK_BYTES = 4 << 20  # first-convolution output per block of :class:`_BlockedConvolutions`

_convolution_backward = torch.ops.aten.convolution_backward.default
_relu_backward = torch.ops.aten.threshold_backward.default


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, bias, _STRIDE)


def _conv_grads(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool):
    """(gradient of x or None, of weight, of bias) of :func:`_conv`."""
    return _convolution_backward(grad_output, x, weight, [weight.shape[0]], [_STRIDE, _STRIDE], [0, 0], [1, 1],
                                 False, [0, 0], 1, [need_input, True, True])


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device
        return torch.is_autocast_cpu_enabled()


class _BlockedConvolutions(torch.autograd.Function):
    """``relu(conv2(relu(conv1(x))))`` a block of utterances at a time, forward and backward.

    The first convolution's output is the encoder's largest tensor (B x C x T/2 x F/2 floats: 12 MB
    for 8 utterances of 6 s at 32 channels). Taken whole, every pass over it touches freshly mapped
    memory (glibc maps blocks that large on their own) and its backward needs three more of its
    size. Taken ``rows`` utterances at a time, the blocks are small enough to be reused from the heap
    and stay in cache from conv1 to conv2; the backward recomputes each block's first convolution
    (one input channel: cheap) instead of keeping the whole map. The same values, and the same
    gradients up to float summation order (``tests/test_subsampling.py``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_first: torch.Tensor, bias_first: torch.Tensor,
                weight_second: torch.Tensor, bias_second: torch.Tensor, rows: int) -> torch.Tensor:
        blocks = [F.relu(_conv(F.relu(_conv(block, weight_first, bias_first), inplace=True),
                               weight_second, bias_second), inplace=True)
                  for block in x.split(rows)]
        output = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        ctx.save_for_backward(x, weight_first, bias_first, weight_second, output)
        ctx.rows = rows
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight_first, bias_first, weight_second, output = ctx.saved_tensors
        # Summed over blocks in float32 (fp16/bf16 weights: one rounding, as a whole-batch backward).
        totals = [torch.zeros(shape, dtype=torch.float32, device=x.device) for shape in (
            weight_first.shape, bias_first.shape, weight_second.shape, (weight_second.shape[0],))]
        for block, block_output, block_grad in zip(x.split(ctx.rows), output.split(ctx.rows),
                                                   grad_output.split(ctx.rows)):
            hidden = F.relu(_conv(block, weight_first, bias_first), inplace=True)
            grad_hidden, grad_weight_second, grad_bias_second = _conv_grads(
                _relu_backward(block_grad, block_output, 0), hidden, weight_second, need_input=True)
            _, grad_weight_first, grad_bias_first = _conv_grads(
                _relu_backward(grad_hidden, hidden, 0), block, weight_first, need_input=False)
            for total, part in zip(totals, (grad_weight_first, grad_bias_first, grad_weight_second,
                                            grad_bias_second)):
                total += part
        dtypes = (weight_first.dtype, bias_first.dtype, weight_second.dtype, weight_second.dtype)
        return (None, *(total.to(dtype) for total, dtype in zip(totals, dtypes)), None)


class Conv2dSubsampling(nn.Module):
    """(B, T, F) features -> (B, T', D) with T' = :func:`subsampled_lengths` (T), layer-normalised.

    No padding in time: an output frame only sees real input frames, so padding cannot leak.

    Args:
        input_dim: feature channels F (80 log-Mel bins).
        channels: Conv2d channels.
        output_dim: model width D.
    """

    def __init__(self, input_dim: int, channels: int, output_dim: int) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(1, channels, _KERNEL, _STRIDE)
        self.conv_second = nn.Conv2d(channels, channels, _KERNEL, _STRIDE)
        frequency = subsampled_length(input_dim)
        self.output_projection = nn.Linear(channels * frequency, output_dim)
        # Without a norm the projected features start tiny (about 0.05) and the projection's bias
        # dominates them, so an encoder trained from scratch sees a near-constant input.
        self.layer_norm = nn.LayerNorm(output_dim)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        """
        Args:
            features: (B, T, F), padded.
            lengths: (B,) real frame counts.
        Returns:
            ((B, T', D), (B,) output lengths).
        """
        if may_read_device_values(lengths.device):
            if int(lengths.min()) < MIN_INPUT_FRAMES:
                raise ValueError(f"speech input of {int(lengths.min())} frames is too short: "
                                 f"at least {MIN_INPUT_FRAMES} needed")
        else:  # checked on the device, without waiting for it
            torch._assert_async(lengths.min() >= MIN_INPUT_FRAMES,
                                f"speech input too short: at least {MIN_INPUT_FRAMES} frames needed")
        hidden = self.convolutions(features.unsqueeze(1))
        batch_size, channels, time, frequency = hidden.shape
        hidden = hidden.permute(0, 2, 1, 3).reshape(batch_size, time, channels * frequency)
        return self.layer_norm(self.output_projection(hidden)), subsampled_lengths(lengths)

    def convolutions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, F) -> (B, C, T', F'): both convolutions and their ReLUs.

        Training on a CPU runs them in blocks of utterances (:class:`_BlockedConvolutions`, about
        :data:`BLOCK_BYTES` of first-convolution output per block); elsewhere (CUDA, autocast,
        inference, or when ``x`` itself needs a gradient) the modules run on the whole batch."""
        blocked = (x.device.type == "cpu" and torch.is_grad_enabled() and not x.requires_grad
                   and self.conv_first.weight.requires_grad and not _cpu_autocast_enabled())
        if not blocked:
            return F.relu(self.conv_second(F.relu(self.conv_first(x))))
        row_bytes = (self.conv_first.out_channels * _conv_output_size(x.shape[2]) * _conv_output_size(x.shape[3])
                     * x.element_size())
        return _BlockedConvolutions.apply(x, self.conv_first.weight, self.conv_first.bias, self.conv_second.weight,
                                          self.conv_second.bias, max(1, BLOCK_BYTES // row_bytes))
