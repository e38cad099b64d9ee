"""CTC prefix beam search over a lexicon with a word language model (``--ctc-decoding lexicon``).

Greedy CTC on a character-level model spells each word independently ("одинудцать" for
"одиннадцать"); this search keeps, frame by frame, the ``beam`` best label prefixes under

``score(g) = log p_ctc(g) + lm_weight * sum_words log P_lm(w_i | w_{i-1}) + word_score * words(g)
             + oov_score * oov_words(g)``

where ``log p_ctc(g)`` is the CTC probability of the frames so far emitting ``g`` (the blank / label
forward variables of the standard CTC prefix beam search: Hannun et al., 2014, "First-Pass Large
Vocabulary Continuous Speech Recognition using Bi-Directional Recurrent DNNs"), and the language
model terms are added when a word is finished (a label starting with the word boundary ``▁``, or
the end of the utterance). The labels are the target dictionary's pieces; a piece's characters
walk a character trie of the lexicon, so pieces of any segmentation spell lexicon words. A word
outside the lexicon costs ``oov_score`` (``-inf``: only lexicon words can be written) plus the
language model's ``<unk>`` probability.

Only labels within ``prune`` nats of each frame's best, and at most ``labels_per_frame`` of them,
are tried at that frame; a frame whose blank probability is above ``blank_skip`` only extends
prefixes with blank. Both bound the work per frame and leave the best path in the search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from slam_fairseq.decoding.ctc_greedy import CTCHeadGenerator
from slam_fairseq.decoding.word_lm import SENTENCE_END, SENTENCE_START, UNKNOWN_WORD, LexiconTrie, WordBigramLM

__all__ = ["WORD_BOUNDARY", "LexiconSearchOptions", "LexiconHypothesis", "ctc_lexicon_search", "dictionary_label_texts",
           "unspellable_words", "CTCLexiconGenerator"]

WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁"
_NEG_INF = float("-inf")
_OOV_NODE = -1  # trie position of a word that left the lexicon


def _log_add(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


@dataclass(frozen=True)
class LexiconSearchOptions:
    """Attributes: beam (prefixes kept per frame), lm_weight, word_score, oov_score (``-inf`` for
    lexicon words only), prune (nats below a frame's best label), labels_per_frame, blank_skip
    (blank probability above which a frame only extends with blank)."""

    beam: int = 16
    lm_weight: float = 0.5
    word_score: float = 0.0
    oov_score: float = -10.0
    prune: float = 10.0
    labels_per_frame: int = 12
    blank_skip: float = 0.999

    def __post_init__(self) -> None:
        problems = []
        if self.beam < 1:
            problems.append(f"beam must be at least 1, got {self.beam}")
        if not (0.0 <= self.lm_weight < math.inf):
            problems.append(f"lm_weight must be finite and at least 0, got {self.lm_weight}")
        if not math.isfinite(self.word_score):
            problems.append(f"word_score must be finite, got {self.word_score}")
        if math.isnan(self.oov_score) or self.oov_score == math.inf:
            problems.append(f"oov_score must be a number or -inf, got {self.oov_score}")
        if not self.prune > 0 or self.labels_per_frame < 1 or not 0.0 < self.blank_skip <= 1.0:
            problems.append(f"prune > 0, labels_per_frame >= 1 and blank_skip in (0, 1] are needed, got "
                            f"{self.prune}, {self.labels_per_frame}, {self.blank_skip}")
        if problems:
            raise ValueError("lexicon search: " + "; ".join(problems))


@dataclass(frozen=True)
class _Words:
    """The word-level state of a prefix: the finished words' score, the last finished word (the
    bigram history), the word being spelled and its trie node."""

    score: float
    history: str
    partial: str
    node: int

    def finish(self, lm: WordBigramLM, options: LexiconSearchOptions, trie: LexiconTrie,
               final: bool) -> Optional["_Words"]:
        """The state after the word being spelled ends (``final``: and the sentence); ``None`` when
        that word is outside the lexicon and ``oov_score`` is ``-inf``."""
        score, history = self.score, self.history
        if self.partial:
            if self.node != _OOV_NODE and trie.is_word(self.node):
                word = self.partial
            else:  # outside the lexicon: paid where it left the trie, or here for a prefix of words
                if self.node != _OOV_NODE:
                    if options.oov_score == _NEG_INF:
                        return None
                    score += options.oov_score
                word = UNKNOWN_WORD
            score += options.lm_weight * lm.log_prob(history, word) + options.word_score
            history = word
        if final:
            score += options.lm_weight * lm.log_prob(history, SENTENCE_END)
        return _Words(score, history, "", LexiconTrie.ROOT)

    def write(self, text: str, lm: WordBigramLM, options: LexiconSearchOptions,
              trie: LexiconTrie) -> Optional["_Words"]:
        """The state after ``text`` (a piece's characters, ``▁`` a word boundary); ``None`` when it is
        ruled out (a word outside the lexicon with ``oov_score`` ``-inf``)."""
        state: Optional[_Words] = self
        for char in text:  # a word leaving the lexicon pays ``oov_score`` there, once
            if char == WORD_BOUNDARY or char.isspace():
                state = state.finish(lm, options, trie, final=False)
            else:
                node, score = state.node, state.score
                if node != _OOV_NODE:
                    node = trie.step(node, char)
                    if node is None:
                        if options.oov_score == _NEG_INF:
                            return None
                        node, score = _OOV_NODE, score + options.oov_score
                state = _Words(score, state.history, state.partial + char, node)
            if state is None:
                return None
        return state


@dataclass
class LexiconHypothesis:
    """One utterance's result: ``labels`` (the label indices), ``score`` (the search score),
    ``ctc_log_prob`` (``log p_ctc`` of the labels over the whole utterance)."""

    labels: List[int]
    score: float
    ctc_log_prob: float


class _Prefix:
    __slots__ = ("labels", "blank", "label", "words")

    def __init__(self, labels: Tuple[int, ...], words: _Words) -> None:
        self.labels = labels
        self.blank = _NEG_INF  # log p(frames so far emit labels, last frame blank)
        self.label = _NEG_INF  # ... last frame emitting the last label
        self.words = words

    def ctc(self) -> float:
        return _log_add(self.blank, self.label)


def ctc_lexicon_search(log_probs: Tensor, label_texts: Sequence[Optional[str]], blank: int,
                       trie: LexiconTrie, lm: WordBigramLM,
                       options: LexiconSearchOptions = LexiconSearchOptions()) -> LexiconHypothesis:
    """Decodes one utterance.

    Args:
        log_probs: (T, V) CTC log-posteriors of the utterance's frames (no padding).
        label_texts: for each label index, its characters (``▁`` a word boundary), or ``None`` for a
            label that is never written (blank, padding, ``</s>``, language tags, ``<unk>``).
        blank: the blank's index.
        trie, lm: the lexicon and the word language model.
        options: the search's weights and limits.
    Returns:
        the best hypothesis after the last frame, its final word and ``</s>`` scored.
    """
    if log_probs.dim() != 2 or log_probs.size(1) != len(label_texts):
        raise ValueError(f"expected (T, {len(label_texts)}) log-probs, got {tuple(log_probs.shape)}")
    frames = log_probs.float().cpu()
    blank_skip = math.log(options.blank_skip)
    empty = _Prefix((), _Words(0.0, SENTENCE_START, "", LexiconTrie.ROOT))
    empty.blank = 0.0
    beam: Dict[Tuple[int, ...], _Prefix] = {(): empty}
    writable = [i for i, text in enumerate(label_texts) if text and i != blank]
    writable_mask = torch.zeros(len(label_texts), dtype=torch.bool)
    writable_mask[writable] = True

    finalists = beam  # the last frame's prefixes, all of them: the search's result is among them
    for frame in frames:
        blank_lp = float(frame[blank])
        candidates: List[Tuple[int, float]] = []
        if blank_lp < blank_skip:
            scores = frame.masked_fill(~writable_mask, _NEG_INF)
            top = torch.topk(scores, min(options.labels_per_frame, len(writable)))
            best = float(top.values[0])
            candidates = [(int(i), float(v)) for v, i in zip(top.values, top.indices)
                          if float(v) >= best - options.prune]
        following: Dict[Tuple[int, ...], _Prefix] = {}
        for prefix in beam.values():
            total = prefix.ctc()
            # blank: the labels stay the same
            kept = following.get(prefix.labels)
            if kept is None:
                kept = following[prefix.labels] = _Prefix(prefix.labels, prefix.words)
            kept.blank = _log_add(kept.blank, total + blank_lp)
            last = prefix.labels[-1] if prefix.labels else None
            for label, label_lp in candidates:
                if label == last:
                    # the same label again without a blank in between: the labels stay the same
                    kept.label = _log_add(kept.label, prefix.label + label_lp)
                    from_blank = prefix.blank  # ... and after a blank it is a new label
                else:
                    from_blank = total
                if from_blank == _NEG_INF:
                    continue
                labels = prefix.labels + (label,)
                extended = following.get(labels)
                if extended is None:
                    words = prefix.words.write(label_texts[label], lm, options, trie)
                    if words is None:
                        continue
                    extended = following[labels] = _Prefix(labels, words)
                extended.label = _log_add(extended.label, from_blank + label_lp)
        finalists = following
        ranked = sorted(following.values(), key=lambda p: p.ctc() + p.words.score, reverse=True)
        beam = {p.labels: p for p in ranked[:options.beam]}

    best: Optional[LexiconHypothesis] = None
    for prefix in finalists.values():
        words = prefix.words.finish(lm, options, trie, final=True)
        if words is None:
            continue
        ctc = prefix.ctc()
        score = ctc + words.score
        if best is None or score > best.score:
            best = LexiconHypothesis(list(prefix.labels), score, ctc)
    if best is None:
        best = _without_the_unfinished_word(max(finalists.values(), key=lambda p: p.ctc() + p.words.score),
                                            label_texts, trie, lm, options)
    if best is None:  # not even the words before the last one are in the lexicon: write nothing
        best = LexiconHypothesis([], _NEG_INF, float(frames[:, blank].sum()))
    return best


def _without_the_unfinished_word(prefix: _Prefix, label_texts: Sequence[Optional[str]], trie: LexiconTrie,
                                 lm: WordBigramLM, options: LexiconSearchOptions) -> Optional[LexiconHypothesis]:
    """With ``oov_score`` ``-inf`` the audio can end in the middle of a lexicon word (every prefix
    the beam kept spells one only in part): the prefix's finished words, without the labels of the
    word it was spelling (scored with the prefix's CTC probability), or None."""
    def starts_a_word(label: int) -> bool:
        text = label_texts[label] or ""
        return bool(text) and (text[0] == WORD_BOUNDARY or text[0].isspace())

    labels = list(prefix.labels)
    while labels and not starts_a_word(labels[-1]):
        labels.pop()
    if labels:
        labels.pop()  # the first label of the unfinished word
    words: Optional[_Words] = _Words(0.0, SENTENCE_START, "", LexiconTrie.ROOT)
    for label in labels:
        words = words.write(label_texts[label], lm, options, trie)
        if words is None:
            return None
    words = words.finish(lm, options, trie, final=True)
    if words is None:
        return None
    return LexiconHypothesis(labels, prefix.ctc() + words.score, prefix.ctc())


def unspellable_words(words, label_texts: Sequence[Optional[str]]) -> List[str]:
    """The words that use a character no label writes (they can never be output)."""
    characters = {char for text in label_texts if text for char in text}
    return sorted(word for word in words if any(char not in characters for char in word))


def dictionary_label_texts(symbols: Sequence[str], unwritten: Sequence[int]) -> List[Optional[str]]:
    """Each label's characters for :func:`ctc_lexicon_search`: the dictionary's symbol, ``None`` for
    ``unwritten`` indices and ``<...>`` symbols (specials, language tags). SentencePiece pieces mark a
    word's start with ``▁``; a dictionary without any ``▁`` holds whole words, each then written
    as a word of its own."""
    pieces = any(WORD_BOUNDARY in symbol for symbol in symbols)
    unwritten = set(unwritten)
    texts: List[Optional[str]] = []
    for index, symbol in enumerate(symbols):
        if index in unwritten or (symbol.startswith("<") and symbol.endswith(">")) or symbol.startswith("madeupword"):
            texts.append(None)
        else:
            texts.append(symbol if pieces else WORD_BOUNDARY + symbol)
    return texts


class CTCLexiconGenerator(CTCHeadGenerator):
    """:func:`ctc_lexicon_search` as a :class:`slam_fairseq.decoding.ctc_greedy.CTCHeadGenerator`:
    per sentence one hypothesis with ``tokens`` (labels + ``eos``), ``score`` (the search score over
    the output length with eos), ``positional_scores`` (the CTC log-probability spread evenly over
    the labels; 0 for eos).

    Args:
        model, eos, symbols_to_strip_from_output: as for ``CTCHeadGenerator``.
        label_texts: see :func:`dictionary_label_texts`.
        blank: the CTC blank's index.
        trie, lm, options: as for :func:`ctc_lexicon_search`.
        normalisation: ``normalize_scores``, ``len_penalty``, ``pad`` of ``CTCHeadGenerator``.
    """

    def __init__(self, model, label_texts: Sequence[Optional[str]], eos: int, blank: int, trie: LexiconTrie,
                 lm: WordBigramLM, options: LexiconSearchOptions,
                 symbols_to_strip_from_output: Sequence[int] = (), **normalisation) -> None:
        super().__init__(model, eos, symbols_to_strip_from_output, **normalisation)
        self.label_texts = list(label_texts)
        self.blank = blank
        self.trie, self.lm, self.options = trie, lm, options

    @torch.no_grad()
    def generate(self, models, sample: Dict, prefix_tokens: Optional[Tensor] = None,
                 **unused) -> List[List[Dict[str, Optional[Tensor]]]]:
        """Decodes ``sample["net_input"]`` (``src_tokens`` (B, T, F), ``src_lengths`` (B,))."""
        log_probs, lengths = self.ctc_output(sample)
        log_probs = log_probs.float().cpu()
        hypotheses = []
        for row, length in enumerate(lengths.tolist()):
            found = ctc_lexicon_search(log_probs[:length, row], self.label_texts, self.blank,
                                       self.trie, self.lm, self.options)
            tokens = torch.tensor(found.labels, dtype=torch.long, device=lengths.device)
            scores = torch.full((len(tokens),), found.ctc_log_prob / max(1, len(tokens)), device=lengths.device)
            hypotheses.append([self.hypothesis(tokens, scores, found.score,
                                               None if prefix_tokens is None else prefix_tokens[row])])
        return hypotheses
