"""fairseq face of SLAM fine-tuning: model ``slam_s2t`` (speech translation / recognition).

The pre-trained SLAM encoder's speech path (speech encoder + multimodal encoder) feeds fairseq's
own ``TransformerDecoder`` through a linear projection from the encoder width to the decoder
width. It trains with fairseq's ``speech_to_text`` task, manifests and criterions, and decodes with
``fairseq-generate``.

Presets: ``slam_s2t_covost`` (the paper: ``slam_paper`` encoder, decoder of 4 layers, embedding
384, FFN 1536, 4 heads), ``slam_s2t_librispeech`` (the same sizes, for ASR) and ``slam_s2t_tiny``
(``slam_tiny`` encoder, 2-layer decoder of width 64; tests and CPU demos).

Options beyond the sizes:

- ``--load-pretrained-slam-from CHECKPOINT``: copy the encoder of a ``slam_pretraining``
  checkpoint when the model is built for a fresh fine-tuning run (see
  :mod:`slam_fairseq.models.pretrained_loading`). Skipped when fairseq is about to restore a
  fine-tuning checkpoint instead (resuming ``fairseq-train``, ``fairseq-generate --path``), and
  once done it is recorded in the saved model config (``pretrained_slam_loaded``).
- ``--freeze-encoder-updates K``: the SLAM encoder runs without gradients for the first K updates
  (as wav2vec 2.0's ``--freeze-finetune-updates``); the projection, decoder and CTC head train.
  Frozen parameters get no gradient at all, so the optimizer skips them. With several GPUs use
  ``--ddp-backend legacy_ddp`` (PyTorch's DDP rejects parameters without gradients).
- CTC: with ``--criterion label_smoothed_cross_entropy_with_ctc --ctc-weight W`` (fairseq's own
  criterion, W > 0) the model gets a linear CTC head (encoder width -> target dictionary) on the
  SLAM encoder output, before the projection. ``--ctc-head`` builds it explicitly. The blank is
  index 0 of the target dictionary (``<s>``, fairseq's bos; what fairseq's ``ctc`` criterion and
  ``F.ctc_loss`` use). CTC targets are the target tokens without ``</s>`` and without the
  prepended language tag (``prepend_tgt_lang_tag``).
- SpecAugment and CMVN come from the data config (``specaugment:``, ``transforms:``); fairseq's
  ``speech_to_text`` dataset applies them to the features before the model sees them.
"""
import contextlib
import logging
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import utils
from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import Embedding, TransformerDecoder
from fairseq.utils import safe_getattr
from torch import Tensor, nn

from slam_fairseq.checkpoint_recovery import recover_for_training_args
from slam_fairseq.compat.fairseq_internals import (drop_config_fields, whole_model_restore,
                                                   record_in_saved_config, weights_restored_by_fairseq)
from slam_fairseq.encoders.config import (BASE_ENCODER, PAPER_ENCODER, TINY_ENCODER, SlamEncoderConfig, config_from,
                                          set_defaults)
from slam_fairseq.encoders.layer_states import LayerStates, speech_layer_states
from slam_fairseq.encoders.slam_encoder import SlamEncoder, build_slam_encoder
from slam_fairseq.models.optional_heads import register_optional_head
from slam_fairseq.models.dictionary_fingerprint import register_fingerprint, set_fingerprint
from slam_fairseq.models.pretrained_loading import (SHAPELESS_ENCODER_SETTINGS, load_pretrained_slam_encoder,
                                                     refuse_pretraining_checkpoint_for_finetune_from)
from slam_fairseq.modules.padding import may_read_device_values, require
from slam_fairseq.modules.short_inputs import ShortInputCounter, extend_short_inputs
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES
from slam_fairseq.objectives.pair_ctc import CTC_BLANK

logger = logging.getLogger(__name__)

TARGET_DICTIONARY_FINGERPRINT = "target_dictionary_fingerprint"  # a buffer saved with the weights

__all__ = ["SlamS2TConfig", "SlamSpeechEncoder", "SlamS2TModel"]

