#!/usr/bin/env python3
"""CoVoST 2 (Common Voice clips + CoVoST translations) -> fairseq speech translation data.

Reads, for each ``--root`` (a Common Voice language directory as it ships): ``clips/*.mp3`` and
the ``covost_v2.<src>_<tgt>.tsv`` files in it (columns path, sentence, translation, client_id,
split; without sentence/client_id they come from Common Voice's ``validated.tsv`` beside it;
``--pairs es_en ...`` picks some), or, for a pair without that file, the split files CoVoST's
``get_covost_splits.py`` writes, ``covost_v2.<src>_<tgt>.<split>.tsv`` (no split column: the
name gives it). Any language pair; CoVoST's ``train_covost`` split counts as ``train`` (as in
fairseq's recipe). Fields are read as CoVoST's scripts write them and fairseq's recipe reads them:
tab-separated, no quoting, ``\`` escaping the next character (``\"`` is ``"``).

Writes into ``--out`` (fairseq's recipe names):
  <split>_st_<src>_<tgt>.tsv    id audio n_frames tgt_text speaker src_text src_lang tgt_lang
                                (tgt_text = translation, src_text = sentence, speaker = client_id)
  spm_unigram<N>_st_<src>_<tgt>.{model,txt}  one pair: SentencePiece on its train translations
  spm_unigram<N>_st.{model,txt}  several pairs: one shared vocabulary (all train translations); a
                                run of another set of pairs into an --out whose configs of an
                                earlier run name it is refused (it would be trained again)
  config_st_<src>_<tgt>.yaml    per pair (+ config_st.yaml for several pairs): LB SpecAugment, CMVN
  gcmvn_st*.npz                 with --cmvn global (train features of all source languages)
  pair_<split>_<src>.tsv        with --outputs pair: one per source language, its clips with their
                                source sentences as transcripts (SLAM's speech-text pairs; tgt_lang
                                is the source language, the transcripts' language)
  fbank/covost_<src>_<split>_<k>.{zip,json}, skipped_covost2.tsv, summary_covost2.json
With ``--multilingual`` or more than one target language, ``<lang:xx>`` target tags are added to
the vocabulary (kept whole by SentencePiece, present in the dictionary) and the configs say
``prepend_tgt_lang_tag: true`` (decode with ``--prefix-size 1``).

Features are stored (zip of .npy) by default: fairseq cannot read mp3, nor resample without
torchaudio. ``--on-the-fly`` stores 16 kHz 16-bit FLAC copies of the clips in the shard zips
instead (fairseq's ``speech_to_text`` then computes the features; it needs the plugin's
``slam_fairseq.compat.fbank.install_fbank_backend``, i.e. ``--user-dir slam_fairseq``).

Skipped and counted (named in the summary): rows naming a missing clip (missing_clip), rows with
an empty translation (empty_translation), non-UTF-8 or malformed rows, and bad audio (unreadable,
empty, too short, silent, stereo unless --downmix, below --min-sample-rate). Clips at 48 kHz (all
of Common Voice) are resampled to 16 kHz; that is expected, so they are not listed as notes.
"""
from __future__ import annotations

import argparse
import csv
import functools
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifests import core, data_config, vocabulary  # noqa: E402
from slam_formats.manifest import S2T_COLUMNS
from slam_formats.names import (
    fine_tuning_config_name,
    fine_tuning_manifest_name,
    lang_tag,
    spm_prefix_name,
    st_task_name,
)

COVOST_TSV = re.compile(r"^covost_v2\.([A-Za-z-]+)_([A-Za-z-]+)(?:\.([A-Za-z_]+))?\.tsv$")
COVOST_COLUMNS = ("path", "translation", "split")  # + sentence, client_id (else from validated.tsv)


def split_fields(line: str) -> List[str]:
    """One TSV line's fields as CoVoST writes them and fairseq's recipe reads them (pandas with
    ``quoting=QUOTE_NONE, escapechar="\\"``): a backslash takes the next character literally
    (an escaped tab stays in its field). Raises ``csv.Error`` for a line ending in a lone backslash."""
    return next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", strict=True))
MANIFEST_COLUMNS = list(S2T_COLUMNS) + ["src_text", "src_lang", "tgt_lang"]


CovostFiles = List[Tuple[Path, Optional[str]]]  # (tsv, the split its name gives, or None: a split column)


