"""``slam-fairseq-extract-features``: the states of chosen encoder layers for every row of a manifest.

    slam-fairseq-extract-features CHECKPOINT MANIFEST OUT_DIR --layer 12 [--shard 0 --num-shards 4]

For a ``slam`` (pre-training) or ``slam_s2t`` (fine-tuned) checkpoint and an S2T manifest or a
wav2vec list (:mod:`inputs`), writes for each ``--layer L`` HuBERT's feature layout, which its
``simple_kmeans/learn_kmeans.py`` and ``dump_km_label.py`` read as they are (:mod:`outputs`):
``OUT_DIR/layerL/NAME_SHARD_NUMSHARDS.{npy,len,ids}``, one entry per row of the shard, in order.
Layers: 0 is the subsampling's output, 1 .. N the speech encoder's, N + 1 .. N + M the multimodal
encoder's; the default is N + M, the encoder's output (:mod:`slam_fairseq.encoders.layer_states`).

Frames are normalised as the checkpoint was trained (``--normalization checkpoint``, read from the
run's data directory, or ``--data``), and audio files get the filterbank band that directory's
config records (``--mel-high-freq`` names another). Rows are read 8 batches' worth at a time (by
``--workers`` processes, about a window ahead), sorted by length and batched up to ``--max-frames``
padded frames (:mod:`encoding`). A shard's files appear when it is done; a shard already done with
the same settings and data files is not redone, so a list of shards can be re-run after a kill, and
a shard stopped part way (SIGKILL included) is resumed after the last batch window it finished
(:class:`ShardOutputs`). Outputs of another job under the same name (a same-named manifest) are
refused rather than replaced, unless ``--overwrite``. A row without states (unreadable,
under 7 frames, out of memory alone, non-finite states) keeps its place with length 0 and is listed
in ``NAME_SHARD_NUMSHARDS.skipped.tsv`` (``--strict``: an unreadable row is an error naming it).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.pool
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from slam_formats.features import AudioError, check_high_freq
from slam_formats.manifest import ManifestError
from slam_fairseq.encoders.layer_states import check_layers
from slam_fairseq.feature_extraction.checkpoint_encoder import (FEATURE_SETTINGS_KEY, NORMALIZATIONS, CheckpointEncoder,
                                                                CheckpointError, FeatureTransform,
                                                                TrainingNormalization, load_checkpoint_encoder,
                                                                named_feature_transform,
                                                                resolve_training_normalization,
                                                                training_mel_high_freq)
from slam_fairseq.feature_extraction.encoding import encode_window
from slam_fairseq.feature_extraction.inputs import InputRow, InputShard, list_name, read_input_shard, read_row_features
from slam_fairseq.feature_extraction.outputs import (OutputConflictError, ShardOutputs, content_identity,
                                                     discard_progress, finished_summary, recorded_runs)
from slam_fairseq.modules.subsampling import MIN_INPUT_FRAMES

logger = logging.getLogger("slam_fairseq.extract_features")

__all__ = ["main", "extract_features", "build_parser"]

_SECONDS_PER_FRAME = 0.01
SORT_WINDOW_BATCHES = 8  # rows are read this many batches' worth of frames at a time and sorted by length
_FORMAT = 2  # of the outputs and the summary's settings


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
    parser.add_argument("--mel-high-freq", type=float, default=None,
                        help="upper edge in Hz of the Mel filterbank of audio files (0: Nyquist, 8000); default: "
                             f"what the run's data config records ({FEATURE_SETTINGS_KEY}, the manifest scripts' "
                             "--mel-high-freq), else 0")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="redo a shard that is already done, or that stopped part way, from its first row; "
                             "replace another manifest's outputs of the same name")
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
            "mel_high_freq": args.mel_high_freq,
            "audio_root": args.audio_root and str(Path(args.audio_root).resolve()), "dtype": args.dtype,
            "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else None, "downmix": args.downmix}


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that cannot work, before anything is read."""
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 exclude each other")
    if args.max_frames < 1:
        raise ValueError(f"--max-frames must be positive, got {args.max_frames}")
    if args.mel_high_freq is not None:
        try:
            check_high_freq(args.mel_high_freq)
        except ValueError as error:
            raise ValueError(f"--mel-high-freq: {error}") from None


