"""One description of the SLAM encoder's sizes: the fairseq config and its presets.

``SlamEncoderConfig`` is the part of a model config that shapes the encoder; the pre-training
model ``slam`` and the fine-tuning model ``slam_s2t`` both extend it, so a pre-trained encoder and
the encoder it initialises are described by the same fields. The size presets below are the
numbers behind ``--arch slam_paper / slam_base / slam_tiny`` (and the ``slam_s2t_*`` ones); the
encoder itself and its builder are in :mod:`slam_fairseq.encoders.slam_encoder`.

No ``from __future__ import annotations`` here: fairseq reads the dataclass field types as types.
"""

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Dict, Type, TypeVar

from fairseq.dataclass import FairseqDataclass
from fairseq.utils import safe_getattr

DEFAULT_MIN_PARAMS_TO_WRAP = int(1e8)

ConfigT = TypeVar("ConfigT")


@dataclass
class SlamEncoderConfig(FairseqDataclass):
    """Encoder sizes; the defaults are the paper's (``slam_paper``)."""

    encoder_embed_dim: int = field(default=1024, metadata={"help": "model width of all encoders"})
    encoder_ffn_embed_dim: int = field(default=4096, metadata={"help": "Conformer FFN hidden size"})
    encoder_attention_heads: int = field(default=8, metadata={"help": "attention heads"})
    speech_encoder_layers: int = field(default=8, metadata={"help": "N: speech Conformer layers"})
    multimodal_encoder_layers: int = field(default=16, metadata={"help": "M: multimodal Conformer layers"})
    conv_kernel_size: int = field(default=5, metadata={"help": "depthwise conv kernel (odd)"})
    conv_norm_groups: int = field(default=1, metadata={"help": "GroupNorm groups in the conv module"})
    subsampling_conv_channels: int = field(default=256, metadata={"help": "channels of the two Conv2d"})
    input_feat_per_channel: int = field(default=80, metadata={"help": "log-Mel bins"})
    dropout: float = field(default=0.1, metadata={"help": "dropout"})
    attention_dropout: float = field(default=0.1, metadata={"help": "attention dropout"})
    activation_dropout: float = field(default=0.1, metadata={"help": "dropout after the FFN activation"})
    max_source_positions: int = field(default=6000, metadata={"help": "longest speech input, in feature frames"})
    max_text_positions: int = field(default=1024, metadata={"help": "longest text input, in tokens"})
    checkpoint_activations: bool = field(
        default=False, metadata={"help": "recompute each Conformer layer in backward to save memory"})
    min_params_to_wrap: int = field(
        default=DEFAULT_MIN_PARAMS_TO_WRAP,
        metadata={"help": "with --ddp-backend fully_sharded, wrap Conformer layers of at least this many parameters"})
    compile_layers: bool = field(
        default=False, metadata={"help": "torch.compile each Conformer layer (the same outputs, fused kernels; "
                                         "the first updates of each new shape compile)"})
    compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend for --compile-layers"})


# The encoder sizes of each preset (the heads' and the decoder's live with their models).
PAPER_ENCODER: Dict[str, Any] = dict(
    encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=8, speech_encoder_layers=8,
    multimodal_encoder_layers=16, conv_kernel_size=5, subsampling_conv_channels=256)
BASE_ENCODER: Dict[str, Any] = dict(
    encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_attention_heads=8, speech_encoder_layers=6,
    multimodal_encoder_layers=10, conv_kernel_size=5, subsampling_conv_channels=256)
TINY_ENCODER: Dict[str, Any] = dict(
    encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4, speech_encoder_layers=2,
    multimodal_encoder_layers=2, conv_kernel_size=5, subsampling_conv_channels=32, dropout=0.1,
    attention_dropout=0.0, activation_dropout=0.0)


def set_defaults(cfg, **values: Any) -> None:
    """A preset: set each value on ``cfg`` unless the command line or a config gave it already."""
    for name, value in values.items():
        setattr(cfg, name, safe_getattr(cfg, name, value))


def config_from(cfg, config_class: Type[ConfigT] = SlamEncoderConfig) -> ConfigT:
    """A dataclass config from an argparse Namespace or an OmegaConf node (missing keys: defaults)."""
    values = {}
    for dataclass_field in fields(config_class):
        if dataclass_field.name.startswith("_"):
            continue
        default = dataclass_field.default
        if dataclass_field.default_factory is not MISSING:
            default = dataclass_field.default_factory()
        values[dataclass_field.name] = safe_getattr(cfg, dataclass_field.name, default)
    return config_class(**values)
