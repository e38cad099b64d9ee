"""The SLAM encoder: text encoder, speech encoder and the shared multimodal encoder together."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from slam_fairseq.encoders.multimodal_encoder import MultimodalEncoder, MultimodalOutput
from slam_fairseq.encoders.speech_encoder import SpeechEncoder, SpeechEncoderOutput
from slam_fairseq.encoders.text_encoder import TextEncoder


@dataclass
class SlamEncoderSizes:
    """The numbers a preset chooses (see ``slam_fairseq.models.slam`` for the presets)."""

    vocab_size: int
    padding_idx: int
    embed_dim: int = 1024
    ffn_dim: int = 4096
    num_heads: int = 8
    kernel_size: int = 5
    speech_layers: int = 8
    multimodal_layers: int = 16
    conv_norm_groups: int = 1
    input_dim: int = 80
    conv_channels: int = 256
    max_text_positions: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    checkpoint_activations: bool = False


class SlamEncoder(nn.Module):
    """Speech-only input: speech encoder + multimodal encoder; text-only: text encoder + multimodal
    encoder; a pair: both encoders' outputs, packed per row, through the multimodal encoder."""

    def __init__(self, sizes: SlamEncoderSizes) -> None:
        super().__init__()
        self.sizes = sizes
        shared = dict(embed_dim=sizes.embed_dim, ffn_dim=sizes.ffn_dim, num_heads=sizes.num_heads,
                      kernel_size=sizes.kernel_size, conv_norm_groups=sizes.conv_norm_groups,
                      dropout=sizes.dropout, attention_dropout=sizes.attention_dropout,
                      activation_dropout=sizes.activation_dropout,
                      checkpoint_activations=sizes.checkpoint_activations)
        self.text_encoder = TextEncoder(sizes.vocab_size, sizes.embed_dim, sizes.padding_idx,
                                        sizes.max_text_positions, sizes.dropout)
        self.speech_encoder = SpeechEncoder(sizes.input_dim, sizes.conv_channels,
                                            num_layers=sizes.speech_layers, **shared)
        self.multimodal_encoder = MultimodalEncoder(num_layers=sizes.multimodal_layers, **shared)

    def encode_speech(self, features: torch.Tensor, lengths: torch.Tensor,
                      frame_mask: Optional[torch.Tensor] = None):
        """Returns (SpeechEncoderOutput, MultimodalOutput) for speech alone."""
        speech = self.speech_encoder(features, lengths, frame_mask)
        return speech, self.multimodal_encoder(speech=speech.output, speech_padding_mask=speech.padding_mask)

    def encode_text(self, tokens: torch.Tensor) -> MultimodalOutput:
        text, text_padding_mask = self.text_encoder(tokens)
        return self.multimodal_encoder(text=text, text_padding_mask=text_padding_mask)

    def encode_pair(self, features: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor,
                    frame_mask: Optional[torch.Tensor] = None):
        """Returns (SpeechEncoderOutput, MultimodalOutput of the packed [speech ; text])."""
        speech = self.speech_encoder(features, lengths, frame_mask)
        text, text_padding_mask = self.text_encoder(tokens)
        joint = self.multimodal_encoder(speech=speech.output, speech_padding_mask=speech.padding_mask,
                                        text=text, text_padding_mask=text_padding_mask)
        return speech, joint

    def encode_multimodal(self, speech: SpeechEncoderOutput, tokens: Optional[torch.Tensor] = None
                          ) -> MultimodalOutput:
        """The multimodal encoder over a speech encoder output alone, or packed with ``tokens``
        (B, L): one speech pass can serve several multimodal passes."""
        if tokens is None:
            return self.multimodal_encoder(speech=speech.output, speech_padding_mask=speech.padding_mask)
        text, text_padding_mask = self.text_encoder(tokens)
        return self.multimodal_encoder(speech=speech.output, speech_padding_mask=speech.padding_mask,
                                       text=text, text_padding_mask=text_padding_mask)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> MultimodalOutput:
        """The fine-tuning path: speech in, multimodal encoder states out."""
        return self.encode_speech(features, lengths)[1]
