"""What the ``slam`` model hands the ``slam_multitask`` criterion for each modality of a pre-training step.

One named tuple per modality (docs/pretraining_batches.md): the logits and targets each objective
needs, already gathered at the masked positions, and the counts the criterion logs. Named tuples,
not dataclasses: wrappers that walk a forward's outputs to hook the tensors in them (fairscale's
FSDP registers its pre-backward hooks that way) see into dicts, lists and tuples only, and a root
FSDP module whose outputs hide their tensors never enters its backward state.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class SpeechPretrainingOutput(NamedTuple):
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
    num_utterances: B; padded_frames: T', the subsampled length of the batch (no row has more
    masked frames).
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
    padded_frames: int


class TextPretrainingOutput(NamedTuple):
    """What span masking needs from a TEXT_BATCH; N = masked tokens (``target != pad``).

    text_logits: (N, V) scores at the masked tokens; text_targets: (N,) the original ids.
    num_tokens: real tokens (a long scalar tensor); num_sentences: B.
    """

    text_logits: torch.Tensor
    text_targets: torch.Tensor
    num_tokens: torch.Tensor
    num_sentences: int


class PairPretrainingOutput(NamedTuple):
    """What TLM and STM need from a PAIR_BATCH.

    text_logits (N_t, V), text_targets (N_t,): TLM text side, at the masked tokens.
    code_logits (N_s, G, C), code_targets (N_s, G): TLM speech side, at the masked frames; the
        targets are the quantizer's codes of the unmasked features (no gradient).
    stm_logits (B, 2), stm_labels (B,): STM on [unmasked speech of row b ; clean text of row
        ``stm_text_index[b]``].
    num_tokens, num_frames: real tokens and subsampled frames (long scalar tensors); num_pairs: B.
    ctc_logits (B, T', K), ctc_lengths (B,), ctc_targets (B, S) padded, ctc_target_lengths (B,): mSLAM's CTC
        on the unmasked speech alone against the clean transcript (``--pair-ctc``), else None; K is
        the text vocabulary or the characters + blank (``--pair-ctc-units``); when K > D,
        ``ctc_logits`` is the transposed view of time-first (T', B, K) scores, the layout
        ``ctc_loss`` reads.
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
