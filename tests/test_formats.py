"""slam_formats and the manifest scripts work without torch and fairseq; fairseq reads what they write."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_fixtures import REPO_ROOT, librispeech_tree, text_tree  # noqa: E402,F401

from slam_formats.indexed_text import MMapTokenWriter, token_dtype  # noqa: E402

# Installed as sitecustomize: importing torch or fairseq (or any submodule) raises ImportError.
BLOCK_TORCH_AND_FAIRSEQ = textwrap.dedent("""
    import importlib.abc
    import sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "fairseq", "fairseq_cli", "torchaudio"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Blocked())
""")


@pytest.mark.parametrize("vocab_size", [300, 70000])
def test_mmap_token_writer_is_read_back_by_fairseq(tmp_path, vocab_size):
    from fairseq.data import Dictionary, data_utils

    rng = np.random.default_rng(vocab_size)
    sequences = [rng.integers(0, vocab_size, size=int(length)).tolist() for length in rng.integers(1, 30, 25)]
    writer = MMapTokenWriter(str(tmp_path / "text.bin"), vocab_size)
    for ids in sequences:
        writer.add(ids)
    writer.finalize(str(tmp_path / "text.idx"))
    dictionary = Dictionary()
    for index in range(vocab_size - len(dictionary)):
        dictionary.add_symbol(f"w{index}")
    dataset = data_utils.load_indexed_dataset(str(tmp_path / "text"), dictionary)
    assert [dataset[i].tolist() for i in range(len(dataset))] == sequences
    assert token_dtype(vocab_size) == (np.uint16 if vocab_size < 65500 else np.uint32)
    with pytest.raises(ValueError, match="outside the dictionary"):
        MMapTokenWriter(str(tmp_path / "bad.bin"), 10).add([3, 10])


def test_concatenated_indexed_datasets_are_read_back_by_fairseq_in_order(tmp_path):
    from fairseq.data import Dictionary, data_utils

    from slam_formats.indexed_text import concatenate_indexed

    rng = np.random.default_rng(5)
    parts, expected = [], []
    for index, count in enumerate([4, 0, 7]):  # an input file with no text gives an empty part
        sequences = [rng.integers(0, 300, size=int(length)).tolist() for length in rng.integers(1, 20, count)]
        writer = MMapTokenWriter(str(tmp_path / f"part{index}.bin"), 300)
        for ids in sequences:
            writer.add(ids)
        writer.finalize(str(tmp_path / f"part{index}.idx"))
        parts.append(str(tmp_path / f"part{index}"))
        expected.extend(sequences)
    assert concatenate_indexed(parts, str(tmp_path / "text")) == 11
    dictionary = Dictionary()
    for index in range(300 - len(dictionary)):
        dictionary.add_symbol(f"w{index}")
    dataset = data_utils.load_indexed_dataset(str(tmp_path / "text"), dictionary)
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert not list(tmp_path.glob(".tmp-*"))
    wide = MMapTokenWriter(str(tmp_path / "wide.bin"), 70000)
    wide.add([1])
    wide.finalize(str(tmp_path / "wide.idx"))
    with pytest.raises(ValueError, match="parts of different token types"):
        concatenate_indexed(parts + [str(tmp_path / "wide")], str(tmp_path / "mixed"))


def _blocked_env(tmp_path: Path) -> dict:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCK_TORCH_AND_FAIRSEQ)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO_ROOT)]))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr  # the blocker works
    return env


def test_prep_scripts_run_where_torch_and_fairseq_cannot_be_imported(tmp_path, text_tree, librispeech_tree):
    env = _blocked_env(tmp_path)
    text_out, speech_out = tmp_path / "text_out", tmp_path / "speech_out"
    for script, args in (
            ("prep_text.py", ["--inputs", text_tree["lm"], "--out", text_out, "--vocab-size", "200",
                              "--workers", "1"]),
            ("prep_librispeech.py", ["--root", librispeech_tree["root"], "--out", speech_out, "--workers", "1",
                                     "--vocab-size", "40"])):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "manifests" / script), *map(str, args)],
                                env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
        assert result.returncode == 0, f"{script}:\n{result.stdout}\n{result.stderr}"
    # fairseq (importable here) reads the results
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(text_out / "spm_unigram200.txt"))
    dataset = data_utils.load_indexed_dataset(str(text_out / "text_train"), dictionary)
    assert len(dataset) == len(text_tree["lm_lines"]) and dataset[0].tolist()[-1] == dictionary.eos()
    from fairseq.data.audio.audio_utils import get_features_or_waveform

    from slam_formats.manifest import read_s2t_manifest

    rows = read_s2t_manifest(speech_out / "pair_train.tsv")
    expected = sorted(u for u, info in librispeech_tree["good"].items() if info["split"] == "train-clean-100")
    assert [row["id"] for row in rows] == expected
    first = get_features_or_waveform(str(speech_out / rows[0]["audio"]))
    assert first.shape == (int(rows[0]["n_frames"]), 80)


def test_console_commands_are_installed():
    for command in ("slam-prep-librispeech", "slam-prep-librilight", "slam-prep-text", "slam-prep-covost2",
                    "slam-merge-manifests"):
        path = shutil.which(command)
        assert path is not None, f"{command} is not on PATH: run scripts/install.sh (pip install -e .)"
        result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_a_manifest_saved_with_a_byte_order_mark_is_read(tmp_path):
    from slam_formats.manifest import read_s2t_manifest

    path = tmp_path / "speech_train.tsv"
    path.write_text("\ufeffid\taudio\tn_frames\nu1\tx.npy\t12\n", encoding="utf-8")
    assert read_s2t_manifest(path) == [{"id": "u1", "audio": "x.npy", "n_frames": "12"}]
