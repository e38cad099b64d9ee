"""The plugin changes nothing that stock fairseq can do itself, and refuses a fairseq it was not written for."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from manifest_fixtures import write_samples  # noqa: E402

from slam_formats import features  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A stand-in torchaudio: fairseq's own backend, as on a machine where torchaudio works. Its
# filterbank is a constant, so a result from it cannot be mistaken for ours.
FAKE_TORCHAUDIO = {
    "torchaudio/__init__.py": "",
    "torchaudio/compliance/__init__.py": "",
    "torchaudio/compliance/kaldi.py": textwrap.dedent("""
        import torch

        def fbank(waveform, num_mel_bins=80, sample_frequency=16000):
            return torch.full((3, num_mel_bins), 7.0)
    """),
    "torchaudio/sox_effects.py": textwrap.dedent("""
        def apply_effects_tensor(waveform, sample_rate, effects):
            return waveform * 0 + 0.5, sample_rate
    """),
}


def _tone(seconds: float = 1.3, rate: int = 16000) -> np.ndarray:
    time = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * time)).astype(np.float32)


def _run_python(code: str, extra_path: Path | None = None) -> str:
    env = dict(os.environ)
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_gap_is_filled_where_fairseq_has_no_backend(tmp_path):
    """No pyKaldi, no torchaudio: fairseq's get_fbank answers with kaldi-native-fbank features."""
    from fairseq.data.audio import audio_utils

    from slam_fairseq.compat.fbank import install_fbank_backend

    assert install_fbank_backend() is False  # installed once, by importing the plugin
    assert audio_utils._get_kaldi_fbank.__module__ == "fairseq.data.audio.audio_utils"  # pyKaldi slot untouched
    waveform = _tone()
    path = write_samples(tmp_path / "tone.flac", waveform)
    read, rate = audio_utils.get_waveform(str(path))
    assert rate == 16000 and read.shape == (1, len(waveform))
    assert np.allclose(audio_utils.get_fbank(str(path)), features.compute_fbank(read[0]))
    resampled, rate = audio_utils.convert_waveform(np.stack([waveform, waveform]), 48000, to_mono=True,
                                                   to_sample_rate=16000)
    assert rate == 16000 and resampled.shape == (1, -(-len(waveform) // 3))


def test_a_working_stock_backend_is_unchanged_by_the_plugin(tmp_path):
    """With fairseq's own backend present, importing the plugin (what --user-dir does) changes no result."""
    for name, text in FAKE_TORCHAUDIO.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    audio = write_samples(tmp_path / "tone.flac", _tone())
    output = _run_python(f"""
        import numpy as np
        from argparse import Namespace
        from fairseq import utils
        from fairseq.data.audio import audio_utils

        def results():
            fbank = audio_utils.get_fbank({str(audio)!r})
            waveform, rate = audio_utils.get_waveform({str(audio)!r}, mono=True, output_sample_rate=8000)
            return fbank, waveform, rate

        before = results()
        utils.import_user_module(Namespace(user_dir={str(REPO / 'slam_fairseq')!r}))
        import slam_fairseq  # noqa: F401
        after = results()
        assert before[0].shape == (3, 80) and np.all(before[0] == 7.0), before[0]
        assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
        assert before[2] == after[2] and np.all(after[1] == 0.5)  # the stand-in sox effects ran
        print("unchanged")
    """, extra_path=tmp_path)
    assert output.strip().endswith("unchanged")


def test_another_fairseq_series_is_refused_with_a_clear_message():
    from slam_fairseq.compat import UnsupportedFairseqError, check_fairseq_version

    check_fairseq_version("0.12.2")
    check_fairseq_version("0.12.3")
    with pytest.raises(UnsupportedFairseqError, match=r"written for fairseq 0\.12\.x .* fairseq 0\.13\.0"):
        check_fairseq_version("0.13.0")


def test_the_0_12_2_release_is_refused_by_what_it_lacks():
    """PyPI's fairseq 0.12.2: FairseqTask.build_criterion(self, cfg) and an EpochBatchIterator
    without persistent_workers (the plugin's task passes both: a TypeError at setup)."""
    from slam_fairseq.compat import missing_fairseq_internals

    assert missing_fairseq_internals() == []  # the installed 0.12.3 build

    class Task0122:
        def build_criterion(self, cfg):
            pass

    class Iterator0122:
        def __init__(self, dataset, collate_fn, batch_sampler, seed=1, num_shards=1, shard_id=0,
                     num_workers=0, epoch=1, buffer_size=0, timeout=0, disable_shuffling=False,
                     skip_remainder_batch=False, grouped_shuffling=False, reuse_dataloader=False):
            pass

    assert missing_fairseq_internals(Task0122, Iterator0122) == [
        "FairseqTask.build_criterion(cfg, from_checkpoint)", "EpochBatchIterator(..., persistent_workers)"]
    output = _run_python("""
        import fairseq.tasks
        original = fairseq.tasks.FairseqTask.build_criterion
        fairseq.tasks.FairseqTask.build_criterion = lambda self, cfg: original(self, cfg)
        try:
            import slam_fairseq
        except ImportError as error:
            print(type(error).__name__, error)
    """)
    assert "UnsupportedFairseqError" in output and "lacks FairseqTask.build_criterion(cfg, from_checkpoint)" in output
    assert "the 0.12.2 release predates them" in output


def test_plugin_import_fails_clearly_under_another_fairseq(tmp_path):
    """The check runs at import: a fairseq that reports another version stops the plugin there."""
    output = _run_python("""
        import fairseq
        fairseq.__version__ = "1.0.0"
        try:
            import slam_fairseq  # noqa: F401
        except ImportError as error:
            print("refused:", error)
    """)
    assert "refused:" in output and "fairseq 1.0.0" in output and "scripts/install.sh" in output


def test_a_checkpoint_written_under_numpy_1_loads_weights_only_under_numpy_2_and_back():
    """NumPy scalars in logged meters are pickled under the module name of the NumPy that wrote
    them (numpy.core in 1.x, numpy._core in 2.x); both names are allow-listed."""
    import io
    import warnings

    import torch

    import slam_fairseq  # noqa: F401  (allow-lists the checkpoint types)

    buffer = io.BytesIO()
    torch.save({"meter": np.float64(1.5), "weight": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    written = buffer.getvalue()
    here = b"numpy._core.multiarray" if b"numpy._core.multiarray" in written else b"numpy.core.multiarray"
    for name in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            state = torch.load(io.BytesIO(written.replace(here, name)), weights_only=True)
        assert float(state["meter"]) == 1.5 and torch.equal(state["weight"], torch.ones(2))
