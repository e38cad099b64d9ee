"""Copy a pre-trained SLAM encoder (a ``slam`` checkpoint) into a fine-tuning model's encoder.

``--load-pretrained-slam-from CHECKPOINT`` of ``slam_s2t`` comes here. The checkpoint is read with
fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` (so PyTorch's weights-only loader applies,
with the types ``slam_fairseq.compat`` allow-lists). A ``slam`` model keeps its encoder under
``encoder.*`` (``encoder.speech_encoder.*``, ``encoder.multimodal_encoder.*``,
``encoder.text_encoder.*``) next to its pre-training heads; the fine-tuning encoder uses the same
names for the parts it keeps, so the copy is name for name, with shapes checked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PretrainedSlamError", "PretrainedLoadReport", "read_slam_checkpoint",
           "copy_pretrained_encoder", "load_pretrained_slam_encoder"]

CHECKPOINT_ENCODER_PREFIX = "encoder."
# fairseq model names whose checkpoints hold a SLAM encoder under ``encoder.*``.
SLAM_MODEL_NAMES = ("slam", "slam_s2t")
_REPORT_KEYS_SHOWN = 12


class PretrainedSlamError(ValueError):
    """A pre-trained checkpoint that cannot initialise the encoder; the message says why."""


@dataclass
class PretrainedLoadReport:
    """What :func:`copy_pretrained_encoder` did.

    loaded_keys: model keys (``encoder.``-prefixed) that received a checkpoint tensor.
    num_loaded_elements: total number of values copied.
    unused_checkpoint_keys: checkpoint keys not copied (text encoder, pre-training heads, ...).
    missing_model_keys: keys of the pre-trainable encoder parts absent from the checkpoint (they
        keep their fresh initialisation).
    extra_checkpoint_keys: checkpoint keys of those parts that the model lacks (another layer
        count); also listed in ``unused_checkpoint_keys``.
    mismatched_shapes: (key, checkpoint shape, model shape) of tensors not copied.
    """

    checkpoint: str
    architecture: Optional[str]  # the checkpoint's (slam_tiny, slam_paper, ...)
    loaded_keys: List[str] = field(default_factory=list)
    num_loaded_elements: int = 0
    unused_checkpoint_keys: List[str] = field(default_factory=list)
    missing_model_keys: List[str] = field(default_factory=list)
    extra_checkpoint_keys: List[str] = field(default_factory=list)
    mismatched_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def is_partial(self) -> bool:
        return bool(self.missing_model_keys or self.extra_checkpoint_keys or self.mismatched_shapes)

    def coverage_problems(self) -> str:
        """What keeps the checkpoint from covering the encoder exactly (empty when it does)."""
        problems = []
        if self.missing_model_keys:
            problems.append(f"model tensors missing from the checkpoint ({len(self.missing_model_keys)}): "
                            f"{_group_by_layer(self.missing_model_keys)}")
        if self.extra_checkpoint_keys:
            problems.append(f"checkpoint tensors the model lacks ({len(self.extra_checkpoint_keys)}): "
                            f"{_group_by_layer(self.extra_checkpoint_keys)}")
        if self.mismatched_shapes:
            shown = ", ".join(f"{key} has shape {source} in the checkpoint but {target} in the model"
                              for key, source, target in self.mismatched_shapes[:_REPORT_KEYS_SHOWN])
            more = len(self.mismatched_shapes) - _REPORT_KEYS_SHOWN
            problems.append(f"shape mismatches ({len(self.mismatched_shapes)}): {shown}"
                            + (f" and {more} more" if more > 0 else ""))
        return "; ".join(problems)

    def summary(self) -> str:
        lines = [f"pre-trained SLAM encoder from {self.checkpoint} ({self.architecture or 'unnamed architecture'}): "
                 f"loaded {len(self.loaded_keys)} tensors, {self.num_loaded_elements:,} parameters"]
        lines.append(f"  checkpoint keys not used ({len(self.unused_checkpoint_keys)}): "
                     f"{_group_keys(self.unused_checkpoint_keys)}")
        lines.append(f"  model keys not found in the checkpoint ({len(self.missing_model_keys)}): "
                     f"{_group_keys(self.missing_model_keys)}")
        return "\n".join(lines)


def _group_keys(keys: Sequence[str]) -> str:
    """Keys grouped by module: ``encoder.text_encoder.* (5)``, ``quantizer.* (3)``."""
    if not keys:
        return "none"
    groups: Dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == CHECKPOINT_ENCODER_PREFIX[:-1] else 1
        prefix = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
        groups[prefix] = groups.get(prefix, 0) + 1
    return _format_groups(groups)


def _format_groups(groups: Dict[str, int]) -> str:
    """``prefix (count)`` for the first groups, then how many more there are."""
    shown = [f"{prefix} ({count})" if count > 1 else prefix
             for prefix, count in list(groups.items())[:_REPORT_KEYS_SHOWN]]
    if len(groups) > _REPORT_KEYS_SHOWN:
        shown.append(f"... {len(groups) - _REPORT_KEYS_SHOWN} more groups")
    return ", ".join(shown)


def _group_by_layer(keys: Sequence[str]) -> str:
    """Keys grouped up to their first layer number: ``encoder.speech_encoder.conformer.layers.2.* (31)``."""
    groups: Dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        numbered = [index for index, part in enumerate(parts) if part.isdigit()]
        prefix = ".".join(parts[: numbered[0] + 1]) + ".*" if numbered else key
        groups[prefix] = groups.get(prefix, 0) + 1
    return _format_groups(groups)


def _arch_of(state: Mapping) -> Optional[str]:
    """The architecture a checkpoint was trained with (``slam_tiny``), from its cfg or legacy args."""
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        model_cfg = cfg["model"]
        arch = model_cfg.get("_name") if hasattr(model_cfg, "get") else getattr(model_cfg, "_name", None)
        return arch or getattr(model_cfg, "arch", None)
    if state.get("args") is not None:
        return getattr(state["args"], "arch", None)
    return None


def refuse_pretraining_checkpoint_for_finetune_from(path: str, option: str = "--finetune-from-model") -> None:
    """Raise :class:`PretrainedSlamError` when ``path``, given to ``option`` (``--finetune-from-model``,
    ``--restore-file``, ``--continue-once``: a whole model) for a ``slam_s2t`` model, is a ``slam``
    pre-training checkpoint: fairseq would load it as a whole model and fail on the missing decoder
    ("Cannot load model parameters"); the encoder is copied with ``--load-pretrained-slam-from``.
    The checkpoint is mapped, not read (only its config is looked at); one that cannot be opened so
    is left to fairseq."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a zip checkpoint, not allow-listed, missing: fairseq's own load says why
        return
    arch = _arch_of(state) if isinstance(state, Mapping) else None
    if arch is not None and ARCH_MODEL_NAME_REGISTRY.get(arch, arch) == "slam":
        raise PretrainedSlamError(
            f"{option} {path} is a slam pre-training checkpoint ({arch}); {option} "
            f"loads a whole slam_s2t model (encoder and decoder). Copy its encoder with "
            f"--load-pretrained-slam-from {path} instead")