CTC_BLANK_INDEX = CTC_BLANK  # <s> (bos) of a fairseq Dictionary, as in pre-training's pair CTC
CTC_CRITERION = "label_smoothed_cross_entropy_with_ctc"
PRETRAINED_PARTS = ("speech_encoder", "multimodal_encoder")
DEFAULT_MAX_SOURCE_POSITIONS, DEFAULT_MAX_TARGET_POSITIONS = 6000, 1024  # speech_to_text's defaults


@dataclass
class SlamS2TConfig(SlamEncoderConfig):
    """Encoder sizes (``SlamEncoderConfig``), decoder sizes and fine-tuning options.

    The defaults are the paper's ST model (``slam_s2t_covost``).
    """

    decoder_embed_dim: int = field(default=384, metadata={"help": "decoder width"})
    decoder_ffn_embed_dim: int = field(default=1536, metadata={"help": "decoder FFN hidden size"})
    decoder_layers: int = field(default=4, metadata={"help": "decoder layers"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "decoder attention heads"})
    decoder_normalize_before: bool = field(default=True, metadata={"help": "pre-LayerNorm decoder layers"})
    decoder_learned_pos: bool = field(default=False, metadata={"help": "learned (not sinusoidal) positions"})
    decoder_layerdrop: float = field(default=0.0, metadata={"help": "decoder LayerDrop"})
    share_decoder_input_output_embed: bool = field(
        default=True, metadata={"help": "tie the decoder's input embedding and output projection"})
    load_pretrained_slam_from: Optional[str] = field(
        default=None, metadata={"help": "copy the encoder of this slam_pretraining checkpoint when "
                                        "fine-tuning starts (not when fairseq restores a fine-tuning checkpoint)"})
    allow_partial_pretrained_slam: bool = field(
        default=False, metadata={"help": "with --load-pretrained-slam-from: copy the encoder tensors that fit "
                                         "and keep the others random (a WARNING lists them) instead of "
                                         "refusing a checkpoint that does not cover the encoder"})
    freeze_encoder_updates: int = field(
        default=0, metadata={"help": "run the SLAM encoder without gradients for this many updates"})
    ctc_head: bool = field(
        default=False, metadata={"help": "add a linear CTC head on the encoder output (blank = index 0, <s>); "
                                         "on by itself with --criterion label_smoothed_cross_entropy_with_ctc "
                                         "--ctc-weight > 0 (without a CTC loss the head gets no gradient, "
                                         "which PyTorch's DDP refuses)"})
    pretrained_slam_loaded: bool = field(
        default=False, metadata={"help": "set by the model once the pre-trained encoder was copied (or a "
                                         "fine-tuning checkpoint restored), so that the checkpoints it saves "
                                         "never copy it again"})
    input_channels: int = field(default=1, metadata={"help": "set by the speech_to_text task (must be 1)"})
    speaker_to_id: Optional[str] = field(
        default=None, metadata={"help": "set by the speech_to_text task (speaker_set_filename); unused"})


# fairseq's speech_to_text task owns --max-source-positions / --max-target-positions (a model option
# of the same name conflicts with it); the model takes both from the task.
drop_config_fields(SlamS2TConfig, ("max_source_positions",))


# Scores of decoded text: fairseq 0.12's speech_to_text validation computes losses only, never these.
DECODING_SCORES = frozenset({"wer", "cer", "uer", "bleu", "sacrebleu", "chrf", "ter"})


def _refuse_decoding_score_as_best_metric(task) -> None:
    """``--best-checkpoint-metric wer`` (or bleu, ...) would end fine-tuning with fairseq's
    ``KeyError`` at the first validation, before any checkpoint is saved: say so before training."""
    args = getattr(task, "args", None)
    metric = safe_getattr(args, "best_checkpoint_metric", None)
    if isinstance(metric, str) and metric.lower() in DECODING_SCORES and not safe_getattr(args, "path", None):
        raise ValueError(
            f"--best-checkpoint-metric {metric}: fairseq's speech_to_text validation logs losses (loss, nll_loss, "
            f"ppl, accuracy with --report-accuracy, ctc_loss with the CTC criterion), not {metric}, and fairseq-train "
            f"would stop at the first validation without a checkpoint. Choose the best checkpoint by loss (the "
            f"default), or keep several (--keep-last-epochs, --keep-interval-updates) and score them with "
            f"fairseq-generate --scoring {'wer' if metric.lower() in ('wer', 'cer', 'uer') else 'sacrebleu'}")


