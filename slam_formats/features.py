"""Audio reading and 80-dim log-Mel filterbanks, shared by the manifest scripts and the tasks.

One implementation of the features keeps stored features (zip of .npy) and on-the-fly features
identical: both call :func:`compute_fbank`, Kaldi's fbank (25 ms window, 10 ms shift, no dither,
16-bit sample scale; the convention of fairseq's S2T recipes) vectorised in numpy with
kaldi-native-fbank's own window and Mel filters.
"""
from __future__ import annotations

import dataclasses
import functools
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


class TruncatedAudioError(AudioError):
    """A WAV file holding fewer samples than its header declares (see :func:`wav_truncation`)."""


class MultiChannelAudioError(AudioError):
    """Audio of several channels where one was expected (``downmix`` averages them instead)."""


class FeatureShapeError(AudioError):
    """Features of another dimension than expected (stored with other settings than the task's)."""


def mono(channels: np.ndarray, name: str, downmix: bool = False) -> np.ndarray:
    """(N,) samples of channels-first (C, N) audio: the one channel, or with ``downmix`` the mean
    of several (what the manifest scripts' ``--downmix`` and HuBERT's feature dumper do). Raises
    :class:`MultiChannelAudioError` naming ``name`` for several channels without ``downmix``."""
    if channels.shape[0] == 1:
        return channels[0]
    if not downmix:
        raise MultiChannelAudioError(f"{name}: {channels.shape[0]} channels, expected mono")
    return channels.mean(axis=0)


def num_fbank_frames(num_samples: int) -> int:
    """Number of frames Kaldi (snip_edges=True) produces for ``num_samples`` 16 kHz samples."""
    if num_samples < FRAME_LENGTH_SAMPLES:
        return 0
    return 1 + (num_samples - FRAME_LENGTH_SAMPLES) // FRAME_SHIFT_SAMPLES


PREEMPHASIS_COEFFICIENT = 0.97
FFT_SIZE = 512  # the frame length rounded up to a power of two, as Kaldi pads it
_FRAMES_PER_BLOCK = 128  # frames per FFT block: bounds memory; 64-192 measured 3-4x faster than 256+ (cache)
_LOG_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi floors mel energies at float epsilon before the log


@dataclasses.dataclass(frozen=True)
class _KaldiFilters:
    """Kaldi's povey window and Mel filterbank, in the layout :func:`_fbank_block` applies them.

    Kaldi's triangles overlap only their neighbours, so the even-numbered filters have disjoint
    supports, and so have the odd-numbered ones: each parity is one weight per FFT bin, and its Mel
    energies are sums over contiguous runs of bins (``np.add.reduceat``), exact and free of BLAS
    (whose threads would contend with the manifest workers).

    Attributes:
        window: (FRAME_LENGTH_SAMPLES,) float32, applied after DC removal and pre-emphasis.
        weights: two (FFT_SIZE // 2,) float64 arrays, the even and the odd filters' weights per
            FFT bin (Kaldi ignores the Nyquist bin).
        starts: two int arrays, the first FFT bin of each even / odd filter, ascending.
    """

    window: np.ndarray
    weights: Tuple[np.ndarray, np.ndarray]
    starts: Tuple[np.ndarray, np.ndarray]


