"""Everything slam_fairseq does with fairseq's and OmegaConf's internals, in one place.

Written for fairseq 0.12 as its main branch holds it after the 0.12.2 release (the ``ve-fairseq`` /
``fairseq-fixed`` 0.12.3 builds, or fairseq from source) with OmegaConf 2.x; importing the plugin
under another fairseq (another series, or the 0.12.2 release, which lacks internals the plugin
calls: :func:`missing_fairseq_internals`) fails here, at import, with a clear message, rather than
somewhere in the middle of a run. What it holds:

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


def missing_fairseq_internals(task_class=None, iterator_class=None) -> list:
    """What the installed fairseq lacks of the 0.12 internals the plugin calls (empty: none).

    The 0.12.2 release (PyPI ``fairseq==0.12.2``) predates fairseq's own later 0.12 changes that
    the plugin builds on, which the 0.12.3 builds (``ve-fairseq``, fairseq's main branch) hold:
    ``FairseqTask.build_criterion(cfg, from_checkpoint)`` and ``EpochBatchIterator``'s
    ``persistent_workers``; the classes are parameters so that a test can hand others in."""
    import inspect

    if task_class is None or iterator_class is None:
        from fairseq.data.iterators import EpochBatchIterator
        from fairseq.tasks import FairseqTask

        task_class, iterator_class = task_class or FairseqTask, iterator_class or EpochBatchIterator
    wanted = ((task_class.build_criterion, "from_checkpoint", "FairseqTask.build_criterion(cfg, from_checkpoint)"),
              (iterator_class.__init__, "persistent_workers", "EpochBatchIterator(..., persistent_workers)"))
    return [what for function, parameter, what in wanted
            if parameter not in inspect.signature(function).parameters]


def check_fairseq_internals(version: str) -> None:
    """Raise :class:`UnsupportedFairseqError` when :func:`missing_fairseq_internals` names any."""
    missing = missing_fairseq_internals()
    if missing:
        raise UnsupportedFairseqError(
            f"this fairseq {version} lacks {'; '.join(missing)}, which slam_fairseq relies on: the 0.12.2 "
            "release predates them. Install a 0.12.3 build: scripts/install.sh (ve-fairseq 0.12.3 on CPython "
            "3.11/3.12), or fairseq's main branch from source (pip install --no-deps "
            "git+https://github.com/facebookresearch/fairseq)")


check_fairseq_version(_installed_fairseq_version())
check_fairseq_internals(_installed_fairseq_version())

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
