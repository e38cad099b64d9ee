"""The data directory's ``config.yaml`` as ``slam_pretraining`` uses it.

It gives (see ``docs/data_formats.md``):

- ``vocab_filename``: the fairseq dictionary; the task adds ``<mask>`` at its end;
- ``bpe_tokenizer: {bpe: sentencepiece, sentencepiece_model: ...}``: the SentencePiece model that
  encodes ``text_<split>.txt`` and the transcripts of ``pair_<split>.tsv``;
- ``input_feat_per_channel``: feature dimension (80);
- ``global_cmvn: {stats_npz_path: ...}``: optional global mean/variance (an ``.npz`` with ``mean``
  and ``std``, fairseq's ``GlobalCMVN``).

Feature normalisation (``--feature-normalization``): ``auto`` (default) uses the global CMVN
statistics when the config names them and per-utterance mean/variance normalisation otherwise
(fairseq's ``UtteranceCMVN``); ``global``, ``utterance`` and ``none`` force one.
Relative paths are resolved against the data directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, List, Optional

import numpy as np

from slam_formats.names import DATA_CONFIG_NAME

__all__ = ["PretrainingDataConfig", "DataConfigError", "MASK_SYMBOL", "FEATURE_NORMALIZATIONS", "utterance_cmvn",
           "GlobalCMVN", "no_normalization"]

MASK_SYMBOL = "<mask>"
FEATURE_NORMALIZATIONS = ("auto", "global", "utterance", "none")


class DataConfigError(ValueError):
    """A data directory or config.yaml that cannot be used; the message names the file."""


def utterance_cmvn(features: np.ndarray) -> np.ndarray:
    """(T, F) -> (T, F): each bin to zero mean and unit variance over the utterance (fairseq's UtteranceCMVN)."""
    mean = features.mean(axis=0)
    std = np.sqrt(np.maximum((features ** 2).mean(axis=0) - mean ** 2, 1e-10))
    return ((features - mean) / std).astype(np.float32)


class GlobalCMVN:
    """(T, F) -> (T, F) with the corpus mean and std of an ``.npz`` (fairseq's GlobalCMVN); checks their shapes."""

    def __init__(self, path: Path, dimension: int) -> None:
        try:
            stats = np.load(str(path))
            self.mean = np.asarray(stats["mean"], dtype=np.float32)
            self.std = np.asarray(stats["std"], dtype=np.float32)
        except Exception as error:
            raise DataConfigError(f"{path}: cannot read global CMVN statistics 'mean'/'std' ({error})") from error
        if self.mean.shape != (dimension,) or self.std.shape != (dimension,):
            raise DataConfigError(f"{path}: CMVN mean/std of shapes {self.mean.shape}/{self.std.shape}, "
                                  f"expected ({dimension},)")
        if (self.std <= 0).any():
            raise DataConfigError(f"{path}: CMVN std has non-positive entries")

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)