def _path_of(identity: object) -> Optional[str]:
    return identity.get("path") if isinstance(identity, dict) else None


def _job(settings: Dict[str, object], layers: object) -> Dict[str, object]:
    """What makes outputs another job's, as opposed to the same job with other options (which a
    run redoes): two jobs under one file name would silently replace each other's files."""
    return {"manifest": _path_of(settings.get("manifest")), "checkpoint": _path_of(settings.get("checkpoint")),
            "layers": layers, "normalization": settings.get("normalization"),
            "global_cmvn": _path_of(settings.get("global_cmvn"))}


def _refuse_another_job(out_dir: Path, stem: str, settings: Dict[str, object], layers: List[int]) -> None:
    """Raise :class:`OutputConflictError` when a summary or progress record under ``stem`` is
    another job's (:func:`_job`): same-named manifests (``a/train.tsv``, ``b/train.tsv``) map to one
    stem."""
    ours = _job(settings, layers)
    for record, recorded_settings, recorded_layers in recorded_runs(out_dir, stem):
        theirs = _job(recorded_settings, recorded_layers)
        differing = [f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ours if theirs[key] != ours[key]]
        if differing:
            raise OutputConflictError(
                f"{record}: {out_dir} holds outputs named {stem} of {theirs['manifest']}, and this run, for "
                f"{ours['manifest']}, would replace them ({'; '.join(differing)}). Outputs are named after the "
                "manifest's file name: write same-named manifests into different output directories, or pass "
                "--overwrite to replace them")


def _normalization(args: argparse.Namespace, loaded: CheckpointEncoder, split: str) -> TrainingNormalization:
    """The normalisation asked for (``checkpoint``: the one the checkpoint was trained with), with
    the files it was read from."""
    if args.normalization == "checkpoint":
        return resolve_training_normalization(loaded, args.data, split)
    transform, description = named_feature_transform(args.normalization, args.global_cmvn, loaded.feature_dim)
    statistics = [Path(args.global_cmvn)] if args.normalization == "global" else []
    return TrainingNormalization(transform, description, statistics)


class _MelBand(NamedTuple):
    """The upper edge in Hz of audio files' Mel filterbank, where it comes from (for the summary),
    and the data config it was read from (part of the shard's identity)."""

    high_freq: float
    source: str
    files: List[Path]


def _mel_band(args: argparse.Namespace, loaded: CheckpointEncoder) -> _MelBand:
    """``--mel-high-freq`` when given, else what the run's data config records, else 0 (Nyquist):
    audio must get the band the checkpoint's training features had, or the encoder reads bins it
    never saw."""
    explicit = args.mel_high_freq
    try:
        recorded, config = training_mel_high_freq(loaded, args.data)
    except CheckpointError as error:
        if explicit is None:
            raise
        logger.warning(f"{error}; audio files get --mel-high-freq {explicit:g}")
        return _MelBand(explicit, "--mel-high-freq", [])
    if explicit is not None:
        if recorded is not None and recorded != explicit:
            logger.warning(f"--mel-high-freq {explicit:g} differs from the {recorded:g} Hz that {config} records for "
                           f"the checkpoint's training features ({FEATURE_SETTINGS_KEY}; 0 is the full band): audio "
                           f"files get {explicit:g}")
        return _MelBand(explicit, "--mel-high-freq", [])
    if config is None:
        return _MelBand(0.0, "default, the full band (no data config to read)", [])
    if recorded is None:
        return _MelBand(0.0, f"default, the full band ({config} records no {FEATURE_SETTINGS_KEY})", [config])
    return _MelBand(recorded, f"{config} ({FEATURE_SETTINGS_KEY})", [config])


