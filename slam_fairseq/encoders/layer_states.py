"""The states of each layer of the SLAM encoder for speech alone: what feature extraction reads.

Layers are numbered along the speech path, as fine-tuning runs it:

- 0: the Conv2d subsampling's output (layer-normalised), the first Conformer layer's input;
- 1 .. N: the speech encoder's N Conformer layers;
- N + 1 .. N + M: the multimodal encoder's M Conformer layers over the speech encoder's projected
  output; N + M is the encoder's output, what fine-tuning's decoder and CTC head read.

Only the layers up to the deepest one asked for are run. The modules run in whatever mode they are
in; extraction puts them in eval mode (no dropout), where layer N + M equals
:meth:`SlamEncoder.encode_speech`'s multimodal output exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from slam_fairseq.encoders.multimodal_encoder import MultimodalEncoder
from slam_fairseq.encoders.speech_encoder import SpeechEncoder

__all__ = ["LayerStates", "num_encoder_layers", "check_layers", "speech_layer_states"]


@dataclass
class LayerStates:
    """states: layer number -> (B, T', D) states, zero at padding; padding_mask: (B, T') bool,
    True at padding (the same for every layer: T' is the subsampled length)."""

    states: Dict[int, torch.Tensor]
    padding_mask: torch.Tensor

    def only_layer(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """((B, T', D) states, (B, T') padding mask) of the one layer asked for (``extract_features``)."""
        (states,) = self.states.values()
        return states, self.padding_mask


def num_encoder_layers(speech_encoder: SpeechEncoder, multimodal_encoder: MultimodalEncoder) -> int:
    """N + M: the number of the last layer (the encoder's output)."""
    return len(speech_encoder.conformer.layers) + len(multimodal_encoder.conformer.layers)


def check_layers(layers: Sequence[int], last: int) -> None:
    """Raise ValueError unless every layer number is in 0 .. ``last``."""
    if not layers:
        raise ValueError("no layer asked for")
    outside = sorted({layer for layer in layers if not 0 <= layer <= last})
    if outside:
        raise ValueError(f"layer(s) {outside} do not exist: this encoder has layers 0 (the subsampling's output) "
                         f"to {last} (its output)")


def speech_layer_states(speech_encoder: SpeechEncoder, multimodal_encoder: MultimodalEncoder,
                        features: torch.Tensor, lengths: torch.Tensor,
                        layers: Optional[Sequence[int]] = None) -> LayerStates:
    """The states of ``layers`` (default: the last, N + M) for a batch of speech.

    Args:
        speech_encoder, multimodal_encoder: the SLAM encoder's two stacks.
        features: (B, T, F) padded log-Mel frames, normalised as in training.
        lengths: (B,) real frame counts, each at least 7 (one subsampled frame).
        layers: layer numbers (module docstring).
    """
    num_speech_layers = len(speech_encoder.conformer.layers)
    last = num_encoder_layers(speech_encoder, multimodal_encoder)
    layers = [last] if layers is None else [int(layer) for layer in layers]
    check_layers(layers, last)
    deepest = max(layers)
    subsampled, padding_mask = speech_encoder.subsample(features, lengths)
    keep = padding_mask.unsqueeze(-1)
    hiddens = [subsampled]
    if deepest > 0:
        speech_hiddens = speech_encoder.conformer(
            speech_encoder.dropout(subsampled), padding_mask, return_all_hiddens=True,
            num_layers=min(deepest, num_speech_layers))
        hiddens += speech_hiddens
    if deepest > num_speech_layers:
        speech_output = speech_encoder.output_projection(hiddens[-1]).masked_fill(keep, 0.0)
        marked = multimodal_encoder.mark_speech(speech_output).masked_fill(keep, 0.0)
        hiddens += multimodal_encoder.conformer(marked, padding_mask, return_all_hiddens=True,
                                                num_layers=deepest - num_speech_layers)
    return LayerStates({layer: hiddens[layer].masked_fill(keep, 0.0) for layer in layers}, padding_mask)
