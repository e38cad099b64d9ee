"""What users hand the manifest scripts off the documented path: a case-folded vocabulary that
must still cover upper-case pair transcripts, quoted glob patterns, files that start with a
byte-order mark, vocabularies too small for the text, wrong --pair-manifests, CoVoST without
source sentences, a run that rewrites feature files an older manifest points into, and ids shared
between splits. Each is either handled or refused with the file and the fix named."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from manifest_fixtures import (ENGLISH, librispeech_tree, load_summary, run_script,  # noqa: E402,F401
                               skipped_entries, synthesize)

from manifests import core  # noqa: E402


def _pair_manifest(path: Path, transcripts) -> Path:
    lines = ["id\taudio\tn_frames\ttgt_text\tspeaker"]
    lines += [f"u{i}\tfbank/x.zip:0:1\t100\t{text}\ts" for i, text in enumerate(transcripts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_lowercase_vocabulary_case_folds_upper_case_pair_transcripts(tmp_path):
    """--lowercase: LibriSpeech's pair transcripts stay upper case in pair_*.tsv and are encoded
    as they are in pre-training; the model folds case itself, so they meet the same pieces."""
    import sentencepiece

    corpus = tmp_path / "lm.txt"
    corpus.write_text("\n".join(line.lower() for line in ENGLISH * 3) + "\n", encoding="utf-8")
    pairs = _pair_manifest(tmp_path / "pair_train.tsv", [line.upper() for line in ENGLISH[:5]])
    run_script("prep_text.py", "--inputs", corpus, "--out", tmp_path / "out", "--vocab-size", "60",
               "--allow-smaller-vocab", "--lowercase", "--pair-manifests", pairs, "--workers", "1")
    model = sentencepiece.SentencePieceProcessor(model_file=str(next((tmp_path / "out").glob("spm_*.model"))))
    upper, lower = ENGLISH[0].upper(), ENGLISH[0].lower()
    assert model.encode(upper) == model.encode(lower)
    assert model.unk_id() not in model.encode(upper)


def test_a_quoted_glob_pattern_is_expanded_and_one_matching_nothing_is_named(tmp_path):
    for index in range(2):
        (tmp_path / f"part{index}.txt").write_text("\n".join(ENGLISH[index::2] * 3) + "\n", encoding="utf-8")
    result = run_script("prep_text.py", "--inputs", f"{tmp_path}/part*.txt", "--out", tmp_path / "out",
                        "--vocab-size", "40", "--allow-smaller-vocab", "--workers", "1")
    assert "text_train: " in result.stderr
    assert f"part*.txt: no such file, read as a pattern: 2 file(s) for split train: {tmp_path}/part0.txt, " \
           f"{tmp_path}/part1.txt" in result.stderr
    assert load_summary(tmp_path / "out", "text")["text_lines"] == 3 * len(ENGLISH)
    missing = run_script("prep_text.py", "--inputs", f"{tmp_path}/none*.txt", "--out", tmp_path / "out2",
                         check=False)
    assert missing.returncode == 2 and "none*.txt: the pattern matches no file" in missing.stderr


def test_too_small_a_vocabulary_and_a_wrong_pair_manifest_are_usage_errors(tmp_path):
    corpus = tmp_path / "lm.txt"
    corpus.write_text("\n".join(ENGLISH * 3) + "\n", encoding="utf-8")
    small = run_script("prep_text.py", "--inputs", corpus, "--out", tmp_path / "a", "--vocab-size", "12",
                       "--workers", "1", check=False)
    assert small.returncode == 2 and "Traceback" not in small.stderr
    assert "a vocabulary of 12 cannot hold the" in small.stderr and "Pass --vocab-size" in small.stderr
    no_text = tmp_path / "speech_train.tsv"
    no_text.write_text("id\taudio\tn_frames\nu0\tfbank/x.zip:0:1\t100\n", encoding="utf-8")
    for bad, message in ((tmp_path / "nope.tsv", "no such file"), (corpus, "not a readable manifest"),
                         (no_text, "no tgt_text column")):
        result = run_script("prep_text.py", "--inputs", corpus, "--out", tmp_path / "b", "--vocab-size", "40",
                            "--pair-manifests", bad, check=False)
        assert result.returncode == 2 and f"--pair-manifests {bad}: {message}" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    path = tmp_path / "19-198.trans.txt"
    path.write_bytes("\ufeff19-198-0000 FIRST LINE\r\n19-198-0001 SECOND\n".encode("utf-8"))
    assert list(core.read_text_lines(path)) == [(1, "19-198-0000 FIRST LINE"), (2, "19-198-0001 SECOND")]


def _small_librispeech(root: Path, split: str, speaker: str, count: int, start: int = 0) -> Path:
    chapter = root / "LibriSpeech" / split / speaker / "100"
    lines = []
    for index in range(start, start + count):
        utterance = f"{speaker}-100-{index:04d}"
        synthesize(ENGLISH[index % len(ENGLISH)], chapter / f"{utterance}.flac")
        lines.append(f"{utterance} {ENGLISH[index % len(ENGLISH)].upper()}")
    (chapter / f"{speaker}-100.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "LibriSpeech"


def test_a_run_rewriting_feature_files_names_the_older_manifests_that_point_into_them(tmp_path):
    """Two selections of a corpus mapped to the same split name share its feature files: the
    second run rewrites them, and the manifest the first wrote then points at other features."""
    root = _small_librispeech(tmp_path, "train-clean-100", "19", 3)
    _small_librispeech(tmp_path, "dev-clean", "84", 2)
    out = tmp_path / "out"
    common = ("--out", out, "--outputs", "pair", "--workers", "1", "--no-progress")
    run_script("prep_librispeech.py", "--root", root, "--splits", "train-clean-100:train", *common)
    shutil.copy(out / "pair_train.tsv", out / "pair_train_clean.tsv")  # kept aside by the user
    elsewhere = (out / "pair_train.tsv").read_text(encoding="utf-8").replace("\tfbank/", "\t../other/fbank/")
    (out / "pair_merged.tsv").write_text(elsewhere, encoding="utf-8")  # another directory's same-named shard
    again = run_script("prep_librispeech.py", "--root", root, "--splits", "dev-clean:train", *common)
    assert ("WARNING: pair_train_clean.tsv, written by an earlier run, references "
            "fbank/librispeech_train_00000.zip, which this run rewrote") in again.stdout
    assert load_summary(out, "librispeech")["stale_manifests"] == {
        "pair_train_clean.tsv": ["fbank/librispeech_train_00000.zip"]}
    same = run_script("prep_librispeech.py", "--root", root, "--splits", "dev-clean:train", *common)
    assert "WARNING" not in same.stdout, "a re-run that reuses every shard rewrites nothing"


def test_ids_in_two_splits_and_a_tree_without_transcripts_are_named(tmp_path):
    root = _small_librispeech(tmp_path, "train-clean-100", "19", 2)
    both = run_script("prep_librispeech.py", "--root", root, "--splits", "train-clean-100:train",
                      "train-clean-100:valid", "--out", tmp_path / "a", "--outputs", "pair", "--workers", "1",
                      "--no-progress")
    assert "WARNING: 2 utterance id(s) are in more than one output split, e.g. 19-100-0000 (train and valid)" \
        in both.stdout
    for transcript in root.rglob("*.trans.txt"):
        transcript.unlink()
    none = run_script("prep_librispeech.py", "--root", root, "--splits", "train-clean-100:train",
                      "--out", tmp_path / "b", "--workers", "1", "--no-progress", check=False)
    assert none.returncode == 2 and "--train-split train: no utterance with both audio and a transcript" in none.stderr
    assert "missing_transcript 2" in none.stderr and ".trans.txt" in none.stderr


def test_scripts_filling_one_data_directory_with_other_filterbanks_or_statistics_are_named(tmp_path, caplog):
    """prep_librilight --mel-high-freq 4000, then prep_librispeech without it, into one --out: one
    model would read two kinds of frames. Global CMVN statistics of one script replaced by another's
    are said so."""
    import logging

    import pytest

    from manifests import data_config

    config = tmp_path / "config.yaml"
    data_config.check_feature_settings(config, "prep_librilight", {"mel_high_freq": 4000.0})  # no config yet
    data_config.merge_speech_keys(config, tmp_path, "global", "gcmvn_speech.npz", "prep_librilight",
                                  {"mel_high_freq": 4000.0})
    assert data_config.read_config(config)["feature_settings"] == {"prep_librilight": {"mel_high_freq": 4000.0}}
    data_config.check_feature_settings(config, "prep_librilight", {"mel_high_freq": 0.0})  # the same script: redone
    data_config.check_feature_settings(config, "prep_librispeech", {"mel_high_freq": 4000.0})
    with pytest.raises(core.UsageError, match=r"config\.yaml: prep_librilight's manifests in this data directory were "
                                              r"made with other filterbank settings \(mel_high_freq 4000\.0 there, "
                                              r"0\.0 here"):
        data_config.check_feature_settings(config, "prep_librispeech", {"mel_high_freq": 0.0})
    with caplog.at_level(logging.WARNING):
        line = data_config.merge_speech_keys(config, tmp_path, "global", "gcmvn_asr.npz", "prep_librispeech",
                                             {"mel_high_freq": 4000.0})
    assert "global_cmvn gcmvn_speech.npz replaced by gcmvn_asr.npz" in line and line in caplog.text
    assert set(data_config.read_config(config)["feature_settings"]) == {"prep_librilight", "prep_librispeech"}
    assert "kept" in data_config.merge_speech_keys(config, tmp_path, "utterance", None, "prep_librispeech",
                                                   {"mel_high_freq": 4000.0})
    # settings recorded by a script that ran beside this one, after this one's check at its start:
    # checked again when this one merges its keys
    with pytest.raises(core.UsageError, match=r"prep_librilight's manifests in this data directory were made with "
                                              r"other filterbank settings"):
        data_config.merge_speech_keys(config, tmp_path, "utterance", None, "prep_librispeech", {"mel_high_freq": 0.0})
    # another script's statistics stay; the same script run again with --cmvn utterance drops its own
    assert "kept" in data_config.merge_speech_keys(config, tmp_path, "utterance", None, "prep_librilight",
                                                   {"mel_high_freq": 4000.0}, own_gcmvn_name="gcmvn_speech.npz")
    line = data_config.merge_speech_keys(config, tmp_path, "utterance", None, "prep_librispeech",
                                         {"mel_high_freq": 4000.0}, own_gcmvn_name="gcmvn_asr.npz")
    assert "earlier global_cmvn gcmvn_asr.npz removed" in line
    written = data_config.read_config(config)
    assert "global_cmvn" not in written and written["transforms"] == {"*": ["utterance_cmvn"]}
    assert set(written["feature_settings"]) == {"prep_librilight", "prep_librispeech"}


def test_scripts_merging_config_yaml_at_the_same_time_lose_no_key(tmp_path):
    """Two preparation scripts finishing together on one data directory: each reads, updates and
    rewrites config.yaml under a lock, so neither drops the other's keys."""
    import subprocess
    import sys

    config = tmp_path / "config.yaml"
    script = ("import sys; from manifests import data_config\n"
              "for index in range(40):\n"
              "    data_config.merge_config(sys.argv[1], {f'{sys.argv[2]}_{index}': index})\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    writers = [subprocess.Popen([sys.executable, "-c", script, str(config), name], cwd=repo) for name in ("a", "b")]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    from manifests import data_config

    merged = data_config.read_config(config)
    assert sorted(merged) == sorted(f"{name}_{index}" for name in ("a", "b") for index in range(40))
