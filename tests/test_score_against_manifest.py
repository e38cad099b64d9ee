"""examples/score_against_manifest.py: hypotheses of fairseq-generate's output scored against the
manifest's tgt_text, not fairseq's dictionary-spelled references."""
import subprocess
import sys
from pathlib import Path

import sacrebleu

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "score_against_manifest.py"

REFERENCES = ["افتح النافذة من فضلك", "the cat sat on the mat", "a dog barks"]
HYPOTHESES = {2: "a dog barked", 0: "افتح النافذة", 1: "the cat sat on a mat"}


def _files(tmp_path: Path, decoded=HYPOTHESES):
    manifest = tmp_path / "test_st.tsv"
    manifest.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\n" + "".join(
        f"u{i}\tfbank.zip:1:2\t100\t{text}\ts\n" for i, text in enumerate(REFERENCES)), encoding="utf-8")
    output = tmp_path / "generate-test_st.txt"
    lines = []
    for index, hypothesis in decoded.items():  # fairseq prints in batch order, not row order
        printed = REFERENCES[index].replace("ذ", "<<unk>>")  # a character the dictionary lacks
        lines += [f"S-{index}\tfbank.zip:1:2", f"T-{index}\t{printed}", f"H-{index}\t-0.3\tx",
                  f"D-{index}\t-0.3\t{hypothesis}", f"P-{index}\t-0.1 -0.2"]
    output.write_text("\n".join(lines + ["Generate test_st with beam=5: BLEU = 1.00"]) + "\n", encoding="utf-8")
    return output, manifest


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_bleu_and_wer_use_the_manifest_references(tmp_path):
    output, manifest = _files(tmp_path)
    run = _run(output, manifest, "--metric", "bleu")
    assert run.returncode == 0, run.stderr
    expected = sacrebleu.corpus_bleu([HYPOTHESES[i] for i in range(3)], [REFERENCES])
    assert str(expected) in run.stdout
    assert "3 rows of" in run.stdout and "1 of fairseq's printed references differ" in run.stdout
    wer = _run(output, manifest, "--metric", "wer")
    # errors: 'من فضلك' deleted (2), 'the'->'a' (1), 'barks'->'barked' (1); 13 reference words
    assert "WER: 30.77 (4 errors, 13 reference words)" in wer.stdout


def test_output_that_does_not_decode_every_row_is_refused_unless_partial(tmp_path):
    output, manifest = _files(tmp_path, {0: "افتح النافذة", 2: "a dog barks"})
    refused = _run(output, manifest)
    assert refused.returncode != 0 and "2 of the 3 rows" in refused.stderr
    partial = _run(output, manifest, "--partial", "--metric", "wer")
    assert partial.returncode == 0 and "WER: 28.57 (2 errors, 7 reference words)" in partial.stdout


def test_the_best_of_n_hypotheses_and_fairseq_s_own_wer_options(tmp_path):
    from fairseq.scoring.wer import WerScorer, WerScorerConfig

    manifest = tmp_path / "test.tsv"
    references = ["Hello, world. It's fine!", "Good morning, Sir."]
    manifest.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\n" + "".join(
        f"u{i}\ta.npy\t100\t{text}\ts\n" for i, text in enumerate(references)), encoding="utf-8")
    best = ["hello world its fine", "good morning sir"]
    output = tmp_path / "generate-test.txt"
    output.write_text("".join(f"T-{i}\t{references[i]}\nD-{i}\t-0.1\t{best[i]}\nD-{i}\t-0.9\tworse {i}\n"
                              for i in range(2)), encoding="utf-8")  # --nbest 2: best first
    for options in ([], ["--wer-tokenizer", "none"], ["--wer-lowercase", "--wer-remove-punct"],
                    ["--wer-char-level", "--wer-lowercase"]):
        run = _run(output, manifest, "--metric", "wer", *options)
        assert run.returncode == 0, run.stderr
        scorer = WerScorer(WerScorerConfig(wer_tokenizer=options[1] if "--wer-tokenizer" in options else "13a",
                                           wer_lowercase="--wer-lowercase" in options,
                                           wer_remove_punct="--wer-remove-punct" in options,
                                           wer_char_level="--wer-char-level" in options))
        for reference, hypothesis in zip(references, best):
            scorer.add_string(reference, hypothesis)
        assert f"WER: {scorer.score():.2f} " in run.stdout, (options, run.stdout)


def test_several_decoded_subsets_are_numbered_in_gen_subset_order(tmp_path):
    _, first = _files(tmp_path)
    second = tmp_path / "test_st_b.tsv"
    second.write_text(first.read_text(encoding="utf-8"), encoding="utf-8")
    output = tmp_path / "generate-both.txt"
    output.write_text("".join(f"T-{i}\t{REFERENCES[i % 3]}\nD-{i}\t-0.2\t{REFERENCES[i % 3]}\n" for i in range(6)),
                      encoding="utf-8")
    one = _run(output, first)
    assert one.returncode != 0 and "for --gen-subset a,b give both" in one.stderr
    both = _run(output, first, second)
    assert both.returncode == 0 and "6 rows of" in both.stdout and "BLEU = 100.00" in both.stdout
