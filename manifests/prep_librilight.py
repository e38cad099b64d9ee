#!/usr/bin/env python3
"""Libri-Light (unlabeled speech) -> SLAM speech-only manifests ``speech_<split>.tsv``.

Reads Libri-Light as it ships: ``ROOT/<subset>/<speaker>/<book>/*.flac`` (the ``.json`` metadata
beside each file is ignored). ``--splits`` maps subset directories to output splits
(``small:train``; ``.:train`` when ROOT itself holds the speaker directories). Ids are the
file's path below SUBSET_DIR joined by ``-`` (``<speaker>-<book>-<file stem>``); the ``speaker``
column is the directory two levels above the file (the speaker's); ``tgt_text`` is empty.

Writes into ``--out``: ``speech_<split>.tsv``, ``fbank/librilight_<split>_<k>.{zip,json}``,
``config.yaml`` (feature keys merged in), ``gcmvn_speech.npz`` with ``--cmvn global``,
``skipped_librilight.tsv``, ``summary_librilight.json``.

Libri-Light files are long (minutes): ``--segment-seconds 30`` cuts each into 30 s segments
(ids ``<id>_0000``, ...; a last piece under --min-seconds is dropped); default 0 keeps whole files.
``--valid-items N`` moves N files (chosen by a hash of their id, so always the same ones) from
the first split into ``speech_valid.tsv``.

Bad audio is skipped and counted (named in the summary): unreadable, empty, too short, silent,
stereo (unless --downmix), below --min-sample-rate; other rates are resampled to 16 kHz and counted.
--on-the-fly: ``audio`` names the flac itself (segments become FLAC copies in the shard zip).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifests import core, data_config  # noqa: E402
from slam_formats.manifest import S2T_COLUMNS
from slam_formats.names import DATA_CONFIG_NAME, speech_manifest_name

AUDIO_SUFFIXES = (".flac", ".wav")
GCMVN_NAME = "gcmvn_speech.npz"  # this script's --cmvn global statistics
PRETRAINING_MAX_FRAMES = 6000  # slam_pretraining's default --max-source-positions (10 ms frames)


def list_librilight_dir(subset_dir: Path) -> List[core.AudioItem]:
    """Items of one Libri-Light subset directory (``<speaker>/<book>/*.flac``)."""
    if not subset_dir.is_dir():
        raise core.UsageError(f"{subset_dir}: no such Libri-Light directory")
    items = []
    for path in core.walk_files(subset_dir, AUDIO_SUFFIXES):
        parts = path.relative_to(subset_dir).with_suffix("").parts
        item_id = "-".join("_".join(part.split()) for part in parts)
        # Libri-Light's files are <speaker>/<book>/<file>: the speaker is two directories up,
        # also when SUBSET_DIR lies above the subset (``.:train`` over a root holding ``small/``)
        speaker = parts[-3] if len(parts) >= 3 else parts[0] if len(parts) > 1 else ""
        items.append(core.AudioItem(item_id, str(path), core.file_size(path), {"tgt_text": "", "speaker": speaker}))
    return items


def hold_out(items: List[core.AudioItem], count: int):
    """(kept, held out): the ``count`` items with the smallest sha1 of their id."""
    ranked = sorted(items, key=lambda item: hashlib.sha1(item.id.encode("utf-8")).hexdigest())
    held = {item.id for item in ranked[:count]}
    return [item for item in items if item.id not in held], [item for item in items if item.id in held]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="the Libri-Light directory (holding small/ ...)")
    parser.add_argument("--splits", nargs="+", default=["small:train"],
                        help="SUBSET_DIR:SPLIT maps (default: small:train)")
    parser.add_argument("--valid-items", type=int, default=0,
                        help="move this many files of the first split into split 'valid' (default 0)")
    parser.add_argument("--segment-seconds", type=float, default=0.0,
                        help="cut files into segments of this many seconds (default 0: whole files)")
    parser.add_argument("--train-split", default="train", help="split for --cmvn global statistics")
    core.add_run_arguments(parser)
    core.add_audio_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> core.RunSummary:
    args = parse_args(argv)
    context = core.context_from_args(args, "librilight")
    groups: Dict[str, List[core.AudioItem]] = {}
    split_map = core.parse_split_map(args.splits, "--splits")
    for directory, split in split_map:
        groups.setdefault(split, []).extend(list_librilight_dir(args.root / directory))
    if args.valid_items < 0:
        raise core.UsageError(f"--valid-items {args.valid_items}: expected a count of files, 0 or more")
    if args.valid_items > 0:
        first = split_map[0][1]
        if not groups[first]:
            raise core.UsageError(f"--valid-items {args.valid_items}: split {first!r} has no audio files "
                                  f"(under {args.root}) to hold out from")
        if args.valid_items >= len(groups[first]):
            raise core.UsageError(f"--valid-items {args.valid_items} would move all {len(groups[first])} files of "
                                  f"split {first!r} to valid, leaving nothing to train on; give fewer")
        groups[first], held = hold_out(groups[first], args.valid_items)
        groups.setdefault("valid", []).extend(held)
    if args.cmvn == "global" and args.train_split not in groups:
        raise core.UsageError(f"--train-split {args.train_split} is not one of the output splits {sorted(groups)}")
    options = core.audio_options_from_args(args, segment_seconds=args.segment_seconds)
    settings = {"mel_high_freq": options.mel_high_freq}
    data_config.check_feature_settings(args.out / DATA_CONFIG_NAME, "prep_librilight", settings)
    features = core.extract_features(context, options, groups, "librilight")

    gcmvn_name = None
    if args.cmvn == "global":
        gcmvn_name = GCMVN_NAME
        core.write_global_cmvn(args.out / gcmvn_name, [features[args.train_split]])
        context.summary.wrote(gcmvn_name)
    long_rows = total_rows = 0
    for split, items in groups.items():
        name = speech_manifest_name(split)
        rows = features[split].manifest_rows(items)
        core.write_manifest(context.summary, args.out / name, rows, S2T_COLUMNS)
        long_rows += sum(int(row["n_frames"]) > PRETRAINING_MAX_FRAMES for row in rows)
        total_rows += len(rows)
    if long_rows:
        context.summary.warnings.append(
            f"{long_rows} of {total_rows} rows are longer than {PRETRAINING_MAX_FRAMES} frames "
            f"({PRETRAINING_MAX_FRAMES // 100} s), slam_pretraining's default --max-source-positions, which skips "
            "them: cut the files with --segment-seconds 30 (their features are computed again), or raise "
            "--max-source-positions")
    context.summary.wrote(data_config.merge_speech_keys(args.out / DATA_CONFIG_NAME, args.out, args.cmvn, gcmvn_name,
                                                        "prep_librilight", settings,
                                                        own_gcmvn_name=GCMVN_NAME))
    context.summary.finish()
    return context.summary


cli = core.console_command(main)  # the installed command (setup.py)


if __name__ == "__main__":
    cli()