def _criterion_wants_ctc(task) -> bool:
    """True when the running command trains with fairseq's CTC criterion and a CTC weight > 0."""
    args = getattr(task, "args", None)
    return (safe_getattr(args, "criterion", None) == CTC_CRITERION
            and float(safe_getattr(args, "ctc_weight", 0.0) or 0.0) > 0.0)


class SlamSpeechEncoder(FairseqEncoder):
    """The SLAM speech path as a fairseq encoder: features -> speech encoder -> multimodal
    encoder -> linear projection to the decoder width.

    Submodule names equal those of a ``slam`` checkpoint's ``encoder.*`` keys
    (``speech_encoder``, ``multimodal_encoder``); the text encoder is not kept.

    Args:
        slam_encoder: a :class:`SlamEncoder` (its speech and multimodal encoders are taken over).
        output_dim: decoder width.
        freeze_updates: updates during which the SLAM encoder runs without gradients.
        max_source_positions: longest input, in feature frames.
    """

    def __init__(self, slam_encoder: SlamEncoder, output_dim: int, freeze_updates: int = 0,
                 max_source_positions: int = 6000) -> None:
        super().__init__(dictionary=None)
        self.speech_encoder = slam_encoder.speech_encoder
        self.multimodal_encoder = slam_encoder.multimodal_encoder
        # Masked speech modelling only: no gradient ever reaches it when fine-tuning.
        self.speech_encoder.mask_embedding.requires_grad_(False)
        self.embed_dim = slam_encoder.embed_dim
        self.output_projection = nn.Linear(self.embed_dim, output_dim)
        self.freeze_updates = freeze_updates
        self.num_updates = 0
        self.max_source_positions = max_source_positions
        self.short_inputs = ShortInputCounter(_warn_short_inputs)
        # set by SlamS2TModel.set_beam_size: the decoder's cross-attention caches what it reads
        self.beamable_decoder = False

    def is_frozen(self) -> bool:
        return self.num_updates < self.freeze_updates

    def forward(self, src_tokens: Tensor, src_lengths: Tensor):
        """
        Args:
            src_tokens: (B, T, F) padded log-Mel frames (fairseq's S2T name).
            src_lengths: (B,) frame counts.
        Returns:
            fairseq's encoder-out dict: ``encoder_out`` [(T', B, D_decoder)],
            ``encoder_padding_mask`` [(B, T')], and ``slam_encoder_out`` [(T', B, D_encoder)] (the
            SLAM encoder output, for the CTC head).
        """
        src_tokens, src_lengths = self._extend_short_inputs(src_tokens, src_lengths)
        with torch.no_grad() if self.is_frozen() else contextlib.nullcontext():
            speech = self.speech_encoder(src_tokens, src_lengths)
            joint = self.multimodal_encoder(speech=speech.output, speech_padding_mask=speech.padding_mask)
        states = joint.output.transpose(0, 1)
        return {
            "encoder_out": [self.output_projection(states)],
            "encoder_padding_mask": [joint.padding_mask],
            "encoder_embedding": [],
            "encoder_states": [],
            "src_tokens": [],
            "src_lengths": [],
            "slam_encoder_out": [states],
        }

    def layer_states(self, features: Tensor, lengths: Tensor, layers: Optional[Sequence[int]] = None) -> LayerStates:
        """The SLAM encoder's states of the given layers (numbering: :mod:`layer_states`; the
        projection to the decoder's width is not a layer). Utterances under 7 frames are extended
        as :meth:`forward` extends them (one state each)."""
        features, lengths, _ = extend_short_inputs(features, lengths)
        return speech_layer_states(self.speech_encoder, self.multimodal_encoder, features, lengths, layers)

    def extract_features(self, features: Tensor, lengths: Tensor,
                         output_layer: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """As :meth:`SlamEncoder.extract_features`: ((B, T', D) states, (B, T') padding mask)."""
        return self.layer_states(features, lengths, None if output_layer is None else [output_layer]).only_layer()

    @property
    def num_short_inputs(self) -> int:
        """Utterances extended so far that the host has counted (:class:`ShortInputCounter`)."""
        return self.short_inputs.total

    def _extend_short_inputs(self, features: Tensor, lengths: Tensor):
        """Utterances under 7 frames get zero frames up to 7 (``short_inputs``); counted in a
        warning at the 1st, 2nd, 4th, 8th, ... such utterance."""
        features, lengths, short = extend_short_inputs(features, lengths)
        self.short_inputs.add(short, training=self.training)
        return features, lengths

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor):
        """Beam search reordering, ``slam_encoder_out`` included (the CTC head reads it when decoding).

        With a beamable decoder (:attr:`beamable_decoder`) the states are left as they are, one row
        per sentence: the decoder's cross-attention reads them at the first step only, from then on
        its own per-sentence cache, which fairseq reorders (as for BART); joint CTC/attention
        search reads the CTC input at the first step too, and repeats it per hypothesis."""
        if self.beamable_decoder:
            return encoder_out
        return {
            "encoder_out": [x.index_select(1, new_order) for x in encoder_out["encoder_out"]],
            "encoder_padding_mask": [x.index_select(0, new_order) for x in encoder_out["encoder_padding_mask"]],
            "encoder_embedding": [],
            "encoder_states": [x.index_select(1, new_order) for x in encoder_out["encoder_states"]],
            "src_tokens": [],
            "src_lengths": [],
            "slam_encoder_out": [x.index_select(1, new_order) for x in encoder_out.get("slam_encoder_out", [])],
        }

    def max_positions(self) -> int:
        return self.max_source_positions

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates
        self.short_inputs.flush(num_updates)