@functools.lru_cache(maxsize=8)
def _kaldi_filters(num_mel_bins: int, high_freq: float = 0.0) -> _KaldiFilters:
    """The window and Mel filters of kaldi-native-fbank itself, for 16 kHz, ``num_mel_bins`` and the
    filterbank's upper edge ``high_freq`` (Kaldi's convention: <= 0 is an offset from Nyquist)."""
    import kaldi_native_fbank as knf

    frame_options = knf.FrameExtractionOptions()
    frame_options.samp_freq = SAMPLE_RATE
    frame_options.window_type = "povey"
    mel_options = knf.MelBanksOptions()
    mel_options.num_bins = num_mel_bins
    mel_options.high_freq = float(high_freq)
    window = np.asarray(knf.FeatureWindowFunction(frame_options).window, dtype=np.float32)
    matrix = np.asarray(knf.MelBanks(mel_options, frame_options, 1.0).get_matrix(), dtype=np.float64)
    if window.shape != (FRAME_LENGTH_SAMPLES,) or matrix.shape != (num_mel_bins, FFT_SIZE // 2 + 1):
        raise RuntimeError(f"kaldi-native-fbank returned a window of shape {window.shape} and Mel "
                           f"weights of shape {matrix.shape}; expected ({FRAME_LENGTH_SAMPLES},) "
                           f"and ({num_mel_bins}, {FFT_SIZE // 2 + 1})")
    matrix = matrix[:, : FFT_SIZE // 2]
    nonzero = matrix != 0
    first_bin = nonzero.argmax(axis=1)
    last_bin = matrix.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
    weights, starts = [], []
    for parity in (0, 1):
        rows = slice(parity, num_mel_bins, 2)
        if not np.all(first_bin[rows][1:] > last_bin[rows][:-1]):
            raise RuntimeError("kaldi-native-fbank's Mel filters overlap beyond their neighbours; "
                               "compute_fbank assumes Kaldi's half-overlapping triangles")
        weights.append(matrix[rows].sum(axis=0))
        starts.append(first_bin[rows])
    for array in (window, *weights, *starts):
        array.setflags(write=False)  # shared by every call through the cache
    return _KaldiFilters(window, (weights[0], weights[1]), (starts[0], starts[1]))


def _fbank_block(frames: np.ndarray, filters: _KaldiFilters) -> np.ndarray:
    """Log-Mel energies of a block of raw frames, each step as Kaldi's ``ProcessWindow`` does it.

    DC removal, pre-emphasis and windowing run in float32 like Kaldi's; the FFT and the Mel sums
    run in float64, so the result differs from Kaldi's only by Kaldi's own float32 rounding.

    Args:
        frames: (num_frames, FRAME_LENGTH_SAMPLES) float32, samples in the 16-bit range.
    Returns:
        (num_frames, num_mel_bins) float64.
    """
    coefficient = np.float32(PREEMPHASIS_COEFFICIENT)
    centered = frames - frames.sum(axis=1, dtype=np.float32, keepdims=True) / np.float32(FRAME_LENGTH_SAMPLES)
    emphasized = np.empty_like(centered)
    np.multiply(centered[:, :-1], coefficient, out=emphasized[:, 1:])
    np.subtract(centered[:, 1:], emphasized[:, 1:], out=emphasized[:, 1:])
    emphasized[:, 0] = centered[:, 0] - coefficient * centered[:, 0]  # Kaldi's first sample: x0 - c * x0
    emphasized *= filters.window
    padded = np.zeros((len(frames), FFT_SIZE), dtype=np.float64)
    padded[:, :FRAME_LENGTH_SAMPLES] = emphasized
    squared = np.square(np.fft.rfft(padded, axis=1).view(np.float64))  # (re^2, im^2) per bin
    power = squared[:, 0:FFT_SIZE:2] + squared[:, 1:FFT_SIZE:2]  # (num_frames, FFT_SIZE // 2)
    num_mel_bins = len(filters.starts[0]) + len(filters.starts[1])
    mel_energies = np.empty((len(frames), num_mel_bins), dtype=np.float64)
    for parity in (0, 1):
        mel_energies[:, parity::2] = np.add.reduceat(power * filters.weights[parity], filters.starts[parity], axis=1)
    return np.log(np.maximum(mel_energies, _LOG_FLOOR, out=mel_energies), out=mel_energies)


def check_high_freq(high_freq: float) -> float:
    """``high_freq`` if it is a usable upper edge of the Mel filterbank at 16 kHz, else ValueError.

    0 (the default) is Nyquist, 8 kHz. Audio recorded at a lower rate and upsampled (8 kHz
    telephone speech stored at 16 kHz) has no energy above its own Nyquist: Mel bins there hold
    only the log floor and noise, which utterance or global CMVN then scales up to the size of
    speech; ``high_freq`` = the recording's Nyquist (4000) spreads all bins over the real band.
    """
    high_freq = float(high_freq)
    if not (high_freq == 0.0 or 1000.0 <= high_freq <= SAMPLE_RATE / 2):
        raise ValueError(f"Mel filterbank upper edge {high_freq:g} Hz: expected 0 (Nyquist) or a "
                         f"frequency from 1000 to {SAMPLE_RATE // 2} Hz")
    return high_freq


def compute_fbank(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE,
                  num_mel_bins: int = NUM_MEL_BINS, high_freq: float = 0.0) -> np.ndarray:
    """Log-Mel filterbanks of a mono waveform in [-1, 1], Kaldi's fbank vectorised over frames.

    Kaldi's (and kaldi-native-fbank's) settings: 25 ms povey window, 10 ms shift, snip_edges,
    dither 0, DC removal, pre-emphasis 0.97, 512-point power spectrum, Kaldi Mel banks from 20 Hz to
    ``high_freq`` (0: Nyquist; see :func:`check_high_freq`), log floored at float32 epsilon, samples
    scaled to the 16-bit range.
    ``tests/test_audio_features_fbank.py`` holds it to kaldi-native-fbank's output.

    Args:
        waveform: (num_samples,) float array at ``sample_rate`` (must be 16 kHz).
    Returns:
        (num_frames, num_mel_bins) float32, ``num_frames == num_fbank_frames(num_samples)``.
    """
    if sample_rate != SAMPLE_RATE:
        raise AudioError(f"expected {SAMPLE_RATE} Hz audio, got {sample_rate} Hz: resample first")
    samples = np.asarray(waveform, dtype=np.float32).reshape(-1) * np.float32(32768.0)
    if not np.isfinite(samples).all():
        raise AudioError(f"waveform has {np.count_nonzero(~np.isfinite(samples))} samples that are NaN, "
                         "infinite or beyond float32 after scaling to 16 bits")
    num_frames = num_fbank_frames(len(samples))
    features = np.empty((num_frames, num_mel_bins), dtype=np.float32)
    if num_frames == 0:
        return features
    filters = _kaldi_filters(num_mel_bins, check_high_freq(high_freq))
    all_frames = np.lib.stride_tricks.sliding_window_view(samples, FRAME_LENGTH_SAMPLES)[::FRAME_SHIFT_SAMPLES]
    for start in range(0, num_frames, _FRAMES_PER_BLOCK):
        block = all_frames[start:start + _FRAMES_PER_BLOCK]
        features[start:start + len(block)] = _fbank_block(block, filters)
    return features


def resample(waveform: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy), exact for the rational ratios of audio sample rates."""
    if from_rate == to_rate:
        return waveform
    from math import gcd

    from scipy.signal import resample_poly

    divisor = gcd(from_rate, to_rate)
    return resample_poly(waveform, to_rate // divisor, from_rate // divisor).astype(np.float32)


_WAV_UNKNOWN_LENGTHS = (0, 0xFFFFFFFF)  # what streaming writers put in the header before (or instead of) the size
_WAV_UNKNOWN_LENGTH_FLOOR = 0x7FFF0000  # sox and others write about 2**31 when the output cannot be seeked


def wav_truncation(source) -> Optional[str]:
    """Why a RIFF/WAVE file is cut short, or None (not a WAV, no length in its header, or whole).

    libsndfile reads a WAV whose ``data`` chunk declares more bytes than the file holds without an
    error: it returns the samples that are there. That is how a copy or download cut short looks
    (the header, written first, is intact), and its features would silently be those of part of
    the utterance. Headers that state no length (0, 0xFFFFFFFF, or about 2**31 as written by
    programs streaming to a pipe) are not judged, and a shortfall of up to 10 ms of audio or 1 %
    of the declared size (a writer's rounding, a header written before a last effect) is accepted.

    Args:
        source: a path, or the file's bytes.
    """
    with io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb") as handle:
        total = handle.seek(0, io.SEEK_END)
        handle.seek(0)
        riff = handle.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None
        offset, bytes_per_second = 12, 0
        while offset + 8 <= total:
            handle.seek(offset)
            chunk_id, size = riff_chunk_header(handle.read(8))
            if chunk_id == b"fmt " and size >= 12:
                bytes_per_second = int.from_bytes(handle.read(12)[8:12], "little")
            if chunk_id == b"data":
                available = total - (offset + 8)
                if size in _WAV_UNKNOWN_LENGTHS or size >= _WAV_UNKNOWN_LENGTH_FLOOR:
                    return None
                if size - available <= max(bytes_per_second // 100, size // 100):
                    return None
                return (f"truncated: its header declares {size:,} bytes of samples, the file holds "
                        f"{available:,} (cut short in a copy or download?)")
            offset += 8 + size + (size & 1)
    return None


def riff_chunk_header(header: bytes) -> Tuple[bytes, int]:
    """(chunk id, chunk size) of an 8-byte little-endian RIFF chunk header."""
    return header[:4], int.from_bytes(header[4:8], "little")


def read_audio(path_or_bytes, name: Optional[str] = None) -> Tuple[np.ndarray, int]:
    """Read audio with soundfile; returns (channels-first float32 array (C, N), sample rate).

    Raises :class:`AudioError` naming the file for unreadable input, and for a WAV cut short
    (:func:`wav_truncation`), which soundfile would read without a word.
    """
    import soundfile as sf

    name = name or str(path_or_bytes)
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    try:
        truncation = wav_truncation(path_or_bytes)
    except OSError as error:
        raise AudioError(f"{name}: unreadable audio ({error})") from error
    if truncation is not None:
        raise TruncatedAudioError(f"{name}: {truncation}")
    try:
        data, sample_rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types; all mean "unreadable"
        raise AudioError(f"{name}: unreadable audio ({error})") from error
    return data.T, int(sample_rate)


def load_mono_16k(path: str, resample_to_16k: bool = True, downmix: bool = False) -> np.ndarray:
    """Read an audio file as 16 kHz mono; refuses (or resamples) other rates, refuses several
    channels (or with ``downmix`` averages them, :func:`mono`)."""
    channels, sample_rate = read_audio(path)
    waveform = mono(channels, path, downmix)
    if sample_rate != SAMPLE_RATE:
        if not resample_to_16k:
            raise AudioError(f"{path}: sample rate {sample_rate} Hz, expected {SAMPLE_RATE} Hz")
        waveform = resample(waveform, sample_rate, SAMPLE_RATE)
    return waveform


def parse_stored_zip_path(audio_field: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    """(path, (byte offset, byte length)) of a manifest ``audio`` field ``path:offset:length`` (an
    entry stored in a zip), or (the field, None) for a plain file."""
    parts = audio_field.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], (int(parts[1]), int(parts[2]))
    return audio_field, None


def read_features(audio_field: str, root: Optional[str] = None,
                  num_mel_bins: int = NUM_MEL_BINS, downmix: bool = False, high_freq: float = 0.0) -> np.ndarray:
    """Features for one manifest ``audio`` field: ``zip:offset:length`` of an .npy, an .npy, or audio.

    Audio files are turned into filterbanks on the fly (fairseq's own raw-audio path needs
    torchaudio), with the Mel filterbank's upper edge ``high_freq`` (0: Nyquist; stored features
    already have theirs). Relative paths are resolved against ``root``. Audio of several channels
    is refused (:class:`MultiChannelAudioError`), or averaged with ``downmix``.
    Returns (num_frames, num_mel_bins) float32.
    """
    path, byte_range = parse_stored_zip_path(audio_field)
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
            features = compute_fbank(resample(mono(channels, audio_field, downmix), rate), num_mel_bins=num_mel_bins,
                                     high_freq=high_freq)
    elif path.endswith(".npy"):
        features = np.load(path)
    elif path.lower().endswith(AUDIO_EXTENSIONS):
        features = compute_fbank(load_mono_16k(path, downmix=downmix), num_mel_bins=num_mel_bins,
                                 high_freq=high_freq)
    else:
        raise AudioError(f"{audio_field}: not a zip entry, .npy or audio file ({AUDIO_EXTENSIONS})")
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != num_mel_bins:
        raise FeatureShapeError(
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
    sf.write(buffer, clip_to_pcm16_range(waveform), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def clip_to_pcm16_range(waveform: np.ndarray) -> np.ndarray:
    """(N,) float32 clipped to what a 16-bit sample can hold, [-1, 32767 / 32768]: the samples an
    :func:`encode_flac` copy keeps. Audio read from 16-bit files is already in that range."""
    return np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1.0, 32767.0 / 32768.0)


def is_float_pcm(path: str) -> bool:
    """Whether an audio file stores float samples (WAV/AIFF/... ``FLOAT`` or ``DOUBLE``), which,
    unlike integer samples, can hold values beyond full scale [-1, 1]."""
    import soundfile as sf

    try:
        return sf.info(str(path)).subtype in ("FLOAT", "DOUBLE")
    except Exception:  # soundfile raises several types; an unreadable file was refused before
        return False
