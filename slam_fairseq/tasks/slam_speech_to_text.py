"""Task ``slam_speech_to_text``: fairseq's ``speech_to_text``, plus decoding with the CTC head.

Training is fairseq's ``speech_to_text`` unchanged (same data, batches and losses); only
``build_generator`` differs, and only when asked:

- ``--ctc-decoding none`` (default): fairseq's own beam search.
- ``--ctc-decoding greedy``: best-path CTC decoding of the CTC head
  (:class:`slam_fairseq.decoding.ctc_greedy.CTCGreedyGenerator`); the decoder is not run.
- ``--ctc-decoding lexicon``: CTC prefix beam search (``--beam`` prefixes) whose words come from the
  lexicon of ``--lexicon-text`` (one sentence per line), scored with that text's word bigram model
  (``--lexicon-lm-weight``, ``--lexicon-word-score``; a word outside the lexicon costs
  ``--lexicon-oov-score``, ``-inf`` forbids it) (:mod:`slam_fairseq.decoding.ctc_lexicon_search`).
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

from slam_fairseq.checkpoint_recovery import remove_interrupted_writes_on_rank_zero
from slam_fairseq.compat.fairseq_internals import forget_finished_aggregators
from slam_fairseq.decoding.ctc_greedy import CTCGreedyGenerator
from slam_fairseq.decoding.ctc_lexicon_search import (
    CTCLexiconGenerator,
    LexiconSearchOptions,
    dictionary_label_texts,
    unspellable_words,
)
from slam_fairseq.decoding.ngram_repeat_block import fix_ngram_repeat_block
from slam_fairseq.decoding.word_lm import LexiconTrie, WordBigramLM
from slam_fairseq.decoding.joint_ctc_generator import add_ctc_prefix_scores
from slam_fairseq.models.slam_s2t import CTC_BLANK_INDEX

logger = logging.getLogger(__name__)

__all__ = ["CTC_DECODING_MODES", "SlamSpeechToTextTask"]

CTC_DECODING_MODES = ("none", "greedy", "joint", "lexicon")


@register_task("slam_speech_to_text")
class SlamSpeechToTextTask(SpeechToTextTask):
    """fairseq's ``speech_to_text`` with ``--ctc-decoding {none,greedy,joint,lexicon}``."""

    @classmethod
    def add_args(cls, parser) -> None:
        super().add_args(parser)
        parser.add_argument("--ctc-decoding", choices=CTC_DECODING_MODES, default="none",
                            help="decoding: fairseq's beam search (none), best-path CTC (greedy), joint "
                                 "CTC/attention beam search (joint), or CTC beam search over a lexicon with a word "
                                 "bigram model (lexicon); CTC modes need a model with a CTC head")
        parser.add_argument("--ctc-decoding-weight", type=float, default=0.3, metavar="W",
                            help="joint: score = (1 - W) * decoder log-prob + W * CTC prefix score increment")
        parser.add_argument("--ctc-decoding-candidates", type=int, default=10, metavar="K",
                            help="joint: the decoder's best K tokens of each hypothesis (at least 2 x beam; "
                                 "eos always) get CTC prefix scores, the others -inf")
        parser.add_argument("--lexicon-text", type=str, default=None, metavar="FILE",
                            help="lexicon: text (one sentence per line, or a speech_to_text manifest's tgt_text column) "
                                 "whose words are the lexicon and train the word bigram model")
        parser.add_argument("--lexicon-lm-weight", type=float, default=0.5, metavar="W",
                            help="lexicon: weight of the word bigram log-probabilities")
        parser.add_argument("--lexicon-word-score", type=float, default=0.0, metavar="S",
                            help="lexicon: added for each word written")
        parser.add_argument("--lexicon-oov-score", type=float, default=-10.0, metavar="S",
                            help="lexicon: added for each word outside the lexicon; -inf writes lexicon words only")

    def begin_epoch(self, epoch, model) -> None:
        """fairseq's; at the first epoch this process trains, rank 0 removes the unfinished
        checkpoint writes an earlier, killed process of the run left
        (``checkpoint_recovery.remove_interrupted_writes_on_rank_zero``)."""
        super().begin_epoch(epoch, model)
        remove_interrupted_writes_on_rank_zero(getattr(self.args, "save_dir", None),
                                               getattr(self.args, "checkpoint_suffix", ""))

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        """fairseq's, and its per-update leftovers in the metrics registry dropped
        (``forget_finished_aggregators``)."""
        forget_finished_aggregators()
        super().reduce_metrics(logging_outputs, criterion)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None):
        # SequenceGenerator sets the beamable cross-attention only for beams above 1: a generator
        # built after one with a larger beam must not inherit its setting
        for model in models:
            if hasattr(model, "set_beam_size"):
                model.set_beam_size(1)
        generator = super().build_generator(models, args, seq_gen_cls=seq_gen_cls,
                                            extra_gen_cls_kwargs=extra_gen_cls_kwargs)
        fix_ngram_repeat_block(generator)
        mode = safe_getattr(self.args, "ctc_decoding", "none")
        if mode == "none":
            return generator
        if mode not in CTC_DECODING_MODES:
            raise ValueError(f"--ctc-decoding must be one of {', '.join(CTC_DECODING_MODES)}, got {mode!r}")
        model = self._single_ctc_model(models, mode)
        if mode in ("greedy", "lexicon"):
            _refuse_what_one_ctc_path_cannot_give(mode, generator, args,
                                                  int(getattr(model, "ctc_target_prefix_size", 0)))
            if int(getattr(model, "ctc_target_prefix_size", 0)) > 0:
                logger.warning(f"--ctc-decoding {mode} reads the CTC head alone, which does not see the target "
                               "language: every target language of an utterance gets the same labels (behind its "
                               "language tag). Multilingual models decode with --ctc-decoding none or joint")
        if mode == "greedy":
            logger.info("decoding: best-path CTC (the decoder is not run)")
            return CTCGreedyGenerator(model, eos=generator.eos, blank=CTC_BLANK_INDEX,
                                      symbols_to_strip_from_output=generator.symbols_to_strip_from_output,
                                      **_score_normalisation(generator))
        if mode == "lexicon":
            return self._lexicon_generator(model, generator, args)
        weight = float(self.args.ctc_decoding_weight)
        candidates = int(self.args.ctc_decoding_candidates)
        generator = add_ctc_prefix_scores(generator, weight=weight, candidates=candidates, blank=CTC_BLANK_INDEX,
                                          skip_tokens=int(getattr(model, "ctc_target_prefix_size", 0)))
        logger.info(f"decoding: joint CTC/attention beam search, CTC weight {weight}, "
                    f"{generator.model.candidates} CTC candidates per hypothesis")
        return generator

    def _lexicon_generator(self, model, generator, args) -> CTCLexiconGenerator:
        text = safe_getattr(self.args, "lexicon_text", None)
        if not text:
            raise ValueError("--ctc-decoding lexicon needs --lexicon-text FILE (one sentence per line: the lexicon "
                             "and the word bigram model's text)")
        lm = WordBigramLM.from_text(text)
        trie = LexiconTrie(lm.vocabulary)
        options = LexiconSearchOptions(beam=int(safe_getattr(args, "beam", 5) or 5),
                                       lm_weight=float(self.args.lexicon_lm_weight),
                                       word_score=float(self.args.lexicon_word_score),
                                       oov_score=float(self.args.lexicon_oov_score))
        dictionary = self.target_dictionary
        unwritten = {dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk(), CTC_BLANK_INDEX,
                     *generator.symbols_to_strip_from_output}
        label_texts = dictionary_label_texts(dictionary.symbols, sorted(unwritten))
        unspellable = unspellable_words(lm.vocabulary, label_texts)
        if unspellable:
            logger.warning(f"--lexicon-text {text}: {len(unspellable)} of {len(lm.vocabulary)} words use characters no "
                           f"target label writes (they can never be output), e.g. {unspellable[:5]}")
        logger.info(f"decoding: CTC lexicon beam search, {len(lm.vocabulary)} words from {text}, beam {options.beam}, "
                    f"LM weight {options.lm_weight}, word score {options.word_score}, OOV score {options.oov_score}")
        return CTCLexiconGenerator(model, label_texts, eos=generator.eos, blank=CTC_BLANK_INDEX, trie=trie, lm=lm,
                                   options=options, symbols_to_strip_from_output=generator.symbols_to_strip_from_output,
                                   **_score_normalisation(generator))

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


