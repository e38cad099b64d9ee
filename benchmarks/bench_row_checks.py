#!/usr/bin/env python3
"""Cost of the load-time row checks of pre-training (``pretraining_row_checks``), in rows per second.

Writes shard zips of ``.npy`` features as the manifest scripts store them (``--rows`` entries of
``--frames`` x 80 float32, ``--shards`` zips), then times :func:`drop_bad_feature_rows` over all rows
(file sizes once per zip, one seek + header read per row), cold-ish (first pass) and warm (second
pass, page cache full). Also reported: the same rows read in full by ``read_features``, for scale.

Usage: python benchmarks/bench_row_checks.py [--rows 20000] [--frames 300] [--shards 4]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from manifests.core import stored_zip_entries  # noqa: E402
from slam_formats.features import read_features  # noqa: E402
from slam_fairseq.data.pretraining.row_checks import drop_bad_feature_rows  # noqa: E402
from slam_fairseq.data.pretraining.feature_rows import SpeechRows  # noqa: E402


def write_shards(root: Path, rows: int, frames: int, shards: int) -> list:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((frames, 80), dtype=np.float32))
    entry = buffer.getvalue()
    audio = []
    for shard in range(shards):
        path = root / f"shard{shard}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for index in range(shard, rows, shards):
                archive.writestr(f"u{index}.npy", entry)
        audio += [f"{path.name}:{offset}:{length}" for offset, length in stored_zip_entries(path).values()]
    return audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        audio = write_shards(root, args.rows, args.frames, args.shards)
        rows = SpeechRows(root / "speech_train.tsv", [f"u{i}" for i in range(len(audio))], audio,
                          np.full(len(audio), args.frames), [""] * len(audio))
        for label in ("first pass", "second pass"):
            start = time.perf_counter()
            kept, report = drop_bad_feature_rows(rows, str(root), 80)
            seconds = time.perf_counter() - start
            assert len(kept) == len(rows) and report.num_bad == 0
            print(f"checks, {label}: {len(rows)} rows in {seconds:.3f} s = {len(rows) / seconds:,.0f} rows/s")
        sample = audio[:: max(1, len(audio) // 2000)]
        start = time.perf_counter()
        for field in sample:
            read_features(field, str(root))
        seconds = time.perf_counter() - start
        print(f"full reads (for scale): {len(sample)} rows in {seconds:.3f} s = {len(sample) / seconds:,.0f} rows/s")


if __name__ == "__main__":
    main()
