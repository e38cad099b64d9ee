"""prep_covost2.py on Common Voice-style clips (48 kHz mp3) + CoVoST TSVs; trains with fairseq's own task."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_fixtures import (  # noqa: E402,F401  (fixtures)
    covost_tree,
    load_summary,
    run_script,
    skipped_entries,
)


from slam_formats import features as audio_features  # noqa: E402
from slam_formats.manifest import read_s2t_manifest


@pytest.fixture(scope="module")
def spanish(covost_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("covost_es_out")
    result = run_script("prep_covost2.py", "--root", covost_tree["es"], "--out", out, "--vocab-size", "40",
                        "--workers", "2", "--shard-size", "3", "--no-progress")
    return out, result


def test_st_manifests_and_stored_features(covost_tree, spanish):
    from fairseq.data.audio.audio_utils import get_features_or_waveform

    out, result = spanish
    good = covost_tree["good"]
    for split in ("train", "dev", "test"):
        rows = read_s2t_manifest(out / f"{split}_st_es_en.tsv")
        assert [row["id"] for row in rows] == sorted(c for c, info in good.items() if info["split"] == split)
        for row in rows:
            info = good[row["id"]]
            assert (row["tgt_text"], row["src_text"], row["src_lang"], row["tgt_lang"]) == (
                info["translation"], info["sentence"], "es", "en")
            clip = covost_tree["es"] / "clips" / f"{row['id']}.mp3"
            expected = audio_features.compute_fbank(audio_features.load_mono_16k(str(clip)))
            stored = get_features_or_waveform(f"{out}/{row['audio']}")
            assert int(row["n_frames"]) == stored.shape[0] == expected.shape[0]
            assert np.allclose(stored, expected)
    entries = skipped_entries(out, "covost2")
    for name, reason in covost_tree["bad"].items():
        assert any(entry["reason"] == reason and name in entry["item"] for entry in entries), (name, entries)
    assert len(entries) == 2 and "missing_clip" in result.stdout and "empty_translation" in result.stdout
    config = (out / "config_st_es_en.yaml").read_text(encoding="utf-8")
    assert "vocab_filename: spm_unigram40_st_es_en.txt" in config and "prepend_tgt_lang_tag" not in config


def test_fairseq_speech_to_text_trains_on_it(spanish, tmp_path):
    out, _ = spanish
    env = {key: value for key, value in os.environ.items() if key != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    console_script = Path(sys.executable).parent / "fairseq-train"  # the CLI users run
    launcher = [str(console_script)] if console_script.is_file() else [sys.executable, "-m", "fairseq_cli.train"]
    command = [
        *launcher, str(out), "--task", "speech_to_text",
        "--config-yaml", "config_st_es_en.yaml", "--train-subset", "train_st_es_en", "--valid-subset", "dev_st_es_en",
        "--arch", "s2t_transformer_s", "--encoder-layers", "1", "--decoder-layers", "1",
        "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
        "--conv-channels", "32", "--max-update", "2", "--max-tokens", "4000", "--optimizer", "adam", "--lr", "1e-3",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--required-batch-size-multiple", "1", "--num-workers", "0", "--no-save", "--cpu",
        "--log-format", "simple", "--log-interval", "1", "--no-progress-bar"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "num_updates=2" in log or "num_updates 2" in log
    assert "done training" in log


def test_multilingual_on_the_fly_with_language_tags(covost_tree, tmp_path):
    from fairseq.data import Dictionary
    from fairseq.tasks.speech_to_text import SpeechToTextTask
    from slam_fairseq.compat.fbank import install_fbank_backend

    install_fbank_backend()
    out = tmp_path / "out"
    run_script("prep_covost2.py", "--root", covost_tree["en"], "--out", out, "--vocab-size", "50",
               "--on-the-fly", "--workers", "1", "--no-progress")
    dictionary = Dictionary.load(str(out / "spm_unigram50_st.txt"))
    assert dictionary.index("<lang:de>") != dictionary.unk() and dictionary.index("<lang:ca>") != dictionary.unk()
    for task in ("st", "st_en_de", "st_en_ca"):
        config = (out / f"config_{task}.yaml").read_text(encoding="utf-8")
        assert "prepend_tgt_lang_tag: true" in config and "vocab_filename: spm_unigram50_st.txt" in config
    assert not (out / "test_st_en_de.tsv").exists()  # no test rows: not written, said in the summary
    assert "test_st_en_de.tsv" in load_summary(out, "covost2")["not_written"]

    parser = argparse.ArgumentParser()
    SpeechToTextTask.add_args(parser)
    args = parser.parse_args([str(out), "--config-yaml", "config_st.yaml"])
    args.seed = 1
    task = SpeechToTextTask.setup_task(args)
    for language in ("de", "ca"):
        rows = read_s2t_manifest(out / f"train_st_en_{language}.tsv")
        assert {row["tgt_lang"] for row in rows} == {language} and {row["src_lang"] for row in rows} == {"en"}
        assert all(row["tgt_text"] == f"{language} {row['src_text']}" for row in rows)  # src_text: validated.tsv
        assert [row["speaker"] for row in rows] == [f"client{index}" for index in range(len(rows))]
        assert all(row["audio"].split(":")[0].endswith(".zip") for row in rows)  # 16 kHz FLAC copies
        task.load_dataset(f"train_st_en_{language}")
        dataset = task.datasets[f"train_st_en_{language}"]
        item = dataset[0]
        assert task.tgt_dict[item.target[0]] == f"<lang:{language}>"
        assert item.source.shape == (int(rows[0]["n_frames"]), 80)


def test_pairs_without_a_source_sentence_are_skipped_and_counted(covost_tree, tmp_path):
    """No sentence column and no validated.tsv: the ST manifests are written, but no pair row with
    an empty transcript; each is counted as missing_transcript and named."""
    import shutil

    english = tmp_path / "en"
    shutil.copytree(covost_tree["en"], english)
    (english / "validated.tsv").unlink()
    out = tmp_path / "out"
    run_script("prep_covost2.py", "--root", english, "--out", out, "--vocab-size", "50", "--pairs", "en_de",
               "--outputs", "st", "pair", "--on-the-fly", "--workers", "1", "--no-progress")
    summary = load_summary(out, "covost2")
    assert "pair_train_en.tsv" in summary["not_written"] and not (out / "pair_train_en.tsv").exists()
    assert summary["skipped_by_reason"]["missing_transcript"] == 6  # 4 train + 2 dev clips
    assert len(read_s2t_manifest(out / "train_st_en_de.tsv")) == 4


def test_every_source_language_gets_its_pair_file_whatever_its_targets(covost_tree, tmp_path):
    """X->En beside En->X: Spanish has only English as a target, English only German and Catalan;
    each source language writes one pair file (from the first of its own targets)."""
    out = tmp_path / "out"
    run_script("prep_covost2.py", "--root", covost_tree["es"], covost_tree["en"], "--out", out,
               "--vocab-size", "60", "--allow-smaller-vocab", "--pairs", "es_en", "en_de", "en_ca",
               "--outputs", "st", "pair", "--on-the-fly", "--workers", "1", "--no-progress")
    spanish = read_s2t_manifest(out / "pair_train_es.tsv")
    english = read_s2t_manifest(out / "pair_train_en.tsv")
    assert spanish and english
    assert all(row["src_lang"] == "es" and row["tgt_text"] == row["src_text"] for row in spanish)
    assert all(row["src_lang"] == "en" and row["tgt_lang"] == "en" for row in english)  # the transcripts' language
    assert all(row["tgt_lang"] == "es" for row in spanish)


def test_the_split_files_of_covost_s_scripts_and_their_escapes_are_read(covost_tree, tmp_path):
    """covost_v2.<src>_<tgt>.<split>.tsv (CoVoST's get_covost_splits.py: no split column) and its
    escaping (a backslash takes the next character: \\" is a quote, an escaped tab stays in the field)."""
    import shutil

    from manifests.prep_covost2 import split_fields

    assert split_fields('a.mp3\tHe said \\"no\\"\tx\\\ty\t\\\\') == ["a.mp3", 'He said "no"', "x\ty", "\\"]
    spanish = tmp_path / "es"
    shutil.copytree(covost_tree["es"], spanish)
    combined = (spanish / "covost_v2.es_en.tsv").read_text(encoding="utf-8").splitlines()
    (spanish / "covost_v2.es_en.tsv").unlink()
    header = combined[0].split("\t")
    split_at = header.index("split")
    by_split = {}
    for line in combined[1:]:
        fields = line.split("\t")
        split = fields.pop(split_at)
        if split == "train" and not by_split.get("train"):
            fields[header.index("translation") - (split_at < header.index("translation"))] += ' \\"quoted\\"'
        by_split.setdefault(split, []).append("\t".join(fields))
    columns = "\t".join(name for name in header if name != "split")
    for split, lines in by_split.items():
        (spanish / f"covost_v2.es_en.{split}.tsv").write_text("\n".join([columns] + lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    run_script("prep_covost2.py", "--root", spanish, "--out", out, "--vocab-size", "60", "--allow-smaller-vocab",
               "--outputs", "st", "--on-the-fly", "--workers", "1", "--no-progress")
    train = read_s2t_manifest(out / "train_st_es_en.tsv")
    assert len(train) == 5 and len(read_s2t_manifest(out / "dev_st_es_en.tsv")) == 2
    assert sum(row["tgt_text"].endswith(' "quoted"') for row in train) == 1 and "\\" not in "".join(row["tgt_text"] for row in train)


def test_a_clip_missing_from_every_pair_of_its_language_is_skipped_once(covost_tree, tmp_path):
    """The En->De and En->Ca TSVs both name a clip that is not there: one missing_clip, not one per pair."""
    import shutil

    english = tmp_path / "en"
    shutil.copytree(covost_tree["en"], english)
    for language in ("de", "ca"):
        tsv = english / f"covost_v2.en_{language}.tsv"
        tsv.write_text(tsv.read_text(encoding="utf-8") + f"common_voice_en_gone.mp3\t{language} gone\ttrain\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    run_script("prep_covost2.py", "--root", english, "--out", out, "--vocab-size", "50", "--pairs", "en_de",
               "en_ca", "--outputs", "st", "--on-the-fly", "--workers", "1", "--no-progress")
    entries = [entry for entry in skipped_entries(out, "covost2") if entry["reason"] == "missing_clip"]
    assert len(entries) == 1 and entries[0]["item"].endswith("common_voice_en_gone.mp3"), entries
    assert "covost_v2.en_" in entries[0]["detail"]  # the first TSV that named it
    assert load_summary(out, "covost2")["skipped_by_reason"]["missing_clip"] == 1


def test_a_run_of_other_pairs_does_not_replace_the_shared_vocabulary_of_an_earlier_run(tmp_path):
    import pytest

    from manifests import core, data_config
    from manifests.prep_covost2 import refuse_replacing_a_vocabulary_in_use

    shared = data_config.vocabulary_config("spm_unigram50_st.model", "spm_unigram50_st.txt", True)
    for pair in ("en_de", "en_ca"):
        data_config.write_config(tmp_path / f"config_st_{pair}.yaml", shared)
    refuse_replacing_a_vocabulary_in_use(tmp_path, [("en", "de"), ("en", "ca")], 50)  # the same pairs again
    refuse_replacing_a_vocabulary_in_use(tmp_path, [("en", "ja")], 50)  # one pair: a vocabulary of its own
    refuse_replacing_a_vocabulary_in_use(tmp_path, [("en", "de"), ("en", "ja")], 60)  # another size, another file
    with pytest.raises(core.UsageError, match=r"spm_unigram50_st\.model is the shared vocabulary of "
                                              r"config_st_en_ca\.yaml .* pairs en_de en_ja would train again"):
        refuse_replacing_a_vocabulary_in_use(tmp_path, [("en", "de"), ("en", "ja")], 50)


def test_common_voice_metadata_is_read_once_per_version_of_validated_tsv(tmp_path):
    from manifests.prep_covost2 import read_common_voice_metadata

    validated = tmp_path / "validated.tsv"
    validated.write_text("client_id\tpath\tsentence\nc1\ta.mp3\tHe said \\\"hi\\\"\n", encoding="utf-8")
    first = read_common_voice_metadata(tmp_path)
    assert first == {"a.mp3": ('He said "hi"', "c1")}
    assert read_common_voice_metadata(tmp_path) is first  # the pairs of one language share one read
    validated.write_text("client_id\tpath\tsentence\nc2\tb.mp3\tanother one\n", encoding="utf-8")
    assert read_common_voice_metadata(tmp_path) == {"b.mp3": ("another one", "c2")}
    assert read_common_voice_metadata(tmp_path / "nowhere") == {}