def find_pairs(roots: List[Path], wanted: List[str]) -> List[Tuple[str, str, CovostFiles, Path]]:
    """(src, tgt, its TSVs, clips dir) for every CoVoST pair in the roots (filtered by ``wanted``):
    the pair's ``covost_v2.<src>_<tgt>.tsv``, or else its ``covost_v2.<src>_<tgt>.<split>.tsv`` files."""
    pairs = []
    for root in roots:
        if not (root / "clips").is_dir():
            raise core.UsageError(f"{root}: no clips/ directory (expected a Common Voice language directory)")
        found: Dict[Tuple[str, str], Dict[Optional[str], Path]] = {}
        for path in sorted(root.iterdir()):
            match = COVOST_TSV.match(path.name)
            if match and (not wanted or f"{match.group(1)}_{match.group(2)}" in wanted):
                found.setdefault((match.group(1), match.group(2)), {})[match.group(3)] = path
        for (src, tgt), files in found.items():
            chosen = [(files[None], None)] if None in files else [(path, split) for split, path in sorted(files.items())]
            pairs.append((src, tgt, chosen, root / "clips"))
    names = {f"{src}_{tgt}" for src, tgt, _, _ in pairs}
    missing = [pair for pair in wanted if pair not in names]
    if missing or not pairs:
        raise core.UsageError(f"no covost_v2.<src>_<tgt>.tsv (or covost_v2.<src>_<tgt>.<split>.tsv) for "
                              f"{missing or 'any pair'} in {[str(r) for r in roots]}")
    return pairs