def _score_normalisation(generator: SequenceGenerator) -> dict:
    """fairseq's ``--lenpen`` / ``--unnormalized`` as the CTC-head generators apply them."""
    return {"normalize_scores": bool(generator.normalize_scores), "len_penalty": float(generator.len_penalty),
            "pad": int(generator.pad)}


def _refuse_what_one_ctc_path_cannot_give(mode: str, generator, args, ctc_target_prefix_size: int = 0) -> None:
    """Greedy and lexicon CTC decoding search for one hypothesis per utterance from the CTC head
    alone, without an attention alignment: refuse the flags that ask for something else (another
    search, a language model, the decoder's length limits, forced target tokens beyond the
    language tag) instead of ignoring them."""
    if not isinstance(generator, SequenceGenerator):
        raise ValueError(f"--ctc-decoding {mode} cannot be combined with --score-reference")
    from fairseq.search import BeamSearch

    if type(generator.search) is not BeamSearch:
        raise ValueError(f"--ctc-decoding {mode} is a search of its own; it does not combine with "
                         f"{type(generator.search).__name__} (--sampling, --diverse-beam-groups, --diversity-rate, "
                         "--match-source-len, --constraints): leave those out or use --ctc-decoding none")
    refused = []
    if getattr(generator, "lm_model", None) is not None:
        refused.append("--lm-path (the lexicon mode has a word language model of its own: --lexicon-text)")
    if int(generator.min_len) > 1:
        refused.append(f"--min-len {generator.min_len}")
    if float(getattr(generator, "temperature", 1.0)) != 1.0:
        refused.append(f"--temperature {generator.temperature}")
    if float(getattr(generator, "unk_penalty", 0.0)) != 0.0:
        refused.append(f"--unkpen {generator.unk_penalty} (the CTC head never writes <unk>)")
    if int(safe_getattr(args, "no_repeat_ngram_size", 0) or 0) > 0:
        refused.append(f"--no-repeat-ngram-size {args.no_repeat_ngram_size}")
    prefix_size = int(safe_getattr(args, "prefix_size", 0) or 0)
    if prefix_size > ctc_target_prefix_size:
        refused.append(f"--prefix-size {prefix_size} (the CTC head writes every target token itself; only "
                       f"{ctc_target_prefix_size} leading token(s), the language tag, can be forced)")
    if refused:
        raise ValueError(f"--ctc-decoding {mode} reads the CTC head alone and cannot honour "
                         + "; ".join(refused) + ": leave them out or use --ctc-decoding joint or none")
    nbest = int(safe_getattr(args, "nbest", 1) or 1)
    if nbest > 1:
        raise ValueError(f"--ctc-decoding {mode} gives one hypothesis per utterance, not --nbest {nbest}: "
                         "use --ctc-decoding joint or none for n-best lists")
    if safe_getattr(args, "print_alignment", None):
        raise ValueError(f"--ctc-decoding {mode} has no attention alignment to print: leave out --print-alignment")

