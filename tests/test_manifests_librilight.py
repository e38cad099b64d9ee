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


def test_the_speaker_is_the_directory_two_levels_above_each_file_wherever_the_split_starts(tmp_path):
    from manifests.prep_librilight import list_librilight_dir

    for relative in ("small/1001/book_a/x.flac", "small/1002/book b/y.flac", "medium/2001/c/z.flac"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"0")
    from_subset = {item.id: item.fields["speaker"] for item in list_librilight_dir(tmp_path / "small")}
    assert from_subset == {"1001-book_a-x": "1001", "1002-book_b-y": "1002"}
    from_root = {item.id: item.fields["speaker"] for item in list_librilight_dir(tmp_path / ".")}
    assert from_root == {"small-1001-book_a-x": "1001", "small-1002-book_b-y": "1002", "medium-2001-c-z": "2001"}


def test_rows_longer_than_pretraining_takes_are_a_warning(librilight_tree, tmp_path, monkeypatch):
    """Whole Libri-Light files run for minutes, beyond slam_pretraining's default
    --max-source-positions: the summary says so at prep time (here with the limit lowered to fit
    the tiny files), rather than the pre-training run skipping them days later."""
    from manifests import prep_librilight

    monkeypatch.setattr(prep_librilight, "PRETRAINING_MAX_FRAMES", 100)
    summary = prep_librilight.main(["--root", str(librilight_tree["root"]), "--out", str(tmp_path / "out"),
                                    "--workers", "1", "--no-progress"])
    rows = read_s2t_manifest(tmp_path / "out" / "speech_train.tsv")
    long_rows = sum(int(row["n_frames"]) > 100 for row in rows)
    assert long_rows > 0
    assert f"{long_rows} of {len(rows)} rows are longer than 100 frames" in " ".join(summary.warnings)
    cut = prep_librilight.main(["--root", str(librilight_tree["root"]), "--out", str(tmp_path / "cut"),
                                "--segment-seconds", "0.9", "--workers", "1", "--no-progress"])
    assert not [warning for warning in cut.warnings if "longer than" in warning]
