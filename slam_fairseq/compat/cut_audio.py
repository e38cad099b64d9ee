"""Name a WAV cut short when fairseq's ``speech_to_text`` reads it, and read it as fairseq does.

A fine-tuning manifest may name audio files directly (written by hand, or by another recipe).
fairseq reads them with soundfile, which returns the samples a WAV holds even when its header
declares more: a copy or download that stopped shows up as part of an utterance, trained on with
the whole transcript, without a word. :func:`install_cut_audio_warning` wraps
``audio_utils.get_waveform``: before fairseq's own function reads a ``.wav`` path, the header is
compared with the file (:func:`slam_formats.features.wav_truncation`, a few bytes read), and a cut
file is named in a WARNING, once per file in each process (a data-loader worker is a process of
its own, so each worker may name it once). The samples returned are fairseq's own: a run is not
stopped hours in for one file (the manifest scripts skip such files as ``truncated_audio``).
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Set

from slam_formats.features import wav_truncation

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_cut_audio_warning"]

logger = logging.getLogger(__name__)


def _warning_for_cut_wavs(fairseq_get_waveform: Callable) -> Callable:
    named: Set[str] = set()

    @functools.wraps(fairseq_get_waveform)
    def get_waveform(path_or_fp, *args, **kwargs):
        if isinstance(path_or_fp, str) and path_or_fp.lower().endswith(".wav") and path_or_fp not in named:
            try:
                cut = wav_truncation(path_or_fp)
            except OSError:
                cut = None  # fairseq's own read names an unreadable file
            if cut is not None:
                named.add(path_or_fp)
                logger.warning(f"{path_or_fp}: {cut}; read as it is (only the samples it holds). Rewrite the "
                               "manifest without it, or with the manifest scripts, which skip such files")
        return fairseq_get_waveform(path_or_fp, *args, **kwargs)

    return get_waveform


def install_cut_audio_warning() -> bool:
    """Wrap fairseq's ``audio_utils.get_waveform`` as the module docstring says. Idempotent;
    returns True when it wrapped, False when it had been installed already."""
    from fairseq.data.audio import audio_utils

    return wrap_once(audio_utils, "get_waveform", _warning_for_cut_wavs)
