"""fairseq face of the SLAM encoder: model ``slam`` with presets ``slam_tiny`` and ``slam_paper``.

The maths lives in ``slam_fairseq.encoders`` and ``slam_fairseq.objectives``; this module maps
fairseq configuration onto :class:`SlamEncoderSizes`, adds the pre-training heads, registers presets,
and gives the criterion ``slam_multitask`` what it needs for each modality of a pre-training batch
(docs/pretraining_batches.md): ``forward_speech``, ``forward_text``, ``forward_pair``, all reachable
through ``forward(speech=..., text=..., pair=...)`` so that a DDP wrapper sees the call.
"""

from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Sequence, Tuple

import torch
from fairseq.modules import GradMultiply, GumbelVectorQuantizer
from torch import nn

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from fairseq.utils import safe_getattr

from slam_fairseq.encoders.slam_encoder import SlamEncoder, SlamEncoderSizes
from slam_fairseq.encoders.speech_encoder import SpeechEncoderOutput
from slam_fairseq.modules.random_projection_quantizer import RandomProjectionQuantizer
from slam_fairseq.modules.subsampling import subsampled_length
from slam_fairseq.objectives.msm import CodePredictionHead
from slam_fairseq.objectives.pair_ctc import CTC_BLANK, Speller, transcript_targets
from slam_fairseq.objectives.span_masking import TextPredictionHead
from slam_fairseq.objectives.stm import PairMatchingClassifier

SUBSAMPLING_FACTOR = 4  # two stride-2 convolutions
DEFAULT_MIN_PARAMS_TO_WRAP = int(1e8)


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


def config_from(cfg, config_class=SlamEncoderConfig):
    """A dataclass config from an argparse Namespace or an OmegaConf node (missing keys: defaults)."""
    values = {}
    for dataclass_field in fields(config_class):
        if dataclass_field.name.startswith("_"):
            continue
        default = config_class.__dataclass_fields__[dataclass_field.name].default
        if callable(getattr(dataclass_field, "default_factory", None)):
            default = dataclass_field.default_factory()
        values[dataclass_field.name] = safe_getattr(cfg, dataclass_field.name, default)
    return config_class(**values)


def encoder_sizes(cfg: SlamEncoderConfig, vocab_size: int, padding_idx: int) -> SlamEncoderSizes:
    return SlamEncoderSizes(
        vocab_size=vocab_size, padding_idx=padding_idx, embed_dim=cfg.encoder_embed_dim,
        ffn_dim=cfg.encoder_ffn_embed_dim, num_heads=cfg.encoder_attention_heads,
        kernel_size=cfg.conv_kernel_size, speech_layers=cfg.speech_encoder_layers,
        multimodal_layers=cfg.multimodal_encoder_layers, conv_norm_groups=cfg.conv_norm_groups,
        input_dim=cfg.input_feat_per_channel, conv_channels=cfg.subsampling_conv_channels,
        max_text_positions=cfg.max_text_positions, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
        checkpoint_activations=cfg.checkpoint_activations)


def build_slam_encoder(cfg: SlamEncoderConfig, vocab_size: int, padding_idx: int) -> SlamEncoder:
    """Build the encoder, compile each Conformer layer with ``--compile-layers``, and wrap each
    for FSDP (a no-op outside FSDP)."""
    encoder = SlamEncoder(encoder_sizes(cfg, vocab_size, padding_idx))
    for stack in (encoder.speech_encoder.conformer, encoder.multimodal_encoder.conformer):
        for index, layer in enumerate(stack.layers):
            if cfg.compile_layers:  # in place: parameter names (checkpoints) do not change
                layer.compile(backend=cfg.compile_backend, dynamic=True)
            stack.layers[index] = fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap)
    return encoder


