"""Criterion ``slam_multitask``: SLAM's pre-training losses, one weighted term per objective.

The model (``slam``) turns each modality's batch into logits and targets; the maths is in
``slam_fairseq.objectives``; this module weights, sums and logs.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging.meters import safe_round

from slam_fairseq.data.pretraining.modality import MODALITIES
from slam_fairseq.objectives.masked_prediction import ObjectiveOutput
from slam_fairseq.objectives.msm import (
    DEFAULT_CONTRASTIVE_TEMPERATURE,
    DEFAULT_NUM_DISTRACTORS,
    code_prediction_loss,
    codebook_diversity_loss,
    contrastive_loss,
)
from slam_fairseq.objectives.pair_ctc import pair_ctc_loss
from slam_fairseq.objectives.span_masking import span_masking_loss
from slam_fairseq.objectives.stm import stm_loss
from slam_fairseq.objectives.tlm import tlm_losses

# objective name -> the weight field that scales it (TLM's two sides share --tlm-weight)
OBJECTIVE_WEIGHTS = {
    "span_masking": "span_masking_weight",
    "msm_contrastive": "msm_contrastive_weight",
    "diversity": "diversity_weight",
    "msm_mlm": "msm_mlm_weight",
    "tlm_text": "tlm_weight",
    "tlm_speech": "tlm_weight",
    "stm": "stm_weight",
    "pair_ctc": "pair_ctc_weight",
}
# objective name -> the modality whose batches it is computed on
OBJECTIVE_MODALITIES = {
    "span_masking": "text", "msm_contrastive": "speech", "diversity": "speech", "msm_mlm": "speech",
    "tlm_text": "pair", "tlm_speech": "pair", "stm": "pair", "pair_ctc": "pair",
}
# objectives whose accuracy means something (the diversity loss has none)
_WITH_ACCURACY = ("span_masking", "msm_contrastive", "msm_mlm", "tlm_text", "tlm_speech", "stm")
_COUNTS = ("nframes_speech", "nsentences_speech", "ntokens_text", "nsentences_text",
           "ntokens_pair", "nframes_pair", "nsentences_pair")


@dataclass
class SlamMultitaskCriterionConfig(FairseqDataclass):
    span_masking_weight: float = field(default=1.0, metadata={"help": "text span-masking cross-entropy"})
    msm_contrastive_weight: float = field(
        default=1.0, metadata={"help": "MSM contrastive loss on the speech encoder output"})
    msm_mlm_weight: float = field(
        default=1.0, metadata={"help": "MSM masked code-id prediction on the multimodal output"})
    diversity_weight: float = field(
        default=0.1, metadata={"help": "codebook diversity loss (wav2vec 2.0: 0.1)"})
    tlm_weight: float = field(
        default=1.0, metadata={"help": "TLM: masked text tokens + masked speech code ids of a pair"})
    stm_weight: float = field(default=1.0, metadata={"help": "speech-text matching cross-entropy"})
    pair_ctc_weight: float = field(
        default=1.0, metadata={"help": "mSLAM's CTC on the speech of pairs, per transcript token (only for "
                                       "a model built with --pair-ctc)"})
    num_distractors: int = field(
        default=DEFAULT_NUM_DISTRACTORS,
        metadata={"help": "contrastive distractors per masked frame, from the same utterance"})
    contrastive_temperature: float = field(
        default=DEFAULT_CONTRASTIVE_TEMPERATURE,
        metadata={"help": "the contrastive cosine similarities are divided by it"})


@register_criterion("slam_multitask", dataclass=SlamMultitaskCriterionConfig)
class SlamMultitaskCriterion(FairseqCriterion):
    """Weighted sum of SLAM's pre-training objectives over whichever modalities a sample holds.

    ``forward(model, sample)`` takes a dict with any non-empty subset of the keys "speech", "text",
    "pair" (docs/pretraining_batches.md) and returns ``(loss, sample_size, logging_output)``:

    - speech: ``msm_contrastive_weight * contrastive + diversity_weight * diversity +
      msm_mlm_weight * masked code-id cross-entropy``;
    - text: ``span_masking_weight * masked-token cross-entropy``;
    - pair: ``tlm_weight * (TLM text + TLM speech) + stm_weight * STM`` (``+ pair_ctc_weight *
      CTC`` for a model built with ``--pair-ctc``, mSLAM's addition).

    Normalisation. ``sample_size`` is always 1: every objective is already a mean over its own
    positions (masked tokens, masked frames, pairs; the diversity loss is per batch), so the weights
    alone set the balance between objectives, and fairseq's division by the summed sample sizes
    averages over data-parallel workers and ``--update-freq`` steps. The update is therefore the mean
    of per-batch means: a position of a batch with few positions (a batch of short utterances under
    ``--max-tokens``) weighs more than one of a full batch, and W ranks x U steps train as one rank
    with ``--update-freq W*U`` would, not as one batch W*U times as large (wav2vec 2.0 and HuBERT sum
    over positions instead). As no term depends on another
    modality's batch, the loss (hence the gradient) of a multi-modality sample is exactly the sum of
    the single-modality calls' losses: a task may call the criterion once per modality and back-propagate
    each (round robin) or once with the full dict, with the same result (given the same random draws:
    dropout, Gumbel noise, distractors). A round-robin task should report sample size 1 for the
    whole update (the losses are summed, not averaged, over modalities).

    All losses are computed in float32, whatever the model's dtype (--fp16, --bf16).

    Distributed training. Every parameter takes part in a call with all three modalities. A call
    with one modality leaves some unused (text: the speech encoder, quantizer and code head; speech:
    the text embedding, text head and STM classifier; pair: the contrastive projection and the
    quantizer, whose codes are targets only). So when the task calls the criterion per modality, run
    with ``--ddp-backend legacy_ddp`` (one all-reduce after all backward passes of an update, missing
    gradients count as zero; what ``slam-fairseq-train`` sets and the 2-rank tests run;
    docs/distributed.md). ``--ddp-backend c10d``/``pytorch_ddp`` passes ``device_ids`` to PyTorch
    and fails on the CPU; on GPUs (with ``--find-unused-parameters``) it is untested. The model is
    always called through its ``forward`` (``model(speech=..., ...)``) so that a DDP wrapper sees
    every forward pass.

    Logging (``loss`` and the cross-entropies in base 2, as fairseq does; a validation's ``loss``
    is the weighted sum of its objectives' means, :meth:`log_validation_loss`): ``<objective>_loss`` and
    ``<objective>_accuracy`` for span_masking, msm_contrastive, msm_mlm, tlm_text, tlm_speech, stm;
    ``pair_ctc_loss`` (per transcript token, no accuracy) with ``--pair-ctc``;
    ``diversity_loss`` (as optimised: the unused fraction of the codebook, in [0, 1));
    ``code_perplexity`` (hard code choices), ``prob_perplexity`` (soft), ``gumbel_temperature``;
    ``nframes_speech``, ``ntokens_text``, ``ntokens_pair``, ``nframes_pair``, ``nsentences_*``.
    """

    def __init__(self, cfg: SlamMultitaskCriterionConfig, task) -> None:
        super().__init__(task)
        self.cfg = cfg

    def weight(self, objective: str) -> float:
        return getattr(self.cfg, OBJECTIVE_WEIGHTS[objective])

    def compute_objectives(self, outputs: Dict) -> Dict[str, ObjectiveOutput]:
        """Model outputs (``model(speech=..., ...)``) -> {objective name: :class:`ObjectiveOutput`}."""
        objectives: Dict[str, ObjectiveOutput] = {}
        if "speech" in outputs:
            speech = outputs["speech"]
            objectives["msm_contrastive"] = contrastive_loss(
                speech.contrastive_predictions, speech.codevectors, speech.utterance_index,
                self.cfg.num_distractors, self.cfg.contrastive_temperature, code_ids=speech.code_ids,
                grid=(speech.num_utterances, speech.padded_frames))
            diversity = codebook_diversity_loss(speech.prob_perplexity, speech.num_vars)
            one = torch.ones((), dtype=torch.long, device=diversity.device)
            objectives["diversity"] = ObjectiveOutput(diversity, one.new_zeros(()), one)
            objectives["msm_mlm"] = code_prediction_loss(speech.code_logits, speech.code_ids)
        if "text" in outputs:
            text = outputs["text"]
            objectives["span_masking"] = span_masking_loss(text.text_logits, text.text_targets)
        if "pair" in outputs:
            pair = outputs["pair"]
            tlm = tlm_losses(pair.text_logits, pair.text_targets, pair.code_logits, pair.code_targets)
            objectives["tlm_text"], objectives["tlm_speech"] = tlm.text, tlm.speech
            objectives["stm"] = stm_loss(pair.stm_logits, pair.stm_labels)
            if pair.ctc_logits is not None:
                objectives["pair_ctc"] = pair_ctc_loss(pair.ctc_logits, pair.ctc_lengths, pair.ctc_targets,
                                                       pair.ctc_target_lengths)
        return objectives

    def forward(self, model, sample: Dict, reduce: bool = True):
        """
        Args:
            model: a ``slam`` model (possibly DDP-wrapped).
            sample: {"speech": SPEECH_BATCH, "text": TEXT_BATCH, "pair": PAIR_BATCH}, any non-empty
                subset (absent or None keys are skipped).
        Returns:
            (float32 scalar weighted loss, sample_size = 1, logging_output dict of summable values:
            scalar tensors on the model's device, read by ``reduce_metrics`` in one copy, and Python numbers).
        """
        batches = {name: sample[name] for name in MODALITIES if sample.get(name) is not None}
        if not batches:
            raise ValueError(f"slam_multitask needs at least one of {MODALITIES} in the sample, "
                             f"got keys {sorted(sample)}")
        outputs = model(**batches)
        objectives = self.compute_objectives(outputs)
        loss = sum(self.weight(name) * objective.loss for name, objective in objectives.items())

        # values stay tensors (no device read per objective); reduce_metrics reads them all at once
        logging_output = {"loss": loss.detach(), "sample_size": 1, "ntokens": 0, "nsentences": 0}
        for name, objective in objectives.items():
            count = objective.count.detach()
            logging_output[f"_{name}_loss_sum"] = objective.loss.detach() * count
            logging_output[f"_{name}_count"] = count
            if name in _WITH_ACCURACY:
                logging_output[f"_{name}_correct"] = objective.num_correct.detach()
        if "speech" in outputs:
            speech = outputs["speech"]
            logging_output.update(
                nframes_speech=speech.num_frames, nsentences_speech=speech.num_utterances,
                _quantizer_batches=1, _code_perplexity_sum=speech.code_perplexity.detach(),
                _prob_perplexity_sum=speech.prob_perplexity.detach(),
                _gumbel_temperature_sum=speech.temperature)
        if "text" in outputs:
            text = outputs["text"]
            logging_output.update(ntokens_text=text.num_tokens, nsentences_text=text.num_sentences)
        if "pair" in outputs:
            pair = outputs["pair"]
            logging_output.update(ntokens_pair=pair.num_tokens, nframes_pair=pair.num_frames,
                                  nsentences_pair=pair.num_pairs)
        # fairseq's wpb/bsz: every real position (frames and tokens) and every row of every modality
        logging_output["ntokens"] = sum(logging_output.get(key, 0) for key in _COUNTS
                                        if not key.startswith("nsentences"))
        logging_output["nsentences"] = sum(logging_output.get(key, 0) for key in _COUNTS
                                           if key.startswith("nsentences"))
        return loss, 1, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict]) -> None:
        totals = summed_logging_values(logging_outputs)

        def total(key: str) -> float:
            return totals.get(key, 0)

        sample_size = total("sample_size")
        if "loss" in totals:  # a validation logs it from the objectives instead (log_validation_loss)
            metrics.log_scalar("loss", total("loss") / (sample_size or 1) / math.log(2), sample_size, round=3)
        for name in OBJECTIVE_WEIGHTS:
            count = total(f"_{name}_count")
            if count <= 0:
                continue
            base = 1.0 if name == "diversity" else math.log(2)
            metrics.log_scalar(f"{name}_loss", total(f"_{name}_loss_sum") / count / base, count, round=3)
            if name in _WITH_ACCURACY:
                metrics.log_scalar(f"_{name}_correct", total(f"_{name}_correct"))
                metrics.log_scalar(f"_{name}_total", count)
                metrics.log_derived(f"{name}_accuracy", _accuracy(name))
        quantizer_batches = total("_quantizer_batches")
        if quantizer_batches > 0:
            for name in ("code_perplexity", "prob_perplexity", "gumbel_temperature"):
                metrics.log_scalar(name, total(f"_{name}_sum") / quantizer_batches, quantizer_batches,
                                   round=3 if name != "gumbel_temperature" else 5)
        for key in _COUNTS:
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(key, total(key), round=1)

    def log_validation_loss(self) -> None:
        """``loss`` of a validation: the weighted sum of each objective's mean over the whole
        validation, as the training loss of an update is the weighted sum of its objectives.

        A validation's steps are not like an update's: it reads each modality's batches once, so
        its steps hold different modalities (8 speech batches and 2 pair batches: 2 steps with
        pairs of 8), and an average of the steps' summed losses would weigh each objective by how
        many of the steps hold its modality. Logged as a value derived from the ``<objective>_loss``
        meters (0 before any objective is logged); call it with the logging outputs' ``loss``
        left out of :meth:`reduce_metrics`."""
        weights = {name: self.weight(name) for name in OBJECTIVE_WEIGHTS}

        def weighted_sum(meters) -> float:
            total = 0.0
            for name, weight in weights.items():
                meter = meters.get(f"{name}_loss")
                if meter is None or not getattr(meter, "count", 0):
                    continue
                # the meters hold bits, except the diversity loss (a fraction); loss is in bits
                total += weight * (meter.avg / math.log(2) if name == "diversity" else meter.avg)
            return safe_round(total, 3)

        metrics.log_derived("loss", weighted_sum, priority=10)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Every logged value is a sum (or a count), so workers' outputs can be summed first."""
        return True


def summed_logging_values(logging_outputs: List[Dict]) -> Dict[str, float]:
    """Every key's sum over ``logging_outputs`` as Python numbers, read from the device at once.

    The criterion logs tensors; summing them stays on the device, and the sums of all keys are
    stacked and copied to the host in one read (one host-device sync per update, not one per key).
    """
    sums: Dict[str, object] = {}
    for log in logging_outputs:
        for key, value in log.items():
            sums[key] = sums[key] + value if key in sums else value
    tensor_keys = [key for key, value in sums.items() if torch.is_tensor(value)]
    if tensor_keys:
        stacked = torch.stack([sums[key].detach().reshape(()).double() for key in tensor_keys])
        for key, value in zip(tensor_keys, stacked.tolist()):
            sums[key] = value
    return {key: value for key, value in sums.items() if isinstance(value, (int, float))}

def _accuracy(name: str):
    def derive(meters) -> float:
        seen = meters[f"_{name}_total"].sum
        return safe_round(meters[f"_{name}_correct"].sum / seen, 4) if seen > 0 else float("nan")
    return derive