def read_common_voice_metadata(root: Path) -> Dict[str, Tuple[str, str]]:
    """clip path -> (sentence, client_id) from Common Voice's ``validated.tsv``, if there is one
    (read once per file version: the pairs of one source language share it; do not modify the result)."""
    path = root / "validated.tsv"
    if not path.is_file():
        return {}
    stat = path.stat()
    return _read_validated(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_validated(path: Path, mtime_ns: int, size: int) -> Dict[str, Tuple[str, str]]:
    metadata: Dict[str, Tuple[str, str]] = {}
    header = None
    for _, line in core.read_text_lines(path):
        if line is None or not line.strip():
            continue
        try:
            fields = split_fields(line)
        except csv.Error:
            continue
        if header is None:
            header = fields
            continue
        row = dict(zip(header, fields))
        if "path" in row:
            metadata[row["path"]] = (row.get("sentence", ""), row.get("client_id", ""))
    return metadata


def read_covost_rows(tsv: Path, clips: Path, splits: List[str], summary: core.RunSummary,
                     missing_clips: Optional[Set[Path]] = None, file_split: Optional[str] = None) -> List[Dict[str, str]]:
    """The usable rows of one CoVoST TSV for the wanted splits; bad rows skipped into the summary.
    ``file_split``: every row's split (a ``covost_v2.<src>_<tgt>.<split>.tsv``), else the
    ``split`` column gives it.

    A missing clip is skipped once however many TSVs name it (the pairs of one source language
    share their clips): ``missing_clips`` holds those already reported, across calls.

    ``sentence`` and ``client_id`` come from the CoVoST TSV, or else from Common Voice's
    ``validated.tsv`` beside it (fairseq's recipe merges the two)."""
    rows = []
    header = None
    common_voice: Dict[str, Tuple[str, str]] = {}
    for line_number, line in core.read_text_lines(tsv):
        where = f"{tsv}:{line_number}"
        if line is None:
            summary.skip(core.SKIP_NON_UTF8, where, "row is not UTF-8")
            continue
        if not line.strip():
            continue
        try:
            fields = split_fields(line)
        except csv.Error as error:
            summary.skip(core.SKIP_MALFORMED, where, f"not a CoVoST TSV row ({error})")
            continue
        if header is None:
            header = fields
            needed = COVOST_COLUMNS if file_split is None else tuple(c for c in COVOST_COLUMNS if c != "split")
            missing = [column for column in needed if column not in header]
            if missing:
                raise core.UsageError(f"{tsv}: missing column(s) {missing}; header is {header}")
            if "sentence" not in header or "client_id" not in header:
                common_voice = read_common_voice_metadata(tsv.parent)
            continue
        if len(fields) != len(header):
            summary.skip(core.SKIP_MALFORMED, where, f"{len(fields)} fields, header has {len(header)}")
            continue
        row = dict(zip(header, fields))
        sentence, client_id = common_voice.get(row["path"], ("", ""))
        row.setdefault("sentence", sentence)
        row.setdefault("client_id", client_id)
        split = file_split if file_split is not None else row["split"]
        split = "train" if split == "train_covost" else split
        if split not in splits:
            continue
        clip = clips / row["path"]
        if not row["path"] or not clip.is_file():
            if missing_clips is None or not row["path"] or clip not in missing_clips:
                summary.skip(core.SKIP_MISSING_CLIP, clip, f"named by {where}", split)
                if missing_clips is not None and row["path"]:
                    missing_clips.add(clip)
            continue
        translation = core.normalize_space(row["translation"])
        if not translation:
            summary.skip(core.SKIP_EMPTY_TRANSLATION, where, f"clip {row['path']}", split)
            continue
        rows.append({"split": split, "clip": str(clip), "id": Path(row["path"]).stem, "tgt_text": translation,
                     "src_text": core.normalize_space(row["sentence"]),
                     "speaker": core.normalize_space(row["client_id"])})
    return rows


def refuse_replacing_a_vocabulary_in_use(out: Path, pairs: List[Tuple[str, str]], vocab_size: int) -> None:
    """Several pairs share ``spm_unigram<N>_st.model``: a run with another set of pairs would
    retrain it under the same name, and the configs an earlier run wrote for its other pairs (and
    the models trained with them) would read other pieces. Refused before anything is computed."""
    if len(pairs) < 2 or not out.is_dir():
        return
    spm_name = spm_prefix_name(vocab_size, "st") + ".model"
    ours = {fine_tuning_config_name(st_task_name(src, tgt)) for src, tgt in pairs} | {fine_tuning_config_name("st")}
    users = []
    for config in sorted(out.glob(fine_tuning_config_name("st_*"))):
        if config.name in ours:
            continue
        try:
            named = (data_config.read_config(config).get("bpe_tokenizer") or {}).get("sentencepiece_model")
        except Exception:  # an unreadable config names nothing this run could break
            continue
        if named == spm_name:
            users.append(config.name)
    if users:
        raise core.UsageError(
            f"{out / spm_name} is the shared vocabulary of {', '.join(users)} (an earlier run's pairs), which this "
            f"run of the pairs {' '.join(f'{src}_{tgt}' for src, tgt in pairs)} would train again under the same "
            "name: their models would read other pieces. Give all the pairs in one run (--pairs), or another --out")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", nargs="+", required=True, type=Path,
                        help="Common Voice language directories holding clips/ and covost_v2.*.tsv")
    parser.add_argument("--pairs", nargs="*", default=[], help="only these pairs, e.g. es_en (default: all found)")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    parser.add_argument("--train-split", default="train",
                        help="split whose translations train the vocabulary and give global CMVN")
    parser.add_argument("--vocab-size", type=int, default=8192, help="SentencePiece size (default 8192)")
    parser.add_argument("--character-coverage", type=float, default=None,
                        help="default 1.0, or 0.9995 when a target language is zh/ja/ko")
    parser.add_argument("--allow-smaller-vocab", action="store_true",
                        help="accept fewer pieces than --vocab-size for a small corpus (default: refuse)")
    parser.add_argument("--outputs", nargs="+", choices=["st", "pair"], default=["st"],
                        help="st: fairseq ST manifests; pair: SLAM speech-text pairs of the source "
                             "transcripts, pair_<split>_<src>.tsv (mSLAM-style pre-training pairs)")
    parser.add_argument("--multilingual", action="store_true",
                        help="target language tags even for one target language")
    core.add_run_arguments(parser)
    core.add_audio_arguments(parser, on_the_fly_help="CoVoST: clips become 16 kHz FLAC copies.")
    return parser.parse_args(argv)


