"""An S2T data directory works after it is copied or moved: fairseq's ``speech_to_text`` task finds
the manifests' audio and the global CMVN statistics from the config's directory
(``slam_fairseq.compat.data_config_paths``), started from any working directory."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slam_fairseq  # noqa: E402,F401  (installs the compat patches)
from pretraining_fixtures import write_feature_zip  # noqa: E402
from s2t_fixtures import SENTENCES, s2t_cfg_and_task, train_spm  # noqa: E402
from slam_formats.manifest import write_s2t_manifest  # noqa: E402

MEAN, STD = np.full(80, 1.5, np.float32), np.full(80, 3.0, np.float32)


def _asr_dir(data_dir: Path, seed: int = 0, audio_root=None, cmvn: str = "gcmvn.npz") -> dict:
    """An ASR data directory as the manifest scripts lay it out (``fbank/`` zips, absolute
    ``audio_root``, global CMVN by a relative name); returns the stored features by id."""
    rng = np.random.default_rng(seed)
    features = {f"u{i}": rng.normal(size=(40 + 10 * i, 80)).astype(np.float32) for i in range(3)}
    references = write_feature_zip(data_dir / "fbank" / "asr_00000.zip", features, data_dir)
    texts = [english for english, _, _ in SENTENCES]
    write_s2t_manifest(str(data_dir / "train_asr.tsv"),
                       [{"id": key, "audio": references[key], "n_frames": len(value), "tgt_text": texts[i],
                         "speaker": "s"} for i, (key, value) in enumerate(features.items())])
    spm_model, dictionary = train_spm(texts, data_dir / "spm_unigram120_asr")
    np.savez(data_dir / cmvn, mean=MEAN, std=STD)
    config = {"input_channels": 1, "input_feat_per_channel": 80,
              "audio_root": str(data_dir.resolve()) if audio_root is None else audio_root,
              "vocab_filename": dictionary.name,
              "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": spm_model.name},
              "global_cmvn": {"stats_npz_path": cmvn}, "transforms": {"*": ["global_cmvn"]}}
    (data_dir / "config_asr.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return features


def _read_all(data_dir: Path, save_dir: Path) -> dict:
    _, task = s2t_cfg_and_task(data_dir, "asr", save_dir)
    task.load_dataset("train_asr")
    dataset = task.datasets["train_asr"]
    return {dataset.ids[i]: dataset[i].source.numpy() for i in range(len(dataset))}


@pytest.fixture
def elsewhere(tmp_path):
    """Run from a directory that is neither data directory."""
    start = tmp_path / "cwd"
    start.mkdir()
    previous = os.getcwd()
    os.chdir(start)
    yield start
    os.chdir(previous)


def test_a_moved_data_directory_reads_its_own_audio_and_statistics(tmp_path, elsewhere, caplog):
    features = _asr_dir(tmp_path / "written")
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "written"), str(moved))
    with caplog.at_level(logging.WARNING):
        read = _read_all(moved, tmp_path / "save")
    assert set(read) == set(features)
    for key, value in features.items():
        assert np.allclose(read[key], (value - MEAN) / STD, atol=1e-6), key
    assert f"audio_root is {tmp_path / 'written'}" in caplog.text and "does not exist" in caplog.text


def test_a_copied_data_directory_reads_the_copy_not_the_original(tmp_path, elsewhere, caplog):
    _asr_dir(tmp_path / "original", seed=1)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "original", copy)
    features = _asr_dir(copy, seed=2, audio_root=str((tmp_path / "original").resolve()))  # other features
    with caplog.at_level(logging.WARNING):
        read = _read_all(copy, tmp_path / "save")
    for key, value in features.items():
        assert np.allclose(read[key], (value - MEAN) / STD, atol=1e-6), key
    assert "both hold the manifest scripts' fbank/" in caplog.text and str(copy) in caplog.text


def test_features_kept_elsewhere_on_purpose_and_relative_roots(tmp_path, elsewhere, caplog):
    store = tmp_path / "store"
    features = _asr_dir(store)
    configs = tmp_path / "configs"  # a config directory without fbank/: audio_root is meant
    configs.mkdir()
    for name in ("train_asr.tsv", "config_asr.yaml", "gcmvn.npz", "spm_unigram120_asr.model",
                 "spm_unigram120_asr.txt"):
        shutil.copy(store / name, configs / name)
    with caplog.at_level(logging.WARNING):
        read = _read_all(configs, tmp_path / "save")
    assert all(np.allclose(read[k], (v - MEAN) / STD, atol=1e-6) for k, v in features.items())
    assert "audio_root" not in caplog.text
    # a relative audio_root: from the working directory where it is there (fairseq's reading), else
    # from the config's directory
    config = yaml.safe_load((store / "config_asr.yaml").read_text())
    config["audio_root"] = "fbank/.."  # there from the config's directory only
    (store / "config_asr.yaml").write_text(yaml.safe_dump(config))
    read = _read_all(store, tmp_path / "save")
    assert all(np.allclose(read[k], (v - MEAN) / STD, atol=1e-6) for k, v in features.items())
    config["audio_root"] = "../store"  # from the working directory (tmp_path/cwd): as fairseq reads it
    (store / "config_asr.yaml").write_text(yaml.safe_dump(config))
    read = _read_all(store, tmp_path / "save")
    assert all(np.allclose(read[k], (v - MEAN) / STD, atol=1e-6) for k, v in features.items())


def test_a_parent_directory_as_audio_root_and_statistics_in_the_working_directory(tmp_path, elsewhere, caplog):
    """A corpus root holding several data directories is an audio_root on purpose; a statistics
    file of the same name in the working directory is not the config's."""
    corpus = tmp_path / "corpora"
    data_dir = corpus / "en_de"
    features = _asr_dir(data_dir, audio_root=str(corpus.resolve()))
    rows = (data_dir / "train_asr.tsv").read_text().replace("fbank/", "en_de/fbank/")
    (data_dir / "train_asr.tsv").write_text(rows)  # paths relative to the corpus root
    np.savez(elsewhere / "gcmvn.npz", mean=np.full(80, 9.0, np.float32), std=np.ones(80, np.float32))
    with caplog.at_level(logging.WARNING):
        read = _read_all(data_dir, tmp_path / "save")
    assert all(np.allclose(read[k], (v - MEAN) / STD, atol=1e-6) for k, v in features.items())
    assert "audio_root" not in caplog.text


