"""fairseq's S2T data config (``config_asr.yaml``, ``config_st.yaml``) found where the config is.

fairseq 0.12 resolves two paths of an S2T config against the working directory, not the config's
directory, so a data directory only works from where it was written:

- ``audio_root``, which manifest ``audio`` paths are joined to. The manifest scripts write the
  data directory's absolute path there; after the directory is copied or moved, fairseq reads the
  features from the old place (if it still exists: silently) or fails with FileNotFoundError;
- ``global_cmvn: {stats_npz_path: ...}`` as the feature transform reads it (a relative name
  fails unless the run starts in the data directory).

:func:`install_data_config_paths` makes :class:`S2TDataConfig` (and the speech-to-speech config,
which inherits it) find them from the config's directory where fairseq's own reading would miss:

- a relative ``audio_root`` is read as written where it exists from the working directory, else
  from the config's directory (an empty one stays empty: absolute manifest paths, as fairseq's own
  recipes write them);
- an absolute ``audio_root`` that is not the config's directory is replaced by the config's
  directory when it no longer exists, or when both it and the config's directory hold the
  manifest scripts' ``fbank/`` folder (the config belongs to a copy), with a WARNING naming both,
  once per process; otherwise it is used as written (features kept elsewhere on purpose; a parent
  of the data directory). ``SLAM_FAIRSEQ_KEEP_AUDIO_ROOT=1`` keeps it as written in every case;
- a relative ``stats_npz_path`` is read from the config's directory when it is there.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Set

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_data_config_paths", "FEATURE_FOLDER", "KEEP_AUDIO_ROOT_VARIABLE"]

logger = logging.getLogger(__name__)

FEATURE_FOLDER = "fbank"  # what the manifest scripts write the shard zips into, beside the config
KEEP_AUDIO_ROOT_VARIABLE = "SLAM_FAIRSEQ_KEEP_AUDIO_ROOT"
_WARNED: Set[str] = set()


def _audio_root(config) -> str:
    """What manifest ``audio`` paths are joined to (module docstring)."""
    written = config.config.get("audio_root", "")
    if not written or os.environ.get(KEEP_AUDIO_ROOT_VARIABLE, "") not in ("", "0"):
        return written
    root = Path(written)
    here = Path(config.root).resolve()
    if not root.is_absolute():
        return written if root.exists() or not (here / root).exists() else str(here / root)
    if root.resolve() == here:
        return written
    copied = (here / FEATURE_FOLDER).is_dir() and (root / FEATURE_FOLDER).is_dir()
    if root.exists() and not copied:
        return written
    key = f"{here}|{root}"
    if key not in _WARNED:
        _WARNED.add(key)
        reason = ("that directory does not exist" if not root.exists() else
                  f"both hold the manifest scripts' {FEATURE_FOLDER}/ (this config belongs to a copy)")
        logger.warning(f"{here}: the data config's audio_root is {root}, not its own directory, and {reason}: "
                       f"reading the manifests' audio from {here}. Write this directory as audio_root to silence "
                       f"this, or set {KEEP_AUDIO_ROOT_VARIABLE}=1 to read from audio_root as written")
    return str(here)


def _with_resolved_cmvn_stats(get_feature_transforms):
    def get_feature_transforms_here(self, split, is_train):
        cfg = get_feature_transforms(self, split, is_train)
        cmvn = cfg.get("global_cmvn")
        stats = cmvn.get("stats_npz_path") if isinstance(cmvn, dict) else None
        if isinstance(stats, str) and not Path(stats).is_absolute() and (Path(self.root) / stats).is_file():
            cmvn["stats_npz_path"] = str(Path(self.root) / stats)
        return cfg

    get_feature_transforms_here.__doc__ = get_feature_transforms.__doc__
    return get_feature_transforms_here


def install_data_config_paths() -> bool:
    """Patch :class:`fairseq.data.audio.data_cfg.S2TDataConfig` as the module docstring says.
    Idempotent; returns True when it patched, False when it had been installed already."""
    from fairseq.data.audio.data_cfg import S2TDataConfig

    wrapped = wrap_once(S2TDataConfig, "audio_root", lambda fairseq_audio_root: property(_audio_root))
    return wrap_once(S2TDataConfig, "get_feature_transforms", _with_resolved_cmvn_stats) or wrapped
