"""Bad speech rows in pre-training (``slam_fairseq.data.pretraining.row_checks``): the cheap checks
at load, each problem by name; rows skipped mid-run and counted with the file named; the limit;
and real ``fairseq-train`` runs over manifests holding such rows (one that trains to the end, one
that stops with a clear message past ``--max-bad-rows``).
"""
from __future__ import annotations

import io
import logging
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures as fixtures  # noqa: E402

from manifests.core import stored_zip_entries  # noqa: E402

from slam_fairseq.data.pretraining.round_robin import RoundRobinBatchDataset  # noqa: E402
from slam_fairseq.data.pretraining.row_checks import (BAD_ROWS_KEY, BadRowError, BadRowLimits,  # noqa: E402
                                                      RowCheckReport, TooManyBadRowsError, check_feature_rows,
                                                      drop_bad_feature_rows, feature_row_problem, merged_reports)
from slam_fairseq.data.pretraining.feature_rows import (SpeechFeatureReader, SpeechRows,  # noqa: E402
                                                        read_speech_rows)

USER_DIR = str(fixtures.REPO_ROOT / "slam_fairseq")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _corrupt_entry(data_dir: Path, reference: str) -> None:
    """Overwrite a stored zip entry with zeros (its header gone: neither .npy nor audio)."""
    path, offset, length = reference.rsplit(":", 2)
    with open(data_dir / path, "r+b") as handle:
        handle.seek(int(offset))
        handle.write(b"\0" * int(length))


@pytest.fixture()
def feature_dir(tmp_path) -> Path:
    """A zip holding one good entry of each kind and one bad entry of each problem."""
    rng = np.random.default_rng(0)
    features = {"good": rng.normal(size=(50, 80)).astype(np.float32),
                "narrow": np.zeros((50, 40), dtype=np.float32),
                "short": np.zeros((5, 80), dtype=np.float32),
                "objects": np.array([[None] * 80] * 10, dtype=object),
                "garbage": rng.normal(size=(30, 80)).astype(np.float32)}
    with zipfile.ZipFile(tmp_path / "feats.zip", "w", zipfile.ZIP_STORED) as archive:
        for name, array in features.items():
            archive.writestr(f"{name}.npy", _npy_bytes(array) if array.dtype != object else
                             _object_npy(array))
    refs = _entry_references(tmp_path / "feats.zip", tmp_path)
    _corrupt_entry(tmp_path, refs["garbage"])
    np.save(tmp_path / "plain_narrow.npy", np.zeros((20, 40), dtype=np.float32))
    np.save(tmp_path / "plain_good.npy", np.zeros((20, 80), dtype=np.float16))
    (tmp_path / "refs.txt").write_text("\n".join(f"{k}\t{v}" for k, v in refs.items()))
    return tmp_path


def _object_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _entry_references(zip_path: Path, root: Path):
    return {name[: -len(".npy")]: f"{zip_path.relative_to(root)}:{offset}:{length}"
            for name, (offset, length) in stored_zip_entries(zip_path).items()}


def _refs(feature_dir: Path):
    return dict(line.split("\t") for line in (feature_dir / "refs.txt").read_text().splitlines())


def test_each_problem_is_found_without_reading_the_features(feature_dir):
    refs = _refs(feature_dir)
    root = str(feature_dir)
    assert feature_row_problem(refs["good"], root, 80) is None
    assert feature_row_problem("plain_good.npy", root, 80) is None  # any numeric dtype is read as float32
    assert feature_row_problem(refs["narrow"], root, 80)[0] == "wrong shape or dtype"
    assert "(50, 40)" in feature_row_problem(refs["narrow"], root, 80)[1]
    assert feature_row_problem("plain_narrow.npy", root, 80)[0] == "wrong shape or dtype"
    assert feature_row_problem(refs["short"], root, 80)[0] == "fewer than 7 frames"
    assert feature_row_problem(refs["objects"], root, 80)[0] == "wrong shape or dtype"
    kind, detail = feature_row_problem("missing.zip:100:200", root, 80)
    assert kind == "feature file missing" and "missing.zip does not exist" in detail
    path, offset, length = refs["good"].rsplit(":", 2)
    size = (feature_dir / path).stat().st_size
    assert feature_row_problem(f"{path}:{size - 10}:{length}", root, 80)[0] == "zip entry outside the file"
    assert feature_row_problem(f"{path}:{offset}:{int(length) - 64}", root, 80)[0] == "npy size differs from the entry"
    assert feature_row_problem(refs["garbage"], root, 80) is None, "no .npy header: read as audio, at read time"


def _rows(feature_dir: Path, audio, n_frames=50):
    ids = [f"r{i}" for i in range(len(audio))]
    return SpeechRows(feature_dir / "speech_train.tsv", ids, list(audio), np.broadcast_to(n_frames, len(audio)),
                      [f"text {i}" for i in range(len(audio))])


