"""fairseq face of the SLAM encoder: model ``slam`` with presets ``slam_tiny`` and ``slam_paper``.

The maths lives in ``slam_fairseq.encoders`` and ``slam_fairseq.objectives``; the encoder's config
and sizes in ``slam_fairseq.encoders.config``; this module adds the pre-training heads' config and
the heads, registers the presets, and gives the criterion ``slam_multitask`` what it needs for each modality of a pre-training batch
(docs/pretraining_batches.md): ``forward_speech``, ``forward_text``, ``forward_pair``, all reachable
through ``forward(speech=..., text=..., pair=...)`` so that a DDP wrapper sees the call.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from fairseq.modules import GradMultiply
from torch import nn

from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture

from slam_fairseq.encoders.config import BASE_ENCODER, PAPER_ENCODER, TINY_ENCODER, SlamEncoderConfig, config_from, set_defaults
from slam_fairseq.encoders.slam_encoder import SlamEncoder, build_slam_encoder
from slam_fairseq.encoders.speech_encoder import SpeechEncoderOutput
from slam_fairseq.models.dictionary_fingerprint import register_fingerprint, set_fingerprint
from slam_fairseq.models.optional_heads import register_optional_head
from slam_fairseq.models.outputs import PairPretrainingOutput, SpeechPretrainingOutput, TextPretrainingOutput
from slam_fairseq.modules.gumbel_quantizer import GumbelQuantizer
from slam_fairseq.modules.padding import may_read_device_values
from slam_fairseq.modules.random_projection_quantizer import RandomProjectionQuantizer
from slam_fairseq.modules.subsampling import SUBSAMPLING_FACTOR, subsampled_length
from slam_fairseq.objectives.msm import CodePredictionHead
from slam_fairseq.objectives.pair_ctc import CTC_BLANK, Speller, transcript_targets
from slam_fairseq.objectives.span_masking import TextPredictionHead
from slam_fairseq.objectives.stm import PairMatchingClassifier

DICTIONARY_FINGERPRINT = "dictionary_fingerprint"  # the text dictionary's, a buffer saved with the weights


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


def _index_or_nonzero(batch: Dict, key: str, mask: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (rows, columns) of a batch's masked frames or target tokens: ``batch[key]``, (2, N) as
    the collaters find them on the host, or else ``mask().nonzero()`` (a host sync on a GPU: the
    size N is read from the device). On a CPU the count of ``batch[key]`` is checked against the mask."""
    index = batch.get(key)
    if index is None:
        return mask().nonzero(as_tuple=True)
    if may_read_device_values(index.device):  # free on a CPU: catches a mask edited after collation
        current = mask()
        if may_read_device_values(current.device) and index.shape[1] != int(current.sum()):
            raise ValueError(f"batch[{key!r}] lists {index.shape[1]} positions but the batch's mask has "
                             f"{int(current.sum())}: rebuild it (slam_fairseq.data.pretraining.collate) after "
                             f"changing the mask")
    return index[0], index[1]


def _lengths_on_host(batch: Dict, key: str, rows: int) -> Optional[Tuple[int, ...]]:
    """``batch["lengths_on_host"][key]``, each of the batch's ``rows`` real lengths as Python ints
    (the collaters ship them; docs/pretraining_batches.md), or None for a batch without them."""
    lengths = batch.get("lengths_on_host", {}).get(key)
    if lengths is not None and len(lengths) != rows:
        raise ValueError(f"batch['lengths_on_host'][{key!r}] holds {len(lengths)} lengths for a batch of {rows} "
                         "rows: rebuild it (slam_fairseq.data.pretraining.collate) after changing the batch")
    return lengths


def _padded(lengths: Optional[Sequence[int]], width: int) -> Optional[bool]:
    """Whether a pass over rows of these real ``lengths``, padded to ``width``, has any padding
    (None: the lengths are unknown on the host)."""
    return None if lengths is None else min(lengths) < width


def _packed(speech_lengths: Optional[Sequence[int]], text_lengths: Optional[Sequence[int]]
            ) -> Tuple[Optional[int], Optional[bool]]:
    """(the longest packed [speech ; text] row, whether any row is shorter) of a pair pass, or
    (None, None) when the host does not know both lengths."""
    if speech_lengths is None or text_lengths is None:
        return None, None
    totals = [speech + text for speech, text in zip(speech_lengths, text_lengths)]
    return max(totals), min(totals) < max(totals)


