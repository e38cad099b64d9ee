"""Let fairseq 0.12 read audio on the fly without pyKaldi or torchaudio.

fairseq's ``fairseq.data.audio.audio_utils`` computes filterbanks with pyKaldi, else torchaudio
(``get_fbank``), and ``get_waveform`` always goes through ``convert_waveform``, which imports
``torchaudio.sox_effects`` even when there is nothing to convert. With neither installed, fairseq's
``speech_to_text`` task cannot read a manifest whose ``audio`` names a ``.flac``/``.wav``/``.ogg``
file (or such a file inside a stored zip). :func:`install_fbank_backend` replaces

- ``audio_utils._get_kaldi_fbank`` with :func:`kaldi_native_fbank_features` (kaldi-native-fbank,
  the same features as ``slam_formats.features.compute_fbank``), and
- ``audio_utils.convert_waveform``, only when torchaudio's sox effects cannot be imported, with
  :func:`convert_waveform_without_torchaudio` (numpy/scipy: channel average, polyphase resampling,
  peak normalisation).

Stored features (``zip:offset:length`` of an ``.npy``) never need this. fairseq itself refuses
``.mp3`` paths (``Unsupported audio format``); the manifest scripts therefore never write them
into a fine-tuning manifest.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np

from slam_formats.features import SAMPLE_RATE, compute_fbank, resample

__all__ = ["install_fbank_backend", "kaldi_native_fbank_features",
           "convert_waveform_without_torchaudio"]

_INSTALLED_MARK = "_slam_fairseq_backend"


def kaldi_native_fbank_features(waveform: np.ndarray, sample_rate: int,
                                n_bins: int = 80) -> Optional[np.ndarray]:
    """Drop-in for fairseq's ``audio_utils._get_kaldi_fbank``.

    Args:
        waveform: (channels, num_samples) or (num_samples,) float array in the 16-bit sample scale
            (fairseq's ``get_fbank`` reads with ``normalization=False``). Several channels are
            averaged.
        sample_rate: its rate; other rates than 16 kHz are resampled to 16 kHz first, so the
            features match the stored ones (``audio_features.compute_fbank``; no dither).
        n_bins: number of Mel bins.
    Returns:
        (num_frames, n_bins) float32.
    """
    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=0) if samples.shape[0] > 1 else samples[0]
    samples = samples / 32768.0
    if sample_rate != SAMPLE_RATE:
        samples = resample(samples, int(sample_rate), SAMPLE_RATE)
    return compute_fbank(samples, SAMPLE_RATE, num_mel_bins=n_bins)


def convert_waveform_without_torchaudio(
    waveform: Union[np.ndarray, "torch.Tensor"],  # noqa: F821
    sample_rate: int,
    normalize_volume: bool = False,
    to_mono: bool = False,
    to_sample_rate: Optional[int] = None,
) -> Tuple[Union[np.ndarray, "torch.Tensor"], int]:  # noqa: F821
    """Drop-in for fairseq's ``audio_utils.convert_waveform`` (same arguments and return), in numpy.

    Args:
        waveform: (channels, num_samples) numpy array or torch tensor; the same type comes back.
        normalize_volume: scale to a peak of 1.0 (sox ``gain -n``).
        to_mono: average the channels.
        to_sample_rate: resample (scipy polyphase) to this rate.
    """
    is_tensor = not isinstance(waveform, np.ndarray)
    samples = waveform.numpy() if is_tensor else waveform
    if normalize_volume:
        peak = float(np.abs(samples).max()) if samples.size else 0.0
        if peak > 0:
            samples = samples / peak
    if to_sample_rate is not None and to_sample_rate != sample_rate:
        samples = np.stack([resample(channel, int(sample_rate), int(to_sample_rate))
                            for channel in samples])
        sample_rate = int(to_sample_rate)
    if to_mono and samples.shape[0] > 1:
        samples = samples.mean(axis=0, keepdims=True)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if is_tensor:
        import torch

        return torch.from_numpy(samples), sample_rate
    return samples, sample_rate


def _torchaudio_sox_available() -> bool:
    try:
        import torchaudio.sox_effects  # noqa: F401
    except Exception:  # ImportError, or a broken torchaudio build (OSError)
        return False
    return True


def install_fbank_backend() -> bool:
    """Patch fairseq's ``audio_utils`` as described in the module docstring.

    Idempotent: a second call changes nothing. Returns True when it patched, False when it had
    been installed already.
    """
    from fairseq.data.audio import audio_utils

    if getattr(audio_utils, _INSTALLED_MARK, False):
        return False
    audio_utils._get_kaldi_fbank = kaldi_native_fbank_features
    if not _torchaudio_sox_available():
        audio_utils.convert_waveform = convert_waveform_without_torchaudio
    setattr(audio_utils, _INSTALLED_MARK, True)
    return True
