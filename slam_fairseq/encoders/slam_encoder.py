"""The SLAM encoder: text encoder, speech encoder and the shared multimodal encoder together."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from fairseq.distributed import fsdp_wrap
from torch import nn

from slam_fairseq.encoders.config import SlamEncoderConfig
from slam_fairseq.encoders.layer_states import LayerStates, speech_layer_states
from slam_fairseq.encoders.multimodal_encoder import MultimodalEncoder, MultimodalOutput
from slam_fairseq.encoders.speech_encoder import SpeechEncoder, SpeechEncoderOutput
from slam_fairseq.encoders.text_encoder import TextEncoder


class SlamEncoder(nn.Module):
    """Speech-only input: speech encoder + multimodal encoder; text-only: text encoder + multimodal
    encoder; a pair: both encoders' outputs, packed per row, through the multimodal encoder."""

    def __init__(self, cfg: SlamEncoderConfig, vocab_size: int, padding_idx: int) -> None:
        """
        Args:
            cfg: the sizes (``slam_fairseq.encoders.config.SlamEncoderConfig``; the presets set them).
            vocab_size, padding_idx: of the text dictionary.
        """
        super().__init__()
        self.embed_dim = cfg.encoder_embed_dim
        shared = dict(embed_dim=cfg.encoder_embed_dim, ffn_dim=cfg.encoder_ffn_embed_dim,
                      num_heads=cfg.encoder_attention_heads, kernel_size=cfg.conv_kernel_size,
                      conv_norm_groups=cfg.conv_norm_groups, dropout=cfg.dropout,
                      attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
                      checkpoint_activations=cfg.checkpoint_activations)
        self.text_encoder = TextEncoder(vocab_size, cfg.encoder_embed_dim, padding_idx, cfg.max_text_positions,
                                        cfg.dropout)
        self.speech_encoder = SpeechEncoder(cfg.input_feat_per_channel, cfg.subsampling_conv_channels,
                                            num_layers=cfg.speech_encoder_layers, **shared)
        self.multimodal_encoder = MultimodalEncoder(num_layers=cfg.multimodal_encoder_layers, **shared)

    def encode_speech(self, features: torch.Tensor, lengths: torch.Tensor,
                      frame_mask: Optional[torch.Tensor] = None, *, padded: Optional[bool] = None):
        """Returns (SpeechEncoderOutput, MultimodalOutput) for speech alone. ``padded``: whether
        any subsampled frame is padding, when the host knows it."""
        speech = self.speech_encoder(features, lengths, frame_mask, padded=padded)
        return speech, self.encode_multimodal(speech)

    def encode_text(self, tokens: torch.Tensor, *, padded: Optional[bool] = None) -> MultimodalOutput:
        """``padded``: whether any position of ``tokens`` is padding, when the host knows it."""
        text, text_padding_mask = self.text_encoder(tokens)
        return self.multimodal_encoder(text=text, text_padding_mask=text_padding_mask, padded=padded)

    def encode_pair(self, features: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor,
                    frame_mask: Optional[torch.Tensor] = None):
        """Returns (SpeechEncoderOutput, MultimodalOutput of the packed [speech ; text])."""
        speech = self.speech_encoder(features, lengths, frame_mask)
        return speech, self.encode_multimodal(speech, tokens)

    def encode_multimodal(self, speech: SpeechEncoderOutput, tokens: Optional[torch.Tensor] = None, *,
                          packed_width: Optional[int] = None, padded: Optional[bool] = None) -> MultimodalOutput:
        """The multimodal encoder over a speech encoder output alone, or packed with ``tokens``
        (B, L): one speech pass can serve several multimodal passes.

        For a pair, what the host knows, when it does: ``packed_width``, the longest row of
        [speech ; text], and ``padded``, whether any row is shorter. Speech alone takes
        ``speech.padded``."""
        if tokens is None:
            return self.multimodal_encoder(speech=speech.output, speech_padding_mask=speech.padding_mask,
                                           padded=speech.padded)
        text, text_padding_mask = self.text_encoder(tokens)
        return self.multimodal_encoder(speech=speech.output, speech_padding_mask=speech.padding_mask,
                                       text=text, text_padding_mask=text_padding_mask,
                                       padded=padded, packed_width=packed_width)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> MultimodalOutput:
        """The fine-tuning path: speech in, multimodal encoder states out."""
        return self.encode_speech(features, lengths)[1]

    def layer_states(self, features: torch.Tensor, lengths: torch.Tensor,
                     layers: Optional[Sequence[int]] = None) -> LayerStates:
        """The states of the given layers for speech alone (numbering: :mod:`layer_states`)."""
        return speech_layer_states(self.speech_encoder, self.multimodal_encoder, features, lengths, layers)

    def extract_features(self, features: torch.Tensor, lengths: torch.Tensor,
                         output_layer: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) log-Mel frames and (B,) frame counts -> ((B, T', D) states of ``output_layer``
        (0: the subsampling's output ... N + M, the default: the encoder's output), (B, T') padding
        mask, True at padding). Call it in eval mode for features without dropout."""
        return self.layer_states(features, lengths, None if output_layer is None else [output_layer]).only_layer()


def build_slam_encoder(cfg: SlamEncoderConfig, vocab_size: int, padding_idx: int) -> SlamEncoder:
    """Build the encoder, compile each Conformer layer with ``--compile-layers``, and wrap each
    for FSDP (a no-op outside FSDP)."""
    encoder = SlamEncoder(cfg, vocab_size, padding_idx)
    for stack in (encoder.speech_encoder.conformer, encoder.multimodal_encoder.conformer):
        for index, layer in enumerate(stack.layers):
            if cfg.compile_layers:  # in place: parameter names (checkpoints) do not change
                layer.compile(backend=cfg.compile_backend, dynamic=True)
            stack.layers[index] = fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap)
    return encoder
