"""``audio_features.compute_fbank`` (vectorised numpy) against kaldi-native-fbank frame by frame.

Tolerance, in the log domain, for every value of a frame whose strongest reference Mel bin is
``m`` nats: ``|ours - reference| <= 2e-5 + eps * exp(m - reference)`` with ``eps`` float32's
epsilon. In energies: each Mel energy agrees within 2e-5 of its own value plus one float32
epsilon of the frame's strongest Mel energy, which is the rounding of kaldi-native-fbank's float32
FFT (measured: at most 4.8e-6 within 2 nats of the peak, absolute error at most 1.3e-8 of the peak
energy elsewhere). Digital silence must match exactly (every value at the floor, log(eps)).
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from english_sentences import ENGLISH  # noqa: E402
from fbank_reference import REFERENCE_FILE, knf_fbank, reference_waveforms  # noqa: E402

from slam_formats import features as audio_features  # noqa: E402

RELATIVE_TOLERANCE = 2e-5
PEAK_RELATIVE_TOLERANCE = float(np.finfo(np.float32).eps)


def tolerance_violations(ours: np.ndarray, reference: np.ndarray) -> int:
    """How many values of ``ours`` (frames, bins) fall outside the tolerance of the module docstring."""
    assert ours.shape == reference.shape and ours.dtype == np.float32
    ours64, reference64 = ours.astype(np.float64), reference.astype(np.float64)
    below_peak = reference64.max(axis=1, keepdims=True) - reference64 if len(reference64) else reference64
    allowed = RELATIVE_TOLERANCE + PEAK_RELATIVE_TOLERANCE * np.exp(below_peak)
    return int(np.count_nonzero(np.abs(ours64 - reference64) > allowed))


def espeak_waveform(text: str, speed: int = 175) -> np.ndarray:
    """espeak-ng speech resampled to 16 kHz; the test fails (not skips) without espeak-ng."""
    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is needed for the real-speech feature test (apt-get install espeak-ng)")
    wav = subprocess.run(["espeak-ng", "-v", "en", "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio_features.resample(samples, rate)


def test_stored_reference_matches_todays_knf_and_the_vectorised_features():
    stored = np.load(REFERENCE_FILE)
    names = sorted(reference_waveforms())
    assert sorted({key.split("/")[0] for key in stored.files}) == names
    for name in names:
        waveform, expected = stored[f"{name}/input"], stored[f"{name}/fbank"]
        assert expected.shape == (audio_features.num_fbank_frames(len(waveform)), 80), name
        assert tolerance_violations(knf_fbank(waveform), expected) == 0, name
        assert tolerance_violations(audio_features.compute_fbank(waveform), expected) == 0, name
    silence = audio_features.compute_fbank(stored["silence/input"])
    assert np.array_equal(silence, stored["silence/fbank"])
    assert np.all(silence == np.float32(np.log(np.finfo(np.float32).eps)))


def test_real_speech_and_odd_lengths_match_knf_frame_by_frame():
    speech = espeak_waveform(ENGLISH[0])
    quantised = np.round(espeak_waveform(ENGLISH[1], speed=150) * 32767) / 32768
    rng = np.random.default_rng(7)
    noisy_speech = speech + 0.003 * rng.standard_normal(len(speech)).astype(np.float32)
    # more frames than one block of the vectorised code, and a length that is no multiple of it
    long_input = np.concatenate([speech, quantised, noisy_speech])[: 160 * 997 + 399]
    waveforms = {"speech": speech, "quantised": quantised.astype(np.float32), "noisy": noisy_speech,
                 "long": long_input}
    for length in rng.integers(400, 4000, size=6):
        waveforms[f"noise_{length}"] = (0.2 * rng.standard_normal(length)).astype(np.float32)
    assert len(long_input) // 160 > 3 * audio_features._FRAMES_PER_BLOCK
    for name, waveform in waveforms.items():
        ours = audio_features.compute_fbank(waveform)
        assert ours.shape == (audio_features.num_fbank_frames(len(waveform)), 80), name
        assert tolerance_violations(ours, knf_fbank(waveform)) == 0, name
    for num_mel_bins in (23, 40, 64):
        ours = audio_features.compute_fbank(speech, num_mel_bins=num_mel_bins)
        assert tolerance_violations(ours, knf_fbank(speech, num_mel_bins)) == 0, num_mel_bins


def test_band_limited_filterbank_matches_knf_and_fills_every_bin_of_telephone_speech():
    """``high_freq`` = 4000 on 8 kHz speech upsampled to 16 kHz: Kaldi's own numbers, and no bin is
    left empty (with the default full band, the bins above 4 kHz hold only the upsampler's residue)."""
    speech_8k = audio_features.resample(espeak_waveform(ENGLISH[3]), 16000, 8000)
    telephone = audio_features.resample(speech_8k, 8000, 16000)
    band_limited = audio_features.compute_fbank(telephone, high_freq=4000)
    assert tolerance_violations(band_limited, knf_fbank(telephone, high_freq=4000)) == 0
    full_band = audio_features.compute_fbank(telephone)
    voiced = full_band[:, :40].mean(axis=1) > np.median(full_band[:, :40].mean(axis=1))
    top_full, top_limited = full_band[voiced, -10:].mean(), band_limited[voiced, -10:].mean()
    speech_level = full_band[voiced, 20:40].mean()
    assert speech_level - top_full > 8  # e^8: the full band's top bins are empty on voiced frames
    assert speech_level - top_limited < 6  # the band-limited top bins hold speech
    assert not np.array_equal(audio_features.compute_fbank(telephone, high_freq=8000), band_limited)
    assert np.array_equal(audio_features.compute_fbank(telephone, high_freq=0), full_band)
    for bad in (-100.0, 500.0, 9000.0):
        with pytest.raises(ValueError, match="Mel filterbank upper edge"):
            audio_features.compute_fbank(telephone, high_freq=bad)


def test_the_tolerance_rejects_near_misses(monkeypatch):
    """A 0.01 % gain error or a slightly different pre-emphasis would not pass as Kaldi's features."""
    speech = espeak_waveform(ENGLISH[2])
    reference = knf_fbank(speech)
    assert tolerance_violations(audio_features.compute_fbank(speech * np.float32(1.0001 ** 0.5)), reference) > 0
    monkeypatch.setattr(audio_features, "PREEMPHASIS_COEFFICIENT", 0.969)
    assert tolerance_violations(audio_features.compute_fbank(speech), reference) > 0


def test_short_and_malformed_input():
    for length in (0, 1, 399):
        features = audio_features.compute_fbank(np.zeros(length, dtype=np.float32))
        assert features.shape == (0, 80) and features.dtype == np.float32
    column = (0.1 * np.random.default_rng(3).standard_normal((800, 1))).astype(np.float64)
    assert tolerance_violations(audio_features.compute_fbank(column), knf_fbank(column)) == 0
    broken = np.zeros(1600, dtype=np.float32)
    broken[[5, 900]] = np.nan, np.inf
    with pytest.raises(audio_features.AudioError, match="waveform has 2 samples that are NaN, infinite"):
        audio_features.compute_fbank(broken)
    with pytest.raises(audio_features.AudioError, match="expected 16000 Hz audio, got 8000 Hz"):
        audio_features.compute_fbank(np.zeros(800, dtype=np.float32), sample_rate=8000)


def test_filters_are_knf_own_window_and_mel_banks():
    import kaldi_native_fbank as knf

    filters = audio_features._kaldi_filters(80)
    frame_options = knf.FrameExtractionOptions()
    mel_options = knf.MelBanksOptions()
    mel_options.num_bins = 80
    matrix = np.asarray(knf.MelBanks(mel_options, frame_options, 1.0).get_matrix())
    rebuilt = np.zeros((80, 256))
    for parity in (0, 1):
        starts = list(filters.starts[parity]) + [256]
        for row, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
            rebuilt[2 * row + parity, start:end] = filters.weights[parity][start:end]
    assert np.array_equal(rebuilt, matrix[:, :256]) and not matrix[:, 256].any()
    assert np.array_equal(filters.window, np.asarray(knf.FeatureWindowFunction(frame_options).window,
                                                     dtype=np.float32))


def test_bench_features_reports_throughput_and_stage_shares():
    """The benchmark script runs (tiny) and keeps the lines the README and issues quote."""
    import re

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_features.py"
    run = subprocess.run([sys.executable, str(bench), "--minutes", "0.25", "--file-seconds", "5",
                          "--workers", "1", "--profile"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^compute_fbank alone: +\d+x real time \(1 process\), +\d+x per CPU-second$",
                     run.stdout, re.MULTILINE), run.stdout
    shares = dict(re.findall(r"^  (\S.*?) +[\d.]+ CPU-s +([\d.]+)%$", run.stdout, re.MULTILINE))
    assert set(shares) == {"read + decode audio", "checks (silence, length)", "compute_fbank", "CMVN sums",
                           ".npy encoding", "zip writes"}, run.stdout
    assert float(shares["compute_fbank"]) > 0 and float(shares["read + decode audio"]) > 0, run.stdout
    assert sum(map(float, shares.values())) <= 100.5, run.stdout
