#!/usr/bin/env python3
"""Host memory of a large speech manifest held by pre-training, against stock fairseq's S2T dataset.

Writes a manifest of ``--rows`` rows shaped like Libri-Light's (ids of about 40 characters, feature
references into shard zips, no transcript; ``--text`` adds a sentence to every row, as a pair
manifest has), then loads it in fresh processes, alternating the sides ``--repeats`` times:

- ours: :func:`read_speech_rows`, the rows every speech or pair dataset of ``slam_pretraining``
  holds (packed columns, ``slam_formats.packed``);
- stock: ``SpeechToTextDatasetCreator.from_tsv``, fairseq's own dataset of the same manifest
  (one Python list per column), the closest stock equivalent that reads this format.

For each: load seconds, RSS growth held after the load, the peak RSS growth during it, and what a
forked data-loader worker adds to its own private memory by reading every row's id and feature
reference once (``Private_Dirty`` of ``/proc/self/smaps_rollup``: pages copied out of what the
worker shared with its parent). Ends with ``ratio ours/stock held: X`` and
``ratio ours/stock worker copy: Y`` (lower is better).

Usage: python benchmarks/bench_manifest_memory.py [--rows 300000] [--repeats 2] [--text]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIDES = ("ours", "stock")
SENTENCE = "and so it happened that the old house by the river stood empty for many winters"


def write_manifest(path: Path, rows: int, text: bool) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write("id\taudio\tn_frames\ttgt_text\tspeaker\n")
        for index in range(rows):
            speaker = 100 + index % 977
            row_id = f"large_{speaker}_librivox_book{index % 31:03d}_segment{index:07d}"
            audio = f"fbank/large_{index // 5000:04d}.zip:{64 + index * 1234567 % 10 ** 9}:{192128 + index % 999}"
            out.write(f"{row_id}\t{audio}\t{1500 + index % 1500}\t{SENTENCE if text else ''}\t{speaker}\n")


def _rss_kib() -> Dict[str, int]:
    with open("/proc/self/status", encoding="ascii") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}


def _private_dirty_kib() -> int:
    with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
        return sum(int(line.split()[1]) for line in rollup if line.startswith("Private_Dirty"))


def _load(side: str, manifest: Path, text: bool):
    """The loaded rows and a function that reads every row's id and feature reference once."""
    if side == "ours":
        from slam_fairseq.data.pretraining.feature_rows import read_speech_rows

        rows = read_speech_rows(manifest, need_transcript=text)

        def touch() -> int:
            return sum(len(rows.ids[i]) + len(rows.audio[i]) for i in range(len(rows)))
        return rows, touch
    from fairseq.data import Dictionary
    from fairseq.data.audio.data_cfg import S2TDataConfig
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDatasetCreator

    config = manifest.parent / "config.yaml"
    config.write_text("input_feat_per_channel: 80\n")
    dictionary = Dictionary()
    for word in SENTENCE.split():
        dictionary.add_symbol(word)
    dataset = SpeechToTextDatasetCreator.from_tsv(str(manifest.parent), S2TDataConfig(config), manifest.stem,
                                                  dictionary, None, None, is_train_split=True, epoch=1, seed=1)

    def touch() -> int:
        return sum(len(dataset.ids[i]) + len(dataset.audio_paths[i]) for i in range(len(dataset)))
    return dataset, touch


def measure(side: str, manifest: Path, text: bool) -> Dict[str, float]:
    """One side, in this (fresh) process: load, then fork a worker that reads every row."""
    import logging

    logging.disable(logging.WARNING)
    import numpy  # noqa: F401
    import fairseq.data  # noqa: F401  (imports before the baseline, for both sides)
    import slam_fairseq.data.pretraining.feature_rows  # noqa: F401
    import fairseq.data.audio.speech_to_text_dataset  # noqa: F401
    import gc

    gc.collect()
    before = _rss_kib()["VmRSS"]
    start = time.perf_counter()
    held, touch = _load(side, manifest, text)
    seconds = time.perf_counter() - start
    gc.collect()
    after = _rss_kib()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        private = _private_dirty_kib()
        touch()
        copied = _private_dirty_kib() - private
        os.write(write, str(copied).encode())
        os._exit(0)
    os.close(write)
    copied = int(os.read(read, 64).decode())
    os.waitpid(child, 0)
    del held
    return {"seconds": seconds, "held_mib": (after["VmRSS"] - before) / 1024,
            "peak_mib": (after["VmHWM"] - before) / 1024, "worker_copy_mib": copied / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text", action="store_true", help="a transcript in every row (a pair manifest)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, Path(args.manifest), args.text)))
        return
    with tempfile.TemporaryDirectory() as work:
        manifest = Path(work) / "speech_train.tsv"
        write_manifest(manifest, args.rows, args.text)
        print(f"manifest: {args.rows} rows, {manifest.stat().st_size / 2 ** 20:.1f} MiB on disk"
              f"{' (with transcripts)' if args.text else ''}")
        results = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side in SIDES:
                command = [sys.executable, __file__, "--side", side, "--manifest", str(manifest)]
                output = subprocess.run(command + (["--text"] if args.text else []), check=True,
                                        capture_output=True, text=True).stdout
                results[side].append(json.loads(output.strip().splitlines()[-1]))
    print(f"{'side':6} {'load s':>7} {'held MiB':>9} {'B/row':>6} {'peak MiB':>9} {'worker copy MiB':>16}")
    best = {}
    for side in SIDES:
        best[side] = {key: min(run[key] for run in results[side]) for key in results[side][0]}
        row = best[side]
        print(f"{side:6} {row['seconds']:7.2f} {row['held_mib']:9.1f} {row['held_mib'] * 2 ** 20 / args.rows:6.0f} "
              f"{row['peak_mib']:9.1f} {row['worker_copy_mib']:16.1f}")
    print(f"ratio ours/stock held: {best['ours']['held_mib'] / best['stock']['held_mib']:.2f}")
    print(f"ratio ours/stock worker copy: "
          f"{best['ours']['worker_copy_mib'] / max(best['stock']['worker_copy_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