@dataclass
class SlamConfig(SlamEncoderConfig):
    """Configuration of the ``slam`` model: the encoder plus the pre-training heads' sizes."""

    quantizer_codebook_size: int = field(
        default=1024, metadata={"help": "MSM quantizer: entries per codebook group (w2v-BERT: 1024)"})
    quantizer_groups: int = field(
        default=1, metadata={"help": "MSM quantizer: codebook groups (w2v-BERT: 1); code ids are "
                                     "predicted per group"})
    quantizer_codevector_dim: int = field(
        default=256, metadata={"help": "width of the codevectors and of the speech output projection "
                                       "compared with them by the contrastive loss"})
    quantizer_temperature: Tuple[float, float, float] = field(
        default=(2, 0.5, 0.999995),
        metadata={"help": "Gumbel-softmax temperature (start, end, decay per update), as wav2vec 2.0"})
    quantizer_input_grad_scale: float = field(
        default=1.0,
        metadata={"help": "scales the gradient that flows from the quantizer back into the "
                          "subsampling layers: 1 trains them through the quantizer as w2v-BERT does, "
                          "0 detaches the quantizer input, 0.1 is wav2vec 2.0 base's feature_grad_mult. "
                          "If code_perplexity falls towards 1 (codebook collapse), raise the "
                          "criterion's --diversity-weight first, or lower this"})
    quantizer_input: ChoiceEnum(["subsampled", "features"]) = field(
        default="subsampled",
        metadata={"help": "what the quantizer reads: 'subsampled' is w2v-BERT's (the learned Conv2d "
                          "subsampling output); 'features' stacks the normalized log-Mel frames under "
                          "each subsampled frame (BEST-RQ), fixed targets that learned features cannot "
                          "drag into one code"})
    quantizer_type: ChoiceEnum(["gumbel", "random_projection"]) = field(
        default="gumbel",
        metadata={"help": "MSM targets: 'gumbel' is w2v-BERT's learned Gumbel-softmax quantizer; "
                          "'random_projection' is a frozen random projection + codebook (BEST-RQ) "
                          "that cannot collapse, for short or small-batch runs"})
    pair_ctc: bool = field(
        default=False,
        metadata={"help": "mSLAM's CTC loss on the speech side of pairs: the pair's speech alone, "
                          "unmasked, through the whole encoder, then a linear head spells its transcript "
                          "(weighted by slam_multitask's --pair-ctc-weight). Not in SLAM; it aligns "
                          "speech with text early, which small runs need (blank: <s>)"})
    pair_ctc_units: ChoiceEnum(["characters", "tokens"]) = field(
        default="characters",
        metadata={"help": "what --pair-ctc spells: 'tokens' is mSLAM's (the text vocabulary); "
                          "'characters' spells each token's characters, which a small or short run learns "
                          "far sooner (the demo: off the blank plateau after about 150 updates; in word "
                          "pieces still on it after 300)"})


@dataclass
class SpeechPretrainingOutput:
    """What MSM needs from a SPEECH_BATCH; N = masked real frames, in ``frame_mask.nonzero()`` order.

    contrastive_predictions: (N, Q) speech encoder output at the masked frames, projected to Q.
    codevectors: (N, Q) quantized *unmasked* subsampled features of the same frames (positives).
    code_ids: (N, G) long, the codes the quantizer chose (MSM masked-prediction targets).
    utterance_index: (N,) long, the row of each masked frame (distractors stay in their row).
    code_logits: (N, G, C) code-id scores from the multimodal encoder's output.
    prob_perplexity: scalar, perplexity of the batch-averaged code softmax (diversity loss input).
    code_perplexity: scalar, perplexity of the hard code choices (for logging).
    num_vars: G * C. temperature: the quantizer's current Gumbel temperature.
    num_frames: real subsampled frames (a long scalar tensor: reading it would sync the device);
    num_utterances: B.
    """

    contrastive_predictions: torch.Tensor
    codevectors: torch.Tensor
    code_ids: torch.Tensor
    utterance_index: torch.Tensor
    code_logits: torch.Tensor
    prob_perplexity: torch.Tensor
    code_perplexity: torch.Tensor
    num_vars: int
    temperature: float
    num_frames: torch.Tensor
    num_utterances: int


@dataclass
class TextPretrainingOutput:
    """What span masking needs from a TEXT_BATCH; N = masked tokens (``target != pad``).

    text_logits: (N, V) scores at the masked tokens; text_targets: (N,) the original ids.
    num_tokens: real tokens (a long scalar tensor); num_sentences: B.
    """

    text_logits: torch.Tensor
    text_targets: torch.Tensor
    num_tokens: torch.Tensor
    num_sentences: int


