"""File names of a SLAM data directory and of fairseq's S2T fine-tuning recipes.

The manifest scripts write these names and the tasks read them; see ``docs/data_formats.md``.
"""
from __future__ import annotations

from typing import Optional


def speech_manifest_name(split: str) -> str:
    return f"speech_{split}.tsv"


def pair_manifest_name(split: str) -> str:
    return f"pair_{split}.tsv"


def text_prefix_name(split: str) -> str:
    return f"text_{split}"


DATA_CONFIG_NAME = "config.yaml"
FEATURE_DIR_NAME = "fbank"
ASR_TASK_NAME = "asr"  # train_asr.tsv, config_asr.yaml
LANG_TAG_TEMPLATE = "<lang:{}>"  # fairseq's SpeechToTextDataset.LANG_TAG_TEMPLATE

# SentencePiece ids as fairseq's S2T ``gen_vocab``: they equal the indices of fairseq's Dictionary
# specials, so a piece's SentencePiece id is its dictionary index.
SPM_BOS_ID, SPM_PAD_ID, SPM_EOS_ID, SPM_UNK_ID = 0, 1, 2, 3
SPM_SPECIAL_PIECES = ("<s>", "<pad>", "</s>", "<unk>")


def st_task_name(source_language: str, target_language: str) -> str:
    return f"st_{source_language}_{target_language}"


def fine_tuning_manifest_name(split: str, task: str) -> str:
    """``train_asr.tsv``, ``dev_st_es_en.tsv``: fairseq's recipe names."""
    return f"{split}_{task}.tsv"


def fine_tuning_config_name(task: str) -> str:
    return f"config_{task}.yaml"


def spm_prefix_name(vocab_size: int, task: Optional[str] = None, model_type: str = "unigram") -> str:
    """``spm_unigram32000`` (pre-training) or ``spm_unigram8192_st_es_en`` (fine-tuning task)."""
    return f"spm_{model_type}{vocab_size}" + (f"_{task}" if task else "")


def lang_tag(language: str) -> str:
    return LANG_TAG_TEMPLATE.format(language)


def fairseq_dictionary_path(spm_model_path: str) -> str:
    """The fairseq dictionary that belongs to a SentencePiece model: ``x.model`` -> ``x.txt``."""
    path = str(spm_model_path)
    return (path[: -len(".model")] if path.endswith(".model") else path) + ".txt"