#: encoder settings that no tensor shape shows (one fused query/key/value projection for any number
#: of heads; GroupNorm's affine size for any number of groups): compared with the checkpoint's config
SHAPELESS_ENCODER_SETTINGS = ("encoder_attention_heads", "conv_norm_groups")


def _encoder_settings_of(state: Mapping) -> Dict[str, Any]:
    """The :data:`SHAPELESS_ENCODER_SETTINGS` a checkpoint's model config records (those it has)."""
    cfg = state.get("cfg")
    model_cfg = cfg.get("model") if cfg is not None and hasattr(cfg, "get") else None
    if model_cfg is None:
        model_cfg = state.get("args")
    settings = {}
    for name in SHAPELESS_ENCODER_SETTINGS:
        value = model_cfg.get(name) if hasattr(model_cfg, "get") else getattr(model_cfg, name, None)
        if value is not None:
            settings[name] = value
    return settings


def _mapped_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """A zip-format checkpoint loaded memory-mapped (``torch.load(mmap=True)``), else None.

    Every rank builds the model and reads the pre-training checkpoint; loaded whole, each would hold
    all of it in memory, the optimizer's state included (for ``slam_paper`` several GB a rank). Mapped,
    only the encoder tensors that are copied are read from the file."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except TypeError:  # a torch without mmap loading
        return None


def read_slam_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str], Dict[str, Any]]:
    """Read a SLAM checkpoint with fairseq's loader.

    Returns:
        (the model state dict, its architecture (``slam_tiny``), or None when the checkpoint names none,
        its :data:`SHAPELESS_ENCODER_SETTINGS`).
    Raises:
        PretrainedSlamError: no such file, no model state, or not a SLAM model.
    """
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if not PathManager.exists(path):
        raise PretrainedSlamError(f"--load-pretrained-slam-from {path}: no such file")
    try:
        state = _mapped_checkpoint(PathManager.get_local_path(path))
        if state is None:  # PyTorch's legacy format: fairseq's loader
            state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as error:  # torch and pickle raise many types; each means "unreadable"
        raise PretrainedSlamError(f"--load-pretrained-slam-from {path}: cannot be read as a checkpoint "
                                  f"({type(error).__name__}: {str(error).strip()[:300]})") from error
    model_state = state.get("model")
    if not isinstance(model_state, Mapping) or not model_state:
        raise PretrainedSlamError(f"--load-pretrained-slam-from {path}: not a fairseq checkpoint "
                                  f"(no 'model' state; keys {sorted(state)})")
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    arch = _arch_of(state)
    model_name = ARCH_MODEL_NAME_REGISTRY.get(arch, arch) if arch is not None else None
    has_speech_encoder = any(key.startswith(CHECKPOINT_ENCODER_PREFIX + "speech_encoder.") for key in model_state)
    if (model_name is not None and model_name not in SLAM_MODEL_NAMES) or not has_speech_encoder:
        raise PretrainedSlamError(
            f"--load-pretrained-slam-from {path}: not a SLAM model checkpoint (architecture "
            f"{arch or 'unnamed'}; expected one of {list(SLAM_MODEL_NAMES)} with "
            f"'{CHECKPOINT_ENCODER_PREFIX}speech_encoder.*' weights, as slam_pretraining writes)")
    return dict(model_state), arch, _encoder_settings_of(state)


def copy_pretrained_encoder(encoder: nn.Module, checkpoint_state: Mapping[str, torch.Tensor],
                            pretrained_parts: Sequence[str], checkpoint: str = "<state>",
                            architecture: Optional[str] = None,
                            allow_partial: bool = False) -> PretrainedLoadReport:
    """Copy ``encoder.<part>.*`` tensors of a checkpoint into ``encoder``'s ``<part>.*``.

    Args:
        encoder: the fine-tuning encoder module (its state-dict keys lack the ``encoder.`` prefix).
        checkpoint_state: the checkpoint's model state dict (keys with the ``encoder.`` prefix).
        pretrained_parts: names of ``encoder``'s children that come from pre-training
            (``speech_encoder``, ``multimodal_encoder``); other children keep their initialisation
            and are not reported as missing.
        allow_partial: copy the tensors that match and report the rest, instead of refusing a
            checkpoint that does not cover those parts exactly.
    Raises:
        PretrainedSlamError: without ``allow_partial``, a tensor missing on either side or of
            another shape (the message names the file, the keys and both shapes); nothing is copied.
    """
    target_state = encoder.state_dict()
    report = PretrainedLoadReport(checkpoint=checkpoint, architecture=architecture)
    to_load: Dict[str, torch.Tensor] = {}
    for key, target in target_state.items():
        if key.split(".", 1)[0] not in pretrained_parts:
            continue
        checkpoint_key = CHECKPOINT_ENCODER_PREFIX + key
        if checkpoint_key not in checkpoint_state:
            report.missing_model_keys.append(checkpoint_key)
            continue
        source = checkpoint_state[checkpoint_key]
        if tuple(source.shape) != tuple(target.shape):
            report.mismatched_shapes.append((checkpoint_key, tuple(source.shape), tuple(target.shape)))
            continue
        to_load[key] = source
        report.loaded_keys.append(checkpoint_key)
        report.num_loaded_elements += source.numel()
    part_prefixes = tuple(f"{CHECKPOINT_ENCODER_PREFIX}{part}." for part in pretrained_parts)
    model_keys = {CHECKPOINT_ENCODER_PREFIX + key for key in target_state}
    report.extra_checkpoint_keys = [key for key in checkpoint_state
                                    if key.startswith(part_prefixes) and key not in model_keys]
    if report.is_partial and not allow_partial:
        raise PretrainedSlamError(
            f"--load-pretrained-slam-from {checkpoint}: the checkpoint (architecture "
            f"{architecture or 'unnamed'}) does not fit the encoder: {report.coverage_problems()}. Build "
            "the encoder with the sizes it was pre-trained with (--arch, --encoder-embed-dim, "
            "--speech-encoder-layers, ... of slam_s2t), or pass --allow-partial-pretrained-slam to copy "
            "the tensors that fit and keep the others randomly initialised")
    result = encoder.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    loaded = set(report.loaded_keys)
    report.unused_checkpoint_keys = [key for key in checkpoint_state if key not in loaded]
    return report


def load_pretrained_slam_encoder(encoder: nn.Module, path: str, pretrained_parts: Sequence[str],
                                 allow_partial: bool = False,
                                 settings: Optional[Mapping[str, Any]] = None) -> PretrainedLoadReport:
    """:func:`read_slam_checkpoint` + :func:`copy_pretrained_encoder`, with the report logged;
    a partial load (only with ``allow_partial``) is a WARNING listing what did not fit.

    ``settings``: the fine-tuning encoder's :data:`SHAPELESS_ENCODER_SETTINGS`; one the checkpoint
    recorded otherwise is an error (its weights would load, and be read as another model's)."""
    checkpoint_state, arch, recorded = read_slam_checkpoint(path)
    differing = {name: value for name, value in (settings or {}).items()
                 if name in recorded and recorded[name] != value}
    if differing:
        described = "; ".join(f"{name} {recorded[name]} there, {value} here" for name, value in differing.items())
        flags = " ".join(f"--{name.replace('_', '-')} {recorded[name]}" for name in differing)
        raise PretrainedSlamError(
            f"--load-pretrained-slam-from {path}: the checkpoint's encoder was built with other settings than this "
            f"one ({described}); its tensors would fit, and be read as another model's. Build the "
            f"encoder as it was pre-trained ({flags})")
    report = copy_pretrained_encoder(encoder, checkpoint_state, pretrained_parts, path, arch, allow_partial)
    logger.info(report.summary())
    if report.is_partial:
        logger.warning(f"--allow-partial-pretrained-slam: {path} covers the encoder only in part; the tensors "
                       f"that did not fit keep their random initialisation: {report.coverage_problems()}")
    return report
