"""A lexicon and a word bigram language model read from plain text, for lexicon-constrained CTC search.

The text is one sentence per line, words separated by white space (the same text a ``slam``
text corpus or a ``speech_to_text`` manifest's ``tgt_text`` holds). The lexicon is every word of
it; the bigram model is interpolated absolute discounting (Ney et al., 1994) over the words, with
``</s>`` ending every sentence and ``<s>`` as the history of its first word:

``P(w | v) = max(c(v, w) - d, 0) / c(v) + d * N1+(v .) / c(v) * P_uni(w)``

with ``P_uni(w) = (c(w) + 1) / (N + |V| + 1)``, add-one unigrams over the lexicon plus one slot for
words outside it (``P_uni(<unk>)``), so every word, seen or not, has a finite log-probability.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from slam_formats.manifest import not_utf8_error

__all__ = ["SENTENCE_START", "SENTENCE_END", "UNKNOWN_WORD", "LexiconTrie", "WordBigramLM", "read_sentences"]

SENTENCE_START = "<s>"
SENTENCE_END = "</s>"
UNKNOWN_WORD = "<unk>"


def read_sentences(path: Path) -> List[List[str]]:
    """The sentences of a UTF-8 text file (one per line) or of a ``speech_to_text`` manifest (a
    ``.tsv`` whose header has ``tgt_text``), split on white space; names the file when it holds
    none, or when it is a ``.tsv`` of several columns without ``tgt_text``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lexicon text {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"lexicon text {not_utf8_error(str(path), error)}") from None
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    header = lines[0].split("\t") if lines else []
    if path.suffix == ".tsv" and "tgt_text" not in header and "\t" in lines[0]:
        raise ValueError(f"lexicon text {path}: a .tsv whose header ({', '.join(header[:6])}) has no tgt_text "
                         "column: give a speech_to_text manifest, or plain text with one sentence per line")
    if path.suffix == ".tsv" and "tgt_text" in header:
        column = lines[0].split("\t").index("tgt_text")
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        short = [number for number, row in enumerate(rows, start=2) if len(row) <= column]
        if short:
            raise ValueError(f"lexicon text {path}: line {short[0]} has no tgt_text column")
        lines = [row[column] for row in rows]
    sentences = [line.split() for line in lines if line.strip()]
    if not sentences:
        raise ValueError(f"lexicon text {path}: no words (expected one sentence per line)")
    return sentences


class LexiconTrie:
    """The words of a lexicon as a character trie; a node is an int, the root is 0.

    ``step(node, char)`` gives the child node or ``None`` when no lexicon word continues that way;
    ``is_word(node)`` says whether the characters from the root to ``node`` spell a word.
    """

    ROOT = 0

    def __init__(self, words: Iterable[str]) -> None:
        self._children: List[Dict[str, int]] = [{}]
        self._word_ends: List[bool] = [False]
        for word in words:
            node = self.ROOT
            for char in word:
                child = self._children[node].get(char)
                if child is None:
                    child = len(self._children)
                    self._children[node][char] = child
                    self._children.append({})
                    self._word_ends.append(False)
                node = child
            if node != self.ROOT:
                self._word_ends[node] = True

    def step(self, node: int, char: str) -> Optional[int]:
        return self._children[node].get(char)

    def is_word(self, node: int) -> bool:
        return self._word_ends[node]

    def __len__(self) -> int:
        """Nodes, the root included."""
        return len(self._children)


class WordBigramLM:
    """Interpolated absolute-discounting word bigrams (module docstring), natural-log probabilities.

    Args:
        sentences: lists of words.
        discount: ``d``, in (0, 1).
    """

    def __init__(self, sentences: Iterable[List[str]], discount: float = 0.7) -> None:
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.discount = discount
        unigrams: Counter = Counter()
        bigrams: Dict[str, Counter] = defaultdict(Counter)
        for words in sentences:
            history = SENTENCE_START
            for word in list(words) + [SENTENCE_END]:
                unigrams[word] += 1
                bigrams[history][word] += 1
                history = word
        self.vocabulary = frozenset(w for w in unigrams if w != SENTENCE_END)
        total = sum(unigrams.values())
        slots = len(unigrams) + 1  # every seen word, </s> included, and one for <unk>
        self._unigram = {w: (c + 1) / (total + slots) for w, c in unigrams.items()}
        self._unknown = 1.0 / (total + slots)
        self._bigrams = {v: (dict(following), sum(following.values()), len(following))
                         for v, following in bigrams.items()}
        self._cache: Dict[Tuple[str, str], float] = {}

    def log_prob(self, history: str, word: str) -> float:
        """``log P(word | history)``; a word outside the lexicon is scored as ``<unk>``."""
        key = (history, word)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        unigram = self._unigram.get(word, self._unknown) if word != UNKNOWN_WORD else self._unknown
        following = self._bigrams.get(history)
        if following is None:
            probability = unigram
        else:
            counts, total, distinct = following
            probability = (max(counts.get(word, 0) - self.discount, 0.0) / total
                           + self.discount * distinct / total * unigram)
        value = math.log(probability)
        self._cache[key] = value
        return value

    @classmethod
    def from_text(cls, path: Path, discount: float = 0.7) -> "WordBigramLM":
        return cls(read_sentences(path), discount=discount)
