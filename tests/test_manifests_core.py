"""manifests/core.py, manifests/vocabulary.py and the fairseq audio shim, in-process."""
import io
import os
import sys
import zipfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_fixtures import write_samples  # noqa: E402

from manifests import core, vocabulary  # noqa: E402


def _tone(seconds: float = 1.0, rate: int = 16000, amplitude: float = 0.3) -> np.ndarray:
    time = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * time) * np.hanning(len(time))).astype(np.float32)


def test_stored_zip_entries_point_at_the_npy_bytes(tmp_path):
    from fairseq.data.audio.audio_utils import get_features_or_waveform

    arrays = {"a": np.random.rand(7, 80).astype(np.float32), "b-2": np.random.rand(3, 80).astype(np.float32)}
    path = tmp_path / "shard.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            archive.writestr(f"{name}.npy", core.npy_bytes(array))
    entries = core.stored_zip_entries(path)
    for name, array in arrays.items():
        offset, length = entries[f"{name}.npy"]
        assert np.array_equal(get_features_or_waveform(f"{path}:{offset}:{length}"), array)


def test_audio_policies(tmp_path):
    stereo = write_samples(tmp_path / "stereo.wav", np.stack([_tone(), _tone()], axis=1))
    with pytest.raises(core.SkipItem) as skip:
        core.load_checked_audio(str(stereo), core.AudioOptions())
    assert skip.value.reason == core.SKIP_MULTI_CHANNEL
    waveform, notes, as_is = core.load_checked_audio(str(stereo), core.AudioOptions(downmix=True))
    assert notes == [(core.NOTE_DOWNMIXED, "2 channels averaged")] and not as_is and len(waveform) == 16000

    narrow = write_samples(tmp_path / "narrow.flac", _tone(rate=8000), rate=8000)
    with pytest.raises(core.SkipItem) as skip:
        core.load_checked_audio(str(narrow), core.AudioOptions())
    assert skip.value.reason == core.SKIP_LOW_SAMPLE_RATE
    waveform, notes, _ = core.load_checked_audio(str(narrow), core.AudioOptions(min_sample_rate=8000))
    assert notes[0][0] == core.NOTE_RESAMPLED and len(waveform) == 16000

    plain = write_samples(tmp_path / "plain.flac", _tone())
    waveform, notes, as_is = core.load_checked_audio(str(plain), core.AudioOptions())
    assert notes == [] and as_is
    quiet = write_samples(tmp_path / "quiet.flac", _tone(amplitude=1e-5))
    with pytest.raises(core.SkipItem) as skip:
        core.load_checked_audio(str(quiet), core.AudioOptions())
    assert skip.value.reason == core.SKIP_SILENT
    with pytest.raises(core.SkipItem) as skip:
        core.load_checked_audio(str(tmp_path / "absent.flac"), core.AudioOptions())
    assert skip.value.reason == core.SKIP_MISSING_AUDIO


def test_float_samples_beyond_full_scale_are_noted_with_what_the_manifest_keeps_of_them(tmp_path):
    import soundfile

    loud = tmp_path / "loud.wav"
    soundfile.write(loud, _tone() * 3000.0, 16000, subtype="FLOAT")  # int16 scale stored as float
    waveform, notes, as_is = core.load_checked_audio(str(loud), core.AudioOptions())
    assert [kind for kind, _ in notes] == [core.NOTE_BEYOND_FULL_SCALE] and notes[0][1].endswith("used as they are")
    assert as_is, "fairseq reads the same samples: the file may still be used as it is"
    np.testing.assert_allclose(waveform, _tone() * 3000.0, rtol=1e-6)
    full = tmp_path / "full.wav"
    soundfile.write(full, np.clip(_tone() * 2, -1.0, 1.0), 16000, subtype="FLOAT")  # clipped at 1.0 exactly
    assert core.load_checked_audio(str(full), core.AudioOptions())[1] == []

    # on the fly, a file fairseq cannot read as it is becomes a 16-bit copy: clipped, and said so
    loud_22k = tmp_path / "loud_22k.wav"
    soundfile.write(loud_22k, _tone(rate=22050) * 10.0, 22050, subtype="FLOAT")  # peak 3
    options = core.AudioOptions(on_the_fly=True)
    _, notes, as_is = core.load_checked_audio(str(loud_22k), options)
    assert [kind for kind, _ in notes] == [core.NOTE_RESAMPLED, core.NOTE_BEYOND_FULL_SCALE] and not as_is
    assert notes[1][1].endswith("clipped to [-1, 1] in the stored 16-bit copy")
    assert core.stores_pcm16_copy(options, as_is) and not core.stores_pcm16_copy(core.AudioOptions(), as_is)
    assert core.stores_pcm16_copy(core.AudioOptions(on_the_fly=True, segment_seconds=1.0), True)

    # a lossy decoder overshoots full scale a little by design: not a float file, no note
    overshoot = tmp_path / "near_full.ogg"
    soundfile.write(overshoot, np.clip(_tone() * 4, -0.999, 0.999), 16000, format="OGG", subtype="VORBIS")
    assert float(np.abs(soundfile.read(overshoot)[0]).max()) > 1.0
    assert core.NOTE_BEYOND_FULL_SCALE not in [kind for kind, _ in core.load_checked_audio(str(overshoot),
                                                                                           core.AudioOptions())[1]]


