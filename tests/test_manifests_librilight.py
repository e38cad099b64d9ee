"""prep_librilight.py on a tiny Libri-Light tree (<subset>/<speaker>/<book>/*.flac)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_fixtures import (  # noqa: E402,F401  (fixtures)
    librilight_tree,
    load_summary,
    run_script,
    skipped_entries,
)


from slam_formats import features as audio_features  # noqa: E402
from slam_formats.manifest import read_s2t_manifest


def test_speech_manifests_with_segments_and_valid(librilight_tree, tmp_path):
    out = tmp_path / "out"
    result = run_script("prep_librilight.py", "--root", librilight_tree["root"], "--out", out,
                        "--segment-seconds", "2", "--valid-items", "1", "--workers", "2", "--shard-size", "2",
                        "--no-progress")
    train = read_s2t_manifest(out / "speech_train.tsv")
    valid = read_s2t_manifest(out / "speech_valid.tsv")
    sources = {row["id"].rsplit("_", 1)[0] for row in train + valid}
    assert sources == set(librilight_tree["good"])
    assert not {row["id"].rsplit("_", 1)[0] for row in train} & {row["id"].rsplit("_", 1)[0] for row in valid}
    for source_id, path in librilight_tree["good"].items():
        waveform = audio_features.load_mono_16k(str(path))
        rows = [row for row in train + valid if row["id"].rsplit("_", 1)[0] == source_id]
        assert [row["id"] for row in rows] == [f"{source_id}_{k:04d}" for k in range(len(rows))]
        assert all(row["tgt_text"] == "" and row["speaker"] == source_id.split("-")[0] for row in rows)
        for index, row in enumerate(rows):
            segment = waveform[index * 32000:(index + 1) * 32000]
            stored = audio_features.read_features(row["audio"], root=str(out))
            assert int(row["n_frames"]) == audio_features.num_fbank_frames(len(segment)) == stored.shape[0]
            assert np.allclose(stored, audio_features.compute_fbank(segment))
    entries = skipped_entries(out, "librilight")
    assert [(entry["reason"], os.path.basename(entry["item"])) for entry in entries] == [("silent", "04_silence.flac")]
    assert "04_silence.flac" in result.stdout
    assert load_summary(out, "librilight")["audio_items"] == len(train) + len(valid)


def test_valid_items_that_would_take_every_file_is_an_error_before_any_work(librilight_tree, tmp_path):
    out = tmp_path / "out"
    result = run_script("prep_librilight.py", "--root", librilight_tree["root"], "--out", out,
                        "--valid-items", "50", "--no-progress", check=False)
    assert result.returncode != 0
    assert "--valid-items 50 would move all" in result.stderr + result.stdout
    assert "leaving nothing to train on" in result.stderr + result.stdout
    assert not (out / "fbank").exists() or not any((out / "fbank").iterdir())
    negative = run_script("prep_librilight.py", "--root", librilight_tree["root"], "--out", out,
                          "--valid-items", "-3", "--no-progress", check=False)
    assert negative.returncode != 0 and "--valid-items -3: expected a count" in negative.stderr + negative.stdout
