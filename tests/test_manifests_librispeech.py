"""prep_librispeech.py on a tiny LibriSpeech tree (real flac layout, espeak-ng speech, bad files)."""
import io
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_fixtures import (  # noqa: E402,F401  (fixtures)
    librispeech_tree,
    load_summary,
    run_script,
    skipped_entries,
)


from slam_formats import features as audio_features  # noqa: E402
from slam_formats.manifest import read_s2t_manifest


def _expected_features(path: str) -> np.ndarray:
    return audio_features.compute_fbank(audio_features.load_mono_16k(path))


def _source_of(tree, utterance_id: str) -> str:
    return str(next(tree["root"].rglob(f"{utterance_id}.flac")))


@pytest.fixture(scope="module")
def prepared(librispeech_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("librispeech_out")
    result = run_script("prep_librispeech.py", "--root", librispeech_tree["root"], "--out", out,
                        "--vocab-size", "40", "--workers", "2", "--shard-size", "3", "--cmvn", "global",
                        "--no-progress")
    return out, result


def test_manifests_rows_and_stored_features(librispeech_tree, prepared):
    from fairseq.data.audio.audio_utils import get_features_or_waveform

    out, _ = prepared
    good = librispeech_tree["good"]
    for split, directory in (("train", "train-clean-100"), ("dev", "dev-clean"), ("test", "test-clean")):
        pair_rows = read_s2t_manifest(out / f"pair_{split}.tsv")
        asr_rows = read_s2t_manifest(out / f"{split}_asr.tsv")
        expected_ids = sorted(u for u, info in good.items() if info["split"] == directory)
        assert [row["id"] for row in pair_rows] == expected_ids
        assert [row["id"] for row in asr_rows] == expected_ids
        for pair_row, asr_row in zip(pair_rows, asr_rows):
            assert pair_row["tgt_text"] == good[pair_row["id"]]["text"]
            assert asr_row["tgt_text"] == pair_row["tgt_text"].lower()
            assert pair_row["speaker"] == pair_row["id"].split("-")[0]
            source = _source_of(librispeech_tree, pair_row["id"])
            num_samples = len(audio_features.load_mono_16k(source))
            stored_zip, offset, length = pair_row["audio"].rsplit(":", 2)
            assert stored_zip.startswith("fbank/") and stored_zip.endswith(".zip")
            with open(out / stored_zip, "rb") as handle:
                handle.seek(int(offset))
                stored = np.load(io.BytesIO(handle.read(int(length))))
            assert int(pair_row["n_frames"]) == audio_features.num_fbank_frames(num_samples) == stored.shape[0]
            assert stored.shape[1] == 80 and stored.dtype == np.float32
            assert np.allclose(stored, _expected_features(source))
            from_fairseq = get_features_or_waveform(f"{out}/{pair_row['audio']}")
            assert np.array_equal(from_fairseq, stored)
            assert np.array_equal(audio_features.read_features(pair_row["audio"], root=str(out)), stored)


def test_bad_inputs_are_skipped_and_named(librispeech_tree, prepared):
    out, result = prepared
    entries = skipped_entries(out, "librispeech")
    for name, reason in librispeech_tree["bad"].items():
        assert any(entry["reason"] == reason and (name in entry["item"] or name in entry["detail"])
                   for entry in entries), (name, reason, entries)
        assert reason in result.stdout
    summary = load_summary(out, "librispeech")
    assert summary["skipped"] == len(entries) == len(librispeech_tree["bad"])
    assert summary["audio_items"] == len(librispeech_tree["good"])
    assert summary["audio_hours"] > 0 and summary["seconds_taken"] >= 0
    resampled = [note["item"] for note in summary["notes"] if note["kind"] == "resampled"]
    assert resampled == [_source_of(librispeech_tree, "19-198-0001")]
    assert "resampled" in result.stdout and "19-198-0001.flac" in result.stdout


def test_vocabulary_config_and_cmvn(prepared):
    import sentencepiece
    from fairseq.data import Dictionary
    from fairseq.data.audio.data_cfg import S2TDataConfig

    out, _ = prepared
    config = S2TDataConfig(out / "config_asr.yaml")
    assert config.input_feat_per_channel == 80
    assert config.vocab_filename == "spm_unigram40_asr.txt"
    assert config.bpe_tokenizer["sentencepiece_model"] == str(out / "spm_unigram40_asr.model")
    assert config.config["specaugment"]["freq_mask_F"] == 27 and config.config["specaugment"]["time_mask_T"] == 100
    assert config.config["transforms"]["_train"] == ["global_cmvn", "specaugment"]
    stats = np.load(config.global_cmvn_stats_npz)
    assert stats["mean"].shape == stats["std"].shape == (80,) and (stats["std"] > 0).all()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm_unigram40_asr.model"))
    dictionary = Dictionary.load(str(out / "spm_unigram40_asr.txt"))
    assert len(dictionary) == processor.get_piece_size() == 40
    assert all(dictionary.index(processor.id_to_piece(i)) == i for i in range(4, 40))
    for row in read_s2t_manifest(out / "train_asr.tsv"):
        assert processor.decode(processor.encode(row["tgt_text"])) == row["tgt_text"]
    slam_config = S2TDataConfig(out / "config.yaml")
    assert slam_config.global_cmvn_stats_npz == str(out / "gcmvn_asr.npz")


def test_interrupted_runs_resume_without_recomputing(librispeech_tree, tmp_path):
    out = tmp_path / "out"
    common = ["--root", librispeech_tree["root"], "--out", out, "--vocab-size", "40", "--shard-size", "3",
              "--no-progress", "--outputs", "pair"]
    first = run_script("prep_librispeech.py", *common, "--workers", "1", "--max-shards", "1", check=False)
    assert first.returncode == 3 and "--max-shards" in first.stderr
    assert not list(out.glob("*.tsv")) or list(out.glob("*.tsv")) == [out / "skipped_librispeech.tsv"]
    records = sorted((out / "fbank").glob("*.json"))
    assert [record.name for record in records] == ["librispeech_train_00000.json"]
    first_zip = out / "fbank" / "librispeech_train_00000.zip"
    first_mtime = first_zip.stat().st_mtime_ns

    crashed = run_script("prep_librispeech.py", *common, "--workers", "2",
                         env={"SLAM_MANIFESTS_CRASH_AFTER_SHARDS": "1"}, check=False)
    assert crashed.returncode not in (0, 3) and "simulated crash" in crashed.stderr
    assert not (out / "pair_train.tsv").exists()
    assert not list((out / "fbank").glob(".tmp-*"))
    finished_before = len(list((out / "fbank").glob("*.json")))
    assert finished_before >= 2

    final = run_script("prep_librispeech.py", *common, "--workers", "2")
    summary = load_summary(out, "librispeech")
    total = len(list((out / "fbank").glob("*.json")))
    assert summary["shards_reused"] == finished_before
    assert summary["shards_computed"] == total - finished_before
    assert first_zip.stat().st_mtime_ns == first_mtime
    rows = read_s2t_manifest(out / "pair_train.tsv")
    assert [row["id"] for row in rows] == sorted(
        u for u, info in librispeech_tree["good"].items() if info["split"] == "train-clean-100")
    assert "complete" in final.stdout


def test_on_the_fly_manifests_read_by_fairseq(librispeech_tree, tmp_path):
    from fairseq.data.audio.audio_utils import get_features_or_waveform
    from slam_fairseq.compat.fbank import install_fbank_backend

    from manifests import prep_librispeech

    install_fbank_backend()
    out = tmp_path / "out"
    prep_librispeech.main(["--root", str(librispeech_tree["root"]), "--out", str(out), "--outputs", "pair",
                           "--splits", "train-clean-100:train", "--on-the-fly", "--workers", "1", "--no-progress"])
    rows = read_s2t_manifest(out / "pair_train.tsv")
    assert len(rows) == sum(1 for info in librispeech_tree["good"].values() if info["split"] == "train-clean-100")
    for row in rows:
        source = _source_of(librispeech_tree, row["id"])
        if librispeech_tree["good"][row["id"]]["rate"] == 16000:
            assert row["audio"] == os.path.abspath(source)  # the flac itself
            expected = _expected_features(source)
        else:  # 22.05 kHz: a 16 kHz FLAC copy in the shard zip
            assert row["audio"].startswith("fbank/") and row["audio"].count(":") == 2
            expected = audio_features.read_features(row["audio"], root=str(out))
            # the same speech, quantised to 16 bits: close where there is energy
            assert np.mean(np.abs(expected - _expected_features(source))) < 0.1
        path = row["audio"] if os.path.isabs(row["audio"]) else f"{out}/{row['audio']}"
        from_fairseq = get_features_or_waveform(path)
        assert int(row["n_frames"]) == from_fairseq.shape[0] == expected.shape[0]
        assert np.allclose(from_fairseq, expected, atol=1e-4)


def test_band_limited_features_and_specaugment_policy(librispeech_tree, tmp_path):
    """``--mel-high-freq 4000`` stores the band-limited filterbank of every utterance (read back
    through fairseq), ``--specaugment sm`` writes fairseq's SM policy; on-the-fly features refuse the
    option (their readers compute the full band) and a bad edge is named."""
    from fairseq.data.audio.audio_utils import get_features_or_waveform
    from fairseq.data.audio.data_cfg import S2TDataConfig

    out = tmp_path / "out"
    run_script("prep_librispeech.py", "--root", librispeech_tree["root"], "--out", out, "--vocab-size", "40",
               "--splits", "train-clean-100:train", "--workers", "1", "--no-progress",
               "--mel-high-freq", "4000", "--specaugment", "sm")
    rows = read_s2t_manifest(out / "train_asr.tsv")
    assert rows
    for row in rows:
        expected = audio_features.compute_fbank(audio_features.load_mono_16k(_source_of(librispeech_tree, row["id"])),
                                                high_freq=4000)
        stored = get_features_or_waveform(f"{out}/{row['audio']}")
        assert np.array_equal(stored, expected)
        assert not np.allclose(stored, _expected_features(_source_of(librispeech_tree, row["id"])), atol=0.1)
    config = S2TDataConfig(out / "config_asr.yaml")
    assert config.config["specaugment"] == {"time_wrap_W": 0, "freq_mask_N": 2, "freq_mask_F": 15,
                                            "time_mask_N": 2, "time_mask_T": 70, "time_mask_p": 0.2}
    run_script("prep_librispeech.py", "--root", librispeech_tree["root"], "--out", tmp_path / "none",
               "--vocab-size", "40", "--splits", "train-clean-100:train", "--workers", "1", "--no-progress",
               "--specaugment", "none")
    plain = S2TDataConfig(tmp_path / "none" / "config_asr.yaml")
    assert "specaugment" not in plain.config and plain.config["transforms"] == {"*": ["utterance_cmvn"]}
    refused = run_script("prep_librispeech.py", "--root", librispeech_tree["root"], "--out", tmp_path / "fly",
                         "--outputs", "pair", "--on-the-fly", "--mel-high-freq", "4000", "--no-progress", check=False)
    assert refused.returncode != 0 and "--mel-high-freq needs stored features" in refused.stderr
    bad = run_script("prep_librispeech.py", "--root", librispeech_tree["root"], "--out", tmp_path / "bad",
                     "--outputs", "pair", "--mel-high-freq", "12000", "--no-progress", check=False)
    assert bad.returncode != 0 and "--mel-high-freq" in bad.stderr and "12000" in bad.stderr
