"""fairseq S2T data configs (``config.yaml``, ``config_<task>.yaml``), as fairseq's recipes write them.

Same keys as ``examples/speech_to_text/data_utils.gen_config_yaml`` so that fairseq's own
``speech_to_text`` task reads them: ``input_channels``, ``input_feat_per_channel``,
``vocab_filename``, ``bpe_tokenizer: {bpe: sentencepiece, sentencepiece_model}``, ``specaugment``
(LB policy by default), ``transforms`` (``_train``: cmvn + specaugment, ``*``: cmvn),
``global_cmvn: {stats_npz_path}``, ``prepend_tgt_lang_tag``. File names are written relative to the
data directory (fairseq resolves them against the config's directory); ``audio_root`` is the data
directory's absolute path, because fairseq resolves manifest ``audio`` paths against it (relative
to the working directory when empty). With the plugin imported a copied or moved data directory
still reads its own files (``slam_fairseq.compat.data_config_paths``).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import yaml

from manifests.core import UsageError
from slam_formats.atomic import atomic_write_text

logger = logging.getLogger(__name__)

#: config.yaml key: {manifest script: the filterbank settings of the features it wrote}
FEATURE_SETTINGS_KEY = "feature_settings"

# fairseq's S2TDataConfigWriter.set_specaugment_*_policy
SPECAUGMENT_POLICIES = {
    "lb": dict(time_wrap_W=0, freq_mask_N=1, freq_mask_F=27, time_mask_N=1, time_mask_T=100, time_mask_p=1.0),
    "ld": dict(time_wrap_W=0, freq_mask_N=2, freq_mask_F=27, time_mask_N=2, time_mask_T=100, time_mask_p=1.0),
    "sm": dict(time_wrap_W=0, freq_mask_N=2, freq_mask_F=15, time_mask_N=2, time_mask_T=70, time_mask_p=0.2),
    "ss": dict(time_wrap_W=0, freq_mask_N=2, freq_mask_F=27, time_mask_N=2, time_mask_T=70, time_mask_p=0.2),
}


def speech_config(out_dir, cmvn: str = "utterance", gcmvn_name: Optional[str] = None,
                  specaugment_policy: Optional[str] = None, num_mel_bins: int = 80) -> Dict[str, Any]:
    """The speech part of a config: feature size, audio root, CMVN and SpecAugment transforms."""
    if cmvn not in ("utterance", "global"):
        raise UsageError(f"cmvn {cmvn!r}: expected utterance or global")
    config: Dict[str, Any] = {"input_channels": 1, "input_feat_per_channel": num_mel_bins,
                              "audio_root": str(Path(out_dir).resolve())}
    transforms = {"*": [f"{cmvn}_cmvn"]}
    if specaugment_policy is not None:
        config["specaugment"] = dict(SPECAUGMENT_POLICIES[specaugment_policy])
        transforms["_train"] = [f"{cmvn}_cmvn", "specaugment"]
    config["transforms"] = transforms
    if cmvn == "global":
        if gcmvn_name is None:
            raise UsageError("global CMVN needs a stats file")
        config["global_cmvn"] = {"stats_npz_path": gcmvn_name}
    return config


def vocabulary_config(spm_model_name: str, dictionary_name: str,
                      prepend_tgt_lang_tag: bool = False) -> Dict[str, Any]:
    """The text part of a config: fairseq dictionary and SentencePiece model (names in the data dir)."""
    config: Dict[str, Any] = {"vocab_filename": dictionary_name,
                              "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": spm_model_name}}
    if prepend_tgt_lang_tag:
        config["prepend_tgt_lang_tag"] = True
    return config


def write_config(path, config: Dict[str, Any]) -> Path:
    """Write a config atomically (replacing the file)."""
    atomic_write_text(str(path), yaml.safe_dump(config, sort_keys=True))
    return Path(path)


@contextlib.contextmanager
def _config_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s hidden lock file (``.config.yaml.lock``): scripts run at
    the same time on one data directory read and rewrite ``config.yaml`` one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        try:
            import fcntl
        except ImportError:  # no flock here (Windows): unlocked, as before
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _merge_unlocked(path: Path, updates: Dict[str, Any]) -> Path:
    config: Dict[str, Any] = {}
    if path.is_file():
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    config.update(updates)
    return write_config(path, config)


def merge_config(path, updates: Dict[str, Any]) -> Path:
    """Update some keys of a config, keeping the others (several scripts fill ``config.yaml``:
    ``prep_text`` the vocabulary, the speech scripts the feature keys), under a lock."""
    path = Path(path)
    with _config_lock(path):
        return _merge_unlocked(path, updates)


def check_feature_settings(path, script: str, settings: Dict[str, Any]) -> None:
    """Refuse, before any feature is computed, filterbank ``settings`` (e.g. ``mel_high_freq``)
    other than those another manifest script recorded in ``config.yaml`` (:func:`merge_speech_keys`):
    the speech manifests of one data directory feed one model, which must see one kind of frames.
    The same script run again may change them (its manifests are rewritten)."""
    path = Path(path)
    if not path.is_file():
        return
    recorded = read_config(path).get(FEATURE_SETTINGS_KEY) or {}
    for other, values in recorded.items():
        differing = [f"{key} {values[key]!r} there, {value!r} here" for key, value in settings.items()
                     if other != script and key in values and values[key] != value]
        if differing:
            raise UsageError(f"{path}: {other}'s manifests in this data directory were made with other filterbank "
                             f"settings ({'; '.join(differing)}; --mel-high-freq 0 is the full band). One model reads "
                             f"all of them: run this script with the same settings, or write into another --out")


def merge_speech_keys(path, out_dir, cmvn: str, gcmvn_name: Optional[str] = None, script: Optional[str] = None,
                      settings: Optional[Dict[str, Any]] = None, own_gcmvn_name: Optional[str] = None) -> str:
    """Merge the speech keys into the SLAM data config (``config.yaml``), which several scripts fill.

    ``--cmvn global`` sets ``global_cmvn`` (and ``transforms``) to this run's statistics, with a
    WARNING when it replaces another script's; ``--cmvn utterance`` keeps a ``global_cmvn`` another
    script (e.g. ``prep_librilight``) put there, so that running the scripts in any order does not
    drop it, but removes this script's own (``own_gcmvn_name``, from an earlier ``--cmvn global``
    run of it): the run asked for utterance CMVN. ``script``'s filterbank ``settings`` are recorded under ``feature_settings``
    (:func:`check_feature_settings`, checked again here, under the lock: a script started beside
    this one may have recorded others meanwhile). Returns a line for the summary.
    """
    path = Path(path)
    with _config_lock(path):
        if script is not None and settings is not None:
            check_feature_settings(path, script, settings)
        return _merge_speech_keys_unlocked(path, out_dir, cmvn, gcmvn_name, script, settings, own_gcmvn_name)


def _merge_speech_keys_unlocked(path: Path, out_dir, cmvn: str, gcmvn_name: Optional[str], script: Optional[str],
                                settings: Optional[Dict[str, Any]], own_gcmvn_name: Optional[str]) -> str:
    existing = read_config(path) if path.is_file() else {}
    updates = speech_config(out_dir, cmvn, gcmvn_name)
    if script is not None and settings is not None:
        updates[FEATURE_SETTINGS_KEY] = {**(existing.get(FEATURE_SETTINGS_KEY) or {}), script: dict(settings)}
    earlier = (existing.get("global_cmvn") or {}).get("stats_npz_path")
    if cmvn == "utterance" and earlier is not None and earlier == own_gcmvn_name:
        write_config(path, {**{key: value for key, value in existing.items() if key != "global_cmvn"}, **updates})
        return f"{path.name} (speech keys; this script's earlier global_cmvn {earlier} removed: utterance CMVN)"
    if cmvn == "utterance" and existing.get("global_cmvn"):
        updates.pop("transforms")
        _merge_unlocked(path, updates)
        return f"{path.name} (speech keys; global_cmvn {existing['global_cmvn']} kept)"
    _merge_unlocked(path, updates)
    before = (existing.get("global_cmvn") or {}).get("stats_npz_path")
    if cmvn == "global" and before and before != gcmvn_name:
        line = (f"{path.name} (speech keys; global_cmvn {before} replaced by {gcmvn_name}, the statistics of this "
                f"script's training split only: every speech manifest of the directory is normalised with them)")
        logger.warning(line)
        return line
    return f"{path.name} (speech keys)"


def read_config(path) -> Dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
