#!/usr/bin/env python3
"""Text corpora -> SLAM pre-training vocabulary and binarized text.

Inputs (``--inputs PATH[:SPLIT] ...``, split ``train`` when not given; several per split allowed):
  - plain text, one utterance a line (the LibriSpeech LM corpus ``librispeech-lm-norm.txt``);
  - JSON lines with a ``"text"`` field (mC4: ``c4-en.*.json.gz``); a document's text is split at
    its newlines, each non-empty line one utterance.
Either may be gzipped (``*.gz``). The format follows the name (``.json``/``.jsonl`` = JSON lines);
``--format`` overrides it. A PATH holding ``*``, ``?`` or ``[`` that names no file is a glob
pattern, expanded here: ``--inputs '/corpora/c4-en.*.json.gz'`` works quoted or not.
``--lowercase`` lower-cases the text and trains a SentencePiece model that case-folds whatever it
encodes, so the upper-case transcripts of LibriSpeech's ``pair_*.tsv`` meet the same pieces.

Writes into ``--out``:
  spm_unigram<N>.{model,txt}   SentencePiece (``--vocab-size``, default 32000) trained on the
                               ``--vocab-split`` text (+ the ``tgt_text`` of ``--pair-manifests``),
                               and its fairseq dictionary
  text_<split>.{bin,idx}       SentencePiece ids + eos in fairseq's mmap indexed dataset
                               (``fairseq.data.data_utils.load_indexed_dataset(prefix, dictionary)``)
  config.yaml                  vocab_filename + bpe_tokenizer merged in (the SLAM data config)
  skipped_text.tsv, summary_text.json

Skipped and counted (named by file:line): non-UTF-8 lines (non_utf8_text), lines that are not
JSON objects (malformed_line), JSON lines without a "text" string (empty_text). Empty lines are
ignored. A vocabulary too large for the text is refused with the largest possible size named
(``--allow-smaller-vocab`` accepts fewer pieces instead), one too small with the smallest; a
``--pair-manifests`` file that is missing or not a manifest with ``tgt_text`` is refused before
SentencePiece trains. Resume: a re-run with the same inputs
and options reuses the SentencePiece model and the finished ``text_<split>`` files
(``.prep_text_state.json``); a split is binarized one input file at a time into hidden parts, so a
run stopped inside a split of many files (mC4) goes on from the file it stopped in.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifests import core, data_config, vocabulary  # noqa: E402
from slam_formats.atomic import atomic_write_text
from slam_formats.indexed_text import concatenate_indexed, install_indexed
from slam_formats.manifest import ManifestError, read_s2t_manifest
from slam_formats.names import DATA_CONFIG_NAME, spm_prefix_name, text_prefix_name

STATE_NAME = ".prep_text_state.json"
PARTS_KEY = "parts"  # in the state: the finished per-input parts of a split being binarized


def input_format(path: Path, forced: str) -> str:
    if forced != "auto":
        return forced
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith((".json", ".jsonl")) else "plain"


def iter_text(path: Path, fmt: str, summary: core.RunSummary, split: str, lowercase: bool,
              report: bool = True) -> Iterator[str]:
    """Utterances of one input, bad lines skipped (and, with ``report``, recorded in the summary)."""
    def skip(reason: str, line_number: int, detail: str) -> None:
        if report:
            summary.skip(reason, f"{path}:{line_number}", detail, split)

    for line_number, line in core.read_text_lines(path):
        if line is None:
            skip(core.SKIP_NON_UTF8, line_number, "not UTF-8")
            continue
        if fmt == "jsonl":
            if not line.strip():
                continue
            try:
                document = json.loads(line)
            except ValueError as error:
                skip(core.SKIP_MALFORMED, line_number, f"not JSON ({error})")
                continue
            text = document.get("text") if isinstance(document, dict) else None
            if not isinstance(text, str):
                skip(core.SKIP_EMPTY_TEXT, line_number, 'no "text" string')
                continue
            pieces = text.split("\n")
        else:
            pieces = [line]
        for piece in pieces:
            piece = core.normalize_space(piece)
            if piece:
                yield piece.lower() if lowercase else piece


def parse_inputs(specs: List[str]) -> List[Tuple[Path, str]]:
    """``PATH[:SPLIT]`` specs -> (file, split) pairs. A PATH with ``*``, ``?`` or ``[`` that names no
    file is a glob pattern, expanded here (sorted), so that a quoted pattern works like the shell's;
    what it matched is printed (a mistyped name such as ``a[1].txt`` may match ``a1.txt``)."""
    inputs = []
    for spec in specs:
        path, split = Path(spec), "train"
        if not path.exists() and ":" in spec:
            path_text, _, split = spec.rpartition(":")
            path = Path(path_text)
        core.parse_split_map([f"x:{split}"], "--inputs")  # validates the split name
        if not path.exists() and glob.has_magic(str(path)):
            matches = sorted(Path(match) for match in glob.glob(str(path)) if Path(match).is_file())
            if not matches:
                raise core.UsageError(f"--inputs {spec}: the pattern matches no file")
            shown = ", ".join(str(match) for match in matches[:3]) + (", ..." if len(matches) > 3 else "")
            print(f"--inputs {spec}: no such file, read as a pattern: {len(matches)} file(s) for split "
                  f"{split}: {shown}", file=sys.stderr)
            inputs.extend((match, split) for match in matches)
            continue
        if not path.is_file():
            raise core.UsageError(f"--inputs {spec}: no such file")
        inputs.append((path, split))
    return inputs


def read_pair_transcripts(manifests: List[Path]) -> List[str]:
    """The non-empty ``tgt_text`` of every ``--pair-manifests`` file, whitespace normalised. Read
    before SentencePiece trains, so that a missing file or one that is not a manifest with
    ``tgt_text`` is a usage error, not a traceback from inside SentencePiece's sentence iterator."""
    transcripts = []
    for manifest in manifests:
        if not manifest.is_file():
            raise core.UsageError(f"--pair-manifests {manifest}: no such file")
        try:
            rows = read_s2t_manifest(str(manifest))
        except (ManifestError, UnicodeDecodeError, OSError) as error:
            raise core.UsageError(f"--pair-manifests {manifest}: not a readable manifest ({error})") from None
        if rows and "tgt_text" not in rows[0]:
            raise core.UsageError(f"--pair-manifests {manifest}: no tgt_text column (columns: {sorted(rows[0])})")
        transcripts.extend(text for text in (core.normalize_space(row["tgt_text"]) for row in rows) if text)
    return transcripts


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def file_identity(path: Path) -> Tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, int(stat.st_mtime)


def _part_prefix(prefix: Path, index: int) -> Path:
    return prefix.parent / f".{prefix.name}.part{index:05d}"


def binarize_split(args: argparse.Namespace, inputs: List[Tuple[Path, str]], split: str, prefix: Path,
                   spm_path: Path, spm_digest: str, dictionary_size: int, state: dict, state_path: Path,
                   summary: core.RunSummary) -> Tuple[int, int]:
    """``text_<split>.{bin,idx}`` from its inputs, one hidden part per input file, each recorded in
    the state file when done: a run stopped at input file k of K (mC4's thousands of files) goes on
    from file k, not from the first. The parts are then concatenated (one: renamed) and removed.
    Returns (sequences, tokens incl. eos)."""
    parts_state = state.setdefault(PARTS_KEY, {})
    parts, sequences, tokens = [], 0, 0
    for index, (path, fmt) in enumerate(inputs):
        part = _part_prefix(prefix, index)
        part_key = fingerprint(file_identity(path), fmt, args.lowercase, spm_digest)
        record = parts_state.get(part.name)
        if (record is not None and record.get("key") == part_key and Path(f"{part}.bin").is_file()
                and Path(f"{part}.idx").is_file()):
            summary.skipped.extend(record.get("skipped", []))
            print(f"{path}: binarized by an earlier run ({record['sequences']} sequences), reused", file=sys.stderr)
        else:
            before = len(summary.skipped)
            part_sequences, part_tokens = vocabulary.binarize_lines(
                iter_text(path, fmt, summary, split, args.lowercase), spm_path, part, dictionary_size,
                workers=args.workers)
            record = {"key": part_key, "sequences": part_sequences, "tokens": part_tokens,
                      "skipped": summary.skipped[before:]}
            parts_state[part.name] = record
            atomic_write_text(str(state_path), json.dumps(state, indent=1))
        parts.append(part)
        sequences += record["sequences"]
        tokens += record["tokens"]
    if len(parts) == 1:
        install_indexed(str(parts[0]), str(prefix))
    else:
        concatenate_indexed([str(part) for part in parts], str(prefix))
    for stale in prefix.parent.glob(f".{prefix.name}.part*"):
        stale.unlink(missing_ok=True)
    for name in [name for name in parts_state if name.startswith(f".{prefix.name}.part")]:
        del parts_state[name]
    return sequences, tokens


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, help="PATH[:SPLIT] text inputs (split: train)")
    parser.add_argument("--out", required=True, type=Path, help="output (data) directory")
    parser.add_argument("--format", choices=("auto", "plain", "jsonl"), default="auto")
    parser.add_argument("--vocab-size", type=int, default=32000, help="SentencePiece size (default 32000)")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="SentencePiece character coverage (1.0 for English; 0.9995 for CJK)")
    parser.add_argument("--allow-smaller-vocab", action="store_true",
                        help="accept fewer pieces than --vocab-size for a small corpus (default: refuse)")
    parser.add_argument("--vocab-split", default="train", help="split whose text trains SentencePiece")
    parser.add_argument("--spm-max-sentences", type=int, default=10_000_000,
                        help="SentencePiece samples at most this many sentences (0: all; default 10M)")
    parser.add_argument("--pair-manifests", nargs="*", default=[], type=Path,
                        help="pair_<split>.tsv files whose tgt_text also trains SentencePiece")
    parser.add_argument("--lowercase", action="store_true",
                        help="lower-case all text: the SentencePiece model case-folds whatever it encodes, so "
                             "pair transcripts kept in upper case (LibriSpeech) meet the same pieces")
    parser.add_argument("--workers", type=int, default=core.default_workers(), help="encoding processes")
    return parser.parse_args(argv)


