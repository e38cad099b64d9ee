"""prep_text.py: LM-corpus text + mC4-style json.gz -> SentencePiece, dictionary, mmap indexed dataset."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_fixtures import load_summary, run_script, skipped_entries, text_tree  # noqa: E402,F401


@pytest.fixture(scope="module")
def prepared(text_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_out")
    pair = out / "pair_train.tsv"
    pair.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\nu1\tx.flac\t10\tZEBRA QUIZ JUXTAPOSED\t1\n",
                    encoding="utf-8")
    args = ["--inputs", text_tree["lm"], text_tree["mc4"], f"{text_tree['valid']}:valid", "--out", out,
            "--vocab-size", "300", "--pair-manifests", pair, "--workers", "2"]
    return out, run_script("prep_text.py", *args), args


def test_binarized_text_round_trips(text_tree, prepared):
    import sentencepiece
    from fairseq.data import Dictionary, data_utils

    out, result, _ = prepared
    processor = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm_unigram300.model"))
    dictionary = Dictionary.load(str(out / "spm_unigram300.txt"))
    assert len(dictionary) == processor.get_piece_size() == 300
    assert (dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk()) == (0, 1, 2, 3)
    assert all(dictionary.index(processor.id_to_piece(i)) == i for i in range(4, 300))
    expected_train = text_tree["lm_lines"] + [
        " ".join(line.split()) for document in text_tree["documents"] for line in document.split("\n")]
    for split, expected in (("train", expected_train),
                            ("valid", text_tree["valid"].read_text(encoding="utf-8").split("\n")[:-1])):
        dataset = data_utils.load_indexed_dataset(str(out / f"text_{split}"), dictionary)
        assert len(dataset) == len(expected)
        for index in range(len(dataset)):
            ids = dataset[index].tolist()
            assert ids[-1] == dictionary.eos()
            assert processor.decode(ids[:-1]) == expected[index]
    # the pair transcripts trained the vocabulary too: their rare letters are pieces
    assert processor.piece_to_id("Z") != processor.unk_id() and processor.piece_to_id("J") != processor.unk_id()
    config = (out / "config.yaml").read_text(encoding="utf-8")
    assert "vocab_filename: spm_unigram300.txt" in config and "sentencepiece_model: spm_unigram300.model" in config


def test_bad_lines_are_skipped_and_named(text_tree, prepared):
    out, result, _ = prepared
    reasons = {(entry["reason"], os.path.basename(entry["item"].rsplit(":", 1)[0])) for entry in
               skipped_entries(out, "text")}
    assert reasons == {("non_utf8_text", text_tree["lm"].name), ("malformed_line", text_tree["mc4"].name),
                       ("empty_text", text_tree["mc4"].name)}
    assert "non_utf8_text" in result.stdout
    summary = load_summary(out, "text")
    assert summary["text_lines"] == len(text_tree["lm_lines"]) + text_tree["num_mc4_lines"] + 4


def test_rerun_reuses_and_vocabulary_too_large_is_refused(text_tree, prepared, tmp_path):
    out, _, args = prepared
    before = (out / "text_train.bin").stat().st_mtime_ns
    run_script("prep_text.py", *args)
    assert load_summary(out, "text")["shards_reused"] == 2
    assert (out / "text_train.bin").stat().st_mtime_ns == before
    assert len(load_summary(out, "text")["skipped_by_reason"]) == 3
    # the pair manifest rewritten with the same transcripts (as prep_librispeech does at every run):
    # the vocabulary is not trained again
    pair = out / "pair_train.tsv"
    model_before = (out / "spm_unigram300.model").stat().st_mtime_ns
    pair.write_text(pair.read_text(encoding="utf-8"), encoding="utf-8")
    os.utime(pair, (1, 1))
    run_script("prep_text.py", *args)
    assert (out / "spm_unigram300.model").stat().st_mtime_ns == model_before
    assert (out / "text_train.bin").stat().st_mtime_ns == before

    # in-process (the script's main), to spare a fairseq import per run
    from manifests import core, prep_text

    small = ["--inputs", str(text_tree["valid"]), "--out", str(tmp_path / "small"), "--workers", "1"]
    with pytest.raises(core.UsageError, match=r"too large .* at most \d+ pieces here\. Pass --vocab-size"):
        prep_text.main(small + ["--vocab-size", "5000"])
    assert not (tmp_path / "small" / "spm_unigram5000.model").exists()
    prep_text.main(small + ["--vocab-size", "5000", "--allow-smaller-vocab"])
    assert (tmp_path / "small" / "text_train.idx").is_file()


def test_a_run_stopped_inside_a_split_goes_on_from_the_input_file_it_stopped_in(text_tree, tmp_path, monkeypatch):
    """A split of several input files (mC4's thousands) is binarized file by file: a run stopped at
    the second file binarizes only that one when run again, and writes the files of a run that was
    never stopped."""
    from pathlib import Path

    from manifests import prep_text, vocabulary

    def arguments(out):
        return ["--inputs", str(text_tree["lm"]), str(text_tree["mc4"]), "--out", str(out), "--vocab-size", "300",
                "--workers", "1"]

    prep_text.main(arguments(tmp_path / "straight"))
    original, calls = vocabulary.binarize_lines, []

    def binarize(lines, spm_path, prefix, *args, **kwargs):
        calls.append(Path(prefix).name)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(lines, spm_path, prefix, *args, **kwargs)

    monkeypatch.setattr(vocabulary, "binarize_lines", binarize)
    out = tmp_path / "out"
    stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        prep_text.main(arguments(out))
    assert calls == [".text_train.part00000", ".text_train.part00001"] and not (out / "text_train.idx").exists()
    calls.clear()
    stop_at = None
    prep_text.main(arguments(out))
    assert calls == [".text_train.part00001"]
    for suffix in ("bin", "idx"):
        assert (out / f"text_train.{suffix}").read_bytes() == (tmp_path / "straight" / f"text_train.{suffix}").read_bytes()
    assert not list(out.glob(".text_train.part*"))
    assert load_summary(out, "text")["skipped_by_reason"] == load_summary(tmp_path / "straight", "text")["skipped_by_reason"]
