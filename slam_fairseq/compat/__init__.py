"""Everything slam_fairseq does with fairseq's and OmegaConf's internals, in one place.

Written for fairseq 0.12 (0.12.2 from source, the ``ve-fairseq`` / ``fairseq-fixed`` 0.12.3 builds)
with OmegaConf 2.x; importing the plugin under another fairseq fails here, at import, with a clear
message, rather than somewhere in the middle of a run. What it holds:

- :mod:`~slam_fairseq.compat.checkpoints`: fairseq's checkpoint types allow-listed for PyTorch's
  weights-only loader (applied on import);
- :mod:`~slam_fairseq.compat.fbank`: on-the-fly filterbanks where fairseq has no backend
  (applied on import; stock fairseq paths with a working backend are unchanged);
- :mod:`~slam_fairseq.compat.cut_audio`: a WARNING naming a WAV cut short that fairseq reads
  (applied on import; fairseq reads it as before);
- :mod:`~slam_fairseq.compat.data_config_paths`: an S2T data config's ``audio_root`` and global
  CMVN statistics found from the config's directory, so a copied or moved data directory works
  (applied on import);
- :mod:`~slam_fairseq.compat.evaluation_batches`: every utterance of an evaluation split batched
  (fairseq drops the last batch under ``--required-batch-size-multiple``; applied on import);
- :mod:`~slam_fairseq.compat.finished_runs`: a finished ``fairseq-train`` command run again exits
  before training (fairseq trains one more update and rewrites the checkpoint; applied on import);
- :mod:`~slam_fairseq.compat.training_split_validation`: ``--valid-subset valid,train`` validates
  on the training split without moving the training iterator, and ``fairseq-generate`` /
  ``fairseq-validate`` read a training split as an evaluation split (applied on import);
- :mod:`~slam_fairseq.compat.augmentation_seeds`: SpecAugment and fairseq's other training-time
  augmentations drawn per example from (``--seed``, epoch, index), so that a resumed fine-tuning
  run, and any ``--num-workers``, draws the masks of an uninterrupted run (applied on import);
- :mod:`~slam_fairseq.compat.fairseq_internals`: the few private attributes of fairseq's config
  nodes, dataclasses, iterators and checkpoint rules that the plugin relies on.
"""
from __future__ import annotations

SUPPORTED_FAIRSEQ_SERIES = "0.12"


class UnsupportedFairseqError(ImportError):
    """The installed fairseq is not the series this plugin was written for."""


def check_fairseq_version(version: str) -> None:
    """Raise :class:`UnsupportedFairseqError` unless ``version`` is a fairseq 0.12 release."""
    series = ".".join(str(version).split(".")[:2])
    if series != SUPPORTED_FAIRSEQ_SERIES:
        raise UnsupportedFairseqError(
            f"slam_fairseq was written for fairseq {SUPPORTED_FAIRSEQ_SERIES}.x and relies on its "
            f"internals (see slam_fairseq/compat/); this Python has fairseq {version}. Install a 0.12 "
            "build with scripts/install.sh (ve-fairseq 0.12.3 on Python 3.11/3.12).")


def _installed_fairseq_version() -> str:
    import fairseq

    return str(getattr(fairseq, "__version__", "unknown"))


check_fairseq_version(_installed_fairseq_version())

from slam_fairseq.compat.augmentation_seeds import install_augmentation_seeds  # noqa: E402
from slam_fairseq.compat.beam_size import install_beam_size_reset  # noqa: E402
from slam_fairseq.compat.checkpoints import allow_fairseq_checkpoint_types  # noqa: E402
from slam_fairseq.compat.cut_audio import install_cut_audio_warning  # noqa: E402
from slam_fairseq.compat.data_config_paths import install_data_config_paths  # noqa: E402
from slam_fairseq.compat.evaluation_batches import install_evaluation_batches  # noqa: E402
from slam_fairseq.compat.fairseq_internals import track_plateau_schedulers  # noqa: E402
from slam_fairseq.compat.fbank import install_fbank_backend  # noqa: E402
from slam_fairseq.compat.finished_runs import install_finished_run_check  # noqa: E402
from slam_fairseq.compat.training_split_validation import (  # noqa: E402
    install_checkpoint_evaluation_splits, install_training_split_validation)

allow_fairseq_checkpoint_types()
track_plateau_schedulers()
install_fbank_backend()
install_cut_audio_warning()
install_data_config_paths()
install_evaluation_batches()
install_finished_run_check()
install_training_split_validation()
install_checkpoint_evaluation_splits()
install_augmentation_seeds()
install_beam_size_reset()
