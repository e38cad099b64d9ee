"""Audio reading and 80-dim log-Mel filterbanks, shared by the manifest scripts and the tasks.

One implementation of the features keeps stored features (zip of .npy) and on-the-fly features
identical: both call :func:`compute_fbank`, which is Kaldi-compatible (kaldi-native-fbank, 25 ms
window, 10 ms shift, no dither, 16-bit sample scale), the same convention as fairseq's S2T recipes.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_SAMPLES = 400  # 25 ms at 16 kHz
FRAME_SHIFT_SAMPLES = 160  # 10 ms at 16 kHz
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".opus")


class AudioError(ValueError):
    """An audio file that cannot be turned into features; the message names the file."""


def num_fbank_frames(num_samples: int) -> int:
    """Number of frames Kaldi (snip_edges=True) produces for ``num_samples`` 16 kHz samples."""
    if num_samples < FRAME_LENGTH_SAMPLES:
        return 0
    return 1 + (num_samples - FRAME_LENGTH_SAMPLES) // FRAME_SHIFT_SAMPLES


def _fbank_options(num_mel_bins: int):
    import kaldi_native_fbank as knf

    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.frame_opts.samp_freq = SAMPLE_RATE
    options.mel_opts.num_bins = num_mel_bins
    return options


def compute_fbank(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE,
                  num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
    """Log-Mel filterbanks of a mono waveform in [-1, 1].

    Args:
        waveform: (num_samples,) float array at ``sample_rate`` (must be 16 kHz).
    Returns:
        (num_frames, num_mel_bins) float32, ``num_frames == num_fbank_frames(num_samples)``.
    """
    import kaldi_native_fbank as knf

    if sample_rate != SAMPLE_RATE:
        raise AudioError(f"expected {SAMPLE_RATE} Hz audio, got {sample_rate} Hz: resample first")
    samples = np.asarray(waveform, dtype=np.float32).reshape(-1) * 32768.0
    extractor = knf.OnlineFbank(_fbank_options(num_mel_bins))
    extractor.accept_waveform(SAMPLE_RATE, samples)
    extractor.input_finished()
    num_frames = extractor.num_frames_ready
    if num_frames == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    return np.stack([np.asarray(extractor.get_frame(index), dtype=np.float32)
                     for index in range(num_frames)])


def resample(waveform: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy), exact for the rational ratios of audio sample rates."""
    if from_rate == to_rate:
        return waveform
    from math import gcd

    from scipy.signal import resample_poly

    divisor = gcd(from_rate, to_rate)
    return resample_poly(waveform, to_rate // divisor, from_rate // divisor).astype(np.float32)


def read_audio(path_or_bytes, name: Optional[str] = None) -> Tuple[np.ndarray, int]:
    """Read audio with soundfile; returns (channels-first float32 array (C, N), sample rate).

    Raises :class:`AudioError` naming the file for unreadable input.
    """
    import soundfile as sf

    name = name or str(path_or_bytes)
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    try:
        data, sample_rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types; all mean "unreadable"
        raise AudioError(f"{name}: unreadable audio ({error})") from error
    return data.T, int(sample_rate)


def load_mono_16k(path: str, resample_to_16k: bool = True) -> np.ndarray:
    """Read an audio file as 16 kHz mono; refuses (or resamples) other rates, refuses multi-channel."""
    channels, sample_rate = read_audio(path)
    if channels.shape[0] != 1:
        raise AudioError(f"{path}: {channels.shape[0]} channels, expected mono")
    waveform = channels[0]
    if sample_rate != SAMPLE_RATE:
        if not resample_to_16k:
            raise AudioError(f"{path}: sample rate {sample_rate} Hz, expected {SAMPLE_RATE} Hz")
        waveform = resample(waveform, sample_rate, SAMPLE_RATE)
    return waveform


def _parse_stored_zip_path(audio_field: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    parts = audio_field.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], (int(parts[1]), int(parts[2]))
    return audio_field, None


def read_features(audio_field: str, root: Optional[str] = None,
                  num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
    """Features for one manifest ``audio`` field: ``zip:offset:length`` of an .npy, an .npy, or audio.

    Audio files are turned into filterbanks on the fly (fairseq's own raw-audio path needs
    torchaudio). Relative paths are resolved against ``root``.
    Returns (num_frames, num_mel_bins) float32.
    """
    path, byte_range = _parse_stored_zip_path(audio_field)
    if root is not None and not Path(path).is_absolute():
        path = str(Path(root) / path)
    if byte_range is not None:
        offset, length = byte_range
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise AudioError(f"{audio_field}: truncated stored zip entry")
        if data[:6] == b"\x93NUMPY":
            features = np.load(io.BytesIO(data))
        else:
            channels, rate = read_audio(data, name=audio_field)
            features = compute_fbank(resample(channels[0], rate), num_mel_bins=num_mel_bins)
    elif path.endswith(".npy"):
        features = np.load(path)
    elif path.lower().endswith(AUDIO_EXTENSIONS):
        features = compute_fbank(load_mono_16k(path), num_mel_bins=num_mel_bins)
    else:
        raise AudioError(f"{audio_field}: not a zip entry, .npy or audio file ({AUDIO_EXTENSIONS})")
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != num_mel_bins:
        raise AudioError(
            f"{audio_field}: features of shape {tuple(features.shape)}, expected (frames, {num_mel_bins})")
    return features


def encode_flac(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono waveform in [-1, 1] as the bytes of a 16-bit FLAC file (clipped to the 16-bit range).

    The manifest scripts store such copies (in a shard zip) where fairseq could not read the source
    on the fly (mp3, other sample rates, downmixed stereo). Reading them back gives the waveform
    quantised to 16 bits.
    """
    import soundfile as sf

    buffer = io.BytesIO()
    samples = np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1.0, 32767.0 / 32768.0)
    sf.write(buffer, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