def main(argv=None) -> core.RunSummary:
    args = parse_args(argv)
    context = core.context_from_args(args, "covost2")
    summary = context.summary
    if args.train_split not in args.splits:
        raise core.UsageError(f"--train-split {args.train_split} is not in --splits {args.splits}")
    pairs = find_pairs(args.root, args.pairs)
    refuse_replacing_a_vocabulary_in_use(args.out, [(src, tgt) for src, tgt, _, _ in pairs], args.vocab_size)
    missing_clips: Set[Path] = set()
    rows_by_pair = {(src, tgt): [row for tsv, file_split in files
                                 for row in read_covost_rows(tsv, clips, args.splits, summary, missing_clips, file_split)]
                    for src, tgt, files, clips in pairs}

    # one item per clip and (source language, split), however many pairs use it
    items_by_source: Dict[str, Dict[str, Dict[str, core.AudioItem]]] = {}
    for (src, _), rows in rows_by_pair.items():
        for row in rows:
            group = items_by_source.setdefault(src, {}).setdefault(row["split"], {})
            group.setdefault(row["id"], core.AudioItem(row["id"], row["clip"], core.file_size(row["clip"])))
    options = core.audio_options_from_args(args)
    features = {}
    for src, groups in items_by_source.items():
        features[src] = core.extract_features(context, options, {split: list(items.values())
                                                                  for split, items in groups.items()},
                                              f"covost_{src}")
    # 48 kHz mp3 is what Common Voice ships: count those resamplings, do not list every clip
    mp3_rates: Dict[str, int] = {}
    kept_notes = []
    for note in summary.notes:
        if note["kind"] == core.NOTE_RESAMPLED and note["item"].endswith(".mp3"):
            mp3_rates[note["detail"]] = mp3_rates.get(note["detail"], 0) + 1
        else:
            kept_notes.append(note)
    summary.notes = kept_notes
    for detail, count in sorted(mp3_rates.items()):
        summary.note(core.NOTE_RESAMPLED, f"{count} mp3 clips", detail, count=count)

    target_languages = sorted({tgt for _, tgt in rows_by_pair})
    multilingual = args.multilingual or len(target_languages) > 1
    joint_task = "st" if len(pairs) > 1 else st_task_name(*pairs[0][:2])
    spm_name = spm_prefix_name(args.vocab_size, joint_task) + ".model"
    coverage = args.character_coverage or vocabulary.default_character_coverage(target_languages)
    train_text = [row["tgt_text"] for rows in rows_by_pair.values() for row in rows
                  if row["split"] == args.train_split]
    vocabulary.train_sentencepiece(train_text, args.out / spm_name, args.vocab_size, character_coverage=coverage,
                                   user_defined_symbols=[lang_tag(t) for t in target_languages] if multilingual else (),
                                   allow_smaller_vocab=args.allow_smaller_vocab)
    summary.wrote(spm_name)
    gcmvn_name = None
    if args.cmvn == "global":
        gcmvn_name = f"gcmvn_{joint_task}.npz"
        core.write_global_cmvn(args.out / gcmvn_name, [by_split[args.train_split] for by_split in features.values()
                                                       if args.train_split in by_split])
        summary.wrote(gcmvn_name)

    # one pair file per source language, from the first of its own target languages (the clips and
    # source sentences are the same for each of them)
    pair_target = {src: min(tgt for other, tgt in rows_by_pair if other == src) for src, _ in rows_by_pair}
    for (src, tgt), rows in rows_by_pair.items():
        task = st_task_name(src, tgt)
        for split in args.splits:
            manifest = []
            for row in rows:
                if row["split"] != split:
                    continue
                for feature_row in features[src][split].rows_by_item.get(row["id"], []):
                    manifest.append({"id": feature_row["id"], "audio": feature_row["audio"],
                                     "n_frames": feature_row["n_frames"], "tgt_text": row["tgt_text"],
                                     "speaker": row["speaker"], "src_text": row["src_text"],
                                     "src_lang": src, "tgt_lang": tgt})
            if "st" in args.outputs:
                core.write_manifest(summary, args.out / fine_tuning_manifest_name(split, task), manifest,
                                    MANIFEST_COLUMNS)
            if "pair" in args.outputs and tgt == pair_target[src]:
                transcripts = []
                for row in manifest:
                    if row["src_text"]:
                        transcripts.append({**row, "tgt_text": row["src_text"], "tgt_lang": src})
                    else:
                        summary.skip(core.SKIP_MISSING_TRANSCRIPT, row["id"],
                                     "no source sentence for pair_*.tsv (neither a sentence column in the "
                                     "CoVoST TSV nor Common Voice's validated.tsv beside it names one)", split)
                core.write_manifest(summary, args.out / f"pair_{split}_{src}.tsv", transcripts, MANIFEST_COLUMNS)
    config = {**data_config.speech_config(args.out, args.cmvn, gcmvn_name, specaugment_policy="lb"),
              **data_config.vocabulary_config(spm_name, spm_name.replace(".model", ".txt"),
                                              prepend_tgt_lang_tag=multilingual)}
    for task in [st_task_name(src, tgt) for src, tgt in rows_by_pair] + (["st"] if len(pairs) > 1 else []):
        data_config.write_config(args.out / fine_tuning_config_name(task), config)
        summary.wrote(fine_tuning_config_name(task))
    summary.finish()
    return summary


cli = core.console_command(main)  # the installed command (setup.py)


if __name__ == "__main__":
    cli()