def test_each_part_of_a_row_check_reads_its_own_block_and_the_merged_parts_find_every_bad_row(feature_dir,
                                                                                                  monkeypatch):
    from slam_fairseq.data.pretraining import row_checks

    refs = _refs(feature_dir)
    audio = [refs["good"], "missing.zip:1:2", refs["narrow"], refs["good"], "gone.zip:1:2", refs["short"], refs["good"]]
    rows = _rows(feature_dir, audio)
    checked = []
    original = row_checks.feature_row_problem
    monkeypatch.setattr(row_checks, "feature_row_problem",
                        lambda field, *args: checked.append(field) or original(field, *args))
    parts = [check_feature_rows(rows, str(feature_dir), 80, part=(k, 3)) for k in range(3)]
    assert checked == audio, "each row once, in blocks of consecutive rows"
    assert [part.num_rows for part in parts] == [7, 7, 7] and [part.num_bad for part in parts] == [1, 1, 2]
    whole = check_feature_rows(rows, str(feature_dir), 80)
    assert merged_reports(parts).problems == whole.problems


def test_bad_rows_are_dropped_at_load_with_one_warning_counting_them_by_problem(feature_dir, caplog):
    refs = _refs(feature_dir)
    audio = [refs["good"], "missing.zip:1:2", refs["narrow"], refs["good"], "gone.zip:1:2", refs["short"]]
    with caplog.at_level(logging.WARNING):
        kept, report = drop_bad_feature_rows(_rows(feature_dir, audio), str(feature_dir), 80)
    assert list(kept.ids) == ["r0", "r3"] and list(kept.transcripts) == ["text 0", "text 3"]
    assert list(kept.n_frames) == [50, 50] and report.num_bad == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "speech_train.tsv: dropped 4 of 6 rows" in message
    assert "2 feature file missing, 1 wrong shape or dtype, 1 fewer than 7 frames" in message
    assert "'r1' (missing.zip:1:2: " in message and "'r2'" in message

    with pytest.raises(TooManyBadRowsError, match=r"no usable rows: .*dropped 2 of 2"):
        drop_bad_feature_rows(_rows(feature_dir, ["missing.zip:1:2", refs["narrow"]]), str(feature_dir), 80)


def test_limit_is_the_larger_of_count_and_fraction_and_counts_each_row_once():
    limits = BadRowLimits(max_bad_rows=2, max_bad_row_fraction=0.01)
    limits.register(RowCheckReport("big.tsv", 1000, {"feature file missing": [("a", "x"), ("b", "y")]}))
    assert limits.limit("big.tsv") == 10.0
    limits.register(RowCheckReport("small.tsv", 10))
    assert limits.limit("small.tsv") == 2
    assert limits.record([("small.tsv", "u", "row 'u': broken at 0x1"),
                          ("small.tsv", "u", "row 'u': broken at 0x2")]) == 1, "one row, counted once"
    limits.record([("small.tsv", "v", "row 'v': broken")])
    with pytest.raises(TooManyBadRowsError, match=r"small\.tsv: 3 bad rows \(of 10\), more than the limit 2 "
                                                  r"\(--max-bad-rows 2.*first: row 'u': broken"):
        limits.record([("small.tsv", "w", "row 'w': broken")])
    with pytest.raises(TooManyBadRowsError, match=r"tiny\.tsv: 3 bad rows"):
        BadRowLimits(2, 0.0).register(RowCheckReport("tiny.tsv", 5, {"k": [("a", ""), ("b", ""), ("c", "")]}))
    unlimited = BadRowLimits(-1, 0.0)
    unlimited.register(RowCheckReport("any.tsv", 3, {"k": [("a", ""), ("b", ""), ("c", "")]}))
    assert unlimited.record([("any.tsv", str(i), f"row {i}") for i in range(50)]) == 50


def test_a_row_failing_mid_run_is_left_out_of_its_batch_and_reported(feature_dir, tmp_path):
    from slam_fairseq.data.pretraining.frame_masks import FrameMaskingSettings
    from slam_fairseq.data.pretraining.speech import PretrainingSpeechDataset

    refs = _refs(feature_dir)
    rows = _rows(feature_dir, [refs["good"], refs["garbage"], refs["good"]])
    reader = SpeechFeatureReader(rows, str(feature_dir), lambda x: x)
    dataset = PretrainingSpeechDataset(reader, FrameMaskingSettings(0.065, 10), seed=1)
    round_robin = RoundRobinBatchDataset({"speech": dataset}, seed=1, cycle=False)
    round_robin.set_batches({"speech": [np.array([0, 1, 2]), np.array([1]), np.array([2])]})
    assert BAD_ROWS_KEY not in round_robin.collater([round_robin[(1, 2)]]), "a clean batch carries no list"
    batch = round_robin.collater([round_robin[(1, 0)]])
    assert batch["speech"]["id"].tolist() == [0, 2] and batch["speech"]["features"].shape[0] == 2
    ((manifest, row_id, message),) = batch[BAD_ROWS_KEY]
    assert manifest == str(rows.manifest) and row_id == "r1"
    assert "row 'r1'" in message and "feats.zip" in message and "unreadable audio" in message
    only_bad = round_robin.collater([round_robin[(1, 1)]])
    assert "speech" not in only_bad and len(only_bad[BAD_ROWS_KEY]) == 1


