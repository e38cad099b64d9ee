#!/usr/bin/env python3
"""Feature-extraction throughput of the manifest pipeline, in seconds of audio per second.

Synthesizes 16 kHz mono FLAC files (speech-like: a gliding harmonic tone with noise and pauses),
then measures
  1. ``audio_features.compute_fbank`` alone (in memory, one process, as many seconds of audio);
  2. the whole per-file path of ``manifests.core.extract_features`` (read flac, check, fbank, write
     the shard zips and records) with each ``--workers`` count (default 1 and 2).
Reported: audio seconds per wall-clock second, in total and per worker (x real time), and per
CPU-second actually used (this process + its workers; stays meaningful on a busy machine). The
target of issue #3 is 300x real time per core or better, that of issue #13 1000x for compute_fbank.
With ``--profile``, a third run (1 worker, in this process, under cProfile timed in CPU seconds)
prints each stage's share of the pipeline's CPU time: reading and decoding, checks, fbank, .npy
encoding, zip writes, CMVN sums.

Usage: python benchmarks/bench_features.py [--minutes 10] [--file-seconds 15] [--workers 1 2] [--profile]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from manifests import core  # noqa: E402
from slam_formats import features as audio_features  # noqa: E402


def synthesize(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rate = audio_features.SAMPLE_RATE
    time_axis = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * time_axis + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = (np.sin(2 * np.pi * 3 * time_axis) > -0.3).astype(np.float32)  # syllables and pauses
    waveform = 0.2 * voiced * envelope + 0.01 * rng.standard_normal(len(time_axis))
    return np.clip(waveform, -1, 1).astype(np.float32)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# the stages of manifests.core's per-file path: (label, the function that does it)
_STAGES = (("read + decode audio", audio_features.read_audio),
           ("checks (silence, length)", core._check_waveform),
           ("compute_fbank", audio_features.compute_fbank),
           ("CMVN sums", core._CmvnSums.add),
           (".npy encoding", core.npy_bytes),
           ("zip writes", zipfile.ZipFile.writestr))


def profile_pipeline(context: core.RunContext, items: list) -> None:
    """The 1-worker pipeline in this process, under cProfile in CPU seconds: each stage's share."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)
    cpu_started = time.process_time()
    profiler.runcall(core.extract_features, context, core.AudioOptions(), {"train": list(items)}, "bench")
    cpu = time.process_time() - cpu_started
    stats = pstats.Stats(profiler).stats
    print(f"pipeline stages (1 worker, in process, {cpu:.2f} CPU-s under the profiler):")
    for label, function in _STAGES:
        code = function.__code__
        seconds = stats.get((code.co_filename, code.co_firstlineno, code.co_name), (0, 0, 0, 0.0))[3]
        print(f"  {label:26s} {seconds:6.2f} CPU-s {100 * seconds / cpu:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="audio to process per run (default 10)")
    parser.add_argument("--file-seconds", type=float, default=15.0, help="length of each file (default 15)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also print each pipeline stage's share")
    args = parser.parse_args()

    import soundfile as sf

    num_files = max(1, int(round(args.minutes * 60 / args.file_seconds)))
    with tempfile.TemporaryDirectory(prefix="bench_features_") as work:
        work_dir = Path(work)
        items = []
        for index in range(num_files):
            path = work_dir / "audio" / f"utt{index:05d}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), synthesize(args.file_seconds, index), audio_features.SAMPLE_RATE, subtype="PCM_16")
            items.append(core.AudioItem(f"utt{index:05d}", str(path), path.stat().st_size))
        audio_seconds = num_files * args.file_seconds
        print(f"{num_files} files x {args.file_seconds:g} s = {audio_seconds / 60:.1f} min of 16 kHz audio")

        waveform = synthesize(args.file_seconds, 0)
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        repeats = max(1, int(args.minutes * 60 / args.file_seconds))  # as much audio as the pipeline runs
        for _ in range(repeats):
            audio_features.compute_fbank(waveform)
        elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
        print(f"compute_fbank alone:        {repeats * args.file_seconds / elapsed:8.0f}x real time (1 process), "
              f"{repeats * args.file_seconds / cpu:6.0f}x per CPU-second")

        for workers in args.workers:
            out_dir = work_dir / f"out_{workers}"
            summary = core.RunSummary("bench", out_dir)
            context = core.RunContext(out_dir=out_dir, summary=summary, workers=workers,
                                      shard_size=args.shard_size, progress=False)
            started, cpu_started = time.perf_counter(), _cpu_seconds()
            core.extract_features(context, core.AudioOptions(), {"train": list(items)}, "bench")
            elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
            speed = audio_seconds / elapsed
            print(f"pipeline, {workers} worker(s):      {speed:8.0f}x real time total, "
                  f"{speed / workers:6.0f}x per worker, {audio_seconds / cpu:6.0f}x per CPU-second "
                  f"({elapsed:.2f} s wall)")
        if args.profile:
            out_dir = work_dir / "out_profile"
            profile_pipeline(core.RunContext(out_dir=out_dir, summary=core.RunSummary("bench", out_dir), workers=1,
                                             shard_size=args.shard_size, progress=False), items)


if __name__ == "__main__":
    main()