def _warn_short_inputs(total: int) -> None:
    logger.warning(f"{total} utterance(s) shorter than {MIN_INPUT_FRAMES} feature frames so far were extended "
                   f"with zero frames to {MIN_INPUT_FRAMES} (one encoder frame each)")


def _task_max_positions(task):
    """(longest input in frames, longest target in tokens): the task's, else fairseq's S2T defaults."""
    positions = task.max_positions() if hasattr(task, "max_positions") else None
    if isinstance(positions, tuple) and len(positions) == 2 and all(positions):
        return int(positions[0]), int(positions[1])
    return DEFAULT_MAX_SOURCE_POSITIONS, DEFAULT_MAX_TARGET_POSITIONS


def _decoder_args(cfg: SlamS2TConfig, max_target_positions: int) -> Namespace:
    """The flat arguments fairseq's ``TransformerDecoder`` reads (``TransformerConfig.from_namespace``).

    ``encoder_embed_dim`` is the decoder width: the encoder output is projected to it.
    """
    return Namespace(
        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, activation_fn="relu",
        decoder_embed_dim=cfg.decoder_embed_dim, decoder_output_dim=cfg.decoder_embed_dim,
        decoder_input_dim=cfg.decoder_embed_dim, decoder_ffn_embed_dim=cfg.decoder_ffn_embed_dim,
        decoder_layers=cfg.decoder_layers, decoder_attention_heads=cfg.decoder_attention_heads,
        decoder_normalize_before=cfg.decoder_normalize_before, decoder_learned_pos=cfg.decoder_learned_pos,
        decoder_layerdrop=cfg.decoder_layerdrop,
        share_decoder_input_output_embed=cfg.share_decoder_input_output_embed,
        no_token_positional_embeddings=False, no_scale_embedding=False, layernorm_embedding=False,
        adaptive_softmax_cutoff=None, tie_adaptive_weights=False,
        max_target_positions=max_target_positions, encoder_embed_dim=cfg.decoder_embed_dim,
        checkpoint_activations=cfg.checkpoint_activations,
    )