@dataclass
class PairPretrainingOutput:
    """What TLM and STM need from a PAIR_BATCH.

    text_logits (N_t, V), text_targets (N_t,): TLM text side, at the masked tokens.
    code_logits (N_s, G, C), code_targets (N_s, G): TLM speech side, at the masked frames; the
        targets are the quantizer's codes of the unmasked features (no gradient).
    stm_logits (B, 2), stm_labels (B,): STM on [unmasked speech of row b ; clean text of row
        ``stm_text_index[b]``].
    num_tokens, num_frames: real tokens and subsampled frames (long scalar tensors); num_pairs: B.
    ctc_logits (B, T', K), ctc_lengths (B,), ctc_targets (N,), ctc_target_lengths (B,): mSLAM's CTC
        on the unmasked speech alone against the clean transcript (``--pair-ctc``), else None; K is
        the text vocabulary or the characters + blank (``--pair-ctc-units``).
    """

    text_logits: torch.Tensor
    text_targets: torch.Tensor
    code_logits: torch.Tensor
    code_targets: torch.Tensor
    stm_logits: torch.Tensor
    stm_labels: torch.Tensor
    num_tokens: torch.Tensor
    num_frames: torch.Tensor
    num_pairs: int
    ctc_logits: Optional[torch.Tensor] = None
    ctc_lengths: Optional[torch.Tensor] = None
    ctc_targets: Optional[torch.Tensor] = None
    ctc_target_lengths: Optional[torch.Tensor] = None


def _fit_frame_mask(frame_mask: torch.Tensor, num_subsampled: int) -> torch.Tensor:
    """Right-pad (False) or trim a (B, T') frame mask to the encoder's subsampled length."""
    width = frame_mask.shape[1]
    if width < num_subsampled:
        return torch.cat((frame_mask, frame_mask.new_zeros(frame_mask.shape[0], num_subsampled - width)), 1)
    if width > num_subsampled:
        if frame_mask[:, num_subsampled:].any():
            raise ValueError(
                f"frame_mask masks subsampled frame {num_subsampled} or later, but the features only "
                f"give {num_subsampled} subsampled frames (frame masks are over subsampled frames, "
                "see docs/pretraining_batches.md)")
        return frame_mask[:, :num_subsampled]
    return frame_mask


