#!/usr/bin/env python3
"""Decoding speed of ``fairseq-generate --beam 5``: ``slam_s2t_tiny`` against fairseq's ``s2t_conformer``.

Both models decode the same set with fairseq's own ``fairseq-generate`` (``speech_to_text`` task);
we report the sentences/second fairseq-generate itself prints ("Translated N sentences ... in Xs
(Y sentences/s ...)", generation time only, model loading excluded), the median over interleaved
repeats (A B A B ...), and the ratio slam / conformer as the median of the per-pair ratios (a
machine whose speed drifts slows both runs of a pair alike).

Fair comparison:
- ``s2t_conformer`` gets the same widths as ``slam_s2t_tiny`` (encoder 64, FFN 128, 4 heads,
  kernel 5; decoder 2 layers of 64/128/4 heads, shared embeddings), 4 Conformer layers (ours:
  2 speech + 2 multimodal), and the channel count of its Conv1d subsampler chosen so that the
  total parameter counts match (both are printed).
- Every hypothesis has exactly ``--output-tokens`` tokens (``--min-len`` = ``--max-len-b``), so both
  decoders run the same number of beam steps whatever their (untrained) weights predict.
- The input is random 80-dim features of realistic lengths (``--min-frames``..``--max-frames``,
  10 ms frames), stored like fairseq's S2T recipes (an uncompressed zip of .npy); speech content
  does not change the amount of work. The models are fairseq checkpoints written by
  ``fairseq-train --max-update 1`` on that set.

    python benchmarks/bench_decoding.py                       # 64 utterances, 5 repeats
    python benchmarks/bench_decoding.py --utterances 128 --repeats 5 --batch-size 32
"""
from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifests.core import stored_zip_entries  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
USER_DIR = REPO_ROOT / "slam_fairseq"
TASK = "bench"
SLAM_ARGS = ["--arch", "slam_s2t_tiny"]
CONFORMER_ARGS = ["--arch", "s2t_conformer", "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
                  "--encoder-attention-heads", "4", "--encoder-layers", "4", "--depthwise-conv-kernel-size", "5",
                  "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128", "--decoder-attention-heads", "4",
                  "--decoder-layers", "2", "--share-decoder-input-output-embed"]
_TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")


def write_data(directory: Path, utterances: int, min_frames: int, max_frames: int, vocab_size: int,
               target_words: int, seed: int) -> None:
    """Random features in ``fbank.zip``, ``train_bench.tsv`` = ``test_bench.tsv``, a word dictionary
    and ``config_bench.yaml`` (utterance CMVN, no SentencePiece)."""
    import yaml

    from slam_formats.manifest import write_s2t_manifest

    generator = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    zip_path = directory / "fbank.zip"
    lengths = generator.integers(min_frames, max_frames + 1, size=utterances)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, length in enumerate(lengths):
            buffer = io.BytesIO()
            np.save(buffer, generator.standard_normal((int(length), 80)).astype(np.float32))
            archive.writestr(f"utt{index}.npy", buffer.getvalue())
    rows = []
    for index, (offset, length) in enumerate(stored_zip_entries(zip_path).values()):
        words = generator.integers(0, vocab_size, size=target_words)
        rows.append({"id": f"utt{index}", "audio": f"{zip_path.name}:{offset}:{length}",
                     "n_frames": int(lengths[index]), "tgt_text": " ".join(f"w{w}" for w in words),
                     "speaker": "bench"})
    for split in ("train", "test"):
        write_s2t_manifest(str(directory / f"{split}_{TASK}.tsv"), rows)
    (directory / "dict.txt").write_text("".join(f"w{index} 1\n" for index in range(vocab_size)), encoding="utf-8")
    config = {"input_channels": 1, "input_feat_per_channel": 80, "audio_root": str(directory.resolve()),
              "vocab_filename": "dict.txt", "transforms": {"*": ["utterance_cmvn"]}}
    (directory / f"config_{TASK}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


_THREADS: Dict[str, str] = {}


def _env() -> Dict[str, str]:
    env = dict(os.environ, **_THREADS)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=str(REPO_ROOT))
    if result.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{result.stdout[-4000:]}")
    return result.stdout


def _common(data: Path) -> List[str]:
    return [str(data), "--user-dir", str(USER_DIR), "--task", "speech_to_text", "--config-yaml",
            f"config_{TASK}.yaml", "--num-workers", "0", "--required-batch-size-multiple", "1"]


def train_one_update(data: Path, save_dir: Path, model_args: Sequence[str]) -> Path:
    """A real fairseq checkpoint of the model (one update, so that fairseq-generate loads it as usual)."""
    _run("fairseq_cli.train", *_common(data), "--train-subset", f"train_{TASK}", "--valid-subset",
         f"train_{TASK}", "--disable-validation", "--save-dir", str(save_dir), "--no-epoch-checkpoints",
         "--criterion", "label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "1e-5",
         "--max-tokens", "20000", "--max-update", "1", "--seed", "1", *model_args)
    return save_dir / "checkpoint_last.pt"