def test_sentencepiece_helpers(tmp_path):
    import sentencepiece
    from fairseq.data import Dictionary

    sentences = ["hello world", "the world is big", "hello there big world"] * 10
    model = vocabulary.train_sentencepiece(iter(sentences), tmp_path / "spm_unigram20.model", 20,
                                           user_defined_symbols=["<lang:en>"], num_threads=1)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    dictionary = Dictionary.load(str(tmp_path / "spm_unigram20.txt"))
    assert len(dictionary) == processor.get_piece_size() == 20
    assert dictionary.index("<lang:en>") == processor.piece_to_id("<lang:en>") == 4
    with pytest.raises(core.UsageError, match="at most"):
        vocabulary.train_sentencepiece(iter(sentences), tmp_path / "spm_unigram900.model", 900, num_threads=1)
    assert not (tmp_path / "spm_unigram900.model").exists()


def test_a_sampled_vocabulary_is_the_same_at_every_run(tmp_path):
    """A text above input_sentence_size is sampled: from a fixed seed, so that rerunning a
    preparation script gives the same pieces (a vocabulary that changed would silently misread
    every checkpoint and binarized text made with the earlier one)."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 9))) for _ in range(300)]
    sentences = [" ".join(rng.choice(words, size=8)) for _ in range(600)]
    import subprocess
    import sys

    import sentencepiece

    assert vocabulary.reservoir_sample(iter(sentences[:100]), 150, seed=1) == sentences[:100]
    sample = vocabulary.reservoir_sample(iter(sentences), 150, seed=1)
    assert len(sample) == 150 and set(sample) <= set(sentences) and sample != sentences[:150]
    (tmp_path / "text.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    script = ("import sys; from pathlib import Path; from manifests import vocabulary; "
              "lines = Path(sys.argv[1]).read_text(encoding='utf-8').splitlines(); "
              "vocabulary.train_sentencepiece(iter(lines), sys.argv[2], 80, input_sentence_size=150, num_threads=1)")
    pieces = []
    for name in ("first", "second"):  # separate processes: SentencePiece's own sampling differed between them
        model = tmp_path / name / "spm_unigram80.model"
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "text.txt"), str(model)], check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
        pieces.append([processor.id_to_piece(i) for i in range(processor.get_piece_size())])
    assert pieces[0] == pieces[1]


def test_split_maps():
    assert core.parse_split_map(["train-clean-100:train", "dev-clean"], "--splits") == [
        ("train-clean-100", "train"), ("dev-clean", "dev-clean")]
    with pytest.raises(core.UsageError):
        core.parse_split_map(["train-clean-100:bad/name"], "--splits")


def test_global_cmvn_on_the_fly_is_computed_from_the_samples_the_16_bit_copy_keeps(tmp_path):
    """A loud float file resampled on the fly: the FLAC copy is clipped, so the CMVN sums come from
    the clipped samples (as fairseq will read them), not from the float source."""
    import soundfile

    from slam_formats import features as audio_features

    loud = tmp_path / "loud_22k.wav"
    source = (np.random.default_rng(0).normal(size=22050) * 1.5).astype(np.float32)  # a third beyond 1
    soundfile.write(loud, source, 22050, subtype="FLOAT")
    options = core.AudioOptions(on_the_fly=True, accumulate_cmvn=True)
    shard = core._ShardZip(tmp_path / "shard.zip")
    rows, skipped, notes, cmvn = [], [], [], core._CmvnSums(80)
    core._process_item(core.AudioItem("u", str(loud), loud.stat().st_size), options, shard, rows, skipped, notes,
                       cmvn)
    shard.finish()
    assert rows[0]["entry"] == "u.flac"
    with zipfile.ZipFile(tmp_path / "shard.zip") as archive:
        stored, _ = soundfile.read(io.BytesIO(archive.read("u.flac")), dtype="float32")
    read_back = audio_features.compute_fbank(stored).mean(axis=0)
    np.testing.assert_allclose(cmvn.sum / cmvn.count, read_back, atol=1e-3)  # 16-bit rounding only
    unclipped = audio_features.compute_fbank(audio_features.resample(source, 22050, 16000)).mean(axis=0)
    assert np.abs(unclipped - read_back).max() > 0.1, "the clipping shows in the features"


def test_files_that_failed_with_an_error_are_retried_and_a_first_shard_of_errors_stops_the_run(tmp_path, monkeypatch):
    """An exception no audio check expects (a missing package, a full disk) is not the file's fault:
    a run whose first shard fails on every file stops there, naming the error; a shard with such a
    failure is computed again by the next run instead of reused."""
    items = []
    for index in range(3):
        path = write_samples(tmp_path / "audio" / f"u{index}.wav", _tone(0.5 + 0.1 * index))
        items.append(core.AudioItem(f"u{index}", str(path), path.stat().st_size))
    original = core._process_item

    def run(failing):
        def process(item, *args):
            if item.id in failing:
                raise OSError(28, "No space left on device")
            return original(item, *args)

        monkeypatch.setattr(core, "_process_item", process)
        context = core.RunContext(out_dir=tmp_path / "out", summary=core.RunSummary("t", tmp_path / "out"),
                                  shard_size=1, progress=False)
        return core.extract_features(context, core.AudioOptions(), {"train": list(items)}, "t"), context.summary

    with pytest.raises(core.UsageError, match=r"t_train_00000: every one of its 1 file\(s\) failed with an error, "
                                              r"e\.g\. .*u0\.wav: OSError: .*No space left.*stopped before the other 2"):
        run({"u0", "u1", "u2"})
    features, summary = run({"u1"})  # the first shard is reused only if it had no error: it had
    assert summary.shards_computed == 3 and summary.shards_reused == 0
    assert "1 shard(s) computed again" in " ".join(summary.warnings)
    assert sorted(features["train"].rows_by_item) == ["u0", "u2"]
    features, summary = run(set())
    assert summary.shards_computed == 1 and summary.shards_reused == 2
    assert sorted(features["train"].rows_by_item) == ["u0", "u1", "u2"]