def _resolved(normalization: TrainingNormalization, band: _MelBand) -> Dict[str, object]:
    """What the shard's frames depend on beyond the command line, found once the checkpoint is
    loaded: the content of the data files read (a resume with changed statistics starts over, and a
    done shard whose files changed is redone) and the filterbank band."""
    files = list(dict.fromkeys(str(Path(path).resolve()) for path in [*normalization.files, *band.files]))
    return {"data_files": [content_identity(Path(path)) for path in files], "mel_high_freq": band.high_freq,
            "mel_high_freq_from": band.source}


def _device(args: argparse.Namespace) -> torch.device:
    if args.cpu:
        return torch.device("cpu")
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class _RowReader:
    """How rows are read and normalised (what a reading process gets with each row): relative
    paths from ``root``, ``feature_dim`` bins, audio files' filterbank up to ``mel_high_freq``."""

    root: Path
    feature_dim: int
    transform: FeatureTransform
    downmix: bool = False
    mel_high_freq: float = 0.0


@dataclass
class _RowRead:
    """What reading a row gave: normalised (T, F) features, or the problem (``short``: a readable
    row under 7 frames, which has no encoder frame)."""

    features: Optional[np.ndarray] = None
    problem: Optional[str] = None
    short: bool = False


def _read(job: Tuple[_RowReader, InputRow]) -> _RowRead:
    """One row read and normalised: what a reading process returns."""
    reader, row = job
    try:
        features = read_row_features(reader.root, row, reader.feature_dim, reader.downmix, reader.mel_high_freq)
    except AudioError as error:
        return _RowRead(problem=str(error))
    if len(features) < MIN_INPUT_FRAMES:
        return _RowRead(problem=f"{len(features)} frames, under {MIN_INPUT_FRAMES}: no encoder frame", short=True)
    return _RowRead(reader.transform(features))


def _reading_pool(workers: int) -> multiprocessing.pool.Pool:
    """The processes that read rows (spawned: the parent holds torch's threads and the encoder)."""
    return multiprocessing.get_context("spawn").Pool(workers)


class _ReadAhead:
    """How many rows may be read ahead of the caller: about a window's worth of frames (by the mean
    length of the readable rows so far), and at least two per process so that none waits."""

    def __init__(self, workers: int, window_frames: int) -> None:
        self.workers = workers
        self.window_frames = window_frames
        self.readable = 0
        self.frames = 0

    @property
    def rows(self) -> int:
        if not self.readable:
            return 2 * self.workers
        return max(2 * self.workers, int(self.window_frames * self.readable / max(self.frames, 1)))

    def saw(self, read: _RowRead) -> None:
        if read.features is not None:
            self.readable += 1
            self.frames += len(read.features)


def _read_in_order(pool: multiprocessing.pool.Pool, jobs: Iterable[Tuple[_RowReader, InputRow]],
                   read_ahead: _ReadAhead) -> Iterator[_RowRead]:
    """Each job's result in order, with at most ``read_ahead.rows`` jobs submitted and not yet
    taken: ``Pool.imap`` would submit them all at once and keep every result the caller has not
    taken, which for a long shard is all of its features."""
    jobs = iter(jobs)
    pending: Deque[multiprocessing.pool.AsyncResult] = deque()
    exhausted = False
    while True:
        while not exhausted and len(pending) < read_ahead.rows:
            job = next(jobs, None)
            exhausted = job is None
            if not exhausted:
                pending.append(pool.apply_async(_read, (job,)))
        if not pending:
            return
        read = pending.popleft().get()
        read_ahead.saw(read)
        yield read


