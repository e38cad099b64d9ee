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

:func:`resolve_training_normalization` also names the files that decided it (the config, the
statistics), so that outputs made with it can tell when they change. :func:`named_feature_transform`
gives one by name instead, for data prepared elsewhere.

The same data directory's ``config.yaml`` records the filterbank the manifest scripts computed
(``feature_settings``: ``{script: {mel_high_freq: HZ}}``, ``--mel-high-freq``); audio read for the
encoder must get the same band (:func:`training_mel_high_freq`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq.utils import safe_getattr

from slam_fairseq.compat.fairseq_internals import resolved_option
from slam_fairseq.encoders.config import SlamEncoderConfig, config_from
from slam_fairseq.encoders.layer_states import num_encoder_layers
from slam_fairseq.encoders.slam_encoder import SlamEncoder
from slam_formats.features import check_high_freq
from slam_formats.names import DATA_CONFIG_NAME

__all__ = ["CheckpointEncoder", "CheckpointError", "load_checkpoint_encoder", "training_feature_transform",
           "resolve_training_normalization", "TrainingNormalization", "training_mel_high_freq",
           "named_feature_transform", "NORMALIZATIONS"]

FeatureTransform = Callable[[np.ndarray], np.ndarray]  # (T, F) float32 -> (T, F) float32
NORMALIZATIONS = ("checkpoint", "utterance", "global", "none")
_ENCODER_PREFIXES = ("encoder.speech_encoder.", "encoder.multimodal_encoder.")
FEATURE_SETTINGS_KEY = "feature_settings"  # config.yaml: {manifest script: its filterbank settings}
_HINT = ("pass --data DIR (the run's data directory: its config and CMVN statistics) or name the "
         "normalisation with --normalization utterance|global|none")


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


@dataclass
class TrainingNormalization:
    """transform: (T, F) -> (T, F); description: for logs and summaries; files: those whose content
    decided the normalisation (data config, CMVN statistics), for the identity of what is made with it."""

    transform: FeatureTransform
    description: str
    files: List[Path] = field(default_factory=list)


def training_feature_transform(loaded: CheckpointEncoder, data: Optional[str] = None,
                               split: str = "test") -> Tuple[FeatureTransform, str]:
    """The normalisation the checkpoint's run applied (module docstring), read from its data
    directory, or from ``data`` when given (the checkpoint moved to another machine).
    Returns (transform, description)."""
    resolved = resolve_training_normalization(loaded, data, split)
    return resolved.transform, resolved.description


def data_directory(loaded: CheckpointEncoder, data: Optional[str] = None) -> Optional[str]:
    """The run's data directory: ``data`` when given, else the one the checkpoint names."""
    return data or resolved_option(safe_getattr(loaded.task, "data", None))


def resolve_training_normalization(loaded: CheckpointEncoder, data: Optional[str] = None,
                                   split: str = "test") -> TrainingNormalization:
    """:func:`training_feature_transform` with the files it was read from."""
    data_dir = data_directory(loaded, data)
    task_name = str(safe_getattr(loaded.task, "_name", None) or safe_getattr(loaded.task, "task", "") or "")
    if task_name == "slam_pretraining":
        return _pretraining_normalization(loaded, data_dir)
    config_yaml = resolved_option(safe_getattr(loaded.task, "config_yaml", None))
    if config_yaml is None:
        raise CheckpointError(f"{loaded.path}: task {task_name or '?'} has neither slam_pretraining's data config "
                              f"nor speech_to_text's --config-yaml; {_HINT}")
    if not data_dir:
        raise CheckpointError(f"{loaded.path}: the checkpoint names no data directory; {_HINT}")
    return _speech_to_text_transform(Path(data_dir) / config_yaml, split, loaded.path, _HINT)


def _pretraining_normalization(loaded: CheckpointEncoder, data_dir: Optional[str]) -> TrainingNormalization:
    """A ``slam_pretraining`` run's ``--feature-normalization`` over its ``DATA/config.yaml``."""
    from slam_fairseq.data.pretraining.config import DataConfigError, PretrainingDataConfig

    mode = str(safe_getattr(loaded.task, "feature_normalization", "auto"))
    if mode in ("utterance", "none"):
        return TrainingNormalization(*named_feature_transform(mode, feature_dim=loaded.feature_dim))
    if not data_dir:
        raise CheckpointError(f"{loaded.path}: the checkpoint names no data directory; {_HINT}")
    try:
        config = PretrainingDataConfig(str(data_dir), mode)
        transform, description = config.feature_transform, config.describe_normalization() + f" ({config.path})"
    except DataConfigError as error:
        raise CheckpointError(f"{loaded.path} was trained with the data in {data_dir}: {error}; {_HINT}") from error
    statistics = [config.global_cmvn_path] if config.resolved_feature_normalization == "global" else []
    return TrainingNormalization(transform, description, [config.path, *statistics])


def training_mel_high_freq(loaded: CheckpointEncoder,
                           data: Optional[str] = None) -> Tuple[Optional[float], Optional[Path]]:
    """(upper edge of the Mel filterbank in Hz, the config it was read from) that the manifest
    scripts recorded for the run's data (module docstring); (None, config) when the config records
    none, (None, None) when there is no data config to read. Raises :class:`CheckpointError` for a
    config that cannot be read or that records different bands for different scripts."""
    data_dir = data_directory(loaded, data)
    path = Path(data_dir) / DATA_CONFIG_NAME if data_dir else None
    if path is None or not path.is_file():
        return None, None
    recorded = _recorded_mel_high_freqs(path)
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{script} {value:g}" for script, value in sorted(recorded.items()))
        raise CheckpointError(f"{path}: {FEATURE_SETTINGS_KEY} records different Mel filterbank bands ({listed} Hz); "
                              "name the band the checkpoint was trained with: --mel-high-freq HZ")
    if not recorded:
        return None, path
    band = next(iter(recorded.values()))
    try:
        return check_high_freq(band), path
    except ValueError as error:
        raise CheckpointError(f"{path}: {FEATURE_SETTINGS_KEY}: {error}") from None


def _recorded_mel_high_freqs(path: Path) -> Dict[str, float]:
    """{manifest script: its ``mel_high_freq``} of a data config's ``feature_settings``."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        settings = config.get(FEATURE_SETTINGS_KEY) or {}
        return {str(script): float(values["mel_high_freq"]) for script, values in settings.items()
                if isinstance(values, dict) and values.get("mel_high_freq") is not None}
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path}: cannot read its {FEATURE_SETTINGS_KEY} ({error})") from error


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


def _speech_to_text_transform(config_path: Path, split: str, checkpoint: Path, hint: str) -> TrainingNormalization:
    """The evaluation feature transforms of an S2T config for ``split`` (fairseq's choice of the
    split's own, ``_eval`` or ``*`` entry), without random ones; its files are the config and the
    statistics a kept transform read."""
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
        return TrainingNormalization(no_normalization, f"no feature normalisation (no evaluation transforms in "
                                                       f"{config_path}){left_out}", [config_path])
    composite.transforms = kept
    names = " + ".join(type(transform).__name__ for transform in kept)
    statistics = [Path(transform.stats_npz_path) for transform in kept
                  if getattr(transform, "stats_npz_path", None)]
    return TrainingNormalization(_FairseqFeatureTransforms(composite), f"{names} from {config_path}{left_out}",
                                 [config_path, *statistics])
