"""The maths of SLAM's pre-training objectives, one small module per objective.

Plain ``torch.nn`` modules and functions (no fairseq task machinery), so a test can build them alone:

- :mod:`.masked_prediction`: :class:`ObjectiveOutput` and the masked cross-entropy they share;
- :mod:`.span_masking`: the text prediction head (tied to the token embedding) and the span-masking loss;
- :mod:`.msm`: masked speech modelling after w2v-BERT: distractor sampling, the contrastive loss,
  the codebook diversity loss, the code-id prediction head and its loss;
- :mod:`.tlm`: translation language modelling on a packed [speech ; text] pair;
- :mod:`.stm`: speech-text matching: pooling, the pair classifier and its loss;
- :mod:`.pair_ctc`: mSLAM's CTC on the speech of pairs, in tokens or characters (:class:`Speller`).

Every loss is returned in float32 and normalised (a mean over its own positions), whatever the
model's dtype.
"""
from slam_fairseq.objectives.masked_prediction import ObjectiveOutput, masked_cross_entropy
from slam_fairseq.objectives.msm import (
    CodePredictionHead,
    code_prediction_loss,
    codebook_diversity_loss,
    contrastive_loss,
    sample_distractor_indices,
)
from slam_fairseq.objectives.pair_ctc import Speller, pair_ctc_loss, transcript_targets
from slam_fairseq.objectives.span_masking import TextPredictionHead, span_masking_loss
from slam_fairseq.objectives.stm import PairMatchingClassifier, masked_mean_pool, stm_loss
from slam_fairseq.objectives.tlm import TlmOutput, tlm_losses

__all__ = [
    "CodePredictionHead",
    "ObjectiveOutput",
    "PairMatchingClassifier",
    "Speller",
    "TextPredictionHead",
    "TlmOutput",
    "code_prediction_loss",
    "codebook_diversity_loss",
    "contrastive_loss",
    "masked_cross_entropy",
    "masked_mean_pool",
    "pair_ctc_loss",
    "sample_distractor_indices",
    "span_masking_loss",
    "stm_loss",
    "tlm_losses",
    "transcript_targets",
]