def _read_rows(inputs: InputShard, reader: _RowReader, workers: int, window_frames: int,
               first: int = 0) -> Iterator[Tuple[InputRow, _RowRead]]:
    """Each row of the shard from its ``first`` on, with what reading it gave, in order
    (``workers`` processes about a window of ``window_frames`` ahead, or this one)."""
    rows = inputs.rows[first:]
    jobs = ((reader, row) for row in rows)
    if workers <= 0 or not rows:
        yield from zip(rows, map(_read, jobs))
        return
    with _reading_pool(workers) as pool:
        yield from zip(rows, _read_in_order(pool, jobs, _ReadAhead(workers, window_frames)))


def extract_features(args: argparse.Namespace) -> Dict[str, object]:
    """Run one shard (module docstring); returns the summary written to ``NAME_SHARD_NUMSHARDS.json``."""
    _check_options(args)
    out_dir = Path(args.out_dir)
    stem = f"{list_name(Path(args.manifest))}_{args.shard}_{args.num_shards}"
    settings = _settings(args)
    if not args.overwrite:
        done = finished_summary(out_dir, stem, settings)
        if done is not None:
            discard_progress(out_dir, stem)  # a run stopped after writing the summary left it
            logger.info(f"{out_dir / stem}: this shard is already done with the same settings (--overwrite redoes it)")
            return done
    loaded = load_checkpoint_encoder(args.checkpoint)
    layers = sorted(set(args.layer)) if args.layer else [loaded.num_layers]
    check_layers(layers, loaded.num_layers)
    if not args.overwrite:
        _refuse_another_job(out_dir, stem, settings, layers)
    inputs = read_input_shard(args.manifest, args.num_shards, args.shard, args.audio_root)
    normalization = _normalization(args, loaded, inputs.name)
    band = _mel_band(args, loaded)
    resolved = _resolved(normalization, band)
    reader = _RowReader(inputs.root, loaded.feature_dim, normalization.transform, args.downmix, band.high_freq)
    device = _device(args)
    encoder = loaded.encoder.to(device)
    logger.info(f"{loaded.path} ({loaded.model or '?'}, layers 0..{loaded.num_layers}): layers {layers} of rows "
                f"{inputs.start}..{inputs.end - 1} of {inputs.path} ({inputs.num_rows} rows), "
                f"{normalization.description}, audio files' Mel filterbank up to {band.high_freq or 8000:g} Hz "
                f"({band.source}), on {device}")
    outputs = ShardOutputs(out_dir, stem, layers, encoder.embed_dim, args.dtype, dict(settings, resolved=resolved),
                           resume=not args.overwrite)
    shard = _Shard(args, inputs, encoder, layers, device, outputs)
    summary = shard.run(reader, {"settings": settings, "resolved": resolved, "layers": layers,
                                 "normalization": normalization.description, "embed_dim": encoder.embed_dim,
                                 "rows": [inputs.start, inputs.end]})
    logger.info(f"done: {summary['counts']['with_states']} rows, {summary['counts']['frames']} frames per layer, "
                f"{shard.real_time_factor():.0f}x real time; {out_dir / (stem + '.json')}")
    return summary


