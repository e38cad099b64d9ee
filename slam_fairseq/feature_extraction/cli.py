"""``slam-fairseq-extract-features``: the states of chosen encoder layers for every row of a manifest.

    slam-fairseq-extract-features CHECKPOINT MANIFEST OUT_DIR --layer 12 [--shard 0 --num-shards 4]

For a ``slam`` (pre-training) or ``slam_s2t`` (fine-tuned) checkpoint and an S2T manifest or a
wav2vec list (:mod:`inputs`), writes for each ``--layer L`` HuBERT's feature layout, which its
``simple_kmeans/learn_kmeans.py`` and ``dump_km_label.py`` read as they are (:mod:`outputs`):
``OUT_DIR/layerL/NAME_SHARD_NUMSHARDS.{npy,len,ids}``, one entry per row of the shard, in order.
Layers: 0 is the subsampling's output, 1 .. N the speech encoder's, N + 1 .. N + M the multimodal
encoder's; the default is N + M, the encoder's output (:mod:`slam_fairseq.encoders.layer_states`).

Frames are normalised as the checkpoint was trained (``--normalization checkpoint``, read from the
run's data directory, or ``--data``). Rows are read 8 batches' worth at a time (by ``--workers``
processes), sorted by length and batched up to ``--max-frames`` padded frames (:mod:`encoding`).
A shard's files appear when it is done; a shard already done with the same settings is not redone,
so a list of shards can be re-run after a kill, and a shard stopped part way (SIGKILL included) is
resumed after the last batch window it finished (:class:`ShardOutputs`). A row without states (unreadable,
under 7 frames, out of memory alone, non-finite states) keeps its place with length 0 and is listed
in ``NAME_SHARD_NUMSHARDS.skipped.tsv`` (``--strict``: an unreadable row is an error naming it).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from slam_formats.features import AudioError
from slam_formats.manifest import ManifestError
from slam_fairseq.encoders.layer_states import check_layers
from slam_fairseq.feature_extraction.checkpoint_encoder import (NORMALIZATIONS, CheckpointError, FeatureTransform,
                                                                load_checkpoint_encoder, named_feature_transform,
                                                                training_feature_transform)
from slam_fairseq.feature_extraction.encoding import encode_window
from slam_fairseq.feature_extraction.inputs import InputRow, InputShard, list_name, read_input_shard, read_row_features
from slam_fairseq.feature_extraction.outputs import ShardOutputs, finished_summary, write_summary
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES

logger = logging.getLogger("slam_fairseq.extract_features")

__all__ = ["main", "extract_features", "build_parser"]

_SECONDS_PER_FRAME = 0.01
SORT_WINDOW_BATCHES = 8  # rows are read this many batches' worth of frames at a time and sorted by length
_FORMAT = 1  # of the outputs and the summary's settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slam-fairseq-extract-features", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a slam (pre-training) or slam_s2t (fine-tuned) checkpoint")
    parser.add_argument("manifest", help="an S2T manifest (a header with id and audio) or a wav2vec list (root "
                                         "line, then path<TAB>num_samples)")
    parser.add_argument("out_dir", help="where layerL/NAME_SHARD_NUMSHARDS.{npy,len,ids} go")
    parser.add_argument("--layer", type=int, nargs="+", default=None,
                        help="layer numbers: 0 subsampling, 1..N speech encoder, N+1..N+M multimodal encoder "
                             "(default: N+M, the encoder output)")
    parser.add_argument("--shard", type=int, default=0, help="which contiguous shard of the rows (0-based)")
    parser.add_argument("--num-shards", type=int, default=1, help="how many shards the rows are cut into")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="checkpoint",
                        help="log-Mel normalisation: 'checkpoint' is the one the checkpoint was trained with")
    parser.add_argument("--data", default=None,
                        help="the run's data directory, where the checkpoint's own path is not on this machine")
    parser.add_argument("--global-cmvn", default=None, help="mean/std .npz for --normalization global")
    parser.add_argument("--audio-root", default=None,
                        help="resolve relative audio paths here (default: the manifest's directory, or a wav2vec "
                             "list's root line)")
    parser.add_argument("--max-frames", type=int, default=20000,
                        help="padded log-Mel frames per batch (10 ms each); a longer row runs alone")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes reading and normalising rows (0: the main process)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored type")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:1 (default: cuda if there, else cpu)")
    parser.add_argument("--cpu", action="store_true", help="the same as --device cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--fp16", action="store_true", help="float16 autocast (GPU)")
    parser.add_argument("--downmix", action="store_true",
                        help="average the channels of audio with several (else such rows are listed as unreadable)")
    parser.add_argument("--strict", action="store_true", help="stop at the first row that cannot be read")
    parser.add_argument("--overwrite", action="store_true", help="redo a shard that is already done, or that stopped part way, from its first row")
    return parser


def _file_identity(path: str) -> Dict[str, object]:
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _settings(args: argparse.Namespace) -> Dict[str, object]:
    """What decides a shard's outputs, from the command line and the files it names (compared
    before anything is loaded, to skip a shard that is done)."""
    for path, what in ((args.checkpoint, "checkpoint"), (args.manifest, "manifest")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such {what}")
    return {"format": _FORMAT, "checkpoint": _file_identity(args.checkpoint), "manifest": _file_identity(args.manifest),
            "shard": args.shard, "num_shards": args.num_shards, "layers": sorted(set(args.layer or [])) or "last",
            "normalization": args.normalization, "data": args.data and str(Path(args.data).resolve()),
            "global_cmvn": args.global_cmvn and _file_identity(args.global_cmvn),
            "audio_root": args.audio_root and str(Path(args.audio_root).resolve()), "dtype": args.dtype,
            "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else None, "downmix": args.downmix}


def _device(args: argparse.Namespace) -> torch.device:
    if args.cpu:
        return torch.device("cpu")
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _RowRead:
    """What reading a row gave: normalised (T, F) features, or the problem (``short``: a readable
    row under 7 frames, which has no encoder frame)."""

    features: Optional[np.ndarray] = None
    problem: Optional[str] = None
    short: bool = False


def _read(job: Tuple[Path, InputRow, int, FeatureTransform, bool]) -> _RowRead:
    """One row read and normalised: what a reading process returns."""
    root, row, feature_dim, transform, downmix = job
    try:
        features = read_row_features(root, row, feature_dim, downmix)
    except AudioError as error:
        return _RowRead(problem=str(error))
    if len(features) < MIN_INPUT_FRAMES:
        return _RowRead(problem=f"{len(features)} frames, under {MIN_INPUT_FRAMES}: no encoder frame", short=True)
    return _RowRead(transform(features))


def _read_rows(inputs: InputShard, feature_dim: int, transform: FeatureTransform,
               workers: int, downmix: bool = False, first: int = 0) -> Iterator[Tuple[InputRow, _RowRead]]:
    """Each row of the shard from its ``first`` on, with what reading it gave, in order
    (``workers`` processes, or this one)."""
    rows = inputs.rows[first:]
    jobs = ((inputs.root, row, feature_dim, transform, downmix) for row in rows)
    if workers <= 0:
        yield from zip(rows, map(_read, jobs))
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from zip(rows, pool.imap(_read, jobs, chunksize=4))


def extract_features(args: argparse.Namespace) -> Dict[str, object]:
    """Run one shard (module docstring); returns the summary written to ``NAME_SHARD_NUMSHARDS.json``."""
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 exclude each other")
    if args.max_frames < 1:
        raise ValueError(f"--max-frames must be positive, got {args.max_frames}")
    out_dir = Path(args.out_dir)
    stem = f"{list_name(Path(args.manifest))}_{args.shard}_{args.num_shards}"
    settings = _settings(args)
    if not args.overwrite:
        done = finished_summary(out_dir, stem, settings)
        if done is not None:
            logger.info(f"{out_dir / stem}: this shard is already done with the same settings (--overwrite redoes it)")
            return done
    loaded = load_checkpoint_encoder(args.checkpoint)
    layers = sorted(set(args.layer)) if args.layer else [loaded.num_layers]
    check_layers(layers, loaded.num_layers)
    inputs = read_input_shard(args.manifest, args.num_shards, args.shard, args.audio_root)
    if args.normalization == "checkpoint":
        transform, normalization = training_feature_transform(loaded, args.data, inputs.name)
    else:
        transform, normalization = named_feature_transform(args.normalization, args.global_cmvn, loaded.feature_dim)
    device = _device(args)
    autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    encoder = loaded.encoder.to(device)
    logger.info(f"{loaded.path} ({loaded.model or '?'}, layers 0..{loaded.num_layers}): layers {layers} of rows "
                f"{inputs.start}..{inputs.end - 1} of {inputs.path} ({inputs.num_rows} rows), {normalization}, "
                f"on {device}")
    counts = {"rows": len(inputs.rows), "with_states": 0, "unreadable": 0, "too_short": 0, "failed": 0,
              "input_frames": 0, "frames": 0}
    started = last_report = time.perf_counter()
    outputs = ShardOutputs(out_dir, stem, layers, encoder.embed_dim, args.dtype, settings, resume=not args.overwrite)
    first = outputs.rows_done
    if first:
        counts.update(outputs.counts)
        logger.info(f"resuming at row {first} of {counts['rows']}: the rows before it are in the files of the run "
                    f"that stopped (--overwrite starts over)")
    frames_before = counts["input_frames"]
    window: List[Tuple[InputRow, _RowRead]] = []
    window_frames = 0

    def run_window() -> None:
        results = encode_window(encoder, [read.features for _, read in window], layers, args.max_frames, device,
                                autocast)
        for (row, read), result in zip(window, results):
            if read.problem is not None:
                outputs.add_without_states(row.id, row.audio, read.problem)
            elif result.problem is not None:
                counts["failed"] += 1
                logger.warning(f"{inputs.path}: row {row.id!r}: {result.problem}")
                outputs.add_without_states(row.id, row.audio, result.problem)
            else:
                outputs.add(row.id, result.states, row.audio)
                counts["with_states"] += 1
                counts["frames"] += len(next(iter(result.states.values())))
        window.clear()
        outputs.save_progress(counts)

    try:
        for row, read in _read_rows(inputs, loaded.feature_dim, transform, args.workers, args.downmix, first):
            if read.short:
                counts["too_short"] += 1
            elif read.problem is not None:
                if args.strict:
                    raise AudioError(f"{inputs.path}: row {row.id!r}: {read.problem}")
                counts["unreadable"] += 1
                logger.warning(f"{inputs.path}: row {row.id!r}: {read.problem}")
            else:
                counts["input_frames"] += len(read.features)
                window_frames += len(read.features)
            window.append((row, read))
            if window_frames >= SORT_WINDOW_BATCHES * args.max_frames:
                run_window()
                window_frames = 0
            now = time.perf_counter()
            if now - last_report > 60:
                last_report = now
                logger.info(f"{len(outputs.ids) + len(window)} of {counts['rows']} rows, "
                            f"{counts['input_frames'] * _SECONDS_PER_FRAME / 3600:.2f} h of audio, "
                            f"{(counts['input_frames'] - frames_before) * _SECONDS_PER_FRAME / (now - started):.0f}x "
                            "real time")
        run_window()
        files = outputs.close()
    except BaseException:
        outputs.suspend()  # the rows up to the last window stay, for a rerun to resume from
        raise
    without = counts["rows"] - counts["with_states"]
    if without:
        logger.warning(f"{without} of {counts['rows']} rows have no states ({counts['unreadable']} unreadable, "
                       f"{counts['too_short']} under {MIN_INPUT_FRAMES} frames, {counts['failed']} failed): length 0 "
                       f"in the .len files, listed in {out_dir / (stem + '.skipped.tsv')}")
    if counts["frames"] == 0:
        logger.warning(f"{out_dir / stem}: no row of this shard gave a state")
    elapsed = time.perf_counter() - started
    summary = {"settings": settings, "layers": layers, "normalization": normalization, "embed_dim": encoder.embed_dim,
               "rows": [inputs.start, inputs.end], "counts": counts, "files": files, "seconds": round(elapsed, 3),
               "resumed_at_row": first}
    path = write_summary(out_dir, stem, summary)
    logger.info(f"done: {counts['with_states']} rows, {counts['frames']} frames per layer, "
                f"{(counts['input_frames'] - frames_before) * _SECONDS_PER_FRAME / max(elapsed, 1e-9):.0f}x real "
                f"time; {path}")
    return summary


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the shard's partial files stay, for a resume


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        extract_features(args)
    except (CheckpointError, ManifestError, AudioError, FileNotFoundError, ValueError) as error:
        logger.error(str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