@register_model("slam", dataclass=SlamConfig)
class SlamModel(BaseFairseqModel):
    """The SLAM encoder as a fairseq model, with the pre-training heads.

    Heads (none of them is used by fine-tuning, which loads ``encoder.*`` only):
        quantizer_input_norm, quantizer: LayerNorm then fairseq's ``GumbelVectorQuantizer`` on the
            unmasked subsampled features (w2v-BERT: the feature encoder's output); its temperature
            is annealed by ``set_num_updates`` (called by fairseq's trainer).
        contrastive_projection: speech encoder output (D) -> codevector width (Q).
        code_prediction_head: multimodal output -> code-id scores (MSM and TLM speech targets).
        text_prediction_head: multimodal output -> token scores, tied to
            ``encoder.text_encoder.embed_tokens`` (span masking and TLM text targets).
        pair_matching_classifier: pooled multimodal output of a pair -> 2 classes (STM).
        pair_ctc_head: multimodal output of a pair's speech alone -> token scores (``--pair-ctc``).
    """

    def __init__(self, cfg: SlamConfig, encoder: SlamEncoder, unspoken_ids: Tuple[int, ...] = (0, 1, 2),
                 symbols: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.cfg = cfg
        # ids left out of the pair CTC targets: <s> (the CTC blank), <pad>, </s> of fairseq's dictionary
        self.unspoken_ids = tuple(unspoken_ids)
        self.encoder = encoder
        embed_dim = cfg.encoder_embed_dim
        quantizer_dim = embed_dim
        if cfg.quantizer_input == "features":
            quantizer_dim = SUBSAMPLING_FACTOR * cfg.input_feat_per_channel
        self.quantizer_input_norm = nn.LayerNorm(quantizer_dim)
        if cfg.quantizer_type == "random_projection":
            self.quantizer = RandomProjectionQuantizer(
                quantizer_dim, cfg.quantizer_codebook_size, cfg.quantizer_groups, cfg.quantizer_codevector_dim)
        else:
            self.quantizer = GumbelVectorQuantizer(
                dim=quantizer_dim, num_vars=cfg.quantizer_codebook_size, temp=cfg.quantizer_temperature,
                groups=cfg.quantizer_groups, combine_groups=False, vq_dim=cfg.quantizer_codevector_dim,
                time_first=True)
        self.contrastive_projection = nn.Linear(embed_dim, cfg.quantizer_codevector_dim)
        self.code_prediction_head = CodePredictionHead(embed_dim, cfg.quantizer_groups,
                                                       cfg.quantizer_codebook_size)
        self.text_prediction_head = TextPredictionHead(embed_dim, encoder.text_encoder.embed_tokens.weight)
        self.pair_matching_classifier = PairMatchingClassifier(embed_dim, cfg.dropout)
        self.speller: Optional[Speller] = None
        self.pair_ctc_head: Optional[nn.Linear] = None
        if cfg.pair_ctc:
            classes = encoder.text_encoder.embed_tokens.num_embeddings
            if cfg.pair_ctc_units == "characters":
                if symbols is None:
                    raise ValueError("--pair-ctc-units characters needs the dictionary's symbols")
                self.speller = Speller(symbols, self.unspoken_ids)
                classes = self.speller.num_classes
            self.pair_ctc_head = nn.Linear(embed_dim, classes)

    @classmethod
    def build_model(cls, cfg, task) -> "SlamModel":
        cfg = config_from(cfg, SlamConfig)
        dictionary = task.source_dictionary
        if cfg.pair_ctc and dictionary.bos() != CTC_BLANK:
            raise ValueError(f"--pair-ctc uses <s> as the CTC blank at index {CTC_BLANK}, but this dictionary "
                             f"has <s> at {dictionary.bos()}")
        return cls(cfg, build_slam_encoder(cfg, len(dictionary), dictionary.pad()),
                   unspoken_ids=(dictionary.bos(), dictionary.pad(), dictionary.eos()),
                   symbols=dictionary.symbols)

    def max_positions(self):
        return (self.cfg.max_source_positions, self.cfg.max_text_positions)

    def forward(self, features: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None,
                *, speech: Optional[Dict] = None, text: Optional[Dict] = None,
                pair: Optional[Dict] = None):
        """Two uses.

        ``forward(features, lengths)``: speech in, multimodal encoder states out (fine-tuning path,
        see ``SlamEncoder.forward``).

        ``forward(speech=..., text=..., pair=...)``: any subset of a pre-training sample's batches
        (docs/pretraining_batches.md); returns a dict with the same keys holding
        :class:`SpeechPretrainingOutput`, :class:`TextPretrainingOutput`,
        :class:`PairPretrainingOutput`. The criterion calls the model this way (not
        ``forward_speech`` directly) so that a DistributedDataParallel wrapper sees the forward.
        """
        if speech is None and text is None and pair is None:
            return self.encoder(features, lengths)
        outputs = {}
        if speech is not None:
            outputs["speech"] = self.forward_speech(speech)
        if text is not None:
            outputs["text"] = self.forward_text(text)
        if pair is not None:
            outputs["pair"] = self.forward_pair(pair)
        return outputs

    # -- pre-training -----------------------------------------------------------------------------

    def _speech_inputs(self, batch: Dict):
        features = batch["features"].to(self.quantizer.vars.dtype)
        lengths = batch["feature_lengths"]
        num_subsampled = subsampled_length(features.shape[1])
        return features, lengths, _fit_frame_mask(batch["frame_mask"].bool(), num_subsampled)

    def quantizer_inputs(self, features: torch.Tensor, subsampled: torch.Tensor) -> torch.Tensor:
        """(B, T', D_q) what the quantizer reads at each subsampled frame (``--quantizer-input``):
        the subsampling output, or the 4 normalized log-Mel frames each subsampled frame starts at."""
        if self.cfg.quantizer_input != "features":
            return subsampled
        batch_size, length = subsampled.shape[:2]
        needed = SUBSAMPLING_FACTOR * length
        frames = features[:, :needed]
        if frames.shape[1] < needed:
            frames = torch.nn.functional.pad(frames, (0, 0, 0, needed - frames.shape[1]))
        return frames.reshape(batch_size, length, SUBSAMPLING_FACTOR * features.shape[-1])

    def quantize(self, subsampled: torch.Tensor) -> Dict:
        """(N, D_q) unmasked quantizer inputs -> the quantizer's result dict (``x`` (N, Q),
        ``targets`` (N, G), ``prob_perplexity``, ``code_perplexity``, ``num_vars``, ``temp``)."""
        scale = self.cfg.quantizer_input_grad_scale
        if scale == 0.0 or self.cfg.quantizer_type == "random_projection":
            subsampled = subsampled.detach()
        elif scale != 1.0:
            subsampled = GradMultiply.apply(subsampled, scale)
        result = self.quantizer(self.quantizer_input_norm(subsampled).unsqueeze(0), produce_targets=True)
        result["x"] = result["x"].squeeze(0)
        result["targets"] = result["targets"].squeeze(0)
        return result

    def quantize_masked(self, features: torch.Tensor, subsampled: torch.Tensor,
                        utterance_index: torch.Tensor, frame_index: torch.Tensor) -> Dict:
        """:meth:`quantize` of the N masked frames ``(utterance_index, frame_index)``, or, when N is 0,
        the same keys for an empty batch (``x`` (0, Q), ``targets`` (0, G), ``prob_perplexity`` G * C,
        which makes the diversity loss 0, ``code_perplexity`` 0).

        Args:
            features: (B, T, F) log-Mel frames; subsampled: (B, T', D) unmasked subsampling output.
            utterance_index, frame_index: (N,) long, the masked real frames.
        """
        if utterance_index.numel() > 0:
            return self.quantize(self.quantizer_inputs(features, subsampled)[utterance_index, frame_index])
        groups, codebook_size = self.cfg.quantizer_groups, self.cfg.quantizer_codebook_size
        prob_perplexity = subsampled.new_tensor(float(groups * codebook_size), dtype=torch.float32)
        return {"x": subsampled.new_zeros(0, self.cfg.quantizer_codevector_dim),
                "targets": utterance_index.new_zeros(0, groups), "prob_perplexity": prob_perplexity,
                "code_perplexity": prob_perplexity.new_zeros(())}

    def forward_speech(self, batch: Dict) -> SpeechPretrainingOutput:
        """MSM on a SPEECH_BATCH (``features``, ``feature_lengths``, ``frame_mask``)."""
        features, lengths, frame_mask = self._speech_inputs(batch)
        speech, joint = self.encoder.encode_speech(features, lengths, frame_mask)
        masked = frame_mask & ~speech.padding_mask
        utterance_index, frame_index = masked.nonzero(as_tuple=True)
        predictions = self.contrastive_projection(speech.output[utterance_index, frame_index])
        code_logits = self.code_prediction_head(joint.output[utterance_index, frame_index])
        quantized = self.quantize_masked(features, speech.subsampled, utterance_index, frame_index)
        return SpeechPretrainingOutput(
            contrastive_predictions=predictions, codevectors=quantized["x"],
            code_ids=quantized["targets"], utterance_index=utterance_index, code_logits=code_logits,
            prob_perplexity=quantized["prob_perplexity"], code_perplexity=quantized["code_perplexity"],
            num_vars=self.cfg.quantizer_groups * self.cfg.quantizer_codebook_size,
            temperature=float(self.quantizer.curr_temp), num_frames=(~speech.padding_mask).sum(),
            num_utterances=features.shape[0])

    def forward_text(self, batch: Dict) -> TextPretrainingOutput:
        """Span masking on a TEXT_BATCH (``tokens``, ``target``)."""
        tokens, target = batch["tokens"], batch["target"]
        padding_idx = self.encoder.text_encoder.padding_idx
        joint = self.encoder.encode_text(tokens)
        row, position = target.ne(padding_idx).nonzero(as_tuple=True)
        return TextPretrainingOutput(
            text_logits=self.text_prediction_head(joint.output[row, position]),
            text_targets=target[row, position],
            num_tokens=tokens.ne(padding_idx).sum(), num_sentences=tokens.shape[0])

    def forward_pair(self, batch: Dict) -> PairPretrainingOutput:
        """TLM and STM on a PAIR_BATCH.

        Two speech-encoder passes: the masked speech for TLM on [masked speech ; masked text], and
        the unmasked speech once, whose output feeds both STM's multimodal pass on [unmasked speech
        of row b ; ``clean_tokens[stm_text_index[b]]``] and, with ``--pair-ctc``, the CTC pass on the
        unmasked speech alone.
        """
        features, lengths, frame_mask = self._speech_inputs(batch)
        tokens, target = batch["tokens"], batch["target"]
        padding_idx = self.encoder.text_encoder.padding_idx
        speech, joint = self.encoder.encode_pair(features, lengths, tokens, frame_mask)
        masked = frame_mask & ~speech.padding_mask
        utterance_index, frame_index = masked.nonzero(as_tuple=True)
        code_logits = self.code_prediction_head(joint.output[utterance_index, frame_index])
        with torch.no_grad():
            code_targets = self.quantize_masked(features, speech.subsampled, utterance_index, frame_index)["targets"]
        # the text of row b sits at packed positions speech_lengths[b] + j
        row, position = target.ne(padding_idx).nonzero(as_tuple=True)
        text_hidden = joint.output[row, joint.speech_lengths[row] + position]

        unmasked = self.encoder.speech_encoder(features, lengths)
        matched_text = batch["clean_tokens"][batch["stm_text_index"]]
        matched = self.encoder.encode_multimodal(unmasked, matched_text)
        stm_logits = self.pair_matching_classifier(matched.output, matched.padding_mask)
        ctc = self._pair_ctc(unmasked, batch["clean_tokens"]) if self.pair_ctc_head is not None else {}
        return PairPretrainingOutput(
            text_logits=self.text_prediction_head(text_hidden), text_targets=target[row, position],
            code_logits=code_logits, code_targets=code_targets, stm_logits=stm_logits,
            stm_labels=batch["stm_label"], num_tokens=tokens.ne(padding_idx).sum(),
            num_frames=(~speech.padding_mask).sum(), num_pairs=features.shape[0], **ctc)

    def _pair_ctc(self, unmasked: SpeechEncoderOutput, clean_tokens: torch.Tensor) -> Dict:
        """mSLAM's CTC inputs: the unmasked speech encoder output of the pair, alone through the
        multimodal encoder."""
        alone = self.encoder.encode_multimodal(unmasked)
        if self.speller is not None:
            targets, target_lengths = self.speller(clean_tokens)
        else:
            targets, target_lengths = transcript_targets(clean_tokens, clean_tokens.new_tensor(self.unspoken_ids))
        return dict(ctc_logits=self.pair_ctc_head(alone.output), ctc_lengths=(~alone.padding_mask).sum(dim=1),
                    ctc_targets=targets, ctc_target_lengths=target_lengths)


def _preset(cfg, **values) -> None:
    for name, value in values.items():
        setattr(cfg, name, safe_getattr(cfg, name, value))


@register_model_architecture("slam", "slam_paper")
def slam_paper(cfg) -> None:
    """The paper's size: N=8, M=16, D=1024, FFN 4096, kernel 5, 8 heads (about 0.6 B parameters)."""
    _preset(cfg, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=8,
            speech_encoder_layers=8, multimodal_encoder_layers=16, conv_kernel_size=5,
            subsampling_conv_channels=256, quantizer_codebook_size=1024, quantizer_groups=1,
            quantizer_codevector_dim=256)


@register_model_architecture("slam", "slam_tiny")
def slam_tiny(cfg) -> None:
    """For tests and the CPU demo: D=64, 2 + 2 layers, a codebook of 64 entries of width 32."""
    _preset(cfg, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
            speech_encoder_layers=2, multimodal_encoder_layers=2, conv_kernel_size=5,
            subsampling_conv_channels=32, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
            quantizer_codebook_size=64, quantizer_groups=1, quantizer_codevector_dim=32)
    slam_paper(cfg)
