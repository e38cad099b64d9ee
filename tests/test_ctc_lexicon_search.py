"""Lexicon-constrained CTC beam search with a word bigram model (``--ctc-decoding lexicon``).

- The bigram model: a hand-computed probability, and every history's distribution sums to one
  over the lexicon, ``</s>`` and ``<unk>``; the lexicon text from a plain file or a manifest.
- The search against brute force: on tiny random posteriors, with no pruning, it returns the label
  sequence that maximises CTC probability (summed over every alignment) plus the language-model
  terms, with words outside the lexicon allowed at a cost and forbidden.
- On hand-made posteriors: a misspelling that greedy CTC writes becomes the lexicon word, the
  language model picks between two words the audio cannot tell apart.
- fairseq-generate's use of it is in ``test_ctc_decoding.py`` (a trained model).
"""
from __future__ import annotations

import math

import pytest
import torch

from ctc_reference import brute_force_ctc
from slam_fairseq.decoding.ctc_greedy import ctc_best_paths
from slam_fairseq.decoding.ctc_lexicon_search import (
    LexiconSearchOptions,
    ctc_lexicon_search,
    dictionary_label_texts,
    unspellable_words,
)
from slam_fairseq.decoding.word_lm import SENTENCE_END, UNKNOWN_WORD, LexiconTrie, WordBigramLM, read_sentences

BLANK = 0
EXACT = dict(beam=100_000, prune=math.inf, labels_per_frame=100, blank_skip=1.0)


def test_bigram_probabilities_by_hand_and_normalised():
    lm = WordBigramLM([["a", "b"], ["a", "c"]], discount=0.5)
    # 6 tokens (a b </s> a c </s>), 4 seen types + <unk>: P_uni(b) = (1 + 1) / (6 + 5)
    unigram_b = 2 / 11
    assert lm.log_prob("a", "b") == pytest.approx(math.log((1 - 0.5) / 2 + 0.5 * 2 / 2 * unigram_b))
    assert lm.log_prob("a", "never") == lm.log_prob("a", UNKNOWN_WORD)
    for history in ("<s>", "a", "b", "unseen history"):
        total = sum(math.exp(lm.log_prob(history, word))
                    for word in [*lm.vocabulary, SENTENCE_END, UNKNOWN_WORD])
        assert total == pytest.approx(1.0, abs=1e-12), history