@register_model("slam_s2t", dataclass=SlamS2TConfig)
class SlamS2TModel(FairseqEncoderDecoderModel):
    """SLAM encoder + fairseq Transformer decoder, for fairseq's ``speech_to_text`` task.

    Args:
        encoder: a :class:`SlamSpeechEncoder`.
        decoder: fairseq's ``TransformerDecoder``.
        ctc_projection: optional linear CTC head on the SLAM encoder output.
        ctc_target_prefix_size: tokens prepended to each target (1 with ``prepend_tgt_lang_tag``),
            left out of the CTC target.
    """

    def __init__(self, cfg: SlamS2TConfig, encoder: SlamSpeechEncoder, decoder: TransformerDecoder,
                 ctc_projection: Optional[nn.Linear] = None, ctc_target_prefix_size: int = 0) -> None:
        super().__init__(encoder, decoder)
        self.cfg = cfg
        self.ctc_projection = ctc_projection
        self.ctc_target_prefix_size = ctc_target_prefix_size
        # a checkpoint trained with the CTC head loads into a model without it, and back
        register_optional_head(self, "ctc_projection", "--ctc-head or --ctc-weight")
        # the target dictionary's fingerprint, saved with the weights and checked on every load
        register_fingerprint(self, TARGET_DICTIONARY_FINGERPRINT, "target dictionary")

    @classmethod
    def build_model(cls, cfg, task) -> "SlamS2TModel":
        given_cfg = cfg
        # fairseq loads checkpoint_last.pt after building the model: an unreadable one is replaced first.
        recover_for_training_args(getattr(task, "args", None))
        _refuse_decoding_score_as_best_metric(task)
        restored = whole_model_restore(task)
        if restored is not None:
            refuse_pretraining_checkpoint_for_finetune_from(restored[1], restored[0])
        cfg = config_from(cfg, SlamS2TConfig)
        if cfg.input_channels != 1:
            raise ValueError(f"slam_s2t reads single-channel features; the data config has "
                             f"input_channels={cfg.input_channels}")
        max_source_positions, max_target_positions = _task_max_positions(task)
        dictionary = task.target_dictionary
        encoder = SlamSpeechEncoder(build_slam_encoder(cfg, len(dictionary), dictionary.pad()),
                                    cfg.decoder_embed_dim, cfg.freeze_encoder_updates, max_source_positions)
        if cfg.load_pretrained_slam_from:
            cls._load_pretrained(cfg, given_cfg, task, encoder)
        embed_tokens = Embedding(len(dictionary), cfg.decoder_embed_dim, dictionary.pad())
        decoder = TransformerDecoder(_decoder_args(cfg, max_target_positions), dictionary, embed_tokens)
        ctc_projection = None
        if cfg.ctc_head or _criterion_wants_ctc(task):
            ctc_projection = nn.Linear(encoder.embed_dim, len(dictionary))
            if not cfg.ctc_head:
                record_in_saved_config(given_cfg, "ctc_head", True)
        data_cfg = getattr(task, "data_cfg", None)
        prefix_size = 1 if data_cfg is not None and getattr(data_cfg, "prepend_tgt_lang_tag", False) else 0
        model = cls(cfg, encoder, decoder, ctc_projection, prefix_size)
        set_fingerprint(model, TARGET_DICTIONARY_FINGERPRINT, dictionary.symbols)
        return model

    @staticmethod
    def _load_pretrained(cfg: SlamS2TConfig, given_cfg, task, encoder: SlamSpeechEncoder) -> None:
        path = cfg.load_pretrained_slam_from
        if cfg.pretrained_slam_loaded:
            logger.info(f"not copying the pre-trained encoder from {path}: this model config comes from a "
                        f"fine-tuning checkpoint that holds it already")
            return
        reason = weights_restored_by_fairseq(task)
        if reason is not None:
            logger.info(f"not copying the pre-trained encoder from {path}: {reason}")
        else:
            load_pretrained_slam_encoder(encoder, path, PRETRAINED_PARTS, cfg.allow_partial_pretrained_slam,
                                         {name: getattr(cfg, name) for name in SHAPELESS_ENCODER_SETTINGS})
        # Either way the weights the run saves descend from the pre-trained encoder.
        record_in_saved_config(given_cfg, "pretrained_slam_loaded", True)

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, prev_output_tokens: Tensor):
        """Teacher-forced decoder output ``(logits (B, T, V), extra)``; ``extra["encoder_out"]`` is
        the encoder-out dict (for the CTC loss)."""
        encoder_out = self.encoder(src_tokens=src_tokens, src_lengths=src_lengths)
        logits, extra = self.decoder(prev_output_tokens=prev_output_tokens, encoder_out=encoder_out)
        extra["encoder_out"] = encoder_out
        return logits, extra

    # ---- beam search: fairseq's beamable encoder-decoder attention ----

    def set_beam_size(self, beam_size: int) -> None:
        """Called by fairseq's ``SequenceGenerator``: with ``beam_size > 1`` each decoder layer's
        cross-attention projects and caches the encoder states once per sentence instead of once
        per hypothesis, beam reordering copies that cache only when sentences finish, and the encoder
        states are not reordered at all (the same scores; for beam 10 the cache is 10x smaller and
        the per-step copies of the encoder states are gone). Training mode turns
        it off again (:meth:`train`): it assumes that a batch holds ``beam_size`` copies of each
        sentence."""
        beamable = False
        for layer in self.decoder.layers:
            attention = getattr(layer, "encoder_attn", None)
            if attention is not None and hasattr(attention, "set_beam_size"):
                attention.set_beam_size(beam_size)
                beamable = True
        self.encoder.beamable_decoder = beamable and beam_size > 1

    def train(self, mode: bool = True) -> "SlamS2TModel":
        if mode:
            self.set_beam_size(1)
        return super().train(mode)

    # ---- CTC: the interface of fairseq's label_smoothed_cross_entropy_with_ctc criterion ----

    def get_ctc_output(self, net_output, sample: Optional[Dict[str, Tensor]] = None):
        """Returns ((T', B, V) float log-probabilities, (B,) output lengths)."""
        if self.ctc_projection is None:
            raise RuntimeError("this slam_s2t model has no CTC head: build it with --ctc-head, or train with "
                               f"--criterion {CTC_CRITERION} --ctc-weight W (W > 0) from the start")
        encoder_out = net_output[1]["encoder_out"]
        states = encoder_out["slam_encoder_out"][0]
        log_probs = utils.log_softmax(self.ctc_projection(states).float(), dim=-1)
        lengths = (~encoder_out["encoder_padding_mask"][0]).long().sum(dim=1)
        return log_probs, lengths

    def get_ctc_target(self, sample: Dict[str, Tensor]):
        """Returns ((B, L) targets, (B,) lengths): the target tokens without the language tag and
        ``</s>`` (the dataset's targets end with ``</s>``)."""
        prefix = self.ctc_target_prefix_size
        lengths = sample["target_lengths"] - 1 - prefix
        target = sample["target"]
        if may_read_device_values(lengths.device):
            width = int(lengths.max())
        else:  # fairseq's collater pads the targets to the longest: no value needs to be read
            width = target.shape[1] - 1 - prefix
            require(lengths.max() == width, "CTC targets: the target batch is wider than its longest "
                    "target_lengths + 1 (the criterion masks them to the longest length)")
        return target[:, prefix: prefix + width], lengths


