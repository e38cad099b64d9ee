"""The SLAM encoder of a checkpoint, and the feature normalisation it was trained with.

Works for both kinds of checkpoint: ``slam`` (pre-training, ``--task slam_pretraining``) and
``slam_s2t`` (fine-tuned, fairseq's ``speech_to_text`` or ``slam_speech_to_text``). Both keep the
encoder under ``encoder.speech_encoder.*`` and ``encoder.multimodal_encoder.*``; the encoder is
built from the checkpoint's own sizes, without its task's data, so a checkpoint copied to another
machine still loads.

The encoder only gives the states it was trained to give if its log-Mel frames are normalised as
in training. :func:`training_feature_transform` rebuilds that normalisation from the data
directory the checkpoint names (or one given instead):

- ``slam``: ``--feature-normalization`` of the run over ``DATA/config.yaml`` (global CMVN when the
  config names statistics, else per utterance; see ``PretrainingDataConfig``);
- ``slam_s2t``: the evaluation feature transforms of the run's ``--config-yaml`` (fairseq's
  ``_eval`` or ``*`` entry: ``utterance_cmvn``, ``global_cmvn``), SpecAugment never.

:func:`named_feature_transform` gives one by name instead, for data prepared elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from fairseq.utils import safe_getattr

from slam_fairseq.compat.fairseq_internals import resolved_option
from slam_fairseq.encoders.config import SlamEncoderConfig, config_from
from slam_fairseq.encoders.layer_states import num_encoder_layers
from slam_fairseq.encoders.slam_encoder import SlamEncoder

__all__ = ["CheckpointEncoder", "CheckpointError", "load_checkpoint_encoder", "training_feature_transform",
           "named_feature_transform", "NORMALIZATIONS"]

FeatureTransform = Callable[[np.ndarray], np.ndarray]  # (T, F) float32 -> (T, F) float32
NORMALIZATIONS = ("checkpoint", "utterance", "global", "none")
_ENCODER_PREFIXES = ("encoder.speech_encoder.", "encoder.multimodal_encoder.")


class CheckpointError(ValueError):
    """A checkpoint (or the data it names) that cannot give a SLAM encoder; the message names the file."""


@dataclass
class CheckpointEncoder:
    """path: the checkpoint; encoder: its SLAM encoder (eval mode, on the CPU); model: the
    registered model name (``slam``, ``slam_s2t``); task: the run's task config; feature_dim: the
    log-Mel bins the encoder reads."""

    path: Path
    encoder: SlamEncoder
    model: str
    task: Any
    feature_dim: int

    @property
    def num_layers(self) -> int:
        """N + M, the number of the encoder's last layer (its output)."""
        return num_encoder_layers(self.encoder.speech_encoder, self.encoder.multimodal_encoder)


def _run_configs(state: dict, path: Path) -> Tuple[Any, Any]:
    """(model config, task config) of a checkpoint: fairseq's ``cfg`` or an old ``args``."""
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        return cfg["model"], cfg.get("task")
    if state.get("args") is not None:
        return state["args"], state["args"]
    raise CheckpointError(f"{path}: no model config in the checkpoint (neither 'cfg' nor 'args')")