def test_lexicon_text_from_a_file_or_a_manifest(tmp_path):
    plain = tmp_path / "text.txt"
    plain.write_text("нажмите 1\n\nдля выхода\n", encoding="utf-8")
    assert read_sentences(plain) == [["нажмите", "1"], ["для", "выхода"]]
    manifest = tmp_path / "train.tsv"
    manifest.write_text("id\taudio\tn_frames\ttgt_text\nu1\tx.npy\t10\tнажмите 1\n", encoding="utf-8")
    assert read_sentences(manifest) == [["нажмите", "1"]]
    broken = tmp_path / "broken.tsv"
    broken.write_text("id\ttgt_text\nu1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.tsv: line 2 has no tgt_text"):
        read_sentences(broken)
    untitled = tmp_path / "pairs.tsv"  # a manifest without tgt_text: its ids and paths are no words
    untitled.write_text("id\taudio\tn_frames\nu1\tx.npy\t10\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs\.tsv: a \.tsv whose header \(id, audio, n_frames\) has no tgt_text"):
        read_sentences(untitled)
    marked = tmp_path / "marked.tsv"  # a byte-order mark before the header
    marked.write_text("\ufeffid\ttgt_text\nu1\tда нет\n", encoding="utf-8")
    assert read_sentences(marked) == [["да", "нет"]]
    one_column = tmp_path / "words.tsv"  # a .tsv of one column is text
    one_column.write_text("да нет\n", encoding="utf-8")
    assert read_sentences(one_column) == [["да", "нет"]]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt: no words"):
        read_sentences(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_sentences(tmp_path / "missing.txt")


def test_trie_steps_and_word_ends():
    trie = LexiconTrie(["кот", "ко", "кит"])
    node = trie.step(trie.step(LexiconTrie.ROOT, "к"), "о")
    assert trie.is_word(node) and not trie.is_word(trie.step(LexiconTrie.ROOT, "к"))
    assert trie.is_word(trie.step(node, "т")) and trie.step(node, "x") is None


def test_label_texts_of_pieces_and_of_word_dictionaries():
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁на", "жми", "▁", "<lang:ru>", "madeupword0000"]
    assert dictionary_label_texts(pieces, [0, 1, 2, 3]) == [None] * 4 + ["▁на", "жми", "▁", None, None]
    assert dictionary_label_texts(["<s>", "cat", "dog"], [0]) == [None, "▁cat", "▁dog"]


# ---------------------------------------------------------------------------------------------
# against brute force

LABELS = [None, "▁a", "b", "▁ab", "▁"]  # blank, then pieces that spell a, b, ab, ba, abab, ...
SENTENCES = [["ab", "a"], ["a", "ab"], ["ab"], ["a", "a", "ab"]]


def _language_score(labels, lm, lexicon, options):
    """The search's word terms computed from the output text: None when it is ruled out."""
    words = "".join(LABELS[label] for label in labels).replace("▁", " ").split()
    score, history = 0.0, "<s>"
    for word in words:
        if word not in lexicon:
            if options.oov_score == -math.inf:
                return None
            score += options.oov_score
            word = UNKNOWN_WORD
        score += options.lm_weight * lm.log_prob(history, word) + options.word_score
        history = word
    return score + options.lm_weight * lm.log_prob(history, SENTENCE_END)


@pytest.mark.parametrize("oov_score", [-2.0, -math.inf])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_finds_the_best_output_of_brute_force(seed, oov_score):
    torch.manual_seed(seed)
    log_probs = torch.randn(5, len(LABELS)).mul(1.5).log_softmax(-1)
    lm = WordBigramLM(SENTENCES)
    lexicon = lm.vocabulary
    options = LexiconSearchOptions(lm_weight=0.8, word_score=0.3, oov_score=oov_score, **EXACT)
    expected = {}
    for output, ctc in brute_force_ctc(log_probs, log_probs.size(0), BLANK)[1].items():
        language = _language_score(output, lm, lexicon, options)
        if language is not None:
            expected[output] = (ctc + language, ctc)
    best = max(expected, key=lambda output: expected[output][0])
    found = ctc_lexicon_search(log_probs, LABELS, BLANK, LexiconTrie(lexicon), lm, options)
    assert tuple(found.labels) == best
    assert found.score == pytest.approx(expected[best][0], abs=1e-6)
    assert found.ctc_log_prob == pytest.approx(expected[best][1], abs=1e-6)


def test_without_lexicon_costs_the_search_is_ctc_best_labelling_on_peaked_posteriors():
    torch.manual_seed(3)
    frames = torch.randint(0, len(LABELS), (12,))
    log_probs = torch.full((12, len(LABELS)), -8.0)
    log_probs[torch.arange(12), frames] = 0.0
    log_probs = log_probs.log_softmax(-1)
    lm = WordBigramLM(SENTENCES)
    options = LexiconSearchOptions(beam=8, lm_weight=0.0, word_score=0.0, oov_score=0.0)
    found = ctc_lexicon_search(log_probs, LABELS, BLANK, LexiconTrie(lm.vocabulary), lm, options)
    greedy = ctc_best_paths(log_probs.unsqueeze(1), torch.tensor([12]), BLANK)[0]
    assert found.labels == greedy.tokens.tolist()


# ---------------------------------------------------------------------------------------------
# hand-made posteriors

WORD_LABELS = [None, "▁", "к", "а", "о", "т", "▁да", "▁нет"]


def _frames(*rows):
    """Each row: {label: probability}, the rest of the frame's mass spread over the other labels."""
    log_probs = torch.full((len(rows), len(WORD_LABELS)), 1e-4)
    for t, row in enumerate(rows):
        for label, probability in row.items():
            log_probs[t, label] = probability
    return (log_probs / log_probs.sum(-1, keepdim=True)).log()


def test_a_misspelling_of_greedy_ctc_becomes_the_lexicon_word():
    log_probs = _frames({1: 1.0}, {2: 1.0}, {3: 0.6, 4: 0.4}, {5: 1.0}, {0: 1.0})
    greedy = ctc_best_paths(log_probs.unsqueeze(1), torch.tensor([5]), BLANK)[0].tokens.tolist()
    assert greedy == [1, 2, 3, 5]  # "кат"
    lm = WordBigramLM([["кот"], ["да"], ["нет"]])
    for oov_score in (-math.inf, -10.0):
        options = LexiconSearchOptions(beam=8, oov_score=oov_score)
        found = ctc_lexicon_search(log_probs, WORD_LABELS, BLANK, LexiconTrie(lm.vocabulary), lm, options)
        assert found.labels == [1, 2, 4, 5]  # "кот"
    free = LexiconSearchOptions(beam=8, oov_score=0.0, lm_weight=0.0)
    assert ctc_lexicon_search(log_probs, WORD_LABELS, BLANK, LexiconTrie(lm.vocabulary), lm, free).labels == greedy


def test_the_language_model_picks_between_words_the_audio_cannot_tell_apart():
    log_probs = _frames({2: 1.0}, {4: 1.0}, {5: 1.0}, {0: 1.0}, {6: 0.5, 7: 0.5}, {0: 1.0})  # "кот" then да|нет
    lm = WordBigramLM([["кот", "нет"]] * 3 + [["да"]] * 5)
    options = LexiconSearchOptions(beam=8, oov_score=-math.inf, lm_weight=1.0)
    found = ctc_lexicon_search(log_probs, WORD_LABELS, BLANK, LexiconTrie(lm.vocabulary), lm, options)
    assert found.labels == [2, 4, 5, 7]  # "кот нет": after кот the bigram says нет, though да is likelier alone


def test_audio_that_ends_inside_a_lexicon_word_keeps_the_words_before_it():
    """Lexicon words only (oov -inf): the utterance stops after "да к(о)", in the middle of "кот";
    no prefix the search holds at the last frame finishes a word, and the output is "да" rather
    than nothing."""
    log_probs = _frames({6: 1.0}, {1: 1.0}, {2: 1.0}, {4: 1.0})
    lm = WordBigramLM([["да", "кот"], ["кот"]])
    for beam in (1, 8):
        options = LexiconSearchOptions(beam=beam, oov_score=-math.inf)
        found = ctc_lexicon_search(log_probs, WORD_LABELS, BLANK, LexiconTrie(lm.vocabulary), lm, options)
        words = "".join(WORD_LABELS[label] for label in found.labels).replace("▁", " ").split()
        assert words == ["да"] and math.isfinite(found.score), (beam, found)


def test_search_rejects_posteriors_of_another_vocabulary():
    lm = WordBigramLM(SENTENCES)
    with pytest.raises(ValueError, match=r"expected \(T, 5\) log-probs"):
        ctc_lexicon_search(torch.zeros(3, 4), LABELS, BLANK, LexiconTrie(lm.vocabulary), lm)


def test_bad_options_and_unspellable_words_are_named():
    for bad, named in [(dict(beam=0), "beam must be at least 1"), (dict(lm_weight=-1.0), "lm_weight"),
                       (dict(word_score=math.inf), "word_score"), (dict(oov_score=math.inf), "oov_score"),
                       (dict(blank_skip=0.0), "blank_skip")]:
        with pytest.raises(ValueError, match=named):
            LexiconSearchOptions(**bad)
    LexiconSearchOptions(oov_score=-math.inf)
    assert unspellable_words(["кот", "Кот", "cat"], WORD_LABELS) == ["cat", "Кот"]