PAPER_DECODER = dict(decoder_embed_dim=384, decoder_ffn_embed_dim=1536, decoder_layers=4,
                     decoder_attention_heads=4, decoder_normalize_before=True, share_decoder_input_output_embed=True)
TINY_DECODER = dict(PAPER_DECODER, decoder_embed_dim=64, decoder_ffn_embed_dim=128, decoder_layers=2)


@register_model_architecture("slam_s2t", "slam_s2t_covost")
def slam_s2t_covost(cfg) -> None:
    """The paper's ST model: ``slam_paper`` encoder; decoder 4 layers, 384 wide, FFN 1536, 4 heads."""
    set_defaults(cfg, **PAPER_DECODER, **PAPER_ENCODER)


@register_model_architecture("slam_s2t", "slam_s2t_librispeech")
def slam_s2t_librispeech(cfg) -> None:
    """ASR: the same sizes as ``slam_s2t_covost``."""
    slam_s2t_covost(cfg)


@register_model_architecture("slam_s2t", "slam_s2t_base")
def slam_s2t_base(cfg) -> None:
    """``slam_base`` encoder with the paper's decoder."""
    set_defaults(cfg, **PAPER_DECODER, **BASE_ENCODER)


@register_model_architecture("slam_s2t", "slam_s2t_tiny")
def slam_s2t_tiny(cfg) -> None:
    """Tests and CPU demos: ``slam_tiny`` encoder (D=64, 2 + 2 layers); decoder 2 layers, 64 wide."""
    set_defaults(cfg, **TINY_DECODER, **TINY_ENCODER)
