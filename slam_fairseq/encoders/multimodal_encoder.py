"""SLAM multimodal encoder: M Conformer layers over speech, text, or [speech ; text] of a pair."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from slam_fairseq.modules.conformer import ConformerStack
from slam_fairseq.modules.padding import (lengths_to_padding_mask, may_read_device_values,
                                          padding_mask_to_lengths, require)

SPEECH_MODALITY = 0
TEXT_MODALITY = 1


@dataclass
class MultimodalOutput:
    """output: (B, T, D); padding_mask: (B, T); for a pair, speech_lengths (B,) says where each
    row's text starts (the text of row b occupies [speech_lengths[b], speech_lengths[b] + text_lengths[b]))."""

    output: torch.Tensor
    padding_mask: torch.Tensor
    speech_lengths: Optional[torch.Tensor] = None
    text_lengths: Optional[torch.Tensor] = None

    def speech_part(self) -> torch.Tensor:
        """(B, Ts, D) the speech positions of a pair (rows padded past their speech length)."""
        assert self.speech_lengths is not None
        return self.output[:, : int(self.speech_lengths.max())]

    def text_part(self) -> torch.Tensor:
        """(B, Tt, D) the text positions of a pair, gathered back to start at 0 in every row."""
        assert self.speech_lengths is not None and self.text_lengths is not None
        text_length = int(self.text_lengths.max())
        index = self.speech_lengths[:, None] + torch.arange(text_length, device=self.output.device)
        index = index.clamp(max=self.output.shape[1] - 1)
        return self.output.gather(1, index.unsqueeze(-1).expand(-1, -1, self.output.shape[-1]))


def pack_pair(speech: torch.Tensor, speech_padding_mask: torch.Tensor, text: torch.Tensor,
              text_padding_mask: torch.Tensor, width: Optional[int] = None):
    """Concatenate each row's real speech frames and real text tokens, padding only at the end.

    Packing (rather than [padded speech ; padded text]) keeps every row's positions independent of
    the other rows, so a pair gives the same output alone or in a batch. The packed width is
    ``width`` when the caller knows the longest row on the host (checked: no row may be longer;
    on an accelerator by an asynchronous assert); else the longest row's, read on a CPU; on an
    accelerator, where reading it would be a host sync, the sum of the two padded widths (a few
    more padded positions, the same real outputs).
    Returns (packed (B, width, D), padding mask, speech lengths, text lengths).
    """
    speech_lengths = padding_mask_to_lengths(speech_padding_mask)
    text_lengths = padding_mask_to_lengths(text_padding_mask)
    total_lengths = speech_lengths + text_lengths
    if width is not None:
        require(total_lengths.max() <= width, f"a pair has more real positions than the packed width {width} "
                                              "given for its batch (lengths_on_host)")
        packed_length = width
    elif may_read_device_values(total_lengths.device):
        packed_length = int(total_lengths.max())
    else:
        packed_length = speech.shape[1] + text.shape[1]
    speech_length = speech.shape[1]
    positions = torch.arange(packed_length, device=speech.device).unsqueeze(0)
    in_speech = positions < speech_lengths[:, None]
    text_index = (positions - speech_lengths[:, None]).clamp(min=0, max=text.shape[1] - 1) + speech_length
    speech_index = positions.clamp(max=speech_length - 1)
    index = torch.where(in_speech, speech_index, text_index)
    both = torch.cat((speech, text.to(speech.dtype)), dim=1)
    packed = both.gather(1, index.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
    padding_mask = lengths_to_padding_mask(total_lengths, packed_length)
    return packed.masked_fill(padding_mask.unsqueeze(-1), 0.0), padding_mask, speech_lengths, text_lengths


class MultimodalEncoder(nn.Module):
    """
    A learned modality embedding (speech / text) is added to every input position, so that the
    shared layers know which side of a concatenated pair a position comes from.

    Args: the Conformer sizes (see :class:`ConformerStack`).
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_heads: int, kernel_size: int,
                 num_layers: int, conv_norm_groups: int = 1, dropout: float = 0.1,
                 attention_dropout: float = 0.1, activation_dropout: float = 0.1,
                 checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.modality_embedding = nn.Embedding(2, embed_dim)
        nn.init.normal_(self.modality_embedding.weight, std=0.02)
        self.conformer = ConformerStack(num_layers, embed_dim, ffn_dim, num_heads, kernel_size,
                                        conv_norm_groups, dropout, attention_dropout,
                                        activation_dropout, checkpoint_activations)

    def _mark(self, x: torch.Tensor, modality: int) -> torch.Tensor:
        return x + self.modality_embedding.weight[modality].to(x.dtype)

    def mark_speech(self, speech: torch.Tensor) -> torch.Tensor:
        """(B, T, D) speech encoder output plus the speech modality embedding: the input of the
        layers for speech alone (before padding is zeroed)."""
        return self._mark(speech, SPEECH_MODALITY)

    def forward(self, speech: Optional[torch.Tensor] = None,
                speech_padding_mask: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None,
                text_padding_mask: Optional[torch.Tensor] = None, *,
                padded: Optional[bool] = None, packed_width: Optional[int] = None) -> MultimodalOutput:
        """Encode speech alone, text alone, or a pair (both given). Inputs are (B, T, D).

        What the host knows of the batch's lengths, when it does (else None): ``padded``, whether
        any position of the pass (a pair: after packing) is padding, and ``packed_width``, a pair's
        longest packed row (see :func:`pack_pair`)."""
        if speech is not None and text is not None:
            packed, padding_mask, speech_lengths, text_lengths = pack_pair(
                self._mark(speech, SPEECH_MODALITY), speech_padding_mask,
                self._mark(text, TEXT_MODALITY), text_padding_mask, packed_width)
            output = self.conformer(packed, padding_mask, padded=padded)[-1]
            return MultimodalOutput(output.masked_fill(padding_mask.unsqueeze(-1), 0.0), padding_mask,
                                    speech_lengths, text_lengths)
        if speech is not None:
            hidden, padding_mask = self._mark(speech, SPEECH_MODALITY), speech_padding_mask
        elif text is not None:
            hidden, padding_mask = self._mark(text, TEXT_MODALITY), text_padding_mask
        else:
            raise ValueError("the multimodal encoder needs speech, text or both")
        hidden = hidden.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        output = self.conformer(hidden, padding_mask, padded=padded)[-1]
        return MultimodalOutput(output.masked_fill(padding_mask.unsqueeze(-1), 0.0), padding_mask)
