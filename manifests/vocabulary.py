"""SentencePiece vocabularies, their fairseq dictionaries, and text binarized for fairseq.

Settings follow fairseq's S2T recipes (``gen_vocab``): unigram model, ``character_coverage`` 1.0
(lower it, e.g. 0.9995, for Chinese/Japanese), ids bos 0 / pad 1 / eos 2 / unk 3 so that a piece's
SentencePiece id equals its index in the fairseq dictionary written beside the model
(``<piece> 1`` lines, specials left out; :func:`write_fairseq_dictionary`).

Vocabulary too large for a small corpus: refused with a clear message naming the largest size
SentencePiece can make (:class:`manifests.core.UsageError`), unless ``allow_smaller_vocab``
(``--allow-smaller-vocab``: SentencePiece's ``hard_vocab_limit=false``; the file names keep the
requested size, the model and dictionary hold fewer pieces).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from manifests.core import UsageError, default_workers
from slam_formats.atomic import atomic_write_text
from slam_formats.indexed_text import MMapTokenWriter, install_indexed
from slam_formats.manifest import ManifestError
from slam_formats.names import (SPM_BOS_ID, SPM_EOS_ID, SPM_PAD_ID, SPM_SPECIAL_PIECES, SPM_UNK_ID,
                                fairseq_dictionary_path)

_TOO_LARGE = re.compile(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)")
CASE_FOLDING_RULE = "nmt_nfkc_cf"  # SentencePiece's NFKC normalisation with case folding
SAMPLING_SEED = 1  # of SentencePiece's sample of a text above input_sentence_size sentences
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


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


def default_character_coverage(languages: Sequence[str]) -> float:
    """1.0 (fairseq's recipes) unless a language with a large character set is involved."""
    large = {"zh", "zh-CN", "zh-TW", "zh-HK", "ja", "ko"}
    return 0.9995 if any(language in large for language in languages) else 1.0


def reservoir_sample(sentences: Iterable[str], size: int, seed: int) -> List[str]:
    """A uniform sample of ``size`` sentences of a stream (all of them, in order, when it holds no
    more), drawn by reservoir sampling from ``seed``: the same sample for the same stream."""
    import random

    rng = random.Random(seed)
    sample: List[str] = []
    for seen, sentence in enumerate(sentences):
        if seen < size:
            sample.append(sentence)
        else:
            slot = rng.randrange(seen + 1)
            if slot < size:
                sample[slot] = sentence
    return sample


def train_sentencepiece(sentences: Iterable[str], model_path, vocab_size: int, *,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        user_defined_symbols: Sequence[str] = (), input_sentence_size: int = 0,
                        allow_smaller_vocab: bool = False, num_threads: Optional[int] = None,
                        case_fold: bool = False) -> Path:
    """Train a SentencePiece model and write it with its fairseq dictionary.

    Args:
        sentences: training text, one sentence each (empty ones are ignored).
        model_path: ``<prefix>.model``; the dictionary goes to ``<prefix>.txt``. Both are replaced
            atomically (a failed run leaves the old ones).
        user_defined_symbols: pieces kept whole and added to the dictionary (fairseq's ``<lang:xx>``).
        input_sentence_size: if > 0, train on a sample of this many sentences
            (:func:`reservoir_sample`, the same at every run).
        case_fold: the model lower-cases (case-folds) whatever it encodes, its training text
            included (SentencePiece's ``nmt_nfkc_cf`` normalisation): text encoded later with it,
            such as pair transcripts kept in upper case, meets the same pieces.
    Returns:
        the model path.
    Raises:
        UsageError: no text, or ``vocab_size`` too large (message names the maximum) or too small
            (names the minimum) for the text.
    """
    import sentencepiece

    model_path = Path(model_path)
    counter = {"sentences": 0}

    def _non_empty() -> Iterator[str]:
        for sentence in sentences:
            if sentence.strip():
                counter["sentences"] += 1
                yield sentence

    options = dict(model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
                   bos_id=0, pad_id=1, eos_id=2, unk_id=3, num_threads=num_threads or default_workers(),
                   hard_vocab_limit=not allow_smaller_vocab, minloglevel=2)
    if case_fold:
        options["normalization_rule_name"] = CASE_FOLDING_RULE
    if user_defined_symbols:
        options["user_defined_symbols"] = list(user_defined_symbols)
    training_sentences = _non_empty()
    if input_sentence_size > 0:
        # sampled here, from a fixed seed: SentencePiece's own sample differs from process to
        # process, and so would the vocabulary of every rerun of a preparation script
        training_sentences = iter(reservoir_sample(_non_empty(), input_sentence_size, SAMPLING_SEED))
    model_path.parent.mkdir(parents=True, exist_ok=True)
    work_dir = tempfile.mkdtemp(dir=model_path.parent, prefix=".tmp-spm-")
    try:
        prefix = os.path.join(work_dir, "spm")
        try:
            sentencepiece.SentencePieceTrainer.train(sentence_iterator=training_sentences, model_prefix=prefix,
                                                     **options)
        except RuntimeError as error:
            if counter["sentences"] == 0:
                raise UsageError(f"{model_path.name}: no text to train SentencePiece on") from None
            match = _TOO_LARGE.search(str(error))
            if match:
                raise UsageError(
                    f"{model_path.name}: a vocabulary of {match.group(1)} is too large for this text "
                    f"({counter['sentences']} sentences); SentencePiece can make at most {match.group(2)} "
                    f"pieces here. Pass --vocab-size {match.group(2)} or less, or --allow-smaller-vocab "
                    f"to accept fewer pieces than asked") from None
            match = _TOO_SMALL.search(str(error))
            if match:
                raise UsageError(
                    f"{model_path.name}: a vocabulary of {match.group(1)} cannot hold the {match.group(2)} pieces "
                    f"SentencePiece must keep for this text (every character it covers, plus <s>, <pad>, </s>, "
                    f"<unk>). Pass --vocab-size {match.group(2)} or more, or (prep_text.py, prep_covost2.py) a lower "
                    f"--character-coverage, e.g. 0.9995, to map rare characters to <unk>") from None
            raise
        write_fairseq_dictionary(prefix + ".model", prefix + ".txt")
        dictionary_path = model_path.with_suffix(".txt")
        os.replace(prefix + ".model", model_path)
        os.replace(prefix + ".txt", dictionary_path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return model_path


def _batches(lines: Iterable[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def binarize_lines(lines: Iterable[str], spm_model_path, out_prefix, dictionary_size: int,
                   workers: int = 1, batch_lines: int = 10000) -> Tuple[int, int]:
    """Encode lines with SentencePiece (ids + eos, fairseq's convention; ``workers`` threads of
    SentencePiece's own batch encoder, no processes) into a fairseq mmap indexed
    dataset ``<out_prefix>.bin/.idx`` that ``fairseq.data.data_utils.load_indexed_dataset(prefix,
    dictionary)`` loads. Written under a temporary name, then renamed (``.idx`` last; a crash leaves
    no ``.idx`` next to a new ``.bin``).

    Returns:
        (number of sequences, number of tokens incl. eos).
    """
    import sentencepiece

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_prefix.parent / f".tmp-{out_prefix.name}-{os.getpid()}"
    builder = MMapTokenWriter(f"{temporary}.bin", dictionary_size)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model_path))
    sequences = tokens = 0
    try:
        for batch in _batches(lines, batch_lines):
            for ids in processor.encode(batch, num_threads=max(1, workers)):
                ids.append(SPM_EOS_ID)
                builder.add(ids)
                sequences += 1
                tokens += len(ids)
        builder.finalize(f"{temporary}.idx")
        install_indexed(str(temporary), str(out_prefix))
    finally:
        builder.close()
        for suffix in (".bin", ".idx"):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)
    return sequences, tokens
