"""Two Conv2d layers, stride (2, 2) each: 4x time reduction of log-Mel frames."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_KERNEL = 3
_STRIDE = 2
SUBSAMPLING_FACTOR = _STRIDE * _STRIDE  # frames of input per output frame


def _conv_output_length(length: torch.Tensor) -> torch.Tensor:
    return torch.div(length - _KERNEL, _STRIDE, rounding_mode="floor") + 1


def subsampled_lengths(input_lengths: torch.Tensor) -> torch.Tensor:
    """Exact output lengths: ``floor((floor((L - 3) / 2) + 1 - 3) / 2) + 1`` (no time padding)."""
    return _conv_output_length(_conv_output_length(input_lengths))


def subsampled_length(input_length: int) -> int:
    """:func:`subsampled_lengths` of one Python int (no tensor, so no device read)."""
    return ((input_length - _KERNEL) // _STRIDE + 1 - _KERNEL) // _STRIDE + 1


MIN_INPUT_FRAMES = 7  # the shortest input with one output frame


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
        frequency = ((input_dim - _KERNEL) // _STRIDE + 1 - _KERNEL) // _STRIDE + 1
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
        if lengths.device.type == "cpu":
            if int(lengths.min()) < MIN_INPUT_FRAMES:
                raise ValueError(f"speech input of {int(lengths.min())} frames is too short: "
                                 f"at least {MIN_INPUT_FRAMES} needed")
        else:  # checked on the device, without waiting for it
            torch._assert_async(lengths.min() >= MIN_INPUT_FRAMES,
                                f"speech input too short: at least {MIN_INPUT_FRAMES} frames needed")
        hidden = F.relu(self.conv_first(features.unsqueeze(1)))
        hidden = F.relu(self.conv_second(hidden))
        batch_size, channels, time, frequency = hidden.shape
        hidden = hidden.permute(0, 2, 1, 3).reshape(batch_size, time, channels * frequency)
        return self.layer_norm(self.output_projection(hidden)), subsampled_lengths(lengths)