def parameter_count(checkpoint: Path) -> int:
    import torch

    import slam_fairseq.compat  # noqa: F401  (weights-only allow-list)

    with open(checkpoint, "rb") as handle:
        state = torch.load(handle, map_location="cpu")
    return sum(value.numel() for key, value in state["model"].items()
               if key != "encoder.speech_encoder.mask_embedding" and value.is_floating_point()
               and not key.endswith(("_float_tensor", "dictionary_fingerprint")))


def match_conformer_channels(data: Path, work: Path, target: int) -> List[str]:
    """s2t_conformer arguments whose parameter count is closest to ``target`` (Conv1d channels)."""
    best = None
    for channels in (32, 48, 64, 80, 96):
        args = CONFORMER_ARGS + ["--conv-channels", str(channels)]
        count = parameter_count(train_one_update(data, work / f"conformer_c{channels}", args))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (args, count, channels)
        if count > target:
            break
    return best[0]


def generate_rate(data: Path, checkpoint: Path, args: argparse.Namespace) -> float:
    log = _run("fairseq_cli.generate", *_common(data), "--gen-subset", f"test_{TASK}", "--path", str(checkpoint),
               "--beam", str(args.beam), "--batch-size", str(args.batch_size), "--max-tokens", "100000",
               "--min-len", str(args.output_tokens), "--max-len-a", "0", "--max-len-b", str(args.output_tokens),
               "--quiet")
    match = _TRANSLATED.search(log)
    if match is None:
        raise SystemExit(f"no 'Translated ... sentences/s' line in:\n{log[-3000:]}")
    translated = int(match.group(1).replace(",", ""))
    if translated != args.utterances:
        raise SystemExit(f"fairseq-generate decoded {translated} of {args.utterances} utterances")
    return float(match.group(4))


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--min-frames", type=int, default=300, help="shortest input (10 ms frames)")
    parser.add_argument("--max-frames", type=int, default=700, help="longest input (10 ms frames)")
    parser.add_argument("--output-tokens", type=int, default=20, help="tokens every hypothesis gets")
    parser.add_argument("--vocab-size", type=int, default=1000, help="target dictionary size")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int,
                        help="OMP/MKL threads of every fairseq run (default: torch's choice); 1 gives steadier "
                             "numbers on a shared machine")
    parser.add_argument("--work-dir", type=Path, help="keep data and checkpoints here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        _THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="bench_decoding_") as temporary:
        work = args.work_dir or Path(temporary)
        data = work / "data"
        write_data(data, args.utterances, args.min_frames, args.max_frames, args.vocab_size,
                   args.output_tokens, args.seed)
        slam = train_one_update(data, work / "slam", SLAM_ARGS)
        slam_parameters = parameter_count(slam)
        conformer_args = match_conformer_channels(data, work, slam_parameters)
        conformer = train_one_update(data, work / "conformer", conformer_args)
        conformer_parameters = parameter_count(conformer)
        rates: Dict[str, List[float]] = {"slam_s2t_tiny": [], "s2t_conformer": []}
        for _ in range(args.repeats):
            rates["slam_s2t_tiny"].append(generate_rate(data, slam, args))
            rates["s2t_conformer"].append(generate_rate(data, conformer, args))
    pairs = list(zip(rates["slam_s2t_tiny"], rates["s2t_conformer"]))
    ratio = statistics.median(slam_rate / conformer_rate for slam_rate, conformer_rate in pairs)
    best = {name: max(values) for name, values in rates.items()}
    threads = args.threads or "torch default"
    print(f"fairseq-generate --beam {args.beam}, {args.utterances} utterances of {args.min_frames}-"
          f"{args.max_frames} frames, {args.output_tokens} output tokens each, batch {args.batch_size}, "
          f"threads {threads}, load average {os.getloadavg()[0]:.1f}")
    for name, parameters in (("slam_s2t_tiny", slam_parameters), ("s2t_conformer", conformer_parameters)):
        print(f"  {name}  {parameters:>9,} parameters  median {statistics.median(rates[name]):7.2f} "
              f"best {best[name]:7.2f} sentences/s  (runs: {', '.join(f'{rate:.2f}' for rate in rates[name])})")
    print(f"  s2t_conformer arguments: {' '.join(conformer_args[2:])}")
    print(f"  ratio slam / conformer: median of {len(pairs)} interleaved pairs {ratio:.2f}, "
          f"best / best {best['slam_s2t_tiny'] / best['s2t_conformer']:.2f}")
    return {"slam_sentences_per_second": best["slam_s2t_tiny"],
            "conformer_sentences_per_second": best["s2t_conformer"], "ratio": ratio}


if __name__ == "__main__":
    main()