class PretrainingDataConfig:
    """Reads ``DATA/config.yaml``; builds the dictionary, the text encoder and the feature transform.

    Args:
        data_dir: the data directory.
        feature_normalization: one of :data:`FEATURE_NORMALIZATIONS`.
    """

    def __init__(self, data_dir: str, feature_normalization: str = "auto") -> None:
        import yaml

        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DATA_CONFIG_NAME
        if not self.path.is_file():
            raise DataConfigError(f"{self.path}: no data config (the manifest scripts write it)")
        with open(self.path, encoding="utf-8") as handle:
            self.raw = yaml.safe_load(handle) or {}
        if feature_normalization not in FEATURE_NORMALIZATIONS:
            raise DataConfigError(f"feature normalization must be one of {FEATURE_NORMALIZATIONS}, "
                                  f"got {feature_normalization!r}")
        self.feature_normalization = feature_normalization
        self.input_feat_per_channel = int(self.raw.get("input_feat_per_channel", 80))
        self._dictionary = None
        self._sentencepiece = None
        self._transform = None

    def resolve(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self.data_dir / path

    @property
    def vocab_path(self) -> Path:
        name = self.raw.get("vocab_filename")
        if not name:
            raise DataConfigError(f"{self.path}: no vocab_filename (the fairseq dictionary); "
                                  f"manifests/prep_text.py --out {self.data_dir} writes it with the vocabulary. "
                                  "Speech-only pre-training needs it too: the model's text embeddings are "
                                  "built for it, so that stage 2 and fine-tuning go on from the same checkpoint")
        return self.resolve(name)

    @property
    def sentencepiece_path(self) -> Path:
        tokenizer = self.raw.get("bpe_tokenizer") or {}
        name = tokenizer.get("sentencepiece_model") if isinstance(tokenizer, dict) else None
        if not name or tokenizer.get("bpe", "sentencepiece") != "sentencepiece":
            raise DataConfigError(f"{self.path}: no bpe_tokenizer {{bpe: sentencepiece, sentencepiece_model: ...}}, "
                                  f"needed to encode raw text (text_<split>.txt, pair transcripts); "
                                  f"manifests/prep_text.py --out {self.data_dir} writes it with the vocabulary")
        return self.resolve(name)

    @property
    def global_cmvn_path(self) -> Optional[Path]:
        cmvn = self.raw.get("global_cmvn") or {}
        name = cmvn.get("stats_npz_path") if isinstance(cmvn, dict) else None
        return self.resolve(name) if name else None

    @property
    def dictionary(self):
        """The fairseq dictionary of ``vocab_filename`` plus ``<mask>`` (last index)."""
        if self._dictionary is None:
            from fairseq.data import Dictionary

            if not self.vocab_path.is_file():
                raise DataConfigError(f"{self.vocab_path}: dictionary named by {self.path} does not exist")
            dictionary = Dictionary.load(str(self.vocab_path))
            dictionary.add_symbol(MASK_SYMBOL)
            self._dictionary = dictionary
        return self._dictionary

    def _processor(self):
        if self._sentencepiece is None:
            import sentencepiece

            path = self.sentencepiece_path
            if not path.is_file():
                raise DataConfigError(f"{path}: SentencePiece model named by {self.path} does not exist")
            self._sentencepiece = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return self._sentencepiece

    def encode_lines(self, lines: Iterable[str]) -> List[np.ndarray]:
        """SentencePiece pieces -> dictionary ids, with eos appended (as ``fairseq-preprocess``).

        Returns one (L,) int32 array per line.
        """
        lines = list(lines)
        if not lines:
            return []
        pieces = self._processor().encode(lines, out_type=str)
        dictionary = self.dictionary
        indices, unk, eos = dictionary.indices, dictionary.unk(), dictionary.eos()
        return [np.asarray([indices.get(piece, unk) for piece in line] + [eos], dtype=np.int32)
                for line in pieces]

    @property
    def feature_transform(self) -> Callable[[np.ndarray], np.ndarray]:
        """(T, F) float32 -> (T, F) float32, per ``feature_normalization`` (module docstring)."""
        if self._transform is None:
            mode = self.feature_normalization
            if mode == "auto":
                mode = "global" if self.global_cmvn_path is not None else "utterance"
            if mode == "global":
                if self.global_cmvn_path is None:
                    raise DataConfigError(f"{self.path}: --feature-normalization global needs "
                                          "global_cmvn: {stats_npz_path: ...}")
                self._transform = GlobalCMVN(self.global_cmvn_path, self.input_feat_per_channel)
            elif mode == "utterance":
                self._transform = utterance_cmvn
            else:
                self._transform = no_normalization
            self.resolved_feature_normalization = mode
        return self._transform

    def describe_normalization(self) -> str:
        self.feature_transform  # noqa: B018  (resolves the mode)
        if self.resolved_feature_normalization == "global":
            return f"global CMVN from {self.global_cmvn_path}"
        if self.resolved_feature_normalization == "utterance":
            return "utterance-level mean/variance normalisation"
        return "no feature normalisation"


def no_normalization(features: np.ndarray) -> np.ndarray:
    """The features as they are."""
    return features
