"""merge_manifests: rows of every input, audio paths re-rooted so they still point at the data."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from slam_formats.features import read_features
from slam_formats.manifest import read_s2t_manifest, write_s2t_manifest

REPO = Path(__file__).resolve().parents[1]


def _corpus(directory: Path, prefix: str, count: int):
    directory.mkdir(parents=True)
    rows = []
    for index in range(count):
        array = np.full((10 + index, 80), float(index), dtype=np.float32)
        np.save(directory / f"{prefix}{index}.npy", array)
        rows.append({"id": f"{prefix}{index}", "audio": f"{prefix}{index}.npy", "n_frames": 10 + index,
                     "tgt_text": f"text {prefix} {index}", "speaker": prefix})
    write_s2t_manifest(str(directory / "pair_train.tsv"), rows)
    return rows


def test_merged_rows_read_the_same_features(tmp_path):
    _corpus(tmp_path / "en", "en", 3)
    _corpus(tmp_path / "es", "es", 2)
    output = tmp_path / "data" / "pair_train.tsv"
    result = subprocess.run([sys.executable, "manifests/merge_manifests.py", "--inputs",
                             str(tmp_path / "en" / "pair_train.tsv"), str(tmp_path / "es" / "pair_train.tsv"),
                             "--out", str(output)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = read_s2t_manifest(str(output))
    assert [row["id"] for row in rows] == ["en0", "en1", "en2", "es0", "es1"]
    for row in rows:
        features = read_features(row["audio"], root=str(output.parent))
        assert features.shape == (int(row["n_frames"]), 80)
        assert features[0, 0] == float(row["id"][-1])


def test_duplicate_ids_are_refused_naming_both_files(tmp_path):
    _corpus(tmp_path / "a", "x", 1)
    _corpus(tmp_path / "b", "x", 1)
    result = subprocess.run([sys.executable, "manifests/merge_manifests.py", "--inputs",
                             str(tmp_path / "a" / "pair_train.tsv"), str(tmp_path / "b" / "pair_train.tsv"),
                             "--out", str(tmp_path / "out.tsv")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "x0" in result.stderr and "a/pair_train.tsv" in result.stderr and "b/pair_train.tsv" in result.stderr
    assert not (tmp_path / "out.tsv").exists()