def test_an_unreadable_first_row_is_left_to_the_skips_and_a_wrong_dimension_still_ends_the_load(feature_dir):
    """The reader checks the feature dimension on the first row that reads: an unreadable row 0
    (the garbage zip entry) is skipped like any other bad row, not the end of the run."""
    refs = _refs(feature_dir)
    reader = SpeechFeatureReader(_rows(feature_dir, [refs["garbage"], refs["good"]]), str(feature_dir), lambda x: x)
    with pytest.raises(BadRowError, match="row 'r0'"):
        reader.read(0)
    assert reader.read(1).shape[1] == 80
    with pytest.raises(BadRowError, match=r"features of shape \(\d+, \d+\), expected \(frames, 80\)"):
        SpeechFeatureReader(_rows(feature_dir, [refs["garbage"], refs["narrow"], refs["good"]]), str(feature_dir),
                            lambda x: x)
    with pytest.raises(BadRowError, match=r"none of its first 2 rows can be read; first: .*row 'r0'"):
        SpeechFeatureReader(_rows(feature_dir, [refs["garbage"], refs["garbage"]]), str(feature_dir), lambda x: x)


def test_a_validation_manifest_without_usable_rows_leaves_its_modality_out(tmp_path, caplog):
    """A header-only speech_valid.tsv: validation goes on with text and pairs; the same file for
    training is an error naming it."""
    from slam_fairseq.tasks.slam_pretraining import SlamPretrainingConfig, SlamPretrainingTask
    from slam_formats.manifest import ManifestError

    data = fixtures.build_data_dir(tmp_path / "data", real_speech=False)
    header = (data / "speech_valid.tsv").read_text().splitlines()[0]
    (data / "speech_valid.tsv").write_text(header + "\n")
    task = SlamPretrainingTask.setup_task(SlamPretrainingConfig(data=str(data), seed=1, max_update=10,
                                                                train_subset="train", stage2_start_update=0))
    with caplog.at_level(logging.WARNING):
        task.load_dataset("valid")
    assert sorted(task.datasets["valid"].datasets) == ["pair", "text"]
    assert "speech_valid.tsv: empty manifest (no rows): split 'valid' is evaluated without speech data" in caplog.text
    (data / "speech_train.tsv").write_text(header + "\n")
    with pytest.raises(ManifestError, match=r"speech_train\.tsv: empty manifest"):
        task.load_dataset("train")


def test_features_with_non_finite_values_are_a_bad_row_naming_the_file(tmp_path):
    """A NaN would make every update holding the row non-finite (and skipped), without a name."""
    features = np.random.default_rng(0).normal(size=(40, 80)).astype(np.float32)
    features[12:15, 3] = np.nan
    features[20, 0] = np.inf
    np.save(tmp_path / "nan.npy", features)
    np.save(tmp_path / "fine.npy", np.nan_to_num(features, nan=0.0, posinf=0.0))
    reader = SpeechFeatureReader(_rows(tmp_path, ["nan.npy", "fine.npy"], 40), str(tmp_path), lambda x: x)
    with pytest.raises(BadRowError, match=r"speech_train\.tsv: row 'r0': nan\.npy holds 4 non-finite values "
                                          r"\(NaN or inf; first in frame 12\)"):
        reader.read(0)
    assert np.isfinite(reader.read(1)).all()


