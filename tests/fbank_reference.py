"""The reference for ``audio_features.compute_fbank``: kaldi-native-fbank, one frame at a time.

``knf_fbank`` is what ``compute_fbank`` computed before it was vectorised (an ``OnlineFbank`` fed the
whole waveform, its frames read back with one ``get_frame`` call each); the tests compare the
vectorised implementation with it. ``reference_waveforms`` are the deterministic inputs whose
reference outputs are stored in ``data/fbank_reference.npz``, so that a change of the feature code or
of the installed kaldi-native-fbank shows up as a changed number.

Regenerate the stored file (only on purpose: it pins today's features) with
``python tests/fbank_reference.py --write``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

import numpy as np

REFERENCE_FILE = Path(__file__).resolve().parent / "data" / "fbank_reference.npz"
SAMPLE_RATE = 16000


def knf_fbank(waveform: np.ndarray, num_mel_bins: int = 80, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi fbank of a 16 kHz waveform in [-1, 1]: (num_frames, num_mel_bins) float32.

    Options: 25 ms povey window, 10 ms shift, dither 0, DC removal, pre-emphasis 0.97,
    snip_edges, power spectrum, log floored at float32 epsilon; samples scaled to 16-bit range.
    """
    import kaldi_native_fbank as knf

    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.frame_opts.samp_freq = SAMPLE_RATE
    options.mel_opts.num_bins = num_mel_bins
    options.mel_opts.high_freq = high_freq
    samples = np.asarray(waveform, dtype=np.float32).reshape(-1) * 32768.0
    extractor = knf.OnlineFbank(options)
    extractor.accept_waveform(SAMPLE_RATE, samples)
    extractor.input_finished()
    num_frames = extractor.num_frames_ready
    if num_frames == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    return np.stack([np.asarray(extractor.get_frame(index), dtype=np.float32)
                     for index in range(num_frames)])


def reference_waveforms() -> Dict[str, np.ndarray]:
    """Named float32 waveforms that probe the edges of the computation (lengths in samples).

    The shortest valid input (one 400-sample frame), frame-count boundaries (559 -> 1 frame,
    560 -> 2), digital silence (every energy at the floor), noise below one 16-bit step (energies
    near the floor), a constant offset (removed by the DC step), white noise, a 1 kHz tone, a chirp
    at full scale and 16-bit quantised noise (what FLAC files hold).
    """
    rng = np.random.default_rng(2026)
    time_axis = np.arange(4000) / SAMPLE_RATE
    waveforms = {
        "shortest_valid_400": 0.1 * rng.standard_normal(400),
        "one_frame_559": 0.1 * rng.standard_normal(559),
        "two_frames_560": 0.1 * rng.standard_normal(560),
        "silence": np.zeros(4000),
        "below_one_lsb": 1e-6 * rng.standard_normal(4000),
        "dc_offset_plus_tone": 0.25 + 0.01 * np.sin(2 * np.pi * 300 * time_axis),
        "white_noise": 0.1 * rng.standard_normal(4000),
        "tone_1khz": 0.5 * np.sin(2 * np.pi * 1000 * time_axis),
        "chirp_full_scale": np.sin(2 * np.pi * (100 + 7900 * time_axis / time_axis[-1] / 2) * time_axis),
        "int16_noise": np.round(0.3 * rng.standard_normal(4000).clip(-3, 3) * 32767) / 32768,
    }
    return {name: np.asarray(samples, dtype=np.float32) for name, samples in waveforms.items()}


def write_reference_file(path: Path = REFERENCE_FILE) -> None:
    """Store each reference waveform and its ``knf_fbank`` (80 bins) as ``<name>/input``, ``<name>/fbank``."""
    arrays = {}
    for name, waveform in reference_waveforms().items():
        arrays[f"{name}/input"] = waveform
        arrays[f"{name}/fbank"] = knf_fbank(waveform)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"(re)write {REFERENCE_FILE}")
    if parser.parse_args().write:
        write_reference_file()
        print(f"wrote {REFERENCE_FILE}")