class _Shard:
    """One shard's rows read, encoded window by window and written (:func:`extract_features`)."""

    def __init__(self, args: argparse.Namespace, inputs: InputShard, encoder, layers: List[int],
                 device: torch.device, outputs: ShardOutputs) -> None:
        self.args = args
        self.inputs = inputs
        self.encoder = encoder
        self.layers = layers
        self.device = device
        self.outputs = outputs
        self.autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.counts = {"rows": len(inputs.rows), "with_states": 0, "unreadable": 0, "too_short": 0, "failed": 0,
                       "input_frames": 0, "frames": 0}
        self.first = outputs.rows_done
        if self.first:
            self.counts.update(outputs.counts)
            done = "all of them" if self.first == self.counts["rows"] else "the rows before it"
            logger.info(f"resuming at row {self.first} of {self.counts['rows']}: {done} are in the files of the run "
                        "that stopped (--overwrite starts over)")
        self.frames_before = self.counts["input_frames"]
        self.started = time.perf_counter()
        self.window: List[Tuple[InputRow, _RowRead]] = []

    def real_time_factor(self) -> float:
        elapsed = time.perf_counter() - self.started
        return (self.counts["input_frames"] - self.frames_before) * _SECONDS_PER_FRAME / max(elapsed, 1e-9)

    def run(self, reader: _RowReader, summary: Dict[str, object]) -> Dict[str, object]:
        """Every row from the first not yet done; then the files put in place and ``summary``
        (completed here) written. The rows up to the last window stay for a rerun on any stop."""
        try:
            self._read_and_encode(reader)
            self._warn_without_states()
            summary = dict(summary, counts=self.counts, seconds=round(time.perf_counter() - self.started, 3),
                           resumed_at_row=self.first, mel_high_freq=reader.mel_high_freq)
            summary["files"] = self.outputs.close(summary)
        except BaseException:
            self.outputs.suspend()
            raise
        return summary

    def _read_and_encode(self, reader: _RowReader) -> None:
        window_frames, limit = 0, SORT_WINDOW_BATCHES * self.args.max_frames
        last_report = time.perf_counter()
        for row, read in _read_rows(self.inputs, reader, self.args.workers, limit, self.first):
            window_frames += self._count(row, read)
            self.window.append((row, read))
            if window_frames >= limit:
                self._run_window()
                window_frames = 0
            now = time.perf_counter()
            if now - last_report > 60:
                last_report = now
                self._report(now)
        self._run_window()

    def _count(self, row: InputRow, read: _RowRead) -> int:
        """Count what reading a row gave; returns its frames (0 without features)."""
        if read.short:
            self.counts["too_short"] += 1
        elif read.problem is not None:
            if self.args.strict:
                raise AudioError(f"{self.inputs.path}: row {row.id!r}: {read.problem}")
            self.counts["unreadable"] += 1
            logger.warning(f"{self.inputs.path}: row {row.id!r}: {read.problem}")
        else:
            self.counts["input_frames"] += len(read.features)
            return len(read.features)
        return 0

    def _run_window(self) -> None:
        results = encode_window(self.encoder, [read.features for _, read in self.window], self.layers,
                                self.args.max_frames, self.device, self.autocast)
        for (row, read), result in zip(self.window, results):
            if read.problem is not None:
                self.outputs.add_without_states(row.id, row.audio, read.problem)
            elif result.problem is not None:
                self.counts["failed"] += 1
                logger.warning(f"{self.inputs.path}: row {row.id!r}: {result.problem}")
                self.outputs.add_without_states(row.id, row.audio, result.problem)
            else:
                self.outputs.add(row.id, result.states, row.audio)
                self.counts["with_states"] += 1
                self.counts["frames"] += len(next(iter(result.states.values())))
        self.window.clear()
        self.outputs.save_progress(self.counts)

    def _report(self, now: float) -> None:
        audio_seconds = (self.counts["input_frames"] - self.frames_before) * _SECONDS_PER_FRAME
        logger.info(f"{self.outputs.rows_done + len(self.window)} of {self.counts['rows']} rows, "
                    f"{self.counts['input_frames'] * _SECONDS_PER_FRAME / 3600:.2f} h of audio, "
                    f"{audio_seconds / (now - self.started):.0f}x real time")

    def _warn_without_states(self) -> None:
        counts, stem = self.counts, self.outputs.out_dir / self.outputs.stem
        without = counts["rows"] - counts["with_states"]
        if without:
            logger.warning(f"{without} of {counts['rows']} rows have no states ({counts['unreadable']} unreadable, "
                           f"{counts['too_short']} under {MIN_INPUT_FRAMES} frames, {counts['failed']} failed): "
                           f"length 0 in the .len files, listed in {stem}.skipped.tsv")
        if counts["frames"] == 0:
            logger.warning(f"{stem}: no row of this shard gave a state")


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
