"""The paired bootstrap of the real-speech report (``examples/realspeech/significance.py``): the
per-utterance errors add up to fairseq's own WER, and the interval and share behave as a paired
bootstrap must on systems whose difference is known."""
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "realspeech"))
import significance  # noqa: E402
from significance import UtteranceErrors, paired_bootstrap, pool_seeds, utterance_errors  # noqa: E402

REFERENCES = ["Суббота, утро.", "hello world again", "one two three four", "a b", "the end"]


def _generate_output(hypotheses, references=REFERENCES, extra_hypothesis_of=None) -> str:
    """fairseq-generate's lines for each utterance (in another order than the ids, as it writes them)."""
    lines = ["INFO:fairseq_cli.generate:loading"]
    for sample_id in reversed(range(len(references))):
        lines += [f"S-{sample_id}\tsource", f"T-{sample_id}\t{references[sample_id]}",
                  f"H-{sample_id}\t-0.5\t{hypotheses[sample_id]}", f"D-{sample_id}\t-0.5\t{hypotheses[sample_id]}"]
        if sample_id == extra_hypothesis_of:  # a second (worse) hypothesis of an id: not the one scored
            lines.append(f"D-{sample_id}\t-9.0\tcompletely different words here")
    lines.append("Generate test_asr with beam=5: WER: 0.00")
    return "\n".join(lines) + "\n"


def test_per_utterance_errors_add_up_to_fairseqs_wer_scorer():
    from fairseq.scoring.wer import WerScorer, WerScorerConfig

    hypotheses = ["суббота утро", "hello word", "one two three four five", "", "The End!"]
    errors = utterance_errors(_generate_output(hypotheses, extra_hypothesis_of=1))
    scorer = WerScorer(WerScorerConfig(wer_tokenizer="13a", wer_lowercase=True, wer_remove_punct=True))
    for reference, hypothesis in zip(REFERENCES, hypotheses):
        scorer.add_string(reference, hypothesis)
    assert errors.wer() == pytest.approx(scorer.score())
    assert errors.errors == {0: 0, 1: 2, 2: 1, 3: 2, 4: 0}  # case and punctuation do not count
    assert errors.ref_words == {0: 2, 1: 3, 2: 4, 3: 2, 4: 2}


def test_an_utterance_without_a_hypothesis_is_an_error():
    output = _generate_output(["x"] * 5).replace("D-3\t-0.5\tx\n", "")
    with pytest.raises(ValueError, match=r"reference and no hypothesis or the reverse: \[3\]"):
        utterance_errors(output)


def _errors(per_utterance, words):
    return UtteranceErrors(dict(enumerate(per_utterance)), dict(enumerate(words)))


def test_identical_systems_differ_by_nothing_and_are_never_better():
    a = _errors([1, 0, 2, 3, 0, 1], [3, 2, 4, 5, 2, 3])
    result = paired_bootstrap(a, a, resamples=2000)
    assert (result.difference, result.low, result.high, result.p_not_better) == (0.0, 0.0, 0.0, 1.0)


def test_a_system_better_on_every_utterance_has_an_interval_below_zero_and_a_share_of_zero():
    words = [4] * 20
    better, worse = _errors([1] * 20, words), _errors([2] * 20, words)
    result = paired_bootstrap(better, worse, resamples=2000)
    assert result.difference == pytest.approx(-25.0)  # 20 fewer errors in 80 words
    assert result.low == pytest.approx(-25.0) and result.high == pytest.approx(-25.0)  # the same in every resample
    assert result.p_not_better == 0.0 and (result.wer_a, result.wer_b) == (25.0, 50.0)


def test_one_utterance_of_many_deciding_gives_a_wide_interval_that_matches_a_direct_count():
    """A is better on one utterance of 10 (by 4 errors), equal elsewhere: a resample that misses
    that utterance (probability 0.9 ** 10) shows no difference, so the share is about 0.35."""
    words = [5] * 10
    a = _errors([0] + [2] * 9, words)
    b = _errors([4] + [2] * 9, words)
    result = paired_bootstrap(a, b, resamples=20000, seed=3)
    assert result.p_not_better == pytest.approx(0.9 ** 10, abs=0.015)
    assert result.high == 0.0 and result.low < -8.0
    assert result.difference == pytest.approx(-8.0)


def test_seeds_pool_utterance_by_utterance_and_must_cover_the_same_utterances():
    one, two = _errors([1, 0], [3, 2]), _errors([2, 2], [3, 2])
    pooled = pool_seeds([one, two])
    assert pooled.errors == {0: 3, 1: 2} and pooled.ref_words == {0: 6, 1: 4}
    assert pooled.wer() == pytest.approx(50.0)
    with pytest.raises(ValueError, match="different utterances"):
        pool_seeds([one, _errors([1], [3])])
    with pytest.raises(ValueError, match="same utterances"):
        paired_bootstrap(one, _errors([1], [3]))


def test_the_command_line_compares_a_generate_folder_seed_by_seed(tmp_path, capsys):
    right = ["суббота утро", "hello world again", "one two three four", "a b", "the end"]
    wrong = ["x", "hello x again", "one two x four", "a b", "x end"]
    files = {"asr_pretrained_seed1_lexicon.txt": right, "asr_pretrained_seed2_lexicon.txt": right,
             "asr_scratch_seed1_lexicon.txt": wrong, "asr_scratch_seed2_lexicon.txt": right,
             "asr_scratch_seed3_lexicon.txt": wrong,  # no pretrained seed 3: left out
             "asr_pretrained_seed1_lexicon_dev_asr.txt": wrong, "asr_scratch_seed1_lexicon_dev_asr.txt": wrong}
    for name, hypotheses in files.items():
        (tmp_path / name).write_text(_generate_output(hypotheses), encoding="utf-8")
    results = significance.compare_generate_dir(tmp_path, resamples=500)
    assert list(results) == ["lexicon"]
    assert results["lexicon"].wer_a == 0.0 and results["lexicon"].wer_b == pytest.approx(100.0 * 5 / 26)
    dev = significance.compare_generate_dir(tmp_path, resamples=500, suffix="_dev_asr")
    assert dev["lexicon"].difference == 0.0
    assert significance.main([str(tmp_path), "--resamples", "500"]) == 0
    printed = capsys.readouterr().out
    assert "paired bootstrap over 5 utterances, 500 resamples" in printed
    assert "| lexicon | 0.00 | 19.23 | -19.23 (" in printed
    assert significance.main([str(tmp_path / "nothing")]) == 2
