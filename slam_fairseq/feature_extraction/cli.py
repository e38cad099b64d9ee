"""``slam-fairseq-extract-features``: the states of chosen encoder layers for every row of a manifest.

    slam-fairseq-extract-features CHECKPOINT MANIFEST OUT_DIR --layer 12 [--shard 0 --num-shards 4]

For a ``slam`` (pre-training) or ``slam_s2t`` (fine-tuned) checkpoint and an S2T manifest or a
wav2vec list (:mod:`inputs`), writes for each ``--layer L`` HuBERT's feature layout, which its
``simple_kmeans/learn_kmeans.py`` and ``dump_km_label.py`` read as they are:

- ``OUT_DIR/layerL/NAME_SHARD_NUMSHARDS.npy``: (total frames, D) states of every row in order,
  4x subsampled (40 ms per frame);
- ``.len``: one frame count per row; ``.ids``: one row id per line (the rows in the ``.npy``);

and beside the layer folders ``NAME_SHARD_NUMSHARDS.json`` (what was extracted, how, counts) and,
if some rows could not be read, ``NAME_SHARD_NUMSHARDS.skipped.tsv`` (id, audio, why). Layers:
0 is the subsampling's output, 1 .. N the speech encoder's, N + 1 .. N + M the multimodal
encoder's; the default is N + M, the encoder's output (:mod:`slam_fairseq.encoders.layer_states`).

Frames are normalised as the checkpoint was trained (``--normalization checkpoint``, read from the
run's data directory, or ``--data``). Rows are read 8 batches' worth at a time, sorted by length
and batched up to ``--max-frames`` padded frames (a row gives the same states alone or in a batch,
to float rounding); the outputs keep the manifest's order. Files appear
when the shard is done, and a shard already done with the same settings is not redone, so a list
of shards can be re-run after a kill. A row that cannot be read is skipped and listed (``--strict``:
an error naming it); a row under 7 frames has no encoder frame and gets a length of 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from slam_formats.atomic import atomic_write_text
from slam_formats.features import AudioError
from slam_formats.manifest import ManifestError
from slam_formats.npy_rows import NpyRowWriter
from slam_fairseq.encoders.layer_states import check_layers
from slam_fairseq.feature_extraction.checkpoint_encoder import (NORMALIZATIONS, CheckpointError, load_checkpoint_encoder,
                                                                named_feature_transform, training_feature_transform)
from slam_fairseq.feature_extraction.inputs import InputList, read_input_list, read_row_features, shard_range
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES

logger = logging.getLogger("slam_fairseq.extract_features")

__all__ = ["main", "extract_features", "build_parser", "length_sorted_batches"]

_SECONDS_PER_FRAME = 0.01
SORT_WINDOW_BATCHES = 8  # rows are read this many batches' worth of frames at a time and sorted by length


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slam-fairseq-extract-features", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a slam (pre-training) or slam_s2t (fine-tuned) checkpoint")
    parser.add_argument("manifest", help="an S2T manifest (id, audio, n_frames, ...) or a wav2vec list (root line, "
                                         "then path<TAB>num_samples)")
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
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored type")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU or CPU)")
    parser.add_argument("--fp16", action="store_true", help="float16 autocast (GPU)")
    parser.add_argument("--strict", action="store_true", help="stop at the first row that cannot be read")
    parser.add_argument("--overwrite", action="store_true", help="redo a shard that is already done")
    return parser


def _settings(args: argparse.Namespace, layers: Sequence[int], normalization: str) -> Dict[str, object]:
    checkpoint = Path(args.checkpoint).resolve()
    stat = checkpoint.stat()
    return {"checkpoint": str(checkpoint), "checkpoint_bytes": stat.st_size, "checkpoint_mtime": int(stat.st_mtime),
            "manifest": str(Path(args.manifest).resolve()), "layers": list(layers), "shard": args.shard,
            "num_shards": args.num_shards, "normalization": normalization, "dtype": args.dtype}


class _Outputs:
    """The files of one shard: an ``.npy`` writer per layer, the lengths and ids kept in memory."""

    def __init__(self, out_dir: Path, stem: str, layers: Sequence[int], width: int, dtype: str) -> None:
        self.directories = {layer: out_dir / f"layer{layer}" for layer in layers}
        self.stem = stem
        self.writers = {layer: NpyRowWriter(str(directory / f"{stem}.npy"), width, np.dtype(dtype))
                        for layer, directory in self.directories.items()}
        self.lengths: List[int] = []
        self.ids: List[str] = []

    def add(self, row_id: str, states: Dict[int, np.ndarray]) -> None:
        for layer, writer in self.writers.items():
            writer.append(states[layer])
        self.lengths.append(len(next(iter(states.values()))))
        self.ids.append(row_id)

    def close(self) -> None:
        for layer, writer in self.writers.items():
            writer.close()
            directory = self.directories[layer]
            atomic_write_text(str(directory / f"{self.stem}.len"), "".join(f"{n}\n" for n in self.lengths))
            atomic_write_text(str(directory / f"{self.stem}.ids"), "".join(f"{i}\n" for i in self.ids))

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def _autocast(device: torch.device, args: argparse.Namespace):
    if args.bf16 or args.fp16:
        return torch.autocast(device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16)
    return torch.autocast(device.type, enabled=False)


def extract_features(args: argparse.Namespace) -> Dict[str, object]:
    """Run one shard (module docstring); returns the summary written to ``NAME_SHARD_NUMSHARDS.json``."""
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 exclude each other")
    if args.max_frames < 1:
        raise ValueError(f"--max-frames must be positive, got {args.max_frames}")
    loaded = load_checkpoint_encoder(args.checkpoint)
    layers = sorted(set(args.layer)) if args.layer else [loaded.num_layers]
    check_layers(layers, loaded.num_layers)
    inputs = read_input_list(args.manifest, args.audio_root)
    start, end = shard_range(len(inputs.rows), args.num_shards, args.shard)
    if args.normalization == "checkpoint":
        transform, normalization = training_feature_transform(loaded, args.data, inputs.name)
    else:
        transform, normalization = named_feature_transform(args.normalization, args.global_cmvn)
    out_dir = Path(args.out_dir)
    stem = f"{inputs.name}_{args.shard}_{args.num_shards}"
    summary_path = out_dir / f"{stem}.json"
    settings = _settings(args, layers, normalization)
    if summary_path.is_file() and not args.overwrite:
        previous = json.loads(summary_path.read_text(encoding="utf-8"))
        if previous.get("settings") == settings:
            logger.info(f"{summary_path}: this shard is already done with the same settings (--overwrite redoes it)")
            return previous
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    encoder = loaded.encoder.to(device)
    feature_dim = loaded.feature_dim
    logger.info(f"{loaded.path} ({loaded.model or '?'}, layers 0..{loaded.num_layers}): layers {layers} of rows "
                f"{start}..{end - 1} of {inputs.path} ({len(inputs.rows)} rows), {normalization}, on {device}")
    outputs = _Outputs(out_dir, stem, layers, encoder.embed_dim, args.dtype)
    counts = {"rows": end - start, "extracted": 0, "skipped": 0, "too_short": 0, "input_frames": 0, "frames": 0}
    skipped: List[Tuple[str, str, str]] = []
    started = last_report = time.perf_counter()
    window: List[Tuple[str, Optional[np.ndarray]]] = []  # rows read, in manifest order; None: under 7 frames
    window_frames = 0

    def run_window() -> None:
        for row_id, states in _encode_window(encoder, window, layers, device, args):
            outputs.add(row_id, states)
            counts["frames"] += len(next(iter(states.values())))
        window.clear()

    try:
        for row in inputs.rows[start:end]:
            try:
                features = read_row_features(inputs, row, feature_dim)
            except AudioError as error:
                if args.strict:
                    raise
                skipped.append((row.id, row.audio, str(error).replace("\t", " ").replace("\n", " ")))
                logger.warning(f"skipped: {error}")
                continue
            counts["extracted"] += 1
            counts["input_frames"] += len(features)
            if len(features) < MIN_INPUT_FRAMES:
                counts["too_short"] += 1
                window.append((row.id, None))
                continue
            window.append((row.id, transform(features)))
            window_frames += len(features)
            if window_frames >= SORT_WINDOW_BATCHES * args.max_frames:
                run_window()
                window_frames = 0
            now = time.perf_counter()
            if now - last_report > 60:
                last_report = now
                logger.info(f"{counts['extracted'] + len(skipped)} of {counts['rows']} rows, "
                            f"{counts['input_frames'] * _SECONDS_PER_FRAME / 3600:.2f} h of audio, "
                            f"{counts['input_frames'] * _SECONDS_PER_FRAME / (now - started):.0f}x real time")
        run_window()
        outputs.close()
    except BaseException:
        outputs.abort()
        raise
    counts["skipped"] = len(skipped)
    skipped_path = out_dir / f"{stem}.skipped.tsv"
    if skipped:
        atomic_write_text(str(skipped_path), "id\taudio\tproblem\n" + "".join("\t".join(s) + "\n" for s in skipped))
        logger.warning(f"{len(skipped)} of {counts['rows']} rows could not be read and are not in the outputs "
                       f"(listed in {skipped_path}); the .ids files list the rows that are")
    elif skipped_path.exists():
        skipped_path.unlink()
    if counts["too_short"]:
        logger.warning(f"{counts['too_short']} row(s) under {MIN_INPUT_FRAMES} frames have no encoder frame: "
                       f"length 0 in the .len files")
    elapsed = time.perf_counter() - started
    summary = {"settings": settings, "counts": counts, "embed_dim": encoder.embed_dim,
               "outputs": {str(layer): str((outputs.directories[layer] / f"{stem}.npy").resolve()) for layer in layers},
               "seconds": round(elapsed, 3)}
    atomic_write_text(str(summary_path), json.dumps(summary, indent=2) + "\n")
    logger.info(f"done: {counts['extracted']} rows, {counts['frames']} frames per layer, "
                f"{counts['input_frames'] * _SECONDS_PER_FRAME / max(elapsed, 1e-9):.0f}x real time; {summary_path}")
    return summary


def length_sorted_batches(lengths: Sequence[int], max_frames: int) -> List[List[int]]:
    """Indices of rows grouped into batches of at most ``max_frames`` padded frames (a longer row
    alone), longest rows first, so that rows of similar length share a batch."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: List[List[int]] = []
    for index in order:
        # sorted longest first: a batch's first row is its longest
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_frames:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _encode_window(encoder, window: List[Tuple[str, Optional[np.ndarray]]], layers: Sequence[int],
                   device: torch.device, args: argparse.Namespace):
    """Yield (row id, {layer: (T', D) float32 states}) for each row of the window, in its order;
    rows without features (under 7 frames) get (0, D) states."""
    readable = [index for index, (_, features) in enumerate(window) if features is not None]
    states: Dict[int, Dict[int, np.ndarray]] = {}
    lengths = [len(window[index][1]) for index in readable]
    for batch in length_sorted_batches(lengths, args.max_frames):
        rows = [readable[position] for position in batch]
        for index, row_states in zip(rows, _encode(encoder, [window[index][1] for index in rows], layers, device,
                                                   args)):
            states[index] = row_states
    empty = {layer: np.zeros((0, encoder.embed_dim), np.float32) for layer in layers}
    for index, (row_id, _) in enumerate(window):
        yield row_id, states.pop(index, empty)


@torch.no_grad()
def _encode(encoder, batch: List[np.ndarray], layers: Sequence[int], device: torch.device,
            args: argparse.Namespace) -> List[Dict[int, np.ndarray]]:
    """{layer: (T', D) float32 states} of each (T, F) row of a batch, in order."""
    lengths = torch.tensor([len(features) for features in batch])
    padded = torch.zeros(len(batch), int(lengths.max()), batch[0].shape[1])
    for row, features in enumerate(batch):
        padded[row, :len(features)] = torch.from_numpy(features)
    with _autocast(device, args):
        result = encoder.layer_states(padded.to(device), lengths.to(device), layers)
    output_lengths = (~result.padding_mask).sum(dim=1).tolist()
    states = {layer: value.float().cpu().numpy() for layer, value in result.states.items()}
    return [{layer: value[row, :output_lengths[row]] for layer, value in states.items()} for row in range(len(batch))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    args = build_parser().parse_args(argv)
    try:
        extract_features(args)
    except (CheckpointError, ManifestError, AudioError, FileNotFoundError, ValueError) as error:
        logger.error(str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