PAPER_HEADS = dict(quantizer_codebook_size=1024, quantizer_groups=1, quantizer_codevector_dim=256)


@register_model("slam", dataclass=SlamConfig)
class SlamModel(BaseFairseqModel):
    """The SLAM encoder as a fairseq model, with the pre-training heads.

    Heads (none of them is used by fine-tuning, which loads ``encoder.*`` only):
        quantizer_input_norm, quantizer: LayerNorm then :class:`GumbelQuantizer` (fairseq's
            Gumbel-softmax quantizer, codevectors by a batched product) on the unmasked subsampled
            features (w2v-BERT: the feature encoder's output); its temperature is annealed by
            ``set_num_updates`` (called by fairseq's trainer).
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
        # on the model's device, so that no step copies them from the host
        self.register_buffer("unspoken_id_tensor", torch.tensor(self.unspoken_ids, dtype=torch.long), persistent=False)
        # the text dictionary's fingerprint, saved with the weights and checked on every load
        register_fingerprint(self, DICTIONARY_FINGERPRINT, "text dictionary")
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
            self.quantizer = GumbelQuantizer(
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
        register_optional_head(self, "pair_ctc_head", "--pair-ctc")

    @classmethod
    def build_model(cls, cfg, task) -> "SlamModel":
        cfg = config_from(cfg, SlamConfig)
        dictionary = task.source_dictionary
        if dictionary is None:
            raise ValueError(
                f"the slam model is SLAM's pre-training model, built by --task slam_pretraining; the "
                f"{type(task).__name__} task has no text dictionary for it. To decode or fine-tune a "
                "pre-trained encoder, train a slam_s2t_* model with --load-pretrained-slam-from CHECKPOINT "
                "(examples/librispeech, examples/covost2) and decode that")
        if cfg.pair_ctc and dictionary.bos() != CTC_BLANK:
            raise ValueError(f"--pair-ctc uses <s> as the CTC blank at index {CTC_BLANK}, but this dictionary "
                             f"has <s> at {dictionary.bos()}")
        model = cls(cfg, build_slam_encoder(cfg, len(dictionary), dictionary.pad()),
                    unspoken_ids=(dictionary.bos(), dictionary.pad(), dictionary.eos()),
                    symbols=dictionary.symbols)
        set_fingerprint(model, DICTIONARY_FINGERPRINT, dictionary.symbols)
        return model

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

    def extract_features(self, features: torch.Tensor, lengths: torch.Tensor,
                         output_layer: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The encoder's states for speech alone: see :meth:`SlamEncoder.extract_features`."""
        return self.encoder.extract_features(features, lengths, output_layer)

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
        padded = _padded(_lengths_on_host(batch, "speech", len(features)), subsampled_length(features.shape[1]))
        speech, joint = self.encoder.encode_speech(features, lengths, frame_mask, padded=padded)
        utterance_index, frame_index = _index_or_nonzero(batch, "masked_frames", lambda: frame_mask & ~speech.padding_mask)
        predictions = self.contrastive_projection(speech.output[utterance_index, frame_index])
        code_logits = self.code_prediction_head(joint.output[utterance_index, frame_index])
        quantized = self.quantize_masked(features, speech.subsampled, utterance_index, frame_index)
        return SpeechPretrainingOutput(
            contrastive_predictions=predictions, codevectors=quantized["x"],
            code_ids=quantized["targets"], utterance_index=utterance_index, code_logits=code_logits,
            prob_perplexity=quantized["prob_perplexity"], code_perplexity=quantized["code_perplexity"],
            num_vars=self.cfg.quantizer_groups * self.cfg.quantizer_codebook_size,
            temperature=float(self.quantizer.curr_temp), num_frames=(~speech.padding_mask).sum(),
            num_utterances=features.shape[0], padded_frames=speech.output.shape[1])

    def forward_text(self, batch: Dict) -> TextPretrainingOutput:
        """Span masking on a TEXT_BATCH (``tokens``, ``target``)."""
        tokens, target = batch["tokens"], batch["target"]
        padding_idx = self.encoder.text_encoder.padding_idx
        joint = self.encoder.encode_text(
            tokens, padded=_padded(_lengths_on_host(batch, "text", len(tokens)), tokens.shape[1]))
        row, position = _index_or_nonzero(batch, "target_index", lambda: target.ne(padding_idx))
        return TextPretrainingOutput(
            text_logits=self.text_prediction_head(joint.output[row, position]),
            text_targets=target[row, position],
            num_tokens=tokens.ne(padding_idx).sum(), num_sentences=tokens.shape[0])

    def forward_pair(self, batch: Dict) -> PairPretrainingOutput:
        """TLM and STM on a PAIR_BATCH.

        One subsampling pass and two Conformer passes of the speech encoder over it: the masked
        speech for TLM on [masked speech ; masked text], and the unmasked speech once, whose output
        feeds both STM's multimodal pass on [unmasked speech of row b ;
        ``clean_tokens[stm_text_index[b]]``] and, with ``--pair-ctc``, the CTC pass on the unmasked
        speech alone. The frame mask replaces subsampled frames, so both passes share the
        subsampling output and its backward. With the batch's ``lengths_on_host``, each pass's
        padding and each packed width come from the host, as wide as the longest row on every
        device, with no host sync.
        """
        features, lengths, frame_mask = self._speech_inputs(batch)
        tokens, target = batch["tokens"], batch["target"]
        padding_idx = self.encoder.text_encoder.padding_idx
        speech_encoder = self.encoder.speech_encoder
        rows = len(features)
        speech_lengths = _lengths_on_host(batch, "speech", rows)
        speech_padded = _padded(speech_lengths, subsampled_length(features.shape[1]))
        subsampled, speech_padding_mask = speech_encoder.subsample(features, lengths)
        speech = speech_encoder.encode_subsampled(subsampled, speech_padding_mask, frame_mask, padded=speech_padded)
        tlm_width, tlm_padded = _packed(speech_lengths, _lengths_on_host(batch, "text", rows))
        joint = self.encoder.encode_multimodal(speech, tokens, packed_width=tlm_width, padded=tlm_padded)
        utterance_index, frame_index = _index_or_nonzero(batch, "masked_frames", lambda: frame_mask & ~speech.padding_mask)
        code_logits = self.code_prediction_head(joint.output[utterance_index, frame_index])
        with torch.no_grad():
            code_targets = self.quantize_masked(features, speech.subsampled, utterance_index, frame_index)["targets"]
        # the text of row b sits at packed positions speech_lengths[b] + j
        row, position = _index_or_nonzero(batch, "target_index", lambda: target.ne(padding_idx))
        text_hidden = joint.output[row, joint.speech_lengths[row] + position]

        unmasked = speech_encoder.encode_subsampled(subsampled, speech_padding_mask, padded=speech_padded)
        matched_text = batch["clean_tokens"][batch["stm_text_index"]]
        stm_width, stm_padded = _packed(speech_lengths, _lengths_on_host(batch, "stm_text", rows))
        matched = self.encoder.encode_multimodal(unmasked, matched_text, packed_width=stm_width, padded=stm_padded)
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
            targets, target_lengths = transcript_targets(clean_tokens, self.unspoken_id_tensor)
        head = self.pair_ctc_head
        if head.out_features > head.in_features:
            # a widening head (tokens): scores computed time-first, (T', B, V), as ctc_loss reads
            # them, and handed on as a (B, T', V) view; reordering the (B, T', D) states is cheaper
            # than reordering the scores and their gradient
            scores = head(alone.output.transpose(0, 1).contiguous()).transpose(0, 1)
        else:
            scores = head(alone.output)
        return dict(ctc_logits=scores, ctc_lengths=(~alone.padding_mask).sum(dim=1),
                    ctc_targets=targets, ctc_target_lengths=target_lengths)


@register_model_architecture("slam", "slam_paper")
def slam_paper(cfg) -> None:
    """The paper's size: N=8, M=16, D=1024, FFN 4096, kernel 5, 8 heads (619,072,256 encoder parameters)."""
    set_defaults(cfg, **PAPER_ENCODER, **PAPER_HEADS)


@register_model_architecture("slam", "slam_base")
def slam_base(cfg) -> None:
    """A size one GPU pre-trains: N=6, M=10, D=512, FFN 2048, kernel 5, 8 heads (see the README)."""
    set_defaults(cfg, **BASE_ENCODER, **PAPER_HEADS)


@register_model_architecture("slam", "slam_tiny")
def slam_tiny(cfg) -> None:
    """For tests and the CPU demo: D=64, 2 + 2 layers, a codebook of 64 entries of width 32."""
    set_defaults(cfg, **TINY_ENCODER, quantizer_codebook_size=64, quantizer_groups=1, quantizer_codevector_dim=32)
    slam_paper(cfg)