def test_audio_root_is_kept_as_written_when_asked(tmp_path, elsewhere, monkeypatch):
    _asr_dir(tmp_path / "written")
    shutil.move(str(tmp_path / "written"), str(tmp_path / "moved"))
    monkeypatch.setenv("SLAM_FAIRSEQ_KEEP_AUDIO_ROOT", "1")
    with pytest.raises(FileNotFoundError, match="written/fbank/asr_00000.zip"):
        _read_all(tmp_path / "moved", tmp_path / "save")


def test_every_utterance_of_an_evaluation_split_is_batched_whatever_the_multiple(tmp_path, elsewhere, caplog):
    """fairseq drops a last batch that is not a multiple of --required-batch-size-multiple: for
    fairseq-generate and validation a subset would be scored (slam_fairseq.compat.evaluation_batches)."""
    data_dir = tmp_path / "data"
    _asr_dir(data_dir)
    shutil.copy(data_dir / "train_asr.tsv", data_dir / "test_asr.tsv")
    _, task = s2t_cfg_and_task(data_dir, "asr", tmp_path / "save")
    for split in ("train_asr", "test_asr"):
        task.load_dataset(split)
    rows = {}
    with caplog.at_level(logging.INFO):
        for split in ("train_asr", "test_asr"):
            iterator = task.get_batch_iterator(task.dataset(split), max_tokens=60, required_batch_size_multiple=2,
                                               seed=1).next_epoch_itr(shuffle=False)
            rows[split] = sum(len(batch["id"]) for batch in iterator)
    assert rows == {"train_asr": 2, "test_asr": 3}  # training as fairseq batches it; evaluation whole
    assert "test_asr: batched with a multiple of 1" in caplog.text and "leave out the last 1" in caplog.text
    # --gen-subset a,b: fairseq concatenates the splits
    shutil.copy(data_dir / "train_asr.tsv", data_dir / "dev_asr.tsv")
    task.load_dataset("test_asr,dev_asr")
    iterator = task.get_batch_iterator(task.dataset("test_asr,dev_asr"), max_tokens=60, required_batch_size_multiple=4,
                                       seed=1).next_epoch_itr(shuffle=False)
    assert sum(len(batch["id"]) for batch in iterator) == 6
