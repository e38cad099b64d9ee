"""Fill fairseq 0.12's on-the-fly filterbank gap, and only that gap.

fairseq's ``fairseq.data.audio.audio_utils.get_fbank`` tries pyKaldi (``_get_kaldi_fbank``), then
torchaudio (``_get_torchaudio_fbank``), and raises ``ImportError`` when neither imports; and
``convert_waveform`` (called by ``get_waveform``) imports ``torchaudio.sox_effects`` even when
there is nothing to convert. With neither installed (torchaudio cannot load beside torch 2.13 CPU),
fairseq's ``speech_to_text`` task cannot read a manifest whose ``audio`` names a
``.flac``/``.wav``/``.ogg`` file. :func:`install_fbank_backend` wraps, it does not replace:

- ``audio_utils._get_torchaudio_fbank``: fairseq's own function runs first; only when it returns
  None (torchaudio missing: fairseq's "no backend" signal) do :func:`kaldi_native_fbank_features`
  (kaldi-native-fbank, the same features as ``slam_formats.features.compute_fbank``) answer.
  pyKaldi, tried before it by fairseq, is never touched.
- ``audio_utils.convert_waveform``: fairseq's own function runs first; only when it cannot import
  torchaudio's sox effects does :func:`convert_waveform_without_torchaudio` (numpy/scipy) answer.

So a machine where fairseq has a working backend computes exactly what stock fairseq computes,
with or without ``--user-dir slam_fairseq`` (tested with a stand-in torchaudio). Stored features
(``zip:offset:length`` of an ``.npy``) never need this. fairseq itself refuses ``.mp3`` paths
(``Unsupported audio format``); the manifest scripts therefore never write them into a
fine-tuning manifest.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple, Union

import numpy as np

from slam_formats.features import SAMPLE_RATE, compute_fbank, resample

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_fbank_backend", "kaldi_native_fbank_features",
           "convert_waveform_without_torchaudio"]


def kaldi_native_fbank_features(waveform: np.ndarray, sample_rate: int,
                                n_bins: int = 80) -> Optional[np.ndarray]:
    """Filterbanks where fairseq has no backend (same arguments as ``audio_utils._get_torchaudio_fbank``).

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


def _with_fallback_fbank(fairseq_torchaudio_fbank: Callable) -> Callable:
    """fairseq's torchaudio filterbank, else (it returned None: no torchaudio) ours."""

    @functools.wraps(fairseq_torchaudio_fbank)
    def torchaudio_or_kaldi_native_fbank(waveform: np.ndarray, sample_rate, n_bins=80):
        features = fairseq_torchaudio_fbank(waveform, sample_rate, n_bins)
        if features is None:
            features = kaldi_native_fbank_features(waveform, sample_rate, n_bins)
        return features

    return torchaudio_or_kaldi_native_fbank


def _with_fallback_conversion(fairseq_convert_waveform: Callable) -> Callable:
    """fairseq's ``convert_waveform``, else (torchaudio's sox effects cannot load) ours."""

    @functools.wraps(fairseq_convert_waveform)
    def convert_waveform(waveform, sample_rate, normalize_volume=False, to_mono=False, to_sample_rate=None):
        try:
            return fairseq_convert_waveform(waveform, sample_rate, normalize_volume=normalize_volume,
                                            to_mono=to_mono, to_sample_rate=to_sample_rate)
        except (ImportError, OSError):  # no torchaudio, or a build that cannot load beside this torch
            return convert_waveform_without_torchaudio(waveform, sample_rate, normalize_volume, to_mono,
                                                       to_sample_rate)

    return convert_waveform


def install_fbank_backend() -> bool:
    """Wrap fairseq's ``audio_utils`` as described in the module docstring.

    Idempotent: a second call changes nothing. Returns True when it wrapped, False when it had
    been installed already.
    """
    from fairseq.data.audio import audio_utils

    wrapped = wrap_once(audio_utils, "_get_torchaudio_fbank", _with_fallback_fbank)
    return wrap_once(audio_utils, "convert_waveform", _with_fallback_conversion) or wrapped