def test_audio_cut_short_or_frames_far_from_n_frames_are_a_bad_row_naming_the_file(tmp_path):
    """Batches are sized by n_frames: a file that gives far fewer or more frames (audio cut short
    or replaced, a manifest counting samples) is left out; other frame conventions are not."""
    import soundfile as sf
    from slam_formats.features import num_fbank_frames

    samples = (np.sin(np.arange(16000) * 0.05) * 0.3).astype(np.float32)
    sf.write(str(tmp_path / "whole.wav"), samples, 16000, subtype="PCM_16")
    whole = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])  # the header still declares 1 s
    sf.write(str(tmp_path / "shorter.flac"), samples[:8000], 16000)  # replaced by a shorter file
    frames = num_fbank_frames(16000)
    audio = ["whole.wav", "cut.wav", "shorter.flac", "whole.wav", "whole.wav"]
    rows = _rows(tmp_path, audio, np.array([frames, frames, frames, frames + 2, 16000]))
    reader = SpeechFeatureReader(rows, str(tmp_path), lambda x: x)
    assert reader.read(0).shape == (frames, 80)
    with pytest.raises(BadRowError, match=r"row 'r1': .*cut\.wav: truncated: its header declares 32,000 bytes"):
        reader.read(1)
    with pytest.raises(BadRowError, match=rf"row 'r2': shorter\.flac gives 48 frames where n_frames in the "
                                          rf"manifest says {frames} \(the audio was cut short or replaced"):
        reader.read(2)
    assert reader.read(3).shape == (frames, 80), "2 frames off: another frame convention, accepted"
    with pytest.raises(BadRowError, match=rf"row 'r4': whole\.wav gives {frames} frames where n_frames .* says "
                                          r"16000 .*does not count 10 ms frames"):
        reader.read(4)
    # a manifest whose n_frames counts samples is refused at load, from its first row
    with pytest.raises(BadRowError, match=rf"row 'r0': n_frames says 16000, but whole\.wav gives {frames} frames: "
                                          r"n_frames seems to count audio samples"):
        SpeechFeatureReader(_rows(tmp_path, ["whole.wav"], 16000), str(tmp_path), lambda x: x)


# -- real fairseq-train runs ------------------------------------------------------------------------------
def _bad_data_dir(root: Path) -> Path:
    """The test corpus plus, in speech_train.tsv, a row whose zip is missing, one of another
    dimension and one whose entry is garbage (met only when read); a missing zip in pair_train.tsv."""
    data_dir = fixtures.build_data_dir(root / "data", real_speech=False)
    rng = np.random.default_rng(3)
    narrow = fixtures.speech_rows(data_dir, "narrow", {"narrow": rng.normal(size=(60, 40)).astype(np.float32)})
    garbage = fixtures.speech_rows(data_dir, "garbage", {"garbage": rng.normal(size=(60, 80)).astype(np.float32)})
    _corrupt_entry(data_dir, garbage[0]["audio"])
    missing = dict(garbage[0], id="missing", audio="fbank/missing.zip:100:19328")
    for name, extra in (("speech_train.tsv", [missing, narrow[0], garbage[0]]), ("pair_train.tsv", [missing])):
        rows = read_speech_rows(data_dir / name, need_transcript=name.startswith("pair"))
        table = [{"id": i, "audio": a, "n_frames": int(n), "tgt_text": t or "x", "speaker": "spk"}
                 for i, a, n, t in zip(rows.ids, rows.audio, rows.n_frames, rows.transcripts)]
        fixtures.write_manifest(data_dir / name, table + [dict(row, tgt_text="a picture") for row in extra])
    return data_dir


def _args(data_dir: Path, save_dir: Path, *extra: str):
    return [str(data_dir), "--user-dir", USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny",
            "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8",
            "--max-sentences-speech", "3", "--max-sentences-text", "4", "--max-sentences-pair", "3",
            "--stage2-start-update", "1", "--max-update", "6", "--save-dir", str(save_dir), "--no-save",
            "--cpu", "--seed", "3", "--log-format", "json", "--log-interval", "1", "--ddp-backend", "legacy_ddp",
            *extra]


def test_cli_run_with_bad_rows_trains_to_the_end_and_a_limit_stops_it(tmp_path):
    if not fixtures.criterion_registered("slam_multitask"):
        pytest.fail("slam_multitask is not registered by the user dir")
    data_dir = _bad_data_dir(tmp_path)
    run = fixtures.run_fairseq(_args(data_dir, tmp_path / "a", "--max-bad-rows", "3"), stand_in=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert (f"{data_dir / 'speech_train.tsv'}: dropped 2 of 11 rows whose features cannot be used: "
            "1 feature file missing, 1 wrong shape or dtype") in output
    assert f"{data_dir / 'pair_train.tsv'}: dropped 1 of 7 rows" in output
    assert "skipped a bad row (3 in " in output and "row 'garbage'" in output and "garbage.zip" in output
    records = fixtures.json_log_records(output)
    assert [int(r["num_updates"]) for r in records] == list(range(1, 7)), "every update was made"
    assert int(records[-1]["bad_rows"]) == 1
    valid = fixtures.json_log_records(output, kind="valid")
    assert valid and math.isfinite(float(valid[-1]["valid_loss"])), "validation ran over the valid split too"

    stopped = fixtures.run_fairseq(_args(data_dir, tmp_path / "b", "--max-bad-rows", "2"), stand_in=False)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0
    assert "TooManyBadRowsError" in output
    assert (f"{data_dir / 'speech_train.tsv'}: 3 bad rows (of 11), more than the limit 2 (--max-bad-rows 2, "
            "--max-bad-row-fraction 0.001)") in output and "row 'garbage'" in output
