#!/usr/bin/env python3
"""LibriSpeech -> SLAM speech-text pairs and fairseq ASR fine-tuning data.

Reads LibriSpeech as it ships: ``ROOT/<dir>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac``
with ``<speaker>-<chapter>.trans.txt`` (``<utt id> <TRANSCRIPT>`` lines). ``--splits`` maps
LibriSpeech directories to output split names (several directories may share one split).

Writes into ``--out``:
  pair_<split>.tsv              SLAM pairs: id audio n_frames tgt_text speaker (transcript as shipped)
  <split>_asr.tsv               fairseq ASR manifests: the same rows, transcript lower-cased
                                (fairseq's LibriSpeech recipe)
  spm_unigram<N>_asr.{model,txt} SentencePiece + fairseq dictionary, trained on --train-split
  config_asr.yaml               fairseq S2T config (LB SpecAugment, CMVN)
  config.yaml                   feature keys merged into the SLAM data config
  gcmvn_asr.npz                 with --cmvn global (from --train-split's features)
  fbank/librispeech_<split>_<k>.{zip,json}  shards (features, resume records)
  skipped_librispeech.tsv, summary_librispeech.json

Skipped and counted (never fatal), each named in the summary: audio without a transcript line
(missing_transcript), transcript lines without audio (missing_audio), non-UTF-8 transcript lines
(non_utf8_text), lines without text (empty_text / malformed_line), and bad audio (see below).
Stereo is skipped unless --downmix; rates above 16 kHz are resampled and counted, below
--min-sample-rate skipped. --on-the-fly: ``audio`` names the LibriSpeech flac itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifests import core, data_config, vocabulary  # noqa: E402
from slam_formats.manifest import S2T_COLUMNS
from slam_formats.names import (
    DATA_CONFIG_NAME,
    ASR_TASK_NAME,
    fine_tuning_config_name,
    fine_tuning_manifest_name,
    pair_manifest_name,
    spm_prefix_name,
)

AUDIO_SUFFIXES = (".flac", ".wav")
GCMVN_NAME = "gcmvn_asr.npz"  # this script's --cmvn global statistics


def list_librispeech_dir(split_dir: Path, split: str, summary: core.RunSummary) -> List[core.AudioItem]:
    """Items of one LibriSpeech directory: audio files matched with their transcript lines."""
    if not split_dir.is_dir():
        raise core.UsageError(f"{split_dir}: no such LibriSpeech directory")
    audio: Dict[str, Path] = {}
    for path in core.walk_files(split_dir, AUDIO_SUFFIXES):
        utterance_id = path.name.rsplit(".", 1)[0]
        if utterance_id in audio:
            summary.skip(core.SKIP_DUPLICATE_ID, path, f"also {audio[utterance_id]}", split)
            continue
        audio[utterance_id] = path
    transcripts: Dict[str, str] = {}
    line_of: Dict[str, str] = {}
    for path in core.walk_files(split_dir, (".trans.txt",)):
        for line_number, line in core.read_text_lines(path):
            where = f"{path}:{line_number}"
            if line is None:
                summary.skip(core.SKIP_NON_UTF8, where, "transcript line is not UTF-8", split)
                continue
            if not line.strip():
                continue
            utterance_id, _, text = line.strip().partition(" ")
            text = core.normalize_space(text)
            if not text:
                summary.skip(core.SKIP_EMPTY_TEXT, where, f"no transcript for {utterance_id}", split)
                continue
            if utterance_id in transcripts:
                summary.skip(core.SKIP_DUPLICATE_ID, where, f"{utterance_id} also at {line_of[utterance_id]}",
                             split)
                continue
            transcripts[utterance_id] = text
            line_of[utterance_id] = where
    items = []
    for utterance_id, path in sorted(audio.items()):
        if utterance_id not in transcripts:
            summary.skip(core.SKIP_MISSING_TRANSCRIPT, path, "no line in any *.trans.txt", split)
            continue
        items.append(core.AudioItem(utterance_id, str(path), core.file_size(path),
                                    {"tgt_text": transcripts[utterance_id],
                                     "speaker": utterance_id.split("-")[0]}))
    for utterance_id in sorted(set(transcripts) - set(audio)):
        summary.skip(core.SKIP_MISSING_AUDIO, line_of[utterance_id], f"no audio file for {utterance_id}", split)
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="the LibriSpeech directory (holding dev-clean/ ...)")
    parser.add_argument("--splits", nargs="+", default=["train-clean-100:train", "dev-clean:dev", "test-clean:test"],
                        help="DIR:SPLIT maps (default: train-clean-100:train dev-clean:dev test-clean:test)")
    parser.add_argument("--outputs", nargs="+", choices=("pair", "asr"), default=["pair", "asr"],
                        help="pair_<split>.tsv (SLAM) and/or the fairseq ASR set (default both)")
    parser.add_argument("--train-split", default="train",
                        help="split whose transcripts train the ASR vocabulary and whose features give "
                             "global CMVN (default train)")
    parser.add_argument("--vocab-size", type=int, default=10000, help="ASR SentencePiece size (default 10000)")
    parser.add_argument("--allow-smaller-vocab", action="store_true",
                        help="accept fewer pieces than --vocab-size when the text is too small "
                             "(default: refuse, naming the largest possible size)")
    parser.add_argument("--specaugment", choices=(*sorted(data_config.SPECAUGMENT_POLICIES), "none"), default="lb",
                        help="SpecAugment policy of the ASR config's train transform (fairseq's LB, LD, SM, "
                             "SS; default lb). LB and LD mask up to 100 frames with p=1.0, which can be a "
                             "whole short utterance; SM and SS mask at most 20%% of each utterance")
    core.add_run_arguments(parser)
    core.add_audio_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> core.RunSummary:
    args = parse_args(argv)
    context = core.context_from_args(args, "librispeech")
    summary = context.summary
    groups: Dict[str, List[core.AudioItem]] = {}
    for directory, split in core.parse_split_map(args.splits, "--splits"):
        groups.setdefault(split, []).extend(list_librispeech_dir(args.root / directory, split, summary))
    if ("asr" in args.outputs or args.cmvn == "global") and args.train_split not in groups:
        raise core.UsageError(f"--train-split {args.train_split} is not one of the output splits {sorted(groups)}")
    options = core.audio_options_from_args(args)
    settings = {"mel_high_freq": options.mel_high_freq}
    data_config.check_feature_settings(args.out / DATA_CONFIG_NAME, "prep_librispeech", settings)
    features = core.extract_features(context, options, groups, "librispeech")

    task = ASR_TASK_NAME
    spm_name = spm_prefix_name(args.vocab_size, task) + ".model"
    if "asr" in args.outputs:  # first: the step a too small corpus can refuse
        train_rows = features[args.train_split].manifest_rows(groups[args.train_split])
        if not train_rows:
            counts = ", ".join(f"{reason} {count}" for reason, count in summary.skip_counts().items())
            raise core.UsageError(
                f"--train-split {args.train_split}: no utterance with both audio and a transcript under "
                f"{args.root} ({counts or 'no audio files found'}); LibriSpeech's layout is "
                f"<split>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac beside <speaker>-<chapter>.trans.txt")
        train_text = (row["tgt_text"].lower() for row in train_rows)
        vocabulary.train_sentencepiece(train_text, args.out / spm_name, args.vocab_size,
                                       allow_smaller_vocab=args.allow_smaller_vocab)
        summary.wrote(spm_name)
    gcmvn_name = None
    if args.cmvn == "global":
        gcmvn_name = GCMVN_NAME
        core.write_global_cmvn(args.out / gcmvn_name, [features[args.train_split]])
        summary.wrote(gcmvn_name)
    for split, items in groups.items():
        rows = features[split].manifest_rows(items)
        if "pair" in args.outputs:
            name = pair_manifest_name(split)
            core.write_manifest(summary, args.out / name, rows, S2T_COLUMNS)
        if "asr" in args.outputs:
            name = fine_tuning_manifest_name(split, task)
            asr_rows = [{**row, "tgt_text": row["tgt_text"].lower()} for row in rows]
            core.write_manifest(summary, args.out / name, asr_rows, S2T_COLUMNS)
    if "asr" in args.outputs:
        config = {**data_config.speech_config(
                      args.out, args.cmvn, gcmvn_name,
                      specaugment_policy=None if args.specaugment == "none" else args.specaugment),
                  **data_config.vocabulary_config(spm_name, spm_name.replace(".model", ".txt"))}
        config_name = fine_tuning_config_name(task)
        data_config.write_config(args.out / config_name, config)
        summary.wrote(config_name)
    summary.wrote(data_config.merge_speech_keys(args.out / DATA_CONFIG_NAME, args.out, args.cmvn, gcmvn_name,
                                                "prep_librispeech", settings,
                                                own_gcmvn_name=GCMVN_NAME))
    summary.finish()
    return summary


cli = core.console_command(main)  # the installed command (setup.py)


if __name__ == "__main__":
    cli()