def load_checkpoint_encoder(path: str, pretrained: bool = True, seed: int = 1) -> CheckpointEncoder:
    """The SLAM encoder of a ``slam`` or ``slam_s2t`` checkpoint, in eval mode; with
    ``pretrained=False`` the same shape freshly initialised (``seed``), a baseline for probes."""
    from fairseq import checkpoint_utils

    import slam_fairseq  # noqa: F401  (registers the models and allow-lists the checkpoint's types)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except Exception as error:  # a truncated or foreign file: torch and pickle raise many kinds
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error})") from error
    model_cfg, task_cfg = _run_configs(state, path)
    weights = {key[len("encoder."):]: value for key, value in state["model"].items()
               if key.startswith(_ENCODER_PREFIXES)}
    if not weights:
        raise CheckpointError(f"{path}: no encoder.speech_encoder.* weights: not a slam or slam_s2t checkpoint")
    encoder_cfg = config_from(model_cfg, SlamEncoderConfig)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        encoder = SlamEncoder(encoder_cfg, vocab_size=8, padding_idx=1)
    if pretrained:
        result = encoder.load_state_dict(weights, strict=False)
        missing = [key for key in result.missing_keys if not key.startswith("text_encoder.")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path}: the encoder weights do not match the sizes in its config (missing "
                                  f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    model_name = str(safe_getattr(model_cfg, "_name", None) or safe_getattr(model_cfg, "arch", "") or "")
    return CheckpointEncoder(path, encoder.eval(), model_name, task_cfg, int(encoder_cfg.input_feat_per_channel))


def named_feature_transform(name: str, global_cmvn: Optional[str] = None,
                            feature_dim: int = 80) -> Tuple[FeatureTransform, str]:
    """A normalisation by name: ``utterance`` (each utterance to zero mean, unit variance),
    ``global`` (the ``mean`` and ``std`` of the ``.npz`` ``global_cmvn``, ``feature_dim`` wide) or
    ``none``. Returns (transform, description)."""
    from slam_fairseq.data.pretraining.config import DataConfigError, GlobalCMVN, no_normalization, utterance_cmvn

    if name == "utterance":
        return utterance_cmvn, "utterance-level mean/variance normalisation"
    if name == "none":
        return no_normalization, "no feature normalisation"
    if name == "global":
        if not global_cmvn:
            raise CheckpointError("--normalization global needs --global-cmvn STATS.npz (with 'mean' and 'std')")
        stats = Path(global_cmvn)
        if not stats.is_file():
            raise CheckpointError(f"{stats}: no such CMVN statistics file")
        try:
            return GlobalCMVN(stats, feature_dim), f"global CMVN from {stats}"
        except DataConfigError as error:
            raise CheckpointError(f"{error} (the encoder reads {feature_dim} log-Mel bins)") from error
    raise CheckpointError(f"unknown normalisation {name!r}: one of {NORMALIZATIONS}")


def training_feature_transform(loaded: CheckpointEncoder, data: Optional[str] = None,
                               split: str = "test") -> Tuple[FeatureTransform, str]:
    """The normalisation the checkpoint's run applied (module docstring), read from its data
    directory, or from ``data`` when given (the checkpoint moved to another machine).
    Returns (transform, description)."""
    data_dir = data or resolved_option(safe_getattr(loaded.task, "data", None))
    task_name = str(safe_getattr(loaded.task, "_name", None) or safe_getattr(loaded.task, "task", "") or "")
    hint = ("pass --data DIR (the run's data directory: its config and CMVN statistics) or name the "
            "normalisation with --normalization utterance|global|none")
    if task_name == "slam_pretraining":
        from slam_fairseq.data.pretraining.config import DataConfigError, PretrainingDataConfig

        mode = str(safe_getattr(loaded.task, "feature_normalization", "auto"))
        if mode in ("utterance", "none"):
            return named_feature_transform(mode, feature_dim=loaded.feature_dim)
        if not data_dir:
            raise CheckpointError(f"{loaded.path}: the checkpoint names no data directory; {hint}")
        try:
            config = PretrainingDataConfig(str(data_dir), mode)
            return config.feature_transform, config.describe_normalization() + f" ({config.path})"
        except DataConfigError as error:
            raise CheckpointError(f"{loaded.path} was trained with the data in {data_dir}: {error}; {hint}") from error
    config_yaml = resolved_option(safe_getattr(loaded.task, "config_yaml", None))
    if config_yaml is None:
        raise CheckpointError(f"{loaded.path}: task {task_name or '?'} has neither slam_pretraining's data config "
                              f"nor speech_to_text's --config-yaml; {hint}")
    if not data_dir:
        raise CheckpointError(f"{loaded.path}: the checkpoint names no data directory; {hint}")
    return _speech_to_text_transform(Path(data_dir) / config_yaml, split, loaded.path, hint)


class _FairseqFeatureTransforms:
    """fairseq's composite feature transform as a picklable (T, F) -> (T, F) float32 function."""

    def __init__(self, composite) -> None:
        self.composite = composite

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.composite(features), dtype=np.float32)


def _is_random(transform) -> bool:
    """Whether a fairseq feature transform draws at random (SpecAugment, noise): never for extraction."""
    name = type(transform).__name__
    return "Augment" in name or "Noise" in name


def _speech_to_text_transform(config_path: Path, split: str, checkpoint: Path,
                              hint: str) -> Tuple[FeatureTransform, str]:
    """The evaluation feature transforms of an S2T config for ``split`` (fairseq's choice of the
    split's own, ``_eval`` or ``*`` entry), without random ones. Returns (transform, description)."""
    from fairseq.data.audio.data_cfg import S2TDataConfig
    from fairseq.data.audio.feature_transforms import CompositeAudioFeatureTransform

    from slam_fairseq.data.pretraining.config import no_normalization

    if not config_path.is_file():
        raise CheckpointError(f"{checkpoint} was trained with the data config {config_path}, which is not there; "
                              f"{hint}")
    try:
        composite = CompositeAudioFeatureTransform.from_config_dict(
            S2TDataConfig(config_path).get_feature_transforms(split, False))
    except (OSError, KeyError, ValueError) as error:
        raise CheckpointError(f"{config_path}: cannot build its feature transforms ({error})") from error
    transforms = list(getattr(composite, "transforms", None) or [])
    dropped = [type(transform).__name__ for transform in transforms if _is_random(transform)]
    kept = [transform for transform in transforms if not _is_random(transform)]
    left_out = f" (left out: {', '.join(dropped)})" if dropped else ""
    if not kept:
        return no_normalization, f"no feature normalisation (no evaluation transforms in {config_path}){left_out}"
    composite.transforms = kept
    names = " + ".join(type(transform).__name__ for transform in kept)
    return _FairseqFeatureTransforms(composite), f"{names} from {config_path}{left_out}"
