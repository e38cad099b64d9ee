"""A WAV cut short after its header was written is refused with the file named, not read as part
of an utterance; headers that state no length (streamed output) are read as before."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from slam_formats.features import AudioError, TruncatedAudioError, compute_fbank, read_audio, wav_truncation


def _write_wav(path: Path, seconds: float = 0.5, extra_chunk: bytes = b"") -> bytes:
    """A 16 kHz 16-bit mono WAV; ``extra_chunk`` (a whole RIFF chunk) goes before ``data``."""
    samples = (np.sin(np.arange(int(16000 * seconds)) * 0.05) * 8000).astype(np.int16).tobytes()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + fmt + extra_chunk + struct.pack("<4sI", b"data", len(samples)) + samples
    data = struct.pack("<4sI", b"RIFF", len(body)) + body
    path.write_bytes(data)
    return data


def _with_data_size(data: bytes, size: int) -> bytes:
    at = data.index(b"data") + 4
    return data[:at] + struct.pack("<I", size) + data[at + 4:]


def test_whole_wav_reads_and_a_cut_one_is_refused_naming_the_file(tmp_path):
    whole = _write_wav(tmp_path / "whole.wav")
    assert wav_truncation(tmp_path / "whole.wav") is None and wav_truncation(whole) is None
    channels, rate = read_audio(str(tmp_path / "whole.wav"))
    assert channels.shape == (1, 8000) and rate == 16000

    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[: len(whole) - 6000])
    # soundfile alone returns the samples that are there, without an error
    assert sf.read(str(cut))[0].shape == (8000 - 3000,)
    reason = wav_truncation(cut)
    assert reason is not None and "16,000 bytes" in reason and "10,000" in reason
    assert wav_truncation(cut.read_bytes()) == reason
    with pytest.raises(TruncatedAudioError, match=f"{cut}: truncated"):
        read_audio(str(cut))
    with pytest.raises(AudioError, match="stored.zip:0:1: truncated"):
        read_audio(cut.read_bytes(), name="stored.zip:0:1")


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF, 0x7FFFF000])
def test_headers_without_a_length_are_not_judged(tmp_path, size):
    """Writers streaming to a pipe leave 0, 0xFFFFFFFF or about 2**31 as the data size."""
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(_with_data_size(_write_wav(tmp_path / "x.wav"), size))
    assert wav_truncation(streamed) is None


def test_chunks_before_the_data_are_walked_with_their_pad_byte(tmp_path):
    """An odd-sized chunk is followed by a pad byte; the data chunk is found after it."""
    odd = struct.pack("<4sI", b"LIST", 5) + b"INFOx" + b"\0"
    whole = _write_wav(tmp_path / "odd.wav", extra_chunk=odd)
    assert wav_truncation(whole) is None
    assert read_audio(str(tmp_path / "odd.wav"))[0].shape == (1, 8000)
    assert wav_truncation(whole[:-2]) is None, "2 bytes short: within 10 ms"
    assert "16,000 bytes" in wav_truncation(whole[:-400])


def test_a_shortfall_of_up_to_10_ms_is_accepted(tmp_path):
    whole = _write_wav(tmp_path / "whole.wav")  # 32,000 bytes a second: 10 ms is 320 bytes
    assert wav_truncation(whole[:-320]) is None
    assert "16,000 bytes of samples, the file holds 15,678" in wav_truncation(whole[:-322])


def test_other_formats_are_left_to_the_decoder(tmp_path):
    sf.write(str(tmp_path / "a.flac"), np.zeros(1600, dtype=np.float32) + 0.1, 16000)
    assert wav_truncation(tmp_path / "a.flac") is None
    assert wav_truncation(b"RIFF") is None and wav_truncation(b"") is None


def test_fairseq_reading_a_cut_wav_of_a_manifest_names_it_once_and_reads_what_it_holds(tmp_path, caplog):
    """A fine-tuning manifest naming WAV files: fairseq's speech_to_text reads them through
    ``audio_utils``; with the plugin imported, a cut one is named once, and read as fairseq reads it."""
    import logging

    import slam_fairseq  # noqa: F401  (installs the warning)
    from fairseq.data.audio.audio_utils import get_features_or_waveform

    whole = _write_wav(tmp_path / "whole.wav")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[: len(whole) - 6000])
    with caplog.at_level(logging.WARNING):
        waveform = get_features_or_waveform(str(cut), need_waveform=True)
        features = get_features_or_waveform(str(cut))  # filterbanks: a second read of the same file
        get_features_or_waveform(str(tmp_path / "whole.wav"))
    assert np.array_equal(waveform, sf.read(str(cut), dtype="float32")[0]), "the samples fairseq reads"
    np.testing.assert_allclose(features, compute_fbank(waveform), rtol=1e-5, atol=1e-5)  # of those samples
    named = [record.getMessage() for record in caplog.records if str(cut) in record.getMessage()]
    assert len(named) == 1 and "16,000 bytes" in named[0] and "read as it is" in named[0], named
    assert "whole.wav" not in caplog.text
