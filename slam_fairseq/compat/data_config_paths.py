"""fairseq's S2T data config (``config_asr.yaml``, ``config_st.yaml``) found where the config is.

fairseq 0.12 resolves two paths of an S2T config against the working directory, not the config's
directory, so a data directory only works from where it was written:

- ``audio_root``, which manifest ``audio`` paths are joined to. The manifest scripts write the
  data directory's absolute path there; after the directory is copied or moved, fairseq reads the
  features from the old place (if it still exists: silently) or fails with FileNotFoundError;
- ``global_cmvn: {stats_npz_path: ...}`` as the feature transform reads it (a relative name
  fails unless the run starts in the data directory).

:func:`install_data_config_paths` makes :class:`S2TDataConfig` resolve them as the plugin's own
pre-training data does, with the config's directory:

- a relative ``audio_root`` is joined to the config's directory (an empty one stays empty:
  absolute manifest paths, as fairseq's own recipes write them);
- an absolute ``audio_root`` that is not the config's directory is replaced by the config's
  directory when that directory holds the manifest scripts' ``fbank/`` folder (a copied or moved
  data directory) or when it does not exist any more, with a WARNING naming both, once per
  process; otherwise (features kept elsewhere on purpose) it is used as written;
- a relative ``stats_npz_path`` is read from the config's directory when it is there.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Set

__all__ = ["install_data_config_paths", "FEATURE_FOLDER"]

logger = logging.getLogger(__name__)

FEATURE_FOLDER = "fbank"  # what the manifest scripts write the shard zips into, beside the config
_INSTALLED_MARK = "_slam_fairseq_data_config_paths"
_WARNED: Set[str] = set()


def _audio_root(config) -> str:
    written = config.config.get("audio_root", "")
    if not written:
        return written
    root = Path(written)
    here = Path(config.root).resolve()
    if not root.is_absolute():
        return str(here / root)
    if root.resolve() == here:
        return written
    moved = (here / FEATURE_FOLDER).is_dir()
    if not moved and root.exists():
        return written
    key = f"{here}|{root}"
    if key not in _WARNED:
        _WARNED.add(key)
        reason = (f"that directory does not exist" if not root.exists() else
                  f"this config's directory holds the manifest scripts' {FEATURE_FOLDER}/ (a copied or moved "
                  f"data directory)")
        logger.warning(f"{here}: the data config's audio_root is {root}, not its own directory, and {reason}: "
                       f"reading the manifests' audio from {here}. Set audio_root in the config to silence this")
    return str(here)


def _with_resolved_cmvn_stats(get_feature_transforms):
    def get_feature_transforms_here(self, split, is_train):
        cfg = get_feature_transforms(self, split, is_train)
        cmvn = cfg.get("global_cmvn")
        if isinstance(cmvn, dict) and isinstance(cmvn.get("stats_npz_path"), str):
            cmvn["stats_npz_path"] = self._auto_convert_to_abs_path(cmvn["stats_npz_path"])
        return cfg

    get_feature_transforms_here.__doc__ = get_feature_transforms.__doc__
    return get_feature_transforms_here


def install_data_config_paths() -> bool:
    """Patch :class:`fairseq.data.audio.data_cfg.S2TDataConfig` as the module docstring says.
    Idempotent; returns True when it patched, False when it had been installed already."""
    from fairseq.data.audio.data_cfg import S2TDataConfig

    if getattr(S2TDataConfig, _INSTALLED_MARK, False):
        return False
    S2TDataConfig.audio_root = property(_audio_root, doc=_audio_root.__doc__)
    S2TDataConfig.get_feature_transforms = _with_resolved_cmvn_stats(S2TDataConfig.get_feature_transforms)
    setattr(S2TDataConfig, _INSTALLED_MARK, True)
    return True
