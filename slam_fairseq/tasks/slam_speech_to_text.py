"""Task ``slam_speech_to_text``: fairseq's ``speech_to_text``, plus decoding with the CTC head.

Training is fairseq's ``speech_to_text`` unchanged (same data, batches and losses); only
``build_generator`` differs, and only when asked:

- ``--ctc-decoding none`` (default): fairseq's own beam search.
- ``--ctc-decoding greedy``: best-path CTC decoding of the CTC head
  (:class:`slam_fairseq.decoding.ctc_greedy.CTCGreedyGenerator`); the decoder is not run.
- ``--ctc-decoding joint``: fairseq's beam search with each step's decoder log-probabilities fused
  with CTC prefix scores, ``(1 - w) * log p_att + w * delta log p_ctc_prefix``
  (:mod:`slam_fairseq.decoding.joint_ctc_generator`), ``w = --ctc-decoding-weight``; the decoder's
  best ``--ctc-decoding-candidates`` tokens per hypothesis (at least twice ``--beam``) are scored.

Both CTC modes need a ``slam_s2t`` model with a CTC head (``--ctc-head``, or trained with
``--criterion label_smoothed_cross_entropy_with_ctc --ctc-weight W``). Scores and output lines
(``H-``, ``D-``, ``P-``) are fairseq-generate's; ``--scoring wer`` / ``sacrebleu`` score them.
"""
from __future__ import annotations

import logging

from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks import register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask
from fairseq.utils import safe_getattr

from slam_fairseq.decoding.ctc_greedy import CTCGreedyGenerator
from slam_fairseq.decoding.joint_ctc_generator import add_ctc_prefix_scores
from slam_fairseq.models.slam_s2t import CTC_BLANK_INDEX

logger = logging.getLogger(__name__)

__all__ = ["CTC_DECODING_MODES", "SlamSpeechToTextTask"]

CTC_DECODING_MODES = ("none", "greedy", "joint")


@register_task("slam_speech_to_text")
class SlamSpeechToTextTask(SpeechToTextTask):
    """fairseq's ``speech_to_text`` with ``--ctc-decoding {none,greedy,joint}``."""

    @classmethod
    def add_args(cls, parser) -> None:
        super().add_args(parser)
        parser.add_argument("--ctc-decoding", choices=CTC_DECODING_MODES, default="none",
                            help="decoding: fairseq's beam search (none), best-path CTC (greedy), or joint "
                                 "CTC/attention beam search (joint); CTC modes need a model with a CTC head")
        parser.add_argument("--ctc-decoding-weight", type=float, default=0.3, metavar="W",
                            help="joint: score = (1 - W) * decoder log-prob + W * CTC prefix score increment")
        parser.add_argument("--ctc-decoding-candidates", type=int, default=10, metavar="K",
                            help="joint: the decoder's best K tokens of each hypothesis (at least 2 x beam; "
                                 "eos always) get CTC prefix scores, the others -inf")

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None):
        generator = super().build_generator(models, args, seq_gen_cls=seq_gen_cls,
                                            extra_gen_cls_kwargs=extra_gen_cls_kwargs)
        mode = safe_getattr(self.args, "ctc_decoding", "none")
        if mode == "none":
            return generator
        if mode not in CTC_DECODING_MODES:
            raise ValueError(f"--ctc-decoding must be one of {', '.join(CTC_DECODING_MODES)}, got {mode!r}")
        model = self._single_ctc_model(models, mode)
        if mode == "greedy":
            if not isinstance(generator, SequenceGenerator):
                raise ValueError("--ctc-decoding greedy cannot be combined with --score-reference")
            logger.info("decoding: best-path CTC (the decoder is not run)")
            return CTCGreedyGenerator(model, eos=generator.eos, blank=CTC_BLANK_INDEX,
                                      symbols_to_strip_from_output=generator.symbols_to_strip_from_output)
        weight = float(self.args.ctc_decoding_weight)
        candidates = int(self.args.ctc_decoding_candidates)
        generator = add_ctc_prefix_scores(generator, weight=weight, candidates=candidates, blank=CTC_BLANK_INDEX,
                                          skip_tokens=int(getattr(model, "ctc_target_prefix_size", 0)))
        logger.info(f"decoding: joint CTC/attention beam search, CTC weight {weight}, "
                    f"{generator.model.candidates} CTC candidates per hypothesis")
        return generator

    def _single_ctc_model(self, models, mode: str):
        path = safe_getattr(self.args, "path", None) or "--path"
        if len(models) != 1:
            raise ValueError(f"--ctc-decoding {mode} decodes one model; {path} gives an ensemble of {len(models)}")
        model = models[0]
        if not hasattr(model, "get_ctc_output") or getattr(model, "ctc_projection", None) is None:
            raise ValueError(
                f"--ctc-decoding {mode} needs a model with a CTC head, and the model in {path} "
                f"({type(model).__name__}) has none: train slam_s2t with --ctc-head, or with --criterion "
                f"label_smoothed_cross_entropy_with_ctc --ctc-weight W (W > 0); or decode with --ctc-decoding none")
        return model