def main(argv=None) -> core.RunSummary:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = core.RunSummary("text", args.out)
    summary.workers = args.workers
    inputs = parse_inputs(args.inputs)
    splits: Dict[str, List[Path]] = {}
    for path, split in inputs:
        splits.setdefault(split, []).append(path)
    if args.vocab_split not in splits:
        raise core.UsageError(f"--vocab-split {args.vocab_split}: no input has that split ({sorted(splits)})")
    pair_transcripts = read_pair_transcripts(args.pair_manifests)
    state_path = args.out / STATE_NAME
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}

    def formats(split: str):
        return [(path, input_format(path, args.format)) for path in splits[split]]

    spm_name = spm_prefix_name(args.vocab_size, model_type=args.model_type) + ".model"
    dictionary_name = spm_name[: -len(".model")] + ".txt"
    # the pairs by their transcripts, not their files: prep_librispeech and prep_covost2 rewrite
    # their pair manifests on every run, which must not train (and change) the vocabulary again
    pair_digest = hashlib.sha1("\n".join(pair_transcripts).encode("utf-8")).hexdigest()
    key_parts = [[file_identity(path) for path in splits[args.vocab_split]],
                 pair_digest, args.format, args.vocab_size,
                 args.model_type, args.character_coverage, args.allow_smaller_vocab, args.spm_max_sentences,
                 args.lowercase]
    if args.lowercase:  # models made before they case-folded are trained again, not reused
        key_parts.append(vocabulary.CASE_FOLDING_RULE)
    spm_key = fingerprint(*key_parts)
    spm_path = args.out / spm_name
    if state.get(spm_name) != spm_key or not spm_path.is_file() or not (args.out / dictionary_name).is_file():
        def training_text() -> Iterator[str]:
            for path, fmt in formats(args.vocab_split):
                yield from iter_text(path, fmt, summary, args.vocab_split, args.lowercase, report=False)
            for text in pair_transcripts:
                yield text.lower() if args.lowercase else text

        vocabulary.train_sentencepiece(training_text(), spm_path, args.vocab_size, model_type=args.model_type,
                                       character_coverage=args.character_coverage,
                                       input_sentence_size=args.spm_max_sentences,
                                       allow_smaller_vocab=args.allow_smaller_vocab, num_threads=args.workers,
                                       case_fold=args.lowercase)
        state[spm_name] = spm_key
        atomic_write_text(str(state_path), json.dumps(state, indent=1))
    summary.wrote(spm_name)
    summary.wrote(dictionary_name)
    spm_digest = hashlib.sha1(spm_path.read_bytes()).hexdigest()
    dictionary_size = 4 + sum(1 for _ in open(args.out / dictionary_name, encoding="utf-8"))

    for split in splits:
        prefix = args.out / text_prefix_name(split)
        key = fingerprint([file_identity(path) for path in splits[split]], args.format, args.lowercase, spm_digest)
        done = state.get(prefix.name, {})
        if done.get("key") == key and Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file():
            summary.skipped.extend(done.get("skipped", []))
            sequences, tokens = done["sequences"], done["tokens"]
            summary.shards_reused += 1
        else:
            before = len(summary.skipped)
            sequences, tokens = binarize_split(args, formats(split), split, prefix, spm_path, spm_digest,
                                               dictionary_size, state, state_path, summary)
            state[prefix.name] = {"key": key, "sequences": sequences, "tokens": tokens,
                                  "skipped": summary.skipped[before:]}
            atomic_write_text(str(state_path), json.dumps(state, indent=1))
            summary.shards_computed += 1
        summary.text_lines += sequences
        summary.wrote(f"{prefix.name}.{{bin,idx}}", sequences)
        print(f"{prefix.name}: {sequences} sequences, {tokens} tokens (incl. eos)", file=sys.stderr)

    data_config.merge_config(args.out / DATA_CONFIG_NAME, data_config.vocabulary_config(spm_name, dictionary_name))
    summary.wrote(DATA_CONFIG_NAME + " (vocabulary keys)")
    summary.finish()
    return summary


cli = core.console_command(main)  # the installed command (setup.py)


if __name__ == "__main__":
    cli()
