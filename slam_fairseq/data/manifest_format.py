"""Reading and writing fairseq S2T manifests (TSV) and SLAM data-directory names.

Kept in one module so that the manifest scripts and the tasks cannot disagree on a column or a file
name; see ``docs/data_formats.md``.
"""
from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

S2T_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")
OPTIONAL_COLUMNS = ("src_text", "src_lang", "tgt_lang")
_CSV_OPTIONS = dict(delimiter="\t", quotechar=None, doublequote=False, lineterminator="\n",
                    quoting=csv.QUOTE_NONE)


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the row."""


def speech_manifest_name(split: str) -> str:
    return f"speech_{split}.tsv"


def pair_manifest_name(split: str) -> str:
    return f"pair_{split}.tsv"


def text_prefix_name(split: str) -> str:
    return f"text_{split}"


def read_s2t_manifest(path: str) -> List[Dict[str, str]]:
    """All rows of an S2T TSV as dicts; checks the required columns and ``n_frames``."""
    path = str(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, **_CSV_OPTIONS)
        missing = [c for c in ("id", "audio", "n_frames") if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        rows = []
        for line_number, row in enumerate(reader, start=2):
            if not str(row.get("n_frames", "")).isdigit():
                raise ManifestError(f"{path}:{line_number}: n_frames {row.get('n_frames')!r} is not a count")
            rows.append({key: (value if value is not None else "") for key, value in row.items()})
    return rows


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half of one."""
    path = str(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_s2t_manifest(path: str, rows: Iterable[Dict[str, object]],
                       columns: Optional[Sequence[str]] = None) -> int:
    """Write rows atomically in fairseq's TSV dialect; returns the number of rows written."""
    rows = list(rows)
    if columns is None:
        extra = [c for c in OPTIONAL_COLUMNS if any(c in row for row in rows)]
        columns = list(S2T_COLUMNS) + extra
    lines = ["\t".join(columns)]
    for row in rows:
        values = []
        for column in columns:
            value = str(row.get(column, ""))
            if "\t" in value or "\n" in value:
                raise ManifestError(f"{path}: a tab or newline in column {column!r} of row {row.get('id')}")
            values.append(value)
        lines.append("\t".join(values))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(rows)


def resolve_data_path(data_dir: str, name: str) -> Path:
    return Path(data_dir) / name


# ---------------------------------------------------------------------------------------------
# Names of the fine-tuning files (fairseq S2T recipe names) and of the SLAM data directory.

DATA_CONFIG_NAME = "config.yaml"
FEATURE_DIR_NAME = "fbank"
LANG_TAG_TEMPLATE = "<lang:{}>"  # fairseq's SpeechToTextDataset.LANG_TAG_TEMPLATE

# SentencePiece ids as fairseq's S2T ``gen_vocab``: they equal the indices of fairseq's Dictionary
# specials, so a piece's SentencePiece id is its dictionary index.
SPM_BOS_ID, SPM_PAD_ID, SPM_EOS_ID, SPM_UNK_ID = 0, 1, 2, 3
SPM_SPECIAL_PIECES = ("<s>", "<pad>", "</s>", "<unk>")


def asr_task_name() -> str:
    return "asr"


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


def write_fairseq_dictionary(spm_model_path: str, dictionary_path: Optional[str] = None) -> str:
    """Write the fairseq dictionary of a SentencePiece model (``<piece> 1`` per line, the four
    specials left out, in id order), as fairseq's S2T ``gen_vocab`` does. Returns its path.

    The model must use fairseq's special ids (bos 0, pad 1, eos 2, unk 3); then
    ``fairseq.data.Dictionary.load(dictionary_path).index(piece) == spm.piece_to_id(piece)``.
    """
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model_path))
    specials = [processor.id_to_piece(index) for index in
                (SPM_BOS_ID, SPM_PAD_ID, SPM_EOS_ID, SPM_UNK_ID)]
    if tuple(specials) != SPM_SPECIAL_PIECES:
        raise ManifestError(f"{spm_model_path}: special pieces {specials} at ids 0-3, "
                            f"expected {list(SPM_SPECIAL_PIECES)} (fairseq's gen_vocab ids)")
    pieces = [processor.id_to_piece(index) for index in range(4, processor.get_piece_size())]
    dictionary_path = dictionary_path or fairseq_dictionary_path(spm_model_path)
    atomic_write_text(dictionary_path, "".join(f"{piece} 1\n" for piece in pieces))
    return str(dictionary_path)


@contextlib.contextmanager
def atomic_output_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; it is renamed onto ``path`` when the block succeeds
    and deleted when it raises (binary outputs: zips, npz, SentencePiece models)."""
    target = str(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(target))
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
